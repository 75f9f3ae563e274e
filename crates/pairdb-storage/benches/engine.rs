//! Engine-path micro-benchmark (no gRPC): coordinated writes and reads of 1 KiB values with
//! `--sync periodic` and `always`, 1 and 64 concurrent writers.
//!
//! `cargo bench -p pairdb-storage --bench engine` (set `PAIRDB_BENCH_SECS` to change the 3 s per case;
//! `PAIRDB_BENCH_ONLY=periodic-64,restart` runs only the named cases, for profiling one of them).
//! Numbers are recorded in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pairdb_core::dvv::VersionVector;
use pairdb_core::token::PartitionCount;
use pairdb_storage::engine::{Engine, EngineConfig, SyncMode};
use pairdb_storage::keys::RecordKey;

fn open(dir: &std::path::Path, sync: SyncMode) -> Arc<Engine> {
    Engine::open(&EngineConfig {
        data_dir: dir.to_path_buf(),
        node_id: pairdb_core::ring::NodeId(1),
        partitions: PartitionCount::default(),
        sync,
        cache_bytes: 256 * 1024 * 1024,
        record_cache_bytes: 16 * 1024 * 1024,
        disk_reserve_bytes: 0,
    })
    .unwrap()
}

/// This process's user + system CPU time so far (Linux `/proc/self/stat`, in clock ticks of 10 ms).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split(' ').collect();
    fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(13).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0)
}

/// Runs `threads` workers calling `op(thread, i)` for `duration`; returns operations per second and
/// the process's CPU time per operation in microseconds (background flushes and compactions included).
fn run(threads: usize, duration: Duration, op: impl Fn(usize, u64) + Send + Sync + 'static) -> (f64, f64) {
    let op = Arc::new(op);
    let cpu_before = cpu_ticks();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (op, stop, done) = (op.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op(thread, i);
                    i += 1;
                }
                done.fetch_add(i, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.join().unwrap();
    }
    let ops = done.load(Ordering::Relaxed) as f64;
    let cpu_us = (cpu_ticks() - cpu_before) as f64 * 10_000.0;
    (ops / started.elapsed().as_secs_f64(), cpu_us / ops.max(1.0))
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`-less arguments; keep that quick.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let secs: u64 = std::env::var("PAIRDB_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let duration = Duration::from_secs(secs);
    let only = std::env::var("PAIRDB_BENCH_ONLY").ok();
    let selected = |case: &str| only.as_deref().is_none_or(|only| only.split(',').any(|c| c == case));
    let q = PartitionCount::default();
    let value = vec![0x5au8; 1024];
    println!("| sync | writers | writes/s | reads/s (same thread count) |");
    println!("|---|---|---|---|");
    let mut cpu = Vec::new();
    for (name, sync) in [("periodic", SyncMode::Periodic { interval_ms: 100 }), ("always", SyncMode::Always)]
    {
        for threads in [1usize, 64] {
            if !selected(&format!("{name}-{threads}")) {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let engine = open(dir.path(), sync);
            let write_engine = engine.clone();
            let write_value = value.clone();
            let (writes, write_cpu_us) = run(threads, duration, move |thread, i| {
                let key = RecordKey::new(q, "bench", &format!("t{thread}-k{i}"));
                write_engine
                    .coordinate_write(
                        &key,
                        &VersionVector::new(),
                        Some(write_value.clone()),
                        i,
                        Some(64),
                        false,
                    )
                    .unwrap();
            });
            let read_engine = engine.clone();
            let (reads, read_cpu_us) = run(threads, duration, move |thread, i| {
                let key = RecordKey::new(q, "bench", &format!("t{thread}-k{}", i % 1000));
                std::hint::black_box(read_engine.get(&key).unwrap());
            });
            println!("| {name} | {threads} | {writes:.0} | {reads:.0} |");
            // Start the next case on a quiet disk: without this, `always` measures fsyncs queued behind
            // the writeback of the previous case's few hundred megabytes.
            drop(engine);
            drop(dir);
            let _ = std::process::Command::new("sync").status();
            cpu.push(format!(
                "{name}/{threads}: {write_cpu_us:.1} µs per write, {read_cpu_us:.1} µs per read"
            ));
        }
    }
    println!();
    println!("process CPU time (all threads, background flushes and compactions included):");
    for line in cpu {
        println!("- {line}");
    }
    if selected("restart") {
        restart_with_a_million_keys();
    }
}

/// Time from opening a data directory holding 1,000,000 small keys (after a clean shutdown) to the
/// engine being ready, which is what a node's start-to-ready time is made of.
fn restart_with_a_million_keys() {
    let dir = tempfile::tempdir().unwrap();
    let q = PartitionCount::default();
    let mut set = pairdb_core::dvv::VersionSet::new();
    set.update(&VersionVector::new(), pairdb_core::dvv::Actor(1), Some(b"small".to_vec()), 1, None).unwrap();
    {
        // `always`, so no periodic fsync holds the engine while it is dropped: the maintenance thread
        // could then close it after the reopen below tried to take the directory lock.
        let engine = open(dir.path(), SyncMode::Always);
        for chunk in (0..1_000_000u32).collect::<Vec<_>>().chunks(10_000) {
            let batch: Vec<_> = chunk
                .iter()
                .map(|i| (RecordKey::new(q, "restart", &format!("k{i:07}")), set.clone()))
                .collect();
            engine.merge_batch(&batch).unwrap();
        }
        engine.sync_now().unwrap();
    }
    let started = Instant::now();
    let engine = open(dir.path(), SyncMode::Always);
    let opened = started.elapsed();
    let probe = RecordKey::new(q, "restart", "k0999999");
    assert!(engine.get(&probe).unwrap().is_some());
    println!();
    println!(
        "reopen with 1,000,000 keys after a clean shutdown: {:.0} ms to ready",
        opened.as_secs_f64() * 1000.0
    );
}
