//! The gRPC edge: `pairdb.admin.v1.AdminService` (admin token required) and
//! `pairdb.cluster.v1.ClusterService` (registration, heartbeats, the watch stream). Protobuf types are
//! converted to the domain types of [`crate::model`] / [`crate::admin`] here and go no further.

use std::sync::Arc;

use pairdb_core::quorum::Consistency;
use pairdb_core::tenant::ConflictMode;
use pairdb_proto::admin::v1 as admin_pb;
use pairdb_proto::admin::v1::admin_service_server::AdminService;
use pairdb_proto::cluster::v1 as cluster_pb;
use pairdb_proto::cluster::v1::cluster_service_server::ClusterService;
use pairdb_proto::convert;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use pairdb_service::cluster_auth::{Caller, Principal};

use crate::admin::{Meta, NewNode, NewTenant, NodePatch, NodeView, Registration, TenantPatch, now_ms};
use crate::config::AdminAuth;
use crate::deletion::TenantView;
use crate::error::MetaError;
use crate::model::{
    ApiKey, ApiKeyHash, ContextKeyRecord, ContextKeySet, Migration, MigrationState, NodeRebuild, NodeStats,
    NodeStatus, StorageNode, Tenant, TenantState, Topology,
};
use crate::view::{Event, RevisionedEvent, ViewSnapshot};

/// Messages buffered between a subscriber's pump task and its HTTP/2 stream.
const WATCH_STREAM_BUFFER: usize = 64;

/// Whether a request carries the admin token. Comparing digests keeps the comparison's timing
/// independent of how much of the token matched.
pub fn authorized(auth: &AdminAuth, authorization: Option<&str>) -> bool {
    match auth {
        AdminAuth::Disabled => true,
        AdminAuth::Token(token) => {
            let Some(presented) = authorization.and_then(pairdb_service::errors::bearer_token) else {
                return false;
            };
            Sha256::digest(presented.as_bytes()) == Sha256::digest(token.as_bytes())
        }
    }
}

/// The interceptor in front of the admin service.
pub fn admin_interceptor(
    auth: Arc<AdminAuth>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if authorized(&auth, header) {
            Ok(request)
        } else {
            Err(MetaError::Unauthenticated(
                "missing or invalid admin token (authorization: Bearer <token>)".to_owned(),
            )
            .to_status())
        }
    }
}

/// Logs an error where it is handled (at the edge) and converts it.
pub fn error_status(rpc: &'static str, error: MetaError) -> Status {
    match &error {
        MetaError::Internal(_) => tracing::error!(rpc, %error, "request failed"),
        MetaError::DatabaseUnavailable(_) => tracing::warn!(rpc, %error, "request failed"),
        _ => tracing::debug!(rpc, %error, "request rejected"),
    }
    error.to_status()
}

/// `pairdb.admin.v1.AdminService`.
#[derive(Debug, Clone)]
pub struct AdminGrpc {
    meta: Meta,
}

impl AdminGrpc {
    pub fn new(meta: Meta) -> Self {
        Self { meta }
    }
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn create_tenant(
        &self,
        request: Request<admin_pb::CreateTenantRequest>,
    ) -> Result<Response<admin_pb::Tenant>, Status> {
        let r = request.into_inner();
        let new = NewTenant {
            default_consistency: consistency_from_pb(r.default_consistency)
                .map_err(|e| error_status("CreateTenant", e))?,
            conflict_mode: conflict_mode_from_pb(r.conflict_mode)
                .map_err(|e| error_status("CreateTenant", e))?,
            tenant_id: r.tenant_id,
            replication_factor: r.replication_factor,
            rate_limit_ops_per_sec: r.rate_limit_ops_per_sec,
            rate_limit_burst: r.rate_limit_burst,
            max_value_bytes: r.max_value_bytes,
            max_siblings: r.max_siblings,
            strict_quorum: r.strict_quorum,
        };
        let tenant = self.meta.create_tenant(new).await.map_err(|e| error_status("CreateTenant", e))?;
        Ok(Response::new(tenant_to_pb(&TenantView { tenant, purge: None })))
    }

    async fn get_tenant(
        &self,
        request: Request<admin_pb::GetTenantRequest>,
    ) -> Result<Response<admin_pb::Tenant>, Status> {
        let view = self
            .meta
            .tenant_view(&request.into_inner().tenant_id)
            .await
            .map_err(|e| error_status("GetTenant", e))?;
        Ok(Response::new(tenant_to_pb(&view)))
    }

