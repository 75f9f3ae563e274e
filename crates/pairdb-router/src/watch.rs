//! Follows the metadata service's watch stream: a snapshot, then changes. On any error it keeps the
//! last view (requests go on being served from it) and reconnects with capped exponential backoff and
//! jitter; the new stream starts over from a snapshot.

use std::time::Duration;

use pairdb_proto::cluster::v1 as pb;
use pairdb_proto::cluster::v1::cluster_service_client::ClusterServiceClient;

use crate::view::SharedView;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until `shutdown` fires.
pub async fn follow(
    meta_addr: String,
    subscriber_id: String,
    view: SharedView,
    readiness: pairdb_service::Readiness,
    tls: Option<pairdb_service::tls::Tls>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let endpoint = match pairdb_service::tls::endpoint(&meta_addr, tls.as_ref()) {
        Ok(endpoint) => endpoint.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true),
        Err(error) => {
            tracing::error!(%error, %meta_addr, "invalid meta address; the router will never be ready");
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let session = async {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut client =
                ClusterServiceClient::with_interceptor(channel, pairdb_service::telemetry::TraceInterceptor)
                    .max_decoding_message_size(pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES);
            let mut stream = client
                .watch(pb::WatchRequest {
                    subscriber_kind: "router".into(),
                    subscriber_id: subscriber_id.clone(),
                    include_api_keys: true,
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            while let Some(event) = stream.message().await.map_err(|e| e.to_string())? {
                if let Err(error) = view.apply(&event) {
                    return Err(format!("bad watch event at revision {}: {error}", event.revision));
                }
                let current = view.load();
                if let Some(topology) = &current.current {
                    let _ = topology;
                    metrics::gauge!("pairdb_router_topology_epoch").set(current.epoch as f64);
                    if readiness.check().is_err() {
                        readiness.set_ready().await;
                        tracing::info!(revision = current.revision, "router has a topology and is ready");
                    }
                }
                metrics::gauge!("pairdb_router_watch_revision").set(current.revision as f64);
            }
            Err::<(), String>("watch stream ended".into())
        };
        tokio::select! {
            result = session => {
                if let Err(error) = result {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "lost the metadata watch stream; serving from the last view");
                }
            }
            _ = shutdown.changed() => return,
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
