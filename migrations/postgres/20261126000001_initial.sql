-- PairDB metadata schema, version 1 (PostgreSQL). Keep equivalent to ../sqlite/20261126000001_initial.sql.
-- What each table holds and why is documented in crates/pairdb-meta/src/persistence/mod.rs.

-- One row: the cluster's fixed settings and the pointers that move with every change.
CREATE TABLE meta_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    -- Revision of the last committed change (see `changes`). Every mutating transaction updates this
    -- row first, so it doubles as the metadata write lock across replicas.
    revision BIGINT NOT NULL,
    -- Q, fixed when the cluster is created.
    partition_count BIGINT NOT NULL,
    -- Epoch of the current topology version; 0 = no topology yet (no node added).
    current_epoch BIGINT NOT NULL DEFAULT 0,
    -- Epoch of the pending topology version while a migration runs; 0 = none.
    pending_epoch BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE tenants (
    tenant_id TEXT PRIMARY KEY,
    replication_factor BIGINT NOT NULL,
    -- The factor reads still use while a replication_factor migration runs; 0 = none.
    previous_replication_factor BIGINT NOT NULL DEFAULT 0,
    default_consistency TEXT NOT NULL,
    conflict_mode TEXT NOT NULL,
    rate_limit_ops_per_sec BIGINT NOT NULL,
    rate_limit_burst BIGINT NOT NULL,
    max_value_bytes BIGINT NOT NULL,
    max_siblings BIGINT NOT NULL,
    strict_quorum BOOLEAN NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Only the SHA-256 (hex) of each secret is stored; the secret is shown once, at creation.
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    -- 0 = active.
    revoked_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

CREATE TABLE storage_nodes (
    node_id BIGINT PRIMARY KEY,
    address TEXT NOT NULL,
    zone TEXT NOT NULL,
    weight BIGINT NOT NULL,
    -- Lifecycle set by the admin API and migrations: joining | active | leaving | removed.
    membership TEXT NOT NULL,
    -- The failure detector's verdict; the reported status is `down` when false.
    alive BOOLEAN NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL DEFAULT 0,
    -- u64 actor id of the data directory's incarnation, stored as its two's-complement i64.
    actor_id BIGINT NOT NULL DEFAULT 0,
    data_format_version BIGINT NOT NULL DEFAULT 0,
    stats_keys BIGINT NOT NULL DEFAULT 0,
    stats_live_bytes BIGINT NOT NULL DEFAULT 0,
    stats_disk_free_bytes BIGINT NOT NULL DEFAULT 0,
    stats_hints_pending BIGINT NOT NULL DEFAULT 0,
    stats_write_path_poisoned BOOLEAN NOT NULL DEFAULT FALSE,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Immutable once written; epochs are never reused (a cancelled pending epoch is skipped).
CREATE TABLE topology_versions (
    epoch BIGINT PRIMARY KEY,
    partition_count BIGINT NOT NULL,
    list_len BIGINT NOT NULL,
    token_format_version BIGINT NOT NULL,
    -- Encoded by persistence::topology::encode (format byte, then u32 node ids, partition-major).
    assignment BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE migrations (
    migration_id TEXT PRIMARY KEY,
    -- Queue order: the revision of the transaction that created the migration.
    seq BIGINT NOT NULL UNIQUE,
    -- add_node | drain_node | remove_node | replication_factor | node_weight
    kind TEXT NOT NULL,
    -- pending | running | completed | failed | cancelled
    state TEXT NOT NULL,
    node_id BIGINT NOT NULL DEFAULT 0,
    tenant_id TEXT NOT NULL DEFAULT '',
    -- Kind-specific: the replication factor or weight before and after the change.
    old_value BIGINT NOT NULL DEFAULT 0,
    new_value BIGINT NOT NULL DEFAULT 0,
    from_epoch BIGINT NOT NULL DEFAULT 0,
    to_epoch BIGINT NOT NULL DEFAULT 0,
    partitions_total BIGINT NOT NULL DEFAULT 0,
    partitions_done BIGINT NOT NULL DEFAULT 0,
    keys_total BIGINT NOT NULL DEFAULT 0,
    keys_done BIGINT NOT NULL DEFAULT 0,
    bytes_done BIGINT NOT NULL DEFAULT 0,
    -- One bit per partition (bit p of byte p / 8): partitions whose transfers are done.
    done_bitmap BYTEA NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL DEFAULT 0,
    finished_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX migrations_by_state ON migrations (state, seq);

-- The change log behind the watch stream: one row per watch event, revisions contiguous.
CREATE TABLE changes (
    revision BIGINT PRIMARY KEY,
    -- tenant | tenant_deleted | node | api_key_added | api_key_revoked | topology_current
    -- | topology_pending | topology_pending_cleared
    kind TEXT NOT NULL,
    -- The tenant id, node id, key id or epoch the change is about.
    entity TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
