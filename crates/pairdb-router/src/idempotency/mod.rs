//! Idempotency records for keyed puts and deletes (DynamoDB's contract).
//!
//! A client may send an idempotency key with a put or delete. The router keeps one record per
//! (tenant, idempotency key) holding a [`Fingerprint`] of the request and, once the write is done, the
//! encoded response, so that a retry is answered from the record instead of being applied twice:
//!
//! 1. [`IdempotencyStore::begin`] reserves the key atomically with a short in-flight lease and returns
//!    [`Begin::Reserved`], or answers a retry: [`Begin::Completed`] with the stored response when the
//!    fingerprint matches, [`IdempotencyError::Conflict`] when it does not, and
//!    [`IdempotencyError::InFlight`] (retryable) while the first attempt still holds the lease.
//! 2. After the write the caller hands the [`Reservation`] back: [`IdempotencyStore::complete`] stores
//!    the response for [`IdempotencySettings::retention`]; [`IdempotencyStore::release`] forgets the
//!    record after a failed attempt so a retry can run again.
//!
//! Two backends keep the same contract (one test suite, `tests/idempotency.rs`, runs against both):
//! [`MemoryStore`], the embedded default serving a single router, and [`RedisStore`], shared by every
//! router and surviving router restarts.
//!
//! Invariants:
//! - At most one [`Reservation`] owns a record at a time. `complete` and `release` are compare-and-set on
//!   the reservation's random token, so a reservation whose lease expired (and whose key another request
//!   then reserved) can neither overwrite nor delete the new owner's record.
//! - The lease bounds how long a crashed router, or a request whose future was dropped, blocks the key.
//!   It must exceed the router's maximum request timeout: a lease that expires while its write is still
//!   running lets a retry apply the write a second time.
//! - Every store call is bounded by [`IdempotencySettings::operation_timeout`]; an unreachable store
//!   yields [`IdempotencyError::Unavailable`], never a hang. Callers fail keyed writes with UNAVAILABLE
//!   and serve unkeyed writes as usual.
//! - Both backends are bounded: Redis by its own memory policy and the retention TTL, the memory store by
//!   [`IdempotencySettings::memory_max_entries`] records and [`IdempotencySettings::memory_max_bytes`]
//!   of keys and recorded responses (it rejects new keys with `Unavailable` when full rather than grow,
//!   and never drops a live record to make room: that would let a retry apply its write twice). A
//!   batch's recorded response holds one acknowledgement per item, ~100 bytes each (its context and
//!   vector; the batch's key is stored once), so the byte bound is the one a tenant sending keyed
//!   1,000-item batches meets first.
//!
//! Record encoding (the Redis value; version 1). All integers big-endian:
//!
//! ```text
//! offset  size  field
//! 0       1     format version = 1
//! 1       1     state: 1 = in flight, 2 = completed
//! 2       16    reservation token (u128)
//! 18      32    fingerprint (SHA-256)
//! 50      ..    response bytes (completed records only; empty for in-flight records)
//! ```
//!
//! The response bytes are the write's acknowledgement as a `pairdb.kv.v1.WriteAck` protobuf message
//! ([`encode_ack`] / [`decode_ack`]): a stable, versioned encoding the router already speaks, so a
//! record stored by one release replays under the next.
//!
//! The compare-and-set scripts compare the first 18 bytes (version, in-flight state and token), so a
//! record of another format version is never taken for one of ours. A record that does not decode yields
//! `Unavailable` (it may come from a newer router; treating it as absent could apply a write twice).

mod memory;
mod redis;

use std::time::Duration;

use pairdb_core::dvv::{Actor, VersionVector};
use pairdb_core::reason::{HasReason, Reason};
use pairdb_proto::common::v1::VersionEntry;
use pairdb_proto::kv::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::request::WriteAck;

pub use self::memory::MemoryStore;
pub use self::redis::{InvalidRedisUrl, RedisStore, eviction_warning};

/// The stored form of a write's acknowledgement (see the module docs).
pub fn encode_ack(ack: &WriteAck) -> Vec<u8> {
    pb::WriteAck {
        context: ack.context.clone(),
        version_vector: ack
            .vector
            .entries()
            .map(|(actor, counter)| VersionEntry { actor: actor.0, counter })
            .collect(),
        acks: ack.acks,
        required: ack.required,
        hinted_acks: ack.hinted_acks,
        duplicate: ack.duplicate,
        idempotency_key: ack.idempotency_key.clone(),
    }
    .encode_to_vec()
}

