//! Hints: version sets this node keeps for another node that missed a write, in keyspace `hints`
//! keyed by (target node, partition, ...) with the time they were stored, until delivery or expiry.
//! A hint is deleted only if unchanged since it was read, so one that grew during delivery stays.

use super::*;

/// A hint kept for another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHint {
    pub target_node: NodeId,
    pub key: RecordKey,
    pub set: VersionSet,
    pub stored_at_ms: u64,
}

pub(super) fn decode_hint_value(raw: &[u8]) -> Result<(u64, VersionSet), EngineError> {
    let (stamp, set) = raw.split_at_checked(8).ok_or(EngineError::Corrupt(DecodeError::Truncated))?;
    let stored_at_ms = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
    Ok((stored_at_ms, decode_version_set(set).map_err(EngineError::Corrupt)?))
}

impl Engine {
    /// Keeps `set` as a hint for `target_node` (merged with an earlier hint for the same key).
    pub fn put_hint(
        &self,
        target_node: NodeId,
        key: &RecordKey,
        set: &VersionSet,
    ) -> Result<(), EngineError> {
        self.check_writable()?;
        let hint_key = key.encode_hint(target_node);
        let _guard = self.lock(&hint_key);
        self.check_tenant(&key.tenant)?;
        let preparing = self.commit.preparing();
        let merged = match self.hints.get(&hint_key).map_err(EngineError::Read)? {
            Some(raw) => decode_hint_value(&raw)?.1.merge(set),
            None => set.clone(),
        };
        storable(&merged)?;
        let mut value = now_ms().to_be_bytes().to_vec();
        value.extend_from_slice(&encode_version_set(&merged));
        self.commit_write(vec![WriteOp::Insert(Space::Hints, hint_key, value.into())], preparing)
    }

    /// Up to `limit` hints for `target_node` (optionally one partition), in key order.
    pub fn list_hints(
        &self,
        target_node: NodeId,
        partition: Option<PartitionId>,
        limit: usize,
    ) -> Result<Vec<StoredHint>, EngineError> {
        let mut hints = Vec::new();
        for item in self.hints.prefix(hint_prefix(target_node, partition)).take(limit) {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            let Some((target, key)) = RecordKey::decode_hint(&raw_key) else { continue };
            let (stored_at_ms, set) = decode_hint_value(&raw_value)?;
            hints.push(StoredHint { target_node: target, key, set, stored_at_ms });
        }
        Ok(hints)
    }

    /// Number of hints held for `target_node` (a scan of that node's hint range).
    pub fn count_hints(&self, target_node: NodeId) -> u64 {
        self.hints.prefix(hint_prefix(target_node, None)).count() as u64
    }

    /// The nodes this node holds hints for (one seek per node, not a scan of every hint).
    pub fn hint_targets(&self) -> Result<Vec<u32>, EngineError> {
        let mut targets = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some(item) = self.hints.range(from.as_slice()..).next() {
            let key = item.key().map_err(EngineError::Read)?;
            let Some(target) = key.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes) else {
                break;
            };
            targets.push(target);
            match target.checked_add(1) {
                Some(next) => from = next.to_be_bytes().to_vec(),
                None => break,
            }
        }
        Ok(targets)
    }

    /// Deletes the hint for `key` only if it is still exactly `delivered` (a hint that grew while it was
    /// being delivered is kept for the next round).
    pub fn delete_hint_if_unchanged(
        &self,
        target_node: NodeId,
        key: &RecordKey,
        delivered: &VersionSet,
    ) -> Result<bool, EngineError> {
        self.check_writable()?;
        let hint_key = key.encode_hint(target_node);
        let _guard = self.lock(&hint_key);
        let preparing = self.commit.preparing();
        match self.hints.get(&hint_key).map_err(EngineError::Read)? {
            Some(raw) if &decode_hint_value(&raw)?.1 == delivered => {
                self.commit_write(vec![WriteOp::Remove(Space::Hints, hint_key)], preparing)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Drops hints last updated before `stored_before_ms` (hint retention); returns how many.
    pub fn expire_hints(&self, stored_before_ms: u64) -> Result<u64, EngineError> {
        let mut doomed = Vec::new();
        for item in self.hints.iter() {
            let (raw_key, raw_value) = item.into_inner().map_err(EngineError::Read)?;
            if let Some(stamp) = raw_value.get(..8) {
                let stored_at_ms = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
                if stored_at_ms < stored_before_ms {
                    doomed.push((raw_key.to_vec(), raw_value.to_vec()));
                }
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        self.check_writable()?;
        let mut expired = 0;
        for (hint_key, seen) in doomed {
            let _guard = self.lock(&hint_key);
            // Unchanged since the scan: a hint that grew meanwhile is young again.
            if self.hints.get(&hint_key).map_err(EngineError::Read)?.is_some_and(|raw| *raw == *seen) {
                self.write(|| self.hints.remove(hint_key.clone()))?;
                expired += 1;
            }
        }
        if expired > 0 {
            self.make_durable()?;
        }
        Ok(expired)
    }
}
