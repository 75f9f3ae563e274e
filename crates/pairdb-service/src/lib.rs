//! Process plumbing shared by `pairdb-meta`, `pairdb-storage` and `pairdb-router` — and only by them:
//! `pairdb-core` never depends on this crate, so the runtime stays out of the pure logic.
//!
//! - [`serve`]: one listener per service carries both gRPC (HTTP/2) and the HTTP/1.1 routes
//!   (`/health/live`, `/health/ready`, `/metrics`, JSON APIs), so each service has one port to expose.
//! - [`Readiness`]: the one readiness flag behind both the gRPC health service and `/health/ready`.
//! - [`logging`]: log setup from `--log-format` and `RUST_LOG`.
//! - [`shutdown_signal`]: resolves on SIGINT or SIGTERM.
//! - [`errors`]: the one reason → gRPC code → HTTP status table.
//! - [`metrics`]: the process-wide Prometheus recorder behind `/metrics`.
//! - [`telemetry`]: logs always, OpenTelemetry traces over OTLP when configured, trace propagation.
//! - [`tls`]: the TLS flags, server and client configurations (mutual TLS between services).

pub mod cluster_view;
pub mod errors;
pub mod logging;
pub mod metrics;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Errors of the serving loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("listener address unavailable: {0}")]
    Listener(#[from] std::io::Error),
}

/// Whether the service can take traffic, and why not. Shared by gRPC health and `/health/ready`.
#[derive(Debug, Clone)]
pub struct Readiness {
    state: Arc<Mutex<Option<String>>>,
    reporter: HealthReporter,
}

impl Readiness {
    /// Starts not ready with `reason`.
    fn new(reporter: HealthReporter, reason: &str) -> Self {
        Self { state: Arc::new(Mutex::new(Some(reason.to_owned()))), reporter }
    }

    pub async fn set_ready(&self) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.reporter.set_service_status("", ServingStatus::Serving).await;
    }

    pub async fn set_not_ready(&self, reason: impl Into<String>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.into());
        self.reporter.set_service_status("", ServingStatus::NotServing).await;
    }

    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), String> {
        match &*self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }
}

/// The gRPC health service and the readiness handle that drives it, starting not ready with
/// `initial_reason` (tonic-health would otherwise report SERVING from the start).
pub async fn health(
    initial_reason: &str,
) -> (Readiness, tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>)
{
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    (Readiness::new(reporter, initial_reason), service)
}

/// `/health/live` (always 200 while the process serves) and `/health/ready` (200 or 503 with reason).
pub fn health_routes(readiness: Readiness) -> axum::Router {
    axum::Router::new().route("/health/live", get(|| async { "ok\n" })).route(
        "/health/ready",
        get(move || {
            let readiness = readiness.clone();
            async move {
                match readiness.check() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
                }
            }
        }),
    )
}

/// Serves gRPC `routes` plus the HTTP/1.1 `http` router on `listener` until `shutdown` resolves, then
/// stops accepting and lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    routes: tonic::service::Routes,
    http: axum::Router,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let incoming = tokio_listener_stream(listener);
    let routes = routes.into_axum_router().merge(http).fallback(unknown_route);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .trace_fn(telemetry::server_span)
        .accept_http1(true)
        .tcp_nodelay(true)
        .add_routes(tonic::service::Routes::from(routes))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// What a path no route serves gets: gRPC's UNIMPLEMENTED only for a gRPC request (content type
/// `application/grpc…`), and otherwise a JSON 404 in the one error shape, so a mistyped HTTP probe
/// or URL fails visibly instead of passing as `200 application/grpc`.
async fn unknown_route(request: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    let is_grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        return tonic::Status::unimplemented(format!("no method {}", request.uri().path())).into_http();
    }
    let body = serde_json::json!({"error": {
        "code": "NOT_FOUND",
        "reason": "NOT_FOUND",
        "message": format!("no such endpoint: {} {}", request.method(), request.uri().path()),
        "details": {},
    }});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

fn tokio_listener_stream(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Binds `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

/// Resolves when the process receives SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed we simply never resolve this branch.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
