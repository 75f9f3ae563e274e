//! Typed async Rust client for PairDB.
//!
//! [`KvClient`] talks to a router (put/get/delete/get-many with consistency, causal context, siblings,
//! idempotency key and deadline); [`AdminClient`] talks to the metadata service. Both send
//! `authorization: Bearer <token>` when given a token and retry only what is safe to repeat (see
//! [`retry`]).

mod admin;
mod error;
mod kv;
mod listing;
pub mod retry;

use std::str::FromStr;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub use admin::AdminClient;
pub use error::{ClientError, CurrentState};
pub use kv::{
    Consistency, DeleteManyItem, KvClient, PutManyItem, ReadOptions, ReadResult, Sibling, WriteCondition,
    WriteManyResult, WriteOptions, WriteResult,
};
pub use listing::{KeyPage, KeyPages, ListOptions, ListedKey, ScannedKey};
pub use pairdb_proto as proto;
pub use pairdb_proto::status::Reason;
pub use retry::RetryPolicy;

/// How to reach a service.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bearer token (API key for the router, admin token for meta).
    pub token: Option<String>,
    /// Bound on establishing the connection.
    pub connect_timeout: Duration,
    /// Default per-request deadline.
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    /// TLS (CA to verify the server, and a client certificate for services that require one).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            tls: None,
        }
    }
}

/// Adds the bearer token to every request.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<AsciiMetadataValue>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        token
            .map(|token| AsciiMetadataValue::from_str(&format!("Bearer {}", token.trim())))
            .transpose()
            .map(Self)
            .map_err(|_| ClientError::InvalidToken)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        inject_trace_context(request.metadata_mut());
        Ok(request)
    }
}

/// Propagates the caller's trace (W3C `traceparent`) when the application installed an OpenTelemetry
/// propagator; a no-op otherwise.
fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);
    impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                tonic::metadata::MetadataValue::try_from(value.as_str()),
            ) {
                self.0.insert(key, value);
            }
        }
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// Opens a channel to `address` (`host:port` or a full `http://` URL).
pub async fn connect(address: &str) -> Result<Channel, ClientError> {
    connect_with(address, &ClientOptions::default()).await
}

/// Opens a channel with `options`' connect timeout and TLS (`https` when TLS is set).
pub async fn connect_with(address: &str, options: &ClientOptions) -> Result<Channel, ClientError> {
    let host = address.split_once("://").map_or(address, |(_, rest)| rest);
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://{host}");
    let mut builder = Endpoint::from_shared(endpoint.clone())
        .map_err(|source| ClientError::InvalidEndpoint { endpoint: endpoint.clone(), source })?;
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(tls.clone())
            .map_err(|source| ClientError::InvalidEndpoint { endpoint: endpoint.clone(), source })?;
    }
    // Concurrent requests on one connection leave in shared writes (`pairdb_proto::transport`).
    builder
        .connect_timeout(options.connect_timeout)
        .connect_with_connector(tower::service_fn(pairdb_proto::transport::connect_stepping_aside))
        .await
        .map_err(|source| ClientError::Connect { endpoint, source })
}

/// Whether the service behind `channel` reports SERVING on the standard gRPC health service.
pub async fn is_serving(channel: Channel) -> Result<bool, ClientError> {
    let response = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(response.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}
