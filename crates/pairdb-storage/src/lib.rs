//! `pairdb-storage`: the process that owns replicas on local disk.
//!
//! - [`engine`]: fjall behind one small module; atomic per-key read-merge-write, group commit,
//!   poisoning, hints, partition scans, Merkle summaries.
//! - [`service`]: the internal gRPC API; engine calls run on the blocking pool.
//! - [`workers`]: the background jobs (anti-entropy, rebuild, tombstone GC, unowned-data cleanup,
//!   hint delivery and expiry, tenant purges, migration transfers), one worker each under one runner.
//! - [`transfer`]: pulling a partition from its sources during a migration (run by the transfer workers).
//! - [`membership`]: standalone, or register and heartbeat with the metadata service.
//! - [`identity`], [`keys`]: the data directory's identity and on-disk key layouts.
//!
//! [`run`] serves the API on an injected listener until the shutdown future resolves, then finishes
//! in-flight requests and fsyncs; [`run_with_engine`] does the same over an engine the caller opened.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod config;
pub mod engine;
pub mod identity;
pub mod keys;
pub mod listing;
pub mod membership;
pub mod merkle;
pub mod metric_catalogue;
pub mod service;
pub mod transfer;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_proto::storage::v1::storage_service_server::StorageServiceServer;
use pairdb_service::shutdown::Shutdown;
use tokio::net::TcpListener;

pub use config::{Config, ConfigError};
use engine::{Engine, EngineConfig, EngineError};

/// Errors that stop the storage node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Serve(#[from] pairdb_service::ServeError),
    #[error("invalid meta address: {0}")]
    MetaAddress(#[from] tonic::transport::Error),
    #[error("engine task failed: {0}")]
    Task(String),
}

/// Opens the engine described by `config` (blocking; call from a blocking context or at start).
pub fn open_engine(config: &Config) -> Result<Arc<Engine>, Error> {
    let engine_config = EngineConfig {
        data_dir: config.data_dir.clone(),
        node_id: NodeId(config.node_id),
        partitions: config.partitions()?,
        sync: config.sync_mode(),
        cache_bytes: config.cache_mb * 1024 * 1024,
        record_cache_bytes: config.record_cache_mb * 1024 * 1024,
        disk_reserve_bytes: config.disk_reserve_mb * 1024 * 1024,
    };
    Ok(Engine::open(&engine_config)?)
}

/// Runs the storage node on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    let open_config = config.clone();
    let engine = pairdb_service::task::spawn_blocking(move || open_engine(&open_config))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    run_with_engine(config, engine, listener, shutdown).await
}

