-- PairDB metadata schema, version 6 (SQLite). Keep equivalent to ../postgres/20261206000005_tenant_ttl.sql.
-- Per-tenant value expiry settings. Documented in crates/pairdb-meta/src/persistence/mod.rs.

-- The expiry a write that asks for none gets (0 = never), and the longest expiry any write gets
-- (0 = no cap), in ms; pushed to routers, which stamp each written value's expiry. Tenants that
-- existed before this version keep values forever (0, 0).
ALTER TABLE tenants ADD COLUMN default_ttl_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN max_ttl_ms BIGINT NOT NULL DEFAULT 0;
