//! The one path every record mutation takes: [`Engine::mutate`] holds the key's stripe lock, reads
//! the record, lets the caller decide ([`Change`]), writes the decision through the chosen durability
//! ([`Apply`]) and keeps the partition's Merkle tree in step. Coordinated writes, merges, merge
//! batches, tombstone purges (both GC paths) and unowned-data deletion all come this way, so the
//! invariants hold for each: a record and its Merkle leaf never disagree, a decision is made on the
//! record as it is under the lock (nothing written meanwhile is lost), and a failed write poisons the
//! write path. The tenant key index (keyspace `key_index`) changes in the same batch as the record,
//! so it can never disagree with the records, on any path and across a crash.
//!
//! **Batches.** [`Engine::mutate_many`] is the same path for many records at once (a router's
//! coalesced coordinate or replicate calls): it takes every item's stripe lock, in ascending stripe
//! order (so two batches, or a batch and a single write, cannot deadlock: no other path holds more
//! than one stripe), decides each item as `mutate` would, writes all the decisions as one fjall
//! batch through the group commit, and only then updates the Merkle trees and usage and lets go of
//! the locks. Nothing a batch writes is visible before it is durable. A key that occurs more than
//! once in a batch is decided again in a later round, on the record the earlier round wrote.
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
use fjall::Slice;
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
fn record_ops(
    key: &RecordKey,
    encoded_key: &[u8],
    existed: bool,
    change: &Change,
    record: Option<&Slice>,
) -> Vec<WriteOp> {
    let index_entry = |ops: &mut Vec<WriteOp>| {
        if !existed {
            ops.push(WriteOp::Insert(Space::KeyIndex, key.encode_index(), key.index_value().into()));
        }
    };
    let mut ops = Vec::with_capacity(3);
    match (change, record) {
        (Change::Put(_), Some(record)) => {
            ops.push(WriteOp::Insert(Space::Records, encoded_key.to_vec(), record.clone()));
            index_entry(&mut ops);
        }
        (Change::Mint(_, actor), Some(record)) => {
            ops.push(WriteOp::Insert(Space::Records, encoded_key.to_vec(), record.clone()));
            ops.push(WriteOp::Insert(
                Space::MintingActors,
                encoded_key.to_vec(),
                actor.0.to_be_bytes().into(),
            ));
            index_entry(&mut ops);
        }
        (Change::Remove, _) => {
            debug_assert!(existed, "only a record that exists is removed");
            // One batch: the minting actor, the index entry and the record go together.
            ops.push(WriteOp::Remove(Space::MintingActors, encoded_key.to_vec()));
            ops.push(WriteOp::Remove(Space::KeyIndex, key.encode_index()));
            ops.push(WriteOp::Remove(Space::Records, encoded_key.to_vec()));
        }
        (Change::Keep, _) | (Change::Put(_) | Change::Mint(..), None) => {
            debug_assert!(matches!(change, Change::Keep), "a stored set comes with its encoding");
        }
    }
    ops
}

/// What a written change leaves for the record cache, the Merkle tree and the tenant's usage.
#[derive(Debug)]
struct Followup {
    old_entry: Option<Entry>,
    old_usage: Usage,
    new_entry: Option<Entry>,
    new_usage: Usage,
    /// The record as written (`None`: removed), for the record cache.
    new_record: Option<Slice>,
}

