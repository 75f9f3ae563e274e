//! Clients for the replica peers the workers call, one per address, built with the node's cluster
//! credentials and bounded timeouts.

use std::collections::HashMap;
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_service::clients::{ChannelSettings, InternalClients, StorageClient};
use pairdb_service::cluster_view::ClusterView;

use super::WorkerError;

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
    clients: tokio::sync::Mutex<HashMap<String, StorageClient>>,
}

impl Peers {
    pub fn new(builder: InternalClients) -> Self {
        Self { builder, clients: tokio::sync::Mutex::new(HashMap::new()) }
    }

    /// The client for `peer` at the address `view` lists, if the view says it is up.
    pub async fn live(&self, view: &ClusterView, peer: NodeId) -> Result<StorageClient, WorkerError> {
        let failure = |failure: PeerFailure| WorkerError::Peer { node: peer, failure };
        let entry = view.nodes.get(&peer).filter(|e| !e.down).ok_or(failure(PeerFailure::Down))?;
        self.client(&entry.address).await.map_err(|e| failure(e.into()))
    }

    pub async fn client(&self, address: &str) -> Result<StorageClient, tonic::transport::Error> {
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

/// Maps a failed call to `peer` into the step's error.
pub fn call_failed(peer: NodeId) -> impl Fn(tonic::Status) -> WorkerError {
    move |status| WorkerError::Peer { node: peer, failure: PeerFailure::Call(status) }
}
