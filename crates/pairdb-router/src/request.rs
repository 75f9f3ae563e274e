//! The KV API's requests and replies in the router's own terms. The gRPC edge ([`crate::grpc`]) and
//! the HTTP edge ([`crate::http`]) each convert their wire format to these once and render the
//! replies from them; nothing behind the edges sees a `pairdb.kv.v1` message.
//!
//! A consistency level the edge cannot read is refused there (INVALID_CONSISTENCY), on both edges,
//! before any tenant lookup.

use pairdb_core::condition::WriteCondition;
use pairdb_core::dvv::VersionVector;
use pairdb_core::expiry::Requested;
use pairdb_core::quorum::Consistency;

use crate::error::RouterError;
use crate::kv::ReadOutcome;

/// What a request asks for: a level or an explicit count, and a deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// `None`: the tenant's default level.
    pub consistency: Option<Consistency>,
    /// Explicit R or W (0: use the level).
    pub explicit: u32,
    pub strict_quorum: bool,
    /// 0: the router's default timeout.
    pub timeout_ms: u32,
}

/// A put (`value` set) or a delete (`value` `None`).
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// Empty: the caller's own tenant (API-key callers).
    pub tenant_id: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
    /// The sealed context of an earlier read or write; empty for a blind write.
    pub context: Vec<u8>,
    /// Supersede whatever the key holds (a put read first); deletes always do.
    pub overwrite: bool,
    pub options: RequestOptions,
    /// Empty: the write is not deduplicated (see [`crate::kv_api`]).
    pub idempotency_key: String,
    /// Apply the write only if this holds (PRECONDITION_FAILED otherwise).
    pub condition: Option<WriteCondition>,
    /// When a put's value expires (a touch's new expiry).
    pub expiry: Requested,
    /// A Touch (`value` is `None`): the live values `context` names get `expiry`.
    pub touch: bool,
}

impl WriteRequest {
    pub fn operation(&self) -> &'static str {
        match (&self.value, self.touch) {
            (Some(_), _) => "put",
            (None, true) => "touch",
            (None, false) => "delete",
        }
    }
}

/// One write of a PutMany / DeleteMany ([`crate::batch`]).
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub key: String,
    /// `None`: a delete.
    pub value: Option<Vec<u8>>,
    /// The sealed context of an earlier read or write of this key; empty for a blind write.
    pub context: Vec<u8>,
    /// Supersede what a read sees (a put read first).
    pub overwrite: bool,
    pub condition: Option<WriteCondition>,
    pub expiry: Requested,
}

/// A PutMany / DeleteMany.
#[derive(Debug, Clone)]
pub struct WriteManyRequest {
    pub tenant_id: String,
    pub items: Vec<BatchItem>,
    pub options: RequestOptions,
    /// Applies to the whole batch (empty: not deduplicated).
    pub idempotency_key: String,
}

/// A get of one key.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub tenant_id: String,
    pub key: String,
    pub options: RequestOptions,
}

/// A GetMany: each key is read on its own, with the same options.
#[derive(Debug, Clone)]
pub struct ReadManyRequest {
    pub tenant_id: String,
    pub keys: Vec<String>,
    pub options: RequestOptions,
}

/// The acknowledgement of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteAck {
    /// The sealed context of the written set.
    pub context: Vec<u8>,
    pub vector: VersionVector,
    pub acks: u32,
    pub required: u32,
    pub hinted_acks: u32,
    /// A replay of an earlier identical request with the same idempotency key.
    pub duplicate: bool,
    pub idempotency_key: String,
}

/// One key of a GetMany.
#[derive(Debug)]
pub struct KeyRead {
    pub key: String,
    /// `Ok(None)`: not found.
    pub result: Result<Option<ReadOutcome>, RouterError>,
}
