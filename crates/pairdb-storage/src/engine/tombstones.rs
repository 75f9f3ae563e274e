//! Tombstones and data this node may remove: counting and purging old tombstones (the anti-entropy
//! GC path), recording and collecting tombstones every owner acknowledged (the full-ack path, keyspace
//! `confirmed_tombstones`), and deleting records of partitions this node no longer owns. Every
//! removal re-checks the record under its stripe lock, so a key written meanwhile is kept.

use pairdb_core::gc::{self, Confirmation, ConfirmedVerdict};

use super::mutate::{Apply, Change};

use super::*;

/// A full-ack confirmation as stored: digest, topology epoch (u64 BE) then N (u32 BE).
fn decode_confirmation(raw: &[u8]) -> Option<Confirmation> {
    let digest = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    let topology_epoch = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
    let replication_factor = u32::from_be_bytes(raw.get(16..20)?.try_into().ok()?);
    Some(Confirmation { digest, placement: TombstonePlacement { topology_epoch, replication_factor } })
}

fn encode_confirmation(confirmation: &Confirmation) -> Vec<u8> {
    let mut value = Vec::with_capacity(20);
    value.extend_from_slice(&confirmation.digest.to_be_bytes());
    value.extend_from_slice(&confirmation.placement.topology_epoch.to_be_bytes());
    value.extend_from_slice(&confirmation.placement.replication_factor.to_be_bytes());
    value
}

impl Engine {
    /// Tombstone-only records of `partition` (no scan).
    pub fn partition_tombstones(&self, partition: PartitionId) -> u64 {
        self.merkle.tombstones(partition)
    }

