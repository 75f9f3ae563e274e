//! `/metrics` of every service after a small workload: the catalogue in docs/metrics.md exists, and
//! the request counters equal the requests made. On a fresh cluster: every family with a closed label
//! set already exists at zero, every family has HELP text, count histograms have count buckets, and
//! `promtool check metrics` finds nothing to complain about.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use pairdb_client::{Consistency, ReadOptions, WriteOptions};
use pairdb_tests::cluster::{Cluster, ClusterOptions};
use pairdb_tests::{Process, http_get};

/// One sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn scrape(process: &Process) -> Vec<Sample> {
    let (status, body) = http_get(process.addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{} /metrics", process.name);
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').unwrap();
                            (key.to_owned(), value.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            Sample { name, labels, value: value.parse().unwrap_or(f64::NAN) }
        })
        .collect()
}

/// Sum of the samples of `name` whose labels include all of `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn names(samples: &[Sample]) -> Vec<&str> {
    samples.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test]
async fn every_service_exports_the_documented_metrics_and_counts_requests_exactly() {
    // Exact per-RPC counts: the router sends every storage call alone (with coalescing on, a
    // replicate that finds one in flight to its node is counted under `replicate_batch`).
    let options = ClusterOptions {
        env: vec![("PAIRDB_COALESCE_AFTER_IN_FLIGHT".to_owned(), "0".to_owned())],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(options).await.unwrap();
    let kv = cluster.client(0).await.unwrap();
    let quorum_write = WriteOptions { consistency: Consistency::Quorum, ..WriteOptions::default() };
    let quorum_read = ReadOptions { consistency: Consistency::Quorum, ..ReadOptions::default() };
    let (puts, gets, misses) = (20, 30, 5);
    for i in 0..puts {
        kv.put(&format!("k{i}"), vec![7; 100], quorum_write.clone()).await.unwrap();
    }
    for i in 0..gets {
        assert!(kv.get(&format!("k{}", i % puts), quorum_read.clone()).await.unwrap().is_some());
    }
    for i in 0..misses {
        assert!(kv.get(&format!("missing{i}"), quorum_read.clone()).await.unwrap().is_none());
    }

    let router = scrape(&cluster.routers[0]);
    assert_eq!(
        sum(
            &router,
            "pairdb_router_requests_total",
            &[("op", "put"), ("consistency", "quorum"), ("status", "ok")]
        ),
        f64::from(puts)
    );
    assert_eq!(
        sum(
            &router,
            "pairdb_router_requests_total",
            &[("op", "get"), ("consistency", "quorum"), ("status", "ok")]
        ),
        f64::from(gets)
    );
    assert_eq!(
        sum(&router, "pairdb_router_requests_total", &[("op", "get"), ("status", "KEY_NOT_FOUND")]),
        f64::from(misses)
    );
    assert_eq!(
        sum(&router, "pairdb_router_request_duration_seconds_count", &[("op", "put")]),
        f64::from(puts)
    );
    assert_eq!(
        sum(&router, "pairdb_router_request_duration_seconds_count", &[("op", "get")]),
        f64::from(gets + misses)
    );
    assert_eq!(sum(&router, "pairdb_router_read_siblings_count", &[]), f64::from(gets));
    assert_eq!(sum(&router, "pairdb_router_read_siblings_sum", &[]), f64::from(gets), "one sibling per read");
    assert!(sum(&router, "pairdb_router_topology_epoch", &[]) >= 1.0);

    // Every put was coordinated by exactly one node and replicated to the two others (in the
    // background after the quorum answer, so wait for the last replicates to land).
    let started = Instant::now();
    let storage = loop {
        let storage: Vec<Vec<Sample>> = cluster.storage.iter().map(scrape).collect();
        let total = |rpc: &str| -> f64 {
            storage
                .iter()
                .map(|s| sum(s, "pairdb_storage_requests_total", &[("rpc", rpc), ("status", "ok")]))
                .sum()
        };
        let keys: f64 = storage.iter().map(|s| sum(s, "pairdb_storage_keys", &[])).sum();
        if total("coordinate_write") == f64::from(puts)
            && total("replicate") == f64::from(2 * puts)
            && keys == f64::from(3 * puts)
        {
            break storage;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "coordinate_write {} replicate {} keys {keys}",
            total("coordinate_write"),
            total("replicate")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for node in &storage {
        assert!(sum(node, "pairdb_storage_commit_group_writes_count", &[]) >= 1.0);
        assert!(sum(node, "pairdb_storage_commit_duration_seconds_count", &[]) >= 1.0);
        assert!(sum(node, "pairdb_storage_disk_free_bytes", &[]) > 0.0);
        assert_eq!(sum(node, "pairdb_storage_write_path_poisoned", &[]), 0.0);
        assert!(node.iter().any(|s| s.name == "pairdb_storage_lsm_tables"));
        assert_eq!(
            sum(node, "pairdb_storage_lsm_outstanding_flushes", &[]),
            0.0,
            "a tiny workload flushes nothing"
        );
    }

    let meta = scrape(&cluster.meta);
    assert_eq!(sum(&meta, "pairdb_meta_is_leader", &[]), 1.0);
    assert!(sum(&meta, "pairdb_meta_watch_subscribers", &[]) >= 1.0, "the router watches meta");
    // Nodes joined one by one (auto-add): each join was a completed add_node migration.
    assert!(sum(&meta, "pairdb_meta_migrations_completed_total", &[("kind", "add_node")]) >= 2.0);
    assert_eq!(sum(&meta, "pairdb_meta_migration_running", &[]), 0.0);

    // Every name asserted here is in the catalogue.
    let catalogue =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md")).unwrap();
    for (service, samples) in [("router", &router), ("storage", &storage[0]), ("meta", &meta)] {
        for name in names(samples) {
            let base = name.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
            if base.starts_with("pairdb_") {
                assert!(
                    catalogue.contains(&format!("`{base}`")),
                    "{service} exports {base}, which docs/metrics.md does not list"
                );
            }
        }
    }
}

/// Each service's catalogue (its own families and the common ones) and where it serves.
fn catalogues(cluster: &Cluster) -> Vec<(&'static str, &Process, Vec<pairdb_service::metrics::Family>)> {
    let with_common = |own: &[pairdb_service::metrics::Family]| {
        own.iter().chain(pairdb_service::metrics::COMMON).copied().collect::<Vec<_>>()
    };
    vec![
        ("router", &cluster.routers[0], with_common(pairdb_router::metric_catalogue::FAMILIES)),
        ("storage", &cluster.storage[0], with_common(pairdb_storage::metric_catalogue::FAMILIES)),
        ("meta", &cluster.meta, with_common(pairdb_meta::metric_catalogue::FAMILIES)),
    ]
}

#[tokio::test]
async fn a_fresh_cluster_exports_every_closed_family_at_zero_with_help_and_promtool_agrees() {
    let cluster = Cluster::start(3, 1, 3).await.unwrap();
    // The storage nodes publish their state gauges on their first health tick (every 500 ms).
    let started = Instant::now();
    while !cluster.storage.iter().all(|node| scrape(node).iter().any(|s| s.name == "pairdb_storage_keys")) {
        assert!(started.elapsed() < Duration::from_secs(30), "storage state gauges never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (service, process, catalogue) in catalogues(&cluster) {
        let (status, body) = http_get(process.addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        let samples = scrape(process);
        for family in &catalogue {
            let series = match family.kind {
                pairdb_service::metrics::Kind::Histogram => format!("{}_count", family.name),
                _ => family.name.to_owned(),
            };
            for labels in family.zero {
                let found = samples.iter().any(|s| {
                    s.name == series
                        && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                });
                assert!(found, "{service}: {series}{labels:?} is not exported on a fresh cluster");
            }
        }
        // Every family exported has HELP text, and it is the catalogue's.
        for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap();
            let family = catalogue.iter().find(|f| f.name == name);
            let family =
                family.unwrap_or_else(|| panic!("{service} exports {name}, which its catalogue lacks"));
            assert!(
                body.contains(&format!("# HELP {name} {}", family.help)),
                "{service}: {name} has no HELP text"
            );
        }
        check_with_promtool(service, &body);
    }
    assert_dashboards_and_alerts_query_exported_names(&cluster);
    // Count histograms have count buckets, not the seconds ones.
    let router = scrape(&cluster.routers[0]);
    for name in ["pairdb_router_read_siblings_bucket", "pairdb_router_batch_items_bucket"] {
        let bounds: Vec<&str> = router
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get("le").map(String::as_str))
            .collect();
        assert!(bounds.contains(&"1") && bounds.contains(&"1000"), "{name}: {bounds:?}");
        assert!(!bounds.contains(&"0.0001"), "{name} has seconds buckets: {bounds:?}");
    }
    let storage = scrape(&cluster.storage[0]);
    assert!(storage.iter().any(|s| s.name == "pairdb_storage_commit_group_writes_bucket"
        && s.labels.get("le").map(String::as_str) == Some("16")));
    // Build and process figures.
    for (service, process, _) in catalogues(&cluster) {
        let samples = scrape(process);
        assert!(
            samples.iter().any(|s| s.name == "pairdb_build_info"
                && s.labels.get("service").map(String::as_str) == Some(service))
        );
        assert!(sum(&samples, "process_resident_memory_bytes", &[]) > 1e6, "{service}");
        assert!(sum(&samples, "process_open_fds", &[]) >= 3.0, "{service}");
        assert!(sum(&samples, "process_start_time_seconds", &[]) > 1.7e9, "{service}");
    }
}

/// `promtool check metrics` (Debian's `prometheus` package; `.ci/run` installs it) on one scrape.
fn check_with_promtool(service: &str, body: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus)");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics on {service}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every name the shipped dashboards and alert rules query (`deploy/referenced-metrics.txt`, which
/// `deploy/check.sh` proves is exactly what they query) is a family some service exports: one with a
/// closed label set must be in this fresh cluster's scrape; one that appears with its first event
/// must be in the exporting service's catalogue (which the test above proves complete).
fn assert_dashboards_and_alerts_query_exported_names(cluster: &Cluster) {
    let listed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/referenced-metrics.txt"),
    )
    .unwrap();
    let exported: Vec<(Vec<Sample>, Vec<pairdb_service::metrics::Family>)> =
        catalogues(cluster).into_iter().map(|(_, process, families)| (scrape(process), families)).collect();
    for name in listed.split_whitespace() {
        let found = exported.iter().find_map(|(samples, families)| {
            let family = families.iter().find(|f| {
                let base = match f.kind {
                    pairdb_service::metrics::Kind::Histogram => {
                        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix))
                    }
                    _ => Some(name),
                };
                base == Some(f.name)
            })?;
            Some((samples, family))
        });
        let (samples, family) =
            found.unwrap_or_else(|| panic!("dashboards or alerts query {name}, which no service exports"));
        if !family.zero.is_empty() {
            assert!(samples.iter().any(|s| s.name == name), "{name} is not in a fresh cluster's scrape");
        }
    }
}
