//! The gRPC edge of the client KV API (`pairdb.kv.v1.KvService`): wire messages in, [`KvRouter`]
//! calls, wire messages or statuses out. Metrics per operation, consistency and status are recorded
//! here.

use std::time::Instant;

use futures::StreamExt;
use pairdb_core::dvv::VersionSet;
use pairdb_core::encoding::encode_context;
use pairdb_proto::common::v1::{Dot, VersionEntry};
use pairdb_proto::kv::v1 as pb;
use pairdb_proto::kv::v1::kv_service_server::KvService;
use tonic::{Request, Response, Status};

use crate::error::RouterError;
use crate::kv::{KvRouter, ReadOutcome, RequestOptions, WriteOutcome};

/// Largest GetMany.
pub const MAX_GET_MANY_KEYS: usize = 100;

#[derive(Debug, Clone)]
pub struct KvApi {
    router: KvRouter,
    get_many_concurrency: usize,
}

impl KvApi {
    pub fn new(router: KvRouter, get_many_concurrency: usize) -> Self {
        Self { router, get_many_concurrency }
    }
}

fn tenant_of(tenant_id: &str) -> Result<&str, Status> {
    if tenant_id.is_empty() {
        return Err(RouterError::invalid("INVALID_TENANT_ID", "tenant_id is required").into_status());
    }
    Ok(tenant_id)
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
        Ok(_) => "ok".to_owned(),
        Err(error) => error.reason(),
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
        context: encode_context(outcome.set.vector()),
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
        context: encode_context(outcome.set.vector()),
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

#[tonic::async_trait]
impl KvService for KvApi {
    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let options = write_options(&request.options);
        let idempotency_key = request.options.as_ref().map(|o| o.idempotency_key.clone()).unwrap_or_default();
        let tenant = tenant_of(&request.tenant_id)?;
        let result = self
            .router
            .write(tenant, &request.key, Some(request.value), &request.context, request.overwrite, options)
            .await;
        observe("put", &options, started, &result);
        let outcome = result.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::PutResponse { ack: Some(write_ack(&outcome, idempotency_key)) }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let options = read_options(request.options);
        let tenant = tenant_of(&request.tenant_id)?;
        let result = self.router.get(tenant, &request.key, options).await;
        observe("get", &options, started, &result);
        let outcome = result.map_err(RouterError::into_status)?;
        Ok(Response::new(get_response(&outcome)))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let options = write_options(&request.options);
        let idempotency_key = request.options.as_ref().map(|o| o.idempotency_key.clone()).unwrap_or_default();
        let tenant = tenant_of(&request.tenant_id)?;
        let result = self.router.write(tenant, &request.key, None, &request.context, true, options).await;
        observe("delete", &options, started, &result);
        let outcome = result.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::DeleteResponse { ack: Some(write_ack(&outcome, idempotency_key)) }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let options = read_options(request.options);
        let tenant = tenant_of(&request.tenant_id)?.to_owned();
        if request.keys.len() > MAX_GET_MANY_KEYS {
            return Err(RouterError::invalid(
                "INVALID_ARGUMENT",
                format!("at most {MAX_GET_MANY_KEYS} keys per GetMany, got {}", request.keys.len()),
            )
            .into_status());
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
        Ok(Response::new(pb::GetManyResponse { results }))
    }
}
