//! The client edge shared by the gRPC and HTTP APIs: who is calling (API key → tenant) and whether
//! the tenant may send another request now (token bucket per tenant).
//!
//! Invariants: authentication reads only the watch-fed view (key hashes, never secrets; no database on
//! the request path); a request naming a tenant other than its key's is PERMISSION_DENIED; a rate-limit
//! rejection is answered at once with a retry-after hint and never delays other tenants (buckets are
//! sharded by tenant, each shard lock held only for one arithmetic update).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use pairdb_core::rate_limit::TokenBucket;
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

/// Authentication and per-tenant admission.
#[derive(Debug)]
pub struct Edge {
    view: SharedView,
    auth: AuthMode,
    buckets: Vec<Mutex<HashMap<String, TokenBucket>>>,
    epoch: Instant,
}

impl Edge {
    pub fn new(view: SharedView, auth: AuthMode) -> Self {
        Self {
            view,
            auth,
            buckets: (0..RATE_LIMIT_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            epoch: Instant::now(),
        }
    }

    pub fn auth_mode(&self) -> AuthMode {
        self.auth
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
                        "INVALID_TENANT_ID",
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
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let shard = &self.buckets[shard_of(&tenant.tenant_id)];
        let mut buckets = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.entry(tenant.tenant_id.clone()).or_insert_with(|| {
            TokenBucket::new(tenant.rate_limit_ops_per_sec, tenant.rate_limit_burst, now_ms)
        });
        if !bucket.has_settings(tenant.rate_limit_ops_per_sec, tenant.rate_limit_burst) {
            *bucket = TokenBucket::new(tenant.rate_limit_ops_per_sec, tenant.rate_limit_burst, now_ms);
        }
        bucket.try_take(now_ms).map_err(|retry_after_ms| {
            metrics::counter!("pairdb_router_rate_limited_total", "tenant" => tenant.tenant_id.clone())
                .increment(1);
            RouterError::RateLimited { tenant: tenant.tenant_id.clone(), retry_after_ms }
        })
    }

    /// The tenant's settings from the view.
    pub fn settings(&self, tenant: &str) -> Result<std::sync::Arc<TenantSettings>, RouterError> {
        self.view
            .load()
            .tenants
            .get(tenant)
            .cloned()
            .ok_or_else(|| RouterError::TenantNotFound(tenant.to_owned()))
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
