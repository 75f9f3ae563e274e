//! `pairdb dev`: a complete local cluster in one process, for trying PairDB and for the quickstart.
//!
//! Cluster authentication is on, as in production: the first run writes a cluster secret to
//! `<data-dir>/cluster-secret` (owner-only) and every service gets its credential from it, so an
//! unauthenticated call to a dev storage node's or meta's internal API is refused too. Tenant API
//! keys and the admin token are off (and the banner says so).
//!
//! Each service runs as an in-process task calling the same `run(config, listener, shutdown)` its
//! standalone binary calls, so the dev cluster is the production code on embedded defaults: meta on
//! SQLite with admin auth off and nodes auto-added, N storage nodes, one router (in-process
//! idempotency once the edge lands). One process keeps start-up fast and makes Ctrl-C stop everything
//! together. Start order matches the test harness: meta, storage nodes, wait until all are in the
//! ring, tenant `demo`, then the router, so the router's first view is the whole cluster. Data lives
//! under `--data-dir` and is reused by the next run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pairdb_client::proto::admin::v1 as admin;
use pairdb_client::{AdminClient, ClientOptions, KvClient, ReadOptions, RetryPolicy};
use pairdb_core::ring::NodeId;
use pairdb_service::cluster_auth::{ClusterAuthArgs, Principal, Signer};
use pairdb_service::shutdown::{Shutdown, ShutdownTrigger};
use tokio::task::JoinSet;

use crate::cli::{DEV_TENANT, DevArgs, SyncArg};

