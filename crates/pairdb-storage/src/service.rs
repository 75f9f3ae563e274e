//! The internal gRPC API (`pairdb.storage.v1.StorageService`): the edge where wire messages become
//! engine calls and engine errors become statuses. Every engine call runs on the blocking pool, under
//! a bounded number of in-flight requests.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pairdb_core::condition::WriteCondition;
use pairdb_core::dvv::{VersionSet, VersionVector};
use pairdb_core::encoding::{decode_vector, decode_version_set, encode_version_set};
use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionId, placement_token};
use pairdb_core::validation::{
    ABSOLUTE_MAX_SIBLINGS, ABSOLUTE_MAX_VALUE_BYTES, validate_key, validate_tenant_id,
};
use pairdb_proto::storage::v1 as pb;
use pairdb_proto::storage::v1::storage_service_server::StorageService;
use pairdb_service::cluster_view::SharedView;
use pairdb_service::errors::{HasReason, Reason, internal_status as status};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::batch::{PreparedReplica, PreparedWrite};
use crate::engine::{
    ApplyDeadline, CoordinatedWrite, Engine, EngineError, QuotaGuard, RecordDigest, TombstonePlacement,
};
use crate::keys::RecordKey;
use crate::listing::ListingPacer;
use crate::merkle::MERKLE_DEPTH;
use crate::transfer;
use crate::workers::tombstone_gc::placement_holds;
use crate::workers::{Rebuild, RebuildProgress, RebuildState, Transfers};

/// Work a listing does between two looks at the node's pacer.
const LISTING_SLICE: Duration = Duration::from_millis(crate::listing::LISTING_SLICE_MS);

/// The gRPC service over one engine.
#[derive(Debug, Clone)]
pub struct StorageApi {
    engine: Arc<Engine>,
    inflight: Arc<Semaphore>,
    /// Listing calls running at once (their own work class, apart from `inflight`).
    listing: Arc<Semaphore>,
    /// Paces listings against point requests (those of [`StorageApi::blocking`]).
    pacer: Arc<ListingPacer>,
    stream_batch_max: usize,
    /// How this node calls its peers (migration pulls).
    clients: pairdb_service::clients::InternalClients,
    /// Tombstones younger than this are never purged, whatever a peer asks.
    tombstone_grace_ms: u64,
    /// Present when the node follows a cluster (a standalone node has nobody to rebuild from).
    rebuild: Option<Arc<Rebuild>>,
    /// Present when the node follows a cluster: where `SyncPartition` queues migration transfers.
    transfers: Option<Arc<Transfers>>,
    /// The cluster view the node follows (absent when standalone): full-ack tombstone confirmations
    /// are recorded only if they were placed in the topology and N this node sees; requests for a
    /// tenant being deleted, or of another generation of it, are refused; migration sources are
    /// looked up in it.
    view: Option<SharedView>,
}

impl StorageApi {
    pub fn new(engine: Arc<Engine>, max_inflight_requests: usize, stream_batch_max: usize) -> Self {
        Self {
            engine,
            inflight: Arc::new(Semaphore::new(max_inflight_requests)),
            listing: Arc::new(Semaphore::new(crate::listing::CONCURRENT_LISTINGS)),
            pacer: Arc::new(ListingPacer::new(100, LISTING_SLICE)),
            stream_batch_max,
            clients: pairdb_service::clients::InternalClients::insecure(),
            tombstone_grace_ms: u64::MAX,
            rebuild: None,
            transfers: None,
            view: None,
        }
    }

    /// Listings take at most `share_percent` of the node's time while point requests run.
    pub fn with_listing_share(mut self, share_percent: u8) -> Self {
        self.pacer = Arc::new(ListingPacer::new(share_percent, LISTING_SLICE));
        self
    }

    /// Checks `ConfirmTombstone` placements against the view the node follows.
    pub fn with_view(mut self, view: SharedView) -> Self {
        self.view = Some(view);
        self
    }

    /// Serves `StartRebuild` / `GetRebuildStatus` with the repair task's handle.
    pub fn with_rebuild(mut self, rebuild: Arc<Rebuild>) -> Self {
        self.rebuild = Some(rebuild);
        self
    }

    /// Serves `SyncPartition` through the transfer workers' queue.
    pub fn with_transfers(mut self, transfers: Arc<Transfers>) -> Self {
        self.transfers = Some(transfers);
        self
    }

