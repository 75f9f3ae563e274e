//! A process's picture of the cluster (routers and storage nodes), built only from the metadata
//! service's watch stream: the current topology (and the pending one while a migration runs), node
//! addresses and statuses, tenant settings and (routers only) API-key hashes and context keys.
//! [`follow`] keeps it
//! current: a snapshot, then changes; on any error it keeps the last view (work goes on from it) and
//! reconnects with capped exponential backoff and jitter, starting over from a snapshot.
//!
//! Invariant: readers take an `Arc` snapshot and never hold a lock across an await; the watch task
//! replaces the whole view atomically on every event, so a reader sees one consistent revision.
//!
//! [`SharedView::session`] says whether the view is live (a watch session delivered its snapshot and
//! has not broken since) and which session it is: work that must not act on a stale view (a storage
//! node deleting data it no longer owns) requires one unbroken session. HTTP/2 keepalive pings
//! detect a silently dead connection to meta within about 20 s.

use crate::shutdown::Shutdown;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use pairdb_core::context::{ContextKey, ContextKeyRing};
use pairdb_core::gc::{ClusterPlacement, PlacementView, TenantPlacement, TenantReplication};
use pairdb_core::quorum::Consistency;
use pairdb_core::ring::{Assignment, NodeId, RingError};
use pairdb_core::token::{InvalidPartitionCount, PartitionCount};
use pairdb_proto::admin::v1::NodeStatus;
use pairdb_proto::cluster::v1 as pb;
use pairdb_proto::convert;

pub use pairdb_core::tenant::{ConflictMode, KeyGroups};

/// A tenant's settings as pushed by meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSettings {
    pub tenant_id: String,
    pub replication_factor: usize,
    /// While a replication-factor change migrates: the factor reads (and counted acks) still use.
    pub previous_replication_factor: Option<usize>,
    pub default_consistency: Consistency,
    pub conflict_mode: ConflictMode,
    /// How the tenant's keys are placed (fixed at creation).
    pub key_groups: KeyGroups,
    pub rate_limit_ops_per_sec: u32,
    pub rate_limit_burst: u32,
    pub max_value_bytes: u64,
    pub max_siblings: usize,
    pub strict_quorum: bool,
    /// The tenant is being deleted: nothing is served or stored for it; storage nodes purge it.
    pub deleting: bool,
    /// Identifies the deletion storage nodes confirm (0 while the tenant is active).
    pub purge_seq: u64,
    /// Changes each time a tenant with this id is created (0: meta did not say).
    pub generation: u64,
    /// Meta's last evaluation found the tenant at or past its key quota: a coordinator refuses writes
    /// that would add keys (QUOTA_EXCEEDED). False from a meta older than quotas.
    pub over_key_quota: bool,
    /// The same for its byte quota: writes that would add value bytes are refused.
    pub over_byte_quota: bool,
    /// The expiry (ms after the write) a write that asks for none gets; 0 = none: such values never
    /// expire. 0 from a meta older than expiry.
    pub default_ttl_ms: u64,
    /// The longest expiry (ms after the write) any write gets; 0 = none: no cap.
    pub max_ttl_ms: u64,
}

impl TenantSettings {
    /// The replication factor requests are counted against (the old one while N changes).
    pub fn serving_replication_factor(&self) -> usize {
        self.previous_replication_factor.unwrap_or(self.replication_factor)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub address: String,
    pub down: bool,
    /// A migration left the node holding records it no longer owns and it has not reported deleting
    /// them yet: no tombstone is collected meanwhile ([`ClusterPlacement::unowned_leftovers`]).
    pub holds_unowned_data: bool,
}

/// One consistent picture of the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub revision: u64,
    /// Epoch of the current topology.
    pub epoch: u64,
    pub current: Option<Arc<Assignment>>,
    pub pending: Option<Arc<Assignment>>,
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub tenants: HashMap<String, Arc<TenantSettings>>,
    /// SHA-256 hex of an API key secret → (key id, tenant id).
    pub api_keys: HashMap<String, (String, String)>,
    /// The keys client contexts are sealed with (routers only; empty elsewhere).
    pub context_keys: ContextKeyRing,
    /// Routers meta saw alive lately (0: not known).
    pub live_routers: u32,
}

