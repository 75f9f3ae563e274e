//! Client causal contexts: the opaque token a read or a write returns and a later write carries to
//! say "I have seen these versions".
//!
//! A context is a version vector *sealed* by a router: MACed (HMAC-SHA256, truncated to 128 bits)
//! with a cluster context key and bound to the (tenant, key) it was issued for. Only routers hold the
//! keys (meta pushes them to routers only), so a client can present only contexts a router issued,
//! for the very key it names: a forged, edited, borrowed (another tenant's or another key's) or
//! expired (retired key) context is refused with `INVALID_CONTEXT` before anything is parsed or
//! stored. The vector inside is not secret (replies carry it in clear too); the MAC makes it
//! trustworthy.
//!
//! Sealed context, format 2:
//! ```text
//! u8 2 | varint key_id | varint n | n × (actor u64le, counter varint) | 16-byte tag
//! tag = HMAC-SHA256(key, "pairdb/context/v2" 0x00 | varint len(tenant) | tenant
//!                         | varint len(key) | key | every byte before the tag)[..16]
//! ```
//! Key rotation: a [`ContextKeyRing`] holds the current key (used to seal) and the previous one
//! (still accepted), so a context issued before one rotation keeps working and one issued before two
//! rotations is refused.
//!
//! Laws (tested below and in `tests/dvv_laws.rs`): `open(seal(v, b, k), b, ring ∋ k) = v`; changing
//! any byte, the binding or the key makes `open` fail; `open` never panics and never allocates more
//! than the input's length allows.

use crate::reason::{HasReason, Reason};
use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::dvv::VersionVector;
use crate::encoding::{DecodeError, Reader, put_varint, put_vector, read_vector};

/// Format byte of a sealed context.
pub const SEALED_CONTEXT_FORMAT: u8 = 2;
/// Bytes of the truncated MAC.
pub const CONTEXT_TAG_LEN: usize = 16;
/// Bytes of a context key's secret.
pub const CONTEXT_SECRET_LEN: usize = 32;
/// Longest context accepted: the header plus `MAX_DECODED_ACTORS` entries of the longest encoding.
pub const MAX_CONTEXT_BYTES: usize = 1 + 5 + 3 + crate::encoding::MAX_DECODED_ACTORS * 17 + CONTEXT_TAG_LEN;
const MAC_DOMAIN: &[u8] = b"pairdb/context/v2\0";

type HmacSha256 = hmac::Hmac<Sha256>;

/// One context key: an id (≥ 1, unique over the cluster's life) and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ContextKey {
    id: u32,
    secret: [u8; CONTEXT_SECRET_LEN],
}

impl std::fmt::Debug for ContextKey {
    /// Secrets are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextKey").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// A key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextKeyError {
    #[error("context key id 0 is reserved")]
    ZeroId,
    #[error("context key secret must be {CONTEXT_SECRET_LEN} bytes, got {0}")]
    SecretLength(usize),
}

impl ContextKey {
    pub fn new(id: u32, secret: &[u8]) -> Result<Self, ContextKeyError> {
        if id == 0 {
            return Err(ContextKeyError::ZeroId);
        }
        let secret: [u8; CONTEXT_SECRET_LEN] =
            secret.try_into().map_err(|_| ContextKeyError::SecretLength(secret.len()))?;
        Ok(Self { id, secret })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    fn mac(&self, binding: ContextBinding<'_>, body: &[u8]) -> HmacSha256 {
        // The secret is exactly 32 bytes and HMAC takes keys of any length.
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable_hmac_key());
        let mut prefix = Vec::with_capacity(MAC_DOMAIN.len() + 8 + binding.tenant.len() + binding.key.len());
        prefix.extend_from_slice(MAC_DOMAIN);
        put_varint(&mut prefix, binding.tenant.len() as u64);
        prefix.extend_from_slice(binding.tenant.as_bytes());
        put_varint(&mut prefix, binding.key.len() as u64);
        prefix.extend_from_slice(binding.key.as_bytes());
        mac.update(&prefix);
        mac.update(body);
        mac
    }
}

/// HMAC accepts every key length, so this is never reached; it exists to avoid a panic path.
#[cold]
fn unreachable_hmac_key() -> HmacSha256 {
    debug_assert!(false, "HMAC-SHA256 refused a 32-byte key");
    <HmacSha256 as KeyInit>::new(&Default::default())
}

/// The keys a router seals with (current) and accepts (current and previous).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextKeyRing {
    current: Option<ContextKey>,
    previous: Option<ContextKey>,
}

impl ContextKeyRing {
    pub fn new(current: ContextKey, previous: Option<ContextKey>) -> Self {
        debug_assert!(previous.as_ref().is_none_or(|p| p.id != current.id), "two keys with one id");
        Self { current: Some(current), previous }
    }

