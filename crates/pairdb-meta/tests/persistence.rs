//! The persistence conformance suite: the same test bodies run against SQLite (a temporary file) and
//! PostgreSQL (a fresh schema on `PAIRDB_TEST_POSTGRES_URL`; skipped with a message when unset).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::quorum::Consistency;
use pairdb_core::ring::{Assignment, NodeId, NodeSpec};
use pairdb_core::token::PartitionCount;
use pairdb_meta::model::{
    ApiKey, ConflictMode, KeyGroups, Membership, Migration, MigrationChange, MigrationKind,
    MigrationProgress, MigrationRow, MigrationState, NodeStats, RouterPresence, StorageNode, Tenant,
    TenantState, Topology, Usage, UsageShare,
};
use pairdb_meta::persistence::{Backend, ChangeKind, PersistenceError, Store, StoreOptions};
use sqlx::Connection as _;

/// Keeps the backing database alive for the test's duration.
#[allow(dead_code)]
enum Guard {
    Dir(tempfile::TempDir),
    Schema(common::PgSchema),
}

const Q: u32 = 64;

fn partitions() -> PartitionCount {
    PartitionCount::new(Q).unwrap()
}

async fn open(url: String) -> Store {
    let store = Store::open(&StoreOptions { url, timeout: Duration::from_secs(10), max_connections: 8 })
        .await
        .unwrap();
    store.initialize(partitions(), 1_000).await.unwrap();
    store
}

async fn sqlite_store() -> (Store, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display());
    let store = open(url).await;
    assert_eq!(store.backend(), Backend::Sqlite);
    (store, Guard::Dir(dir))
}

async fn postgres_store() -> Option<(Store, Guard)> {
    let base = common::postgres_url()?;
    let schema = common::PgSchema::create(&base).await.unwrap();
    let store = open(schema.url()).await;
    assert_eq!(store.backend(), Backend::Postgres);
    Some((store, Guard::Schema(schema)))
}

/// One `#[tokio::test]` per body and backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = super::sqlite_store().await;
                    super::$name(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some((store, _guard)) = super::postgres_store().await else { return };
                    super::$name(store).await;
                }
            )*
        }
    };
}

conformance!(
    initialization_is_idempotent_and_fixes_the_partition_count,
    tenants_round_trip,
    api_keys_round_trip,
    storage_nodes_round_trip,
    heartbeats_and_liveness,
    leftover_marks_clear_only_once_a_report_covers_them,
    topology_versions_round_trip,
    migrations_round_trip,
    change_log_is_contiguous_and_transactional,
    concurrent_writers_get_distinct_contiguous_revisions,
    snapshot_reflects_committed_state,
    usage_reports_replace_the_nodes_shares,
    routers_round_trip,
);

fn tenant(id: &str) -> Tenant {
    Tenant {
        tenant_id: id.to_owned(),
        replication_factor: 3,
        previous_replication_factor: None,
        default_consistency: Consistency::Quorum,
        conflict_mode: ConflictMode::Siblings,
        key_groups: KeyGroups::None,
        rate_limit_ops_per_sec: 100,
        rate_limit_burst: 200,
        max_value_bytes: 1 << 20,
        max_siblings: 64,
        strict_quorum: false,
        max_keys: 0,
        max_bytes: 0,
        over_key_quota: false,
        over_byte_quota: false,
        default_ttl_ms: 0,
        max_ttl_ms: 0,
        created_at_ms: 10,
        updated_at_ms: 10,
        state: TenantState::Active,
        generation: 2,
        purge_seq: 0,
    }
}

fn node(id: u32) -> StorageNode {
    StorageNode {
        node_id: NodeId(id),
        address: format!("10.0.0.{id}:7200"),
        zone: format!("z{}", id % 3),
        weight: 1,
        membership: Membership::Joining,
        alive: true,
        last_heartbeat_ms: 0,
        actor_id: u64::MAX - u64::from(id),
        retired_actor_id: 0,
        data_format_version: 1,
        stats: NodeStats::default(),
        created_at_ms: 5,
        updated_at_ms: 5,
        leftovers_since_revision: 0,
        leftovers_cleaned_revision: 0,
    }
}

fn migration(id: &str, seq: u64, kind: MigrationKind) -> Migration {
    Migration {
        migration_id: id.to_owned(),
        seq,
        change: MigrationChange::from_row(MigrationRow {
            kind,
            node_id: 4,
            tenant_id: "",
            old_value: 0,
            new_value: 1,
        }),
        state: MigrationState::Pending,
        from_epoch: 0,
        to_epoch: 0,
        progress: MigrationProgress::default(),
        done_bitmap: vec![0; (Q / 8) as usize],
        error: String::new(),
        created_at_ms: 7,
        updated_at_ms: 7,
        started_at_ms: 0,
        finished_at_ms: 0,
    }
}

fn assignment(ids: &[u32]) -> Arc<Assignment> {
    let nodes: Vec<NodeSpec> = ids.iter().map(|&id| NodeSpec::new(NodeId(id), 1)).collect();
    Arc::new(Assignment::compute(None, &nodes, partitions()).unwrap())
}

async fn initialization_is_idempotent_and_fixes_the_partition_count(store: Store) {
    // A second start (a second replica, or a restart with another --partition-count) keeps Q.
    let again = store.initialize(PartitionCount::new(1024).unwrap(), 2_000).await.unwrap();
    assert_eq!(again.partition_count.get(), Q);
    assert_eq!(again.created_at_ms, 1_000);
    assert_eq!((again.revision, again.current_epoch, again.pending_epoch), (0, 0, 0));
    store.ping().await.unwrap();
}

