//! Configuration of one meta replica: flags with `PAIRDB_*` environment fallbacks, validated at start
//! with messages that name the field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pairdb_core::token::{DEFAULT_PARTITION_COUNT, PartitionCount};
use pairdb_service::addr::ListenAddr;

/// Configuration of one meta replica.
#[derive(Clone, clap::Parser)]
#[command(name = "pairdb-meta", version, about = "PairDB metadata service")]
pub struct Config {
    /// Address to serve gRPC and HTTP on (host:port; a host name is resolved at start).
    #[arg(long, env = "PAIRDB_LISTEN_ADDR", default_value = "127.0.0.1:7100")]
    pub listen_addr: ListenAddr,
    /// PostgreSQL URL (`postgres://...`). Without one, meta uses SQLite in the data directory
    /// (`sqlite:` URLs, including `sqlite::memory:`, are accepted too).
    #[arg(long, env = "PAIRDB_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Directory for the embedded SQLite database.
    #[arg(long, env = "PAIRDB_DATA_DIR", default_value = "./data/meta")]
    pub data_dir: PathBuf,
    /// Bound on waiting for a database connection; admin calls fail with UNAVAILABLE after it while
    /// the database is unreachable.
    #[arg(long, env = "PAIRDB_DATABASE_TIMEOUT_MS", default_value_t = 5000)]
    pub database_timeout_ms: u64,
    /// Pool size per replica.
    #[arg(long, env = "PAIRDB_DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
    /// Bearer token the admin API requires.
    #[arg(long, env = "PAIRDB_ADMIN_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin token (surrounding whitespace is ignored).
    #[arg(long, env = "PAIRDB_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API without authentication (for `pairdb dev`; logged as a warning).
    #[arg(long, env = "PAIRDB_NO_AUTH")]
    pub no_auth: bool,
    /// Q, the number of partitions. Used only when the cluster is created; fixed afterwards.
    #[arg(long, env = "PAIRDB_PARTITION_COUNT", default_value_t = DEFAULT_PARTITION_COUNT)]
    pub partition_count: u32,
    /// A node silent for this long is marked down.
    #[arg(long, env = "PAIRDB_NODE_DOWN_AFTER_MS", default_value_t = 5000)]
    pub node_down_after_ms: u64,
    /// Heartbeat interval storage nodes are told to use.
    #[arg(long, env = "PAIRDB_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u32,
    /// A storage node whose measured clock offset to meta is larger than this, either way, is
    /// reported `clock_skewed` and logged: the wall-clock times it takes (last-writer-wins
    /// timestamps, expiry checks) are off by as much.
    #[arg(long, env = "PAIRDB_MAX_CLOCK_OFFSET_MS", default_value_t = 1000)]
    pub max_clock_offset_ms: u64,
    /// Let a storage node that registers with an unknown id join the cluster (dev mode). Without it
    /// such a registration fails with NODE_NOT_FOUND: nodes are added with the admin API.
    #[arg(long, env = "PAIRDB_AUTO_ADD_NODES")]
    pub auto_add_nodes: bool,
    /// Partitions a migration moves at the same time (each moves to its new owners node to node).
    #[arg(long, env = "PAIRDB_MIGRATION_PARALLELISM", default_value_t = 4)]
    pub migration_parallelism: usize,
    /// Events buffered for each watch subscriber; a subscriber further behind is disconnected and
    /// resumes from a fresh snapshot.
    #[arg(long, env = "PAIRDB_WATCH_BUFFER", default_value_t = 1024)]
    pub watch_buffer: usize,
    /// The cluster secret (at least 32 characters; `pairdb cluster init` makes one). Meta derives the
    /// key that signs cluster credentials from it and verifies every internal caller with it. Every
    /// meta replica of a cluster needs the same secret. Prefer --cluster-secret-file.
    #[arg(long, env = "PAIRDB_CLUSTER_SECRET", hide_env_values = true, allow_hyphen_values = true)]
    pub cluster_secret: Option<String>,
    /// File holding the cluster secret.
    #[arg(long, env = "PAIRDB_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Serve the cluster API (registration, heartbeats, the watch stream with every API-key hash)
    /// to anyone who reaches this port. For isolated test networks only; logged as a warning.
    #[arg(long, env = "PAIRDB_INSECURE_CLUSTER")]
    pub insecure_cluster: bool,
    /// Largest gRPC message, in MiB (the watch stream's snapshot must fit).
    #[arg(long, env = "PAIRDB_MAX_MESSAGE_MB", default_value_t = 64)]
    pub max_message_mb: usize,
    #[command(flatten)]
    pub service: pairdb_service::args::ServiceArgs,
}

