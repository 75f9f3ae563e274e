//! Placement: which storage nodes hold each partition, and in which order.
//!
//! An [`Assignment`] gives each of the Q partitions an ordered list of `L = min(MAX_LIST_LEN, nodes)`
//! distinct nodes. A tenant with replication factor N keeps a partition on the first N nodes of its
//! list (its preference list); the rest are fallbacks. What decides where data lives is therefore
//! *membership in the first N positions*, for every N at once. Below, "level k" means the first
//! k + 1 positions, and a node's level-k count is the number of lists holding it there.
//!
//! [`Assignment::compute`] is a pure, deterministic function of the previous assignment, the node set
//! (ids, weights, zones) and Q: no randomness, no clock, no map iteration order. Balance comes from
//! counting, not from luck (Dynamo's "strategy 3" with computed instead of random tokens).
//!
//! # Algorithm
//!
//! 1. **Targets.** Node i's level-k target is its share `(k + 1)·Q·w_i / W` of the `(k + 1)·Q` level-k
//!    slots, rounded by largest remainder (ties by node id) so that the targets sum to exactly
//!    `(k + 1)·Q`; the per-position quota is the difference between consecutive levels, so every
//!    node's count is within 1 of its ideal for every N at once. A node fits once per list, so a
//!    share above Q is capped at Q and the rest shared among the others by weight ("capped" nodes:
//!    a weight above 1/L of the total, or every node at the last level when n ≤ 7). Targets never
//!    decrease from one level to the next. When recomputing, the rounding gives the extra unit
//!    preferably to nodes that already hold it, so nothing moves just to chase rounding noise.
//! 2. **Start** from the previous lists (or empty ones). Departed nodes leave holes, and so do nodes
//!    whose zone now clashes with an earlier one. New trailing positions (L grew) are holes; positions
//!    beyond a shrunken L are an overflow dropped at the end.
//! 3. **Levels in order**, k = 0..L. Work on level k touches positions ≥ k only, so a settled level
//!    stays settled. Per level:
//!    - *Fill* every hole at position k with the node furthest below its level-k target (and, among
//!      equals, below its targets for the deeper levels it will also cover) that is not already in
//!      the first k positions: a node from outside the list, or one pulled up from further down,
//!      whose old slot becomes the hole.
//!    - *Balance* in one pass: where the occupant b of position k is above target, hand the slot to
//!      the node X furthest below target that can take it: X swaps with b (b goes to X's old
//!      position, or out of the list), or X moves up and the positions in between shift down by one
//!      (a rotation: each of them loses exactly one level). X never comes from an earlier position,
//!      and at every level one membership moves from one node to exactly one other.
//!    - *Augmenting paths* for what no single move fixes: b hands a slot to c1, c1 hands one of its
//!      slots to c2, ..., to X; the nodes in between keep their counts (breadth-first search).
//!    - *Exchanges*, in a fresh computation without zones: Kempe chains between two lists (as in
//!      bipartite edge colouring) that keep every position's counts, for when every list with b at
//!      position k already holds X. By König's edge-colouring theorem a list set meeting every
//!      per-position quota exists; these reach it when the targets leave little slack.
//! 4. **Rules.** Every fill and move must keep two rules, or at least not make them worse: the zone
//!    rule (below), and the cap rule: a node capped at level m is among the first m + 1 of every list,
//!    so a list may not fall so far behind that its missing capped nodes no longer fit.
//! 5. **Ties** between otherwise equal nodes go to a fixed pseudo-random order per partition
//!    (splitmix64 of partition and node id). A plain rotation by partition would make lists cyclic
//!    runs of neighbours, and a departing node could then only be replaced by its few successors
//!    without moving other data.
//!
//! # Minimal movement
//!
//! A move is *costly* when it gives a node a membership (at some level) that it did not have in the
//! previous assignment, at the expense of a membership that was there before or that belongs to a
//! joining node; otherwise it is *free*: it gives a node back what it had, or passes on a membership
//! that an existing node took over from a departed one in this computation. Free moves are preferred.
//! A costly move may give an existing node a new membership only when that node is at least 2 below
//! its target and its target is at least 2 above what it held before; anything this computation took
//! from it must be given back by free moves. (Joining nodes, and filling holes, are not restricted.)
//!
//! # Zones
//!
//! Zone rules apply only when *every* node names a zone (a partly zoned cluster is treated as
//! unzoned). With Z distinct zones, positions `0..min(Z, L)` of every list are in pairwise distinct
//! zones, so with three or more zones the first three replicas sit in three zones. A hole is always
//! fillable validly (some zone is missing from the prefix, and none of its nodes sits above the hole),
//! so the rule always holds. Balance and minimal movement come second to it: a zone must supply one
//! of the first `min(Z, L)` replicas of every list whatever its weight, so the nodes of a small zone
//! hold more than their weight's share of those positions, and when a zone shrinks its remaining
//! nodes must take over, which can cost a few moves beyond the departed node's own memberships.
//!
//! # Laws (checked by `tests/ring.rs`)
//!
//! - *Shape*: every list has exactly `min(MAX_LIST_LEN, nodes)` distinct nodes of the node set.
//! - *Determinism*: equal inputs give equal assignments, whatever order the nodes are listed in.
//! - *Exact balance of a fresh computation without zones*: for every N, each node's first-N count is
//!   its target (floor or ceil of its capped share `N·Q·w/W`), whatever the weights. With zones of
//!   equal weight, within 1 of it in our checks; with unequal zones, as close as the zone rule allows.
//! - *Adding a node* (nothing else changing, no new zone, previous assignment on target): only the
//!   newcomer gains first-N memberships, for every N, and each is lost by exactly one other node.
//!   Shares only shrink when a node joins, so no existing node's target grows, and the gate above
//!   never lets one gain.
//! - *Removing a node*: each of its first-N memberships is taken over by exactly one other node. With
//!   equal weights and no zones (and, in our randomised checks, whenever no weight reaches 1/L of the
//!   total) no other membership changes; with capped weights the others' targets shift, and with
//!   zones the shrunk zone's duty shifts, so the balance step may also move some of their data.
//! - *Balance of a recomputation*: counts end within 1 of target in the common case (always, in our
//!   checks, with equal weights and no zones); with unequal weights the deepest levels are best effort
//!   when some node belongs in nearly every list. The add law is never traded for balance.

