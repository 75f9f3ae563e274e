//! Placement tokens: where a (tenant, key) lives on the ring.
//!
//! Format (version 1, never changed without a new format version): the token is the first 8 bytes,
//! big-endian, of `SHA-256(u32_be(len(tenant)) || tenant || key)`. The length prefix keeps
//! ("ab", "c") and ("a", "bc") apart. The partition of a token is its top `log2(Q)` bits, so the Q
//! partitions are Q equal, contiguous token ranges and a partition scan is a token-range scan.
//!
//! Token rule (version 2, [`placement_token`]): a tenant created with [`KeyGroups::HashTag`] places a
//! key holding a hash tag by `token_for(tenant, tag)` instead of the whole key. The tag is the text
//! between the first `{` and the first `}` after it, when that text is non-empty (the Redis Cluster
//! rule); any other key, and every key of other tenants, keeps its version-1 token, so version 2 moves
//! no existing data. Keys of one group therefore share one token: one partition, one replica set, and
//! (records sorting by partition, token, tenant, key) one contiguous range in key order.

use sha2::{Digest, Sha256};

use crate::tenant::KeyGroups;

/// Version of the token function; stored with topologies so a change can never go unnoticed.
pub const TOKEN_FORMAT_VERSION: u32 = 1;

/// Default number of partitions (virtual nodes) of a new cluster.
pub const DEFAULT_PARTITION_COUNT: u32 = 4096;

/// Largest supported partition count (2^20). Keeps assignments small enough to ship in one message.
pub const MAX_PARTITION_COUNT: u32 = 1 << 20;

/// A position on the 64-bit ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

/// Index of one of the Q equal token ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The stable token of `key` within `tenant`.
pub fn token_for(tenant: &str, key: &[u8]) -> Token {
    let mut hasher = Sha256::new();
    let tenant_len = u32::try_from(tenant.len()).unwrap_or(u32::MAX);
    hasher.update(tenant_len.to_be_bytes());
    hasher.update(tenant.as_bytes());
    hasher.update(key);
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Token(u64::from_be_bytes(first))
}

/// Version of the rule choosing which bytes of a key are hashed ([`placement_token`]).
pub const TOKEN_RULE_VERSION: u32 = 2;

/// The hash tag of `key`: the non-empty text between its first `{` and the first `}` after it.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// The token `key` is placed by within `tenant`, whose keys group by `groups` (token rule v2).
pub fn placement_token(tenant: &str, key: &str, groups: KeyGroups) -> Token {
    match (groups, hash_tag(key)) {
        (KeyGroups::HashTag, Some(tag)) => token_for(tenant, tag.as_bytes()),
        _ => token_for(tenant, key.as_bytes()),
    }
}

/// Whether `token` is one a placement rule gives `key` (under either [`KeyGroups`]): what a storage
/// node accepts from a caller that names a key's token.
pub fn is_placement_token(tenant: &str, key: &str, token: Token) -> bool {
    token == placement_token(tenant, key, KeyGroups::None)
        || token == placement_token(tenant, key, KeyGroups::HashTag)
}

/// Error for an invalid partition count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partition count {0} must be a power of two between 1 and {MAX_PARTITION_COUNT}")]
pub struct InvalidPartitionCount(pub u32);

/// Q, the number of partitions: a power of two fixed when the cluster is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionCount {
    count: u32,
    bits: u32,
}

impl PartitionCount {
    pub fn new(count: u32) -> Result<Self, InvalidPartitionCount> {
        if count == 0 || !count.is_power_of_two() || count > MAX_PARTITION_COUNT {
            return Err(InvalidPartitionCount(count));
        }
        Ok(Self { count, bits: count.trailing_zeros() })
    }

    pub fn get(self) -> u32 {
        self.count
    }

    /// The partition holding `token`: its top `log2(Q)` bits.
    pub fn partition_of(self, token: Token) -> PartitionId {
        if self.bits == 0 {
            return PartitionId(0);
        }
        // Lossless: the shifted value has at most `bits` <= 20 significant bits.
        PartitionId((token.0 >> (64 - self.bits)) as u32)
    }

