//! The metadata service's operations: tenants, API keys, storage nodes, migrations, and the storage
//! nodes' registration and heartbeats. Both API edges (gRPC and HTTP/JSON) call these.
//!
//! Every mutation is one write transaction ([`Store::write`]), which holds the cluster-wide metadata
//! lock: the checks (does the tenant exist, would N exceed the active nodes, would removing this node
//! leave fewer nodes than the highest N) and the writes they guard are atomic across replicas. Each
//! mutation records its changes in the change log in the same transaction, so the watch stream
//! publishes exactly what was committed.
//!
//! The operations on tenants and API keys are in `tenants`, on storage nodes (with registration and
//! heartbeats) in `nodes`; this file holds the shared state, migrations and the checks both use.
//!
//! # How storage nodes join
//!
//! An operator adds a node with `AddStorageNode` (id, address, zone, weight): the record is created
//! `joining` and an `add_node` migration queued; the node enters the ring when the migration
//! completes. The storage process then calls `RegisterNode` with its id: meta records its address,
//! actor id and liveness. A registration for an unknown id fails with NODE_NOT_FOUND unless meta runs
//! with `--auto-add-nodes` (dev mode), in which case it is treated like an `AddStorageNode` with the
//! registration's address, zone and weight. Zone and weight of a known node change only through the
//! admin API (they move data); a registration updates address, actor id and liveness only.
//!
//! **Bootstrap**: while the cluster has no topology at all, adding a node computes the first topology
//! version directly (no migration: there is no data to move) and the node becomes `active` at once.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use pairdb_core::quorum::Consistency;
use pairdb_core::ring::{Assignment, NodeId, NodeSpec};
use pairdb_core::token::PartitionCount;
use pairdb_core::validation::{
    self, DEFAULT_MAX_SIBLINGS, DEFAULT_MAX_VALUE_BYTES, DEFAULT_REPLICATION_FACTOR, MAX_REPLICATION_FACTOR,
};
use pairdb_proto::storage::v1 as storage_pb;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::error::MetaError;
use crate::model::{
    ApiKey, ConflictMode, KeyGroups, Membership, Migration, MigrationChange, MigrationKind,
    MigrationProgress, MigrationState, NodeRebuild, NodeStats, StorageNode, Tenant, TenantState, Topology,
    Usage,
};
use crate::persistence::{ChangeKind, MetaState, Store, Tx, hex};
use crate::view::WatchSource;

mod nodes;
mod tenants;

/// Largest node weight.
pub const MAX_NODE_WEIGHT: u32 = 1000;
const MAX_DESCRIPTION_CHARS: usize = 256;
const MAX_ZONE_CHARS: usize = 64;
const MAX_ADDRESS_CHARS: usize = 255;

/// Settings of the operations (from the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    pub auto_add_nodes: bool,
    pub heartbeat_interval_ms: u32,
    pub node_down_after_ms: u64,
    /// A node whose reported clock offset to meta is beyond this, either way, is reported
    /// `clock_skewed` (and logged once when it crosses).
    pub max_clock_offset_ms: u64,
    /// Partitions a migration moves concurrently (at least 1).
    pub migration_parallelism: usize,
    /// How meta reaches storage nodes (migrations, rebuilds): TLS and meta's cluster credential.
    pub storage_clients: pairdb_service::clients::InternalClients,
    /// Signs cluster credentials; `None` when the cluster runs with `--insecure-cluster`.
    pub signer: Option<Arc<pairdb_service::cluster_auth::Signer>>,
}

/// A tenant to create. Zero / `None` fields take the defaults.
#[derive(Debug, Clone, Default)]
pub struct NewTenant {
    pub tenant_id: String,
    pub replication_factor: u32,
    pub default_consistency: Option<Consistency>,
    pub conflict_mode: Option<ConflictMode>,
    /// Fixed for the tenant's life (there is no patch for it); `None` = [`KeyGroups::None`].
    pub key_groups: Option<KeyGroups>,
    pub rate_limit_ops_per_sec: u32,
    pub rate_limit_burst: u32,
    pub max_value_bytes: u64,
    pub max_siblings: u32,
    pub strict_quorum: bool,
    /// Quotas; 0 = none.
    pub max_keys: u64,
    pub max_bytes: u64,
    /// Value expiry in ms; 0 = none (never expires, no cap).
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
}

