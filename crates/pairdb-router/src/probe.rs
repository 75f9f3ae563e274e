//! Hinted handoff delivery, driven by the router (decision recorded in ARCHITECTURE.md): the router
//! knows every node's address and which nodes just came back, so it asks each hint holder to push its
//! hints for a returning node (`DeliverHints`). Triggers: a suspect node answering a probe again, and a
//! periodic sweep over all live nodes (hints for nodes this router never saw fail, or that another
//! router wrote). Delivery is idempotent, so several routers doing it is harmless.

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_proto::storage::v1 as pb;

use crate::pool::StoragePool;
use crate::view::SharedView;

/// Asks every other known node to deliver its hints for `target`.
pub async fn deliver_to(pool: &StoragePool, view: &SharedView, target: NodeId) {
    let view = view.load();
    let Some(target_entry) = view.nodes.get(&target) else { return };
    for (&holder, entry) in &view.nodes {
        if holder == target || entry.down {
            continue;
        }
        let Some(client) = pool.client(holder, &entry.address) else { continue };
        if client.is_suspect() {
            continue;
        }
        let Some((mut grpc, _permit)) = client.acquire().await else { return };
        let request = pb::DeliverHintsRequest {
            target_node_id: target.0,
            target_address: target_entry.address.clone(),
        };
        match tokio::time::timeout(Duration::from_secs(60), grpc.deliver_hints(request)).await {
            Ok(Ok(report)) => {
                let report = report.into_inner();
                if report.delivered > 0 {
                    metrics::counter!("pairdb_router_hints_delivered_total").increment(report.delivered);
                    tracing::info!(
                        holder = holder.0,
                        target = target.0,
                        delivered = report.delivered,
                        "hints delivered"
                    );
                }
            }
            Ok(Err(status)) => {
                tracing::debug!(holder = holder.0, target = target.0, %status, "hint delivery failed")
            }
            Err(_) => tracing::debug!(holder = holder.0, target = target.0, "hint delivery timed out"),
        }
    }
}

/// Probes suspect nodes every `probe_interval` (a success clears the suspicion and triggers hint
/// delivery to that node) and sweeps hint delivery to every live node every `sweep_interval`.
pub async fn run(
    pool: Arc<StoragePool>,
    view: SharedView,
    probe_interval: Duration,
    sweep_interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(probe_interval) => {}
            _ = shutdown.changed() => return,
        }
        for client in pool.all().into_iter().filter(|c| c.is_suspect()) {
            let Some((mut grpc, permit)) = client.acquire().await else { return };
            let probe = tokio::time::timeout(pool.storage_timeout(), grpc.stats(pb::StatsRequest {})).await;
            drop(permit);
            if matches!(probe, Ok(Ok(_))) && client.record_success() {
                tracing::info!(node_id = client.node.0, "storage node answers again");
                let (pool, view, node) = (pool.clone(), view.clone(), client.node);
                tokio::spawn(async move { deliver_to(&pool, &view, node).await });
            }
        }
        if last_sweep.elapsed() >= sweep_interval {
            last_sweep = tokio::time::Instant::now();
            let live: Vec<NodeId> =
                view.load().nodes.iter().filter(|(_, n)| !n.down).map(|(id, _)| *id).collect();
            for node in live {
                deliver_to(&pool, &view, node).await;
            }
        }
    }
}
