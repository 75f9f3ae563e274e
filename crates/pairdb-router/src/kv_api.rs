//! The KV API behind both edges (gRPC in [`crate::grpc`], HTTP/JSON in [`crate::http`]): authenticate,
//! admit (rate limit), apply idempotency to keyed writes, call [`KvRouter`], record metrics. Requests and
//! replies are the router's own types ([`crate::request`]); each edge converts its wire format once.
//!
//! Idempotency (DynamoDB's contract): a put or delete with an idempotency key first reserves
//! (tenant, key) with the request's fingerprint; a retry after completion gets the stored reply marked
//! `duplicate` (same context), the same key with a different request gets IDEMPOTENCY_KEY_CONFLICT, a
//! retry while the first attempt runs gets IDEMPOTENCY_IN_FLIGHT, and a failed attempt releases the key.
//! Writes without a key never touch the store (they go on while Redis is down) and are answered with
//! a generated key that only names the write: send your own key before the first attempt to make
//! retries safe.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use metrics::SharedString;
use pairdb_core::expiry::Requested;
use pairdb_core::reason::{HasReason, Reason};
use pairdb_core::validation::MAX_REPLICATION_FACTOR;
use tracing::Instrument;

use crate::admission::{Admission, Client};
use crate::error::RouterError;
use crate::idempotency::{Begin, Fingerprint, IdempotencyStore};
use crate::kv::{KvRouter, ReadOutcome, WriteOutcome, WriteSpec};
use crate::listing::{ListPage, ListRequest};
use crate::request::{
    BatchItem, KeyRead, ReadManyRequest, ReadRequest, RequestOptions, WriteAck, WriteManyRequest,
    WriteRequest,
};

/// Largest GetMany.
pub const MAX_GET_MANY_KEYS: usize = 100;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// The KV API with its edge policies. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KvApi {
    router: KvRouter,
    admission: Arc<Admission>,
    idempotency: IdempotencyStore,
    get_many_concurrency: usize,
}

impl KvApi {
    pub fn new(
        router: KvRouter,
        admission: Arc<Admission>,
        idempotency: IdempotencyStore,
        get_many_concurrency: usize,
    ) -> Self {
        Self { router, admission, idempotency, get_many_concurrency }
    }

    /// Who calls, from the `authorization` header: for callers that did not pass the edge's
    /// admission middleware ([`crate::admission::admit_client`]), which normally admits before the body
    /// is read.
    pub fn identify(&self, authorization: Option<&str>) -> Result<Client, RouterError> {
        Ok(self.admission.admit_headers(authorization)?.0)
    }

    /// The tenant of an admitted request.
    fn admit(&self, client: &Client, requested_tenant: &str) -> Result<String, RouterError> {
        let tenant = self.admission.tenant_of(client, requested_tenant)?;
        tracing::Span::current().record("pairdb.tenant", tenant.as_str());
        let label = SharedString::from_shared(Arc::from(tenant.as_str()));
        let _ = REQUEST_TENANT.try_with(|slot| slot.replace(Some(label)));
        Ok(tenant)
    }

    /// A put (`request.value` set) or a delete, under the idempotency contract when keyed.
    pub async fn write(&self, client: &Client, request: WriteRequest) -> Result<WriteAck, RouterError> {
        let options = request.options;
        traced(request.operation(), options, async {
            let tenant = self.admit(client, &request.tenant_id)?;
            let fingerprint = (!request.idempotency_key.is_empty()).then(|| fingerprint(&request));
            let WriteRequest {
                key,
                value,
                context,
                overwrite,
                idempotency_key,
                condition,
                expiry,
                touch,
                ..
            } = request;
            // A delete always supersedes what the key holds.
            let read_first = overwrite || (value.is_none() && !touch);
            self.keyed(&tenant, &idempotency_key, fingerprint, || {
                let spec = WriteSpec { value, context: &context, read_first, condition, expiry, touch };
                self.router.write(&tenant, &key, spec, options)
            })
            .await
        })
        .await
    }