/// Changes to a tenant; `None` leaves a field as it is. `key_groups` cannot change (it decides where
/// every key lives), so it has no field here.
#[derive(Debug, Clone, Default)]
pub struct TenantPatch {
    pub replication_factor: Option<u32>,
    pub default_consistency: Option<Consistency>,
    pub conflict_mode: Option<ConflictMode>,
    pub rate_limit_ops_per_sec: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    pub max_value_bytes: Option<u64>,
    pub max_siblings: Option<u32>,
    pub strict_quorum: Option<bool>,
    /// `Some(0)` removes the quota.
    pub max_keys: Option<u64>,
    pub max_bytes: Option<u64>,
    /// `Some(0)` removes the default expiry (or the cap).
    pub default_ttl_ms: Option<u64>,
    pub max_ttl_ms: Option<u64>,
}

/// A node to add. `weight` 0 means 1.
#[derive(Debug, Clone, Default)]
pub struct NewNode {
    /// `None` picks the next free id.
    pub node_id: Option<NodeId>,
    pub address: String,
    pub zone: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Default)]
pub struct NodePatch {
    pub weight: Option<u32>,
    pub zone: Option<String>,
}

/// A node with whether (and where) the current topology places data on it, how old its last
/// heartbeat is and whether its clock is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub node: StorageNode,
    pub in_ring: bool,
    /// Its last reported clock offset is beyond [`Settings::max_clock_offset_ms`].
    pub clock_skewed: bool,
    /// How many partitions of the current topology have the node at each list position (index 0 =
    /// first; empty when it is in no list): a tenant with replication factor N keeps the sum of the
    /// first N on it, which is how operators read its ownership share.
    pub partitions_at_position: Vec<u32>,
    /// Age of its last heartbeat by meta's clock when the view was made; `None` before the first.
    pub heartbeat_age_ms: Option<u64>,
}

impl NodeView {
    pub fn new(node: StorageNode, positions: &RingPositions, max_clock_offset_ms: u64, now_ms: u64) -> Self {
        let clock_skewed = node.stats.clock_skewed(max_clock_offset_ms);
        let partitions_at_position = positions.get(&node.node_id).cloned().unwrap_or_default();
        let heartbeat_age_ms =
            (node.last_heartbeat_ms != 0).then(|| now_ms.saturating_sub(node.last_heartbeat_ms));
        NodeView {
            in_ring: partitions_at_position.iter().any(|count| *count > 0),
            node,
            clock_skewed,
            partitions_at_position,
            heartbeat_age_ms,
        }
    }
}

/// Node → partitions of the current topology holding it at each list position.
pub type RingPositions = std::collections::BTreeMap<NodeId, Vec<u32>>;

/// What a storage node's heartbeat reports besides its stats.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeartbeatReport<'a> {
    /// Deleted tenants (id, purge sequence) whose records and hints the node purged.
    pub purged_tenants: &'a [(String, u64)],
    /// The node's share of every tenant's usage, on the heartbeats that carry a usage report.
    pub usage: Option<&'a [(String, Usage)]>,
    /// The change-log revision of the view the node's last complete unowned-data deletion ran from
    /// (0 = none since it started).
    pub unowned_cleanup_revision: u64,
}

/// What meta answers a storage node's heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// `false`: the node is unknown (e.g. removed) and should register again.
    pub known: bool,
    /// Meta's wall clock (ms since the Unix epoch) halfway through handling the heartbeat: the node
    /// estimates its clock offset from it and the round trip it measured, as NTP does from a
    /// server's receive and transmit times.
    pub meta_unix_ms: u64,
}

/// A storage process announcing itself.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// `None`: the process does not know its id yet (auto-add picks one).
    pub node_id: Option<NodeId>,
    pub address: String,
    pub zone: String,
    pub weight: u32,
    pub actor_id: u64,
    pub data_format_version: u32,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    view: Arc<WatchSource>,
    settings: Settings,
    partitions: OnceLock<PartitionCount>,
    initialized: AtomicBool,
    orchestrator_wake: Notify,
    quota_wake: Notify,
    /// This replica's heartbeats only.
    skewed_nodes: Mutex<SkewedNodes>,
}

/// The nodes whose last measured clock offset was beyond the bound, so a crossing is logged once
/// rather than with every heartbeat.
#[derive(Debug, Default)]
struct SkewedNodes(BTreeSet<NodeId>);

