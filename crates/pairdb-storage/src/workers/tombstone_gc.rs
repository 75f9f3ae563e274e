//! Tombstone GC, both paths. Either runs only while the node's view is live and quiet (one unbroken
//! watch session; a topology, no migration, no N change: `ClusterPlacement::tombstone_gc_allowed`),
//! and each removal is decided by
//! `pairdb_core::gc::tombstones` and re-checked under the key's stripe lock by the engine.
//!
//! - **Anti-entropy path** ([`collect_agreed`], after the periodic exchanges): the first replica of a
//!   partition lists its tombstone-only records older than the grace period and purges those every
//!   other replica holds with the same digest (each peer purges too, re-checking the digest and its
//!   own grace). A replica that is down or differs blocks the purge: tombstones are never purged on
//!   time alone.
//! - **Full-ack path** ([`ConfirmedGc`]): a tombstone the router reports every one of the key's N
//!   owners acknowledged (`ConfirmTombstone`, recorded only if this node's record is that exact set)
//!   is purged once older than the grace period, with anti-entropy on or off, provided the record is
//!   unchanged and its placement still holds (`pairdb_core::gc::placement_holds`) in a live view.

use std::collections::HashMap;
use std::time::Duration;

use pairdb_core::gc::tombstones::{gc_cutoff_ms, replicas_agree};
use pairdb_core::gc::{RecordState, TombstonePlacement};
use pairdb_core::repair::replica_peers;
use pairdb_core::token::PartitionId;
use pairdb_service::cluster_view::ClusterView;

use super::anti_entropy::{Exchanger, LEAVES_PER_REQUEST};
use super::peers::Peer;
use super::{Context, Worker, WorkerError};
use crate::engine::{RecordDigest, now_ms};
use crate::keys::RecordKey;

/// Tombstone candidates per partition per round.
const GC_CANDIDATES: usize = 1000;
/// Full-ack confirmations looked at per engine call.
const CONFIRMED_BATCH: usize = 1000;

/// The anti-entropy path for one partition (see the module docs); does nothing unless this node is
/// the partition's first replica, the view is quiet and the partition holds tombstones.
pub async fn collect_agreed(
    exchanger: &Exchanger,
    partition: PartitionId,
    view: &ClusterView,
) -> Result<(), WorkerError> {
    let context = &exchanger.context;
    let Some(current) = &view.current else { return Ok(()) };
    let placement = view.cluster_placement();
    let leads = current.list(partition).first() == Some(&context.me());
    let allowed = placement.tombstone_gc_allowed(context.view.session());
    if !leads || !allowed || context.engine.partition_tombstones(partition) == 0 {
        return Ok(());
    }
    let cutoff = gc_cutoff_ms(now_ms(), context.settings.gc_grace().as_millis() as u64);
    let candidates = context.blocking(move |e| e.old_tombstones(partition, cutoff, GC_CANDIDATES)).await?;
    if candidates.is_empty() {
        return Ok(());
    }
    let mut leaves: Vec<u32> = candidates.iter().map(|c| context.engine.merkle_leaf(&c.key)).collect();
    leaves.sort_unstable();
    leaves.dedup();
    let mut agreed = vec![true; candidates.len()];
    let mut peers = Vec::new();
    for (node, shared) in replica_peers(current.list(partition), context.me(), &placement.replica_depths()) {
        let mut peer = exchanger.peers.live(view, node).await?;
        let theirs = peer_states(&mut peer, partition, &leaves).await?;
        for (candidate, agreed) in candidates.iter().zip(agreed.iter_mut()) {
            if shared.contains(&candidate.key.tenant) {
                let answer = theirs.get(&(candidate.key.tenant.clone(), candidate.key.key.clone()));
                *agreed &= replicas_agree(&candidate.state(), [answer]);
            }
        }
        peers.push((peer, shared));
    }
    let purge: Vec<&RecordDigest> =
        candidates.iter().zip(&agreed).filter(|(_, ok)| **ok).map(|(c, _)| c).collect();
    if purge.is_empty() {
        return Ok(());
    }
    // Peers first: if this node stops halfway, its own tombstone stays and anti-entropy pushes it
    // back to peers that purged (harmless; collected again next period).
    for (mut peer, shared) in peers {
        let tombstones =
            purge.iter().filter(|c| shared.contains(&c.key.tenant)).map(|c| (*c).clone()).collect();
        peer.purge_tombstones(partition, tombstones).await?;
    }
    let local: Vec<(RecordKey, u64)> = purge.iter().map(|c| (c.key.clone(), c.digest)).collect();
    let purged = context.blocking(move |e| e.purge_tombstones(&local, cutoff)).await?;
    metrics::counter!("pairdb_storage_tombstones_purged_total", "path" => "anti_entropy").increment(purged);
    tracing::debug!(%partition, purged, "tombstones collected");
    Ok(())
}

/// A peer's records under `leaves`: (tenant, key) → what the GC decisions read of it.
async fn peer_states(
    peer: &mut Peer,
    partition: PartitionId,
    leaves: &[u32],
) -> Result<HashMap<(String, String), RecordState>, WorkerError> {
    let mut states = HashMap::new();
    for chunk in leaves.chunks(LEAVES_PER_REQUEST) {
        let digests = peer.leaf_digests(partition, chunk).await?;
        states.extend(digests.into_iter().map(|d| {
            let state = RecordState {
                digest: d.digest,
                tombstone_only: d.tombstone_only,
                // The peer re-checks its own grace before it purges.
                newest_timestamp_ms: 0,
            };
            ((d.key.tenant, d.key.key), state)
        }));
    }
    Ok(states)
}

/// Whether a full-ack confirmation made under `placement` still names the key's owners (the rule is
/// [`pairdb_core::gc::placement_holds`]).
pub fn placement_holds(view: &ClusterView, tenant: &str, placement: TombstonePlacement) -> bool {
    pairdb_core::gc::placement_holds(&view.placement_view(tenant), placement)
}

/// The full-ack path (see the module docs): a pass over every confirmation each interval.
#[derive(Debug)]
pub struct ConfirmedGc {
    context: Context,
}

impl ConfirmedGc {
    pub fn new(context: Context) -> Self {
        Self { context }
    }

    fn interval(&self) -> Duration {
        (self.context.settings.tombstone_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Worker for ConfirmedGc {
    const NAME: &'static str = "confirmed_tombstone_gc";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        let held = self.context.view.load().unowned_leftovers();
        metrics::gauge!("pairdb_storage_tombstone_gc_held").set(f64::from(u8::from(held)));
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let view = self.context.view.load();
            // A stale view could say "same epoch, same N" about owners that changed.
            if !view.cluster_placement().tombstone_gc_allowed(self.context.view.session()) {
                break;
            }
            let cutoff = gc_cutoff_ms(now_ms(), self.context.settings.gc_grace().as_millis() as u64);
            let after = cursor.take();
            let (purged, next) = self
                .context
                .blocking(move |engine| {
                    let holds = |key: &RecordKey, placement: TombstonePlacement| {
                        placement_holds(&view, &key.tenant, placement)
                    };
                    engine.collect_confirmed_tombstones(after.as_deref(), CONFIRMED_BATCH, cutoff, &holds)
                })
                .await?;
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
        Ok(self.interval())
    }

    fn retry_after(&self) -> Duration {
        self.interval()
    }
}
