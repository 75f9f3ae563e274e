//! `pairdb status`: the cluster on one screen, as `nodetool status` or `garage status` show it.
//!
//! Every storage node with its state, zone, ownership share, keys, bytes, hints, heartbeat age and
//! warning flags, then the migrations that have not finished. Everything comes from meta's admin
//! API: ListStorageNodes (stats from the nodes' heartbeats, the heartbeat's age by meta's clock, and
//! how many partition lists hold each node at each position), ListTenants (the replication factors
//! the ownership is shown for) and ListMigrations.
//!
//! Ownership: a tenant with replication factor N keeps a partition on the first N nodes of its list,
//! so a node's share for N is the lists holding it in their first N positions over all N × Q such
//! slots; the shares of all nodes add up to 100% for every N. It is shown for each replication factor
//! some tenant uses (3, the default, when there are no tenants).

use pairdb_client::proto::admin::v1 as pb;
use serde_json::{Value, json};

use crate::cli::Globals;
use crate::output::{self, Output};

/// The replication factor a tenant gets when created without one.
const DEFAULT_REPLICATION_FACTOR: u32 = 3;

pub async fn run(globals: &Globals) -> anyhow::Result<()> {
    let admin = globals.admin().await?;
    let nodes = admin.list_storage_nodes(pb::ListStorageNodesRequest {}).await?.nodes;
    let tenants = admin.list_tenants(pb::ListTenantsRequest {}).await?.tenants;
    let migrations = admin.list_migrations(pb::ListMigrationsRequest {}).await?.migrations;
    let status = Status::new(nodes, &tenants, migrations);
    match globals.output {
        Output::Json => output::print_json(&status.json()),
        Output::Table => status.print(),
    }
    Ok(())
}

/// What `pairdb status` shows.
#[derive(Debug)]
struct Status {
    /// Nodes that are not removed, by id.
    nodes: Vec<pb::StorageNode>,
    /// Distinct replication factors of the tenants, ascending.
    replication_factors: Vec<u32>,
    /// Q of the current topology (0: none yet).
    partition_count: u64,
    /// Pending and running migrations.
    migrations: Vec<pb::Migration>,
}

impl Status {
    fn new(
        mut nodes: Vec<pb::StorageNode>,
        tenants: &[pb::Tenant],
        mut migrations: Vec<pb::Migration>,
    ) -> Self {
        nodes.retain(|node| node.status != pb::NodeStatus::Removed as i32);
        nodes.sort_by_key(|node| node.node_id);
        let mut replication_factors: Vec<u32> = tenants
            .iter()
            .filter(|tenant| tenant.state != "deleting")
            .map(|tenant| tenant.replication_factor)
            .filter(|n| *n > 0)
            .collect();
        replication_factors.sort_unstable();
        replication_factors.dedup();
        if replication_factors.is_empty() {
            replication_factors.push(DEFAULT_REPLICATION_FACTOR);
        }
        // Every partition's list has exactly one first entry.
        let partition_count = nodes
            .iter()
            .map(|node| u64::from(node.partitions_at_position.first().copied().unwrap_or(0)))
            .sum();
        migrations.retain(|migration| {
            matches!(output::migration_state_name(migration.state), "pending" | "running")
        });
        Status { nodes, replication_factors, partition_count, migrations }
    }

    /// The length of the topology's lists (how many distinct nodes each partition has).
    fn list_len(&self) -> usize {
        self.nodes.iter().map(|node| node.partitions_at_position.len()).max().unwrap_or(0)
    }

    /// `node`'s share of the partition replicas of a tenant with replication factor `n` (0..=1);
    /// `None` before there is a topology.
    fn ownership(&self, node: &pb::StorageNode, n: u32) -> Option<f64> {
        let replicas = (n as usize).min(self.list_len());
        if self.partition_count == 0 || replicas == 0 {
            return None;
        }
        let held: u64 =
            node.partitions_at_position.iter().take(replicas).map(|count| u64::from(*count)).sum();
        Some(held as f64 / (self.partition_count * replicas as u64) as f64)
    }

