//! The agent's own health, as kube-proxy's proxier health server reports it: the state the
//! object source and the sync loop write ([`Health`]), the decisions `/healthz`, `/livez`
//! and `/readyz` make from it, and their bodies.
//!
//! kube-proxy (`pkg/proxy/healthcheck/proxier_health.go`): a change received from the API
//! and not applied within the health timeout makes the proxy unhealthy (`/livez` and
//! `/healthz` 503); a Node being deleted or tainted `ToBeDeletedByClusterAutoscaler` makes
//! only `/healthz` 503 (`nodeEligible: false`), so that load balancers drain the node while
//! the liveness probe leaves the agent alone.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Node;

use crate::manifests::Loaded;

/// The taint the Cluster Autoscaler puts on a node it is about to delete (kube-proxy's
/// `ToBeDeletedTaint`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What this node's Node object says about taking load balancer traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Not seen yet (starting up, or a source without Nodes): eligible, as in kube-proxy.
    Unknown,
    Eligible,
    /// `metadata.deletionTimestamp` is set.
    Deleting,
    /// Tainted [`TO_BE_DELETED_TAINT`].
    ToBeDeleted,
    /// Seen before, no longer there.
    Gone,
}

impl NodeState {
    pub fn eligible(self) -> bool {
        matches!(self, NodeState::Unknown | NodeState::Eligible)
    }

    /// The state after a snapshot of the Nodes: `before` when `name` is absent and was never
    /// seen, [`NodeState::Gone`] when it was.
    pub fn of(nodes: &[Node], name: &str, before: NodeState) -> NodeState {
        let Some(node) = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
        else {
            return match before {
                NodeState::Unknown => NodeState::Unknown,
                _ => NodeState::Gone,
            };
        };
        if node.metadata.deletion_timestamp.is_some() {
            return NodeState::Deleting;
        }
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        if tainted {
            NodeState::ToBeDeleted
        } else {
            NodeState::Eligible
        }
    }

    fn describe(self) -> &'static str {
        match self {
            NodeState::Unknown => "not seen yet",
            NodeState::Eligible => "eligible",
            NodeState::Deleting => "being deleted (deletionTimestamp set)",
            NodeState::ToBeDeleted => "tainted ToBeDeletedByClusterAutoscaler",
            NodeState::Gone => "deleted",
        }
    }
}

/// Why the agent is unhealthy (`/livez` and `/healthz` 503), each for longer than
/// `--healthz-stale-after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// A snapshot from the object source has waited this long for the sync loop.
    Pending(Duration),
    /// Every sync since this long ago failed in part (map operations).
    Failing(Duration),
    /// The sync loop has not turned for this long (it turns every 2 s when idle).
    Stuck(Duration),
}

/// What the sync loop and the object source have recorded.
#[derive(Clone, Debug)]
struct State {
    /// Wall-clock time of the last sync without errors (`lastUpdated`).
    last_updated: Option<SystemTime>,
    /// The number of the latest snapshot published to the sync loop.
    queued_gen: u64,
    /// Since when the oldest snapshot the sync loop has not applied yet waits (kube-proxy's
    /// `oldestPendingQueued`).
    pending_since: Option<Instant>,
    /// The first failed sync after the last one without errors.
    failing_since: Option<Instant>,
    last_turn: Instant,
    node: NodeState,
}

/// Liveness, readiness and node eligibility, shared by the sync loop and the object source
/// (writers) and the endpoints (readers).
#[derive(Debug)]
pub struct Health {
    attached: AtomicBool,
    synced: AtomicBool,
    stale_after: Duration,
    state: Mutex<State>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(DEFAULT_STALE_AFTER)
    }
}

/// `--healthz-stale-after`'s default: kube-proxy's health timeout (twice its 30 s sync period).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);

