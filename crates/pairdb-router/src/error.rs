//! The router's errors. Each has a stable reason; [`RouterError::into_status`] is the one place they
//! become `tonic::Status` (through the shared reason → code table in `pairdb_service::errors`).

use pairdb_core::coordination::ReplicaFailure;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{message}")]
    Invalid { reason: &'static str, message: String },
    #[error("tenant {0} does not exist")]
    TenantNotFound(String),
    #[error("key not found")]
    KeyNotFound,
    #[error("router has no topology yet (metadata service not reached)")]
    NotReady,
    #[error("quorum not reached: {acks} of {required} replicas answered; the outcome is unknown")]
    QuorumNotReached { acks: usize, hinted_acks: usize, required: usize, failures: Vec<ReplicaFailure> },
    #[error("no storage node holds partition {0} in the current topology")]
    NoReplicas(u32),
    #[error(transparent)]
    Storage(tonic::Status),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("tenant {tenant} is over its rate limit; retry in {retry_after_ms} ms")]
    RateLimited { tenant: String, retry_after_ms: u64 },
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::IdempotencyError),
}

impl RouterError {
    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        RouterError::Invalid { reason, message: message.into() }
    }

    pub fn reason(&self) -> String {
        match self {
            RouterError::Invalid { reason, .. } => (*reason).to_owned(),
            RouterError::TenantNotFound(_) => "TENANT_NOT_FOUND".into(),
            RouterError::KeyNotFound => "KEY_NOT_FOUND".into(),
            RouterError::NotReady => "NOT_READY".into(),
            RouterError::QuorumNotReached { .. } | RouterError::NoReplicas(_) => "QUORUM_NOT_REACHED".into(),
            RouterError::Storage(status) => {
                pairdb_service::errors::reason_of(status).unwrap_or_else(|| "INTERNAL".into())
            }
            RouterError::Unauthenticated(_) => "UNAUTHENTICATED".into(),
            RouterError::PermissionDenied(_) => "PERMISSION_DENIED".into(),
            RouterError::RateLimited { .. } => "RATE_LIMITED".into(),
            RouterError::Idempotency(error) => error.reason().into(),
        }
    }

    pub fn into_status(self) -> tonic::Status {
        let reason = self.reason();
        let mut metadata = Vec::new();
        if let RouterError::QuorumNotReached { acks, hinted_acks, required, failures } = &self {
            metadata.push(("acks", acks.to_string()));
            metadata.push(("hinted_acks", hinted_acks.to_string()));
            metadata.push(("required", required.to_string()));
            metadata.push(("outcome", "unknown".to_owned()));
            let causes: Vec<String> =
                failures.iter().map(|f| format!("{}:{}", f.node.0, f.cause.as_str())).collect();
            metadata.push(("replica_failures", causes.join(",")));
        }
        if let RouterError::RateLimited { retry_after_ms, .. } = &self {
            metadata.push(("retry_after_ms", retry_after_ms.to_string()));
        }
        if let RouterError::Storage(status) = &self
            && let Some(detail) = pairdb_service::errors::detail_of(status)
        {
            return pairdb_service::errors::status(&detail.reason, detail.message, &[]);
        }
        pairdb_service::errors::status(&reason, self.to_string(), &metadata)
    }
}
