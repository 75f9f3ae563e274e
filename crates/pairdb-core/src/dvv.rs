//! Dotted version vector sets (DVVS): the versioned value of one key, as in Riak 2.x and Garage K2V.
//!
//! A [`VersionSet`] is a version vector (the causal history the replica has seen) plus the siblings
//! that are still live in that history, each tagged with the dot (actor, counter) of the write that
//! created it. Actors are storage-node incarnations: an actor id is created with a data directory and
//! never reused, so counters never repeat (Riak's "key amnesia" cannot happen).
//!
//! Laws (proved by the property tests in `tests/dvv_laws.rs`):
//! - `merge` is commutative, associative and idempotent, so replicas converge whatever order they
//!   exchange sets in, and redelivery is harmless.
//! - `update(C, a, v)` removes exactly the siblings whose dots are covered by C and keeps every other
//!   (concurrent) sibling; the new sibling's dot is (a, max counter seen for a + 1), so it is covered by
//!   no earlier context.
//! - A write without context removes nothing: two blind writes both survive any merge.
//!
//! Invariants of a [`VersionSet`]: every sibling's dot is covered by the vector; siblings are sorted by
//! dot and no two share a dot; a dot identifies one write, so two sets holding the same dot hold the
//! same sibling.

use crate::reason::{HasReason, Reason};
use std::collections::BTreeMap;

/// The most actors a write may leave in a key's version vector. Real vectors name the storage-node
/// incarnations that coordinated writes to the key (a few per preference-list position over a
/// cluster's life); a write whose context would grow the vector past this is refused
/// ([`UpdateError::TooManyActors`]), so invented actors cannot bloat a record. A vector already
/// above it (concurrent growth on several replicas) still takes writes that add no actor.
pub const MAX_ACTORS: usize = 64;

/// The highest counter a dot may have: 2^48 − 1 (nine years of a million writes per second to one
/// key). Counters above it are never minted and never decoded, so counter arithmetic cannot reach
/// `u64::MAX` (no saturation, no wrap, no repeated dot).
pub const MAX_COUNTER: u64 = (1 << 48) - 1;

/// A storage-node incarnation (random 64-bit id created with the data directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Actor(pub u64);

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The identity of one write: the coordinating actor and its per-actor counter (starting at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// Highest counter seen per actor. Absent actors have counter 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    entries: BTreeMap<Actor, u64>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a vector from (actor, counter) pairs; zero counters are dropped, duplicates keep the max.
    pub fn from_entries(entries: impl IntoIterator<Item = (Actor, u64)>) -> Self {
        let mut vector = Self::new();
        for (actor, counter) in entries {
            vector.raise(actor, counter);
        }
        vector
    }

    pub fn get(&self, actor: Actor) -> u64 {
        self.entries.get(&actor).copied().unwrap_or(0)
    }

    /// Raises `actor`'s counter to at least `counter`.
    pub fn raise(&mut self, actor: Actor, counter: u64) {
        if counter == 0 {
            return;
        }
        let entry = self.entries.entry(actor).or_insert(0);
        *entry = (*entry).max(counter);
    }

    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.actor) >= dot.counter
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (&actor, &counter) in &other.entries {
            self.raise(actor, counter);
        }
    }

    /// True when every event `other` has seen, `self` has seen too.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.entries.iter().all(|(&actor, &counter)| self.get(actor) >= counter)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries in actor order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (Actor, u64)> + '_ {
        self.entries.iter().map(|(&actor, &counter)| (actor, counter))
    }
}

/// One concurrent version of a key: a value, or a tombstone (`value == None`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sibling {
    pub dot: Dot,
    pub value: Option<Vec<u8>>,
    /// Write time at the coordinator, milliseconds since the Unix epoch. Only LWW resolution and
    /// tombstone GC look at it; causality never does.
    pub timestamp_ms: u64,
    /// When the value expires (ms since the Unix epoch; `None`: never). Stamped once by the write's
    /// router and replicated with the sibling, so every replica holds the same expiry; reads hide a
    /// sibling from then on, and for causality it is a tombstone: a write with a context that saw
    /// it supersedes it. Expiry never changes a replica's set, and never decides causality.
    pub expires_at_ms: Option<u64>,
}

impl Sibling {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// A value a read at `now_ms` returns: not a tombstone, not expired.
    pub fn is_live_at(&self, now_ms: u64) -> bool {
        self.value.is_some() && self.expires_at_ms.is_none_or(|at| now_ms < at)
    }

