//! The one path every record mutation takes: [`Engine::mutate`] holds the key's stripe lock, reads
//! the record, lets the caller decide ([`Change`]), writes the decision through the chosen durability
//! ([`Apply`]) and keeps the partition's Merkle tree in step. Coordinated writes, merges, merge
//! batches, tombstone purges (both GC paths) and unowned-data deletion all come this way, so the
//! invariants hold for each: a record and its Merkle leaf never disagree, a decision is made on the
//! record as it is under the lock (nothing written meanwhile is lost), and a failed write poisons the
//! write path. The tenant key index (keyspace `key_index`) changes in the same batch as the record,
//! so it can never disagree with the records, on any path and across a crash.
//!
//! **Minting actors.** A node mints the dots of the writes it coordinates for a record under that
//! record's own minting actor (keyspace `minting_actors`, key → actor), drawn fresh (random) the
//! first time the node coordinates the key while it holds the record, and removed *before* the
//! record whenever the record is removed (purge, unowned deletion, tenant purge, quarantine). A
//! minting actor therefore only ever exists beside its record, and while a record lives its vector
//! only grows: the next counter under the actor is always one no dot ever had. Without this, a key
//! purged here and written again would restart its counter, and a tombstone still held elsewhere (or
//! a client's old context) would cover, and silently drop, the new acknowledged write (Riak's KV679).

use super::*;
use pairdb_core::dvv::{Actor, NewVersion};

/// What a mutation decided for one record.
#[derive(Debug)]
pub(super) enum Change {
    /// Leave the record as it is.
    Keep,
    /// Store this set (an insert or an update).
    Put(VersionSet),
    /// Store this set, minted under `Actor`, a fresh minting actor the record keeps from now on.
    Mint(VersionSet, Actor),
    /// Remove the record.
    Remove,
}

/// How a mutation becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Apply {
    /// Through the group commit: durable when `mutate` returns.
    Commit,
    /// Straight to the journal: the caller calls `make_durable` once after a batch of these.
    Journal,
}

/// The writes of one record change: the record, its minting actor, and its index entry, applied
/// together in one batch. The index entry is written when the record is created and removed with
/// it: a record that exists has its entry (same batch; a directory opened without the index builds
/// it from the records first), so an update does not write it again — one memtable insert fewer
/// per replica write.
fn record_ops(key: &RecordKey, encoded_key: &[u8], existed: bool, change: Change) -> Vec<WriteOp> {
    let record = || encoded_key.to_vec();
    let index_entry = |ops: &mut Vec<WriteOp>| {
        if !existed {
            ops.push(WriteOp::Insert(Space::KeyIndex, key.encode_index(), key.index_value().to_vec()));
        }
    };
    let mut ops = Vec::with_capacity(3);
    match change {
        Change::Keep => {}
        Change::Put(set) => {
            ops.push(WriteOp::Insert(Space::Records, record(), encode_version_set(&set)));
            index_entry(&mut ops);
        }
        Change::Mint(set, actor) => {
            ops.push(WriteOp::Insert(Space::Records, record(), encode_version_set(&set)));
            ops.push(WriteOp::Insert(Space::MintingActors, record(), actor.0.to_be_bytes().to_vec()));
            index_entry(&mut ops);
        }
        Change::Remove => {
            debug_assert!(existed, "only a record that exists is removed");
            // One batch: the minting actor, the index entry and the record go together.
            ops.push(WriteOp::Remove(Space::MintingActors, record()));
            ops.push(WriteOp::Remove(Space::KeyIndex, key.encode_index()));
            ops.push(WriteOp::Remove(Space::Records, record()));
        }
    }
    ops
}

/// The set a coordinated write leaves: `existing` updated with the new sibling as `actor`, or for a
/// touch, `existing` merged with the router's read and its live siblings under the context
/// re-stamped (nothing live under the context: KEY_NOT_FOUND, nothing applied).
fn apply_coordinated(
    existing: Option<&VersionSet>,
    write: CoordinatedWrite,
    actor: Actor,
    now_ms: u64,
) -> Result<VersionSet, EngineError> {
    let mut set = existing.cloned().unwrap_or_default();
    if let Some(seen) = &write.touch_over {
        set.merge_from(seen);
        storable(&set)?;
        if set.touch(&write.context, actor, write.expires_at_ms, now_ms)?.is_empty() {
            return Err(EngineError::NothingToTouch);
        }
        return Ok(set);
    }
    let mut context = write.context;
    if write.supersede_local {
        context.merge(set.vector());
    }
    let new = NewVersion {
        value: write.value,
        timestamp_ms: write.timestamp_ms,
        expires_at_ms: write.expires_at_ms,
    };
    set.update_with(&context, actor, new, write.max_siblings)?;
    Ok(set)
}

