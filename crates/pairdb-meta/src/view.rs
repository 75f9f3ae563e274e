//! The replica's in-memory view of the cluster, and the fan-out of changes to watch subscribers.
//!
//! The view is derived, never authoritative: it is loaded from a [`Snapshot`] of the database and then
//! advanced by the change log ([`crate::follower`]). Every applied change is broadcast to the
//! subscribers under the same lock that [`WatchSource::subscribe`] takes, so a new subscriber gets a
//! snapshot at revision R and then exactly the events after R — none missed, none twice.
//!
//! The broadcast channel is bounded (`--watch-buffer`): a subscriber that falls that far behind is
//! disconnected (its receiver reports lag) and reconnects to a fresh snapshot, instead of holding
//! memory for it. A full reload (after the change log was pruned below the view's revision) also
//! disconnects every subscriber, for the same reason: they cannot be given a diff.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use pairdb_core::ring::NodeId;
use tokio::sync::broadcast;

use crate::model::{ApiKeyHash, ContextKeySet, StorageNode, Tenant, Topology};
use crate::persistence::Snapshot;

/// One change, as published on the watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    TopologyCurrent(Topology),
    TopologyPending(Topology),
    TopologyPendingCleared,
    NodeChanged(StorageNode),
    TenantChanged(Tenant),
    TenantDeleted(String),
    ApiKeyAdded(ApiKeyHash),
    ApiKeyRevoked(String),
    /// The context keys in use changed (a rotation); routers only.
    ContextKeysChanged(ContextKeySet),
    /// The leader's count of live routers changed ([`crate::routers`]).
    LiveRoutersChanged(u32),
}

/// An event with the revision of the change that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionedEvent {
    pub revision: u64,
    pub event: Event,
}

/// What a new subscriber starts from.
#[derive(Debug, Clone)]
pub struct ViewSnapshot {
    pub revision: u64,
    pub current: Option<Topology>,
    pub pending: Option<Topology>,
    pub nodes: Vec<StorageNode>,
    pub tenants: Vec<Tenant>,
    pub api_keys: Vec<ApiKeyHash>,
    pub context_keys: ContextKeySet,
    /// 0 = not known.
    pub live_routers: u32,
}

#[derive(Debug)]
struct State {
    loaded: bool,
    revision: u64,
    current: Option<Topology>,
    pending: Option<Topology>,
    nodes: BTreeMap<NodeId, StorageNode>,
    tenants: BTreeMap<String, Tenant>,
    api_keys: BTreeMap<String, ApiKeyHash>,
    context_keys: ContextKeySet,
    live_routers: u32,
    sender: broadcast::Sender<Arc<RevisionedEvent>>,
}

/// The in-memory view (see the module documentation).
#[derive(Debug)]
pub struct WatchSource {
    state: Mutex<State>,
    buffer: usize,
}

impl WatchSource {
    /// An empty, not yet loaded view whose subscribers may fall `buffer` events behind.
    pub fn new(buffer: usize) -> Self {
        let (sender, _) = broadcast::channel(buffer.max(1));
        Self {
            state: Mutex::new(State {
                loaded: false,
                revision: 0,
                current: None,
                pending: None,
                nodes: BTreeMap::new(),
                tenants: BTreeMap::new(),
                api_keys: BTreeMap::new(),
                context_keys: ContextKeySet::default(),
                live_routers: 0,
                sender,
            }),
            buffer: buffer.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The revision the view reflects, or `None` before the first load.
    pub fn revision(&self) -> Option<u64> {
        let state = self.lock();
        state.loaded.then_some(state.revision)
    }

    /// Replaces the whole view. After the first load this disconnects every subscriber, which then
    /// resumes from a fresh snapshot.
    pub fn replace(&self, snapshot: Snapshot) {
        let mut state = self.lock();
        if state.loaded {
            let (sender, _) = broadcast::channel(self.buffer);
            // Dropping the old sender ends every subscriber's receiver.
            state.sender = sender;
        }
        state.loaded = true;
        state.revision = snapshot.state.revision;
        state.current = snapshot.current;
        state.pending = snapshot.pending;
        state.nodes = snapshot.nodes.into_iter().map(|node| (node.node_id, node)).collect();
        state.tenants =
            snapshot.tenants.into_iter().map(|tenant| (tenant.tenant_id.clone(), tenant)).collect();
        state.api_keys =
            snapshot.api_keys.iter().map(|key| (key.key_id.clone(), ApiKeyHash::from(key))).collect();
        state.context_keys = snapshot.context_keys;
        state.live_routers = snapshot.state.live_routers;
    }

    /// Applies the change with `revision` (which must follow the view's) and broadcasts its event.
    /// `None` advances the revision without an event (the entity changed again later and its
    /// newer state will be published by that later change).
    pub fn apply(&self, revision: u64, event: Option<Event>) {
        let mut state = self.lock();
        if !state.loaded || revision <= state.revision {
            return;
        }
        state.revision = revision;
        let Some(event) = event else { return };
        match &event {
            Event::TopologyCurrent(topology) => state.current = Some(topology.clone()),
            Event::TopologyPending(topology) => state.pending = Some(topology.clone()),
            Event::TopologyPendingCleared => state.pending = None,
            Event::NodeChanged(node) => {
                state.nodes.insert(node.node_id, node.clone());
            }
            Event::TenantChanged(tenant) => {
                state.tenants.insert(tenant.tenant_id.clone(), tenant.clone());
            }
            Event::TenantDeleted(tenant_id) => {
                state.tenants.remove(tenant_id);
            }
            Event::ApiKeyAdded(key) => {
                state.api_keys.insert(key.key_id.clone(), key.clone());
            }
            Event::ApiKeyRevoked(key_id) => {
                state.api_keys.remove(key_id);
            }
            Event::ContextKeysChanged(keys) => state.context_keys = keys.clone(),
            Event::LiveRoutersChanged(count) => state.live_routers = *count,
        }
        // No receivers is fine: nobody is watching.
        let _ = state.sender.send(Arc::new(RevisionedEvent { revision, event }));
    }

    /// A snapshot and a receiver of every event after it, or `None` before the first load.
    pub fn subscribe(&self) -> Option<(ViewSnapshot, broadcast::Receiver<Arc<RevisionedEvent>>)> {
        let state = self.lock();
        if !state.loaded {
            return None;
        }
        let snapshot = ViewSnapshot {
            revision: state.revision,
            current: state.current.clone(),
            pending: state.pending.clone(),
            nodes: state.nodes.values().cloned().collect(),
            tenants: state.tenants.values().cloned().collect(),
            api_keys: state.api_keys.values().cloned().collect(),
            context_keys: state.context_keys.clone(),
            live_routers: state.live_routers,
        };
        Some((snapshot, state.sender.subscribe()))
    }
}
