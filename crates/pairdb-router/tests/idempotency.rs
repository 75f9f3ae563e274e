//! The idempotency store contract, run against both backends: the embedded memory store (on a paused
//! clock) and Redis (real server from `PAIRDB_TEST_REDIS_URL`, real time; no mocks). Then the
//! Redis-specific failure behaviour: a closed port, and a proxy the test cuts and restores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use pairdb_core::reason::HasReason;
use pairdb_router::idempotency::{
    Begin, Fingerprint, IdempotencyError, IdempotencySettings, IdempotencyStore, Reservation,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const REDIS_URL_ENV: &str = "PAIRDB_TEST_REDIS_URL";

fn redis_url() -> Option<String> {
    std::env::var(REDIS_URL_ENV).ok().filter(|url| !url.is_empty())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
}

/// One store under test and the clock its deadlines run on.
struct Harness {
    backend: Backend,
    store: IdempotencyStore,
    /// Unique per test so parallel tests (and earlier runs against the same Redis) never share records.
    tenant: String,
}

impl Harness {
    fn new(backend: Backend, settings: IdempotencySettings) -> Harness {
        let store = match backend {
            Backend::Memory => IdempotencyStore::memory(settings),
            Backend::Redis => {
                let url = redis_url().expect("redis tests run only with a redis url");
                IdempotencyStore::redis(&url, settings).expect("valid redis url")
            }
        };
        Harness { backend, store, tenant: unique("tenant") }
    }

    /// Lets `duration` pass on the store's clock: the paused tokio clock for memory, Redis's clock
    /// (real time) for Redis.
    async fn advance(&self, duration: Duration) {
        match self.backend {
            Backend::Memory => tokio::time::advance(duration).await,
            Backend::Redis => tokio::time::sleep(duration).await,
        }
    }

    async fn begin(&self, key: &str, fingerprint: &Fingerprint) -> Result<Begin, IdempotencyError> {
        self.store.begin(&self.tenant, key, fingerprint).await
    }

    async fn reserve(&self, key: &str, fingerprint: &Fingerprint) -> Reservation {
        match self.begin(key, fingerprint).await {
            Ok(Begin::Reserved(reservation)) => reservation,
            other => panic!("expected a reservation for {key}, got {other:?}"),
        }
    }

    async fn assert_completed(&self, key: &str, fingerprint: &Fingerprint, response: &[u8]) {
        match self.begin(key, fingerprint).await {
            Ok(Begin::Completed(stored)) => assert_eq!(stored, response),
            other => panic!("expected the stored response for {key}, got {other:?}"),
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn fingerprint(request: &str) -> Fingerprint {
    Fingerprint::of(&[b"put", b"user-key", request.as_bytes()])
}

/// Settings with lease and retention short enough to wait out on Redis's real clock.
fn short_settings() -> IdempotencySettings {
    IdempotencySettings {
        lease: Duration::from_millis(300),
        retention: Duration::from_millis(1000),
        ..IdempotencySettings::default()
    }
}

/// How long past a deadline the tests wait before expecting Redis to have expired the key (Redis
/// expires keys with millisecond precision on access).
const EXPIRY_SLACK: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------------
// The contract.

async fn first_begin_reserves_and_a_retry_in_flight_is_told_so(backend: Backend) {
    let h = Harness::new(backend, IdempotencySettings::default());
    let fp = fingerprint("v1");
    let reservation = h.reserve("k", &fp).await;
    assert_eq!(reservation.tenant(), h.tenant);
    assert_eq!(reservation.key(), "k");
    assert_eq!(reservation.fingerprint(), &fp);
    let retry = h.begin("k", &fp).await;
    assert!(matches!(retry, Err(IdempotencyError::InFlight)), "{retry:?}");
    assert_eq!(retry.unwrap_err().reason(), "IDEMPOTENCY_IN_FLIGHT");
    h.store.release(reservation).await.expect("release");
}

async fn completed_request_replays_its_response(backend: Backend) {
    let h = Harness::new(backend, IdempotencySettings::default());
    let fp = fingerprint("v1");
    let reservation = h.reserve("k", &fp).await;
    let response = b"\x0a\x03ctx\x10\x02 binary \x00\xff".to_vec();
    h.store.complete(reservation, &response).await.expect("complete");
    h.assert_completed("k", &fp, &response).await;
    // Replays are repeatable.
    h.assert_completed("k", &fp, &response).await;
}

async fn empty_response_is_replayed(backend: Backend) {
    let h = Harness::new(backend, IdempotencySettings::default());
    let fp = fingerprint("v1");
    let reservation = h.reserve("k", &fp).await;
    h.store.complete(reservation, b"").await.expect("complete");
    h.assert_completed("k", &fp, b"").await;
}

async fn different_request_conflicts_in_flight_and_after_completion(backend: Backend) {
    let h = Harness::new(backend, IdempotencySettings::default());
    let fp = fingerprint("v1");
    let other = fingerprint("v2");
    let reservation = h.reserve("k", &fp).await;
    let in_flight = h.begin("k", &other).await;
    assert!(matches!(in_flight, Err(IdempotencyError::Conflict)), "{in_flight:?}");
    assert_eq!(in_flight.unwrap_err().reason(), "IDEMPOTENCY_KEY_CONFLICT");
    h.store.complete(reservation, b"ack").await.expect("complete");
    let completed = h.begin("k", &other).await;
    assert!(matches!(completed, Err(IdempotencyError::Conflict)), "{completed:?}");
    // The conflict changed nothing for the original request.
    h.assert_completed("k", &fp, b"ack").await;
}

async fn released_key_can_be_reserved_again(backend: Backend) {
    let h = Harness::new(backend, IdempotencySettings::default());
    let fp = fingerprint("v1");
    let first = h.reserve("k", &fp).await;
    h.store.release(first).await.expect("release");
    // A failed attempt leaves no trace: even a different request may now use the key.
    let second = h.reserve("k", &fingerprint("v2")).await;
    h.store.complete(second, b"second").await.expect("complete");
    h.assert_completed("k", &fingerprint("v2"), b"second").await;
}

async fn expired_lease_lets_a_new_request_reserve_and_the_old_one_cannot_clobber_it(backend: Backend) {
    let settings = short_settings();
    let h = Harness::new(backend, settings.clone());
    let fp = fingerprint("v1");
    let stale = h.reserve("k", &fp).await;
    let stale_too = h.reserve("k2", &fp).await;
    h.advance(settings.lease + EXPIRY_SLACK).await;

    let owner = h.reserve("k", &fp).await;
    let owner_too = h.reserve("k2", &fp).await;
    // The stale reservations' complete and release are no-ops now.
    h.store.complete(stale, b"stale").await.expect("stale complete is not an error");
    h.store.release(stale_too).await.expect("stale release is not an error");
    let retry = h.begin("k", &fp).await;
    assert!(matches!(retry, Err(IdempotencyError::InFlight)), "new owner lost k: {retry:?}");
    let retry = h.begin("k2", &fp).await;
    assert!(matches!(retry, Err(IdempotencyError::InFlight)), "new owner lost k2: {retry:?}");

    h.store.complete(owner, b"owner").await.expect("complete");
    h.store.complete(owner_too, b"owner too").await.expect("complete");
    h.assert_completed("k", &fp, b"owner").await;
    h.assert_completed("k2", &fp, b"owner too").await;
}

async fn a_live_lease_is_not_taken_over(backend: Backend) {
    let settings = short_settings();
    let h = Harness::new(backend, settings.clone());
    let fp = fingerprint("v1");
    let reservation = h.reserve("k", &fp).await;
    h.advance(settings.lease / 3).await;
    let retry = h.begin("k", &fp).await;
    assert!(matches!(retry, Err(IdempotencyError::InFlight)), "{retry:?}");
    h.store.complete(reservation, b"ack").await.expect("complete");
    h.assert_completed("k", &fp, b"ack").await;
}

async fn retention_expiry_forgets_the_record(backend: Backend) {
    let settings = short_settings();
    let h = Harness::new(backend, settings.clone());
    let fp = fingerprint("v1");
    let reservation = h.reserve("k", &fp).await;
    h.store.complete(reservation, b"ack").await.expect("complete");
    // Completed records outlive the lease.
    h.advance(settings.lease + EXPIRY_SLACK).await;
    h.assert_completed("k", &fp, b"ack").await;
    h.advance(settings.retention).await;
    // Forgotten: the same key is free for any request again.
    let reservation = h.reserve("k", &fingerprint("v2")).await;
    h.store.release(reservation).await.expect("release");
}

async fn concurrent_begins_reserve_exactly_once(backend: Backend) {
    let h = Arc::new(Harness::new(backend, IdempotencySettings::default()));
    let fp = fingerprint("v1");
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.begin("k", &fp).await })
        })
        .collect();
    let mut reservations = Vec::new();
    for attempt in attempts {
        match attempt.await.expect("begin task") {
            Ok(Begin::Reserved(reservation)) => reservations.push(reservation),
            Err(IdempotencyError::InFlight) => {}
            other => panic!("unexpected concurrent begin outcome {other:?}"),
        }
    }
    assert_eq!(reservations.len(), 1, "exactly one of 16 concurrent begins reserves");
    let reservation = reservations.pop().expect("one reservation");
    h.store.complete(reservation, b"once").await.expect("complete");
    h.assert_completed("k", &fp, b"once").await;
}

