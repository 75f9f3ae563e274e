//! Rendering: a human table (the default) or one JSON document per command (`--output json`, shapes
//! in docs/cli.md, matching meta's HTTP API where both exist). Values that are not UTF-8 text are shown
//! as base64; contexts are always base64.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use pairdb_client::proto::admin::v1 as admin;
use pairdb_client::proto::convert;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns and progress bars, for people.
    Table,
    /// One JSON document per command (errors too, on stderr), for scripts.
    Json,
}

pub fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}

pub fn encode_context(context: &[u8]) -> String {
    BASE64.encode(context)
}

pub fn decode_context(text: &str) -> anyhow::Result<Vec<u8>> {
    BASE64
        .decode(text.trim())
        .map_err(|error| anyhow::anyhow!("INVALID_ARGUMENT: --context is not base64 ({error})"))
}

/// A value for humans: the text when it is printable UTF-8, else `base64:...`.
pub fn display_value(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => text.to_owned(),
        _ => format!("base64:{}", BASE64.encode(value)),
    }
}

/// A value in JSON: `{"value": text}` when UTF-8, else `{"value_base64": ...}`.
pub fn value_json(value: &[u8]) -> (&'static str, Value) {
    match std::str::from_utf8(value) {
        Ok(text) => ("value", Value::String(text.to_owned())),
        Err(_) => ("value_base64", Value::String(BASE64.encode(value))),
    }
}

/// A version vector as a list of `{actor, counter}` (actor in hex, as stored).
pub fn vector_json(vector: &[(u64, u64)]) -> Value {
    Value::Array(
        vector
            .iter()
            .map(|(actor, counter)| json!({"actor": format!("{actor:016x}"), "counter": counter}))
            .collect(),
    )
}

fn consistency_name(value: i32) -> &'static str {
    convert::consistency_from_wire(value).ok().flatten().map_or("unspecified", |level| level.as_str())
}

fn conflict_mode_name(value: i32) -> &'static str {
    convert::conflict_mode_from_wire(value).ok().flatten().map_or("unspecified", |mode| mode.as_str())
}

/// UNSPECIFIED (a meta older than key groups) is `none`, the only placement such a meta knows; a
/// value this CLI does not know (a newer meta) is `unknown`.
pub fn key_groups_name(value: i32) -> &'static str {
    convert::key_groups_from_wire(value).map_or("unknown", |groups| groups.unwrap_or_default().as_str())
}

pub fn tenant_json(tenant: &admin::Tenant) -> Value {
    let mut value = json!({
        "tenant_id": tenant.tenant_id,
        "state": if tenant.state.is_empty() { "active" } else { tenant.state.as_str() },
        "replication_factor": tenant.replication_factor,
        "default_consistency": consistency_name(tenant.default_consistency),
        "conflict_mode": conflict_mode_name(tenant.conflict_mode),
        "key_groups": key_groups_name(tenant.key_groups),
        "rate_limit_ops_per_sec": tenant.rate_limit_ops_per_sec,
        "rate_limit_burst": tenant.rate_limit_burst,
        "max_value_bytes": tenant.max_value_bytes,
        "max_siblings": tenant.max_siblings,
        "strict_quorum": tenant.strict_quorum,
        "max_keys": tenant.max_keys,
        "max_bytes": tenant.max_bytes,
        "default_ttl_ms": tenant.default_ttl_ms,
        "max_ttl_ms": tenant.max_ttl_ms,
        "created_at_ms": tenant.created_at_ms,
        "updated_at_ms": tenant.updated_at_ms,
    });
    if let Some(purge) = &tenant.purge {
        value["purge"] = json!({
            "nodes_done": purge.nodes_done,
            "nodes_total": purge.nodes_total,
            "waiting_node_ids": purge.waiting_node_ids,
        });
    }
    value
}

/// The fields of `TenantUsageReport` (as meta's `GET /v1/tenants/{id}/usage` answers).
pub fn usage_report_json(report: &admin::TenantUsageReport) -> Value {
    let usage = report.usage.clone().unwrap_or_default();
    json!({
        "usage": {
            "tenant_id": usage.tenant_id,
            "keys": usage.keys,
            "value_bytes": usage.value_bytes,
            "siblings": usage.siblings,
            "tombstones": usage.tombstones,
        },
        "reported_at_ms": report.reported_at_ms,
        "age_ms": report.age_ms,
        "nodes_reporting": report.nodes_reporting,
        "nodes_total": report.nodes_total,
        "max_keys": report.max_keys,
        "max_bytes": report.max_bytes,
        "over_key_quota": report.over_key_quota,
        "over_byte_quota": report.over_byte_quota,
    })
}

