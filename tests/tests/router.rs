//! End-to-end tests of the router's request paths with real processes: meta (SQLite), 3–4 storage
//! nodes registering with it, 1–2 routers following its watch stream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pairdb_core::encoding::decode_version_set;
use pairdb_core::token::{PartitionCount, token_for};
use pairdb_proto::kv::v1 as kv;
use pairdb_proto::kv::v1::kv_service_client::KvServiceClient;
use pairdb_proto::storage::v1 as spb;
use pairdb_tests::cluster::{Cluster, wait_ready};
use tonic::transport::Channel;

/// The tests of this file each run a whole cluster of processes; run them one at a time so that two
/// clusters never compete for the machine's two cores (the load and latency assertions would then
/// measure the neighbours, not the router).
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ONE: i32 = 1;
const QUORUM: i32 = 2;
const ALL: i32 = 3;

fn put(key: &str, value: &[u8], consistency: i32) -> kv::PutRequest {
    kv::PutRequest {
        tenant_id: "t".into(),
        key: key.into(),
        value: value.to_vec(),
        options: Some(kv::WriteOptions { consistency, ..Default::default() }),
        ..Default::default()
    }
}

fn get(key: &str, consistency: i32) -> kv::GetRequest {
    kv::GetRequest {
        tenant_id: "t".into(),
        key: key.into(),
        options: Some(kv::ReadOptions { consistency, ..Default::default() }),
    }
}

fn reason(status: &tonic::Status) -> String {
    pairdb_service::errors::reason_of(status).unwrap_or_else(|| format!("{:?}", status.code()))
}

fn values(response: &kv::GetResponse) -> Vec<Vec<u8>> {
    let mut values: Vec<Vec<u8>> = response.siblings.iter().map(|s| s.value.clone()).collect();
    values.sort();
    values
}

/// Retries `get` until the router knows the tenant (it learns it from the watch stream).
async fn settle(client: &mut KvServiceClient<Channel>) {
    for _ in 0..100 {
        match client.get(get("settle", ONE)).await {
            Err(status) if reason(&status) == "TENANT_NOT_FOUND" => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => return,
        }
    }
    panic!("router never learned tenant t");
}

