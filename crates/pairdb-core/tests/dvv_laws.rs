//! Property tests of the DVVS laws (DESIGN §3): merge is commutative, associative and idempotent; an
//! update with context C removes exactly the siblings C covers; blind writes survive merges; encodings
//! round-trip; garbage never decodes into a context; sealed contexts open only for their binding.
//!
//! States are not generated independently: they come from one random history of updates and merges
//! across replicas (like a real cluster), because a dot names exactly one write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pairdb_core::context::{ContextBinding, ContextKey, ContextKeyRing, open_context, seal_context};
use pairdb_core::dvv::{Actor, MAX_COUNTER, NewVersion, VersionSet, VersionVector};
use pairdb_core::encoding::{decode_vector, decode_version_set, encode_vector, encode_version_set};
use proptest::prelude::*;

const REPLICAS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// A client write coordinated by `replica`, carrying the context of pool state `context_from`
    /// (`None` = blind write).
    Update { replica: usize, context_from: Option<usize>, value: u8, tombstone: bool },
    /// Replica `to` merges the current state of replica `from`.
    Merge { from: usize, to: usize },
    /// `Touch` coordinated by `replica` with the context of pool state `context_from`.
    Touch { replica: usize, context_from: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..REPLICAS, proptest::option::of(0usize..64), any::<u8>(), proptest::bool::weighted(0.15))
            .prop_map(|(replica, context_from, value, tombstone)| Op::Update {
                replica,
                context_from,
                value,
                tombstone
            }),
        (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Op::Merge { from, to }),
        (0..REPLICAS, 0usize..64).prop_map(|(replica, context_from)| Op::Touch { replica, context_from }),
    ]
}

/// Runs a history and returns every state any replica passed through.
fn run_history(ops: &[Op]) -> Vec<VersionSet> {
    let mut replicas = vec![VersionSet::new(); REPLICAS];
    let mut pool = vec![VersionSet::new()];
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Update { replica, context_from, value, tombstone } => {
                let context = context_from.map(|i| pool[i % pool.len()].vector().clone()).unwrap_or_default();
                // A third of the values expire a few steps later.
                let expires_at_ms = (value % 3 == 0).then_some(step as u64 + 5);
                let value = (!tombstone).then(|| vec![*value]);
                let new = NewVersion { value, timestamp_ms: step as u64, expires_at_ms };
                replicas[*replica].update_with(&context, Actor(*replica as u64 + 1), new, None).unwrap();
                pool.push(replicas[*replica].clone());
            }
            Op::Touch { replica, context_from } => {
                let context = pool[context_from % pool.len()].vector().clone();
                let expires_at_ms = Some(step as u64 + 10);
                replicas[*replica]
                    .touch(&context, Actor(*replica as u64 + 1), expires_at_ms, step as u64)
                    .unwrap();
                pool.push(replicas[*replica].clone());
            }
            Op::Merge { from, to } => {
                let source = replicas[*from].clone();
                replicas[*to].merge_from(&source);
                pool.push(replicas[*to].clone());
            }
        }
    }
    pool
}

