//! Admin commands against the metadata service: tenants, API keys, storage nodes and migrations.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pairdb_client::AdminClient;
use pairdb_client::proto::admin::v1 as pb;
use pairdb_client::proto::convert;
use pairdb_core::ring::NodeId;
use pairdb_core::tenant::KeyGroups;
use serde_json::{Value, json};

use crate::cli::{
    ApiKeyCommand, ConflictModeArg, ConsistencyArg, Globals, KeyGroupsArg, MigrationCommand, NodeCommand,
    TenantCommand, TenantSettings,
};
use crate::duration;
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

fn key_groups(value: Option<KeyGroupsArg>) -> Option<KeyGroups> {
    value.map(|value| match value {
        KeyGroupsArg::None => KeyGroups::None,
        KeyGroupsArg::HashTag => KeyGroups::HashTag,
    })
}

/// A meta older than key groups ignores the field and creates the tenant without them: say so
/// rather than print a tenant that silently lacks what was asked for.
fn check_key_groups(asked: Option<KeyGroups>, tenant: &pb::Tenant) -> anyhow::Result<()> {
    let Some(asked) = asked else { return Ok(()) };
    // UNSPECIFIED (an older meta) means none.
    let got = convert::key_groups_from_wire(tenant.key_groups).ok().map(Option::unwrap_or_default);
    if got != Some(asked) {
        anyhow::bail!(
            "tenant {} was created, but without --key-groups {} (meta reports {}); it cannot be changed: \
             upgrade meta, delete the tenant and create it again",
            tenant.tenant_id,
            asked.as_str(),
            output::key_groups_name(tenant.key_groups),
        );
    }
    Ok(())
}

/// Settings a `tenant create/update` set that a meta older than them would ignore (`None`: not set
/// by the command).
#[derive(Debug, Clone, Copy, Default)]
struct Asked {
    max_keys: Option<u64>,
    max_bytes: Option<u64>,
    default_ttl_ms: Option<u64>,
    max_ttl_ms: Option<u64>,
}

/// A meta older than quotas or expiry settings ignores them: say so rather than print a tenant that
/// silently lacks what was asked for.
fn check_applied(asked: Asked, tenant: &pb::Tenant) -> anyhow::Result<()> {
    let check = |flag: &str, asked: Option<u64>, got: u64, show: fn(u64) -> String, feature: &str| {
        if let Some(asked) = asked
            && asked != got
        {
            anyhow::bail!(
                "tenant {}: meta did not apply {flag} {} (it reports {}); meta may predate {feature}: \
                 upgrade it and set {flag} again",
                tenant.tenant_id,
                show(asked),
                show(got),
            );
        }
        Ok(())
    };
    let count = |value: u64| value.to_string();
    check("--max-keys", asked.max_keys, tenant.max_keys, count, "quotas")?;
    check("--max-bytes", asked.max_bytes, tenant.max_bytes, count, "quotas")?;
    let ttl = duration::format_ms;
    check("--default-ttl", asked.default_ttl_ms, tenant.default_ttl_ms, ttl, "expiry settings")?;
    check("--max-ttl", asked.max_ttl_ms, tenant.max_ttl_ms, ttl, "expiry settings")
}

/// `ms` for humans: "850 ms", "3 s", "4 min".
fn age_text(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{} s", ms / 1_000),
        _ => format!("{} min", ms / 60_000),
    }
}

