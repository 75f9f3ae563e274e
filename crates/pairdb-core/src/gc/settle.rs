//! When a node may delete data it no longer owns, and when tombstone GC may run at all: functions of
//! a [`ClusterPlacement`] snapshot (what the node's view says about owners), the watch session the
//! view came from, and `now_ms`.
//!
//! Invariants (checked by the unit tests here and the seeded simulation in `tests/gc_simulation.rs`):
//! - unowned data is deleted only after the placement it was judged under has been unchanged, in one
//!   unbroken live watch session, for the whole grace period; any change (another session, topology
//!   epoch, tenant N or N change, a migration) starts the grace over. Placements are compared by value.
//! - nothing is deleted while a migration is pending or without a topology, and no tombstone is
//!   collected from a view that is not live, nor while some node may still hold records of a
//!   partition it stopped owning ([`ClusterPlacement::unowned_leftovers`]);
//! - a tenant the view does not know is never judged unowned.

use std::collections::BTreeSet;

use crate::repair::owned_tenants;
use crate::ring::NodeId;

/// One tenant's replication as the view says it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TenantPlacement {
    pub tenant_id: String,
    pub replication_factor: usize,
    /// While a replication-factor change migrates: the factor it changes from.
    pub previous_replication_factor: Option<usize>,
    /// The tenant is being deleted (its data is purged, not kept).
    pub deleting: bool,
}

impl TenantPlacement {
    /// The deepest N any request may use for the tenant (the old one while N shrinks).
    pub fn depth(&self) -> usize {
        self.replication_factor.max(self.previous_replication_factor.unwrap_or(0))
    }
}

/// What the deletion decisions read of a cluster view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterPlacement {
    /// Epoch of the current topology; `None` without one.
    pub topology_epoch: Option<u64>,
    /// A migration is moving partitions.
    pub migration_pending: bool,
    /// Every tenant the view knows, sorted by id.
    pub tenants: Vec<TenantPlacement>,
    /// Some node stopped owning data in a migration that ended and has not yet reported a complete
    /// unowned-data deletion made from a view that includes that change
    /// ([`super::leftovers`]). Its records missed every delete since; were a tombstone collected
    /// now and the node given the partition back, its stale values would meet no tombstone.
    pub unowned_leftovers: bool,
}

impl ClusterPlacement {
    pub fn new(
        topology_epoch: Option<u64>,
        migration_pending: bool,
        mut tenants: Vec<TenantPlacement>,
    ) -> Self {
        tenants.sort_unstable();
        Self { topology_epoch, migration_pending, tenants, unowned_leftovers: false }
    }

    /// The same placement, with some node still holding records it no longer owns (or none).
    pub fn with_unowned_leftovers(mut self, leftovers: bool) -> Self {
        self.unowned_leftovers = leftovers;
        self
    }

    /// No owner can change under a decision and no former owner holds records that missed deletes:
    /// a topology, no migration, no N change, no unowned leftovers. Tombstone GC (both paths) runs
    /// only then.
    pub fn quiet(&self) -> bool {
        self.topology_epoch.is_some()
            && !self.migration_pending
            && !self.unowned_leftovers
            && self.tenants.iter().all(|t| t.previous_replication_factor.is_none())
    }

    /// Whether tombstone GC (either path) may run from a view of watch session `session` (`None`
    /// while the view is not live): only from a live, quiet view. A node cut off from meta may be
    /// looking at owners that have changed, and would purge a tombstone a new owner never received.
    pub fn tombstone_gc_allowed(&self, session: Option<u64>) -> bool {
        session.is_some() && self.quiet()
    }

    /// Each tenant that is not being deleted with its [`TenantPlacement::depth`] (the shape
    /// [`crate::repair::replica_peers`] and [`owned_tenants`] take).
    pub fn replica_depths(&self) -> Vec<(String, usize)> {
        self.tenants.iter().filter(|t| !t.deleting).map(|t| (t.tenant_id.clone(), t.depth())).collect()
    }

