//! Migration transfers, target side: pull some tenants of one partition from a current replica and
//! merge them here with DVVS, so live writes this node received meanwhile (routers write to the
//! union of old and new owners during a migration) are never overwritten by older streamed data.
//!
//! Sources are tried in order; a source that fails mid-stream is replaced by the next one, resuming
//! after the last record key merged (record keys sort the same on every node). Pulling the same
//! partition twice is harmless (merge is idempotent), which makes a transfer safe to retry after a
//! meta failover.

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::encoding::decode_version_set;
use pairdb_core::reason::{HasReason, Reason};
use pairdb_core::ring::NodeId;
use pairdb_core::token::PartitionId;
use pairdb_proto::storage::v1 as pb;
use pairdb_service::clients::{ChannelSettings, InternalClients};

use crate::engine::{Engine, EngineError};
use crate::keys::RecordKey;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("no source could stream partition {partition}: {failures}")]
    NoSource { partition: PartitionId, failures: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("transfer task failed: {0}")]
    Task(String),
}

impl HasReason for TransferError {
    fn reason(&self) -> Reason {
        match self {
            TransferError::NoSource { .. } => Reason::SourceUnavailable,
            TransferError::Engine(e) => e.reason(),
            TransferError::Task(_) => Reason::Internal,
        }
    }
}

/// What one pull did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferReport {
    pub keys: u64,
    pub bytes: u64,
    /// The source the data came from (`None` until one answered).
    pub source_node_id: Option<NodeId>,
}

/// A node to pull from, at the address the topology gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub node_id: NodeId,
    pub address: String,
}

/// How long one source may stay silent before the next one is tried.
const SOURCE_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pulls `tenants` of `partition` from the first source that completes the stream.
pub async fn pull_partition(
    engine: &Arc<Engine>,
    partition: PartitionId,
    tenants: Vec<String>,
    sources: &[Source],
    batch_size: usize,
    clients: &InternalClients,
) -> Result<TransferReport, TransferError> {
    let own_node = engine.identity().node_id;
    let mut report = TransferReport::default();
    let mut cursor: Vec<u8> = Vec::new();
    let mut failures = Vec::new();
    for source in sources.iter().filter(|s| s.node_id != own_node) {
        match pull_from(engine, partition, &tenants, source, batch_size, clients, &mut cursor, &mut report)
            .await
        {
            Ok(()) => {
                report.source_node_id = Some(source.node_id);
                metrics::counter!("pairdb_storage_sync_keys_total").increment(report.keys);
                metrics::counter!("pairdb_storage_sync_bytes_total").increment(report.bytes);
                return Ok(report);
            }
            Err(SourceFailure::Local(error)) => return Err(error),
            Err(SourceFailure::Remote(message)) => {
                tracing::info!(%partition, source = %source.node_id, %message, "transfer source failed; trying the next");
                failures.push(format!("node {}: {message}", source.node_id));
            }
        }
    }
    Err(TransferError::NoSource { partition, failures: failures.join("; ") })
}

enum SourceFailure {
    /// This node cannot take the data: no point trying another source.
    Local(TransferError),
    Remote(String),
}

#[allow(clippy::too_many_arguments)]
async fn pull_from(
    engine: &Arc<Engine>,
    partition: PartitionId,
    tenants: &[String],
    source: &Source,
    batch_size: usize,
    clients: &InternalClients,
    cursor: &mut Vec<u8>,
    report: &mut TransferReport,
) -> Result<(), SourceFailure> {
    let remote = |e: &dyn std::fmt::Display| SourceFailure::Remote(e.to_string());
    let settings = ChannelSettings { keepalive: None, ..ChannelSettings::default() };
    let channel = clients
        .endpoint(&source.address, settings)
        .map_err(|e| remote(&e))?
        .connect()
        .await
        .map_err(|e| remote(&e))?;
    let mut client = clients.storage_over(channel);
    let mut stream = client
        .stream_partition(pb::StreamPartitionRequest {
            partition: partition.0,
            tenant_ids: tenants.to_vec(),
            cursor: cursor.clone(),
            batch_size: batch_size as u32,
        })
        .await
        .map_err(|e| remote(&e))?
        .into_inner();
    loop {
        let batch = match tokio::time::timeout(SOURCE_IDLE_TIMEOUT, stream.message()).await {
            Err(_) => return Err(SourceFailure::Remote("stream stalled".into())),
            Ok(Err(status)) => return Err(remote(&status)),
            Ok(Ok(None)) => return Err(SourceFailure::Remote("stream ended before done".into())),
            Ok(Ok(Some(batch))) => batch,
        };
        let mut records = Vec::with_capacity(batch.records.len());
        for record in &batch.records {
            let key = RecordKey::from_wire(engine.partitions(), &record.tenant_id, &record.key, record.token)
                .map_err(|e| SourceFailure::Remote(format!("sent key {:?}: {e}", record.key)))?;
            if key.partition != partition {
                return Err(SourceFailure::Remote(format!("sent a key of partition {}", key.partition)));
            }
            // A set that fails validation is skipped, not stored: one bad record on a source must not
            // fail the partition's transfer from every source (anti-entropy brings the key from a
            // replica that holds a valid copy).
            let set = match decode_version_set(&record.version_set) {
                Ok(set) => set,
                Err(error) => {
                    tracing::warn!(partition = partition.0, %error, "source sent an invalid version set; skipped");
                    metrics::counter!("pairdb_storage_invalid_sets_refused_total", "rpc" => "sync_partition")
                        .increment(1);
                    continue;
                }
            };
            report.bytes += record.version_set.len() as u64;
            records.push((key, set));
        }
        report.keys += records.len() as u64;
        if !records.is_empty() {
            let merge_engine = engine.clone();
            pairdb_service::task::spawn_blocking(move || merge_engine.merge_batch(&records))
                .await
                .map_err(|e| SourceFailure::Local(TransferError::Task(e.to_string())))?
                .map_err(|e| SourceFailure::Local(e.into()))?;
        }
        // Only advanced once merged: a fallback source resumes after what is durable here.
        if !batch.next_cursor.is_empty() {
            *cursor = batch.next_cursor;
        }
        if batch.done {
            return Ok(());
        }
    }
}
