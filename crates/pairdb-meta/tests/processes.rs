//! Real `pairdb-meta` processes and real PostgreSQL (`PAIRDB_TEST_POSTGRES_URL`; each test uses a
//! schema of its own): leader failover after kill -9, a database outage through a proxy the test
//! controls, and API key secrets never reaching the database, the logs or list responses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    ADMIN_TOKEN, MetaProcess, PgSchema, Proxy, Server, eventually, reason, test_config, wait_ready,
};
use pairdb_proto::admin::v1 as admin_pb;
use pairdb_proto::cluster::v1 as pb;
use pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use pairdb_proto::cluster::v1::watch_event::Event;
use tonic::Code;

/// Meta processes of these tests run the cluster API without credentials: they exercise the
/// replicas' database behaviour (cluster authentication is covered end to end in the top-level
/// `tests` crate).
fn meta_args(database_url: &str) -> Vec<String> {
    [
        "--insecure-cluster",
        "--database-url",
        database_url,
        "--admin-token",
        ADMIN_TOKEN,
        "--partition-count",
        "64",
        "--node-down-after-ms",
        "1500",
        "--heartbeat-interval-ms",
        "200",
        "--database-timeout-ms",
        "2000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Collects every watch event of one subscription in the background.
fn record(
    mut stream: tonic::Streaming<pb::WatchEvent>,
) -> (Arc<Mutex<Vec<pb::WatchEvent>>>, tokio::task::JoinHandle<()>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            sink.lock().unwrap().push(event);
        }
    });
    (events, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_after_kill_9() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = PgSchema::create(&base).await?;
    let logs = tempfile::tempdir()?;
    let first = MetaProcess::spawn(&meta_args(&schema.url()), logs.path().join("a.log"), &[]).await?;
    let second = MetaProcess::spawn(&meta_args(&schema.url()), logs.path().join("b.log"), &[]).await?;
    for process in [&first, &second] {
        wait_ready(process.addr, Duration::from_secs(60))
            .await
            .map_err(|e| anyhow::anyhow!("{e}: {}", process.log_text()))?;
    }
    // Exactly one leader.
    let leader_is_first = eventually(Duration::from_secs(10), "a leader", || async {
        match (first.is_leader().await, second.is_leader().await) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await?;
    let (mut leader, survivor) = if leader_is_first { (first, second) } else { (second, first) };

    // A watch client on the survivor; changes go through both replicas.
    let mut watcher = ClusterServiceClient::new(common::stream_channel(survivor.addr).await?);
    let stream = watcher
        .watch(pb::WatchRequest {
            subscriber_kind: "router".into(),
            subscriber_id: "t".into(),
            include_api_keys: true,
        })
        .await?
        .into_inner();
    let (events, recorder) = record(stream);
    let mut via_leader = common::admin_client(leader.addr).await?;
    let mut via_survivor = common::admin_client(survivor.addr).await?;
    via_leader
        .add_storage_node(admin_pb::AddStorageNodeRequest {
            node_id: 1,
            address: "127.0.0.1:7201".into(),
            ..Default::default()
        })
        .await?;
    via_survivor
        .create_tenant(admin_pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            replication_factor: 1,
            ..Default::default()
        })
        .await?;
    via_leader
        .update_tenant(admin_pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            max_siblings: Some(9),
            ..Default::default()
        })
        .await?;
    // Storage node 1 registers and heartbeats through the survivor, then falls silent.
    let mut cluster = ClusterServiceClient::new(common::channel(survivor.addr).await?);
    cluster
        .register_node(pb::RegisterNodeRequest {
            node_id: 1,
            address: "127.0.0.1:7301".into(),
            ..Default::default()
        })
        .await?;
    for _ in 0..3 {
        let beat =
            cluster.heartbeat(pb::HeartbeatRequest { node_id: 1, ..Default::default() }).await?.into_inner();
        assert!(!beat.unknown_node);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // kill -9 the leader: the survivor takes over within 10 s.
    leader.kill().await?;
    let killed = Instant::now();
    eventually(Duration::from_secs(10), "the survivor to become leader", || async {
        survivor.is_leader().await.then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nsurvivor log:\n{}", survivor.log_text()))?;
    let takeover = killed.elapsed();
    println!("survivor became leader {takeover:?} after kill -9");
    assert!(takeover < Duration::from_secs(10));

    // ... and marks the silent node down.
    eventually(Duration::from_secs(10), "node 1 marked down", || {
        let mut admin = via_survivor.clone();
        async move {
            let node = admin
                .get_storage_node(admin_pb::GetStorageNodeRequest { node_id: 1 })
                .await
                .ok()?
                .into_inner();
            (node.status == admin_pb::NodeStatus::Down as i32).then_some(())
        }
    })
    .await?;
    // A change after the failover.
    via_survivor
        .create_api_key(admin_pb::CreateApiKeyRequest {
            tenant_id: "acme".into(),
            description: String::new(),
        })
        .await?;

    // The watcher saw every change: a snapshot, then one event per change-log revision, in order.
    let expected: Vec<(i64, String)> = {
        use sqlx::Connection;
        let mut connection = sqlx::postgres::PgConnection::connect(&schema.url()).await?;
        let rows = sqlx::query_as("SELECT revision, kind FROM changes ORDER BY revision")
            .fetch_all(&mut connection)
            .await?;
        connection.close().await?;
        rows
    };
    let last = expected.last().map(|(revision, _)| *revision as u64).unwrap();
    eventually(Duration::from_secs(5), "the watcher to catch up", || async {
        events.lock().unwrap().last().is_some_and(|e| e.revision >= last).then_some(())
    })
    .await?;
    let seen = events.lock().unwrap().clone();
    let Some(Event::Snapshot(_)) = &seen[0].event else { panic!("first event is not a snapshot") };
    let from = seen[0].revision;
    let revisions: Vec<u64> = seen[1..].iter().map(|e| e.revision).collect();
    let wanted: Vec<u64> = expected.iter().map(|(r, _)| *r as u64).filter(|r| *r > from).collect();
    assert_eq!(revisions, wanted, "one event per change, none missed, none twice");
    let kinds: BTreeSet<&str> = seen[1..]
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::TenantChanged(_)) => Some("tenant"),
            Some(Event::NodeChanged(n)) if n.status == admin_pb::NodeStatus::Down as i32 => Some("node_down"),
            Some(Event::ApiKeyAdded(_)) => Some("api_key"),
            Some(Event::TopologyCurrent(_)) => Some("topology"),
            _ => None,
        })
        .collect();
    for kind in ["tenant", "node_down", "api_key"] {
        assert!(kinds.contains(kind), "watcher missed a {kind} event: {kinds:?}");
    }
    recorder.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_survived_without_restart() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = PgSchema::create(&base).await?;
    let proxy = Proxy::start(schema.server_addr()).await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.database_url = Some(schema.url_via(proxy.addr));
    config.database_timeout_ms = 1000;
    let server = Server::start(config).await?;
    let mut admin = server.admin().await?;
    admin
        .add_storage_node(admin_pb::AddStorageNodeRequest {
            node_id: 1,
            address: "127.0.0.1:7201".into(),
            ..Default::default()
        })
        .await?;
    let mut watcher = ClusterServiceClient::new(common::stream_channel(server.addr).await?);
    let mut stream = watcher.watch(pb::WatchRequest::default()).await?.into_inner();
    let Some(Event::Snapshot(_)) = stream.message().await?.unwrap().event else { panic!() };

    proxy.cut();
    let cut = Instant::now();
    let body = eventually(Duration::from_secs(15), "not ready", || async {
        let response = common::http(server.addr, "GET", "/health/ready", None, None).await.ok()?;
        (response.status == 503).then_some(response.body)
    })
    .await?;
    println!("not ready {:?} after the cut: {}", cut.elapsed(), body.trim());
    assert!(body.contains("database"), "{body}");
    let health = tonic_health::pb::health_client::HealthClient::new(common::channel(server.addr).await?)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await?
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);

    let error = admin.list_tenants(admin_pb::ListTenantsRequest {}).await.unwrap_err();
    assert_eq!((error.code(), reason(&error).as_str()), (Code::Unavailable, "DATABASE_UNAVAILABLE"));
    let error = admin
        .create_tenant(admin_pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            replication_factor: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&error), "DATABASE_UNAVAILABLE");
    let response = common::http(server.addr, "GET", "/v1/tenants", Some(ADMIN_TOKEN), None).await?;
    assert_eq!((response.status, response.reason().as_str()), (503, "DATABASE_UNAVAILABLE"));
    // The watch stream stays open through the outage.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await.is_err(),
        "stream ended or errored"
    );

    proxy.restore();
    let restored = Instant::now();
    server.wait_ready(Duration::from_secs(20)).await?;
    println!("ready again {:?} after the database came back", restored.elapsed());
    let tenant = eventually(Duration::from_secs(10), "admin calls to work again", || {
        let mut admin = admin.clone();
        async move {
            admin
                .create_tenant(admin_pb::CreateTenantRequest {
                    tenant_id: "acme".into(),
                    replication_factor: 1,
                    ..Default::default()
                })
                .await
                .ok()
        }
    })
    .await?
    .into_inner();
    assert_eq!(tenant.tenant_id, "acme");
    // The same watch stream delivers the change made after the outage.
    let event = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??.unwrap();
        if let Some(Event::TenantChanged(tenant)) = event.event {
            break tenant;
        }
    };
    assert_eq!(event.tenant_id, "acme");
    // Leadership came back too: the orchestrator runs migrations again.
    let added = admin
        .add_storage_node(admin_pb::AddStorageNodeRequest {
            node_id: 2,
            address: "127.0.0.1:7202".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    common::wait_migration(&mut admin, &added.migration_id, admin_pb::MigrationState::Completed).await?;
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_secrets_never_leave_the_creation_response() -> anyhow::Result<()> {
    let Some(base) = common::postgres_url() else { return Ok(()) };
    let schema = PgSchema::create(&base).await?;
    let logs = tempfile::tempdir()?;
    // Debug logging everywhere, sqlx statements included.
    let process =
        MetaProcess::spawn(&meta_args(&schema.url()), logs.path().join("meta.log"), &[("RUST_LOG", "debug")])
            .await?;
    wait_ready(process.addr, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", process.log_text()))?;
    let addr = process.addr;
    let call = |method: &'static str, path: &'static str, body: Option<&'static str>| async move {
        common::http(addr, method, path, Some(ADMIN_TOKEN), body).await.unwrap()
    };
    assert_eq!(
        call("POST", "/v1/admin/storage-nodes", Some(r#"{"address": "127.0.0.1:7201"}"#)).await.status,
        201
    );
    assert_eq!(
        call("POST", "/v1/tenants", Some(r#"{"tenant_id": "acme", "replication_factor": 1}"#)).await.status,
        201
    );
    let created = call("POST", "/v1/tenants/acme/api-keys", Some(r#"{"description": "app"}"#)).await.json();
    let secret = created["secret"].as_str().unwrap().to_owned();
    let mut admin = common::admin_client(addr).await?;
    let grpc_created = admin
        .create_api_key(admin_pb::CreateApiKeyRequest {
            tenant_id: "acme".into(),
            description: String::new(),
        })
        .await?
        .into_inner();
    let secrets = [secret, grpc_created.secret];

    let http_list = call("GET", "/v1/api-keys", None).await.body;
    let grpc_list =
        format!("{:?}", admin.list_api_keys(admin_pb::ListApiKeysRequest::default()).await?.into_inner());
    let mut watcher = ClusterServiceClient::new(common::stream_channel(addr).await?);
    let mut stream =
        watcher.watch(pb::WatchRequest { include_api_keys: true, ..Default::default() }).await?.into_inner();
    let snapshot = format!("{:?}", stream.message().await?.unwrap());
    let table: Vec<(String, String, String, String)> = {
        use sqlx::Connection;
        let mut connection = sqlx::postgres::PgConnection::connect(&schema.url()).await?;
        let rows = sqlx::query_as("SELECT key_id, tenant_id, secret_sha256, description FROM api_keys")
            .fetch_all(&mut connection)
            .await?;
        connection.close().await?;
        rows
    };
    assert_eq!(table.len(), 2);
    let log = process.log_text();
    assert!(log.contains("api key created"), "the log is captured: {log}");
    for secret in &secrets {
        let random_part = secret.rsplit('_').next().unwrap();
        for (place, text) in [
            ("http list", &http_list),
            ("grpc list", &grpc_list),
            ("watch snapshot", &snapshot),
            ("log", &log),
        ] {
            assert!(!text.contains(random_part), "the secret appears in the {place}");
        }
        for row in &table {
            let text = format!("{row:?}");
            assert!(!text.contains(random_part), "the secret is stored: {text}");
        }
        let hash = pairdb_meta::admin::secret_sha256(secret);
        assert!(table.iter().any(|row| row.2 == hash), "the hash is stored");
        assert!(snapshot.contains(&hash), "routers get the hash");
    }
    Ok(())
}