impl Health {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            attached: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            stale_after,
            state: Mutex::new(State {
                last_updated: None,
                queued_gen: 0,
                pending_since: None,
                failing_since: None,
                last_turn: Instant::now(),
                node: NodeState::Unknown,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::Relaxed);
    }
    /// A configured interface lost the programs (it vanished or was recreated): not ready
    /// until [`Health::set_attached`] again.
    pub fn set_unattached(&self) {
        self.attached.store(false, Ordering::Relaxed);
    }
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }
    /// Programs attached and the first complete desired state applied.
    pub fn ready(&self) -> bool {
        self.attached.load(Ordering::Relaxed) && self.synced.load(Ordering::Relaxed)
    }

    /// The sync loop calls this on every turn.
    pub fn tick(&self) {
        self.tick_at(Instant::now());
    }

    fn tick_at(&self, now: Instant) {
        self.state().last_turn = now;
    }

    /// Snapshot `gen` was published to the sync loop at `now` (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self, gen: u64, now: Instant) {
        let mut s = self.state();
        s.queued_gen = s.queued_gen.max(gen);
        s.pending_since.get_or_insert(now);
    }

    /// The sync loop applied snapshot `gen`, read at `read_at`, with `errors` failed map
    /// operations, finishing at `now` (kube-proxy's `Updated`, when `errors` is 0).
    pub fn applied(&self, gen: u64, read_at: Instant, errors: usize, now: Instant) {
        let mut s = self.state();
        // A snapshot published after the read waits from then on (at most one sync longer
        // than it really did).
        s.pending_since = (s.queued_gen > gen).then_some(read_at);
        if errors == 0 {
            s.failing_since = None;
            s.last_updated = Some(SystemTime::now());
        } else {
            s.failing_since.get_or_insert(now);
        }
    }

    /// Records this node's Node state; returns the previous one.
    pub fn set_node(&self, node: NodeState) -> NodeState {
        std::mem::replace(&mut self.state().node, node)
    }

    pub fn node(&self) -> NodeState {
        self.state().node
    }

    /// Why the agent is unhealthy at `now`, if it is.
    pub fn stale(&self, now: Instant) -> Option<Stale> {
        stale(&self.state(), self.stale_after, now)
    }

    /// kube-proxy's `IsHealthy`: not stale (node eligibility aside).
    pub fn healthy(&self) -> bool {
        self.stale(Instant::now()).is_none()
    }

    /// The answer of `probe` at (`now`, `wall`).
    pub fn answer(&self, probe: Probe, now: Instant, wall: SystemTime) -> Answer {
        let s = self.state().clone();
        answer(probe, &s, self.stale_after, now, wall)
    }
}

/// The decision: the first reason found, pending changes first.
fn stale(s: &State, stale_after: Duration, now: Instant) -> Option<Stale> {
    let age = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
    if let Some(d) = age(s.pending_since).filter(|d| *d >= stale_after) {
        return Some(Stale::Pending(d));
    }
    if let Some(d) = age(s.failing_since).filter(|d| *d >= stale_after) {
        return Some(Stale::Failing(d));
    }
    let d = now.saturating_duration_since(s.last_turn);
    (d >= stale_after).then_some(Stale::Stuck(d))
}

/// Which of kube-proxy's two endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: healthy and the node eligible.
    Healthz,
    /// `/livez`: healthy, whatever the Node says.
    Livez,
}

/// A response of `/healthz` or `/livez`.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub ok: bool,
    /// The JSON body, kube-proxy's fields in kube-proxy's order.
    pub body: String,
    /// Why not ok, for the log.
    pub stale: Option<Stale>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

fn answer(
    probe: Probe,
    s: &State,
    stale_after: Duration,
    now: Instant,
    wall: SystemTime,
) -> Answer {
    let why = stale(s, stale_after, now);
    let eligible = s.node.eligible();
    let ok = why.is_none() && (probe == Probe::Livez || eligible);
    // As kube-proxy: a healthy answer says `lastUpdated` = now (older releases reported the
    // last loop run, which was recent whenever the proxy was healthy); an unhealthy one says
    // when the last good sync was (Go's zero time if never).
    let last_updated = if ok { Some(wall) } else { s.last_updated };
    let body = Body {
        last_updated: last_updated.map_or_else(|| ZERO_TIME.to_string(), rfc3339),
        current_time: rfc3339(wall),
        node_eligible: (probe == Probe::Healthz).then_some(eligible),
    };
    Answer {
        ok,
        body: serde_json::to_string(&body).unwrap_or_default(),
        stale: why,
    }
}

