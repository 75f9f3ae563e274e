//! Cluster-wide tenant rate limits. Every router keeps a token bucket per tenant ([`Admission`]),
//! holding the router's *share* of the tenant's limit; the shares of all routers add up to one, so
//! the limit holds for the cluster however a load balancer spreads the requests.
//!
//! Every [`EXCHANGE_INTERVAL`] this task reads the demand each bucket saw (tokens asked for,
//! admitted or not, plus charged listing work) and sets new shares:
//! - with Redis (`--redis-url`): each router publishes its smoothed demand per tenant in one hash per
//!   tenant (`HSET` + `PEXPIRE` + `HGETALL` in one pipelined round trip per exchange, never per
//!   request) and takes the part of the limit its demand is of everyone's
//!   ([`pairdb_core::rate_limit::router_share`]);
//! - without Redis (or while it is unreachable): an even split over the live routers meta's view
//!   names.
//!
//! Bound (docs/api.md, "Limits"): admitted operations stay within the limit times
//! `1 + MIN_SHARE_OF_EVEN_SPLIT` plus one burst, except for one exchange interval after the demand
//! moves between routers, when a router may still spend the share it had.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pairdb_core::rate_limit::{MIN_SHARE_OF_EVEN_SPLIT, router_share};
use pairdb_service::shutdown::Shutdown;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::admission::Admission;
use crate::view::SharedView;

/// How often shares are recomputed (and, with Redis, demands exchanged).
pub const EXCHANGE_INTERVAL: Duration = Duration::from_millis(250);

/// A published demand older than this is ignored (its router stopped publishing).
const DEMAND_FRESH_MS: u64 = 2_000;

/// How long a tenant's demand hash outlives its last publication.
const DEMAND_TTL_MS: u64 = 5_000;

/// How long one exchange may wait for Redis.
const REDIS_TIMEOUT: Duration = Duration::from_millis(200);

/// Where the other routers' demands come from.
#[derive(Clone)]
pub enum ShareSource {
    /// Demands exchanged through Redis.
    Redis(ConnectionManager),
    /// No exchange: an even split over the live routers.
    Even,
}

impl std::fmt::Debug for ShareSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShareSource::Redis(_) => "Redis",
            ShareSource::Even => "Even",
        })
    }
}

impl ShareSource {
    /// A lazily connecting Redis source (a router starts while Redis is down).
    pub fn redis(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())?;
        Ok(ShareSource::Redis(manager))
    }
}

/// Recomputes the shares of `admission`'s buckets every [`EXCHANGE_INTERVAL`] until `stop`.
pub async fn run(admission: Arc<Admission>, source: ShareSource, view: SharedView, mut stop: Shutdown) {
    let router_id = format!("{:016x}", rand::random::<u64>());
    let mut smoothed: HashMap<String, f64> = HashMap::new();
    let mut redis_failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXCHANGE_INTERVAL) => {}
            _ = stop.wait() => return,
        }
        let routers = live_routers(&view);
        let seconds = EXCHANGE_INTERVAL.as_secs_f64();
        for (tenant, demand) in admission.take_demands() {
            let rate = demand / seconds;
            let previous = smoothed.get(&tenant).copied().unwrap_or(rate);
            smoothed.insert(tenant, 0.5 * previous + 0.5 * rate);
        }
        smoothed.retain(|_, rate| *rate > 0.01);
        let shares = match &source {
            ShareSource::Even => HashMap::new(),
            ShareSource::Redis(connection) => {
                match exchange(connection.clone(), &router_id, &smoothed, routers).await {
                    Ok(shares) => {
                        if redis_failing {
                            tracing::info!("rate-limit demands reach Redis again");
                        }
                        redis_failing = false;
                        shares
                    }
                    Err(error) => {
                        if !redis_failing {
                            tracing::warn!(%error, "cannot exchange rate-limit demands through Redis; splitting limits evenly over the live routers meanwhile");
                        }
                        redis_failing = true;
                        HashMap::new()
                    }
                }
            }
        };
        // With the exchange working, a tenant this router saw no demand for gets only the floor
        // (the routers that do see demand hold the rest); otherwise an even split.
        let absent = match (&source, redis_failing) {
            (ShareSource::Redis(_), false) => MIN_SHARE_OF_EVEN_SPLIT / routers as f64,
            _ => 1.0 / routers as f64,
        };
        admission.set_shares(&shares, absent);
    }
}

/// The live routers meta's view names (at least this one).
fn live_routers(view: &SharedView) -> usize {
    (view.load().live_routers as usize).max(1)
}

/// Publishes this router's demands and reads everyone's: each tenant's share for this router.
async fn exchange(
    mut connection: ConnectionManager,
    router_id: &str,
    demands: &HashMap<String, f64>,
    routers: usize,
) -> Result<HashMap<String, f64>, String> {
    if demands.is_empty() {
        return Ok(HashMap::new());
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut pipe = redis::pipe();
    let tenants: Vec<(&String, f64)> = demands.iter().map(|(t, d)| (t, *d)).collect();
    for (tenant, demand) in &tenants {
        let key = demand_key(tenant);
        pipe.hset(&key, router_id, format!("{demand}:{now_ms}")).ignore();
        pipe.pexpire(&key, DEMAND_TTL_MS as i64).ignore();
        pipe.hgetall(&key);
    }
    let published: Vec<HashMap<String, String>> =
        tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut connection))
            .await
            .map_err(|_| format!("timed out after {} ms", REDIS_TIMEOUT.as_millis()))?
            .map_err(|e| e.to_string())?;
    let mut shares = HashMap::with_capacity(tenants.len());
    let mut stale = redis::pipe();
    let mut any_stale = false;
    for ((tenant, mine), entries) in tenants.into_iter().zip(published) {
        let fresh: Vec<f64> = entries.values().filter_map(|entry| fresh_demand(entry, now_ms)).collect();
        shares.insert(tenant.clone(), router_share(mine, &fresh, routers));
        // Routers that stopped publishing (restarted ones get new ids): their fields go, so a hash
        // holds only the routers of the last few seconds.
        for (field, entry) in &entries {
            if fresh_demand(entry, now_ms).is_none() {
                stale.hdel(demand_key(tenant), field).ignore();
                any_stale = true;
            }
        }
    }
    if any_stale {
        let removed: Result<Result<(), _>, _> =
            tokio::time::timeout(REDIS_TIMEOUT, stale.query_async::<()>(&mut connection)).await;
        if let Ok(Err(error)) = removed {
            tracing::debug!(%error, "could not remove stale rate-limit demands");
        }
    }
    Ok(shares)
}

/// A published `demand:at_ms` entry's demand, if it is recent.
fn fresh_demand(entry: &str, now_ms: u64) -> Option<f64> {
    let (demand, at_ms) = entry.split_once(':')?;
    let at_ms: u64 = at_ms.parse().ok()?;
    (now_ms.saturating_sub(at_ms) <= DEMAND_FRESH_MS).then(|| demand.parse().ok()).flatten()
}

/// The Redis hash of one tenant's demands (tenant length-prefixed, as idempotency keys are).
fn demand_key(tenant: &str) -> String {
    format!("pairdb:rate:{}:{tenant}", tenant.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recent_well_formed_demands_count() {
        assert_eq!(fresh_demand("12.5:1000", 2000), Some(12.5));
        assert_eq!(fresh_demand("12.5:1000", 1000 + DEMAND_FRESH_MS + 1), None);
        assert_eq!(fresh_demand("garbage", 1000), None);
        assert_eq!(fresh_demand("x:1000", 1000), None);
        assert_ne!(demand_key("ab"), demand_key("a"));
    }
}
