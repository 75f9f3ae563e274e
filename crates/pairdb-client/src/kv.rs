//! The key-value client. Values are bytes; the causal context is opaque bytes to pass back on the next
//! write of the same key (a write without one adds a sibling, it never destroys a concurrent value).

use std::time::Duration;

pub use pairdb_core::condition::WriteCondition;
use pairdb_proto::common::v1 as common;
use pairdb_proto::kv::v1 as pb;
use pairdb_proto::kv::v1::kv_service_client::KvServiceClient;
use pairdb_proto::status::Reason;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::retry::with_retries;
use crate::{BearerToken, ClientError, ClientOptions, RetryPolicy, connect_with};

/// Consistency level of one request; `TenantDefault` uses the tenant's setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    #[default]
    TenantDefault,
    One,
    Quorum,
    All,
}

impl Consistency {
    pub(crate) fn to_proto(self) -> i32 {
        use pairdb_core::quorum::Consistency as Level;
        pairdb_proto::convert::consistency_to_wire(match self {
            Consistency::TenantDefault => None,
            Consistency::One => Some(Level::One),
            Consistency::Quorum => Some(Level::Quorum),
            Consistency::All => Some(Level::All),
        })
    }
}

/// Options of a put or delete.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub consistency: Consistency,
    /// Explicit W; overrides `consistency`.
    pub w: Option<u32>,
    /// Context of an earlier read or write of this key; empty for a blind write.
    pub context: Vec<u8>,
    /// Read first and supersede everything that read saw.
    pub overwrite: bool,
    /// At-most-once key; with one the write may be retried safely.
    pub idempotency_key: Option<String>,
    /// Deadline of this request (the client's default otherwise).
    pub timeout: Option<Duration>,
    /// Write only if this holds; otherwise the error's reason is PRECONDITION_FAILED and
    /// [`ClientError::current_state`] gives the key as the router found it.
    pub condition: Option<WriteCondition>,
    /// The value expires this long after the router receives the put (`None`: the tenant's
    /// default, which may be never). A touch's new expiry.
    pub ttl: Option<Duration>,
    /// The value expires at this wall-clock time (ms since the Unix epoch); instead of `ttl`.
    pub expires_at_ms: Option<u64>,
}

/// One put of a [`KvClient::put_many`].
#[derive(Debug, Clone, Default)]
pub struct PutManyItem {
    pub key: String,
    pub value: Vec<u8>,
    /// Context of an earlier read or write of this key; empty for a blind write.
    pub context: Vec<u8>,
    pub overwrite: bool,
    pub condition: Option<WriteCondition>,
    pub ttl: Option<Duration>,
    pub expires_at_ms: Option<u64>,
}

/// One delete of a [`KvClient::delete_many`].
#[derive(Debug, Clone, Default)]
pub struct DeleteManyItem {
    pub key: String,
    /// Empty: delete what a read at the batch's consistency sees.
    pub context: Vec<u8>,
    pub condition: Option<WriteCondition>,
}

/// A batch's answer: one result per item, in order (an item's error is the one a single write
/// would give), and whether it was replayed for the batch's idempotency key.
#[derive(Debug)]
pub struct WriteManyResult {
    pub results: Vec<Result<WriteResult, ClientError>>,
    pub duplicate: bool,
    pub idempotency_key: String,
}

/// Options of a get.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub consistency: Consistency,
    /// Explicit R; overrides `consistency`.
    pub r: Option<u32>,
    pub timeout: Option<Duration>,
}

/// Outcome of an acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResult {
    pub context: Vec<u8>,
    /// (actor, counter) pairs of the resulting version vector.
    pub version_vector: Vec<(u64, u64)>,
    pub acks: u32,
    pub required: u32,
    pub hinted_acks: u32,
    /// True when the router returned the stored outcome of an earlier request with this key.
    pub duplicate: bool,
    pub idempotency_key: String,
}

/// One live value of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    pub value: Vec<u8>,
    /// Write time at the coordinating replica, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The (actor, counter) dot that wrote it.
    pub dot: Option<(u64, u64)>,
    /// When it expires (ms since the Unix epoch); `None`: never.
    pub expires_at_ms: Option<u64>,
}

/// A found key: every live sibling and the context to write back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    pub siblings: Vec<Sibling>,
    pub context: Vec<u8>,
    pub version_vector: Vec<(u64, u64)>,
}

impl ReadResult {
    /// The value when there is exactly one sibling.
    pub fn single_value(&self) -> Option<&[u8]> {
        match self.siblings.as_slice() {
            [only] => Some(&only.value),
            _ => None,
        }
    }
}

type Inner = KvServiceClient<InterceptedService<Channel, BearerToken>>;

/// Client of a router's KV API. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct KvClient {
    pub(crate) inner: Inner,
    pub(crate) tenant_id: String,
    pub(crate) request_timeout: Duration,
    pub(crate) retry: RetryPolicy,
}

