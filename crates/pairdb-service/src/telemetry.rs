//! Logs and traces. Plain logs (text or JSON, filtered by `RUST_LOG`) always; OpenTelemetry traces
//! exported over OTLP/gRPC in batches when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard `OTEL_*`
//! variables apply: `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_BSP_*`).
//!
//! W3C trace context travels in gRPC metadata: clients inject the current span's context
//! ([`TraceInterceptor`]), servers continue it ([`server_span`]). Internal calls that carry no trace
//! context (heartbeats, probes, hint sweeps) get no server span, so traces are client requests, not
//! background chatter. Spans carry tenant, partition, node id, consistency and outcome — never key
//! contents or values.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `--log-format`: human-readable text or JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether this process exports traces: without an exporter, server spans would be built and
/// recorded for nobody on every request.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once [`init`] installed an OTLP exporter in this process.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// `make()`'s span when this process exports traces, else a disabled span: without an exporter
/// nobody reads per-request spans, and the log layer would format every field of each one.
pub fn span_if_exporting(make: impl FnOnce() -> Span) -> Span {
    if exporting() { make() } else { Span::none() }
}

/// The installed tracer provider; [`Telemetry::shutdown`] flushes the spans still buffered.
#[derive(Debug)]
#[must_use = "call shutdown() before exiting so buffered spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter. Blocks (bounded): call it after the server
    /// stopped, from `main`, inside the runtime that built the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "could not flush the last spans");
            }
        }
    }
}

/// Installs logging and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, trace export. `service_name` is
/// used unless `OTEL_SERVICE_NAME` says otherwise. Must run inside a Tokio runtime. Safe to call more
/// than once per process (later calls change nothing), as `pairdb dev` and tests do.
pub fn init(format: LogFormat, default_filter: &str, service_name: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let provider = otlp_provider(service_name);
    // Traces have their own filter: a quiet RUST_LOG must not silence them.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("pairdb")).with_filter(
            tracing_subscriber::filter::Targets::new().with_target("pairdb", tracing::Level::INFO),
        )
    });
    let installed =
        tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init().is_ok();
    if !installed {
        // Another service in this process installed the subscriber first; keep its exporter only.
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return Telemetry { provider: None };
    }
    if let Some(provider) = &provider {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        opentelemetry::global::set_tracer_provider(provider.clone());
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Telemetry { provider }
}

fn otlp_provider(service_name: &str) -> Option<SdkTracerProvider> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.trim().is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!(
                "warning: OTEL_EXPORTER_OTLP_ENDPOINT={endpoint} but the OTLP exporter failed: {error}"
            );
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Writes trace context into gRPC metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Reads trace context from HTTP/2 headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Puts the current span's trace context into outgoing metadata (a no-op without tracing).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// A client interceptor that propagates the calling span's trace context.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceInterceptor;

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject(request.metadata_mut());
        Ok(request)
    }
}

/// gRPC services whose calls start traces even without an incoming context (client-facing APIs).
const TRACE_ROOTS: &[&str] = &["/pairdb.kv.v1.KvService/", "/pairdb.admin.v1.AdminService/"];

/// Paths that never make a span, whatever the request carries: probes and scrapes are background
/// chatter, not requests an operator traces.
const UNTRACED: &[&str] = &["/grpc.health.v1.Health/", "/health/", "/metrics"];

/// The reason of a failed response, set by the error edges ([`crate::errors::http_response`]) so the
/// span recorder need not parse the body.
#[derive(Debug, Clone, Copy)]
pub struct ResponseReason(pub pairdb_core::reason::Reason);

