//! Storage nodes: adding, re-weighting, draining and removing them, and their registrations and
//! heartbeats.

use super::*;

impl Meta {
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
        let view = self.node_view(&mut tx, node).await?;
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
            None => tx
                .max_node_id()
                .await?
                .checked_add(1)
                .map(NodeId)
                .ok_or_else(|| MetaError::InvalidNode("node ids exhausted".to_owned()))?,
            Some(id) => id,
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
            // A new or re-added node starts from an empty data directory: nothing left over.
            leftovers_since_revision: 0,
            leftovers_cleaned_revision: 0,
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
            tracing::info!(node_id = %node_id, epoch, "first topology version created (bootstrap)");
            return Ok((node, None));
        }
        tx.upsert_node(&node).await?;
        tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
        let migration = new_migration(tx, MigrationChange::AddNode { node_id, weight }, now).await?;
        tx.insert_migration(&migration).await?;
        tracing::info!(node_id = %node_id, migration = %migration.migration_id, "storage node added; add_node migration queued");
        Ok((node, Some(migration.migration_id)))
    }

    pub async fn get_node(&self, node_id: NodeId) -> Result<NodeView, MetaError> {
        let mut tx = self.read().await?;
        let node = tx.get_node(node_id).await?.ok_or(MetaError::NodeNotFound(node_id))?;
        let view = self.node_view(&mut tx, node).await?;
        tx.commit().await?;
        Ok(view)
    }

    /// Starts (`start`) or reports a storage node's rebuild, which the node runs itself: meta only
    /// relays, so nothing about it is stored here.
    pub async fn node_rebuild(&self, node_id: NodeId, start: bool) -> Result<NodeRebuild, MetaError> {
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
        let positions = ring_positions(&mut tx).await?;
        tx.commit().await?;
        let (max_clock_offset_ms, now) = (self.inner.settings.max_clock_offset_ms, now_ms());
        Ok(nodes.into_iter().map(|node| NodeView::new(node, &positions, max_clock_offset_ms, now)).collect())
    }

    /// Changes a node's weight or zone. For a node in the ring that queues a `node_weight` migration
    /// (placement is recomputed); for a joining node the change is simply recorded.
    pub async fn update_node(
        &self,
        node_id: NodeId,
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
            let view = self.node_view(&mut tx, node).await?;
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
            let change = MigrationChange::NodeWeight { node_id, from: old_weight, to: weight };
            let migration = new_migration(&mut tx, change, now).await?;
            tx.insert_migration(&migration).await?;
            migration_id = Some(migration.migration_id);
        }
        let view = self.node_view(&mut tx, node).await?;
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
        node_id: NodeId,
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
            unfinished
                .iter()
                .find(|m| m.change.node_id() == Some(node_id) && kinds.contains(&m.change.kind()))
                .cloned()
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
                for mut pending in unfinished.iter().filter(|m| m.change.node_id() == Some(node_id)).cloned()
                {
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
                let change = if force {
                    MigrationChange::RemoveNode { node_id }
                } else {
                    MigrationChange::DrainNode { node_id }
                };
                Some(new_migration(&mut tx, change, now).await?)
            }
        };
        node.updated_at_ms = now;
        tx.update_node(&node).await?;
        tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
        if let Some(migration) = &migration_id {
            tx.insert_migration(migration).await?;
        }
        let view = self.node_view(&mut tx, node).await?;
        tx.commit().await?;
        let migration_id = migration_id.map(|m| {
            tracing::info!(node_id = %node_id, force, migration = %m.migration_id, kind = m.change.kind().as_str(), "node removal queued");
            self.inner.orchestrator_wake.notify_one();
            m.migration_id
        });
        Ok((view, migration_id))
    }

    /// A storage process announces itself (see the module documentation). Returns its node id.
    pub async fn register_node(&self, registration: Registration) -> Result<NodeId, MetaError> {
        let (mut tx, now) = self.write().await?;
        let mut queued_migration = false;
        let existing = match registration.node_id {
            None => None,
            Some(id) => tx.get_node(id).await?,
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
                        node_id = %node.node_id,
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
                    node_id = %node.node_id,
                    "unknown storage node added on registration (auto-add)"
                );
                node.node_id
            }
            None => {
                return Err(MetaError::NodeNotFound(registration.node_id.unwrap_or(NodeId(0))));
            }
        };
        tx.commit().await?;
        // Woken only after the commit, or the orchestrator could look before the migration exists
        // and sleep a whole poll interval.
        if queued_migration {
            self.inner.orchestrator_wake.notify_one();
        }
        tracing::debug!(node_id = %node_id, address = %registration.address, "storage node registered");
        Ok(node_id)
    }

    /// Records a heartbeat, the tenant purges it reports and, when it carries a usage report
    /// (`usage`: the node's share of every tenant it holds any of), that report, replacing the
    /// node's previous one; the answer says whether the node is known (if not, it should register
    /// again) and carries meta's clock for the node's offset measurement. A node that was marked
    /// down is marked alive again at once.
    pub async fn heartbeat(
        &self,
        node_id: NodeId,
        stats: NodeStats,
        report: &HeartbeatReport<'_>,
    ) -> Result<HeartbeatAck, MetaError> {
        self.partitions()?;
        let received_ms = now_ms();
        let known = self.record_heartbeat(node_id, stats, report, received_ms).await?;
        // Halfway between receiving and answering: the node's estimate takes the round trip's
        // midpoint as the instant meta read its clock, so time spent here must not bias it.
        let answered_ms = now_ms();
        let meta_unix_ms = received_ms + answered_ms.saturating_sub(received_ms) / 2;
        Ok(HeartbeatAck { known, meta_unix_ms })
    }

    /// [`Meta::heartbeat`] at `now`; `false` for an unknown node.
    async fn record_heartbeat(
        &self,
        node_id: NodeId,
        stats: NodeStats,
        report: &HeartbeatReport<'_>,
        now: u64,
    ) -> Result<bool, MetaError> {
        for (tenant, purge_seq) in report.purged_tenants {
            if self.inner.store.confirm_tenant_purge(tenant, *purge_seq, node_id, now).await? {
                tracing::info!(node_id = %node_id, tenant, purge_seq, "storage node purged a deleted tenant");
            }
        }
        let store = &self.inner.store;
        let Some(recorded) =
            store.record_heartbeat(node_id, &stats, report.unowned_cleanup_revision, now).await?
        else {
            return Ok(false);
        };
        self.observe_clock_offset(node_id, &stats);
        if let Some(shares) = report.usage {
            store.record_usage(node_id, shares, now).await?;
        }
        if recorded.alive && !recorded.leftovers_cleaned {
            return Ok(true);
        }
        let (mut tx, now) = self.write().await?;
        let mut changed = false;
        if !recorded.alive && tx.mark_node_alive(node_id, now).await? {
            changed = true;
            tracing::info!(node_id = %node_id, "storage node is alive again");
        }
        if recorded.leftovers_cleaned && tx.clear_leftovers(node_id).await? {
            changed = true;
            tracing::info!(
                node_id = %node_id,
                revision = report.unowned_cleanup_revision,
                "storage node deleted the data a migration took from it; tombstone GC no longer waits for it"
            );
        }
        if changed {
            tx.record_change(ChangeKind::Node, &node_id.to_string()).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Exports a node's reported clock offset and logs when it crosses `--max-clock-offset-ms`, once
    /// per crossing either way. A heartbeat without a measurement (a node that just started) changes
    /// neither: the last known verdict stands until the node measures again.
    fn observe_clock_offset(&self, node_id: NodeId, stats: &NodeStats) {
        let Some(offset_ms) = stats.clock_offset_ms else { return };
        metrics::gauge!("pairdb_meta_node_clock_offset_seconds", "node_id" => node_id.to_string())
            .set(offset_ms as f64 / 1000.0);
        let max_offset_ms = self.inner.settings.max_clock_offset_ms;
        let skewed = stats.clock_skewed(max_offset_ms);
        let crossed =
            self.inner.skewed_nodes.lock().unwrap_or_else(PoisonError::into_inner).crossed(node_id, skewed);
        match crossed {
            Some(true) => tracing::warn!(
                node_id = %node_id,
                clock_offset_ms = offset_ms,
                max_clock_offset_ms = max_offset_ms,
                "storage node's clock is off from meta's by more than the bound; the wall-clock times \
                 it takes (last-writer-wins timestamps, expiry checks) are off by as much"
            ),
            Some(false) => tracing::info!(
                node_id = %node_id,
                clock_offset_ms = offset_ms,
                max_clock_offset_ms = max_offset_ms,
                "storage node's clock is back within the bound"
            ),
            None => {}
        }
    }
}
