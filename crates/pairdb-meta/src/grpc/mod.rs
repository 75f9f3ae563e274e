//! The gRPC edge: `pairdb.admin.v1.AdminService` (admin token required) and
//! `pairdb.cluster.v1.ClusterService` (registration, heartbeats, the watch stream). Protobuf types are
//! converted to the domain types of [`crate::model`] / [`crate::admin`] here and go no further.

use std::sync::Arc;

use pairdb_core::quorum::Consistency;
use pairdb_core::ring::NodeId;
use pairdb_core::tenant::{ConflictMode, KeyGroups};
use pairdb_proto::admin::v1 as admin_pb;
use pairdb_proto::admin::v1::admin_service_server::AdminService;
use pairdb_proto::cluster::v1 as cluster_pb;
use pairdb_proto::cluster::v1::cluster_service_server::ClusterService;
use pairdb_proto::convert;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use pairdb_service::cluster_auth::{Caller, Principal};

use crate::admin::{Meta, NewNode, NewTenant, NodePatch, NodeView, Registration, TenantPatch, now_ms};
use crate::config::AdminAuth;
use crate::deletion::TenantView;
use crate::error::MetaError;
use crate::model::{
    ApiKey, ApiKeyHash, ContextKeyRecord, ContextKeySet, Migration, MigrationState, NodeRebuild, NodeStats,
    NodeStatus, StorageNode, Tenant, TenantState, Topology, Usage, UsageTotal,
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
    log_error(rpc, &error);
    error.to_status()
}

/// [`error_status`] for the cluster API (the encoding previous-release nodes read).
pub fn internal_error_status(rpc: &'static str, error: MetaError) -> Status {
    log_error(rpc, &error);
    error.to_internal_status()
}

fn log_error(rpc: &'static str, error: &MetaError) {
    match error {
        MetaError::Internal(_) => tracing::error!(rpc, %error, "request failed"),
        MetaError::DatabaseUnavailable(_) => tracing::warn!(rpc, %error, "request failed"),
        _ => tracing::debug!(rpc, %error, "request rejected"),
    }
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
            key_groups: key_groups_from_pb(r.key_groups).map_err(|e| error_status("CreateTenant", e))?,
            tenant_id: r.tenant_id,
            replication_factor: r.replication_factor,
            rate_limit_ops_per_sec: r.rate_limit_ops_per_sec,
            rate_limit_burst: r.rate_limit_burst,
            max_value_bytes: r.max_value_bytes,
            max_siblings: r.max_siblings,
            strict_quorum: r.strict_quorum,
            max_keys: r.max_keys,
            max_bytes: r.max_bytes,
            default_ttl_ms: r.default_ttl_ms,
            max_ttl_ms: r.max_ttl_ms,
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
            max_keys: r.max_keys,
            max_bytes: r.max_bytes,
            default_ttl_ms: r.default_ttl_ms,
            max_ttl_ms: r.max_ttl_ms,
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

    async fn get_tenant_usage(
        &self,
        request: Request<admin_pb::GetTenantUsageRequest>,
    ) -> Result<Response<admin_pb::TenantUsageReport>, Status> {
        let (tenant, total) = self
            .meta
            .tenant_usage(&request.into_inner().tenant_id)
            .await
            .map_err(|e| error_status("GetTenantUsage", e))?;
        Ok(Response::new(usage_report_to_pb(&tenant, &total, now_ms())))
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
        let node_id = (r.node_id != 0).then_some(NodeId(r.node_id));
        let new = NewNode { node_id, address: r.address, zone: r.zone, weight: r.weight };
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
            .get_node(NodeId(request.into_inner().node_id))
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
            .update_node(NodeId(r.node_id), patch)
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
            .remove_node(NodeId(r.node_id), r.force)
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
            .node_rebuild(NodeId(request.into_inner().node_id), true)
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
            .node_rebuild(NodeId(request.into_inner().node_id), false)
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

mod cluster;
mod messages;

pub use cluster::ClusterGrpc;
pub use messages::migration_rates;
use messages::*;
