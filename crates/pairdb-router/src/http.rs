//! The HTTP/JSON edge of the client KV API, mirroring the gRPC API through [`KvApi`]:
//!
//! - `POST /v1/key-value` (JSON body: `key`, `value` or `value_base64`, optional `consistency`, `w`,
//!   `context`, `overwrite`, `timeout_ms`, `tenant_id`), `GET /v1/key-value?key=&consistency=&r=`,
//!   `DELETE /v1/key-value?key=&context=&consistency=&w=` — the seed's form;
//! - `PUT|GET|DELETE /v1/kv/{key}` — the same as a resource.
//!
//! Headers: `authorization: Bearer <api key>`, `Idempotency-Key` for puts and deletes. `value` is any
//! JSON value, stored as its compact JSON text and returned as JSON; `value_base64` stores raw bytes.
//! Reads return every sibling (`values`, and `values_base64` which is always lossless), `value` when
//! there is exactly one, the `context` (base64) to write back with and the `vector_clock`.
//! Every failure — malformed JSON, wrong types, unknown fields, a wrong content type, an oversize body,
//! a bad query — is a JSON error `{error: {code, reason, message, details}}` from the shared table,
//! never a 500 or a crash.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use pairdb_core::condition::WriteCondition;
use pairdb_core::dvv::VersionVector;
use pairdb_core::expiry::Requested;
use pairdb_core::quorum::Consistency;
use pairdb_core::reason::{HasReason, Reason};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::Client;
use crate::error::RouterError;
use crate::kv::ReadOutcome;
use crate::kv_api::KvApi;
use crate::listing::{ListRequest, ListedEntry};
use crate::request::{BatchItem, ReadRequest, RequestOptions, WriteAck, WriteManyRequest, WriteRequest};

/// Largest request body (a 1 MiB value is ~1.4 MiB as base64, plus the envelope).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Largest `POST /v1/kv:batch` body (4 MiB of values, as base64 or JSON text, plus the items).
pub const MAX_BATCH_BODY_BYTES: usize = 12 * 1024 * 1024;

/// The templates of [`routes`], which name the requests' spans (kept in step with `routes`: a debug
/// build asserts that each request's template is the one axum matched).
pub const ROUTES: &[&str] =
    &["/v1/key-value", "/v1/kv/{key}", "/v1/kv", "/v1/kv:touch", "/v1/kv:batch", "/v1/groups/{group}/kv"];

/// The router's HTTP KV routes.
pub fn routes(api: KvApi) -> Router {
    Router::new()
        .route("/v1/key-value", post(post_key_value).get(get_key_value).delete(delete_key_value))
        .route("/v1/kv/{key}", axum::routing::put(put_resource).get(get_resource).delete(delete_resource))
        .route("/v1/kv", axum::routing::get(list_resource))
        .route("/v1/kv:touch", post(touch))
        .route("/v1/kv:batch", post(batch))
        .route("/v1/groups/{group}/kv", axum::routing::get(list_group))
        .with_state(api)
}

/// An HTTP failure: reason, message and details for the JSON error body.
#[derive(Debug)]
struct HttpError {
    reason: Reason,
    message: String,
    details: Vec<(&'static str, String)>,
}

impl HttpError {
    fn invalid(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), details: Vec::new() }
    }
}

impl From<RouterError> for HttpError {
    fn from(error: RouterError) -> Self {
        Self { reason: error.reason(), message: error.to_string(), details: error.metadata() }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        pairdb_service::errors::http_response(self.reason, &self.message, &self.details)
    }
}

type HttpResult = Result<Response, HttpError>;

/// A router error in the HTTP edge's JSON form (with `Retry-After` where it says when to retry).
pub fn error_response(error: RouterError) -> Response {
    HttpError::from(error).into_response()
}

