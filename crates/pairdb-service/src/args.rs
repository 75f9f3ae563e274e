//! The flags every service takes, flattened into each service's `Config` as `service`: the config
//! file, listener limits, TLS, the log format and `--check-config`.

use std::path::PathBuf;

use crate::listener::ListenerArgs;
use crate::telemetry::LogFormat;
use crate::tls::TlsArgs;

#[derive(Clone, Default, clap::Args)]
pub struct ServiceArgs {
    /// TOML file setting any of these flags by long name in snake_case (`listen_addr = "..."`).
    /// Flags and PAIRDB_* variables override it. See docs/configuration.md.
    #[arg(long, env = "PAIRDB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
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

impl std::fmt::Debug for ServiceArgs {
    /// The settings, not where they came from: `config` is left out, so `--check-config` prints the
    /// same for a config file as for the same values given as flags or variables.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceArgs")
            .field("listener", &self.listener)
            .field("tls", &self.tls)
            .field("log_format", &self.log_format)
            .field("check_config", &self.check_config)
            .finish()
    }
}

/// `url` with the secret of its user info replaced (`redis://:secret@host` → `redis://:<redacted>@host`;
/// user info without a password is taken for a token and replaced whole), for `--check-config` and
/// logs.
pub fn redact_url(url: &str) -> String {
    let (Some(scheme_end), Some(at)) = (url.find("://"), url.rfind('@')) else { return url.to_owned() };
    if at <= scheme_end {
        return url.to_owned();
    }
    let user_info = &url[scheme_end + 3..at];
    let shown = match user_info.split_once(':') {
        Some((user, _)) => format!("{user}:<redacted>"),
        None => "<redacted>".to_owned(),
    };
    format!("{}{shown}{}", &url[..scheme_end + 3], &url[at..])
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn url_secrets_are_redacted_and_the_rest_kept() {
        assert_eq!(redact_url("rediss://:pw@redis:6379/0"), "rediss://:<redacted>@redis:6379/0");
        assert_eq!(redact_url("postgres://app:pw@db/pairdb"), "postgres://app:<redacted>@db/pairdb");
        assert_eq!(redact_url("redis://token@redis"), "redis://<redacted>@redis");
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(redact_url("sqlite:meta.db"), "sqlite:meta.db");
    }
}