    fn json(&self) -> Value {
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|node| {
                let mut value = output::node_json(node);
                value["ownership"] = Value::Array(
                    self.replication_factors
                        .iter()
                        .map(|n| json!({"replication_factor": n, "share": self.ownership(node, *n)}))
                        .collect(),
                );
                value
            })
            .collect();
        json!({
            "partition_count": self.partition_count,
            "replication_factors": self.replication_factors,
            "nodes": nodes,
            "migrations": self.migrations.iter().map(output::migration_json).collect::<Vec<_>>(),
        })
    }

    fn header(&self) -> Vec<String> {
        let mut header: Vec<String> = ["NODE", "ADDRESS", "ZONE", "STATE"].map(String::from).to_vec();
        header.extend(self.replication_factors.iter().map(|n| format!("OWNS N={n}")));
        header.extend(
            ["KEYS", "LIVE DATA", "DISK", "DISK FREE", "HINTS", "HEARTBEAT", "FLAGS"].map(String::from),
        );
        header
    }

    fn row(&self, node: &pb::StorageNode) -> Vec<String> {
        let stats = node.stats.unwrap_or_default();
        let mut row = vec![
            node.node_id.to_string(),
            node.address.clone(),
            if node.zone.is_empty() { "-".to_owned() } else { node.zone.clone() },
            output::node_status_name(node.status).to_owned(),
        ];
        row.extend(self.replication_factors.iter().map(|n| match self.ownership(node, *n) {
            Some(share) => format!("{:.1}%", share * 100.0),
            None => "-".to_owned(),
        }));
        row.extend([
            stats.keys.to_string(),
            output::human_bytes(stats.live_value_bytes),
            output::human_bytes(output::disk_bytes(&stats)),
            output::human_bytes(stats.disk_free_bytes),
            stats.hints_pending.to_string(),
            heartbeat_cell(node),
            flags(node).join(","),
        ]);
        row
    }

    fn print(&self) {
        let up = self.nodes.iter().filter(|node| output::node_status_name(node.status) == "active").count();
        println!(
            "storage nodes: {} ({up} active), partitions: {}, replication factors: {}",
            self.nodes.len(),
            self.partition_count,
            self.replication_factors.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        );
        let header = self.header();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        output::print_table(&header, &self.nodes.iter().map(|node| self.row(node)).collect::<Vec<_>>());
        println!();
        if self.migrations.is_empty() {
            println!("migrations: none running");
            return;
        }
        println!("migrations:");
        output::print_table(
            &["MIGRATION", "KIND", "STATE", "EPOCHS", "PARTITIONS", "KEYS", "KEYS/S", "ETA"],
            &self.migrations.iter().map(migration_row).collect::<Vec<_>>(),
        );
    }
}

fn migration_row(migration: &pb::Migration) -> Vec<String> {
    let progress = migration.progress.unwrap_or_default();
    let percent = if progress.partitions_total == 0 {
        0.0
    } else {
        progress.partitions_done as f64 * 100.0 / progress.partitions_total as f64
    };
    vec![
        migration.migration_id.clone(),
        migration.kind.clone(),
        output::migration_state_name(migration.state).to_owned(),
        format!("{} -> {}", migration.from_epoch, migration.to_epoch),
        format!("{}/{} ({percent:.0}%)", progress.partitions_done, progress.partitions_total),
        progress.keys_done.to_string(),
        format!("{:.0}", progress.keys_per_sec),
        if progress.eta_secs == 0 { "-".to_owned() } else { format!("{}s", progress.eta_secs) },
    ]
}

/// The heartbeat's age by meta's clock: `850ms`, `12s`, `5m`; `never` before the first.
fn heartbeat_cell(node: &pb::StorageNode) -> String {
    if node.last_heartbeat_ms == 0 {
        return "never".to_owned();
    }
    match node.heartbeat_age_ms {
        ms @ 0..1_000 => format!("{ms}ms"),
        ms @ 1_000..120_000 => format!("{}s", ms / 1_000),
        ms @ 120_000..7_200_000 => format!("{}m", ms / 60_000),
        ms => format!("{}h", ms / 3_600_000),
    }
}

