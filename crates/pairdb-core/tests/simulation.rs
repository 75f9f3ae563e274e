//! Seeded, deterministic simulation of the router's write and read paths (STYLE item 3, DESIGN §3–§4).
//!
//! Model:
//! - Five storage nodes (`NodeId` 1..=5) serve one partition: preference list [1, 2, 3] (N = 3), fallbacks
//!   [4, 5]. Each node has its own actor (`Actor(100 + id)`), a replica (key → `VersionSet`) and a hint
//!   store (hints kept for an owner that could not be reached).
//! - The router runs one [`WriteCoordinator`] or [`ReadCoordinator`] per client request and carries out
//!   their effects as RPCs. Every request and every reply is a message delivered after a random delay
//!   (so messages reorder), dropped with some probability, and lost when either end is down when it
//!   arrives. A call to a node that is down at send time is refused quickly (`FailureCause::Error`); any
//!   other call that gets no reply within the per-call timeout fails with `FailureCause::Timeout`, even when
//!   the node applied it and only the reply was lost, or applies it later: that is the "outcome unknown"
//!   case. The router suspects a node whose call failed until it hears from it again or the suspicion
//!   expires.
//! - Nodes also pause (SIGSTOP): what is sent to a paused node waits and is handled, in order, when it
//!   resumes, so a coordinate call can be applied long after the router gave up on it ("applied after
//!   the caller gave up"). A node refuses a coordinate call before applying it when it is not ready
//!   (a small share of calls) or, when the setting says so, when the call's deadline has passed: the
//!   router then tries the next replica ("caller retried on another coordinator").
//! - Storage nodes: coordinate = `update(context, own actor, value)` and reply with the new dot and set;
//!   replicate = `merge_from`, or keep a hint when `hint_for` is set; fetch = the replica's set ("not
//!   found" when empty); repair = `merge_from`. Fallbacks periodically hand hints to their owners and
//!   drop them once the owner acknowledged.
//! - Clients loop: read a random key at a random R, then write a new unique value (sometimes a tombstone)
//!   with the read's context (sometimes blind), at a random W, sometimes with strict quorum; after an
//!   acknowledged write they sometimes delete or overwrite the key at once with the context the
//!   acknowledgement returned. Nodes go down, pause, and come back at random times.
//! - All randomness comes from one splitmix64 stream seeded by the test, and events run in (time,
//!   sequence) order, so a seed replays exactly:
//!   `PAIRDB_SIM_SEED=<seed> cargo test -p pairdb-core --test simulation simulation_replays_seed_from_env`.
//!
//! Checked while running: each request gets exactly one reply; no coordinator emits effects once
//! `is_finished()`; an ack never claims fewer acknowledgements than W; read repair targets exactly the
//! answered replicas that are behind the merged set; a fallback is never sent a non-hinted replica; every
//! coordinator finishes and every client completes its operations.
//!
//! Checked at the end, after every node is up, every hint is delivered and the preference replicas ran a
//! full anti-entropy pass:
//! 1. Convergence: the three preference replicas hold identical sets for every key.
//! 2. No acknowledged write lost: an acked dot is still a sibling unless the context of some write that
//!    reached a coordinator covers it (a client that had seen it superseded it).
//! 3. Nothing superseded without cause: the same for every dot ever created, acked or not; every final
//!    sibling is a write that happened, with its value, and no dot was ever issued twice.
//! 4. Quorum intersection: a read that started after a write was acked by `acks` preference replicas,
//!    with `acks + R > N`, has that write in its causal context.
//! 5. One client write, one dot: no request was applied by two coordinators.
//! 6. A context covers a write, not just a dot: once some write's context covered a dot of a request,
//!    no dot of that request is left (nothing deleted or overwritten comes back).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use pairdb_core::coordination::{
    FailureCause, ReadAnswer, ReadCoordinator, ReadInput, ReadPlan, ReadReply, ReadTransport,
    WriteCoordinator, WriteInput, WritePlan, WriteReply, WriteTransport,
};
use pairdb_core::dvv::{Actor, Dot, VersionSet, VersionVector};
use pairdb_core::ring::NodeId;

use support::Rng;

const PREFERENCE: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const FALLBACKS: [NodeId; 2] = [NodeId(4), NodeId(5)];
const ALL_NODES: [NodeId; 5] = [NodeId(1), NodeId(2), NodeId(3), NodeId(4), NodeId(5)];
const REPLICATION_FACTOR: usize = PREFERENCE.len();
/// How long the router treats a node whose call failed as down, unless it hears from it first.
const SUSPICION_MS: u64 = 200;
const HANDOFF_EVERY_MS: u64 = 100;
/// Every request has a deadline, so a run still going after this much simulated time is stuck.
const TIME_LIMIT_MS: u64 = 3_600_000;
const DEFAULT_SEED: u64 = 0x5EED_0001;

type Key = usize;

#[derive(Debug, Clone)]
struct Network {
    min_delay_ms: u64,
    max_delay_ms: u64,
    drop_percent: u64,
}

impl Network {
    /// The delay of a message sent now, or `None` when the network drops it.
    fn transit(&self, rng: &mut Rng) -> Option<u64> {
        if rng.percent(self.drop_percent) {
            return None;
        }
        Some(rng.between(self.min_delay_ms, self.max_delay_ms))
    }
}

#[derive(Debug, Clone)]
enum Outages {
    None,
    /// Nodes go down and come back at random, at most `max_down` at once.
    Random {
        max_down: usize,
    },
    /// These nodes are down for the whole run (until the final heal).
    Fixed(Vec<NodeId>),
}

#[derive(Debug, Clone)]
struct Config {
    clients: usize,
    ops_per_client: usize,
    keys: usize,
    /// Client `i` only uses key `i % keys` (a single writer per key when `keys >= clients`).
    key_per_client: bool,
    network: Network,
    rpc_timeout_ms: u64,
    /// Request deadline, relative to the request's start.
    deadline_ms: u64,
    /// When a read asks the remaining replicas, relative to the request's start.
    speculative_after_ms: u64,
    outages: Outages,
    /// R of each read is picked among these.
    read_quorums: Vec<usize>,
    /// W of each write is picked among these.
    write_quorums: Vec<usize>,
    strict_percent: u64,
    blind_percent: u64,
    tombstone_percent: u64,
    /// Share of writes that follow an acknowledged write of the same key with its ack context and no
    /// read in between (put → delete / overwrite with the context the put returned).
    ack_context_percent: u64,
    /// Share of coordinate calls a node refuses before applying (not ready): the router fails over.
    refuse_percent: u64,
    /// Storage nodes refuse a coordinate call that arrives after its deadline. Off models clocks so
    /// skewed (or a node paused so long) that the check never fires: the guarantee must hold anyway.
    node_checks_deadline: bool,
}

impl Config {
    /// The randomized setting of `simulation_many_seeds`: lossy, slow and crashing.
    fn chaos() -> Self {
        Self {
            clients: 4,
            ops_per_client: 15,
            keys: 3,
            key_per_client: false,
            network: Network { min_delay_ms: 1, max_delay_ms: 30, drop_percent: 5 },
            rpc_timeout_ms: 50,
            deadline_ms: 200,
            speculative_after_ms: 40,
            outages: Outages::Random { max_down: 2 },
            read_quorums: vec![1, 2, 2, 3],
            write_quorums: vec![1, 2, 3],
            strict_percent: 30,
            blind_percent: 15,
            tombstone_percent: 5,
            ack_context_percent: 0,
            refuse_percent: 3,
            node_checks_deadline: true,
        }
    }

