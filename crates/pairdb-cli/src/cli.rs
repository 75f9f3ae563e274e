//! Argument definitions and dispatch. Every global flag has a `PAIRDB_*` environment fallback; the
//! defaults are the endpoints `pairdb dev` serves on, so with no flags the CLI talks to that cluster.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use pairdb_client::{AdminClient, ClientOptions, Consistency, KvClient};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tracing::Instrument;

use crate::errors::{ErrorContext, Target, check_address, connect_error};
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

/// Options every command takes (shown under their own heading in each command's help).
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Globals {
    /// Router address (host:port) for `kv` and `bench`.
    #[arg(long, global = true, env = "PAIRDB_ROUTER", default_value = DEFAULT_ROUTER)]
    pub router: String,
    /// Metadata service address (host:port) for admin commands.
    #[arg(long, global = true, env = "PAIRDB_META", default_value = DEFAULT_META)]
    pub meta: String,
    /// API key sent to the router (`authorization: Bearer`).
    #[arg(long, global = true, env = "PAIRDB_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    pub token: Option<String>,
    /// Admin token sent to the metadata service.
    #[arg(
        long,
        global = true,
        env = "PAIRDB_ADMIN_TOKEN",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
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
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "PAIRDB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Globals {
    pub fn options(&self, token: Option<&String>) -> anyhow::Result<ClientOptions> {
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
        let options = self.options(self.token.as_ref())?;
        check_address(Target::Router, &self.router).await?;
        self.connect_kv(options).await
    }

    /// `count` KV clients, each over its own connection to the router (the address is checked once).
    pub async fn kv_connections(&self, count: usize) -> anyhow::Result<Vec<KvClient>> {
        let options = self.options(self.token.as_ref())?;
        check_address(Target::Router, &self.router).await?;
        let mut clients = Vec::with_capacity(count);
        for _ in 0..count {
            clients.push(self.connect_kv(options.clone()).await?);
        }
        Ok(clients)
    }

    async fn connect_kv(&self, options: ClientOptions) -> anyhow::Result<KvClient> {
        KvClient::connect(&self.router, &self.tenant(), options)
            .await
            .map_err(|error| connect_error(Target::Router, &self.router, error))
    }

    pub async fn admin(&self) -> anyhow::Result<AdminClient> {
        let options = self.options(self.admin_token.as_ref())?;
        check_address(Target::Meta, &self.meta).await?;
        AdminClient::connect(&self.meta, options)
            .await
            .map_err(|error| connect_error(Target::Meta, &self.meta, error))
    }

    /// What explaining a failure of `command` needs: the service it talks to and how to reach it.
    pub fn error_context(&self, command: &Command) -> ErrorContext {
        let target = command_target(command);
        let (address, token) = match target {
            Some(Target::Router) => (self.router.clone(), self.token.as_ref()),
            Some(Target::Meta) | None => (self.meta.clone(), self.admin_token.as_ref()),
        };
        ErrorContext {
            output: self.output,
            target,
            address,
            token_given: token.is_some(),
            options: self.options(token).ok(),
        }
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
    /// The cluster on one screen: every storage node's state, ownership, data and health, and the
    /// migrations under way (metadata service).
    Status,
    /// Start a complete local cluster (meta on SQLite, storage nodes, a router) in this process.
    Dev(DevArgs),
    /// YCSB-style load generator against a router.
    Bench(crate::bench::BenchArgs),
    /// Check the gRPC health of services (host:port).
    Health {
        /// Addresses (host:port) of routers, meta or storage nodes.
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Print a shell completion script, e.g. `pairdb completions bash > /etc/bash_completion.d/pairdb`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page of `pairdb` (roff), or write one page per command to --out-dir.
    Man {
        /// Write `pairdb.1` and a `pairdb-<command>.1` for every subcommand into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsistencyArg {
    /// One replica answers.
    One,
    /// A majority of the replicas answers.
    Quorum,
    /// Every replica answers.
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
        /// The key.
        key: String,
        /// The value (UTF-8 text); use --file for binary data.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Replicas that must acknowledge (default: the tenant's).
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
        /// Context printed by an earlier get or put of this key (base64).
        #[arg(long)]
        context: Option<String>,
        /// Read first and replace every version that read saw.
        #[arg(long, conflicts_with = "context")]
        overwrite: bool,
        /// A retry with the same key stores nothing twice and gets the first answer again.
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
        /// The key.
        key: String,
        /// Context printed by a get or put of this key: the values it names get the new expiry.
        #[arg(long)]
        context: String,
        /// The new expiry, from now (`30s`, `15m`, `2h`, `7d`).
        #[arg(long, value_parser = crate::duration::parse_duration)]
        ttl: Duration,
        /// Replicas that must acknowledge (default: the tenant's).
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
    },
    /// Read every live value (sibling) of a key and its context.
    Get {
        /// The key.
        key: String,
        /// Replicas to read (default: the tenant's).
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
    },
    /// Delete a key (a tombstone over the given context, or over what a read sees).
    Delete {
        /// The key.
        key: String,
        /// Replicas that must acknowledge (default: the tenant's).
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
        /// Context printed by a get of this key: delete exactly what it saw (default: read first).
        #[arg(long)]
        context: Option<String>,
        /// A retry with the same key deletes nothing twice and gets the first answer again.
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
        /// The JSON-lines file (`-`: read stdin).
        file: PathBuf,
        /// Replicas that must acknowledge each item (default: the tenant's).
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
    /// Concurrent writes are kept side by side until a write with their context resolves them.
    Siblings,
    /// The write with the latest timestamp wins (last writer wins).
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
    /// Replicas of each key (default 3); a change starts a migration.
    #[arg(long)]
    pub replication_factor: Option<u32>,
    /// Consistency of requests that do not ask for one (default quorum).
    #[arg(long, value_enum)]
    pub default_consistency: Option<ConsistencyArg>,
    /// What concurrent writes to a key leave (default siblings).
    #[arg(long, value_enum)]
    pub conflict_mode: Option<ConflictModeArg>,
    /// Sustained operations per second (0 = unlimited).
    #[arg(long)]
    pub rate_limit_ops_per_sec: Option<u32>,
    /// Operations that may arrive at once above the sustained rate (token bucket size).
    #[arg(long)]
    pub rate_limit_burst: Option<u32>,
    /// Largest value a write may carry, in bytes.
    #[arg(long)]
    pub max_value_bytes: Option<u64>,
    /// Most live values (siblings) a key may have; writes past it are refused.
    #[arg(long)]
    pub max_siblings: Option<u32>,
    /// Only the key's own replicas count towards a quorum (no hinted fallbacks).
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
    /// Create a tenant.
    Create {
        /// The tenant's id.
        tenant_id: String,
        #[command(flatten)]
        settings: TenantSettings,
        /// How keys are placed (default none); fixed for the tenant's life.
        #[arg(long, value_enum)]
        key_groups: Option<KeyGroupsArg>,
    },
    /// Show a tenant's settings.
    Get {
        /// The tenant's id.
        tenant_id: String,
    },
    /// List every tenant.
    List,
    /// Change settings; a new replication factor starts a migration.
    Update {
        /// The tenant's id.
        tenant_id: String,
        #[command(flatten)]
        settings: TenantSettings,
    },
    /// Delete a tenant: storage nodes purge its data, then the id may be used again.
    Delete {
        /// The tenant's id.
        tenant_id: String,
    },
    /// Show what the tenant's data amounts to (summed from the storage nodes' reports, with their
    /// age), its quotas and whether it is over them.
    Usage {
        /// The tenant's id.
        tenant_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; its secret is printed once.
    Create {
        /// The tenant the key acts as.
        tenant_id: String,
        /// A note on what the key is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List keys (of one tenant with --tenant-id).
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant_id: Option<String>,
    },
    /// Revoke a key: requests with it are refused from then on.
    Revoke {
        /// The key's id (16 hex digits, as `apikey create` and `apikey list` print it).
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
        /// Failure domain: replicas of a partition go to different zones where possible.
        #[arg(long, default_value = "")]
        zone: String,
        /// Share of the data relative to the other nodes' weights.
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// List every storage node with its state and figures.
    List,
    /// Show one storage node.
    Get {
        /// The node's id.
        node_id: u32,
    },
    /// Drain a node out of the ring (a migration); --force removes a dead node.
    Remove {
        /// The node's id.
        node_id: u32,
        /// Remove at once and re-replicate from the other replicas (for a node that is gone).
        #[arg(long)]
        force: bool,
    },
    /// Refill a node from the other replicas now (e.g. after its data directory was lost) and wait
    /// until it is done; anti-entropy would do it too, within its period.
    Rebuild {
        /// The node's id.
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
        /// The node's id.
        node_id: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// Show a migration and its progress.
    Get {
        /// The migration's id (`mig-...`).
        migration_id: String,
    },
    /// List migrations, running and finished.
    List,
    /// Cancel a migration that has not finished (the topology stays as it was).
    Cancel {
        /// The migration's id (`mig-...`).
        migration_id: String,
    },
    /// Follow a migration with a progress bar until it finishes.
    Watch {
        /// The migration's id (`mig-...`).
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
        /// `router`, `meta` or `node-<id>`.
        principal: String,
        /// Compute it offline from this cluster secret file instead of asking meta.
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
        /// Directory holding the CA and the certificates written.
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create storage node ID's certificate (common name node-ID) for its hosts.
    #[command(name = "create-node")]
    Node {
        /// The node's id.
        node_id: u32,
        /// Host names and IP addresses the node serves on (repeat the flag).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Directory holding the CA and the certificates written.
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create the routers' certificate (common name router).
    #[command(name = "create-router")]
    Router {
        /// Host names and IP addresses the routers serve on (repeat the flag).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Directory holding the CA and the certificates written.
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create the metadata service's certificate (common name meta).
    #[command(name = "create-meta")]
    Meta {
        /// Host names and IP addresses meta serves on (repeat the flag).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Directory holding the CA and the certificates written.
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
    /// Create a client certificate for tools (common name client-NAME; not a cluster member).
    #[command(name = "create-client")]
    Client {
        /// The tool's name (the certificate's common name is client-NAME).
        name: String,
        /// Directory holding the CA and the certificates written.
        #[arg(long, default_value = "./certs")]
        certs_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncArg {
    /// fsync before acknowledging each write (group commit).
    Always,
    /// fsync in the background: faster, loses the last writes on a crash.
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
    match cli.command {
        Command::Dev(args) => return crate::dev::run(args).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "pairdb", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { out_dir } => return man(out_dir.as_deref()),
        _ => {}
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

/// The service a command talks to (which flag its connection errors name).
fn command_target(command: &Command) -> Option<Target> {
    match command {
        Command::Kv(_) | Command::Bench(_) => Some(Target::Router),
        Command::Tenant(_)
        | Command::Apikey(_)
        | Command::Node(_)
        | Command::Migration(_)
        | Command::Cluster(_)
        | Command::Status => Some(Target::Meta),
        Command::Cert(_)
        | Command::Dev(_)
        | Command::Health { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => None,
    }
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
        Command::Status => "pairdb status",
        Command::Completions { .. } => "pairdb completions",
        Command::Man { .. } => "pairdb man",
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
        Command::Status => crate::status::run(globals).await,
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
    }
}

/// `pairdb man`: the top page on stdout, or every command's page in `out_dir`.
fn man(out_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let command = Cli::command();
    match out_dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            use std::io::Write as _;
            std::io::stdout().write_all(&page)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|error| anyhow::anyhow!("cannot create {}: {error}", dir.display()))?;
            clap_mangen::generate_to(command, dir).map_err(|error| {
                anyhow::anyhow!("cannot write the man pages to {}: {error}", dir.display())
            })?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Global flags: what every usage line must leave to `[OPTIONS]`.
    const GLOBAL_FLAGS: &[&str] = &[
        "--router",
        "--meta",
        "--token",
        "--admin-token",
        "--tenant",
        "--output",
        "--timeout-ms",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
    ];

    /// Every (sub)command path below `command`, with the command itself.
    fn walk<'a>(command: &'a clap::Command, path: String, out: &mut Vec<(String, &'a clap::Command)>) {
        for sub in command.get_subcommands() {
            walk(sub, format!("{path} {}", sub.get_name()), out);
        }
        out.push((path, command));
    }

    fn commands(root: &clap::Command) -> Vec<(String, &clap::Command)> {
        let mut out = Vec::new();
        walk(root, "pairdb".to_owned(), &mut out);
        out
    }

    fn built() -> clap::Command {
        let mut command = Cli::command();
        command.build();
        command
    }

    #[test]
    fn every_command_and_option_has_help() {
        Cli::command().debug_assert();
        let root = built();
        let mut missing = Vec::new();
        for (path, command) in commands(&root) {
            if path != "pairdb" && command.get_about().is_none() {
                missing.push(format!("`{path}` has no about"));
            }
            for arg in command.get_arguments().filter(|arg| !arg.is_hide_set()) {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("`{path}` argument `{}` has no help", arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "undocumented:\n{}", missing.join("\n"));
    }

    #[test]
    fn tenant_create_says_what_it_does() {
        let root = built();
        let create = root.find_subcommand("tenant").and_then(|t| t.find_subcommand("create")).unwrap();
        assert_eq!(create.get_about().map(|about| about.to_string()).as_deref(), Some("Create a tenant"));
    }

    #[test]
    fn global_options_have_their_own_heading_and_stay_out_of_usage_lines() {
        let root = built();
        for (path, command) in commands(&root) {
            let mut command = command.clone();
            let usage = command.render_usage().to_string();
            for flag in GLOBAL_FLAGS {
                assert!(!usage.contains(flag), "`{path}` usage shows the global {flag}: {usage}");
            }
            for arg in command.get_arguments() {
                if arg.is_required_set() {
                    assert!(
                        arg.get_default_values().is_empty(),
                        "`{path}` requires {} although it has a default",
                        arg.get_id()
                    );
                }
            }
        }
        let mut put = root.find_subcommand("kv").and_then(|kv| kv.find_subcommand("put")).unwrap().clone();
        let help = put.render_help().to_string();
        let globals = help.find("Global options:").unwrap_or_else(|| panic!("no global heading:\n{help}"));
        let own = help.find("Options:").unwrap();
        let router = help.find("--router").unwrap();
        let overwrite = help.find("--idempotency-key <").unwrap();
        assert!(own < overwrite && overwrite < globals && globals < router, "{help}");
    }
}
