//! Binary encodings: the stored/replicated form of a [`VersionSet`] and the internal wire form of a
//! version vector (what a router sends a storage node as a write's context, after it verified the
//! client's sealed context: see [`crate::context`]).
//!
//! Both start with a format version byte; decoders accept only versions they know and never panic on
//! any input (property-tested with random bytes). Integers are LEB128 varints except actor ids, which
//! are fixed 8-byte little-endian (they are random, so a varint would only grow them).
//!
//! Version set, format 1:
//! ```text
//! u8 1 | varint n | n × (actor u64le, counter varint)            -- vector, actors strictly increasing
//!      | varint m | m × (actor u64le, counter varint, timestamp_ms varint,
//!                       u8 kind (0 tombstone, 1 value), [varint len, len bytes if kind = 1])
//! ```
//! Siblings are in strictly increasing dot order and each dot is covered by the vector.
//!
//! Version set, format 2 (written only when a sibling expires, so a set without expiry keeps its
//! format 1 bytes and a previous release reads every set that does not use expiry):
//! ```text
//! as format 1, with u8 2 first and sibling kinds 0 tombstone, 1 value,
//!                  2 value with expiry: varint expires_at_ms, then varint len, len bytes
//! ```
//!
//! Version vector, format 1 (between cluster members only; clients get sealed contexts):
//! ```text
//! u8 1 | varint n | n × (actor u64le, counter varint) | 4-byte checksum (first bytes of SHA-256)
//! ```
//! The checksum catches corruption; it is not a MAC (anyone can compute it), so this form is never
//! accepted from a client (earlier releases gave it to clients as their context).

use crate::reason::{HasReason, Reason};
use sha2::{Digest, Sha256};

use crate::dvv::{Actor, Dot, MAX_ACTORS, MAX_COUNTER, Sibling, VersionSet, VersionVector};

/// The most vector entries a decoder accepts, in a stored or replicated set and in a client context:
/// [`MAX_ACTORS`] plus room for vectors that grew on several replicas at once. Anything longer is
/// refused before it is allocated or stored.
pub const MAX_DECODED_ACTORS: usize = 4 * MAX_ACTORS;

/// The set format without expiry (every release reads it).
pub const VERSION_SET_FORMAT: u8 = 1;
/// The set format with expiring siblings.
pub const VERSION_SET_FORMAT_EXPIRY: u8 = 2;
pub const VECTOR_FORMAT: u8 = 1;
const CONTEXT_CHECKSUM_LEN: usize = 4;

/// Why bytes could not be decoded. Every variant is a client or peer error, never a reason to crash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("input is empty")]
    Empty,
    #[error("unknown format version {0}")]
    UnknownFormat(u8),
    #[error("input ends early")]
    Truncated,
    #[error("varint is too long")]
    VarintOverflow,
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    #[error("entries are not in strictly increasing order")]
    NotSorted,
    #[error("zero counter")]
    ZeroCounter,
    #[error("sibling dot is not covered by the vector")]
    DotNotCovered,
    #[error("unknown sibling kind {0}")]
    UnknownKind(u8),
    #[error("checksum mismatch")]
    ChecksumMismatch,
    #[error("{0} vector entries, above {MAX_DECODED_ACTORS}")]
    TooManyActors(usize),
    #[error("counter {0} is above the maximum {MAX_COUNTER}")]
    CounterTooLarge(u64),
}

impl HasReason for DecodeError {
    /// Stable reason code for error replies.
    fn reason(&self) -> Reason {
        Reason::MalformedVersion
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&first, rest) = self.bytes.split_first().ok_or(DecodeError::Truncated)?;
        self.bytes = rest;
        Ok(first)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn u64_le(&mut self) -> Result<u64, DecodeError> {
        let raw = self.take(8)?;
        let mut buf = [0u8; 8];
        buf.copy_from_slice(raw);
        Ok(u64::from_le_bytes(buf))
    }

    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintOverflow)
    }

    /// A count of items each at least `min_item_len` bytes long, checked against what is left so a
    /// hostile count cannot make us allocate.
    fn count(&mut self, min_item_len: usize) -> Result<usize, DecodeError> {
        let count = self.varint()?;
        let max = (self.bytes.len() / min_item_len.max(1)) as u64;
        if count > max {
            return Err(DecodeError::Truncated);
        }
        usize::try_from(count).map_err(|_| DecodeError::Truncated)
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() { Ok(()) } else { Err(DecodeError::TrailingBytes(self.bytes.len())) }
    }
}

