//! Background repair on a storage node, driven by the topology it follows from meta's watch stream:
//!
//! - **Anti-entropy**: every partition this node replicates is compared, once per
//!   `anti_entropy_period`, with each replica after it in the partition's list (so each pair is
//!   compared once per period, by the replica with the lower position). Roots of the in-memory Merkle
//!   trees first ([`crate::merkle`]); on a difference, the 16 mid-level nodes, then the leaves under
//!   differing mid nodes, then the (key, digest) lists of differing leaves only. Differing keys are
//!   fetched, merged here with DVVS, and the merged sets pushed back where the peer's digest differs,
//!   so both sides converge in one exchange. Keys compared and bytes moved are paced by
//!   [`Budget`]s (keys/s, bytes/s). Replicas of tenants with different N share only the tenants deep
//!   enough for both positions (`pairdb_core::repair::replica_peers`); digests are filtered to those.
//! - **Tombstone GC**: the first replica of a partition lists its tombstone-only records older than the
//!   grace period and purges those every other replica holds with the same digest (each peer purges
//!   too, and re-checks the digest and its own grace). A replica that is down or differs blocks the
//!   purge: tombstones are never purged on time alone. Skipped while a migration runs.
//! - **Full-ack tombstone GC**: a tombstone the router reports every one of the key's N owners
//!   acknowledged itself (`ConfirmTombstone`, recorded only if this node's record is that exact set)
//!   is purged here once older than the grace period, with anti-entropy on or off, provided the
//!   record is unchanged and the placement too (same topology epoch and N, no migration, live view).
//! - **Unowned data**: once the topology and tenants' N have been unchanged for `unowned_grace`
//!   (and no migration runs), records of tenants this node no longer replicates are deleted. The
//!   grace must be spent in one unbroken watch session: a node cut off from meta may be looking at a
//!   topology that is no longer current, so it deletes nothing until it is back and settled again.
//! - **Hint retention**: hints not delivered within `hint_retention` are dropped.
//! - **Rebuild** (`StartRebuild`, `pairdb node rebuild`): one pass over every partition this node
//!   replicates, exchanging with *every* other replica (not only those after it), right away and
//!   paced only by the rate limits — how a node whose data directory was lost is refilled without
//!   waiting for the anti-entropy period. Runs even when periodic anti-entropy is off.
//!
//! The keys/s and bytes/s budgets are the node's: the periodic pass and a rebuild draw on the same
//! ones, so together they never exceed the configured rates.
//!
//! Every storage call runs on the blocking pool; every RPC is bounded (leaves per request, keys per
//! batch); failures are logged here and retried next period.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pairdb_core::encoding::decode_version_set;
use pairdb_core::rate_limit::Budget;
use pairdb_core::repair::{KeyDigest, compare_digests, owned_tenants, replica_peers};
use pairdb_core::ring::NodeId;
use pairdb_core::token::PartitionId;
use pairdb_proto::storage::v1 as pb;
use pairdb_service::clients::{ChannelSettings, InternalClients, StorageClient};
use pairdb_service::cluster_view::{ClusterView, SharedView};
use tokio::sync::{Notify, watch};

use crate::engine::{Engine, EngineError, TombstonePlacement, now_ms};
use crate::keys::RecordKey;
use crate::merkle::{MERKLE_DEPTH, version_digest};

/// Settings of the background repair (from the configuration).
#[derive(Debug, Clone)]
pub struct RepairSettings {
    /// Zero disables anti-entropy.
    pub anti_entropy_period: Duration,
    pub keys_per_sec: u64,
    pub bytes_per_sec: u64,
    pub unowned_grace: Duration,
    pub tombstone_grace: Duration,
    pub hint_retention: Duration,
}

/// Mid level of the descent: 2^4 = 16 nodes, each over 16 leaves.
const MID_LEVEL: u32 = 4;
/// Leaves whose digests one request asks for.
const LEAVES_PER_REQUEST: usize = 4;
/// Keys fetched / pushed per batch.
const KEYS_PER_BATCH: usize = 256;
/// Tombstone candidates per partition per round.
const GC_CANDIDATES: usize = 1000;
/// Full-ack confirmations looked at per engine call.
const CONFIRMED_BATCH: usize = 1000;
/// Records deleted per engine call while dropping unowned data.
const DELETE_BATCH: usize = 1000;
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

type Client = StorageClient;