/// The acknowledgement a completed record stores.
pub fn decode_ack(stored: &[u8]) -> Result<WriteAck, IdempotencyError> {
    let ack = pb::WriteAck::decode(stored)
        .map_err(|error| IdempotencyError::Unavailable(format!("stored reply unreadable: {error}")))?;
    Ok(WriteAck {
        context: ack.context,
        vector: VersionVector::from_entries(ack.version_vector.iter().map(|e| (Actor(e.actor), e.counter))),
        acks: ack.acks,
        required: ack.required,
        hinted_acks: ack.hinted_acks,
        duplicate: ack.duplicate,
        idempotency_key: ack.idempotency_key,
    })
}

/// SHA-256 of the canonical request: the router hashes every field that decides the write's outcome
/// (operation, key, value, context, consistency, ...), so "same key, different request" is detected.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Hashes `parts` with each part prefixed by its length (u64, big-endian), so that moving bytes from
    /// one part to the next changes the fingerprint (`["ab", "c"]` ≠ `["a", "bc"]`).
    pub fn of(parts: &[&[u8]]) -> Fingerprint {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Fingerprint(hasher.finalize().into())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint(")?;
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The outcome of [`IdempotencyStore::begin`].
#[derive(Debug)]
#[must_use = "a reservation must be completed or released"]
pub enum Begin {
    /// The key is reserved for this request (an in-flight lease was taken atomically); the caller must
    /// later call [`IdempotencyStore::complete`] or [`IdempotencyStore::release`].
    Reserved(Reservation),
    /// An earlier request with the same fingerprint completed: replay this stored response (the bytes the
    /// router passed to `complete`).
    Completed(Vec<u8>),
}

/// Proof of an in-flight lease on one (tenant, idempotency key). Handed back to `complete` or `release`;
/// if it is dropped instead, the lease expires on its own.
#[derive(Debug)]
pub struct Reservation {
    tenant: String,
    key: String,
    /// Random per reservation; `complete` and `release` act only while the record still carries it.
    token: u128,
    fingerprint: Fingerprint,
}

impl Reservation {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyError {
    /// The key was used by a request with a different fingerprint.
    #[error("idempotency key was already used for a different request")]
    Conflict,
    /// The same request is still being applied by an earlier attempt; retry later.
    #[error("a request with this idempotency key is still in flight")]
    InFlight,
    /// The store is unreachable, timed out, full, or holds a record this router cannot read.
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
}

impl HasReason for IdempotencyError {
    fn reason(&self) -> Reason {
        match self {
            IdempotencyError::Conflict => Reason::IdempotencyKeyConflict,
            IdempotencyError::InFlight => Reason::IdempotencyInFlight,
            IdempotencyError::Unavailable(_) => Reason::IdempotencyStoreUnavailable,
        }
    }
}

/// Timing and bounds shared by both backends.
#[derive(Debug, Clone)]
pub struct IdempotencySettings {
    /// How long a completed record (and its response) is kept. Default 24 h.
    pub retention: Duration,
    /// How long an in-flight reservation blocks the key if it is neither completed nor released (crashed
    /// router, dropped request). Must exceed the router's maximum request timeout. Default 30 s.
    pub lease: Duration,
    /// Bound on each store call (Redis round trip, including waiting for a connection). Default 500 ms.
    pub operation_timeout: Duration,
    /// Maximum number of records the memory store holds (expired records are evicted first). Default
    /// 1,000,000.
    pub memory_max_entries: usize,
    /// Maximum bytes of keys and recorded responses the memory store holds; a reservation is refused
    /// once they reach it, so it is exceeded by at most the responses of reservations in flight.
    /// Default 256 MiB.
    pub memory_max_bytes: usize,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        IdempotencySettings {
            retention: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(30),
            operation_timeout: Duration::from_millis(500),
            memory_max_entries: 1_000_000,
            memory_max_bytes: 256 << 20,
        }
    }
}

/// The idempotency record store: embedded or Redis-backed, with one contract. Cloning is cheap and
/// clones share the same records.
#[derive(Debug, Clone)]
pub enum IdempotencyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl IdempotencyStore {
    /// The embedded store for a single router.
    pub fn memory(settings: IdempotencySettings) -> IdempotencyStore {
        IdempotencyStore::Memory(MemoryStore::new(settings))
    }

    /// A Redis-backed store. Connects lazily: this fails only for a malformed URL, never because Redis is
    /// down. Must be called inside a tokio runtime.
    pub fn redis(url: &str, settings: IdempotencySettings) -> Result<IdempotencyStore, InvalidRedisUrl> {
        Ok(IdempotencyStore::Redis(RedisStore::new(url, settings)?))
    }

    /// Reserves `key` for `tenant`, or answers a retry of an earlier request (see [`Begin`]).
    pub async fn begin(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Begin, IdempotencyError> {
        match self {
            IdempotencyStore::Memory(store) => store.begin(tenant, key, fingerprint),
            IdempotencyStore::Redis(store) => store.begin(tenant, key, fingerprint).await,
        }
    }

    /// Stores `response` for the retention period, if `reservation` still owns the record. A reservation
    /// that lost its lease to another request changes nothing (and this returns `Ok`).
    pub async fn complete(&self, reservation: Reservation, response: &[u8]) -> Result<(), IdempotencyError> {
        match self {
            IdempotencyStore::Memory(store) => store.complete(reservation, response),
            IdempotencyStore::Redis(store) => store.complete(reservation, response).await,
        }
    }

    /// Forgets the record after a failed attempt, if `reservation` still owns it.
    pub async fn release(&self, reservation: Reservation) -> Result<(), IdempotencyError> {
        match self {
            IdempotencyStore::Memory(store) => store.release(reservation),
            IdempotencyStore::Redis(store) => store.release(reservation).await,
        }
    }
}

const RECORD_VERSION: u8 = 1;
const STATE_IN_FLIGHT: u8 = 1;
const STATE_COMPLETED: u8 = 2;
/// Version, state and token: the prefix the compare-and-set scripts match.
const OWNER_PREFIX_LEN: usize = 18;
const HEADER_LEN: usize = OWNER_PREFIX_LEN + 32;

/// A decoded record (the format is in the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    InFlight { token: u128, fingerprint: Fingerprint },
    Completed { token: u128, fingerprint: Fingerprint, response: Vec<u8> },
}

impl Record {
    fn fingerprint(&self) -> &Fingerprint {
        match self {
            Record::InFlight { fingerprint, .. } | Record::Completed { fingerprint, .. } => fingerprint,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let (state, token, fingerprint, response): (u8, u128, &Fingerprint, &[u8]) = match self {
            Record::InFlight { token, fingerprint } => (STATE_IN_FLIGHT, *token, fingerprint, &[]),
            Record::Completed { token, fingerprint, response } => {
                (STATE_COMPLETED, *token, fingerprint, response)
            }
        };
        let mut out = Vec::with_capacity(HEADER_LEN + response.len());
        out.push(RECORD_VERSION);
        out.push(state);
        out.extend_from_slice(&token.to_be_bytes());
        out.extend_from_slice(&fingerprint.0);
        out.extend_from_slice(response);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Record, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("idempotency record too short ({} bytes)", bytes.len()));
        }
        if bytes[0] != RECORD_VERSION {
            return Err(format!("unknown idempotency record version {}", bytes[0]));
        }
        let mut token = [0u8; 16];
        token.copy_from_slice(&bytes[2..OWNER_PREFIX_LEN]);
        let token = u128::from_be_bytes(token);
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&bytes[OWNER_PREFIX_LEN..HEADER_LEN]);
        let fingerprint = Fingerprint(fingerprint);
        let response = &bytes[HEADER_LEN..];
        match bytes[1] {
            STATE_IN_FLIGHT if response.is_empty() => Ok(Record::InFlight { token, fingerprint }),
            STATE_IN_FLIGHT => Err("in-flight idempotency record carries a response".to_owned()),
            STATE_COMPLETED => Ok(Record::Completed { token, fingerprint, response: response.to_vec() }),
            state => Err(format!("unknown idempotency record state {state}")),
        }
    }

    /// The prefix an in-flight record owned by `token` starts with.
    pub(crate) fn owner_prefix(token: u128) -> [u8; OWNER_PREFIX_LEN] {
        let mut prefix = [0u8; OWNER_PREFIX_LEN];
        prefix[0] = RECORD_VERSION;
        prefix[1] = STATE_IN_FLIGHT;
        prefix[2..].copy_from_slice(&token.to_be_bytes());
        prefix
    }
}

