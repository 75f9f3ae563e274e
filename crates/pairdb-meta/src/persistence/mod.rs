//! The metadata database: every SQL statement of PairDB lives in this module.
//!
//! # What is stored, and why
//!
//! The database is the source of truth for everything that must survive a restart of every meta
//! replica and be shared between replicas:
//!
//! - `meta_state` (one row): the partition count Q fixed when the cluster was created, the epochs of
//!   the current and pending topology versions, and the revision of the last change. Every mutating
//!   transaction updates this row first ([`Store::write`]); the row lock serialises metadata writes
//!   across replicas, which makes check-then-act rules (N ≤ active nodes, one running migration, ...)
//!   safe and assigns change revisions in commit order. Also the live-router count the watch stream
//!   last published (`live_routers`, 0 = not known), written only by the leader's count, with a
//!   change-log row, so a new leader and every replica's view start from the count in force.
//! - `tenants`: replication factor, default consistency, conflict mode and limits of each tenant; its
//!   `key_groups` (how its keys are placed: written when the row is inserted and never updated, since
//!   a change would move every grouped key); its `state` (`active`, or `deleting` while storage nodes
//!   purge its data), its `generation` (which creation of the id it is) and, while deleting, the
//!   `purge_seq` nodes confirm. Generations and purge sequences come from
//!   `meta_state.last_tenant_seq`, so neither is ever reused. Its quotas (`max_keys`, `max_bytes`;
//!   0 = none) and the leader's last verdict on them (`over_key_quota`, `over_byte_quota`), which
//!   the watch stream pushes to the coordinators that enforce it: stored so that a new leader and
//!   every replica's view start from the verdict in force, and changed only with a change-log row.
//!   Its value expiry settings (`default_ttl_ms`, `max_ttl_ms`; 0 = none), which routers apply
//!   when they stamp a write's expiry.
//! - `tenant_purges`: which storage nodes confirmed (in a heartbeat) that they purged a deleting
//!   tenant's records and hints. When every node that is not removed has, the tenant row and its
//!   confirmations go and the id may be created again.
//! - `context_keys`: the keys routers seal client contexts with (current = newest unretired,
//!   previous = the one before it; a rotation retires the previous one). Stored in clear: routers need
//!   them, and they only let a holder mint contexts, which a tenant's own key already bounds.
//! - `api_keys`: key id, tenant, description and the SHA-256 of the secret. The secret itself is
//!   never stored: it is shown once, at creation, and routers authenticate by hashing what they are
//!   presented.
//! - `storage_nodes`: id, address, zone, weight, lifecycle (`membership`) and the failure detector's
//!   verdict (`alive`), the last heartbeat and the stats it carried (among them the node's measured
//!   clock offset to meta, `stats_clock_offset_ms`, valid when `stats_clock_offset_known`; the
//!   engine's size on disk, in `stats_live_bytes` — named before it was understood to be the disk
//!   size, and kept so for rolling upgrades — and the bytes of its live values,
//!   `stats_live_value_bytes`), and when
//!   it last reported its usage (`usage_reported_at_ms`). `leftovers_since_revision`: the change-log
//!   revision from which a migration's end left the node holding records it no longer owns (0 =
//!   none; set by the orchestrator, cleared once covered), and `leftovers_cleaned_revision`: the
//!   revision of the view its last reported complete unowned-data deletion ran from. Stored because
//!   tombstone GC everywhere waits on them (`pairdb_core::gc::leftovers`): forgetting a mark could
//!   bring deleted data back through that node. Removed nodes keep their row; a re-added node keeps the removed
//!   data directory's actor id in `retired_actor_id` so that stale directory cannot rejoin.
//! - `tenant_usage`: each node's latest share of each tenant's usage (keys, value bytes, siblings,
//!   tombstones of the partitions it is first in the topology's list of), replaced as a whole by
//!   each report the node sends in a heartbeat ([`Store::record_usage`], outside the metadata lock:
//!   no watch event). A missing row is a zero share. Stored rather than kept in memory so every
//!   replica answers `GetTenantUsage` alike and a new leader evaluates quotas at once; the shares of
//!   the current topology's nodes add up to each tenant's usage ([`crate::usage`]).
//! - `routers`: each router process that sent a `RouterHeartbeat` (its random id, its address, when
//!   last seen), upserted by every heartbeat outside the metadata lock ([`Store::record_router`]: no
//!   watch event). The leader counts the rows seen within [`crate::routers::ROUTER_ALIVE_WINDOW_MS`]
//!   into `meta_state.live_routers` and deletes rows not seen for an hour. Stored rather than kept
//!   in memory because heartbeats reach any replica and the leader counts them all.
//! - `topology_versions`: every topology version ever made current or pending, immutable once written
//!   (a cancelled pending epoch is never reused), with the assignment encoded compactly
//!   ([`encode_assignment`]).
//! - `migrations`: kind, state, the parameters needed to resume or undo it, progress counters and a
//!   per-partition "done" bitmap, so a migration resumes where it stopped after a leader change.
//! - `changes`: the change log behind the watch stream, one row per event with contiguous revisions.
//!   A replica that sees a gap (the log was pruned below its cursor) reloads everything.
//!
//! # What is derived in memory at start
//!
//! Each replica loads a [`Snapshot`] (tenants, active key hashes, context keys in use, nodes, current
//! and pending topology, the live-router count, at one revision) into its [`crate::view::WatchSource`] and then follows the change log.
//! Leadership, the subscribers of the watch stream, the failure detector's timers and readiness are
//! process state only. Nothing in memory is authoritative: a replica can be killed at any time and
//! another one (or the restarted one) rebuilds the same view from the database.
//!
//! # Backends
//!
//! PostgreSQL (production, several replicas) and SQLite (embedded default, one replica) share one
//! schema (the equivalent migration sets under `migrations/`) and one set of statements: every
//! statement uses `$n` placeholders and types both backends map identically (`BIGINT` ↔ `i64`,
//! `BOOLEAN` ↔ `bool`, `TEXT`, `BYTEA`/`BLOB` ↔ `Vec<u8>`). [`on_conn!`] expands one statement body
//! for each backend's connection type, so nothing is written twice and the conformance suite
//! (`tests/persistence.rs`) checks both.