async fn tenants_round_trip(store: Store) {
    let grouped = Tenant {
        key_groups: KeyGroups::HashTag,
        max_keys: 1_000,
        max_bytes: i64::MAX as u64,
        over_byte_quota: true,
        default_ttl_ms: 86_400_000,
        max_ttl_ms: 3_153_600_000_000,
        ..tenant("beta")
    };
    let mut tx = store.write().await.unwrap();
    assert!(tx.insert_tenant(&grouped).await.unwrap());
    assert!(tx.insert_tenant(&tenant("alpha")).await.unwrap());
    assert!(!tx.insert_tenant(&tenant("alpha")).await.unwrap(), "duplicate id must not insert");
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    let mut updated = tenant("alpha");
    updated.replication_factor = 5;
    updated.previous_replication_factor = Some(3);
    updated.default_consistency = Consistency::All;
    updated.conflict_mode = ConflictMode::Lww;
    updated.max_value_bytes = 4 << 20;
    updated.strict_quorum = true;
    updated.max_keys = 50;
    updated.max_bytes = 1 << 30;
    updated.default_ttl_ms = 30_000;
    updated.max_ttl_ms = 7 * 86_400_000;
    updated.updated_at_ms = 99;
    // Not a setting an update writes: it is fixed when the row is inserted.
    updated.key_groups = KeyGroups::HashTag;
    // Nor are the over-quota flags: only the leader's evaluation sets them.
    updated.over_key_quota = true;
    assert!(tx.update_tenant(&updated).await.unwrap());
    assert!(!tx.update_tenant(&tenant("missing")).await.unwrap());
    let regrouped = Tenant { key_groups: KeyGroups::None, over_byte_quota: false, ..grouped.clone() };
    assert!(tx.update_tenant(&regrouped).await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = store.read().await.unwrap();
    let loaded = tx.get_tenant("alpha").await.unwrap().unwrap();
    let expected =
        Tenant { created_at_ms: 10, key_groups: KeyGroups::None, over_key_quota: false, ..updated.clone() };
    assert_eq!(loaded, expected);
    assert_eq!(tx.get_tenant("beta").await.unwrap(), Some(grouped.clone()));
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    assert!(tx.set_quota_flags("alpha", true, false).await.unwrap());
    assert!(tx.set_quota_flags("beta", false, false).await.unwrap());
    assert!(!tx.set_quota_flags("missing", true, true).await.unwrap());
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    let flagged = tx.get_tenant("alpha").await.unwrap().unwrap();
    assert_eq!(flagged, Tenant { over_key_quota: true, ..expected }, "only the flags changed");
    let cleared = tx.get_tenant("beta").await.unwrap().unwrap();
    assert_eq!(cleared, Tenant { over_byte_quota: false, ..grouped.clone() });
    let listed = tx.list_tenants().await.unwrap();
    let ids: Vec<(&str, KeyGroups, u64)> =
        listed.iter().map(|t| (t.tenant_id.as_str(), t.key_groups, t.max_keys)).collect();
    assert_eq!(ids, [("alpha", KeyGroups::None, 50), ("beta", KeyGroups::HashTag, 1_000)]);
    let ttls: Vec<(u64, u64)> = listed.iter().map(|t| (t.default_ttl_ms, t.max_ttl_ms)).collect();
    assert_eq!(ttls, [(30_000, 7 * 86_400_000), (86_400_000, 3_153_600_000_000)]);
    assert_eq!(tx.get_tenant("missing").await.unwrap(), None);
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    assert!(tx.delete_tenant("beta").await.unwrap());
    assert!(!tx.delete_tenant("beta").await.unwrap());
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.list_tenants().await.unwrap().len(), 1);
}

async fn api_keys_round_trip(store: Store) {
    let key = |id: &str, tenant: &str| ApiKey {
        key_id: id.to_owned(),
        tenant_id: tenant.to_owned(),
        secret_sha256: format!("{:064x}", id.len()),
        description: format!("key {id}"),
        created_at_ms: 1,
        revoked_at_ms: 0,
    };
    let mut tx = store.write().await.unwrap();
    assert!(tx.insert_api_key(&key("k1", "t1")).await.unwrap());
    assert!(tx.insert_api_key(&key("k2", "t1")).await.unwrap());
    assert!(tx.insert_api_key(&key("k3", "t2")).await.unwrap());
    assert!(!tx.insert_api_key(&key("k3", "t2")).await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    assert!(tx.revoke_api_key("k2", 50).await.unwrap());
    assert!(!tx.revoke_api_key("k2", 60).await.unwrap(), "revoking twice changes nothing");
    assert!(!tx.revoke_api_key("nope", 60).await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.get_api_key("k1").await.unwrap(), Some(key("k1", "t1")));
    let revoked = tx.get_api_key("k2").await.unwrap().unwrap();
    assert!(revoked.revoked());
    assert_eq!(revoked.revoked_at_ms, 50);
    assert_eq!(tx.list_api_keys(Some("t1")).await.unwrap().len(), 2);
    assert_eq!(tx.list_api_keys(None).await.unwrap().len(), 3);
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.delete_api_keys_of_tenant("t1").await.unwrap(), ["k1"], "only active keys are reported");
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.list_api_keys(None).await.unwrap().len(), 1);
}

