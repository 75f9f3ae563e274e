//! The secrets meta hands out: cluster credentials (signed with the key derived from the cluster
//! secret, `pairdb_service::cluster_auth`) and the context keys routers seal client contexts with.
//!
//! Context keys live in the database (every meta replica and every restart sees the same ones) and
//! reach routers only, in the watch stream. A rotation adds a new current key; the previous one keeps
//! opening contexts until the next rotation retires it.

use pairdb_service::cluster_auth::{Credential, Principal};

use crate::admin::Meta;
use crate::error::MetaError;
use crate::persistence::ChangeKind;

/// The context keys in use after a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextKeyStatus {
    pub current_key_id: u32,
    /// 0 = none.
    pub previous_key_id: u32,
    pub rotated_at_ms: u64,
}

fn new_secret() -> Vec<u8> {
    rand::random::<[u8; pairdb_core::context::CONTEXT_SECRET_LEN]>().to_vec()
}

impl Meta {
    /// Makes a new current context key (see the module docs).
    pub async fn rotate_context_key(&self) -> Result<ContextKeyStatus, MetaError> {
        let (mut tx, now) = self.write().await?;
        let key = tx.rotate_context_key(&new_secret(), now).await?;
        tx.record_change(ChangeKind::ContextKeys, &key.key_id.to_string()).await?;
        let keys = tx.context_keys().await?;
        tx.commit().await?;
        let status = ContextKeyStatus {
            current_key_id: key.key_id,
            previous_key_id: keys.previous.map_or(0, |k| k.key_id),
            rotated_at_ms: now,
        };
        tracing::info!(
            current = status.current_key_id,
            previous = status.previous_key_id,
            "context key rotated"
        );
        Ok(status)
    }

    /// The cluster credential of `principal`. An insecure cluster issues none.
    pub fn issue_credential(&self, principal: Principal) -> Result<Credential, MetaError> {
        let signer = self.settings().signer.as_ref().ok_or_else(|| {
            MetaError::InvalidArgument(
                "this cluster runs with --insecure-cluster: there are no cluster credentials".to_owned(),
            )
        })?;
        Ok(signer.issue(principal))
    }
}
