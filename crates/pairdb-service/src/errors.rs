//! The HTTP half of the one error table, and the reason → gRPC code half re-exported from
//! `pairdb_proto::status`. Every crate's error implements [`HasReason`]; the gRPC edge turns it into a
//! `tonic::Status` with [`status`] (a `google.rpc.Status` with an `ErrorInfo`; internal APIs use
//! [`internal_status`] for one more release),
//! and every HTTP edge answers with [`http_response`], so both forms come from the same reason.

pub use pairdb_proto::status::{
    HasReason, Reason, detail_of, grpc_code, internal_status, known_reason_of, reason_of, reason_of_code,
    status, status_of,
};
use tonic::Code;

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
pub fn http_status_of(reason: Reason) -> u16 {
    match reason {
        Reason::RequestTimeout => 408,
        // Retrying does not help until the tenant shrinks or its quota grows (unlike a 429).
        Reason::QuotaExceeded => 507,
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

/// The one HTTP error reply of every service: the reason's status and
/// `{"error": {code, reason, message, details}}`, plus `Retry-After` when the details say when to
/// retry (`retry_after_ms`; RFC 9110 §10.2.3).
pub fn http_response(reason: Reason, message: &str, details: &[(&str, String)]) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body: serde_json::Map<String, serde_json::Value> =
        details.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone()))).collect();
    let body = serde_json::json!({"error": {
        "code": code_name(grpc_code(reason)),
        "reason": reason.as_str(),
        "message": message,
        "details": body,
    }});
    let status =
        http::StatusCode::from_u16(http_status_of(reason)).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(body)).into_response();
    response.extensions_mut().insert(crate::telemetry::ResponseReason(reason));
    let retry_after = details.iter().find(|(k, _)| *k == "retry_after_ms").and_then(|(_, v)| v.parse().ok());
    if let Some(retry_after_ms) = retry_after {
        response.headers_mut().insert(http::header::RETRY_AFTER, retry_after_secs(retry_after_ms).into());
    }
    response
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

#[cfg(test)]
mod tests {
    use pairdb_proto::common::v1::ErrorDetail;
    use prost::Message;

    use super::*;

    #[test]
    fn reasons_round_trip_through_status_details() {
        let status = status(Reason::QuorumNotReached, "1 of 2", &[("acks", "1".into())]);
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
        ] {
            let reason = Reason::parse(reason).expect("a known reason");
            assert_eq!(http_status_of(reason), http, "{reason}");
        }
    }

    #[test]
    fn every_reason_maps_to_a_status_that_names_it_back() {
        for &reason in Reason::ALL {
            let status = status(reason, "m", &[]);
            assert_eq!(status.code(), grpc_code(reason));
            assert_eq!(known_reason_of(&status), Some(reason));
            assert_eq!(reason_of(&status).as_deref(), Some(reason.as_str()));
            let generic = reason_of_code(grpc_code(reason));
            assert_eq!(grpc_code(generic), grpc_code(reason), "{reason} vs {generic}");
        }
        // A newer peer's reason is not guessed at.
        let detail = ErrorDetail { reason: "SOMETHING_NEW".into(), ..Default::default() };
        let unknown = tonic::Status::with_details(Code::Internal, "m", detail.encode_to_vec().into());
        assert_eq!(known_reason_of(&unknown), None);
    }
}