/// How long start-up may take before `pairdb dev` gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each service may take to stop after Ctrl-C.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !(1..=16).contains(&args.storage_nodes) {
        anyhow::bail!("INVALID_ARGUMENT: --storage-nodes must be between 1 and 16");
    }
    // Quiet by default: the dev console shows the endpoints, not every service's info log.
    let telemetry =
        pairdb_service::telemetry::init(pairdb_service::telemetry::LogFormat::Text, "warn", "pairdb-dev");
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|error| anyhow::anyhow!("cannot create {}: {error}", args.data_dir.display()))?;

    let (stop_tx, stop_rx) = pairdb_service::shutdown::channel();
    let mut services = JoinSet::new();
    let secret_file = cluster_secret(&args.data_dir)?;
    let signer = Signer::read(&secret_file)?;

    let meta_listener = bind(args.meta_addr, "meta").await?;
    let meta_config = meta_config(&args, &secret_file);
    let stop = stopped(stop_rx.clone());
    services.spawn(async move {
        ("meta", pairdb_meta::run(meta_config, meta_listener, stop).await.map_err(anyhow::Error::from))
    });
    let storage_addrs = start_storage_nodes(&args, &signer, &stop_rx, &mut services).await?;

    let router_listener = bind(args.router_addr, "router").await?;
    let replication_factor = args.storage_nodes.min(3);
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let meta_addr = args.meta_addr.to_string();
    let nodes = args.storage_nodes as usize;
    let prepared = while_running(&mut services, deadline, async {
        let admin = wait_for_meta(&meta_addr).await?;
        wait_for_ring(&admin, nodes).await?;
        ensure_tenant(&admin, replication_factor).await
    })
    .await;
    let outcome = match prepared {
        Ok(()) => {
            let router_config = router_config(&args, &signer);
            let stop = stopped(stop_rx.clone());
            services.spawn(async move {
                let served = pairdb_router::run(router_config, router_listener, stop).await;
                ("router", served.map_err(anyhow::Error::from))
            });
            let router_addr = args.router_addr.to_string();
            while_running(&mut services, deadline, wait_for_router(&router_addr)).await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = outcome {
        stop_all(stop_tx, &mut services).await;
        telemetry.shutdown().await;
        return Err(error);
    }

    print_banner(&args, &storage_addrs, replication_factor, started.elapsed());

    let failure = tokio::select! {
        () = pairdb_service::shutdown_signal() => None,
        Some(Ok((name, result))) = services.join_next() => Some(match result {
            Err(error) => error.context(format!("{name} failed")),
            Ok(()) => anyhow::anyhow!("{name} stopped unexpectedly"),
        }),
    };
    println!("pairdb dev: stopping");
    stop_all(stop_tx, &mut services).await;
    telemetry.shutdown().await;
    match failure {
        Some(error) => Err(error),
        None => {
            println!("pairdb dev: stopped; data kept in {}", args.data_dir.display());
            Ok(())
        }
    }
}

fn meta_config(args: &DevArgs, secret_file: &Path) -> pairdb_meta::Config {
    let mut config = pairdb_meta::Config::embedded(args.data_dir.join("meta"), None);
    config.listen_addr = args.meta_addr.into();
    config.auto_add_nodes = true;
    config.insecure_cluster = args.insecure_cluster;
    config.cluster_secret_file = (!args.insecure_cluster).then(|| secret_file.to_path_buf());
    config
}

/// Binds and starts storage nodes 1..=N on consecutive ports; returns their addresses.
async fn start_storage_nodes(
    args: &DevArgs,
    signer: &Signer,
    stop_rx: &Shutdown,
    services: &mut JoinSet<(&'static str, anyhow::Result<()>)>,
) -> anyhow::Result<Vec<(u32, SocketAddr)>> {
    let mut storage_addrs = Vec::new();
    for node_id in 1..=args.storage_nodes {
        let port = u16::try_from(u32::from(args.storage_base_port) + node_id - 1)
            .map_err(|_| anyhow::anyhow!("INVALID_ARGUMENT: --storage-base-port too high"))?;
        let addr = SocketAddr::new(args.meta_addr.ip(), port);
        let listener = bind(addr, "storage").await?;
        let mut config =
            pairdb_storage::Config::for_node(node_id, args.data_dir.join(format!("storage-{node_id}")));
        config.listen_addr = addr.into();
        config.meta_addr = Some(args.meta_addr.to_string());
        config.cluster_auth = credential(signer, Principal::Node(NodeId(node_id)), args.insecure_cluster);
        config.anti_entropy_period_secs = args.anti_entropy_period_secs;
        config.sync = match args.sync {
            SyncArg::Always => pairdb_storage::config::SyncSetting::Always,
            SyncArg::Periodic => pairdb_storage::config::SyncSetting::Periodic,
        };
        let stop = stopped(stop_rx.clone());
        // Each node records into a registry of its own, so its port reports it alone (not the sum
        // of every node in this process); meta and the router share the process-wide one.
        let registry = pairdb_service::metrics::Registry::new();
        services.spawn(registry.scope(async move {
            ("storage", pairdb_storage::run(config, listener, stop).await.map_err(anyhow::Error::from))
        }));
        storage_addrs.push((node_id, addr));
    }
    Ok(storage_addrs)
}

fn router_config(args: &DevArgs, signer: &Signer) -> pairdb_router::Config {
    let mut config = pairdb_router::Config::with_meta(args.meta_addr.to_string());
    config.listen_addr = args.router_addr.into();
    // Dev mode: no API keys; requests name their tenant (the CLI sends `demo`).
    config.no_auth = true;
    config.cluster_auth = credential(signer, Principal::Router, args.insecure_cluster);
    config
}

/// The dev cluster's secret file, created (owner-only) on the first run.
fn cluster_secret(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("cluster-secret");
    if !path.exists() {
        crate::cluster::write_secret(&path, &Signer::generate_secret())?;
    }
    Ok(path)
}

/// Cluster-auth flags presenting `principal`'s credential (or none, with `--insecure-cluster`).
fn credential(signer: &Signer, principal: Principal, insecure: bool) -> ClusterAuthArgs {
    ClusterAuthArgs {
        cluster_credential: (!insecure).then(|| signer.issue(principal).as_str().to_owned()),
        cluster_credential_file: None,
        insecure_cluster: insecure,
    }
}

async fn bind(addr: SocketAddr, service: &str) -> anyhow::Result<tokio::net::TcpListener> {
    pairdb_service::bind(addr).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot listen on {addr} for {service}: {error} (another `pairdb dev` running? pick other ports with \
             --router-addr, --meta-addr and --storage-base-port)"
        )
    })
}

