//! `pairdb bench`: a YCSB-style load generator against a router.
//!
//! A load phase inserts `--records` keys, then a run phase issues the workload's mix for
//! `--operations` or `--duration`. Closed loop by default (each of `--concurrency` workers sends its
//! next request when the last one returns). With `--target-rate` the load is open loop: operation i is
//! due at start + i / rate and its latency is measured from that due time, so a stall shows up as
//! latency of every request that should have been sent during it (no coordinated omission).
//!
//! Updates write with the context the last write or read of that key returned (kept per key), so the
//! benchmark does not grow siblings the way blind writes would; F reads and writes back with the
//! read's context.

mod floor;
mod keys;
mod report;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pairdb_client::{Consistency, KvClient, ReadOptions, WriteOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::time::Instant;

use self::keys::{KeyChooser, key_of};
use self::report::{Op, Recorder};
use crate::cli::{ConsistencyArg, Globals};
use crate::output::{self, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// 50% reads, 50% updates.
    A,
    /// 95% reads, 5% updates.
    B,
    /// Reads only.
    C,
    /// 50% reads, 50% read-modify-writes (read, then write back with the read's context).
    F,
    /// Updates only.
    W,
    /// Listing pages (ListKeys, 1,000 keys each) walking the whole tenant over and over.
    L,
    /// Scan pages (keys with values) walking the whole tenant over and over.
    S,
    /// Updates in PutMany batches of `--batch-size` items (one operation = one batch; the report
    /// gives items/s too).
    P,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::A => "A",
            Workload::B => "B",
            Workload::C => "C",
            Workload::F => "F",
            Workload::W => "W",
            Workload::L => "L",
            Workload::S => "S",
            Workload::P => "P",
        }
    }

    /// Percentage of reads; the rest are updates (read-modify-writes for F).
    fn read_percent(self) -> u32 {
        match self {
            Workload::A | Workload::F => 50,
            Workload::B => 95,
            Workload::C | Workload::L | Workload::S => 100,
            Workload::W | Workload::P => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    /// Every record equally often.
    Uniform,
    /// A few hot records most of the time (YCSB's skew).
    Zipfian,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The operation mix of the run phase.
    #[arg(long, value_enum, default_value_t = Workload::A, ignore_case = true)]
    pub workload: Workload,
    /// Keys inserted by the load phase and drawn by the run phase.
    #[arg(long, default_value_t = 10_000)]
    pub records: u64,
    /// Run-phase operations (instead of --duration).
    #[arg(long, conflicts_with = "duration")]
    pub operations: Option<u64>,
    /// Run-phase duration, e.g. `20s`, `2m`, `500ms` (default 10s).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub duration: Option<Duration>,
    /// Concurrent requests (workers).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub value_size: usize,
    /// How the run phase picks keys.
    #[arg(long, value_enum, default_value_t = Distribution::Zipfian)]
    pub distribution: Distribution,
    /// Consistency of every request (default: the tenant's).
    #[arg(long, value_enum)]
    pub consistency: Option<ConsistencyArg>,
    /// Open-loop load at this many operations per second.
    #[arg(long)]
    pub target_rate: Option<f64>,
    /// Skip the load phase (the records are already there).
    #[arg(long)]
    pub skip_load: bool,
    /// Seed of the key and operation choice.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also measure the gRPC floor (`shared/bench/floor.sh`, a tonic echo) before the load phase
    /// and after the run phase, and report each phase's ops/s as a ratio to the 4-connection echo
    /// rate. Takes the script's path; without one, `$PAIRDB_FLOOR_SCRIPT` or `shared/bench/floor.sh`
    /// above the working directory.
    #[arg(long, value_name = "FLOOR_SH", num_args = 0..=1, default_missing_value = "")]
    pub ratio_to_floor: Option<std::path::PathBuf>,
    /// Seconds each floor case runs (with --ratio-to-floor).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub floor_secs: u64,
    /// HTTP/2 connections to the router, shared round-robin by the workers (the gRPC floor's
    /// ratio is stated against its 4-connection echo, so 4 by default).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: u32,
    /// Items per PutMany (workload P), 1..=1000.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch_size: u32,
}

/// When the run phase stops.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Operations(u64),
    Until(Instant),
}

