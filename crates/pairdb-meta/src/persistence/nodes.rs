//! SQL of storage nodes: registration, lifecycle and the failure detector's verdict.

use super::*;

impl Store {
    /// Records a heartbeat (liveness, stats and the revision of the view the node's last complete
    /// unowned-data deletion ran from, which only grows; a revision past the last committed one is
    /// ignored, so no report can cover marks yet to come) outside the write lock: heartbeats are
    /// frequent and produce no change. `None` for an unknown or removed node.
    pub async fn record_heartbeat(
        &self,
        node_id: NodeId,
        stats: &NodeStats,
        unowned_cleanup_revision: u64,
        now_ms: u64,
    ) -> Result<Option<HeartbeatRecorded>, PersistenceError> {
        let sql = "UPDATE storage_nodes SET last_heartbeat_ms = $2, stats_keys = $3, stats_live_bytes = $4, \
                   stats_disk_free_bytes = $5, stats_hints_pending = $6, stats_write_path_poisoned = $7, \
                   stats_quarantined_records = $8, stats_clock_offset_ms = $9, stats_clock_offset_known = $10, \
                   stats_live_value_bytes = $11, leftovers_cleaned_revision = CASE \
                   WHEN $12 > leftovers_cleaned_revision AND $12 <= (SELECT revision FROM meta_state) THEN $12 \
                   ELSE leftovers_cleaned_revision END \
                   WHERE node_id = $1 AND membership <> 'removed' \
                   RETURNING alive, leftovers_since_revision, leftovers_cleaned_revision";
        let row: Option<(bool, i64, i64)> = on_pool!(self, pool => {
            sqlx::query_as(sql)
                .bind(i64::from(node_id.0))
                .bind(to_i64(now_ms))
                .bind(to_i64(stats.keys))
                .bind(to_i64(stats.disk_bytes))
                .bind(to_i64(stats.disk_free_bytes))
                .bind(to_i64(stats.hints_pending))
                .bind(stats.write_path_poisoned)
                .bind(to_i64(stats.quarantined_records))
                .bind(stats.clock_offset_ms.unwrap_or(0))
                .bind(stats.clock_offset_ms.is_some())
                .bind(to_i64(stats.live_value_bytes))
                .bind(to_i64(unowned_cleanup_revision))
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(alive, since, cleaned)| HeartbeatRecorded {
            alive,
            leftovers_cleaned: since != 0 && to_u64(since) <= to_u64(cleaned),
        }))
    }
}

/// What [`Store::record_heartbeat`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRecorded {
    /// The failure detector's last verdict (false: the node was marked down).
    pub alive: bool,
    /// The node's leftovers mark is covered by its cleanup reports and can be cleared
    /// ([`Tx::clear_leftovers`]).
    pub leftovers_cleaned: bool,
}

impl Tx {
    /// Marks `nodes` as holding records they no longer own from `revision` on (the last revision of
    /// the change that took the data from them; their view must be at least that recent when they
    /// report a cleanup). Their `Node` changes are the caller's to record.
    pub async fn mark_leftovers(&mut self, nodes: &[NodeId], revision: u64) -> Result<(), PersistenceError> {
        for node in nodes {
            on_conn!(self, c => {
                sqlx::query("UPDATE storage_nodes SET leftovers_since_revision = $2 WHERE node_id = $1")
                    .bind(i64::from(node.0))
                    .bind(to_i64(revision))
                    .execute(&mut *c)
                    .await?;
            });
        }
        Ok(())
    }

    /// Clears `node`'s leftovers mark if a cleanup report covers it; `true` if it did (the caller
    /// records a `Node` change so views stop holding tombstone GC for it).
    pub async fn clear_leftovers(&mut self, node: NodeId) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE storage_nodes SET leftovers_since_revision = 0 WHERE node_id = $1 \
                 AND leftovers_since_revision <> 0 AND leftovers_since_revision <= leftovers_cleaned_revision",
            )
            .bind(i64::from(node.0))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected > 0)
    }
}

