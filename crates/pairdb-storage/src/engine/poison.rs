//! The write path's poison signal. The first failed engine write, journal flush or fsync sets it, once,
//! with its cause; from then on every write and every durability wait fails with that cause
//! (WRITE_PATH_POISONED) until the process restarts. A failed fsync is never retried: after one,
//! the kernel may have dropped dirty pages, so a later "successful" fsync would prove nothing
//! (the fsyncgate lesson). Reads keep being served.

use std::sync::{Arc, OnceLock};

/// Which operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonedBy {
    /// A write straight to the journal (merge batches, purges, hints).
    EngineWrite,
    /// A group commit's flush to the OS (`--sync periodic`).
    JournalFlush,
    /// A group commit's fsync (`--sync always`).
    JournalFsync,
    /// The periodic or an explicit fsync.
    Fsync,
}

impl std::fmt::Display for PoisonedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoisonedBy::EngineWrite => "engine write",
            PoisonedBy::JournalFlush => "journal flush",
            PoisonedBy::JournalFsync => "journal fsync",
            PoisonedBy::Fsync => "fsync",
        })
    }
}

/// Why the write path refuses writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{by} failed: {detail}")]
pub struct PoisonCause {
    pub by: PoisonedBy,
    /// The storage engine's error.
    pub detail: Arc<str>,
}

impl PoisonCause {
    pub fn new(by: PoisonedBy, error: &fjall::Error) -> Self {
        Self { by, detail: format!("{error:?}").into() }
    }
}

/// Set once, read without a lock.
#[derive(Debug, Default)]
pub(super) struct PoisonSignal {
    cause: OnceLock<PoisonCause>,
}

impl PoisonSignal {
    /// Poisons the write path (a no-op if it already is); returns the cause that stands (the first).
    pub(super) fn set(&self, cause: PoisonCause) -> PoisonCause {
        let mut set_now = false;
        let standing = self.cause.get_or_init(|| {
            set_now = true;
            cause
        });
        if set_now {
            tracing::error!(cause = %standing, "write path poisoned: refusing writes until restart");
        }
        standing.clone()
    }

    pub(super) fn get(&self) -> Option<&PoisonCause> {
        self.cause.get()
    }

    pub(super) fn is_set(&self) -> bool {
        self.cause.get().is_some()
    }
}