/// The client the admission middleware admitted (before the body was read), or, without the
/// middleware, the headers' identity.
fn client(
    api: &KvApi,
    headers: &HeaderMap,
    admitted: Option<Extension<Client>>,
) -> Result<Client, HttpError> {
    match admitted {
        Some(Extension(client)) => Ok(client),
        None => Ok(api.identify(headers.get("authorization").and_then(|v| v.to_str().ok()))?),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, HttpError> {
    match headers.get("idempotency-key") {
        None => Ok(String::new()),
        Some(value) => value.to_str().map(str::to_owned).map_err(|_| {
            HttpError::invalid(Reason::InvalidArgument, "Idempotency-Key must be visible ASCII")
        }),
    }
}

fn consistency(text: Option<&str>) -> Result<Option<Consistency>, HttpError> {
    match text.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => Ok(None),
        Some("one") => Ok(Some(Consistency::One)),
        Some("quorum") => Ok(Some(Consistency::Quorum)),
        Some("all") => Ok(Some(Consistency::All)),
        Some(other) => Err(HttpError::invalid(
            Reason::InvalidConsistency,
            format!("consistency {other:?}: use one, quorum or all"),
        )),
    }
}

fn context(text: Option<&str>) -> Result<Vec<u8>, HttpError> {
    match text {
        None | Some("") => Ok(Vec::new()),
        Some(text) => BASE64.decode(text).map_err(|_| {
            HttpError::invalid(Reason::InvalidContext, "context must be the base64 string a read returned")
        }),
    }
}

/// A write's condition: the `condition` field or query parameter (`if_absent`, `if_present`,
/// `if_context_matches`), or the HTTP preconditions `If-None-Match: *` (absent) and `If-Match: *`
/// (present). Giving both forms is refused unless they agree.
fn condition(text: Option<&str>, headers: &HeaderMap) -> Result<Option<WriteCondition>, HttpError> {
    let named = match text.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => None,
        Some(text) => Some(WriteCondition::parse(text).ok_or_else(|| {
            HttpError::invalid(
                Reason::InvalidArgument,
                format!("condition {text:?}: use if_absent, if_present or if_context_matches"),
            )
        })?),
    };
    let header = |name: &str| headers.get(name).map(|v| v.as_bytes().trim_ascii().to_vec());
    let from_header = match (header("if-none-match"), header("if-match")) {
        (None, None) => None,
        (Some(star), None) if star == b"*" => Some(WriteCondition::IfAbsent),
        (None, Some(star)) if star == b"*" => Some(WriteCondition::IfPresent),
        _ => {
            return Err(HttpError::invalid(
                Reason::InvalidArgument,
                "If-None-Match and If-Match take only `*`; to match a context use condition=if_context_matches",
            ));
        }
    };
    match (named, from_header) {
        (Some(named), Some(header)) if named != header => Err(HttpError::invalid(
            Reason::InvalidArgument,
            "the condition field and the If-* header disagree",
        )),
        (named, header) => Ok(named.or(header)),
    }
}

/// Query parameters of GET and DELETE.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyQuery {
    key: Option<String>,
    consistency: Option<String>,
    r: Option<u32>,
    w: Option<u32>,
    context: Option<String>,
    timeout_ms: Option<u32>,
    tenant_id: Option<String>,
    condition: Option<String>,
}

fn parse_query<T: serde::de::DeserializeOwned>(raw: Option<&str>) -> Result<T, HttpError> {
    let raw = raw.unwrap_or_default();
    // Decode by hand so invalid UTF-8 or a bad number is our 400, not a framework rejection.
    let mut map = serde_json::Map::new();
    for pair in raw.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name)?;
        let value = percent_decode(value)?;
        let value = match name.as_str() {
            "r" | "w" | "timeout_ms" | "limit" | "max_bytes" => {
                Value::from(value.parse::<u32>().map_err(|_| {
                    HttpError::invalid(Reason::InvalidArgument, format!("{name}: not a number"))
                })?)
            }
            "reverse" | "include_tombstones" | "conflicts_only" | "allow_partial" | "values" => {
                Value::from(match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(HttpError::invalid(
                            Reason::InvalidArgument,
                            format!("{name}: true or false"),
                        ));
                    }
                })
            }
            _ => Value::String(value),
        };
        if map.insert(name.clone(), value).is_some() {
            return Err(HttpError::invalid(
                Reason::InvalidArgument,
                format!("query parameter {name} given twice"),
            ));
        }
    }
    serde_json::from_value(Value::Object(map))
        .map_err(|error| HttpError::invalid(Reason::InvalidArgument, format!("query: {error}")))
}

