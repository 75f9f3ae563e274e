//! Mutual TLS end to end, with certificates from `pairdb cert`: meta, three storage nodes and a router
//! run with `--tls-cert/--tls-key/--tls-ca` and no credential files, so the cluster's identities come
//! from the certificates' common names (`meta`, `node-<id>`, `router`). Requests flow over TLS between
//! every pair of services; internal services refuse clients without a certificate the cluster CA
//! signed, and a CA-signed certificate that names no principal (a tool's) or another node is refused
//! the cluster's roles; plaintext is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pairdb_client::proto::admin::v1 as admin;
use pairdb_client::proto::cluster::v1 as cpb;
use pairdb_client::proto::cluster::v1::cluster_service_client::ClusterServiceClient;
use pairdb_client::proto::storage::v1 as spb;
use pairdb_client::proto::storage::v1::storage_service_client::StorageServiceClient;
use pairdb_client::{
    AdminClient, ClientOptions, Consistency, KvClient, ReadOptions, RetryPolicy, WriteOptions,
};
use pairdb_tests::pki::TestPki;
use pairdb_tests::{Process, cli, free_addr};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

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

/// The cluster's certificates, made by `pairdb cert` in `dir/certs`.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make(dir: &Path) -> Certs {
        let certs = dir.join("certs");
        let certs_dir = certs.display().to_string();
        let hosts = ["--host", "127.0.0.1", "--host", "localhost"];
        let mut commands: Vec<Vec<&str>> = vec![
            vec!["cert", "create-ca"],
            [&["cert", "create-meta"][..], &hosts].concat(),
            [&["cert", "create-router"][..], &hosts].concat(),
            vec!["cert", "create-client", "admin"],
        ];
        let ids = ["1", "2", "3"];
        for id in &ids {
            commands.push([&["cert", "create-node", id][..], &hosts].concat());
        }
        for mut command in commands {
            command.extend(["--certs-dir", certs_dir.as_str()]);
            let finished = cli::run(dir, &command, &[]).unwrap();
            assert!(finished.success, "pairdb {command:?}: {}", finished.stderr);
        }
        let again = cli::run(dir, &["cert", "create-ca", "--certs-dir", certs_dir.as_str()], &[]).unwrap();
        assert!(!again.success, "pairdb cert overwrote an existing CA");
        Certs { dir: certs }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// The flags of a service presenting certificate `name`.
    fn args(&self, name: &str) -> Vec<String> {
        let (cert, key, ca) =
            (self.path(&format!("{name}.crt")), self.path(&format!("{name}.key")), self.path("ca.crt"));
        vec!["--tls-cert".into(), cert, "--tls-key".into(), key, "--tls-ca".into(), ca]
    }

    fn client(&self, name: Option<&str>) -> ClientTlsConfig {
        let read = |file: &str| std::fs::read(self.dir.join(file)).unwrap();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.crt")));
        match name {
            None => tls,
            Some(name) => {
                tls.identity(Identity::from_pem(read(&format!("{name}.crt")), read(&format!("{name}.key"))))
            }
        }
    }
}

#[tokio::test]
async fn a_tls_cluster_identifies_its_members_by_certificate_and_refuses_everyone_else() {
    let data = tempfile::tempdir().unwrap();
    let certs = Certs::make(data.path());
    let admin_tls = certs.client(Some("client-admin"));
    let mut meta_args = vec!["--no-auth".to_owned(), "--auto-add-nodes".to_owned(), "--data-dir".to_owned()];
    meta_args.push(data.path().join("meta").display().to_string());
    meta_args.extend(certs.args("meta"));
    let meta = Process::spawn("pairdb-meta", free_addr().unwrap(), &meta_args).unwrap();
    wait_serving(meta.addr, &admin_tls).await;

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
        args.extend(certs.args(&format!("node-{id}")));
        storage.push(Process::spawn("pairdb-storage", free_addr().unwrap(), &args).unwrap());
    }
    for node in &storage {
        wait_serving(node.addr, &admin_tls).await;
    }

    // Admin over mutual TLS; the nodes registered (as themselves, by certificate) over mutual TLS too.
    let admin = AdminClient::connect(&meta.addr.to_string(), options(Some(admin_tls.clone()))).await.unwrap();
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
    router_args.extend(certs.args("router"));
    let router = Process::spawn("pairdb-router", free_addr().unwrap(), &router_args).unwrap();
    wait_serving(router.addr, &certs.client(None)).await;

    // An application client needs only the CA: the router does not require client certificates.
    let kv =
        KvClient::connect(&router.addr.to_string(), "t", options(Some(certs.client(None)))).await.unwrap();
    let started = Instant::now();
    loop {
        let write = WriteOptions { consistency: Consistency::All, ..WriteOptions::default() };
        match kv.put("k", b"over tls".to_vec(), write).await {
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

    // No certificate, or one from another CA: the handshake fails at the internal services.
    let rogue = TestPki::generate().unwrap();
    let rogue_tls =
        certs.client(None).identity(Identity::from_pem(&rogue.rogue_cert_pem, &rogue.rogue_key_pem));
    for (who, tls) in [("no certificate", certs.client(None)), ("rogue certificate", rogue_tls)] {
        let outcome = match pairdb_client::connect_with(
            &storage[0].addr.to_string(),
            &options(Some(tls.clone())),
        )
        .await
        {
            Err(_) => Err(()),
            Ok(channel) => StorageServiceClient::new(channel)
                .stats(spb::StatsRequest {})
                .await
                .map(|_| ())
                .map_err(|_| ()),
        };
        assert!(outcome.is_err(), "storage served a client with {who}");
        let admin_outcome = match AdminClient::connect(&meta.addr.to_string(), options(Some(tls))).await {
            Err(_) => Err(()),
            Ok(client) => client.list_tenants(admin::ListTenantsRequest {}).await.map(|_| ()).map_err(|_| ()),
        };
        assert!(admin_outcome.is_err(), "meta served a client with {who}");
    }

    // A CA-signed certificate that names no principal is no cluster member.
    let channel =
        pairdb_client::connect_with(&storage[0].addr.to_string(), &options(Some(admin_tls.clone())))
            .await
            .unwrap();
    let status = StorageServiceClient::new(channel).stats(spb::StatsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let channel =
        pairdb_client::connect_with(&meta.addr.to_string(), &options(Some(admin_tls))).await.unwrap();
    let status = ClusterServiceClient::new(channel).watch(cpb::WatchRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // Node 2's certificate: a member of the storage API, but it registers only as node 2.
    let node2 = certs.client(Some("node-2"));
    let channel = pairdb_client::connect_with(&storage[0].addr.to_string(), &options(Some(node2.clone())))
        .await
        .unwrap();
    StorageServiceClient::new(channel)
        .stats(spb::StatsRequest {})
        .await
        .expect("a member certificate is accepted");
    let channel = pairdb_client::connect_with(&meta.addr.to_string(), &options(Some(node2))).await.unwrap();
    let request =
        cpb::RegisterNodeRequest { node_id: 3, address: "10.66.66.66:7200".into(), ..Default::default() };
    let status = ClusterServiceClient::new(channel).register_node(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}
