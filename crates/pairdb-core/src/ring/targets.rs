//! The arithmetic the planner works with: per-level targets from weights, zone rules, and the
//! counts and moves on partition-major slot lists. Pure functions of their arguments.

use super::*;

/// Number of zone clashes among the first `prefix` positions of `list` (holes ignored).
pub(super) fn zone_conflicts(list: &[u32], zone_of: &[u32], prefix: usize) -> usize {
    let prefix = &list[..prefix.min(list.len())];
    let mut conflicts = 0;
    for (i, &a) in prefix.iter().enumerate() {
        for &b in &prefix[..i] {
            if a != HOLE && b != HOLE && zone_of[a as usize] == zone_of[b as usize] {
                conflicts += 1;
            }
        }
    }
    conflicts
}

/// The validity rule for a list: no node twice, and the first `prefix` positions in pairwise distinct
/// zones. Exchanged lists are checked with it as a whole; single moves, far more numerous, are checked
/// by `Planner::keeps_rules`, which derives the same rule from what enters and leaves the prefix (a
/// unit test checks the two agree).
pub(super) fn list_is_valid(list: &[u32], zone_of: &[u32], prefix: usize) -> bool {
    let distinct = list.iter().enumerate().all(|(i, &node)| node == HOLE || !list[..i].contains(&node));
    distinct && zone_conflicts(list, zone_of, prefix) == 0
}

/// splitmix64's finalizer: a fixed bijective mix of 64 bits, used only to break ties in a
/// deterministic but irregular order.
pub(super) fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Position of `node` in `list`, if present.
pub(super) fn position(list: &[u32], node: u32) -> Option<usize> {
    list.iter().position(|&slot| slot == node)
}

/// Cumulative level targets: how many of the `(level + 1)·q` slots of the first `level + 1` positions
/// each node should hold. `weights` are the node weights, `lower` the previous level's targets (targets
/// never decrease), `current` the nodes' present level counts (the rounding prefers to leave a node
/// where it is). See step 1 of the module documentation.
pub(super) fn level_targets(
    weights: &[u64],
    partitions: u64,
    level: usize,
    lower: &[u64],
    current: &[u64],
) -> Vec<u64> {
    let n = weights.len();
    let total = (level as u64 + 1) * partitions;
    let cap = partitions;

    // Water-filling: a node whose proportional share exceeds the cap gets the cap, and the others share
    // what remains. The ideal share of node i is `ideal[i] / denominator`.
    let mut capped = vec![false; n];
    let (ideal, denominator) = loop {
        let capped_count = capped.iter().filter(|&&c| c).count() as u128;
        let remaining_total = u128::from(total).saturating_sub(capped_count * u128::from(cap));
        let remaining_weight: u128 =
            weights.iter().zip(&capped).filter(|(_, c)| !**c).map(|(&w, _)| u128::from(w)).sum();
        if remaining_weight == 0 {
            break (vec![u128::from(cap); n], 1);
        }
        let cap_share = u128::from(cap) * remaining_weight;
        let ideal: Vec<u128> = weights
            .iter()
            .zip(&capped)
            .map(|(&w, &c)| if c { cap_share } else { remaining_total * u128::from(w) })
            .collect();
        let mut newly_capped = false;
        for (i, &share) in ideal.iter().enumerate() {
            if !capped[i] && share > cap_share {
                capped[i] = true;
                newly_capped = true;
            }
        }
        if !newly_capped {
            break (ideal, remaining_weight);
        }
    };

    let floor = |i: usize| u64::try_from(ideal[i] / denominator).unwrap_or(cap);
    let mut targets: Vec<u64> = (0..n).map(|i| floor(i).max(lower[i]).min(cap)).collect();
    // Signed distance from the ideal, scaled by the denominator: positive = below the ideal.
    let gap = |i: usize, target: u64| -> i128 {
        let scaled = i128::try_from(u128::from(target) * denominator).unwrap_or(i128::MAX);
        i128::try_from(ideal[i]).unwrap_or(i128::MAX) - scaled
    };
    let mut sum: u64 = targets.iter().sum();
    while sum < total {
        // Largest remainder first, preferring nodes that already hold the extra unit.
        let pick = (0..n).filter(|&i| targets[i] < cap).max_by_key(|&i| {
            let g = gap(i, targets[i]);
            (g > 0, current[i] > targets[i], g, Reverse(i))
        });
        let Some(i) = pick else { break };
        targets[i] += 1;
        sum += 1;
    }
    while sum > total {
        // Only reachable when `lower` forced targets up: take back from the most-above-ideal node.
        let pick = (0..n).filter(|&i| targets[i] > lower[i]).max_by_key(|&i| {
            let g = gap(i, targets[i]);
            (g < 0, current[i] < targets[i], -g, i)
        });
        let Some(i) = pick else { break };
        targets[i] -= 1;
        sum -= 1;
    }
    targets
}

