//! The storage engine: fjall (a pure-Rust LSM tree) behind one small module, so it could be swapped.
//!
//! What is stored (data format version 1, see [`crate::keys`]):
//! - keyspace `records`: record key → the key's version set in `pairdb-core`'s binary encoding;
//! - keyspace `hints`: hint key → `stored_at_ms u64be | version set`, sets kept for another node;
//! - keyspace `confirmed_tombstones`: record key → `digest u64be | topology epoch u64be | N u32be`,
//!   tombstones every owner acknowledged (the full-ack GC path; losing one only delays its purge);
//! - keyspace `quarantine`: record key → the raw bytes of a record that did not decode when the node
//!   opened (corrupt, or written before its shape was refused, e.g. a saturated counter), kept for
//!   inspection only; anti-entropy and rebuilds restore the key from the other replicas;
//! - keyspace `tenant_purges`: tenants being deleted (or purged) here, whose writes are refused
//!   ([`tenant_purge`]);
//! - keyspace `key_index`: (tenant, key) → placement token, one entry per record, written in the
//!   batch that creates the record and removed in the batch that removes it (not rewritten by
//!   updates); built from the records when a directory without it opens
//!   ([`listing`]);
//! - keyspace `minting_actors`: record key → `actor u64be`, the actor this node mints the record's
//!   dots under; exists only beside its record (written with it, removed before it). Added without a
//!   format change: a record without one (written by the previous release) gets a fresh one at its
//!   next coordinated write ([`mutate`]);
//! - `IDENTITY` file: node id, actor id, format version ([`crate::identity`]).
//!
//! Invariants:
//! - Read-merge-write of one key is atomic on this node: it runs under the key's stripe lock, held
//!   until the write is committed, so concurrent writes to one key never lose each other's siblings
//!   while different keys proceed in parallel. (Holding it to the commit also means a group never
//!   holds one key twice, which a fjall batch, all of one sequence number, must not.)
//! - Nothing is acknowledged before it reached the OS: a single-key write is committed in a fjall
//!   write batch that is flushed to the OS (`periodic`) or fsynced (`always`) before it is applied to
//!   the memtable and before the request returns, so an acknowledged write survives `kill -9` (and,
//!   with `always`, a power loss). Concurrent writers share one batch, one flush and one fsync (group
//!   commit, [`CommitQueue`]). With [`SyncMode::Periodic`] a background thread also fsyncs every
//!   interval.
//! - A failed write or fsync poisons the write path for good: writes fail with WRITE_PATH_POISONED,
//!   reads go on, readiness reports the reason. A failed fsync is never retried (the page cache may
//!   have dropped the dirty pages; see "Can applications recover from fsync failures?", ATC '20).
//!   [`Engine::inject_persist_failure_for_tests`] makes the next journal persist fail, so tests can
//!   drive this path through the real code.
//! - A stored record that does not decode never stops the node: at open it is moved to `quarantine`
//!   (counted in [`EngineStats::quarantined_records`]) and the key reads as absent here.
//! - Before the disk fills, writes are refused with DISK_FULL (free space below the reserve), so a full
//!   disk is a clear error rather than a poisoned node.
//!
//! Every method blocks; async callers run them on the blocking pool.
//!
//! Map: this file opens the engine and holds the single-key read-merge-write paths (coordinate, merge,
//! merge batch); `commit` the group commit and poison signal; `hints` hints; `tombstones`
//! tombstone GC, full-ack confirmations and unowned-data deletion; `scans` partition scans, Merkle
//! reads and the Merkle rebuild at open; `tenant_purge` deleting a tenant's data.

mod commit;
mod hints;
mod listing;
mod mutate;
mod poison;
mod record_cache;
mod scans;
mod tenant_purge;
mod tombstones;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, TryLockError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use pairdb_core::condition::WriteCondition;
use pairdb_core::dvv::{UpdateError, VersionSet, VersionVector};
use pairdb_core::encoding::{DecodeError, MAX_DECODED_ACTORS, decode_version_set, encode_version_set};
use pairdb_core::reason::{HasReason, Reason};
use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionCount, PartitionId, Token};
use pairdb_core::usage::Usage;

use crate::identity::{self, Identity, IdentityError};
use crate::keys::{RecordKey, hint_prefix, partition_prefix};
use crate::merkle::{Entry, MerkleIndex, MerkleNode, version_digest};

