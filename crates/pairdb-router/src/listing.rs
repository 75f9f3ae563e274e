//! Listing pages (ListKeys, Scan): the tenant's keys in order, read from the storage nodes' key
//! indexes through a coverage plan (`pairdb_core::listing`): one replica per partition at ONE (the
//! listing default), R replicas merged per key at a quorum. A key group (`group`) is one partition,
//! so its page asks only that partition's replicas.
//!
//! Listings are a work class of their own: at most [`CONCURRENT_PAGES`] pages run at once on a router
//! (more wait, within their deadline), and storage nodes run them apart from point requests. A page
//! that runs out of time answers what it has, with a page token, rather than failing after the work.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use pairdb_core::dvv::{Sibling, VersionSet};
use pairdb_core::listing::{Coverage, NodeAnswer, PageToken, cut_page, merge_answers};
use pairdb_core::quorum::{Consistency, Requirement, required_replicas};
use pairdb_core::reason::Reason;
use pairdb_core::ring::NodeId;
use pairdb_core::tenant::KeyGroups;
use pairdb_core::token::{PartitionId, hash_tag, token_for};
use pairdb_core::validation::{MAX_KEY_BYTES, validate_key};

use crate::error::RouterError;
use crate::kv::KvRouter;
use crate::request::RequestOptions;
use crate::storage::{CallError, ListCall};
use crate::view::{ClusterView, TenantSettings};

/// Listing pages a router runs at once.
pub const CONCURRENT_PAGES: usize = 16;

/// Most keys per page (and the default).
pub const MAX_PAGE_KEYS: u32 = 1000;

/// Most bytes of values per Scan page (and the default).
pub const MAX_PAGE_BYTES: u32 = 4 << 20;

/// One listing page as asked.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub tenant_id: String,
    pub prefix: String,
    pub start_after: String,
    pub end_before: String,
    /// 0: [`MAX_PAGE_KEYS`].
    pub limit: u32,
    pub page_token: String,
    pub group: String,
    pub reverse: bool,
    pub include_tombstones: bool,
    pub conflicts_only: bool,
    pub options: RequestOptions,
    pub allow_partial: bool,
    /// Scan: bytes of values per page (0: [`MAX_PAGE_BYTES`]); a key listing ignores it.
    pub max_bytes: u32,
}

/// One key of a page.
#[derive(Debug, Clone)]
pub struct ListedEntry {
    pub key: String,
    pub set: VersionSet,
    /// Live values to show (LWW tenants: the winner only); empty for a deleted key.
    pub siblings: Vec<Sibling>,
    /// The sealed context of `set`.
    pub context: Vec<u8>,
}

impl ListedEntry {
    pub fn value_bytes(&self) -> u64 {
        self.siblings.iter().map(|s| s.value.as_ref().map_or(0, Vec::len) as u64).sum()
    }

