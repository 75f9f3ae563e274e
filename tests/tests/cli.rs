//! End-to-end tests of the `pairdb` CLI against `pairdb dev` and harness clusters (real binaries,
//! real processes): the README quickstart run literally, a restart that keeps the data, `pairdb bench`
//! without errors, the JSON output of every command, `pairdb status`, errors that name the flag to
//! change, and the completion scripts and man pages the binary prints.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use pairdb_tests::binaries_dir;
use pairdb_tests::cli::{Dev, Finished, run};
use pairdb_tests::cluster::Cluster;
use serde_json::Value;

/// Both tests start a dev cluster; one at a time keeps the bench from measuring its neighbour.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The issue's bound on `pairdb dev` start-up (after the build).
const READY_WITHIN: Duration = Duration::from_secs(15);

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// The quickstart's `$ command` lines and the output printed under each.
fn quickstart_steps(readme: &str) -> Vec<(String, Vec<String>)> {
    let begin = readme.find("<!-- quickstart:begin").expect("quickstart begin marker");
    let end = readme.find("<!-- quickstart:end -->").expect("quickstart end marker");
    let block = &readme[begin..end];
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    for line in block.lines().skip_while(|l| !l.starts_with("```console")).skip(1) {
        if line.starts_with("```") {
            break;
        }
        match line.strip_prefix("$ ") {
            Some(command) => steps.push((command.to_owned(), Vec::new())),
            None => steps.last_mut().expect("output before the first command").1.push(line.to_owned()),
        }
    }
    steps
}

/// Splits a command line on spaces, keeping double-quoted words together (all the README uses).
fn words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Contexts differ from run to run (they hold random actor ids); everything else must match.
fn normalize(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|line| match line.strip_prefix("context: ") {
            Some(context) if !context.is_empty() => "context: <base64>".to_owned(),
            _ => line.trim_end().to_owned(),
        })
        .collect()
}

fn pairdb(dir: &Path, args: &[&str]) -> Finished {
    let finished = run(dir, args, &[]).unwrap();
    assert!(finished.success, "pairdb {args:?} failed:\n{}\n{}", finished.stdout, finished.stderr);
    finished
}

#[test]
fn readme_quickstart_runs_as_written_and_a_restart_keeps_the_data() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let readme = readme();
    assert!(readme.contains("cargo install --locked --path crates/pairdb-cli && pairdb dev"));
    assert!(readme.contains("cargo test --workspace"));
    let steps = quickstart_steps(&readme);
    assert!(steps.len() >= 6, "quickstart has too few commands: {steps:?}");

    binaries_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launched = Instant::now();
    let mut dev = Dev::spawn(dir.path(), &[]).unwrap();
    dev.wait_for_line("pairdb dev: ready", READY_WITHIN).unwrap();
    assert!(launched.elapsed() < READY_WITHIN);
    assert!(dir.path().join("pairdb-dev-data").is_dir(), "data goes to ./pairdb-dev-data");

    for (command, expected) in &steps {
        let words = words(command);
        assert_eq!(words[0], "pairdb", "quickstart commands are pairdb commands: {command}");
        let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
        let finished = pairdb(dir.path(), &args);
        let printed: Vec<String> = finished.stdout.lines().map(str::to_owned).collect();
        assert_eq!(normalize(&printed), normalize(expected), "output of `{command}`");
    }

    pairdb(dir.path(), &["kv", "put", "survivor", "still here"]);
    assert!(dev.interrupt(Duration::from_secs(20)).unwrap(), "Ctrl-C stops pairdb dev cleanly");
    assert!(dev.printed.iter().any(|line| line.starts_with("pairdb dev: stopped")), "{:#?}", dev.printed);

    let mut again = Dev::spawn(dir.path(), &[]).unwrap();
    again.wait_for_line("pairdb dev: ready", READY_WITHIN).unwrap();
    let read = pairdb(dir.path(), &["kv", "get", "survivor", "--consistency", "all"]);
    assert_eq!(read.stdout.lines().next(), Some("survivor = still here"));
    assert!(again.interrupt(Duration::from_secs(20)).unwrap());
}

