//! The three service binaries start as real processes, serve gRPC health and HTTP health on one port,
//! and report honest readiness.

use std::time::Duration;

use pairdb_tests::{Process, free_addr, http_get};

#[tokio::test]
async fn services_start_and_report_health() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut meta = Process::spawn(
        "pairdb-meta",
        free_addr()?,
        &[
            "--data-dir".into(),
            data.path().join("meta").display().to_string(),
            "--no-auth".into(),
            "--insecure-cluster".into(),
        ],
    )?;
    let mut storage = Process::spawn(
        "pairdb-storage",
        free_addr()?,
        &[
            "--node-id".into(),
            "1".into(),
            "--insecure-cluster".into(),
            "--data-dir".into(),
            data.path().join("storage-1").display().to_string(),
        ],
    )?;
    let mut router = Process::spawn(
        "pairdb-router",
        free_addr()?,
        &["--meta-addr".into(), meta.addr.to_string(), "--insecure-cluster".into()],
    )?;
    for process in [&mut meta, &mut storage, &mut router] {
        process.wait_live(Duration::from_secs(30))?;
    }

    // Meta and storage are ready; the router has no topology yet and says so.
    assert_eq!(http_get(meta.addr, "/health/ready")?.0, 200);
    assert_eq!(http_get(storage.addr, "/health/ready")?.0, 200);
    let (status, body) = http_get(router.addr, "/health/ready")?;
    assert_eq!(status, 503);
    assert!(body.contains("no topology"), "{body}");

    // A path nobody serves is a JSON 404 over plain HTTP on every service (it used to pass as
    // `200 application/grpc` with grpc-status 12, so a mistyped health probe looked healthy).
    for process in [&meta, &storage, &router] {
        let (status, body) = http_get(process.addr, "/health/readyy")?;
        assert_eq!(status, 404, "{}: {body}", process.name);
        assert!(body.contains("\"reason\":\"NOT_FOUND\""), "{}: {body}", process.name);
    }

    // The same port speaks gRPC: the standard health service agrees with HTTP.
    let meta_channel = pairdb_client::connect(&meta.addr.to_string()).await?;
    assert!(pairdb_client::is_serving(meta_channel).await?);
    let router_channel = pairdb_client::connect(&router.addr.to_string()).await?;
    assert!(!pairdb_client::is_serving(router_channel).await?);
    Ok(())
}

#[test]
fn invalid_config_fails_with_the_field_name() -> anyhow::Result<()> {
    let binaries = pairdb_tests::binaries_dir()?;
    let output = std::process::Command::new(binaries.join("pairdb-storage"))
        .args(["--node-id", "0", "--check-config"])
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("node_id"), "{stderr}");

    let output = std::process::Command::new(binaries.join("pairdb-meta"))
        .args(["--database-url", "mysql://x", "--check-config"])
        .output()?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("database_url"));
    Ok(())
}

/// Cluster authentication is on unless switched off explicitly: each service refuses to start
/// without its cluster secret or credential (naming the field), and `--insecure-cluster` starts it
/// with a warning in its log.
#[test]
fn services_refuse_to_start_without_cluster_credentials() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let binaries = pairdb_tests::binaries_dir()?;
    for (binary, args, field) in [
        ("pairdb-meta", vec!["--no-auth"], "cluster_secret"),
        ("pairdb-storage", vec!["--node-id", "1"], "cluster_credential"),
        ("pairdb-router", vec![], "cluster_credential"),
    ] {
        let output = std::process::Command::new(binaries.join(binary))
            .args(&args)
            .arg("--check-config")
            .env_clear()
            .output()?;
        assert!(!output.status.success(), "{binary} accepted a configuration without cluster credentials");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(field) && stderr.contains("--insecure-cluster"), "{binary}: {stderr}");
    }
    let data = tempfile::tempdir()?;
    let mut storage = std::process::Command::new(binaries.join("pairdb-storage"))
        .args(["--node-id", "1", "--insecure-cluster", "--listen-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env_clear()
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = storage.stderr.take().expect("piped stderr");
    let warned = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .take(50)
        .any(|line| line.contains("WARN") && line.contains("cluster authentication is DISABLED"));
    storage.kill()?;
    storage.wait()?;
    assert!(warned, "--insecure-cluster started without a warning");
    Ok(())
}
