//! When a tombstone-only record may be removed: the two GC paths' decisions, as functions of what a
//! node read under the key's stripe lock, what its peers answered, and `now_ms`.
//!
//! Invariants (checked by the unit tests here and the seeded simulation in `tests/gc_simulation.rs`):
//! - nothing that holds a live value is ever purged;
//! - a tombstone is never purged on time alone: the anti-entropy path needs every replica that shares
//!   the tenant to hold the same tombstone-only set, the full-ack path needs every owner's
//!   acknowledgement under a placement that still holds;
//! - a record that changed since it was checked (another digest) is never purged.

use super::TombstonePlacement;

/// What a node holds for one key, as the GC decisions need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordState {
    /// Digest of the whole version set (siblings and vector).
    pub digest: u64,
    /// Every sibling is a tombstone or an expiring value (an expired value is a tombstone for GC).
    pub tombstone_only: bool,
    /// Wall-clock time the record stopped holding data (newest tombstone write or expiry), ms.
    pub newest_timestamp_ms: u64,
}

/// The newest write time a tombstone may have to be collected at `now_ms` with `grace_ms`.
pub fn gc_cutoff_ms(now_ms: u64, grace_ms: u64) -> u64 {
    now_ms.saturating_sub(grace_ms)
}

/// Whether `record` is a GC candidate at all: tombstone-only and older than `cutoff_ms`.
pub fn is_candidate(record: &RecordState, cutoff_ms: u64) -> bool {
    record.tombstone_only && record.newest_timestamp_ms < cutoff_ms
}

/// The anti-entropy path's agreement check: every peer that shares the key's tenant answered with
/// exactly the candidate's tombstone-only set. A peer that did not answer (`None`) blocks the purge.
pub fn replicas_agree<'a>(
    candidate: &RecordState,
    peers: impl IntoIterator<Item = Option<&'a RecordState>>,
) -> bool {
    peers.into_iter().all(|peer| peer.is_some_and(|p| p.tombstone_only && p.digest == candidate.digest))
}

/// The last check before a node removes a record it was told (or decided) to purge: the record it
/// holds now is still the agreed tombstone-only set and still older than the cutoff.
pub fn purge_allowed(current: Option<&RecordState>, agreed_digest: u64, cutoff_ms: u64) -> bool {
    current.is_some_and(|c| c.digest == agreed_digest && is_candidate(c, cutoff_ms))
}

/// A full-ack confirmation as stored: the acknowledged set's digest and where it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    pub digest: u64,
    pub placement: TombstonePlacement,
}

/// What to do with one full-ack confirmation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmedVerdict {
    /// Remove the record and the confirmation.
    Purge,
    /// Not old enough yet: look again later.
    Wait,
    /// The record changed or is gone, or the owners may have changed: drop the confirmation (the
    /// tombstone, if any, waits for the anti-entropy path).
    Forget,
}

/// The full-ack path's decision for one confirmation, given the record held now and whether the
/// confirmation's placement still holds ([`super::placement_holds`]).
pub fn confirmed_verdict(
    current: Option<&RecordState>,
    confirmation: &Confirmation,
    placement_holds: bool,
    cutoff_ms: u64,
) -> ConfirmedVerdict {
    let unchanged = current.is_some_and(|c| c.tombstone_only && c.digest == confirmation.digest);
    match current {
        _ if !unchanged || !placement_holds => ConfirmedVerdict::Forget,
        Some(record) if is_candidate(record, cutoff_ms) => ConfirmedVerdict::Purge,
        _ => ConfirmedVerdict::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<Option<RecordState>> {
        let mut out = vec![None];
        for digest in [1, 2] {
            for tombstone_only in [false, true] {
                for newest_timestamp_ms in [50, 100, 150] {
                    out.push(Some(RecordState { digest, tombstone_only, newest_timestamp_ms }));
                }
            }
        }
        out
    }

    #[test]
    fn nothing_live_or_changed_or_young_is_purged() {
        for current in states() {
            for agreed in [1, 2] {
                let allowed = purge_allowed(current.as_ref(), agreed, 100);
                let expected = current
                    .is_some_and(|c| c.tombstone_only && c.digest == agreed && c.newest_timestamp_ms < 100);
                assert_eq!(allowed, expected, "{current:?} agreed {agreed}");
            }
        }
    }

    #[test]
    fn one_silent_or_different_peer_blocks_agreement() {
        let candidate = RecordState { digest: 1, tombstone_only: true, newest_timestamp_ms: 10 };
        for a in states() {
            for b in states() {
                let same = |s: &Option<RecordState>| s.is_some_and(|s| s.tombstone_only && s.digest == 1);
                assert_eq!(
                    replicas_agree(&candidate, [a.as_ref(), b.as_ref()]),
                    same(&a) && same(&b),
                    "{a:?} {b:?}"
                );
            }
        }
        assert!(replicas_agree(&candidate, []), "a partition without peers agrees with itself");
    }

    #[test]
    fn a_confirmation_purges_only_its_unchanged_old_tombstone_under_a_holding_placement() {
        let placement = TombstonePlacement { topology_epoch: 3, replication_factor: 3 };
        let confirmation = Confirmation { digest: 1, placement };
        for current in states() {
            for holds in [false, true] {
                let verdict = confirmed_verdict(current.as_ref(), &confirmation, holds, 100);
                let unchanged = current.is_some_and(|c| c.tombstone_only && c.digest == 1);
                let expected = if !unchanged || !holds {
                    ConfirmedVerdict::Forget
                } else if current.is_some_and(|c| c.newest_timestamp_ms < 100) {
                    ConfirmedVerdict::Purge
                } else {
                    ConfirmedVerdict::Wait
                };
                assert_eq!(verdict, expected, "{current:?} holds {holds}");
                if verdict == ConfirmedVerdict::Purge {
                    assert!(purge_allowed(current.as_ref(), 1, 100), "both paths agree on what is old");
                }
            }
        }
    }

    #[test]
    fn the_cutoff_never_underflows() {
        assert_eq!(gc_cutoff_ms(5, 10), 0);
        assert_eq!(gc_cutoff_ms(15, 10), 5);
    }
}