    /// Tombstone-only records of `partition` whose newest tombstone was written before
    /// `written_before_ms`, at most `limit` (tombstone GC candidates; a scan of the partition).
    pub fn old_tombstones(
        &self,
        partition: PartitionId,
        written_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<RecordDigest>, EngineError> {
        let mut out = Vec::new();
        for item in self.records.prefix(partition_prefix(partition)) {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            let Some(key) = RecordKey::decode(&raw_key) else { continue };
            let set = decode_version_set(&raw_value).map_err(EngineError::Corrupt)?;
            // Tombstone-only, or every value expiring: `is_candidate` checks when it died.
            if set.dead_since_ms().is_some() {
                let digest = RecordDigest::of(key, &set);
                if gc::tombstones::is_candidate(&digest.state(), written_before_ms) {
                    out.push(digest);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Tombstone GC: removes each record that is still exactly the tombstone-only set with `digest`
    /// and whose newest tombstone was written before `written_before_ms`. The caller vouches that
    /// every replica holds the same tombstone (anti-entropy saw equal digests everywhere).
    pub fn purge_tombstones(
        &self,
        candidates: &[(RecordKey, u64)],
        written_before_ms: u64,
    ) -> Result<u64, EngineError> {
        self.check_writable()?;
        let mut purged = 0;
        for (key, digest) in candidates {
            let removed = self.mutate(key, Apply::Journal, |existing| {
                let current = existing.map(|set| RecordDigest::of(key.clone(), set).state());
                Ok(match gc::tombstones::purge_allowed(current.as_ref(), *digest, written_before_ms) {
                    true => (Change::Remove, 1),
                    false => (Change::Keep, 0),
                })
            })?;
            purged += removed;
        }
        if purged > 0 {
            self.make_durable()?;
        }
        Ok(purged)
    }

    /// Remembers that every owner of `key` acknowledged the tombstone-only `set` under placement
    /// `placement` (the full-ack GC path). Only if this node's record is still exactly that set:
    /// `false` otherwise (the tombstone then waits for anti-entropy's confirmation).
    pub fn confirm_tombstone(
        &self,
        key: &RecordKey,
        set: &VersionSet,
        placement: TombstonePlacement,
    ) -> Result<bool, EngineError> {
        self.check_writable()?;
        let encoded_key = key.encode();
        let _guard = self.lock(&encoded_key);
        let digest = version_digest(set);
        let Some(current) = self.read_set(&encoded_key)? else { return Ok(false) };
        if !current.is_deleted() || version_digest(&current) != digest {
            return Ok(false);
        }
        let value = encode_confirmation(&Confirmation { digest, placement });
        self.write(|| self.confirmed.insert(encoded_key.clone(), value))?;
        Ok(true)
    }

    /// One pass of full-ack tombstone GC over at most `limit` confirmations after `cursor`: purges
    /// each record that is still exactly its confirmed tombstone-only set, written before
    /// `written_before_ms`, whose placement `placement_holds` still accepts; forgets confirmations
    /// whose record changed or is gone, or whose placement no longer holds. Returns (purged, the
    /// cursor to go on from, `None` once the end was reached).
    pub fn collect_confirmed_tombstones(
        &self,
        cursor: Option<&[u8]>,
        limit: usize,
        written_before_ms: u64,
        placement_holds: &dyn Fn(&RecordKey, TombstonePlacement) -> bool,
    ) -> Result<(u64, Option<Vec<u8>>), EngineError> {
        self.check_writable()?;
        let mut batch = Vec::new();
        let iter = match cursor {
            Some(after) => self
                .confirmed
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.confirmed.range::<&[u8], _>(..),
        };
        for item in iter.take(limit) {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            batch.push((raw_key.to_vec(), raw_value.to_vec()));
        }
        let next = (batch.len() == limit).then(|| batch.last().map(|(k, _)| k.clone())).flatten();
        let mut purged = 0;
        let mut wrote = false;
        for (encoded_key, raw_value) in batch {
            let (Some(key), Some(confirmation)) =
                (RecordKey::decode(&encoded_key), decode_confirmation(&raw_value))
            else {
                self.write(|| self.confirmed.remove(encoded_key.clone()))?;
                wrote = true;
                continue;
            };
            let holds = placement_holds(&key, confirmation.placement);
            let verdict = self.mutate(&key, Apply::Journal, |existing| {
                let current = existing.map(|set| RecordDigest::of(key.clone(), set).state());
                let verdict = gc::tombstones::confirmed_verdict(
                    current.as_ref(),
                    &confirmation,
                    holds,
                    written_before_ms,
                );
                if verdict != ConfirmedVerdict::Wait {
                    // Under the key's lock, so a confirmation recorded meanwhile is not the one removed.
                    self.write(|| self.confirmed.remove(encoded_key.clone()))?;
                }
                let change = if verdict == ConfirmedVerdict::Purge { Change::Remove } else { Change::Keep };
                Ok((change, verdict))
            })?;
            purged += u64::from(verdict == ConfirmedVerdict::Purge);
            wrote |= verdict != ConfirmedVerdict::Wait;
        }
        if wrote {
            self.make_durable()?;
        }
        Ok((purged, next))
    }

    /// Confirmations waiting (a scan; for tests and stats).
    pub fn confirmed_tombstones(&self) -> u64 {
        self.confirmed.iter().count() as u64
    }

    /// Deletes up to `limit` records of `partition` whose tenant `drop_tenant` says this node no longer
    /// owns; returns (deleted, scanned everything). Hints are not touched.
    pub fn delete_unowned(
        &self,
        partition: PartitionId,
        drop_tenant: &dyn Fn(&str) -> bool,
        limit: usize,
    ) -> Result<(u64, bool), EngineError> {
        self.check_writable()?;
        let mut doomed = Vec::new();
        let mut complete = true;
        for item in self.records.prefix(partition_prefix(partition)) {
            let raw_key = item.key().map_err(EngineError::Read)?;
            let Some(key) = RecordKey::decode(&raw_key) else { continue };
            if drop_tenant(&key.tenant) {
                if doomed.len() >= limit {
                    complete = false;
                    break;
                }
                doomed.push(key);
            }
        }
        let mut deleted = 0;
        for key in doomed {
            let removed = self.mutate(&key, Apply::Journal, |existing| {
                Ok(if existing.is_some() { (Change::Remove, 1) } else { (Change::Keep, 0) })
            })?;
            deleted += removed;
        }
        if deleted > 0 {
            self.make_durable()?;
        }
        Ok((deleted, complete))
    }
}