/// A `pairdb dev` directory written by the release before the tenant key index (tests/fixtures):
/// it opens with this build, every node builds its index from its records, and listings, reads and
/// usage show exactly what the old release was told to store.
#[test]
fn a_dev_directory_of_the_previous_release_opens_and_lists_every_key() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    binaries_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dev-data-755cf0f.tar.gz");
    let extracted = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(extracted.success());
    let mut dev = Dev::spawn(dir.path(), &[]).unwrap();
    dev.wait_for_line("pairdb dev: ready", READY_WITHIN).unwrap();

    let listed = |tenant: &str| -> Vec<Value> {
        let finished = pairdb(dir.path(), &["--tenant", tenant, "--output", "json", "kv", "list", "--all"]);
        finished.stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    };
    let demo = listed("demo");
    let keys: Vec<&str> = demo.iter().map(|entry| entry["key"].as_str().unwrap()).collect();
    let mut expected: Vec<String> = (0..300).filter(|i| i % 5 != 0).map(|i| format!("k{i:03}")).collect();
    expected.insert(0, "both".to_owned());
    assert_eq!(keys, expected);
    let both = &demo[0];
    assert_eq!((both["sibling_count"].as_u64(), both["value_bytes"].as_u64()), (Some(2), Some(11)));
    let other = listed("other");
    let keys: Vec<&str> = other.iter().map(|entry| entry["key"].as_str().unwrap()).collect();
    assert_eq!(keys, (0..100).map(|i| format!("k{i:02}")).collect::<Vec<_>>());

    let read = pairdb(dir.path(), &["kv", "get", "k123", "--consistency", "all"]);
    assert_eq!(read.stdout.lines().next(), Some("k123 = v-demo-123"));
    let deleted = pairdb(dir.path(), &["kv", "get", "k125", "--consistency", "all"]);
    assert_eq!(deleted.stdout.lines().next(), Some("k125: not found"));
    let read = pairdb(dir.path(), &["--tenant", "other", "kv", "get", "k42"]);
    assert_eq!(read.stdout.lines().next(), Some("k42 = v-other-42"));

    // Usage, from the counters each node rebuilt at open (reported every 5 s).
    let expected = serde_json::json!({"keys": 241, "value_bytes": 2411, "siblings": 242, "tombstones": 60});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = pairdb(dir.path(), &["--output", "json", "tenant", "usage", "demo"]).json().unwrap();
        let usage = &report["usage"];
        let figures = serde_json::json!({
            "keys": usage["keys"], "value_bytes": usage["value_bytes"],
            "siblings": usage["siblings"], "tombstones": usage["tombstones"],
        });
        if figures == expected {
            break;
        }
        assert!(Instant::now() < deadline, "usage {report:#} never became {expected}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(dev.interrupt(Duration::from_secs(20)).unwrap());
}

/// Three consecutive free loopback ports (for the storage nodes).
fn free_port_run() -> u16 {
    free_ports(3)
}

/// `count` consecutive free loopback ports; returns the first.
fn free_ports(count: u16) -> u16 {
    for _ in 0..100 {
        let base: u16 = 20_000 + rand_port_offset();
        if (0..count).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no {count} consecutive free ports");
}

fn rand_port_offset() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (nanos % 30_000) as u16
}

fn free_addr() -> String {
    pairdb_tests::free_addr().unwrap().to_string()
}

fn bench_secs() -> String {
    std::env::var("PAIRDB_E2E_BENCH_SECS").unwrap_or_else(|_| "20".to_owned())
}

