//! Admission of client requests, shared by the gRPC and HTTP edges: who is calling (API key →
//! tenant) and whether the tenant may send another request now (token bucket per tenant).
//!
//! [`admit_client`] runs both checks as HTTP middleware in front of the KV API, on the request's
//! headers only: a request without a valid key, or over its tenant's rate, is refused before its
//! body is read, and the body of an admitted gRPC request may be no larger than its tenant's
//! requests can need (its value cap plus [`MESSAGE_OVERHEAD_BYTES`]). The admitted [`Client`] goes
//! to the handlers in the request's extensions.
//!
//! A tenant's limit is cluster-wide: each bucket holds this router's share of it, which
//! [`crate::rate_shares`] recomputes every 250 ms from the routers' demands.
//!
//! Invariants: authentication reads only the watch-fed view (key hashes, never secrets; no database on
//! the request path); a request naming a tenant other than its key's is PERMISSION_DENIED; a rate-limit
//! rejection is answered at once with a retry-after hint and never delays other tenants (buckets are
//! sharded by tenant, each shard lock held only for one arithmetic update).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use pairdb_core::rate_limit::TokenBucket;
use pairdb_core::reason::Reason;
use sha2::{Digest, Sha256};

use crate::error::RouterError;
use crate::view::{SharedView, TenantSettings};

/// Whether clients must present an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// `authorization: Bearer <api key>` required; the key names the tenant.
    Required,
    /// `--no-auth`: the request's `tenant_id` names the tenant (dev and tests only).
    Disabled,
}

const RATE_LIMIT_SHARDS: usize = 16;

/// What a KV request may carry beyond its value: key, context, options, or a GetMany's keys.
pub const MESSAGE_OVERHEAD_BYTES: u64 = 256 * 1024;

/// Who a request acts for, once admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// The API key named this tenant and its rate limit admitted the request.
    Admitted(String),
    /// Authentication is off (`--no-auth`): the request names its tenant.
    Anonymous,
}

/// Authentication and per-tenant admission.
#[derive(Debug)]
pub struct Admission {
    view: SharedView,
    auth: AuthMode,
    buckets: Vec<Mutex<HashMap<String, TokenBucket>>>,
    epoch: Instant,
    /// The share of a limit a new bucket starts with (an even split over the live routers; see
    /// [`crate::rate_shares`]), as f64 bits.
    default_share: std::sync::atomic::AtomicU64,
}