/// Contexts returned for each record, so updates supersede what they last saw.
#[derive(Debug, Default)]
struct Contexts {
    shards: Vec<Mutex<HashMap<u64, Vec<u8>>>>,
}

impl Contexts {
    fn new() -> Self {
        Self { shards: (0..64).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    fn shard(&self, record: u64) -> &Mutex<HashMap<u64, Vec<u8>>> {
        &self.shards[(record % self.shards.len() as u64) as usize]
    }

    fn get(&self, record: u64) -> Vec<u8> {
        self.shard(record).lock().map(|map| map.get(&record).cloned().unwrap_or_default()).unwrap_or_default()
    }

    fn set(&self, record: u64, context: Vec<u8>) {
        if let Ok(mut map) = self.shard(record).lock() {
            map.insert(record, context);
        }
    }
}

/// Shared state of one phase.
#[derive(Debug)]
struct Phase {
    /// One client per connection (`--connections`); worker `i` uses client `i % len`.
    clients: Vec<KvClient>,
    contexts: Contexts,
    next_operation: AtomicU64,
    value_size: usize,
    consistency: Consistency,
    /// Operations finished and failed so far in this phase, for the live progress line.
    finished_ops: AtomicU64,
    failed_ops: AtomicU64,
}

/// What one worker sends through: the shared phase and the connection the worker was given.
struct Session<'a> {
    phase: &'a Phase,
    client: &'a KvClient,
}

impl<'a> Session<'a> {
    fn of(phase: &'a Phase, worker: u32) -> Self {
        Self { phase, client: &phase.clients[worker as usize % phase.clients.len()] }
    }
}

pub async fn run(globals: &Globals, args: BenchArgs) -> anyhow::Result<()> {
    if args.records == 0 || args.concurrency == 0 || args.concurrency > 10_000 {
        anyhow::bail!("INVALID_ARGUMENT: --records must be positive and --concurrency between 1 and 10000");
    }
    if let Some(rate) = args.target_rate
        && !(rate.is_finite() && rate > 0.0)
    {
        anyhow::bail!("INVALID_ARGUMENT: --target-rate must be a positive number of operations per second");
    }
    let floor_script = args.ratio_to_floor.as_deref().map(floor::locate).transpose()?;
    let floor_before = match &floor_script {
        Some(script) => Some(floor::measure(script, args.floor_secs).await?),
        None => None,
    };
    let clients = globals.kv_connections(args.connections as usize).await?;
    let phase = Arc::new(Phase {
        clients,
        contexts: Contexts::new(),
        next_operation: AtomicU64::new(0),
        value_size: args.value_size,
        consistency: crate::cli::consistency(args.consistency),
        finished_ops: AtomicU64::new(0),
        failed_ops: AtomicU64::new(0),
    });
    let show_progress = globals.output == Output::Table;

    let load = if args.skip_load {
        None
    } else {
        let (recorder, elapsed) = load_phase(&phase, &args, show_progress).await;
        Some(recorder.to_json(elapsed))
    };

    phase.next_operation.store(0, Ordering::Relaxed);
    phase.finished_ops.store(0, Ordering::Relaxed);
    phase.failed_ops.store(0, Ordering::Relaxed);
    let duration = args.duration.unwrap_or(Duration::from_secs(10));
    let (recorder, elapsed) = run_phase(&phase, &args, duration, show_progress).await;
    let run = recorder.to_json(elapsed);
    let errors = recorder.error_count()
        + load.as_ref().map_or(0, |load| {
            load["errors"].as_object().map_or(0, |errors| errors.values().filter_map(|v| v.as_u64()).sum())
        });

    let floor = match (&floor_script, floor_before) {
        (Some(script), Some(before)) => {
            let after = floor::measure(script, args.floor_secs).await?;
            let ops = |phase: &serde_json::Value| phase["throughput_ops_per_sec"].as_f64();
            let items = run["batched_items_per_sec"].as_f64();
            let phases = [("load", load.as_ref().and_then(ops)), ("run", ops(&run)), ("run_items", items)];
            Some(floor::report(&before, &after, &phases))
        }
        _ => None,
    };
    let report = json!({
        "workload": args.workload.name(),
        "records": args.records,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "value_size": args.value_size,
        "distribution": format!("{:?}", args.distribution).to_lowercase(),
        "consistency": args.consistency.map(|c| format!("{c:?}").to_lowercase()),
        "target_rate": args.target_rate,
        "load": load,
        "run": run,
        "floor": floor,
    });
    match globals.output {
        Output::Json => output::print_json(&report),
        Output::Table => {
            println!(
                "workload {} ({}% reads), {} records, {}-byte values, {} distribution, {} workers, {}",
                args.workload.name(),
                args.workload.read_percent(),
                args.records,
                args.value_size,
                report["distribution"].as_str().unwrap_or_default(),
                args.concurrency,
                match args.target_rate {
                    Some(rate) => format!("open loop at {rate} ops/s"),
                    None => "closed loop".to_owned(),
                },
            );
            if let Some(load) = &report["load"].as_object().map(|_| &report["load"]) {
                report::print_table("load", load);
            }
            report::print_table("run", &report["run"]);
            if let Some(floor) = report["floor"].as_object() {
                report::print_floor(floor);
            }
        }
    }
    if errors > 0 {
        anyhow::bail!("BENCH_ERRORS: {errors} operations failed (see the report above)");
    }
    Ok(())
}

fn progress(show: bool, length: u64, template: &str) -> ProgressBar {
    let bar = if show { ProgressBar::new(length) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

async fn load_phase(phase: &Arc<Phase>, args: &BenchArgs, show_progress: bool) -> (Recorder, Duration) {
    let bar = progress(show_progress, args.records, "load [{bar:40}] {pos}/{len} records {per_sec}");
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.concurrency {
        let (phase, bar, records, seed) = (phase.clone(), bar.clone(), args.records, args.seed);
        workers.spawn(async move {
            let session = Session::of(&phase, worker);
            let mut recorder = Recorder::default();
            let mut rng = StdRng::seed_from_u64(seed ^ u64::from(worker).rotate_left(32));
            loop {
                let record = phase.next_operation.fetch_add(1, Ordering::Relaxed);
                if record >= records {
                    break;
                }
                let sent = Instant::now();
                put(&session, record, &mut rng, Vec::new(), Op::Insert, sent, &mut recorder).await;
                bar.inc(1);
            }
            recorder
        });
    }
    let recorder = collect(workers).await;
    bar.finish_and_clear();
    (recorder, started.elapsed())
}

async fn run_phase(
    phase: &Arc<Phase>,
    args: &BenchArgs,
    duration: Duration,
    show_progress: bool,
) -> (Recorder, Duration) {
    let started = Instant::now();
    let limit = match args.operations {
        Some(operations) => Limit::Operations(operations),
        None => Limit::Until(started + duration),
    };
    let (length, template) = match limit {
        Limit::Operations(operations) => (operations, "run [{bar:40}] {pos}/{len} ops | {msg}"),
        Limit::Until(_) => (duration.as_secs().max(1), "run [{bar:40}] {pos}/{len} s | {msg}"),
    };
    let bar = progress(show_progress, length, template);
    let chooser = match args.distribution {
        Distribution::Uniform => KeyChooser::uniform(args.records),
        Distribution::Zipfian => KeyChooser::zipfian(args.records),
    };
    let ticker = {
        let (bar, phase) = (bar.clone(), phase.clone());
        tokio::spawn(async move {
            let mut rate = LiveRate::new(started);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Limit::Until(_) = limit {
                    bar.set_position(started.elapsed().as_secs());
                }
                let finished = phase.finished_ops.load(Ordering::Relaxed);
                let failed = phase.failed_ops.load(Ordering::Relaxed);
                bar.set_message(rate.line(Instant::now(), finished, failed));
            }
        })
    };
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.concurrency {
        let (phase, bar, chooser) = (phase.clone(), bar.clone(), chooser.clone());
        let (workload, seed, target_rate, batch_size) =
            (args.workload, args.seed, args.target_rate, args.batch_size);
        workers.spawn(async move {
            let session = Session::of(&phase, worker);
            let mut recorder = Recorder::default();
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1) ^ u64::from(worker).rotate_left(17));
            // Listing workloads: where this worker's walk over the tenant is (`None`: start over).
            let mut page_token: Option<String> = None;
            loop {
                let operation = phase.next_operation.fetch_add(1, Ordering::Relaxed);
                let due = match target_rate {
                    Some(rate) => started + Duration::from_secs_f64(operation as f64 / rate),
                    None => Instant::now(),
                };
                match limit {
                    Limit::Operations(total) if operation >= total => break,
                    Limit::Until(end) if due >= end || Instant::now() >= end => break,
                    _ => {}
                }
                tokio::time::sleep_until(due).await;
                let errors_before = recorder.error_count();
                let record = chooser.next(&mut rng);
                if workload == Workload::P {
                    let records: Vec<u64> = (0..batch_size).map(|_| chooser.next(&mut rng)).collect();
                    put_many(&session, &records, &mut rng, due, &mut recorder).await;
                } else if matches!(workload, Workload::L | Workload::S) {
                    page_token =
                        list_page(&session, workload == Workload::S, page_token, due, &mut recorder).await;
                } else if rng.random_range(0..100) < workload.read_percent() {
                    read(&session, record, Op::Read, due, &mut recorder).await;
                } else if workload == Workload::F {
                    let context = read(&session, record, Op::ReadModifyWrite, due, &mut recorder).await;
                    if let Some(context) = context {
                        put(&session, record, &mut rng, context, Op::ReadModifyWrite, due, &mut recorder)
                            .await;
                    }
                } else {
                    let context = phase.contexts.get(record);
                    put(&session, record, &mut rng, context, Op::Update, due, &mut recorder).await;
                }
                phase.finished_ops.fetch_add(1, Ordering::Relaxed);
                let failed = recorder.error_count() - errors_before;
                if failed > 0 {
                    phase.failed_ops.fetch_add(failed, Ordering::Relaxed);
                }
                if let Limit::Operations(_) = limit {
                    bar.inc(1);
                }
            }
            recorder
        });
    }
    let recorder = collect(workers).await;
    ticker.abort();
    bar.finish_and_clear();
    (recorder, started.elapsed())
}

