//! Cluster authentication: who may call a storage node's API and meta's cluster API.
//!
//! Every internal RPC carries a *cluster credential* naming its caller, a [`Principal`]: `meta`,
//! `router` or `node-<id>`. A credential is a statement "this holder is P" signed (Ed25519) by the
//! cluster's signing key, which only meta holds (it is derived from the cluster secret,
//! `--cluster-secret-file`):
//!
//! ```text
//! pdbc1.<principal>.<base64url cluster public key>.<base64url signature>
//! signature = Ed25519(cluster key, "pairdb/cluster-credential/v1" 0x00 | principal | public key)
//! ```
//!
//! A process learns the cluster's public key from its *own* credential (given by the operator, so
//! trusted) and verifies every caller's credential against it: no database, no meta round trip, and a
//! storage node verifies callers while meta is down. Only meta can mint credentials, so node 2 cannot
//! pass itself off as node 3, and a router's credential cannot be derived from a node's. With mutual
//! TLS on, a client certificate the cluster CA signed whose subject common name is a principal
//! (`pairdb cert` makes them) authenticates its holder the same way.
//!
//! Checks happen in [`guard`], an HTTP middleware in front of the protected gRPC services, on the
//! request's headers only: an unauthenticated request is refused with UNAUTHENTICATED before its body
//! is read or decoded. Handlers find the verified [`Caller`] in the request's extensions and apply
//! their role rules (a node registers only as itself; only routers get API-key hashes).
//!
//! `--insecure-cluster` turns all of this off (every caller is [`Caller::Unverified`]); it is
//! explicit and logged as a warning at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use pairdb_core::ring::NodeId;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// The gRPC metadata header carrying a cluster credential.
pub const CREDENTIAL_HEADER: &str = "x-pairdb-cluster-credential";
const CREDENTIAL_PREFIX: &str = "pdbc1";
const SIGNATURE_DOMAIN: &[u8] = b"pairdb/cluster-credential/v1\0";
const SEED_DOMAIN: &[u8] = b"pairdb/cluster-signing-seed/v1";
/// Shortest cluster secret accepted (`pairdb cluster init` writes 43 characters: 32 random bytes).
pub const MIN_SECRET_CHARS: usize = 32;
/// Verified credentials remembered, so a caller's signature is checked once, not on every RPC.
const VERIFIED_CACHE_ENTRIES: usize = 1024;

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Meta,
    Router,
    Node(NodeId),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Meta => f.write_str("meta"),
            Principal::Router => f.write_str("router"),
            Principal::Node(id) => write!(f, "node-{id}"),
        }
    }
}

impl std::str::FromStr for Principal {
    type Err = CredentialError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "meta" => Ok(Principal::Meta),
            "router" => Ok(Principal::Router),
            _ => text
                .strip_prefix("node-")
                .filter(|id| !id.starts_with('0') && id.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|id| id.parse::<u32>().ok())
                .map(|id| Principal::Node(NodeId(id)))
                .ok_or_else(|| CredentialError::UnknownPrincipal(text.to_owned())),
        }
    }
}

/// A credential or secret that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("not a cluster credential (expected pdbc1.<principal>.<key>.<signature>)")]
    Malformed,
    #[error("unknown principal {0:?} (expected meta, router or node-<id>)")]
    UnknownPrincipal(String),
    #[error("the credential was issued by another cluster")]
    OtherCluster,
    #[error("the credential's signature is invalid")]
    BadSignature,
    #[error("the cluster secret must be at least {MIN_SECRET_CHARS} characters")]
    WeakSecret,
}

/// A parsed (not yet verified) cluster credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    text: String,
    principal: Principal,
    cluster_key: [u8; 32],
    signature: [u8; 64],
}

impl std::fmt::Debug for Credential {
    /// The credential authenticates its holder: only its principal is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("principal", &self.principal).finish_non_exhaustive()
    }
}

