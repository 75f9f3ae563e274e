//! Every stable reason code PairDB returns, as one enum. A reason is what clients branch on (never
//! message text); it travels in a `pairdb.common.v1.ErrorDetail` (gRPC) or the JSON error body
//! (HTTP). Its gRPC code and HTTP status are in one exhaustive table in `pairdb-service`, so adding a
//! variant does not compile until it is mapped.
//!
//! Invariant: a reason's name never changes once released (clients match on it); [`Reason::parse`]
//! is the inverse of [`Reason::as_str`].

/// Defines [`Reason`] with its wire names, in one list.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// A stable reason code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The wire name (`SCREAMING_SNAKE_CASE`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }

            /// The reason a wire name stands for; `None` for a name this release does not know
            /// (a newer server's).
            pub fn parse(name: &str) -> Option<Reason> {
                match name {
                    $($name => Some(Reason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    // Generic reasons: a status that carries no PairDB detail is named after its gRPC code.
    InvalidArgument => "INVALID_ARGUMENT",
    Unauthenticated => "UNAUTHENTICATED",
    PermissionDenied => "PERMISSION_DENIED",
    NotFound => "NOT_FOUND",
    AlreadyExists => "ALREADY_EXISTS",
    ResourceExhausted => "RESOURCE_EXHAUSTED",
    FailedPrecondition => "FAILED_PRECONDITION",
    Aborted => "ABORTED",
    Unavailable => "UNAVAILABLE",
    DeadlineExceeded => "DEADLINE_EXCEEDED",
    Cancelled => "CANCELLED",
    Unimplemented => "UNIMPLEMENTED",
    Internal => "INTERNAL",

    // The request is wrong.
    InvalidTenantId => "INVALID_TENANT_ID",
    InvalidKey => "INVALID_KEY",
    InvalidConsistency => "INVALID_CONSISTENCY",
    MalformedVersion => "MALFORMED_VERSION",
    InvalidContext => "INVALID_CONTEXT",
    MalformedRequest => "MALFORMED_REQUEST",
    InvalidPartition => "INVALID_PARTITION",
    PartitionMismatch => "PARTITION_MISMATCH",
    InvalidReplicationFactor => "INVALID_REPLICATION_FACTOR",
    InvalidNode => "INVALID_NODE",
    InvalidConfig => "INVALID_CONFIG",
    InvalidJson => "INVALID_JSON",
    /// A listing's bounds, partitions or page size cannot be served.
    InvalidListing => "INVALID_LISTING",
    /// A page token this router did not issue (or from an incompatible release).
    InvalidPageToken => "INVALID_PAGE_TOKEN",
    InvalidContentType => "INVALID_CONTENT_TYPE",
    BodyTooLarge => "BODY_TOO_LARGE",
    /// A PutMany / DeleteMany with more items or value bytes than one batch may carry.
    BatchTooLarge => "BATCH_TOO_LARGE",
    /// A ring assignment with no nodes.
    NoNodes => "NO_NODES",
    /// A ring assignment naming one node twice.
    DuplicateNode => "DUPLICATE_NODE",
    /// A ring assignment with a node of weight zero.
    ZeroWeight => "ZERO_WEIGHT",
    PartitionCountMismatch => "PARTITION_COUNT_MISMATCH",
    /// A stored preference list that does not fit the ring.
    InvalidList => "INVALID_LIST",

    // Something named does not exist.
    TenantNotFound => "TENANT_NOT_FOUND",
    KeyNotFound => "KEY_NOT_FOUND",
    NodeNotFound => "NODE_NOT_FOUND",
    MigrationNotFound => "MIGRATION_NOT_FOUND",
    ApiKeyNotFound => "API_KEY_NOT_FOUND",

    // Something exists already.
    TenantExists => "TENANT_EXISTS",
    NodeExists => "NODE_EXISTS",
    IdempotencyKeyConflict => "IDEMPOTENCY_KEY_CONFLICT",

    // The cluster is not in a state that allows the request.
    NodeInUse => "NODE_IN_USE",
    NodeRemoved => "NODE_REMOVED",
    NotInCluster => "NOT_IN_CLUSTER",
    MigrationInProgress => "MIGRATION_IN_PROGRESS",
    MigrationFinished => "MIGRATION_FINISHED",
    WrongNode => "WRONG_NODE",
    TenantBeingDeleted => "TENANT_BEING_DELETED",
    StaleDataDirectory => "STALE_DATA_DIRECTORY",
    /// A conditional write's condition did not hold (details: the key's current state).
    PreconditionFailed => "PRECONDITION_FAILED",

    // A limit was hit.
    RateLimited => "RATE_LIMITED",
    ValueTooLarge => "VALUE_TOO_LARGE",
    TooManySiblings => "TOO_MANY_SIBLINGS",
    DiskFull => "DISK_FULL",
    /// The write would grow a tenant that is at its key or byte quota.
    QuotaExceeded => "QUOTA_EXCEEDED",

    // Try again.
    IdempotencyInFlight => "IDEMPOTENCY_IN_FLIGHT",
    QuorumNotReached => "QUORUM_NOT_REACHED",
    WritePathPoisoned => "WRITE_PATH_POISONED",
    NotReady => "NOT_READY",
    SourceUnavailable => "SOURCE_UNAVAILABLE",
    NodeUnavailable => "NODE_UNAVAILABLE",
    /// No replica of some partitions a listing page needs answered (named in the details).
    PartitionsUnavailable => "PARTITIONS_UNAVAILABLE",
    Overloaded => "OVERLOADED",
    MetaUnavailable => "META_UNAVAILABLE",
    IdempotencyStoreUnavailable => "IDEMPOTENCY_STORE_UNAVAILABLE",
    DatabaseUnavailable => "DATABASE_UNAVAILABLE",

    // Out of time.
    CoordinateDeadlinePassed => "COORDINATE_DEADLINE_PASSED",
    /// The client was too slow sending its request body.
    RequestTimeout => "REQUEST_TIMEOUT",

    // Client-side conditions (the client library's, never sent by a server).
    InvalidEndpoint => "INVALID_ENDPOINT",
    ConnectFailed => "CONNECT_FAILED",
    InvalidToken => "INVALID_TOKEN",
}

/// Lets a test or a log filter compare a reason with its wire name directly.
impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that names its stable reason. Every crate's error enum implements it, so the edge maps
/// any error to a status through the one table.
pub trait HasReason {
    fn reason(&self) -> Reason;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_screaming_snake_case_and_parse_back() {
        let mut seen = std::collections::BTreeSet::new();
        for &reason in Reason::ALL {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'), "{name}");
            assert_eq!(Reason::parse(name), Some(reason));
        }
        assert_eq!(Reason::parse("SOMETHING_NEW"), None);
        assert_eq!(Reason::parse("invalid_key"), None);
    }
}
