//! The reason → gRPC code table and the error detail every PairDB status carries. A service's error
//! becomes a `tonic::Status` here (a `google.rpc.Status` with a `google.rpc.ErrorInfo`: reason,
//! domain, metadata in the status details), and a client reads the reason back here, so both ends share one table.
//! The HTTP side of the table is in `pairdb-service`.

pub use pairdb_core::reason::{HasReason, Reason};
use prost::Message;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::common::v1::ErrorDetail;

/// The gRPC code of every reason: the one table (exhaustive, so a new reason must be placed here).
pub const fn grpc_code(reason: Reason) -> Code {
    use Reason as R;
    match reason {
        R::InvalidArgument
        | R::InvalidTenantId
        | R::InvalidKey
        | R::InvalidConsistency
        | R::MalformedVersion
        | R::InvalidContext
        | R::MalformedRequest
        | R::InvalidPartition
        | R::PartitionMismatch
        | R::InvalidReplicationFactor
        | R::InvalidNode
        | R::InvalidConfig
        | R::InvalidJson
        | R::InvalidListing
        | R::InvalidPageToken
        | R::InvalidContentType
        | R::BodyTooLarge
        | R::BatchTooLarge
        | R::InvalidEndpoint
        | R::InvalidToken => Code::InvalidArgument,
        R::Unauthenticated => Code::Unauthenticated,
        R::PermissionDenied => Code::PermissionDenied,
        R::NotFound
        | R::TenantNotFound
        | R::KeyNotFound
        | R::NodeNotFound
        | R::MigrationNotFound
        | R::ApiKeyNotFound => Code::NotFound,
        R::AlreadyExists | R::TenantExists | R::NodeExists | R::IdempotencyKeyConflict => Code::AlreadyExists,
        R::FailedPrecondition
        | R::NodeInUse
        | R::NodeRemoved
        | R::NotInCluster
        | R::MigrationInProgress
        | R::MigrationFinished
        | R::WrongNode
        | R::TenantBeingDeleted
        | R::StaleDataDirectory
        | R::PreconditionFailed => Code::FailedPrecondition,
        R::ResourceExhausted
        | R::RateLimited
        | R::ValueTooLarge
        | R::TooManySiblings
        | R::DiskFull
        | R::QuotaExceeded => Code::ResourceExhausted,
        R::Aborted | R::IdempotencyInFlight => Code::Aborted,
        R::Unavailable
        | R::QuorumNotReached
        | R::WritePathPoisoned
        | R::NotReady
        | R::SourceUnavailable
        | R::NodeUnavailable
        | R::PartitionsUnavailable
        | R::Overloaded
        | R::MetaUnavailable
        | R::IdempotencyStoreUnavailable
        | R::DatabaseUnavailable
        | R::ConnectFailed => Code::Unavailable,
        R::DeadlineExceeded | R::CoordinateDeadlinePassed | R::RequestTimeout => Code::DeadlineExceeded,
        R::Cancelled => Code::Cancelled,
        R::Unimplemented => Code::Unimplemented,
        // A ring that cannot be built is meta's own inconsistency, never the caller's.
        R::Internal
        | R::NoNodes
        | R::DuplicateNode
        | R::ZeroWeight
        | R::PartitionCountMismatch
        | R::InvalidList => Code::Internal,
    }
}

/// The reason a status with no PairDB detail stands for (a proxy's, the transport's): its code's.
pub const fn reason_of_code(code: Code) -> Reason {
    match code {
        Code::InvalidArgument | Code::OutOfRange => Reason::InvalidArgument,
        Code::Unauthenticated => Reason::Unauthenticated,
        Code::PermissionDenied => Reason::PermissionDenied,
        Code::NotFound => Reason::NotFound,
        Code::AlreadyExists => Reason::AlreadyExists,
        Code::ResourceExhausted => Reason::ResourceExhausted,
        Code::FailedPrecondition => Reason::FailedPrecondition,
        Code::Aborted => Reason::Aborted,
        Code::Unavailable => Reason::Unavailable,
        Code::DeadlineExceeded => Reason::DeadlineExceeded,
        Code::Cancelled => Reason::Cancelled,
        Code::Unimplemented => Reason::Unimplemented,
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Reason::Internal,
    }
}

/// The `ErrorInfo.domain` of every PairDB error.
pub const ERROR_DOMAIN: &str = "pairdb.dev";

/// A status for `reason` with a human message and structured metadata in its details: the standard
/// `google.rpc.Status` carrying a `google.rpc.ErrorInfo` (reason, domain [`ERROR_DOMAIN`], metadata),
/// which stock gRPC clients read (`grpcio-status`, grpc-go's `status.FromError(..).Details()`).
pub fn status(reason: Reason, message: impl Into<String>, metadata: &[(&str, String)]) -> tonic::Status {
    let metadata: std::collections::HashMap<String, String> =
        metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let details = ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, metadata);
    tonic::Status::with_error_details(grpc_code(reason), message, details)
}

/// A status for an internal API (the storage service, meta's cluster service) in the previous
/// release's encoding: a bare `pairdb.common.v1.ErrorDetail` in the details. During a rolling upgrade
/// routers and storage nodes of the previous release call these APIs and read only that encoding; a
/// reason they could not read would turn a refusal every replica gives (VALUE_TOO_LARGE) into a
/// failed node. This release reads both ([`detail_of`]); the release after it switches these APIs to
/// [`status`].
pub fn internal_status(
    reason: Reason,
    message: impl Into<String>,
    metadata: &[(&str, String)],
) -> tonic::Status {
    let message = message.into();
    let detail = ErrorDetail {
        reason: reason.as_str().to_owned(),
        message: message.clone(),
        metadata: metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
    };
    tonic::Status::with_details(grpc_code(reason), message, detail.encode_to_vec().into())
}

/// The structured detail of a PairDB status, if any: from its `google.rpc.ErrorInfo`, or — from a
/// previous release, which sent a bare `pairdb.common.v1.ErrorDetail` — from that. The two encodings
/// cannot be mistaken for each other (field 1 is an integer in one and a string in the other).
pub fn detail_of(status: &tonic::Status) -> Option<ErrorDetail> {
    if let Some(info) =
        status.get_details_error_info().filter(|i| i.domain == ERROR_DOMAIN && !i.reason.is_empty())
    {
        return Some(ErrorDetail {
            reason: info.reason,
            message: status.message().to_owned(),
            metadata: info.metadata.into_iter().collect(),
        });
    }
    ErrorDetail::decode(status.details()).ok().filter(|d| !d.reason.is_empty())
}

/// The status of any error that names its reason, with its message.
pub fn status_of<E: HasReason + std::fmt::Display>(error: &E) -> tonic::Status {
    status(error.reason(), error.to_string(), &[])
}

/// The reason a status names on the wire, as sent: a peer on a newer release may name a reason this
/// one does not know, and a client or a log should still see it. `None` without PairDB detail.
pub fn reason_of(status: &tonic::Status) -> Option<String> {
    detail_of(status).map(|d| d.reason)
}

/// The reason of a status made by [`status`], when this release knows it; what code decides on.
pub fn known_reason_of(status: &tonic::Status) -> Option<Reason> {
    detail_of(status).and_then(|d| Reason::parse(&d.reason))
}
