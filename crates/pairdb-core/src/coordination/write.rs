//! The write path of DESIGN §4: the first live preference-list replica coordinates the DVVS update, the
//! resulting set is replicated to the other N−1 in parallel (a failed or suspect replica is replaced by
//! the next fallback, which keeps a hint), and the reply goes out at W acknowledgements.
//!
//! A write is one dot: the coordinator is replaced only when its call certainly had no effect
//! ([`FailureCause::NotApplied`]); after a timeout or an error that may have followed the apply, the
//! write ends with "outcome unknown" instead of minting a second dot elsewhere.

use std::collections::{BTreeMap, BTreeSet};

use super::{FailureCause, Refusal, ReplicaFailure};
use crate::ring::NodeId;

/// Everything the write needs to know up front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// The first N nodes of the partition's list in the current topology.
    pub preference: Vec<NodeId>,
    /// The rest of the list, in order: stand-ins that keep hints.
    pub fallbacks: Vec<NodeId>,
    /// Owners that only the pending topology of a running migration adds: they receive the set but their
    /// acknowledgements do not count (W is counted on the current set).
    pub pending_owners: Vec<NodeId>,
    /// W.
    pub required: usize,
    /// Count only preference-list acknowledgements.
    pub strict_quorum: bool,
    /// Nodes the caller's failure view considers down: they are tried last as coordinators and replaced
    /// by fallbacks right away as replication targets.
    pub suspects: BTreeSet<NodeId>,
    /// Live nodes that answer slowly right now (a call to them has been out longer than the caller's
    /// bound, e.g. while they flush or compact): tried as coordinators after the other live
    /// replicas, before suspects; still replication targets. Any owner may coordinate (each record
    /// mints under its own actor), so this order is a latency choice, never a correctness one.
    pub slow: BTreeSet<NodeId>,
    pub deadline_ms: u64,
}

/// What the driver must do next. `S` is the set the coordinator replica returned, opaque to the
/// machine (the router keeps it decoded and encoded; tests use `()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteEffect<S> {
    /// Ask `node` to apply the client's update as its actor and return the resulting set.
    Coordinate { node: NodeId },
    /// Send the resulting set to `node`; with `hint_for`, `node` keeps it as a hint for that owner.
    Replicate { node: NodeId, hint_for: Option<NodeId>, set: S },
    /// No distinct fallback is left to stand in for `hint_for` (small clusters: every node is already a
    /// replica), so the coordinator keeps a hint for it. Fire and forget: it counts toward nothing, it
    /// only makes sure the owner receives the write when it is back.
    StoreHint { node: NodeId, hint_for: NodeId, set: S },
    /// Answer the client. Emitted once.
    Reply(WriteReply<S>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteReply<S> {
    /// W replicas hold `set`, the coordinator's result.
    Acked { set: S, acks: usize, hinted_acks: usize, required: usize },
    /// Fewer than W acknowledgements: the outcome is unknown (some replicas may hold the value).
    QuorumNotReached { acks: usize, hinted_acks: usize, required: usize, failures: Vec<ReplicaFailure> },
    /// The coordinator refused the write for a reason any replica would give; nothing was applied.
    Rejected(Refusal),
}

/// What happened since the last input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteInput<S> {
    /// The coordinator applied the update and returned `set`.
    Coordinated {
        node: NodeId,
        set: S,
    },
    /// The coordinate call failed (see [`WriteCoordinator::on_coordinate_failed`]).
    CoordinateFailed {
        node: NodeId,
        cause: FailureCause,
    },
    /// The coordinator refused the write definitively ([`Refusal`]): that is the answer.
    Rejected {
        node: NodeId,
        refusal: Refusal,
    },
    Replicated {
        node: NodeId,
    },
    ReplicateFailed {
        node: NodeId,
        cause: FailureCause,
    },
    /// Time passed (the driver calls it at [`WriteCoordinator::next_timeout_ms`]).
    Tick,
}

