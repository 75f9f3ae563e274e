//! The Redis idempotency store, shared by every router and surviving their restarts.
//!
//! One Redis string per record under `pairdb:idem:{tenant length}:{tenant}:{idempotency key}` (the length
//! prefix keeps distinct (tenant, key) pairs from mapping to one Redis key), holding the encoded
//! [`Record`] with a Redis TTL: the lease while in flight, the retention once completed.
//!
//! - `begin`: `SET key in-flight-record NX PX lease`; if the key exists, `GET` it and answer from the
//!   record. A record that vanished between the two (released or expired) is retried a bounded number of
//!   times.
//! - `complete` / `release`: Lua scripts that act only while the record still starts with this
//!   reservation's owner prefix (version, in-flight state, token), so an expired reservation cannot touch
//!   a newer owner's record.
//!
//! Connections: a [`ConnectionManager`] created lazily (a router starts while Redis is down) that
//! reconnects when the connection drops. Every store call runs under one deadline of
//! `operation_timeout`; on a timeout the manager is replaced by a fresh one, because a connection that
//! stopped answering without closing (a half-open TCP connection) is not reconnected by the manager.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, RedisResult, Script, Value};
use tokio::time::Instant;

use super::{
    Begin, Fingerprint, IdempotencyError, IdempotencySettings, Record, Reservation, answer_existing,
};

/// How often `begin` retries when the record it collided with disappears before it could be read.
const BEGIN_ATTEMPTS: usize = 3;

/// Replaces the record with ARGV[2] (TTL ARGV[3] ms) if it is the in-flight record of the reservation
/// whose owner prefix is ARGV[1].
const COMPLETE_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Deletes the record if it is the in-flight record of the reservation whose owner prefix is ARGV[1].
const RELEASE_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Redis-backed [`super::IdempotencyStore`] backend. Clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The current manager and its generation; a timed-out call replaces the manager only if no other
    /// call has replaced it since (so a burst of timeouts replaces it once).
    connection: Mutex<(u64, ConnectionManager)>,
    settings: IdempotencySettings,
    complete: Script,
    release: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's connection info may carry a password: leave it out.
        f.debug_struct("RedisStore").field("settings", &self.inner.settings).finish_non_exhaustive()
    }
}

/// The Redis URL did not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid redis url: {0}")]
pub struct InvalidRedisUrl(String);