/// One listing page of the walk at `page_token`; returns where the walk goes on (`None`: start
/// over, after the last page or a failure).
async fn list_page(
    session: &Session<'_>,
    with_values: bool,
    page_token: Option<String>,
    due: Instant,
    recorder: &mut Recorder,
) -> Option<String> {
    let phase = session.phase;
    let options = pairdb_client::ListOptions { consistency: phase.consistency, ..Default::default() };
    let (op, page) = if with_values {
        let page = session.client.scan(&options, page_token.as_deref()).await;
        (Op::ScanPage, page.map(|p| (p.keys.len(), p.next_page_token)))
    } else {
        let page = session.client.list_keys(&options, page_token.as_deref()).await;
        (Op::ListPage, page.map(|p| (p.keys.len(), p.next_page_token)))
    };
    match page {
        Ok((keys, next)) => {
            recorder.record(op, due.elapsed());
            recorder.listed_keys += keys as u64;
            next
        }
        Err(error) => {
            recorder.error(error.reason());
            None
        }
    }
}

/// The live part of the run bar: operations so far, the rate over the last second or so, errors.
#[derive(Debug)]
struct LiveRate {
    /// (when, operations finished then) of the last few ticks.
    window: std::collections::VecDeque<(Instant, u64)>,
}

impl LiveRate {
    fn new(started: Instant) -> Self {
        Self { window: std::collections::VecDeque::from([(started, 0)]) }
    }

