//! Leader election and the leader-only background work (failure detector, migration orchestrator,
//! tenant deletions, quota evaluation, the live-router count, change-log pruning).
//!
//! On PostgreSQL every replica tries `pg_try_advisory_lock(key)` once per [`RETRY_INTERVAL`] on a
//! dedicated connection (never a pooled one: a session lock belongs to its session, and a pooled
//! session would outlive the replica's interest in it). The key is derived from the database and
//! schema, so clusters sharing a server never contend. The holder is the leader until its session
//! ends: when the process dies the server closes the session and releases the lock, and the next
//! replica to try takes over (within about a second of the server noticing; a kill -9 is noticed at
//! once). The leader checks its connection every [`RETRY_INTERVAL`]; if the check fails it stops its
//! background work immediately and competes again once the database is back.
//!
//! Leader-only writes also carry a fence: [`crate::persistence::Tx::check_leader`] verifies, inside
//! the same transaction, that the session the leader was elected on still holds the lock, so a
//! replica that lost leadership without noticing yet cannot commit leader work.
//!
//! With SQLite there is one replica, and it is always the leader.

use std::sync::Arc;
use std::time::Duration;

use pairdb_service::shutdown::{Shutdown, ShutdownTrigger};
use sqlx::Connection;
use tokio::task::JoinHandle;

use crate::admin::{Meta, now_ms};
use crate::error::MetaError;
use crate::model::Membership;
use crate::orchestrator::{self, DataMover};
use crate::persistence::{Backend, ChangeKind, LeaderFence};

/// How often a follower tries to become leader and the leader checks its lock connection.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Change-log rows kept behind the latest revision (a replica further behind reloads a snapshot).
const CHANGES_KEPT: u64 = 10_000;
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// How often the leader looks for tenant deletions every storage node has confirmed.
const DELETION_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Campaigns for leadership until `stop` is set; runs the leader work while elected.
pub async fn run(meta: Meta, mover: Arc<dyn DataMover>, mut stop: Shutdown) {
    metrics::gauge!("pairdb_meta_is_leader").set(0.0);
    // Wait until the database is initialized (the lock key depends on it).
    while !meta.is_initialized() {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.wait() => return,
        }
    }
    if meta.store().backend() == Backend::Sqlite {
        let work = spawn_leader_work(&meta, &mover, LeaderFence { backend_pid: None }, &stop);
        metrics::gauge!("pairdb_meta_is_leader").set(1.0);
        tracing::info!("leader (single SQLite replica)");
        let _ = stop.wait().await;
        work.stop().await;
        metrics::gauge!("pairdb_meta_is_leader").set(0.0);
        return;
    }
    let Some(key) = meta.store().leader_lock_key() else { return };
    let mut connection: Option<sqlx::PgConnection> = None;
    let mut work: Option<LeaderWork> = None;
    let mut reported_error = false;
    loop {
        let result: Result<(), MetaError> = async {
            if connection.is_none() {
                connection = Some(meta.store().dedicated_pg_connection().await?);
            }
            let Some(conn) = connection.as_mut() else { return Ok(()) };
            if work.is_none() {
                let acquired: bool = tokio::time::timeout(
                    meta.store().timeout(),
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut *conn),
                )
                .await
                .map_err(|_| MetaError::DatabaseUnavailable("leader lock attempt timed out".to_owned()))?
                .map_err(crate::persistence::PersistenceError::from)?;
                if acquired {
                    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(crate::persistence::PersistenceError::from)?;
                    tracing::info!(backend_pid = pid, "became the leader");
                    metrics::gauge!("pairdb_meta_is_leader").set(1.0);
                    work =
                        Some(spawn_leader_work(&meta, &mover, LeaderFence { backend_pid: Some(pid) }, &stop));
                }
            } else {
                tokio::time::timeout(meta.store().timeout(), conn.ping())
                    .await
                    .map_err(|_| {
                        MetaError::DatabaseUnavailable("leader connection check timed out".to_owned())
                    })?
                    .map_err(crate::persistence::PersistenceError::from)?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => reported_error = false,
            Err(error) => {
                if let Some(lost) = work.take() {
                    tracing::warn!(%error, "lost leadership: the lock connection failed");
                    metrics::gauge!("pairdb_meta_is_leader").set(0.0);
                    lost.stop().await;
                } else if !reported_error {
                    tracing::warn!(%error, "cannot campaign for leadership; retrying");
                }
                reported_error = true;
                connection = None;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_INTERVAL) => {}
            _ = stop.wait() => break,
        }
    }
    if let Some(work) = work.take() {
        work.stop().await;
    }
    if let Some(connection) = connection.take() {
        // Ending the session releases the lock; the next replica takes over within a second.
        let _ = connection.close().await;
    }
    metrics::gauge!("pairdb_meta_is_leader").set(0.0);
}

