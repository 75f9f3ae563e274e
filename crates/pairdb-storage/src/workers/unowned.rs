//! Deleting data this node no longer owns: once the placement (topology, tenants' N) has been
//! unchanged for `unowned_grace` in one unbroken live watch session, with no migration, records of
//! tenants this node no longer replicates are deleted. A node cut off from meta may be looking at a
//! topology that is no longer current, so it deletes nothing until it is back and settled again.
//! The rule is `pairdb_core::gc::settle` (placements compared by value, time as input); the
//! placement is re-checked before each partition, and tenants the view does not know are kept.
//! A pass over every partition that finishes records the revision of the view it ran from, which
//! the heartbeat reports: meta then clears the mark a migration left on this node, and tombstone GC
//! everywhere stops waiting for it (`pairdb_core::gc::leftovers`).

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::gc::{SettleTracker, SettledPlacement};
use pairdb_service::cluster_view::ClusterView;
use tokio::time::Instant;

use super::{Context, Worker, WorkerError};

/// Records deleted per engine call.
const DELETE_BATCH: usize = 1000;

#[derive(Debug)]
pub struct UnownedCleanup {
    context: Context,
    tracker: SettleTracker,
    /// The origin of the monotonic milliseconds the tracker is fed.
    started: Instant,
}

impl UnownedCleanup {
    pub fn new(context: Context) -> Self {
        let grace_ms = context.settings.unowned_grace.as_millis() as u64;
        Self { context, tracker: SettleTracker::new(grace_ms), started: Instant::now() }
    }

    fn tick(&self) -> Duration {
        (self.context.settings.unowned_grace / 4).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }

    /// What the view settles on now, `None` while nothing may be deleted.
    fn settled_now(&self) -> Option<SettledPlacement> {
        self.context.view.load().cluster_placement().settled(self.context.view.session())
    }

    /// One pass over every partition with data; `true` if it finished under `settled`.
    async fn drop_unowned(
        &self,
        view: &ClusterView,
        settled: &SettledPlacement,
    ) -> Result<bool, WorkerError> {
        let Some(current) = &view.current else { return Ok(false) };
        let me = self.context.me();
        let placement = view.cluster_placement();
        let mut total = 0;
        for partition in self.context.engine.partitions_with_data() {
            // The placement changed, or the view stopped being live, meanwhile: start over after a
            // new grace period.
            if self.settled_now().as_ref() != Some(settled) {
                return Ok(false);
            }
            let unowned = Arc::new(placement.unowned(current.list(partition), me));
            if unowned.is_empty() {
                continue;
            }
            loop {
                let unowned = unowned.clone();
                let (deleted, complete) = self
                    .context
                    .blocking(move |engine| {
                        engine.delete_unowned(partition, &|t| unowned.drops(t), DELETE_BATCH)
                    })
                    .await?;
                total += deleted;
                if complete {
                    break;
                }
            }
        }
        if total > 0 {
            metrics::counter!("pairdb_storage_unowned_records_deleted_total").increment(total);
            tracing::info!(deleted = total, epoch = view.epoch, "deleted data this node no longer owns");
        }
        Ok(true)
    }
}

impl Worker for UnownedCleanup {
    const NAME: &'static str = "unowned_cleanup";

    async fn step(&mut self) -> Result<Duration, WorkerError> {
        let view = self.context.view.load();
        let now = view.cluster_placement().settled(self.context.view.session());
        let now_ms = self.started.elapsed().as_millis() as u64;
        if let Some(settled) = self.tracker.observe(now, now_ms).cloned()
            && self.drop_unowned(&view, &settled).await?
        {
            self.context.cleanup.record(view.revision);
        }
        Ok(self.tick())
    }

    fn retry_after(&self) -> Duration {
        self.tick()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pairdb_core::ring::{Assignment, NodeId, NodeSpec};
    use pairdb_core::token::PartitionCount;
    use pairdb_service::cluster_view::{ClusterView, SharedView};

    fn view_with_topology(epoch: u64) -> ClusterView {
        let nodes: Vec<NodeSpec> =
            (1..=3).map(|id| NodeSpec { id: NodeId(id), weight: 1, zone: None }).collect();
        let current = Assignment::compute(None, &nodes, PartitionCount::new(16).unwrap()).unwrap();
        ClusterView { epoch, current: Some(Arc::new(current)), ..ClusterView::default() }
    }

    fn settled(shared: &SharedView, view: &ClusterView) -> Option<pairdb_core::gc::SettledPlacement> {
        view.cluster_placement().settled(shared.session())
    }

    #[test]
    fn unowned_data_waits_for_a_live_unbroken_watch_session() {
        let shared = SharedView::default();
        let view = view_with_topology(1);
        assert_eq!(settled(&shared, &view), None, "never connected: the view may be stale");

        shared.set_session(1);
        let first = settled(&shared, &view).unwrap();
        assert_eq!(settled(&shared, &view), Some(first.clone()), "stable while nothing changes");

        shared.set_session(0);
        assert_eq!(settled(&shared, &view), None, "stream broken: nothing is deleted");

        shared.set_session(2);
        let reconnected = settled(&shared, &view).unwrap();
        assert_ne!(reconnected, first, "a new session restarts the grace period");

        let next_epoch = view_with_topology(2);
        assert_ne!(settled(&shared, &next_epoch), Some(reconnected), "a new topology restarts it");

        let mut migrating = view_with_topology(2);
        migrating.pending = migrating.current.clone();
        assert_eq!(settled(&shared, &migrating), None, "nothing is deleted during a migration");
        assert_eq!(settled(&shared, &ClusterView::default()), None, "no topology yet");
    }

    /// A pass that finishes records the revision of the view it ran from (reported with the next
    /// heartbeat); none is recorded before the placement settled.
    #[tokio::test]
    async fn a_finished_pass_records_the_revision_it_ran_from() {
        use crate::workers::{Context, Worker};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = crate::Config::for_node(1, dir.path().to_path_buf());
        config.unowned_grace_secs = 0;
        let context = Context {
            engine: crate::open_engine(&config).expect("engine"),
            view: SharedView::default(),
            clients: pairdb_service::clients::InternalClients::insecure(),
            settings: Arc::new(config.worker_settings()),
            cleanup: Arc::default(),
        };
        context.view.store(ClusterView { revision: 17, ..view_with_topology(1) });
        context.view.set_session(1);
        let mut worker = super::UnownedCleanup::new(context.clone());
        worker.step().await.expect("step");
        assert_eq!(context.cleanup.get(), 0, "first sight of the placement: the grace starts");
        worker.step().await.expect("step");
        assert_eq!(context.cleanup.get(), 17);
        context.view.store(ClusterView { revision: 18, ..view_with_topology(1) });
        context.view.set_session(0);
        worker.step().await.expect("step");
        assert_eq!(context.cleanup.get(), 17, "no live session: no pass");
    }
}
