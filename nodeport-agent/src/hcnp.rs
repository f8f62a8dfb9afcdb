//! kube-proxy's per-Service health check servers: for each `spec.healthCheckNodePort` of an
//! `externalTrafficPolicy: Local` Service, an HTTP listener on that port of every node
//! address that takes nodePorts (`--nodeport-addresses`; the unspecified address without
//! it), answering `200` while the Service has a ready endpoint on this node.
//!
//! A port that cannot be bound (taken by another process, such as kube-proxy serving the
//! same Service) is reported once, naming the Service, retried with exponential backoff and
//! counted in the metrics until it binds (reported once more then).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, Router};

use crate::{
    family::usable_node_addr,
    health::Health,
    metrics::Metrics,
    model::{HealthCheck, IpCidr},
    serve::listen,
};

/// The first retry of a listener that could not bind comes this long after the failure.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Retries double their delay up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the registry looks for retries that are due.
const RETRY_TICK: Duration = Duration::from_millis(250);

/// Where the health check servers listen: the unspecified address (both families) when
/// `cidrs` is empty, else the usable addresses of `interface_addrs` inside them (possibly
/// none), as kube-proxy does with `--nodeport-addresses`.
pub fn listen_addrs(cidrs: &[IpCidr], interface_addrs: &[IpAddr]) -> Vec<IpAddr> {
    if cidrs.is_empty() {
        return vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
    }
    let mut out: Vec<IpAddr> = interface_addrs
        .iter()
        .copied()
        .filter(|a| usable_node_addr(*a) && cidrs.iter().any(|c| c.contains(*a)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Exponential backoff of one listener that failed to bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Failed attempts so far.
    pub failures: u32,
    /// When the next attempt is due.
    pub retry_at: Instant,
}

impl Backoff {
    /// After the first failure, at `now`.
    pub fn first(now: Instant) -> Backoff {
        Backoff {
            failures: 1,
            retry_at: now + RETRY_FIRST,
        }
    }

    /// After one more failure, at `now`: the delay doubles, up to [`RETRY_MAX`].
    pub fn failed_again(&mut self, now: Instant) {
        self.failures += 1;
        self.retry_at = now + self.delay();
    }

    /// The delay after the latest failure.
    pub fn delay(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        (RETRY_FIRST * 2u32.pow(doublings)).min(RETRY_MAX)
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.retry_at
    }
}

/// A change of a listener worth telling the operator, once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A listener could not bind; retried with backoff.
    Failed {
        service: String,
        addr: SocketAddr,
        error: String,
    },
    /// A listener that had failed is bound now.
    Recovered {
        service: String,
        addr: SocketAddr,
        failures: u32,
    },
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::Failed {
                service,
                addr,
                error,
            } => write!(
                f,
                "health check server of Service {service}: cannot listen on {addr}: {error}; \
                 retrying with backoff (is kube-proxy serving the same healthCheckNodePort? \
                 see docs/operations.md)"
            ),
            Report::Recovered {
                service,
                addr,
                failures,
            } => write!(
                f,
                "health check server of Service {service}: listening on {addr} after \
                 {failures} failed attempts"
            ),
        }
    }
}

/// What one health check server reports; the sync loop updates it in place.
struct CheckState {
    health: Arc<Health>,
    check: Mutex<HealthCheck>,
}

impl CheckState {
    fn service(&self) -> String {
        let c = self.check.lock().unwrap_or_else(|e| e.into_inner());
        format!("{}/{}", c.namespace, c.name)
    }
}

/// kube-proxy's body, field order included.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CheckBody<'a> {
    service: CheckService<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(serde::Serialize)]
struct CheckService<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The response of a health check server (any path): `200` when the service has a ready
/// endpoint on this node and the agent is healthy (kube-proxy's `serviceProxyHealthy`: not
/// stale) with its datapath attached and synced, `503` otherwise.
fn check_response(state: &CheckState) -> (StatusCode, Vec<u8>) {
    let check = state.check.lock().unwrap_or_else(|e| e.into_inner());
    let healthy = state.health.ready() && state.health.healthy();
    let body = CheckBody {
        service: CheckService {
            namespace: &check.namespace,
            name: &check.name,
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: healthy,
    };
    let code = if healthy && check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, serde_json::to_vec(&body).unwrap_or_default())
}

async fn check(State(s): State<Arc<CheckState>>) -> impl IntoResponse {
    let (code, body) = check_response(&s);
    (
        code,
        [
            ("content-type", "application/json"),
            ("x-content-type-options", "nosniff"),
        ],
        body,
    )
}