use crate::reason::{HasReason, Reason};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use crate::token::{PartitionCount, PartitionId};

/// Length of the longest list: the highest replication factor a tenant may use.
pub const MAX_LIST_LEN: usize = 7;

/// Marks an empty slot in the planner's working lists.
const HOLE: u32 = u32::MAX;

/// Stands for "not in the list" when comparing positions.
const ABSENT: usize = usize::MAX;

/// Identity of a storage node, stable for the node's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A storage node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: NodeId,
    /// Relative capacity: a node of weight 2 holds twice the partitions of a node of weight 1, at
    /// every list position. Must be at least 1.
    pub weight: u32,
    /// Failure domain. Only honoured when every node has one.
    pub zone: Option<String>,
}

impl NodeSpec {
    /// A node without a zone.
    pub fn new(id: NodeId, weight: u32) -> Self {
        Self { id, weight, zone: None }
    }

    /// The same node in `zone`.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }
}

/// Why an assignment could not be computed or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the node set is empty: an assignment needs at least one storage node")]
    NoNodes,
    #[error("node {0} appears more than once in the node set")]
    DuplicateNode(NodeId),
    #[error("node {0} has weight 0: weights must be at least 1 (remove the node instead)")]
    ZeroWeight(NodeId),
    #[error("expected {expected} partitions, got {actual}")]
    PartitionCountMismatch { expected: u32, actual: usize },
    #[error("invalid list for partition {partition}: {problem}")]
    InvalidList { partition: PartitionId, problem: &'static str },
}

impl HasReason for RingError {
    /// Stable machine-readable code, for metrics and the API's error table.
    fn reason(&self) -> Reason {
        match self {
            Self::NoNodes => Reason::NoNodes,
            Self::DuplicateNode(_) => Reason::DuplicateNode,
            Self::ZeroWeight(_) => Reason::ZeroWeight,
            Self::PartitionCountMismatch { .. } => Reason::PartitionCountMismatch,
            Self::InvalidList { .. } => Reason::InvalidList,
        }
    }
}

/// One ordered list of distinct nodes per partition, all of the same length (at most
/// [`MAX_LIST_LEN`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    partitions: PartitionCount,
    list_len: usize,
    /// Partition-major: the list of partition p is `slots[p * list_len..(p + 1) * list_len]`.
    slots: Vec<NodeId>,
}

impl Assignment {
    /// The assignment for `nodes`, moving as little as balance allows away from `previous` (see the
    /// module documentation for the algorithm and its laws).
    pub fn compute(
        previous: Option<&Assignment>,
        nodes: &[NodeSpec],
        partitions: PartitionCount,
    ) -> Result<Assignment, RingError> {
        if nodes.is_empty() {
            return Err(RingError::NoNodes);
        }
        if let Some(node) = nodes.iter().find(|node| node.weight == 0) {
            return Err(RingError::ZeroWeight(node.id));
        }
        let mut sorted: Vec<&NodeSpec> = nodes.iter().collect();
        sorted.sort_by_key(|node| node.id);
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0].id == pair[1].id) {
            return Err(RingError::DuplicateNode(pair[0].id));
        }
        if let Some(previous) = previous
            && previous.partitions != partitions
        {
            return Err(RingError::PartitionCountMismatch {
                expected: partitions.get(),
                actual: previous.partitions.get() as usize,
            });
        }

        let mut planner = Planner::new(previous, &sorted, partitions);
        planner.run();
        let ids: Vec<NodeId> = sorted.iter().map(|node| node.id).collect();
        planner.into_assignment(&ids, partitions)
    }

    /// An assignment from explicit lists (for example one loaded from the metadata store), validated:
    /// one list per partition, every list non-empty, at most [`MAX_LIST_LEN`] long, of the same length
    /// as the others and without repeated nodes.
    pub fn from_lists(partitions: PartitionCount, lists: Vec<Vec<NodeId>>) -> Result<Assignment, RingError> {
        if lists.len() != partitions.get() as usize {
            return Err(RingError::PartitionCountMismatch {
                expected: partitions.get(),
                actual: lists.len(),
            });
        }
        let list_len = lists.first().map_or(0, Vec::len);
        let mut slots = Vec::with_capacity(lists.len() * list_len);
        for (partition, list) in partitions.partitions().zip(lists) {
            let invalid = |problem| RingError::InvalidList { partition, problem };
            if list.is_empty() {
                return Err(invalid("the list is empty"));
            }
            if list.len() > MAX_LIST_LEN {
                return Err(invalid("the list is longer than MAX_LIST_LEN (7)"));
            }
            if list.len() != list_len {
                return Err(invalid("the list's length differs from partition 0's"));
            }
            if list.iter().enumerate().any(|(i, node)| list[..i].contains(node)) {
                return Err(invalid("a node appears twice in the list"));
            }
            slots.extend(list);
        }
        Ok(Assignment { partitions, list_len, slots })
    }

    /// Q, the number of partitions.
    pub fn partition_count(&self) -> PartitionCount {
        self.partitions
    }

    /// Length of every list: `min(MAX_LIST_LEN, nodes)` for a computed assignment.
    pub fn list_len(&self) -> usize {
        self.list_len
    }

    /// The whole ordered list of `partition` (empty for a partition outside `0..Q`).
    pub fn list(&self, partition: PartitionId) -> &[NodeId] {
        let start = partition.0 as usize * self.list_len;
        self.slots.get(start..start + self.list_len).unwrap_or(&[])
    }

    /// The nodes holding `partition` for a tenant with replication factor `n`: the first
    /// `min(n, list_len)` entries of its list.
    pub fn preference_list(&self, partition: PartitionId, n: usize) -> &[NodeId] {
        let list = self.list(partition);
        &list[..n.min(list.len())]
    }

    /// The rest of the list after the first `n`: where a tenant with replication factor `n` sends
    /// hinted writes when preferred replicas are down.
    pub fn fallbacks(&self, partition: PartitionId, n: usize) -> &[NodeId] {
        let list = self.list(partition);
        &list[n.min(list.len())..]
    }

    /// Every partition with its list, in partition order.
    pub fn lists(&self) -> impl Iterator<Item = (PartitionId, &[NodeId])> {
        self.partitions.partitions().zip(self.slots.chunks_exact(self.list_len.max(1)))
    }

    /// Every node that appears in some list.
    pub fn nodes(&self) -> BTreeSet<NodeId> {
        self.slots.iter().copied().collect()
    }

    /// Number of lists whose first `n` entries contain `node`: how many partitions the node stores for
    /// a tenant with replication factor `n`.
    pub fn memberships(&self, node: NodeId, n: usize) -> usize {
        self.lists().filter(|(_, list)| list[..n.min(list.len())].contains(&node)).count()
    }
}