async fn storage_nodes_round_trip(store: Store) {
    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.max_node_id().await.unwrap(), 0);
    tx.upsert_node(&node(2)).await.unwrap();
    let mut nine = node(9);
    nine.stats.clock_offset_ms = Some(-1_500);
    tx.upsert_node(&nine).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.max_node_id().await.unwrap(), 9);
    let mut changed = node(2);
    changed.membership = Membership::Active;
    changed.weight = 3;
    changed.zone = "eu-1".into();
    changed.address = "10.1.1.1:7000".into();
    changed.actor_id = 42;
    changed.updated_at_ms = 77;
    assert!(tx.update_node(&changed).await.unwrap());
    assert!(!tx.update_node(&node(5)).await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.get_node(NodeId(2)).await.unwrap().unwrap(), changed);
    assert_eq!(
        tx.get_node(NodeId(9)).await.unwrap().unwrap().actor_id,
        u64::MAX - 9,
        "u64 actor ids survive i64 storage"
    );
    assert_eq!(tx.get_node(NodeId(9)).await.unwrap().unwrap(), nine, "stats, clock offset included");
    assert_eq!(tx.get_node(NodeId(5)).await.unwrap(), None);
    let ids: Vec<u32> = tx.list_nodes().await.unwrap().into_iter().map(|n| n.node_id.0).collect();
    assert_eq!(ids, [2, 9]);
    tx.commit().await.unwrap();

    // Re-adding a removed node replaces its row.
    let mut tx = store.write().await.unwrap();
    let mut removed = changed.clone();
    removed.membership = Membership::Removed;
    tx.update_node(&removed).await.unwrap();
    let mut again = node(2);
    again.created_at_ms = 1234;
    tx.upsert_node(&again).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.get_node(NodeId(2)).await.unwrap().unwrap(), again);
}

async fn heartbeats_and_liveness(store: Store) {
    let mut tx = store.write().await.unwrap();
    tx.upsert_node(&node(1)).await.unwrap();
    let mut removed = node(2);
    removed.membership = Membership::Removed;
    tx.upsert_node(&removed).await.unwrap();
    tx.commit().await.unwrap();

    let stats = NodeStats {
        keys: 10,
        disk_bytes: 20,
        live_value_bytes: 5,
        disk_free_bytes: 30,
        hints_pending: 4,
        write_path_poisoned: true,
        quarantined_records: 3,
        clock_offset_ms: Some(1_500),
    };
    assert_eq!(
        store.record_heartbeat(NodeId(1), &stats, 0, 1_000).await.unwrap().map(|r| r.alive),
        Some(true)
    );
    assert_eq!(
        store.record_heartbeat(NodeId(2), &stats, 0, 1_000).await.unwrap().map(|r| r.alive),
        None,
        "removed nodes are unknown"
    );
    assert_eq!(store.record_heartbeat(NodeId(3), &stats, 0, 1_000).await.unwrap().map(|r| r.alive), None);

    // A heartbeat newer than the cutoff keeps the node alive; an older one does not.
    let mut tx = store.write().await.unwrap();
    assert!(!tx.mark_node_dead(NodeId(1), 1_000, 2_000).await.unwrap());
    assert!(tx.mark_node_dead(NodeId(1), 1_001, 2_000).await.unwrap());
    assert!(!tx.mark_node_dead(NodeId(1), 5_000, 2_000).await.unwrap(), "already dead");
    tx.commit().await.unwrap();
    assert_eq!(
        store.record_heartbeat(NodeId(1), &stats, 0, 3_000).await.unwrap().map(|r| r.alive),
        Some(false)
    );

    let mut tx = store.write().await.unwrap();
    // Configuration updates leave the heartbeat and stats alone.
    let mut loaded = tx.get_node(NodeId(1)).await.unwrap().unwrap();
    assert_eq!(loaded.stats, stats);
    assert_eq!(loaded.last_heartbeat_ms, 3_000);
    loaded.weight = 2;
    loaded.last_heartbeat_ms = 0;
    tx.update_node(&loaded).await.unwrap();
    assert!(tx.mark_node_alive(NodeId(1), 3_001).await.unwrap());
    assert!(!tx.mark_node_alive(NodeId(1), 3_002).await.unwrap());
    tx.set_last_heartbeat(NodeId(1), 4_000).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    let loaded = tx.get_node(NodeId(1)).await.unwrap().unwrap();
    assert!(loaded.alive);
    assert_eq!((loaded.weight, loaded.last_heartbeat_ms), (2, 4_000));
    tx.commit().await.unwrap();

    // The clock offset keeps its sign and range, and a heartbeat without a measurement (a node that
    // just started) leaves it unknown rather than 0.
    for clock_offset_ms in [Some(20), Some(-20), Some(-3_000_000_000_000), None, Some(0)] {
        let stats = NodeStats { clock_offset_ms, ..stats };
        assert_eq!(
            store.record_heartbeat(NodeId(1), &stats, 0, 5_000).await.unwrap().map(|r| r.alive),
            Some(true)
        );
        let mut tx = store.read().await.unwrap();
        assert_eq!(tx.get_node(NodeId(1)).await.unwrap().unwrap().stats, stats, "{clock_offset_ms:?}");
        tx.commit().await.unwrap();
    }
}

