//! Batched coordinate, replicate and get calls (`CoordinateWriteBatch`, `ReplicateBatch`, `GetMany`):
//! a router's many writes or reads to this node in one RPC. Each item is checked and applied on its own — its own
//! deadline, condition, refusal — and answered with the result a single call would give; the whole
//! batch shares one group commit, and no item is answered before it (a failed flush or fsync fails
//! every item that was applied, as the engine's poison signal does for single calls).

use pairdb_core::dvv::VersionSet;
use pairdb_core::encoding::encode_version_set;
use pairdb_core::ring::NodeId;
use pairdb_proto::common::v1::ErrorDetail;
use pairdb_proto::storage::v1 as pb;
use pairdb_service::errors::{Reason, detail_of, status};
use tonic::Status;

use crate::engine::{ApplyDeadline, CoordinatedWrite, Engine, EngineError};
use crate::keys::RecordKey;

/// The most items one batched call may carry.
pub const MAX_BATCH_ITEMS: usize = 1_000;

/// The most records one peer call (`MergeBatch`, `PurgeTombstones`) may carry: the largest
/// `--stream-batch-max`, which bounds what anti-entropy pushes back after a `GetBatch`; hint delivery
/// (256) and tombstone GC (1,000 candidates a round) send fewer.
pub const MAX_PEER_BATCH_ITEMS: usize = 65_536;

/// Refuses a peer call carrying more than [`MAX_PEER_BATCH_ITEMS`] records.
pub fn check_peer_len(items: usize) -> Result<(), Status> {
    if items > MAX_PEER_BATCH_ITEMS {
        return Err(status(
            Reason::InvalidArgument,
            format!("a peer call holds at most {MAX_PEER_BATCH_ITEMS} records, not {items}"),
            &[],
        ));
    }
    Ok(())
}

/// Refuses an empty or oversized batch.
pub fn check_len(items: usize) -> Result<(), Status> {
    match items {
        1..=MAX_BATCH_ITEMS => Ok(()),
        n => Err(status(
            Reason::InvalidArgument,
            format!("a batch holds 1..={MAX_BATCH_ITEMS} items, not {n}"),
            &[],
        )),
    }
}

/// A checked coordinate call: the write the engine applies, for its key, before its deadline.
#[derive(Debug)]
pub struct PreparedWrite {
    pub key: RecordKey,
    pub write: CoordinatedWrite,
    pub deadline: ApplyDeadline,
}

impl PreparedWrite {
    /// Applies it durably (a single call).
    pub fn apply(self, engine: &Engine) -> Result<VersionSet, EngineError> {
        engine.coordinate_write_before(&self.key, self.write, self.deadline)
    }
}

/// A checked replicate call.
#[derive(Debug)]
pub struct PreparedReplica {
    pub key: RecordKey,
    pub set: VersionSet,
    /// Keep it as a hint for this owner instead of merging it.
    pub hint_for: Option<NodeId>,
}

impl PreparedReplica {
    /// Applies it durably (a single call).
    pub fn apply(self, engine: &Engine) -> Result<(), EngineError> {
        match self.hint_for {
            Some(owner) => engine.put_hint(owner, &self.key, &self.set),
            None => engine.merge(&self.key, &self.set).map(|_| ()),
        }
    }
}

fn detail(error: EngineError) -> ErrorDetail {
    let status = crate::service::engine_status(error);
    detail_of(&status).unwrap_or_else(|| ErrorDetail {
        reason: Reason::Internal.as_str().to_owned(),
        message: status.message().to_owned(),
        metadata: Default::default(),
    })
}

fn status_detail(status: &Status) -> ErrorDetail {
    detail_of(status).unwrap_or_else(|| ErrorDetail {
        reason: Reason::InvalidArgument.as_str().to_owned(),
        message: status.message().to_owned(),
        metadata: Default::default(),
    })
}

/// Gets left for the engine, each with its position in the call.
pub type Unanswered = Vec<(usize, Result<RecordKey, Status>)>;

