//! The HTTP/JSON edge of the admin API, on the same port as gRPC, with the seed's REST paths:
//!
//! | method and path | operation |
//! |---|---|
//! | `POST /v1/tenants`, `GET /v1/tenants` | create (201), list |
//! | `GET`, `PATCH`, `DELETE /v1/tenants/{id}` | get, update (N change → `migration_id`), delete |
//! | `PUT /v1/tenants/{id}/replication-factor` | the seed's UpdateReplicationFactor |
//! | `GET /v1/tenants/{id}/usage` | the tenant's usage, quotas and over-quota flags (GetTenantUsage) |
//! | `POST`, `GET /v1/tenants/{id}/api-keys` | create a key (201, the secret is in this response only), list |
//! | `POST /v1/api-keys` (`tenant_id` in the body), `GET /v1/api-keys?tenant_id=` | the same, flat |
//! | `DELETE /v1/api-keys/{key_id}` | revoke |
//! | `POST`, `GET /v1/admin/storage-nodes` | add (201), list |
//! | `GET`, `PATCH`, `DELETE /v1/admin/storage-nodes/{id}` (`?force=true`) | get, update weight/zone, remove |
//! | `POST`, `GET /v1/admin/storage-nodes/{id}/rebuild` | start a rebuild (202), its progress |
//! | `GET /v1/admin/migrations`, `GET /v1/admin/migrations/{id}` | list, get (the seed's GetMigrationStatus) |
//! | `POST /v1/admin/migrations/{id}/cancel` | cancel |
//! | `POST /v1/admin/context-keys/rotate` | rotate the key routers seal client contexts with |
//! | `POST /v1/admin/cluster-credentials` (`principal` in the body) | issue a cluster credential |
//!
//! `DELETE /v1/tenants/{id}` answers 202 with the tenant in state `deleting`: storage nodes purge its
//! data in the background, `GET` shows the progress, and the id can be reused once every node has.
//!
//! Every request needs `authorization: Bearer <admin token>` (unless `--no-auth`). Errors are
//! `{"error": {"code": "<gRPC code name>", "reason": "...", "message": "...", "details": {...}}}` with
//! the HTTP status of the one error table; malformed JSON and unknown fields are 400
//! INVALID_ARGUMENT.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use pairdb_core::quorum::Consistency;
use pairdb_core::reason::{HasReason, Reason};
use pairdb_core::ring::NodeId;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::admin::{Meta, NewNode, NewTenant, NodePatch, NodeView, TenantPatch, now_ms};
use crate::config::AdminAuth;
use crate::deletion::TenantView;
use crate::error::MetaError;
use crate::grpc::{authorized, migration_rates};
use crate::model::{ApiKey, ConflictMode, KeyGroups, Migration, NodeRebuild, Tenant, UsageTotal};

/// The templates of [`routes`], which name the requests' spans (kept in step with `routes`: a debug
/// build asserts that each request's template is the one axum matched).
pub const ROUTES: &[&str] = &[
    "/v1/tenants",
    "/v1/tenants/{tenant_id}",
    "/v1/tenants/{tenant_id}/replication-factor",
    "/v1/tenants/{tenant_id}/usage",
    "/v1/tenants/{tenant_id}/api-keys",
    "/v1/api-keys",
    "/v1/api-keys/{key_id}",
    "/v1/admin/storage-nodes",
    "/v1/admin/storage-nodes/{node_id}",
    "/v1/admin/storage-nodes/{node_id}/rebuild",
    "/v1/admin/migrations",
    "/v1/admin/migrations/{migration_id}",
    "/v1/admin/migrations/{migration_id}/cancel",
    "/v1/admin/context-keys/rotate",
    "/v1/admin/cluster-credentials",
    "/v1/{*rest}",
];

