//! The router's errors. Each names its stable [`Reason`]; [`RouterError::into_status`] (gRPC) and the
//! HTTP edge's error response turn it into a reply through the one table in `pairdb_service::errors`.

use pairdb_core::condition::WriteCondition;
use pairdb_core::coordination::{Refusal, ReplicaFailure};
use pairdb_core::reason::{HasReason, Reason};

use crate::kv::CurrentState;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{message}")]
    Invalid { reason: Reason, message: String },
    #[error("tenant {0} does not exist")]
    TenantNotFound(String),
    #[error("key not found")]
    KeyNotFound,
    /// The key has history but no live value (deleted, or every value expired): not found, with
    /// the context to write over that history.
    #[error("key not found (deleted or expired)")]
    NoLiveValue { context: Vec<u8> },
    #[error("router has no topology yet (metadata service not reached)")]
    NotReady,
    #[error("quorum not reached: {acks} of {required} replicas answered; the outcome is unknown")]
    QuorumNotReached { acks: usize, hinted_acks: usize, required: usize, failures: Vec<ReplicaFailure> },
    #[error("no storage node holds partition {0} in the current topology")]
    NoReplicas(u32),
    /// A storage node refused the request for a reason every replica would give.
    #[error("{}", .0.message)]
    Refused(Refusal),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("tenant {tenant} is over its rate limit; retry in {retry_after_ms} ms")]
    RateLimited { tenant: String, retry_after_ms: u64 },
    /// A listing page needs partitions no replica answered for.
    #[error("{message}")]
    PartitionsUnavailable { partitions: Vec<u32>, message: String },
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::IdempotencyError),
    /// A conditional write's condition did not hold; nothing was applied. `current` is the key as
    /// the last read found it (absent when that read failed).
    #[error("condition {} does not hold", condition.as_str())]
    PreconditionFailed { condition: WriteCondition, current: Option<Box<CurrentState>> },
}

/// Values up to this size travel in PRECONDITION_FAILED details (larger ones are left out, with
/// `values_included` false: read the key), as long as they add up to at most
/// [`MAX_DETAIL_VALUES_BYTES`].
pub const MAX_DETAIL_VALUE_BYTES: usize = 1024;
pub const MAX_DETAIL_VALUES_BYTES: usize = 16 * 1024;

impl RouterError {
    pub fn invalid(reason: Reason, message: impl Into<String>) -> Self {
        RouterError::Invalid { reason, message: message.into() }
    }

    /// The error of a core or validation failure that names its reason.
    pub fn from_reasoned<E: HasReason + std::fmt::Display>(error: &E) -> Self {
        RouterError::invalid(error.reason(), error.to_string())
    }

    /// Structured details of the error (metadata of the gRPC detail, `details` of the JSON body).
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        let mut metadata = Vec::new();
        if let RouterError::QuorumNotReached { acks, hinted_acks, required, failures } = self {
            metadata.push(("acks", acks.to_string()));
            metadata.push(("hinted_acks", hinted_acks.to_string()));
            metadata.push(("required", required.to_string()));
            metadata.push(("outcome", "unknown".to_owned()));
            let causes: Vec<String> =
                failures.iter().map(|f| format!("{}:{}", f.node.0, f.cause.as_str())).collect();
            metadata.push(("replica_failures", causes.join(",")));
        }
        if let RouterError::PartitionsUnavailable { partitions, .. } = self {
            let named: Vec<String> = partitions.iter().map(u32::to_string).collect();
            metadata.push(("partitions", named.join(",")));
        }
        if let RouterError::RateLimited { retry_after_ms, .. } = self {
            metadata.push(("retry_after_ms", retry_after_ms.to_string()));
        }
        if let RouterError::NoLiveValue { context } = self {
            use base64::Engine as _;
            metadata.push(("context", base64::engine::general_purpose::STANDARD.encode(context)));
        }
        if let RouterError::PreconditionFailed { condition, current } = self {
            metadata.push(("condition", condition.as_str().to_owned()));
            if let Some(current) = current {
                precondition_metadata(current, &mut metadata);
            }
        }
        metadata
    }

    pub fn into_status(self) -> tonic::Status {
        pairdb_service::errors::status(self.reason(), self.to_string(), &self.metadata())
    }
}

/// The key's state in PRECONDITION_FAILED details: `found`, `context` (base64, to write with),
/// `siblings` (how many values a read returns), and when they are small (each at most
/// [`MAX_DETAIL_VALUE_BYTES`], together at most [`MAX_DETAIL_VALUES_BYTES`]) the values themselves
/// as `values_base64`, comma-separated base64 in read order (`values_included` says which).
fn precondition_metadata(current: &CurrentState, metadata: &mut Vec<(&'static str, String)>) {
    use base64::Engine as _;
    let base64 = &base64::engine::general_purpose::STANDARD;
    let values: Vec<&[u8]> =
        current.siblings.iter().map(|s| s.value.as_deref().unwrap_or_default()).collect();
    metadata.push(("found", (!values.is_empty()).to_string()));
    metadata.push(("context", base64.encode(&current.context)));
    metadata.push(("siblings", values.len().to_string()));
    let small = values.iter().all(|v| v.len() <= MAX_DETAIL_VALUE_BYTES)
        && values.iter().map(|v| v.len()).sum::<usize>() <= MAX_DETAIL_VALUES_BYTES;
    metadata.push(("values_included", small.to_string()));
    if small {
        let encoded: Vec<String> = values.iter().map(|v| base64.encode(v)).collect();
        metadata.push(("values_base64", encoded.join(",")));
    }
}

impl HasReason for RouterError {
    fn reason(&self) -> Reason {
        match self {
            RouterError::Invalid { reason, .. } => *reason,
            RouterError::TenantNotFound(_) => Reason::TenantNotFound,
            RouterError::KeyNotFound | RouterError::NoLiveValue { .. } => Reason::KeyNotFound,
            RouterError::NotReady => Reason::NotReady,
            RouterError::QuorumNotReached { .. } | RouterError::NoReplicas(_) => Reason::QuorumNotReached,
            RouterError::Refused(refusal) => refusal.reason,
            RouterError::Unauthenticated(_) => Reason::Unauthenticated,
            RouterError::PermissionDenied(_) => Reason::PermissionDenied,
            RouterError::RateLimited { .. } => Reason::RateLimited,
            RouterError::PartitionsUnavailable { .. } => Reason::PartitionsUnavailable,
            RouterError::Idempotency(error) => error.reason(),
            RouterError::PreconditionFailed { .. } => Reason::PreconditionFailed,
        }
    }
}
