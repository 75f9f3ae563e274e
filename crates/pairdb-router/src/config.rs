//! Router configuration: flags with `PAIRDB_*` environment fallbacks, validated at start with messages
//! that name the field.

use std::net::SocketAddr;

use pairdb_service::addr::ListenAddr;

/// Configuration of one router.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pairdb-router", version, about = "PairDB request router")]
pub struct Config {
    /// Address to serve gRPC and HTTP on (host:port; a host name is resolved at start).
    #[arg(long, env = "PAIRDB_LISTEN_ADDR", default_value = "127.0.0.1:7000")]
    pub listen_addr: ListenAddr,
    /// Address of the metadata service (host:port) whose watch stream gives topology and tenants.
    #[arg(long, env = "PAIRDB_META_ADDR", default_value = "127.0.0.1:7100")]
    pub meta_addr: String,
    /// Deadline of a request that names none.
    #[arg(long, env = "PAIRDB_REQUEST_TIMEOUT_MS", default_value_t = 2000)]
    pub request_timeout_ms: u64,
    /// Largest deadline a client may ask for.
    #[arg(long, env = "PAIRDB_MAX_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub max_request_timeout_ms: u64,
    /// Per-call timeout of one storage RPC; a replica slower than this counts as failed for the call.
    #[arg(long, env = "PAIRDB_STORAGE_TIMEOUT_MS", default_value_t = 1000)]
    pub storage_timeout_ms: u64,
    /// A read asks the remaining replicas when the first R have not all answered after this long.
    #[arg(long, env = "PAIRDB_READ_SPECULATIVE_AFTER_MS", default_value_t = 50)]
    pub read_speculative_after_ms: u64,
    /// In-flight RPCs per storage node; more wait (bounded by the request deadline).
    #[arg(long, env = "PAIRDB_MAX_INFLIGHT_PER_NODE", default_value_t = 512)]
    pub max_inflight_per_node: usize,
    /// Point calls (reads, coordinated writes, replications) of one kind in flight to a storage node
    /// before further ones queue and leave together as one batched RPC when one returns; 0 sends
    /// every call alone.
    #[arg(long, env = "PAIRDB_COALESCE_AFTER_IN_FLIGHT", default_value_t = crate::pool::DEFAULT_COALESCE_LEADS)]
    pub coalesce_after_in_flight: usize,
    /// Concurrent keys of one GetMany.
    #[arg(long, env = "PAIRDB_GET_MANY_CONCURRENCY", default_value_t = 16)]
    pub get_many_concurrency: usize,
    /// How often suspect storage nodes are probed.
    #[arg(long, env = "PAIRDB_PROBE_INTERVAL_MS", default_value_t = 500)]
    pub probe_interval_ms: u64,
    /// Serve without API-key authentication: requests name their tenant with `tenant_id` (for
    /// `pairdb dev` and tests; logged as a warning).
    #[arg(long, env = "PAIRDB_NO_AUTH")]
    pub no_auth: bool,
    /// Redis URL for idempotency records shared by all routers (`redis://host:6379`). Without it each
    /// router keeps them in memory, which is right only for a single router.
    #[arg(long, env = "PAIRDB_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// How long a completed idempotent write's reply is kept.
    #[arg(long, env = "PAIRDB_IDEMPOTENCY_RETENTION_SECS", default_value_t = 86_400)]
    pub idempotency_retention_secs: u64,
    /// Bound on each idempotency-store call; a slower store fails keyed writes with UNAVAILABLE.
    #[arg(long, env = "PAIRDB_IDEMPOTENCY_TIMEOUT_MS", default_value_t = 500)]
    pub idempotency_timeout_ms: u64,
    #[command(flatten)]
    pub cluster_auth: pairdb_service::cluster_auth::ClusterAuthArgs,
    #[command(flatten)]
    pub service: pairdb_service::args::ServiceArgs,
}

