//! Harness for end-to-end tests: builds the real binaries with cargo, starts them as child processes on
//! free loopback ports with their own data directories, and kills them when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod checker;

/// The workspace's binaries, by package and binary name.
pub const BINARIES: &[(&str, &str)] = &[
    ("pairdb-meta", "pairdb-meta"),
    ("pairdb-storage", "pairdb-storage"),
    ("pairdb-router", "pairdb-router"),
    ("pairdb-cli", "pairdb"),
];

/// Builds every service binary once per test process (a no-op when up to date) and returns the
/// directory holding them. Tests run from `cargo test`, so `CARGO` and the target directory are known.
pub fn binaries_dir() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_binaries().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn build_binaries() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command.arg("build").arg("--quiet");
    for (package, _) in BINARIES {
        command.arg("-p").arg(package);
    }
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    // Cargo's output is kept and its end quoted on failure: the test's panic message is what a CI
    // summary shows, and a compiler failure must be readable there.
    let output = command.output().context("running cargo build for the e2e binaries")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        bail!("cargo build of the service binaries failed: {}\n{tail}", output.status);
    }
    // The build just wrote hundreds of MB of binaries. Left as dirty pages, they are written out
    // during the first tests, and an fsync of a storage node's journal (ext4 commits the file
    // system's journal, data of other files included) then waits for them: one such wait of over
    // a second failed a `pairdb dev` bench with QUORUM_NOT_REACHED. Write them out now.
    let synced = Command::new("sync").status().context("running sync after the build")?;
    if !synced.success() {
        bail!("sync after the build failed: {synced}");
    }
    // The test executable lives in <target>/<profile>/deps/; binaries in <target>/<profile>/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable is not in <target>/<profile>/deps")?;
    Ok(profile_dir.to_path_buf())
}

/// A free loopback port (bound and released; the race with other processes is accepted in tests).
/// Never the same port twice in one test process: the tests of a binary run in parallel, and two of
/// them handed the same just-released port would start their services on one port between them.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..100 {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if !handed_out.contains(&addr.port()) {
            handed_out.push(addr.port());
            return Ok(addr);
        }
    }
    bail!("no loopback port this process has not handed out already")
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
}

impl Process {
    /// Starts binary `binary` with `args`, serving on `addr`.
    pub fn spawn(binary: &str, addr: SocketAddr, args: &[String]) -> anyhow::Result<Self> {
        Self::spawn_with_env(binary, addr, args, &[])
    }

    /// [`Process::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        binary: &str,
        addr: SocketAddr,
        args: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let path = binaries_dir()?.join(binary);
        let mut command = Command::new(&path);
        command
            .arg("--listen-addr")
            .arg(addr.to_string())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdin(Stdio::null());
        // With PAIRDB_TEST_LOG_DIR set, each process logs to its own file there (appending across
        // restarts), named by binary and port, instead of into the test's output.
        if let Ok(dir) = std::env::var("PAIRDB_TEST_LOG_DIR")
            && !dir.is_empty()
        {
            std::fs::create_dir_all(&dir)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(PathBuf::from(dir).join(format!("{binary}-{}.log", addr.port())))?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        let child = command.spawn().with_context(|| format!("starting {}", path.display()))?;
        Ok(Self { name: binary.to_owned(), addr, child })
    }

    /// Waits until `/health/live` answers 200.
    pub fn wait_live(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited early: {status}", self.name);
            }
            if let Ok((200, _)) = http_get(self.addr, "/health/live") {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("{} not live after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`) to the process.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status()?;
        if !status.success() {
            bail!("kill -{name} {} failed", self.child.id());
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The operating system's process id (for `/proc/<pid>/...` readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.1 request returning (status, body): enough for the JSON APIs' tests.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, String)> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or_default();
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut raw = request.into_bytes();
    raw.extend_from_slice(body);
    let (status, _head, body) = http_raw(addr, &raw)?;
    Ok((status, body))
}

/// Sends `request` exactly as given (head and body) and returns (status, response head, body); the
/// body is de-chunked, then read as (lossy) UTF-8, so binary bodies (gRPC) are safe too.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> anyhow::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let body = response.get(split + 4..).unwrap_or_default();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("malformed HTTP status line")?;
    // Chunked replies (axum streams bodies of unknown length) are de-chunked here.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let rest = &body[line_end + 2..];
        let Some(size) = size.filter(|&size| size > 0 && rest.len() >= size) else { break };
        out.extend_from_slice(&rest[..size]);
        body = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
    }
    out
}