/// `tenant usage` as `field  value` lines.
fn usage_lines(report: &pb::TenantUsageReport) -> Vec<(&'static str, String)> {
    let usage = report.usage.clone().unwrap_or_default();
    let quota = |value: u64| if value == 0 { "none".to_owned() } else { value.to_string() };
    let over = match (report.over_key_quota, report.over_byte_quota) {
        (false, false) => "no",
        (true, false) => "yes: keys (writes that add keys are refused)",
        (false, true) => "yes: bytes (writes that add value bytes are refused)",
        (true, true) => "yes: keys and bytes (writes that grow the tenant are refused)",
    };
    let as_of = if report.reported_at_ms == 0 {
        format!("no report yet, 0 of {} nodes", report.nodes_total)
    } else {
        let mut text = format!(
            "as of {} ago, {} of {} nodes",
            age_text(report.age_ms),
            report.nodes_reporting,
            report.nodes_total
        );
        if report.nodes_reporting < report.nodes_total {
            text.push_str(" (partial: the others have not reported)");
        }
        text
    };
    vec![
        ("tenant", usage.tenant_id),
        ("keys", usage.keys.to_string()),
        ("value bytes", usage.value_bytes.to_string()),
        ("siblings", usage.siblings.to_string()),
        ("tombstones", usage.tombstones.to_string()),
        ("max keys", quota(report.max_keys)),
        ("max bytes", quota(report.max_bytes)),
        ("over quota", over.to_owned()),
        ("reported", as_of),
    ]
}

fn change_json(name: &str, value: Value, migration_id: &str) -> Value {
    let migration_id =
        if migration_id.is_empty() { Value::Null } else { Value::String(migration_id.to_owned()) };
    json!({ name: value, "migration_id": migration_id })
}