#[derive(Debug, thiserror::Error)]
enum RepairError {
    #[error("peer {node}: {failure}")]
    Peer { node: NodeId, failure: PeerFailure },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("repair task failed: {0}")]
    Task(String),
}

/// Why a peer could not take part in a repair round.
#[derive(Debug, thiserror::Error)]
enum PeerFailure {
    #[error("down; tombstones wait")]
    Down,
    #[error("no client: {0}")]
    Client(#[from] tonic::transport::Error),
    #[error("{}", .0.message())]
    Call(#[from] tonic::Status),
}

/// Where a rebuild is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RebuildState {
    /// None since the node started.
    #[default]
    Idle,
    Running,
    Done,
}

/// Progress of the node's rebuild (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct RebuildProgress {
    pub state: RebuildState,
    pub partitions_total: u64,
    pub partitions_done: u64,
    pub keys_compared: u64,
    pub keys_repaired: u64,
    pub bytes: u64,
    /// (partition, peer) exchanges that failed or were skipped because the peer was down.
    pub failed_exchanges: u64,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

/// Shared by the gRPC service (which starts rebuilds and reports them) and the repair task (which
/// runs them, one at a time).
#[derive(Debug, Default)]
pub struct Rebuild {
    progress: std::sync::Mutex<RebuildProgress>,
    wake: Notify,
}

impl Rebuild {
    /// Starts a rebuild unless one is running; returns its progress either way.
    pub fn start(&self) -> RebuildProgress {
        let mut progress = self.lock();
        if progress.state != RebuildState::Running {
            *progress = RebuildProgress {
                state: RebuildState::Running,
                started_at_ms: now_ms(),
                ..Default::default()
            };
            // Stored as a permit when the task is busy elsewhere; it picks it up next.
            self.wake.notify_one();
        }
        *progress
    }

    pub fn progress(&self) -> RebuildProgress {
        *self.lock()
    }