impl std::fmt::Debug for Config {
    /// Secrets are never printed (`--check-config` prints this).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("database_url", &self.database_url.as_deref().map(pairdb_service::args::redact_url))
            .field("data_dir", &self.data_dir)
            .field("database_timeout_ms", &self.database_timeout_ms)
            .field("database_max_connections", &self.database_max_connections)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("admin_token_file", &self.admin_token_file)
            .field("no_auth", &self.no_auth)
            .field("partition_count", &self.partition_count)
            .field("node_down_after_ms", &self.node_down_after_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("max_clock_offset_ms", &self.max_clock_offset_ms)
            .field("auto_add_nodes", &self.auto_add_nodes)
            .field("migration_parallelism", &self.migration_parallelism)
            .field("watch_buffer", &self.watch_buffer)
            .field("cluster_secret", &self.cluster_secret.as_ref().map(|_| "<redacted>"))
            .field("cluster_secret_file", &self.cluster_secret_file)
            .field("insecure_cluster", &self.insecure_cluster)
            .field("max_message_mb", &self.max_message_mb)
            .field("service", &self.service)
            .finish()
    }
}

/// A configuration value that cannot work; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("database_url: must start with postgres://, postgresql:// or sqlite:")]
    DatabaseUrlScheme,
    #[error("database_timeout_ms: must be between 100 and 600000")]
    DatabaseTimeout,
    #[error("database_max_connections: must be between 2 and 1000")]
    DatabaseMaxConnections,
    #[error(
        "admin_token: an admin token is required (--admin-token, PAIRDB_ADMIN_TOKEN, --admin-token-file or \
         PAIRDB_ADMIN_TOKEN_FILE); pass --no-auth to run without one"
    )]
    AdminTokenMissing,
    #[error("admin_token: set either admin_token or admin_token_file, not both")]
    AdminTokenTwice,
    #[error("admin_token: must be at least 8 characters without whitespace")]
    AdminTokenWeak,
    #[error("admin_token_file: cannot read {path}: {source}")]
    AdminTokenFile { path: PathBuf, source: std::io::Error },
    #[error("no_auth: cannot be combined with an admin token")]
    NoAuthWithToken,
    #[error("partition_count: {0}")]
    PartitionCount(#[from] pairdb_core::token::InvalidPartitionCount),
    #[error("node_down_after_ms: must be between 100 and 3600000 and above heartbeat_interval_ms")]
    NodeDownAfter,
    #[error("heartbeat_interval_ms: must be between 50 and 60000")]
    HeartbeatInterval,
    #[error("max_clock_offset_ms: must be between 10 and 3600000")]
    MaxClockOffset,
    #[error("watch_buffer: must be between 16 and 1000000")]
    WatchBuffer,
    #[error("migration_parallelism: must be between 1 and 64")]
    MigrationParallelism,
    #[error(
        "cluster_secret: a cluster secret is required (--cluster-secret-file, PAIRDB_CLUSTER_SECRET_FILE or \
         PAIRDB_CLUSTER_SECRET; `pairdb cluster init` makes one); pass --insecure-cluster to run without \
         cluster authentication"
    )]
    ClusterSecretMissing,
    #[error("cluster_secret: set either cluster_secret or cluster_secret_file, not both")]
    ClusterSecretTwice,
    #[error("insecure_cluster: cannot be combined with a cluster secret")]
    InsecureWithSecret,
    #[error("cluster_secret: {0}")]
    ClusterSecret(pairdb_service::cluster_auth::CredentialError),
    #[error("cluster_secret_file: {0}")]
    ClusterSecretFile(pairdb_service::cluster_auth::AuthConfigError),
    #[error("max_message_mb: must be between 1 and 1024")]
    MaxMessage,
    #[error(transparent)]
    Listener(#[from] pairdb_service::listener::ListenerArgsError),
    #[error(transparent)]
    Tls(#[from] pairdb_service::tls::TlsError),
}

/// How admin requests are authenticated.
#[derive(Clone, PartialEq, Eq)]
pub enum AdminAuth {
    /// `authorization: Bearer <token>` required.
    Token(String),
    /// `--no-auth`.
    Disabled,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAuth::Token(_) => f.write_str("Token(<redacted>)"),
            AdminAuth::Disabled => f.write_str("Disabled"),
        }
    }
}

