//! Hints, held by the node that took them for an owner that was down or slow.
//!
//! - **Delivery** ([`HintDelivery`]): every `hint_delivery_interval`, and at once when the view shows
//!   a node that was down come back, the hints held for each live node are pushed to it through
//!   `MergeBatch` (which merges with DVVS on the owner, so a hint never overwrites a newer version
//!   there) and each delivered hint is deleted unless it grew meanwhile (it then goes next round). A
//!   hint is only ever sent to the address the topology lists for its owner (the node follows the
//!   topology, so it knows when an owner is back and where it listens). Batches are bounded and go
//!   one partition at a time.
//! - **Expiry** ([`HintExpiry`]): hints not delivered within `hint_retention` are dropped; anti-entropy
//!   repairs their keys.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use pairdb_core::encoding::encode_version_set;
use pairdb_core::ring::NodeId;
use pairdb_core::token::PartitionId;
use pairdb_service::clients::InternalClients;

use super::peers::Peer;
use super::{Context, Worker, WorkerError, blocking};
use crate::engine::{Engine, StoredHint, now_ms};

/// What one delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: u64,
}

/// Hints per delivery round.
const DELIVERY_BATCH: usize = 256;
/// Rounds per delivery, so one delivery is bounded even if hints keep arriving.
const MAX_ROUNDS: usize = 10_000;
/// How often the view is checked for nodes that came back.
const VIEW_CHECK: Duration = Duration::from_millis(250);

/// How often expired hints are dropped: a quarter of the retention, between 1 s and 60 s.
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Delivers hints to their owners (see the module docs).
#[derive(Debug)]
pub struct HintDelivery {
    context: Context,
    /// Nodes the view showed down at the last check.
    down: BTreeSet<NodeId>,
    since_sweep: Duration,
}

impl HintDelivery {
    pub fn new(context: Context) -> Self {
        Self { context, down: BTreeSet::new(), since_sweep: Duration::ZERO }
    }

    /// The owners to deliver to now: every owner with hints once per interval, otherwise the nodes
    /// that came back since the last check.
    async fn targets(&mut self, now_down: BTreeSet<NodeId>) -> Result<Vec<NodeId>, WorkerError> {
        let returned: Vec<NodeId> = self.down.difference(&now_down).copied().collect();
        self.down = now_down;
        self.since_sweep += VIEW_CHECK;
        if self.since_sweep < self.context.settings.hint_delivery_interval {
            return Ok(returned);
        }
        self.since_sweep = Duration::ZERO;
        let targets = self.context.blocking(|e| e.hint_targets()).await?;
        Ok(targets.into_iter().map(NodeId).collect())
    }
}

impl Worker for HintDelivery {
    const NAME: &'static str = "hint_delivery";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        let view = self.context.view.load();
        let now_down = view.nodes.iter().filter(|(_, node)| node.down).map(|(id, _)| *id).collect();
        for target in self.targets(now_down).await? {
            let Some(entry) = view.nodes.get(&target).filter(|n| !n.down && !n.address.is_empty()) else {
                continue;
            };
            match deliver(&self.context.engine, &self.context.clients, target, &entry.address).await {
                Ok(DeliveryReport { delivered: 0 }) => {}
                Ok(DeliveryReport { delivered }) => {
                    tracing::info!(target = target.0, delivered, "hints delivered")
                }
                Err(error) => {
                    tracing::debug!(target = target.0, %error, "hint delivery failed; retried next round")
                }
            }
        }
        Ok(VIEW_CHECK)
    }

    fn retry_after(&self) -> Duration {
        VIEW_CHECK
    }
}

/// Drops hints past their retention (see the module docs).
#[derive(Debug)]
pub struct HintExpiry {
    context: Context,
}

impl HintExpiry {
    pub fn new(context: Context) -> Self {
        Self { context }
    }
}

impl Worker for HintExpiry {
    const NAME: &'static str = "hint_expiry";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        let retention = self.context.settings.hint_retention;
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let expired = self.context.blocking(move |engine| engine.expire_hints(cutoff)).await?;
        if expired > 0 {
            metrics::counter!("pairdb_storage_hints_expired_total").increment(expired);
            tracing::warn!(
                expired,
                "dropped hints older than the retention; anti-entropy repairs their keys"
            );
        }
        Ok(sweep_interval(retention))
    }

    fn retry_after(&self) -> Duration {
        sweep_interval(self.context.settings.hint_retention)
    }
}

/// Delivers every hint held for `target_node` to `address`.
pub async fn deliver(
    engine: &Arc<Engine>,
    clients: &InternalClients,
    target: NodeId,
    address: &str,
) -> Result<DeliveryReport, WorkerError> {
    let mut peer = Peer::dedicated(clients, target, address, engine.partitions())?;
    let target_node = target;
    let mut delivered = 0;
    for _ in 0..MAX_ROUNDS {
        let hints = blocking(engine, move |e| e.list_hints(target_node, None, DELIVERY_BATCH)).await?;
        if hints.is_empty() {
            break;
        }
        let mut by_partition: BTreeMap<PartitionId, Vec<StoredHint>> = BTreeMap::new();
        for hint in hints {
            by_partition.entry(hint.key.partition).or_default().push(hint);
        }
        let mut progressed = false;
        for (partition, hints) in by_partition {
            let records = hints.iter().map(|h| (h.key.clone(), encode_version_set(&h.set))).collect();
            peer.merge_batch(partition, records).await?;
            let deleted = blocking(engine, move |e| {
                let mut deleted = 0u64;
                for hint in &hints {
                    if e.delete_hint_if_unchanged(target_node, &hint.key, &hint.set)? {
                        deleted += 1;
                    }
                }
                Ok(deleted)
            })
            .await?;
            delivered += deleted;
            progressed |= deleted > 0;
        }
        if !progressed {
            break;
        }
    }
    metrics::counter!("pairdb_storage_hints_delivered_total").increment(delivered);
    Ok(DeliveryReport { delivered })
}
