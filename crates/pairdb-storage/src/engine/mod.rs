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

mod tenant_purge;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use pairdb_core::dvv::{UpdateError, VersionSet, VersionVector};
use pairdb_core::encoding::{DecodeError, MAX_DECODED_ACTORS, decode_version_set, encode_version_set};
use pairdb_core::reason::{HasReason, Reason};
use pairdb_core::token::{PartitionCount, PartitionId};

use crate::identity::{self, Identity, IdentityError};
use crate::keys::{RecordKey, hint_prefix, partition_prefix};
use crate::merkle::{Entry, MerkleIndex, MerkleNode, version_digest};

pub use tenant_purge::{PurgeSpace, PurgeStep, TenantPurge};

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
    pub node_id: u32,
    pub partitions: PartitionCount,
    pub sync: SyncMode,
    /// Block cache size.
    pub cache_bytes: u64,
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
    Poisoned(String),
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
pub struct CoordinatedWrite<'a> {
    pub context: &'a VersionVector,
    /// `None` writes a tombstone.
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: u64,
    pub max_siblings: Option<usize>,
    /// LWW tenants: also supersede everything this replica holds.
    pub supersede_local: bool,
}

/// A hint kept for another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHint {
    pub target_node: u32,
    pub key: RecordKey,
    pub set: VersionSet,
    pub stored_at_ms: u64,
}

/// One batch of a partition scan.
#[derive(Debug, Clone, Default)]
pub struct ScanBatch {
    pub records: Vec<(RecordKey, Vec<u8>)>,
    /// The last record key visited (resume strictly after it), even if filtered out.
    pub next_cursor: Vec<u8>,
    pub done: bool,
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

/// One record's (key, version digest), as anti-entropy compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordDigest {
    pub key: RecordKey,
    pub digest: u64,
    /// Every sibling is a tombstone.
    pub tombstone_only: bool,
    /// Write time of the newest sibling (ms since the Unix epoch).
    pub newest_timestamp_ms: u64,
}

impl RecordDigest {
    fn of(key: RecordKey, set: &VersionSet) -> Self {
        Self {
            key,
            digest: version_digest(set),
            tombstone_only: set.is_deleted(),
            newest_timestamp_ms: set.siblings().iter().map(|s| s.timestamp_ms).max().unwrap_or(0),
        }
    }
}

pub use pairdb_core::gc::TombstonePlacement;

/// A stored full-ack confirmation.
#[derive(Debug, Clone, Copy)]
struct Confirmation {
    digest: u64,
    placement: TombstonePlacement,
}

impl Confirmation {
    fn decode(raw: &[u8]) -> Option<Self> {
        let digest = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
        let topology_epoch = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
        let replication_factor = u32::from_be_bytes(raw.get(16..20)?.try_into().ok()?);
        Some(Self { digest, placement: TombstonePlacement { topology_epoch, replication_factor } })
    }
}

pub struct Engine {
    db: Database,
    records: Keyspace,
    hints: Keyspace,
    confirmed: Keyspace,
    quarantine: Keyspace,
    purges: Keyspace,
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
    poison: Mutex<Option<String>>,
    poisoned: AtomicBool,
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
        let records = db.keyspace("records", KeyspaceCreateOptions::default).map_err(open_err)?;
        let hints = db.keyspace("hints", KeyspaceCreateOptions::default).map_err(open_err)?;
        let confirmed =
            db.keyspace("confirmed_tombstones", KeyspaceCreateOptions::default).map_err(open_err)?;
        let quarantine = db.keyspace("quarantine", KeyspaceCreateOptions::default).map_err(open_err)?;
        let purges = db.keyspace("tenant_purges", KeyspaceCreateOptions::default).map_err(open_err)?;
        let stripes = (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        let engine = Arc::new(Engine {
            db,
            records,
            hints,
            confirmed,
            quarantine,
            purges,
            refused: RwLock::new(HashMap::new()),
            identity,
            partitions: config.partitions,
            data_dir: config.data_dir.clone(),
            stripes,
            merkle: MerkleIndex::new(config.partitions),
            // With `always` an fsync costs far more than the read-merge of a writer that already holds
            // its stripe lock, so a leader waits for those writers to join its group.
            commit: CommitQueue::new(matches!(config.sync, SyncMode::Always)),
            persist_fault: AtomicBool::new(false),
            sync: config.sync,
            poison: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            disk_free_bytes: AtomicU64::new(u64::MAX),
            disk_reserve_bytes: config.disk_reserve_bytes,
            stop: AtomicBool::new(false),
        });
        engine.refresh_disk_free();
        engine.load_tenant_purges()?;
        engine.rebuild_merkle()?;
        spawn_maintenance(Arc::downgrade(&engine));
        Ok(engine)
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn partitions(&self) -> PartitionCount {
        self.partitions
    }

    /// `Some(reason)` once the write path is poisoned.
    pub fn poisoned_reason(&self) -> Option<String> {
        if !self.poisoned.load(Ordering::Acquire) {
            return None;
        }
        self.poison.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The key's version set, if any.
    pub fn get(&self, key: &RecordKey) -> Result<Option<VersionSet>, EngineError> {
        self.read_set(&key.encode())
    }

    /// The raw encoded set (for streaming without a decode/encode round trip).
    pub fn get_encoded(&self, key: &RecordKey) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.records.get(key.encode()).map_err(EngineError::Read)?.map(|v| v.to_vec()))
    }