impl Config {
    /// Checks every field (reading the admin token file) without touching the database.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
        {
            return Err(ConfigError::DatabaseUrlScheme);
        }
        if !(100..=600_000).contains(&self.database_timeout_ms) {
            return Err(ConfigError::DatabaseTimeout);
        }
        if !(2..=1000).contains(&self.database_max_connections) {
            return Err(ConfigError::DatabaseMaxConnections);
        }
        self.admin_auth()?;
        PartitionCount::new(self.partition_count)?;
        if !(50..=60_000).contains(&self.heartbeat_interval_ms) {
            return Err(ConfigError::HeartbeatInterval);
        }
        if !(100..=3_600_000).contains(&self.node_down_after_ms)
            || self.node_down_after_ms <= u64::from(self.heartbeat_interval_ms)
        {
            return Err(ConfigError::NodeDownAfter);
        }
        // Below ~10 ms a measurement's own error (half the round trip's asymmetry) would flag nodes
        // whose clocks are fine.
        if !(10..=3_600_000).contains(&self.max_clock_offset_ms) {
            return Err(ConfigError::MaxClockOffset);
        }
        if !(16..=1_000_000).contains(&self.watch_buffer) {
            return Err(ConfigError::WatchBuffer);
        }
        if !(1..=64).contains(&self.migration_parallelism) {
            return Err(ConfigError::MigrationParallelism);
        }
        if !(1..=1024).contains(&self.max_message_mb) {
            return Err(ConfigError::MaxMessage);
        }
        self.service.listener.validate()?;
        self.service.tls.load()?;
        self.signer()?;
        Ok(())
    }

    /// The cluster's credential signer, from the cluster secret; `None` with `--insecure-cluster`, or
    /// with mutual TLS and no secret (members are then identified by their certificates, and meta
    /// issues no credentials).
    pub fn signer(&self) -> Result<Option<pairdb_service::cluster_auth::Signer>, ConfigError> {
        use pairdb_service::cluster_auth::Signer;
        let signer = match (&self.cluster_secret, &self.cluster_secret_file) {
            (Some(_), Some(_)) => return Err(ConfigError::ClusterSecretTwice),
            (Some(secret), None) => Some(Signer::from_secret(secret).map_err(ConfigError::ClusterSecret)?),
            (None, Some(path)) => Some(Signer::read(path).map_err(ConfigError::ClusterSecretFile)?),
            (None, None) => None,
        };
        let certificates = self.service.tls.tls_cert.is_some();
        match (signer, self.insecure_cluster) {
            (Some(_), true) => Err(ConfigError::InsecureWithSecret),
            (None, false) if !certificates => Err(ConfigError::ClusterSecretMissing),
            (signer, _) => Ok(signer),
        }
    }

    /// Largest gRPC message, in bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_mb * 1024 * 1024
    }

    /// The admin authentication mode, reading `admin_token_file` if given.
    pub fn admin_auth(&self) -> Result<AdminAuth, ConfigError> {
        let token = match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => return Err(ConfigError::AdminTokenTwice),
            (Some(token), None) => Some(token.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::AdminTokenFile { path: path.clone(), source })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        match (token, self.no_auth) {
            (Some(_), true) => Err(ConfigError::NoAuthWithToken),
            (None, true) => Ok(AdminAuth::Disabled),
            (None, false) => Err(ConfigError::AdminTokenMissing),
            (Some(token), false) => {
                if token.len() < 8 || token.chars().any(char::is_whitespace) {
                    Err(ConfigError::AdminTokenWeak)
                } else {
                    Ok(AdminAuth::Token(token))
                }
            }
        }
    }

    /// The database URL to use: `database_url`, or an SQLite file in `data_dir`.
    pub fn effective_database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join("meta.db").display()),
        }
    }

    pub fn partitions(&self) -> Result<PartitionCount, ConfigError> {
        Ok(PartitionCount::new(self.partition_count)?)
    }

    pub fn database_timeout(&self) -> Duration {
        Duration::from_millis(self.database_timeout_ms)
    }

    /// An embedded replica (`pairdb dev`, tests): SQLite in `data_dir`, admin auth by `admin_token`
    /// (none: disabled), cluster authentication off unless the embedder turns it on, every other
    /// setting at its default.
    pub fn embedded(data_dir: PathBuf, admin_token: Option<String>) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)).into(),
            database_url: None,
            data_dir,
            database_timeout_ms: 5000,
            database_max_connections: 10,
            no_auth: admin_token.is_none(),
            admin_token,
            admin_token_file: None,
            partition_count: DEFAULT_PARTITION_COUNT,
            node_down_after_ms: 5000,
            heartbeat_interval_ms: 1000,
            max_clock_offset_ms: 1000,
            auto_add_nodes: false,
            migration_parallelism: 4,
            watch_buffer: 1024,
            cluster_secret: None,
            cluster_secret_file: None,
            // Tests and embedders opt into cluster authentication explicitly.
            insecure_cluster: true,
            max_message_mb: 64,
            service: pairdb_service::args::ServiceArgs::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let dir = PathBuf::from("/tmp/none");
        let mut config = Config::embedded(dir.clone(), Some("a-long-token".into()));
        assert!(config.validate().is_ok());
        config.database_url = Some("mysql://x".into());
        assert!(config.validate().unwrap_err().to_string().starts_with("database_url"));

        let mut config = Config::embedded(dir.clone(), None);
        config.no_auth = false;
        assert!(config.validate().unwrap_err().to_string().starts_with("admin_token"));
        config.admin_token = Some("short".into());
        assert!(config.validate().unwrap_err().to_string().starts_with("admin_token"));

        let mut config = Config::embedded(dir.clone(), None);
        config.partition_count = 1000;
        assert!(config.validate().unwrap_err().to_string().starts_with("partition_count"));

        let mut config = Config::embedded(dir.clone(), None);
        config.node_down_after_ms = 500;
        assert!(config.validate().unwrap_err().to_string().starts_with("node_down_after_ms"));

        for bad in [0, 9, 3_600_001] {
            let mut config = Config::embedded(dir.clone(), None);
            config.max_clock_offset_ms = bad;
            assert!(config.validate().unwrap_err().to_string().starts_with("max_clock_offset_ms"), "{bad}");
        }
    }

    #[test]
    fn max_clock_offset_defaults_to_a_second_and_reads_its_flag_and_env() {
        use clap::{CommandFactory as _, Parser as _};
        let parse = |args: &[&str]| Config::try_parse_from([&["pairdb-meta"], args].concat()).unwrap();
        let command = Config::command();
        let arg = command.get_arguments().find(|a| a.get_id() == "max_clock_offset_ms").unwrap();
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("PAIRDB_MAX_CLOCK_OFFSET_MS"));
        assert_eq!(parse(&[]).max_clock_offset_ms, 1000);
        assert_eq!(Config::embedded(PathBuf::from("/tmp"), None).max_clock_offset_ms, 1000);
        assert_eq!(parse(&["--max-clock-offset-ms", "250"]).max_clock_offset_ms, 250);
        let mut config = parse(&["--max-clock-offset-ms", "250", "--no-auth", "--insecure-cluster"]);
        assert!(config.validate().is_ok());
        config.max_clock_offset_ms = 10;
        assert!(config.validate().is_ok(), "the bounds are inclusive");
        config.max_clock_offset_ms = 3_600_000;
        assert!(config.validate().is_ok(), "the bounds are inclusive");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut config = Config::embedded(PathBuf::from("/tmp"), Some("super-secret-token".into()));
        config.database_url = Some("postgres://user:hunter2@db:5432/meta".into());
        let printed = format!("{config:?}");
        assert!(!printed.contains("super-secret-token"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("postgres://user:<redacted>@db:5432/meta"), "{printed}");
    }
}
