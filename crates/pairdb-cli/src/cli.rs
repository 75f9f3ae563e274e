//! Argument definitions and dispatch. Every global flag has a `PAIRDB_*` environment fallback; the
//! defaults are the endpoints `pairdb dev` serves on, so with no flags the CLI talks to that cluster.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pairdb_client::{AdminClient, ClientOptions, Consistency, KvClient};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::Instrument;

use crate::output::Output;

/// Router address `pairdb dev` serves on.
pub const DEFAULT_ROUTER: &str = "127.0.0.1:7000";
/// Meta address `pairdb dev` serves on.
pub const DEFAULT_META: &str = "127.0.0.1:7100";
/// Tenant `pairdb dev` creates; used when no API key names one.
pub const DEV_TENANT: &str = "demo";

#[derive(Debug, Parser)]
#[command(
    name = "pairdb",
    version,
    about = "PairDB command line: data, admin, the local dev cluster and benchmarks",
    after_help = "JSON output of every command is described in docs/cli.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Globals {
    /// Router address (host:port) for `kv` and `bench`.
    #[arg(long, global = true, env = "PAIRDB_ROUTER", default_value = DEFAULT_ROUTER)]
    pub router: String,
    /// Metadata service address (host:port) for admin commands.
    #[arg(long, global = true, env = "PAIRDB_META", default_value = DEFAULT_META)]
    pub meta: String,
    /// API key sent to the router (`authorization: Bearer`).
    #[arg(long, global = true, env = "PAIRDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Admin token sent to the metadata service.
    #[arg(long, global = true, env = "PAIRDB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Tenant for `kv` and `bench`. Defaults to `demo` (the dev cluster's tenant) when no API key is
    /// given; with an API key the key names the tenant.
    #[arg(long, global = true, env = "PAIRDB_TENANT")]
    pub tenant: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table, env = "PAIRDB_OUTPUT")]
    pub output: Output,
    /// Deadline of each request.
    #[arg(long, global = true, env = "PAIRDB_TIMEOUT_MS", default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Use TLS, verifying servers against this PEM CA.
    #[arg(long, global = true, env = "PAIRDB_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for services that require one (meta and storage with mutual TLS).
    #[arg(long, global = true, env = "PAIRDB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "PAIRDB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Globals {
    fn options(&self, token: Option<&String>) -> anyhow::Result<ClientOptions> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))
        };
        let tls = match &self.tls_ca {
            None => None,
            Some(ca) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
                if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                Some(tls)
            }
        };
        Ok(ClientOptions {
            token: token.cloned(),
            request_timeout: Duration::from_millis(self.timeout_ms.max(1)),
            tls,
            ..ClientOptions::default()
        })
    }

    pub fn tenant(&self) -> String {
        match (&self.tenant, &self.token) {
            (Some(tenant), _) => tenant.clone(),
            (None, Some(_)) => String::new(),
            (None, None) => DEV_TENANT.to_owned(),
        }
    }

    pub async fn kv(&self) -> anyhow::Result<KvClient> {
        Ok(KvClient::connect(&self.router, &self.tenant(), self.options(self.token.as_ref())?).await?)
    }

    pub async fn admin(&self) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::connect(&self.meta, self.options(self.admin_token.as_ref())?).await?)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Put, get and delete keys through a router.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Manage tenants (metadata service).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage API keys (metadata service).
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Manage storage nodes (metadata service).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Inspect and cancel migrations (metadata service).
    #[command(subcommand)]
    Migration(MigrationCommand),
    /// Cluster secrets: credentials of routers and storage nodes, context-key rotation.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Certificates for mutual TLS between the cluster's services.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Start a complete local cluster (meta on SQLite, storage nodes, a router) in this process.
    Dev(DevArgs),
    /// YCSB-style load generator against a router.
    Bench(crate::bench::BenchArgs),
    /// Check the gRPC health of services (host:port).
    Health {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsistencyArg {
    One,
    Quorum,
    All,
}

/// The client's consistency for an optional `--consistency` (unset = the tenant's default).
pub fn consistency(value: Option<ConsistencyArg>) -> Consistency {
    {
        match value {
            None => Consistency::TenantDefault,
            Some(ConsistencyArg::One) => Consistency::One,
            Some(ConsistencyArg::Quorum) => Consistency::Quorum,
            Some(ConsistencyArg::All) => Consistency::All,
        }
    }
}

/// A write's condition (at most one). When it does not hold the command fails with
/// PRECONDITION_FAILED and prints the key's current context (docs/api.md, "Conditional writes").
#[derive(Debug, Clone, Copy, Default, clap::Args)]
#[group(multiple = false)]
pub struct ConditionArgs {
    /// Write only if the key has no live value (never written, or deleted).
    #[arg(long)]
    pub if_absent: bool,
    /// Write only if the key has a live value.
    #[arg(long)]
    pub if_present: bool,
    /// Write only if the key is still exactly as --context saw it (nothing newer, nothing concurrent).
    #[arg(long, requires = "context")]
    pub if_match: bool,
}

impl ConditionArgs {
    pub fn condition(self) -> Option<pairdb_client::WriteCondition> {
        use pairdb_client::WriteCondition;
        [
            (self.if_absent, WriteCondition::IfAbsent),
            (self.if_present, WriteCondition::IfPresent),
            (self.if_match, WriteCondition::IfContextMatches),
        ]
        .into_iter()
        .find_map(|(set, condition)| set.then_some(condition))
    }
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Store a value. Without --context it is added next to what is there (a sibling if the key has a
    /// value); pass the context a get printed to replace what that get saw, or --overwrite.
    Put {
        key: String,
        /// The value (UTF-8 text); use --file for binary data.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
        /// Context printed by an earlier get or put of this key (base64).
        #[arg(long)]
        context: Option<String>,
        /// Read first and replace every version that read saw.
        #[arg(long, conflicts_with = "context")]
        overwrite: bool,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        condition: ConditionArgs,
        /// Expire the value this long after it is written (`30s`, `15m`, `2h`, `7d`); default:
        /// the tenant's default TTL, which may be never.
        #[arg(long, value_parser = crate::duration::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Give the values a context names a new expiry without sending them again (sliding sessions).
    Touch {
        key: String,
        /// Context printed by a get or put of this key: the values it names get the new expiry.
        #[arg(long)]
        context: String,
        /// The new expiry, from now (`30s`, `15m`, `2h`, `7d`).
        #[arg(long, value_parser = crate::duration::parse_duration)]
        ttl: Duration,
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
    },
    /// Read every live value (sibling) of a key and its context.
    Get {
        key: String,
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
    },
    /// Delete a key (a tombstone over the given context, or over what a read sees).
    Delete {
        key: String,
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
        #[arg(long)]
        context: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        condition: ConditionArgs,
    },
    /// List the tenant's keys in order, one page (or, with --all, every page in turn). A listing is
    /// not a snapshot: keys written or deleted meanwhile may or may not appear.
    List(ListArgs),
    /// Store many keys from a JSON-lines file (`-`: stdin) with PutMany, in batches: one line per
    /// key, `{"key": "k", "value": "text" | "value_base64": "..", "context"?, "ttl"?: "30s",
    /// "condition"?: "if_absent"}`. Prints a summary of the lines that failed, and fails if any did.
    PutMany {
        file: PathBuf,
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
    },
}

/// What `pairdb kv list` lists.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only keys starting with this text.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Only the keys of one key group (the text inside the braces of a key-group tenant's keys).
    #[arg(long)]
    pub group: Option<String>,
    /// Print every key's values and context too (a scan).
    #[arg(long)]
    pub values: bool,
    /// Fetch and print every page, not just the first.
    #[arg(long)]
    pub all: bool,
    /// Keys per page (at most 1000).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Start strictly after this key.
    #[arg(long)]
    pub start_after: Option<String>,
    /// Stop before this key.
    #[arg(long)]
    pub end_before: Option<String>,
    /// Continue a listing from the token an earlier page printed.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Descending key order.
    #[arg(long)]
    pub reverse: bool,
    /// Also list deleted keys.
    #[arg(long)]
    pub include_tombstones: bool,
    /// Only keys with more than one live value.
    #[arg(long)]
    pub conflicts_only: bool,
    /// Replicas per partition to read (ONE by default for listings).
    #[arg(long, value_enum)]
    pub consistency: Option<ConsistencyArg>,
    /// List what the answering replicas hold when some partitions have none.
    #[arg(long)]
    pub allow_partial: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConflictModeArg {
    Siblings,
    Lww,
}

/// How a tenant's keys are placed (`--key-groups`, create only: it can never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyGroupsArg {
    /// Every key is placed by its whole text.
    None,
    /// A key holding `{tag}` is placed by the tag alone, so a group's keys share one partition.
    #[value(name = "hash_tag")]
    HashTag,
}

/// Tenant settings shared by create and update (unset = default on create, unchanged on update).
#[derive(Debug, Args)]
pub struct TenantSettings {
    #[arg(long)]
    pub replication_factor: Option<u32>,
    #[arg(long, value_enum)]
    pub default_consistency: Option<ConsistencyArg>,
    #[arg(long, value_enum)]
    pub conflict_mode: Option<ConflictModeArg>,
    /// Sustained operations per second (0 = unlimited).
    #[arg(long)]
    pub rate_limit_ops_per_sec: Option<u32>,
    #[arg(long)]
    pub rate_limit_burst: Option<u32>,
    #[arg(long)]
    pub max_value_bytes: Option<u64>,
    #[arg(long)]
    pub max_siblings: Option<u32>,
    #[arg(long)]
    pub strict_quorum: Option<bool>,
    /// Quota on live keys: writes that would add keys fail once it is reached (0 = none; on update,
    /// 0 removes it).
    #[arg(long)]
    pub max_keys: Option<u64>,
    /// Quota on the bytes of live values, counted once per key (0 = none; on update, 0 removes it).
    #[arg(long)]
    pub max_bytes: Option<u64>,
    /// Expiry of a value written without one, e.g. 1500ms, 30s, 15m, 2h, 7d (0 = such values never
    /// expire; on update, 0 removes it). At most --max-ttl when both are set.
    #[arg(long = "default-ttl", value_name = "DURATION", value_parser = crate::duration::parse_ttl_ms)]
    pub default_ttl_ms: Option<u64>,
    /// Longest expiry any write gets, including one that asks for none (0 = no cap; on update, 0
    /// removes it). At most 100 years.
    #[arg(long = "max-ttl", value_name = "DURATION", value_parser = crate::duration::parse_ttl_ms)]
    pub max_ttl_ms: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    Create {
        tenant_id: String,
        #[command(flatten)]
        settings: TenantSettings,
        /// How keys are placed (default none); fixed for the tenant's life.
        #[arg(long, value_enum)]
        key_groups: Option<KeyGroupsArg>,
    },
    Get {
        tenant_id: String,
    },
    List,
    /// Change settings; a new replication factor starts a migration.
    Update {
        tenant_id: String,
        #[command(flatten)]
        settings: TenantSettings,
    },
    Delete {
        tenant_id: String,
    },
    /// Show what the tenant's data amounts to (summed from the storage nodes' reports, with their
    /// age), its quotas and whether it is over them.
    Usage {
        tenant_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; its secret is printed once.
    Create {
        tenant_id: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List keys (of one tenant with --tenant-id).
    List {
        #[arg(long)]
        tenant_id: Option<String>,
    },
    Revoke {
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Add a storage node to the ring (starts a migration).
    Add {
        /// Address routers and peers reach it at (host:port).
        address: String,
        /// Node id (default: the next free one).
        #[arg(long)]
        node_id: Option<u32>,
        #[arg(long, default_value = "")]
        zone: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    List,
    Get {
        node_id: u32,
    },
    /// Drain a node out of the ring (a migration); --force removes a dead node.
    Remove {
        node_id: u32,
        #[arg(long)]
        force: bool,
    },
    /// Refill a node from the other replicas now (e.g. after its data directory was lost) and wait
    /// until it is done; anti-entropy would do it too, within its period.
    Rebuild {
        node_id: u32,
        /// Start it and return at once (follow it with `pairdb node rebuild-status`).
        #[arg(long)]
        no_wait: bool,
        /// Poll interval while waiting.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// Show a node's rebuild (the last one since the node started, or the one running).
    RebuildStatus {
        node_id: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    Get {
        migration_id: String,
    },
    List,
    Cancel {
        migration_id: String,
    },
    /// Follow a migration with a progress bar until it finishes.
    Watch {
        migration_id: String,
        /// Poll interval.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a cluster secret and the credentials of a router and storage nodes 1..=N, as files in
    /// OUT (offline; for deployment files).
    Init {
        /// Directory to write `cluster-secret`, `router.credential` and `node-<id>.credential` to.
        #[arg(long)]
        out: PathBuf,
        /// Storage nodes to make credentials for.
        #[arg(long, default_value_t = 3)]
        storage_nodes: u32,
    },
    /// Print the cluster credential of a principal (`router`, `meta` or `node-<id>`): computed from
    /// the cluster secret file when given, else issued by meta (admin API).
    Credential {
        principal: String,
        #[arg(long)]
        cluster_secret_file: Option<PathBuf>,
    },
    /// Replace the key routers seal client contexts with; contexts sealed with the previous key keep
    /// working until the next rotation.
    RotateContextKey,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create the cluster CA (ca.crt, ca.key).
    #[command(name = "create-ca")]
    Ca {
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create storage node ID's certificate (common name node-ID) for its hosts.
    #[command(name = "create-node")]
    Node {
        node_id: u32,
        /// Host names and IP addresses the node serves on (repeat the flag).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create the routers' certificate (common name router).
    #[command(name = "create-router")]
    Router {
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create the metadata service's certificate (common name meta).
    #[command(name = "create-meta")]
    Meta {
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create a client certificate for tools (common name client-NAME; not a cluster member).
    #[command(name = "create-client")]
    Client {
        name: String,
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncArg {
    Always,
    Periodic,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Number of storage nodes.
    #[arg(long, default_value_t = 3)]
    pub storage_nodes: u32,
    /// Directory for all data (meta's SQLite database and each node's directory); reused on restart.
    #[arg(long, default_value = "./pairdb-dev-data")]
    pub data_dir: PathBuf,
    /// Router listen address.
    #[arg(long, default_value = DEFAULT_ROUTER)]
    pub router_addr: std::net::SocketAddr,
    /// Metadata service listen address.
    #[arg(long, default_value = DEFAULT_META)]
    pub meta_addr: std::net::SocketAddr,
    /// Port of the first storage node; node i listens on this + i - 1.
    #[arg(long, default_value_t = 7201)]
    pub storage_base_port: u16,
    /// Storage nodes' fsync mode.
    #[arg(long, value_enum, default_value_t = SyncArg::Always)]
    pub sync: SyncArg,
    /// Storage nodes' anti-entropy period (each covers all its partitions once per period; 0 = off).
    #[arg(long, default_value_t = 3600)]
    pub anti_entropy_period_secs: u64,
    /// Run the services without cluster authentication (internal APIs open to anyone who reaches
    /// their ports): for comparing its cost only; logged as a warning.
    #[arg(long)]
    pub insecure_cluster: bool,
}

/// Runs one command. Except for `dev` (whose services set up their own), commands run in a span
/// whose trace context the client propagates, so with `OTEL_EXPORTER_OTLP_ENDPOINT` set a CLI call
/// is the root of its request's trace.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Dev(args) = cli.command {
        return crate::dev::run(args).await;
    }
    if let Command::Bench(_) | Command::Health { .. } = cli.command {
        // Bench: each benchmark request is its own trace (if any), not a child of one giant command
        // span. Health: it is the images' HEALTHCHECK, run every few seconds in a container that has
        // OTEL_EXPORTER_OTLP_ENDPOINT set; probes must not fill the trace store.
        return run_command(cli).await;
    }
    let telemetry =
        pairdb_service::telemetry::init(pairdb_service::telemetry::LogFormat::Text, "warn", "pairdb-cli");
    let span = tracing::info_span!("cli.command", otel.name = command_name(&cli.command));
    let result = run_command(cli).instrument(span).await;
    telemetry.shutdown().await;
    result
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Kv(_) => "pairdb kv",
        Command::Tenant(_) => "pairdb tenant",
        Command::Apikey(_) => "pairdb apikey",
        Command::Node(_) => "pairdb node",
        Command::Migration(_) => "pairdb migration",
        Command::Cluster(_) => "pairdb cluster",
        Command::Cert(_) => "pairdb cert",
        Command::Dev(_) => "pairdb dev",
        Command::Bench(_) => "pairdb bench",
        Command::Health { .. } => "pairdb health",
    }
}

async fn run_command(cli: Cli) -> anyhow::Result<()> {
    let globals = &cli.globals;
    match cli.command {
        Command::Kv(command) => crate::kv::run(globals, command).await,
        Command::Tenant(command) => crate::admin::tenant(globals, command).await,
        Command::Apikey(command) => crate::admin::api_key(globals, command).await,
        Command::Node(command) => crate::admin::node(globals, command).await,
        Command::Migration(command) => crate::admin::migration(globals, command).await,
        Command::Cluster(command) => crate::cluster::run(globals, command).await,
        Command::Cert(command) => crate::cert::run(globals, command),
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Bench(args) => crate::bench::run(globals, args).await,
        Command::Health { addresses } => health(globals, addresses).await,
    }
}

async fn health(globals: &Globals, addresses: Vec<String>) -> anyhow::Result<()> {
    let mut results = Vec::new();
    let options = globals.options(None)?;
    for address in addresses {
        let serving = match pairdb_client::connect_with(&address, &options).await {
            Ok(channel) => pairdb_client::is_serving(channel).await.unwrap_or(false),
            Err(_) => false,
        };
        results.push((address, serving));
    }
    match globals.output {
        Output::Json => crate::output::print_json(&serde_json::json!({
            "services": results.iter().map(|(address, serving)| serde_json::json!({
                "address": address, "serving": serving,
            })).collect::<Vec<_>>()
        })),
        Output::Table => {
            for (address, serving) in &results {
                println!("{address}\t{}", if *serving { "serving" } else { "not serving" });
            }
        }
    }
    if results.iter().any(|(_, serving)| !serving) {
        anyhow::bail!("some services are not serving");
    }
    Ok(())
}
