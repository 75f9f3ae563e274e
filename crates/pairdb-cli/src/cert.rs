//! `pairdb cert`: the certificates of a mutual-TLS cluster, in the spirit of `cockroach cert`. One
//! CA signs every certificate; a service certificate's subject common name is its principal
//! (`meta`, `router`, `node-<id>`), which is how a mutual-TLS peer is identified (so such a cluster
//! needs no credential files), and its subject alternative names are the hosts it serves on.
//! Client certificates (`client-<name>`) let tools reach services that demand one (meta, storage)
//! but name no principal, so they cannot act as a cluster member.
//!
//! Files, in `--certs-dir`: `ca.crt`, `ca.key`, and `<name>.crt` / `<name>.key` per certificate;
//! keys are written readable by their owner only, and nothing is ever overwritten.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::cli::{CertCommand, Globals};
use crate::cluster::write_secret;
use crate::output::{self, Output};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";

pub fn run(globals: &Globals, command: CertCommand) -> anyhow::Result<()> {
    let (dir, written) = match command {
        CertCommand::Ca { certs_dir } => {
            create_ca(&certs_dir)?;
            (certs_dir, vec![CA_CERT.to_owned(), CA_KEY.to_owned()])
        }
        CertCommand::Node { node_id, hosts, certs_dir } => {
            let name = format!("node-{node_id}");
            create_leaf(&certs_dir, &name, &hosts)?;
            (certs_dir, files(&name))
        }
        CertCommand::Router { hosts, certs_dir } => {
            create_leaf(&certs_dir, "router", &hosts)?;
            (certs_dir, files("router"))
        }
        CertCommand::Meta { hosts, certs_dir } => {
            create_leaf(&certs_dir, "meta", &hosts)?;
            (certs_dir, files("meta"))
        }
        CertCommand::Client { name, certs_dir } => {
            let name = format!("client-{name}");
            create_leaf(&certs_dir, &name, &[])?;
            (certs_dir, files(&name))
        }
    };
    let paths: Vec<String> = written.iter().map(|file| dir.join(file).display().to_string()).collect();
    match globals.output {
        Output::Json => output::print_json(&json!({ "files": paths })),
        Output::Table => paths.iter().for_each(|path| println!("{path}")),
    }
    Ok(())
}

fn files(name: &str) -> Vec<String> {
    vec![format!("{name}.crt"), format!("{name}.key")]
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    if path.exists() {
        anyhow::bail!("{} exists; refusing to overwrite it", path.display());
    }
    std::fs::write(path, text).map_err(|error| anyhow::anyhow!("cannot write {}: {error}", path.display()))
}

fn create_ca(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, "pairdb cluster CA");
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let certificate = params.self_signed(&key)?;
    write_secret(&dir.join(CA_KEY), key.serialize_pem().trim_end())?;
    write_public(&dir.join(CA_CERT), &certificate.pem())
}

/// A certificate named `name` (its common name) for `hosts`, signed by the CA in `dir`.
fn create_leaf(dir: &Path, name: &str, hosts: &[String]) -> anyhow::Result<()> {
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file)).map_err(|error| {
            anyhow::anyhow!(
                "cannot read {}: {error} (run `pairdb cert create-ca` first)",
                dir.join(file).display()
            )
        })
    };
    let ca_key = KeyPair::from_pem(&read(CA_KEY)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(CA_CERT)?, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.not_after = rcgen::date_time_ymd(2031, 1, 1);
    let certificate = params.signed_by(&key, &issuer)?;
    write_secret(&dir.join(format!("{name}.key")), key.serialize_pem().trim_end())?;
    write_public(&dir.join(format!("{name}.crt")), &certificate.pem())
}
