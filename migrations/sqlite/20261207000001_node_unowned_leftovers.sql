-- PairDB metadata schema, version 9 (SQLite). Keep equivalent to ../postgres/20261207000001_node_unowned_leftovers.sql.
-- Nodes a migration left holding records they no longer own. Additive only (rolling upgrades).
-- Documented in crates/pairdb-meta/src/persistence/mod.rs.

-- The change-log revision from which the node is known to hold records of partitions it stopped
-- owning (set when a migration completes or is abandoned; 0 = no such mark), and the revision of the
-- view its last reported complete unowned-data deletion ran from. While the first is past the second,
-- views say so and no storage node collects tombstones. Rows from before this version read as
-- unmarked: nothing was known then.
ALTER TABLE storage_nodes ADD COLUMN leftovers_since_revision BIGINT NOT NULL DEFAULT 0;
ALTER TABLE storage_nodes ADD COLUMN leftovers_cleaned_revision BIGINT NOT NULL DEFAULT 0;