    /// Deletes and overwrites of just-acknowledged writes while replicas pause (SIGSTOP: messages
    /// wait, nothing is lost) and calls time out: the setting of issue 16's resurrections.
    fn pauses() -> Self {
        Self {
            clients: 4,
            ops_per_client: 16,
            keys: 4,
            key_per_client: true,
            network: Network { min_delay_ms: 1, max_delay_ms: 20, drop_percent: 3 },
            rpc_timeout_ms: 30,
            deadline_ms: 200,
            outages: Outages::Random { max_down: 1 },
            read_quorums: vec![1, 2, 3],
            write_quorums: vec![1, 2],
            strict_percent: 20,
            blind_percent: 0,
            tombstone_percent: 40,
            ack_context_percent: 70,
            ..Self::chaos()
        }
    }

    /// No loss, no crash, and every reply arrives well before the call timeout.
    fn calm() -> Self {
        Self {
            network: Network { min_delay_ms: 1, max_delay_ms: 20, drop_percent: 0 },
            outages: Outages::None,
            refuse_percent: 0,
            ..Self::chaos()
        }
    }
}

#[derive(Debug, Clone)]
struct Hint {
    owner: NodeId,
    key: Key,
    set: VersionSet,
}

/// A simulated storage node. Going down loses no data (crash-stop with a durable store): it only stops
/// receiving and sending messages.
#[derive(Debug)]
struct Node {
    actor: Actor,
    up: bool,
    /// Stopped (SIGSTOP): messages to it wait in `held` and are handled, in order, when it resumes.
    paused: bool,
    held: Vec<(Place, Body)>,
    replica: BTreeMap<Key, VersionSet>,
    hints: BTreeMap<u64, Hint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Router,
    Node(NodeId),
}

#[derive(Debug, Clone)]
enum Body {
    // Router → storage. `request` is harness bookkeeping, not part of the protocol.
    Coordinate {
        rpc: u64,
        request: usize,
        key: Key,
        context: VersionVector,
        value: Option<Vec<u8>>,
        /// When the router stops waiting for this call: a node that gets it later refuses it.
        deadline_ms: u64,
    },
    Replicate {
        rpc: u64,
        key: Key,
        set: VersionSet,
        hint_for: Option<NodeId>,
    },
    Fetch {
        rpc: u64,
        key: Key,
    },
    Repair {
        key: Key,
        set: VersionSet,
    },
    StoreHint {
        key: Key,
        set: VersionSet,
        owner: NodeId,
    },
    // Storage → router.
    Coordinated {
        rpc: u64,
        dot: Dot,
        set: VersionSet,
    },
    /// The node refused the call before applying anything.
    Refused {
        rpc: u64,
    },
    Replicated {
        rpc: u64,
    },
    Fetched {
        rpc: u64,
        set: Option<VersionSet>,
    },
    // Storage → storage (hinted handoff).
    Handoff {
        hints: Vec<(u64, Key, VersionSet)>,
    },
    HandoffAck {
        ids: Vec<u64>,
    },
}

#[derive(Debug)]
enum Event {
    Deliver { from: Place, to: Place, body: Body },
    CallFailed { rpc: u64, cause: FailureCause },
    Tick { request: usize, at_ms: u64 },
    ClientWake { client: usize },
    Chaos,
    Handoff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    Coordinate,
    Replicate,
    Fetch,
}

/// An RPC the router is waiting on; removed by its reply or its failure, whichever comes first.
#[derive(Debug, Clone, Copy)]
struct Call {
    request: usize,
    node: NodeId,
    kind: CallKind,
}

#[derive(Debug)]
struct Request {
    client: usize,
    key: Key,
    started_ms: u64,
    replies: usize,
    scheduled_tick: Option<u64>,
    kind: RequestKind,
}

#[derive(Debug)]
enum RequestKind {
    Write(Box<WriteRequest>),
    Read(Box<ReadRequest>),
}

/// What a coordinator replica returns: the new dot and the set to replicate.
type Coordinated = (Dot, VersionSet);

#[derive(Debug)]
struct WriteRequest {
    /// `None` only while [`Sim::drive_write`] drives it.
    coordinator: Option<WriteCoordinator<Coordinated>>,
    context: VersionVector,
    value: Option<Vec<u8>>,
    strict: bool,
    required: usize,
}

#[derive(Debug)]
struct ReadRequest {
    /// `None` only while [`Sim::drive_read`] drives it.
    coordinator: Option<ReadCoordinator>,
    required: usize,
    /// The client's last acknowledged write to this key when the read started.
    expected: Option<Dot>,
    /// Answers the coordinator accepted ("not found" = `None`), to check read-repair targeting.
    answers: BTreeMap<NodeId, Option<VersionSet>>,
}

#[derive(Debug, Clone)]
enum ClientStep {
    Read,
    Write { context: VersionVector },
    Waiting,
    Done,
}

#[derive(Debug)]
struct Client {
    ops_left: usize,
    next: ClientStep,
    writes: u64,
    last_acked: BTreeMap<Key, Dot>,
    /// The context the last acknowledged write of each key returned (what a client may delete or
    /// overwrite with, without reading first).
    ack_context: BTreeMap<Key, VersionVector>,
    /// The key of the request in flight or just finished.
    current_key: Option<Key>,
}

/// A dot issued by a coordinator, whatever became of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Created {
    request: usize,
    key: Key,
    dot: Dot,
    value: Option<Vec<u8>>,
    context: VersionVector,
}

/// A write the client was told succeeded; its value and context are in the [`Created`] entry of its dot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AckedWrite {
    request: usize,
    key: Key,
    dot: Dot,
    acks: usize,
    hinted_acks: usize,
    at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadRecord {
    request: usize,
    key: Key,
    required: usize,
    started_ms: u64,
    expected: Option<Dot>,
    /// `None` when the read got `QuorumNotReached`; `Some(None)` when every answer was "not found".
    merged: Option<Option<VersionSet>>,
}

/// Counters showing which paths a run exercised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Stats {
    dropped: u64,
    lost_to_down_node: u64,
    timeouts: u64,
    refused: u64,
    write_failures: u64,
    read_failures: u64,
    hinted_acks: u64,
    repairs: u64,
    hints_stored: u64,
    hints_handed_off: u64,
    node_crashes: u64,
    node_pauses: u64,
    /// Messages that waited on a paused node and were handled when it resumed.
    held_messages: u64,
    /// Coordinate calls refused (not ready, or arrived after their deadline).
    coordinate_refusals: u64,
    late_coordinates_refused: u64,
    /// Writes that ended "outcome unknown" because their coordinate call may have been applied.
    ambiguous_coordinations: u64,
    /// Writes a coordinator applied that were not acknowledged (reply lost or late, or replication short of W).
    applied_but_unacknowledged: u64,
    /// Writes carrying the context their previous acknowledged write returned.
    ack_context_writes: u64,
}

/// Everything a run produced; two runs of one seed must be equal.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    seed: u64,
    created: Vec<Created>,
    acked: Vec<AckedWrite>,
    reads: Vec<ReadRecord>,
    /// Preference replicas after every hint was delivered, before anti-entropy.
    after_handoff: BTreeMap<NodeId, BTreeMap<Key, VersionSet>>,
    /// Preference replicas after anti-entropy.
    converged: BTreeMap<NodeId, BTreeMap<Key, VersionSet>>,
    violations: Vec<String>,
    stats: Stats,
    events: u64,
    end_ms: u64,
}

struct Sim {
    config: Config,
    rng: Rng,
    now_ms: u64,
    next_seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: BTreeMap<NodeId, Node>,
    suspected_until: BTreeMap<NodeId, u64>,
    calls: BTreeMap<u64, Call>,
    next_rpc: u64,
    next_hint: u64,
    requests: Vec<Request>,
    clients: Vec<Client>,
    outcome: Outcome,
}

/// Runs one seeded simulation, heals the cluster and returns what happened (violations included).
fn simulate(seed: u64, config: &Config) -> Outcome {
    let mut sim = Sim::new(seed, config.clone());
    sim.run();
    sim.heal();
    sim.outcome
}

