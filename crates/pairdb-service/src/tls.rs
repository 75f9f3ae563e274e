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

/// TLS flags that cannot work; the message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{missing}: required with {given} (set tls_cert, tls_key and tls_ca together, or none of them)")]
    Incomplete { missing: &'static str, given: &'static str },
    #[error("{field}: cannot read {path}: {source}")]
    Read { field: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{field}: {path} holds no PEM {expected}")]
    NotPem { field: &'static str, path: PathBuf, expected: &'static str },
    #[error("{field}: {path}: {problem}")]
    Invalid { field: &'static str, path: PathBuf, problem: String },
    #[error("tls_cert, tls_key: not usable as this process's identity: {0}")]
    Unusable(String),
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

/// What a PEM file of each flag must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PemContent {
    Certificates,
    PrivateKey,
}

/// Reads a PEM file and checks it holds what its flag needs: certificates that parse as X.509, or
/// one private key. The bytes are what rustls gets; checking here gives messages naming the flag.
fn read_pem(field: &'static str, path: &Path, content: PemContent) -> Result<Vec<u8>, TlsError> {
    use x509_parser::pem::Pem;
    let bytes =
        std::fs::read(path).map_err(|source| TlsError::Read { field, path: path.to_owned(), source })?;
    let invalid = |problem: String| TlsError::Invalid { field, path: path.to_owned(), problem };
    let mut blocks = Vec::new();
    for block in Pem::iter_from_buffer(&bytes) {
        let block = block
            .map_err(|error| invalid(format!("PEM block {} is malformed: {error}", blocks.len() + 1)))?;
        blocks.push(block);
    }
    match content {
        PemContent::Certificates => {
            let certificates: Vec<&Pem> = blocks.iter().filter(|b| b.label == "CERTIFICATE").collect();
            if certificates.is_empty() {
                return Err(TlsError::NotPem { field, path: path.to_owned(), expected: "CERTIFICATE block" });
            }
            for (index, certificate) in certificates.iter().enumerate() {
                if let Err(error) = certificate.parse_x509() {
                    return Err(invalid(format!("certificate {} is not valid X.509: {error}", index + 1)));
                }
            }
        }
        PemContent::PrivateKey => {
            let keys = blocks.iter().filter(|b| b.label.ends_with("PRIVATE KEY")).count();
            match keys {
                0 => {
                    return Err(TlsError::NotPem {
                        field,
                        path: path.to_owned(),
                        expected: "PRIVATE KEY block",
                    });
                }
                1 => {}
                _ => return Err(invalid(format!("{keys} private keys; expected one"))),
            }
        }
    }
    Ok(bytes)
}

impl TlsArgs {
    /// The TLS material, or `None` when TLS is off. Reads and checks the files; what rustls would
    /// refuse when the server or a client is built fails here instead.
    pub fn load(&self) -> Result<Option<Tls>, TlsError> {
        let flags = [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key), ("tls_ca", &self.tls_ca)];
        let given = flags.iter().find(|(_, value)| value.is_some()).map(|(name, _)| *name);
        let missing = flags.iter().find(|(_, value)| value.is_none()).map(|(name, _)| *name);
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else {
            return match (given, missing) {
                (Some(given), Some(missing)) => Err(TlsError::Incomplete { missing, given }),
                _ => Ok(None),
            };
        };
        let tls = Tls {
            identity: Identity::from_pem(
                read_pem("tls_cert", cert, PemContent::Certificates)?,
                read_pem("tls_key", key, PemContent::PrivateKey)?,
            ),
            ca: Certificate::from_pem(read_pem("tls_ca", ca, PemContent::Certificates)?),
        };
        tls.check()?;
        Ok(Some(tls))
    }
}

impl Tls {
    /// Builds the server and client TLS configurations once, as serving and dialling will: a key
    /// rustls cannot use, or one that does not match the certificate, fails here.
    fn check(&self) -> Result<(), TlsError> {
        let unusable = |error: tonic::transport::Error| {
            let mut message = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            TlsError::Unusable(message)
        };
        tonic::transport::Server::builder()
            .tls_config(self.server_config(ClientCerts::Required))
            .map_err(unusable)?;
        Endpoint::from_static("https://localhost").tls_config(self.client_config()).map_err(unusable)?;
        Ok(())
    }

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
        assert!(matches!(
            partial.load(),
            Err(TlsError::Incomplete { missing: "tls_key", given: "tls_cert" })
        ));
        let ca_only = TlsArgs { tls_ca: Some("/nope".into()), ..TlsArgs::default() };
        let message = ca_only.load().unwrap_err().to_string();
        assert!(message.starts_with("tls_cert: required with tls_ca"), "{message}");
        let missing = TlsArgs {
            tls_cert: Some("/nope".into()),
            tls_key: Some("/nope".into()),
            tls_ca: Some("/nope".into()),
        };
        assert!(matches!(missing.load(), Err(TlsError::Read { field: "tls_cert", .. })));
    }
}
