//! Tenant usage and quotas: the storage nodes' usage reports summed over the current topology
//! (`GetTenantUsage`, `GET /v1/tenants/{id}/usage`), quotas set on create and update, and the
//! leader's over-quota flags flipping on and off and reaching the watch stream — on SQLite and
//! PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{ADMIN_TOKEN, Admin, HttpResponse, Server, add_nodes, reason, test_config, wait_migration};
use pairdb_meta::admin::now_ms;
use pairdb_proto::admin::v1 as pb;
use pairdb_proto::cluster::v1 as cluster_pb;
use pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use pairdb_proto::cluster::v1::watch_event::Event;
use tonic::Code;
use tonic::transport::Channel;

/// How long the leader's evaluation (every second) and the watch push may take in a test.
const VERDICT_DEADLINE: Duration = Duration::from_secs(10);

fn create(tenant_id: &str) -> pb::CreateTenantRequest {
    pb::CreateTenantRequest { tenant_id: tenant_id.to_owned(), replication_factor: 1, ..Default::default() }
}

/// A heartbeat carrying a usage report: (tenant, keys, value bytes) per tenant the node holds.
fn report(node_id: u32, shares: &[(&str, u64, u64)]) -> cluster_pb::HeartbeatRequest {
    cluster_pb::HeartbeatRequest {
        node_id,
        usage_reported: true,
        tenant_usage: shares
            .iter()
            .map(|&(tenant, keys, value_bytes)| pb::TenantUsage {
                tenant_id: tenant.to_owned(),
                keys,
                value_bytes,
                siblings: keys + 1,
                tombstones: 2,
            })
            .collect(),
        usage_epoch: 1,
        ..Default::default()
    }
}

async fn usage(admin: &mut Admin, tenant_id: &str) -> pb::TenantUsageReport {
    admin
        .get_tenant_usage(pb::GetTenantUsageRequest { tenant_id: tenant_id.to_owned() })
        .await
        .unwrap()
        .into_inner()
}

/// (keys, value bytes, siblings, tombstones, nodes reporting, nodes total).
fn summary(report: &pb::TenantUsageReport) -> (u64, u64, u64, u64, u32, u32) {
    let usage = report.usage.clone().unwrap_or_default();
    (
        usage.keys,
        usage.value_bytes,
        usage.siblings,
        usage.tombstones,
        report.nodes_reporting,
        report.nodes_total,
    )
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    common::http(addr, method, path, Some(ADMIN_TOKEN), body).await.unwrap()
}

