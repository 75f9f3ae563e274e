//! Purging a deleted tenant: its records, hints, full-ack confirmations and quarantined records.
//!
//! Keyspace `tenant_purges`: tenant id → `state u8 (1 purging, 2 purged) | purge_seq u64be |
//! generation u64be` (the deletion, and which creation of the tenant it deleted). A tenant
//! with an entry is *refused*: every write path checks [`Engine::is_refused`] under the key's stripe
//! lock, so once [`Engine::begin_tenant_purge`] returned (it passes every stripe lock once after
//! recording the entry), no write of the tenant can land anywhere the purge scan has already passed.
//! The entry survives restarts (the refusal does too); [`Engine::forget_tenant_purge`] drops it when
//! meta no longer lists the tenant as being deleted (deletion complete; the id may be reused).
//!
//! Scans are over whole keyspaces (records sort by partition first), in bounded steps resumed from a
//! cursor, so a purge shares the node with its normal work.

use std::ops::Bound;

use fjall::Keyspace;
use pairdb_core::encoding::decode_version_set;

use pairdb_core::usage::Usage;

use super::commit::{Space, WriteOp};
use super::{Engine, EngineError};
use crate::keys::RecordKey;
use crate::merkle::Entry;

const PURGING: u8 = 1;
const PURGED: u8 = 2;

/// Which keyspace a purge step scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeSpace {
    /// Purged first: a minting actor never outlives its record.
    MintingActors,
    Records,
    Hints,
    Confirmed,
    Quarantine,
}

impl PurgeSpace {
    pub const ALL: [PurgeSpace; 5] = [
        PurgeSpace::MintingActors,
        PurgeSpace::Records,
        PurgeSpace::Hints,
        PurgeSpace::Confirmed,
        PurgeSpace::Quarantine,
    ];
}

/// A purge recorded on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPurge {
    pub tenant: String,
    pub purge_seq: u64,
    /// The generation of the tenant that was deleted (0: unknown).
    pub generation: u64,
    pub done: bool,
}

/// One bounded step of a purge scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeStep {
    pub removed: u64,
    /// Resume strictly after this key; `None` once the keyspace was scanned to its end.
    pub next: Option<Vec<u8>>,
}

fn encode_entry(state: u8, purge_seq: u64, generation: u64) -> Vec<u8> {
    let mut value = vec![state];
    value.extend_from_slice(&purge_seq.to_be_bytes());
    value.extend_from_slice(&generation.to_be_bytes());
    value
}

fn decode_entry(tenant: &[u8], raw: &[u8]) -> Option<TenantPurge> {
    let tenant = std::str::from_utf8(tenant).ok()?.to_owned();
    let purge_seq = u64::from_be_bytes(raw.get(1..9)?.try_into().ok()?);
    let generation = u64::from_be_bytes(raw.get(9..17)?.try_into().ok()?);
    Some(TenantPurge { tenant, purge_seq, generation, done: *raw.first()? == PURGED })
}

impl Engine {
    /// Loads the refused tenants (at open).
    pub(super) fn load_tenant_purges(&self) -> Result<(), EngineError> {
        let purges = self.tenant_purges()?;
        let mut refused = self.refused.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for purge in purges {
            refused.insert(purge.tenant, purge.purge_seq);
        }
        Ok(())
    }

    /// Whether writes of `tenant` are refused here (it is being, or was, purged).
    pub fn is_refused(&self, tenant: &str) -> bool {
        let refused = self.refused.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        !refused.is_empty() && refused.contains_key(tenant)
    }

    /// Every purge recorded here.
    pub fn tenant_purges(&self) -> Result<Vec<TenantPurge>, EngineError> {
        let mut out = Vec::new();
        for item in self.purges.iter() {
            let (tenant, raw) = item.into_inner().map_err(EngineError::Read)?;
            if let Some(purge) = decode_entry(&tenant, &raw) {
                out.push(purge);
            }
        }
        Ok(out)
    }

    /// Starts purging `tenant` (deletion `purge_seq`): from the return on, no write of the tenant is
    /// accepted and none is still in flight. Idempotent.
    pub fn begin_tenant_purge(
        &self,
        tenant: &str,
        purge_seq: u64,
        generation: u64,
    ) -> Result<(), EngineError> {
        self.check_writable()?;
        let current = self.purges.get(tenant.as_bytes()).map_err(EngineError::Read)?;
        let recorded = current.as_deref().and_then(|raw| decode_entry(tenant.as_bytes(), raw));
        if recorded.is_none_or(|p| p.purge_seq != purge_seq) {
            self.write(|| {
                self.purges.insert(tenant.as_bytes(), encode_entry(PURGING, purge_seq, generation))
            })?;
            self.make_durable()?;
        }
        self.refused
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.to_owned(), purge_seq);
        // A write that checked the refusal before it was set holds its stripe lock until committed:
        // passing every stripe once waits for all of them.
        for stripe in self.stripes.iter() {
            drop(stripe.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        }
        Ok(())
    }

