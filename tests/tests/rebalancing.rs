//! Rebalancing and repair end to end, with real processes and the checker's load running throughout
//! (issue 8's acceptance): adding, draining and force-removing nodes, changing a tenant's replication
//! factor, killing meta mid-migration, refilling a wiped replica (by anti-entropy, and by
//! `pairdb node rebuild`), converging after dropped hints, and deletes that survive tombstone GC.
//!
//! After each scenario the checker reads every key at ALL (no acknowledged write lost, nothing
//! superseded back), and replicas are read directly from the storage nodes (storage `Get`, no read
//! repair) to count copies or compare them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pairdb_client::{Consistency, ReadOptions, WriteOptions};
use pairdb_core::context::context_vector_unverified;
use pairdb_core::dvv::{VersionSet, VersionVector};
use pairdb_core::encoding::{decode_version_set, encode_vector};
use pairdb_proto::admin::v1 as admin;
use pairdb_proto::storage::v1 as spb;
use pairdb_tests::checker::{self, Checker, LoadConfig, ReplicaCheck, wait_for_replicas};
use pairdb_tests::cluster::{Cluster, ClusterOptions};
use pairdb_tests::metric_sum;

/// One cluster at a time: each test runs 4–6 processes plus the load on a 2-core machine.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TENANT: &str = "t";
/// Bound on one migration of a few thousand keys (Q = 4096 partitions).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(240);
/// Bound on replicas settling after a migration (unowned data is deleted after `UNOWNED_GRACE_SECS`).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
const UNOWNED_GRACE_SECS: &str = "2";
const ANTI_ENTROPY_PERIOD_SECS: u64 = 5;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn start(storage_nodes: u32, replication_factor: u32, storage_args: &[&str]) -> Cluster {
    Cluster::start_with(ClusterOptions {
        storage_nodes,
        replication_factor,
        storage_args: args(storage_args),
        ..ClusterOptions::default()
    })
    .await
    .unwrap()
}

/// Within "about three anti-entropy periods" (plus slack for process start and the 2-core machine).
fn anti_entropy_deadline() -> Duration {
    Duration::from_secs(3 * ANTI_ENTROPY_PERIOD_SECS + 10)
}

fn all_nodes(cluster: &Cluster) -> Vec<usize> {
    (0..cluster.storage.len()).collect()
}

fn nodes_except(cluster: &Cluster, except: &[usize]) -> Vec<usize> {
    all_nodes(cluster).into_iter().filter(|i| !except.contains(i)).collect()
}

/// Fails unless the migration moved data (the seed's migrations "completed" while moving none).
fn assert_moved_data(migration: &admin::Migration) {
    let progress = migration.progress.unwrap_or_default();
    eprintln!("migration {} ({}) completed: {progress:?}", migration.migration_id, migration.kind);
    assert!(progress.keys_done > 0, "migration {} moved no keys: {progress:?}", migration.migration_id);
    assert_eq!(progress.partitions_done, progress.partitions_total, "{progress:?}");
}

/// The share of `keys` storage node `index` holds a record of (tombstones included), read directly.
/// (`Stats.keys` is the engine's approximate count, which also counts overwritten versions not yet
/// compacted away, so it is only printed.)
async fn key_share(cluster: &Cluster, index: usize, keys: &[String]) -> f64 {
    let topology = cluster.topology().await.unwrap();
    let scan = checker::scan_replicas(cluster, &topology, TENANT, keys, &[index]).await.unwrap();
    let node_id = Cluster::storage_node_id(index);
    let held = keys.iter().filter(|key| scan.holders(key).contains(&node_id)).count();
    let share = held as f64 / keys.len() as f64;
    let stats = cluster.storage_stats(index).await.unwrap();
    eprintln!("node {node_id} holds {held} of {} keys ({share:.2}); Stats.keys = {}", keys.len(), stats.keys);
    share
}

/// Sum of the anti-entropy repair counter over the given storage nodes.
fn keys_repaired(cluster: &Cluster, indexes: &[usize]) -> f64 {
    indexes
        .iter()
        .map(|i| {
            metric_sum(cluster.storage[*i].addr, "pairdb_storage_anti_entropy_keys_repaired_total").unwrap()
        })
        .sum()
}

fn key_ref(topology: &pairdb_tests::cluster::ClusterTopology, key: &str) -> spb::KeyRef {
    spb::KeyRef {
        tenant_id: TENANT.into(),
        key: key.into(),
        partition: topology.partition_of(TENANT, key).unwrap(),
        tenant_generation: 0,
        token: None,
    }
}

