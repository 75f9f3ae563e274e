//! Domain types of the metadata service: what the persistence layer stores, the admin and cluster
//! logic decides on, and the watch stream publishes. Wire types (protobuf, JSON) are converted to and
//! from these at the service edge (`grpc`, `http`) and never travel further in.

use std::sync::Arc;

use pairdb_core::quorum::Consistency;
use pairdb_core::ring::{Assignment, NodeId, NodeSpec};
pub use pairdb_core::tenant::{ConflictMode, KeyGroups};
pub use pairdb_core::usage::Usage;

/// Where a tenant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TenantState {
    #[default]
    Active,
    /// Deleted by an operator; storage nodes are purging its data. The id cannot be reused until
    /// every node confirmed the purge (the row then goes).
    Deleting,
}

impl TenantState {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantState::Active => "active",
            TenantState::Deleting => "deleting",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(TenantState::Active),
            "deleting" => Some(TenantState::Deleting),
            _ => None,
        }
    }
}

/// A tenant's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub tenant_id: String,
    pub replication_factor: u32,
    /// While a replication_factor migration runs: the factor reads still use.
    pub previous_replication_factor: Option<u32>,
    pub default_consistency: Consistency,
    pub conflict_mode: ConflictMode,
    /// How keys are placed on the ring: chosen at creation and never changed (changing it would move
    /// every grouped key); a tenant deleted and created again may choose again.
    pub key_groups: KeyGroups,
    /// Sustained operations per second; 0 = unlimited.
    pub rate_limit_ops_per_sec: u32,
    pub rate_limit_burst: u32,
    pub max_value_bytes: u64,
    pub max_siblings: u32,
    pub strict_quorum: bool,
    /// Quotas on the tenant's live keys and value bytes (0 = none).
    pub max_keys: u64,
    pub max_bytes: u64,
    /// The leader's last evaluation of the tenant's usage against `max_keys` / `max_bytes`
    /// ([`crate::usage`]): while set, coordinators refuse writes that would grow the tenant. Written
    /// only by that evaluation, never by a settings update.
    pub over_key_quota: bool,
    pub over_byte_quota: bool,
    /// Value expiry (ms): what a write that asks for none gets (0 = never expires) and the longest
    /// expiry any write gets (0 = no cap). Routers stamp each write's expiry from these
    /// (`pairdb_core::expiry`); values already written keep theirs when they change.
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub state: TenantState,
    /// Which creation of this tenant id this is (unique over the cluster's life; 0 = unknown).
    pub generation: u64,
    /// While deleting: the deletion storage nodes confirm (0 otherwise).
    pub purge_seq: u64,
}

/// One storage node's latest share of one tenant's usage (the records of the partitions it is first
/// in the topology's list of), as its last report said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageShare {
    pub node_id: NodeId,
    pub tenant_id: String,
    pub usage: Usage,
    pub reported_at_ms: u64,
}

/// A tenant's usage: the shares of the current topology's nodes, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotal {
    pub usage: Usage,
    /// When the oldest report summed was made (0: no node of the current topology reported yet).
    pub reported_at_ms: u64,
    /// Nodes of the current topology that reported, of how many.
    pub nodes_reporting: u32,
    pub nodes_total: u32,
}

impl UsageTotal {
    /// How old the oldest report summed is at `now_ms` (0 when there is none).
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        if self.reported_at_ms == 0 { 0 } else { now_ms.saturating_sub(self.reported_at_ms) }
    }
}

/// A router as its last heartbeat left it (`RouterHeartbeat`; see [`crate::routers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterPresence {
    /// Random per router process: a restarted router is a new one, and the old row ages out.
    pub router_id: String,
    /// Where clients reach it (for operators; may be empty).
    pub address: String,
    /// When a meta replica last recorded a heartbeat from it (that replica's clock).
    pub last_seen_ms: u64,
}

/// How far a deleting tenant's purge got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeProgress {
    pub nodes_done: u32,
    pub nodes_total: u32,
    /// Nodes still to confirm (a down node confirms when it is back).
    pub waiting_node_ids: Vec<NodeId>,
}