mod codec;

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pairdb_core::quorum::Consistency;
use pairdb_core::ring::NodeId;
use pairdb_core::token::{PartitionCount, TOKEN_FORMAT_VERSION};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, PgPool, SqlitePool};
use tokio::sync::Notify;

use crate::model::{
    ApiKey, ConflictMode, ContextKeySet, KeyGroups, Membership, Migration, MigrationChange, MigrationKind,
    MigrationProgress, MigrationState, NodeStats, StorageNode, Tenant, TenantState, Topology, Usage,
    UsageShare,
};

pub use codec::{decode_assignment, encode_assignment};

/// Errors of the metadata database.
#[derive(Debug, thiserror::Error)]
pub enum PersistenceError {
    /// The database cannot be reached (connection refused or lost, pool timeout): retryable.
    #[error("metadata database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("metadata database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("schema migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    #[error("database_url: {0}")]
    Config(String),
    /// A leader-only write found that this replica no longer holds the leader lock.
    #[error("this replica is no longer the leader")]
    NotLeader,
}

impl PersistenceError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, PersistenceError::Unavailable(_))
    }
}

impl From<sqlx::Error> for PersistenceError {
    fn from(error: sqlx::Error) -> Self {
        if is_connection_error(&error) {
            PersistenceError::Unavailable(error)
        } else {
            PersistenceError::Database(error)
        }
    }
}

impl From<sqlx::migrate::MigrateError> for PersistenceError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::Execute(inner) => PersistenceError::from(inner),
            other => PersistenceError::Migrate(other),
        }
    }
}

/// Whether `error` means "the database is not reachable right now" rather than "this statement is
/// wrong": IO and pool errors, and the PostgreSQL classes 08 (connection exception), 53
/// (insufficient resources) and 57P (operator intervention, e.g. the server shutting down).
fn is_connection_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")),
        _ => false,
    }
}

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `postgres://...`, `postgresql://...`, `sqlite://path?mode=rwc` or `sqlite::memory:`.
    pub url: String,
    /// Bound on acquiring a connection (and so on every call while the database is unreachable).
    pub timeout: Duration,
    pub max_connections: u32,
}

