//! Membership: a node runs standalone (static configuration, as tests do) or registers with the
//! metadata service and heartbeats to it, behind the [`NodeRegistry`] trait. Heartbeats carry the
//! node's stats and the deleted tenants it has purged (meta completes a deletion once every node
//! reported it).

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_proto::admin::v1::NodeStats;
use pairdb_proto::cluster::v1 as pb;
use pairdb_service::clients::{ChannelSettings, ClusterClient, InternalClients};
use pairdb_service::shutdown::Shutdown;

use crate::engine::Engine;
use crate::identity::DATA_FORMAT_VERSION;

/// What a node tells the cluster about itself.
#[derive(Debug, Clone)]
pub struct NodeAnnouncement {
    pub node_id: NodeId,
    pub address: String,
    pub zone: Option<String>,
    pub weight: u32,
    pub actor: u64,
}

/// How a node joins the cluster.
#[tonic::async_trait]
pub trait NodeRegistry: Send + Sync + 'static {
    /// Announces the node; returns the heartbeat interval.
    async fn register(&self, node: &NodeAnnouncement) -> Result<Duration, tonic::Status>;
    /// Reports liveness, stats and purged tenants; `Ok(false)` means "unknown node, register again".
    async fn heartbeat(&self, node_id: NodeId, report: HeartbeatReport) -> Result<bool, tonic::Status>;
}

/// What a heartbeat carries.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatReport {
    pub stats: NodeStats,
    /// (tenant, purge sequence) of every deleted tenant purged here.
    pub purged_tenants: Vec<(String, u64)>,
}

/// NodeRegistry through the metadata service's cluster API.
#[derive(Debug, Clone)]
pub struct MetaRegistry {
    client: ClusterClient,
}

impl MetaRegistry {
    /// A lazily connecting client for `meta_addr`.
    pub fn new(meta_addr: &str, clients: &InternalClients) -> Result<Self, tonic::transport::Error> {
        let settings = ChannelSettings {
            request_timeout: Some(Duration::from_secs(5)),
            keepalive: None,
            ..ChannelSettings::default()
        };
        Ok(Self { client: clients.cluster(meta_addr, settings)? })
    }
}

#[tonic::async_trait]
impl NodeRegistry for MetaRegistry {
    async fn register(&self, node: &NodeAnnouncement) -> Result<Duration, tonic::Status> {
        let response = self
            .client
            .clone()
            .register_node(pb::RegisterNodeRequest {
                node_id: node.node_id.0,
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

    async fn heartbeat(&self, node_id: NodeId, report: HeartbeatReport) -> Result<bool, tonic::Status> {
        let purged_tenants = report
            .purged_tenants
            .into_iter()
            .map(|(tenant_id, purge_seq)| pb::TenantPurged { tenant_id, purge_seq })
            .collect();
        let request = pb::HeartbeatRequest { node_id: node_id.0, stats: Some(report.stats), purged_tenants };
        let response = self.client.clone().heartbeat(request).await?.into_inner();
        Ok(!response.unknown_node)
    }
}

/// Registers (retrying with capped backoff) and heartbeats until `shutdown` fires.
pub async fn run(
    membership: Arc<dyn NodeRegistry>,
    node: NodeAnnouncement,
    engine: Arc<Engine>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let interval = loop {
            match membership.register(&node).await {
                Ok(interval) => {
                    tracing::info!(node_id = node.node_id.0, "registered with the metadata service");
                    backoff = Duration::from_millis(200);
                    break interval;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "registration failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => return,
            }
            let report = heartbeat_report(&engine).await;
            match membership.heartbeat(node.node_id, report).await {
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

/// The node's stats and finished purges (read on the blocking pool).
async fn heartbeat_report(engine: &Arc<Engine>) -> HeartbeatReport {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || {
        let stats = engine.stats();
        let purged_tenants = match engine.tenant_purges() {
            Ok(purges) => purges.into_iter().filter(|p| p.done).map(|p| (p.tenant, p.purge_seq)).collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the tenant purges to report");
                Vec::new()
            }
        };
        HeartbeatReport {
            stats: NodeStats {
                keys: stats.keys,
                live_bytes: stats.disk_bytes,
                disk_free_bytes: stats.disk_free_bytes,
                hints_pending: stats.hints_pending,
                write_path_poisoned: stats.poisoned,
                quarantined_records: stats.quarantined_records,
            },
            purged_tenants,
        }
    })
    .await
    .unwrap_or_default()
}
