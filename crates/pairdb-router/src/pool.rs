//! Connections to storage nodes and the router's local failure view.
//!
//! One multiplexed HTTP/2 channel per storage node, created lazily (`connect_lazy`, so no lock is ever
//! held across a connect) and replaced when the node's address changes. Each node has a bound on
//! in-flight RPCs. A node becomes *suspect* at its first failed call (error or timeout) — ahead of
//! meta's verdict — and stays suspect until a probe succeeds; suspects are skipped as coordinators and
//! replaced by fallbacks as replicas, so the router never waits on a dead node twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_service::clients::{ChannelSettings, InternalClients};
use tokio::sync::Semaphore;

/// A storage client presenting the router's cluster credential and propagating trace context.
pub type StorageClient = pairdb_service::clients::StorageClient;

/// The storage RPCs the router times per node: the `rpc` label of
/// `pairdb_router_storage_rpc_seconds`, in the order `storage::Rpc` indexes them.
pub const TIMED_RPCS: [&str; 8] = [
    "coordinate_write",
    "coordinate_write_batch",
    "replicate",
    "replicate_batch",
    "get",
    "confirm_tombstone",
    "list_records",
    "get_many",
];

/// Point calls of one kind in flight to a node before further ones coalesce, by default.
pub const DEFAULT_COALESCE_LEADS: usize = 1;

/// One storage node's client and health.
#[derive(Debug)]
pub struct NodeClient {
    pub node: NodeId,
    pub address: String,
    client: StorageClient,
    inflight: Semaphore,
    suspect: AtomicBool,
    /// Concurrent point calls queue here and leave as batched RPCs ([`crate::coalesce`]).
    pub lanes: crate::storage::Lanes,
    storage_timeout: Duration,
    /// Latency of each of [`TIMED_RPCS`] to this node: registered once, so a call records without
    /// building labels.
    rpc_seconds: [metrics::Histogram; TIMED_RPCS.len()],
}

impl NodeClient {
    /// A client for one call once an in-flight slot is free. The permit must live as long as the call.
    pub async fn acquire(&self) -> Option<(StorageClient, tokio::sync::SemaphorePermit<'_>)> {
        let permit = self.inflight.acquire().await.ok()?;
        Some((self.client.clone(), permit))
    }

    /// How long a call to this node may go unanswered before the node is suspect.
    pub fn storage_timeout(&self) -> Duration {
        self.storage_timeout
    }

    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    /// Records a failed call: the node is suspect from now on, until a probe succeeds.
    pub fn record_failure(&self) {
        if !self.suspect.swap(true, Ordering::Relaxed) {
            tracing::warn!(node_id = self.node.0, address = %self.address, "storage node suspect after a failed call");
        }
        metrics::counter!("pairdb_router_storage_errors_total", "node" => self.node.0.to_string())
            .increment(1);
    }

    /// Records how long the node took to answer one call of `TIMED_RPCS[rpc]`.
    pub fn observe_rpc(&self, rpc: usize, elapsed: Duration) {
        debug_assert!(rpc < TIMED_RPCS.len());
        if let Some(histogram) = self.rpc_seconds.get(rpc) {
            histogram.record(elapsed.as_secs_f64());
        }
    }

    /// Records a successful call. Returns true when this cleared a suspicion.
    pub fn record_success(&self) -> bool {
        self.suspect.swap(false, Ordering::Relaxed)
    }
}

/// Every storage node the router talks to.
#[derive(Debug)]
pub struct StoragePool {
    nodes: RwLock<HashMap<NodeId, Arc<NodeClient>>>,
    max_inflight_per_node: usize,
    storage_timeout: Duration,
    clients: InternalClients,
    /// Point calls of one kind in flight to a node before further ones coalesce (0: never).
    coalesce_leads: usize,
}

impl StoragePool {
    pub fn new(max_inflight_per_node: usize, storage_timeout: Duration) -> Self {
        Self {
            nodes: RwLock::default(),
            max_inflight_per_node,
            storage_timeout,
            clients: InternalClients::insecure(),
            coalesce_leads: DEFAULT_COALESCE_LEADS,
        }
    }

    /// Lets `leads` point calls of one kind out to a node alone before coalescing further ones
    /// (0: every call alone).
    pub fn with_coalescing(mut self, leads: usize) -> Self {
        self.coalesce_leads = leads;
        self
    }

    /// Talks to storage nodes with these clients (TLS, cluster credential, message bounds).
    pub fn with_clients(mut self, clients: InternalClients) -> Self {
        self.clients = clients;
        self
    }

    pub fn storage_timeout(&self) -> Duration {
        self.storage_timeout
    }

    /// The client of `node` at `address`, created on first use or when the address changed.
    pub fn client(&self, node: NodeId, address: &str) -> Option<Arc<NodeClient>> {
        if let Some(existing) = self.nodes.read().unwrap_or_else(PoisonError::into_inner).get(&node)
            && existing.address == address
        {
            return Some(existing.clone());
        }
        let settings = ChannelSettings {
            connect_timeout: self.storage_timeout,
            request_timeout: None,
            keepalive: Some(Duration::from_secs(10)),
        };
        let client = self.clients.storage(address, settings).ok()?;
        let fresh = Arc::new(NodeClient {
            node,
            address: address.to_owned(),
            client,
            inflight: Semaphore::new(self.max_inflight_per_node),
            suspect: AtomicBool::new(false),
            lanes: crate::storage::Lanes::new(self.coalesce_leads, node),
            storage_timeout: self.storage_timeout,
            rpc_seconds: TIMED_RPCS.map(|rpc| {
                metrics::histogram!("pairdb_router_storage_rpc_seconds", "node_id" => node.0.to_string(), "rpc" => rpc)
            }),
        });
        let mut nodes = self.nodes.write().unwrap_or_else(PoisonError::into_inner);
        // Another request may have raced us; keep whichever matches the address.
        let entry = nodes.entry(node).or_insert_with(|| fresh.clone());
        if entry.address != address {
            *entry = fresh;
        }
        Some(entry.clone())
    }

    /// Nodes currently suspect in the local failure view.
    pub fn suspects(&self) -> BTreeSet<NodeId> {
        self.nodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|c| c.is_suspect())
            .map(|c| c.node)
            .collect()
    }

    /// Those of `candidates` whose write calls from this router have had one out for at least
    /// `after` (see `WritePlan::slow`: they coordinate only when no prompt owner can). Looks only
    /// at the candidates: it runs for every write.
    pub fn slow(&self, candidates: &[NodeId], after: Duration) -> BTreeSet<NodeId> {
        let now = tokio::time::Instant::now();
        let nodes = self.nodes.read().unwrap_or_else(PoisonError::into_inner);
        candidates
            .iter()
            .filter(|node| nodes.get(node).is_some_and(|c| c.lanes.writes_stalled(now, after)))
            .copied()
            .collect()
    }

    pub fn all(&self) -> Vec<Arc<NodeClient>> {
        self.nodes.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }
}
