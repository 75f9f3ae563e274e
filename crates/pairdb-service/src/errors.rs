//! The one error table: every stable reason code PairDB returns, mapped to a gRPC code here and to an
//! HTTP status by [`http_status`]. Each crate's error enum names its reason (`reason()`); the service
//! edge turns it into a `tonic::Status` with [`status`], which carries a `pairdb.common.v1.ErrorDetail`
//! (reason, message, metadata) in the status details so clients can branch on the reason.

use pairdb_proto::common::v1::ErrorDetail;
use prost::Message;
use tonic::Code;

/// The gRPC code for a reason. Unknown reasons are INTERNAL, so a new reason must be added here.
pub fn grpc_code(reason: &str) -> Code {
    match reason {
        "INVALID_ARGUMENT"
        | "INVALID_TENANT_ID"
        | "INVALID_KEY"
        | "INVALID_CONSISTENCY"
        | "MALFORMED_VERSION"
        | "INVALID_CONTEXT"
        | "MALFORMED_REQUEST"
        | "INVALID_PARTITION"
        | "PARTITION_MISMATCH"
        | "INVALID_REPLICATION_FACTOR"
        | "INVALID_NODE"
        | "INVALID_CONFIG"
        | "INVALID_JSON"
        | "INVALID_CONTENT_TYPE"
        | "BODY_TOO_LARGE" => Code::InvalidArgument,
        "UNAUTHENTICATED" => Code::Unauthenticated,
        "PERMISSION_DENIED" => Code::PermissionDenied,
        "TENANT_NOT_FOUND"
        | "KEY_NOT_FOUND"
        | "NODE_NOT_FOUND"
        | "MIGRATION_NOT_FOUND"
        | "API_KEY_NOT_FOUND" => Code::NotFound,
        "TENANT_EXISTS" | "NODE_EXISTS" | "IDEMPOTENCY_KEY_CONFLICT" => Code::AlreadyExists,
        "NODE_IN_USE"
        | "NODE_REMOVED"
        | "NOT_IN_CLUSTER"
        | "MIGRATION_IN_PROGRESS"
        | "MIGRATION_FINISHED"
        | "WRONG_NODE"
        | "TENANT_BEING_DELETED"
        | "STALE_DATA_DIRECTORY" => Code::FailedPrecondition,
        "RATE_LIMITED" | "VALUE_TOO_LARGE" | "TOO_MANY_SIBLINGS" | "DISK_FULL" => Code::ResourceExhausted,
        "IDEMPOTENCY_IN_FLIGHT" => Code::Aborted,
        "QUORUM_NOT_REACHED"
        | "WRITE_PATH_POISONED"
        | "NOT_READY"
        | "SOURCE_UNAVAILABLE"
        | "NODE_UNAVAILABLE"
        | "OVERLOADED"
        | "META_UNAVAILABLE"
        | "IDEMPOTENCY_STORE_UNAVAILABLE"
        | "DATABASE_UNAVAILABLE" => Code::Unavailable,
        "DEADLINE_EXCEEDED" | "COORDINATE_DEADLINE_PASSED" | "REQUEST_TIMEOUT" => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// The HTTP status for a gRPC code (DESIGN §6 and the edge issue's table).
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::FailedPrecondition => 412,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Cancelled => 499,
        _ => 500,
    }
}

/// The HTTP status of a reason: its gRPC code's status, except where HTTP has a more precise one
/// (a client too slow to send its body is 408, not a gateway's 504).
pub fn http_status_of(reason: &str) -> u16 {
    match reason {
        "REQUEST_TIMEOUT" => 408,
        _ => http_status(grpc_code(reason)),
    }
}

/// The gRPC code's canonical name, as in the HTTP JSON error body.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The HTTP form of an error: status and `{"error": {code, reason, message, details}}`.
pub fn http_error(reason: &str, message: &str, details: &[(&str, String)]) -> (u16, serde_json::Value) {
    let code = grpc_code(reason);
    let details: serde_json::Map<String, serde_json::Value> =
        details.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone()))).collect();
    let body = serde_json::json!({"error": {
        "code": code_name(code),
        "reason": reason,
        "message": message,
        "details": details,
    }});
    (http_status_of(reason), body)
}