fn signed_message(principal: Principal, cluster_key: &[u8; 32]) -> Vec<u8> {
    let principal = principal.to_string();
    let mut message = Vec::with_capacity(SIGNATURE_DOMAIN.len() + principal.len() + 32);
    message.extend_from_slice(SIGNATURE_DOMAIN);
    message.extend_from_slice(principal.as_bytes());
    message.extend_from_slice(cluster_key);
    message
}

impl Credential {
    /// Parses the text form (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        let text = text.trim();
        let mut parts = text.split('.');
        let (Some(CREDENTIAL_PREFIX), Some(principal), Some(key), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::Malformed);
        };
        let principal: Principal = principal.parse()?;
        let cluster_key = decode_fixed::<32>(key)?;
        let signature = decode_fixed::<64>(signature)?;
        Ok(Self { text: text.to_owned(), principal, cluster_key, signature })
    }

    /// Reads and parses a credential file.
    pub fn read(path: &Path) -> Result<Self, AuthConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthConfigError::Read { path: path.to_owned(), source })?;
        Credential::parse(&text).map_err(|error| AuthConfigError::Credential { path: path.to_owned(), error })
    }

    pub fn principal(&self) -> Principal {
        self.principal
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the signature is the cluster key's over this credential's principal.
    fn signature_holds(&self) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.cluster_key)
            .verify(&signed_message(self.principal, &self.cluster_key), &self.signature)
            .is_ok()
    }
}

fn decode_fixed<const N: usize>(text: &str) -> Result<[u8; N], CredentialError> {
    let bytes = B64.decode(text).map_err(|_| CredentialError::Malformed)?;
    bytes.try_into().map_err(|_| CredentialError::Malformed)
}

/// The cluster's signing key (meta, and `pairdb cluster` tools holding the secret).
#[derive(Debug)]
pub struct Signer {
    key: Ed25519KeyPair,
}

impl Signer {
    /// The signing key derived from the cluster secret's text.
    pub fn from_secret(secret: &str) -> Result<Self, CredentialError> {
        let secret = secret.trim();
        if secret.chars().count() < MIN_SECRET_CHARS {
            return Err(CredentialError::WeakSecret);
        }
        let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let seed = ring::hmac::sign(&mac, SEED_DOMAIN);
        let key =
            Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).map_err(|_| CredentialError::WeakSecret)?;
        Ok(Self { key })
    }

    /// Reads a cluster secret file.
    pub fn read(path: &Path) -> Result<Self, AuthConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthConfigError::Read { path: path.to_owned(), source })?;
        Signer::from_secret(&text)
            .map_err(|error| AuthConfigError::Credential { path: path.to_owned(), error })
    }

    /// A fresh cluster secret: 32 random bytes, base64url.
    pub fn generate_secret() -> String {
        B64.encode(rand::random::<[u8; 32]>())
    }

    fn cluster_key(&self) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.key.public_key().as_ref());
        key
    }

    /// The credential of `principal`.
    pub fn issue(&self, principal: Principal) -> Credential {
        let cluster_key = self.cluster_key();
        let signature = self.key.sign(&signed_message(principal, &cluster_key));
        let mut signature_bytes = [0u8; 64];
        signature_bytes.copy_from_slice(signature.as_ref());
        let text =
            format!("{CREDENTIAL_PREFIX}.{principal}.{}.{}", B64.encode(cluster_key), B64.encode(signature));
        Credential { text, principal, cluster_key, signature: signature_bytes }
    }
}

/// Checks callers' credentials against the cluster key, remembering the ones that passed.
#[derive(Debug)]
pub struct Verifier {
    cluster_key: [u8; 32],
    verified: RwLock<HashMap<String, Principal>>,
}

impl Verifier {
    fn new(cluster_key: [u8; 32]) -> Self {
        Self { cluster_key, verified: RwLock::new(HashMap::new()) }
    }