    fn update(&self, change: impl FnOnce(&mut RebuildProgress)) {
        change(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RebuildProgress> {
        // Plain counters: a panic mid-update cannot leave them inconsistent in a harmful way.
        self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs the repair loops until `shutdown` is set; rebuilds requested through `rebuild` run here.
pub async fn run(
    engine: Arc<Engine>,
    view: SharedView,
    settings: RepairSettings,
    rebuild: Arc<Rebuild>,
    clients: InternalClients,
    shutdown: watch::Receiver<bool>,
) {
    let peers = Peers { builder: clients, clients: tokio::sync::Mutex::new(HashMap::new()) };
    let pacing = Pacing::new(&settings);
    let repair = Arc::new(Repair { engine, view, settings, peers, pacing });
    let anti_entropy = tokio::spawn(repair.clone().anti_entropy_loop(shutdown.clone()));
    let rebuilds = tokio::spawn(repair.clone().rebuild_loop(rebuild, shutdown.clone()));
    let cleanup = tokio::spawn(repair.clone().unowned_loop(shutdown.clone()));
    let confirmed = tokio::spawn(repair.clone().confirmed_gc_loop(shutdown.clone()));
    let hints = tokio::spawn(repair.hint_expiry_loop(shutdown));
    let _ = tokio::join!(anti_entropy, rebuilds, cleanup, confirmed, hints);
}

#[derive(Debug)]
struct Peers {
    builder: InternalClients,
    clients: tokio::sync::Mutex<HashMap<String, Client>>,
}

impl Peers {
    async fn client(&self, address: &str) -> Result<Client, tonic::transport::Error> {
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

#[derive(Debug)]
struct Repair {
    engine: Arc<Engine>,
    view: SharedView,
    settings: RepairSettings,
    peers: Peers,
    pacing: Pacing,
}

/// The node's anti-entropy budgets (keys compared per second, bytes moved per second), shared by the
/// periodic pass and rebuilds, so the configured rates cap the node's repair work as a whole.
#[derive(Debug)]
struct Pacing {
    keys: std::sync::Mutex<Budget>,
    bytes: std::sync::Mutex<Budget>,
}

impl Pacing {
    fn new(settings: &RepairSettings) -> Self {
        Self {
            keys: std::sync::Mutex::new(Budget::new(settings.keys_per_sec, now_ms())),
            bytes: std::sync::Mutex::new(Budget::new(settings.bytes_per_sec, now_ms())),
        }
    }

    /// Charges `count` keys compared and waits out any debt (the lock is not held while waiting).
    async fn keys(&self, count: u64) {
        let wait_ms = Self::charge(&self.keys, count);
        pause(wait_ms).await;
    }

    /// Charges `count` bytes moved and waits out any debt.
    async fn bytes(&self, count: u64) {
        let wait_ms = Self::charge(&self.bytes, count);
        pause(wait_ms).await;
    }

    fn charge(budget: &std::sync::Mutex<Budget>, count: u64) -> u64 {
        budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner).charge(count, now_ms())
    }
}

/// What one partition's exchange with one peer (or several) did.
#[derive(Debug, Clone, Copy, Default)]
struct Exchange {
    compared: u64,
    repaired: u64,
    bytes: u64,
}

impl Exchange {
    fn add(&mut self, other: Exchange) {
        self.compared += other.compared;
        self.repaired += other.repaired;
        self.bytes += other.bytes;
    }
}

/// Which replica peers of a partition a node exchanges with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerSet {
    /// Those after it in the list (periodic anti-entropy: each pair once per period).
    Later,
    /// Every one (a rebuild).
    All,
}

/// Each tenant with the deepest N any request may use for it (the old one while N changes).
/// Tenants being deleted are left out: their data is purged, not repaired.
fn tenant_depths(view: &ClusterView) -> Vec<(String, usize)> {
    let mut tenants: Vec<(String, usize)> = view
        .tenants
        .values()
        .filter(|t| !t.deleting)
        .map(|t| (t.tenant_id.clone(), t.replication_factor.max(t.previous_replication_factor.unwrap_or(0))))
        .collect();
    tenants.sort();
    tenants
}

async fn sleep_or_stop(duration: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => false,
        _ = shutdown.changed() => true,
    }
}

impl Repair {
    fn me(&self) -> NodeId {
        NodeId(self.engine.identity().node_id)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, RepairError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || op(&engine))
            .await
            .map_err(|e| RepairError::Task(e.to_string()))?
            .map_err(RepairError::from)
    }

    async fn anti_entropy_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = self.settings.anti_entropy_period;
        if period.is_zero() {
            tracing::info!("anti-entropy is off");
            return;
        }
        loop {
            let partitions = self.replicated_partitions(&self.view.load());
            if partitions.is_empty() {
                if sleep_or_stop(period.min(Duration::from_secs(1)), &mut shutdown).await {
                    return;
                }
                continue;
            }
            // Spread the period evenly over the partitions.
            let pace = period / partitions.len() as u32;
            let cycle_started = Instant::now();
            for partition in partitions {
                let started = Instant::now();
                let exchange = self.partition_round(partition).await;
                metrics::counter!("pairdb_storage_anti_entropy_keys_compared_total")
                    .increment(exchange.compared);
                metrics::counter!("pairdb_storage_anti_entropy_keys_repaired_total")
                    .increment(exchange.repaired);
                metrics::counter!("pairdb_storage_anti_entropy_bytes_total").increment(exchange.bytes);
                metrics::histogram!("pairdb_storage_anti_entropy_round_seconds")
                    .record(started.elapsed().as_secs_f64());
                if exchange.repaired > 0 {
                    tracing::info!(%partition, repaired = exchange.repaired, compared = exchange.compared, "anti-entropy repaired keys");
                }
                if sleep_or_stop(pace.saturating_sub(started.elapsed()), &mut shutdown).await {
                    return;
                }
            }
            metrics::counter!("pairdb_storage_anti_entropy_cycles_total").increment(1);
            metrics::gauge!("pairdb_storage_anti_entropy_cycle_seconds")
                .set(cycle_started.elapsed().as_secs_f64());
        }
    }

    /// The partitions of the current topology this node shares with at least one other replica.
    fn replicated_partitions(&self, view: &ClusterView) -> Vec<PartitionId> {
        let me = self.me();
        let tenants = tenant_depths(view);
        match &view.current {
            Some(current) => current
                .lists()
                .filter(|(_, list)| !replica_peers(list, me, &tenants).is_empty())
                .map(|(partition, _)| partition)
                .collect(),
            None => Vec::new(),
        }
    }

    async fn rebuild_loop(self: Arc<Self>, rebuild: Arc<Rebuild>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = rebuild.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            // A node that just started may not have its first topology yet.
            let partitions = loop {
                let view = self.view.load();
                if view.current.is_some() {
                    break self.replicated_partitions(&view);
                }
                if sleep_or_stop(Duration::from_millis(200), &mut shutdown).await {
                    return;
                }
            };
            rebuild.update(|p| p.partitions_total = partitions.len() as u64);
            tracing::info!(partitions = partitions.len(), "rebuild started");
            let started = Instant::now();
            for partition in partitions {
                if *shutdown.borrow() {
                    return;
                }
                let view = self.view.load();
                let (exchange, failed) = self.exchange_partition(partition, &view, PeerSet::All).await;
                metrics::counter!("pairdb_storage_rebuild_keys_repaired_total").increment(exchange.repaired);
                rebuild.update(|p| {
                    p.partitions_done += 1;
                    p.keys_compared += exchange.compared;
                    p.keys_repaired += exchange.repaired;
                    p.bytes += exchange.bytes;
                    p.failed_exchanges += failed;
                });
            }
            rebuild.update(|p| {
                p.state = RebuildState::Done;
                p.finished_at_ms = now_ms();
            });
            let done = rebuild.progress();
            tracing::info!(
                keys_repaired = done.keys_repaired,
                failed_exchanges = done.failed_exchanges,
                seconds = started.elapsed().as_secs_f64(),
                "rebuild done"
            );
        }
    }

