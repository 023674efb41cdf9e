//! HTTP endpoints: `/healthz` and `/readyz` on the readiness port, `/metrics` on the monitoring
//! port (both on one listener when the ports are equal).
//!
//! * `/healthz` — 200 `ok` while the process serves requests.
//! * `/readyz` — 200 `ready` when every readiness gate is open; otherwise 503 with
//!   `not ready: <closed gates>`.
//! * `/metrics` — OpenMetrics text of the registry.
//! * `/debug/doctor` (monitoring port) — the `meshcni-agent doctor` report as JSON: 200 when
//!   everything matches, 503 on any mismatch.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::readiness::Readiness;

/// Produces the doctor report (blocking: it reads files and netns).
pub type DoctorFn = Arc<dyn Fn() -> crate::doctor::DoctorReport + Send + Sync>;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct HttpState {
    pub readiness: Readiness,
    pub registry: Arc<Registry>,
    /// `/debug/doctor`; `None`: 404.
    pub doctor: Option<DoctorFn>,
}

async fn doctor(State(s): State<HttpState>) -> Response {
    let Some(f) = s.doctor.clone() else {
        return (StatusCode::NOT_FOUND, "no doctor in this agent\n").into_response();
    };
    match tokio::task::spawn_blocking(move || f()).await {
        Ok(report) => {
            let status = if report.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            match serde_json::to_string_pretty(&report) {
                Ok(body) => {
                    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
                }
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding the doctor report: {e}\n"),
                )
                    .into_response(),
            }
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("doctor failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let closed = s.readiness.closed();
    if closed.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", closed.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    match crate::metrics::render(&s.registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed\n",
        )
            .into_response(),
    }
}

/// Router for the readiness port.
pub fn health_router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Router for the monitoring port.
pub fn metrics_router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/debug/doctor", get(doctor))
        .with_state(state)
}

/// Errors starting the HTTP listeners.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Bound listeners, ready to serve.
pub struct Listeners {
    pub health: TcpListener,
    /// `None` when metrics share the readiness listener.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Bind both listeners (one if the ports are equal and non-zero).
    pub async fn bind(
        ip: std::net::IpAddr,
        readiness_port: u16,
        monitoring_port: u16,
    ) -> Result<Self, HttpError> {
        let haddr = SocketAddr::new(ip, readiness_port);
        let health = TcpListener::bind(haddr)
            .await
            .map_err(|source| HttpError::Bind {
                what: "readiness",
                addr: haddr,
                source,
            })?;
        let metrics = if readiness_port == monitoring_port && readiness_port != 0 {
            None
        } else {
            let maddr = SocketAddr::new(ip, monitoring_port);
            Some(
                TcpListener::bind(maddr)
                    .await
                    .map_err(|source| HttpError::Bind {
                        what: "monitoring",
                        addr: maddr,
                        source,
                    })?,
            )
        };
        Ok(Listeners { health, metrics })
    }

    /// Spawn the servers on the current runtime.
    pub fn serve(self, state: HttpState) {
        match self.metrics {
            Some(m) => {
                spawn_server("readiness", self.health, health_router(state.clone()));
                spawn_server("monitoring", m, metrics_router(state));
            }
            None => {
                let both = health_router(state.clone()).merge(metrics_router(state));
                spawn_server("readiness+monitoring", self.health, both);
            }
        }
    }
}

fn spawn_server(what: &'static str, listener: TcpListener, router: Router) {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(server = what, error = %e, "HTTP server stopped");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installer::{InstallCounters, NodeInstaller};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct NotReady;
    impl NodeInstaller for NotReady {
        fn is_ready(&self) -> bool {
            false
        }
        fn counters(&self) -> InstallCounters {
            InstallCounters::default()
        }
        fn stop(&self) {}
        fn last_error(&self) -> Option<String> {
            Some("no token".into())
        }
        fn uninstall(&self) -> Result<(), String> {
            Ok(())
        }
        fn verify_and_repair(&self) -> Vec<meshcni_install::RepairStep> {
            Vec::new()
        }
    }

    async fn get(port: u16, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn one_port_serves_health_and_metrics() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let l = Listeners::bind("127.0.0.1".parse().expect("ip"), port, port)
            .await
            .expect("bind");
        assert!(l.metrics.is_none(), "equal ports share one listener");
        let readiness = Readiness::new();
        let gate = readiness.gate("install");
        let (registry, _) = crate::metrics::build_registry(std::sync::Arc::new(NotReady));
        l.serve(HttpState {
            readiness: readiness.clone(),
            registry: Arc::new(registry),
            doctor: None,
        });
        let r = get(port, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("not ready: install"), "{r}");
        gate.set(true);
        assert!(get(port, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(port, "/healthz").await.starts_with("HTTP/1.1 200"));
        let m = get(port, "/metrics").await;
        assert!(m.contains("application/openmetrics-text"), "{m}");
        assert!(m.contains("meshcni_install_ready 0"), "{m}");
        assert!(get(port, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
