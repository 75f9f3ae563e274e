//! Hinted handoff delivery, by the node that holds the hints (it follows the topology, so it knows
//! when an owner is back and where it listens): every `interval`, and at once when the view shows a
//! node that was down come back, the hints held for each live node are pushed to it through
//! `MergeBatch` (which merges with DVVS on the owner, so a hint never overwrites a newer version
//! there) and each delivered hint is deleted unless it grew meanwhile (it then goes next round).
//!
//! A hint is only ever sent to the address the topology lists for its owner. Batches are bounded and
//! go one partition at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use pairdb_core::encoding::encode_version_set;
use pairdb_core::ring::NodeId;
use pairdb_proto::storage::v1 as pb;
use pairdb_service::clients::{ChannelSettings, InternalClients};
use pairdb_service::cluster_view::SharedView;
use tokio::sync::watch;

use crate::engine::{Engine, EngineError, StoredHint};

/// Hints per delivery round.
const DELIVERY_BATCH: usize = 256;
/// Rounds per delivery, so one delivery is bounded even if hints keep arriving.
const MAX_ROUNDS: usize = 10_000;
/// How often the view is checked for nodes that came back.
const VIEW_CHECK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum HintError {
    #[error("cannot reach node {node} at {address}: {message}")]
    Unreachable { node: u32, address: String, message: String },
    #[error("node {node} refused hints: {status}")]
    Rejected { node: u32, status: tonic::Status },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("hint task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: u64,
}

async fn blocking<T: Send + 'static>(
    engine: &Arc<Engine>,
    op: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, HintError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || op(&engine))
        .await
        .map_err(|e| HintError::Task(e.to_string()))?
        .map_err(HintError::from)
}

/// Delivers hints until `shutdown` fires (see the module docs).
pub async fn run(
    engine: Arc<Engine>,
    view: SharedView,
    clients: InternalClients,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut down: BTreeSet<NodeId> = BTreeSet::new();
    let mut since_sweep = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(VIEW_CHECK) => {}
            _ = shutdown.changed() => return,
        }
        since_sweep += VIEW_CHECK;
        let current = view.load();
        let now_down: BTreeSet<NodeId> =
            current.nodes.iter().filter(|(_, node)| node.down).map(|(id, _)| *id).collect();
        let returned: Vec<NodeId> = down.difference(&now_down).copied().collect();
        down = now_down;
        let targets = if since_sweep >= interval {
            since_sweep = Duration::ZERO;
            match blocking(&engine, |e| e.hint_targets()).await {
                Ok(targets) => targets.into_iter().map(NodeId).collect(),
                Err(error) => {
                    tracing::warn!(%error, "cannot list hint targets");
                    continue;
                }
            }
        } else {
            returned
        };
        for target in targets {
            let Some(entry) = current.nodes.get(&target).filter(|n| !n.down && !n.address.is_empty()) else {
                continue;
            };
            match deliver(&engine, target.0, &entry.address, &clients).await {
                Ok(report) if report.delivered > 0 => {
                    tracing::info!(target = target.0, delivered = report.delivered, "hints delivered")
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(target = target.0, %error, "hint delivery failed; retried next round")
                }
            }
        }
    }
}

/// Delivers every hint held for `target_node` to `address`.
pub async fn deliver(
    engine: &Arc<Engine>,
    target_node: u32,
    address: &str,
    clients: &InternalClients,
) -> Result<DeliveryReport, HintError> {
    let unreachable =
        |message: String| HintError::Unreachable { node: target_node, address: address.to_owned(), message };
    let settings = ChannelSettings {
        request_timeout: Some(Duration::from_secs(30)),
        keepalive: None,
        ..ChannelSettings::default()
    };
    let mut client = clients.storage(address, settings).map_err(|e| unreachable(e.to_string()))?;
    let mut report = DeliveryReport::default();
    for _ in 0..MAX_ROUNDS {
        let hints = blocking(engine, move |e| e.list_hints(target_node, None, DELIVERY_BATCH)).await?;
        if hints.is_empty() {
            break;
        }
        let mut by_partition: BTreeMap<u32, Vec<StoredHint>> = BTreeMap::new();
        for hint in hints {
            by_partition.entry(hint.key.partition.0).or_default().push(hint);
        }
        let mut progressed = false;
        for (partition, hints) in by_partition {
            let records = hints
                .iter()
                .map(|h| pb::Record {
                    tenant_id: h.key.tenant.clone(),
                    key: h.key.key.clone(),
                    version_set: encode_version_set(&h.set),
                })
                .collect();
            client
                .merge_batch(pb::MergeBatchRequest { partition, records })
                .await
                .map_err(|status| HintError::Rejected { node: target_node, status })?;
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
            report.delivered += deleted;
            progressed |= deleted > 0;
        }
        if !progressed {
            break;
        }
    }
    metrics::counter!("pairdb_storage_hints_delivered_total").increment(report.delivered);
    Ok(report)
}
