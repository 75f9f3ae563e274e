//! The metadata service's operations: tenants, API keys, storage nodes, migrations, and the storage
//! nodes' registration and heartbeats. Both API edges (gRPC and HTTP/JSON) call these.
//!
//! Every mutation is one write transaction ([`Store::write`]), which holds the cluster-wide metadata
//! lock: the checks (does the tenant exist, would N exceed the active nodes, would removing this node
//! leave fewer nodes than the highest N) and the writes they guard are atomic across replicas. Each
//! mutation records its changes in the change log in the same transaction, so the watch stream
//! publishes exactly what was committed.
//!
//! # How storage nodes join
//!
//! An operator adds a node with `AddStorageNode` (id, address, zone, weight): the record is created
//! `joining` and an `add_node` migration queued; the node enters the ring when the migration
//! completes. The storage process then calls `RegisterNode` with its id: meta records its address,
//! actor id and liveness. A registration for an unknown id fails with NODE_NOT_FOUND unless meta runs
//! with `--auto-add-nodes` (dev mode), in which case it is treated like an `AddStorageNode` with the
//! registration's address, zone and weight. Zone and weight of a known node change only through the
//! admin API (they move data); a registration updates address, actor id and liveness only.
//!
//! **Bootstrap**: while the cluster has no topology at all, adding a node computes the first topology
//! version directly (no migration: there is no data to move) and the node becomes `active` at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use pairdb_core::quorum::Consistency;
use pairdb_core::ring::{Assignment, NodeSpec};
use pairdb_core::token::PartitionCount;
use pairdb_core::validation::{
    self, DEFAULT_MAX_SIBLINGS, DEFAULT_MAX_VALUE_BYTES, DEFAULT_REPLICATION_FACTOR, MAX_REPLICATION_FACTOR,
};
use pairdb_proto::storage::v1 as storage_pb;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::error::MetaError;
use crate::model::{
    ApiKey, ConflictMode, Membership, Migration, MigrationKind, MigrationProgress, MigrationState,
    NodeRebuild, NodeStats, StorageNode, Tenant, TenantState, Topology,
};
use crate::persistence::{ChangeKind, MetaState, Store, Tx, hex};
use crate::view::ClusterView;

/// Largest node weight.
pub const MAX_NODE_WEIGHT: u32 = 1000;
const MAX_DESCRIPTION_CHARS: usize = 256;
const MAX_ZONE_CHARS: usize = 64;
const MAX_ADDRESS_CHARS: usize = 255;

/// Settings of the operations (from the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    pub auto_add_nodes: bool,
    pub heartbeat_interval_ms: u32,
    pub node_down_after_ms: u64,
    /// Partitions a migration moves concurrently (at least 1).
    pub migration_parallelism: usize,
    /// How meta reaches storage nodes (migrations, rebuilds): TLS and meta's cluster credential.
    pub storage_clients: pairdb_service::clients::InternalClients,
    /// Signs cluster credentials; `None` when the cluster runs with `--insecure-cluster`.
    pub signer: Option<Arc<pairdb_service::cluster_auth::Signer>>,
}

/// A tenant to create. Zero / `None` fields take the defaults.
#[derive(Debug, Clone, Default)]
pub struct NewTenant {
    pub tenant_id: String,
    pub replication_factor: u32,
    pub default_consistency: Option<Consistency>,
    pub conflict_mode: Option<ConflictMode>,
    pub rate_limit_ops_per_sec: u32,
    pub rate_limit_burst: u32,
    pub max_value_bytes: u64,
    pub max_siblings: u32,
    pub strict_quorum: bool,
}

/// Changes to a tenant; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct TenantPatch {
    pub replication_factor: Option<u32>,
    pub default_consistency: Option<Consistency>,
    pub conflict_mode: Option<ConflictMode>,
    pub rate_limit_ops_per_sec: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    pub max_value_bytes: Option<u64>,
    pub max_siblings: Option<u32>,
    pub strict_quorum: Option<bool>,
}

