//! Deleting a tenant so that it is gone everywhere before its id can be used again.
//!
//! 1. `DeleteTenant` (one write transaction): the tenant becomes `deleting` with a fresh purge
//!    sequence, its API keys are revoked and its replication-factor migration is cancelled. The watch
//!    stream tells routers (which serve nothing for it from then on) and storage nodes.
//! 2. Each storage node refuses the tenant's writes from the moment it sees the change, purges its
//!    records, hints, full-ack confirmations and quarantined records, and reports the purge in its
//!    heartbeats ([`crate::admin::Meta::heartbeat`] records it in `tenant_purges`). A node that was
//!    down does all of this when it comes back.
//! 3. The leader ([`Meta::finish_tenant_deletions`]) deletes the tenant row once every storage node
//!    that is not removed confirmed this purge sequence; the watch stream then publishes the
//!    deletion, and only then may the id be created again (creating it meanwhile is
//!    TENANT_BEING_DELETED). A re-created tenant gets a new generation, which requests carry, so a
//!    router that missed all of this still cannot reach the new tenant's data with the old one's
//!    view.
//!
//! Invariant: a tenant row leaves the database only after every non-removed node purged its data,
//! so no node that can serve data still holds the deleted tenant's records or hints.

use pairdb_core::ring::NodeId;

use crate::admin::{Meta, now_ms};
use crate::error::MetaError;
use crate::model::{Membership, MigrationState, PurgeProgress, Tenant, TenantState};
use crate::persistence::{ChangeKind, Tx};

/// A tenant and, while it is being deleted, how far its purge got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantView {
    pub tenant: Tenant,
    pub purge: Option<PurgeProgress>,
}

/// Which nodes must confirm `tenant`'s purge and which have.
pub(crate) async fn purge_progress(tx: &mut Tx, tenant: &Tenant) -> Result<PurgeProgress, MetaError> {
    let confirmed = tx.purge_confirmations(&tenant.tenant_id, tenant.purge_seq).await?;
    let required: Vec<NodeId> = tx
        .list_nodes()
        .await?
        .into_iter()
        .filter(|node| node.membership != Membership::Removed)
        .map(|node| node.node_id)
        .collect();
    let waiting_node_ids: Vec<NodeId> =
        required.iter().copied().filter(|id| !confirmed.contains(id)).collect();
    let nodes_total = u32::try_from(required.len()).unwrap_or(u32::MAX);
    let nodes_done = nodes_total - u32::try_from(waiting_node_ids.len()).unwrap_or(nodes_total);
    Ok(PurgeProgress { nodes_done, nodes_total, waiting_node_ids })
}

/// The error for creating a tenant whose id is still being deleted.
pub(crate) async fn being_deleted(tx: &mut Tx, tenant: &Tenant) -> Result<MetaError, MetaError> {
    let progress = purge_progress(tx, tenant).await?;
    Ok(MetaError::TenantBeingDeleted {
        tenant: tenant.tenant_id.clone(),
        nodes_done: progress.nodes_done,
        nodes_total: progress.nodes_total,
    })
}

async fn view_of(tx: &mut Tx, tenant: Tenant) -> Result<TenantView, MetaError> {
    let purge = match tenant.state {
        TenantState::Active => None,
        TenantState::Deleting => Some(purge_progress(tx, &tenant).await?),
    };
    Ok(TenantView { tenant, purge })
}

impl Meta {
    /// Starts deleting `tenant_id` (see the module docs). Deleting a tenant already being deleted
    /// returns its progress.
    pub async fn delete_tenant(&self, tenant_id: &str) -> Result<TenantView, MetaError> {
        pairdb_core::validation::validate_tenant_id(tenant_id)
            .map_err(|_| MetaError::InvalidTenantId(tenant_id.to_owned()))?;
        let (mut tx, now) = self.write().await?;
        let mut tenant =
            tx.get_tenant(tenant_id).await?.ok_or_else(|| MetaError::TenantNotFound(tenant_id.to_owned()))?;
        if tenant.state == TenantState::Deleting {
            let view = view_of(&mut tx, tenant).await?;
            tx.commit().await?;
            return Ok(view);
        }
        tenant.state = TenantState::Deleting;
        tenant.purge_seq = tx.next_tenant_seq().await?;
        tenant.updated_at_ms = now;
        tx.update_tenant(&tenant).await?;
        for mut migration in tx.unfinished_migrations().await? {
            if migration.change.tenant_id() == Some(tenant_id) {
                crate::admin::abandon(
                    &mut tx,
                    &mut migration,
                    MigrationState::Cancelled,
                    "tenant deleted",
                    now,
                )
                .await?;
            }
        }
        for key_id in tx.delete_api_keys_of_tenant(tenant_id).await? {
            tx.record_change(ChangeKind::ApiKeyRevoked, &key_id).await?;
        }
        tx.record_change(ChangeKind::Tenant, tenant_id).await?;
        let view = view_of(&mut tx, tenant).await?;
        tx.commit().await?;
        tracing::info!(tenant = tenant_id, purge_seq = view.tenant.purge_seq, "tenant deletion started");
        Ok(view)
    }

    /// A tenant with its purge progress.
    pub async fn tenant_view(&self, tenant_id: &str) -> Result<TenantView, MetaError> {
        let tenant = self.get_tenant(tenant_id).await?;
        let mut tx = self.read().await?;
        let view = view_of(&mut tx, tenant).await?;
        tx.commit().await?;
        Ok(view)
    }

    /// Every tenant (those being deleted too) with purge progress.
    pub async fn tenant_views(&self) -> Result<Vec<TenantView>, MetaError> {
        let mut tx = self.read().await?;
        let mut views = Vec::new();
        for tenant in tx.list_tenants().await? {
            views.push(view_of(&mut tx, tenant).await?);
        }
        tx.commit().await?;
        Ok(views)
    }

    /// Leader: completes the deletions every storage node confirmed. Returns the tenants removed.
    pub async fn finish_tenant_deletions(
        &self,
        fence: crate::persistence::LeaderFence,
    ) -> Result<Vec<String>, MetaError> {
        let (mut tx, _) = self.write().await?;
        tx.check_leader(fence).await?;
        let mut finished = Vec::new();
        for tenant in tx.list_tenants().await?.into_iter().filter(|t| t.state == TenantState::Deleting) {
            if purge_progress(&mut tx, &tenant).await?.waiting_node_ids.is_empty() {
                tx.delete_tenant(&tenant.tenant_id).await?;
                tx.delete_purge_confirmations(&tenant.tenant_id).await?;
                tx.delete_usage_of_tenant(&tenant.tenant_id).await?;
                tx.record_change(ChangeKind::TenantDeleted, &tenant.tenant_id).await?;
                finished.push(tenant.tenant_id);
            }
        }
        tx.commit().await?;
        for tenant in &finished {
            tracing::info!(tenant, at_ms = now_ms(), "tenant deleted: every storage node purged its data");
        }
        Ok(finished)
    }
}
