//! Shared test harness: in-process meta servers on port 0, meta processes, a fresh PostgreSQL schema
//! per test, a tiny HTTP/1.1 client, gRPC clients carrying the admin token, and a TCP proxy that can
//! cut the database connection.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pairdb_meta::{Config, DataMover, NoDataMovement};
use pairdb_proto::admin::v1 as admin_pb;
use pairdb_proto::admin::v1::admin_service_client::AdminServiceClient;
use pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// Small Q keeps `Assignment::compute` fast in debug builds.
pub const TEST_PARTITIONS: u32 = 64;

pub const SKIP_MESSAGE: &str = "skipped: PAIRDB_TEST_POSTGRES_URL not set";

/// The test PostgreSQL server, or `None` (and the skip message) when it is not configured.
pub fn postgres_url() -> Option<String> {
    match std::env::var("PAIRDB_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("{SKIP_MESSAGE}");
            None
        }
    }
}

/// A schema of its own on the test PostgreSQL server, dropped (with everything in it) on drop.
#[derive(Debug)]
pub struct PgSchema {
    pub name: String,
    base_url: String,
}

impl PgSchema {
    pub async fn create(base_url: &str) -> anyhow::Result<PgSchema> {
        let name = format!("pairdb_test_{:016x}", rand::random::<u64>());
        let mut connection =
            sqlx::postgres::PgConnection::connect(base_url).await.context("connecting to PostgreSQL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&mut connection).await?;
        sqlx::Connection::close(connection).await?;
        Ok(PgSchema { name, base_url: base_url.to_owned() })
    }

    /// The server URL with `search_path` set to this schema.
    pub fn url(&self) -> String {
        with_search_path(&self.base_url, &self.name)
    }

    /// The same, through another host:port (a proxy).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        let url = self.url();
        let (scheme, rest) = url.split_once("://").unwrap();
        let (credentials, after) = match rest.rsplit_once('@') {
            Some((credentials, after)) => (format!("{credentials}@"), after),
            None => (String::new(), rest),
        };
        let path = &after[after.find('/').unwrap_or(after.len())..];
        format!("{scheme}://{credentials}{addr}{path}")
    }

    /// host:port of the server.
    pub fn server_addr(&self) -> String {
        let rest = self.base_url.split_once("://").unwrap().1;
        let after = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
        let host_port = &after[..after.find(['/', '?']).unwrap_or(after.len())];
        if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5432") }
    }
}

use sqlx::Connection as _;

impl Drop for PgSchema {
    fn drop(&mut self) {
        let base_url = self.base_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on itself: use a thread.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut connection = sqlx::postgres::PgConnection::connect(&base_url).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE")))
                    .execute(&mut connection)
                    .await
                    .ok()?;
                connection.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("warning: could not drop test schema {}", self.name);
        }
    }
}

pub fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

/// A config for an in-process server: SQLite in `dir`, the test token, small Q.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::embedded(dir.to_path_buf(), Some(ADMIN_TOKEN.to_owned()));
    config.partition_count = TEST_PARTITIONS;
    config.heartbeat_interval_ms = 100;
    // Admin tests register no storage processes; keep their nodes from being marked down mid-test.
    config.node_down_after_ms = 600_000;
    config
}

/// A meta replica running in this process.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), pairdb_meta::Error>>>,
}

impl Server {
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        Self::start_with_mover(config, Arc::new(NoDataMovement)).await
    }

    pub async fn start_with_mover(config: Config, mover: Arc<dyn DataMover>) -> anyhow::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(pairdb_meta::run_with_mover(
            config,
            listener,
            async move {
                let _ = stopped.await;
            },
            mover,
        ));
        let server = Server { addr, stop: Some(stop), handle: Some(handle) };
        server.wait_ready(Duration::from_secs(20)).await?;
        Ok(server)
    }

    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_ready(self.addr, timeout).await
    }

    /// Shuts down gracefully and returns the result of `run`.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(15), handle)
                .await
                .context("shutdown timed out")???;
        }
        Ok(())
    }

    pub async fn admin(&self) -> anyhow::Result<Admin> {
        admin_client(self.addr).await
    }

    pub async fn cluster(&self) -> anyhow::Result<ClusterServiceClient<Channel>> {
        Ok(ClusterServiceClient::new(channel(self.addr).await?))
    }

    /// The purge sequence of a tenant being deleted, as the watch stream publishes it.
    pub async fn purge_seq(&self, tenant: &str) -> anyhow::Result<u64> {
        use pairdb_proto::cluster::v1 as cluster_pb;
        let mut stream = self.cluster().await?.watch(cluster_pb::WatchRequest::default()).await?.into_inner();
        let first = stream.message().await?.context("no snapshot")?;
        let Some(cluster_pb::watch_event::Event::Snapshot(snapshot)) = first.event else {
            anyhow::bail!("the watch stream did not start with a snapshot");
        };
        let config =
            snapshot.tenants.into_iter().find(|t| t.tenant_id == tenant).context("tenant not in the view")?;
        anyhow::ensure!(config.deleting, "tenant {tenant} is not being deleted");
        Ok(config.purge_seq)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits for `/health/ready` to answer 200.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(response) = http(addr, "GET", "/health/ready", None, None).await
            && response.status == 200
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{addr} not ready after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub type TokenInterceptor = fn(Request<()>) -> Result<Request<()>, Status>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, TokenInterceptor>>;

fn add_token(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    Ok(request)
}

pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await?)
}