/// The side of a write that reaches replicas and the client: the router's storage RPCs or the
/// simulation's messages. Calls must not block; their outcomes come back as [`WriteInput`]s.
pub trait WriteTransport {
    type Set: Clone;
    fn coordinate(&mut self, node: NodeId);
    fn replicate(&mut self, node: NodeId, hint_for: Option<NodeId>, set: Self::Set);
    fn store_hint(&mut self, node: NodeId, hint_for: NodeId, set: Self::Set);
    fn reply(&mut self, reply: WriteReply<Self::Set>);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Coordinating(NodeId),
    Replicating,
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outstanding {
    /// The owner this call stands for (itself when it is not a hint).
    owner: NodeId,
    hinted: bool,
    /// Whether an acknowledgement counts toward W (false for pending-topology owners).
    counted: bool,
}

/// State machine of one write. See the module docs of [`crate::coordination`] for its laws.
#[derive(Debug, Clone)]
pub struct WriteCoordinator<S> {
    plan: WritePlan,
    /// The coordinator's set, once a coordinate call returned it.
    set: Option<S>,
    candidates: Vec<NodeId>,
    next_candidate: usize,
    phase: Phase,
    coordinator: Option<NodeId>,
    outstanding: BTreeMap<NodeId, Outstanding>,
    /// Every node contacted in any role, so a fallback is never used twice.
    used: BTreeSet<NodeId>,
    acks: usize,
    hinted_acks: usize,
    failures: Vec<ReplicaFailure>,
    replied: bool,
    /// A coordinate call that failed but may have been applied; once set, no other coordinator is
    /// ever asked (one client write, at most one dot).
    ambiguous_coordinator: Option<NodeId>,
}

impl<S: Clone> WriteCoordinator<S> {
    pub fn new(plan: WritePlan) -> Self {
        // Live preference-list replicas first, in list order, the slow ones after the others;
        // suspects only as a last resort.
        let (live, suspect): (Vec<NodeId>, Vec<NodeId>) =
            plan.preference.iter().partition(|node| !plan.suspects.contains(node));
        let (prompt, slow): (Vec<NodeId>, Vec<NodeId>) =
            live.into_iter().partition(|node| !plan.slow.contains(node));
        let candidates: Vec<NodeId> = prompt.into_iter().chain(slow).chain(suspect).collect();
        debug_assert_eq!(candidates.len(), plan.preference.len(), "every owner is a candidate once");
        Self {
            plan,
            set: None,
            candidates,
            next_candidate: 0,
            phase: Phase::Replicating,
            coordinator: None,
            outstanding: BTreeMap::new(),
            used: BTreeSet::new(),
            acks: 0,
            hinted_acks: 0,
            failures: Vec::new(),
            replied: false,
            ambiguous_coordinator: None,
        }
    }

    /// Starts the write and carries out its first effects.
    pub fn drive_start<T: WriteTransport<Set = S>>(&mut self, now_ms: u64, transport: &mut T) {
        let effects = self.start(now_ms);
        Self::carry_out(effects, transport);
    }

    /// Feeds one input and carries out the effects through `transport`: the one loop the router and
    /// the simulation share.
    pub fn drive<T: WriteTransport<Set = S>>(
        &mut self,
        input: WriteInput<S>,
        now_ms: u64,
        transport: &mut T,
    ) {
        let was_finished = self.is_finished();
        let effects = self.handle(input, now_ms);
        debug_assert!(!was_finished || effects.is_empty(), "a finished write emits nothing");
        Self::carry_out(effects, transport);
    }

    fn carry_out<T: WriteTransport<Set = S>>(effects: Vec<WriteEffect<S>>, transport: &mut T) {
        for effect in effects {
            match effect {
                WriteEffect::Coordinate { node } => transport.coordinate(node),
                WriteEffect::Replicate { node, hint_for, set } => transport.replicate(node, hint_for, set),
                WriteEffect::StoreHint { node, hint_for, set } => transport.store_hint(node, hint_for, set),
                WriteEffect::Reply(reply) => transport.reply(reply),
            }
        }
    }

    /// The effects of one input.
    pub fn handle(&mut self, input: WriteInput<S>, now_ms: u64) -> Vec<WriteEffect<S>> {
        match input {
            WriteInput::Coordinated { node, set } => self.on_coordinated(node, set, now_ms),
            WriteInput::CoordinateFailed { node, cause } => self.on_coordinate_failed(node, cause, now_ms),
            WriteInput::Rejected { node, refusal } => self.on_rejected(node, refusal),
            WriteInput::Replicated { node } => self.on_replicated(node, now_ms),
            WriteInput::ReplicateFailed { node, cause } => self.on_replicate_failed(node, cause, now_ms),
            WriteInput::Tick => self.on_tick(now_ms),
        }
    }

    /// The first effects: contact a coordinator.
    pub fn start(&mut self, now_ms: u64) -> Vec<WriteEffect<S>> {
        let mut effects = Vec::new();
        self.try_next_coordinator(now_ms, &mut effects);
        effects
    }

