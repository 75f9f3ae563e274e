//! Errors that explain themselves: what failed, in terms of the flag to change.
//!
//! Every failed command ends here (`main` calls [`ErrorContext::explain`]): the error becomes a
//! [`Report`] with a stable reason code, a message and the gRPC code when a server or the network
//! was involved, printed as `error: REASON: message` or, with `--output json`, as
//! `{"error": {"reason", "message", "code"}}` on stderr. The exit code does not depend on the format.
//!
//! Addresses are checked before connecting ([`check_address`]), so a missing port, a host that does
//! not resolve and a port nobody listens on give three different reasons; an UNIMPLEMENTED answer is
//! followed by a probe of which PairDB service does answer at that address, so the message can say
//! "that is a router, is --meta pointing at it?".

use std::time::Duration;

use pairdb_client::proto::{admin::v1 as admin_pb, kv::v1 as kv_pb, storage::v1 as storage_pb};
use pairdb_client::{ClientError, ClientOptions};
use serde_json::{Value, json};
use tonic::Code;

use crate::output::Output;

/// The service a command talks to, which decides the flag an error names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Router,
    Meta,
}

impl Target {
    pub fn flag(self) -> &'static str {
        match self {
            Target::Router => "--router",
            Target::Meta => "--meta",
        }
    }

    pub fn env(self) -> &'static str {
        match self {
            Target::Router => "PAIRDB_ROUTER",
            Target::Meta => "PAIRDB_META",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Target::Router => "a router",
            Target::Meta => "the metadata service",
        }
    }

    fn service(self) -> Service {
        match self {
            Target::Router => Service::Kv,
            Target::Meta => Service::Admin,
        }
    }

    fn token_flags(self) -> (&'static str, &'static str) {
        match self {
            Target::Router => ("--token", "PAIRDB_TOKEN"),
            Target::Meta => ("--admin-token", "PAIRDB_ADMIN_TOKEN"),
        }
    }

    fn default_address(self) -> &'static str {
        match self {
            Target::Router => crate::cli::DEFAULT_ROUTER,
            Target::Meta => crate::cli::DEFAULT_META,
        }
    }
}

/// The PairDB gRPC services an address may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Kv,
    Admin,
    Storage,
}

impl Service {
    const ALL: [Service; 3] = [Service::Kv, Service::Admin, Service::Storage];

    fn name(self) -> &'static str {
        match self {
            Service::Kv => "pairdb.kv.v1.KvService",
            Service::Admin => "pairdb.admin.v1.AdminService",
            Service::Storage => "pairdb.storage.v1.StorageService",
        }
    }

    /// What serves it, for the message.
    fn served_by(self) -> &'static str {
        match self {
            Service::Kv => "a router",
            Service::Admin => "the metadata service",
            Service::Storage => "a storage node",
        }
    }

    /// The flag that should point at such a service, if the CLI talks to it.
    fn flag(self) -> Option<&'static str> {
        match self {
            Service::Kv => Some("--router"),
            Service::Admin => Some("--meta"),
            Service::Storage => None,
        }
    }
}