pub use hints::StoredHint;
pub use listing::{IndexCheck, ListQuery, ListedRecords, MAX_LIST_BYTES, MAX_LIST_LIMIT, TenantUsage};
pub use poison::{PoisonCause, PoisonedBy};
pub use scans::{RecordDigest, ScanBatch};
pub use tenant_purge::{PurgeSpace, PurgeStep, TenantPurge};

use commit::{CommitQueue, Space, WriteOp};
use poison::PoisonSignal;
use record_cache::RecordCache;

/// When writes are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync before acknowledging; concurrent writes share one fsync.
    Always,
    /// fsync in the background every `interval_ms`; writes reach the OS before they are acknowledged.
    Periodic { interval_ms: u64 },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub node_id: NodeId,
    pub partitions: PartitionCount,
    pub sync: SyncMode,
    /// Block cache size.
    pub cache_bytes: u64,
    /// Record cache size (0: none) ([`record_cache`]).
    pub record_cache_bytes: u64,
    /// Writes are refused once free disk space falls below this.
    pub disk_reserve_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot open the storage engine in {dir}: {source}")]
    Open { dir: PathBuf, source: fjall::Error },
    #[error("write path is poisoned and refuses writes: {0}")]
    Poisoned(PoisonCause),
    #[error("disk almost full: {free_bytes} bytes free, reserve is {reserve_bytes}")]
    DiskFull { free_bytes: u64, reserve_bytes: u64 },
    #[error("storage engine read failed: {0}")]
    Read(fjall::Error),
    #[error(transparent)]
    Update(#[from] UpdateError),
    #[error("stored record is corrupt: {0}")]
    Corrupt(DecodeError),
    /// The coordinate call's deadline passed before the write could be applied: nothing was applied,
    /// and the caller, which has stopped waiting, may safely try another coordinator.
    #[error("the write's deadline passed before it could be applied; nothing was applied")]
    DeadlinePassed,
    /// The tenant is being deleted (or was): nothing of it is stored any more.
    #[error("tenant {0:?} is being deleted")]
    TenantDeleted(String),
    /// The write would add to what a reached quota of the tenant counts.
    #[error("the tenant is at its quota of {0}: only writes that do not add to it are accepted")]
    QuotaExceeded(&'static str),
    /// A touch whose context covers no live sibling here (nor in the router's read).
    #[error("no live value under the context to touch")]
    NothingToTouch,
    /// A conditional write's condition does not hold on this replica: nothing was applied.
    #[error("condition {} does not hold: this replica holds a version the read did not see", condition.as_str())]
    PreconditionFailed { condition: WriteCondition, current: Box<VersionSet> },
}

impl HasReason for EngineError {
    fn reason(&self) -> Reason {
        match self {
            EngineError::Identity(_) | EngineError::Open { .. } => Reason::InvalidConfig,
            EngineError::Poisoned(_) => Reason::WritePathPoisoned,
            EngineError::DiskFull { .. } => Reason::DiskFull,
            EngineError::Read(_) | EngineError::Corrupt(_) => Reason::Internal,
            EngineError::Update(e) => e.reason(),
            EngineError::DeadlinePassed => Reason::CoordinateDeadlinePassed,
            EngineError::TenantDeleted(_) => Reason::TenantNotFound,
            EngineError::QuotaExceeded(_) => Reason::QuotaExceeded,
            EngineError::PreconditionFailed { .. } => Reason::PreconditionFailed,
            EngineError::NothingToTouch => Reason::KeyNotFound,
        }
    }
}

/// How much wall-clock skew between a router and a storage node [`ApplyDeadline`] tolerates: a node
/// whose clock runs ahead refuses writes only when the router gave up this much earlier than the
/// node's clock says. Safety never depends on this check (a router never asks a second coordinator
/// after a call that may have been applied); it only keeps late applies rare.
pub const WALL_CLOCK_SKEW_ALLOWANCE_MS: u64 = 500;

/// The last moment a coordinate call may be applied: after it the caller has given up on the call,
/// so applying it would only create a write nobody was told about.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyDeadline {
    /// On this node's monotonic clock, from when the request was read.
    pub monotonic: Option<Instant>,
    /// On the wall clock (ms since the Unix epoch), as the router set it.
    pub unix_ms: Option<u64>,
}

impl ApplyDeadline {
    /// No deadline: always apply.
    pub const NONE: ApplyDeadline = ApplyDeadline { monotonic: None, unix_ms: None };

