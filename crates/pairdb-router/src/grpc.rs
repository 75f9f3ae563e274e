//! The gRPC edge of the client KV API (`pairdb.kv.v1.KvService`): takes the `authorization` metadata,
//! converts each message to the router's request types ([`crate::request`]) once, hands it to
//! [`KvApi`], and renders the reply or turns the error into a status (the one place for gRPC).

use pairdb_core::condition::WriteCondition;
use pairdb_core::dvv::VersionVector;
use pairdb_core::expiry::Requested;
use pairdb_core::reason::{HasReason, Reason};
use pairdb_proto::common::v1::{Dot, VersionEntry};
use pairdb_proto::kv::v1 as pb;
use pairdb_proto::kv::v1::kv_service_server::KvService;
use tonic::{Request, Response, Status};

use crate::admission::Client;
use crate::error::RouterError;
use crate::kv::ReadOutcome;
use crate::kv_api::KvApi;
use crate::listing::ListRequest;
use crate::request::{
    BatchItem, KeyRead, ReadManyRequest, ReadRequest, RequestOptions, WriteAck, WriteManyRequest,
    WriteRequest,
};

#[derive(Debug, Clone)]
pub struct GrpcKvApi {
    api: KvApi,
}

impl GrpcKvApi {
    pub fn new(api: KvApi) -> Self {
        Self { api }
    }

    /// The client the admission middleware let through (or, without it, the headers' identity).
    fn client<T>(&self, request: &Request<T>) -> Result<Client, Status> {
        if let Some(client) = request.extensions().get::<Client>() {
            return Ok(client.clone());
        }
        let authorization = request.metadata().get("authorization").and_then(|value| value.to_str().ok());
        self.api.identify(authorization).map_err(RouterError::into_status)
    }
}

#[tonic::async_trait]
impl KvService for GrpcKvApi {
    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let client = self.client(&request)?;
        let pb::ListKeysRequest { tenant_id, list } = request.into_inner();
        let request = list_request(tenant_id, list, 0).map_err(RouterError::into_status)?;
        let page = self.api.list(&client, request, false).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: page
                .entries
                .iter()
                .map(|entry| pb::ListedKey {
                    key: entry.key.clone(),
                    sibling_count: entry.siblings.len() as u32,
                    value_bytes: entry.value_bytes(),
                    tombstone: entry.is_tombstone(),
                    context: entry.context.clone(),
                })
                .collect(),
            next_page_token: page.next_page_token,
            unavailable_partitions: page.unavailable_partitions,
        }))
    }

    async fn scan(&self, request: Request<pb::ScanRequest>) -> Result<Response<pb::ScanResponse>, Status> {
        let client = self.client(&request)?;
        let pb::ScanRequest { tenant_id, list, max_bytes } = request.into_inner();
        let request = list_request(tenant_id, list, max_bytes).map_err(RouterError::into_status)?;
        let page = self.api.list(&client, request, true).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::ScanResponse {
            keys: page
                .entries
                .into_iter()
                .map(|entry| pb::ScannedKey {
                    tombstone: entry.is_tombstone(),
                    siblings: entry.siblings.iter().map(sibling).collect(),
                    version_vector: vector_entries(entry.set.vector()),
                    context: entry.context,
                    key: entry.key,
                })
                .collect(),
            next_page_token: page.next_page_token,
            unavailable_partitions: page.unavailable_partitions,
        }))
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let client = self.client(&request)?;
        let request = put_request(request.into_inner()).map_err(RouterError::into_status)?;
        let ack = self.api.write(&client, request).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::PutResponse { ack: Some(write_ack(ack)) }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let client = self.client(&request)?;
        let pb::GetRequest { tenant_id, key, options } = request.into_inner();
        let options = read_options(options).map_err(RouterError::into_status)?;
        let request = ReadRequest { tenant_id, key, options };
        let outcome = self.api.get(&client, request).await.map_err(RouterError::into_status)?;
        Ok(Response::new(get_response(&outcome)))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let client = self.client(&request)?;
        let request = delete_request(request.into_inner()).map_err(RouterError::into_status)?;
        let ack = self.api.write(&client, request).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::DeleteResponse { ack: Some(write_ack(ack)) }))
    }

    async fn touch(&self, request: Request<pb::TouchRequest>) -> Result<Response<pb::TouchResponse>, Status> {
        let client = self.client(&request)?;
        let request = touch_request(request.into_inner()).map_err(RouterError::into_status)?;
        let ack = self.api.write(&client, request).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::TouchResponse { ack: Some(write_ack(ack)) }))
    }

    async fn put_many(
        &self,
        request: Request<pb::PutManyRequest>,
    ) -> Result<Response<pb::WriteManyResponse>, Status> {
        let client = self.client(&request)?;
        let pb::PutManyRequest { tenant_id, items, options } = request.into_inner();
        let items = items
            .into_iter()
            .map(|item| {
                Ok(BatchItem {
                    condition: condition_of(item.condition)?,
                    expiry: Requested::from_wire(item.ttl_ms, item.expires_at_ms)
                        .map_err(|e| RouterError::from_reasoned(&e))?,
                    key: item.key,
                    value: Some(item.value),
                    context: item.context,
                    overwrite: item.overwrite,
                })
            })
            .collect::<Result<Vec<_>, RouterError>>()
            .map_err(RouterError::into_status)?;
        self.write_many(&client, tenant_id, items, options).await
    }

    async fn delete_many(
        &self,
        request: Request<pb::DeleteManyRequest>,
    ) -> Result<Response<pb::WriteManyResponse>, Status> {
        let client = self.client(&request)?;
        let pb::DeleteManyRequest { tenant_id, items, options } = request.into_inner();
        let items = items
            .into_iter()
            .map(|item| {
                Ok(BatchItem {
                    condition: condition_of(item.condition)?,
                    expiry: Requested::TenantDefault,
                    key: item.key,
                    value: None,
                    context: item.context,
                    overwrite: true,
                })
            })
            .collect::<Result<Vec<_>, RouterError>>()
            .map_err(RouterError::into_status)?;
        self.write_many(&client, tenant_id, items, options).await
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let client = self.client(&request)?;
        let pb::GetManyRequest { tenant_id, keys, options } = request.into_inner();
        let options = read_options(options).map_err(RouterError::into_status)?;
        let request = ReadManyRequest { tenant_id, keys, options };
        let reads = self.api.get_many(&client, request).await.map_err(RouterError::into_status)?;
        Ok(Response::new(pb::GetManyResponse { results: reads.into_iter().map(key_result).collect() }))
    }
}