/// The admin routes, behind the admin-token check.
pub fn routes(meta: Meta, auth: Arc<AdminAuth>) -> Router {
    Router::new()
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/tenants/{tenant_id}", get(get_tenant).patch(update_tenant).delete(delete_tenant))
        .route("/v1/tenants/{tenant_id}/replication-factor", put(update_replication_factor))
        .route("/v1/tenants/{tenant_id}/usage", get(get_tenant_usage))
        .route("/v1/tenants/{tenant_id}/api-keys", post(create_tenant_api_key).get(list_tenant_api_keys))
        .route("/v1/api-keys", post(create_api_key).get(list_api_keys))
        .route("/v1/api-keys/{key_id}", delete(revoke_api_key))
        .route("/v1/admin/storage-nodes", post(add_node).get(list_nodes))
        .route("/v1/admin/storage-nodes/{node_id}", get(get_node).patch(update_node).delete(remove_node))
        .route("/v1/admin/storage-nodes/{node_id}/rebuild", post(start_rebuild).get(get_rebuild))
        .route("/v1/admin/migrations", get(list_migrations))
        .route("/v1/admin/migrations/{migration_id}", get(get_migration))
        .route("/v1/admin/migrations/{migration_id}/cancel", post(cancel_migration))
        .route("/v1/admin/context-keys/rotate", post(rotate_context_key))
        .route("/v1/admin/cluster-credentials", post(issue_cluster_credential))
        // The gRPC router owns the fallback; unknown /v1 paths still get a JSON 404.
        .route("/v1/{*rest}", axum::routing::any(unknown_path))
        .with_state(meta)
        .layer(axum::middleware::from_fn_with_state(auth, require_admin_token))
        .layer(axum::middleware::map_response(json_payload_too_large))
}

/// axum refuses a body over its limit with a plain-text 413 before any handler runs; answer it with
/// the same JSON error body (reason BODY_TOO_LARGE) as every other error.
async fn json_payload_too_large(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE || is_json {
        return response;
    }
    let mut response = pairdb_service::errors::http_response(
        Reason::BodyTooLarge,
        "request body is over the size limit",
        &[],
    );
    // HTTP's own status for this (the gRPC table says 400, which the router's edge keeps answering).
    *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    response
}

async fn require_admin_token(State(auth): State<Arc<AdminAuth>>, request: Request, next: Next) -> Response {
    let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    if authorized(&auth, header) {
        next.run(request).await
    } else {
        error_response(&MetaError::Unauthenticated(
            "missing or invalid admin token (authorization: Bearer <token>)".to_owned(),
        ))
    }
}

async fn unknown_path() -> Response {
    pairdb_service::errors::http_response(Reason::NotFound, "no such endpoint", &[])
}

fn error_response(error: &MetaError) -> Response {
    match error {
        MetaError::Internal(_) => tracing::error!(%error, "http request failed"),
        MetaError::DatabaseUnavailable(_) => tracing::warn!(%error, "http request failed"),
        _ => tracing::debug!(%error, "http request rejected"),
    }
    pairdb_service::errors::http_response(error.reason(), &error.to_string(), &error.metadata())
}

fn reply(result: Result<(StatusCode, Value), MetaError>) -> Response {
    match result {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(error) => error_response(&error),
    }
}

/// A request body, read within the listener's deadline and size limit: a body that does not arrive in
/// time is REQUEST_TIMEOUT (408), one over the limit BODY_TOO_LARGE (413, see
/// [`json_payload_too_large`]), a broken one INVALID_ARGUMENT — each in the JSON error shape.
struct JsonBody(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for JsonBody {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        match <Bytes as axum::extract::FromRequest<S>>::from_request(request, state).await {
            Ok(bytes) => Ok(JsonBody(bytes)),
            Err(rejection) if pairdb_service::listener::is_body_timeout(&rejection) => {
                Err(error_response(&MetaError::RequestTimeout(format!("request body: {rejection}"))))
            }
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(rejection.into_response())
            }
            Err(rejection) => Err(error_response(&MetaError::InvalidArgument(format!(
                "request body could not be read: {rejection}"
            )))),
        }
    }
}

