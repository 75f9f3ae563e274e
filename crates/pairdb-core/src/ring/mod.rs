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

mod planner;
mod targets;

use planner::Planner;
