//! The read path of DESIGN §4. Choice (recorded in ARCHITECTURE.md): ask R replicas first — live ones
//! first, in preference order — and the rest only on a miss ("not found"), a failure, a disagreement
//! between answers, or when the first answers are slower than `speculative_after_ms`. Reply as soon as R
//! replicas answered ("not found" is an answer), with the merge of every answer so far. Then keep
//! collecting until every contacted replica answered or the deadline passed, and repair the contacted
//! replicas whose answer is behind the merged set.

use std::collections::{BTreeMap, BTreeSet};

use super::{FailureCause, Refusal, ReplicaFailure};
use crate::dvv::VersionSet;
use crate::ring::NodeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// The first N nodes of the partition's list.
    pub replicas: Vec<NodeId>,
    /// R.
    pub required: usize,
    /// Nodes the caller's failure view considers down: asked last.
    pub suspects: BTreeSet<NodeId>,
    /// When the remaining replicas are asked if the first ones have not all answered.
    pub speculative_after_ms: u64,
    pub deadline_ms: u64,
}

/// One replica's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer {
    Found(VersionSet),
    NotFound,
    Failed(FailureCause),
    /// The replica refused the request for a reason every replica would give: a failure that, if
    /// too few replicas answer, is the read's answer ([`ReadReply::Rejected`]).
    Refused(Refusal),
}

/// What happened since the last input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadInput {
    Answer {
        node: NodeId,
        answer: ReadAnswer,
    },
    /// Time passed (the driver calls it at [`ReadCoordinator::next_timeout_ms`]).
    Tick,
}

