//! The admin API over gRPC: every operation and every error reason, against an in-process replica
//! (SQLite; the 2-replica PostgreSQL behaviour is in `processes.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{ADMIN_TOKEN, Server, add_nodes, reason, test_config, wait_migration};
use pairdb_proto::admin::v1 as pb;
use pairdb_proto::admin::v1::admin_service_client::AdminServiceClient;
use pairdb_proto::cluster::v1 as cluster_pb;
use pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use pairdb_proto::common::v1::{ConflictMode, Consistency, KeyGroups};
use tonic::Code;

fn create(tenant_id: &str, replication_factor: u32) -> pb::CreateTenantRequest {
    pb::CreateTenantRequest { tenant_id: tenant_id.to_owned(), replication_factor, ..Default::default() }
}

#[tokio::test]
async fn tenants_every_operation_and_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let mut admin = server.admin().await?;

    // No active node yet: N=3 cannot be placed.
    let error = admin.create_tenant(create("acme", 0)).await.unwrap_err();
    assert_eq!(
        (error.code(), reason(&error).as_str()),
        (Code::InvalidArgument, "INVALID_REPLICATION_FACTOR")
    );

    add_nodes(&mut admin, 3).await?;
    let tenant = admin.create_tenant(create("acme", 0)).await?.into_inner();
    assert_eq!(tenant.tenant_id, "acme");
    assert_eq!(tenant.replication_factor, 3, "default N");
    assert_eq!(tenant.default_consistency, Consistency::Quorum as i32);
    assert_eq!(tenant.conflict_mode, ConflictMode::Siblings as i32);
    assert_eq!(tenant.max_value_bytes, 1024 * 1024);
    assert_eq!(tenant.max_siblings, 64);
    assert_eq!((tenant.rate_limit_ops_per_sec, tenant.rate_limit_burst), (0, 0), "unlimited");
    assert!(!tenant.strict_quorum);
    assert_eq!(tenant.key_groups, KeyGroups::None as i32, "default key groups");

    let error = admin.create_tenant(create("acme", 1)).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::AlreadyExists, "TENANT_EXISTS"));
    for bad in ["Acme", "-x", "a b", "", &"a".repeat(64)] {
        let error = admin.create_tenant(create(bad, 1)).await.unwrap_err();
        assert_eq!(
            (error.code(), reason(&error).as_str()),
            (Code::InvalidArgument, "INVALID_TENANT_ID"),
            "{bad:?}"
        );
    }
    for (n, active) in [(8, None), (4, Some("3"))] {
        let error = admin.create_tenant(create("big", n)).await.unwrap_err();
        assert_eq!(reason(&error), "INVALID_REPLICATION_FACTOR", "N={n}");
        let detail = pairdb_service::errors::detail_of(&error).unwrap();
        assert_eq!(detail.metadata.get("active_nodes").map(String::as_str), active);
    }
    let custom = admin
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "lww-1".into(),
            replication_factor: 1,
            default_consistency: Consistency::One as i32,
            conflict_mode: ConflictMode::Lww as i32,
            rate_limit_ops_per_sec: 50,
            rate_limit_burst: 0,
            max_value_bytes: 1000,
            max_siblings: 2,
            strict_quorum: true,
            key_groups: KeyGroups::Unspecified as i32,
            max_keys: 0,
            max_bytes: 0,
            default_ttl_ms: 60_000,
            max_ttl_ms: 3_600_000,
        })
        .await?
        .into_inner();
    assert_eq!(custom.rate_limit_burst, 50, "burst defaults to the rate");
    assert_eq!((custom.default_ttl_ms, custom.max_ttl_ms), (60_000, 3_600_000));
    assert_eq!(custom.conflict_mode, ConflictMode::Lww as i32);
    let error = admin
        .create_tenant(pb::CreateTenantRequest { max_value_bytes: 1 << 40, ..create("huge", 1) })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "INVALID_ARGUMENT");
    let error = admin
        .create_tenant(pb::CreateTenantRequest { default_consistency: 42, ..create("x", 1) })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "INVALID_ARGUMENT");

    let got = admin.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await?.into_inner();
    assert_eq!(got, tenant);
    let error = admin.get_tenant(pb::GetTenantRequest { tenant_id: "nobody".into() }).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::NotFound, "TENANT_NOT_FOUND"));
    let listed = admin.list_tenants(pb::ListTenantsRequest {}).await?.into_inner().tenants;
    assert_eq!(listed.iter().map(|t| t.tenant_id.as_str()).collect::<Vec<_>>(), ["acme", "lww-1"]);

    // Settings without N: no migration.
    let updated = admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            default_consistency: Some(Consistency::All as i32),
            rate_limit_ops_per_sec: Some(100),
            strict_quorum: Some(true),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(updated.migration_id.is_empty());
    let updated = updated.tenant.unwrap();
    assert_eq!(updated.default_consistency, Consistency::All as i32);
    assert_eq!((updated.rate_limit_ops_per_sec, updated.rate_limit_burst), (100, 100));
    assert!(updated.strict_quorum);

    // N: a migration, which completes (no data to move).
    let changed = admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            replication_factor: Some(2),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!changed.migration_id.is_empty());
    assert_eq!(changed.tenant.unwrap().replication_factor, 2);
    let migration = wait_migration(&mut admin, &changed.migration_id, pb::MigrationState::Completed).await?;
    assert_eq!(migration.kind, "replication_factor");
    assert_eq!(migration.tenant_id, "acme");

    // The seed's UpdateReplicationFactor.
    let changed = admin
        .update_replication_factor(pb::UpdateReplicationFactorRequest {
            tenant_id: "acme".into(),
            replication_factor: 3,
        })
        .await?
        .into_inner();
    wait_migration(&mut admin, &changed.migration_id, pb::MigrationState::Completed).await?;
    for n in [0, 4, 8] {
        let error = admin
            .update_replication_factor(pb::UpdateReplicationFactorRequest {
                tenant_id: "acme".into(),
                replication_factor: n,
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&error), "INVALID_REPLICATION_FACTOR", "N={n}");
    }
    let error = admin
        .update_replication_factor(pb::UpdateReplicationFactorRequest {
            tenant_id: "nobody".into(),
            replication_factor: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "TENANT_NOT_FOUND");
    let error = admin
        .update_tenant(pb::UpdateTenantRequest { tenant_id: "BAD".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "INVALID_TENANT_ID");

    // Deleting is a process: the tenant stays `deleting` until every storage node reported its purge.
    let deleting =
        admin.delete_tenant(pb::DeleteTenantRequest { tenant_id: "acme".into() }).await?.into_inner();
    let deleting = deleting.tenant.unwrap();
    assert_eq!(deleting.state, "deleting");
    let progress = deleting.purge.unwrap();
    assert_eq!((progress.nodes_done, progress.nodes_total, progress.waiting_node_ids), (0, 3, vec![1, 2, 3]));
    let again = admin.delete_tenant(pb::DeleteTenantRequest { tenant_id: "acme".into() }).await?.into_inner();
    assert_eq!(again.tenant.unwrap().state, "deleting", "deleting twice is idempotent");
    let error = admin.create_tenant(create("acme", 1)).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::FailedPrecondition, "TENANT_BEING_DELETED"));
    let error =
        admin.update_tenant(pb::UpdateTenantRequest { tenant_id: "acme".into(), ..Default::default() });
    assert_eq!(reason(&error.await.unwrap_err()), "TENANT_NOT_FOUND");

    // Nodes confirm in their heartbeats; a confirmation of another deletion counts for nothing.
    let purge_seq = admin.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await?.into_inner();
    assert_eq!(purge_seq.purge.as_ref().map(|p| p.nodes_done), Some(0));
    let mut cluster = server.cluster().await?;
    let beat = |node_id: u32, seq: u64| cluster_pb::HeartbeatRequest {
        node_id,
        purged_tenants: vec![cluster_pb::TenantPurged { tenant_id: "acme".into(), purge_seq: seq }],
        ..Default::default()
    };
    let seq = server.purge_seq("acme").await?;
    cluster.heartbeat(beat(1, seq + 1000)).await?;
    cluster.heartbeat(beat(1, seq)).await?;
    cluster.heartbeat(beat(2, seq)).await?;
    let view = admin.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await?.into_inner();
    let progress = view.purge.unwrap();
    assert_eq!((progress.nodes_done, progress.waiting_node_ids), (2, vec![3]));
    cluster.heartbeat(beat(3, seq)).await?;
    common::eventually(Duration::from_secs(10), "the deletion completes", || {
        let mut admin = admin.clone();
        async move {
            let gone = admin.get_tenant(pb::GetTenantRequest { tenant_id: "acme".into() }).await;
            gone.err().filter(|e| reason(e) == "TENANT_NOT_FOUND").map(|_| ())
        }
    })
    .await?;
    let error = admin.delete_tenant(pb::DeleteTenantRequest { tenant_id: "acme".into() }).await.unwrap_err();
    assert_eq!(reason(&error), "TENANT_NOT_FOUND");
    // The id can be used again, by a new generation.
    let recreated = admin.create_tenant(create("acme", 1)).await?.into_inner();
    assert_eq!(recreated.state, "active");
    server.shutdown().await
}

