//! The Kubernetes API source: Services, EndpointSlices (`discovery.k8s.io/v1`) and Nodes
//! watched on the API server, published on the same channel as the manifests folder
//! ([`crate::manifests::Loaded`], with an empty refusal list).
//!
//! One kube-runtime [`watcher`] per kind, all namespaces, each feeding a reflector
//! [`Store`] (through its [`Writer`](reflector::store::Writer)). Guarantees:
//!
//! - **Gating.** Nothing is published until each of the three kinds has completed its first
//!   full list (the watcher's first [`Event::InitDone`]). An agent must never delete map
//!   entries because it has seen only part of the cluster. The first publication is sent even
//!   when the cluster is empty (so that a receiver's `changed()` fires).
//! - **Complete snapshots.** Every publication holds the three stores whole. During a re-list
//!   the store keeps its previous contents; the listed objects are buffered and swapped in at
//!   `InitDone`, objects absent from the new list disappear at that moment (never earlier).
//! - **Coalescing.** After a change (`Apply`, `Delete`, `InitDone`) a snapshot is published
//!   at once if the previous publication is at least [`WatchOptions::coalesce`] old (default
//!   50 ms), else when it becomes that old: an isolated event is published within a few ms, a
//!   burst yields at most one publication per interval, and no change waits longer than about
//!   one interval. A snapshot equal to the previous publication is not sent again.
//! - **Backoff.** Watcher errors (list/watch failures, API errors, stream errors) are retried
//!   with kube-runtime's default backoff (exponential 0.8 s to 30 s with jitter, reset after
//!   120 s of health), per kind, so that one failing kind does not slow the others. Each
//!   error is logged once (`warn`, naming the kind) and counted in [`KubeStats`]; the last
//!   published state stays in place meanwhile.
//! - **410 Gone.** A watch that expires (`410 Gone` as a watch event) makes the watcher
//!   re-list from scratch (a new `Init` ... `InitDone` cycle, counted as a restart). A watch
//!   *request* refused with HTTP 410, which the watcher would retry forever with the same
//!   stale resource version, makes this module rebuild that kind's watcher (a fresh list),
//!   at most once a second.
//! - **Bookmarks.** Watches request bookmarks (`allowWatchBookmarks=true`), so that a
//!   reconnect resumes from a recent resource version instead of re-listing. Watches end
//!   every ~290 s (server timeout) and resume without a re-list.
//! - **Lists** are paged (500 objects a page) with consistent reads; with
//!   [`WatchOptions::streaming_lists`] the initial state comes from a watch with
//!   `sendInitialEvents=true` instead (Kubernetes 1.27+ with the `WatchList` feature; a
//!   server without it never completes the list, so it is off by default).
//! - **Node narrowing.** With [`WatchOptions::node_name`], only that Node is watched
//!   (`fieldSelector=metadata.name=NODE`), which is all the desired-state function needs.
//!
//! Objects are sorted by namespace and name in each snapshot, so that two snapshots of the
//! same cluster compare equal.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config, Resource};
use tokio::time::Instant;

use crate::{
    manifests::{Loaded, Objects},
    model,
};

/// A Kubernetes client: from the kubeconfig file `kubeconfig` (its current context) if given,
/// else the in-cluster configuration (service account token and `KUBERNETES_SERVICE_HOST`),
/// else the usual inference (`KUBECONFIG`, `~/.kube/config`).
///
/// Plain `http://` servers work (no TLS, no authentication needed). Errors name the file
/// or what was tried.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => match Config::incluster() {
            Ok(c) => c,
            Err(in_cluster) => Config::infer().await.map_err(|e| {
                anyhow!(
                    "no Kubernetes configuration: not in a cluster ({in_cluster}), \
                     and no kubeconfig found ({e})"
                )
            })?,
        },
    };
    let url = config.cluster_url.clone();
    Client::try_from(config).with_context(|| format!("building a Kubernetes client for {url}"))
}

/// One of the three watched kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        })
    }
}