/// [`run`] over an engine opened by the caller with [`open_engine`] from the same `config`; the
/// caller keeps a handle to the engine of the running node (tests inject faults through it).
pub async fn run_with_engine(
    config: Config,
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    pairdb_service::metrics::register("storage", metric_catalogue::FAMILIES);
    let (readiness, health_service) = pairdb_service::health("starting").await;
    let identity = engine.identity();
    let address = config.advertise_addr.clone().unwrap_or_else(|| {
        listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| config.listen_addr.to_string())
    });

    let tls = config.service.tls.load().map_err(ConfigError::from)?;
    let auth = Arc::new(config.cluster_auth()?);
    auth.log_mode("storage");
    let clients =
        pairdb_service::clients::InternalClients::new(tls.clone(), &auth, config.max_message_bytes());
    let rebuild = Arc::new(workers::Rebuild::default());
    let transfers = Arc::new(workers::Transfers::default());
    let mut api =
        service::StorageApi::new(engine.clone(), config.max_inflight_requests, config.stream_batch_max)
            .with_clients(clients.clone())
            .with_tombstone_grace(Duration::from_secs(config.tombstone_grace_secs))
            .with_listing_share(config.listing_share_percent);
    // The topology drives anti-entropy, tombstone GC, hint delivery, tenant purges and dropping
    // unowned data.
    let view = config.meta_addr.as_ref().map(|_| pairdb_service::cluster_view::SharedView::default());
    if let Some(view) = &view {
        api = api.with_rebuild(rebuild.clone()).with_transfers(transfers.clone()).with_view(view.clone());
    }
    let grpc = StorageServiceServer::new(api)
        .max_decoding_message_size(config.max_message_bytes())
        .max_encoding_message_size(config.max_message_bytes());
    let routes = tonic::service::Routes::new(health_service).add_service(grpc);
    let http = pairdb_service::health_routes(readiness.clone()).merge(pairdb_service::metrics::routes());

    let (stop_sender, stop_receiver) = pairdb_service::shutdown::channel();
    let clock = Arc::new(membership::ClockOffset::new());
    let health = Health {
        node_label: identity.node_id.0.to_string(),
        readiness: readiness.clone(),
        clock: clock.clone(),
        max_clock_offset_ms: config.max_clock_offset_ms,
    };
    let mut background =
        vec![pairdb_service::task::spawn(watch_health(engine.clone(), health, stop_receiver.clone()))];
    if let Some(meta_addr) = &config.meta_addr {
        let cluster = ClusterMember {
            meta_addr,
            view: view.unwrap_or_default(),
            address: address.clone(),
            clients: clients.clone(),
            rebuild,
            transfers,
            clock,
        };
        background.extend(cluster.spawn_tasks(&config, &engine, stop_receiver)?);
    }

    readiness.set_ready().await;
    tracing::info!(
        node_id = %identity.node_id,
        actor = %identity.actor,
        %address,
        sync = ?config.sync,
        "storage node ready"
    );
    let served = pairdb_service::serve(
        listener,
        pairdb_service::Served {
            service: "storage",
            grpc: routes.into_axum_router(),
            http,
            http_routes: &[],
            guard: Some(pairdb_service::cluster_auth::Guarded {
                auth,
                services: &["/pairdb.storage.v1.StorageService/"],
                label: "storage",
            }),
            tls: tls.map(|tls| tls.server_config(pairdb_service::tls::ClientCerts::Required)),
            limits: config.service.listener.clone(),
        },
        shutdown,
    )
    .await;

    // In-flight requests have finished; stop background work and make everything durable.
    stop_sender.trigger();
    for task in background {
        let _ = task.await;
    }
    sync_before_exit(engine).await;
    served?;
    Ok(())
}

/// What a node that follows a meta service runs beside its API.
struct ClusterMember<'a> {
    meta_addr: &'a str,
    view: pairdb_service::cluster_view::SharedView,
    address: String,
    clients: pairdb_service::clients::InternalClients,
    rebuild: Arc<workers::Rebuild>,
    transfers: Arc<workers::Transfers>,
    clock: Arc<membership::ClockOffset>,
}

impl ClusterMember<'_> {
    /// Follows the topology and runs what it drives (the [`workers`]), and registration with
    /// heartbeats.
    fn spawn_tasks(
        self,
        config: &Config,
        engine: &Arc<Engine>,
        stop: Shutdown,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, Error> {
        let identity = engine.identity();
        let subscriber = pairdb_service::cluster_view::Subscriber {
            kind: "storage",
            id: format!("node-{}", identity.node_id),
            include_api_keys: false,
        };
        let membership: Arc<dyn membership::NodeRegistry> =
            Arc::new(membership::MetaRegistry::new(self.meta_addr, &self.clients)?);
        let node = membership::NodeAnnouncement {
            node_id: identity.node_id,
            address: self.address,
            zone: config.zone.clone(),
            weight: config.weight,
            actor: identity.actor.0,
        };
        let cleanup = Arc::new(membership::UnownedCleanupRevision::default());
        let context = workers::Context {
            engine: engine.clone(),
            view: self.view.clone(),
            clients: self.clients.clone(),
            settings: Arc::new(config.worker_settings()),
            cleanup: cleanup.clone(),
        };
        let mut tasks = vec![
            pairdb_service::task::spawn(pairdb_service::cluster_view::follow(
                self.meta_addr.to_owned(),
                subscriber,
                self.view.clone(),
                None,
                self.clients,
                stop.clone(),
            )),
            pairdb_service::task::spawn(membership::run(
                membership,
                node,
                engine.clone(),
                self.view.clone(),
                self.clock,
                cleanup,
                stop.clone(),
            )),
        ];
        tasks.extend(workers::spawn_all(&context, self.rebuild, &self.transfers, &stop));
        Ok(tasks)
    }
}