async fn tenants_are_isolated(backend: Backend) {
    let h = Harness::new(backend, IdempotencySettings::default());
    let other_tenant = unique("other");
    let fp = fingerprint("v1");
    let other_fp = fingerprint("v2");
    let mine = h.reserve("shared-key", &fp).await;
    // The same idempotency key in another tenant is independent, even with a different request.
    let theirs = match h.store.begin(&other_tenant, "shared-key", &other_fp).await {
        Ok(Begin::Reserved(reservation)) => reservation,
        other => panic!("other tenant should reserve its own key, got {other:?}"),
    };
    h.store.complete(mine, b"mine").await.expect("complete");
    h.store.complete(theirs, b"theirs").await.expect("complete");
    h.assert_completed("shared-key", &fp, b"mine").await;
    let replay = h.store.begin(&other_tenant, "shared-key", &other_fp).await;
    assert!(matches!(replay, Ok(Begin::Completed(ref r)) if r == b"theirs"), "{replay:?}");

    // Tenant and key bytes cannot be shifted across the boundary to reach another record.
    let a = format!("{}:x", h.tenant);
    let reservation = match h.store.begin(&a, "y", &fp).await {
        Ok(Begin::Reserved(reservation)) => reservation,
        other => panic!("{a}/y is a distinct record, got {other:?}"),
    };
    h.store.release(reservation).await.expect("release");
    let shifted = h.reserve("x:y", &other_fp).await;
    h.store.release(shifted).await.expect("release");
}