/// The tenant's `TenantConfig` (while active) in the snapshot a new watch stream starts with, once
/// this replica's view has caught up with the commit.
async fn watched_config(server: &Server, tenant_id: &str) -> anyhow::Result<cluster_pb::TenantConfig> {
    common::eventually(Duration::from_secs(10), "the tenant in a watch snapshot", || async {
        let mut stream =
            server.cluster().await.ok()?.watch(cluster_pb::WatchRequest::default()).await.ok()?;
        let first = stream.get_mut().message().await.ok()??;
        let Some(cluster_pb::watch_event::Event::Snapshot(snapshot)) = first.event else {
            panic!("the watch stream did not start with a snapshot: {first:?}")
        };
        snapshot.tenants.into_iter().find(|t| t.tenant_id == tenant_id && !t.deleting)
    })
    .await
}

/// Key groups are chosen at creation (default none), shown by get and list, published on the watch
/// stream, and kept by every update; a tenant deleted and created again chooses again.
async fn key_groups_are_chosen_once_per_creation(config: pairdb_meta::Config) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    let mut admin = server.admin().await?;
    add_nodes(&mut admin, 1).await?;

    let plain = admin.create_tenant(create("plain", 1)).await?.into_inner();
    assert_eq!(plain.key_groups, KeyGroups::None as i32, "unspecified creates none");
    let grouped = admin
        .create_tenant(pb::CreateTenantRequest {
            key_groups: KeyGroups::HashTag as i32,
            ..create("grouped", 1)
        })
        .await?
        .into_inner();
    assert_eq!(grouped.key_groups, KeyGroups::HashTag as i32);
    let error = admin
        .create_tenant(pb::CreateTenantRequest { key_groups: 7, ..create("future", 1) })
        .await
        .unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::InvalidArgument, "INVALID_ARGUMENT"));
    assert!(error.message().contains("key groups"), "{error:?}");

    let got = admin.get_tenant(pb::GetTenantRequest { tenant_id: "grouped".into() }).await?.into_inner();
    assert_eq!(got.key_groups, KeyGroups::HashTag as i32);
    let listed = admin.list_tenants(pb::ListTenantsRequest {}).await?.into_inner().tenants;
    let listed: Vec<(&str, i32)> = listed.iter().map(|t| (t.tenant_id.as_str(), t.key_groups)).collect();
    assert_eq!(listed, [("grouped", KeyGroups::HashTag as i32), ("plain", KeyGroups::None as i32)]);
    assert_eq!(watched_config(&server, "grouped").await?.key_groups, KeyGroups::HashTag as i32);
    assert_eq!(watched_config(&server, "plain").await?.key_groups, KeyGroups::None as i32);

    // Every other setting changes; key groups do not (UpdateTenantRequest has no field for them).
    let mut watch = ClusterServiceClient::new(common::stream_channel(server.addr).await?)
        .watch(cluster_pb::WatchRequest::default())
        .await?
        .into_inner();
    let updated = admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: "grouped".into(),
            conflict_mode: Some(ConflictMode::Lww as i32),
            rate_limit_ops_per_sec: Some(7),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(updated.tenant.unwrap().key_groups, KeyGroups::HashTag as i32);
    let changed = loop {
        let event =
            tokio::time::timeout(Duration::from_secs(5), watch.message()).await??.expect("watch stream open");
        if let Some(cluster_pb::watch_event::Event::TenantChanged(config)) = event.event
            && config.tenant_id == "grouped"
            && config.rate_limit_ops_per_sec == 7
        {
            break config;
        }
    };
    assert_eq!(changed.key_groups, KeyGroups::HashTag as i32);
    let got = admin.get_tenant(pb::GetTenantRequest { tenant_id: "grouped".into() }).await?.into_inner();
    assert_eq!((got.key_groups, got.conflict_mode), (KeyGroups::HashTag as i32, ConflictMode::Lww as i32));

    // Deleted (node 1 confirms the purge) and created again: the new tenant chooses again.
    admin.delete_tenant(pb::DeleteTenantRequest { tenant_id: "grouped".into() }).await?;
    let purge_seq = server.purge_seq("grouped").await?;
    server
        .cluster()
        .await?
        .heartbeat(cluster_pb::HeartbeatRequest {
            node_id: 1,
            purged_tenants: vec![cluster_pb::TenantPurged { tenant_id: "grouped".into(), purge_seq }],
            ..Default::default()
        })
        .await?;
    common::eventually(Duration::from_secs(10), "the deletion completes", || {
        let mut admin = admin.clone();
        async move {
            let gone = admin.get_tenant(pb::GetTenantRequest { tenant_id: "grouped".into() }).await;
            gone.err().filter(|e| reason(e) == "TENANT_NOT_FOUND").map(|_| ())
        }
    })
    .await?;
    let recreated = admin
        .create_tenant(pb::CreateTenantRequest { key_groups: KeyGroups::None as i32, ..create("grouped", 1) })
        .await?
        .into_inner();
    assert_eq!(recreated.key_groups, KeyGroups::None as i32);
    assert_eq!(watched_config(&server, "grouped").await?.key_groups, KeyGroups::None as i32);
    server.shutdown().await
}