/// A query component as `application/x-www-form-urlencoded` decodes it (`+` is a space, `%XX` a
/// byte), but strict where WHATWG is lenient: a `%` not followed by two hex digits and bytes that are
/// not UTF-8 are refused, never passed through or replaced, so a key is never silently changed.
fn percent_decode(text: &str) -> Result<String, HttpError> {
    let malformed = text.match_indices('%').any(|(at, _)| {
        !text.as_bytes().get(at + 1..at + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(HttpError::invalid(Reason::InvalidArgument, "malformed percent-encoding in the query"));
    }
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| HttpError::invalid(Reason::InvalidKey, "query is not valid UTF-8"))
}

/// Body of a put.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    key: Option<String>,
    value: Option<Value>,
    value_base64: Option<String>,
    consistency: Option<String>,
    w: Option<u32>,
    context: Option<String>,
    overwrite: Option<bool>,
    timeout_ms: Option<u32>,
    tenant_id: Option<String>,
    condition: Option<String>,
    ttl_ms: Option<u64>,
    expires_at_ms: Option<u64>,
}

/// The raw JSON body of a request (content type checked, at most `limit` bytes).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, HttpError> {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if media_type != "application/json" {
        return Err(HttpError::invalid(
            Reason::InvalidContentType,
            format!("content-type must be application/json, got {content_type:?}"),
        ));
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        if is_length_limit(&error) {
            HttpError::invalid(Reason::BodyTooLarge, format!("request body over {limit} bytes"))
        } else if pairdb_service::listener::is_body_timeout(&error) {
            HttpError::invalid(Reason::RequestTimeout, format!("request body: {error}"))
        } else {
            // A broken chunked encoding or a connection cut mid-body: the request is malformed.
            HttpError::invalid(Reason::InvalidArgument, format!("request body could not be read: {error}"))
        }
    })
}

async fn read_json_body(headers: &HeaderMap, body: Body) -> Result<PutBody, HttpError> {
    let bytes = read_body(headers, body, MAX_BODY_BYTES).await?;
    serde_json::from_slice(&bytes)
        .map_err(|error| HttpError::invalid(Reason::InvalidJson, format!("request body: {error}")))
}

/// True when reading a body failed because it was longer than the limit (not because it was broken).
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

fn value_bytes(body: &PutBody) -> Result<Vec<u8>, HttpError> {
    item_value(body.value.as_ref(), body.value_base64.as_deref())
}

/// A value given as any JSON (stored as its compact text) or as base64 bytes, exactly one of them.
fn item_value(value: Option<&Value>, value_base64: Option<&str>) -> Result<Vec<u8>, HttpError> {
    match (value, value_base64) {
        (Some(value), None) => {
            serde_json::to_vec(value).map_err(|e| HttpError::invalid(Reason::InvalidArgument, e.to_string()))
        }
        (None, Some(encoded)) => BASE64
            .decode(encoded)
            .map_err(|_| HttpError::invalid(Reason::InvalidArgument, "value_base64 is not base64")),
        (Some(_), Some(_)) => {
            Err(HttpError::invalid(Reason::InvalidArgument, "give value or value_base64, not both"))
        }
        (None, None) => {
            Err(HttpError::invalid(Reason::InvalidArgument, "value (any JSON) or value_base64 is required"))
        }
    }
}

fn vector_clock(vector: &VersionVector) -> Value {
    let clock: BTreeMap<String, u64> =
        vector.entries().map(|(actor, counter)| (format!("{:016x}", actor.0), counter)).collect();
    json!(clock)
}

fn ack_json(key: &str, ack: &WriteAck) -> Value {
    json!({
        "key": key,
        "context": BASE64.encode(&ack.context),
        "vector_clock": vector_clock(&ack.vector),
        "acks": ack.acks,
        "required": ack.required,
        "hinted_acks": ack.hinted_acks,
        "duplicate": ack.duplicate,
        "idempotency_key": ack.idempotency_key,
    })
}

