//! SQL of tenants and API keys (tables documented in the parent module).

use super::*;

/// Binds a tenant's settings, `replication_factor` through `strict_quorum`, in that order (both
/// statements that write a tenant name them so).
macro_rules! bind_settings {
    ($query:expr, $tenant:expr) => {
        $query
            .bind(i64::from($tenant.replication_factor))
            .bind(i64::from($tenant.previous_replication_factor.unwrap_or(0)))
            .bind($tenant.default_consistency.as_str())
            .bind($tenant.conflict_mode.as_str())
            .bind(i64::from($tenant.rate_limit_ops_per_sec))
            .bind(i64::from($tenant.rate_limit_burst))
            .bind(to_i64($tenant.max_value_bytes))
            .bind(i64::from($tenant.max_siblings))
            .bind($tenant.strict_quorum)
    };
}

impl Tx {
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
            let query = sqlx::query(
                "INSERT INTO tenants (tenant_id, replication_factor, previous_replication_factor, default_consistency, \
                 conflict_mode, rate_limit_ops_per_sec, rate_limit_burst, max_value_bytes, max_siblings, strict_quorum, \
                 created_at_ms, updated_at_ms, state, generation, purge_seq, key_groups, max_keys, max_bytes, \
                 over_key_quota, over_byte_quota, default_ttl_ms, max_ttl_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, \
                 $21, $22) \
                 ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(&tenant.tenant_id);
            bind_settings!(query, tenant)
            .bind(to_i64(tenant.created_at_ms))
            .bind(to_i64(tenant.updated_at_ms))
            .bind(tenant.state.as_str())
            .bind(to_i64(tenant.generation))
            .bind(to_i64(tenant.purge_seq))
            .bind(tenant.key_groups.as_str())
            .bind(to_i64(tenant.max_keys))
            .bind(to_i64(tenant.max_bytes))
            .bind(tenant.over_key_quota)
            .bind(tenant.over_byte_quota)
            .bind(to_i64(tenant.default_ttl_ms))
            .bind(to_i64(tenant.max_ttl_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Overwrites the settings of an existing tenant; `false` if it does not exist. `key_groups` is
    /// not among them (it is fixed when the row is inserted), nor are the over-quota flags (only the
    /// leader's evaluation writes them: [`Tx::set_quota_flags`]).
    pub async fn update_tenant(&mut self, tenant: &Tenant) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            let query = sqlx::query(
                "UPDATE tenants SET replication_factor = $2, previous_replication_factor = $3, default_consistency = $4, \
                 conflict_mode = $5, rate_limit_ops_per_sec = $6, rate_limit_burst = $7, max_value_bytes = $8, \
                 max_siblings = $9, strict_quorum = $10, updated_at_ms = $11, state = $12, purge_seq = $13, \
                 max_keys = $14, max_bytes = $15, default_ttl_ms = $16, max_ttl_ms = $17 WHERE tenant_id = $1",
            )
            .bind(&tenant.tenant_id);
            bind_settings!(query, tenant)
            .bind(to_i64(tenant.updated_at_ms))
            .bind(tenant.state.as_str())
            .bind(to_i64(tenant.purge_seq))
            .bind(to_i64(tenant.max_keys))
            .bind(to_i64(tenant.max_bytes))
            .bind(to_i64(tenant.default_ttl_ms))
            .bind(to_i64(tenant.max_ttl_ms))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Sets the tenant's over-quota flags (the leader's evaluation); `false` if it does not exist.
    pub async fn set_quota_flags(
        &mut self,
        tenant_id: &str,
        over_key_quota: bool,
        over_byte_quota: bool,
    ) -> Result<bool, PersistenceError> {
        let affected = on_conn!(self, c => {
            sqlx::query("UPDATE tenants SET over_key_quota = $2, over_byte_quota = $3 WHERE tenant_id = $1")
                .bind(tenant_id)
                .bind(over_key_quota)
                .bind(over_byte_quota)
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
}