    pub fn passed(&self) -> bool {
        self.monotonic.is_some_and(|at| Instant::now() > at)
            || self.unix_ms.is_some_and(|at| now_ms() > at.saturating_add(WALL_CLOCK_SKEW_ALLOWANCE_MS))
    }
}

/// Refuses a merged set that the decoder would refuse when reading it back (two valid sets whose
/// vectors name different actors can merge into one above `MAX_DECODED_ACTORS`): what is stored
/// always decodes.
fn storable(set: &VersionSet) -> Result<(), EngineError> {
    if set.vector().len() > MAX_DECODED_ACTORS {
        return Err(EngineError::Update(UpdateError::TooManyActors { would_have: set.vector().len() }));
    }
    Ok(())
}

/// A client write as the coordinator applies it.
#[derive(Debug, Clone)]
pub struct CoordinatedWrite {
    pub context: VersionVector,
    /// `None` writes a tombstone.
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: u64,
    pub max_siblings: Option<usize>,
    /// LWW tenants: also supersede everything this replica holds.
    pub supersede_local: bool,
    /// The tenant's quotas this write must not grow past.
    pub quota: QuotaGuard,
    /// A conditional write: the condition and what the router's read saw, re-checked against this
    /// replica's set under the key's lock ([`pairdb_core::condition::holds_at_coordinator`]).
    pub condition: Option<(WriteCondition, VersionVector)>,
    /// When the new value expires (ms since the Unix epoch), stamped by the router.
    pub expires_at_ms: Option<u64>,
    /// A touch instead of a write: the router's read of the key, merged in first; then every live
    /// sibling the context covers gets `expires_at_ms` (`VersionSet::touch`) and `value` is ignored.
    pub touch_over: Option<VersionSet>,
}

/// Which of a tenant's quotas are reached (meta's flags, from the view): a coordinated write that
/// would add a key, or value bytes, is then refused with [`EngineError::QuotaExceeded`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaGuard {
    pub keys_reached: bool,
    pub bytes_reached: bool,
}

impl QuotaGuard {
    /// Refuses a change from `old` to `new` that grows what a reached quota counts.
    pub fn check(&self, old: Usage, new: Usage) -> Result<(), EngineError> {
        if self.keys_reached && new.keys > old.keys {
            return Err(EngineError::QuotaExceeded("keys"));
        }
        if self.bytes_reached && new.value_bytes > old.value_bytes {
            return Err(EngineError::QuotaExceeded("value bytes"));
        }
        Ok(())
    }
}

/// Counters of the LSM engine itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LsmStats {
    pub outstanding_flushes: u64,
    pub compactions_completed: u64,
    pub journals: u64,
    pub tables: u64,
}

/// Sizes reported by [`Engine::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub keys: u64,
    pub disk_bytes: u64,
    pub disk_free_bytes: u64,
    pub hints_pending: u64,
    pub poisoned: bool,
    /// Records moved to quarantine because they did not decode (all time, this data directory).
    pub quarantined_records: u64,
}

const LOCK_STRIPES: usize = 4096;

pub use pairdb_core::gc::TombstonePlacement;

pub struct Engine {
    db: Database,
    records: Keyspace,
    /// Recent records, in front of `records` ([`record_cache`]).
    record_cache: RecordCache,
    hints: Keyspace,
    confirmed: Keyspace,
    quarantine: Keyspace,
    purges: Keyspace,
    /// Record key → the actor this node mints the record's dots under ([`mutate`]).
    minting: Keyspace,
    /// Tenant key index: (tenant, key) → placement token ([`listing`]).
    key_index: Keyspace,
    /// Each tenant's usage per partition, following every record write ([`listing`]).
    usage: TenantUsage,
    /// Tenants whose writes are refused → their deletion's purge sequence ([`tenant_purge`]).
    refused: RwLock<HashMap<String, u64>>,
    identity: Identity,
    partitions: PartitionCount,
    data_dir: PathBuf,
    stripes: Box<[Mutex<()>]>,
    /// Merkle trees of every partition, following every record write ([`crate::merkle`]).
    merkle: MerkleIndex,
    commit: CommitQueue,
    /// Armed by [`Engine::inject_persist_failure_for_tests`]: the next journal persist fails.
    persist_fault: AtomicBool,
    sync: SyncMode,
    poison: Arc<PoisonSignal>,
    disk_free_bytes: AtomicU64,
    disk_reserve_bytes: u64,
    stop: AtomicBool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("identity", &self.identity).field("sync", &self.sync).finish()
    }
}