    /// Runs `write` under the idempotency contract (see the module docs).
    async fn keyed<F, W>(
        &self,
        tenant: &str,
        idempotency_key: &str,
        fingerprint: Option<Fingerprint>,
        write: F,
    ) -> Result<WriteAck, RouterError>
    where
        F: FnOnce() -> W,
        W: Future<Output = Result<WriteOutcome, RouterError>>,
    {
        let Some(fingerprint) = fingerprint else {
            let outcome = write().await?;
            return Ok(write_ack(&outcome, generated_key()));
        };
        check_idempotency_key(idempotency_key)?;
        match self.idempotency.begin(tenant, idempotency_key, &fingerprint).await? {
            Begin::Completed(stored) => {
                let mut ack = crate::idempotency::decode_ack(&stored).map_err(RouterError::Idempotency)?;
                ack.duplicate = true;
                metrics::counter!("pairdb_router_idempotent_replays_total").increment(1);
                Ok(ack)
            }
            Begin::Reserved(reservation) => match write().await {
                Ok(outcome) => {
                    let ack = write_ack(&outcome, idempotency_key.to_owned());
                    if let Err(error) =
                        self.idempotency.complete(reservation, &crate::idempotency::encode_ack(&ack)).await
                    {
                        // The write is acknowledged; only its replay record is missing (a retry would
                        // add one more version, never lose one).
                        tracing::warn!(%error, "could not store the reply of an idempotent write");
                    }
                    Ok(ack)
                }
                Err(error) => {
                    if let Err(release_error) = self.idempotency.release(reservation).await {
                        tracing::warn!(error = %release_error, "could not release an idempotency key; its lease will expire");
                    }
                    Err(error)
                }
            },
        }
    }

    /// A PutMany / DeleteMany ([`crate::batch`]): one result per item, in order. With an
    /// idempotency key the whole batch is applied at most once: a retry gets the stored results
    /// (`duplicate`), a batch where every item failed releases the key.
    pub async fn write_many(
        &self,
        client: &Client,
        request: WriteManyRequest,
    ) -> Result<ManyReply, RouterError> {
        let options = request.options;
        let op = if request.items.iter().all(|i| i.value.is_none()) { "delete_many" } else { "put_many" };
        traced(op, options, async {
            let tenant = self.admit(client, &request.tenant_id)?;
            check_batch(&request.items)?;
            metrics::histogram!("pairdb_router_batch_items").record(request.items.len() as f64);
            if request.idempotency_key.is_empty() {
                let results = self.router.write_many(&tenant, request.items, options).await;
                return Ok(ManyReply::of(results, generated_key()));
            }
            check_idempotency_key(&request.idempotency_key)?;
            let fingerprint = batch_fingerprint(&request);
            match self.idempotency.begin(&tenant, &request.idempotency_key, &fingerprint).await? {
                Begin::Completed(stored) => {
                    let mut reply = ManyReply::decode(&stored)?;
                    reply.duplicate = true;
                    Ok(reply)
                }
                Begin::Reserved(reservation) => {
                    let results = self.router.write_many(&tenant, request.items, options).await;
                    let reply = ManyReply::of(results, request.idempotency_key.clone());
                    let outcome = match reply.results.iter().any(Result::is_ok) {
                        true => self.idempotency.complete(reservation, &reply.encode()).await,
                        false => self.idempotency.release(reservation).await,
                    };
                    if let Err(error) = outcome {
                        tracing::warn!(%error, "could not record the outcome of an idempotent batch");
                    }
                    Ok(reply)
                }
            }
        })
        .await
    }

    /// A get of one key.
    pub async fn get(&self, client: &Client, request: ReadRequest) -> Result<ReadOutcome, RouterError> {
        let options = request.options;
        traced("get", options, async {
            let tenant = self.admit(client, &request.tenant_id)?;
            let outcome = self.router.get(&tenant, &request.key, options).await?;
            metrics::histogram!("pairdb_router_read_siblings").record(outcome.siblings.len() as f64);
            Ok(outcome)
        })
        .await
    }