/// One listener of a server.
enum Listener {
    Up(Serving),
    /// Could not bind; retried when due.
    Down(Backoff),
}

/// The task serving a bound listener; dropping it aborts the task, which closes the socket.
struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The server of one port: what it reports and its listeners, by address.
struct Server {
    state: Arc<CheckState>,
    listeners: BTreeMap<IpAddr, Listener>,
}

/// What the registry serves and what runs.
struct Registry {
    health: Arc<Health>,
    wanted: BTreeMap<u16, HealthCheck>,
    addrs: Vec<IpAddr>,
    servers: BTreeMap<u16, Server>,
}

/// Binds `addr` and serves `state` there; Err: the bind error.
fn start(addr: SocketAddr, state: Arc<CheckState>) -> std::io::Result<Listener> {
    let listener = listen(addr)?;
    let app = Router::new().fallback(check).with_state(state.clone());
    Ok(Listener::Up(Serving(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(
                service = state.service(),
                %addr,
                "health check server stopped: {e}"
            );
        }
    }))))
}

impl Registry {
    /// Makes the running servers match `wanted` on `addrs`: starts what is missing or
    /// whose retry is due, stops what is no longer wanted. Returns what changed for the
    /// operator (each failure once, and its recovery). Must be called within a tokio runtime.
    fn reconcile(&mut self, now: Instant) -> Vec<Report> {
        let mut reports = Vec::new();
        let wanted = &self.wanted;
        self.servers.retain(|port, _| wanted.contains_key(port));
        for (&port, hc) in &self.wanted {
            let server = self.servers.entry(port).or_insert_with(|| Server {
                state: Arc::new(CheckState {
                    health: self.health.clone(),
                    check: Mutex::new(hc.clone()),
                }),
                listeners: BTreeMap::new(),
            });
            {
                let mut cur = server.state.check.lock().unwrap_or_else(|e| e.into_inner());
                if *cur != *hc {
                    *cur = hc.clone();
                }
            }
            let addrs = &self.addrs;
            server.listeners.retain(|ip, _| addrs.contains(ip));
            for &ip in addrs {
                let addr = SocketAddr::new(ip, port);
                let service = format!("{}/{}", hc.namespace, hc.name);
                let before = server.listeners.remove(&ip);
                let next = match before {
                    Some(Listener::Up(task)) if !task.0.is_finished() => Listener::Up(task),
                    Some(Listener::Down(b)) if !b.due(now) => Listener::Down(b),
                    Some(Listener::Down(mut b)) => match start(addr, server.state.clone()) {
                        Ok(l) => {
                            tracing::info!(service, %addr, "health check server listening on {addr}");
                            reports.push(Report::Recovered {
                                service,
                                addr,
                                failures: b.failures,
                            });
                            l
                        }
                        Err(e) => {
                            b.failed_again(now);
                            tracing::debug!(
                                service,
                                %addr,
                                failures = b.failures,
                                "health check server: still cannot listen: {e}; next try in {:?}",
                                b.delay()
                            );
                            Listener::Down(b)
                        }
                    },
                    // New, or its server stopped (it logged why).
                    _ => match start(addr, server.state.clone()) {
                        Ok(l) => {
                            tracing::info!(service, %addr, "health check server listening on {addr}");
                            l
                        }
                        Err(e) => {
                            reports.push(Report::Failed {
                                service,
                                addr,
                                error: e.to_string(),
                            });
                            Listener::Down(Backoff::first(now))
                        }
                    },
                };
                server.listeners.insert(ip, next);
            }
        }
        reports
    }

    /// (listening, failed) listeners.
    fn counts(&self) -> (usize, usize) {
        let all = self.servers.values().flat_map(|s| s.listeners.values());
        all.fold((0, 0), |(up, down), l| match l {
            Listener::Up(_) => (up + 1, down),
            Listener::Down(_) => (up, down + 1),
        })
    }
}

/// The health check servers of `externalTrafficPolicy: Local` services. Cloning shares them.
#[derive(Clone)]
pub struct HealthChecks {
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
}

