//! Crash tests with real processes: a client writes 100,000 keys (1 B – 4 KiB values) at full speed
//! while the node is killed with SIGKILL at a random moment; after a restart every write acknowledged
//! before the kill is readable with exactly the version set the node returned. Both `--sync` modes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The test drives nodes from outside: its own tasks record nowhere in particular.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pairdb_core::token::{PartitionCount, token_for};
use pairdb_proto::storage::v1 as pb;
use pairdb_proto::storage::v1::storage_service_client::StorageServiceClient;
use tonic::transport::Channel;

const KEYS: usize = 100_000;
const WRITERS: usize = 32;

/// The tests run one at a time. Each finds a free port by binding port 0 and letting it go before
/// its node binds it; two tests doing that at once were once handed the same port, and both then
/// wrote to, killed and checked one node between them.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A node process, killed if the test fails before it does so itself (no node outlives its test).
struct Node(Child);

impl Node {
    fn kill(&mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_node(dir: &std::path::Path, port: u16, sync: &str) -> Node {
    let child = Command::new(env!("CARGO_BIN_EXE_pairdb-storage"))
        .args(["--node-id", "1", "--insecure-cluster", "--sync", sync, "--listen-addr"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Node(child)
}

async fn connect(port: u16) -> StorageServiceClient<Channel> {
    let started = Instant::now();
    loop {
        if let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            && let Ok(channel) = endpoint.connect().await
        {
            let mut client = StorageServiceClient::new(channel);
            if client.stats(pb::StatsRequest {}).await.is_ok() {
                return client;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "storage node did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key_ref(key: &str) -> pb::KeyRef {
    let partition = PartitionCount::default().partition_of(token_for("crash", key.as_bytes())).0;
    pb::KeyRef { tenant_id: "crash".into(), key: key.into(), partition, tenant_generation: 0, token: None }
}

async fn crash_and_recover(sync: &'static str) {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut node = spawn_node(dir.path(), port, sync);
    let client = connect(port).await;

    let acked: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let dead = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (mut client, acked, next, dead) = (client.clone(), acked.clone(), next.clone(), dead.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= KEYS || dead.load(Ordering::Relaxed) {
                        return;
                    }
                    let key = format!("key-{i:06}");
                    let value_len = (i * 7919) % 4096 + 1;
                    let request = pb::CoordinateWriteRequest {
                        key: Some(key_ref(&key)),
                        value: Some(vec![(i % 251) as u8; value_len]),
                        timestamp_ms: i as u64,
                        max_siblings: 64,
                        ..Default::default()
                    };
                    match client.coordinate_write(request).await {
                        Ok(response) => {
                            acked.lock().unwrap().insert(key, response.into_inner().version_set);
                        }
                        Err(_) => {
                            dead.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
        })
        .collect();

    // A random moment in the write storm (the seed is printed so a failure can be replayed by hand).
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let kill_after = Duration::from_millis(300 + u64::from(seed % 2200));
    println!("sync={sync}: SIGKILL after {kill_after:?}");
    tokio::time::sleep(kill_after).await;
    node.kill();
    dead.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    println!("sync={sync}: {} writes acknowledged before the kill", acked.len());
    assert!(!acked.is_empty(), "no write was acknowledged before the kill");

    let mut node = spawn_node(dir.path(), port, sync);
    let client = connect(port).await;
    let acked = Arc::new(acked.into_iter().collect::<Vec<_>>());
    let checkers: Vec<_> = (0..WRITERS)
        .map(|worker| {
            let (mut client, acked) = (client.clone(), acked.clone());
            tokio::spawn(async move {
                for (key, version_set) in acked.iter().skip(worker).step_by(WRITERS) {
                    let response =
                        client.get(pb::GetRequest { key: Some(key_ref(key)) }).await.unwrap().into_inner();
                    assert!(response.found, "acknowledged key {key} lost after SIGKILL (sync={sync})");
                    assert_eq!(&response.version_set, version_set, "version set of {key} changed");
                }
            })
        })
        .collect();
    for checker in checkers {
        checker.await.unwrap();
    }
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_with_sync_always() {
    crash_and_recover("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_with_sync_periodic() {
    crash_and_recover("periodic").await;
}
