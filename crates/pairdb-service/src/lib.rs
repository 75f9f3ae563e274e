//! Process plumbing shared by `pairdb-meta`, `pairdb-storage` and `pairdb-router` — and only by them:
//! `pairdb-core` never depends on this crate, so the runtime stays out of the pure logic.
//!
//! - [`serve`]: one listener per service carries both gRPC (HTTP/2) and the HTTP/1.1 routes
//!   (`/health/live`, `/health/ready`, `/metrics`, JSON APIs), so each service has one port to expose.
//! - [`Readiness`]: the one readiness flag behind both the gRPC health service and `/health/ready`.
//! - [`shutdown_signal`]: resolves on SIGINT or SIGTERM.
//! - [`errors`]: the one reason → gRPC code → HTTP status table.
//! - [`metrics`]: the process-wide Prometheus recorder behind `/metrics`.
//! - [`telemetry`]: logs always (`--log-format`, `RUST_LOG`), OpenTelemetry traces over OTLP when
//!   configured, trace propagation.
//! - [`tls`]: the TLS flags, server and client configurations (mutual TLS between services).
//! - [`cluster_auth`]: cluster credentials, and the guard that checks them before a body is read.
//! - [`args`]: the flags every service takes (config file, listener limits, TLS, log format,
//!   `--check-config`).
//! - [`config_file`]: the optional TOML config file (`--config`, `PAIRDB_CONFIG`) under flags and
//!   environment, for every flag of a binary.
//! - [`addr`]: listen addresses (host names resolved at start) and `host:port` addresses to dial.
//! - [`clients`]: the one constructor of internal clients (storage API, meta's cluster API).
//! - [`listener`]: connection and stream caps, HTTP body deadlines.
//! - [`shutdown`]: the one signal a service's background tasks stop on ([`shutdown::Shutdown`]).

pub mod addr;
pub mod args;
pub mod clients;
pub mod cluster_auth;
pub mod cluster_view;
pub mod config_file;
pub mod errors;
pub mod listener;
pub mod metrics;
pub mod shutdown;
pub mod task;
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
    /// Something an operator should know about a ready service (e.g. quarantined records).
    detail: Arc<Mutex<Option<String>>>,
    reporter: HealthReporter,
}

impl Readiness {
    /// Starts not ready with `reason`.
    fn new(reporter: HealthReporter, reason: &str) -> Self {
        Self { state: Arc::new(Mutex::new(Some(reason.to_owned()))), detail: Arc::default(), reporter }
    }

    pub async fn set_ready(&self) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.reporter.set_service_status("", ServingStatus::Serving).await;
    }

    pub async fn set_not_ready(&self, reason: impl Into<String>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.into());
        self.reporter.set_service_status("", ServingStatus::NotServing).await;
    }

    /// Sets (or clears) the detail `/health/ready` reports next to "ready".
    pub fn set_detail(&self, detail: Option<String>) {
        *self.detail.lock().unwrap_or_else(PoisonError::into_inner) = detail;
    }

    /// The detail set with [`Readiness::set_detail`].
    pub fn detail(&self) -> Option<String> {
        self.detail.lock().unwrap_or_else(PoisonError::into_inner).clone()
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

/// `/health/live` (always 200 while the process serves) and `/health/ready` (200, with a detail when
/// there is one, or 503 with the reason).
pub fn health_routes(readiness: Readiness) -> axum::Router {
    axum::Router::new().route("/health/live", get(|| async { "ok\n" })).route(
        "/health/ready",
        get(move || {
            let readiness = readiness.clone();
            async move {
                match readiness.check() {
                    Ok(()) => match readiness.detail() {
                        None => (StatusCode::OK, "ready\n".to_owned()),
                        Some(detail) => (StatusCode::OK, format!("ready ({detail})\n")),
                    },
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
                }
            }
        }),
    )
}

/// What one listener serves, and how.
#[derive(Debug)]
pub struct Served {
    /// The service's name in metrics (`meta`, `storage`, `router`).
    pub service: &'static str,
    /// The gRPC services (`Routes::into_axum_router()`, with any layers of the service's own).
    pub grpc: axum::Router,
    /// The HTTP/1.1 routes (health, metrics, JSON APIs); their request bodies get a read deadline.
    pub http: axum::Router,
    /// The templates of the HTTP JSON routes (`/v1/kv/{key}`): what server spans are named after,
    /// since a span is named before routing and must never carry a key.
    pub http_routes: &'static [&'static str],
    /// Internal gRPC services that need a cluster credential, checked before bodies are read.
    pub guard: Option<cluster_auth::Guarded>,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub limits: listener::ListenerArgs,
}

/// Serves `served` on `listener` until `shutdown` resolves, then stops accepting and lets in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    served: Served,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let limits = &served.limits;
    let incoming = listener::CappedIncoming::new(
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        limits,
        served.service,
    );
    let body_timeout = std::time::Duration::from_millis(limits.http_body_timeout_ms);
    let http = served.http.layer(axum::middleware::from_fn_with_state(body_timeout, listener::body_deadline));
    let mut app = served.grpc.merge(http).fallback(unknown_route);
    if let Some(guarded) = served.guard {
        app = app.layer(axum::middleware::from_fn_with_state(guarded, cluster_auth::guard));
    }
    let http_routes = served.http_routes;
    // Several instances of a service in one process (`pairdb dev`): each request's handler records
    // into the registry its instance runs inside, whichever server task polls it.
    if let Some(registry) = metrics::Registry::entered() {
        app = app.layer(axum::middleware::from_fn(move |request, next: axum::middleware::Next| {
            registry.scope(next.run(request))
        }));
    }
    if telemetry::exporting() {
        app = app.layer(axum::middleware::from_fn_with_state(http_routes, telemetry::record_outcome));
    }
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = served.tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .trace_fn(move |request| telemetry::server_span(request, http_routes))
        .accept_http1(true)
        .tcp_nodelay(true)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .add_routes(tonic::service::Routes::from(app))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// What a path no route serves gets: gRPC's UNIMPLEMENTED only for a gRPC request (content type
/// `application/grpc…`), and otherwise a JSON 404 in the one error shape, so a mistyped HTTP probe
/// or URL fails visibly instead of passing as `200 application/grpc`.
async fn unknown_route(request: axum::extract::Request) -> axum::response::Response {
    let is_grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        return tonic::Status::unimplemented(format!("no method {}", request.uri().path())).into_http();
    }
    let message = format!("no such endpoint: {} {}", request.method(), request.uri().path());
    errors::http_response(errors::Reason::NotFound, &message, &[])
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