async fn leftover_marks_clear_only_once_a_report_covers_them(store: Store) {
    let mut tx = store.write().await.unwrap();
    tx.upsert_node(&node(1)).await.unwrap();
    tx.upsert_node(&node(2)).await.unwrap();
    while tx.revision() < 80 {
        tx.record_change(ChangeKind::Node, "1").await.unwrap();
    }
    tx.mark_leftovers(&[NodeId(1)], 40).await.unwrap();
    tx.commit().await.unwrap();
    let stats = NodeStats::default();
    let beat = |revision| store.record_heartbeat(NodeId(1), &stats, revision, 1_000);
    let holds = |store: Store, id| async move {
        let mut tx = store.read().await.unwrap();
        let node = tx.get_node(NodeId(id)).await.unwrap().unwrap();
        tx.commit().await.unwrap();
        node.holds_unowned_leftovers()
    };
    assert!(holds(store.clone(), 1).await);
    assert!(!holds(store.clone(), 2).await, "unmarked");

    let recorded = beat(39).await.unwrap().unwrap();
    assert!(recorded.alive && !recorded.leftovers_cleaned, "a cleanup from an older view");
    let mut tx = store.write().await.unwrap();
    assert!(!tx.clear_leftovers(NodeId(1)).await.unwrap());
    tx.commit().await.unwrap();
    assert!(holds(store.clone(), 1).await);

    assert!(beat(40).await.unwrap().unwrap().leftovers_cleaned);
    assert!(beat(12).await.unwrap().unwrap().leftovers_cleaned, "the cleaned revision never goes back");
    assert!(beat(0).await.unwrap().unwrap().leftovers_cleaned, "a restarted node reports 0");
    let mut tx = store.write().await.unwrap();
    assert!(tx.clear_leftovers(NodeId(1)).await.unwrap());
    assert!(!tx.clear_leftovers(NodeId(1)).await.unwrap(), "cleared once");
    tx.commit().await.unwrap();
    assert!(!holds(store.clone(), 1).await);
    assert!(!beat(50).await.unwrap().unwrap().leftovers_cleaned, "no mark left to clear");
    assert!(beat(81).await.unwrap().is_some());

    // A later mark is not covered by the earlier report.
    let mut tx = store.write().await.unwrap();
    tx.mark_leftovers(&[NodeId(1), NodeId(2)], 60).await.unwrap();
    tx.commit().await.unwrap();
    assert!(holds(store.clone(), 1).await && holds(store.clone(), 2).await);
    assert!(!beat(59).await.unwrap().unwrap().leftovers_cleaned);
    assert!(!beat(81).await.unwrap().unwrap().leftovers_cleaned, "past the last revision: ignored");
    assert!(beat(80).await.unwrap().unwrap().leftovers_cleaned);

    // A removed node never comes back with its directory: its mark no longer holds GC.
    let mut tx = store.write().await.unwrap();
    tx.upsert_node(&StorageNode { membership: Membership::Removed, ..node(2) }).await.unwrap();
    tx.mark_leftovers(&[NodeId(2)], 70).await.unwrap();
    tx.commit().await.unwrap();
    assert!(!holds(store.clone(), 2).await);
}

async fn topology_versions_round_trip(store: Store) {
    let first = Topology { epoch: 1, assignment: assignment(&[1, 2, 3]) };
    let second = Topology { epoch: 2, assignment: assignment(&[1, 2, 3, 4, 5, 6, 7, 8]) };
    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.max_epoch().await.unwrap(), 0);
    tx.insert_topology(&first).await.unwrap();
    tx.insert_topology(&second).await.unwrap();
    tx.set_epochs(1, 2).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.max_epoch().await.unwrap(), 2);
    assert_eq!(tx.get_topology(1).await.unwrap().unwrap(), first);
    let loaded = tx.require_topology(2).await.unwrap();
    assert_eq!(loaded, second);
    assert_eq!(loaded.assignment.list_len(), 7);
    assert_eq!(tx.get_topology(3).await.unwrap(), None);
    assert!(matches!(tx.require_topology(3).await, Err(PersistenceError::Corrupt(_))));
    let state = tx.meta_state().await.unwrap();
    assert_eq!((state.current_epoch, state.pending_epoch), (1, 2));
    tx.commit().await.unwrap();

    // Epochs are unique: writing one twice fails and leaves the stored version intact.
    let mut tx = store.write().await.unwrap();
    assert!(tx.insert_topology(&Topology { epoch: 1, assignment: assignment(&[9]) }).await.is_err());
    drop(tx);
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.get_topology(1).await.unwrap().unwrap(), first);
}

async fn migrations_round_trip(store: Store) {
    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.next_migration_seq().await.unwrap(), 1);
    tx.insert_migration(&migration("m1", 1, MigrationKind::AddNode)).await.unwrap();
    let mut rf = migration("m2", 2, MigrationKind::ReplicationFactor);
    rf.change = MigrationChange::ReplicationFactor { tenant_id: "acme".into(), from: 3, to: 5 };
    tx.insert_migration(&rf).await.unwrap();
    tx.insert_migration(&migration("m3", 3, MigrationKind::DrainNode)).await.unwrap();
    assert_eq!(tx.next_migration_seq().await.unwrap(), 4);
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    let mut running = tx.get_migration("m1").await.unwrap().unwrap();
    running.state = MigrationState::Running;
    running.from_epoch = 1;
    running.to_epoch = 2;
    running.progress = MigrationProgress {
        partitions_total: 10,
        partitions_done: 3,
        keys_total: 5,
        keys_done: 4,
        bytes_done: 9,
    };
    running.mark_partition_done(0);
    running.mark_partition_done(63);
    running.started_at_ms = 11;
    assert!(tx.update_migration(&running).await.unwrap());
    let mut cancelled = tx.get_migration("m3").await.unwrap().unwrap();
    cancelled.state = MigrationState::Cancelled;
    cancelled.error = "cancelled by an operator".into();
    cancelled.finished_at_ms = 12;
    tx.update_migration(&cancelled).await.unwrap();
    assert!(!tx.update_migration(&migration("nope", 9, MigrationKind::NodeWeight)).await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = store.read().await.unwrap();
    let loaded = tx.get_migration("m1").await.unwrap().unwrap();
    assert_eq!(loaded, running);
    assert!(loaded.partition_done(0) && loaded.partition_done(63) && !loaded.partition_done(1));
    assert_eq!(tx.get_migration("m2").await.unwrap().unwrap(), rf);
    assert_eq!(tx.get_migration("nope").await.unwrap(), None);
    let unfinished: Vec<String> =
        tx.unfinished_migrations().await.unwrap().into_iter().map(|m| m.migration_id).collect();
    assert_eq!(unfinished, ["m1", "m2"], "queue order, finished ones excluded");
    let all: Vec<String> = tx.list_migrations().await.unwrap().into_iter().map(|m| m.migration_id).collect();
    assert_eq!(all, ["m3", "m2", "m1"], "newest first");
}

