//! Pure decisions of data movement and repair: which node must receive which tenants of a partition
//! in a migration (and from whom), which tenants two replicas of a partition share, and which keys
//! two replicas' digests disagree on. No IO, no clock: the storage node and meta run the effects.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use crate::ring::NodeId;

/// A tenant's replication factor before and after a migration (equal unless it changes N).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSpan {
    pub tenant_id: String,
    pub old_n: usize,
    pub new_n: usize,
}

/// One transfer of a partition: `target` must receive `tenant_ids`, pulled from the first of
/// `sources` that answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTransfer {
    pub target: NodeId,
    /// The target's position in the new list (for reporting).
    pub position: usize,
    pub tenant_ids: Vec<String>,
    /// Old replicas holding these tenants: first those holding all of them (in list order), then
    /// those holding some of them. Never contains the target.
    pub sources: Vec<NodeId>,
}

/// The transfers that take one partition from `old_list` to `new_list`: a node receives tenant T when
/// it is in the first `T.new_n` positions of the new list but not in the first `T.old_n` of the old.
/// Ordered by position in the new list; empty when nothing is gained.
pub fn partition_transfers(
    old_list: &[NodeId],
    new_list: &[NodeId],
    tenants: &[TenantSpan],
) -> Vec<PartitionTransfer> {
    let old_position = |node: NodeId| old_list.iter().position(|&n| n == node);
    let mut transfers = Vec::new();
    for (position, &target) in new_list.iter().enumerate() {
        let held_before = old_position(target);
        let gained: Vec<&TenantSpan> = tenants
            .iter()
            .filter(|t| position < t.new_n && held_before.is_none_or(|old| old >= t.old_n))
            .collect();
        if gained.is_empty() {
            continue;
        }
        let min_old_n = gained.iter().map(|t| t.old_n).min().unwrap_or(0);
        let max_old_n = gained.iter().map(|t| t.old_n).max().unwrap_or(0);
        let candidates = old_list.iter().enumerate().filter(|&(_, &node)| node != target);
        let mut sources: Vec<NodeId> =
            candidates.clone().filter(|&(p, _)| p < min_old_n).map(|(_, &node)| node).collect();
        sources.extend(candidates.filter(|&(p, _)| p >= min_old_n && p < max_old_n).map(|(_, &node)| node));
        transfers.push(PartitionTransfer {
            target,
            position,
            tenant_ids: gained.iter().map(|t| t.tenant_id.clone()).collect(),
            sources,
        });
    }
    transfers
}

/// The tenants `node` replicates in a partition with list `list`: those whose N exceeds its
/// position. `tenants` pairs each tenant with its N.
pub fn owned_tenants<'a>(list: &[NodeId], node: NodeId, tenants: &'a [(String, usize)]) -> Vec<&'a str> {
    match list.iter().position(|&n| n == node) {
        Some(position) => tenants.iter().filter(|(_, n)| position < *n).map(|(t, _)| t.as_str()).collect(),
        None => Vec::new(),
    }
}

/// The other replicas `node` compares a partition with, each with the tenants both must hold (N above
/// both positions). Peers sharing no tenant are left out.
pub fn replica_peers(
    list: &[NodeId],
    node: NodeId,
    tenants: &[(String, usize)],
) -> Vec<(NodeId, Vec<String>)> {
    let Some(own) = list.iter().position(|&n| n == node) else { return Vec::new() };
    list.iter()
        .enumerate()
        .filter(|&(position, _)| position != own)
        .filter_map(|(position, &peer)| {
            let deepest = own.max(position);
            let shared: Vec<String> =
                tenants.iter().filter(|(_, n)| deepest < *n).map(|(t, _)| t.clone()).collect();
            (!shared.is_empty()).then_some((peer, shared))
        })
        .collect()
}

/// One key's digest on one replica.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyDigest {
    pub tenant_id: String,
    pub key: String,
    pub digest: u64,
}

/// Where two replicas' digests of the same key range disagree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DigestDiff {
    /// Keys whose digests differ, or that one side lacks: (tenant, key), sorted.
    pub differing: Vec<(String, String)>,
    /// Keys compared (the union of both sides).
    pub compared: usize,
}

