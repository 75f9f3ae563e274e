//! Drives the core's coordination state machines ([`WriteCoordinator`], [`ReadCoordinator`]) over real
//! storage RPCs. Each request runs in its own task: the client gets its answer through a oneshot as
//! soon as the machine says `Reply`, while the task finishes the remaining replication or read repair
//! in the background, bounded by the request's deadline.
//!
//! Every storage call is bounded twice: by the per-node in-flight semaphore and by the storage timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pairdb_core::coordination::{
    FailureCause, ReadAnswer, ReadCoordinator, ReadEffect, ReadPlan, ReadReply, ReplicaFailure,
    WriteCoordinator, WriteEffect, WritePlan, WriteReply,
};
use pairdb_core::dvv::VersionSet;
use pairdb_core::encoding::{decode_version_set, encode_version_set};
use pairdb_core::gc::TombstonePlacement;
use pairdb_core::reason::Reason;
use pairdb_core::ring::NodeId;
use pairdb_proto::storage::v1 as pb;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::pool::{StorageClient, StoragePool};
use crate::view::ClusterView;

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

    fn instant(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.origin + Duration::from_millis(ms))
    }

    /// Time left until `ms` (zero once it has passed).
    fn until(&self, ms: u64) -> Duration {
        Duration::from_millis(ms.saturating_sub(self.now_ms()))
    }
}

/// Wall-clock milliseconds since the Unix epoch: the LWW timestamp of a sibling and the wall-clock
/// form of a coordinate call's deadline; never an input to causality.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the coordinator replica is asked to apply.
#[derive(Debug, Clone)]
pub struct WriteInput {
    pub key: pb::KeyRef,
    /// The write's verified context vector in the internal encoding (empty for a blind write).
    pub context: Vec<u8>,
    /// `None` writes a tombstone.
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: u64,
    pub max_siblings: u32,
    pub supersede_local: bool,
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
    Rejected(tonic::Status),
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
    Rejected(tonic::Status),
}

/// The partition a storage request names (for its span).
fn partition_of(key: &Option<pb::KeyRef>) -> u32 {
    key.as_ref().map_or(0, |key| key.partition)
}

/// Reasons a storage node gives that another replica would give too: the request itself is wrong.
fn is_definitive(status: &tonic::Status) -> bool {
    matches!(
        pairdb_service::errors::known_reason_of(status),
        Some(
            Reason::TooManySiblings
                | Reason::ValueTooLarge
                | Reason::MalformedVersion
                | Reason::InvalidTenantId
                | Reason::InvalidKey
                | Reason::InvalidPartition
                | Reason::PartitionMismatch
                | Reason::TenantNotFound
        )
    )
}

enum CallError {
    Failed(FailureCause),
    Rejected(tonic::Status),
}

/// Reasons a storage node gives only before it applied anything, so another replica may be asked.
/// (WRITE_PATH_POISONED is not one: the failed fsync may have left the write on disk.)
fn refused_before_applying(status: &tonic::Status) -> bool {
    matches!(
        pairdb_service::errors::known_reason_of(status),
        Some(Reason::NotReady | Reason::DiskFull | Reason::CoordinateDeadlinePassed)
    )
}