/// An address given to a flag that cannot be reached; the reason comes first.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("INVALID_ADDRESS: {flag} {address:?} has no port; give host:port, e.g. {example}")]
    MissingPort { flag: &'static str, address: String, example: &'static str },
    #[error("INVALID_ADDRESS: {flag} {address:?} is not host:port ({problem}), e.g. {example}")]
    Malformed { flag: &'static str, address: String, problem: String, example: &'static str },
    #[error(
        "HOST_NOT_FOUND: {flag} {address}: the host {host:?} does not resolve ({detail}); check its name"
    )]
    HostNotFound { flag: &'static str, address: String, host: String, detail: String },
    #[error(
        "CONNECTION_REFUSED: nothing listens at {address} ({flag}): is {what} running there (or `pairdb dev`), \
         and is the port right?"
    )]
    Refused { flag: &'static str, address: String, what: &'static str },
    #[error(
        "CONNECT_TIMEOUT: {address} ({flag}) did not accept a connection in time: a firewall, a wrong host, \
         or a service that is stuck"
    )]
    TimedOut { flag: &'static str, address: String },
    #[error("CONNECT_FAILED: cannot connect to {address} ({flag}): {detail}")]
    Other { flag: &'static str, address: String, detail: String },
}

/// Splits `address` (`host:port`, `[v6]:port`, optionally behind `http(s)://`) into host and port.
fn split_address(target: Target, address: &str) -> Result<(String, u16), AddressError> {
    let flag = target.flag();
    let example = target.default_address();
    let malformed = |problem: &str| AddressError::Malformed {
        flag,
        address: address.to_owned(),
        problem: problem.to_owned(),
        example,
    };
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest).trim_end_matches('/');
    if rest.is_empty() {
        return Err(malformed("it is empty"));
    }
    if rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(malformed("it holds a path or spaces"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| malformed("an unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, port),
            None if after.is_empty() => (host, ""),
            None => return Err(malformed("text after ']'")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(malformed("an IPv6 address needs [brackets]"));
            }
            Some((host, port)) => (host, port),
            None => (rest, ""),
        }
    };
    if port.is_empty() {
        return Err(AddressError::MissingPort { flag, address: address.to_owned(), example });
    }
    if host.is_empty() {
        return Err(malformed("no host"));
    }
    let port: u16 = port.parse().map_err(|_| malformed("the port is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(malformed("port 0"));
    }
    Ok((host.to_owned(), port))
}

/// Checks that `address` names a port and that its host resolves, before connecting to it: a
/// connection error alone cannot tell these apart.
pub async fn check_address(target: Target, address: &str) -> Result<(), AddressError> {
    let (host, port) = split_address(target, address)?;
    let resolved = tokio::net::lookup_host((host.as_str(), port)).await.map(|mut addrs| addrs.next());
    let detail = match resolved {
        Ok(Some(_)) => return Ok(()),
        Ok(None) => "no addresses".to_owned(),
        Err(error) => error.to_string(),
    };
    Err(AddressError::HostNotFound { flag: target.flag(), address: address.to_owned(), host, detail })
}

/// A failed connection to a checked address, by what the socket said.
pub fn connect_error(target: Target, address: &str, error: ClientError) -> anyhow::Error {
    let ClientError::Connect { source, .. } = &error else { return error.into() };
    let mut kind = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
    let mut detail = source.to_string();
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            kind = Some(io.kind());
        }
        detail = current.to_string();
        cause = current.source();
    }
    let (flag, address) = (target.flag(), address.to_owned());
    let refused = kind == Some(std::io::ErrorKind::ConnectionRefused) || detail.contains("refused");
    let timed_out = kind == Some(std::io::ErrorKind::TimedOut) || detail.contains("timed out");
    let error = if refused {
        AddressError::Refused { flag, address, what: target.what() }
    } else if timed_out {
        AddressError::TimedOut { flag, address }
    } else {
        AddressError::Other { flag, address, detail }
    };
    error.into()
}

/// What is printed for a failed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Stable, upper case (`TENANT_NOT_FOUND`, `WRONG_SERVICE`, ...).
    pub reason: String,
    pub message: String,
    /// The gRPC status code, when a server or the network answered.
    pub code: Option<i32>,
    /// Extra fields for JSON (e.g. a failed condition's current context).
    pub details: Option<Value>,
}

impl Report {
    /// Prints the report on stderr in the command's output format.
    pub fn print(&self, output: Output) {
        match output {
            Output::Table => eprintln!("error: {}: {}", self.reason, self.message),
            Output::Json => {
                let mut error = json!({"reason": self.reason, "message": self.message, "code": self.code});
                if let Some(details) = &self.details {
                    error["details"] = details.clone();
                }
                eprintln!("{}", json!({ "error": error }));
            }
        }
    }

    /// A plain error whose text may start with its reason (`REASON: message`).
    fn from_text(text: &str, code: Option<i32>) -> Report {
        let (reason, message) = match text.split_once(": ") {
            Some((reason, message)) if is_reason(reason) => (reason.to_owned(), message.to_owned()),
            _ => ("COMMAND_FAILED".to_owned(), text.to_owned()),
        };
        Report { reason, message, code, details: None }
    }
}