/// Runs a seed and panics with a replay hint when any invariant fails.
fn run_checked(seed: u64, config: &Config) -> Outcome {
    let outcome = simulate(seed, config);
    if let Err(msg) = check(&outcome) {
        panic!("seed {seed}: {msg}\nreplay with PAIRDB_SIM_SEED={seed}");
    }
    outcome
}

impl Sim {
    fn new(seed: u64, config: Config) -> Self {
        let nodes = ALL_NODES
            .into_iter()
            .map(|id| {
                let up = match &config.outages {
                    Outages::Fixed(down) => !down.contains(&id),
                    Outages::None | Outages::Random { .. } => true,
                };
                let node = Node {
                    actor: Actor(100 + u64::from(id.0)),
                    up,
                    paused: false,
                    held: Vec::new(),
                    replica: BTreeMap::new(),
                    hints: BTreeMap::new(),
                };
                (id, node)
            })
            .collect();
        let clients = (0..config.clients)
            .map(|_| Client {
                ops_left: config.ops_per_client,
                next: ClientStep::Read,
                writes: 0,
                last_acked: BTreeMap::new(),
                ack_context: BTreeMap::new(),
                current_key: None,
            })
            .collect();
        Self {
            config,
            rng: Rng(seed),
            now_ms: 0,
            next_seq: 0,
            queue: BTreeMap::new(),
            nodes,
            suspected_until: BTreeMap::new(),
            calls: BTreeMap::new(),
            next_rpc: 0,
            next_hint: 0,
            requests: Vec::new(),
            clients,
            outcome: Outcome { seed, ..Outcome::default() },
        }
    }

    fn push(&mut self, at_ms: u64, event: Event) {
        self.queue.insert((at_ms, self.next_seq), event);
        self.next_seq += 1;
    }

    fn violation(&mut self, msg: String) {
        self.outcome.violations.push(format!("t={}ms: {msg}", self.now_ms));
    }

    fn is_up(&self, place: Place) -> bool {
        match place {
            Place::Router => true,
            Place::Node(node) => self.nodes[&node].up,
        }
    }

    fn clients_active(&self) -> bool {
        self.clients.iter().any(|c| !matches!(c.next, ClientStep::Done))
    }

    fn run(&mut self) {
        for client in 0..self.clients.len() {
            let at = self.rng.between(0, 20);
            self.push(at, Event::ClientWake { client });
        }
        if matches!(self.config.outages, Outages::Random { .. }) {
            let at = self.rng.between(10, 100);
            self.push(at, Event::Chaos);
        }
        self.push(HANDOFF_EVERY_MS, Event::Handoff);
        while let Some(((time_ms, _), event)) = self.queue.pop_first() {
            if time_ms > TIME_LIMIT_MS {
                self.violation(format!("still running after {TIME_LIMIT_MS}ms: some request never replied"));
                break;
            }
            self.now_ms = time_ms;
            self.outcome.events += 1;
            match event {
                Event::Deliver { from, to, body } => self.deliver(from, to, body),
                Event::CallFailed { rpc, cause } => self.call_failed(rpc, cause),
                Event::Tick { request, at_ms } => {
                    if self.requests[request].scheduled_tick == Some(at_ms) {
                        self.requests[request].scheduled_tick = None;
                    }
                    self.drive(request, Input::Tick);
                }
                Event::ClientWake { client } => self.client_wake(client),
                Event::Chaos => self.chaos(),
                Event::Handoff => self.handoff(),
            }
        }
        self.outcome.end_ms = self.now_ms;
        self.check_quiescent();
    }

    /// Once the queue is empty, every request replied once and let go, and every client is done.
    fn check_quiescent(&mut self) {
        for client in 0..self.clients.len() {
            let step = self.clients[client].next.clone();
            if !matches!(step, ClientStep::Done) {
                self.violation(format!("client {client} never finished: stuck at {step:?}"));
            }
        }
        for id in 0..self.requests.len() {
            let request = &self.requests[id];
            let finished = match &request.kind {
                RequestKind::Write(write) => write.coordinator.as_ref().is_some_and(|c| c.is_finished()),
                RequestKind::Read(read) => read.coordinator.as_ref().is_some_and(|c| c.is_finished()),
            };
            let replies = request.replies;
            if replies != 1 {
                self.violation(format!("request {id} got {replies} replies"));
            }
            if !finished {
                self.violation(format!("request {id} never finished"));
            }
        }
        if !self.calls.is_empty() {
            let open = self.calls.len();
            self.violation(format!("{open} calls neither answered nor failed"));
        }
    }

    // ---- Network -------------------------------------------------------------------------------------

    fn send(&mut self, from: Place, to: Place, body: Body) {
        match self.config.network.transit(&mut self.rng) {
            Some(delay_ms) => self.push(self.now_ms + delay_ms, Event::Deliver { from, to, body }),
            None => self.outcome.stats.dropped += 1,
        }
    }

    fn deliver(&mut self, from: Place, to: Place, body: Body) {
        // A crashed peer's connections break: messages to it and its replies in flight are lost.
        if !self.is_up(from) || !self.is_up(to) {
            self.outcome.stats.lost_to_down_node += 1;
            return;
        }
        if let Place::Node(node) = to
            && self.nodes[&node].paused
        {
            self.nodes.get_mut(&node).unwrap().held.push((from, body));
            return;
        }
        match (from, to) {
            (Place::Node(node), Place::Router) => self.router_receive(node, body),
            (_, Place::Node(node)) => self.node_receive(node, from, body),
            (Place::Router, Place::Router) => unreachable!("the router does not message itself"),
        }
    }

    // ---- Storage nodes -------------------------------------------------------------------------------

    fn node_receive(&mut self, id: NodeId, from: Place, body: Body) {
        let now_ms = self.now_ms;
        let node = self.nodes.get_mut(&id).unwrap();
        let reply = match body {
            Body::Coordinate { rpc, request, key, context, value, deadline_ms } => {
                let late = self.config.node_checks_deadline && now_ms > deadline_ms;
                if late || self.rng.percent(self.config.refuse_percent) {
                    self.outcome.stats.coordinate_refusals += 1;
                    self.outcome.stats.late_coordinates_refused += u64::from(late);
                    self.send(Place::Node(id), from, Body::Refused { rpc });
                    return;
                }
                let set = node.replica.entry(key).or_default();
                let dot = set
                    .update(&context, node.actor, value.clone(), now_ms, None)
                    .expect("no sibling cap in the simulation");
                let set = set.clone();
                self.outcome.created.push(Created { request, key, dot, value, context });
                Some(Body::Coordinated { rpc, dot, set })
            }
            Body::Replicate { rpc, key, set, hint_for } => {
                match hint_for {
                    Some(owner) => {
                        node.hints.insert(self.next_hint, Hint { owner, key, set });
                        self.next_hint += 1;
                        self.outcome.stats.hints_stored += 1;
                    }
                    None => {
                        node.replica.entry(key).or_default().merge_from(&set);
                    }
                }
                Some(Body::Replicated { rpc })
            }
            Body::Fetch { rpc, key } => {
                let set = node.replica.get(&key).filter(|set| !set.is_empty()).cloned();
                Some(Body::Fetched { rpc, set })
            }
            Body::Repair { key, set } => {
                node.replica.entry(key).or_default().merge_from(&set);
                None
            }
            Body::StoreHint { key, set, owner } => {
                node.hints.insert(self.next_hint, Hint { owner, key, set });
                self.next_hint += 1;
                self.outcome.stats.hints_stored += 1;
                None
            }
            Body::Handoff { hints } => {
                let ids = hints.iter().map(|(hint, _, _)| *hint).collect();
                for (_, key, set) in hints {
                    node.replica.entry(key).or_default().merge_from(&set);
                }
                Some(Body::HandoffAck { ids })
            }
            Body::HandoffAck { ids } => {
                for hint in ids {
                    if node.hints.remove(&hint).is_some() {
                        self.outcome.stats.hints_handed_off += 1;
                    }
                }
                None
            }
            body @ (Body::Coordinated { .. }
            | Body::Refused { .. }
            | Body::Replicated { .. }
            | Body::Fetched { .. }) => {
                unreachable!("router-bound message {body:?} delivered to node {id:?}")
            }
        };
        if let Some(reply) = reply {
            self.send(Place::Node(id), from, reply);
        }
    }

