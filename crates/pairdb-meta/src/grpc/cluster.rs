//! `ClusterService`: storage nodes' registration and heartbeats, routers' heartbeats, and the watch
//! stream routers and storage nodes follow. Every call is authenticated by the cluster guard before it
//! gets here.

use pairdb_core::ring::NodeId;
use pairdb_service::shutdown::Shutdown;

use super::*;
use crate::admin::HeartbeatReport;

/// The verified caller of a cluster-API request (the guard put it there), or UNAUTHENTICATED.
pub(super) fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    Caller::of(request).ok_or_else(|| {
        MetaError::Unauthenticated("cluster credential required".to_owned()).to_internal_status()
    })
}

/// A storage node may register and heartbeat only as the node its credential names.
pub(super) fn require_node(rpc: &'static str, caller: Caller, node_id: NodeId) -> Result<(), Status> {
    if caller.is(Principal::Node(node_id)) {
        return Ok(());
    }
    tracing::warn!(rpc, node_id = %node_id, ?caller, "a cluster member tried to act as another node");
    metrics::counter!("pairdb_cluster_auth_refused_total", "api" => "cluster_identity").increment(1);
    Err(internal_error_status(
        rpc,
        MetaError::PermissionDenied(format!("this cluster credential does not name node {node_id}")),
    ))
}

/// Only routers send router heartbeats (any caller when the cluster runs insecure): a storage node's
/// credential must not be able to inflate the live-router count, which divides tenants' limits.
pub(super) fn require_router(rpc: &'static str, caller: Caller) -> Result<(), Status> {
    if caller.is(Principal::Router) {
        return Ok(());
    }
    tracing::warn!(rpc, ?caller, "a cluster member that is not a router sent a router heartbeat");
    metrics::counter!("pairdb_cluster_auth_refused_total", "api" => "cluster_identity").increment(1);
    Err(internal_error_status(
        rpc,
        MetaError::PermissionDenied("only routers send router heartbeats".to_owned()),
    ))
}

/// `pairdb.cluster.v1.ClusterService`.
#[derive(Debug, Clone)]
pub struct ClusterGrpc {
    meta: Meta,
    /// Set at shutdown: every watch stream ends so the server can drain.
    stop: Shutdown,
}

