//! Coalescing of concurrent point calls to one storage node.
//!
//! Each storage node has one lane per kind of point call (get, coordinate, replicate). A call
//! that finds fewer than `leads` calls of its kind in flight to the node goes out alone at once, so
//! a lone request never waits; a call that finds them busy queues, and when a call in flight ends
//! the queue leaves as one batched RPC (at most [`MAX_BATCH_ITEMS`] items and
//! [`MAX_BATCH_BYTES`] of payload), sent by a task of its own so no client's cancellation stops it.
//! There is no timer: a batch forms only while the node is busy.
//!
//! Invariants: a lane never holds queued calls while none of its calls is in flight (whoever ends
//! the last call in flight takes the queue); each queued call keeps its own deadline and gets its
//! own answer (one item's refusal fails only that item); a call whose caller stopped waiting, or
//! whose deadline passed while queued, is dropped before sending.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use pairdb_core::ring::NodeId;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::pool::NodeClient;
use crate::storage::CallError;

/// The most calls one coalesced RPC carries.
pub const MAX_BATCH_ITEMS: usize = 128;
/// The most payload (values, encoded sets) one coalesced RPC carries; a single larger item still
/// goes, alone.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// The most calls one lane queues; further calls go out alone (still bounded by the node's
/// in-flight limit).
pub const MAX_QUEUED: usize = 4 * MAX_BATCH_ITEMS;

/// One kind of coalescable call: what a call carries, what it answers, and how a batch of them is
/// sent.
pub trait Coalesced: Sized + Send + 'static {
    type Payload: Send + 'static;
    type Output: Send + 'static;
    /// This kind's lane on a node.
    fn lane(client: &NodeClient) -> &Lane<Self>;
    /// The payload bytes a call adds to a batch.
    fn weight(payload: &Self::Payload) -> usize;
    /// Sends `batch` as one RPC and answers every waiter.
    fn send_batch(
        client: Arc<NodeClient>,
        batch: Vec<Waiter<Self>>,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// A queued call: its payload, where its answer goes, its caller's span (the batch RPC's span
/// links to it) and when its caller stops waiting.
pub struct Waiter<C: Coalesced> {
    pub payload: C::Payload,
    pub reply: oneshot::Sender<Result<C::Output, CallError>>,
    pub span: tracing::Span,
    pub deadline: Instant,
}

impl<C: Coalesced> std::fmt::Debug for Waiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

/// How a call was admitted to its lane.
#[derive(Debug)]
pub enum Admission<C: Coalesced> {
    /// Send it alone, holding one of the lane's lead slots until it ends.
    Lead(Waiter<C>, LeadSlot<C>),
    /// Send it alone, outside the lane (coalescing off, or the queue full).
    Alone(Waiter<C>),
    /// It was queued; its answer comes on the receiver.
    Queued(oneshot::Receiver<Result<C::Output, CallError>>),
}

/// The calls of one kind in flight to one node and those waiting for them.
pub struct Lane<C: Coalesced> {
    leads: usize,
    /// Calls sent in batches, and the batches (also exported: `pairdb_router_coalesced_*`).
    coalesced_calls: AtomicU64,
    batches: AtomicU64,
    calls_metric: metrics::Counter,
    batches_metric: metrics::Counter,
    /// Set once the node answered that it does not know the batched RPC (an older release).
    unsupported: AtomicBool,
    state: Mutex<LaneState<C>>,
}

struct LaneState<C: Coalesced> {
    in_flight: usize,
    /// When the call now in flight (the newest batch, or the lead call) left; `None` while idle.
    sent_at: Option<Instant>,
    queue: VecDeque<Waiter<C>>,
}

impl<C: Coalesced> std::fmt::Debug for Lane<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("leads", &self.leads).finish_non_exhaustive()
    }
}

impl<C: Coalesced> Lane<C> {
    /// A lane of `call`s to `node` that lets `leads` calls out alone before queueing (0: never
    /// queues).
    pub fn new(leads: usize, node: NodeId, call: &'static str) -> Self {
        let node = node.0.to_string();
        Self {
            leads,
            coalesced_calls: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            calls_metric: metrics::counter!("pairdb_router_coalesced_calls_total", "node_id" => node.clone(), "call" => call),
            batches_metric: metrics::counter!("pairdb_router_coalesced_batches_total", "node_id" => node, "call" => call),
            unsupported: AtomicBool::new(false),
            state: Mutex::new(LaneState { in_flight: 0, sent_at: None, queue: VecDeque::new() }),
        }
    }

    /// Calls this lane sent inside batches, and how many batches carried them.
    pub fn coalesced(&self) -> (u64, u64) {
        (self.coalesced_calls.load(Ordering::Relaxed), self.batches.load(Ordering::Relaxed))
    }

