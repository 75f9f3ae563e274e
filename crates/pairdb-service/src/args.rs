//! The flags every service takes, flattened into each service's `Config` as `service`: listener
//! limits, TLS, the log format and `--check-config`.

use crate::listener::ListenerArgs;
use crate::telemetry::LogFormat;
use crate::tls::TlsArgs;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub listener: ListenerArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[arg(long, env = "PAIRDB_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Validate the configuration, print it and exit.
    #[arg(long)]
    pub check_config: bool,
}
