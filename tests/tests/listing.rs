//! Listings end to end (issue 18's acceptance), with real processes: a tenant listed page by page at
//! ONE and at QUORUM while writes go on and a storage node is SIGKILLed and restarted (every key
//! exactly once, in order, no deleted key, never another tenant's), pages failing with
//! PARTITIONS_UNAVAILABLE only when no replica of a partition answers, key-group scans that contact
//! only the group's replica set, the HTTP listing, each node's key index equal to its records after
//! kill -9 during heavy writes, and tenant usage and quotas.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pairdb_proto::admin::v1 as admin;
use pairdb_proto::common::v1::{Consistency, KeyGroups};
use pairdb_proto::kv::v1 as pb;
use pairdb_proto::storage::v1 as spb;
use pairdb_tests::cluster::{Cluster, ClusterOptions};
use pairdb_tests::http_get;
use tonic::transport::Channel;

/// One cluster at a time: each test runs 4–5 processes on a 2-core machine.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Kv = pb::kv_service_client::KvServiceClient<Channel>;

async fn put(kv: &mut Kv, tenant: &str, key: &str, value: &[u8]) {
    for attempt in 0.. {
        let request = pb::PutRequest {
            tenant_id: tenant.into(),
            key: key.into(),
            value: value.to_vec(),
            ..Default::default()
        };
        match kv.put(request).await {
            Ok(_) => return,
            // A write racing a just-killed node may answer "outcome unknown": retry as a client would.
            Err(status) if attempt < 5 => eprintln!("put {key}: {status}; retrying"),
            Err(status) => panic!("put {key}: {status}"),
        }
    }
}

async fn delete(kv: &mut Kv, tenant: &str, key: &str) {
    kv.delete(pb::DeleteRequest { tenant_id: tenant.into(), key: key.into(), ..Default::default() })
        .await
        .unwrap();
}