pub async fn tenant(globals: &Globals, command: TenantCommand) -> anyhow::Result<()> {
    let admin = globals.admin().await?;
    match command {
        TenantCommand::Create { tenant_id, settings, key_groups: groups } => {
            let TenantSettings {
                replication_factor,
                default_consistency,
                conflict_mode: mode,
                rate_limit_ops_per_sec,
                rate_limit_burst,
                max_value_bytes,
                max_siblings,
                strict_quorum,
                max_keys,
                max_bytes,
                default_ttl_ms,
                max_ttl_ms,
            } = settings;
            let tenant = admin
                .create_tenant(pb::CreateTenantRequest {
                    tenant_id,
                    replication_factor: replication_factor.unwrap_or(0),
                    default_consistency: consistency(default_consistency).unwrap_or(0),
                    conflict_mode: conflict_mode(mode).unwrap_or(0),
                    key_groups: convert::key_groups_to_wire(key_groups(groups)),
                    rate_limit_ops_per_sec: rate_limit_ops_per_sec.unwrap_or(0),
                    rate_limit_burst: rate_limit_burst.unwrap_or(0),
                    max_value_bytes: max_value_bytes.unwrap_or(0),
                    max_siblings: max_siblings.unwrap_or(0),
                    strict_quorum: strict_quorum.unwrap_or(false),
                    max_keys: max_keys.unwrap_or(0),
                    max_bytes: max_bytes.unwrap_or(0),
                    default_ttl_ms: default_ttl_ms.unwrap_or(0),
                    max_ttl_ms: max_ttl_ms.unwrap_or(0),
                })
                .await?;
            check_key_groups(key_groups(groups), &tenant)?;
            check_applied(Asked { max_keys, max_bytes, default_ttl_ms, max_ttl_ms }, &tenant)?;
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
                    &[
                        "TENANT",
                        "STATE",
                        "RF",
                        "CONSISTENCY",
                        "CONFLICTS",
                        "KEY GROUPS",
                        "OPS/S",
                        "MAX VALUE",
                        "MAX KEYS",
                        "MAX BYTES",
                        "DEFAULT TTL",
                        "MAX TTL",
                    ],
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
                                body["key_groups"].as_str().unwrap_or_default().to_owned(),
                                tenant.rate_limit_ops_per_sec.to_string(),
                                tenant.max_value_bytes.to_string(),
                                quota_cell(tenant.max_keys),
                                quota_cell(tenant.max_bytes),
                                ttl_cell(tenant.default_ttl_ms),
                                ttl_cell(tenant.max_ttl_ms),
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
                    max_keys: settings.max_keys,
                    max_bytes: settings.max_bytes,
                    default_ttl_ms: settings.default_ttl_ms,
                    max_ttl_ms: settings.max_ttl_ms,
                })
                .await?;
            if let Some(tenant) = &reply.tenant {
                let asked = Asked {
                    max_keys: settings.max_keys,
                    max_bytes: settings.max_bytes,
                    default_ttl_ms: settings.default_ttl_ms,
                    max_ttl_ms: settings.max_ttl_ms,
                };
                check_applied(asked, tenant)?;
            }
            let tenant = reply.tenant.as_ref().map(output::tenant_json).unwrap_or(Value::Null);
            show(globals.output, &change_json("tenant", tenant, &reply.migration_id));
        }
        TenantCommand::Usage { tenant_id } => {
            let report = admin.get_tenant_usage(pb::GetTenantUsageRequest { tenant_id }).await?;
            match globals.output {
                Output::Json => output::print_json(&output::usage_report_json(&report)),
                Output::Table => {
                    let lines = usage_lines(&report);
                    let width = lines.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
                    for (name, value) in lines {
                        println!("{name:<width$}  {value}");
                    }
                }
            }
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

/// A quota in the tenant table: `-` for none.
fn quota_cell(value: u64) -> String {
    if value == 0 { "-".to_owned() } else { value.to_string() }
}

/// An expiry setting in the tenant table, in the largest exact unit (`7d`, `1500ms`): `-` for none.
fn ttl_cell(ms: u64) -> String {
    if ms == 0 { "-".to_owned() } else { duration::format_ms(ms) }
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

/// The columns of `node list`'s table.
const NODE_COLUMNS: &[&str] =
    &["NODE", "ADDRESS", "ZONE", "WEIGHT", "STATUS", "IN RING", "KEYS", "HINTS", "QUARANTINED", "CLOCK"];

fn show_nodes(format: Output, nodes: &[pb::StorageNode]) {
    match format {
        Output::Json => output::print_json(&json!({
            "nodes": nodes.iter().map(output::node_json).collect::<Vec<_>>()
        })),
        Output::Table => output::print_table(
            NODE_COLUMNS,
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
                        output::clock_cell(node),
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
    bar.finish_and_clear();
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
            // The bar (stderr) goes before the result is printed, so neither lands on the other's line.
            bar.finish_and_clear();
            if globals.output == Output::Table {
                let progress = migration.progress.unwrap_or_default();
                println!(
                    "migration {} ({}) {}: {}/{} partitions, {} keys",
                    migration.migration_id,
                    migration.kind,
                    output::migration_state_name(migration.state),
                    progress.partitions_done,
                    progress.partitions_total,
                    progress.keys_done
                );
            }
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

    fn create_key_groups(args: &[&str]) -> Result<Option<KeyGroupsArg>, clap::Error> {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(["pairdb", "tenant", "create", "acme"].iter().chain(args))?;
        match cli.command {
            crate::cli::Command::Tenant(TenantCommand::Create { key_groups, .. }) => Ok(key_groups),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn key_groups_are_a_create_flag_with_two_values() {
        assert_eq!(create_key_groups(&[]).unwrap(), None);
        assert_eq!(create_key_groups(&["--key-groups", "none"]).unwrap(), Some(KeyGroupsArg::None));
        assert_eq!(create_key_groups(&["--key-groups", "hash_tag"]).unwrap(), Some(KeyGroupsArg::HashTag));
        let unknown = create_key_groups(&["--key-groups", "hash-tags"]).unwrap_err();
        assert_eq!(unknown.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(unknown.to_string().contains("hash_tag"), "{unknown}");
        use clap::Parser as _;
        let update =
            crate::cli::Cli::try_parse_from(["pairdb", "tenant", "update", "acme", "--key-groups", "none"])
                .unwrap_err();
        assert_eq!(update.kind(), clap::error::ErrorKind::UnknownArgument, "key groups never change");
    }

    #[test]
    fn a_create_that_meta_did_not_apply_key_groups_to_fails() {
        let reply = |groups: Option<KeyGroups>| pb::Tenant {
            tenant_id: "acme".into(),
            key_groups: convert::key_groups_to_wire(groups),
            ..Default::default()
        };
        assert!(check_key_groups(None, &reply(None)).is_ok());
        assert!(check_key_groups(Some(KeyGroups::HashTag), &reply(Some(KeyGroups::HashTag))).is_ok());
        // A meta older than key groups answers UNSPECIFIED, which is none.
        assert!(check_key_groups(Some(KeyGroups::None), &reply(None)).is_ok());
        let ignored = check_key_groups(Some(KeyGroups::HashTag), &reply(None)).unwrap_err().to_string();
        assert!(ignored.contains("without --key-groups hash_tag (meta reports none)"), "{ignored}");
        assert_eq!(output::tenant_json(&reply(Some(KeyGroups::HashTag)))["key_groups"], "hash_tag");
        assert_eq!(output::tenant_json(&reply(None))["key_groups"], "none");
        assert_eq!(output::key_groups_name(9), "unknown");
    }

    #[test]
    fn quota_flags_parse_on_create_and_update() {
        use clap::Parser as _;
        let parse = |args: &[&str]| {
            crate::cli::Cli::try_parse_from(["pairdb", "tenant"].iter().chain(args)).map(|cli| cli.command)
        };
        let created = parse(&["create", "acme", "--max-keys", "10", "--max-bytes", "0"]).unwrap();
        assert!(
            matches!(
                created,
                crate::cli::Command::Tenant(TenantCommand::Create {
                    settings: TenantSettings { max_keys: Some(10), max_bytes: Some(0), .. },
                    ..
                })
            ),
            "{created:?}"
        );
        let updated = parse(&["update", "acme", "--max-bytes", "4096"]).unwrap();
        assert!(
            matches!(
                updated,
                crate::cli::Command::Tenant(TenantCommand::Update {
                    settings: TenantSettings { max_keys: None, max_bytes: Some(4096), .. },
                    ..
                })
            ),
            "{updated:?}"
        );
        assert!(parse(&["update", "acme", "--max-keys", "-1"]).is_err());
        let usage = parse(&["usage", "acme"]).unwrap();
        assert!(
            matches!(&usage, crate::cli::Command::Tenant(TenantCommand::Usage { tenant_id }) if tenant_id == "acme"),
            "{usage:?}"
        );
    }

    #[test]
    fn a_quota_meta_did_not_apply_fails() {
        let reply = pb::Tenant { tenant_id: "acme".into(), max_keys: 10, ..Default::default() };
        assert!(check_applied(Asked::default(), &reply).is_ok());
        assert!(
            check_applied(Asked { max_keys: Some(10), max_bytes: Some(0), ..Asked::default() }, &reply)
                .is_ok()
        );
        let ignored =
            check_applied(Asked { max_keys: Some(10), max_bytes: Some(5), ..Asked::default() }, &reply)
                .unwrap_err()
                .to_string();
        assert!(ignored.contains("did not apply --max-bytes 5 (it reports 0)"), "{ignored}");
        assert_eq!(output::tenant_json(&reply)["max_keys"], 10);
        assert_eq!(quota_cell(0), "-");
    }

    #[test]
    fn ttl_flags_parse_on_create_and_update() {
        use clap::Parser as _;
        let parse = |args: &[&str]| {
            crate::cli::Cli::try_parse_from(["pairdb", "tenant"].iter().chain(args)).map(|cli| cli.command)
        };
        let created = parse(&["create", "acme", "--default-ttl", "30s", "--max-ttl", "7d"]).unwrap();
        assert!(
            matches!(
                created,
                crate::cli::Command::Tenant(TenantCommand::Create {
                    settings: TenantSettings {
                        default_ttl_ms: Some(30_000),
                        max_ttl_ms: Some(604_800_000),
                        ..
                    },
                    ..
                })
            ),
            "{created:?}"
        );
        for (flag, value, ms) in [
            ("--max-ttl", "1500ms", 1_500),
            ("--max-ttl", "15m", 900_000),
            ("--default-ttl", "2h", 7_200_000),
        ] {
            let updated = parse(&["update", "acme", flag, value]).unwrap();
            let crate::cli::Command::Tenant(TenantCommand::Update { settings, .. }) = updated else {
                panic!("parsed as {updated:?}")
            };
            let got = if flag == "--max-ttl" {
                (settings.default_ttl_ms, settings.max_ttl_ms)
            } else {
                (settings.max_ttl_ms, settings.default_ttl_ms)
            };
            assert_eq!(got, (None, Some(ms)), "{flag} {value}: the other one is left unchanged");
        }
        let removed = parse(&["update", "acme", "--default-ttl", "0"]).unwrap();
        assert!(
            matches!(
                removed,
                crate::cli::Command::Tenant(TenantCommand::Update {
                    settings: TenantSettings { default_ttl_ms: Some(0), max_ttl_ms: None, .. },
                    ..
                })
            ),
            "{removed:?}"
        );
        let bare = parse(&["update", "acme", "--max-ttl", "1500"]).unwrap_err();
        assert_eq!(bare.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(bare.to_string().contains("give a unit"), "{bare}");
        assert!(parse(&["create", "acme", "--default-ttl", "soon"]).is_err());
    }

    #[test]
    fn ttls_meta_did_not_apply_fail_and_show_in_the_table_and_json() {
        let reply = pb::Tenant {
            tenant_id: "acme".into(),
            default_ttl_ms: 30_000,
            max_ttl_ms: 604_800_000,
            ..Default::default()
        };
        let asked = Asked { default_ttl_ms: Some(30_000), max_ttl_ms: Some(604_800_000), ..Asked::default() };
        assert!(check_applied(asked, &reply).is_ok());
        let older = pb::Tenant { tenant_id: "acme".into(), ..Default::default() };
        let ignored = check_applied(asked, &older).unwrap_err().to_string();
        assert!(ignored.contains("did not apply --default-ttl 30s (it reports 0ms)"), "{ignored}");
        assert!(ignored.contains("meta may predate expiry settings"), "{ignored}");
        let json = output::tenant_json(&reply);
        assert_eq!((&json["default_ttl_ms"], &json["max_ttl_ms"]), (&30_000.into(), &604_800_000.into()));
        assert_eq!(
            (ttl_cell(0), ttl_cell(30_000), ttl_cell(604_800_000)),
            ("-".into(), "30s".into(), "7d".into())
        );
    }

    #[test]
    fn usage_shows_counters_quotas_flags_and_age() {
        let report = pb::TenantUsageReport {
            usage: Some(pb::TenantUsage {
                tenant_id: "acme".into(),
                keys: 1_200,
                value_bytes: 52_000,
                siblings: 1_300,
                tombstones: 12,
            }),
            reported_at_ms: 1_795_708_400_000,
            age_ms: 3_400,
            nodes_reporting: 3,
            nodes_total: 3,
            max_keys: 1_000,
            max_bytes: 0,
            over_key_quota: true,
            over_byte_quota: false,
        };
        let lines = usage_lines(&report);
        let field = |name: &str| lines.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(field("keys"), "1200");
        assert_eq!(field("value bytes"), "52000");
        assert_eq!((field("max keys"), field("max bytes")), ("1000".to_owned(), "none".to_owned()));
        assert!(field("over quota").starts_with("yes: keys"));
        assert_eq!(field("reported"), "as of 3 s ago, 3 of 3 nodes");
        let partial =
            usage_lines(&pb::TenantUsageReport { nodes_reporting: 2, age_ms: 850, ..report.clone() });
        assert!(
            partial
                .iter()
                .any(|(_, v)| v == "as of 850 ms ago, 2 of 3 nodes (partial: the others have not reported)")
        );
        let none = usage_lines(&pb::TenantUsageReport { reported_at_ms: 0, ..report.clone() });
        assert!(none.iter().any(|(_, v)| v == "no report yet, 0 of 3 nodes"));
        assert_eq!(age_text(130_000), "2 min");
        let json = output::usage_report_json(&report);
        assert_eq!(
            (&json["usage"]["keys"], &json["over_key_quota"], &json["age_ms"]),
            (&1_200.into(), &true.into(), &3_400.into())
        );
        assert_eq!(json["usage"]["tenant_id"], "acme");
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