impl Engine {
    /// Opens (or creates) the data directory and starts the maintenance thread (periodic fsync, disk
    /// space checks). The thread stops when the engine is dropped.
    pub fn open(config: &EngineConfig) -> Result<Arc<Engine>, EngineError> {
        let (identity, _created) = identity::load_or_create(&config.data_dir, config.node_id)?;
        let engine_dir = config.data_dir.join("engine");
        let open_err = |source| EngineError::Open { dir: engine_dir.clone(), source };
        // Journal flushes are ours (group commit in `CommitQueue`): fjall then buffers each write and
        // a whole group goes to the OS (and, with `always`, to the disk) in one call.
        let db = open_database(&engine_dir, config.cache_bytes).map_err(open_err)?;
        let records_memtable = records_memtable_bytes(config.node_id);
        let records = db
            .keyspace("records", || KeyspaceCreateOptions::default().max_memtable_size(records_memtable))
            .map_err(open_err)?;
        let hints = db.keyspace("hints", KeyspaceCreateOptions::default).map_err(open_err)?;
        let confirmed =
            db.keyspace("confirmed_tombstones", KeyspaceCreateOptions::default).map_err(open_err)?;
        let quarantine = db.keyspace("quarantine", KeyspaceCreateOptions::default).map_err(open_err)?;
        let purges = db.keyspace("tenant_purges", KeyspaceCreateOptions::default).map_err(open_err)?;
        let minting = db.keyspace("minting_actors", KeyspaceCreateOptions::default).map_err(open_err)?;
        let key_index = db.keyspace("key_index", KeyspaceCreateOptions::default).map_err(open_err)?;
        let stripes = (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        let poison = Arc::new(PoisonSignal::default());
        let engine = Arc::new(Engine {
            db,
            records,
            record_cache: RecordCache::new(config.record_cache_bytes),
            hints,
            confirmed,
            quarantine,
            purges,
            minting,
            key_index,
            usage: TenantUsage::default(),
            refused: RwLock::new(HashMap::new()),
            identity,
            partitions: config.partitions,
            data_dir: config.data_dir.clone(),
            stripes,
            merkle: MerkleIndex::new(config.partitions),
            // With `always` an fsync costs far more than the read-merge of a writer that already holds
            // its stripe lock, so a leader waits for those writers to join its group.
            commit: CommitQueue::new(matches!(config.sync, SyncMode::Always), poison.clone()),
            persist_fault: AtomicBool::new(false),
            sync: config.sync,
            poison,
            disk_free_bytes: AtomicU64::new(u64::MAX),
            disk_reserve_bytes: config.disk_reserve_bytes,
            stop: AtomicBool::new(false),
        });
        engine.refresh_disk_free();
        engine.load_tenant_purges()?;
        engine.load_records()?;
        spawn_maintenance(Arc::downgrade(&engine));
        Ok(engine)
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn partitions(&self) -> PartitionCount {
        self.partitions
    }

    /// `Some(cause)` once the write path is poisoned.
    pub fn poison_cause(&self) -> Option<PoisonCause> {
        self.poison.get().cloned()
    }

    /// The poison cause as text, for logs and status.
    pub fn poisoned_reason(&self) -> Option<String> {
        self.poison.get().map(ToString::to_string)
    }

    /// The key's version set, if any.
    pub fn get(&self, key: &RecordKey) -> Result<Option<VersionSet>, EngineError> {
        match self.read_record_unlocked(&key.encode())? {
            Some(raw) => decode_version_set(&raw).map(Some).map_err(EngineError::Corrupt),
            None => Ok(None),
        }
    }

    /// The raw encoded set (for streaming without a decode/encode round trip).
    pub fn get_encoded(&self, key: &RecordKey) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.read_record_unlocked(&key.encode())?.map(|raw| raw.to_vec()))
    }

    /// The key's encoded set if the record cache holds it (`None`: read the engine). A memory
    /// lookup that never waits on the disk, so a runtime thread may answer a read with it.
    pub fn cached_encoded(&self, key: &RecordKey) -> Option<Vec<u8>> {
        self.record_cache.peek(&key.encode()).map(|raw| raw.to_vec())
    }