/// The cluster-wide settings and pointers of `meta_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaState {
    pub revision: u64,
    pub partition_count: PartitionCount,
    /// 0 = no topology yet.
    pub current_epoch: u64,
    /// 0 = none.
    pub pending_epoch: u64,
    pub created_at_ms: u64,
    /// The live-router count last published (0 = not known).
    pub live_routers: u32,
}

/// What a change-log row is about; each row becomes exactly one watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// `entity` = tenant id; the tenant's current row is published.
    Tenant,
    TenantDeleted,
    /// `entity` = node id.
    Node,
    /// `entity` = key id.
    ApiKeyAdded,
    ApiKeyRevoked,
    /// `entity` = epoch.
    TopologyCurrent,
    TopologyPending,
    TopologyPendingCleared,
    /// `entity` = the current context key's id; the keys in use are published.
    ContextKeys,
    /// `entity` = the new live-router count, which is published.
    LiveRouters,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Tenant => "tenant",
            ChangeKind::TenantDeleted => "tenant_deleted",
            ChangeKind::Node => "node",
            ChangeKind::ApiKeyAdded => "api_key_added",
            ChangeKind::ApiKeyRevoked => "api_key_revoked",
            ChangeKind::TopologyCurrent => "topology_current",
            ChangeKind::TopologyPending => "topology_pending",
            ChangeKind::TopologyPendingCleared => "topology_pending_cleared",
            ChangeKind::ContextKeys => "context_keys",
            ChangeKind::LiveRouters => "live_routers",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "tenant" => ChangeKind::Tenant,
            "tenant_deleted" => ChangeKind::TenantDeleted,
            "node" => ChangeKind::Node,
            "api_key_added" => ChangeKind::ApiKeyAdded,
            "api_key_revoked" => ChangeKind::ApiKeyRevoked,
            "topology_current" => ChangeKind::TopologyCurrent,
            "topology_pending" => ChangeKind::TopologyPending,
            "topology_pending_cleared" => ChangeKind::TopologyPendingCleared,
            "context_keys" => ChangeKind::ContextKeys,
            "live_routers" => ChangeKind::LiveRouters,
            _ => return None,
        })
    }
}

/// One row of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: u64,
    pub kind: ChangeKind,
    pub entity: String,
}

/// Everything a replica derives its in-memory view from, read at one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: MetaState,
    pub tenants: Vec<Tenant>,
    /// Active (not revoked) keys only.
    pub api_keys: Vec<ApiKey>,
    pub nodes: Vec<StorageNode>,
    pub current: Option<Topology>,
    pub pending: Option<Topology>,
    pub context_keys: ContextKeySet,
}

/// Proof, for leader-only writes on PostgreSQL, of which session holds the leader lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderFence {
    /// Backend pid of the dedicated connection holding the lock; `None` for SQLite.
    pub backend_pid: Option<i32>,
}

/// Names derived from the database and schema, so that clusters sharing one PostgreSQL (tests,
/// staging) never share a lock or a notification channel.
#[derive(Debug, Clone)]
struct Namespace {
    migration_lock_key: i64,
    leader_lock_key: i64,
    channel: String,
}

impl Namespace {
    fn new(namespace: &str) -> Self {
        let key = |purpose: &str| {
            let digest = Sha256::digest(format!("pairdb-meta/{purpose}/{namespace}").as_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            i64::from_be_bytes(first)
        };
        let digest = Sha256::digest(format!("pairdb-meta/changes/{namespace}").as_bytes());
        let channel = format!("pairdb_meta_{}", hex(&digest[..8]));
        Self { migration_lock_key: key("migrate"), leader_lock_key: key("leader"), channel }
    }
}

#[derive(Debug, Clone)]
enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    pg_options: Option<PgConnectOptions>,
    namespace: OnceLock<Namespace>,
    timeout: Duration,
    /// Woken after every local commit that recorded changes, so this replica's view follows at once.
    local_changes: Arc<Notify>,
}

