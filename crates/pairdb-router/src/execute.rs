//! Drives the core's coordination state machines ([`WriteCoordinator`], [`ReadCoordinator`]) over real
//! storage RPCs: each request's run is the machine's [`WriteTransport`] / [`ReadTransport`] (the
//! seeded simulation is the other transport of the same `drive` loop). Each request runs in its own
//! task: the client gets its answer through a oneshot as soon as the machine replies, while the task
//! finishes the remaining replication or read repair in the background, bounded by the request's
//! deadline. The calls themselves, and everything of the storage protocol, live in [`crate::storage`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pairdb_core::coordination::{
    FailureCause, ReadAnswer, ReadCoordinator, ReadInput, ReadPlan, ReadReply, ReadTransport, Refusal,
    ReplicaFailure, WriteCoordinator, WriteInput, WritePlan, WriteReply, WriteTransport,
};
use pairdb_core::dvv::VersionSet;
use pairdb_core::encoding::encode_version_set;
use pairdb_core::gc::TombstonePlacement;
use pairdb_core::ring::NodeId;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::storage::{CallBudget, CallError, CoordinateCall, StorageCalls, StorageKey, StoredSet};

/// Milliseconds on the router's monotonic clock (the core's `now_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub(crate) fn instant(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.origin + Duration::from_millis(ms))
    }

    /// Time left until `ms` (zero once it has passed).
    pub(crate) fn until(&self, ms: u64) -> Duration {
        Duration::from_millis(ms.saturating_sub(self.now_ms()))
    }
}

/// A write: what the coordinator replica is asked to apply, and what follows the acknowledgement.
#[derive(Debug, Clone)]
pub struct WriteTask {
    pub call: CoordinateCall,
    /// For a delete placed with no migration or N change under way: where it was placed, reported
    /// to the owners with `ConfirmTombstone` if every one of them acknowledges the tombstone itself
    /// (they may then purge it after the grace period without waiting for anti-entropy).
    pub confirm_tombstone: Option<TombstonePlacement>,
}

#[derive(Debug)]
pub enum WriteResult {
    Acked {
        set: VersionSet,
        acks: usize,
        hinted_acks: usize,
        required: usize,
    },
    QuorumNotReached {
        acks: usize,
        hinted_acks: usize,
        required: usize,
        failures: Vec<ReplicaFailure>,
    },
    /// The coordinator refused the write for a reason retrying elsewhere would not fix.
    Rejected(Refusal),
}

#[derive(Debug)]
pub enum ReadResult {
    Answered {
        merged: Option<VersionSet>,
        replicas: Vec<(NodeId, &'static str)>,
    },
    QuorumNotReached {
        answered: usize,
        required: usize,
        failures: Vec<ReplicaFailure>,
    },
    /// Too few replicas answered because some refused the request for a reason every replica would
    /// give (e.g. the tenant is being deleted): that refusal is the answer, not a quorum failure.
    Rejected(Refusal),
}

/// The coordinator's set, shared by every replicate call of the write.
type Coordinated = Arc<StoredSet>;

type WriteCallFuture = std::pin::Pin<Box<dyn Future<Output = WriteCall> + Send>>;

enum WriteCall {
    Coordinated(NodeId, Result<StoredSet, CallError>),
    Replicated(NodeId, bool, Result<(), CallError>),
}

/// Runs a write; resolves when the client can be answered (replication may go on afterwards).
pub async fn write(calls: StorageCalls, clock: Clock, plan: WritePlan, task: WriteTask) -> WriteResult {
    let (reply_tx, reply_rx) = oneshot::channel();
    tokio::spawn(run_write(calls, clock, plan, task, reply_tx).instrument(tracing::Span::current()));
    reply_rx.await.unwrap_or_else(|_| {
        let message = "write task ended without a reply".to_owned();
        WriteResult::Rejected(Refusal {
            reason: pairdb_core::reason::Reason::Internal,
            message,
            current: None,
        })
    })
}

/// One write in flight: the machine's transport. Effects become storage calls; their answers
/// become the machine's inputs.
struct WriteRun {
    calls: StorageCalls,
    clock: Clock,
    task: WriteTask,
    deadline_ms: u64,
    reply_tx: Option<oneshot::Sender<WriteResult>>,
    in_flight: FuturesUnordered<WriteCallFuture>,
}

async fn run_write(
    calls: StorageCalls,
    clock: Clock,
    plan: WritePlan,
    task: WriteTask,
    reply_tx: oneshot::Sender<WriteResult>,
) {
    let deadline_ms = plan.deadline_ms;
    let mut machine = WriteCoordinator::new(plan);
    let mut run = WriteRun {
        calls,
        clock,
        task,
        deadline_ms,
        reply_tx: Some(reply_tx),
        in_flight: FuturesUnordered::new(),
    };
    machine.drive_start(clock.now_ms(), &mut run);
    while !machine.is_finished() {
        let wake_ms = machine.next_timeout_ms().unwrap_or_else(|| clock.now_ms());
        let input = tokio::select! {
            Some(outcome) = run.in_flight.next(), if !run.in_flight.is_empty() => run.input_of(outcome),
            () = tokio::time::sleep_until(clock.instant(wake_ms)) => WriteInput::Tick,
        };
        machine.drive(input, clock.now_ms(), &mut run);
    }
    run.confirm_if_every_owner_acked(&machine).await;
}

impl WriteTransport for WriteRun {
    type Set = Coordinated;

