//! Tenant usage and quotas.
//!
//! Every few seconds each storage node reports, in a heartbeat, its *share* of every tenant's usage:
//! the records of the partitions it is first in the current topology's list of, so every record is
//! counted by one node, once (not once per replica). Meta keeps each node's latest report
//! (`tenant_usage`, replaced as a whole; [`crate::persistence::Store::record_usage`]). A tenant's
//! usage ([`Meta::tenant_usage`], `GetTenantUsage`) is the sum of the shares of the nodes in the
//! current topology; rows of nodes that left it are ignored. It is as old as the oldest report
//! summed, and partial while some node of the topology has not reported. The epoch a report was
//! counted under is not checked: right after a topology change, until every node reported under the
//! new one, a partition whose first node changed may be counted twice or not at all.
//!
//! The leader evaluates the quotas every [`EVALUATION_INTERVAL`] (and at once after a quota
//! changed): a tenant whose keys reach `max_keys` is over its key quota, one whose value bytes reach
//! `max_bytes` over its byte quota. A verdict that changes is written to the tenant row with a
//! change-log row under the metadata lock, so the watch stream pushes it (`TenantConfig`) to routers
//! and storage nodes, whose write coordinators enforce it. The verdict is recomputed from scratch
//! each time: a quota raised or removed, or a tenant that shrank, clears it at the next evaluation.
//!
//! Enforcement therefore lags the data by up to a report interval, plus this evaluation, plus the
//! watch push; quotas are a bound on a tenant's growth, not an exact limit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_service::shutdown::Shutdown;

use crate::admin::{Meta, ring_nodes};
use crate::error::MetaError;
use crate::model::{Tenant, TenantState, Usage, UsageShare, UsageTotal};
use crate::persistence::{ChangeKind, LeaderFence};

/// How often the leader evaluates the quotas without being woken.
pub const EVALUATION_INTERVAL: Duration = Duration::from_secs(1);

/// The tenants' usages as of one reading: the coverage is the same for every tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// `usage` is zero here; see [`Totals::of`].
    pub coverage: UsageTotal,
    pub by_tenant: BTreeMap<String, Usage>,
}

impl Totals {
    /// Sums the `shares` of the nodes in `ring` (the current topology's) that reported
    /// (`reports`: node → when it last did), ignoring every other node's.
    pub fn sum(ring: &BTreeSet<NodeId>, reports: &[(NodeId, u64)], shares: &[UsageShare]) -> Totals {
        let reporting: BTreeMap<NodeId, u64> =
            reports.iter().copied().filter(|(node, at)| *at > 0 && ring.contains(node)).collect();
        let mut by_tenant: BTreeMap<String, Usage> = BTreeMap::new();
        for share in shares.iter().filter(|share| reporting.contains_key(&share.node_id)) {
            let total = by_tenant.entry(share.tenant_id.clone()).or_default();
            *total = saturating_add(*total, share.usage);
        }
        let coverage = UsageTotal {
            usage: Usage::default(),
            reported_at_ms: reporting.values().copied().min().unwrap_or(0),
            nodes_reporting: u32::try_from(reporting.len()).unwrap_or(u32::MAX),
            nodes_total: u32::try_from(ring.len()).unwrap_or(u32::MAX),
        };
        Totals { coverage, by_tenant }
    }

    /// `tenant_id`'s usage (zero when no reporting node holds any of it).
    pub fn of(&self, tenant_id: &str) -> UsageTotal {
        UsageTotal { usage: self.by_tenant.get(tenant_id).copied().unwrap_or_default(), ..self.coverage }
    }
}

fn saturating_add(a: Usage, b: Usage) -> Usage {
    Usage {
        keys: a.keys.saturating_add(b.keys),
        value_bytes: a.value_bytes.saturating_add(b.value_bytes),
        siblings: a.siblings.saturating_add(b.siblings),
        tombstones: a.tombstones.saturating_add(b.tombstones),
    }
}

/// Whether `usage` puts `tenant` over its key quota and over its byte quota (a quota of 0 is none;
/// reaching a quota is being over it: the next write that grows the tenant would pass it).
pub fn verdict(tenant: &Tenant, usage: &Usage) -> (bool, bool) {
    (
        tenant.max_keys != 0 && usage.keys >= tenant.max_keys,
        tenant.max_bytes != 0 && usage.value_bytes >= tenant.max_bytes,
    )
}

/// A tenant whose over-quota flags the evaluation changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagChange {
    pub tenant_id: String,
    pub over_key_quota: bool,
    pub over_byte_quota: bool,
    pub usage: Usage,
    pub max_keys: u64,
    pub max_bytes: u64,
}

