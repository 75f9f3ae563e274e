//! TLS end to end: meta, three storage nodes and a router run with `--tls-cert/--tls-key/--tls-ca`
//! (certificates made in the test). Requests flow over TLS between every pair of services; internal
//! services refuse clients without a certificate the cluster CA signed; plaintext is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pairdb_client::proto::admin::v1 as admin;
use pairdb_client::proto::storage::v1 as spb;
use pairdb_client::proto::storage::v1::storage_service_client::StorageServiceClient;
use pairdb_client::{
    AdminClient, ClientOptions, Consistency, KvClient, ReadOptions, RetryPolicy, WriteOptions,
};
use pairdb_tests::pki::TestPki;
use pairdb_tests::{Process, free_addr};
use tonic::transport::ClientTlsConfig;

fn options(tls: Option<ClientTlsConfig>) -> ClientOptions {
    ClientOptions {
        tls,
        retry: RetryPolicy::never(),
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

async fn wait_serving(addr: SocketAddr, tls: &ClientTlsConfig) {
    let started = Instant::now();
    loop {
        if let Ok(channel) = pairdb_client::connect_with(&addr.to_string(), &options(Some(tls.clone()))).await
            && pairdb_client::is_serving(channel).await.unwrap_or(false)
        {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{addr} never served over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_tls_cluster_serves_and_refuses_clients_without_a_cluster_certificate() {
    let pki = TestPki::generate().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut meta_args = vec!["--no-auth".to_owned(), "--auto-add-nodes".to_owned(), "--data-dir".to_owned()];
    meta_args.push(data.path().join("meta").display().to_string());
    meta_args.extend(pki.service_args());
    let meta = Process::spawn("pairdb-meta", free_addr().unwrap(), &meta_args).unwrap();
    wait_serving(meta.addr, &pki.member_client()).await;

    let mut storage = Vec::new();
    for id in 1..=3u32 {
        let mut args = vec![
            "--node-id".to_owned(),
            id.to_string(),
            "--meta-addr".to_owned(),
            meta.addr.to_string(),
            "--sync".to_owned(),
            "periodic".to_owned(),
            "--data-dir".to_owned(),
            data.path().join(format!("storage-{id}")).display().to_string(),
        ];
        args.extend(pki.service_args());
        storage.push(Process::spawn("pairdb-storage", free_addr().unwrap(), &args).unwrap());
    }
    for node in &storage {
        wait_serving(node.addr, &pki.member_client()).await;
    }

    // Admin over mutual TLS; the nodes registered over mutual TLS too.
    let admin =
        AdminClient::connect(&meta.addr.to_string(), options(Some(pki.member_client()))).await.unwrap();
    let started = Instant::now();
    loop {
        let nodes = admin.list_storage_nodes(admin::ListStorageNodesRequest {}).await.unwrap().nodes;
        if nodes.iter().filter(|n| n.in_ring && n.status == admin::NodeStatus::Active as i32).count() == 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "nodes never joined over TLS: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin
        .create_tenant(admin::CreateTenantRequest {
            tenant_id: "t".into(),
            replication_factor: 3,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut router_args = vec!["--meta-addr".to_owned(), meta.addr.to_string(), "--no-auth".to_owned()];
    router_args.extend(pki.service_args());
    let router = Process::spawn("pairdb-router", free_addr().unwrap(), &router_args).unwrap();
    wait_serving(router.addr, &pki.anonymous_client()).await;

    // An application client needs only the CA: the router does not require client certificates.
    let kv = KvClient::connect(&router.addr.to_string(), "t", options(Some(pki.anonymous_client())))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        match kv
            .put(
                "k",
                b"over tls".to_vec(),
                WriteOptions { consistency: Consistency::All, ..WriteOptions::default() },
            )
            .await
        {
            Ok(_) => break,
            Err(error) => {
                assert!(started.elapsed() < Duration::from_secs(30), "put over TLS never succeeded: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let read =
        kv.get("k", ReadOptions { consistency: Consistency::All, ..ReadOptions::default() }).await.unwrap();
    assert_eq!(read.unwrap().single_value(), Some(&b"over tls"[..]));

    // Plaintext is refused everywhere.
    let plain = KvClient::connect(&router.addr.to_string(), "t", options(None)).await;
    let refused = match plain {
        Err(_) => true,
        Ok(client) => client.get("k", ReadOptions::default()).await.is_err(),
    };
    assert!(refused, "a plaintext client was served by a TLS router");

    // Internal services: no certificate, or one from another CA, is refused; a member's is accepted.
    let stats = || spb::StatsRequest {};
    for (who, tls) in [("no certificate", pki.anonymous_client()), ("rogue certificate", pki.rogue_client())]
    {
        let outcome = match pairdb_client::connect_with(
            &storage[0].addr.to_string(),
            &options(Some(tls.clone())),
        )
        .await
        {
            Err(_) => Err(()),
            Ok(channel) => {
                StorageServiceClient::new(channel).stats(stats()).await.map(|_| ()).map_err(|_| ())
            }
        };
        assert!(outcome.is_err(), "storage served a client with {who}");
        let admin_outcome = match AdminClient::connect(&meta.addr.to_string(), options(Some(tls))).await {
            Err(_) => Err(()),
            Ok(client) => client.list_tenants(admin::ListTenantsRequest {}).await.map(|_| ()).map_err(|_| ()),
        };
        assert!(admin_outcome.is_err(), "meta served a client with {who}");
    }
    let channel =
        pairdb_client::connect_with(&storage[0].addr.to_string(), &options(Some(pki.member_client())))
            .await
            .unwrap();
    StorageServiceClient::new(channel).stats(stats()).await.expect("a member certificate is accepted");
}