    fn transfers(&self) -> Result<&Transfers, Status> {
        self.transfers.as_deref().ok_or_else(|| standalone("it takes part in no migration"))
    }

    fn rebuild(&self) -> Result<&Rebuild, Status> {
        self.rebuild.as_deref().ok_or_else(|| standalone("there are no replicas to rebuild from"))
    }

    /// Enables tombstone purges requested by anti-entropy peers, for tombstones older than `grace`.
    pub fn with_tombstone_grace(mut self, grace: Duration) -> Self {
        self.tombstone_grace_ms = grace.as_millis() as u64;
        self
    }

    /// Calls peers (migration pulls) with these clients (TLS, cluster credential).
    pub fn with_clients(mut self, clients: pairdb_service::clients::InternalClients) -> Self {
        self.clients = clients;
        self
    }

    /// Runs `op` on the blocking pool once an in-flight slot is free, recording metrics for `rpc`.
    async fn blocking<T: Send + 'static>(
        &self,
        rpc: &'static str,
        op: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let _permit = self
            .inflight
            .acquire()
            .await
            .map_err(|_| status(Reason::NotReady, "storage node is shutting down", &[]))?;
        let _foreground = self.pacer.foreground.begin();
        let result = on_engine(self.engine.clone(), op).await;
        record(rpc, started, &result);
        result
    }

    /// Checks a coordinate call (key, tenant, context, value size, condition) and turns it into
    /// the write the engine applies. The apply deadline counts from `received`.
    fn prepare_write(
        &self,
        request: pb::CoordinateWriteRequest,
        received: Instant,
    ) -> Result<PreparedWrite, Status> {
        let deadline = ApplyDeadline {
            monotonic: (request.apply_within_ms > 0)
                .then(|| received + Duration::from_millis(u64::from(request.apply_within_ms))),
            unix_ms: (request.apply_before_unix_ms > 0).then_some(request.apply_before_unix_ms),
        };
        let key = self.client_key(request.key)?;
        let context =
            decode_vector(&request.context).map_err(|e| status(e.reason(), format!("context: {e}"), &[]))?;
        if let Some(value) = &request.value
            && value.len() as u64 > ABSOLUTE_MAX_VALUE_BYTES
        {
            return Err(status(
                Reason::ValueTooLarge,
                format!("value is {} bytes, above {ABSOLUTE_MAX_VALUE_BYTES}", value.len()),
                &[],
            ));
        }
        let max_siblings = match request.max_siblings as usize {
            0 => None,
            n => Some(n.min(ABSOLUTE_MAX_SIBLINGS)),
        };
        let touch_over = match request.touch {
            true => Some(decode_set("coordinate_write", &request.touch_over)?),
            false => None,
        };
        let write = CoordinatedWrite {
            quota: self.quota_guard(&key.tenant),
            condition: write_condition(request.condition, &request.observed)?,
            context,
            value: request.value,
            timestamp_ms: request.timestamp_ms,
            max_siblings,
            supersede_local: request.supersede_local,
            expires_at_ms: request.expires_at_ms,
            touch_over,
        };
        Ok(PreparedWrite { key, write, deadline })
    }

    /// Checks a replicate call: the key and tenant, the set, and whether it is a hint for another
    /// node (0 on the wire, or this node: no hint).
    fn prepare_replica(&self, request: pb::ReplicateRequest) -> Result<PreparedReplica, Status> {
        let key = self.client_key(request.key)?;
        let set = decode_set("replicate", &request.version_set)?;
        let hint_for = NodeId(request.hint_for_node_id);
        let hint_for = (hint_for.0 != 0 && hint_for != self.engine.identity().node_id).then_some(hint_for);
        Ok(PreparedReplica { key, set, hint_for })
    }

    fn record_key(&self, key: Option<pb::KeyRef>) -> Result<RecordKey, Status> {
        let key = key.ok_or_else(|| status(Reason::InvalidArgument, "key is required", &[]))?;
        validate_tenant_id(&key.tenant_id).map_err(|e| status(e.reason(), e.to_string(), &[]))?;
        validate_key(key.key.as_bytes()).map_err(|e| status(e.reason(), e.to_string(), &[]))?;
        let record = RecordKey::from_wire(self.engine.partitions(), &key.tenant_id, &key.key, key.token)
            .map_err(|e| status(Reason::PartitionMismatch, e.to_string(), &[]))?;
        self.check_placement(&record)?;
        self.check_partition(key.partition)?;
        if record.partition.0 != key.partition {
            return Err(status(
                Reason::PartitionMismatch,
                format!("key belongs to partition {}, request named {}", record.partition, key.partition),
                &[],
            ));
        }
        Ok(record)
    }

    /// [`Self::record_key`] for a request a router sent on a client's behalf: also refused when the
    /// tenant is being deleted here or in the view, or when the router's view names another
    /// generation of the tenant than this node's (a re-created tenant never sees a predecessor's
    /// requests, nor a predecessor its data).
    fn client_key(&self, key: Option<pb::KeyRef>) -> Result<RecordKey, Status> {
        let generation = key.as_ref().map_or(0, |k| k.tenant_generation);
        let record = self.record_key(key)?;
        self.check_client_tenant(&record.tenant, generation)?;
        Ok(record)
    }

    /// Refuses a router's request for a tenant being deleted here or in the view, or naming another
    /// generation of it than this node's view.
    fn check_client_tenant(&self, tenant_id: &str, generation: u64) -> Result<(), Status> {
        let gone = |why: &str| status(Reason::TenantNotFound, format!("tenant {tenant_id:?} {why}"), &[]);
        if self.engine.is_refused(tenant_id) {
            return Err(gone("is being deleted"));
        }
        if let Some(view) = &self.view
            && let Some(tenant) = view.load().tenants.get(tenant_id)
        {
            if tenant.deleting {
                return Err(gone("is being deleted"));
            }
            if generation != 0 && tenant.generation != 0 && generation != tenant.generation {
                return Err(gone("was deleted and created again (the request names an older generation)"));
            }
        }
        Ok(())
    }

    /// Refuses a key placed by another rule than its tenant's (when the view knows the tenant): one
    /// (tenant, key) is only ever filed under one token here, so its index entry is unambiguous.
    fn check_placement(&self, record: &RecordKey) -> Result<(), Status> {
        let Some(view) = &self.view else { return Ok(()) };
        let Some(key_groups) = view.load().tenants.get(&record.tenant).map(|t| t.key_groups) else {
            return Ok(());
        };
        let expected = placement_token(&record.tenant, &record.key, key_groups);
        if expected != record.token {
            let message = format!(
                "token {:#018x} is not how tenant {:?} places this key",
                record.token.0, record.tenant
            );
            return Err(status(Reason::PartitionMismatch, message, &[]));
        }
        Ok(())
    }

    /// The tenant's reached quotas, as meta last flagged them in the view (none when standalone).
    fn quota_guard(&self, tenant_id: &str) -> QuotaGuard {
        let Some(view) = &self.view else { return QuotaGuard::default() };
        match view.load().tenants.get(tenant_id) {
            Some(tenant) => {
                QuotaGuard { keys_reached: tenant.over_key_quota, bytes_reached: tenant.over_byte_quota }
            }
            None => QuotaGuard::default(),
        }
    }

    fn check_partition(&self, partition: u32) -> Result<PartitionId, Status> {
        let partition = PartitionId(partition);
        if !self.engine.partitions().contains(partition) {
            return Err(status(
                Reason::InvalidPartition,
                format!("partition {partition} is outside the ring of {}", self.engine.partitions().get()),
                &[],
            ));
        }
        Ok(partition)
    }
}

