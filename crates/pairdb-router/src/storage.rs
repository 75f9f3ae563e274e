//! The router's edge toward storage nodes: the one module of the request path that speaks the
//! storage protocol. Request logic ([`crate::kv`], [`crate::execute`]) calls these functions with
//! domain types and gets domain answers: a set, "not found", or a [`CallError`] that says whether the
//! call may have had an effect ([`FailureCause`]) or was refused for a reason every replica would
//! give ([`Refusal`]).
//!
//! Every call is bounded twice: by the per-node in-flight semaphore and by the storage timeout, and
//! each is a client span (RPC semantic conventions, `pairdb.node_id`, `pairdb.partition`, `pairdb.outcome`; hinted replicates named apart) whose trace context the storage node
//! continues, so a client request is one trace with one child per replica call.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use pairdb_core::condition::WriteCondition;
use pairdb_core::coordination::{FailureCause, Refusal};
use pairdb_core::dvv::VersionSet;
use pairdb_core::encoding::decode_version_set;
use pairdb_core::gc::TombstonePlacement;
use pairdb_core::listing::NodeAnswer;
use pairdb_core::reason::Reason;
use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionId, Token};
use pairdb_proto::storage::v1 as pb;
use tracing::Instrument;

use crate::coalesce::{Admission, Coalesced, Lane, Waiter};
use crate::pool::{NodeClient, StorageClient, StoragePool};
use crate::view::ClusterView;

/// The record a storage call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageKey {
    pub tenant_id: String,
    pub key: String,
    pub partition: PartitionId,
    /// The key's placement token (token rule v2), so nodes file it where the tenant's rule puts it.
    pub token: Token,
    /// The tenant's generation in the router's view: a node refuses a request for another
    /// generation than its own view's, or for a tenant being deleted.
    pub tenant_generation: u64,
}

impl StorageKey {
    fn into_wire(self) -> pb::KeyRef {
        pb::KeyRef {
            tenant_id: self.tenant_id,
            key: self.key,
            partition: self.partition.0,
            tenant_generation: self.tenant_generation,
            token: Some(self.token.0),
        }
    }
}

/// What the coordinator replica of a write is asked to apply.
#[derive(Debug, Clone)]
pub struct CoordinateCall {
    pub key: StorageKey,
    /// The write's verified context vector in the internal encoding (empty for a blind write).
    pub context: Vec<u8>,
    /// `None` writes a tombstone.
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: u64,
    pub max_siblings: u32,
    pub supersede_local: bool,
    /// A conditional write: the condition and the observed vector (internal encoding) the
    /// coordinator re-checks against.
    pub condition: Option<(WriteCondition, Vec<u8>)>,
    /// When the new value expires (ms since the Unix epoch).
    pub expires_at_ms: Option<u64>,
    /// A touch: the router's read of the key (encoded set) the coordinator merges first.
    pub touch_over: Option<Vec<u8>>,
}

/// One node's share of a listing page: the tenant's records of `partitions` in range.
#[derive(Debug, Clone)]
pub struct ListCall {
    pub tenant_id: String,
    pub tenant_generation: u64,
    pub partitions: Vec<PartitionId>,
    pub prefix: String,
    pub start_after: Option<String>,
    pub end_before: Option<String>,
    /// A key group's placement token: only its records.
    pub group_token: Option<Token>,
    pub reverse: bool,
    pub limit: u32,
    pub max_bytes: u64,
    pub skip_tombstones: bool,
}

/// A set a coordinator stored, decoded and as encoded (replicated as is, never re-encoded).
#[derive(Debug, PartialEq, Eq)]
pub struct StoredSet {
    pub set: VersionSet,
    pub encoded: Vec<u8>,
}

/// Why a storage call gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The call failed; the cause says whether it may have been applied.
    Failed(FailureCause),
    /// The node refused the request for a reason every replica would give.
    Refused(Refusal),
}

/// How long a storage call may take.
#[derive(Debug, Clone, Copy)]
pub struct CallBudget {
    /// How long the router waits for the answer once the request was sent.
    pub wait: Duration,
    /// When a call still unanswered makes the node suspect (the storage timeout): new requests then
    /// avoid it, while this call may go on waiting up to `wait`.
    pub suspect_after: Duration,
}

