//! The process-wide Prometheus recorder. Installed once per process and rendered on `/metrics`.
//! Services sharing a process share it, told apart by the `service` label where it matters; where
//! that would sum several instances of one service (`pairdb dev`'s storage nodes), each instance runs
//! inside a [`Registry`] of its own: its run future is scoped to it, and the spawns of the services
//! that can run more than once per process (storage, and the listener every service shares) carry
//! the registry on with [`in_current`] / [`in_current_fn`], so the instance's port reports it alone.
//!
//! Each service registers its catalogue ([`register`]): HELP text for every family, and every family
//! whose labels come from a closed set registered at zero, so a fresh process already exports the
//! series alerts and `rate()` use. `process_*` are read from `/proc` at scrape time.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Seconds buckets of every duration histogram: 100 µs to 5 s.
const SECONDS_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Buckets of the histograms that count things (siblings, batch items, writes per group commit).
const COUNT_BUCKETS: &[f64] =
    &[1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 10.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0];

/// The histograms of counts (every other histogram is in seconds).
pub const COUNT_HISTOGRAMS: &[&str] =
    &["pairdb_router_read_siblings", "pairdb_router_batch_items", "pairdb_storage_commit_group_writes"];

/// What kind of series a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family of a service's catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    /// The HELP line.
    pub help: &'static str,
    /// Label sets registered at zero when the service starts (`&[&[]]`: the one unlabelled series;
    /// `&[]`: none, for families labelled by tenant, node or outcome).
    pub zero: &'static [&'static [(&'static str, &'static str)]],
}

/// The families every service exports (the listener's, cluster authentication's, build and process).
pub const COMMON: &[Family] = &[
    Family {
        name: "pairdb_connections_open",
        kind: Kind::Gauge,
        help: "connections the listener holds (at most --max-connections)",
        zero: &[],
    },
    Family {
        name: "pairdb_connections_refused_total",
        kind: Kind::Counter,
        help: "connections closed at accept because the listener was at --max-connections",
        zero: &[],
    },
    Family {
        name: "pairdb_connections_silent_closed_total",
        kind: Kind::Counter,
        help: "connections closed for sending nothing within --first-byte-timeout-ms",
        zero: &[],
    },
    Family {
        name: "pairdb_cluster_auth_refused_total",
        kind: Kind::Counter,
        help: "internal calls refused: no or an invalid cluster credential, or a node acting as another",
        zero: &[],
    },
    Family {
        name: "pairdb_build_info",
        kind: Kind::Gauge,
        help: "1 per service this process runs, labelled with its release",
        zero: &[],
    },
    Family {
        name: "process_cpu_seconds_total",
        kind: Kind::Counter,
        help: "user and system CPU time of the process in seconds",
        zero: &[],
    },
    Family { name: "process_resident_memory_bytes", kind: Kind::Gauge, help: "resident set size", zero: &[] },
    Family {
        name: "process_virtual_memory_bytes",
        kind: Kind::Gauge,
        help: "virtual memory size",
        zero: &[],
    },
    Family { name: "process_open_fds", kind: Kind::Gauge, help: "open file descriptors", zero: &[] },
    Family { name: "process_max_fds", kind: Kind::Gauge, help: "limit of open file descriptors", zero: &[] },
    Family { name: "process_threads", kind: Kind::Gauge, help: "OS threads of the process", zero: &[] },
    Family {
        name: "process_start_time_seconds",
        kind: Kind::Gauge,
        help: "when the process started, in seconds since the Unix epoch",
        zero: &[],
    },
];

thread_local! {
    /// The registry the code running on this thread records into instead of the process-wide one.
    static ENTERED: Cell<Option<Registry>> = const { Cell::new(None) };
}

