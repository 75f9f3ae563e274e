//! Harness for end-to-end tests: builds the real binaries with cargo, starts them as child processes on
//! free loopback ports with their own data directories, and kills them when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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
    let status = command.status().context("running cargo build for the e2e binaries")?;
    if !status.success() {
        bail!("cargo build of the service binaries failed: {status}");
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
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
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
        let path = binaries_dir()?.join(binary);
        let child = Command::new(&path)
            .arg("--listen-addr")
            .arg(addr.to_string())
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
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
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
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

/// Clients of a running cluster.
pub mod cluster {
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use pairdb_proto::admin::v1 as admin;
    use pairdb_proto::admin::v1::admin_service_client::AdminServiceClient;
    use pairdb_proto::kv::v1::kv_service_client::KvServiceClient;
    use pairdb_proto::storage::v1::storage_service_client::StorageServiceClient;
    use tonic::transport::Channel;

    use super::{Process, free_addr, http_get};

    /// A whole cluster of real processes: one meta (SQLite, auth off, nodes auto-added), storage nodes
    /// registering with it, and routers following it. Dropping it kills everything.
    #[derive(Debug)]
    pub struct Cluster {
        pub meta: Process,
        pub storage: Vec<Process>,
        pub routers: Vec<Process>,
        pub dir: tempfile::TempDir,
        meta_args: Vec<String>,
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
            let dir = tempfile::tempdir()?;
            let meta_args: Vec<String> = [
                "--no-auth",
                "--auto-add-nodes",
                "--node-down-after-ms",
                "2000",
                "--heartbeat-interval-ms",
                "200",
                "--data-dir",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([dir.path().join("meta").display().to_string()])
            .collect();
            let mut meta = Process::spawn("pairdb-meta", free_addr()?, &meta_args)?;
            meta.wait_live(Duration::from_secs(30))?;
            let mut cluster = Cluster { meta, storage: Vec::new(), routers: Vec::new(), dir, meta_args };
            for id in 1..=storage_nodes {
                let process = cluster.spawn_storage(id, free_addr()?)?;
                cluster.storage.push(process);
            }
            for node in &mut cluster.storage {
                node.wait_live(Duration::from_secs(30))?;
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
            Process::spawn(
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
                    self.dir.path().join(format!("storage-{id}")).display().to_string(),
                ],
            )
        }

        /// Starts one more router (not waiting for readiness).
        pub fn add_router(&mut self) -> anyhow::Result<&mut Process> {
            self.add_router_with(&[])
        }

        /// Starts one more router with extra flags (not waiting for readiness).
        pub fn add_router_with(&mut self, extra: &[&str]) -> anyhow::Result<&mut Process> {
            let mut args = router_args(&self.meta);
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let router = Process::spawn("pairdb-router", free_addr()?, &args)?;
            self.routers.push(router);
            self.routers.last_mut().context("router just pushed")
        }

        /// Restarts meta on the same address and data directory.
        pub fn restart_meta(&mut self) -> anyhow::Result<()> {
            self.meta.kill();
            let meta = Process::spawn("pairdb-meta", self.meta.addr, &self.meta_args)?;
            self.meta = meta;
            self.meta.wait_live(Duration::from_secs(30))
        }

        /// Restarts storage node `index` (0-based) on its address and data directory.
        pub fn restart_storage(&mut self, index: usize) -> anyhow::Result<()> {
            let addr = self.storage[index].addr;
            self.storage[index].kill();
            let node = self.spawn_storage(index as u32 + 1, addr)?;
            self.storage[index] = node;
            self.storage[index].wait_live(Duration::from_secs(30))
        }

        pub async fn admin(&self) -> anyhow::Result<AdminServiceClient<Channel>> {
            Ok(AdminServiceClient::new(pairdb_client::connect(&self.meta.addr.to_string()).await?))
        }

        pub async fn kv(&self, router: usize) -> anyhow::Result<KvServiceClient<Channel>> {
            Ok(KvServiceClient::new(pairdb_client::connect(&self.routers[router].addr.to_string()).await?))
        }

        pub async fn storage_client(&self, index: usize) -> anyhow::Result<StorageServiceClient<Channel>> {
            Ok(StorageServiceClient::new(
                pairdb_client::connect(&self.storage[index].addr.to_string()).await?,
            ))
        }

        async fn wait_ring_size(&self, nodes: usize) -> anyhow::Result<()> {
            let started = Instant::now();
            loop {
                if let Ok(mut admin) = self.admin().await
                    && let Ok(list) = admin.list_storage_nodes(admin::ListStorageNodesRequest {}).await
                {
                    let active = list
                        .into_inner()
                        .nodes
                        .iter()
                        .filter(|n| n.in_ring && n.status == admin::NodeStatus::Active as i32)
                        .count();
                    if active >= nodes {
                        return Ok(());
                    }
                }
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("the ring never reached {nodes} active nodes");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
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
