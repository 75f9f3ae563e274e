//! Which storage nodes a migration's end leaves holding records of partitions they no longer own.
//!
//! A node that stops owning a tenant's partition keeps its records until its unowned-data deletion
//! runs ([`super::settle`]), and those records miss every delete made after. Were a tombstone
//! collected meanwhile and the node then given the partition back (a migration reversed, N grown
//! again), its stale values would meet no tombstone, and the transfer or anti-entropy would bring
//! deleted data back. So meta marks every node [`nodes_left_holding`] names when a migration
//! completes or is abandoned, each marked node reports the change-log revision of the view its
//! last complete unowned-data deletion ran from, and while a marked node has not reported one at
//! or past the mark, views say [`super::ClusterPlacement::unowned_leftovers`] and no tombstone is
//! collected anywhere.
//!
//! Invariant: every node that could hold records of some (partition, tenant) before the end — an
//! owner under any list in force (current or pending) at the deepest N in force — and does not own
//! it after is named. Naming too many only delays tombstone GC; naming too few can bring deleted
//! data back.

use std::collections::BTreeSet;

use crate::repair::TenantSpan;
use crate::ring::{Assignment, NodeId};

/// How a migration ended, which decides the N each tenant has after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationEnd {
    /// The pending topology and the new N are in force.
    Completed,
    /// Failed or cancelled: the current topology and the old N stay.
    Abandoned,
}

/// The distinct (depth before, depth after) pairs of `spans` for a migration that ended `end`:
/// before, any N in force during the migration (the deeper of old and new); after, the N in force.
pub fn depth_changes(spans: &[TenantSpan], end: MigrationEnd) -> BTreeSet<(usize, usize)> {
    spans
        .iter()
        .map(|span| {
            let after = match end {
                MigrationEnd::Completed => span.new_n,
                MigrationEnd::Abandoned => span.old_n,
            };
            (span.old_n.max(span.new_n), after)
        })
        .collect()
}