/// How `begin` answers when a record already exists: the decision both backends share.
fn answer_existing(existing: &Record, fingerprint: &Fingerprint) -> Result<Begin, IdempotencyError> {
    if existing.fingerprint() != fingerprint {
        return Err(IdempotencyError::Conflict);
    }
    match existing {
        Record::InFlight { .. } => Err(IdempotencyError::InFlight),
        Record::Completed { response, .. } => Ok(Begin::Completed(response.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_length_prefixes_parts() {
        assert_ne!(Fingerprint::of(&[b"ab", b"c"]), Fingerprint::of(&[b"a", b"bc"]));
        assert_ne!(Fingerprint::of(&[b"", b"a"]), Fingerprint::of(&[b"a"]));
        assert_eq!(Fingerprint::of(&[b"put", b"k"]), Fingerprint::of(&[b"put", b"k"]));
    }

    #[test]
    fn fingerprint_is_sha256_of_length_prefixed_parts() {
        let mut manual = Vec::new();
        manual.extend_from_slice(&3u64.to_be_bytes());
        manual.extend_from_slice(b"put");
        let expected: [u8; 32] = Sha256::digest(&manual).into();
        assert_eq!(Fingerprint::of(&[b"put"]).0, expected);
    }

    #[test]
    fn records_round_trip() {
        let fingerprint = Fingerprint::of(&[b"x"]);
        let records = [
            Record::InFlight { token: u128::MAX - 7, fingerprint },
            Record::Completed { token: 42, fingerprint, response: b"ack".to_vec() },
            Record::Completed { token: 0, fingerprint, response: Vec::new() },
        ];
        for record in records {
            assert_eq!(Record::decode(&record.encode()), Ok(record));
        }
    }

    #[test]
    fn record_format_version_1_is_stable() {
        // A fixture of the stored format: changing the encoding must bump the version.
        let record = Record::Completed {
            token: 0x0102,
            fingerprint: Fingerprint([0xab; 32]),
            response: b"r".to_vec(),
        };
        let mut fixture = vec![1u8, 2];
        fixture.extend_from_slice(&[0; 14]);
        fixture.extend_from_slice(&[1, 2]);
        fixture.extend_from_slice(&[0xab; 32]);
        fixture.push(b'r');
        assert_eq!(record.encode(), fixture);
        assert_eq!(Record::decode(&fixture), Ok(record));
    }

    #[test]
    fn owner_prefix_matches_only_in_flight_records_of_that_token() {
        let fingerprint = Fingerprint::of(&[b"x"]);
        let in_flight = Record::InFlight { token: 9, fingerprint }.encode();
        assert!(in_flight.starts_with(&Record::owner_prefix(9)));
        assert!(!in_flight.starts_with(&Record::owner_prefix(10)));
        let completed = Record::Completed { token: 9, fingerprint, response: vec![1] }.encode();
        assert!(!completed.starts_with(&Record::owner_prefix(9)));
    }

    #[test]
    fn malformed_records_are_rejected() {
        let good = Record::InFlight { token: 1, fingerprint: Fingerprint([0; 32]) }.encode();
        assert!(Record::decode(&good[..HEADER_LEN - 1]).is_err());
        let mut wrong_version = good.clone();
        wrong_version[0] = 2;
        assert!(Record::decode(&wrong_version).is_err());
        let mut wrong_state = good.clone();
        wrong_state[1] = 3;
        assert!(Record::decode(&wrong_state).is_err());
        let mut in_flight_with_response = good;
        in_flight_with_response.push(0);
        assert!(Record::decode(&in_flight_with_response).is_err());
    }

    #[test]
    fn reasons_are_stable() {
        assert_eq!(IdempotencyError::Conflict.reason(), "IDEMPOTENCY_KEY_CONFLICT");
        assert_eq!(IdempotencyError::InFlight.reason(), "IDEMPOTENCY_IN_FLIGHT");
        assert_eq!(IdempotencyError::Unavailable("x".into()).reason(), "IDEMPOTENCY_STORE_UNAVAILABLE");
    }
}
