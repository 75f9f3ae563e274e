//! The migration orchestrator (leader only): runs queued migrations one at a time through
//! pending → running → completed (or failed / cancelled), persisting every step so a new leader
//! resumes where the old one stopped.
//!
//! Starting a migration computes the next topology version with `Assignment::compute` from the
//! current one and the node set the migration implies, stores it as the *pending* version (a new,
//! never reused epoch) and publishes it: while it runs, routers write to the union of the current and
//! pending replica sets. A `replication_factor` migration changes no assignment; its tenant's
//! `previous_replication_factor` plays the pending role. Completing it makes the pending version
//! current (`topology_current`, then `topology_pending_cleared`) and settles node lifecycles
//! (joining → active, leaving → removed).
//!
//! # Data movement
//!
//! The orchestrator hands a [`DataMover`] every partition whose replica set changes (with the old and
//! new lists, the tenants' replication factors and the nodes' addresses), up to
//! `migration_parallelism` partitions at a time, persists the per-partition "done" bitmap and the
//! key/byte counters it returns, and only completes the migration when every partition is done. The
//! production mover is [`crate::mover::StreamingDataMover`] (new owners pull from old replicas);
//! [`NoDataMovement`] exists for tests of the orchestrator alone.
//!
//! Migrations run one at a time (the queue is global), which is stricter than "one migration per
//! node": a second migration always queues behind the first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use pairdb_core::gc::leftovers::MigrationEnd;
use pairdb_core::repair::TenantSpan;
use pairdb_core::ring::{Assignment, NodeId, NodeSpec, diff};
use pairdb_core::token::PartitionId;
use pairdb_service::shutdown::Shutdown;

use crate::admin::{Meta, abandon, compute_assignment, now_ms};
use crate::error::MetaError;
use crate::model::{Membership, Migration, MigrationChange, MigrationState, StorageNode, Tenant, Topology};
use crate::persistence::{ChangeKind, LeaderFence};

/// How often the orchestrator looks for work without being woken.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How often progress is written while partitions are being moved.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often a partition move in flight checks whether its migration was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(250);

/// One partition whose replicas change.
#[derive(Debug, Clone)]
pub struct PartitionMove {
    pub migration_id: String,
    pub partition: PartitionId,
    /// The partition's list in the current topology.
    pub old_list: Vec<NodeId>,
    /// The partition's list in the pending topology.
    pub new_list: Vec<NodeId>,
    /// Every tenant, with its replication factor before and after: a node must receive tenant T's
    /// data of this partition when it is in the first `new` positions of `new_list` but not in the
    /// first `old` positions of `old_list` (`pairdb_core::ring::gained_memberships`).
    pub tenants: Arc<Vec<TenantSpan>>,
    /// Every storage node meta knows, with its address (sources and targets are looked up here).
    pub nodes: Arc<BTreeMap<NodeId, NodeEndpoint>>,
}

/// Where a storage node answers, and whether meta believes it is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEndpoint {
    pub address: String,
    pub down: bool,
}

/// What moving one partition did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveStats {
    pub keys: u64,
    pub bytes: u64,
}

/// Why a partition could not be moved (the migration then fails and is rolled back).
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("data movement failed: target node {0} has no address")]
    NoAddress(NodeId),
    #[error(
        "data movement failed: partition {partition}: no replica holds the data node {target} must receive"
    )]
    NoSource { partition: PartitionId, target: NodeId },
    #[error("data movement failed: partition {partition} to node {target}: {source}")]
    Transfer { partition: PartitionId, target: NodeId, source: crate::mover::StorageCallError },
}

/// Moves the data of one partition to the nodes that gain it. Must be idempotent (after a leader
/// change the same partition may be moved again if its completion was not yet persisted) and
/// cancel-safe (the future is dropped when the migration is cancelled or leadership is lost).
#[tonic::async_trait]
pub trait DataMover: Send + Sync + std::fmt::Debug + 'static {
    async fn move_partition(&self, plan: &PartitionMove) -> Result<MoveStats, MoveError>;
}

/// Moves nothing and reports every partition done at once: for tests of the orchestrator without
/// storage nodes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDataMovement;

#[tonic::async_trait]
impl DataMover for NoDataMovement {
    async fn move_partition(&self, _plan: &PartitionMove) -> Result<MoveStats, MoveError> {
        Ok(MoveStats::default())
    }
}

/// Runs migrations until `stop` is set (or leadership is lost).
pub async fn run(meta: Meta, mover: Arc<dyn DataMover>, fence: LeaderFence, mut stop: Shutdown) {
    loop {
        match step(&meta, mover.as_ref(), fence).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(MetaError::DatabaseUnavailable(error)) => {
                tracing::debug!(%error, "orchestrator: database unavailable; retrying");
            }
            Err(error) => tracing::warn!(%error, "orchestrator step failed; retrying"),
        }
        tokio::select! {
            () = meta.orchestrator_wake().notified() => {}
            () = tokio::time::sleep(IDLE_POLL) => {}
            _ = stop.wait() => return,
        }
    }
}

