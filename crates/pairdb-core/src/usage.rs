//! What a tenant's data amounts to: the one definition of a record's contribution to its tenant's
//! usage, shared by storage nodes (which keep it per tenant and partition, incrementally), meta (which
//! sums the nodes' reports) and tests (which compute the truth by reading every key).
//!
//! A record counts as one key when at least one sibling holds a value, as one tombstone when it holds
//! siblings and all are tombstones; `siblings` and `value_bytes` count the live (value-holding)
//! siblings as stored, so concurrent identical values count twice though a read shows them once.

use crate::dvv::VersionSet;

/// Counters of some records (one record, a partition's, a tenant's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Records with a live sibling.
    pub keys: u64,
    /// Bytes of the live siblings' values.
    pub value_bytes: u64,
    /// Live siblings.
    pub siblings: u64,
    /// Records holding only tombstones.
    pub tombstones: u64,
}

impl Usage {
    /// One record's contribution.
    pub fn of(set: &VersionSet) -> Usage {
        let mut usage = Usage::default();
        for sibling in set.siblings() {
            if let Some(value) = &sibling.value {
                usage.siblings += 1;
                usage.value_bytes += value.len() as u64;
            }
        }
        if usage.siblings > 0 {
            usage.keys = 1;
        } else if !set.siblings().is_empty() {
            usage.tombstones = 1;
        }
        usage
    }

    pub fn add(&mut self, other: Usage) {
        self.keys += other.keys;
        self.value_bytes += other.value_bytes;
        self.siblings += other.siblings;
        self.tombstones += other.tombstones;
    }

    /// Removes `other`, which must be part of `self` (saturating, so a miscount never wraps).
    pub fn subtract(&mut self, other: Usage) {
        debug_assert!(
            self.keys >= other.keys
                && self.value_bytes >= other.value_bytes
                && self.siblings >= other.siblings
                && self.tombstones >= other.tombstones,
            "usage {self:?} does not contain {other:?}"
        );
        self.keys = self.keys.saturating_sub(other.keys);
        self.value_bytes = self.value_bytes.saturating_sub(other.value_bytes);
        self.siblings = self.siblings.saturating_sub(other.siblings);
        self.tombstones = self.tombstones.saturating_sub(other.tombstones);
    }

    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dvv::{Actor, VersionVector};

    #[test]
    fn a_record_counts_as_a_key_or_a_tombstone() {
        let mut set = VersionSet::new();
        assert!(Usage::of(&set).is_zero());
        set.update(&VersionVector::new(), Actor(1), Some(b"abc".to_vec()), 1, None).unwrap();
        set.update(&VersionVector::new(), Actor(1), Some(b"de".to_vec()), 2, None).unwrap();
        assert_eq!(Usage::of(&set), Usage { keys: 1, value_bytes: 5, siblings: 2, tombstones: 0 });
        let seen = set.vector().clone();
        set.update(&seen, Actor(1), None, 3, None).unwrap();
        assert_eq!(Usage::of(&set), Usage { keys: 0, value_bytes: 0, siblings: 0, tombstones: 1 });
        let mut total = Usage::default();
        total.add(Usage::of(&set));
        total.subtract(Usage::of(&set));
        assert!(total.is_zero());
    }
}