    /// The coordinator applied the update and returned `set`.
    pub fn on_coordinated(&mut self, node: NodeId, set: S, now_ms: u64) -> Vec<WriteEffect<S>> {
        let mut effects = Vec::new();
        if self.phase != Phase::Coordinating(node) {
            return effects;
        }
        self.coordinator = Some(node);
        self.set = Some(set);
        self.phase = Phase::Replicating;
        self.acks += 1;
        let replicas: Vec<NodeId> = self.plan.preference.iter().copied().filter(|&n| n != node).collect();
        for owner in replicas {
            let failed_as_coordinator = self.failures.iter().any(|f| f.node == owner);
            if self.plan.suspects.contains(&owner) || failed_as_coordinator {
                self.replace_with_fallback(owner, true, &mut effects);
            } else {
                self.send_replicate(owner, owner, false, true, &mut effects);
            }
        }
        let pending: Vec<NodeId> = self
            .plan
            .pending_owners
            .iter()
            .copied()
            .filter(|n| !self.plan.preference.contains(n) && *n != node)
            .collect();
        for owner in pending {
            if self.plan.suspects.contains(&owner) {
                self.replace_with_fallback(owner, false, &mut effects);
            } else {
                self.send_replicate(owner, owner, false, false, &mut effects);
            }
        }
        self.check_progress(now_ms, &mut effects);
        effects
    }

    /// The coordinate call failed. When it certainly had no effect ([`FailureCause::NotApplied`]) the
    /// next preference replica is tried; otherwise the node may hold the write under its own dot, and
    /// a second coordinator would mint a second dot for the same client write (a twin that a context
    /// naming the acknowledged dot would not cover, so it could outlive an acknowledged delete). The
    /// write then ends at once with `QuorumNotReached`: its outcome is unknown.
    pub fn on_coordinate_failed(
        &mut self,
        node: NodeId,
        cause: FailureCause,
        now_ms: u64,
    ) -> Vec<WriteEffect<S>> {
        let mut effects = Vec::new();
        if self.phase != Phase::Coordinating(node) {
            return effects;
        }
        self.failures.push(ReplicaFailure { node, cause });
        if cause.may_have_applied() {
            self.ambiguous_coordinator = Some(node);
            self.phase = Phase::Finished;
            self.reply_failure(&mut effects);
            return effects;
        }
        self.try_next_coordinator(now_ms, &mut effects);
        effects
    }

    /// The coordinator refused the write for a reason every replica would give: the write ends with
    /// that refusal as its answer (nothing was applied, so no other coordinator is asked).
    pub fn on_rejected(&mut self, node: NodeId, refusal: Refusal) -> Vec<WriteEffect<S>> {
        let mut effects = Vec::new();
        if self.phase != Phase::Coordinating(node) {
            return effects;
        }
        self.phase = Phase::Finished;
        if !self.replied {
            self.replied = true;
            effects.push(WriteEffect::Reply(WriteReply::Rejected(refusal)));
        }
        effects
    }

    /// The node whose coordinate call may have been applied although it failed (the write's outcome
    /// is unknown), if any.
    pub fn ambiguous_coordinator(&self) -> Option<NodeId> {
        self.ambiguous_coordinator
    }

    /// A replicate call succeeded.
    pub fn on_replicated(&mut self, node: NodeId, now_ms: u64) -> Vec<WriteEffect<S>> {
        let mut effects = Vec::new();
        if let Some(call) = self.outstanding.remove(&node) {
            if call.counted {
                if call.hinted {
                    self.hinted_acks += 1;
                } else {
                    self.acks += 1;
                }
            }
            self.check_progress(now_ms, &mut effects);
        }
        effects
    }

    /// A replicate call failed: the next fallback stands in for the same owner.
    pub fn on_replicate_failed(
        &mut self,
        node: NodeId,
        cause: FailureCause,
        now_ms: u64,
    ) -> Vec<WriteEffect<S>> {
        let mut effects = Vec::new();
        if let Some(call) = self.outstanding.remove(&node) {
            self.failures.push(ReplicaFailure { node, cause });
            if now_ms < self.plan.deadline_ms && !self.is_finished() {
                self.replace_with_fallback(call.owner, call.counted, &mut effects);
            }
            self.check_progress(now_ms, &mut effects);
        }
        effects
    }

    /// Time passed: replies QuorumNotReached once the deadline is reached without W acks.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<WriteEffect<S>> {
        let mut effects = Vec::new();
        if now_ms >= self.plan.deadline_ms && self.phase != Phase::Finished {
            self.phase = Phase::Finished;
            self.outstanding.clear();
            self.reply_failure(&mut effects);
        }
        effects
    }

