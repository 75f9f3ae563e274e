//! Routers' presence and the live-router count.
//!
//! Tenants' rate limits hold cluster-wide: without a shared rate-limit store, each router admits
//! `limit / live routers` of a tenant's operations, so routers must know how many routers are live.
//! Every router process calls `RouterHeartbeat` every second with a random id (a restarted router
//! is a new one) and its address. Whichever replica receives a heartbeat upserts the router's row
//! (`routers`: id, address, last seen), outside the metadata lock ([`Meta::router_heartbeat`]).
//!
//! The leader ([`run`]) counts, every [`COUNT_INTERVAL`], the routers seen within the last
//! [`ROUTER_ALIVE_WINDOW_MS`]. When that differs from the count last published it stores the new
//! count (`meta_state.live_routers`) with a `live_routers` change under the metadata lock, fenced like
//! every leader write, so every watch subscriber of every replica gets `live_routers_changed` in
//! revision order, and a new subscriber's snapshot carries the stored count. A new leader (or one back
//! from a database outage, which loses the lock) first gives every router a full window to be heard
//! from: during its first window it publishes increases only, so a restart of meta does not make the
//! routers believe for a moment that they are alone. Rows not seen for [`ROUTER_FORGET_AFTER_MS`] are
//! deleted.
//!
//! The count is a router's best knowledge, not a guarantee: a router that dies is still counted for
//! up to the window plus a count interval (the survivors admit a little less than the limit
//! meanwhile), and one that starts is not counted until its first heartbeat was counted (it admits a
//! little more). Replicas stamp heartbeats with their own clocks, which must agree to well within
//! the window.

use std::time::Duration;

use pairdb_service::shutdown::Shutdown;

use crate::admin::{Meta, now_ms};
use crate::error::MetaError;
use crate::persistence::{ChangeKind, LeaderFence};

/// A router counts as live while its last heartbeat is at most this old. Routers heartbeat every
/// second, so a live router misses the count only after about five heartbeats in a row failed; a
/// router that stopped drops out of the count within this window plus one [`COUNT_INTERVAL`].
pub const ROUTER_ALIVE_WINDOW_MS: u64 = 5_000;

/// How often the leader counts the live routers.
pub const COUNT_INTERVAL: Duration = Duration::from_secs(1);

/// A router's row is deleted once it has not been seen for this long (an hour).
pub const ROUTER_FORGET_AFTER_MS: u64 = 3_600_000;

/// How often the leader deletes forgotten routers' rows.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Longest router id accepted, in bytes.
pub const MAX_ROUTER_ID_BYTES: usize = 64;

/// Longest router address accepted, in bytes.
pub const MAX_ROUTER_ADDRESS_BYTES: usize = 256;