async fn change_log_is_contiguous_and_transactional(store: Store) {
    let mut tx = store.write().await.unwrap();
    tx.set_now(5);
    assert_eq!(tx.record_change(ChangeKind::Tenant, "a").await.unwrap(), 1);
    assert_eq!(tx.record_change(ChangeKind::Node, "3").await.unwrap(), 2);
    assert_eq!(tx.record_change(ChangeKind::TopologyCurrent, "1").await.unwrap(), 3);
    assert_eq!(tx.commit().await.unwrap(), Some(3));

    // A write transaction without changes commits no revision.
    let tx = store.write().await.unwrap();
    assert_eq!(tx.commit().await.unwrap(), None);

    // A rolled-back transaction leaves neither rows nor a revision behind.
    let mut tx = store.write().await.unwrap();
    tx.record_change(ChangeKind::TenantDeleted, "a").await.unwrap();
    drop(tx);

    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.revision(), 3);
    assert_eq!(tx.record_change(ChangeKind::ApiKeyRevoked, "k").await.unwrap(), 4);
    tx.commit().await.unwrap();

    let mut tx = store.read().await.unwrap();
    assert!(tx.record_change(ChangeKind::Tenant, "x").await.is_err(), "read transactions record nothing");
    let changes = tx.changes_after(0, 100).await.unwrap();
    let summary: Vec<(u64, ChangeKind, &str)> =
        changes.iter().map(|c| (c.revision, c.kind, c.entity.as_str())).collect();
    assert_eq!(
        summary,
        [
            (1, ChangeKind::Tenant, "a"),
            (2, ChangeKind::Node, "3"),
            (3, ChangeKind::TopologyCurrent, "1"),
            (4, ChangeKind::ApiKeyRevoked, "k"),
        ]
    );
    assert_eq!(tx.changes_after(2, 1).await.unwrap().len(), 1);
    assert_eq!(tx.meta_state().await.unwrap().revision, 4);
    tx.commit().await.unwrap();

    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.prune_changes(2).await.unwrap(), 2);
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.changes_after(0, 100).await.unwrap().first().map(|c| c.revision), Some(3));
}

async fn concurrent_writers_get_distinct_contiguous_revisions(store: Store) {
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut tx = store.write().await.unwrap();
                tx.record_change(ChangeKind::Tenant, &format!("t{i}")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                tx.record_change(ChangeKind::Node, &i.to_string()).await.unwrap();
                tx.commit().await.unwrap().unwrap()
            })
        })
        .collect();
    let mut last: Vec<u64> = Vec::new();
    for writer in writers {
        last.push(writer.await.unwrap());
    }
    last.sort_unstable();
    assert_eq!(last, [2, 4, 6, 8, 10, 12, 14, 16], "each writer got two consecutive revisions");
    let mut tx = store.read().await.unwrap();
    let changes = tx.changes_after(0, 100).await.unwrap();
    assert_eq!(changes.iter().map(|c| c.revision).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
    // The two changes of one transaction are adjacent.
    for pair in changes.chunks(2) {
        assert_eq!(pair[0].kind, ChangeKind::Tenant);
        assert_eq!(pair[1].kind, ChangeKind::Node);
        assert_eq!(pair[0].entity.trim_start_matches('t'), pair[1].entity);
    }
}

async fn snapshot_reflects_committed_state(store: Store) {
    let mut tx = store.write().await.unwrap();
    let expiring = Tenant {
        key_groups: KeyGroups::HashTag,
        default_ttl_ms: 5_000,
        max_ttl_ms: 60_000,
        ..tenant("acme")
    };
    tx.insert_tenant(&expiring).await.unwrap();
    tx.upsert_node(&node(1)).await.unwrap();
    let active = ApiKey {
        key_id: "k1".into(),
        tenant_id: "acme".into(),
        secret_sha256: "ab".repeat(32),
        description: String::new(),
        created_at_ms: 1,
        revoked_at_ms: 0,
    };
    tx.insert_api_key(&active).await.unwrap();
    tx.insert_api_key(&ApiKey { key_id: "k2".into(), revoked_at_ms: 9, ..active.clone() }).await.unwrap();
    tx.insert_topology(&Topology { epoch: 1, assignment: assignment(&[1]) }).await.unwrap();
    tx.set_epochs(1, 0).await.unwrap();
    tx.record_change(ChangeKind::Tenant, "acme").await.unwrap();
    tx.commit().await.unwrap();

    let snapshot = store.load_snapshot().await.unwrap();
    assert_eq!(snapshot.state.revision, 1);
    assert_eq!(snapshot.tenants.len(), 1);
    assert_eq!(snapshot.tenants[0].key_groups, KeyGroups::HashTag);
    assert_eq!((snapshot.tenants[0].default_ttl_ms, snapshot.tenants[0].max_ttl_ms), (5_000, 60_000));
    assert_eq!(snapshot.nodes.len(), 1);
    assert_eq!(snapshot.api_keys, [active], "revoked keys are not in the snapshot");
    assert_eq!(snapshot.current.as_ref().map(|t| t.epoch), Some(1));
    assert!(snapshot.pending.is_none());
}

