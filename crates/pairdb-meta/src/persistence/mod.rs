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
//!   safe and assigns change revisions in commit order.
//! - `tenants`: replication factor, default consistency, conflict mode and limits of each tenant; its
//!   `state` (`active`, or `deleting` while storage nodes purge its data), its `generation` (which
//!   creation of the id it is) and, while deleting, the `purge_seq` nodes confirm. Generations and
//!   purge sequences come from `meta_state.last_tenant_seq`, so neither is ever reused.
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
//!   verdict (`alive`), the last heartbeat and the stats it carried. Removed nodes keep their row; a
//!   re-added node keeps the removed data directory's actor id in `retired_actor_id` so that stale
//!   directory cannot rejoin.
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
//! and pending topology, at one revision) into its [`crate::view::ClusterView`] and then follows the change log.
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
use pairdb_core::token::{PartitionCount, TOKEN_FORMAT_VERSION};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, PgPool, SqlitePool};
use tokio::sync::Notify;

use crate::model::{
    ApiKey, ConflictMode, ContextKeySet, Membership, Migration, MigrationKind, MigrationProgress,
    MigrationState, NodeStats, StorageNode, Tenant, TenantState, Topology,
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

    /// Records a heartbeat (liveness and stats) outside the write lock: heartbeats are frequent and
    /// produce no change. Returns the node's `alive` flag, or `None` for an unknown or removed node.
    pub async fn record_heartbeat(
        &self,
        node_id: u32,
        stats: &NodeStats,
        now_ms: u64,
    ) -> Result<Option<bool>, PersistenceError> {
        let sql = "UPDATE storage_nodes SET last_heartbeat_ms = $2, stats_keys = $3, stats_live_bytes = $4, \
                   stats_disk_free_bytes = $5, stats_hints_pending = $6, stats_write_path_poisoned = $7, \
                   stats_quarantined_records = $8 WHERE node_id = $1 AND membership <> 'removed' RETURNING alive";
        let alive: Option<bool> = match &self.inner.pool {
            Pool::Postgres(pool) => {
                sqlx::query_scalar(sql)
                    .bind(i64::from(node_id))
                    .bind(to_i64(now_ms))
                    .bind(to_i64(stats.keys))
                    .bind(to_i64(stats.live_bytes))
                    .bind(to_i64(stats.disk_free_bytes))
                    .bind(to_i64(stats.hints_pending))
                    .bind(stats.write_path_poisoned)
                    .bind(to_i64(stats.quarantined_records))
                    .fetch_optional(pool)
                    .await?
            }
            Pool::Sqlite(pool) => {
                sqlx::query_scalar(sql)
                    .bind(i64::from(node_id))
                    .bind(to_i64(now_ms))
                    .bind(to_i64(stats.keys))
                    .bind(to_i64(stats.live_bytes))
                    .bind(to_i64(stats.disk_free_bytes))
                    .bind(to_i64(stats.hints_pending))
                    .bind(stats.write_path_poisoned)
                    .bind(to_i64(stats.quarantined_records))
                    .fetch_optional(pool)
                    .await?
            }
        };
        Ok(alive)
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
}

#[derive(sqlx::FromRow)]
struct TenantRow {
    tenant_id: String,
    replication_factor: i64,
    previous_replication_factor: i64,
    default_consistency: String,
    conflict_mode: String,
    rate_limit_ops_per_sec: i64,
    rate_limit_burst: i64,
    max_value_bytes: i64,
    max_siblings: i64,
    strict_quorum: bool,
    created_at_ms: i64,
    updated_at_ms: i64,
    state: String,
    generation: i64,
    purge_seq: i64,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = PersistenceError;

    fn try_from(row: TenantRow) -> Result<Self, Self::Error> {
        let default_consistency = Consistency::parse(&row.default_consistency)
            .ok_or_else(|| corrupt("tenants.default_consistency", &row.default_consistency))?;
        let conflict_mode = ConflictMode::parse(&row.conflict_mode)
            .ok_or_else(|| corrupt("tenants.conflict_mode", &row.conflict_mode))?;
        let state = TenantState::parse(&row.state).ok_or_else(|| corrupt("tenants.state", &row.state))?;
        Ok(Tenant {
            state,
            generation: to_u64(row.generation),
            purge_seq: to_u64(row.purge_seq),
            replication_factor: to_u32(row.replication_factor, "tenants.replication_factor")?,
            // Stored as 0 for "none" (the column predates NULL-able settings).
            previous_replication_factor: Some(to_u32(
                row.previous_replication_factor,
                "tenants.previous_replication_factor",
            )?)
            .filter(|&n| n != 0),
            default_consistency,
            conflict_mode,
            rate_limit_ops_per_sec: to_u32(row.rate_limit_ops_per_sec, "tenants.rate_limit_ops_per_sec")?,
            rate_limit_burst: to_u32(row.rate_limit_burst, "tenants.rate_limit_burst")?,
            max_value_bytes: to_u64(row.max_value_bytes),
            max_siblings: to_u32(row.max_siblings, "tenants.max_siblings")?,
            strict_quorum: row.strict_quorum,
            created_at_ms: to_u64(row.created_at_ms),
            updated_at_ms: to_u64(row.updated_at_ms),
            tenant_id: row.tenant_id,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    key_id: String,
    tenant_id: String,
    secret_sha256: String,
    description: String,
    created_at_ms: i64,
    revoked_at_ms: i64,
}

impl From<ApiKeyRow> for ApiKey {
    fn from(row: ApiKeyRow) -> Self {
        ApiKey {
            key_id: row.key_id,
            tenant_id: row.tenant_id,
            secret_sha256: row.secret_sha256,
            description: row.description,
            created_at_ms: to_u64(row.created_at_ms),
            revoked_at_ms: to_u64(row.revoked_at_ms),
        }
    }
}

#[derive(sqlx::FromRow)]
struct NodeRow {
    node_id: i64,
    address: String,
    zone: String,
    weight: i64,
    membership: String,
    alive: bool,
    last_heartbeat_ms: i64,
    actor_id: i64,
    data_format_version: i64,
    stats_keys: i64,
    stats_live_bytes: i64,
    stats_disk_free_bytes: i64,
    stats_hints_pending: i64,
    stats_write_path_poisoned: bool,
    stats_quarantined_records: i64,
    retired_actor_id: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl TryFrom<NodeRow> for StorageNode {
    type Error = PersistenceError;

    fn try_from(row: NodeRow) -> Result<Self, Self::Error> {
        let membership = Membership::parse(&row.membership)
            .ok_or_else(|| corrupt("storage_nodes.membership", &row.membership))?;
        Ok(StorageNode {
            node_id: to_u32(row.node_id, "storage_nodes.node_id")?,
            address: row.address,
            zone: row.zone,
            weight: to_u32(row.weight, "storage_nodes.weight")?,
            membership,
            alive: row.alive,
            last_heartbeat_ms: to_u64(row.last_heartbeat_ms),
            actor_id: u64::from_be_bytes(row.actor_id.to_be_bytes()),
            retired_actor_id: u64::from_be_bytes(row.retired_actor_id.to_be_bytes()),
            data_format_version: to_u32(row.data_format_version, "storage_nodes.data_format_version")?,
            stats: NodeStats {
                keys: to_u64(row.stats_keys),
                live_bytes: to_u64(row.stats_live_bytes),
                disk_free_bytes: to_u64(row.stats_disk_free_bytes),
                hints_pending: to_u64(row.stats_hints_pending),
                write_path_poisoned: row.stats_write_path_poisoned,
                quarantined_records: to_u64(row.stats_quarantined_records),
            },
            created_at_ms: to_u64(row.created_at_ms),
            updated_at_ms: to_u64(row.updated_at_ms),
        })
    }
}

#[derive(sqlx::FromRow)]
struct TopologyRow {
    epoch: i64,
    partition_count: i64,
    token_format_version: i64,
    assignment: Vec<u8>,
}

impl TryFrom<TopologyRow> for Topology {
    type Error = PersistenceError;

    fn try_from(row: TopologyRow) -> Result<Self, Self::Error> {
        if row.token_format_version != i64::from(TOKEN_FORMAT_VERSION) {
            return Err(PersistenceError::Corrupt(format!(
                "topology {} uses token format {}, this build knows {TOKEN_FORMAT_VERSION}",
                row.epoch, row.token_format_version
            )));
        }
        let assignment = decode_assignment(&row.assignment)?;
        if i64::from(assignment.partition_count().get()) != row.partition_count {
            return Err(corrupt("topology_versions.partition_count", &row.partition_count.to_string()));
        }
        Ok(Topology { epoch: to_u64(row.epoch), assignment: Arc::new(assignment) })
    }
}

#[derive(sqlx::FromRow)]
struct MigrationRow {
    migration_id: String,
    seq: i64,
    kind: String,
    state: String,
    node_id: i64,
    tenant_id: String,
    old_value: i64,
    new_value: i64,
    from_epoch: i64,
    to_epoch: i64,
    partitions_total: i64,
    partitions_done: i64,
    keys_total: i64,
    keys_done: i64,
    bytes_done: i64,
    done_bitmap: Vec<u8>,
    error: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    started_at_ms: i64,
    finished_at_ms: i64,
}

impl TryFrom<MigrationRow> for Migration {
    type Error = PersistenceError;

    fn try_from(row: MigrationRow) -> Result<Self, Self::Error> {
        let kind = MigrationKind::parse(&row.kind).ok_or_else(|| corrupt("migrations.kind", &row.kind))?;
        let state =
            MigrationState::parse(&row.state).ok_or_else(|| corrupt("migrations.state", &row.state))?;
        Ok(Migration {
            migration_id: row.migration_id,
            seq: to_u64(row.seq),
            kind,
            state,
            node_id: to_u32(row.node_id, "migrations.node_id")?,
            tenant_id: row.tenant_id,
            old_value: to_u64(row.old_value),
            new_value: to_u64(row.new_value),
            from_epoch: to_u64(row.from_epoch),
            to_epoch: to_u64(row.to_epoch),
            progress: MigrationProgress {
                partitions_total: to_u64(row.partitions_total),
                partitions_done: to_u64(row.partitions_done),
                keys_total: to_u64(row.keys_total),
                keys_done: to_u64(row.keys_done),
                bytes_done: to_u64(row.bytes_done),
            },
            done_bitmap: row.done_bitmap,
            error: row.error,
            created_at_ms: to_u64(row.created_at_ms),
            updated_at_ms: to_u64(row.updated_at_ms),
            started_at_ms: to_u64(row.started_at_ms),
            finished_at_ms: to_u64(row.finished_at_ms),
        })
    }
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

    pub async fn get_tenant(&mut self, tenant_id: &str) -> Result<Option<Tenant>, PersistenceError> {
        let row: Option<TenantRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM tenants WHERE tenant_id = $1").bind(tenant_id).fetch_optional(&mut *c).await?
        });
        row.map(Tenant::try_from).transpose()
    }

    pub async fn list_tenants(&mut self) -> Result<Vec<Tenant>, PersistenceError> {
        let rows: Vec<TenantRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM tenants ORDER BY tenant_id").fetch_all(&mut *c).await?
        });
        rows.into_iter().map(Tenant::try_from).collect()
    }

    /// Inserts `tenant`; `false` if the id is taken.
    pub async fn insert_tenant(&mut self, tenant: &Tenant) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "INSERT INTO tenants (tenant_id, replication_factor, previous_replication_factor, default_consistency, \
                 conflict_mode, rate_limit_ops_per_sec, rate_limit_burst, max_value_bytes, max_siblings, strict_quorum, \
                 created_at_ms, updated_at_ms, state, generation, purge_seq) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(&tenant.tenant_id)
            .bind(i64::from(tenant.replication_factor))
            .bind(i64::from(tenant.previous_replication_factor.unwrap_or(0)))
            .bind(tenant.default_consistency.as_str())
            .bind(tenant.conflict_mode.as_str())
            .bind(i64::from(tenant.rate_limit_ops_per_sec))
            .bind(i64::from(tenant.rate_limit_burst))
            .bind(to_i64(tenant.max_value_bytes))
            .bind(i64::from(tenant.max_siblings))
            .bind(tenant.strict_quorum)
            .bind(to_i64(tenant.created_at_ms))
            .bind(to_i64(tenant.updated_at_ms))
            .bind(tenant.state.as_str())
            .bind(to_i64(tenant.generation))
            .bind(to_i64(tenant.purge_seq))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Overwrites the settings of an existing tenant; `false` if it does not exist.
    pub async fn update_tenant(&mut self, tenant: &Tenant) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE tenants SET replication_factor = $2, previous_replication_factor = $3, default_consistency = $4, \
                 conflict_mode = $5, rate_limit_ops_per_sec = $6, rate_limit_burst = $7, max_value_bytes = $8, \
                 max_siblings = $9, strict_quorum = $10, updated_at_ms = $11, state = $12, purge_seq = $13 \
                 WHERE tenant_id = $1",
            )
            .bind(&tenant.tenant_id)
            .bind(i64::from(tenant.replication_factor))
            .bind(i64::from(tenant.previous_replication_factor.unwrap_or(0)))
            .bind(tenant.default_consistency.as_str())
            .bind(tenant.conflict_mode.as_str())
            .bind(i64::from(tenant.rate_limit_ops_per_sec))
            .bind(i64::from(tenant.rate_limit_burst))
            .bind(to_i64(tenant.max_value_bytes))
            .bind(i64::from(tenant.max_siblings))
            .bind(tenant.strict_quorum)
            .bind(to_i64(tenant.updated_at_ms))
            .bind(tenant.state.as_str())
            .bind(to_i64(tenant.purge_seq))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// `false` if the tenant did not exist.
    pub async fn delete_tenant(&mut self, tenant_id: &str) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query("DELETE FROM tenants WHERE tenant_id = $1").bind(tenant_id).execute(&mut *c).await?.rows_affected()
        });
        Ok(affected == 1)
    }

    // ---- api keys ---------------------------------------------------------------------------

    /// Inserts `key`; `false` if the key id is taken.
    pub async fn insert_api_key(&mut self, key: &ApiKey) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "INSERT INTO api_keys (key_id, tenant_id, secret_sha256, description, created_at_ms, revoked_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_id) DO NOTHING",
            )
            .bind(&key.key_id)
            .bind(&key.tenant_id)
            .bind(&key.secret_sha256)
            .bind(&key.description)
            .bind(to_i64(key.created_at_ms))
            .bind(to_i64(key.revoked_at_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    pub async fn get_api_key(&mut self, key_id: &str) -> Result<Option<ApiKey>, PersistenceError> {
        let row: Option<ApiKeyRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM api_keys WHERE key_id = $1").bind(key_id).fetch_optional(&mut *c).await?
        });
        Ok(row.map(ApiKey::from))
    }

    /// Every key (revoked ones included) of `tenant_id`, or of every tenant.
    pub async fn list_api_keys(&mut self, tenant_id: Option<&str>) -> Result<Vec<ApiKey>, PersistenceError> {
        let rows: Vec<ApiKeyRow> = on_conn!(self, c => {
            match tenant_id {
                Some(tenant_id) => {
                    sqlx::query_as("SELECT * FROM api_keys WHERE tenant_id = $1 ORDER BY created_at_ms, key_id")
                        .bind(tenant_id)
                        .fetch_all(&mut *c)
                        .await?
                }
                None => sqlx::query_as("SELECT * FROM api_keys ORDER BY created_at_ms, key_id").fetch_all(&mut *c).await?,
            }
        });
        Ok(rows.into_iter().map(ApiKey::from).collect())
    }

    /// Marks a key revoked; `false` if it does not exist or was already revoked.
    pub async fn revoke_api_key(&mut self, key_id: &str, now_ms: u64) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query("UPDATE api_keys SET revoked_at_ms = $2 WHERE key_id = $1 AND revoked_at_ms = 0")
                .bind(key_id)
                .bind(to_i64(now_ms.max(1)))
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Deletes every key of `tenant_id`; returns the ids of those that were still active.
    pub async fn delete_api_keys_of_tenant(
        &mut self,
        tenant_id: &str,
    ) -> Result<Vec<String>, PersistenceError> {
        let active: Vec<String> = on_conn!(self, c => {
            sqlx::query_scalar("SELECT key_id FROM api_keys WHERE tenant_id = $1 AND revoked_at_ms = 0 ORDER BY key_id")
                .bind(tenant_id)
                .fetch_all(&mut *c)
                .await?
        });
        on_conn!(self, c => {
            sqlx::query("DELETE FROM api_keys WHERE tenant_id = $1").bind(tenant_id).execute(&mut *c).await?;
        });
        Ok(active)
    }

    // ---- storage nodes ----------------------------------------------------------------------

    pub async fn get_node(&mut self, node_id: u32) -> Result<Option<StorageNode>, PersistenceError> {
        let row: Option<NodeRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM storage_nodes WHERE node_id = $1")
                .bind(i64::from(node_id))
                .fetch_optional(&mut *c)
                .await?
        });
        row.map(StorageNode::try_from).transpose()
    }

    /// Every node, removed ones included, by id.
    pub async fn list_nodes(&mut self) -> Result<Vec<StorageNode>, PersistenceError> {
        let rows: Vec<NodeRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM storage_nodes ORDER BY node_id").fetch_all(&mut *c).await?
        });
        rows.into_iter().map(StorageNode::try_from).collect()
    }

    /// The highest node id ever used (0 if none).
    pub async fn max_node_id(&mut self) -> Result<u32, PersistenceError> {
        let max: Option<i64> = on_conn!(self, c => {
            sqlx::query_scalar("SELECT MAX(node_id) FROM storage_nodes").fetch_one(&mut *c).await?
        });
        to_u32(max.unwrap_or(0), "storage_nodes.node_id")
    }

    /// Inserts `node`, or replaces a row with the same id (used to re-add a removed node).
    pub async fn upsert_node(&mut self, node: &StorageNode) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query(
                "INSERT INTO storage_nodes (node_id, address, zone, weight, membership, alive, last_heartbeat_ms, actor_id, \
                 data_format_version, stats_keys, stats_live_bytes, stats_disk_free_bytes, stats_hints_pending, \
                 stats_write_path_poisoned, created_at_ms, updated_at_ms, stats_quarantined_records, retired_actor_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
                 ON CONFLICT (node_id) DO UPDATE SET address = excluded.address, zone = excluded.zone, \
                 weight = excluded.weight, membership = excluded.membership, alive = excluded.alive, \
                 last_heartbeat_ms = excluded.last_heartbeat_ms, actor_id = excluded.actor_id, \
                 data_format_version = excluded.data_format_version, stats_keys = excluded.stats_keys, \
                 stats_live_bytes = excluded.stats_live_bytes, stats_disk_free_bytes = excluded.stats_disk_free_bytes, \
                 stats_hints_pending = excluded.stats_hints_pending, \
                 stats_write_path_poisoned = excluded.stats_write_path_poisoned, created_at_ms = excluded.created_at_ms, \
                 updated_at_ms = excluded.updated_at_ms, stats_quarantined_records = excluded.stats_quarantined_records, \
                 retired_actor_id = excluded.retired_actor_id",
            )
            .bind(i64::from(node.node_id))
            .bind(&node.address)
            .bind(&node.zone)
            .bind(i64::from(node.weight))
            .bind(node.membership.as_str())
            .bind(node.alive)
            .bind(to_i64(node.last_heartbeat_ms))
            .bind(i64::from_be_bytes(node.actor_id.to_be_bytes()))
            .bind(i64::from(node.data_format_version))
            .bind(to_i64(node.stats.keys))
            .bind(to_i64(node.stats.live_bytes))
            .bind(to_i64(node.stats.disk_free_bytes))
            .bind(to_i64(node.stats.hints_pending))
            .bind(node.stats.write_path_poisoned)
            .bind(to_i64(node.created_at_ms))
            .bind(to_i64(node.updated_at_ms))
            .bind(to_i64(node.stats.quarantined_records))
            .bind(i64::from_be_bytes(node.retired_actor_id.to_be_bytes()))
            .execute(&mut *c)
            .await?;
        });
        Ok(())
    }

    /// Writes the configuration and lifecycle columns of an existing node. Heartbeat time and stats
    /// are left alone: they are written concurrently by [`Store::record_heartbeat`].
    pub async fn update_node(&mut self, node: &StorageNode) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE storage_nodes SET address = $2, zone = $3, weight = $4, membership = $5, alive = $6, \
                 actor_id = $7, data_format_version = $8, updated_at_ms = $9, retired_actor_id = $10 WHERE node_id = $1",
            )
            .bind(i64::from(node.node_id))
            .bind(&node.address)
            .bind(&node.zone)
            .bind(i64::from(node.weight))
            .bind(node.membership.as_str())
            .bind(node.alive)
            .bind(i64::from_be_bytes(node.actor_id.to_be_bytes()))
            .bind(i64::from(node.data_format_version))
            .bind(to_i64(node.updated_at_ms))
            .bind(i64::from_be_bytes(node.retired_actor_id.to_be_bytes()))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Marks the node dead if it is alive and its last heartbeat is older than `cutoff_ms` (checked
    /// in the statement itself, so a heartbeat that lands concurrently wins). `true` if marked.
    pub async fn mark_node_dead(
        &mut self,
        node_id: u32,
        cutoff_ms: u64,
        now_ms: u64,
    ) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE storage_nodes SET alive = FALSE, updated_at_ms = $3 \
                 WHERE node_id = $1 AND alive AND membership <> 'removed' AND last_heartbeat_ms < $2",
            )
            .bind(i64::from(node_id))
            .bind(to_i64(cutoff_ms))
            .bind(to_i64(now_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Marks the node alive; `true` if it was dead.
    pub async fn mark_node_alive(&mut self, node_id: u32, now_ms: u64) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE storage_nodes SET alive = TRUE, updated_at_ms = $2 \
                 WHERE node_id = $1 AND NOT alive AND membership <> 'removed'",
            )
            .bind(i64::from(node_id))
            .bind(to_i64(now_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    // ---- topology versions ------------------------------------------------------------------

    pub async fn insert_topology(&mut self, topology: &Topology) -> Result<(), PersistenceError> {
        let now_ms = to_i64(self.now_ms);
        let encoded = encode_assignment(&topology.assignment);
        on_conn!(self, c => {
            sqlx::query(
                "INSERT INTO topology_versions (epoch, partition_count, list_len, token_format_version, assignment, \
                 created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(to_i64(topology.epoch))
            .bind(i64::from(topology.assignment.partition_count().get()))
            .bind(to_i64(topology.assignment.list_len() as u64))
            .bind(i64::from(TOKEN_FORMAT_VERSION))
            .bind(&encoded)
            .bind(now_ms)
            .execute(&mut *c)
            .await?;
        });
        Ok(())
    }

    pub async fn get_topology(&mut self, epoch: u64) -> Result<Option<Topology>, PersistenceError> {
        let row: Option<TopologyRow> = on_conn!(self, c => {
            sqlx::query_as(
                "SELECT epoch, partition_count, token_format_version, assignment FROM topology_versions WHERE epoch = $1",
            )
            .bind(to_i64(epoch))
            .fetch_optional(&mut *c)
            .await?
        });
        row.map(Topology::try_from).transpose()
    }

    /// The topology `epoch`, which `meta_state` says exists.
    pub async fn require_topology(&mut self, epoch: u64) -> Result<Topology, PersistenceError> {
        self.get_topology(epoch)
            .await?
            .ok_or_else(|| PersistenceError::Corrupt(format!("topology version {epoch} is missing")))
    }

    /// The highest epoch ever written (0 if none); the next version is one above it.
    pub async fn max_epoch(&mut self) -> Result<u64, PersistenceError> {
        let max: Option<i64> = on_conn!(self, c => {
            sqlx::query_scalar("SELECT MAX(epoch) FROM topology_versions").fetch_one(&mut *c).await?
        });
        Ok(to_u64(max.unwrap_or(0)))
    }

    // ---- migrations -------------------------------------------------------------------------

    pub async fn insert_migration(&mut self, migration: &Migration) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query(
                "INSERT INTO migrations (migration_id, seq, kind, state, node_id, tenant_id, old_value, new_value, \
                 from_epoch, to_epoch, partitions_total, partitions_done, keys_total, keys_done, bytes_done, done_bitmap, \
                 error, created_at_ms, updated_at_ms, started_at_ms, finished_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
            )
            .bind(&migration.migration_id)
            .bind(to_i64(migration.seq))
            .bind(migration.kind.as_str())
            .bind(migration.state.as_str())
            .bind(i64::from(migration.node_id))
            .bind(&migration.tenant_id)
            .bind(to_i64(migration.old_value))
            .bind(to_i64(migration.new_value))
            .bind(to_i64(migration.from_epoch))
            .bind(to_i64(migration.to_epoch))
            .bind(to_i64(migration.progress.partitions_total))
            .bind(to_i64(migration.progress.partitions_done))
            .bind(to_i64(migration.progress.keys_total))
            .bind(to_i64(migration.progress.keys_done))
            .bind(to_i64(migration.progress.bytes_done))
            .bind(&migration.done_bitmap)
            .bind(&migration.error)
            .bind(to_i64(migration.created_at_ms))
            .bind(to_i64(migration.updated_at_ms))
            .bind(to_i64(migration.started_at_ms))
            .bind(to_i64(migration.finished_at_ms))
            .execute(&mut *c)
            .await?;
        });
        Ok(())
    }

    /// Writes every mutable column of an existing migration; `false` if it does not exist.
    pub async fn update_migration(&mut self, migration: &Migration) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE migrations SET state = $2, old_value = $3, new_value = $4, from_epoch = $5, to_epoch = $6, \
                 partitions_total = $7, partitions_done = $8, keys_total = $9, keys_done = $10, bytes_done = $11, \
                 done_bitmap = $12, error = $13, updated_at_ms = $14, started_at_ms = $15, finished_at_ms = $16 \
                 WHERE migration_id = $1",
            )
            .bind(&migration.migration_id)
            .bind(migration.state.as_str())
            .bind(to_i64(migration.old_value))
            .bind(to_i64(migration.new_value))
            .bind(to_i64(migration.from_epoch))
            .bind(to_i64(migration.to_epoch))
            .bind(to_i64(migration.progress.partitions_total))
            .bind(to_i64(migration.progress.partitions_done))
            .bind(to_i64(migration.progress.keys_total))
            .bind(to_i64(migration.progress.keys_done))
            .bind(to_i64(migration.progress.bytes_done))
            .bind(&migration.done_bitmap)
            .bind(&migration.error)
            .bind(to_i64(migration.updated_at_ms))
            .bind(to_i64(migration.started_at_ms))
            .bind(to_i64(migration.finished_at_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    pub async fn get_migration(&mut self, migration_id: &str) -> Result<Option<Migration>, PersistenceError> {
        let row: Option<MigrationRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM migrations WHERE migration_id = $1")
                .bind(migration_id)
                .fetch_optional(&mut *c)
                .await?
        });
        row.map(Migration::try_from).transpose()
    }

    /// Every migration, newest first.
    pub async fn list_migrations(&mut self) -> Result<Vec<Migration>, PersistenceError> {
        let rows: Vec<MigrationRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM migrations ORDER BY seq DESC").fetch_all(&mut *c).await?
        });
        rows.into_iter().map(Migration::try_from).collect()
    }

    /// Pending and running migrations in queue order.
    pub async fn unfinished_migrations(&mut self) -> Result<Vec<Migration>, PersistenceError> {
        let rows: Vec<MigrationRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM migrations WHERE state IN ('pending', 'running') ORDER BY seq")
                .fetch_all(&mut *c)
                .await?
        });
        rows.into_iter().map(Migration::try_from).collect()
    }
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

impl Tx {
    /// The queue position of a new migration: one above the highest ever used.
    pub async fn next_migration_seq(&mut self) -> Result<u64, PersistenceError> {
        let max: Option<i64> = on_conn!(self, c => {
            sqlx::query_scalar("SELECT MAX(seq) FROM migrations").fetch_one(&mut *c).await?
        });
        Ok(to_u64(max.unwrap_or(0)) + 1)
    }

    /// Records that the node was heard from (registration).
    pub async fn set_last_heartbeat(&mut self, node_id: u32, now_ms: u64) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query("UPDATE storage_nodes SET last_heartbeat_ms = $2 WHERE node_id = $1")
                .bind(i64::from(node_id))
                .bind(to_i64(now_ms))
                .execute(&mut *c)
                .await?;
        });
        Ok(())
    }
}