impl GrpcKvApi {
    async fn write_many(
        &self,
        client: &Client,
        tenant_id: String,
        items: Vec<BatchItem>,
        options: Option<pb::WriteOptions>,
    ) -> Result<Response<pb::WriteManyResponse>, Status> {
        let (options, idempotency_key, condition) =
            write_options(options).map_err(RouterError::into_status)?;
        if condition.is_some() {
            let error = RouterError::invalid(Reason::InvalidArgument, "a batch's conditions are per item");
            return Err(error.into_status());
        }
        let keys: Vec<String> = items.iter().map(|i| i.key.clone()).collect();
        let request = WriteManyRequest { tenant_id, items, options, idempotency_key };
        let reply = self.api.write_many(client, request).await.map_err(RouterError::into_status)?;
        let results = keys
            .into_iter()
            .zip(reply.results)
            .map(|(key, result)| match result {
                Ok(ack) => pb::ItemResult { key, ack: Some(write_ack(ack)), error: None },
                Err(error) => pb::ItemResult { key, ack: None, error: Some(error_detail(&error)) },
            })
            .collect();
        Ok(Response::new(pb::WriteManyResponse {
            results,
            duplicate: reply.duplicate,
            idempotency_key: reply.idempotency_key,
        }))
    }
}

fn condition_of(wire: i32) -> Result<Option<WriteCondition>, RouterError> {
    pairdb_proto::convert::write_condition_from_wire(wire)
        .map_err(|unknown| RouterError::invalid(Reason::InvalidArgument, unknown.to_string()))
}

/// A level and an explicit count; with an explicit count the level is not read (it does not apply),
/// otherwise an unknown level is refused here (INVALID_CONSISTENCY).
fn request_options(
    consistency: i32,
    explicit: u32,
    strict_quorum: bool,
    timeout_ms: u32,
) -> Result<RequestOptions, RouterError> {
    let consistency = match explicit {
        0 => pairdb_proto::convert::consistency_from_wire(consistency)
            .map_err(|unknown| RouterError::invalid(Reason::InvalidConsistency, unknown.to_string()))?,
        _ => None,
    };
    Ok(RequestOptions { consistency, explicit, strict_quorum, timeout_ms })
}

fn read_options(options: Option<pb::ReadOptions>) -> Result<RequestOptions, RouterError> {
    let options = options.unwrap_or_default();
    request_options(options.consistency, options.r, false, options.timeout_ms)
}

/// A write's options: the request options, its idempotency key and its condition (an unknown
/// condition is refused, never ignored).
fn write_options(
    options: Option<pb::WriteOptions>,
) -> Result<(RequestOptions, String, Option<WriteCondition>), RouterError> {
    let options = options.unwrap_or_default();
    let request = request_options(options.consistency, options.w, options.strict_quorum, options.timeout_ms)?;
    let condition = pairdb_proto::convert::write_condition_from_wire(options.condition)
        .map_err(|unknown| RouterError::invalid(Reason::InvalidArgument, unknown.to_string()))?;
    Ok((request, options.idempotency_key, condition))
}

