//! Incremental Merkle summaries of (key, version digest), one tree per partition, for anti-entropy.
//!
//! A partition's token range is cut into 2^[`MERKLE_DEPTH`] equal leaves (the token bits right after
//! the partition bits), so a leaf is one contiguous range of the record keyspace. A leaf's hash is the
//! XOR of `entry_hash(record key, version digest)` over its records; an inner node's hash is the XOR of
//! its leaves. XOR makes every write an O(1) update (XOR the old entry out, the new one in), so the
//! trees are never rescanned: they are built once from disk when the engine opens and then follow
//! every write, merge and delete under the key's stripe lock.
//!
//! Invariant: for every partition, `tree == fold(XOR, entry_hash(k, digest(set_k)))` over the records
//! on disk. Two replicas holding the same sets for the same keys have equal trees; the version digest
//! covers the vector and the sibling dots (a dot names exactly one value), not the values themselves.

use std::sync::{Mutex, PoisonError};

use pairdb_core::dvv::VersionSet;
use pairdb_core::token::{PartitionCount, PartitionId};
use sha2::{Digest, Sha256};

/// Depth of the per-partition tree: 2^8 leaves.
pub const MERKLE_DEPTH: u32 = 8;
const LEAVES: usize = 1 << MERKLE_DEPTH;

/// 64-bit digest of a set's causal history: its vector and its siblings' dots and kinds.
pub fn version_digest(set: &VersionSet) -> u64 {
    let mut hasher = Sha256::new();
    for (actor, counter) in set.vector().entries() {
        hasher.update(actor.0.to_be_bytes());
        hasher.update(counter.to_be_bytes());
    }
    hasher.update([0xff]);
    for sibling in set.siblings() {
        hasher.update(sibling.dot.actor.0.to_be_bytes());
        hasher.update(sibling.dot.counter.to_be_bytes());
        hasher.update([u8::from(sibling.is_tombstone())]);
        // Only when set, so a record without expiry keeps the digest earlier releases computed.
        if let Some(at) = sibling.expires_at_ms.filter(|_| !sibling.is_tombstone()) {
            hasher.update([0xfe]);
            hasher.update(at.to_be_bytes());
        }
    }
    first_u64(&hasher.finalize())
}

/// What the trees know of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub digest: u64,
    /// Every sibling is a tombstone or an expiring value: a GC candidate now or later (counted per
    /// partition, so tombstone GC skips partitions without).
    pub tombstone_only: bool,
}

impl Entry {
    pub fn of(set: &VersionSet) -> Self {
        Self { digest: version_digest(set), tombstone_only: set.dead_since_ms().is_some() }
    }
}

/// The contribution of one record to its leaf.
pub fn entry_hash(encoded_key: &[u8], digest: u64) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update((encoded_key.len() as u32).to_be_bytes());
    hasher.update(encoded_key);
    hasher.update(digest.to_be_bytes());
    first_u64(&hasher.finalize())
}

fn first_u64(bytes: &[u8]) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(out)
}

#[derive(Debug)]
struct Tree {
    hashes: [u64; LEAVES],
    counts: [u32; LEAVES],
    keys: u64,
    tombstones: u64,
}

/// One node of a tree level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MerkleNode {
    pub index: u32,
    pub hash: u64,
    pub keys: u64,
}

/// The trees of every partition (allocated on first record).
#[derive(Debug)]
pub struct MerkleIndex {
    trees: Box<[Mutex<Option<Box<Tree>>>]>,
    partition_bits: u32,
}

impl MerkleIndex {
    pub fn new(partitions: PartitionCount) -> Self {
        Self {
            trees: (0..partitions.get()).map(|_| Mutex::new(None)).collect(),
            partition_bits: partitions.get().trailing_zeros(),
        }
    }

    /// The leaf of an encoded record key (`partition u32be | token u64be | …`).
    pub fn leaf_of(&self, encoded_key: &[u8]) -> usize {
        let mut token = [0u8; 8];
        if let Some(bytes) = encoded_key.get(4..12) {
            token.copy_from_slice(bytes);
        }
        let token = u64::from_be_bytes(token);
        // Partition bits shifted out, the next MERKLE_DEPTH bits pick the leaf.
        ((token.checked_shl(self.partition_bits).unwrap_or(0)) >> (64 - MERKLE_DEPTH)) as usize
    }

    fn partition_of(encoded_key: &[u8]) -> usize {
        let mut partition = [0u8; 4];
        if let Some(bytes) = encoded_key.get(..4) {
            partition.copy_from_slice(bytes);
        }
        u32::from_be_bytes(partition) as usize
    }

    /// Records that the record at `encoded_key` went from digest `old` to `new` (`None` = absent).
    pub fn update(&self, encoded_key: &[u8], old: Option<Entry>, new: Option<Entry>) {
        if old == new {
            return;
        }
        let Some(slot) = self.trees.get(Self::partition_of(encoded_key)) else { return };
        let leaf = self.leaf_of(encoded_key);
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let tree = slot.get_or_insert_with(|| {
            Box::new(Tree { hashes: [0; LEAVES], counts: [0; LEAVES], keys: 0, tombstones: 0 })
        });
        if let Some(old) = old {
            tree.hashes[leaf] ^= entry_hash(encoded_key, old.digest);
            tree.counts[leaf] = tree.counts[leaf].saturating_sub(1);
            tree.keys = tree.keys.saturating_sub(1);
            tree.tombstones = tree.tombstones.saturating_sub(u64::from(old.tombstone_only));
        }
        if let Some(new) = new {
            tree.hashes[leaf] ^= entry_hash(encoded_key, new.digest);
            tree.counts[leaf] += 1;
            tree.keys += 1;
            tree.tombstones += u64::from(new.tombstone_only);
        }
        if tree.keys == 0 {
            *slot = None;
        }
    }