    /// Fallbacks that are up offer their hints to the owners; a hint is dropped once acknowledged.
    fn handoff(&mut self) {
        for id in ALL_NODES {
            let node = &self.nodes[&id];
            if !node.up {
                continue;
            }
            let mut by_owner: BTreeMap<NodeId, Vec<(u64, Key, VersionSet)>> = BTreeMap::new();
            for (&hint, Hint { owner, key, set }) in &node.hints {
                by_owner.entry(*owner).or_default().push((hint, *key, set.clone()));
            }
            for (owner, hints) in by_owner {
                self.send(Place::Node(id), Place::Node(owner), Body::Handoff { hints });
            }
        }
        if self.clients_active() {
            self.push(self.now_ms + HANDOFF_EVERY_MS, Event::Handoff);
        }
    }

    fn chaos(&mut self) {
        let Outages::Random { max_down } = self.config.outages else {
            return;
        };
        if self.rng.percent(20) {
            for node in self.nodes.values_mut() {
                node.up = true;
            }
            self.resume_all();
        } else if self.rng.percent(40) {
            // SIGSTOP / SIGCONT: a paused node keeps its connections; what is sent to it waits.
            let target = self.rng.pick(&ALL_NODES);
            if self.nodes[&target].paused {
                self.resume(target);
            } else if self.nodes[&target].up {
                self.nodes.get_mut(&target).unwrap().paused = true;
                self.outcome.stats.node_pauses += 1;
            }
        } else {
            let target = self.rng.pick(&ALL_NODES);
            let down = self.nodes.values().filter(|node| !node.up).count();
            let node = self.nodes.get_mut(&target).unwrap();
            if !node.up {
                node.up = true;
            } else if down < max_down {
                node.up = false;
                self.outcome.stats.node_crashes += 1;
            }
        }
        if self.clients_active() {
            let at = self.now_ms + self.rng.between(20, 200);
            self.push(at, Event::Chaos);
        }
    }

    /// SIGCONT: the node handles what waited for it, in arrival order, a little apart.
    fn resume(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        node.paused = false;
        let held = std::mem::take(&mut node.held);
        self.outcome.stats.held_messages += held.len() as u64;
        for (i, (from, body)) in held.into_iter().enumerate() {
            self.push(self.now_ms + i as u64, Event::Deliver { from, to: Place::Node(id), body });
        }
    }

    fn resume_all(&mut self) {
        for id in ALL_NODES {
            if self.nodes[&id].paused {
                self.resume(id);
            }
        }
    }

    /// End of run: every node comes up, every hint reaches its owner, then full anti-entropy between the
    /// preference replicas (each merges every other, so sets meet in different orders).
    fn heal(&mut self) {
        for node in self.nodes.values_mut() {
            node.up = true;
        }
        self.resume_all();
        // What waited on a paused node is handled now (late coordinates included).
        while let Some((_, event)) = self.queue.pop_first() {
            if let Event::Deliver { from, to: to @ Place::Node(_), body } = event {
                self.deliver(from, to, body);
            }
        }
        let hints: Vec<Hint> = ALL_NODES
            .into_iter()
            .flat_map(|id| std::mem::take(&mut self.nodes.get_mut(&id).unwrap().hints).into_values())
            .collect();
        for Hint { owner, key, set } in hints {
            self.nodes.get_mut(&owner).unwrap().replica.entry(key).or_default().merge_from(&set);
        }
        for id in FALLBACKS {
            let keys: Vec<Key> = self.nodes[&id].replica.keys().copied().collect();
            if !keys.is_empty() {
                self.violation(format!("fallback {id:?} holds replicas (not hints) of keys {keys:?}"));
            }
        }
        for id in PREFERENCE {
            let node = self.nodes.get_mut(&id).unwrap();
            for key in 0..self.config.keys {
                node.replica.entry(key).or_default();
            }
        }
        self.outcome.after_handoff = self.preference_replicas();
        for key in 0..self.config.keys {
            for to in PREFERENCE {
                for from in PREFERENCE {
                    if from != to {
                        let theirs = self.nodes[&from].replica[&key].clone();
                        self.nodes.get_mut(&to).unwrap().replica.get_mut(&key).unwrap().merge_from(&theirs);
                    }
                }
            }
        }
        self.outcome.converged = self.preference_replicas();
    }

    fn preference_replicas(&self) -> BTreeMap<NodeId, BTreeMap<Key, VersionSet>> {
        PREFERENCE.into_iter().map(|id| (id, self.nodes[&id].replica.clone())).collect()
    }

    // ---- Router --------------------------------------------------------------------------------------

    fn suspects(&self) -> BTreeSet<NodeId> {
        self.suspected_until.iter().filter(|(_, until)| **until > self.now_ms).map(|(id, _)| *id).collect()
    }

    /// Opens an RPC: refused quickly when the node is down now, else sent with a timeout.
    fn call(&mut self, request: usize, node: NodeId, kind: CallKind, body: impl FnOnce(u64) -> Body) {
        let rpc = self.next_rpc;
        self.next_rpc += 1;
        self.calls.insert(rpc, Call { request, node, kind });
        if self.nodes[&node].up {
            self.send(Place::Router, Place::Node(node), body(rpc));
            let at = self.now_ms + self.config.rpc_timeout_ms;
            self.push(at, Event::CallFailed { rpc, cause: FailureCause::Timeout });
        } else {
            // Connection refused: the request never reached the node.
            let at = self.now_ms + self.rng.between(1, 5);
            self.push(at, Event::CallFailed { rpc, cause: FailureCause::NotApplied });
        }
    }

    fn call_failed(&mut self, rpc: u64, cause: FailureCause) {
        // Already answered: the timer is simply cancelled.
        let Some(call) = self.calls.remove(&rpc) else {
            return;
        };
        match cause {
            FailureCause::Timeout => self.outcome.stats.timeouts += 1,
            FailureCause::Error | FailureCause::NotApplied | FailureCause::NoFallback => {
                self.outcome.stats.refused += 1
            }
        }
        self.suspected_until.insert(call.node, self.now_ms + SUSPICION_MS);
        let input = match call.kind {
            CallKind::Coordinate => Input::Write(WriteInput::CoordinateFailed { node: call.node, cause }),
            CallKind::Replicate => Input::Write(WriteInput::ReplicateFailed { node: call.node, cause }),
            CallKind::Fetch => {
                Input::Read(ReadInput::Answer { node: call.node, answer: ReadAnswer::Failed(cause) })
            }
        };
        self.drive(call.request, input);
    }

    fn router_receive(&mut self, node: NodeId, body: Body) {
        let rpc = match &body {
            Body::Coordinated { rpc, .. }
            | Body::Refused { rpc }
            | Body::Replicated { rpc }
            | Body::Fetched { rpc, .. } => *rpc,
            other => unreachable!("storage-bound message {other:?} delivered to the router"),
        };
        // A reply after the call's timeout: the router has already reported the failure.
        let Some(call) = self.calls.remove(&rpc) else {
            return;
        };
        assert_eq!(call.node, node, "reply to call {rpc} from the wrong node");
        self.suspected_until.remove(&node);
        let input = match body {
            Body::Coordinated { dot, set, .. } => {
                Input::Write(WriteInput::Coordinated { node, set: (dot, set) })
            }
            Body::Refused { .. } => {
                Input::Write(WriteInput::CoordinateFailed { node, cause: FailureCause::NotApplied })
            }
            Body::Replicated { .. } => Input::Write(WriteInput::Replicated { node }),
            Body::Fetched { set, .. } => {
                let answer = set.map_or(ReadAnswer::NotFound, ReadAnswer::Found);
                Input::Read(ReadInput::Answer { node, answer })
            }
            _ => unreachable!(),
        };
        self.drive(call.request, input);
    }

