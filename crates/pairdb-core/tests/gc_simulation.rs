//! Seeded, deterministic simulation of the decisions that delete data (`pairdb_core::gc`): tombstone
//! GC on both paths, anti-entropy, and deletion of data a node no longer owns, while partitions
//! migrate, nodes crash and watch sessions break. [`Rules::SAFE`] is what the storage node ships.
//!
//! Model:
//! - Storage nodes 1..=5, each with a durable replica (key → `VersionSet`, and beside each record an
//!   optional minting actor) and full-ack confirmations, and in memory a view of the topology, a watch
//!   session and a `SettleTracker`. Six keys: 0..4 of tenant `t3` (N = 3), 4..6 of `t1` (N = 1). One
//!   partition, list [1, 2, 3], epoch 1.
//! - Meta (the truth) runs migrations to another list of three nodes: a pending topology with a fresh
//!   epoch while writes go to the union of old and new owners, a transfer merging one live old owner's
//!   records into each gaining node once every live view shows the pending topology, and completion
//!   once every old and new owner is up (a final merge from every old owner, so migrations themselves
//!   lose nothing). Unless `Config::returns` (every fourth seed of the main test), a migration never
//!   gives a node a tenant it owned before; with it, a gaining node may still hold old records of the
//!   tenant. Completion also marks every node `nodes_left_holding` names (from the version it
//!   publishes); a node's unowned-data deletion, once it ran, sends meta (lossy, delayed) the version
//!   of the view it ran from, and meta clears the marks that covers. Views carry whether any mark
//!   stands (`ClusterPlacement::unowned_leftovers`), which makes them not quiet. Nodes follow the
//!   truth through their watch session, each update delayed (at most `view_delay_ms`, well below both
//!   graces). A session breaks (session `None`, view frozen) and reconnects under a new id with the
//!   current view. A crashed node keeps its records, minting actors and confirmations, misses every
//!   message, and restarts with no view.
//! - Clients write values and deletes, mostly to two hot keys that change over time (a key that cools
//!   down is deleted, so its tombstone ages); the context is read from a random live owner, or is one
//!   a client read earlier (stale), or empty (blind). The router (which sees the truth) has a live
//!   owner coordinate (`update`), replicates the set to the other and pending owners (messages take
//!   1–30 ms, some are dropped), acknowledges at W = min(2, N) owners and, when every owner
//!   acknowledged a delete placed under `stable_placement`, sends each a confirmation, which an owner
//!   records only if `placement_holds` in its own view and its record is exactly that set.
//! - Minting actors: the coordinator mints the dot under its record's minting actor if it holds the
//!   record and the record has one; otherwise (no record, or one a replication, anti-entropy or
//!   transfer merge created) it draws a fresh actor (a global counter: never used before), stores it as
//!   the record's minting actor and mints under it. Merging into a record keeps its minting actor;
//!   every removal of a record (either GC path's purge, unowned deletion) removes it. So while a record
//!   lives its vector only grows, and a purged key never mints a dot again.
//! - Background, per node at random times: anti-entropy with one peer of its view's list (merge both
//!   ways, shared tenants); the anti-entropy GC path (the first node of its view's list, live session,
//!   view `quiet()`: its `is_candidate` records, peers answer by message with their `RecordState`
//!   (none if lost), `replicas_agree`, purge messages to the peers, each purging only if
//!   `purge_allowed` on its record then, and once all replied the node purges its own the same way;
//!   writes, replication and anti-entropy land in between, and a silent peer leaves some replicas
//!   purged and others not); the full-ack path (`confirmed_verdict` with `placement_holds` from its
//!   view, live session, quiet view); unowned-data deletion (`SettleTracker` fed `settled(session)`,
//!   then the records of tenants `unowned(list, me).drops`, from its own possibly lagging view).
//! - All randomness comes from one splitmix64 stream seeded by the test and events run in (time,
//!   sequence) order, so a seed replays exactly:
//!   `PAIRDB_SIM_SEED=<seed> cargo test -p pairdb-core --test gc_simulation gc_simulation_replays_seed_from_env`.
//!
//! At the end every node comes up with a current view, a pending migration completes and the final
//! owners run anti-entropy until they converge. A write is known by its unique value; a context *saw*
//! a write when it covers the write's dot and was read after the write was made. Checked:
//! 1. Nothing deleted comes back: no live sibling on a final owner is a write an acknowledged write's
//!    context saw.
//! 2. Nothing live is removed: every acknowledged value that no write's context saw is a live sibling,
//!    under its own dot, on every final owner; the final owners converged.
//! 3. Owned data is never deleted as unowned: unowned deletion never removes, from a node the truth
//!    names an owner or pending owner of the tenant, a sibling no other such owner's vector covers.
//! 4. Dots are unique: no coordinator mints a dot of a key that was minted before.
//! 5. GC makes progress: over the seeds, each path removed records (and fresh minting actors were
//!    drawn, also for records a merge created).
//!
//! And each rule is needed: with it switched off (`Rules`), some seed breaks 1, 2 or 3. With one
//! actor per node (`per_record_minting_actor` off) a purged key mints dots again that an unpurged
//! replica or an old context covers, and acknowledged writes are lost; with the anti-entropy GC path
//! running from a frozen view (`ae_gc_needs_session` off) deleted data comes back.
//!
//! A node given back a tenant before its unowned deletion ran still holds records that missed the
//! deletes of the meantime; with GC ignoring the marks (`gc_waits_for_leftovers` off) the transfer or
//! anti-entropy brings deleted data back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use pairdb_core::dvv::{Actor, Dot, VersionSet, VersionVector};
use pairdb_core::gc::leftovers::{MigrationEnd, depth_changes, nodes_left_holding};
use pairdb_core::gc::tombstones::{
    confirmed_verdict, gc_cutoff_ms, is_candidate, purge_allowed, replicas_agree,
};
use pairdb_core::gc::{
    ClusterPlacement, Confirmation, ConfirmedVerdict, PlacementView, RecordState, SettleTracker,
    TenantPlacement, TenantReplication, TombstonePlacement, placement_holds, stable_placement,
};
use pairdb_core::repair::{TenantSpan, replica_peers};
use pairdb_core::ring::{Assignment, NodeId};
use pairdb_core::token::PartitionCount;

use support::Rng;

const NODES: [NodeId; 5] = [NodeId(1), NodeId(2), NodeId(3), NodeId(4), NodeId(5)];
const KEYS: usize = 6;
const DEFAULT_SEED: u64 = 0x6C5E_ED01;
/// Fresh minting actors count up from here; the broken one-actor-per-node rule uses 100 + node id.
const FIRST_FRESH_ACTOR: u64 = 1_000;

type Key = usize;

fn tenant_of(key: Key) -> &'static str {
    if key < 4 { "t3" } else { "t1" }
}

fn replication_factor(tenant: &str) -> usize {
    if tenant == "t3" { 3 } else { 1 }
}

fn owners(list: &[NodeId], tenant: &str) -> Vec<NodeId> {
    list.iter().take(replication_factor(tenant)).copied().collect()
}