/// A TCP proxy the test controls: forwards to `target` until cut (open connections are dropped and
/// new ones refused), then forwards again once restored.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (accept_open, accept_generation) = (open.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accept_open.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let (open, generation) = (accept_open.clone(), accept_generation.clone());
                let born = generation.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let cut = async {
                        while open.load(Ordering::SeqCst) && generation.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        () = cut => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, open, generation })
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A minimal HTTP/1.1 GET returning (status, body); enough for health and metrics checks.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("malformed HTTP status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The sum of every series of metric `name` on the process at `addr` (`/metrics`); 0 when absent.
pub fn metric_sum(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics of {addr} answered {status}");
    }
    let mut sum = 0.0;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().context("metric line without a value")?;
        sum += value.parse::<f64>().with_context(|| format!("metric line {line:?}"))?;
    }
    Ok(sum)
}

/// Clients of a running cluster.
pub mod cluster {
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use pairdb_proto::admin::v1 as admin;
    use pairdb_proto::admin::v1::admin_service_client::AdminServiceClient;
    use pairdb_proto::cluster::v1 as cluster_pb;
    use pairdb_proto::kv::v1::kv_service_client::KvServiceClient;
    use pairdb_proto::storage::v1::{StatsRequest, StatsResponse};
    use pairdb_service::clients::InternalClients;
    pub use pairdb_service::clients::StorageClient;
    pub use pairdb_service::cluster_auth::Principal;
    use pairdb_service::cluster_auth::{ClusterAuth, Signer};
    use tonic::transport::Channel;

    /// A cluster secret in `dir` and the flags giving it to meta, or `--insecure-cluster`.
    fn cluster_secret(
        dir: &std::path::Path,
        insecure: bool,
    ) -> anyhow::Result<(Option<std::sync::Arc<Signer>>, Vec<String>)> {
        if insecure {
            return Ok((None, vec!["--insecure-cluster".to_owned()]));
        }
        let path = dir.join("cluster-secret");
        std::fs::write(&path, Signer::generate_secret())?;
        let signer = Signer::read(&path)?;
        Ok((
            Some(std::sync::Arc::new(signer)),
            vec!["--cluster-secret-file".to_owned(), path.display().to_string()],
        ))
    }

    /// The flags presenting `principal`'s credential (a file in `dir`), or `--insecure-cluster`.
    fn credential_args(
        dir: &std::path::Path,
        signer: Option<&Signer>,
        principal: Principal,
    ) -> anyhow::Result<Vec<String>> {
        let Some(signer) = signer else { return Ok(vec!["--insecure-cluster".to_owned()]) };
        let path = dir.join(format!("{principal}.credential"));
        std::fs::write(&path, signer.issue(principal).as_str())?;
        Ok(vec!["--cluster-credential-file".to_owned(), path.display().to_string()])
    }

    use super::{Process, free_addr, http_get};

    /// Bound on a new cluster's storage nodes all becoming active ring members (one `add_node`
    /// migration per node after the first, each computing an assignment in a debug build).
    const RING_TIMEOUT: Duration = Duration::from_secs(120);

    /// A whole cluster of real processes: one meta (SQLite, auth off, nodes auto-added unless
    /// [`ClusterOptions::auto_add_nodes`] is off), storage nodes registering with it, and routers
    /// following it. Dropping it kills everything.
    #[derive(Debug)]
    pub struct Cluster {
        pub meta: Process,
        pub storage: Vec<Process>,
        pub routers: Vec<Process>,
        pub dir: tempfile::TempDir,
        meta_args: Vec<String>,
        /// Meta's PostgreSQL schema when the cluster runs on PostgreSQL (dropped with the cluster).
        pub postgres: Option<super::postgres::Schema>,
        /// Flags every router of this cluster gets (auth, Redis).
        router_extra: Vec<String>,
        /// Environment of every process.
        env: Vec<(String, String)>,
        /// Flags every storage node of this cluster gets.
        storage_extra: Vec<String>,
        /// Meta adds registering nodes itself; otherwise the harness adds them with the admin API.
        auto_add_nodes: bool,
        /// Signs this cluster's credentials (`None` with [`ClusterOptions::insecure_cluster`]).
        signer: Option<std::sync::Arc<Signer>>,
    }