/// The nodes that held some partition under one of the `before` lists at a tenant's depth before
/// and are not among its first depth-after entries of `after`'s list. `before` holds the lists in
/// force while the migration ran (current and, if any, pending), all with `after`'s partition count.
pub fn nodes_left_holding(
    before: &[&Assignment],
    after: &Assignment,
    depth_changes: &BTreeSet<(usize, usize)>,
) -> BTreeSet<NodeId> {
    debug_assert!(before.iter().all(|b| b.partition_count() == after.partition_count()));
    let mut left = BTreeSet::new();
    for (partition, after_list) in after.lists() {
        for &(depth_before, depth_after) in depth_changes {
            let owners_after = &after_list[..depth_after.min(after_list.len())];
            for list in before {
                let held = list.preference_list(partition, depth_before);
                left.extend(held.iter().filter(|node| !owners_after.contains(node)));
            }
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{PartitionCount, PartitionId};

    fn assignment(lists: &[&[u32]]) -> Assignment {
        assignment_of(lists.iter().map(|l| l.to_vec()).collect())
    }

    fn assignment_of(lists: Vec<Vec<u32>>) -> Assignment {
        let partitions = PartitionCount::new(lists.len() as u32).unwrap();
        let lists = lists.into_iter().map(|l| l.into_iter().map(NodeId).collect()).collect();
        Assignment::from_lists(partitions, lists).unwrap()
    }

    fn span(old_n: usize, new_n: usize) -> TenantSpan {
        TenantSpan { tenant_id: format!("t{old_n}{new_n}"), old_n, new_n }
    }

    fn ids(nodes: &[u32]) -> BTreeSet<NodeId> {
        nodes.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn a_completed_move_names_the_displaced_owners() {
        let current = assignment(&[&[1, 2, 3, 4], &[2, 3, 4, 1]]);
        let pending = assignment(&[&[1, 2, 5, 3], &[2, 3, 4, 1]]);
        let depths = depth_changes(&[span(3, 3)], MigrationEnd::Completed);
        assert_eq!(nodes_left_holding(&[&current, &pending], &pending, &depths), ids(&[3]));
        let n1 = depth_changes(&[span(1, 1)], MigrationEnd::Completed);
        assert!(nodes_left_holding(&[&current, &pending], &pending, &n1).is_empty(), "first replicas stay");
    }

    #[test]
    fn an_abandoned_move_names_the_nodes_that_were_gaining() {
        let current = assignment(&[&[1, 2, 3, 4], &[2, 3, 4, 1]]);
        let pending = assignment(&[&[1, 2, 5, 3], &[2, 3, 4, 1]]);
        let depths = depth_changes(&[span(3, 3)], MigrationEnd::Abandoned);
        assert_eq!(nodes_left_holding(&[&current, &pending], &current, &depths), ids(&[5]));
    }

    #[test]
    fn replication_factor_changes_name_the_positions_past_the_n_in_force() {
        let lists = assignment(&[&[1, 2, 3, 4], &[2, 3, 4, 1]]);
        let shrunk = depth_changes(&[span(3, 1)], MigrationEnd::Completed);
        assert_eq!(nodes_left_holding(&[&lists], &lists, &shrunk), ids(&[2, 3, 4]));
        let growth_abandoned = depth_changes(&[span(1, 2)], MigrationEnd::Abandoned);
        assert_eq!(nodes_left_holding(&[&lists], &lists, &growth_abandoned), ids(&[2, 3]));
        let grown = depth_changes(&[span(1, 2)], MigrationEnd::Completed);
        assert!(nodes_left_holding(&[&lists], &lists, &grown).is_empty(), "growing loses nothing");
    }

    #[test]
    fn nothing_is_left_without_tenants_or_without_a_change() {
        let lists = assignment(&[&[1, 2, 3], &[2, 3, 1]]);
        assert!(nodes_left_holding(&[&lists], &lists, &BTreeSet::new()).is_empty());
        let depths = depth_changes(&[span(3, 3), span(1, 1)], MigrationEnd::Completed);
        assert!(nodes_left_holding(&[&lists, &lists], &lists, &depths).is_empty());
    }

    /// Against the definition, tenant by tenant, over many small random assignments.
    #[test]
    fn matches_the_per_tenant_definition() {
        let mut state = 0x5EED_u64;
        let mut next = |bound: u64| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        for _ in 0..500 {
            let mut random_lists = |len: usize| -> Vec<Vec<u32>> {
                (0..4)
                    .map(|_| {
                        let mut nodes: Vec<u32> = (1..=6).collect();
                        for i in (1..nodes.len()).rev() {
                            nodes.swap(i, next(i as u64 + 1) as usize);
                        }
                        nodes.truncate(len);
                        nodes
                    })
                    .collect()
            };
            let (current, pending) = (assignment_of(random_lists(4)), assignment_of(random_lists(4)));
            let spans: Vec<TenantSpan> =
                (0..3).map(|_| span(1 + next(4) as usize, 1 + next(4) as usize)).collect();
            for end in [MigrationEnd::Completed, MigrationEnd::Abandoned] {
                let after = if end == MigrationEnd::Completed { &pending } else { &current };
                let got = nodes_left_holding(&[&current, &pending], after, &depth_changes(&spans, end));
                let mut want = BTreeSet::new();
                for p in 0..4 {
                    let p = PartitionId(p);
                    for s in &spans {
                        let deepest = s.old_n.max(s.new_n);
                        let n_after = if end == MigrationEnd::Completed { s.new_n } else { s.old_n };
                        let kept = after.preference_list(p, n_after);
                        for list in [&current, &pending] {
                            for node in list.preference_list(p, deepest) {
                                if !kept.contains(node) {
                                    want.insert(*node);
                                }
                            }
                        }
                    }
                }
                assert_eq!(got, want);
            }
        }
    }
}
