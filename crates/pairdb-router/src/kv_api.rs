//! The KV API behind both edges (gRPC in [`crate::grpc`], HTTP/JSON in [`crate::http`]): authenticate,
//! admit (rate limit), apply idempotency to keyed writes, call [`KvRouter`], record metrics. Requests and
//! replies are the `pairdb.kv.v1` messages, so the two edges differ only in their wire format.
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
use pairdb_core::dvv::VersionSet;
use pairdb_core::reason::{HasReason, Reason};
use pairdb_proto::common::v1::{Dot, VersionEntry};
use pairdb_proto::kv::v1 as pb;
use prost::Message;
use tracing::Instrument;

use crate::admission::{Admission, Client};
use crate::error::RouterError;
use crate::idempotency::{Begin, Fingerprint, IdempotencyStore};
use crate::kv::{KvRouter, ReadOutcome, RequestOptions, WriteOutcome};

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
        tracing::Span::current().record("tenant", tenant.as_str());
        Ok(tenant)
    }

    pub async fn put(&self, client: &Client, request: pb::PutRequest) -> Result<pb::WriteAck, RouterError> {
        let options = write_options(&request.options);
        traced("put", options, async {
            let tenant = self.admit(client, &request.tenant_id)?;
            let idempotency_key = idempotency_key(&request.options);
            // Only keyed writes need a fingerprint; the value then moves into the write uncopied.
            let fingerprint = (!idempotency_key.is_empty()).then(|| {
                Fingerprint::of(&[
                    b"put",
                    request.key.as_bytes(),
                    &request.value,
                    &request.context,
                    &[u8::from(request.overwrite)],
                    &options_bytes(&options),
                ])
            });
            let pb::PutRequest { key, value, context, overwrite, .. } = request;
            self.keyed(&tenant, &idempotency_key, fingerprint, || {
                self.router.write(&tenant, &key, Some(value), &context, overwrite, options)
            })
            .await
        })
        .await
    }

    pub async fn delete(
        &self,
        client: &Client,
        request: pb::DeleteRequest,
    ) -> Result<pb::WriteAck, RouterError> {
        let options = write_options(&request.options);
        traced("delete", options, async {
            let tenant = self.admit(client, &request.tenant_id)?;
            let idempotency_key = idempotency_key(&request.options);
            let fingerprint = (!idempotency_key.is_empty()).then(|| {
                Fingerprint::of(&[
                    b"delete",
                    request.key.as_bytes(),
                    &request.context,
                    &options_bytes(&options),
                ])
            });
            self.keyed(&tenant, &idempotency_key, fingerprint, || {
                self.router.write(&tenant, &request.key, None, &request.context, true, options)
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
    ) -> Result<pb::WriteAck, RouterError>
    where
        F: FnOnce() -> W,
        W: Future<Output = Result<WriteOutcome, RouterError>>,
    {
        let Some(fingerprint) = fingerprint else {
            let outcome = write().await?;
            return Ok(write_ack(&outcome, generated_key()));
        };
        if idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES || idempotency_key.chars().any(char::is_control)
        {
            return Err(RouterError::invalid(
                Reason::InvalidArgument,
                format!(
                    "idempotency key: at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes without control characters"
                ),
            ));
        }
        match self.idempotency.begin(tenant, idempotency_key, &fingerprint).await? {
            Begin::Completed(stored) => {
                let mut ack = pb::WriteAck::decode(stored.as_slice()).map_err(|error| {
                    RouterError::Idempotency(crate::idempotency::IdempotencyError::Unavailable(format!(
                        "stored reply unreadable: {error}"
                    )))
                })?;
                ack.duplicate = true;
                metrics::counter!("pairdb_router_idempotent_replays_total").increment(1);
                Ok(ack)
            }
            Begin::Reserved(reservation) => match write().await {
                Ok(outcome) => {
                    let ack = write_ack(&outcome, idempotency_key.to_owned());
                    if let Err(error) = self.idempotency.complete(reservation, &ack.encode_to_vec()).await {
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

    pub async fn get(
        &self,
        client: &Client,
        request: pb::GetRequest,
    ) -> Result<pb::GetResponse, RouterError> {
        let options = read_options(request.options);
        traced("get", options, async {
            let tenant = self.admit(client, &request.tenant_id)?;
            let outcome = self.router.get(&tenant, &request.key, options).await?;
            metrics::histogram!("pairdb_router_read_siblings").record(outcome.siblings.len() as f64);
            Ok(get_response(&outcome))
        })
        .await
    }

    pub async fn get_many(
        &self,
        client: &Client,
        request: pb::GetManyRequest,
    ) -> Result<pb::GetManyResponse, RouterError> {
        let started = Instant::now();
        let options = read_options(request.options);
        let tenant = match self.admit(client, &request.tenant_id) {
            Ok(tenant) => tenant,
            Err(error) => {
                metrics::counter!("pairdb_router_requests_total", "op" => "get_many", "consistency" => consistency_label(&options), "status" => error.reason().as_str())
                    .increment(1);
                return Err(error);
            }
        };
        if request.keys.len() > MAX_GET_MANY_KEYS {
            return Err(RouterError::invalid(
                Reason::InvalidArgument,
                format!("at most {MAX_GET_MANY_KEYS} keys per GetMany, got {}", request.keys.len()),
            ));
        }
        let results: Vec<pb::KeyResult> = futures::stream::iter(request.keys)
            .map(|key| {
                let (router, tenant) = (self.router.clone(), tenant.clone());
                async move {
                    match router.get(&tenant, &key, options).await {
                        Ok(outcome) => {
                            pb::KeyResult { key, result: Some(get_response(&outcome)), error: None }
                        }
                        Err(RouterError::KeyNotFound) => pb::KeyResult {
                            key,
                            result: Some(pb::GetResponse { found: false, ..Default::default() }),
                            error: None,
                        },
                        Err(error) => {
                            let status = error.into_status();
                            pb::KeyResult {
                                key,
                                result: None,
                                error: pairdb_service::errors::detail_of(&status),
                            }
                        }
                    }
                }
            })
            .buffered(self.get_many_concurrency)
            .collect()
            .await;
        observe::<()>("get_many", &options, started, &Ok(()));
        Ok(pb::GetManyResponse { results })
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
    let result = request.instrument(span.clone()).await;
    finish(&span, &result);
    observe(op, &options, started, &result);
    result
}

fn idempotency_key(options: &Option<pb::WriteOptions>) -> String {
    options.as_ref().map(|o| o.idempotency_key.clone()).unwrap_or_default()
}

/// The span of one client request: the parent of one span per replica call. Tenant, partition and
/// outcome are recorded as they become known; keys and values never are.
fn request_span(op: &'static str, options: &RequestOptions) -> tracing::Span {
    tracing::info_span!(
        "router.request",
        otel.name = format!("router.{op}"),
        tenant = tracing::field::Empty,
        partition = tracing::field::Empty,
        consistency = %consistency_label(options),
        outcome = tracing::field::Empty,
    )
}

fn finish<T>(span: &tracing::Span, result: &Result<T, RouterError>) {
    match result {
        Ok(_) => span.record("outcome", "ok"),
        Err(error) => span.record("outcome", error.reason().as_str()),
    };
}

/// A key naming a write sent without one (not recorded; see the module docs).
fn generated_key() -> String {
    format!("gen-{:032x}", rand::random::<u128>())
}

fn options_bytes(options: &RequestOptions) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(12);
    bytes.extend_from_slice(&options.consistency.to_le_bytes());
    bytes.extend_from_slice(&options.explicit.to_le_bytes());
    bytes.push(u8::from(options.strict_quorum));
    bytes
}

fn consistency_label(options: &RequestOptions) -> String {
    if options.explicit > 0 {
        return format!("n{}", options.explicit);
    }
    match pairdb_proto::common::v1::Consistency::try_from(options.consistency) {
        Ok(c) => c.as_str_name().trim_start_matches("CONSISTENCY_").to_ascii_lowercase(),
        Err(_) => "invalid".into(),
    }
}

fn observe<T>(op: &'static str, options: &RequestOptions, started: Instant, result: &Result<T, RouterError>) {
    let status = match result {
        Ok(_) => "ok",
        Err(error) => error.reason().as_str(),
    };
    let consistency = consistency_label(options);
    metrics::counter!("pairdb_router_requests_total", "op" => op, "consistency" => consistency.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("pairdb_router_request_duration_seconds", "op" => op, "consistency" => consistency)
        .record(started.elapsed().as_secs_f64());
}

pub fn vector_entries(set: &VersionSet) -> Vec<VersionEntry> {
    set.vector().entries().map(|(actor, counter)| VersionEntry { actor: actor.0, counter }).collect()
}

fn write_ack(outcome: &WriteOutcome, idempotency_key: String) -> pb::WriteAck {
    pb::WriteAck {
        context: outcome.context.clone(),
        version_vector: vector_entries(&outcome.set),
        acks: outcome.acks as u32,
        required: outcome.required as u32,
        hinted_acks: outcome.hinted_acks as u32,
        duplicate: false,
        idempotency_key,
    }
}

pub fn get_response(outcome: &ReadOutcome) -> pb::GetResponse {
    pb::GetResponse {
        found: true,
        siblings: outcome
            .siblings
            .iter()
            .map(|s| pb::Sibling {
                value: s.value.clone().unwrap_or_default(),
                dot: Some(Dot { actor: s.dot.actor.0, counter: s.dot.counter }),
                timestamp_ms: s.timestamp_ms,
            })
            .collect(),
        context: outcome.context.clone(),
        version_vector: vector_entries(&outcome.set),
        replicas: outcome
            .replicas
            .iter()
            .map(|(node, outcome)| pb::ReplicaAnswer { node_id: node.0, outcome: (*outcome).to_owned() })
            .collect(),
    }
}

fn read_options(options: Option<pb::ReadOptions>) -> RequestOptions {
    let options = options.unwrap_or_default();
    RequestOptions {
        consistency: options.consistency,
        explicit: options.r,
        strict_quorum: false,
        timeout_ms: options.timeout_ms,
    }
}

fn write_options(options: &Option<pb::WriteOptions>) -> RequestOptions {
    let options = options.clone().unwrap_or_default();
    RequestOptions {
        consistency: options.consistency,
        explicit: options.w,
        strict_quorum: options.strict_quorum,
        timeout_ms: options.timeout_ms,
    }
}