impl StorageApi {
    /// The addresses of migration sources, from the topology this node follows: a peer is only ever
    /// contacted at the address meta lists for it, never at one a caller supplies.
    fn sync_sources(&self, sources: &[pb::SyncSource]) -> Result<Vec<transfer::Source>, Status> {
        let view = self.view.as_ref().ok_or_else(|| {
            status(
                Reason::NotInCluster,
                "this storage node runs standalone (no --meta-addr): it has no peers",
                &[],
            )
        })?;
        let view = view.load();
        let mut resolved = Vec::with_capacity(sources.len());
        for source in sources {
            let node = NodeId(source.node_id);
            match view.nodes.get(&node) {
                Some(entry) if !entry.address.is_empty() => {
                    resolved.push(transfer::Source { node_id: node, address: entry.address.clone() })
                }
                _ => {
                    return Err(status(
                        Reason::NodeNotFound,
                        format!("source node {} is not in this node's view of the cluster", source.node_id),
                        &[],
                    ));
                }
            }
        }
        Ok(resolved)
    }
}

/// Runs `op` on the blocking pool (runtime threads never wait on disk); its error as a status.
pub(crate) async fn on_engine<T: Send + 'static>(
    engine: Arc<Engine>,
    op: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, Status> {
    pairdb_service::task::spawn_blocking(move || op(&engine))
        .await
        .map_err(|error| status(Reason::Internal, format!("engine task failed: {error}"), &[]))?
        .map_err(engine_status)
}