    /// One listing page (`with_values`: a Scan page), charged to the tenant's rate limit by the keys
    /// the storage nodes examined for it.
    pub async fn list(
        &self,
        client: &Client,
        request: ListRequest,
        with_values: bool,
    ) -> Result<ListPage, RouterError> {
        let options = request.options;
        let op = if with_values { "scan" } else { "list_keys" };
        traced(op, options, async {
            let tenant = self.admit(client, &request.tenant_id)?;
            let page = self.router.list(&tenant, request, with_values).await?;
            if let Ok(settings) = self.admission.settings(&tenant) {
                let units = page.examined / crate::admission::LISTING_KEYS_PER_OPERATION;
                self.admission.charge(&settings, u32::try_from(units).unwrap_or(u32::MAX));
            }
            metrics::counter!("pairdb_router_listed_keys_total", "op" => op)
                .increment(page.entries.len() as u64);
            Ok(page)
        })
        .await
    }

    /// Reads every key of `request` (at most [`MAX_GET_MANY_KEYS`]); each key succeeds or fails alone.
    pub async fn get_many(
        &self,
        client: &Client,
        request: ReadManyRequest,
    ) -> Result<Vec<KeyRead>, RouterError> {
        let started = Instant::now();
        let options = request.options;
        let tenant = match self.admit(client, &request.tenant_id) {
            Ok(tenant) => tenant,
            Err(error) => {
                let refused = Err::<(), _>(error);
                observe("get_many", SharedString::const_str(""), &options, started, &refused);
                return refused.map(|()| Vec::new());
            }
        };
        if request.keys.len() > MAX_GET_MANY_KEYS {
            return Err(RouterError::invalid(
                Reason::InvalidArgument,
                format!("at most {MAX_GET_MANY_KEYS} keys per GetMany, got {}", request.keys.len()),
            ));
        }
        let results: Vec<KeyRead> = futures::stream::iter(request.keys)
            .map(|key| {
                let (router, tenant) = (self.router.clone(), tenant.clone());
                async move {
                    let result = match router.get(&tenant, &key, options).await {
                        Ok(outcome) => Ok(Some(outcome)),
                        Err(RouterError::KeyNotFound | RouterError::NoLiveValue { .. }) => Ok(None),
                        Err(error) => Err(error),
                    };
                    KeyRead { key, result }
                }
            })
            .buffered(self.get_many_concurrency)
            .collect()
            .await;
        observe::<()>("get_many", SharedString::from_owned(tenant), &options, started, &Ok(()));
        Ok(results)
    }
}

/// Runs one request in its span (see [`request_span`]) and records its outcome and metrics.
async fn traced<T>(
    op: &'static str,
    options: RequestOptions,
    request: impl Future<Output = Result<T, RouterError>>,
) -> Result<T, RouterError> {
    let started = Instant::now();
    let span = request_span(op, &options);
    let (result, tenant) = REQUEST_TENANT
        .scope(std::cell::RefCell::new(None), async {
            let result = request.await;
            (result, REQUEST_TENANT.with(std::cell::RefCell::take))
        })
        .instrument(span.clone())
        .await;
    finish(&span, &result);
    observe(op, tenant.unwrap_or_else(|| SharedString::const_str("")), &options, started, &result);
    result
}

tokio::task_local! {
    /// The tenant a request was admitted for, once known: its metrics' `tenant` label.
    static REQUEST_TENANT: std::cell::RefCell<Option<SharedString>>;
}

/// The span of one client request: the parent of one span per replica call. Tenant, partition and
/// outcome are recorded as they become known; keys and values never are.
fn request_span(op: &'static str, options: &RequestOptions) -> tracing::Span {
    pairdb_service::telemetry::span_if_exporting(|| {
        tracing::info_span!(
            "router.request",
            otel.name = format!("router.{op}"),
            otel.status_description = tracing::field::Empty,
            pairdb.operation = op,
            pairdb.tenant = tracing::field::Empty,
            pairdb.partition = tracing::field::Empty,
            pairdb.consistency = %consistency_label(options),
            pairdb.outcome = tracing::field::Empty,
        )
    })
}

