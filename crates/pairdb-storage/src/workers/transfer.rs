//! Migration transfers (`SyncPartition`, sent by meta's mover) as workers: the RPC queues a
//! [`TransferJob`] on [`Transfers`] and waits for its report, and a small pool of
//! [`TransferWorker`]s pulls the data ([`crate::transfer::pull_partition`]). So transfers get the
//! runner's shutdown, step and error metrics like every other background job, and however many
//! partitions meta moves at once, this node pulls at most [`TRANSFER_WORKERS`] at a time; the rest
//! wait in a bounded queue (within their RPC's deadline).
//!
//! Invariant: a job's caller always gets an answer: its report, the pull's error, or (the worker
//! stopped with the node) `TransferError::Task`, which meta retries like any failed transfer.

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::token::PartitionId;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Context, Worker, WorkerError};
use crate::transfer::{self, Source, TransferError, TransferReport};

/// Transfers this node runs at once.
pub const TRANSFER_WORKERS: usize = 4;
/// Transfers that may wait for a worker.
const QUEUED_TRANSFERS: usize = 64;

/// One partition's transfer, as `SyncPartition` asked for it.
#[derive(Debug)]
pub struct TransferJob {
    partition: PartitionId,
    tenants: Vec<String>,
    sources: Vec<Source>,
    batch_size: usize,
    reply: oneshot::Sender<Result<TransferReport, TransferError>>,
}

/// The queue the `SyncPartition` RPC hands transfers to.
#[derive(Debug)]
pub struct Transfers {
    jobs: mpsc::Sender<TransferJob>,
    queued: std::sync::Mutex<Option<mpsc::Receiver<TransferJob>>>,
}

impl Default for Transfers {
    fn default() -> Self {
        let (jobs, queued) = mpsc::channel(QUEUED_TRANSFERS);
        Self { jobs, queued: std::sync::Mutex::new(Some(queued)) }
    }
}

impl Transfers {
    /// Queues the transfer and waits for its report.
    pub async fn run(
        &self,
        partition: PartitionId,
        tenants: Vec<String>,
        sources: Vec<Source>,
        batch_size: usize,
    ) -> Result<TransferReport, TransferError> {
        let (reply, report) = oneshot::channel();
        let job = TransferJob { partition, tenants, sources, batch_size, reply };
        let stopped = || TransferError::Task("the node's transfer workers stopped".to_owned());
        self.jobs.send(job).await.map_err(|_| stopped())?;
        report.await.map_err(|_| stopped())?
    }

    /// The queue's receiving end, shared by the workers (taken once, by [`super::spawn_all`]).
    fn take_queue(&self) -> Option<mpsc::Receiver<TransferJob>> {
        self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// Runs queued transfers, one at a time per worker.
#[derive(Debug)]
pub struct TransferWorker {
    context: Context,
    queue: Arc<Mutex<mpsc::Receiver<TransferJob>>>,
}

impl TransferWorker {
    /// The pool of [`TRANSFER_WORKERS`] over `transfers`' queue (empty if it was taken before).
    pub fn pool(context: &Context, transfers: &Transfers) -> Vec<Self> {
        let Some(queue) = transfers.take_queue() else { return Vec::new() };
        let queue = Arc::new(Mutex::new(queue));
        (0..TRANSFER_WORKERS).map(|_| Self { context: context.clone(), queue: queue.clone() }).collect()
    }
}

impl Worker for TransferWorker {
    const NAME: &'static str = "transfer";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        // Holding the lock while waiting hands the next job to one idle worker at a time.
        let job = self.queue.lock().await.recv().await;
        let Some(job) = job else {
            // Every sender is gone: the node is stopping.
            return Ok(Duration::from_secs(3600));
        };
        let TransferJob { partition, tenants, sources, batch_size, reply } = job;
        if reply.is_closed() {
            // The caller gave up while the job waited (meta retries the partition): skip it.
            return Ok(Duration::ZERO);
        }
        let context = &self.context;
        let result = transfer::pull_partition(
            &context.engine,
            partition,
            tenants,
            &sources,
            batch_size,
            &context.clients,
        )
        .await;
        let failed = result.is_err();
        // The caller may have given up (its RPC deadline passed); the data pulled stays merged.
        let _ = reply.send(result);
        if failed {
            return Err(WorkerError::Transfer { partition });
        }
        Ok(Duration::ZERO)
    }

    /// A failed transfer is meta's to retry; the next one may start at once.
    fn retry_after(&self) -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pairdb_core::ring::NodeId;

    fn context(dir: &std::path::Path) -> Context {
        let config = crate::Config::for_node(1, dir.to_path_buf());
        Context {
            engine: crate::open_engine(&config).expect("engine"),
            view: pairdb_service::cluster_view::SharedView::default(),
            clients: pairdb_service::clients::InternalClients::insecure(),
            settings: Arc::new(config.worker_settings()),
            cleanup: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_queued_transfer_is_answered_by_a_worker_and_the_queue_is_taken_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = context(dir.path());
        let transfers = Arc::new(Transfers::default());
        let workers = TransferWorker::pool(&context, &transfers);
        assert_eq!(workers.len(), TRANSFER_WORKERS);
        assert!(TransferWorker::pool(&context, &transfers).is_empty(), "a second pool would share nothing");
        let (stop, shutdown) = pairdb_service::shutdown::channel();
        let tasks: Vec<_> = workers
            .into_iter()
            .map(|w| pairdb_service::task::spawn(super::super::run(w, shutdown.clone())))
            .collect();

        // Nothing listens on port 1: the pull fails, and the caller hears why.
        let source = Source { node_id: NodeId(2), address: "127.0.0.1:1".to_owned() };
        let error = transfers
            .run(PartitionId(0), vec!["t".to_owned()], vec![source], 16)
            .await
            .expect_err("no source can answer");
        assert!(matches!(error, TransferError::NoSource { .. }), "{error}");

        // Once the workers stopped, a queued transfer is answered too (not left hanging).
        stop.trigger();
        for task in tasks {
            task.await.expect("worker task");
        }
        let error = transfers.run(PartitionId(0), vec!["t".to_owned()], Vec::new(), 16);
        let error = tokio::time::timeout(Duration::from_secs(5), error).await;
        assert!(matches!(error, Ok(Err(TransferError::Task(_)))), "{error:?}");
    }
}