/// Checks a heartbeat's fields: the id non-empty, at most [`MAX_ROUTER_ID_BYTES`], printable ASCII
/// without spaces; the address at most [`MAX_ROUTER_ADDRESS_BYTES`] without control characters
/// (it may be empty).
pub fn validate_heartbeat(router_id: &str, address: &str) -> Result<(), MetaError> {
    if router_id.is_empty()
        || router_id.len() > MAX_ROUTER_ID_BYTES
        || !router_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(MetaError::InvalidArgument(format!(
            "router_id must be 1 to {MAX_ROUTER_ID_BYTES} printable ASCII characters without spaces"
        )));
    }
    if address.len() > MAX_ROUTER_ADDRESS_BYTES || address.chars().any(char::is_control) {
        return Err(MetaError::InvalidArgument(format!(
            "address must be at most {MAX_ROUTER_ADDRESS_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// What one count found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// The count published now.
    pub live_routers: u32,
    /// The count published before, when this pass changed it.
    pub changed_from: Option<u32>,
}

impl Meta {
    /// Records that a router is alive (`RouterHeartbeat`): one upsert, outside the metadata lock.
    pub async fn router_heartbeat(&self, router_id: &str, address: &str) -> Result<(), MetaError> {
        validate_heartbeat(router_id, address)?;
        if !self.is_initialized() {
            return Err(MetaError::DatabaseUnavailable(
                "the metadata database is not initialized yet".to_owned(),
            ));
        }
        self.store().record_router(router_id, address, now_ms()).await?;
        Ok(())
    }

    /// Leader: counts the routers seen within [`ROUTER_ALIVE_WINDOW_MS`] of `now_ms` and publishes
    /// the count if it changed. Until `now_ms` is a window past `leader_since_ms`, the count only
    /// grows (see the module documentation).
    pub async fn count_live_routers(
        &self,
        fence: LeaderFence,
        leader_since_ms: u64,
        now_ms: u64,
    ) -> Result<Count, MetaError> {
        let since = now_ms.saturating_sub(ROUTER_ALIVE_WINDOW_MS);
        let settling = now_ms < leader_since_ms.saturating_add(ROUTER_ALIVE_WINDOW_MS);
        let count = |seen: u32, published: u32| if settling { seen.max(published) } else { seen };
        let (seen, published) = {
            let mut tx = self.read().await?;
            let seen = tx.count_routers_seen_since(since).await?;
            let published = tx.meta_state().await?.live_routers;
            tx.commit().await?;
            (seen, published)
        };
        if count(seen, published) == published {
            return Ok(Count { live_routers: published, changed_from: None });
        }
        let (mut tx, _) = self.write().await?;
        tx.check_leader(fence).await?;
        // Again under the lock: a previous leader may have published since the reading.
        let published = tx.meta_state().await?.live_routers;
        let counted = count(seen, published);
        if counted == published {
            return Ok(Count { live_routers: published, changed_from: None });
        }
        tx.set_live_routers(counted).await?;
        tx.record_change(ChangeKind::LiveRouters, &counted.to_string()).await?;
        tx.commit().await?;
        Ok(Count { live_routers: counted, changed_from: Some(published) })
    }
}

/// Leader: counts the live routers every [`COUNT_INTERVAL`] and deletes forgotten routers' rows
/// every minute, until `stop`.
pub async fn run(meta: Meta, fence: LeaderFence, mut stop: Shutdown) {
    let leader_since = now_ms();
    let mut next_prune = tokio::time::Instant::now();
    loop {
        match meta.count_live_routers(fence, leader_since, now_ms()).await {
            Ok(count) => {
                metrics::gauge!("pairdb_meta_live_routers").set(f64::from(count.live_routers));
                if let Some(from) = count.changed_from {
                    tracing::info!(from, to = count.live_routers, "live routers changed");
                }
            }
            Err(error) => tracing::debug!(%error, "live-router count failed"),
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune += PRUNE_INTERVAL;
            match meta.store().prune_routers(now_ms().saturating_sub(ROUTER_FORGET_AFTER_MS)).await {
                Ok(0) => {}
                Ok(rows) => tracing::debug!(rows, "forgot routers not seen for an hour"),
                Err(error) => tracing::debug!(%error, "router pruning failed"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(COUNT_INTERVAL) => {}
            _ = stop.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_fields_are_checked() {
        assert!(validate_heartbeat("r-0123456789abcdef", "10.0.0.1:7000").is_ok());
        assert!(validate_heartbeat(&"x".repeat(MAX_ROUTER_ID_BYTES), "").is_ok(), "an address is optional");
        assert!(validate_heartbeat("r", &"a".repeat(MAX_ROUTER_ADDRESS_BYTES)).is_ok());
        for bad_id in ["", "has space", "tab\there", "nul\0", "é", &"x".repeat(MAX_ROUTER_ID_BYTES + 1)] {
            let error = validate_heartbeat(bad_id, "").unwrap_err();
            assert!(matches!(error, MetaError::InvalidArgument(_)), "{bad_id:?}: {error:?}");
        }
        for bad_address in ["line\nbreak", &"a".repeat(MAX_ROUTER_ADDRESS_BYTES + 1)] {
            assert!(validate_heartbeat("r", bad_address).is_err(), "{bad_address:?}");
        }
    }
}
