//! On-disk key layouts (data format version 1).
//!
//! Record key: `partition u32be | token u64be | tenant_len u8 | tenant | key`. Records therefore sort by
//! (partition, token, tenant, key): a partition is one contiguous range, and within it keys are in
//! token order, which the Merkle summaries rely on. The token is the key's placement token
//! ([`pairdb_core::token::placement_token`]): a key group's records share one token, so a group is
//! one range in key order.
//!
//! Index key (keyspace `key_index`): `tenant_len u8 | tenant | key` → `token u64be`: one tenant's keys
//! are one range in key order, whatever partitions they live in (listings, [`crate::engine`]).
//!
//! Hint key: `target_node u32be | partition u32be | <record key without its partition>`: hints for one
//! node are one range, and within it one partition is one range.

use pairdb_core::ring::NodeId;
use pairdb_core::tenant::KeyGroups;
use pairdb_core::token::{PartitionCount, PartitionId, Token, is_placement_token, placement_token};

/// A key's identity on this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub partition: PartitionId,
    /// The placement token (token rule v2): the whole key's, or a key group's tag's.
    pub token: Token,
    pub tenant: String,
    pub key: String,
}

/// A caller named a token no placement rule gives the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token {token:#018x} is not a placement token of this key")]
pub struct ForeignToken {
    pub token: u64,
}

impl RecordKey {
    /// The key placed by its whole text (token rule v1: every tenant without key groups).
    pub fn new(partitions: PartitionCount, tenant: &str, key: &str) -> Self {
        Self::placed(partitions, tenant, key, KeyGroups::None)
    }

    /// The key as a tenant whose keys group by `groups` places it.
    pub fn placed(partitions: PartitionCount, tenant: &str, key: &str, groups: KeyGroups) -> Self {
        Self::with_token(partitions, tenant, key, placement_token(tenant, key, groups))
    }

    fn with_token(partitions: PartitionCount, tenant: &str, key: &str, token: Token) -> Self {
        let partition = partitions.partition_of(token);
        Self { partition, token, tenant: tenant.to_owned(), key: key.to_owned() }
    }

    /// The key as a wire message names it: `token` as sent (absent from a release before token rule
    /// v2: the whole key's), accepted only when a placement rule gives it this key.
    pub fn from_wire(
        partitions: PartitionCount,
        tenant: &str,
        key: &str,
        token: Option<u64>,
    ) -> Result<Self, ForeignToken> {
        let Some(token) = token else { return Ok(Self::new(partitions, tenant, key)) };
        if !is_placement_token(tenant, key, Token(token)) {
            return Err(ForeignToken { token });
        }
        Ok(Self::with_token(partitions, tenant, key, Token(token)))
    }

    /// The token field of a wire message naming this key.
    pub fn wire_token(&self) -> Option<u64> {
        Some(self.token.0)
    }

    /// Encoded record key.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 + 1 + self.tenant.len() + self.key.len());
        out.extend_from_slice(&self.partition.0.to_be_bytes());
        self.encode_suffix(&mut out);
        out
    }

    fn encode_suffix(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.token.0.to_be_bytes());
        // Tenant ids are at most 63 bytes (validated at every edge).
        out.push(u8::try_from(self.tenant.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.tenant.as_bytes());
        out.extend_from_slice(self.key.as_bytes());
    }

    /// Encoded hint key for `target_node`.
    pub fn encode_hint(&self, target_node: NodeId) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 + 1 + self.tenant.len() + self.key.len());
        out.extend_from_slice(&target_node.0.to_be_bytes());
        out.extend_from_slice(&self.partition.0.to_be_bytes());
        self.encode_suffix(&mut out);
        out
    }

    /// Decodes a record key.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let partition = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
        Self::decode_suffix(PartitionId(partition), bytes.get(4..)?)
    }

    /// Decodes a hint key into (target node, record key).
    pub fn decode_hint(bytes: &[u8]) -> Option<(NodeId, Self)> {
        let target = NodeId(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?));
        let partition = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?);
        Some((target, Self::decode_suffix(PartitionId(partition), bytes.get(8..)?)?))
    }

    fn decode_suffix(partition: PartitionId, bytes: &[u8]) -> Option<Self> {
        let token = Token(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?));
        let tenant_len = usize::from(*bytes.get(8)?);
        let tenant = std::str::from_utf8(bytes.get(9..9 + tenant_len)?).ok()?.to_owned();
        let key = std::str::from_utf8(bytes.get(9 + tenant_len..)?).ok()?.to_owned();
        Some(Self { partition, token, tenant, key })
    }

    /// The key's entry in the tenant key index.
    pub fn encode_index(&self) -> Vec<u8> {
        let mut out = tenant_index_prefix(&self.tenant);
        out.extend_from_slice(self.key.as_bytes());
        out
    }

    /// The record key an index entry points to (`None` for bytes no index entry has).
    pub fn decode_index(partitions: PartitionCount, index_key: &[u8], token: &[u8]) -> Option<Self> {
        let tenant_len = usize::from(*index_key.first()?);
        let tenant = std::str::from_utf8(index_key.get(1..1 + tenant_len)?).ok()?;
        let key = std::str::from_utf8(index_key.get(1 + tenant_len..)?).ok()?;
        let token = Token(u64::from_be_bytes(token.try_into().ok()?));
        Some(Self::with_token(partitions, tenant, key, token))
    }

    /// The value of the key's index entry.
    pub fn index_value(&self) -> [u8; 8] {
        self.token.0.to_be_bytes()
    }
}