/// Compares two digest lists restricted to `tenants` (both sorted by (tenant, key) or not: they are
/// sorted here).
pub fn compare_digests(local: &[KeyDigest], remote: &[KeyDigest], tenants: &BTreeSet<String>) -> DigestDiff {
    let keep = |d: &&KeyDigest| tenants.contains(&d.tenant_id);
    let mut local: Vec<&KeyDigest> = local.iter().filter(keep).collect();
    let mut remote: Vec<&KeyDigest> = remote.iter().filter(keep).collect();
    let by_key = |a: &&KeyDigest, b: &&KeyDigest| (&a.tenant_id, &a.key).cmp(&(&b.tenant_id, &b.key));
    local.sort_by(by_key);
    remote.sort_by(by_key);
    let mut diff = DigestDiff::default();
    let (mut i, mut j) = (0, 0);
    while i < local.len() || j < remote.len() {
        diff.compared += 1;
        let order = match (local.get(i), remote.get(j)) {
            (Some(a), Some(b)) => by_key(a, b),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                diff.differing.push((local[i].tenant_id.clone(), local[i].key.clone()));
                i += 1;
            }
            Ordering::Greater => {
                diff.differing.push((remote[j].tenant_id.clone(), remote[j].key.clone()));
                j += 1;
            }
            Ordering::Equal => {
                if local[i].digest != remote[j].digest {
                    diff.differing.push((local[i].tenant_id.clone(), local[i].key.clone()));
                }
                i += 1;
                j += 1;
            }
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[u32]) -> Vec<NodeId> {
        ids.iter().copied().map(NodeId).collect()
    }

    fn span(tenant: &str, old_n: usize, new_n: usize) -> TenantSpan {
        TenantSpan { tenant_id: tenant.into(), old_n, new_n }
    }

    #[test]
    fn a_new_node_receives_the_positions_it_takes_over() {
        // Node 4 replaces node 2 at position 1.
        let transfers = partition_transfers(&nodes(&[1, 2, 3, 4]), &nodes(&[1, 4, 3, 2]), &[span("a", 3, 3)]);
        assert_eq!(transfers.len(), 1);
        assert_eq!(transfers[0].target, NodeId(4));
        assert_eq!(transfers[0].position, 1);
        assert_eq!(transfers[0].tenant_ids, vec!["a".to_owned()]);
        assert_eq!(transfers[0].sources, nodes(&[1, 2, 3]));
    }

    #[test]
    fn raising_n_copies_only_that_tenant_to_the_new_positions() {
        let list = nodes(&[1, 2, 3, 4, 5]);
        let transfers = partition_transfers(&list, &list, &[span("a", 3, 5), span("b", 3, 3)]);
        let targets: Vec<NodeId> = transfers.iter().map(|t| t.target).collect();
        assert_eq!(targets, nodes(&[4, 5]));
        assert!(transfers.iter().all(|t| t.tenant_ids == vec!["a".to_owned()]));
        assert_eq!(transfers[0].sources, nodes(&[1, 2, 3]));
        // Lowering N moves nothing.
        assert!(partition_transfers(&list, &list, &[span("a", 5, 3)]).is_empty());
    }

    #[test]
    fn sources_holding_every_tenant_come_first() {
        let transfers =
            partition_transfers(&nodes(&[1, 2, 3]), &nodes(&[4, 2, 3]), &[span("a", 1, 1), span("b", 3, 3)]);
        assert_eq!(transfers[0].target, NodeId(4));
        assert_eq!(transfers[0].sources, nodes(&[1, 2, 3]));
        let only_b =
            partition_transfers(&nodes(&[1, 2, 3]), &nodes(&[1, 2, 4]), &[span("a", 1, 1), span("b", 3, 3)]);
        assert_eq!(only_b[0].tenant_ids, vec!["b".to_owned()]);
        assert_eq!(only_b[0].sources, nodes(&[1, 2, 3]));
    }

    #[test]
    fn peers_share_the_tenants_deep_enough_for_both() {
        let tenants = vec![("three".to_owned(), 3), ("five".to_owned(), 5)];
        let list = nodes(&[1, 2, 3, 4, 5]);
        let peers = replica_peers(&list, NodeId(1), &tenants);
        assert_eq!(peers.len(), 4);
        assert_eq!(peers[0], (NodeId(2), vec!["three".to_owned(), "five".to_owned()]));
        assert_eq!(peers[3], (NodeId(5), vec!["five".to_owned()]));
        assert_eq!(owned_tenants(&list, NodeId(4), &tenants), vec!["five"]);
        assert!(replica_peers(&list, NodeId(9), &tenants).is_empty());
    }

    #[test]
    fn digest_comparison_finds_missing_and_changed_keys() {
        let d = |t: &str, k: &str, digest| KeyDigest { tenant_id: t.into(), key: k.into(), digest };
        let local = vec![d("a", "1", 1), d("a", "2", 2), d("b", "9", 9), d("a", "4", 4)];
        let remote = vec![d("a", "2", 3), d("a", "3", 3), d("a", "1", 1), d("a", "4", 4)];
        let tenants: BTreeSet<String> = ["a".to_owned()].into();
        let diff = compare_digests(&local, &remote, &tenants);
        assert_eq!(diff.differing, vec![("a".into(), "2".into()), ("a".into(), "3".into())]);
        assert_eq!(diff.compared, 4);
    }
}