    /// How long the call this lane has in flight has been out (`None` while idle): a node stalled
    /// by a flush, a compaction or a long fsync shows here before any call to it fails.
    pub fn busy_for(&self, now: Instant) -> Option<std::time::Duration> {
        self.state().sent_at.map(|sent| now.saturating_duration_since(sent))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LaneState<C>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a call with `payload` that waits until `deadline`, on `client`'s lane.
    pub fn admit(client: &Arc<NodeClient>, payload: C::Payload, deadline: Instant) -> Admission<C> {
        let lane = C::lane(client);
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter { payload, reply, span: tracing::Span::current(), deadline };
        if lane.leads == 0 || lane.unsupported.load(Ordering::Relaxed) {
            return Admission::Alone(waiter);
        }
        let mut state = lane.state();
        if state.in_flight < lane.leads {
            state.in_flight += 1;
            state.sent_at.get_or_insert_with(Instant::now);
            return Admission::Lead(waiter, LeadSlot { client: client.clone(), kind: PhantomData });
        }
        if state.queue.len() >= MAX_QUEUED {
            return Admission::Alone(waiter);
        }
        state.queue.push_back(waiter);
        debug_assert!(state.in_flight > 0, "queued calls need a call in flight to take them");
        Admission::Queued(answer)
    }

    /// Sends every later call of this lane alone.
    pub fn stop_coalescing(&self) {
        self.unsupported.store(true, Ordering::Relaxed);
    }

    /// The next batch once a call in flight ended, or `None` after releasing its slot. Calls whose
    /// caller is gone or whose deadline passed are dropped here, unsent.
    fn next_batch(&self, now: Instant) -> Option<Vec<Waiter<C>>> {
        let mut state = self.state();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(waiter) = state.queue.front() {
            let weight = C::weight(&waiter.payload);
            if !batch.is_empty() && (batch.len() == MAX_BATCH_ITEMS || bytes + weight > MAX_BATCH_BYTES) {
                break;
            }
            let Some(waiter) = state.queue.pop_front() else { break };
            if waiter.reply.is_closed() || waiter.deadline <= now {
                continue;
            }
            bytes += weight;
            batch.push(waiter);
        }
        if batch.is_empty() {
            debug_assert!(state.in_flight > 0);
            state.in_flight -= 1;
            if state.in_flight == 0 {
                state.sent_at = None;
            }
            return None;
        }
        state.sent_at = Some(now);
        drop(state);
        self.coalesced_calls.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.calls_metric.increment(batch.len() as u64);
        self.batches_metric.increment(1);
        Some(batch)
    }
}

/// A lead slot of a lane: when dropped (its call ended, or its caller stopped waiting), the calls
/// queued meanwhile leave as batches from a task of their own.
pub struct LeadSlot<C: Coalesced> {
    client: Arc<NodeClient>,
    kind: PhantomData<fn() -> C>,
}

impl<C: Coalesced> std::fmt::Debug for LeadSlot<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeadSlot").field("node", &self.client.node).finish()
    }
}

impl<C: Coalesced> Drop for LeadSlot<C> {
    fn drop(&mut self) {
        let lane = C::lane(&self.client);
        let Some(first) = lane.next_batch(Instant::now()) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Dropped outside the runtime (the process is ending): the queued calls cannot be
            // sent; dropping them answers their callers, and the lane is left empty and idle.
            drop(first);
            while lane.next_batch(Instant::now()).is_some() {}
            return;
        };
        let client = self.client.clone();
        runtime.spawn(async move {
            let mut batch = first;
            loop {
                C::send_batch(client.clone(), batch).await;
                match C::lane(&client).next_batch(Instant::now()) {
                    Some(next) => batch = next,
                    None => break,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;
    use crate::pool::StoragePool;
    use crate::storage::CoordinateLane;

    /// A lane counts as busy from the moment its call leaves until the last call in flight ends, and
    /// the pool names the node slow only past the bound.
    #[tokio::test]
    async fn a_lane_is_busy_while_its_call_is_out_and_idle_after() {
        let pool = StoragePool::new(8, Duration::from_secs(1));
        let client = pool.client(NodeId(1), "127.0.0.1:9").expect("a lazily connecting client");
        assert_eq!(client.lanes.coordinate.busy_for(Instant::now()), None);
        let nodes = [NodeId(1), NodeId(2)];
        assert!(pool.slow(&nodes, Duration::ZERO).is_empty());
        let deadline = Instant::now() + Duration::from_secs(5);
        let Admission::Lead(_waiter, slot) =
            Lane::<CoordinateLane>::admit(&client, Default::default(), deadline)
        else {
            panic!("the first call on an idle lane leads");
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let busy = client.lanes.coordinate.busy_for(Instant::now()).expect("busy while the call is out");
        assert!(busy >= Duration::from_millis(30), "{busy:?}");
        assert_eq!(pool.slow(&nodes, Duration::from_millis(20)), BTreeSet::from([NodeId(1)]));
        assert!(
            pool.slow(&nodes[1..], Duration::from_millis(20)).is_empty(),
            "only the candidates asked about"
        );
        assert!(pool.slow(&nodes, Duration::from_secs(3600)).is_empty());
        drop(slot);
        assert_eq!(client.lanes.coordinate.busy_for(Instant::now()), None);
        assert!(pool.slow(&nodes, Duration::ZERO).is_empty());
    }
}