/// A key routers seal client contexts with.
#[derive(Clone, PartialEq, Eq)]
pub struct ContextKeyRecord {
    pub key_id: u32,
    pub secret: Vec<u8>,
    pub created_at_ms: u64,
}

impl std::fmt::Debug for ContextKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextKeyRecord").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// The context keys in use: `current` seals, `previous` (if any) still opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextKeySet {
    pub current: Option<ContextKeyRecord>,
    pub previous: Option<ContextKeyRecord>,
}

/// An API key as stored: the secret itself is never kept, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub key_id: String,
    pub tenant_id: String,
    /// Lowercase hex SHA-256 of the whole secret string.
    pub secret_sha256: String,
    pub description: String,
    pub created_at_ms: u64,
    /// 0 = active.
    pub revoked_at_ms: u64,
}

impl ApiKey {
    pub fn revoked(&self) -> bool {
        self.revoked_at_ms != 0
    }
}

/// A node's lifecycle, driven by the admin API and migrations. Liveness is separate
/// ([`StorageNode::alive`]): a node can be active and down at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Added; becomes part of the ring when its add_node migration completes.
    Joining,
    Active,
    /// Being drained or force-removed by a migration; still in the ring until it completes.
    Leaving,
    /// Out of the cluster. The row is kept so the id is never silently reused.
    Removed,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Joining => "joining",
            Membership::Active => "active",
            Membership::Leaving => "leaving",
            Membership::Removed => "removed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "joining" => Some(Membership::Joining),
            "active" => Some(Membership::Active),
            "leaving" => Some(Membership::Leaving),
            "removed" => Some(Membership::Removed),
            _ => None,
        }
    }
}

/// The status reported to operators and subscribers: the membership, except that a node the failure
/// detector considers dead reports `Down` (unless it was removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    Joining,
    Active,
    Leaving,
    Down,
    Removed,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Joining => "joining",
            NodeStatus::Active => "active",
            NodeStatus::Leaving => "leaving",
            NodeStatus::Down => "down",
            NodeStatus::Removed => "removed",
        }
    }
}

/// The last stats a node reported with its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeStats {
    pub keys: u64,
    /// The storage engine's files on disk (reported as `live_bytes` by nodes older than the name).
    pub disk_bytes: u64,
    /// Bytes of the live values the node holds (its usage accounting); 0 from older nodes.
    pub live_value_bytes: u64,
    pub disk_free_bytes: u64,
    pub hints_pending: u64,
    pub write_path_poisoned: bool,
    /// Records the node quarantined because they did not decode.
    pub quarantined_records: u64,
    /// How far the node's wall clock is ahead of meta's (negative: behind), in ms, as the node
    /// measured it over a heartbeat round trip; `None` until it has measured one.
    pub clock_offset_ms: Option<i64>,
}

impl NodeStats {
    /// The node's reported clock offset is beyond `max_offset_ms` either way. An unknown offset is
    /// not skewed: nothing says it is.
    pub fn clock_skewed(&self, max_offset_ms: u64) -> bool {
        self.clock_offset_ms.is_some_and(|offset| pairdb_core::clock::skewed(offset, max_offset_ms))
    }
}

/// A storage node's rebuild as the node reports it (relayed, never stored: the node owns it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRebuild {
    pub node_id: NodeId,
    /// "idle" (none since the node started), "running" or "done".
    pub state: &'static str,
    pub partitions_total: u64,
    pub partitions_done: u64,
    pub keys_compared: u64,
    pub keys_repaired: u64,
    pub bytes: u64,
    /// (partition, peer) exchanges that failed or were skipped because the peer was down.
    pub failed_exchanges: u64,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageNode {
    pub node_id: NodeId,
    /// `host:port` the node serves on; empty until the node registers when added without one.
    pub address: String,
    /// Empty = no zone.
    pub zone: String,
    pub weight: u32,
    pub membership: Membership,
    pub alive: bool,
    pub last_heartbeat_ms: u64,
    pub actor_id: u64,
    /// The actor id of the data directory the node had when it was removed (0 = none): a re-added
    /// node must not come back with that stale directory.
    pub retired_actor_id: u64,
    pub data_format_version: u32,
    pub stats: NodeStats,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The change-log revision from which the node holds records of partitions a migration took from
    /// it (0 = none known; `pairdb_core::gc::leftovers`).
    pub leftovers_since_revision: u64,
    /// The revision of the view the node's last reported complete unowned-data deletion ran from.
    pub leftovers_cleaned_revision: u64,
}