fn read_json(key: &str, outcome: &ReadOutcome) -> Value {
    let values: Vec<&[u8]> =
        outcome.siblings.iter().map(|s| s.value.as_deref().unwrap_or_default()).collect();
    let decoded: Vec<Option<Value>> =
        values.iter().map(|v| serde_json::from_slice::<Value>(v).ok()).collect();
    let mut body = json!({
        "key": key,
        "found": true,
        "values": decoded.iter().map(|v| v.clone().unwrap_or(Value::Null)).collect::<Vec<_>>(),
        "values_base64": values.iter().map(|v| BASE64.encode(v)).collect::<Vec<_>>(),
        "siblings": values.iter().zip(&outcome.siblings).map(|(v, s)| json!({
            "value_base64": BASE64.encode(v),
            "timestamp_ms": s.timestamp_ms,
            "expires_at_ms": s.expires_at_ms,
        })).collect::<Vec<_>>(),
        "context": BASE64.encode(&outcome.context),
        "vector_clock": vector_clock(outcome.set.vector()),
    });
    if let [only] = values.as_slice() {
        match &decoded[0] {
            Some(value) => body["value"] = value.clone(),
            None => body["value_base64"] = Value::String(BASE64.encode(only)),
        }
    }
    body
}

fn ok(body: Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn put(
    api: &KvApi,
    client: &Client,
    headers: &HeaderMap,
    path_key: Option<String>,
    body: Body,
) -> HttpResult {
    let body = read_json_body(headers, body).await?;
    let key = match (path_key, &body.key) {
        (Some(path), None) => path,
        (Some(path), Some(named)) if &path == named => path,
        (Some(_), Some(_)) => {
            return Err(HttpError::invalid(Reason::InvalidArgument, "body key differs from the path"));
        }
        (None, Some(named)) => named.clone(),
        (None, None) => return Err(HttpError::invalid(Reason::InvalidKey, "key is required")),
    };
    let request = WriteRequest {
        tenant_id: body.tenant_id.clone().unwrap_or_default(),
        key: key.clone(),
        value: Some(value_bytes(&body)?),
        context: context(body.context.as_deref())?,
        overwrite: body.overwrite.unwrap_or(false),
        options: request_options(body.consistency.as_deref(), body.w, body.timeout_ms)?,
        idempotency_key: idempotency_key(headers)?,
        condition: condition(body.condition.as_deref(), headers)?,
        expiry: expiry(&body)?,
        touch: false,
    };
    let ack = api.write(client, request).await?;
    Ok(ok(ack_json(&key, &ack)))
}

/// Body of `POST /v1/kv:batch`: one JSON object with the batch's options and an `items` array.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    tenant_id: Option<String>,
    consistency: Option<String>,
    w: Option<u32>,
    timeout_ms: Option<u32>,
    items: Vec<BatchItemBody>,
}

/// One item: `op` is `put` (the default) or `delete`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItemBody {
    op: Option<String>,
    key: String,
    value: Option<Value>,
    value_base64: Option<String>,
    context: Option<String>,
    overwrite: Option<bool>,
    condition: Option<String>,
    ttl_ms: Option<u64>,
    expires_at_ms: Option<u64>,
}

impl BatchItemBody {
    fn item(self) -> Result<BatchItem, HttpError> {
        let delete = match self.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("put") => false,
            Some("delete") => true,
            Some(other) => {
                return Err(HttpError::invalid(
                    Reason::InvalidArgument,
                    format!("op {other:?}: put or delete"),
                ));
            }
        };
        let value = match delete {
            true if self.value.is_some() || self.value_base64.is_some() => {
                return Err(HttpError::invalid(Reason::InvalidArgument, "a delete item takes no value"));
            }
            true => None,
            false => Some(item_value(self.value.as_ref(), self.value_base64.as_deref())?),
        };
        Ok(BatchItem {
            key: self.key,
            value,
            context: context(self.context.as_deref())?,
            overwrite: self.overwrite.unwrap_or(delete),
            condition: condition(self.condition.as_deref(), &HeaderMap::new())?,
            expiry: Requested::from_wire(self.ttl_ms.unwrap_or(0), self.expires_at_ms.unwrap_or(0))
                .map_err(|e| HttpError::invalid(Reason::InvalidArgument, e.to_string()))?,
        })
    }
}