fn is_reason(text: &str) -> bool {
    !text.is_empty()
        && text.starts_with(|c: char| c.is_ascii_uppercase())
        && text.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// What the explanation of an error needs to know about the command that failed.
#[derive(Debug, Clone)]
pub struct ErrorContext {
    pub output: Output,
    /// The service the command talks to (`None`: offline commands, `health`, `dev`).
    pub target: Option<Target>,
    pub address: String,
    /// Whether the command had a token for its target (`--token` / `--admin-token`).
    pub token_given: bool,
    /// How to reach the address again for a probe (`None`: the TLS files did not read).
    pub options: Option<ClientOptions>,
}

impl ErrorContext {
    /// The report for `error`; may ask the server at the command's address what it serves.
    pub async fn explain(&self, error: &anyhow::Error) -> Report {
        let Some(client_error) = error.downcast_ref::<ClientError>() else {
            return Report::from_text(&format!("{error:#}"), None);
        };
        let code = Some(client_error.code() as i32);
        match client_error {
            ClientError::Server { code: Code::Unimplemented, .. } if self.target.is_some() => {
                self.wrong_service(client_error).await
            }
            ClientError::Server {
                code: grpc @ (Code::Unauthenticated | Code::PermissionDenied),
                reason,
                message,
                ..
            } if self.target.is_some() => {
                let target = self.target.unwrap_or(Target::Meta);
                let (flag, env) = target.token_flags();
                let hint = match (*grpc, self.token_given) {
                    (Code::Unauthenticated, false) => {
                        format!("{} needs a token: give {flag} or set {env}", target.what())
                    }
                    (Code::Unauthenticated, true) => format!(
                        "{} refused the token given with {flag} / {env}: is it current, and for this cluster?",
                        target.what()
                    ),
                    _ => format!(
                        "the token given with {flag} / {env} may not do this: use one that may (an admin \
                         token for admin commands, the tenant's own API key for its data)"
                    ),
                };
                let message = if message.is_empty() { hint } else { format!("{message}; {hint}") };
                Report { reason: reason.clone(), message, code, details: None }
            }
            ClientError::Server { reason, message, .. } => match client_error.current_state() {
                Some(current) => Report {
                    reason: reason.clone(),
                    message: format!(
                        "{message}; the key {} (current context: {})",
                        if current.found { "has a value" } else { "has no value" },
                        crate::output::encode_context(&current.context)
                    ),
                    code,
                    details: Some(json!({
                        "found": current.found,
                        "context": crate::output::encode_context(&current.context),
                    })),
                },
                None => Report { reason: reason.clone(), message: message.clone(), code, details: None },
            },
            other => {
                Report { reason: other.reason().to_owned(), message: other.to_string(), code, details: None }
            }
        }
    }

    /// UNIMPLEMENTED: the address serves something else (or an older version of the right thing).
    async fn wrong_service(&self, error: &ClientError) -> Report {
        let target = self.target.unwrap_or(Target::Meta);
        let expected = target.service();
        let code = Some(Code::Unimplemented as i32);
        let address = &self.address;
        let served = match &self.options {
            Some(options) => probe(address, options).await,
            None => Vec::new(),
        };
        let (flag, env) = (target.flag(), target.env());
        let message = if served.contains(&expected) {
            format!(
                "{} at {address} does not implement the call this command makes: it is older than this \
                 CLI; upgrade it (or use a CLI of its version)",
                target.what()
            )
        } else if let Some(other) = served.first() {
            let mut text = format!(
                "the service at {address} does not implement {}: it is {} ({}); is {flag} ({env}) pointing \
                 at {}?",
                expected.name(),
                other.served_by(),
                other.name(),
                other.served_by()
            );
            if let Some(right) = other.flag() {
                text.push_str(&format!(" That address belongs in {right}."));
            }
            text.push_str(&format!(
                " {flag} should name {} (`pairdb dev`: {}).",
                target.what(),
                target.default_address()
            ));
            text
        } else {
            format!(
                "the service at {address} does not implement {} nor any other PairDB API: is {flag} ({env}) \
                 pointing at {}? ({})",
                expected.name(),
                target.what(),
                error
            )
        };
        Report { reason: "WRONG_SERVICE".to_owned(), message, code, details: None }
    }
}

/// The PairDB services that answer at `address` with anything but UNIMPLEMENTED: each probe is a
/// read-only call with an empty request, refused or answered without side effects.
async fn probe(address: &str, options: &ClientOptions) -> Vec<Service> {
    let options = ClientOptions { token: None, ..options.clone() };
    let Ok(channel) = pairdb_client::connect_with(address, &options).await else { return Vec::new() };
    let mut served = Vec::new();
    for service in Service::ALL {
        let call = async {
            let status = match service {
                Service::Kv => kv_pb::kv_service_client::KvServiceClient::new(channel.clone())
                    .get(kv_pb::GetRequest::default())
                    .await
                    .err(),
                Service::Admin => admin_pb::admin_service_client::AdminServiceClient::new(channel.clone())
                    .list_tenants(admin_pb::ListTenantsRequest {})
                    .await
                    .err(),
                Service::Storage => {
                    storage_pb::storage_service_client::StorageServiceClient::new(channel.clone())
                        .stats(storage_pb::StatsRequest {})
                        .await
                        .err()
                }
            };
            status.map(|status| status.code())
        };
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Some(Code::Unimplemented)) | Err(_) => {}
            Ok(_) => served.push(service),
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_port_or_host_are_refused_before_connecting() {
        let split = |address: &str| split_address(Target::Meta, address);
        assert_eq!(split("127.0.0.1:7100").unwrap(), ("127.0.0.1".to_owned(), 7100));
        assert_eq!(split("http://meta.example:7100/").unwrap(), ("meta.example".to_owned(), 7100));
        assert_eq!(split("[::1]:7100").unwrap(), ("::1".to_owned(), 7100));
        let missing = split("localhost").unwrap_err();
        assert!(matches!(missing, AddressError::MissingPort { .. }), "{missing}");
        assert!(missing.to_string().starts_with("INVALID_ADDRESS: --meta \"localhost\" has no port"));
        assert!(matches!(split("[::1]").unwrap_err(), AddressError::MissingPort { .. }));
        for bad in ["", "not an address", "host:port", "host:70000", ":7100", "::1:7100", "host:0"] {
            let error = split(bad).unwrap_err();
            assert!(matches!(error, AddressError::Malformed { .. }), "{bad:?}: {error}");
        }
    }

    #[tokio::test]
    async fn an_unresolvable_host_and_a_refused_port_are_told_apart() {
        let unknown = check_address(Target::Router, "no-such-host.invalid:7000").await.unwrap_err();
        assert!(matches!(unknown, AddressError::HostNotFound { .. }), "{unknown}");
        assert!(unknown.to_string().starts_with("HOST_NOT_FOUND: --router"), "{unknown}");

        // A port nobody listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        check_address(Target::Router, &address).await.unwrap();
        let error = pairdb_client::connect(&address).await.unwrap_err();
        let explained = connect_error(Target::Router, &address, error).to_string();
        assert!(explained.starts_with("CONNECTION_REFUSED: nothing listens at"), "{explained}");
        assert!(explained.contains("(--router)"), "{explained}");
    }

    #[tokio::test]
    async fn reports_split_the_reason_from_the_message() {
        let context = ErrorContext {
            output: Output::Json,
            target: None,
            address: String::new(),
            token_given: false,
            options: None,
        };
        let report = context.explain(&anyhow::anyhow!("MIGRATION_FAILED: migration m ended failed: x")).await;
        assert_eq!(
            (report.reason.as_str(), report.message.as_str()),
            ("MIGRATION_FAILED", "migration m ended failed: x")
        );
        let report = context.explain(&anyhow::anyhow!("cannot read f: gone")).await;
        assert_eq!(
            (report.reason.as_str(), report.message.as_str()),
            ("COMMAND_FAILED", "cannot read f: gone")
        );
        let server = ClientError::Server {
            code: Code::NotFound,
            reason: "TENANT_NOT_FOUND".into(),
            message: "tenant x does not exist".into(),
            metadata: Vec::new(),
        };
        let report = context.explain(&server.into()).await;
        assert_eq!(report.code, Some(Code::NotFound as i32));
        assert_eq!(report.reason, "TENANT_NOT_FOUND");
    }

    #[tokio::test]
    async fn auth_errors_name_the_token_flag_of_the_service() {
        let unauthenticated = || -> anyhow::Error {
            ClientError::Server {
                code: Code::Unauthenticated,
                reason: "UNAUTHENTICATED".into(),
                message: "missing bearer token".into(),
                metadata: Vec::new(),
            }
            .into()
        };
        let context = |target, token_given| ErrorContext {
            output: Output::Table,
            target: Some(target),
            address: String::new(),
            token_given,
            options: None,
        };
        let report = context(Target::Meta, false).explain(&unauthenticated()).await;
        assert!(report.message.contains("give --admin-token or set PAIRDB_ADMIN_TOKEN"), "{report:?}");
        let report = context(Target::Router, true).explain(&unauthenticated()).await;
        assert!(report.message.contains("refused the token given with --token / PAIRDB_TOKEN"), "{report:?}");
    }
}
