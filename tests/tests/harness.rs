//! The harness itself, end to end: a cluster whose meta runs on PostgreSQL, typed clients handed out
//! by the harness, and a paused (SIGSTOP) storage node that a quorum tolerates and ALL does not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pairdb_client::proto::admin::v1 as admin;
use pairdb_client::{ClientOptions, Consistency, KvClient, ReadOptions, RetryPolicy, WriteOptions};
use pairdb_tests::cluster::{Cluster, ClusterOptions};
use pairdb_tests::postgres;

#[tokio::test]
async fn cluster_on_postgres_serves_typed_clients_and_survives_a_paused_node() {
    let Some(postgres_url) = postgres::test_url() else { return };
    let cluster =
        Cluster::start_with(ClusterOptions { postgres_url: Some(postgres_url), ..ClusterOptions::default() })
            .await
            .unwrap();
    let schema = cluster.postgres.as_ref().unwrap().name.clone();

    let admin = cluster.admin_client().await.unwrap();
    let nodes = admin.list_storage_nodes(admin::ListStorageNodesRequest {}).await.unwrap().nodes;
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|node| node.in_ring));

    let client = cluster.client(0).await.unwrap();
    let quorum = WriteOptions { consistency: Consistency::Quorum, ..WriteOptions::default() };
    let written = client.put("k", b"v1".to_vec(), quorum.clone()).await.unwrap();
    assert_eq!(written.required, 2);
    let read = client
        .get("k", ReadOptions { consistency: Consistency::All, ..ReadOptions::default() })
        .await
        .unwrap();
    assert_eq!(read.unwrap().single_value(), Some(&b"v1"[..]));
    assert!(client.get("missing", ReadOptions::default()).await.unwrap().is_none());

    cluster.pause_storage(2).unwrap();
    let update = WriteOptions { context: written.context.clone(), ..quorum };
    let coordinator = cluster.topology().await.unwrap().preference_list("t", "k", 3).unwrap()[0];
    let first = client.put("k", b"v2".to_vec(), update.clone()).await;
    if coordinator == Cluster::storage_node_id(2) {
        // The write in flight to its frozen coordinator may be applied there later, so the router
        // does not retry it on another replica (issue 16): it ends "outcome unknown" at its
        // deadline. The node is suspect by then, and the retry is coordinated elsewhere.
        let error = first.expect_err("a write in flight to a frozen coordinator has an unknown outcome");
        assert_eq!(
            (error.reason(), error.metadata("outcome")),
            ("QUORUM_NOT_REACHED", Some("unknown")),
            "{error}"
        );
        client.put("k", b"v2".to_vec(), update).await.expect("a quorum tolerates one frozen node");
    } else {
        first.expect("a quorum tolerates one frozen node");
    }
    let no_retries = ClientOptions { retry: RetryPolicy::never(), ..ClientOptions::default() };
    let impatient = KvClient::connect(&cluster.routers[0].addr.to_string(), "t", no_retries).await.unwrap();
    let all = ReadOptions {
        consistency: Consistency::All,
        timeout: Some(Duration::from_secs(2)),
        ..ReadOptions::default()
    };
    let error = impatient.get("k", all.clone()).await.expect_err("ALL cannot be met with a frozen node");
    assert_eq!(error.reason(), "QUORUM_NOT_REACHED", "{error}");

    cluster.resume_storage(2).unwrap();
    let mut last = None;
    for _ in 0..50 {
        match client.get("k", all.clone()).await {
            Ok(found) => {
                assert_eq!(found.unwrap().single_value(), Some(&b"v2"[..]));
                last = None;
                break;
            }
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(last.is_none(), "ALL after the node resumed: {last:?}");

    drop(cluster);
    // The schema is dropped with the cluster.
    let mut connection = <sqlx::postgres::PgConnection as sqlx::Connection>::connect(
        &std::env::var("PAIRDB_TEST_POSTGRES_URL").unwrap(),
    )
    .await
    .unwrap();
    let left: Option<(String,)> =
        sqlx::query_as("SELECT schema_name::text FROM information_schema.schemata WHERE schema_name = $1")
            .bind(&schema)
            .fetch_optional(&mut connection)
            .await
            .unwrap();
    assert!(left.is_none(), "schema {schema} was not dropped");
}
