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
    let (positions, checked) =
        split_checked(writes, |PreparedWrite { key, write, deadline }| (key, write, deadline));
    let mut applied = engine.coordinate_writes(checked)?.into_iter();
    Ok(positions
        .into_iter()
        .map(|position| {
            match position.and_then(|()| applied.next().ok_or(unanswered()).and_then(|r| r.map_err(detail))) {
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
    // Hints are rare in a batch (an owner is down): each takes its own group commit.
    let items: Vec<Result<Replica, Status>> = items
        .into_iter()
        .map(|prepared| {
            prepared.map(|PreparedReplica { key, set, hint_for }| match hint_for {
                Some(owner) => Replica::Hinted(engine.put_hint(owner, &key, &set).map_err(detail)),
                None => Replica::Merge(key, set),
            })
        })
        .collect();
    let (positions, merges) = split_checked(items, |replica| replica);
    let (mut hinted, mut to_merge) = (Vec::new(), Vec::new());
    for replica in merges {
        match replica {
            Replica::Hinted(result) => hinted.push(Some(result)),
            Replica::Merge(key, set) => {
                hinted.push(None);
                to_merge.push((key, set));
            }
        }
    }
    let mut merged = engine.merge_many(to_merge)?.into_iter();
    let mut hinted = hinted.into_iter();
    Ok(positions
        .into_iter()
        .map(|position| {
            let outcome = position.and_then(|()| match hinted.next() {
                Some(Some(hint)) => hint.map(|()| true),
                Some(None) => {
                    merged.next().ok_or(unanswered()).and_then(|r| r.map(|_| false).map_err(detail))
                }
                None => Err(unanswered()),
            });
            match outcome {
                Ok(hinted) => pb::ReplicateResult { hinted, error: None },
                Err(error) => pb::ReplicateResult { hinted: false, error: Some(error) },
            }
        })
        .collect())
}

/// A checked replicate item: kept as a hint already, or to merge.
enum Replica {
    Hinted(Result<(), ErrorDetail>),
    Merge(RecordKey, VersionSet),
}

/// Splits a batch into the refusal (or a placeholder) at each position and the checked items, in
/// order: the engine answers the checked items, one answer each, in the same order.
fn split_checked<P, T>(
    items: Vec<Result<P, Status>>,
    into: impl Fn(P) -> T,
) -> (Vec<Result<(), ErrorDetail>>, Vec<T>) {
    let mut checked = Vec::with_capacity(items.len());
    let positions = items
        .into_iter()
        .map(|item| match item {
            Ok(prepared) => {
                checked.push(into(prepared));
                Ok(())
            }
            Err(refused) => Err(status_detail(&refused)),
        })
        .collect();
    (positions, checked)
}

/// The engine answers every item it is given; this is what an item would get if it did not.
fn unanswered() -> ErrorDetail {
    ErrorDetail {
        reason: Reason::Internal.as_str().to_owned(),
        message: "the engine gave no answer for this item".to_owned(),
        metadata: Default::default(),
    }
}
