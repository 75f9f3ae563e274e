//! Addresses in the configuration: what a service listens on ([`ListenAddr`]) and the `host:port`
//! addresses it dials or advertises ([`check_dial_addr`]).
//!
//! Both accept host names, not only IP literals. A listen address is resolved when the service
//! starts (and by `--check-config`, which reports what it resolved to); an address to dial is only
//! checked for its shape, because the peer's name may resolve only where the service runs (a compose
//! or Kubernetes service name) and is resolved on every connection attempt anyway.

use std::net::{Ipv6Addr, SocketAddr};

/// An address that is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not host:port ({problem})")]
pub struct AddrSyntaxError {
    pub value: String,
    pub problem: &'static str,
}

/// A configured address that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    // Fields named `error`, not `source`: the message already includes them, and an error chain
    // would print them twice.
    #[error("{field}: {error}")]
    Syntax { field: &'static str, error: AddrSyntaxError },
    #[error("{field}: cannot resolve {value:?}: {error}")]
    Resolve { field: &'static str, value: String, error: std::io::Error },
    #[error("{field}: {value:?} resolves to no address")]
    NoAddress { field: &'static str, value: String },
}

/// Splits `host:port` (IPv6 literals in brackets) and checks both parts. Port 0 only when `any_port`.
fn split_host_port(text: &str, any_port: bool) -> Result<(&str, u16), AddrSyntaxError> {
    let error = |problem| AddrSyntaxError { value: text.to_owned(), problem };
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(|| error("an IPv6 address needs [addr]:port"))?;
        host.parse::<Ipv6Addr>().map_err(|_| error("not an IPv6 address in brackets"))?;
        (host, port)
    } else {
        let (host, port) = text.rsplit_once(':').ok_or_else(|| error("no port"))?;
        if host.contains(':') {
            return Err(error("write IPv6 addresses in brackets: [addr]:port"));
        }
        if !valid_host_name(host) {
            return Err(error("the host must be a DNS name or an IP address"));
        }
        (host, port)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error("the port must be a number"));
    }
    let port: u16 = port.parse().map_err(|_| error("the port must be at most 65535"))?;
    if port == 0 && !any_port {
        return Err(error("the port must be between 1 and 65535"));
    }
    Ok((host, port))
}

/// A DNS name or IPv4 literal: dot-separated labels of letters, digits, `-` and `_` (compose
/// service names), none empty or starting or ending with `-`.
fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Checks an address other processes are dialled at (`--meta-addr`, `--advertise-addr`):
/// `host:port` with a port from 1 to 65535, optionally after `http://` or `https://` (which the
/// client replaces by the scheme TLS calls for).
pub fn check_dial_addr(field: &'static str, value: &str) -> Result<(), AddrError> {
    let address = value.split_once("://").map_or(value, |(scheme, rest)| match scheme {
        "http" | "https" => rest.strip_suffix('/').unwrap_or(rest),
        _ => value,
    });
    split_host_port(address, false).map(|_| ()).map_err(|error| AddrError::Syntax { field, error })
}

/// The address a service listens on: `host:port`, where the host is an IP literal or a name resolved
/// when the listener is bound (`localhost:7000`, `0.0.0.0:7000`, `[::]:7000`). Port 0 picks a free port.
/// Printed as given.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ListenAddr(String);

impl std::str::FromStr for ListenAddr {
    type Err = AddrSyntaxError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        split_host_port(text, true)?;
        Ok(Self(text.to_owned()))
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        Self(addr.to_string())
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for ListenAddr {
    /// Bare, like a `SocketAddr`: `--check-config` prints `listen_addr: 0.0.0.0:7000`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ListenAddr {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The socket addresses the host resolves to, in resolver order.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, AddrError> {
        let field = "listen_addr";
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(self.0.as_str())
            .await
            .map_err(|error| AddrError::Resolve { field, value: self.0.clone(), error })?
            .collect();
        if addrs.is_empty() {
            return Err(AddrError::NoAddress { field, value: self.0.clone() });
        }
        Ok(addrs)
    }
}

/// Binds the first of `addrs` that can be bound (as `std::net::TcpListener::bind` does with a name).
pub async fn bind_first(addrs: &[SocketAddr]) -> Result<tokio::net::TcpListener, std::io::Error> {
    tokio::net::TcpListener::bind(addrs).await
}

/// The line `--check-config` adds under the configuration: what `listen_addr` resolved to.
pub fn resolved_listen_line(addrs: &[SocketAddr]) -> String {
    let addrs: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    format!("listen_addr resolves to {}", addrs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listen_addresses_take_names_and_literals() {
        for good in ["localhost:7000", "0.0.0.0:7000", "127.0.0.1:0", "[::]:7000", "[::1]:7100", "meta:7100"]
        {
            let addr: ListenAddr = good.parse().unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(format!("{addr:?}"), good);
        }
        for bad in
            ["not an address", "localhost", "localhost:", "localhost:99999", ":7000", "::1:7000", "a..b:1"]
        {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        let resolved = "localhost:7000".parse::<ListenAddr>().unwrap().resolve().await.unwrap();
        assert!(resolved.iter().all(|addr| addr.ip().is_loopback() && addr.port() == 7000), "{resolved:?}");
        let literal = ListenAddr::from(SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(literal.resolve().await.unwrap(), [SocketAddr::from(([127, 0, 0, 1], 0))]);
    }

    #[test]
    fn dial_addresses_are_host_and_port() {
        for good in
            ["meta:7100", "pairdb-meta.ns.svc:7100", "10.0.0.1:7100", "[fd00::1]:7100", "http://meta:7100"]
        {
            assert!(check_dial_addr("meta_addr", good).is_ok(), "{good}");
        }
        for bad in ["not an address", "meta", "meta:0", "meta:http", "ftp://meta:7100", "", "meta:7100/x"] {
            let error = check_dial_addr("meta_addr", bad).unwrap_err();
            assert!(error.to_string().starts_with("meta_addr: "), "{bad}: {error}");
        }
    }
}