#[tokio::test]
async fn key_groups_are_chosen_once_per_creation_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    key_groups_are_chosen_once_per_creation(test_config(dir.path())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_groups_are_chosen_once_per_creation_postgres() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = common::PgSchema::create(&base).await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.database_url = Some(schema.url());
    key_groups_are_chosen_once_per_creation(config).await
}

const DAY_MS: u64 = 86_400_000;
/// The longest expiry a tenant setting may name: 100 years.
const CENTURY_MS: u64 = 3_153_600_000_000;

fn ttls(tenant: &pb::Tenant) -> (u64, u64) {
    (tenant.default_ttl_ms, tenant.max_ttl_ms)
}

/// Reads `watch` until the tenant's change event matches `wanted`.
async fn tenant_change(
    watch: &mut tonic::Streaming<cluster_pb::WatchEvent>,
    tenant_id: &str,
    mut wanted: impl FnMut(&cluster_pb::TenantConfig) -> bool,
) -> anyhow::Result<cluster_pb::TenantConfig> {
    loop {
        let event =
            tokio::time::timeout(Duration::from_secs(5), watch.message()).await??.expect("watch stream open");
        if let Some(cluster_pb::watch_event::Event::TenantChanged(config)) = event.event
            && config.tenant_id == tenant_id
            && wanted(&config)
        {
            return Ok(config);
        }
    }
}