/// The writes of `change` to `key`'s record (`existing` as read under its lock) and what follows
/// them; `None` when the record stays as it is.
fn planned(
    key: &RecordKey,
    encoded_key: &[u8],
    existing: Option<VersionSet>,
    change: Change,
) -> Option<(Vec<WriteOp>, Followup)> {
    let (new_entry, new_usage, new_record) = match &change {
        Change::Keep => return None,
        Change::Put(set) | Change::Mint(set, _) => {
            (Some(Entry::of(set)), Usage::of(set), Some(Slice::from(encode_version_set(set))))
        }
        Change::Remove => (None, Usage::default(), None),
    };
    let ops = record_ops(key, encoded_key, existing.is_some(), &change, new_record.as_ref());
    let followup = Followup {
        old_entry: existing.as_ref().map(Entry::of),
        old_usage: existing.as_ref().map(Usage::of).unwrap_or_default(),
        new_entry,
        new_usage,
        new_record,
    };
    Some((ops, followup))
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
        let Some((ops, followup)) = planned(key, &encoded_key, existing, change) else { return Ok(out) };
        match (apply, preparing) {
            (Apply::Commit, Some(preparing)) => self.commit_write(ops, preparing)?,
            _ => self.write_unsynced(ops)?,
        }
        self.follow(key, &encoded_key, followup);
        Ok(out)
    }

    /// Keeps the record cache, the partition's Merkle tree and the tenant's usage in step with a
    /// written change (call with the key's stripe lock held, once the change is in the engine).
    fn follow(&self, key: &RecordKey, encoded_key: &[u8], followup: Followup) {
        let Followup { old_entry, old_usage, new_entry, new_usage, new_record } = followup;
        self.record_cache.set(encoded_key, new_record.as_ref());
        self.merkle.update(encoded_key, old_entry, new_entry);
        self.usage.replace(key, old_usage, new_usage);
    }

    /// [`Self::mutate`] for many records, durable at once (see the module docs): one result per
    /// item, in order. An item `decide` refuses (or whose record cannot be read) fails alone; a
    /// failed group commit fails the whole call and poisons the write path.
    pub(super) fn mutate_many<I, T>(
        &self,
        items: Vec<(RecordKey, I)>,
        mut decide: impl FnMut(&RecordKey, &[u8], I, Option<&VersionSet>) -> Result<(Change, T), EngineError>,
    ) -> Result<Vec<Result<T, EngineError>>, EngineError> {
        let encoded: Vec<Vec<u8>> = items.iter().map(|(key, _)| key.encode()).collect();
        // An item's round: how many earlier items of the batch have its key.
        let mut occurrences: HashMap<&[u8], usize> = HashMap::with_capacity(items.len());
        let rounds: Vec<usize> = encoded
            .iter()
            .map(|key| {
                let seen = occurrences.entry(key.as_slice()).or_insert(0);
                *seen += 1;
                *seen - 1
            })
            .collect();
        let mut pending: Vec<Option<(RecordKey, I)>> = items.into_iter().map(Some).collect();
        let mut results: Vec<Option<Result<T, EngineError>>> = pending.iter().map(|_| None).collect();
        for round in 0..=rounds.iter().copied().max().unwrap_or(0) {
            let members: Vec<usize> = (0..rounds.len()).filter(|i| rounds[*i] == round).collect();
            self.mutate_round(&members, &encoded, &mut pending, &mut results, &mut decide)?;
        }
        debug_assert!(results.iter().all(Option::is_some), "every item of a batch is decided");
        Ok(results.into_iter().flatten().collect())
    }

    /// One round of [`Self::mutate_many`]: the `members` (distinct keys) decided under all their
    /// stripe locks, written in one group commit, then followed, each result at its index.
    fn mutate_round<I, T>(
        &self,
        members: &[usize],
        encoded: &[Vec<u8>],
        pending: &mut [Option<(RecordKey, I)>],
        results: &mut [Option<Result<T, EngineError>>],
        decide: &mut impl FnMut(&RecordKey, &[u8], I, Option<&VersionSet>) -> Result<(Change, T), EngineError>,
    ) -> Result<(), EngineError> {
        let stripes: std::collections::BTreeSet<usize> =
            members.iter().map(|i| self.stripe_of(&encoded[*i])).collect();
        // Ascending order: no other path holds more than one stripe, so this cannot deadlock.
        let _guards: Vec<MutexGuard<'_, ()>> = stripes.into_iter().map(|s| self.lock_stripe(s)).collect();
        let (mut ops, mut decided) =
            (Vec::with_capacity(members.len() * 2), Vec::with_capacity(members.len()));
        for &index in members {
            // Each index is in exactly one round, so its item is still there.
            let Some((key, item)) = pending[index].take() else { continue };
            let encoded_key = &encoded[index];
            let outcome = self.read_set(encoded_key).and_then(|existing| {
                let (change, out) = decide(&key, encoded_key, item, existing.as_ref())?;
                if let Some((item_ops, followup)) = planned(&key, encoded_key, existing, change) {
                    ops.extend(item_ops);
                    decided.push((index, key, followup));
                }
                Ok(out)
            });
            results[index] = Some(outcome);
        }
        if !ops.is_empty() {
            self.commit_writes(ops)?;
        }
        for (index, key, followup) in decided {
            self.follow(&key, &encoded[index], followup);
        }
        Ok(())
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
        self.check_writable()?;
        let encoded_key = key.encode();
        self.mutate(key, Apply::Commit, |existing| {
            self.decide_coordinated(key, &encoded_key, write, deadline, existing)
        })
    }

    /// Applies many coordinated writes (a router's coalesced calls), durably at once, each checked
    /// and refused on its own as [`Self::coordinate_write_before`] would; one result per write, in
    /// order. Errs as a whole only when the group commit fails (the write path is then poisoned).
    pub fn coordinate_writes(
        &self,
        writes: Vec<(RecordKey, CoordinatedWrite, ApplyDeadline)>,
    ) -> Result<Vec<Result<VersionSet, EngineError>>, EngineError> {
        let items = writes.into_iter().map(|(key, write, deadline)| (key, (write, deadline))).collect();
        self.mutate_many(items, |key, encoded_key, (write, deadline), existing| {
            self.check_writable()?;
            self.decide_coordinated(key, encoded_key, write, deadline, existing)
        })
    }

    /// A coordinated write's decision, under the key's stripe lock.
    fn decide_coordinated(
        &self,
        key: &RecordKey,
        encoded_key: &[u8],
        write: CoordinatedWrite,
        deadline: ApplyDeadline,
        existing: Option<&VersionSet>,
    ) -> Result<(Change, VersionSet), EngineError> {
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
            Some(_) => self.minting_actor(encoded_key)?,
            None => None,
        };
        let actor = minting.unwrap_or_else(|| Actor(rand::random::<u64>()));
        let quota = write.quota;
        let set = apply_coordinated(existing, write, actor, now)?;
        quota.check(existing.map(Usage::of).unwrap_or_default(), Usage::of(&set))?;
        let change =
            if minting.is_some() { Change::Put(set.clone()) } else { Change::Mint(set.clone(), actor) };
        Ok((change, set))
    }

    /// Merges `incoming` into the local replica; returns whether the local set changed.
    pub fn merge(&self, key: &RecordKey, incoming: &VersionSet) -> Result<bool, EngineError> {
        self.check_writable()?;
        self.mutate(key, Apply::Commit, |existing| self.decide_merge(key, incoming, existing))
    }

    /// Merges many replicas (a router's coalesced replicate calls), durably at once, each refused on
    /// its own as [`Self::merge`] would; one result per item (whether the set changed), in order.
    pub fn merge_many(
        &self,
        items: Vec<(RecordKey, VersionSet)>,
    ) -> Result<Vec<Result<bool, EngineError>>, EngineError> {
        self.mutate_many(items, |key, _, incoming, existing| {
            self.check_writable()?;
            self.decide_merge(key, &incoming, existing)
        })
    }

    /// A replica merge's decision, under the key's stripe lock.
    fn decide_merge(
        &self,
        key: &RecordKey,
        incoming: &VersionSet,
        existing: Option<&VersionSet>,
    ) -> Result<(Change, bool), EngineError> {
        self.check_tenant(&key.tenant)?;
        let mut set = existing.cloned().unwrap_or_default();
        if !set.merge_from(incoming) {
            return Ok((Change::Keep, false));
        }
        storable(&set)?;
        Ok((Change::Put(set), true))
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
