//! `pairdb-router`: the stateless tier clients talk to. Several routers run side by side behind a load
//! balancer and agree because they follow the same topology from the metadata service.
//!
//! - [`view`] (`pairdb_service::cluster_view`): the cluster picture, built only from meta's watch stream (kept while meta
//!   is unreachable).
//! - [`pool`]: one lazily connected channel per storage node, in-flight bounds, the local failure view.
//! - [`execute`]: drives `pairdb-core`'s write/read state machines over storage RPCs.
//! - [`kv`]: put/get/delete semantics (validation, consistency, placement, read-before-write).
//! - [`admission`]: API key → tenant, per-tenant rate limits; [`idempotency`]: keyed-write records
//!   (Redis or in-process); [`kv_api`]: the KV API with those policies, shared by both edges, on the
//!   router's own request and reply types ([`request`]).
//! - [`grpc`] and [`http`]: the `pairdb.kv.v1` gRPC edge and the HTTP/JSON edge, each converting its
//!   wire format to [`request`] once; [`error`]: reasons.
//! - [`probe`]: probing suspect storage nodes until they answer again.

pub mod admission;
pub mod batch;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod execute;
pub mod grpc;
pub mod http;
pub mod idempotency;
pub mod kv;
pub mod kv_api;
pub mod listing;
pub mod metric_catalogue;
pub mod pool;
pub mod presence;
pub mod probe;
pub mod rate_shares;
pub mod request;
pub mod storage;
/// The cluster view and its watch follower live in `pairdb-service` (storage nodes follow it too).
pub use pairdb_service::cluster_view as view;

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
    #[error("redis_url: {0}")]
    Redis(String),
}

/// Runs the router on `listener` until `shutdown` resolves. It reports not ready until the watch stream
/// delivered a topology, then serves from the last known view even while meta is unreachable.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    pairdb_service::metrics::register("router", metric_catalogue::FAMILIES);
    let tls = config.service.tls.load().map_err(ConfigError::from)?;
    let cluster_auth = config.cluster_auth()?;
    cluster_auth.log_mode("router");
    let clients = pairdb_service::clients::InternalClients::new(
        tls.clone(),
        &cluster_auth,
        pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES,
    );
    let (readiness, health_service) = pairdb_service::health("no topology yet").await;
    let view = view::SharedView::default();
    let pool = Arc::new(
        pool::StoragePool::new(
            config.max_inflight_per_node,
            Duration::from_millis(config.storage_timeout_ms),
        )
        .with_clients(clients.clone())
        .with_coalescing(config.coalesce_after_in_flight),
    );
    let router = kv::KvRouter::new(
        view.clone(),
        pool.clone(),
        kv::Timing {
            request_timeout_ms: config.request_timeout_ms,
            max_request_timeout_ms: config.max_request_timeout_ms,
            read_speculative_after_ms: config.read_speculative_after_ms,
        },
    );
    let auth = if config.no_auth {
        tracing::warn!(
            "API-key authentication is DISABLED (--no-auth): requests choose their tenant with tenant_id"
        );
        admission::AuthMode::Disabled
    } else {
        admission::AuthMode::Required
    };
    let idempotency_settings = idempotency::IdempotencySettings {
        retention: Duration::from_secs(config.idempotency_retention_secs),
        // A reservation must outlive the longest request it guards.
        lease: Duration::from_millis(config.max_request_timeout_ms.saturating_mul(2).max(10_000)),
        operation_timeout: Duration::from_millis(config.idempotency_timeout_ms),
        ..idempotency::IdempotencySettings::default()
    };
    let idempotency = match &config.redis_url {
        Some(url) => idempotency::IdempotencyStore::redis(url, idempotency_settings)
            .map_err(|error| Error::Redis(error.to_string()))?,
        None => idempotency::IdempotencyStore::memory(idempotency_settings),
    };
    if let idempotency::IdempotencyStore::Redis(store) = &idempotency {
        tokio::spawn(warn_if_redis_evicts(store.clone()));
    }
    let admission = Arc::new(admission::Admission::new(view.clone(), auth));
    let share_source = match &config.redis_url {
        Some(url) => rate_shares::ShareSource::redis(url).map_err(Error::Redis)?,
        None => rate_shares::ShareSource::Even,
    };
    let api = kv_api::KvApi::new(router, admission.clone(), idempotency, config.get_many_concurrency);
    let grpc_api = grpc::GrpcKvApi::new(api.clone());
    // The admission middleware caps each request at its tenant's needs; this is the ceiling.
    let max_request_bytes = (pairdb_core::validation::ABSOLUTE_MAX_VALUE_BYTES
        + admission::MESSAGE_OVERHEAD_BYTES)
        .max(admission::MAX_BATCH_MESSAGE_BYTES) as usize;
    let grpc_service = KvServiceServer::new(grpc_api)
        .max_decoding_message_size(max_request_bytes)
        .max_encoding_message_size(pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(health_service).add_service(grpc_service);
    let admit = axum::middleware::from_fn_with_state(admission.clone(), admission::admit_client);
    let http = pairdb_service::health_routes(readiness.clone())
        .merge(pairdb_service::metrics::routes())
        .merge(http::routes(api).layer(admit.clone()));

    let (stop_sender, stop_receiver) = pairdb_service::shutdown::channel();
    let subscriber_id = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let present = tokio::spawn(presence::run(
        config.meta_addr.clone(),
        clients.clone(),
        presence::new_router_id(),
        subscriber_id.clone(),
        stop_receiver.clone(),
    ));
    let watcher = tokio::spawn(view::follow(
        config.meta_addr.clone(),
        view::Subscriber { kind: "router", id: subscriber_id, include_api_keys: true },
        view.clone(),
        Some(readiness.clone()),
        clients,
        stop_receiver.clone(),
    ));
    let sharer =
        tokio::spawn(rate_shares::run(admission.clone(), share_source, view.clone(), stop_receiver.clone()));
    let prober =
        tokio::spawn(probe::run(pool, Duration::from_millis(config.probe_interval_ms), stop_receiver));
    tracing::info!(meta_addr = %config.meta_addr, "router serving (ready once it has a topology)");
    let served = pairdb_service::serve(
        listener,
        pairdb_service::Served {
            service: "router",
            grpc: routes.into_axum_router().layer(admit),
            http,
            http_routes: http::ROUTES,
            guard: None,
            tls: tls.map(|tls| tls.server_config(pairdb_service::tls::ClientCerts::Optional)),
            limits: config.service.listener.clone(),
        },
        shutdown,
    )
    .await;
    stop_sender.trigger();
    let _ = watcher.await;
    let _ = prober.await;
    let _ = sharer.await;
    let _ = present.await;
    served?;
    Ok(())
}

/// Reads Redis's memory settings once and warns if Redis may evict idempotency records
/// ([`idempotency::eviction_warning`]); silent when they cannot be read.
async fn warn_if_redis_evicts(store: idempotency::RedisStore) {
    match store.memory_policy().await {
        Some((maxmemory_bytes, policy)) => {
            if let Some(warning) = idempotency::eviction_warning(maxmemory_bytes, &policy) {
                tracing::warn!("{warning}");
            }
        }
        None => tracing::debug!("could not read redis's maxmemory settings (CONFIG GET)"),
    }
}