    /// Exchanges one partition with its replica peers in `peers`; returns what moved and how many
    /// peers were down or failed.
    async fn exchange_partition(
        &self,
        partition: PartitionId,
        view: &ClusterView,
        peers: PeerSet,
    ) -> (Exchange, u64) {
        let mut total = Exchange::default();
        let mut failed = 0;
        let Some(current) = view.current.as_ref() else { return (total, failed) };
        let me = self.me();
        let tenants = tenant_depths(view);
        let list = current.list(partition);
        let Some(own_position) = list.iter().position(|&n| n == me) else { return (total, failed) };
        for (peer, shared) in replica_peers(list, me, &tenants) {
            let peer_position = list.iter().position(|&n| n == peer).unwrap_or(0);
            if peers == PeerSet::Later && peer_position < own_position {
                continue;
            }
            let Some(entry) = view.nodes.get(&peer).filter(|entry| !entry.down) else {
                failed += 1;
                continue;
            };
            let shared: BTreeSet<String> = shared.into_iter().collect();
            match self.exchange(partition, peer, &entry.address, &shared).await {
                Ok(exchange) => total.add(exchange),
                Err(error) => {
                    failed += 1;
                    metrics::counter!("pairdb_storage_anti_entropy_errors_total").increment(1);
                    tracing::debug!(%partition, %error, "anti-entropy exchange failed; retried next period");
                }
            }
        }
        (total, failed)
    }

    /// Compares one partition with the replicas after this node in its list, then (first replica
    /// only) collects tombstones.
    async fn partition_round(&self, partition: PartitionId) -> Exchange {
        let view = self.view.load();
        let (total, _) = self.exchange_partition(partition, &view, PeerSet::Later).await;
        let Some(current) = view.current.as_ref() else { return total };
        let tenants = tenant_depths(&view);
        let own_position = current.list(partition).iter().position(|&n| n == self.me());
        if own_position == Some(0)
            && view.pending.is_none()
            && view.tenants.values().all(|t| t.previous_replication_factor.is_none())
            && self.engine.partition_tombstones(partition) > 0
            && let Err(error) = self.collect_tombstones(partition, &view, &tenants).await
        {
            tracing::debug!(%partition, %error, "tombstone collection skipped");
        }
        total
    }

