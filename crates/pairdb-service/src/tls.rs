//! TLS for every gRPC server and client of the cluster (rustls via tonic). Off by default; one flag
//! set turns it on: `--tls-cert`, `--tls-key` (this process's certificate, served to clients and
//! presented to peers) and `--tls-ca` (the CA that signs the cluster's certificates). With TLS on, a
//! process verifies every server it calls against the CA and presents its own certificate (mutual TLS);
//! internal services (meta, storage) refuse clients without a certificate the CA signed, while the
//! router, whose clients are applications, accepts them without one.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The TLS flags every service takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) of this process. With --tls-key and --tls-ca, turns TLS on.
    #[arg(long, env = "PAIRDB_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PAIRDB_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign the cluster's certificates.
    #[arg(long, env = "PAIRDB_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: set --tls-cert, --tls-key and --tls-ca together (or none of them)")]
    Incomplete,
    #[error("tls: cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("tls: {path} holds no PEM block")]
    NotPem { path: PathBuf },
}

/// Whether a server demands client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Internal services: only clients with a certificate the CA signed.
    Required,
    /// The router's client API: certificates are verified when presented.
    Optional,
}

/// Loaded TLS material.
#[derive(Debug, Clone)]
pub struct Tls {
    identity: Identity,
    ca: Certificate,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(TlsError::NotPem { path: path.to_owned() });
    }
    Ok(bytes)
}

impl TlsArgs {
    /// The TLS material, or `None` when TLS is off.
    pub fn load(&self) -> Result<Option<Tls>, TlsError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Tls {
                identity: Identity::from_pem(read_pem(cert)?, read_pem(key)?),
                ca: Certificate::from_pem(read_pem(ca)?),
            })),
            _ => Err(TlsError::Incomplete),
        }
    }
}

impl Tls {
    pub fn server_config(&self, client_certs: ClientCerts) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(client_certs == ClientCerts::Optional)
    }

    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone())
    }
}

/// The principal named by the verified client certificate of a mutual-TLS request: its subject's
/// common name (`node-3`, `router`, `meta`; `pairdb cert` issues such certificates). `None` without
/// TLS, without a client certificate or when the name is not a principal. The TLS handshake already
/// checked the certificate against the cluster CA.
pub fn peer_principal(extensions: &http::Extensions) -> Option<crate::cluster_auth::Principal> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certificates = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    let leaf = certificates.first()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let common_name = certificate.subject().iter_common_name().next()?.as_str().ok()?;
    common_name.parse().ok()
}

/// An endpoint for `address` (`host:port` or a URL): `https` with this process's TLS when on.
pub fn endpoint(address: &str, tls: Option<&Tls>) -> Result<Endpoint, tonic::transport::Error> {
    let host = address.split_once("://").map_or(address, |(_, rest)| rest);
    match tls {
        None => Endpoint::from_shared(format!("http://{host}")),
        Some(tls) => Endpoint::from_shared(format!("https://{host}"))?.tls_config(tls.client_config()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing() {
        assert!(TlsArgs::default().load().unwrap().is_none());
        let partial = TlsArgs { tls_cert: Some("/nope".into()), ..TlsArgs::default() };
        assert!(matches!(partial.load(), Err(TlsError::Incomplete)));
        let missing = TlsArgs {
            tls_cert: Some("/nope".into()),
            tls_key: Some("/nope".into()),
            tls_ca: Some("/nope".into()),
        };
        assert!(matches!(missing.load(), Err(TlsError::Read { .. })));
    }
}
