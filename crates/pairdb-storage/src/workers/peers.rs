//! The workers' one outgoing edge: the replica peers they call, one cached client per address, built
//! with the node's cluster credentials and bounded timeouts.
//!
//! A [`Peer`] speaks in the storage node's own types ([`RecordKey`], [`RecordDigest`],
//! [`MerkleNode`], encoded version sets) and builds and reads the wire messages itself, so no
//! protobuf type reaches a worker. A failed call comes back as [`WorkerError::Peer`] naming the node.
//! Peers answer with what they hold; what a worker does with the answers (decoding sets, comparing
//! digests, pacing) stays in the worker.

use std::collections::HashMap;
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionCount, PartitionId};
use pairdb_proto::storage::v1 as pb;
use pairdb_service::clients::{ChannelSettings, InternalClients, StorageClient};
use pairdb_service::cluster_view::ClusterView;

use super::WorkerError;
use crate::engine::RecordDigest;
use crate::keys::RecordKey;
use crate::merkle::MerkleNode;

/// Deadline of each repair RPC (a batch of digests or records).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a peer could not take part in a step.
#[derive(Debug, thiserror::Error)]
pub enum PeerFailure {
    #[error("down; tombstones wait")]
    Down,
    #[error("no client: {0}")]
    Client(#[from] tonic::transport::Error),
    #[error("{}", .0.message())]
    Call(#[from] tonic::Status),
}

/// The cache of peer clients.
#[derive(Debug)]
pub struct Peers {
    builder: InternalClients,
    /// This node's ring, to file the records peers send under the right partition.
    partitions: PartitionCount,
    clients: tokio::sync::Mutex<HashMap<String, StorageClient>>,
}

impl Peers {
    pub fn new(builder: InternalClients, partitions: PartitionCount) -> Self {
        Self { builder, partitions, clients: tokio::sync::Mutex::new(HashMap::new()) }
    }

    /// `node` at the address `view` lists, if the view says it is up.
    pub async fn live(&self, view: &ClusterView, node: NodeId) -> Result<Peer, WorkerError> {
        let entry = view.nodes.get(&node).filter(|e| !e.down).ok_or(failed(node, PeerFailure::Down))?;
        let client = self.client(&entry.address).await.map_err(|e| failed(node, e.into()))?;
        Ok(Peer { node, client, partitions: self.partitions })
    }

    async fn client(&self, address: &str) -> Result<StorageClient, tonic::transport::Error> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        let settings = ChannelSettings { request_timeout: Some(RPC_TIMEOUT), ..ChannelSettings::default() };
        let client = self.builder.storage(address, settings)?;
        // Bounded by the cluster's node count; an address that changed leaves one idle entry.
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }
}

/// One replica peer, ready to call (see the module docs).
#[derive(Debug, Clone)]
pub struct Peer {
    pub node: NodeId,
    client: StorageClient,
    partitions: PartitionCount,
}

impl Peer {
    /// `node` at `address` on a channel of its own, outside the cache and without keepalive pings
    /// (hint delivery: one channel per delivery, to the address the topology lists).
    pub fn dedicated(
        clients: &InternalClients,
        node: NodeId,
        address: &str,
        partitions: PartitionCount,
    ) -> Result<Self, WorkerError> {
        let settings = ChannelSettings {
            request_timeout: Some(RPC_TIMEOUT),
            keepalive: None,
            ..ChannelSettings::default()
        };
        let client = clients.storage(address, settings).map_err(|e| failed(node, e.into()))?;
        Ok(Self { node, client, partitions })
    }

    /// Level `level` (0 = root) of the peer's Merkle tree of `partition`: every node, or only those
    /// in `node_indexes` when it is not empty.
    pub async fn merkle_summary(
        &mut self,
        partition: PartitionId,
        level: u32,
        node_indexes: Vec<u32>,
    ) -> Result<Vec<MerkleNode>, WorkerError> {
        let request = pb::MerkleSummaryRequest { partition: partition.0, level, node_indexes };
        let response = self.client.merkle_summary(request).await.map_err(call_failed(self.node))?;
        Ok(response.into_inner().nodes.iter().map(merkle_node).collect())
    }

    /// (key, digest) of the peer's records in `leaves` of `partition`, in key order, up to the
    /// peer's bound per response.
    pub async fn leaf_digests(
        &mut self,
        partition: PartitionId,
        leaves: &[u32],
    ) -> Result<Vec<RecordDigest>, WorkerError> {
        let request = pb::LeafDigestsRequest { partition: partition.0, leaves: leaves.to_vec() };
        let response = self.client.leaf_digests(request).await.map_err(call_failed(self.node))?;
        Ok(response
            .into_inner()
            .digests
            .into_iter()
            .filter_map(|d| record_digest(self.partitions, d))
            .filter(|d| d.key.partition == partition)
            .collect())
    }

