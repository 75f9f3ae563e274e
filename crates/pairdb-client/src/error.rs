//! Client errors. A server error keeps its gRPC code and PairDB's stable reason code (from the status
//! details) so callers branch on `reason()`, never on message text.

use pairdb_proto::status::{Reason, detail_of, reason_of_code};
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
    /// The stable reason code: the server's (e.g. `QUORUM_NOT_REACHED`, also one newer than this
    /// client), or the client-side condition.
    pub fn reason(&self) -> &str {
        match self {
            ClientError::InvalidEndpoint { .. } => Reason::InvalidEndpoint.as_str(),
            ClientError::Connect { .. } => Reason::ConnectFailed.as_str(),
            ClientError::InvalidToken => Reason::InvalidToken.as_str(),
            ClientError::Server { reason, .. } => reason,
        }
    }

    /// The reason, when this client knows it (`None` for a newer server's reason).
    pub fn known_reason(&self) -> Option<Reason> {
        Reason::parse(self.reason())
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

/// The key as a failed conditional write found it (the details of PRECONDITION_FAILED): retry with
/// `context` without reading again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentState {
    /// The key has a live value.
    pub found: bool,
    /// The context to write the key with (covers every version the router saw).
    pub context: Vec<u8>,
    /// The values a read returns, when they were small enough to travel in the error (`None`: read
    /// the key).
    pub values: Option<Vec<Vec<u8>>>,
}

impl ClientError {
    /// For PRECONDITION_FAILED: the key's current state from the error details (`None` for any
    /// other error, or when the router could not read the key again to fill them in).
    pub fn current_state(&self) -> Option<CurrentState> {
        use base64::Engine as _;
        let base64 = &base64::engine::general_purpose::STANDARD;
        if self.known_reason() != Some(Reason::PreconditionFailed) {
            return None;
        }
        let found = self.metadata("found")? == "true";
        let context = base64.decode(self.metadata("context")?).ok()?;
        let siblings: usize = self.metadata("siblings")?.parse().ok()?;
        let values = match (self.metadata("values_included"), self.metadata("values_base64")) {
            // Split would read "" as one empty value.
            (Some("true"), Some(_)) if siblings == 0 => Some(Vec::new()),
            (Some("true"), Some(encoded)) => {
                Some(encoded.split(',').map(|v| base64.decode(v)).collect::<Result<Vec<_>, _>>().ok()?)
            }
            _ => None,
        };
        Some(CurrentState { found, context, values })
    }
}

impl ClientError {
    /// An item's error inside a batched answer (its gRPC code from the reason's table).
    pub(crate) fn from_detail(detail: pairdb_proto::common::v1::ErrorDetail) -> Self {
        let code = Reason::parse(&detail.reason).map_or(Code::Unknown, pairdb_proto::status::grpc_code);
        let mut metadata: Vec<(String, String)> = detail.metadata.into_iter().collect();
        metadata.sort();
        ClientError::Server { code, reason: detail.reason, message: detail.message, metadata }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let (reason, metadata) = match detail_of(&status) {
            Some(detail) => {
                let mut metadata: Vec<(String, String)> = detail.metadata.into_iter().collect();
                metadata.sort();
                (detail.reason, metadata)
            }
            // A status without PairDB details (a proxy, the transport, an old server): its code names it.
            None => (reason_of_code(status.code()).as_str().to_owned(), Vec::new()),
        };
        ClientError::Server { code: status.code(), reason, message: status.message().to_owned(), metadata }
    }
}

#[cfg(test)]
mod tests {
    use pairdb_proto::common::v1::ErrorDetail;
    use prost::Message;

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