impl HealthChecks {
    /// Starts the retry task too. Must be called within a tokio runtime.
    pub fn new(health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        let this = Self::without_retry_task(health, metrics);
        let weak: Weak<Mutex<Registry>> = Arc::downgrade(&this.registry);
        let metrics = this.metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETRY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                Self::reconcile(&registry, &metrics, Instant::now());
            }
        });
        this
    }

    /// Retries happen only in [`HealthChecks::update`] calls (tests drive the clock).
    fn without_retry_task(health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry {
                health,
                wanted: BTreeMap::new(),
                addrs: vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
                servers: BTreeMap::new(),
            })),
            metrics,
        }
    }

    fn reconcile(registry: &Mutex<Registry>, metrics: &Metrics, now: Instant) -> Vec<Report> {
        let mut r = registry.lock().unwrap_or_else(|e| e.into_inner());
        let reports = r.reconcile(now);
        for report in &reports {
            match report {
                Report::Failed { .. } => tracing::warn!("{report}"),
                Report::Recovered { .. } => tracing::info!("{report}"),
            }
        }
        let (up, failed) = r.counts();
        metrics.set_healthcheck_listeners(up, failed);
        reports
    }

    /// Serves exactly `checks` on `addrs` (see [`listen_addrs`]): starts servers for new
    /// ports and addresses, updates the others, stops those no longer wanted; listeners
    /// that failed are retried by the retry task when due. Returns the reports of this pass
    /// (also logged). Must be called within a tokio runtime.
    pub fn update(&self, checks: &BTreeMap<u16, HealthCheck>, addrs: &[IpAddr]) -> Vec<Report> {
        self.update_at(checks, addrs, Instant::now())
    }

    fn update_at(
        &self,
        checks: &BTreeMap<u16, HealthCheck>,
        addrs: &[IpAddr],
        now: Instant,
    ) -> Vec<Report> {
        {
            let mut r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            if r.addrs != addrs {
                tracing::info!(?addrs, "health check servers listen on these addresses");
                if addrs.is_empty() && !checks.is_empty() {
                    tracing::warn!(
                        "no node address lies inside --nodeport-addresses: the health check \
                         servers listen nowhere"
                    );
                }
            }
            r.wanted = checks.clone();
            r.addrs = addrs.to_vec();
        }
        Self::reconcile(&self.registry, &self.metrics, now)
    }

    /// (listening, failed) listeners now.
    pub fn counts(&self) -> (usize, usize) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counts()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn state(local_endpoints: usize, ready: bool) -> CheckState {
        let health = Arc::new(Health::default());
        if ready {
            health.set_attached();
            health.set_synced();
        }
        CheckState {
            health,
            check: Mutex::new(HealthCheck {
                namespace: "ns".into(),
                name: "web".into(),
                local_endpoints,
            }),
        }
    }

    #[test]
    fn check_responses() {
        let (code, body) = check_response(&state(2, true));
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"service":{"namespace":"ns","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        let (code, body) = check_response(&state(0, true));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(String::from_utf8(body)
            .unwrap()
            .contains(r#""localEndpoints":0,"serviceProxyHealthy":true"#));
        let (code, body) = check_response(&state(3, false));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(String::from_utf8(body)
            .unwrap()
            .ends_with(r#""localEndpoints":3,"serviceProxyHealthy":false}"#));
    }

    #[test]
    fn a_stale_agent_fails_the_check() {
        let s = state(2, true);
        let now = Instant::now();
        s.health.queued(1, now - Duration::from_secs(120));
        let (code, body) = check_response(&s);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(String::from_utf8(body)
            .unwrap()
            .ends_with(r#""localEndpoints":2,"serviceProxyHealthy":false}"#));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = Backoff::first(t0);
        let mut delays = vec![b.delay()];
        assert!(!b.due(t0 + Duration::from_millis(999)) && b.due(t0 + RETRY_FIRST));
        for _ in 0..7 {
            b.failed_again(t0);
            delays.push(b.delay());
        }
        let secs: Vec<u64> = delays.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(b.retry_at, t0 + RETRY_MAX);
    }

    #[test]
    fn listen_addrs_follow_nodeport_addresses() {
        let ifaddrs: Vec<IpAddr> = ["10.0.0.5", "192.168.1.5", "2001:db8::5", "fe80::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            listen_addrs(&[], &ifaddrs),
            [IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
        );
        let cidrs: Vec<IpCidr> = ["10.0.0.0/8", "2001:db8::/32", "fe80::/10"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let want: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "2001:db8::5".parse().unwrap()];
        assert_eq!(listen_addrs(&cidrs, &ifaddrs), want);
        let none: Vec<IpCidr> = vec!["172.16.0.0/12".parse().unwrap()];
        assert!(listen_addrs(&none, &ifaddrs).is_empty());
    }

    /// `GET /` on `addr`: the status code, or `None` when nothing listens.
    async fn get(addr: SocketAddr) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.ok()?;
        raw.split_whitespace().nth(1)?.parse().ok()
    }

    async fn free_port() -> u16 {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        l.local_addr().unwrap().port()
    }

    /// Polls `get(addr)` until it gives `want` (bounded).
    async fn wait_for(addr: SocketAddr, want: Option<u16>) {
        for _ in 0..100 {
            if get(addr).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{addr}: never {want:?}");
    }

    fn check(n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "ns".into(),
            name: "web".into(),
            local_endpoints: n,
        }
    }

    fn ready_health() -> Arc<Health> {
        let health = Arc::new(Health::default());
        health.set_attached();
        health.set_synced();
        health
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[tokio::test]
    async fn registry_starts_updates_and_stops_servers() {
        let reg = HealthChecks::new(ready_health(), Arc::new(Metrics::new()));
        let any = listen_addrs(&[], &[]);
        let port = free_port().await;
        reg.update(&BTreeMap::from([(port, check(1))]), &any);
        wait_for(local(port), Some(200)).await;
        reg.update(&BTreeMap::from([(port, check(0))]), &any);
        wait_for(local(port), Some(503)).await;
        reg.update(&BTreeMap::new(), &any);
        wait_for(local(port), None).await;
        assert_eq!(reg.counts(), (0, 0));
    }

    #[tokio::test]
    async fn only_the_listed_addresses_listen() {
        let reg = HealthChecks::new(ready_health(), Arc::new(Metrics::new()));
        let port = free_port().await;
        let addrs = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        reg.update(&BTreeMap::from([(port, check(1))]), &addrs);
        wait_for(local(port), Some(200)).await;
        if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
            assert_eq!(
                get(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await,
                None,
                "[::1] is not listed"
            );
        }
        // The addresses change: the listener moves.
        reg.update(&BTreeMap::from([(port, check(1))]), &[]);
        wait_for(local(port), None).await;
        assert_eq!(reg.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_once_retried_and_picked_up_when_freed() {
        let metrics = Arc::new(Metrics::new());
        // The test's clock alone decides when retries are due.
        let reg = HealthChecks::without_retry_task(ready_health(), metrics.clone());
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let free = free_port().await;
        let addrs = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let checks = BTreeMap::from([(port, check(1)), (free, check(2))]);
        let t0 = Instant::now();
        let reports = reg.update_at(&checks, &addrs, t0);
        assert_eq!(reports.len(), 1, "{reports:?}");
        let Report::Failed { service, addr, .. } = &reports[0] else {
            panic!("{reports:?}");
        };
        assert_eq!((service.as_str(), *addr), ("ns/web", local(port)));
        let text = reports[0].to_string();
        assert!(
            text.contains("Service ns/web") && text.contains(&local(port).to_string()),
            "{text}"
        );
        // The other port is served regardless.
        wait_for(local(free), Some(200)).await;
        assert_eq!(reg.counts(), (1, 1));
        let gauge = |m: &Metrics| {
            m.render(None, &Default::default())
                .lines()
                .find_map(|l| {
                    l.strip_prefix("nodeport_healthcheck_listeners_failed ")
                        .map(str::to_string)
                })
                .unwrap_or_default()
        };
        assert_eq!(gauge(&metrics), "1");

        // Syncs and due retries while the port stays taken: nothing more to report.
        for s in [0, 1, 2, 3, 5, 7] {
            let r = reg.update_at(&checks, &addrs, t0 + Duration::from_secs(s));
            assert!(r.is_empty(), "at +{s}s: {r:?}");
        }
        // (The taker accepts no connection: nothing of ours answers there.)
        drop(taken);
        // The retry after +7 s (the 3rd) is due at +7 + 8 s.
        assert!(reg
            .update_at(&checks, &addrs, t0 + Duration::from_secs(14))
            .is_empty());
        let r = reg.update_at(&checks, &addrs, t0 + Duration::from_secs(15));
        assert_eq!(
            r,
            [Report::Recovered {
                service: "ns/web".into(),
                addr: local(port),
                failures: 4,
            }]
        );
        wait_for(local(port), Some(200)).await;
        assert_eq!(reg.counts(), (2, 0));
        assert_eq!(gauge(&metrics), "0");
    }
}
