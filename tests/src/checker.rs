//! A load generator that records what the cluster acknowledged, and the checks that run afterwards.
//!
//! [`Checker::start`] runs W writer tasks and R reader tasks against one router. Each writer owns a
//! disjoint set of keys (`{prefix}{writer}-k{i}`); it first writes each of its keys once (the preload),
//! then picks its keys at random at a bounded rate. Every key is written sequentially with the causal
//! context of its previous acknowledged write (or of a read), with a value unique to the write
//! (`{key}:{seq}:` plus padding); some writes are deletes with that context. A write that fails has an
//! unknown outcome (it may have reached some replicas): the writer records it and reads the key again
//! before its next write, so that write carries a fresh context. Readers read random keys at QUORUM
//! and count failures.
//!
//! [`LoadReport::verify`] reads every key at ALL and checks, per key:
//! - **lost**: the last acknowledged write is a put whose value is absent, and no later
//!   (unknown-outcome) write could have replaced it;
//! - **resurrected**: a value is present that a later acknowledged write replaced: its dot is covered
//!   by that write's context, or the value is an acknowledged write's and the later write's context
//!   covers everything that write's acknowledgement returned. The second form catches a write that
//!   reached the replicas under two dots (a coordinator that applied it although the router gave up
//!   on it, plus the one that acknowledged it): the later context names only the acknowledged dot,
//!   and the twin must not outlive it either;
//! - **unexpected**: a value this checker never wrote for the key;
//! - an older acknowledged value present as a sibling whose dot the later acknowledged contexts did not
//!   cover is legal (a concurrent value is never silently dropped) and only counted (`stale_siblings`).
//!
//! [`scan_replicas`] reads keys directly from storage nodes (storage `Get`, bypassing routers, so no
//! read repair) for the copy-count and convergence checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pairdb_client::{
    ClientOptions, Consistency, KvClient, ReadOptions, ReadResult, RetryPolicy, WriteOptions, WriteResult,
};
use pairdb_core::context::context_vector_unverified;
use pairdb_core::dvv::{Actor, VersionSet, VersionVector};
use pairdb_core::encoding::decode_version_set;
use pairdb_proto::storage::v1 as spb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};
use tokio::task::{JoinHandle, JoinSet};

use crate::cluster::{Cluster, ClusterTopology};

/// What load [`Checker::start`] runs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub tenant: String,
    /// Keys are `{key_prefix}{writer}-k{i}`: distinct prefixes keep two checkers apart.
    pub key_prefix: String,
    pub writers: usize,
    pub keys_per_writer: usize,
    /// Total write rate after the preload (operations per second, all writers together).
    pub writes_per_sec: f64,
    pub readers: usize,
    /// Total read rate (all readers together).
    pub reads_per_sec: f64,
    /// Share of writes that are deletes (only of keys the writer holds a context for).
    pub delete_ratio: f64,
    /// Size of every value (the unique prefix, padded).
    pub value_bytes: usize,
    pub write_consistency: Consistency,
    pub read_consistency: Consistency,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// Router the load goes through.
    pub router: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            tenant: "t".to_owned(),
            key_prefix: "w".to_owned(),
            writers: 6,
            keys_per_writer: 250,
            writes_per_sec: 150.0,
            readers: 2,
            reads_per_sec: 100.0,
            delete_ratio: 0.1,
            value_bytes: 100,
            write_consistency: Consistency::Quorum,
            read_consistency: Consistency::Quorum,
            request_timeout: Duration::from_secs(3),
            router: 0,
        }
    }
}

impl LoadConfig {
    /// Every key the load writes, in writer order.
    pub fn keys(&self) -> Vec<String> {
        (0..self.writers).flat_map(|w| (0..self.keys_per_writer).map(move |i| self.key(w, i))).collect()
    }

    fn key(&self, writer: usize, index: usize) -> String {
        format!("{}{writer}-k{index}", self.key_prefix)
    }
}

/// One write of a key, as the writer sent it and saw it end.
#[derive(Debug, Clone)]
struct Op {
    seq: u64,
    delete: bool,
    acked: bool,
    /// The context the write carried.
    sent: VersionVector,
    /// The resulting version vector of an acknowledged write.
    result: Option<VersionVector>,
    /// Since the checker started.
    at: Duration,
}

/// Everything one key went through.
#[derive(Debug, Clone, Default)]
pub struct KeyHistory {
    ops: Vec<Op>,
    /// The context the next write carries.
    context: Vec<u8>,
    /// The last write's outcome is unknown: read before writing again.
    needs_read: bool,
    next_seq: u64,
}

impl KeyHistory {
    /// The last operation, when it is an acknowledged put: the key must have a live value.
    fn ends_with_acked_put(&self) -> bool {
        self.ops.last().is_some_and(|op| op.acked && !op.delete)
    }

    fn ends_with_acked_delete(&self) -> bool {
        self.ops.last().is_some_and(|op| op.acked && op.delete)
    }

    pub fn acked_writes(&self) -> usize {
        self.ops.iter().filter(|op| op.acked).count()
    }
}