impl RedisStore {
    /// Creates the store without connecting (the first call connects), so a router starts while Redis
    /// is down. Fails only for a malformed URL. Must be called inside a tokio runtime.
    pub fn new(url: &str, settings: IdempotencySettings) -> Result<RedisStore, InvalidRedisUrl> {
        let client = redis::Client::open(url).map_err(|e| InvalidRedisUrl(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.operation_timeout))
            .set_response_timeout(Some(settings.operation_timeout))
            // Retries inside one connection attempt only delay the answer past the caller's deadline;
            // the next call after a failure starts a new attempt anyway.
            .set_number_of_retries(1)
            .set_min_delay(std::time::Duration::from_millis(50))
            .set_max_delay(settings.operation_timeout);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| InvalidRedisUrl(e.to_string()))?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                config,
                connection: Mutex::new((0, manager)),
                settings,
                complete: Script::new(COMPLETE_LUA),
                release: Script::new(RELEASE_LUA),
            }),
        })
    }

    /// Redis's `maxmemory` (bytes, 0: no limit) and `maxmemory-policy`, or `None` when they cannot be
    /// read: Redis unreachable, or `CONFIG GET` refused (managed services often disable it).
    pub async fn memory_policy(&self) -> Option<(u64, String)> {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory*");
        let pairs: Vec<(String, String)> = self.query(self.deadline(), "config get", get).await.ok()?;
        let value = |name: &str| pairs.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
        Some((value("maxmemory")?.parse().ok()?, value("maxmemory-policy")?))
    }

    pub(super) async fn begin(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Begin, IdempotencyError> {
        let deadline = self.deadline();
        let redis_key = redis_key(tenant, key);
        let lease_ms = millis(self.inner.settings.lease);
        for _ in 0..BEGIN_ATTEMPTS {
            let token: u128 = rand::random();
            let record = Record::InFlight { token, fingerprint: *fingerprint }.encode();
            let mut set = redis::cmd("SET");
            set.arg(&redis_key).arg(record).arg("NX").arg("PX").arg(lease_ms);
            let reply: Value = self.query(deadline, "reserve", set).await?;
            if !matches!(reply, Value::Nil) {
                return Ok(Begin::Reserved(Reservation {
                    tenant: tenant.to_owned(),
                    key: key.to_owned(),
                    token,
                    fingerprint: *fingerprint,
                }));
            }
            let mut get = redis::cmd("GET");
            get.arg(&redis_key);
            let existing: Option<Vec<u8>> = self.query(deadline, "read", get).await?;
            // None: released or expired since the SET; try to reserve again.
            if let Some(bytes) = existing {
                let record = Record::decode(&bytes).map_err(IdempotencyError::Unavailable)?;
                return answer_existing(&record, fingerprint);
            }
        }
        // The key keeps changing hands under us: another attempt is active, so ask the client to retry.
        Err(IdempotencyError::InFlight)
    }

    pub(super) async fn complete(
        &self,
        reservation: Reservation,
        response: &[u8],
    ) -> Result<(), IdempotencyError> {
        let deadline = self.deadline();
        let record = Record::Completed {
            token: reservation.token,
            fingerprint: reservation.fingerprint,
            response: response.to_vec(),
        };
        let mut invocation = self.inner.complete.prepare_invoke();
        invocation
            .key(redis_key(&reservation.tenant, &reservation.key))
            .arg(&Record::owner_prefix(reservation.token)[..])
            .arg(record.encode())
            .arg(millis(self.inner.settings.retention));
        let stored: i64 = self
            .run(deadline, "complete", |mut connection| async move {
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        if stored == 0 {
            tracing::warn!(
                tenant = %reservation.tenant,
                "idempotency lease lost before completion; response not recorded"
            );
        }
        Ok(())
    }

    pub(super) async fn release(&self, reservation: Reservation) -> Result<(), IdempotencyError> {
        let deadline = self.deadline();
        let mut invocation = self.inner.release.prepare_invoke();
        invocation
            .key(redis_key(&reservation.tenant, &reservation.key))
            .arg(&Record::owner_prefix(reservation.token)[..]);
        let _deleted: i64 = self
            .run(deadline, "release", |mut connection| async move {
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        Ok(())
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.settings.operation_timeout
    }

    async fn query<T: FromRedisValue>(
        &self,
        deadline: Instant,
        what: &'static str,
        cmd: Cmd,
    ) -> Result<T, IdempotencyError> {
        self.run(deadline, what, |mut connection| async move { cmd.query_async(&mut connection).await }).await
    }

    /// Runs one Redis call on the current connection, bounded by `deadline`.
    async fn run<T, F, Fut>(
        &self,
        deadline: Instant,
        what: &'static str,
        call: F,
    ) -> Result<T, IdempotencyError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, connection) = {
            let current = self.inner.connection.lock().unwrap_or_else(PoisonError::into_inner);
            (current.0, current.1.clone())
        };
        match tokio::time::timeout_at(deadline, call(connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if error.is_timeout() {
                    self.replace_connection(generation);
                }
                Err(IdempotencyError::Unavailable(format!("redis {what} failed: {error}")))
            }
            Err(_elapsed) => {
                self.replace_connection(generation);
                Err(IdempotencyError::Unavailable(format!(
                    "redis {what} timed out (operation timeout {} ms)",
                    self.inner.settings.operation_timeout.as_millis()
                )))
            }
        }
    }

    /// Swaps in a fresh, lazily connecting manager unless another call already did since `generation`.
    fn replace_connection(&self, generation: u64) {
        let mut current = self.inner.connection.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.inner.client.clone(), self.inner.config.clone()) {
            Ok(manager) => *current = (generation + 1, manager),
            // Only an invalid configuration fails here, and that was checked in `new`.
            Err(error) => tracing::warn!(%error, "could not replace the redis connection manager"),
        }
    }
}

/// The Redis key of one record. The tenant is length-prefixed so that no two (tenant, key) pairs share a
/// Redis key, whatever bytes they contain.
/// What to tell the operator about Redis's memory settings: with a memory limit and any policy but
/// `noeviction`, Redis drops keys when full — idempotency records among them (they all have a TTL, so
/// the `volatile-*` policies take them too) — and a retry of a dropped key applies its write again.
pub fn eviction_warning(maxmemory_bytes: u64, policy: &str) -> Option<String> {
    (maxmemory_bytes > 0 && policy != "noeviction").then(|| {
        format!(
            "redis evicts keys when full (maxmemory {maxmemory_bytes} bytes, maxmemory-policy {policy}): \
             evicted idempotency records let retries apply their writes twice; set maxmemory-policy noeviction"
        )
    })
}

fn redis_key(tenant: &str, key: &str) -> String {
    format!("pairdb:idem:{}:{tenant}:{key}", tenant.len())
}

fn millis(duration: std::time::Duration) -> u64 {
    // Redis rejects a PX of 0.
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_keys_do_not_collide_across_tenant_and_key_boundaries() {
        assert_ne!(redis_key("a:b", "c"), redis_key("a", "b:c"));
        assert_ne!(redis_key("a", "1:b"), redis_key("a:1", "b"));
        assert_eq!(redis_key("acme", "req-1"), "pairdb:idem:4:acme:req-1");
    }

    #[test]
    fn scripts_compare_the_owner_prefix_length() {
        // The scripts take the prefix length from ARGV[1]; keep them in step with the record format.
        assert_eq!(Record::owner_prefix(1).len(), super::super::OWNER_PREFIX_LEN);
    }

    #[test]
    fn only_a_policy_that_can_evict_under_a_limit_is_warned_about() {
        assert_eq!(eviction_warning(0, "allkeys-lru"), None, "no limit: nothing is evicted");
        assert_eq!(eviction_warning(1 << 30, "noeviction"), None);
        for policy in ["allkeys-lru", "volatile-ttl", "volatile-lru", "allkeys-random"] {
            let warning = eviction_warning(1 << 30, policy).expect("a policy that evicts");
            assert!(warning.contains(policy) && warning.contains("noeviction"), "{warning}");
        }
    }

    #[tokio::test]
    async fn malformed_url_is_rejected_at_construction() {
        assert!(RedisStore::new("not a url", IdempotencySettings::default()).is_err());
    }
}