/// Reads `key` directly from storage node `index` (bypassing routers).
async fn local(cluster: &Cluster, index: usize, key: &str) -> Option<pairdb_core::dvv::VersionSet> {
    let partition = PartitionCount::default().partition_of(token_for("t", key.as_bytes())).0;
    let mut client = cluster.storage_client(index).await.ok()?;
    let response = client
        .get(spb::GetRequest {
            key: Some(spb::KeyRef {
                tenant_id: "t".into(),
                key: key.into(),
                partition,
                tenant_generation: 0,
                token: None,
            }),
        })
        .await
        .ok()?
        .into_inner();
    response.found.then(|| decode_version_set(&response.version_set).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_are_read_back_through_another_router_with_siblings_and_deletes() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, 2, 3).await.unwrap();
    let mut a = cluster.kv(0).await.unwrap();
    let mut b = cluster.kv(1).await.unwrap();
    settle(&mut a).await;
    settle(&mut b).await;

    // Read your writes across routers.
    a.put(put("k", b"v1", QUORUM)).await.unwrap();
    assert_eq!(values(&b.get(get("k", QUORUM)).await.unwrap().into_inner()), vec![b"v1".to_vec()]);

    // Two blind writes through two routers become siblings; a write with the context resolves them.
    b.put(put("k", b"v2", QUORUM)).await.unwrap();
    let read = a.get(get("k", QUORUM)).await.unwrap().into_inner();
    assert_eq!(values(&read), vec![b"v1".to_vec(), b"v2".to_vec()]);
    assert!(read.replicas.len() >= 2, "{:?}", read.replicas);
    let mut resolve = put("k", b"merged", QUORUM);
    resolve.context = read.context.clone();
    a.put(resolve).await.unwrap();
    assert_eq!(values(&b.get(get("k", QUORUM)).await.unwrap().into_inner()), vec![b"merged".to_vec()]);

    // 20 concurrent writers without a context: 20 siblings.
    let writers: Vec<_> = (0..20u8)
        .map(|i| {
            let mut client = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { client.put(put("crowd", &[i], QUORUM)).await.unwrap() })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(a.get(get("crowd", ALL)).await.unwrap().into_inner().siblings.len(), 20);

    // Deletes with and without a context; overwrite keeps a concurrent unseen write.
    let ack = a.put(put("d1", b"x", ALL)).await.unwrap().into_inner().ack.unwrap();
    a.delete(kv::DeleteRequest {
        tenant_id: "t".into(),
        key: "d1".into(),
        context: ack.context,
        options: None,
    })
    .await
    .unwrap();
    a.put(put("d2", b"x", QUORUM)).await.unwrap();
    b.put(put("d2", b"y", QUORUM)).await.unwrap();
    b.delete(kv::DeleteRequest { tenant_id: "t".into(), key: "d2".into(), ..Default::default() })
        .await
        .unwrap();
    for key in ["d1", "d2"] {
        let status = a.get(get(key, ALL)).await.unwrap_err();
        assert_eq!(
            (status.code(), reason(&status)),
            (tonic::Code::NotFound, "KEY_NOT_FOUND".into()),
            "{key}"
        );
    }
    a.put(put("ow", b"seen", ALL)).await.unwrap();
    let mut overwrite = put("ow", b"replacement", QUORUM);
    overwrite.overwrite = true;
    a.put(overwrite).await.unwrap();
    assert_eq!(values(&b.get(get("ow", ALL)).await.unwrap().into_inner()), vec![b"replacement".to_vec()]);

    // Deleted keys stay deleted across a storage restart and read repair.
    cluster.restart_storage(0).unwrap();
    for _ in 0..3 {
        for key in ["d1", "d2"] {
            let status = b.get(get(key, ALL)).await.unwrap_err();
            assert_eq!(reason(&status), "KEY_NOT_FOUND", "{key} came back");
        }
    }
}

/// A client loop: QUORUM put then get of its own keys; counts successes and failures.
#[derive(Default)]
struct LoadStats {
    ok: AtomicU64,
    failed: AtomicU64,
    /// The reason of every failure, in order.
    failure_reasons: Mutex<Vec<String>>,
    latencies_us: Mutex<Vec<u64>>,
    written: Mutex<BTreeMap<String, Vec<u8>>>,
}

fn spawn_load(
    client: &KvServiceClient<Channel>,
    clients: usize,
    stop: &Arc<AtomicBool>,
    stats: &Arc<LoadStats>,
    value_len: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (mut client, stop, stats) = (client.clone(), stop.clone(), stats.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("load-{c}-{i}");
                    let value = vec![(i % 251) as u8; value_len];
                    i += 1;
                    let started = Instant::now();
                    let put_result = client.put(put(&key, &value, QUORUM)).await;
                    let get_result = match &put_result {
                        Ok(_) => client.get(get(&key, QUORUM)).await.map(|_| ()),
                        Err(status) => Err(status.clone()),
                    };
                    let elapsed = started.elapsed().as_micros() as u64;
                    match get_result {
                        Ok(()) => {
                            stats.ok.fetch_add(1, Ordering::Relaxed);
                            stats.latencies_us.lock().unwrap().push(elapsed / 2);
                            stats.written.lock().unwrap().insert(key, value);
                        }
                        Err(status) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            let reason = pairdb_service::errors::reason_of(&status).unwrap_or_default();
                            stats.failure_reasons.lock().unwrap().push(reason);
                        }
                    }
                }
            })
        })
        .collect()
}