fn put_request(request: pb::PutRequest) -> Result<WriteRequest, RouterError> {
    let pb::PutRequest { tenant_id, key, value, context, overwrite, options, ttl_ms, expires_at_ms } =
        request;
    let (options, idempotency_key, condition) = write_options(options)?;
    let expiry = Requested::from_wire(ttl_ms, expires_at_ms).map_err(|e| RouterError::from_reasoned(&e))?;
    let value = Some(value);
    let touch = false;
    Ok(WriteRequest {
        tenant_id,
        key,
        value,
        context,
        overwrite,
        options,
        idempotency_key,
        condition,
        expiry,
        touch,
    })
}

fn delete_request(request: pb::DeleteRequest) -> Result<WriteRequest, RouterError> {
    let pb::DeleteRequest { tenant_id, key, context, options } = request;
    let (options, idempotency_key, condition) = write_options(options)?;
    let (overwrite, expiry, touch) = (true, Requested::TenantDefault, false);
    Ok(WriteRequest {
        tenant_id,
        key,
        value: None,
        context,
        overwrite,
        options,
        idempotency_key,
        condition,
        expiry,
        touch,
    })
}

fn touch_request(request: pb::TouchRequest) -> Result<WriteRequest, RouterError> {
    let pb::TouchRequest { tenant_id, key, context, ttl_ms, expires_at_ms, options } = request;
    let (options, idempotency_key, condition) = write_options(options)?;
    let expiry = Requested::from_wire(ttl_ms, expires_at_ms).map_err(|e| RouterError::from_reasoned(&e))?;
    let (value, overwrite, touch) = (None, false, true);
    Ok(WriteRequest {
        tenant_id,
        key,
        value,
        context,
        overwrite,
        options,
        idempotency_key,
        condition,
        expiry,
        touch,
    })
}

fn list_request(
    tenant_id: String,
    list: Option<pb::ListOptions>,
    max_bytes: u32,
) -> Result<ListRequest, RouterError> {
    let list = list.unwrap_or_default();
    Ok(ListRequest {
        tenant_id,
        options: read_options(list.read)?,
        prefix: list.prefix,
        start_after: list.start_after,
        end_before: list.end_before,
        limit: list.limit,
        page_token: list.page_token,
        group: list.group,
        reverse: list.reverse,
        include_tombstones: list.include_tombstones,
        conflicts_only: list.conflicts_only,
        allow_partial: list.allow_partial,
        max_bytes,
    })
}

fn sibling(s: &pairdb_core::dvv::Sibling) -> pb::Sibling {
    pb::Sibling {
        value: s.value.clone().unwrap_or_default(),
        dot: Some(Dot { actor: s.dot.actor.0, counter: s.dot.counter }),
        timestamp_ms: s.timestamp_ms,
        expires_at_ms: s.expires_at_ms.unwrap_or(0),
    }
}

pub fn vector_entries(vector: &VersionVector) -> Vec<VersionEntry> {
    vector.entries().map(|(actor, counter)| VersionEntry { actor: actor.0, counter }).collect()
}

pub fn write_ack(ack: WriteAck) -> pb::WriteAck {
    pb::WriteAck {
        version_vector: vector_entries(&ack.vector),
        context: ack.context,
        acks: ack.acks,
        required: ack.required,
        hinted_acks: ack.hinted_acks,
        duplicate: ack.duplicate,
        idempotency_key: ack.idempotency_key,
    }
}

pub fn get_response(outcome: &ReadOutcome) -> pb::GetResponse {
    pb::GetResponse {
        found: true,
        siblings: outcome.siblings.iter().map(sibling).collect(),
        context: outcome.context.clone(),
        version_vector: vector_entries(outcome.set.vector()),
        replicas: outcome
            .replicas
            .iter()
            .map(|(node, outcome)| pb::ReplicaAnswer { node_id: node.0, outcome: (*outcome).to_owned() })
            .collect(),
    }
}

fn key_result(read: KeyRead) -> pb::KeyResult {
    let KeyRead { key, result } = read;
    match result {
        Ok(Some(outcome)) => pb::KeyResult { key, result: Some(get_response(&outcome)), error: None },
        Ok(None) => pb::KeyResult {
            key,
            result: Some(pb::GetResponse { found: false, ..Default::default() }),
            error: None,
        },
        Err(error) => pb::KeyResult { key, result: None, error: Some(error_detail(&error)) },
    }
}

/// An error as the detail a batch or GetMany item carries (reason, message, metadata).
fn error_detail(error: &RouterError) -> pairdb_proto::common::v1::ErrorDetail {
    pairdb_proto::common::v1::ErrorDetail {
        reason: error.reason().as_str().to_owned(),
        message: error.to_string(),
        metadata: error.metadata().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}