impl KvClient {
    /// Connects to the router at `address`. `tenant_id` may be empty when the API key names the tenant.
    pub async fn connect(
        address: &str,
        tenant_id: &str,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let channel = connect_with(address, &options).await?;
        Self::from_channel(channel, tenant_id, options)
    }

    /// A client over an existing channel.
    pub fn from_channel(
        channel: Channel,
        tenant_id: &str,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let auth = BearerToken::new(options.token.as_deref())?;
        Ok(Self {
            inner: KvServiceClient::with_interceptor(channel, auth),
            tenant_id: tenant_id.to_owned(),
            request_timeout: options.request_timeout,
            retry: options.retry,
        })
    }

    /// Stores `value` under `key`.
    pub async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        options: WriteOptions,
    ) -> Result<WriteResult, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let request = pb::PutRequest {
            tenant_id: self.tenant_id.clone(),
            key: key.to_owned(),
            value,
            context: options.context.clone(),
            overwrite: options.overwrite,
            options: Some(write_options(&options, timeout)),
            ttl_ms: wire_ttl_ms(options.ttl),
            expires_at_ms: options.expires_at_ms.unwrap_or(0),
        };
        let safe = options.idempotency_key.is_some();
        with_retries(self.retry, safe, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.put(request).await?.into_inner().ack.unwrap_or_default()) }
        })
        .await
        .map(write_result)
    }

    /// Deletes `key` (a tombstone superseding `options.context`, or what a read sees without one).
    pub async fn delete(&self, key: &str, options: WriteOptions) -> Result<WriteResult, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let request = pb::DeleteRequest {
            tenant_id: self.tenant_id.clone(),
            key: key.to_owned(),
            context: options.context.clone(),
            options: Some(write_options(&options, timeout)),
        };
        let safe = options.idempotency_key.is_some();
        with_retries(self.retry, safe, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.delete(request).await?.into_inner().ack.unwrap_or_default()) }
        })
        .await
        .map(write_result)
    }

    /// Gives the values `context` names (a read's or write's context) the expiry of `options.ttl`
    /// or `options.expires_at_ms` (neither: the tenant's default) without sending them again.
    /// KEY_NOT_FOUND when none of them is live any more.
    pub async fn touch(
        &self,
        key: &str,
        context: Vec<u8>,
        options: WriteOptions,
    ) -> Result<WriteResult, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let request = pb::TouchRequest {
            tenant_id: self.tenant_id.clone(),
            key: key.to_owned(),
            context,
            ttl_ms: wire_ttl_ms(options.ttl),
            expires_at_ms: options.expires_at_ms.unwrap_or(0),
            options: Some(write_options(&options, timeout)),
        };
        let safe = options.idempotency_key.is_some();
        with_retries(self.retry, safe, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.touch(request).await?.into_inner().ack.unwrap_or_default()) }
        })
        .await
        .map(write_result)
    }

    /// Up to 1,000 puts (4 MiB of values) in one call; `options` gives the batch's consistency, W,
    /// timeout and idempotency key (its `condition`, `ttl` and `context` are per item here).
    pub async fn put_many(
        &self,
        items: Vec<PutManyItem>,
        options: WriteOptions,
    ) -> Result<WriteManyResult, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let items = items
            .into_iter()
            .map(|item| pb::PutItem {
                ttl_ms: wire_ttl_ms(item.ttl),
                expires_at_ms: item.expires_at_ms.unwrap_or(0),
                condition: pairdb_proto::convert::write_condition_to_wire(item.condition),
                key: item.key,
                value: item.value,
                context: item.context,
                overwrite: item.overwrite,
            })
            .collect();
        let batch_options = WriteOptions { condition: None, ..options.clone() };
        let request = pb::PutManyRequest {
            tenant_id: self.tenant_id.clone(),
            items,
            options: Some(write_options(&batch_options, timeout)),
        };
        let safe = options.idempotency_key.is_some();
        with_retries(self.retry, safe, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.put_many(request).await?.into_inner()) }
        })
        .await
        .map(write_many_result)
    }

    /// Up to 1,000 deletes in one call, as [`Self::put_many`].
    pub async fn delete_many(
        &self,
        items: Vec<DeleteManyItem>,
        options: WriteOptions,
    ) -> Result<WriteManyResult, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let items = items
            .into_iter()
            .map(|item| pb::DeleteItem {
                condition: pairdb_proto::convert::write_condition_to_wire(item.condition),
                key: item.key,
                context: item.context,
            })
            .collect();
        let batch_options = WriteOptions { condition: None, ..options.clone() };
        let request = pb::DeleteManyRequest {
            tenant_id: self.tenant_id.clone(),
            items,
            options: Some(write_options(&batch_options, timeout)),
        };
        let safe = options.idempotency_key.is_some();
        with_retries(self.retry, safe, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.delete_many(request).await?.into_inner()) }
        })
        .await
        .map(write_many_result)
    }

    /// Reads `key`: `None` when it has no live value.
    pub async fn get(&self, key: &str, options: ReadOptions) -> Result<Option<ReadResult>, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let request = pb::GetRequest {
            tenant_id: self.tenant_id.clone(),
            key: key.to_owned(),
            options: Some(read_options(&options, timeout)),
        };
        let result = with_retries(self.retry, true, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.get(request).await?.into_inner()) }
        })
        .await;
        match result {
            Ok(response) => Ok(read_result(response)),
            Err(error)
                if error.code() == Code::NotFound && error.known_reason() == Some(Reason::KeyNotFound) =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Reads up to 100 keys; each key's outcome is reported separately.
    pub async fn get_many(
        &self,
        keys: &[String],
        options: ReadOptions,
    ) -> Result<Vec<(String, Result<Option<ReadResult>, ClientError>)>, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let request = pb::GetManyRequest {
            tenant_id: self.tenant_id.clone(),
            keys: keys.to_vec(),
            options: Some(read_options(&options, timeout)),
        };
        let response = with_retries(self.retry, true, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.get_many(request).await?.into_inner()) }
        })
        .await?;
        Ok(response
            .results
            .into_iter()
            .map(|item| {
                let outcome = match (item.error, item.result) {
                    // Per-key errors carry only the reason (the call itself succeeded).
                    (Some(error), _) => Err(ClientError::Server {
                        code: Code::Unknown,
                        reason: error.reason,
                        message: error.message,
                        metadata: error.metadata.into_iter().collect(),
                    }),
                    (None, Some(result)) => Ok(read_result(result)),
                    (None, None) => Ok(None),
                };
                (item.key, outcome)
            })
            .collect())
    }
}

