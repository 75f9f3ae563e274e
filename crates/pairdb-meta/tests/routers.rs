//! Routers' presence: `RouterHeartbeat` (routers only, with a cluster credential), the leader's count
//! of the routers heard from within `ROUTER_ALIVE_WINDOW_MS`, and that count reaching every watch
//! subscriber (`live_routers_changed`, then new snapshots) — on SQLite, and on PostgreSQL with two
//! replicas, heartbeats and watchers spread over both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, test_config};
use pairdb_core::ring::NodeId;
use pairdb_meta::routers::ROUTER_ALIVE_WINDOW_MS;
use pairdb_proto::cluster::v1 as pb;
use pairdb_proto::cluster::v1::watch_event::Event;
use pairdb_service::clients::{ChannelSettings, ClusterClient, InternalClients};
use pairdb_service::cluster_auth::{ClusterAuth, Principal, Signer};
use tonic::{Code, Streaming};

const SECRET: &str = "the router presence tests' cluster secret";

/// How long a change of the count may take to reach a watcher once it is due (the leader counts
/// every second; a loaded machine is slow).
const PUBLISH_DEADLINE: Duration = Duration::from_secs(5);

/// The test config with cluster authentication on.
fn secured(mut config: pairdb_meta::Config) -> pairdb_meta::Config {
    config.insecure_cluster = false;
    config.cluster_secret = Some(SECRET.to_owned());
    config
}

/// A cluster-API client presenting `principal`'s credential (`request_timeout` `None` for streams).
fn client(addr: SocketAddr, principal: Principal, request_timeout: Option<Duration>) -> ClusterClient {
    let credential = Signer::from_secret(SECRET).unwrap().issue(principal);
    let clients = InternalClients::new(
        None,
        &ClusterAuth::with_credential(credential, false),
        pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES,
    );
    let settings = ChannelSettings { request_timeout, ..ChannelSettings::default() };
    clients.cluster(&addr.to_string(), settings).unwrap()
}

fn heartbeat(router_id: &str) -> pb::RouterHeartbeatRequest {
    pb::RouterHeartbeatRequest {
        router_id: router_id.to_owned(),
        address: format!("127.0.0.1:{}", 7000 + router_id.len()),
    }
}

/// A watch stream as `principal` and the live-router count of its snapshot.
async fn watch(addr: SocketAddr, principal: Principal) -> (Streaming<pb::WatchEvent>, u32) {
    let mut stream = client(addr, principal, None)
        .watch(pb::WatchRequest {
            subscriber_kind: "router".into(),
            subscriber_id: format!("{principal}"),
            include_api_keys: principal == Principal::Router,
        })
        .await
        .unwrap()
        .into_inner();
    let first =
        tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    let Some(Event::Snapshot(snapshot)) = first.event else { panic!("not a snapshot: {first:?}") };
    (stream, snapshot.live_routers)
}

/// The next `live_routers_changed` (other events are skipped), with its revision; revisions must
/// grow.
async fn next_count(
    stream: &mut Streaming<pb::WatchEvent>,
    last_revision: &mut u64,
    within: Duration,
) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        let remaining =
            deadline.checked_duration_since(Instant::now()).expect("no live_routers_changed in time");
        let event = tokio::time::timeout(remaining, stream.message())
            .await
            .expect("no live_routers_changed in time")
            .unwrap()
            .expect("watch stream ended");
        assert!(event.revision > *last_revision, "revisions grow: {event:?} after {last_revision}");
        *last_revision = event.revision;
        if let Some(Event::LiveRoutersChanged(count)) = event.event {
            return count;
        }
    }
}

