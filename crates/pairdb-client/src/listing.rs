//! Listing a tenant's keys: one page at a time ([`KvClient::list_keys`], [`KvClient::scan`]) or
//! every page in turn ([`KeyPages`]). A listing is not a snapshot: keys written or deleted while it
//! runs may or may not appear; each key appears at most once, in order.

use std::time::Duration;

use pairdb_proto::kv::v1 as pb;

use crate::kv::{Consistency, Sibling, sibling, timeout_ms, vector, with_deadline};
use crate::retry::with_retries;
use crate::{ClientError, KvClient};

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Only keys starting with this text.
    pub prefix: String,
    /// Exclusive bounds in key order.
    pub start_after: Option<String>,
    pub end_before: Option<String>,
    /// Keys per page (at most 1,000, the default).
    pub limit: Option<u32>,
    /// One key group (`{group}` in a key-group tenant's keys).
    pub group: Option<String>,
    pub reverse: bool,
    pub include_tombstones: bool,
    pub conflicts_only: bool,
    /// ONE by default for listings.
    pub consistency: Consistency,
    pub r: Option<u32>,
    /// Answer without partitions no replica answered for instead of failing.
    pub allow_partial: bool,
    /// Scan pages: bytes of values per page (at most 4 MiB, the default).
    pub max_bytes: Option<u32>,
    pub timeout: Option<Duration>,
}

/// One key of a ListKeys page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedKey {
    pub key: String,
    pub sibling_count: u32,
    pub value_bytes: u64,
    pub tombstone: bool,
    pub context: Vec<u8>,
}

/// One key of a Scan page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedKey {
    pub key: String,
    pub siblings: Vec<Sibling>,
    pub context: Vec<u8>,
    pub version_vector: Vec<(u64, u64)>,
    pub tombstone: bool,
}

/// One page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage<T> {
    pub keys: Vec<T>,
    /// `None` on the last page.
    pub next_page_token: Option<String>,
    /// Partitions left out because no replica answered (`allow_partial` only).
    pub unavailable_partitions: Vec<u32>,
}

impl ListOptions {
    fn to_proto(&self, page_token: Option<&str>, timeout: Duration) -> pb::ListOptions {
        pb::ListOptions {
            prefix: self.prefix.clone(),
            start_after: self.start_after.clone().unwrap_or_default(),
            end_before: self.end_before.clone().unwrap_or_default(),
            limit: self.limit.unwrap_or(0),
            page_token: page_token.unwrap_or_default().to_owned(),
            group: self.group.clone().unwrap_or_default(),
            reverse: self.reverse,
            include_tombstones: self.include_tombstones,
            conflicts_only: self.conflicts_only,
            read: Some(pb::ReadOptions {
                consistency: self.consistency.to_proto(),
                r: self.r.unwrap_or(0),
                timeout_ms: timeout_ms(timeout),
            }),
            allow_partial: self.allow_partial,
        }
    }
}

impl KvClient {
    /// One page of keys with their metadata (`page_token`: the previous page's, `None` first).
    pub async fn list_keys(
        &self,
        options: &ListOptions,
        page_token: Option<&str>,
    ) -> Result<KeyPage<ListedKey>, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let request = pb::ListKeysRequest {
            tenant_id: self.tenant_id.clone(),
            list: Some(options.to_proto(page_token, timeout)),
        };
        let response = with_retries(self.retry, true, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.list_keys(request).await?.into_inner()) }
        })
        .await?;
        Ok(KeyPage {
            keys: response
                .keys
                .into_iter()
                .map(|k| ListedKey {
                    key: k.key,
                    sibling_count: k.sibling_count,
                    value_bytes: k.value_bytes,
                    tombstone: k.tombstone,
                    context: k.context,
                })
                .collect(),
            next_page_token: Some(response.next_page_token).filter(|t| !t.is_empty()),
            unavailable_partitions: response.unavailable_partitions,
        })
    }

    /// One page of keys with their values and contexts.
    pub async fn scan(
        &self,
        options: &ListOptions,
        page_token: Option<&str>,
    ) -> Result<KeyPage<ScannedKey>, ClientError> {
        let timeout = options.timeout.unwrap_or(self.request_timeout);
        let request = pb::ScanRequest {
            tenant_id: self.tenant_id.clone(),
            list: Some(options.to_proto(page_token, timeout)),
            max_bytes: options.max_bytes.unwrap_or(0),
        };
        let response = with_retries(self.retry, true, || {
            let mut client = self.inner.clone();
            let request = with_deadline(request.clone(), timeout);
            async move { Ok(client.scan(request).await?.into_inner()) }
        })
        .await?;
        Ok(KeyPage {
            keys: response
                .keys
                .into_iter()
                .map(|k| ScannedKey {
                    key: k.key,
                    siblings: k.siblings.into_iter().map(sibling).collect(),
                    context: k.context,
                    version_vector: vector(k.version_vector),
                    tombstone: k.tombstone,
                })
                .collect(),
            next_page_token: Some(response.next_page_token).filter(|t| !t.is_empty()),
            unavailable_partitions: response.unavailable_partitions,
        })
    }

    /// Every page of a listing in turn (`with_values`: Scan pages).
    pub fn pages(&self, options: ListOptions) -> KeyPages {
        KeyPages { client: self.clone(), options, next: Some(None) }
    }
}

/// The pages of one listing, fetched as they are asked for.
#[derive(Debug)]
pub struct KeyPages {
    client: KvClient,
    options: ListOptions,
    /// `None`: the listing is finished; `Some(token)`: the next page's token (`None` first).
    next: Option<Option<String>>,
}

impl KeyPages {
    /// The next page of keys, `None` after the last.
    pub async fn next_keys(&mut self) -> Option<Result<KeyPage<ListedKey>, ClientError>> {
        let token = self.next.clone()?;
        let page = self.client.list_keys(&self.options, token.as_deref()).await;
        self.advance(page.as_ref().map(|p| p.next_page_token.clone()));
        Some(page)
    }

    /// The next page of keys with values, `None` after the last.
    pub async fn next_scan(&mut self) -> Option<Result<KeyPage<ScannedKey>, ClientError>> {
        let token = self.next.clone()?;
        let page = self.client.scan(&self.options, token.as_deref()).await;
        self.advance(page.as_ref().map(|p| p.next_page_token.clone()));
        Some(page)
    }

    fn advance(&mut self, next: Result<Option<String>, &ClientError>) {
        self.next = match next {
            // The last page, or a failure (retried already): nothing more to fetch.
            Ok(None) | Err(_) => None,
            Ok(Some(token)) => Some(Some(token)),
        };
    }
}
