//! The stored encoding of a partition assignment (`topology_versions.assignment`).
//!
//! Format 1: `[1u8] [partition_count: u32 BE] [list_len: u8] [node id: u32 BE; partition_count ×
//! list_len]`, partition-major. 4096 partitions × 7 nodes is 112 KiB. Decoding validates the shape
//! through [`Assignment::from_lists`], so a corrupted blob is an error, never a wrong ring.

use pairdb_core::ring::{Assignment, NodeId};
use pairdb_core::token::PartitionCount;

use super::PersistenceError;

const FORMAT_V1: u8 = 1;
const HEADER_BYTES: usize = 6;

pub fn encode_assignment(assignment: &Assignment) -> Vec<u8> {
    let partitions = assignment.partition_count().get();
    let list_len = assignment.list_len();
    let mut out = Vec::with_capacity(HEADER_BYTES + partitions as usize * list_len * 4);
    out.push(FORMAT_V1);
    out.extend_from_slice(&partitions.to_be_bytes());
    // list_len ≤ MAX_LIST_LEN (7).
    out.push(u8::try_from(list_len).unwrap_or(u8::MAX));
    for (_, list) in assignment.lists() {
        for node in list {
            out.extend_from_slice(&node.0.to_be_bytes());
        }
    }
    out
}

pub fn decode_assignment(bytes: &[u8]) -> Result<Assignment, PersistenceError> {
    let corrupt = |what: &str| PersistenceError::Corrupt(format!("topology assignment: {what}"));
    if bytes.len() < HEADER_BYTES {
        return Err(corrupt("shorter than its header"));
    }
    if bytes[0] != FORMAT_V1 {
        return Err(corrupt(&format!("unknown format {}", bytes[0])));
    }
    let count = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let partitions = PartitionCount::new(count).map_err(|e| corrupt(&e.to_string()))?;
    let list_len = usize::from(bytes[5]);
    let body = &bytes[HEADER_BYTES..];
    if list_len == 0 || body.len() != count as usize * list_len * 4 {
        return Err(corrupt("length does not match partition count and list length"));
    }
    let lists = body
        .chunks_exact(list_len * 4)
        .map(|list| {
            list.chunks_exact(4).map(|id| NodeId(u32::from_be_bytes([id[0], id[1], id[2], id[3]]))).collect()
        })
        .collect();
    Assignment::from_lists(partitions, lists).map_err(|e| corrupt(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use pairdb_core::ring::NodeSpec;

    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let nodes: Vec<NodeSpec> = (1..=4).map(|id| NodeSpec::new(NodeId(id), 1)).collect();
        let q = PartitionCount::new(64).unwrap();
        let assignment = Assignment::compute(None, &nodes, q).unwrap();
        let encoded = encode_assignment(&assignment);
        assert_eq!(encoded.len(), HEADER_BYTES + 64 * 4 * 4);
        assert_eq!(decode_assignment(&encoded).unwrap(), assignment);

        let mut truncated = encoded.clone();
        truncated.pop();
        assert!(matches!(decode_assignment(&truncated), Err(PersistenceError::Corrupt(_))));
        let mut wrong_format = encoded.clone();
        wrong_format[0] = 9;
        assert!(matches!(decode_assignment(&wrong_format), Err(PersistenceError::Corrupt(_))));
        let mut duplicate = encoded;
        duplicate.copy_within(HEADER_BYTES + 4..HEADER_BYTES + 8, HEADER_BYTES);
        assert!(matches!(decode_assignment(&duplicate), Err(PersistenceError::Corrupt(_))));
    }
}