    /// Applies a client write as this node's actor and returns the resulting set, durably.
    /// `supersede_local` (LWW tenants) extends the context with everything this replica holds.
    pub fn coordinate_write(
        &self,
        key: &RecordKey,
        context: &VersionVector,
        value: Option<Vec<u8>>,
        timestamp_ms: u64,
        max_siblings: Option<usize>,
        supersede_local: bool,
    ) -> Result<VersionSet, EngineError> {
        let write = CoordinatedWrite { context, value, timestamp_ms, max_siblings, supersede_local };
        self.coordinate_write_before(key, write, ApplyDeadline::NONE)
    }

    /// [`Self::coordinate_write`], refused with [`EngineError::DeadlinePassed`] (nothing applied)
    /// when `deadline` has passed once the key's lock is held: the last point before the write
    /// becomes visible, so a call the router gave up on is not applied later.
    pub fn coordinate_write_before(
        &self,
        key: &RecordKey,
        write: CoordinatedWrite<'_>,
        deadline: ApplyDeadline,
    ) -> Result<VersionSet, EngineError> {
        let CoordinatedWrite { context, value, timestamp_ms, max_siblings, supersede_local } = write;
        self.check_writable()?;
        let encoded_key = key.encode();
        let _guard = self.lock(&encoded_key);
        self.check_tenant(&key.tenant)?;
        if deadline.passed() {
            metrics::counter!("pairdb_storage_coordinate_deadline_refusals_total").increment(1);
            return Err(EngineError::DeadlinePassed);
        }
        let preparing = self.commit.preparing();
        let existing = self.read_set(&encoded_key)?;
        let old_digest = existing.as_ref().map(Entry::of);
        let mut set = existing.unwrap_or_default();
        let mut context = context.clone();
        if supersede_local {
            context.merge(set.vector());
        }
        set.update(&context, self.identity.actor, value, timestamp_ms, max_siblings)?;
        let value = encode_version_set(&set);
        self.commit_write(WriteOp::Insert(Space::Records, encoded_key.clone(), value), preparing)?;
        self.merkle.update(&encoded_key, old_digest, Some(Entry::of(&set)));
        Ok(set)
    }

    /// Merges `incoming` into the local replica; returns whether the local set changed.
    pub fn merge(&self, key: &RecordKey, incoming: &VersionSet) -> Result<bool, EngineError> {
        self.check_writable()?;
        let encoded_key = key.encode();
        let _guard = self.lock(&encoded_key);
        self.check_tenant(&key.tenant)?;
        let preparing = self.commit.preparing();
        let existing = self.read_set(&encoded_key)?;
        let old_digest = existing.as_ref().map(Entry::of);
        let mut set = existing.unwrap_or_default();
        if !set.merge_from(incoming) {
            return Ok(false);
        }
        storable(&set)?;
        let value = encode_version_set(&set);
        self.commit_write(WriteOp::Insert(Space::Records, encoded_key.clone(), value), preparing)?;
        self.merkle.update(&encoded_key, old_digest, Some(Entry::of(&set)));
        Ok(true)
    }

    /// Merges many records with one durability wait; returns how many changed. Each record is written
    /// straight to the journal under its stripe lock (holding one lock at a time); the batch then waits
    /// for one group commit, whose flush or fsync covers everything written before it.
    pub fn merge_batch(&self, records: &[(RecordKey, VersionSet)]) -> Result<usize, EngineError> {
        self.check_writable()?;
        let mut changed = 0;
        for (key, incoming) in records {
            let encoded_key = key.encode();
            let _guard = self.lock(&encoded_key);
            // A deleted tenant's record (a late hint, a peer that has not purged yet) is dropped.
            if self.is_refused(&key.tenant) {
                metrics::counter!("pairdb_storage_deleted_tenant_writes_refused_total").increment(1);
                continue;
            }
            let existing = self.read_set(&encoded_key)?;
            let old_digest = existing.as_ref().map(Entry::of);
            let mut set = existing.unwrap_or_default();
            if set.merge_from(incoming) {
                // One record that cannot be stored must not hold back the batch (hint delivery,
                // anti-entropy and migrations all come this way).
                if let Err(error) = storable(&set) {
                    tracing::warn!(partition = key.partition.0, %error, "merged set refused; record skipped");
                    metrics::counter!("pairdb_storage_invalid_sets_refused_total", "rpc" => "merge_batch")
                        .increment(1);
                    continue;
                }
                self.write(|| self.records.insert(encoded_key.clone(), encode_version_set(&set)))?;
                self.merkle.update(&encoded_key, old_digest, Some(Entry::of(&set)));
                changed += 1;
            }
        }
        if changed > 0 {
            self.make_durable()?;
        }
        Ok(changed)
    }

