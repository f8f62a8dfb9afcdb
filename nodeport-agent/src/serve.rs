//! The agent's HTTP endpoints: `/healthz` and `/readyz` on `--health-addr` (kube-proxy's
//! port 10256), `/metrics` on `--metrics-addr` (kube-proxy's 10249).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};

use crate::{datapath::MapReader, kube_source::KubeStats, metrics::Metrics};

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

async fn serve(addr: SocketAddr, app: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
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