/// What one evaluation found.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Every tenant (those being deleted too), with its usage.
    pub totals: BTreeMap<String, Usage>,
    pub changes: Vec<FlagChange>,
}

impl Meta {
    /// `tenant_id` (with its quotas and flags) and its usage now.
    pub async fn tenant_usage(&self, tenant_id: &str) -> Result<(Tenant, UsageTotal), MetaError> {
        pairdb_core::validation::validate_tenant_id(tenant_id)
            .map_err(|_| MetaError::InvalidTenantId(tenant_id.to_owned()))?;
        let mut tx = self.read().await?;
        let tenant =
            tx.get_tenant(tenant_id).await?.ok_or_else(|| MetaError::TenantNotFound(tenant_id.to_owned()))?;
        let ring = ring_nodes(&mut tx).await?;
        let reports = tx.usage_reports().await?;
        let shares = tx.usage_shares(Some(tenant_id)).await?;
        tx.commit().await?;
        Ok((tenant, Totals::sum(&ring, &reports, &shares).of(tenant_id)))
    }

    /// Leader: evaluates every active tenant's quotas once and publishes the verdicts that changed.
    pub async fn evaluate_quotas(&self, fence: LeaderFence) -> Result<Evaluation, MetaError> {
        let (tenants, totals) = {
            let mut tx = self.read().await?;
            let tenants = tx.list_tenants().await?;
            let ring = ring_nodes(&mut tx).await?;
            let reports = tx.usage_reports().await?;
            let shares = tx.usage_shares(None).await?;
            tx.commit().await?;
            (tenants, Totals::sum(&ring, &reports, &shares))
        };
        let changed: Vec<&Tenant> = tenants
            .iter()
            .filter(|tenant| tenant.state == TenantState::Active)
            .filter(|tenant| {
                verdict(tenant, &totals.of(&tenant.tenant_id).usage)
                    != (tenant.over_key_quota, tenant.over_byte_quota)
            })
            .collect();
        let mut changes = Vec::new();
        if !changed.is_empty() {
            let (mut tx, _) = self.write().await?;
            tx.check_leader(fence).await?;
            for tenant in changed {
                // Again under the lock: an operator may have changed the quotas since the reading.
                let Some(tenant) =
                    tx.get_tenant(&tenant.tenant_id).await?.filter(|t| t.state == TenantState::Active)
                else {
                    continue;
                };
                let usage = totals.of(&tenant.tenant_id).usage;
                let (over_key_quota, over_byte_quota) = verdict(&tenant, &usage);
                if (over_key_quota, over_byte_quota) == (tenant.over_key_quota, tenant.over_byte_quota) {
                    continue;
                }
                tx.set_quota_flags(&tenant.tenant_id, over_key_quota, over_byte_quota).await?;
                tx.record_change(ChangeKind::Tenant, &tenant.tenant_id).await?;
                changes.push(FlagChange {
                    tenant_id: tenant.tenant_id,
                    over_key_quota,
                    over_byte_quota,
                    usage,
                    max_keys: tenant.max_keys,
                    max_bytes: tenant.max_bytes,
                });
            }
            tx.commit().await?;
        }
        for change in &changes {
            tracing::info!(
                tenant = %change.tenant_id,
                over_key_quota = change.over_key_quota,
                over_byte_quota = change.over_byte_quota,
                keys = change.usage.keys,
                max_keys = change.max_keys,
                value_bytes = change.usage.value_bytes,
                max_bytes = change.max_bytes,
                "tenant quota verdict changed"
            );
        }
        let totals = tenants
            .iter()
            .map(|tenant| (tenant.tenant_id.clone(), totals.of(&tenant.tenant_id).usage))
            .collect();
        Ok(Evaluation { totals, changes })
    }
}

