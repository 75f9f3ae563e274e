//! Reads across many keys: partition scans for migration streams, Merkle levels and leaf digests for
//! anti-entropy, batched gets, and rebuilding the Merkle trees when the node opens.

use pairdb_core::gc::RecordState;

use super::*;

/// One batch of a partition scan.
#[derive(Debug, Clone, Default)]
pub struct ScanBatch {
    pub records: Vec<(RecordKey, Vec<u8>)>,
    /// The last record key visited (resume strictly after it), even if filtered out.
    pub next_cursor: Vec<u8>,
    pub done: bool,
}

/// One record's (key, version digest), as anti-entropy compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordDigest {
    pub key: RecordKey,
    pub digest: u64,
    /// Every sibling is a tombstone or an expiring value: the record stops holding data by itself,
    /// and for GC it is a tombstone (`pairdb_core::dvv::VersionSet::dead_since_ms`).
    pub tombstone_only: bool,
    /// For such a record, when it stops holding data (its newest tombstone's write time or
    /// expiry); for any other, the newest sibling's write time (ms since the Unix epoch).
    pub newest_timestamp_ms: u64,
}

impl RecordDigest {
    pub(super) fn of(key: RecordKey, set: &VersionSet) -> Self {
        let dead_since = set.dead_since_ms();
        Self {
            key,
            digest: version_digest(set),
            tombstone_only: dead_since.is_some(),
            newest_timestamp_ms: dead_since
                .unwrap_or_else(|| set.siblings().iter().map(|s| s.timestamp_ms).max().unwrap_or(0)),
        }
    }

    /// What the GC decisions of `pairdb_core::gc::tombstones` read of the record.
    pub fn state(&self) -> RecordState {
        RecordState {
            digest: self.digest,
            tombstone_only: self.tombstone_only,
            newest_timestamp_ms: self.newest_timestamp_ms,
        }
    }
}

/// The first key after every key of `partition` (None for the last partition).
pub(super) fn partition_end(partition: PartitionId) -> Option<Vec<u8>> {
    partition.0.checked_add(1).map(|next| next.to_be_bytes().to_vec())
}

/// The smallest byte string greater than `key`.
pub(super) fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

impl Engine {
    /// Up to `limit` records of `partition` after `cursor` (exclusive), optionally only some tenants
    /// (a set: a migration may name many, and every record visited is looked up in it).
    pub fn scan_partition(
        &self,
        partition: PartitionId,
        cursor: &[u8],
        tenants: &std::collections::BTreeSet<String>,
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
}