    /// The principal a presented credential names, if the cluster key signed it.
    pub fn verify(&self, presented: &str) -> Result<Principal, CredentialError> {
        if let Some(principal) = self.verified.read().unwrap_or_else(PoisonError::into_inner).get(presented) {
            return Ok(*principal);
        }
        let credential = Credential::parse(presented)?;
        if credential.cluster_key != self.cluster_key {
            return Err(CredentialError::OtherCluster);
        }
        if !credential.signature_holds() {
            return Err(CredentialError::BadSignature);
        }
        let mut verified = self.verified.write().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= VERIFIED_CACHE_ENTRIES {
            verified.clear();
        }
        verified.insert(presented.to_owned(), credential.principal);
        Ok(credential.principal)
    }
}

/// The verified identity of a request, in its extensions once [`guard`] let it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Verified(Principal),
    /// `--insecure-cluster`: nobody is verified and role checks pass.
    Unverified,
}

impl Caller {
    /// Whether the caller may act as `principal` (always, when the cluster runs insecure).
    pub fn is(&self, principal: Principal) -> bool {
        match self {
            Caller::Verified(verified) => *verified == principal,
            Caller::Unverified => true,
        }
    }

    /// The caller a handler sees; a request that reached it without passing [`guard`] is treated as
    /// verified-as-nobody (a wiring mistake must not grant roles).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Caller> {
        request.extensions().get::<Caller>().copied()
    }
}

/// Errors of the authentication configuration (start-up).
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "cluster_credential: a cluster credential is required (--cluster-credential-file or \
         PAIRDB_CLUSTER_CREDENTIAL[_FILE]; `pairdb cluster init` or `pairdb node add` print one); pass \
         --insecure-cluster to run without cluster authentication"
    )]
    Missing,
    #[error("cluster_credential: set either cluster_credential or cluster_credential_file, not both")]
    Twice,
    #[error("insecure_cluster: cannot be combined with a cluster credential")]
    InsecureWithCredential,
    #[error("cluster_credential: names {found}, but this process is {expected}")]
    WrongPrincipal { found: Principal, expected: String },
    #[error("cluster_credential: {0}")]
    Invalid(CredentialError),
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {error}")]
    Credential { path: PathBuf, error: CredentialError },
    /// A file flag's problem, prefixed with the flag (`error`, not `source`: it is in the message).
    #[error("{field}: {error}")]
    File { field: &'static str, error: Box<AuthConfigError> },
}

/// The cluster-authentication flags of routers and storage nodes.
#[derive(Clone, Default, clap::Args)]
pub struct ClusterAuthArgs {
    /// This process's cluster credential (pdbc1.…), presented on every internal call and used to
    /// verify callers. Prefer --cluster-credential-file.
    #[arg(long, env = "PAIRDB_CLUSTER_CREDENTIAL", hide_env_values = true, allow_hyphen_values = true)]
    pub cluster_credential: Option<String>,
    /// File holding this process's cluster credential.
    #[arg(long, env = "PAIRDB_CLUSTER_CREDENTIAL_FILE")]
    pub cluster_credential_file: Option<PathBuf>,
    /// Run without cluster authentication: anyone who reaches the internal ports can read and write
    /// every tenant's data. For isolated test networks only; logged as a warning.
    #[arg(long, env = "PAIRDB_INSECURE_CLUSTER")]
    pub insecure_cluster: bool,
}

impl std::fmt::Debug for ClusterAuthArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAuthArgs")
            .field("cluster_credential", &self.cluster_credential.as_ref().map(|_| "<redacted>"))
            .field("cluster_credential_file", &self.cluster_credential_file)
            .field("insecure_cluster", &self.insecure_cluster)
            .finish()
    }
}

