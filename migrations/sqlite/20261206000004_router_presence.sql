-- PairDB metadata schema, version 5 (SQLite). Keep equivalent to ../postgres/20261206000004_router_presence.sql.
-- Routers' presence and the live-router count. Documented in crates/pairdb-meta/src/persistence/mod.rs.

-- The routers that sent a heartbeat (RouterHeartbeat, every second), one row per router process:
-- upserted by each heartbeat outside the metadata lock; the leader deletes rows not seen for an hour.
CREATE TABLE routers (
    router_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);

-- The live-router count the watch stream last published (routers seen within the leader's window),
-- changed by the leader only, with a change-log row. 0 = not known.
ALTER TABLE meta_state ADD COLUMN live_routers BIGINT NOT NULL DEFAULT 0;
