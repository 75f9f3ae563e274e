//! Request coordination as plain state machines (in the style of raft-rs): the router feeds them replica
//! answers, failures and the current time (`now_ms`), and they return [`WriteEffect`]s /
//! [`ReadEffect`]s saying whom to call next, when to reply and what to repair. They hold no sockets,
//! timers or clocks, so every interleaving can be driven by tests and by the seeded simulation in
//! `tests/simulation.rs`.
//!
//! Laws:
//! - A write replies `Acked` exactly when the counted acknowledgements reach W (fallback acks count
//!   unless the request is strict), and `QuorumNotReached` (outcome unknown) when the deadline passes or
//!   every possible target failed first. It never replies twice.
//! - A read replies when R replicas answered; "not found" is an answer. It replies `QuorumNotReached`
//!   only when fewer than R answered by the deadline or every replica failed.
//! - Read repair targets exactly the contacted replicas whose answer does not descend the merged set.

mod read;
mod write;

pub use read::{ReadAnswer, ReadCoordinator, ReadEffect, ReadPlan, ReadReply};
pub use write::{WriteCoordinator, WriteEffect, WritePlan, WriteReply};

use crate::ring::NodeId;

/// Why a replica did not contribute to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCause {
    /// The call returned an error (connection refused, I/O error, node not ready...).
    Error,
    /// The call did not answer within the per-replica timeout.
    Timeout,
    /// No fallback was left to stand in for this replica.
    NoFallback,
}

impl FailureCause {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::Error => "error",
            FailureCause::Timeout => "timeout",
            FailureCause::NoFallback => "no_fallback",
        }
    }
}

/// One replica's failure, as reported in a quorum error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplicaFailure {
    pub node: NodeId,
    pub cause: FailureCause,
}
