-- PairDB metadata schema, version 3 (SQLite). Keep equivalent to ../postgres/20261206000002_tenant_key_groups.sql.
-- Per-tenant key groups. Documented in crates/pairdb-meta/src/persistence/mod.rs.

-- How a tenant's keys are placed: none | hash_tag. Written when the tenant is created and never
-- updated (a change would move every grouped key). Tenants that existed before this version are none.
ALTER TABLE tenants ADD COLUMN key_groups TEXT NOT NULL DEFAULT 'none';
