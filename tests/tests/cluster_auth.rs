//! Issue 15's tenant boundary behind the router, with real processes: every internal RPC needs a
//! cluster credential (checked before the body is read, over HTTP/2 and HTTP/1.1 gRPC framing), a
//! storage node acts only as the node its credential names, only routers get API-key hashes and
//! context keys, context keys rotate, and a deleted tenant's data is gone from every node (one was
//! down during the deletion) before its id can be used again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use pairdb_client::{Consistency, ReadOptions, WriteOptions};
use pairdb_core::ring::NodeId;
use pairdb_proto::admin::v1 as admin;
use pairdb_proto::cluster::v1 as cpb;
use pairdb_proto::storage::v1 as spb;
use pairdb_service::clients::{ClusterClient, InternalClients, StorageClient};
use pairdb_service::cluster_auth::{ClusterAuth, Signer};
use pairdb_tests::cluster::{Cluster, ClusterOptions, Principal};
use pairdb_tests::{checker, http_raw};
use tonic::Code;

/// Each test runs a whole cluster; one at a time keeps two clusters off the same two cores.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Callers that must be refused: no credential, another cluster's credential, a credential whose
/// principal was edited (its signature no longer holds), and garbage.
fn intruders() -> Vec<(&'static str, InternalClients)> {
    let other_cluster = Signer::from_secret("another cluster's secret, long enough to be one").unwrap();
    let forged = other_cluster.issue(Principal::Router);
    let max = pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES;
    let with = |credential| InternalClients::new(None, &ClusterAuth::with_credential(credential, false), max);
    vec![("no credential", InternalClients::insecure()), ("another cluster's credential", with(forged))]
}

/// Presents a given header value as the cluster credential (edited and garbage credentials).
#[derive(Clone)]
struct RawCredential(tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for RawCredential {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("x-pairdb-cluster-credential", self.0.clone());
        Ok(request)
    }
}

fn raw_credential(
    addr: std::net::SocketAddr,
    header: &str,
) -> spb::storage_service_client::StorageServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, RawCredential>,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    spb::storage_service_client::StorageServiceClient::with_interceptor(
        channel,
        RawCredential(header.parse().unwrap()),
    )
}

fn storage_of(clients: &InternalClients, addr: std::net::SocketAddr) -> StorageClient {
    clients.storage(&addr.to_string(), Default::default()).unwrap()
}

fn cluster_of(clients: &InternalClients, addr: std::net::SocketAddr) -> ClusterClient {
    clients.cluster(&addr.to_string(), Default::default()).unwrap()
}

fn key_ref(cluster_topology: &pairdb_tests::cluster::ClusterTopology, key: &str) -> spb::KeyRef {
    spb::KeyRef {
        tenant_id: "t".into(),
        key: key.into(),
        partition: cluster_topology.partition_of("t", key).unwrap(),
        tenant_generation: 0,
        token: None,
    }
}

fn unauthenticated<T: std::fmt::Debug>(rpc: &str, who: &str, result: Result<T, tonic::Status>) {
    match result {
        Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{rpc} by {who}: {status:?}"),
        Ok(answer) => panic!("{rpc} by {who} was served: {answer:?}"),
    }
}

