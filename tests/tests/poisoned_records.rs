//! Records that cannot be poisoned (issue 15), with real processes: forged contexts — the ones that
//! used to brick storage nodes, and contexts borrowed from another tenant or key — are refused at the
//! router and store nothing, every storage node restarts
//! afterwards, and a record that does not decode when a node opens is quarantined (counted, the node
//! serves) and restored from the other replicas by anti-entropy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use pairdb_client::{Consistency, ReadOptions, WriteOptions};
use pairdb_core::context::context_vector_unverified;
use pairdb_core::dvv::{Actor, VersionVector};
use pairdb_core::encoding::{decode_version_set, encode_vector};
use pairdb_proto::storage::v1 as spb;
use pairdb_tests::checker;
use pairdb_tests::cluster::{Cluster, ClusterOptions};

/// Each test runs a whole cluster; one at a time keeps two clusters off the same two cores.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn at(consistency: Consistency, context: Vec<u8>) -> WriteOptions {
    WriteOptions { consistency, context, timeout: Some(Duration::from_secs(5)), ..WriteOptions::default() }
}

fn reason(error: &pairdb_client::ClientError) -> String {
    error.reason().to_owned()
}

/// A sealed context whose vector was raised by one, keeping its tag (a client editing a context).
fn edited(context: &[u8]) -> Vec<u8> {
    let mut edited = context.to_vec();
    // Layout: format, key id, entry count, then the first entry's 8-byte actor and its counter.
    let counter_at = 1 + 1 + 1 + 8;
    edited[counter_at] = edited[counter_at].wrapping_add(1);
    edited
}

/// The storage nodes' stored set of `key`, or `None` where absent.
async fn stored(cluster: &Cluster, index: usize, key: &str) -> Option<pairdb_core::dvv::VersionSet> {
    let topology = cluster.topology().await.unwrap();
    let key_ref = spb::KeyRef {
        tenant_id: "t".into(),
        key: key.into(),
        partition: topology.partition_of("t", key).unwrap(),
        tenant_generation: 0,
        token: None,
    };
    let mut client = cluster.storage_client(index).await.unwrap();
    let response = client.get(spb::GetRequest { key: Some(key_ref) }).await.unwrap().into_inner();
    response.found.then(|| decode_version_set(&response.version_set).unwrap())
}

