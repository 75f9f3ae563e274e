//! `pairdb-meta`: cluster membership and metadata, the only process that touches the metadata
//! database (PostgreSQL in production, SQLite embedded).
//!
//! # Map
//!
//! - [`persistence`]: every SQL statement; what is stored and why; the two backends behind one
//!   [`persistence::Store`].
//! - [`model`]: domain types (tenants, keys, nodes, topology versions, migrations).
//! - [`admin`]: the operations behind the admin and cluster APIs (one write transaction each, under
//!   the cluster-wide metadata lock), and how storage nodes join.
//! - [`grpc`] (admin service in `mod.rs`, cluster service in `cluster`, message conversions in
//!   `messages`), [`http`]: the two edges (`AdminService` + `ClusterService` over gRPC; the admin API as
//!   HTTP/JSON with the seed's REST paths), on one port.
//! - [`view`], [`follower`]: the replica's in-memory view, kept in step with the change log (local
//!   notification, PostgreSQL LISTEN/NOTIFY, a 1 s safety poll), and the fan-out to watch streams.
//! - [`leader`]: leader election (a PostgreSQL session advisory lock on a dedicated connection) and
//!   the leader-only work: the failure detector, the [`orchestrator`] of migrations, completing
//!   tenant deletions, evaluating quotas and counting the live routers.
//! - [`lifecycle`]: what completing and what abandoning each kind of migration does (one table).
//! - [`deletion`]: deleting a tenant so that every storage node purged it before its id is reused.
//! - [`usage`]: tenants' usage summed from the storage nodes' reports, and the leader's evaluation of
//!   quotas into the over-quota flags the watch stream pushes to write coordinators.
//! - [`routers`]: routers' heartbeats, and the leader's count of the live routers, which the watch
//!   stream pushes so routers without a shared rate-limit store split tenants' limits evenly.
//! - [`credentials`]: cluster credentials and the context keys routers seal client contexts with.
//! - [`config`]: flags, environment fallbacks, validation.
//!
//! # Invariants
//!
//! - Every change that a watch subscriber must see is committed together with a change-log row whose
//!   revision is assigned under the metadata lock, so revisions are contiguous and in commit order, and
//!   every replica publishes the same events in the same order.
//! - Node status changes (failure detector) bump no topology epoch; assignment changes always do, and
//!   an epoch is never reused.
//! - Only the leader starts, advances and completes migrations and marks nodes down, and its writes
//!   are fenced by the leader lock's session.
//! - The database being unreachable makes the replica not ready and admin calls fail UNAVAILABLE
//!   (DATABASE_UNAVAILABLE); watch streams stay open with their last state, and everything resumes
//!   when the database answers again, without a restart.
//! - The cluster API (registration, heartbeats, the watch stream) needs a cluster credential,
//!   checked before a request body is read: a storage node registers and heartbeats only as the
//!   node its credential names, only routers get API-key hashes and context keys, and only routers
//!   send router heartbeats.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod config;
pub mod credentials;
pub mod deletion;
pub mod error;
pub mod follower;
pub mod grpc;
pub mod http;
pub mod leader;
pub mod leftovers;
pub mod lifecycle;
pub mod metric_catalogue;
pub mod model;
pub mod mover;
pub mod orchestrator;
pub mod persistence;
pub mod routers;
pub mod usage;
pub mod view;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pairdb_proto::admin::v1::admin_service_server::AdminServiceServer;
use pairdb_proto::cluster::v1::cluster_service_server::ClusterServiceServer;
use pairdb_service::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

pub use config::{AdminAuth, Config, ConfigError};
pub use error::MetaError;
pub use mover::StreamingDataMover;
pub use orchestrator::{DataMover, NoDataMovement};

use crate::admin::{Meta, Settings, now_ms};
use crate::persistence::{PersistenceError, Store, StoreOptions};
use crate::view::WatchSource;

/// Errors that stop the metadata service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Persistence(#[from] PersistenceError),
    #[error("data_dir: cannot create {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Serve(#[from] pairdb_service::ServeError),
    #[error(transparent)]
    Tls(#[from] pairdb_service::tls::TlsError),
}

/// How this replica authenticates callers, signs credentials and reaches storage nodes.
struct ClusterSecurity {
    auth: Arc<pairdb_service::cluster_auth::ClusterAuth>,
    /// `None` with `--insecure-cluster`.
    signer: Option<Arc<pairdb_service::cluster_auth::Signer>>,
    storage_clients: pairdb_service::clients::InternalClients,
}

impl ClusterSecurity {
    fn from_config(config: &Config) -> Result<Self, Error> {
        let tls = config.service.tls.load()?;
        let signer = config.signer()?.map(Arc::new);
        let auth = Arc::new(match &signer {
            Some(signer) => pairdb_service::cluster_auth::ClusterAuth::for_meta(signer, tls.is_some()),
            None if config.insecure_cluster => pairdb_service::cluster_auth::ClusterAuth::insecure(),
            // Mutual TLS without a secret: certificates name every member.
            None => pairdb_service::cluster_auth::ClusterAuth::certificates_only(),
        });
        let storage_clients =
            pairdb_service::clients::InternalClients::new(tls, &auth, config.max_message_bytes());
        Ok(Self { auth, signer, storage_clients })
    }
}