#[derive(Debug, Default)]
struct Counters {
    acked_puts: AtomicU64,
    acked_deletes: AtomicU64,
    unknown_writes: AtomicU64,
    reads_ok: AtomicU64,
    failed_reads: AtomicU64,
    failed_rereads: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    config: LoadConfig,
    stop: AtomicBool,
    /// Writers (readers) hold a read guard per operation; pausing takes the write guard.
    write_gate: Arc<RwLock<()>>,
    read_gate: Arc<RwLock<()>>,
    counters: Counters,
    /// A sample of failures, with when they happened.
    errors: std::sync::Mutex<Vec<String>>,
    started: Instant,
}

impl Shared {
    fn note_error(&self, what: String) {
        if let Ok(mut errors) = self.errors.lock()
            && errors.len() < 50
        {
            errors.push(format!("t={:.1}s {what}", self.started.elapsed().as_secs_f64()));
        }
    }
}

/// One writer's keys; the writer holds the lock during each of its operations.
type WriterKeys = Arc<tokio::sync::Mutex<Vec<(String, KeyHistory)>>>;

/// A running load; see the module documentation.
#[derive(Debug)]
pub struct Checker {
    shared: Arc<Shared>,
    keys: Vec<WriterKeys>,
    writers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
    write_pause: Option<OwnedRwLockWriteGuard<()>>,
    read_pause: Option<OwnedRwLockWriteGuard<()>>,
}

/// A client through router `router` that never retries (every failure is counted).
pub async fn client(
    cluster: &Cluster,
    router: usize,
    tenant: &str,
    timeout: Duration,
) -> anyhow::Result<KvClient> {
    let options =
        ClientOptions { retry: RetryPolicy::never(), request_timeout: timeout, ..ClientOptions::default() };
    Ok(KvClient::connect(&cluster.routers[router].addr.to_string(), tenant, options).await?)
}