/// One slot whose occupant differs between two assignments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub partition: PartitionId,
    /// Position in the list (0 = first replica).
    pub position: usize,
    /// The old occupant; `None` when the old list was shorter.
    pub from: Option<NodeId>,
    pub to: NodeId,
}

/// Every (partition, position) of `new` whose occupant differs from `old`'s, ordered by partition
/// then position. Positions that exist only in `old` (the lists got shorter) are not transfers: the
/// data there is simply no longer needed. Partitions are matched by index; a partition missing from
/// `old` shows every position as a transfer with `from: None`.
pub fn diff(old: &Assignment, new: &Assignment) -> Vec<Transfer> {
    let mut transfers = Vec::new();
    for (partition, new_list) in new.lists() {
        let old_list = old.list(partition);
        for (position, &to) in new_list.iter().enumerate() {
            let from = old_list.get(position).copied();
            if from != Some(to) {
                transfers.push(Transfer { partition, position, from, to });
            }
        }
    }
    transfers
}

/// The (partition, node) pairs where `node` is in the first `n` entries of `new`'s list but was not
/// in the first `n` of `old`'s: the partitions each node must receive data for, for tenants with
/// replication factor `n`. Ordered by partition, then by position in `new`.
pub fn gained_memberships(old: &Assignment, new: &Assignment, n: usize) -> Vec<(PartitionId, NodeId)> {
    let mut gained = Vec::new();
    for (partition, _) in new.lists() {
        let before = old.preference_list(partition, n);
        for &node in new.preference_list(partition, n) {
            if !before.contains(&node) {
                gained.push((partition, node));
            }
        }
    }
    gained
}