/// The call failed because no connection could be opened: the request never left the router.
fn never_connected(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// How long a storage call may take.
#[derive(Debug, Clone, Copy)]
struct CallBudget {
    /// How long the router waits for the answer once the request was sent.
    wait: Duration,
    /// When a call still unanswered makes the node suspect (the storage timeout): new requests then
    /// avoid it, while this call may go on waiting up to `wait`.
    suspect_after: Duration,
}

impl CallBudget {
    fn storage_timeout(pool: &StoragePool) -> Self {
        Self { wait: pool.storage_timeout(), suspect_after: pool.storage_timeout() }
    }
}

/// Runs one RPC against `node` with the pool's bounds, updating the failure view. The call gets
/// `budget.suspect_after` for a free in-flight slot (nothing is sent before, so a call refused here
/// is `NotApplied`) and then `budget.wait` for the answer; `rpc` is told that wait when it is sent (a
/// coordinate call passes it on, so the node stops applying when the router stops waiting).
///
/// Each call is a client span (`rpc`, node id, partition, outcome) whose trace context the storage
/// node continues, so a client request is one trace with one child per replica call.
async fn call<T, F, Fut>(
    pool: &StoragePool,
    view: &ClusterView,
    node: NodeId,
    rpc_name: &'static str,
    partition: u32,
    rpc: F,
) -> Result<T, CallError>
where
    F: FnOnce(StorageClient, Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    call_within(pool, view, node, rpc_name, partition, CallBudget::storage_timeout(pool), rpc).await
}

async fn call_within<T, F, Fut>(
    pool: &StoragePool,
    view: &ClusterView,
    node: NodeId,
    rpc_name: &'static str,
    partition: u32,
    budget: CallBudget,
    rpc: F,
) -> Result<T, CallError>
where
    F: FnOnce(StorageClient, Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let span = tracing::info_span!(
        "storage.call",
        otel.name = rpc_name,
        otel.kind = "client",
        node_id = node.0,
        partition,
        outcome = tracing::field::Empty,
    );
    let result = call_inner(pool, view, node, budget, rpc).instrument(span.clone()).await;
    span.record(
        "outcome",
        match &result {
            Ok(_) => "ok",
            Err(CallError::Rejected(_)) => "rejected",
            Err(CallError::Failed(FailureCause::Timeout)) => "timeout",
            Err(CallError::Failed(FailureCause::NotApplied)) => "not_applied",
            Err(CallError::Failed(_)) => "error",
        },
    );
    result
}

async fn call_inner<T, F, Fut>(
    pool: &StoragePool,
    view: &ClusterView,
    node: NodeId,
    budget: CallBudget,
    rpc: F,
) -> Result<T, CallError>
where
    F: FnOnce(StorageClient, Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    // Until the request is handed to the channel nothing has left the router: every failure before
    // that point is `NotApplied`.
    let Some(address) = view.nodes.get(&node).map(|n| n.address.clone()) else {
        return Err(CallError::Failed(FailureCause::NotApplied));
    };
    let Some(client) = pool.client(node, &address) else {
        return Err(CallError::Failed(FailureCause::NotApplied));
    };
    let acquired = match tokio::time::timeout(budget.suspect_after, client.acquire()).await {
        Ok(Some(acquired)) => acquired,
        Ok(None) => return Err(CallError::Failed(FailureCause::NotApplied)),
        Err(_elapsed) => {
            client.record_failure();
            return Err(CallError::Failed(FailureCause::NotApplied));
        }
    };
    let (grpc, _permit) = acquired;
    let call = rpc(grpc, budget.wait);
    tokio::pin!(call);
    let suspect_after = budget.suspect_after.min(budget.wait);
    let outcome = match tokio::time::timeout(suspect_after, &mut call).await {
        Ok(answer) => Ok(answer),
        Err(_slow) => {
            client.record_failure();
            tokio::time::timeout(budget.wait - suspect_after, call).await
        }
    };
    match outcome {
        Ok(Ok(response)) => {
            client.record_success();
            Ok(response.into_inner())
        }
        Ok(Err(status)) if is_definitive(&status) => Err(CallError::Rejected(status)),
        Ok(Err(status)) => {
            client.record_failure();
            let definite = refused_before_applying(&status) || never_connected(&status);
            Err(CallError::Failed(if definite { FailureCause::NotApplied } else { FailureCause::Error }))
        }
        // Already suspect since `suspect_after`.
        Err(_elapsed) => Err(CallError::Failed(FailureCause::Timeout)),
    }
}

type WriteCallFuture = std::pin::Pin<Box<dyn Future<Output = WriteCall> + Send>>;

enum WriteCall {
    Coordinated(NodeId, Result<pb::CoordinateWriteResponse, CallError>),
    Replicated(NodeId, bool, Result<pb::ReplicateResponse, CallError>),
}

/// Runs a write; resolves when the client can be answered (replication may go on afterwards).
pub async fn write(
    pool: Arc<StoragePool>,
    view: Arc<ClusterView>,
    clock: Clock,
    plan: WritePlan,
    input: WriteInput,
) -> WriteResult {
    let (reply_tx, reply_rx) = oneshot::channel();
    tokio::spawn(run_write(pool, view, clock, plan, input, reply_tx).instrument(tracing::Span::current()));
    reply_rx.await.unwrap_or_else(|_| {
        WriteResult::Rejected(tonic::Status::internal("write task ended without a reply"))
    })
}

/// One write in flight: the machine's effects become storage calls, their answers become inputs.
struct WriteRun {
    pool: Arc<StoragePool>,
    view: Arc<ClusterView>,
    clock: Clock,
    input: WriteInput,
    deadline_ms: u64,
    /// The coordinator's set, decoded and as encoded for replication.
    result_set: Option<(VersionSet, Arc<Vec<u8>>)>,
    reply_tx: Option<oneshot::Sender<WriteResult>>,
    calls: FuturesUnordered<WriteCallFuture>,
}

async fn run_write(
    pool: Arc<StoragePool>,
    view: Arc<ClusterView>,
    clock: Clock,
    plan: WritePlan,
    input: WriteInput,
    reply_tx: oneshot::Sender<WriteResult>,
) {
    let deadline_ms = plan.deadline_ms;
    let mut machine = WriteCoordinator::new(plan);
    let mut run = WriteRun {
        pool,
        view,
        clock,
        input,
        deadline_ms,
        result_set: None,
        reply_tx: Some(reply_tx),
        calls: FuturesUnordered::new(),
    };
    let mut effects = machine.start(clock.now_ms());
    loop {
        for effect in effects.drain(..) {
            run.start(effect);
        }
        if machine.is_finished() {
            run.confirm_if_every_owner_acked(&machine).await;
            return;
        }
        let deadline = machine.next_timeout_ms().unwrap_or_else(|| clock.now_ms());
        tokio::select! {
            next = run.calls.next(), if !run.calls.is_empty() => {
                let Some(outcome) = next else { continue };
                match run.on_call(&mut machine, outcome) {
                    Some(next_effects) => effects = next_effects,
                    None => return,
                }
            }
            () = tokio::time::sleep_until(clock.instant(deadline)) => {
                effects = machine.on_tick(clock.now_ms());
            }
        }
    }
}

impl WriteRun {
    fn start(&mut self, effect: WriteEffect) {
        match effect {
            WriteEffect::Coordinate { node } => {
                let call = self.coordinate(node);
                self.calls.push(call);
            }
            WriteEffect::Replicate { node, hint_for } => {
                if let Some(call) = self.replicate(node, hint_for) {
                    self.calls.push(call);
                }
            }
            WriteEffect::StoreHint { node, hint_for } => self.store_hint(node, hint_for),
            WriteEffect::Reply(reply) => self.reply(reply),
        }
    }

    /// The coordinate call to `node`. A coordinate call that may have been applied is never retried
    /// elsewhere, so giving up on it early gains nothing: it waits until the request's deadline (the
    /// node is suspect after the storage timeout, so new writes avoid it), and the node stops applying
    /// it when the router stops waiting.
    fn coordinate(&self, node: NodeId) -> WriteCallFuture {
        let (pool, view, input) = (self.pool.clone(), self.view.clone(), self.input.clone());
        let budget =
            CallBudget { wait: self.clock.until(self.deadline_ms), suspect_after: pool.storage_timeout() };
        Box::pin(async move {
            let mut request = pb::CoordinateWriteRequest {
                key: Some(input.key),
                context: input.context,
                value: input.value,
                timestamp_ms: input.timestamp_ms,
                max_siblings: input.max_siblings,
                supersede_local: input.supersede_local,
                apply_within_ms: 0,
                apply_before_unix_ms: 0,
            };
            let partition = partition_of(&request.key);
            let rpc = |mut c: StorageClient, left: Duration| async move {
                let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
                request.apply_within_ms = u32::try_from(left_ms).unwrap_or(u32::MAX);
                request.apply_before_unix_ms = wall_clock_ms().saturating_add(left_ms);
                c.coordinate_write(request).await
            };
            let response =
                call_within(&pool, &view, node, "storage.coordinate_write", partition, budget, rpc).await;
            WriteCall::Coordinated(node, response)
        })
    }

    /// The replicate call of the coordinator's set to `node` (`None` before the set exists).
    fn replicate(&self, node: NodeId, hint_for: Option<NodeId>) -> Option<WriteCallFuture> {
        let request = self.replicate_request(hint_for)?;
        let (pool, view) = (self.pool.clone(), self.view.clone());
        Some(Box::pin(async move {
            let response = replicate_on(&pool, &view, node, request).await;
            WriteCall::Replicated(node, hint_for.is_some(), response)
        }))
    }

    /// Stores the set on `node` as a hint for `hint_for`, in the background: the reply does not
    /// wait for it and a lost hint is left to anti-entropy.
    fn store_hint(&self, node: NodeId, hint_for: NodeId) {
        let Some(request) = self.replicate_request(Some(hint_for)) else { return };
        let (pool, view) = (self.pool.clone(), self.view.clone());
        let store = async move {
            match replicate_on(&pool, &view, node, request).await {
                Ok(_) => metrics::counter!("pairdb_router_hints_written_total").increment(1),
                Err(_) => tracing::debug!(node_id = node.0, "could not store a hint on the coordinator"),
            }
        };
        tokio::spawn(store.instrument(tracing::Span::current()));
    }

    fn replicate_request(&self, hint_for: Option<NodeId>) -> Option<pb::ReplicateRequest> {
        debug_assert!(self.result_set.is_some(), "replicate and hint effects follow a coordinated set");
        let (_, encoded) = self.result_set.as_ref()?;
        Some(pb::ReplicateRequest {
            key: Some(self.input.key.clone()),
            version_set: encoded.as_ref().clone(),
            hint_for_node_id: hint_for.map_or(0, |n| n.0),
        })
    }

    fn reply(&mut self, reply: WriteReply) {
        debug_assert!(
            !matches!(reply, WriteReply::Acked { .. }) || self.result_set.is_some(),
            "an acknowledged write always has the coordinated set"
        );
        let result = match reply {
            WriteReply::Acked { acks, hinted_acks, required } => match &self.result_set {
                Some((set, _)) => WriteResult::Acked { set: set.clone(), acks, hinted_acks, required },
                None => WriteResult::QuorumNotReached { acks, hinted_acks, required, failures: vec![] },
            },
            WriteReply::QuorumNotReached { acks, hinted_acks, required, failures } => {
                metrics::counter!("pairdb_router_quorum_failures_total", "op" => "write").increment(1);
                WriteResult::QuorumNotReached { acks, hinted_acks, required, failures }
            }
        };
        self.send(result);
    }

    fn send(&mut self, result: WriteResult) {
        if let Some(tx) = self.reply_tx.take() {
            let _ = tx.send(result);
        }
    }

    /// Feeds a finished call to the machine; `None` when the write ends here (the coordinator
    /// refused it definitively and the client has its answer).
    fn on_call(&mut self, machine: &mut WriteCoordinator, outcome: WriteCall) -> Option<Vec<WriteEffect>> {
        let now = self.clock.now_ms();
        let effects = match outcome {
            WriteCall::Coordinated(node, Ok(response)) => match decode_version_set(&response.version_set) {
                Ok(set) => {
                    self.result_set = Some((set, Arc::new(response.version_set)));
                    machine.on_coordinated(node, now)
                }
                Err(error) => {
                    tracing::error!(node_id = node.0, %error, "coordinator returned an undecodable set");
                    machine.on_coordinate_failed(node, FailureCause::Error, now)
                }
            },
            WriteCall::Coordinated(_, Err(CallError::Rejected(status))) => {
                self.send(WriteResult::Rejected(status));
                return None;
            }
            WriteCall::Coordinated(node, Err(CallError::Failed(cause))) => {
                machine.on_coordinate_failed(node, cause, now)
            }
            WriteCall::Replicated(node, hinted, Ok(_)) => {
                if hinted {
                    metrics::counter!("pairdb_router_hints_written_total").increment(1);
                }
                machine.on_replicated(node, now)
            }
            WriteCall::Replicated(node, _, Err(CallError::Failed(cause))) => {
                machine.on_replicate_failed(node, cause, now)
            }
            WriteCall::Replicated(node, _, Err(CallError::Rejected(status))) => {
                tracing::warn!(node_id = node.0, %status, "replica refused a replicated set");
                machine.on_replicate_failed(node, FailureCause::Error, now)
            }
        };
        Some(effects)
    }

    /// After a delete every owner acknowledged itself: tells the owners (see [`confirm_tombstone`]).
    async fn confirm_if_every_owner_acked(self, machine: &WriteCoordinator) {
        if let Some(placement) = self.input.confirm_tombstone
            && machine.every_owner_acked()
            && let Some((set, encoded)) = &self.result_set
            && set.is_deleted()
        {
            confirm_tombstone(&self.pool, &self.view, machine.owners(), &self.input.key, encoded, placement)
                .await;
        }
    }
}

/// Replicates (or, with `hint_for_node_id`, hints) a set on `node`.
async fn replicate_on(
    pool: &StoragePool,
    view: &ClusterView,
    node: NodeId,
    request: pb::ReplicateRequest,
) -> Result<pb::ReplicateResponse, CallError> {
    let partition = partition_of(&request.key);
    call(
        pool,
        view,
        node,
        "storage.replicate",
        partition,
        |mut c, _| async move { c.replicate(request).await },
    )
    .await
}

/// Tries per owner for a tombstone confirmation (a lost one only leaves the purge to anti-entropy).
const CONFIRM_ATTEMPTS: u32 = 3;

/// Tells every owner that all of them hold the tombstone-only set `encoded` (after the client was
/// answered; best effort: an owner that does not hear it keeps the tombstone for anti-entropy).
async fn confirm_tombstone(
    pool: &StoragePool,
    view: &ClusterView,
    owners: &[NodeId],
    key: &pb::KeyRef,
    encoded: &[u8],
    placement: TombstonePlacement,
) {
    let calls = owners.iter().map(|&node| {
        let request = pb::ConfirmTombstoneRequest {
            key: Some(key.clone()),
            version_set: encoded.to_vec(),
            topology_epoch: placement.topology_epoch,
            replication_factor: placement.replication_factor,
        };
        async move {
            let partition = partition_of(&request.key);
            for attempt in 1..=CONFIRM_ATTEMPTS {
                let request = request.clone();
                let outcome =
                    call(pool, view, node, "storage.confirm_tombstone", partition, |mut c, _| async move {
                        c.confirm_tombstone(request).await
                    })
                    .await;
                match outcome {
                    Ok(response) if response.recorded => {
                        metrics::counter!("pairdb_router_tombstones_confirmed_total").increment(1);
                    }
                    Ok(_) => {
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
        }
    });
    futures::future::join_all(calls).await;
}

/// Runs a read; resolves when R replicas answered (read repair may go on afterwards).
pub async fn read(
    pool: Arc<StoragePool>,
    view: Arc<ClusterView>,
    clock: Clock,
    plan: ReadPlan,
    key: pb::KeyRef,
) -> ReadResult {
    let (reply_tx, reply_rx) = oneshot::channel();
    tokio::spawn(run_read(pool, view, clock, plan, key, reply_tx).instrument(tracing::Span::current()));
    reply_rx.await.unwrap_or(ReadResult::QuorumNotReached { answered: 0, required: 0, failures: vec![] })
}

type ReadCallFuture =
    std::pin::Pin<Box<dyn Future<Output = (NodeId, Result<pb::GetResponse, CallError>)> + Send>>;

/// One read in flight: fetches go out as the machine asks, answers come back as its inputs.
struct ReadRun {
    pool: Arc<StoragePool>,
    view: Arc<ClusterView>,
    key: pb::KeyRef,
    reply_tx: Option<oneshot::Sender<ReadResult>>,
    /// The first definitive refusal: the answer if too few replicas answer because of it.
    rejected: Option<tonic::Status>,
    /// What each replica answered, for the request's span and metrics.
    outcomes: BTreeMap<NodeId, &'static str>,
    calls: FuturesUnordered<ReadCallFuture>,
}

async fn run_read(
    pool: Arc<StoragePool>,
    view: Arc<ClusterView>,
    clock: Clock,
    plan: ReadPlan,
    key: pb::KeyRef,
    reply_tx: oneshot::Sender<ReadResult>,
) {
    let mut machine = ReadCoordinator::new(plan);
    let mut run = ReadRun {
        pool,
        view,
        key,
        reply_tx: Some(reply_tx),
        rejected: None,
        outcomes: BTreeMap::new(),
        calls: FuturesUnordered::new(),
    };
    let mut effects = machine.start(clock.now_ms());
    loop {
        for effect in effects.drain(..) {
            run.start(effect, &machine);
        }
        if machine.is_finished() {
            return;
        }
        let timeout = machine.next_timeout_ms().unwrap_or_else(|| clock.now_ms());
        tokio::select! {
            next = run.calls.next(), if !run.calls.is_empty() => {
                let Some((node, response)) = next else { continue };
                let answer = run.answer(node, response);
                effects = machine.on_answer(node, answer, clock.now_ms());
            }
            () = tokio::time::sleep_until(clock.instant(timeout)) => {
                effects = machine.on_tick(clock.now_ms());
            }
        }
    }
}

impl ReadRun {
    fn start(&mut self, effect: ReadEffect, machine: &ReadCoordinator) {
        match effect {
            ReadEffect::Fetch { node } => {
                let call = self.fetch(node);
                self.calls.push(call);
            }
            ReadEffect::Reply(reply) => self.reply(reply),
            ReadEffect::Repair { node } => {
                if let Some(merged) = machine.merged() {
                    self.repair(node, merged);
                }
            }
        }
    }

    fn fetch(&self, node: NodeId) -> ReadCallFuture {
        let (pool, view, key) = (self.pool.clone(), self.view.clone(), self.key.clone());
        Box::pin(async move {
            let request = pb::GetRequest { key: Some(key) };
            let partition = partition_of(&request.key);
            let response =
                call(
                    &pool,
                    &view,
                    node,
                    "storage.get",
                    partition,
                    |mut c, _| async move { c.get(request).await },
                )
                .await;
            (node, response)
        })
    }

    fn reply(&mut self, reply: ReadReply) {
        let result = match reply {
            ReadReply::Answered { merged, .. } => ReadResult::Answered {
                merged,
                replicas: self.outcomes.iter().map(|(n, o)| (*n, *o)).collect(),
            },
            ReadReply::QuorumNotReached { .. } if self.rejected.is_some() => {
                ReadResult::Rejected(self.rejected.take().expect("checked by the guard"))
            }
            ReadReply::QuorumNotReached { answered, required, failures } => {
                metrics::counter!("pairdb_router_quorum_failures_total", "op" => "read").increment(1);
                ReadResult::QuorumNotReached { answered, required, failures }
            }
        };
        if let Some(tx) = self.reply_tx.take() {
            let _ = tx.send(result);
        }
    }

    /// Sends the merged set to a replica that answered with less, in the background (a failed
    /// repair is left to anti-entropy).
    fn repair(&self, node: NodeId, merged: &VersionSet) {
        let request = pb::ReplicateRequest {
            key: Some(self.key.clone()),
            version_set: encode_version_set(merged),
            hint_for_node_id: 0,
        };
        let (pool, view) = (self.pool.clone(), self.view.clone());
        metrics::counter!("pairdb_router_read_repairs_total").increment(1);
        let repair = async move {
            if replicate_on(&pool, &view, node, request).await.is_err() {
                tracing::debug!(node_id = node.0, "read repair failed; anti-entropy will catch up");
            }
        };
        tokio::spawn(repair.instrument(tracing::Span::current()));
    }

    /// The machine's input for a replica's answer, noting the outcome.
    fn answer(&mut self, node: NodeId, response: Result<pb::GetResponse, CallError>) -> ReadAnswer {
        let (outcome, answer) = match response {
            Ok(pb::GetResponse { found: true, version_set }) => match decode_version_set(&version_set) {
                Ok(set) => ("found", ReadAnswer::Found(set)),
                Err(error) => {
                    tracing::error!(node_id = node.0, %error, "replica returned an undecodable set");
                    ("error", ReadAnswer::Failed(FailureCause::Error))
                }
            },
            Ok(_) => ("not_found", ReadAnswer::NotFound),
            Err(CallError::Failed(cause)) => (cause.as_str(), ReadAnswer::Failed(cause)),
            Err(CallError::Rejected(status)) => {
                self.rejected.get_or_insert(status);
                ("rejected", ReadAnswer::Failed(FailureCause::Error))
            }
        };
        self.outcomes.insert(node, outcome);
        answer
    }
}
