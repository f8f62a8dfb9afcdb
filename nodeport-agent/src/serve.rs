//! The agent's HTTP endpoints: `/healthz`, `/livez` and `/readyz` on `--health-addr`
//! (kube-proxy's port 10256; the decisions are in [`crate::health`]), `/metrics` on
//! `--metrics-addr` (kube-proxy's 10249), and the listener both use, which the per-service
//! health check servers ([`crate::hcnp`]) share.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::{datapath::MapReader, kube_source::KubeStats, metrics::Metrics};
pub use crate::{
    hcnp::HealthChecks,
    health::{Health, Probe},
};

/// State behind the endpoints.
pub struct Shared {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub kube: KubeStats,
    /// Pin directory of the maps, opened lazily for scrapes.
    pub pin_path: PathBuf,
}

/// `/healthz` or `/livez`: kube-proxy's status codes, headers and body fields.
fn probe(s: &Shared, probe: Probe) -> impl IntoResponse {
    let a = s.health.answer(probe, Instant::now(), SystemTime::now());
    s.metrics.count_probe(probe, a.ok);
    let code = if a.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            ("content-type", "application/json"),
            ("x-content-type-options", "nosniff"),
        ],
        a.body,
    )
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    probe(&s, Probe::Healthz)
}

async fn livez(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    probe(&s, Probe::Livez)
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
        .route("/livez", get(livez))
        .route("/readyz", get(readyz));
    let metrics_routes = Router::new().route("/metrics", get(metrics));
    if health_addr == metrics_addr {
        serve(health_addr, health.merge(metrics_routes).with_state(shared)).await
    } else {
        serve(health_addr, health.with_state(shared.clone())).await?;
        serve(metrics_addr, metrics_routes.with_state(shared)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