    /// The time at which [`Self::on_tick`] must be called next, if any.
    pub fn next_timeout_ms(&self) -> Option<u64> {
        (self.phase != Phase::Finished).then_some(self.plan.deadline_ms)
    }

    /// No call is outstanding and the reply was sent: the router can drop this request.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    pub fn coordinator(&self) -> Option<NodeId> {
        self.coordinator
    }

    /// The set the coordinator returned, once it did.
    pub fn coordinated_set(&self) -> Option<&S> {
        self.set.as_ref()
    }

    /// The write is over and every preference-list owner acknowledged the set itself (no hint stood
    /// in, none failed) while no migration was adding owners: all N replicas hold it. A tombstone
    /// written so may be collected after its grace period without waiting for anti-entropy.
    pub fn every_owner_acked(&self) -> bool {
        self.is_finished() && self.plan.pending_owners.is_empty() && self.acks == self.plan.preference.len()
    }

    /// The preference-list owners (the first N of the partition's list).
    pub fn owners(&self) -> &[NodeId] {
        &self.plan.preference
    }

    pub fn counted_acks(&self) -> usize {
        if self.plan.strict_quorum { self.acks } else { self.acks + self.hinted_acks }
    }

    fn try_next_coordinator(&mut self, now_ms: u64, effects: &mut Vec<WriteEffect<S>>) {
        debug_assert!(
            self.ambiguous_coordinator.is_none(),
            "a write whose coordinate call may have been applied must not be coordinated again"
        );
        if now_ms >= self.plan.deadline_ms {
            self.phase = Phase::Finished;
            self.reply_failure(effects);
            return;
        }
        match self.candidates.get(self.next_candidate).copied() {
            Some(node) => {
                self.next_candidate += 1;
                self.used.insert(node);
                self.phase = Phase::Coordinating(node);
                effects.push(WriteEffect::Coordinate { node });
            }
            None => {
                // Every preference-list replica refused to coordinate.
                self.phase = Phase::Finished;
                self.reply_failure(effects);
            }
        }
    }

    fn send_replicate(
        &mut self,
        node: NodeId,
        owner: NodeId,
        hinted: bool,
        counted: bool,
        effects: &mut Vec<WriteEffect<S>>,
    ) {
        debug_assert!(hinted || node == owner, "a fallback is only ever sent the set as a hint");
        debug_assert!(!self.is_finished(), "a finished coordinator sends nothing");
        let Some(set) = self.set.clone() else {
            debug_assert!(false, "replication follows a coordinated set");
            return;
        };
        self.used.insert(node);
        self.outstanding.insert(node, Outstanding { owner, hinted, counted });
        effects.push(WriteEffect::Replicate { node, hint_for: hinted.then_some(owner), set });
    }

    fn replace_with_fallback(&mut self, owner: NodeId, counted: bool, effects: &mut Vec<WriteEffect<S>>) {
        let fallback = self
            .plan
            .fallbacks
            .iter()
            .copied()
            .find(|f| !self.used.contains(f) && !self.plan.suspects.contains(f));
        match fallback {
            Some(node) => self.send_replicate(node, owner, true, counted, effects),
            None => {
                self.failures.push(ReplicaFailure { node: owner, cause: FailureCause::NoFallback });
                if let Some(coordinator) = self.coordinator
                    && coordinator != owner
                    && let Some(set) = self.set.clone()
                {
                    effects.push(WriteEffect::StoreHint { node: coordinator, hint_for: owner, set });
                }
            }
        }
    }

    fn check_progress(&mut self, _now_ms: u64, effects: &mut Vec<WriteEffect<S>>) {
        if !self.replied
            && self.counted_acks() >= self.plan.required
            && let Some(set) = self.set.clone()
        {
            debug_assert!(self.coordinator.is_some(), "nothing is acknowledged before a replica coordinated");
            self.replied = true;
            effects.push(WriteEffect::Reply(WriteReply::Acked {
                set,
                acks: self.acks,
                hinted_acks: self.hinted_acks,
                required: self.plan.required,
            }));
        }
        if self.outstanding.is_empty() && self.phase == Phase::Replicating {
            self.phase = Phase::Finished;
            self.reply_failure(effects);
        }
    }

    fn reply_failure(&mut self, effects: &mut Vec<WriteEffect<S>>) {
        if self.replied {
            return;
        }
        self.replied = true;
        effects.push(WriteEffect::Reply(WriteReply::QuorumNotReached {
            acks: self.acks,
            hinted_acks: self.hinted_acks,
            required: self.plan.required,
            failures: self.failures.clone(),
        }));
    }
}
