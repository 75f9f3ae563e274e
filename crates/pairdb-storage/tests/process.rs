//! The storage binary refuses to start on a data directory of another node id or an unknown format
//! version, with a message that says so, and exits cleanly on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn storage(dir: &std::path::Path, node_id: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pairdb-storage"));
    // Standalone (no meta): there is no cluster to authenticate against.
    command
        .args(["--listen-addr", "127.0.0.1:0", "--insecure-cluster", "--node-id", node_id, "--data-dir"])
        .arg(dir);
    command
}

#[test]
fn wrong_node_id_or_format_version_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Create the directory as node 1 (start, then stop with SIGTERM).
    let mut child = storage(&data, "1").spawn().unwrap();
    let started = std::time::Instant::now();
    while !data.join("IDENTITY").exists() {
        assert!(started.elapsed().as_secs() < 30, "node never created its identity");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("node exited with {status} before creating its identity");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM should stop the node cleanly, got {status}");

    let output = storage(&data, "2").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("belongs to node 1, not node 2"), "{stderr}");

    let identity = std::fs::read_to_string(data.join("IDENTITY")).unwrap();
    std::fs::write(data.join("IDENTITY"), identity.replace("format_version=1", "format_version=9")).unwrap();
    let output = storage(&data, "1").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("data format version 9"), "{stderr}");
}