impl StorageNode {
    pub fn status(&self) -> NodeStatus {
        match self.membership {
            Membership::Removed => NodeStatus::Removed,
            _ if !self.alive => NodeStatus::Down,
            Membership::Joining => NodeStatus::Joining,
            Membership::Active => NodeStatus::Active,
            Membership::Leaving => NodeStatus::Leaving,
        }
    }

    /// The node may hold records that missed deletes, of partitions it no longer owns: tombstone GC
    /// waits (a removed node never comes back with its data directory).
    pub fn holds_unowned_leftovers(&self) -> bool {
        self.membership != Membership::Removed
            && self.leftovers_since_revision > self.leftovers_cleaned_revision
    }

    /// The node as placement sees it.
    pub fn spec(&self) -> NodeSpec {
        let spec = NodeSpec::new(self.node_id, self.weight.max(1));
        if self.zone.is_empty() { spec } else { spec.with_zone(self.zone.clone()) }
    }
}

/// One topology version: an epoch and its partition assignment. Immutable once stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub epoch: u64,
    pub assignment: Arc<Assignment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationKind {
    AddNode,
    DrainNode,
    RemoveNode,
    ReplicationFactor,
    NodeWeight,
}

impl MigrationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationKind::AddNode => "add_node",
            MigrationKind::DrainNode => "drain_node",
            MigrationKind::RemoveNode => "remove_node",
            MigrationKind::ReplicationFactor => "replication_factor",
            MigrationKind::NodeWeight => "node_weight",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "add_node" => Some(MigrationKind::AddNode),
            "drain_node" => Some(MigrationKind::DrainNode),
            "remove_node" => Some(MigrationKind::RemoveNode),
            "replication_factor" => Some(MigrationKind::ReplicationFactor),
            "node_weight" => Some(MigrationKind::NodeWeight),
            _ => None,
        }
    }

    /// Whether the migration changes the ring (and so produces a pending topology version).
    pub fn changes_ring(self) -> bool {
        !matches!(self, MigrationKind::ReplicationFactor)
    }
}

/// pending → running → completed | failed | cancelled (pending → cancelled too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Running => "running",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(MigrationState::Pending),
            "running" => Some(MigrationState::Running),
            "completed" => Some(MigrationState::Completed),
            "failed" => Some(MigrationState::Failed),
            "cancelled" => Some(MigrationState::Cancelled),
            _ => None,
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigrationProgress {
    pub partitions_total: u64,
    pub partitions_done: u64,
    pub keys_total: u64,
    pub keys_done: u64,
    pub bytes_done: u64,
}

/// What a migration changes; each kind carries exactly its own fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationChange {
    /// A node joins the ring with `weight`.
    AddNode { node_id: NodeId, weight: u32 },
    /// A node leaves the ring after its data moved to the remaining nodes.
    DrainNode { node_id: NodeId },
    /// A node leaves at once (it may be dead); survivors re-replicate.
    RemoveNode { node_id: NodeId },
    /// A node's weight changes; `from` is restored if the migration is abandoned.
    NodeWeight { node_id: NodeId, from: u32, to: u32 },
    /// A tenant's replication factor changes; `from` is served until it completes.
    ReplicationFactor { tenant_id: String, from: u32, to: u32 },
}

impl MigrationChange {
    pub fn kind(&self) -> MigrationKind {
        match self {
            MigrationChange::AddNode { .. } => MigrationKind::AddNode,
            MigrationChange::DrainNode { .. } => MigrationKind::DrainNode,
            MigrationChange::RemoveNode { .. } => MigrationKind::RemoveNode,
            MigrationChange::NodeWeight { .. } => MigrationKind::NodeWeight,
            MigrationChange::ReplicationFactor { .. } => MigrationKind::ReplicationFactor,
        }
    }

