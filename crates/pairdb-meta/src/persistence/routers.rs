//! SQL of routers' presence: the `routers` table and the published live-router count
//! (`meta_state.live_routers`) (schema version 5; tables documented in the parent module).

use super::*;

use crate::model::RouterPresence;

#[derive(sqlx::FromRow)]
struct RouterRow {
    router_id: String,
    address: String,
    last_seen_ms: i64,
}

impl From<RouterRow> for RouterPresence {
    fn from(row: RouterRow) -> Self {
        RouterPresence {
            router_id: row.router_id,
            address: row.address,
            last_seen_ms: to_u64(row.last_seen_ms),
        }
    }
}

impl Store {
    /// Records a router's heartbeat: one upsert, outside the metadata lock (heartbeats are frequent
    /// and publish nothing themselves; the leader's count does).
    pub async fn record_router(
        &self,
        router_id: &str,
        address: &str,
        now_ms: u64,
    ) -> Result<(), PersistenceError> {
        let sql = "INSERT INTO routers (router_id, address, last_seen_ms) VALUES ($1, $2, $3) \
                   ON CONFLICT (router_id) DO UPDATE SET address = excluded.address, last_seen_ms = excluded.last_seen_ms";
        on_pool!(self, pool => {
            sqlx::query(sql).bind(router_id).bind(address).bind(to_i64(now_ms)).execute(pool).await?;
        });
        Ok(())
    }

    /// Deletes the routers not seen since `before_ms`; returns how many.
    pub async fn prune_routers(&self, before_ms: u64) -> Result<u64, PersistenceError> {
        let pruned = on_pool!(self, pool => {
            sqlx::query("DELETE FROM routers WHERE last_seen_ms < $1")
                .bind(to_i64(before_ms))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(pruned)
    }
}

impl Tx {
    /// Every recorded router, by id.
    pub async fn list_routers(&mut self) -> Result<Vec<RouterPresence>, PersistenceError> {
        let rows: Vec<RouterRow> = on_conn!(self, c => {
            sqlx::query_as("SELECT router_id, address, last_seen_ms FROM routers ORDER BY router_id")
                .fetch_all(&mut *c)
                .await?
        });
        Ok(rows.into_iter().map(RouterPresence::from).collect())
    }

    /// How many routers were seen at or after `since_ms`.
    pub async fn count_routers_seen_since(&mut self, since_ms: u64) -> Result<u32, PersistenceError> {
        let count: i64 = on_conn!(self, c => {
            sqlx::query_scalar("SELECT COUNT(*) FROM routers WHERE last_seen_ms >= $1")
                .bind(to_i64(since_ms))
                .fetch_one(&mut *c)
                .await?
        });
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// Stores the published live-router count (leader only, with a change-log row: the caller records
    /// [`ChangeKind::LiveRouters`]).
    pub async fn set_live_routers(&mut self, count: u32) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query("UPDATE meta_state SET live_routers = $1 WHERE id = 1")
                .bind(i64::from(count))
                .execute(&mut *c)
                .await?;
        });
        Ok(())
    }
}
