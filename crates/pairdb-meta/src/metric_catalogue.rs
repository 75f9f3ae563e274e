//! The metadata service's metric catalogue: every family it exports, with its HELP text
//! (`docs/metrics.md` is its reference). [`pairdb_service::metrics::register`] gives each family its
//! HELP text and registers the closed label sets at zero, so `rate()` and `absent()` work from the
//! first scrape; families labelled by tenant, node or outcome appear with their first event.

use pairdb_service::metrics::{Family, Kind};

/// Every family this service exports.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "pairdb_meta_is_leader",
        kind: Kind::Gauge,
        help: "1 on the replica holding the leader lock (runs the failure detector and migrations)",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_watch_subscribers",
        kind: Kind::Gauge,
        help: "open watch streams (routers and nodes)",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_watch_lagged_total",
        kind: Kind::Counter,
        help: "subscribers cut off for falling behind (they resume from a snapshot)",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_migration_running",
        kind: Kind::Gauge,
        help: "1 while the leader runs a migration",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_migration_partitions",
        kind: Kind::Gauge,
        help: "partitions the running (or last) migration moves",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_migration_partitions_done",
        kind: Kind::Gauge,
        help: "partitions it has finished",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_migration_keys_done",
        kind: Kind::Gauge,
        help: "keys it has moved",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_migration_bytes_done",
        kind: Kind::Gauge,
        help: "bytes it has moved",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_migrations_completed_total",
        kind: Kind::Counter,
        help: "migrations completed by this leader",
        zero: &[
            &[("kind", "add_node")],
            &[("kind", "drain_node")],
            &[("kind", "remove_node")],
            &[("kind", "replication_factor")],
            &[("kind", "node_weight")],
        ],
    },
    Family {
        name: "pairdb_meta_live_routers",
        kind: Kind::Gauge,
        help: "routers heard from within the last 5 s, as last published in the watch stream (set by the leader every second)",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_meta_tenant_keys",
        kind: Kind::Gauge,
        help: "the tenant's keys with a live value, summed from the storage nodes' latest usage reports (set by the leader's quota evaluation, every second; a deleted tenant drops to 0)",
        zero: &[],
    },
    Family {
        name: "pairdb_meta_tenant_value_bytes",
        kind: Kind::Gauge,
        help: "bytes of its live values, each replica counted once",
        zero: &[],
    },
    Family {
        name: "pairdb_meta_tenant_siblings",
        kind: Kind::Gauge,
        help: "its live values (siblings) over all keys",
        zero: &[],
    },
    Family {
        name: "pairdb_meta_tenant_tombstones",
        kind: Kind::Gauge,
        help: "its deleted keys whose tombstones are still kept",
        zero: &[],
    },
    Family {
        name: "pairdb_meta_node_clock_offset_seconds",
        kind: Kind::Gauge,
        help: "how far the storage node's clock is ahead of meta's (negative: behind), in ms, as the node last measured it over a heartbeat round trip; set by the replica that received the heartbeat, and only by heartbeats that carry a measurement. Above --max-clock-offset-ms either way the node is clock_skewed (docs/meta.md)",
        zero: &[],
    },
];