    fn line(&mut self, now: Instant, finished: u64, failed: u64) -> String {
        self.window.push_back((now, finished));
        while self.window.len() > 5 {
            self.window.pop_front();
        }
        let (since, then) = self.window.front().copied().unwrap_or((now, finished));
        let secs = now.duration_since(since).as_secs_f64();
        let rate = if secs > 0.0 { finished.saturating_sub(then) as f64 / secs } else { 0.0 };
        format!("{finished} ops, {rate:.0} ops/s, {failed} errors")
    }
}

async fn collect(mut workers: tokio::task::JoinSet<Recorder>) -> Recorder {
    let mut total = Recorder::default();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(recorder) => total.merge(recorder),
            Err(error) => total.error(&format!("WORKER_PANICKED: {error}")),
        }
    }
    total
}

fn value(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut value = vec![0u8; size];
    rng.fill(value.as_mut_slice());
    value
}

/// Writes a fresh value to `record`; the latency of `op` runs from `since` (its send or due time;
/// for read-modify-write, from the read's due time, so it covers both round trips).
async fn put(
    session: &Session<'_>,
    record: u64,
    rng: &mut StdRng,
    context: Vec<u8>,
    op: Op,
    since: Instant,
    recorder: &mut Recorder,
) {
    let phase = session.phase;
    let options = WriteOptions { consistency: phase.consistency, context, ..WriteOptions::default() };
    match session.client.put(&key_of(record), value(rng, phase.value_size), options).await {
        Ok(result) => {
            recorder.record(op, since.elapsed());
            phase.contexts.set(record, result.context);
        }
        Err(error) => recorder.error(error.reason()),
    }
}