    /// What [`Cluster::start_with`] starts.
    #[derive(Debug, Clone)]
    pub struct ClusterOptions {
        pub storage_nodes: u32,
        pub routers: usize,
        /// Replication factor of tenant `t`.
        pub replication_factor: u32,
        /// Run meta on this PostgreSQL server (a fresh schema) instead of SQLite.
        pub postgres_url: Option<String>,
        /// Routers require API keys (off: `--no-auth`, requests name their tenant).
        pub auth: bool,
        /// Routers keep idempotency records in this Redis (else in memory).
        pub redis_url: Option<String>,
        /// Extra environment of every process (e.g. `OTEL_*`).
        pub env: Vec<(String, String)>,
        /// Extra flags of every storage node (e.g. `--anti-entropy-period-secs 5`).
        pub storage_args: Vec<String>,
        /// Meta runs with `--auto-add-nodes` (a registering unknown node joins the ring). Without it
        /// the harness adds every node with `AddStorageNode`, and a removed node that is still running
        /// cannot rejoin by registering again.
        pub auto_add_nodes: bool,
        /// Run every process with `--insecure-cluster` (no cluster credentials). Off: meta gets a
        /// cluster secret and every router and storage node its own credential, as in production.
        pub insecure_cluster: bool,
    }

    impl Default for ClusterOptions {
        fn default() -> Self {
            Self {
                storage_nodes: 3,
                routers: 1,
                replication_factor: 3,
                postgres_url: None,
                auth: false,
                redis_url: None,
                env: Vec::new(),
                storage_args: Vec::new(),
                auto_add_nodes: true,
                insecure_cluster: false,
            }
        }
    }