/// Generates one test per backend for each contract case. Memory runs on a paused clock; Redis is
/// skipped (with a message) when `PAIRDB_TEST_REDIS_URL` is unset.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(start_paused = true)]
                async fn $case() {
                    super::$case(super::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $case() {
                    if super::redis_url().is_none() {
                        println!("skipped: {} not set", super::REDIS_URL_ENV);
                        return;
                    }
                    super::$case(super::Backend::Redis).await;
                }
            )*
        }
    };
}

contract!(
    first_begin_reserves_and_a_retry_in_flight_is_told_so,
    completed_request_replays_its_response,
    empty_response_is_replayed,
    different_request_conflicts_in_flight_and_after_completion,
    released_key_can_be_reserved_again,
    expired_lease_lets_a_new_request_reserve_and_the_old_one_cannot_clobber_it,
    a_live_lease_is_not_taken_over,
    retention_expiry_forgets_the_record,
    concurrent_begins_reserve_exactly_once,
    tenants_are_isolated,
);

// ---------------------------------------------------------------------------------------------------
// Redis failures.

fn failure_settings() -> IdempotencySettings {
    IdempotencySettings { operation_timeout: Duration::from_millis(300), ..IdempotencySettings::default() }
}

#[tokio::test]
async fn redis_on_a_closed_port_is_unavailable_quickly_and_creation_does_not_fail() {
    // Port 1 (tcpmux) is not served on the test machines: connections are refused.
    let created = Instant::now();
    let store = IdempotencyStore::redis("redis://127.0.0.1:1", failure_settings())
        .expect("creating the store does not connect");
    assert!(created.elapsed() < Duration::from_millis(100), "creation must not wait for redis");

    let fp = fingerprint("v1");
    for _ in 0..3 {
        let started = Instant::now();
        let result = store.begin("tenant", "k", &fp).await;
        let elapsed = started.elapsed();
        assert!(matches!(result, Err(IdempotencyError::Unavailable(_))), "{result:?}");
        assert_eq!(result.unwrap_err().reason(), "IDEMPOTENCY_STORE_UNAVAILABLE");
        assert!(elapsed < Duration::from_secs(1), "begin took {elapsed:?}");
    }
}