pub(crate) fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    // A little slack so the router's own deadline answer (with its reason) arrives first.
    request.set_timeout(timeout + Duration::from_millis(250));
    request
}

pub(crate) fn timeout_ms(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
}

fn write_options(options: &WriteOptions, timeout: Duration) -> pb::WriteOptions {
    pb::WriteOptions {
        consistency: options.consistency.to_proto(),
        w: options.w.unwrap_or(0),
        strict_quorum: false,
        timeout_ms: timeout_ms(timeout),
        idempotency_key: options.idempotency_key.clone().unwrap_or_default(),
        condition: pairdb_proto::convert::write_condition_to_wire(options.condition),
    }
}

/// A TTL in whole ms on the wire (0 = unset; a sub-millisecond TTL rounds up to 1 ms).
fn wire_ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |ttl| u64::try_from(ttl.as_micros().div_ceil(1000)).unwrap_or(u64::MAX))
}

fn read_options(options: &ReadOptions, timeout: Duration) -> pb::ReadOptions {
    pb::ReadOptions {
        consistency: options.consistency.to_proto(),
        r: options.r.unwrap_or(0),
        timeout_ms: timeout_ms(timeout),
    }
}

pub(crate) fn vector(entries: Vec<common::VersionEntry>) -> Vec<(u64, u64)> {
    entries.into_iter().map(|entry| (entry.actor, entry.counter)).collect()
}

fn write_result(ack: pb::WriteAck) -> WriteResult {
    WriteResult {
        context: ack.context,
        version_vector: vector(ack.version_vector),
        acks: ack.acks,
        required: ack.required,
        hinted_acks: ack.hinted_acks,
        duplicate: ack.duplicate,
        idempotency_key: ack.idempotency_key,
    }
}

fn write_many_result(response: pb::WriteManyResponse) -> WriteManyResult {
    let results = response
        .results
        .into_iter()
        .map(|item| match (item.ack, item.error) {
            (Some(ack), _) => Ok(write_result(ack)),
            (None, Some(detail)) => Err(ClientError::from_detail(detail)),
            (None, None) => Err(ClientError::from_detail(common::ErrorDetail {
                reason: Reason::Internal.as_str().to_owned(),
                message: "the router answered an item with neither an ack nor an error".to_owned(),
                metadata: Default::default(),
            })),
        })
        .collect();
    WriteManyResult { results, duplicate: response.duplicate, idempotency_key: response.idempotency_key }
}

pub(crate) fn sibling(sibling: pb::Sibling) -> Sibling {
    Sibling {
        value: sibling.value,
        timestamp_ms: sibling.timestamp_ms,
        dot: sibling.dot.map(|dot| (dot.actor, dot.counter)),
        expires_at_ms: (sibling.expires_at_ms > 0).then_some(sibling.expires_at_ms),
    }
}

fn read_result(response: pb::GetResponse) -> Option<ReadResult> {
    if !response.found {
        return None;
    }
    Some(ReadResult {
        siblings: response.siblings.into_iter().map(sibling).collect(),
        context: response.context,
        version_vector: vector(response.version_vector),
    })
}