/// Starts or continues the migration at the head of the queue. `Ok(true)` if there may be more
/// work right away.
pub async fn step(meta: &Meta, mover: &dyn DataMover, fence: LeaderFence) -> Result<bool, MetaError> {
    if !meta.is_initialized() {
        return Ok(false);
    }
    let unfinished = {
        let mut tx = meta.store().read().await?;
        let unfinished = tx.unfinished_migrations().await?;
        tx.commit().await?;
        unfinished
    };
    let head = unfinished
        .iter()
        .find(|m| m.state == MigrationState::Running)
        .or_else(|| unfinished.first())
        .cloned();
    let Some(migration) = head else { return Ok(false) };
    let migration = match migration.state {
        MigrationState::Pending => match start(meta, fence, &migration.migration_id).await? {
            Some(started) => started,
            None => return Ok(true),
        },
        _ => migration,
    };
    drive(meta, mover, fence, migration).await?;
    Ok(true)
}

/// pending → running: computes and stores the pending topology. `None` if the migration is no longer
/// pending or failed to start (it is then marked failed).
async fn start(meta: &Meta, fence: LeaderFence, migration_id: &str) -> Result<Option<Migration>, MetaError> {
    let now = now_ms();
    let mut tx = meta.store().write().await?;
    tx.set_now(now);
    tx.check_leader(fence).await?;
    let Some(mut migration) = tx.get_migration(migration_id).await? else { return Ok(None) };
    if migration.state != MigrationState::Pending {
        return Ok(None);
    }
    let state = tx.meta_state().await?;
    let partitions = state.partition_count;
    migration.from_epoch = state.current_epoch;
    migration.to_epoch = state.current_epoch;
    migration.done_bitmap = vec![0; partitions.get().div_ceil(8) as usize];
    if migration.change.kind().changes_ring() {
        if state.current_epoch == 0 || state.pending_epoch != 0 {
            let why = if state.current_epoch == 0 {
                "there is no current topology"
            } else {
                "a pending topology exists"
            };
            abandon(&mut tx, &mut migration, MigrationState::Failed, why, now).await?;
            tx.commit().await?;
            return Ok(None);
        }
        let current = tx.require_topology(state.current_epoch).await?;
        let nodes = tx.list_nodes().await?;
        let specs = ring_after(&migration, &nodes);
        let assignment = match compute_assignment(Some(current.assignment.clone()), specs, partitions).await {
            Ok(assignment) => assignment,
            Err(error) => {
                tracing::warn!(migration = migration_id, %error, "migration cannot start");
                abandon(&mut tx, &mut migration, MigrationState::Failed, &error.to_string(), now).await?;
                tx.commit().await?;
                return Ok(None);
            }
        };
        let epoch = tx.max_epoch().await? + 1;
        let changed: BTreeSet<u32> =
            diff(&current.assignment, &assignment).iter().map(|t| t.partition.0).collect();
        tx.insert_topology(&Topology { epoch, assignment: Arc::new(assignment) }).await?;
        tx.set_epochs(state.current_epoch, epoch).await?;
        tx.record_change(ChangeKind::TopologyPending, &epoch.to_string()).await?;
        migration.to_epoch = epoch;
        migration.progress.partitions_total = changed.len() as u64;
    } else if grows_replication(&migration.change) {
        migration.progress.partitions_total = u64::from(partitions.get());
    }
    migration.state = MigrationState::Running;
    migration.started_at_ms = now;
    migration.updated_at_ms = now;
    tx.update_migration(&migration).await?;
    tx.commit().await?;
    tracing::info!(
        migration = migration_id,
        kind = migration.change.kind().as_str(),
        from_epoch = migration.from_epoch,
        to_epoch = migration.to_epoch,
        partitions = migration.progress.partitions_total,
        "migration started"
    );
    Ok(Some(migration))
}

/// Whether `change` raises a tenant's replication factor (every partition then gains an owner).
fn grows_replication(change: &MigrationChange) -> bool {
    matches!(change, MigrationChange::ReplicationFactor { from, to, .. } if to > from)
}

/// The ring a migration produces: the nodes in the ring now (active and leaving), plus the node an
/// `add_node` migration adds, minus the node a drain or removal takes out, with current weights.
fn ring_after(migration: &Migration, nodes: &[StorageNode]) -> Vec<NodeSpec> {
    nodes
        .iter()
        .filter(|node| {
            let in_ring_now = matches!(node.membership, Membership::Active | Membership::Leaving);
            let target = migration.change.node_id() == Some(node.node_id);
            match migration.change {
                MigrationChange::AddNode { .. } => in_ring_now || target,
                MigrationChange::DrainNode { .. } | MigrationChange::RemoveNode { .. } => {
                    in_ring_now && !target
                }
                MigrationChange::NodeWeight { .. } | MigrationChange::ReplicationFactor { .. } => in_ring_now,
            }
        })
        .map(StorageNode::spec)
        .collect()
}

