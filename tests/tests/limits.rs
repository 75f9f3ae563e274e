//! Limits before work (issue 15), with real processes: idle connections beyond a listener's cap are
//! closed while requests go on, unauthenticated (and oversized) 60 MiB messages are refused without
//! being buffered, an HTTP body that trickles in is cut off, and a message that is not protobuf is the
//! caller's INVALID_ARGUMENT with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use pairdb_client::{Consistency, WriteOptions};
use pairdb_proto::kv::v1 as kv;
use pairdb_proto::storage::v1 as spb;
use pairdb_tests::cluster::{Cluster, ClusterOptions, wait_ready};
use pairdb_tests::{Process, checker, http_raw, metric_sum};

/// Each test runs a whole cluster; one at a time keeps two clusters off the same two cores.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CAP: usize = 64;
const BEYOND: usize = 2000;

/// Opens `count` idle connections to `addr`.
fn open_idle(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count).map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()).collect()
}

/// How many of `connections` the server has closed (a read sees end of file at once).
fn closed(connections: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for connection in connections {
        connection.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        match connection.read(&mut byte) {
            Ok(0) => closed += 1,
            Err(error) if error.kind() == ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    closed
}

fn open_fds(process: &Process) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", process.pid())).unwrap().count()
}

fn rss_kib(process: &Process) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_beyond_the_cap_are_closed_while_requests_are_served() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cap = CAP.to_string();
    let mut cluster = Cluster::start_with(ClusterOptions {
        routers: 0,
        storage_args: vec![
            "--max-connections".into(),
            cap.clone(),
            "--first-byte-timeout-ms".into(),
            "2000".into(),
        ],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let router =
        cluster.add_router_with(&["--max-connections", &cap, "--first-byte-timeout-ms", "2000"]).unwrap();
    wait_ready(router, Duration::from_secs(30)).unwrap();
    // Connections made before the flood: a client's, the router's to the storage nodes.
    let kv = checker::client(&cluster, 0, "t", Duration::from_secs(5)).await.unwrap();
    let all = WriteOptions {
        consistency: Consistency::All,
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    kv.put("before", b"x".to_vec(), all.clone()).await.unwrap();

    let mut at_router = open_idle(cluster.routers[0].addr, CAP + BEYOND);
    let mut at_storage = open_idle(cluster.storage[0].addr, CAP + BEYOND);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..20 {
        kv.put(&format!("during-{i}"), b"x".to_vec(), all.clone()).await.unwrap();
    }
    assert!(closed(&mut at_router) >= BEYOND, "the router kept connections beyond its cap");
    assert!(closed(&mut at_storage) >= BEYOND, "the storage node kept connections beyond its cap");
    let (router_fds, storage_fds) = (open_fds(&cluster.routers[0]), open_fds(&cluster.storage[0]));
    assert!(router_fds < CAP + 100, "router holds {router_fds} descriptors");
    assert!(storage_fds < CAP + 100, "storage node holds {storage_fds} descriptors");
    // Connections that never say anything are closed after the first-byte deadline: the slots are
    // free again for new connections, such as a metrics scrape.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(closed(&mut at_router), CAP + BEYOND, "silent connections kept their slots at the router");
    assert_eq!(
        closed(&mut at_storage),
        CAP + BEYOND,
        "silent connections kept their slots at the storage node"
    );
    let metric = |name: &str| metric_sum(cluster.routers[0].addr, name).unwrap();
    // Every flood connection was refused at accept or (once a silent one freed a slot) closed for
    // saying nothing; none is held.
    let refused = metric("pairdb_connections_refused_total");
    let silent = metric("pairdb_connections_silent_closed_total");
    assert!(refused + silent >= (CAP + BEYOND) as f64, "refused {refused}, closed silent {silent}");
    assert!(refused > 0.0 && silent > 0.0, "refused {refused}, closed silent {silent}");
    kv.put("after", b"x".to_vec(), all).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_and_oversized_messages_are_refused_unread() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster =
        Cluster::start_with(ClusterOptions { auth: true, ..ClusterOptions::default() }).await.unwrap();
    let (router, storage) = (&cluster.routers[0], &cluster.storage[0]);
    let huge = vec![7u8; 60 * 1024 * 1024];
    // Warm up both processes, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (router_before, storage_before) = (rss_kib(router), rss_kib(storage));

    let mut kv_client = cluster.kv(0).await.unwrap().max_encoding_message_size(usize::MAX);
    let mut intruder = pairdb_proto::storage::v1::storage_service_client::StorageServiceClient::new(
        pairdb_client::connect(&storage.addr.to_string()).await.unwrap(),
    )
    .max_encoding_message_size(usize::MAX);
    let topology = cluster.topology().await.unwrap();
    for round in 0..8 {
        let put = kv::PutRequest {
            tenant_id: "t".into(),
            key: format!("huge-{round}"),
            value: huge.clone(),
            ..Default::default()
        };
        kv_client.put(put).await.expect_err("an unauthenticated 60 MiB put was accepted");
        let key = spb::KeyRef {
            tenant_id: "t".into(),
            key: format!("huge-{round}"),
            partition: topology.partition_of("t", &format!("huge-{round}")).unwrap(),
            tenant_generation: 0,
            token: None,
        };
        let replicate =
            spb::ReplicateRequest { key: Some(key), version_set: huge.clone(), hint_for_node_id: 0 };
        intruder.replicate(replicate).await.expect_err("an unauthenticated 60 MiB replicate was accepted");
    }
    // A tenant's own key does not buy more than its value cap (1 MiB) either.
    let secret = {
        let mut admin = cluster.admin().await.unwrap();
        let request = pairdb_proto::admin::v1::CreateApiKeyRequest {
            tenant_id: "t".into(),
            description: String::new(),
        };
        admin.create_api_key(request).await.unwrap().into_inner().secret
    };
    let bearer: tonic::metadata::AsciiMetadataValue = format!("Bearer {secret}").parse().unwrap();
    for round in 0..4 {
        let mut request = tonic::Request::new(kv::PutRequest {
            key: format!("big-{round}"),
            value: huge.clone(),
            ..Default::default()
        });
        request.metadata_mut().insert("authorization", bearer.clone());
        let refused =
            kv_client.put(request).await.expect_err("a 60 MiB put over the tenant's cap was accepted");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
        assert_eq!(pairdb_service::errors::reason_of(&refused).as_deref(), Some("VALUE_TOO_LARGE"));
    }
    let (router_after, storage_after) = (rss_kib(router), rss_kib(storage));
    let grew = |before: u64, after: u64| after.saturating_sub(before) / 1024;
    assert!(grew(router_before, router_after) < 8, "router RSS {router_before} -> {router_after} KiB");
    assert!(grew(storage_before, storage_after) < 8, "storage RSS {storage_before} -> {storage_after} KiB");
}

/// Sends the head of a request whose body then stops coming; returns (status, body) of the reply.
fn trickle(addr: SocketAddr, head: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(b"{").unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_body_must_arrive_in_time_and_garbage_protobuf_is_invalid_argument() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster =
        Cluster::start_with(ClusterOptions { routers: 0, ..ClusterOptions::default() }).await.unwrap();
    let router = cluster.add_router_with(&["--http-body-timeout-ms", "300"]).unwrap();
    wait_ready(router, Duration::from_secs(30)).unwrap();
    let addr = cluster.routers[0].addr;

    let head = format!(
        "PUT /v1/kv/slow HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    );
    let (status, body, took) = trickle(addr, &head);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("REQUEST_TIMEOUT"), "{body}");
    assert!(took < Duration::from_secs(5), "the body deadline took {took:?}");
    // A gRPC message that is not protobuf: INVALID_ARGUMENT with reason MALFORMED_REQUEST.
    let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x01];
    let mut request = format!(
        "POST /pairdb.kv.v1.KvService/Put HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/grpc\r\n\
         te: trailers\r\ncontent-length: {}\r\nConnection: close\r\n\r\n",
        5 + garbage.len()
    )
    .into_bytes();
    request.push(0);
    request.extend_from_slice(&(garbage.len() as u32).to_be_bytes());
    request.extend_from_slice(&garbage);
    let (_, head, _) = http_raw(addr, &request).unwrap();
    assert!(head.to_ascii_lowercase().contains("grpc-status: 3"), "{head}");
    let details = head
        .lines()
        .find_map(|line| {
            line.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("grpc-status-details-bin"))
        })
        .map(|(_, value)| value.trim().trim_end_matches('='))
        .expect("the status carries details");
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(details).unwrap();
    // The details are a standard google.rpc.Status with a google.rpc.ErrorInfo.
    let status = tonic::Status::with_details(tonic::Code::InvalidArgument, "", bytes.into());
    let detail = pairdb_proto::status::detail_of(&status).expect("an ErrorInfo in the details");
    assert_eq!(detail.reason, "MALFORMED_REQUEST", "{detail:?}");
}
