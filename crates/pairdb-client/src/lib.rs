//! Rust client for PairDB. The CLI issue grows this into a typed KV/admin client with safe retries;
//! today it connects to a service and checks its gRPC health.

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Client-side errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint}: {source}")]
    InvalidEndpoint { endpoint: String, source: tonic::transport::Error },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: String, source: tonic::transport::Error },
    #[error("request failed: {0}")]
    Status(#[from] tonic::Status),
}

/// Opens a channel to `address` (`host:port` or a full `http://` URL).
pub async fn connect(address: &str) -> Result<Channel, ClientError> {
    let endpoint = if address.contains("://") { address.to_owned() } else { format!("http://{address}") };
    let channel = Endpoint::from_shared(endpoint.clone())
        .map_err(|source| ClientError::InvalidEndpoint { endpoint: endpoint.clone(), source })?
        .connect()
        .await
        .map_err(|source| ClientError::Connect { endpoint, source })?;
    Ok(channel)
}

/// Whether the service behind `channel` reports SERVING on the standard gRPC health service.
pub async fn is_serving(channel: Channel) -> Result<bool, ClientError> {
    let response = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(response.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}