/// A configuration value that cannot work; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Addr(#[from] pairdb_service::addr::AddrError),
    #[error("request_timeout_ms: must be between 1 and max_request_timeout_ms")]
    RequestTimeout,
    #[error("storage_timeout_ms: must be between 1 and 60000")]
    StorageTimeout,
    #[error("max_inflight_per_node: must be between 1 and 100000")]
    MaxInflight,
    #[error("coalesce_after_in_flight: must be between 0 and 1000")]
    CoalesceAfterInFlight,
    #[error("get_many_concurrency: must be between 1 and 100")]
    GetManyConcurrency,
    #[error("probe_interval_ms: must be between 10 and 3600000")]
    Interval,
    #[error("redis_url: must start with redis:// or rediss://")]
    RedisUrl,
    #[error("redis_url: {0}")]
    RedisUrlInvalid(String),
    #[error("idempotency_retention_secs: must be between 60 and 2592000 (30 days)")]
    IdempotencyRetention,
    #[error("idempotency_timeout_ms: must be between 10 and 60000")]
    IdempotencyTimeout,
    #[error(transparent)]
    ClusterAuth(#[from] pairdb_service::cluster_auth::AuthConfigError),
    #[error(transparent)]
    Listener(#[from] pairdb_service::listener::ListenerArgsError),
    #[error(transparent)]
    Tls(#[from] pairdb_service::tls::TlsError),
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        pairdb_service::addr::check_dial_addr("meta_addr", &self.meta_addr)?;
        if self.request_timeout_ms == 0 || self.request_timeout_ms > self.max_request_timeout_ms {
            return Err(ConfigError::RequestTimeout);
        }
        if !(1..=60_000).contains(&self.storage_timeout_ms) {
            return Err(ConfigError::StorageTimeout);
        }
        if !(1..=100_000).contains(&self.max_inflight_per_node) {
            return Err(ConfigError::MaxInflight);
        }
        if self.coalesce_after_in_flight > 1000 {
            return Err(ConfigError::CoalesceAfterInFlight);
        }
        if !(1..=100).contains(&self.get_many_concurrency) {
            return Err(ConfigError::GetManyConcurrency);
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(ConfigError::RedisUrl);
        }
        if let Some(url) = &self.redis_url {
            // What the router does with it at start (parse, no connection).
            redis::Client::open(url.as_str())
                .map_err(|error| ConfigError::RedisUrlInvalid(error.to_string()))?;
        }
        if !(60..=2_592_000).contains(&self.idempotency_retention_secs) {
            return Err(ConfigError::IdempotencyRetention);
        }
        if !(10..=60_000).contains(&self.idempotency_timeout_ms) {
            return Err(ConfigError::IdempotencyTimeout);
        }
        if !(10..=3_600_000).contains(&self.probe_interval_ms) {
            return Err(ConfigError::Interval);
        }
        self.service.listener.validate()?;
        self.cluster_auth()?;
        Ok(())
    }

    /// How this router authenticates to storage nodes and meta: with `router`'s credential (or, with
    /// TLS on, its certificate alone).
    pub fn cluster_auth(&self) -> Result<pairdb_service::cluster_auth::ClusterAuth, ConfigError> {
        use pairdb_service::cluster_auth::Principal;
        let certificates = self.service.tls.load()?.is_some();
        Ok(self.cluster_auth.load(|p| p == Principal::Router, "router", certificates)?)
    }

    /// Defaults for tests and embedding, talking to meta at `meta_addr`.
    pub fn with_meta(meta_addr: impl Into<String>) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)).into(),
            meta_addr: meta_addr.into(),
            request_timeout_ms: 2000,
            max_request_timeout_ms: 30_000,
            storage_timeout_ms: 1000,
            read_speculative_after_ms: 50,
            max_inflight_per_node: 512,
            coalesce_after_in_flight: crate::pool::DEFAULT_COALESCE_LEADS,
            get_many_concurrency: 16,
            probe_interval_ms: 500,
            no_auth: false,
            redis_url: None,
            idempotency_retention_secs: 86_400,
            idempotency_timeout_ms: 500,
            // Tests and embedders opt into cluster authentication explicitly.
            cluster_auth: pairdb_service::cluster_auth::ClusterAuthArgs {
                insecure_cluster: true,
                ..Default::default()
            },
            service: pairdb_service::args::ServiceArgs::default(),
        }
    }
}
