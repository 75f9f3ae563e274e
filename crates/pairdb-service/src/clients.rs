//! How cluster members call each other: the one constructor for storage clients (routers, storage
//! peers, meta) and for meta's cluster API (storage nodes, routers). Every internal client is built
//! here, so every one presents this process's cluster credential, propagates trace context, speaks
//! TLS when it is on and bounds its messages and connection attempts the same way.

use std::time::Duration;

use pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use pairdb_proto::storage::v1::storage_service_client::StorageServiceClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cluster_auth::{CREDENTIAL_HEADER, ClusterAuth};
use crate::tls::Tls;

/// Adds this process's cluster credential and the current trace context to every outgoing call.
#[derive(Debug, Clone, Default)]
pub struct ClusterInterceptor {
    credential: Option<AsciiMetadataValue>,
}

impl ClusterInterceptor {
    pub fn new(auth: &ClusterAuth) -> Self {
        Self { credential: auth.outgoing().cloned() }
    }
}

impl tonic::service::Interceptor for ClusterInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        crate::telemetry::inject(request.metadata_mut());
        if let Some(credential) = &self.credential {
            request.metadata_mut().insert(CREDENTIAL_HEADER, credential.clone());
        }
        Ok(request)
    }
}

pub type StorageClient = StorageServiceClient<InterceptedService<Channel, ClusterInterceptor>>;
pub type ClusterClient = ClusterServiceClient<InterceptedService<Channel, ClusterInterceptor>>;

/// Timeouts and keepalive of one channel.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSettings {
    pub connect_timeout: Duration,
    /// Bound on each call (`None`: streams and long calls set their own).
    pub request_timeout: Option<Duration>,
    /// HTTP/2 keepalive pings (a silently dead peer is found within about twice this).
    pub keepalive: Option<Duration>,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: None,
            keepalive: Some(Duration::from_secs(10)),
        }
    }
}

/// Builds internal clients for one process.
#[derive(Debug, Clone)]
pub struct InternalClients {
    tls: Option<Tls>,
    interceptor: ClusterInterceptor,
    max_message_bytes: usize,
}

impl InternalClients {
    pub fn new(tls: Option<Tls>, auth: &ClusterAuth, max_message_bytes: usize) -> Self {
        Self { tls, interceptor: ClusterInterceptor::new(auth), max_message_bytes }
    }

    /// A plaintext, insecure builder (tests and standalone tools).
    pub fn insecure() -> Self {
        Self::new(None, &ClusterAuth::insecure(), pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES)
    }

    /// A lazily connecting channel to `address` (`host:port`): nothing is dialled until first use and
    /// no lock is ever held across a connect.
    pub fn channel(
        &self,
        address: &str,
        settings: ChannelSettings,
    ) -> Result<Channel, tonic::transport::Error> {
        // Concurrent calls to one node leave in shared writes (`pairdb_proto::transport`).
        let endpoint = self.endpoint(address, settings)?;
        Ok(endpoint
            .connect_with_connector_lazy(tower::service_fn(pairdb_proto::transport::connect_stepping_aside)))
    }

    /// The endpoint of `address` with this process's TLS and `settings` (connect it yourself).
    pub fn endpoint(
        &self,
        address: &str,
        settings: ChannelSettings,
    ) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        let mut endpoint = crate::tls::endpoint(address, self.tls.as_ref())?
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true);
        if let Some(timeout) = settings.request_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if let Some(interval) = settings.keepalive {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(interval)
                .keep_alive_while_idle(true);
        }
        Ok(endpoint)
    }

    /// A storage client over `channel`.
    pub fn storage_over(&self, channel: Channel) -> StorageClient {
        StorageServiceClient::with_interceptor(channel, self.interceptor.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// A storage client for the node at `address`.
    pub fn storage(
        &self,
        address: &str,
        settings: ChannelSettings,
    ) -> Result<StorageClient, tonic::transport::Error> {
        Ok(self.storage_over(self.channel(address, settings)?))
    }

    /// A client of meta's cluster API over `channel`.
    pub fn cluster_over(&self, channel: Channel) -> ClusterClient {
        ClusterServiceClient::with_interceptor(channel, self.interceptor.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// A client of meta's cluster API at `address`.
    pub fn cluster(
        &self,
        address: &str,
        settings: ChannelSettings,
    ) -> Result<ClusterClient, tonic::transport::Error> {
        Ok(self.cluster_over(self.channel(address, settings)?))
    }
}