    /// A record as stored, for a caller that holds no stripe lock: through the record cache, which
    /// it fills only if it gets the record's stripe lock without waiting ([`record_cache`]).
    fn read_record_unlocked(&self, encoded_key: &[u8]) -> Result<Option<fjall::Slice>, EngineError> {
        if let Some(hit) = self.record_cache.get(encoded_key) {
            return Ok(Some(hit));
        }
        let _guard = match self.stripes[self.stripe_of(encoded_key)].try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return self.records.get(encoded_key).map_err(EngineError::Read),
        };
        self.read_record_uncached(encoded_key)
    }

    /// A record as stored, through the record cache; call with its stripe lock held.
    fn read_record(&self, encoded_key: &[u8]) -> Result<Option<fjall::Slice>, EngineError> {
        match self.record_cache.get(encoded_key) {
            Some(hit) => Ok(Some(hit)),
            None => self.read_record_uncached(encoded_key),
        }
    }

    /// Reads the record from fjall and caches it; call with its stripe lock held.
    fn read_record_uncached(&self, encoded_key: &[u8]) -> Result<Option<fjall::Slice>, EngineError> {
        let raw = self.records.get(encoded_key).map_err(EngineError::Read)?;
        if raw.is_some() {
            self.record_cache.set(encoded_key, raw.as_ref());
        }
        Ok(raw)
    }

    /// Moves undecodable records from `records` to `quarantine` (durably, before the node serves).
    fn quarantine_records(
        &self,
        undecodable: Vec<(fjall::Slice, fjall::Slice, DecodeError)>,
    ) -> Result<(), EngineError> {
        if undecodable.is_empty() {
            return Ok(());
        }
        for (raw_key, raw_value, error) in &undecodable {
            let partition = RecordKey::decode(raw_key).map(|key| key.partition.0);
            tracing::warn!(?partition, %error, "stored record does not decode; moved to quarantine");
            self.write(|| self.quarantine.insert(raw_key.clone(), raw_value.clone()))?;
            self.write(|| self.minting.remove(raw_key.clone()))?;
            if let Some(key) = RecordKey::decode(raw_key) {
                self.write(|| self.key_index.remove(key.encode_index()))?;
            }
            self.write(|| self.records.remove(raw_key.clone()))?;
            self.record_cache.set(raw_key, None);
        }
        self.make_durable()?;
        metrics::counter!("pairdb_storage_records_quarantined_total").increment(undecodable.len() as u64);
        Ok(())
    }

    /// Writes raw bytes as a record, bypassing every check, so tests can plant a record that does not
    /// decode. Never called outside tests.
    #[doc(hidden)]
    pub fn insert_raw_record_for_tests(&self, key: &RecordKey, raw: &[u8]) -> Result<(), EngineError> {
        self.write(|| self.records.insert(key.encode(), raw))?;
        self.record_cache.set(&key.encode(), None);
        self.make_durable()
    }

    /// Current sizes. Free disk space is the maintenance thread's reading (at most a second old), so
    /// frequent callers (probes, heartbeats, the readiness watchdog) cost no statvfs each.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            keys: self.merkle.total_keys(),
            disk_bytes: self.db.disk_space().unwrap_or(0),
            disk_free_bytes: self.disk_free_bytes.load(Ordering::Relaxed),
            hints_pending: self.hints.approximate_len() as u64,
            poisoned: self.poison.is_set(),
            quarantined_records: self.quarantine.approximate_len() as u64,
        }
    }

    fn lock(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        self.lock_stripe(self.stripe_of(key))
    }

    /// The lock stripe a record key belongs to.
    fn stripe_of(&self, key: &[u8]) -> usize {
        (fnv1a(key) as usize) % self.stripes.len()
    }

    /// Locks one stripe. A path that holds several takes them in ascending order ([`mutate`]).
    fn lock_stripe(&self, stripe: usize) -> MutexGuard<'_, ()> {
        // Stripe mutexes guard no data, so a poisoned one is safe to reuse.
        self.stripes[stripe].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record's set; call with its stripe lock held.
    fn read_set(&self, encoded_key: &[u8]) -> Result<Option<VersionSet>, EngineError> {
        match self.read_record(encoded_key)? {
            Some(raw) => decode_version_set(&raw).map(Some).map_err(EngineError::Corrupt),
            None => Ok(None),
        }
    }

    /// Refuses writes of a tenant being deleted; call with the key's stripe lock held.
    fn check_tenant(&self, tenant: &str) -> Result<(), EngineError> {
        if self.is_refused(tenant) {
            metrics::counter!("pairdb_storage_deleted_tenant_writes_refused_total").increment(1);
            return Err(EngineError::TenantDeleted(tenant.to_owned()));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), EngineError> {
        if let Some(cause) = self.poison.get() {
            return Err(EngineError::Poisoned(cause.clone()));
        }
        let free_bytes = self.disk_free_bytes.load(Ordering::Relaxed);
        if free_bytes < self.disk_reserve_bytes {
            return Err(EngineError::DiskFull { free_bytes, reserve_bytes: self.disk_reserve_bytes });
        }
        Ok(())
    }

    fn refresh_disk_free(&self) {
        if let Ok(free) = fs4::available_space(&self.data_dir) {
            self.disk_free_bytes.store(free, Ordering::Relaxed);
        }
    }

    /// The LSM's own counters (for gauges): flushes waiting, compactions done, journals, tables.
    pub fn lsm_stats(&self) -> LsmStats {
        LsmStats {
            outstanding_flushes: self.db.outstanding_flushes() as u64,
            compactions_completed: self.db.compactions_completed() as u64,
            journals: self.db.journal_count() as u64,
            tables: (self.records.table_count() + self.hints.table_count()) as u64,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if self.poison.is_set() {
            return;
        }
        if let Err(error) = self.db.persist(PersistMode::SyncAll) {
            tracing::error!(?error, "final fsync at shutdown failed");
        }
    }
}

/// FNV-1a: cheap and good enough to spread keys over lock stripes.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The `records` keyspace's memtable size, 48, 64 or 80 MiB by node id. Replicas receive the same
/// writes, so with one size their memtables fill, flush and compact at the same moments and every
/// replica of a key is slow at once; spread sizes put those moments apart. fjall keeps the size a
/// keyspace was created with: a data directory an earlier release created keeps 64 MiB.
fn records_memtable_bytes(node_id: NodeId) -> u64 {
    (48 + 16 * (u64::from(node_id.0) % 3)) << 20
}

/// How long `open` waits for a previous engine on the same directory to finish closing.
const LOCKED_WAIT: Duration = Duration::from_secs(5);

/// Opens fjall, waiting (bounded) while the directory is locked: the previous engine of this process
/// may still be closing on its maintenance thread (which can hold the last reference for the length of
/// one fsync). Another process holding the directory still fails, after the wait.
fn open_database(engine_dir: &Path, cache_bytes: u64) -> Result<Database, fjall::Error> {
    let started = Instant::now();
    loop {
        let opened =
            Database::builder(engine_dir).cache_size(cache_bytes).manual_journal_persist(true).open();
        match opened {
            Err(fjall::Error::Locked) if started.elapsed() < LOCKED_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Background work: periodic fsync and disk-space refresh. Holds only a weak reference so dropping
/// the engine stops it.
fn spawn_maintenance(engine: Weak<Engine>) {
    // The fsync histogram goes where the rest of this node's metrics go (its own registry in `pairdb dev`).
    let registry = pairdb_service::metrics::Registry::entered();
    let spawned = std::thread::Builder::new().name("pairdb-storage-maintenance".into()).spawn(move || {
        if let Some(registry) = registry {
            registry.enter();
        }
        let mut last_sync = Instant::now();
        let mut last_disk_check = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let Some(engine) = engine.upgrade() else { return };
            if engine.stop.load(Ordering::Acquire) {
                return;
            }
            if let SyncMode::Periodic { interval_ms } = engine.sync
                && last_sync.elapsed() >= Duration::from_millis(interval_ms)
                && !engine.poison.is_set()
            {
                last_sync = Instant::now();
                let _ = engine.sync_now();
            }
            if last_disk_check.elapsed() >= Duration::from_secs(1) {
                last_disk_check = Instant::now();
                engine.refresh_disk_free();
            }
        }
    });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the storage maintenance thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three consecutive node ids (one replica set of a small cluster) get three memtable sizes, each
    /// pair at least a fifth of the larger apart, so their flushes drift apart instead of coinciding.
    #[test]
    fn replicas_get_spread_memtable_sizes() {
        let mut sizes: Vec<u64> = (1..=3).map(|id| records_memtable_bytes(NodeId(id)) >> 20).collect();
        sizes.sort_unstable();
        assert!(sizes.iter().all(|mib| (48..=80).contains(mib)), "{sizes:?}");
        for pair in sizes.windows(2) {
            assert!((pair[1] - pair[0]) * 5 >= pair[1], "{sizes:?}");
        }
    }
}