/// How often readiness re-checks the database.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Runs one meta replica on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    let mover = Arc::new(StreamingDataMover::new(ClusterSecurity::from_config(&config)?.storage_clients));
    run_with_mover(config, listener, shutdown, mover).await
}

/// [`run`] with a chosen [`DataMover`]: [`StreamingDataMover`] in production; tests of the
/// orchestrator alone (no storage nodes) use [`NoDataMovement`] or a gated mover.
pub async fn run_with_mover(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    mover: Arc<dyn DataMover>,
) -> Result<(), Error> {
    config.validate()?;
    pairdb_service::metrics::register("meta", metric_catalogue::FAMILIES);
    let ClusterSecurity { auth: cluster_auth, signer, storage_clients } =
        ClusterSecurity::from_config(&config)?;
    cluster_auth.log_mode("meta");
    let auth = Arc::new(config.admin_auth()?);
    if auth.as_ref() == &AdminAuth::Disabled {
        tracing::warn!(
            "admin API authentication is DISABLED (--no-auth): anyone who can reach this port can administer the cluster"
        );
    }
    pairdb_service::metrics::install();
    let (readiness, health_service) = pairdb_service::health("connecting to the metadata database").await;

    let (store, view, meta) = open_meta(&config, storage_clients, signer).await?;
    metrics::gauge!("pairdb_meta_watch_subscribers").increment(0.0);

    let (stop_sender, stop) = pairdb_service::shutdown::channel();
    let stop_sender = Arc::new(stop_sender);
    let (initialized_sender, initialized) = watch::channel(false);
    let partitions = config.partitions()?;
    // Initialize before serving when the database answers (always, for SQLite: a local file that
    // cannot be initialized is a fatal error), so the replica is ready as soon as it is live. A
    // PostgreSQL that is down is retried in the background while health reports not ready.
    let initialize_task = match try_initialize(&meta, partitions).await {
        Ok(_) => {
            let _ = initialized_sender.send(true);
            readiness.set_ready().await;
            None
        }
        Err(error) if store.backend() == persistence::Backend::Sqlite => return Err(error.into()),
        Err(error) => {
            tracing::warn!(%error, "cannot initialize the metadata database yet; retrying in the background");
            Some(tokio::spawn(initialize(meta.clone(), partitions, initialized_sender, stop.clone())))
        }
    };
    let mut tasks = spawn_background(&meta, &store, &view, mover, &readiness, &initialized, &stop);
    tasks.extend(initialize_task);

    let admin = AdminServiceServer::new(grpc::AdminGrpc::new(meta.clone()));
    let admin =
        tonic::service::interceptor::InterceptedService::new(admin, grpc::admin_interceptor(auth.clone()));
    let cluster = ClusterServiceServer::new(grpc::ClusterGrpc::new(meta.clone(), stop.clone()))
        .max_decoding_message_size(config.max_message_bytes())
        .max_encoding_message_size(config.max_message_bytes());
    let routes = tonic::service::Routes::new(health_service).add_service(admin).add_service(cluster);
    let http = pairdb_service::health_routes(readiness.clone())
        .merge(pairdb_service::metrics::routes())
        .merge(http::routes(meta.clone(), auth));

    tracing::info!(
        backend = ?store.backend(),
        auto_add_nodes = config.auto_add_nodes,
        "metadata service serving"
    );
    let stop_on_shutdown = stop_sender.clone();
    let tls =
        config.service.tls.load()?.map(|tls| tls.server_config(pairdb_service::tls::ClientCerts::Required));
    let served = pairdb_service::serve(
        listener,
        pairdb_service::Served {
            service: "meta",
            grpc: routes.into_axum_router(),
            http,
            http_routes: http::ROUTES,
            guard: Some(pairdb_service::cluster_auth::Guarded {
                auth: cluster_auth,
                services: &["/pairdb.cluster.v1.ClusterService/"],
                label: "cluster",
            }),
            tls,
            limits: config.service.listener.clone(),
        },
        async move {
            shutdown.await;
            // End watch streams and background work so the server can drain.
            stop_on_shutdown.trigger();
        },
    )
    .await;

    stop_sender.trigger();
    join_within(tasks, Duration::from_secs(5)).await;
    store.close().await;
    tracing::info!("metadata service stopped");
    served?;
    Ok(())
}

