//! Anti-entropy: every partition this node replicates is compared, once per `anti_entropy_period`,
//! with each replica after it in the partition's list (so each pair is compared once per period, by
//! the replica with the lower position). Roots of the in-memory Merkle trees first
//! ([`crate::merkle`]); on a difference, the 16 mid-level nodes, then the leaves under differing mid
//! nodes, then the (key, digest) lists of differing leaves only. Differing keys are fetched, merged
//! here with DVVS, and the merged sets pushed back where the peer's digest differs, so both sides
//! converge in one exchange. Keys compared and bytes moved are paced by the node's [`Pacing`]
//! (keys/s, bytes/s), which a rebuild draws on too. Replicas of tenants with different N share only
//! the tenants deep enough for both positions (`pairdb_core::repair::replica_peers`); digests are
//! filtered to those. After its exchanges, the first replica of a partition runs the anti-entropy
//! path of tombstone GC ([`super::tombstone_gc::collect_agreed`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use pairdb_core::encoding::decode_version_set;
use pairdb_core::rate_limit::Budget;
use pairdb_core::repair::{KeyDigest, compare_digests, replica_peers};
use pairdb_core::ring::NodeId;
use pairdb_core::token::PartitionId;
use pairdb_service::cluster_view::ClusterView;
use tokio::time::Instant;

use super::peers::{Peer, Peers};
use super::{Context, Worker, WorkerError, WorkerSettings, tombstone_gc};
use crate::engine::{RecordDigest, now_ms};
use crate::keys::RecordKey;
use crate::merkle::{MERKLE_DEPTH, version_digest};

/// Mid level of the descent: 2^4 = 16 nodes, each over 16 leaves.
const MID_LEVEL: u32 = 4;
/// Leaves whose digests one request asks for.
pub const LEAVES_PER_REQUEST: usize = 4;
/// Keys fetched / pushed per batch.
const KEYS_PER_BATCH: usize = 256;

/// The node's anti-entropy budgets (keys compared per second, bytes moved per second), shared by the
/// periodic pass and rebuilds, so the configured rates cap the node's repair work as a whole.
#[derive(Debug)]
pub struct Pacing {
    keys: std::sync::Mutex<Budget>,
    bytes: std::sync::Mutex<Budget>,
}

impl Pacing {
    pub fn new(settings: &WorkerSettings) -> Self {
        Self {
            keys: std::sync::Mutex::new(Budget::new(settings.keys_per_sec, now_ms())),
            bytes: std::sync::Mutex::new(Budget::new(settings.bytes_per_sec, now_ms())),
        }
    }

    /// Charges `count` keys compared and waits out any debt (the lock is not held while waiting).
    async fn keys(&self, count: u64) {
        pause(Self::charge(&self.keys, count)).await;
    }

    /// Charges `count` bytes moved and waits out any debt.
    async fn bytes(&self, count: u64) {
        pause(Self::charge(&self.bytes, count)).await;
    }

    fn charge(budget: &std::sync::Mutex<Budget>, count: u64) -> u64 {
        budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner).charge(count, now_ms())
    }
}