/// Sums the shares of the current topology's nodes only, reports how many nodes reported and the
/// age of the oldest report, and answers the same over HTTP.
async fn usage_is_summed_over_the_current_topology(config: pairdb_meta::Config) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    let mut admin = server.admin().await?;
    let mut cluster = server.cluster().await?;
    add_nodes(&mut admin, 3).await?;
    admin.create_tenant(create("acme")).await?;

    let none = usage(&mut admin, "acme").await;
    assert_eq!(summary(&none), (0, 0, 0, 0, 0, 3));
    assert_eq!((none.reported_at_ms, none.age_ms), (0, 0), "no report yet");
    assert_eq!(none.usage.as_ref().map(|u| u.tenant_id.as_str()), Some("acme"));

    // Node 3 reports first; then nodes 1 and 2. The oldest summed report is node 3's.
    let before = now_ms();
    cluster.heartbeat(report(3, &[("acme", 7, 70)])).await?;
    let after_first = now_ms();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let partial = {
        cluster.heartbeat(report(1, &[("acme", 10, 100), ("other", 1, 1)])).await?;
        usage(&mut admin, "acme").await
    };
    assert_eq!(summary(&partial), (17, 170, 19, 4, 2, 3), "two of three nodes reported");
    cluster.heartbeat(report(2, &[("acme", 5, 50)])).await?;
    let full = usage(&mut admin, "acme").await;
    assert_eq!(summary(&full), (22, 220, 25, 6, 3, 3));
    assert!((before..=after_first).contains(&full.reported_at_ms), "{full:?}: node 3's report is the oldest");
    assert!(full.age_ms >= 30 && full.age_ms < 10_000, "{full:?}");
    assert_eq!(
        (full.max_keys, full.max_bytes, full.over_key_quota, full.over_byte_quota),
        (0, 0, false, false)
    );

    // A heartbeat without a report leaves the node's share; a report without the tenant zeroes it.
    cluster.heartbeat(cluster_pb::HeartbeatRequest { node_id: 1, ..Default::default() }).await?;
    assert_eq!(summary(&usage(&mut admin, "acme").await).0, 22);
    cluster.heartbeat(report(1, &[("other", 1, 1)])).await?;
    assert_eq!(summary(&usage(&mut admin, "acme").await), (12, 120, 14, 4, 3, 3));

    // The same over HTTP, with the fields of TenantUsageReport.
    let body = call(server.addr, "GET", "/v1/tenants/acme/usage", None).await;
    assert_eq!(body.status, 200, "{body:?}");
    let json = body.json();
    assert_eq!(json["usage"]["tenant_id"], "acme");
    assert_eq!(
        (&json["usage"]["keys"], &json["usage"]["value_bytes"], &json["usage"]["siblings"]),
        (&12.into(), &120.into(), &14.into())
    );
    assert_eq!(json["usage"]["tombstones"], 4);
    assert_eq!((&json["nodes_reporting"], &json["nodes_total"]), (&3.into(), &3.into()));
    assert!(json["reported_at_ms"].as_u64().is_some_and(|at| at >= before));
    assert!(json["age_ms"].as_u64().is_some());
    assert_eq!((&json["max_keys"], &json["max_bytes"]), (&0.into(), &0.into()));
    assert_eq!((&json["over_key_quota"], &json["over_byte_quota"]), (&false.into(), &false.into()));
    let missing = call(server.addr, "GET", "/v1/tenants/nobody/usage", None).await;
    assert_eq!((missing.status, missing.reason().as_str()), (404, "TENANT_NOT_FOUND"));
    let anonymous = common::http(server.addr, "GET", "/v1/tenants/acme/usage", None, None).await?;
    assert_eq!(anonymous.status, 401);

    let error =
        admin.get_tenant_usage(pb::GetTenantUsageRequest { tenant_id: "nobody".into() }).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::NotFound, "TENANT_NOT_FOUND"));
    let error =
        admin.get_tenant_usage(pb::GetTenantUsageRequest { tenant_id: "BAD!".into() }).await.unwrap_err();
    assert_eq!(reason(&error), "INVALID_TENANT_ID");

    // Node 3 is drained out of the topology: its rows no longer count, and a removed node's
    // reports are not recorded.
    let removal = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 3, force: false })
        .await?
        .into_inner();
    wait_migration(&mut admin, &removal.migration_id, pb::MigrationState::Completed).await?;
    assert_eq!(summary(&usage(&mut admin, "acme").await), (5, 50, 6, 2, 2, 2));
    let beat = cluster.heartbeat(report(3, &[("acme", 1_000, 1_000)])).await?.into_inner();
    assert!(beat.unknown_node);
    assert_eq!(summary(&usage(&mut admin, "acme").await).0, 5);
    server.shutdown().await
}

#[tokio::test]
async fn usage_is_summed_over_the_current_topology_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    usage_is_summed_over_the_current_topology(test_config(dir.path())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_summed_over_the_current_topology_postgres() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = common::PgSchema::create(&base).await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.database_url = Some(schema.url());
    usage_is_summed_over_the_current_topology(config).await
}

/// Reads watch events until a `TenantConfig` of `tenant_id` matches.
async fn wait_config(
    stream: &mut tonic::Streaming<cluster_pb::WatchEvent>,
    tenant_id: &str,
    what: &str,
    mut wanted: impl FnMut(&cluster_pb::TenantConfig) -> bool,
) -> cluster_pb::TenantConfig {
    let deadline = tokio::time::Instant::now() + VERDICT_DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("watch stream failed")
            .expect("watch stream ended");
        if let Some(Event::TenantChanged(config)) = event.event
            && config.tenant_id == tenant_id
            && wanted(&config)
        {
            return config;
        }
    }
}

async fn watch(
    addr: SocketAddr,
) -> anyhow::Result<(tonic::Streaming<cluster_pb::WatchEvent>, Vec<cluster_pb::TenantConfig>)> {
    let channel: Channel = common::stream_channel(addr).await?;
    let mut stream =
        ClusterServiceClient::new(channel).watch(cluster_pb::WatchRequest::default()).await?.into_inner();
    let first = stream.message().await?.expect("a snapshot");
    let Some(Event::Snapshot(snapshot)) = first.event else { panic!("not a snapshot: {first:?}") };
    Ok((stream, snapshot.tenants))
}