    async fn exchange(
        &self,
        partition: PartitionId,
        peer: NodeId,
        address: &str,
        shared: &BTreeSet<String>,
    ) -> Result<Exchange, RepairError> {
        let peer_error = |failure: PeerFailure| RepairError::Peer { node: peer, failure };
        let mut client = self.peers.client(address).await.map_err(|e| peer_error(e.into()))?;
        let mut exchange = Exchange::default();
        let remote_level = |client: &mut Client, level: u32, indexes: Vec<u32>| {
            let mut client = client.clone();
            async move {
                client
                    .merkle_summary(pb::MerkleSummaryRequest {
                        partition: partition.0,
                        level,
                        node_indexes: indexes,
                    })
                    .await
                    .map(|r| r.into_inner().nodes)
                    .map_err(PeerFailure::Call)
            }
        };
        let hash_of = |node: &pb::MerkleNode| {
            let mut bytes = [0u8; 8];
            if node.hash.len() == 8 {
                bytes.copy_from_slice(&node.hash);
            }
            u64::from_be_bytes(bytes)
        };
        let local_root = self.engine.merkle_level(partition, 0);
        let remote_root = remote_level(&mut client, 0, Vec::new()).await.map_err(peer_error)?;
        let local_root_hash = local_root.first().map_or(0, |n| n.hash);
        let remote_root_hash = remote_root.first().map_or(0, hash_of);
        if local_root_hash == remote_root_hash {
            exchange.compared = local_root.first().map_or(0, |n| n.keys);
            return Ok(exchange);
        }
        // Descend: mid level, then the leaves under differing mid nodes.
        let local_mid = self.engine.merkle_level(partition, MID_LEVEL);
        let remote_mid = remote_level(&mut client, MID_LEVEL, Vec::new()).await.map_err(peer_error)?;
        let differing_mid: Vec<u32> = local_mid
            .iter()
            .filter(|local| {
                remote_mid.iter().find(|r| r.index == local.index).map_or(0, hash_of) != local.hash
            })
            .map(|local| local.index)
            .collect();
        let per_mid = 1u32 << (MERKLE_DEPTH - MID_LEVEL);
        let candidate_leaves: Vec<u32> =
            differing_mid.iter().flat_map(|&mid| mid * per_mid..(mid + 1) * per_mid).collect();
        let local_leaves = self.engine.merkle_level(partition, MERKLE_DEPTH);
        let remote_leaves =
            remote_level(&mut client, MERKLE_DEPTH, candidate_leaves.clone()).await.map_err(peer_error)?;
        let differing_leaves: Vec<u32> = candidate_leaves
            .into_iter()
            .filter(|&leaf| {
                let local = local_leaves.get(leaf as usize).map_or(0, |n| n.hash);
                let remote = remote_leaves.iter().find(|r| r.index == leaf).map_or(0, hash_of);
                local != remote
            })
            .collect();
        for leaves in differing_leaves.chunks(LEAVES_PER_REQUEST) {
            let remote: Vec<pb::KeyDigest> = client
                .leaf_digests(pb::LeafDigestsRequest { partition: partition.0, leaves: leaves.to_vec() })
                .await
                .map_err(|s| peer_error(s.into()))?
                .into_inner()
                .digests;
            let wanted = leaves.to_vec();
            let local = self
                .blocking(move |engine| {
                    engine.leaf_digests(partition, &wanted, crate::service::MAX_DIGESTS_PER_RESPONSE)
                })
                .await?;
            let to_core = |tenant_id: &str, key: &str, digest: u64| KeyDigest {
                tenant_id: tenant_id.to_owned(),
                key: key.to_owned(),
                digest,
            };
            let local_digests: Vec<KeyDigest> =
                local.iter().map(|d| to_core(&d.key.tenant, &d.key.key, d.digest)).collect();
            let remote_digests: Vec<KeyDigest> =
                remote.iter().map(|d| to_core(&d.tenant_id, &d.key, d.digest)).collect();
            let diff = compare_digests(&local_digests, &remote_digests, shared);
            exchange.compared += diff.compared as u64;
            self.pacing.keys(diff.compared as u64).await;
            let remote_digest: HashMap<(&str, &str), u64> =
                remote.iter().map(|d| ((d.tenant_id.as_str(), d.key.as_str()), d.digest)).collect();
            for keys in diff.differing.chunks(KEYS_PER_BATCH) {
                let moved = self.repair_keys(partition, &mut client, keys, &remote_digest).await?;
                exchange.repaired += moved.repaired;
                exchange.bytes += moved.bytes;
                self.pacing.bytes(moved.bytes).await;
            }
        }
        Ok(exchange)
    }

