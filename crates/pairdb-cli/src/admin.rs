//! Admin commands against the metadata service: tenants, API keys, storage nodes and migrations.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pairdb_client::AdminClient;
use pairdb_client::proto::admin::v1 as pb;
use pairdb_client::proto::convert;
use pairdb_core::ring::NodeId;
use serde_json::{Value, json};

use crate::cli::{
    ApiKeyCommand, ConflictModeArg, ConsistencyArg, Globals, MigrationCommand, NodeCommand, TenantCommand,
    TenantSettings,
};
use crate::output::{self, Output};

/// Prints one object: all its fields as a table, or the JSON document.
fn show(format: Output, value: &Value) {
    match format {
        Output::Json => output::print_json(value),
        Output::Table => output::print_fields(value),
    }
}

fn consistency(value: Option<ConsistencyArg>) -> Option<i32> {
    use pairdb_core::quorum::Consistency;
    value.map(|value| {
        convert::consistency_to_wire(Some(match value {
            ConsistencyArg::One => Consistency::One,
            ConsistencyArg::Quorum => Consistency::Quorum,
            ConsistencyArg::All => Consistency::All,
        }))
    })
}

fn conflict_mode(value: Option<ConflictModeArg>) -> Option<i32> {
    use pairdb_core::tenant::ConflictMode;
    value.map(|value| {
        convert::conflict_mode_to_wire(Some(match value {
            ConflictModeArg::Siblings => ConflictMode::Siblings,
            ConflictModeArg::Lww => ConflictMode::Lww,
        }))
    })
}

fn change_json(name: &str, value: Value, migration_id: &str) -> Value {
    let migration_id =
        if migration_id.is_empty() { Value::Null } else { Value::String(migration_id.to_owned()) };
    json!({ name: value, "migration_id": migration_id })
}

