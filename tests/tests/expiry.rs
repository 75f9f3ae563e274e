//! Expiry end to end (issue 19), with real processes: meta, three storage nodes (N = 3, anti-entropy
//! every 2 s, tombstone grace 3 s) and a router.
//!
//! Values written with a TTL disappear from every read path at expiry while every replica keeps the
//! same record: the Merkle roots of their partitions stay equal to each other and to what they were
//! before the expiry, so anti-entropy has nothing to repair. A replica that is down across the expiry
//! and the grace period blocks the purge (nothing is removed on time alone); once it is back, every
//! replica removes the records and nothing reappears. Touch keeps a sliding session alive.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pairdb_client::{Consistency, KvClient, ReadOptions, WriteOptions};
use pairdb_proto::storage::v1 as spb;
use pairdb_tests::checker::{ReplicaCheck, scan_replicas, wait_for_replicas};
use pairdb_tests::cluster::{Cluster, ClusterOptions, ClusterTopology};

const TTL: Duration = Duration::from_secs(4);

fn all() -> ReadOptions {
    ReadOptions { consistency: Consistency::All, ..ReadOptions::default() }
}

/// Every replica's Merkle root of each partition the keys live in.
async fn roots(
    cluster: &Cluster,
    partitions: &BTreeSet<u32>,
    nodes: &[usize],
) -> BTreeMap<(u32, usize), Vec<u8>> {
    let mut roots = BTreeMap::new();
    for &node in nodes {
        let mut client = cluster.storage_client(node).await.unwrap();
        for &partition in partitions {
            let request = spb::MerkleSummaryRequest { partition, level: 0, node_indexes: Vec::new() };
            let summary = client.merkle_summary(request).await.unwrap().into_inner();
            let root = summary.nodes.first().map(|n| n.hash.clone()).unwrap_or_default();
            roots.insert((partition, node), root);
        }
    }
    roots
}

fn partitions(topology: &ClusterTopology, keys: &[String]) -> BTreeSet<u32> {
    keys.iter().map(|k| topology.partition_of("t", k).unwrap()).collect()
}