    /// Pulls the peer's sets of `keys`, merges them here, and pushes the merged sets the peer lacks.
    async fn repair_keys(
        &self,
        partition: PartitionId,
        client: &mut Client,
        keys: &[(String, String)],
        remote_digest: &HashMap<(&str, &str), u64>,
    ) -> Result<Exchange, RepairError> {
        let mut exchange = Exchange::default();
        let remote_error = |s: tonic::Status| RepairError::Task(format!("peer: {}", s.message()));
        let refs = keys
            .iter()
            .map(|(tenant, key)| pb::KeyRef {
                tenant_id: tenant.clone(),
                key: key.clone(),
                partition: partition.0,
                tenant_generation: 0,
            })
            .collect();
        let remote = client
            .get_batch(pb::GetBatchRequest { partition: partition.0, keys: refs })
            .await
            .map_err(remote_error)?
            .into_inner()
            .records;
        let partitions = self.engine.partitions();
        let mut incoming = Vec::with_capacity(remote.len());
        for record in &remote {
            exchange.bytes += record.version_set.len() as u64;
            let Ok(set) = decode_version_set(&record.version_set) else {
                metrics::counter!("pairdb_storage_invalid_sets_refused_total", "rpc" => "get_batch")
                    .increment(1);
                continue;
            };
            incoming.push((RecordKey::new(partitions, &record.tenant_id, &record.key), set));
        }
        let record_keys: Vec<RecordKey> =
            keys.iter().map(|(tenant, key)| RecordKey::new(partitions, tenant, key)).collect();
        let (changed_here, local) = self
            .blocking(move |engine| {
                let changed = engine.merge_batch(&incoming)?;
                Ok((changed, engine.get_batch(&record_keys)?))
            })
            .await?;
        exchange.repaired += changed_here as u64;
        let mut push = Vec::new();
        for (key, raw) in local {
            let Ok(set) = decode_version_set(&raw) else { continue };
            if remote_digest.get(&(key.tenant.as_str(), key.key.as_str())) != Some(&version_digest(&set)) {
                exchange.bytes += raw.len() as u64;
                push.push(pb::Record { tenant_id: key.tenant, key: key.key, version_set: raw });
            }
        }
        if !push.is_empty() {
            let response = client
                .merge_batch(pb::MergeBatchRequest { partition: partition.0, records: push })
                .await
                .map_err(remote_error)?
                .into_inner();
            exchange.repaired += u64::from(response.changed);
        }
        Ok(exchange)
    }

    /// Purges tombstones every replica of their key holds identically (see the module docs).
    async fn collect_tombstones(
        &self,
        partition: PartitionId,
        view: &ClusterView,
        tenants: &[(String, usize)],
    ) -> Result<(), RepairError> {
        let Some(current) = &view.current else { return Ok(()) };
        let me = self.me();
        let cutoff = now_ms().saturating_sub(self.gc_grace().as_millis() as u64);
        let candidates = self.blocking(move |e| e.old_tombstones(partition, cutoff, GC_CANDIDATES)).await?;
        if candidates.is_empty() {
            return Ok(());
        }
        let mut leaves: Vec<u32> = candidates.iter().map(|c| self.engine.merkle_leaf(&c.key)).collect();
        leaves.sort_unstable();
        leaves.dedup();
        let peers = replica_peers(current.list(partition), me, tenants);
        let mut confirmed: Vec<bool> = vec![true; candidates.len()];
        let mut clients = Vec::new();
        for (peer, shared) in &peers {
            let entry = view
                .nodes
                .get(peer)
                .filter(|e| !e.down)
                .ok_or(RepairError::Peer { node: *peer, failure: PeerFailure::Down })?;
            let mut client = self
                .peers
                .client(&entry.address)
                .await
                .map_err(|e| RepairError::Peer { node: *peer, failure: e.into() })?;
            let mut remote: HashMap<(String, String), (u64, bool)> = HashMap::new();
            for chunk in leaves.chunks(LEAVES_PER_REQUEST) {
                let digests = client
                    .leaf_digests(pb::LeafDigestsRequest { partition: partition.0, leaves: chunk.to_vec() })
                    .await
                    .map_err(|s| RepairError::Peer { node: *peer, failure: s.into() })?
                    .into_inner()
                    .digests;
                remote.extend(
                    digests.into_iter().map(|d| ((d.tenant_id, d.key), (d.digest, d.tombstone_only))),
                );
            }
            for (candidate, ok) in candidates.iter().zip(confirmed.iter_mut()) {
                if shared.contains(&candidate.key.tenant) {
                    let theirs = remote.get(&(candidate.key.tenant.clone(), candidate.key.key.clone()));
                    *ok &= theirs == Some(&(candidate.digest, true));
                }
            }
            clients.push((client, shared.clone()));
        }
        let purge: Vec<_> =
            candidates.iter().zip(&confirmed).filter(|(_, ok)| **ok).map(|(c, _)| c).collect();
        if purge.is_empty() {
            return Ok(());
        }
        // Peers first: if this node stops halfway, its own tombstone stays and anti-entropy pushes it
        // back to peers that purged (harmless; collected again next period).
        for (mut client, shared) in clients {
            let keys = purge
                .iter()
                .filter(|c| shared.contains(&c.key.tenant))
                .map(|c| crate::service::key_digest((*c).clone()))
                .collect();
            client
                .purge_tombstones(pb::PurgeTombstonesRequest { partition: partition.0, keys })
                .await
                .map_err(|s| RepairError::Task(format!("peer purge: {}", s.message())))?;
        }
        let local: Vec<(RecordKey, u64)> = purge.iter().map(|c| (c.key.clone(), c.digest)).collect();
        let purged = self.blocking(move |e| e.purge_tombstones(&local, cutoff)).await?;
        metrics::counter!("pairdb_storage_tombstones_purged_total", "path" => "anti_entropy")
            .increment(purged);
        tracing::debug!(%partition, purged, "tombstones collected");
        Ok(())
    }