impl ClusterAuthArgs {
    /// The authentication of a process that must be `expected` (a storage node's id, or the router).
    /// With mutual TLS on (`certificates`), a process may go without a credential: client
    /// certificates then carry identities.
    pub fn load(
        &self,
        expected: impl Fn(Principal) -> bool,
        expected_name: &str,
        certificates: bool,
    ) -> Result<ClusterAuth, AuthConfigError> {
        let credential = match (&self.cluster_credential, &self.cluster_credential_file) {
            (Some(_), Some(_)) => return Err(AuthConfigError::Twice),
            (Some(text), None) => Some(Credential::parse(text).map_err(AuthConfigError::Invalid)?),
            (None, Some(path)) => Some(Credential::read(path).map_err(|error| AuthConfigError::File {
                field: "cluster_credential_file",
                error: Box::new(error),
            })?),
            (None, None) => None,
        };
        match (credential, self.insecure_cluster) {
            (Some(_), true) => Err(AuthConfigError::InsecureWithCredential),
            (None, true) => Ok(ClusterAuth::insecure()),
            (None, false) if certificates => Ok(ClusterAuth::certificates_only()),
            (None, false) => Err(AuthConfigError::Missing),
            (Some(credential), false) => {
                if !expected(credential.principal) {
                    return Err(AuthConfigError::WrongPrincipal {
                        found: credential.principal,
                        expected: expected_name.to_owned(),
                    });
                }
                if !credential.signature_holds() {
                    return Err(AuthConfigError::Invalid(CredentialError::BadSignature));
                }
                Ok(ClusterAuth::with_credential(credential, certificates))
            }
        }
    }
}

/// A process's cluster authentication: what it presents and how it checks callers.
#[derive(Debug)]
pub struct ClusterAuth {
    /// `None`: insecure (nothing presented, nothing checked).
    enforced: Option<Enforced>,
}

#[derive(Debug)]
struct Enforced {
    header: Option<tonic::metadata::AsciiMetadataValue>,
    own: Option<Principal>,
    verifier: Option<Verifier>,
    certificates: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no cluster credential (header {CREDENTIAL_HEADER} or a client certificate naming a principal)")]
    Missing,
    #[error("invalid cluster credential: {0}")]
    Invalid(CredentialError),
}

impl ClusterAuth {
    /// `--insecure-cluster`.
    pub fn insecure() -> Self {
        Self { enforced: None }
    }

    /// Presents `credential` and verifies callers against its cluster key; with `certificates`, also
    /// accepts client certificates naming a principal.
    pub fn with_credential(credential: Credential, certificates: bool) -> Self {
        let header = tonic::metadata::AsciiMetadataValue::try_from(credential.as_str()).ok();
        Self {
            enforced: Some(Enforced {
                header,
                own: Some(credential.principal),
                verifier: Some(Verifier::new(credential.cluster_key)),
                certificates,
            }),
        }
    }

    /// Mutual TLS only: identities come from client certificates.
    pub fn certificates_only() -> Self {
        Self { enforced: Some(Enforced { header: None, own: None, verifier: None, certificates: true }) }
    }

    /// Meta: presents `meta`'s credential and verifies with the signer's key.
    pub fn for_meta(signer: &Signer, certificates: bool) -> Self {
        Self::with_credential(signer.issue(Principal::Meta), certificates)
    }

    pub fn is_insecure(&self) -> bool {
        self.enforced.is_none()
    }

    /// The principal this process presents, if it has a credential.
    pub fn principal(&self) -> Option<Principal> {
        self.enforced.as_ref().and_then(|e| e.own)
    }

    /// The header value presented on outgoing calls (`None`: insecure or certificates only).
    pub fn outgoing(&self) -> Option<&tonic::metadata::AsciiMetadataValue> {
        self.enforced.as_ref().and_then(|e| e.header.as_ref())
    }