pub(crate) fn engine_status(error: EngineError) -> Status {
    match &error {
        EngineError::Read(_) | EngineError::Corrupt(_) => tracing::error!(%error, "storage engine error"),
        EngineError::PreconditionFailed { current, .. } => {
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::STANDARD.encode(encode_version_set(current));
            return status(error.reason(), error.to_string(), &[("version_set", encoded)]);
        }
        _ => {}
    }
    status(error.reason(), error.to_string(), &[])
}

/// Bounds of one anti-entropy exchange, so a request never holds a whole partition in memory.
pub const MAX_LEAVES_PER_REQUEST: usize = 256;
pub const MAX_DIGESTS_PER_RESPONSE: usize = 50_000;

pub fn key_digest(digest: RecordDigest) -> pb::KeyDigest {
    pb::KeyDigest {
        token: digest.key.wire_token(),
        tenant_id: digest.key.tenant,
        key: digest.key.key,
        digest: digest.digest,
        tombstone_only: digest.tombstone_only,
        newest_timestamp_ms: digest.newest_timestamp_ms,
    }
}

/// A stored record as a wire message (its token included, so the receiver places it the same way).
pub fn wire_record(key: RecordKey, version_set: Vec<u8>) -> pb::Record {
    let token = key.wire_token();
    pb::Record { tenant_id: key.tenant, key: key.key, version_set, token }
}

/// The refusal of a request only a cluster member can serve.
fn standalone(consequence: &str) -> Status {
    let message = format!("this storage node runs standalone (no --meta-addr): {consequence}");
    status(Reason::NotInCluster, message, &[])
}

fn rebuild_status(progress: RebuildProgress) -> pb::RebuildStatus {
    let state = match progress.state {
        RebuildState::Idle => pb::RebuildState::Idle,
        RebuildState::Running => pb::RebuildState::Running,
        RebuildState::Done => pb::RebuildState::Done,
    };
    pb::RebuildStatus {
        state: state.into(),
        partitions_total: progress.partitions_total,
        partitions_done: progress.partitions_done,
        keys_compared: progress.keys_compared,
        keys_repaired: progress.keys_repaired,
        bytes: progress.bytes,
        failed_exchanges: progress.failed_exchanges,
        started_at_ms: progress.started_at_ms,
        finished_at_ms: progress.finished_at_ms,
    }
}

/// Decodes a version set sent by a peer or a router. The decoder validates every invariant and bound
/// (sorted unique dots covered by the vector, counters at most `MAX_COUNTER`, at most
/// `MAX_DECODED_ACTORS` actors), so what fails here is refused with a reason and never stored.
/// A coordinate call's condition and the vector the router's read observed (`None`: unconditional).
fn write_condition(wire: i32, observed: &[u8]) -> Result<Option<(WriteCondition, VersionVector)>, Status> {
    let condition = pairdb_proto::convert::write_condition_from_wire(wire)
        .map_err(|e| status(Reason::InvalidArgument, e.to_string(), &[]))?;
    let Some(condition) = condition else { return Ok(None) };
    let observed = decode_vector(observed).map_err(|e| status(e.reason(), format!("observed: {e}"), &[]))?;
    Ok(Some((condition, observed)))
}

fn decode_set(rpc: &'static str, bytes: &[u8]) -> Result<VersionSet, Status> {
    decode_version_set(bytes).map_err(|e| {
        metrics::counter!("pairdb_storage_invalid_sets_refused_total", "rpc" => rpc).increment(1);
        status(e.reason(), format!("version set: {e}"), &[])
    })
}

