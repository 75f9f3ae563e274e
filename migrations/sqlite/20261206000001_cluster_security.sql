-- PairDB metadata schema, version 2 (SQLite). Keep equivalent to ../postgres/20261206000001_cluster_security.sql.
-- Context keys, tenant deletion that purges storage nodes, stale data directories. Documented in
-- crates/pairdb-meta/src/persistence/mod.rs.

-- Keys routers seal client contexts with. The newest unretired key is current, the one before it
-- previous; a rotation retires the previous one. Secrets are stored as is: routers need them.
CREATE TABLE context_keys (
    key_id BIGINT PRIMARY KEY,
    secret BLOB NOT NULL,
    created_at_ms BIGINT NOT NULL,
    -- 0 = in use (current or previous).
    retired_at_ms BIGINT NOT NULL DEFAULT 0
);

-- A counter behind tenant generations and deletion (purge) sequences: both only ever grow.
ALTER TABLE meta_state ADD COLUMN last_tenant_seq BIGINT NOT NULL DEFAULT 0;

-- active | deleting (storage nodes purge its data; the row goes once every node confirmed).
ALTER TABLE tenants ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
-- Which creation of this tenant id the row is; requests carry it so old routers never reach a
-- re-created tenant's data.
ALTER TABLE tenants ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
-- While deleting: the deletion storage nodes confirm.
ALTER TABLE tenants ADD COLUMN purge_seq BIGINT NOT NULL DEFAULT 0;
-- Tenants that existed before this version are generation 1; new ones count on from 2.
UPDATE tenants SET generation = 1;
UPDATE meta_state SET last_tenant_seq = 1;

-- Storage nodes that purged a deleting tenant's records and hints.
CREATE TABLE tenant_purges (
    tenant_id TEXT NOT NULL,
    purge_seq BIGINT NOT NULL,
    node_id BIGINT NOT NULL,
    confirmed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, purge_seq, node_id)
);

ALTER TABLE storage_nodes ADD COLUMN stats_quarantined_records BIGINT NOT NULL DEFAULT 0;
-- The actor id of the data directory a removed node had: a re-added node must come back with a
-- new (empty) data directory, never the stale one.
ALTER TABLE storage_nodes ADD COLUMN retired_actor_id BIGINT NOT NULL DEFAULT 0;
