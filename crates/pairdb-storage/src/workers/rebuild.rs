//! Rebuild (`StartRebuild`, `pairdb node rebuild`): one pass over every partition this node
//! replicates, exchanging with *every* other replica (not only those after it), right away and paced
//! only by the node's rate limits — how a node whose data directory was lost is refilled without
//! waiting for the anti-entropy period. Runs even when periodic anti-entropy is off; one at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::anti_entropy::{Exchanger, Pacing, PeerSet};
use super::peers::Peers;
use super::{Context, Worker, WorkerError};
use crate::engine::now_ms;

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

/// Runs the rebuilds [`Rebuild::start`] asks for.
#[derive(Debug)]
pub struct RebuildWorker {
    exchanger: Exchanger,
    rebuild: Arc<Rebuild>,
}

impl RebuildWorker {
    pub fn new(context: Context, peers: Arc<Peers>, pacing: Arc<Pacing>, rebuild: Arc<Rebuild>) -> Self {
        Self { exchanger: Exchanger::new(context, peers, pacing), rebuild }
    }
}

impl Worker for RebuildWorker {
    const NAME: &'static str = "rebuild";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        self.rebuild.wake.notified().await;
        // A node that just started may not have its first topology yet.
        let partitions = loop {
            let view = self.exchanger.context.view.load();
            if view.current.is_some() {
                break self.exchanger.replicated_partitions(&view);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        self.rebuild.update(|p| p.partitions_total = partitions.len() as u64);
        tracing::info!(partitions = partitions.len(), "rebuild started");
        let started = Instant::now();
        for partition in partitions {
            let view = self.exchanger.context.view.load();
            let (exchange, failed) = self.exchanger.exchange_partition(partition, &view, PeerSet::All).await;
            metrics::counter!("pairdb_storage_rebuild_keys_repaired_total").increment(exchange.repaired);
            self.rebuild.update(|p| {
                p.partitions_done += 1;
                p.keys_compared += exchange.compared;
                p.keys_repaired += exchange.repaired;
                p.bytes += exchange.bytes;
                p.failed_exchanges += failed;
            });
        }
        self.rebuild.update(|p| {
            p.state = RebuildState::Done;
            p.finished_at_ms = now_ms();
        });
        let done = self.rebuild.progress();
        tracing::info!(
            keys_repaired = done.keys_repaired,
            failed_exchanges = done.failed_exchanges,
            seconds = started.elapsed().as_secs_f64(),
            "rebuild done"
        );
        Ok(Duration::ZERO)
    }
}