    /// Feeds one input to a request's coordinator and carries out the effects.
    fn drive(&mut self, id: usize, input: Input) {
        match input {
            Input::Start => match self.requests[id].kind {
                RequestKind::Write(_) => self.drive_write(id, None),
                RequestKind::Read(_) => self.drive_read(id, None),
            },
            Input::Write(input) => self.drive_write(id, Some(input)),
            Input::Read(input) => self.drive_read(id, Some(input)),
            Input::Tick => match self.requests[id].kind {
                RequestKind::Write(_) => self.drive_write(id, Some(WriteInput::Tick)),
                RequestKind::Read(_) => self.drive_read(id, Some(ReadInput::Tick)),
            },
        }
    }

    /// Drives the write through the core's own loop ([`WriteCoordinator::drive`]) with the
    /// simulated transport ([`SimWrite`]); `None` starts it.
    fn drive_write(&mut self, id: usize, input: Option<WriteInput<Coordinated>>) {
        let now_ms = self.now_ms;
        let RequestKind::Write(write) = &mut self.requests[id].kind else {
            unreachable!("write input for read request {id}")
        };
        let mut machine = write.coordinator.take().expect("a write is not driven re-entrantly");
        let is_tick = matches!(input, Some(WriteInput::Tick));
        let failed_coordinator = match &input {
            Some(WriteInput::CoordinateFailed { node, .. }) => Some(*node),
            _ => None,
        };
        let mut transport = SimWrite { sim: self, id, was_finished: machine.is_finished() };
        match input {
            None => machine.drive_start(now_ms, &mut transport),
            Some(input) => machine.drive(input, now_ms, &mut transport),
        }
        if failed_coordinator.is_some() && machine.ambiguous_coordinator() == failed_coordinator {
            self.outcome.stats.ambiguous_coordinations += 1;
        }
        let RequestKind::Write(write) = &mut self.requests[id].kind else { unreachable!() };
        write.coordinator = Some(machine);
        self.schedule_tick(id, is_tick);
    }

    /// Drives the read through [`ReadCoordinator::drive`] with [`SimRead`]; `None` starts it. Checks
    /// that read repair targets exactly the answered replicas behind the merged set.
    fn drive_read(&mut self, id: usize, input: Option<ReadInput>) {
        let now_ms = self.now_ms;
        let RequestKind::Read(read) = &mut self.requests[id].kind else {
            unreachable!("read input for write request {id}")
        };
        let mut machine = read.coordinator.take().expect("a read is not driven re-entrantly");
        let was_finished = machine.is_finished();
        if let Some(ReadInput::Answer { node, answer }) = &input
            && !was_finished
        {
            match answer {
                ReadAnswer::Found(set) => {
                    read.answers.insert(*node, Some(set.clone()));
                }
                ReadAnswer::NotFound => {
                    read.answers.insert(*node, None);
                }
                ReadAnswer::Failed(_) | ReadAnswer::Refused(_) => {}
            }
        }
        let is_tick = matches!(input, Some(ReadInput::Tick));
        let mut transport = SimRead { sim: self, id, was_finished, repaired: BTreeSet::new() };
        match input {
            None => machine.drive_start(now_ms, &mut transport),
            Some(input) => machine.drive(input, now_ms, &mut transport),
        }
        let repaired = std::mem::take(&mut transport.repaired);
        if !was_finished && machine.is_finished() {
            let RequestKind::Read(read) = &self.requests[id].kind else { unreachable!() };
            // Read repair must target exactly the answered replicas that are behind the merged set.
            let expected: BTreeSet<NodeId> = match machine.merged() {
                Some(merged) => read
                    .answers
                    .iter()
                    .filter(|(_, answer)| answer.as_ref().is_none_or(|set| !set.descends(merged)))
                    .map(|(node, _)| *node)
                    .collect(),
                None => BTreeSet::new(),
            };
            if expected != repaired {
                self.violation(format!("read {id} repairs {repaired:?}, expected {expected:?}"));
            }
        }
        let RequestKind::Read(read) = &mut self.requests[id].kind else { unreachable!() };
        read.coordinator = Some(machine);
        self.schedule_tick(id, is_tick);
    }

    /// Asks for `on_tick` when the coordinator wants it. Right after a tick, asking for one at or before
    /// now would loop forever.
    fn schedule_tick(&mut self, id: usize, after_tick: bool) {
        let next = match &self.requests[id].kind {
            RequestKind::Write(write) => write.coordinator.as_ref().and_then(|c| c.next_timeout_ms()),
            RequestKind::Read(read) => read.coordinator.as_ref().and_then(|c| c.next_timeout_ms()),
        };
        let Some(at_ms) = next else {
            return;
        };
        if after_tick && at_ms <= self.now_ms {
            self.violation(format!("request {id} asks for a tick at {at_ms}ms right after one"));
            return;
        }
        if self.requests[id].scheduled_tick == Some(at_ms) {
            return;
        }
        self.requests[id].scheduled_tick = Some(at_ms);
        self.push(at_ms.max(self.now_ms), Event::Tick { request: id, at_ms });
    }

    // ---- Clients -------------------------------------------------------------------------------------

    fn client_wake(&mut self, client: usize) {
        match self.clients[client].next.clone() {
            ClientStep::Read if self.clients[client].ops_left == 0 => {
                self.clients[client].next = ClientStep::Done;
            }
            ClientStep::Read => self.start_read(client),
            ClientStep::Write { context } => self.start_write(client, context),
            step @ (ClientStep::Waiting | ClientStep::Done) => {
                self.violation(format!("client {client} woken while {step:?}"));
            }
        }
    }

    fn pick_key(&mut self, client: usize) -> Key {
        if self.config.key_per_client {
            client % self.config.keys
        } else {
            (self.rng.next_u64() % self.config.keys as u64) as Key
        }
    }

    fn start_read(&mut self, client: usize) {
        let key = self.pick_key(client);
        let required = self.rng.pick(&self.config.read_quorums);
        let plan = ReadPlan {
            replicas: PREFERENCE.to_vec(),
            required,
            suspects: self.suspects(),
            speculative_after_ms: self.now_ms + self.config.speculative_after_ms,
            deadline_ms: self.now_ms + self.config.deadline_ms,
        };
        let read = ReadRequest {
            coordinator: Some(ReadCoordinator::new(plan)),
            required,
            expected: self.clients[client].last_acked.get(&key).copied(),
            answers: BTreeMap::new(),
        };
        self.start_request(client, key, RequestKind::Read(Box::new(read)));
    }

    fn start_write(&mut self, client: usize, context: VersionVector) {
        // A write always goes to the key of the client's previous request.
        let key = self.clients[client].current_key.unwrap();
        let state = &mut self.clients[client];
        state.writes += 1;
        let value = format!("client{client}-write{}", state.writes).into_bytes();
        let state_writes = state.writes;
        let value = (!self.rng.percent(self.config.tombstone_percent)).then_some(value);
        let required = self.rng.pick(&self.config.write_quorums);
        let strict = self.rng.percent(self.config.strict_percent);
        let plan = WritePlan {
            preference: PREFERENCE.to_vec(),
            fallbacks: FALLBACKS.to_vec(),
            pending_owners: Vec::new(),
            required,
            strict_quorum: strict,
            suspects: self.suspects(),
            // The router's slowness signal is a heuristic: any coordinator order must be safe, so
            // the order varies from write to write (without drawing from the seeded stream).
            slow: PREFERENCE
                .iter()
                .copied()
                .filter(|n| (state_writes + u64::from(n.0)).is_multiple_of(4))
                .collect(),
            deadline_ms: self.now_ms + self.config.deadline_ms,
        };
        let write =
            WriteRequest { coordinator: Some(WriteCoordinator::new(plan)), context, value, strict, required };
        self.start_request(client, key, RequestKind::Write(Box::new(write)));
    }