    /// When this sibling stops holding data: its write time for a tombstone, its expiry for an
    /// expiring value, never (`None`) for any other value. Tombstone GC counts from here.
    pub fn dead_since_ms(&self) -> Option<u64> {
        match (&self.value, self.expires_at_ms) {
            (None, _) => Some(self.timestamp_ms),
            (Some(_), Some(at)) => Some(at.max(self.timestamp_ms)),
            (Some(_), None) => None,
        }
    }
}

/// The sibling a write adds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewVersion {
    /// `None` writes a tombstone.
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: u64,
    pub expires_at_ms: Option<u64>,
}

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error("the write would leave {would_have} siblings, above the tenant's cap of {max_siblings}")]
    TooManySiblings { would_have: usize, max_siblings: usize },
    /// The actor's counter is at [`MAX_COUNTER`]: a new dot would repeat or wrap. Never saturate:
    /// two writes with one dot would be taken for one.
    #[error("actor {actor}'s counter is exhausted")]
    CounterExhausted { actor: Actor },
    /// The context names so many actors the key's vector would grow past [`MAX_ACTORS`].
    #[error("the write would leave {would_have} actors in the key's version vector, above {MAX_ACTORS}")]
    TooManyActors { would_have: usize },
}

impl HasReason for UpdateError {
    fn reason(&self) -> Reason {
        match self {
            UpdateError::TooManySiblings { .. } => Reason::TooManySiblings,
            UpdateError::CounterExhausted { .. } | UpdateError::TooManyActors { .. } => {
                Reason::MalformedVersion
            }
        }
    }
}

/// The dotted version vector set of one key on one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionSet {
    vector: VersionVector,
    /// Sorted by dot, unique dots, each covered by `vector`.
    siblings: Vec<Sibling>,
}

