//! The agent's HTTP endpoints: `/healthz` and `/readyz` on `--health-addr` (kube-proxy's
//! port 10256), `/metrics` on `--metrics-addr` (kube-proxy's 10249), and kube-proxy's
//! per-service health check servers on each `spec.healthCheckNodePort` ([`HealthChecks`]).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};

use crate::{datapath::MapReader, kube_source::KubeStats, metrics::Metrics, model::HealthCheck};

/// The sync loop is considered stuck when it has not run for this long.
const STALE_AFTER: Duration = Duration::from_secs(30);

/// Liveness and readiness, shared by the sync loop (writer) and the endpoints (readers).
#[derive(Debug, Default)]
pub struct Health {
    attached: AtomicBool,
    synced: AtomicBool,
    /// Unix time (ms) of the sync loop's last turn.
    last_turn_ms: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
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
    /// The sync loop calls this on every turn.
    pub fn tick(&self) {
        self.last_turn_ms.store(now_ms(), Ordering::Relaxed);
    }
    /// Programs attached and the first complete desired state applied.
    pub fn ready(&self) -> bool {
        self.attached.load(Ordering::Relaxed) && self.synced.load(Ordering::Relaxed)
    }
    fn live(&self) -> (bool, u64) {
        let last = self.last_turn_ms.load(Ordering::Relaxed);
        (
            now_ms().saturating_sub(last) <= STALE_AFTER.as_millis() as u64,
            last,
        )
    }
}

/// State behind the endpoints.
pub struct Shared {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub kube: KubeStats,
    /// Pin directory of the maps, opened lazily for scrapes.
    pub pin_path: PathBuf,
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let (live, last) = s.health.live();
    let body = serde_json::json!({ "lastUpdated": last, "currentTime": now_ms(), "live": live });
    let code = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.health.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: datapath not attached or first sync not done\n",
        )
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let shared = s.clone();
    let body = tokio::task::spawn_blocking(move || {
        let reader = MapReader::open(&shared.pin_path).ok();
        shared.metrics.render(reader.as_ref(), &shared.kube)
    })
    .await
    .unwrap_or_default();
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// A listener on `addr`. On an unspecified address (`0.0.0.0` or `[::]`) it takes both
/// families, as Go's listeners (kube-proxy's) do for `0.0.0.0`: a `[::]` socket with
/// IPV6_V6ONLY off (whatever `net.ipv6.bindv6only` says); on a node without IPv6 it falls
/// back to `0.0.0.0`. A specific address takes its own family. Must be called within a
/// tokio runtime.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port()))
    } else {
        addr
    };
    let bind = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(a) => {
                let sock = tokio::net::TcpSocket::new_v6()?;
                if a.ip().is_unspecified() {
                    nix::sys::socket::setsockopt(
                        &sock,
                        nix::sys::socket::sockopt::Ipv6V6Only,
                        &false,
                    )
                    .map_err(std::io::Error::from)?;
                }
                sock
            }
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        sock.listen(1024)
    };
    match bind(addr) {
        Err(e)
            if e.raw_os_error() == Some(libc::EAFNOSUPPORT)
                && addr.ip() == Ipv6Addr::UNSPECIFIED =>
        {
            bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))
        }
        other => other,
    }
}

async fn serve(addr: SocketAddr, app: Router) -> anyhow::Result<()> {
    let listener = listen(addr).map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(%addr, "HTTP server stopped: {e}");
        }
    });
    Ok(())
}

/// Start the health and metrics listeners (the same address may serve both).
pub async fn start(
    health_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let health = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let metrics_routes = Router::new().route("/metrics", get(metrics));
    if health_addr == metrics_addr {
        serve(health_addr, health.merge(metrics_routes).with_state(shared)).await
    } else {
        serve(health_addr, health.with_state(shared.clone())).await?;
        serve(metrics_addr, metrics_routes.with_state(shared)).await
    }
}

/// What one health check server reports; the sync loop updates it in place.
struct CheckState {
    health: Arc<Health>,
    check: Mutex<HealthCheck>,
}

