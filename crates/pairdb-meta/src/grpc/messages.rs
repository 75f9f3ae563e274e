//! Domain types ↔ protobuf messages of the admin and cluster APIs.

use super::*;

pub(super) fn consistency_from_pb(value: i32) -> Result<Option<Consistency>, MetaError> {
    convert::consistency_from_wire(value).map_err(|e| MetaError::InvalidArgument(e.to_string()))
}

pub(super) fn conflict_mode_from_pb(value: i32) -> Result<Option<ConflictMode>, MetaError> {
    convert::conflict_mode_from_wire(value).map_err(|e| MetaError::InvalidArgument(e.to_string()))
}

pub(super) fn key_groups_from_pb(value: i32) -> Result<Option<KeyGroups>, MetaError> {
    convert::key_groups_from_wire(value).map_err(|e| MetaError::InvalidArgument(e.to_string()))
}

pub(super) fn tenant_to_pb(view: &TenantView) -> admin_pb::Tenant {
    let tenant = &view.tenant;
    admin_pb::Tenant {
        state: tenant.state.as_str().to_owned(),
        purge: view.purge.as_ref().map(|p| admin_pb::TenantPurgeProgress {
            nodes_done: p.nodes_done,
            nodes_total: p.nodes_total,
            waiting_node_ids: p.waiting_node_ids.iter().map(|node| node.0).collect(),
        }),
        tenant_id: tenant.tenant_id.clone(),
        replication_factor: tenant.replication_factor,
        default_consistency: convert::consistency_to_wire(Some(tenant.default_consistency)),
        conflict_mode: convert::conflict_mode_to_wire(Some(tenant.conflict_mode)),
        key_groups: convert::key_groups_to_wire(Some(tenant.key_groups)),
        rate_limit_ops_per_sec: tenant.rate_limit_ops_per_sec,
        rate_limit_burst: tenant.rate_limit_burst,
        max_value_bytes: tenant.max_value_bytes,
        max_siblings: tenant.max_siblings,
        strict_quorum: tenant.strict_quorum,
        max_keys: tenant.max_keys,
        max_bytes: tenant.max_bytes,
        default_ttl_ms: tenant.default_ttl_ms,
        max_ttl_ms: tenant.max_ttl_ms,
        created_at_ms: tenant.created_at_ms,
        updated_at_ms: tenant.updated_at_ms,
    }
}

pub(super) fn usage_report_to_pb(
    tenant: &Tenant,
    total: &UsageTotal,
    now_ms: u64,
) -> admin_pb::TenantUsageReport {
    admin_pb::TenantUsageReport {
        usage: Some(usage_to_pb(&tenant.tenant_id, &total.usage)),
        reported_at_ms: total.reported_at_ms,
        age_ms: total.age_ms(now_ms),
        nodes_reporting: total.nodes_reporting,
        nodes_total: total.nodes_total,
        max_keys: tenant.max_keys,
        max_bytes: tenant.max_bytes,
        over_key_quota: tenant.over_key_quota,
        over_byte_quota: tenant.over_byte_quota,
    }
}

fn usage_to_pb(tenant_id: &str, usage: &Usage) -> admin_pb::TenantUsage {
    admin_pb::TenantUsage {
        tenant_id: tenant_id.to_owned(),
        keys: usage.keys,
        value_bytes: usage.value_bytes,
        siblings: usage.siblings,
        tombstones: usage.tombstones,
    }
}

/// A heartbeat's usage report: each tenant's share on the node.
pub(super) fn usage_from_pb(usage: Vec<admin_pb::TenantUsage>) -> Vec<(String, Usage)> {
    usage
        .into_iter()
        .map(|u| {
            let share = Usage {
                keys: u.keys,
                value_bytes: u.value_bytes,
                siblings: u.siblings,
                tombstones: u.tombstones,
            };
            (u.tenant_id, share)
        })
        .collect()
}

