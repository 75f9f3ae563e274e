-- PairDB metadata schema, version 8 (SQLite). Keep equivalent to ../postgres/20261206210000_node_disk_and_live_value_bytes.sql.
-- Storage nodes' live value bytes, beside their disk size. Additive only (rolling upgrades). Documented in crates/pairdb-meta/src/persistence/mod.rs.

-- `stats_live_bytes` always held the storage engine's size on disk (files, preallocation and space
-- compaction has not reclaimed), not the bytes of live data. It keeps its name: meta replicas of the
-- previous release share this database during a rolling upgrade and read and write that column, so
-- a rename would break them. The code reads it as the node's disk size.
-- Bytes of the live values the node holds (its usage accounting), as its last heartbeat reported
-- them; 0 for nodes older than the figure and until a node reports it.
ALTER TABLE storage_nodes ADD COLUMN stats_live_value_bytes BIGINT NOT NULL DEFAULT 0;
