//! The key-value operations (put, get, delete, get-many) on top of [`crate::execute`]: tenant lookup,
//! validation, consistency arithmetic, placement (preference list, fallbacks, pending owners during a
//! migration) and the read-before-write of `overwrite` puts and context-less deletes (DESIGN §3).
//!
//! Client contexts are sealed here ([`pairdb_core::context`]): every context a reply carries is MACed
//! with the view's current context key and bound to (tenant, key), and every context a write carries
//! is verified against the view's keys before anything is sent to a storage node. Storage nodes get
//! only the verified vector.

use std::collections::BTreeSet;
use std::sync::Arc;

use pairdb_core::condition::{WriteCondition, holds_on_read, observed, write_context};
use pairdb_core::context::{ContextBinding, ContextKey, open_context, seal_context};
use pairdb_core::coordination::{ReadPlan, WritePlan};
use pairdb_core::dvv::VersionVector;
use pairdb_core::dvv::{Sibling, VersionSet};
use pairdb_core::encoding::{encode_vector, encode_version_set};
use pairdb_core::expiry::{Requested, resolve as resolve_expiry};
use pairdb_core::quorum::{Requirement, required_replicas};
use pairdb_core::reason::{HasReason, Reason};
use pairdb_core::ring::NodeId;
use pairdb_core::token::placement_token;
use pairdb_core::validation::{validate_key, validate_tenant_id, validate_value};

use crate::error::RouterError;
use crate::execute::{self, Clock, ReadResult, WriteResult, WriteTask};
use crate::pool::StoragePool;
use crate::request::RequestOptions;
use crate::storage::{CoordinateCall, StorageCalls, StorageKey, wall_clock_ms};
use crate::view::{ClusterView, ConflictMode, SharedView, TenantSettings};

/// A node with a write call from this router out this long coordinates only when no other owner
/// answers promptly: its stalls (a flush, a compaction, a long fsync) last hundreds of ms, while a
/// batched call normally returns within a few ms. Its replica writes still count towards W.
const SLOW_WRITE_CALL: std::time::Duration = std::time::Duration::from_millis(20);

/// Timing knobs of request coordination.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub request_timeout_ms: u64,
    pub max_request_timeout_ms: u64,
    pub read_speculative_after_ms: u64,
}

#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub set: VersionSet,
    /// The sealed context of `set` (what the client writes back with).
    pub context: Vec<u8>,
    pub acks: usize,
    pub hinted_acks: usize,
    pub required: usize,
}

#[derive(Debug, Clone)]
pub struct ReadOutcome {
    pub set: VersionSet,
    /// The sealed context of `set`.
    pub context: Vec<u8>,
    /// Live values to return (LWW tenants: the winner only).
    pub siblings: Vec<Sibling>,
    pub replicas: Vec<(NodeId, &'static str)>,
}

/// The router's request logic, shared by the gRPC and HTTP edges.
#[derive(Debug, Clone)]
pub struct KvRouter {
    pub(crate) view: SharedView,
    pub(crate) pool: Arc<StoragePool>,
    pub(crate) clock: Clock,
    timing: Timing,
    /// Listing pages running at once (their own work class; see [`crate::listing`]).
    pub(crate) listing: Arc<tokio::sync::Semaphore>,
    /// Batches driven at once (a work class of their own, so point requests keep their share).
    pub(crate) batches: Arc<tokio::sync::Semaphore>,
}

struct Placement {
    key: StorageKey,
    preference: Vec<NodeId>,
    fallbacks: Vec<NodeId>,
    pending_owners: Vec<NodeId>,
}

impl KvRouter {
    pub fn new(view: SharedView, pool: Arc<StoragePool>, timing: Timing) -> Self {
        let listing = Arc::new(tokio::sync::Semaphore::new(crate::listing::CONCURRENT_PAGES));
        let batches = Arc::new(tokio::sync::Semaphore::new(crate::batch::CONCURRENT_BATCHES));
        Self { view, pool, clock: Clock::default(), timing, listing, batches }
    }