type Services = JoinSet<(&'static str, anyhow::Result<()>)>;

/// Runs a start-up step until it finishes, a service stops, or the start-up deadline passes.
async fn while_running<T>(
    services: &mut Services,
    deadline: tokio::time::Instant,
    step: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        outcome = tokio::time::timeout_at(deadline, step) => match outcome {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!("the cluster did not become ready within {START_TIMEOUT:?}")),
        },
        Some(Ok((name, result))) = services.join_next() => Err(match result {
            Err(error) => error.context(format!("{name} failed to start")),
            Ok(()) => anyhow::anyhow!("{name} stopped during start-up"),
        }),
    }
}

/// A future that resolves when the stop flag is raised.
async fn stopped(mut stop: Shutdown) {
    stop.wait().await;
}

/// Raises the stop flag for every service and waits (bounded) for them to finish.
async fn stop_all(stop_tx: ShutdownTrigger, services: &mut Services) {
    stop_tx.trigger();
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, services.join_next()).await {
        if let Ok((name, Err(error))) = joined {
            eprintln!("pairdb dev: {name} stopped with an error: {error:#}");
        }
    }
    services.abort_all();
}

fn quick() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(2),
        retry: RetryPolicy::never(),
        ..ClientOptions::default()
    }
}

async fn wait_for_meta(address: &str) -> anyhow::Result<AdminClient> {
    loop {
        if let Ok(admin) = AdminClient::connect(address, quick()).await
            && admin.list_tenants(admin::ListTenantsRequest {}).await.is_ok()
        {
            return Ok(admin);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_ring(admin: &AdminClient, nodes: usize) -> anyhow::Result<()> {
    loop {
        if let Ok(list) = admin.list_storage_nodes(admin::ListStorageNodesRequest {}).await {
            let active = list
                .nodes
                .iter()
                .filter(|node| node.in_ring && node.status == admin::NodeStatus::Active as i32)
                .count();
            if active >= nodes {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ensure_tenant(admin: &AdminClient, replication_factor: u32) -> anyhow::Result<()> {
    let request = admin::CreateTenantRequest {
        tenant_id: DEV_TENANT.to_owned(),
        replication_factor,
        ..admin::CreateTenantRequest::default()
    };
    match admin.create_tenant(request).await {
        Ok(_) => Ok(()),
        Err(error) if error.known_reason() == Some(pairdb_client::Reason::TenantExists) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Ready = a read of the dev tenant goes through the router to the storage nodes.
async fn wait_for_router(address: &str) -> anyhow::Result<()> {
    loop {
        if let Ok(kv) = KvClient::connect(address, DEV_TENANT, quick()).await
            && kv.get("pairdb-dev-ready-probe", ReadOptions::default()).await.is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_banner(args: &DevArgs, storage: &[(u32, SocketAddr)], replication_factor: u32, elapsed: Duration) {
    let data_dir: &Path = &args.data_dir;
    println!("pairdb dev: data in {} (kept across restarts)", data_dir.display());
    if args.insecure_cluster {
        println!("  cluster  internal APIs are OPEN (--insecure-cluster): anyone on this host can call them");
    } else {
        println!(
            "  cluster  internal APIs need cluster credentials (secret in {})",
            data_dir.join("cluster-secret").display()
        );
    }
    println!("  meta     {}  (SQLite; admin auth DISABLED, dev only)", args.meta_addr);
    for (node_id, addr) in storage {
        println!("  storage  {addr}  (node {node_id})");
    }
    println!("  router   {}  (gRPC and HTTP; API-key auth DISABLED, dev only)", args.router_addr);
    println!("  tenant   {DEV_TENANT}  (replication factor {replication_factor})");
    println!(
        "pairdb dev: ready in {:.1}s; try `pairdb kv put greeting hello`; Ctrl-C stops the cluster",
        elapsed.as_secs_f64()
    );
}