impl ClusterGrpc {
    pub fn new(meta: Meta, stop: Shutdown) -> Self {
        Self { meta, stop }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterGrpc {
    type WatchStream = ReceiverStream<Result<cluster_pb::WatchEvent, Status>>;

    async fn router_heartbeat(
        &self,
        request: Request<cluster_pb::RouterHeartbeatRequest>,
    ) -> Result<Response<cluster_pb::RouterHeartbeatResponse>, Status> {
        let caller = caller(&request)?;
        require_router("RouterHeartbeat", caller)?;
        let r = request.into_inner();
        self.meta
            .router_heartbeat(&r.router_id, &r.address)
            .await
            .map_err(|e| internal_error_status("RouterHeartbeat", e))?;
        Ok(Response::new(cluster_pb::RouterHeartbeatResponse {}))
    }

    async fn register_node(
        &self,
        request: Request<cluster_pb::RegisterNodeRequest>,
    ) -> Result<Response<cluster_pb::RegisterNodeResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        require_node("RegisterNode", caller, NodeId(r.node_id))?;
        let registration = Registration {
            node_id: (r.node_id != 0).then_some(NodeId(r.node_id)),
            address: r.address,
            zone: r.zone,
            weight: r.weight,
            actor_id: r.actor_id,
            data_format_version: r.data_format_version,
        };
        let node_id = self
            .meta
            .register_node(registration)
            .await
            .map_err(|e| internal_error_status("RegisterNode", e))?;
        Ok(Response::new(cluster_pb::RegisterNodeResponse {
            node_id: node_id.0,
            heartbeat_interval_ms: self.meta.settings().heartbeat_interval_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<cluster_pb::HeartbeatRequest>,
    ) -> Result<Response<cluster_pb::HeartbeatResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        require_node("Heartbeat", caller, NodeId(r.node_id))?;
        let stats = r.stats.map(stats_from_pb).unwrap_or_default();
        let purged: Vec<(String, u64)> =
            r.purged_tenants.into_iter().map(|p| (p.tenant_id, p.purge_seq)).collect();
        // Only the heartbeats that carry a report touch the node's usage (an empty report says the
        // node holds nothing).
        let usage = r.usage_reported.then(|| usage_from_pb(r.tenant_usage));
        let report = HeartbeatReport {
            purged_tenants: &purged,
            usage: usage.as_deref(),
            unowned_cleanup_revision: r.unowned_cleanup_revision,
        };
        let ack = self
            .meta
            .heartbeat(NodeId(r.node_id), stats, &report)
            .await
            .map_err(|e| internal_error_status("Heartbeat", e))?;
        Ok(Response::new(cluster_pb::HeartbeatResponse {
            unknown_node: !ack.known,
            meta_unix_ms: ack.meta_unix_ms,
        }))
    }

    async fn watch(
        &self,
        request: Request<cluster_pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        // API-key hashes and context keys go to routers only (any caller when the cluster is insecure
        // and the subscriber asks for them).
        let secrets = r.include_api_keys && caller.is(Principal::Router);
        // Catch up first, so a subscriber sees at least everything committed before it subscribed
        // (read-your-writes for a client that changed something and then watches). If the database
        // is unreachable, the view is served as it is.
        if self.meta.is_initialized() {
            let catch_up = crate::follower::catch_up(self.meta.store(), self.meta.view());
            if let Ok(Err(error)) = tokio::time::timeout(self.meta.store().timeout(), catch_up).await {
                tracing::debug!(%error, "watch: serving the view without catching up");
            }
        }
        let Some((snapshot, events)) = self.meta.view().subscribe() else {
            return Err(internal_error_status(
                "Watch",
                MetaError::DatabaseUnavailable("the cluster view is not loaded yet".to_owned()),
            ));
        };
        let (sender, receiver) = mpsc::channel(WATCH_STREAM_BUFFER);
        let subscriber = Subscriber {
            kind: if r.subscriber_kind.is_empty() { "unknown".to_owned() } else { r.subscriber_kind },
            id: r.subscriber_id,
            include_api_keys: secrets,
        };
        tokio::spawn(pump(subscriber, snapshot, events, sender, self.stop.clone()));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

#[derive(Debug)]
pub(super) struct Subscriber {
    kind: String,
    id: String,
    include_api_keys: bool,
}

/// Counts live subscribers in `pairdb_meta_watch_subscribers`.
pub(super) struct SubscriberGauge;

impl SubscriberGauge {
    fn new() -> Self {
        metrics::gauge!("pairdb_meta_watch_subscribers").increment(1.0);
        SubscriberGauge
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        metrics::gauge!("pairdb_meta_watch_subscribers").decrement(1.0);
    }
}

/// Feeds one subscriber: the snapshot, then every event. Ends when the subscriber goes away, falls
/// behind (it gets an OVERLOADED status and reconnects to a fresh snapshot), the view is reloaded, or
/// the server shuts down.
async fn pump(
    subscriber: Subscriber,
    snapshot: ViewSnapshot,
    mut events: broadcast::Receiver<Arc<RevisionedEvent>>,
    sender: mpsc::Sender<Result<cluster_pb::WatchEvent, Status>>,
    mut stop: Shutdown,
) {
    let _gauge = SubscriberGauge::new();
    tracing::debug!(kind = %subscriber.kind, id = %subscriber.id, revision = snapshot.revision, "watch subscriber connected");
    let first = snapshot_to_pb(&snapshot, subscriber.include_api_keys);
    if sender.send(Ok(first)).await.is_err() {
        return;
    }
    loop {
        let received = tokio::select! {
            received = events.recv() => received,
            _ = stop.wait() => return,
            () = sender.closed() => return,
        };
        let event = match received {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(kind = %subscriber.kind, id = %subscriber.id, missed, "watch subscriber fell behind; disconnecting it");
                metrics::counter!("pairdb_meta_watch_lagged_total").increment(1);
                let status = pairdb_service::errors::internal_status(
                    pairdb_core::reason::Reason::Overloaded,
                    "watch subscriber fell behind; reconnect for a fresh snapshot",
                    &[("missed_events", missed.to_string())],
                );
                let _ = sender.try_send(Err(status));
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(message) = event_to_pb(&event, subscriber.include_api_keys) else { continue };
        tokio::select! {
            sent = sender.send(Ok(message)) => if sent.is_err() { return },
            _ = stop.wait() => return,
        }
    }
}