/// Heartbeats every router id in `beating` every 300 ms, spreading them over `addrs`, until dropped.
struct Routers {
    beating: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Routers {
    fn start(addrs: Vec<SocketAddr>) -> Routers {
        let beating = Arc::new(Mutex::new(BTreeSet::new()));
        let clients: Vec<ClusterClient> =
            addrs.iter().map(|addr| client(*addr, Principal::Router, Some(Duration::from_secs(5)))).collect();
        let ids = beating.clone();
        let task = tokio::spawn(async move {
            loop {
                let current: Vec<String> = ids.lock().unwrap().iter().cloned().collect();
                for (i, id) in current.iter().enumerate() {
                    let mut client = clients[i % clients.len()].clone();
                    if let Err(status) = client.router_heartbeat(heartbeat(id)).await {
                        eprintln!("heartbeat of {id} failed: {status:?}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Routers { beating, task }
    }

    /// Starts heartbeating `id` (its first heartbeat is sent at once).
    async fn add(&self, id: &str, addr: SocketAddr) {
        client(addr, Principal::Router, Some(Duration::from_secs(5)))
            .router_heartbeat(heartbeat(id))
            .await
            .unwrap();
        self.beating.lock().unwrap().insert(id.to_owned());
    }

    fn stop(&self, id: &str) {
        self.beating.lock().unwrap().remove(id);
    }
}

impl Drop for Routers {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Heartbeats from three routers reach every watcher as the counts 1, 2, 3 in revision order and a
/// new snapshot says 3; a router that stops drops out after the window (2). Only routers may send
/// heartbeats, and their fields are checked.
async fn routers_are_counted_and_published(servers: &[Server]) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let mut watchers = Vec::new();
    for addr in &addrs {
        // Routers and storage nodes both get the count.
        for principal in [Principal::Router, Principal::Node(NodeId(1))] {
            let (stream, count) = watch(*addr, principal).await;
            assert_eq!(count, 0, "no router yet");
            watchers.push((stream, 0u64));
        }
    }

    let routers = Routers::start(addrs.clone());
    // The third id is as long as allowed (64 bytes).
    let longest = format!("r-{}", "c".repeat(62));
    for (n, id) in ["r-a", "r-b", longest.as_str()].into_iter().enumerate() {
        let started = Instant::now();
        routers.add(id, addrs[n % addrs.len()]).await;
        for (stream, revision) in &mut watchers {
            assert_eq!(next_count(stream, revision, PUBLISH_DEADLINE).await, n as u32 + 1);
        }
        println!("router {} counted in {:?}", n + 1, started.elapsed());
    }
    for addr in &addrs {
        let (_, count) = watch(*addr, Principal::Router).await;
        assert_eq!(count, 3, "a new watcher's snapshot carries the count");
        let (_, count) = watch(*addr, Principal::Node(NodeId(2))).await;
        assert_eq!(count, 3);
    }

    // Refused: other members' credentials (PERMISSION_DENIED), no credential (UNAUTHENTICATED), bad
    // fields (INVALID_ARGUMENT). None of them is counted.
    for principal in [Principal::Node(NodeId(1)), Principal::Meta] {
        let refused = client(addrs[0], principal, Some(Duration::from_secs(5)))
            .router_heartbeat(heartbeat("r-x"))
            .await;
        let status = refused.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{principal}: {status:?}");
        assert_eq!(common::reason(&status), "PERMISSION_DENIED");
    }
    let anonymous = pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient::new(
        common::channel(addrs[0]).await?,
    )
    .router_heartbeat(heartbeat("r-y"))
    .await
    .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let mut router = client(addrs[0], Principal::Router, Some(Duration::from_secs(5)));
    for (router_id, address) in
        [("", "a:1"), ("has space", "a:1"), (&*"x".repeat(65), "a:1"), ("r-z", &*"a".repeat(257))]
    {
        let request =
            pb::RouterHeartbeatRequest { router_id: router_id.to_owned(), address: address.to_owned() };
        let status = router.router_heartbeat(request).await.unwrap_err();
        assert_eq!(common::reason(&status), "INVALID_ARGUMENT", "{router_id:?} {address:?}");
    }

    // A router that stops drops out after the window (2), not before.
    routers.stop(&longest);
    let stopped = Instant::now();
    let window = Duration::from_millis(ROUTER_ALIVE_WINDOW_MS);
    for (stream, revision) in &mut watchers {
        assert_eq!(next_count(stream, revision, window + PUBLISH_DEADLINE).await, 2);
    }
    let dropped_after = stopped.elapsed();
    println!("a silent router dropped out after {dropped_after:?}");
    // Its last heartbeat was at most 300 ms (plus a round trip) before `stopped`.
    assert!(dropped_after + Duration::from_millis(500) >= window, "dropped after {dropped_after:?}");
    for addr in &addrs {
        assert_eq!(watch(*addr, Principal::Router).await.1, 2);
    }
    drop(routers);
    drop(watchers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_are_counted_and_published_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(secured(test_config(dir.path()))).await?;
    routers_are_counted_and_published(std::slice::from_ref(&server)).await?;
    server.shutdown().await
}

/// Two replicas on one database: heartbeats go to both, and the follower's watchers get the
/// leader's count through the change log like every other change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_are_counted_and_published_postgres() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = common::PgSchema::create(&base).await?;
    let (first_dir, second_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let config = |dir: &tempfile::TempDir| {
        let mut config = secured(test_config(dir.path()));
        config.database_url = Some(schema.url());
        config
    };
    let servers = vec![Server::start(config(&first_dir)).await?, Server::start(config(&second_dir)).await?];
    routers_are_counted_and_published(&servers).await?;
    for server in servers {
        server.shutdown().await?;
    }
    Ok(())
}

/// A restarted meta (here after more than a window down) keeps the stored count for a window, giving
/// the routers time to be heard from, instead of publishing that none is live; then it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_meta_gives_routers_a_window_before_counting_them_out() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(secured(test_config(dir.path()))).await?;
    let (mut stream, _) = watch(server.addr, Principal::Router).await;
    let mut revision = 0;
    let mut router = client(server.addr, Principal::Router, Some(Duration::from_secs(5)));
    router.router_heartbeat(heartbeat("r-a")).await?;
    router.router_heartbeat(heartbeat("r-b")).await?;
    let mut seen = vec![next_count(&mut stream, &mut revision, PUBLISH_DEADLINE).await];
    if seen == [1] {
        seen.push(next_count(&mut stream, &mut revision, PUBLISH_DEADLINE).await);
    }
    assert_eq!(seen.last(), Some(&2), "{seen:?}");
    drop(stream);
    server.shutdown().await?;

    tokio::time::sleep(Duration::from_millis(ROUTER_ALIVE_WINDOW_MS + 1_000)).await;
    // Measured from before the start, so from before the new leader's window began.
    let restarted = Instant::now();
    let server = Server::start(secured(test_config(dir.path()))).await?;
    let (mut stream, count) = watch(server.addr, Principal::Router).await;
    assert_eq!(count, 2, "the stored count is served at once");
    // Only r-a is back: the count goes to 1 — not 0 first — once the new leader's window passed.
    let mut router = client(server.addr, Principal::Router, Some(Duration::from_secs(5)));
    let beats = tokio::spawn(async move {
        loop {
            let _ = router.router_heartbeat(heartbeat("r-a")).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut revision = 0;
    let window = Duration::from_millis(ROUTER_ALIVE_WINDOW_MS);
    assert_eq!(next_count(&mut stream, &mut revision, window + PUBLISH_DEADLINE).await, 1);
    let waited = restarted.elapsed();
    println!("the restarted meta counted r-b out after {waited:?}");
    assert!(waited >= window, "counted out after {waited:?}");
    beats.abort();
    drop(stream);
    server.shutdown().await
}
