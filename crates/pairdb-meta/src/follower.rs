//! Keeps the replica's [`WatchSource`] in step with the database's change log.
//!
//! Every committed change has a revision (see [`crate::persistence`]). The follower wakes when
//!
//! - this replica committed a change (in-process notification, immediate),
//! - another replica did (PostgreSQL `NOTIFY` on the cluster's channel, carrying the revision), or
//! - the safety poll fires (every [`POLL_INTERVAL`]), which covers notifications lost while the
//!   listener connection was down,
//!
//! then reads the changes after the view's revision and, in the same snapshot, the current state of
//! each changed entity, and applies them in order. Reading the entity's *current* state rather than
//! a stored copy is safe because events carry whole entities: a lagging replica may publish a newer
//! state early, and the later change publishes it again. Revisions are contiguous; a gap means the log
//! was pruned below the view, and the view is reloaded from a full snapshot.
//!
//! Polling the database here is the replica's own business: routers and storage nodes never poll, they
//! hold a watch stream.

use std::sync::Arc;
use std::time::Duration;

use pairdb_core::ring::NodeId;
use pairdb_service::shutdown::Shutdown;
use tokio::sync::Notify;

use crate::model::ApiKeyHash;
use crate::persistence::{Change, ChangeKind, PersistenceError, Store, Tx};
use crate::view::{Event, WatchSource};

/// The safety poll: the longest a change can take to reach this replica's subscribers when its
/// notification was lost.
pub const POLL_INTERVAL: Duration = Duration::from_millis(1000);

/// Changes read per round trip.
const BATCH: u32 = 256;

/// Follows the change log until `stop` is set. `wake` is notified by the PostgreSQL listener.
pub async fn run(store: Store, view: Arc<WatchSource>, wake: Arc<Notify>, mut stop: Shutdown) {
    let local = store.local_changes();
    let mut failing = false;
    loop {
        match catch_up(&store, &view).await {
            Ok(()) => {
                if failing {
                    tracing::info!("change log reachable again");
                    failing = false;
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot follow the change log; retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = local.notified() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = stop.wait() => return,
        }
        if stop.is_triggered() {
            return;
        }
    }
}

/// Brings the view up to the database's latest revision.
pub async fn catch_up(store: &Store, view: &WatchSource) -> Result<(), PersistenceError> {
    loop {
        let Some(cursor) = view.revision() else {
            view.replace(store.load_snapshot().await?);
            continue;
        };
        let mut tx = store.read().await?;
        let changes = tx.changes_after(cursor, BATCH).await?;
        let contiguous =
            changes.iter().zip(cursor + 1..).all(|(change, expected)| change.revision == expected);
        if !contiguous || (changes.is_empty() && tx.meta_state().await?.revision > cursor) {
            drop(tx);
            tracing::warn!(cursor, "change log pruned below this replica's revision; reloading the view");
            view.replace(store.load_snapshot().await?);
            continue;
        }
        let mut events = Vec::with_capacity(changes.len());
        for change in &changes {
            events.push((change.revision, load_event(&mut tx, change).await?));
        }
        tx.commit().await?;
        for (revision, event) in events {
            view.apply(revision, event);
        }
        if changes.len() < BATCH as usize {
            return Ok(());
        }
    }
}

/// The event a change publishes: the entity's state as of the reading snapshot.
async fn load_event(tx: &mut Tx, change: &Change) -> Result<Option<Event>, PersistenceError> {
    let epoch = || {
        change
            .entity
            .parse::<u64>()
            .map_err(|_| PersistenceError::Corrupt(format!("change {change:?}: bad epoch")))
    };
    Ok(match change.kind {
        ChangeKind::Tenant => tx.get_tenant(&change.entity).await?.map(Event::TenantChanged),
        ChangeKind::TenantDeleted => Some(Event::TenantDeleted(change.entity.clone())),
        ChangeKind::Node => {
            let node_id = change
                .entity
                .parse::<u32>()
                .map(NodeId)
                .map_err(|_| PersistenceError::Corrupt(format!("change {change:?}: bad node id")))?;
            tx.get_node(node_id).await?.map(Event::NodeChanged)
        }
        ChangeKind::ApiKeyAdded => tx
            .get_api_key(&change.entity)
            .await?
            .filter(|key| !key.revoked())
            .map(|key| Event::ApiKeyAdded(ApiKeyHash::from(&key))),
        ChangeKind::ApiKeyRevoked => Some(Event::ApiKeyRevoked(change.entity.clone())),
        ChangeKind::TopologyCurrent => tx.get_topology(epoch()?).await?.map(Event::TopologyCurrent),
        ChangeKind::TopologyPending => tx.get_topology(epoch()?).await?.map(Event::TopologyPending),
        ChangeKind::TopologyPendingCleared => Some(Event::TopologyPendingCleared),
        ChangeKind::ContextKeys => Some(Event::ContextKeysChanged(tx.context_keys().await?)),
        // The count itself is the entity: each change publishes the count it recorded.
        ChangeKind::LiveRouters => {
            Some(Event::LiveRoutersChanged(change.entity.parse::<u32>().map_err(|_| {
                PersistenceError::Corrupt(format!("change {change:?}: bad live-router count"))
            })?))
        }
    })
}

/// Listens for other replicas' change notifications (PostgreSQL only) and wakes the follower. The
/// listener reconnects by itself; notifications lost meanwhile are caught by the safety poll.
pub async fn listen(store: Store, wake: Arc<Notify>, mut stop: Shutdown) {
    let Some(pool) = store.pg_pool().cloned() else { return };
    let Some(channel) = store.notify_channel() else { return };
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            tracing::debug!(%channel, "listening for change notifications");
            // Catch up on anything committed while the listener was down.
            wake.notify_one();
            loop {
                let notification = listener.recv().await?;
                tracing::trace!(revision = notification.payload(), "change notification");
                wake.notify_one();
            }
        };
        let result: Result<(), sqlx::Error> = tokio::select! {
            result = listener => result,
            _ = stop.wait() => return,
        };
        if let Err(error) = result {
            tracing::debug!(%error, "change listener lost its connection; reconnecting");
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait() => return,
        }
    }
}