/// Go's zero `time.Time` as its JSON encoding writes it.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `t` in RFC 3339 with as many fractional digits as needed (none when whole), UTC, as
/// Go's `time.Time` JSON encoding (RFC3339Nano) writes it.
pub fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ZERO_TIME.to_string())
}

/// A snapshot of the object source, numbered, as the sync loop receives it.
#[derive(Clone, Debug, Default)]
pub struct Queued {
    /// 1 for the first snapshot, then one more per snapshot.
    pub gen: u64,
    pub loaded: Loaded,
}

/// Passes the object source's snapshots on to the sync loop, each recorded as queued before
/// the loop can see it (so that a loop that stops applying shows as stale), and follows the
/// Node object `node_name` as it comes (kube-proxy's `SyncNode`, on every Node event).
/// Returns when either side closes.
pub async fn observe(
    mut from: tokio::sync::watch::Receiver<Loaded>,
    to: tokio::sync::watch::Sender<Queued>,
    health: Arc<Health>,
    node_name: String,
) {
    let mut gen = 0;
    loop {
        tokio::select! {
            () = to.closed() => return,
            changed = from.changed() => if changed.is_err() { return },
        }
        let loaded = from.borrow_and_update().clone();
        let node = NodeState::of(&loaded.0.nodes, &node_name, health.node());
        let before = health.set_node(node);
        if before != node && (before.eligible() != node.eligible() || node != NodeState::Eligible) {
            if node.eligible() {
                tracing::info!(node = %node_name, "Node {node_name} is {}: /healthz answers 200 again", node.describe());
            } else {
                tracing::warn!(node = %node_name, "Node {node_name} is {}: /healthz answers 503 (nodeEligible: false), /livez is unaffected", node.describe());
            }
        }
        gen += 1;
        health.queued(gen, Instant::now());
        if to.send(Queued { gen, loaded }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    const AFTER: Duration = Duration::from_secs(60);

    fn fresh(t0: Instant) -> State {
        State {
            last_updated: None,
            queued_gen: 0,
            pending_since: None,
            failing_since: None,
            last_turn: t0,
            node: NodeState::Unknown,
        }
    }

    /// `h.stale(now)` with the sync loop turning at `now` (other tests see to a stuck loop).
    fn turned(h: &Health, now: Instant) -> Option<Stale> {
        h.tick_at(now);
        h.stale(now)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn body(a: &Answer) -> serde_json::Value {
        serde_json::from_str(&a.body).unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_like_go_json() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch + secs(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(
            rfc3339(epoch + secs(1_700_000_000) + Duration::from_millis(120)),
            "2023-11-14T22:13:20.12Z"
        );
        assert_eq!(
            rfc3339(epoch + Duration::from_nanos(1_700_000_000_000_000_001)),
            "2023-11-14T22:13:20.000000001Z"
        );
    }

    #[test]
    fn healthy_answers_carry_now_in_both_fields_and_node_eligibility_in_healthz() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
        let s = fresh(t0);
        let h = answer(Probe::Healthz, &s, AFTER, t0 + secs(1), wall);
        assert!(h.ok);
        assert_eq!(
            h.body,
            r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","nodeEligible":true}"#
        );
        let l = answer(Probe::Livez, &s, AFTER, t0 + secs(1), wall);
        assert!(l.ok);
        assert_eq!(
            l.body,
            r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z"}"#
        );
    }

    #[test]
    fn an_ineligible_node_fails_healthz_only() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + secs(1_700_000_100);
        for node in [NodeState::Deleting, NodeState::ToBeDeleted, NodeState::Gone] {
            let mut s = fresh(t0);
            s.node = node;
            s.last_updated = Some(SystemTime::UNIX_EPOCH + secs(1_700_000_000));
            let h = answer(Probe::Healthz, &s, AFTER, t0, wall);
            assert!(!h.ok, "{node:?}");
            assert_eq!(h.stale, None);
            let b = body(&h);
            assert_eq!(b["nodeEligible"], false, "{node:?}");
            // Unhealthy: lastUpdated is the last good sync, not now.
            assert_eq!(b["lastUpdated"], "2023-11-14T22:13:20Z");
            assert_eq!(b["currentTime"], "2023-11-14T22:15:00Z");
            let l = answer(Probe::Livez, &s, AFTER, t0, wall);
            assert!(l.ok, "{node:?}: livez ignores the Node");
            assert!(body(&l).get("nodeEligible").is_none());
        }
    }

    #[test]
    fn a_queued_snapshot_not_applied_in_time_fails_both() {
        let h = Health::new(AFTER);
        let t0 = Instant::now();
        h.queued(1, t0);
        assert_eq!(turned(&h, t0 + secs(59)), None);
        assert_eq!(turned(&h, t0 + secs(60)), Some(Stale::Pending(secs(60))));
        let wall = SystemTime::UNIX_EPOCH;
        for probe in [Probe::Healthz, Probe::Livez] {
            let a = h.answer(probe, t0 + secs(61), wall);
            assert!(!a.ok, "{probe:?}");
            // Never synced: Go's zero time.
            assert_eq!(body(&a)["lastUpdated"], ZERO_TIME);
        }
        // Applied: healthy at once.
        h.applied(1, t0 + secs(61), 0, t0 + secs(61));
        assert_eq!(turned(&h, t0 + secs(61)), None);
    }

    #[test]
    fn a_snapshot_published_during_a_sync_stays_pending() {
        let h = Health::new(AFTER);
        let t0 = Instant::now();
        h.queued(1, t0);
        // The loop reads 1 at t0+1; 2 is published while it applies 1.
        h.queued(2, t0 + secs(2));
        h.applied(1, t0 + secs(1), 0, t0 + secs(3));
        assert_eq!(turned(&h, t0 + secs(60)), None);
        assert_eq!(turned(&h, t0 + secs(61)), Some(Stale::Pending(secs(60))));
        h.applied(2, t0 + secs(61), 0, t0 + secs(61));
        assert_eq!(turned(&h, t0 + secs(61)), None);
    }

    #[test]
    fn sync_errors_fail_after_persisting_and_clear_on_success() {
        let h = Health::new(AFTER);
        let t0 = Instant::now();
        h.queued(1, t0);
        h.applied(1, t0, 2, t0);
        h.applied(1, t0 + secs(2), 1, t0 + secs(30));
        assert_eq!(turned(&h, t0 + secs(59)), None);
        assert_eq!(turned(&h, t0 + secs(60)), Some(Stale::Failing(secs(60))));
        h.applied(1, t0 + secs(61), 0, t0 + secs(61));
        assert_eq!(turned(&h, t0 + secs(61)), None);
    }

    #[test]
    fn a_loop_that_stops_turning_is_stale() {
        let t0 = Instant::now();
        let s = fresh(t0);
        assert_eq!(stale(&s, AFTER, t0 + secs(59)), None);
        assert_eq!(
            stale(&s, AFTER, t0 + secs(90)),
            Some(Stale::Stuck(secs(90)))
        );
    }

    fn node(name: &str, deleting: bool, taints: &[&str]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                deletion_timestamp: deleting.then(|| {
                    Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())
                }),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|k| Taint {
                            key: k.to_string(),
                            effect: "NoSchedule".into(),
                            ..Taint::default()
                        })
                        .collect(),
                ),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn node_state_from_deletion_timestamp_and_taint() {
        use NodeState::*;
        let other = node("n2", true, &[TO_BE_DELETED_TAINT]);
        assert_eq!(
            NodeState::of(std::slice::from_ref(&other), "n1", Unknown),
            Unknown
        );
        assert_eq!(
            NodeState::of(&[other.clone(), node("n1", false, &["x"])], "n1", Unknown),
            Eligible
        );
        assert_eq!(
            NodeState::of(&[node("n1", true, &[])], "n1", Eligible),
            Deleting
        );
        assert_eq!(
            NodeState::of(
                &[node("n1", false, &["a", TO_BE_DELETED_TAINT])],
                "n1",
                Eligible
            ),
            ToBeDeleted
        );
        assert_eq!(NodeState::of(&[other], "n1", Eligible), Gone);
        assert_eq!(NodeState::of(&[], "n1", Deleting), Gone);
        assert!(Unknown.eligible() && Eligible.eligible());
        assert!(!Deleting.eligible() && !ToBeDeleted.eligible() && !Gone.eligible());
    }
}