impl Admission {
    pub fn new(view: SharedView, auth: AuthMode) -> Self {
        Self {
            view,
            auth,
            buckets: (0..RATE_LIMIT_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            epoch: Instant::now(),
            default_share: std::sync::atomic::AtomicU64::new(1.0f64.to_bits()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The tenant's bucket in `buckets` (its shard, locked), made for its current settings.
    fn bucket<'a>(
        &self,
        buckets: &'a mut HashMap<String, TokenBucket>,
        tenant: &TenantSettings,
        now_ms: u64,
    ) -> &'a mut TokenBucket {
        let (rate, burst) = (tenant.rate_limit_ops_per_sec, tenant.rate_limit_burst);
        // A new bucket (or one for new settings) starts at the even split, never at the whole limit:
        // every router making one would otherwise admit a whole burst each.
        let fresh = || {
            let mut bucket = TokenBucket::new(rate, burst, now_ms);
            bucket.set_share(
                f64::from_bits(self.default_share.load(std::sync::atomic::Ordering::Relaxed)),
                now_ms,
            );
            bucket
        };
        let bucket = buckets.entry(tenant.tenant_id.clone()).or_insert_with(fresh);
        if !bucket.has_settings(rate, burst) {
            *bucket = fresh();
        }
        bucket
    }

    /// Every bucket's demand since the last call (see [`crate::rate_shares`]).
    pub fn take_demands(&self) -> Vec<(String, f64)> {
        let mut demands = Vec::new();
        for shard in &self.buckets {
            let mut buckets = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            demands.extend(buckets.iter_mut().map(|(tenant, bucket)| (tenant.clone(), bucket.take_demand())));
        }
        demands
    }

    /// Sets each bucket's share of its tenant's limit: `shares` where it names the tenant, else
    /// `absent` (also what new buckets start with).
    pub fn set_shares(&self, shares: &HashMap<String, f64>, absent: f64) {
        self.default_share.store(absent.to_bits(), std::sync::atomic::Ordering::Relaxed);
        let now_ms = self.now_ms();
        for shard in &self.buckets {
            let mut buckets = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (tenant, bucket) in buckets.iter_mut() {
                bucket.set_share(shares.get(tenant).copied().unwrap_or(absent), now_ms);
            }
        }
    }

    /// Authenticates and admits a request from its `authorization` header alone.
    pub fn admit_headers(
        &self,
        authorization: Option<&str>,
    ) -> Result<(Client, Option<Arc<TenantSettings>>), RouterError> {
        match self.auth {
            AuthMode::Disabled => Ok((Client::Anonymous, None)),
            AuthMode::Required => {
                let tenant = self.tenant_for(authorization, "")?;
                let settings = self.settings(&tenant)?;
                self.admit(&settings)?;
                Ok((Client::Admitted(tenant), Some(settings)))
            }
        }
    }

    /// The tenant of an admitted request naming `requested_tenant` (empty = none); for
    /// [`Client::Anonymous`] this is where the tenant is looked up and rate limited.
    pub fn tenant_of(&self, client: &Client, requested_tenant: &str) -> Result<String, RouterError> {
        match client {
            Client::Admitted(tenant) => {
                if !requested_tenant.is_empty() && requested_tenant != tenant {
                    return Err(RouterError::PermissionDenied(format!(
                        "this API key belongs to another tenant than {requested_tenant:?}"
                    )));
                }
                Ok(tenant.clone())
            }
            Client::Anonymous => {
                let tenant = self.tenant_for(None, requested_tenant)?;
                self.admit(&*self.settings(&tenant)?)?;
                Ok(tenant)
            }
        }
    }

    /// The tenant a request acts for, from its `authorization` header value and the tenant it names
    /// (empty = none).
    pub fn tenant_for(
        &self,
        authorization: Option<&str>,
        requested_tenant: &str,
    ) -> Result<String, RouterError> {
        match self.auth {
            AuthMode::Disabled => {
                if requested_tenant.is_empty() {
                    return Err(RouterError::invalid(
                        Reason::InvalidTenantId,
                        "tenant_id is required (authentication is off, so no API key names the tenant)",
                    ));
                }
                Ok(requested_tenant.to_owned())
            }
            AuthMode::Required => {
                let secret =
                    authorization.and_then(pairdb_service::errors::bearer_token).ok_or_else(|| {
                        RouterError::Unauthenticated(
                            "missing API key (authorization: Bearer <api key>)".into(),
                        )
                    })?;
                let hash = hex_sha256(secret);
                let view = self.view.load();
                let (_key_id, tenant) = view
                    .api_keys
                    .get(&hash)
                    .ok_or_else(|| RouterError::Unauthenticated("unknown or revoked API key".into()))?;
                if !requested_tenant.is_empty() && requested_tenant != tenant {
                    return Err(RouterError::PermissionDenied(format!(
                        "this API key belongs to another tenant than {requested_tenant:?}"
                    )));
                }
                Ok(tenant.clone())
            }
        }
    }

    /// Takes one token from the tenant's bucket (no limit when the tenant has none).
    pub fn admit(&self, tenant: &TenantSettings) -> Result<(), RouterError> {
        if tenant.rate_limit_ops_per_sec == 0 {
            return Ok(());
        }
        let now_ms = self.now_ms();
        let shard = &self.buckets[shard_of(&tenant.tenant_id)];
        let mut buckets = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.bucket(&mut buckets, tenant, now_ms).try_take(now_ms).map_err(|retry_after_ms| {
            metrics::counter!("pairdb_router_rate_limited_total", "tenant" => tenant.tenant_id.clone())
                .increment(1);
            RouterError::RateLimited { tenant: tenant.tenant_id.clone(), retry_after_ms }
        })
    }

    /// Charges work already done to the tenant's bucket (a listing page: one operation per
    /// [`LISTING_KEYS_PER_OPERATION`] keys examined beyond the first operation admission took).
    pub fn charge(&self, tenant: &TenantSettings, units: u32) {
        if tenant.rate_limit_ops_per_sec == 0 || units == 0 {
            return;
        }
        let now_ms = self.now_ms();
        let shard = &self.buckets[shard_of(&tenant.tenant_id)];
        let mut buckets = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.bucket(&mut buckets, tenant, now_ms).charge(units, now_ms);
    }

    /// The tenant's settings from the view (a tenant being deleted does not exist any more).
    pub fn settings(&self, tenant: &str) -> Result<Arc<TenantSettings>, RouterError> {
        self.view
            .load()
            .tenants
            .get(tenant)
            .filter(|t| !t.deleting)
            .cloned()
            .ok_or_else(|| RouterError::TenantNotFound(tenant.to_owned()))
    }
}

/// Keys a listing examines per operation charged to its tenant's rate limit.
pub const LISTING_KEYS_PER_OPERATION: u64 = 100;

/// The paths of the KV API (gRPC service and HTTP routes).
fn is_kv_path(path: &str) -> bool {
    path.starts_with("/pairdb.kv.v1.KvService/")
        || path == "/v1/key-value"
        || path == "/v1/kv"
        || path.starts_with("/v1/kv/")
        || path.starts_with("/v1/kv:")
        || path.starts_with("/v1/groups/")
}

/// The largest PutMany / DeleteMany message: the batch's values plus up to 4 KiB of key, context
/// and framing per item, plus the usual overhead.
pub const MAX_BATCH_MESSAGE_BYTES: u64 = crate::batch::MAX_BATCH_VALUE_BYTES as u64
    + crate::batch::MAX_BATCH_ITEMS as u64 * 4096
    + MESSAGE_OVERHEAD_BYTES;

fn is_batch_path(path: &str) -> bool {
    path == "/pairdb.kv.v1.KvService/PutMany" || path == "/pairdb.kv.v1.KvService/DeleteMany"
}

fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Middleware: authenticate and rate-limit KV requests before their body is read (module docs).
pub async fn admit_client(
    State(admission): State<Arc<Admission>>,
    mut request: Request,
    next: Next,
) -> Response {
    if !is_kv_path(request.uri().path()) {
        return next.run(request).await;
    }
    let grpc = is_grpc(&request);
    let authorization = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    let (client, settings) = match admission.admit_headers(authorization) {
        Ok(admitted) => admitted,
        Err(error) if grpc => return error.into_status().into_http::<Body>(),
        Err(error) => return crate::http::error_response(error),
    };
    if grpc {
        let value_cap =
            settings.map_or(pairdb_core::validation::ABSOLUTE_MAX_VALUE_BYTES, |s| s.max_value_bytes);
        let (limit, reason) = match is_batch_path(request.uri().path()) {
            true => (MAX_BATCH_MESSAGE_BYTES, Reason::BatchTooLarge),
            false => (value_cap.saturating_add(MESSAGE_OVERHEAD_BYTES), Reason::ValueTooLarge),
        };
        request = request.map(|body| Body::new(CappedBody::new(body, limit, reason)));
    }
    request.extensions_mut().insert(client);
    next.run(request).await
}

/// A gRPC request body that fails with RESOURCE_EXHAUSTED (VALUE_TOO_LARGE) as soon as its message
/// header declares more than `limit` bytes, or more than `limit` bytes arrive, so an oversized
/// message is never buffered. The error is a `tonic::Status`, which tonic reports as the call's.
struct CappedBody {
    inner: Body,
    remaining: u64,
    limit: u64,
    /// What an oversized message is refused with.
    reason: Reason,
    /// The gRPC message header (compression flag, u32be length) as far as it has arrived.
    header: [u8; 5],
    header_len: usize,
}

impl CappedBody {
    fn new(inner: Body, limit: u64, reason: Reason) -> Self {
        Self { inner, remaining: limit, limit, reason, header: [0; 5], header_len: 0 }
    }

    fn too_large(&self) -> axum::BoxError {
        Box::new(pairdb_service::errors::status(
            self.reason,
            format!(
                "the request message is larger than this tenant's requests can be ({} bytes)",
                self.limit
            ),
            &[("limit_bytes", self.limit.to_string())],
        ))
    }

    /// Takes the next data bytes; `Err` once the body is over the limit.
    fn admit(&mut self, data: &[u8]) -> Result<(), axum::BoxError> {
        if self.header_len < self.header.len() {
            let take = (self.header.len() - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            if self.header_len == self.header.len() {
                let declared =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                if u64::from(declared) > self.limit {
                    return Err(self.too_large());
                }
            }
        }
        let len = data.len() as u64;
        if len > self.remaining {
            return Err(self.too_large());
        }
        self.remaining -= len;
        Ok(())
    }
}

impl http_body::Body for CappedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref()
            && let Err(error) = self.admit(data)
        {
            return Poll::Ready(Some(Err(error)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn shard_of(tenant: &str) -> usize {
    tenant.bytes().fold(0usize, |hash, byte| hash.wrapping_mul(31).wrapping_add(usize::from(byte)))
        % RATE_LIMIT_SHARDS
}

/// Lowercase hex SHA-256, the form meta stores API-key hashes in.
pub fn hex_sha256(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_over_the_cap_is_refused_from_its_header() {
        let mut body = CappedBody::new(Body::empty(), 100, Reason::ValueTooLarge);
        // Declares 60 MiB: refused on the header, before any payload.
        assert!(body.admit(&[0, 3, 192, 0, 0]).is_err());
        let mut body = CappedBody::new(Body::empty(), 100, Reason::ValueTooLarge);
        assert!(body.admit(&[0, 0, 0]).is_ok());
        assert!(body.admit(&[0, 90]).is_ok(), "90 bytes declared");
        assert!(body.admit(&[1; 90]).is_ok());
        assert!(body.admit(&[1; 10]).is_err(), "more bytes than the cap");
    }
}