/// A write coordinated by storage node `index` itself (as a router would ask it to, with the context's
/// vector), then replicated to `replicas`; returns the resulting set.
async fn coordinate_on(
    cluster: &Cluster,
    index: usize,
    replicas: &[usize],
    key: &str,
    context: VersionVector,
    value: &[u8],
) -> VersionSet {
    let context = encode_vector(&context);
    let topology = cluster.topology().await.unwrap();
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let written = cluster
        .storage_client(index)
        .await
        .unwrap()
        .coordinate_write(spb::CoordinateWriteRequest {
            key: Some(key_ref(&topology, key)),
            context,
            value: Some(value.to_vec()),
            timestamp_ms: now_ms,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for replica in replicas {
        cluster
            .storage_client(*replica)
            .await
            .unwrap()
            .replicate(spb::ReplicateRequest {
                key: Some(key_ref(&topology, key)),
                version_set: written.version_set.clone(),
                hint_for_node_id: 0,
            })
            .await
            .unwrap();
    }
    decode_version_set(&written.version_set).unwrap()
}

/// The record of `key` on storage node `index`.
async fn local(cluster: &Cluster, index: usize, key: &str) -> Option<VersionSet> {
    let topology = cluster.topology().await.unwrap();
    let response = cluster
        .storage_client(index)
        .await
        .unwrap()
        .get(spb::GetRequest { key: Some(key_ref(&topology, key)) })
        .await
        .unwrap()
        .into_inner();
    response.found.then(|| decode_version_set(&response.version_set).unwrap())
}

/// The live values of `key` read at ALL through router 0, sorted.
/// Writes `value` at ALL and returns its context. An attempt that times out under the load (the
/// harness gives storage calls 500 ms) is made again as an overwrite (read at ALL first), so the
/// context returned also covers whatever the failed attempt left on some replicas: the scenarios
/// need every replica to hold one value, not a first attempt that never stalls.
async fn put_at_all(kv: &pairdb_client::KvClient, key: &str, value: &[u8]) -> Vec<u8> {
    let mut all = WriteOptions { consistency: Consistency::All, ..WriteOptions::default() };
    let mut attempt = 1;
    loop {
        match kv.put(key, value.to_vec(), all.clone()).await {
            Ok(written) => return written.context,
            Err(error) => {
                assert!(attempt < 5, "writing {key} at ALL failed {attempt} times: {error}");
                attempt += 1;
                all.overwrite = true;
            }
        }
    }
}

/// Writes `keys` at ALL, SIGKILLs storage node `down`, then deletes them at QUORUM with the contexts
/// of those writes: the live replicas hold tombstones, `down` still holds the values.
async fn delete_with_a_replica_down(
    cluster: &mut Cluster,
    kv: &pairdb_client::KvClient,
    keys: &[String],
    down: usize,
) {
    let mut contexts = Vec::new();
    for key in keys {
        contexts.push(put_at_all(kv, key, b"to be deleted").await);
    }
    cluster.kill_storage(down);
    for (key, context) in keys.iter().zip(contexts) {
        let quorum = WriteOptions { consistency: Consistency::Quorum, context, ..WriteOptions::default() };
        // The first call to the killed node may ride the connection it had a moment ago, before the
        // router saw it close: the router cannot tell whether that coordinate call was applied, so
        // it answers "outcome unknown" instead of asking another coordinator (DESIGN §4). A client
        // retries; deleting again with the same context is harmless.
        let mut attempt = 1;
        while let Err(error) = kv.delete(key, quorum.clone()).await {
            assert!(attempt < 5, "deleting {key} at QUORUM failed {attempt} times: {error}");
            attempt += 1;
        }
    }
}

async fn values_at_all(kv: &pairdb_client::KvClient, key: &str) -> Vec<Vec<u8>> {
    let all = ReadOptions { consistency: Consistency::All, ..ReadOptions::default() };
    let read = kv.get(key, all).await.unwrap();
    let mut values: Vec<Vec<u8>> =
        read.map(|r| r.siblings.into_iter().map(|s| s.value).collect()).unwrap_or_default();
    values.sort();
    values
}

/// Waits until no node holds a record of `keys` (tombstones purged everywhere; `n` replicas per key),
/// then checks at ALL that none came back.
async fn assert_purged_and_still_deleted(
    cluster: &Cluster,
    kv: &pairdb_client::KvClient,
    keys: &[String],
    n: usize,
) {
    let nodes = all_nodes(cluster);
    wait_for_replicas(cluster, TENANT, keys, n, &nodes, ReplicaCheck::Absent, Duration::from_secs(60))
        .await
        .unwrap();
    for key in keys {
        assert!(values_at_all(kv, key).await.is_empty(), "{key} came back after its tombstone was purged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_a_fourth_node_moves_a_quarter_of_every_list_position_under_load() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = start(3, 3, &["--unowned-grace-secs", UNOWNED_GRACE_SECS]).await;
    let checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let index = cluster.add_storage().await.unwrap();
    let node_id = Cluster::storage_node_id(index);
    let migration = cluster.wait_node_added(node_id, MIGRATION_TIMEOUT).await.unwrap();
    assert_moved_data(&migration);
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let report = checker.stop().await.unwrap();
    report.ensure_no_failed_reads().unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();

    // The ring: the new node holds a quarter of every list position (within rounding).
    let topology = cluster.topology().await.unwrap();
    assert!(topology.pending.is_none());
    let q = topology.partition_count as usize;
    for position in 0..3 {
        let count = topology.position_count(node_id, position);
        assert!(
            count.abs_diff(q / 4) <= q / 100 + 1,
            "node {node_id} holds {count} of {q} at position {position}"
        );
    }
    // Its data: about 3/4 of the keys (it is in 3 of 4 lists' first 3 positions).
    let share = key_share(&cluster, index, &report.keys()).await;
    assert!((0.55..=0.95).contains(&share), "node {node_id} holds {share:.2} of the keys");
    // Every live key has exactly its 3 preference-list copies once the old owners dropped theirs.
    wait_for_replicas(
        &cluster,
        TENANT,
        &report.live_keys(),
        3,
        &all_nodes(&cluster),
        ReplicaCheck::Placement,
        SETTLE_TIMEOUT,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_one_of_four_nodes_keeps_three_copies_under_load() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    // With auto-add (as `pairdb dev` runs): the drained node, still running when it is removed,
    // registers again and must be refused (NODE_REMOVED) rather than rejoin.
    let mut cluster = Cluster::start_with(ClusterOptions {
        storage_nodes: 4,
        storage_args: args(&["--unowned-grace-secs", UNOWNED_GRACE_SECS]),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let drained = 1;
    let drained_id = Cluster::storage_node_id(drained);
    let mut admin = cluster.admin().await.unwrap();
    let response = admin
        .remove_storage_node(admin::RemoveStorageNodeRequest { node_id: drained_id, force: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!response.migration_id.is_empty(), "draining started no migration: {response:?}");
    let migration = cluster.wait_migration(&response.migration_id, MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(migration.kind, "drain_node");
    assert_moved_data(&migration);
    // Heartbeats at 200 ms: give the still-running node time to try to register again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The drained node is out; nothing may depend on it any more.
    cluster.kill_storage(drained);
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let report = checker.stop().await.unwrap();
    report.ensure_no_failed_reads().unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
    let topology = cluster.topology().await.unwrap();
    assert!(
        topology.current.iter().all(|list| !list.contains(&drained_id)),
        "node {drained_id} still in the ring"
    );
    let node = admin
        .get_storage_node(admin::GetStorageNodeRequest { node_id: drained_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.status, admin::NodeStatus::Removed as i32, "{node:?}");
    wait_for_replicas(
        &cluster,
        TENANT,
        &report.live_keys(),
        3,
        &nodes_except(&cluster, &[drained]),
        ReplicaCheck::Placement,
        SETTLE_TIMEOUT,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_removing_a_killed_node_re_replicates_from_survivors_under_load() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = start(4, 3, &["--unowned-grace-secs", UNOWNED_GRACE_SECS]).await;
    let checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let dead = 3;
    let dead_id = Cluster::storage_node_id(dead);
    cluster.kill_storage(dead);
    checker.wait_for_acked_writes(50, Duration::from_secs(30)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    let response = admin
        .remove_storage_node(admin::RemoveStorageNodeRequest { node_id: dead_id, force: true })
        .await
        .unwrap()
        .into_inner();
    assert!(!response.migration_id.is_empty(), "force-removal started no migration: {response:?}");
    let migration = cluster.wait_migration(&response.migration_id, MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(migration.kind, "remove_node");
    assert_moved_data(&migration);
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let report = checker.stop().await.unwrap();
    report.ensure_no_failed_reads().unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
    let topology = cluster.topology().await.unwrap();
    assert!(topology.current.iter().all(|list| !list.contains(&dead_id)), "node {dead_id} still in the ring");
    wait_for_replicas(
        &cluster,
        TENANT,
        &report.live_keys(),
        3,
        &nodes_except(&cluster, &[dead]),
        ReplicaCheck::Placement,
        SETTLE_TIMEOUT,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_factor_three_to_five_and_back_under_load() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = start(5, 3, &["--unowned-grace-secs", UNOWNED_GRACE_SECS]).await;
    let mut checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();

    // 3 → 5: every key gets 5 copies.
    let raised = admin
        .update_replication_factor(admin::UpdateReplicationFactorRequest {
            tenant_id: TENANT.into(),
            replication_factor: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!raised.migration_id.is_empty(), "raising N started no migration: {raised:?}");
    let migration = cluster.wait_migration(&raised.migration_id, MIGRATION_TIMEOUT).await.unwrap();
    assert_eq!(migration.kind, "replication_factor");
    assert_moved_data(&migration);
    checker.wait_for_acked_writes(50, Duration::from_secs(30)).await.unwrap();
    checker.pause().await;
    let live = checker.live_keys().await;
    wait_for_replicas(
        &cluster,
        TENANT,
        &live,
        5,
        &all_nodes(&cluster),
        ReplicaCheck::Placement,
        SETTLE_TIMEOUT,
    )
    .await
    .unwrap();
    checker.resume();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    // 5 → 3: the extra copies go after the grace period.
    let lowered = admin
        .update_replication_factor(admin::UpdateReplicationFactorRequest {
            tenant_id: TENANT.into(),
            replication_factor: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!lowered.migration_id.is_empty(), "lowering N started no migration: {lowered:?}");
    cluster.wait_migration(&lowered.migration_id, MIGRATION_TIMEOUT).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let report = checker.stop().await.unwrap();
    report.ensure_no_failed_reads().unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
    wait_for_replicas(
        &cluster,
        TENANT,
        &report.live_keys(),
        3,
        &all_nodes(&cluster),
        ReplicaCheck::Placement,
        SETTLE_TIMEOUT,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_meta_mid_migration_resumes_the_migration() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = start(3, 3, &["--unowned-grace-secs", UNOWNED_GRACE_SECS]).await;
    // More and bigger keys, so the migration runs long enough to be interrupted.
    let load = LoadConfig { writers: 8, keys_per_writer: 500, value_bytes: 512, ..LoadConfig::default() };
    let checker = Checker::start(&cluster, load).await.unwrap();

    let index = cluster.add_storage().await.unwrap();
    let node_id = Cluster::storage_node_id(index);
    let migration = cluster.node_migration("add_node", node_id, Duration::from_secs(30)).await.unwrap();
    let id = migration.migration_id.clone();
    // Kill meta once the migration is running and has moved something (or has run for a while: its
    // stored progress is written about once a second).
    let mut running_since = None;
    let interrupted = loop {
        let migration = cluster.migration(&id).await.unwrap();
        let state = admin::MigrationState::try_from(migration.state).unwrap();
        let progress = migration.progress.unwrap_or_default();
        match state {
            admin::MigrationState::Completed => {
                panic!(
                    "migration {id} completed before meta could be killed; the test needs more data: {progress:?}"
                )
            }
            admin::MigrationState::Failed | admin::MigrationState::Cancelled => {
                panic!("migration {id} ended {state:?}: {}", migration.error)
            }
            admin::MigrationState::Running => {
                let since = *running_since.get_or_insert_with(Instant::now);
                if progress.partitions_done > 0 || since.elapsed() > Duration::from_millis(1500) {
                    break progress;
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.kill_meta();
    eprintln!("meta killed mid-migration at {interrupted:?}");
    checker.wait_for_acked_writes(50, Duration::from_secs(30)).await.unwrap();
    cluster.restart_meta().unwrap();

    let migration = cluster.wait_migration(&id, MIGRATION_TIMEOUT).await.unwrap();
    assert_moved_data(&migration);
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();

    let report = checker.stop().await.unwrap();
    report.ensure_no_failed_reads().unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
    let share = key_share(&cluster, index, &report.keys()).await;
    assert!((0.55..=0.95).contains(&share), "node {node_id} holds {share:.2} of the keys");
    wait_for_replicas(
        &cluster,
        TENANT,
        &report.live_keys(),
        3,
        &all_nodes(&cluster),
        ReplicaCheck::Placement,
        SETTLE_TIMEOUT,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_replica_is_refilled_by_anti_entropy_and_its_new_writes_win() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let period = ANTI_ENTROPY_PERIOD_SECS.to_string();
    let mut cluster = start(3, 3, &["--anti-entropy-period-secs", &period]).await;
    let mut checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(200, Duration::from_secs(30)).await.unwrap();
    let kv = checker::client(&cluster, 0, TENANT, Duration::from_secs(5)).await.unwrap();
    let (wiped, others) = (1, [0, 2]);
    let wiped_id = Cluster::storage_node_id(wiped);

    // Keys the doomed incarnation coordinated several times, so its old actor has counters > 1 in
    // every replica's vector: a new incarnation reusing that actor would write dots the others
    // already consider seen.
    let amnesia: Vec<String> = (0..20).map(|i| format!("amnesia-{i}")).collect();
    for key in &amnesia {
        let mut context = context_vector_unverified(&put_at_all(&kv, key, b"first").await).unwrap();
        for round in 0..3 {
            let set =
                coordinate_on(&cluster, wiped, &others, key, context, format!("old-{round}").as_bytes())
                    .await;
            context = set.vector().clone();
        }
        assert_eq!(values_at_all(&kv, key).await, vec![b"old-2".to_vec()], "{key}");
    }
    let old_actor = cluster.storage_stats(wiped).await.unwrap().actor;

    // Only anti-entropy may refill the node: no writes, and no reads that would repair it.
    checker.pause().await;
    cluster.wipe_storage(wiped).unwrap();
    let wiped_at = Instant::now();
    let stats = cluster.storage_stats(wiped).await.unwrap();
    assert_ne!(stats.actor, old_actor, "the wiped node kept its actor id");

    // Writes coordinated on the empty node, with the context of the other replicas' data.
    let (early, late) = amnesia.split_at(amnesia.len() / 2);
    for key in early {
        let mut merged = VersionSet::new();
        for other in others {
            merged = merged.merge(&local(&cluster, other, key).await.unwrap());
        }
        coordinate_on(&cluster, wiped, &others, key, merged.vector().clone(), b"after-wipe").await;
    }

    // Every key the node should hold comes back within about three anti-entropy periods.
    let mut keys = checker.keys();
    keys.extend(late.iter().cloned());
    wait_for_replicas(
        &cluster,
        TENANT,
        &keys,
        3,
        &all_nodes(&cluster),
        ReplicaCheck::NotBehind(wiped_id),
        anti_entropy_deadline(),
    )
    .await
    .unwrap();
    eprintln!("node {wiped_id} refilled {:.1}s after it was wiped", wiped_at.elapsed().as_secs_f64());
    assert!(keys_repaired(&cluster, &all_nodes(&cluster)) > 0.0, "anti-entropy repaired no key");

    // Writes coordinated on the refilled node, with a context read at ALL.
    for key in late {
        let read = kv
            .get(key, ReadOptions { consistency: Consistency::All, ..ReadOptions::default() })
            .await
            .unwrap()
            .unwrap();
        let context = context_vector_unverified(&read.context).unwrap();
        coordinate_on(&cluster, wiped, &others, key, context, b"after-refill").await;
    }
    // Neither is lost to the versions the old incarnation wrote.
    for key in early {
        assert_eq!(values_at_all(&kv, key).await, vec![b"after-wipe".to_vec()], "{key}");
    }
    for key in late {
        assert_eq!(values_at_all(&kv, key).await, vec![b"after-refill".to_vec()], "{key}");
    }

    checker.resume();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();
    let report = checker.stop().await.unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
}

/// The `hinted-*` keys the nodes at `indexes` hold hints of for node `target`.
/// `pairdb ARGS --meta <cluster's meta> --output json`, as a real CLI process.
fn pairdb(cluster: &Cluster, args: &[&str]) -> pairdb_tests::cli::Finished {
    let meta = cluster.meta.addr.to_string();
    let mut all = vec!["--meta", meta.as_str(), "--output", "json"];
    all.extend_from_slice(args);
    pairdb_tests::cli::run(cluster.dir.path(), &all, &[]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pairdb_node_rebuild_refills_a_wiped_replica_with_periodic_anti_entropy_off() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = start(3, 3, &["--anti-entropy-period-secs", "0"]).await;
    let mut checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(200, Duration::from_secs(30)).await.unwrap();
    let wiped = 2;
    let wiped_id = Cluster::storage_node_id(wiped);
    let node = wiped_id.to_string();

    let status = pairdb(&cluster, &["node", "rebuild-status", &node]);
    assert!(status.success, "{}", status.stderr);
    assert_eq!(status.json().unwrap()["state"], "idle");
    let unknown = pairdb(&cluster, &["node", "rebuild", "99"]);
    assert!(!unknown.success && unknown.stderr.contains("NODE_NOT_FOUND"), "{unknown:?}");

    // Nothing but the rebuild may refill the node: no writes, no reads (read repair).
    checker.pause().await;
    checker.pause_readers().await;
    cluster.wipe_storage(wiped).unwrap();
    let keys = checker.keys();
    let held = cluster.storage_stats(wiped).await.unwrap().keys;
    assert!(held < keys.len() as u64 / 2, "the wiped node already holds {held} of {} keys", keys.len());

    let started = Instant::now();
    let rebuilt = pairdb(&cluster, &["node", "rebuild", &node]);
    assert!(rebuilt.success, "pairdb node rebuild failed:\n{}\n{}", rebuilt.stdout, rebuilt.stderr);
    let report = rebuilt.json().unwrap();
    eprintln!("rebuild of node {wiped_id} took {:.1}s: {report}", started.elapsed().as_secs_f64());
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["failed_exchanges"], 0, "{report}");
    assert!(report["keys_repaired"].as_u64().unwrap() > 0, "{report}");
    assert!(report["partitions_total"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["partitions_done"], report["partitions_total"], "{report}");

    // The rebuild is over when the CLI returns: every key is back already (the deadline only
    // covers reading the replicas).
    wait_for_replicas(
        &cluster,
        TENANT,
        &keys,
        3,
        &all_nodes(&cluster),
        ReplicaCheck::NotBehind(wiped_id),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let (code, body) =
        pairdb_tests::http_get(cluster.meta.addr, &format!("/v1/admin/storage-nodes/{wiped_id}/rebuild"))
            .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["state"], "done", "{body}");

    checker.resume();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();
    let report = checker.stop().await.unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
}

async fn hints_for(cluster: &Cluster, indexes: &[usize], target: u32) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for index in indexes {
        let mut storage = cluster.storage_client(*index).await.unwrap();
        let listed = storage
            .list_hints(spb::ListHintsRequest { target_node_id: target, partition: None, limit: 10_000 })
            .await
            .unwrap()
            .into_inner();
        assert!(listed.total_pending < 10_000, "too many hints to list them all: {}", listed.total_pending);
        keys.extend(listed.hints.into_iter().map(|h| h.key).filter(|k| k.starts_with("hinted-")));
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anti_entropy_alone_converges_replicas_after_hints_were_dropped() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let period = ANTI_ENTROPY_PERIOD_SECS.to_string();
    // Four nodes, so a fallback exists to hold hints for the down one.
    let mut cluster =
        start(4, 3, &["--hint-retention-secs", "1", "--anti-entropy-period-secs", &period]).await;
    let checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();
    let kv = checker::client(&cluster, 0, TENANT, Duration::from_secs(5)).await.unwrap();

    let down = 3;
    let down_id = Cluster::storage_node_id(down);
    let alive = nodes_except(&cluster, &[down]);
    cluster.kill_storage(down);
    // Keys nobody reads before the check (the checker's reads would repair its own keys).
    let keys: Vec<String> = (0..400).map(|i| format!("hinted-{i}")).collect();
    let quorum = WriteOptions { consistency: Consistency::Quorum, ..WriteOptions::default() };
    // Hints for the down node are stored (seen while writing: the retention is short)...
    let mut hinted = BTreeSet::new();
    for (i, key) in keys.iter().enumerate() {
        // The first calls to the just-killed node can ride the connection it had a moment ago: the
        // router cannot tell whether such a coordinate call was applied and answers "outcome unknown"
        // (DESIGN §4). A client retries (the killed node applied nothing).
        let mut attempt = 1;
        while let Err(error) = kv.put(key, format!("{key}-v").into_bytes(), quorum.clone()).await {
            assert!(attempt < 5, "writing {key} at QUORUM failed {attempt} times: {error}");
            attempt += 1;
        }
        if i % 25 == 24 {
            hinted.extend(hints_for(&cluster, &alive, down_id).await);
        }
    }
    eprintln!("{} of the keys were seen hinted for node {down_id}", hinted.len());
    assert!(!hinted.is_empty(), "no hint was stored for node {down_id}: the scenario tests nothing");
    // ...and dropped after the retention, never delivered.
    let started = Instant::now();
    loop {
        let left = hints_for(&cluster, &alive, down_id).await;
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} hints for node {down_id} never dropped",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let repaired_before = keys_repaired(&cluster, &alive);
    cluster.start_storage_again(down).unwrap();
    wait_for_replicas(
        &cluster,
        TENANT,
        &keys,
        3,
        &all_nodes(&cluster),
        ReplicaCheck::Converged,
        anti_entropy_deadline(),
    )
    .await
    .unwrap();
    let repaired = keys_repaired(&cluster, &all_nodes(&cluster)) - repaired_before;
    assert!(repaired > 0.0, "replicas converged but anti-entropy repaired nothing");

    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();
    let report = checker.stop().await.unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_keys_do_not_resurrect_when_tombstones_are_collected() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let period = ANTI_ENTROPY_PERIOD_SECS.to_string();
    // Three nodes and N = 3: no fallback, so the down replica gets no hint of the deletes. (The
    // tombstone grace may not be shorter than the hint retention.)
    let storage_args =
        ["--tombstone-grace-secs", "1", "--hint-retention-secs", "1", "--anti-entropy-period-secs", &period];
    let mut cluster = start(3, 3, &storage_args).await;
    let checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();
    let kv = checker::client(&cluster, 0, TENANT, Duration::from_secs(5)).await.unwrap();

    let keys: Vec<String> = (0..300).map(|i| format!("doomed-{i}")).collect();
    let down = 2;
    delete_with_a_replica_down(&mut cluster, &kv, &keys, down).await;
    // Let the grace period pass and the live replicas run anti-entropy rounds with old tombstones
    // the down replica does not have (a GC on time alone would purge them now).
    tokio::time::sleep(Duration::from_secs(2 * ANTI_ENTROPY_PERIOD_SECS)).await;
    cluster.start_storage_again(down).unwrap();

    // Anti-entropy hands the tombstones to the replica that missed them; no value comes back.
    wait_for_replicas(
        &cluster,
        TENANT,
        &keys,
        3,
        &all_nodes(&cluster),
        ReplicaCheck::NoLiveValue,
        anti_entropy_deadline(),
    )
    .await
    .unwrap();
    for key in &keys {
        assert!(values_at_all(&kv, key).await.is_empty(), "{key} came back");
    }
    // Once every replica holds them, the tombstones are purged.
    assert_purged_and_still_deleted(&cluster, &kv, &keys, 3).await;

    let report = checker.stop().await.unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
}

/// The full-ack GC path (DESIGN §3: "anti-entropy or a full-ack write"): with anti-entropy off,
/// tombstones every owner acknowledged are purged after the grace period; deletes one replica missed
/// outlive it (never purged on time alone), and nothing comes back when that replica returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fully_acknowledged_deletes_are_collected_without_anti_entropy() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let storage_args =
        ["--tombstone-grace-secs", "1", "--hint-retention-secs", "1", "--anti-entropy-period-secs", "0"];
    let mut cluster = start(3, 3, &storage_args).await;
    let checker = Checker::start(&cluster, LoadConfig::default()).await.unwrap();
    checker.wait_for_acked_writes(100, Duration::from_secs(30)).await.unwrap();
    let kv = checker::client(&cluster, 0, TENANT, Duration::from_secs(5)).await.unwrap();
    let all = WriteOptions { consistency: Consistency::All, ..WriteOptions::default() };

    // Deletes at ALL on 3 nodes with N = 3 (no fallback can stand in): an acknowledged one was
    // acknowledged by every owner itself. One that times out under the load is made again without
    // a context (read at ALL first), so it supersedes whatever the failed attempt left.
    let collected: Vec<String> = (0..200).map(|i| format!("collected-{i}")).collect();
    for key in &collected {
        let context = put_at_all(&kv, key, b"gone").await;
        let mut delete = WriteOptions { context, ..all.clone() };
        let mut attempt = 1;
        while let Err(error) = kv.delete(key, delete.clone()).await {
            assert!(attempt < 5, "deleting {key} at ALL failed {attempt} times: {error}");
            attempt += 1;
            delete = all.clone();
        }
    }
    wait_for_replicas(
        &cluster,
        TENANT,
        &collected,
        3,
        &all_nodes(&cluster),
        ReplicaCheck::Absent,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let full_ack_purges: f64 = all_nodes(&cluster)
        .iter()
        .map(|&i| {
            metric_sum(cluster.storage[i].addr, "pairdb_storage_tombstones_purged_total{path=\"full_ack\"}")
                .unwrap()
        })
        .sum();
    assert!(full_ack_purges >= 3.0 * collected.len() as f64, "{full_ack_purges} full-ack purges");
    for key in &collected {
        assert!(values_at_all(&kv, key).await.is_empty(), "{key} came back after its tombstone was purged");
    }

    // With a replica down, the deletes are not acknowledged by every owner: their tombstones must
    // outlive the grace period on the live replicas, or the returning replica's values come back.
    let kept: Vec<String> = (0..100).map(|i| format!("kept-{i}")).collect();
    let down = 2;
    delete_with_a_replica_down(&mut cluster, &kv, &kept, down).await;
    // Several grace periods (1 s + 1 s of hint-sweep slack) and GC passes; undelivered hints expire.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let live = nodes_except(&cluster, &[down]);
    let topology = cluster.topology().await.unwrap();
    let scan = checker::scan_replicas(&cluster, &topology, TENANT, &kept, &live).await.unwrap();
    for key in &kept {
        assert_eq!(
            scan.holders(key).len(),
            live.len(),
            "{key}: a tombstone not every owner holds was purged"
        );
    }
    cluster.start_storage_again(down).unwrap();
    // Reads at ALL need the returning node; the router notices it within a few heartbeats.
    let started = Instant::now();
    let all_reads = ReadOptions { consistency: Consistency::All, ..ReadOptions::default() };
    while kv.get(&kept[0], all_reads.clone()).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "reads at ALL keep failing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for key in &kept {
        assert!(values_at_all(&kv, key).await.is_empty(), "{key} came back");
    }

    let report = checker.stop().await.unwrap();
    report.verify(&cluster).await.unwrap().ensure_ok().unwrap();
}

/// The storage nodes meta says a migration left holding data they have not deleted yet.
async fn nodes_holding_unowned_data(cluster: &Cluster) -> BTreeSet<u32> {
    let mut admin = cluster.admin().await.unwrap();
    let nodes = admin.list_storage_nodes(admin::ListStorageNodesRequest {}).await.unwrap().into_inner().nodes;
    nodes.into_iter().filter(|n| n.holds_unowned_data).map(|n| n.node_id).collect()
}

/// A node a migration takes data from holds records that miss every later delete until its
/// unowned-data deletion runs; were tombstones collected meanwhile and the node given the data back,
/// its values would come back (`pairdb_core::gc::leftovers`). Lowering N from 3 to 2 leaves every
/// node holding its third-position partitions: meta marks them, tombstone GC waits on every node while
/// a mark stands (checked between two reads of the marks, so the check does not depend on timing),
/// and once the nodes delete that data and report it, the marks clear and the tombstones go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tombstone_gc_waits_for_nodes_a_migration_left_holding_data() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let storage_args = [
        "--tombstone-grace-secs",
        "1",
        "--hint-retention-secs",
        "1",
        "--anti-entropy-period-secs",
        "2",
        "--unowned-grace-secs",
        "25",
    ];
    let cluster = start(3, 3, &storage_args).await;
    assert_eq!(nodes_holding_unowned_data(&cluster).await, BTreeSet::new(), "nothing moved yet");
    let kv = checker::client(&cluster, 0, TENANT, Duration::from_secs(5)).await.unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("gc-held-{i}")).collect();
    let mut contexts = Vec::new();
    for key in &keys {
        contexts.push(put_at_all(&kv, key, b"to be deleted").await);
    }

    let mut admin = cluster.admin().await.unwrap();
    let lowered = admin
        .update_replication_factor(admin::UpdateReplicationFactorRequest {
            tenant_id: TENANT.into(),
            replication_factor: 2,
        })
        .await
        .unwrap()
        .into_inner();
    cluster.wait_migration(&lowered.migration_id, MIGRATION_TIMEOUT).await.unwrap();
    let marked = nodes_holding_unowned_data(&cluster).await;
    let every_node: BTreeSet<u32> = all_nodes(&cluster).into_iter().map(Cluster::storage_node_id).collect();
    assert_eq!(marked, every_node, "with 3 nodes every node is third in some lists");

    // Deleted at ALL of the two owners, after the change: both GC paths could collect these once
    // the grace has passed.
    let all = WriteOptions { consistency: Consistency::All, ..WriteOptions::default() };
    for (key, context) in keys.iter().zip(contexts) {
        let delete = WriteOptions { context, ..all.clone() };
        let mut attempt = 1;
        while let Err(error) = kv.delete(key, delete.clone()).await {
            assert!(attempt < 5, "deleting {key} at ALL failed {attempt} times: {error}");
            attempt += 1;
        }
    }
    // Several anti-entropy periods and full-ack ticks past the grace.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let still_marked = nodes_holding_unowned_data(&cluster).await;
    let topology = cluster.topology().await.unwrap();
    let scan =
        checker::scan_replicas(&cluster, &topology, TENANT, &keys, &all_nodes(&cluster)).await.unwrap();
    let marked_after = nodes_holding_unowned_data(&cluster).await;
    assert!(
        !still_marked.is_empty() && !marked_after.is_empty(),
        "the marks cleared within 8 s of the deletes, before the check could run (unowned grace 25 s)"
    );
    let collected: Vec<&String> = keys.iter().filter(|key| scan.holders(key).len() < 2).collect();
    assert!(collected.is_empty(), "tombstones collected while nodes held unowned data: {collected:?}");
    let held = |cluster: &Cluster| -> Vec<f64> {
        cluster
            .storage
            .iter()
            .map(|s| metric_sum(s.addr, "pairdb_storage_tombstone_gc_held").unwrap())
            .collect()
    };
    assert_eq!(held(&cluster), vec![1.0; 3], "every node says GC is held");

    // The nodes delete their third-position data after the unowned grace and report it.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !nodes_holding_unowned_data(&cluster).await.is_empty() {
        assert!(Instant::now() < deadline, "marks still standing after {SETTLE_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_purged_and_still_deleted(&cluster, &kv, &keys, 2).await;
    // Each node sets the gauge on its full-ack GC tick (every second here).
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&cluster) != vec![0.0; 3] {
        assert!(Instant::now() < deadline, "GC still reported held: {:?}", held(&cluster));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