/// Writes fresh values to `records` in one PutMany (each with its known context).
async fn put_many(
    session: &Session<'_>,
    records: &[u64],
    rng: &mut StdRng,
    since: Instant,
    recorder: &mut Recorder,
) {
    let phase = session.phase;
    let items = records
        .iter()
        .map(|record| pairdb_client::PutManyItem {
            key: key_of(*record),
            value: value(rng, phase.value_size),
            context: phase.contexts.get(*record),
            ..Default::default()
        })
        .collect();
    let options = WriteOptions { consistency: phase.consistency, ..WriteOptions::default() };
    match session.client.put_many(items, options).await {
        Ok(reply) => {
            recorder.record(Op::PutMany, since.elapsed());
            for (record, result) in records.iter().zip(reply.results) {
                match result {
                    Ok(ack) => {
                        recorder.batched_items += 1;
                        phase.contexts.set(*record, ack.context);
                    }
                    Err(error) => recorder.error(error.reason()),
                }
            }
        }
        Err(error) => recorder.error(error.reason()),
    }
}

/// Reads `record`; returns its context (for read-modify-write) when the read succeeded. A read that is
/// the first half of a read-modify-write records no latency of its own.
async fn read(
    session: &Session<'_>,
    record: u64,
    op: Op,
    since: Instant,
    recorder: &mut Recorder,
) -> Option<Vec<u8>> {
    let phase = session.phase;
    let options = ReadOptions { consistency: phase.consistency, ..ReadOptions::default() };
    match session.client.get(&key_of(record), options).await {
        Ok(found) => {
            if op == Op::Read {
                recorder.record(op, since.elapsed());
            }
            match found {
                Some(result) => Some(result.context),
                None => {
                    recorder.not_found += 1;
                    Some(Vec::new())
                }
            }
        }
        Err(error) => {
            recorder.error(error.reason());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_line_shows_the_recent_rate_and_errors() {
        let started = Instant::now();
        let mut rate = LiveRate::new(started);
        assert_eq!(rate.line(started + Duration::from_millis(500), 500, 0), "500 ops, 1000 ops/s, 0 errors");
        // The rate follows the last ticks, not the average since the start.
        let mut line = String::new();
        for tick in 2..=10u64 {
            line = rate.line(started + Duration::from_millis(500 * tick), 500 + (tick - 1) * 100, 3);
        }
        assert_eq!(line, "1400 ops, 200 ops/s, 3 errors");
    }

    #[test]
    fn workload_mixes() {
        assert_eq!(Workload::A.read_percent(), 50);
        assert_eq!(Workload::B.read_percent(), 95);
        assert_eq!(Workload::C.read_percent(), 100);
        assert_eq!(Workload::W.read_percent(), 0);
    }
}
