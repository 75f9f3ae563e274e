//! Configuration of a storage node: flags with `PAIRDB_*` environment fallbacks, validated at start
//! with messages that name the field.

use std::net::SocketAddr;
use std::path::PathBuf;

use pairdb_core::ring::NodeId;
use pairdb_core::token::{DEFAULT_PARTITION_COUNT, PartitionCount};
use pairdb_service::addr::ListenAddr;

use crate::engine::SyncMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncSetting {
    /// fsync before acknowledging (concurrent writes share one fsync): survives power loss.
    Always,
    /// fsync every `--sync-interval-ms`: survives a process crash, may lose the last interval on power
    /// loss.
    Periodic,
}

/// Configuration of one storage node.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pairdb-storage", version, about = "PairDB storage node")]
pub struct Config {
    /// Address to serve gRPC and HTTP on (host:port; a host name is resolved at start).
    #[arg(long, env = "PAIRDB_LISTEN_ADDR", default_value = "127.0.0.1:7200")]
    pub listen_addr: ListenAddr,
    /// Address other processes use to reach this node (defaults to the listen address).
    #[arg(long, env = "PAIRDB_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// This node's id in the cluster (stored in the data directory on first start).
    #[arg(long, env = "PAIRDB_NODE_ID")]
    pub node_id: u32,
    /// Directory holding the node's data.
    #[arg(long, env = "PAIRDB_DATA_DIR", default_value = "./data/storage")]
    pub data_dir: PathBuf,
    /// When writes are fsynced.
    #[arg(long, env = "PAIRDB_SYNC", value_enum, default_value = "always")]
    pub sync: SyncSetting,
    /// fsync interval with `--sync periodic`.
    #[arg(long, env = "PAIRDB_SYNC_INTERVAL_MS", default_value_t = 100)]
    pub sync_interval_ms: u64,
    /// Number of ring partitions Q (a power of two; must match the cluster's).
    #[arg(long, env = "PAIRDB_PARTITION_COUNT", default_value_t = DEFAULT_PARTITION_COUNT)]
    pub partition_count: u32,
    /// Requests served at once; more wait.
    #[arg(long, env = "PAIRDB_MAX_INFLIGHT_REQUESTS", default_value_t = 1024)]
    pub max_inflight_requests: usize,
    /// Largest batch a partition stream sends.
    #[arg(long, env = "PAIRDB_STREAM_BATCH_MAX", default_value_t = 1024)]
    pub stream_batch_max: usize,
    /// Most of this node's time listings take while point reads and writes are being served, in
    /// percent (1-100; 100 = listings are not paced). Alone, listings use the whole node.
    #[arg(long, env = "PAIRDB_LISTING_SHARE_PERCENT", default_value_t = 10)]
    pub listing_share_percent: u8,
    /// A wall-clock offset to meta beyond this many ms is reported (readiness detail, warning log,
    /// metric): expiry and LWW timestamps this node stamps are off by that much.
    #[arg(long, env = "PAIRDB_MAX_CLOCK_OFFSET_MS", default_value_t = 1000)]
    pub max_clock_offset_ms: u64,
    /// Block cache size in MiB.
    #[arg(long, env = "PAIRDB_CACHE_MB", default_value_t = 64)]
    pub cache_mb: u64,
    /// Record cache size in MiB (0 = none): recently written or read records, in front of the
    /// engine, so a point read or a replica write that hits it skips the engine's lookups.
    #[arg(long, env = "PAIRDB_RECORD_CACHE_MB", default_value_t = 64)]
    pub record_cache_mb: u64,
    /// Writes are refused (DISK_FULL) when free disk space falls below this many MiB.
    #[arg(long, env = "PAIRDB_DISK_RESERVE_MB", default_value_t = 64)]
    pub disk_reserve_mb: u64,
    /// Metadata service to register with (host:port). Without it the node runs standalone.
    #[arg(long, env = "PAIRDB_META_ADDR")]
    pub meta_addr: Option<String>,
    /// Failure zone (rack, availability zone) of this node.
    #[arg(long, env = "PAIRDB_ZONE")]
    pub zone: Option<String>,
    /// Relative capacity of this node in the ring.
    #[arg(long, env = "PAIRDB_WEIGHT", default_value_t = 1)]
    pub weight: u32,
    /// Anti-entropy covers every partition this node replicates once per period (0 = off). Needs
    /// `--meta-addr` (the replicas come from the topology).
    #[arg(long, env = "PAIRDB_ANTI_ENTROPY_PERIOD_SECS", default_value_t = 3600)]
    pub anti_entropy_period_secs: u64,
    /// Keys anti-entropy may compare or exchange per second (0 = unlimited).
    #[arg(long, env = "PAIRDB_ANTI_ENTROPY_KEYS_PER_SEC", default_value_t = 20_000)]
    pub anti_entropy_keys_per_sec: u64,
    /// Bytes of version sets anti-entropy may exchange per second (0 = unlimited).
    #[arg(long, env = "PAIRDB_ANTI_ENTROPY_BYTES_PER_SEC", default_value_t = 16 * 1024 * 1024)]
    pub anti_entropy_bytes_per_sec: u64,
    /// After a topology version became current, data this node no longer owns is deleted once this
    /// long has passed (routers still on the old version may read it meanwhile). Until a node a
    /// migration took data from has done so, no node collects tombstones.
    #[arg(long, env = "PAIRDB_UNOWNED_GRACE_SECS", default_value_t = 3600)]
    pub unowned_grace_secs: u64,
    /// Tombstones are purged once older than this and every replica holds them (never on time
    /// alone). Must be at least `--hint-retention-secs`.
    #[arg(long, env = "PAIRDB_TOMBSTONE_GRACE_SECS", default_value_t = 86_400)]
    pub tombstone_grace_secs: u64,
    /// Hints not delivered within this long are dropped (anti-entropy repairs what they carried).
    #[arg(long, env = "PAIRDB_HINT_RETENTION_SECS", default_value_t = 10_800)]
    pub hint_retention_secs: u64,
    /// How often hints are pushed to every live node they are kept for (a node coming back gets its
    /// hints at once).
    #[arg(long, env = "PAIRDB_HINT_DELIVERY_INTERVAL_MS", default_value_t = 10_000)]
    pub hint_delivery_interval_ms: u64,
    /// Largest gRPC message this node accepts or sends, in MiB (checked after authentication; must
    /// hold a key's whole version set).
    #[arg(long, env = "PAIRDB_MAX_MESSAGE_MB", default_value_t = 64)]
    pub max_message_mb: usize,
    #[command(flatten)]
    pub cluster_auth: pairdb_service::cluster_auth::ClusterAuthArgs,
    #[command(flatten)]
    pub service: pairdb_service::args::ServiceArgs,
}