/// Deterministic digest of a set, equal iff the sets are equal (FNV-1a over its `Debug` text).
fn digest(set: &VersionSet) -> u64 {
    format!("{set:?}")
        .bytes()
        .fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

fn record_state(set: &VersionSet) -> RecordState {
    RecordState {
        digest: digest(set),
        tombstone_only: set.is_deleted(),
        newest_timestamp_ms: set.siblings().iter().map(|s| s.timestamp_ms).max().unwrap_or(0),
    }
}

/// The decisions under test, each with a switch to break it (the simulation must catch each).
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// The anti-entropy path purges only what `replicas_agree` on (off: each node on age alone).
    require_agreement: bool,
    /// Every purge re-checks the current record with `purge_allowed` (off: trusts the agreement).
    recheck_before_purge: bool,
    /// Unowned data goes only once the `SettleTracker` returns a placement (off: whenever the node's
    /// view, live or not, is quiet and says it does not own the tenant).
    settle_unowned: bool,
    /// Each record carries an optional minting actor: a node coordinating a write mints the dot under
    /// the record's minting actor if it holds the record and the record has one, and otherwise draws a
    /// fresh actor (never used by anyone), stores it as the record's minting actor and mints under that.
    /// Merges keep an existing record's minting actor, a record a merge creates has none, and removing a
    /// record removes it. Off: one actor per node (the engine before this change); after a purge
    /// `VersionSet::update` restarts the key's counter and mints dots other replicas or contexts cover.
    per_record_minting_actor: bool,
    /// The anti-entropy GC path runs only with a live watch session, like the full-ack path. Off: from
    /// whatever view the node holds, live or frozen (the engine before this change).
    ae_gc_needs_session: bool,
    /// Tombstone GC (both paths) waits while a node a migration left holding records it no longer
    /// owns (`nodes_left_holding`) has not reported an unowned-data deletion from a view at or past
    /// that change (`ClusterPlacement::unowned_leftovers`). Off: GC ignores such nodes (the release
    /// before this change), and a node given back a tenant brings deleted data back.
    gc_waits_for_leftovers: bool,
}

impl Rules {
    /// What the storage node ships.
    const SAFE: Rules = Rules {
        require_agreement: true,
        recheck_before_purge: true,
        settle_unowned: true,
        per_record_minting_actor: true,
        ae_gc_needs_session: true,
        gc_waits_for_leftovers: true,
    };
}

#[derive(Debug, Clone)]
struct Config {
    duration_ms: u64,
    tombstone_grace_ms: u64,
    unowned_grace_ms: u64,
    max_delay_ms: u64,
    drop_percent: u64,
    /// Longest delay of a view update over a live session (well below both graces).
    view_delay_ms: u64,
    /// How long a broken watch session stays broken (the view frozen meanwhile).
    session_break_ms: (u64, u64),
    /// Mean time between client writes.
    write_every_ms: u64,
    delete_percent: u64,
    blind_percent: u64,
    stale_context_percent: u64,
    migrations: usize,
    /// How long after its start a migration tries to complete.
    migration_ms: (u64, u64),
    /// Migrations may give a node back a tenant it lost earlier (it may still hold old data).
    returns: bool,
    rules: Rules,
}

impl Config {
    fn chaos() -> Self {
        Self {
            duration_ms: 3_000,
            tombstone_grace_ms: 250,
            unowned_grace_ms: 250,
            max_delay_ms: 30,
            drop_percent: 8,
            view_delay_ms: 40,
            session_break_ms: (50, 900),
            write_every_ms: 15,
            delete_percent: 45,
            blind_percent: 15,
            stale_context_percent: 10,
            migrations: 2,
            migration_ms: (150, 400),
            returns: false,
            rules: Rules::SAFE,
        }
    }

    /// Migrations that may give a node back a tenant it lost, while it may still hold old records.
    fn returning() -> Self {
        Self { returns: true, migrations: 4, ..Self::chaos() }
    }

    /// Long session breaks, slow migrations and many of them: views stay frozen across migrations.
    fn frozen() -> Self {
        Self { session_break_ms: (500, 2_000), migration_ms: (150, 1_500), migrations: 6, ..Self::chaos() }
    }
}

/// What the truth or a node's view says: the current list and epoch, and a pending migration.
#[derive(Debug, Clone)]
struct Topology {
    /// False for a node that restarted and has not heard from meta yet (no topology).
    known: bool,
    version: u64,
    epoch: u64,
    list: Vec<NodeId>,
    pending: Option<(u64, Vec<NodeId>)>,
    /// Some node meta marked as left holding records has not reported a cleanup past the mark.
    leftovers: bool,
}

impl Topology {
    fn placement(&self) -> ClusterPlacement {
        let tenant = |id: &str| TenantPlacement {
            tenant_id: id.to_owned(),
            replication_factor: replication_factor(id),
            previous_replication_factor: None,
            deleting: false,
        };
        ClusterPlacement::new(
            self.known.then_some(self.epoch),
            self.pending.is_some(),
            vec![tenant("t3"), tenant("t1")],
        )
        .with_unowned_leftovers(self.leftovers)
    }

    fn placement_view(&self, tenant: &str) -> PlacementView {
        PlacementView {
            topology_epoch: self.known.then_some(self.epoch),
            migration_pending: self.pending.is_some(),
            tenant: Some(TenantReplication {
                replication_factor: replication_factor(tenant),
                changing: false,
            }),
        }
    }

    /// Owners of `tenant` now and, during a migration, the owners the pending list adds.
    fn write_targets(&self, tenant: &str) -> (Vec<NodeId>, Vec<NodeId>) {
        let preference = owners(&self.list, tenant);
        let mut pending: Vec<NodeId> = self.pending.iter().flat_map(|(_, l)| owners(l, tenant)).collect();
        pending.retain(|n| !preference.contains(n));
        (preference, pending)
    }
}

#[derive(Debug)]
struct Node {
    up: bool,
    /// Durable, like `minting` and `confirmed`.
    records: BTreeMap<Key, VersionSet>,
    /// The minting actor stored beside a record (a key here always has a record).
    minting: BTreeMap<Key, Actor>,
    confirmed: BTreeMap<Key, Confirmation>,
    view: Topology,
    session: Option<u64>,
    tracker: SettleTracker,
}

impl Node {
    /// Removes `key`'s record and its minting actor.
    fn remove_record(&mut self, key: Key) -> Option<VersionSet> {
        self.minting.remove(&key);
        self.records.remove(&key)
    }
}

#[derive(Debug, Clone)]
struct Write {
    key: Key,
    dot: Dot,
    value: Option<u64>,
    context: VersionVector,
    /// Writes made before the context was read: a context saw write `i` only if `i < context_seq`.
    context_seq: usize,
    acked: bool,
}

#[derive(Debug)]
struct InFlight {
    key: Key,
    preference: Vec<NodeId>,
    adds_owners: bool,
    acks: BTreeSet<NodeId>,
    set: VersionSet,
    placement: Option<TombstonePlacement>,
    confirmed: bool,
}

#[derive(Debug)]
struct Round {
    node: NodeId,
    cutoff_ms: u64,
    candidates: Vec<(Key, RecordState)>,
    peers: Vec<(NodeId, Vec<String>)>,
    answers: BTreeMap<NodeId, BTreeMap<Key, RecordState>>,
    waiting: BTreeSet<NodeId>,
    agreed: Vec<(Key, u64)>,
}

#[derive(Debug, Clone)]
enum Msg {
    Replicate { write: usize, key: Key, set: VersionSet },
    Confirm { key: Key, set: VersionSet, placement: TombstonePlacement },
    GcAsk { round: u64, initiator: NodeId, keys: Vec<Key> },
    GcAnswer { round: u64, from: NodeId, states: BTreeMap<Key, RecordState> },
    GcPurge { round: u64, initiator: NodeId, keys: Vec<(Key, u64)> },
    GcPurged { round: u64, from: NodeId },
}

