//! Conditional writes (docs/api.md, "Conditional writes"): a put or delete that happens only if the
//! key is absent, present, or exactly as the client's context saw it.
//!
//! The check runs twice. The router reads the key at the write's consistency and evaluates the
//! condition on the merged set ([`holds_on_read`]); the write then carries what that read saw
//! ([`observed`]), and the coordinating replica re-checks under the key's stripe lock
//! ([`holds_at_coordinator`]), refusing when its own set holds something the read did not see that
//! breaks the condition. Both refusals apply nothing.
//!
//! Laws (tested exhaustively below over every set reachable from short histories on three
//! replicas): with `M` the router's merged read and `L` the coordinator's set,
//! - *sound*: `holds_on_read(M)` and `holds_at_coordinator(L, observed(M))` imply that the condition
//!   holds on `M ⊔ L`, the newest state either side knew;
//! - *no false refusal*: when `M` descends `L` (the coordinator holds nothing the read missed),
//!   `holds_on_read(M)` implies `holds_at_coordinator(L, observed(M))`.
//!
//! It is not linearizable: two writes checked through different coordinators can both pass, and
//! then they are concurrent and both survive as siblings. Nothing acknowledged is ever lost.

use crate::dvv::{VersionSet, VersionVector};
use crate::tenant::ConflictMode;

/// What must hold for a conditional write to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteCondition {
    /// The key has no live value: never written, or deleted.
    IfAbsent,
    /// The key has a live value.
    IfPresent,
    /// The key's version vector is covered by the write's context: no version the client has not
    /// seen, newer or concurrent.
    IfContextMatches,
}

impl WriteCondition {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteCondition::IfAbsent => "if_absent",
            WriteCondition::IfPresent => "if_present",
            WriteCondition::IfContextMatches => "if_context_matches",
        }
    }

    /// Parses the names [`Self::as_str`] gives (edges lowercase user input first).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "if_absent" => Some(WriteCondition::IfAbsent),
            "if_present" => Some(WriteCondition::IfPresent),
            "if_context_matches" => Some(WriteCondition::IfContextMatches),
            _ => None,
        }
    }
}

/// True when `set` has a value a read at `now_ms` returns: any live sibling, or (LWW tenants) a
/// winner that is live (not a tombstone, not expired).
pub fn is_present(set: Option<&VersionSet>, mode: ConflictMode, now_ms: u64) -> bool {
    let Some(set) = set else { return false };
    match mode {
        ConflictMode::Siblings => !set.is_dead_at(now_ms),
        ConflictMode::Lww => set.lww_winner().is_some_and(|s| s.is_live_at(now_ms)),
    }
}

/// The router's check, on the merged set of a read at the write's consistency (`None`: no replica
/// holds the key) and the client's verified context.
pub fn holds_on_read(
    condition: WriteCondition,
    merged: Option<&VersionSet>,
    context: &VersionVector,
    mode: ConflictMode,
    now_ms: u64,
) -> bool {
    match condition {
        WriteCondition::IfAbsent => !is_present(merged, mode, now_ms),
        WriteCondition::IfPresent => is_present(merged, mode, now_ms),
        WriteCondition::IfContextMatches => merged.is_none_or(|set| context.descends(set.vector())),
    }
}

/// What the coordinator re-checks against: the vector of the read (the client's context for
/// `IfContextMatches`, which the read found to cover it).
pub fn observed(
    condition: WriteCondition,
    merged: Option<&VersionSet>,
    context: &VersionVector,
) -> VersionVector {
    match condition {
        WriteCondition::IfContextMatches => context.clone(),
        WriteCondition::IfAbsent | WriteCondition::IfPresent => {
            merged.map(|set| set.vector().clone()).unwrap_or_default()
        }
    }
}

/// The context a write is applied with. `IfAbsent` supersedes everything the read saw (only
/// tombstones, so nothing live is dropped) besides the client's own context; any other write carries
/// the client's context, or with `read_first` (overwrite puts, deletes) and no client context, the
/// read's.
pub fn write_context(
    condition: Option<WriteCondition>,
    merged: Option<&VersionSet>,
    context: &VersionVector,
    read_first: bool,
) -> VersionVector {
    let seen = || merged.map(|set| set.vector().clone()).unwrap_or_default();
    match condition {
        Some(WriteCondition::IfAbsent) => {
            let mut vector = seen();
            vector.merge(context);
            vector
        }
        _ if read_first && context.is_empty() => seen(),
        _ => context.clone(),
    }
}