fn record<T>(rpc: &'static str, started: Instant, result: &Result<T, Status>) {
    let code = match result {
        Ok(_) => "ok",
        // The reason, as the router labels its requests (the code name when there is none).
        Err(status) => pairdb_service::errors::known_reason_of(status)
            .unwrap_or_else(|| pairdb_service::errors::reason_of_code(status.code()))
            .as_str(),
    };
    metrics::counter!("pairdb_storage_requests_total", "rpc" => rpc, "status" => code).increment(1);
    metrics::histogram!("pairdb_storage_request_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

#[tonic::async_trait]
impl StorageService for StorageApi {
    async fn list_records(
        &self,
        request: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<pb::ListRecordsResponse>, Status> {
        let request = request.into_inner();
        validate_tenant_id(&request.tenant_id).map_err(|e| status(e.reason(), e.to_string(), &[]))?;
        self.check_client_tenant(&request.tenant_id, request.tenant_generation)?;
        let started = Instant::now();
        let mut query = crate::listing::query(request, self.engine.partitions(), started)?;
        let budget = query.deadline.saturating_duration_since(started);
        // Listings have their own work class: a long scan never takes the point requests' slots.
        let _permit = match tokio::time::timeout(budget, self.listing.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => return Err(status(Reason::NotReady, "storage node is shutting down", &[])),
            Err(_waited) => return Err(status(Reason::Overloaded, "every listing slot stayed busy", &[])),
        };
        // The budget counts from when the listing may run, not from when it queued.
        query.deadline = Instant::now() + budget;
        let result = crate::listing::run(self.engine.clone(), query, &self.pacer).await;
        record("list_records", started, &result);
        Ok(Response::new(crate::listing::response(result?)))
    }

    async fn coordinate_write(
        &self,
        request: Request<pb::CoordinateWriteRequest>,
    ) -> Result<Response<pb::CoordinateWriteResponse>, Status> {
        // The budget counts from here, when the node read the request; the wall-clock deadline also
        // covers the time it waited before (see `ApplyDeadline`).
        let prepared = self.prepare_write(request.into_inner(), Instant::now())?;
        let set = self.blocking("coordinate_write", move |engine| prepared.apply(engine)).await?;
        Ok(Response::new(pb::CoordinateWriteResponse { version_set: encode_version_set(&set) }))
    }

    async fn coordinate_write_batch(
        &self,
        request: Request<pb::CoordinateWriteBatchRequest>,
    ) -> Result<Response<pb::CoordinateWriteBatchResponse>, Status> {
        let received = Instant::now();
        let writes = request.into_inner().writes;
        crate::batch::check_len(writes.len())?;
        let prepared: Vec<Result<PreparedWrite, Status>> =
            writes.into_iter().map(|write| self.prepare_write(write, received)).collect();
        let results = self
            .blocking("coordinate_write_batch", move |engine| crate::batch::coordinate(engine, prepared))
            .await?;
        Ok(Response::new(pb::CoordinateWriteBatchResponse { results }))
    }

    async fn replicate_batch(
        &self,
        request: Request<pb::ReplicateBatchRequest>,
    ) -> Result<Response<pb::ReplicateBatchResponse>, Status> {
        let items = request.into_inner().items;
        crate::batch::check_len(items.len())?;
        let prepared: Vec<Result<PreparedReplica, Status>> =
            items.into_iter().map(|item| self.prepare_replica(item)).collect();
        let results =
            self.blocking("replicate_batch", move |engine| crate::batch::replicate(engine, prepared)).await?;
        Ok(Response::new(pb::ReplicateBatchResponse { results }))
    }

    async fn replicate(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<pb::ReplicateResponse>, Status> {
        let prepared = self.prepare_replica(request.into_inner())?;
        let hinted = prepared.hint_for.is_some();
        self.blocking("replicate", move |engine| prepared.apply(engine)).await?;
        Ok(Response::new(pb::ReplicateResponse { hinted }))
    }

    async fn merge_batch(
        &self,
        request: Request<pb::MergeBatchRequest>,
    ) -> Result<Response<pb::MergeBatchResponse>, Status> {
        let request = request.into_inner();
        let partition = self.check_partition(request.partition)?;
        crate::batch::check_peer_len(request.records.len())?;
        let mut records = Vec::with_capacity(request.records.len());
        for record in request.records {
            let key = self.record_key(Some(pb::KeyRef {
                tenant_id: record.tenant_id,
                key: record.key,
                partition: partition.0,
                tenant_generation: 0,
                token: record.token,
            }))?;
            records.push((key, decode_set("merge_batch", &record.version_set)?));
        }
        let merged = records.len() as u32;
        let changed = self.blocking("merge_batch", move |engine| engine.merge_batch(&records)).await?;
        Ok(Response::new(pb::MergeBatchResponse { merged, changed: changed as u32 }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let key = self.client_key(request.into_inner().key)?;
        // A record in the record cache is answered here: a memory lookup, no blocking-pool hop.
        let started = Instant::now();
        let encoded = match self.engine.cached_encoded(&key) {
            Some(hit) => {
                record("get", started, &Ok::<_, Status>(()));
                Some(hit)
            }
            None => self.blocking("get", move |engine| engine.get_encoded(&key)).await?,
        };
        Ok(Response::new(match encoded {
            Some(version_set) => pb::GetResponse { found: true, version_set },
            None => pb::GetResponse { found: false, version_set: Vec::new() },
        }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let gets = request.into_inner().gets;
        crate::batch::check_len(gets.len())?;
        let keys: Vec<Result<RecordKey, Status>> =
            gets.into_iter().map(|get| self.client_key(get.key)).collect();
        // Records in the record cache are answered here; only the rest go to the blocking pool.
        let started = Instant::now();
        let (mut results, missing) = crate::batch::get_cached(&self.engine, keys);
        if missing.is_empty() {
            record("get_many", started, &Ok::<_, Status>(()));
        } else {
            let (positions, keys): (Vec<usize>, Vec<_>) = missing.into_iter().unzip();
            let read = self.blocking("get_many", move |engine| Ok(crate::batch::get(engine, keys))).await?;
            for (position, result) in positions.into_iter().zip(read) {
                results[position] = Some(result);
            }
        }
        debug_assert!(results.iter().all(Option::is_some), "every get is answered");
        Ok(Response::new(pb::GetManyResponse { results: results.into_iter().flatten().collect() }))
    }

    type StreamPartitionStream = ReceiverStream<Result<pb::PartitionBatch, Status>>;

    async fn stream_partition(
        &self,
        request: Request<pb::StreamPartitionRequest>,
    ) -> Result<Response<Self::StreamPartitionStream>, Status> {
        let request = request.into_inner();
        let partition = self.check_partition(request.partition)?;
        let batch_size = match request.batch_size as usize {
            0 => 256,
            n => n.min(self.stream_batch_max),
        };
        // Two batches in flight at most: the stream is paced by the receiver.
        let (sender, receiver) = mpsc::channel(2);
        let api = self.clone();
        let tenants: Arc<BTreeSet<String>> = Arc::new(request.tenant_ids.into_iter().collect());
        let mut cursor = request.cursor;
        pairdb_service::task::spawn(async move {
            loop {
                let (scan_cursor, scan_tenants) = (cursor.clone(), Arc::clone(&tenants));
                let batch = api
                    .blocking("stream_partition", move |engine| {
                        engine.scan_partition(partition, &scan_cursor, &scan_tenants, batch_size)
                    })
                    .await;
                let message = batch.map(|batch| {
                    cursor = batch.next_cursor.clone();
                    pb::PartitionBatch {
                        records: batch
                            .records
                            .into_iter()
                            .map(|(key, version_set)| wire_record(key, version_set))
                            .collect(),
                        next_cursor: batch.next_cursor,
                        done: batch.done,
                    }
                });
                let finished = message.as_ref().map_or(true, |b| b.done);
                if sender.send(message).await.is_err() || finished {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn merkle_summary(
        &self,
        request: Request<pb::MerkleSummaryRequest>,
    ) -> Result<Response<pb::MerkleSummaryResponse>, Status> {
        let request = request.into_inner();
        let partition = self.check_partition(request.partition)?;
        if request.level > MERKLE_DEPTH {
            return Err(status(
                Reason::InvalidArgument,
                format!("level must be at most {MERKLE_DEPTH}"),
                &[],
            ));
        }
        let level = request.level;
        // A level has 2^level nodes: more indexes than that name some node twice (and would make the
        // filter below, on a runtime thread, cost their number times the level's nodes).
        if request.node_indexes.len() > 1 << level {
            return Err(status(
                Reason::InvalidArgument,
                format!(
                    "level {level} has {} nodes; {} indexes asked for",
                    1u32 << level,
                    request.node_indexes.len()
                ),
                &[],
            ));
        }
        // In memory and cheap: no blocking-pool hop.
        let nodes = self.engine.merkle_level(partition, level);
        let wanted = request.node_indexes;
        Ok(Response::new(pb::MerkleSummaryResponse {
            partition: partition.0,
            level,
            depth: MERKLE_DEPTH,
            nodes: nodes
                .into_iter()
                .filter(|node| wanted.is_empty() || wanted.contains(&node.index))
                .map(|node| pb::MerkleNode {
                    index: node.index,
                    hash: node.hash.to_be_bytes().to_vec(),
                    keys: node.keys,
                })
                .collect(),
        }))
    }

    async fn leaf_digests(
        &self,
        request: Request<pb::LeafDigestsRequest>,
    ) -> Result<Response<pb::LeafDigestsResponse>, Status> {
        let request = request.into_inner();
        let partition = self.check_partition(request.partition)?;
        if request.leaves.iter().any(|&leaf| leaf >= 1 << MERKLE_DEPTH) {
            return Err(status(
                Reason::InvalidArgument,
                format!("leaves are below {}", 1 << MERKLE_DEPTH),
                &[],
            ));
        }
        if request.leaves.len() > MAX_LEAVES_PER_REQUEST {
            return Err(status(
                Reason::InvalidArgument,
                format!("at most {MAX_LEAVES_PER_REQUEST} leaves per request"),
                &[],
            ));
        }
        let leaves = request.leaves;
        let digests = self
            .blocking("leaf_digests", move |engine| {
                engine.leaf_digests(partition, &leaves, MAX_DIGESTS_PER_RESPONSE)
            })
            .await?;
        Ok(Response::new(pb::LeafDigestsResponse { digests: digests.into_iter().map(key_digest).collect() }))
    }

    async fn get_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::GetBatchResponse>, Status> {
        let request = request.into_inner();
        let partition = self.check_partition(request.partition)?;
        if request.keys.len() > self.stream_batch_max {
            return Err(status(
                Reason::InvalidArgument,
                format!("at most {} keys per request", self.stream_batch_max),
                &[],
            ));
        }
        let mut keys = Vec::with_capacity(request.keys.len());
        for mut key in request.keys {
            key.partition = partition.0;
            keys.push(self.record_key(Some(key))?);
        }
        let records = self.blocking("get_batch", move |engine| engine.get_batch(&keys)).await?;
        Ok(Response::new(pb::GetBatchResponse {
            records: records.into_iter().map(|(key, version_set)| wire_record(key, version_set)).collect(),
        }))
    }

    async fn purge_tombstones(
        &self,
        request: Request<pb::PurgeTombstonesRequest>,
    ) -> Result<Response<pb::PurgeTombstonesResponse>, Status> {
        let request = request.into_inner();
        let partition = self.check_partition(request.partition)?;
        crate::batch::check_peer_len(request.keys.len())?;
        let mut candidates = Vec::with_capacity(request.keys.len());
        for entry in request.keys {
            let key = self.record_key(Some(pb::KeyRef {
                tenant_id: entry.tenant_id,
                key: entry.key,
                partition: partition.0,
                tenant_generation: 0,
                token: entry.token,
            }))?;
            candidates.push((key, entry.digest));
        }
        let written_before_ms = crate::engine::now_ms().saturating_sub(self.tombstone_grace_ms);
        let purged = self
            .blocking("purge_tombstones", move |engine| {
                engine.purge_tombstones(&candidates, written_before_ms)
            })
            .await?;
        if purged > 0 {
            metrics::counter!("pairdb_storage_tombstones_purged_total", "path" => "anti_entropy")
                .increment(purged);
        }
        Ok(Response::new(pb::PurgeTombstonesResponse { purged }))
    }

    async fn confirm_tombstone(
        &self,
        request: Request<pb::ConfirmTombstoneRequest>,
    ) -> Result<Response<pb::ConfirmTombstoneResponse>, Status> {
        let request = request.into_inner();
        let key = self.client_key(request.key)?;
        let set = decode_set("confirm_tombstone", &request.version_set)?;
        if !set.is_deleted() {
            return Err(status(Reason::InvalidArgument, "version_set must hold only tombstones", &[]));
        }
        let placement = TombstonePlacement {
            topology_epoch: request.topology_epoch,
            replication_factor: request.replication_factor,
        };
        // A standalone node, or one whose view differs from the router's, keeps the tombstone for
        // anti-entropy to confirm.
        let placed_here =
            self.view.as_ref().is_some_and(|view| placement_holds(&view.load(), &key.tenant, placement));
        let recorded = placed_here
            && self
                .blocking("confirm_tombstone", move |engine| engine.confirm_tombstone(&key, &set, placement))
                .await?;
        Ok(Response::new(pb::ConfirmTombstoneResponse { recorded }))
    }

    async fn sync_partition(
        &self,
        request: Request<pb::SyncPartitionRequest>,
    ) -> Result<Response<pb::SyncPartitionResponse>, Status> {
        let request = request.into_inner();
        let partition = self.check_partition(request.partition)?;
        if request.tenant_ids.is_empty() {
            return Err(status(Reason::InvalidArgument, "tenant_ids must name the tenants to copy", &[]));
        }
        if request.sources.is_empty() {
            return Err(status(Reason::InvalidArgument, "sources must name at least one node", &[]));
        }
        let sources = self.sync_sources(&request.sources)?;
        let batch_size = match request.batch_size as usize {
            0 => 512,
            n => n.min(self.stream_batch_max),
        };
        let report =
            self.transfers()?.run(partition, request.tenant_ids, sources, batch_size).await.map_err(
                |error| {
                    tracing::warn!(%partition, %error, "partition transfer failed");
                    status(error.reason(), error.to_string(), &[])
                },
            )?;
        Ok(Response::new(pb::SyncPartitionResponse {
            keys: report.keys,
            bytes: report.bytes,
            source_node_id: report.source_node_id.map_or(0, |node| node.0),
        }))
    }

    async fn list_hints(
        &self,
        request: Request<pb::ListHintsRequest>,
    ) -> Result<Response<pb::ListHintsResponse>, Status> {
        let request = request.into_inner();
        let partition = request.partition.map(|p| self.check_partition(p)).transpose()?;
        let limit = match request.limit as usize {
            0 => 1000,
            n => n.min(10_000),
        };
        let target = NodeId(request.target_node_id);
        let (hints, total_pending) = self
            .blocking("list_hints", move |engine| {
                Ok((engine.list_hints(target, partition, limit)?, engine.count_hints(target)))
            })
            .await?;
        Ok(Response::new(pb::ListHintsResponse {
            hints: hints
                .into_iter()
                .map(|hint| pb::Hint {
                    token: hint.key.wire_token(),
                    target_node_id: hint.target_node.0,
                    partition: hint.key.partition.0,
                    tenant_id: hint.key.tenant,
                    key: hint.key.key,
                    version_set: encode_version_set(&hint.set),
                    stored_at_ms: hint.stored_at_ms,
                })
                .collect(),
            total_pending,
        }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let (stats, live_value_bytes) =
            self.blocking("stats", |engine| Ok((engine.stats(), engine.live_value_bytes()))).await?;
        let identity = self.engine.identity();
        Ok(Response::new(pb::StatsResponse {
            node_id: identity.node_id.0,
            actor: identity.actor.0,
            keys: stats.keys,
            // The old name of disk_bytes, for callers older than it.
            live_bytes: stats.disk_bytes,
            disk_bytes: stats.disk_bytes,
            live_value_bytes,
            disk_free_bytes: stats.disk_free_bytes,
            hints_pending: stats.hints_pending,
            write_path_poisoned: stats.poisoned,
            data_format_version: identity.format_version,
            quarantined_records: stats.quarantined_records,
        }))
    }

    async fn start_rebuild(
        &self,
        _request: Request<pb::StartRebuildRequest>,
    ) -> Result<Response<pb::RebuildStatus>, Status> {
        let progress = self.rebuild()?.start();
        Ok(Response::new(rebuild_status(progress)))
    }

    async fn get_rebuild_status(
        &self,
        _request: Request<pb::GetRebuildStatusRequest>,
    ) -> Result<Response<pb::RebuildStatus>, Status> {
        Ok(Response::new(rebuild_status(self.rebuild()?.progress())))
    }
}