async fn usage_reports_replace_the_nodes_shares(store: Store) {
    let mut tx = store.write().await.unwrap();
    tx.upsert_node(&node(1)).await.unwrap();
    tx.upsert_node(&node(2)).await.unwrap();
    tx.upsert_node(&StorageNode { membership: Membership::Removed, ..node(3) }).await.unwrap();
    tx.commit().await.unwrap();
    let usage = |keys: u64| Usage { keys, value_bytes: keys * 100, siblings: keys * 2, tombstones: keys % 3 };
    let share = |node_id: u32, tenant: &str, keys: u64, at: u64| UsageShare {
        node_id: NodeId(node_id),
        tenant_id: tenant.to_owned(),
        usage: usage(keys),
        reported_at_ms: at,
    };
    let report = |shares: &[(&str, u64)]| -> Vec<(String, Usage)> {
        shares.iter().map(|(tenant, keys)| (tenant.to_string(), usage(*keys))).collect()
    };
    let shares = |tenant: Option<&'static str>| {
        let store = store.clone();
        async move {
            let mut tx = store.read().await.unwrap();
            let shares = tx.usage_shares(tenant).await.unwrap();
            let reports = tx.usage_reports().await.unwrap();
            tx.commit().await.unwrap();
            (shares, reports)
        }
    };

    // A zero share is not stored (no row is a zero share).
    assert!(store.record_usage(NodeId(1), &report(&[("a", 10), ("b", 2), ("c", 0)]), 1_000).await.unwrap());
    assert!(store.record_usage(NodeId(2), &report(&[("a", 5)]), 1_100).await.unwrap());
    assert!(!store.record_usage(NodeId(3), &report(&[("a", 1)]), 1_100).await.unwrap(), "removed node");
    assert!(!store.record_usage(NodeId(9), &report(&[("a", 1)]), 1_100).await.unwrap(), "unknown node");
    let (all, reports) = shares(None).await;
    assert_eq!(all, [share(1, "a", 10, 1_000), share(2, "a", 5, 1_100), share(1, "b", 2, 1_000)]);
    assert_eq!(reports, [(NodeId(1), 1_000), (NodeId(2), 1_100)]);
    assert_eq!(shares(Some("a")).await.0, [share(1, "a", 10, 1_000), share(2, "a", 5, 1_100)]);

    // A report replaces every share of its node: tenants missing from it have none left there. A
    // tenant named twice keeps its last share; huge counters survive.
    let huge = Usage { keys: i64::MAX as u64, value_bytes: i64::MAX as u64, siblings: 1, tombstones: 0 };
    let mut next = report(&[("b", 3), ("d", 1), ("d", 4)]);
    next.push(("e".to_owned(), huge));
    assert!(store.record_usage(NodeId(1), &next, 2_000).await.unwrap());
    assert!(store.record_usage(NodeId(2), &[], 2_100).await.unwrap(), "an empty report is a report");
    let (all, reports) = shares(None).await;
    let expected_e = UsageShare { usage: huge, ..share(1, "e", 0, 2_000) };
    assert_eq!(all, [share(1, "b", 3, 2_000), share(1, "d", 4, 2_000), expected_e]);
    assert_eq!(reports, [(NodeId(1), 2_000), (NodeId(2), 2_100)]);
    assert!(shares(Some("a")).await.0.is_empty());

    // A completed tenant deletion forgets the tenant's shares, in its transaction.
    let mut tx = store.write().await.unwrap();
    tx.delete_usage_of_tenant("d").await.unwrap();
    drop(tx);
    assert_eq!(shares(Some("d")).await.0.len(), 1, "rolled back");
    let mut tx = store.write().await.unwrap();
    tx.delete_usage_of_tenant("d").await.unwrap();
    tx.commit().await.unwrap();
    let (all, _) = shares(None).await;
    assert_eq!(all.iter().map(|s| s.tenant_id.as_str()).collect::<Vec<_>>(), ["b", "e"]);
}

async fn routers_round_trip(store: Store) {
    let router = |id: &str, address: &str, last_seen_ms: u64| RouterPresence {
        router_id: id.to_owned(),
        address: address.to_owned(),
        last_seen_ms,
    };
    let routers = || {
        let store = store.clone();
        async move {
            let mut tx = store.read().await.unwrap();
            let routers = tx.list_routers().await.unwrap();
            let counts = [
                tx.count_routers_seen_since(2_000).await.unwrap(),
                tx.count_routers_seen_since(2_001).await.unwrap(),
                tx.count_routers_seen_since(3_001).await.unwrap(),
            ];
            tx.commit().await.unwrap();
            (routers, counts)
        }
    };
    assert_eq!(routers().await, (vec![], [0, 0, 0]));

    // A heartbeat inserts the router or updates its address and last-seen time (ids are opaque).
    let longest = "r".repeat(64);
    store.record_router("r-b", "10.0.0.2:7000", 1_000).await.unwrap();
    store.record_router(&longest, "", 2_000).await.unwrap();
    store.record_router("r-b", "10.0.0.3:7000", 3_000).await.unwrap();
    let (all, counts) = routers().await;
    assert_eq!(all, [router("r-b", "10.0.0.3:7000", 3_000), router(&longest, "", 2_000)]);
    assert_eq!(counts, [2, 1, 0], "seen at or after the instant");

    // The published count: in meta_state, changed with a change-log row, in snapshots.
    let revision = store.read().await.unwrap().meta_state().await.unwrap().revision;
    assert_eq!(store.load_snapshot().await.unwrap().state.live_routers, 0, "not known yet");
    let mut tx = store.write().await.unwrap();
    tx.set_live_routers(7).await.unwrap();
    drop(tx);
    assert_eq!(store.read().await.unwrap().meta_state().await.unwrap().live_routers, 0, "rolled back");
    let mut tx = store.write().await.unwrap();
    tx.set_live_routers(2).await.unwrap();
    tx.record_change(ChangeKind::LiveRouters, "2").await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    let state = tx.meta_state().await.unwrap();
    assert_eq!((state.live_routers, state.revision), (2, revision + 1));
    let changes = tx.changes_after(revision, 10).await.unwrap();
    assert_eq!(
        changes.iter().map(|c| (c.kind, c.entity.as_str())).collect::<Vec<_>>(),
        [(ChangeKind::LiveRouters, "2")]
    );
    tx.commit().await.unwrap();
    assert_eq!(ChangeKind::parse(ChangeKind::LiveRouters.as_str()), Some(ChangeKind::LiveRouters));
    assert_eq!(store.load_snapshot().await.unwrap().state.live_routers, 2);

    // Routers not seen since an instant are forgotten.
    assert_eq!(store.prune_routers(2_500).await.unwrap(), 1);
    assert_eq!(store.prune_routers(2_500).await.unwrap(), 0);
    assert_eq!(routers().await.0, [router("r-b", "10.0.0.3:7000", 3_000)]);
}