    pub fn view(&self) -> &SharedView {
        &self.view
    }

    /// The storage nodes' clients (their failure view and coalescing lanes).
    pub fn pool(&self) -> &Arc<StoragePool> {
        &self.pool
    }

    pub(crate) fn tenant(view: &ClusterView, tenant_id: &str) -> Result<Arc<TenantSettings>, RouterError> {
        validate_tenant_id(tenant_id).map_err(|e| RouterError::from_reasoned(&e))?;
        view.tenants
            .get(tenant_id)
            .filter(|t| !t.deleting)
            .cloned()
            .ok_or_else(|| RouterError::TenantNotFound(tenant_id.to_owned()))
    }

    /// The key replies' contexts are sealed with (a router without one has not had a snapshot).
    pub(crate) fn sealing_key(view: &ClusterView) -> Result<&ContextKey, RouterError> {
        view.context_keys.current().ok_or(RouterError::NotReady)
    }

    pub(crate) fn seal(key: &ContextKey, tenant: &str, user_key: &str, vector: &VersionVector) -> Vec<u8> {
        seal_context(vector, ContextBinding { tenant, key: user_key }, key)
    }

    pub(crate) fn requirement(options: &RequestOptions, tenant: &TenantSettings) -> Requirement {
        match options.explicit {
            0 => Requirement::Level(options.consistency.unwrap_or(tenant.default_consistency)),
            explicit => Requirement::Explicit(explicit),
        }
    }

    pub(crate) fn required(options: &RequestOptions, tenant: &TenantSettings) -> Result<usize, RouterError> {
        let requirement = Self::requirement(options, tenant);
        required_replicas(requirement, tenant.serving_replication_factor())
            .map_err(|e| RouterError::from_reasoned(&e))
    }

    pub(crate) fn deadline_ms(&self, options: &RequestOptions) -> u64 {
        let timeout = match u64::from(options.timeout_ms) {
            0 => self.timing.request_timeout_ms,
            requested => requested.min(self.timing.max_request_timeout_ms),
        };
        self.clock.now_ms() + timeout
    }

    fn placement(view: &ClusterView, tenant: &TenantSettings, key: &str) -> Result<Placement, RouterError> {
        let current = view.current.as_ref().ok_or(RouterError::NotReady)?;
        let token = placement_token(&tenant.tenant_id, key, tenant.key_groups);
        let partition = current.partition_count().partition_of(token);
        // The request span (see `front`) carries the partition, never the key.
        tracing::Span::current().record("pairdb.partition", i64::from(partition.0));
        let n = tenant.serving_replication_factor();
        let preference = current.preference_list(partition, n).to_vec();
        if preference.is_empty() {
            return Err(RouterError::NoReplicas(partition.0));
        }
        let fallbacks = current.fallbacks(partition, n).to_vec();
        // Owners a running migration adds (a new topology, or a larger N): they get every write so
        // nothing written during the migration is missing when it completes; acks count on the old set.
        let mut pending_owners: Vec<NodeId> = Vec::new();
        let target_n = tenant.replication_factor;
        if let Some(pending) = &view.pending {
            pending_owners.extend(pending.preference_list(partition, target_n));
        }
        if target_n > n {
            pending_owners.extend(current.preference_list(partition, target_n));
        }
        let mut seen: BTreeSet<NodeId> = preference.iter().copied().collect();
        pending_owners.retain(|node| seen.insert(*node));
        Ok(Placement {
            key: StorageKey {
                tenant_id: tenant.tenant_id.clone(),
                key: key.to_owned(),
                partition,
                token,
                tenant_generation: tenant.generation,
            },
            preference,
            fallbacks,
            pending_owners,
        })
    }

    pub(crate) fn suspects(&self, view: &ClusterView) -> BTreeSet<NodeId> {
        let mut suspects = self.pool.suspects();
        suspects.extend(view.nodes.iter().filter(|(_, n)| n.down).map(|(id, _)| *id));
        suspects
    }

