//! The router's presence: it tells meta it is alive every [`HEARTBEAT_INTERVAL`]
//! (`RouterHeartbeat`, with this process's random router id and its address).
//!
//! Meta's leader counts the routers heard from within its window (5 s) and publishes the count in
//! the watch stream (`ClusterView::live_routers`). Without a shared rate-limit store, every router
//! admits an even share of each tenant's limit — the limit divided by that count — so a tenant's
//! limit holds cluster-wide ([`crate::rate_shares`]). A router that cannot reach meta keeps trying
//! every interval; it is dropped from the count after the window and counted again at its next
//! heartbeat. Each heartbeat is bounded by [`HEARTBEAT_TIMEOUT`], so a hung call never delays the
//! next one by more than that.

use std::time::Duration;

use pairdb_proto::cluster::v1 as pb;
use pairdb_service::clients::{ChannelSettings, InternalClients};
use pairdb_service::shutdown::Shutdown;

/// How often the router heartbeats (meta counts a router live for 5 s after its last heartbeat).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Bound on one heartbeat call, connection included.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(2_000);

/// A fresh router id: random per process, so a restarted router counts as a new one (the old one ages
/// out of meta's count).
pub fn new_router_id() -> String {
    format!("r-{:016x}", rand::random::<u64>())
}

/// Heartbeats to meta at `meta_addr` (`host:port`) as `router_id` serving on `address`, every
/// [`HEARTBEAT_INTERVAL`] (the first at once), until `stop` fires. Failures are retried every
/// interval, warned about once per outage.
pub async fn run(
    meta_addr: String,
    clients: InternalClients,
    router_id: String,
    address: String,
    mut stop: Shutdown,
) {
    let settings = ChannelSettings {
        connect_timeout: HEARTBEAT_TIMEOUT,
        request_timeout: Some(HEARTBEAT_TIMEOUT),
        keepalive: None,
    };
    let client = match clients.cluster(&meta_addr, settings) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, %meta_addr, "invalid meta address; this router will not be counted as live");
            return;
        }
    };
    tracing::debug!(%router_id, %address, "router heartbeats start");
    let mut failing = false;
    loop {
        let request = pb::RouterHeartbeatRequest { router_id: router_id.clone(), address: address.clone() };
        let mut call = client.clone();
        let sent = tokio::select! {
            sent = tokio::time::timeout(HEARTBEAT_TIMEOUT, call.router_heartbeat(request)) => sent,
            _ = stop.wait() => return,
        };
        match sent {
            Ok(Ok(_)) => {
                if failing {
                    tracing::info!("router heartbeats reach the metadata service again");
                }
                failing = false;
            }
            // Warn once per outage, not once per interval.
            Ok(Err(status)) if !failing => {
                failing = true;
                if status.code() == tonic::Code::Unimplemented {
                    tracing::warn!(
                        %status,
                        "the metadata service does not count routers (older release): tenants' rate limits are not divided among routers; retrying every second"
                    );
                } else {
                    tracing::warn!(%status, "router heartbeat failed; retrying every second");
                }
            }
            Ok(Err(status)) => tracing::debug!(%status, "router heartbeat failed"),
            Err(_) if !failing => {
                failing = true;
                tracing::warn!(
                    timeout_ms = HEARTBEAT_TIMEOUT.as_millis() as u64,
                    "router heartbeat timed out; retrying every second"
                );
            }
            Err(_) => tracing::debug!("router heartbeat timed out"),
        }
        if stop.sleep(HEARTBEAT_INTERVAL).await {
            return;
        }
    }
}
