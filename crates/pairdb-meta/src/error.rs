//! The errors the metadata service returns to its callers, each with a stable reason code. Both edges
//! (gRPC in [`crate::grpc`], HTTP/JSON in [`crate::http`]) turn them into responses through
//! `pairdb_service::errors`, the one reason → code → HTTP status table.

use pairdb_core::reason::{HasReason, Reason};
use pairdb_core::ring::NodeId;
use pairdb_core::validation::MAX_REPLICATION_FACTOR;

use crate::persistence::PersistenceError;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid tenant id {0:?}: must match [a-z0-9][a-z0-9_-]{{0,62}}")]
    InvalidTenantId(String),
    #[error("replication factor {requested} is not allowed: {why}")]
    InvalidReplicationFactor { requested: u32, active_nodes: Option<usize>, why: String },
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("tenant {0:?} not found")]
    TenantNotFound(String),
    #[error("api key {0:?} not found")]
    ApiKeyNotFound(String),
    #[error("storage node {0} not found")]
    NodeNotFound(NodeId),
    #[error("storage node {0} already exists")]
    NodeExists(NodeId),
    #[error(
        "storage node {0} was removed from the cluster; an operator must add it again (AddStorageNode), preferably with a fresh data directory"
    )]
    NodeRemoved(NodeId),
    #[error("invalid storage node: {0}")]
    InvalidNode(String),
    #[error("storage node {node_id} did not answer: {message}")]
    NodeUnavailable { node_id: NodeId, message: String },
    #[error(
        "storage node {node_id} is in use: removing it would leave {remaining} ring node(s) but tenants need {required}"
    )]
    NodeInUse { node_id: NodeId, remaining: usize, required: usize },
    #[error("migration {0:?} not found")]
    MigrationNotFound(String),
    #[error("{what} (migration {migration_id} in progress)")]
    MigrationInProgress { migration_id: String, what: String },
    #[error("migration {migration_id} already finished ({state})")]
    MigrationFinished { migration_id: String, state: &'static str },
    #[error(
        "tenant {tenant:?} is being deleted: {nodes_done} of {nodes_total} storage nodes purged its data; \
         it can be created again once every node has (`pairdb tenant get {tenant}` shows progress)"
    )]
    TenantBeingDeleted { tenant: String, nodes_done: u32, nodes_total: u32 },
    #[error(
        "storage node {0} registered with the data directory it had before it was removed; start it with an \
         empty --data-dir (its data is stale: the cluster moved on without it)"
    )]
    StaleDataDirectory(NodeId),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("metadata database unavailable: {0}")]
    DatabaseUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl HasReason for MetaError {
    fn reason(&self) -> Reason {
        match self {
            MetaError::InvalidArgument(_) => Reason::InvalidArgument,
            MetaError::InvalidTenantId(_) => Reason::InvalidTenantId,
            MetaError::InvalidReplicationFactor { .. } => Reason::InvalidReplicationFactor,
            MetaError::TenantExists(_) => Reason::TenantExists,
            MetaError::TenantNotFound(_) => Reason::TenantNotFound,
            MetaError::ApiKeyNotFound(_) => Reason::ApiKeyNotFound,
            MetaError::NodeNotFound(_) => Reason::NodeNotFound,
            MetaError::NodeExists(_) => Reason::NodeExists,
            MetaError::NodeRemoved(_) => Reason::NodeRemoved,
            MetaError::InvalidNode(_) => Reason::InvalidNode,
            MetaError::NodeUnavailable { .. } => Reason::NodeUnavailable,
            MetaError::NodeInUse { .. } => Reason::NodeInUse,
            MetaError::MigrationNotFound(_) => Reason::MigrationNotFound,
            MetaError::MigrationInProgress { .. } => Reason::MigrationInProgress,
            MetaError::MigrationFinished { .. } => Reason::MigrationFinished,
            MetaError::TenantBeingDeleted { .. } => Reason::TenantBeingDeleted,
            MetaError::StaleDataDirectory(_) => Reason::StaleDataDirectory,
            MetaError::Unauthenticated(_) => Reason::Unauthenticated,
            MetaError::PermissionDenied(_) => Reason::PermissionDenied,
            MetaError::RequestTimeout(_) => Reason::RequestTimeout,
            MetaError::DatabaseUnavailable(_) => Reason::DatabaseUnavailable,
            MetaError::Internal(_) => Reason::Internal,
        }
    }
}

impl MetaError {
    /// Structured details for clients (error metadata / JSON `details`).
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        match self {
            MetaError::InvalidTenantId(tenant)
            | MetaError::TenantExists(tenant)
            | MetaError::TenantNotFound(tenant) => {
                vec![("tenant_id", tenant.clone())]
            }
            MetaError::InvalidReplicationFactor { requested, active_nodes, .. } => {
                let mut metadata =
                    vec![("requested", requested.to_string()), ("max", MAX_REPLICATION_FACTOR.to_string())];
                if let Some(active) = active_nodes {
                    metadata.push(("active_nodes", active.to_string()));
                }
                metadata
            }
            MetaError::TenantBeingDeleted { tenant, nodes_done, nodes_total } => vec![
                ("tenant_id", tenant.clone()),
                ("nodes_done", nodes_done.to_string()),
                ("nodes_total", nodes_total.to_string()),
            ],
            MetaError::StaleDataDirectory(node) => vec![("node_id", node.to_string())],
            MetaError::ApiKeyNotFound(key) => vec![("key_id", key.clone())],
            MetaError::NodeNotFound(node)
            | MetaError::NodeExists(node)
            | MetaError::NodeRemoved(node)
            | MetaError::NodeUnavailable { node_id: node, .. } => vec![("node_id", node.to_string())],
            MetaError::NodeInUse { node_id, remaining, required } => vec![
                ("node_id", node_id.to_string()),
                ("remaining_nodes", remaining.to_string()),
                ("required_nodes", required.to_string()),
            ],
            MetaError::MigrationNotFound(id) => vec![("migration_id", id.clone())],
            MetaError::MigrationInProgress { migration_id, .. } => {
                vec![("migration_id", migration_id.clone())]
            }
            MetaError::MigrationFinished { migration_id, state } => {
                vec![("migration_id", migration_id.clone()), ("state", (*state).to_owned())]
            }
            _ => Vec::new(),
        }
    }

    /// The gRPC status, carrying the reason and metadata in its details.
    pub fn to_status(&self) -> tonic::Status {
        pairdb_service::errors::status(self.reason(), self.to_string(), &self.metadata())
    }

    /// [`Self::to_status`] for the cluster API, in the encoding previous-release storage nodes and
    /// routers read (see `pairdb_proto::status::internal_status`).
    pub fn to_internal_status(&self) -> tonic::Status {
        pairdb_service::errors::internal_status(self.reason(), self.to_string(), &self.metadata())
    }
}

impl From<PersistenceError> for MetaError {
    fn from(error: PersistenceError) -> Self {
        match error {
            PersistenceError::Unavailable(source) => MetaError::DatabaseUnavailable(source.to_string()),
            other => MetaError::Internal(other.to_string()),
        }
    }
}