/// The server span of one inbound request (for `Server::trace_fn`), following the OpenTelemetry RPC
/// and HTTP semantic conventions: a child of the caller's span when the request carries trace context
/// (`traceparent`, for gRPC and HTTP alike); a new trace for client-facing APIs (the KV and admin gRPC
/// services, every HTTP `/v1/` route); none for internal gRPC calls without context, health probes
/// and metric scrapes. [`record_outcome`] fills in the status once the response is known. Never
/// carries a key: HTTP spans name the matched route (`/v1/kv/{key}`), not the path.
pub fn server_span(request: &http::Request<()>, http_routes: &'static [&'static str]) -> Span {
    let path = request.uri().path();
    if !exporting() || UNTRACED.iter().any(|prefix| path.starts_with(prefix)) {
        return Span::none();
    }
    let has_parent = request.headers().contains_key("traceparent");
    let span = if is_grpc(request.headers()) {
        if !has_parent && !TRACE_ROOTS.iter().any(|root| path.starts_with(root)) {
            return Span::none();
        }
        grpc_server_span(path)
    } else {
        if !path.starts_with("/v1/") && !has_parent {
            return Span::none();
        }
        http_server_span(request.method().as_str(), route_of(path, http_routes))
    };
    record_addresses(&span, request);
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

/// The template among `routes` that `path` matches (`{name}` matches one segment, `{*name}` the
/// rest), preferring the one with the most literal segments; `None` when no route serves `path`.
pub fn route_of(path: &str, routes: &[&'static str]) -> Option<&'static str> {
    let segments: Vec<&str> = path.split('/').collect();
    routes
        .iter()
        .filter_map(|route| literal_segments(route, &segments).map(|literals| (literals, *route)))
        .max_by_key(|(literals, _)| *literals)
        .map(|(_, route)| route)
}

/// How many literal segments of `route` match `segments`, if the whole path matches.
fn literal_segments(route: &str, segments: &[&str]) -> Option<usize> {
    let mut literals = 0;
    let pattern: Vec<&str> = route.split('/').collect();
    for (index, part) in pattern.iter().enumerate() {
        if part.starts_with("{*") {
            return (segments.len() > index).then_some(literals);
        }
        let segment = segments.get(index)?;
        if part.starts_with('{') {
            if segment.is_empty() {
                return None;
            }
        } else if part == segment {
            literals += 1;
        } else {
            return None;
        }
    }
    (pattern.len() == segments.len()).then_some(literals)
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// `/pairdb.kv.v1.KvService/Put` → span `pairdb.kv.v1.KvService/Put`, service and method attributes.
fn grpc_server_span(path: &str) -> Span {
    let full = path.trim_start_matches('/');
    let (service, method) = full.split_once('/').unwrap_or((full, ""));
    tracing::info_span!(
        target: "pairdb::grpc",
        "grpc.server",
        otel.name = full,
        otel.kind = "server",
        otel.status_description = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
        network.peer.address = tracing::field::Empty,
        network.peer.port = tracing::field::Empty,
        pairdb.reason = tracing::field::Empty,
    )
}

/// An HTTP/JSON request, named `METHOD /route/{param}` (or `METHOD` for a path no route serves).
fn http_server_span(method: &str, route: Option<&'static str>) -> Span {
    let name = match route {
        Some(route) => format!("{method} {route}"),
        None => method.to_owned(),
    };
    tracing::info_span!(
        target: "pairdb::http",
        "http.server",
        otel.name = name,
        otel.kind = "server",
        otel.status_description = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
        network.peer.address = tracing::field::Empty,
        network.peer.port = tracing::field::Empty,
        pairdb.reason = tracing::field::Empty,
    )
}

/// `server.*` from the authority the caller addressed (the local socket when it named none) and
/// `network.peer.*` from the connection.
fn record_addresses(span: &Span, request: &http::Request<()>) {
    let connection =
        request.extensions().get::<tonic::transport::server::TcpConnectInfo>().cloned().or_else(|| {
            request
                .extensions()
                .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
                .map(|tls| tls.get_ref().clone())
        });
    let authority = request.uri().authority().map(|a| (a.host().to_owned(), a.port_u16())).or_else(|| {
        let host = request.headers().get(http::header::HOST)?.to_str().ok()?;
        let authority: http::uri::Authority = host.parse().ok()?;
        Some((authority.host().to_owned(), authority.port_u16()))
    });
    let local = connection.as_ref().and_then(|c| c.local_addr());
    match authority {
        Some((host, port)) => {
            span.record("server.address", host.as_str());
            if let Some(port) = port.or_else(|| local.map(|l| l.port())) {
                span.record("server.port", i64::from(port));
            }
        }
        None => {
            if let Some(local) = local {
                span.record("server.address", local.ip().to_string().as_str());
                span.record("server.port", i64::from(local.port()));
            }
        }
    }
    if let Some(peer) = connection.as_ref().and_then(|c| c.remote_addr()) {
        span.record("network.peer.address", peer.ip().to_string().as_str());
        span.record("network.peer.port", i64::from(peer.port()));
    }
}

/// Middleware over every route: records the outcome of the request on its server span — the HTTP
/// route and status, the gRPC status code, and span status ERROR with the reason for failures (gRPC
/// UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS and HTTP 5xx, as the
/// semantic conventions define server errors; a caller's mistake is not the server's error, but its
/// reason is still recorded as `pairdb.reason`). Free when the request has no span.
pub async fn record_outcome(
    axum::extract::State(http_routes): axum::extract::State<&'static [&'static str]>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let span = Span::current();
    if span.is_disabled() {
        return next.run(request).await;
    }
    let grpc = is_grpc(request.headers());
    if let Some(matched) = request.extensions().get::<axum::extract::MatchedPath>()
        && !grpc
    {
        // The span was named from the service's route table before routing: the two must agree.
        debug_assert_eq!(route_of(request.uri().path(), http_routes), Some(matched.as_str()));
    }
    let response = next.run(request).await;
    if grpc {
        record_grpc_outcome(&span, &response);
    } else {
        record_http_outcome(&span, &response);
    }
    response
}

fn record_grpc_outcome(span: &Span, response: &axum::response::Response) {
    // A unary error is a trailers-only response: its status is in the headers. A success's is in the
    // trailers, after this layer has returned.
    let Some(code) = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
    else {
        span.record("rpc.grpc.status_code", 0_i64);
        return;
    };
    span.record("rpc.grpc.status_code", i64::from(code));
    if code == 0 {
        return;
    }
    let status = tonic::Status::from_header_map(response.headers());
    let reason = status.as_ref().and_then(crate::errors::known_reason_of);
    if let Some(reason) = reason {
        span.record("pairdb.reason", reason.as_str());
    }
    // UNKNOWN 2, DEADLINE_EXCEEDED 4, UNIMPLEMENTED 12, INTERNAL 13, UNAVAILABLE 14, DATA_LOSS 15.
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        let message = status.map(|s| s.message().to_owned()).unwrap_or_default();
        let described = match reason {
            Some(reason) => format!("{}: {message}", reason.as_str()),
            None => message,
        };
        span.record("otel.status_description", described.as_str());
    }
}

fn record_http_outcome(span: &Span, response: &axum::response::Response) {
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    let reason = response.extensions().get::<ResponseReason>().map(|r| r.0);
    if let Some(reason) = reason {
        span.record("pairdb.reason", reason.as_str());
    }
    if status.is_server_error() {
        let described = match reason {
            Some(reason) => reason.as_str().to_owned(),
            None => status.to_string(),
        };
        span.record("otel.status_description", described.as_str());
    }
}

/// Marks the current span failed with `reason` (span status ERROR): for client spans whose call
/// failed, where the semantic conventions count every non-OK status as an error.
pub fn record_error(span: &Span, reason: &str, message: &str) {
    // tracing-opentelemetry turns a status description into status ERROR with that message.
    let described = format!("{reason}: {message}");
    span.record("otel.status_description", described.as_str());
}

#[cfg(test)]
mod tests {
    use super::route_of;

    const ROUTES: &[&str] = &[
        "/v1/kv",
        "/v1/kv/{key}",
        "/v1/kv:touch",
        "/v1/groups/{group}/kv",
        "/v1/tenants/{id}/usage",
        "/v1/{*rest}",
    ];

    #[test]
    fn paths_map_to_their_route_never_to_their_parameters() {
        assert_eq!(route_of("/v1/kv", ROUTES), Some("/v1/kv"));
        assert_eq!(route_of("/v1/kv/secret-key", ROUTES), Some("/v1/kv/{key}"));
        assert_eq!(route_of("/v1/kv:touch", ROUTES), Some("/v1/kv:touch"));
        assert_eq!(route_of("/v1/groups/g1/kv", ROUTES), Some("/v1/groups/{group}/kv"));
        assert_eq!(route_of("/v1/tenants/t/usage", ROUTES), Some("/v1/tenants/{id}/usage"));
        assert_eq!(route_of("/v1/tenants/t/other", ROUTES), Some("/v1/{*rest}"));
        assert_eq!(route_of("/v2/kv", ROUTES), None);
        assert_eq!(route_of("/v1/kv/", ROUTES), Some("/v1/{*rest}"));
    }
}
