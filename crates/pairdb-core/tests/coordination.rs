//! Coordination state-machine tests: exact W, "not found" as a read answer, outcome-unknown timeouts,
//! hinted handoff, strict quorum, and read-repair targeting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use pairdb_core::coordination::{
    FailureCause, ReadAnswer, ReadCoordinator, ReadEffect, ReadInput, ReadPlan, ReadReply, ReadTransport,
    Refusal, ReplicaFailure, WriteCoordinator, WriteEffect, WriteInput, WritePlan, WriteReply,
    WriteTransport,
};
use pairdb_core::dvv::{Actor, VersionSet, VersionVector};
use pairdb_core::reason::Reason;
use pairdb_core::ring::NodeId;

const N1: NodeId = NodeId(1);
const N2: NodeId = NodeId(2);
const N3: NodeId = NodeId(3);
const F4: NodeId = NodeId(4);
const F5: NodeId = NodeId(5);

fn write_plan(required: usize) -> WritePlan {
    WritePlan {
        preference: vec![N1, N2, N3],
        fallbacks: vec![F4, F5],
        pending_owners: vec![],
        required,
        strict_quorum: false,
        suspects: BTreeSet::new(),
        slow: BTreeSet::new(),
        deadline_ms: 1000,
    }
}

fn replies(effects: &[WriteEffect<()>]) -> Vec<&WriteReply<()>> {
    effects
        .iter()
        .filter_map(|e| match e {
            WriteEffect::Reply(reply) => Some(reply),
            _ => None,
        })
        .collect()
}

