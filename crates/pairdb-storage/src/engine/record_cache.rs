//! A bounded cache of records (encoded version sets) in front of the `records` keyspace. A point
//! read that hits it, and a write's read-merge-write that hits it, skip fjall's memtable skiplists
//! and table lookups — the largest single share of a replica write's and a point read's CPU
//! (docs/benchmarks.md, "Issues 19 and 20, third step").
//!
//! **Invariant:** an entry for key K holds K's record as `records` holds it, except while a writer
//! that holds K's stripe lock has changed the record and not yet the entry (it has not answered
//! yet, so no caller can tell). Hence:
//! - every change of a record replaces or drops its entry, under the record's stripe lock, once the
//!   change is in the engine (`mutate`, `mutate_many`, the tenant purge, quarantine, test plants);
//! - a read fills an entry only while it holds the record's stripe lock (a writer's
//!   read-merge-write, or a point read that got the lock without waiting);
//! - an entry changes only once its change is in the engine, so a failed write (which poisons the
//!   write path) leaves it as it was. It is visible exactly when fjall's own memtable shows the
//!   change: for the group-commit paths after the flush / fsync, for the journal paths (merge
//!   batches, tombstone purges) before their closing `make_durable`, as fjall's reads are.
//!
//! The cache starts empty with the engine, so it never holds what a restart could have lost.

use fjall::Slice;
use quick_cache::Weighter;
use quick_cache::sync::Cache;

/// Bytes an entry costs beyond its key and value (the cache's own bookkeeping, roughly).
const ENTRY_OVERHEAD_BYTES: u64 = 64;
/// The record size the cache sizes its table for.
const TYPICAL_RECORD_BYTES: u64 = 1024;

#[derive(Debug, Clone, Copy)]
struct RecordWeight;

impl Weighter<Vec<u8>, Slice> for RecordWeight {
    fn weight(&self, key: &Vec<u8>, value: &Slice) -> u64 {
        key.len() as u64 + value.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

/// The cache; with a capacity of 0 it holds nothing.
pub(super) struct RecordCache {
    entries: Option<Cache<Vec<u8>, Slice, RecordWeight>>,
}

impl std::fmt::Debug for RecordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (len, weight) = self.entries.as_ref().map_or((0, 0), |c| (c.len(), c.weight()));
        f.debug_struct("RecordCache").field("entries", &len).field("bytes", &weight).finish()
    }
}

impl RecordCache {
    pub(super) fn new(capacity_bytes: u64) -> Self {
        let entries = (capacity_bytes > 0).then(|| {
            let items = (capacity_bytes / (TYPICAL_RECORD_BYTES + ENTRY_OVERHEAD_BYTES)).max(16);
            Cache::with_weighter(usize::try_from(items).unwrap_or(usize::MAX), capacity_bytes, RecordWeight)
        });
        Self { entries }
    }

    pub(super) fn get(&self, encoded_key: &[u8]) -> Option<Slice> {
        let found = self.entries.as_ref()?.get(encoded_key);
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("pairdb_storage_record_cache_lookups_total", "outcome" => outcome).increment(1);
        found
    }

    /// The entry, counted only when there is one (the caller reads the engine next, through
    /// [`Self::get`], which counts the miss).
    pub(super) fn peek(&self, encoded_key: &[u8]) -> Option<Slice> {
        let found = self.entries.as_ref()?.get(encoded_key)?;
        metrics::counter!("pairdb_storage_record_cache_lookups_total", "outcome" => "hit").increment(1);
        Some(found)
    }

    /// Sets K's entry to its record (`None`: K has no record). Call with K's stripe lock held.
    pub(super) fn set(&self, encoded_key: &[u8], record: Option<&Slice>) {
        let Some(entries) = &self.entries else { return };
        match record {
            Some(record) => entries.insert(encoded_key.to_vec(), record.clone()),
            None => {
                entries.remove(encoded_key);
            }
        }
    }
}