/// Counters of one kind's watcher. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct KindStats {
    /// Watcher errors (failed lists and watches, API error events, broken streams).
    pub errors: Arc<AtomicU64>,
    /// Full re-lists after the first list (410 Gone, failed lists, rebuilt watchers).
    pub restarts: Arc<AtomicU64>,
    /// Completed full lists (`InitDone`), the first one included.
    pub lists: Arc<AtomicU64>,
    /// Watch events applied to the store (`Apply` and `Delete`).
    pub events: Arc<AtomicU64>,
}

/// Counters of the API source, for metrics. Cheap to clone (shared); create one, pass a clone
/// to [`watch`] and read the other.
#[derive(Clone, Debug, Default)]
pub struct KubeStats {
    pub services: KindStats,
    pub slices: KindStats,
    pub nodes: KindStats,
    /// Snapshots published on the channel.
    pub publishes: Arc<AtomicU64>,
}

impl KubeStats {
    /// The counters of `kind`.
    pub fn kind(&self, kind: Kind) -> &KindStats {
        match kind {
            Kind::Service => &self.services,
            Kind::EndpointSlice => &self.slices,
            Kind::Node => &self.nodes,
        }
    }
}

/// Options of [`watch`].
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Watch only the Node of this name (field selector `metadata.name=NAME`); all Nodes
    /// if `None`.
    pub node_name: Option<String>,
    /// Minimum interval between two publications (bursts of events are coalesced).
    pub coalesce: Duration,
    /// Initial state from a streaming list (`sendInitialEvents`) instead of paged lists.
    pub streaming_lists: bool,
    /// `--service-proxy-name` (see `model::service_selector`).
    pub service_proxy_name: Option<String>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            node_name: None,
            coalesce: Duration::from_millis(50),
            streaming_lists: false,
            service_proxy_name: None,
        }
    }
}

impl WatchOptions {
    /// The watcher configuration of `kind`: bookmarks on, the node field selector for
    /// Nodes, kube-proxy's label selectors for Services (no other proxy's) and
    /// EndpointSlices (no headless Service's), so the API server does not even send
    /// what the agent would skip.
    pub fn watcher_config(&self, kind: Kind) -> watcher::Config {
        // Bookmarks are on by default; said again so that a change of default cannot drop them.
        let mut config = watcher::Config {
            bookmarks: true,
            ..watcher::Config::default()
        };
        if self.streaming_lists {
            config = config.streaming_lists();
        }
        match (kind, &self.node_name) {
            (Kind::Node, Some(name)) => config = config.fields(&format!("metadata.name={name}")),
            (Kind::Service, _) => {
                config = config.labels(&model::service_selector(self.service_proxy_name.as_deref()))
            }
            (Kind::EndpointSlice, _) => config = config.labels(&model::slice_selector()),
            (Kind::Node, None) => {}
        }
        config
    }
}

/// Watches Services, EndpointSlices and Nodes through `client` and publishes snapshots on
/// `tx` as the module documentation describes. Runs until every receiver of `tx` is dropped.
pub async fn watch(
    client: Client,
    options: WatchOptions,
    stats: KubeStats,
    tx: tokio::sync::watch::Sender<Loaded>,
) {
    let services = watcher_factory(Api::<Service>::all(client.clone()), &options, Kind::Service);
    let slices = watcher_factory(
        Api::<EndpointSlice>::all(client.clone()),
        &options,
        Kind::EndpointSlice,
    );
    let nodes = watcher_factory(Api::<Node>::all(client), &options, Kind::Node);
    run(services, slices, nodes, options.coalesce, stats, tx).await;
}

/// A boxed stream of watcher events of one kind.
type EventStream<K> = BoxStream<'static, watcher::Result<Event<K>>>;
/// Makes a fresh watcher stream (a new list, then watches).
type Factory<K> = Box<dyn FnMut() -> EventStream<K> + Send>;

fn watcher_factory<K>(api: Api<K>, options: &WatchOptions, kind: Kind) -> Factory<K>
where
    K: Resource + Clone + fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let config = options.watcher_config(kind);
    Box::new(move || {
        watcher::watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed()
    })
}