/// The HTTP form of a status made by [`status`] (or any status: its code names the reason then).
pub fn http_error_of(status: &tonic::Status) -> (u16, serde_json::Value) {
    match detail_of(status) {
        Some(detail) => {
            let metadata: Vec<(&str, String)> =
                detail.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            http_error(&detail.reason, &detail.message, &metadata)
        }
        None => http_error(code_name(status.code()), status.message(), &[]),
    }
}

/// The credential of an `authorization: Bearer <token>` header value: the scheme is matched
/// case-insensitively and followed by one or more spaces (RFC 9110 §11.1); surrounding whitespace is
/// dropped. `None` for any other scheme or an empty token. Every service uses this one rule.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of an HTTP `Retry-After` header for a refusal that says when to retry: whole seconds,
/// rounded up (at least 1, as the header cannot say less).
pub fn retry_after_secs(retry_after_ms: u64) -> u64 {
    retry_after_ms.div_ceil(1000).max(1)
}

/// A status for `reason` with a human message and structured metadata in its details.
pub fn status(reason: &str, message: impl Into<String>, metadata: &[(&str, String)]) -> tonic::Status {
    let message = message.into();
    let detail = ErrorDetail {
        reason: reason.to_owned(),
        message: message.clone(),
        metadata: metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
    };
    tonic::Status::with_details(grpc_code(reason), message, detail.encode_to_vec().into())
}

/// The structured detail of a status made by [`status`], if any.
pub fn detail_of(status: &tonic::Status) -> Option<ErrorDetail> {
    ErrorDetail::decode(status.details()).ok().filter(|d| !d.reason.is_empty())
}

/// The reason code of a status made by [`status`], if any.
pub fn reason_of(status: &tonic::Status) -> Option<String> {
    detail_of(status).map(|d| d.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_status_details() {
        let status = status("QUORUM_NOT_REACHED", "1 of 2", &[("acks", "1".into())]);
        assert_eq!(status.code(), Code::Unavailable);
        let detail = detail_of(&status).expect("detail");
        assert_eq!(detail.reason, "QUORUM_NOT_REACHED");
        assert_eq!(detail.metadata.get("acks").map(String::as_str), Some("1"));
        assert_eq!(http_status(status.code()), 503);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_nothing_else_passes() {
        for (header, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            (" Bearer abc", Some("abc")),
            ("Bearer ", None),
            ("Bearer", None),
            ("Basic abc", None),
            ("Bearerabc", None),
            ("", None),
        ] {
            assert_eq!(bearer_token(header), token, "{header:?}");
        }
        assert_eq!((retry_after_secs(0), retry_after_secs(1), retry_after_secs(1001)), (1, 1, 2));
    }

    #[test]
    fn table_matches_the_documented_http_statuses() {
        for (reason, http) in [
            ("INVALID_KEY", 400),
            ("UNAUTHENTICATED", 401),
            ("PERMISSION_DENIED", 403),
            ("KEY_NOT_FOUND", 404),
            ("TENANT_EXISTS", 409),
            ("IDEMPOTENCY_KEY_CONFLICT", 409),
            ("NODE_IN_USE", 412),
            ("RATE_LIMITED", 429),
            ("TOO_MANY_SIBLINGS", 429),
            ("QUORUM_NOT_REACHED", 503),
            ("DEADLINE_EXCEEDED", 504),
            ("REQUEST_TIMEOUT", 408),
            ("INVALID_CONTEXT", 400),
            ("MALFORMED_REQUEST", 400),
            ("TENANT_BEING_DELETED", 412),
            ("SOMETHING_NEW", 500),
        ] {
            assert_eq!(http_status_of(reason), http, "{reason}");
        }
    }
}
