//! Decisions that let a node remove data: when a tombstone's placement still names its owners.
//!
//! A delete acknowledged by every owner may be purged early (after the grace period, without waiting
//! for anti-entropy) only if the owners that acknowledged it are still the owners. The router stamps
//! the delete with the placement it was written under ([`stable_placement`]); a storage node purges
//! only while [`placement_holds`]. Both read the same [`PlacementView`], so the rule is written once.
//!
//! [`tombstones`] decides when a tombstone-only record may be removed, [`settle`] when data a node
//! no longer owns may be deleted and when GC may run at all, [`leftovers`] which nodes a migration's
//! end leaves holding records they no longer own (tombstone GC waits for their cleanup).
//!
//! Invariant: a placement holds only in a view where [`stable_placement`] would stamp exactly it, so
//! any topology change, pending migration or replication-factor change since the delete blocks the
//! purge (the tombstone then waits for anti-entropy, which is always safe).

pub mod leftovers;
pub mod settle;
pub mod tombstones;

pub use settle::{ClusterPlacement, SettleTracker, SettledPlacement, TenantPlacement, UnownedTenants};
pub use tombstones::{Confirmation, ConfirmedVerdict, RecordState};

/// Where a delete was placed when every owner acknowledged it: the topology epoch and the tenant's N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TombstonePlacement {
    pub topology_epoch: u64,
    pub replication_factor: u32,
}

/// What placement decisions need to know of a cluster view, for one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementView {
    /// The epoch of the current topology; `None` without one.
    pub topology_epoch: Option<u64>,
    /// A migration is moving partitions (a pending topology exists).
    pub migration_pending: bool,
    /// The tenant's settings; `None` if the view does not know the tenant.
    pub tenant: Option<TenantReplication>,
}

/// A tenant's replication factor and whether it is changing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantReplication {
    pub replication_factor: usize,
    /// A replication-factor change is migrating.
    pub changing: bool,
}

/// The placement to stamp on a delete written in `view`: `None` while owners may change under it
/// (no topology, a migration pending, the tenant unknown or its N changing).
pub fn stable_placement(view: &PlacementView) -> Option<TombstonePlacement> {
    let topology_epoch = view.topology_epoch?;
    let tenant = view.tenant?;
    if view.migration_pending || tenant.changing {
        return None;
    }
    Some(TombstonePlacement {
        topology_epoch,
        replication_factor: u32::try_from(tenant.replication_factor).unwrap_or(u32::MAX),
    })
}

/// Whether a full-ack confirmation made under `placement` still names the key's owners in `view`.
pub fn placement_holds(view: &PlacementView, placement: TombstonePlacement) -> bool {
    stable_placement(view) == Some(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views() -> Vec<PlacementView> {
        let mut out = Vec::new();
        for topology_epoch in [None, Some(1), Some(2)] {
            for migration_pending in [false, true] {
                for tenant in [
                    None,
                    Some(TenantReplication { replication_factor: 3, changing: false }),
                    Some(TenantReplication { replication_factor: 3, changing: true }),
                    Some(TenantReplication { replication_factor: 5, changing: false }),
                ] {
                    out.push(PlacementView { topology_epoch, migration_pending, tenant });
                }
            }
        }
        out
    }

    #[test]
    fn a_placement_holds_only_in_a_view_that_would_stamp_it() {
        for written in views() {
            let Some(placement) = stable_placement(&written) else { continue };
            for now in views() {
                let same_owners = now.topology_epoch == written.topology_epoch
                    && !now.migration_pending
                    && now.tenant == written.tenant;
                assert_eq!(placement_holds(&now, placement), same_owners, "{written:?} then {now:?}");
            }
        }
    }

    #[test]
    fn nothing_is_stamped_while_owners_may_change() {
        for view in views() {
            let stable = view.topology_epoch.is_some()
                && !view.migration_pending
                && view.tenant.is_some_and(|t| !t.changing);
            assert_eq!(stable_placement(&view).is_some(), stable, "{view:?}");
        }
    }
}