#[test]
fn write_replies_at_exactly_w_acks() {
    for required in 1..=3 {
        let mut write = WriteCoordinator::<()>::new(write_plan(required));
        assert_eq!(write.start(0), vec![WriteEffect::Coordinate { node: N1 }]);
        let effects = write.on_coordinated(N1, (), 1);
        assert!(effects.contains(&WriteEffect::Replicate { node: N2, hint_for: None, set: () }));
        assert!(effects.contains(&WriteEffect::Replicate { node: N3, hint_for: None, set: () }));
        let mut all = effects;
        all.extend(write.on_replicated(N2, 2));
        let after_two = replies(&all).len();
        all.extend(write.on_replicated(N3, 3));
        let acked_at: Vec<_> = replies(&all)
            .into_iter()
            .map(|r| match r {
                WriteReply::Acked { acks, .. } => *acks,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        // Exactly one reply, sent at the moment the W-th ack arrived.
        assert_eq!(acked_at, vec![required], "W={required}");
        assert_eq!(after_two, usize::from(required <= 2));
        assert!(write.is_finished());
    }
}

#[test]
fn write_timeout_with_fewer_than_w_acks_is_outcome_unknown() {
    let mut write = WriteCoordinator::<()>::new(write_plan(2));
    write.start(0);
    write.on_coordinated(N1, (), 1);
    assert_eq!(write.next_timeout_ms(), Some(1000));
    assert!(write.on_tick(999).is_empty());
    let effects = write.on_tick(1000);
    assert_eq!(
        effects,
        vec![WriteEffect::Reply(WriteReply::QuorumNotReached {
            acks: 1,
            hinted_acks: 0,
            required: 2,
            failures: vec![],
        })]
    );
    assert!(write.is_finished());
    // Late answers change nothing.
    assert!(write.on_replicated(N2, 1001).is_empty());
}

#[test]
fn failed_coordinator_is_replaced_by_the_next_replica_and_hinted() {
    let mut write = WriteCoordinator::<()>::new(write_plan(3));
    write.start(0);
    let effects = write.on_coordinate_failed(N1, FailureCause::NotApplied, 5);
    assert_eq!(effects, vec![WriteEffect::Coordinate { node: N2 }]);
    let effects = write.on_coordinated(N2, (), 6);
    // N1 failed as coordinator: a fallback keeps its copy as a hint.
    assert!(effects.contains(&WriteEffect::Replicate { node: N3, hint_for: None, set: () }));
    assert!(effects.contains(&WriteEffect::Replicate { node: F4, hint_for: Some(N1), set: () }));
    write.on_replicated(N3, 7);
    let effects = write.on_replicated(F4, 8);
    assert_eq!(replies(&effects), vec![&WriteReply::Acked { set: (), acks: 2, hinted_acks: 1, required: 3 }]);
}

/// A coordinate call that may have been applied (timeout, or an error after the request left) is never
/// followed by a second coordinator: that would mint a second dot for one client write, and a delete
/// carrying the acknowledged dot's context would leave the twin behind. The write ends at once,
/// outcome unknown, whatever the deadline.
#[test]
fn ambiguous_coordinator_failure_ends_the_write_without_failover() {
    for cause in [FailureCause::Timeout, FailureCause::Error] {
        let mut write = WriteCoordinator::<()>::new(write_plan(2));
        write.start(0);
        let effects = write.on_coordinate_failed(N1, cause, 5);
        assert_eq!(
            effects,
            vec![WriteEffect::Reply(WriteReply::QuorumNotReached {
                acks: 0,
                hinted_acks: 0,
                required: 2,
                failures: vec![ReplicaFailure { node: N1, cause }],
            })],
            "{cause:?}"
        );
        assert!(write.is_finished());
        assert_eq!(write.ambiguous_coordinator(), Some(N1));
        // A late success from N1 changes nothing: the client was told the outcome is unknown.
        assert!(write.on_coordinated(N1, (), 6).is_empty());
        assert!(write.on_tick(1000).is_empty());
    }
    // A definite refusal still fails over, and the failed node is not ambiguous.
    let mut write = WriteCoordinator::<()>::new(write_plan(2));
    write.start(0);
    let effects = write.on_coordinate_failed(N1, FailureCause::NotApplied, 5);
    assert_eq!(effects, vec![WriteEffect::Coordinate { node: N2 }]);
    assert_eq!(write.ambiguous_coordinator(), None);
    // ...and the second coordinator may fail ambiguously too: then it stops there.
    let effects = write.on_coordinate_failed(N2, FailureCause::Timeout, 6);
    assert!(matches!(replies(&effects).as_slice(), [WriteReply::QuorumNotReached { acks: 0, .. }]));
    assert_eq!(write.ambiguous_coordinator(), Some(N2));
}

#[test]
fn suspect_replicas_are_skipped_and_strict_quorum_ignores_hints() {
    let mut plan = write_plan(3);
    plan.suspects = BTreeSet::from([N1]);
    plan.strict_quorum = true;
    let mut write = WriteCoordinator::<()>::new(plan);
    assert_eq!(write.start(0), vec![WriteEffect::Coordinate { node: N2 }]);
    let effects = write.on_coordinated(N2, (), 1);
    assert!(effects.contains(&WriteEffect::Replicate { node: F4, hint_for: Some(N1), set: () }));
    write.on_replicated(N3, 2);
    let effects = write.on_replicated(F4, 3);
    assert_eq!(
        replies(&effects),
        vec![&WriteReply::QuorumNotReached { acks: 2, hinted_acks: 1, required: 3, failures: vec![] }]
    );
    assert!(write.is_finished());
}

#[test]
fn slow_replicas_coordinate_after_the_prompt_ones_and_before_suspects() {
    let mut plan = write_plan(2);
    plan.slow = BTreeSet::from([N1]);
    let mut write = WriteCoordinator::<()>::new(plan);
    assert_eq!(write.start(0), vec![WriteEffect::Coordinate { node: N2 }]);
    // A slow node still receives the set and its acknowledgement counts.
    let effects = write.on_coordinated(N2, (), 1);
    assert!(effects.contains(&WriteEffect::Replicate { node: N1, hint_for: None, set: () }));
    assert!(effects.contains(&WriteEffect::Replicate { node: N3, hint_for: None, set: () }));
    let effects = write.on_replicated(N1, 2);
    assert!(matches!(replies(&effects).as_slice(), [WriteReply::Acked { acks: 2, .. }]));

    // Order among candidates: prompt, then slow (in list order), then suspects.
    let mut plan = write_plan(2);
    plan.slow = BTreeSet::from([N1, N2]);
    plan.suspects = BTreeSet::from([N3]);
    let mut write = WriteCoordinator::<()>::new(plan);
    assert_eq!(write.start(0), vec![WriteEffect::Coordinate { node: N1 }]);
    let effects = write.on_coordinate_failed(N1, FailureCause::NotApplied, 1);
    assert_eq!(effects, vec![WriteEffect::Coordinate { node: N2 }]);
    let effects = write.on_coordinate_failed(N2, FailureCause::NotApplied, 2);
    assert_eq!(effects, vec![WriteEffect::Coordinate { node: N3 }]);
}

#[test]
fn failing_replica_walks_the_fallbacks_then_reports_each_cause() {
    let mut write = WriteCoordinator::<()>::new(write_plan(3));
    write.start(0);
    write.on_coordinated(N1, (), 1);
    write.on_replicated(N2, 2);
    let effects = write.on_replicate_failed(N3, FailureCause::Timeout, 3);
    assert_eq!(effects, vec![WriteEffect::Replicate { node: F4, hint_for: Some(N3), set: () }]);
    let effects = write.on_replicate_failed(F4, FailureCause::Error, 4);
    assert_eq!(effects, vec![WriteEffect::Replicate { node: F5, hint_for: Some(N3), set: () }]);
    let effects = write.on_replicate_failed(F5, FailureCause::Error, 5);
    match replies(&effects).as_slice() {
        [WriteReply::QuorumNotReached { acks: 2, required: 3, failures, .. }] => {
            let causes: Vec<_> = failures.iter().map(|f| (f.node, f.cause)).collect();
            assert_eq!(
                causes,
                vec![
                    (N3, FailureCause::Timeout),
                    (F4, FailureCause::Error),
                    (F5, FailureCause::Error),
                    (N3, FailureCause::NoFallback),
                ]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn pending_owners_receive_the_write_without_counting() {
    let mut plan = write_plan(3);
    plan.pending_owners = vec![N2, NodeId(9)];
    let mut write = WriteCoordinator::<()>::new(plan);
    write.start(0);
    let effects = write.on_coordinated(N1, (), 1);
    assert!(effects.contains(&WriteEffect::Replicate { node: NodeId(9), hint_for: None, set: () }));
    write.on_replicated(NodeId(9), 2);
    write.on_replicated(N2, 3);
    assert_eq!(write.counted_acks(), 2);
    let effects = write.on_replicated(N3, 4);
    assert_eq!(replies(&effects), vec![&WriteReply::Acked { set: (), acks: 3, hinted_acks: 0, required: 3 }]);
}

#[test]
fn every_coordinator_failing_fails_the_write() {
    let mut write = WriteCoordinator::<()>::new(write_plan(1));
    write.start(0);
    write.on_coordinate_failed(N1, FailureCause::NotApplied, 1);
    write.on_coordinate_failed(N2, FailureCause::NotApplied, 2);
    let effects = write.on_coordinate_failed(N3, FailureCause::NotApplied, 3);
    assert!(matches!(
        replies(&effects).as_slice(),
        [WriteReply::QuorumNotReached { acks: 0, required: 1, .. }]
    ));
}

fn read_plan(required: usize) -> ReadPlan {
    ReadPlan {
        replicas: vec![N1, N2, N3],
        required,
        suspects: BTreeSet::new(),
        speculative_after_ms: 50,
        deadline_ms: 1000,
    }
}

fn set(values: &[(u64, &[u8])]) -> VersionSet {
    let mut set = VersionSet::new();
    for (actor, value) in values {
        set.update(&VersionVector::new(), Actor(*actor), Some(value.to_vec()), 1, None).unwrap();
    }
    set
}

fn read_replies(effects: &[ReadEffect]) -> Vec<&ReadReply> {
    effects
        .iter()
        .filter_map(|e| match e {
            ReadEffect::Reply(reply) => Some(reply),
            _ => None,
        })
        .collect()
}

fn repairs(effects: &[ReadEffect]) -> BTreeSet<NodeId> {
    effects
        .iter()
        .filter_map(|e| match e {
            ReadEffect::Repair { node, .. } => Some(*node),
            _ => None,
        })
        .collect()
}

#[test]
fn read_asks_r_replicas_first_and_not_found_counts_as_an_answer() {
    let mut read = ReadCoordinator::new(read_plan(2));
    assert_eq!(read.start(0), vec![ReadEffect::Fetch { node: N1 }, ReadEffect::Fetch { node: N2 }]);
    let effects = read.on_answer(N1, ReadAnswer::NotFound, 1);
    // A miss asks the remaining replica too.
    assert_eq!(effects, vec![ReadEffect::Fetch { node: N3 }]);
    let effects = read.on_answer(N2, ReadAnswer::NotFound, 2);
    assert_eq!(read_replies(&effects), vec![&ReadReply::Answered { merged: None, answered: 2 }]);
    let effects = read.on_answer(N3, ReadAnswer::NotFound, 3);
    assert!(effects.is_empty());
    assert!(read.is_finished());
}

#[test]
fn agreeing_answers_reply_at_r_without_asking_more() {
    let value = set(&[(1, b"v")]);
    let mut read = ReadCoordinator::new(read_plan(2));
    read.start(0);
    assert!(read.on_answer(N1, ReadAnswer::Found(value.clone()), 1).is_empty());
    let effects = read.on_answer(N2, ReadAnswer::Found(value.clone()), 2);
    assert_eq!(effects, vec![ReadEffect::Reply(ReadReply::Answered { merged: Some(value), answered: 2 })]);
    assert!(read.is_finished());
}

#[test]
fn read_repair_targets_only_replicas_behind_the_merge() {
    let old = set(&[(1, b"old")]);
    let mut new = old.clone();
    let context = new.vector().clone();
    new.update(&context, Actor(1), Some(b"new".to_vec()), 2, None).unwrap();

    let mut read = ReadCoordinator::new(read_plan(3));
    read.start(0);
    let mut effects = read.on_answer(N1, ReadAnswer::Found(new.clone()), 1);
    effects.extend(read.on_answer(N2, ReadAnswer::Found(old), 2));
    effects.extend(read.on_answer(N3, ReadAnswer::NotFound, 3));
    assert_eq!(read_replies(&effects), vec![&ReadReply::Answered { merged: Some(new), answered: 3 }]);
    assert_eq!(repairs(&effects), BTreeSet::from([N2, N3]));
}

#[test]
fn concurrent_answers_merge_into_siblings_and_both_sides_are_repaired() {
    let left = set(&[(1, b"a")]);
    let right = set(&[(2, b"b")]);
    let mut read = ReadCoordinator::new(read_plan(2));
    read.start(0);
    read.on_answer(N1, ReadAnswer::Found(left.clone()), 1);
    // Disagreement asks N3 as well; the reply still goes out at R = 2.
    let effects = read.on_answer(N2, ReadAnswer::Found(right.clone()), 2);
    assert!(effects.contains(&ReadEffect::Fetch { node: N3 }));
    let merged = left.merge(&right);
    assert_eq!(
        read_replies(&effects),
        vec![&ReadReply::Answered { merged: Some(merged.clone()), answered: 2 }]
    );
    let effects = read.on_answer(N3, ReadAnswer::Found(merged), 3);
    assert_eq!(repairs(&effects), BTreeSet::from([N1, N2]));
}

#[test]
fn slow_replicas_trigger_the_rest_and_the_deadline_fails_the_read() {
    let mut read = ReadCoordinator::new(read_plan(2));
    read.start(0);
    assert_eq!(read.next_timeout_ms(), Some(50));
    assert_eq!(read.on_tick(50), vec![ReadEffect::Fetch { node: N3 }]);
    read.on_answer(N3, ReadAnswer::Found(set(&[(1, b"v")])), 60);
    let effects = read.on_tick(1000);
    assert!(matches!(
        read_replies(&effects).as_slice(),
        [ReadReply::QuorumNotReached { answered: 1, required: 2, .. }]
    ));
    assert!(read.is_finished());
}

#[test]
fn failures_leave_quorum_unreached_when_too_few_can_answer() {
    let mut read = ReadCoordinator::new(read_plan(2));
    read.start(0);
    let effects = read.on_answer(N1, ReadAnswer::Failed(FailureCause::Error), 1);
    assert_eq!(effects, vec![ReadEffect::Fetch { node: N3 }]);
    read.on_answer(N2, ReadAnswer::Failed(FailureCause::Timeout), 2);
    let effects = read.on_answer(N3, ReadAnswer::NotFound, 3);
    assert!(matches!(
        read_replies(&effects).as_slice(),
        [ReadReply::QuorumNotReached { answered: 1, required: 2, failures }] if failures.len() == 2
    ));
}

#[test]
fn suspects_are_asked_last() {
    let mut plan = read_plan(1);
    plan.suspects = BTreeSet::from([N1]);
    let mut read = ReadCoordinator::new(plan);
    assert_eq!(read.start(0), vec![ReadEffect::Fetch { node: N2 }]);
}

#[test]
fn without_a_distinct_fallback_the_coordinator_keeps_the_hint() {
    // Three nodes, N = 3: every node is a replica, so nobody else can stand in for N3.
    let mut plan = write_plan(2);
    plan.fallbacks = vec![];
    plan.suspects = BTreeSet::from([N3]);
    let mut write = WriteCoordinator::<()>::new(plan);
    write.start(0);
    let effects = write.on_coordinated(N1, (), 1);
    assert!(effects.contains(&WriteEffect::Replicate { node: N2, hint_for: None, set: () }));
    assert!(effects.contains(&WriteEffect::StoreHint { node: N1, hint_for: N3, set: () }));
    let effects = write.on_replicated(N2, 2);
    assert_eq!(replies(&effects), vec![&WriteReply::Acked { set: (), acks: 2, hinted_acks: 0, required: 2 }]);
}

/// The full-ack tombstone GC path trusts `every_owner_acked`: it must hold only once all N owners
/// acknowledged directly, never with a hint standing in, a failure, or a migration adding owners.
#[test]
fn every_owner_acked_only_when_all_n_owners_hold_the_set_themselves() {
    // All three owners ack (the reply goes out at W = 2; the answer waits for the third).
    let mut write = WriteCoordinator::<()>::new(write_plan(2));
    write.start(0);
    write.on_coordinated(N1, (), 1);
    write.on_replicated(N2, 2);
    assert!(!write.every_owner_acked(), "N3 has not answered yet");
    write.on_replicated(N3, 3);
    assert!(write.every_owner_acked());
    assert_eq!(write.owners(), &[N1, N2, N3]);

    // N3 fails and fallback F4 keeps a hint for it: W is reached, but not every owner holds it.
    let mut write = WriteCoordinator::<()>::new(write_plan(2));
    write.start(0);
    write.on_coordinated(N1, (), 1);
    write.on_replicated(N2, 2);
    let effects = write.on_replicate_failed(N3, FailureCause::Error, 3);
    assert!(effects.contains(&WriteEffect::Replicate { node: F4, hint_for: Some(N3), set: () }));
    write.on_replicated(F4, 4);
    assert!(write.is_finished());
    assert!(!write.every_owner_acked());

    // The first owner fails to coordinate: N2 coordinates, N1 gets a hint via a fallback.
    let mut write = WriteCoordinator::<()>::new(write_plan(2));
    write.start(0);
    write.on_coordinate_failed(N1, FailureCause::NotApplied, 1);
    write.on_coordinated(N2, (), 2);
    write.on_replicated(N3, 3);
    write.on_replicated(F4, 4);
    assert!(write.is_finished());
    assert!(!write.every_owner_acked());

    // A migration adds an owner: even with every ack in, the new owner's copy is not counted.
    let mut plan = write_plan(3);
    plan.pending_owners = vec![NodeId(9)];
    let mut write = WriteCoordinator::<()>::new(plan);
    write.start(0);
    write.on_coordinated(N1, (), 1);
    for node in [N2, N3, NodeId(9)] {
        write.on_replicated(node, 2);
    }
    assert!(write.is_finished());
    assert!(!write.every_owner_acked());

    // The deadline passes with a reply out but a replica still silent.
    let mut write = WriteCoordinator::<()>::new(write_plan(2));
    write.start(0);
    write.on_coordinated(N1, (), 1);
    write.on_replicated(N2, 2);
    write.on_tick(1000);
    assert!(write.is_finished());
    assert!(!write.every_owner_acked());
}

fn refusal() -> Refusal {
    Refusal { reason: Reason::TooManySiblings, message: "too many siblings".to_owned(), current: None }
}

#[test]
fn a_refused_coordinate_call_is_the_answer_and_no_other_coordinator_is_asked() {
    let mut write = WriteCoordinator::<()>::new(write_plan(2));
    assert_eq!(write.start(0), vec![WriteEffect::Coordinate { node: N1 }]);
    let effects = write.handle(WriteInput::Rejected { node: N1, refusal: refusal() }, 1);
    assert_eq!(effects, vec![WriteEffect::Reply(WriteReply::Rejected(refusal()))]);
    assert!(write.is_finished());
    // A late answer of the refusing node changes nothing.
    assert!(write.handle(WriteInput::Coordinated { node: N1, set: () }, 2).is_empty());
}

#[test]
fn replicate_effects_and_the_acknowledgement_carry_the_coordinated_set() {
    let mut write = WriteCoordinator::<&str>::new(write_plan(2));
    write.start(0);
    let effects = write.handle(WriteInput::Coordinated { node: N1, set: "set-of-n1" }, 1);
    assert!(effects.contains(&WriteEffect::Replicate { node: N2, hint_for: None, set: "set-of-n1" }));
    let effects = write.handle(WriteInput::Replicated { node: N2 }, 2);
    assert_eq!(
        effects,
        vec![WriteEffect::Reply(WriteReply::Acked {
            set: "set-of-n1",
            acks: 2,
            hinted_acks: 0,
            required: 2
        })]
    );
}

#[test]
fn a_read_whose_only_answers_are_refusals_replies_with_the_refusal() {
    let mut read = ReadCoordinator::new(read_plan(2));
    read.start(0);
    read.on_answer(N1, ReadAnswer::Refused(refusal()), 1);
    read.on_answer(N2, ReadAnswer::Refused(refusal()), 2);
    let effects = read.on_answer(N3, ReadAnswer::NotFound, 3);
    assert_eq!(read_replies(&effects), vec![&ReadReply::Rejected(refusal())]);
}

#[test]
fn a_read_with_r_answers_despite_a_refusal_answers() {
    let value = set(&[(1, b"v")]);
    let mut read = ReadCoordinator::new(read_plan(2));
    read.start(0);
    read.on_answer(N1, ReadAnswer::Refused(refusal()), 1);
    read.on_answer(N2, ReadAnswer::Found(value.clone()), 2);
    let effects = read.on_answer(N3, ReadAnswer::Found(value.clone()), 3);
    assert_eq!(read_replies(&effects), vec![&ReadReply::Answered { merged: Some(value), answered: 2 }]);
}

/// Records what a driven machine asked of its transport.
#[derive(Default)]
struct Recorder {
    calls: Vec<String>,
}

impl WriteTransport for Recorder {
    type Set = u32;
    fn coordinate(&mut self, node: NodeId) {
        self.calls.push(format!("coordinate {}", node.0));
    }
    fn replicate(&mut self, node: NodeId, hint_for: Option<NodeId>, set: u32) {
        self.calls.push(format!("replicate {} {hint_for:?} {set}", node.0));
    }
    fn store_hint(&mut self, node: NodeId, hint_for: NodeId, set: u32) {
        self.calls.push(format!("hint {} {} {set}", node.0, hint_for.0));
    }
    fn reply(&mut self, reply: WriteReply<u32>) {
        self.calls.push(format!("reply {reply:?}"));
    }
}

impl ReadTransport for Recorder {
    fn fetch(&mut self, node: NodeId) {
        self.calls.push(format!("fetch {}", node.0));
    }
    fn repair(&mut self, node: NodeId, set: VersionSet) {
        self.calls.push(format!("repair {} {}", node.0, set.siblings().len()));
    }
    fn reply(&mut self, reply: ReadReply) {
        self.calls.push(format!("reply {}", matches!(reply, ReadReply::Answered { .. })));
    }
}

#[test]
fn driving_carries_every_effect_out_through_the_transport_in_order() {
    let mut transport = Recorder::default();
    let mut write = WriteCoordinator::new(write_plan(3));
    write.drive_start(0, &mut transport);
    write.drive(WriteInput::Coordinated { node: N1, set: 7 }, 1, &mut transport);
    write.drive(WriteInput::ReplicateFailed { node: N3, cause: FailureCause::Error }, 2, &mut transport);
    write.drive(WriteInput::Replicated { node: N2 }, 3, &mut transport);
    write.drive(WriteInput::Replicated { node: F4 }, 4, &mut transport);
    assert_eq!(
        transport.calls,
        [
            "coordinate 1",
            "replicate 2 None 7",
            "replicate 3 None 7",
            "replicate 4 Some(NodeId(3)) 7",
            "reply Acked { set: 7, acks: 2, hinted_acks: 1, required: 3 }",
        ]
    );

    let mut transport = Recorder::default();
    let mut read = ReadCoordinator::new(read_plan(2));
    read.drive_start(0, &mut transport);
    read.drive(
        ReadInput::Answer { node: N1, answer: ReadAnswer::Found(set(&[(1, b"v")])) },
        1,
        &mut transport,
    );
    read.drive(ReadInput::Answer { node: N2, answer: ReadAnswer::NotFound }, 2, &mut transport);
    read.drive(
        ReadInput::Answer { node: N3, answer: ReadAnswer::Found(set(&[(1, b"v")])) },
        3,
        &mut transport,
    );
    assert_eq!(transport.calls, ["fetch 1", "fetch 2", "fetch 3", "reply true", "repair 2 1"]);
}
