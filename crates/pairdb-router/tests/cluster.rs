//! The router's request paths against three real storage nodes on loopback (in-process `run` on
//! port-0 listeners). The cluster view is fed through the same watch-event path meta uses (a snapshot
//! event), so everything below the metadata service is real: storage engines on disk, gRPC, the core
//! coordinators, hinted handoff and read repair. End-to-end tests with meta and processes live in the
//! top-level `tests` crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pairdb_core::condition::WriteCondition;
use pairdb_core::encoding::decode_version_set;
use pairdb_core::expiry::Requested;
use pairdb_core::quorum::Consistency;
use pairdb_core::reason::HasReason;
use pairdb_core::ring::{Assignment, NodeId, NodeSpec};
use pairdb_core::token::{PartitionCount, token_for};
use pairdb_proto::cluster::v1 as cpb;
use pairdb_proto::storage::v1 as spb;
use pairdb_proto::storage::v1::storage_service_client::StorageServiceClient;
use pairdb_router::error::RouterError;
use pairdb_router::kv::{CurrentState, KvRouter, Timing, WriteOutcome, WriteSpec};
use pairdb_router::listing::ListRequest;
use pairdb_router::pool::StoragePool;
use pairdb_router::request::BatchItem;
use pairdb_router::request::RequestOptions;
use pairdb_router::view::SharedView;
use tokio::sync::oneshot;

const QUORUM: Consistency = Consistency::Quorum;
const ONE: Consistency = Consistency::One;
const ALL: Consistency = Consistency::All;

struct StorageNode {
    id: u32,
    addr: SocketAddr,
    dir: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), pairdb_storage::Error>>>,
}