    /// The peer's encoded sets of `keys` in `partition` (keys it lacks are left out), each under
    /// the key this node files it as.
    pub async fn get_batch(
        &mut self,
        partition: PartitionId,
        keys: &[RecordKey],
    ) -> Result<Vec<(RecordKey, Vec<u8>)>, WorkerError> {
        let keys = keys
            .iter()
            .map(|key| pb::KeyRef {
                tenant_id: key.tenant.clone(),
                key: key.key.clone(),
                partition: partition.0,
                // 0: no generation check (peers, unlike routers, send what they hold).
                tenant_generation: 0,
                token: key.wire_token(),
            })
            .collect();
        let request = pb::GetBatchRequest { partition: partition.0, keys };
        let response = self.client.get_batch(request).await.map_err(call_failed(self.node))?;
        let records = response.into_inner().records.into_iter();
        // A record under a token no placement rule gives its key is left out (as a missing key).
        Ok(records
            .filter_map(|r| {
                let key = RecordKey::from_wire(self.partitions, &r.tenant_id, &r.key, r.token).ok()?;
                (key.partition == partition).then_some((key, r.version_set))
            })
            .collect())
    }

    /// Merges `records` (key, encoded set) of `partition` on the peer; returns how many it changed.
    pub async fn merge_batch(
        &mut self,
        partition: PartitionId,
        records: Vec<(RecordKey, Vec<u8>)>,
    ) -> Result<u64, WorkerError> {
        let records = records
            .into_iter()
            .map(|(key, version_set)| crate::service::wire_record(key, version_set))
            .collect();
        let request = pb::MergeBatchRequest { partition: partition.0, records };
        let response = self.client.merge_batch(request).await.map_err(call_failed(self.node))?;
        Ok(u64::from(response.into_inner().changed))
    }

    /// Asks the peer to purge `tombstones` of `partition` (each only if its record still has that
    /// digest and is past the peer's own grace); returns how many it purged.
    pub async fn purge_tombstones(
        &mut self,
        partition: PartitionId,
        tombstones: Vec<RecordDigest>,
    ) -> Result<u64, WorkerError> {
        let keys = tombstones.into_iter().map(crate::service::key_digest).collect();
        let request = pb::PurgeTombstonesRequest { partition: partition.0, keys };
        let response = self.client.purge_tombstones(request).await.map_err(call_failed(self.node))?;
        Ok(response.into_inner().purged)
    }
}

fn failed(node: NodeId, failure: PeerFailure) -> WorkerError {
    WorkerError::Peer { node, failure }
}

/// Maps a failed call to `node` into the step's error.
fn call_failed(node: NodeId) -> impl Fn(tonic::Status) -> WorkerError {
    move |status| failed(node, PeerFailure::Call(status))
}

/// A Merkle node as sent; its hash is 8 bytes, big endian (anything else reads as 0 and so differs
/// from any non-empty node).
fn merkle_node(node: &pb::MerkleNode) -> MerkleNode {
    let hash = node.hash.as_slice().try_into().map_or(0, u64::from_be_bytes);
    MerkleNode { index: node.index, hash, keys: node.keys }
}

/// A digest as sent, filed under the partition it was asked for (a peer answers for that one only;
/// the key's token is not recomputed, as comparisons read only tenant, key and digest).
fn record_digest(partitions: PartitionCount, digest: pb::KeyDigest) -> Option<RecordDigest> {
    let key = RecordKey::from_wire(partitions, &digest.tenant_id, &digest.key, digest.token).ok()?;
    Some(RecordDigest {
        key,
        digest: digest.digest,
        tombstone_only: digest.tombstone_only,
        newest_timestamp_ms: digest.newest_timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merkle_hashes_are_eight_bytes_big_endian() {
        let sent = |hash: Vec<u8>| pb::MerkleNode { index: 3, hash, keys: 9 };
        let node = merkle_node(&sent(0x0102_0304_0506_0708u64.to_be_bytes().to_vec()));
        assert_eq!(node, MerkleNode { index: 3, hash: 0x0102_0304_0506_0708, keys: 9 });
        assert_eq!(merkle_node(&sent(vec![1, 2, 3])).hash, 0);
        assert_eq!(merkle_node(&sent(Vec::new())).hash, 0);
    }

    #[test]
    fn digests_round_trip_through_the_wire() {
        let q = PartitionCount::default();
        let grouped = RecordKey::placed(q, "tenant", "a{g}", pairdb_core::tenant::KeyGroups::HashTag);
        for key in [RecordKey::new(q, "tenant", "key"), grouped] {
            let digest = RecordDigest {
                key,
                digest: 42,
                tombstone_only: true,
                newest_timestamp_ms: 1_700_000_000_000,
            };
            assert_eq!(record_digest(q, crate::service::key_digest(digest.clone())), Some(digest));
        }
    }
}