/// Expiry settings: none by default; set on create, shown by get and list and pushed to routers
/// (watch snapshot and change events); an update changes the one it names and keeps the other, 0
/// removes one. A default above the cap (on create, or by an update of either one) and a setting
/// above 100 years are INVALID_ARGUMENT with the reason in the message, and change nothing.
async fn ttl_settings_round_trip(config: pairdb_meta::Config) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    let mut admin = server.admin().await?;
    add_nodes(&mut admin, 1).await?;

    let plain = admin.create_tenant(create("plain", 1)).await?.into_inner();
    assert_eq!(ttls(&plain), (0, 0), "values never expire by default");
    let created = admin
        .create_tenant(pb::CreateTenantRequest {
            default_ttl_ms: DAY_MS,
            max_ttl_ms: 7 * DAY_MS,
            ..create("sessions", 1)
        })
        .await?
        .into_inner();
    assert_eq!(ttls(&created), (DAY_MS, 7 * DAY_MS));
    let got = admin.get_tenant(pb::GetTenantRequest { tenant_id: "sessions".into() }).await?.into_inner();
    assert_eq!(got, created);
    let listed = admin.list_tenants(pb::ListTenantsRequest {}).await?.into_inner().tenants;
    let listed: Vec<(&str, (u64, u64))> = listed.iter().map(|t| (t.tenant_id.as_str(), ttls(t))).collect();
    assert_eq!(listed, [("plain", (0, 0)), ("sessions", (DAY_MS, 7 * DAY_MS))]);
    let pushed = watched_config(&server, "sessions").await?;
    assert_eq!((pushed.default_ttl_ms, pushed.max_ttl_ms), (DAY_MS, 7 * DAY_MS));
    let pushed = watched_config(&server, "plain").await?;
    assert_eq!((pushed.default_ttl_ms, pushed.max_ttl_ms), (0, 0));
    // 100 years is the longest either may be.
    let century = admin
        .create_tenant(pb::CreateTenantRequest {
            default_ttl_ms: CENTURY_MS,
            max_ttl_ms: CENTURY_MS,
            ..create("archive", 1)
        })
        .await?
        .into_inner();
    assert_eq!(ttls(&century), (CENTURY_MS, CENTURY_MS));

    for (default_ttl_ms, max_ttl_ms, why) in [
        (2 * DAY_MS, DAY_MS, "default_ttl_ms 172800000 is above max_ttl_ms 86400000"),
        (CENTURY_MS + 1, 0, "default_ttl_ms 3153600000001 is above the maximum of 3153600000000 ms"),
        (0, u64::MAX, "max_ttl_ms 18446744073709551615 is above the maximum of 3153600000000 ms"),
    ] {
        let error = admin
            .create_tenant(pb::CreateTenantRequest { default_ttl_ms, max_ttl_ms, ..create("bad", 1) })
            .await
            .unwrap_err();
        assert_eq!((error.code(), reason(&error).as_str()), (Code::InvalidArgument, "INVALID_ARGUMENT"));
        assert!(error.message().contains(why), "{error:?}");
    }
    let error = admin.get_tenant(pb::GetTenantRequest { tenant_id: "bad".into() }).await.unwrap_err();
    assert_eq!(reason(&error), "TENANT_NOT_FOUND", "a refused create creates nothing");

    let mut watch = ClusterServiceClient::new(common::stream_channel(server.addr).await?)
        .watch(cluster_pb::WatchRequest::default())
        .await?
        .into_inner();
    let update = |default_ttl_ms: Option<u64>, max_ttl_ms: Option<u64>| pb::UpdateTenantRequest {
        tenant_id: "sessions".into(),
        default_ttl_ms,
        max_ttl_ms,
        ..Default::default()
    };
    // The cap alone: the default is kept.
    let updated = admin.update_tenant(update(None, Some(2 * DAY_MS))).await?.into_inner();
    assert!(updated.migration_id.is_empty());
    assert_eq!(ttls(&updated.tenant.unwrap()), (DAY_MS, 2 * DAY_MS));
    let changed = tenant_change(&mut watch, "sessions", |c| c.max_ttl_ms == 2 * DAY_MS).await?;
    assert_eq!(changed.default_ttl_ms, DAY_MS);

    // Checked against the setting kept: a cap below the default, or a default above the cap.
    for (request, why) in [
        (update(None, Some(DAY_MS / 2)), "default_ttl_ms 86400000 is above max_ttl_ms 43200000"),
        (update(Some(3 * DAY_MS), None), "default_ttl_ms 259200000 is above max_ttl_ms 172800000"),
        (update(Some(CENTURY_MS + 1), Some(0)), "default_ttl_ms 3153600000001 is above the maximum"),
    ] {
        let error = admin.update_tenant(request).await.unwrap_err();
        assert_eq!((error.code(), reason(&error).as_str()), (Code::InvalidArgument, "INVALID_ARGUMENT"));
        assert!(error.message().contains(why), "{error:?}");
    }
    let got = admin.get_tenant(pb::GetTenantRequest { tenant_id: "sessions".into() }).await?.into_inner();
    assert_eq!(ttls(&got), (DAY_MS, 2 * DAY_MS), "refused updates change nothing");

    // 0 removes: the cap, then the default (with a new cap in the same update).
    let uncapped = admin.update_tenant(update(None, Some(0))).await?.into_inner();
    assert_eq!(ttls(&uncapped.tenant.unwrap()), (DAY_MS, 0));
    let replaced = admin.update_tenant(update(Some(0), Some(3_600_000))).await?.into_inner();
    assert_eq!(ttls(&replaced.tenant.unwrap()), (0, 3_600_000));
    // Another setting leaves both alone.
    let other = admin
        .update_tenant(pb::UpdateTenantRequest {
            tenant_id: "sessions".into(),
            rate_limit_ops_per_sec: Some(5),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(ttls(&other.tenant.unwrap()), (0, 3_600_000));
    let changed = tenant_change(&mut watch, "sessions", |c| c.rate_limit_ops_per_sec == 5).await?;
    assert_eq!((changed.default_ttl_ms, changed.max_ttl_ms), (0, 3_600_000));
    let pushed = watched_config(&server, "sessions").await?;
    assert_eq!((pushed.default_ttl_ms, pushed.max_ttl_ms), (0, 3_600_000));
    server.shutdown().await
}

#[tokio::test]
async fn ttl_settings_round_trip_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    ttl_settings_round_trip(test_config(dir.path())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_settings_round_trip_postgres() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = common::PgSchema::create(&base).await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.database_url = Some(schema.url());
    ttl_settings_round_trip(config).await
}

#[tokio::test]
async fn api_keys_are_shown_once_and_stored_hashed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let mut admin = server.admin().await?;
    add_nodes(&mut admin, 1).await?;
    admin.create_tenant(create("acme", 1)).await?;

    let created = admin
        .create_api_key(pb::CreateApiKeyRequest { tenant_id: "acme".into(), description: "ci".into() })
        .await?
        .into_inner();
    let key = created.api_key.unwrap();
    let secret = created.secret;
    assert!(secret.starts_with(&format!("pdb_{}_", key.key_id)), "{secret}");
    assert!(secret.len() >= 60);
    assert_eq!((key.tenant_id.as_str(), key.description.as_str(), key.revoked), ("acme", "ci", false));
    let second = admin
        .create_api_key(pb::CreateApiKeyRequest { tenant_id: "acme".into(), description: String::new() })
        .await?;
    assert_ne!(second.into_inner().secret, secret);

    let error = admin
        .create_api_key(pb::CreateApiKeyRequest { tenant_id: "nobody".into(), description: String::new() })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "TENANT_NOT_FOUND");
    let error = admin
        .create_api_key(pb::CreateApiKeyRequest { tenant_id: "acme".into(), description: "x".repeat(300) })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "INVALID_ARGUMENT");

    let listed = admin.list_api_keys(pb::ListApiKeysRequest { tenant_id: "acme".into() }).await?.into_inner();
    assert_eq!(listed.api_keys.len(), 2);
    assert!(!format!("{listed:?}").contains(&secret), "list responses never carry secrets");
    let all = admin.list_api_keys(pb::ListApiKeysRequest::default()).await?.into_inner();
    assert_eq!(all.api_keys.len(), 2);
    let error = admin.list_api_keys(pb::ListApiKeysRequest { tenant_id: "nobody".into() }).await.unwrap_err();
    assert_eq!(reason(&error), "TENANT_NOT_FOUND");

    let revoked =
        admin.revoke_api_key(pb::RevokeApiKeyRequest { key_id: key.key_id.clone() }).await?.into_inner();
    assert!(revoked.api_key.unwrap().revoked);
    let again =
        admin.revoke_api_key(pb::RevokeApiKeyRequest { key_id: key.key_id.clone() }).await?.into_inner();
    assert!(again.api_key.unwrap().revoked, "revoking twice is idempotent");
    let error = admin.revoke_api_key(pb::RevokeApiKeyRequest { key_id: "missing".into() }).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::NotFound, "API_KEY_NOT_FOUND"));

    // The database holds the SHA-256 of the secret and never the secret.
    server.shutdown().await?;
    let database = std::fs::read(dir.path().join("meta.db"))?;
    let wal = std::fs::read(dir.path().join("meta.db-wal")).unwrap_or_default();
    for bytes in [&database, &wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret found in the SQLite files"
        );
    }
    let hash = pairdb_meta::admin::secret_sha256(&secret);
    let store = pairdb_meta::persistence::Store::open(&pairdb_meta::persistence::StoreOptions {
        url: format!("sqlite://{}", dir.path().join("meta.db").display()),
        timeout: Duration::from_secs(5),
        max_connections: 2,
    })
    .await?;
    let mut tx = store.read().await?;
    let stored = tx.get_api_key(&key.key_id).await?.unwrap();
    assert_eq!(stored.secret_sha256, hash);
    Ok(())
}