impl ClusterView {
    pub fn partitions(&self) -> Option<PartitionCount> {
        self.current.as_ref().map(|a| a.partition_count())
    }

    /// What the placement rules of [`pairdb_core::gc`] read of this view, for `tenant`.
    pub fn placement_view(&self, tenant: &str) -> PlacementView {
        PlacementView {
            topology_epoch: self.current.is_some().then_some(self.epoch),
            migration_pending: self.pending.is_some(),
            tenant: self.tenants.get(tenant).map(|t| TenantReplication {
                replication_factor: t.replication_factor,
                changing: t.previous_replication_factor.is_some(),
            }),
        }
    }

    /// What the deletion decisions of [`pairdb_core::gc::settle`] read of this view.
    pub fn cluster_placement(&self) -> ClusterPlacement {
        let tenants = self
            .tenants
            .values()
            .map(|t| TenantPlacement {
                tenant_id: t.tenant_id.clone(),
                replication_factor: t.replication_factor,
                previous_replication_factor: t.previous_replication_factor,
                deleting: t.deleting,
            })
            .collect();
        ClusterPlacement::new(self.current.is_some().then_some(self.epoch), self.pending.is_some(), tenants)
            .with_unowned_leftovers(self.unowned_leftovers())
    }

    /// Some node a migration left holding data has not reported deleting it: no tombstone may be
    /// collected ([`ClusterPlacement::unowned_leftovers`]).
    pub fn unowned_leftovers(&self) -> bool {
        self.nodes.values().any(|n| n.holds_unowned_data)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("watch event without a payload")]
    Empty,
    #[error("invalid topology: {0}")]
    Topology(#[from] RingError),
    #[error("invalid partition count: {0}")]
    PartitionCount(#[from] InvalidPartitionCount),
    #[error("invalid context key: {0}")]
    ContextKey(#[from] pairdb_core::context::ContextKeyError),
}

fn topology(topology: &pb::Topology) -> Result<Arc<Assignment>, ViewError> {
    let partitions = PartitionCount::new(topology.partition_count)?;
    let lists =
        topology.partitions.iter().map(|p| p.node_ids.iter().copied().map(NodeId).collect()).collect();
    Ok(Arc::new(Assignment::from_lists(partitions, lists)?))
}

/// Meta always names the tenant's level; a missing or unknown one is served as QUORUM.
fn consistency(value: i32) -> Consistency {
    convert::consistency_from_wire(value).ok().flatten().unwrap_or(Consistency::Quorum)
}

fn tenant(config: &pb::TenantConfig) -> TenantSettings {
    TenantSettings {
        tenant_id: config.tenant_id.clone(),
        replication_factor: config.replication_factor.max(1) as usize,
        previous_replication_factor: (config.previous_replication_factor != 0
            && config.previous_replication_factor != config.replication_factor)
            .then_some(config.previous_replication_factor as usize),
        default_consistency: consistency(config.default_consistency),
        conflict_mode: convert::conflict_mode_from_wire(config.conflict_mode)
            .ok()
            .flatten()
            .unwrap_or_default(),
        // A mode this release does not know cannot be sent by a meta of its own release: key-group
        // modes are created only after every router and storage node runs a release that knows them.
        key_groups: convert::key_groups_from_wire(config.key_groups).ok().flatten().unwrap_or_default(),
        rate_limit_ops_per_sec: config.rate_limit_ops_per_sec,
        rate_limit_burst: config.rate_limit_burst,
        max_value_bytes: if config.max_value_bytes == 0 {
            pairdb_core::validation::DEFAULT_MAX_VALUE_BYTES
        } else {
            config.max_value_bytes
        },
        max_siblings: if config.max_siblings == 0 {
            pairdb_core::validation::DEFAULT_MAX_SIBLINGS
        } else {
            config.max_siblings as usize
        },
        strict_quorum: config.strict_quorum,
        deleting: config.deleting,
        purge_seq: config.purge_seq,
        generation: config.generation,
        over_key_quota: config.over_key_quota,
        over_byte_quota: config.over_byte_quota,
        default_ttl_ms: config.default_ttl_ms,
        max_ttl_ms: config.max_ttl_ms,
    }
}

fn context_keys(keys: Option<&pb::ContextKeys>) -> Result<ContextKeyRing, ViewError> {
    let Some(keys) = keys else { return Ok(ContextKeyRing::default()) };
    let key = |k: &pb::ContextKey| ContextKey::new(k.key_id, &k.secret);
    match &keys.current {
        None => Ok(ContextKeyRing::default()),
        Some(current) => Ok(ContextKeyRing::new(key(current)?, keys.previous.as_ref().map(key).transpose()?)),
    }
}

fn node(info: &pb::NodeInfo) -> NodeEntry {
    NodeEntry {
        address: info.address.clone(),
        down: info.status == NodeStatus::Down as i32,
        holds_unowned_data: info.holds_unowned_data,
    }
}

impl ClusterView {
    /// The view after `event`.
    pub fn apply(&self, event: &pb::WatchEvent) -> Result<ClusterView, ViewError> {
        use pb::watch_event::Event;
        let mut next = match event.event.as_ref().ok_or(ViewError::Empty)? {
            Event::Snapshot(snapshot) => ClusterView {
                revision: 0,
                epoch: snapshot.current.as_ref().map_or(0, |t| t.epoch),
                current: snapshot.current.as_ref().map(topology).transpose()?,
                pending: snapshot.pending.as_ref().map(topology).transpose()?,
                nodes: snapshot.nodes.iter().map(|n| (NodeId(n.node_id), node(n))).collect(),
                tenants: snapshot
                    .tenants
                    .iter()
                    .map(|t| (t.tenant_id.clone(), Arc::new(tenant(t))))
                    .collect(),
                api_keys: snapshot
                    .api_keys
                    .iter()
                    .map(|k| (k.secret_sha256.clone(), (k.key_id.clone(), k.tenant_id.clone())))
                    .collect(),
                context_keys: context_keys(snapshot.context_keys.as_ref())?,
                live_routers: snapshot.live_routers,
            },
            other => {
                let mut view = self.clone();
                match other {
                    Event::Snapshot(_) => {}
                    Event::TopologyCurrent(t) => {
                        view.current = Some(topology(t)?);
                        view.epoch = t.epoch;
                    }
                    Event::TopologyPending(t) => view.pending = Some(topology(t)?),
                    Event::TopologyPendingCleared(_) => view.pending = None,
                    Event::NodeChanged(n) => {
                        view.nodes.insert(NodeId(n.node_id), node(n));
                    }
                    Event::TenantChanged(t) => {
                        view.tenants.insert(t.tenant_id.clone(), Arc::new(tenant(t)));
                    }
                    Event::TenantDeleted(id) => {
                        view.tenants.remove(id);
                        view.api_keys.retain(|_, (_, tenant)| tenant != id);
                    }
                    Event::ApiKeyAdded(k) => {
                        view.api_keys
                            .insert(k.secret_sha256.clone(), (k.key_id.clone(), k.tenant_id.clone()));
                    }
                    Event::ApiKeyRevoked(key_id) => view.api_keys.retain(|_, (id, _)| id != key_id),
                    Event::ContextKeysChanged(keys) => view.context_keys = context_keys(Some(keys))?,
                    Event::LiveRoutersChanged(count) => view.live_routers = *count,
                }
                view
            }
        };
        next.revision = event.revision;
        Ok(next)
    }
}

/// The shared, atomically replaced view.
#[derive(Debug, Clone, Default)]
pub struct SharedView {
    inner: Arc<RwLock<Arc<ClusterView>>>,
    /// Number of the watch session the view follows; 0 while none does (not yet, or it broke).
    session: Arc<AtomicU64>,
}

impl SharedView {
    pub fn load(&self) -> Arc<ClusterView> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn store(&self, view: ClusterView) {
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
    }

    /// The live watch session (numbered from 1, a new number after every reconnection), or `None`
    /// while the view is not being kept current.
    pub fn session(&self) -> Option<u64> {
        match self.session.load(Ordering::Acquire) {
            0 => None,
            session => Some(session),
        }
    }

    /// Records that session `session` (0: none) keeps the view current.
    pub fn set_session(&self, session: u64) {
        self.session.store(session, Ordering::Release);
    }

    /// Applies one watch event; on error the view is unchanged.
    pub fn apply(&self, event: &pb::WatchEvent) -> Result<(), ViewError> {
        let next = self.load().apply(event)?;
        self.store(next);
        Ok(())
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Ping meta this often on the watch connection and give up on it after as long without an answer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Who follows the stream (meta lists subscribers by kind and id).
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// `router` or `storage`; also the prefix of this process's watch metrics.
    pub kind: &'static str,
    pub id: String,
    pub include_api_keys: bool,
}

/// Follows meta's watch stream into `view` until `shutdown` fires. `readiness`, when given, is set
/// ready once the view holds a topology.
pub async fn follow(
    meta_addr: String,
    subscriber: Subscriber,
    view: SharedView,
    readiness: Option<crate::Readiness>,
    clients: crate::clients::InternalClients,
    mut shutdown: Shutdown,
) {
    let settings = crate::clients::ChannelSettings {
        connect_timeout: Duration::from_secs(2),
        request_timeout: None,
        keepalive: Some(KEEPALIVE_INTERVAL),
    };
    let endpoint = match clients.endpoint(&meta_addr, settings) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::error!(%error, %meta_addr, "invalid meta address; the cluster view will stay empty");
            return;
        }
    };
    let epoch_gauge = format!("pairdb_{}_topology_epoch", subscriber.kind);
    let revision_gauge = format!("pairdb_{}_watch_revision", subscriber.kind);
    let mut backoff = MIN_BACKOFF;
    let mut sessions = 0u64;
    loop {
        sessions += 1;
        let number = sessions;
        let session = async {
            // A fresh connection per session: a broken one is never reused.
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut client = clients.cluster_over(channel);
            let mut stream = client
                .watch(pb::WatchRequest {
                    subscriber_kind: subscriber.kind.into(),
                    subscriber_id: subscriber.id.clone(),
                    include_api_keys: subscriber.include_api_keys,
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            while let Some(event) = stream.message().await.map_err(|e| e.to_string())? {
                if let Err(error) = view.apply(&event) {
                    return Err(format!("bad watch event at revision {}: {error}", event.revision));
                }
                // The first event of a session is a snapshot: from here on the view is live.
                view.set_session(number);
                let current = view.load();
                if current.current.is_some() {
                    metrics::gauge!(epoch_gauge.clone()).set(current.epoch as f64);
                    if let Some(readiness) = &readiness
                        && readiness.check().is_err()
                    {
                        readiness.set_ready().await;
                        tracing::info!(revision = current.revision, "cluster view has a topology; ready");
                    }
                }
                metrics::gauge!(revision_gauge.clone()).set(current.revision as f64);
            }
            Err::<(), String>("watch stream ended".into())
        };
        let ended = tokio::select! {
            result = session => result,
            _ = shutdown.wait() => return,
        };
        if view.session() == Some(number) {
            // The session worked: reconnect quickly, as after the first failure.
            backoff = MIN_BACKOFF;
        }
        view.set_session(0);
        if let Err(error) = ended {
            tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "lost the metadata watch stream; working from the last view");
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
