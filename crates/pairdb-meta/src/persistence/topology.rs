//! SQL of topology versions and migrations.

use super::*;

/// Binds a migration's progress columns, `from_epoch` through `error`, in that order (both statements
/// that write a migration name them so).
macro_rules! bind_progress {
    ($query:expr, $migration:expr) => {
        $query
            .bind(to_i64($migration.from_epoch))
            .bind(to_i64($migration.to_epoch))
            .bind(to_i64($migration.progress.partitions_total))
            .bind(to_i64($migration.progress.partitions_done))
            .bind(to_i64($migration.progress.keys_total))
            .bind(to_i64($migration.progress.keys_done))
            .bind(to_i64($migration.progress.bytes_done))
            .bind(&$migration.done_bitmap)
            .bind(&$migration.error)
    };
}

impl Tx {
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

    pub async fn insert_migration(&mut self, migration: &Migration) -> Result<(), PersistenceError> {
        let row = migration.change.to_row();
        on_conn!(self, c => {
            let query = sqlx::query(
                "INSERT INTO migrations (migration_id, seq, kind, state, node_id, tenant_id, old_value, new_value, \
                 from_epoch, to_epoch, partitions_total, partitions_done, keys_total, keys_done, bytes_done, done_bitmap, \
                 error, created_at_ms, updated_at_ms, started_at_ms, finished_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
            )
            .bind(&migration.migration_id)
            .bind(to_i64(migration.seq))
            .bind(row.kind.as_str())
            .bind(migration.state.as_str())
            .bind(i64::from(row.node_id))
            .bind(row.tenant_id)
            .bind(to_i64(row.old_value))
            .bind(to_i64(row.new_value));
            bind_progress!(query, migration)
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
        let row = migration.change.to_row();
        let affected = on_conn!(self, c => {
            let query = sqlx::query(
                "UPDATE migrations SET state = $2, old_value = $3, new_value = $4, from_epoch = $5, to_epoch = $6, \
                 partitions_total = $7, partitions_done = $8, keys_total = $9, keys_done = $10, bytes_done = $11, \
                 done_bitmap = $12, error = $13, updated_at_ms = $14, started_at_ms = $15, finished_at_ms = $16 \
                 WHERE migration_id = $1",
            )
            .bind(&migration.migration_id)
            .bind(migration.state.as_str())
            .bind(to_i64(row.old_value))
            .bind(to_i64(row.new_value));
            bind_progress!(query, migration)
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

    /// The queue position of a new migration: one above the highest ever used.
    pub async fn next_migration_seq(&mut self) -> Result<u64, PersistenceError> {
        let max: Option<i64> = on_conn!(self, c => {
            sqlx::query_scalar("SELECT MAX(seq) FROM migrations").fetch_one(&mut *c).await?
        });
        Ok(to_u64(max.unwrap_or(0)) + 1)
    }
}