    /// Level `level` (0 = root, [`MERKLE_DEPTH`] = leaves) of `partition`'s tree; all zeros if empty.
    pub fn level(&self, partition: PartitionId, level: u32) -> Vec<MerkleNode> {
        let level = level.min(MERKLE_DEPTH);
        let width = 1usize << level;
        let per_node = LEAVES / width;
        let slot = match self.trees.get(partition.0 as usize) {
            Some(slot) => slot.lock().unwrap_or_else(PoisonError::into_inner),
            None => return Vec::new(),
        };
        (0..width)
            .map(|index| {
                let (mut hash, mut keys) = (0u64, 0u64);
                if let Some(tree) = slot.as_ref() {
                    for leaf in index * per_node..(index + 1) * per_node {
                        hash ^= tree.hashes[leaf];
                        keys += u64::from(tree.counts[leaf]);
                    }
                }
                MerkleNode { index: index as u32, hash, keys }
            })
            .collect()
    }

    /// Records on this node (exact, unlike the LSM's estimate, which counts uncompacted versions).
    pub fn total_keys(&self) -> u64 {
        self.trees
            .iter()
            .map(|slot| slot.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map_or(0, |t| t.keys))
            .sum()
    }

    /// Tombstone-only records in `partition`.
    pub fn tombstones(&self, partition: PartitionId) -> u64 {
        self.trees
            .get(partition.0 as usize)
            .and_then(|slot| {
                slot.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|t| t.tombstones)
            })
            .unwrap_or(0)
    }

    /// Partitions holding at least one record.
    pub fn partitions_with_data(&self) -> Vec<PartitionId> {
        self.trees
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.lock().unwrap_or_else(PoisonError::into_inner).is_some())
            .map(|(index, _)| PartitionId(index as u32))
            .collect()
    }

    /// The record-key range `[start, end)` of one leaf of `partition` (end `None` = to the end).
    pub fn leaf_range(&self, partition: PartitionId, leaf: u32) -> (Vec<u8>, Option<Vec<u8>>) {
        let leaf_bits = 64 - self.partition_bits - MERKLE_DEPTH;
        let token_of = |leaf: u64| -> u64 {
            let partition_part = u64::from(partition.0).checked_shl(64 - self.partition_bits).unwrap_or(0);
            partition_part | (leaf << leaf_bits)
        };
        let encode = |partition: u32, token: u64| {
            let mut out = partition.to_be_bytes().to_vec();
            out.extend_from_slice(&token.to_be_bytes());
            out
        };
        let start = encode(partition.0, token_of(u64::from(leaf)));
        let end = if (leaf as usize) + 1 < LEAVES {
            Some(encode(partition.0, token_of(u64::from(leaf) + 1)))
        } else {
            partition.0.checked_add(1).map(|next| next.to_be_bytes().to_vec())
        };
        (start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::RecordKey;

    fn entry(digest: u64) -> Entry {
        Entry { digest, tombstone_only: digest.is_multiple_of(2) }
    }

    #[test]
    fn updates_are_order_independent_and_cancel() {
        let q = PartitionCount::new(16).unwrap();
        let a = MerkleIndex::new(q);
        let b = MerkleIndex::new(q);
        let keys: Vec<Vec<u8>> =
            (0..200).map(|i| RecordKey::new(q, "t", &format!("k{i}")).encode()).collect();
        for (i, key) in keys.iter().enumerate() {
            a.update(key, None, Some(entry(i as u64)));
        }
        for (i, key) in keys.iter().enumerate().rev() {
            b.update(key, None, Some(entry(7)));
            b.update(key, Some(entry(7)), Some(entry(i as u64)));
        }
        for p in 0..16 {
            assert_eq!(a.level(PartitionId(p), MERKLE_DEPTH), b.level(PartitionId(p), MERKLE_DEPTH));
            assert_eq!(a.level(PartitionId(p), 0), b.level(PartitionId(p), 0));
        }
        for (i, key) in keys.iter().enumerate() {
            a.update(key, Some(entry(i as u64)), None);
        }
        assert!(a.partitions_with_data().is_empty());
        assert_eq!(a.level(PartitionId(3), 0)[0].hash, 0);
    }

    #[test]
    fn leaf_ranges_contain_their_keys() {
        let q = PartitionCount::new(64).unwrap();
        let index = MerkleIndex::new(q);
        for i in 0..500 {
            let key = RecordKey::new(q, "tenant", &format!("key-{i}"));
            let encoded = key.encode();
            let leaf = index.leaf_of(&encoded) as u32;
            let (start, end) = index.leaf_range(key.partition, leaf);
            assert!(encoded.as_slice() >= start.as_slice());
            if let Some(end) = end {
                assert!(encoded.as_slice() < end.as_slice());
            }
        }
    }
}
