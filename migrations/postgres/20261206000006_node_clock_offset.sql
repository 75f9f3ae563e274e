-- PairDB metadata schema, version 7 (PostgreSQL). Keep equivalent to ../sqlite/20261206000006_node_clock_offset.sql.
-- Storage nodes' clock offsets. Documented in crates/pairdb-meta/src/persistence/mod.rs.

-- How far the node's wall clock is ahead of meta's (negative: behind), in ms, as the node measured it
-- over a heartbeat round trip and reported it with its last heartbeat; valid only when
-- stats_clock_offset_known. Nodes that existed before this version read as not known until they
-- report one.
ALTER TABLE storage_nodes ADD COLUMN stats_clock_offset_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE storage_nodes ADD COLUMN stats_clock_offset_known BOOLEAN NOT NULL DEFAULT FALSE;