/// `POST /v1/kv:batch`: puts and deletes of one tenant, one result per item (HTTP 200 even when
/// some items failed: each result says).
async fn batch(State(api): State<KvApi>, admitted: Admitted, headers: HeaderMap, body: Body) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    let bytes = read_body(&headers, body, MAX_BATCH_BODY_BYTES).await?;
    let body: BatchBody = serde_json::from_slice(&bytes)
        .map_err(|error| HttpError::invalid(Reason::InvalidJson, format!("request body: {error}")))?;
    let keys: Vec<String> = body.items.iter().map(|i| i.key.clone()).collect();
    let items = body.items.into_iter().map(BatchItemBody::item).collect::<Result<Vec<_>, _>>()?;
    let request = WriteManyRequest {
        tenant_id: body.tenant_id.unwrap_or_default(),
        items,
        options: request_options(body.consistency.as_deref(), body.w, body.timeout_ms)?,
        idempotency_key: idempotency_key(&headers)?,
    };
    let reply = api.write_many(&client, request).await?;
    let results: Vec<Value> = keys
        .iter()
        .zip(&reply.results)
        .map(|(key, result)| match result {
            Ok(ack) => ack_json(key, ack),
            Err(error) => json!({"key": key, "error": {
                "code": pairdb_service::errors::code_name(pairdb_service::errors::grpc_code(error.reason())),
                "reason": error.reason().as_str(),
                "message": error.to_string(),
                "details": error.metadata().into_iter().map(|(k, v)| (k.to_owned(), Value::String(v))).collect::<serde_json::Map<_, _>>(),
            }}),
        })
        .collect();
    Ok(ok(
        json!({"results": results, "duplicate": reply.duplicate, "idempotency_key": reply.idempotency_key}),
    ))
}

/// The options of a request as the HTTP edge reads them: a level, an explicit R or W, a timeout.
fn request_options(
    level: Option<&str>,
    explicit: Option<u32>,
    timeout_ms: Option<u32>,
) -> Result<RequestOptions, HttpError> {
    Ok(RequestOptions {
        consistency: consistency(level)?,
        explicit: explicit.unwrap_or(0),
        strict_quorum: false,
        timeout_ms: timeout_ms.unwrap_or(0),
    })
}

/// A put's or touch's expiry: `ttl_ms` or `expires_at_ms` (at most one).
fn expiry(body: &PutBody) -> Result<Requested, HttpError> {
    Requested::from_wire(body.ttl_ms.unwrap_or(0), body.expires_at_ms.unwrap_or(0))
        .map_err(|e| HttpError::invalid(Reason::InvalidArgument, e.to_string()))
}

/// `POST /v1/kv:touch` (`{"key", "context", "ttl_ms" | "expires_at_ms", ...}`): the values the
/// context names get the new expiry.
async fn touch(State(api): State<KvApi>, admitted: Admitted, headers: HeaderMap, body: Body) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    let body = read_json_body(&headers, body).await?;
    if body.value.is_some()
        || body.value_base64.is_some()
        || body.overwrite.is_some()
        || body.condition.is_some()
    {
        return Err(HttpError::invalid(
            Reason::InvalidArgument,
            "a touch takes no value, overwrite or condition",
        ));
    }
    let key = body.key.clone().ok_or_else(|| HttpError::invalid(Reason::InvalidKey, "key is required"))?;
    let request = WriteRequest {
        tenant_id: body.tenant_id.clone().unwrap_or_default(),
        key: key.clone(),
        value: None,
        context: context(body.context.as_deref())?,
        overwrite: false,
        options: request_options(body.consistency.as_deref(), body.w, body.timeout_ms)?,
        idempotency_key: idempotency_key(&headers)?,
        condition: None,
        expiry: expiry(&body)?,
        touch: true,
    };
    let ack = api.write(&client, request).await?;
    Ok(ok(ack_json(&key, &ack)))
}

