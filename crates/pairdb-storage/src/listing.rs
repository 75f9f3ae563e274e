//! The `ListRecords` edge: a router's request for one node's share of a listing page becomes an
//! engine [`ListQuery`] (every bound checked and capped here), and the engine's answer a reply.
//!
//! Listings are a work class of their own: at most [`CONCURRENT_LISTINGS`] run at once on a node,
//! each bounded in records, bytes, entries examined and time, so a large scan shares the node with
//! point reads and writes instead of queueing them.

use std::time::{Duration, Instant};

use pairdb_core::token::{PartitionCount, Token};
use pairdb_core::validation::validate_key;
use pairdb_proto::storage::v1 as pb;
use pairdb_service::errors::{HasReason, Reason, status};
use tonic::Status;

use crate::engine::{ListQuery, ListedRecords, MAX_LIST_BYTES, MAX_LIST_LIMIT};

/// Listing calls a node runs at once (on the blocking pool; further calls wait their turn).
pub const CONCURRENT_LISTINGS: usize = 2;

/// Most index entries one call examines (a listing of sparse matches answers in several calls).
pub const MAX_EXAMINED: usize = 20_000;

/// Longest one call examines entries before answering what it found.
pub const MAX_LIST_BUDGET_MS: u32 = 2_000;

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