    pub fn is_tombstone(&self) -> bool {
        self.siblings.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub entries: Vec<ListedEntry>,
    /// Empty on the last page.
    pub next_page_token: String,
    /// Partitions no replica answered for (`allow_partial` only).
    pub unavailable_partitions: Vec<u32>,
    /// Index entries the storage nodes examined (what the page is charged by).
    pub examined: u64,
}

/// The range of a page after its token: bounds in key order.
#[derive(Debug, Clone)]
struct Range {
    start_after: Option<String>,
    end_before: Option<String>,
}

impl KvRouter {
    /// One listing page of `tenant_id` (`with_values`: a Scan page, bounded in bytes too).
    pub async fn list(
        &self,
        tenant_id: &str,
        request: ListRequest,
        with_values: bool,
    ) -> Result<ListPage, RouterError> {
        let deadline_ms = self.deadline_ms(&request.options);
        let wait = Duration::from_millis(deadline_ms.saturating_sub(self.clock.now_ms()));
        let _permit = tokio::time::timeout(wait, self.listing.acquire())
            .await
            .map_err(|_| {
                RouterError::invalid(Reason::Overloaded, "too many listings are running; retry later")
            })?
            .map_err(|_| RouterError::NotReady)?;
        let view = self.view.load();
        let tenant = Self::tenant(&view, tenant_id)?;
        let limit = checked_limit(request.limit)?;
        let max_bytes =
            if with_values { checked_bytes(request.max_bytes)? } else { u64::from(MAX_PAGE_BYTES) };
        let range = page_range(&request)?;
        let group_token = group_token(&tenant, &request.group)?;
        let needed = listing_replicas(&request.options, &tenant)?;
        let candidates = self.candidates(&view, &tenant, group_token)?;
        let mut coverage = Coverage::new(candidates, needed, self.suspects(&view));
        let call = ListCall {
            tenant_id: tenant.tenant_id.clone(),
            tenant_generation: tenant.generation,
            partitions: Vec::new(),
            prefix: request.prefix.clone(),
            start_after: range.start_after.clone(),
            end_before: range.end_before.clone(),
            group_token,
            reverse: request.reverse,
            limit,
            max_bytes,
            skip_tombstones: needed == 1 && !request.include_tombstones,
        };
        let (answers, examined) = self.gather(&view, &mut coverage, call, deadline_ms).await?;
        let unavailable: Vec<u32> = coverage.unavailable().iter().map(|p| p.0).collect();
        if !unavailable.is_empty() && !request.allow_partial {
            return Err(partitions_unavailable(&unavailable));
        }
        let merged = merge_answers(answers, request.reverse);
        let sealing = Self::sealing_key(&view)?;
        // Expired values are hidden as a Get hides them (the router's clock).
        let now = crate::storage::wall_clock_ms();
        let kept: Vec<(String, ListedEntry)> = merged
            .records
            .into_iter()
            .filter(|(key, _)| request.group.is_empty() || hash_tag(key) == Some(request.group.as_str()))
            .filter_map(|(key, set)| {
                let siblings = KvRouter::visible(&set, tenant.conflict_mode, now);
                let listed = (request.include_tombstones || !siblings.is_empty())
                    && (!request.conflicts_only || siblings.len() > 1);
                // Sealed once the page is cut: only the keys it returns get a context.
                let context = Vec::new();
                listed.then(|| (key.clone(), ListedEntry { key, set, siblings, context }))
            })
            .collect();
        // A Scan page also ends once its values reach `max_bytes` (the key that crosses it included).
        let page_keys = match with_values {
            true => keys_within_bytes(&kept, max_bytes).min(limit as usize),
            false => limit as usize,
        };
        let (kept, token) = cut_page(kept, page_keys, merged.complete_through);
        let entries = kept
            .into_iter()
            .map(|(_, mut entry)| {
                entry.context = Self::seal(sealing, &tenant.tenant_id, &entry.key, entry.set.vector());
                entry
            })
            .collect();
        Ok(ListPage {
            entries,
            next_page_token: token.map(|t| t.encode()).unwrap_or_default(),
            unavailable_partitions: unavailable,
            examined,
        })
    }

    /// Each partition to list (all, or the group's one) with its replicas in preference order.
    fn candidates(
        &self,
        view: &ClusterView,
        tenant: &TenantSettings,
        group: Option<pairdb_core::token::Token>,
    ) -> Result<Vec<(PartitionId, Vec<NodeId>)>, RouterError> {
        let current = view.current.as_ref().ok_or(RouterError::NotReady)?;
        let n = tenant.serving_replication_factor();
        let partitions: Vec<PartitionId> = match group {
            Some(token) => vec![current.partition_count().partition_of(token)],
            None => (0..current.partition_count().get()).map(PartitionId).collect(),
        };
        Ok(partitions.into_iter().map(|p| (p, current.preference_list(p, n).to_vec())).collect())
    }