/// A configuration value that cannot work; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("node_id: must be at least 1")]
    NodeIdZero,
    #[error("partition_count: {0}")]
    PartitionCount(#[from] pairdb_core::token::InvalidPartitionCount),
    #[error("sync_interval_ms: must be between 1 and 60000")]
    SyncInterval,
    #[error("max_inflight_requests: must be between 1 and 100000")]
    MaxInflight,
    #[error("stream_batch_max: must be between 1 and 65536")]
    StreamBatch,
    #[error("listing_share_percent: must be between 1 and 100")]
    ListingShare,
    #[error("weight: must be between 1 and 1000")]
    Weight,
    #[error("hint_retention_secs: must be at least 1")]
    HintRetention,
    #[error(
        "tombstone_grace_secs: must be at least hint_retention_secs ({hint_retention_secs}): a hint older than a purged tombstone would bring the deleted value back"
    )]
    TombstoneGrace { hint_retention_secs: u64 },
    #[error("hint_delivery_interval_ms: must be between 10 and 3600000")]
    HintDeliveryInterval,
    #[error("max_message_mb: must be between 1 and 1024")]
    MaxMessage,
    #[error(transparent)]
    Addr(#[from] pairdb_service::addr::AddrError),
    #[error(transparent)]
    ClusterAuth(#[from] pairdb_service::cluster_auth::AuthConfigError),
    #[error(transparent)]
    Listener(#[from] pairdb_service::listener::ListenerArgsError),
    #[error(transparent)]
    Tls(#[from] pairdb_service::tls::TlsError),
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::NodeIdZero);
        }
        PartitionCount::new(self.partition_count)?;
        if !(1..=60_000).contains(&self.sync_interval_ms) {
            return Err(ConfigError::SyncInterval);
        }
        if !(1..=100_000).contains(&self.max_inflight_requests) {
            return Err(ConfigError::MaxInflight);
        }
        if !(1..=crate::batch::MAX_PEER_BATCH_ITEMS).contains(&self.stream_batch_max) {
            return Err(ConfigError::StreamBatch);
        }
        if !(1..=100).contains(&self.listing_share_percent) {
            return Err(ConfigError::ListingShare);
        }
        if !(1..=1000).contains(&self.weight) {
            return Err(ConfigError::Weight);
        }
        if self.hint_retention_secs == 0 {
            return Err(ConfigError::HintRetention);
        }
        if self.tombstone_grace_secs < self.hint_retention_secs {
            return Err(ConfigError::TombstoneGrace { hint_retention_secs: self.hint_retention_secs });
        }
        if !(10..=3_600_000).contains(&self.hint_delivery_interval_ms) {
            return Err(ConfigError::HintDeliveryInterval);
        }
        if !(1..=1024).contains(&self.max_message_mb) {
            return Err(ConfigError::MaxMessage);
        }
        if let Some(meta_addr) = &self.meta_addr {
            pairdb_service::addr::check_dial_addr("meta_addr", meta_addr)?;
        }
        if let Some(advertise_addr) = &self.advertise_addr {
            pairdb_service::addr::check_dial_addr("advertise_addr", advertise_addr)?;
        }
        self.service.listener.validate()?;
        self.cluster_auth()?;
        Ok(())
    }

    /// Largest gRPC message, in bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_mb * 1024 * 1024
    }

    /// How this node authenticates: it presents `node-<node_id>`'s credential (or, with TLS on, may
    /// rely on its certificate alone).
    pub fn cluster_auth(&self) -> Result<pairdb_service::cluster_auth::ClusterAuth, ConfigError> {
        use pairdb_service::cluster_auth::Principal;
        let node = Principal::Node(NodeId(self.node_id));
        let certificates = self.service.tls.load()?.is_some();
        Ok(self.cluster_auth.load(|p| p == node, &node.to_string(), certificates)?)
    }

    pub fn sync_mode(&self) -> SyncMode {
        match self.sync {
            SyncSetting::Always => SyncMode::Always,
            SyncSetting::Periodic => SyncMode::Periodic { interval_ms: self.sync_interval_ms },
        }
    }

    pub fn worker_settings(&self) -> crate::workers::WorkerSettings {
        use std::time::Duration;
        crate::workers::WorkerSettings {
            anti_entropy_period: Duration::from_secs(self.anti_entropy_period_secs),
            keys_per_sec: self.anti_entropy_keys_per_sec,
            bytes_per_sec: self.anti_entropy_bytes_per_sec,
            unowned_grace: Duration::from_secs(self.unowned_grace_secs),
            tombstone_grace: Duration::from_secs(self.tombstone_grace_secs),
            hint_retention: Duration::from_secs(self.hint_retention_secs),
            hint_delivery_interval: Duration::from_millis(self.hint_delivery_interval_ms),
        }
    }

    pub fn partitions(&self) -> Result<PartitionCount, ConfigError> {
        Ok(PartitionCount::new(self.partition_count)?)
    }

    /// A configuration for tests and embedding: node `node_id` in `data_dir`, defaults elsewhere.
    pub fn for_node(node_id: u32, data_dir: PathBuf) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)).into(),
            advertise_addr: None,
            node_id,
            data_dir,
            sync: SyncSetting::Always,
            sync_interval_ms: 100,
            partition_count: DEFAULT_PARTITION_COUNT,
            max_inflight_requests: 1024,
            stream_batch_max: 1024,
            listing_share_percent: 10,
            max_clock_offset_ms: 1000,
            cache_mb: 64,
            record_cache_mb: 64,
            disk_reserve_mb: 64,
            meta_addr: None,
            zone: None,
            weight: 1,
            anti_entropy_period_secs: 3600,
            anti_entropy_keys_per_sec: 20_000,
            anti_entropy_bytes_per_sec: 16 * 1024 * 1024,
            unowned_grace_secs: 3600,
            tombstone_grace_secs: 86_400,
            hint_retention_secs: 10_800,
            hint_delivery_interval_ms: 10_000,
            max_message_mb: 64,
            // Tests and embedders opt into cluster authentication explicitly.
            cluster_auth: pairdb_service::cluster_auth::ClusterAuthArgs {
                insecure_cluster: true,
                ..Default::default()
            },
            service: pairdb_service::args::ServiceArgs::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstone_grace_below_hint_retention_is_refused() {
        let mut config = Config::for_node(1, PathBuf::from("/tmp/unused"));
        assert!(config.validate().is_ok());
        config.hint_retention_secs = 600;
        config.tombstone_grace_secs = 599;
        let error = config.validate().unwrap_err();
        assert!(error.to_string().starts_with("tombstone_grace_secs:"), "{error}");
        config.tombstone_grace_secs = 600;
        assert!(config.validate().is_ok());
        config.hint_retention_secs = 0;
        assert!(matches!(config.validate(), Err(ConfigError::HintRetention)));
    }
}