/// A recorder of one service's own, for a process that runs several services (`pairdb dev`'s
/// storage nodes). Code records into it while it runs inside the registry: a future wrapped by
/// [`Registry::scope`] or [`in_current`] (on every poll), a closure wrapped by [`in_current_fn`],
/// or a thread that called [`Registry::enter`]. Lives as long as the process.
#[derive(Clone, Copy)]
pub struct Registry(&'static RegistryParts);

struct RegistryParts {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A new, empty registry with the same buckets as the process-wide one.
    pub fn new() -> Registry {
        // Made once per service a process starts (a few in `pairdb dev`); it must outlive every
        // task and thread that records into it, and being `'static` makes entering it free.
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        Registry(Box::leak(Box::new(RegistryParts { recorder, handle })))
    }

    /// Makes this registry the calling thread's for the rest of the thread's life.
    pub fn enter(self) {
        std::mem::forget(metrics::set_default_local_recorder(&self.0.recorder));
        ENTERED.with(|entered| entered.set(Some(self)));
    }

    /// The registry the calling code runs inside, if any.
    pub fn entered() -> Option<Registry> {
        ENTERED.with(Cell::get)
    }

    /// `future`, recording into this registry on whichever thread polls it.
    pub fn scope<F: Future>(self, future: F) -> Scoped<F> {
        Scoped { registry: Some(self), inner: future }
    }

    /// Runs `f` inside this registry.
    fn run<T>(self, f: impl FnOnce() -> T) -> T {
        /// Restores the caller's registry even if `f` panics.
        struct Restore(Option<Registry>);
        impl Drop for Restore {
            fn drop(&mut self) {
                ENTERED.with(|entered| entered.set(self.0));
            }
        }
        let _restore = Restore(ENTERED.with(|entered| entered.replace(Some(self))));
        metrics::with_local_recorder(&self.0.recorder, f)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

/// Runs `f` inside `registry`, or as it is without one.
pub fn within<T>(registry: Option<Registry>, f: impl FnOnce() -> T) -> T {
    match registry {
        Some(registry) => registry.run(f),
        None => f(),
    }
}

/// `future`, recording into the registry the caller runs inside (if any) wherever it is polled: what
/// a service passes to `tokio::spawn`, so a spawned task records where its spawner does.
pub fn in_current<F: Future>(future: F) -> Scoped<F> {
    Scoped { registry: Registry::entered(), inner: future }
}

/// `f`, run inside the registry the caller runs inside (if any): what a service passes to
/// `spawn_blocking`.
pub fn in_current_fn<T>(f: impl FnOnce() -> T) -> impl FnOnce() -> T {
    let registry = Registry::entered();
    move || within(registry, f)
}

pin_project_lite::pin_project! {
    /// A future that records into a registry (see [`Registry::scope`], [`in_current`]).
    #[derive(Debug)]
    pub struct Scoped<F> {
        registry: Option<Registry>,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let inner = this.inner;
        within(*this.registry, || inner.poll(cx))
    }
}

fn builder() -> PrometheusBuilder {
    let builder = PrometheusBuilder::new();
    let builder = builder.set_buckets(SECONDS_BUCKETS).expect("the seconds buckets are not empty");
    COUNT_HISTOGRAMS.iter().fold(builder, |builder, name| {
        builder
            .set_buckets_for_metric(Matcher::Full((*name).to_owned()), COUNT_BUCKETS)
            .expect("the count buckets are not empty")
    })
}

/// Installs the recorder if none is installed yet and returns its handle (None if another recorder
/// owns the process, in which case `/metrics` renders nothing).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// The handle `/metrics` renders where it is called: the registry's it runs inside, else the
/// process-wide one.
fn current_handle() -> Option<PrometheusHandle> {
    Registry::entered().map(|registry| registry.0.handle.clone()).or_else(install)
}

/// Registers `service`'s catalogue and the common families: HELP text for each, the closed label
/// sets at zero (without changing a series another service in this process already moved), the
/// listener's series for this service, and `pairdb_build_info`.
pub fn register(service: &'static str, catalogue: &[Family]) {
    install();
    for family in COMMON.iter().chain(catalogue) {
        describe(family);
        for labels in family.zero {
            let labels: Vec<metrics::Label> =
                labels.iter().map(|(k, v)| metrics::Label::new(*k, *v)).collect();
            touch(family.kind, family.name, labels);
        }
    }
    for name in ["pairdb_connections_refused_total", "pairdb_connections_silent_closed_total"] {
        metrics::counter!(name, "service" => service).increment(0);
    }
    metrics::gauge!("pairdb_connections_open", "service" => service).increment(0.0);
    metrics::gauge!("pairdb_build_info", "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
}

fn describe(family: &Family) {
    let (name, help) = (family.name, family.help);
    match family.kind {
        Kind::Counter => metrics::describe_counter!(name, help),
        Kind::Gauge => metrics::describe_gauge!(name, help),
        Kind::Histogram => metrics::describe_histogram!(name, help),
    }
}

/// Creates the series without moving it.
fn touch(kind: Kind, name: &'static str, labels: Vec<metrics::Label>) {
    match kind {
        Kind::Counter => metrics::counter!(name, labels).increment(0),
        Kind::Gauge => metrics::gauge!(name, labels).increment(0.0),
        Kind::Histogram => drop(metrics::histogram!(name, labels)),
    }
}

/// `GET /metrics` in the Prometheus text format, with the process figures read just before.
pub fn routes() -> axum::Router {
    let handle = current_handle();
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                // /proc reads are cheap but still file reads: off the runtime threads.
                let process = tokio::task::spawn_blocking(process::render).await.unwrap_or_default();
                let mut text = handle.map(|h| h.render()).unwrap_or_default();
                text.push_str(&process);
                text
            }
        }),
    )
}

/// `process_*` of the Prometheus client conventions, from Linux's `/proc` (nothing elsewhere),
/// rendered as text beside the recorder's: CPU seconds are fractional, which the recorder's integer
/// counters cannot say.
mod process {
    use std::fmt::Write as _;