    /// Router flags tuned for tests: short storage timeouts so failures are noticed quickly.
    pub fn router_args(meta: &Process) -> Vec<String> {
        ["--meta-addr", &meta.addr.to_string(), "--storage-timeout-ms", "500", "--request-timeout-ms", "3000"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }

    impl Cluster {
        /// Starts meta, `storage_nodes` storage nodes and `routers` routers, and creates tenant `t`
        /// with replication factor `replication_factor`.
        pub async fn start(
            storage_nodes: u32,
            routers: usize,
            replication_factor: u32,
        ) -> anyhow::Result<Cluster> {
            Self::start_with(ClusterOptions {
                storage_nodes,
                routers,
                replication_factor,
                ..ClusterOptions::default()
            })
            .await
        }

        /// Starts the cluster `options` describe (meta on SQLite, or on a fresh PostgreSQL schema).
        pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Cluster> {
            let ClusterOptions {
                storage_nodes,
                routers,
                replication_factor,
                postgres_url,
                auth,
                redis_url,
                env,
                storage_args,
                auto_add_nodes,
                insecure_cluster,
            } = options;
            let dir = tempfile::tempdir()?;
            let (signer, secret_args) = cluster_secret(dir.path(), insecure_cluster)?;
            let mut router_extra = Vec::new();
            if !auth {
                router_extra.push("--no-auth".to_owned());
            }
            if let Some(url) = redis_url {
                router_extra.extend(["--redis-url".to_owned(), url]);
            }
            router_extra.extend(credential_args(dir.path(), signer.as_deref(), Principal::Router)?);
            let postgres = match postgres_url {
                Some(url) => Some(super::postgres::Schema::create(&url).await?),
                None => None,
            };
            let database: Vec<String> = match &postgres {
                Some(schema) => vec!["--database-url".into(), schema.url()],
                None => vec!["--data-dir".into(), dir.path().join("meta").display().to_string()],
            };
            let meta_args: Vec<String> =
                ["--no-auth", "--node-down-after-ms", "2000", "--heartbeat-interval-ms", "200"]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .chain(auto_add_nodes.then(|| "--auto-add-nodes".to_owned()))
                    .chain(database)
                    .chain(secret_args)
                    .collect();
            let mut meta = Process::spawn_with_env("pairdb-meta", free_addr()?, &meta_args, &env)?;
            meta.wait_live(Duration::from_secs(30))?;
            let mut cluster = Cluster {
                meta,
                storage: Vec::new(),
                routers: Vec::new(),
                dir,
                meta_args,
                postgres,
                router_extra,
                env,
                storage_extra: storage_args,
                auto_add_nodes,
                signer,
            };
            for id in 1..=storage_nodes {
                let process = cluster.spawn_storage(id, free_addr()?)?;
                cluster.storage.push(process);
            }
            for node in &mut cluster.storage {
                node.wait_live(Duration::from_secs(30))?;
            }
            if !auto_add_nodes {
                for index in 0..cluster.storage.len() {
                    cluster.add_node_to_ring(index).await?;
                }
            }
            cluster.wait_ring_size(storage_nodes as usize).await?;
            let mut admin = cluster.admin().await?;
            admin
                .create_tenant(admin::CreateTenantRequest {
                    tenant_id: "t".into(),
                    replication_factor,
                    ..Default::default()
                })
                .await?;
            for _ in 0..routers {
                cluster.add_router()?;
            }
            for router in &mut cluster.routers {
                wait_ready(router, Duration::from_secs(30))?;
            }
            Ok(cluster)
        }

        pub fn spawn_storage(&self, id: u32, addr: std::net::SocketAddr) -> anyhow::Result<Process> {
            let credential = credential_args(
                self.dir.path(),
                self.signer.as_deref(),
                Principal::Node(pairdb_core::ring::NodeId(id)),
            )?;
            Process::spawn_with_env(
                "pairdb-storage",
                addr,
                &[
                    "--node-id".into(),
                    id.to_string(),
                    "--meta-addr".into(),
                    self.meta.addr.to_string(),
                    "--sync".into(),
                    "periodic".into(),
                    "--data-dir".into(),
                    self.storage_dir(id).display().to_string(),
                ]
                .into_iter()
                .chain(credential)
                .chain(self.storage_extra.iter().cloned())
                .collect::<Vec<String>>(),
                &self.env,
            )
        }

        /// The credential of `principal` in this cluster (`None` when it runs insecure).
        pub fn credential(&self, principal: Principal) -> Option<pairdb_service::cluster_auth::Credential> {
            self.signer.as_ref().map(|signer| signer.issue(principal))
        }

        /// Internal clients presenting `principal`'s credential.
        pub fn clients_as(&self, principal: Principal) -> InternalClients {
            let auth = match self.credential(principal) {
                Some(credential) => ClusterAuth::with_credential(credential, false),
                None => ClusterAuth::insecure(),
            };
            InternalClients::new(None, &auth, pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES)
        }

        /// The data directory of storage node `id`.
        pub fn storage_dir(&self, id: u32) -> std::path::PathBuf {
            self.dir.path().join(format!("storage-{id}"))
        }

        /// Storage node `index`'s node id (nodes are numbered from 1 in start order).
        pub fn storage_node_id(index: usize) -> u32 {
            index as u32 + 1
        }

        /// Starts the next storage node (id `storage.len() + 1`, fresh data directory), waits until it
        /// is live and returns its index. It joins the ring through an `add_node` migration (created
        /// on registration with auto-add, by `AddStorageNode` otherwise): see
        /// [`Cluster::node_migration`].
        pub async fn add_storage(&mut self) -> anyhow::Result<usize> {
            let index = self.storage.len();
            let mut process = self.spawn_storage(Self::storage_node_id(index), free_addr()?)?;
            process.wait_live(Duration::from_secs(30))?;
            self.storage.push(process);
            if !self.auto_add_nodes {
                self.add_node_to_ring(index).await?;
            }
            Ok(index)
        }

        /// `AddStorageNode` for node `index` at its address (clusters without auto-add).
        async fn add_node_to_ring(&self, index: usize) -> anyhow::Result<()> {
            let mut admin = self.admin().await?;
            admin
                .add_storage_node(admin::AddStorageNodeRequest {
                    node_id: Self::storage_node_id(index),
                    address: self.storage[index].addr.to_string(),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("AddStorageNode {}", Self::storage_node_id(index)))?;
            Ok(())
        }

        /// SIGKILLs storage node `index`; its slot (address, data directory) stays for
        /// [`Cluster::start_storage_again`].
        pub fn kill_storage(&mut self, index: usize) {
            self.storage[index].kill();
        }

        /// Starts storage node `index` again (same id, address and data directory) after
        /// [`Cluster::kill_storage`], and waits until it is live.
        pub fn start_storage_again(&mut self, index: usize) -> anyhow::Result<()> {
            self.restart_storage(index)
        }

        /// SIGKILLs storage node `index`, deletes its data directory and starts it again with the same
        /// id and address: it comes back empty, with a new actor id.
        pub fn wipe_storage(&mut self, index: usize) -> anyhow::Result<()> {
            self.storage[index].kill();
            let dir = self.storage_dir(Self::storage_node_id(index));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
            }
            self.restart_storage(index)
        }

        /// SIGKILLs meta (the only replica, so the leader); [`Cluster::restart_meta`] brings it back.
        pub fn kill_meta(&mut self) {
            self.meta.kill();
        }

        /// Starts one more router (not waiting for readiness).
        pub fn add_router(&mut self) -> anyhow::Result<&mut Process> {
            self.add_router_with(&[])
        }

        /// Starts one more router with extra flags (not waiting for readiness). A `--flag value` in
        /// `extra` replaces the harness's default for that flag.
        pub fn add_router_with(&mut self, extra: &[&str]) -> anyhow::Result<&mut Process> {
            let mut args = Vec::new();
            let mut defaults = router_args(&self.meta).into_iter();
            while let Some(flag) = defaults.next() {
                let value = defaults.next().context("router flags come in pairs")?;
                if !extra.contains(&flag.as_str()) {
                    args.extend([flag, value]);
                }
            }
            args.extend(self.router_extra.iter().cloned());
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let router = Process::spawn_with_env("pairdb-router", free_addr()?, &args, &self.env)?;
            self.routers.push(router);
            self.routers.last_mut().context("router just pushed")
        }

        /// Restarts meta on the same address and data directory.
        pub fn restart_meta(&mut self) -> anyhow::Result<()> {
            self.meta.kill();
            let meta = Process::spawn_with_env("pairdb-meta", self.meta.addr, &self.meta_args, &self.env)?;
            self.meta = meta;
            self.meta.wait_live(Duration::from_secs(30))
        }

        /// Restarts router `index` on its address with the same flags.
        pub fn restart_router(&mut self, index: usize) -> anyhow::Result<()> {
            let addr = self.routers[index].addr;
            self.routers[index].kill();
            let mut args = router_args(&self.meta);
            args.extend(self.router_extra.iter().cloned());
            self.routers[index] = Process::spawn_with_env("pairdb-router", addr, &args, &self.env)?;
            wait_ready(&mut self.routers[index], Duration::from_secs(30))
        }

        /// Restarts storage node `index` (0-based) on its address and data directory.
        pub fn restart_storage(&mut self, index: usize) -> anyhow::Result<()> {
            let addr = self.storage[index].addr;
            self.storage[index].kill();
            let node = self.spawn_storage(Self::storage_node_id(index), addr)?;
            self.storage[index] = node;
            self.storage[index].wait_live(Duration::from_secs(30))
        }

        /// Freezes storage node `index` (SIGSTOP): it keeps its connections but answers nothing.
        pub fn pause_storage(&self, index: usize) -> anyhow::Result<()> {
            self.storage[index].signal("STOP")
        }

        /// Thaws a node [`Cluster::pause_storage`] froze.
        pub fn resume_storage(&self, index: usize) -> anyhow::Result<()> {
            self.storage[index].signal("CONT")
        }

        /// A typed client of router `router` for tenant `t`.
        pub async fn client(&self, router: usize) -> anyhow::Result<pairdb_client::KvClient> {
            Ok(pairdb_client::KvClient::connect(
                &self.routers[router].addr.to_string(),
                "t",
                pairdb_client::ClientOptions::default(),
            )
            .await?)
        }

        /// A typed admin client of meta.
        pub async fn admin_client(&self) -> anyhow::Result<pairdb_client::AdminClient> {
            Ok(pairdb_client::AdminClient::connect(
                &self.meta.addr.to_string(),
                pairdb_client::ClientOptions::default(),
            )
            .await?)
        }

        pub async fn admin(&self) -> anyhow::Result<AdminServiceClient<Channel>> {
            Ok(AdminServiceClient::new(pairdb_client::connect(&self.meta.addr.to_string()).await?))
        }

        pub async fn kv(&self, router: usize) -> anyhow::Result<KvServiceClient<Channel>> {
            Ok(KvServiceClient::new(pairdb_client::connect(&self.routers[router].addr.to_string()).await?))
        }

        /// A client of storage node `index`'s internal API, presenting the router's credential.
        pub async fn storage_client(&self, index: usize) -> anyhow::Result<StorageClient> {
            let channel = pairdb_client::connect(&self.storage[index].addr.to_string()).await?;
            Ok(self.clients_as(Principal::Router).storage_over(channel))
        }

        /// `Stats` of storage node `index`.
        pub async fn storage_stats(&self, index: usize) -> anyhow::Result<StatsResponse> {
            let mut client = self.storage_client(index).await?;
            Ok(client.stats(StatsRequest {}).await?.into_inner())
        }

        /// One migration, by id.
        pub async fn migration(&self, migration_id: &str) -> anyhow::Result<admin::Migration> {
            let mut admin = self.admin().await?;
            Ok(admin
                .get_migration(admin::GetMigrationRequest { migration_id: migration_id.to_owned() })
                .await?
                .into_inner())
        }

        /// Every migration meta knows.
        pub async fn migrations(&self) -> anyhow::Result<Vec<admin::Migration>> {
            let mut admin = self.admin().await?;
            Ok(admin.list_migrations(admin::ListMigrationsRequest {}).await?.into_inner().migrations)
        }

        /// Waits until a migration of `kind` (`"add_node"`, `"drain_node"`, ...) for node `node_id`
        /// exists and returns the newest one. Meta being briefly unreachable is tolerated.
        pub async fn node_migration(
            &self,
            kind: &str,
            node_id: u32,
            timeout: Duration,
        ) -> anyhow::Result<admin::Migration> {
            let started = Instant::now();
            loop {
                let last = match self.migrations().await {
                    Ok(migrations) => {
                        if let Some(found) = migrations
                            .into_iter()
                            .filter(|m| m.kind == kind && m.node_id == node_id)
                            .max_by_key(|m| m.created_at_ms)
                        {
                            return Ok(found);
                        }
                        "none yet".to_owned()
                    }
                    Err(error) => format!("{error:#}"),
                };
                if started.elapsed() > timeout {
                    bail!("no {kind} migration for node {node_id} after {timeout:?} ({last})");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// Polls migration `migration_id` until it completes and returns it; fails at once when it
        /// fails or is cancelled, and after `timeout` (with its last progress). Meta being briefly
        /// unreachable (restarting) is tolerated.
        pub async fn wait_migration(
            &self,
            migration_id: &str,
            timeout: Duration,
        ) -> anyhow::Result<admin::Migration> {
            let started = Instant::now();
            loop {
                let last = match self.migration(migration_id).await {
                    Ok(migration) => {
                        match admin::MigrationState::try_from(migration.state) {
                            Ok(admin::MigrationState::Completed) => return Ok(migration),
                            Ok(
                                state @ (admin::MigrationState::Failed | admin::MigrationState::Cancelled),
                            ) => {
                                bail!(
                                    "migration {migration_id} ({}) ended {state:?}: {:?}",
                                    migration.kind,
                                    migration.error
                                )
                            }
                            _ => {}
                        }
                        format!("{migration:?}")
                    }
                    Err(error) => format!("{error:#}"),
                };
                if started.elapsed() > timeout {
                    bail!("migration {migration_id} not completed after {timeout:?}; last seen: {last}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }

        /// Waits for the `add_node` migration of node `node_id` (see [`Cluster::add_storage`]) to
        /// complete.
        pub async fn wait_node_added(
            &self,
            node_id: u32,
            timeout: Duration,
        ) -> anyhow::Result<admin::Migration> {
            let started = Instant::now();
            let migration = self.node_migration("add_node", node_id, timeout).await?;
            let left = timeout.saturating_sub(started.elapsed());
            self.wait_migration(&migration.migration_id, left).await
        }

        /// The cluster as meta publishes it: the first message of a watch stream.
        pub async fn topology(&self) -> anyhow::Result<ClusterTopology> {
            let channel = pairdb_client::connect(&self.meta.addr.to_string()).await?;
            let mut client = self.clients_as(Principal::Router).cluster_over(channel);
            let mut stream = client
                .watch(cluster_pb::WatchRequest {
                    subscriber_kind: "test".into(),
                    subscriber_id: "e2e-harness".into(),
                    include_api_keys: false,
                })
                .await?
                .into_inner();
            let first = stream.message().await?.context("the watch stream ended before its snapshot")?;
            let Some(cluster_pb::watch_event::Event::Snapshot(snapshot)) = first.event else {
                bail!("the watch stream did not start with a snapshot: {first:?}");
            };
            let lists = |topology: cluster_pb::Topology| -> (u64, u32, Vec<Vec<u32>>) {
                let lists = topology.partitions.into_iter().map(|p| p.node_ids).collect();
                (topology.epoch, topology.partition_count, lists)
            };
            let (epoch, partition_count, current) =
                lists(snapshot.current.context("the snapshot has no current topology")?);
            Ok(ClusterTopology {
                epoch,
                partition_count,
                current,
                pending: snapshot.pending.map(|pending| lists(pending).2),
                replication_factors: snapshot
                    .tenants
                    .iter()
                    .map(|t| (t.tenant_id.clone(), t.replication_factor))
                    .collect(),
                previous_replication_factors: snapshot
                    .tenants
                    .iter()
                    .filter(|t| t.previous_replication_factor != 0)
                    .map(|t| (t.tenant_id.clone(), t.previous_replication_factor))
                    .collect(),
                nodes: snapshot.nodes,
            })
        }

        async fn wait_ring_size(&self, nodes: usize) -> anyhow::Result<()> {
            let started = Instant::now();
            let mut last_seen = String::from("meta never answered ListStorageNodes");
            loop {
                if let Ok(mut admin) = self.admin().await
                    && let Ok(list) = admin.list_storage_nodes(admin::ListStorageNodesRequest {}).await
                {
                    let list = list.into_inner().nodes;
                    let active = list
                        .iter()
                        .filter(|n| n.in_ring && n.status == admin::NodeStatus::Active as i32)
                        .count();
                    if active >= nodes {
                        return Ok(());
                    }
                    last_seen = list
                        .iter()
                        .map(|n| {
                            format!(
                                "node {} {:?} in_ring={} last_heartbeat_ms={}",
                                n.node_id,
                                n.status(),
                                n.in_ring,
                                n.last_heartbeat_ms
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                }
                if started.elapsed() > RING_TIMEOUT {
                    let migrations = match self.admin().await {
                        Ok(mut admin) => admin
                            .list_migrations(admin::ListMigrationsRequest {})
                            .await
                            .map(|r| format!("{:?}", r.into_inner().migrations))
                            .unwrap_or_else(|e| format!("ListMigrations failed: {e}")),
                        Err(e) => format!("no admin client: {e}"),
                    };
                    bail!(
                        "the ring never reached {nodes} active nodes within {RING_TIMEOUT:?}; \
                         last seen: {last_seen}; migrations: {migrations}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Meta's picture of the cluster at one revision (from its watch stream).
    #[derive(Debug, Clone)]
    pub struct ClusterTopology {
        pub epoch: u64,
        /// Q.
        pub partition_count: u32,
        /// Node ids of every partition's list, in preference order, indexed by partition.
        pub current: Vec<Vec<u32>>,
        /// The pending topology's lists while a migration runs.
        pub pending: Option<Vec<Vec<u32>>>,
        /// Tenant → replication factor.
        pub replication_factors: std::collections::BTreeMap<String, u32>,
        /// Tenant → replication factor reads still use while an N change migrates.
        pub previous_replication_factors: std::collections::BTreeMap<String, u32>,
        pub nodes: Vec<cluster_pb::NodeInfo>,
    }

    impl ClusterTopology {
        /// The partition of `key` of `tenant`.
        pub fn partition_of(&self, tenant: &str, key: &str) -> anyhow::Result<u32> {
            let count = pairdb_core::token::PartitionCount::new(self.partition_count)?;
            Ok(count.partition_of(pairdb_core::token::token_for(tenant, key.as_bytes())).0)
        }

        /// The first `n` nodes of `key`'s list in the current topology.
        pub fn preference_list(&self, tenant: &str, key: &str, n: usize) -> anyhow::Result<Vec<u32>> {
            let partition = self.partition_of(tenant, key)?;
            let list = self.current.get(partition as usize).context("partition outside the topology")?;
            Ok(list.iter().copied().take(n).collect())
        }

        /// How many partitions have `node_id` at list position `position` (current topology).
        pub fn position_count(&self, node_id: u32, position: usize) -> usize {
            self.current.iter().filter(|list| list.get(position) == Some(&node_id)).count()
        }
    }

    /// Waits until `/health/ready` answers 200.
    pub fn wait_ready(process: &mut Process, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(process.addr, "/health/ready") {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!("{} not ready after {timeout:?}", process.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `pairdb` CLI: one-shot commands and the `pairdb dev` cluster, run from the built binary.
pub mod cli {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};

    use super::binaries_dir;

    /// What a finished command printed.
    #[derive(Debug)]
    pub struct Finished {
        pub success: bool,
        /// The exit code (`None`: killed by a signal).
        pub code: Option<i32>,
        pub stdout: String,
        pub stderr: String,
    }

    impl Finished {
        /// stdout parsed as JSON (for `--output json`).
        pub fn json(&self) -> anyhow::Result<serde_json::Value> {
            serde_json::from_str(&self.stdout)
                .with_context(|| format!("not JSON: {}\n{}", self.stdout, self.stderr))
        }
    }

    /// Runs `pairdb ARGS` in `dir` with the given environment and waits for it.
    pub fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Finished> {
        let output = Command::new(binaries_dir()?.join("pairdb"))
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .context("running pairdb")?;
        Ok(Finished {
            success: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// A running `pairdb dev`; killed when dropped.
    #[derive(Debug)]
    pub struct Dev {
        child: Child,
        lines: mpsc::Receiver<String>,
        /// Every stdout line seen so far.
        pub printed: Vec<String>,
    }

    impl Dev {
        /// Starts `pairdb dev ARGS` in `dir`.
        pub fn spawn(dir: &Path, args: &[&str]) -> anyhow::Result<Dev> {
            let mut child = Command::new(binaries_dir()?.join("pairdb"))
                .arg("dev")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting pairdb dev")?;
            let stdout = child.stdout.take().context("piped stdout")?;
            let (sender, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
            Ok(Dev { child, lines, printed: Vec::new() })
        }

        /// Waits until a printed line starts with `prefix` and returns it.
        pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(line) => {
                        self.printed.push(line.clone());
                        if line.starts_with(prefix) {
                            return Ok(line);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        bail!("no line starting {prefix:?} within {timeout:?}; printed: {:#?}", self.printed)
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let status = self.child.wait()?;
                        bail!("pairdb dev exited ({status}) before {prefix:?}; printed: {:#?}", self.printed)
                    }
                }
            }
        }

        /// Sends Ctrl-C (SIGINT) and waits for the process to exit; true if it exited successfully.
        pub fn interrupt(&mut self, timeout: Duration) -> anyhow::Result<bool> {
            let status = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status()?;
            if !status.success() {
                bail!("kill -INT failed");
            }
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(status) = self.child.try_wait()? {
                    while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                        self.printed.push(line);
                    }
                    return Ok(status.success());
                }
                if Instant::now() > deadline {
                    bail!("pairdb dev did not stop within {timeout:?} of Ctrl-C");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Dev {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh PostgreSQL schema per cluster, on the server `PAIRDB_TEST_POSTGRES_URL` names.
pub mod postgres {
    use anyhow::Context;
    use sqlx::Connection;

    /// The test server's URL, or `None` (with a message saying the test is skipped) when unset.
    pub fn test_url() -> Option<String> {
        match std::env::var("PAIRDB_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                eprintln!("skipped: PAIRDB_TEST_POSTGRES_URL not set");
                None
            }
        }
    }

    /// A schema of its own, dropped with everything in it when this is dropped.
    #[derive(Debug)]
    pub struct Schema {
        pub name: String,
        base_url: String,
    }

    impl Schema {
        pub async fn create(base_url: &str) -> anyhow::Result<Schema> {
            let name = format!("pairdb_e2e_{:016x}", rand::random::<u64>());
            let mut connection =
                sqlx::postgres::PgConnection::connect(base_url).await.context("connecting to PostgreSQL")?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
                .execute(&mut connection)
                .await?;
            connection.close().await?;
            Ok(Schema { name, base_url: base_url.to_owned() })
        }

        /// The server URL with `search_path` set to this schema.
        pub fn url(&self) -> String {
            let separator = if self.base_url.contains('?') { '&' } else { '?' };
            format!("{}{separator}options=-c%20search_path%3D{}", self.base_url, self.name)
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            let (base_url, name) = (self.base_url.clone(), self.name.clone());
            // Drop may run inside a runtime, which cannot block on itself: use a thread.
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
}

/// Certificates made in the test: a cluster CA, one certificate for every process (SANs localhost and
/// 127.0.0.1, usable as server and client), and a rogue CA with its own client certificate.
pub mod pki {
    use std::path::PathBuf;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    #[derive(Debug)]
    pub struct TestPki {
        dir: tempfile::TempDir,
        pub ca_pem: String,
        pub node_cert_pem: String,
        pub node_key_pem: String,
        pub rogue_cert_pem: String,
        pub rogue_key_pem: String,
    }

    fn authority(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params.self_signed(&key)?;
        Ok((certificate.pem(), Issuer::new(params, key)))
    }

    fn leaf(issuer: &Issuer<'static, KeyPair>, name: &str) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let certificate = params.signed_by(&key, issuer)?;
        Ok((certificate.pem(), key.serialize_pem()))
    }

    impl TestPki {
        pub fn generate() -> anyhow::Result<TestPki> {
            let (ca_pem, ca) = authority("pairdb test CA")?;
            let (node_cert_pem, node_key_pem) = leaf(&ca, "pairdb node")?;
            let (_, rogue_ca) = authority("rogue CA")?;
            let (rogue_cert_pem, rogue_key_pem) = leaf(&rogue_ca, "rogue client")?;
            let dir = tempfile::tempdir()?;
            for (name, pem) in
                [("ca.pem", &ca_pem), ("node.pem", &node_cert_pem), ("node.key", &node_key_pem)]
            {
                std::fs::write(dir.path().join(name), pem)?;
            }
            Ok(TestPki { dir, ca_pem, node_cert_pem, node_key_pem, rogue_cert_pem, rogue_key_pem })
        }

        fn path(&self, name: &str) -> String {
            let path: PathBuf = self.dir.path().join(name);
            path.display().to_string()
        }

        /// The flags that turn TLS on for a service.
        pub fn service_args(&self) -> Vec<String> {
            vec![
                "--tls-cert".into(),
                self.path("node.pem"),
                "--tls-key".into(),
                self.path("node.key"),
                "--tls-ca".into(),
                self.path("ca.pem"),
            ]
        }

        /// A client that trusts the cluster CA and presents no certificate.
        pub fn anonymous_client(&self) -> ClientTlsConfig {
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
        }

        /// A client with a certificate the cluster CA signed.
        pub fn member_client(&self) -> ClientTlsConfig {
            self.anonymous_client().identity(Identity::from_pem(&self.node_cert_pem, &self.node_key_pem))
        }

        /// A client with a certificate from another CA.
        pub fn rogue_client(&self) -> ClientTlsConfig {
            self.anonymous_client().identity(Identity::from_pem(&self.rogue_cert_pem, &self.rogue_key_pem))
        }
    }
}
