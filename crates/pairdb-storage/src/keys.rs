//! On-disk key layouts (data format version 1).
//!
//! Record key: `partition u32be | token u64be | tenant_len u8 | tenant | key`. Records therefore sort by
//! (partition, token, tenant, key): a partition is one contiguous range, and within it keys are in
//! token order, which the Merkle summaries rely on.
//!
//! Hint key: `target_node u32be | partition u32be | <record key without its partition>`: hints for one
//! node are one range, and within it one partition is one range.

use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionCount, PartitionId, token_for};

/// A key's identity on this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub partition: PartitionId,
    pub tenant: String,
    pub key: String,
}

impl RecordKey {
    pub fn new(partitions: PartitionCount, tenant: &str, key: &str) -> Self {
        let partition = partitions.partition_of(token_for(tenant, key.as_bytes()));
        Self { partition, tenant: tenant.to_owned(), key: key.to_owned() }
    }

    /// Encoded record key.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 + 1 + self.tenant.len() + self.key.len());
        out.extend_from_slice(&self.partition.0.to_be_bytes());
        self.encode_suffix(&mut out);
        out
    }

    fn encode_suffix(&self, out: &mut Vec<u8>) {
        let token = token_for(&self.tenant, self.key.as_bytes());
        out.extend_from_slice(&token.0.to_be_bytes());
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
        let tenant_len = usize::from(*bytes.get(8)?);
        let tenant = std::str::from_utf8(bytes.get(9..9 + tenant_len)?).ok()?.to_owned();
        let key = std::str::from_utf8(bytes.get(9 + tenant_len..)?).ok()?.to_owned();
        Some(Self { partition, tenant, key })
    }
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
}