#[tokio::test]
async fn redis_blackholed_by_an_unresponsive_server_is_unavailable_within_the_timeout() {
    // A server that accepts connections and never answers: every call must end at the deadline.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let settings = failure_settings();
    let store = IdempotencyStore::redis(&format!("redis://{address}"), settings.clone()).expect("store");
    let fp = fingerprint("v1");
    for _ in 0..3 {
        let started = Instant::now();
        let result = store.begin("tenant", "k", &fp).await;
        let elapsed = started.elapsed();
        assert!(matches!(result, Err(IdempotencyError::Unavailable(_))), "{result:?}");
        assert!(elapsed < settings.operation_timeout + Duration::from_millis(200), "begin took {elapsed:?}");
    }
    silent.abort();
}

/// Proxy modes.
const FORWARD: u8 = 0;
/// Connections are closed: existing ones when they next carry bytes, new ones on accept.
const CUT: u8 = 1;
/// Bytes are swallowed and never answered, connections stay open (a half-open connection). Connections
/// blackholed once stay dead after the proxy is restored, as after a real network partition.
const BLACKHOLE: u8 = 2;

/// A TCP proxy in front of the real Redis that the test can cut, blackhole and restore.
struct Proxy {
    address: std::net::SocketAddr,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let task = {
            let mode = mode.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (mode, upstream) = (mode.clone(), upstream.clone());
                    tokio::spawn(async move {
                        match mode.load(Ordering::SeqCst) {
                            CUT => drop(client),
                            BLACKHOLE => {
                                // Keep the write half: dropping it would send FIN.
                                let (read, _write) = client.into_split();
                                swallow(read).await;
                            }
                            _ => forward(client, &upstream, &mode).await,
                        }
                    });
                }
            })
        };
        Proxy { address, mode, task }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.address)
    }

    /// Takes effect for every byte the proxy reads afterwards, so for every request sent after it.
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes both ways while the proxy forwards. The mode is checked after each read and before
/// the write, so a request sent after [`Proxy::set`] never reaches Redis.
async fn forward(client: TcpStream, upstream: &str, mode: &AtomicU8) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let stopped_by = tokio::select! {
        mode = pump(&mut client_read, &mut server_write, mode) => mode,
        mode = pump(&mut server_read, &mut client_write, mode) => mode,
    };
    drop((server_read, server_write));
    if stopped_by == BLACKHOLE {
        // Keep the write half alive so the client sees no close.
        let _open = client_write;
        swallow(client_read).await;
    }
}

/// Returns the mode that stopped the copy (FORWARD when a side closed).
async fn pump(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, mode: &AtomicU8) -> u8 {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return FORWARD,
            Ok(read) => read,
        };
        let now = mode.load(Ordering::SeqCst);
        if now != FORWARD {
            return now;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return FORWARD;
        }
    }
}

