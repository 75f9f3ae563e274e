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
    /// Reports liveness, stats and purged tenants.
    async fn heartbeat(
        &self,
        node_id: NodeId,
        report: HeartbeatReport,
    ) -> Result<HeartbeatAnswer, tonic::Status>;
}

/// What meta answered a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    /// `false`: meta does not know the node (removed): register again.
    pub known: bool,
    /// Meta's wall clock when it handled the heartbeat (`None`: an older meta that does not say).
    pub meta_unix_ms: Option<u64>,
}

/// This node's last measured wall-clock offset to meta (ms, positive: ahead), shared by the
/// heartbeat loop that measures it and the health watch that reports it.
#[derive(Debug, Default)]
pub struct ClockOffset {
    /// `i64::MIN`: not measured yet.
    offset_ms: std::sync::atomic::AtomicI64,
}

impl ClockOffset {
    pub fn new() -> Self {
        Self { offset_ms: std::sync::atomic::AtomicI64::new(i64::MIN) }
    }

    pub fn set(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms.max(i64::MIN + 1), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<i64> {
        Some(self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)).filter(|ms| *ms != i64::MIN)
    }
}

/// The watch revision of the view this node's last complete deletion of data it no longer owns ran
/// from (0: none since the process started), reported with every heartbeat: meta clears a mark a
/// migration left on this node once the report reaches it (`pairdb_core::gc::leftovers`). Kept in
/// memory only: after a restart the next complete pass reports again.
#[derive(Debug, Default)]
pub struct UnownedCleanupRevision(std::sync::atomic::AtomicU64);

impl UnownedCleanupRevision {
    /// Records a complete pass from the view of `revision` (the reported revision never goes back).
    pub fn record(&self, revision: u64) {
        self.0.fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
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
    /// See [`UnownedCleanupRevision`].
    pub unowned_cleanup_revision: u64,
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

    async fn heartbeat(
        &self,
        node_id: NodeId,
        report: HeartbeatReport,
    ) -> Result<HeartbeatAnswer, tonic::Status> {
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
            unowned_cleanup_revision: report.unowned_cleanup_revision,
        };
        let response = self.client.clone().heartbeat(request).await?.into_inner();
        let meta_unix_ms = (response.meta_unix_ms > 0).then_some(response.meta_unix_ms);
        Ok(HeartbeatAnswer { known: !response.unknown_node, meta_unix_ms })
    }
}

/// Registers (retrying with capped backoff) and heartbeats until `shutdown` fires; each heartbeat's
/// round trip updates `clock` (reported with the next one).
pub async fn run(
    membership: Arc<dyn NodeRegistry>,
    node: NodeAnnouncement,
    engine: Arc<Engine>,
    view: SharedView,
    clock: Arc<ClockOffset>,
    cleanup: Arc<UnownedCleanupRevision>,
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
            let mut report = heartbeat_report(&engine, node.node_id, usage_view).await;
            if report.usage.is_some() {
                usage_due = Instant::now() + USAGE_REPORT_INTERVAL;
            }
            if let Some(offset_ms) = clock.get() {
                report.stats.clock_offset_ms = offset_ms;
                report.stats.clock_offset_known = true;
            }
            report.unowned_cleanup_revision = cleanup.get();
            let sent_ms = crate::engine::now_ms();
            let answer = membership.heartbeat(node.node_id, report).await;
            if let Ok(HeartbeatAnswer { meta_unix_ms: Some(meta_ms), .. }) = answer {
                clock.set(pairdb_core::clock::offset_ms(
                    sent_ms,
                    meta_ms,
                    crate::engine::now_ms().max(sent_ms),
                ));
            }
            match answer.map(|a| a.known) {
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
    pairdb_service::task::spawn_blocking(move || {
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
                // The old name of disk_bytes, for a meta older than it.
                live_bytes: stats.disk_bytes,
                disk_bytes: stats.disk_bytes,
                live_value_bytes: engine.live_value_bytes(),
                disk_free_bytes: stats.disk_free_bytes,
                hints_pending: stats.hints_pending,
                write_path_poisoned: stats.poisoned,
                quarantined_records: stats.quarantined_records,
                // The heartbeat loop fills in its last measurement.
                clock_offset_ms: 0,
                clock_offset_known: false,
            },
            purged_tenants,
            usage,
            // The heartbeat loop fills it in.
            unowned_cleanup_revision: 0,
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A meta whose clock runs `ahead_ms` ahead of this process's and that records what each
    /// heartbeat reported.
    #[derive(Default)]
    struct SkewedMeta {
        ahead_ms: u64,
        reported: Mutex<Vec<NodeStats>>,
    }

    #[tonic::async_trait]
    impl NodeRegistry for SkewedMeta {
        async fn register(&self, _node: &NodeAnnouncement) -> Result<Duration, tonic::Status> {
            Ok(Duration::from_millis(20))
        }

        async fn heartbeat(
            &self,
            _node_id: NodeId,
            report: HeartbeatReport,
        ) -> Result<HeartbeatAnswer, tonic::Status> {
            self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(report.stats);
            Ok(HeartbeatAnswer { known: true, meta_unix_ms: Some(crate::engine::now_ms() + self.ahead_ms) })
        }
    }

    /// The heartbeat loop measures the offset on each round trip and reports it with the next
    /// heartbeat: a meta 5 s ahead means this node is 5 s behind.
    #[tokio::test]
    async fn heartbeats_measure_and_report_the_clock_offset() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = crate::Config::for_node(1, dir.path().join("data"));
        let engine = crate::open_engine(&config).unwrap_or_else(|e| panic!("{e}"));
        let meta = Arc::new(SkewedMeta { ahead_ms: 5_000, ..SkewedMeta::default() });
        let clock = Arc::new(ClockOffset::new());
        let (stop, stopped) = pairdb_service::shutdown::channel();
        let node =
            NodeAnnouncement { node_id: NodeId(1), address: "x".into(), zone: None, weight: 1, actor: 1 };
        let task = pairdb_service::task::spawn(run(
            meta.clone(),
            node,
            engine,
            SharedView::default(),
            clock.clone(),
            Arc::default(),
            stopped,
        ));
        for _ in 0..200 {
            if meta
                .reported
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|s| s.clock_offset_known)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.trigger();
        let _ = task.await;
        let offset = clock.get().unwrap_or_else(|| panic!("measured"));
        assert!((-5_100..=-4_900).contains(&offset), "{offset}");
        let reported = meta.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        assert!(!reported[0].clock_offset_known, "nothing measured before the first round trip");
        let known: Vec<i64> =
            reported.iter().filter(|s| s.clock_offset_known).map(|s| s.clock_offset_ms).collect();
        assert!(!known.is_empty() && known.iter().all(|ms| (-5_100..=-4_900).contains(ms)), "{known:?}");
        assert!(pairdb_core::clock::skewed(offset, 1_000));
    }
}