impl Engine {
    /// The record's minting actor, if it has one (call with the key's stripe lock held).
    fn minting_actor(&self, encoded_key: &[u8]) -> Result<Option<Actor>, EngineError> {
        let raw = self.minting.get(encoded_key).map_err(EngineError::Read)?;
        Ok(raw
            .and_then(|raw| <[u8; 8]>::try_from(raw.as_ref()).ok())
            .map(|bytes| Actor(u64::from_be_bytes(bytes))))
    }

    /// Reads `key`'s record under its stripe lock, applies `decide`'s [`Change`], and returns
    /// `decide`'s result. `decide` runs with the lock held, so checks made in it (the tenant, a
    /// deadline, a digest) hold for the write. The record, its minting actor and its entry in the
    /// tenant key index change in one batch; the Merkle tree and the tenant's usage follow under the
    /// same lock.
    pub(super) fn mutate<T>(
        &self,
        key: &RecordKey,
        apply: Apply,
        decide: impl FnOnce(Option<&VersionSet>) -> Result<(Change, T), EngineError>,
    ) -> Result<T, EngineError> {
        let encoded_key = key.encode();
        let _guard = self.lock(&encoded_key);
        let preparing = (apply == Apply::Commit).then(|| self.commit.preparing());
        let existing = self.read_set(&encoded_key)?;
        let (change, out) = decide(existing.as_ref())?;
        let (new_entry, new_usage) = match &change {
            Change::Keep => return Ok(out),
            Change::Put(set) | Change::Mint(set, _) => (Some(Entry::of(set)), Usage::of(set)),
            Change::Remove => (None, Usage::default()),
        };
        let ops = record_ops(key, &encoded_key, existing.is_some(), change);
        match (apply, preparing) {
            (Apply::Commit, Some(preparing)) => self.commit_write(ops, preparing)?,
            _ => self.write_unsynced(ops)?,
        }
        self.merkle.update(&encoded_key, existing.as_ref().map(Entry::of), new_entry);
        self.usage.replace(key, existing.as_ref().map(Usage::of).unwrap_or_default(), new_usage);
        Ok(out)
    }

    /// Applies a client write as this node's actor and returns the resulting set, durably.
    /// `supersede_local` (LWW tenants) extends the context with everything this replica holds.
    pub fn coordinate_write(
        &self,
        key: &RecordKey,
        context: &VersionVector,
        value: Option<Vec<u8>>,
        timestamp_ms: u64,
        max_siblings: Option<usize>,
        supersede_local: bool,
    ) -> Result<VersionSet, EngineError> {
        let quota = QuotaGuard::default();
        let write = CoordinatedWrite {
            context: context.clone(),
            value,
            timestamp_ms,
            max_siblings,
            supersede_local,
            quota,
            condition: None,
            expires_at_ms: None,
            touch_over: None,
        };
        self.coordinate_write_before(key, write, ApplyDeadline::NONE)
    }

    /// [`Self::coordinate_write`], refused with [`EngineError::DeadlinePassed`] (nothing applied)
    /// when `deadline` has passed once the key's lock is held: the last point before the write
    /// becomes visible, so a call the router gave up on is not applied later.
    pub fn coordinate_write_before(
        &self,
        key: &RecordKey,
        write: CoordinatedWrite,
        deadline: ApplyDeadline,
    ) -> Result<VersionSet, EngineError> {
        self.coordinate(key, write, deadline, Apply::Commit)
    }

    /// [`Self::coordinate_write_before`] written straight to the journal: not durable until the
    /// caller's [`Self::sync_written`] returns, and not to be acknowledged before (a batch of
    /// coordinated writes shares that one group commit).
    pub fn coordinate_write_unsynced(
        &self,
        key: &RecordKey,
        write: CoordinatedWrite,
        deadline: ApplyDeadline,
    ) -> Result<VersionSet, EngineError> {
        self.coordinate(key, write, deadline, Apply::Journal)
    }