/// running → completed: moves every partition not yet done, then promotes the pending topology.
async fn drive(
    meta: &Meta,
    mover: &dyn DataMover,
    fence: LeaderFence,
    mut migration: Migration,
) -> Result<(), MetaError> {
    let (current, pending, tenants, nodes) = {
        let mut tx = meta.store().read().await?;
        let current = tx.get_topology(migration.from_epoch).await?;
        let pending = match migration.change.kind().changes_ring() {
            true => tx.get_topology(migration.to_epoch).await?,
            false => current.clone(),
        };
        let tenants = tx.list_tenants().await?;
        let nodes = tx.list_nodes().await?;
        tx.commit().await?;
        (current, pending, tenants, nodes)
    };
    let nodes = Arc::new(node_endpoints(&nodes));
    let (Some(current), Some(pending)) = (current, pending) else {
        return fail(meta, fence, &migration.migration_id, "its topology versions are missing").await;
    };
    let tenants = Arc::new(tenant_replications(&tenants, &migration));
    let moves = partitions_to_move(&migration, &current.assignment, &pending.assignment);
    let todo: Vec<PartitionId> = moves.into_iter().filter(|p| !migration.partition_done(p.0)).collect();
    let migration_id = migration.migration_id.clone();
    let plans = todo.into_iter().map(|partition| PartitionMove {
        migration_id: migration_id.clone(),
        partition,
        old_list: current.assignment.list(partition).to_vec(),
        new_list: pending.assignment.list(partition).to_vec(),
        tenants: tenants.clone(),
        nodes: nodes.clone(),
    });
    let parallelism = meta.settings().migration_parallelism.max(1);
    let mut moving = futures::stream::iter(plans)
        .map(|plan| async move {
            let moved = mover.move_partition(&plan).await;
            (plan.partition, moved)
        })
        .buffer_unordered(parallelism);
    let mut last_flush = Instant::now();
    let cancelled = until_not_running(meta, &migration_id);
    tokio::pin!(cancelled);
    loop {
        let next = tokio::select! {
            next = moving.next() => next,
            // A cancelled migration stops mid-partition (the mover must be cancel-safe).
            () = &mut cancelled => return Ok(()),
        };
        let Some((partition, moved)) = next else { break };
        match moved {
            Ok(stats) => {
                migration.mark_partition_done(partition.0);
                migration.progress.partitions_done += 1;
                migration.progress.keys_done += stats.keys;
                migration.progress.keys_total += stats.keys;
                migration.progress.bytes_done += stats.bytes;
            }
            Err(error) => {
                tracing::warn!(migration = %migration.migration_id, %partition, %error, "partition move failed");
                return fail(meta, fence, &migration.migration_id, &error.to_string()).await;
            }
        }
        if last_flush.elapsed() >= PROGRESS_INTERVAL {
            last_flush = Instant::now();
            if !save_progress(meta, fence, &migration).await? {
                return Ok(());
            }
        }
    }
    complete(meta, fence, migration).await
}

/// Where the mover finds each node (a down node is skipped as a source).
fn node_endpoints(nodes: &[StorageNode]) -> BTreeMap<NodeId, NodeEndpoint> {
    nodes
        .iter()
        .map(|node| {
            let endpoint = NodeEndpoint { address: node.address.clone(), down: !node.alive };
            (node.node_id, endpoint)
        })
        .collect()
}

/// Each active tenant's N before and after `migration` (a tenant being deleted is purged, not
/// moved).
pub(crate) fn tenant_replications(tenants: &[Tenant], migration: &Migration) -> Vec<TenantSpan> {
    tenants
        .iter()
        .filter(|tenant| tenant.state == crate::model::TenantState::Active)
        .map(|tenant| {
            let n = tenant.replication_factor as usize;
            let old = match &migration.change {
                MigrationChange::ReplicationFactor { tenant_id, from, .. }
                    if *tenant_id == tenant.tenant_id =>
                {
                    *from as usize
                }
                _ => n,
            };
            TenantSpan { tenant_id: tenant.tenant_id.clone(), old_n: old, new_n: n }
        })
        .collect()
}

/// The partitions whose data `migration` moves: every partition when N grows, none when it
/// shrinks (owners only drop data), otherwise those whose list changes.
fn partitions_to_move(migration: &Migration, current: &Assignment, pending: &Assignment) -> Vec<PartitionId> {
    match migration.change {
        MigrationChange::ReplicationFactor { .. } if grows_replication(&migration.change) => {
            current.partition_count().partitions().collect()
        }
        MigrationChange::ReplicationFactor { .. } => Vec::new(),
        _ => {
            let changed: BTreeSet<u32> = diff(current, pending).iter().map(|t| t.partition.0).collect();
            changed.into_iter().map(PartitionId).collect()
        }
    }
}