    /// A coordinate call that may have been applied is never retried elsewhere, so giving up on it
    /// early gains nothing: it waits until the request's deadline (the node is suspect after the
    /// storage timeout, so new writes avoid it), and the node stops applying it when the router
    /// stops waiting.
    fn coordinate(&mut self, node: NodeId) {
        let (calls, call) = (self.calls.clone(), self.task.call.clone());
        let budget = CallBudget {
            wait: self.clock.until(self.deadline_ms),
            suspect_after: calls.pool.storage_timeout(),
        };
        self.in_flight.push(Box::pin(async move {
            WriteCall::Coordinated(node, calls.coordinate(node, call, budget).await)
        }));
    }

    fn replicate(&mut self, node: NodeId, hint_for: Option<NodeId>, set: Coordinated) {
        let (calls, key) = (self.calls.clone(), self.task.call.key.clone());
        self.in_flight.push(Box::pin(async move {
            let response = calls.replicate(node, key, set.encoded.clone(), hint_for).await;
            WriteCall::Replicated(node, hint_for.is_some(), response)
        }));
    }

    /// Stores the set on `node` as a hint for `hint_for`, in the background: the reply does not
    /// wait for it and a lost hint is left to anti-entropy.
    fn store_hint(&mut self, node: NodeId, hint_for: NodeId, set: Coordinated) {
        let (calls, key) = (self.calls.clone(), self.task.call.key.clone());
        let store = async move {
            match calls.replicate(node, key, set.encoded.clone(), Some(hint_for)).await {
                Ok(()) => metrics::counter!("pairdb_router_hints_written_total").increment(1),
                Err(_) => tracing::debug!(node_id = node.0, "could not store a hint on the coordinator"),
            }
        };
        tokio::spawn(store.instrument(tracing::Span::current()));
    }

    fn reply(&mut self, reply: WriteReply<Coordinated>) {
        let result = match reply {
            WriteReply::Acked { set, acks, hinted_acks, required } => {
                WriteResult::Acked { set: set.set.clone(), acks, hinted_acks, required }
            }
            WriteReply::QuorumNotReached { acks, hinted_acks, required, failures } => {
                metrics::counter!("pairdb_router_quorum_failures_total", "op" => "write").increment(1);
                WriteResult::QuorumNotReached { acks, hinted_acks, required, failures }
            }
            WriteReply::Rejected(refusal) => WriteResult::Rejected(refusal),
        };
        if let Some(tx) = self.reply_tx.take() {
            let _ = tx.send(result);
        }
    }
}

impl WriteRun {
    /// The machine's input for a finished call.
    fn input_of(&self, outcome: WriteCall) -> WriteInput<Coordinated> {
        match outcome {
            WriteCall::Coordinated(node, Ok(set)) => WriteInput::Coordinated { node, set: Arc::new(set) },
            WriteCall::Coordinated(node, Err(CallError::Failed(cause))) => {
                WriteInput::CoordinateFailed { node, cause }
            }
            WriteCall::Coordinated(node, Err(CallError::Refused(refusal))) => {
                WriteInput::Rejected { node, refusal }
            }
            WriteCall::Replicated(node, hinted, Ok(())) => {
                if hinted {
                    metrics::counter!("pairdb_router_hints_written_total").increment(1);
                }
                WriteInput::Replicated { node }
            }
            WriteCall::Replicated(node, _, Err(CallError::Failed(cause))) => {
                WriteInput::ReplicateFailed { node, cause }
            }
            WriteCall::Replicated(node, _, Err(CallError::Refused(refusal))) => {
                tracing::warn!(node_id = node.0, reason = %refusal.reason, message = %refusal.message,
                    "replica refused a replicated set");
                WriteInput::ReplicateFailed { node, cause: FailureCause::Error }
            }
        }
    }

    /// After a delete every owner acknowledged itself: tells the owners (see [`confirm_tombstone`]).
    async fn confirm_if_every_owner_acked(self, machine: &WriteCoordinator<Coordinated>) {
        if let Some(placement) = self.task.confirm_tombstone
            && machine.every_owner_acked()
            && let Some(stored) = machine.coordinated_set()
            && stored.set.is_deleted()
        {
            confirm_tombstone(&self.calls, machine.owners(), &self.task.call.key, &stored.encoded, placement)
                .await;
        }
    }
}

/// Tries per owner for a tombstone confirmation (a lost one only leaves the purge to anti-entropy).
const CONFIRM_ATTEMPTS: u32 = 3;

/// Tells every owner that all of them hold the tombstone-only set `encoded` (after the client was
/// answered; best effort: an owner that does not hear it keeps the tombstone for anti-entropy).
async fn confirm_tombstone(
    calls: &StorageCalls,
    owners: &[NodeId],
    key: &StorageKey,
    encoded: &[u8],
    placement: TombstonePlacement,
) {
    let confirmations = owners.iter().map(|&node| async move {
        for attempt in 1..=CONFIRM_ATTEMPTS {
            match calls.confirm_tombstone(node, key, encoded, placement).await {
                Ok(true) => metrics::counter!("pairdb_router_tombstones_confirmed_total").increment(1),
                Ok(false) => {
                    tracing::debug!(node_id = node.0, "owner did not record the tombstone confirmation")
                }
                Err(CallError::Failed(_)) if attempt < CONFIRM_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    continue;
                }
                Err(_) => tracing::debug!(node_id = node.0, "tombstone confirmation failed"),
            }
            break;
        }
    });
    futures::future::join_all(confirmations).await;
}