/// The coordinator's re-check at `now_ms`, on its own set under the key's lock. A sibling `observed`
/// does not cover is one the router's read did not see.
pub fn holds_at_coordinator(
    condition: WriteCondition,
    local: Option<&VersionSet>,
    observed: &VersionVector,
    now_ms: u64,
) -> bool {
    let Some(local) = local else { return true };
    let unseen_live = || local.siblings().iter().any(|s| s.is_live_at(now_ms) && !observed.covers(s.dot));
    match condition {
        WriteCondition::IfAbsent => !unseen_live(),
        WriteCondition::IfPresent => unseen_live() || observed.descends(local.vector()),
        WriteCondition::IfContextMatches => observed.descends(local.vector()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dvv::Actor;
    use std::collections::BTreeSet;

    const CONDITIONS: [WriteCondition; 3] =
        [WriteCondition::IfAbsent, WriteCondition::IfPresent, WriteCondition::IfContextMatches];

    /// Every state three replicas can reach in up to `steps` operations from empty: a write (value
    /// or tombstone, blind or with the coordinator's own context) coordinated by one replica, or one
    /// replica's set merged into another's.
    fn reachable(steps: usize) -> Vec<[VersionSet; 3]> {
        let mut frontier: Vec<[VersionSet; 3]> = vec![Default::default()];
        let mut seen = BTreeSet::new();
        let mut states = Vec::new();
        for _ in 0..steps {
            let mut next = Vec::new();
            for replicas in &frontier {
                for r in 0..3 {
                    for (value, with_context) in
                        [(Some(vec![r as u8]), false), (Some(vec![r as u8]), true), (None, true)]
                    {
                        let mut after = replicas.clone();
                        let context =
                            if with_context { after[r].vector().clone() } else { VersionVector::new() };
                        after[r].update(&context, Actor(r as u64 + 1), value, 1, None).unwrap();
                        next.push(after);
                    }
                    for from in (0..3).filter(|f| *f != r) {
                        let mut after = replicas.clone();
                        after[r] = after[r].merge(&replicas[from]);
                        next.push(after);
                    }
                }
            }
            next.retain(|replicas| {
                let encoded: Vec<u8> =
                    replicas.iter().flat_map(crate::encoding::encode_version_set).collect();
                seen.insert(encoded)
            });
            states.extend(next.iter().cloned());
            frontier = next;
        }
        states
    }

    #[test]
    fn coordinator_check_is_sound_and_never_refuses_what_the_read_already_saw() {
        let states = reachable(5);
        assert!(states.len() > 1000, "the exploration reaches many states: {}", states.len());
        let mut checked = 0;
        for replicas in &states {
            // The read merges two replicas; the coordinator is any of the three.
            for (a, b) in [(0, 1), (1, 2), (0, 2)] {
                let merged = replicas[a].merge(&replicas[b]);
                for local in replicas {
                    for condition in CONDITIONS {
                        // Contexts a client could hold: nothing, or what this read saw.
                        for context in [VersionVector::new(), merged.vector().clone()] {
                            let mode = ConflictMode::Siblings;
                            if !holds_on_read(condition, Some(&merged), &context, mode, 0) {
                                continue;
                            }
                            let observed = observed(condition, Some(&merged), &context);
                            let passes = holds_at_coordinator(condition, Some(local), &observed, 0);
                            let newest = merged.merge(local);
                            if passes {
                                assert!(
                                    holds_on_read(condition, Some(&newest), &context, mode, 0),
                                    "{condition:?} passed but fails on the newest state\nM={merged:?}\nL={local:?}"
                                );
                            }
                            if merged.descends(local) {
                                assert!(
                                    passes,
                                    "{condition:?} refused with nothing unseen\nM={merged:?}\nL={local:?}"
                                );
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000, "{checked} combinations checked");
    }

    #[test]
    fn absent_and_present_follow_the_read() {
        let mut set = VersionSet::new();
        let none = VersionVector::new();
        for mode in [ConflictMode::Siblings, ConflictMode::Lww] {
            assert!(holds_on_read(WriteCondition::IfAbsent, None, &none, mode, 0));
            assert!(!holds_on_read(WriteCondition::IfPresent, None, &none, mode, 0));
        }
        set.update(&none, Actor(1), Some(b"x".to_vec()), 5, None).unwrap();
        assert!(holds_on_read(WriteCondition::IfPresent, Some(&set), &none, ConflictMode::Siblings, 0));
        // A concurrent tombstone with a later timestamp: siblings still show "x", LWW shows nothing.
        set.update(&none, Actor(2), None, 9, None).unwrap();
        assert!(holds_on_read(WriteCondition::IfPresent, Some(&set), &none, ConflictMode::Siblings, 0));
        assert!(holds_on_read(WriteCondition::IfAbsent, Some(&set), &none, ConflictMode::Lww, 0));
    }

    #[test]
    fn context_matches_only_when_nothing_unseen_exists() {
        let none = VersionVector::new();
        assert!(holds_on_read(WriteCondition::IfContextMatches, None, &none, ConflictMode::Siblings, 0));
        let mut set = VersionSet::new();
        set.update(&none, Actor(1), Some(b"1".to_vec()), 1, None).unwrap();
        let seen = set.vector().clone();
        assert!(holds_on_read(
            WriteCondition::IfContextMatches,
            Some(&set),
            &seen,
            ConflictMode::Siblings,
            0
        ));
        assert!(!holds_on_read(
            WriteCondition::IfContextMatches,
            Some(&set),
            &none,
            ConflictMode::Siblings,
            0
        ));
        set.update(&seen, Actor(1), Some(b"2".to_vec()), 2, None).unwrap();
        assert!(!holds_on_read(
            WriteCondition::IfContextMatches,
            Some(&set),
            &seen,
            ConflictMode::Siblings,
            0
        ));
        assert!(!holds_at_coordinator(WriteCondition::IfContextMatches, Some(&set), &seen, 0));
    }

    #[test]
    fn if_absent_supersedes_the_tombstones_it_saw() {
        let none = VersionVector::new();
        let mut set = VersionSet::new();
        set.update(&none, Actor(1), Some(b"x".to_vec()), 1, None).unwrap();
        let seen = set.vector().clone();
        set.update(&seen, Actor(1), None, 2, None).unwrap();
        assert!(holds_on_read(WriteCondition::IfAbsent, Some(&set), &none, ConflictMode::Siblings, 0));
        let context = write_context(Some(WriteCondition::IfAbsent), Some(&set), &none, false);
        assert_eq!(&context, set.vector());
        set.update(&context, Actor(2), Some(b"new".to_vec()), 3, None).unwrap();
        assert_eq!(set.siblings().len(), 1, "the tombstone is superseded, not a sibling");
    }

    #[test]
    fn an_expired_value_is_absent_on_both_checks() {
        let none = VersionVector::new();
        let mut set = VersionSet::new();
        let expiring =
            crate::dvv::NewVersion { value: Some(b"v".to_vec()), timestamp_ms: 1, expires_at_ms: Some(100) };
        set.update_with(&none, Actor(1), expiring, None).unwrap();
        for mode in [ConflictMode::Siblings, ConflictMode::Lww] {
            assert!(holds_on_read(WriteCondition::IfPresent, Some(&set), &none, mode, 99));
            assert!(holds_on_read(WriteCondition::IfAbsent, Some(&set), &none, mode, 100));
        }
        assert!(!holds_at_coordinator(WriteCondition::IfAbsent, Some(&set), &none, 99));
        assert!(holds_at_coordinator(WriteCondition::IfAbsent, Some(&set), &none, 100));
        // IF_ABSENT over an expired value supersedes it: the key's history is kept, not doubled.
        let context = write_context(Some(WriteCondition::IfAbsent), Some(&set), &none, false);
        set.update(&context, Actor(1), Some(b"new".to_vec()), 200, None).unwrap();
        assert_eq!(set.siblings().len(), 1);
    }

    #[test]
    fn names_round_trip() {
        for condition in CONDITIONS {
            assert_eq!(WriteCondition::parse(condition.as_str()), Some(condition));
        }
        assert_eq!(WriteCondition::parse("IF_ABSENT"), None);
    }
}