fn percentile(latencies: &mut [u64], p: f64) -> u64 {
    latencies.sort_unstable();
    if latencies.is_empty() {
        return 0;
    }
    let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
    latencies[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_storage_node_is_routed_around_and_gets_its_hints_back() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, 1, 3).await.unwrap();
    let mut client = cluster.kv(0).await.unwrap();
    settle(&mut client).await;
    let stop = Arc::new(AtomicBool::new(false));
    let before = Arc::new(LoadStats::default());
    let load = spawn_load(&client, 8, &stop, &before, 256);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(before.failed.load(Ordering::Relaxed), 0, "failures before the kill");

    cluster.storage[2].kill(); // SIGKILL
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(LoadStats::default());
    let load = spawn_load(&client, 8, &stop, &during, 256);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    // Each of the 8 clients may see at most the one request that hit the dead node first.
    let failed = during.failed.load(Ordering::Relaxed);
    assert!(failed <= 8, "{failed} failures after the kill");
    assert!(during.ok.load(Ordering::Relaxed) > 20);

    // ALL cannot be met (no fallback exists with three nodes); strict quorum at ALL neither.
    let status = client.put(put("all", b"x", ALL)).await.unwrap_err();
    assert_eq!((status.code(), reason(&status)), (tonic::Code::Unavailable, "QUORUM_NOT_REACHED".into()));
    let detail = pairdb_service::errors::detail_of(&status).unwrap();
    assert_eq!(detail.metadata.get("required").map(String::as_str), Some("3"));
    assert_eq!(detail.metadata.get("outcome").map(String::as_str), Some("unknown"));
    let mut strict = put("strict", b"x", ALL);
    strict.options.as_mut().unwrap().strict_quorum = true;
    assert_eq!(reason(&client.put(strict).await.unwrap_err()), "QUORUM_NOT_REACHED");

    // The node comes back: every key written while it was down reaches it through hints.
    cluster.restart_storage(2).unwrap();
    let written = during.written.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut missing = 0;
        for key in written.keys() {
            if local(&cluster, 2, key).await.is_none() {
                missing += 1;
            }
        }
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} keys never reached the restarted node",
            written.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_replica_never_holds_requests_past_their_deadline() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    let mut client = cluster.kv(0).await.unwrap();
    settle(&mut client).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(LoadStats::default());
    let load = spawn_load(&client, 16, &stop, &stats, 512);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.storage[1].signal("STOP").unwrap();
    let stopped_at = Instant::now();
    // Let the in-flight requests that hit the hung node time out, then measure steady state.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = stats.latencies_us.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let hung_for = stopped_at.elapsed();
    cluster.storage[1].signal("CONT").unwrap();

    // Writes that were in flight to the hung node as their coordinator wait for it until their
    // deadline and then end "outcome unknown" (QUORUM_NOT_REACHED): the node may apply them, so the
    // router does not retry them on another replica (issue 16). At most one per load client: the
    // node is suspect after the storage timeout and later writes are coordinated elsewhere.
    let reasons = stats.failure_reasons.lock().unwrap().clone();
    assert!(reasons.len() <= 16, "{} requests failed while a replica hung: {reasons:?}", reasons.len());
    assert!(reasons.iter().all(|r| r == "QUORUM_NOT_REACHED"), "{reasons:?}");
    let mut all = stats.latencies_us.lock().unwrap().clone();
    let max = *all.iter().max().unwrap();
    assert!(max < 3_500_000, "a request waited {max} µs, past its 3 s deadline");
    let mut steady: Vec<u64> = all.split_off(settled);
    let p99 = percentile(&mut steady, 0.99);
    println!("hung replica for {hung_for:?}: {} ops after settling, p99 {p99} µs", steady.len());
    assert!(p99 < 500_000, "QUORUM p99 {p99} µs is above the 500 ms storage timeout");

    // After SIGCONT everything converges: the hung node receives what was written meanwhile.
    let written = stats.written.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut missing = 0;
        for key in written.keys() {
            if local(&cluster, 1, key).await.is_none() {
                missing += 1;
            }
        }
        if missing == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} keys never reached the resumed node");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_repair_replicas_that_missed_a_write() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, 0, 3).await.unwrap();
    // A router that never probes, so only read repair can fix the replicas (no fallback exists for
    // hints with three nodes and N = 3).
    let router = cluster.add_router_with(&["--probe-interval-ms", "3600000"]).unwrap();
    wait_ready(router, Duration::from_secs(30)).unwrap();
    let mut client = cluster.kv(0).await.unwrap();
    settle(&mut client).await;

    for (round, consistency) in [(0, ALL), (1, QUORUM)] {
        let key = format!("lonely-{round}");
        // Kill (not pause) the other two, so the write's replication cannot sit in their sockets.
        cluster.storage[1].kill();
        cluster.storage[2].kill();
        // The first call to a just-killed node can ride the connection it had a moment ago; the
        // router cannot tell whether that coordinate call was applied and answers "outcome unknown"
        // (DESIGN §4) instead of asking the next replica. A client retries; the killed node applied
        // nothing, so the retry leaves one holder.
        let mut attempt = 1;
        while let Err(status) = client.put(put(&key, b"only-one", ONE)).await {
            assert!(attempt < 5, "writing {key} at ONE failed {attempt} times: {status}");
            attempt += 1;
        }
        // Let the write's background replication time out (500 ms) before the replicas return.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        cluster.restart_storage(1).unwrap();
        cluster.restart_storage(2).unwrap();
        let holders: Vec<usize> = {
            let mut holders = Vec::new();
            for i in 0..3 {
                if local(&cluster, i, &key).await.is_some() {
                    holders.push(i);
                }
            }
            holders
        };
        assert_eq!(holders.len(), 1, "the write at ONE reached {holders:?}");

        let response = client.get(get(&key, consistency)).await.unwrap().into_inner();
        assert_eq!(values(&response), vec![b"only-one".to_vec()]);
        // Every replica the read contacted ends up with the value.
        let contacted: Vec<u32> = response
            .replicas
            .iter()
            .filter(|r| r.outcome == "found" || r.outcome == "not_found")
            .map(|r| r.node_id)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        for node_id in contacted {
            let index = node_id as usize - 1;
            while local(&cluster, index, &key).await.is_none() {
                assert!(Instant::now() < deadline, "node {node_id} was contacted but not repaired");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routers_keep_serving_while_meta_is_down() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let seconds: u64 =
        std::env::var("PAIRDB_E2E_META_DOWN_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut cluster = Cluster::start(3, 1, 3).await.unwrap();
    let mut client = cluster.kv(0).await.unwrap();
    settle(&mut client).await;
    cluster.meta.kill();

    // A router started now has no topology and says so.
    let late = cluster.add_router().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = pairdb_tests::http_get(late.addr, "/health/ready").unwrap();
    assert_eq!(status, 503, "{body}");

    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let key = format!("meta-down-{i}");
        client.put(put(&key, b"still here", QUORUM)).await.unwrap();
        let response = client.get(get(&key, QUORUM)).await.unwrap().into_inner();
        assert_eq!(values(&response), vec![b"still here".to_vec()]);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{i} put+get pairs served with meta down for {seconds} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_for_thirty_seconds_without_an_error() {
    let _serial = ONE_CLUSTER_AT_A_TIME.lock().await;
    let seconds: u64 = std::env::var("PAIRDB_E2E_LOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    let mut client = cluster.kv(0).await.unwrap();
    settle(&mut client).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(LoadStats::default());
    let load = spawn_load(&client, 64, &stop, &stats, 1024);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let ok = stats.ok.load(Ordering::Relaxed);
    let mut latencies = stats.latencies_us.lock().unwrap().clone();
    println!(
        "64 clients, {seconds} s, QUORUM put+get of 1 KiB: {} ops/s, p50 {} µs, p99 {} µs (debug build)",
        ok * 2 / seconds,
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99)
    );
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    assert!(ok > 0);
}
