//! The [`DataMover`] that moves real data: for each partition of a migration it asks every node that
//! gains tenants there to pull them (`StorageService.SyncPartition`) from the old replicas, which the
//! node tries in order (a dead source falls back to the next replica). The data flows node to node;
//! meta only drives the transfers and counts what moved.
//!
//! A transfer whose target fails is retried a bounded number of times with backoff before the
//! partition (and so the migration) fails; pulling again is harmless since storage merges with DVVS.
//!
//! [`node_rebuild`] is the other call meta makes to a storage node for an operator: starting or
//! reading the node's rebuild, which the node runs itself (data flows from its peers to it).

use std::time::Duration;

use pairdb_core::reason::Reason;
use pairdb_core::repair::partition_transfers;
use pairdb_proto::storage::v1 as pb;
use pairdb_service::clients::{ChannelSettings, InternalClients, StorageClient};

use crate::orchestrator::{DataMover, MoveError, MoveStats, PartitionMove};

/// Attempts per transfer before the partition fails.
const TRANSFER_ATTEMPTS: u32 = 5;
/// Longest one transfer (one partition's tenants to one node) may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Moves partitions by having their new owners pull them from the old ones.
#[derive(Debug, Clone)]
pub struct StreamingDataMover {
    clients: InternalClients,
}

impl StreamingDataMover {
    /// A mover calling storage nodes with `clients` (meta's TLS and cluster credential).
    pub fn new(clients: InternalClients) -> Self {
        Self { clients }
    }

    /// Asks the target at `address` to pull one partition (the `SyncPartition` RPC).
    async fn transfer(
        &self,
        address: &str,
        request: pb::SyncPartitionRequest,
    ) -> Result<pb::SyncPartitionResponse, StorageCallError> {
        let mut client = storage_client(address, &self.clients, TRANSFER_TIMEOUT).await?;
        Ok(client.sync_partition(request).await?.into_inner())
    }
}

/// Why a call meta made to a storage node failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageCallError {
    #[error("invalid address {address}: {source}")]
    Address { address: String, source: tonic::transport::Error },
    #[error("cannot reach {address}: {source}")]
    Unreachable { address: String, source: tonic::transport::Error },
    /// The node answered with an error (`reason` when it named one this release knows).
    #[error("{} {message}", reason.map_or("", Reason::as_str))]
    Failed { reason: Option<Reason>, message: String },
}

impl From<tonic::Status> for StorageCallError {
    fn from(status: tonic::Status) -> Self {
        let reason = pairdb_service::errors::known_reason_of(&status);
        StorageCallError::Failed { reason, message: status.message().to_owned() }
    }
}

async fn storage_client(
    address: &str,
    clients: &InternalClients,
    timeout: Duration,
) -> Result<StorageClient, StorageCallError> {
    let settings =
        ChannelSettings { request_timeout: Some(timeout), keepalive: None, ..ChannelSettings::default() };
    let endpoint = clients
        .endpoint(address, settings)
        .map_err(|source| StorageCallError::Address { address: address.to_owned(), source })?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| StorageCallError::Unreachable { address: address.to_owned(), source })?;
    Ok(clients.storage_over(channel))
}

/// Starts (`start`) or reads the rebuild of the storage node at `address`.
pub async fn node_rebuild(
    address: &str,
    clients: &InternalClients,
    start: bool,
) -> Result<pb::RebuildStatus, StorageCallError> {
    let mut client = storage_client(address, clients, Duration::from_secs(10)).await?;
    let reply = if start {
        client.start_rebuild(pb::StartRebuildRequest {}).await?
    } else {
        client.get_rebuild_status(pb::GetRebuildStatusRequest {}).await?
    };
    Ok(reply.into_inner())
}

#[tonic::async_trait]
impl DataMover for StreamingDataMover {
    async fn move_partition(&self, plan: &PartitionMove) -> Result<MoveStats, MoveError> {
        let mut stats = MoveStats::default();
        for transfer in partition_transfers(&plan.old_list, &plan.new_list, &plan.tenants) {
            let target = plan.nodes.get(&transfer.target).ok_or(MoveError::NoAddress(transfer.target))?;
            // Live sources first (in list order), nodes meta believes down last. The target looks their
            // addresses up in the topology it follows.
            let mut sources: Vec<pb::SyncSource> = Vec::new();
            for down in [false, true] {
                for node in &transfer.sources {
                    if let Some(endpoint) = plan.nodes.get(node)
                        && endpoint.down == down
                    {
                        sources.push(pb::SyncSource { node_id: node.0 });
                    }
                }
            }
            if sources.is_empty() {
                return Err(MoveError::NoSource { partition: plan.partition, target: transfer.target });
            }
            let request = pb::SyncPartitionRequest {
                partition: plan.partition.0,
                tenant_ids: transfer.tenant_ids.clone(),
                sources,
                batch_size: 0,
            };
            let mut backoff = Duration::from_millis(200);
            let mut attempt = 1;
            let response = loop {
                match self.transfer(&target.address, request.clone()).await {
                    Ok(response) => break response,
                    Err(error) if attempt < TRANSFER_ATTEMPTS => {
                        tracing::info!(partition = %plan.partition, target = %transfer.target, attempt, %error, "transfer failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        attempt += 1;
                    }
                    Err(source) => {
                        return Err(MoveError::Transfer {
                            partition: plan.partition,
                            target: transfer.target,
                            source,
                        });
                    }
                }
            };
            stats.keys += response.keys;
            stats.bytes += response.bytes;
        }
        Ok(stats)
    }
}