    async fn unowned_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let grace = self.settings.unowned_grace;
        let tick = (grace / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
        // (fingerprint of watch session + topology + tenants' N, since when it has not changed)
        let mut settled: Option<(u64, Instant)> = None;
        loop {
            if sleep_or_stop(tick, &mut shutdown).await {
                return;
            }
            let view = self.view.load();
            let Some(fingerprint) = settled_fingerprint(&self.view, &view) else {
                settled = None;
                continue;
            };
            match settled {
                Some((seen, since)) if seen == fingerprint => {
                    if since.elapsed() < grace {
                        continue;
                    }
                }
                _ => {
                    settled = Some((fingerprint, Instant::now()));
                    continue;
                }
            }
            if let Err(error) = self.drop_unowned(&view, fingerprint).await {
                tracing::warn!(%error, "dropping unowned data failed; retrying");
            }
        }
    }

    async fn drop_unowned(&self, view: &ClusterView, fingerprint: u64) -> Result<(), RepairError> {
        let Some(current) = &view.current else { return Ok(()) };
        let me = self.me();
        let tenants = tenant_depths(view);
        let known: Arc<BTreeSet<String>> = Arc::new(view.tenants.keys().cloned().collect());
        let mut total = 0;
        for partition in self.engine.partitions_with_data() {
            // The placement changed, or the view stopped being live, meanwhile: start over after a
            // new grace period.
            if settled_fingerprint(&self.view, &self.view.load()) != Some(fingerprint) {
                return Ok(());
            }
            let owned: Arc<BTreeSet<String>> = Arc::new(
                owned_tenants(current.list(partition), me, &tenants).into_iter().map(str::to_owned).collect(),
            );
            if owned.len() == known.len() {
                continue;
            }
            loop {
                let (known, owned) = (known.clone(), owned.clone());
                let (deleted, complete) = self
                    .blocking(move |engine| {
                        // Tenants meta does not know (yet, or any more) are left alone.
                        let drop = |tenant: &str| known.contains(tenant) && !owned.contains(tenant);
                        engine.delete_unowned(partition, &drop, DELETE_BATCH)
                    })
                    .await?;
                total += deleted;
                if complete {
                    break;
                }
            }
        }
        if total > 0 {
            metrics::counter!("pairdb_storage_unowned_records_deleted_total").increment(total);
            tracing::info!(deleted = total, epoch = view.epoch, "deleted data this node no longer owns");
        }
        Ok(())
    }

    /// How old a tombstone must be to be purged: the configured grace plus the hint sweep interval,
    /// the slack of hint expiry (a hint can outlive its retention by it).
    fn gc_grace(&self) -> Duration {
        self.settings.tombstone_grace + hint_sweep_interval(self.settings.hint_retention)
    }

    /// The full-ack GC path: purges tombstones that every owner acknowledged (the router's
    /// `ConfirmTombstone`) once they are older than the grace, whether or not anti-entropy runs.
    /// Works only from a live view with no migration or N change under way, so "same epoch, same N"
    /// means "same owners, and nothing moved since".
    async fn confirmed_gc_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let interval =
            (self.settings.tombstone_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            if sleep_or_stop(interval, &mut shutdown).await {
                return;
            }
            let mut cursor: Option<Vec<u8>> = None;
            loop {
                let view = self.view.load();
                if self.view.session().is_none()
                    || view.pending.is_some()
                    || view.tenants.values().any(|t| t.previous_replication_factor.is_some())
                {
                    break;
                }
                let cutoff = now_ms().saturating_sub(self.gc_grace().as_millis() as u64);
                let after = cursor.take();
                let pass = self
                    .blocking(move |engine| {
                        let holds = |key: &RecordKey, placement: TombstonePlacement| {
                            placement_holds(&view, &key.tenant, placement)
                        };
                        engine.collect_confirmed_tombstones(after.as_deref(), CONFIRMED_BATCH, cutoff, &holds)
                    })
                    .await;
                match pass {
                    Ok((purged, next)) => {
                        if purged > 0 {
                            metrics::counter!("pairdb_storage_tombstones_purged_total", "path" => "full_ack")
                                .increment(purged);
                            tracing::debug!(purged, "fully acknowledged tombstones collected");
                        }
                        match next {
                            Some(next) => cursor = Some(next),
                            None => break,
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "full-ack tombstone collection failed; retrying");
                        break;
                    }
                }
            }
        }
    }