pub(crate) fn put_vector(out: &mut Vec<u8>, vector: &VersionVector) {
    put_varint(out, vector.len() as u64);
    for (actor, counter) in vector.entries() {
        out.extend_from_slice(&actor.0.to_le_bytes());
        put_varint(out, counter);
    }
}

pub(crate) fn read_vector(reader: &mut Reader<'_>) -> Result<VersionVector, DecodeError> {
    // Each entry takes at least 9 bytes (8-byte actor + 1-byte varint).
    let count = reader.count(9)?;
    if count > MAX_DECODED_ACTORS {
        return Err(DecodeError::TooManyActors(count));
    }
    let mut entries = Vec::with_capacity(count);
    let mut previous: Option<Actor> = None;
    for _ in 0..count {
        let actor = Actor(reader.u64_le()?);
        let counter = reader.varint()?;
        if counter == 0 {
            return Err(DecodeError::ZeroCounter);
        }
        if counter > MAX_COUNTER {
            return Err(DecodeError::CounterTooLarge(counter));
        }
        if previous.is_some_and(|p| p >= actor) {
            return Err(DecodeError::NotSorted);
        }
        previous = Some(actor);
        entries.push((actor, counter));
    }
    Ok(VersionVector::from_entries(entries))
}

/// Encodes a version set: format 1, or format 2 when a sibling expires.
pub fn encode_version_set(set: &VersionSet) -> Vec<u8> {
    let payload: usize = set.siblings().iter().map(|s| s.value.as_ref().map_or(0, Vec::len) + 24).sum();
    let mut out = Vec::with_capacity(16 + set.vector().len() * 12 + payload);
    let expiring = set.siblings().iter().any(|s| s.expires_at_ms.is_some() && !s.is_tombstone());
    out.push(if expiring { VERSION_SET_FORMAT_EXPIRY } else { VERSION_SET_FORMAT });
    put_vector(&mut out, set.vector());
    put_varint(&mut out, set.siblings().len() as u64);
    for sibling in set.siblings() {
        out.extend_from_slice(&sibling.dot.actor.0.to_le_bytes());
        put_varint(&mut out, sibling.dot.counter);
        put_varint(&mut out, sibling.timestamp_ms);
        match (&sibling.value, sibling.expires_at_ms) {
            // A tombstone has no expiry to keep.
            (None, _) => out.push(0),
            (Some(value), expiry) => {
                match expiry {
                    None => out.push(1),
                    Some(at) => {
                        out.push(2);
                        put_varint(&mut out, at);
                    }
                }
                put_varint(&mut out, value.len() as u64);
                out.extend_from_slice(value);
            }
        }
    }
    out
}