    use super::{COMMON, Kind};

    /// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ: 100 on every Linux ABI in use).
    const TICKS_PER_SECOND: f64 = 100.0;

    /// The process families in the text exposition format (empty where `/proc` is not there).
    pub fn render() -> String {
        let mut values: Vec<(&str, f64)> = Vec::new();
        if let Some(stat) = std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(stat_fields) {
            let cpu_ticks = stat.user_ticks + stat.system_ticks;
            values.push(("process_cpu_seconds_total", cpu_ticks as f64 / TICKS_PER_SECOND));
            values.push(("process_virtual_memory_bytes", stat.virtual_bytes as f64));
            values.push(("process_threads", stat.threads as f64));
            if let Some(boot_secs) = boot_time_secs() {
                values.push((
                    "process_start_time_seconds",
                    boot_secs as f64 + stat.start_ticks as f64 / TICKS_PER_SECOND,
                ));
            }
        }
        if let Some(rss_kib) = status_kib("VmRSS:") {
            values.push(("process_resident_memory_bytes", (rss_kib * 1024) as f64));
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            values.push(("process_open_fds", entries.count() as f64));
        }
        if let Some(limit) = max_fds() {
            values.push(("process_max_fds", limit as f64));
        }
        let mut text = String::new();
        for (name, value) in values {
            let Some(family) = COMMON.iter().find(|f| f.name == name) else { continue };
            let kind = if family.kind == Kind::Counter { "counter" } else { "gauge" };
            let _ = write!(text, "# HELP {name} {}\n# TYPE {name} {kind}\n{name} {value}\n\n", family.help);
        }
        text
    }

    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Stat {
        pub user_ticks: u64,
        pub system_ticks: u64,
        pub threads: u64,
        pub start_ticks: u64,
        pub virtual_bytes: u64,
    }

    /// The fields of `/proc/self/stat` after the command name (which may hold spaces and parens).
    pub(super) fn stat_fields(stat: &str) -> Option<Stat> {
        let after_name = &stat[stat.rfind(')')? + 1..];
        // Field 3 (state) is index 0 here; utime is field 14, stime 15, num_threads 20,
        // starttime 22, vsize 23.
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
        Some(Stat {
            user_ticks: field(14)?,
            system_ticks: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            virtual_bytes: field(23)?,
        })
    }

    fn boot_time_secs() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        stat.lines().find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
    }

    fn status_kib(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|line| line.starts_with(field))?;
        line[field.len()..].split_whitespace().next()?.parse().ok()
    }

    fn max_fds() -> Option<u64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
        line["Max open files".len()..].split_whitespace().next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Registry;
    use super::process::{Stat, stat_fields};

    #[test]
    fn a_thread_that_entered_a_registry_records_there_alone() {
        let (entered, other) = (Registry::new(), Registry::new());
        std::thread::spawn(move || {
            entered.enter();
            assert!(Registry::entered().is_some());
            metrics::counter!("pairdb_test_entered_total").increment(3);
        })
        .join()
        .expect("the recording thread");
        assert!(entered.0.handle.render().contains("pairdb_test_entered_total 3"));
        assert!(!other.0.handle.render().contains("pairdb_test_entered_total"));
        assert!(Registry::entered().is_none(), "this thread entered none");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scoped_future_and_what_it_spawns_record_into_its_registry_on_any_thread() {
        let (scoped, other) = (Registry::new(), Registry::new());
        let spawned = scoped.scope(async {
            assert_eq!(Registry::entered().map(|r| r.0 as *const _), Some(scoped.0 as *const _));
            let task = tokio::spawn(super::in_current(async {
                tokio::task::yield_now().await;
                metrics::counter!("pairdb_test_scoped_total").increment(2);
            }));
            let blocking = tokio::task::spawn_blocking(super::in_current_fn(|| {
                metrics::counter!("pairdb_test_scoped_total").increment(5);
            }));
            let _ = (task.await, blocking.await);
        });
        tokio::spawn(spawned).await.expect("the scoped task");
        assert!(scoped.0.handle.render().contains("pairdb_test_scoped_total 7"));
        assert!(!other.0.handle.render().contains("pairdb_test_scoped_total"));
        assert!(Registry::entered().is_none(), "the scope ends with the poll");
    }

    #[test]
    fn stat_fields_skip_a_command_name_with_spaces_and_parens() {
        let line = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 7 0 123456 \
                    987654 321 18446744073709551615";
        let stat = stat_fields(line).expect("parses");
        assert_eq!(
            stat,
            Stat {
                user_ticks: 250,
                system_ticks: 75,
                threads: 7,
                start_ticks: 123456,
                virtual_bytes: 987654
            }
        );
    }

    #[test]
    fn this_process_has_a_stat() {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("linux");
        let stat = stat_fields(&stat).expect("parses");
        assert!(stat.threads >= 1);
    }
}
