//! The tenant key index and what is read from it: listings ([`Engine::list_records`]) and each
//! tenant's usage ([`TenantUsage`]).
//!
//! Keyspace `key_index`: `tenant_len u8 | tenant | key` → `token u64be` ([`crate::keys`]), one entry
//! per record, written and removed in the same batch as the record ([`super::mutate`], tenant purges,
//! quarantine), so index and records never disagree, across a crash too. One tenant's keys are one
//! range in key order: a listing costs in proportion to the tenant's keys on this node, never to the
//! node's other data. Entry `[0] "key_index_built"` (no tenant id is empty) marks a complete index; a
//! data directory without it (written by a release before the index, or a build cut short) gets the
//! index built from its records when it opens, before the node serves.
//!
//! Usage is kept in memory per (tenant, partition): computed from the records at open, then changed
//! under each record's stripe lock by the same mutation that changes the record.

use std::collections::HashMap;
use std::ops::Bound;

use pairdb_core::usage::Usage;

use super::*;
use crate::keys::{group_prefix, tenant_index_prefix};

/// The marker of a complete index (a key no tenant's entry can have: tenant ids are never empty).
const INDEX_BUILT_MARKER: &[u8] = b"\0key_index_built";

/// Records written per batch while the index is built.
const INDEX_BUILD_BATCH: usize = 1024;

/// Records examined between progress lines while the index is built.
const INDEX_BUILD_PROGRESS_EVERY: u64 = 250_000;

/// Most records one listing call returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// Most bytes of sets one listing call returns.
pub const MAX_LIST_BYTES: usize = 4 << 20;

/// One tenant's records to list from this node.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub tenant: String,
    /// Only records of these partitions (indexed by partition id; the router's coverage plan).
    pub partitions: Vec<bool>,
    pub prefix: String,
    /// Exclusive bounds in key order.
    pub start_after: Option<String>,
    pub end_before: Option<String>,
    /// Only one key group's records (its placement token).
    pub group: Option<Token>,
    pub reverse: bool,
    pub limit: usize,
    pub max_bytes: usize,
    pub skip_tombstones: bool,
    pub max_examined: usize,
    /// Stop examining at this moment (what was found so far is answered, with where to resume).
    pub deadline: Instant,
}

/// One node's answer to a [`ListQuery`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListedRecords {
    /// (key, encoded version set), in listing order.
    pub records: Vec<(RecordKey, Vec<u8>)>,
    /// Every record in range was examined; otherwise the answer is complete up to `resume_after`.
    pub complete: bool,
    pub resume_after: Option<String>,
    pub examined: u64,
}

/// What [`Engine::verify_key_index`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexCheck {
    pub records: u64,
    pub entries: u64,
    /// Records without their index entry.
    pub missing: u64,
    /// Index entries without their record (or pointing at another token).
    pub orphaned: u64,
}

impl IndexCheck {
    pub fn consistent(&self) -> bool {
        self.missing == 0 && self.orphaned == 0 && self.records == self.entries
    }
}

const USAGE_SHARDS: usize = 16;

/// Tenant → partition → usage, for the tenants of one shard.
type UsageShard = HashMap<String, HashMap<PartitionId, Usage>>;

/// Each tenant's usage on this node, per partition.
#[derive(Debug)]
pub struct TenantUsage {
    shards: Box<[Mutex<UsageShard>]>,
}

impl Default for TenantUsage {
    fn default() -> Self {
        Self { shards: (0..USAGE_SHARDS).map(|_| Mutex::default()).collect() }
    }
}

impl TenantUsage {
    fn shard(&self, tenant: &str) -> MutexGuard<'_, UsageShard> {
        let shard = (fnv1a(tenant.as_bytes()) as usize) % self.shards.len();
        self.shards[shard].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A record of `key` went from `old` to `new` (call with its stripe lock held).
    pub(super) fn replace(&self, key: &RecordKey, old: Usage, new: Usage) {
        if old == new {
            return;
        }
        let mut shard = self.shard(&key.tenant);
        if !shard.contains_key(&key.tenant) {
            shard.insert(key.tenant.clone(), HashMap::new());
        }
        let Some(partitions) = shard.get_mut(&key.tenant) else { return };
        let usage = partitions.entry(key.partition).or_default();
        usage.subtract(old);
        usage.add(new);
        if usage.is_zero() {
            partitions.remove(&key.partition);
            if partitions.is_empty() {
                shard.remove(&key.tenant);
            }
        }
    }