    fn start_request(&mut self, client: usize, key: Key, kind: RequestKind) {
        let id = self.requests.len();
        self.requests.push(Request {
            client,
            key,
            started_ms: self.now_ms,
            replies: 0,
            scheduled_tick: None,
            kind,
        });
        self.clients[client].next = ClientStep::Waiting;
        self.clients[client].current_key = Some(key);
        self.drive(id, Input::Start);
    }

    /// The read replied: write next, with its context (blind when the read failed, or sometimes anyway).
    fn client_read(&mut self, client: usize, merged: Option<VersionSet>) {
        let blind = self.rng.percent(self.config.blind_percent);
        let context = match merged {
            Some(set) if !blind => set.vector().clone(),
            _ => VersionVector::new(),
        };
        self.clients[client].next = ClientStep::Write { context };
        let at = self.now_ms + self.rng.between(0, 5);
        self.push(at, Event::ClientWake { client });
    }

    /// The write replied. Next: read a key, or (sometimes, after an ack) write the same key again with
    /// the context the ack returned, without reading.
    fn client_wrote(&mut self, client: usize, acked: bool) {
        let with_ack_context = acked && self.rng.percent(self.config.ack_context_percent);
        let state = &mut self.clients[client];
        state.ops_left -= 1;
        let ack_context = state.current_key.and_then(|key| state.ack_context.get(&key).cloned());
        state.next = match ack_context {
            Some(context) if with_ack_context && state.ops_left > 0 => {
                self.outcome.stats.ack_context_writes += 1;
                ClientStep::Write { context }
            }
            _ => ClientStep::Read,
        };
        let at = self.now_ms + self.rng.between(0, 20);
        self.push(at, Event::ClientWake { client });
    }
}

/// The simulated transport of one write: effects become messages, the reply goes to the client.
struct SimWrite<'a> {
    sim: &'a mut Sim,
    id: usize,
    /// The machine had finished before this input: any effect now is a violation.
    was_finished: bool,
}

impl SimWrite<'_> {
    fn check_not_finished(&mut self, what: &str) {
        if self.was_finished {
            let id = self.id;
            self.sim.violation(format!("write {id} emitted {what} after it finished"));
        }
    }

    fn request(&self) -> (&Request, &WriteRequest) {
        let request = &self.sim.requests[self.id];
        let RequestKind::Write(write) = &request.kind else { unreachable!() };
        (request, write)
    }
}

impl WriteTransport for SimWrite<'_> {
    type Set = Coordinated;

    fn coordinate(&mut self, node: NodeId) {
        self.check_not_finished("a coordinate call");
        let id = self.id;
        let (request, write) = self.request();
        let (key, context, value, started_ms) =
            (request.key, write.context.clone(), write.value.clone(), request.started_ms);
        let sim = &mut *self.sim;
        if !PREFERENCE.contains(&node) {
            sim.violation(format!("write {id} asked non-owner {node:?} to coordinate"));
        }
        let deadline_ms = (sim.now_ms + sim.config.rpc_timeout_ms).min(started_ms + sim.config.deadline_ms);
        sim.call(id, node, CallKind::Coordinate, move |rpc| Body::Coordinate {
            rpc,
            request: id,
            key,
            context,
            value,
            deadline_ms,
        });
    }

    fn replicate(&mut self, node: NodeId, hint_for: Option<NodeId>, (_, set): Coordinated) {
        self.check_not_finished("a replicate call");
        let (id, key) = (self.id, self.request().0.key);
        if hint_for.is_none() && !PREFERENCE.contains(&node) {
            self.sim.violation(format!("write {id} sends a replica (not a hint) to {node:?}"));
        }
        self.sim.call(id, node, CallKind::Replicate, move |rpc| Body::Replicate { rpc, key, set, hint_for });
    }

    fn store_hint(&mut self, node: NodeId, hint_for: NodeId, (_, set): Coordinated) {
        self.check_not_finished("a hint");
        let key = self.request().0.key;
        self.sim.send(Place::Router, Place::Node(node), Body::StoreHint { key, set, owner: hint_for });
    }

    fn reply(&mut self, reply: WriteReply<Coordinated>) {
        self.check_not_finished("a reply");
        let id = self.id;
        let (request, write) = self.request();
        let (key, client, strict, required) = (request.key, request.client, write.strict, write.required);
        let sim = &mut *self.sim;
        sim.requests[id].replies += 1;
        if sim.requests[id].replies > 1 {
            sim.violation(format!("write {id} replied again: {reply:?}"));
            return;
        }
        let acked = matches!(reply, WriteReply::Acked { .. });
        match reply {
            WriteReply::Acked { set: (dot, set), acks, hinted_acks, required: replied_required } => {
                let counted = if strict { acks } else { acks + hinted_acks };
                if counted < required || replied_required != required {
                    sim.violation(format!(
                        "write {id} acked with acks={acks} hinted={hinted_acks} \
                         required={replied_required} (W={required}, strict={strict})"
                    ));
                }
                sim.outcome.stats.hinted_acks += hinted_acks as u64;
                sim.outcome.acked.push(AckedWrite {
                    request: id,
                    key,
                    dot,
                    acks,
                    hinted_acks,
                    at_ms: sim.now_ms,
                });
                sim.clients[client].last_acked.insert(key, dot);
                sim.clients[client].ack_context.insert(key, set.vector().clone());
            }
            WriteReply::QuorumNotReached { .. } => sim.outcome.stats.write_failures += 1,
            WriteReply::Rejected(refusal) => sim
                .violation(format!("write {id} rejected although no node refuses definitively: {refusal:?}")),
        }
        sim.client_wrote(client, acked);
    }
}

/// The simulated transport of one read.
struct SimRead<'a> {
    sim: &'a mut Sim,
    id: usize,
    was_finished: bool,
    /// The replicas this input's effects repaired.
    repaired: BTreeSet<NodeId>,
}

impl SimRead<'_> {
    fn check_not_finished(&mut self, what: &str) {
        if self.was_finished {
            let id = self.id;
            self.sim.violation(format!("read {id} emitted {what} after it finished"));
        }
    }
}

impl ReadTransport for SimRead<'_> {
    fn fetch(&mut self, node: NodeId) {
        self.check_not_finished("a fetch");
        let (id, key) = (self.id, self.sim.requests[self.id].key);
        if !PREFERENCE.contains(&node) {
            self.sim.violation(format!("read {id} fetches from non-owner {node:?}"));
        }
        self.sim.call(id, node, CallKind::Fetch, move |rpc| Body::Fetch { rpc, key });
    }

    fn repair(&mut self, node: NodeId, set: VersionSet) {
        self.check_not_finished("a repair");
        self.repaired.insert(node);
        let key = self.sim.requests[self.id].key;
        self.sim.outcome.stats.repairs += 1;
        self.sim.send(Place::Router, Place::Node(node), Body::Repair { key, set });
    }

    fn reply(&mut self, reply: ReadReply) {
        self.check_not_finished("a reply");
        let id = self.id;
        let sim = &mut *self.sim;
        let request = &sim.requests[id];
        let RequestKind::Read(read) = &request.kind else { unreachable!() };
        let (key, client, started_ms) = (request.key, request.client, request.started_ms);
        let (required, expected) = (read.required, read.expected);
        sim.requests[id].replies += 1;
        if sim.requests[id].replies > 1 {
            sim.violation(format!("read {id} replied again: {reply:?}"));
            return;
        }
        let merged = match reply {
            ReadReply::Answered { merged, answered } => {
                if answered < required {
                    sim.violation(format!("read {id} answered with {answered} < R={required}"));
                }
                Some(merged)
            }
            ReadReply::QuorumNotReached { .. } => {
                sim.outcome.stats.read_failures += 1;
                None
            }
            ReadReply::Rejected(refusal) => {
                sim.violation(format!(
                    "read {id} rejected although no node refuses definitively: {refusal:?}"
                ));
                None
            }
        };
        sim.outcome.reads.push(ReadRecord {
            request: id,
            key,
            required,
            started_ms,
            expected,
            merged: merged.clone(),
        });
        sim.client_read(client, merged.flatten());
    }
}