    async fn list_tenants(
        &self,
        _request: Request<admin_pb::ListTenantsRequest>,
    ) -> Result<Response<admin_pb::ListTenantsResponse>, Status> {
        let tenants = self.meta.tenant_views().await.map_err(|e| error_status("ListTenants", e))?;
        Ok(Response::new(admin_pb::ListTenantsResponse {
            tenants: tenants.iter().map(tenant_to_pb).collect(),
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<admin_pb::UpdateTenantRequest>,
    ) -> Result<Response<admin_pb::UpdateTenantResponse>, Status> {
        let r = request.into_inner();
        let patch = TenantPatch {
            replication_factor: r.replication_factor,
            default_consistency: match r.default_consistency {
                Some(value) => consistency_from_pb(value).map_err(|e| error_status("UpdateTenant", e))?,
                None => None,
            },
            conflict_mode: match r.conflict_mode {
                Some(value) => conflict_mode_from_pb(value).map_err(|e| error_status("UpdateTenant", e))?,
                None => None,
            },
            rate_limit_ops_per_sec: r.rate_limit_ops_per_sec,
            rate_limit_burst: r.rate_limit_burst,
            max_value_bytes: r.max_value_bytes,
            max_siblings: r.max_siblings,
            strict_quorum: r.strict_quorum,
        };
        let (tenant, migration_id) = self
            .meta
            .update_tenant(&r.tenant_id, patch)
            .await
            .map_err(|e| error_status("UpdateTenant", e))?;
        Ok(Response::new(admin_pb::UpdateTenantResponse {
            tenant: Some(tenant_to_pb(&TenantView { tenant, purge: None })),
            migration_id: migration_id.unwrap_or_default(),
        }))
    }

    async fn update_replication_factor(
        &self,
        request: Request<admin_pb::UpdateReplicationFactorRequest>,
    ) -> Result<Response<admin_pb::UpdateTenantResponse>, Status> {
        let r = request.into_inner();
        let patch = TenantPatch { replication_factor: Some(r.replication_factor), ..TenantPatch::default() };
        let (tenant, migration_id) = self
            .meta
            .update_tenant(&r.tenant_id, patch)
            .await
            .map_err(|e| error_status("UpdateReplicationFactor", e))?;
        Ok(Response::new(admin_pb::UpdateTenantResponse {
            tenant: Some(tenant_to_pb(&TenantView { tenant, purge: None })),
            migration_id: migration_id.unwrap_or_default(),
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<admin_pb::DeleteTenantRequest>,
    ) -> Result<Response<admin_pb::DeleteTenantResponse>, Status> {
        let view = self
            .meta
            .delete_tenant(&request.into_inner().tenant_id)
            .await
            .map_err(|e| error_status("DeleteTenant", e))?;
        Ok(Response::new(admin_pb::DeleteTenantResponse { tenant: Some(tenant_to_pb(&view)) }))
    }

    async fn create_api_key(
        &self,
        request: Request<admin_pb::CreateApiKeyRequest>,
    ) -> Result<Response<admin_pb::CreateApiKeyResponse>, Status> {
        let r = request.into_inner();
        let (key, secret) = self
            .meta
            .create_api_key(&r.tenant_id, &r.description)
            .await
            .map_err(|e| error_status("CreateApiKey", e))?;
        Ok(Response::new(admin_pb::CreateApiKeyResponse { api_key: Some(api_key_to_pb(&key)), secret }))
    }

    async fn list_api_keys(
        &self,
        request: Request<admin_pb::ListApiKeysRequest>,
    ) -> Result<Response<admin_pb::ListApiKeysResponse>, Status> {
        let tenant_id = request.into_inner().tenant_id;
        let tenant = (!tenant_id.is_empty()).then_some(tenant_id.as_str());
        let keys = self.meta.list_api_keys(tenant).await.map_err(|e| error_status("ListApiKeys", e))?;
        Ok(Response::new(admin_pb::ListApiKeysResponse {
            api_keys: keys.iter().map(api_key_to_pb).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<admin_pb::RevokeApiKeyRequest>,
    ) -> Result<Response<admin_pb::RevokeApiKeyResponse>, Status> {
        let key = self
            .meta
            .revoke_api_key(&request.into_inner().key_id)
            .await
            .map_err(|e| error_status("RevokeApiKey", e))?;
        Ok(Response::new(admin_pb::RevokeApiKeyResponse { api_key: Some(api_key_to_pb(&key)) }))
    }

    async fn add_storage_node(
        &self,
        request: Request<admin_pb::AddStorageNodeRequest>,
    ) -> Result<Response<admin_pb::StorageNodeChangeResponse>, Status> {
        let r = request.into_inner();
        let new = NewNode { node_id: r.node_id, address: r.address, zone: r.zone, weight: r.weight };
        let (node, migration_id) =
            self.meta.add_node(new).await.map_err(|e| error_status("AddStorageNode", e))?;
        let mut response = node_change(&node, migration_id);
        // An insecure cluster has no credentials to hand out.
        if let Ok(credential) = self.meta.issue_credential(Principal::Node(node.node.node_id)) {
            response.cluster_credential = credential.as_str().to_owned();
        }
        Ok(Response::new(response))
    }

    async fn list_storage_nodes(
        &self,
        _request: Request<admin_pb::ListStorageNodesRequest>,
    ) -> Result<Response<admin_pb::ListStorageNodesResponse>, Status> {
        let nodes = self.meta.list_nodes().await.map_err(|e| error_status("ListStorageNodes", e))?;
        Ok(Response::new(admin_pb::ListStorageNodesResponse {
            nodes: nodes.iter().map(node_to_pb).collect(),
        }))
    }

    async fn get_storage_node(
        &self,
        request: Request<admin_pb::GetStorageNodeRequest>,
    ) -> Result<Response<admin_pb::StorageNode>, Status> {
        let node = self
            .meta
            .get_node(request.into_inner().node_id)
            .await
            .map_err(|e| error_status("GetStorageNode", e))?;
        Ok(Response::new(node_to_pb(&node)))
    }

    async fn update_storage_node(
        &self,
        request: Request<admin_pb::UpdateStorageNodeRequest>,
    ) -> Result<Response<admin_pb::StorageNodeChangeResponse>, Status> {
        let r = request.into_inner();
        let patch = NodePatch { weight: r.weight, zone: r.zone };
        let (node, migration_id) = self
            .meta
            .update_node(r.node_id, patch)
            .await
            .map_err(|e| error_status("UpdateStorageNode", e))?;
        Ok(Response::new(node_change(&node, migration_id)))
    }

    async fn remove_storage_node(
        &self,
        request: Request<admin_pb::RemoveStorageNodeRequest>,
    ) -> Result<Response<admin_pb::StorageNodeChangeResponse>, Status> {
        let r = request.into_inner();
        let (node, migration_id) = self
            .meta
            .remove_node(r.node_id, r.force)
            .await
            .map_err(|e| error_status("RemoveStorageNode", e))?;
        Ok(Response::new(node_change(&node, migration_id)))
    }

    async fn rebuild_storage_node(
        &self,
        request: Request<admin_pb::RebuildStorageNodeRequest>,
    ) -> Result<Response<admin_pb::NodeRebuild>, Status> {
        let rebuild = self
            .meta
            .node_rebuild(request.into_inner().node_id, true)
            .await
            .map_err(|e| error_status("RebuildStorageNode", e))?;
        Ok(Response::new(node_rebuild_message(&rebuild)))
    }

    async fn get_node_rebuild(
        &self,
        request: Request<admin_pb::GetNodeRebuildRequest>,
    ) -> Result<Response<admin_pb::NodeRebuild>, Status> {
        let rebuild = self
            .meta
            .node_rebuild(request.into_inner().node_id, false)
            .await
            .map_err(|e| error_status("GetNodeRebuild", e))?;
        Ok(Response::new(node_rebuild_message(&rebuild)))
    }

    async fn get_migration(
        &self,
        request: Request<admin_pb::GetMigrationRequest>,
    ) -> Result<Response<admin_pb::Migration>, Status> {
        let migration = self
            .meta
            .get_migration(&request.into_inner().migration_id)
            .await
            .map_err(|e| error_status("GetMigration", e))?;
        Ok(Response::new(migration_to_pb(&migration)))
    }

    async fn list_migrations(
        &self,
        _request: Request<admin_pb::ListMigrationsRequest>,
    ) -> Result<Response<admin_pb::ListMigrationsResponse>, Status> {
        let migrations = self.meta.list_migrations().await.map_err(|e| error_status("ListMigrations", e))?;
        Ok(Response::new(admin_pb::ListMigrationsResponse {
            migrations: migrations.iter().map(migration_to_pb).collect(),
        }))
    }

    async fn cancel_migration(
        &self,
        request: Request<admin_pb::CancelMigrationRequest>,
    ) -> Result<Response<admin_pb::Migration>, Status> {
        let migration = self
            .meta
            .cancel_migration(&request.into_inner().migration_id)
            .await
            .map_err(|e| error_status("CancelMigration", e))?;
        Ok(Response::new(migration_to_pb(&migration)))
    }

    async fn rotate_context_key(
        &self,
        _request: Request<admin_pb::RotateContextKeyRequest>,
    ) -> Result<Response<admin_pb::ContextKeyStatus>, Status> {
        let status = self.meta.rotate_context_key().await.map_err(|e| error_status("RotateContextKey", e))?;
        Ok(Response::new(admin_pb::ContextKeyStatus {
            current_key_id: status.current_key_id,
            previous_key_id: status.previous_key_id,
            rotated_at_ms: status.rotated_at_ms,
        }))
    }

    async fn issue_cluster_credential(
        &self,
        request: Request<admin_pb::IssueClusterCredentialRequest>,
    ) -> Result<Response<admin_pb::IssueClusterCredentialResponse>, Status> {
        let principal: Principal = request.into_inner().principal.parse().map_err(|e| {
            error_status("IssueClusterCredential", MetaError::InvalidArgument(format!("principal: {e}")))
        })?;
        let credential =
            self.meta.issue_credential(principal).map_err(|e| error_status("IssueClusterCredential", e))?;
        Ok(Response::new(admin_pb::IssueClusterCredentialResponse {
            principal: principal.to_string(),
            cluster_credential: credential.as_str().to_owned(),
        }))
    }
}

/// The verified caller of a cluster-API request (the guard put it there), or UNAUTHENTICATED.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    Caller::of(request)
        .ok_or_else(|| MetaError::Unauthenticated("cluster credential required".to_owned()).to_status())
}

/// A storage node may register and heartbeat only as the node its credential names.
fn require_node(rpc: &'static str, caller: Caller, node_id: u32) -> Result<(), Status> {
    if caller.is(Principal::Node(node_id)) {
        return Ok(());
    }
    tracing::warn!(rpc, node_id, ?caller, "a cluster member tried to act as another node");
    metrics::counter!("pairdb_cluster_auth_refused_total", "api" => "cluster_identity").increment(1);
    Err(error_status(
        rpc,
        MetaError::PermissionDenied(format!("this cluster credential does not name node {node_id}")),
    ))
}

/// `pairdb.cluster.v1.ClusterService`.
#[derive(Debug, Clone)]
pub struct ClusterGrpc {
    meta: Meta,
    /// Set at shutdown: every watch stream ends so the server can drain.
    stop: watch::Receiver<bool>,
}

impl ClusterGrpc {
    pub fn new(meta: Meta, stop: watch::Receiver<bool>) -> Self {
        Self { meta, stop }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterGrpc {
    type WatchStream = ReceiverStream<Result<cluster_pb::WatchEvent, Status>>;

    async fn register_node(
        &self,
        request: Request<cluster_pb::RegisterNodeRequest>,
    ) -> Result<Response<cluster_pb::RegisterNodeResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        require_node("RegisterNode", caller, r.node_id)?;
        let registration = Registration {
            node_id: r.node_id,
            address: r.address,
            zone: r.zone,
            weight: r.weight,
            actor_id: r.actor_id,
            data_format_version: r.data_format_version,
        };
        let node_id =
            self.meta.register_node(registration).await.map_err(|e| error_status("RegisterNode", e))?;
        Ok(Response::new(cluster_pb::RegisterNodeResponse {
            node_id,
            heartbeat_interval_ms: self.meta.settings().heartbeat_interval_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<cluster_pb::HeartbeatRequest>,
    ) -> Result<Response<cluster_pb::HeartbeatResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        require_node("Heartbeat", caller, r.node_id)?;
        let stats = r.stats.map(stats_from_pb).unwrap_or_default();
        let purged: Vec<(String, u64)> =
            r.purged_tenants.into_iter().map(|p| (p.tenant_id, p.purge_seq)).collect();
        let known =
            self.meta.heartbeat(r.node_id, stats, &purged).await.map_err(|e| error_status("Heartbeat", e))?;
        Ok(Response::new(cluster_pb::HeartbeatResponse { unknown_node: !known }))
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
            let catch_up = crate::follower::sync(self.meta.store(), self.meta.view());
            if let Ok(Err(error)) = tokio::time::timeout(self.meta.store().timeout(), catch_up).await {
                tracing::debug!(%error, "watch: serving the view without catching up");
            }
        }
        let Some((snapshot, events)) = self.meta.view().subscribe() else {
            return Err(error_status(
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
struct Subscriber {
    kind: String,
    id: String,
    include_api_keys: bool,
}

/// Counts live subscribers in `pairdb_meta_watch_subscribers`.
struct SubscriberGauge;

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
    mut stop: watch::Receiver<bool>,
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
            _ = stop.changed() => return,
            () = sender.closed() => return,
        };
        let event = match received {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(kind = %subscriber.kind, id = %subscriber.id, missed, "watch subscriber fell behind; disconnecting it");
                metrics::counter!("pairdb_meta_watch_lagged_total").increment(1);
                let status = pairdb_service::errors::status(
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
            _ = stop.changed() => return,
        }
    }
}

// ---- conversions ------------------------------------------------------------------------------

fn consistency_from_pb(value: i32) -> Result<Option<Consistency>, MetaError> {
    convert::consistency_from_wire(value).map_err(|e| MetaError::InvalidArgument(e.to_string()))
}

fn conflict_mode_from_pb(value: i32) -> Result<Option<ConflictMode>, MetaError> {
    convert::conflict_mode_from_wire(value).map_err(|e| MetaError::InvalidArgument(e.to_string()))
}

fn tenant_to_pb(view: &TenantView) -> admin_pb::Tenant {
    let tenant = &view.tenant;
    admin_pb::Tenant {
        state: tenant.state.as_str().to_owned(),
        purge: view.purge.as_ref().map(|p| admin_pb::TenantPurgeProgress {
            nodes_done: p.nodes_done,
            nodes_total: p.nodes_total,
            waiting_node_ids: p.waiting_node_ids.clone(),
        }),
        tenant_id: tenant.tenant_id.clone(),
        replication_factor: tenant.replication_factor,
        default_consistency: convert::consistency_to_wire(Some(tenant.default_consistency)),
        conflict_mode: convert::conflict_mode_to_wire(Some(tenant.conflict_mode)),
        rate_limit_ops_per_sec: tenant.rate_limit_ops_per_sec,
        rate_limit_burst: tenant.rate_limit_burst,
        max_value_bytes: tenant.max_value_bytes,
        max_siblings: tenant.max_siblings,
        strict_quorum: tenant.strict_quorum,
        created_at_ms: tenant.created_at_ms,
        updated_at_ms: tenant.updated_at_ms,
    }
}

fn tenant_config_to_pb(tenant: &Tenant) -> cluster_pb::TenantConfig {
    cluster_pb::TenantConfig {
        tenant_id: tenant.tenant_id.clone(),
        replication_factor: tenant.replication_factor,
        default_consistency: convert::consistency_to_wire(Some(tenant.default_consistency)),
        conflict_mode: convert::conflict_mode_to_wire(Some(tenant.conflict_mode)),
        rate_limit_ops_per_sec: tenant.rate_limit_ops_per_sec,
        rate_limit_burst: tenant.rate_limit_burst,
        max_value_bytes: tenant.max_value_bytes,
        max_siblings: tenant.max_siblings,
        strict_quorum: tenant.strict_quorum,
        previous_replication_factor: tenant.previous_replication_factor.unwrap_or(0),
        deleting: tenant.state == TenantState::Deleting,
        purge_seq: tenant.purge_seq,
        generation: tenant.generation,
    }
}

fn context_key_to_pb(key: &ContextKeyRecord) -> cluster_pb::ContextKey {
    cluster_pb::ContextKey { key_id: key.key_id, secret: key.secret.clone() }
}

fn context_keys_to_pb(keys: &ContextKeySet) -> cluster_pb::ContextKeys {
    cluster_pb::ContextKeys {
        current: keys.current.as_ref().map(context_key_to_pb),
        previous: keys.previous.as_ref().map(context_key_to_pb),
    }
}

fn api_key_to_pb(key: &ApiKey) -> admin_pb::ApiKey {
    admin_pb::ApiKey {
        key_id: key.key_id.clone(),
        tenant_id: key.tenant_id.clone(),
        description: key.description.clone(),
        created_at_ms: key.created_at_ms,
        revoked: key.revoked(),
    }
}

fn api_key_hash_to_pb(key: &ApiKeyHash) -> cluster_pb::ApiKeyHash {
    cluster_pb::ApiKeyHash {
        key_id: key.key_id.clone(),
        tenant_id: key.tenant_id.clone(),
        secret_sha256: key.secret_sha256.clone(),
    }
}

fn status_to_pb(status: NodeStatus) -> i32 {
    (match status {
        NodeStatus::Joining => admin_pb::NodeStatus::Joining,
        NodeStatus::Active => admin_pb::NodeStatus::Active,
        NodeStatus::Leaving => admin_pb::NodeStatus::Leaving,
        NodeStatus::Down => admin_pb::NodeStatus::Down,
        NodeStatus::Removed => admin_pb::NodeStatus::Removed,
    }) as i32
}

fn stats_from_pb(stats: admin_pb::NodeStats) -> NodeStats {
    NodeStats {
        keys: stats.keys,
        live_bytes: stats.live_bytes,
        disk_free_bytes: stats.disk_free_bytes,
        hints_pending: stats.hints_pending,
        write_path_poisoned: stats.write_path_poisoned,
        quarantined_records: stats.quarantined_records,
    }
}

fn node_to_pb(view: &NodeView) -> admin_pb::StorageNode {
    let node = &view.node;
    admin_pb::StorageNode {
        node_id: node.node_id,
        address: node.address.clone(),
        zone: node.zone.clone(),
        weight: node.weight,
        status: status_to_pb(node.status()),
        last_heartbeat_ms: node.last_heartbeat_ms,
        stats: Some(admin_pb::NodeStats {
            keys: node.stats.keys,
            live_bytes: node.stats.live_bytes,
            disk_free_bytes: node.stats.disk_free_bytes,
            hints_pending: node.stats.hints_pending,
            write_path_poisoned: node.stats.write_path_poisoned,
            quarantined_records: node.stats.quarantined_records,
        }),
        in_ring: view.in_ring,
    }
}

fn node_rebuild_message(rebuild: &NodeRebuild) -> admin_pb::NodeRebuild {
    admin_pb::NodeRebuild {
        node_id: rebuild.node_id,
        state: rebuild.state.to_owned(),
        partitions_total: rebuild.partitions_total,
        partitions_done: rebuild.partitions_done,
        keys_compared: rebuild.keys_compared,
        keys_repaired: rebuild.keys_repaired,
        bytes: rebuild.bytes,
        failed_exchanges: rebuild.failed_exchanges,
        started_at_ms: rebuild.started_at_ms,
        finished_at_ms: rebuild.finished_at_ms,
    }
}

fn node_change(view: &NodeView, migration_id: Option<String>) -> admin_pb::StorageNodeChangeResponse {
    admin_pb::StorageNodeChangeResponse {
        node: Some(node_to_pb(view)),
        migration_id: migration_id.unwrap_or_default(),
        cluster_credential: String::new(),
    }
}

fn node_info_to_pb(node: &StorageNode) -> cluster_pb::NodeInfo {
    cluster_pb::NodeInfo {
        node_id: node.node_id,
        address: node.address.clone(),
        zone: node.zone.clone(),
        weight: node.weight,
        status: status_to_pb(node.status()),
    }
}

fn migration_state_to_pb(state: MigrationState) -> i32 {
    (match state {
        MigrationState::Pending => admin_pb::MigrationState::Pending,
        MigrationState::Running => admin_pb::MigrationState::Running,
        MigrationState::Completed => admin_pb::MigrationState::Completed,
        MigrationState::Failed => admin_pb::MigrationState::Failed,
        MigrationState::Cancelled => admin_pb::MigrationState::Cancelled,
    }) as i32
}

/// Throughput since the migration started and the time left at that rate (partitions-based).
pub fn migration_rates(migration: &Migration, now_ms: u64) -> (f64, u64) {
    let end = if migration.finished_at_ms != 0 { migration.finished_at_ms } else { now_ms };
    let elapsed_secs = end.saturating_sub(migration.started_at_ms) as f64 / 1000.0;
    if migration.started_at_ms == 0 || elapsed_secs <= 0.0 {
        return (0.0, 0);
    }
    let keys_per_sec = migration.progress.keys_done as f64 / elapsed_secs;
    let done = migration.progress.partitions_done;
    let remaining = migration.progress.partitions_total.saturating_sub(done);
    let eta_secs = if done == 0 || migration.state != MigrationState::Running {
        0
    } else {
        (remaining as f64 * elapsed_secs / done as f64).ceil() as u64
    };
    (keys_per_sec, eta_secs)
}

fn migration_to_pb(migration: &Migration) -> admin_pb::Migration {
    let (keys_per_sec, eta_secs) = migration_rates(migration, now_ms());
    admin_pb::Migration {
        migration_id: migration.migration_id.clone(),
        kind: migration.kind.as_str().to_owned(),
        state: migration_state_to_pb(migration.state),
        from_epoch: migration.from_epoch,
        to_epoch: migration.to_epoch,
        progress: Some(admin_pb::MigrationProgress {
            partitions_total: migration.progress.partitions_total,
            partitions_done: migration.progress.partitions_done,
            keys_total: migration.progress.keys_total,
            keys_done: migration.progress.keys_done,
            bytes_done: migration.progress.bytes_done,
            keys_per_sec,
            eta_secs,
        }),
        error: migration.error.clone(),
        created_at_ms: migration.created_at_ms,
        updated_at_ms: migration.updated_at_ms,
        tenant_id: migration.tenant_id.clone(),
        node_id: migration.node_id,
    }
}

fn topology_to_pb(topology: &Topology) -> cluster_pb::Topology {
    cluster_pb::Topology {
        epoch: topology.epoch,
        partition_count: topology.assignment.partition_count().get(),
        partitions: topology
            .assignment
            .lists()
            .map(|(_, list)| cluster_pb::PartitionNodes { node_ids: list.iter().map(|id| id.0).collect() })
            .collect(),
    }
}

fn snapshot_to_pb(snapshot: &ViewSnapshot, include_api_keys: bool) -> cluster_pb::WatchEvent {
    let snapshot_pb = cluster_pb::ClusterSnapshot {
        current: snapshot.current.as_ref().map(topology_to_pb),
        pending: snapshot.pending.as_ref().map(topology_to_pb),
        nodes: snapshot.nodes.iter().map(node_info_to_pb).collect(),
        tenants: snapshot.tenants.iter().map(tenant_config_to_pb).collect(),
        api_keys: if include_api_keys {
            snapshot.api_keys.iter().map(api_key_hash_to_pb).collect()
        } else {
            Vec::new()
        },
        context_keys: include_api_keys.then(|| context_keys_to_pb(&snapshot.context_keys)),
    };
    cluster_pb::WatchEvent {
        revision: snapshot.revision,
        event: Some(cluster_pb::watch_event::Event::Snapshot(snapshot_pb)),
    }
}

fn event_to_pb(event: &RevisionedEvent, include_api_keys: bool) -> Option<cluster_pb::WatchEvent> {
    use cluster_pb::watch_event::Event as E;
    let converted = match &event.event {
        Event::TopologyCurrent(topology) => E::TopologyCurrent(topology_to_pb(topology)),
        Event::TopologyPending(topology) => E::TopologyPending(topology_to_pb(topology)),
        Event::TopologyPendingCleared => E::TopologyPendingCleared(true),
        Event::NodeChanged(node) => E::NodeChanged(node_info_to_pb(node)),
        Event::TenantChanged(tenant) => E::TenantChanged(tenant_config_to_pb(tenant)),
        Event::TenantDeleted(tenant_id) => E::TenantDeleted(tenant_id.clone()),
        Event::ApiKeyAdded(key) if include_api_keys => E::ApiKeyAdded(api_key_hash_to_pb(key)),
        Event::ApiKeyRevoked(key_id) if include_api_keys => E::ApiKeyRevoked(key_id.clone()),
        Event::ContextKeysChanged(keys) if include_api_keys => {
            E::ContextKeysChanged(context_keys_to_pb(keys))
        }
        Event::ApiKeyAdded(_) | Event::ApiKeyRevoked(_) | Event::ContextKeysChanged(_) => return None,
    };
    Some(cluster_pb::WatchEvent { revision: event.revision, event: Some(converted) })
}
