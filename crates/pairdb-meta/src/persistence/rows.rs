//! Row shapes of the tables (as both backends return them) and their conversion to domain types.

use super::*;

#[derive(sqlx::FromRow)]
pub(super) struct TenantRow {
    tenant_id: String,
    replication_factor: i64,
    previous_replication_factor: i64,
    default_consistency: String,
    conflict_mode: String,
    key_groups: String,
    rate_limit_ops_per_sec: i64,
    rate_limit_burst: i64,
    max_value_bytes: i64,
    max_siblings: i64,
    strict_quorum: bool,
    max_keys: i64,
    max_bytes: i64,
    over_key_quota: bool,
    over_byte_quota: bool,
    default_ttl_ms: i64,
    max_ttl_ms: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    state: String,
    generation: i64,
    purge_seq: i64,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = PersistenceError;

    fn try_from(row: TenantRow) -> Result<Self, Self::Error> {
        let default_consistency = Consistency::parse(&row.default_consistency)
            .ok_or_else(|| corrupt("tenants.default_consistency", &row.default_consistency))?;
        let conflict_mode = ConflictMode::parse(&row.conflict_mode)
            .ok_or_else(|| corrupt("tenants.conflict_mode", &row.conflict_mode))?;
        let key_groups = KeyGroups::parse(&row.key_groups)
            .ok_or_else(|| corrupt("tenants.key_groups", &row.key_groups))?;
        let state = TenantState::parse(&row.state).ok_or_else(|| corrupt("tenants.state", &row.state))?;
        Ok(Tenant {
            state,
            generation: to_u64(row.generation),
            purge_seq: to_u64(row.purge_seq),
            replication_factor: to_u32(row.replication_factor, "tenants.replication_factor")?,
            // Stored as 0 for "none" (the column predates NULL-able settings).
            previous_replication_factor: Some(to_u32(
                row.previous_replication_factor,
                "tenants.previous_replication_factor",
            )?)
            .filter(|&n| n != 0),
            default_consistency,
            conflict_mode,
            key_groups,
            rate_limit_ops_per_sec: to_u32(row.rate_limit_ops_per_sec, "tenants.rate_limit_ops_per_sec")?,
            rate_limit_burst: to_u32(row.rate_limit_burst, "tenants.rate_limit_burst")?,
            max_value_bytes: to_u64(row.max_value_bytes),
            max_siblings: to_u32(row.max_siblings, "tenants.max_siblings")?,
            strict_quorum: row.strict_quorum,
            max_keys: to_u64(row.max_keys),
            max_bytes: to_u64(row.max_bytes),
            over_key_quota: row.over_key_quota,
            over_byte_quota: row.over_byte_quota,
            default_ttl_ms: to_u64(row.default_ttl_ms),
            max_ttl_ms: to_u64(row.max_ttl_ms),
            created_at_ms: to_u64(row.created_at_ms),
            updated_at_ms: to_u64(row.updated_at_ms),
            tenant_id: row.tenant_id,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct UsageShareRow {
    node_id: i64,
    tenant_id: String,
    keys: i64,
    value_bytes: i64,
    siblings: i64,
    tombstones: i64,
    reported_at_ms: i64,
}

impl TryFrom<UsageShareRow> for UsageShare {
    type Error = PersistenceError;

    fn try_from(row: UsageShareRow) -> Result<Self, Self::Error> {
        Ok(UsageShare {
            node_id: NodeId(to_u32(row.node_id, "tenant_usage.node_id")?),
            usage: Usage {
                keys: to_u64(row.keys),
                value_bytes: to_u64(row.value_bytes),
                siblings: to_u64(row.siblings),
                tombstones: to_u64(row.tombstones),
            },
            reported_at_ms: to_u64(row.reported_at_ms),
            tenant_id: row.tenant_id,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    key_id: String,
    tenant_id: String,
    secret_sha256: String,
    description: String,
    created_at_ms: i64,
    revoked_at_ms: i64,
}

impl From<ApiKeyRow> for ApiKey {
    fn from(row: ApiKeyRow) -> Self {
        ApiKey {
            key_id: row.key_id,
            tenant_id: row.tenant_id,
            secret_sha256: row.secret_sha256,
            description: row.description,
            created_at_ms: to_u64(row.created_at_ms),
            revoked_at_ms: to_u64(row.revoked_at_ms),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct NodeRow {
    node_id: i64,
    address: String,
    zone: String,
    weight: i64,
    membership: String,
    alive: bool,
    last_heartbeat_ms: i64,
    actor_id: i64,
    data_format_version: i64,
    stats_keys: i64,
    /// The engine's size on disk (the column keeps the name it had when it was thought to be live
    /// bytes: previous-release replicas sharing the database during an upgrade use it).
    stats_live_bytes: i64,
    stats_live_value_bytes: i64,
    stats_disk_free_bytes: i64,
    stats_hints_pending: i64,
    stats_write_path_poisoned: bool,
    stats_quarantined_records: i64,
    stats_clock_offset_ms: i64,
    stats_clock_offset_known: bool,
    retired_actor_id: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    leftovers_since_revision: i64,
    leftovers_cleaned_revision: i64,
}

impl TryFrom<NodeRow> for StorageNode {
    type Error = PersistenceError;

    fn try_from(row: NodeRow) -> Result<Self, Self::Error> {
        let membership = Membership::parse(&row.membership)
            .ok_or_else(|| corrupt("storage_nodes.membership", &row.membership))?;
        Ok(StorageNode {
            node_id: NodeId(to_u32(row.node_id, "storage_nodes.node_id")?),
            address: row.address,
            zone: row.zone,
            weight: to_u32(row.weight, "storage_nodes.weight")?,
            membership,
            alive: row.alive,
            last_heartbeat_ms: to_u64(row.last_heartbeat_ms),
            actor_id: u64::from_be_bytes(row.actor_id.to_be_bytes()),
            retired_actor_id: u64::from_be_bytes(row.retired_actor_id.to_be_bytes()),
            data_format_version: to_u32(row.data_format_version, "storage_nodes.data_format_version")?,
            stats: NodeStats {
                keys: to_u64(row.stats_keys),
                disk_bytes: to_u64(row.stats_live_bytes),
                live_value_bytes: to_u64(row.stats_live_value_bytes),
                disk_free_bytes: to_u64(row.stats_disk_free_bytes),
                hints_pending: to_u64(row.stats_hints_pending),
                write_path_poisoned: row.stats_write_path_poisoned,
                quarantined_records: to_u64(row.stats_quarantined_records),
                clock_offset_ms: row.stats_clock_offset_known.then_some(row.stats_clock_offset_ms),
            },
            created_at_ms: to_u64(row.created_at_ms),
            updated_at_ms: to_u64(row.updated_at_ms),
            leftovers_since_revision: to_u64(row.leftovers_since_revision),
            leftovers_cleaned_revision: to_u64(row.leftovers_cleaned_revision),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct TopologyRow {
    epoch: i64,
    partition_count: i64,
    token_format_version: i64,
    assignment: Vec<u8>,
}

impl TryFrom<TopologyRow> for Topology {
    type Error = PersistenceError;

    fn try_from(row: TopologyRow) -> Result<Self, Self::Error> {
        if row.token_format_version != i64::from(TOKEN_FORMAT_VERSION) {
            return Err(PersistenceError::Corrupt(format!(
                "topology {} uses token format {}, this build knows {TOKEN_FORMAT_VERSION}",
                row.epoch, row.token_format_version
            )));
        }
        let assignment = decode_assignment(&row.assignment)?;
        if i64::from(assignment.partition_count().get()) != row.partition_count {
            return Err(corrupt("topology_versions.partition_count", &row.partition_count.to_string()));
        }
        Ok(Topology { epoch: to_u64(row.epoch), assignment: Arc::new(assignment) })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct MigrationRow {
    migration_id: String,
    seq: i64,
    kind: String,
    state: String,
    node_id: i64,
    tenant_id: String,
    old_value: i64,
    new_value: i64,
    from_epoch: i64,
    to_epoch: i64,
    partitions_total: i64,
    partitions_done: i64,
    keys_total: i64,
    keys_done: i64,
    bytes_done: i64,
    done_bitmap: Vec<u8>,
    error: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    started_at_ms: i64,
    finished_at_ms: i64,
}

impl TryFrom<MigrationRow> for Migration {
    type Error = PersistenceError;

    fn try_from(row: MigrationRow) -> Result<Self, Self::Error> {
        let kind = MigrationKind::parse(&row.kind).ok_or_else(|| corrupt("migrations.kind", &row.kind))?;
        let change = MigrationChange::from_row(crate::model::MigrationRow {
            kind,
            node_id: to_u32(row.node_id, "migrations.node_id")?,
            tenant_id: &row.tenant_id,
            old_value: to_u64(row.old_value),
            new_value: to_u64(row.new_value),
        });
        let state =
            MigrationState::parse(&row.state).ok_or_else(|| corrupt("migrations.state", &row.state))?;
        Ok(Migration {
            migration_id: row.migration_id,
            seq: to_u64(row.seq),
            change,
            state,
            from_epoch: to_u64(row.from_epoch),
            to_epoch: to_u64(row.to_epoch),
            progress: MigrationProgress {
                partitions_total: to_u64(row.partitions_total),
                partitions_done: to_u64(row.partitions_done),
                keys_total: to_u64(row.keys_total),
                keys_done: to_u64(row.keys_done),
                bytes_done: to_u64(row.bytes_done),
            },
            done_bitmap: row.done_bitmap,
            error: row.error,
            created_at_ms: to_u64(row.created_at_ms),
            updated_at_ms: to_u64(row.updated_at_ms),
            started_at_ms: to_u64(row.started_at_ms),
            finished_at_ms: to_u64(row.finished_at_ms),
        })
    }
}