/// What an operator must look at: `poisoned` (the write path failed an fsync and refuses writes),
/// `quarantined=N` (records that did not decode), `clock-skewed`, `unowned-data` (a migration left it
/// holding data it has not deleted yet: tombstone GC waits everywhere), `not-in-ring`.
fn flags(node: &pb::StorageNode) -> Vec<String> {
    let stats = node.stats.unwrap_or_default();
    let mut flags = Vec::new();
    if stats.write_path_poisoned {
        flags.push("poisoned".to_owned());
    }
    if stats.quarantined_records > 0 {
        flags.push(format!("quarantined={}", stats.quarantined_records));
    }
    if node.clock_skewed {
        flags.push("clock-skewed".to_owned());
    }
    if node.holds_unowned_data {
        flags.push("unowned-data".to_owned());
    }
    if !node.in_ring {
        flags.push("not-in-ring".to_owned());
    }
    if flags.is_empty() {
        flags.push("-".to_owned());
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node_id: u32, positions: &[u32]) -> pb::StorageNode {
        pb::StorageNode {
            node_id,
            status: pb::NodeStatus::Active as i32,
            in_ring: !positions.is_empty(),
            partitions_at_position: positions.to_vec(),
            last_heartbeat_ms: 1,
            ..Default::default()
        }
    }

    fn tenant(replication_factor: u32) -> pb::Tenant {
        pb::Tenant { replication_factor, state: "active".into(), ..Default::default() }
    }

    #[test]
    fn ownership_adds_up_to_every_replica_for_each_replication_factor() {
        // Q = 8, lists of 3: node 1 leads half the lists.
        let nodes = vec![node(1, &[4, 2, 2]), node(2, &[2, 3, 3]), node(3, &[2, 3, 3]), node(4, &[])];
        let status = Status::new(nodes, &[tenant(3), tenant(1), tenant(3)], Vec::new());
        assert_eq!((status.partition_count, status.replication_factors.clone()), (8, vec![1, 3]));
        for n in [1, 3] {
            let total: f64 = status.nodes.iter().filter_map(|node| status.ownership(node, n)).sum();
            assert!((total - 1.0).abs() < 1e-9, "N={n}: {total}");
        }
        assert_eq!(status.ownership(&status.nodes[0], 1), Some(0.5));
        assert_eq!(status.ownership(&status.nodes[0], 3), Some(8.0 / 24.0));
        assert_eq!(status.ownership(&status.nodes[3], 3), Some(0.0));
        // N above the list length counts the whole list.
        assert_eq!(status.ownership(&status.nodes[0], 5), status.ownership(&status.nodes[0], 3));
        let row = status.row(&status.nodes[0]);
        assert_eq!(&row[4..6], ["50.0%", "33.3%"]);
        assert_eq!(status.header()[4..6], ["OWNS N=1", "OWNS N=3"]);
        assert_eq!(flags(&status.nodes[3]), ["not-in-ring"]);
        let json = status.json();
        assert_eq!(json["nodes"][0]["ownership"][0], json!({"replication_factor": 1, "share": 0.5}));
    }

    #[test]
    fn no_tenants_show_the_default_factor_and_no_topology_no_share() {
        let status = Status::new(vec![node(1, &[])], &[], Vec::new());
        assert_eq!(status.replication_factors, [3]);
        assert_eq!(status.ownership(&status.nodes[0], 3), None);
        assert_eq!(status.row(&status.nodes[0])[4], "-");
    }

    #[test]
    fn removed_nodes_and_finished_migrations_are_left_out() {
        let removed = pb::StorageNode { status: pb::NodeStatus::Removed as i32, ..node(9, &[]) };
        let migration =
            |state: pb::MigrationState| pb::Migration { state: state as i32, ..Default::default() };
        let status = Status::new(
            vec![node(1, &[1]), removed],
            &[],
            vec![migration(pb::MigrationState::Completed), migration(pb::MigrationState::Running)],
        );
        assert_eq!(status.nodes.len(), 1);
        assert_eq!(status.migrations.len(), 1);
    }

    #[test]
    fn flags_and_heartbeat_ages_read_at_a_glance() {
        let mut flagged = node(1, &[1]);
        flagged.stats =
            Some(pb::NodeStats { write_path_poisoned: true, quarantined_records: 2, ..Default::default() });
        flagged.clock_skewed = true;
        flagged.holds_unowned_data = true;
        assert_eq!(flags(&flagged), ["poisoned", "quarantined=2", "clock-skewed", "unowned-data"]);
        assert_eq!(flags(&node(2, &[1])), ["-"]);
        let aged = |ms| heartbeat_cell(&pb::StorageNode { heartbeat_age_ms: ms, ..node(1, &[1]) });
        assert_eq!((aged(850), aged(12_500), aged(300_000)), ("850ms".into(), "12s".into(), "5m".into()));
        assert_eq!(heartbeat_cell(&pb::StorageNode::default()), "never");
    }
}