    /// The caller of a request, from its headers and TLS connection, or why it is refused.
    pub fn authenticate(&self, request: &http::Request<axum::body::Body>) -> Result<Caller, AuthFailure> {
        let Some(enforced) = &self.enforced else { return Ok(Caller::Unverified) };
        if let Some(presented) = request.headers().get(CREDENTIAL_HEADER) {
            let verifier =
                enforced.verifier.as_ref().ok_or(AuthFailure::Invalid(CredentialError::OtherCluster))?;
            let presented =
                presented.to_str().map_err(|_| AuthFailure::Invalid(CredentialError::Malformed))?;
            return verifier.verify(presented).map(Caller::Verified).map_err(AuthFailure::Invalid);
        }
        if enforced.certificates
            && let Some(principal) = crate::tls::peer_principal(request.extensions())
        {
            return Ok(Caller::Verified(principal));
        }
        Err(AuthFailure::Missing)
    }

    /// Logs at start what this process enforces.
    pub fn log_mode(&self, service: &str) {
        match &self.enforced {
            None => tracing::warn!(
                service,
                "cluster authentication is DISABLED (--insecure-cluster): anyone who can reach this port \
                 can call the internal API"
            ),
            Some(enforced) => tracing::info!(
                service,
                principal = enforced.own.map(|p| p.to_string()).unwrap_or_else(|| "certificate".into()),
                certificates = enforced.certificates,
                "cluster authentication on"
            ),
        }
    }
}

/// What [`guard`] protects: the gRPC services (path prefixes) whose every call needs a credential.
#[derive(Debug, Clone)]
pub struct Guarded {
    pub auth: Arc<ClusterAuth>,
    pub services: &'static [&'static str],
    /// The metric label of refusals.
    pub label: &'static str,
}

