//! The router's local failure view heals here: suspect storage nodes are probed, and one that
//! answers is trusted again. (Hint delivery is the hint holders' own job: storage nodes follow the
//! topology and push hints to owners that are live again.)

use std::sync::Arc;
use std::time::Duration;

use pairdb_proto::storage::v1 as pb;
use pairdb_service::shutdown::Shutdown;

use crate::pool::StoragePool;

/// Probes suspect nodes every `probe_interval`; a success clears the suspicion.
pub async fn run(pool: Arc<StoragePool>, probe_interval: Duration, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(probe_interval) => {}
            _ = shutdown.wait() => return,
        }
        for client in pool.all().into_iter().filter(|c| c.is_suspect()) {
            let Some((mut grpc, permit)) = client.acquire().await else { return };
            let probe = tokio::time::timeout(pool.storage_timeout(), grpc.stats(pb::StatsRequest {})).await;
            drop(permit);
            if matches!(probe, Ok(Ok(_))) && client.record_success() {
                tracing::info!(node_id = client.node.0, "storage node answers again");
            }
        }
    }
}