async fn get(api: &KvApi, client: &Client, path_key: Option<String>, raw_query: Option<&str>) -> HttpResult {
    let query: KeyQuery = parse_query(raw_query)?;
    let key =
        path_key.or(query.key).ok_or_else(|| HttpError::invalid(Reason::InvalidKey, "key is required"))?;
    let request = ReadRequest {
        tenant_id: query.tenant_id.unwrap_or_default(),
        key: key.clone(),
        options: request_options(query.consistency.as_deref(), query.r, query.timeout_ms)?,
    };
    let outcome = api.get(client, request).await?;
    Ok(ok(read_json(&key, &outcome)))
}

async fn delete(
    api: &KvApi,
    client: &Client,
    headers: &HeaderMap,
    path_key: Option<String>,
    raw_query: Option<&str>,
) -> HttpResult {
    let query: KeyQuery = parse_query(raw_query)?;
    let key =
        path_key.or(query.key).ok_or_else(|| HttpError::invalid(Reason::InvalidKey, "key is required"))?;
    let request = WriteRequest {
        tenant_id: query.tenant_id.unwrap_or_default(),
        key: key.clone(),
        value: None,
        context: context(query.context.as_deref())?,
        overwrite: true,
        options: request_options(query.consistency.as_deref(), query.w, query.timeout_ms)?,
        idempotency_key: idempotency_key(headers)?,
        condition: condition(query.condition.as_deref(), headers)?,
        expiry: Requested::TenantDefault,
        touch: false,
    };
    let ack = api.write(client, request).await?;
    Ok(ok(ack_json(&key, &ack)))
}

type Admitted = Option<Extension<Client>>;

async fn post_key_value(
    State(api): State<KvApi>,
    admitted: Admitted,
    headers: HeaderMap,
    body: Body,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    put(&api, &client, &headers, None, body).await
}

async fn get_key_value(
    State(api): State<KvApi>,
    admitted: Admitted,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    get(&api, &client, None, query.as_deref()).await
}

async fn delete_key_value(
    State(api): State<KvApi>,
    admitted: Admitted,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    delete(&api, &client, &headers, None, query.as_deref()).await
}

/// Query parameters of a listing (`GET /v1/kv`, `GET /v1/groups/{group}/kv`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    prefix: Option<String>,
    start_after: Option<String>,
    end_before: Option<String>,
    limit: Option<u32>,
    page_token: Option<String>,
    reverse: Option<bool>,
    include_tombstones: Option<bool>,
    conflicts_only: Option<bool>,
    allow_partial: Option<bool>,
    /// A scan: every key with its values.
    values: Option<bool>,
    max_bytes: Option<u32>,
    consistency: Option<String>,
    r: Option<u32>,
    timeout_ms: Option<u32>,
    tenant_id: Option<String>,
}

async fn list(api: &KvApi, client: &Client, group: String, raw_query: Option<&str>) -> HttpResult {
    let query: ListQuery = parse_query(raw_query)?;
    let with_values = query.values.unwrap_or(false);
    let request = ListRequest {
        tenant_id: query.tenant_id.unwrap_or_default(),
        prefix: query.prefix.unwrap_or_default(),
        start_after: query.start_after.unwrap_or_default(),
        end_before: query.end_before.unwrap_or_default(),
        limit: query.limit.unwrap_or(0),
        page_token: query.page_token.unwrap_or_default(),
        group,
        reverse: query.reverse.unwrap_or(false),
        include_tombstones: query.include_tombstones.unwrap_or(false),
        conflicts_only: query.conflicts_only.unwrap_or(false),
        options: request_options(query.consistency.as_deref(), query.r, query.timeout_ms)?,
        allow_partial: query.allow_partial.unwrap_or(false),
        max_bytes: query.max_bytes.unwrap_or(0),
    };
    let page = api.list(client, request, with_values).await?;
    let keys: Vec<Value> = page.entries.iter().map(|entry| listed_json(entry, with_values)).collect();
    Ok(ok(json!({
        "keys": keys,
        "next_page_token": page.next_page_token,
        "unavailable_partitions": page.unavailable_partitions,
    })))
}