    /// Removes `tenant`'s entries from `space`, scanning at most `max_scan` keys after `after`.
    pub fn purge_tenant_step(
        &self,
        tenant: &str,
        space: PurgeSpace,
        after: Option<&[u8]>,
        max_scan: usize,
    ) -> Result<PurgeStep, EngineError> {
        self.check_writable()?;
        let keyspace = self.purge_keyspace(space);
        let iter = match after {
            Some(after) => keyspace.range::<&[u8], _>((Bound::Excluded(after), Bound::Unbounded)),
            None => keyspace.range::<&[u8], _>(..),
        };
        let mut doomed = Vec::new();
        let mut last = None;
        let mut scanned = 0usize;
        for item in iter.take(max_scan) {
            let raw_key = item.key().map_err(EngineError::Read)?;
            scanned += 1;
            if key_tenant(space, &raw_key).as_deref() == Some(tenant) {
                doomed.push(raw_key.to_vec());
            }
            last = Some(raw_key.to_vec());
        }
        let removed = doomed.len() as u64;
        for raw_key in doomed {
            let _guard = self.lock(&raw_key);
            match space {
                PurgeSpace::Records => self.purge_record(&raw_key)?,
                _ => self.write(|| keyspace.remove(raw_key.clone()))?,
            }
        }
        if removed > 0 {
            self.make_durable()?;
        }
        Ok(PurgeStep { removed, next: if scanned < max_scan { None } else { last } })
    }

    /// Removes one record of a purged tenant with its index entry (one batch), keeping its Merkle
    /// tree and the tenant's usage in step (call with the key's stripe lock held).
    fn purge_record(&self, raw_key: &[u8]) -> Result<(), EngineError> {
        // Every stored record decodes (the others were quarantined at open).
        let set = self
            .records
            .get(raw_key)
            .map_err(EngineError::Read)?
            .and_then(|raw| decode_version_set(&raw).ok());
        let mut ops = vec![WriteOp::Remove(Space::Records, raw_key.to_vec())];
        let key = RecordKey::decode(raw_key);
        if let Some(key) = &key {
            ops.push(WriteOp::Remove(Space::KeyIndex, key.encode_index()));
        }
        self.write_unsynced(ops)?;
        self.record_cache.set(raw_key, None);
        if let Some(set) = set {
            self.merkle.update(raw_key, Some(Entry::of(&set)), None);
            if let Some(key) = &key {
                self.usage.replace(key, Usage::of(&set), Usage::default());
            }
        }
        Ok(())
    }

    /// Records that `tenant` was purged here (reported to meta).
    pub fn finish_tenant_purge(
        &self,
        tenant: &str,
        purge_seq: u64,
        generation: u64,
    ) -> Result<(), EngineError> {
        self.check_writable()?;
        self.write(|| self.purges.insert(tenant.as_bytes(), encode_entry(PURGED, purge_seq, generation)))?;
        self.make_durable()
    }

    /// Drops the purge entry of `tenant`: its writes are accepted again (meta completed the deletion,
    /// so the id may belong to a new tenant).
    pub fn forget_tenant_purge(&self, tenant: &str) -> Result<(), EngineError> {
        self.check_writable()?;
        self.write(|| self.purges.remove(tenant.as_bytes()))?;
        self.make_durable()?;
        self.refused.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(tenant);
        Ok(())
    }

    fn purge_keyspace(&self, space: PurgeSpace) -> &Keyspace {
        match space {
            PurgeSpace::MintingActors => &self.minting,
            PurgeSpace::Records => &self.records,
            PurgeSpace::Hints => &self.hints,
            PurgeSpace::Confirmed => &self.confirmed,
            PurgeSpace::Quarantine => &self.quarantine,
        }
    }
}

/// The tenant of a raw key of `space` (`None` when the key does not decode).
fn key_tenant(space: PurgeSpace, raw_key: &[u8]) -> Option<String> {
    match space {
        PurgeSpace::Hints => RecordKey::decode_hint(raw_key).map(|(_, key)| key.tenant),
        PurgeSpace::MintingActors | PurgeSpace::Records | PurgeSpace::Confirmed | PurgeSpace::Quarantine => {
            RecordKey::decode(raw_key).map(|key| key.tenant)
        }
    }
}
