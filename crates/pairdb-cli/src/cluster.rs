//! `pairdb cluster`: the cluster's secrets. `init` makes a cluster secret and the credentials of a
//! router and N storage nodes (offline, for deployment files); `credential` prints one principal's
//! credential (from the secret file, or from meta's admin API); `rotate-context-key` replaces the key
//! routers seal client contexts with.

use std::path::{Path, PathBuf};

use pairdb_client::proto::admin::v1 as pb;
use pairdb_core::ring::NodeId;
use pairdb_service::cluster_auth::{Principal, Signer};
use serde_json::json;

use crate::cli::{ClusterCommand, Globals};
use crate::output::{self, Output};

pub async fn run(globals: &Globals, command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Init { out, storage_nodes } => init(globals, &out, storage_nodes),
        ClusterCommand::Credential { principal, cluster_secret_file } => {
            let principal: Principal = principal.parse()?;
            let credential = match cluster_secret_file {
                Some(path) => Signer::read(&path)?.issue(principal).as_str().to_owned(),
                None => {
                    let admin = globals.admin().await?;
                    let request = pb::IssueClusterCredentialRequest { principal: principal.to_string() };
                    admin.issue_cluster_credential(request).await?.cluster_credential
                }
            };
            match globals.output {
                Output::Json => output::print_json(
                    &json!({"principal": principal.to_string(), "cluster_credential": credential}),
                ),
                Output::Table => println!("{credential}"),
            }
            Ok(())
        }
        ClusterCommand::RotateContextKey => {
            let admin = globals.admin().await?;
            let status = admin.rotate_context_key(pb::RotateContextKeyRequest {}).await?;
            let value = json!({
                "current_key_id": status.current_key_id,
                "previous_key_id": status.previous_key_id,
                "rotated_at_ms": status.rotated_at_ms,
            });
            match globals.output {
                Output::Json => output::print_json(&value),
                Output::Table => println!(
                    "context key {} is current; contexts sealed with key {} keep working until the next rotation",
                    status.current_key_id, status.previous_key_id
                ),
            }
            Ok(())
        }
    }
}

/// Writes `text` to `path`, readable by its owner only.
pub fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file =
        options.open(path).map_err(|error| anyhow::anyhow!("cannot create {}: {error}", path.display()))?;
    file.write_all(format!("{text}\n").as_bytes())?;
    file.sync_all()?;
    Ok(())
}

fn init(globals: &Globals, out: &Path, storage_nodes: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .map_err(|error| anyhow::anyhow!("cannot create {}: {error}", out.display()))?;
    let secret = Signer::generate_secret();
    let signer = Signer::from_secret(&secret)?;
    let secret_path = out.join("cluster-secret");
    write_secret(&secret_path, &secret)?;
    let mut files: Vec<(String, PathBuf)> = vec![("cluster secret (meta only)".into(), secret_path)];
    let principals = std::iter::once(Principal::Router)
        .chain((1..=storage_nodes).map(|id| Principal::Node(NodeId(id))))
        .collect::<Vec<_>>();
    for principal in principals {
        let path = out.join(format!("{principal}.credential"));
        write_secret(&path, signer.issue(principal).as_str())?;
        files.push((principal.to_string(), path));
    }
    match globals.output {
        Output::Json => output::print_json(&json!({
            "files": files.iter().map(|(what, path)| json!({"for": what, "path": path.display().to_string()})).collect::<Vec<_>>(),
        })),
        Output::Table => {
            for (what, path) in &files {
                println!("{}\t{what}", path.display());
            }
            println!(
                "give meta --cluster-secret-file, routers --cluster-credential-file router.credential and storage node i \
                 --cluster-credential-file node-i.credential; more: `pairdb cluster credential node-<id> --cluster-secret-file ...`"
            );
        }
    }
    Ok(())
}