impl Tx {
    pub async fn get_node(&mut self, node_id: NodeId) -> Result<Option<StorageNode>, PersistenceError> {
        let row: Option<NodeRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT * FROM storage_nodes WHERE node_id = $1")
                .bind(i64::from(node_id.0))
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
                 stats_write_path_poisoned, created_at_ms, updated_at_ms, stats_quarantined_records, retired_actor_id, \
                 stats_clock_offset_ms, stats_clock_offset_known, stats_live_value_bytes, \
                 leftovers_since_revision, leftovers_cleaned_revision) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, \
                 $22, $23) \
                 ON CONFLICT (node_id) DO UPDATE SET address = excluded.address, zone = excluded.zone, \
                 weight = excluded.weight, membership = excluded.membership, alive = excluded.alive, \
                 last_heartbeat_ms = excluded.last_heartbeat_ms, actor_id = excluded.actor_id, \
                 data_format_version = excluded.data_format_version, stats_keys = excluded.stats_keys, \
                 stats_live_bytes = excluded.stats_live_bytes, stats_disk_free_bytes = excluded.stats_disk_free_bytes, \
                 stats_hints_pending = excluded.stats_hints_pending, \
                 stats_write_path_poisoned = excluded.stats_write_path_poisoned, created_at_ms = excluded.created_at_ms, \
                 updated_at_ms = excluded.updated_at_ms, stats_quarantined_records = excluded.stats_quarantined_records, \
                 retired_actor_id = excluded.retired_actor_id, stats_clock_offset_ms = excluded.stats_clock_offset_ms, \
                 stats_clock_offset_known = excluded.stats_clock_offset_known, \
                 stats_live_value_bytes = excluded.stats_live_value_bytes, \
                 leftovers_since_revision = excluded.leftovers_since_revision, \
                 leftovers_cleaned_revision = excluded.leftovers_cleaned_revision",
            )
            .bind(i64::from(node.node_id.0))
            .bind(&node.address)
            .bind(&node.zone)
            .bind(i64::from(node.weight))
            .bind(node.membership.as_str())
            .bind(node.alive)
            .bind(to_i64(node.last_heartbeat_ms))
            .bind(i64::from_be_bytes(node.actor_id.to_be_bytes()))
            .bind(i64::from(node.data_format_version))
            .bind(to_i64(node.stats.keys))
            .bind(to_i64(node.stats.disk_bytes))
            .bind(to_i64(node.stats.disk_free_bytes))
            .bind(to_i64(node.stats.hints_pending))
            .bind(node.stats.write_path_poisoned)
            .bind(to_i64(node.created_at_ms))
            .bind(to_i64(node.updated_at_ms))
            .bind(to_i64(node.stats.quarantined_records))
            .bind(i64::from_be_bytes(node.retired_actor_id.to_be_bytes()))
            .bind(node.stats.clock_offset_ms.unwrap_or(0))
            .bind(node.stats.clock_offset_ms.is_some())
            .bind(to_i64(node.stats.live_value_bytes))
            .bind(to_i64(node.leftovers_since_revision))
            .bind(to_i64(node.leftovers_cleaned_revision))
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
            .bind(i64::from(node.node_id.0))
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
        node_id: NodeId,
        cutoff_ms: u64,
        now_ms: u64,
    ) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE storage_nodes SET alive = FALSE, updated_at_ms = $3 \
                 WHERE node_id = $1 AND alive AND membership <> 'removed' AND last_heartbeat_ms < $2",
            )
            .bind(i64::from(node_id.0))
            .bind(to_i64(cutoff_ms))
            .bind(to_i64(now_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Marks the node alive; `true` if it was dead.
    pub async fn mark_node_alive(&mut self, node_id: NodeId, now_ms: u64) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query(
                "UPDATE storage_nodes SET alive = TRUE, updated_at_ms = $2 \
                 WHERE node_id = $1 AND NOT alive AND membership <> 'removed'",
            )
            .bind(i64::from(node_id.0))
            .bind(to_i64(now_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Records that the node was heard from (registration).
    pub async fn set_last_heartbeat(&mut self, node_id: NodeId, now_ms: u64) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query("UPDATE storage_nodes SET last_heartbeat_ms = $2 WHERE node_id = $1")
                .bind(i64::from(node_id.0))
                .bind(to_i64(now_ms))
                .execute(&mut *c)
                .await?;
        });
        Ok(())
    }
}
