-- PairDB metadata schema, version 8 (PostgreSQL). Keep equivalent to ../sqlite/20261206210000_node_disk_and_live_value_bytes.sql.
-- Storage nodes' sizes named for what they are. Documented in crates/pairdb-meta/src/persistence/mod.rs.

-- `stats_live_bytes` always held the storage engine's size on disk (files, preallocation and space
-- compaction has not reclaimed), not the bytes of live data: name it so.
ALTER TABLE storage_nodes RENAME COLUMN stats_live_bytes TO stats_disk_bytes;
-- Bytes of the live values the node holds (its usage accounting), as its last heartbeat reported
-- them; 0 for nodes older than the figure and until a node reports it.
ALTER TABLE storage_nodes ADD COLUMN stats_live_value_bytes BIGINT NOT NULL DEFAULT 0;