pub(super) fn tenant_config_to_pb(tenant: &Tenant) -> cluster_pb::TenantConfig {
    cluster_pb::TenantConfig {
        tenant_id: tenant.tenant_id.clone(),
        replication_factor: tenant.replication_factor,
        default_consistency: convert::consistency_to_wire(Some(tenant.default_consistency)),
        conflict_mode: convert::conflict_mode_to_wire(Some(tenant.conflict_mode)),
        key_groups: convert::key_groups_to_wire(Some(tenant.key_groups)),
        rate_limit_ops_per_sec: tenant.rate_limit_ops_per_sec,
        rate_limit_burst: tenant.rate_limit_burst,
        max_value_bytes: tenant.max_value_bytes,
        max_siblings: tenant.max_siblings,
        strict_quorum: tenant.strict_quorum,
        previous_replication_factor: tenant.previous_replication_factor.unwrap_or(0),
        deleting: tenant.state == TenantState::Deleting,
        purge_seq: tenant.purge_seq,
        generation: tenant.generation,
        over_key_quota: tenant.over_key_quota,
        over_byte_quota: tenant.over_byte_quota,
        default_ttl_ms: tenant.default_ttl_ms,
        max_ttl_ms: tenant.max_ttl_ms,
    }
}

pub(super) fn context_key_to_pb(key: &ContextKeyRecord) -> cluster_pb::ContextKey {
    cluster_pb::ContextKey { key_id: key.key_id, secret: key.secret.clone() }
}

pub(super) fn context_keys_to_pb(keys: &ContextKeySet) -> cluster_pb::ContextKeys {
    cluster_pb::ContextKeys {
        current: keys.current.as_ref().map(context_key_to_pb),
        previous: keys.previous.as_ref().map(context_key_to_pb),
    }
}

pub(super) fn api_key_to_pb(key: &ApiKey) -> admin_pb::ApiKey {
    admin_pb::ApiKey {
        key_id: key.key_id.clone(),
        tenant_id: key.tenant_id.clone(),
        description: key.description.clone(),
        created_at_ms: key.created_at_ms,
        revoked: key.revoked(),
    }
}

pub(super) fn api_key_hash_to_pb(key: &ApiKeyHash) -> cluster_pb::ApiKeyHash {
    cluster_pb::ApiKeyHash {
        key_id: key.key_id.clone(),
        tenant_id: key.tenant_id.clone(),
        secret_sha256: key.secret_sha256.clone(),
    }
}

pub(super) fn status_to_pb(status: NodeStatus) -> i32 {
    (match status {
        NodeStatus::Joining => admin_pb::NodeStatus::Joining,
        NodeStatus::Active => admin_pb::NodeStatus::Active,
        NodeStatus::Leaving => admin_pb::NodeStatus::Leaving,
        NodeStatus::Down => admin_pb::NodeStatus::Down,
        NodeStatus::Removed => admin_pb::NodeStatus::Removed,
    }) as i32
}

pub(super) fn stats_from_pb(stats: admin_pb::NodeStats) -> NodeStats {
    NodeStats {
        keys: stats.keys,
        // A node older than `disk_bytes` sends the figure as `live_bytes` only.
        disk_bytes: if stats.disk_bytes != 0 { stats.disk_bytes } else { stats.live_bytes },
        live_value_bytes: stats.live_value_bytes,
        disk_free_bytes: stats.disk_free_bytes,
        hints_pending: stats.hints_pending,
        write_path_poisoned: stats.write_path_poisoned,
        quarantined_records: stats.quarantined_records,
        clock_offset_ms: stats.clock_offset_known.then_some(stats.clock_offset_ms),
    }
}