    /// Keeps `set` as a hint for `target_node` (merged with an earlier hint for the same key).
    pub fn put_hint(&self, target_node: u32, key: &RecordKey, set: &VersionSet) -> Result<(), EngineError> {
        self.check_writable()?;
        let hint_key = key.encode_hint(target_node);
        let _guard = self.lock(&hint_key);
        self.check_tenant(&key.tenant)?;
        let preparing = self.commit.preparing();
        let merged = match self.hints.get(&hint_key).map_err(EngineError::Read)? {
            Some(raw) => decode_hint_value(&raw)?.1.merge(set),
            None => set.clone(),
        };
        storable(&merged)?;
        let mut value = now_ms().to_be_bytes().to_vec();
        value.extend_from_slice(&encode_version_set(&merged));
        self.commit_write(WriteOp::Insert(Space::Hints, hint_key, value), preparing)
    }

    /// Up to `limit` hints for `target_node` (optionally one partition), in key order.
    pub fn list_hints(
        &self,
        target_node: u32,
        partition: Option<PartitionId>,
        limit: usize,
    ) -> Result<Vec<StoredHint>, EngineError> {
        let mut hints = Vec::new();
        for item in self.hints.prefix(hint_prefix(target_node, partition)).take(limit) {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            let Some((target, key)) = RecordKey::decode_hint(&raw_key) else { continue };
            let (stored_at_ms, set) = decode_hint_value(&raw_value)?;
            hints.push(StoredHint { target_node: target, key, set, stored_at_ms });
        }
        Ok(hints)
    }

    /// Number of hints held for `target_node` (a scan of that node's hint range).
    pub fn count_hints(&self, target_node: u32) -> u64 {
        self.hints.prefix(hint_prefix(target_node, None)).count() as u64
    }