async fn found(client: &KvClient, key: &str) -> bool {
    client.get(key, all()).await.unwrap().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_values_vanish_everywhere_replicas_agree_and_nothing_comes_back() {
    let storage_args =
        ["--anti-entropy-period-secs", "2", "--tombstone-grace-secs", "3", "--hint-retention-secs", "3"];
    let mut cluster = Cluster::start_with(ClusterOptions {
        storage_args: storage_args.iter().map(|s| (*s).to_owned()).collect(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let client = cluster.client(0).await.unwrap();
    let topology = cluster.topology().await.unwrap();
    let keys: Vec<String> = (0..30).map(|i| format!("cache-{i}")).collect();
    let write = WriteOptions { consistency: Consistency::All, ttl: Some(TTL), ..WriteOptions::default() };
    let written_at = Instant::now();
    let mut expiry = 0;
    for key in &keys {
        client.put(key, b"cached".to_vec(), write.clone()).await.unwrap();
        let read = client.get(key, all()).await.unwrap().expect("readable before expiry");
        expiry = expiry.max(read.siblings[0].expires_at_ms.expect("the read shows the expiry"));
    }
    // A sliding session: touched before it expires, it outlives the others.
    let session = client.put("session", b"me".to_vec(), write.clone()).await.unwrap();
    let touch = WriteOptions {
        consistency: Consistency::All,
        ttl: Some(Duration::from_secs(60)),
        ..WriteOptions::default()
    };
    client.touch("session", session.context.clone(), touch).await.unwrap();
    let parts = partitions(&topology, &keys);
    let nodes = [0, 1, 2];
    let before = roots(&cluster, &parts, &nodes).await;

    // Node 3 goes down before the expiry and stays down past expiry + grace + anti-entropy rounds.
    cluster.kill_storage(2);
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    while now_ms() <= expiry + 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        written_at.elapsed() < TTL + Duration::from_secs(3),
        "the test ran too slowly to check the window"
    );
    // Expired: gone from reads (at ALL, node 3 is down: QUORUM reads).
    let quorum = ReadOptions { consistency: Consistency::Quorum, ..ReadOptions::default() };
    for key in &keys {
        assert!(
            client.get(key, quorum.clone()).await.unwrap().is_none(),
            "{key} is readable after its expiry"
        );
    }
    assert!(client.get("session", quorum.clone()).await.unwrap().is_some(), "the touched session lives on");
    let listing = pairdb_client::ListOptions { prefix: "cache-".into(), ..Default::default() };
    let page = client.list_keys(&listing, None).await.unwrap();
    assert!(page.keys.is_empty(), "expired keys are not listed: {:?}", page.keys);
    // Within the grace period nothing changed on the live replicas: expiry changes no record.
    let after = roots(&cluster, &parts, &[0, 1]).await;
    for ((partition, node), root) in &after {
        assert_eq!(
            Some(root),
            before.get(&(*partition, *node)),
            "partition {partition} changed on node {node} at expiry"
        );
    }

    // Past the grace and two anti-entropy rounds, node 3 still down: nothing is purged on time alone.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let kept = scan_replicas(&cluster, &topology, "t", &keys, &[0, 1]).await.unwrap();
    assert!(keys.iter().all(|k| kept.holders(k).len() == 2), "a record was purged while a replica was down");

    // Back: every replica removes them, and no read ever shows a value again.
    cluster.start_storage_again(2).unwrap();
    for key in &keys {
        assert!(!found(&client, key).await, "{key} came back with the replica that missed its expiry");
    }
    wait_for_replicas(&cluster, "t", &keys, 3, &nodes, ReplicaCheck::Absent, Duration::from_secs(90))
        .await
        .unwrap();
    for key in &keys {
        assert!(!found(&client, key).await, "{key} came back after the purge");
    }
    assert!(found(&client, "session").await);
}

/// Records without expiry (set format 1, as the previous release stores them) and records with an
/// expiring value (format 2) side by side: a replica wiped of both is refilled by anti-entropy
/// alone, every replica ends with equal records, and expiry keeps working on the refilled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_and_without_expiry_converge_under_anti_entropy() {
    let storage_args = ["--anti-entropy-period-secs", "2"];
    let mut cluster = Cluster::start_with(ClusterOptions {
        storage_args: storage_args.iter().map(|s| (*s).to_owned()).collect(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let client = cluster.client(0).await.unwrap();
    let plain: Vec<String> = (0..40).map(|i| format!("plain-{i}")).collect();
    let expiring: Vec<String> = (0..40).map(|i| format!("expiring-{i}")).collect();
    let all_write = WriteOptions { consistency: Consistency::All, ..WriteOptions::default() };
    for key in &plain {
        client.put(key, b"forever".to_vec(), all_write.clone()).await.unwrap();
    }
    let ttl = WriteOptions { ttl: Some(Duration::from_secs(600)), ..all_write.clone() };
    for key in &expiring {
        client.put(key, b"for a while".to_vec(), ttl.clone()).await.unwrap();
    }
    // Only anti-entropy may refill the wiped node: no writes, no reads until it converged.
    cluster.wipe_storage(1).unwrap();
    let keys: Vec<String> = plain.iter().chain(&expiring).cloned().collect();
    wait_for_replicas(&cluster, "t", &keys, 3, &[0, 1, 2], ReplicaCheck::Converged, Duration::from_secs(90))
        .await
        .unwrap();
    let topology = cluster.topology().await.unwrap();
    let scan = scan_replicas(&cluster, &topology, "t", &keys, &[1]).await.unwrap();
    for key in &expiring {
        let set = scan.record(key, 2).expect("refilled");
        assert!(set.siblings()[0].expires_at_ms.is_some(), "{key} kept its expiry on the refilled node");
    }
    for key in &plain {
        let set = scan.record(key, 2).expect("refilled");
        assert!(set.siblings()[0].expires_at_ms.is_none(), "{key} gained no expiry");
        assert_eq!(pairdb_core::encoding::encode_version_set(set)[0], 1, "{key} is stored as format 1");
    }
}