/// Parses a JSON body; malformed JSON, wrong types and unknown fields are INVALID_ARGUMENT.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, MetaError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_str("{}")
            .map_err(|e| MetaError::InvalidArgument(format!("request body: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| MetaError::InvalidArgument(format!("invalid JSON body: {e}")))
}

fn parse_node_id(text: &str) -> Result<NodeId, MetaError> {
    text.parse()
        .map(NodeId)
        .map_err(|_| MetaError::InvalidArgument(format!("node id {text:?} is not a number")))
}

/// The value of `name` in a query string, decoded as `application/x-www-form-urlencoded`.
fn query_param(query: &Option<String>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_deref()?.as_bytes())
        .find_map(|(key, value)| (key == name).then(|| value.into_owned()))
}

fn parse_consistency(text: Option<String>) -> Result<Option<Consistency>, MetaError> {
    text.map(|t| {
        Consistency::parse(&t).ok_or_else(|| {
            MetaError::InvalidArgument(format!("default_consistency {t:?}: use one, quorum or all"))
        })
    })
    .transpose()
}

fn parse_conflict_mode(text: Option<String>) -> Result<Option<ConflictMode>, MetaError> {
    text.map(|t| {
        ConflictMode::parse(&t.to_ascii_lowercase())
            .ok_or_else(|| MetaError::InvalidArgument(format!("conflict_mode {t:?}: use siblings or lww")))
    })
    .transpose()
}

fn parse_key_groups(text: Option<String>) -> Result<Option<KeyGroups>, MetaError> {
    text.map(|t| {
        KeyGroups::parse(&t.to_ascii_lowercase())
            .ok_or_else(|| MetaError::InvalidArgument(format!("key_groups {t:?}: use none or hash_tag")))
    })
    .transpose()
}

fn tenant_view_json(view: &TenantView) -> Value {
    let mut json = tenant_json(&view.tenant);
    if let Some(purge) = &view.purge {
        json["purge"] = json!({
            "nodes_done": purge.nodes_done,
            "nodes_total": purge.nodes_total,
            "waiting_node_ids": purge.waiting_node_ids.iter().map(|node| node.0).collect::<Vec<_>>(),
        });
    }
    json
}

fn tenant_json(tenant: &Tenant) -> Value {
    json!({
        "state": tenant.state.as_str(),
        "tenant_id": tenant.tenant_id,
        "replication_factor": tenant.replication_factor,
        "previous_replication_factor": tenant.previous_replication_factor.unwrap_or(0),
        "default_consistency": tenant.default_consistency.as_str(),
        "conflict_mode": tenant.conflict_mode.as_str(),
        "key_groups": tenant.key_groups.as_str(),
        "rate_limit_ops_per_sec": tenant.rate_limit_ops_per_sec,
        "rate_limit_burst": tenant.rate_limit_burst,
        "max_value_bytes": tenant.max_value_bytes,
        "max_siblings": tenant.max_siblings,
        "strict_quorum": tenant.strict_quorum,
        "max_keys": tenant.max_keys,
        "max_bytes": tenant.max_bytes,
        "default_ttl_ms": tenant.default_ttl_ms,
        "max_ttl_ms": tenant.max_ttl_ms,
        "created_at_ms": tenant.created_at_ms,
        "updated_at_ms": tenant.updated_at_ms,
    })
}

/// The fields of `TenantUsageReport`.
fn usage_report_json(tenant: &Tenant, total: &UsageTotal, now_ms: u64) -> Value {
    json!({
        "usage": {
            "tenant_id": tenant.tenant_id,
            "keys": total.usage.keys,
            "value_bytes": total.usage.value_bytes,
            "siblings": total.usage.siblings,
            "tombstones": total.usage.tombstones,
        },
        "reported_at_ms": total.reported_at_ms,
        "age_ms": total.age_ms(now_ms),
        "nodes_reporting": total.nodes_reporting,
        "nodes_total": total.nodes_total,
        "max_keys": tenant.max_keys,
        "max_bytes": tenant.max_bytes,
        "over_key_quota": tenant.over_key_quota,
        "over_byte_quota": tenant.over_byte_quota,
    })
}

fn api_key_json(key: &ApiKey) -> Value {
    json!({
        "key_id": key.key_id,
        "tenant_id": key.tenant_id,
        "description": key.description,
        "created_at_ms": key.created_at_ms,
        "revoked": key.revoked(),
    })
}

fn node_json(view: &NodeView) -> Value {
    let node = &view.node;
    json!({
        "node_id": node.node_id.0,
        "address": node.address,
        "zone": node.zone,
        "weight": node.weight,
        "status": node.status().as_str(),
        "last_heartbeat_ms": node.last_heartbeat_ms,
        "stats": {
            "keys": node.stats.keys,
            // The old name of disk_bytes, for clients older than it.
            "live_bytes": node.stats.disk_bytes,
            "disk_bytes": node.stats.disk_bytes,
            "live_value_bytes": node.stats.live_value_bytes,
            "disk_free_bytes": node.stats.disk_free_bytes,
            "hints_pending": node.stats.hints_pending,
            "write_path_poisoned": node.stats.write_path_poisoned,
            "quarantined_records": node.stats.quarantined_records,
            // null until the node has measured it.
            "clock_offset_ms": node.stats.clock_offset_ms,
        },
        "in_ring": view.in_ring,
        "clock_skewed": view.clock_skewed,
        "holds_unowned_data": view.node.holds_unowned_leftovers(),
        "partitions_at_position": view.partitions_at_position,
        // null before the node's first heartbeat.
        "heartbeat_age_ms": view.heartbeat_age_ms,
    })
}

fn rebuild_json(rebuild: &NodeRebuild) -> Value {
    json!({
        "node_id": rebuild.node_id.0,
        "state": rebuild.state,
        "partitions_total": rebuild.partitions_total,
        "partitions_done": rebuild.partitions_done,
        "keys_compared": rebuild.keys_compared,
        "keys_repaired": rebuild.keys_repaired,
        "bytes": rebuild.bytes,
        "failed_exchanges": rebuild.failed_exchanges,
        "started_at_ms": rebuild.started_at_ms,
        "finished_at_ms": rebuild.finished_at_ms,
    })
}

fn migration_json(migration: &Migration) -> Value {
    let (keys_per_sec, eta_secs) = migration_rates(migration, now_ms());
    let row = migration.change.to_row();
    json!({
        "migration_id": migration.migration_id,
        "kind": row.kind.as_str(),
        "state": migration.state.as_str(),
        "from_epoch": migration.from_epoch,
        "to_epoch": migration.to_epoch,
        "progress": {
            "partitions_total": migration.progress.partitions_total,
            "partitions_done": migration.progress.partitions_done,
            "keys_total": migration.progress.keys_total,
            "keys_done": migration.progress.keys_done,
            "bytes_done": migration.progress.bytes_done,
            "keys_per_sec": keys_per_sec,
            "eta_secs": eta_secs,
        },
        "error": migration.error,
        "created_at_ms": migration.created_at_ms,
        "updated_at_ms": migration.updated_at_ms,
        "tenant_id": row.tenant_id,
        "node_id": row.node_id,
    })
}

fn change_json(key: &str, value: Value, migration_id: Option<String>) -> Value {
    json!({ key: value, "migration_id": migration_id })
}

// ---- tenants --------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenantBody {
    tenant_id: String,
    /// Absent = the default N; 0 is refused like on the update path (one rule for both).
    replication_factor: Option<u32>,
    default_consistency: Option<String>,
    conflict_mode: Option<String>,
    /// `none` (default) or `hash_tag`; fixed for the tenant's life.
    key_groups: Option<String>,
    #[serde(default)]
    rate_limit_ops_per_sec: u32,
    #[serde(default)]
    rate_limit_burst: u32,
    #[serde(default)]
    max_value_bytes: u64,
    #[serde(default)]
    max_siblings: u32,
    #[serde(default)]
    strict_quorum: bool,
    /// Quotas; absent or 0 = none.
    #[serde(default)]
    max_keys: u64,
    #[serde(default)]
    max_bytes: u64,
    /// Value expiry in ms; absent or 0 = none (never expires, no cap).
    #[serde(default)]
    default_ttl_ms: u64,
    #[serde(default)]
    max_ttl_ms: u64,
}