pub fn api_key_json(key: &admin::ApiKey) -> Value {
    json!({
        "key_id": key.key_id,
        "tenant_id": key.tenant_id,
        "description": key.description,
        "created_at_ms": key.created_at_ms,
        "revoked": key.revoked,
    })
}

pub fn node_status_name(value: i32) -> &'static str {
    match admin::NodeStatus::try_from(value) {
        Ok(admin::NodeStatus::Joining) => "joining",
        Ok(admin::NodeStatus::Active) => "active",
        Ok(admin::NodeStatus::Leaving) => "leaving",
        Ok(admin::NodeStatus::Down) => "down",
        Ok(admin::NodeStatus::Removed) => "removed",
        _ => "unspecified",
    }
}

/// The node's reported clock offset to meta, if it has measured one.
fn clock_offset_ms(node: &admin::StorageNode) -> Option<i64> {
    node.stats.filter(|stats| stats.clock_offset_known).map(|stats| stats.clock_offset_ms)
}

/// The CLOCK cell of `node list`: `+3ms`, `-1200ms (skewed)` when beyond meta's
/// `--max-clock-offset-ms`, `-` when the node has not measured its offset.
pub fn clock_cell(node: &admin::StorageNode) -> String {
    match clock_offset_ms(node) {
        None => "-".to_owned(),
        Some(offset) if node.clock_skewed => format!("{offset:+}ms (skewed)"),
        Some(offset) => format!("{offset:+}ms"),
    }
}

/// The engine's size on disk; a meta older than `disk_bytes` reports it as `live_bytes` only.
pub fn disk_bytes(stats: &admin::NodeStats) -> u64 {
    if stats.disk_bytes != 0 { stats.disk_bytes } else { stats.live_bytes }
}

/// Bytes for people: `512 B`, `1.5 KiB`, `64.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

pub fn node_json(node: &admin::StorageNode) -> Value {
    let stats = node.stats.unwrap_or_default();
    json!({
        "node_id": node.node_id,
        "address": node.address,
        "zone": node.zone,
        "weight": node.weight,
        "status": node_status_name(node.status),
        "last_heartbeat_ms": node.last_heartbeat_ms,
        "stats": {
            "keys": stats.keys,
            "live_value_bytes": stats.live_value_bytes,
            "disk_bytes": disk_bytes(&stats),
            "disk_free_bytes": stats.disk_free_bytes,
            "hints_pending": stats.hints_pending,
            "write_path_poisoned": stats.write_path_poisoned,
            "quarantined_records": stats.quarantined_records,
            "clock_offset_ms": clock_offset_ms(node),
        },
        "in_ring": node.in_ring,
        "clock_skewed": node.clock_skewed,
        "holds_unowned_data": node.holds_unowned_data,
        "partitions_at_position": node.partitions_at_position,
        "heartbeat_age_ms": (node.last_heartbeat_ms != 0).then_some(node.heartbeat_age_ms),
    })
}

pub fn migration_state_name(value: i32) -> &'static str {
    match admin::MigrationState::try_from(value) {
        Ok(admin::MigrationState::Pending) => "pending",
        Ok(admin::MigrationState::Running) => "running",
        Ok(admin::MigrationState::Completed) => "completed",
        Ok(admin::MigrationState::Failed) => "failed",
        Ok(admin::MigrationState::Cancelled) => "cancelled",
        _ => "unspecified",
    }
}

pub fn rebuild_json(rebuild: &admin::NodeRebuild) -> Value {
    json!({
        "node_id": rebuild.node_id,
        "state": rebuild.state,
        "partitions_total": rebuild.partitions_total,
        "partitions_done": rebuild.partitions_done,
        "keys_compared": rebuild.keys_compared,
        "keys_repaired": rebuild.keys_repaired,
        "bytes": rebuild.bytes,
        "failed_exchanges": rebuild.failed_exchanges,
        "started_at_ms": rebuild.started_at_ms,
        "finished_at_ms": rebuild.finished_at_ms,
    })
}

