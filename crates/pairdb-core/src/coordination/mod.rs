//! Request coordination as plain state machines (in the style of raft-rs): the router feeds them replica
//! answers, failures and the current time (`now_ms`), and they return [`WriteEffect`]s /
//! [`ReadEffect`]s saying whom to call next, when to reply and what to repair. They hold no sockets,
//! timers or clocks, so every interleaving can be driven by tests and by the seeded simulation in
//! `tests/simulation.rs`.
//!
//! Laws:
//! - A write has at most one coordinator that may have applied it: it moves to the next preference
//!   replica only after a coordinate call that certainly had no effect
//!   ([`FailureCause::NotApplied`]). After an ambiguous one it replies `QuorumNotReached` (outcome
//!   unknown) at once. So one client write is at most one dot, and a context that covers the dot
//!   of an acknowledged write covers every copy of that write, wherever it was applied, however late.
//! - A write replies `Acked` exactly when the counted acknowledgements reach W (fallback acks count
//!   unless the request is strict), and `QuorumNotReached` (outcome unknown) when the deadline passes or
//!   every possible target failed first. It never replies twice.
//! - A read replies when R replicas answered; "not found" is an answer. It replies `QuorumNotReached`
//!   only when fewer than R answered by the deadline or every replica failed.
//! - Read repair targets exactly the contacted replicas whose answer does not descend the merged set.
//!
//! Driving: effects carry their payloads (the coordinated set to replicate, the merged set to
//! repair, the acknowledged set in the reply), so a driver never keeps its own copy of the machine's
//! state. [`WriteCoordinator::drive`] / [`ReadCoordinator::drive`] feed one input and carry the effects
//! out through a [`WriteTransport`] / [`ReadTransport`]; the router (real storage RPCs) and the seeded
//! simulation (simulated messages) are two transports of this one loop.

mod read;
mod write;

pub use read::{ReadAnswer, ReadCoordinator, ReadEffect, ReadInput, ReadPlan, ReadReply, ReadTransport};
pub use write::{WriteCoordinator, WriteEffect, WriteInput, WritePlan, WriteReply, WriteTransport};

use crate::dvv::VersionSet;
use crate::reason::Reason;
use crate::ring::NodeId;

/// A replica's refusal of a request for a reason every replica would give (the request itself is
/// wrong: too many siblings, a value too large, a tenant being deleted...). It is the request's
/// answer: asking another replica would change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// The replica's own explanation, passed on to the client.
    pub message: String,
    /// PRECONDITION_FAILED: the refusing replica's set of the key (what broke the condition), so the
    /// client learns the newest state without another read.
    pub current: Option<VersionSet>,
}

/// Why a replica did not contribute to a request.
///
/// The distinction that matters for writes is whether the call may have had an effect: a coordinate
/// call that failed with [`FailureCause::Error`] or [`FailureCause::Timeout`] may have been applied
/// (the reply was lost, or the node applied it after the caller stopped waiting), so the write is not
/// retried on another coordinator: that would give one client write two dots, and a context naming
/// one of them would not cover the other (see [`WriteCoordinator`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCause {
    /// The call returned an error after it may have reached the node (reset connection, I/O error,
    /// an undecodable answer...): its effect is unknown.
    Error,
    /// The call did not answer within the per-replica timeout: its effect is unknown.
    Timeout,
    /// The call certainly had no effect: it never reached the node (down when the call was made,
    /// connection refused, no free slot before the timeout) or the node refused it before applying
    /// anything (not ready, poisoned write path, disk full, deadline passed on arrival).
    NotApplied,
    /// No fallback was left to stand in for this replica.
    NoFallback,
}

impl FailureCause {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::Error => "error",
            FailureCause::Timeout => "timeout",
            FailureCause::NotApplied => "not_applied",
            FailureCause::NoFallback => "no_fallback",
        }
    }

    /// True when the failed call may have been applied by the node all the same.
    pub fn may_have_applied(self) -> bool {
        matches!(self, FailureCause::Error | FailureCause::Timeout)
    }
}

/// One replica's failure, as reported in a quorum error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplicaFailure {
    pub node: NodeId,
    pub cause: FailureCause,
}