pub(super) fn node_to_pb(view: &NodeView) -> admin_pb::StorageNode {
    let node = &view.node;
    admin_pb::StorageNode {
        node_id: node.node_id.0,
        address: node.address.clone(),
        zone: node.zone.clone(),
        weight: node.weight,
        status: status_to_pb(node.status()),
        last_heartbeat_ms: node.last_heartbeat_ms,
        stats: Some(admin_pb::NodeStats {
            keys: node.stats.keys,
            // The old name of disk_bytes, for clients older than it.
            live_bytes: node.stats.disk_bytes,
            disk_bytes: node.stats.disk_bytes,
            live_value_bytes: node.stats.live_value_bytes,
            disk_free_bytes: node.stats.disk_free_bytes,
            hints_pending: node.stats.hints_pending,
            write_path_poisoned: node.stats.write_path_poisoned,
            quarantined_records: node.stats.quarantined_records,
            clock_offset_ms: node.stats.clock_offset_ms.unwrap_or(0),
            clock_offset_known: node.stats.clock_offset_ms.is_some(),
        }),
        in_ring: view.in_ring,
        clock_skewed: view.clock_skewed,
        partitions_at_position: view.partitions_at_position.clone(),
        heartbeat_age_ms: view.heartbeat_age_ms.unwrap_or(0),
        holds_unowned_data: node.holds_unowned_leftovers(),
    }
}

pub(super) fn node_rebuild_message(rebuild: &NodeRebuild) -> admin_pb::NodeRebuild {
    admin_pb::NodeRebuild {
        node_id: rebuild.node_id.0,
        state: rebuild.state.to_owned(),
        partitions_total: rebuild.partitions_total,
        partitions_done: rebuild.partitions_done,
        keys_compared: rebuild.keys_compared,
        keys_repaired: rebuild.keys_repaired,
        bytes: rebuild.bytes,
        failed_exchanges: rebuild.failed_exchanges,
        started_at_ms: rebuild.started_at_ms,
        finished_at_ms: rebuild.finished_at_ms,
    }
}

pub(super) fn node_change(
    view: &NodeView,
    migration_id: Option<String>,
) -> admin_pb::StorageNodeChangeResponse {
    admin_pb::StorageNodeChangeResponse {
        node: Some(node_to_pb(view)),
        migration_id: migration_id.unwrap_or_default(),
        cluster_credential: String::new(),
    }
}

pub(super) fn node_info_to_pb(node: &StorageNode) -> cluster_pb::NodeInfo {
    cluster_pb::NodeInfo {
        node_id: node.node_id.0,
        address: node.address.clone(),
        zone: node.zone.clone(),
        weight: node.weight,
        status: status_to_pb(node.status()),
        holds_unowned_data: node.holds_unowned_leftovers(),
    }
}

pub(super) fn migration_state_to_pb(state: MigrationState) -> i32 {
    (match state {
        MigrationState::Pending => admin_pb::MigrationState::Pending,
        MigrationState::Running => admin_pb::MigrationState::Running,
        MigrationState::Completed => admin_pb::MigrationState::Completed,
        MigrationState::Failed => admin_pb::MigrationState::Failed,
        MigrationState::Cancelled => admin_pb::MigrationState::Cancelled,
    }) as i32
}

/// Throughput since the migration started and the time left at that rate (partitions-based).
pub fn migration_rates(migration: &Migration, now_ms: u64) -> (f64, u64) {
    let end = if migration.finished_at_ms != 0 { migration.finished_at_ms } else { now_ms };
    let elapsed_secs = end.saturating_sub(migration.started_at_ms) as f64 / 1000.0;
    if migration.started_at_ms == 0 || elapsed_secs <= 0.0 {
        return (0.0, 0);
    }
    let keys_per_sec = migration.progress.keys_done as f64 / elapsed_secs;
    let done = migration.progress.partitions_done;
    let remaining = migration.progress.partitions_total.saturating_sub(done);
    let eta_secs = if done == 0 || migration.state != MigrationState::Running {
        0
    } else {
        (remaining as f64 * elapsed_secs / done as f64).ceil() as u64
    };
    (keys_per_sec, eta_secs)
}