    /// The placement unowned-data deletion waits to see unchanged, from a view of watch session
    /// `session` (`None` while the view is not live): `None` when nothing may be deleted at all.
    pub fn settled(&self, session: Option<u64>) -> Option<SettledPlacement> {
        let session = session?;
        let topology_epoch = self.topology_epoch?;
        if self.migration_pending {
            return None;
        }
        let tenants = self
            .tenants
            .iter()
            .map(|t| (t.tenant_id.clone(), t.replication_factor, t.previous_replication_factor))
            .collect();
        Some(SettledPlacement { session, topology_epoch, tenants })
    }

    /// Which tenants' records in a partition with replica list `list` this node `me` may delete:
    /// those the view knows and `me` no longer replicates.
    pub fn unowned(&self, list: &[NodeId], me: NodeId) -> UnownedTenants {
        let depths = self.replica_depths();
        let owned: BTreeSet<String> =
            owned_tenants(list, me, &depths).into_iter().map(str::to_owned).collect();
        let doomed =
            self.tenants.iter().map(|t| &t.tenant_id).filter(|t| !owned.contains(*t)).cloned().collect();
        UnownedTenants { doomed }
    }
}

/// Tenants whose records a node may delete from one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnownedTenants {
    doomed: BTreeSet<String>,
}

impl UnownedTenants {
    pub fn is_empty(&self) -> bool {
        self.doomed.is_empty()
    }

    /// Whether records of `tenant` go (a tenant the view does not know is kept).
    pub fn drops(&self, tenant: &str) -> bool {
        self.doomed.contains(tenant)
    }
}

/// A placement unowned-data deletion may act on, compared by value (no hashing: two different
/// placements never look the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledPlacement {
    pub session: u64,
    pub topology_epoch: u64,
    tenants: Vec<(String, usize, Option<usize>)>,
}

/// Tracks how long one [`SettledPlacement`] has been seen, with time as input.
#[derive(Debug, Clone)]
pub struct SettleTracker {
    grace_ms: u64,
    seen: Option<(SettledPlacement, u64)>,
}

impl SettleTracker {
    pub fn new(grace_ms: u64) -> Self {
        Self { grace_ms, seen: None }
    }