#[tokio::test]
async fn storage_nodes_every_operation_and_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let mut admin = server.admin().await?;

    // The first node bootstraps the ring: active at once, no migration.
    let first = admin
        .add_storage_node(pb::AddStorageNodeRequest {
            node_id: 0,
            address: "127.0.0.1:7201".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(first.migration_id.is_empty());
    let node = first.node.unwrap();
    assert_eq!((node.node_id, node.weight, node.in_ring), (1, 1, true), "id allocated, weight defaulted");
    assert_eq!(node.status, pb::NodeStatus::Active as i32);

    // Later nodes join through an add_node migration.
    let second = admin
        .add_storage_node(pb::AddStorageNodeRequest {
            node_id: 0,
            address: "127.0.0.1:7202".into(),
            zone: String::new(),
            weight: 2,
        })
        .await?
        .into_inner();
    assert_eq!(second.node.as_ref().unwrap().node_id, 2);
    assert_eq!(second.node.as_ref().unwrap().status, pb::NodeStatus::Joining as i32);
    assert!(!second.node.as_ref().unwrap().in_ring);
    let migration = wait_migration(&mut admin, &second.migration_id, pb::MigrationState::Completed).await?;
    assert_eq!((migration.kind.as_str(), migration.node_id), ("add_node", 2));
    assert_eq!(migration.to_epoch, migration.from_epoch + 1);
    let progress = migration.progress.unwrap();
    assert!(progress.partitions_total > 0);
    assert_eq!(progress.partitions_done, progress.partitions_total);
    let node = admin.get_storage_node(pb::GetStorageNodeRequest { node_id: 2 }).await?.into_inner();
    assert_eq!((node.status, node.in_ring, node.weight), (pb::NodeStatus::Active as i32, true, 2));
    add_nodes_from(&mut admin, 3, 3).await?;

    let error = admin
        .add_storage_node(pb::AddStorageNodeRequest {
            node_id: 2,
            address: "127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::AlreadyExists, "NODE_EXISTS"));
    for bad in [
        pb::AddStorageNodeRequest { address: "no-port".into(), ..Default::default() },
        pb::AddStorageNodeRequest { address: "127.0.0.1:7300".into(), weight: 5000, ..Default::default() },
        pb::AddStorageNodeRequest {
            address: "127.0.0.1:7300".into(),
            zone: "a b".into(),
            ..Default::default()
        },
        // No address: its migration could not stream to it (issue 15).
        pb::AddStorageNodeRequest { node_id: 7, ..Default::default() },
    ] {
        let error = admin.add_storage_node(bad).await.unwrap_err();
        assert_eq!(reason(&error), "INVALID_NODE");
    }
    let error = admin.get_storage_node(pb::GetStorageNodeRequest { node_id: 99 }).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::NotFound, "NODE_NOT_FOUND"));
    let error = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 99, force: false })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "NODE_NOT_FOUND");
    let error = admin
        .update_storage_node(pb::UpdateStorageNodeRequest { node_id: 99, weight: Some(2), zone: None })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "NODE_NOT_FOUND");

    // With N=3 and three active nodes none can go.
    admin.create_tenant(create("acme", 3)).await?;
    let error = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 1, force: false })
        .await
        .unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::FailedPrecondition, "NODE_IN_USE"));
    let detail = pairdb_service::errors::detail_of(&error).unwrap();
    assert_eq!(detail.metadata.get("required_nodes").map(String::as_str), Some("3"));

    // Weight change: a node_weight migration.
    let reweighted = admin
        .update_storage_node(pb::UpdateStorageNodeRequest { node_id: 3, weight: Some(3), zone: None })
        .await?
        .into_inner();
    assert_eq!(reweighted.node.unwrap().weight, 3);
    let migration =
        wait_migration(&mut admin, &reweighted.migration_id, pb::MigrationState::Completed).await?;
    assert_eq!(migration.kind, "node_weight");
    let unchanged = admin
        .update_storage_node(pb::UpdateStorageNodeRequest { node_id: 3, weight: Some(3), zone: None })
        .await?
        .into_inner();
    assert!(unchanged.migration_id.is_empty(), "no change, no migration");

    // Drain node 4 (added now), force-remove node 5.
    add_nodes_from(&mut admin, 4, 5).await?;
    let drained = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 4, force: false })
        .await?
        .into_inner();
    assert_eq!(drained.node.as_ref().unwrap().status, pb::NodeStatus::Leaving as i32);
    let migration = wait_migration(&mut admin, &drained.migration_id, pb::MigrationState::Completed).await?;
    assert_eq!(migration.kind, "drain_node");
    let removed = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 5, force: true })
        .await?
        .into_inner();
    let migration = wait_migration(&mut admin, &removed.migration_id, pb::MigrationState::Completed).await?;
    assert_eq!(migration.kind, "remove_node");
    for id in [4, 5] {
        let node = admin.get_storage_node(pb::GetStorageNodeRequest { node_id: id }).await?.into_inner();
        assert_eq!((node.status, node.in_ring), (pb::NodeStatus::Removed as i32, false), "node {id}");
    }
    let error = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 4, force: false })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "NODE_NOT_FOUND", "removed nodes cannot be removed again");

    let nodes = admin.list_storage_nodes(pb::ListStorageNodesRequest {}).await?.into_inner().nodes;
    assert_eq!(nodes.iter().map(|n| n.node_id).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(nodes.iter().filter(|n| n.in_ring).count(), 3);
    // Where the topology places each node: with three nodes every list holds each of them once, so
    // each node's counts over the three positions add up to every partition, and each position's
    // counts over the nodes too.
    for node in &nodes {
        let counts = &node.partitions_at_position;
        match node.in_ring {
            true => assert_eq!(counts.iter().sum::<u32>(), common::TEST_PARTITIONS, "node {}", node.node_id),
            false => assert!(counts.is_empty(), "node {} is in no list: {counts:?}", node.node_id),
        }
    }
    for position in 0..3 {
        let held: u32 = nodes.iter().filter_map(|n| n.partitions_at_position.get(position)).sum();
        assert_eq!(held, common::TEST_PARTITIONS, "position {position}");
    }

    // Migrations: listed newest first; unknown ids; finished ones cannot be cancelled.
    let migrations = admin.list_migrations(pb::ListMigrationsRequest {}).await?.into_inner().migrations;
    assert_eq!(migrations.first().map(|m| m.migration_id.as_str()), Some(removed.migration_id.as_str()));
    assert!(migrations.iter().all(|m| m.state == pb::MigrationState::Completed as i32));
    let error =
        admin.get_migration(pb::GetMigrationRequest { migration_id: "mig-nope".into() }).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::NotFound, "MIGRATION_NOT_FOUND"));
    let error = admin
        .cancel_migration(pb::CancelMigrationRequest { migration_id: "mig-nope".into() })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "MIGRATION_NOT_FOUND");
    let error = admin
        .cancel_migration(pb::CancelMigrationRequest { migration_id: removed.migration_id.clone() })
        .await
        .unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::FailedPrecondition, "MIGRATION_FINISHED"));
    server.shutdown().await
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A heartbeat from `node_id` reporting a clock offset (`None`: not measured yet).
fn clock_beat(node_id: u32, clock_offset_ms: Option<i64>) -> cluster_pb::HeartbeatRequest {
    cluster_pb::HeartbeatRequest {
        node_id,
        stats: Some(pb::NodeStats {
            keys: u64::from(node_id),
            clock_offset_ms: clock_offset_ms.unwrap_or(0),
            clock_offset_known: clock_offset_ms.is_some(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Each node's (reported offset if known, clock_skewed) as ListStorageNodes and GetStorageNode show it.
async fn clock_verdicts(admin: &mut common::Admin) -> anyhow::Result<Vec<(Option<i64>, bool)>> {
    let nodes = admin.list_storage_nodes(pb::ListStorageNodesRequest {}).await?.into_inner().nodes;
    let mut verdicts = Vec::new();
    for listed in nodes {
        let mut got =
            admin.get_storage_node(pb::GetStorageNodeRequest { node_id: listed.node_id }).await?.into_inner();
        // The heartbeat's age grew between the two calls.
        assert!(got.heartbeat_age_ms >= listed.heartbeat_age_ms);
        got.heartbeat_age_ms = listed.heartbeat_age_ms;
        assert_eq!(got, listed, "get and list agree");
        let stats = listed.stats.unwrap();
        verdicts.push((stats.clock_offset_known.then_some(stats.clock_offset_ms), listed.clock_skewed));
    }
    Ok(verdicts)
}

/// A node's reported clock offset is stored with its stats and judged against
/// `--max-clock-offset-ms` (default 1000) in every StorageNode meta returns; an unknown offset is
/// never skewed. Every heartbeat answer carries meta's clock.
async fn clock_offsets_are_reported_and_judged(config: pairdb_meta::Config) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    let mut admin = server.admin().await?;
    let mut cluster = server.cluster().await?;
    add_nodes(&mut admin, 4).await?;
    assert_eq!(clock_verdicts(&mut admin).await?, [(None, false); 4], "nothing reported yet");

    let before = unix_ms();
    let mut answers = Vec::new();
    for (node_id, offset) in [(1, Some(1_500)), (2, Some(20)), (3, None), (4, Some(-1_500))] {
        answers.push(cluster.heartbeat(clock_beat(node_id, offset)).await?.into_inner());
    }
    let after = unix_ms();
    for answer in &answers {
        assert!(!answer.unknown_node);
        assert!(
            (before..=after).contains(&answer.meta_unix_ms),
            "{before} <= {} <= {after}",
            answer.meta_unix_ms
        );
    }
    assert_eq!(
        clock_verdicts(&mut admin).await?,
        [(Some(1_500), true), (Some(20), false), (None, false), (Some(-1_500), true)]
    );
    // A bare offset without `clock_offset_known` is not a measurement.
    let mut unmeasured = clock_beat(3, Some(5_000));
    unmeasured.stats.as_mut().unwrap().clock_offset_known = false;
    cluster.heartbeat(unmeasured).await?;
    // The bound itself is not skewed; a node whose clock was fixed is no longer.
    cluster.heartbeat(clock_beat(1, Some(1_000))).await?;
    cluster.heartbeat(clock_beat(4, Some(-1_001))).await?;
    assert_eq!(
        clock_verdicts(&mut admin).await?,
        [(Some(1_000), false), (Some(20), false), (None, false), (Some(-1_001), true)]
    );
    // Unknown nodes get meta's clock too.
    let before = unix_ms();
    let answer = cluster.heartbeat(clock_beat(9, Some(1))).await?.into_inner();
    assert!(answer.unknown_node);
    assert!((before..=unix_ms()).contains(&answer.meta_unix_ms));
    server.shutdown().await
}

#[tokio::test]
async fn clock_offsets_are_reported_and_judged_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    clock_offsets_are_reported_and_judged(test_config(dir.path())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_offsets_are_reported_and_judged_postgres() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = common::PgSchema::create(&base).await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.database_url = Some(schema.url());
    clock_offsets_are_reported_and_judged(config).await
}

/// The value of `pairdb_meta_node_clock_offset_seconds` for a node on `/metrics`, in ms, if exported.
async fn clock_offset_gauge(addr: std::net::SocketAddr, node_id: u32) -> anyhow::Result<Option<f64>> {
    let body = common::http(addr, "GET", "/metrics", None, None).await?.body;
    let prefix = format!("pairdb_meta_node_clock_offset_seconds{{node_id=\"{node_id}\"}} ");
    let seconds: Option<f64> =
        body.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|value| value.trim().parse().ok());
    Ok(seconds.map(|s| (s * 1000.0).round()))
}

/// `--max-clock-offset-ms` moves the bound, and the gauge holds each node's last measured offset.
/// (Nodes 7 and 8: the tests of this binary share one metrics registry, and the others use 1-4.)
#[tokio::test]
async fn the_clock_offset_bound_is_configurable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.max_clock_offset_ms = 2_000;
    let server = Server::start(config).await?;
    let mut admin = server.admin().await?;
    let mut cluster = server.cluster().await?;
    add_nodes(&mut admin, 1).await?;
    add_nodes_from(&mut admin, 7, 8).await?;
    cluster.heartbeat(clock_beat(7, Some(1_500))).await?;
    cluster.heartbeat(clock_beat(8, Some(-2_001))).await?;
    assert_eq!(
        clock_verdicts(&mut admin).await?,
        [(None, false), (Some(1_500), false), (Some(-2_001), true)]
    );
    assert_eq!(clock_offset_gauge(server.addr, 7).await?, Some(1_500.0));
    assert_eq!(clock_offset_gauge(server.addr, 8).await?, Some(-2_001.0));
    // A heartbeat without a measurement leaves the last one.
    cluster.heartbeat(clock_beat(8, None)).await?;
    assert_eq!(clock_offset_gauge(server.addr, 8).await?, Some(-2_001.0));
    cluster.heartbeat(clock_beat(8, Some(3))).await?;
    assert_eq!(clock_offset_gauge(server.addr, 8).await?, Some(3.0));
    server.shutdown().await
}

async fn add_nodes_from(admin: &mut common::Admin, first: u32, last: u32) -> anyhow::Result<()> {
    for id in first..=last {
        let response = admin
            .add_storage_node(pb::AddStorageNodeRequest {
                node_id: id,
                address: format!("127.0.0.1:{}", 7200 + id),
                ..Default::default()
            })
            .await?
            .into_inner();
        wait_migration(admin, &response.migration_id, pb::MigrationState::Completed).await?;
    }
    Ok(())
}

/// Migrations queue one at a time, report progress while running, and cancelling a running one
/// discards its pending topology and restores what it changed.
#[tokio::test]
async fn migrations_queue_run_and_cancel() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mover = Arc::new(common::GatedMover::default());
    let server = Server::start_with_mover(test_config(dir.path()), mover.clone()).await?;
    let mut admin = server.admin().await?;
    add_nodes(&mut admin, 1).await?; // bootstrap: no migration, so the gate does not matter

    let adding = admin
        .add_storage_node(pb::AddStorageNodeRequest {
            node_id: 2,
            address: "127.0.0.1:7202".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let queued = admin
        .add_storage_node(pb::AddStorageNodeRequest {
            node_id: 3,
            address: "127.0.0.1:7203".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let running = wait_migration(&mut admin, &adding.migration_id, pb::MigrationState::Running).await?;
    assert_eq!(running.to_epoch, running.from_epoch + 1);
    let second = admin
        .get_migration(pb::GetMigrationRequest { migration_id: queued.migration_id.clone() })
        .await?
        .into_inner();
    assert_eq!(second.state, pb::MigrationState::Pending as i32, "one migration runs at a time");

    // Removing a node whose add_node migration is still queued cancels that migration and needs no
    // migration of its own.
    let joining = admin
        .add_storage_node(pb::AddStorageNodeRequest {
            node_id: 4,
            address: "127.0.0.1:7204".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let removed = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 4, force: false })
        .await?
        .into_inner();
    assert!(removed.migration_id.is_empty());
    assert_eq!(removed.node.unwrap().status, pb::NodeStatus::Removed as i32);
    let dropped = admin
        .get_migration(pb::GetMigrationRequest { migration_id: joining.migration_id })
        .await?
        .into_inner();
    assert_eq!(dropped.state, pb::MigrationState::Cancelled as i32);

    // Cancel the running one: node 2 is removed, the ring stays as it was.
    let cancelled = admin
        .cancel_migration(pb::CancelMigrationRequest { migration_id: adding.migration_id.clone() })
        .await?
        .into_inner();
    assert_eq!(cancelled.state, pb::MigrationState::Cancelled as i32);
    let again = admin
        .cancel_migration(pb::CancelMigrationRequest { migration_id: adding.migration_id.clone() })
        .await?
        .into_inner();
    assert_eq!(again.state, pb::MigrationState::Cancelled as i32, "cancelling twice is idempotent");
    let node = admin.get_storage_node(pb::GetStorageNodeRequest { node_id: 2 }).await?.into_inner();
    assert_eq!((node.status, node.in_ring), (pb::NodeStatus::Removed as i32, false));

    // The queued one runs next, and completes once data movement is allowed.
    wait_migration(&mut admin, &queued.migration_id, pb::MigrationState::Running).await?;
    mover.release();
    let done = wait_migration(&mut admin, &queued.migration_id, pb::MigrationState::Completed).await?;
    let progress = done.progress.unwrap();
    assert_eq!(progress.partitions_done, progress.partitions_total);
    assert_eq!(progress.keys_done, 2 * progress.partitions_total, "the mover's counts are reported");
    assert!(mover.moves.load(Ordering::SeqCst) >= progress.partitions_total);
    assert!(done.to_epoch > running.to_epoch, "a cancelled epoch is never reused");
    let node = admin.get_storage_node(pb::GetStorageNodeRequest { node_id: 3 }).await?.into_inner();
    assert_eq!((node.status, node.in_ring), (pb::NodeStatus::Active as i32, true));

    // A replication-factor change runs as a migration; while it runs the tenant reports the factor
    // reads still use, and a second change is refused.
    admin.create_tenant(create("acme", 1)).await?;
    mover.close();
    let raised = admin
        .update_replication_factor(pb::UpdateReplicationFactorRequest {
            tenant_id: "acme".into(),
            replication_factor: 2,
        })
        .await?
        .into_inner();
    wait_migration(&mut admin, &raised.migration_id, pb::MigrationState::Running).await?;
    let tenant = common::http(server.addr, "GET", "/v1/tenants/acme", Some(ADMIN_TOKEN), None).await?.json();
    assert_eq!(
        (tenant["replication_factor"].as_u64(), tenant["previous_replication_factor"].as_u64()),
        (Some(2), Some(1))
    );
    let error = admin
        .update_replication_factor(pb::UpdateReplicationFactorRequest {
            tenant_id: "acme".into(),
            replication_factor: 1,
        })
        .await
        .unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::FailedPrecondition, "MIGRATION_IN_PROGRESS"));
    let error = admin
        .remove_storage_node(pb::RemoveStorageNodeRequest { node_id: 3, force: false })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "NODE_IN_USE", "the migrating tenant needs both nodes");
    mover.release();
    wait_migration(&mut admin, &raised.migration_id, pb::MigrationState::Completed).await?;
    let tenant = common::http(server.addr, "GET", "/v1/tenants/acme", Some(ADMIN_TOKEN), None).await?.json();
    assert_eq!(tenant["previous_replication_factor"].as_u64(), Some(0));

    server.shutdown().await
}

/// The nodes flagged `holds_unowned_data`, by the admin API and in a new watch stream's snapshot
/// (once this replica's view has caught up and both agree).
async fn nodes_holding_unowned_data(server: &Server, admin: &mut common::Admin) -> anyhow::Result<Vec<u32>> {
    let listed = admin.list_storage_nodes(pb::ListStorageNodesRequest {}).await?.into_inner().nodes;
    let flagged: Vec<u32> = listed.iter().filter(|n| n.holds_unowned_data).map(|n| n.node_id).collect();
    let expected = flagged.clone();
    common::eventually(Duration::from_secs(10), "the flags in a watch snapshot", || {
        let expected = expected.clone();
        async move {
            let mut stream =
                server.cluster().await.ok()?.watch(cluster_pb::WatchRequest::default()).await.ok()?;
            let first = stream.get_mut().message().await.ok()??;
            let Some(cluster_pb::watch_event::Event::Snapshot(snapshot)) = first.event else { return None };
            let watched: Vec<u32> =
                snapshot.nodes.iter().filter(|n| n.holds_unowned_data).map(|n| n.node_id).collect();
            (watched == expected).then_some(())
        }
    })
    .await?;
    Ok(flagged)
}

/// Ending a migration marks the nodes it leaves holding data they no longer own (completing: the
/// displaced owners; abandoning: the nodes that were gaining); a heartbeat reporting a cleanup from a
/// view at least as recent as the mark clears it, an older one does not.
#[tokio::test]
async fn migration_ends_mark_the_nodes_left_holding_data_until_they_report_a_cleanup() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mover = Arc::new(common::GatedMover::default());
    let server = Server::start_with_mover(test_config(dir.path()), mover.clone()).await?;
    let mut admin = server.admin().await?;
    add_nodes(&mut admin, 1).await?;
    admin.create_tenant(create("acme", 1)).await?;
    assert_eq!(nodes_holding_unowned_data(&server, &mut admin).await?, Vec::<u32>::new());

    // Node 2 takes over first positions from node 1 (N = 1): node 1 holds what it gave away.
    mover.release();
    add_nodes_from(&mut admin, 2, 2).await?;
    assert_eq!(nodes_holding_unowned_data(&server, &mut admin).await?, vec![1]);
    let mut cluster = server.cluster().await?;
    let cleanup = |revision: u64| cluster_pb::HeartbeatRequest {
        node_id: 1,
        unowned_cleanup_revision: revision,
        ..Default::default()
    };
    cluster.heartbeat(cleanup(1)).await?;
    assert_eq!(nodes_holding_unowned_data(&server, &mut admin).await?, vec![1], "a view from before the end");
    cluster.heartbeat(cleanup(1 << 40)).await?;
    assert_eq!(nodes_holding_unowned_data(&server, &mut admin).await?, vec![1], "a revision not yet made");
    let mut stream = cluster.watch(cluster_pb::WatchRequest::default()).await?.into_inner();
    let now = stream.message().await?.map(|event| event.revision).unwrap_or_default();
    cluster.heartbeat(cleanup(now)).await?;
    assert_eq!(nodes_holding_unowned_data(&server, &mut admin).await?, Vec::<u32>::new());

    // N 1 → 2 cancelled while running: the second replicas received data and own none of it now.
    mover.close();
    let raised = admin
        .update_replication_factor(pb::UpdateReplicationFactorRequest {
            tenant_id: "acme".into(),
            replication_factor: 2,
        })
        .await?
        .into_inner();
    wait_migration(&mut admin, &raised.migration_id, pb::MigrationState::Running).await?;
    admin.cancel_migration(pb::CancelMigrationRequest { migration_id: raised.migration_id }).await?;
    assert_eq!(nodes_holding_unowned_data(&server, &mut admin).await?, vec![1, 2]);
    server.shutdown().await
}

#[tokio::test]
async fn unauthenticated_requests_are_rejected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(test_config(dir.path())).await?;
    let channel = common::channel(server.addr).await?;
    let mut anonymous = AdminServiceClient::new(channel.clone());
    let error = anonymous.list_tenants(pb::ListTenantsRequest {}).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::Unauthenticated, "UNAUTHENTICATED"));

    let mut wrong = AdminServiceClient::with_interceptor(channel, |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", "Bearer not-the-token".parse().unwrap());
        Ok(request)
    });
    let error = wrong.create_tenant(create("acme", 1)).await.unwrap_err();
    assert_eq!(reason(&error), "UNAUTHENTICATED");

    // The right token works; the cluster API and health need none.
    let mut admin = server.admin().await?;
    assert!(admin.list_tenants(pb::ListTenantsRequest {}).await.is_ok());
    assert!(!ADMIN_TOKEN.is_empty());
    server.shutdown().await
}
