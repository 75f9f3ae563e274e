-- PairDB metadata schema, version 4 (PostgreSQL). Keep equivalent to ../sqlite/20261206000003_tenant_usage_quotas.sql.
-- Tenant usage reported by storage nodes, quotas and the leader's over-quota verdict. Documented in
-- crates/pairdb-meta/src/persistence/mod.rs.

-- Quotas (0 = none), set by operators.
ALTER TABLE tenants ADD COLUMN max_keys BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN max_bytes BIGINT NOT NULL DEFAULT 0;
-- The leader's last evaluation of the tenant's usage against its quotas (pushed to routers and
-- storage nodes, whose coordinators refuse writes that would grow the tenant while one is set).
ALTER TABLE tenants ADD COLUMN over_key_quota BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE tenants ADD COLUMN over_byte_quota BOOLEAN NOT NULL DEFAULT FALSE;

-- When the node last reported its usage shares (0 = never): a node that reported and has no row for
-- a tenant holds none of it.
ALTER TABLE storage_nodes ADD COLUMN usage_reported_at_ms BIGINT NOT NULL DEFAULT 0;

-- Each storage node's latest share of each tenant's usage: the records of the partitions it is first
-- in the topology's list of, so the shares of the current topology's nodes add up to each tenant's
-- total once. A report replaces all of the node's rows.
CREATE TABLE tenant_usage (
    node_id BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    keys BIGINT NOT NULL,
    value_bytes BIGINT NOT NULL,
    siblings BIGINT NOT NULL,
    tombstones BIGINT NOT NULL,
    reported_at_ms BIGINT NOT NULL,
    PRIMARY KEY (node_id, tenant_id)
);