/// The value of a per-tenant gauge on `/metrics`, if exported.
async fn gauge(addr: SocketAddr, name: &str, tenant: &str) -> Option<f64> {
    let body = common::http(addr, "GET", "/metrics", None, None).await.ok()?.body;
    let prefix = format!("{name}{{tenant=\"{tenant}\"}} ");
    body.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|value| value.trim().parse().ok())
}

/// The leader sets a tenant's flags when its usage reaches a quota and clears them when the quota is
/// raised or removed or the tenant shrinks; every change reaches the watch stream's TenantConfig.
async fn quota_flags_follow_usage(config: pairdb_meta::Config) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    let mut admin = server.admin().await?;
    let mut cluster = server.cluster().await?;
    add_nodes(&mut admin, 2).await?;
    const T: &str = "metered";
    admin.create_tenant(pb::CreateTenantRequest { max_keys: 10, ..create(T) }).await?;
    let (mut stream, tenants) = watch(server.addr).await?;
    let initial = tenants.iter().find(|t| t.tenant_id == T).expect("tenant in the snapshot");
    assert!(!initial.over_key_quota && !initial.over_byte_quota);

    // 6 + 4 keys: the key quota is reached (not passed), so the tenant is over it.
    cluster.heartbeat(report(1, &[(T, 6, 300)])).await?;
    cluster.heartbeat(report(2, &[(T, 4, 200)])).await?;
    let flagged = wait_config(&mut stream, T, "the key flag", |c| c.over_key_quota).await;
    assert!(!flagged.over_byte_quota, "no byte quota");
    let reported = usage(&mut admin, T).await;
    assert!(reported.over_key_quota && !reported.over_byte_quota, "{reported:?}");
    assert_eq!((reported.max_keys, summary(&reported).0), (10, 10));
    for (name, expected) in [
        ("pairdb_meta_tenant_keys", 10.0),
        ("pairdb_meta_tenant_value_bytes", 500.0),
        ("pairdb_meta_tenant_siblings", 12.0),
        ("pairdb_meta_tenant_tombstones", 4.0),
    ] {
        common::eventually(VERDICT_DEADLINE, name, || async move {
            (gauge(server.addr, name, T).await == Some(expected)).then_some(())
        })
        .await?;
    }

    // A raised quota clears the flag (not sticky); the settings event comes first, still flagged.
    admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: T.into(),
            max_keys: Some(11),
            ..Default::default()
        })
        .await?;
    wait_config(&mut stream, T, "the key flag cleared", |c| !c.over_key_quota).await;

    // A byte quota the tenant is past; then the tenant shrinks below it.
    admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: T.into(),
            max_bytes: Some(400),
            ..Default::default()
        })
        .await?;
    let flagged = wait_config(&mut stream, T, "the byte flag", |c| c.over_byte_quota).await;
    assert!(!flagged.over_key_quota);
    cluster.heartbeat(report(1, &[(T, 6, 150)])).await?;
    wait_config(&mut stream, T, "the byte flag cleared", |c| !c.over_byte_quota).await;
    assert!(!usage(&mut admin, T).await.over_byte_quota);

    // A removed quota flags nothing, however large the tenant: the byte flag comes back on its own
    // (400 bytes reached again) while the key count, far past the old quota, flags nothing.
    admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: T.into(),
            max_keys: Some(0),
            ..Default::default()
        })
        .await?;
    cluster.heartbeat(report(1, &[(T, 1_000, 200)])).await?;
    let flagged = wait_config(&mut stream, T, "the byte flag again", |c| c.over_byte_quota).await;
    assert!(!flagged.over_key_quota, "no key quota any more");
    let reported = usage(&mut admin, T).await;
    assert_eq!((reported.max_keys, reported.max_bytes, summary(&reported).0), (0, 400, 1_004));
    assert!(reported.over_byte_quota && !reported.over_key_quota);
    // A new subscriber starts from the flags in force.
    let (_fresh, tenants) = watch(server.addr).await?;
    let current = tenants.iter().find(|t| t.tenant_id == T).unwrap();
    assert!(current.over_byte_quota && !current.over_key_quota);
    drop(stream);
    server.shutdown().await
}

#[tokio::test]
async fn quota_flags_follow_usage_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    quota_flags_follow_usage(test_config(dir.path())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_flags_follow_usage_postgres() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = common::PgSchema::create(&base).await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.database_url = Some(schema.url());
    quota_flags_follow_usage(config).await
}

