//! The admin API over HTTP/JSON: every route, every error reason, the error body shape, and bad
//! input (malformed JSON, unknown fields) as 400 rather than 500.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::{ADMIN_TOKEN, HttpResponse, Server, test_config};
use serde_json::Value;

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    common::http(addr, method, path, Some(ADMIN_TOKEN), body).await.unwrap()
}

/// Asserts an error response: status, gRPC code name and reason.
fn assert_error(response: &HttpResponse, status: u16, code: &str, reason: &str) {
    assert_eq!(response.status, status, "{response:?}");
    let body = response.json();
    assert_eq!(body["error"]["code"], code, "{response:?}");
    assert_eq!(body["error"]["reason"], reason, "{response:?}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body["error"]["details"].is_object());
}

async fn wait_completed(addr: SocketAddr, migration_id: &str) -> Value {
    common::eventually(std::time::Duration::from_secs(20), "migration completion", || async {
        let body = call(addr, "GET", &format!("/v1/admin/migrations/{migration_id}"), None).await.json();
        (body["state"] == "completed").then_some(body)
    })
    .await
    .unwrap()
}

async fn add_node(addr: SocketAddr, id: u32) -> HttpResponse {
    call(
        addr,
        "POST",
        "/v1/admin/storage-nodes",
        Some(&format!(r#"{{"node_id": {id}, "address": "127.0.0.1:{}"}}"#, 7200 + id)),
    )
    .await
}

#[tokio::test]
async fn tenants_and_api_keys_over_http() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let addr = server.addr;

    let response = call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "acme"}"#)).await;
    assert_error(&response, 400, "INVALID_ARGUMENT", "INVALID_REPLICATION_FACTOR");
    for id in 1..=3 {
        let response = add_node(addr, id).await;
        assert_eq!(response.status, 201, "{response:?}");
        if let Some(migration) = response.json()["migration_id"].as_str() {
            wait_completed(addr, migration).await;
        }
    }

    let response = call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "acme"}"#)).await;
    assert_eq!(response.status, 201, "{response:?}");
    let tenant = response.json();
    assert_eq!(tenant["replication_factor"], 3);
    assert_eq!(tenant["default_consistency"], "quorum");
    assert_eq!(tenant["conflict_mode"], "siblings");
    assert_eq!(tenant["max_value_bytes"], 1024 * 1024);
    assert_eq!(tenant["max_siblings"], 64);
    assert_eq!(tenant["rate_limit_ops_per_sec"], 0);
    assert_eq!(tenant["key_groups"], "none");

    assert_error(
        &call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "acme"}"#)).await,
        409,
        "ALREADY_EXISTS",
        "TENANT_EXISTS",
    );
    assert_error(
        &call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "Nope!"}"#)).await,
        400,
        "INVALID_ARGUMENT",
        "INVALID_TENANT_ID",
    );
    for n in [4, 8] {
        let body = format!(r#"{{"tenant_id": "big", "replication_factor": {n}}}"#);
        assert_error(
            &call(addr, "POST", "/v1/tenants", Some(&body)).await,
            400,
            "INVALID_ARGUMENT",
            "INVALID_REPLICATION_FACTOR",
        );
    }
    // Bad input is a 400, never a 500.
    for body in [
        "{",
        "[]",
        r#"{"tenant_id": 5}"#,
        r#"{"tenant_id": "x", "replication_factor": -1}"#,
        r#"{"tenant_id": "x", "colour": "blue"}"#,
        r#"{"tenant_id": "x", "default_consistency": "most"}"#,
        r#"{"tenant_id": "x", "key_groups": "hash-tags"}"#,
        r#"{"tenant_id": "x", "key_groups": 2}"#,
        "",
    ] {
        assert_error(
            &call(addr, "POST", "/v1/tenants", Some(body)).await,
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        );
    }
    let created = call(
        addr,
        "POST",
        "/v1/tenants",
        Some(r#"{"tenant_id": "fast", "replication_factor": 1, "default_consistency": "one", "conflict_mode": "lww", "rate_limit_ops_per_sec": 10, "rate_limit_burst": 30, "strict_quorum": true}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.json()["conflict_mode"], "lww");
    assert_eq!(created.json()["rate_limit_burst"], 30);
    let unknown =
        call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "x", "key_groups": "tags"}"#)).await.json();
    assert_eq!(unknown["error"]["message"], r#"key_groups "tags": use none or hash_tag"#);
    let grouped = call(
        addr,
        "POST",
        "/v1/tenants",
        Some(r#"{"tenant_id": "grouped", "replication_factor": 1, "key_groups": "hash_tag"}"#),
    )
    .await;
    assert_eq!(grouped.status, 201, "{grouped:?}");
    assert_eq!(grouped.json()["key_groups"], "hash_tag");

    let got = call(addr, "GET", "/v1/tenants/acme", None).await;
    assert_eq!((got.status, got.json()["tenant_id"].as_str()), (200, Some("acme")));
    assert_error(&call(addr, "GET", "/v1/tenants/ghost", None).await, 404, "NOT_FOUND", "TENANT_NOT_FOUND");
    let list = call(addr, "GET", "/v1/tenants", None).await.json();
    let listed: Vec<(&str, &str)> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tenant_id"].as_str().unwrap(), t["key_groups"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("acme", "none"), ("fast", "none"), ("grouped", "hash_tag")]);

    // Key groups are fixed at creation: an update naming them is refused and changes nothing.
    for body in [r#"{"key_groups": "none"}"#, r#"{"key_groups": "hash_tag", "max_siblings": 8}"#] {
        let refused = call(addr, "PATCH", "/v1/tenants/grouped", Some(body)).await;
        assert_error(&refused, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT");
        let message = refused.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("key_groups is fixed when a tenant is created"), "{message}");
    }
    let patched = call(addr, "PATCH", "/v1/tenants/grouped", Some(r#"{"conflict_mode": "lww"}"#)).await;
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(patched.json()["tenant"]["key_groups"], "hash_tag");
    let got = call(addr, "GET", "/v1/tenants/grouped", None).await.json();
    assert_eq!((got["key_groups"].as_str(), got["max_siblings"].as_u64()), (Some("hash_tag"), Some(64)));

    let patched =
        call(addr, "PATCH", "/v1/tenants/acme", Some(r#"{"default_consistency": "all", "max_siblings": 8}"#))
            .await;
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(patched.json()["tenant"]["default_consistency"], "all");
    assert_eq!(patched.json()["migration_id"], Value::Null);
    assert_error(
        &call(addr, "PATCH", "/v1/tenants/acme", Some(r#"{"bogus": 1}"#)).await,
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    );
    assert_error(
        &call(addr, "PATCH", "/v1/tenants/ghost", Some("{}")).await,
        404,
        "NOT_FOUND",
        "TENANT_NOT_FOUND",
    );
    let changed = call(addr, "PATCH", "/v1/tenants/acme", Some(r#"{"replication_factor": 2}"#)).await.json();
    let migration = wait_completed(addr, changed["migration_id"].as_str().unwrap()).await;
    assert_eq!(
        (migration["kind"].as_str(), migration["tenant_id"].as_str()),
        (Some("replication_factor"), Some("acme"))
    );

    let put =
        call(addr, "PUT", "/v1/tenants/acme/replication-factor", Some(r#"{"replication_factor": 3}"#)).await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(put.json()["tenant"]["replication_factor"], 3);
    wait_completed(addr, put.json()["migration_id"].as_str().unwrap()).await;
    for n in [0, 4, 9] {
        let body = format!(r#"{{"replication_factor": {n}}}"#);
        let response = call(addr, "PUT", "/v1/tenants/acme/replication-factor", Some(&body)).await;
        assert_error(&response, 400, "INVALID_ARGUMENT", "INVALID_REPLICATION_FACTOR");
    }
    assert_error(
        &call(addr, "PUT", "/v1/tenants/ghost/replication-factor", Some(r#"{"replication_factor": 1}"#))
            .await,
        404,
        "NOT_FOUND",
        "TENANT_NOT_FOUND",
    );

    // API keys: both route families; the secret appears only in the creation response.
    let created = call(addr, "POST", "/v1/tenants/acme/api-keys", Some(r#"{"description": "app"}"#)).await;
    assert_eq!(created.status, 201, "{created:?}");
    let secret = created.json()["secret"].as_str().unwrap().to_owned();
    let key_id = created.json()["api_key"]["key_id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with(&format!("pdb_{key_id}_")));
    let flat = call(addr, "POST", "/v1/api-keys", Some(r#"{"tenant_id": "fast"}"#)).await;
    assert_eq!(flat.status, 201, "{flat:?}");
    assert_error(
        &call(addr, "POST", "/v1/api-keys", Some(r#"{"tenant_id": "ghost"}"#)).await,
        404,
        "NOT_FOUND",
        "TENANT_NOT_FOUND",
    );
    assert_error(
        &call(addr, "POST", "/v1/tenants/ghost/api-keys", Some("{}")).await,
        404,
        "NOT_FOUND",
        "TENANT_NOT_FOUND",
    );
    for listing in [
        call(addr, "GET", "/v1/tenants/acme/api-keys", None).await,
        call(addr, "GET", "/v1/api-keys?tenant_id=acme", None).await,
        call(addr, "GET", "/v1/api-keys", None).await,
    ] {
        assert_eq!(listing.status, 200);
        assert!(!listing.body.contains(&secret), "a list response carries the secret: {}", listing.body);
        assert!(listing.body.contains(&key_id));
    }
    assert_eq!(call(addr, "GET", "/v1/api-keys", None).await.json()["api_keys"].as_array().unwrap().len(), 2);
    let revoked = call(addr, "DELETE", &format!("/v1/api-keys/{key_id}"), None).await;
    assert_eq!((revoked.status, revoked.json()["api_key"]["revoked"].as_bool()), (200, Some(true)));
    assert_error(
        &call(addr, "DELETE", "/v1/api-keys/unknown", None).await,
        404,
        "NOT_FOUND",
        "API_KEY_NOT_FOUND",
    );

    // Deletion is accepted and runs until every storage node purged the tenant's data.
    let deleted = call(addr, "DELETE", "/v1/tenants/acme", None).await;
    assert_eq!(deleted.status, 202, "{deleted:?}");
    let body = deleted.json();
    assert_eq!(body["state"], "deleting");
    assert_eq!(body["purge"]["nodes_total"], 3, "{body}");
    let again = call(addr, "DELETE", "/v1/tenants/acme", None).await;
    assert_eq!((again.status, again.json()["state"].clone()), (202, serde_json::json!("deleting")));
    assert_error(
        &call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "acme"}"#)).await,
        412,
        "FAILED_PRECONDITION",
        "TENANT_BEING_DELETED",
    );
    assert_error(
        &call(addr, "DELETE", "/v1/tenants/nobody", None).await,
        404,
        "NOT_FOUND",
        "TENANT_NOT_FOUND",
    );
    assert_eq!(call(addr, "GET", "/v1/api-keys?tenant_id=fast", None).await.status, 200);
    server.shutdown().await
}

/// Expiry settings over HTTP: set by POST, shown by GET (one tenant and the list), changed one at a
/// time by PATCH (the other kept, 0 removes); a default above the cap or a setting above 100 years
/// is a 400 whose message says why.
#[tokio::test]
async fn ttl_settings_over_http() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let addr = server.addr;
    assert_eq!(add_node(addr, 1).await.status, 201);

    let plain =
        call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "plain", "replication_factor": 1}"#)).await;
    assert_eq!(plain.status, 201, "{plain:?}");
    assert_eq!((&plain.json()["default_ttl_ms"], &plain.json()["max_ttl_ms"]), (&0.into(), &0.into()));
    let created = call(
        addr,
        "POST",
        "/v1/tenants",
        Some(r#"{"tenant_id": "web", "replication_factor": 1, "default_ttl_ms": 60000, "max_ttl_ms": 3600000}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{created:?}");
    let ttls = |tenant: &Value| (tenant["default_ttl_ms"].as_u64(), tenant["max_ttl_ms"].as_u64());
    assert_eq!(ttls(&created.json()), (Some(60_000), Some(3_600_000)));
    assert_eq!(
        ttls(&call(addr, "GET", "/v1/tenants/web", None).await.json()),
        (Some(60_000), Some(3_600_000))
    );
    let list = call(addr, "GET", "/v1/tenants", None).await.json();
    let listed: Vec<(Option<u64>, Option<u64>)> =
        list["tenants"].as_array().unwrap().iter().map(ttls).collect();
    assert_eq!(listed, [(Some(0), Some(0)), (Some(60_000), Some(3_600_000))]);

    let patched = call(addr, "PATCH", "/v1/tenants/web", Some(r#"{"max_ttl_ms": 120000}"#)).await;
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(ttls(&patched.json()["tenant"]), (Some(60_000), Some(120_000)), "the default is kept");
    let patched = call(addr, "PATCH", "/v1/tenants/web", Some(r#"{"default_ttl_ms": 0}"#)).await;
    assert_eq!(ttls(&patched.json()["tenant"]), (Some(0), Some(120_000)), "0 removes the default");

    for (method, path, body, why) in [
        (
            "POST",
            "/v1/tenants",
            r#"{"tenant_id": "bad", "replication_factor": 1, "default_ttl_ms": 2000, "max_ttl_ms": 1000}"#,
            "default_ttl_ms 2000 is above max_ttl_ms 1000",
        ),
        (
            "POST",
            "/v1/tenants",
            r#"{"tenant_id": "bad", "replication_factor": 1, "max_ttl_ms": 3153600000001}"#,
            "max_ttl_ms 3153600000001 is above the maximum of 3153600000000 ms (100 years",
        ),
        (
            "PATCH",
            "/v1/tenants/web",
            r#"{"default_ttl_ms": 120001}"#,
            "default_ttl_ms 120001 is above max_ttl_ms 120000",
        ),
    ] {
        let refused = call(addr, method, path, Some(body)).await;
        assert_error(&refused, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT");
        let message = refused.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(why), "{body}: {message}");
    }
    for body in [r#"{"max_ttl_ms": -1}"#, r#"{"default_ttl_ms": "1h"}"#] {
        assert_error(
            &call(addr, "PATCH", "/v1/tenants/web", Some(body)).await,
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        );
    }
    assert_error(&call(addr, "GET", "/v1/tenants/bad", None).await, 404, "NOT_FOUND", "TENANT_NOT_FOUND");
    assert_eq!(ttls(&call(addr, "GET", "/v1/tenants/web", None).await.json()), (Some(0), Some(120_000)));
    server.shutdown().await
}

#[tokio::test]
async fn storage_nodes_and_migrations_over_http() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let addr = server.addr;

    let first = add_node(addr, 1).await;
    assert_eq!(first.status, 201, "{first:?}");
    let first = first.json();
    assert_eq!(
        (first["node"]["status"].as_str(), first["node"]["in_ring"].as_bool()),
        (Some("active"), Some(true))
    );
    assert_eq!(first["migration_id"], Value::Null, "bootstrap needs no migration");
    for id in 2..=4 {
        let added = add_node(addr, id).await.json();
        assert_eq!(added["node"]["status"], "joining");
        let migration = wait_completed(addr, added["migration_id"].as_str().unwrap()).await;
        assert_eq!(migration["kind"], "add_node");
        assert_eq!(migration["progress"]["partitions_done"], migration["progress"]["partitions_total"]);
    }
    assert_error(&add_node(addr, 2).await, 409, "ALREADY_EXISTS", "NODE_EXISTS");
    assert_error(
        &call(addr, "POST", "/v1/admin/storage-nodes", Some(r#"{"address": "bad address"}"#)).await,
        400,
        "INVALID_ARGUMENT",
        "INVALID_NODE",
    );
    assert_error(
        &call(addr, "POST", "/v1/admin/storage-nodes", Some(r#"{"node_id": "one"}"#)).await,
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    );

    let node = call(addr, "GET", "/v1/admin/storage-nodes/2", None).await;
    assert_eq!((node.status, node.json()["status"].as_str()), (200, Some("active")));
    assert!(node.json()["stats"].is_object());
    assert_error(
        &call(addr, "GET", "/v1/admin/storage-nodes/77", None).await,
        404,
        "NOT_FOUND",
        "NODE_NOT_FOUND",
    );
    assert_error(
        &call(addr, "GET", "/v1/admin/storage-nodes/abc", None).await,
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    );
    let nodes = call(addr, "GET", "/v1/admin/storage-nodes", None).await.json();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 4);

    // Clock offsets the nodes report (node 4 reports none) and meta's verdict on them (bound 1000 ms).
    let mut cluster = server.cluster().await?;
    for (node_id, offset) in [(1, Some(20)), (2, Some(1_500)), (3, Some(-1_500)), (4, None)] {
        let stats = pairdb_proto::admin::v1::NodeStats {
            clock_offset_ms: offset.unwrap_or(0),
            clock_offset_known: offset.is_some(),
            ..Default::default()
        };
        let beat =
            pairdb_proto::cluster::v1::HeartbeatRequest { node_id, stats: Some(stats), ..Default::default() };
        cluster.heartbeat(beat).await?;
    }
    let listed = call(addr, "GET", "/v1/admin/storage-nodes", None).await.json();
    let clocks: Vec<(Value, Value)> = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| (node["stats"]["clock_offset_ms"].clone(), node["clock_skewed"].clone()))
        .collect();
    assert_eq!(
        clocks,
        [
            (Value::from(20), Value::from(false)),
            (Value::from(1_500), Value::from(true)),
            (Value::from(-1_500), Value::from(true)),
            (Value::Null, Value::from(false)),
        ]
    );
    let node = call(addr, "GET", "/v1/admin/storage-nodes/2", None).await.json();
    assert_eq!(
        (&node["stats"]["clock_offset_ms"], &node["clock_skewed"]),
        (&Value::from(1_500), &Value::from(true))
    );

    let patched = call(addr, "PATCH", "/v1/admin/storage-nodes/2", Some(r#"{"weight": 2}"#)).await;
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(patched.json()["node"]["weight"], 2);
    let migration = wait_completed(addr, patched.json()["migration_id"].as_str().unwrap()).await;
    assert_eq!(migration["kind"], "node_weight");
    assert_error(
        &call(addr, "PATCH", "/v1/admin/storage-nodes/77", Some(r#"{"weight": 2}"#)).await,
        404,
        "NOT_FOUND",
        "NODE_NOT_FOUND",
    );
    assert_error(
        &call(addr, "PATCH", "/v1/admin/storage-nodes/2", Some(r#"{"weight": 0.5}"#)).await,
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    );

    // N=3 with four active nodes: one may go, then no more.
    assert_eq!(
        call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "acme", "replication_factor": 3}"#))
            .await
            .status,
        201
    );
    let drained = call(addr, "DELETE", "/v1/admin/storage-nodes/4", None).await;
    assert_eq!(drained.status, 200, "{drained:?}");
    let migration = wait_completed(addr, drained.json()["migration_id"].as_str().unwrap()).await;
    assert_eq!(migration["kind"], "drain_node");
    let response = call(addr, "DELETE", "/v1/admin/storage-nodes/3?force=true", None).await;
    assert_error(&response, 412, "FAILED_PRECONDITION", "NODE_IN_USE");
    assert_error(
        &call(addr, "DELETE", "/v1/admin/storage-nodes/4", None).await,
        404,
        "NOT_FOUND",
        "NODE_NOT_FOUND",
    );
    assert_error(
        &call(addr, "DELETE", "/v1/admin/storage-nodes/3?force=maybe", None).await,
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    );
    let added = add_node(addr, 5).await.json();
    wait_completed(addr, added["migration_id"].as_str().unwrap()).await;
    let forced = call(addr, "DELETE", "/v1/admin/storage-nodes/5?force=true", None).await;
    assert_eq!(forced.status, 200, "{forced:?}");
    let last_migration = forced.json()["migration_id"].as_str().unwrap().to_owned();
    assert_eq!(wait_completed(addr, &last_migration).await["kind"], "remove_node");
    assert_eq!(call(addr, "GET", "/v1/admin/storage-nodes/5", None).await.json()["status"], "removed");

    let migrations = call(addr, "GET", "/v1/admin/migrations", None).await.json();
    let migrations = migrations["migrations"].as_array().unwrap();
    assert_eq!(migrations[0]["migration_id"].as_str(), Some(last_migration.as_str()), "newest first");
    assert_error(
        &call(addr, "GET", "/v1/admin/migrations/nope", None).await,
        404,
        "NOT_FOUND",
        "MIGRATION_NOT_FOUND",
    );
    assert_error(
        &call(addr, "POST", "/v1/admin/migrations/nope/cancel", None).await,
        404,
        "NOT_FOUND",
        "MIGRATION_NOT_FOUND",
    );
    assert_error(
        &call(addr, "POST", &format!("/v1/admin/migrations/{last_migration}/cancel"), None).await,
        412,
        "FAILED_PRECONDITION",
        "MIGRATION_FINISHED",
    );
    server.shutdown().await
}

/// Issue 15's contract slips on meta: the Bearer scheme is case-insensitive (one rule with the
/// router), an explicit replication factor of 0 is refused on create as on update, and a body over
/// the limit gets the JSON error body (reason BODY_TOO_LARGE), not axum's plain text.
#[tokio::test]
async fn bearer_rule_zero_replication_factor_and_oversized_bodies() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let addr = server.addr;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let request = format!(
            "GET /v1/tenants HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {scheme} {ADMIN_TOKEN}\r\n\r\n"
        );
        let response = common::http_raw(addr, request.as_bytes()).await?;
        assert_eq!(response.status, 200, "{scheme}: {response:?}");
    }
    let basic = format!(
        "GET /v1/tenants HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic {ADMIN_TOKEN}\r\n\r\n"
    );
    assert_error(&common::http_raw(addr, basic.as_bytes()).await?, 401, "UNAUTHENTICATED", "UNAUTHENTICATED");

    let zero =
        call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "zero", "replication_factor": 0}"#)).await;
    assert_error(&zero, 400, "INVALID_ARGUMENT", "INVALID_REPLICATION_FACTOR");
    assert!(
        call(addr, "GET", "/v1/tenants/zero", None).await.status == 404,
        "a refused create stored a tenant"
    );

    let oversized = format!(r#"{{"tenant_id": "big", "description": "{}"}}"#, "x".repeat(3 * 1024 * 1024));
    let response = call(addr, "POST", "/v1/tenants", Some(&oversized)).await;
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.reason(), "BODY_TOO_LARGE", "{response:?}");
    server.shutdown().await
}

#[tokio::test]
async fn authentication_and_unknown_paths() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let addr = server.addr;
    for (method, path) in [
        ("GET", "/v1/tenants"),
        ("POST", "/v1/tenants"),
        ("DELETE", "/v1/api-keys/x"),
        ("GET", "/v1/admin/migrations"),
    ] {
        let anonymous = common::http(addr, method, path, None, Some("{}")).await?;
        assert_error(&anonymous, 401, "UNAUTHENTICATED", "UNAUTHENTICATED");
        let wrong = common::http(addr, method, path, Some("wrong-token"), Some("{}")).await?;
        assert_error(&wrong, 401, "UNAUTHENTICATED", "UNAUTHENTICATED");
    }
    // Health and metrics need no token.
    assert_eq!(common::http(addr, "GET", "/health/live", None, None).await?.status, 200);
    assert_eq!(common::http(addr, "GET", "/health/ready", None, None).await?.status, 200);
    let metrics = common::http(addr, "GET", "/metrics", None, None).await?;
    assert!(metrics.body.contains("pairdb_meta_is_leader"), "{}", metrics.body);
    let unknown = call(addr, "GET", "/v1/nothing/here", None).await;
    assert_eq!((unknown.status, unknown.reason().as_str()), (404, "NOT_FOUND"));
    server.shutdown().await?;

    // --no-auth serves without a token.
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.admin_token = None;
    config.no_auth = true;
    let open = Server::start(config).await?;
    assert_eq!(common::http(open.addr, "GET", "/v1/tenants", None, None).await?.status, 200);
    open.shutdown().await
}

/// A body that stops arriving is cut off after the listener's deadline with 408 REQUEST_TIMEOUT in
/// the JSON error shape (a client trickling a body cannot hold a handler forever).
#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.service.listener.http_body_timeout_ms = 300;
    let server = Server::start(config).await?;
    let request = format!(
        "POST /v1/tenants HTTP/1.1\r\nHost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\nConnection: close\r\n\r\n{{\"tenant_id\""
    );
    let started = std::time::Instant::now();
    let response = common::http_raw(server.addr, request.as_bytes()).await?;
    assert_error(&response, 408, "DEADLINE_EXCEEDED", "REQUEST_TIMEOUT");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    server.shutdown().await
}