/// Reads and discards until the client closes.
async fn swallow(mut from: OwnedReadHalf) {
    let mut buffer = vec![0u8; 16 * 1024];
    while matches!(from.read(&mut buffer).await, Ok(read) if read > 0) {}
}

fn redis_host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host_port = rest.split('/').next().unwrap_or(rest);
    if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:6379") }
}

/// Polls `begin` until it stops being `Unavailable`, or panics at `within`.
async fn wait_until_available(
    store: &IdempotencyStore,
    tenant: &str,
    key: &str,
    fp: &Fingerprint,
    within: Duration,
) -> Result<Begin, IdempotencyError> {
    let deadline = Instant::now() + within;
    loop {
        let result = store.begin(tenant, key, fp).await;
        if !matches!(result, Err(IdempotencyError::Unavailable(_))) {
            return result;
        }
        assert!(Instant::now() < deadline, "store did not recover within {within:?}: {result:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn cut_and_restore(mode: u8) {
    let Some(url) = redis_url() else {
        println!("skipped: {REDIS_URL_ENV} not set");
        return;
    };
    let proxy = Proxy::start(redis_host_port(&url)).await;
    let settings = failure_settings();
    let store = IdempotencyStore::redis(&proxy.url(), settings.clone()).expect("store");
    let tenant = unique("proxy");
    let fp = fingerprint("v1");

    let Ok(Begin::Reserved(before)) = store.begin(&tenant, "before", &fp).await else {
        panic!("store works through the proxy");
    };
    store.complete(before, b"before").await.expect("complete through the proxy");

    proxy.set(mode);
    for key in ["during-1", "during-2", "during-3"] {
        let started = Instant::now();
        let result = store.begin(&tenant, key, &fp).await;
        let elapsed = started.elapsed();
        assert!(matches!(result, Err(IdempotencyError::Unavailable(_))), "{key}: {result:?}");
        assert!(elapsed < Duration::from_secs(1), "{key}: begin took {elapsed:?}");
    }

    proxy.set(FORWARD);
    let recovered = wait_until_available(&store, &tenant, "before", &fp, Duration::from_secs(10)).await;
    assert!(matches!(recovered, Ok(Begin::Completed(ref r)) if r == b"before"), "{recovered:?}");
    // No record was left behind by the failed calls.
    let Ok(Begin::Reserved(after)) = store.begin(&tenant, "during-1", &fp).await else {
        panic!("failed begins must not have reserved during-1");
    };
    store.complete(after, b"after").await.expect("complete after recovery");
}

#[tokio::test]
async fn redis_cut_connections_give_unavailable_and_the_store_recovers() {
    cut_and_restore(CUT).await;
}

#[tokio::test]
async fn redis_half_open_connections_give_unavailable_and_the_store_recovers() {
    cut_and_restore(BLACKHOLE).await;
}

/// The router reads Redis's memory settings once at start, to warn when Redis may evict idempotency
/// records: a closed port answers nothing (quickly), a real server answers what `CONFIG GET` says.
#[tokio::test]
async fn redis_memory_settings_are_read_from_the_server() {
    let closed = pairdb_router::idempotency::RedisStore::new("redis://127.0.0.1:1", failure_settings())
        .expect("creating the store does not connect");
    assert_eq!(closed.memory_policy().await, None);

    let Some(url) = redis_url() else {
        println!("skipped: {REDIS_URL_ENV} not set");
        return;
    };
    let store = pairdb_router::idempotency::RedisStore::new(&url, failure_settings()).expect("store");
    let (maxmemory_bytes, policy) = store.memory_policy().await.expect("CONFIG GET answered");
    let client = ::redis::Client::open(url.as_str()).expect("url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connect");
    for (name, read) in [("maxmemory-policy", policy), ("maxmemory", maxmemory_bytes.to_string())] {
        let server: Vec<String> = ::redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(&mut connection)
            .await
            .expect("config get");
        assert_eq!(server, [name.to_owned(), read]);
    }
}