pub fn migration_json(migration: &admin::Migration) -> Value {
    let progress = migration.progress.unwrap_or_default();
    json!({
        "migration_id": migration.migration_id,
        "kind": migration.kind,
        "state": migration_state_name(migration.state),
        "from_epoch": migration.from_epoch,
        "to_epoch": migration.to_epoch,
        "progress": {
            "partitions_total": progress.partitions_total,
            "partitions_done": progress.partitions_done,
            "keys_total": progress.keys_total,
            "keys_done": progress.keys_done,
            "bytes_done": progress.bytes_done,
            "keys_per_sec": progress.keys_per_sec,
            "eta_secs": progress.eta_secs,
        },
        "error": migration.error,
        "created_at_ms": migration.created_at_ms,
        "updated_at_ms": migration.updated_at_ms,
        "tenant_id": migration.tenant_id,
        "node_id": migration.node_id,
    })
}

/// Prints rows as aligned columns under a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `field  value` pairs of one JSON object (nested objects flattened with dots).
pub fn print_fields(value: &Value) {
    let mut rows = Vec::new();
    flatten("", value, &mut rows);
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, text) in rows {
        println!("{name:<width$}  {text}");
    }
}

fn flatten(prefix: &str, value: &Value, rows: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (name, inner) in map {
                let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                flatten(&path, inner, rows);
            }
        }
        Value::String(text) => rows.push((prefix.to_owned(), text.clone())),
        Value::Null => rows.push((prefix.to_owned(), "-".to_owned())),
        other => rows.push((prefix.to_owned(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them_and_disk_bytes_fall_back_to_the_old_name() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        let old_meta = admin::NodeStats { live_bytes: 7, ..Default::default() };
        assert_eq!(disk_bytes(&old_meta), 7);
        let new_meta =
            admin::NodeStats { live_bytes: 7, disk_bytes: 7, live_value_bytes: 3, ..Default::default() };
        let json = node_json(&admin::StorageNode { stats: Some(new_meta), ..Default::default() });
        assert_eq!(
            (&json["stats"]["disk_bytes"], &json["stats"]["live_value_bytes"]),
            (&json!(7), &json!(3))
        );
        assert!(json["stats"].get("live_bytes").is_none(), "the misnamed field is not shown");
        assert_eq!(json["heartbeat_age_ms"], Value::Null, "no heartbeat yet");
    }

    #[test]
    fn values_and_contexts_round_trip() {
        assert_eq!(display_value(b"hello"), "hello");
        assert_eq!(display_value(&[0xff, 0x00]), "base64:/wA=");
        assert_eq!(value_json(&[0xff]).0, "value_base64");
        let context = vec![1, 2, 3, 250];
        assert_eq!(decode_context(&encode_context(&context)).unwrap(), context);
        assert!(decode_context("not base64!").is_err());
    }

    fn node(clock_offset_ms: Option<i64>, clock_skewed: bool) -> admin::StorageNode {
        admin::StorageNode {
            node_id: 1,
            stats: Some(admin::NodeStats {
                clock_offset_ms: clock_offset_ms.unwrap_or(0),
                clock_offset_known: clock_offset_ms.is_some(),
                ..Default::default()
            }),
            clock_skewed,
            ..Default::default()
        }
    }

    #[test]
    fn clock_offsets_show_their_sign_and_verdict() {
        assert_eq!(clock_cell(&node(Some(3), false)), "+3ms");
        assert_eq!(clock_cell(&node(Some(0), false)), "+0ms");
        assert_eq!(clock_cell(&node(Some(-1200), true)), "-1200ms (skewed)");
        assert_eq!(clock_cell(&node(Some(1500), true)), "+1500ms (skewed)");
        assert_eq!(clock_cell(&node(None, false)), "-");
        assert_eq!(clock_cell(&admin::StorageNode::default()), "-", "no stats at all");

        let json = node_json(&node(Some(-1200), true));
        assert_eq!((&json["stats"]["clock_offset_ms"], &json["clock_skewed"]), (&json!(-1200), &json!(true)));
        let json = node_json(&node(None, false));
        assert_eq!((&json["stats"]["clock_offset_ms"], &json["clock_skewed"]), (&Value::Null, &json!(false)));
    }
}
