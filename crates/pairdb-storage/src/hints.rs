//! Hint delivery: push the sets this node keeps for `target` to that node, then delete each delivered
//! hint unless it grew meanwhile (it is then delivered in the next round). Batches are bounded and go
//! one partition at a time through `MergeBatch`, which merges with DVVS on the owner, so a hint never
//! overwrites a newer version there.

use std::collections::BTreeMap;
use std::sync::Arc;

use pairdb_core::encoding::encode_version_set;
use pairdb_proto::storage::v1 as pb;
use pairdb_proto::storage::v1::storage_service_client::StorageServiceClient;

use crate::engine::{Engine, EngineError, StoredHint};

/// Hints per delivery round.
const DELIVERY_BATCH: usize = 256;
/// Rounds per call, so one call is bounded even if hints keep arriving.
const MAX_ROUNDS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum HintError {
    #[error("cannot reach node at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error("target refused hints: {0}")]
    Rejected(tonic::Status),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("hint task failed: {0}")]
    Task(String),
}

impl HintError {
    pub fn reason(&self) -> &'static str {
        match self {
            HintError::Unreachable { .. } | HintError::Rejected(_) => "NOT_READY",
            HintError::Engine(e) => e.reason(),
            HintError::Task(_) => "INTERNAL",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: u64,
    pub remaining: u64,
}

async fn blocking<T: Send + 'static>(
    engine: &Arc<Engine>,
    op: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, HintError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || op(&engine))
        .await
        .map_err(|e| HintError::Task(e.to_string()))?
        .map_err(HintError::from)
}

/// Delivers every hint held for `target_node` to `address`.
pub async fn deliver(
    engine: Arc<Engine>,
    target_node: u32,
    address: &str,
    tls: Option<&pairdb_service::tls::Tls>,
) -> Result<DeliveryReport, HintError> {
    let unreachable = |message: String| HintError::Unreachable { address: address.to_owned(), message };
    let channel = pairdb_service::tls::endpoint(address, tls)
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut client =
        StorageServiceClient::with_interceptor(channel, pairdb_service::telemetry::TraceInterceptor)
            .max_decoding_message_size(pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(pairdb_core::validation::GRPC_MAX_MESSAGE_BYTES);
    let mut report = DeliveryReport::default();
    for _ in 0..MAX_ROUNDS {
        let hints = blocking(&engine, move |e| e.list_hints(target_node, None, DELIVERY_BATCH)).await?;
        if hints.is_empty() {
            break;
        }
        let mut by_partition: BTreeMap<u32, Vec<StoredHint>> = BTreeMap::new();
        for hint in hints {
            by_partition.entry(hint.key.partition.0).or_default().push(hint);
        }
        let mut progressed = false;
        for (partition, hints) in by_partition {
            let records = hints
                .iter()
                .map(|h| pb::Record {
                    tenant_id: h.key.tenant.clone(),
                    key: h.key.key.clone(),
                    version_set: encode_version_set(&h.set),
                })
                .collect();
            client
                .merge_batch(pb::MergeBatchRequest { partition, records })
                .await
                .map_err(HintError::Rejected)?;
            let deleted = blocking(&engine, move |e| {
                let mut deleted = 0u64;
                for hint in &hints {
                    if e.delete_hint_if_unchanged(target_node, &hint.key, &hint.set)? {
                        deleted += 1;
                    }
                }
                Ok(deleted)
            })
            .await?;
            report.delivered += deleted;
            progressed |= deleted > 0;
        }
        metrics::counter!("pairdb_storage_hints_delivered_total").increment(report.delivered);
        if !progressed {
            break;
        }
    }
    report.remaining = blocking(&engine, move |e| Ok(e.count_hints(target_node))).await?;
    Ok(report)
}