fn history() -> impl Strategy<Value = Vec<VersionSet>> {
    proptest::collection::vec(op(), 1..40).prop_map(|ops| run_history(&ops))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative(pool in history(), i in any::<usize>(), j in any::<usize>()) {
        let (a, b) = (&pool[i % pool.len()], &pool[j % pool.len()]);
        prop_assert_eq!(a.merge(b), b.merge(a));
    }

    #[test]
    fn merge_is_associative(pool in history(), i in any::<usize>(), j in any::<usize>(), k in any::<usize>()) {
        let (a, b, c) = (&pool[i % pool.len()], &pool[j % pool.len()], &pool[k % pool.len()]);
        prop_assert_eq!(a.merge(b).merge(c), a.merge(&b.merge(c)));
    }

    #[test]
    fn merge_is_idempotent(pool in history(), i in any::<usize>(), j in any::<usize>()) {
        let (a, b) = (&pool[i % pool.len()], &pool[j % pool.len()]);
        prop_assert_eq!(&a.merge(a), a);
        let ab = a.merge(b);
        prop_assert_eq!(ab.merge(b), ab.clone());
    }

    #[test]
    fn descends_means_merge_changes_nothing(pool in history(), i in any::<usize>(), j in any::<usize>()) {
        let (a, b) = (&pool[i % pool.len()], &pool[j % pool.len()]);
        prop_assert_eq!(a.descends(b), &a.merge(b) == a);
        prop_assert!(a.merge(b).descends(a));
        prop_assert!(a.merge(b).descends(b));
    }

    #[test]
    fn update_removes_exactly_the_covered_siblings(
        pool in history(), i in any::<usize>(), c in any::<usize>(), actor in 1u64..=4,
    ) {
        let state = &pool[i % pool.len()];
        let context = pool[c % pool.len()].vector().clone();
        let mut updated = state.clone();
        let dot = updated.update(&context, Actor(actor), Some(b"new".to_vec()), 0, None).unwrap();
        let mut expected: Vec<_> =
            state.siblings().iter().filter(|s| !context.covers(s.dot)).map(|s| s.dot).collect();
        expected.push(dot);
        expected.sort();
        let actual: Vec<_> = updated.siblings().iter().map(|s| s.dot).collect();
        prop_assert_eq!(actual, expected);
        // The new dot is above everything the replica and the client had seen of this actor.
        prop_assert!(dot.counter > state.vector().get(Actor(actor)).max(context.get(Actor(actor))));
    }

    #[test]
    fn blind_writes_both_survive_merge(pool in history(), i in any::<usize>(), j in any::<usize>()) {
        let mut left = pool[i % pool.len()].clone();
        let mut right = pool[j % pool.len()].clone();
        // Two coordinators that each write from their own current state; actors outside the history so
        // that a stale pool state cannot reuse a counter (a real coordinator always writes on its latest
        // state).
        let d1 = left.update(&VersionVector::new(), Actor(10), Some(b"x".to_vec()), 1, None).unwrap();
        let d2 = right.update(&VersionVector::new(), Actor(11), Some(b"y".to_vec()), 2, None).unwrap();
        let merged = left.merge(&right);
        prop_assert!(merged.siblings().iter().any(|s| s.dot == d1));
        prop_assert!(merged.siblings().iter().any(|s| s.dot == d2));
    }

    #[test]
    fn version_set_encoding_round_trips(pool in history(), i in any::<usize>()) {
        let set = &pool[i % pool.len()];
        prop_assert_eq!(&decode_version_set(&encode_version_set(set)).unwrap(), set);
    }

    #[test]
    fn context_round_trips(entries in proptest::collection::vec((any::<u64>(), 1u64..=MAX_COUNTER), 0..12)) {
        let vector = VersionVector::from_entries(entries.into_iter().map(|(a, c)| (Actor(a), c)));
        prop_assert_eq!(decode_vector(&encode_vector(&vector)).unwrap(), vector);
    }

    #[test]
    fn random_bytes_never_decode_into_a_context(bytes in proptest::collection::vec(any::<u8>(), 1..200)) {
        prop_assert!(decode_vector(&bytes).is_err());
    }

    #[test]
    fn random_bytes_never_panic_the_version_set_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        // Either an error or a valid set that survives a round trip.
        if let Ok(set) = decode_version_set(&bytes) {
            prop_assert_eq!(decode_version_set(&encode_version_set(&set)).unwrap(), set);
        }
    }

    #[test]
    fn corrupted_contexts_are_rejected(
        entries in proptest::collection::vec((any::<u64>(), 1u64..1000), 1..6), flip in any::<usize>(), bit in 0u8..8,
    ) {
        let vector = VersionVector::from_entries(entries.into_iter().map(|(a, c)| (Actor(a), c)));
        let mut encoded = encode_vector(&vector);
        let at = flip % encoded.len();
        encoded[at] ^= 1 << bit;
        prop_assert!(decode_vector(&encoded).is_err());
    }

    #[test]
    fn sealed_contexts_round_trip_and_bind_tenant_and_key(
        entries in proptest::collection::vec((any::<u64>(), 1u64..=MAX_COUNTER), 0..12),
        tenant in "[a-z0-9]{1,8}", key in "\\PC{1,12}", other in "\\PC{1,12}", secret in any::<[u8; 32]>(),
    ) {
        let vector = VersionVector::from_entries(entries.into_iter().map(|(a, c)| (Actor(a), c)));
        let context_key = ContextKey::new(1, &secret).unwrap();
        let ring = ContextKeyRing::new(context_key.clone(), None);
        let binding = ContextBinding { tenant: &tenant, key: &key };
        let sealed = seal_context(&vector, binding, &context_key);
        prop_assert_eq!(open_context(&sealed, binding, &ring).unwrap(), vector);
        if other != key {
            let elsewhere = ContextBinding { tenant: &tenant, key: &other };
            prop_assert!(open_context(&sealed, elsewhere, &ring).is_err());
        }
    }

    #[test]
    fn random_bytes_never_open_as_a_context(bytes in proptest::collection::vec(any::<u8>(), 1..300)) {
        let ring = ContextKeyRing::new(ContextKey::new(1, &[7; 32]).unwrap(), None);
        let binding = ContextBinding { tenant: "t", key: "k" };
        prop_assert!(open_context(&bytes, binding, &ring).is_err());
    }
}