/// The gets the record cache answers ([`Engine::cached_encoded`], no disk), at their positions, and
/// the rest (with their positions) for [`get`] on the blocking pool.
pub fn get_cached(
    engine: &Engine,
    keys: Vec<Result<RecordKey, Status>>,
) -> (Vec<Option<pb::GetResult>>, Unanswered) {
    let mut missing = Vec::new();
    let answered = keys
        .into_iter()
        .enumerate()
        .map(|(position, key)| {
            let hit = key.as_ref().ok().and_then(|key| engine.cached_encoded(key));
            if hit.is_none() {
                missing.push((position, key));
            }
            hit.map(|version_set| pb::GetResult { found: true, version_set, error: None })
        })
        .collect();
    (answered, missing)
}

/// Reads every checked key (a router's coalesced `Get`s); one result per key, in order. A key
/// whose read fails gets the error a single `Get` would answer; the others are unaffected.
pub fn get(engine: &Engine, keys: Vec<Result<RecordKey, Status>>) -> Vec<pb::GetResult> {
    let found = |version_set| pb::GetResult { found: true, version_set, error: None };
    let failed = |error| pb::GetResult { found: false, version_set: Vec::new(), error: Some(error) };
    keys.into_iter()
        .map(|key| match key {
            Err(refused) => failed(status_detail(&refused)),
            Ok(key) => match engine.get_encoded(&key) {
                Ok(Some(version_set)) => found(version_set),
                Ok(None) => pb::GetResult { found: false, version_set: Vec::new(), error: None },
                Err(error) => failed(detail(error)),
            },
        })
        .collect()
}

/// Applies every checked write, durably at once (one group commit); one result per write, in
/// order.
pub fn coordinate(
    engine: &Engine,
    writes: Vec<Result<PreparedWrite, Status>>,
) -> Result<Vec<pb::CoordinateWriteResult>, EngineError> {
    let mut checked = Vec::with_capacity(writes.len());
    // Each position's refusal, or `None`: the engine answers it, in order.
    let refusals: Vec<Option<ErrorDetail>> = writes
        .into_iter()
        .map(|prepared| match prepared {
            Err(refused) => Some(status_detail(&refused)),
            Ok(PreparedWrite { key, write, deadline }) => {
                checked.push((key, write, deadline));
                None
            }
        })
        .collect();
    let mut applied = engine.coordinate_writes(checked)?.into_iter();
    Ok(refusals
        .into_iter()
        .map(|refusal| {
            let outcome = match refusal {
                Some(refused) => Err(refused),
                None => applied.next().ok_or_else(unanswered).and_then(|r| r.map_err(detail)),
            };
            match outcome {
                Ok(set) => pb::CoordinateWriteResult { version_set: encode_version_set(&set), error: None },
                Err(error) => pb::CoordinateWriteResult { version_set: Vec::new(), error: Some(error) },
            }
        })
        .collect())
}

/// Merges (or keeps as hints) every checked item, durably; the merges share one group commit.
pub fn replicate(
    engine: &Engine,
    items: Vec<Result<PreparedReplica, Status>>,
) -> Result<Vec<pb::ReplicateResult>, EngineError> {
    let mut to_merge = Vec::with_capacity(items.len());
    // Each position's answer (hinted or not), or `None`: the merge answers it, in order.
    let answers: Vec<Option<Result<bool, ErrorDetail>>> = items
        .into_iter()
        .map(|prepared| match prepared {
            Err(refused) => Some(Err(status_detail(&refused))),
            // Hints are rare in a batch (an owner is down): each takes its own group commit.
            Ok(PreparedReplica { key, set, hint_for: Some(owner) }) => {
                Some(engine.put_hint(owner, &key, &set).map(|()| true).map_err(detail))
            }
            Ok(PreparedReplica { key, set, hint_for: None }) => {
                to_merge.push((key, set));
                None
            }
        })
        .collect();
    let mut merged = engine.merge_many(to_merge)?.into_iter();
    Ok(answers
        .into_iter()
        .map(|answer| {
            let outcome = answer.unwrap_or_else(|| {
                merged.next().ok_or_else(unanswered).and_then(|r| r.map(|_| false).map_err(detail))
            });
            match outcome {
                Ok(hinted) => pb::ReplicateResult { hinted, error: None },
                Err(error) => pb::ReplicateResult { hinted: false, error: Some(error) },
            }
        })
        .collect())
}

/// The engine answers every item it is given; this is what an item would get if it did not.
fn unanswered() -> ErrorDetail {
    ErrorDetail {
        reason: Reason::Internal.as_str().to_owned(),
        message: "the engine gave no answer for this item".to_owned(),
        metadata: Default::default(),
    }
}
