//! The admin client (metadata service): tenants, API keys, storage nodes and migrations. Requests and
//! replies are the wire messages of `pairdb.admin.v1`; reads are retried, changes are not (they are
//! not idempotent: a repeated create answers TENANT_EXISTS).

use std::time::Duration;

use pairdb_proto::admin::v1 as pb;
use pairdb_proto::admin::v1::admin_service_client::AdminServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::retry::with_retries;
use crate::{BearerToken, ClientError, ClientOptions, RetryPolicy, connect_with};

type Inner = AdminServiceClient<InterceptedService<Channel, BearerToken>>;

/// Client of meta's admin API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminClient {
    inner: Inner,
    request_timeout: Duration,
    retry: RetryPolicy,
}

/// One admin call: `$method(request) -> reply`, retried when `$safe`.
macro_rules! admin_call {
    ($(#[$doc:meta])* $name:ident, $method:ident, $request:ty, $reply:ty, $safe:expr) => {
        $(#[$doc])*
        pub async fn $name(&self, request: $request) -> Result<$reply, ClientError> {
            with_retries(self.retry, $safe, || {
                let mut client = self.inner.clone();
                let mut request = tonic::Request::new(request.clone());
                request.set_timeout(self.request_timeout);
                async move { Ok(client.$method(request).await?.into_inner()) }
            })
            .await
        }
    };
}

impl AdminClient {
    /// Connects to the metadata service at `address`; `options.token` is the admin token.
    pub async fn connect(address: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let channel = connect_with(address, &options).await?;
        Self::from_channel(channel, options)
    }

    pub fn from_channel(channel: Channel, options: ClientOptions) -> Result<Self, ClientError> {
        let auth = BearerToken::new(options.token.as_deref())?;
        Ok(Self {
            inner: AdminServiceClient::with_interceptor(channel, auth),
            request_timeout: options.request_timeout,
            retry: options.retry,
        })
    }

    admin_call!(
        /// Replaces the key routers seal client contexts with.
        rotate_context_key, rotate_context_key, pb::RotateContextKeyRequest, pb::ContextKeyStatus, false
    );
    admin_call!(
        /// The cluster credential of a principal (`router`, `meta`, `node-<id>`).
        issue_cluster_credential,
        issue_cluster_credential,
        pb::IssueClusterCredentialRequest,
        pb::IssueClusterCredentialResponse,
        true
    );
    admin_call!(create_tenant, create_tenant, pb::CreateTenantRequest, pb::Tenant, false);
    admin_call!(get_tenant, get_tenant, pb::GetTenantRequest, pb::Tenant, true);
    admin_call!(list_tenants, list_tenants, pb::ListTenantsRequest, pb::ListTenantsResponse, true);
    admin_call!(
        /// Changing the replication factor starts a migration (its id is in the reply).
        update_tenant, update_tenant, pb::UpdateTenantRequest, pb::UpdateTenantResponse, false
    );
    admin_call!(delete_tenant, delete_tenant, pb::DeleteTenantRequest, pb::DeleteTenantResponse, false);
    admin_call!(
        /// The tenant's usage summed from the storage nodes' reports (with their age), its quotas
        /// and over-quota flags.
        get_tenant_usage,
        get_tenant_usage,
        pb::GetTenantUsageRequest,
        pb::TenantUsageReport,
        true
    );
    admin_call!(
        /// The reply holds the secret; it is shown only once.
        create_api_key, create_api_key, pb::CreateApiKeyRequest, pb::CreateApiKeyResponse, false
    );
    admin_call!(list_api_keys, list_api_keys, pb::ListApiKeysRequest, pb::ListApiKeysResponse, true);
    admin_call!(revoke_api_key, revoke_api_key, pb::RevokeApiKeyRequest, pb::RevokeApiKeyResponse, false);
    admin_call!(
        add_storage_node,
        add_storage_node,
        pb::AddStorageNodeRequest,
        pb::StorageNodeChangeResponse,
        false
    );
    admin_call!(
        list_storage_nodes,
        list_storage_nodes,
        pb::ListStorageNodesRequest,
        pb::ListStorageNodesResponse,
        true
    );
    admin_call!(get_storage_node, get_storage_node, pb::GetStorageNodeRequest, pb::StorageNode, true);
    admin_call!(
        update_storage_node,
        update_storage_node,
        pb::UpdateStorageNodeRequest,
        pb::StorageNodeChangeResponse,
        false
    );
    admin_call!(
        remove_storage_node,
        remove_storage_node,
        pb::RemoveStorageNodeRequest,
        pb::StorageNodeChangeResponse,
        false
    );
    admin_call!(
        /// Starts refilling a node from its peers (one rebuild at a time per node; starting while one
        /// runs returns its progress).
        rebuild_storage_node,
        rebuild_storage_node,
        pb::RebuildStorageNodeRequest,
        pb::NodeRebuild,
        true
    );
    admin_call!(get_node_rebuild, get_node_rebuild, pb::GetNodeRebuildRequest, pb::NodeRebuild, true);
    admin_call!(get_migration, get_migration, pb::GetMigrationRequest, pb::Migration, true);
    admin_call!(
        list_migrations,
        list_migrations,
        pb::ListMigrationsRequest,
        pb::ListMigrationsResponse,
        true
    );
    admin_call!(cancel_migration, cancel_migration, pb::CancelMigrationRequest, pb::Migration, false);
}