/// Resolves once the migration is no longer running (cancelled by an operator on any replica).
async fn until_not_running(meta: &Meta, migration_id: &str) {
    loop {
        tokio::time::sleep(CANCEL_POLL).await;
        let state = async {
            let mut tx = meta.store().read().await?;
            let migration = tx.get_migration(migration_id).await?;
            tx.commit().await?;
            Ok::<_, crate::persistence::PersistenceError>(migration.map(|m| m.state))
        }
        .await;
        match state {
            Ok(Some(MigrationState::Running)) | Err(_) => {}
            Ok(_) => return,
        }
    }
}

/// The leader's gauges of the migration it runs (one at a time per node; `running` 0 when idle).
fn publish_progress(migration: &Migration, running: f64) {
    metrics::gauge!("pairdb_meta_migration_running").set(running);
    metrics::gauge!("pairdb_meta_migration_partitions").set(migration.progress.partitions_total as f64);
    metrics::gauge!("pairdb_meta_migration_partitions_done").set(migration.progress.partitions_done as f64);
    metrics::gauge!("pairdb_meta_migration_keys_done").set(migration.progress.keys_done as f64);
    metrics::gauge!("pairdb_meta_migration_bytes_done").set(migration.progress.bytes_done as f64);
}

/// Writes progress; `false` if the migration is no longer running (cancelled meanwhile).
async fn save_progress(meta: &Meta, fence: LeaderFence, migration: &Migration) -> Result<bool, MetaError> {
    let mut tx = meta.store().write().await?;
    tx.check_leader(fence).await?;
    let Some(mut stored) = tx.get_migration(&migration.migration_id).await? else { return Ok(false) };
    if stored.state != MigrationState::Running {
        return Ok(false);
    }
    stored.progress = migration.progress;
    stored.done_bitmap = migration.done_bitmap.clone();
    stored.updated_at_ms = now_ms();
    tx.update_migration(&stored).await?;
    tx.commit().await?;
    publish_progress(migration, 1.0);
    Ok(true)
}

/// Promotes the pending topology and settles the lifecycle of the migration's node or tenant.
async fn complete(meta: &Meta, fence: LeaderFence, migration: Migration) -> Result<(), MetaError> {
    let now = now_ms();
    let mut tx = meta.store().write().await?;
    tx.set_now(now);
    tx.check_leader(fence).await?;
    let Some(mut stored) = tx.get_migration(&migration.migration_id).await? else { return Ok(()) };
    if stored.state != MigrationState::Running {
        return Ok(());
    }
    let leftovers = crate::leftovers::announce(&mut tx, &stored, MigrationEnd::Completed).await?;
    if stored.change.kind().changes_ring() {
        tx.set_epochs(stored.to_epoch, 0).await?;
        tx.record_change(ChangeKind::TopologyCurrent, &stored.to_epoch.to_string()).await?;
        tx.record_change(ChangeKind::TopologyPendingCleared, &stored.to_epoch.to_string()).await?;
    }
    crate::lifecycle::settle(&mut tx, &stored, crate::lifecycle::Ending::Completed, now).await?;
    leftovers.stamp(&mut tx, &stored).await?;
    stored.progress = migration.progress;
    stored.progress.partitions_done = stored.progress.partitions_total;
    stored.done_bitmap = migration.done_bitmap;
    stored.state = MigrationState::Completed;
    stored.finished_at_ms = now;
    stored.updated_at_ms = now;
    tx.update_migration(&stored).await?;
    tx.commit().await?;
    publish_progress(&stored, 0.0);
    metrics::counter!("pairdb_meta_migrations_completed_total", "kind" => stored.change.kind().as_str())
        .increment(1);
    tracing::info!(
        migration = %stored.migration_id,
        kind = stored.change.kind().as_str(),
        epoch = stored.to_epoch,
        "migration completed"
    );
    Ok(())
}

/// running → failed, restoring what the migration changed.
async fn fail(meta: &Meta, fence: LeaderFence, migration_id: &str, reason: &str) -> Result<(), MetaError> {
    let now = now_ms();
    let mut tx = meta.store().write().await?;
    tx.set_now(now);
    tx.check_leader(fence).await?;
    let Some(mut migration) = tx.get_migration(migration_id).await? else { return Ok(()) };
    if migration.state.is_finished() {
        return Ok(());
    }
    abandon(&mut tx, &mut migration, MigrationState::Failed, reason, now).await?;
    tx.commit().await?;
    tracing::warn!(migration = migration_id, reason, "migration failed");
    Ok(())
}
