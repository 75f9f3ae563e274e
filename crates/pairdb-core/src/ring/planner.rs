//! The planner behind [`Assignment::compute`]: fills and balances each level of the lists in turn
//! (see the parent module for the rules it keeps).

use super::targets::*;
use super::*;

/// Working state of one [`Assignment::compute`]. Nodes are referred to by their index in the
/// id-sorted node set.
pub(super) struct Planner {
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
pub(super) type FillKey = (Reverse<usize>, Reverse<usize>, bool, bool, i64, i64, Reverse<u64>);

/// Preference among the candidates for an above-target node's slot, highest first: free, deficit,
/// tie-break.
pub(super) type BalanceKey = (bool, i64, Reverse<u64>);

impl Planner {
    pub(super) fn new(
        previous: Option<&Assignment>,
        nodes: &[&NodeSpec],
        partitions: PartitionCount,
    ) -> Self {
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

    pub(super) fn run(&mut self) {
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

    pub(super) fn into_assignment(
        self,
        ids: &[NodeId],
        partitions: PartitionCount,
    ) -> Result<Assignment, RingError> {
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