/// The last fsync after everything else stopped.
async fn sync_before_exit(engine: Arc<Engine>) {
    match pairdb_service::task::spawn_blocking(move || engine.sync_now()).await {
        Ok(Ok(())) => tracing::info!("storage node stopped cleanly"),
        // Already logged when it happened; a poisoned write path is not fsynced again.
        Ok(Err(EngineError::Poisoned(reason))) => {
            tracing::warn!(%reason, "stopped with a poisoned write path")
        }
        Ok(Err(error)) => tracing::error!(%error, "final fsync failed"),
        Err(error) => tracing::error!(%error, "final fsync task failed"),
    }
}

/// What the health watch reports to.
struct Health {
    /// This node's id as the `node_id` label of its state gauges: in `pairdb dev` several nodes
    /// share one process and one registry.
    node_label: String,
    readiness: pairdb_service::Readiness,
    /// The heartbeat loop's measurement of this node's clock against meta's.
    clock: Arc<membership::ClockOffset>,
    max_clock_offset_ms: u64,
}

impl Health {
    /// The readiness detail: quarantined records and a skewed clock, when there are.
    fn detail(&self, quarantined_records: u64) -> Option<String> {
        let mut notes = Vec::new();
        if quarantined_records > 0 {
            notes.push(format!(
                "{quarantined_records} records quarantined (did not decode; anti-entropy or `pairdb node rebuild` restores them from peers)"
            ));
        }
        if let Some(offset_ms) = self.clock.get()
            && pairdb_core::clock::skewed(offset_ms, self.max_clock_offset_ms)
        {
            notes.push(format!(
                "clock is {offset_ms:+} ms off meta's (bound {} ms): expiry and LWW timestamps written here are off by that much",
                self.max_clock_offset_ms
            ));
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}

/// Keeps readiness honest (not ready once the write path is poisoned) and publishes engine gauges.
async fn watch_health(engine: Arc<Engine>, health: Health, mut stop: Shutdown) {
    let readiness = &health.readiness;
    let mut poisoned_reported = false;
    let mut skew_reported = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait() => return,
        }
        let stats_engine = engine.clone();
        let Ok(stats) = pairdb_service::task::spawn_blocking(move || stats_engine.stats()).await else {
            continue;
        };
        let node = &health.node_label;
        metrics::gauge!("pairdb_storage_keys", "node_id" => node.clone()).set(stats.keys as f64);
        metrics::gauge!("pairdb_storage_quarantined_records", "node_id" => node.clone())
            .set(stats.quarantined_records as f64);
        readiness.set_detail(health.detail(stats.quarantined_records));
        if let Some(offset_ms) = health.clock.get() {
            metrics::gauge!("pairdb_storage_clock_offset_seconds", "node_id" => node.clone())
                .set(offset_ms as f64 / 1000.0);
            let skewed = pairdb_core::clock::skewed(offset_ms, health.max_clock_offset_ms);
            if skewed && !skew_reported {
                tracing::warn!(
                    offset_ms,
                    bound_ms = health.max_clock_offset_ms,
                    "this node's clock is off meta's beyond the bound"
                );
            }
            skew_reported = skewed;
        }
        metrics::gauge!("pairdb_storage_disk_bytes", "node_id" => node.clone()).set(stats.disk_bytes as f64);
        metrics::gauge!("pairdb_storage_disk_free_bytes", "node_id" => node.clone())
            .set(stats.disk_free_bytes as f64);
        metrics::gauge!("pairdb_storage_hints_pending", "node_id" => node.clone())
            .set(stats.hints_pending as f64);
        let lsm = engine.lsm_stats();
        metrics::gauge!("pairdb_storage_lsm_outstanding_flushes", "node_id" => node.clone())
            .set(lsm.outstanding_flushes as f64);
        metrics::counter!("pairdb_storage_lsm_compactions_total", "node_id" => node.clone())
            .absolute(lsm.compactions_completed);
        metrics::gauge!("pairdb_storage_lsm_journals", "node_id" => node.clone()).set(lsm.journals as f64);
        metrics::gauge!("pairdb_storage_lsm_tables", "node_id" => node.clone()).set(lsm.tables as f64);
        metrics::gauge!("pairdb_storage_write_path_poisoned", "node_id" => node.clone())
            .set(if stats.poisoned { 1.0 } else { 0.0 });
        if let Some(reason) = engine.poisoned_reason()
            && !poisoned_reported
        {
            poisoned_reported = true;
            readiness.set_not_ready(format!("write path poisoned: {reason}")).await;
        }
    }
}