    /// The storage calls of a request planned on `view`.
    pub(crate) fn calls(&self, view: &Arc<ClusterView>) -> StorageCalls {
        StorageCalls { pool: self.pool.clone(), view: view.clone() }
    }

    fn validate_key(key: &str) -> Result<(), RouterError> {
        validate_key(key.as_bytes()).map_err(|e| RouterError::from_reasoned(&e))
    }

    /// Reads the key's merged set at the request's consistency (`None` when no replica has it).
    async fn read_set(
        &self,
        view: &Arc<ClusterView>,
        tenant: &TenantSettings,
        key: &str,
        options: &RequestOptions,
    ) -> Result<(Option<VersionSet>, Vec<(NodeId, &'static str)>), RouterError> {
        let placement = Self::placement(view, tenant, key)?;
        let required = Self::required(options, tenant)?;
        let now = self.clock.now_ms();
        let deadline_ms = self.deadline_ms(options);
        let plan = ReadPlan {
            replicas: placement.preference,
            required,
            suspects: self.suspects(view),
            speculative_after_ms: (now + self.timing.read_speculative_after_ms).min(deadline_ms),
            deadline_ms,
        };
        match execute::read(self.calls(view), self.clock, plan, placement.key).await {
            ReadResult::Answered { merged, replicas } => Ok((merged, replicas)),
            ReadResult::QuorumNotReached { answered, required, failures } => {
                Err(RouterError::QuorumNotReached { acks: answered, hinted_acks: 0, required, failures })
            }
            ReadResult::Rejected(refusal) => Err(RouterError::Refused(refusal)),
        }
    }

    /// Reads a key: every live sibling (LWW tenants: the winner) plus the merged set for its context.
    pub async fn get(
        &self,
        tenant_id: &str,
        key: &str,
        options: RequestOptions,
    ) -> Result<ReadOutcome, RouterError> {
        let view = self.view.load();
        let tenant = Self::tenant(&view, tenant_id)?;
        Self::validate_key(key)?;
        let sealing = Self::sealing_key(&view)?;
        let (merged, replicas) = self.read_set(&view, &tenant, key, &options).await?;
        let set = merged.ok_or(RouterError::KeyNotFound)?;
        let siblings = Self::visible(&set, tenant.conflict_mode, wall_clock_ms());
        let context = Self::seal(sealing, tenant_id, key, set.vector());
        if siblings.is_empty() {
            // Deleted or expired: not found, but the key's history is kept and its context lets a
            // write supersede it.
            return Err(RouterError::NoLiveValue { context });
        }
        Ok(ReadOutcome { set, context, siblings, replicas })
    }

    /// Writes a value or a tombstone (see [`WriteSpec`]).
    pub async fn write(
        &self,
        tenant_id: &str,
        key: &str,
        spec: WriteSpec<'_>,
        options: RequestOptions,
    ) -> Result<WriteOutcome, RouterError> {
        let WriteSpec { value, context, read_first, condition, expiry, touch } = spec;
        let view = self.view.load();
        let tenant = Self::tenant(&view, tenant_id)?;
        let required = Self::required(&options, &tenant)?;
        let sealing = Self::sealing_key(&view)?;
        let expiring = value.is_some() || touch;
        let Checked { vector, now, expires_at_ms } =
            self.check_write(&view, &tenant, key, value.as_ref(), context, expiring.then_some(expiry))?;
        if touch && vector.is_empty() {
            return Err(RouterError::invalid(Reason::InvalidContext, "a touch needs the context of a read"));
        }
        // A condition is checked on a read at the request's consistency; a context-less overwrite
        // supersedes every version such a read sees (versions written concurrently and not seen
        // survive as siblings on the replicas); a touch sends the coordinator what the read saw.
        let merged = if condition.is_some() || touch || (read_first && vector.is_empty()) {
            self.read_set(&view, &tenant, key, &options).await?.0
        } else {
            None
        };
        let touch_over = match touch {
            true => Some(Self::touch_over(merged.as_ref(), &vector, now)?),
            false => None,
        };
        let checked = match condition {
            Some(condition) => {
                if !holds_on_read(condition, merged.as_ref(), &vector, tenant.conflict_mode, now) {
                    metrics::counter!("pairdb_router_precondition_failures_total", "at" => "router")
                        .increment(1);
                    let current = Self::current_state(sealing, &tenant, key, merged, now);
                    return Err(RouterError::PreconditionFailed { condition, current });
                }
                Some((condition, encode_vector(&observed(condition, merged.as_ref(), &vector))))
            }
            None => None,
        };
        let write_vector = write_context(condition, merged.as_ref(), &vector, read_first);
        let context = if write_vector.is_empty() { Vec::new() } else { encode_vector(&write_vector) };
        let is_delete = value.is_none() && !touch;
        let (storage_key, plan) = self.write_plan(&view, &tenant, key, required, &options)?;
        let call = CoordinateCall {
            key: storage_key,
            context,
            value,
            timestamp_ms: wall_clock_ms(),
            max_siblings: u32::try_from(tenant.max_siblings).unwrap_or(u32::MAX),
            supersede_local: tenant.conflict_mode == ConflictMode::Lww,
            condition: checked,
            expires_at_ms,
            touch_over,
        };
        let confirm_tombstone = is_delete
            .then(|| pairdb_core::gc::stable_placement(&view.placement_view(&tenant.tenant_id)))
            .flatten();
        let task = WriteTask { call, confirm_tombstone };
        let result = execute::write(self.calls(&view), self.clock, plan, task).await;
        match Self::outcome(sealing, tenant_id, key, result) {
            Err(RouterError::Refused(refusal)) => match condition {
                Some(condition) if refusal.reason == Reason::PreconditionFailed => {
                    metrics::counter!("pairdb_router_precondition_failures_total", "at" => "coordinator")
                        .increment(1);
                    // The coordinator held a version the read missed and sent its set: the details
                    // are the newest state either knew.
                    let newest = match (merged, refusal.current) {
                        (Some(read), Some(coordinator)) => Some(read.merge(&coordinator)),
                        (read, coordinator) => read.or(coordinator),
                    };
                    let current = Self::current_state(sealing, &tenant, key, newest, now);
                    Err(RouterError::PreconditionFailed { condition, current })
                }
                _ => Err(RouterError::Refused(refusal)),
            },
            other => other,
        }
    }

    /// The checks every write passes before anything is read or sent: the key, the value's size,
    /// the client's sealed context, and (`expiry`: a put or a touch) the expiry it resolves to.
    pub(crate) fn check_write(
        &self,
        view: &ClusterView,
        tenant: &TenantSettings,
        key: &str,
        value: Option<&Vec<u8>>,
        context: &[u8],
        expiry: Option<Requested>,
    ) -> Result<Checked, RouterError> {
        Self::validate_key(key)?;
        if let Some(value) = value {
            validate_value(value, tenant.max_value_bytes).map_err(|e| RouterError::from_reasoned(&e))?;
        }
        let binding = ContextBinding { tenant: &tenant.tenant_id, key };
        let vector = open_context(context, binding, &view.context_keys)
            .map_err(|e| RouterError::invalid(e.reason(), format!("context: {e}")))?;
        let now = wall_clock_ms();
        let expires_at_ms = match expiry {
            Some(expiry) => resolve_expiry(expiry, tenant.default_ttl_ms, tenant.max_ttl_ms, now)
                .map_err(|e| RouterError::from_reasoned(&e))?,
            None => None,
        };
        Ok(Checked { vector, now, expires_at_ms })
    }

    /// Where and how a write to `key` goes: the key as storage nodes name it, and its plan (preference
    /// list, fallbacks, pending owners, W and deadline).
    pub(crate) fn write_plan(
        &self,
        view: &ClusterView,
        tenant: &TenantSettings,
        key: &str,
        required: usize,
        options: &RequestOptions,
    ) -> Result<(StorageKey, WritePlan), RouterError> {
        let placement = Self::placement(view, tenant, key)?;
        let slow = self.pool.slow(&placement.preference, SLOW_WRITE_CALL);
        let plan = WritePlan {
            preference: placement.preference,
            fallbacks: placement.fallbacks,
            pending_owners: placement.pending_owners,
            required,
            strict_quorum: options.strict_quorum || tenant.strict_quorum,
            suspects: self.suspects(view),
            slow,
            deadline_ms: self.deadline_ms(options),
        };
        Ok((placement.key, plan))
    }

    /// A driven write's answer for the client: the acknowledged set with its sealed context, or why
    /// not.
    pub(crate) fn outcome(
        sealing: &ContextKey,
        tenant_id: &str,
        key: &str,
        result: WriteResult,
    ) -> Result<WriteOutcome, RouterError> {
        match result {
            WriteResult::Acked { set, acks, hinted_acks, required } => {
                let context = Self::seal(sealing, tenant_id, key, set.vector());
                Ok(WriteOutcome { set, context, acks, hinted_acks, required })
            }
            WriteResult::QuorumNotReached { acks, hinted_acks, required, failures } => {
                Err(RouterError::QuorumNotReached { acks, hinted_acks, required, failures })
            }
            WriteResult::Rejected(refusal) => Err(RouterError::Refused(refusal)),
        }
    }

    /// What a touch sends its coordinator: the read's set, encoded. KEY_NOT_FOUND when the read
    /// found no live value under the context (nothing to touch).
    fn touch_over(
        merged: Option<&VersionSet>,
        context: &VersionVector,
        now_ms: u64,
    ) -> Result<Vec<u8>, RouterError> {
        let set = merged.ok_or(RouterError::KeyNotFound)?;
        if !set.siblings().iter().any(|s| context.covers(s.dot) && s.is_live_at(now_ms)) {
            return Err(RouterError::KeyNotFound);
        }
        Ok(encode_version_set(set))
    }

    /// The details of a failed condition: the key as the read found it.
    fn current_state(
        sealing: &ContextKey,
        tenant: &TenantSettings,
        key: &str,
        merged: Option<VersionSet>,
        now_ms: u64,
    ) -> Option<Box<CurrentState>> {
        let set = merged.unwrap_or_default();
        let siblings = Self::visible(&set, tenant.conflict_mode, now_ms);
        let context = Self::seal(sealing, &tenant.tenant_id, key, set.vector());
        Some(Box::new(CurrentState { context, siblings }))
    }

    /// The values a read at `now_ms` returns: every live sibling (not deleted, not expired), or the
    /// LWW winner if it is live.
    pub(crate) fn visible(set: &VersionSet, mode: ConflictMode, now_ms: u64) -> Vec<Sibling> {
        match mode {
            ConflictMode::Siblings => set.live_values_at(now_ms).into_iter().cloned().collect(),
            ConflictMode::Lww => {
                set.lww_winner().filter(|s| s.is_live_at(now_ms)).cloned().into_iter().collect()
            }
        }
    }
}

/// A write that passed [`KvRouter::check_write`].
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// The client's verified context.
    pub vector: VersionVector,
    /// The router's wall clock when it was checked.
    pub now: u64,
    pub expires_at_ms: Option<u64>,
}

/// What a write stores, over what, and on which condition.
#[derive(Debug, Clone, Default)]
pub struct WriteSpec<'a> {
    /// `None` writes a tombstone.
    pub value: Option<Vec<u8>>,
    /// The client's sealed context (empty for a blind write).
    pub context: &'a [u8],
    /// Without a context, supersede what a read at the request's consistency sees (overwrite puts
    /// and deletes).
    pub read_first: bool,
    pub condition: Option<WriteCondition>,
    /// When the new value expires, as asked (resolved with the tenant's settings).
    pub expiry: Requested,
    /// A Touch: no new value; the live values `context` names get the new expiry.
    pub touch: bool,
}

/// The key as a failed condition found it (the details of PRECONDITION_FAILED): the sealed context
/// to write with and the values a read returns, so a client can retry without reading again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentState {
    pub context: Vec<u8>,
    pub siblings: Vec<Sibling>,
}