/// Number of zone clashes among the first `prefix` positions of `list` (holes ignored).
fn zone_conflicts(list: &[u32], zone_of: &[u32], prefix: usize) -> usize {
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
fn list_is_valid(list: &[u32], zone_of: &[u32], prefix: usize) -> bool {
    let distinct = list.iter().enumerate().all(|(i, &node)| node == HOLE || !list[..i].contains(&node));
    distinct && zone_conflicts(list, zone_of, prefix) == 0
}

/// splitmix64's finalizer: a fixed bijective mix of 64 bits, used only to break ties in a
/// deterministic but irregular order.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Position of `node` in `list`, if present.
fn position(list: &[u32], node: u32) -> Option<usize> {
    list.iter().position(|&slot| slot == node)
}

/// Cumulative level targets: how many of the `(level + 1)·q` slots of the first `level + 1` positions
/// each node should hold. `weights` are the node weights, `lower` the previous level's targets (targets
/// never decrease), `current` the nodes' present level counts (the rounding prefers to leave a node
/// where it is). See step 1 of the module documentation.
fn level_targets(weights: &[u64], partitions: u64, level: usize, lower: &[u64], current: &[u64]) -> Vec<u64> {
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

/// Working state of one [`Assignment::compute`]. Nodes are referred to by their index in the
/// id-sorted node set.
struct Planner {
    /// Node ids by index.
    ids: Vec<u32>,
    partitions: usize,
    node_count: usize,
    /// L of the result.
    list_len: usize,
    /// Width of the working lists: `max(L, previous L)`; positions ≥ L are dropped at the end.
    width: usize,
    /// Partition-major working lists, `width` slots each, [`HOLE`] for empty.
    slots: Vec<u32>,
    /// The previous lists mapped to node indices (departed nodes as [`HOLE`]), `previous_width` each;
    /// empty for a fresh computation.
    previous: Vec<u32>,
    previous_width: usize,
    /// Whether a node was in the previous assignment (a joining node may gain anything).
    was_member: Vec<bool>,
    zone_of: Vec<u32>,
    /// Positions `0..zone_prefix` must be in distinct zones (0 when zones are not in force).
    zone_prefix: usize,
    /// `targets[m * node_count + i]`: node i's level-m target.
    targets: Vec<i64>,
    /// `counts[m * node_count + i]`: lists currently holding node i in their first m + 1 positions.
    counts: Vec<i64>,
    /// `entitled[m * node_count + i]`: node i's level-m target is at least 2 above its count in the
    /// previous assignment, so it may be given memberships it did not have (see `gate_allows`).
    entitled: Vec<bool>,
    /// `capped[m]`: nodes whose level-m target is Q, so every list must hold them in its first m + 1
    /// positions (weights above 1/L of the total, and everyone at the last level when n ≤ 7).
    capped: Vec<Vec<u32>>,
}

/// Preference among the candidates for a hole, highest first: fewest zone clashes, fewest capped
/// nodes squeezed out, free, below target at every level it would cover (and by how much: the
/// smallest of those deficits), deficit at the hole's level, tie-break.
type FillKey = (Reverse<usize>, Reverse<usize>, bool, bool, i64, i64, Reverse<u64>);

/// Preference among the candidates for an above-target node's slot, highest first: free, deficit,
/// tie-break.
type BalanceKey = (bool, i64, Reverse<u64>);

/// Brings `incoming` up to position `level` of `partition` from `from` (a later position, or
/// [`ABSENT`]). `to` is where the chain ends: `incoming`'s old position, a hole, or `width` (past the
/// end). A swap sends the occupant of `level` to `to`; a rotation shifts positions `level..to` down
/// by one instead, so each of them loses exactly one level. Whatever is pushed past the end leaves
/// the list.
#[derive(Debug, Clone, Copy)]
struct Move {
    partition: usize,
    level: usize,
    incoming: u32,
    from: usize,
    to: usize,
    rotate: bool,
}

/// Applies `mv` to `list` (the slots only).
fn shift(list: &mut [u32], mv: &Move) {
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
fn zone_indexes(nodes: &[&NodeSpec], list_len: usize) -> (Vec<u32>, usize) {
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
fn inherit_slots(
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
fn level_counts(slots: &[u32], width: usize, list_len: usize, node_count: usize) -> Vec<i64> {
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
fn all_level_targets(weights: &[u64], partitions: usize, list_len: usize, counts: &[i64]) -> Vec<i64> {
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

impl Planner {
    fn new(previous: Option<&Assignment>, nodes: &[&NodeSpec], partitions: PartitionCount) -> Self {
        let node_count = nodes.len();
        let partitions = partitions.get() as usize;
        let list_len = node_count.min(MAX_LIST_LEN);
        let index: BTreeMap<NodeId, u32> = nodes.iter().zip(0u32..).map(|(node, i)| (node.id, i)).collect();

        let (zone_of, zone_prefix) = zone_indexes(nodes, list_len);
        let previous_width = previous.map_or(0, |p| p.list_len);
        let width = list_len.max(previous_width);
        let mut was_member = vec![false; node_count];
        let previous: Vec<u32> = previous
            .map(|p| {
                p.slots
                    .iter()
                    .map(|id| match index.get(id) {
                        Some(&i) => {
                            was_member[i as usize] = true;
                            i
                        }
                        None => HOLE,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let slots = inherit_slots(&previous, previous_width, partitions, width, &zone_of, zone_prefix);

        let counts = level_counts(&slots, width, list_len, node_count);
        let weights: Vec<u64> = nodes.iter().map(|node| u64::from(node.weight)).collect();
        let targets = all_level_targets(&weights, partitions, list_len, &counts);
        let previous_counts = if previous_width > 0 {
            level_counts(&previous, previous_width, list_len, node_count)
        } else {
            vec![0i64; list_len * node_count]
        };
        let entitled = targets.iter().zip(&previous_counts).map(|(&t, &c)| t >= c + 2).collect();
        let capped = (0..list_len)
            .map(|level| {
                let capped: Vec<u32> = (0..node_count as u32)
                    .filter(|&i| targets[level * node_count + i as usize] >= partitions as i64)
                    .collect();
                // Every node capped means every list holds every node (n = L): the list's shape
                // already says so, and checking it would only cost time.
                if capped.len() == node_count { Vec::new() } else { capped }
            })
            .collect();

        Self {
            ids: nodes.iter().map(|node| node.id.0).collect(),
            partitions,
            node_count,
            list_len,
            width,
            slots,
            previous,
            previous_width,
            was_member,
            zone_of,
            zone_prefix,
            targets,
            counts,
            entitled,
            capped,
        }
    }

    fn run(&mut self) {
        for level in 0..self.list_len {
            self.fill_level(level);
            self.balance_level(level);
            self.augment_level(level);
            // Exchanges move data between lists, so only a fresh computation may use them; with zones
            // the targets are often unreachable anyway and the search would only burn time.
            if self.previous_width == 0 && self.zone_prefix == 0 {
                self.exchange_level(level);
            }
        }
    }

    /// How far node `node` is below its level-`level` target (negative: above).
    fn deficit(&self, level: usize, node: u32) -> i64 {
        let at = level * self.node_count + node as usize;
        self.targets[at] - self.counts[at]
    }

    fn list(&self, partition: usize) -> &[u32] {
        &self.slots[partition * self.width..(partition + 1) * self.width]
    }

    /// The previous position of `node` in `partition`'s list ([`ABSENT`] if it was not there).
    fn previous_position(&self, partition: usize, node: u32) -> usize {
        if self.previous_width == 0 {
            return ABSENT;
        }
        let start = partition * self.previous_width;
        position(&self.previous[start..start + self.previous_width], node).unwrap_or(ABSENT)
    }

    /// Tie-break among otherwise equal nodes: a fixed pseudo-random order per partition, from the
    /// node's id (stable when other nodes come and go). A plain rotation would make every list a
    /// cyclic run of neighbours, and then a departing node could only be replaced by its few
    /// successors without moving other data.
    fn tie_break(&self, node: u32, partition: usize) -> u64 {
        mix64((partition as u64) << 32 | u64::from(self.ids[node as usize]))
    }

    /// The moves that bring `incoming` up to position `level` of `partition`, where it currently sits
    /// at `from` (> level, or [`ABSENT`]). The chain ends at `incoming`'s position, or for an absent
    /// node at the first hole below `level` (or past the end of the list, dropping the last node).
    /// Both shapes are offered: a swap, and (when there is something in between) a rotation.
    fn moves(&self, partition: usize, level: usize, incoming: u32, from: usize) -> [Option<Move>; 2] {
        let list = self.list(partition);
        let to = if from != ABSENT {
            from
        } else {
            (level + 1..self.width).find(|&j| list[j] == HOLE).unwrap_or(self.width)
        };
        let base = Move { partition, level, incoming, from, to, rotate: false };
        let gapless = (level + 1..to.min(self.width)).all(|j| list[j] != HOLE);
        let rotation =
            (to > level + 1 && gapless && list[level] != HOLE).then_some(Move { rotate: true, ..base });
        [Some(base), rotation]
    }

    /// The list of `partition` after `mv`.
    fn moved_list(&self, mv: &Move) -> [u32; MAX_LIST_LEN] {
        let mut buffer = [HOLE; MAX_LIST_LEN];
        buffer[..self.width].copy_from_slice(self.list(mv.partition));
        shift(&mut buffer[..self.width], mv);
        buffer
    }

    /// Whether `mv` gives `incoming` a membership it did not have at some level m it touches, at the
    /// expense of one that was there before (the loser was among the previous first m + 1, or the
    /// slot is a hole being filled) or that belongs to a joining node. Otherwise the move is free: it
    /// gives a node back what it had, or passes on a membership that some existing node took over
    /// from a departed one in this computation.
    fn is_costly(&self, mv: &Move) -> bool {
        if self.previous_width == 0 {
            return false;
        }
        let list = self.list(mv.partition);
        let incoming_before = self.previous_position(mv.partition, mv.incoming);
        if incoming_before <= mv.level {
            // It had every touched level before: it only gets back what it had.
            return false;
        }
        let end = mv.to.min(self.list_len).min(incoming_before);
        let takes_from = |loser: u32, m: usize| {
            loser == HOLE
                || !self.was_member[loser as usize]
                || self.previous_position(mv.partition, loser) <= m
        };
        if mv.rotate {
            (mv.level..end).any(|m| takes_from(list[m], m))
        } else {
            // The same loser at every level: what matters is its earliest previous level.
            mv.level < end && takes_from(list[mv.level], end - 1)
        }
    }

    /// The minimal-movement gate: a costly move may give an existing node a membership it did not
    /// have only when that node is at least 2 below target *and* its target is at least 2 above what
    /// it held in the previous assignment. The first condition ignores rounding noise; the second
    /// means a node never gains data just because this computation displaced it: that must be undone
    /// by free moves. When a node joins, no other node's target rises by 2 (shares only shrink), so
    /// only the newcomer gains.
    fn gate_allows(&self, mv: &Move, costly: bool, terminal: bool) -> bool {
        let at = mv.level * self.node_count + mv.incoming as usize;
        !costly
            || !self.was_member[mv.incoming as usize]
            || (terminal && self.deficit(mv.level, mv.incoming) >= 2 && self.entitled[at])
    }

    /// Applies `mv`, keeping the level counts in step.
    fn apply(&mut self, mv: &Move) {
        let n = self.node_count;
        let row = mv.partition * self.width;
        let gained_end = if mv.from == ABSENT { self.list_len } else { mv.from.min(self.list_len) };
        for m in mv.level..gained_end {
            self.counts[m * n + mv.incoming as usize] += 1;
        }
        for m in mv.level..mv.to.min(self.list_len) {
            let loser = self.slots[row + if mv.rotate { m } else { mv.level }];
            if loser != HOLE {
                self.counts[m * n + loser as usize] -= 1;
            }
        }
        shift(&mut self.slots[row..row + self.width], mv);
    }

    /// How far `list` is from being completable once its first `level + 1` positions are fixed: zone
    /// clashes in the zone-distinct prefix, and capped nodes that no longer fit (a node capped at
    /// level m must be among the first m + 1, and only positions `level + 1..=m` are still open).
    /// Every fill and move must keep this at zero, or at least not make it worse.
    fn violations(&self, list: &[u32], level: usize) -> (usize, usize) {
        let clashes = zone_conflicts(list, &self.zone_of, self.zone_prefix);
        let fixed = &list[..=level];
        let mut shortfall = 0;
        for (m, capped) in self.capped.iter().enumerate().skip(level) {
            let missing = capped.iter().filter(|node| !fixed.contains(node)).count();
            shortfall += missing.saturating_sub(m - level);
        }
        (clashes, shortfall)
    }

    fn rules_matter(&self, level: usize) -> bool {
        level < self.zone_prefix || self.capped[level..].iter().any(|c| !c.is_empty())
    }

    /// [`Self::violations`] of `partition`'s list as it stands (zero when no rule applies at `level`).
    fn violations_now(&self, partition: usize, level: usize) -> (usize, usize) {
        if self.rules_matter(level) { self.violations(self.list(partition), level) } else { (0, 0) }
    }

    /// Whether `mv` makes no rule worse than `before` (the list's current violations): rules an
    /// inherited list already broke are repaired where possible, never worsened. Computed from what
    /// enters and leaves, since both rules only depend on *which* nodes sit in a prefix.
    fn keeps_rules(&self, mv: &Move, before: (usize, usize)) -> bool {
        if !self.rules_matter(mv.level) {
            return true;
        }
        let list = self.list(mv.partition);
        let prefix = self.zone_prefix;
        if mv.level < prefix {
            let entering = (mv.from >= prefix).then_some(mv.incoming);
            let leaving =
                (mv.to >= prefix).then(|| if mv.rotate { list[prefix - 1] } else { list[mv.level] });
            let zone = |node: u32| self.zone_of[node as usize];
            let clashes_with = |node: u32| {
                list[..prefix]
                    .iter()
                    .filter(|&&other| {
                        other != HOLE && other != node && Some(other) != leaving && zone(other) == zone(node)
                    })
                    .count()
            };
            let removed = leaving.filter(|&node| node != HOLE).map_or(0, clashes_with);
            let added = entering.map_or(0, clashes_with);
            // Clashes after the move: before − removed + added.
            if added > removed {
                return false;
            }
        }
        // The level's fixed set after the move: the positions above `level`, plus `incoming`.
        let fixed = &list[..mv.level];
        let mut shortfall = 0;
        for (m, capped) in self.capped.iter().enumerate().skip(mv.level) {
            let missing =
                capped.iter().filter(|&&node| node != mv.incoming && !fixed.contains(&node)).count();
            shortfall += missing.saturating_sub(m - mv.level);
        }
        shortfall <= before.1
    }

    /// `positions[i]`: where node i sits in `partition`'s list ([`ABSENT`] if not there). The
    /// buffer must be all `ABSENT` on entry; [`Self::forget_positions`] restores that.
    fn note_positions(&self, partition: usize, positions: &mut [usize]) {
        for (j, &node) in self.list(partition).iter().enumerate() {
            if node != HOLE {
                positions[node as usize] = j;
            }
        }
    }

    fn forget_positions(&self, partition: usize, positions: &mut [usize]) {
        for &node in self.list(partition) {
            if node != HOLE {
                positions[node as usize] = ABSENT;
            }
        }
    }

    /// Fills every hole at `level`: preferring a node that gets back what it had, then the node most
    /// below target over all the levels it will cover (down to its old position if pulled up, to the
    /// end if it comes from outside), so that filling a shallow hole does not overshoot a deep level.
    /// Ranked by [`FillKey`].
    fn fill_level(&mut self, level: usize) {
        let mut positions = vec![ABSENT; self.node_count];
        for partition in 0..self.partitions {
            if self.list(partition)[level] != HOLE {
                continue;
            }
            self.note_positions(partition, &mut positions);
            let mut best: Option<(FillKey, Move)> = None;
            for node in 0..self.node_count as u32 {
                let from = positions[node as usize];
                if from < level {
                    continue;
                }
                // A hole is filled by pulling the node up (its old slot becomes the hole) or by
                // bringing it in from outside.
                let to = if from == ABSENT { self.width } else { from };
                let mv = Move { partition, level, incoming: node, from, to, rotate: false };
                let d = self.deficit(level, node);
                let covered_end = if from == ABSENT { self.list_len } else { from.min(self.list_len) };
                let lookahead = (level..covered_end).map(|m| self.deficit(m, node)).min().unwrap_or(d);
                let (clashes, shortfall) = if self.rules_matter(level) {
                    self.violations(&self.moved_list(&mv)[..self.width], level)
                } else {
                    (0, 0)
                };
                let key = (
                    Reverse(clashes),
                    Reverse(shortfall),
                    !self.is_costly(&mv),
                    lookahead > 0,
                    lookahead,
                    d,
                    Reverse(self.tie_break(node, partition)),
                );
                if best.as_ref().is_none_or(|(b, _)| key > *b) {
                    best = Some((key, mv));
                }
            }
            self.forget_positions(partition, &mut positions);
            if let Some((_, mv)) = best {
                self.apply(&mv);
            }
        }
    }

    /// The best move handing position `level` of `partition` (held by an above-target node, or by
    /// any node when searching paths) to `incoming`, if one is allowed: free moves first. `before` is
    /// the list's current [`Self::violations_now`]; `terminal` says whether `incoming` ends a path
    /// (it is below target), which the gate needs.
    fn best_move(
        &self,
        partition: usize,
        level: usize,
        incoming: u32,
        from: usize,
        terminal: bool,
        before: (usize, usize),
    ) -> Option<(bool, Move)> {
        let mut best: Option<(bool, Move)> = None;
        for mv in self.moves(partition, level, incoming, from).into_iter().flatten() {
            let costly = self.is_costly(&mv);
            if best.is_some_and(|(free, _)| free || costly) {
                continue;
            }
            if self.gate_allows(&mv, costly, terminal) && self.keeps_rules(&mv, before) {
                best = Some((!costly, mv));
            }
        }
        best
    }

    /// Balances `level` directly (step 4): one pass over the partitions handing the slot of an
    /// above-target occupant to the best below-target node. One pass finds every direct move: moves
    /// only shrink the sets of nodes above and below target and only change their own list.
    fn balance_level(&mut self, level: usize) {
        let mut under: Vec<u32> =
            (0..self.node_count as u32).filter(|&i| self.deficit(level, i) > 0).collect();
        if under.is_empty() {
            return;
        }
        under.sort_by_key(|&i| (Reverse(self.deficit(level, i)), i));
        let mut positions = vec![ABSENT; self.node_count];
        for partition in 0..self.partitions {
            let outgoing = self.list(partition)[level];
            if outgoing == HOLE || self.deficit(level, outgoing) >= 0 {
                continue;
            }
            self.note_positions(partition, &mut positions);
            let before = self.violations_now(partition, level);
            let mut best: Option<(BalanceKey, Move)> = None;
            for &node in &under {
                let d = self.deficit(level, node);
                let from = positions[node as usize];
                if d <= 0 || from <= level {
                    continue;
                }
                let tie = Reverse(self.tie_break(node, partition));
                if best.as_ref().is_some_and(|((free, bd, bt), _)| *free && (d, tie) <= (*bd, *bt)) {
                    continue;
                }
                if let Some((free, mv)) = self.best_move(partition, level, node, from, true, before) {
                    let key = (free, d, tie);
                    if best.as_ref().is_none_or(|(b, _)| key > *b) {
                        best = Some((key, mv));
                    }
                }
            }
            self.forget_positions(partition, &mut positions);
            if let Some((_, mv)) = best {
                self.apply(&mv);
            }
        }
    }

    /// Finishes balancing `level` with augmenting paths, for imbalances no single move can fix: an
    /// above-target node b hands a slot to c1, which hands one of its slots to c2, ..., to a
    /// below-target node X. The nodes in between keep their counts. Breadth-first search over nodes;
    /// an edge u → v exists where u holds position `level` and v can validly take it.
    fn augment_level(&mut self, level: usize) {
        let n = self.node_count;
        let mut positions = vec![ABSENT; n];
        // held[u]: the partitions with u at position `level`, kept up to date across augmentations.
        let mut held: Vec<Vec<usize>> = vec![Vec::new(); n];
        for partition in 0..self.partitions {
            let node = self.list(partition)[level];
            if node != HOLE {
                held[node as usize].push(partition);
            }
        }
        // reached[v] = (u, the move giving v u's slot).
        let mut reached: Vec<Option<(u32, Move)>> = vec![None; n];
        let mut visited = vec![false; n];
        let mut queue = VecDeque::new();
        loop {
            reached.fill(None);
            visited.fill(false);
            queue.clear();
            for node in 0..n as u32 {
                if self.deficit(level, node) < 0 {
                    visited[node as usize] = true;
                    queue.push_back(node);
                }
            }
            if queue.is_empty() {
                return;
            }
            let mut unvisited: Vec<u32> = (0..n as u32).filter(|&v| !visited[v as usize]).collect();
            let mut end = None;
            'search: while let Some(u) = queue.pop_front() {
                for &partition in &held[u as usize] {
                    if unvisited.is_empty() {
                        break 'search;
                    }
                    self.note_positions(partition, &mut positions);
                    let before = self.violations_now(partition, level);
                    let mut newly_visited = false;
                    for &v in &unvisited {
                        let from = positions[v as usize];
                        if visited[v as usize] || from <= level {
                            continue;
                        }
                        let terminal = self.deficit(level, v) > 0;
                        let Some((free, mv)) = self.best_move(partition, level, v, from, terminal, before)
                        else {
                            continue;
                        };
                        // In the middle of a path a costly move is never worth it.
                        if !free && !terminal && self.was_member[v as usize] {
                            continue;
                        }
                        visited[v as usize] = true;
                        newly_visited = true;
                        reached[v as usize] = Some((u, mv));
                        if terminal {
                            end = Some(v);
                            break;
                        }
                        queue.push_back(v);
                    }
                    self.forget_positions(partition, &mut positions);
                    if end.is_some() {
                        break 'search;
                    }
                    if newly_visited {
                        unvisited.retain(|&v| !visited[v as usize]);
                    }
                }
            }
            let Some(mut node) = end else { return };
            // Distinct nodes on the path hold distinct partitions, so the moves are independent.
            while let Some((previous, mv)) = reached[node as usize].take() {
                self.apply(&mv);
                let from_held = &mut held[previous as usize];
                if let Some(i) = from_held.iter().position(|&p| p == mv.partition) {
                    from_held.swap_remove(i);
                }
                held[node as usize].push(mv.partition);
                node = previous;
            }
        }
    }

    /// Last resort of a fresh computation, where nothing needs preserving: exchanges between two lists
    /// (a Kempe chain, as in bipartite edge colouring). To move a level-`level` slot from b to X when
    /// every list with b at `level` already holds X earlier: take such a list α and a list β without
    /// X, swap the entries of one column between them (X goes to β), repeat on the column where α now
    /// holds a node twice, and finally put X at `level` in α. Every column keeps its counts, so the
    /// settled levels stay exact; only `level` changes: b −1, X +1. By König's theorem exact
    /// per-position counts always exist; this is what reaches them when the targets leave little
    /// slack (nodes that belong in nearly every list).
    fn exchange_level(&mut self, level: usize) {
        let n = self.node_count;
        // Bounds the work when no exchange exists (each attempt costs O(L²)).
        let mut attempts_left = 64 * self.partitions;
        loop {
            let mut under: Vec<u32> = (0..n as u32).filter(|&i| self.deficit(level, i) > 0).collect();
            under.sort_by_key(|&i| (Reverse(self.deficit(level, i)), i));
            let mut exchanged = false;
            'search: for &incoming in &under {
                let betas: Vec<usize> = (0..self.partitions)
                    .filter(|&beta| !self.list(beta)[..=level].contains(&incoming))
                    .collect();
                for alpha in 0..self.partitions {
                    let list = self.list(alpha);
                    let outgoing = list[level];
                    if outgoing == HOLE || self.deficit(level, outgoing) >= 0 {
                        continue;
                    }
                    let Some(column) = position(&list[..level], incoming) else { continue };
                    for &beta in &betas {
                        if attempts_left == 0 {
                            return;
                        }
                        attempts_left -= 1;
                        if let Some((a, b)) = self.kempe(alpha, beta, column, level, incoming) {
                            self.replace_list(alpha, &a);
                            self.replace_list(beta, &b);
                            exchanged = true;
                            break 'search;
                        }
                    }
                }
            }
            if !exchanged {
                return;
            }
        }
    }

    /// The lists α and β after the exchange described in [`Self::exchange_level`], if valid.
    fn kempe(
        &self,
        alpha: usize,
        beta: usize,
        column: usize,
        level: usize,
        incoming: u32,
    ) -> Option<([u32; MAX_LIST_LEN], [u32; MAX_LIST_LEN])> {
        let mut a = [HOLE; MAX_LIST_LEN];
        let mut b = [HOLE; MAX_LIST_LEN];
        a[..self.width].copy_from_slice(self.list(alpha));
        b[..self.width].copy_from_slice(self.list(beta));
        let mut column = column;
        for _ in 0..=level {
            std::mem::swap(&mut a[column], &mut b[column]);
            let received = a[column];
            if received == HOLE {
                return None;
            }
            match (0..=level).find(|&j| j != column && a[j] == received) {
                Some(j) => column = j,
                None => {
                    a[level] = incoming;
                    let valid = |list: &[u32]| {
                        list_is_valid(list, &self.zone_of, 0) && self.violations(list, level) == (0, 0)
                    };
                    return (valid(&a[..self.width]) && valid(&b[..self.width])).then_some((a, b));
                }
            }
        }
        None
    }

    /// Overwrites `partition`'s list, keeping the level counts in step.
    fn replace_list(&mut self, partition: usize, list: &[u32; MAX_LIST_LEN]) {
        let n = self.node_count;
        let row = partition * self.width;
        for (position, &node) in self.slots[row..row + self.list_len].iter().enumerate() {
            if node != HOLE {
                for level in position..self.list_len {
                    self.counts[level * n + node as usize] -= 1;
                }
            }
        }
        self.slots[row..row + self.width].copy_from_slice(&list[..self.width]);
        for (position, &node) in list[..self.list_len].iter().enumerate() {
            if node != HOLE {
                for level in position..self.list_len {
                    self.counts[level * n + node as usize] += 1;
                }
            }
        }
    }

    fn into_assignment(self, ids: &[NodeId], partitions: PartitionCount) -> Result<Assignment, RingError> {
        let mut slots = Vec::with_capacity(self.partitions * self.list_len);
        for (partition, list) in partitions.partitions().zip(self.slots.chunks_exact(self.width)) {
            let list = &list[..self.list_len];
            // Filling always finds a node (fewer than L ≤ n nodes sit above any hole), so these only
            // guard against a bug turning into a wrong assignment.
            if !list_is_valid(list, &self.zone_of, 0) {
                let problem = "a node appears twice in the list";
                return Err(RingError::InvalidList { partition, problem });
            }
            for &node in list {
                let problem = "a position was left empty";
                let id = ids.get(node as usize).ok_or(RingError::InvalidList { partition, problem })?;
                slots.push(*id);
            }
        }
        Ok(Assignment { partitions, list_len: self.list_len, slots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(weights: &[u64], q: u64, levels: usize) -> Vec<Vec<u64>> {
        let mut lower = vec![0; weights.len()];
        let mut all = Vec::new();
        for level in 0..levels {
            let t = level_targets(weights, q, level, &lower, &lower);
            lower = t.clone();
            all.push(t);
        }
        all
    }

    #[test]
    fn targets_sum_to_level_slots_and_stay_within_one_of_ideal() {
        // No share above 1/7, so no capping: every target is a plain rounding of its ideal.
        let weights: Vec<u64> = (0..20).map(|i| i % 3 + 1).collect();
        let w: u64 = weights.iter().sum();
        for (level, t) in targets(&weights, 4096, 7).iter().enumerate() {
            let total = (level as u64 + 1) * 4096;
            assert_eq!(t.iter().sum::<u64>(), total);
            for (i, &target) in t.iter().enumerate() {
                let ideal = total as f64 * weights[i] as f64 / w as f64;
                assert!((target as f64 - ideal).abs() < 1.0, "level {level} node {i}: {target} vs {ideal}");
            }
        }
    }

    #[test]
    fn largest_remainder_breaks_ties_by_node_id() {
        // 4 partitions over 3 equal nodes: 1.33 each, one extra unit goes to node 0.
        assert_eq!(targets(&[1, 1, 1], 4, 1)[0], vec![2, 1, 1]);
        // Level 1: 2.67 each, two extra units go to nodes 0 and 1.
        assert_eq!(targets(&[1, 1, 1], 4, 2)[1], vec![3, 3, 2]);
    }

    #[test]
    fn per_position_quotas_are_never_negative() {
        // Q smaller than the node count: shares below one slot per position.
        let all = targets(&[1, 1, 1, 1, 1, 1, 1], 2, 7);
        for pair in all.windows(2) {
            for (before, after) in pair[0].iter().zip(&pair[1]) {
                assert!(after >= before);
            }
        }
        assert_eq!(all[6], vec![2; 7]);
    }

    #[test]
    fn heavy_node_is_capped_at_one_slot_per_list() {
        // Weight 10 of 12: the ideal first-2 share is 3413 > Q; capped, the rest goes to the others.
        let t = targets(&[10, 1, 1], 4096, 3);
        assert_eq!(t[1][0], 4096);
        assert_eq!(t[1].iter().sum::<u64>(), 2 * 4096);
        assert_eq!(t[1][1], 2048);
        assert_eq!(t[2], vec![4096, 4096, 4096]);
    }

    #[test]
    fn rounding_prefers_nodes_that_already_hold_the_extra_unit() {
        // 3 nodes, Q = 4: ideal 1.33 each. Without history node 0 gets the extra; node 2 already
        // holds 2, so it keeps them instead.
        let t = level_targets(&[1, 1, 1], 4, 0, &[0, 0, 0], &[1, 1, 2]);
        assert_eq!(t, vec![1, 1, 2]);
    }

    #[test]
    fn zone_conflicts_only_count_the_prefix() {
        let zone_of = [0, 0, 1, 1];
        assert_eq!(zone_conflicts(&[0, 2, 1, 3], &zone_of, 2), 0);
        assert_eq!(zone_conflicts(&[0, 1, 2, 3], &zone_of, 2), 1);
        assert_eq!(zone_conflicts(&[0, HOLE, 1, 3], &zone_of, 2), 0);
        assert!(list_is_valid(&[0, 2, 1, 3], &zone_of, 2));
        assert!(!list_is_valid(&[0, 2, 0], &zone_of, 0));
    }

    #[test]
    fn incremental_rule_check_agrees_with_the_full_one() {
        // Four zones of unequal size and a heavy node capped from level 2 on, over lists inherited
        // from an unzoned assignment, so that some lists start out breaking the zone rule.
        let zoned: Vec<NodeSpec> = (1..=9)
            .map(|i| {
                NodeSpec::new(NodeId(i), if i == 1 { 6 } else { 1 + i % 2 }).with_zone(format!("z{}", i % 4))
            })
            .collect();
        let unzoned: Vec<NodeSpec> = zoned.iter().map(|n| NodeSpec::new(n.id, n.weight)).collect();
        let partitions = PartitionCount::new(64).unwrap();
        for previous in [None, Some(Assignment::compute(None, &unzoned, partitions).unwrap())] {
            let nodes: Vec<&NodeSpec> = zoned.iter().collect();
            let planner = Planner::new(previous.as_ref(), &nodes, partitions);
            assert!(planner.zone_prefix == 4 && planner.capped.iter().any(|c| c.contains(&0)));
            let mut checked = 0;
            for partition in 0..64 {
                for level in 0..planner.list_len {
                    let list = planner.list(partition);
                    let before = planner.violations(list, level);
                    for node in 0..planner.node_count as u32 {
                        let from = position(list, node).unwrap_or(ABSENT);
                        if from != ABSENT && from <= level {
                            continue;
                        }
                        for mv in planner.moves(partition, level, node, from).into_iter().flatten() {
                            let moved = planner.moved_list(&mv);
                            let (clashes, shortfall) = planner.violations(&moved[..planner.width], level);
                            let expected = clashes <= before.0 && shortfall <= before.1;
                            assert_eq!(planner.keeps_rules(&mv, before), expected, "{mv:?} on {list:?}");
                            checked += 1;
                        }
                    }
                }
            }
            assert!(checked > 1000, "{checked}");
        }
    }
}