/// Publication gating and coalescing, as a pure state machine over per-kind readiness and
/// change times.
#[derive(Clone, Debug)]
pub struct Gate {
    ready: [bool; 3],
    /// The first change not yet published.
    pending_since: Option<Instant>,
    last_publish: Option<Instant>,
    interval: Duration,
}

impl Gate {
    /// A gate publishing at most once every `interval`. Nothing is ready, but a publication is
    /// pending (the first snapshot is sent once every kind is ready, even if empty).
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self {
            ready: [false; 3],
            pending_since: Some(now),
            last_publish: None,
            interval,
        }
    }

    /// `kind` completed a full list.
    pub fn list_done(&mut self, kind: Kind, now: Instant) {
        self.ready[kind.index()] = true;
        self.changed(now);
    }

    /// A store changed.
    pub fn changed(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
    }

    /// Whether every kind has completed a full list.
    pub fn ready(&self) -> bool {
        self.ready.iter().all(|&r| r)
    }

    /// When to publish next: `None` while some kind has not completed its first list or
    /// nothing changed since the last publication.
    pub fn due(&self) -> Option<Instant> {
        let since = self.pending_since?;
        if !self.ready() {
            return None;
        }
        Some(match self.last_publish {
            Some(last) => since.max(last + self.interval),
            None => since,
        })
    }

    /// A snapshot was published (or found equal to the previous one) at `now`.
    pub fn published(&mut self, now: Instant) {
        self.pending_since = None;
        self.last_publish = Some(now);
    }
}

/// What one watcher item did to its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Nothing,
    Changed,
    ListDone,
}

/// The watcher, store and counters of one kind.
struct Source<K: Resource<DynamicType = ()> + Clone + 'static> {
    kind: Kind,
    make: Factory<K>,
    stream: EventStream<K>,
    writer: reflector::store::Writer<K>,
    store: Store<K>,
    inits: u64,
    last_rebuild: Option<Instant>,
    stats: KindStats,
}

impl<K: Resource<DynamicType = ()> + Clone + Send + 'static> Source<K> {
    fn new(kind: Kind, mut make: Factory<K>, stats: KindStats) -> Self {
        let (store, writer) = reflector::store::<K>();
        Self {
            kind,
            stream: make(),
            make,
            writer,
            store,
            inits: 0,
            last_rebuild: None,
            stats,
        }
    }

    /// Applies one item of the watcher stream (`None`: the stream ended, which a watcher
    /// never does; it is rebuilt).
    fn handle(&mut self, item: Option<watcher::Result<Event<K>>>) -> Outcome {
        let kind = self.kind;
        let event = match item {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = %kind, error = %e, "Kubernetes watch error, retrying");
                if is_watch_start_gone(&e) {
                    self.rebuild();
                }
                return Outcome::Nothing;
            }
            None => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = %kind, "Kubernetes watch stream ended, restarting");
                self.rebuild();
                return Outcome::Nothing;
            }
        };
        self.writer.apply_watcher_event(&event);
        match event {
            Event::Init => {
                // A retry of a first list that never completed is not a re-list.
                if self.inits > 0 && self.stats.lists.load(Ordering::Relaxed) > 0 {
                    self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(kind = %kind, "re-listing");
                }
                self.inits += 1;
                Outcome::Nothing
            }
            Event::InitApply(_) => Outcome::Nothing,
            Event::InitDone => {
                let n = self.stats.lists.fetch_add(1, Ordering::Relaxed);
                if n == 0 {
                    tracing::info!(kind = %kind, objects = self.store.len(), "listed");
                } else {
                    tracing::debug!(kind = %kind, objects = self.store.len(), "re-listed");
                }
                Outcome::ListDone
            }
            Event::Apply(_) | Event::Delete(_) => {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                Outcome::Changed
            }
        }
    }

    /// Replaces the watcher with a fresh one (which starts with a full list), delayed by a
    /// second if the previous rebuild was less than a second ago.
    fn rebuild(&mut self) {
        let now = Instant::now();
        let recent = self
            .last_rebuild
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1));
        self.last_rebuild = Some(now);
        let fresh = (self.make)();
        self.stream = if recent {
            futures::stream::once(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                fresh
            })
            .flatten()
            .boxed()
        } else {
            fresh
        };
    }

    /// The store's objects, cloned and sorted by namespace and name.
    fn objects(&self) -> Vec<K> {
        let mut v: Vec<K> = self.store.state().iter().map(|o| K::clone(o)).collect();
        v.sort_by(|a, b| sort_key(a.meta()).cmp(&sort_key(b.meta())));
        v
    }
}

