//! The router's metric catalogue: every family it exports, with its HELP text
//! (`docs/metrics.md` is its reference). [`pairdb_service::metrics::register`] gives each family its
//! HELP text and registers the closed label sets at zero, so `rate()` and `absent()` work from the
//! first scrape; families labelled by tenant, node or outcome appear with their first event.

use pairdb_service::metrics::{Family, Kind};

/// Every family this service exports.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "pairdb_router_requests_total",
        kind: Kind::Counter,
        help: "client requests by outcome",
        zero: &[],
    },
    Family {
        name: "pairdb_router_request_duration_seconds",
        kind: Kind::Histogram,
        help: "client request latency",
        zero: &[],
    },
    Family {
        name: "pairdb_router_storage_rpc_seconds",
        kind: Kind::Histogram,
        help: "latency of the router's calls to each storage node, failures included (a slow node shows here first)",
        zero: &[],
    },
    Family {
        name: "pairdb_router_coalesced_calls_total",
        kind: Kind::Counter,
        help: "point calls to a storage node sent inside a batched RPC because others of their kind were in flight",
        zero: &[],
    },
    Family {
        name: "pairdb_router_coalesced_batches_total",
        kind: Kind::Counter,
        help: "batched RPCs that carried coalesced point calls",
        zero: &[],
    },
    Family {
        name: "pairdb_router_quorum_failures_total",
        kind: Kind::Counter,
        help: "requests answered QUORUM_NOT_REACHED",
        zero: &[&[("op", "read")], &[("op", "write")]],
    },
    Family {
        name: "pairdb_router_read_siblings",
        kind: Kind::Histogram,
        help: "live siblings per successful read",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_router_read_repairs_total",
        kind: Kind::Counter,
        help: "read repairs sent to stale replicas",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_router_hints_written_total",
        kind: Kind::Counter,
        help: "writes stored as hints for an unreachable owner",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_router_tombstones_confirmed_total",
        kind: Kind::Counter,
        help: "owners that recorded a delete every owner acknowledged (full-ack tombstone GC)",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_router_storage_errors_total",
        kind: Kind::Counter,
        help: "failed or timed-out storage calls",
        zero: &[],
    },
    Family {
        name: "pairdb_router_rate_limited_total",
        kind: Kind::Counter,
        help: "requests refused by the tenant's rate limit",
        zero: &[],
    },
    Family {
        name: "pairdb_router_listed_keys_total",
        kind: Kind::Counter,
        help: "keys returned by listing pages",
        zero: &[&[("op", "list_keys")], &[("op", "scan")]],
    },
    Family {
        name: "pairdb_router_idempotent_replays_total",
        kind: Kind::Counter,
        help: "keyed writes answered from the idempotency store",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_router_topology_epoch",
        kind: Kind::Gauge,
        help: "topology epoch this router serves (compare routers to spot a lagging one)",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_router_watch_revision",
        kind: Kind::Gauge,
        help: "last watch revision applied",
        zero: &[&[]],
    },
    Family {
        name: "pairdb_router_precondition_failures_total",
        kind: Kind::Counter,
        help: "conditional writes refused with PRECONDITION_FAILED",
        zero: &[&[("at", "router")], &[("at", "coordinator")]],
    },
    Family {
        name: "pairdb_router_batch_items",
        kind: Kind::Histogram,
        help: "items per PutMany / DeleteMany",
        zero: &[&[]],
    },
];