pub async fn tenant(globals: &Globals, command: TenantCommand) -> anyhow::Result<()> {
    let admin = globals.admin().await?;
    match command {
        TenantCommand::Create { tenant_id, settings } => {
            let TenantSettings {
                replication_factor,
                default_consistency,
                conflict_mode: mode,
                rate_limit_ops_per_sec,
                rate_limit_burst,
                max_value_bytes,
                max_siblings,
                strict_quorum,
            } = settings;
            let tenant = admin
                .create_tenant(pb::CreateTenantRequest {
                    tenant_id,
                    replication_factor: replication_factor.unwrap_or(0),
                    default_consistency: consistency(default_consistency).unwrap_or(0),
                    conflict_mode: conflict_mode(mode).unwrap_or(0),
                    rate_limit_ops_per_sec: rate_limit_ops_per_sec.unwrap_or(0),
                    rate_limit_burst: rate_limit_burst.unwrap_or(0),
                    max_value_bytes: max_value_bytes.unwrap_or(0),
                    max_siblings: max_siblings.unwrap_or(0),
                    strict_quorum: strict_quorum.unwrap_or(false),
                })
                .await?;
            show(globals.output, &output::tenant_json(&tenant));
        }
        TenantCommand::Get { tenant_id } => {
            let tenant = admin.get_tenant(pb::GetTenantRequest { tenant_id }).await?;
            show(globals.output, &output::tenant_json(&tenant));
        }
        TenantCommand::List => {
            let tenants = admin.list_tenants(pb::ListTenantsRequest {}).await?.tenants;
            match globals.output {
                Output::Json => output::print_json(&json!({
                    "tenants": tenants.iter().map(output::tenant_json).collect::<Vec<_>>()
                })),
                Output::Table => output::print_table(
                    &["TENANT", "STATE", "RF", "CONSISTENCY", "CONFLICTS", "OPS/S", "MAX VALUE"],
                    &tenants
                        .iter()
                        .map(|tenant| {
                            let body = output::tenant_json(tenant);
                            vec![
                                tenant.tenant_id.clone(),
                                body["state"].as_str().unwrap_or_default().to_owned(),
                                tenant.replication_factor.to_string(),
                                body["default_consistency"].as_str().unwrap_or_default().to_owned(),
                                body["conflict_mode"].as_str().unwrap_or_default().to_owned(),
                                tenant.rate_limit_ops_per_sec.to_string(),
                                tenant.max_value_bytes.to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        TenantCommand::Update { tenant_id, settings } => {
            let reply = admin
                .update_tenant(pb::UpdateTenantRequest {
                    tenant_id,
                    replication_factor: settings.replication_factor,
                    default_consistency: consistency(settings.default_consistency),
                    conflict_mode: conflict_mode(settings.conflict_mode),
                    rate_limit_ops_per_sec: settings.rate_limit_ops_per_sec,
                    rate_limit_burst: settings.rate_limit_burst,
                    max_value_bytes: settings.max_value_bytes,
                    max_siblings: settings.max_siblings,
                    strict_quorum: settings.strict_quorum,
                })
                .await?;
            let tenant = reply.tenant.as_ref().map(output::tenant_json).unwrap_or(Value::Null);
            show(globals.output, &change_json("tenant", tenant, &reply.migration_id));
        }
        TenantCommand::Delete { tenant_id } => {
            let reply = admin.delete_tenant(pb::DeleteTenantRequest { tenant_id: tenant_id.clone() }).await?;
            let tenant = reply.tenant.as_ref().map(output::tenant_json).unwrap_or(Value::Null);
            match globals.output {
                Output::Json => output::print_json(&tenant),
                Output::Table => {
                    let purge = &tenant["purge"];
                    println!(
                        "deleting tenant {tenant_id}: storage nodes are purging its data ({} of {} done); \
                         `pairdb tenant get {tenant_id}` shows progress, the id can be reused once all are done",
                        purge["nodes_done"], purge["nodes_total"]
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn api_key(globals: &Globals, command: ApiKeyCommand) -> anyhow::Result<()> {
    let admin = globals.admin().await?;
    match command {
        ApiKeyCommand::Create { tenant_id, description } => {
            let reply = admin.create_api_key(pb::CreateApiKeyRequest { tenant_id, description }).await?;
            let key = reply.api_key.as_ref().map(output::api_key_json).unwrap_or(Value::Null);
            match globals.output {
                Output::Json => output::print_json(&json!({"api_key": key, "secret": reply.secret})),
                Output::Table => {
                    output::print_fields(&key);
                    println!("secret        {}", reply.secret);
                    eprintln!("(the secret is shown only once; store it now)");
                }
            }
        }
        ApiKeyCommand::List { tenant_id } => {
            let keys = admin
                .list_api_keys(pb::ListApiKeysRequest { tenant_id: tenant_id.unwrap_or_default() })
                .await?
                .api_keys;
            match globals.output {
                Output::Json => output::print_json(&json!({
                    "api_keys": keys.iter().map(output::api_key_json).collect::<Vec<_>>()
                })),
                Output::Table => output::print_table(
                    &["KEY ID", "TENANT", "REVOKED", "DESCRIPTION"],
                    &keys
                        .iter()
                        .map(|key| {
                            vec![
                                key.key_id.clone(),
                                key.tenant_id.clone(),
                                key.revoked.to_string(),
                                key.description.clone(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        ApiKeyCommand::Revoke { key_id } => {
            let reply = admin.revoke_api_key(pb::RevokeApiKeyRequest { key_id }).await?;
            let key = reply.api_key.as_ref().map(output::api_key_json).unwrap_or(Value::Null);
            show(globals.output, &json!({"api_key": key}));
        }
    }
    Ok(())
}

pub async fn node(globals: &Globals, command: NodeCommand) -> anyhow::Result<()> {
    let admin = globals.admin().await?;
    match command {
        NodeCommand::Add { address, node_id, zone, weight } => {
            let request = pb::AddStorageNodeRequest { node_id: node_id.unwrap_or(0), address, zone, weight };
            add_node(globals, &admin, request).await?;
        }
        NodeCommand::List => {
            let nodes = admin.list_storage_nodes(pb::ListStorageNodesRequest {}).await?.nodes;
            show_nodes(globals.output, &nodes);
        }
        NodeCommand::Get { node_id } => {
            let node = admin.get_storage_node(pb::GetStorageNodeRequest { node_id }).await?;
            show(globals.output, &output::node_json(&node));
        }
        NodeCommand::Remove { node_id, force } => {
            let reply = admin.remove_storage_node(pb::RemoveStorageNodeRequest { node_id, force }).await?;
            let node = reply.node.as_ref().map(output::node_json).unwrap_or(Value::Null);
            show(globals.output, &change_json("node", node, &reply.migration_id));
        }
        NodeCommand::Rebuild { node_id, no_wait, interval_ms } => {
            let started = admin.rebuild_storage_node(pb::RebuildStorageNodeRequest { node_id }).await?;
            if no_wait {
                show(globals.output, &output::rebuild_json(&started));
                return Ok(());
            }
            let interval = Duration::from_millis(interval_ms.max(50));
            let rebuild = wait_for_rebuild(globals.output, &admin, NodeId(node_id), interval).await?;
            show(globals.output, &output::rebuild_json(&rebuild));
            check_rebuild(NodeId(node_id), &started, &rebuild)?;
        }
        NodeCommand::RebuildStatus { node_id } => {
            let rebuild = admin.get_node_rebuild(pb::GetNodeRebuildRequest { node_id }).await?;
            show(globals.output, &output::rebuild_json(&rebuild));
        }
    }
    Ok(())
}

async fn add_node(
    globals: &Globals,
    admin: &AdminClient,
    request: pb::AddStorageNodeRequest,
) -> anyhow::Result<()> {
    let reply = admin.add_storage_node(request).await?;
    let node = reply.node.as_ref().map(output::node_json).unwrap_or(Value::Null);
    let mut value = change_json("node", node, &reply.migration_id);
    if !reply.cluster_credential.is_empty() {
        value["cluster_credential"] = Value::String(reply.cluster_credential.clone());
    }
    show(globals.output, &value);
    if globals.output == Output::Table && !reply.cluster_credential.is_empty() {
        println!(
            "start the node with this credential in --cluster-credential-file (or PAIRDB_CLUSTER_CREDENTIAL); \
             `pairdb cluster credential node-<id>` prints it again"
        );
    }
    Ok(())
}

fn show_nodes(format: Output, nodes: &[pb::StorageNode]) {
    match format {
        Output::Json => output::print_json(&json!({
            "nodes": nodes.iter().map(output::node_json).collect::<Vec<_>>()
        })),
        Output::Table => output::print_table(
            &["NODE", "ADDRESS", "ZONE", "WEIGHT", "STATUS", "IN RING", "KEYS", "HINTS", "QUARANTINED"],
            &nodes
                .iter()
                .map(|node| {
                    let stats = node.stats.unwrap_or_default();
                    vec![
                        node.node_id.to_string(),
                        node.address.clone(),
                        node.zone.clone(),
                        node.weight.to_string(),
                        output::node_status_name(node.status).to_owned(),
                        node.in_ring.to_string(),
                        stats.keys.to_string(),
                        stats.hints_pending.to_string(),
                        stats.quarantined_records.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

/// Polls a node's rebuild until it is no longer running, showing progress.
async fn wait_for_rebuild(
    format: Output,
    admin: &AdminClient,
    node_id: NodeId,
    interval: Duration,
) -> anyhow::Result<pb::NodeRebuild> {
    let bar = partitions_bar(format);
    let rebuild = loop {
        let rebuild = admin.get_node_rebuild(pb::GetNodeRebuildRequest { node_id: node_id.0 }).await?;
        bar.set_length(rebuild.partitions_total);
        bar.set_position(rebuild.partitions_done);
        bar.set_message(format!(
            "node {node_id} rebuild {} | {} keys compared, {} repaired",
            rebuild.state, rebuild.keys_compared, rebuild.keys_repaired
        ));
        // A node that restarted meanwhile reports "idle": its rebuild is gone with it.
        if rebuild.state != "running" {
            break rebuild;
        }
        tokio::time::sleep(interval).await;
    };
    bar.finish();
    Ok(rebuild)
}

/// How a waited-for rebuild ended badly; the CLI prints the code first (docs/cli.md lists them).
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("REBUILD_INTERRUPTED: node {node} no longer reports the rebuild (it restarted?); run it again")]
    Interrupted { node: NodeId },
    #[error(
        "REBUILD_INCOMPLETE: node {node} could not exchange with a peer {failed_exchanges} time(s) (down or \
         failing); run it again once every replica is up"
    )]
    Incomplete { node: NodeId, failed_exchanges: u64 },
}

/// Fails unless the rebuild `started` finished and exchanged with every peer.
fn check_rebuild(
    node: NodeId,
    started: &pb::NodeRebuild,
    rebuild: &pb::NodeRebuild,
) -> Result<(), RebuildError> {
    if rebuild.state != "done" || rebuild.started_at_ms < started.started_at_ms {
        return Err(RebuildError::Interrupted { node });
    }
    if rebuild.failed_exchanges > 0 {
        return Err(RebuildError::Incomplete { node, failed_exchanges: rebuild.failed_exchanges });
    }
    Ok(())
}

/// A live progress bar over partitions in table output; hidden for JSON (only the result is printed).
fn partitions_bar(output: Output) -> ProgressBar {
    let bar = if output == Output::Table { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} partitions")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn finished(migration: &pb::Migration) -> bool {
    matches!(output::migration_state_name(migration.state), "completed" | "failed" | "cancelled")
}

pub async fn migration(globals: &Globals, command: MigrationCommand) -> anyhow::Result<()> {
    let admin = globals.admin().await?;
    match command {
        MigrationCommand::Get { migration_id } => {
            let migration = admin.get_migration(pb::GetMigrationRequest { migration_id }).await?;
            show(globals.output, &output::migration_json(&migration));
        }
        MigrationCommand::List => {
            let migrations = admin.list_migrations(pb::ListMigrationsRequest {}).await?.migrations;
            match globals.output {
                Output::Json => output::print_json(&json!({
                    "migrations": migrations.iter().map(output::migration_json).collect::<Vec<_>>()
                })),
                Output::Table => output::print_table(
                    &["MIGRATION", "KIND", "STATE", "EPOCHS", "PARTITIONS", "KEYS"],
                    &migrations
                        .iter()
                        .map(|migration| {
                            let progress = migration.progress.unwrap_or_default();
                            vec![
                                migration.migration_id.clone(),
                                migration.kind.clone(),
                                output::migration_state_name(migration.state).to_owned(),
                                format!("{} -> {}", migration.from_epoch, migration.to_epoch),
                                format!("{}/{}", progress.partitions_done, progress.partitions_total),
                                format!("{}/{}", progress.keys_done, progress.keys_total),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        MigrationCommand::Cancel { migration_id } => {
            let migration = admin.cancel_migration(pb::CancelMigrationRequest { migration_id }).await?;
            show(globals.output, &output::migration_json(&migration));
        }
        MigrationCommand::Watch { migration_id, interval_ms } => {
            let interval = Duration::from_millis(interval_ms.max(50));
            let bar = partitions_bar(globals.output);
            let migration = loop {
                let migration = admin
                    .get_migration(pb::GetMigrationRequest { migration_id: migration_id.clone() })
                    .await?;
                let progress = migration.progress.unwrap_or_default();
                bar.set_length(progress.partitions_total);
                bar.set_position(progress.partitions_done);
                bar.set_message(format!(
                    "{} {} | {} keys, {:.0} keys/s, eta {}s",
                    migration.kind,
                    output::migration_state_name(migration.state),
                    progress.keys_done,
                    progress.keys_per_sec,
                    progress.eta_secs
                ));
                if finished(&migration) {
                    break migration;
                }
                tokio::time::sleep(interval).await;
            };
            bar.finish();
            show(globals.output, &output::migration_json(&migration));
            let state = output::migration_state_name(migration.state);
            if state != "completed" {
                anyhow::bail!(
                    "MIGRATION_{}: migration {} ended {state}: {}",
                    state.to_uppercase(),
                    migration_id,
                    migration.error
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rebuild(state: &str, started_at_ms: u64, failed_exchanges: u64) -> pb::NodeRebuild {
        pb::NodeRebuild { state: state.into(), started_at_ms, failed_exchanges, ..Default::default() }
    }

    #[test]
    fn a_rebuild_is_checked_against_the_one_that_was_started() {
        let started = rebuild("running", 100, 0);
        let node = NodeId(2);
        assert!(check_rebuild(node, &started, &rebuild("done", 100, 0)).is_ok());
        // The node restarted: it reports no rebuild, or an older one.
        let idle = check_rebuild(node, &started, &rebuild("idle", 0, 0)).unwrap_err();
        assert!(matches!(idle, RebuildError::Interrupted { .. }));
        assert!(idle.to_string().starts_with("REBUILD_INTERRUPTED: node 2 "), "{idle}");
        let partial = check_rebuild(node, &started, &rebuild("done", 100, 3)).unwrap_err();
        assert!(
            partial
                .to_string()
                .starts_with("REBUILD_INCOMPLETE: node 2 could not exchange with a peer 3 time(s)")
        );
    }
}
