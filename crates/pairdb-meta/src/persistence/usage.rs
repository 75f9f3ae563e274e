//! SQL of tenant usage: the storage nodes' reported shares (schema version 4; tables documented in
//! the parent module).

use super::*;

impl Store {
    /// Replaces `node_id`'s usage shares with `shares` (one report: a tenant missing from it has no
    /// share on the node) in one transaction, outside the metadata lock: reports are frequent and no
    /// watch event. Returns `false`, writing nothing, for an unknown or removed node.
    pub async fn record_usage(
        &self,
        node_id: NodeId,
        shares: &[(String, Usage)],
        now_ms: u64,
    ) -> Result<bool, PersistenceError> {
        let node = i64::from(node_id.0);
        let now = to_i64(now_ms);
        let mut tx = self.begin(false).await?;
        // Stamping the node's row first also locks it (on PostgreSQL; SQLite has one writer), so two
        // reports of one node never interleave their replacements.
        let known = on_conn!(tx, c => {
            sqlx::query(
                "UPDATE storage_nodes SET usage_reported_at_ms = $2 WHERE node_id = $1 AND membership <> 'removed'",
            )
            .bind(node)
            .bind(now)
            .execute(&mut *c)
            .await?
            .rows_affected()
        }) == 1;
        if !known {
            return Ok(false);
        }
        on_conn!(tx, c => {
            sqlx::query("DELETE FROM tenant_usage WHERE node_id = $1").bind(node).execute(&mut *c).await?;
            // A zero share is the same as no row. A tenant named twice keeps its last share.
            for (tenant_id, usage) in shares.iter().filter(|(_, usage)| !usage.is_zero()) {
                sqlx::query(
                    "INSERT INTO tenant_usage (node_id, tenant_id, keys, value_bytes, siblings, tombstones, reported_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (node_id, tenant_id) DO UPDATE SET \
                     keys = excluded.keys, value_bytes = excluded.value_bytes, siblings = excluded.siblings, \
                     tombstones = excluded.tombstones, reported_at_ms = excluded.reported_at_ms",
                )
                .bind(node)
                .bind(tenant_id)
                .bind(to_i64(usage.keys))
                .bind(to_i64(usage.value_bytes))
                .bind(to_i64(usage.siblings))
                .bind(to_i64(usage.tombstones))
                .bind(now)
                .execute(&mut *c)
                .await?;
            }
        });
        tx.commit().await?;
        Ok(true)
    }
}

impl Tx {
    /// The stored shares of `tenant_id` (or of every tenant), by tenant and node.
    pub async fn usage_shares(
        &mut self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<UsageShare>, PersistenceError> {
        let rows: Vec<UsageShareRow> = on_conn!(self, c => {
            match tenant_id {
                Some(tenant_id) => {
                    sqlx::query_as("SELECT * FROM tenant_usage WHERE tenant_id = $1 ORDER BY node_id")
                        .bind(tenant_id)
                        .fetch_all(&mut *c)
                        .await?
                }
                None => {
                    sqlx::query_as("SELECT * FROM tenant_usage ORDER BY tenant_id, node_id").fetch_all(&mut *c).await?
                }
            }
        });
        rows.into_iter().map(UsageShare::try_from).collect()
    }

    /// When each node last reported its usage, by node id (nodes that never did are left out).
    pub async fn usage_reports(&mut self) -> Result<Vec<(NodeId, u64)>, PersistenceError> {
        let rows: Vec<(i64, i64)> = on_conn!(self, c => {
            sqlx::query_as(
                "SELECT node_id, usage_reported_at_ms FROM storage_nodes WHERE usage_reported_at_ms > 0 ORDER BY node_id",
            )
            .fetch_all(&mut *c)
            .await?
        });
        rows.into_iter()
            .map(|(node_id, at)| Ok((NodeId(to_u32(node_id, "storage_nodes.node_id")?), to_u64(at))))
            .collect()
    }

    /// Forgets every share of `tenant_id` (its deletion completed: no node holds any of it).
    pub async fn delete_usage_of_tenant(&mut self, tenant_id: &str) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query("DELETE FROM tenant_usage WHERE tenant_id = $1").bind(tenant_id).execute(&mut *c).await?;
        });
        Ok(())
    }
}