#[derive(Debug)]
enum Event {
    ClientWrite,
    Rotate,
    Deliver {
        to: NodeId,
        msg: Msg,
    },
    Acked {
        write: usize,
        from: NodeId,
    },
    WriteDeadline {
        write: usize,
    },
    View {
        node: NodeId,
        session: u64,
        topology: Topology,
    },
    Reconnect {
        node: NodeId,
    },
    Chaos,
    NodeUp {
        node: NodeId,
    },
    AntiEntropy {
        node: NodeId,
    },
    AeGc {
        node: NodeId,
    },
    GcTimeout {
        round: u64,
    },
    FullAck {
        node: NodeId,
    },
    Unowned {
        node: NodeId,
    },
    MigrationStart,
    Transfer {
        epoch: u64,
    },
    MigrationComplete {
        epoch: u64,
    },
    /// A node's heartbeat reaches meta: its last complete unowned-data deletion ran from the view of
    /// this version.
    CleanupReport {
        node: NodeId,
        version: u64,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stats {
    writes: u64,
    acked: u64,
    ae_purged: u64,
    full_ack_purged: u64,
    unowned_deleted: u64,
    /// Unowned deletions by a node the truth names an owner (harmless while other owners hold it).
    owned_deleted_as_unowned: u64,
    confirmations: u64,
    confirmations_forgotten: u64,
    /// Fresh minting actors drawn, and of those, for a record a merge created (it had none).
    fresh_actors: u64,
    fresh_actors_for_merged_records: u64,
    gc_rounds_aborted: u64,
    purges_refused_on_recheck: u64,
    migrations_completed: u64,
    /// Nodes meta marked as left holding records, and the reports that cleared a mark.
    leftover_marks: u64,
    leftover_marks_cleared: u64,
    session_breaks: u64,
    crashes: u64,
}

#[derive(Debug, Default)]
struct Outcome {
    stats: Stats,
    violations: Vec<String>,
    /// Every final owner's records, for determinism checks.
    final_records: BTreeMap<NodeId, BTreeMap<Key, VersionSet>>,
}

struct Sim<'a> {
    config: &'a Config,
    rng: Rng,
    now_ms: u64,
    next_seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    truth: Topology,
    /// (tenant, node) pairs that ever owned data, for migrations that never give data back.
    ever_owned: BTreeSet<(&'static str, NodeId)>,
    /// Meta's marks: the view version from which a node is known to hold records it no longer owns,
    /// and the version of the view its last reported complete unowned-data deletion ran from.
    leftover_since: BTreeMap<NodeId, u64>,
    cleaned_at: BTreeMap<NodeId, u64>,
    migrations_left: usize,
    nodes: BTreeMap<NodeId, Node>,
    writes: Vec<Write>,
    in_flight: BTreeMap<usize, InFlight>,
    rounds: BTreeMap<u64, Round>,
    next_round: u64,
    next_session: u64,
    /// The next fresh minting actor (a global counter: never used before by anyone).
    next_actor: u64,
    /// Every dot minted so far: a dot minted twice is a violation.
    minted: BTreeSet<(Key, Dot)>,
    /// A context some client read earlier, per key, with the `context_seq` it was read at.
    old_contexts: BTreeMap<Key, (VersionVector, usize)>,
    /// Keys most writes go to; the others rest (and their tombstones age).
    hot: [Key; 2],
    stats: Stats,
    violations: Vec<String>,
}

fn simulate(seed: u64, config: &Config) -> Outcome {
    let mut sim = Sim::new(seed, config);
    sim.run();
    sim.heal();
    sim.check()
}

fn run_checked(seed: u64, config: &Config) -> Outcome {
    let outcome = simulate(seed, config);
    if !outcome.violations.is_empty() {
        let shown = outcome.violations.len().min(8);
        panic!(
            "seed {seed}: {} violations, first {shown}:\n{}\nreplay with PAIRDB_SIM_SEED={seed}",
            outcome.violations.len(),
            outcome.violations[..shown].join("\n")
        );
    }
    outcome
}

impl<'a> Sim<'a> {
    fn new(seed: u64, config: &'a Config) -> Self {
        let truth = Topology {
            known: true,
            version: 1,
            epoch: 1,
            list: vec![NodeId(1), NodeId(2), NodeId(3)],
            pending: None,
            leftovers: false,
        };
        let nodes = NODES
            .into_iter()
            .map(|id| {
                let node = Node {
                    up: true,
                    records: BTreeMap::new(),
                    minting: BTreeMap::new(),
                    confirmed: BTreeMap::new(),
                    view: truth.clone(),
                    session: Some(u64::from(id.0)),
                    tracker: SettleTracker::new(config.unowned_grace_ms),
                };
                (id, node)
            })
            .collect();
        let mut ever_owned = BTreeSet::new();
        for tenant in ["t3", "t1"] {
            ever_owned.extend(owners(&truth.list, tenant).into_iter().map(|n| (tenant, n)));
        }
        Self {
            config,
            rng: Rng(seed),
            now_ms: 0,
            next_seq: 0,
            queue: BTreeMap::new(),
            truth,
            ever_owned,
            leftover_since: BTreeMap::new(),
            cleaned_at: BTreeMap::new(),
            migrations_left: config.migrations,
            nodes,
            writes: Vec::new(),
            in_flight: BTreeMap::new(),
            rounds: BTreeMap::new(),
            next_round: 0,
            next_session: 100,
            next_actor: FIRST_FRESH_ACTOR,
            minted: BTreeSet::new(),
            old_contexts: BTreeMap::new(),
            hot: [0, 4],
            stats: Stats::default(),
            violations: Vec::new(),
        }
    }

    fn push(&mut self, at_ms: u64, event: Event) {
        self.queue.insert((at_ms, self.next_seq), event);
        self.next_seq += 1;
    }

    fn after(&mut self, low: u64, high: u64, event: Event) {
        let at = self.now_ms + self.rng.between(low, high);
        self.push(at, event);
    }

    fn running(&self) -> bool {
        self.now_ms < self.config.duration_ms
    }

    fn up(&self, node: NodeId) -> bool {
        self.nodes[&node].up
    }

    /// Sends `msg` over the lossy network; it is lost if `to` is down when it arrives.
    fn send(&mut self, to: NodeId, msg: Msg) {
        if !self.rng.percent(self.config.drop_percent) {
            let max = self.config.max_delay_ms;
            self.after(1, max, Event::Deliver { to, msg });
        }
    }

    fn run(&mut self) {
        self.after(0, 10, Event::ClientWrite);
        self.after(50, 150, Event::Chaos);
        self.after(100, 400, Event::Rotate);
        for _ in 0..self.config.migrations {
            let end = self.config.duration_ms * 3 / 4;
            self.after(100, end, Event::MigrationStart);
        }
        for node in NODES {
            self.after(0, 40, Event::AntiEntropy { node });
            self.after(0, 60, Event::AeGc { node });
            self.after(0, 60, Event::FullAck { node });
            self.after(0, 60, Event::Unowned { node });
        }
        while let Some(((at_ms, _), event)) = self.queue.pop_first() {
            self.now_ms = at_ms;
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        let running = self.running();
        match event {
            Event::ClientWrite if running => {
                let key = if self.rng.percent(85) {
                    self.rng.pick(&self.hot.clone())
                } else {
                    (self.rng.next_u64() % KEYS as u64) as Key
                };
                self.client_write(key, false);
                let every = self.config.write_every_ms;
                self.after(1, 2 * every, Event::ClientWrite);
            }
            Event::Deliver { to, msg } if self.up(to) => self.receive(to, msg),
            Event::Acked { write, from } => self.acked(write, from),
            Event::WriteDeadline { write } => {
                self.in_flight.remove(&write);
            }
            Event::View { node, session, topology } => {
                let n = self.nodes.get_mut(&node).unwrap();
                if n.up && n.session == Some(session) && topology.version > n.view.version {
                    n.view = topology;
                }
            }
            Event::Reconnect { node } => self.reconnect(node),
            Event::Chaos if running => self.chaos(),
            Event::Rotate if running => {
                self.rotate();
                self.after(100, 400, Event::Rotate);
            }
            Event::NodeUp { node } => {
                let n = self.nodes.get_mut(&node).unwrap();
                n.up = true;
                // The view lives in memory: none until the watch delivers a snapshot.
                n.view = Topology {
                    known: false,
                    version: 0,
                    epoch: 0,
                    list: Vec::new(),
                    pending: None,
                    leftovers: false,
                };
                self.after(1, 60, Event::Reconnect { node });
            }
            Event::AntiEntropy { node } if running => {
                self.anti_entropy(node);
                self.after(20, 60, Event::AntiEntropy { node });
            }
            Event::AeGc { node } if running => {
                self.ae_gc_start(node);
                self.after(30, 90, Event::AeGc { node });
            }
            Event::GcTimeout { round } => {
                let aborted = self.rounds.remove(&round).is_some();
                self.stats.gc_rounds_aborted += u64::from(aborted);
            }
            Event::FullAck { node } if running => {
                self.full_ack(node);
                self.after(30, 90, Event::FullAck { node });
            }
            Event::Unowned { node } if running => {
                self.unowned(node);
                self.after(30, 90, Event::Unowned { node });
            }
            Event::MigrationStart if running => self.migration_start(),
            Event::Transfer { epoch } => self.transfer(epoch),
            Event::MigrationComplete { epoch } => {
                let retry = !self.complete_migration(epoch);
                if retry {
                    self.after(30, 60, Event::MigrationComplete { epoch });
                }
            }
            Event::CleanupReport { node, version } => self.cleanup_reported(node, version),
            _ => {}
        }
    }

    // ---- Cluster: views, sessions, crashes, migrations -----------------------------------------------

    fn publish(&mut self) {
        self.truth.version += 1;
        let marked = |n: &NodeId| self.leftover_since[n] > self.cleaned_at.get(n).copied().unwrap_or(0);
        self.truth.leftovers =
            self.config.rules.gc_waits_for_leftovers && self.leftover_since.keys().any(marked);
        for node in NODES {
            if let (true, Some(session)) = (self.up(node), self.nodes[&node].session) {
                let topology = self.truth.clone();
                let delay = self.config.view_delay_ms;
                self.after(0, delay, Event::View { node, session, topology });
            }
        }
    }

    fn reconnect(&mut self, node: NodeId) {
        let truth = self.truth.clone();
        let n = self.nodes.get_mut(&node).unwrap();
        if n.up && n.session.is_none() {
            n.session = Some(self.next_session);
            n.view = truth;
            self.next_session += 1;
        }
    }

    fn chaos(&mut self) {
        let node = self.rng.pick(&NODES);
        let down = NODES.iter().filter(|n| !self.up(**n)).count();
        if self.rng.percent(50) {
            if down < 2 && self.up(node) {
                let n = self.nodes.get_mut(&node).unwrap();
                n.up = false;
                n.session = None;
                n.tracker = SettleTracker::new(self.config.unowned_grace_ms);
                // A GC round lives in the initiator's memory.
                self.rounds.retain(|_, r| r.node != node);
                self.stats.crashes += 1;
                self.after(50, 700, Event::NodeUp { node });
            }
        } else if self.nodes[&node].session.is_some() {
            self.nodes.get_mut(&node).unwrap().session = None;
            self.stats.session_breaks += 1;
            let (low, high) = self.config.session_break_ms;
            self.after(low, high, Event::Reconnect { node });
        }
        self.after(40, 160, Event::Chaos);
    }

    fn migration_start(&mut self) {
        if self.truth.pending.is_some() {
            self.after(100, 300, Event::MigrationStart);
            return;
        }
        // Any list of three, but unless `returns`, never one giving a node back a tenant it lost (it
        // may still hold old records of it).
        let list = self.truth.list.clone();
        let gives_back = |new: &[NodeId], t: &'static str| {
            owners(new, t).iter().any(|n| !owners(&list, t).contains(n) && self.ever_owned.contains(&(t, *n)))
        };
        let mut options: Vec<Vec<NodeId>> = Vec::new();
        for (a, b, c) in
            NODES.iter().flat_map(|a| NODES.iter().flat_map(move |b| NODES.iter().map(move |c| (*a, *b, *c))))
        {
            let new = vec![a, b, c];
            let back = gives_back(&new, "t3") || gives_back(&new, "t1");
            if a != b && b != c && a != c && new != list && (self.config.returns || !back) {
                options.push(new);
            }
        }
        if options.is_empty() || self.migrations_left == 0 {
            return;
        }
        self.migrations_left -= 1;
        let new = options[(self.rng.next_u64() % options.len() as u64) as usize].clone();
        for tenant in ["t3", "t1"] {
            self.ever_owned.extend(owners(&new, tenant).into_iter().map(|n| (tenant, n)));
        }
        let epoch = self.truth.epoch + 1;
        self.truth.pending = Some((epoch, new));
        self.publish();
        // The transfer starts once every live view shows the pending topology.
        let delay = self.config.view_delay_ms;
        self.after(delay + 1, delay + 40, Event::Transfer { epoch });
        let (low, high) = self.config.migration_ms;
        self.after(delay + low, delay + high, Event::MigrationComplete { epoch });
    }

    /// Merges `tenant`'s records of `from` into `to`.
    fn copy_tenant(&mut self, from: NodeId, to: NodeId, tenant: &str) {
        let source: Vec<(Key, VersionSet)> = self.nodes[&from]
            .records
            .iter()
            .filter(|(k, _)| tenant_of(**k) == tenant)
            .map(|(k, s)| (*k, s.clone()))
            .collect();
        let target = self.nodes.get_mut(&to).unwrap();
        for (key, set) in source {
            target.records.entry(key).or_default().merge_from(&set);
        }
    }

    fn gains(&self, tenant: &str) -> (Vec<NodeId>, Vec<NodeId>) {
        let old = owners(&self.truth.list, tenant);
        let new = self.truth.pending.iter().flat_map(|(_, l)| owners(l, tenant)).filter(|n| !old.contains(n));
        (old.clone(), new.collect())
    }

    fn transfer(&mut self, epoch: u64) {
        if self.truth.pending.as_ref().map(|p| p.0) != Some(epoch) {
            return;
        }
        for tenant in ["t3", "t1"] {
            let (old, gained) = self.gains(tenant);
            let Some(source) = old.iter().copied().find(|n| self.up(*n)) else { continue };
            let live: Vec<NodeId> = gained.into_iter().filter(|n| self.up(*n)).collect();
            for target in live {
                self.copy_tenant(source, target, tenant);
            }
        }
    }

    fn complete_migration(&mut self, epoch: u64) -> bool {
        let Some((pending_epoch, new)) = self.truth.pending.clone() else { return true };
        if pending_epoch != epoch {
            return true;
        }
        let involved = self.truth.list.iter().chain(&new);
        if involved.into_iter().any(|n| !self.up(*n)) {
            return false;
        }
        for tenant in ["t3", "t1"] {
            let (old, gained) = self.gains(tenant);
            for target in gained {
                for &source in &old {
                    self.copy_tenant(source, target, tenant);
                }
            }
        }
        // Meta marks, in the same change, every node left holding records it no longer owns: from
        // the version this change publishes, it must report a cleanup made from a view that recent.
        let assignment = |list: &[NodeId]| {
            Assignment::from_lists(PartitionCount::new(1).unwrap(), vec![list.to_vec()]).unwrap()
        };
        let (before, after) = (assignment(&self.truth.list), assignment(&new));
        let spans: Vec<TenantSpan> = ["t3", "t1"]
            .iter()
            .map(|t| TenantSpan {
                tenant_id: (*t).to_owned(),
                old_n: replication_factor(t),
                new_n: replication_factor(t),
            })
            .collect();
        let depths = depth_changes(&spans, MigrationEnd::Completed);
        for node in nodes_left_holding(&[&before, &after], &after, &depths) {
            self.leftover_since.insert(node, self.truth.version + 1);
            self.stats.leftover_marks += 1;
        }
        self.truth.epoch = epoch;
        self.truth.list = new;
        self.truth.pending = None;
        self.stats.migrations_completed += 1;
        self.publish();
        true
    }

    /// Meta hears a node's cleanup report; a mark it clears is published.
    fn cleanup_reported(&mut self, node: NodeId, version: u64) {
        let cleaned = self.cleaned_at.entry(node).or_default();
        *cleaned = (*cleaned).max(version);
        let cleared = self.leftover_since.get(&node).is_some_and(|since| *since <= version);
        if cleared {
            self.leftover_since.remove(&node);
            self.stats.leftover_marks_cleared += 1;
            self.publish();
        }
    }

    // ---- Client writes -------------------------------------------------------------------------------

    /// A key stops being hot: a client deletes it (so it may be collected) and another key heats up.
    fn rotate(&mut self) {
        let slot = (self.rng.next_u64() % self.hot.len() as u64) as usize;
        let cold = self.hot[slot];
        self.hot[slot] = (self.rng.next_u64() % KEYS as u64) as Key;
        self.client_write(cold, true);
    }

    /// A client write to `key`: a value or a delete (`final_delete`: a delete with a fresh context).
    fn client_write(&mut self, key: Key, final_delete: bool) {
        let tenant = tenant_of(key);
        let (preference, pending_owners) = self.truth.write_targets(tenant);
        let live: Vec<NodeId> = preference.iter().copied().filter(|n| self.up(*n)).collect();
        if live.is_empty() {
            return;
        }
        let seq = self.writes.len();
        let (context, context_seq) = if final_delete {
            let from = self.rng.pick(&live);
            (self.nodes[&from].records.get(&key).map(|s| s.vector().clone()).unwrap_or_default(), seq)
        } else if self.rng.percent(self.config.blind_percent) {
            (VersionVector::new(), seq)
        } else if self.rng.percent(self.config.stale_context_percent) && self.old_contexts.contains_key(&key)
        {
            self.old_contexts[&key].clone()
        } else {
            let from = self.rng.pick(&live);
            let read = self.nodes[&from].records.get(&key).map(|s| s.vector().clone()).unwrap_or_default();
            if self.rng.percent(30) {
                self.old_contexts.insert(key, (read.clone(), seq));
            }
            (read, seq)
        };
        let coordinator = self.rng.pick(&live);
        let delete = final_delete || self.rng.percent(self.config.delete_percent);
        let value = (!delete).then_some(seq as u64);
        let actor = self.actor_for(coordinator, key);
        let set = self.nodes.get_mut(&coordinator).unwrap().records.entry(key).or_default();
        let dot =
            set.update(&context, actor, value.map(|v| v.to_le_bytes().to_vec()), self.now_ms, None).unwrap();
        let set = set.clone();
        if !self.minted.insert((key, dot)) {
            self.violations
                .push(format!("t={}ms: {coordinator:?} minted dot {dot:?} of key {key} twice", self.now_ms));
        }
        self.writes.push(Write { key, dot, value, context, context_seq, acked: false });
        self.stats.writes += 1;
        let placement =
            if value.is_none() { stable_placement(&self.truth.placement_view(tenant)) } else { None };
        let flight = InFlight {
            key,
            preference: preference.clone(),
            adds_owners: !pending_owners.is_empty(),
            acks: BTreeSet::new(),
            set: set.clone(),
            placement,
            confirmed: false,
        };
        self.in_flight.insert(seq, flight);
        self.acked(seq, coordinator);
        for target in preference.into_iter().chain(pending_owners).filter(|n| *n != coordinator) {
            self.send(target, Msg::Replicate { write: seq, key, set: set.clone() });
        }
        self.after(100, 100, Event::WriteDeadline { write: seq });
    }

    /// The actor `node` mints a dot for `key` with (before it creates or updates the record).
    fn actor_for(&mut self, node: NodeId, key: Key) -> Actor {
        if !self.config.rules.per_record_minting_actor {
            return Actor(100 + u64::from(node.0));
        }
        let n = &self.nodes[&node];
        let held = n.records.contains_key(&key).then(|| n.minting.get(&key).copied()).flatten();
        if let Some(actor) = held {
            return actor;
        }
        // No record, or one a merge, a transfer or anti-entropy created: a fresh actor.
        self.stats.fresh_actors += 1;
        self.stats.fresh_actors_for_merged_records += u64::from(n.records.contains_key(&key));
        let actor = Actor(self.next_actor);
        self.next_actor += 1;
        self.nodes.get_mut(&node).unwrap().minting.insert(key, actor);
        actor
    }

    /// The router hears that `from` holds write `write`'s set.
    fn acked(&mut self, write: usize, from: NodeId) {
        let Some(flight) = self.in_flight.get_mut(&write) else { return };
        if !flight.preference.contains(&from) {
            return;
        }
        flight.acks.insert(from);
        let required = flight.preference.len().min(2);
        if flight.acks.len() >= required && !self.writes[write].acked {
            self.writes[write].acked = true;
            self.stats.acked += 1;
        }
        let every_owner = flight.acks.len() == flight.preference.len() && !flight.adds_owners;
        if let (true, false, Some(placement)) = (every_owner, flight.confirmed, flight.placement) {
            flight.confirmed = true;
            let (key, set, owners) = (flight.key, flight.set.clone(), flight.preference.clone());
            for owner in owners {
                self.send(owner, Msg::Confirm { key, set: set.clone(), placement });
            }
        }
    }

    // ---- Storage nodes ---------------------------------------------------------------------------------

    fn receive(&mut self, me: NodeId, msg: Msg) {
        let now = self.now_ms;
        let grace = self.config.tombstone_grace_ms;
        let rules = self.config.rules;
        match msg {
            Msg::Replicate { write, key, set } => {
                self.nodes.get_mut(&me).unwrap().records.entry(key).or_default().merge_from(&set);
                if !self.rng.percent(self.config.drop_percent) {
                    let max = self.config.max_delay_ms;
                    self.after(1, max, Event::Acked { write, from: me });
                }
            }
            Msg::Confirm { key, set, placement } => {
                let node = self.nodes.get_mut(&me).unwrap();
                let placed_here = placement_holds(&node.view.placement_view(tenant_of(key)), placement);
                let current = node.records.get(&key).map(record_state);
                if placed_here && current.is_some_and(|c| c.tombstone_only && c.digest == digest(&set)) {
                    node.confirmed.insert(key, Confirmation { digest: digest(&set), placement });
                    self.stats.confirmations += 1;
                }
            }
            Msg::GcAsk { round, initiator, keys } => {
                let records = &self.nodes[&me].records;
                let states = keys.iter().filter_map(|k| Some((*k, record_state(records.get(k)?)))).collect();
                self.send(initiator, Msg::GcAnswer { round, from: me, states });
            }
            Msg::GcAnswer { round, from, states } => {
                let Some(r) = self.rounds.get_mut(&round) else { return };
                r.answers.insert(from, states);
                r.waiting.remove(&from);
                if r.waiting.is_empty() {
                    self.ae_gc_decide(round);
                }
            }
            Msg::GcPurge { round, initiator, keys } => {
                self.purge(me, &keys, gc_cutoff_ms(now, grace), rules);
                self.send(initiator, Msg::GcPurged { round, from: me });
            }
            Msg::GcPurged { round, from } => {
                let Some(r) = self.rounds.get_mut(&round) else { return };
                r.waiting.remove(&from);
                if r.waiting.is_empty() {
                    let r = self.rounds.remove(&round).unwrap();
                    self.purge(me, &r.agreed, r.cutoff_ms, rules);
                }
            }
        }
    }

    /// Removes each record of `keys` that `purge_allowed` still accepts (under the key's lock).
    fn purge(&mut self, me: NodeId, keys: &[(Key, u64)], cutoff_ms: u64, rules: Rules) {
        let node = self.nodes.get_mut(&me).unwrap();
        for &(key, agreed) in keys {
            let current = node.records.get(&key).map(record_state);
            if !rules.recheck_before_purge || purge_allowed(current.as_ref(), agreed, cutoff_ms) {
                if node.remove_record(key).is_some() {
                    self.stats.ae_purged += 1;
                }
            } else if current.is_some() {
                self.stats.purges_refused_on_recheck += 1;
            }
        }
    }

    fn anti_entropy(&mut self, me: NodeId) {
        if !self.up(me) {
            return;
        }
        let view = &self.nodes[&me].view;
        let peers = replica_peers(&view.list, me, &view.placement().replica_depths());
        if peers.is_empty() {
            return;
        }
        let (peer, shared) = peers[(self.rng.next_u64() % peers.len() as u64) as usize].clone();
        if !self.up(peer) || self.rng.percent(self.config.drop_percent) {
            return;
        }
        for key in (0..KEYS).filter(|k| shared.iter().any(|t| t == tenant_of(*k))) {
            let mine = self.nodes[&me].records.get(&key).cloned();
            let theirs = self.nodes[&peer].records.get(&key).cloned();
            let merged = match (mine, theirs) {
                (Some(a), Some(b)) => a.merge(&b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => continue,
            };
            self.nodes.get_mut(&me).unwrap().records.insert(key, merged.clone());
            self.nodes.get_mut(&peer).unwrap().records.insert(key, merged);
        }
    }

    fn ae_gc_start(&mut self, me: NodeId) {
        let node = &self.nodes[&me];
        let first = node.view.list.first() == Some(&me) || !self.config.rules.require_agreement;
        let live = node.session.is_some() || !self.config.rules.ae_gc_needs_session;
        if !node.up || !live || !node.view.placement().quiet() || !first {
            return;
        }
        let cutoff_ms = gc_cutoff_ms(self.now_ms, self.config.tombstone_grace_ms);
        let candidates: Vec<(Key, RecordState)> = node
            .records
            .iter()
            .map(|(k, s)| (*k, record_state(s)))
            .filter(|(_, state)| is_candidate(state, cutoff_ms))
            .collect();
        if candidates.is_empty() {
            return;
        }
        if !self.config.rules.require_agreement {
            // The broken rule: every node drops its own old tombstones.
            let keys: Vec<(Key, u64)> = candidates.iter().map(|(k, s)| (*k, s.digest)).collect();
            self.purge(me, &keys, cutoff_ms, self.config.rules);
            return;
        }
        let peers = replica_peers(&node.view.list, me, &node.view.placement().replica_depths());
        let round = self.next_round;
        self.next_round += 1;
        let mut waiting = BTreeSet::new();
        for (peer, shared) in &peers {
            let keys: Vec<Key> = candidates
                .iter()
                .map(|c| c.0)
                .filter(|k| shared.iter().any(|t| t == tenant_of(*k)))
                .collect();
            if !keys.is_empty() {
                waiting.insert(*peer);
                self.send(*peer, Msg::GcAsk { round, initiator: me, keys });
            }
        }
        let answers = BTreeMap::new();
        let r = Round { node: me, cutoff_ms, candidates, peers, answers, waiting, agreed: Vec::new() };
        let nothing_to_ask = r.waiting.is_empty();
        self.rounds.insert(round, r);
        self.after(120, 120, Event::GcTimeout { round });
        if nothing_to_ask {
            self.ae_gc_decide(round);
        }
    }

    /// Every peer answered: purge what they agree on, peers first.
    fn ae_gc_decide(&mut self, round: u64) {
        let rules = self.config.rules;
        let r = self.rounds.get_mut(&round).unwrap();
        let mut agreed = Vec::new();
        for (key, candidate) in &r.candidates {
            let sharing = r.peers.iter().filter(|(_, shared)| shared.iter().any(|t| t == tenant_of(*key)));
            let answers: Vec<Option<RecordState>> =
                sharing.map(|(peer, _)| r.answers.get(peer).and_then(|a| a.get(key)).copied()).collect();
            if !rules.require_agreement || replicas_agree(candidate, answers.iter().map(Option::as_ref)) {
                agreed.push((*key, candidate.digest));
            }
        }
        if agreed.is_empty() {
            self.rounds.remove(&round);
            return;
        }
        let mut purges = Vec::new();
        for (peer, shared) in &r.peers {
            let keys: Vec<(Key, u64)> =
                agreed.iter().copied().filter(|(k, _)| shared.iter().any(|t| t == tenant_of(*k))).collect();
            if !keys.is_empty() {
                purges.push((*peer, keys));
            }
        }
        r.waiting = purges.iter().map(|p| p.0).collect();
        r.agreed = agreed;
        if purges.is_empty() {
            let r = self.rounds.remove(&round).unwrap();
            self.purge(r.node, &r.agreed, r.cutoff_ms, rules);
            return;
        }
        let initiator = self.rounds[&round].node;
        for (peer, keys) in purges {
            self.send(peer, Msg::GcPurge { round, initiator, keys });
        }
    }

    fn full_ack(&mut self, me: NodeId) {
        let cutoff_ms = gc_cutoff_ms(self.now_ms, self.config.tombstone_grace_ms);
        let node = self.nodes.get_mut(&me).unwrap();
        if !node.up || node.session.is_none() || !node.view.placement().quiet() {
            return;
        }
        for (key, confirmation) in node.confirmed.clone() {
            let current = node.records.get(&key).map(record_state);
            let view = node.view.placement_view(tenant_of(key));
            let holds = placement_holds(&view, confirmation.placement);
            match confirmed_verdict(current.as_ref(), &confirmation, holds, cutoff_ms) {
                ConfirmedVerdict::Purge => {
                    node.remove_record(key);
                    node.confirmed.remove(&key);
                    self.stats.full_ack_purged += 1;
                }
                ConfirmedVerdict::Forget => {
                    node.confirmed.remove(&key);
                    self.stats.confirmations_forgotten += 1;
                }
                ConfirmedVerdict::Wait => {}
            }
        }
    }

    fn unowned(&mut self, me: NodeId) {
        let now = self.now_ms;
        let node = self.nodes.get_mut(&me).unwrap();
        if !node.up {
            return;
        }
        let placement = node.view.placement();
        let settled = node.tracker.observe(placement.settled(node.session), now).is_some();
        if !settled && (self.config.rules.settle_unowned || !placement.quiet()) {
            return;
        }
        let doomed = placement.unowned(&node.view.list, me);
        let keys: Vec<Key> = node.records.keys().copied().filter(|k| doomed.drops(tenant_of(*k))).collect();
        // The deletion below is complete: the next heartbeat says from which view it ran.
        let version = node.view.version;
        if !self.rng.percent(self.config.drop_percent) {
            let max = self.config.max_delay_ms;
            self.after(1, max, Event::CleanupReport { node: me, version });
        }
        for key in keys {
            let set = self.nodes.get_mut(&me).unwrap().remove_record(key).unwrap();
            self.stats.unowned_deleted += 1;
            // 3. Owned data is never deleted as unowned.
            let tenant = tenant_of(key);
            let (preference, pending) = self.truth.write_targets(tenant);
            if !preference.contains(&me) && !pending.contains(&me) {
                continue;
            }
            self.stats.owned_deleted_as_unowned += 1;
            let others: Vec<NodeId> = preference.into_iter().chain(pending).filter(|n| *n != me).collect();
            for sibling in set.siblings() {
                let covered = others
                    .iter()
                    .any(|o| self.nodes[o].records.get(&key).is_some_and(|s| s.vector().covers(sibling.dot)));
                if !covered {
                    self.violations.push(format!(
                        "t={now}ms: {me:?} deleted key {key} (tenant {tenant}) as unowned though it owns it, \
                         and no other owner holds {:?}",
                        sibling.dot
                    ));
                }
            }
        }
    }

    // ---- The end ----------------------------------------------------------------------------------------

    /// Every node up with a live, current view, the migration done, and the final owners converged.
    fn heal(&mut self) {
        for node in NODES {
            self.nodes.get_mut(&node).unwrap().up = true;
            self.nodes.get_mut(&node).unwrap().session = None;
            self.reconnect(node);
        }
        if let Some((epoch, _)) = self.truth.pending {
            assert!(self.complete_migration(epoch), "every node is up");
        }
        for node in NODES {
            self.nodes.get_mut(&node).unwrap().view = self.truth.clone();
        }
        for key in 0..KEYS {
            let final_owners = owners(&self.truth.list, tenant_of(key));
            let mut merged: Option<VersionSet> = None;
            for owner in &final_owners {
                if let Some(set) = self.nodes[owner].records.get(&key) {
                    merged = Some(merged.map_or_else(|| set.clone(), |m| m.merge(set)));
                }
            }
            for owner in &final_owners {
                let node = self.nodes.get_mut(owner).unwrap();
                match &merged {
                    Some(set) => node.records.insert(key, set.clone()),
                    None => node.remove_record(key),
                };
            }
        }
    }

    fn check(self) -> Outcome {
        let mut violations = self.violations;
        let writes = &self.writes;
        let by_value: BTreeMap<u64, usize> =
            writes.iter().enumerate().filter_map(|(i, w)| Some((w.value?, i))).collect();
        // Write `w`'s context saw write `i`.
        let saw = |w: &Write, i: usize| {
            w.key == writes[i].key && i < w.context_seq && w.context.covers(writes[i].dot)
        };
        let mut final_records: BTreeMap<NodeId, BTreeMap<Key, VersionSet>> = BTreeMap::new();
        for key in 0..KEYS {
            let final_owners = owners(&self.truth.list, tenant_of(key));
            let sets: Vec<VersionSet> = final_owners
                .iter()
                .map(|o| self.nodes[o].records.get(&key).cloned().unwrap_or_default())
                .collect();
            for (owner, set) in final_owners.iter().zip(&sets) {
                final_records.entry(*owner).or_default().insert(key, set.clone());
                if *set != sets[0] {
                    violations.push(format!("key {key}: final owners {final_owners:?} did not converge"));
                }
            }
            let live: BTreeMap<u64, Dot> = sets[0]
                .siblings()
                .iter()
                .filter_map(|s| Some((u64::from_le_bytes(s.value.as_deref()?.try_into().ok()?), s.dot)))
                .collect();
            // 1. Nothing deleted comes back.
            for (value, dot) in &live {
                let i = by_value[value];
                if writes[i].dot != *dot {
                    violations.push(format!(
                        "key {key}: value {value} is live under {dot:?}, written as {:?}",
                        writes[i].dot
                    ));
                }
                if let Some(w) = writes.iter().position(|w| w.acked && saw(w, i)) {
                    violations.push(format!(
                        "key {key}: write {i} ({:?}) came back after acknowledged write {w} ({}) saw it",
                        writes[i].dot,
                        if writes[w].value.is_some() { "overwrite" } else { "delete" }
                    ));
                }
            }
            // 2. Nothing live is removed.
            for (i, write) in writes.iter().enumerate().filter(|(_, w)| w.key == key && w.acked) {
                let Some(value) = write.value else { continue };
                if live.get(&value) == Some(&write.dot) || writes.iter().any(|w| saw(w, i)) {
                    continue;
                }
                let reused = writes.iter().enumerate().any(|(j, w)| {
                    j != i && w.key == key && (w.dot == write.dot || w.context.covers(write.dot))
                });
                violations.push(format!(
                    "key {key}: acknowledged write {i} ({:?}) is gone though no write's context saw it{}",
                    write.dot,
                    if reused { " (its dot was minted or covered before: a reused dot)" } else { "" }
                ));
            }
        }
        Outcome { stats: self.stats, violations, final_records }
    }
}

// ---- Tests ---------------------------------------------------------------------------------------------

impl Stats {
    fn add(&mut self, s: &Stats) {
        self.writes += s.writes;
        self.acked += s.acked;
        self.ae_purged += s.ae_purged;
        self.full_ack_purged += s.full_ack_purged;
        self.unowned_deleted += s.unowned_deleted;
        self.owned_deleted_as_unowned += s.owned_deleted_as_unowned;
        self.confirmations += s.confirmations;
        self.confirmations_forgotten += s.confirmations_forgotten;
        self.fresh_actors += s.fresh_actors;
        self.fresh_actors_for_merged_records += s.fresh_actors_for_merged_records;
        self.gc_rounds_aborted += s.gc_rounds_aborted;
        self.purges_refused_on_recheck += s.purges_refused_on_recheck;
        self.migrations_completed += s.migrations_completed;
        self.leftover_marks += s.leftover_marks;
        self.leftover_marks_cleared += s.leftover_marks_cleared;
        self.session_breaks += s.session_breaks;
        self.crashes += s.crashes;
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("PAIRDB_SIM_SEED") {
        Ok(text) => {
            let text = text.trim();
            match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            }
            .unwrap_or_else(|err| panic!("PAIRDB_SIM_SEED={text:?} is not a u64: {err}"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

/// Asserts that some seed of `seeds` breaks an invariant under `config` with a message containing
/// `expected` (any of its violations); returns the seeds that report it.
fn assert_caught(what: &str, config: &Config, seeds: std::ops::Range<u64>, expected: &str) -> Vec<u64> {
    let failing: Vec<(u64, Vec<String>)> = seeds
        .clone()
        .map(|seed| (seed, simulate(seed, config).violations))
        .filter(|(_, violations)| !violations.is_empty())
        .collect();
    let caught: Vec<u64> = failing
        .iter()
        .filter(|(_, v)| v.iter().any(|v| v.contains(expected)))
        .map(|(seed, _)| *seed)
        .collect();
    eprintln!(
        "{what}: {} of {} seeds fail, {} report {expected:?}: {caught:?}; first: {:?}",
        failing.len(),
        seeds.end - seeds.start,
        caught.len(),
        failing.first().map(|(seed, v)| (seed, &v[0]))
    );
    assert!(!caught.is_empty(), "{what}: no seed of {seeds:?} reports {expected:?}: {failing:?}");
    caught
}

/// The seeds a broken rule fails pass with the shipped rules, all else equal.
fn assert_shipped_rules_pass(config: &Config, seeds: &[u64]) {
    let shipped = Config { rules: Rules::SAFE, ..config.clone() };
    for &seed in seeds {
        run_checked(seed, &shipped);
    }
}

/// The shipped rules over many seeds (every fourth with frozen views, every fourth with migrations
/// that give nodes back tenants they lost): no invariant breaks, and every decision that deletes
/// data, and every kind of fault, happens somewhere.
#[test]
fn gc_simulation_many_seeds() {
    const SEEDS: u64 = 400;
    let mut total = Stats::default();
    for seed in 0..SEEDS {
        let config = match seed % 4 {
            3 => Config::frozen(),
            2 => Config::returning(),
            _ => Config::chaos(),
        };
        total.add(&run_checked(seed, &config).stats);
    }
    eprintln!("gc simulation, {SEEDS} seeds: {total:?}");
    let exercised = [
        ("acknowledged writes", total.acked),
        ("tombstones purged by the anti-entropy path", total.ae_purged),
        ("tombstones purged by the full-ack path", total.full_ack_purged),
        ("records deleted as unowned", total.unowned_deleted),
        ("full-ack confirmations recorded", total.confirmations),
        ("confirmations forgotten", total.confirmations_forgotten),
        ("fresh minting actors", total.fresh_actors),
        ("fresh minting actors for records a merge created", total.fresh_actors_for_merged_records),
        ("GC rounds aborted (a peer silent)", total.gc_rounds_aborted),
        ("purges refused by the re-check", total.purges_refused_on_recheck),
        ("migrations completed", total.migrations_completed),
        ("nodes marked as left holding records", total.leftover_marks),
        ("marks cleared by a cleanup report", total.leftover_marks_cleared),
        ("session breaks", total.session_breaks),
        ("crashes", total.crashes),
    ];
    for (what, count) in exercised {
        assert!(count > 0, "{SEEDS} seeds never exercised: {what} ({total:?})");
    }
}

#[test]
fn gc_simulation_replays_seed_from_env() {
    let seed = seed_from_env();
    let outcome = run_checked(seed, &Config::chaos());
    assert!(outcome.stats.acked > 0, "seed {seed}: no write was acknowledged");
}

#[test]
fn gc_simulation_is_deterministic() {
    let config = Config::chaos();
    for seed in [DEFAULT_SEED, 7] {
        let (first, second) = (simulate(seed, &config), simulate(seed, &config));
        assert_eq!(first.stats, second.stats, "seed {seed}");
        assert_eq!(first.final_records, second.final_records, "seed {seed}");
    }
    assert_ne!(simulate(1, &config).final_records, simulate(2, &config).final_records);
}

/// Each node purging its old tombstones on age alone (no `replicas_agree`): a replica that missed
/// the delete still holds the value, and anti-entropy brings it back.
#[test]
fn gc_simulation_catches_purges_on_age_alone() {
    let config = Config { rules: Rules { require_agreement: false, ..Rules::SAFE }, ..Config::chaos() };
    assert_caught("purging on age alone", &config, 0..60, "came back");
}

/// Purging what was agreed on without re-checking the record (no `purge_allowed`): a write that
/// landed between the agreement and the purge is deleted with it.
#[test]
fn gc_simulation_catches_purges_without_the_recheck() {
    let config = Config {
        rules: Rules { recheck_before_purge: false, ..Rules::SAFE },
        migrations: 0,
        ..Config::chaos()
    };
    assert_caught("purging without the re-check", &config, 0..300, "is gone");
}

/// Deleting unowned data from whatever the view says, without a settled live session: a node whose
/// view is stale deletes what it owns.
#[test]
fn gc_simulation_catches_unowned_deletion_before_settling() {
    let config = Config { rules: Rules { settle_unowned: false, ..Rules::SAFE }, ..Config::chaos() };
    assert_caught("unowned deletion without settling", &config, 0..60, "as unowned though it owns it");
}

/// One actor per node (the engine before per-record minting actors): a purged key restarts its
/// counters (`VersionSet::update` counts from the record's vector and the context), so the next write
/// to it can mint a dot that a replica which has not purged yet (the full-ack path purges each owner
/// on its own; the anti-entropy path stops halfway when a peer is silent) or a context read before the
/// purge already covers. Merging that replica, or writing with that context, then removes the
/// acknowledged write. The same seeds pass with per-record minting actors.
#[test]
fn gc_simulation_one_actor_per_node_loses_acknowledged_writes() {
    let config =
        Config { rules: Rules { per_record_minting_actor: false, ..Rules::SAFE }, ..Config::chaos() };
    let caught = assert_caught("one actor per node", &config, 0..150, "a reused dot");
    assert_shipped_rules_pass(&config, &caught);
}

/// The anti-entropy GC path from a view that stopped following meta (only `quiet()` checked): a node
/// whose session broke before a migration moved a tenant away still leads the partition in its frozen
/// view, purges a tombstone the new owner never received, and the value the new owner holds comes
/// back. The same seeds pass when the path needs a live session.
#[test]
fn gc_simulation_ae_gc_without_a_session_brings_deleted_data_back() {
    let config = Config { rules: Rules { ae_gc_needs_session: false, ..Rules::SAFE }, ..Config::frozen() };
    let caught = assert_caught("anti-entropy GC without a live session", &config, 0..300, "came back");
    assert_shipped_rules_pass(&config, &caught);
}

/// A migration gives a node back a tenant while it still holds records of it from before it lost the
/// tenant (its unowned deletion had not run yet). Those records missed the deletes of the meantime;
/// with tombstone GC ignoring such nodes, the transfer or anti-entropy brings deleted values back.
/// The same seeds pass when GC waits for the node's cleanup report.
#[test]
fn gc_simulation_gc_ignoring_leftovers_brings_deleted_data_back() {
    let config =
        Config { rules: Rules { gc_waits_for_leftovers: false, ..Rules::SAFE }, ..Config::returning() };
    let caught = assert_caught("GC ignoring nodes left holding records", &config, 0..200, "came back");
    assert_shipped_rules_pass(&config, &caught);
}