/// Writes `keys` with 16 concurrent writers.
async fn put_all(cluster: &Cluster, tenant: &str, keys: &[String]) {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in keys.chunks(keys.len().div_ceil(16).max(1)) {
        let (mut kv, chunk, tenant) = (cluster.kv(0).await.unwrap(), chunk.to_vec(), tenant.to_owned());
        tasks.spawn(async move {
            for key in chunk {
                put(&mut kv, &tenant, &key, key.as_bytes()).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

fn options(consistency: Consistency, prefix: &str) -> pb::ListOptions {
    pb::ListOptions {
        prefix: prefix.into(),
        read: Some(pb::ReadOptions { consistency: consistency as i32, ..Default::default() }),
        ..Default::default()
    }
}

/// Every page of a listing, following the page tokens; the pages' keys in order.
async fn list_all(
    kv: &mut Kv,
    tenant: &str,
    mut list: pb::ListOptions,
    between_pages: impl AsyncFnMut(usize),
) -> Vec<String> {
    let mut between_pages = between_pages;
    let mut keys = Vec::new();
    for page in 0.. {
        let response = kv
            .list_keys(pb::ListKeysRequest { tenant_id: tenant.into(), list: Some(list.clone()) })
            .await
            .unwrap_or_else(|status| panic!("page {page}: {status}"))
            .into_inner();
        assert!(response.unavailable_partitions.is_empty());
        keys.extend(response.keys.into_iter().map(|k| {
            assert!(!k.tombstone && k.sibling_count >= 1 && !k.context.is_empty(), "{k:?}");
            k.key
        }));
        if response.next_page_token.is_empty() {
            return keys;
        }
        list.page_token = response.next_page_token;
        between_pages(page).await;
    }
    unreachable!()
}

fn assert_in_order_exactly(listed: &[String], expected: &BTreeSet<String>) {
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "keys in order, none twice");
    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    let missing: Vec<&String> = expected.difference(&listed_set).take(5).collect();
    let extra: Vec<&String> = listed_set.difference(expected).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_lists_page_by_page_while_writes_go_on_and_a_node_restarts() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, 1, 3).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .create_tenant(admin::CreateTenantRequest {
            tenant_id: "other".into(),
            replication_factor: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let count = std::env::var("PAIRDB_LISTING_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(25_000);
    let keys: Vec<String> = (0..count).map(|i| format!("k{i:06}")).collect();
    put_all(&cluster, "t", &keys).await;
    // Identical names in another tenant, and deleted keys in this one.
    put_all(&cluster, "other", &keys[..2_000]).await;
    let mut kv = cluster.kv(0).await.unwrap();
    for key in keys.iter().step_by(25) {
        delete(&mut kv, "t", key).await;
    }
    let expected: BTreeSet<String> =
        keys.iter().enumerate().filter(|(i, _)| i % 25 != 0).map(|(_, k)| k.clone()).collect();

    // Writes of other keys go on throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut kv, stop) = (cluster.kv(0).await.unwrap(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let request = pb::PutRequest {
                    tenant_id: "t".into(),
                    key: format!("live-{i}"),
                    value: b"x".to_vec(),
                    ..Default::default()
                };
                let _ = kv.put(request).await;
                i += 1;
            }
            i
        })
    };
    for consistency in [Consistency::One, Consistency::Quorum] {
        let started = Instant::now();
        let mut killed = false;
        let listed = list_all(&mut kv, "t", options(consistency, "k"), async |page| {
            // Mid-listing: SIGKILL a node, and bring it back a few pages later.
            if page == 5 {
                cluster.kill_storage(1);
                killed = true;
            }
            if page == 12 && killed {
                cluster.start_storage_again(1).unwrap();
            }
        })
        .await;
        assert_in_order_exactly(&listed, &expected);
        eprintln!("{consistency:?}: {} keys in {:?}", listed.len(), started.elapsed());
        if !killed {
            cluster.kill_storage(1);
            cluster.start_storage_again(1).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.await.unwrap() > 0);

    // The other tenant sees only its own keys, and a prefix narrows the listing.
    let other = list_all(&mut kv, "other", options(Consistency::One, ""), async |_| {}).await;
    assert_in_order_exactly(&other, &keys[..2_000].iter().cloned().collect());
    let narrow = list_all(&mut kv, "t", options(Consistency::Quorum, "k0001"), async |_| {}).await;
    assert_in_order_exactly(&narrow, &expected.iter().filter(|k| k.starts_with("k0001")).cloned().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_fails_only_for_partitions_no_replica_answers_for() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, 1, 3).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .create_tenant(admin::CreateTenantRequest {
            tenant_id: "single".into(),
            replication_factor: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<String> = (0..600).map(|i| format!("s{i:04}")).collect();
    put_all(&cluster, "single", &keys).await;
    put_all(&cluster, "t", &keys).await;
    cluster.kill_storage(2);
    let mut kv = cluster.kv(0).await.unwrap();
    // N = 3: another replica answers for every partition.
    let listed = list_all(&mut kv, "t", options(Consistency::One, ""), async |_| {}).await;
    assert_eq!(listed.len(), 600);
    // N = 1: the dead node's partitions have nobody else.
    let status = kv
        .list_keys(pb::ListKeysRequest {
            tenant_id: "single".into(),
            list: Some(options(Consistency::One, "")),
        })
        .await
        .unwrap_err();
    let detail = pairdb_service::errors::detail_of(&status).unwrap();
    assert_eq!(detail.reason, "PARTITIONS_UNAVAILABLE", "{status:?}");
    let named: BTreeSet<u32> = detail.metadata["partitions"].split(',').map(|p| p.parse().unwrap()).collect();
    let topology = cluster.topology().await.unwrap();
    let dead = Cluster::storage_node_id(2);
    let dead_partitions: BTreeSet<u32> =
        (0..topology.partition_count).filter(|p| topology.current[*p as usize][0] == dead).collect();
    assert_eq!(named, dead_partitions);
    // With allow_partial: the keys of the nodes that answered, and the partitions that did not.
    let mut partial = options(Consistency::One, "");
    partial.allow_partial = true;
    let mut listed = Vec::new();
    loop {
        let page = kv
            .list_keys(pb::ListKeysRequest { tenant_id: "single".into(), list: Some(partial.clone()) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.unavailable_partitions.iter().copied().collect::<BTreeSet<u32>>(), dead_partitions);
        listed.extend(page.keys.into_iter().map(|k| k.key));
        if page.next_page_token.is_empty() {
            break;
        }
        partial.page_token = page.next_page_token;
    }
    let expected: BTreeSet<String> = keys
        .iter()
        .filter(|k| !dead_partitions.contains(&topology.partition_of("single", k).unwrap()))
        .cloned()
        .collect();
    assert_in_order_exactly(&listed, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_group_scans_in_order_from_its_replica_set_only() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(4, 1, 2).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    let created = admin
        .create_tenant(admin::CreateTenantRequest {
            tenant_id: "g".into(),
            replication_factor: 2,
            key_groups: KeyGroups::HashTag as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.key_groups, KeyGroups::HashTag as i32);
    let group_keys: Vec<String> = (0..10_000).map(|i| format!("orders:{{g}}:{i:05}")).collect();
    let others: Vec<String> = (0..500).map(|i| format!("orders:{{h{}}}:{i:05}", i % 7)).collect();
    put_all(&cluster, "g", &group_keys).await;
    put_all(&cluster, "g", &others).await;
    // Every group key is in one partition.
    let topology = cluster.topology().await.unwrap();
    let count = pairdb_core::token::PartitionCount::new(topology.partition_count).unwrap();
    let partition = count.partition_of(pairdb_core::token::token_for("g", b"g")).0;
    let replicas: BTreeSet<u32> = topology.current[partition as usize].iter().copied().take(2).collect();
    let before: Vec<f64> = list_calls(&cluster).await;

    let mut kv = cluster.kv(0).await.unwrap();
    let scan = |reverse: bool, start_after: &str, end_before: &str| pb::ScanRequest {
        tenant_id: "g".into(),
        list: Some(pb::ListOptions {
            group: "g".into(),
            reverse,
            start_after: start_after.into(),
            end_before: end_before.into(),
            ..Default::default()
        }),
        max_bytes: 0,
    };
    for reverse in [false, true] {
        let mut request = scan(reverse, "", "");
        let mut listed = Vec::new();
        loop {
            let page = kv.scan(request.clone()).await.unwrap().into_inner();
            for key in &page.keys {
                assert_eq!(key.siblings.len(), 1);
                assert_eq!(key.siblings[0].value, key.key.as_bytes());
            }
            listed.extend(page.keys.into_iter().map(|k| k.key));
            if page.next_page_token.is_empty() {
                break;
            }
            request.list.as_mut().unwrap().page_token = page.next_page_token;
        }
        let mut expected = group_keys.clone();
        if reverse {
            expected.reverse();
        }
        assert_eq!(listed, expected, "reverse = {reverse}");
    }
    let bounded = kv.scan(scan(true, "orders:{g}:00100", "orders:{g}:00105")).await.unwrap().into_inner();
    let keys: Vec<String> = bounded.keys.into_iter().map(|k| k.key).collect();
    assert_eq!(keys, ["orders:{g}:00104", "orders:{g}:00103", "orders:{g}:00102", "orders:{g}:00101"]);

    let after = list_calls(&cluster).await;
    for (index, (b, a)) in before.iter().zip(&after).enumerate() {
        let node = Cluster::storage_node_id(index);
        if replicas.contains(&node) {
            continue;
        }
        assert_eq!(a, b, "node {node} is not a replica of the group and was asked to list");
    }
    // A tenant without key groups has no groups to list.
    let status = kv.scan(pb::ScanRequest { tenant_id: "t".into(), ..scan(false, "", "") }).await.unwrap_err();
    assert_eq!(pairdb_service::errors::detail_of(&status).unwrap().reason, "INVALID_LISTING");
}

/// Each storage node's count of ListRecords calls served.
async fn list_calls(cluster: &Cluster) -> Vec<f64> {
    let served = |addr| {
        let (_, body) = http_get(addr, "/metrics").unwrap();
        body.lines()
            .filter(|line| {
                line.starts_with("pairdb_storage_requests_total{") && line.contains("rpc=\"list_records\"")
            })
            .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    cluster.storage.iter().map(|node| served(node.addr)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_lists_pages_with_tokens_and_scans_with_values() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    let keys: Vec<String> = (0..250).map(|i| format!("h{i:03}")).collect();
    put_all(&cluster, "t", &keys).await;
    let router = cluster.routers[0].addr;
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let (status, body) =
            http_get(router, &format!("/v1/kv?tenant_id=t&prefix=h&limit=100&page_token={token}")).unwrap();
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        for key in body["keys"].as_array().unwrap() {
            assert_eq!(key["sibling_count"], 1);
            assert!(key["context"].as_str().is_some_and(|c| !c.is_empty()));
            listed.push(key["key"].as_str().unwrap().to_owned());
        }
        token = body["next_page_token"].as_str().unwrap_or_default().to_owned();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(listed, keys);
    let (status, body) =
        http_get(router, "/v1/kv?tenant_id=t&prefix=h01&values=true&reverse=true&limit=3").unwrap();
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let first = &body["keys"][0];
    assert_eq!(first["key"], "h019");
    assert_eq!(first["values_base64"][0], "aDAxOQ==");
    let (status, body) = http_get(router, "/v1/kv?tenant_id=t&page_token=garbage").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("INVALID_PAGE_TOKEN"), "{body}");
    let (status, body) = http_get(router, "/v1/kv?tenant_id=t&limit=5000").unwrap();
    assert!(status == 400 && body.contains("INVALID_LISTING"), "{status} {body}");
    let (status, body) = http_get(router, "/v1/groups/x/kv?tenant_id=t").unwrap();
    assert!(
        status == 400 && body.contains("INVALID_LISTING"),
        "a tenant without key groups: {status} {body}"
    );
    let (status, body) = http_get(router, "/v1/kv?tenant_id=t&reverse=maybe").unwrap();
    assert!(status == 400 && body.contains("INVALID_ARGUMENT"), "{status} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_nodes_index_equals_its_records_after_kill_9_during_heavy_writes() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster =
        Cluster::start_with(ClusterOptions { storage_nodes: 3, ..ClusterOptions::default() }).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (mut kv, stop) = (cluster.kv(0).await.unwrap(), stop.clone());
        writers.spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w:02}-{i:06}");
                let request = pb::PutRequest {
                    tenant_id: "t".into(),
                    key: key.clone(),
                    value: b"v".to_vec(),
                    ..Default::default()
                };
                let _ = kv.put(request).await;
                if i % 3 == 0 {
                    let _ = kv
                        .delete(pb::DeleteRequest { tenant_id: "t".into(), key, ..Default::default() })
                        .await;
                }
                i += 1;
            }
        });
    }
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.kill_storage(round % 3);
        cluster.start_storage_again(round % 3).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while writers.join_next().await.is_some() {}
    for index in 0..3 {
        let (from_index, examined) = index_keys(&cluster, index).await;
        let from_records = record_keys(&cluster, index).await;
        assert!(!from_records.is_empty());
        assert_eq!(examined as usize, from_index.len(), "node {index}: index entries without a record");
        assert_eq!(from_index, from_records, "node {index}: index and records differ");
    }
}

/// Every key node `index` lists for tenant `t` from its index, and how many entries it examined.
async fn index_keys(cluster: &Cluster, index: usize) -> (BTreeSet<String>, u64) {
    let mut client = cluster.storage_client(index).await.unwrap();
    let partitions = cluster.topology().await.unwrap().partition_count;
    let (mut keys, mut examined, mut after) = (BTreeSet::new(), 0, String::new());
    loop {
        let request = spb::ListRecordsRequest {
            tenant_id: "t".into(),
            partitions: (0..partitions).collect(),
            start_after: after.clone(),
            ..Default::default()
        };
        let page = client.list_records(request).await.unwrap().into_inner();
        examined += page.examined;
        keys.extend(page.records.into_iter().map(|r| r.key));
        if page.complete {
            return (keys, examined);
        }
        after = page.resume_after;
    }
}

/// Every key of tenant `t` node `index` holds, from its partition streams.
async fn record_keys(cluster: &Cluster, index: usize) -> BTreeSet<String> {
    let client = cluster.storage_client(index).await.unwrap();
    let partitions = cluster.topology().await.unwrap().partition_count;
    let mut tasks = tokio::task::JoinSet::new();
    for shard in 0..8u32 {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut keys = BTreeMap::new();
            for partition in (shard..partitions).step_by(8) {
                let request = spb::StreamPartitionRequest {
                    partition,
                    tenant_ids: vec!["t".into()],
                    ..Default::default()
                };
                let mut stream = client.stream_partition(request).await.unwrap().into_inner();
                while let Some(batch) = stream.message().await.unwrap() {
                    keys.extend(batch.records.into_iter().map(|r| (r.key, ())));
                }
            }
            keys
        });
    }
    let mut keys = BTreeSet::new();
    while let Some(shard) = tasks.join_next().await {
        keys.extend(shard.unwrap().into_keys());
    }
    keys
}

/// Polls `GetTenantUsage` until `done` accepts the report (meta sums the nodes' reports every few
/// seconds).
async fn usage_until(
    cluster: &Cluster,
    tenant: &str,
    done: impl Fn(&admin::TenantUsageReport) -> bool,
) -> admin::TenantUsageReport {
    let mut admin = cluster.admin().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = admin::GetTenantUsageRequest { tenant_id: tenant.into() };
        let report = admin.get_tenant_usage(request).await.unwrap().into_inner();
        if done(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "usage never got there: {report:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_matches_the_keys_and_a_quota_stops_growth_but_not_deletes() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    let create = admin::CreateTenantRequest {
        tenant_id: "q".into(),
        replication_factor: 3,
        max_keys: 120,
        ..Default::default()
    };
    admin.create_tenant(create).await.unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("u{i:03}")).collect();
    put_all(&cluster, "q", &keys).await;
    let mut kv = cluster.kv(0).await.unwrap();
    // Siblings: blind writes to keys that have a value.
    for key in &keys[..10] {
        put(&mut kv, "q", key, b"sibling").await;
    }
    for key in &keys[90..] {
        delete(&mut kv, "q", key).await;
    }
    // The truth, from reading every key.
    let (mut live, mut siblings, mut bytes) = (0u64, 0u64, 0u64);
    for key in &keys {
        let request = pb::GetRequest {
            tenant_id: "q".into(),
            key: key.clone(),
            options: Some(pb::ReadOptions { consistency: Consistency::All as i32, ..Default::default() }),
        };
        if let Ok(found) = kv.get(request).await {
            let found = found.into_inner();
            live += 1;
            siblings += found.siblings.len() as u64;
            bytes += found.siblings.iter().map(|s| s.value.len() as u64).sum::<u64>();
        }
    }
    let truth = admin::TenantUsage {
        tenant_id: "q".into(),
        keys: live,
        value_bytes: bytes,
        siblings,
        tombstones: 10,
    };
    assert_eq!((live, siblings), (90, 100));
    let report =
        usage_until(&cluster, "q", |r| r.usage.as_ref() == Some(&truth) && r.nodes_reporting == 3).await;
    assert!(!report.over_key_quota && report.age_ms < 30_000, "{report:?}");

    // Reach the quota: 120 keys.
    let more: Vec<String> = (100..130).map(|i| format!("u{i:03}")).collect();
    put_all(&cluster, "q", &more).await;
    usage_until(&cluster, "q", |r| r.over_key_quota).await;
    // The flag reaches the coordinators through the watch stream within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let request = pb::PutRequest {
            tenant_id: "q".into(),
            key: "new-key".into(),
            value: b"v".to_vec(),
            ..Default::default()
        };
        match kv.put(request).await {
            Err(status) => break status,
            Ok(_) => {
                delete(&mut kv, "q", "new-key").await;
                assert!(Instant::now() < deadline, "writes past the quota kept being accepted");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(pairdb_service::errors::detail_of(&refused).unwrap().reason, "QUOTA_EXCEEDED", "{refused:?}");
    let (status, body) = pairdb_tests::http_request(
        cluster.routers[0].addr,
        "PUT",
        "/v1/kv/another",
        &[("content-type", "application/json")],
        Some(br#"{"value": 1, "tenant_id": "q"}"#),
    )
    .unwrap();
    assert!(status == 507 && body.contains("QUOTA_EXCEEDED"), "{status} {body}");
    // Overwrites that add nothing, and deletes, go through.
    let current = kv
        .get(pb::GetRequest { tenant_id: "q".into(), key: "u000".into(), options: None })
        .await
        .unwrap()
        .into_inner();
    let overwrite = pb::PutRequest {
        tenant_id: "q".into(),
        key: "u000".into(),
        value: b"u".to_vec(),
        context: current.context,
        ..Default::default()
    };
    kv.put(overwrite).await.unwrap();
    for key in &more {
        delete(&mut kv, "q", key).await;
    }
    // Not sticky: below the quota again, new keys are accepted once meta saw it.
    usage_until(&cluster, "q", |r| !r.over_key_quota).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = pb::PutRequest {
            tenant_id: "q".into(),
            key: "after".into(),
            value: b"v".to_vec(),
            ..Default::default()
        };
        match kv.put(request).await {
            Ok(_) => break,
            Err(status) => {
                assert!(Instant::now() < deadline, "still refused: {status}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