    /// Makes everything this thread wrote with the `_unsynced` calls durable (one group commit).
    pub fn sync_written(&self) -> Result<(), EngineError> {
        self.make_durable()
    }

    fn coordinate(
        &self,
        key: &RecordKey,
        write: CoordinatedWrite,
        deadline: ApplyDeadline,
        apply: Apply,
    ) -> Result<VersionSet, EngineError> {
        self.check_writable()?;
        let encoded_key = key.encode();
        self.mutate(key, apply, |existing| {
            self.check_tenant(&key.tenant)?;
            if deadline.passed() {
                metrics::counter!("pairdb_storage_coordinate_deadline_refusals_total").increment(1);
                return Err(EngineError::DeadlinePassed);
            }
            let now = now_ms();
            if let Some((condition, observed)) = &write.condition
                && !pairdb_core::condition::holds_at_coordinator(*condition, existing, observed, now)
            {
                metrics::counter!("pairdb_storage_precondition_refusals_total").increment(1);
                let current = Box::new(existing.cloned().unwrap_or_default());
                return Err(EngineError::PreconditionFailed { condition: *condition, current });
            }
            // A minting actor exists only beside its record (see the module docs).
            let minting = match existing {
                Some(_) => self.minting_actor(&encoded_key)?,
                None => None,
            };
            let actor = minting.unwrap_or_else(|| Actor(rand::random::<u64>()));
            let quota = write.quota;
            let set = apply_coordinated(existing, write, actor, now)?;
            quota.check(existing.map(Usage::of).unwrap_or_default(), Usage::of(&set))?;
            let change =
                if minting.is_some() { Change::Put(set.clone()) } else { Change::Mint(set.clone(), actor) };
            Ok((change, set))
        })
    }

    /// Merges `incoming` into the local replica; returns whether the local set changed.
    pub fn merge(&self, key: &RecordKey, incoming: &VersionSet) -> Result<bool, EngineError> {
        self.merge_with(key, incoming, Apply::Commit)
    }

    /// [`Self::merge`] written straight to the journal (durable after [`Self::sync_written`]).
    pub fn merge_unsynced(&self, key: &RecordKey, incoming: &VersionSet) -> Result<bool, EngineError> {
        self.merge_with(key, incoming, Apply::Journal)
    }

    fn merge_with(&self, key: &RecordKey, incoming: &VersionSet, apply: Apply) -> Result<bool, EngineError> {
        self.check_writable()?;
        self.mutate(key, apply, |existing| {
            self.check_tenant(&key.tenant)?;
            let mut set = existing.cloned().unwrap_or_default();
            if !set.merge_from(incoming) {
                return Ok((Change::Keep, false));
            }
            storable(&set)?;
            Ok((Change::Put(set), true))
        })
    }

    /// Merges many records with one durability wait; returns how many changed. Each record is written
    /// straight to the journal under its stripe lock (holding one lock at a time); the batch then waits
    /// for one group commit, whose flush or fsync covers everything written before it.
    pub fn merge_batch(&self, records: &[(RecordKey, VersionSet)]) -> Result<usize, EngineError> {
        self.check_writable()?;
        let mut changed = 0;
        for (key, incoming) in records {
            let merged = self.mutate(key, Apply::Journal, |existing| {
                // A deleted tenant's record (a late hint, a peer that has not purged yet) is dropped.
                if self.is_refused(&key.tenant) {
                    metrics::counter!("pairdb_storage_deleted_tenant_writes_refused_total").increment(1);
                    return Ok((Change::Keep, false));
                }
                let mut set = existing.cloned().unwrap_or_default();
                if !set.merge_from(incoming) {
                    return Ok((Change::Keep, false));
                }
                // One record that cannot be stored must not hold back the batch (hint delivery,
                // anti-entropy and migrations all come this way).
                if let Err(error) = storable(&set) {
                    tracing::warn!(partition = key.partition.0, %error, "merged set refused; record skipped");
                    metrics::counter!("pairdb_storage_invalid_sets_refused_total", "rpc" => "merge_batch")
                        .increment(1);
                    return Ok((Change::Keep, false));
                }
                Ok((Change::Put(set), true))
            })?;
            changed += usize::from(merged);
        }
        if changed > 0 {
            self.make_durable()?;
        }
        Ok(changed)
    }
}
