//! Membership hooks: a node runs standalone (static configuration, as tests do) or registers with the
//! metadata service and heartbeats to it. The meta side arrives with the metadata-service issue; this
//! side only needs the cluster API of `proto/`, behind the [`Membership`] trait.

use std::sync::Arc;
use std::time::Duration;

use pairdb_proto::admin::v1::NodeStats;
use pairdb_proto::cluster::v1 as pb;
use pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use pairdb_service::telemetry::TraceInterceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::engine::Engine;
use crate::identity::DATA_FORMAT_VERSION;

/// What a node tells the cluster about itself.
#[derive(Debug, Clone)]
pub struct NodeAnnouncement {
    pub node_id: u32,
    pub address: String,
    pub zone: Option<String>,
    pub weight: u32,
    pub actor: u64,
}

/// How a node joins the cluster.
#[tonic::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Announces the node; returns the heartbeat interval.
    async fn register(&self, node: &NodeAnnouncement) -> Result<Duration, tonic::Status>;
    /// Reports liveness and stats; `Ok(false)` means "unknown node, register again".
    async fn heartbeat(&self, node_id: u32, stats: NodeStats) -> Result<bool, tonic::Status>;
}

/// Membership through the metadata service's cluster API.
#[derive(Debug, Clone)]
pub struct MetaMembership {
    client: ClusterServiceClient<InterceptedService<Channel, TraceInterceptor>>,
}

impl MetaMembership {
    /// A lazily connecting client for `meta_addr`.
    pub fn new(
        meta_addr: &str,
        tls: Option<&pairdb_service::tls::Tls>,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = pairdb_service::tls::endpoint(meta_addr, tls)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self { client: ClusterServiceClient::with_interceptor(channel, TraceInterceptor) })
    }
}

#[tonic::async_trait]
impl Membership for MetaMembership {
    async fn register(&self, node: &NodeAnnouncement) -> Result<Duration, tonic::Status> {
        let response = self
            .client
            .clone()
            .register_node(pb::RegisterNodeRequest {
                node_id: node.node_id,
                address: node.address.clone(),
                zone: node.zone.clone().unwrap_or_default(),
                weight: node.weight,
                actor_id: node.actor,
                data_format_version: DATA_FORMAT_VERSION,
            })
            .await?
            .into_inner();
        Ok(Duration::from_millis(u64::from(response.heartbeat_interval_ms.max(100))))
    }

    async fn heartbeat(&self, node_id: u32, stats: NodeStats) -> Result<bool, tonic::Status> {
        let response = self
            .client
            .clone()
            .heartbeat(pb::HeartbeatRequest { node_id, stats: Some(stats) })
            .await?
            .into_inner();
        Ok(!response.unknown_node)
    }
}

/// Registers (retrying with capped backoff) and heartbeats until `shutdown` fires.
pub async fn run(
    membership: Arc<dyn Membership>,
    node: NodeAnnouncement,
    engine: Arc<Engine>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let interval = loop {
            match membership.register(&node).await {
                Ok(interval) => {
                    tracing::info!(node_id = node.node_id, "registered with the metadata service");
                    backoff = Duration::from_millis(200);
                    break interval;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "registration failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let engine_for_stats = engine.clone();
            let stats =
                tokio::task::spawn_blocking(move || engine_for_stats.stats()).await.unwrap_or_default();
            let stats = NodeStats {
                keys: stats.keys,
                live_bytes: stats.disk_bytes,
                disk_free_bytes: stats.disk_free_bytes,
                hints_pending: stats.hints_pending,
                write_path_poisoned: stats.poisoned,
            };
            match membership.heartbeat(node.node_id, stats).await {
                Ok(true) => {
                    if failing {
                        tracing::info!("heartbeats reach the metadata service again");
                    }
                    failing = false;
                }
                Ok(false) => break,
                // Warn once per outage, not once per interval.
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "heartbeat failed; retrying every interval");
                }
                Err(error) => tracing::debug!(%error, "heartbeat failed"),
            }
        }
    }
}