async fn pause(wait_ms: u64) {
    if wait_ms > 0 {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
}

/// What one partition's exchange with one peer (or several) did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exchange {
    pub compared: u64,
    pub repaired: u64,
    pub bytes: u64,
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
pub enum PeerSet {
    /// Those after it in the list (periodic anti-entropy: each pair once per period).
    Later,
    /// Every one (a rebuild).
    All,
}

/// Runs Merkle exchanges; shared by the periodic pass and rebuilds.
#[derive(Debug, Clone)]
pub struct Exchanger {
    pub context: Context,
    pub peers: Arc<Peers>,
    pacing: Arc<Pacing>,
}

impl Exchanger {
    pub fn new(context: Context, peers: Arc<Peers>, pacing: Arc<Pacing>) -> Self {
        Self { context, peers, pacing }
    }

    /// The partitions of the current topology this node shares with at least one other replica.
    pub fn replicated_partitions(&self, view: &ClusterView) -> Vec<PartitionId> {
        let me = self.context.me();
        let depths = view.cluster_placement().replica_depths();
        match &view.current {
            Some(current) => current
                .lists()
                .filter(|(_, list)| !replica_peers(list, me, &depths).is_empty())
                .map(|(partition, _)| partition)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Exchanges one partition with its replica peers in `peers`; returns what moved and how many
    /// peers were down or failed.
    pub async fn exchange_partition(
        &self,
        partition: PartitionId,
        view: &ClusterView,
        peers: PeerSet,
    ) -> (Exchange, u64) {
        let mut total = Exchange::default();
        let mut failed = 0;
        let Some(current) = view.current.as_ref() else { return (total, failed) };
        let me = self.context.me();
        let list = current.list(partition);
        let Some(own_position) = list.iter().position(|&n| n == me) else { return (total, failed) };
        for (peer, shared) in replica_peers(list, me, &view.cluster_placement().replica_depths()) {
            let peer_position = list.iter().position(|&n| n == peer).unwrap_or(0);
            if peers == PeerSet::Later && peer_position < own_position {
                continue;
            }
            let shared: BTreeSet<String> = shared.into_iter().collect();
            match self.exchange(partition, peer, view, &shared).await {
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

    /// Compares one partition with one peer and repairs both sides (see the module docs).
    async fn exchange(
        &self,
        partition: PartitionId,
        node: NodeId,
        view: &ClusterView,
        shared: &BTreeSet<String>,
    ) -> Result<Exchange, WorkerError> {
        let mut peer = self.peers.live(view, node).await?;
        let mut exchange = Exchange::default();
        let Some(differing_leaves) = self.differing_leaves(partition, &mut peer, &mut exchange).await? else {
            return Ok(exchange);
        };
        for leaves in differing_leaves.chunks(LEAVES_PER_REQUEST) {
            let remote = peer.leaf_digests(partition, leaves).await?;
            let wanted = leaves.to_vec();
            let local = self
                .context
                .blocking(move |engine| {
                    engine.leaf_digests(partition, &wanted, crate::service::MAX_DIGESTS_PER_RESPONSE)
                })
                .await?;
            let to_core = |d: &RecordDigest| KeyDigest {
                tenant_id: d.key.tenant.clone(),
                key: d.key.key.clone(),
                digest: d.digest,
            };
            let local_digests: Vec<KeyDigest> = local.iter().map(to_core).collect();
            let remote_digests: Vec<KeyDigest> = remote.iter().map(to_core).collect();
            let diff = compare_digests(&local_digests, &remote_digests, shared);
            exchange.compared += diff.compared as u64;
            self.pacing.keys(diff.compared as u64).await;
            let remote_digest: HashMap<(&str, &str), u64> =
                remote.iter().map(|d| ((d.key.tenant.as_str(), d.key.key.as_str()), d.digest)).collect();
            // The differing keys as either side files them (their placement tokens included).
            let placed: HashMap<(&str, &str), &RecordKey> = local
                .iter()
                .chain(&remote)
                .map(|d| ((d.key.tenant.as_str(), d.key.key.as_str()), &d.key))
                .collect();
            for keys in diff.differing.chunks(KEYS_PER_BATCH) {
                let keys: Vec<RecordKey> = keys
                    .iter()
                    .filter_map(|(tenant, key)| {
                        placed.get(&(tenant.as_str(), key.as_str())).map(|k| (*k).clone())
                    })
                    .collect();
                let moved = self.repair_keys(partition, &mut peer, keys, &remote_digest).await?;
                exchange.repaired += moved.repaired;
                exchange.bytes += moved.bytes;
                self.pacing.bytes(moved.bytes).await;
            }
        }
        Ok(exchange)
    }

    /// The Merkle descent: `None` when the roots match (`exchange.compared` then counts the keys),
    /// otherwise the leaves whose hashes differ, found through the mid level.
    async fn differing_leaves(
        &self,
        partition: PartitionId,
        peer: &mut Peer,
        exchange: &mut Exchange,
    ) -> Result<Option<Vec<u32>>, WorkerError> {
        let engine = &self.context.engine;
        let local_root = engine.merkle_level(partition, 0);
        let remote_root = peer.merkle_summary(partition, 0, Vec::new()).await?;
        if local_root.first().map_or(0, |n| n.hash) == remote_root.first().map_or(0, |n| n.hash) {
            exchange.compared = local_root.first().map_or(0, |n| n.keys);
            return Ok(None);
        }
        let local_mid = engine.merkle_level(partition, MID_LEVEL);
        let remote_mid = peer.merkle_summary(partition, MID_LEVEL, Vec::new()).await?;
        let differing_mid = local_mid.iter().filter(|local| {
            remote_mid.iter().find(|r| r.index == local.index).map_or(0, |r| r.hash) != local.hash
        });
        let per_mid = 1u32 << (MERKLE_DEPTH - MID_LEVEL);
        let candidate_leaves: Vec<u32> =
            differing_mid.flat_map(|mid| mid.index * per_mid..(mid.index + 1) * per_mid).collect();
        let local_leaves = engine.merkle_level(partition, MERKLE_DEPTH);
        let remote_leaves = peer.merkle_summary(partition, MERKLE_DEPTH, candidate_leaves.clone()).await?;
        let differing = candidate_leaves.into_iter().filter(|&leaf| {
            let local = local_leaves.get(leaf as usize).map_or(0, |n| n.hash);
            local != remote_leaves.iter().find(|r| r.index == leaf).map_or(0, |r| r.hash)
        });
        Ok(Some(differing.collect()))
    }

    /// Pulls the peer's sets of `keys`, merges them here, and pushes the merged sets the peer lacks.
    async fn repair_keys(
        &self,
        partition: PartitionId,
        peer: &mut Peer,
        record_keys: Vec<RecordKey>,
        remote_digest: &HashMap<(&str, &str), u64>,
    ) -> Result<Exchange, WorkerError> {
        let mut exchange = Exchange::default();
        let remote = peer.get_batch(partition, &record_keys).await?;
        let mut incoming = Vec::with_capacity(remote.len());
        for (key, raw) in remote {
            exchange.bytes += raw.len() as u64;
            let Ok(set) = decode_version_set(&raw) else {
                metrics::counter!("pairdb_storage_invalid_sets_refused_total", "rpc" => "get_batch")
                    .increment(1);
                continue;
            };
            incoming.push((key, set));
        }
        let (changed_here, local) = self
            .context
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
                push.push((key, raw));
            }
        }
        if !push.is_empty() {
            exchange.repaired += peer.merge_batch(partition, push).await?;
        }
        Ok(exchange)
    }
}

/// The periodic pass (see the module docs): one partition per step, spread over the period.
#[derive(Debug)]
pub struct AntiEntropy {
    exchanger: Exchanger,
    queue: VecDeque<PartitionId>,
    pace: Duration,
    cycle_started: Instant,
}

impl AntiEntropy {
    pub fn new(context: Context, peers: Arc<Peers>, pacing: Arc<Pacing>) -> Self {
        let exchanger = Exchanger::new(context, peers, pacing);
        Self { exchanger, queue: VecDeque::new(), pace: Duration::ZERO, cycle_started: Instant::now() }
    }

    /// Compares one partition with the replicas after this node in its list, then (first replica
    /// only) collects tombstones.
    async fn partition_round(&self, partition: PartitionId) -> Exchange {
        let view = self.exchanger.context.view.load();
        let (total, _) = self.exchanger.exchange_partition(partition, &view, PeerSet::Later).await;
        if let Err(error) = tombstone_gc::collect_agreed(&self.exchanger, partition, &view).await {
            tracing::debug!(%partition, %error, "tombstone collection skipped");
        }
        total
    }
}

impl Worker for AntiEntropy {
    const NAME: &'static str = "anti_entropy";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        let period = self.exchanger.context.settings.anti_entropy_period;
        if self.queue.is_empty() {
            let partitions = self.exchanger.replicated_partitions(&self.exchanger.context.view.load());
            if partitions.is_empty() {
                return Ok(period.min(Duration::from_secs(1)));
            }
            // Spread the period evenly over the partitions.
            self.pace = period / partitions.len() as u32;
            self.queue = partitions.into();
            self.cycle_started = Instant::now();
        }
        let Some(partition) = self.queue.pop_front() else { return Ok(self.pace) };
        let started = Instant::now();
        let exchange = self.partition_round(partition).await;
        metrics::counter!("pairdb_storage_anti_entropy_keys_compared_total").increment(exchange.compared);
        metrics::counter!("pairdb_storage_anti_entropy_keys_repaired_total").increment(exchange.repaired);
        metrics::counter!("pairdb_storage_anti_entropy_bytes_total").increment(exchange.bytes);
        metrics::histogram!("pairdb_storage_anti_entropy_round_seconds")
            .record(started.elapsed().as_secs_f64());
        if exchange.repaired > 0 {
            tracing::info!(%partition, repaired = exchange.repaired, compared = exchange.compared, "anti-entropy repaired keys");
        }
        if self.queue.is_empty() {
            metrics::counter!("pairdb_storage_anti_entropy_cycles_total").increment(1);
            metrics::gauge!("pairdb_storage_anti_entropy_cycle_seconds")
                .set(self.cycle_started.elapsed().as_secs_f64());
        }
        Ok(self.pace.saturating_sub(started.elapsed()))
    }
}