/// The prefix of every index entry of `tenant`.
pub fn tenant_index_prefix(tenant: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + tenant.len() + 64);
    // Tenant ids are at most 63 bytes (validated at every edge).
    out.push(u8::try_from(tenant.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(tenant.as_bytes());
    out
}

/// The prefix of every record of one key group (`token`) of `tenant`.
pub fn group_prefix(partitions: PartitionCount, tenant: &str, token: Token) -> Vec<u8> {
    let mut out = partitions.partition_of(token).0.to_be_bytes().to_vec();
    out.extend_from_slice(&token.0.to_be_bytes());
    out.extend(tenant_index_prefix(tenant));
    out
}

/// The 4-byte prefix of every record of `partition`.
pub fn partition_prefix(partition: PartitionId) -> [u8; 4] {
    partition.0.to_be_bytes()
}

/// The prefix of every hint for `target_node`, optionally narrowed to one partition.
pub fn hint_prefix(target_node: NodeId, partition: Option<PartitionId>) -> Vec<u8> {
    let mut out = target_node.0.to_be_bytes().to_vec();
    if let Some(partition) = partition {
        out.extend_from_slice(&partition.0.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pairdb_core::token::token_for;

    #[test]
    fn keys_round_trip_and_sort_by_partition_then_token() {
        let q = PartitionCount::default();
        let a = RecordKey::new(q, "tenant", "alpha");
        assert_eq!(RecordKey::decode(&a.encode()), Some(a.clone()));
        assert_eq!(RecordKey::decode_hint(&a.encode_hint(NodeId(7))), Some((NodeId(7), a.clone())));
        let mut keys: Vec<RecordKey> = (0..500).map(|i| RecordKey::new(q, "t", &format!("k{i}"))).collect();
        keys.sort_by_key(RecordKey::encode);
        for pair in keys.windows(2) {
            let (x, y) = (&pair[0], &pair[1]);
            let tx = token_for(&x.tenant, x.key.as_bytes());
            let ty = token_for(&y.tenant, y.key.as_bytes());
            assert!((x.partition, tx) <= (y.partition, ty));
        }
        assert!(RecordKey::decode(&[0, 0]).is_none());
    }

    #[test]
    fn a_key_group_is_one_range_of_records_in_key_order() {
        let q = PartitionCount::default();
        let mut keys: Vec<RecordKey> = (0..300)
            .map(|i| RecordKey::placed(q, "t", &format!("k{:03}:{{g{}}}", i, i % 3), KeyGroups::HashTag))
            .collect();
        keys.sort_by_key(RecordKey::encode);
        let token = placement_token("t", "{g1}", KeyGroups::HashTag);
        let prefix = group_prefix(q, "t", token);
        let group: Vec<&str> =
            keys.iter().filter(|k| k.encode().starts_with(&prefix)).map(|k| k.key.as_str()).collect();
        assert_eq!(group.len(), 100);
        assert!(group.windows(2).all(|w| w[0] < w[1]), "in key order");
        assert!(group.iter().all(|k| k.ends_with("{g1}")));
        let index = keys[0].encode_index();
        assert_eq!(RecordKey::decode_index(q, &index, &keys[0].index_value()), Some(keys[0].clone()));
        assert!(index.starts_with(&tenant_index_prefix("t")));
    }

    #[test]
    fn a_wire_token_is_accepted_only_from_a_placement_rule() {
        let q = PartitionCount::default();
        let grouped = RecordKey::placed(q, "t", "a{g}", KeyGroups::HashTag);
        assert_eq!(RecordKey::from_wire(q, "t", "a{g}", grouped.wire_token()), Ok(grouped));
        assert_eq!(RecordKey::from_wire(q, "t", "a{g}", None), Ok(RecordKey::new(q, "t", "a{g}")));
        let foreign = token_for("u", b"g").0;
        assert_eq!(RecordKey::from_wire(q, "t", "a{g}", Some(foreign)), Err(ForeignToken { token: foreign }));
    }
}