/// Quotas are set on create (0 or absent = none), shown by get and list, changed by update (0
/// removes) and left alone by updates that do not name them — over gRPC and HTTP.
#[tokio::test]
async fn quotas_are_set_on_create_and_update_over_grpc_and_http() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let mut admin = server.admin().await?;
    add_nodes(&mut admin, 1).await?;

    let created = admin
        .create_tenant(pb::CreateTenantRequest { max_keys: 1_000, max_bytes: 1 << 30, ..create("grpc") })
        .await?
        .into_inner();
    assert_eq!((created.max_keys, created.max_bytes), (1_000, 1 << 30));
    let plain = admin.create_tenant(create("plain")).await?.into_inner();
    assert_eq!((plain.max_keys, plain.max_bytes), (0, 0), "none by default");
    let got = admin.get_tenant(pb::GetTenantRequest { tenant_id: "grpc".into() }).await?.into_inner();
    assert_eq!((got.max_keys, got.max_bytes), (1_000, 1 << 30));
    let other = admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: "grpc".into(),
            rate_limit_ops_per_sec: Some(5),
            ..Default::default()
        })
        .await?
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!((other.max_keys, other.max_bytes), (1_000, 1 << 30), "unnamed quotas are kept");
    let removed = admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: "grpc".into(),
            max_keys: Some(0),
            ..Default::default()
        })
        .await?
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!((removed.max_keys, removed.max_bytes), (0, 1 << 30));
    let listed = admin.list_tenants(pb::ListTenantsRequest {}).await?.into_inner().tenants;
    let listed: Vec<(&str, u64, u64)> =
        listed.iter().map(|t| (t.tenant_id.as_str(), t.max_keys, t.max_bytes)).collect();
    assert_eq!(listed, [("grpc", 0, 1 << 30), ("plain", 0, 0)]);
    let error = admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: "grpc".into(),
            max_bytes: Some(u64::MAX),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::InvalidArgument, "INVALID_ARGUMENT"));
    assert!(error.message().contains("max_bytes"), "{error:?}");
    let error = admin.create_tenant(pb::CreateTenantRequest { max_keys: u64::MAX, ..create("huge") }).await;
    assert_eq!(reason(&error.unwrap_err()), "INVALID_ARGUMENT");

    let addr = server.addr;
    let response = call(
        addr,
        "POST",
        "/v1/tenants",
        Some(r#"{"tenant_id": "web", "replication_factor": 1, "max_keys": 5, "max_bytes": 6}"#),
    )
    .await;
    assert_eq!(response.status, 201, "{response:?}");
    assert_eq!((&response.json()["max_keys"], &response.json()["max_bytes"]), (&5.into(), &6.into()));
    let got = call(addr, "GET", "/v1/tenants/web", None).await.json();
    assert_eq!((&got["max_keys"], &got["max_bytes"]), (&5.into(), &6.into()));
    let patched = call(addr, "PATCH", "/v1/tenants/web", Some(r#"{"max_bytes": 0}"#)).await;
    assert_eq!(patched.status, 200, "{patched:?}");
    let tenant = &patched.json()["tenant"];
    assert_eq!((&tenant["max_keys"], &tenant["max_bytes"]), (&5.into(), &0.into()));
    let listed = call(addr, "GET", "/v1/tenants", None).await.json();
    let web = listed["tenants"].as_array().unwrap().iter().find(|t| t["tenant_id"] == "web").unwrap().clone();
    assert_eq!((&web["max_keys"], &web["max_bytes"]), (&5.into(), &0.into()));
    let plain =
        call(addr, "POST", "/v1/tenants", Some(r#"{"tenant_id": "web2", "replication_factor": 1}"#)).await;
    assert_eq!((&plain.json()["max_keys"], &plain.json()["max_bytes"]), (&0.into(), &0.into()));
    for bad in [r#"{"max_keys": -1}"#, r#"{"max_keys": "many"}"#, r#"{"max_bytes": 9223372036854775808}"#] {
        let response = call(addr, "PATCH", "/v1/tenants/web", Some(bad)).await;
        assert_eq!(
            (response.status, response.reason().as_str()),
            (400, "INVALID_ARGUMENT"),
            "{bad}: {response:?}"
        );
    }
    server.shutdown().await
}