/// Records the outcome; a failure of the cluster (not of the caller's request: the gRPC codes the
/// semantic conventions count as server errors) sets the span's status to ERROR with its reason.
fn finish<T>(span: &tracing::Span, result: &Result<T, RouterError>) {
    let Err(error) = result else {
        span.record("pairdb.outcome", "ok");
        return;
    };
    let reason = error.reason();
    span.record("pairdb.outcome", reason.as_str());
    if is_server_error(pairdb_service::errors::grpc_code(reason)) {
        pairdb_service::telemetry::record_error(span, reason.as_str(), &error.to_string());
    }
}

fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code as C;
    matches!(
        code,
        C::Unknown | C::DeadlineExceeded | C::Unimplemented | C::Internal | C::Unavailable | C::DataLoss
    )
}

fn check_idempotency_key(idempotency_key: &str) -> Result<(), RouterError> {
    if idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES || idempotency_key.chars().any(char::is_control) {
        return Err(RouterError::invalid(
            Reason::InvalidArgument,
            format!("idempotency key: at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Refuses a batch above the limits before anything is written.
fn check_batch(items: &[BatchItem]) -> Result<(), RouterError> {
    use crate::batch::{MAX_BATCH_ITEMS, MAX_BATCH_VALUE_BYTES};
    let bytes: usize = items.iter().filter_map(|i| i.value.as_ref()).map(Vec::len).sum();
    if items.is_empty() {
        return Err(RouterError::invalid(Reason::InvalidArgument, "a batch needs at least one item"));
    }
    if items.len() > MAX_BATCH_ITEMS || bytes > MAX_BATCH_VALUE_BYTES {
        return Err(RouterError::invalid(
            Reason::BatchTooLarge,
            format!(
                "{} items with {bytes} value bytes: a batch holds at most {MAX_BATCH_ITEMS} items and \
                 {MAX_BATCH_VALUE_BYTES} value bytes; split it",
                items.len()
            ),
        ));
    }
    Ok(())
}

/// What makes two keyed batches the same request: every item and the options.
fn batch_fingerprint(request: &WriteManyRequest) -> Fingerprint {
    let options = options_bytes(&request.options);
    let mut parts: Vec<Vec<u8>> = vec![b"batch".to_vec(), options];
    for item in &request.items {
        parts.push(item.key.as_bytes().to_vec());
        parts.push(
            item.value.clone().map_or_else(|| b"delete".to_vec(), |v| [b"put:".as_slice(), &v].concat()),
        );
        parts.push(item.context.clone());
        parts.push(format!("{}|{:?}|{:?}", item.overwrite, item.condition, item.expiry).into_bytes());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Fingerprint::of(&refs)
}

/// A batch's answer: one result per item, in request order.
#[derive(Debug)]
pub struct ManyReply {
    pub results: Vec<Result<WriteAck, RouterError>>,
    pub duplicate: bool,
    pub idempotency_key: String,
}

impl ManyReply {
    fn of(results: Vec<Result<WriteOutcome, RouterError>>, idempotency_key: String) -> Self {
        let results =
            results.into_iter().map(|r| r.map(|o| write_ack(&o, idempotency_key.clone()))).collect();
        Self { results, duplicate: false, idempotency_key }
    }

    /// The stored form (a `WriteManyResponse`); errors keep their reason and message. The batch's
    /// idempotency key is stored once, not in every item's ack (up to 256 bytes times 1,000 items);
    /// [`ManyReply::decode`] puts it back, and still reads records that repeat it.
    fn encode(&self) -> Vec<u8> {
        use prost::Message;
        let stored_ack = |ack: &WriteAck| {
            debug_assert_eq!(ack.idempotency_key, self.idempotency_key, "a batch's items share its key");
            crate::grpc::write_ack(WriteAck { idempotency_key: String::new(), ..ack.clone() })
        };
        let results = self
            .results
            .iter()
            .map(|result| match result {
                Ok(ack) => pairdb_proto::kv::v1::ItemResult {
                    key: String::new(),
                    ack: Some(stored_ack(ack)),
                    error: None,
                },
                Err(error) => pairdb_proto::kv::v1::ItemResult {
                    key: String::new(),
                    ack: None,
                    error: Some(pairdb_proto::common::v1::ErrorDetail {
                        reason: error.reason().as_str().to_owned(),
                        message: error.to_string(),
                        metadata: error.metadata().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                    }),
                },
            })
            .collect();
        pairdb_proto::kv::v1::WriteManyResponse {
            results,
            duplicate: false,
            idempotency_key: self.idempotency_key.clone(),
        }
        .encode_to_vec()
    }

    fn decode(stored: &[u8]) -> Result<Self, RouterError> {
        use prost::Message;
        let unreadable =
            |e: String| RouterError::Idempotency(crate::idempotency::IdempotencyError::Unavailable(e));
        let response =
            pairdb_proto::kv::v1::WriteManyResponse::decode(stored).map_err(|e| unreadable(e.to_string()))?;
        let mut results = Vec::with_capacity(response.results.len());
        for item in response.results {
            results.push(match (item.ack, item.error) {
                (Some(mut ack), _) => {
                    if ack.idempotency_key.is_empty() {
                        ack.idempotency_key.clone_from(&response.idempotency_key);
                    }
                    Ok(crate::idempotency::decode_ack(&ack.encode_to_vec())
                        .map_err(RouterError::Idempotency)?)
                }
                (None, Some(error)) => Err(RouterError::invalid(
                    Reason::parse(&error.reason).unwrap_or(Reason::Internal),
                    error.message,
                )),
                (None, None) => Err(unreadable("stored batch item without a result".to_owned())),
            });
        }
        Ok(Self { results, duplicate: false, idempotency_key: response.idempotency_key })
    }
}

/// A key naming a write sent without one (not recorded; see the module docs).
fn generated_key() -> String {
    format!("gen-{:032x}", rand::random::<u128>())
}

/// What makes two keyed writes the same request (the stored fingerprint's layout is kept across
/// releases: levels are hashed as their wire values).
fn fingerprint(request: &WriteRequest) -> Fingerprint {
    let mut options = options_bytes(&request.options);
    // Appended only when set, so an unconditional write's fingerprint is the one earlier releases
    // stored.
    if let Some(condition) = request.condition {
        options.extend_from_slice(b"condition:");
        options.extend_from_slice(condition.as_str().as_bytes());
    }
    match request.expiry {
        Requested::TenantDefault => {}
        Requested::AfterMs(ttl_ms) => options.extend_from_slice(format!("ttl_ms:{ttl_ms}").as_bytes()),
        Requested::AtMs(at_ms) => options.extend_from_slice(format!("expires_at_ms:{at_ms}").as_bytes()),
    }
    if request.touch {
        return Fingerprint::of(&[b"touch", request.key.as_bytes(), &request.context, &options]);
    }
    match &request.value {
        Some(value) => Fingerprint::of(&[
            b"put",
            request.key.as_bytes(),
            value,
            &request.context,
            &[u8::from(request.overwrite)],
            &options,
        ]),
        None => Fingerprint::of(&[b"delete", request.key.as_bytes(), &request.context, &options]),
    }
}

fn options_bytes(options: &RequestOptions) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(12);
    bytes.extend_from_slice(&pairdb_proto::convert::consistency_to_wire(options.consistency).to_le_bytes());
    bytes.extend_from_slice(&options.explicit.to_le_bytes());
    bytes.push(u8::from(options.strict_quorum));
    bytes
}

/// The `consistency` label, one of a fixed set: an explicit R/W count above the largest replication
/// factor (refused with INVALID_CONSISTENCY) is `invalid`, so a caller cannot add a series per value.
fn consistency_label(options: &RequestOptions) -> SharedString {
    const EXPLICIT: [&str; MAX_REPLICATION_FACTOR] = ["n1", "n2", "n3", "n4", "n5", "n6", "n7"];
    if options.explicit > 0 {
        let label = usize::try_from(options.explicit - 1).ok().and_then(|index| EXPLICIT.get(index));
        return SharedString::const_str(label.copied().unwrap_or("invalid"));
    }
    match options.consistency {
        None => SharedString::const_str("unspecified"),
        Some(level) => SharedString::const_str(level.as_str()),
    }
}

/// Counts a request and its latency under its tenant (empty when it was refused before admission).
fn observe<T>(
    op: &'static str,
    tenant: SharedString,
    options: &RequestOptions,
    started: Instant,
    result: &Result<T, RouterError>,
) {
    let status = match result {
        Ok(_) => "ok",
        Err(error) => error.reason().as_str(),
    };
    let consistency = consistency_label(options);
    metrics::counter!("pairdb_router_requests_total", "op" => op, "consistency" => consistency.clone(), "status" => status, "tenant" => tenant.clone())
        .increment(1);
    metrics::histogram!("pairdb_router_request_duration_seconds", "op" => op, "consistency" => consistency, "tenant" => tenant)
        .record(started.elapsed().as_secs_f64());
}

fn write_ack(outcome: &WriteOutcome, idempotency_key: String) -> WriteAck {
    WriteAck {
        context: outcome.context.clone(),
        vector: outcome.set.vector().clone(),
        acks: outcome.acks as u32,
        required: outcome.required as u32,
        hinted_acks: outcome.hinted_acks as u32,
        duplicate: false,
        idempotency_key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric labels come from a fixed set whatever R or W a caller asks for.
    #[test]
    fn explicit_counts_label_within_a_fixed_set() {
        let label = |explicit| consistency_label(&RequestOptions { explicit, ..RequestOptions::default() });
        assert_eq!(label(1).as_ref(), "n1");
        assert_eq!(label(MAX_REPLICATION_FACTOR as u32).as_ref(), "n7");
        for refused in [MAX_REPLICATION_FACTOR as u32 + 1, 1_000, u32::MAX] {
            assert_eq!(label(refused).as_ref(), "invalid");
        }
        assert_eq!(label(0).as_ref(), "unspecified");
    }

    fn ack(key: &str, counter: u64) -> WriteAck {
        WriteAck {
            context: vec![7; 40],
            vector: pairdb_core::dvv::VersionVector::from_entries([(pairdb_core::dvv::Actor(9), counter)]),
            acks: 2,
            required: 2,
            hinted_acks: 0,
            duplicate: false,
            idempotency_key: key.to_owned(),
        }
    }

    /// A recorded batch holds its key once, replays every item with it, and records written by the
    /// previous release (the key in every item) still replay.
    #[test]
    fn a_recorded_batch_stores_its_key_once_and_replays_it_per_item() {
        let key = "k".repeat(256);
        let reply = ManyReply {
            results: (1..=1_000).map(|counter| Ok(ack(&key, counter))).collect(),
            duplicate: false,
            idempotency_key: key.clone(),
        };
        let stored = reply.encode();
        assert!(stored.len() < 100 * 1_000, "{} bytes for 1,000 acks", stored.len());
        let replayed = ManyReply::decode(&stored).expect("decode");
        assert_eq!(replayed.results.len(), 1_000);
        for (counter, result) in (1..=1_000).zip(&replayed.results) {
            let replayed = result.as_ref().expect("an ack");
            assert_eq!(replayed.idempotency_key, key);
            assert_eq!(replayed.vector, ack(&key, counter).vector);
        }

        use prost::Message;
        let previous_release = pairdb_proto::kv::v1::WriteManyResponse {
            results: vec![pairdb_proto::kv::v1::ItemResult {
                key: String::new(),
                ack: Some(
                    pairdb_proto::kv::v1::WriteAck::decode(
                        crate::idempotency::encode_ack(&ack("old", 1)).as_slice(),
                    )
                    .expect("ack"),
                ),
                error: None,
            }],
            duplicate: false,
            idempotency_key: "old".to_owned(),
        }
        .encode_to_vec();
        let replayed = ManyReply::decode(&previous_release).expect("decode");
        assert_eq!(replayed.results[0].as_ref().expect("an ack").idempotency_key, "old");
    }
}
