//! Tenants and their API keys.

use super::*;

impl Meta {
    pub async fn create_tenant(&self, request: NewTenant) -> Result<Tenant, MetaError> {
        validation::validate_tenant_id(&request.tenant_id)
            .map_err(|_| MetaError::InvalidTenantId(request.tenant_id.clone()))?;
        let replication_factor = match request.replication_factor {
            0 => DEFAULT_REPLICATION_FACTOR as u32,
            n => n,
        };
        check_replication_factor_range(replication_factor)?;
        let max_value_bytes = match request.max_value_bytes {
            0 => DEFAULT_MAX_VALUE_BYTES,
            bytes => bytes,
        };
        let max_siblings = match request.max_siblings {
            0 => DEFAULT_MAX_SIBLINGS as u32,
            siblings => siblings,
        };
        let (mut tx, now) = self.write().await?;
        if let Some(existing) = tx.get_tenant(&request.tenant_id).await? {
            return Err(match existing.state {
                TenantState::Active => MetaError::TenantExists(existing.tenant_id),
                TenantState::Deleting => crate::deletion::being_deleted(&mut tx, &existing).await?,
            });
        }
        let generation = tx.next_tenant_seq().await?;
        let mut tenant = Tenant {
            state: TenantState::Active,
            generation,
            purge_seq: 0,
            tenant_id: request.tenant_id,
            replication_factor,
            previous_replication_factor: None,
            default_consistency: request.default_consistency.unwrap_or(Consistency::Quorum),
            conflict_mode: request.conflict_mode.unwrap_or_default(),
            key_groups: request.key_groups.unwrap_or_default(),
            rate_limit_ops_per_sec: request.rate_limit_ops_per_sec,
            rate_limit_burst: request.rate_limit_burst,
            max_value_bytes,
            max_siblings,
            strict_quorum: request.strict_quorum,
            max_keys: request.max_keys,
            max_bytes: request.max_bytes,
            over_key_quota: false,
            over_byte_quota: false,
            default_ttl_ms: request.default_ttl_ms,
            max_ttl_ms: request.max_ttl_ms,
            created_at_ms: now,
            updated_at_ms: now,
        };
        normalize_limits(&mut tenant)?;
        check_replication_factor_fits(&mut tx, replication_factor).await?;
        if !tx.insert_tenant(&tenant).await? {
            return Err(MetaError::TenantExists(tenant.tenant_id));
        }
        tx.record_change(ChangeKind::Tenant, &tenant.tenant_id).await?;
        tx.commit().await?;
        tracing::info!(
            tenant = %tenant.tenant_id,
            n = tenant.replication_factor,
            key_groups = tenant.key_groups.as_str(),
            max_keys = tenant.max_keys,
            max_bytes = tenant.max_bytes,
            default_ttl_ms = tenant.default_ttl_ms,
            max_ttl_ms = tenant.max_ttl_ms,
            "tenant created"
        );
        if tenant.max_keys != 0 || tenant.max_bytes != 0 {
            self.inner.quota_wake.notify_one();
        }
        Ok(tenant)
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> Result<Tenant, MetaError> {
        validation::validate_tenant_id(tenant_id)
            .map_err(|_| MetaError::InvalidTenantId(tenant_id.to_owned()))?;
        let mut tx = self.read().await?;
        let tenant = tx.get_tenant(tenant_id).await?;
        tx.commit().await?;
        tenant.ok_or_else(|| MetaError::TenantNotFound(tenant_id.to_owned()))
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, MetaError> {
        let mut tx = self.read().await?;
        let tenants = tx.list_tenants().await?;
        tx.commit().await?;
        Ok(tenants)
    }

    /// Applies `patch`. A new replication factor queues a `replication_factor` migration, whose id
    /// is returned; until it completes the tenant's `previous_replication_factor` is the old N.
    pub async fn update_tenant(
        &self,
        tenant_id: &str,
        patch: TenantPatch,
    ) -> Result<(Tenant, Option<String>), MetaError> {
        validation::validate_tenant_id(tenant_id)
            .map_err(|_| MetaError::InvalidTenantId(tenant_id.to_owned()))?;
        let (mut tx, now) = self.write().await?;
        let mut tenant = tx
            .get_tenant(tenant_id)
            .await?
            .filter(|t| t.state == TenantState::Active)
            .ok_or_else(|| MetaError::TenantNotFound(tenant_id.to_owned()))?;
        let mut migration = None;
        if let Some(n) = patch.replication_factor
            && n != tenant.replication_factor
        {
            check_replication_factor_range(n)?;
            if tenant.previous_replication_factor.is_some() {
                let running = tx
                    .unfinished_migrations()
                    .await?
                    .into_iter()
                    .find(|m| m.change.tenant_id() == Some(tenant_id));
                return Err(MetaError::MigrationInProgress {
                    migration_id: running.map(|m| m.migration_id).unwrap_or_default(),
                    what: format!("tenant {tenant_id:?} is already changing its replication factor"),
                });
            }
            check_replication_factor_fits(&mut tx, n).await?;
            let change = MigrationChange::ReplicationFactor {
                tenant_id: tenant_id.to_owned(),
                from: tenant.replication_factor,
                to: n,
            };
            let queued = new_migration(&mut tx, change, now).await?;
            tenant.previous_replication_factor = Some(tenant.replication_factor);
            tenant.replication_factor = n;
            migration = Some(queued);
        }
        if let Some(consistency) = patch.default_consistency {
            tenant.default_consistency = consistency;
        }
        if let Some(mode) = patch.conflict_mode {
            tenant.conflict_mode = mode;
        }
        if let Some(ops) = patch.rate_limit_ops_per_sec {
            tenant.rate_limit_ops_per_sec = ops;
            if patch.rate_limit_burst.is_none() {
                // Keep the burst consistent with a new rate unless it is set explicitly.
                tenant.rate_limit_burst = 0;
            }
        }
        if let Some(burst) = patch.rate_limit_burst {
            tenant.rate_limit_burst = burst;
        }
        if let Some(bytes) = patch.max_value_bytes {
            tenant.max_value_bytes = bytes;
        }
        if let Some(siblings) = patch.max_siblings {
            tenant.max_siblings = siblings;
        }
        if let Some(strict) = patch.strict_quorum {
            tenant.strict_quorum = strict;
        }
        let quotas_before = (tenant.max_keys, tenant.max_bytes);
        if let Some(keys) = patch.max_keys {
            tenant.max_keys = keys;
        }
        if let Some(bytes) = patch.max_bytes {
            tenant.max_bytes = bytes;
        }
        let quotas_changed = (tenant.max_keys, tenant.max_bytes) != quotas_before;
        let ttls_before = (tenant.default_ttl_ms, tenant.max_ttl_ms);
        if let Some(ttl) = patch.default_ttl_ms {
            tenant.default_ttl_ms = ttl;
        }
        if let Some(ttl) = patch.max_ttl_ms {
            tenant.max_ttl_ms = ttl;
        }
        let ttls_changed = (tenant.default_ttl_ms, tenant.max_ttl_ms) != ttls_before;
        normalize_limits(&mut tenant)?;
        tenant.updated_at_ms = now;
        tx.update_tenant(&tenant).await?;
        tx.record_change(ChangeKind::Tenant, tenant_id).await?;
        if let Some(migration) = &migration {
            tx.insert_migration(migration).await?;
        }
        tx.commit().await?;
        if quotas_changed {
            tracing::info!(
                tenant = tenant_id,
                max_keys = tenant.max_keys,
                max_bytes = tenant.max_bytes,
                "tenant quotas changed"
            );
            // The flags follow at the leader's next evaluation, which this brings forward.
            self.inner.quota_wake.notify_one();
        }
        if ttls_changed {
            tracing::info!(
                tenant = tenant_id,
                default_ttl_ms = tenant.default_ttl_ms,
                max_ttl_ms = tenant.max_ttl_ms,
                "tenant expiry settings changed"
            );
        }
        let migration_id = migration.map(|m| {
            tracing::info!(
                tenant = tenant_id,
                from = tenant.previous_replication_factor.unwrap_or(tenant.replication_factor),
                to = tenant.replication_factor,
                migration = %m.migration_id,
                "replication factor change queued"
            );
            self.inner.orchestrator_wake.notify_one();
            m.migration_id
        });
        Ok((tenant, migration_id))
    }

    /// Creates a key for `tenant_id`. Returns the key and its secret, which exists only in this
    /// return value: the database keeps its SHA-256.
    pub async fn create_api_key(
        &self,
        tenant_id: &str,
        description: &str,
    ) -> Result<(ApiKey, String), MetaError> {
        validation::validate_tenant_id(tenant_id)
            .map_err(|_| MetaError::InvalidTenantId(tenant_id.to_owned()))?;
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(MetaError::InvalidArgument(format!(
                "description is longer than {MAX_DESCRIPTION_CHARS} characters"
            )));
        }
        let (key_id, secret) = generate_secret();
        let (mut tx, now) = self.write().await?;
        if !tx.get_tenant(tenant_id).await?.is_some_and(|t| t.state == TenantState::Active) {
            return Err(MetaError::TenantNotFound(tenant_id.to_owned()));
        }
        let key = ApiKey {
            key_id,
            tenant_id: tenant_id.to_owned(),
            secret_sha256: secret_sha256(&secret),
            description: description.to_owned(),
            created_at_ms: now,
            revoked_at_ms: 0,
        };
        if !tx.insert_api_key(&key).await? {
            return Err(MetaError::Internal("generated api key id collided; retry".to_owned()));
        }
        tx.record_change(ChangeKind::ApiKeyAdded, &key.key_id).await?;
        tx.commit().await?;
        tracing::info!(tenant = tenant_id, key_id = %key.key_id, "api key created");
        Ok((key, secret))
    }

    /// Keys of `tenant_id` (or of every tenant), revoked ones included.
    pub async fn list_api_keys(&self, tenant_id: Option<&str>) -> Result<Vec<ApiKey>, MetaError> {
        let mut tx = self.read().await?;
        if let Some(tenant_id) = tenant_id
            && tx.get_tenant(tenant_id).await?.is_none()
        {
            return Err(MetaError::TenantNotFound(tenant_id.to_owned()));
        }
        let keys = tx.list_api_keys(tenant_id).await?;
        tx.commit().await?;
        Ok(keys)
    }

    /// Revokes a key (idempotent for an already revoked key).
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<ApiKey, MetaError> {
        let (mut tx, now) = self.write().await?;
        if tx.get_api_key(key_id).await?.is_none() {
            return Err(MetaError::ApiKeyNotFound(key_id.to_owned()));
        }
        if tx.revoke_api_key(key_id, now).await? {
            tx.record_change(ChangeKind::ApiKeyRevoked, key_id).await?;
        }
        let key =
            tx.get_api_key(key_id).await?.ok_or_else(|| MetaError::ApiKeyNotFound(key_id.to_owned()))?;
        tx.commit().await?;
        tracing::info!(key_id, tenant = %key.tenant_id, "api key revoked");
        Ok(key)
    }
}