/// Opens the metadata database (creating the SQLite directory when embedded) and the replica's state.
async fn open_meta(
    config: &Config,
    storage_clients: pairdb_service::clients::InternalClients,
    signer: Option<Arc<pairdb_service::cluster_auth::Signer>>,
) -> Result<(Store, Arc<WatchSource>, Meta), Error> {
    if config.database_url.is_none() {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| Error::DataDir { path: config.data_dir.clone(), source })?;
    }
    let store = Store::open(&StoreOptions {
        url: config.effective_database_url(),
        timeout: config.database_timeout(),
        max_connections: config.database_max_connections,
    })
    .await?;
    let view = Arc::new(WatchSource::new(config.watch_buffer));
    let settings = Settings {
        auto_add_nodes: config.auto_add_nodes,
        heartbeat_interval_ms: config.heartbeat_interval_ms,
        node_down_after_ms: config.node_down_after_ms,
        max_clock_offset_ms: config.max_clock_offset_ms,
        migration_parallelism: config.migration_parallelism.max(1),
        storage_clients,
        signer,
    };
    let meta = Meta::new(store.clone(), view.clone(), settings);
    Ok((store, view, meta))
}

/// The replica's background work: following the change log (once initialized), leader election
/// and the leader's work, and readiness.
fn spawn_background(
    meta: &Meta,
    store: &Store,
    view: &Arc<WatchSource>,
    mover: Arc<dyn DataMover>,
    readiness: &pairdb_service::Readiness,
    initialized: &watch::Receiver<bool>,
    stop: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let wake = Arc::new(Notify::new());
    vec![
        tokio::spawn(after_initialization(
            initialized.clone(),
            stop.clone(),
            follower::run(store.clone(), view.clone(), wake.clone(), stop.clone()),
        )),
        tokio::spawn(after_initialization(
            initialized.clone(),
            stop.clone(),
            follower::listen(store.clone(), wake, stop.clone()),
        )),
        tokio::spawn(leader::run(meta.clone(), mover, stop.clone())),
        tokio::spawn(watch_readiness(meta.clone(), readiness.clone(), initialized.clone(), stop.clone())),
    ]
}

/// Waits for each task up to `limit`, then aborts it.
async fn join_within(tasks: Vec<tokio::task::JoinHandle<()>>, limit: Duration) {
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(limit, task).await.is_err() {
            abort.abort();
        }
    }
}

/// Migrates the schema and creates the cluster, retrying until the database answers.
async fn initialize(
    meta: Meta,
    partitions: pairdb_core::token::PartitionCount,
    initialized: watch::Sender<bool>,
    mut stop: Shutdown,
) {
    let mut reported = false;
    loop {
        match try_initialize(&meta, partitions).await {
            Ok(_) => {
                let _ = initialized.send(true);
                return;
            }
            Err(error) => {
                if !reported || !error.is_unavailable() {
                    tracing::warn!(%error, "cannot initialize the metadata database; retrying");
                    reported = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait() => return,
        }
    }
}

/// One attempt at [`initialize`]'s work: schema, cluster, first view.
async fn try_initialize(
    meta: &Meta,
    partitions: pairdb_core::token::PartitionCount,
) -> Result<persistence::MetaState, PersistenceError> {
    let state = meta.store().initialize(partitions, now_ms()).await?;
    let secret = rand::random::<[u8; pairdb_core::context::CONTEXT_SECRET_LEN]>();
    if meta.store().ensure_context_key(&secret, now_ms()).await? {
        tracing::info!("first context key created");
    }
    meta.view().replace(meta.store().load_snapshot().await?);
    if state.partition_count != partitions {
        tracing::warn!(
            configured = partitions.get(),
            cluster = state.partition_count.get(),
            "partition_count is fixed when the cluster is created; using the cluster's"
        );
    }
    meta.mark_initialized(&state);
    tracing::info!(
        partitions = state.partition_count.get(),
        revision = state.revision,
        epoch = state.current_epoch,
        "metadata database ready"
    );
    Ok(state)
}

/// Runs `task` once the database is initialized (or never, if `stop` comes first).
async fn after_initialization(
    mut initialized: watch::Receiver<bool>,
    mut stop: Shutdown,
    task: impl Future<Output = ()>,
) {
    tokio::select! {
        waited = initialized.wait_for(|done| *done) => if waited.is_err() { return },
        _ = stop.wait() => return,
    }
    task.await;
}

/// Ready iff the database is initialized and answers; re-checked every [`HEALTH_INTERVAL`].
async fn watch_readiness(
    meta: Meta,
    readiness: pairdb_service::Readiness,
    mut initialized: watch::Receiver<bool>,
    mut stop: Shutdown,
) {
    let mut ready = readiness.check().is_ok();
    loop {
        let verdict = if !meta.is_initialized() {
            Err("connecting to the metadata database".to_owned())
        } else {
            meta.store().ping().await.map_err(|error| format!("{error}"))
        };
        match (verdict, ready) {
            (Ok(()), false) => {
                readiness.set_ready().await;
                tracing::info!("ready");
                ready = true;
            }
            (Err(reason), true) => {
                readiness.set_not_ready(reason.clone()).await;
                tracing::warn!(%reason, "not ready");
                ready = false;
            }
            (Err(reason), false) => readiness.set_not_ready(reason).await,
            (Ok(()), true) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            // Re-check at once when background initialization completes.
            Ok(()) = initialized.changed() => {}
            _ = stop.wait() => return,
        }
    }
}