    /// The nodes this node holds hints for (one seek per node, not a scan of every hint).
    pub fn hint_targets(&self) -> Result<Vec<u32>, EngineError> {
        let mut targets = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some(item) = self.hints.range(from.as_slice()..).next() {
            let key = item.key().map_err(EngineError::Read)?;
            let Some(target) = key.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes) else {
                break;
            };
            targets.push(target);
            match target.checked_add(1) {
                Some(next) => from = next.to_be_bytes().to_vec(),
                None => break,
            }
        }
        Ok(targets)
    }

    /// Deletes the hint for `key` only if it is still exactly `delivered` (a hint that grew while it was
    /// being delivered is kept for the next round).
    pub fn delete_hint_if_unchanged(
        &self,
        target_node: u32,
        key: &RecordKey,
        delivered: &VersionSet,
    ) -> Result<bool, EngineError> {
        self.check_writable()?;
        let hint_key = key.encode_hint(target_node);
        let _guard = self.lock(&hint_key);
        let preparing = self.commit.preparing();
        match self.hints.get(&hint_key).map_err(EngineError::Read)? {
            Some(raw) if &decode_hint_value(&raw)?.1 == delivered => {
                self.commit_write(WriteOp::Remove(Space::Hints, hint_key), preparing)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Up to `limit` records of `partition` after `cursor` (exclusive), optionally only some tenants.
    pub fn scan_partition(
        &self,
        partition: PartitionId,
        cursor: &[u8],
        tenants: &[String],
        limit: usize,
    ) -> Result<ScanBatch, EngineError> {
        let prefix = partition_prefix(partition);
        let end = partition_end(partition);
        let start: Vec<u8> = if cursor.is_empty() { prefix.to_vec() } else { successor(cursor) };
        let mut batch = ScanBatch::default();
        let mut visited = 0usize;
        let iter = match &end {
            Some(end) => self.records.range(start.as_slice()..end.as_slice()),
            None => self.records.range(start.as_slice()..),
        };
        for item in iter {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            visited += 1;
            batch.next_cursor = raw_key.to_vec();
            let Some(key) = RecordKey::decode(&raw_key) else { continue };
            if tenants.is_empty() || tenants.contains(&key.tenant) {
                batch.records.push((key, raw_value.to_vec()));
            }
            // Bound the work per batch even when a tenant filter skips most records.
            if batch.records.len() >= limit || visited >= limit.saturating_mul(16) {
                return Ok(batch);
            }
        }
        batch.done = true;
        Ok(batch)
    }

    /// Level `level` (0 = root) of `partition`'s Merkle tree, from memory ([`crate::merkle`]).
    pub fn merkle_level(&self, partition: PartitionId, level: u32) -> Vec<MerkleNode> {
        self.merkle.level(partition, level)
    }

    /// Tombstone-only records of `partition` (no scan).
    pub fn partition_tombstones(&self, partition: PartitionId) -> u64 {
        self.merkle.tombstones(partition)
    }

    /// Tombstone-only records of `partition` whose newest tombstone was written before
    /// `written_before_ms`, at most `limit` (tombstone GC candidates; a scan of the partition).
    pub fn old_tombstones(
        &self,
        partition: PartitionId,
        written_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<RecordDigest>, EngineError> {
        let mut out = Vec::new();
        for item in self.records.prefix(partition_prefix(partition)) {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            let Some(key) = RecordKey::decode(&raw_key) else { continue };
            let set = decode_version_set(&raw_value).map_err(EngineError::Corrupt)?;
            if set.is_deleted() {
                let digest = RecordDigest::of(key, &set);
                if digest.newest_timestamp_ms < written_before_ms {
                    out.push(digest);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The Merkle leaf a record key falls in.
    pub fn merkle_leaf(&self, key: &RecordKey) -> u32 {
        self.merkle.leaf_of(&key.encode()) as u32
    }

    /// Partitions this node holds records of.
    pub fn partitions_with_data(&self) -> Vec<PartitionId> {
        self.merkle.partitions_with_data()
    }

    /// (key, digest) of every record in the given Merkle leaves of `partition`, in key order; at most
    /// `limit` records (anti-entropy asks for few leaves at a time).
    pub fn leaf_digests(
        &self,
        partition: PartitionId,
        leaves: &[u32],
        limit: usize,
    ) -> Result<Vec<RecordDigest>, EngineError> {
        let mut out = Vec::new();
        let mut leaves = leaves.to_vec();
        leaves.sort_unstable();
        leaves.dedup();
        for leaf in leaves {
            let (start, end) = self.merkle.leaf_range(partition, leaf);
            let iter = match &end {
                Some(end) => self.records.range(start.as_slice()..end.as_slice()),
                None => self.records.range(start.as_slice()..),
            };
            for item in iter {
                let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
                let Some(key) = RecordKey::decode(&raw_key) else { continue };
                let set = decode_version_set(&raw_value).map_err(EngineError::Corrupt)?;
                out.push(RecordDigest::of(key, &set));
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The encoded sets of `keys` (absent keys are left out).
    pub fn get_batch(&self, keys: &[RecordKey]) -> Result<Vec<(RecordKey, Vec<u8>)>, EngineError> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(raw) = self.records.get(key.encode()).map_err(EngineError::Read)? {
                out.push((key.clone(), raw.to_vec()));
            }
        }
        Ok(out)
    }

    /// Tombstone GC: removes each record that is still exactly the tombstone-only set with `digest`
    /// and whose newest tombstone was written before `written_before_ms`. The caller vouches that
    /// every replica holds the same tombstone (anti-entropy saw equal digests everywhere).
    pub fn purge_tombstones(
        &self,
        candidates: &[(RecordKey, u64)],
        written_before_ms: u64,
    ) -> Result<u64, EngineError> {
        self.check_writable()?;
        let mut purged = 0;
        for (key, digest) in candidates {
            let encoded_key = key.encode();
            let _guard = self.lock(&encoded_key);
            let Some(set) = self.read_set(&encoded_key)? else { continue };
            let current = RecordDigest::of(key.clone(), &set);
            if current.digest != *digest
                || !current.tombstone_only
                || current.newest_timestamp_ms >= written_before_ms
            {
                continue;
            }
            self.write(|| self.records.remove(encoded_key.clone()))?;
            self.merkle.update(&encoded_key, Some(Entry::of(&set)), None);
            purged += 1;
        }
        if purged > 0 {
            self.make_durable()?;
        }
        Ok(purged)
    }

    /// Remembers that every owner of `key` acknowledged the tombstone-only `set` under placement
    /// `placement` (the full-ack GC path). Only if this node's record is still exactly that set:
    /// `false` otherwise (the tombstone then waits for anti-entropy's confirmation).
    pub fn confirm_tombstone(
        &self,
        key: &RecordKey,
        set: &VersionSet,
        placement: TombstonePlacement,
    ) -> Result<bool, EngineError> {
        self.check_writable()?;
        let encoded_key = key.encode();
        let _guard = self.lock(&encoded_key);
        let digest = version_digest(set);
        let Some(current) = self.read_set(&encoded_key)? else { return Ok(false) };
        if !current.is_deleted() || version_digest(&current) != digest {
            return Ok(false);
        }
        let mut value = Vec::with_capacity(20);
        value.extend_from_slice(&digest.to_be_bytes());
        value.extend_from_slice(&placement.topology_epoch.to_be_bytes());
        value.extend_from_slice(&placement.replication_factor.to_be_bytes());
        self.write(|| self.confirmed.insert(encoded_key.clone(), value))?;
        Ok(true)
    }

    /// One pass of full-ack tombstone GC over at most `limit` confirmations after `cursor`: purges
    /// each record that is still exactly its confirmed tombstone-only set, written before
    /// `written_before_ms`, whose placement `placement_holds` still accepts; forgets confirmations
    /// whose record changed or is gone, or whose placement no longer holds. Returns (purged, the
    /// cursor to go on from, `None` once the end was reached).
    pub fn collect_confirmed_tombstones(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
        written_before_ms: u64,
        placement_holds: &dyn Fn(&RecordKey, TombstonePlacement) -> bool,
    ) -> Result<(u64, Option<Vec<u8>>), EngineError> {
        self.check_writable()?;
        let mut batch = Vec::new();
        let iter = match cursor {
            Some(after) => self
                .confirmed
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.confirmed.range::<&[u8], _>(..),
        };
        for item in iter.take(limit) {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            batch.push((raw_key.to_vec(), raw_value.to_vec()));
        }
        let next = (batch.len() == limit).then(|| batch.last().map(|(k, _)| k.clone())).flatten();
        let mut purged = 0;
        let mut wrote = false;
        for (encoded_key, raw_value) in batch {
            let (Some(key), Some(confirmation)) =
                (RecordKey::decode(&encoded_key), Confirmation::decode(&raw_value))
            else {
                self.write(|| self.confirmed.remove(encoded_key.clone()))?;
                wrote = true;
                continue;
            };
            let _guard = self.lock(&encoded_key);
            let current = self.read_set(&encoded_key)?.map(|set| RecordDigest::of(key.clone(), &set));
            let unchanged =
                current.as_ref().is_some_and(|c| c.tombstone_only && c.digest == confirmation.digest);
            if !unchanged || !placement_holds(&key, confirmation.placement) {
                self.write(|| self.confirmed.remove(encoded_key.clone()))?;
                wrote = true;
                continue;
            }
            if current.is_some_and(|c| c.newest_timestamp_ms < written_before_ms) {
                let Some(set) = self.read_set(&encoded_key)? else { continue };
                self.write(|| self.records.remove(encoded_key.clone()))?;
                self.write(|| self.confirmed.remove(encoded_key.clone()))?;
                self.merkle.update(&encoded_key, Some(Entry::of(&set)), None);
                purged += 1;
                wrote = true;
            }
        }
        if wrote {
            self.make_durable()?;
        }
        Ok((purged, next))
    }

    /// Confirmations waiting (a scan; for tests and stats).
    pub fn confirmed_tombstones(&self) -> u64 {
        self.confirmed.iter().count() as u64
    }

    /// Deletes up to `limit` records of `partition` whose tenant `drop_tenant` says this node no longer
    /// owns; returns (deleted, scanned everything). Hints are not touched.
    pub fn delete_unowned(
        &self,
        partition: PartitionId,
        drop_tenant: &dyn Fn(&str) -> bool,
        limit: usize,
    ) -> Result<(u64, bool), EngineError> {
        self.check_writable()?;
        let mut doomed = Vec::new();
        let mut complete = true;
        for item in self.records.prefix(partition_prefix(partition)) {
            let raw_key = item.key().map_err(EngineError::Read)?;
            let Some(key) = RecordKey::decode(&raw_key) else { continue };
            if drop_tenant(&key.tenant) {
                if doomed.len() >= limit {
                    complete = false;
                    break;
                }
                doomed.push(raw_key.to_vec());
            }
        }
        let mut deleted = 0;
        for encoded_key in doomed {
            let _guard = self.lock(&encoded_key);
            let Some(set) = self.read_set(&encoded_key)? else { continue };
            self.write(|| self.records.remove(encoded_key.clone()))?;
            self.merkle.update(&encoded_key, Some(Entry::of(&set)), None);
            deleted += 1;
        }
        if deleted > 0 {
            self.make_durable()?;
        }
        Ok((deleted, complete))
    }

    /// Drops hints last updated before `stored_before_ms` (hint retention); returns how many.
    pub fn expire_hints(&self, stored_before_ms: u64) -> Result<u64, EngineError> {
        let mut doomed = Vec::new();
        for item in self.hints.iter() {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            if let Some(stamp) = raw_value.get(..8) {
                let stored_at_ms = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
                if stored_at_ms < stored_before_ms {
                    doomed.push((raw_key.to_vec(), raw_value.to_vec()));
                }
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        self.check_writable()?;
        let mut expired = 0;
        for (hint_key, seen) in doomed {
            let _guard = self.lock(&hint_key);
            // Unchanged since the scan: a hint that grew meanwhile is young again.
            if self.hints.get(&hint_key).map_err(EngineError::Read)?.is_some_and(|raw| *raw == *seen) {
                self.write(|| self.hints.remove(hint_key.clone()))?;
                expired += 1;
            }
        }
        if expired > 0 {
            self.make_durable()?;
        }
        Ok(expired)
    }

    /// Builds the Merkle trees from disk (at open, before anything is written). A record that does
    /// not decode is quarantined, not fatal: one bad record must not keep a node (or, after a rolling
    /// restart, every replica of it) down.
    fn rebuild_merkle(&self) -> Result<(), EngineError> {
        let started = Instant::now();
        let mut records = 0u64;
        let mut undecodable = Vec::new();
        for item in self.records.iter() {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            match decode_version_set(&raw_value) {
                Ok(set) => {
                    self.merkle.update(&raw_key, None, Some(Entry::of(&set)));
                    records += 1;
                }
                Err(error) => undecodable.push((raw_key, raw_value, error)),
            }
        }
        tracing::info!(records, elapsed_ms = started.elapsed().as_millis() as u64, "merkle trees built");
        self.quarantine_records(undecodable)
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
            self.write(|| self.records.remove(raw_key.clone()))?;
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
            poisoned: self.poisoned.load(Ordering::Acquire),
            quarantined_records: self.quarantine.approximate_len() as u64,
        }
    }

    /// fsyncs everything written so far (periodic fsync, shutdown, tests). Once the write path is
    /// poisoned it fails without trying: a failed fsync is not retried.
    pub fn sync_now(&self) -> Result<(), EngineError> {
        if let Some(reason) = self.poisoned_reason() {
            return Err(EngineError::Poisoned(reason));
        }
        let started = Instant::now();
        let synced = self.persist(PersistMode::SyncData);
        metrics::histogram!("pairdb_storage_fsync_duration_seconds").record(started.elapsed().as_secs_f64());
        synced.map_err(|error| {
            let reason = format!("fsync failed: {error:?}");
            self.poison_with(reason.clone());
            EngineError::Poisoned(reason)
        })
    }

    /// Makes the next journal persist (a group's flush or fsync, or [`Engine::sync_now`]) fail with an
    /// I/O error, as a failing disk would, without touching the journal: the group is not applied and
    /// the write path poisons itself exactly as on a real failure. For fault-injection tests only.
    #[doc(hidden)]
    pub fn inject_persist_failure_for_tests(&self) {
        self.persist_fault.store(true, Ordering::Release);
    }

    /// Consumes an injected fault, if one is armed.
    fn injected_fault(&self) -> Option<fjall::Error> {
        self.persist_fault
            .swap(false, Ordering::AcqRel)
            .then(|| fjall::Error::Io(std::io::Error::other("injected fault: journal persist returned EIO")))
    }

    fn persist(&self, mode: PersistMode) -> fjall::Result<()> {
        match self.injected_fault() {
            Some(error) => Err(error),
            None => self.db.persist(mode),
        }
    }

    fn lock(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        let stripe = (fnv1a(key) as usize) % self.stripes.len();
        // Stripe mutexes guard no data, so a poisoned one is safe to reuse.
        self.stripes[stripe].lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_set(&self, encoded_key: &[u8]) -> Result<Option<VersionSet>, EngineError> {
        match self.records.get(encoded_key).map_err(EngineError::Read)? {
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
        if let Some(reason) = self.poisoned_reason() {
            return Err(EngineError::Poisoned(reason));
        }
        let free_bytes = self.disk_free_bytes.load(Ordering::Relaxed);
        if free_bytes < self.disk_reserve_bytes {
            return Err(EngineError::DiskFull { free_bytes, reserve_bytes: self.disk_reserve_bytes });
        }
        Ok(())
    }

    /// Runs one engine write; an error poisons the write path.
    fn write(&self, op: impl FnOnce() -> fjall::Result<()>) -> Result<(), EngineError> {
        op().map_err(|error| {
            let reason = format!("engine write failed: {error:?}");
            self.poison_with(reason.clone());
            EngineError::Poisoned(reason)
        })
    }

    fn persist_mode(&self) -> PersistMode {
        match self.sync {
            SyncMode::Periodic { .. } => PersistMode::Buffer,
            SyncMode::Always => PersistMode::SyncData,
        }
    }

    /// Commits one single-key write through the group commit; the caller holds the key's stripe lock.
    fn commit_write(&self, op: WriteOp, preparing: Preparing<'_>) -> Result<(), EngineError> {
        self.commit
            .submit(Some(op), Some(preparing), |ops| self.commit_group(ops))
            .map_err(EngineError::Poisoned)
    }

    /// Waits until everything this thread wrote straight to the journal reached the OS (`periodic`)
    /// or the disk (`always`): one group commit covers it, since the journal is sequential.
    fn make_durable(&self) -> Result<(), EngineError> {
        self.commit.submit(None, None, |ops| self.commit_group(ops)).map_err(EngineError::Poisoned)
    }

    /// The leader's work: one fjall batch holding every queued write, flushed (`periodic`) or fsynced
    /// (`always`) before fjall applies it to the memtables; just a flush / fsync when the group only
    /// waits for earlier writes. An error poisons the write path.
    fn commit_group(&self, ops: Vec<WriteOp>) -> Result<(), String> {
        let mode = self.persist_mode();
        // Poisoned meanwhile (say by the periodic fsync): fjall may not know, so nothing more is written.
        if let Some(reason) = self.poisoned_reason() {
            return Err(reason);
        }
        let group_size = ops.len();
        let started = Instant::now();
        let result = if let Some(error) = self.injected_fault() {
            Err(error)
        } else if ops.is_empty() {
            self.db.persist(mode)
        } else {
            let mut batch = self.db.batch().durability(Some(mode));
            for op in ops {
                match op {
                    WriteOp::Insert(space, key, value) => batch.insert(self.keyspace(space), key, value),
                    WriteOp::Remove(space, key) => batch.remove(self.keyspace(space), key),
                }
            }
            batch.commit()
        };
        // One journal flush (`periodic`) or fsync (`always`) per group: its latency and the group size
        // show whether group commit is working.
        let mode_label = if matches!(mode, PersistMode::Buffer) { "buffer" } else { "fsync" };
        metrics::histogram!("pairdb_storage_commit_duration_seconds", "mode" => mode_label)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("pairdb_storage_commit_group_writes").record(group_size as f64);
        result.map_err(|error| {
            let reason = format!("journal {mode:?} failed: {error:?}");
            self.poison_with(reason.clone());
            reason
        })
    }

    fn keyspace(&self, space: Space) -> &Keyspace {
        match space {
            Space::Records => &self.records,
            Space::Hints => &self.hints,
        }
    }

    fn poison_with(&self, reason: String) {
        let mut slot = self.poison.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            tracing::error!(%reason, "write path poisoned: refusing writes until restart");
            *slot = Some(reason);
        }
        self.poisoned.store(true, Ordering::Release);
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
        if self.poisoned.load(Ordering::Acquire) {
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

fn decode_hint_value(raw: &[u8]) -> Result<(u64, VersionSet), EngineError> {
    let (stamp, set) = raw.split_at_checked(8).ok_or(EngineError::Corrupt(DecodeError::Truncated))?;
    let stored_at_ms = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
    Ok((stored_at_ms, decode_version_set(set).map_err(EngineError::Corrupt)?))
}

/// The first key after every key of `partition` (None for the last partition).
fn partition_end(partition: PartitionId) -> Option<Vec<u8>> {
    partition.0.checked_add(1).map(|next| next.to_be_bytes().to_vec())
}

/// The smallest byte string greater than `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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
    let spawned = std::thread::Builder::new().name("pairdb-storage-maintenance".into()).spawn(move || {
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
                && !engine.poisoned.load(Ordering::Acquire)
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

/// Which keyspace a queued write goes to.
#[derive(Debug, Clone, Copy)]
enum Space {
    Records,
    Hints,
}

/// One single-key write waiting for a group commit.
#[derive(Debug)]
enum WriteOp {
    Insert(Space, Vec<u8>, Vec<u8>),
    Remove(Space, Vec<u8>),
}

/// Longest a leader waits for writers that hold their stripe lock to join its group (`always` only).
const MAX_GATHER: Duration = Duration::from_micros(250);

/// Group commit. A writer queues its write (or, with no write, a wait for what it wrote to the journal
/// earlier); if no leader is committing it becomes the leader, takes the whole queue and commits it as
/// one batch with one flush or fsync, then hands leadership to the first writer that queued meanwhile
/// and wakes each member of its group. Every waiter has its own condvar, so a commit wakes exactly the
/// writers it finished, not every thread in the queue.
///
/// While the leader fsyncs (fjall holds its journal lock for the fsync), the other writers do their
/// read-merge and queue up, so the next group takes all of them at once. With `gather`, a leader first
/// waits (at most [`MAX_GATHER`]) for writers that hold a stripe lock and are about to queue: without
/// that, groups alternate between nearly everyone and the few writers the last commit released.
#[derive(Debug)]
struct CommitQueue {
    state: Mutex<QueueState>,
    /// Signalled when the last preparing writer queued (or gave up) while a leader waits for it.
    gathered: Condvar,
    /// Writers holding their stripe lock that will queue a write soon (`gather` only).
    preparing: AtomicUsize,
    gather: bool,
}

#[derive(Debug, Default)]
struct QueueState {
    queue: Vec<(Option<WriteOp>, Arc<Waiter>)>,
    /// A leader is committing (or gathering); new writers queue behind it.
    leading: bool,
    leader_gathering: bool,
    /// Set by the first failed commit; every later commit fails with it (never retried).
    failed: Option<String>,
}

#[derive(Debug, Default)]
struct Waiter {
    state: Mutex<WaiterState>,
    woken: Condvar,
}

#[derive(Debug, Default)]
enum WaiterState {
    #[default]
    Waiting,
    /// The previous leader handed over: commit the queue.
    Lead,
    Done(Result<(), String>),
}

impl Waiter {
    fn wake(&self, state: WaiterState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
        self.woken.notify_one();
    }

    fn wait(&self) -> WaiterState {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while matches!(*state, WaiterState::Waiting) {
            state = self.woken.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        std::mem::take(&mut *state)
    }
}

/// A writer between taking its stripe lock and queueing its write; counted only with `gather`.
/// Dropping it without queueing (an error, or nothing to write) releases a gathering leader.
#[derive(Debug)]
struct Preparing<'a> {
    queue: Option<&'a CommitQueue>,
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            let state = queue.lock();
            queue.done_preparing(&state);
        }
    }
}

impl CommitQueue {
    fn new(gather: bool) -> Self {
        Self { state: Mutex::default(), gathered: Condvar::new(), preparing: AtomicUsize::new(0), gather }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Call right after taking the stripe lock of a key about to be written.
    fn preparing(&self) -> Preparing<'_> {
        if !self.gather {
            return Preparing { queue: None };
        }
        self.preparing.fetch_add(1, Ordering::AcqRel);
        Preparing { queue: Some(self) }
    }

    /// Called with the state lock held, so a gathering leader cannot miss the wake-up.
    fn done_preparing(&self, state: &QueueState) {
        if self.preparing.fetch_sub(1, Ordering::AcqRel) == 1 && state.leader_gathering {
            self.gathered.notify_one();
        }
    }

    /// Queues `op` (or a wait for earlier journal writes) and returns once a group commit covering it
    /// succeeded or failed. `commit` is the leader's work for one group.
    fn submit(
        &self,
        op: Option<WriteOp>,
        preparing: Option<Preparing<'_>>,
        commit: impl FnOnce(Vec<WriteOp>) -> Result<(), String>,
    ) -> Result<(), String> {
        let me = Arc::new(Waiter::default());
        let mut state = self.lock();
        // Queued now: no longer preparing (taken out of the guard so its drop does not count again).
        if preparing.and_then(|mut preparing| preparing.queue.take()).is_some() {
            self.done_preparing(&state);
        }
        if let Some(reason) = &state.failed {
            return Err(reason.clone());
        }
        state.queue.push((op, me.clone()));
        if state.leading {
            drop(state);
            match me.wait() {
                WaiterState::Done(result) => return result,
                WaiterState::Lead | WaiterState::Waiting => state = self.lock(),
            }
        } else {
            state.leading = true;
        }
        self.lead(state, &me, commit)
    }

    fn lead(
        &self,
        mut state: MutexGuard<'_, QueueState>,
        me: &Arc<Waiter>,
        commit: impl FnOnce(Vec<WriteOp>) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.gather {
            let deadline = Instant::now() + MAX_GATHER;
            while self.preparing.load(Ordering::Acquire) > 0 && state.failed.is_none() {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
                state.leader_gathering = true;
                state = self.gathered.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
            }
            state.leader_gathering = false;
        }
        let group = std::mem::take(&mut state.queue);
        let failed = state.failed.clone();
        drop(state);

        let mut ops = Vec::with_capacity(group.len());
        let mut waiters = Vec::with_capacity(group.len());
        for (op, waiter) in group {
            ops.extend(op);
            waiters.push(waiter);
        }
        let result = match failed {
            Some(reason) => Err(reason),
            None => commit(ops),
        };

        let mut state = self.lock();
        if let Err(reason) = &result {
            state.failed.get_or_insert_with(|| reason.clone());
        }
        let next = state.queue.first().map(|(_, waiter)| waiter.clone());
        state.leading = next.is_some();
        drop(state);
        // Hand over first, so the next group's commit starts while this one's writers wake up.
        if let Some(next) = next {
            next.wake(WaiterState::Lead);
        }
        for waiter in waiters {
            if !Arc::ptr_eq(&waiter, me) {
                waiter.wake(WaiterState::Done(result.clone()));
            }
        }
        result
    }
}