/// Every storage RPC and every meta cluster RPC, each called by every kind of intruder.
async fn call_every_internal_rpc(
    who: &str,
    storage: &mut StorageClient,
    meta: &mut ClusterClient,
    topology: &pairdb_tests::cluster::ClusterTopology,
) {
    let key = key_ref(topology, "injected");
    let partition = key.partition;
    let set = pairdb_core::encoding::encode_version_set(&pairdb_core::dvv::VersionSet::new());
    unauthenticated(
        "CoordinateWrite",
        who,
        storage
            .coordinate_write(spb::CoordinateWriteRequest {
                key: Some(key.clone()),
                value: Some(b"injected".to_vec()),
                ..Default::default()
            })
            .await,
    );
    unauthenticated(
        "Replicate",
        who,
        storage
            .replicate(spb::ReplicateRequest {
                key: Some(key.clone()),
                version_set: set.clone(),
                hint_for_node_id: 0,
            })
            .await,
    );
    let record =
        spb::Record { tenant_id: "t".into(), key: "injected".into(), version_set: set.clone(), token: None };
    unauthenticated(
        "MergeBatch",
        who,
        storage.merge_batch(spb::MergeBatchRequest { partition, records: vec![record] }).await,
    );
    unauthenticated("Get", who, storage.get(spb::GetRequest { key: Some(key.clone()) }).await);
    unauthenticated(
        "StreamPartition",
        who,
        storage.stream_partition(spb::StreamPartitionRequest { partition, ..Default::default() }).await,
    );
    unauthenticated(
        "MerkleSummary",
        who,
        storage.merkle_summary(spb::MerkleSummaryRequest { partition, ..Default::default() }).await,
    );
    unauthenticated(
        "LeafDigests",
        who,
        storage.leaf_digests(spb::LeafDigestsRequest { partition, leaves: vec![0] }).await,
    );
    unauthenticated(
        "GetBatch",
        who,
        storage.get_batch(spb::GetBatchRequest { partition, keys: vec![key.clone()] }).await,
    );
    unauthenticated(
        "PurgeTombstones",
        who,
        storage.purge_tombstones(spb::PurgeTombstonesRequest { partition, keys: vec![] }).await,
    );
    unauthenticated(
        "ConfirmTombstone",
        who,
        storage
            .confirm_tombstone(spb::ConfirmTombstoneRequest { key: Some(key.clone()), ..Default::default() })
            .await,
    );
    unauthenticated(
        "SyncPartition",
        who,
        storage
            .sync_partition(spb::SyncPartitionRequest {
                partition,
                tenant_ids: vec!["t".into()],
                sources: vec![spb::SyncSource { node_id: 2 }],
                batch_size: 0,
            })
            .await,
    );
    unauthenticated(
        "ListHints",
        who,
        storage.list_hints(spb::ListHintsRequest { target_node_id: 2, partition: None, limit: 10 }).await,
    );
    unauthenticated("Stats", who, storage.stats(spb::StatsRequest {}).await);
    unauthenticated("StartRebuild", who, storage.start_rebuild(spb::StartRebuildRequest {}).await);
    unauthenticated(
        "GetRebuildStatus",
        who,
        storage.get_rebuild_status(spb::GetRebuildStatusRequest {}).await,
    );

    unauthenticated(
        "RegisterNode",
        who,
        meta.register_node(cpb::RegisterNodeRequest {
            node_id: 3,
            address: "10.66.66.66:7200".into(),
            ..Default::default()
        })
        .await,
    );
    unauthenticated(
        "Heartbeat",
        who,
        meta.heartbeat(cpb::HeartbeatRequest { node_id: 3, ..Default::default() }).await,
    );
    unauthenticated(
        "Watch",
        who,
        meta.watch(cpb::WatchRequest { include_api_keys: true, ..Default::default() }).await,
    );
}