impl SkewedNodes {
    /// Records a node's latest verdict: `Some(skewed)` when it crossed the bound (either way) since
    /// the last one, `None` when nothing changed. A node first seen within the bound is no crossing.
    fn crossed(&mut self, node_id: NodeId, skewed: bool) -> Option<bool> {
        let changed = if skewed { self.0.insert(node_id) } else { self.0.remove(&node_id) };
        changed.then_some(skewed)
    }
}

/// The metadata service's operations (cheap to clone).
#[derive(Debug, Clone)]
pub struct Meta {
    inner: Arc<Inner>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Meta {
    pub fn new(store: Store, view: Arc<WatchSource>, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                view,
                settings,
                partitions: OnceLock::new(),
                initialized: AtomicBool::new(false),
                orchestrator_wake: Notify::new(),
                quota_wake: Notify::new(),
                skewed_nodes: Mutex::new(SkewedNodes::default()),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn view(&self) -> &Arc<WatchSource> {
        &self.inner.view
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Records that the database is migrated and the cluster exists.
    pub fn mark_initialized(&self, state: &MetaState) {
        let _ = self.inner.partitions.set(state.partition_count);
        self.inner.initialized.store(true, Ordering::Release);
    }

    pub fn is_initialized(&self) -> bool {
        self.inner.initialized.load(Ordering::Acquire)
    }

    /// Wakes the migration orchestrator (after queueing or cancelling a migration).
    pub fn orchestrator_wake(&self) -> &Notify {
        &self.inner.orchestrator_wake
    }

    /// Wakes the leader's quota evaluation (after a tenant's quotas changed).
    pub fn quota_wake(&self) -> &Notify {
        &self.inner.quota_wake
    }

    fn partitions(&self) -> Result<PartitionCount, MetaError> {
        match (self.is_initialized(), self.inner.partitions.get()) {
            (true, Some(partitions)) => Ok(*partitions),
            _ => {
                Err(MetaError::DatabaseUnavailable("the metadata database is not initialized yet".to_owned()))
            }
        }
    }

    pub(crate) async fn write(&self) -> Result<(Tx, u64), MetaError> {
        self.partitions()?;
        let now = now_ms();
        let mut tx = self.inner.store.write().await?;
        tx.set_now(now);
        Ok((tx, now))
    }

    pub(crate) async fn read(&self) -> Result<Tx, MetaError> {
        self.partitions()?;
        Ok(self.inner.store.read().await?)
    }

    // ---- tenants ----------------------------------------------------------------------------

    // ---- api keys ---------------------------------------------------------------------------

    // ---- storage nodes ----------------------------------------------------------------------

    // ---- migrations -------------------------------------------------------------------------

    pub async fn get_migration(&self, migration_id: &str) -> Result<Migration, MetaError> {
        let mut tx = self.read().await?;
        let migration = tx.get_migration(migration_id).await?;
        tx.commit().await?;
        migration.ok_or_else(|| MetaError::MigrationNotFound(migration_id.to_owned()))
    }

    /// Every migration, newest first.
    pub async fn list_migrations(&self) -> Result<Vec<Migration>, MetaError> {
        let mut tx = self.read().await?;
        let migrations = tx.list_migrations().await?;
        tx.commit().await?;
        Ok(migrations)
    }

    /// Cancels a pending or running migration: its pending topology is discarded and what it changed
    /// (node lifecycle, replication factor, weight) is restored. Cancelling a cancelled migration
    /// returns it unchanged; a completed or failed one is MIGRATION_FINISHED.
    pub async fn cancel_migration(&self, migration_id: &str) -> Result<Migration, MetaError> {
        let (mut tx, now) = self.write().await?;
        let mut migration = tx
            .get_migration(migration_id)
            .await?
            .ok_or_else(|| MetaError::MigrationNotFound(migration_id.to_owned()))?;
        match migration.state {
            MigrationState::Cancelled => {
                tx.commit().await?;
                return Ok(migration);
            }
            MigrationState::Completed | MigrationState::Failed => {
                return Err(MetaError::MigrationFinished {
                    migration_id: migration_id.to_owned(),
                    state: migration.state.as_str(),
                });
            }
            MigrationState::Pending | MigrationState::Running => {}
        }
        abandon(&mut tx, &mut migration, MigrationState::Cancelled, "cancelled by an operator", now).await?;
        tx.commit().await?;
        tracing::info!(
            migration = migration_id,
            kind = migration.change.kind().as_str(),
            "migration cancelled"
        );
        self.inner.orchestrator_wake.notify_one();
        Ok(migration)
    }

    // ---- cluster API ------------------------------------------------------------------------
}

/// Rejects N outside 1..=7.
pub(crate) fn check_replication_factor_range(n: u32) -> Result<(), MetaError> {
    validation::validate_replication_factor(n as usize).map_err(|_| MetaError::InvalidReplicationFactor {
        requested: n,
        active_nodes: None,
        why: format!("must be between 1 and {MAX_REPLICATION_FACTOR}"),
    })
}

/// Rejects N above the number of active nodes in the ring (N distinct replicas need N nodes).
async fn check_replication_factor_fits(tx: &mut Tx, n: u32) -> Result<(), MetaError> {
    let active = tx.list_nodes().await?.iter().filter(|node| node.membership == Membership::Active).count();
    if n as usize > active {
        return Err(MetaError::InvalidReplicationFactor {
            requested: n,
            active_nodes: Some(active),
            why: format!("the ring has only {active} active storage node(s)"),
        });
    }
    Ok(())
}

/// Validates a tenant's limits and fills the burst default (= the rate).
fn normalize_limits(tenant: &mut Tenant) -> Result<(), MetaError> {
    validation::validate_max_value_bytes(tenant.max_value_bytes)
        .map_err(|e| MetaError::InvalidArgument(format!("max_value_bytes: {e}")))?;
    validation::validate_max_siblings(tenant.max_siblings as usize)
        .map_err(|e| MetaError::InvalidArgument(format!("max_siblings: {e}")))?;
    // Checked on the settings as they will be stored, so an update of one of the two is checked
    // against the other's current value.
    validation::validate_ttl_settings(tenant.default_ttl_ms, tenant.max_ttl_ms)
        .map_err(|e| MetaError::InvalidArgument(e.to_string()))?;
    // Stored as BIGINT: a larger quota could not be read back as it was set.
    for (name, quota) in [("max_keys", tenant.max_keys), ("max_bytes", tenant.max_bytes)] {
        if i64::try_from(quota).is_err() {
            return Err(MetaError::InvalidArgument(format!("{name}: at most {} (0 = no quota)", i64::MAX)));
        }
    }
    if tenant.rate_limit_ops_per_sec == 0 {
        tenant.rate_limit_burst = 0;
    } else if tenant.rate_limit_burst == 0 {
        tenant.rate_limit_burst = tenant.rate_limit_ops_per_sec;
    }
    Ok(())
}

fn check_node_fields(address: &str, zone: &str, weight: u32) -> Result<(), MetaError> {
    if !(1..=MAX_NODE_WEIGHT).contains(&weight) {
        return Err(MetaError::InvalidNode(format!("weight must be between 1 and {MAX_NODE_WEIGHT}")));
    }
    if zone.chars().count() > MAX_ZONE_CHARS || zone.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(MetaError::InvalidNode(format!(
            "zone must be at most {MAX_ZONE_CHARS} characters without whitespace"
        )));
    }
    if !address.is_empty() {
        let valid = address.len() <= MAX_ADDRESS_CHARS
            && address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            && !address.chars().any(|c| c.is_whitespace() || c.is_control());
        if !valid {
            return Err(MetaError::InvalidNode(format!("address {address:?} is not host:port")));
        }
    }
    Ok(())
}

/// A new pending migration of `kind` at the end of the queue.
async fn new_migration(tx: &mut Tx, change: MigrationChange, now: u64) -> Result<Migration, MetaError> {
    let seq = tx.next_migration_seq().await?;
    let suffix: u32 = rand::rng().random();
    Ok(Migration {
        migration_id: format!("mig-{seq:06}-{suffix:08x}"),
        seq,
        change,
        state: MigrationState::Pending,
        from_epoch: 0,
        to_epoch: 0,
        progress: MigrationProgress::default(),
        done_bitmap: Vec::new(),
        error: String::new(),
        created_at_ms: now,
        updated_at_ms: now,
        started_at_ms: 0,
        finished_at_ms: 0,
    })
}

/// Ends an unfinished migration as `state` (cancelled or failed): discards its pending topology,
/// restores what it changed and marks the nodes it leaves holding data ([`crate::leftovers`]). The
/// caller commits.
pub(crate) async fn abandon(
    tx: &mut Tx,
    migration: &mut Migration,
    state: MigrationState,
    reason: &str,
    now: u64,
) -> Result<(), MetaError> {
    let leftovers =
        crate::leftovers::announce(tx, migration, pairdb_core::gc::leftovers::MigrationEnd::Abandoned)
            .await?;
    if migration.state == MigrationState::Running && migration.change.kind().changes_ring() {
        let meta_state = tx.meta_state().await?;
        if meta_state.pending_epoch != 0 && meta_state.pending_epoch == migration.to_epoch {
            tx.set_epochs(meta_state.current_epoch, 0).await?;
            tx.record_change(ChangeKind::TopologyPendingCleared, &migration.to_epoch.to_string()).await?;
        }
    }
    crate::lifecycle::settle(tx, migration, crate::lifecycle::Ending::Abandoned, now).await?;
    leftovers.stamp(tx, migration).await?;
    migration.state = state;
    migration.error = reason.to_owned();
    migration.finished_at_ms = now;
    migration.updated_at_ms = now;
    tx.update_migration(migration).await?;
    Ok(())
}

/// The ids of the nodes the current topology places data on.
pub(crate) async fn ring_nodes(tx: &mut Tx) -> Result<BTreeSet<NodeId>, MetaError> {
    let state = tx.meta_state().await?;
    if state.current_epoch == 0 {
        return Ok(Default::default());
    }
    let topology = tx.require_topology(state.current_epoch).await?;
    Ok(topology.assignment.nodes().into_iter().collect())
}

/// For every node of the current topology, how many partition lists hold it at each position.
pub(crate) async fn ring_positions(tx: &mut Tx) -> Result<RingPositions, MetaError> {
    let state = tx.meta_state().await?;
    if state.current_epoch == 0 {
        return Ok(Default::default());
    }
    let topology = tx.require_topology(state.current_epoch).await?;
    let assignment = &topology.assignment;
    let mut positions = RingPositions::new();
    for (_, list) in assignment.lists() {
        for (position, node) in list.iter().enumerate() {
            let counts = positions.entry(*node).or_insert_with(|| vec![0; assignment.list_len()]);
            counts[position] += 1;
        }
    }
    Ok(positions)
}

impl Meta {
    async fn node_view(&self, tx: &mut Tx, node: StorageNode) -> Result<NodeView, MetaError> {
        let positions = ring_positions(tx).await?;
        Ok(NodeView::new(node, &positions, self.inner.settings.max_clock_offset_ms, now_ms()))
    }
}

/// Runs the (CPU-bound) assignment computation off the async runtime.
pub(crate) async fn compute_assignment(
    previous: Option<Arc<Assignment>>,
    specs: Vec<NodeSpec>,
    partitions: PartitionCount,
) -> Result<Assignment, MetaError> {
    tokio::task::spawn_blocking(move || Assignment::compute(previous.as_deref(), &specs, partitions))
        .await
        .map_err(|e| MetaError::Internal(format!("assignment task failed: {e}")))?
        .map_err(|e| MetaError::InvalidNode(format!("cannot place partitions: {e}")))
}

/// A new key id and secret: `pdb_<key_id>_<48 hex chars of randomness>` (192 random bits).
fn generate_secret() -> (String, String) {
    let mut rng = rand::rng();
    let id_bytes: [u8; 8] = rng.random();
    let secret_bytes: [u8; 24] = rng.random();
    let key_id = hex(&id_bytes);
    let secret = format!("pdb_{key_id}_{}", hex(&secret_bytes));
    (key_id, secret)
}

/// What is stored for a secret (and what routers compare against): lowercase hex SHA-256.
pub fn secret_sha256(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_skew_crossing_is_reported_once_each_way() {
        let mut skewed = SkewedNodes::default();
        let (one, two) = (NodeId(1), NodeId(2));
        assert_eq!(skewed.crossed(one, false), None, "first seen within the bound");
        assert_eq!(skewed.crossed(one, true), Some(true));
        assert_eq!(skewed.crossed(one, true), None, "still skewed: not again");
        assert_eq!(skewed.crossed(two, true), Some(true), "per node");
        assert_eq!(skewed.crossed(one, false), Some(false), "back within the bound");
        assert_eq!(skewed.crossed(one, false), None);
        assert_eq!(skewed.crossed(one, true), Some(true), "a new crossing is reported again");
    }
}