/// The last schema version of the release before key groups.
const SCHEMA_BEFORE_KEY_GROUPS: i64 = 20261206000001;
/// The last schema version before usage and quotas (key groups).
const SCHEMA_BEFORE_QUOTAS: i64 = 20261206000002;
/// The last schema version before routers' presence (usage and quotas).
const SCHEMA_BEFORE_ROUTERS: i64 = 20261206000003;
/// The last schema version before tenants' expiry settings (routers' presence).
const SCHEMA_BEFORE_TTL: i64 = 20261206000004;
/// The last schema version before storage nodes' clock offsets (tenants' expiry settings).
const SCHEMA_BEFORE_CLOCK_OFFSET: i64 = 20261206000005;
/// The last schema version before storage nodes' disk and live value bytes (clock offsets).
const SCHEMA_BEFORE_NODE_SIZES: i64 = 20261206000006;

/// A tenant row as a previous release wrote it (no `key_groups`, no quotas).
const TENANT_BEFORE_KEY_GROUPS: &str = "INSERT INTO tenants (tenant_id, replication_factor, default_consistency, \
     conflict_mode, rate_limit_ops_per_sec, rate_limit_burst, max_value_bytes, max_siblings, strict_quorum, \
     created_at_ms, updated_at_ms, state, generation, purge_seq) \
     VALUES ('old', 3, 'quorum', 'lww', 0, 0, 1048576, 64, FALSE, 5, 5, 'active', 2, 0)";

/// A storage node row as a previous release wrote it (no usage report time; its disk size in
/// `stats_live_bytes`).
const NODE_BEFORE_QUOTAS: &str = "INSERT INTO storage_nodes (node_id, address, zone, weight, membership, alive, \
     created_at_ms, updated_at_ms, stats_live_bytes) VALUES (1, '10.0.0.1:7200', '', 1, 'active', TRUE, 5, 5, 67108864)";

/// A database a previous release wrote (its migrations up to `version` applied, a tenant and a node
/// in it) opens with this release's migrations: its tenant reads back with key groups `none`, no
/// quotas, no over-quota flags and no expiry settings, its node with no known clock offset and can
/// report usage and a clock offset, no router is known and the live-router count is 0 (not known)
/// until routers heartbeat.
async fn a_database_of_a_previous_release_opens(backend: Backend, url: String, version: i64) {
    let dir = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let path = format!("{}/../../migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut migrator = sqlx::migrate::Migrator::new(std::path::Path::new(&path)).await.unwrap();
    migrator.set_locking(false);
    assert!(
        migrator.iter().any(|m| m.version == version),
        "no migration {version}: the test would not build that release's schema"
    );
    assert!(
        migrator.iter().any(|m| m.version > version),
        "no migration after the previous release's schema: the test would prove nothing"
    );
    match backend {
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
            migrator.run_direct(Some(version), &mut connection, false).await.unwrap();
            sqlx::query(TENANT_BEFORE_KEY_GROUPS).execute(&mut connection).await.unwrap();
            sqlx::query(NODE_BEFORE_QUOTAS).execute(&mut connection).await.unwrap();
            connection.close().await.unwrap();
        }
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
            migrator.run_direct(Some(version), &mut connection, false).await.unwrap();
            sqlx::query(TENANT_BEFORE_KEY_GROUPS).execute(&mut connection).await.unwrap();
            sqlx::query(NODE_BEFORE_QUOTAS).execute(&mut connection).await.unwrap();
            connection.close().await.unwrap();
        }
    }

    let store = open(url).await;
    let mut tx = store.read().await.unwrap();
    let old = tx.get_tenant("old").await.unwrap().unwrap();
    assert_eq!(old.key_groups, KeyGroups::None);
    assert_eq!((old.conflict_mode, old.generation, old.max_value_bytes), (ConflictMode::Lww, 2, 1 << 20));
    assert_eq!((old.max_keys, old.max_bytes, old.over_key_quota, old.over_byte_quota), (0, 0, false, false));
    assert_eq!((old.default_ttl_ms, old.max_ttl_ms), (0, 0), "its values never expire");
    assert!(tx.usage_reports().await.unwrap().is_empty(), "the node never reported usage");
    tx.commit().await.unwrap();
    let snapshot = store.load_snapshot().await.unwrap();
    assert_eq!(snapshot.tenants.iter().map(|t| t.key_groups).collect::<Vec<_>>(), [KeyGroups::None]);
    assert_eq!(
        snapshot.tenants.iter().map(|t| (t.default_ttl_ms, t.max_ttl_ms)).collect::<Vec<_>>(),
        [(0, 0)]
    );
    assert_eq!(snapshot.nodes.iter().map(|n| n.node_id).collect::<Vec<_>>(), [NodeId(1)]);
    assert_eq!(
        snapshot.nodes[0].stats,
        NodeStats { disk_bytes: 64 << 20, ..NodeStats::default() },
        "no clock offset known; the size on disk kept under its new name, no live value bytes yet"
    );
    let stats = NodeStats { keys: 3, clock_offset_ms: Some(-2_000), ..NodeStats::default() };
    assert_eq!(
        store.record_heartbeat(NodeId(1), &stats, 0, 8_000).await.unwrap().map(|r| r.alive),
        Some(true)
    );
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.get_node(NodeId(1)).await.unwrap().unwrap().stats, stats);
    tx.commit().await.unwrap();
    let share = Usage { keys: 1, value_bytes: 2, siblings: 1, tombstones: 0 };
    assert!(store.record_usage(NodeId(1), &[("old".to_owned(), share)], 9_000).await.unwrap());
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.usage_reports().await.unwrap(), [(NodeId(1), 9_000)]);
    assert_eq!(tx.usage_shares(Some("old")).await.unwrap().len(), 1);
    assert!(tx.list_routers().await.unwrap().is_empty());
    assert_eq!(tx.meta_state().await.unwrap().live_routers, 0);
    tx.commit().await.unwrap();
    assert_eq!(snapshot.state.live_routers, 0);
    store.record_router("r-1", "10.0.0.9:7000", 9_500).await.unwrap();
    let mut tx = store.read().await.unwrap();
    assert_eq!(tx.count_routers_seen_since(9_000).await.unwrap(), 1);
    tx.commit().await.unwrap();
    // The old tenant takes expiry settings like a new one.
    let mut tx = store.write().await.unwrap();
    assert!(
        tx.update_tenant(&Tenant { default_ttl_ms: 60_000, max_ttl_ms: 3_600_000, ..old }).await.unwrap()
    );
    tx.commit().await.unwrap();
    let mut tx = store.read().await.unwrap();
    let expiring = tx.get_tenant("old").await.unwrap().unwrap();
    assert_eq!((expiring.default_ttl_ms, expiring.max_ttl_ms), (60_000, 3_600_000));
}