/// The raw HTTP/1.1 form of a gRPC call to `path` with an empty message and optional credential.
fn http1_grpc(addr: std::net::SocketAddr, path: &str, credential: Option<&str>) -> String {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/grpc\r\nte: trailers\r\n\
         content-length: 5\r\nConnection: close\r\n"
    );
    if let Some(credential) = credential {
        request.push_str(&format!("x-pairdb-cluster-credential: {credential}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(&[0, 0, 0, 0, 0]);
    let (_, head, _) = http_raw(addr, &bytes).unwrap();
    head.to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_rpcs_refuse_callers_without_a_valid_credential() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start_with(ClusterOptions::default()).await.unwrap();
    let topology = cluster.topology().await.unwrap();
    // Node 3 goes down: an intruder's heartbeat must not bring it back.
    cluster.kill_storage(2);
    let node3_address = cluster.storage[2].addr.to_string();

    for (who, clients) in intruders() {
        for index in 0..2 {
            let mut storage = storage_of(&clients, cluster.storage[index].addr);
            let mut meta = cluster_of(&clients, cluster.meta.addr);
            call_every_internal_rpc(who, &mut storage, &mut meta, &topology).await;
        }
    }
    // A real credential with its principal edited, and garbage.
    let edited =
        cluster.credential(Principal::Node(NodeId(2))).unwrap().as_str().replacen("node-2", "router", 1);
    for bad in [edited.as_str(), "pdbc1.router.AAAA.BBBB", "Bearer letmein", "pdbc1.node-3.x.y"] {
        let mut storage = raw_credential(cluster.storage[0].addr, bad);
        unauthenticated("Stats", bad, storage.stats(spb::StatsRequest {}).await);
        let mut storage = raw_credential(cluster.storage[1].addr, bad);
        let key = Some(key_ref(&topology, "injected"));
        let write = spb::CoordinateWriteRequest { key, value: Some(b"x".to_vec()), ..Default::default() };
        unauthenticated("CoordinateWrite", bad, storage.coordinate_write(write).await);
    }

    // Over HTTP/1.1 gRPC framing too, and the real credential passes the same request.
    let router = cluster.credential(Principal::Router).unwrap();
    for path in ["/pairdb.storage.v1.StorageService/Stats", "/pairdb.storage.v1.StorageService/StartRebuild"]
    {
        let head = http1_grpc(cluster.storage[0].addr, path, None);
        assert!(head.contains("grpc-status: 16"), "{path} without a credential over HTTP/1.1: {head}");
    }
    let head = http1_grpc(cluster.meta.addr, "/pairdb.cluster.v1.ClusterService/Heartbeat", None);
    assert!(head.contains("grpc-status: 16"), "meta over HTTP/1.1: {head}");
    let head =
        http1_grpc(cluster.storage[0].addr, "/pairdb.storage.v1.StorageService/Stats", Some(router.as_str()));
    assert!(!head.contains("grpc-status: 16"), "a valid credential over HTTP/1.1 was refused: {head}");

    // Nothing the intruders sent had an effect.
    let member = cluster.clients_as(Principal::Router);
    for index in 0..2 {
        let mut storage = storage_of(&member, cluster.storage[index].addr);
        let found = storage.get(spb::GetRequest { key: Some(key_ref(&topology, "injected")) }).await.unwrap();
        assert!(!found.into_inner().found, "node {index} stored an intruder's write");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nodes = cluster.topology().await.unwrap().nodes;
    let node3 = nodes.iter().find(|n| n.node_id == 3).unwrap();
    assert_eq!(node3.address, node3_address, "an intruder re-registered node 3");
    assert_eq!(node3.status, admin::NodeStatus::Down as i32, "an intruder's heartbeat revived node 3");
    assert!(
        pairdb_tests::metric_sum(cluster.storage[0].addr, "pairdb_cluster_auth_refused_total").unwrap() > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_acts_only_as_itself_and_only_routers_get_secrets() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start_with(ClusterOptions::default()).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .create_api_key(admin::CreateApiKeyRequest { tenant_id: "t".into(), description: String::new() })
        .await
        .unwrap();
    let before = cluster.topology().await.unwrap().nodes;

    let node2 = cluster.clients_as(Principal::Node(NodeId(2)));
    let mut meta = cluster_of(&node2, cluster.meta.addr);
    let register = meta
        .register_node(cpb::RegisterNodeRequest {
            node_id: 3,
            address: "10.66.66.66:7200".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(register.code(), Code::PermissionDenied, "{register:?}");
    let heartbeat =
        meta.heartbeat(cpb::HeartbeatRequest { node_id: 3, ..Default::default() }).await.unwrap_err();
    assert_eq!(heartbeat.code(), Code::PermissionDenied, "{heartbeat:?}");
    // Its own heartbeat is fine.
    assert!(
        !meta
            .heartbeat(cpb::HeartbeatRequest { node_id: 2, ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .unknown_node
    );
    assert_eq!(cluster.topology().await.unwrap().nodes, before, "a node changed another node's record");

    // Watch: a storage node gets no API-key hashes and no context keys, even if it asks; a router does.
    let snapshot = |clients: InternalClients| async move {
        let mut meta = cluster_of(&clients, cluster.meta.addr);
        let request = cpb::WatchRequest { include_api_keys: true, ..Default::default() };
        let mut stream = meta.watch(request).await.unwrap().into_inner();
        match stream.message().await.unwrap().unwrap().event {
            Some(cpb::watch_event::Event::Snapshot(snapshot)) => snapshot,
            other => panic!("first watch event is not a snapshot: {other:?}"),
        }
    };
    let as_node = snapshot(cluster.clients_as(Principal::Node(NodeId(2)))).await;
    assert!(as_node.api_keys.is_empty() && as_node.context_keys.is_none(), "{:?}", as_node.api_keys);
    let as_router = snapshot(cluster.clients_as(Principal::Router)).await;
    assert_eq!(as_router.api_keys.len(), 1);
    assert!(as_router.context_keys.and_then(|k| k.current).is_some());

    // Peers are contacted only at topology addresses: a migration pull names source node ids, and a
    // node that is not in the topology is refused without being contacted.
    let mut storage = storage_of(&cluster.clients_as(Principal::Meta), cluster.storage[0].addr);
    let request = spb::SyncPartitionRequest {
        partition: 0,
        tenant_ids: vec!["t".into()],
        sources: vec![spb::SyncSource { node_id: 99 }],
        batch_size: 0,
    };
    let error = storage.sync_partition(request).await.unwrap_err();
    assert_eq!(pairdb_service::errors::reason_of(&error).as_deref(), Some("NODE_NOT_FOUND"), "{error:?}");
}

fn put(context: Vec<u8>) -> WriteOptions {
    WriteOptions {
        consistency: Consistency::Quorum,
        context,
        timeout: Some(Duration::from_secs(5)),
        ..WriteOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contexts_outlive_one_context_key_rotation_but_not_two() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Cluster::start_with(ClusterOptions::default()).await.unwrap();
    let kv = checker::client(&cluster, 0, "t", Duration::from_secs(5)).await.unwrap();
    let admin = cluster.admin_client().await.unwrap();
    let key_of = |context: &[u8]| context[1];

    let first = kv.put("k", b"1".to_vec(), put(Vec::new())).await.unwrap().context;
    let rotated = admin.rotate_context_key(admin::RotateContextKeyRequest {}).await.unwrap();
    assert_eq!(rotated.previous_key_id, u32::from(key_of(&first)));
    // The router learns the new key from the watch stream.
    let second = wait_for_key(&kv, rotated.current_key_id).await;
    let after_one = kv.put("k", b"2".to_vec(), put(first.clone())).await;
    assert!(after_one.is_ok(), "a context from before one rotation was refused: {after_one:?}");

    let rotated_again = admin.rotate_context_key(admin::RotateContextKeyRequest {}).await.unwrap();
    wait_for_key(&kv, rotated_again.current_key_id).await;
    let error = kv.put("k", b"3".to_vec(), put(first)).await.unwrap_err();
    assert_eq!(error.reason(), "INVALID_CONTEXT", "{error:?}");
    let error = kv.delete("k", put(vec![2, 1, 0])).await.unwrap_err();
    assert_eq!(error.reason(), "INVALID_CONTEXT");
    let still = kv.put("k", b"4".to_vec(), put(second)).await;
    assert!(still.is_ok(), "a context from before the latest rotation was refused: {still:?}");
}

/// Reads `k` until the router seals with key `key_id`; returns that context.
async fn wait_for_key(kv: &pairdb_client::KvClient, key_id: u32) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = kv.get("k", ReadOptions::default()).await.unwrap().unwrap();
        if u32::from(read.context[1]) == key_id {
            return read.context;
        }
        assert!(Instant::now() < deadline, "the router never sealed with key {key_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tenant `t`'s records among `keys` on every node but `skip` (read with the internal `GetBatch`,
/// which answers whatever state the tenant is in), and its hints held anywhere.
async fn leftovers(cluster: &Cluster, keys: &[String], skip: Option<usize>) -> (Vec<String>, usize) {
    let topology = cluster.topology().await.unwrap();
    let member = cluster.clients_as(Principal::Router);
    let mut by_partition: std::collections::BTreeMap<u32, Vec<spb::KeyRef>> = Default::default();
    for key in keys {
        let reference = key_ref(&topology, key);
        by_partition.entry(reference.partition).or_default().push(reference);
    }
    let mut found = Vec::new();
    let mut hints = 0;
    for (index, process) in cluster.storage.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
        let mut storage = storage_of(&member, process.addr);
        for (partition, refs) in &by_partition {
            let request = spb::GetBatchRequest { partition: *partition, keys: refs.clone() };
            let records = storage.get_batch(request).await.unwrap().into_inner().records;
            found.extend(records.into_iter().map(|r| format!("{} on node {}", r.key, index + 1)));
        }
        for target in 1..=cluster.storage.len() as u32 {
            let request = spb::ListHintsRequest { target_node_id: target, partition: None, limit: 10_000 };
            let listed = storage.list_hints(request).await.unwrap().into_inner();
            hints += listed.hints.iter().filter(|h| h.tenant_id == "t").count();
        }
    }
    (found, hints)
}

async fn tenant_state(cluster: &Cluster) -> Result<admin::Tenant, tonic::Status> {
    let mut admin = cluster.admin().await.unwrap();
    admin.get_tenant(admin::GetTenantRequest { tenant_id: "t".into() }).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_tenant_is_purged_everywhere_before_its_id_is_reused() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start_with(ClusterOptions {
        storage_nodes: 4,
        storage_args: vec!["--hint-delivery-interval-ms".into(), "200".into()],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let kv = checker::client(&cluster, 0, "t", Duration::from_secs(5)).await.unwrap();
    let all = WriteOptions {
        consistency: Consistency::All,
        timeout: Some(Duration::from_secs(5)),
        ..WriteOptions::default()
    };
    let mut keys: Vec<String> = (0..100).map(|i| format!("before-{i}")).collect();
    for key in &keys {
        kv.put(key, b"old owner's value".to_vec(), all.clone()).await.unwrap();
    }
    // Node 4 goes down; writes meanwhile leave hints for it on the fallbacks.
    cluster.kill_storage(3);
    for i in 0..100 {
        let key = format!("during-{i}");
        // The first calls to the just-killed node can ride the connection it had a moment ago: the
        // router answers "outcome unknown" for those (DESIGN §4), and a client retries.
        let mut attempt = 1;
        while let Err(error) = kv.put(&key, b"old owner's value".to_vec(), put(Vec::new())).await {
            assert!(attempt < 5, "writing {key} failed {attempt} times: {error}");
            attempt += 1;
        }
        keys.push(key);
    }
    let (_, hints) = leftovers(&cluster, &keys, Some(3)).await;
    assert!(hints > 0, "no hint was left for the down node");

    let mut admin = cluster.admin().await.unwrap();
    let deleted =
        admin.delete_tenant(admin::DeleteTenantRequest { tenant_id: "t".into() }).await.unwrap().into_inner();
    assert_eq!(deleted.tenant.unwrap().state, "deleting");
    // The live nodes purge at once; the down one holds the deletion up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let progress = tenant_state(&cluster).await.unwrap().purge.unwrap();
        if progress.waiting_node_ids == vec![4] {
            break;
        }
        assert!(Instant::now() < deadline, "live nodes did not purge: {progress:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (found, hints) = leftovers(&cluster, &keys, Some(3)).await;
    assert!(found.is_empty() && hints == 0, "live nodes kept data: {found:?}, {hints} hints");
    let refused = admin
        .create_tenant(admin::CreateTenantRequest {
            tenant_id: "t".into(),
            replication_factor: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(pairdb_service::errors::reason_of(&refused).as_deref(), Some("TENANT_BEING_DELETED"));
    let gone = kv.get("before-0", ReadOptions::default()).await.unwrap_err();
    assert_eq!(gone.reason(), "TENANT_NOT_FOUND");

    // Node 4 comes back, purges, and the deletion completes.
    cluster.start_storage_again(3).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while tenant_state(&cluster).await.is_ok() {
        assert!(Instant::now() < deadline, "the deletion never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    admin
        .create_tenant(admin::CreateTenantRequest {
            tenant_id: "t".into(),
            replication_factor: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    // A few hint-delivery rounds: nothing of the old owner reappears, anywhere.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (found, hints) = leftovers(&cluster, &keys, None).await;
    assert!(found.is_empty(), "the old owner's records survived: {found:?}");
    assert_eq!(hints, 0, "the old owner's hints survived");
    let fresh = checker::client(&cluster, 0, "t", Duration::from_secs(5)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for key in &keys {
        loop {
            match fresh
                .get(key, ReadOptions { consistency: Consistency::All, ..ReadOptions::default() })
                .await
            {
                Ok(read) => {
                    assert!(read.is_none(), "the new tenant reads the old owner's {key}");
                    break;
                }
                // The router may not have the re-created tenant in its view for a moment.
                Err(error) if error.reason() == "TENANT_NOT_FOUND" && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("{key}: {error:?}"),
            }
        }
    }
    fresh.put("new", b"new owner".to_vec(), all.clone()).await.unwrap();
}