    /// Each tenant's usage summed over the partitions `counted` accepts.
    pub fn by_tenant(&self, counted: impl Fn(PartitionId) -> bool) -> Vec<(String, Usage)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for (tenant, partitions) in shard.iter() {
                let mut total = Usage::default();
                for (partition, usage) in partitions {
                    if counted(*partition) {
                        total.add(*usage);
                    }
                }
                out.push((tenant.clone(), total));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Engine {
    /// Reads every record once at open: builds the Merkle trees and the usage counters, and the
    /// tenant key index when the directory has none yet. A record that does not decode is
    /// quarantined, not fatal: one bad record must not keep a node (or, after a rolling restart,
    /// every replica of it) down.
    pub(super) fn load_records(&self) -> Result<(), EngineError> {
        let started = Instant::now();
        let build_index = self.key_index.get(INDEX_BUILT_MARKER).map_err(EngineError::Read)?.is_none();
        if build_index {
            self.clear_key_index()?;
            tracing::info!("building the tenant key index from the records (once, before serving)");
        }
        let mut records = 0u64;
        let mut undecodable = Vec::new();
        let mut index_batch = Vec::new();
        for item in self.records.iter() {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            let (Some(key), Ok(set)) = (RecordKey::decode(&raw_key), decode_version_set(&raw_value)) else {
                let error = decode_version_set(&raw_value).err().unwrap_or(DecodeError::Truncated);
                undecodable.push((raw_key, raw_value, error));
                continue;
            };
            self.merkle.update(&raw_key, None, Some(Entry::of(&set)));
            self.usage.replace(&key, Usage::default(), Usage::of(&set));
            records += 1;
            if build_index {
                index_batch.push(WriteOp::Insert(
                    Space::KeyIndex,
                    key.encode_index(),
                    key.index_value().into(),
                ));
                if index_batch.len() >= INDEX_BUILD_BATCH {
                    self.write_unsynced(std::mem::take(&mut index_batch))?;
                }
                if records.is_multiple_of(INDEX_BUILD_PROGRESS_EVERY) {
                    tracing::info!(
                        records,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "building the tenant key index"
                    );
                }
            }
        }
        if build_index {
            index_batch.push(WriteOp::Insert(
                Space::KeyIndex,
                INDEX_BUILT_MARKER.to_vec(),
                fjall::Slice::empty(),
            ));
            self.write_unsynced(index_batch)?;
            self.make_durable()?;
            tracing::info!(
                records,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "tenant key index built"
            );
        }
        tracing::info!(records, elapsed_ms = started.elapsed().as_millis() as u64, "records loaded");
        self.quarantine_records(undecodable)
    }

    /// Removes every index entry (before a build: a build cut short may have left some).
    fn clear_key_index(&self) -> Result<(), EngineError> {
        let mut batch = Vec::new();
        for item in self.key_index.iter() {
            let raw_key = item.key().map_err(EngineError::Read)?;
            batch.push(WriteOp::Remove(Space::KeyIndex, raw_key.to_vec()));
            if batch.len() >= INDEX_BUILD_BATCH {
                self.write_unsynced(std::mem::take(&mut batch))?;
            }
        }
        self.write_unsynced(batch)
    }

    /// Compares the key index with the records (a full scan of both; for tests and operators'
    /// checks, never on the request path).
    pub fn verify_key_index(&self) -> Result<IndexCheck, EngineError> {
        let mut check = IndexCheck::default();
        let mut expected = std::collections::BTreeMap::new();
        for item in self.records.iter() {
            let raw_key = item.key().map_err(EngineError::Read)?;
            if let Some(key) = RecordKey::decode(&raw_key) {
                expected.insert(key.encode_index(), key.index_value());
            }
            check.records += 1;
        }
        for item in self.key_index.iter() {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            if raw_key.as_ref() == INDEX_BUILT_MARKER {
                continue;
            }
            check.entries += 1;
            match expected.remove(raw_key.as_ref()) {
                Some(token) if token.as_slice() == raw_value.as_ref() => {}
                _ => check.orphaned += 1,
            }
        }
        check.missing = expected.len() as u64;
        Ok(check)
    }

    /// Removes the index and its marker, as in a data directory written before the index existed:
    /// the next open builds it. For upgrade tests only.
    #[doc(hidden)]
    pub fn forget_key_index_for_tests(&self) -> Result<(), EngineError> {
        self.clear_key_index()?;
        self.make_durable()
    }

    /// Each tenant's usage on this node, over the partitions `counted` accepts.
    pub fn tenant_usage(&self, counted: impl Fn(PartitionId) -> bool) -> Vec<(String, Usage)> {
        self.usage.by_tenant(counted)
    }

    /// Bytes of the live values this node holds, over every tenant and partition (the usage
    /// counters): what its data amounts to, unlike the engine's size on disk.
    pub fn live_value_bytes(&self) -> u64 {
        self.usage.by_tenant(|_| true).iter().map(|(_, usage)| usage.value_bytes).sum()
    }

    /// One node's share of a listing page: the tenant's records in range, in listing order, read
    /// from the key index (or, for a key group, from the group's one record range).
    pub fn list_records(&self, query: &ListQuery) -> Result<ListedRecords, EngineError> {
        let base = match query.group {
            Some(token) => group_prefix(self.partitions, &query.tenant, token),
            None => tenant_index_prefix(&query.tenant),
        };
        let range = self.list_keyspace(query).range::<Vec<u8>, _>(key_range(&base, query));
        let entries: Box<dyn Iterator<Item = fjall::Guard>> =
            if query.reverse { Box::new(range.rev()) } else { Box::new(range) };
        let mut out = ListedRecords { complete: true, ..ListedRecords::default() };
        let mut bytes = 0usize;
        for entry in entries {
            let (raw_key, raw_value) = entry.into_inner().map_err(EngineError::Read)?;
            out.examined += 1;
            let key = match query.group {
                Some(_) => RecordKey::decode(&raw_key),
                None => RecordKey::decode_index(self.partitions, &raw_key, &raw_value),
            };
            let Some(key) = key else { continue };
            let last = key.key.clone();
            if query.partitions.get(key.partition.0 as usize).copied().unwrap_or(false)
                && let Some(set) = self.listed_set(&key, query, &raw_value)?
            {
                bytes += set.len();
                out.records.push((key, set));
            }
            let full = out.records.len() >= query.limit || bytes >= query.max_bytes;
            let out_of_work = out.examined >= query.max_examined as u64 || Instant::now() >= query.deadline;
            if full || out_of_work {
                out.complete = false;
                out.resume_after = Some(last);
                break;
            }
        }
        Ok(out)
    }

    fn list_keyspace(&self, query: &ListQuery) -> &Keyspace {
        if query.group.is_some() { &self.records } else { &self.key_index }
    }

    /// The encoded set to list for `key`, `None` to leave it out (gone meanwhile, or a tombstone the
    /// query skips). `raw` is the record itself when listing a group.
    fn listed_set(
        &self,
        key: &RecordKey,
        query: &ListQuery,
        raw: &[u8],
    ) -> Result<Option<Vec<u8>>, EngineError> {
        let set = match query.group {
            Some(_) => raw.to_vec(),
            None => match self.records.get(key.encode()).map_err(EngineError::Read)? {
                Some(set) => set.to_vec(),
                None => return Ok(None),
            },
        };
        if query.skip_tombstones && decode_version_set(&set).is_ok_and(|s| s.is_deleted()) {
            return Ok(None);
        }
        Ok(Some(set))
    }
}

/// The keyspace range a listing walks: under `base` (a tenant's index entries, or a group's
/// records), keys with the query's prefix, strictly between its bounds.
fn key_range(base: &[u8], query: &ListQuery) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let under = |text: &str| {
        let mut bytes = base.to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes
    };
    let lower = match &query.start_after {
        Some(after) if after.as_str() >= query.prefix.as_str() => Bound::Excluded(under(after)),
        _ => Bound::Included(under(&query.prefix)),
    };
    let prefix_end = prefix_successor(under(&query.prefix));
    let upper = match (&query.end_before, prefix_end) {
        (Some(before), Some(end)) if under(before) < end => Bound::Excluded(under(before)),
        (Some(before), None) => Bound::Excluded(under(before)),
        (_, Some(end)) => Bound::Excluded(end),
        (None, None) => Bound::Unbounded,
    };
    (lower, upper)
}

/// The smallest byte string greater than every string starting with `prefix` (`None`: no such
/// string, the prefix being all 0xff).
fn prefix_successor(mut prefix: Vec<u8>) -> Option<Vec<u8>> {
    while let Some(last) = prefix.pop() {
        if last < u8::MAX {
            prefix.push(last + 1);
            return Some(prefix);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(prefix: &str, start_after: Option<&str>, end_before: Option<&str>) -> ListQuery {
        ListQuery {
            tenant: "t".into(),
            partitions: Vec::new(),
            prefix: prefix.into(),
            start_after: start_after.map(Into::into),
            end_before: end_before.map(Into::into),
            group: None,
            reverse: false,
            limit: 10,
            max_bytes: 10,
            skip_tombstones: false,
            max_examined: 10,
            deadline: Instant::now(),
        }
    }

    #[test]
    fn the_range_is_the_prefix_cut_by_the_bounds() {
        let base = b"\x01t".to_vec();
        let at = |s: &str| [base.as_slice(), s.as_bytes()].concat();
        assert_eq!(
            key_range(&base, &query("", None, None)),
            (Bound::Included(at("")), Bound::Excluded(b"\x01u".to_vec()))
        );
        assert_eq!(
            key_range(&base, &query("ab", None, None)),
            (Bound::Included(at("ab")), Bound::Excluded(at("ac")))
        );
        assert_eq!(key_range(&base, &query("ab", Some("aa"), None)).0, Bound::Included(at("ab")));
        assert_eq!(
            key_range(&base, &query("ab", Some("ab5"), Some("ab7"))),
            (Bound::Excluded(at("ab5")), Bound::Excluded(at("ab7")))
        );
        assert_eq!(key_range(&base, &query("ab", None, Some("b"))).1, Bound::Excluded(at("ac")));
        assert_eq!(prefix_successor(vec![1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(vec![0xff]), None);
    }
}
