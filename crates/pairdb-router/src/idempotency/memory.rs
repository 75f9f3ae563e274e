//! The embedded idempotency store: one router's records in a bounded map. Deadlines use
//! `tokio::time::Instant`, so tests drive leases and retention with a paused clock.
//!
//! Expired records are evicted eagerly through a min-heap of deadlines (amortised O(log n) per call);
//! heap entries made stale by `complete` or `release` are skipped when they surface, and the heap is
//! rebuilt from the map when stale entries outnumber live ones, so it stays within a constant factor
//! of the map. `State::bytes` is the sum of [`entry_bytes`] over the map: every insert and removal goes
//! through `put` and `remove`, which keep it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use super::{
    Begin, Fingerprint, IdempotencyError, IdempotencySettings, Record, Reservation, answer_existing,
};

/// In-process [`super::IdempotencyStore`] backend for a single router. Clones share the records.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    settings: IdempotencySettings,
}

type RecordKey = (String, String);

#[derive(Debug, Default)]
struct State {
    records: HashMap<RecordKey, Entry>,
    expiries: BinaryHeap<Reverse<Expiry>>,
    next_token: u128,
    /// Bytes the records hold ([`entry_bytes`]).
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    record: Record,
    expires_at: Instant,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Expiry {
    at: Instant,
    token: u128,
    key: RecordKey,
}

impl MemoryStore {
    pub fn new(settings: IdempotencySettings) -> MemoryStore {
        MemoryStore { state: Arc::default(), settings }
    }

    /// Number of live records (expired ones are evicted first).
    pub fn len(&self) -> usize {
        let mut state = self.lock();
        state.evict_expired(Instant::now());
        state.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn begin(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Begin, IdempotencyError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.evict_expired(now);
        let record_key = (tenant.to_owned(), key.to_owned());
        if let Some(entry) = state.records.get(&record_key) {
            return answer_existing(&entry.record, fingerprint);
        }
        if state.records.len() >= self.settings.memory_max_entries
            || state.bytes >= self.settings.memory_max_bytes
        {
            return Err(IdempotencyError::Unavailable(format!(
                "memory idempotency store is full ({} records, {} bytes)",
                state.records.len(),
                state.bytes
            )));
        }
        state.next_token += 1;
        let token = state.next_token;
        state.put(
            record_key,
            Record::InFlight { token, fingerprint: *fingerprint },
            now + self.settings.lease,
        );
        Ok(Begin::Reserved(Reservation {
            tenant: tenant.to_owned(),
            key: key.to_owned(),
            token,
            fingerprint: *fingerprint,
        }))
    }

    pub(super) fn complete(&self, reservation: Reservation, response: &[u8]) -> Result<(), IdempotencyError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.evict_expired(now);
        let record_key = (reservation.tenant, reservation.key);
        if !state.owned_by(&record_key, reservation.token) {
            tracing::warn!(
                tenant = %record_key.0,
                "idempotency lease lost before completion; response not recorded"
            );
            return Ok(());
        }
        let record = Record::Completed {
            token: reservation.token,
            fingerprint: reservation.fingerprint,
            response: response.to_vec(),
        };
        state.put(record_key, record, now + self.settings.retention);
        Ok(())
    }