/// Decodes and validates a version set.
pub fn decode_version_set(bytes: &[u8]) -> Result<VersionSet, DecodeError> {
    let mut reader = Reader { bytes };
    let format = reader.u8().map_err(|_| DecodeError::Empty)?;
    if format != VERSION_SET_FORMAT && format != VERSION_SET_FORMAT_EXPIRY {
        return Err(DecodeError::UnknownFormat(format));
    }
    let vector = read_vector(&mut reader)?;
    // actor (8) + counter (1) + timestamp (1) + kind (1).
    let count = reader.count(11)?;
    let mut siblings = Vec::with_capacity(count);
    let mut previous: Option<Dot> = None;
    for _ in 0..count {
        let actor = Actor(reader.u64_le()?);
        let counter = reader.varint()?;
        if counter == 0 {
            return Err(DecodeError::ZeroCounter);
        }
        let dot = Dot { actor, counter };
        if previous.is_some_and(|p| p >= dot) {
            return Err(DecodeError::NotSorted);
        }
        if !vector.covers(dot) {
            return Err(DecodeError::DotNotCovered);
        }
        previous = Some(dot);
        let timestamp_ms = reader.varint()?;
        let (value, expires_at_ms) = match reader.u8()? {
            0 => (None, None),
            1 => (Some(read_bytes(&mut reader)?), None),
            2 if format == VERSION_SET_FORMAT_EXPIRY => {
                let at = reader.varint()?;
                (Some(read_bytes(&mut reader)?), Some(at))
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        siblings.push(Sibling { dot, value, timestamp_ms, expires_at_ms });
    }
    reader.finish()?;
    Ok(VersionSet::from_parts(vector, siblings))
}

fn read_bytes(reader: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    let len = usize::try_from(reader.varint()?).map_err(|_| DecodeError::Truncated)?;
    Ok(reader.take(len)?.to_vec())
}

fn context_checksum(body: &[u8]) -> [u8; CONTEXT_CHECKSUM_LEN] {
    let digest = Sha256::digest(body);
    let mut out = [0u8; CONTEXT_CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CONTEXT_CHECKSUM_LEN]);
    out
}

/// Encodes a version vector for another cluster member (format 1, with checksum).
pub fn encode_vector(vector: &VersionVector) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + vector.len() * 12 + CONTEXT_CHECKSUM_LEN);
    out.push(VECTOR_FORMAT);
    put_vector(&mut out, vector);
    let checksum = context_checksum(&out);
    out.extend_from_slice(&checksum);
    out
}