async fn create_tenant(State(meta): State<Meta>, JsonBody(body): JsonBody) -> Response {
    reply(
        async {
            let body: CreateTenantBody = parse(&body)?;
            let replication_factor = match body.replication_factor {
                None => 0,
                Some(n) => {
                    crate::admin::check_replication_factor_range(n)?;
                    n
                }
            };
            let new = NewTenant {
                tenant_id: body.tenant_id,
                replication_factor,
                default_consistency: parse_consistency(body.default_consistency)?,
                conflict_mode: parse_conflict_mode(body.conflict_mode)?,
                key_groups: parse_key_groups(body.key_groups)?,
                rate_limit_ops_per_sec: body.rate_limit_ops_per_sec,
                rate_limit_burst: body.rate_limit_burst,
                max_value_bytes: body.max_value_bytes,
                max_siblings: body.max_siblings,
                strict_quorum: body.strict_quorum,
                max_keys: body.max_keys,
                max_bytes: body.max_bytes,
                default_ttl_ms: body.default_ttl_ms,
                max_ttl_ms: body.max_ttl_ms,
            };
            let tenant = meta.create_tenant(new).await?;
            Ok((StatusCode::CREATED, tenant_json(&tenant)))
        }
        .await,
    )
}

async fn list_tenants(State(meta): State<Meta>) -> Response {
    reply(meta.tenant_views().await.map(|tenants| {
        (StatusCode::OK, json!({"tenants": tenants.iter().map(tenant_view_json).collect::<Vec<_>>()}))
    }))
}