impl StorageNode {
    async fn start(id: u32, dir: std::path::PathBuf, addr: Option<SocketAddr>) -> StorageNode {
        let listener = tokio::net::TcpListener::bind(addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let config = pairdb_storage::Config::for_node(id, dir.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pairdb_storage::run(config, listener, async {
            let _ = stopped.await;
        }));
        let node = StorageNode { id, addr, dir, stop: Some(stop), task: Some(task) };
        for _ in 0..200 {
            if node.client().await.is_some() {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("storage node {id} did not start");
    }

    async fn client(&self) -> Option<StorageServiceClient<tonic::transport::Channel>> {
        let mut client = StorageServiceClient::connect(format!("http://{}", self.addr)).await.ok()?;
        client.stats(spb::StatsRequest {}).await.ok()?;
        Some(client)
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        let restarted = StorageNode::start(self.id, self.dir.clone(), Some(self.addr)).await;
        *self = restarted;
    }

    /// This replica's own copy of a key (not through the router).
    async fn local(&self, tenant: &str, key: &str) -> Option<pairdb_core::dvv::VersionSet> {
        let partition = PartitionCount::default().partition_of(token_for(tenant, key.as_bytes())).0;
        let response = self
            .client()
            .await
            .unwrap()
            .get(spb::GetRequest {
                key: Some(spb::KeyRef {
                    tenant_id: tenant.into(),
                    key: key.into(),
                    partition,
                    tenant_generation: 0,
                    token: None,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        response.found.then(|| decode_version_set(&response.version_set).unwrap())
    }
}

struct Cluster {
    nodes: Vec<StorageNode>,
    router: KvRouter,
    _dir: tempfile::TempDir,
}

fn tenant(id: &str, n: u32, lww: bool) -> cpb::TenantConfig {
    cpb::TenantConfig {
        tenant_id: id.into(),
        replication_factor: n,
        default_consistency: pairdb_proto::convert::consistency_to_wire(Some(QUORUM)),
        conflict_mode: if lww { 2 } else { 1 },
        max_value_bytes: 1024 * 1024,
        max_siblings: 64,
        ..Default::default()
    }
}

impl Cluster {
    /// `nodes` storage nodes, a tenant `t` with N = 3 and a tenant `lww` in LWW mode.
    async fn start(nodes: u32) -> Cluster {
        Self::start_with(nodes, StoragePool::new(256, Duration::from_millis(300))).await
    }

    /// [`Cluster::start`] with the router's storage clients configured as `pool`.
    async fn start_with(nodes: u32, pool: StoragePool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut started = Vec::new();
        for id in 1..=nodes {
            started.push(StorageNode::start(id, dir.path().join(format!("node-{id}")), None).await);
        }
        let specs: Vec<NodeSpec> =
            (1..=nodes).map(|id| NodeSpec { id: NodeId(id), weight: 1, zone: None }).collect();
        let assignment = Assignment::compute(None, &specs, PartitionCount::default()).unwrap();
        let topology = cpb::Topology {
            epoch: 1,
            partition_count: 4096,
            partitions: assignment
                .lists()
                .map(|(_, list)| cpb::PartitionNodes { node_ids: list.iter().map(|n| n.0).collect() })
                .collect(),
        };
        let snapshot = cpb::WatchEvent {
            revision: 1,
            event: Some(cpb::watch_event::Event::Snapshot(cpb::ClusterSnapshot {
                current: Some(topology),
                pending: None,
                nodes: started
                    .iter()
                    .map(|n| cpb::NodeInfo {
                        node_id: n.id,
                        address: n.addr.to_string(),
                        weight: 1,
                        status: 2,
                        ..Default::default()
                    })
                    .collect(),
                tenants: vec![tenant("t", 3, false), tenant("lww", 3, true)],
                api_keys: vec![],
                context_keys: Some(cpb::ContextKeys {
                    current: Some(cpb::ContextKey { key_id: 1, secret: vec![7; 32] }),
                    previous: None,
                }),
                live_routers: 1,
            })),
        };
        let view = SharedView::default();
        view.apply(&snapshot).unwrap();
        let pool = Arc::new(pool);
        let router = KvRouter::new(
            view,
            pool,
            Timing { request_timeout_ms: 1500, max_request_timeout_ms: 5000, read_speculative_after_ms: 30 },
        );
        Cluster { nodes: started, router, _dir: dir }
    }

    /// The preference list of `key` in tenant `t` as node indexes into `self.nodes`.
    fn owners(&self, tenant: &str, key: &str) -> Vec<usize> {
        let view = self.router.view().load();
        let current = view.current.as_ref().unwrap();
        let partition = current.partition_count().partition_of(token_for(tenant, key.as_bytes()));
        current.preference_list(partition, 3).iter().map(|n| (n.0 - 1) as usize).collect()
    }
}

/// An unconditional write through `router`.
async fn write(
    router: &KvRouter,
    tenant: &str,
    key: &str,
    value: Option<Vec<u8>>,
    context: &[u8],
    read_first: bool,
    options: RequestOptions,
) -> Result<WriteOutcome, RouterError> {
    router.write(tenant, key, WriteSpec { value, context, read_first, ..WriteSpec::default() }, options).await
}

fn opts(consistency: Consistency) -> RequestOptions {
    RequestOptions { consistency: Some(consistency), ..Default::default() }
}

fn values(outcome: &pairdb_router::kv::ReadOutcome) -> Vec<Vec<u8>> {
    let mut values: Vec<Vec<u8>> = outcome.siblings.iter().map(|s| s.value.clone().unwrap()).collect();
    values.sort();
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_writes_are_read_back_and_concurrent_writes_become_siblings() {
    let cluster = Cluster::start(3).await;
    let r = &cluster.router;
    let ack = write(r, "t", "k", Some(b"v1".to_vec()), &[], false, opts(QUORUM)).await.unwrap();
    assert!(ack.acks >= 2 && ack.required == 2);
    assert_eq!(values(&r.get("t", "k", opts(QUORUM)).await.unwrap()), vec![b"v1".to_vec()]);

    // Two blind writes: both survive as siblings; a write with the read's context resolves them.
    write(r, "t", "k", Some(b"a".to_vec()), &[], false, opts(QUORUM)).await.unwrap();
    let read = r.get("t", "k", opts(ALL)).await.unwrap();
    assert_eq!(values(&read), vec![b"a".to_vec(), b"v1".to_vec()]);
    write(r, "t", "k", Some(b"resolved".to_vec()), &read.context, false, opts(QUORUM)).await.unwrap();
    assert_eq!(values(&r.get("t", "k", opts(QUORUM)).await.unwrap()), vec![b"resolved".to_vec()]);

    // 20 concurrent writers without context: 20 siblings, none lost.
    let writers: Vec<_> = (0..20u8)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move {
                write(&r, "t", "busy", Some(vec![i]), &[], false, opts(QUORUM)).await.unwrap()
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(r.get("t", "busy", opts(ALL)).await.unwrap().siblings.len(), 20);

    // Missing keys are NOT_FOUND, not quorum errors; W or R above N is INVALID_CONSISTENCY.
    let missing = r.get("t", "never-written", opts(QUORUM)).await.unwrap_err();
    assert_eq!(missing.reason(), "KEY_NOT_FOUND");
    let too_many = RequestOptions { explicit: 4, ..Default::default() };
    assert_eq!(r.get("t", "k", too_many).await.unwrap_err().reason(), "INVALID_CONSISTENCY");
    assert_eq!(r.get("nobody", "k", opts(QUORUM)).await.unwrap_err().reason(), "TENANT_NOT_FOUND");
    // LWW tenants return one winner.
    write(r, "lww", "k", Some(b"first".to_vec()), &[], false, opts(QUORUM)).await.unwrap();
    write(r, "lww", "k", Some(b"second".to_vec()), &[], false, opts(QUORUM)).await.unwrap();
    assert_eq!(values(&r.get("lww", "k", opts(QUORUM)).await.unwrap()), vec![b"second".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_and_overwrites_supersede_what_the_read_saw() {
    let cluster = Cluster::start(3).await;
    let r = &cluster.router;
    write(r, "t", "gone", Some(b"x".to_vec()), &[], false, opts(QUORUM)).await.unwrap();
    write(r, "t", "gone", Some(b"y".to_vec()), &[], false, opts(QUORUM)).await.unwrap();
    // Delete without context reads first and removes both siblings.
    write(r, "t", "gone", None, &[], true, opts(QUORUM)).await.unwrap();
    assert_eq!(r.get("t", "gone", opts(ALL)).await.unwrap_err().reason(), "KEY_NOT_FOUND");
    // Delete with context.
    let ack = write(r, "t", "ctx", Some(b"x".to_vec()), &[], false, opts(ALL)).await.unwrap();
    write(r, "t", "ctx", None, &ack.context, false, opts(QUORUM)).await.unwrap();
    // A context is bound to its key: the same context for another key is refused.
    let elsewhere = write(r, "t", "ctx2", None, &ack.context, false, opts(QUORUM)).await.unwrap_err();
    assert_eq!(elsewhere.reason(), "INVALID_CONTEXT");
    assert_eq!(r.get("t", "ctx", opts(QUORUM)).await.unwrap_err().reason(), "KEY_NOT_FOUND");
    // Overwrite replaces what a read saw.
    write(r, "t", "ow", Some(b"a".to_vec()), &[], false, opts(ALL)).await.unwrap();
    write(r, "t", "ow", Some(b"b".to_vec()), &[], false, opts(ALL)).await.unwrap();
    write(r, "t", "ow", Some(b"final".to_vec()), &[], true, opts(QUORUM)).await.unwrap();
    assert_eq!(values(&r.get("t", "ow", opts(ALL)).await.unwrap()), vec![b"final".to_vec()]);
    // Bad input.
    assert_eq!(
        write(r, "t", "", Some(vec![1]), &[], false, opts(ONE)).await.unwrap_err().reason(),
        "INVALID_KEY"
    );
    assert_eq!(
        write(r, "t", "k", Some(vec![1]), &[9, 9, 9, 9, 9, 9], false, opts(ONE)).await.unwrap_err().reason(),
        "INVALID_CONTEXT"
    );
    assert_eq!(
        write(r, "t", "k", Some(vec![0; 1024 * 1024 + 1]), &[], false, opts(ONE)).await.unwrap_err().reason(),
        "VALUE_TOO_LARGE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_replica_is_covered_by_a_hint_on_a_fallback() {
    let mut cluster = Cluster::start(4).await;
    let key = "handoff";
    let owners = cluster.owners("t", key);
    let down = owners[2];
    cluster.nodes[down].stop().await;

    // QUORUM and non-strict ALL succeed (a fallback holds a hint); strict ALL fails.
    let r = cluster.router.clone();
    write(&r, "t", key, Some(b"while-down".to_vec()), &[], false, opts(QUORUM)).await.unwrap();
    let all = write(&r, "t", "k-all", Some(b"x".to_vec()), &[], false, opts(ALL)).await;
    let all_owners = cluster.owners("t", "k-all");
    if all_owners.contains(&down) {
        let ack = all.unwrap();
        assert_eq!(ack.hinted_acks, 1);
        let strict = RequestOptions { consistency: Some(ALL), strict_quorum: true, ..Default::default() };
        let err = write(&r, "t", "k-all", Some(b"y".to_vec()), &[], false, strict).await.unwrap_err();
        assert_eq!(err.reason(), "QUORUM_NOT_REACHED");
    }
    let read = r.get("t", key, opts(QUORUM)).await.unwrap();
    assert_eq!(values(&read), vec![b"while-down".to_vec()]);

    // A fallback keeps the write as a hint for the owner (storage nodes that follow meta deliver
    // it when the owner is back: tests/tests/router.rs).
    let target = down as u32 + 1;
    let mut hinted = Vec::new();
    for node in cluster.nodes.iter().filter(|n| n.id != target) {
        let request = spb::ListHintsRequest { target_node_id: target, partition: None, limit: 100 };
        let hints = node.client().await.unwrap().list_hints(request).await.unwrap().into_inner().hints;
        hinted.extend(hints.into_iter().filter(|h| h.key == key));
    }
    assert_eq!(hinted.len(), 1, "exactly one fallback holds the hint: {hinted:?}");
    let set = decode_version_set(&hinted[0].version_set).unwrap();
    assert_eq!(set.live_values()[0].value.as_deref(), Some(&b"while-down"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_repair_brings_stale_replicas_up_to_date() {
    let mut cluster = Cluster::start(3).await;
    let key = "repair-me";
    // Stop two replicas, write at ONE, bring them back.
    cluster.nodes[1].stop().await;
    cluster.nodes[2].stop().await;
    write(&cluster.router, "t", key, Some(b"lonely".to_vec()), &[], false, opts(ONE)).await.unwrap();
    // Let the write's background replication to the stopped nodes time out (300 ms) first, or the
    // lazily reconnecting channel would deliver it to the restarted nodes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    cluster.nodes[1].restart().await;
    cluster.nodes[2].restart().await;
    assert!(cluster.nodes[1].local("t", key).await.is_none());
    // One read at ALL repairs both.
    let read = cluster.router.get("t", key, opts(ALL)).await.unwrap();
    assert_eq!(values(&read), vec![b"lonely".to_vec()]);
    for node in &cluster.nodes {
        let mut repaired = None;
        for _ in 0..50 {
            repaired = node.local("t", key).await;
            if repaired.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            repaired.unwrap().live_values()[0].value.as_deref(),
            Some(&b"lonely"[..]),
            "node {}",
            node.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overwrite_supersedes_what_its_read_saw_and_keeps_an_unseen_write() {
    let mut cluster = Cluster::start(3).await;
    let key = "contested";
    let owners = cluster.owners("t", key);
    // A write the overwrite's read will not see: only the last preference replica takes it.
    cluster.nodes[owners[0]].stop().await;
    cluster.nodes[owners[1]].stop().await;
    write(&cluster.router, "t", key, Some(b"unseen".to_vec()), &[], false, opts(ONE)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    cluster.nodes[owners[0]].restart().await;
    cluster.nodes[owners[1]].restart().await;

    // A fresh router (no suspects) reads at ONE from the first replica, which misses the value, so the
    // overwrite carries an empty context and must not destroy the unseen write.
    let fresh = KvRouter::new(
        cluster.router.view().clone(),
        Arc::new(StoragePool::new(64, Duration::from_millis(300))),
        Timing { request_timeout_ms: 1500, max_request_timeout_ms: 5000, read_speculative_after_ms: 1000 },
    );
    write(&fresh, "t", key, Some(b"overwrite".to_vec()), &[], true, opts(ONE)).await.unwrap();
    let read = fresh.get("t", key, opts(ALL)).await.unwrap();
    assert_eq!(values(&read), vec![b"overwrite".to_vec(), b"unseen".to_vec()]);

    // An overwrite whose read sees both supersedes both.
    write(&fresh, "t", key, Some(b"final".to_vec()), &[], true, opts(ALL)).await.unwrap();
    assert_eq!(values(&fresh.get("t", key, opts(ALL)).await.unwrap()), vec![b"final".to_vec()]);
}

/// A conditional write through `router`.
async fn write_if(
    router: &KvRouter,
    key: &str,
    value: Option<&[u8]>,
    context: &[u8],
    condition: WriteCondition,
) -> Result<WriteOutcome, RouterError> {
    let spec = WriteSpec {
        value: value.map(<[u8]>::to_vec),
        context,
        read_first: value.is_none(),
        condition: Some(condition),
        ..WriteSpec::default()
    };
    router.write("t", key, spec, opts(QUORUM)).await
}

/// The details a failed condition carries.
fn current_of(error: RouterError) -> Box<CurrentState> {
    match error {
        RouterError::PreconditionFailed { current: Some(current), .. } => current,
        other => panic!("expected PRECONDITION_FAILED with details, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditions_hold_or_refuse_with_the_current_state() {
    let cluster = Cluster::start(3).await;
    let r = &cluster.router;
    use WriteCondition::{IfAbsent, IfContextMatches, IfPresent};
    // IF_PRESENT on a key never written; IF_ABSENT creates it once.
    let error = write_if(r, "k", Some(b"x"), &[], IfPresent).await.unwrap_err();
    assert_eq!(error.reason(), "PRECONDITION_FAILED");
    let current = current_of(error);
    assert!(current.siblings.is_empty());
    let created = write_if(r, "k", Some(b"first"), &[], IfAbsent).await.unwrap();
    let current = current_of(write_if(r, "k", Some(b"second"), &[], IfAbsent).await.unwrap_err());
    assert_eq!(current.siblings.iter().map(|s| s.value.clone().unwrap()).collect::<Vec<_>>(), vec![b"first"]);
    assert_eq!(current.context, created.context, "the details carry the context to retry with");
    // IF_CONTEXT_MATCHES: the current context passes, the stale one (and a blind write) do not.
    let updated = write_if(r, "k", Some(b"2"), &created.context, IfContextMatches).await.unwrap();
    let stale = write_if(r, "k", Some(b"3"), &created.context, IfContextMatches).await.unwrap_err();
    assert_eq!(current_of(stale).context, updated.context);
    assert!(write_if(r, "k", Some(b"3"), &[], IfContextMatches).await.is_err());
    // A conditional delete, then IF_ABSENT over the tombstone: one sibling, no resurrected value.
    write_if(r, "k", None, &[], IfPresent).await.unwrap();
    assert!(write_if(r, "k", None, &[], IfPresent).await.is_err(), "deleted: nothing present");
    write_if(r, "k", Some(b"again"), &[], IfAbsent).await.unwrap();
    let read = r.get("t", "k", opts(ALL)).await.unwrap();
    assert_eq!(values(&read), vec![b"again".to_vec()]);
    for node in &cluster.nodes {
        let mut local = None;
        for _ in 0..50 {
            local = node.local("t", "k").await;
            if local.as_ref().is_some_and(|s| s.siblings().len() == 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(local.unwrap().siblings().len(), 1, "the tombstone was superseded on node {}", node.id);
    }
}

/// Two routers (their own pools and failure views) race 16 IF_ABSENT writers each on the same keys:
/// every key has a winner, every winner's value is stored, every loser was refused with details.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_if_absent_writers_never_lose_an_acknowledged_value() {
    let cluster = Cluster::start(3).await;
    let second = KvRouter::new(
        cluster.router.view().clone(),
        Arc::new(StoragePool::new(256, Duration::from_millis(300))),
        Timing { request_timeout_ms: 1500, max_request_timeout_ms: 5000, read_speculative_after_ms: 30 },
    );
    let routers = [cluster.router.clone(), second];
    let keys: Vec<String> = (0..20).map(|i| format!("race-{i}")).collect();
    let mut writers = Vec::new();
    for writer in 0..32usize {
        let (router, keys) = (routers[writer % 2].clone(), keys.clone());
        writers.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for key in &keys {
                let value = format!("writer-{writer}");
                match write_if(&router, key, Some(value.as_bytes()), &[], WriteCondition::IfAbsent).await {
                    Ok(_) => won.push((key.clone(), value)),
                    Err(error) => assert!(!current_of(error).siblings.is_empty(), "a loser sees a value"),
                }
            }
            won
        }));
    }
    let mut winners: Vec<(String, String)> = Vec::new();
    for writer in writers {
        winners.extend(writer.await.unwrap());
    }
    for key in &keys {
        let stored = values(&cluster.router.get("t", key, opts(ALL)).await.unwrap());
        let won: Vec<Vec<u8>> =
            winners.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_bytes().to_vec()).collect();
        assert!(!won.is_empty(), "{key} has a winner");
        for value in &won {
            assert!(stored.contains(value), "{key}: acknowledged {value:?} is stored ({stored:?})");
        }
        assert_eq!(stored.len(), won.len(), "{key}: only winners' values are stored");
    }
}

/// A put with a TTL.
async fn put_ttl(router: &KvRouter, key: &str, value: &[u8], context: &[u8], ttl_ms: u64) -> WriteOutcome {
    let spec = WriteSpec {
        value: Some(value.to_vec()),
        context,
        expiry: Requested::AfterMs(ttl_ms),
        ..WriteSpec::default()
    };
    router.write("t", key, spec, opts(QUORUM)).await.unwrap()
}

/// Expiry on every read path, replicated identically; a write with the context of the expired
/// read supersedes it; Touch extends exactly the siblings its context names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_values_disappear_from_reads_and_touch_extends_only_what_it_names() {
    let cluster = Cluster::start(3).await;
    let r = &cluster.router;
    let written = put_ttl(r, "session", b"s1", &[], 400).await;
    let expires = written.set.siblings()[0].expires_at_ms.expect("stamped by the router");
    let read = r.get("t", "session", opts(ALL)).await.unwrap();
    assert_eq!(values(&read), vec![b"s1".to_vec()]);
    for node in &cluster.nodes {
        let local = node.local("t", "session").await.unwrap();
        assert_eq!(
            local.siblings()[0].expires_at_ms,
            Some(expires),
            "node {} holds the same expiry",
            node.id
        );
    }
    // A sibling without expiry beside it, then touch with the first read's context only.
    let other = write(r, "t", "session", Some(b"keep".to_vec()), &[], false, opts(ALL)).await.unwrap();
    let touch = WriteSpec {
        context: &read.context,
        expiry: Requested::AfterMs(60_000),
        touch: true,
        ..WriteSpec::default()
    };
    let touched = r.write("t", "session", touch, opts(QUORUM)).await.unwrap();
    let expiries: Vec<(Vec<u8>, Option<u64>)> =
        touched.set.siblings().iter().map(|s| (s.value.clone().unwrap(), s.expires_at_ms)).collect();
    assert_eq!(expiries.len(), 2, "{expiries:?}");
    assert!(expiries.iter().any(|(v, at)| v == b"s1" && at.is_some_and(|at| at > expires + 30_000)));
    assert!(
        expiries.contains(&(b"keep".to_vec(), None)),
        "the sibling the context did not name is untouched"
    );
    drop(other);

    // Expiry: gone from get, get-many's path and listings; the key's history stays.
    put_ttl(r, "short", b"x", &[], 300).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(r.get("t", "short", opts(ALL)).await.unwrap_err().reason(), "KEY_NOT_FOUND");
    let listed =
        r.list("t", ListRequest { prefix: "short".into(), ..ListRequest::default() }, false).await.unwrap();
    assert!(listed.entries.is_empty(), "an expired key is not listed");
    let touch = WriteSpec {
        context: &read.context,
        expiry: Requested::AfterMs(1),
        touch: true,
        ..WriteSpec::default()
    };
    assert!(r.write("t", "short", touch, opts(QUORUM)).await.is_err(), "nothing live to touch");
    // A write with the context of a read that saw the expired value supersedes it.
    let history = cluster.nodes[0].local("t", "short").await.unwrap();
    assert_eq!(history.siblings().len(), 1, "the expired sibling is still stored");
    let context = pairdb_core::context::seal_context(
        history.vector(),
        pairdb_core::context::ContextBinding { tenant: "t", key: "short" },
        r.view().load().context_keys.current().unwrap(),
    );
    let rewritten = write(r, "t", "short", Some(b"y".to_vec()), &context, false, opts(ALL)).await.unwrap();
    assert_eq!(rewritten.set.siblings().len(), 1, "the expired sibling was superseded");
    // A TTL in the past or two expiries at once is refused.
    let both = WriteSpec { value: Some(b"z".to_vec()), expiry: Requested::AtMs(1), ..WriteSpec::default() };
    assert_eq!(r.write("t", "k", both, opts(ONE)).await.unwrap_err().reason(), "INVALID_ARGUMENT");
}

/// A 1,000-item batch with invalid items answers per item: valid ones are stored (one dot each,
/// replicated everywhere), invalid ones get the reason a single write would give, conditional and
/// delete items take their own path, and nothing else is affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_answers_per_item_and_stores_every_valid_one() {
    let cluster = Cluster::start(3).await;
    let r = &cluster.router;
    write(r, "t", "taken", Some(b"old".to_vec()), &[], false, opts(ALL)).await.unwrap();
    let doomed = write(r, "t", "doomed", Some(b"x".to_vec()), &[], false, opts(ALL)).await.unwrap();
    let put = |key: String, value: Vec<u8>| BatchItem {
        key,
        value: Some(value),
        context: Vec::new(),
        overwrite: false,
        condition: None,
        expiry: Requested::TenantDefault,
    };
    let mut items: Vec<BatchItem> =
        (0..995).map(|i| put(format!("b-{i}"), format!("v{i}").into_bytes())).collect();
    items.push(put(String::new(), b"no key".to_vec()));
    items.push(put("big".into(), vec![0; 1024 * 1024 + 1]));
    items.push(BatchItem { context: vec![9; 12], ..put("forged".into(), b"x".to_vec()) });
    items.push(BatchItem {
        condition: Some(WriteCondition::IfAbsent),
        ..put("taken".into(), b"new".to_vec())
    });
    items.push(BatchItem {
        value: None,
        context: doomed.context.clone(),
        ..put("doomed".into(), Vec::new())
    });
    let results = r.write_many("t", items, opts(QUORUM)).await;
    assert_eq!(results.len(), 1000);
    for (i, result) in results.iter().enumerate().take(995) {
        assert!(result.is_ok(), "item {i}: {result:?}");
    }
    let reasons: Vec<&str> =
        results[995..].iter().map(|r| r.as_ref().map_or_else(|e| e.reason().as_str(), |_| "OK")).collect();
    assert_eq!(reasons, ["INVALID_KEY", "VALUE_TOO_LARGE", "INVALID_CONTEXT", "PRECONDITION_FAILED", "OK"]);
    for i in [0, 500, 994] {
        let read = r.get("t", &format!("b-{i}"), opts(ALL)).await.unwrap();
        assert_eq!(values(&read), vec![format!("v{i}").into_bytes()]);
        assert_eq!(read.set.siblings().len(), 1, "one dot per item");
    }
    assert_eq!(values(&r.get("t", "taken", opts(ALL)).await.unwrap()), vec![b"old".to_vec()]);
    assert_eq!(r.get("t", "doomed", opts(ALL)).await.unwrap_err().reason(), "KEY_NOT_FOUND");
    // Every replica got every valid item.
    for node in &cluster.nodes {
        for i in [1, 777] {
            let mut local = None;
            for _ in 0..50 {
                local = node.local("t", &format!("b-{i}")).await;
                if local.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(local.is_some(), "node {} has b-{i}", node.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_point_calls_coalesce_and_each_keeps_its_own_answer() {
    // One call of each kind in flight per node, so nearly everything else is coalesced.
    let pool = StoragePool::new(256, Duration::from_millis(300)).with_coalescing(1);
    let cluster = Cluster::start_with(3, pool).await;
    let r = cluster.router.clone();
    write(&r, "t", "taken", Some(b"first".to_vec()), &[], false, opts(ALL)).await.unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..300 {
        let r = r.clone();
        writers.spawn(async move {
            let condition = (i % 10 == 0).then_some(WriteCondition::IfAbsent);
            let key = if condition.is_some() { "taken".to_owned() } else { format!("c-{i}") };
            let spec =
                WriteSpec { value: Some(format!("v{i}").into_bytes()), condition, ..WriteSpec::default() };
            (i, r.write("t", &key, spec, opts(QUORUM)).await)
        });
    }
    while let Some(joined) = writers.join_next().await {
        let (i, result) = joined.unwrap();
        match i % 10 {
            // A refused item fails alone, with its own reason and the current value.
            0 => assert_eq!(result.unwrap_err().reason(), "PRECONDITION_FAILED", "write {i}"),
            _ => {
                let outcome = result.unwrap_or_else(|e| panic!("write {i}: {e:?}"));
                let values: Vec<&[u8]> =
                    outcome.set.siblings().iter().filter_map(|s| s.value.as_deref()).collect();
                assert_eq!(values, [format!("v{i}").as_bytes()], "write {i} got its own set back");
            }
        }
    }
    let mut readers = tokio::task::JoinSet::new();
    for i in (0..300).filter(|i| i % 10 != 0) {
        let r = r.clone();
        readers.spawn(async move { (i, r.get("t", &format!("c-{i}"), opts(ALL)).await) });
    }
    readers.spawn({
        let r = r.clone();
        async move { (1000, r.get("t", "never-written", opts(QUORUM)).await) }
    });
    while let Some(joined) = readers.join_next().await {
        let (i, result) = joined.unwrap();
        match i {
            1000 => assert_eq!(result.unwrap_err().reason(), "KEY_NOT_FOUND"),
            _ => assert_eq!(values(&result.unwrap()), vec![format!("v{i}").into_bytes()], "read {i}"),
        }
    }
    let mut coalesced = [0u64; 3];
    for client in r.pool().all() {
        coalesced[0] += client.lanes.get.coalesced().0;
        coalesced[1] += client.lanes.coordinate.coalesced().0;
        coalesced[2] += client.lanes.replicate.coalesced().0;
    }
    assert!(
        coalesced.iter().all(|&calls| calls > 0),
        "gets, coordinates, replicates coalesced: {coalesced:?}"
    );
    assert_eq!(values(&r.get("t", "taken", opts(ALL)).await.unwrap()), vec![b"first".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_coalescing_off_every_call_goes_alone() {
    let pool = StoragePool::new(256, Duration::from_millis(300)).with_coalescing(0);
    let cluster = Cluster::start_with(3, pool).await;
    let r = cluster.router.clone();
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..64 {
        let r = r.clone();
        writers.spawn(async move {
            r.write(
                "t",
                &format!("a-{i}"),
                WriteSpec { value: Some(vec![1]), ..WriteSpec::default() },
                opts(QUORUM),
            )
            .await
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined.unwrap().unwrap();
    }
    for client in r.pool().all() {
        assert_eq!(client.lanes.coordinate.coalesced(), (0, 0));
        assert_eq!(client.lanes.replicate.coalesced(), (0, 0));
    }
}
