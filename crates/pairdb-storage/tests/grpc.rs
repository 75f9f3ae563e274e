//! The internal gRPC API over loopback against a real node (`run` on a port-0 listener): concurrency on
//! one key, bad input with stable reasons, partition streams that resume after a cut, hint delivery to
//! a second node, stats and health, and a failed fsync that poisons the write path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The test drives nodes from outside: its own tasks record nowhere in particular.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pairdb_core::dvv::{Actor, VersionSet, VersionVector};
use pairdb_core::encoding::{decode_version_set, encode_vector, encode_version_set};
use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionCount, token_for};
use pairdb_proto::storage::v1 as pb;
use pairdb_proto::storage::v1::storage_service_client::StorageServiceClient;
use pairdb_storage::engine::Engine;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;

struct Node {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), pairdb_storage::Error>>,
    /// The running node's engine (for fault injection).
    engine: Arc<Engine>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(node_id: u32) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = pairdb_storage::Config::for_node(node_id, dir.path().join("data"));
        let open_config = config.clone();
        let engine = tokio::task::spawn_blocking(move || pairdb_storage::open_engine(&open_config))
            .await
            .unwrap()
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pairdb_storage::run_with_engine(config, engine.clone(), listener, async {
            let _ = stopped.await;
        }));
        let node = Node { addr, stop: Some(stop), task, engine, _dir: dir };
        for _ in 0..200 {
            if node.try_client().await.is_some() {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("storage node did not start");
    }

    async fn try_client(&self) -> Option<StorageServiceClient<Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = StorageServiceClient::new(channel);
        client.stats(pb::StatsRequest {}).await.ok()?;
        Some(client)
    }

    async fn client(&self) -> StorageServiceClient<Channel> {
        self.try_client().await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn key_ref(tenant: &str, key: &str) -> pb::KeyRef {
    let partition = PartitionCount::default().partition_of(token_for(tenant, key.as_bytes())).0;
    pb::KeyRef { tenant_id: tenant.into(), key: key.into(), partition, tenant_generation: 0, token: None }
}

fn blind(actor: u64, value: &[u8]) -> VersionSet {
    let mut set = VersionSet::new();
    set.update(&VersionVector::new(), Actor(actor), Some(value.to_vec()), 1, None).unwrap();
    set
}

async fn get(client: &mut StorageServiceClient<Channel>, tenant: &str, key: &str) -> Option<VersionSet> {
    let response = client.get(pb::GetRequest { key: Some(key_ref(tenant, key)) }).await.unwrap().into_inner();
    response.found.then(|| decode_version_set(&response.version_set).unwrap())
}

fn reason(status: &tonic::Status) -> String {
    pairdb_service::errors::reason_of(status).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_writes_and_replicates_to_one_key_keep_every_sibling() {
    let node = Node::start(1).await;
    let client = node.client().await;
    let writes: Vec<_> = (0..64u8)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .coordinate_write(pb::CoordinateWriteRequest {
                        key: Some(key_ref("t", "hot")),
                        context: Vec::new(),
                        value: Some(vec![i]),
                        timestamp_ms: 1,
                        max_siblings: 64,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    let mut c = client.clone();
    assert_eq!(get(&mut c, "t", "hot").await.unwrap().siblings().len(), 64);

    let replicates: Vec<_> = (0..64u64)
        .map(|actor| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .replicate(pb::ReplicateRequest {
                        key: Some(key_ref("t", "merged")),
                        version_set: encode_version_set(&blind(1000 + actor, &actor.to_be_bytes())),
                        hint_for_node_id: 0,
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for r in replicates {
        assert!(!r.await.unwrap().into_inner().hinted);
    }
    assert_eq!(get(&mut c, "t", "merged").await.unwrap().siblings().len(), 64);
    node.stop().await;
}

#[tokio::test]
async fn coordinated_write_with_context_supersedes_and_returns_the_set() {
    let node = Node::start(1).await;
    let mut client = node.client().await;
    let first = client
        .coordinate_write(pb::CoordinateWriteRequest {
            key: Some(key_ref("t", "k")),
            value: Some(b"v1".to_vec()),
            timestamp_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first_set = decode_version_set(&first.version_set).unwrap();
    let second = client
        .coordinate_write(pb::CoordinateWriteRequest {
            key: Some(key_ref("t", "k")),
            context: encode_vector(first_set.vector()),
            value: Some(b"v2".to_vec()),
            timestamp_ms: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let second_set = decode_version_set(&second.version_set).unwrap();
    assert_eq!(second_set.live_values().len(), 1);
    assert_eq!(second_set.live_values()[0].value.as_deref(), Some(&b"v2"[..]));
    // The set carries what the response's removed vector and actor fields used to repeat.
    let vector: Vec<_> = second_set.vector().entries().collect();
    assert_eq!(vector.len(), 1);
    assert_eq!(vector[0].1, 2);
    assert_eq!(vector[0].0, second_set.siblings()[0].dot.actor);
    assert_eq!(get(&mut client, "t", "k").await.unwrap(), second_set);
    node.stop().await;
}

/// A conditional write re-checked by the coordinator: a version the router's read did not see
/// (not covered by `observed`) makes IF_ABSENT, IF_PRESENT and IF_CONTEXT_MATCHES refuse with
/// PRECONDITION_FAILED and apply nothing; once `observed` covers it they pass as the set allows.
#[tokio::test]
async fn coordinator_refuses_a_condition_broken_by_a_version_the_read_missed() {
    use pairdb_proto::common::v1::WriteCondition as Wire;
    let node = Node::start(1).await;
    let mut client = node.client().await;
    let conditional = |key: &str, condition: Wire, observed: &VersionVector| pb::CoordinateWriteRequest {
        key: Some(key_ref("t", key)),
        value: Some(b"conditional".to_vec()),
        timestamp_ms: 5,
        condition: condition as i32,
        observed: if observed.is_empty() { Vec::new() } else { encode_vector(observed) },
        ..Default::default()
    };
    let plain = |key: &str, value: Option<&[u8]>, context: &VersionVector| pb::CoordinateWriteRequest {
        key: Some(key_ref("t", key)),
        value: value.map(<[u8]>::to_vec),
        context: if context.is_empty() { Vec::new() } else { encode_vector(context) },
        timestamp_ms: 1,
        ..Default::default()
    };
    let empty = VersionVector::new();
    // "taken" holds a value the read (observed = nothing) did not see.
    let stored = client.coordinate_write(plain("taken", Some(b"first"), &empty)).await.unwrap().into_inner();
    let stored = decode_version_set(&stored.version_set).unwrap();
    for condition in [Wire::IfAbsent, Wire::IfContextMatches] {
        let status = client.coordinate_write(conditional("taken", condition, &empty)).await.unwrap_err();
        assert_eq!(reason(&status), "PRECONDITION_FAILED", "{condition:?}: {status:?}");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }
    assert_eq!(get(&mut client, "t", "taken").await.unwrap(), stored, "refusals applied nothing");
    // Seen by the read: IF_CONTEXT_MATCHES passes (the context covers the set).
    client.coordinate_write(conditional("taken", Wire::IfContextMatches, stored.vector())).await.unwrap();

    // "gone" was deleted after the read that saw its value: IF_PRESENT refuses.
    let first = client.coordinate_write(plain("gone", Some(b"v"), &empty)).await.unwrap().into_inner();
    let first = decode_version_set(&first.version_set).unwrap();
    client.coordinate_write(plain("gone", None, first.vector())).await.unwrap();
    let status =
        client.coordinate_write(conditional("gone", Wire::IfPresent, first.vector())).await.unwrap_err();
    assert_eq!(reason(&status), "PRECONDITION_FAILED", "{status:?}");
    // A read that saw the value and a replica that is behind (nothing unseen): IF_PRESENT passes.
    client.coordinate_write(conditional("fresh", Wire::IfPresent, first.vector())).await.unwrap();
    // An unknown condition is refused, never ignored.
    let unknown = pb::CoordinateWriteRequest { condition: 99, ..conditional("x", Wire::IfAbsent, &empty) };
    assert_eq!(reason(&client.coordinate_write(unknown).await.unwrap_err()), "INVALID_ARGUMENT");
    node.stop().await;
}

/// A coordinate call the router has given up on is refused, not applied late: its wall-clock deadline
/// (which also covers time the request waited before the node read it, e.g. while the process was
/// stopped) has passed. Nothing is stored, the reason says so (the router may then ask another
/// replica), and a call with budget left is applied.
#[tokio::test]
async fn coordinate_call_past_its_deadline_is_refused_and_applies_nothing() {
    let node = Node::start(1).await;
    let mut client = node.client().await;
    let now_ms = pairdb_storage::engine::now_ms();
    let late = pb::CoordinateWriteRequest {
        key: Some(key_ref("t", "late")),
        value: Some(b"v".to_vec()),
        timestamp_ms: now_ms,
        apply_within_ms: 60_000,
        apply_before_unix_ms: now_ms - 10 * pairdb_storage::engine::WALL_CLOCK_SKEW_ALLOWANCE_MS,
        ..Default::default()
    };
    let status = client.coordinate_write(late.clone()).await.unwrap_err();
    assert_eq!(reason(&status), "COORDINATE_DEADLINE_PASSED", "{status:?}");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(get(&mut client, "t", "late").await.is_none(), "a refused write must store nothing");
    // Within its budget the same write is applied.
    let in_time = pb::CoordinateWriteRequest { apply_before_unix_ms: now_ms + 60_000, ..late };
    client.coordinate_write(in_time).await.unwrap();
    assert_eq!(get(&mut client, "t", "late").await.unwrap().live_values().len(), 1);
    node.stop().await;
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_with_a_reason_and_the_node_keeps_serving() {
    let node = Node::start(1).await;
    let mut client = node.client().await;
    let write = |key: pb::KeyRef| pb::CoordinateWriteRequest {
        key: Some(key),
        value: Some(b"v".to_vec()),
        ..Default::default()
    };
    let good = key_ref("t", "k");
    let cases: Vec<(&str, pb::CoordinateWriteRequest, &str)> = vec![
        (
            "bad tenant",
            write(pb::KeyRef { tenant_id: "Bad Tenant".into(), ..good.clone() }),
            "INVALID_TENANT_ID",
        ),
        ("empty key", write(pb::KeyRef { key: String::new(), ..good.clone() }), "INVALID_KEY"),
        ("long key", write(key_ref("t", &"k".repeat(1025))), "INVALID_KEY"),
        (
            "partition outside ring",
            write(pb::KeyRef { partition: 1 << 20, ..good.clone() }),
            "INVALID_PARTITION",
        ),
        (
            "wrong partition",
            write(pb::KeyRef { partition: (good.partition + 1) % 4096, ..good.clone() }),
            "PARTITION_MISMATCH",
        ),
        (
            "garbage context",
            pb::CoordinateWriteRequest { context: vec![1, 2, 3, 4, 5, 6], ..write(good.clone()) },
            "MALFORMED_VERSION",
        ),
        (
            "oversized value",
            pb::CoordinateWriteRequest { value: Some(vec![0; 4 * 1024 * 1024 + 1]), ..write(good.clone()) },
            "VALUE_TOO_LARGE",
        ),
    ];
    for (name, request, expected) in cases {
        let status = client.coordinate_write(request).await.unwrap_err();
        assert_eq!(reason(&status), expected, "{name}: {status:?}");
    }
    let status = client
        .replicate(pb::ReplicateRequest {
            key: Some(good.clone()),
            version_set: vec![1, 200, 3],
            hint_for_node_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(reason(&status), "MALFORMED_VERSION");
    // Peer calls carry at most MAX_PEER_BATCH_ITEMS records.
    let over = pairdb_storage::batch::MAX_PEER_BATCH_ITEMS + 1;
    let status = client
        .purge_tombstones(pb::PurgeTombstonesRequest {
            partition: good.partition,
            keys: vec![pb::KeyDigest { tenant_id: "t".into(), key: "k".into(), ..Default::default() }; over],
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_ARGUMENT", "{status:?}");
    let status = client
        .merge_batch(pb::MergeBatchRequest {
            partition: good.partition,
            records: vec![pb::Record { tenant_id: "t".into(), key: "k".into(), ..Default::default() }; over],
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_ARGUMENT", "{status:?}");
    // Still serving.
    client.coordinate_write(write(good)).await.unwrap();
    node.stop().await;
}

#[tokio::test]
async fn partition_stream_matches_a_scan_and_resumes_after_a_cut() {
    let node = Node::start(1).await;
    let mut client = node.client().await;
    let q = PartitionCount::default();
    // Put many keys into one partition by picking keys that hash there.
    let target = key_ref("t", "anchor").partition;
    let mut expected = BTreeSet::new();
    let mut i = 0;
    while expected.len() < 300 {
        let key = format!("k{i}");
        i += 1;
        if q.partition_of(token_for("t", key.as_bytes())).0 == target {
            client
                .replicate(pb::ReplicateRequest {
                    key: Some(key_ref("t", &key)),
                    version_set: encode_version_set(&blind(1, key.as_bytes())),
                    hint_for_node_id: 0,
                })
                .await
                .unwrap();
            expected.insert(key);
        } else if i % 50 == 0 {
            // Some neighbours in other partitions that must never appear.
            client
                .replicate(pb::ReplicateRequest {
                    key: Some(key_ref("t", &key)),
                    version_set: encode_version_set(&blind(1, b"other")),
                    hint_for_node_id: 0,
                })
                .await
                .unwrap();
        }
    }
    // Read two batches, drop the stream (a cut), resume from the last cursor.
    let mut seen = BTreeSet::new();
    let mut stream = client
        .stream_partition(pb::StreamPartitionRequest {
            partition: target,
            batch_size: 64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut cursor = Vec::new();
    for _ in 0..2 {
        let batch = stream.message().await.unwrap().unwrap();
        for record in batch.records {
            assert!(seen.insert(record.key));
        }
        cursor = batch.next_cursor;
    }
    drop(stream);
    let mut stream = client
        .stream_partition(pb::StreamPartitionRequest {
            partition: target,
            batch_size: 64,
            cursor,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(batch) = stream.message().await.unwrap() {
        for record in batch.records {
            assert_eq!(q.partition_of(token_for(&record.tenant_id, record.key.as_bytes())).0, target);
            assert!(seen.insert(record.key), "record repeated after resume");
        }
        if batch.done {
            break;
        }
    }
    assert_eq!(seen, expected);
    // Merkle summary covers exactly those keys.
    let summary = client
        .merkle_summary(pb::MerkleSummaryRequest { partition: target, level: 0, node_indexes: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.nodes.len(), 1);
    assert_eq!(summary.nodes[0].keys, 300);
    // Level 1 has two nodes: asking for more indexes than that is refused, not filtered.
    let too_many = client
        .merkle_summary(pb::MerkleSummaryRequest { partition: target, level: 1, node_indexes: vec![0; 3] })
        .await
        .expect_err("three indexes at a two-node level");
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test]
async fn hints_are_kept_for_the_owner_and_delivered_to_it() {
    let holder = Node::start(1).await;
    let owner = Node::start(2).await;
    let mut holder_client = holder.client().await;
    let mut owner_client = owner.client().await;
    for i in 0..40 {
        let response = holder_client
            .replicate(pb::ReplicateRequest {
                key: Some(key_ref("t", &format!("h{i}"))),
                version_set: encode_version_set(&blind(5, b"while you were away")),
                hint_for_node_id: 2,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.hinted);
    }
    // Hints are not data: the holder does not serve them as its own replica.
    assert!(get(&mut holder_client, "t", "h0").await.is_none());
    let listed = holder_client
        .list_hints(pb::ListHintsRequest { target_node_id: 2, partition: None, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.hints.len(), 40);
    assert_eq!(listed.total_pending, 40);

    // The holder's delivery (which its hint worker runs when the owner is live in the topology).
    let clients = pairdb_service::clients::InternalClients::insecure();
    let owner_id = NodeId(2);
    let report =
        pairdb_storage::workers::hints::deliver(&holder.engine, &clients, owner_id, &owner.addr.to_string())
            .await
            .unwrap();
    assert_eq!(report.delivered, 40);
    assert_eq!(holder.engine.count_hints(NodeId(2)), 0);
    for i in 0..40 {
        assert_eq!(
            get(&mut owner_client, "t", &format!("h{i}")).await.unwrap(),
            blind(5, b"while you were away")
        );
    }
    let stats = holder_client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.node_id, 1);
    assert!(!stats.write_path_poisoned);
    holder.stop().await;
    owner.stop().await;
}

/// Waits on the gRPC health Watch stream (no polling) until the node reports `wanted`.
async fn await_health(addr: SocketAddr, wanted: ServingStatus) {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut updates = HealthClient::new(channel)
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let wanted = match wanted {
        ServingStatus::Serving => WireStatus::Serving,
        ServingStatus::NotServing => WireStatus::NotServing,
        ServingStatus::Unknown => WireStatus::Unknown,
    };
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.message().await.unwrap() {
            if update.status() == wanted {
                return;
            }
        }
        panic!("health stream ended before {wanted:?}");
    })
    .await;
    assert!(seen.is_ok(), "node did not report {wanted:?} within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fsync_refuses_writes_with_write_path_poisoned_keeps_reads_and_turns_not_ready() {
    let node = Node::start(1).await;
    let mut client = node.client().await;
    await_health(node.addr, ServingStatus::Serving).await;
    let write = |key: &str| pb::CoordinateWriteRequest {
        key: Some(key_ref("t", key)),
        value: Some(key.as_bytes().to_vec()),
        timestamp_ms: 1,
        ..Default::default()
    };
    client.coordinate_write(write("before")).await.unwrap();

    // The node runs with `--sync always`: the next fsync of the journal fails.
    node.engine.inject_persist_failure_for_tests();
    let refused = client.coordinate_write(write("doomed")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused), "WRITE_PATH_POISONED");
    assert!(refused.message().contains("injected fault"), "{}", refused.message());

    // Poisoned for good: the disk "works" again, but nothing more is written or fsynced.
    let refused = client.coordinate_write(write("after")).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (tonic::Code::Unavailable, "WRITE_PATH_POISONED")
    );
    let refused = client
        .replicate(pb::ReplicateRequest {
            key: Some(key_ref("t", "replicated")),
            version_set: encode_version_set(&blind(7, b"r")),
            hint_for_node_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (tonic::Code::Unavailable, "WRITE_PATH_POISONED")
    );

    // Reads go on; the unacknowledged write is not there.
    assert_eq!(get(&mut client, "t", "before").await.unwrap().siblings().len(), 1);
    assert!(get(&mut client, "t", "doomed").await.is_none());
    assert!(get(&mut client, "t", "after").await.is_none());
    let stats = client.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.write_path_poisoned, "{stats:?}");

    await_health(node.addr, ServingStatus::NotServing).await;
    let (status, body) = http_get(node.addr, "/health/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("write path poisoned"), "{body}");
    node.stop().await;
}

/// A minimal HTTP/1.1 GET against the node's port (the HTTP routes share it with gRPC).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// `GetMany` answers records the record cache holds on the runtime thread and the rest from the
/// engine, each at its position: a cached record, a refused key, a record the cache does not hold,
/// an absent key — and the same again once the engine read filled the cache.
#[tokio::test]
async fn get_many_answers_cached_and_uncached_records_in_order() {
    let node = Node::start(1).await;
    let mut client = node.client().await;
    let cached = client
        .coordinate_write(pb::CoordinateWriteRequest {
            key: Some(key_ref("t", "cached")),
            value: Some(b"a".to_vec()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .version_set;
    // Planted past the cache: on disk, not cached.
    let planted = encode_version_set(&blind(7, b"b"));
    let record = pairdb_storage::keys::RecordKey::new(PartitionCount::default(), "t", "planted");
    node.engine.insert_raw_record_for_tests(&record, &planted).unwrap();
    let good = key_ref("t", "cached");
    let wrong_partition = pb::KeyRef { partition: (good.partition + 1) % 4096, ..good.clone() };
    let gets: Vec<pb::GetRequest> =
        [good.clone(), wrong_partition, key_ref("t", "planted"), key_ref("t", "absent"), good]
            .into_iter()
            .map(|key| pb::GetRequest { key: Some(key) })
            .collect();
    for round in 0..2 {
        let results =
            client.get_many(pb::GetManyRequest { gets: gets.clone() }).await.unwrap().into_inner().results;
        let found: Vec<(bool, Vec<u8>)> = results.iter().map(|r| (r.found, r.version_set.clone())).collect();
        assert_eq!(
            found,
            vec![
                (true, cached.clone()),
                (false, Vec::new()),
                (true, planted.clone()),
                (false, Vec::new()),
                (true, cached.clone())
            ],
            "round {round}"
        );
        let errors: Vec<Option<String>> =
            results.iter().map(|r| r.error.as_ref().map(|e| e.reason.clone())).collect();
        assert_eq!(
            errors,
            vec![None, Some("PARTITION_MISMATCH".to_owned()), None, None, None],
            "round {round}"
        );
    }
    assert_eq!(get(&mut client, "t", "planted").await, Some(blind(7, b"b")));
    node.stop().await;
}
