//! The `ListRecords` edge: a router's request for one node's share of a listing page becomes an
//! engine [`ListQuery`] (every bound checked and capped here), and the engine's answer a reply.
//!
//! Listings are a work class of their own: at most [`CONCURRENT_LISTINGS`] run at once on a node,
//! each bounded in records, bytes, entries examined and time, so a large scan shares the node with
//! point reads and writes instead of queueing them. A listing runs in slices of
//! [`LISTING_SLICE_MS`]; while point requests are being served, the node's [`ListingPacer`] pauses
//! it between slices so that listings take at most their configured share of the node's time
//! (and all of it when nothing else runs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pairdb_core::rate_limit::BusyShare;
use pairdb_core::token::{PartitionCount, Token};
use pairdb_core::validation::validate_key;
use pairdb_proto::storage::v1 as pb;
use pairdb_service::errors::{HasReason, Reason, internal_status as status};
use tonic::Status;

use crate::engine::{Engine, ListQuery, ListedRecords, MAX_LIST_BYTES, MAX_LIST_LIMIT};

/// Listing calls a node runs at once (on the blocking pool; further calls wait their turn).
pub const CONCURRENT_LISTINGS: usize = 2;

/// Most index entries one call examines (a listing of sparse matches answers in several calls).
pub const MAX_EXAMINED: usize = 20_000;

/// Longest one call examines entries before answering what it found.
pub const MAX_LIST_BUDGET_MS: u32 = 2_000;

/// Work a listing does between two looks at the pacer.
pub const LISTING_SLICE_MS: u64 = 2;

/// Point requests begun and finished on this node (counted by the service around each one): a
/// listing slice is contended when one was in flight or began while it ran.
#[derive(Debug, Default)]
pub struct Foreground {
    started: AtomicU64,
    finished: AtomicU64,
}

/// Counts one point request as finished when dropped.
#[derive(Debug)]
pub struct ForegroundRequest<'a>(&'a Foreground);

impl Drop for ForegroundRequest<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

impl Foreground {
    pub fn begin(&self) -> ForegroundRequest<'_> {
        self.started.fetch_add(1, Ordering::Relaxed);
        ForegroundRequest(self)
    }

    /// Where the count stands (to ask [`Foreground::contended_since`] later).
    fn mark(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// A point request began after `mark`, or one is in flight now.
    fn contended_since(&self, mark: u64) -> bool {
        let started = self.started.load(Ordering::Relaxed);
        started != mark || started != self.finished.load(Ordering::Relaxed)
    }
}

/// The node's pacing of listings against point requests (one per node, shared by every listing).
#[derive(Debug)]
pub struct ListingPacer {
    share: Mutex<BusyShare>,
    slice: Duration,
    origin: Instant,
    pub foreground: Foreground,
    busy_us: AtomicU64,
    paused_us: AtomicU64,
}

/// Time listings worked and waited on a node since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacerTotals {
    pub busy_us: u64,
    pub paused_us: u64,
}

impl ListingPacer {
    /// Listings take at most `share_percent` of the node's time while point requests run, looking
    /// at the pacer after each `slice` of work.
    pub fn new(share_percent: u8, slice: Duration) -> Self {
        Self {
            share: Mutex::new(BusyShare::new(f64::from(share_percent) / 100.0)),
            slice,
            origin: Instant::now(),
            foreground: Foreground::default(),
            busy_us: AtomicU64::new(0),
            paused_us: AtomicU64::new(0),
        }
    }