    /// First token of `partition` (inclusive).
    pub fn first_token(self, partition: PartitionId) -> Token {
        if self.bits == 0 {
            return Token(0);
        }
        Token(u64::from(partition.0) << (64 - self.bits))
    }

    pub fn contains(self, partition: PartitionId) -> bool {
        partition.0 < self.count
    }

    pub fn partitions(self) -> impl Iterator<Item = PartitionId> {
        (0..self.count).map(PartitionId)
    }
}

impl Default for PartitionCount {
    fn default() -> Self {
        Self { count: DEFAULT_PARTITION_COUNT, bits: DEFAULT_PARTITION_COUNT.trailing_zeros() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_follow_the_redis_cluster_rule() {
        assert_eq!(hash_tag("orders:{cust-42}:2026-11-30:0007"), Some("cust-42"));
        assert_eq!(hash_tag("{a}{b}"), Some("a"));
        assert_eq!(hash_tag("x{}{b}"), None, "empty first braces: the whole key is hashed");
        assert_eq!(hash_tag("x{b"), None);
        assert_eq!(hash_tag("x}{b}"), Some("b"));
        assert_eq!(hash_tag("plain"), None);
        assert_eq!(hash_tag("{ü}"), Some("ü"));
    }

    #[test]
    fn only_hash_tag_tenants_place_grouped_keys_by_their_tag() {
        let grouped = placement_token("t", "orders:{c1}:1", KeyGroups::HashTag);
        assert_eq!(grouped, placement_token("t", "x{c1}y", KeyGroups::HashTag));
        assert_eq!(grouped, token_for("t", b"c1"));
        // Token rule v1 is unchanged for other tenants and for keys without a tag.
        assert_eq!(placement_token("t", "orders:{c1}:1", KeyGroups::None), token_for("t", b"orders:{c1}:1"));
        assert_eq!(placement_token("t", "plain", KeyGroups::HashTag), token_for("t", b"plain"));
        assert!(is_placement_token("t", "orders:{c1}:1", grouped));
        assert!(is_placement_token("t", "orders:{c1}:1", token_for("t", b"orders:{c1}:1")));
        assert!(!is_placement_token("t", "orders:{c1}:1", token_for("u", b"c1")));
    }

    #[test]
    fn token_is_stable_across_releases() {
        // Pinned: changing the token function moves every key. Bump TOKEN_FORMAT_VERSION instead.
        assert_eq!(token_for("demo", b"hello"), token_for("demo", b"hello"));
        let pinned = token_for("demo", b"hello");
        let expected = {
            let mut h = Sha256::new();
            h.update(4u32.to_be_bytes());
            h.update(b"demo");
            h.update(b"hello");
            let d = h.finalize();
            u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
        };
        assert_eq!(pinned.0, expected);
    }

    #[test]
    fn tenant_boundary_is_unambiguous() {
        assert_ne!(token_for("ab", b"c"), token_for("a", b"bc"));
    }

    #[test]
    fn partition_is_top_bits() {
        let q = PartitionCount::new(4096).unwrap();
        assert_eq!(q.partition_of(Token(0)), PartitionId(0));
        assert_eq!(q.partition_of(Token(u64::MAX)), PartitionId(4095));
        assert_eq!(q.partition_of(Token(1 << 52)), PartitionId(1));
        assert_eq!(q.first_token(PartitionId(1)), Token(1 << 52));
        let single = PartitionCount::new(1).unwrap();
        assert_eq!(single.partition_of(Token(u64::MAX)), PartitionId(0));
    }

    #[test]
    fn rejects_non_power_of_two() {
        assert!(PartitionCount::new(0).is_err());
        assert!(PartitionCount::new(3000).is_err());
        assert!(PartitionCount::new(MAX_PARTITION_COUNT * 2).is_err());
    }
}
