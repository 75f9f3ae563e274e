//! SQL of context keys, tenant generations and tenant purges (schema version 2; tables documented
//! in the parent module).

use pairdb_core::ring::NodeId;

use super::{PersistenceError, Store, Tx, TxConn, corrupt, to_i64, to_u32, to_u64};

use crate::model::{ContextKeyRecord, ContextKeySet};

#[derive(sqlx::FromRow)]
struct ContextKeyRow {
    key_id: i64,
    secret: Vec<u8>,
    created_at_ms: i64,
}

impl TryFrom<ContextKeyRow> for ContextKeyRecord {
    type Error = PersistenceError;

    fn try_from(row: ContextKeyRow) -> Result<Self, Self::Error> {
        Ok(ContextKeyRecord {
            key_id: to_u32(row.key_id, "context_keys.key_id")?,
            secret: row.secret,
            created_at_ms: to_u64(row.created_at_ms),
        })
    }
}

impl Tx {
    /// The next value of the tenant counter (generations and purge sequences; never reused).
    pub async fn next_tenant_seq(&mut self) -> Result<u64, PersistenceError> {
        let next: Option<i64> = on_conn!(self, c => {
            sqlx::query_scalar(
                "UPDATE meta_state SET last_tenant_seq = last_tenant_seq + 1 WHERE id = 1 RETURNING last_tenant_seq",
            )
            .fetch_optional(&mut *c)
            .await?
        });
        next.map(to_u64).ok_or_else(|| PersistenceError::Corrupt("meta_state row missing".to_owned()))
    }

    /// The context keys in use (the newest unretired is current, the next previous).
    pub async fn context_keys(&mut self) -> Result<ContextKeySet, PersistenceError> {
        let rows: Vec<ContextKeyRow> = on_conn!(self, c => {
            sqlx::query_as(
                "SELECT key_id, secret, created_at_ms FROM context_keys WHERE retired_at_ms = 0 \
                 ORDER BY key_id DESC LIMIT 2",
            )
            .fetch_all(&mut *c)
            .await?
        });
        let mut keys = Vec::with_capacity(2);
        for row in rows {
            let record = ContextKeyRecord::try_from(row)?;
            check_secret(&record)?;
            keys.push(record);
        }
        let mut keys = keys.into_iter();
        Ok(ContextKeySet { current: keys.next(), previous: keys.next() })
    }

    /// Adds `secret` as the current context key (the key before it becomes previous, and the one
    /// before that is retired). Returns the new key.
    pub async fn rotate_context_key(
        &mut self,
        secret: &[u8],
        now_ms: u64,
    ) -> Result<ContextKeyRecord, PersistenceError> {
        let max: Option<i64> = on_conn!(self, c => {
            sqlx::query_scalar("SELECT MAX(key_id) FROM context_keys").fetch_one(&mut *c).await?
        });
        let key_id = max.unwrap_or(0) + 1;
        on_conn!(self, c => {
            sqlx::query("INSERT INTO context_keys (key_id, secret, created_at_ms, retired_at_ms) VALUES ($1, $2, $3, 0)")
                .bind(key_id)
                .bind(secret)
                .bind(to_i64(now_ms))
                .execute(&mut *c)
                .await?;
            // Keep the new key and the one before it; retire every older one.
            sqlx::query("UPDATE context_keys SET retired_at_ms = $2 WHERE retired_at_ms = 0 AND key_id < $1")
                .bind(key_id - 1)
                .bind(to_i64(now_ms.max(1)))
                .execute(&mut *c)
                .await?;
        });
        Ok(ContextKeyRecord {
            key_id: to_u32(key_id, "context_keys.key_id")?,
            secret: secret.to_vec(),
            created_at_ms: now_ms,
        })
    }

    /// Node ids that confirmed purging deletion `purge_seq` of `tenant_id`.
    pub async fn purge_confirmations(
        &mut self,
        tenant_id: &str,
        purge_seq: u64,
    ) -> Result<Vec<NodeId>, PersistenceError> {
        let ids: Vec<i64> = on_conn!(self, c => {
            sqlx::query_scalar(
                "SELECT node_id FROM tenant_purges WHERE tenant_id = $1 AND purge_seq = $2 ORDER BY node_id",
            )
            .bind(tenant_id)
            .bind(to_i64(purge_seq))
            .fetch_all(&mut *c)
            .await?
        });
        ids.into_iter().map(|id| to_u32(id, "tenant_purges.node_id").map(NodeId)).collect()
    }

    /// Forgets every purge confirmation of `tenant_id` (its deletion completed).
    pub async fn delete_purge_confirmations(&mut self, tenant_id: &str) -> Result<(), PersistenceError> {
        on_conn!(self, c => {
            sqlx::query("DELETE FROM tenant_purges WHERE tenant_id = $1").bind(tenant_id).execute(&mut *c).await?;
        });
        Ok(())
    }
}

impl Store {
    /// Creates the first context key (`secret`) if there is none, under the metadata lock so
    /// replicas starting together create one. Returns whether it created it.
    pub async fn ensure_context_key(&self, secret: &[u8], now_ms: u64) -> Result<bool, PersistenceError> {
        let mut tx = self.write().await?;
        tx.set_now(now_ms);
        if tx.context_keys().await?.current.is_some() {
            return Ok(false);
        }
        let key = tx.rotate_context_key(secret, now_ms).await?;
        tx.record_change(super::ChangeKind::ContextKeys, &key.key_id.to_string()).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records that `node_id` purged deletion `purge_seq` of `tenant_id`, if that deletion is the one
    /// under way (outside the metadata lock, like heartbeats: a confirmation is no watch event).
    pub async fn confirm_tenant_purge(
        &self,
        tenant_id: &str,
        purge_seq: u64,
        node_id: NodeId,
        now_ms: u64,
    ) -> Result<bool, PersistenceError> {
        let sql = "INSERT INTO tenant_purges (tenant_id, purge_seq, node_id, confirmed_at_ms) \
                   SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM tenants WHERE tenant_id = $1 \
                   AND state = 'deleting' AND purge_seq = $2) ON CONFLICT DO NOTHING";
        let mut tx = self.begin(false).await?;
        let affected = on_conn!(tx, c => {
            sqlx::query(sql)
                .bind(tenant_id)
                .bind(to_i64(purge_seq))
                .bind(i64::from(node_id.0))
                .bind(to_i64(now_ms))
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        tx.commit().await?;
        Ok(affected == 1)
    }
}

/// A context key secret read back must be usable.
fn check_secret(record: &ContextKeyRecord) -> Result<(), PersistenceError> {
    if record.secret.len() != pairdb_core::context::CONTEXT_SECRET_LEN {
        return Err(corrupt("context_keys.secret", &format!("{} bytes", record.secret.len())));
    }
    Ok(())
}