/// A node to add. `node_id` 0 picks the next free id; `weight` 0 means 1.
#[derive(Debug, Clone, Default)]
pub struct NewNode {
    pub node_id: u32,
    pub address: String,
    pub zone: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Default)]
pub struct NodePatch {
    pub weight: Option<u32>,
    pub zone: Option<String>,
}

/// A node with whether the current topology places data on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub node: StorageNode,
    pub in_ring: bool,
}

/// A storage process announcing itself.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub node_id: u32,
    pub address: String,
    pub zone: String,
    pub weight: u32,
    pub actor_id: u64,
    pub data_format_version: u32,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    view: Arc<ClusterView>,
    settings: Settings,
    partitions: OnceLock<PartitionCount>,
    initialized: AtomicBool,
    orchestrator_wake: Notify,
}

/// The metadata service's operations (cheap to clone).
#[derive(Debug, Clone)]
pub struct Meta {
    inner: Arc<Inner>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Meta {
    pub fn new(store: Store, view: Arc<ClusterView>, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                view,
                settings,
                partitions: OnceLock::new(),
                initialized: AtomicBool::new(false),
                orchestrator_wake: Notify::new(),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn view(&self) -> &Arc<ClusterView> {
        &self.inner.view
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Records that the database is migrated and the cluster exists.
    pub fn mark_initialized(&self, state: &MetaState) {
        let _ = self.inner.partitions.set(state.partition_count);
        self.inner.initialized.store(true, Ordering::Release);
    }

    pub fn is_initialized(&self) -> bool {
        self.inner.initialized.load(Ordering::Acquire)
    }

    /// Wakes the migration orchestrator (after queueing or cancelling a migration).
    pub fn orchestrator_wake(&self) -> &Notify {
        &self.inner.orchestrator_wake
    }

    fn partitions(&self) -> Result<PartitionCount, MetaError> {
        match (self.is_initialized(), self.inner.partitions.get()) {
            (true, Some(partitions)) => Ok(*partitions),
            _ => {
                Err(MetaError::DatabaseUnavailable("the metadata database is not initialized yet".to_owned()))
            }
        }
    }

    pub(crate) async fn write(&self) -> Result<(Tx, u64), MetaError> {
        self.partitions()?;
        let now = now_ms();
        let mut tx = self.inner.store.write().await?;
        tx.set_now(now);
        Ok((tx, now))
    }

    pub(crate) async fn read(&self) -> Result<Tx, MetaError> {
        self.partitions()?;
        Ok(self.inner.store.read().await?)
    }

    // ---- tenants ----------------------------------------------------------------------------

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
            rate_limit_ops_per_sec: request.rate_limit_ops_per_sec,
            rate_limit_burst: request.rate_limit_burst,
            max_value_bytes,
            max_siblings,
            strict_quorum: request.strict_quorum,
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
        tracing::info!(tenant = %tenant.tenant_id, n = tenant.replication_factor, "tenant created");
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
                    .find(|m| m.kind == MigrationKind::ReplicationFactor && m.tenant_id == tenant_id);
                return Err(MetaError::MigrationInProgress {
                    migration_id: running.map(|m| m.migration_id).unwrap_or_default(),
                    what: format!("tenant {tenant_id:?} is already changing its replication factor"),
                });
            }
            check_replication_factor_fits(&mut tx, n).await?;
            let mut queued = new_migration(&mut tx, MigrationKind::ReplicationFactor, now).await?;
            queued.tenant_id = tenant_id.to_owned();
            queued.old_value = u64::from(tenant.replication_factor);
            queued.new_value = u64::from(n);
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
        normalize_limits(&mut tenant)?;
        tenant.updated_at_ms = now;
        tx.update_tenant(&tenant).await?;
        tx.record_change(ChangeKind::Tenant, tenant_id).await?;
        if let Some(migration) = &migration {
            tx.insert_migration(migration).await?;
        }
        tx.commit().await?;
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

    // ---- api keys ---------------------------------------------------------------------------

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

    // ---- storage nodes ----------------------------------------------------------------------

    /// Adds a node: bootstraps the first topology if there is none, else queues an `add_node`
    /// migration (whose id is returned).
    pub async fn add_node(&self, request: NewNode) -> Result<(NodeView, Option<String>), MetaError> {
        // Its migration must stream data to it before the node ever registers, so an operator's
        // add names where it listens (a registration with auto-add always carries its address).
        if request.address.is_empty() {
            return Err(MetaError::InvalidNode("address is required (host:port)".to_owned()));
        }
        let (mut tx, now) = self.write().await?;
        let (node, migration_id) = self.add_node_in(&mut tx, request, now).await?;
        let view = node_view(&mut tx, node).await?;
        tx.commit().await?;
        if migration_id.is_some() {
            self.inner.orchestrator_wake.notify_one();
        }
        Ok((view, migration_id))
    }

    async fn add_node_in(
        &self,
        tx: &mut Tx,
        request: NewNode,
        now: u64,
    ) -> Result<(StorageNode, Option<String>), MetaError> {
        let weight = match request.weight {
            0 => 1,
            weight => weight,
        };
        check_node_fields(&request.address, &request.zone, weight)?;
        let node_id = match request.node_id {
            0 => tx
                .max_node_id()
                .await?
                .checked_add(1)
                .ok_or_else(|| MetaError::InvalidNode("node ids exhausted".to_owned()))?,
            id => id,
        };
        // A removed node's data directory is stale (the cluster re-replicated without it, and may
        // have purged tombstones or deleted tenants since): remember its actor id so it cannot rejoin.
        let retired_actor_id = match tx.get_node(node_id).await? {
            Some(existing) if existing.membership != Membership::Removed => {
                return Err(MetaError::NodeExists(node_id));
            }
            Some(existing) if existing.actor_id != 0 => existing.actor_id,
            Some(existing) => existing.retired_actor_id,
            None => 0,
        };
        let mut node = StorageNode {
            retired_actor_id,
            node_id,
            address: request.address,
            zone: request.zone,
            weight,
            membership: Membership::Joining,
            alive: true,
            last_heartbeat_ms: 0,
            actor_id: 0,
            data_format_version: 0,
            stats: NodeStats::default(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let state = tx.meta_state().await?;
        if state.current_epoch == 0 {
            // Bootstrap: no topology means no data, so the first version is made current directly.
            node.membership = Membership::Active;
            let mut specs: Vec<NodeSpec> = tx
                .list_nodes()
                .await?
                .iter()
                .filter(|n| {
                    matches!(n.membership, Membership::Active | Membership::Joining) && n.node_id != node_id
                })
                .map(StorageNode::spec)
                .collect();
            specs.push(node.spec());
            let assignment = compute_assignment(None, specs, state.partition_count).await?;
            let epoch = tx.max_epoch().await? + 1;
            tx.insert_topology(&Topology { epoch, assignment: Arc::new(assignment) }).await?;
            tx.set_epochs(epoch, 0).await?;
            tx.upsert_node(&node).await?;
            tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
            tx.record_change(ChangeKind::TopologyCurrent, &epoch.to_string()).await?;
            tracing::info!(node_id, epoch, "first topology version created (bootstrap)");
            return Ok((node, None));
        }
        tx.upsert_node(&node).await?;
        tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
        let mut migration = new_migration(tx, MigrationKind::AddNode, now).await?;
        migration.node_id = node_id;
        migration.new_value = u64::from(weight);
        tx.insert_migration(&migration).await?;
        tracing::info!(node_id, migration = %migration.migration_id, "storage node added; add_node migration queued");
        Ok((node, Some(migration.migration_id)))
    }

    pub async fn get_node(&self, node_id: u32) -> Result<NodeView, MetaError> {
        let mut tx = self.read().await?;
        let node = tx.get_node(node_id).await?.ok_or(MetaError::NodeNotFound(node_id))?;
        let view = node_view(&mut tx, node).await?;
        tx.commit().await?;
        Ok(view)
    }

    /// Starts (`start`) or reports a storage node's rebuild, which the node runs itself: meta only
    /// relays, so nothing about it is stored here.
    pub async fn node_rebuild(&self, node_id: u32, start: bool) -> Result<NodeRebuild, MetaError> {
        let node = self.get_node(node_id).await?.node;
        if node.membership == Membership::Removed {
            return Err(MetaError::NodeRemoved(node_id));
        }
        if node.address.is_empty() {
            return Err(MetaError::NodeUnavailable { node_id, message: "it has not registered yet".into() });
        }
        let status = crate::mover::node_rebuild(&node.address, &self.inner.settings.storage_clients, start)
            .await
            .map_err(|error| MetaError::NodeUnavailable { node_id, message: error.to_string() })?;
        let state = match status.state() {
            storage_pb::RebuildState::Running => "running",
            storage_pb::RebuildState::Done => "done",
            storage_pb::RebuildState::Idle | storage_pb::RebuildState::Unspecified => "idle",
        };
        Ok(NodeRebuild {
            node_id,
            state,
            partitions_total: status.partitions_total,
            partitions_done: status.partitions_done,
            keys_compared: status.keys_compared,
            keys_repaired: status.keys_repaired,
            bytes: status.bytes,
            failed_exchanges: status.failed_exchanges,
            started_at_ms: status.started_at_ms,
            finished_at_ms: status.finished_at_ms,
        })
    }

    /// Every node, removed ones included.
    pub async fn list_nodes(&self) -> Result<Vec<NodeView>, MetaError> {
        let mut tx = self.read().await?;
        let nodes = tx.list_nodes().await?;
        let ring = ring_nodes(&mut tx).await?;
        tx.commit().await?;
        Ok(nodes
            .into_iter()
            .map(|node| {
                let in_ring = ring.contains(&node.node_id);
                NodeView { node, in_ring }
            })
            .collect())
    }

    /// Changes a node's weight or zone. For a node in the ring that queues a `node_weight` migration
    /// (placement is recomputed); for a joining node the change is simply recorded.
    pub async fn update_node(
        &self,
        node_id: u32,
        patch: NodePatch,
    ) -> Result<(NodeView, Option<String>), MetaError> {
        let (mut tx, now) = self.write().await?;
        let mut node = tx
            .get_node(node_id)
            .await?
            .filter(|n| n.membership != Membership::Removed)
            .ok_or(MetaError::NodeNotFound(node_id))?;
        let old_weight = node.weight;
        let weight = match patch.weight {
            Some(0) => 1,
            Some(weight) => weight,
            None => node.weight,
        };
        let zone = patch.zone.unwrap_or_else(|| node.zone.clone());
        check_node_fields("", &zone, weight)?;
        if weight == node.weight && zone == node.zone {
            let view = node_view(&mut tx, node).await?;
            tx.commit().await?;
            return Ok((view, None));
        }
        if node.membership == Membership::Leaving {
            return Err(MetaError::InvalidNode(format!("node {node_id} is leaving the cluster")));
        }
        node.weight = weight;
        node.zone = zone;
        node.updated_at_ms = now;
        tx.update_node(&node).await?;
        tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
        let mut migration_id = None;
        if node.membership == Membership::Active {
            let mut migration = new_migration(&mut tx, MigrationKind::NodeWeight, now).await?;
            migration.node_id = node_id;
            migration.old_value = u64::from(old_weight);
            migration.new_value = u64::from(weight);
            tx.insert_migration(&migration).await?;
            migration_id = Some(migration.migration_id);
        }
        let view = node_view(&mut tx, node).await?;
        tx.commit().await?;
        if migration_id.is_some() {
            self.inner.orchestrator_wake.notify_one();
        }
        Ok((view, migration_id))
    }

    /// Removes a node: a ring node is drained by a `drain_node` migration (`force`: a `remove_node`
    /// migration that re-replicates from the survivors, for a dead node); a node not yet in the ring
    /// is removed at once. Refused with NODE_IN_USE when fewer active nodes would remain than the
    /// highest replication factor of any tenant (or none at all).
    pub async fn remove_node(
        &self,
        node_id: u32,
        force: bool,
    ) -> Result<(NodeView, Option<String>), MetaError> {
        let (mut tx, now) = self.write().await?;
        let mut node = tx
            .get_node(node_id)
            .await?
            .filter(|n| n.membership != Membership::Removed)
            .ok_or(MetaError::NodeNotFound(node_id))?;
        let unfinished = tx.unfinished_migrations().await?;
        let involving = |kinds: &[MigrationKind]| {
            unfinished.iter().find(|m| m.node_id == node_id && kinds.contains(&m.kind)).cloned()
        };
        let migration_id = match node.membership {
            Membership::Removed => return Err(MetaError::NodeNotFound(node_id)),
            Membership::Leaving => {
                let existing = involving(&[MigrationKind::DrainNode, MigrationKind::RemoveNode]);
                return Err(MetaError::MigrationInProgress {
                    migration_id: existing.map(|m| m.migration_id).unwrap_or_default(),
                    what: format!("node {node_id} is already being removed"),
                });
            }
            Membership::Joining => {
                if let Some(running) =
                    involving(&[MigrationKind::AddNode]).filter(|m| m.state == MigrationState::Running)
                {
                    return Err(MetaError::MigrationInProgress {
                        migration_id: running.migration_id,
                        what: format!("node {node_id} is joining; cancel its migration first"),
                    });
                }
                for mut pending in unfinished.iter().filter(|m| m.node_id == node_id).cloned() {
                    pending.state = MigrationState::Cancelled;
                    pending.error = "node removed before it joined".to_owned();
                    pending.finished_at_ms = now;
                    pending.updated_at_ms = now;
                    tx.update_migration(&pending).await?;
                }
                node.membership = Membership::Removed;
                None
            }
            Membership::Active => {
                let remaining = tx
                    .list_nodes()
                    .await?
                    .iter()
                    .filter(|n| n.membership == Membership::Active && n.node_id != node_id)
                    .count();
                let required = tx
                    .list_tenants()
                    .await?
                    .iter()
                    .map(|t| t.replication_factor.max(t.previous_replication_factor.unwrap_or(0)) as usize)
                    .max()
                    .unwrap_or(0)
                    .max(1);
                if remaining < required {
                    return Err(MetaError::NodeInUse { node_id, remaining, required });
                }
                node.membership = Membership::Leaving;
                let kind = if force { MigrationKind::RemoveNode } else { MigrationKind::DrainNode };
                let mut migration = new_migration(&mut tx, kind, now).await?;
                migration.node_id = node_id;
                Some(migration)
            }
        };
        node.updated_at_ms = now;
        tx.update_node(&node).await?;
        tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
        if let Some(migration) = &migration_id {
            tx.insert_migration(migration).await?;
        }
        let view = node_view(&mut tx, node).await?;
        tx.commit().await?;
        let migration_id = migration_id.map(|m| {
            tracing::info!(node_id, force, migration = %m.migration_id, kind = m.kind.as_str(), "node removal queued");
            self.inner.orchestrator_wake.notify_one();
            m.migration_id
        });
        Ok((view, migration_id))
    }

    // ---- migrations -------------------------------------------------------------------------

    pub async fn get_migration(&self, migration_id: &str) -> Result<Migration, MetaError> {
        let mut tx = self.read().await?;
        let migration = tx.get_migration(migration_id).await?;
        tx.commit().await?;
        migration.ok_or_else(|| MetaError::MigrationNotFound(migration_id.to_owned()))
    }

    /// Every migration, newest first.
    pub async fn list_migrations(&self) -> Result<Vec<Migration>, MetaError> {
        let mut tx = self.read().await?;
        let migrations = tx.list_migrations().await?;
        tx.commit().await?;
        Ok(migrations)
    }

    /// Cancels a pending or running migration: its pending topology is discarded and what it changed
    /// (node lifecycle, replication factor, weight) is restored. Cancelling a cancelled migration
    /// returns it unchanged; a completed or failed one is MIGRATION_FINISHED.
    pub async fn cancel_migration(&self, migration_id: &str) -> Result<Migration, MetaError> {
        let (mut tx, now) = self.write().await?;
        let mut migration = tx
            .get_migration(migration_id)
            .await?
            .ok_or_else(|| MetaError::MigrationNotFound(migration_id.to_owned()))?;
        match migration.state {
            MigrationState::Cancelled => {
                tx.commit().await?;
                return Ok(migration);
            }
            MigrationState::Completed | MigrationState::Failed => {
                return Err(MetaError::MigrationFinished {
                    migration_id: migration_id.to_owned(),
                    state: migration.state.as_str(),
                });
            }
            MigrationState::Pending | MigrationState::Running => {}
        }
        abandon(&mut tx, &mut migration, MigrationState::Cancelled, "cancelled by an operator", now).await?;
        tx.commit().await?;
        tracing::info!(migration = migration_id, kind = migration.kind.as_str(), "migration cancelled");
        self.inner.orchestrator_wake.notify_one();
        Ok(migration)
    }

    // ---- cluster API ------------------------------------------------------------------------

    /// A storage process announces itself (see the module documentation). Returns its node id.
    pub async fn register_node(&self, registration: Registration) -> Result<u32, MetaError> {
        let (mut tx, now) = self.write().await?;
        let mut queued_migration = false;
        let existing = match registration.node_id {
            0 => None,
            id => tx.get_node(id).await?,
        };
        // A drained or force-removed node that is still running keeps registering: it must not
        // rejoin by itself (not even with auto-add), or a drain would undo itself.
        if let Some(node) = &existing
            && node.membership == Membership::Removed
        {
            return Err(MetaError::NodeRemoved(node.node_id));
        }
        let node_id = match existing {
            Some(node) if node.retired_actor_id != 0 && node.retired_actor_id == registration.actor_id => {
                return Err(MetaError::StaleDataDirectory(node.node_id));
            }
            Some(mut node) => {
                let mut changed = false;
                if !registration.address.is_empty() && node.address != registration.address {
                    check_node_fields(&registration.address, "", 1)?;
                    node.address = registration.address.clone();
                    changed = true;
                }
                if !node.alive {
                    node.alive = true;
                    changed = true;
                }
                if node.actor_id != registration.actor_id && node.actor_id != 0 {
                    tracing::warn!(
                        node_id = node.node_id,
                        old_actor = node.actor_id,
                        new_actor = registration.actor_id,
                        "storage node registered with a new actor id (new data directory)"
                    );
                }
                node.actor_id = registration.actor_id;
                node.data_format_version = registration.data_format_version;
                node.updated_at_ms = now;
                tx.update_node(&node).await?;
                tx.set_last_heartbeat(node.node_id, now).await?;
                if changed {
                    tx.record_change(ChangeKind::Node, &node.node_id.to_string()).await?;
                }
                node.node_id
            }
            None if self.inner.settings.auto_add_nodes => {
                let request = NewNode {
                    node_id: registration.node_id,
                    address: registration.address.clone(),
                    zone: registration.zone.clone(),
                    weight: registration.weight,
                };
                let (mut node, migration) = self.add_node_in(&mut tx, request, now).await?;
                node.actor_id = registration.actor_id;
                node.data_format_version = registration.data_format_version;
                tx.update_node(&node).await?;
                tx.set_last_heartbeat(node.node_id, now).await?;
                queued_migration = migration.is_some();
                tracing::info!(
                    node_id = node.node_id,
                    "unknown storage node added on registration (auto-add)"
                );
                node.node_id
            }
            None => {
                return Err(MetaError::NodeNotFound(registration.node_id));
            }
        };
        tx.commit().await?;
        // Woken only after the commit, or the orchestrator could look before the migration exists
        // and sleep a whole poll interval.
        if queued_migration {
            self.inner.orchestrator_wake.notify_one();
        }
        tracing::debug!(node_id, address = %registration.address, "storage node registered");
        Ok(node_id)
    }

    /// Records a heartbeat and the tenant purges it reports; `false` if the node is unknown (it
    /// should register again). A node that was marked down is marked alive again at once.
    pub async fn heartbeat(
        &self,
        node_id: u32,
        stats: NodeStats,
        purged_tenants: &[(String, u64)],
    ) -> Result<bool, MetaError> {
        self.partitions()?;
        let now = now_ms();
        for (tenant, purge_seq) in purged_tenants {
            if self.inner.store.confirm_tenant_purge(tenant, *purge_seq, node_id, now).await? {
                tracing::info!(node_id, tenant, purge_seq, "storage node purged a deleted tenant");
            }
        }
        match self.inner.store.record_heartbeat(node_id, &stats, now).await? {
            None => Ok(false),
            Some(true) => Ok(true),
            Some(false) => {
                let (mut tx, now) = self.write().await?;
                if tx.mark_node_alive(node_id, now).await? {
                    tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
                    tracing::info!(node_id, "storage node is alive again");
                }
                tx.commit().await?;
                Ok(true)
            }
        }
    }
}

/// Rejects N outside 1..=7.
pub(crate) fn check_replication_factor_range(n: u32) -> Result<(), MetaError> {
    validation::validate_replication_factor(n as usize).map_err(|_| MetaError::InvalidReplicationFactor {
        requested: n,
        active_nodes: None,
        why: format!("must be between 1 and {MAX_REPLICATION_FACTOR}"),
    })
}

/// Rejects N above the number of active nodes in the ring (N distinct replicas need N nodes).
async fn check_replication_factor_fits(tx: &mut Tx, n: u32) -> Result<(), MetaError> {
    let active = tx.list_nodes().await?.iter().filter(|node| node.membership == Membership::Active).count();
    if n as usize > active {
        return Err(MetaError::InvalidReplicationFactor {
            requested: n,
            active_nodes: Some(active),
            why: format!("the ring has only {active} active storage node(s)"),
        });
    }
    Ok(())
}

/// Validates a tenant's limits and fills the burst default (= the rate).
fn normalize_limits(tenant: &mut Tenant) -> Result<(), MetaError> {
    validation::validate_max_value_bytes(tenant.max_value_bytes)
        .map_err(|e| MetaError::InvalidArgument(format!("max_value_bytes: {e}")))?;
    validation::validate_max_siblings(tenant.max_siblings as usize)
        .map_err(|e| MetaError::InvalidArgument(format!("max_siblings: {e}")))?;
    if tenant.rate_limit_ops_per_sec == 0 {
        tenant.rate_limit_burst = 0;
    } else if tenant.rate_limit_burst == 0 {
        tenant.rate_limit_burst = tenant.rate_limit_ops_per_sec;
    }
    Ok(())
}

fn check_node_fields(address: &str, zone: &str, weight: u32) -> Result<(), MetaError> {
    if !(1..=MAX_NODE_WEIGHT).contains(&weight) {
        return Err(MetaError::InvalidNode(format!("weight must be between 1 and {MAX_NODE_WEIGHT}")));
    }
    if zone.chars().count() > MAX_ZONE_CHARS || zone.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(MetaError::InvalidNode(format!(
            "zone must be at most {MAX_ZONE_CHARS} characters without whitespace"
        )));
    }
    if !address.is_empty() {
        let valid = address.len() <= MAX_ADDRESS_CHARS
            && address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            && !address.chars().any(|c| c.is_whitespace() || c.is_control());
        if !valid {
            return Err(MetaError::InvalidNode(format!("address {address:?} is not host:port")));
        }
    }
    Ok(())
}

/// A new pending migration of `kind` at the end of the queue.
async fn new_migration(tx: &mut Tx, kind: MigrationKind, now: u64) -> Result<Migration, MetaError> {
    let seq = tx.next_migration_seq().await?;
    let suffix: u32 = rand::rng().random();
    Ok(Migration {
        migration_id: format!("mig-{seq:06}-{suffix:08x}"),
        seq,
        kind,
        state: MigrationState::Pending,
        node_id: 0,
        tenant_id: String::new(),
        old_value: 0,
        new_value: 0,
        from_epoch: 0,
        to_epoch: 0,
        progress: MigrationProgress::default(),
        done_bitmap: Vec::new(),
        error: String::new(),
        created_at_ms: now,
        updated_at_ms: now,
        started_at_ms: 0,
        finished_at_ms: 0,
    })
}

/// Ends an unfinished migration as `state` (cancelled or failed): discards its pending topology and
/// restores what it changed. The caller commits.
pub(crate) async fn abandon(
    tx: &mut Tx,
    migration: &mut Migration,
    state: MigrationState,
    reason: &str,
    now: u64,
) -> Result<(), MetaError> {
    if migration.state == MigrationState::Running && migration.kind.changes_ring() {
        let meta_state = tx.meta_state().await?;
        if meta_state.pending_epoch != 0 && meta_state.pending_epoch == migration.to_epoch {
            tx.set_epochs(meta_state.current_epoch, 0).await?;
            tx.record_change(ChangeKind::TopologyPendingCleared, &migration.to_epoch.to_string()).await?;
        }
    }
    crate::lifecycle::settle(tx, migration, crate::lifecycle::Ending::Abandoned, now).await?;
    migration.state = state;
    migration.error = reason.to_owned();
    migration.finished_at_ms = now;
    migration.updated_at_ms = now;
    tx.update_migration(migration).await?;
    Ok(())
}

/// The ids of the nodes the current topology places data on.
async fn ring_nodes(tx: &mut Tx) -> Result<std::collections::BTreeSet<u32>, MetaError> {
    let state = tx.meta_state().await?;
    if state.current_epoch == 0 {
        return Ok(Default::default());
    }
    let topology = tx.require_topology(state.current_epoch).await?;
    Ok(topology.assignment.nodes().into_iter().map(|id| id.0).collect())
}

async fn node_view(tx: &mut Tx, node: StorageNode) -> Result<NodeView, MetaError> {
    let in_ring = ring_nodes(tx).await?.contains(&node.node_id);
    Ok(NodeView { node, in_ring })
}

/// Runs the (CPU-bound) assignment computation off the async runtime.
pub(crate) async fn compute_assignment(
    previous: Option<Arc<Assignment>>,
    specs: Vec<NodeSpec>,
    partitions: PartitionCount,
) -> Result<Assignment, MetaError> {
    tokio::task::spawn_blocking(move || Assignment::compute(previous.as_deref(), &specs, partitions))
        .await
        .map_err(|e| MetaError::Internal(format!("assignment task failed: {e}")))?
        .map_err(|e| MetaError::InvalidNode(format!("cannot place partitions: {e}")))
}

/// A new key id and secret: `pdb_<key_id>_<48 hex chars of randomness>` (192 random bits).
fn generate_secret() -> (String, String) {
    let mut rng = rand::rng();
    let id_bytes: [u8; 8] = rng.random();
    let secret_bytes: [u8; 24] = rng.random();
    let key_id = hex(&id_bytes);
    let secret = format!("pdb_{key_id}_{}", hex(&secret_bytes));
    (key_id, secret)
}

/// What is stored for a secret (and what routers compare against): lowercase hex SHA-256.
pub fn secret_sha256(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}
