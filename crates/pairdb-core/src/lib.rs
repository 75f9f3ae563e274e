//! PairDB's pure core: everything that decides, nothing that does.
//!
//! - [`token`]: the stable 64-bit token of a (tenant, key) and its partition.
//! - [`ring`]: the deterministic, weighted, zone-aware partition assignment, preference lists and the
//!   transfers between two assignments.
//! - [`dvv`]: dotted version vector sets (siblings + causal context), their merge and update laws.
//! - [`encoding`]: the versioned binary encoding of version sets and version vectors.
//! - [`context`]: client contexts sealed (MACed) by routers and bound to a tenant and key.
//! - [`gc`]: when a fully acknowledged tombstone may be purged early (its placement still holds).
//! - [`quorum`]: consistency levels and R/W arithmetic.
//! - [`coordination`]: the write and read coordination state machines driven by the router.
//! - [`tenant`]: per-tenant choices the core reads (conflict mode).
//! - [`validation`]: limits on tenant ids, keys, values and replication factors.
//!
//! Architecture invariant: this crate does no IO, spawns nothing and never reads the clock. Time comes in
//! as plain numbers (`now_ms`) and decisions come out as values, so every rule here can be tested
//! exhaustively and driven by a seeded simulation.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod clock;
pub mod condition;
pub mod context;
pub mod coordination;
pub mod dvv;
pub mod encoding;
pub mod expiry;
pub mod gc;
pub mod listing;
pub mod quorum;
pub mod rate_limit;
pub mod reason;
pub mod repair;
pub mod ring;
pub mod tenant;
pub mod token;
pub mod usage;
pub mod validation;
