//! What ending a migration does, in one place: the table of what completing and what abandoning
//! (cancelling, failing) each kind of migration does to the node or tenant it changed, and the one
//! function that applies it inside the caller's transaction.
//!
//! | kind | completed | abandoned |
//! |---|---|---|
//! | add_node | joining → active | joining → removed |
//! | drain_node, remove_node | leaving → removed | leaving → active |
//! | replication_factor | the new N stays; the old one is forgotten | the old N is restored |
//! | node_weight | the new weight stays | the old weight is restored |
//!
//! Invariant: every row changes the node or tenant only if it is still in the state the migration
//! left it in (a node removed meanwhile, or a tenant whose N was changed again, is left alone), so
//! applying an ending twice, or after an operator's own change, does nothing.

use pairdb_core::ring::NodeId;

use crate::error::MetaError;
use crate::model::{Membership, Migration, MigrationChange};
use crate::persistence::{ChangeKind, Tx};

/// How a migration ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    /// Cancelled by an operator or failed: what the migration changed is undone.
    Abandoned,
}

/// The change an ending makes to the migration's node or tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The node moves from `from` to `to` (only if it is still `from`).
    Membership {
        node_id: NodeId,
        from: Membership,
        to: Membership,
    },
    /// The node's weight goes back to `restore` (only if it still has `migrated_to` and was not
    /// removed).
    RestoreWeight {
        node_id: NodeId,
        migrated_to: u64,
        restore: u32,
    },
    /// The tenant's replication-factor change ends: with `revert`, the previous N comes back (only
    /// if N is still `migrated_to`); otherwise the previous N is forgotten.
    EndReplicationChange {
        tenant_id: String,
        revert: bool,
        migrated_to: u64,
    },
    Nothing,
}

/// The table (see the module docs).
pub fn settlement(change: &MigrationChange, ending: Ending) -> Settlement {
    let membership = |node_id, from, to| Settlement::Membership { node_id, from, to };
    match (change, ending) {
        (MigrationChange::AddNode { node_id, .. }, Ending::Completed) => {
            membership(*node_id, Membership::Joining, Membership::Active)
        }
        (MigrationChange::AddNode { node_id, .. }, Ending::Abandoned) => {
            membership(*node_id, Membership::Joining, Membership::Removed)
        }
        (
            MigrationChange::DrainNode { node_id } | MigrationChange::RemoveNode { node_id },
            Ending::Completed,
        ) => membership(*node_id, Membership::Leaving, Membership::Removed),
        (
            MigrationChange::DrainNode { node_id } | MigrationChange::RemoveNode { node_id },
            Ending::Abandoned,
        ) => membership(*node_id, Membership::Leaving, Membership::Active),
        (MigrationChange::ReplicationFactor { tenant_id, to, .. }, ending) => {
            Settlement::EndReplicationChange {
                tenant_id: tenant_id.clone(),
                revert: ending == Ending::Abandoned,
                migrated_to: u64::from(*to),
            }
        }
        (MigrationChange::NodeWeight { .. }, Ending::Completed) => Settlement::Nothing,
        (MigrationChange::NodeWeight { node_id, from, to }, Ending::Abandoned) => Settlement::RestoreWeight {
            node_id: *node_id,
            migrated_to: u64::from(*to),
            restore: (*from).max(1),
        },
    }
}

/// Applies `migration`'s ending to its node or tenant in `tx`, recording the change for watchers.
/// The topology epochs and the migration row are the caller's.
pub(crate) async fn settle(
    tx: &mut Tx,
    migration: &Migration,
    ending: Ending,
    now: u64,
) -> Result<(), MetaError> {
    match settlement(&migration.change, ending) {
        Settlement::Membership { node_id, from, to } => {
            if let Some(mut node) = tx.get_node(node_id).await?
                && node.membership == from
            {
                node.membership = to;
                node.updated_at_ms = now;
                tx.update_node(&node).await?;
                tx.record_change(ChangeKind::Node, &node.node_id.to_string()).await?;
            }
        }
        Settlement::RestoreWeight { node_id, migrated_to, restore } => {
            if let Some(mut node) = tx.get_node(node_id).await?
                && u64::from(node.weight) == migrated_to
                && node.membership != Membership::Removed
            {
                node.weight = restore;
                node.updated_at_ms = now;
                tx.update_node(&node).await?;
                tx.record_change(ChangeKind::Node, &node.node_id.to_string()).await?;
            }
        }
        Settlement::EndReplicationChange { tenant_id, revert, migrated_to } => {
            if let Some(mut tenant) = tx.get_tenant(&tenant_id).await?
                && let Some(previous) = tenant.previous_replication_factor
            {
                if revert {
                    if u64::from(tenant.replication_factor) != migrated_to {
                        return Ok(());
                    }
                    tenant.replication_factor = previous;
                }
                tenant.previous_replication_factor = None;
                tenant.updated_at_ms = now;
                tx.update_tenant(&tenant).await?;
                tx.record_change(ChangeKind::Tenant, &tenant.tenant_id).await?;
            }
        }
        Settlement::Nothing => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MigrationKind, MigrationRow};

    fn migration(kind: MigrationKind) -> MigrationChange {
        let row = MigrationRow { kind, node_id: 7, tenant_id: "t", old_value: 3, new_value: 5 };
        MigrationChange::from_row(row)
    }

    #[test]
    fn completing_and_abandoning_each_kind() {
        use Membership::{Active, Joining, Leaving, Removed};
        let node = |from, to| Settlement::Membership { node_id: NodeId(7), from, to };
        let cases = [
            (MigrationKind::AddNode, Ending::Completed, node(Joining, Active)),
            (MigrationKind::AddNode, Ending::Abandoned, node(Joining, Removed)),
            (MigrationKind::DrainNode, Ending::Completed, node(Leaving, Removed)),
            (MigrationKind::DrainNode, Ending::Abandoned, node(Leaving, Active)),
            (MigrationKind::RemoveNode, Ending::Completed, node(Leaving, Removed)),
            (MigrationKind::RemoveNode, Ending::Abandoned, node(Leaving, Active)),
            (
                MigrationKind::ReplicationFactor,
                Ending::Completed,
                Settlement::EndReplicationChange { tenant_id: "t".into(), revert: false, migrated_to: 5 },
            ),
            (
                MigrationKind::ReplicationFactor,
                Ending::Abandoned,
                Settlement::EndReplicationChange { tenant_id: "t".into(), revert: true, migrated_to: 5 },
            ),
            (MigrationKind::NodeWeight, Ending::Completed, Settlement::Nothing),
            (
                MigrationKind::NodeWeight,
                Ending::Abandoned,
                Settlement::RestoreWeight { node_id: NodeId(7), migrated_to: 5, restore: 3 },
            ),
        ];
        for (kind, ending, expected) in cases {
            assert_eq!(settlement(&migration(kind), ending), expected, "{kind:?} {ending:?}");
        }
    }
}