async fn get_tenant(State(meta): State<Meta>, Path(tenant_id): Path<String>) -> Response {
    reply(meta.tenant_view(&tenant_id).await.map(|view| (StatusCode::OK, tenant_view_json(&view))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchTenantBody {
    replication_factor: Option<u32>,
    default_consistency: Option<String>,
    conflict_mode: Option<String>,
    rate_limit_ops_per_sec: Option<u32>,
    rate_limit_burst: Option<u32>,
    max_value_bytes: Option<u64>,
    max_siblings: Option<u32>,
    strict_quorum: Option<bool>,
    /// 0 removes the quota.
    max_keys: Option<u64>,
    max_bytes: Option<u64>,
    /// 0 removes the default expiry (or the cap).
    default_ttl_ms: Option<u64>,
    max_ttl_ms: Option<u64>,
    /// Accepted only to be refused with a reason better than "unknown field": key groups are fixed
    /// when the tenant is created.
    key_groups: Option<serde::de::IgnoredAny>,
}

async fn update_tenant(
    State(meta): State<Meta>,
    Path(tenant_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Response {
    reply(
        async {
            let body: PatchTenantBody = parse(&body)?;
            if body.key_groups.is_some() {
                return Err(MetaError::InvalidArgument(
                    "key_groups is fixed when a tenant is created and cannot be updated (it decides where \
                     every key is placed); delete the tenant and create it again to choose another mode"
                        .to_owned(),
                ));
            }
            let patch = TenantPatch {
                replication_factor: body.replication_factor,
                default_consistency: parse_consistency(body.default_consistency)?,
                conflict_mode: parse_conflict_mode(body.conflict_mode)?,
                rate_limit_ops_per_sec: body.rate_limit_ops_per_sec,
                rate_limit_burst: body.rate_limit_burst,
                max_value_bytes: body.max_value_bytes,
                max_siblings: body.max_siblings,
                strict_quorum: body.strict_quorum,
                max_keys: body.max_keys,
                max_bytes: body.max_bytes,
                default_ttl_ms: body.default_ttl_ms,
                max_ttl_ms: body.max_ttl_ms,
            };
            let (tenant, migration_id) = meta.update_tenant(&tenant_id, patch).await?;
            Ok((StatusCode::OK, change_json("tenant", tenant_json(&tenant), migration_id)))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicationFactorBody {
    replication_factor: u32,
}

async fn update_replication_factor(
    State(meta): State<Meta>,
    Path(tenant_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Response {
    reply(
        async {
            let body: ReplicationFactorBody = parse(&body)?;
            let patch =
                TenantPatch { replication_factor: Some(body.replication_factor), ..TenantPatch::default() };
            let (tenant, migration_id) = meta.update_tenant(&tenant_id, patch).await?;
            Ok((StatusCode::OK, change_json("tenant", tenant_json(&tenant), migration_id)))
        }
        .await,
    )
}

async fn get_tenant_usage(State(meta): State<Meta>, Path(tenant_id): Path<String>) -> Response {
    reply(
        meta.tenant_usage(&tenant_id)
            .await
            .map(|(tenant, total)| (StatusCode::OK, usage_report_json(&tenant, &total, now_ms()))),
    )
}

async fn delete_tenant(State(meta): State<Meta>, Path(tenant_id): Path<String>) -> Response {
    reply(meta.delete_tenant(&tenant_id).await.map(|view| (StatusCode::ACCEPTED, tenant_view_json(&view))))
}

async fn rotate_context_key(State(meta): State<Meta>) -> Response {
    reply(meta.rotate_context_key().await.map(|status| {
        let body = json!({
            "current_key_id": status.current_key_id,
            "previous_key_id": status.previous_key_id,
            "rotated_at_ms": status.rotated_at_ms,
        });
        (StatusCode::OK, body)
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialBody {
    principal: String,
}

async fn issue_cluster_credential(State(meta): State<Meta>, JsonBody(body): JsonBody) -> Response {
    reply((|| {
        let body: CredentialBody = parse(&body)?;
        let principal: pairdb_service::cluster_auth::Principal =
            body.principal.parse().map_err(|e| MetaError::InvalidArgument(format!("principal: {e}")))?;
        let credential = meta.issue_credential(principal)?;
        Ok((
            StatusCode::OK,
            json!({"principal": principal.to_string(), "cluster_credential": credential.as_str()}),
        ))
    })())
}

// ---- api keys -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantApiKeyBody {
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyBody {
    tenant_id: String,
    #[serde(default)]
    description: String,
}

async fn new_api_key(
    meta: &Meta,
    tenant_id: &str,
    description: &str,
) -> Result<(StatusCode, Value), MetaError> {
    let (key, secret) = meta.create_api_key(tenant_id, description).await?;
    Ok((StatusCode::CREATED, json!({"api_key": api_key_json(&key), "secret": secret})))
}

async fn create_tenant_api_key(
    State(meta): State<Meta>,
    Path(tenant_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Response {
    reply(
        async {
            let body: TenantApiKeyBody = parse(&body)?;
            new_api_key(&meta, &tenant_id, &body.description).await
        }
        .await,
    )
}

async fn create_api_key(State(meta): State<Meta>, JsonBody(body): JsonBody) -> Response {
    reply(
        async {
            let body: ApiKeyBody = parse(&body)?;
            new_api_key(&meta, &body.tenant_id, &body.description).await
        }
        .await,
    )
}

async fn keys_of(meta: &Meta, tenant_id: Option<&str>) -> Result<(StatusCode, Value), MetaError> {
    let keys = meta.list_api_keys(tenant_id).await?;
    Ok((StatusCode::OK, json!({"api_keys": keys.iter().map(api_key_json).collect::<Vec<_>>()})))
}

async fn list_tenant_api_keys(State(meta): State<Meta>, Path(tenant_id): Path<String>) -> Response {
    reply(keys_of(&meta, Some(&tenant_id)).await)
}

async fn list_api_keys(State(meta): State<Meta>, RawQuery(query): RawQuery) -> Response {
    let tenant_id = query_param(&query, "tenant_id").filter(|t| !t.is_empty());
    reply(keys_of(&meta, tenant_id.as_deref()).await)
}

async fn revoke_api_key(State(meta): State<Meta>, Path(key_id): Path<String>) -> Response {
    reply(
        meta.revoke_api_key(&key_id)
            .await
            .map(|key| (StatusCode::OK, json!({"api_key": api_key_json(&key)}))),
    )
}

// ---- storage nodes --------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNodeBody {
    #[serde(default)]
    node_id: u32,
    #[serde(default)]
    address: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    weight: u32,
}

async fn add_node(State(meta): State<Meta>, JsonBody(body): JsonBody) -> Response {
    reply(
        async {
            let body: AddNodeBody = parse(&body)?;
            let new = NewNode {
                node_id: (body.node_id != 0).then_some(NodeId(body.node_id)),
                address: body.address,
                zone: body.zone,
                weight: body.weight,
            };
            let (node, migration_id) = meta.add_node(new).await?;
            let mut body = change_json("node", node_json(&node), migration_id);
            let principal = pairdb_service::cluster_auth::Principal::Node(node.node.node_id);
            if let Ok(credential) = meta.issue_credential(principal) {
                body["cluster_credential"] = Value::String(credential.as_str().to_owned());
            }
            Ok((StatusCode::CREATED, body))
        }
        .await,
    )
}

async fn list_nodes(State(meta): State<Meta>) -> Response {
    reply(
        meta.list_nodes()
            .await
            .map(|nodes| (StatusCode::OK, json!({"nodes": nodes.iter().map(node_json).collect::<Vec<_>>()}))),
    )
}

async fn get_node(State(meta): State<Meta>, Path(node_id): Path<String>) -> Response {
    reply(
        async {
            let node = meta.get_node(parse_node_id(&node_id)?).await?;
            Ok((StatusCode::OK, node_json(&node)))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchNodeBody {
    weight: Option<u32>,
    zone: Option<String>,
}

async fn update_node(
    State(meta): State<Meta>,
    Path(node_id): Path<String>,
    JsonBody(body): JsonBody,
) -> Response {
    reply(
        async {
            let node_id = parse_node_id(&node_id)?;
            let body: PatchNodeBody = parse(&body)?;
            let (node, migration_id) =
                meta.update_node(node_id, NodePatch { weight: body.weight, zone: body.zone }).await?;
            Ok((StatusCode::OK, change_json("node", node_json(&node), migration_id)))
        }
        .await,
    )
}

async fn remove_node(
    State(meta): State<Meta>,
    Path(node_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    reply(
        async {
            let node_id = parse_node_id(&node_id)?;
            let force = match query_param(&query, "force").as_deref() {
                None | Some("false" | "0") => false,
                Some("" | "true" | "1") => true,
                Some(other) => {
                    return Err(MetaError::InvalidArgument(format!("force={other:?}: use true or false")));
                }
            };
            let (node, migration_id) = meta.remove_node(node_id, force).await?;
            Ok((StatusCode::OK, change_json("node", node_json(&node), migration_id)))
        }
        .await,
    )
}

async fn start_rebuild(State(meta): State<Meta>, Path(node_id): Path<String>) -> Response {
    reply(
        async {
            let rebuild = meta.node_rebuild(parse_node_id(&node_id)?, true).await?;
            Ok((StatusCode::ACCEPTED, rebuild_json(&rebuild)))
        }
        .await,
    )
}

async fn get_rebuild(State(meta): State<Meta>, Path(node_id): Path<String>) -> Response {
    reply(
        async {
            let rebuild = meta.node_rebuild(parse_node_id(&node_id)?, false).await?;
            Ok((StatusCode::OK, rebuild_json(&rebuild)))
        }
        .await,
    )
}

// ---- migrations -----------------------------------------------------------------------------

async fn list_migrations(State(meta): State<Meta>) -> Response {
    reply(meta.list_migrations().await.map(|migrations| {
        (StatusCode::OK, json!({"migrations": migrations.iter().map(migration_json).collect::<Vec<_>>()}))
    }))
}

async fn get_migration(State(meta): State<Meta>, Path(migration_id): Path<String>) -> Response {
    reply(meta.get_migration(&migration_id).await.map(|m| (StatusCode::OK, migration_json(&m))))
}

async fn cancel_migration(State(meta): State<Meta>, Path(migration_id): Path<String>) -> Response {
    reply(meta.cancel_migration(&migration_id).await.map(|m| (StatusCode::OK, migration_json(&m))))
}
