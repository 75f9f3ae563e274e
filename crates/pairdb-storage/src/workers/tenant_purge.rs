//! Deleted tenants, node side. When the view says a tenant is being deleted, this node refuses its
//! writes from then on and purges its records, hints, full-ack confirmations and quarantined records
//! ([`crate::engine::PurgeSpace`]), then records the purge; heartbeats report it to meta
//! ([`crate::membership`]), which lets the tenant id be reused once every node has. When meta no
//! longer lists the deleted tenant (deletion complete) or lists a new generation of it, the record is
//! dropped and the id's writes are accepted again.
//!
//! Acts only on a live view (a watch session that delivered its snapshot): dropping a purge record
//! on a stale picture could accept a deleted tenant's writes again.

use std::time::Duration;

use pairdb_service::cluster_view::ClusterView;

use super::{Context, Worker, WorkerError};
use crate::engine::{PurgeSpace, TenantPurge};

/// How often the view is checked for deletions.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Keys scanned per engine call (each call is short; the node's other work interleaves).
const SCAN_STEP: usize = 10_000;

/// Purges deleted tenants (see the module docs).
#[derive(Debug)]
pub struct TenantPurgeWorker {
    context: Context,
}

impl TenantPurgeWorker {
    pub fn new(context: Context) -> Self {
        Self { context }
    }
}

impl Worker for TenantPurgeWorker {
    const NAME: &'static str = "tenant_purge";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        if self.context.view.session().is_some() {
            reconcile(&self.context, &self.context.view.load()).await?;
        }
        Ok(CHECK_INTERVAL)
    }

    fn retry_after(&self) -> Duration {
        CHECK_INTERVAL
    }
}

/// Starts or finishes the purges the view asks for and forgets the ones meta completed.
async fn reconcile(context: &Context, view: &ClusterView) -> Result<(), WorkerError> {
    let recorded = context.blocking(|e| e.tenant_purges()).await?;
    for tenant in view.tenants.values().filter(|t| t.deleting) {
        let done = recorded
            .iter()
            .any(|p| p.tenant == tenant.tenant_id && p.purge_seq == tenant.purge_seq && p.done);
        if !done {
            purge(context, &tenant.tenant_id, tenant.purge_seq, tenant.generation).await?;
        }
    }
    for purge in recorded.iter().filter(|p| completed(view, p)) {
        let tenant = purge.tenant.clone();
        context.blocking(move |e| e.forget_tenant_purge(&tenant)).await?;
        tracing::info!(tenant = %purge.tenant, "tenant deletion complete; the id may be used again");
    }
    Ok(())
}

/// Whether meta finished the deletion `purge` belongs to: the tenant is gone from the view, or the
/// view shows a later generation of it (created again after every node purged).
fn completed(view: &ClusterView, purge: &TenantPurge) -> bool {
    match view.tenants.get(&purge.tenant) {
        None => true,
        // Being deleted (again, if the sequence is new: `reconcile` purges anew).
        Some(tenant) if tenant.deleting => false,
        Some(tenant) => tenant.generation != 0 && tenant.generation != purge.generation,
    }
}

async fn purge(context: &Context, tenant: &str, purge_seq: u64, generation: u64) -> Result<(), WorkerError> {
    tracing::info!(tenant, purge_seq, "purging a deleted tenant's data");
    let owned = tenant.to_owned();
    context.blocking(move |e| e.begin_tenant_purge(&owned, purge_seq, generation)).await?;
    let mut removed = 0u64;
    for space in PurgeSpace::ALL {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (owned, cursor) = (tenant.to_owned(), after.take());
            let step = context
                .blocking(move |e| e.purge_tenant_step(&owned, space, cursor.as_deref(), SCAN_STEP))
                .await?;
            removed += step.removed;
            match step.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    let owned = tenant.to_owned();
    context.blocking(move |e| e.finish_tenant_purge(&owned, purge_seq, generation)).await?;
    metrics::counter!("pairdb_storage_tenant_purges_total").increment(1);
    tracing::info!(tenant, purge_seq, removed, "deleted tenant purged");
    Ok(())
}