/// Forged contexts, as issue 15 found them accepted or as an attacker can make them now: the old
/// checksummed format (anyone can compute the checksum) with saturated counters or a hundred thousand
/// invented actors, a sealed context whose vector was edited, another tenant's context and another
/// key's context. Each is refused at the router with INVALID_CONTEXT and stores nothing, and after a
/// restart of every storage node every acknowledged write still reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_contexts_are_refused_and_every_node_restarts() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start_with(ClusterOptions::default()).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .create_tenant(pairdb_proto::admin::v1::CreateTenantRequest {
            tenant_id: "u".into(),
            replication_factor: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let kv = checker::client(&cluster, 0, "t", Duration::from_secs(5)).await.unwrap();
    let other_tenant = checker::client(&cluster, 0, "u", Duration::from_secs(5)).await.unwrap();
    let acked = kv.put("victim", b"before".to_vec(), at(Consistency::All, Vec::new())).await.unwrap();
    let other_key = kv.put("other-key", b"x".to_vec(), at(Consistency::All, Vec::new())).await.unwrap();
    let their =
        other_tenant.put("victim", b"theirs".to_vec(), at(Consistency::All, Vec::new())).await.unwrap();
    let actors: Vec<u64> = acked.version_vector.iter().map(|(actor, _)| *actor).collect();

    let checksummed = |vector: VersionVector| encode_vector(&vector);
    let forged: Vec<(&str, Vec<u8>)> = vec![
        ("old format, valid checksum", checksummed(context_vector_unverified(&acked.context).unwrap())),
        (
            "saturated counters",
            checksummed(VersionVector::from_entries(actors.iter().map(|a| (Actor(*a), u64::MAX)))),
        ),
        (
            "100,000 invented actors",
            checksummed(VersionVector::from_entries((1..=100_000).map(|a| (Actor(a), 1)))),
        ),
        ("edited sealed vector", edited(&acked.context)),
        ("another tenant's context", their.context.clone()),
        ("another key's context", other_key.context.clone()),
    ];
    for (name, context) in &forged {
        for key in ["victim", "fresh"] {
            let put = kv.put(key, b"forged".to_vec(), at(Consistency::Quorum, context.clone())).await;
            let error = put.expect_err(&format!("{name}: a forged context was accepted for {key}"));
            assert_eq!(reason(&error), "INVALID_CONTEXT", "{name}: {error:?}");
            let delete = kv.delete(key, at(Consistency::Quorum, context.clone())).await;
            assert_eq!(reason(&delete.expect_err(name)), "INVALID_CONTEXT", "{name}");
        }
    }
    // The genuine context still works (and the forgeries did not spoil anything for it).
    let replaced = kv.put("victim", b"replaced".to_vec(), at(Consistency::All, acked.context.clone())).await;
    assert!(replaced.is_ok(), "{replaced:?}");
    // Nothing was stored: the victim is untouched on every replica, the fresh key exists nowhere.
    for index in 0..cluster.storage.len() {
        let set = stored(&cluster, index, "victim").await.unwrap();
        assert_eq!(set.siblings().len(), 1, "node {index}: {set:?}");
        assert_eq!(set.siblings()[0].value.as_deref(), Some(&b"replaced"[..]), "node {index}: {set:?}");
        assert!(set.vector().len() <= 3, "node {index}: the vector grew: {set:?}");
        assert!(stored(&cluster, index, "fresh").await.is_none(), "node {index} stored the fresh key");
    }
    // The cluster keeps serving, and survives a restart of every storage node.
    kv.put("after", b"still-serving".to_vec(), at(Consistency::All, Vec::new())).await.unwrap();
    for index in 0..cluster.storage.len() {
        cluster.restart_storage(index).unwrap();
    }
    let all = ReadOptions {
        consistency: Consistency::All,
        timeout: Some(Duration::from_secs(5)),
        ..ReadOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for key in ["victim", "after"] {
        let read = loop {
            match kv.get(key, all.clone()).await {
                Ok(read) => break read,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("{key} not readable at ALL yet: {error}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => panic!("{key}: unreadable after the restarts: {error}"),
            }
        };
        assert!(read.is_some_and(|r| r.siblings.len() == 1), "{key}");
    }
}

/// A record planted in a stopped node's data directory that does not decode (garbage, and the shape a
/// saturated-counter context used to leave): the node starts, quarantines both, reports them in
/// `Stats`, and anti-entropy brings the records back from the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_record_is_quarantined_and_restored_from_peers() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start_with(ClusterOptions {
        storage_args: vec!["--anti-entropy-period-secs".into(), "2".into()],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let kv = checker::client(&cluster, 0, "t", Duration::from_secs(5)).await.unwrap();
    for key in ["garbage", "saturated", "healthy"] {
        kv.put(key, format!("{key}-value").into_bytes(), at(Consistency::All, Vec::new())).await.unwrap();
    }
    let healthy = stored(&cluster, 0, "healthy").await.unwrap();
    let garbage = stored(&cluster, 1, "garbage").await.unwrap();

    // Stop node 0 and plant the bad records through its engine, as a disk fault or an old release
    // would have left them.
    cluster.kill_storage(0);
    let id = Cluster::storage_node_id(0);
    let config = pairdb_storage::Config::for_node(id, cluster.storage_dir(id));
    let engine = pairdb_storage::open_engine(&config).unwrap();
    let partitions = engine.partitions();
    let key = |name: &str| pairdb_storage::keys::RecordKey::new(partitions, "t", name);
    engine.insert_raw_record_for_tests(&key("garbage"), b"\x01 not a version set").unwrap();
    let mut saturated = vec![1u8, 1];
    saturated.extend_from_slice(&7u64.to_le_bytes());
    saturated.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0]);
    engine.insert_raw_record_for_tests(&key("saturated"), &saturated).unwrap();
    // The node's own open waits (bounded) for this handle's lock to go.
    drop(engine);

    cluster.start_storage_again(0).unwrap();
    let stats = cluster.storage_stats(0).await.unwrap();
    assert_eq!(stats.quarantined_records, 2, "{stats:?}");
    // Reported: readiness detail (still ready), the metric, and `pairdb node list` through meta.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = pairdb_tests::http_get(cluster.storage[0].addr, "/health/ready").unwrap();
        if status == 200 && body.contains("2 records quarantined") {
            break;
        }
        assert!(Instant::now() < deadline, "readiness does not report the quarantine: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pairdb_tests::metric_sum(cluster.storage[0].addr, "pairdb_storage_quarantined_records").unwrap(),
        2.0
    );
    let mut admin = cluster.admin().await.unwrap();
    loop {
        let nodes =
            admin.list_storage_nodes(pairdb_proto::admin::v1::ListStorageNodesRequest {}).await.unwrap();
        let node = nodes.into_inner().nodes.into_iter().find(|n| n.node_id == id).unwrap();
        if node.stats.is_some_and(|s| s.quarantined_records == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "meta's node list does not report the quarantine: {node:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored(&cluster, 0, "healthy").await.unwrap(), healthy, "a healthy record was touched");

    // Anti-entropy restores both from the replicas that hold valid copies.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let restored = stored(&cluster, 0, "garbage").await;
        let other = stored(&cluster, 0, "saturated").await;
        if restored.as_ref() == Some(&garbage) && other.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "anti-entropy did not restore the quarantined records");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let read =
        kv.get("saturated", ReadOptions { consistency: Consistency::All, ..ReadOptions::default() }).await;
    assert_eq!(read.unwrap().unwrap().single_value(), Some(&b"saturated-value"[..]));
    // Still counted after the restore (the quarantine keeps the raw bytes for inspection).
    assert_eq!(cluster.storage_stats(0).await.unwrap().quarantined_records, 2);
}