pub(super) fn migration_to_pb(migration: &Migration) -> admin_pb::Migration {
    let (keys_per_sec, eta_secs) = migration_rates(migration, now_ms());
    let row = migration.change.to_row();
    admin_pb::Migration {
        migration_id: migration.migration_id.clone(),
        kind: row.kind.as_str().to_owned(),
        state: migration_state_to_pb(migration.state),
        from_epoch: migration.from_epoch,
        to_epoch: migration.to_epoch,
        progress: Some(admin_pb::MigrationProgress {
            partitions_total: migration.progress.partitions_total,
            partitions_done: migration.progress.partitions_done,
            keys_total: migration.progress.keys_total,
            keys_done: migration.progress.keys_done,
            bytes_done: migration.progress.bytes_done,
            keys_per_sec,
            eta_secs,
        }),
        error: migration.error.clone(),
        created_at_ms: migration.created_at_ms,
        updated_at_ms: migration.updated_at_ms,
        tenant_id: row.tenant_id.to_owned(),
        node_id: row.node_id,
    }
}

pub(super) fn topology_to_pb(topology: &Topology) -> cluster_pb::Topology {
    cluster_pb::Topology {
        epoch: topology.epoch,
        partition_count: topology.assignment.partition_count().get(),
        partitions: topology
            .assignment
            .lists()
            .map(|(_, list)| cluster_pb::PartitionNodes { node_ids: list.iter().map(|id| id.0).collect() })
            .collect(),
    }
}

pub(super) fn snapshot_to_pb(snapshot: &ViewSnapshot, include_api_keys: bool) -> cluster_pb::WatchEvent {
    let snapshot_pb = cluster_pb::ClusterSnapshot {
        current: snapshot.current.as_ref().map(topology_to_pb),
        pending: snapshot.pending.as_ref().map(topology_to_pb),
        nodes: snapshot.nodes.iter().map(node_info_to_pb).collect(),
        tenants: snapshot.tenants.iter().map(tenant_config_to_pb).collect(),
        api_keys: if include_api_keys {
            snapshot.api_keys.iter().map(api_key_hash_to_pb).collect()
        } else {
            Vec::new()
        },
        context_keys: include_api_keys.then(|| context_keys_to_pb(&snapshot.context_keys)),
        live_routers: snapshot.live_routers,
    };
    cluster_pb::WatchEvent {
        revision: snapshot.revision,
        event: Some(cluster_pb::watch_event::Event::Snapshot(snapshot_pb)),
    }
}

pub(super) fn event_to_pb(event: &RevisionedEvent, include_api_keys: bool) -> Option<cluster_pb::WatchEvent> {
    use cluster_pb::watch_event::Event as E;
    let converted = match &event.event {
        Event::TopologyCurrent(topology) => E::TopologyCurrent(topology_to_pb(topology)),
        Event::TopologyPending(topology) => E::TopologyPending(topology_to_pb(topology)),
        Event::TopologyPendingCleared => E::TopologyPendingCleared(true),
        Event::NodeChanged(node) => E::NodeChanged(node_info_to_pb(node)),
        Event::TenantChanged(tenant) => E::TenantChanged(tenant_config_to_pb(tenant)),
        Event::TenantDeleted(tenant_id) => E::TenantDeleted(tenant_id.clone()),
        Event::ApiKeyAdded(key) if include_api_keys => E::ApiKeyAdded(api_key_hash_to_pb(key)),
        Event::ApiKeyRevoked(key_id) if include_api_keys => E::ApiKeyRevoked(key_id.clone()),
        Event::ContextKeysChanged(keys) if include_api_keys => {
            E::ContextKeysChanged(context_keys_to_pb(keys))
        }
        Event::ApiKeyAdded(_) | Event::ApiKeyRevoked(_) | Event::ContextKeysChanged(_) => return None,
        Event::LiveRoutersChanged(count) => E::LiveRoutersChanged(*count),
    };
    Some(cluster_pb::WatchEvent { revision: event.revision, event: Some(converted) })
}