enum Input {
    Start,
    Write(WriteInput<Coordinated>),
    Read(ReadInput),
    Tick,
}

// ---- Invariants ----------------------------------------------------------------------------------------

/// The end-of-run invariants (see the module docs); `Err` lists every problem found.
fn check(outcome: &Outcome) -> Result<(), String> {
    let mut problems = outcome.violations.clone();

    // 1. Convergence.
    let reference = &outcome.converged[&PREFERENCE[0]];
    for node in &PREFERENCE[1..] {
        if outcome.converged[node] != *reference {
            problems.push(format!(
                "replicas diverge after anti-entropy: {:?} has {:?}, {node:?} has {:?}",
                PREFERENCE[0], reference, outcome.converged[node]
            ));
        }
    }

    let mut issued = BTreeSet::new();
    let mut dots_of_request: BTreeMap<usize, Vec<&Created>> = BTreeMap::new();
    for created in &outcome.created {
        if !issued.insert((created.key, created.dot)) {
            problems.push(format!("key {}: dot {:?} issued twice", created.key, created.dot));
        }
        dots_of_request.entry(created.request).or_default().push(created);
    }

    // 5. One client write, one dot: a second coordinator is asked only after a call that certainly
    //    had no effect, so no write has a twin that a context naming its other dot would miss.
    for (request, dots) in &dots_of_request {
        if dots.len() > 1 {
            let dots: Vec<Dot> = dots.iter().map(|c| c.dot).collect();
            problems.push(format!("request {request} was applied as {} dots: {dots:?}", dots.len()));
        }
    }

    // 6. A context covers a write, not just a dot: once any write's context covered one dot of a
    //    request, no dot of that request may survive (a deleted or overwritten value never returns).
    for (&request, dots) in &dots_of_request {
        let covering = outcome
            .created
            .iter()
            .find(|c| c.request != request && dots.iter().any(|d| c.key == d.key && c.context.covers(d.dot)));
        let Some(covering) = covering else { continue };
        for created in dots {
            let key_set = &reference[&created.key];
            if key_set.siblings().iter().any(|s| s.dot == created.dot) {
                let acked = outcome.acked.iter().any(|a| a.request == request);
                problems.push(format!(
                    "key {}: request {request} ({}) came back as dot {:?} after request {} ({}) \
                     superseded it",
                    created.key,
                    if acked { "acknowledged" } else { "outcome unknown" },
                    created.dot,
                    covering.request,
                    if covering.value.is_some() { "overwrite" } else { "delete" },
                ));
            }
        }
    }

    for (&key, final_set) in reference {
        let created: Vec<&Created> = outcome.created.iter().filter(|c| c.key == key).collect();
        let superseded = |dot: Dot| created.iter().any(|c| c.context.covers(dot));

        // 3a. Every final sibling is a write that happened, with its value.
        for sibling in final_set.siblings() {
            match created.iter().find(|c| c.dot == sibling.dot) {
                None => problems.push(format!("key {key}: sibling {:?} was never written", sibling.dot)),
                Some(c) if c.value != sibling.value => problems.push(format!(
                    "key {key}: sibling {:?} holds {:?}, was written with {:?}",
                    sibling.dot, sibling.value, c.value
                )),
                Some(_) => {}
            }
        }

        for c in &created {
            if !final_set.vector().covers(c.dot) {
                problems.push(format!("key {key}: final vector does not cover written dot {:?}", c.dot));
            }
            let present = final_set.siblings().iter().any(|s| s.dot == c.dot);
            if present || superseded(c.dot) {
                continue;
            }
            match outcome.acked.iter().find(|a| a.key == key && a.dot == c.dot) {
                // 2. No acknowledged write lost.
                Some(acked) => problems.push(format!(
                    "key {key}: acknowledged write lost: dot {:?} (request {}, acks={}, hinted={}) is \
                     gone and no write's context covers it",
                    acked.dot, acked.request, acked.acks, acked.hinted_acks
                )),
                // 3b. Nothing superseded without cause.
                None => problems.push(format!(
                    "key {key}: dot {:?} (request {}) vanished though no write's context covers it",
                    c.dot, c.request
                )),
            }
        }
    }

    // 4. Quorum intersection: acks + R > N means the read met a replica that acknowledged the write.
    for read in &outcome.reads {
        let Some(merged) = &read.merged else {
            continue;
        };
        for acked in &outcome.acked {
            let overlaps = acked.acks + read.required > REPLICATION_FACTOR;
            if acked.key != read.key || acked.at_ms >= read.started_ms || !overlaps {
                continue;
            }
            if !merged.as_ref().is_some_and(|set| set.vector().covers(acked.dot)) {
                problems.push(format!(
                    "read {} (R={}, started {}ms) missed write {} acked at {}ms by {} preference replicas",
                    read.request, read.required, read.started_ms, acked.request, acked.at_ms, acked.acks
                ));
            }
        }
    }

    if problems.is_empty() {
        return Ok(());
    }
    let shown = problems.len().min(10);
    Err(format!("{} invariant violations, first {shown}:\n{}", problems.len(), problems[..shown].join("\n")))
}

// ---- Tests ---------------------------------------------------------------------------------------------

#[test]
fn simulation_many_seeds() {
    let config = Config::chaos();
    let mut total = Stats::default();
    let (mut acked, mut siblings, mut unknown_outcomes) = (0, 0, 0);
    for seed in 0..200 {
        let outcome = run_checked(seed, &config);
        let s = &outcome.stats;
        total.dropped += s.dropped;
        total.lost_to_down_node += s.lost_to_down_node;
        total.timeouts += s.timeouts;
        total.refused += s.refused;
        total.write_failures += s.write_failures;
        total.read_failures += s.read_failures;
        total.hinted_acks += s.hinted_acks;
        total.repairs += s.repairs;
        total.hints_stored += s.hints_stored;
        total.hints_handed_off += s.hints_handed_off;
        total.node_crashes += s.node_crashes;
        total.node_pauses += s.node_pauses;
        total.coordinate_refusals += s.coordinate_refusals;
        total.ambiguous_coordinations += s.ambiguous_coordinations;
        acked += outcome.acked.len();
        siblings += outcome.converged[&PREFERENCE[0]].values().filter(|set| set.siblings().len() > 1).count();
        // A write whose coordinator may have applied it although the call failed.
        unknown_outcomes += s.ambiguous_coordinations;
    }
    // The simulation must exercise the interesting paths, or passing means little.
    let exercised = [
        ("acked writes", acked as u64),
        ("keys left with siblings", siblings as u64),
        ("writes ended with an ambiguous coordinator", unknown_outcomes),
        ("coordinate calls refused (failover)", total.coordinate_refusals),
        ("node pauses", total.node_pauses),
        ("dropped messages", total.dropped),
        ("messages lost to a down node", total.lost_to_down_node),
        ("call timeouts", total.timeouts),
        ("refused calls", total.refused),
        ("write quorum failures", total.write_failures),
        ("read quorum failures", total.read_failures),
        ("hinted acks", total.hinted_acks),
        ("read repairs", total.repairs),
        ("hints stored", total.hints_stored),
        ("hints handed off during the run", total.hints_handed_off),
        ("node crashes", total.node_crashes),
    ];
    for (what, count) in exercised {
        assert!(count > 0, "200 seeds never exercised: {what} ({total:?})");
    }
}