    pub(super) fn release(&self, reservation: Reservation) -> Result<(), IdempotencyError> {
        let mut state = self.lock();
        state.evict_expired(Instant::now());
        let record_key = (reservation.tenant, reservation.key);
        if state.owned_by(&record_key, reservation.token) {
            state.remove(&record_key);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No code path panics while holding the lock with the map half-updated, so a poisoned lock still
        // guards a consistent map.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Whether `key` holds an in-flight record of reservation `token`.
    fn owned_by(&self, key: &RecordKey, token: u128) -> bool {
        matches!(
            self.records.get(key),
            Some(Entry { record: Record::InFlight { token: owner, .. }, .. }) if *owner == token
        )
    }

    fn put(&mut self, key: RecordKey, record: Record, expires_at: Instant) {
        let token = match &record {
            Record::InFlight { token, .. } | Record::Completed { token, .. } => *token,
        };
        self.expiries.push(Reverse(Expiry { at: expires_at, token, key: key.clone() }));
        let key_bytes = key.0.len() + key.1.len();
        self.bytes += entry_bytes(key_bytes, &record);
        if let Some(old) = self.records.insert(key, Entry { record, expires_at }) {
            self.forget_bytes(entry_bytes(key_bytes, &old.record));
        }
        if self.expiries.len() > 2 * self.records.len() + 1024 {
            self.rebuild_expiries();
        }
    }

    fn evict_expired(&mut self, now: Instant) {
        while let Some(Reverse(next)) = self.expiries.peek() {
            if next.at > now {
                break;
            }
            let Some(Reverse(expiry)) = self.expiries.pop() else { break };
            let current = self.records.get(&expiry.key).is_some_and(|entry| {
                entry.expires_at == expiry.at && record_token(&entry.record) == expiry.token
            });
            if current {
                self.remove(&expiry.key);
            }
        }
    }

    fn remove(&mut self, key: &RecordKey) {
        if let Some(old) = self.records.remove(key) {
            self.forget_bytes(entry_bytes(key.0.len() + key.1.len(), &old.record));
        }
    }

    fn forget_bytes(&mut self, bytes: usize) {
        debug_assert!(self.bytes >= bytes, "the byte count covers every record it counted");
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    fn rebuild_expiries(&mut self) {
        self.expiries = self
            .records
            .iter()
            .map(|(key, entry)| {
                Reverse(Expiry { at: entry.expires_at, token: record_token(&entry.record), key: key.clone() })
            })
            .collect();
    }
}

/// What a record counts against [`IdempotencySettings::memory_max_bytes`]: its key (`key_bytes`: tenant
/// and key), its response, and a fixed allowance for the map entry and its expiry.
fn entry_bytes(key_bytes: usize, record: &Record) -> usize {
    const ENTRY_OVERHEAD_BYTES: usize = 128;
    let response = match record {
        Record::InFlight { .. } => 0,
        Record::Completed { response, .. } => response.len(),
    };
    ENTRY_OVERHEAD_BYTES + key_bytes + response
}

fn record_token(record: &Record) -> u128 {
    match record {
        Record::InFlight { token, .. } | Record::Completed { token, .. } => *token,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(max_entries: usize) -> IdempotencySettings {
        IdempotencySettings {
            lease: Duration::from_secs(1),
            retention: Duration::from_secs(10),
            memory_max_entries: max_entries,
            ..IdempotencySettings::default()
        }
    }

    /// Keyed batches record responses of hundreds of KB: the byte bound refuses new keys once the
    /// recorded responses reach it, answers the recorded keys meanwhile, and frees the bytes of records
    /// that expire or are released.
    #[tokio::test(start_paused = true)]
    async fn recorded_response_bytes_are_bounded() {
        let settings = IdempotencySettings { memory_max_bytes: 1 << 20, ..settings(1_000) };
        let store = MemoryStore::new(settings);
        let fingerprint = Fingerprint::of(&[b"f"]);
        let response = vec![7u8; 300 << 10];
        for key in ["a", "b", "c", "d"] {
            let Ok(Begin::Reserved(reservation)) = store.begin("t", key, &fingerprint) else {
                panic!("key {key} is reserved while the store has room");
            };
            store.complete(reservation, &response).expect("complete");
        }
        let full = store.begin("t", "e", &fingerprint);
        assert!(matches!(full, Err(IdempotencyError::Unavailable(_))), "{full:?}");
        assert!(matches!(store.begin("t", "a", &fingerprint), Ok(Begin::Completed(_))));

        // A released reservation gives its bytes back; expiry gives back the responses'.
        tokio::time::advance(Duration::from_secs(11)).await;
        let Ok(Begin::Reserved(reservation)) = store.begin("t", "e", &fingerprint) else {
            panic!("the expired records' bytes are free again");
        };
        store.release(reservation).expect("release");
        assert_eq!(store.lock().bytes, 0, "nothing is held once every record is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_rejects_new_keys_until_records_expire() {
        let store = MemoryStore::new(settings(2));
        let fingerprint = Fingerprint::of(&[b"f"]);
        let first = store.begin("t", "a", &fingerprint);
        assert!(matches!(first, Ok(Begin::Reserved(_))));
        assert!(matches!(store.begin("t", "b", &fingerprint), Ok(Begin::Reserved(_))));
        let full = store.begin("t", "c", &fingerprint);
        assert!(matches!(full, Err(IdempotencyError::Unavailable(_))), "{full:?}");
        // Existing keys are still answered while full.
        assert!(matches!(store.begin("t", "a", &fingerprint), Err(IdempotencyError::InFlight)));

        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(store.begin("t", "c", &fingerprint), Ok(Begin::Reserved(_))));
        assert_eq!(store.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_heap_entries_stay_bounded() {
        let store = MemoryStore::new(settings(10));
        let fingerprint = Fingerprint::of(&[b"f"]);
        for _ in 0..5_000 {
            let Ok(Begin::Reserved(reservation)) = store.begin("t", "k", &fingerprint) else {
                panic!("key should be free after release");
            };
            store.release(reservation).expect("memory release cannot fail");
        }
        let state = store.lock();
        assert!(state.records.is_empty());
        assert!(state.expiries.len() <= 1024 + 1, "heap grew to {}", state.expiries.len());
    }

    #[tokio::test(start_paused = true)]
    async fn completed_record_expires_at_retention_not_at_lease() {
        let store = MemoryStore::new(settings(10));
        let fingerprint = Fingerprint::of(&[b"f"]);
        let Ok(Begin::Reserved(reservation)) = store.begin("t", "k", &fingerprint) else {
            panic!("first begin should reserve");
        };
        store.complete(reservation, b"ok").expect("memory complete cannot fail");
        // Past the lease deadline: the stale lease heap entry must not evict the completed record.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(store.begin("t", "k", &fingerprint), Ok(Begin::Completed(r)) if r == b"ok"));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(store.is_empty());
    }
}
