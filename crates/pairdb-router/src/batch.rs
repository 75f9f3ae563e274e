//! PutMany / DeleteMany (docs/api.md, "Batches"): up to [`MAX_BATCH_ITEMS`] writes of one tenant in
//! one request, each answered on its own (an ack, or the reason a single write would give) — never
//! all-or-nothing.
//!
//! Every item is one ordinary write — its own [`WriteCoordinator`], its own dot, the same
//! acknowledgement rule — but the machines are driven together, and their storage calls are
//! grouped: each round, the coordinate calls bound for one node go out as one
//! `CoordinateWriteBatch`, the replicate calls as one `ReplicateBatch` (the node applies them with
//! one group commit). Items that need a read first (a condition, an overwrite or a delete without a
//! context) take the single-write path, a bounded number at a time, since their read decides what is
//! written.
//!
//! Bounded: at most [`MAX_BATCH_ITEMS`] items and [`MAX_BATCH_VALUE_BYTES`] of values per request,
//! at most [`MAX_ITEMS_PER_CALL`] items per storage call.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pairdb_core::coordination::{
    FailureCause, WriteCoordinator, WriteEffect, WriteInput, WritePlan, WriteReply,
};
use pairdb_core::ring::NodeId;
use tokio::sync::oneshot;
use tracing::Instrument;

use pairdb_core::encoding::encode_vector;
use pairdb_core::reason::{HasReason, Reason};

use crate::error::RouterError;
use crate::execute::{Clock, WriteResult};
use crate::kv::{KvRouter, WriteOutcome, WriteSpec};
use crate::request::{BatchItem, RequestOptions};
use crate::storage::{CallBudget, CallError, CoordinateCall, StorageCalls, StoredSet};
use crate::view::{ClusterView, TenantSettings};

/// The most items one PutMany / DeleteMany may carry.
pub const MAX_BATCH_ITEMS: usize = 1_000;
/// The most value bytes one PutMany may carry.
pub const MAX_BATCH_VALUE_BYTES: usize = 4 << 20;
/// The most items one batched storage call carries (a larger group is split).
pub const MAX_ITEMS_PER_CALL: usize = 500;
/// Batches a router drives at once; more wait (at most their deadline, then OVERLOADED). Bounds
/// the items in flight (and so the storage nodes' queues) so single writes beside batches keep
/// their latency, and a batch's deadline starts when it runs.
pub const CONCURRENT_BATCHES: usize = 4;
/// Items on the single-write path in flight at once.
const SINGLE_PATH_CONCURRENCY: usize = 16;

type Coordinated = Arc<StoredSet>;

/// One item on the batched path.
struct Driven {
    machine: WriteCoordinator<Coordinated>,
    call: CoordinateCall,
    reply: Option<WriteResult>,
}

/// The inputs a finished batched call gives its items.
type Round = Vec<(usize, WriteInput<Coordinated>)>;
type RoundFuture = std::pin::Pin<Box<dyn Future<Output = Round> + Send>>;