mod previous_release {
    use super::*;

    fn sqlite_url(dir: &tempfile::TempDir) -> String {
        format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_database_from_before_key_groups_opens() {
        let dir = tempfile::tempdir().unwrap();
        a_database_of_a_previous_release_opens(Backend::Sqlite, sqlite_url(&dir), SCHEMA_BEFORE_KEY_GROUPS)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_database_from_before_key_groups_opens() {
        let Some(base) = common::postgres_url() else { return };
        let schema = common::PgSchema::create(&base).await.unwrap();
        a_database_of_a_previous_release_opens(Backend::Postgres, schema.url(), SCHEMA_BEFORE_KEY_GROUPS)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_database_from_before_quotas_opens() {
        let dir = tempfile::tempdir().unwrap();
        a_database_of_a_previous_release_opens(Backend::Sqlite, sqlite_url(&dir), SCHEMA_BEFORE_QUOTAS).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_database_from_before_quotas_opens() {
        let Some(base) = common::postgres_url() else { return };
        let schema = common::PgSchema::create(&base).await.unwrap();
        a_database_of_a_previous_release_opens(Backend::Postgres, schema.url(), SCHEMA_BEFORE_QUOTAS).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_database_from_before_router_presence_opens() {
        let dir = tempfile::tempdir().unwrap();
        a_database_of_a_previous_release_opens(Backend::Sqlite, sqlite_url(&dir), SCHEMA_BEFORE_ROUTERS)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_database_from_before_router_presence_opens() {
        let Some(base) = common::postgres_url() else { return };
        let schema = common::PgSchema::create(&base).await.unwrap();
        a_database_of_a_previous_release_opens(Backend::Postgres, schema.url(), SCHEMA_BEFORE_ROUTERS).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_database_from_before_ttl_opens() {
        let dir = tempfile::tempdir().unwrap();
        a_database_of_a_previous_release_opens(Backend::Sqlite, sqlite_url(&dir), SCHEMA_BEFORE_TTL).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_database_from_before_ttl_opens() {
        let Some(base) = common::postgres_url() else { return };
        let schema = common::PgSchema::create(&base).await.unwrap();
        a_database_of_a_previous_release_opens(Backend::Postgres, schema.url(), SCHEMA_BEFORE_TTL).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_database_from_before_clock_offsets_opens() {
        let dir = tempfile::tempdir().unwrap();
        a_database_of_a_previous_release_opens(Backend::Sqlite, sqlite_url(&dir), SCHEMA_BEFORE_CLOCK_OFFSET)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_database_from_before_clock_offsets_opens() {
        let Some(base) = common::postgres_url() else { return };
        let schema = common::PgSchema::create(&base).await.unwrap();
        a_database_of_a_previous_release_opens(Backend::Postgres, schema.url(), SCHEMA_BEFORE_CLOCK_OFFSET)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_database_from_before_node_sizes_opens() {
        let dir = tempfile::tempdir().unwrap();
        a_database_of_a_previous_release_opens(Backend::Sqlite, sqlite_url(&dir), SCHEMA_BEFORE_NODE_SIZES)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_database_from_before_node_sizes_opens() {
        let Some(base) = common::postgres_url() else { return };
        let schema = common::PgSchema::create(&base).await.unwrap();
        a_database_of_a_previous_release_opens(Backend::Postgres, schema.url(), SCHEMA_BEFORE_NODE_SIZES)
            .await;
    }
}