    /// Sends rounds of calls until every partition has its answers or no replica is left to ask.
    async fn gather(
        &self,
        view: &Arc<ClusterView>,
        coverage: &mut Coverage,
        call: ListCall,
        deadline_ms: u64,
    ) -> Result<(Vec<NodeAnswer>, u64), RouterError> {
        let calls = self.calls(view);
        let mut answers = Vec::new();
        let mut examined = 0;
        loop {
            let round = coverage.next_round();
            let left_ms = deadline_ms.saturating_sub(self.clock.now_ms());
            if round.is_empty() || left_ms == 0 {
                return Ok((answers, examined));
            }
            // A round waits at most a few storage timeouts, so a hung replica leaves time for the
            // next round to ask another.
            let round_wait = (self.pool.storage_timeout() * 4).max(Duration::from_secs(1));
            let wait = Duration::from_millis(left_ms).min(round_wait);
            let sent = round.into_iter().map(|(node, partitions)| {
                let call = ListCall { partitions: partitions.clone(), ..call.clone() };
                let calls = calls.clone();
                async move { (partitions, calls.list_records(node, call, wait).await) }
            });
            for (partitions, result) in join_all(sent).await {
                match result {
                    Ok((answer, node_examined)) => {
                        coverage.answered(&partitions);
                        examined += node_examined;
                        answers.push(answer);
                    }
                    Err(CallError::Refused(refusal)) => return Err(RouterError::Refused(refusal)),
                    Err(CallError::Failed(_)) => {}
                }
            }
        }
    }
}

/// How many of `entries` a Scan page holds: up to and including the one whose values reach
/// `max_bytes` (at least one).
fn keys_within_bytes(entries: &[(String, ListedEntry)], max_bytes: u64) -> usize {
    let mut total = 0u64;
    for (position, (_, entry)) in entries.iter().enumerate() {
        total = total.saturating_add(entry.value_bytes());
        if total >= max_bytes {
            return position + 1;
        }
    }
    entries.len()
}

fn invalid(message: impl Into<String>) -> RouterError {
    RouterError::invalid(Reason::InvalidListing, message)
}

fn checked_limit(limit: u32) -> Result<u32, RouterError> {
    match limit {
        0 => Ok(MAX_PAGE_KEYS),
        n if n <= MAX_PAGE_KEYS => Ok(n),
        n => Err(invalid(format!("limit {n} is above the maximum of {MAX_PAGE_KEYS} keys per page"))),
    }
}

fn checked_bytes(max_bytes: u32) -> Result<u64, RouterError> {
    match max_bytes {
        0 => Ok(u64::from(MAX_PAGE_BYTES)),
        n if n <= MAX_PAGE_BYTES => Ok(u64::from(n)),
        n => Err(invalid(format!("max_bytes {n} is above the maximum of {MAX_PAGE_BYTES} per page"))),
    }
}

/// The page's bounds: the request's, narrowed by its page token.
fn page_range(request: &ListRequest) -> Result<Range, RouterError> {
    let bound = |text: &str, name: &str| -> Result<Option<String>, RouterError> {
        if text.is_empty() {
            return Ok(None);
        }
        validate_key(text.as_bytes()).map_err(|e| invalid(format!("{name}: {e}")))?;
        Ok(Some(text.to_owned()))
    };
    if request.prefix.len() > MAX_KEY_BYTES {
        return Err(invalid(format!("prefix is longer than the {MAX_KEY_BYTES} bytes a key may have")));
    }
    let mut range = Range {
        start_after: bound(&request.start_after, "start_after")?,
        end_before: bound(&request.end_before, "end_before")?,
    };
    if !request.page_token.is_empty() {
        let token = PageToken::decode(&request.page_token)
            .map_err(|e| RouterError::invalid(Reason::InvalidPageToken, e.to_string()))?;
        // The next page starts strictly after the token's key, in the listing's direction.
        let narrowed = Some(token.last_key);
        if request.reverse {
            range.end_before = min_bound(narrowed, range.end_before.take());
        } else {
            range.start_after = narrowed.max(range.start_after.take());
        }
    }
    Ok(range)
}

/// The tighter of two exclusive upper bounds.
fn min_bound(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The placement token of the requested group (`None`: no group asked).
fn group_token(
    tenant: &TenantSettings,
    group: &str,
) -> Result<Option<pairdb_core::token::Token>, RouterError> {
    if group.is_empty() {
        return Ok(None);
    }
    if tenant.key_groups != KeyGroups::HashTag {
        return Err(invalid(format!(
            "tenant {:?} was not created with key groups (key_groups = hash_tag), so it has no groups to list",
            tenant.tenant_id
        )));
    }
    if group.contains(['{', '}']) || group.len() > MAX_KEY_BYTES {
        return Err(invalid("a group is the text inside a key's braces, without braces"));
    }
    Ok(Some(token_for(&tenant.tenant_id, group.as_bytes())))
}

/// Replicas per partition a page needs: ONE unless the request names a level or R.
fn listing_replicas(options: &RequestOptions, tenant: &TenantSettings) -> Result<usize, RouterError> {
    let requirement = match (options.explicit, options.consistency) {
        (0, None) => Requirement::Level(Consistency::One),
        (0, Some(level)) => Requirement::Level(level),
        (explicit, _) => Requirement::Explicit(explicit),
    };
    required_replicas(requirement, tenant.serving_replication_factor())
        .map_err(|e| RouterError::from_reasoned(&e))
}

fn partitions_unavailable(partitions: &[u32]) -> RouterError {
    let shown: Vec<String> = partitions.iter().take(32).map(u32::to_string).collect();
    let more =
        if partitions.len() > 32 { format!(" and {} more", partitions.len() - 32) } else { String::new() };
    RouterError::PartitionsUnavailable {
        partitions: partitions.to_vec(),
        message: format!(
            "no replica answered for partitions {}{more}; retry, or list with allow_partial",
            shown.join(",")
        ),
    }
}
