//! Client errors. A server error keeps its gRPC code and PairDB's stable reason code (from the status
//! details) so callers branch on `reason()`, never on message text.

use pairdb_proto::common::v1::ErrorDetail;
use prost::Message;
use tonic::Code;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint}: {source}")]
    InvalidEndpoint { endpoint: String, source: tonic::transport::Error },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: String, source: tonic::transport::Error },
    #[error("invalid token: it must be printable ASCII")]
    InvalidToken,
    #[error("{reason}: {message}")]
    Server { code: Code, reason: String, message: String, metadata: Vec<(String, String)> },
}

impl ClientError {
    /// The stable reason code: the server's (e.g. `QUORUM_NOT_REACHED`), or the client-side condition.
    pub fn reason(&self) -> &str {
        match self {
            ClientError::InvalidEndpoint { .. } => "INVALID_ENDPOINT",
            ClientError::Connect { .. } => "CONNECT_FAILED",
            ClientError::InvalidToken => "INVALID_TOKEN",
            ClientError::Server { reason, .. } => reason,
        }
    }

    /// The gRPC code of a server error; `Unavailable` for connection failures.
    pub fn code(&self) -> Code {
        match self {
            ClientError::Server { code, .. } => *code,
            ClientError::Connect { .. } => Code::Unavailable,
            ClientError::InvalidEndpoint { .. } | ClientError::InvalidToken => Code::InvalidArgument,
        }
    }

    /// A metadata value the server attached (e.g. `retry_after_ms` of a rate limit).
    pub fn metadata(&self, name: &str) -> Option<&str> {
        match self {
            ClientError::Server { metadata, .. } => {
                metadata.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
            }
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let detail = ErrorDetail::decode(status.details()).ok().filter(|detail| !detail.reason.is_empty());
        let (reason, metadata) = match detail {
            Some(detail) => {
                let mut metadata: Vec<(String, String)> = detail.metadata.into_iter().collect();
                metadata.sort();
                (detail.reason, metadata)
            }
            // A status without PairDB details (a proxy, the transport, an old server): its code names it.
            None => (code_reason(status.code()).to_owned(), Vec::new()),
        };
        ClientError::Server { code: status.code(), reason, message: status.message().to_owned(), metadata }
    }
}

/// Reason used for statuses that carry no PairDB detail.
fn code_reason(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::Unavailable => "UNAVAILABLE",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Cancelled => "CANCELLED",
        Code::Unimplemented => "UNIMPLEMENTED",
        _ => "INTERNAL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_reason_comes_from_the_details() {
        let detail = ErrorDetail {
            reason: "RATE_LIMITED".into(),
            message: "slow down".into(),
            metadata: [("retry_after_ms".to_owned(), "120".to_owned())].into_iter().collect(),
        };
        let status =
            tonic::Status::with_details(Code::ResourceExhausted, "slow down", detail.encode_to_vec().into());
        let error = ClientError::from(status);
        assert_eq!(error.reason(), "RATE_LIMITED");
        assert_eq!(error.code(), Code::ResourceExhausted);
        assert_eq!(error.metadata("retry_after_ms"), Some("120"));

        let bare = ClientError::from(tonic::Status::unavailable("transport"));
        assert_eq!(bare.reason(), "UNAVAILABLE");
    }
}