/// A handle on the metadata database (cheap to clone).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Runs `$body` with `$c` bound to the transaction's connection, once per backend: the same
/// statements compile against `PgConnection` and `SqliteConnection`.
macro_rules! on_conn {
    ($tx:expr, $c:ident => $body:expr) => {
        match &mut $tx.conn {
            TxConn::Postgres(transaction) => {
                let $c: &mut sqlx::PgConnection = &mut **transaction;
                $body
            }
            TxConn::Sqlite(transaction) => {
                let $c: &mut sqlx::SqliteConnection = &mut **transaction;
                $body
            }
        }
    };
}

/// Runs `$body` with `$pool` bound to the store's pool, whichever the backend: for statements that
/// run outside a transaction (as `on_conn!` does for transactions).
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.inner.pool {
            Pool::Postgres($pool) => $body,
            Pool::Sqlite($pool) => $body,
        }
    };
}

mod security;

impl Store {
    /// A store for `options.url`. PostgreSQL pools connect lazily (meta starts, and reports not
    /// ready, while the database is down); an SQLite file is opened (and created) at once.
    pub async fn open(options: &StoreOptions) -> Result<Store, PersistenceError> {
        let url = options.url.as_str();
        let (pool, pg_options) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pg = PgConnectOptions::from_str(url)
                .map_err(|e| PersistenceError::Config(e.to_string()))?
                .application_name("pairdb-meta");
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.timeout)
                .idle_timeout(Duration::from_secs(60))
                .test_before_acquire(true)
                .connect_lazy_with(pg.clone());
            (Pool::Postgres(pool), Some(pg))
        } else if url.starts_with("sqlite:") {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            let sqlite = SqliteConnectOptions::from_str(url)
                .map_err(|e| PersistenceError::Config(e.to_string()))?
                .busy_timeout(options.timeout.max(Duration::from_secs(5)))
                .foreign_keys(true);
            let sqlite = if in_memory {
                sqlite
            } else {
                sqlite
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
            };
            // An in-memory database lives as long as its one connection: keep exactly one, forever.
            let pool_options = if in_memory {
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
            } else {
                SqlitePoolOptions::new().max_connections(options.max_connections)
            };
            let pool = pool_options
                .acquire_timeout(options.timeout.max(Duration::from_secs(5)))
                .connect_with(sqlite)
                .await?;
            (Pool::Sqlite(pool), None)
        } else {
            return Err(PersistenceError::Config(
                "must start with postgres://, postgresql:// or sqlite:".to_owned(),
            ));
        };
        Ok(Store {
            inner: Arc::new(Inner {
                pool,
                pg_options,
                namespace: OnceLock::new(),
                timeout: options.timeout,
                local_changes: Arc::new(Notify::new()),
            }),
        })
    }

    /// The configured bound on waiting for the database.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    pub fn backend(&self) -> Backend {
        match self.inner.pool {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Notified after each local commit that recorded changes.
    pub fn local_changes(&self) -> Arc<Notify> {
        self.inner.local_changes.clone()
    }

    /// The PostgreSQL LISTEN/NOTIFY channel carrying change revisions (after [`Store::initialize`]).
    pub fn notify_channel(&self) -> Option<String> {
        self.inner.namespace.get().map(|ns| ns.channel.clone())
    }

    /// The advisory lock key of the leader election (after [`Store::initialize`]).
    pub fn leader_lock_key(&self) -> Option<i64> {
        self.inner.namespace.get().map(|ns| ns.leader_lock_key)
    }

    /// The PostgreSQL pool (for `PgListener`), if this is PostgreSQL.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.inner.pool {
            Pool::Postgres(pool) => Some(pool),
            Pool::Sqlite(_) => None,
        }
    }

    /// Opens a dedicated PostgreSQL connection outside the pool (the leader lock lives on one: a
    /// session advisory lock is released exactly when its session ends).
    pub async fn dedicated_pg_connection(&self) -> Result<sqlx::PgConnection, PersistenceError> {
        let Some(options) = &self.inner.pg_options else {
            return Err(PersistenceError::Config("not a PostgreSQL store".to_owned()));
        };
        match tokio::time::timeout(self.inner.timeout, sqlx::PgConnection::connect_with(options)).await {
            Ok(connection) => Ok(connection?),
            Err(_) => Err(PersistenceError::Unavailable(sqlx::Error::PoolTimedOut)),
        }
    }

    /// Applies the schema migrations (on PostgreSQL under an advisory lock held on a dedicated
    /// connection, so replicas starting together migrate once) and creates the cluster with
    /// `partition_count` if it does not exist yet. Returns the cluster's state, whose partition count
    /// may differ from `partition_count` (Q is fixed when the cluster is created).
    pub async fn initialize(
        &self,
        partition_count: PartitionCount,
        now_ms: u64,
    ) -> Result<MetaState, PersistenceError> {
        match &self.inner.pool {
            Pool::Postgres(_) => {
                let mut connection = self.dedicated_pg_connection().await?;
                let (database, schema): (String, String) = sqlx::query_as(
                    "SELECT current_database()::text, COALESCE(current_schema()::text, current_setting('search_path'))",
                )
                .fetch_one(&mut connection)
                .await?;
                let namespace = Namespace::new(&format!("{database}/{schema}"));
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(namespace.migration_lock_key)
                    .execute(&mut connection)
                    .await?;
                let mut migrator = sqlx::migrate!("../../migrations/postgres");
                migrator.set_locking(false);
                // `run_direct` rather than `run`: `run`'s `Acquire` bound makes the future not `Send`.
                let migrated = migrator.run_direct(None, &mut connection, false).await;
                // Closing the session releases the advisory lock whatever happened.
                let _closed = connection.close().await;
                migrated?;
                let _ = self.inner.namespace.set(namespace);
            }
            Pool::Sqlite(pool) => {
                let mut migrator = sqlx::migrate!("../../migrations/sqlite");
                migrator.set_locking(false);
                let mut connection = pool.acquire().await?;
                migrator.run_direct(None, &mut *connection, false).await?;
                let _ = self.inner.namespace.set(Namespace::new("sqlite"));
            }
        }
        let mut tx = self.begin(false).await?;
        on_conn!(tx, c => {
            sqlx::query(
                "INSERT INTO meta_state (id, revision, partition_count, current_epoch, pending_epoch, created_at_ms) \
                 VALUES (1, 0, $1, 0, 0, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(i64::from(partition_count.get()))
            .bind(to_i64(now_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        let state = tx.meta_state().await?;
        tx.commit().await?;
        Ok(state)
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), PersistenceError> {
        match &self.inner.pool {
            Pool::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop)?,
            Pool::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop)?,
        }
        Ok(())
    }

    /// A read transaction: on PostgreSQL `REPEATABLE READ`, so several reads see one snapshot.
    pub async fn read(&self) -> Result<Tx, PersistenceError> {
        let mut tx = self.begin(false).await?;
        if let TxConn::Postgres(transaction) = &mut tx.conn {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut **transaction)
                .await?;
        }
        Ok(tx)
    }

    /// A write transaction. It starts by locking the `meta_state` row, so writes are serialised
    /// across every replica and the changes it records get revisions in commit order.
    pub async fn write(&self) -> Result<Tx, PersistenceError> {
        let mut tx = self.begin(true).await?;
        let revision: i64 = on_conn!(tx, c => {
            sqlx::query_scalar("UPDATE meta_state SET revision = revision WHERE id = 1 RETURNING revision")
                .fetch_optional(&mut *c)
                .await?
        })
        .ok_or_else(|| PersistenceError::Corrupt("meta_state row missing (not initialized)".to_owned()))?;
        tx.base_revision = to_u64(revision);
        tx.revision = tx.base_revision;
        Ok(tx)
    }

    async fn begin(&self, write: bool) -> Result<Tx, PersistenceError> {
        let conn = match &self.inner.pool {
            Pool::Postgres(pool) => TxConn::Postgres(pool.begin().await?),
            Pool::Sqlite(pool) => TxConn::Sqlite(pool.begin().await?),
        };
        Ok(Tx { conn, write, base_revision: 0, revision: 0, now_ms: 0, store: self.clone() })
    }

    /// Everything the in-memory view is built from, at one revision.
    pub async fn load_snapshot(&self) -> Result<Snapshot, PersistenceError> {
        let mut tx = self.read().await?;
        let state = tx.meta_state().await?;
        let tenants = tx.list_tenants().await?;
        let api_keys = tx.list_api_keys(None).await?.into_iter().filter(|key| !key.revoked()).collect();
        let nodes = tx.list_nodes().await?;
        let current = match state.current_epoch {
            0 => None,
            epoch => Some(tx.require_topology(epoch).await?),
        };
        let pending = match state.pending_epoch {
            0 => None,
            epoch => Some(tx.require_topology(epoch).await?),
        };
        let context_keys = tx.context_keys().await?;
        tx.commit().await?;
        Ok(Snapshot { state, tenants, api_keys, nodes, current, pending, context_keys })
    }

    /// Closes the pool (in-flight statements finish first).
    pub async fn close(&self) {
        match &self.inner.pool {
            Pool::Postgres(pool) => pool.close().await,
            Pool::Sqlite(pool) => pool.close().await,
        }
    }
}

#[derive(Debug)]
enum TxConn {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

/// One database transaction. Dropping it without [`Tx::commit`] rolls it back.
#[derive(Debug)]
pub struct Tx {
    conn: TxConn,
    write: bool,
    base_revision: u64,
    revision: u64,
    now_ms: u64,
    store: Store,
}

#[derive(sqlx::FromRow)]
struct MetaStateRow {
    revision: i64,
    partition_count: i64,
    current_epoch: i64,
    pending_epoch: i64,
    created_at_ms: i64,
    live_routers: i64,
}

#[derive(sqlx::FromRow)]
struct ChangeRow {
    revision: i64,
    kind: String,
    entity: String,
}

impl Tx {
    /// The wall-clock time stamped on changes recorded by this transaction.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// The revision the last recorded change got (the base revision if none).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Commits. For a write transaction that recorded changes, also publishes the new revision (the
    /// `meta_state` row, a PostgreSQL NOTIFY delivered at commit, and the local notifier). Returns the
    /// last revision recorded, if any.
    pub async fn commit(mut self) -> Result<Option<u64>, PersistenceError> {
        let changed = self.write && self.revision > self.base_revision;
        if changed {
            let revision = to_i64(self.revision);
            let channel = self.store.notify_channel().unwrap_or_default();
            on_conn!(self, c => {
                sqlx::query("UPDATE meta_state SET revision = $1 WHERE id = 1")
                    .bind(revision)
                    .execute(&mut *c)
                    .await?;
            });
            if let TxConn::Postgres(transaction) = &mut self.conn {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(channel)
                    .bind(revision.to_string())
                    .execute(&mut **transaction)
                    .await?;
            }
        }
        match self.conn {
            TxConn::Postgres(transaction) => transaction.commit().await?,
            TxConn::Sqlite(transaction) => transaction.commit().await?,
        }
        if changed {
            self.store.inner.local_changes.notify_one();
            Ok(Some(self.revision))
        } else {
            Ok(None)
        }
    }

    /// Appends a change-log row (write transactions only); its revision is the next one.
    pub async fn record_change(&mut self, kind: ChangeKind, entity: &str) -> Result<u64, PersistenceError> {
        if !self.write {
            return Err(PersistenceError::Corrupt("record_change outside a write transaction".to_owned()));
        }
        let revision = self.revision + 1;
        let now_ms = to_i64(self.now_ms);
        on_conn!(self, c => {
            sqlx::query("INSERT INTO changes (revision, kind, entity, created_at_ms) VALUES ($1, $2, $3, $4)")
                .bind(to_i64(revision))
                .bind(kind.as_str())
                .bind(entity)
                .bind(now_ms)
                .execute(&mut *c)
                .await?;
        });
        self.revision = revision;
        Ok(revision)
    }

    /// Up to `limit` changes after `revision`, in order.
    pub async fn changes_after(
        &mut self,
        revision: u64,
        limit: u32,
    ) -> Result<Vec<Change>, PersistenceError> {
        let rows: Vec<ChangeRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT revision, kind, entity FROM changes WHERE revision > $1 ORDER BY revision LIMIT $2")
                .bind(to_i64(revision))
                .bind(i64::from(limit))
                .fetch_all(&mut *c)
                .await?
        });
        rows.into_iter()
            .map(|row| {
                let kind = ChangeKind::parse(&row.kind).ok_or_else(|| corrupt("changes.kind", &row.kind))?;
                Ok(Change { revision: to_u64(row.revision), kind, entity: row.entity })
            })
            .collect()
    }

    /// Deletes change-log rows at or below `revision`.
    pub async fn prune_changes(&mut self, revision: u64) -> Result<u64, PersistenceError> {
        let result = on_conn!(self, c => {
            sqlx::query("DELETE FROM changes WHERE revision <= $1").bind(to_i64(revision)).execute(&mut *c).await?.rows_affected()
        });
        Ok(result)
    }

    /// On PostgreSQL, fails with [`PersistenceError::NotLeader`] unless the session `fence` names
    /// still holds the leader lock (a fencing check for leader-only writes).
    pub async fn check_leader(&mut self, fence: LeaderFence) -> Result<(), PersistenceError> {
        let (TxConn::Postgres(transaction), Some(pid)) = (&mut self.conn, fence.backend_pid) else {
            return Ok(());
        };
        let key = self.store.leader_lock_key().unwrap_or_default();
        let key_bits = u64::from_be_bytes(key.to_be_bytes());
        let (high, low) = ((key_bits >> 32) as i64, (key_bits & 0xffff_ffff) as i64);
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1 \
             AND classid::bigint = $2 AND objid::bigint = $3 AND objsubid = 1)",
        )
        .bind(pid)
        .bind(high)
        .bind(low)
        .fetch_one(&mut **transaction)
        .await?;
        if held { Ok(()) } else { Err(PersistenceError::NotLeader) }
    }

    // ---- meta_state -------------------------------------------------------------------------

    pub async fn meta_state(&mut self) -> Result<MetaState, PersistenceError> {
        let row: MetaStateRow = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM meta_state WHERE id = 1").fetch_optional(&mut *c).await?
        })
        .ok_or_else(|| PersistenceError::Corrupt("meta_state row missing".to_owned()))?;
        let partition_count = u32::try_from(row.partition_count)
            .ok()
            .and_then(|q| PartitionCount::new(q).ok())
            .ok_or_else(|| corrupt("meta_state.partition_count", &row.partition_count.to_string()))?;
        Ok(MetaState {
            revision: to_u64(row.revision),
            partition_count,
            current_epoch: to_u64(row.current_epoch),
            pending_epoch: to_u64(row.pending_epoch),
            created_at_ms: to_u64(row.created_at_ms),
            live_routers: u32::try_from(row.live_routers).unwrap_or(0),
        })
    }

    /// Points `meta_state` at the current and pending (0 = none) topology versions.
    pub async fn set_epochs(
        &mut self,
        current_epoch: u64,
        pending_epoch: u64,
    ) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query("UPDATE meta_state SET current_epoch = $1, pending_epoch = $2 WHERE id = 1")
                .bind(to_i64(current_epoch))
                .bind(to_i64(pending_epoch))
                .execute(&mut *c)
                .await?;
        });
        Ok(())
    }

    // ---- tenants ----------------------------------------------------------------------------

    // ---- api keys ---------------------------------------------------------------------------

    // ---- storage nodes ----------------------------------------------------------------------

    // ---- topology versions ------------------------------------------------------------------

    // ---- migrations -------------------------------------------------------------------------
}

fn corrupt(field: &str, value: &str) -> PersistenceError {
    PersistenceError::Corrupt(format!("{field} has the invalid value {value:?}"))
}

/// Stored counters are non-negative by construction; a negative one reads as 0.
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Values above `i64::MAX` (never produced by meta) are clamped rather than wrapped.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u32(value: i64, field: &str) -> Result<u32, PersistenceError> {
    u32::try_from(value).map_err(|_| corrupt(field, &value.to_string()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

mod nodes;
pub use nodes::HeartbeatRecorded;
mod routers;
mod rows;
mod tenants;
mod topology;
mod usage;

use rows::{ApiKeyRow, MigrationRow, NodeRow, TenantRow, TopologyRow, UsageShareRow};