/// Runs a read; resolves when R replicas answered (read repair may go on afterwards).
pub async fn read(calls: StorageCalls, clock: Clock, plan: ReadPlan, key: StorageKey) -> ReadResult {
    let (reply_tx, reply_rx) = oneshot::channel();
    tokio::spawn(run_read(calls, clock, plan, key, reply_tx).instrument(tracing::Span::current()));
    reply_rx.await.unwrap_or(ReadResult::QuorumNotReached { answered: 0, required: 0, failures: vec![] })
}

type ReadCallFuture =
    std::pin::Pin<Box<dyn Future<Output = (NodeId, Result<Option<VersionSet>, CallError>)> + Send>>;

/// One read in flight: the machine's transport. Fetches go out as it asks, answers come back as
/// its inputs.
struct ReadRun {
    calls: StorageCalls,
    key: StorageKey,
    reply_tx: Option<oneshot::Sender<ReadResult>>,
    /// What each replica answered, for the request's span and metrics.
    outcomes: BTreeMap<NodeId, &'static str>,
    in_flight: FuturesUnordered<ReadCallFuture>,
}

async fn run_read(
    calls: StorageCalls,
    clock: Clock,
    plan: ReadPlan,
    key: StorageKey,
    reply_tx: oneshot::Sender<ReadResult>,
) {
    let mut machine = ReadCoordinator::new(plan);
    let mut run = ReadRun {
        calls,
        key,
        reply_tx: Some(reply_tx),
        outcomes: BTreeMap::new(),
        in_flight: FuturesUnordered::new(),
    };
    machine.drive_start(clock.now_ms(), &mut run);
    while !machine.is_finished() {
        let wake_ms = machine.next_timeout_ms().unwrap_or_else(|| clock.now_ms());
        let input = tokio::select! {
            Some((node, response)) = run.in_flight.next(), if !run.in_flight.is_empty() => {
                ReadInput::Answer { node, answer: run.answer(node, response) }
            }
            () = tokio::time::sleep_until(clock.instant(wake_ms)) => ReadInput::Tick,
        };
        machine.drive(input, clock.now_ms(), &mut run);
    }
}

impl ReadTransport for ReadRun {
    fn fetch(&mut self, node: NodeId) {
        let (calls, key) = (self.calls.clone(), self.key.clone());
        self.in_flight.push(Box::pin(async move { (node, calls.get(node, key).await) }));
    }

    /// Sends the merged set to a replica that answered with less, in the background (a failed
    /// repair is left to anti-entropy).
    fn repair(&mut self, node: NodeId, set: VersionSet) {
        let (calls, key) = (self.calls.clone(), self.key.clone());
        metrics::counter!("pairdb_router_read_repairs_total").increment(1);
        let repair = async move {
            if calls.replicate(node, key, encode_version_set(&set), None).await.is_err() {
                tracing::debug!(node_id = node.0, "read repair failed; anti-entropy will catch up");
            }
        };
        tokio::spawn(repair.instrument(tracing::Span::current()));
    }

    fn reply(&mut self, reply: ReadReply) {
        let result = match reply {
            ReadReply::Answered { merged, .. } => ReadResult::Answered {
                merged,
                replicas: self.outcomes.iter().map(|(n, o)| (*n, *o)).collect(),
            },
            ReadReply::QuorumNotReached { answered, required, failures } => {
                metrics::counter!("pairdb_router_quorum_failures_total", "op" => "read").increment(1);
                ReadResult::QuorumNotReached { answered, required, failures }
            }
            ReadReply::Rejected(refusal) => ReadResult::Rejected(refusal),
        };
        if let Some(tx) = self.reply_tx.take() {
            let _ = tx.send(result);
        }
    }
}

impl ReadRun {
    /// The machine's input for a replica's answer, noting the outcome.
    fn answer(&mut self, node: NodeId, response: Result<Option<VersionSet>, CallError>) -> ReadAnswer {
        let (outcome, answer) = match response {
            Ok(Some(set)) => ("found", ReadAnswer::Found(set)),
            Ok(None) => ("not_found", ReadAnswer::NotFound),
            Err(CallError::Failed(cause)) => (cause.as_str(), ReadAnswer::Failed(cause)),
            Err(CallError::Refused(refusal)) => ("rejected", ReadAnswer::Refused(refusal)),
        };
        self.outcomes.insert(node, outcome);
        answer
    }
}