    pub fn totals(&self) -> PacerTotals {
        PacerTotals {
            busy_us: self.busy_us.load(Ordering::Relaxed),
            paused_us: self.paused_us.load(Ordering::Relaxed),
        }
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    fn pace(&self) -> std::sync::MutexGuard<'_, BusyShare> {
        self.share.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until listings may work again (at most until `deadline`).
    async fn wait_turn(&self, contended: bool, deadline: Instant) {
        let wait_us = self.pace().wait_us(contended, self.now_us());
        if wait_us > 0 {
            let started = Instant::now();
            tokio::time::sleep_until((started + Duration::from_micros(wait_us)).min(deadline).into()).await;
            let paused = started.elapsed();
            metrics::histogram!("pairdb_storage_listing_pause_seconds").record(paused.as_secs_f64());
            self.paused_us.fetch_add(paused.as_micros() as u64, Ordering::Relaxed);
        }
    }

    fn charge(&self, busy: Duration, contended: bool) {
        self.busy_us.fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
        self.pace().charge(busy.as_micros() as u64, contended, self.now_us());
    }
}

/// Runs `query` on the blocking pool in slices (of [`LISTING_SLICE_MS`] on a node), each resuming
/// where the last stopped, pausing between them as the pacer says; answers as one engine call would.
pub async fn run(
    engine: Arc<Engine>,
    query: ListQuery,
    pacer: &ListingPacer,
) -> Result<ListedRecords, Status> {
    let mut answer = ListedRecords::default();
    let mut bytes = 0usize;
    let mut next = query.clone();
    let mut mark = pacer.foreground.mark();
    loop {
        pacer.wait_turn(pacer.foreground.contended_since(mark), query.deadline).await;
        mark = pacer.foreground.mark();
        let mut slice = next.clone();
        slice.limit = query.limit - answer.records.len();
        slice.max_bytes = query.max_bytes - bytes;
        slice.max_examined = query.max_examined - answer.examined as usize;
        slice.deadline = query.deadline.min(Instant::now() + pacer.slice);
        let (part, busy) = crate::service::on_engine(engine.clone(), move |engine| {
            let started = Instant::now();
            engine.list_records(&slice).map(|part| (part, started.elapsed()))
        })
        .await?;
        pacer.charge(busy, pacer.foreground.contended_since(mark));
        answer.examined += part.examined;
        bytes += part.records.iter().map(|(_, set)| set.len()).sum::<usize>();
        answer.records.extend(part.records);
        let Some(resume) = part.resume_after.filter(|_| !part.complete) else {
            answer.complete = true;
            answer.resume_after = None;
            return Ok(answer);
        };
        let spent = answer.records.len() >= query.limit
            || bytes >= query.max_bytes
            || answer.examined >= query.max_examined as u64
            || Instant::now() >= query.deadline;
        if spent {
            answer.resume_after = Some(resume);
            return Ok(answer);
        }
        if query.reverse {
            next.end_before = Some(resume);
        } else {
            next.start_after = Some(resume);
        }
    }
}

fn invalid(message: String) -> Status {
    status(Reason::InvalidListing, message, &[])
}

/// The engine query of a `ListRecords` request (the tenant id is checked by the caller).
pub fn query(
    request: pb::ListRecordsRequest,
    partitions: PartitionCount,
    now: Instant,
) -> Result<ListQuery, Status> {
    let count = partitions.get() as usize;
    if request.partitions.is_empty() || request.partitions.len() > count {
        return Err(invalid(format!("a listing names 1 to {count} partitions")));
    }
    let mut covered = vec![false; count];
    for partition in &request.partitions {
        let slot = covered.get_mut(*partition as usize);
        let slot =
            slot.ok_or_else(|| invalid(format!("partition {partition} is outside the ring of {count}")))?;
        *slot = true;
    }
    let bound = |text: String| -> Result<Option<String>, Status> {
        if text.is_empty() {
            return Ok(None);
        }
        validate_key(text.as_bytes()).map_err(|e| status(e.reason(), e.to_string(), &[]))?;
        Ok(Some(text))
    };
    if request.prefix.len() > pairdb_core::validation::MAX_KEY_BYTES {
        return Err(invalid("the prefix is longer than a key may be".into()));
    }
    let budget_ms = match request.budget_ms {
        0 => MAX_LIST_BUDGET_MS,
        ms => ms.min(MAX_LIST_BUDGET_MS),
    };
    Ok(ListQuery {
        tenant: request.tenant_id,
        partitions: covered,
        prefix: request.prefix,
        start_after: bound(request.start_after)?,
        end_before: bound(request.end_before)?,
        group: request.group_token.map(Token),
        reverse: request.reverse,
        limit: capped(request.limit as usize, MAX_LIST_LIMIT),
        max_bytes: capped(usize::try_from(request.max_bytes).unwrap_or(usize::MAX), MAX_LIST_BYTES),
        skip_tombstones: request.skip_tombstones,
        max_examined: capped(request.max_examined as usize, MAX_EXAMINED),
        deadline: now + Duration::from_millis(u64::from(budget_ms)),
    })
}

/// `requested` within 1..=`max` (0 = `max`).
fn capped(requested: usize, max: usize) -> usize {
    if requested == 0 { max } else { requested.min(max) }
}

pub fn response(listed: ListedRecords) -> pb::ListRecordsResponse {
    pb::ListRecordsResponse {
        records: listed
            .records
            .into_iter()
            .map(|(key, version_set)| pb::ListedRecord { key: key.key, token: key.token.0, version_set })
            .collect(),
        complete: listed.complete,
        resume_after: listed.resume_after.unwrap_or_default(),
        examined: listed.examined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::ListRecordsRequest {
        pb::ListRecordsRequest { tenant_id: "t".into(), partitions: vec![0, 5], ..Default::default() }
    }

    #[test]
    fn bounds_are_capped_and_checked() {
        let q = PartitionCount::new(8).unwrap();
        let now = Instant::now();
        let query = query(request(), q, now).unwrap();
        assert_eq!(query.partitions, vec![true, false, false, false, false, true, false, false]);
        assert_eq!(
            (query.limit, query.max_bytes, query.max_examined),
            (MAX_LIST_LIMIT, MAX_LIST_BYTES, MAX_EXAMINED)
        );
        assert_eq!((query.start_after, query.end_before), (None, None));
        let big =
            pb::ListRecordsRequest { limit: 1 << 30, max_bytes: u64::MAX, budget_ms: u32::MAX, ..request() };
        let query = super::query(big, q, now).unwrap();
        assert_eq!((query.limit, query.max_bytes), (MAX_LIST_LIMIT, MAX_LIST_BYTES));
        assert!(query.deadline <= now + Duration::from_millis(u64::from(MAX_LIST_BUDGET_MS)));
        for bad in [
            pb::ListRecordsRequest { partitions: vec![], ..request() },
            pb::ListRecordsRequest { partitions: vec![8], ..request() },
            pb::ListRecordsRequest { partitions: (0..9).collect(), ..request() },
            pb::ListRecordsRequest { start_after: "x".repeat(100_000), ..request() },
        ] {
            assert!(super::query(bad, q, now).is_err());
        }
    }
}