impl VersionSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from parts, restoring the invariants: siblings are sorted, duplicate dots keep the
    /// first occurrence, and the vector is raised to cover every sibling.
    pub fn from_parts(mut vector: VersionVector, mut siblings: Vec<Sibling>) -> Self {
        siblings.sort_by_key(|s| s.dot);
        siblings.dedup_by_key(|s| s.dot);
        for sibling in &siblings {
            vector.raise(sibling.dot.actor, sibling.dot.counter);
        }
        Self { vector, siblings }
    }

    /// The causal context of this set: what a client that read it has seen.
    pub fn vector(&self) -> &VersionVector {
        &self.vector
    }

    /// Every stored sibling, tombstones included, in dot order.
    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// True when nothing was ever written (no history at all).
    pub fn is_empty(&self) -> bool {
        self.vector.is_empty() && self.siblings.is_empty()
    }

    /// True when no sibling holds a value (never written, or deleted); expiry is not considered.
    pub fn is_deleted(&self) -> bool {
        self.siblings.iter().all(Sibling::is_tombstone)
    }

    /// True when no sibling is live at `now_ms`: deleted, expired, or both.
    pub fn is_dead_at(&self, now_ms: u64) -> bool {
        !self.siblings.iter().any(|s| s.is_live_at(now_ms))
    }

    /// When the whole record stopped holding data (the newest [`Sibling::dead_since_ms`]); `None`
    /// while any sibling is a value that never expires. A record that has one is a GC candidate
    /// from then on (plus the grace period, and only once every replica holds it).
    pub fn dead_since_ms(&self) -> Option<u64> {
        self.siblings.iter().try_fold(0u64, |newest, s| s.dead_since_ms().map(|at| newest.max(at)))
    }

    /// Value siblings with identical values returned once (the one with the highest dot), in dot
    /// order, **ignoring expiry** (tests and tools; reads use [`Self::live_values_at`]).
    pub fn live_values(&self) -> Vec<&Sibling> {
        self.live_values_at(0)
    }

    /// Siblings live at `now_ms` (not tombstones, not expired) with identical values returned once
    /// (the one with the highest dot), in dot order.
    pub fn live_values_at(&self, now_ms: u64) -> Vec<&Sibling> {
        let mut live: Vec<&Sibling> = Vec::with_capacity(self.siblings.len());
        // Walk from the highest dot so the survivor of a duplicate group is the newest write.
        for sibling in self.siblings.iter().rev() {
            if !sibling.is_live_at(now_ms) {
                continue;
            }
            if live.iter().any(|kept| kept.value == sibling.value) {
                continue;
            }
            live.push(sibling);
        }
        live.reverse();
        live
    }

    /// Last-writer-wins resolution: the sibling with the highest (timestamp, dot). `None` if empty.
    /// A tombstone can win, which means the key reads as deleted.
    pub fn lww_winner(&self) -> Option<&Sibling> {
        self.siblings.iter().max_by_key(|s| (s.timestamp_ms, s.dot.counter, s.dot.actor))
    }

    /// Applies a client write coordinated by `actor`: drops siblings covered by `context`, absorbs the
    /// context into the vector (so versions the client saw elsewhere stay superseded when they arrive)
    /// and adds the new sibling. Returns the new dot. On error the set is unchanged.
    pub fn update(
        &mut self,
        context: &VersionVector,
        actor: Actor,
        value: Option<Vec<u8>>,
        timestamp_ms: u64,
        max_siblings: Option<usize>,
    ) -> Result<Dot, UpdateError> {
        let new = NewVersion { value, timestamp_ms, expires_at_ms: None };
        self.update_with(context, actor, new, max_siblings)
    }

    /// [`Self::update`] with every property of the new sibling (its expiry too).
    pub fn update_with(
        &mut self,
        context: &VersionVector,
        actor: Actor,
        new: NewVersion,
        max_siblings: Option<usize>,
    ) -> Result<Dot, UpdateError> {
        let NewVersion { value, timestamp_ms, expires_at_ms } = new;
        // A tombstone has nothing to expire (and the encoding keeps no expiry for it).
        let expires_at_ms = expires_at_ms.filter(|_| value.is_some());
        let seen = self.vector.get(actor).max(context.get(actor));
        let counter = seen.checked_add(1).filter(|c| *c <= MAX_COUNTER);
        let counter = counter.ok_or(UpdateError::CounterExhausted { actor })?;
        // Actors the write adds to the vector: the context's (distinct by construction) and the
        // coordinator's own, counted without allocating on every write.
        let unknown = |a: Actor| self.vector.get(a) == 0;
        let new_actors = context.entries().filter(|(a, _)| unknown(*a)).count()
            + usize::from(unknown(actor) && context.get(actor) == 0);
        let would_have = self.vector.len() + new_actors;
        if new_actors > 0 && would_have > MAX_ACTORS {
            return Err(UpdateError::TooManyActors { would_have });
        }
        let surviving = self.siblings.iter().filter(|s| !context.covers(s.dot)).count();
        if let Some(max_siblings) = max_siblings {
            let would_have = surviving + 1;
            if would_have > max_siblings {
                return Err(UpdateError::TooManySiblings { would_have, max_siblings });
            }
        }
        self.siblings.retain(|s| !context.covers(s.dot));
        self.vector.merge(context);
        let dot = Dot { actor, counter };
        debug_assert_eq!(counter, self.vector.get(actor) + 1);
        self.vector.raise(actor, dot.counter);
        // The new dot is above every dot of `actor` in the set, but other actors may sort after it.
        let at = self.siblings.partition_point(|s| s.dot < dot);
        self.siblings.insert(at, Sibling { dot, value, timestamp_ms, expires_at_ms });
        Ok(dot)
    }

    /// `Touch`: gives every sibling `context` covers that is live at `now_ms` the expiry
    /// `expires_at_ms` (`None`: never), without resending values. Each is re-written as a new sibling
    /// with a new dot (same value and write time) coordinated by `actor`, so replicas converge by the
    /// ordinary merge and two sets holding one dot still hold the same sibling; the covered
    /// originals, and covered tombstones and expired siblings, are superseded as by any write with
    /// that context. Siblings the context does not cover are untouched. Returns the new dots (none:
    /// nothing was live under the context, and the set is unchanged).
    pub fn touch(
        &mut self,
        context: &VersionVector,
        actor: Actor,
        expires_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Vec<Dot>, UpdateError> {
        let touched: Vec<Sibling> =
            self.siblings.iter().filter(|s| context.covers(s.dot) && s.is_live_at(now_ms)).cloned().collect();
        if touched.is_empty() {
            return Ok(Vec::new());
        }
        let mut next = self.clone();
        let mut dots = Vec::with_capacity(touched.len());
        for sibling in touched {
            let new = NewVersion { value: sibling.value, timestamp_ms: sibling.timestamp_ms, expires_at_ms };
            // Every re-write carries the client's context, which covers none of the new dots, so they
            // survive each other.
            dots.push(next.update_with(context, actor, new, None)?);
        }
        *self = next;
        Ok(dots)
    }

    /// The merge of two replicas' sets: the pointwise-max vector, and every sibling that the other side
    /// has not superseded (not covered by its vector, or present on both sides).
    pub fn merge(&self, other: &VersionSet) -> VersionSet {
        let mut siblings = Vec::with_capacity(self.siblings.len().max(other.siblings.len()));
        let (mut left, mut right) = (self.siblings.iter().peekable(), other.siblings.iter().peekable());
        loop {
            match (left.peek(), right.peek()) {
                (Some(l), Some(r)) if l.dot == r.dot => {
                    siblings.push((*l).clone());
                    left.next();
                    right.next();
                }
                (Some(l), Some(r)) if l.dot < r.dot => {
                    if !other.vector.covers(l.dot) {
                        siblings.push((*l).clone());
                    }
                    left.next();
                }
                (Some(_), Some(r)) => {
                    if !self.vector.covers(r.dot) {
                        siblings.push((*r).clone());
                    }
                    right.next();
                }
                (Some(l), None) => {
                    if !other.vector.covers(l.dot) {
                        siblings.push((*l).clone());
                    }
                    left.next();
                }
                (None, Some(r)) => {
                    if !self.vector.covers(r.dot) {
                        siblings.push((*r).clone());
                    }
                    right.next();
                }
                (None, None) => break,
            }
        }
        let mut vector = self.vector.clone();
        vector.merge(&other.vector);
        VersionSet { vector, siblings }
    }

    /// Merges `other` into `self`; returns whether `self` changed.
    pub fn merge_from(&mut self, other: &VersionSet) -> bool {
        if self.descends(other) {
            return false;
        }
        *self = self.merge(other);
        true
    }

    /// True when merging `other` into `self` would change nothing (`self.merge(other) == self`): `self`
    /// has seen all of `other`'s history, and `other` supersedes none of `self`'s siblings. A replica
    /// whose set does not descend the merged result of a read is behind and gets a read repair.
    pub fn descends(&self, other: &VersionSet) -> bool {
        // Given the vector condition every sibling of `other` is covered by `self.vector`, so `other`
        // can add nothing; what remains is whether `other` would drop one of ours.
        self.vector.descends(&other.vector)
            && self.siblings.iter().all(|mine| {
                !other.vector.covers(mine.dot)
                    || other.siblings.binary_search_by_key(&mine.dot, |s| s.dot).is_ok()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Actor = Actor(1);
    const B: Actor = Actor(2);

    fn value(set: &VersionSet) -> Vec<Vec<u8>> {
        set.live_values().iter().filter_map(|s| s.value.clone()).collect()
    }

    #[test]
    fn blind_writes_become_siblings() {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, None).unwrap();
        set.update(&VersionVector::new(), A, Some(b"y".to_vec()), 2, None).unwrap();
        assert_eq!(value(&set), vec![b"x".to_vec(), b"y".to_vec()]);
    }

    #[test]
    fn write_with_context_supersedes_what_was_seen() {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, None).unwrap();
        let seen = set.vector().clone();
        set.update(&VersionVector::new(), B, Some(b"concurrent".to_vec()), 2, None).unwrap();
        set.update(&seen, A, Some(b"z".to_vec()), 3, None).unwrap();
        assert_eq!(value(&set), vec![b"z".to_vec(), b"concurrent".to_vec()]);
    }

    #[test]
    fn context_from_another_replica_supersedes_late_arrivals() {
        // Replica 1 has (B,1) which the client saw via replica 2; replica 1 coordinates a write with that
        // context before (B,1) reaches it. When (B,1) arrives, it must stay superseded.
        let mut replica2 = VersionSet::new();
        replica2.update(&VersionVector::new(), B, Some(b"old".to_vec()), 1, None).unwrap();
        let mut replica1 = VersionSet::new();
        replica1.update(replica2.vector(), A, Some(b"new".to_vec()), 2, None).unwrap();
        let merged = replica1.merge(&replica2);
        assert_eq!(value(&merged), vec![b"new".to_vec()]);
    }

    #[test]
    fn sibling_cap_refuses_without_changing_the_set() {
        let mut set = VersionSet::new();
        for i in 0..3u8 {
            set.update(&VersionVector::new(), A, Some(vec![i]), 1, Some(3)).unwrap();
        }
        let before = set.clone();
        let err = set.update(&VersionVector::new(), A, Some(vec![9]), 1, Some(3)).unwrap_err();
        assert_eq!(err, UpdateError::TooManySiblings { would_have: 4, max_siblings: 3 });
        assert_eq!(err.reason(), "TOO_MANY_SIBLINGS");
        assert_eq!(set, before);
        // A write with a covering context is allowed: it replaces the siblings.
        let ctx = set.vector().clone();
        set.update(&ctx, A, Some(vec![9]), 1, Some(3)).unwrap();
        assert_eq!(set.siblings().len(), 1);
    }

    #[test]
    fn exhausted_counter_is_an_error_not_a_repeated_dot() {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, None).unwrap();
        let before = set.clone();
        // Contexts claiming A's counter at the maximum or beyond: the next dot does not exist.
        for claimed in [MAX_COUNTER, MAX_COUNTER + 1, u64::MAX] {
            let forged = VersionVector::from_entries([(A, claimed)]);
            let err = set.update(&forged, A, Some(b"y".to_vec()), 2, None).unwrap_err();
            assert_eq!(err, UpdateError::CounterExhausted { actor: A });
            assert_eq!(set, before, "a refused update leaves the set unchanged");
        }
        // One below the maximum still works and gives the last counter.
        let high = VersionVector::from_entries([(A, MAX_COUNTER - 1)]);
        let dot = set.update(&high, A, Some(b"z".to_vec()), 3, None).unwrap();
        assert_eq!(dot.counter, MAX_COUNTER);
    }

    #[test]
    fn invented_actors_cannot_grow_a_vector_past_the_bound() {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, None).unwrap();
        let before = set.clone();
        let invented = VersionVector::from_entries((1000..1000 + MAX_ACTORS as u64).map(|a| (Actor(a), 1)));
        let err = set.update(&invented, A, Some(b"y".to_vec()), 2, None).unwrap_err();
        assert_eq!(err, UpdateError::TooManyActors { would_have: MAX_ACTORS + 1 });
        assert_eq!(set, before);
        // Up to the bound is fine, and a vector at the bound keeps taking writes by known actors.
        let fits = VersionVector::from_entries((1000..1000 + MAX_ACTORS as u64 - 1).map(|a| (Actor(a), 1)));
        set.update(&fits, A, Some(b"y".to_vec()), 2, None).unwrap();
        assert_eq!(set.vector().len(), MAX_ACTORS);
        let context = set.vector().clone();
        set.update(&context, A, Some(b"z".to_vec()), 3, None).unwrap();
        assert!(set.update(&VersionVector::new(), B, Some(b"w".to_vec()), 4, None).is_err());
    }

    #[test]
    fn identical_values_are_returned_once() {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), A, Some(b"same".to_vec()), 1, None).unwrap();
        set.update(&VersionVector::new(), B, Some(b"same".to_vec()), 2, None).unwrap();
        assert_eq!(set.siblings().len(), 2);
        let live = set.live_values();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].dot, Dot { actor: B, counter: 1 });
    }

    #[test]
    fn tombstone_with_covering_context_hides_the_value() {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), A, Some(b"x".to_vec()), 1, None).unwrap();
        let ctx = set.vector().clone();
        set.update(&ctx, B, None, 2, None).unwrap();
        assert!(set.is_deleted());
        assert!(set.live_values().is_empty());
        assert!(!set.is_empty());
    }

    #[test]
    fn lww_picks_highest_timestamp_then_dot() {
        let mut set = VersionSet::new();
        set.update(&VersionVector::new(), A, Some(b"late".to_vec()), 20, None).unwrap();
        set.update(&VersionVector::new(), B, Some(b"early".to_vec()), 10, None).unwrap();
        assert_eq!(set.lww_winner().unwrap().value.as_deref(), Some(&b"late"[..]));
        set.update(&VersionVector::new(), B, Some(b"tie".to_vec()), 20, None).unwrap();
        // Tie on timestamp: (B, 2) has the higher counter.
        assert_eq!(set.lww_winner().unwrap().value.as_deref(), Some(&b"tie"[..]));
    }

    fn expiring(value: &[u8], timestamp_ms: u64, expires_at_ms: u64) -> NewVersion {
        NewVersion { value: Some(value.to_vec()), timestamp_ms, expires_at_ms: Some(expires_at_ms) }
    }

    #[test]
    fn expired_siblings_are_hidden_and_superseded_like_tombstones() {
        let mut set = VersionSet::new();
        set.update_with(&VersionVector::new(), A, expiring(b"session", 10, 100), None).unwrap();
        set.update(&VersionVector::new(), B, Some(b"forever".to_vec()), 20, None).unwrap();
        let live = |set: &VersionSet, now| -> Vec<Vec<u8>> {
            set.live_values_at(now).iter().filter_map(|s| s.value.clone()).collect()
        };
        assert_eq!(live(&set, 99), vec![b"session".to_vec(), b"forever".to_vec()]);
        assert_eq!(live(&set, 100), vec![b"forever".to_vec()], "expired at exactly expires_at");
        assert_eq!(set.dead_since_ms(), None, "a value that never expires keeps the record alive");
        // Expiry changes nothing in the set: a read at 150 and one at 50 see the same vector and a
        // write with that context supersedes the expired sibling (and the other one it saw).
        let context = set.vector().clone();
        set.update(&context, A, Some(b"new".to_vec()), 150, None).unwrap();
        assert_eq!(set.siblings().len(), 1);
        assert!(!set.is_dead_at(150));
    }

    #[test]
    fn a_record_is_dead_from_its_newest_expiry_or_tombstone() {
        let mut set = VersionSet::new();
        set.update_with(&VersionVector::new(), A, expiring(b"a", 10, 100), None).unwrap();
        set.update_with(&VersionVector::new(), B, expiring(b"b", 20, 300), None).unwrap();
        set.update(&VersionVector::new(), B, None, 400, None).unwrap();
        assert_eq!(set.dead_since_ms(), Some(400));
        assert!(!set.is_dead_at(299));
        assert!(set.is_dead_at(300));
        assert!(!set.is_deleted(), "structurally it still holds values");
    }

    #[test]
    fn touch_re_stamps_exactly_the_live_siblings_the_context_names() {
        let mut set = VersionSet::new();
        set.update_with(&VersionVector::new(), A, expiring(b"one", 10, 100), None).unwrap();
        set.update_with(&VersionVector::new(), A, expiring(b"two", 11, 100), None).unwrap();
        let named = set.vector().clone();
        // A concurrent write the toucher never saw keeps its own expiry.
        set.update_with(&VersionVector::new(), B, expiring(b"unseen", 12, 90), None).unwrap();
        let before = set.clone();
        let dots = set.touch(&named, A, Some(1_000), 50).unwrap();
        assert_eq!(dots.len(), 2);
        let expiries: Vec<(Vec<u8>, Option<u64>)> =
            set.siblings().iter().map(|s| (s.value.clone().unwrap(), s.expires_at_ms)).collect();
        assert_eq!(expiries.len(), 3, "{expiries:?}");
        assert!(expiries.contains(&(b"one".to_vec(), Some(1_000))));
        assert!(expiries.contains(&(b"two".to_vec(), Some(1_000))));
        assert!(expiries.contains(&(b"unseen".to_vec(), Some(90))));
        // Replicas that missed the touch converge to it by the ordinary merge.
        assert_eq!(before.merge(&set), set);
        assert_eq!(set.merge(&before), set);
        // Nothing live under the context (expired by now): nothing is touched, nothing changes.
        let mut expired = VersionSet::new();
        expired.update_with(&VersionVector::new(), A, expiring(b"gone", 1, 5), None).unwrap();
        let unchanged = expired.clone();
        assert!(expired.touch(&expired.vector().clone(), A, None, 10).unwrap().is_empty());
        assert_eq!(expired, unchanged);
    }

    #[test]
    fn older_set_does_not_roll_back_newer() {
        let mut older = VersionSet::new();
        older.update(&VersionVector::new(), A, Some(b"v1".to_vec()), 1, None).unwrap();
        let mut newer = older.clone();
        let ctx = newer.vector().clone();
        newer.update(&ctx, A, Some(b"v2".to_vec()), 2, None).unwrap();
        let mut replica = newer.clone();
        assert!(!replica.merge_from(&older));
        assert_eq!(replica, newer);
        assert!(newer.descends(&older));
        assert!(!older.descends(&newer));
    }
}