    /// The key new contexts are sealed with; `None` before meta sent any.
    pub fn current(&self) -> Option<&ContextKey> {
        self.current.as_ref()
    }

    fn find(&self, id: u32) -> Option<&ContextKey> {
        [self.current.as_ref(), self.previous.as_ref()].into_iter().flatten().find(|key| key.id == id)
    }
}

/// What a context is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextBinding<'a> {
    pub tenant: &'a str,
    pub key: &'a str,
}

/// Why a client context was refused. Every variant answers `INVALID_CONTEXT`: the client should
/// read the key again for a fresh context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("context is not a sealed context: {0}")]
    Malformed(DecodeError),
    #[error("context is {0} bytes, above the limit of {MAX_CONTEXT_BYTES}")]
    TooLong(usize),
    #[error("context was sealed with key {0}, which has been retired or was never issued")]
    UnknownKey(u32),
    #[error("context was not issued by this cluster for this tenant and key")]
    Forged,
}

impl HasReason for ContextError {
    /// Stable reason code for error replies.
    fn reason(&self) -> Reason {
        Reason::InvalidContext
    }
}

/// Seals `vector` for (tenant, key) with `key`.
pub fn seal_context(vector: &VersionVector, binding: ContextBinding<'_>, key: &ContextKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + vector.len() * 12 + CONTEXT_TAG_LEN);
    out.push(SEALED_CONTEXT_FORMAT);
    put_varint(&mut out, u64::from(key.id));
    put_vector(&mut out, vector);
    let tag = key.mac(binding, &out).finalize().into_bytes();
    out.extend_from_slice(&tag[..CONTEXT_TAG_LEN]);
    out
}

/// Verifies a client context for (tenant, key) and returns its vector. Empty input is the empty
/// context (a blind write). The MAC is checked before the vector is parsed.
pub fn open_context(
    bytes: &[u8],
    binding: ContextBinding<'_>,
    ring: &ContextKeyRing,
) -> Result<VersionVector, ContextError> {
    if bytes.is_empty() {
        return Ok(VersionVector::new());
    }
    if bytes.len() > MAX_CONTEXT_BYTES {
        return Err(ContextError::TooLong(bytes.len()));
    }
    let (key_id, body, tag) = split_sealed(bytes).map_err(ContextError::Malformed)?;
    let key = ring.find(key_id).ok_or(ContextError::UnknownKey(key_id))?;
    key.mac(binding, body).verify_truncated_left(tag).map_err(|_| ContextError::Forged)?;
    parse_body(body).map_err(ContextError::Malformed)
}

/// The vector inside a sealed context, WITHOUT verifying it: for tests and diagnostics only, never
/// for a decision.
pub fn context_vector_unverified(bytes: &[u8]) -> Result<VersionVector, DecodeError> {
    if bytes.is_empty() {
        return Ok(VersionVector::new());
    }
    let (_, body, _) = split_sealed(bytes)?;
    parse_body(body)
}

/// (key id, body = every byte before the tag, tag).
fn split_sealed(bytes: &[u8]) -> Result<(u32, &[u8], &[u8]), DecodeError> {
    let format = *bytes.first().ok_or(DecodeError::Empty)?;
    if format != SEALED_CONTEXT_FORMAT {
        return Err(DecodeError::UnknownFormat(format));
    }
    if bytes.len() < 1 + 1 + 1 + CONTEXT_TAG_LEN {
        return Err(DecodeError::Truncated);
    }
    let (body, tag) = bytes.split_at(bytes.len() - CONTEXT_TAG_LEN);
    let mut reader = Reader::new(body.get(1..).unwrap_or_default());
    let key_id = u32::try_from(reader.varint()?).map_err(|_| DecodeError::VarintOverflow)?;
    Ok((key_id, body, tag))
}