    /// Records what the view says at `now_ms` (monotonic); returns the placement to act on once it
    /// has been the same for the whole grace period, `None` before that or when it changed.
    pub fn observe(&mut self, placement: Option<SettledPlacement>, now_ms: u64) -> Option<&SettledPlacement> {
        let Some(placement) = placement else {
            self.seen = None;
            return None;
        };
        let fresh = !matches!(&self.seen, Some((seen, _)) if *seen == placement);
        if fresh {
            // First sight of this placement: the grace starts now, even when it is zero.
            self.seen = Some((placement, now_ms));
            return None;
        }
        let (seen, since_ms) = self.seen.as_ref()?;
        (now_ms.saturating_sub(*since_ms) >= self.grace_ms).then_some(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, n: usize, previous: Option<usize>) -> TenantPlacement {
        TenantPlacement {
            tenant_id: id.to_owned(),
            replication_factor: n,
            previous_replication_factor: previous,
            deleting: false,
        }
    }

    fn placement(epoch: u64) -> ClusterPlacement {
        ClusterPlacement::new(Some(epoch), false, vec![tenant("b", 3, None), tenant("a", 1, None)])
    }

    #[test]
    fn nothing_settles_without_a_live_session_a_topology_or_during_a_migration() {
        assert_eq!(placement(1).settled(None), None, "never connected: the view may be stale");
        assert_eq!(ClusterPlacement::default().settled(Some(1)), None, "no topology yet");
        let mut migrating = placement(1);
        migrating.migration_pending = true;
        assert_eq!(migrating.settled(Some(1)), None);
        assert!(placement(1).settled(Some(1)).is_some());
    }

    #[test]
    fn any_change_restarts_the_grace() {
        let base = placement(1).settled(Some(1));
        let mut changed_n = placement(1);
        changed_n.tenants[0].replication_factor = 2;
        let mut changing_n = placement(1);
        changing_n.tenants[0].previous_replication_factor = Some(3);
        let mut new_tenant = placement(1);
        new_tenant.tenants.push(tenant("c", 3, None));
        for other in [
            placement(1).settled(Some(2)),
            placement(2).settled(Some(1)),
            changed_n.settled(Some(1)),
            changing_n.settled(Some(1)),
            new_tenant.settled(Some(1)),
        ] {
            assert_ne!(other, base);
            let mut tracker = SettleTracker::new(100);
            assert_eq!(tracker.observe(base.clone(), 0), None);
            assert_eq!(tracker.observe(base.clone(), 60), None);
            assert_eq!(tracker.observe(other.clone(), 90), None, "changed: starts over");
            assert_eq!(tracker.observe(other.clone(), 150), None, "only 60 ms of the new one");
            assert_eq!(tracker.observe(other.clone(), 190), other.as_ref());
            assert_eq!(tracker.observe(None, 200), None, "the session broke");
            assert_eq!(tracker.observe(other.clone(), 400), None, "back: starts over");
        }
    }

    #[test]
    fn the_grace_is_spent_in_full_even_when_zero() {
        let base = placement(1).settled(Some(1));
        let mut tracker = SettleTracker::new(0);
        assert_eq!(tracker.observe(base.clone(), 5), None, "first sight never acts");
        assert_eq!(tracker.observe(base.clone(), 5), base.as_ref());
        let mut tracker = SettleTracker::new(100);
        assert_eq!(tracker.observe(base.clone(), 0), None);
        assert_eq!(tracker.observe(base.clone(), 99), None);
        assert_eq!(tracker.observe(base.clone(), 100), base.as_ref());
        assert_eq!(tracker.observe(base.clone(), 5000), base.as_ref(), "stays settled");
    }

    #[test]
    fn tombstone_gc_needs_a_live_quiet_view() {
        assert!(placement(1).tombstone_gc_allowed(Some(1)));
        assert!(!placement(1).tombstone_gc_allowed(None), "a stale view may name old owners");
        let mut migrating = placement(1);
        migrating.migration_pending = true;
        assert!(!migrating.tombstone_gc_allowed(Some(1)));
    }

    #[test]
    fn quiet_means_no_owner_can_change() {
        assert!(placement(1).quiet());
        assert!(!ClusterPlacement::default().quiet());
        let mut migrating = placement(1);
        migrating.migration_pending = true;
        assert!(!migrating.quiet());
        let mut changing = placement(1);
        changing.tenants[1].previous_replication_factor = Some(1);
        assert!(!changing.quiet());
        let leftovers = placement(1).with_unowned_leftovers(true);
        assert!(!leftovers.quiet());
        assert!(!leftovers.tombstone_gc_allowed(Some(1)), "a former owner may get the data back");
        assert_eq!(
            leftovers.settled(Some(1)),
            placement(1).settled(Some(1)),
            "leftovers do not hold back the deletion that clears them"
        );
    }

    #[test]
    fn only_known_tenants_this_node_no_longer_replicates_are_dropped() {
        let list = [NodeId(1), NodeId(2), NodeId(3)];
        let mut view = ClusterPlacement::new(
            Some(1),
            false,
            vec![tenant("n1", 1, None), tenant("n3", 3, None), tenant("shrinking", 1, Some(3))],
        );
        view.tenants.push(TenantPlacement { deleting: true, ..tenant("gone", 3, None) });
        let unowned = view.unowned(&list, NodeId(3));
        assert!(unowned.drops("n1"), "position 2 is past N = 1");
        assert!(!unowned.drops("n3"));
        assert!(!unowned.drops("shrinking"), "the old N still counts while N changes");
        assert!(unowned.drops("gone"), "a tenant being deleted is purged");
        assert!(!unowned.drops("unknown"), "a tenant the view does not know is kept");
        assert!(view.unowned(&list, NodeId(1)).drops("gone"));
        assert!(!view.unowned(&list, NodeId(1)).drops("n1"));
        let outsider = view.unowned(&list, NodeId(9));
        assert!(outsider.drops("n3") && outsider.drops("n1"), "not in the list: nothing is owned");
    }
}