/// Decodes a version vector sent by another cluster member. Empty input is the empty vector (a
/// blind write).
pub fn decode_vector(bytes: &[u8]) -> Result<VersionVector, DecodeError> {
    if bytes.is_empty() {
        return Ok(VersionVector::new());
    }
    if bytes.len() < 1 + CONTEXT_CHECKSUM_LEN {
        return Err(DecodeError::Truncated);
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CONTEXT_CHECKSUM_LEN);
    let format = body.first().copied().ok_or(DecodeError::Truncated)?;
    if format != VECTOR_FORMAT {
        return Err(DecodeError::UnknownFormat(format));
    }
    if context_checksum(body) != checksum {
        return Err(DecodeError::ChecksumMismatch);
    }
    let mut reader = Reader { bytes: body.get(1..).unwrap_or_default() };
    let vector = read_vector(&mut reader)?;
    reader.finish()?;
    Ok(vector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips_extremes() {
        for value in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut reader = Reader { bytes: &out };
            assert_eq!(reader.varint().unwrap(), value);
            assert!(reader.finish().is_ok());
        }
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let bytes = [0xffu8; 11];
        assert_eq!(Reader { bytes: &bytes }.varint(), Err(DecodeError::VarintOverflow));
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(Reader { bytes: &bytes }.varint(), Err(DecodeError::VarintOverflow));
    }

    /// A version set written by format 1; decoding it must keep working in every later release.
    #[test]
    fn format_1_fixture_decodes() {
        let fixture: &[u8] = &[
            1, // format
            2, // two vector entries
            1, 0, 0, 0, 0, 0, 0, 0, 3, // actor 1 -> 3
            2, 0, 0, 0, 0, 0, 0, 0, 1, // actor 2 -> 1
            2, // two siblings
            1, 0, 0, 0, 0, 0, 0, 0, 3, 10, 1, 2, b'h', b'i', // (1,3) t=10 "hi"
            2, 0, 0, 0, 0, 0, 0, 0, 1, 11, 0, // (2,1) t=11 tombstone
        ];
        let set = decode_version_set(fixture).unwrap();
        assert_eq!(set.vector().get(Actor(1)), 3);
        assert_eq!(set.siblings().len(), 2);
        assert_eq!(set.siblings()[0].value.as_deref(), Some(&b"hi"[..]));
        assert!(set.siblings()[1].is_tombstone());
        assert_eq!(encode_version_set(&set), fixture);
    }

    /// Format 2: an expiring sibling. A set without expiry still encodes as format 1 (the previous
    /// release reads it, and its bytes are what they were).
    #[test]
    fn format_2_fixture_decodes_and_sets_without_expiry_stay_format_1() {
        let fixture: &[u8] = &[
            2, // format
            1, // one vector entry
            1, 0, 0, 0, 0, 0, 0, 0, 2, // actor 1 -> 2
            2, // two siblings
            1, 0, 0, 0, 0, 0, 0, 0, 1, 10, 1, 1, b'a', // (1,1) t=10 "a", no expiry
            1, 0, 0, 0, 0, 0, 0, 0, 2, 11, 2, 0xe8, 0x07, 1, b'b', // (1,2) t=11 expires 1000 "b"
        ];
        let set = decode_version_set(fixture).unwrap();
        assert_eq!(set.siblings()[0].expires_at_ms, None);
        assert_eq!(set.siblings()[1].expires_at_ms, Some(1000));
        assert_eq!(encode_version_set(&set), fixture);
        let mut plain = set.clone();
        plain.touch(&set.vector().clone(), Actor(1), None, 0).unwrap();
        assert_eq!(encode_version_set(&plain)[0], VERSION_SET_FORMAT);
        // Kind 2 is not a format 1 kind.
        let mut mislabelled = fixture.to_vec();
        mislabelled[0] = 1;
        assert_eq!(decode_version_set(&mislabelled), Err(DecodeError::UnknownKind(2)));
    }

    #[test]
    fn rejects_invalid_version_sets() {
        assert_eq!(decode_version_set(&[]), Err(DecodeError::Empty));
        assert_eq!(decode_version_set(&[9]), Err(DecodeError::UnknownFormat(9)));
        // Sibling (1,5) not covered by vector {1: 3}.
        let bad: &[u8] = &[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 3, 1, 1, 0, 0, 0, 0, 0, 0, 0, 5, 10, 0];
        assert_eq!(decode_version_set(bad), Err(DecodeError::DotNotCovered));
        // Huge count with no data must not allocate or panic.
        let hostile: &[u8] = &[1, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(decode_version_set(hostile), Err(DecodeError::Truncated));
    }

    /// Forged shapes that used to be accepted: a context or a set whose counters are saturated, and
    /// contexts listing a hundred thousand invented actors. Each is refused before allocation.
    #[test]
    fn saturated_counters_and_invented_actors_are_refused() {
        let saturated = VersionVector::from_entries([(Actor(7), u64::MAX)]);
        assert_eq!(decode_vector(&encode_vector(&saturated)), Err(DecodeError::CounterTooLarge(u64::MAX)));
        let at_max = VersionVector::from_entries([(Actor(7), MAX_COUNTER)]);
        assert_eq!(decode_vector(&encode_vector(&at_max)).unwrap(), at_max);

        let invented = VersionVector::from_entries((0..100_000).map(|a| (Actor(a), 1)));
        assert_eq!(decode_vector(&encode_vector(&invented)), Err(DecodeError::TooManyActors(100_000)));
        let most = VersionVector::from_entries((0..MAX_DECODED_ACTORS as u64).map(|a| (Actor(a), 1)));
        assert_eq!(decode_vector(&encode_vector(&most)).unwrap(), most);

        let set = VersionSet::from_parts(saturated, Vec::new());
        assert_eq!(
            decode_version_set(&encode_version_set(&set)),
            Err(DecodeError::CounterTooLarge(u64::MAX))
        );
    }

    #[test]
    fn vector_detects_corruption() {
        let vector = VersionVector::from_entries([(Actor(7), 2), (Actor(9), 1)]);
        let mut encoded = encode_vector(&vector);
        assert_eq!(decode_vector(&encoded).unwrap(), vector);
        encoded[3] ^= 1;
        assert_eq!(decode_vector(&encoded), Err(DecodeError::ChecksumMismatch));
        assert_eq!(decode_vector(&[]).unwrap(), VersionVector::new());
    }
}