fn sort_key(m: &ObjectMeta) -> (Option<&str>, Option<&str>) {
    (m.namespace.as_deref(), m.name.as_deref())
}

/// A watch request refused with HTTP 410 (Gone): the watcher would retry it with the same
/// expired resource version forever.
fn is_watch_start_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410)
}

/// The event loop of [`watch`], over any three watcher factories (tests feed it fakes).
async fn run(
    services: Factory<Service>,
    slices: Factory<EndpointSlice>,
    nodes: Factory<Node>,
    coalesce: Duration,
    stats: KubeStats,
    tx: tokio::sync::watch::Sender<Loaded>,
) {
    let mut services = Source::new(Kind::Service, services, stats.services.clone());
    let mut slices = Source::new(Kind::EndpointSlice, slices, stats.slices.clone());
    let mut nodes = Source::new(Kind::Node, nodes, stats.nodes.clone());
    let mut gate = Gate::new(coalesce, Instant::now());
    let mut sent_once = false;
    loop {
        let due = gate.due();
        // Not biased: under a steady flood of events the timer branch still gets its turn.
        let (kind, outcome) = tokio::select! {
            () = tx.closed() => return,
            item = services.stream.next() => (Kind::Service, services.handle(item)),
            item = slices.stream.next() => (Kind::EndpointSlice, slices.handle(item)),
            item = nodes.stream.next() => (Kind::Node, nodes.handle(item)),
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                let objects = Objects {
                    services: services.objects(),
                    slices: slices.objects(),
                    nodes: nodes.objects(),
                };
                let counts = (objects.services.len(), objects.slices.len(), objects.nodes.len());
                let sent = tx.send_if_modified(|cur| {
                    if sent_once && cur.0 == objects {
                        return false;
                    }
                    *cur = Arc::new((objects, Vec::new()));
                    true
                });
                if sent {
                    if !sent_once {
                        tracing::info!(
                            services = counts.0,
                            endpoint_slices = counts.1,
                            nodes = counts.2,
                            "Kubernetes API: first complete snapshot"
                        );
                    }
                    sent_once = true;
                    stats.publishes.fetch_add(1, Ordering::Relaxed);
                }
                gate.published(Instant::now());
                continue;
            }
        };
        let now = Instant::now();
        match outcome {
            Outcome::Nothing => {}
            Outcome::Changed => gate.changed(now),
            Outcome::ListDone => gate.list_done(kind, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use futures::channel::mpsc::{unbounded, UnboundedSender};
    use kube::core::Status;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    use super::*;

    type Tx<K> = UnboundedSender<watcher::Result<Event<K>>>;

    /// A factory handing out `n` channel-fed streams (then streams that never yield), with the
    /// number of calls.
    fn fake<K: Send + 'static>(n: usize) -> (Factory<K>, Vec<Tx<K>>, Arc<AtomicUsize>) {
        let mut senders = Vec::new();
        let mut receivers = VecDeque::new();
        for _ in 0..n {
            let (tx, rx) = unbounded();
            senders.push(tx);
            receivers.push_back(rx);
        }
        let receivers = Mutex::new(receivers);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let factory: Factory<K> = Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            match receivers.lock().unwrap().pop_front() {
                Some(rx) => rx.boxed(),
                None => futures::stream::pending().boxed(),
            }
        });
        (factory, senders, calls)
    }

    fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(str::to_string),
            name: Some(name.to_string()),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        }
    }
    fn svc(name: &str) -> Service {
        Service {
            metadata: meta(Some("default"), name),
            ..Service::default()
        }
    }
    fn slice(name: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: meta(Some("default"), name),
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: None,
        }
    }
    fn node(name: &str) -> Node {
        Node {
            metadata: meta(None, name),
            ..Node::default()
        }
    }
    fn list<K>(tx: &Tx<K>, objects: Vec<K>) {
        tx.unbounded_send(Ok(Event::Init)).unwrap();
        for o in objects {
            tx.unbounded_send(Ok(Event::InitApply(o))).unwrap();
        }
        tx.unbounded_send(Ok(Event::InitDone)).unwrap();
    }
    fn names<K: Resource>(v: &[K]) -> Vec<&str> {
        v.iter()
            .map(|o| o.meta().name.as_deref().unwrap())
            .collect()
    }
    fn api_error(code: u16) -> watcher::Error {
        let mut s = Status::failure("boom", "Test");
        s.code = code;
        watcher::Error::WatchError(s.boxed())
    }
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    struct Harness {
        services: Vec<Tx<Service>>,
        slices: Vec<Tx<EndpointSlice>>,
        nodes: Vec<Tx<Node>>,
        service_calls: Arc<AtomicUsize>,
        rx: watch::Receiver<Loaded>,
        stats: KubeStats,
        task: tokio::task::JoinHandle<()>,
    }

    fn harness(streams: usize) -> Harness {
        let (sf, services, service_calls) = fake(streams);
        let (ef, slices, _) = fake(streams);
        let (nf, nodes, _) = fake(streams);
        let (tx, rx) = watch::channel(Loaded::default());
        let stats = KubeStats::default();
        let task = tokio::spawn(run(
            sf,
            ef,
            nf,
            Duration::from_millis(50),
            stats.clone(),
            tx,
        ));
        Harness {
            services,
            slices,
            nodes,
            service_calls,
            rx,
            stats,
            task,
        }
    }

    impl Harness {
        fn publishes(&self) -> u64 {
            self.stats.publishes.load(Ordering::Relaxed)
        }
        async fn ready(&mut self) {
            list(&self.services[0], vec![svc("a")]);
            list(&self.slices[0], vec![slice("a-1")]);
            list(&self.nodes[0], vec![node("n1")]);
            self.rx.changed().await.unwrap();
            self.rx.borrow_and_update();
        }
    }

    #[test]
    fn gate_waits_for_every_kind_then_rate_limits() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut g = Gate::new(Duration::from_millis(50), t0);
        assert_eq!(g.due(), None);
        g.list_done(Kind::Service, ms(1));
        g.changed(ms(2));
        g.list_done(Kind::Node, ms(3));
        assert_eq!(g.due(), None, "EndpointSlices not listed yet");
        assert!(!g.ready());
        g.list_done(Kind::EndpointSlice, ms(4));
        assert!(g.ready());
        // The first publication is pending since the start, even with no object.
        assert_eq!(g.due(), Some(t0));
        g.published(ms(5));
        assert_eq!(g.due(), None);
        // A change soon after a publication waits for the interval.
        g.changed(ms(10));
        g.changed(ms(20));
        assert_eq!(g.due(), Some(ms(55)));
        g.published(ms(55));
        // An isolated change later is due at once.
        g.changed(ms(500));
        assert_eq!(g.due(), Some(ms(500)));
        // Re-listing a kind keeps it ready.
        g.published(ms(500));
        g.list_done(Kind::Node, ms(600));
        assert_eq!(g.due(), Some(ms(600)));
    }

    #[test]
    fn watcher_config_has_bookmarks_and_the_node_selector() {
        let all = WatchOptions::default();
        for kind in Kind::ALL {
            let c = all.watcher_config(kind);
            assert!(c.bookmarks);
            assert_eq!(c.field_selector, None);
            assert_eq!(
                c.initial_list_strategy,
                watcher::InitialListStrategy::ListWatch
            );
        }
        let one = WatchOptions {
            node_name: Some("node-a".into()),
            streaming_lists: true,
            ..WatchOptions::default()
        };
        let c = one.watcher_config(Kind::Node);
        assert_eq!(c.field_selector.as_deref(), Some("metadata.name=node-a"));
        assert_eq!(
            c.initial_list_strategy,
            watcher::InitialListStrategy::StreamingList
        );
        assert!(c.bookmarks);
        assert_eq!(one.watcher_config(Kind::Service).field_selector, None);
        // kube-proxy's label selectors.
        let labels = |o: &WatchOptions, k| o.watcher_config(k).label_selector;
        assert_eq!(
            labels(&one, Kind::Service).as_deref(),
            Some("!service.kubernetes.io/service-proxy-name")
        );
        assert_eq!(
            labels(&one, Kind::EndpointSlice).as_deref(),
            Some("!service.kubernetes.io/headless")
        );
        assert_eq!(labels(&one, Kind::Node), None);
        let named = WatchOptions {
            service_proxy_name: Some("np".into()),
            ..WatchOptions::default()
        };
        assert_eq!(
            labels(&named, Kind::Service).as_deref(),
            Some("service.kubernetes.io/service-proxy-name=np")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_published_before_every_kind_is_listed() {
        let mut h = harness(1);
        list(&h.services[0], vec![svc("b"), svc("a")]);
        list(&h.slices[0], vec![slice("a-1")]);
        // Nodes: listing started, not done.
        h.nodes[0].unbounded_send(Ok(Event::Init)).unwrap();
        h.nodes[0]
            .unbounded_send(Ok(Event::InitApply(node("n1"))))
            .unwrap();
        // Changes of the listed kinds do not publish either.
        h.services[0]
            .unbounded_send(Ok(Event::Apply(svc("c"))))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!h.rx.has_changed().unwrap());
        assert_eq!(h.publishes(), 0);

        let before = Instant::now();
        h.nodes[0].unbounded_send(Ok(Event::InitDone)).unwrap();
        h.rx.changed().await.unwrap();
        assert_eq!(before.elapsed(), Duration::ZERO);
        let loaded = h.rx.borrow_and_update().clone();
        let (objects, refusals) = &*loaded;
        assert!(refusals.is_empty());
        assert_eq!(names(&objects.services), ["a", "b", "c"]);
        assert_eq!(names(&objects.slices), ["a-1"]);
        assert_eq!(names(&objects.nodes), ["n1"]);
        assert_eq!(h.publishes(), 1);
        assert_eq!(h.stats.services.lists.load(Ordering::Relaxed), 1);
        assert_eq!(h.stats.services.events.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_cluster_is_published() {
        let mut h = harness(1);
        list(&h.services[0], vec![]);
        list(&h.slices[0], vec![]);
        list(&h.nodes[0], vec![]);
        h.rx.changed().await.unwrap();
        assert_eq!(h.rx.borrow_and_update().0, Objects::default());
        assert_eq!(h.publishes(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_published_promptly_and_coalesced() {
        let mut h = harness(1);
        h.ready().await;
        // Right after a publication: held until the interval has passed.
        let start = Instant::now();
        h.services[0]
            .unbounded_send(Ok(Event::Apply(svc("b"))))
            .unwrap();
        h.rx.changed().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        assert_eq!(names(&h.rx.borrow_and_update().0.services), ["a", "b"]);

        // An isolated change later is published at once.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = Instant::now();
        h.slices[0]
            .unbounded_send(Ok(Event::Delete(slice("a-1"))))
            .unwrap();
        h.rx.changed().await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(h.rx.borrow_and_update().0.slices.is_empty());

        // A burst of 100 changes, one every 5 ms: about one publication per 50 ms, none
        // later than 50 ms after its change.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = h.publishes();
        for i in 0..100 {
            h.services[0]
                .unbounded_send(Ok(Event::Apply(svc(&format!("burst-{i:03}")))))
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            let seen = h.rx.borrow().0.services.len();
            assert!(seen + 10 > 2 + i, "change {i} published too late ({seen})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = h.publishes() - before;
        assert!((9..=12).contains(&n), "{n} publications");
        assert_eq!(h.rx.borrow().0.services.len(), 102);
    }

    #[tokio::test(start_paused = true)]
    async fn a_relist_swaps_in_at_init_done_only() {
        let mut h = harness(1);
        h.ready().await;
        h.services[0]
            .unbounded_send(Ok(Event::Apply(svc("b"))))
            .unwrap();
        h.rx.changed().await.unwrap();
        h.rx.borrow_and_update();
        // The watch expired: a re-list in which `a` is gone.
        h.services[0].unbounded_send(Err(api_error(410))).unwrap();
        h.services[0].unbounded_send(Ok(Event::Init)).unwrap();
        h.services[0]
            .unbounded_send(Ok(Event::InitApply(svc("b"))))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!h.rx.has_changed().unwrap());
        assert_eq!(names(&h.rx.borrow().0.services), ["a", "b"]);
        h.services[0].unbounded_send(Ok(Event::InitDone)).unwrap();
        h.rx.changed().await.unwrap();
        assert_eq!(names(&h.rx.borrow_and_update().0.services), ["b"]);
        let s = &h.stats.services;
        assert_eq!(s.errors.load(Ordering::Relaxed), 1);
        assert_eq!(s.restarts.load(Ordering::Relaxed), 1);
        assert_eq!(s.lists.load(Ordering::Relaxed), 2);
        assert_eq!(h.stats.slices.restarts.load(Ordering::Relaxed), 0);

        // A re-list with the same objects publishes nothing new.
        let before = h.publishes();
        list(&h.nodes[0], vec![node("n1")]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!h.rx.has_changed().unwrap());
        assert_eq!(h.publishes(), before);
        assert_eq!(h.stats.nodes.restarts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_counted_and_keep_the_state() {
        let mut h = harness(1);
        h.ready().await;
        h.slices[0].unbounded_send(Err(api_error(500))).unwrap();
        h.slices[0].unbounded_send(Err(api_error(403))).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!h.rx.has_changed().unwrap());
        assert_eq!(h.stats.slices.errors.load(Ordering::Relaxed), 2);
        assert_eq!(h.stats.services.errors.load(Ordering::Relaxed), 0);
        assert_eq!(names(&h.rx.borrow().0.slices), ["a-1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_refused_with_410_rebuilds_the_watcher() {
        let mut h = harness(2);
        h.ready().await;
        assert_eq!(h.service_calls.load(Ordering::SeqCst), 1);
        let gone = watcher::Error::WatchStartFailed(kube::Error::Api({
            let mut s = Status::failure("too old resource version", "Expired");
            s.code = 410;
            s.boxed()
        }));
        h.services[0].unbounded_send(Err(gone)).unwrap();
        settle().await;
        assert_eq!(h.service_calls.load(Ordering::SeqCst), 2);
        // The fresh watcher lists again; until then the old state stays.
        assert!(!h.rx.has_changed().unwrap());
        list(&h.services[1], vec![svc("z")]);
        h.rx.changed().await.unwrap();
        assert_eq!(names(&h.rx.borrow_and_update().0.services), ["z"]);
        assert_eq!(h.stats.services.restarts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_the_receiver_is_dropped() {
        let h = harness(1);
        drop(h.rx);
        tokio::time::timeout(Duration::from_secs(1), h.task)
            .await
            .expect("run returns")
            .unwrap();
    }

    fn kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: t, cluster: {{server: \"{server}\"}}}}]\n\
                 users: [{{name: u, user: {{}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: t, user: u}}}}]\n\
                 current-context: c\n"
            ),
        )
        .unwrap();
        path
    }

    #[tokio::test]
    async fn client_errors_name_the_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let Err(e) = client(Some(&missing)).await else {
            panic!("no error")
        };
        assert!(
            format!("{e:#}").contains(&missing.display().to_string()),
            "{e:#}"
        );
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "apiVersion: v1\nkind: Config\ncurrent-context: x\n").unwrap();
        let Err(e) = client(Some(&bad)).await else {
            panic!("no error")
        };
        assert!(
            format!("{e:#}").contains(&bad.display().to_string()),
            "{e:#}"
        );
    }

    /// A minimal HTTP/1.1 API server: lists hold one object of each kind, the Services watch
    /// sends one ADDED event, other watches stay open and silent. Records request targets.
    async fn tiny_apiserver(requests: Arc<Mutex<Vec<String>>>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let requests = requests.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = conn.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let target = head.split(' ').nth(1).unwrap_or("").to_string();
                        requests.lock().unwrap().push(target.clone());
                        let path = target.split('?').next().unwrap();
                        let (kind, item) = match path {
                            "/api/v1/services" => (
                                "ServiceList",
                                r#"{"metadata":{"name":"web","namespace":"default","resourceVersion":"5"}}"#,
                            ),
                            "/apis/discovery.k8s.io/v1/endpointslices" => (
                                "EndpointSliceList",
                                r#"{"metadata":{"name":"web-1","namespace":"default","resourceVersion":"5"},"addressType":"IPv4","endpoints":[]}"#,
                            ),
                            "/api/v1/nodes" => (
                                "NodeList",
                                r#"{"metadata":{"name":"node-a","resourceVersion":"5"}}"#,
                            ),
                            _ => ("", ""),
                        };
                        if target.contains("watch=true") {
                            let mut head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                                            Transfer-Encoding: chunked\r\n\r\n"
                                .to_string();
                            if path == "/api/v1/services" {
                                let ev = r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Service","metadata":{"name":"web2","namespace":"default","resourceVersion":"6"}}}"#;
                                let ev = format!("{ev}\n");
                                head += &format!("{:x}\r\n{ev}\r\n", ev.len());
                            }
                            conn.write_all(head.as_bytes()).await.unwrap();
                            std::future::pending::<()>().await;
                        }
                        let body = format!(
                            r#"{{"kind":"{kind}","apiVersion":"v1","metadata":{{"resourceVersion":"5"}},"items":[{item}]}}"#
                        );
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        conn.write_all(resp.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn watches_a_plain_http_api_server() {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let addr = tiny_apiserver(requests.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let kc = kubeconfig(dir.path(), &format!("http://{addr}"));
        let client = client(Some(&kc)).await.unwrap();
        let (tx, mut rx) = watch::channel(Loaded::default());
        let options = WatchOptions {
            node_name: Some("node-a".into()),
            ..WatchOptions::default()
        };
        let stats = KubeStats::default();
        let task = tokio::spawn(watch(client, options, stats.clone(), tx));
        let deadline = Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            loop {
                rx.changed().await.unwrap();
                if rx.borrow_and_update().0.services.len() == 2 {
                    break;
                }
            }
        })
        .await
        .expect("the watched Service is published");
        let loaded = rx.borrow().clone();
        assert_eq!(names(&loaded.0.services), ["web", "web2"]);
        assert_eq!(names(&loaded.0.slices), ["web-1"]);
        assert_eq!(names(&loaded.0.nodes), ["node-a"]);
        let requests = requests.lock().unwrap().clone();
        let node_requests: Vec<_> = requests
            .iter()
            .filter(|r| r.starts_with("/api/v1/nodes"))
            .collect();
        assert!(
            node_requests
                .iter()
                .all(|r| r.contains("fieldSelector=metadata.name%3Dnode-a")),
            "{requests:?}"
        );
        assert!(
            requests
                .iter()
                .filter(|r| r.contains("watch=true"))
                .all(|r| r.contains("allowWatchBookmarks=true")),
            "{requests:?}"
        );
        for kind in Kind::ALL {
            assert_eq!(stats.kind(kind).errors.load(Ordering::Relaxed), 0);
        }
        drop(rx);
        tokio::time::timeout(deadline, task).await.unwrap().unwrap();
    }
}