/// Middleware: requests to a guarded service must authenticate, before their body is read. The
/// verified [`Caller`] is put in the request's extensions.
pub async fn guard(State(guarded): State<Guarded>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if !guarded.services.iter().any(|prefix| path.starts_with(prefix)) {
        return next.run(request).await;
    }
    match guarded.auth.authenticate(&request) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(failure) => {
            metrics::counter!("pairdb_cluster_auth_refused_total", "api" => guarded.label).increment(1);
            tracing::debug!(path, %failure, "internal call refused");
            crate::errors::status(crate::errors::Reason::Unauthenticated, failure.to_string(), &[])
                .into_http::<axum::body::Body>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    #[test]
    fn a_credential_may_start_with_a_hyphen() {
        // Secrets are URL-safe base64: one in 64 starts with '-', which must not read as a flag.
        #[derive(clap::Parser)]
        struct Demo {
            #[command(flatten)]
            auth: ClusterAuthArgs,
        }
        let demo =
            <Demo as clap::Parser>::try_parse_from(["demo", "--cluster-credential", "-x.y"]).expect("parses");
        assert_eq!(demo.auth.cluster_credential.as_deref(), Some("-x.y"));
    }

    #[test]
    fn principals_round_trip_and_reject_lookalikes() {
        for principal in [
            Principal::Meta,
            Principal::Router,
            Principal::Node(NodeId(1)),
            Principal::Node(NodeId(u32::MAX)),
        ] {
            assert_eq!(principal.to_string().parse::<Principal>().unwrap(), principal);
        }
        for bad in ["node-", "node-0", "node-03", "node-x", "node-99999999999", "admin", "Router", ""] {
            assert!(bad.parse::<Principal>().is_err(), "{bad}");
        }
    }

    #[test]
    fn issued_credentials_verify_and_name_their_principal() {
        let signer = Signer::from_secret(SECRET).unwrap();
        let node = signer.issue(Principal::Node(NodeId(2)));
        let verifier = Verifier::new(node.cluster_key);
        assert_eq!(verifier.verify(node.as_str()), Ok(Principal::Node(NodeId(2))));
        // Twice: the second answer comes from the cache.
        assert_eq!(verifier.verify(signer.issue(Principal::Router).as_str()), Ok(Principal::Router));
        assert_eq!(verifier.verify(signer.issue(Principal::Router).as_str()), Ok(Principal::Router));
        // Deterministic: the same secret issues the same credential.
        assert_eq!(Signer::from_secret(SECRET).unwrap().issue(Principal::Node(NodeId(2))), node);
    }

    #[test]
    fn forged_and_foreign_credentials_are_refused() {
        let signer = Signer::from_secret(SECRET).unwrap();
        let verifier = Verifier::new(signer.issue(Principal::Meta).cluster_key);
        let node2 = signer.issue(Principal::Node(NodeId(2)));
        // Renaming the principal breaks the signature.
        let renamed = node2.as_str().replacen("node-2", "node-3", 1);
        assert_eq!(verifier.verify(&renamed), Err(CredentialError::BadSignature));
        // Another cluster's credential (its own key and a valid signature) is not ours.
        let other = Signer::from_secret("another-cluster-secret-of-enough-length").unwrap();
        assert_eq!(
            verifier.verify(other.issue(Principal::Node(NodeId(3))).as_str()),
            Err(CredentialError::OtherCluster)
        );
        // Another cluster's signature over our key.
        let mut parts: Vec<&str> = node2.as_str().split('.').collect();
        let foreign = other.issue(Principal::Node(NodeId(2)));
        let foreign_signature = foreign.as_str().rsplit('.').next().unwrap().to_owned();
        parts[3] = &foreign_signature;
        assert_eq!(verifier.verify(&parts.join(".")), Err(CredentialError::BadSignature));
        for junk in ["", "pdbc1", "pdbc1.router.x.y", "Bearer abc", "pdbc2.router.AAAA.AAAA"] {
            assert!(verifier.verify(junk).is_err(), "{junk}");
        }
        assert_eq!(Signer::from_secret("short").err(), Some(CredentialError::WeakSecret));
    }

    #[test]
    fn a_process_refuses_a_credential_for_another_role() {
        let signer = Signer::from_secret(SECRET).unwrap();
        let args = ClusterAuthArgs {
            cluster_credential: Some(signer.issue(Principal::Router).as_str().to_owned()),
            ..ClusterAuthArgs::default()
        };
        let error = args.load(|p| p == Principal::Node(NodeId(3)), "node-3", false).unwrap_err();
        assert!(error.to_string().starts_with("cluster_credential: names router"), "{error}");
        assert!(args.load(|p| p == Principal::Router, "router", false).is_ok());
        let none = ClusterAuthArgs::default();
        assert!(matches!(none.load(|_| true, "router", false), Err(AuthConfigError::Missing)));
        assert!(none.load(|_| true, "router", true).is_ok());
        let insecure = ClusterAuthArgs { insecure_cluster: true, ..ClusterAuthArgs::default() };
        assert!(insecure.load(|_| true, "router", false).unwrap().is_insecure());
        assert!(!format!("{args:?}").contains("pdbc1"));
    }

    fn request(header: Option<&str>) -> http::Request<axum::body::Body> {
        let mut builder = http::Request::builder().uri("/pairdb.storage.v1.StorageService/Get");
        if let Some(value) = header {
            builder = builder.header(CREDENTIAL_HEADER, value);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn authenticate_needs_a_valid_credential_unless_insecure() {
        let signer = Signer::from_secret(SECRET).unwrap();
        let auth = ClusterAuth::with_credential(signer.issue(Principal::Node(NodeId(1))), false);
        let router = signer.issue(Principal::Router);
        assert_eq!(
            auth.authenticate(&request(Some(router.as_str()))),
            Ok(Caller::Verified(Principal::Router))
        );
        assert_eq!(auth.authenticate(&request(None)), Err(AuthFailure::Missing));
        assert!(matches!(
            auth.authenticate(&request(Some("pdbc1.router.a.b"))),
            Err(AuthFailure::Invalid(_))
        ));
        assert_eq!(ClusterAuth::insecure().authenticate(&request(None)), Ok(Caller::Unverified));
        assert!(Caller::Unverified.is(Principal::Node(NodeId(9))));
        assert!(!Caller::Verified(Principal::Node(NodeId(2))).is(Principal::Node(NodeId(3))));
    }
}