    /// The node the change is about, if any.
    pub fn node_id(&self) -> Option<NodeId> {
        match self {
            MigrationChange::AddNode { node_id, .. }
            | MigrationChange::DrainNode { node_id }
            | MigrationChange::RemoveNode { node_id }
            | MigrationChange::NodeWeight { node_id, .. } => Some(*node_id),
            MigrationChange::ReplicationFactor { .. } => None,
        }
    }

    /// The tenant whose replication factor changes, if that is the change.
    pub fn tenant_id(&self) -> Option<&str> {
        match self {
            MigrationChange::ReplicationFactor { tenant_id, .. } => Some(tenant_id),
            _ => None,
        }
    }

    /// The flat shape stored in the `migrations` table and sent on the wire: (node id or 0, tenant id
    /// or "", value before, value after).
    pub fn to_row(&self) -> MigrationRow<'_> {
        let (node_id, tenant_id, old_value, new_value) = match self {
            MigrationChange::AddNode { node_id, weight } => (node_id.0, "", 0, *weight),
            MigrationChange::DrainNode { node_id } | MigrationChange::RemoveNode { node_id } => {
                (node_id.0, "", 0, 0)
            }
            MigrationChange::NodeWeight { node_id, from, to } => (node_id.0, "", *from, *to),
            MigrationChange::ReplicationFactor { tenant_id, from, to } => (0, tenant_id.as_str(), *from, *to),
        };
        MigrationRow {
            kind: self.kind(),
            node_id,
            tenant_id,
            old_value: u64::from(old_value),
            new_value: u64::from(new_value),
        }
    }

    /// The change a stored row describes (the inverse of [`Self::to_row`]).
    pub fn from_row(row: MigrationRow<'_>) -> Self {
        let value = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let (node_id, from, to) = (NodeId(row.node_id), value(row.old_value), value(row.new_value));
        match row.kind {
            MigrationKind::AddNode => MigrationChange::AddNode { node_id, weight: to },
            MigrationKind::DrainNode => MigrationChange::DrainNode { node_id },
            MigrationKind::RemoveNode => MigrationChange::RemoveNode { node_id },
            MigrationKind::NodeWeight => MigrationChange::NodeWeight { node_id, from, to },
            MigrationKind::ReplicationFactor => {
                MigrationChange::ReplicationFactor { tenant_id: row.tenant_id.to_owned(), from, to }
            }
        }
    }
}

/// A migration's change in the flat shape of its table row and wire message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationRow<'a> {
    pub kind: MigrationKind,
    /// 0 when the change names no node.
    pub node_id: u32,
    pub tenant_id: &'a str,
    pub old_value: u64,
    pub new_value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub migration_id: String,
    /// Queue position: migrations start in `seq` order, one at a time.
    pub seq: u64,
    /// What the migration changes (what completing and abandoning it does: [`crate::lifecycle`]).
    pub change: MigrationChange,
    pub state: MigrationState,
    pub from_epoch: u64,
    pub to_epoch: u64,
    pub progress: MigrationProgress,
    /// One bit per partition whose transfers are done (resumption after a leader change).
    pub done_bitmap: Vec<u8>,
    pub error: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

impl Migration {
    pub fn partition_done(&self, partition: u32) -> bool {
        let byte = (partition / 8) as usize;
        self.done_bitmap.get(byte).is_some_and(|b| b & (1 << (partition % 8)) != 0)
    }

    pub fn mark_partition_done(&mut self, partition: u32) {
        let byte = (partition / 8) as usize;
        if self.done_bitmap.len() <= byte {
            self.done_bitmap.resize(byte + 1, 0);
        }
        self.done_bitmap[byte] |= 1 << (partition % 8);
    }
}

/// An API key as routers need it: enough to check a presented secret, nothing to recover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyHash {
    pub key_id: String,
    pub tenant_id: String,
    pub secret_sha256: String,
}

impl From<&ApiKey> for ApiKeyHash {
    fn from(key: &ApiKey) -> Self {
        Self {
            key_id: key.key_id.clone(),
            tenant_id: key.tenant_id.clone(),
            secret_sha256: key.secret_sha256.clone(),
        }
    }
}
