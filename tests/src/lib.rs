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
