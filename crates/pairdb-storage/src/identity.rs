//! The data directory's identity file, `IDENTITY`: which node owns the directory, the actor id of this
//! incarnation, and the on-disk format version.
//!
//! Invariant: the actor id is created together with the directory and never changes; a wiped directory
//! gets a new one, so operators (and `Stats`) can tell incarnations apart. Dots are not minted under
//! it: each record has its own minting actor (`engine::mutate`), which is what keeps a wiped or purged
//! key from repeating a counter (Riak's "key amnesia", KV679). A node refuses to start on a directory
//! of another node id or an unknown format version.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use pairdb_core::dvv::Actor;
use pairdb_core::ring::NodeId;

/// Version of everything under the data directory (key layout, value encoding, hint layout).
pub const DATA_FORMAT_VERSION: u32 = 1;
const FILE_NAME: &str = "IDENTITY";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub node_id: NodeId,
    pub actor: Actor,
    pub format_version: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "data directory {dir} belongs to node {found}, not node {expected}; point --data-dir at this node's own directory"
    )]
    WrongNode { dir: PathBuf, found: NodeId, expected: NodeId },
    #[error(
        "data directory {dir} has data format version {found}; this build supports version {DATA_FORMAT_VERSION}"
    )]
    UnknownFormat { dir: PathBuf, found: u32 },
    #[error("data directory {dir} is not empty but has no IDENTITY file; refusing to adopt it")]
    ForeignDirectory { dir: PathBuf },
    #[error("identity file {path} is malformed: {problem}")]
    Malformed { path: PathBuf, problem: String },
    #[error("cannot access data directory {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
}

fn io_error(dir: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { dir: dir.to_path_buf(), source }
}

/// Loads the identity of `dir`, creating the directory and a fresh identity (new random actor) when
/// the directory is new or empty.
pub fn load_or_create(dir: &Path, node_id: NodeId) -> Result<(Identity, bool), IdentityError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let path = dir.join(FILE_NAME);
    if path.exists() {
        let identity = read(&path)?;
        if identity.format_version != DATA_FORMAT_VERSION {
            return Err(IdentityError::UnknownFormat {
                dir: dir.to_path_buf(),
                found: identity.format_version,
            });
        }
        if identity.node_id != node_id {
            return Err(IdentityError::WrongNode {
                dir: dir.to_path_buf(),
                found: identity.node_id,
                expected: node_id,
            });
        }
        return Ok((identity, false));
    }
    let has_entries = fs::read_dir(dir).map_err(io_error(dir))?.next().is_some();
    if has_entries {
        return Err(IdentityError::ForeignDirectory { dir: dir.to_path_buf() });
    }
    let identity =
        Identity { node_id, actor: Actor(rand::random::<u64>()), format_version: DATA_FORMAT_VERSION };
    write(dir, &identity)?;
    Ok((identity, true))
}

fn read(path: &Path) -> Result<Identity, IdentityError> {
    let malformed =
        |problem: &str| IdentityError::Malformed { path: path.to_path_buf(), problem: problem.to_owned() };
    let text =
        fs::read_to_string(path).map_err(|source| IdentityError::Io { dir: path.to_path_buf(), source })?;
    let (mut node_id, mut actor, mut format_version) = (None, None, None);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = line.split_once('=').ok_or_else(|| malformed("line without '='"))?;
        match name.trim() {
            "node_id" => node_id = value.trim().parse::<u32>().ok().map(NodeId),
            "actor_id" => actor = u64::from_str_radix(value.trim(), 16).ok().map(Actor),
            "format_version" => format_version = value.trim().parse::<u32>().ok(),
            _ => return Err(malformed("unknown field")),
        }
    }
    Ok(Identity {
        node_id: node_id.ok_or_else(|| malformed("node_id missing or not a number"))?,
        actor: actor.ok_or_else(|| malformed("actor_id missing or not hex"))?,
        format_version: format_version.ok_or_else(|| malformed("format_version missing or not a number"))?,
    })
}

/// Writes the identity atomically (temp file, fsync, rename, fsync the directory).
pub fn write(dir: &Path, identity: &Identity) -> Result<(), IdentityError> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let body = format!(
        "# PairDB storage node identity. Do not edit or copy to another node.\nformat_version={}\nnode_id={}\nactor_id={:016x}\n",
        identity.format_version, identity.node_id, identity.actor.0
    );
    let mut file = fs::File::create(&tmp).map_err(io_error(dir))?;
    file.write_all(body.as_bytes()).map_err(io_error(dir))?;
    file.sync_all().map_err(io_error(dir))?;
    fs::rename(&tmp, dir.join(FILE_NAME)).map_err(io_error(dir))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_directory_gets_an_identity_that_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = load_or_create(dir.path(), NodeId(3)).unwrap();
        assert!(created);
        let (again, created) = load_or_create(dir.path(), NodeId(3)).unwrap();
        assert!(!created);
        assert_eq!(first, again);
    }

    #[test]
    fn wrong_node_and_unknown_format_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = load_or_create(dir.path(), NodeId(3)).unwrap();
        let err = load_or_create(dir.path(), NodeId(4)).unwrap_err();
        assert!(err.to_string().contains("belongs to node 3, not node 4"), "{err}");
        write(dir.path(), &Identity { format_version: 99, ..identity }).unwrap();
        let err = load_or_create(dir.path(), NodeId(3)).unwrap_err();
        assert!(err.to_string().contains("format version 99"), "{err}");
    }

    #[test]
    fn wiped_directory_gets_a_new_actor() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = load_or_create(dir.path(), NodeId(1)).unwrap();
        fs::remove_dir_all(dir.path()).unwrap();
        let (second, created) = load_or_create(dir.path(), NodeId(1)).unwrap();
        assert!(created);
        assert_ne!(first.actor, second.actor);
    }
}