/// The leader's background tasks.
struct LeaderWork {
    stop: Arc<ShutdownTrigger>,
    tasks: Vec<JoinHandle<()>>,
}

impl LeaderWork {
    /// Stops the tasks: asks them to return, and aborts whatever does not within a moment (a task
    /// blocked on a dead connection), which rolls back its open transaction.
    async fn stop(self) {
        self.stop.trigger();
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_millis(500), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

fn spawn_leader_work(
    meta: &Meta,
    mover: &Arc<dyn DataMover>,
    fence: LeaderFence,
    outer_stop: &Shutdown,
) -> LeaderWork {
    let (stop, receiver) = pairdb_service::shutdown::channel();
    let stop = Arc::new(stop);
    // Stop when either leadership or the process ends.
    let mut outer = outer_stop.clone();
    let forward = stop.clone();
    let forwarder = tokio::spawn(async move {
        outer.wait().await;
        forward.trigger();
    });
    let tasks = vec![
        forwarder,
        tokio::spawn(orchestrator::run(meta.clone(), mover.clone(), fence, receiver.clone())),
        tokio::spawn(failure_detector(meta.clone(), fence, receiver.clone())),
        tokio::spawn(finish_tenant_deletions(meta.clone(), fence, receiver.clone())),
        tokio::spawn(crate::usage::run(meta.clone(), fence, receiver.clone())),
        tokio::spawn(crate::routers::run(meta.clone(), fence, receiver.clone())),
        tokio::spawn(prune_changes(meta.clone(), fence, receiver)),
    ];
    LeaderWork { stop, tasks }
}

/// Marks nodes down after `node_down_after_ms` of silence. Silence is counted from the later of the
/// node's last heartbeat, its creation and the moment this replica became leader, so a new leader
/// (or one back from a database outage, during which heartbeats could not be recorded) first gives
/// every node a full period to be heard from. Nodes are marked alive again by their next heartbeat
/// (`Meta::heartbeat`), not here.
async fn failure_detector(meta: Meta, fence: LeaderFence, mut stop: Shutdown) {
    let down_after = meta.settings().node_down_after_ms;
    let tick = Duration::from_millis((down_after / 10).clamp(20, 500));
    let leader_since = now_ms();
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = stop.wait() => return,
        }
        if let Err(error) = detect_once(&meta, fence, down_after, leader_since).await {
            tracing::debug!(%error, "failure detector pass failed");
        }
    }
}

async fn detect_once(
    meta: &Meta,
    fence: LeaderFence,
    down_after: u64,
    leader_since: u64,
) -> Result<(), MetaError> {
    let nodes = {
        let mut tx = meta.store().read().await?;
        let nodes = tx.list_nodes().await?;
        tx.commit().await?;
        nodes
    };
    let now = now_ms();
    for node in nodes.into_iter().filter(|n| n.alive && n.membership != Membership::Removed) {
        let heard = node.last_heartbeat_ms.max(node.created_at_ms).max(leader_since);
        if now.saturating_sub(heard) <= down_after {
            continue;
        }
        let mut tx = meta.store().write().await?;
        tx.set_now(now);
        tx.check_leader(fence).await?;
        if tx.mark_node_dead(node.node_id, now.saturating_sub(down_after), now).await? {
            tx.record_change(ChangeKind::Node, &node.node_id.to_string()).await?;
            tx.commit().await?;
            tracing::warn!(
                node_id = %node.node_id,
                silent_ms = now.saturating_sub(heard),
                "storage node marked down"
            );
        }
    }
    Ok(())
}

/// Completes tenant deletions every storage node has purged ([`crate::deletion`]).
async fn finish_tenant_deletions(meta: Meta, fence: LeaderFence, mut stop: Shutdown) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(DELETION_CHECK_INTERVAL) => {}
            _ = stop.wait() => return,
        }
        if let Err(error) = meta.finish_tenant_deletions(fence).await {
            tracing::debug!(%error, "tenant deletion pass failed");
        }
    }
}

/// Keeps the change log bounded.
async fn prune_changes(meta: Meta, fence: LeaderFence, mut stop: Shutdown) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
            _ = stop.wait() => return,
        }
        let pruned: Result<u64, MetaError> = async {
            let mut tx = meta.store().write().await?;
            tx.check_leader(fence).await?;
            let revision = tx.revision();
            let pruned = tx.prune_changes(revision.saturating_sub(CHANGES_KEPT)).await?;
            tx.commit().await?;
            Ok(pruned)
        }
        .await;
        match pruned {
            Ok(0) => {}
            Ok(rows) => tracing::debug!(rows, "pruned the change log"),
            Err(error) => tracing::debug!(%error, "change-log pruning failed"),
        }
    }
}
