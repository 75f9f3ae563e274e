//! Marks the storage nodes a migration's end leaves holding records of partitions they no longer
//! own (`pairdb_core::gc::leftovers` decides which). While a marked node has not reported a complete
//! unowned-data deletion from a view at least as recent as its mark, every view says
//! `holds_unowned_data` for it and no storage node collects tombstones: were one collected and the
//! node given the partition back, its values that missed the delete would come back.
//!
//! Two steps inside the transaction that ends the migration: [`announce`] before the changes that
//! end it records the marked nodes' `Node` changes, so no view shows the migration over without the
//! marks; [`LeftoverMarks::stamp`] after them stamps each mark with the revision of the last change
//! so far, so a view that recent includes every ownership change the end made.

use pairdb_core::gc::leftovers::{MigrationEnd, depth_changes, nodes_left_holding};
use pairdb_core::ring::NodeId;

use crate::error::MetaError;
use crate::model::{Migration, MigrationState};
use crate::persistence::{ChangeKind, Tx};

/// The nodes [`announce`] found, to be stamped once the migration's end is recorded.
#[derive(Debug, Default)]
#[must_use = "the marks take effect only once stamped"]
pub struct LeftoverMarks {
    nodes: Vec<NodeId>,
}

/// Step one, before the migration's end is recorded: the nodes a running `migration` ending `end`
/// leaves holding data, with their `Node` changes recorded. Nothing for a migration that never ran
/// (no data moved).
pub async fn announce(
    tx: &mut Tx,
    migration: &Migration,
    end: MigrationEnd,
) -> Result<LeftoverMarks, MetaError> {
    if migration.state != MigrationState::Running || migration.from_epoch == 0 {
        return Ok(LeftoverMarks::default());
    }
    let current = tx.require_topology(migration.from_epoch).await?;
    let pending = if migration.change.kind().changes_ring() && migration.to_epoch != migration.from_epoch {
        Some(tx.require_topology(migration.to_epoch).await?)
    } else {
        None
    };
    let spans = crate::orchestrator::tenant_replications(&tx.list_tenants().await?, migration);
    let mut before = vec![current.assignment.as_ref()];
    before.extend(pending.as_ref().map(|p| p.assignment.as_ref()));
    let after = match (end, &pending) {
        (MigrationEnd::Completed, Some(pending)) => pending.assignment.as_ref(),
        _ => current.assignment.as_ref(),
    };
    let nodes: Vec<NodeId> =
        nodes_left_holding(&before, after, &depth_changes(&spans, end)).into_iter().collect();
    for node in &nodes {
        tx.record_change(ChangeKind::Node, &node.to_string()).await?;
    }
    Ok(LeftoverMarks { nodes })
}

impl LeftoverMarks {
    /// Step two, after the migration's end is recorded: marks the nodes from the last revision so far.
    pub async fn stamp(self, tx: &mut Tx, migration: &Migration) -> Result<(), MetaError> {
        if self.nodes.is_empty() {
            return Ok(());
        }
        let revision = tx.revision();
        tx.mark_leftovers(&self.nodes, revision).await?;
        tracing::info!(
            migration = %migration.migration_id,
            nodes = ?self.nodes,
            revision,
            "nodes left holding data they no longer own; tombstone GC waits until they report deleting it"
        );
        Ok(())
    }
}