#[test]
fn dev_cluster_survives_bench_and_every_command_prints_json() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    binaries_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (router, meta, base) = (free_addr(), free_addr(), free_port_run());
    let launched = Instant::now();
    let mut dev = Dev::spawn(
        dir.path(),
        &["--router-addr", &router, "--meta-addr", &meta, "--storage-base-port", &base.to_string()],
    )
    .unwrap();
    dev.wait_for_line("pairdb dev: ready", READY_WITHIN).unwrap();
    assert!(launched.elapsed() < READY_WITHIN);

    // Cluster authentication is on in dev too: a caller without a credential reaches neither a
    // storage node's API nor meta's cluster API (gRPC over HTTP/1.1 framing, the simplest client).
    for (addr, path) in [
        (format!("127.0.0.1:{base}"), "/pairdb.storage.v1.StorageService/Stats"),
        (meta.clone(), "/pairdb.cluster.v1.ClusterService/Watch"),
    ] {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/grpc\r\nte: trailers\r\n\
             content-length: 5\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(&[0, 0, 0, 0, 0]);
        let (_, head, _) = pairdb_tests::http_raw(addr, &request).unwrap();
        assert!(
            head.to_ascii_lowercase().contains("grpc-status: 16"),
            "{path} served without a credential: {head}"
        );
    }

    let json = |args: &[&str]| -> Value {
        let mut all = vec!["--router", router.as_str(), "--meta", meta.as_str(), "--output", "json"];
        all.extend_from_slice(args);
        pairdb(dir.path(), &all).json().unwrap()
    };
    let fails = |args: &[&str]| -> Finished {
        let mut all = vec!["--router", router.as_str(), "--meta", meta.as_str(), "--output", "json"];
        all.extend_from_slice(args);
        let finished = run(dir.path(), &all, &[]).unwrap();
        assert!(!finished.success, "pairdb {args:?} should fail: {}", finished.stdout);
        finished
    };

    // The bench: workload A for 20 s at 64 clients, zero errors.
    let secs = bench_secs();
    let duration = format!("{secs}s");
    let report = json(&["bench", "--workload", "A", "--duration", &duration, "--records", "2000"]);
    assert_eq!(report["workload"], "A");
    assert_eq!(report["concurrency"], 64);
    assert_eq!(report["connections"], 4, "as many connections as the gRPC floor's echo uses");
    assert_eq!(report["run"]["errors"], serde_json::json!({}), "{report:#}");
    assert_eq!(report["load"]["errors"], serde_json::json!({}), "{report:#}");
    assert_eq!(report["load"]["operations"], 2000);
    assert!(report["run"]["operations"].as_u64().unwrap() > 100, "{report:#}");
    for op in ["read", "update"] {
        let latency = &report["run"]["per_operation"][op]["latency_ms"];
        for field in ["p50", "p95", "p99", "p99_9", "max"] {
            assert!(latency[field].as_f64().unwrap() > 0.0, "{op} {field}: {report:#}");
        }
    }

    // The listing workload walks the records the load phase wrote.
    // One connection instead of the default four: the report says how many the workers shared.
    let walk = ["bench", "--workload", "L", "--duration", "2s", "--records", "2000", "--skip-load"];
    let listing = json(&[&walk[..], &["--connections", "1"]].concat());
    assert_eq!(listing["connections"], 1);
    assert_eq!(listing["run"]["errors"], serde_json::json!({}), "{listing:#}");
    assert!(listing["run"]["listed_keys"].as_u64().unwrap() >= 2000, "{listing:#}");

    // Pointed at the wrong service, a command says which service answers and which flag to change.
    let wrong = run(dir.path(), &["--meta", router.as_str(), "tenant", "list"], &[]).unwrap();
    assert_eq!(wrong.code, Some(1), "{}", wrong.stderr);
    assert!(wrong.stderr.starts_with("error: WRONG_SERVICE: the service at "), "{}", wrong.stderr);
    assert!(wrong.stderr.contains("does not implement pairdb.admin.v1.AdminService"), "{}", wrong.stderr);
    assert!(wrong.stderr.contains("is --meta (PAIRDB_META) pointing at a router?"), "{}", wrong.stderr);
    let wrong =
        run(dir.path(), &["--router", meta.as_str(), "--output", "json", "kv", "get", "k1"], &[]).unwrap();
    assert_eq!(wrong.code, Some(1), "{}", wrong.stderr);
    let error: Value = serde_json::from_str(wrong.stderr.trim()).unwrap();
    assert_eq!(error["error"]["reason"], "WRONG_SERVICE", "{error}");
    assert_eq!(error["error"]["code"], 12, "UNIMPLEMENTED");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("it is the metadata service (pairdb.admin.v1.AdminService)"), "{message}");
    assert!(message.contains("--router (PAIRDB_ROUTER)"), "{message}");

    // kv
    let put = json(&["kv", "put", "k1", "v1"]);
    assert_eq!(put["key"], "k1");
    assert!(put["acks"].as_u64().unwrap() >= 2 && put["required"] == 2, "{put:#}");
    assert!(!put["context"].as_str().unwrap().is_empty());
    assert_eq!(put["duplicate"], false);
    let sibling = json(&["kv", "put", "k1", "v2", "--consistency", "all"]);
    assert_eq!(sibling["required"], 3);
    let got = json(&["kv", "get", "k1", "--consistency", "all"]);
    assert_eq!(got["found"], true);
    assert_eq!(got["siblings"].as_array().unwrap().len(), 2);
    assert!(got.get("value").is_none(), "no single value with two siblings");
    let resolved = json(&["kv", "put", "k1", "v3", "--context", got["context"].as_str().unwrap()]);
    assert!(!resolved["version_vector"].as_array().unwrap().is_empty());
    let got = json(&["kv", "get", "k1"]);
    assert_eq!(got["value"], "v3");
    let binary = dir.path().join("blob.bin");
    std::fs::write(&binary, [0u8, 159, 146, 150]).unwrap();
    json(&["kv", "put", "blob", "--file", binary.to_str().unwrap()]);
    assert_eq!(json(&["kv", "get", "blob"])["value_base64"], "AJ+Slg==");
    let deleted = json(&["kv", "delete", "k1"]);
    assert_eq!(deleted["key"], "k1");
    let gone = json(&["kv", "get", "k1"]);
    assert_eq!(gone["found"], false);
    assert_eq!(gone["siblings"], serde_json::json!([]));
    let unknown = fails(&["--tenant", "nobody", "kv", "get", "k1"]);
    assert!(unknown.stderr.contains("TENANT_NOT_FOUND"), "{}", unknown.stderr);
    // With --output json the error is one JSON document on stderr; the exit code stays 1.
    assert_eq!(unknown.code, Some(1));
    let error: Value = serde_json::from_str(unknown.stderr.trim()).unwrap();
    assert_eq!(
        (error["error"]["reason"].as_str(), error["error"]["code"].as_i64()),
        (Some("TENANT_NOT_FOUND"), Some(5))
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("nobody"), "{error}");
    let bad_context = fails(&["kv", "put", "k1", "v", "--context", "%%%"]);
    assert!(bad_context.stderr.contains("INVALID_ARGUMENT"), "{}", bad_context.stderr);
    // Conditions: a second --if-absent is refused with the key's current context; --if-match passes
    // once with a context and is refused once that context is stale.
    let mine = json(&["kv", "put", "lock", "mine", "--if-absent"]);
    let taken = fails(&["kv", "put", "lock", "yours", "--if-absent"]);
    assert!(taken.stderr.contains("PRECONDITION_FAILED"), "{}", taken.stderr);
    assert!(taken.stderr.contains("current context: "), "{}", taken.stderr);
    let error: Value = serde_json::from_str(taken.stderr.trim()).unwrap();
    assert_eq!(error["error"]["details"]["found"], true, "{error}");
    assert!(!error["error"]["details"]["context"].as_str().unwrap().is_empty(), "{error}");
    let context = mine["context"].as_str().unwrap();
    json(&["kv", "put", "lock", "renewed", "--if-match", "--context", context]);
    let stale = fails(&["kv", "put", "lock", "x", "--if-match", "--context", context]);
    assert!(stale.stderr.contains("PRECONDITION_FAILED"), "{}", stale.stderr);
    assert_eq!(json(&["kv", "get", "lock"])["value"], "renewed");
    // Expiry: --ttl stamps it, touch moves it.
    json(&["kv", "put", "ttl-key", "v", "--ttl", "60s"]);
    let got = json(&["kv", "get", "ttl-key"]);
    let first = got["siblings"][0]["expires_at_ms"].as_u64().expect("the value expires");
    json(&["kv", "touch", "ttl-key", "--context", got["context"].as_str().unwrap(), "--ttl", "2h"]);
    let touched = json(&["kv", "get", "ttl-key"])["siblings"][0]["expires_at_ms"].as_u64().unwrap();
    assert!(touched > first + 3_600_000, "{first} -> {touched}");
    // put-many: a JSON-lines file in batches; bad lines are reported by number, the rest stored.
    let mut lines: Vec<String> =
        (0..1200).map(|i| format!(r#"{{"key": "pm-{i}", "value": "v{i}"}}"#)).collect();
    lines[7] = "not json".to_owned();
    lines[900] = r#"{"key": "", "value": "empty key"}"#.to_owned();
    let file = dir.path().join("many.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let partial = fails(&["kv", "put-many", file.to_str().unwrap()]);
    let summary: Value = serde_json::from_str(&partial.stdout).unwrap();
    assert_eq!((summary["stored"].as_u64(), summary["failed"].as_u64()), (Some(1198), Some(2)), "{summary}");
    let failed_lines: Vec<u64> =
        summary["failures"].as_array().unwrap().iter().map(|f| f["line"].as_u64().unwrap()).collect();
    assert_eq!(failed_lines, [8, 901]);
    assert!(partial.stderr.contains("PUT_MANY_INCOMPLETE"), "{}", partial.stderr);
    assert_eq!(json(&["kv", "get", "pm-1199"])["value"], "v1199");
    assert!(
        fails(&["kv", "put", "lock", "x", "--if-absent", "--if-present"]).stderr.contains("cannot be used")
    );

    // kv list: JSON lines, one per key; without --all one page and then its token.
    for i in 0..5 {
        json(&["kv", "put", &format!("list-{i}"), &format!("x{i}")]);
    }
    let lines = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["--router", router.as_str(), "--meta", meta.as_str(), "--output", "json"];
        all.extend_from_slice(args);
        let finished = pairdb(dir.path(), &all);
        finished.stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    };
    let every = lines(&["kv", "list", "--prefix", "list-", "--all", "--limit", "2"]);
    let keys: Vec<&str> = every.iter().map(|line| line["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["list-0", "list-1", "list-2", "list-3", "list-4"]);
    assert_eq!(every[0]["sibling_count"], 1);
    let first = lines(&["kv", "list", "--prefix", "list-", "--limit", "2"]);
    assert_eq!(first.len(), 3, "{first:?}");
    let token = first[2]["next_page_token"].as_str().unwrap();
    let second = lines(&["kv", "list", "--prefix", "list-", "--limit", "2", "--page-token", token]);
    assert_eq!(second[0]["key"], "list-2");
    let scanned = lines(&["kv", "list", "--prefix", "list-4", "--values"]);
    assert_eq!(scanned[0]["siblings"][0]["value"], "x4", "{scanned:?}");

    // tenants
    let created =
        json(&["tenant", "create", "acme", "--replication-factor", "2", "--max-value-bytes", "4096"]);
    assert_eq!(created["tenant_id"], "acme");
    assert_eq!(created["replication_factor"], 2);
    assert_eq!(created["max_value_bytes"], 4096);
    let expiring = json(&["tenant", "create", "sessions", "--default-ttl", "1h", "--max-ttl", "1d"]);
    assert_eq!(
        (expiring["default_ttl_ms"].as_u64(), expiring["max_ttl_ms"].as_u64()),
        (Some(3_600_000), Some(86_400_000))
    );
    assert!(
        fails(&["tenant", "create", "bad-ttl", "--default-ttl", "2d", "--max-ttl", "1d"])
            .stderr
            .contains("INVALID_ARGUMENT")
    );
    let exists = fails(&["tenant", "create", "acme"]);
    assert!(exists.stderr.contains("TENANT_EXISTS"), "{}", exists.stderr);
    assert_eq!(json(&["tenant", "get", "acme"])["conflict_mode"], "siblings");
    let listed = json(&["tenant", "list"]);
    let ids: Vec<&str> =
        listed["tenants"].as_array().unwrap().iter().map(|t| t["tenant_id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"acme") && ids.contains(&"demo"), "{ids:?}");
    let updated = json(&["tenant", "update", "acme", "--rate-limit-ops-per-sec", "500"]);
    assert_eq!(updated["tenant"]["rate_limit_ops_per_sec"], 500);
    assert_eq!(updated["migration_id"], Value::Null);
    // Deleting answers at once with the tenant `deleting`; the storage nodes purge it, then it is gone.
    let deleting = json(&["tenant", "delete", "acme"]);
    assert_eq!(
        (deleting["tenant_id"].as_str(), deleting["state"].as_str()),
        (Some("acme"), Some("deleting"))
    );
    assert_eq!(deleting["purge"]["nodes_total"], 3, "{deleting}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let get =
            run(dir.path(), &["--meta", meta.as_str(), "--output", "json", "tenant", "get", "acme"], &[])
                .unwrap();
        if !get.success {
            assert!(get.stderr.contains("TENANT_NOT_FOUND"), "{}", get.stderr);
            break;
        }
        assert!(Instant::now() < deadline, "tenant acme was never purged: {}", get.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }

    // API keys
    let key = json(&["apikey", "create", "demo", "--description", "ci"]);
    assert!(key["secret"].as_str().unwrap().len() >= 16);
    let key_id = key["api_key"]["key_id"].as_str().unwrap().to_owned();
    assert_eq!(key["api_key"]["tenant_id"], "demo");
    let keys = json(&["apikey", "list", "--tenant-id", "demo"]);
    assert!(keys["api_keys"].as_array().unwrap().iter().any(|k| k["key_id"] == key_id.as_str()));
    assert!(keys.to_string().find(key["secret"].as_str().unwrap()).is_none(), "secrets are never listed");
    assert_eq!(json(&["apikey", "revoke", &key_id])["api_key"]["revoked"], true);

    // nodes and migrations (last): a node that never starts cannot receive its data, so adding it
    // fails (the migration moves real data) and rolls back, leaving the node removed.
    let nodes = json(&["node", "list"]);
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 3);
    let node = json(&["node", "get", "2"]);
    assert_eq!(node["status"], "active");
    assert_eq!(node["in_ring"], true);
    assert!(node["stats"]["disk_free_bytes"].as_u64().is_some());
    assert!(node["stats"]["disk_bytes"].as_u64().unwrap() > 0, "{node:#}");
    assert!(node["stats"]["live_value_bytes"].as_u64().is_some(), "{node:#}");
    assert!(node["stats"].get("live_bytes").is_none(), "the misnamed field is gone: {node:#}");
    let added = json(&["node", "add", "127.0.0.1:1", "--node-id", "9", "--zone", "z9"]);
    assert_eq!(added["node"]["node_id"], 9);
    let migration_id = added["migration_id"].as_str().unwrap().to_owned();
    let watched = fails(&["migration", "watch", &migration_id, "--interval-ms", "100"]);
    assert!(watched.stderr.contains("MIGRATION_FAILED"), "{}", watched.stderr);
    let watched = watched.json().unwrap();
    assert_eq!(watched["state"], "failed", "{watched:#}");
    assert_eq!(watched["kind"], "add_node");
    assert!(watched["error"].as_str().unwrap().contains("node 9"), "{watched:#}");
    // On a terminal the table form clears its progress bar before printing the result, so the
    // summary starts a line of its own instead of being glued onto the bar's last line.
    let pairdb_binary = binaries_dir().unwrap().join("pairdb");
    let watch =
        format!("{} --meta {meta} migration watch {migration_id} --interval-ms 100", pairdb_binary.display());
    let tty = std::process::Command::new("script")
        .args(["-qc", watch.as_str(), "/dev/null"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let screen = terminal_lines(&String::from_utf8_lossy(&tty.stdout));
    let summary = format!("migration {migration_id} (add_node) failed: ");
    assert!(screen.iter().any(|line| line.starts_with(&summary)), "{screen:#?}");
    assert!(screen.iter().any(|line| line.starts_with("created_at_ms ")), "{screen:#?}");
    assert!(
        !screen.iter().any(|line| line.contains("partitions") && line.contains("created_at_ms")),
        "{screen:#?}"
    );
    assert_eq!(json(&["migration", "get", &migration_id])["migration_id"], migration_id.as_str());
    let migrations = json(&["migration", "list"]);
    assert!(
        migrations["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["migration_id"] == migration_id.as_str())
    );
    let finished = fails(&["migration", "cancel", &migration_id]);
    assert!(finished.stderr.contains("MIGRATION_FINISHED"), "{}", finished.stderr);
    assert_eq!(json(&["node", "get", "9"])["status"], "removed");

    let health = json(&["health", &router, &meta]);
    assert_eq!(health["services"][0]["serving"], true);
    assert_eq!(health["services"][1]["serving"], true);
    assert!(dev.interrupt(Duration::from_secs(20)).unwrap());
}

/// The series of a `/metrics` page: (name, labels as written, value).
fn scrape(addr: &str) -> Vec<(String, String, f64)> {
    let (status, body) = pairdb_tests::http_get(addr.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200, "{addr} /metrics");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            (name.to_owned(), labels.trim_end_matches('}').to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// In `pairdb dev` a storage node's `/metrics` holds its own node's series, not the sum of every
/// node in the process, as separate processes would.
#[test]
fn dev_storage_ports_report_their_own_node() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    binaries_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (router, meta, base) = (free_addr(), free_addr(), free_ports(4));
    let mut dev = Dev::spawn(
        dir.path(),
        &[
            "--router-addr",
            &router,
            "--meta-addr",
            &meta,
            "--storage-base-port",
            &base.to_string(),
            "--storage-nodes",
            "4",
        ],
    )
    .unwrap();
    dev.wait_for_line("pairdb dev: ready", READY_WITHIN).unwrap();
    // Replication factor 3 over 4 nodes: each node holds some keys and not others.
    let bench = ["bench", "--workload", "A", "--duration", "1s", "--records", "400"];
    pairdb(dir.path(), &[&["--router", router.as_str(), "--meta", meta.as_str()][..], &bench].concat());

    let storage: Vec<String> = (0..4).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut keys_by_node = Vec::new();
    for (index, addr) in storage.iter().enumerate() {
        let own = format!("node_id=\"{}\"", index + 1);
        let series = loop {
            let series = scrape(addr);
            if series
                .iter()
                .any(|(name, labels, value)| name == "pairdb_storage_keys" && labels == &own && *value > 0.0)
                || Instant::now() > deadline
            {
                break series;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let node_labels: Vec<&String> = series
            .iter()
            .filter(|(name, ..)| name == "pairdb_storage_keys")
            .map(|(_, labels, _)| labels)
            .collect();
        assert_eq!(node_labels, vec![&own], "storage node {} on {addr} reports other nodes' keys", index + 1);
        let services: Vec<&String> = series
            .iter()
            .filter(|(name, ..)| name == "pairdb_build_info")
            .map(|(_, labels, _)| labels)
            .collect();
        assert_eq!(services.len(), 1, "{addr}: {services:?}");
        assert!(services[0].contains("service=\"storage\""), "{addr}: {services:?}");
        assert!(
            !series
                .iter()
                .any(|(name, ..)| name.starts_with("pairdb_router_") || name.starts_with("pairdb_meta_")),
            "{addr} reports another service's families"
        );
        let served: f64 = series
            .iter()
            .filter(|(name, ..)| name == "pairdb_storage_requests_total")
            .map(|(.., value)| value)
            .sum();
        assert!(served > 0.0, "{addr} served no request");
        keys_by_node.push(series.iter().find(|(name, ..)| name == "pairdb_storage_keys").unwrap().2);
    }
    let total: f64 = keys_by_node.iter().sum();
    assert!(keys_by_node.iter().all(|keys| *keys < total), "one node reports every key: {keys_by_node:?}");

    // Meta and the router share the process's registry; no storage node's series leaks into it.
    for (addr, own) in [(&router, "pairdb_router_"), (&meta, "pairdb_meta_")] {
        let series = scrape(addr);
        assert!(series.iter().any(|(name, ..)| name.starts_with(own)), "{addr} lacks {own}*");
        let storage: Vec<&String> =
            series.iter().map(|(name, ..)| name).filter(|name| name.starts_with("pairdb_storage_")).collect();
        assert!(storage.is_empty(), "{addr} reports storage series {storage:?}");
    }
    assert!(dev.interrupt(Duration::from_secs(20)).unwrap(), "pairdb dev stops cleanly");
}

#[test]
fn help_points_at_the_json_documentation() {
    let dir = tempfile::tempdir().unwrap();
    let help = pairdb(dir.path(), &["--help"]);
    assert!(help.stdout.contains("docs/cli.md"), "{}", help.stdout);
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md")).unwrap();
    for command in [
        "pairdb kv put",
        "pairdb kv get",
        "pairdb kv delete",
        "pairdb tenant create",
        "pairdb tenant get",
        "pairdb tenant list",
        "pairdb tenant update",
        "pairdb tenant delete",
        "pairdb apikey create",
        "pairdb apikey list",
        "pairdb apikey revoke",
        "pairdb node add",
        "pairdb node list",
        "pairdb node get",
        "pairdb node remove",
        "pairdb migration get",
        "pairdb migration list",
        "pairdb migration cancel",
        "pairdb migration watch",
        "pairdb bench",
        "pairdb health",
        "pairdb status",
        "pairdb completions",
        "pairdb man",
    ] {
        assert!(docs.contains(&format!("`{command}")), "docs/cli.md does not document {command}");
    }
}

/// What a terminal shows of `raw` (a pty's output), line by line: of each line, what follows its
/// last erase (`ESC[2K`) or carriage return, without escape sequences.
fn terminal_lines(raw: &str) -> Vec<String> {
    raw.split('\n')
        .map(|line| {
            let line = line.trim_end_matches('\r');
            let after_erase = line.rsplit("\u{1b}[2K").next().unwrap_or(line);
            let visible = after_erase.rsplit('\r').next().unwrap_or(after_erase);
            let mut text = String::new();
            let mut chars = visible.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    // CSI: ESC [ parameters, then a letter.
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    text.push(c);
                }
            }
            text
        })
        .collect()
}

/// An address without a port, a host that does not resolve and a port nobody listens on are three
/// different errors, each naming the flag; with `--output json` each is a JSON document on stderr.
#[test]
fn unreachable_addresses_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = free_addr();
    let cases: [(&str, &str, &str); 4] = [
        ("localhost", "INVALID_ADDRESS", "--meta \"localhost\" has no port"),
        ("not an address", "INVALID_ADDRESS", "is not host:port"),
        ("no-such-host.invalid:7100", "HOST_NOT_FOUND", "the host \"no-such-host.invalid\" does not resolve"),
        (nobody.as_str(), "CONNECTION_REFUSED", "nothing listens at"),
    ];
    for (address, reason, text) in cases {
        let table = run(dir.path(), &["--meta", address, "tenant", "list"], &[]).unwrap();
        assert_eq!(table.code, Some(1), "{address}: {}", table.stderr);
        assert!(table.stderr.starts_with(&format!("error: {reason}: ")), "{address}: {}", table.stderr);
        assert!(table.stderr.contains(text), "{address}: {}", table.stderr);
        assert!(table.stdout.is_empty());
        let json = run(dir.path(), &["--output", "json", "--meta", address, "node", "list"], &[]).unwrap();
        assert_eq!(json.code, Some(1), "{address}: {}", json.stderr);
        let error: Value = serde_json::from_str(json.stderr.trim()).unwrap();
        assert_eq!(error["error"]["reason"], reason, "{error}");
        assert!(error["error"]["message"].as_str().unwrap().contains("--meta"), "{error}");
    }
    // The router's flag for data commands.
    let refused = run(dir.path(), &["--router", nobody.as_str(), "kv", "get", "k"], &[]).unwrap();
    assert!(
        refused.stderr.contains("CONNECTION_REFUSED") && refused.stderr.contains("(--router)"),
        "{}",
        refused.stderr
    );
    // A usage error is still exit code 2.
    assert_eq!(run(dir.path(), &["tenant", "create"], &[]).unwrap().code, Some(2));
}

/// `pairdb completions SHELL` prints a script for each shell; bash's sources cleanly and registers a
/// completion for `pairdb`.
#[test]
fn completion_scripts_source_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = pairdb(dir.path(), &["completions", shell]);
        assert!(script.stdout.contains("pairdb"), "{shell}: {}", script.stdout);
        assert!(script.stdout.contains("rebuild-status"), "{shell} completes subcommands");
    }
    let script = pairdb(dir.path(), &["completions", "bash"]);
    let file = dir.path().join("pairdb.bash");
    std::fs::write(&file, &script.stdout).unwrap();
    let sourced = std::process::Command::new("bash")
        .arg("--norc")
        .arg("-c")
        .arg(format!("source {}; complete -p pairdb", file.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&sourced.stderr);
    assert!(sourced.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "sourcing printed: {stderr}");
    assert!(String::from_utf8_lossy(&sourced.stdout).contains("pairdb"), "no completion registered");
    let bad = run(dir.path(), &["completions", "tcsh"], &[]).unwrap();
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
}

/// Renders a man page with `man -l` and returns what it printed; fails on any warning.
fn render_man_page(page: &Path) -> String {
    let rendered = std::process::Command::new("man")
        .arg("-l")
        .arg("-Tutf8")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&rendered.stderr);
    assert!(rendered.status.success(), "{}: {stderr}", page.display());
    assert!(stderr.trim().is_empty(), "{}: man warned: {stderr}", page.display());
    // grotty's bold and underline are overstrikes (`c\bc`, `_\bc`): keep the last character of each.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&rendered.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    text
}

/// `pairdb man` prints the top page, which renders with `man -l` without warnings; `--out-dir`
/// writes one page per command, each rendering cleanly too.
#[test]
fn man_pages_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let page = pairdb(dir.path(), &["man"]);
    assert!(page.stdout.starts_with(".ie") || page.stdout.contains(".TH pairdb"), "{}", &page.stdout[..200]);
    let file = dir.path().join("pairdb.1");
    std::fs::write(&file, &page.stdout).unwrap();
    let text = render_man_page(&file);
    for expected in ["pairdb", "PAIRDB_META", "status", "completions"] {
        assert!(text.contains(expected), "the page lacks {expected}:\n{text}");
    }

    let out = dir.path().join("man");
    pairdb(dir.path(), &["man", "--out-dir", out.to_str().unwrap()]);
    let mut pages: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for expected in ["pairdb.1", "pairdb-kv-put.1", "pairdb-status.1", "pairdb-node-rebuild-status.1"] {
        assert!(pages.iter().any(|page| page == expected), "no {expected} in {pages:?}");
    }
    for page in &pages {
        render_man_page(&out.join(page));
    }
    let put = render_man_page(&out.join("pairdb-kv-put.1"));
    assert!(put.contains("--if-absent") || put.contains("\u{2010}\u{2010}if\u{2010}absent"), "{put}");
}

/// `pairdb status` on a harness cluster (separate meta, storage and router processes): every node
/// with its state, an even ownership share, keys and bytes after writes, a recent heartbeat and no
/// warning flags; no migration under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_every_node_its_share_and_health() {
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    let client = cluster.client(0).await.unwrap();
    for i in 0..20 {
        client
            .put(&format!("status-{i}"), vec![b'x'; 100], pairdb_client::WriteOptions::default())
            .await
            .unwrap();
    }
    let meta = cluster.meta.addr.to_string();
    let dir = cluster.dir.path().to_path_buf();
    let status = |output: &'static str| {
        let (dir, meta) = (dir.clone(), meta.clone());
        tokio::task::spawn_blocking(move || {
            let finished = run(&dir, &["--meta", meta.as_str(), "--output", output, "status"], &[]).unwrap();
            assert!(finished.success, "{}", finished.stderr);
            finished
        })
    };

    // The nodes report their keys and live value bytes with their heartbeats.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let report = status("json").await.unwrap().json().unwrap();
        let nodes = report["nodes"].as_array().unwrap();
        let reported = nodes.iter().all(|node| {
            node["stats"]["keys"].as_u64() == Some(20)
                && node["stats"]["live_value_bytes"].as_u64() >= Some(2000)
        });
        if reported {
            break report;
        }
        assert!(Instant::now() < deadline, "the nodes never reported their data: {report:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(report["replication_factors"], serde_json::json!([3]), "{report:#}");
    let partitions = report["partition_count"].as_u64().unwrap();
    assert!(partitions > 0 && partitions.is_power_of_two(), "{report:#}");
    assert_eq!(report["migrations"], serde_json::json!([]), "{report:#}");
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        assert_eq!(
            (node["status"].as_str(), node["in_ring"].as_bool()),
            (Some("active"), Some(true)),
            "{node:#}"
        );
        // Three nodes, three replicas: each holds every partition, a third of all replicas.
        let share = node["ownership"][0]["share"].as_f64().unwrap();
        assert!((share - 1.0 / 3.0).abs() < 1e-9, "{node:#}");
        assert!(node["heartbeat_age_ms"].as_u64().unwrap() < 10_000, "{node:#}");
        let stats = &node["stats"];
        assert!(
            stats["disk_bytes"].as_u64().unwrap() > stats["live_value_bytes"].as_u64().unwrap(),
            "{node:#}"
        );
        assert_eq!(
            (stats["write_path_poisoned"].as_bool(), stats["quarantined_records"].as_u64()),
            (Some(false), Some(0))
        );
    }

    let table = status("table").await.unwrap().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("storage nodes: 3 (3 active), partitions: "), "{table}");
    let header = lines[1];
    for column in ["NODE", "STATE", "OWNS N=3", "KEYS", "LIVE DATA", "DISK", "HINTS", "HEARTBEAT", "FLAGS"] {
        assert!(header.contains(column), "no {column} column:\n{table}");
    }
    for line in &lines[2..5] {
        assert!(cluster.storage.iter().any(|node| line.contains(&node.addr.to_string())), "{table}");
        assert!(line.contains("33.3%"), "{table}");
        assert!(line.contains("active") && line.trim_end().ends_with('-'), "no flags expected:\n{table}");
    }
    assert!(table.contains("migrations: none running"), "{table}");
}
