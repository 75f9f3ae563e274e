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

/// The server span of one inbound request (for `Server::trace_fn`): a child of the caller's span when
/// the request carries trace context; a new trace for client-facing APIs; none for internal calls
/// without context and for plain HTTP (health checks, metrics).
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    let is_grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if !is_grpc {
        return Span::none();
    }
    let has_parent = request.headers().contains_key("traceparent");
    if !has_parent && !TRACE_ROOTS.iter().any(|root| path.starts_with(root)) {
        return Span::none();
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let span =
        tracing::info_span!(target: "pairdb::grpc", "grpc.server", otel.name = %path, otel.kind = "server");
    let _ = span.set_parent(parent);
    span
}