#[test]
fn simulation_replays_seed_from_env() {
    let seed = match std::env::var("PAIRDB_SIM_SEED") {
        Ok(text) => {
            let text = text.trim();
            match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            }
            .unwrap_or_else(|err| panic!("PAIRDB_SIM_SEED={text:?} is not a u64: {err}"))
        }
        Err(_) => DEFAULT_SEED,
    };
    let outcome = run_checked(seed, &Config::chaos());
    assert!(!outcome.acked.is_empty(), "seed {seed}: no write was acknowledged");
}

#[test]
fn simulation_is_deterministic() {
    let config = Config::chaos();
    for seed in [DEFAULT_SEED, 7, 12_345] {
        let first = simulate(seed, &config);
        let second = simulate(seed, &config);
        assert!(first == second, "seed {seed}: two runs differ\n{first:?}\n---\n{second:?}");
        assert!(!first.created.is_empty(), "seed {seed}: nothing was written");
    }
    // And the seed matters.
    assert_ne!(simulate(1, &config).created, simulate(2, &config).created);
}

/// No loss, no crash, W = 2 and R = 2 (R + W > N), one writer per key: every read returns exactly the
/// client's last acknowledged write, and every request succeeds.
#[test]
fn simulation_read_your_writes_without_failures() {
    let calm = Config::calm();
    let config = Config {
        keys: calm.clients,
        key_per_client: true,
        read_quorums: vec![2],
        write_quorums: vec![2],
        strict_percent: 0,
        blind_percent: 0,
        tombstone_percent: 0,
        ..calm
    };
    for seed in 0..20 {
        let outcome = run_checked(seed, &config);
        let writes = config.clients * config.ops_per_client;
        assert_eq!(outcome.acked.len(), writes, "seed {seed}: a write failed without failures");
        assert_eq!(outcome.stats.timeouts + outcome.stats.refused, 0, "seed {seed}");
        let mut checked = 0;
        for read in &outcome.reads {
            let Some(merged) = &read.merged else {
                panic!("seed {seed}: read {} failed without failures", read.request);
            };
            let Some(expected) = read.expected else {
                continue;
            };
            let seen: Vec<Dot> = merged.iter().flat_map(|set| set.live_values()).map(|s| s.dot).collect();
            assert_eq!(
                seen,
                vec![expected],
                "seed {seed}: read {} of key {} does not return exactly the last acked write",
                read.request,
                read.key
            );
            checked += 1;
        }
        assert_eq!(checked, config.clients * (config.ops_per_client - 1), "seed {seed}");
    }
}

/// Node 3 (a preference replica) is down for the whole run; non-strict writes at W = 3 are still acked,
/// through hints on the fallbacks, and once it comes back and receives its hints (before any
/// anti-entropy) it holds every acknowledged write.
#[test]
fn simulation_hinted_handoff_covers_a_down_replica() {
    const DOWN: NodeId = NodeId(3);
    let config = Config {
        outages: Outages::Fixed(vec![DOWN]),
        read_quorums: vec![1, 2],
        write_quorums: vec![3],
        strict_percent: 0,
        ..Config::calm()
    };
    for seed in 0..20 {
        let outcome = run_checked(seed, &config);
        let writes = config.clients * config.ops_per_client;
        assert_eq!(outcome.acked.len(), writes, "seed {seed}: W=3 writes must be acked through hints");
        assert!(
            outcome.acked.iter().all(|a| a.acks == 2 && a.hinted_acks == 1),
            "seed {seed}: every ack must be 2 owners + 1 hint: {:?}",
            outcome.acked
        );
        let healed = &outcome.after_handoff[&DOWN];
        for acked in &outcome.acked {
            let set = &healed[&acked.key];
            let present = set.siblings().iter().any(|s| s.dot == acked.dot);
            let superseded =
                outcome.created.iter().any(|c| c.key == acked.key && c.context.covers(acked.dot));
            assert!(
                set.vector().covers(acked.dot) && (present || superseded),
                "seed {seed}: {DOWN:?} lacks acked write {acked:?} after handoff: {set:?}"
            );
        }
        // Stronger: hints alone brought it fully up to date.
        assert_eq!(
            outcome.after_handoff[&DOWN], outcome.converged[&DOWN],
            "seed {seed}: {DOWN:?} needed anti-entropy"
        );
    }
}

/// Sums what many seeds of one setting exercised, checking each seed.
fn run_seeds(config: &Config, seeds: std::ops::Range<u64>) -> Stats {
    let mut total = Stats::default();
    for seed in seeds {
        let outcome = run_checked(seed, config);
        let s = &outcome.stats;
        total.timeouts += s.timeouts;
        total.node_pauses += s.node_pauses;
        total.held_messages += s.held_messages;
        total.coordinate_refusals += s.coordinate_refusals;
        total.late_coordinates_refused += s.late_coordinates_refused;
        total.ambiguous_coordinations += s.ambiguous_coordinations;
        total.ack_context_writes += s.ack_context_writes;
        total.write_failures += s.write_failures;
        total.repairs += s.repairs;
        let acked: BTreeSet<usize> = outcome.acked.iter().map(|a| a.request).collect();
        let mut coordinated: BTreeMap<usize, usize> = BTreeMap::new();
        for created in &outcome.created {
            *coordinated.entry(created.request).or_default() += 1;
        }
        // Writes a coordinator applied that the client was not told succeeded: what a twin was made of.
        total.applied_but_unacknowledged +=
            coordinated.keys().filter(|request| !acked.contains(request)).count() as u64;
    }
    total
}

/// Issue 16: puts followed by deletes and overwrites carrying the put's ack context (and deletes
/// after reads), while replicas pause (their messages wait and are handled late), replies are
/// dropped and calls time out. Over thousands of seeds no deleted or overwritten write comes back
/// (invariant 6) and no write is applied under two dots (invariant 5).
///
/// Before writes stopped failing over after an ambiguous coordinate call, this found resurrections
/// at once. With that rule undone (`on_coordinate_failed` trying the next replica whatever the
/// cause), 1,610 of these 2,000 seeds bring a deleted or overwritten write back (invariant 6), the
/// first being seed 1: "key 0: request 78 (acknowledged) came back as dot Dot { actor: Actor(101),
/// counter: 11 } after request 81 (delete) superseded it" (and every seed breaks invariant 5). In
/// the other settings: 892 of the 1,000 seeds of the no-deadline test below, and 79 of the 200
/// seeds of `simulation_many_seeds` (first: seed 7, an overwrite).
#[test]
fn simulation_acknowledged_deletes_and_overwrites_stay_under_pauses() {
    let config = Config::pauses();
    let total = run_seeds(&config, 0..2_000);
    let exercised = [
        ("node pauses", total.node_pauses),
        ("messages handled late by a resumed node", total.held_messages),
        ("call timeouts", total.timeouts),
        ("writes with the previous ack's context", total.ack_context_writes),
        ("ambiguous coordinate calls", total.ambiguous_coordinations),
        ("writes applied but not acknowledged", total.applied_but_unacknowledged),
        ("coordinate calls refused before applying", total.coordinate_refusals),
        ("late coordinate calls refused by the deadline", total.late_coordinates_refused),
        ("read repairs", total.repairs),
    ];
    for (what, count) in exercised {
        assert!(count > 0, "2,000 seeds never exercised: {what} ({total:?})");
    }
}

/// The same without the storage node's deadline check (clocks too skewed for it, or a node paused
/// past every deadline): late coordinate calls are applied, and still nothing comes back, because
/// the router never asked a second coordinator after a call that may have been applied.
#[test]
fn simulation_deletes_stay_without_the_node_deadline_check() {
    let config = Config { node_checks_deadline: false, ..Config::pauses() };
    let total = run_seeds(&config, 10_000..11_000);
    assert_eq!(total.late_coordinates_refused, 0);
    assert!(total.applied_but_unacknowledged > 0, "{total:?}");
    assert!(total.held_messages > 0, "{total:?}");
}