/// A running health check server.
struct Running {
    state: Arc<CheckState>,
    task: tokio::task::JoinHandle<()>,
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
/// endpoint on this node and the datapath is attached and synced, `503` otherwise.
fn check_response(state: &CheckState) -> (StatusCode, Vec<u8>) {
    let check = state.check.lock().unwrap_or_else(|e| e.into_inner());
    let healthy = state.health.ready();
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

/// The health check servers of `externalTrafficPolicy: Local` services, one listener on
/// `[::]:<healthCheckNodePort>` each (dual-stack: IPv4 and IPv6 load balancers), like
/// kube-proxy's `0.0.0.0` and `::` ones.
#[derive(Clone)]
pub struct HealthChecks {
    health: Arc<Health>,
    running: Arc<Mutex<BTreeMap<u16, Running>>>,
}

impl HealthChecks {
    pub fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            running: Arc::default(),
        }
    }

    /// Serves exactly `checks`: starts servers for new ports (and again for ports whose
    /// server stopped, e.g. could not bind), updates the others, stops those no longer
    /// wanted. Must be called within a tokio runtime.
    pub fn update(&self, checks: &BTreeMap<u16, HealthCheck>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // (Dropping a server aborts its task, which closes its listener.)
        running.retain(|port, r| checks.contains_key(port) && !r.task.is_finished());
        for (&port, hc) in checks {
            if let Some(r) = running.get(&port) {
                let mut cur = r.state.check.lock().unwrap_or_else(|e| e.into_inner());
                if *cur != *hc {
                    *cur = hc.clone();
                }
                continue;
            }
            let state = Arc::new(CheckState {
                health: self.health.clone(),
                check: Mutex::new(hc.clone()),
            });
            let app = Router::new().fallback(check).with_state(state.clone());
            let service = format!("{}/{}", hc.namespace, hc.name);
            let task = tokio::spawn(async move {
                let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                let listener = match listen(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(
                            service,
                            port,
                            "health check server of Service {service}: listening on {addr}: {e}"
                        );
                        return;
                    }
                };
                tracing::info!(service, port, "health check server listening on {addr}");
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(service, port, "health check server stopped: {e}");
                }
            });
            running.insert(port, Running { state, task });
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
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

    /// `GET /` on 127.0.0.1:`port`: the status code, or `None` when nothing listens.
    async fn get(port: u16) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .ok()?;
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

    /// Polls `get(port)` until it gives `want` (bounded).
    async fn wait_for(port: u16, want: Option<u16>) {
        for _ in 0..100 {
            if get(port).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("port {port}: never {want:?}");
    }

    #[tokio::test]
    async fn unspecified_listener_takes_both_families() {
        // `0.0.0.0`, the default of --health-addr and --metrics-addr.
        let l = listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).unwrap();
        let port = l.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            for _ in 0..2 {
                let _ = l.accept().await;
            }
        });
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("an IPv4 client reaches the unspecified listener");
        match tokio::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port)).await {
            Ok(_) => {}
            // Only when this machine has no IPv6 at all (then the listener is 0.0.0.0).
            Err(e) if no_ipv6() => {
                eprintln!("SKIPPED the IPv6 half: no IPv6 loopback here ({e})");
            }
            Err(e) => panic!("an IPv6 client cannot reach the unspecified listener: {e}"),
        }
        accept.abort();
    }

    /// Whether IPv6 is missing here (binding `[::1]` fails).
    fn no_ipv6() -> bool {
        std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_err()
    }

    #[tokio::test]
    async fn registry_starts_updates_and_stops_servers() {
        let health = Arc::new(Health::default());
        health.set_attached();
        health.set_synced();
        let reg = HealthChecks::new(health);
        // A port taken by someone else fails alone.
        let taken = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .unwrap();
        let busy = taken.local_addr().unwrap().port();
        let port = free_port().await;
        let check = |n| HealthCheck {
            namespace: "ns".into(),
            name: "web".into(),
            local_endpoints: n,
        };
        reg.update(&BTreeMap::from([(port, check(1)), (busy, check(1))]));
        wait_for(port, Some(200)).await;
        reg.update(&BTreeMap::from([(port, check(0))]));
        wait_for(port, Some(503)).await;
        reg.update(&BTreeMap::new());
        wait_for(port, None).await;
        drop(taken);
    }
}