/// Leader: evaluates the quotas every [`EVALUATION_INTERVAL`] or when woken
/// ([`Meta::quota_wake`]), and keeps the per-tenant usage gauges.
pub async fn run(meta: Meta, fence: LeaderFence, mut stop: Shutdown) {
    let mut labelled: BTreeSet<String> = BTreeSet::new();
    loop {
        match meta.evaluate_quotas(fence).await {
            Ok(evaluation) => publish(&evaluation.totals, &mut labelled),
            Err(error) => tracing::debug!(%error, "quota evaluation failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(EVALUATION_INTERVAL) => {}
            () = meta.quota_wake().notified() => {}
            _ = stop.wait() => return,
        }
    }
}

/// Sets the per-tenant gauges; a tenant gone since the last pass is set to zero once (the exporter
/// cannot forget a label set).
fn publish(totals: &BTreeMap<String, Usage>, labelled: &mut BTreeSet<String>) {
    let gone: Vec<String> = labelled.iter().filter(|tenant| !totals.contains_key(*tenant)).cloned().collect();
    for tenant in gone {
        set_gauges(&tenant, Usage::default());
        labelled.remove(&tenant);
    }
    for (tenant, usage) in totals {
        set_gauges(tenant, *usage);
        labelled.insert(tenant.clone());
    }
}

fn set_gauges(tenant: &str, usage: Usage) {
    let tenant = tenant.to_owned();
    metrics::gauge!("pairdb_meta_tenant_keys", "tenant" => tenant.clone()).set(usage.keys as f64);
    metrics::gauge!("pairdb_meta_tenant_value_bytes", "tenant" => tenant.clone())
        .set(usage.value_bytes as f64);
    metrics::gauge!("pairdb_meta_tenant_siblings", "tenant" => tenant.clone()).set(usage.siblings as f64);
    metrics::gauge!("pairdb_meta_tenant_tombstones", "tenant" => tenant).set(usage.tombstones as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(node: u32, tenant: &str, keys: u64, bytes: u64) -> UsageShare {
        UsageShare {
            node_id: NodeId(node),
            tenant_id: tenant.to_owned(),
            usage: Usage { keys, value_bytes: bytes, siblings: keys, tombstones: 1 },
            reported_at_ms: 0,
        }
    }

    #[test]
    fn shares_of_the_current_topologys_reporting_nodes_are_summed() {
        let ring: BTreeSet<NodeId> = [1, 2, 3].into_iter().map(NodeId).collect();
        // Node 3 never reported; node 4 left the topology (its rows stay until forgotten).
        let reports = [(NodeId(1), 5_000), (NodeId(2), 4_000), (NodeId(4), 9_000)];
        let shares = [
            share(1, "a", 10, 100),
            share(2, "a", 5, 50),
            share(4, "a", 1_000, 1_000),
            share(2, "b", 1, 1),
            share(3, "b", 7, 7),
        ];
        let totals = Totals::sum(&ring, &reports, &shares);
        let a = totals.of("a");
        assert_eq!(a.usage, Usage { keys: 15, value_bytes: 150, siblings: 15, tombstones: 2 });
        assert_eq!((a.reported_at_ms, a.nodes_reporting, a.nodes_total), (4_000, 2, 3));
        assert_eq!(a.age_ms(4_500), 500);
        assert_eq!(totals.of("b").usage.keys, 1, "node 3 has not reported: its row does not count");
        assert_eq!(totals.of("c"), UsageTotal { usage: Usage::default(), ..a }, "no share is zero");

        let nothing = Totals::sum(&BTreeSet::new(), &reports, &shares).of("a");
        assert_eq!(nothing, UsageTotal::default());
        assert_eq!(nothing.age_ms(4_500), 0, "no report has no age");
        let huge = [share(1, "a", u64::MAX, 1), share(2, "a", 1, 1)];
        assert_eq!(Totals::sum(&ring, &reports, &huge).of("a").usage.keys, u64::MAX, "saturates");
    }

    #[test]
    fn a_quota_is_reached_at_its_value_and_zero_is_none() {
        let tenant = |max_keys, max_bytes| Tenant {
            tenant_id: "t".into(),
            replication_factor: 1,
            previous_replication_factor: None,
            default_consistency: pairdb_core::quorum::Consistency::Quorum,
            conflict_mode: Default::default(),
            key_groups: Default::default(),
            rate_limit_ops_per_sec: 0,
            rate_limit_burst: 0,
            max_value_bytes: 1,
            max_siblings: 1,
            strict_quorum: false,
            max_keys,
            max_bytes,
            over_key_quota: false,
            over_byte_quota: false,
            default_ttl_ms: 0,
            max_ttl_ms: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            state: TenantState::Active,
            generation: 1,
            purge_seq: 0,
        };
        let usage = |keys, value_bytes| Usage { keys, value_bytes, ..Usage::default() };
        assert_eq!(verdict(&tenant(0, 0), &usage(u64::MAX, u64::MAX)), (false, false));
        assert_eq!(verdict(&tenant(10, 100), &usage(9, 99)), (false, false));
        assert_eq!(verdict(&tenant(10, 100), &usage(10, 99)), (true, false));
        assert_eq!(verdict(&tenant(10, 100), &usage(3, 100)), (false, true));
        assert_eq!(verdict(&tenant(10, 0), &usage(11, 1 << 40)), (true, false));
    }
}