impl KvRouter {
    /// Writes every item (see the module docs); one result per item, in order.
    pub async fn write_many(
        &self,
        tenant_id: &str,
        items: Vec<BatchItem>,
        mut options: RequestOptions,
    ) -> Vec<Result<WriteOutcome, RouterError>> {
        let deadline_ms = self.deadline_ms(&options);
        let wait = std::time::Duration::from_millis(deadline_ms.saturating_sub(self.clock.now_ms()));
        let _permit = match tokio::time::timeout(wait, self.batches.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => return items.iter().map(|_| Err(RouterError::NotReady)).collect(),
            Err(_waited) => {
                let busy =
                    || RouterError::invalid(Reason::Overloaded, "too many batches are running; retry later");
                return items.iter().map(|_| Err(busy())).collect();
            }
        };
        // What is left of the request's time once it may run.
        let left_ms = deadline_ms.saturating_sub(self.clock.now_ms()).max(1);
        options.timeout_ms = u32::try_from(left_ms).unwrap_or(u32::MAX);
        let mut results: Vec<Option<Result<WriteOutcome, RouterError>>> = Vec::with_capacity(items.len());
        results.resize_with(items.len(), || None);
        let view = self.view.load();
        let tenant = match Self::tenant(&view, tenant_id).and_then(|t| Ok((Self::required(&options, &t)?, t)))
        {
            Ok(found) => found,
            Err(error) => {
                let (reason, message) = (error.reason(), error.to_string());
                return results.iter().map(|_| Err(RouterError::invalid(reason, message.clone()))).collect();
            }
        };
        let (mut single, mut batched_keys, mut batched) = (Vec::new(), Vec::new(), Vec::new());
        for (index, item) in items.into_iter().enumerate() {
            let needs_read = item.condition.is_some()
                || (item.context.is_empty() && (item.overwrite || item.value.is_none()));
            if needs_read {
                single.push((index, item));
                continue;
            }
            match self.prepare_item(&view, &tenant, &item, &options) {
                Ok(planned) => {
                    batched_keys.push((index, item.key));
                    batched.push(planned);
                }
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        let singles = futures::stream::iter(single)
            .map(|(index, item)| async move {
                let spec = WriteSpec {
                    value: item.value,
                    context: &item.context,
                    read_first: item.overwrite || item.context.is_empty(),
                    condition: item.condition,
                    expiry: item.expiry,
                    touch: false,
                };
                (index, self.write(tenant_id, &item.key, spec, options).await)
            })
            .buffer_unordered(SINGLE_PATH_CONCURRENCY)
            .collect::<Vec<_>>();
        let driven = drive(self.calls(&view), self.clock, batched);
        let (singles, driven) = futures::future::join(singles, driven).await;
        for (index, result) in singles {
            results[index] = Some(result);
        }
        let sealing = Self::sealing_key(&view);
        for ((index, key), result) in batched_keys.into_iter().zip(driven) {
            results[index] = Some(match sealing {
                Ok(sealing) => Self::outcome(sealing, tenant_id, &key, result),
                Err(_) => Err(RouterError::NotReady),
            });
        }
        results.into_iter().map(|r| r.unwrap_or(Err(RouterError::NotReady))).collect()
    }

    /// Checks one batched item as a single write would and plans it.
    fn prepare_item(
        &self,
        view: &ClusterView,
        (required, tenant): &(usize, Arc<TenantSettings>),
        item: &BatchItem,
        options: &RequestOptions,
    ) -> Result<(WritePlan, CoordinateCall), RouterError> {
        let expiry = item.value.is_some().then_some(item.expiry);
        let checked =
            self.check_write(view, tenant, &item.key, item.value.as_ref(), &item.context, expiry)?;
        let (key, plan) = self.write_plan(view, tenant, &item.key, *required, options)?;
        let call = CoordinateCall {
            key,
            context: if checked.vector.is_empty() { Vec::new() } else { encode_vector(&checked.vector) },
            value: item.value.clone(),
            timestamp_ms: crate::storage::wall_clock_ms(),
            max_siblings: u32::try_from(tenant.max_siblings).unwrap_or(u32::MAX),
            supersede_local: tenant.conflict_mode == crate::view::ConflictMode::Lww,
            condition: None,
            expires_at_ms: checked.expires_at_ms,
            touch_over: None,
        };
        Ok((plan, call))
    }
}

/// Drives every item's write machine, grouping their storage calls per node each round; resolves
/// once every item has its answer (replication beyond W goes on in the background).
async fn drive(
    calls: StorageCalls,
    clock: Clock,
    items: Vec<(WritePlan, CoordinateCall)>,
) -> Vec<WriteResult> {
    if items.is_empty() {
        return Vec::new();
    }
    let (reply_tx, reply_rx) = oneshot::channel();
    let run = run(calls, clock, items, reply_tx);
    tokio::spawn(run.instrument(tracing::Span::current()));
    reply_rx.await.unwrap_or_default()
}

async fn run(
    calls: StorageCalls,
    clock: Clock,
    items: Vec<(WritePlan, CoordinateCall)>,
    reply_tx: oneshot::Sender<Vec<WriteResult>>,
) {
    let deadline_ms = items.iter().map(|(plan, _)| plan.deadline_ms).max().unwrap_or(0);
    let mut driven: Vec<Driven> = items
        .into_iter()
        .map(|(plan, call)| Driven { machine: WriteCoordinator::new(plan), call, reply: None })
        .collect();
    let mut in_flight: FuturesUnordered<RoundFuture> = FuturesUnordered::new();
    let mut effects = Vec::new();
    let now = clock.now_ms();
    for (index, item) in driven.iter_mut().enumerate() {
        effects.extend(item.machine.start(now).into_iter().map(|e| (index, e)));
    }
    let mut reply_tx = Some(reply_tx);
    loop {
        flush(&calls, clock, deadline_ms, &mut driven, std::mem::take(&mut effects), &mut in_flight);
        if reply_tx.is_some() && driven.iter().all(|d| d.reply.is_some()) {
            let replies = driven.iter_mut().filter_map(|d| d.reply.take()).collect();
            if let Some(tx) = reply_tx.take() {
                let _ = tx.send(replies);
            }
        }
        if driven.iter().all(|d| d.machine.is_finished()) {
            break;
        }
        let wake_ms = driven
            .iter()
            .filter_map(|d| d.machine.next_timeout_ms())
            .min()
            .unwrap_or_else(|| clock.now_ms() + 50);
        tokio::select! {
            Some(round) = in_flight.next(), if !in_flight.is_empty() => {
                let now = clock.now_ms();
                for (index, input) in round {
                    effects.extend(driven[index].machine.handle(input, now).into_iter().map(|e| (index, e)));
                }
            }
            () = tokio::time::sleep_until(clock.instant(wake_ms)) => {
                let now = clock.now_ms();
                for (index, item) in driven.iter_mut().enumerate() {
                    if item.machine.next_timeout_ms().is_some_and(|at| at <= now) {
                        effects.extend(item.machine.handle(WriteInput::Tick, now).into_iter().map(|e| (index, e)));
                    }
                }
            }
        }
    }
}

/// Carries out one round of effects: replies are recorded, coordinate and replicate calls are
/// grouped per node into batched calls, hints the coordinator keeps go out on their own.
fn flush(
    calls: &StorageCalls,
    clock: Clock,
    deadline_ms: u64,
    driven: &mut [Driven],
    effects: Vec<(usize, WriteEffect<Coordinated>)>,
    in_flight: &mut FuturesUnordered<RoundFuture>,
) {
    let mut coordinate: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
    let mut replicate: BTreeMap<NodeId, Vec<(usize, Option<NodeId>, Coordinated)>> = BTreeMap::new();
    for (index, effect) in effects {
        match effect {
            WriteEffect::Coordinate { node } => coordinate.entry(node).or_default().push(index),
            WriteEffect::Replicate { node, hint_for, set } => {
                replicate.entry(node).or_default().push((index, hint_for, set));
            }
            WriteEffect::StoreHint { node, hint_for, set } => {
                let (calls, key) = (calls.clone(), driven[index].call.key.clone());
                tokio::spawn(async move {
                    let _ = calls.replicate(node, key, set.encoded.clone(), Some(hint_for)).await;
                });
            }
            WriteEffect::Reply(reply) => driven[index].reply = Some(write_result(reply)),
        }
    }
    for (node, indexes) in coordinate {
        for chunk in indexes.chunks(MAX_ITEMS_PER_CALL) {
            let batch: Vec<CoordinateCall> = chunk.iter().map(|i| driven[*i].call.clone()).collect();
            let (calls, chunk) = (calls.clone(), chunk.to_vec());
            let budget =
                CallBudget { wait: clock.until(deadline_ms), suspect_after: calls.pool.storage_timeout() };
            in_flight.push(Box::pin(async move {
                let results = calls.coordinate_batch(node, batch, budget).await;
                chunk
                    .into_iter()
                    .zip(results)
                    .map(|(index, result)| (index, coordinated(node, result)))
                    .collect()
            }));
        }
    }
    for (node, items) in replicate {
        for chunk in items.chunks(MAX_ITEMS_PER_CALL) {
            let batch = chunk
                .iter()
                .map(|(index, hint_for, set)| {
                    (driven[*index].call.key.clone(), set.encoded.clone(), *hint_for)
                })
                .collect();
            let indexes: Vec<usize> = chunk.iter().map(|(index, _, _)| *index).collect();
            let calls = calls.clone();
            in_flight.push(Box::pin(async move {
                let results = calls.replicate_batch(node, batch).await;
                indexes
                    .into_iter()
                    .zip(results)
                    .map(|(index, result)| (index, replicated(node, result)))
                    .collect()
            }));
        }
    }
}

fn coordinated(node: NodeId, result: Result<StoredSet, CallError>) -> WriteInput<Coordinated> {
    match result {
        Ok(set) => WriteInput::Coordinated { node, set: Arc::new(set) },
        Err(CallError::Failed(cause)) => WriteInput::CoordinateFailed { node, cause },
        Err(CallError::Refused(refusal)) => WriteInput::Rejected { node, refusal },
    }
}

fn replicated(node: NodeId, result: Result<(), CallError>) -> WriteInput<Coordinated> {
    match result {
        Ok(()) => WriteInput::Replicated { node },
        Err(CallError::Failed(cause)) => WriteInput::ReplicateFailed { node, cause },
        Err(CallError::Refused(_)) => WriteInput::ReplicateFailed { node, cause: FailureCause::Error },
    }
}

fn write_result(reply: WriteReply<Coordinated>) -> WriteResult {
    match reply {
        WriteReply::Acked { set, acks, hinted_acks, required } => {
            WriteResult::Acked { set: set.set.clone(), acks, hinted_acks, required }
        }
        WriteReply::QuorumNotReached { acks, hinted_acks, required, failures } => {
            WriteResult::QuorumNotReached { acks, hinted_acks, required, failures }
        }
        WriteReply::Rejected(refusal) => WriteResult::Rejected(refusal),
    }
}