fn parse_body(body: &[u8]) -> Result<VersionVector, DecodeError> {
    let mut reader = Reader::new(body.get(1..).unwrap_or_default());
    reader.varint()?;
    let vector = read_vector(&mut reader)?;
    reader.finish()?;
    Ok(vector)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dvv::{Actor, MAX_COUNTER};

    fn key(id: u32, byte: u8) -> ContextKey {
        ContextKey::new(id, &[byte; CONTEXT_SECRET_LEN]).unwrap()
    }

    const BOUND: ContextBinding<'static> = ContextBinding { tenant: "acme", key: "greeting" };

    #[test]
    fn sealed_contexts_open_only_for_their_binding_and_keys() {
        let vector = VersionVector::from_entries([(Actor(7), 2), (Actor(9), 1)]);
        let ring = ContextKeyRing::new(key(1, 1), None);
        let sealed = seal_context(&vector, BOUND, &key(1, 1));
        assert_eq!(open_context(&sealed, BOUND, &ring).unwrap(), vector);
        // Three actors take a few dozen bytes.
        assert!(sealed.len() <= 2 + 1 + 2 * 9 + CONTEXT_TAG_LEN, "{}", sealed.len());

        let other_tenant = ContextBinding { tenant: "other", key: "greeting" };
        assert_eq!(open_context(&sealed, other_tenant, &ring), Err(ContextError::Forged));
        let other_key = ContextBinding { tenant: "acme", key: "greeting2" };
        assert_eq!(open_context(&sealed, other_key, &ring), Err(ContextError::Forged));
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        let a = seal_context(&vector, ContextBinding { tenant: "ab", key: "c" }, &key(1, 1));
        assert!(open_context(&a, ContextBinding { tenant: "a", key: "bc" }, &ring).is_err());

        let other_secret = ContextKeyRing::new(key(1, 2), None);
        assert_eq!(open_context(&sealed, BOUND, &other_secret), Err(ContextError::Forged));
        assert_eq!(open_context(&[], BOUND, &ring).unwrap(), VersionVector::new());
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let vector = VersionVector::from_entries([(Actor(7), 2)]);
        let ring = ContextKeyRing::new(key(3, 1), None);
        let sealed = seal_context(&vector, BOUND, &key(3, 1));
        for at in 0..sealed.len() {
            for bit in 0..8 {
                let mut edited = sealed.clone();
                edited[at] ^= 1 << bit;
                assert!(open_context(&edited, BOUND, &ring).is_err(), "byte {at} bit {bit}");
            }
        }
    }

    #[test]
    fn rotation_keeps_the_previous_key_and_retires_the_one_before() {
        let vector = VersionVector::from_entries([(Actor(1), 1)]);
        let old = seal_context(&vector, BOUND, &key(1, 1));
        let after_one = ContextKeyRing::new(key(2, 2), Some(key(1, 1)));
        assert_eq!(open_context(&old, BOUND, &after_one).unwrap(), vector);
        let after_two = ContextKeyRing::new(key(3, 3), Some(key(2, 2)));
        assert_eq!(open_context(&old, BOUND, &after_two), Err(ContextError::UnknownKey(1)));
        assert_eq!(open_context(&old, BOUND, &ContextKeyRing::default()), Err(ContextError::UnknownKey(1)));
    }

    /// Forgeries that a checksum could not stop: a client re-encoding the vector it wants (saturated
    /// counters, invented actors) cannot produce the tag, so nothing of it is parsed.
    #[test]
    fn forged_vectors_are_refused_before_parsing() {
        let ring = ContextKeyRing::new(key(1, 1), None);
        let mut forged = vec![SEALED_CONTEXT_FORMAT, 1];
        put_vector(&mut forged, &VersionVector::from_entries([(Actor(7), MAX_COUNTER)]));
        forged.extend_from_slice(&[0u8; CONTEXT_TAG_LEN]);
        assert_eq!(open_context(&forged, BOUND, &ring), Err(ContextError::Forged));

        let mut huge = vec![SEALED_CONTEXT_FORMAT, 1];
        put_vector(&mut huge, &VersionVector::from_entries((0..100_000).map(|a| (Actor(a), 1))));
        huge.extend_from_slice(&[0u8; CONTEXT_TAG_LEN]);
        assert!(matches!(open_context(&huge, BOUND, &ring), Err(ContextError::TooLong(_))));

        // The unauthenticated format-1 encoding (valid checksum) is not a client context.
        let checksummed = crate::encoding::encode_vector(&VersionVector::from_entries([(Actor(1), 1)]));
        assert_eq!(
            open_context(&checksummed, BOUND, &ring),
            Err(ContextError::Malformed(DecodeError::UnknownFormat(1)))
        );
        for bytes in [&[2u8][..], &[2, 1], &[2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]] {
            assert!(open_context(bytes, BOUND, &ring).is_err());
        }
    }

    #[test]
    fn the_vector_can_be_read_without_the_key_for_diagnostics() {
        let vector = VersionVector::from_entries([(Actor(5), 4)]);
        let sealed = seal_context(&vector, BOUND, &key(1, 1));
        assert_eq!(context_vector_unverified(&sealed).unwrap(), vector);
    }

    #[test]
    fn keys_are_validated_and_never_printed() {
        assert_eq!(ContextKey::new(0, &[0; 32]), Err(ContextKeyError::ZeroId));
        assert_eq!(ContextKey::new(1, &[0; 31]), Err(ContextKeyError::SecretLength(31)));
        assert!(!format!("{:?}", key(1, 0xab)).contains("171"));
    }
}