/// The side of a read that reaches replicas and the client (see [`super::WriteTransport`]).
pub trait ReadTransport {
    fn fetch(&mut self, node: NodeId);
    fn repair(&mut self, node: NodeId, set: VersionSet);
    fn reply(&mut self, reply: ReadReply);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEffect {
    /// Ask `node` for its version set of the key.
    Fetch { node: NodeId },
    /// Answer the client. Emitted once.
    Reply(ReadReply),
    /// Send the merged set to `node`, which is behind it. Emitted after the reply, once all contacted
    /// replicas answered (or the deadline passed).
    Repair { node: NodeId, set: VersionSet },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadReply {
    /// R replicas answered. `merged` is `None` when every answer was "not found"; a merged set holding
    /// only tombstones means the key is deleted (the caller still returns its context).
    Answered {
        merged: Option<VersionSet>,
        answered: usize,
    },
    QuorumNotReached {
        answered: usize,
        required: usize,
        failures: Vec<ReplicaFailure>,
    },
    /// Too few replicas answered because some refused the request for a reason every replica would
    /// give (e.g. the tenant is being deleted): that refusal (the first) is the answer.
    Rejected(Refusal),
}

/// State machine of one read.
#[derive(Debug, Clone)]
pub struct ReadCoordinator {
    plan: ReadPlan,
    /// Replicas in the order they will be asked.
    order: Vec<NodeId>,
    sent: usize,
    answers: BTreeMap<NodeId, Option<VersionSet>>,
    failures: Vec<ReplicaFailure>,
    /// The first definitive refusal.
    refusal: Option<Refusal>,
    merged: Option<VersionSet>,
    escalated: bool,
    replied: bool,
    finished: bool,
}

impl ReadCoordinator {
    pub fn new(plan: ReadPlan) -> Self {
        let (live, suspect): (Vec<NodeId>, Vec<NodeId>) =
            plan.replicas.iter().partition(|node| !plan.suspects.contains(node));
        let order = live.into_iter().chain(suspect).collect();
        Self {
            plan,
            order,
            sent: 0,
            answers: BTreeMap::new(),
            failures: Vec::new(),
            refusal: None,
            merged: None,
            escalated: false,
            replied: false,
            finished: false,
        }
    }

    /// Starts the read and carries out its first effects.
    pub fn drive_start<T: ReadTransport>(&mut self, now_ms: u64, transport: &mut T) {
        let effects = self.start(now_ms);
        Self::carry_out(effects, transport);
    }

    /// Feeds one input and carries out the effects through `transport`: the one loop the router and
    /// the simulation share.
    pub fn drive<T: ReadTransport>(&mut self, input: ReadInput, now_ms: u64, transport: &mut T) {
        let was_finished = self.is_finished();
        let effects = self.handle(input, now_ms);
        debug_assert!(!was_finished || effects.is_empty(), "a finished read emits nothing");
        Self::carry_out(effects, transport);
    }

    fn carry_out<T: ReadTransport>(effects: Vec<ReadEffect>, transport: &mut T) {
        for effect in effects {
            match effect {
                ReadEffect::Fetch { node } => transport.fetch(node),
                ReadEffect::Repair { node, set } => transport.repair(node, set),
                ReadEffect::Reply(reply) => transport.reply(reply),
            }
        }
    }

    /// The effects of one input.
    pub fn handle(&mut self, input: ReadInput, now_ms: u64) -> Vec<ReadEffect> {
        match input {
            ReadInput::Answer { node, answer } => self.on_answer(node, answer, now_ms),
            ReadInput::Tick => self.on_tick(now_ms),
        }
    }

    /// The first effects: fetch from R replicas.
    pub fn start(&mut self, now_ms: u64) -> Vec<ReadEffect> {
        let mut effects = Vec::new();
        let first = self.plan.required.min(self.order.len());
        self.send_up_to(first, &mut effects);
        self.check_progress(now_ms, &mut effects);
        effects
    }

    /// A replica answered (or failed).
    pub fn on_answer(&mut self, node: NodeId, answer: ReadAnswer, now_ms: u64) -> Vec<ReadEffect> {
        let mut effects = Vec::new();
        let asked = self.order.iter().take(self.sent).any(|&n| n == node);
        let already = self.answers.contains_key(&node) || self.failures.iter().any(|f| f.node == node);
        if !asked || already || self.finished {
            return effects;
        }
        let escalate = match answer {
            ReadAnswer::Found(set) => {
                let disagrees = self.answers.values().any(|other| other.as_ref() != Some(&set));
                self.merged = Some(match self.merged.take() {
                    Some(merged) => merged.merge(&set),
                    None => set.clone(),
                });
                self.answers.insert(node, Some(set));
                disagrees
            }
            ReadAnswer::NotFound => {
                self.answers.insert(node, None);
                true
            }
            ReadAnswer::Failed(cause) => {
                self.failures.push(ReplicaFailure { node, cause });
                true
            }
            ReadAnswer::Refused(refusal) => {
                self.failures.push(ReplicaFailure { node, cause: FailureCause::Error });
                self.refusal.get_or_insert(refusal);
                true
            }
        };
        if escalate {
            self.escalate(&mut effects);
        }
        self.check_progress(now_ms, &mut effects);
        effects
    }

    /// Time passed: ask the rest after the speculative delay; give up at the deadline.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<ReadEffect> {
        let mut effects = Vec::new();
        if self.finished {
            return effects;
        }
        if now_ms >= self.plan.speculative_after_ms && !self.replied {
            self.escalate(&mut effects);
        }
        if now_ms >= self.plan.deadline_ms {
            self.finish(&mut effects);
        }
        effects
    }

    /// The next time [`Self::on_tick`] must be called.
    pub fn next_timeout_ms(&self) -> Option<u64> {
        if self.finished {
            None
        } else if !self.escalated && !self.replied {
            Some(self.plan.speculative_after_ms.min(self.plan.deadline_ms))
        } else {
            Some(self.plan.deadline_ms)
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The merge of every answer received so far.
    pub fn merged(&self) -> Option<&VersionSet> {
        self.merged.as_ref()
    }

    fn escalate(&mut self, effects: &mut Vec<ReadEffect>) {
        self.escalated = true;
        let all = self.order.len();
        self.send_up_to(all, effects);
    }

    fn send_up_to(&mut self, count: usize, effects: &mut Vec<ReadEffect>) {
        while self.sent < count {
            if let Some(&node) = self.order.get(self.sent) {
                effects.push(ReadEffect::Fetch { node });
            }
            self.sent += 1;
        }
    }

    fn outstanding(&self) -> usize {
        self.sent - self.answers.len() - self.failures.len()
    }

    fn check_progress(&mut self, _now_ms: u64, effects: &mut Vec<ReadEffect>) {
        if !self.replied && self.answers.len() >= self.plan.required {
            self.replied = true;
            effects.push(ReadEffect::Reply(ReadReply::Answered {
                merged: self.merged.clone(),
                answered: self.answers.len(),
            }));
        }
        if self.outstanding() == 0 {
            if self.replied || self.sent >= self.order.len() {
                self.finish(effects);
            } else {
                // Too few answers and nobody left in flight: ask whoever has not been asked yet.
                self.escalate(effects);
            }
        }
    }

    fn finish(&mut self, effects: &mut Vec<ReadEffect>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if !self.replied {
            self.replied = true;
            effects.push(ReadEffect::Reply(match self.refusal.take() {
                Some(refusal) => ReadReply::Rejected(refusal),
                None => ReadReply::QuorumNotReached {
                    answered: self.answers.len(),
                    required: self.plan.required,
                    failures: self.failures.clone(),
                },
            }));
        }
        let Some(merged) = &self.merged else {
            return;
        };
        for (&node, answer) in &self.answers {
            debug_assert!(self.order.contains(&node), "only replicas that were asked are repaired");
            let behind = match answer {
                Some(set) => !set.descends(merged),
                None => true,
            };
            if behind {
                effects.push(ReadEffect::Repair { node, set: merged.clone() });
            }
        }
    }
}
