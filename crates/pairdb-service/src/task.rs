//! Spawning that keeps the caller's metrics [`Registry`](crate::metrics::Registry): a task or
//! blocking closure started here records where its spawner records. Outside a registry (every
//! standalone service) these are `tokio::spawn` and `spawn_blocking` as they are. Storage nodes,
//! which `pairdb dev` runs several of in one process, spawn only through these
//! (`crates/pairdb-storage/clippy.toml` refuses the tokio functions there).

use std::future::Future;

use tokio::task::JoinHandle;

use crate::metrics::{in_current, in_current_fn};

/// `tokio::spawn`, recording into the caller's registry.
#[allow(clippy::disallowed_methods)]
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(in_current(future))
}

/// `tokio::task::spawn_blocking`, recording into the caller's registry.
#[allow(clippy::disallowed_methods)]
pub fn spawn_blocking<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(in_current_fn(f))
}
