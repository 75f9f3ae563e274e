//! Membership: a node runs standalone (static configuration, as tests do) or registers with the
//! metadata service and heartbeats to it, behind the [`NodeRegistry`] trait. Heartbeats carry the
//! node's stats and the deleted tenants it has purged (meta completes a deletion once every node
//! reported it), and every [`USAGE_REPORT_INTERVAL`] the node's share of each tenant's usage: its
//! records of the partitions it is first in the current topology's list of, so the nodes' shares add
//! up to each tenant's total once (meta sums them; quotas are decided from that sum).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pairdb_core::ring::NodeId;
use pairdb_core::usage::Usage;
use pairdb_proto::admin::v1::{NodeStats, TenantUsage};
use pairdb_proto::cluster::v1 as pb;
use pairdb_service::clients::{ChannelSettings, ClusterClient, InternalClients};
use pairdb_service::cluster_view::{ClusterView, SharedView};
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

/// How often heartbeats carry the node's usage share.
pub const USAGE_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// What a heartbeat carries.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatReport {
    pub stats: NodeStats,
    /// (tenant, purge sequence) of every deleted tenant purged here.
    pub purged_tenants: Vec<(String, u64)>,
    /// This node's share of every tenant's usage, under the topology epoch it was counted with.
    pub usage: Option<UsageShare>,
}

/// A node's share of its tenants' usage (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct UsageShare {
    pub epoch: u64,
    pub tenants: Vec<(String, Usage)>,
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
        let usage_reported = report.usage.is_some();
        let UsageShare { epoch: usage_epoch, tenants } = report.usage.unwrap_or_default();
        let tenant_usage = tenants
            .into_iter()
            .map(|(tenant_id, usage)| TenantUsage {
                tenant_id,
                keys: usage.keys,
                value_bytes: usage.value_bytes,
                siblings: usage.siblings,
                tombstones: usage.tombstones,
            })
            .collect();
        let request = pb::HeartbeatRequest {
            node_id: node_id.0,
            stats: Some(report.stats),
            purged_tenants,
            usage_reported,
            tenant_usage,
            usage_epoch,
        };
        let response = self.client.clone().heartbeat(request).await?.into_inner();
        Ok(!response.unknown_node)
    }
}

/// Registers (retrying with capped backoff) and heartbeats until `shutdown` fires.
pub async fn run(
    membership: Arc<dyn NodeRegistry>,
    node: NodeAnnouncement,
    engine: Arc<Engine>,
    view: SharedView,
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
        let mut usage_due = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => return,
            }
            let usage_view = (Instant::now() >= usage_due).then(|| view.load());
            let report = heartbeat_report(&engine, node.node_id, usage_view).await;
            if report.usage.is_some() {
                usage_due = Instant::now() + USAGE_REPORT_INTERVAL;
            }
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

/// The node's stats and finished purges, and its usage share when `usage_view` is given and has a
/// topology (read on the blocking pool).
async fn heartbeat_report(
    engine: &Arc<Engine>,
    node_id: NodeId,
    usage_view: Option<Arc<ClusterView>>,
) -> HeartbeatReport {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || {
        let usage = usage_view.and_then(|view| usage_share(&engine, node_id, &view));
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
            usage,
        }
    })
    .await
    .unwrap_or_default()
}

/// The node's usage share under the view's current topology (`None` before it has one).
fn usage_share(engine: &Engine, node_id: NodeId, view: &ClusterView) -> Option<UsageShare> {
    let current = view.current.as_ref()?;
    let first_here = |partition| current.preference_list(partition, 1).first() == Some(&node_id);
    Some(UsageShare { epoch: view.epoch, tenants: engine.tenant_usage(first_here) })
}