    async fn hint_expiry_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let retention = self.settings.hint_retention;
        loop {
            if sleep_or_stop(hint_sweep_interval(retention), &mut shutdown).await {
                return;
            }
            let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
            match self.blocking(move |engine| engine.expire_hints(cutoff)).await {
                Ok(0) => {}
                Ok(expired) => {
                    metrics::counter!("pairdb_storage_hints_expired_total").increment(expired);
                    tracing::warn!(
                        expired,
                        "dropped hints older than the retention; anti-entropy repairs their keys"
                    );
                }
                Err(error) => tracing::warn!(%error, "hint expiry failed"),
            }
        }
    }
}

/// Whether a full-ack confirmation made under `placement` still names the key's owners (the rule is
/// [`pairdb_core::gc::placement_holds`]).
pub(crate) fn placement_holds(view: &ClusterView, tenant: &str, placement: TombstonePlacement) -> bool {
    pairdb_core::gc::placement_holds(&view.placement_view(tenant), placement)
}

/// How often expired hints are dropped: a quarter of the retention, between 1 s and 60 s.
fn hint_sweep_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// What unowned-data deletion waits to see unchanged for its grace period: `None` while the view is
/// not live (see [`SharedView::session`]), has no topology or a migration is pending; otherwise a
/// value that changes with the watch session, the current topology and any tenant's N.
fn settled_fingerprint(shared: &SharedView, view: &ClusterView) -> Option<u64> {
    let session = shared.session()?;
    if view.current.is_none() || view.pending.is_some() {
        return None;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    session.hash(&mut hasher);
    placement_fingerprint(view).hash(&mut hasher);
    Some(hasher.finish())
}

/// Changes whenever the current topology or any tenant's N changes.
fn placement_fingerprint(view: &ClusterView) -> u64 {
    let mut tenants: Vec<(&str, usize, Option<usize>)> = view
        .tenants
        .values()
        .map(|t| (t.tenant_id.as_str(), t.replication_factor, t.previous_replication_factor))
        .collect();
    tenants.sort_unstable();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    view.epoch.hash(&mut hasher);
    tenants.hash(&mut hasher);
    hasher.finish()
}

async fn pause(wait_ms: u64) {
    if wait_ms > 0 {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use pairdb_core::ring::{Assignment, NodeSpec};
    use pairdb_core::token::PartitionCount;

    use super::*;

    fn view_with_topology(epoch: u64) -> ClusterView {
        let nodes: Vec<NodeSpec> =
            (1..=3).map(|id| NodeSpec { id: NodeId(id), weight: 1, zone: None }).collect();
        let current = Assignment::compute(None, &nodes, PartitionCount::new(16).unwrap()).unwrap();
        ClusterView { epoch, current: Some(Arc::new(current)), ..ClusterView::default() }
    }

    #[test]
    fn unowned_data_waits_for_a_live_unbroken_watch_session() {
        let shared = SharedView::default();
        let view = view_with_topology(1);
        assert_eq!(settled_fingerprint(&shared, &view), None, "never connected: the view may be stale");

        shared.set_session(1);
        let first = settled_fingerprint(&shared, &view).unwrap();
        assert_eq!(settled_fingerprint(&shared, &view), Some(first), "stable while nothing changes");

        shared.set_session(0);
        assert_eq!(settled_fingerprint(&shared, &view), None, "stream broken: nothing is deleted");

        shared.set_session(2);
        let reconnected = settled_fingerprint(&shared, &view).unwrap();
        assert_ne!(reconnected, first, "a new session restarts the grace period");

        let next_epoch = view_with_topology(2);
        assert_ne!(
            settled_fingerprint(&shared, &next_epoch),
            Some(reconnected),
            "a new topology restarts it"
        );

        let mut migrating = view_with_topology(2);
        migrating.pending = migrating.current.clone();
        assert_eq!(settled_fingerprint(&shared, &migrating), None, "nothing is deleted during a migration");
        assert_eq!(settled_fingerprint(&shared, &ClusterView::default()), None, "no topology yet");
    }
}