impl Checker {
    /// Preloads every key once (acknowledged or recorded as unknown), then starts the load and
    /// returns while it runs.
    pub async fn start(cluster: &Cluster, config: LoadConfig) -> anyhow::Result<Checker> {
        let kv = client(cluster, config.router, &config.tenant, config.request_timeout).await?;
        let shared = Arc::new(Shared {
            config: config.clone(),
            stop: AtomicBool::new(false),
            write_gate: Arc::new(RwLock::new(())),
            read_gate: Arc::new(RwLock::new(())),
            counters: Counters::default(),
            errors: std::sync::Mutex::new(Vec::new()),
            started: Instant::now(),
        });
        let (preloaded, mut preloads) = tokio::sync::mpsc::channel(config.writers.max(1));
        let keys: Vec<WriterKeys> = (0..config.writers)
            .map(|writer| {
                Arc::new(tokio::sync::Mutex::new(
                    (0..config.keys_per_writer)
                        .map(|i| (config.key(writer, i), KeyHistory::default()))
                        .collect(),
                ))
            })
            .collect();
        let writers = keys
            .iter()
            .map(|keys| tokio::spawn(write_loop(kv.clone(), shared.clone(), keys.clone(), preloaded.clone())))
            .collect();
        drop(preloaded);
        let deadline = Instant::now() + Duration::from_secs(180);
        for _ in 0..config.writers {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, preloads.recv()).await {
                Ok(Some(())) => {}
                Ok(None) => bail!("a writer ended during the preload"),
                Err(_) => bail!("the preload did not finish within 180 s"),
            }
        }
        let all_keys = Arc::new(config.keys());
        let readers = (0..config.readers)
            .map(|_| tokio::spawn(read_loop(kv.clone(), shared.clone(), all_keys.clone())))
            .collect();
        let counters = &shared.counters;
        eprintln!(
            "checker: preloaded {} keys in {:.1}s ({} acknowledged, {} unknown)",
            config.writers * config.keys_per_writer,
            shared.started.elapsed().as_secs_f64(),
            counters.acked_puts.load(Ordering::Relaxed),
            counters.unknown_writes.load(Ordering::Relaxed),
        );
        Ok(Checker { shared, keys, writers, readers, write_pause: None, read_pause: None })
    }

    /// Every key of the load.
    pub fn keys(&self) -> Vec<String> {
        self.shared.config.keys()
    }

    /// Keys whose last operation so far is an acknowledged put (exact while paused).
    pub async fn live_keys(&self) -> Vec<String> {
        let mut live = Vec::new();
        for keys in &self.keys {
            let keys = keys.lock().await;
            live.extend(keys.iter().filter(|(_, h)| h.ends_with_acked_put()).map(|(k, _)| k.clone()));
        }
        live
    }

    /// Stops writers and readers at their next operation boundary; returns once no operation is in
    /// flight.
    pub async fn pause(&mut self) {
        if self.write_pause.is_none() {
            self.write_pause = Some(self.shared.write_gate.clone().write_owned().await);
        }
        self.pause_readers().await;
    }

    /// Stops only the readers (their reads would repair replicas a test wants to see repaired by
    /// something else).
    pub async fn pause_readers(&mut self) {
        if self.read_pause.is_none() {
            self.read_pause = Some(self.shared.read_gate.clone().write_owned().await);
        }
    }

    /// Lets paused writers and readers go on.
    pub fn resume(&mut self) {
        self.write_pause = None;
        self.read_pause = None;
    }

    /// (acknowledged writes, unknown writes, successful reads, failed reads) so far.
    pub fn progress(&self) -> (u64, u64, u64, u64) {
        let c = &self.shared.counters;
        (
            c.acked_puts.load(Ordering::Relaxed) + c.acked_deletes.load(Ordering::Relaxed),
            c.unknown_writes.load(Ordering::Relaxed),
            c.reads_ok.load(Ordering::Relaxed),
            c.failed_reads.load(Ordering::Relaxed),
        )
    }

    /// Waits until `count` more writes were acknowledged (fails after `timeout`).
    pub async fn wait_for_acked_writes(&self, count: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.progress().0 + count;
        let started = Instant::now();
        while self.progress().0 < target {
            if started.elapsed() > timeout {
                bail!(
                    "only {} of {count} writes acknowledged within {timeout:?}",
                    count + self.progress().0 - target
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops the load and returns what it saw.
    pub async fn stop(mut self) -> anyhow::Result<LoadReport> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.resume();
        let mut histories = BTreeMap::new();
        for writer in self.writers.drain(..) {
            writer.await.context("a writer task panicked")?;
        }
        for keys in &self.keys {
            histories.extend(keys.lock().await.drain(..));
        }
        for reader in self.readers.drain(..) {
            reader.await.context("a reader task panicked")?;
        }
        let c = &self.shared.counters;
        let errors = self.shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let report = LoadReport {
            config: self.shared.config.clone(),
            elapsed: self.shared.started.elapsed(),
            acked_puts: c.acked_puts.load(Ordering::Relaxed),
            acked_deletes: c.acked_deletes.load(Ordering::Relaxed),
            unknown_writes: c.unknown_writes.load(Ordering::Relaxed),
            reads_ok: c.reads_ok.load(Ordering::Relaxed),
            failed_reads: c.failed_reads.load(Ordering::Relaxed),
            failed_rereads: c.failed_rereads.load(Ordering::Relaxed),
            errors,
            histories,
        };
        eprintln!("checker: {}", report.summary());
        Ok(report)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for task in &self.writers {
            task.abort();
        }
        for task in &self.readers {
            task.abort();
        }
    }
}

fn value_of(key: &str, seq: u64, size: usize) -> Vec<u8> {
    let mut value = format!("{key}:{seq}:").into_bytes();
    if value.len() < size {
        value.resize(size, b'x');
    }
    value
}

/// The sequence number of a value this checker wrote for `key`.
fn seq_of(key: &str, value: &[u8]) -> Option<u64> {
    let rest = value.strip_prefix(key.as_bytes())?.strip_prefix(b":")?;
    let end = rest.iter().position(|b| *b == b':')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn vector_of(entries: &[(u64, u64)]) -> VersionVector {
    VersionVector::from_entries(entries.iter().map(|(actor, counter)| (Actor(*actor), *counter)))
}

fn covers(vector: &VersionVector, dot: (u64, u64)) -> bool {
    vector.get(Actor(dot.0)) >= dot.1
}

/// One write of `key` with its current context; records the outcome.
async fn write_once(kv: &KvClient, shared: &Shared, key: &str, history: &mut KeyHistory, delete: bool) {
    let config = &shared.config;
    let seq = history.next_seq;
    history.next_seq += 1;
    let sent = context_vector_unverified(&history.context).unwrap_or_default();
    let options = WriteOptions {
        consistency: config.write_consistency,
        context: history.context.clone(),
        timeout: Some(config.request_timeout),
        ..WriteOptions::default()
    };
    let outcome: Result<WriteResult, _> = if delete {
        kv.delete(key, options).await
    } else {
        kv.put(key, value_of(key, seq, config.value_bytes), options).await
    };
    let at = shared.started.elapsed();
    match outcome {
        Ok(result) => {
            let counter = if delete { &shared.counters.acked_deletes } else { &shared.counters.acked_puts };
            counter.fetch_add(1, Ordering::Relaxed);
            history.ops.push(Op {
                seq,
                delete,
                acked: true,
                sent,
                result: Some(vector_of(&result.version_vector)),
                at,
            });
            history.context = result.context;
        }
        Err(error) => {
            shared.counters.unknown_writes.fetch_add(1, Ordering::Relaxed);
            shared.note_error(format!("{} {key} seq {seq}: {error}", if delete { "delete" } else { "put" }));
            history.ops.push(Op { seq, delete, acked: false, sent, result: None, at });
            history.needs_read = true;
        }
    }
}

/// Reads `key` for a fresh context after an unknown outcome; false if the read failed.
async fn reread(kv: &KvClient, shared: &Shared, key: &str, history: &mut KeyHistory) -> bool {
    let options = ReadOptions {
        consistency: Consistency::Quorum,
        timeout: Some(shared.config.request_timeout),
        ..ReadOptions::default()
    };
    match kv.get(key, options).await {
        Ok(found) => {
            history.context = found.map(|r| r.context).unwrap_or_default();
            history.needs_read = false;
            true
        }
        Err(error) => {
            shared.counters.failed_rereads.fetch_add(1, Ordering::Relaxed);
            shared.note_error(format!("re-read {key}: {error}"));
            false
        }
    }
}

async fn write_loop(
    kv: KvClient,
    shared: Arc<Shared>,
    keys: WriterKeys,
    preloaded: tokio::sync::mpsc::Sender<()>,
) {
    let count = {
        let mut keys = keys.lock().await;
        for (key, history) in keys.iter_mut() {
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            write_once(&kv, &shared, key, history, false).await;
        }
        keys.len()
    };
    let _ = preloaded.send(()).await;
    drop(preloaded);
    if count == 0 {
        return;
    }
    let config = &shared.config;
    let period = Duration::from_secs_f64(config.writers as f64 / config.writes_per_sec.max(0.001));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rng = StdRng::seed_from_u64(rand::random());
    while !shared.stop.load(Ordering::SeqCst) {
        ticker.tick().await;
        let _gate = shared.write_gate.clone().read_owned().await;
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let mut keys = keys.lock().await;
        let index = rng.random_range(0..count);
        let Some((key, history)) = keys.get_mut(index) else { break };
        if history.needs_read && !reread(&kv, &shared, key, history).await {
            continue;
        }
        let delete = !history.context.is_empty() && rng.random_bool(config.delete_ratio.clamp(0.0, 1.0));
        write_once(&kv, &shared, key, history, delete).await;
    }
}

async fn read_loop(kv: KvClient, shared: Arc<Shared>, keys: Arc<Vec<String>>) {
    let config = &shared.config;
    if keys.is_empty() {
        return;
    }
    let period = Duration::from_secs_f64(config.readers as f64 / config.reads_per_sec.max(0.001));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rng = StdRng::seed_from_u64(rand::random());
    let options = ReadOptions {
        consistency: config.read_consistency,
        timeout: Some(config.request_timeout),
        ..ReadOptions::default()
    };
    while !shared.stop.load(Ordering::SeqCst) {
        ticker.tick().await;
        let _gate = shared.read_gate.clone().read_owned().await;
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let key = &keys[rng.random_range(0..keys.len())];
        match kv.get(key, options.clone()).await {
            Ok(_) => {
                shared.counters.reads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                shared.counters.failed_reads.fetch_add(1, Ordering::Relaxed);
                shared.note_error(format!("read {key}: {error}"));
            }
        }
    }
}

/// What a stopped [`Checker`] saw.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub config: LoadConfig,
    pub elapsed: Duration,
    pub acked_puts: u64,
    pub acked_deletes: u64,
    /// Writes that failed: their outcome is unknown.
    pub unknown_writes: u64,
    pub reads_ok: u64,
    /// Reader reads that failed.
    pub failed_reads: u64,
    /// Writers' reads after an unknown outcome that failed.
    pub failed_rereads: u64,
    /// A sample of the failures.
    pub errors: Vec<String>,
    histories: BTreeMap<String, KeyHistory>,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        format!(
            "{:.1}s: {} puts and {} deletes acknowledged, {} writes unknown, {} reads ok, {} reads failed, \
             {} re-reads failed; errors: {:#?}",
            self.elapsed.as_secs_f64(),
            self.acked_puts,
            self.acked_deletes,
            self.unknown_writes,
            self.reads_ok,
            self.failed_reads,
            self.failed_rereads,
            self.errors.iter().take(10).collect::<Vec<_>>()
        )
    }

    /// Every key of the load.
    pub fn keys(&self) -> Vec<String> {
        self.histories.keys().cloned().collect()
    }

    /// Keys whose last operation is an acknowledged put: they must have a live value on every replica.
    pub fn live_keys(&self) -> Vec<String> {
        self.histories.iter().filter(|(_, h)| h.ends_with_acked_put()).map(|(k, _)| k.clone()).collect()
    }

    /// Keys whose last operation is an acknowledged delete.
    pub fn deleted_keys(&self) -> Vec<String> {
        self.histories.iter().filter(|(_, h)| h.ends_with_acked_delete()).map(|(k, _)| k.clone()).collect()
    }

    /// Fails when any reader read failed.
    pub fn ensure_no_failed_reads(&self) -> anyhow::Result<()> {
        if self.failed_reads > 0 {
            bail!(
                "{} of {} reads failed: {:#?}",
                self.failed_reads,
                self.failed_reads + self.reads_ok,
                self.errors
            );
        }
        Ok(())
    }

    /// Reads every key at ALL through router `config.router` and checks it against its history (see
    /// the module documentation). Reads that fail are retried for a while before the key counts as
    /// unreadable.
    pub async fn verify(&self, cluster: &Cluster) -> anyhow::Result<Verification> {
        let kv = client(cluster, self.config.router, &self.config.tenant, Duration::from_secs(5)).await?;
        let keys: Vec<String> = self.histories.keys().cloned().collect();
        let mut tasks = JoinSet::new();
        for chunk in keys.chunks(keys.len().div_ceil(8).max(1)) {
            let (kv, chunk) = (kv.clone(), chunk.to_vec());
            tasks.spawn(async move {
                let mut reads = Vec::with_capacity(chunk.len());
                for key in chunk {
                    reads.push((key.clone(), read_all(&kv, &key).await));
                }
                reads
            });
        }
        let mut verification = Verification {
            keys: keys.len(),
            acked_writes: self.acked_puts + self.acked_deletes,
            failed_reads: self.failed_reads,
            ..Verification::default()
        };
        let mut live_at_all = BTreeSet::new();
        while let Some(reads) = tasks.join_next().await {
            for (key, read) in reads? {
                let history = self.histories.get(&key).context("history of a read key")?;
                match read {
                    Ok(read) => {
                        if read.is_some() {
                            live_at_all.insert(key.clone());
                        }
                        check_key(&key, history, read.as_ref(), &mut verification)
                    }
                    Err(error) => {
                        verification.unreadable += 1;
                        verification.problem(format!("{key}: unreadable at ALL: {error}"));
                    }
                }
            }
        }
        self.check_listing(&kv, &live_at_all, &mut verification).await?;
        eprintln!("checker: {}", verification.summary());
        Ok(verification)
    }
}

async fn read_all(kv: &KvClient, key: &str) -> Result<Option<ReadResult>, pairdb_client::ClientError> {
    let options = ReadOptions { consistency: Consistency::All, ..ReadOptions::default() };
    let mut attempt = 0;
    loop {
        match kv.get(key, options.clone()).await {
            Err(_) if attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

impl LoadReport {
    /// Lists the load's keys at ALL (every page) and compares them with the keys that read as live
    /// at ALL: each storage node's key index must equal its records, whatever the scenario did.
    async fn check_listing(
        &self,
        kv: &KvClient,
        live_at_all: &BTreeSet<String>,
        out: &mut Verification,
    ) -> anyhow::Result<()> {
        let options = pairdb_client::ListOptions {
            prefix: self.config.key_prefix.clone(),
            consistency: Consistency::All,
            ..Default::default()
        };
        let mut pages = kv.pages(options);
        let mut listed = BTreeSet::new();
        while let Some(page) = pages.next_keys().await {
            let page = page.context("listing the load's keys at ALL")?;
            listed.extend(page.keys.into_iter().map(|k| k.key).filter(|k| self.histories.contains_key(k)));
        }
        for key in listed.symmetric_difference(live_at_all) {
            out.listing_mismatches += 1;
            let how = if listed.contains(key) { "listed but not live" } else { "live but not listed" };
            out.problem(format!("{key}: {how} at ALL"));
        }
        Ok(())
    }
}

/// Checks one key's final ALL read against its history.
fn check_key(key: &str, history: &KeyHistory, read: Option<&ReadResult>, out: &mut Verification) {
    let ops = &history.ops;
    let last_acked = ops.iter().rposition(|op| op.acked);
    let siblings = read.map(|r| r.siblings.as_slice()).unwrap_or_default();
    let mut present = BTreeSet::new();
    for sibling in siblings {
        let Some(seq) = seq_of(key, &sibling.value) else {
            out.unexpected += 1;
            out.problem(format!(
                "{key}: value {:?} was never written by the checker",
                preview(&sibling.value)
            ));
            continue;
        };
        let Some(position) = ops.iter().position(|op| op.seq == seq && !op.delete) else {
            out.unexpected += 1;
            out.problem(format!("{key}: value of seq {seq} was never written"));
            continue;
        };
        present.insert(seq);
        let op = &ops[position];
        let covering = ops[position + 1..].iter().find(|later| {
            later.acked
                && (sibling.dot.is_some_and(|dot| covers(&later.sent, dot))
                    || op.result.as_ref().is_some_and(|acked| later.sent.descends(acked)))
        });
        if let Some(later) = covering {
            out.resurrected += 1;
            out.problem(format!(
                "{key}: value of seq {seq} ({}, written at {:.1}s) is present, but the acknowledged {} of seq \
                 {} (at {:.1}s) carried a context covering its dot {:?}; read {}",
                if op.acked { "acknowledged" } else { "unknown outcome" },
                op.at.as_secs_f64(),
                if later.delete { "delete" } else { "put" },
                later.seq,
                later.at.as_secs_f64(),
                sibling.dot,
                describe(key, read),
            ));
        } else if op.acked && Some(position) != last_acked {
            out.stale_siblings += 1;
        }
    }
    if let Some(last) = last_acked {
        let op = &ops[last];
        if !op.delete && !present.contains(&op.seq) {
            // A later write (all of them have unknown outcomes) may have replaced it: a delete leaves
            // no visible value, a put leaves its own.
            let replaced = ops[last + 1..].iter().any(|later| later.delete || present.contains(&later.seq));
            if !replaced {
                out.lost += 1;
                out.problem(format!(
                    "{key}: the last acknowledged write (seq {}, at {:.1}s, resulting vector {:?}) is lost; {} later \
                     writes with unknown outcome; read {}",
                    op.seq,
                    op.at.as_secs_f64(),
                    op.result,
                    ops.len() - last - 1,
                    describe(key, read),
                ));
            }
        }
    }
}

fn preview(value: &[u8]) -> String {
    String::from_utf8_lossy(&value[..value.len().min(40)]).into_owned()
}

/// (seq, dot) of every sibling of a read, for problem reports.
fn describe(key: &str, read: Option<&ReadResult>) -> String {
    let siblings: Vec<String> = read
        .map(|r| {
            r.siblings.iter().map(|s| format!("seq {:?} dot {:?}", seq_of(key, &s.value), s.dot)).collect()
        })
        .unwrap_or_default();
    format!("[{}]", siblings.join(", "))
}

/// The outcome of [`LoadReport::verify`].
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub keys: usize,
    pub acked_writes: u64,
    pub lost: usize,
    pub resurrected: usize,
    pub unexpected: usize,
    /// Older acknowledged values present as siblings, not covered by a later acknowledged context.
    pub stale_siblings: usize,
    pub unreadable: usize,
    /// Reader reads that failed during the load.
    pub failed_reads: u64,
    /// Keys a listing at ALL and the reads at ALL disagree on.
    pub listing_mismatches: usize,
    /// The first problems found.
    pub problems: Vec<String>,
}

impl Verification {
    fn problem(&mut self, problem: String) {
        if self.problems.len() < 30 {
            self.problems.push(problem);
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "verified {} keys ({} acknowledged writes): {} lost, {} resurrected, {} unexpected, {} unreadable, \
             {} stale siblings, {} failed reads during the load, {} listing mismatches",
            self.keys,
            self.acked_writes,
            self.lost,
            self.resurrected,
            self.unexpected,
            self.unreadable,
            self.stale_siblings,
            self.failed_reads,
            self.listing_mismatches,
        )
    }

    /// Fails unless no acknowledged write was lost, nothing superseded came back, nothing foreign
    /// appeared and every key was readable.
    pub fn ensure_ok(&self) -> anyhow::Result<()> {
        if self.lost + self.resurrected + self.unexpected + self.unreadable + self.listing_mismatches > 0 {
            bail!("{}; first problems: {:#?}", self.summary(), self.problems);
        }
        Ok(())
    }
}

/// Each key's record on each scanned storage node, read with the storage `Get` (no read repair).
#[derive(Debug, Clone)]
pub struct ReplicaScan {
    /// Node ids of the scanned nodes, in scan order.
    pub nodes: Vec<u32>,
    /// Key → the record on each scanned node (same order as `nodes`).
    pub records: BTreeMap<String, Vec<Option<VersionSet>>>,
}

impl ReplicaScan {
    /// Nodes holding a live value (a record that is not tombstones only) of `key`.
    pub fn live_holders(&self, key: &str) -> BTreeSet<u32> {
        self.holders_where(key, |set| !set.is_deleted())
    }

    /// Nodes holding any record (tombstones included) of `key`.
    pub fn holders(&self, key: &str) -> BTreeSet<u32> {
        self.holders_where(key, |_| true)
    }

    fn holders_where(&self, key: &str, keep: impl Fn(&VersionSet) -> bool) -> BTreeSet<u32> {
        let Some(records) = self.records.get(key) else { return BTreeSet::new() };
        self.nodes
            .iter()
            .zip(records)
            .filter(|(_, record)| record.as_ref().is_some_and(&keep))
            .map(|(node, _)| *node)
            .collect()
    }

    /// The record of `key` on node `node_id`.
    pub fn record(&self, key: &str, node_id: u32) -> Option<&VersionSet> {
        let position = self.nodes.iter().position(|n| *n == node_id)?;
        self.records.get(key)?.get(position)?.as_ref()
    }
}

/// Reads `keys` of `tenant` from the storage nodes at `indexes` directly.
pub async fn scan_replicas(
    cluster: &Cluster,
    topology: &ClusterTopology,
    tenant: &str,
    keys: &[String],
    indexes: &[usize],
) -> anyhow::Result<ReplicaScan> {
    let mut tasks = JoinSet::new();
    for (position, index) in indexes.iter().enumerate() {
        let client = cluster.storage_client(*index).await?;
        for chunk in keys.chunks(keys.len().div_ceil(4).max(1)) {
            let mut client = client.clone();
            let mut refs = Vec::with_capacity(chunk.len());
            for key in chunk {
                refs.push(spb::KeyRef {
                    tenant_id: tenant.to_owned(),
                    key: key.clone(),
                    partition: topology.partition_of(tenant, key)?,
                    tenant_generation: 0,
                    token: None,
                });
            }
            tasks.spawn(async move {
                let mut found = Vec::with_capacity(refs.len());
                for key in refs {
                    let mut attempt = 0;
                    let response = loop {
                        match client.get(spb::GetRequest { key: Some(key.clone()) }).await {
                            Ok(response) => break response.into_inner(),
                            Err(_) if attempt < 3 => {
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(status) => {
                                return Err(anyhow::anyhow!(
                                    "storage Get {} on scan position {position}: {status}",
                                    key.key
                                ));
                            }
                        }
                    };
                    let set = match response.found {
                        true => Some(decode_version_set(&response.version_set)?),
                        false => None,
                    };
                    found.push((key.key, set));
                }
                Ok::<_, anyhow::Error>((position, found))
            });
        }
    }
    let mut records: BTreeMap<String, Vec<Option<VersionSet>>> =
        keys.iter().map(|k| (k.clone(), vec![None; indexes.len()])).collect();
    while let Some(result) = tasks.join_next().await {
        let (position, found) = result??;
        for (key, set) in found {
            if let Some(slot) = records.get_mut(&key).and_then(|r| r.get_mut(position)) {
                *slot = set;
            }
        }
    }
    Ok(ReplicaScan { nodes: indexes.iter().map(|i| Cluster::storage_node_id(*i)).collect(), records })
}

/// A key that fails a replica check, and how.
pub type Problem = (String, String);

/// Keys whose live copies are not exactly on their preference list (the first `n` nodes of the
/// current topology's list). Nodes outside the scan are ignored, except that a preference-list node
/// that was not scanned is reported.
pub fn placement_problems(
    scan: &ReplicaScan,
    topology: &ClusterTopology,
    tenant: &str,
    keys: &[String],
    n: usize,
) -> anyhow::Result<Vec<Problem>> {
    let mut problems = Vec::new();
    for key in keys {
        let expected: BTreeSet<u32> = topology.preference_list(tenant, key, n)?.into_iter().collect();
        if let Some(missing) = expected.iter().find(|node| !scan.nodes.contains(node)) {
            problems.push((key.clone(), format!("preference-list node {missing} was not scanned")));
            continue;
        }
        let live = scan.live_holders(key);
        if live != expected {
            problems
                .push((key.clone(), format!("live copies on nodes {live:?}, preference list {expected:?}")));
        }
    }
    Ok(problems)
}

/// Keys whose replicas (the first `n` nodes of the current list) do not hold equal records.
pub fn convergence_problems(
    scan: &ReplicaScan,
    topology: &ClusterTopology,
    tenant: &str,
    keys: &[String],
    n: usize,
) -> anyhow::Result<Vec<Problem>> {
    let mut problems = Vec::new();
    for key in keys {
        let owners = topology.preference_list(tenant, key, n)?;
        let records: Vec<Option<&VersionSet>> = owners.iter().map(|node| scan.record(key, *node)).collect();
        let first = records.first().copied().flatten();
        let converged = first.is_some()
            && records.iter().all(|r| {
                r.is_some_and(|r| {
                    Some(r.vector()) == first.map(VersionSet::vector)
                        && Some(r.siblings()) == first.map(VersionSet::siblings)
                })
            });
        if !converged {
            let shown: Vec<(u32, Option<usize>)> =
                owners.iter().zip(&records).map(|(node, r)| (*node, r.map(|r| r.siblings().len()))).collect();
            problems.push((key.clone(), format!("replicas differ (node, siblings): {shown:?}")));
        }
    }
    Ok(problems)
}

/// Keys that node `node_id` should hold (it is in their first `n`) whose record there does not
/// descend the merge of the other replicas' records.
pub fn behind_problems(
    scan: &ReplicaScan,
    topology: &ClusterTopology,
    tenant: &str,
    keys: &[String],
    n: usize,
    node_id: u32,
) -> anyhow::Result<Vec<Problem>> {
    let mut problems = Vec::new();
    for key in keys {
        let owners = topology.preference_list(tenant, key, n)?;
        if !owners.contains(&node_id) {
            continue;
        }
        let mut others = VersionSet::new();
        for owner in owners.iter().filter(|o| **o != node_id) {
            if let Some(set) = scan.record(key, *owner) {
                others = others.merge(set);
            }
        }
        match scan.record(key, node_id) {
            None if others.is_empty() => {}
            None => problems.push((key.clone(), format!("missing on node {node_id}"))),
            Some(own) if !own.descends(&others) => {
                problems.push((key.clone(), format!("node {node_id}'s record is behind the other replicas")))
            }
            Some(_) => {}
        }
    }
    Ok(problems)
}

/// Which check [`wait_for_replicas`] polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCheck {
    /// Live copies exactly on the first `n` nodes of each key's list ([`placement_problems`]).
    Placement,
    /// The first `n` replicas hold equal records ([`convergence_problems`]).
    Converged,
    /// Node `id` is not behind the other replicas ([`behind_problems`]).
    NotBehind(u32),
    /// No scanned node holds a live value (tombstones, or nothing).
    NoLiveValue,
    /// No scanned node holds any record (tombstones purged too).
    Absent,
}

/// Keys some scanned node holds a live value of (or, with `absent`, any record of).
pub fn present_problems(scan: &ReplicaScan, keys: &[String], absent: bool) -> Vec<Problem> {
    keys.iter()
        .filter_map(|key| {
            let holders = if absent { scan.holders(key) } else { scan.live_holders(key) };
            let what = if absent { "records" } else { "live values" };
            (!holders.is_empty()).then(|| (key.clone(), format!("{what} on nodes {holders:?}")))
        })
        .collect()
}

/// Polls `check` over `keys` on the storage nodes at `indexes` until it holds for every key, then
/// confirms it with one more full pass. Waits while a migration is pending. Fails after `timeout`
/// with the first problems. Returns the final scan.
pub async fn wait_for_replicas(
    cluster: &Cluster,
    tenant: &str,
    keys: &[String],
    n: usize,
    indexes: &[usize],
    check: ReplicaCheck,
    timeout: Duration,
) -> anyhow::Result<ReplicaScan> {
    let started = Instant::now();
    let mut pending: Vec<String> = keys.to_vec();
    let mut confirming = false;
    loop {
        let topology = cluster.topology().await?;
        let problems = if topology.pending.is_some() {
            vec![(String::new(), "a migration is still pending".to_owned())]
        } else {
            let scan = scan_replicas(cluster, &topology, tenant, &pending, indexes).await?;
            let problems = match check {
                ReplicaCheck::Placement => placement_problems(&scan, &topology, tenant, &pending, n)?,
                ReplicaCheck::Converged => convergence_problems(&scan, &topology, tenant, &pending, n)?,
                ReplicaCheck::NotBehind(node) => {
                    behind_problems(&scan, &topology, tenant, &pending, n, node)?
                }
                ReplicaCheck::NoLiveValue => present_problems(&scan, &pending, false),
                ReplicaCheck::Absent => present_problems(&scan, &pending, true),
            };
            if problems.is_empty() {
                if confirming {
                    eprintln!(
                        "replicas: {check:?} holds for {} keys on nodes {:?} after {:.1}s",
                        keys.len(),
                        scan.nodes,
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(scan);
                }
                confirming = true;
                pending = keys.to_vec();
                continue;
            }
            confirming = false;
            let failing: BTreeSet<&str> = problems.iter().map(|(key, _)| key.as_str()).collect();
            pending.retain(|key| failing.contains(key.as_str()));
            if pending.is_empty() {
                pending = keys.to_vec();
            }
            problems
        };
        if started.elapsed() > timeout {
            bail!(
                "{check:?} does not hold after {timeout:?}: {} keys fail; first: {:#?}",
                problems.len(),
                problems.iter().take(10).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn op(seq: u64, delete: bool, sent: &[(u64, u64)], result: Option<&[(u64, u64)]>) -> Op {
        Op {
            seq,
            delete,
            acked: result.is_some(),
            sent: vector_of(sent),
            result: result.map(vector_of),
            at: Duration::from_secs(seq),
        }
    }

    fn read_of(key: &str, siblings: &[(u64, (u64, u64))]) -> ReadResult {
        ReadResult {
            siblings: siblings
                .iter()
                .map(|(seq, dot)| pairdb_client::Sibling {
                    value: value_of(key, *seq, 10),
                    timestamp_ms: 0,
                    dot: Some(*dot),
                    expires_at_ms: None,
                })
                .collect(),
            context: Vec::new(),
            version_vector: Vec::new(),
        }
    }

    /// Issue 16's shape: put seq 0 acknowledged through coordinator 2 as (2,1), while coordinator 1
    /// also applied it as (1,1); the delete carried the ack context [2:1]. The twin (1,1) is not
    /// covered by that context, yet it is the deleted write: the checker must call it resurrected
    /// (it used to count it as a legal stale sibling).
    #[test]
    fn a_twin_of_a_deleted_write_is_resurrected_not_stale() {
        let key = "w0-k0";
        let history = KeyHistory {
            ops: vec![op(0, false, &[], Some(&[(2, 1)])), op(1, true, &[(2, 1)], Some(&[(2, 2)]))],
            ..KeyHistory::default()
        };
        let mut out = Verification::default();
        check_key(key, &history, Some(&read_of(key, &[(0, (1, 1))])), &mut out);
        assert_eq!((out.resurrected, out.stale_siblings), (1, 0), "{:?}", out.problems);

        // A concurrent value nobody superseded stays legal: an acknowledged put not covered.
        let history = KeyHistory {
            ops: vec![op(0, false, &[], Some(&[(2, 1)])), op(1, false, &[], Some(&[(3, 1)]))],
            ..KeyHistory::default()
        };
        let mut out = Verification::default();
        check_key(key, &history, Some(&read_of(key, &[(0, (2, 1)), (1, (3, 1))])), &mut out);
        assert_eq!((out.resurrected, out.stale_siblings, out.lost), (0, 1, 0), "{:?}", out.problems);
    }
}
