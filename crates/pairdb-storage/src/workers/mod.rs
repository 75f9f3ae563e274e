//! The storage node's background jobs, one [`Worker`] each, all driven by one runner ([`run`]) that
//! owns shutdown, pacing between steps, error counting and the per-worker metrics:
//!
//! - [`anti_entropy::AntiEntropy`]: Merkle exchanges with replica peers, and the anti-entropy path
//!   of tombstone GC ([`tombstone_gc::collect_agreed`]) on partitions this node leads;
//! - [`rebuild::RebuildWorker`]: a rebuild asked for by an operator (every peer, right away);
//! - [`tombstone_gc::ConfirmedGc`]: the full-ack path of tombstone GC;
//! - [`unowned::UnownedCleanup`]: deleting data this node no longer owns;
//! - [`hints::HintDelivery`] and [`hints::HintExpiry`]: handing hints to their owners, dropping
//!   those past retention;
//! - [`tenant_purge::TenantPurgeWorker`]: purging deleted tenants' data;
//! - [`transfer::TransferWorker`] (a pool): migration transfers meta's mover asks for.
//!
//! Every decision that deletes data is a pure function in `pairdb_core::gc`; the workers gather its
//! inputs (the view, records read under their stripe lock, peers' answers, a clock) and carry out
//! the verdict. Every engine call runs on the blocking pool ([`blocking`]); every RPC is bounded and
//! goes through the `peers` module, where wire messages stop (workers see only the node's own
//! types). Failures are counted (`pairdb_storage_worker_errors_total{worker}`), logged, and retried
//! after the worker's retry delay.

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_service::clients::InternalClients;
use pairdb_service::cluster_view::SharedView;
use pairdb_service::shutdown::Shutdown;

use crate::engine::{Engine, EngineError};

pub mod anti_entropy;
pub mod hints;
mod peers;
pub mod rebuild;
mod tenant_purge;
pub mod tombstone_gc;
pub mod transfer;
mod unowned;

pub use peers::PeerFailure;
pub use rebuild::{Rebuild, RebuildProgress, RebuildState};
pub use transfer::Transfers;

/// Settings of the background jobs (from the configuration).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Zero disables anti-entropy.
    pub anti_entropy_period: Duration,
    pub keys_per_sec: u64,
    pub bytes_per_sec: u64,
    pub unowned_grace: Duration,
    pub tombstone_grace: Duration,
    pub hint_retention: Duration,
    pub hint_delivery_interval: Duration,
}

impl WorkerSettings {
    /// How old a tombstone must be to be purged: the configured grace plus the hint sweep interval,
    /// the slack of hint expiry (a hint can outlive its retention by it).
    pub fn gc_grace(&self) -> Duration {
        self.tombstone_grace + hints::sweep_interval(self.hint_retention)
    }
}

/// Why a worker's step failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("peer {node}: {failure}")]
    Peer { node: NodeId, failure: PeerFailure },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("engine task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Its caller got the details.
    #[error("transfer of partition {partition} failed")]
    Transfer { partition: pairdb_core::token::PartitionId },
}

/// One background job: a step of work at a time, each saying when the next should start.
pub trait Worker: Send + 'static {
    /// Names the worker in logs and metrics.
    const NAME: &'static str;

    /// Does one unit of work; returns how long to wait before the next step. May wait itself (for
    /// an operator's request): the runner cancels it at shutdown.
    fn step(&mut self) -> impl Future<Output = Result<Duration, WorkerError>> + Send;

    /// How long to wait after a failed step.
    fn retry_after(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// Runs `worker` until `shutdown` is set (see the module docs).
pub async fn run<W: Worker>(mut worker: W, mut shutdown: Shutdown) {
    loop {
        let step = tokio::select! {
            result = worker.step() => result,
            _ = shutdown.wait() => return,
        };
        metrics::counter!("pairdb_storage_worker_steps_total", "worker" => W::NAME).increment(1);
        let wait = match step {
            Ok(wait) => wait,
            Err(error) => {
                metrics::counter!("pairdb_storage_worker_errors_total", "worker" => W::NAME).increment(1);
                tracing::warn!(worker = W::NAME, %error, "background step failed; retrying");
                worker.retry_after()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// What every worker works from.
#[derive(Debug, Clone)]
pub struct Context {
    pub engine: Arc<Engine>,
    pub view: SharedView,
    pub clients: InternalClients,
    pub settings: Arc<WorkerSettings>,
    /// Where [`UnownedCleanup`] records its complete passes for the heartbeat to report.
    pub cleanup: Arc<crate::membership::UnownedCleanupRevision>,
}

impl Context {
    pub fn me(&self) -> NodeId {
        self.engine.identity().node_id
    }

    /// Runs `op` on the blocking pool (the engine reads and writes disk).
    pub async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, WorkerError> {
        blocking(&self.engine, op).await
    }
}

/// Runs `op` over `engine` on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    engine: &Arc<Engine>,
    op: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, WorkerError> {
    let engine = engine.clone();
    Ok(pairdb_service::task::spawn_blocking(move || op(&engine)).await??)
}

/// Starts every worker; each stops when `shutdown` is set.
pub fn spawn_all(
    context: &Context,
    rebuild: Arc<Rebuild>,
    transfers: &Transfers,
    shutdown: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let peers = Arc::new(peers::Peers::new(context.clients.clone(), context.engine.partitions()));
    let pacing = Arc::new(anti_entropy::Pacing::new(&context.settings));
    let mut tasks = vec![
        pairdb_service::task::spawn(run(
            rebuild::RebuildWorker::new(context.clone(), peers.clone(), pacing.clone(), rebuild),
            shutdown.clone(),
        )),
        pairdb_service::task::spawn(run(tombstone_gc::ConfirmedGc::new(context.clone()), shutdown.clone())),
        pairdb_service::task::spawn(run(unowned::UnownedCleanup::new(context.clone()), shutdown.clone())),
        pairdb_service::task::spawn(run(hints::HintDelivery::new(context.clone()), shutdown.clone())),
        pairdb_service::task::spawn(run(hints::HintExpiry::new(context.clone()), shutdown.clone())),
        pairdb_service::task::spawn(run(
            tenant_purge::TenantPurgeWorker::new(context.clone()),
            shutdown.clone(),
        )),
    ];
    for worker in transfer::TransferWorker::pool(context, transfers) {
        tasks.push(pairdb_service::task::spawn(run(worker, shutdown.clone())));
    }
    if context.settings.anti_entropy_period.is_zero() {
        tracing::info!("anti-entropy is off");
    } else {
        tasks.push(pairdb_service::task::spawn(run(
            anti_entropy::AntiEntropy::new(context.clone(), peers, pacing),
            shutdown.clone(),
        )));
    }
    tasks
}