impl CallBudget {
    pub fn storage_timeout(pool: &StoragePool) -> Self {
        Self { wait: pool.storage_timeout(), suspect_after: pool.storage_timeout() }
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

/// The storage calls of one request, bound to the pool and the view it was planned with.
#[derive(Debug, Clone)]
pub struct StorageCalls {
    pub pool: Arc<StoragePool>,
    pub view: Arc<ClusterView>,
}

impl StorageCalls {
    /// Asks `node` to apply `call` as the write's coordinator and return the set it stored. The
    /// node is told how long the router waits (`budget.wait`) and stops applying after that.
    pub async fn coordinate(
        &self,
        node: NodeId,
        call: CoordinateCall,
        budget: CallBudget,
    ) -> Result<StoredSet, CallError> {
        let partition = call.key.partition;
        self.point::<CoordinateLane>(node, Rpc::COORDINATE_WRITE, partition, budget, coordinate_request(call))
            .await
    }

    /// [`Self::coordinate`] for many writes in one RPC: one result per call, in order. A failed RPC
    /// fails every call the same way; otherwise each gets the answer a single call would have.
    pub async fn coordinate_batch(
        &self,
        node: NodeId,
        calls: Vec<CoordinateCall>,
        budget: CallBudget,
    ) -> Vec<Result<StoredSet, CallError>> {
        let count = calls.len();
        let partition = calls.first().map_or(PartitionId(0), |c| c.key.partition);
        let mut writes: Vec<pb::CoordinateWriteRequest> = calls.into_iter().map(coordinate_request).collect();
        let rpc = |mut c: StorageClient, left: Duration| async move {
            writes.iter_mut().for_each(|write| set_apply_deadline(write, left));
            c.coordinate_write_batch(pb::CoordinateWriteBatchRequest { writes }).await
        };
        let answer = self.call(node, Rpc::COORDINATE_WRITE_BATCH, partition, budget, rpc).await;
        CoordinateLane::answers(node, answer, count)
    }

    /// [`Self::replicate`] for many sets in one RPC: one result per item, in order.
    pub async fn replicate_batch(
        &self,
        node: NodeId,
        items: Vec<(StorageKey, Vec<u8>, Option<NodeId>)>,
    ) -> Vec<Result<(), CallError>> {
        let count = items.len();
        let partition = items.first().map_or(PartitionId(0), |i| i.0.partition);
        let hinted = items.iter().any(|item| item.2.is_some());
        let items: Vec<pb::ReplicateRequest> = items
            .into_iter()
            .map(|(key, encoded, hint_for)| replicate_request(key, encoded, hint_for))
            .collect();
        let budget = CallBudget::storage_timeout(&self.pool);
        let rpc = |mut c: StorageClient, _| async move {
            c.replicate_batch(pb::ReplicateBatchRequest { items }).await
        };
        let answer = self.call(node, Rpc::replicate_batch(hinted), partition, budget, rpc).await;
        ReplicateLane::answers(node, answer, count)
    }

    /// Stores the encoded set on `node`: as its replica, or (with `hint_for`) as a hint for that owner.
    pub async fn replicate(
        &self,
        node: NodeId,
        key: StorageKey,
        encoded: Vec<u8>,
        hint_for: Option<NodeId>,
    ) -> Result<(), CallError> {
        let partition = key.partition;
        let rpc = Rpc::replicate(hint_for.is_some());
        let request = replicate_request(key, encoded, hint_for);
        let budget = CallBudget::storage_timeout(&self.pool);
        self.point::<ReplicateLane>(node, rpc, partition, budget, request).await
    }

    /// `node`'s set of the key (`None`: it has none).
    pub async fn get(&self, node: NodeId, key: StorageKey) -> Result<Option<VersionSet>, CallError> {
        let partition = key.partition;
        let request = pb::GetRequest { key: Some(key.into_wire()) };
        let budget = CallBudget::storage_timeout(&self.pool);
        self.point::<GetLane>(node, Rpc::GET, partition, budget, request).await
    }

    /// Tells `node` that every owner holds the tombstone-only set `encoded`; true when it recorded it.
    pub async fn confirm_tombstone(
        &self,
        node: NodeId,
        key: &StorageKey,
        encoded: &[u8],
        placement: TombstonePlacement,
    ) -> Result<bool, CallError> {
        let request = pb::ConfirmTombstoneRequest {
            key: Some(key.clone().into_wire()),
            version_set: encoded.to_vec(),
            topology_epoch: placement.topology_epoch,
            replication_factor: placement.replication_factor,
        };
        let budget = CallBudget::storage_timeout(&self.pool);
        let rpc = |mut c: StorageClient, _| async move { c.confirm_tombstone(request).await };
        let response = self.call(node, Rpc::CONFIRM_TOMBSTONE, key.partition, budget, rpc).await?;
        Ok(response.recorded)
    }

    /// `node`'s share of a listing page (see [`ListCall`]), waiting at most `wait`, and how many index
    /// entries the node examined for it.
    pub async fn list_records(
        &self,
        node: NodeId,
        call: ListCall,
        wait: Duration,
    ) -> Result<(NodeAnswer, u64), CallError> {
        let partition = call.partitions.first().copied().unwrap_or(PartitionId(0));
        let request = pb::ListRecordsRequest {
            tenant_id: call.tenant_id,
            tenant_generation: call.tenant_generation,
            partitions: call.partitions.iter().map(|p| p.0).collect(),
            prefix: call.prefix,
            start_after: call.start_after.unwrap_or_default(),
            end_before: call.end_before.unwrap_or_default(),
            group_token: call.group_token.map(|t| t.0),
            reverse: call.reverse,
            limit: call.limit,
            max_bytes: call.max_bytes,
            skip_tombstones: call.skip_tombstones,
            // The node answers what it found a little before the router stops waiting.
            budget_ms: u32::try_from(wait.as_millis() * 3 / 4).unwrap_or(u32::MAX).max(1),
            max_examined: 0,
        };
        let budget = CallBudget { wait, suspect_after: wait.max(self.pool.storage_timeout()) };
        let rpc = |mut c: StorageClient, _| async move { c.list_records(request).await };
        let response = self.call(node, Rpc::LIST_RECORDS, partition, budget, rpc).await?;
        let mut records = Vec::with_capacity(response.records.len());
        for record in response.records {
            let set = decode_version_set(&record.version_set).map_err(|error| {
                tracing::error!(node_id = node.0, %error, "replica listed an undecodable set");
                CallError::Failed(FailureCause::Error)
            })?;
            records.push((record.key, set));
        }
        if !response.complete && response.resume_after.is_empty() {
            // Not how far the answer is complete: unusable (the partitions go to another replica).
            tracing::error!(
                node_id = node.0,
                "replica answered an incomplete listing without a resume point"
            );
            return Err(CallError::Failed(FailureCause::Error));
        }
        let resume_after = (!response.complete).then_some(response.resume_after);
        Ok((NodeAnswer { records, complete: response.complete, resume_after }, response.examined))
    }

    /// Runs one RPC against `node` in a client span (RPC semantic conventions; status ERROR when
    /// the call fails), updating the failure view and the per-node latency histogram (see [`send`]).
    async fn call<T, F, Fut>(
        &self,
        node: NodeId,
        rpc_kind: Rpc,
        partition: PartitionId,
        budget: CallBudget,
        rpc: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(StorageClient, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let span = call_span(rpc_kind, node, partition);
        let sent = async {
            match self.client_of(node) {
                Some(client) => send(&client, rpc_kind, budget, rpc).await,
                None => (Err(CallError::Failed(FailureCause::NotApplied)), None),
            }
        };
        let (result, code) = sent.instrument(span.clone()).await;
        finish_span(&span, &result, code);
        result
    }

    /// A point call (get, coordinate, replicate) through `node`'s lane of its kind: sent alone when
    /// the node has few of them in flight, otherwise coalesced with others into one batched RPC
    /// ([`crate::coalesce`]). Either way the call has its own client span, deadline and answer.
    async fn point<C: PointCall>(
        &self,
        node: NodeId,
        rpc_kind: Rpc,
        partition: PartitionId,
        budget: CallBudget,
        payload: C::Payload,
    ) -> Result<C::Output, CallError> {
        let span = call_span(rpc_kind, node, partition);
        let sent = async {
            let Some(client) = self.client_of(node) else {
                return (Err(CallError::Failed(FailureCause::NotApplied)), None);
            };
            let deadline = tokio::time::Instant::now() + budget.wait;
            match Lane::<C>::admit(&client, payload, deadline) {
                Admission::Lead(waiter, _slot) => alone::<C>(&client, rpc_kind, budget, waiter.payload).await,
                Admission::Alone(waiter) => alone::<C>(&client, rpc_kind, budget, waiter.payload).await,
                Admission::Queued(answer) => {
                    tracing::Span::current().record("pairdb.coalesced", true);
                    match tokio::time::timeout_at(deadline, answer).await {
                        Ok(Ok(result)) => (result, None),
                        // The batch's task ended without answering: it may have been sent.
                        Ok(Err(_dropped)) => (Err(CallError::Failed(FailureCause::Error)), None),
                        Err(_elapsed) => (
                            Err(CallError::Failed(FailureCause::Timeout)),
                            Some(tonic::Code::DeadlineExceeded),
                        ),
                    }
                }
            }
        };
        let (result, code) = sent.instrument(span.clone()).await;
        finish_span(&span, &result, code);
        result
    }

    /// The client of `node` at the address the view lists for it.
    fn client_of(&self, node: NodeId) -> Option<Arc<NodeClient>> {
        let entry = self.view.nodes.get(&node)?;
        self.pool.client(node, &entry.address)
    }
}

/// The client span of one storage call (its outcome is recorded by [`finish_span`]).
fn call_span(rpc_kind: Rpc, node: NodeId, partition: PartitionId) -> tracing::Span {
    pairdb_service::telemetry::span_if_exporting(|| {
        tracing::info_span!(
            "storage.call",
            otel.name = rpc_kind.span_name,
            otel.kind = "client",
            otel.status_description = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = STORAGE_SERVICE,
            rpc.method = rpc_kind.method,
            rpc.grpc.status_code = tracing::field::Empty,
            server.address = tracing::field::Empty,
            server.port = tracing::field::Empty,
            pairdb.node_id = i64::from(node.0),
            pairdb.partition = i64::from(partition.0),
            pairdb.hinted = rpc_kind.hinted,
            pairdb.outcome = tracing::field::Empty,
            pairdb.coalesced = tracing::field::Empty,
            pairdb.batch_items = tracing::field::Empty,
        )
    })
}

/// Records a call's gRPC code, outcome and (for a failure) its reason on its span.
fn finish_span<T>(span: &tracing::Span, result: &Result<T, CallError>, code: Option<tonic::Code>) {
    if span.is_disabled() {
        return;
    }
    if let Some(code) = code {
        span.record("rpc.grpc.status_code", i64::from(code as i32));
    }
    let outcome = match result {
        Ok(_) => "ok",
        Err(CallError::Refused(refusal)) => {
            pairdb_service::telemetry::record_error(span, refusal.reason.as_str(), &refusal.message);
            "rejected"
        }
        Err(CallError::Failed(cause)) => {
            // The code's reason (a storage node's own reasons are in its server span).
            let reason =
                code.map_or("NOT_SENT", |code| pairdb_service::errors::reason_of_code(code).as_str());
            pairdb_service::telemetry::record_error(span, reason, cause.as_str());
            cause.as_str()
        }
    };
    span.record("pairdb.outcome", outcome);
}

/// Sends one RPC to `client`'s node: the call's result and the gRPC code it ended with (`None`:
/// nothing was sent). The call gets `budget.suspect_after` for a free in-flight slot (nothing is
/// sent before, so a call refused here is `NotApplied`) and then `budget.wait` for the answer; `rpc`
/// is told that wait. Times the RPC from sending to its answer (or the router giving up) in the
/// node's latency histogram and updates the failure view.
async fn send<T, F, Fut>(
    client: &NodeClient,
    rpc_kind: Rpc,
    budget: CallBudget,
    rpc: F,
) -> (Result<T, CallError>, Option<tonic::Code>)
where
    F: FnOnce(StorageClient, Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    // Until the request is handed to the channel nothing has left the router: every failure
    // before that point is `NotApplied`.
    let not_applied = CallError::Failed(FailureCause::NotApplied);
    let acquired = match tokio::time::timeout(budget.suspect_after, client.acquire()).await {
        Ok(Some(acquired)) => acquired,
        Ok(None) => return (Err(not_applied), None),
        Err(_elapsed) => {
            client.record_failure();
            return (Err(not_applied), None);
        }
    };
    let (grpc, _permit) = acquired;
    record_server_address(&client.address);
    let sent = std::time::Instant::now();
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
    client.observe_rpc(rpc_kind.timed, sent.elapsed());
    match outcome {
        Ok(Ok(response)) => {
            client.record_success();
            (Ok(response.into_inner()), Some(tonic::Code::Ok))
        }
        Ok(Err(status)) => (answered(client, &status, not_applied), Some(status.code())),
        // Already suspect since `suspect_after`.
        Err(_elapsed) => (Err(CallError::Failed(FailureCause::Timeout)), Some(tonic::Code::DeadlineExceeded)),
    }
}

/// A point call sent alone, its answer read as `C` reads it.
async fn alone<C: PointCall>(
    client: &NodeClient,
    rpc_kind: Rpc,
    budget: CallBudget,
    payload: C::Payload,
) -> (Result<C::Output, CallError>, Option<tonic::Code>) {
    let (result, code) = send(client, rpc_kind, budget, |c, left| C::call_alone(c, payload, left)).await;
    (result.and_then(|single| C::answer(client.node, single)), code)
}

/// A kind of point call and its batched RPC: how one is sent alone, how a batch of them is sent,
/// and how each answer reads.
pub trait PointCall: Coalesced {
    /// The single call's response.
    type Single: Send;
    /// The batched call's response.
    type Batch: Send;
    /// The batched RPC (plain and hinted forms).
    fn batch_rpc(payloads: &[(Self::Payload, Duration)]) -> Rpc;
    fn call_alone(
        client: StorageClient,
        payload: Self::Payload,
        left: Duration,
    ) -> impl Future<Output = Result<tonic::Response<Self::Single>, tonic::Status>> + Send;
    /// Sends the payloads, each with how long its caller still waits, as one RPC.
    fn call_batch(
        client: StorageClient,
        payloads: Vec<(Self::Payload, Duration)>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Batch>, tonic::Status>> + Send;
    fn answer(node: NodeId, single: Self::Single) -> Result<Self::Output, CallError>;
    /// One result per item of a batched answer, in order (see [`per_item`]).
    fn answers(
        node: NodeId,
        batch: Result<Self::Batch, CallError>,
        count: usize,
    ) -> Vec<Result<Self::Output, CallError>>;
}

/// Sends a coalesced batch as one RPC in a client span of its own — a child of the first call's
/// span, linked to the others — and answers every call. A node that does not know the batched RPC
/// (an older release) gets each call alone instead.
async fn send_coalesced<C: PointCall>(client: Arc<NodeClient>, batch: Vec<Waiter<C>>) {
    let now = tokio::time::Instant::now();
    let latest = batch.iter().map(|w| w.deadline).max().unwrap_or(now);
    let wait = latest.saturating_duration_since(now).max(Duration::from_millis(1));
    let budget = CallBudget { wait, suspect_after: client.storage_timeout().min(wait) };
    let mut payloads = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    for waiter in batch {
        let left = waiter.deadline.saturating_duration_since(now).max(Duration::from_millis(1));
        payloads.push((waiter.payload, left));
        waiters.push((waiter.reply, waiter.span, waiter.deadline));
    }
    let rpc_kind = C::batch_rpc(&payloads);
    let span = batch_span(rpc_kind, client.node, &waiters);
    let count = payloads.len();
    let (result, code) = {
        let send = send(&client, rpc_kind, budget, |c, _| C::call_batch(c, payloads));
        send.instrument(span.clone()).await
    };
    finish_span(&span, &result, code);
    if code == Some(tonic::Code::Unimplemented) {
        // Nothing ran (every call answers NOT_APPLIED and may go elsewhere); from now on this
        // node gets such calls alone.
        tracing::warn!(
            node_id = client.node.0,
            rpc = rpc_kind.method,
            "storage node predates this batched call"
        );
        C::lane(&client).stop_coalescing();
    }
    let answers = C::answers(client.node, result, count);
    for ((reply, _, _), answer) in waiters.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}
/// `server.address` / `server.port` of the current client span from a node's advertised address
/// (`host:port`, or a URL with a scheme).
fn record_server_address(address: &str) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let host_port = address.split_once("://").map_or(address, |(_, rest)| rest);
    if let Some((host, port)) = host_port.rsplit_once(':') {
        span.record("server.address", host);
        if let Ok(port) = port.parse::<u16>() {
            span.record("server.port", i64::from(port));
        }
    }
}

/// What an error answer of a storage node means for the call, updating the failure view.
fn answered<T>(client: &NodeClient, status: &tonic::Status, not_applied: CallError) -> Result<T, CallError> {
    if status.code() == tonic::Code::Unimplemented {
        // The node does not know the method (an older release): nothing ran, and it is healthy.
        return Err(not_applied);
    }
    match refusal_of(status) {
        Some(refusal) => Err(CallError::Refused(refusal)),
        // The node answered, only too busy to take the call (its listing slots stayed
        // full): nothing was done, and it is no reason to route point requests elsewhere.
        None if busy(status) => Err(not_applied),
        None => {
            client.record_failure();
            let definite = refused_before_applying(status) || never_connected(status);
            Err(CallError::Failed(if definite { FailureCause::NotApplied } else { FailureCause::Error }))
        }
    }
}

/// The service every storage call addresses (`rpc.service` of its span).
const STORAGE_SERVICE: &str = "pairdb.storage.v1.StorageService";

/// The storage RPC a call makes: its method, its span name (hinted replicates are named apart from
/// ordinary replication), and its index in [`crate::pool::TIMED_RPCS`] (its latency histogram).
#[derive(Debug, Clone, Copy)]
pub struct Rpc {
    method: &'static str,
    span_name: &'static str,
    timed: usize,
    hinted: bool,
}

impl Rpc {
    const COORDINATE_WRITE: Self =
        Self::plain("CoordinateWrite", "pairdb.storage.v1.StorageService/CoordinateWrite", 0);
    const COORDINATE_WRITE_BATCH: Self =
        Self::plain("CoordinateWriteBatch", "pairdb.storage.v1.StorageService/CoordinateWriteBatch", 1);
    const GET: Self = Self::plain("Get", "pairdb.storage.v1.StorageService/Get", 4);
    const CONFIRM_TOMBSTONE: Self =
        Self::plain("ConfirmTombstone", "pairdb.storage.v1.StorageService/ConfirmTombstone", 5);
    const LIST_RECORDS: Self = Self::plain("ListRecords", "pairdb.storage.v1.StorageService/ListRecords", 6);
    const GET_MANY: Self = Self::plain("GetMany", "pairdb.storage.v1.StorageService/GetMany", 7);

    const fn plain(method: &'static str, span_name: &'static str, timed: usize) -> Self {
        Self { method, span_name, timed, hinted: false }
    }

    const fn replicate(hinted: bool) -> Self {
        let span_name = match hinted {
            true => "pairdb.storage.v1.StorageService/Replicate (hint)",
            false => "pairdb.storage.v1.StorageService/Replicate",
        };
        Self { method: "Replicate", span_name, timed: 2, hinted }
    }

    const fn replicate_batch(hinted: bool) -> Self {
        let span_name = match hinted {
            true => "pairdb.storage.v1.StorageService/ReplicateBatch (hint)",
            false => "pairdb.storage.v1.StorageService/ReplicateBatch",
        };
        Self { method: "ReplicateBatch", span_name, timed: 3, hinted }
    }
}

/// The refusal in `status` when its reason is one another replica would give too: the request
/// itself is wrong.
fn refusal_of(status: &tonic::Status) -> Option<Refusal> {
    let reason = pairdb_service::errors::known_reason_of(status)?;
    let definitive = matches!(
        reason,
        Reason::TooManySiblings
            | Reason::ValueTooLarge
            | Reason::MalformedVersion
            | Reason::InvalidTenantId
            | Reason::InvalidKey
            | Reason::InvalidPartition
            | Reason::PartitionMismatch
            | Reason::TenantNotFound
            | Reason::InvalidListing
            | Reason::QuotaExceeded
            | Reason::PreconditionFailed
            // A touch whose context covers no live value on the coordinator: nothing applied.
            | Reason::KeyNotFound
    );
    if !definitive {
        return None;
    }
    let detail = pairdb_service::errors::detail_of(status);
    // A refused condition carries the replica's set (base64 of the set encoding).
    let current = detail
        .as_ref()
        .and_then(|d| d.metadata.get("version_set"))
        .and_then(|encoded| base64::engine::general_purpose::STANDARD.decode(encoded).ok())
        .and_then(|bytes| decode_version_set(&bytes).ok());
    let message = match detail {
        Some(detail) => detail.message,
        None => status.message().to_owned(),
    };
    Some(Refusal { reason, message, current })
}

/// Reasons a storage node gives only before it applied anything, so another replica may be asked.
/// (WRITE_PATH_POISONED is not one: the failed fsync may have left the write on disk.)
fn refused_before_applying(status: &tonic::Status) -> bool {
    matches!(
        pairdb_service::errors::known_reason_of(status),
        Some(Reason::NotReady | Reason::DiskFull | Reason::CoordinateDeadlinePassed)
    )
}

/// The node refused the call for lack of capacity before doing anything.
fn busy(status: &tonic::Status) -> bool {
    pairdb_service::errors::known_reason_of(status) == Some(Reason::Overloaded)
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

/// The wire form of a coordinate call (its apply deadline is set when it is sent).
fn coordinate_request(call: CoordinateCall) -> pb::CoordinateWriteRequest {
    pb::CoordinateWriteRequest {
        key: Some(call.key.into_wire()),
        context: call.context,
        value: call.value,
        timestamp_ms: call.timestamp_ms,
        max_siblings: call.max_siblings,
        supersede_local: call.supersede_local,
        apply_within_ms: 0,
        apply_before_unix_ms: 0,
        condition: pairdb_proto::convert::write_condition_to_wire(call.condition.as_ref().map(|c| c.0)),
        observed: call.condition.map(|c| c.1).unwrap_or_default(),
        expires_at_ms: call.expires_at_ms,
        touch: call.touch_over.is_some(),
        touch_over: call.touch_over.unwrap_or_default(),
    }
}

/// The wire form of a replicate call (0: no hint).
fn replicate_request(key: StorageKey, encoded: Vec<u8>, hint_for: Option<NodeId>) -> pb::ReplicateRequest {
    pb::ReplicateRequest {
        key: Some(key.into_wire()),
        version_set: encoded,
        hint_for_node_id: hint_for.map_or(0, |n| n.0),
    }
}

/// One result per item of a batched call: a failed call fails every item alike, and an answer
/// with another number of results than items is the node's error; otherwise `item` reads each.
fn per_item<R, T>(
    answer: Result<Vec<R>, CallError>,
    count: usize,
    item: impl Fn(R) -> Result<T, CallError>,
) -> Vec<Result<T, CallError>> {
    match answer {
        Ok(results) if results.len() == count => results.into_iter().map(item).collect(),
        Ok(_) => (0..count).map(|_| Err(CallError::Failed(FailureCause::Error))).collect(),
        Err(error) => (0..count).map(|_| Err(error.clone())).collect(),
    }
}

/// Tells the node how long the router waits for this write, on its monotonic clock and the wall
/// clock (it refuses to apply it afterwards).
fn set_apply_deadline(request: &mut pb::CoordinateWriteRequest, left: Duration) {
    let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
    request.apply_within_ms = u32::try_from(left_ms).unwrap_or(u32::MAX);
    request.apply_before_unix_ms = wall_clock_ms().saturating_add(left_ms);
}

/// A coordinator's answer, decoded (an undecodable set is the node's error, not the write's).
fn stored_set(node: NodeId, encoded: Vec<u8>) -> Result<StoredSet, CallError> {
    match decode_version_set(&encoded) {
        Ok(set) => Ok(StoredSet { set, encoded }),
        Err(error) => {
            tracing::error!(node_id = node.0, %error, "coordinator returned an undecodable set");
            Err(CallError::Failed(FailureCause::Error))
        }
    }
}

/// One item's refusal inside a batched answer, classified as the same refusal of a single call
/// would be (the node answered, so it is not suspected for it).
fn item_error(detail: pairdb_proto::common::v1::ErrorDetail) -> CallError {
    let reason = Reason::parse(&detail.reason).unwrap_or(Reason::Internal);
    let metadata: Vec<(&str, String)> =
        detail.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let status = pairdb_service::errors::status(reason, detail.message, &metadata);
    if let Some(refusal) = refusal_of(&status) {
        return CallError::Refused(refusal);
    }
    let definite = busy(&status) || refused_before_applying(&status);
    CallError::Failed(if definite { FailureCause::NotApplied } else { FailureCause::Error })
}

/// The client span of a coalesced batch: a child of its first call's span, linked to the others'.
fn batch_span(
    rpc_kind: Rpc,
    node: NodeId,
    waiters: &[(impl Sized, tracing::Span, tokio::time::Instant)],
) -> tracing::Span {
    let parent = waiters.first().map(|w| w.1.clone()).unwrap_or_else(tracing::Span::none);
    let span = parent.in_scope(|| call_span(rpc_kind, node, PartitionId(0)));
    if !span.is_disabled() {
        span.record("pairdb.batch_items", waiters.len() as i64);
        for waiter in waiters.iter().skip(1) {
            span.follows_from(&waiter.1);
        }
    }
    span
}

/// Coalesced `Get`s (`GetMany`).
#[derive(Debug)]
pub struct GetLane;

impl Coalesced for GetLane {
    type Payload = pb::GetRequest;
    type Output = Option<VersionSet>;

    fn lane(client: &NodeClient) -> &Lane<Self> {
        &client.lanes.get
    }

    fn weight(_: &pb::GetRequest) -> usize {
        0
    }

    fn send_batch(
        client: Arc<NodeClient>,
        batch: Vec<Waiter<Self>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        send_coalesced::<Self>(client, batch)
    }
}

impl PointCall for GetLane {
    type Single = pb::GetResponse;
    type Batch = pb::GetManyResponse;

    fn batch_rpc(_: &[(pb::GetRequest, Duration)]) -> Rpc {
        Rpc::GET_MANY
    }

    async fn call_alone(
        mut client: StorageClient,
        payload: pb::GetRequest,
        _: Duration,
    ) -> Result<tonic::Response<pb::GetResponse>, tonic::Status> {
        client.get(payload).await
    }

    async fn call_batch(
        mut client: StorageClient,
        payloads: Vec<(pb::GetRequest, Duration)>,
    ) -> Result<tonic::Response<pb::GetManyResponse>, tonic::Status> {
        client.get_many(pb::GetManyRequest { gets: payloads.into_iter().map(|p| p.0).collect() }).await
    }

    fn answer(node: NodeId, single: pb::GetResponse) -> Result<Option<VersionSet>, CallError> {
        found_set(node, single.found, &single.version_set)
    }

    fn answers(
        node: NodeId,
        batch: Result<pb::GetManyResponse, CallError>,
        count: usize,
    ) -> Vec<Result<Option<VersionSet>, CallError>> {
        per_item(batch.map(|b| b.results), count, |result| match result.error {
            Some(detail) => Err(item_error(detail)),
            None => found_set(node, result.found, &result.version_set),
        })
    }
}

/// A replica's answer to a read: its set, or `None` when it has none.
fn found_set(node: NodeId, found: bool, encoded: &[u8]) -> Result<Option<VersionSet>, CallError> {
    if !found {
        return Ok(None);
    }
    decode_version_set(encoded).map(Some).map_err(|error| {
        tracing::error!(node_id = node.0, %error, "replica returned an undecodable set");
        CallError::Failed(FailureCause::Error)
    })
}

/// Coalesced `CoordinateWrite`s (`CoordinateWriteBatch`): each write keeps its own apply deadline.
#[derive(Debug)]
pub struct CoordinateLane;

impl Coalesced for CoordinateLane {
    type Payload = pb::CoordinateWriteRequest;
    type Output = StoredSet;

    fn lane(client: &NodeClient) -> &Lane<Self> {
        &client.lanes.coordinate
    }

    fn weight(payload: &pb::CoordinateWriteRequest) -> usize {
        payload.value.as_ref().map_or(0, Vec::len) + payload.context.len() + payload.touch_over.len()
    }

    fn send_batch(
        client: Arc<NodeClient>,
        batch: Vec<Waiter<Self>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        send_coalesced::<Self>(client, batch)
    }
}

impl PointCall for CoordinateLane {
    type Single = pb::CoordinateWriteResponse;
    type Batch = pb::CoordinateWriteBatchResponse;

    fn batch_rpc(_: &[(pb::CoordinateWriteRequest, Duration)]) -> Rpc {
        Rpc::COORDINATE_WRITE_BATCH
    }

    async fn call_alone(
        mut client: StorageClient,
        mut payload: pb::CoordinateWriteRequest,
        left: Duration,
    ) -> Result<tonic::Response<pb::CoordinateWriteResponse>, tonic::Status> {
        set_apply_deadline(&mut payload, left);
        client.coordinate_write(payload).await
    }

    async fn call_batch(
        mut client: StorageClient,
        payloads: Vec<(pb::CoordinateWriteRequest, Duration)>,
    ) -> Result<tonic::Response<pb::CoordinateWriteBatchResponse>, tonic::Status> {
        let writes = payloads
            .into_iter()
            .map(|(mut write, left)| {
                set_apply_deadline(&mut write, left);
                write
            })
            .collect();
        client.coordinate_write_batch(pb::CoordinateWriteBatchRequest { writes }).await
    }

    fn answer(node: NodeId, single: pb::CoordinateWriteResponse) -> Result<StoredSet, CallError> {
        stored_set(node, single.version_set)
    }

    fn answers(
        node: NodeId,
        batch: Result<pb::CoordinateWriteBatchResponse, CallError>,
        count: usize,
    ) -> Vec<Result<StoredSet, CallError>> {
        per_item(batch.map(|b| b.results), count, |result| match result.error {
            Some(detail) => Err(item_error(detail)),
            None => stored_set(node, result.version_set),
        })
    }
}

/// Coalesced `Replicate`s and hints (`ReplicateBatch`).
#[derive(Debug)]
pub struct ReplicateLane;

impl Coalesced for ReplicateLane {
    type Payload = pb::ReplicateRequest;
    type Output = ();

    fn lane(client: &NodeClient) -> &Lane<Self> {
        &client.lanes.replicate
    }

    fn weight(payload: &pb::ReplicateRequest) -> usize {
        payload.version_set.len()
    }

    fn send_batch(
        client: Arc<NodeClient>,
        batch: Vec<Waiter<Self>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        send_coalesced::<Self>(client, batch)
    }
}

impl PointCall for ReplicateLane {
    type Single = pb::ReplicateResponse;
    type Batch = pb::ReplicateBatchResponse;

    fn batch_rpc(payloads: &[(pb::ReplicateRequest, Duration)]) -> Rpc {
        Rpc::replicate_batch(payloads.iter().any(|p| p.0.hint_for_node_id != 0))
    }

    async fn call_alone(
        mut client: StorageClient,
        payload: pb::ReplicateRequest,
        _: Duration,
    ) -> Result<tonic::Response<pb::ReplicateResponse>, tonic::Status> {
        client.replicate(payload).await
    }

    async fn call_batch(
        mut client: StorageClient,
        payloads: Vec<(pb::ReplicateRequest, Duration)>,
    ) -> Result<tonic::Response<pb::ReplicateBatchResponse>, tonic::Status> {
        client
            .replicate_batch(pb::ReplicateBatchRequest { items: payloads.into_iter().map(|p| p.0).collect() })
            .await
    }

    fn answer(_: NodeId, _: pb::ReplicateResponse) -> Result<(), CallError> {
        Ok(())
    }

    fn answers(
        _: NodeId,
        batch: Result<pb::ReplicateBatchResponse, CallError>,
        count: usize,
    ) -> Vec<Result<(), CallError>> {
        per_item(batch.map(|b| b.results), count, |result| match result.error {
            Some(detail) => Err(item_error(detail)),
            None => Ok(()),
        })
    }
}

/// The coalescing lanes of one storage node.
#[derive(Debug)]
pub struct Lanes {
    pub get: Lane<GetLane>,
    pub coordinate: Lane<CoordinateLane>,
    pub replicate: Lane<ReplicateLane>,
}

impl Lanes {
    /// Whether the node's write calls (coordinate or replicate) have had one out for at least
    /// `after`: the node is slow right now.
    pub fn writes_stalled(&self, now: tokio::time::Instant, after: Duration) -> bool {
        let stalled = |busy: Option<Duration>| busy.is_some_and(|busy| busy >= after);
        stalled(self.coordinate.busy_for(now)) || stalled(self.replicate.busy_for(now))
    }

    /// Lanes that let `leads` calls of each kind out alone before coalescing (0: never coalesce).
    pub fn new(leads: usize, node: NodeId) -> Self {
        Self {
            get: Lane::new(leads, node, "get"),
            coordinate: Lane::new(leads, node, "coordinate_write"),
            replicate: Lane::new(leads, node, "replicate"),
        }
    }
}