fn listed_json(entry: &ListedEntry, with_values: bool) -> Value {
    let mut body = json!({
        "key": entry.key,
        "sibling_count": entry.siblings.len(),
        "value_bytes": entry.value_bytes(),
        "tombstone": entry.is_tombstone(),
        "context": BASE64.encode(&entry.context),
    });
    if with_values {
        let values: Vec<&[u8]> =
            entry.siblings.iter().map(|s| s.value.as_deref().unwrap_or_default()).collect();
        body["values"] = Value::from(
            values
                .iter()
                .map(|v| serde_json::from_slice::<Value>(v).unwrap_or(Value::Null))
                .collect::<Vec<_>>(),
        );
        body["values_base64"] = Value::from(values.iter().map(|v| BASE64.encode(v)).collect::<Vec<_>>());
        body["vector_clock"] = vector_clock(entry.set.vector());
    }
    body
}

async fn list_resource(
    State(api): State<KvApi>,
    admitted: Admitted,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    list(&api, &client, String::new(), query.as_deref()).await
}

async fn list_group(
    State(api): State<KvApi>,
    admitted: Admitted,
    Path(group): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    if group.is_empty() {
        return Err(HttpError::invalid(Reason::InvalidListing, "the group is empty"));
    }
    list(&api, &client, group, query.as_deref()).await
}

async fn put_resource(
    State(api): State<KvApi>,
    admitted: Admitted,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    put(&api, &client, &headers, Some(key), body).await
}

async fn get_resource(
    State(api): State<KvApi>,
    admitted: Admitted,
    Path(key): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    get(&api, &client, Some(key), query.as_deref()).await
}

async fn delete_resource(
    State(api): State<KvApi>,
    admitted: Admitted,
    Path(key): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> HttpResult {
    let client = client(&api, &headers, admitted)?;
    delete(&api, &client, &headers, Some(key), query.as_deref()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_strictly() {
        let query: KeyQuery = parse_query(Some("key=a%20b+c&consistency=ALL&r=2")).unwrap();
        assert_eq!(query.key.as_deref(), Some("a b c"));
        assert_eq!(consistency(query.consistency.as_deref()).unwrap(), Some(Consistency::All));
        assert_eq!(query.r, Some(2));
        assert_eq!(parse_query::<KeyQuery>(Some("key=%ff")).unwrap_err().reason, "INVALID_KEY");
        assert_eq!(parse_query::<KeyQuery>(Some("key=a&key=b")).unwrap_err().reason, "INVALID_ARGUMENT");
        assert_eq!(parse_query::<KeyQuery>(Some("r=two")).unwrap_err().reason, "INVALID_ARGUMENT");
        assert_eq!(parse_query::<KeyQuery>(Some("bogus=1")).unwrap_err().reason, "INVALID_ARGUMENT");
        assert_eq!(parse_query::<KeyQuery>(Some("key=%4")).unwrap_err().reason, "INVALID_ARGUMENT");
        assert_eq!(consistency(Some("most")).unwrap_err().reason, "INVALID_CONSISTENCY");
    }

    #[test]
    fn json_values_round_trip_and_bytes_stay_lossless() {
        let outcome_of = |value: Vec<u8>| {
            let mut set = pairdb_core::dvv::VersionSet::new();
            set.update(&VersionVector::new(), pairdb_core::dvv::Actor(1), Some(value), 1, None).unwrap();
            ReadOutcome { siblings: set.siblings().to_vec(), set, context: Vec::new(), replicas: Vec::new() }
        };
        let stored = serde_json::to_vec(&json!({"a": [1, 2]})).unwrap();
        let response = outcome_of(stored);
        assert_eq!(read_json("k", &response)["value"], json!({"a": [1, 2]}));
        let raw = outcome_of(vec![0xff]);
        let body = read_json("k", &raw);
        assert_eq!(body["value_base64"], "/w==");
        assert_eq!(body["values"], json!([null]));
    }
}