/// A channel without a per-request timeout, for watch streams.
pub async fn stream_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

pub async fn admin_client(addr: SocketAddr) -> anyhow::Result<Admin> {
    Ok(AdminServiceClient::with_interceptor(channel(addr).await?, add_token as TokenInterceptor))
}

/// The reason code carried by a status.
pub fn reason(status: &Status) -> String {
    pairdb_service::errors::reason_of(status).unwrap_or_else(|| format!("<no reason: {status:?}>"))
}

/// An HTTP response: status and body text.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `error.reason` of a JSON error body.
    pub fn reason(&self) -> String {
        self.json()["error"]["reason"].as_str().unwrap_or_default().to_owned()
    }
}

/// A minimal HTTP/1.1 client (one request per connection, chunked bodies decoded).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    http_raw(addr, request.as_bytes()).await
}

/// Sends `request` as written (head and body) on a new connection and reads the response.
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> anyhow::Result<HttpResponse> {
    let request = request.to_vec();
    let exchange = async {
        let (mut reader, mut writer) = TcpStream::connect(addr).await?.into_split();
        // The server may answer (and close) before it read everything, e.g. a body over the limit,
        // and closing with unread input resets the connection: read while writing, so the answer
        // is in hand before the reset, and keep what arrived if the reset ends the read.
        let write = tokio::spawn(async move {
            let _ = writer.write_all(&request).await;
            writer
        });
        let mut raw = Vec::new();
        let read = reader.read_to_end(&mut raw).await;
        drop(write.await);
        if raw.is_empty() {
            read?;
        }
        anyhow::Ok(raw)
    };
    let raw =
        tokio::time::timeout(Duration::from_secs(20), exchange).await.context("http request timed out")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("malformed status line")?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the migration reaches `state`.
pub async fn wait_migration(
    admin: &mut Admin,
    migration_id: &str,
    state: admin_pb::MigrationState,
) -> anyhow::Result<admin_pb::Migration> {
    let start = Instant::now();
    loop {
        let migration = admin
            .get_migration(admin_pb::GetMigrationRequest { migration_id: migration_id.to_owned() })
            .await?
            .into_inner();
        if migration.state == state as i32 {
            return Ok(migration);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("migration {migration_id} is {:?}, expected {state:?}", migration.state);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Adds `count` nodes with ids `1..=count` and waits for their migrations.
pub async fn add_nodes(admin: &mut Admin, count: u32) -> anyhow::Result<()> {
    for id in 1..=count {
        let response = admin
            .add_storage_node(admin_pb::AddStorageNodeRequest {
                node_id: id,
                address: format!("127.0.0.1:{}", 7200 + id),
                zone: String::new(),
                weight: 1,
            })
            .await?
            .into_inner();
        if !response.migration_id.is_empty() {
            wait_migration(admin, &response.migration_id, admin_pb::MigrationState::Completed).await?;
        }
    }
    Ok(())
}

/// A `DataMover` that holds every partition move until released: makes migrations observably
/// "running" in tests.
#[derive(Debug, Default)]
pub struct GatedMover {
    open: AtomicBool,
    pub moves: std::sync::atomic::AtomicU64,
}

impl GatedMover {
    pub fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl DataMover for GatedMover {
    async fn move_partition(
        &self,
        _plan: &pairdb_meta::orchestrator::PartitionMove,
    ) -> Result<pairdb_meta::orchestrator::MoveStats, pairdb_meta::orchestrator::MoveError> {
        while !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.moves.fetch_add(1, Ordering::SeqCst);
        Ok(pairdb_meta::orchestrator::MoveStats { keys: 2, bytes: 20 })
    }
}

/// A TCP proxy whose traffic the test can cut (existing connections dropped, new ones refused) and
/// restore.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    passing: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let passing = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let passing = passing.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !passing.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task);
                }
            })
        };
        Ok(Proxy { addr, passing, connections, accept })
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.passing.store(false, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.passing.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A `pairdb-meta` process whose stderr goes to a file; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct MetaProcess {
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: tokio::process::Child,
}

impl MetaProcess {
    pub async fn spawn(args: &[String], log: PathBuf, envs: &[(&str, &str)]) -> anyhow::Result<MetaProcess> {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        let stderr = std::fs::File::create(&log)?;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pairdb-meta"));
        command
            .arg("--listen-addr")
            .arg(addr.to_string())
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command.spawn().context("starting pairdb-meta")?;
        Ok(MetaProcess { addr, log, child })
    }

    /// SIGKILL, no shutdown.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether `/metrics` says this replica is the leader.
    pub async fn is_leader(&self) -> bool {
        is_leader(self.addr).await
    }
}

pub async fn is_leader(addr: SocketAddr) -> bool {
    match http(addr, "GET", "/metrics", None, None).await {
        Ok(response) => response.body.lines().any(|line| line.trim() == "pairdb_meta_is_leader 1"),
        Err(_) => false,
    }
}