/// Brings `incoming` up to position `level` of `partition` from `from` (a later position, or
/// [`ABSENT`]). `to` is where the chain ends: `incoming`'s old position, a hole, or `width` (past the
/// end). A swap sends the occupant of `level` to `to`; a rotation shifts positions `level..to` down
/// by one instead, so each of them loses exactly one level. Whatever is pushed past the end leaves
/// the list.
#[derive(Debug, Clone, Copy)]
pub(super) struct Move {
    pub(super) partition: usize,
    pub(super) level: usize,
    pub(super) incoming: u32,
    pub(super) from: usize,
    pub(super) to: usize,
    pub(super) rotate: bool,
}

/// Applies `mv` to `list` (the slots only).
pub(super) fn shift(list: &mut [u32], mv: &Move) {
    let outgoing = list[mv.level];
    if mv.rotate {
        let last = mv.to.min(list.len() - 1);
        list.copy_within(mv.level..last, mv.level + 1);
    } else if mv.to < list.len() {
        list[mv.to] = outgoing;
    }
    list[mv.level] = mv.incoming;
}

/// Each node's zone index, and how many leading list positions must hold distinct zones (0 unless
/// every node names a zone and there are at least two).
pub(super) fn zone_indexes(nodes: &[&NodeSpec], list_len: usize) -> (Vec<u32>, usize) {
    let node_count = nodes.len();
    let mut zone_names: BTreeMap<&str, u32> = BTreeMap::new();
    let mut zone_of = Vec::with_capacity(node_count);
    for node in nodes {
        if let Some(zone) = &node.zone {
            let next = u32::try_from(zone_names.len()).unwrap_or(u32::MAX);
            zone_of.push(*zone_names.entry(zone.as_str()).or_insert(next));
        }
    }
    if zone_of.len() == node_count && zone_names.len() >= 2 {
        (zone_of, zone_names.len().min(list_len))
    } else {
        (vec![0; node_count], 0)
    }
}

/// The starting slots: each partition's previous list (node indexes, `HOLE` for departed nodes)
/// widened to `width`, with nodes that now break the zone rule evicted.
pub(super) fn inherit_slots(
    previous: &[u32],
    previous_width: usize,
    partitions: usize,
    width: usize,
    zone_of: &[u32],
    zone_prefix: usize,
) -> Vec<u32> {
    let mut slots = vec![HOLE; partitions * width];
    if previous_width == 0 {
        return slots;
    }
    for (list, old) in slots.chunks_exact_mut(width).zip(previous.chunks_exact(previous_width)) {
        list[..previous_width].copy_from_slice(old);
        // An inherited list may break the zone rule (zones changed): evict the later of two
        // clashing nodes; its slot is refilled like any hole.
        for i in 0..zone_prefix.min(width) {
            let node = list[i];
            let clashes = |&other: &u32| other != HOLE && zone_of[other as usize] == zone_of[node as usize];
            if node != HOLE && list[..i].iter().any(clashes) {
                list[i] = HOLE;
            }
        }
    }
    slots
}

/// `counts[level * node_count + node]`: how many lists hold `node` at or above `level`.
pub(super) fn level_counts(slots: &[u32], width: usize, list_len: usize, node_count: usize) -> Vec<i64> {
    let mut counts = vec![0i64; list_len * node_count];
    for list in slots.chunks_exact(width) {
        for (position, &node) in list.iter().enumerate().take(list_len) {
            if node != HOLE {
                for level in position..list_len {
                    counts[level * node_count + node as usize] += 1;
                }
            }
        }
    }
    counts
}

/// Each level's per-node target count, laid out like [`level_counts`].
pub(super) fn all_level_targets(
    weights: &[u64],
    partitions: usize,
    list_len: usize,
    counts: &[i64],
) -> Vec<i64> {
    let node_count = weights.len();
    let mut targets = Vec::with_capacity(list_len * node_count);
    let mut lower = vec![0u64; node_count];
    for level in 0..list_len {
        let current: Vec<u64> = counts[level * node_count..(level + 1) * node_count]
            .iter()
            .map(|&c| u64::try_from(c).unwrap_or(0))
            .collect();
        let level_target = level_targets(weights, partitions as u64, level, &lower, &current);
        targets.extend(level_target.iter().map(|&t| i64::try_from(t).unwrap_or(i64::MAX)));
        lower = level_target;
    }
    targets
}
