//! `pairdb-router`: the stateless tier clients talk to. Several routers run side by side behind a load
//! balancer and agree because they follow the same topology from the metadata service.
//!
//! - [`view`] + [`watch`]: the cluster picture, built only from meta's watch stream (kept while meta
//!   is unreachable).
//! - [`pool`]: one lazily connected channel per storage node, in-flight bounds, the local failure view.
//! - [`execute`]: drives `pairdb-core`'s write/read state machines over storage RPCs.
//! - [`kv`]: put/get/delete semantics (validation, consistency, placement, read-before-write).
//! - [`grpc`]: the `pairdb.kv.v1` edge; [`error`]: reasons → statuses.
//! - [`hints`]: probing suspects and driving hint delivery.

pub mod config;
pub mod error;
pub mod execute;
pub mod grpc;
pub mod hints;
pub mod kv;
pub mod pool;
pub mod view;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pairdb_proto::kv::v1::kv_service_server::KvServiceServer;
use tokio::net::TcpListener;

pub use config::{Config, ConfigError};

/// Errors that stop the router.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Serve(#[from] pairdb_service::ServeError),
}

/// Runs the router on `listener` until `shutdown` resolves. It reports not ready until the watch stream
/// delivered a topology, then serves from the last known view even while meta is unreachable.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    let (readiness, health_service) = pairdb_service::health("no topology yet").await;
    let view = view::SharedView::default();
    let pool = Arc::new(pool::StoragePool::new(
        config.max_inflight_per_node,
        Duration::from_millis(config.storage_timeout_ms),
    ));
    let router = kv::KvRouter::new(
        view.clone(),
        pool.clone(),
        kv::Timing {
            request_timeout_ms: config.request_timeout_ms,
            max_request_timeout_ms: config.max_request_timeout_ms,
            read_speculative_after_ms: config.read_speculative_after_ms,
        },
    );
    let api = grpc::KvApi::new(router, config.get_many_concurrency);
    let grpc_service = KvServiceServer::new(api)
        .max_decoding_message_size(pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(health_service).add_service(grpc_service);
    let http = pairdb_service::health_routes(readiness.clone()).merge(pairdb_service::metrics::routes());

    let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
    let subscriber_id = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let watcher = tokio::spawn(watch::follow(
        config.meta_addr.clone(),
        subscriber_id,
        view.clone(),
        readiness.clone(),
        stop_receiver.clone(),
    ));
    let hint_driver = tokio::spawn(hints::run(
        pool,
        view,
        Duration::from_millis(config.probe_interval_ms),
        Duration::from_millis(config.hint_sweep_interval_ms),
        stop_receiver,
    ));
    tracing::info!(meta_addr = %config.meta_addr, "router serving (ready once it has a topology)");
    let served = pairdb_service::serve(listener, routes, http, shutdown).await;
    let _ = stop_sender.send(true);
    let _ = watcher.await;
    let _ = hint_driver.await;
    served?;
    Ok(())
}
