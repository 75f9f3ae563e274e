//! The deployment files (`docker/`, `deploy/compose/`, `deploy/k8s/`) checked against the binaries
//! they start. Every Dockerfile target, compose service and Kubernetes container that runs a PairDB
//! service is turned into the command line and environment its process would get — image `ENV` and
//! `ENTRYPOINT`, compose `command` / `environment` / secrets, Kubernetes ConfigMaps, Secrets, downward
//! API fields and `sh -c` wrappers — and run through the real binary's `--check-config` (with the
//! environment cleared, so only what the file sets counts). The port the binary reports it listens on
//! must then be the one every `EXPOSE`, `HEALTHCHECK`, published port, container port, probe, Service
//! `targetPort`, scrape annotation and `host:port` reference in the files uses.
//!
//! clap ignores unknown environment variables, so `PAIRDB_*` names are also checked against the
//! `env = "PAIRDB_..."` attributes in each binary's config source. `OTEL_*` and `RUST_LOG` are read by
//! the tracing setup, not by clap, and are allowed without being passed to the parser.
//!
//! Beyond flags and ports: nginx gives gRPC and HTTP separate upstreams over all routers; image
//! healthchecks follow `PAIRDB_LISTEN_ADDR` and `pairdb health` exports no trace; the release profile
//! strips debuginfo; the compose monitoring profile scrapes exactly the PairDB services; every pod
//! runs with the RuntimeDefault seccomp profile, storage pods go one per node and spread over zones,
//! and the ServiceMonitor scrapes every Service. What linters and schema validators check (hadolint,
//! compose-spec, kubernetes-validate, promtool, the dashboards) is deploy/check.sh's job.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use yaml_rust2::{Yaml, YamlLoader};

type Env = BTreeMap<String, String>;

/// The service binaries and the Dockerfile target / crate each comes from.
const SERVICES: &[(&str, &str)] =
    &[("pairdb-meta", "meta"), ("pairdb-storage", "storage"), ("pairdb-router", "router")];
/// The CLI: in every image as the healthcheck, and the `cli` target.
const CLI: &str = "pairdb";
const NAMESPACE_SAMPLE: &str = "pairdb";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

// ---- what the sources say ----------------------------------------------------------------------------

/// Facts read from the workspace at test time, plus the built binaries.
struct Workspace {
    root: PathBuf,
    bin_dir: PathBuf,
    /// `pairdb-router -> pairdb-router` wrappers that add `--check-config`, for `sh -c` launches.
    shims: tempfile::TempDir,
    /// Scratch files standing in for mounted secrets.
    scratch: tempfile::TempDir,
    /// A cluster secret and credentials made by the real `pairdb cluster init`, standing in for the
    /// files deployments must generate (they are never in git).
    cluster: tempfile::TempDir,
    /// `env = "..."` names per binary (services include the flattened TLS arguments).
    env_names: BTreeMap<String, BTreeSet<String>>,
    default_ports: BTreeMap<String, u16>,
    stages: BTreeMap<String, Stage>,
}

fn env_attributes(source: &str) -> impl Iterator<Item = String> + '_ {
    source.match_indices("env = \"").filter_map(|(at, marker)| {
        let rest = &source[at + marker.len()..];
        rest.find('"').map(|end| rest[..end].to_owned())
    })
}

impl Workspace {
    fn load() -> Result<Workspace> {
        let root = repo_root();
        let bin_dir = pairdb_tests::binaries_dir()?;
        // Flags every service flattens in from pairdb-service.
        let shared: String = ["args.rs", "tls.rs", "cluster_auth.rs", "listener.rs"]
            .iter()
            .map(|file| read(&root.join("crates/pairdb-service/src").join(file)))
            .collect::<Result<Vec<_>>>()?
            .join("\n");
        let mut env_names = BTreeMap::new();
        let mut default_ports = BTreeMap::new();
        for (binary, _) in SERVICES {
            let config = read(&root.join(format!("crates/{binary}/src/config.rs")))?;
            let names: BTreeSet<String> = env_attributes(&config).chain(env_attributes(&shared)).collect();
            ensure!(names.contains("PAIRDB_LISTEN_ADDR"), "{binary}: no PAIRDB_LISTEN_ADDR in its config");
            env_names.insert((*binary).to_owned(), names);
            let line = config
                .lines()
                .find(|line| line.contains("env = \"PAIRDB_LISTEN_ADDR\""))
                .context("listen_addr attribute")?;
            let default = line.split("default_value = \"").nth(1).and_then(|rest| rest.split('"').next());
            let addr: SocketAddr = default.context("listen_addr default")?.parse()?;
            default_ports.insert((*binary).to_owned(), addr.port());
        }
        let mut cli_names = BTreeSet::new();
        let mut dirs = vec![root.join("crates/pairdb-cli/src")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|ext| ext == "rs") {
                    cli_names.extend(env_attributes(&read(&path)?));
                }
            }
        }
        ensure!(cli_names.contains("PAIRDB_META"), "the CLI's env attributes were not found");
        env_names.insert(CLI.to_owned(), cli_names);

        let shims = tempfile::tempdir()?;
        for (binary, _) in SERVICES {
            let shim = shims.path().join(binary);
            let real = bin_dir.join(binary);
            std::fs::write(&shim, format!("#!/bin/sh\nexec '{}' \"$@\" --check-config\n", real.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755))?;
        }
        let stages = parse_dockerfile(&read(&root.join("docker/Dockerfile"))?)?
            .into_iter()
            .map(|stage| (stage.name.clone(), stage))
            .collect();
        let cluster = tempfile::tempdir()?;
        let init = Command::new(bin_dir.join(CLI))
            .args(["cluster", "init", "--storage-nodes", "3", "--out"])
            .arg(cluster.path().join("cluster"))
            .output()?;
        ensure!(init.status.success(), "pairdb cluster init: {}", String::from_utf8_lossy(&init.stderr));
        Ok(Workspace {
            root,
            bin_dir,
            shims,
            scratch: tempfile::tempdir()?,
            cluster,
            env_names,
            default_ports,
            stages,
        })
    }

    /// The Dockerfile target an image name (`registry/pairdb-router:tag`) is built from.
    fn target_of_image(&self, image: &str) -> Option<&Stage> {
        let repository = image.rsplit('/').next()?.split(':').next()?;
        let target = match repository {
            "pairdb" | "pairdb-cli" => "cli",
            other => SERVICES.iter().find(|(binary, _)| *binary == other)?.1,
        };
        self.stages.get(target)
    }

    /// The generated cluster file named like `name` (`cluster-secret`, `router.credential`, ...).
    fn cluster_file(&self, name: &str) -> Result<PathBuf> {
        let base = Path::new(name).file_name().context("cluster file name")?;
        let path = self.cluster.path().join("cluster").join(base);
        ensure!(path.exists(), "pairdb cluster init makes no {}", path.display());
        Ok(path)
    }

    /// A Secret value, with `REPLACE-ME` placeholders of cluster files replaced by generated ones.
    fn secret_value(&self, key: &str, value: &str) -> Result<String> {
        if value.starts_with("REPLACE-ME") {
            return read(&self.cluster_file(key)?);
        }
        Ok(value.to_owned())
    }

    /// An empty scratch directory standing in for a mounted secret volume.
    fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let path = self.scratch.path().join(name.replace('/', "_"));
        std::fs::create_dir_all(&path)?;
        Ok(path)
    }

    /// A scratch file with `contents`, standing in for a mounted secret.
    fn scratch_file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.scratch.path().join(name.replace('/', "_"));
        std::fs::write(&path, contents)?;
        Ok(path)
    }
}

// ---- Dockerfile --------------------------------------------------------------------------------------

/// One `FROM ... AS name` stage, with what it inherits from a stage it is built `FROM`.
#[derive(Debug, Clone, Default)]
struct Stage {
    name: String,
    base: String,
    env: Env,
    expose: Vec<u16>,
    healthcheck: Option<Vec<String>>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: Option<String>,
    /// Destinations of `COPY --from=...`.
    copied: BTreeSet<String>,
    runs: Vec<String>,
}

fn exec_form(instruction: &str, text: &str) -> Result<Vec<String>> {
    serde_json::from_str(text.trim())
        .with_context(|| format!("{instruction} must use the exec (JSON) form: {text}"))
}

fn parse_dockerfile(text: &str) -> Result<Vec<Stage>> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let rest = rest.trim();
        let instruction = instruction.to_ascii_uppercase();
        if instruction == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let base = words.first().context("FROM without an image")?.to_string();
            let name = match words.as_slice() {
                [_, r#as, name] if r#as.eq_ignore_ascii_case("as") => name.to_string(),
                _ => bail!("every stage is named (FROM image AS name): {line}"),
            };
            let mut stage = stages.iter().find(|s| s.name == base).cloned().unwrap_or_default();
            stage.name = name;
            stage.base = base;
            stages.push(stage);
            continue;
        }
        let stage = stages.last_mut().with_context(|| format!("{instruction} before FROM"))?;
        match instruction.as_str() {
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (key, value) =
                        pair.split_once('=').with_context(|| format!("ENV takes KEY=value pairs: {line}"))?;
                    ensure!(!value.contains('"') && !value.contains('$'), "ENV values are literal: {line}");
                    stage.env.insert(key.to_owned(), value.to_owned());
                }
            }
            "EXPOSE" => {
                for port in rest.split_whitespace() {
                    stage.expose.push(port.trim_end_matches("/tcp").parse().with_context(|| line.clone())?);
                }
            }
            "HEALTHCHECK" => {
                let command =
                    rest.split_once("CMD").with_context(|| format!("HEALTHCHECK without CMD: {line}"))?.1;
                stage.healthcheck = Some(exec_form("HEALTHCHECK CMD", command)?);
            }
            "ENTRYPOINT" => {
                stage.entrypoint = exec_form("ENTRYPOINT", rest)?;
                stage.cmd.clear();
            }
            "CMD" => stage.cmd = exec_form("CMD", rest)?,
            "USER" => stage.user = Some(rest.to_owned()),
            "COPY" if rest.contains("--from=") => {
                stage.copied.insert(rest.split_whitespace().last().unwrap_or_default().to_owned());
            }
            "RUN" => stage.runs.push(rest.to_owned()),
            _ => {}
        }
    }
    Ok(stages)
}

// ---- a launch and its check ------------------------------------------------------------------------------

/// How a deployment file starts a process, resolved to what the process sees.
#[derive(Debug, Clone)]
struct Launch {
    origin: String,
    /// The PairDB binary that ends up running (`pairdb-meta`, ..., or `pairdb`).
    binary: String,
    /// Arguments after the binary (exec form).
    args: Vec<String>,
    /// The `sh -c` script, when the binary is started through a shell.
    script: Option<String>,
    env: Env,
    /// Container paths of files the config reads while validating, and local files to use instead.
    files: BTreeMap<String, PathBuf>,
}

/// What `--check-config` printed (the config's `{:#?}`).
#[derive(Debug)]
struct Printed(String);

impl Printed {
    fn field(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}: ");
        self.0
            .lines()
            .find_map(|line| line.trim().strip_prefix(&prefix))
            .map(|value| value.trim_end_matches(','))
    }

    fn listen_port(&self) -> Result<u16> {
        let addr: SocketAddr = self.field("listen_addr").context("no listen_addr printed")?.parse()?;
        Ok(addr.port())
    }

    /// The first quoted value inside `name: Some(...)`.
    fn some_string(&self, name: &str) -> Option<&str> {
        let at = self.0.find(&format!("{name}: Some("))?;
        let rest = &self.0[at..];
        let start = rest.find('"')? + 1;
        let end = start + rest[start..].find('"')?;
        Some(&rest[start..end])
    }
}

fn is_tracing_env(name: &str) -> bool {
    name.starts_with("OTEL_") || name == "RUST_LOG"
}

impl Launch {
    /// From a container's argv (entrypoint + command); `None` when no PairDB binary runs.
    fn from_argv(origin: String, argv: &[String], env: Env) -> Option<Launch> {
        let name = |s: &String| s.rsplit('/').next().unwrap_or_default().to_owned();
        let first = argv.first()?;
        let binaries = SERVICES.iter().map(|(binary, _)| *binary).chain([CLI]);
        let (binary, args, script) = if binaries.clone().any(|b| name(first) == b) {
            (name(first), argv[1..].to_vec(), None)
        } else if matches!(name(first).as_str(), "sh" | "bash")
            && argv.get(1).map(String::as_str) == Some("-c")
        {
            let script = argv.get(2)?.clone();
            let binary = binaries.clone().find(|b| script.contains(&format!("exec {b} ")))?;
            (binary.to_owned(), Vec::new(), Some(script))
        } else {
            return None;
        };
        Some(Launch { origin, binary, args, script, env, files: BTreeMap::new() })
    }

    fn is_service(&self) -> bool {
        SERVICES.iter().any(|(binary, _)| *binary == self.binary)
    }

    fn substitute(&self, value: &str) -> String {
        let mut value = value.to_owned();
        for (container, local) in &self.files {
            value = value.replace(container.as_str(), &local.display().to_string());
        }
        value
    }

    /// Every variable is a setting of the binary, a tracing variable, or used by the shell wrapper.
    fn check_env_names(&self, workspace: &Workspace) -> Result<()> {
        let known = &workspace.env_names[&self.binary];
        for name in self.env.keys() {
            if name.starts_with("PAIRDB_") {
                ensure!(
                    known.contains(name),
                    "{}: {name} is not a setting of {} (its env names: {known:?})",
                    self.origin,
                    self.binary
                );
            } else {
                let used_by_script = self.script.as_ref().is_some_and(|script| {
                    script.contains(&format!("${{{name}}}")) || script.contains(&format!("${name}"))
                });
                ensure!(
                    is_tracing_env(name) || used_by_script,
                    "{}: environment variable {name} is neither a PAIRDB_ setting, OTEL_*/RUST_LOG, nor used \
                     by the container's command",
                    self.origin
                );
            }
        }
        Ok(())
    }

    /// Runs the real binary with `--check-config` in exactly this environment (plus `extra`, e.g. the
    /// pod's HOSTNAME) and returns what it printed.
    fn check_config(&self, workspace: &Workspace, extra: &Env) -> Result<Printed> {
        ensure!(self.is_service(), "{}: {} has no --check-config", self.origin, self.binary);
        self.check_env_names(workspace)?;
        let mut command = match &self.script {
            Some(script) => {
                let mut command = Command::new("/bin/sh");
                command.arg("-c").arg(self.substitute(script));
                command
            }
            None => {
                let mut command = Command::new(workspace.bin_dir.join(&self.binary));
                command.args(self.args.iter().map(|arg| self.substitute(arg))).arg("--check-config");
                command
            }
        };
        command.env_clear().env("PATH", format!("{}:/usr/bin:/bin", workspace.shims.path().display()));
        for (name, value) in self.env.iter().chain(extra) {
            if !is_tracing_env(name) {
                command.env(name, self.substitute(value));
            }
        }
        let output = command.output().with_context(|| format!("{}: running {}", self.origin, self.binary))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(
            output.status.success(),
            "{}: `{} --check-config` rejected the configuration ({}):\n{}\nargs: {:?}\nscript: {:?}\nenv: {:?}",
            self.origin,
            self.binary,
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.args,
            self.script,
            self.env
        );
        Ok(Printed(stdout))
    }
}

// ---- YAML helpers ----------------------------------------------------------------------------------------

fn scalar(yaml: &Yaml) -> Option<String> {
    match yaml {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_list(yaml: &Yaml) -> Vec<String> {
    match yaml {
        Yaml::Array(items) => items.iter().filter_map(scalar).collect(),
        other => scalar(other).map(|s| s.split_whitespace().map(str::to_owned).collect()).unwrap_or_default(),
    }
}

fn hash_entries(yaml: &Yaml) -> Vec<(String, &Yaml)> {
    yaml.as_hash()
        .map(|hash| hash.iter().filter_map(|(k, v)| Some((scalar(k)?, v))).collect())
        .unwrap_or_default()
}

fn string_map(yaml: &Yaml) -> Env {
    hash_entries(yaml).into_iter().filter_map(|(k, v)| Some((k, scalar(v)?))).collect()
}

/// `host:port` tokens in `text` (URLs, flags and plain addresses alike).
fn addresses(text: &str) -> Vec<(String, u16)> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_')))
        .filter_map(|token| {
            let (host, port) = token.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

// ---- Dockerfile checks ---------------------------------------------------------------------------------

#[test]
fn dockerfile_targets_match_the_binaries() -> Result<()> {
    let workspace = Workspace::load()?;
    let stages = &workspace.stages;

    let build = stages.get("build").context("a shared `build` stage")?;
    let manifest = read(&workspace.root.join("Cargo.toml"))?;
    let rust_version = manifest
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("workspace rust-version")?;
    let version_of = |text: &str| -> Option<(u32, u32)> {
        let mut parts = text.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    let image_version = build.base.strip_prefix("rust:").and_then(|tag| tag.split('-').next());
    ensure!(
        image_version.and_then(version_of) >= version_of(rust_version),
        "build stage {} is older than the workspace's rust-version {rust_version}",
        build.base
    );
    let cargo =
        build.runs.iter().find(|run| run.contains("cargo build")).context("build stage runs cargo")?;
    ensure!(cargo.contains("--release") && cargo.contains("--locked"), "release, locked build: {cargo}");
    for package in ["pairdb-meta", "pairdb-storage", "pairdb-router", "pairdb-cli"] {
        ensure!(cargo.contains(&format!("-p {package}")), "the build stage builds {package}: {cargo}");
    }

    for (binary, target) in SERVICES {
        let stage = stages.get(*target).with_context(|| format!("a `{target}` target"))?;
        let origin = format!("docker/Dockerfile target {target}");
        ensure!(stage.entrypoint == [binary.to_string()], "{origin}: ENTRYPOINT is [\"{binary}\"]");
        for installed in [*binary, CLI] {
            ensure!(
                stage.copied.contains(&format!("/usr/local/bin/{installed}")),
                "{origin}: {installed} is copied from the build stage"
            );
        }
        let user = stage.user.as_deref().context(format!("{origin}: USER is set"))?;
        ensure!(!["root", "0", "0:0"].contains(&user), "{origin}: runs as a non-root user, not {user}");

        // What a deployment must add: an admin token for meta, a node id for storage, and cluster
        // credentials.
        let mut launch = Launch::from_argv(origin.clone(), &stage.entrypoint, stage.env.clone())
            .context("entrypoint runs the binary")?;
        // Cluster authentication: the cluster secret for meta, a credential for the others.
        match *target {
            "meta" => {
                launch.env.insert("PAIRDB_ADMIN_TOKEN_FILE".into(), "/run/secrets/admin_token".into());
                let token = workspace.scratch_file("docker-admin-token", "a-deploy-time-token\n")?;
                launch.files.insert("/run/secrets/admin_token".into(), token);
                launch.env.insert("PAIRDB_CLUSTER_SECRET_FILE".into(), "/run/secrets/cluster_secret".into());
                launch
                    .files
                    .insert("/run/secrets/cluster_secret".into(), workspace.cluster_file("cluster-secret")?);
            }
            "storage" => {
                launch.env.insert("PAIRDB_NODE_ID".into(), "1".into());
                launch.env.insert("PAIRDB_CLUSTER_CREDENTIAL_FILE".into(), "/run/secrets/credential".into());
                launch
                    .files
                    .insert("/run/secrets/credential".into(), workspace.cluster_file("node-1.credential")?);
            }
            "router" => {
                launch.env.insert("PAIRDB_CLUSTER_CREDENTIAL_FILE".into(), "/run/secrets/credential".into());
                launch
                    .files
                    .insert("/run/secrets/credential".into(), workspace.cluster_file("router.credential")?);
            }
            _ => {}
        }
        let port = launch.check_config(&workspace, &Env::new())?.listen_port()?;
        ensure!(
            port == workspace.default_ports[*binary],
            "{origin}: listens on its default port, not {port}"
        );
        ensure!(stage.expose == [port], "{origin}: EXPOSE {:?} is the listen port {port}", stage.expose);
        let health = stage.healthcheck.as_ref().context(format!("{origin}: a HEALTHCHECK"))?;
        check_health_command(&origin, health, &launch.env, port)?;
        // A deployment that moves the listen address keeps a working healthcheck: it probes the port
        // the binary listens on with the container's environment, not the image's default.
        let mut moved = launch.clone();
        moved.env.insert("PAIRDB_LISTEN_ADDR".into(), "0.0.0.0:17999".into());
        let moved_port = moved.check_config(&workspace, &Env::new())?.listen_port()?;
        ensure!(moved_port == 17999, "{origin}: PAIRDB_LISTEN_ADDR moves the listener to {moved_port}");
        check_health_command(
            &format!("{origin} (listening on {moved_port})"),
            health,
            &moved.env,
            moved_port,
        )?;
    }
    let cli = stages.get("cli").context("a `cli` target")?;
    ensure!(cli.entrypoint == [CLI], "the cli target runs pairdb");
    Ok(())
}

/// The images' binaries are built by `cargo build --release`: the release profile must strip
/// debuginfo (images grew by 200+ MB each with it), and perf work keeps a profile with line tables.
#[test]
fn release_binaries_are_stripped() -> Result<()> {
    let manifest = read(&repo_root().join("Cargo.toml"))?;
    let release = cargo_profile(&manifest, "release").context("a [profile.release]")?;
    ensure!(
        matches!(release.get("strip").map(String::as_str), Some("\"debuginfo\"" | "\"symbols\"")),
        "[profile.release] strips debuginfo (strip = \"debuginfo\" or \"symbols\"): {release:?}"
    );
    ensure!(
        matches!(release.get("debug").map(String::as_str), None | Some("false" | "0" | "\"none\"")),
        "[profile.release] builds no debuginfo only to strip it: {release:?}"
    );
    let profiling = cargo_profile(&manifest, "profiling").context("a [profile.profiling] for perf")?;
    ensure!(
        profiling.get("inherits").map(String::as_str) == Some("\"release\"")
            && profiling
                .get("debug")
                .is_some_and(|debug| !matches!(debug.as_str(), "false" | "0" | "\"none\""))
            && profiling.get("strip").map(String::as_str) == Some("\"none\""),
        "[profile.profiling] is release with line tables, unstripped: {profiling:?}"
    );
    Ok(())
}

/// The `key = value` lines of `[profile.<name>]` in a Cargo manifest (values as written).
fn cargo_profile(manifest: &str, name: &str) -> Option<Env> {
    let header = format!("[profile.{name}]");
    let mut lines = manifest.lines().skip_while(|line| line.trim() != header);
    lines.next()?;
    Some(
        lines
            .take_while(|line| !line.trim_start().starts_with('['))
            .filter_map(|line| {
                let (key, value) = line.split('#').next()?.split_once('=')?;
                Some((key.trim().to_owned(), value.trim().to_owned()))
            })
            .collect(),
    )
}

/// `pairdb health` is the images' HEALTHCHECK, run every few seconds in containers that have
/// `OTEL_EXPORTER_OTLP_ENDPOINT` set: it must not export a trace. Another command with the same
/// environment does, so the listener below would see an export.
#[test]
fn pairdb_health_exports_no_traces() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let bin_dir = pairdb_tests::binaries_dir()?;
    // Stands in for an OTLP collector: counts connections and closes them, so an export fails fast.
    let collector = std::net::TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", collector.local_addr()?);
    collector.set_nonblocking(true)?;
    let connections = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let (connections, stop) = (connections.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match collector.accept() {
                    Ok(_) => {
                        connections.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        })
    };
    let nothing_listens = pairdb_tests::free_addr()?.to_string();
    let scratch = tempfile::tempdir()?;
    let run = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(bin_dir.join(CLI))
            .args(args)
            .env_clear()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_SERVICE_NAME", "pairdb-health-probe")
            .current_dir(scratch.path())
            .output()?)
    };

    // A control command that does export, before and after `pairdb health`. The commands run one
    // after another and a process connects only while it runs, so the connections counted between
    // the first control's and the second's are health's. How many connections one export makes
    // varies (the exporter may reconnect after the stand-in closes it), so only "more than before"
    // is asked of a control. Its stderr says why an export failed, should one.
    let control = |out: &str| -> Result<String> {
        let other = run(&["cluster", "init", "--storage-nodes", "1", "--out", out])?;
        let stderr = String::from_utf8_lossy(&other.stderr).into_owned();
        ensure!(other.status.success(), "pairdb cluster init: {stderr}");
        Ok(stderr)
    };
    let counted_more_than = |before: usize, control_stderr: &str| -> Result<usize> {
        let started = std::time::Instant::now();
        while connections.load(Ordering::SeqCst) <= before {
            ensure!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the control command exported no trace: this test cannot see exports (the OTLP setup \
                 changed?); its stderr: {control_stderr:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Let any further connection of the same process be counted as well.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(connections.load(Ordering::SeqCst))
    };
    let stderr = control("cluster-1")?;
    let before_health = counted_more_than(0, &stderr)?;

    let health = run(&["--timeout-ms", "500", "health", &nothing_listens])?;
    ensure!(!health.status.success(), "pairdb health of {nothing_listens}, where nothing listens, fails");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after_health = connections.load(Ordering::SeqCst);

    // The second control proves the stand-in still counts exports after health ran.
    let stderr = control("cluster-2")?;
    counted_more_than(after_health, &stderr)?;
    stop.store(true, Ordering::SeqCst);
    acceptor.join().map_err(|_| anyhow::anyhow!("acceptor thread panicked"))?;
    let from_health = after_health - before_health;
    ensure!(from_health == 0, "pairdb health connected {from_health} time(s) to the OTLP endpoint");
    Ok(())
}

/// The argv a healthcheck runs: the exec form as written, or for `sh -c <script>` what the script
/// runs, found by running it with the real shell in the container's environment `env` against
/// stand-ins for `pairdb`, `curl` and `wget` that print their arguments.
fn health_argv(origin: &str, command: &[String], env: &Env) -> Result<Vec<String>> {
    let shell = command.first().map(|first| first.rsplit('/').next().unwrap_or_default());
    if !(matches!(shell, Some("sh" | "bash")) && command.get(1).map(String::as_str) == Some("-c")) {
        return Ok(command.to_vec());
    }
    let script = command.get(2).with_context(|| format!("{origin}: `sh -c` without a script"))?;
    let stubs = tempfile::tempdir()?;
    for tool in [CLI, "curl", "wget"] {
        let path = stubs.path().join(tool);
        std::fs::write(&path, format!("#!/bin/sh\nprintf '%s\\n' {tool} \"$@\"\n"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .env_clear()
        .envs(env)
        .env("PATH", stubs.path())
        .output()
        .with_context(|| format!("{origin}: running the healthcheck script"))?;
    ensure!(
        output.status.success(),
        "{origin}: healthcheck script {script:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect())
}

/// A healthcheck is `pairdb health 127.0.0.1:<port>` (gRPC health, in sync with `/health/ready`) or
/// fetches `http://127.0.0.1:<port>/health/{ready,live}`, run directly or through `sh -c` in the
/// container's environment `env`.
fn check_health_command(origin: &str, command: &[String], env: &Env, port: u16) -> Result<()> {
    let command = &health_argv(origin, command, env)?;
    let is_cli = command.first().is_some_and(|first| first.rsplit('/').next() == Some(CLI));
    if is_cli {
        ensure!(command.get(1).map(String::as_str) == Some("health"), "{origin}: healthcheck {command:?}");
        ensure!(
            command.last() == Some(&format!("127.0.0.1:{port}")),
            "{origin}: healthcheck {command:?} checks 127.0.0.1:{port}"
        );
    } else {
        let joined = command.join(" ");
        ensure!(
            [format!("127.0.0.1:{port}/health/ready"), format!("127.0.0.1:{port}/health/live")]
                .iter()
                .any(|url| joined.contains(url.as_str())),
            "{origin}: healthcheck {command:?} hits /health/ready or /health/live on port {port}"
        );
    }
    Ok(())
}

// ---- compose -----------------------------------------------------------------------------------------------

/// A compose service that runs a PairDB binary.
#[derive(Debug)]
struct ComposeService {
    name: String,
    launch: Launch,
    aliases: Vec<String>,
    published: Vec<u16>,
}

fn compose_services(workspace: &Workspace, doc: &Yaml, dir: &Path) -> Result<Vec<ComposeService>> {
    let mut services = Vec::new();
    for (name, service) in hash_entries(&doc["services"]) {
        let stage = match service["build"]["target"].as_str() {
            Some(target) => {
                let context = dir.join(service["build"]["context"].as_str().unwrap_or("."));
                let dockerfile = service["build"]["dockerfile"].as_str().unwrap_or("Dockerfile");
                ensure!(
                    context.join(dockerfile).canonicalize()?
                        == workspace.root.join("docker/Dockerfile").canonicalize()?,
                    "compose service {name} builds docker/Dockerfile"
                );
                Some(workspace.stages.get(target).with_context(|| format!("{name}: no target {target}"))?)
            }
            None => service["image"].as_str().and_then(|image| workspace.target_of_image(image)),
        };
        let Some(stage) = stage else { continue };
        let entrypoint_set = !service["entrypoint"].is_badvalue();
        let entrypoint =
            if entrypoint_set { str_list(&service["entrypoint"]) } else { stage.entrypoint.clone() };
        let command = match &service["command"] {
            Yaml::BadValue => {
                if entrypoint_set {
                    Vec::new()
                } else {
                    stage.cmd.clone()
                }
            }
            command => str_list(command),
        };
        let mut env = stage.env.clone();
        match &service["environment"] {
            Yaml::Array(items) => {
                for item in items.iter().filter_map(Yaml::as_str) {
                    let (key, value) = item.split_once('=').unwrap_or((item, ""));
                    env.insert(key.to_owned(), value.to_owned());
                }
            }
            other => env.extend(string_map(other)),
        }
        let origin = format!("deploy/compose service {name}");
        let argv: Vec<String> = entrypoint.into_iter().chain(command).collect();
        let mut launch = match Launch::from_argv(origin.clone(), &argv, env.clone()) {
            Some(launch) => launch,
            // A CLI image running a script of `pairdb` commands: only its variables can be checked.
            None if stage.entrypoint == [CLI] => Launch {
                origin: origin.clone(),
                binary: CLI.to_owned(),
                args: Vec::new(),
                script: argv.last().cloned(),
                env,
                files: BTreeMap::new(),
            },
            None => bail!("{origin}: built from a PairDB service target but runs {argv:?}"),
        };
        for secret in service["secrets"].as_vec().into_iter().flatten() {
            let secret = scalar(secret).or_else(|| scalar(&secret["source"])).context("secret name")?;
            let file =
                doc["secrets"][secret.as_str()]["file"].as_str().context(format!("secret {secret} file"))?;
            // Cluster files are generated per deployment (`pairdb cluster init`), never committed.
            let local = match dir.join(file) {
                path if path.exists() => path,
                _ if file.starts_with("./cluster/") => workspace.cluster_file(file)?,
                path => bail!("{origin}: secret file {} is missing", path.display()),
            };
            launch.files.insert(format!("/run/secrets/{secret}"), local);
        }
        let aliases = str_list(&service["networks"]["default"]["aliases"]);
        let mut published = Vec::new();
        for port in str_list(&service["ports"]) {
            let container = port.rsplit(':').next().unwrap_or_default().trim_end_matches("/tcp");
            published.push(container.parse().with_context(|| format!("{origin}: port {port}"))?);
        }
        services.push(ComposeService { name, launch, aliases, published });
    }
    Ok(services)
}

#[test]
fn compose_file_matches_the_binaries() -> Result<()> {
    let workspace = Workspace::load()?;
    let dir = workspace.root.join("deploy/compose");
    let text = read(&dir.join("compose.yaml"))?;
    let doc = YamlLoader::load_from_str(&text)?.into_iter().next().context("empty compose file")?;
    let nginx = read(&dir.join("nginx.conf"))?;

    let services = compose_services(&workspace, &doc, &dir)?;
    let mut ports_by_name: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    let mut node_ids = BTreeSet::new();
    for service in &services {
        let launch = &service.launch;
        if !launch.is_service() {
            launch.check_env_names(&workspace)?;
            continue;
        }
        *count
            .entry(SERVICES.iter().find(|(b, _)| *b == launch.binary).map_or("", |(_, t)| t))
            .or_default() += 1;
        let printed = launch.check_config(&workspace, &Env::new())?;
        let port = printed.listen_port()?;
        for published in &service.published {
            ensure!(
                *published == port,
                "{}: publishes container port {published}, listens on {port}",
                launch.origin
            );
        }
        for name in std::iter::once(&service.name).chain(&service.aliases) {
            ports_by_name.entry(name.clone()).or_default().insert(port);
        }
        ensure!(
            launch.env.get("OTEL_EXPORTER_OTLP_ENDPOINT").map(String::as_str) == Some("http://jaeger:4317"),
            "{}: OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4317",
            launch.origin
        );
        ensure!(
            launch.env.get("OTEL_SERVICE_NAME") == Some(&launch.binary),
            "{}: OTEL_SERVICE_NAME={}",
            launch.origin,
            launch.binary
        );
        match launch.binary.as_str() {
            "pairdb-meta" => ensure!(
                printed.some_string("database_url").is_some_and(|url| url.starts_with("postgres://")),
                "{}: meta runs on PostgreSQL",
                launch.origin
            ),
            "pairdb-storage" => {
                let id = printed.field("node_id").context("node_id")?.to_owned();
                ensure!(node_ids.insert(id.clone()), "{}: node id {id} is used twice", launch.origin);
                let advertised =
                    printed.some_string("advertise_addr").context("storage advertises an address")?;
                ensure!(
                    advertised == format!("{}:{port}", service.name),
                    "{}: advertises {advertised}, reachable as {}:{port}",
                    launch.origin,
                    service.name
                );
            }
            _ => {
                ensure!(printed.some_string("redis_url").is_some(), "{}: routers share Redis", launch.origin)
            }
        }
    }
    ensure!(
        count.get("meta") == Some(&2) && count.get("storage") == Some(&3) && count.get("router") == Some(&2),
        "two meta replicas, three storage nodes and two routers, not {count:?}"
    );

    // Every `service:port` reference (flags, URLs, the setup script, nginx upstreams) uses the port that
    // service listens on.
    for (source, text) in [("compose.yaml", &text), ("nginx.conf", &nginx)] {
        for (host, port) in addresses(text) {
            if let Some(ports) = ports_by_name.get(&host) {
                ensure!(ports.contains(&port), "{source}: {host}:{port}, but {host} listens on {ports:?}");
            }
        }
    }
    // The load balancer: nginx fronts every router on both protocols, through separate upstreams,
    // and publishes the ports it listens on.
    let routers: BTreeSet<String> = services
        .iter()
        .filter(|s| s.launch.binary == "pairdb-router")
        .map(|s| Ok(format!("{}:{}", s.name, s.launch.check_config(&workspace, &Env::new())?.listen_port()?)))
        .collect::<Result<_>>()?;
    check_nginx_upstreams(&nginx, &routers)?;
    let (lb_name, lb) = hash_entries(&doc["services"])
        .into_iter()
        .find(|(_, s)| str_list(&s["volumes"]).iter().any(|v| v.contains("nginx.conf")))
        .context("a load balancer mounting nginx.conf")?;
    let listens: BTreeSet<u16> = nginx
        .lines()
        .filter_map(|line| {
            line.trim().strip_prefix("listen ")?.trim_end_matches(';').split_whitespace().next()?.parse().ok()
        })
        .collect();
    let lb_ports: BTreeSet<u16> =
        str_list(&lb["ports"]).iter().filter_map(|p| p.rsplit(':').next()?.parse().ok()).collect();
    ensure!(
        listens.len() == 2 && listens == lb_ports,
        "{lb_name} publishes nginx's listen ports {listens:?}, not {lb_ports:?}"
    );

    // Jaeger v2 (v1's all-in-one is end-of-life) receives OTLP over gRPC and serves its UI.
    let jaeger = &doc["services"]["jaeger"];
    let jaeger_image = jaeger["image"].as_str().unwrap_or_default();
    ensure!(jaeger_image.starts_with("jaegertracing/jaeger:2."), "jaeger runs Jaeger v2, not {jaeger_image}");
    let jaeger_ports = str_list(&jaeger["ports"]);
    for port in ["16686:16686", "4317:4317"] {
        ensure!(jaeger_ports.iter().any(|p| p == port), "jaeger publishes {port}");
    }
    for dependency in ["postgres", "redis"] {
        ensure!(!doc["services"][dependency].is_badvalue(), "compose runs {dependency}");
    }

    // Every file compose mounts from the repository exists (the monitoring profile mounts the alert
    // rules, Grafana's provisioning and the dashboards from deploy/).
    for (name, service) in hash_entries(&doc["services"]) {
        for volume in str_list(&service["volumes"]) {
            let source = volume.split(':').next().unwrap_or_default();
            if source.starts_with('.') {
                ensure!(
                    dir.join(source).exists(),
                    "compose service {name} mounts {source}, which does not exist"
                );
            }
        }
    }
    // Prometheus (profile `monitoring`) scrapes exactly the PairDB services, each on its listen port,
    // in jobs named after the binary (the alert rules select those job names).
    let prometheus = &doc["services"]["prometheus"];
    ensure!(str_list(&prometheus["profiles"]) == ["monitoring"], "prometheus runs in profile monitoring");
    ensure!(
        str_list(&doc["services"]["grafana"]["profiles"]) == ["monitoring"],
        "grafana runs in profile monitoring"
    );
    let config = str_list(&prometheus["volumes"])
        .into_iter()
        .find(|v| {
            v.ends_with(":/etc/prometheus/prometheus.yml:ro")
                || v.ends_with(":/etc/prometheus/prometheus.yml")
        })
        .context("prometheus mounts its configuration")?;
    let config_path = dir.join(config.split(':').next().unwrap_or_default());
    let config_text = read(&config_path)?;
    let config = YamlLoader::load_from_str(&config_text)?.into_iter().next().context("prometheus.yml")?;
    let mut scraped: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for job in config["scrape_configs"].as_vec().into_iter().flatten() {
        let name = job["job_name"].as_str().context("a scrape job without job_name")?;
        ensure!(
            matches!(job["metrics_path"].as_str(), None | Some("/metrics")),
            "prometheus.yml job {name} scrapes /metrics"
        );
        let targets = scraped.entry(name.to_owned()).or_default();
        for static_config in job["static_configs"].as_vec().into_iter().flatten() {
            targets.extend(str_list(&static_config["targets"]));
        }
    }
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for service in services.iter().filter(|s| s.launch.is_service()) {
        let port = service.launch.check_config(&workspace, &Env::new())?.listen_port()?;
        expected.entry(service.launch.binary.clone()).or_default().insert(format!("{}:{port}", service.name));
    }
    ensure!(
        scraped == expected,
        "{} scrapes {scraped:?}; the PairDB services are {expected:?}",
        config_path.display()
    );
    let rules_mounted = str_list(&prometheus["volumes"]).iter().any(|v| {
        v.split(':').next().is_some_and(|source| {
            dir.join(source).canonicalize().ok()
                == workspace.root.join("deploy/prometheus/alerts.yml").canonicalize().ok()
        }) && str_list(&config["rule_files"]).iter().any(|glob| {
            let target = v.split(':').nth(1).unwrap_or_default();
            let (glob_dir, pattern) = glob.rsplit_once('/').unwrap_or(("", glob));
            target.rsplit_once('/').is_some_and(|(target_dir, file)| {
                target_dir == glob_dir
                    && (pattern == file || pattern.strip_prefix('*').is_some_and(|ext| file.ends_with(ext)))
            })
        })
    });
    ensure!(rules_mounted, "prometheus mounts deploy/prometheus/alerts.yml where its rule_files look");
    Ok(())
}

// ---- nginx -------------------------------------------------------------------------------------------------

/// One nginx directive: its words, and the directives of its block if it has one.
#[derive(Debug)]
struct NginxDirective {
    words: Vec<String>,
    block: Vec<NginxDirective>,
}

/// Parses nginx's configuration syntax: words separated by blanks, `;` ending a directive, `{ }`
/// blocks, `#` comments and quoted strings.
fn parse_nginx(text: &str) -> Result<Vec<NginxDirective>> {
    let mut stack: Vec<(Vec<String>, Vec<NginxDirective>)> = vec![(Vec::new(), Vec::new())];
    let mut words: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                let mut word = String::new();
                loop {
                    match chars.next().context("an unterminated quoted string in nginx.conf")? {
                        '\\' => word.extend(chars.next()),
                        q if q == c => break,
                        other => word.push(other),
                    }
                }
                words.push(word);
            }
            ';' => {
                ensure!(!words.is_empty(), "nginx.conf: an empty directive");
                let directive = NginxDirective { words: std::mem::take(&mut words), block: Vec::new() };
                stack.last_mut().context("nginx.conf nesting")?.1.push(directive);
            }
            '{' => stack.push((std::mem::take(&mut words), Vec::new())),
            '}' => {
                ensure!(words.is_empty(), "nginx.conf: {words:?} lacks a `;`");
                ensure!(stack.len() > 1, "nginx.conf: an unmatched `}}`");
                let (block_words, block) = stack.pop().context("nginx.conf nesting")?;
                stack
                    .last_mut()
                    .context("nginx.conf nesting")?
                    .1
                    .push(NginxDirective { words: block_words, block });
            }
            c if c.is_whitespace() => {}
            c => {
                let mut word = String::from(c);
                while let Some(&next) = chars.peek() {
                    if next.is_whitespace() || matches!(next, ';' | '{' | '}' | '"' | '\'') {
                        break;
                    }
                    word.push(next);
                    chars.next();
                }
                words.push(word);
            }
        }
    }
    ensure!(words.is_empty() && stack.len() == 1, "nginx.conf ends inside a directive or block");
    Ok(stack.pop().map(|(_, top)| top).unwrap_or_default())
}

fn nginx_directives<'a>(directives: &'a [NginxDirective], out: &mut Vec<&'a NginxDirective>) {
    for directive in directives {
        out.push(directive);
        nginx_directives(&directive.block, out);
    }
}

/// gRPC and HTTP reach the routers through different `upstream` blocks that both list exactly
/// `routers` (`host:port`). nginx caches idle keepalive connections per upstream, in the protocol
/// they were opened with: a shared upstream hands an HTTP/1.1 request a connection gRPC left open as
/// h2c (and the reverse), the router sees the wrong protocol, and the client gets a 502.
fn check_nginx_upstreams(nginx: &str, routers: &BTreeSet<String>) -> Result<()> {
    let parsed = parse_nginx(nginx)?;
    let mut all = Vec::new();
    nginx_directives(&parsed, &mut all);
    let mut upstreams: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for upstream in all.iter().filter(|d| d.words.first().map(String::as_str) == Some("upstream")) {
        let name = upstream.words.get(1).context("an upstream without a name")?;
        let servers = upstream
            .block
            .iter()
            .filter(|d| d.words.first().map(String::as_str) == Some("server"))
            .filter_map(|d| d.words.get(1).cloned())
            .collect();
        ensure!(upstreams.insert(name.clone(), servers).is_none(), "nginx.conf: upstream {name} twice");
    }
    // The upstream each `grpc_pass` / `proxy_pass` names (`grpc://name`, `http://name/path`).
    let passes = |directive: &str| -> Result<BTreeSet<String>> {
        all.iter()
            .filter(|d| d.words.first().map(String::as_str) == Some(directive))
            .map(|d| {
                let target = d.words.get(1).with_context(|| format!("{directive} without a target"))?;
                let host = target.split_once("://").map_or(target.as_str(), |(_, rest)| rest);
                let name = host.split('/').next().unwrap_or_default().to_owned();
                ensure!(upstreams.contains_key(&name), "nginx.conf: {directive} {target} names no upstream");
                Ok(name)
            })
            .collect()
    };
    let grpc = passes("grpc_pass")?;
    let http = passes("proxy_pass")?;
    ensure!(!grpc.is_empty() && !http.is_empty(), "nginx.conf proxies both gRPC and HTTP");
    let shared: Vec<&String> = grpc.intersection(&http).collect();
    ensure!(
        shared.is_empty(),
        "nginx.conf: upstream {shared:?} serves both grpc_pass and proxy_pass; keepalive connections \
         cached by one protocol are reused by the other (502s): give each its own upstream"
    );
    for name in grpc.iter().chain(&http) {
        ensure!(
            &upstreams[name] == routers,
            "nginx.conf: upstream {name} lists {:?}, the routers are {routers:?}",
            upstreams[name]
        );
    }
    Ok(())
}

#[test]
fn nginx_upstream_check_rejects_a_shared_or_partial_upstream() -> Result<()> {
    let nginx = read(&repo_root().join("deploy/compose/nginx.conf"))?;
    let routers: BTreeSet<String> = ["router-1:7000", "router-2:7000"].map(String::from).into();
    assert!(check_nginx_upstreams(&nginx, &routers).is_ok());

    // The file before the fix: one upstream behind both protocols.
    let shared = nginx.replace("proxy_pass http://routers_http", "proxy_pass http://routers_grpc");
    let error = check_nginx_upstreams(&shared, &routers).expect_err("a shared upstream");
    assert!(format!("{error:#}").contains("both grpc_pass and proxy_pass"), "{error:#}");

    // One protocol missing a router.
    let partial = nginx.replacen("server router-2:7000", "server router-1:7000 backup", 1);
    assert!(check_nginx_upstreams(&partial, &routers).is_err(), "an upstream without router-2");
    // A pass to something that is not an upstream.
    let unknown = nginx.replace("http://routers_http", "http://routers");
    assert!(check_nginx_upstreams(&unknown, &routers).is_err(), "proxy_pass to no upstream");
    // Syntax the parser must get right: a quoted `;` and `{` inside a value, comments with braces.
    let parsed = parse_nginx("# {\nhttp { add_header X \"a;b{\"; upstream u { server a:1; } }")?;
    assert!(matches!(parsed.as_slice(), [NginxDirective { block, .. }] if block.len() == 2));
    Ok(())
}

// ---- Kubernetes ----------------------------------------------------------------------------------------

struct Manifests {
    docs: Vec<(String, Yaml)>,
    namespace: String,
}

impl Manifests {
    fn load(dir: &Path) -> Result<Manifests> {
        let kustomization = YamlLoader::load_from_str(&read(&dir.join("kustomization.yaml"))?)?
            .into_iter()
            .next()
            .context("empty kustomization")?;
        let resources: BTreeSet<String> = str_list(&kustomization["resources"]).into_iter().collect();
        let mut files = BTreeSet::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                files.insert(name);
            }
        }
        ensure!(resources == files, "kustomization resources {resources:?} are the manifests {files:?}");
        let mut docs = Vec::new();
        for file in &files {
            for doc in YamlLoader::load_from_str(&read(&dir.join(file))?)? {
                if !matches!(doc, Yaml::Null) {
                    ensure!(doc["kind"].as_str().is_some(), "{file}: a document without kind");
                    docs.push((file.clone(), doc));
                }
            }
        }
        let namespace = kustomization["namespace"].as_str().unwrap_or(NAMESPACE_SAMPLE).to_owned();
        Ok(Manifests { docs, namespace })
    }

    fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Yaml> + 'a {
        let kind = kind.to_owned();
        self.docs.iter().map(|(_, doc)| doc).filter(move |doc| doc["kind"].as_str() == Some(kind.as_str()))
    }

    fn named(&self, kind: &str, name: &str) -> Result<&Yaml> {
        self.of_kind(kind)
            .find(|doc| doc["metadata"]["name"].as_str() == Some(name))
            .with_context(|| format!("no {kind} named {name}"))
    }

    fn data(&self, kind: &str, name: &str) -> Result<Env> {
        let doc = self.named(kind, name)?;
        ensure!(doc["data"].is_badvalue() || kind == "ConfigMap", "Secret {name}: use stringData");
        Ok(string_map(if kind == "Secret" { &doc["stringData"] } else { &doc["data"] }))
    }
}

fn selects(selector: &Yaml, labels: &Env) -> bool {
    let wanted = string_map(selector);
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A PairDB container of a Deployment or StatefulSet, resolved.
#[derive(Debug)]
struct Container {
    workload: String,
    launch: Launch,
    /// Named container ports and their numbers.
    ports: BTreeMap<String, u16>,
    container_ports: Vec<u16>,
    listen_port: u16,
    labels: Env,
}

fn resolve_port(port: &Yaml, named: &BTreeMap<String, u16>) -> Option<u16> {
    match port {
        Yaml::Integer(number) => u16::try_from(*number).ok(),
        Yaml::String(name) => named.get(name).copied(),
        _ => None,
    }
}

fn k8s_containers(workspace: &Workspace, manifests: &Manifests) -> Result<Vec<Container>> {
    let mut containers = Vec::new();
    for kind in ["Deployment", "StatefulSet"] {
        for workload in manifests.of_kind(kind) {
            let name = workload["metadata"]["name"].as_str().context("workload name")?.to_owned();
            let pod = &workload["spec"]["template"];
            let labels = string_map(&pod["metadata"]["labels"]);
            ensure!(
                selects(&workload["spec"]["selector"]["matchLabels"], &labels),
                "{kind} {name}: selector"
            );
            let annotations = string_map(&pod["metadata"]["annotations"]);
            let replicas = workload["spec"]["replicas"].as_i64().unwrap_or(1);
            for container in pod["spec"]["containers"].as_vec().into_iter().flatten() {
                let image = container["image"].as_str().context("container image")?;
                let Some(stage) = workspace.target_of_image(image) else { continue };
                let origin = format!(
                    "deploy/k8s {kind} {name} container {}",
                    container["name"].as_str().unwrap_or("?")
                );
                let entrypoint = match &container["command"] {
                    Yaml::BadValue => stage.entrypoint.clone(),
                    command => str_list(command),
                };
                let args = match &container["args"] {
                    Yaml::BadValue if container["command"].is_badvalue() => stage.cmd.clone(),
                    Yaml::BadValue => Vec::new(),
                    args => str_list_keep(args),
                };
                let mut env = stage.env.clone();
                for source in container["envFrom"].as_vec().into_iter().flatten() {
                    if let Some(map) = source["configMapRef"]["name"].as_str() {
                        env.extend(manifests.data("ConfigMap", map)?);
                    }
                    if let Some(secret) = source["secretRef"]["name"].as_str() {
                        env.extend(manifests.data("Secret", secret)?);
                    }
                }
                for var in container["env"].as_vec().into_iter().flatten() {
                    let key = var["name"].as_str().context("env name")?.to_owned();
                    let from = &var["valueFrom"];
                    let value = if let Some(value) = scalar(&var["value"]) {
                        value
                    } else if let Some(map) = from["configMapKeyRef"]["name"].as_str() {
                        let field = from["configMapKeyRef"]["key"].as_str().context("key")?;
                        manifests
                            .data("ConfigMap", map)?
                            .get(field)
                            .cloned()
                            .context(format!("{map}.{field}"))?
                    } else if let Some(secret) = from["secretKeyRef"]["name"].as_str() {
                        let field = from["secretKeyRef"]["key"].as_str().context("key")?;
                        manifests
                            .data("Secret", secret)?
                            .get(field)
                            .cloned()
                            .context(format!("{secret}.{field}"))?
                    } else {
                        match from["fieldRef"]["fieldPath"].as_str() {
                            Some("metadata.namespace") => manifests.namespace.clone(),
                            Some("metadata.name") => format!("{name}-0"),
                            other => bail!("{origin}: env {key} from unsupported source {other:?}"),
                        }
                    };
                    env.insert(key, value);
                }
                let argv: Vec<String> = entrypoint.into_iter().chain(args).collect();
                let mut launch = Launch::from_argv(origin.clone(), &argv, env)
                    .with_context(|| format!("{origin}: runs no PairDB binary: {argv:?}"))?;
                // Secrets mounted as files.
                for mount in container["volumeMounts"].as_vec().into_iter().flatten() {
                    let volume_name = mount["name"].as_str().context("mount name")?;
                    let mount_path = mount["mountPath"].as_str().context("mountPath")?;
                    let volume = pod["spec"]["volumes"]
                        .as_vec()
                        .into_iter()
                        .flatten()
                        .find(|v| v["name"].as_str() == Some(volume_name));
                    let Some(secret) = volume.and_then(|v| v["secret"]["secretName"].as_str()) else {
                        continue;
                    };
                    let data = manifests.data("Secret", secret)?;
                    let items: Vec<(String, String)> = match volume.map(|v| &v["secret"]["items"]) {
                        Some(Yaml::Array(items)) => items
                            .iter()
                            .filter_map(|i| {
                                Some((i["key"].as_str()?.to_owned(), i["path"].as_str()?.to_owned()))
                            })
                            .collect(),
                        _ => data.keys().map(|k| (k.clone(), k.clone())).collect(),
                    };
                    // The mount directory maps to a local one holding the items, so paths the
                    // container computes at start (`node-$((ordinal + 1)).credential`) resolve too.
                    let local_dir = workspace.scratch_dir(&format!("{name}-{secret}-{volume_name}"))?;
                    for (key, path) in items {
                        let contents = data.get(&key).context(format!("{secret}.{key}"))?;
                        std::fs::write(local_dir.join(&path), workspace.secret_value(&key, contents)?)?;
                    }
                    launch.files.insert(mount_path.to_owned(), local_dir);
                }
                let mut ports = BTreeMap::new();
                let mut container_ports = Vec::new();
                for port in container["ports"].as_vec().into_iter().flatten() {
                    let number = u16::try_from(port["containerPort"].as_i64().context("containerPort")?)?;
                    container_ports.push(number);
                    if let Some(port_name) = port["name"].as_str() {
                        ports.insert(port_name.to_owned(), number);
                    }
                }

                // One check per pod the workload makes (a StatefulSet's pods differ by HOSTNAME).
                let hostnames: Vec<String> = if kind == "StatefulSet" {
                    (0..replicas).map(|ordinal| format!("{name}-{ordinal}")).collect()
                } else {
                    vec![format!("{name}-7d9f8c6b5-x2x7q")]
                };
                let mut listen_port = None;
                let mut node_ids = BTreeSet::new();
                for hostname in &hostnames {
                    let extra = Env::from([("HOSTNAME".to_owned(), hostname.clone())]);
                    let printed = launch.check_config(workspace, &extra)?;
                    let port = printed.listen_port()?;
                    listen_port = Some(port);
                    if launch.binary == "pairdb-storage" {
                        node_ids.insert(printed.field("node_id").context("node_id")?.parse::<i64>()?);
                        let service = workload["spec"]["serviceName"].as_str().context("serviceName")?;
                        let expected =
                            format!("{hostname}.{service}.{}.svc.cluster.local:{port}", manifests.namespace);
                        ensure!(
                            printed.some_string("advertise_addr") == Some(expected.as_str()),
                            "{origin}: pod {hostname} advertises {:?}, its DNS name is {expected}",
                            printed.some_string("advertise_addr")
                        );
                    }
                    if launch.binary == "pairdb-meta" {
                        ensure!(
                            printed
                                .some_string("database_url")
                                .is_some_and(|url| url.starts_with("postgres")),
                            "{origin}: meta replicas share PostgreSQL"
                        );
                    }
                }
                let listen_port = listen_port.context("no pods")?;
                if launch.binary == "pairdb-storage" {
                    ensure!(
                        node_ids == (1..=replicas).collect(),
                        "{origin}: pods get node ids 1..={replicas}, not {node_ids:?}"
                    );
                }

                ensure!(container_ports.contains(&listen_port), "{origin}: containerPort {listen_port}");
                for (probe, path) in [("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")]
                {
                    let get = &container[probe]["httpGet"];
                    ensure!(get["path"].as_str() == Some(path), "{origin}: {probe} GETs {path}");
                    ensure!(
                        resolve_port(&get["port"], &ports) == Some(listen_port),
                        "{origin}: {probe} port {:?} is the listen port {listen_port}",
                        get["port"]
                    );
                }
                let annotation = |key: &str| annotations.get(key).map(String::as_str);
                ensure!(annotation("prometheus.io/scrape") == Some("true"), "{origin}: prometheus.io/scrape");
                ensure!(annotation("prometheus.io/path") == Some("/metrics"), "{origin}: prometheus.io/path");
                ensure!(
                    annotation("prometheus.io/port") == Some(listen_port.to_string().as_str()),
                    "{origin}: prometheus.io/port is {listen_port}"
                );
                ensure!(
                    launch.env.get("OTEL_SERVICE_NAME") == Some(&launch.binary),
                    "{origin}: OTEL_SERVICE_NAME"
                );
                ensure!(
                    launch.env.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"),
                    "{origin}: OTEL_EXPORTER_OTLP_ENDPOINT"
                );
                containers.push(Container {
                    workload: format!("{kind}/{name}"),
                    launch,
                    ports,
                    container_ports,
                    listen_port,
                    labels: labels.clone(),
                });
            }
        }
    }
    Ok(containers)
}

/// Like [`str_list`], but a single string stays one element (a `sh -c` script).
fn str_list_keep(yaml: &Yaml) -> Vec<String> {
    match yaml {
        Yaml::Array(items) => items.iter().filter_map(scalar).collect(),
        other => scalar(other).into_iter().collect(),
    }
}

#[test]
fn kubernetes_manifests_match_the_binaries() -> Result<()> {
    let workspace = Workspace::load()?;
    let manifests = Manifests::load(&workspace.root.join("deploy/k8s"))?;
    let containers = k8s_containers(&workspace, &manifests)?;
    let kinds: BTreeSet<&str> = containers.iter().map(|c| c.launch.binary.as_str()).collect();
    ensure!(kinds.len() == SERVICES.len(), "every service runs in the manifests: {kinds:?}");

    // Services route to the port the selected containers listen on.
    let mut service_ports: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for service in manifests.of_kind("Service") {
        let name = service["metadata"]["name"].as_str().context("service name")?;
        let selected: Vec<&Container> =
            containers.iter().filter(|c| selects(&service["spec"]["selector"], &c.labels)).collect();
        ensure!(!selected.is_empty(), "Service {name} selects no PairDB pods");
        for port in service["spec"]["ports"].as_vec().into_iter().flatten() {
            let number = u16::try_from(port["port"].as_i64().context("service port")?)?;
            service_ports.entry(name.to_owned()).or_default().insert(number);
            for container in &selected {
                let target = match &port["targetPort"] {
                    Yaml::BadValue => Some(number),
                    target => resolve_port(target, &container.ports),
                };
                ensure!(
                    target == Some(container.listen_port)
                        && container.container_ports.contains(&container.listen_port),
                    "Service {name} port {number} reaches {} on {target:?}, which listens on {}",
                    container.workload,
                    container.listen_port
                );
            }
        }
    }
    // `service:port` references in settings use that Service's port.
    for container in &containers {
        let values =
            container.launch.env.values().chain(&container.launch.args).chain(&container.launch.script);
        for value in values {
            for (host, port) in addresses(value) {
                let service = host.split('.').next().unwrap_or_default();
                if let Some(ports) = service_ports.get(service) {
                    ensure!(
                        ports.contains(&port),
                        "{}: {host}:{port}, Service {service} has {ports:?}",
                        container.launch.origin
                    );
                }
            }
        }
    }

    let storage = manifests.named("StatefulSet", "pairdb-storage")?;
    let headless =
        manifests.named("Service", storage["spec"]["serviceName"].as_str().context("serviceName")?)?;
    ensure!(headless["spec"]["clusterIP"].as_str() == Some("None"), "the storage Service is headless");
    let claims: Vec<&str> = storage["spec"]["volumeClaimTemplates"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|claim| claim["metadata"]["name"].as_str())
        .collect();
    let storage_container =
        containers.iter().find(|c| c.launch.binary == "pairdb-storage").context("storage")?;
    let data_dir = storage_container.launch.env.get("PAIRDB_DATA_DIR").context("storage PAIRDB_DATA_DIR")?;
    let mounts = &storage["spec"]["template"]["spec"]["containers"][0]["volumeMounts"];
    ensure!(
        mounts.as_vec().into_iter().flatten().any(|mount| {
            mount["name"].as_str().is_some_and(|n| claims.contains(&n))
                && mount["mountPath"].as_str().is_some_and(|path| data_dir.starts_with(path))
        }),
        "the storage data dir {data_dir} is on a volume claim {claims:?}"
    );

    let meta = manifests.named("Deployment", "pairdb-meta")?;
    ensure!(meta["spec"]["replicas"].as_i64() >= Some(2), "meta runs two replicas");
    let meta_labels = string_map(&meta["spec"]["template"]["metadata"]["labels"]);
    ensure!(
        manifests
            .of_kind("PodDisruptionBudget")
            .any(|pdb| selects(&pdb["spec"]["selector"]["matchLabels"], &meta_labels)),
        "a PodDisruptionBudget covers meta"
    );
    let hpa = manifests.of_kind("HorizontalPodAutoscaler").next().context("an HPA")?;
    let target = &hpa["spec"]["scaleTargetRef"];
    let scaled = manifests
        .named(target["kind"].as_str().unwrap_or_default(), target["name"].as_str().unwrap_or_default())?;
    ensure!(scaled["metadata"]["name"].as_str() == Some("pairdb-router"), "the HPA scales the routers");
    check_pod_placement(&manifests)?;
    check_service_monitor(&manifests, &Manifests::load(&workspace.root.join("deploy/k8s/monitoring"))?)?;
    Ok(())
}

/// Whether a label selector (`matchLabels` and `matchExpressions`) selects `labels`; an empty
/// selector selects nothing here (Kubernetes would select everything, never what these files mean).
fn label_selector_matches(selector: &Yaml, labels: &Env) -> bool {
    let wanted = string_map(&selector["matchLabels"]);
    let expressions = selector["matchExpressions"].as_vec().cloned().unwrap_or_default();
    if wanted.is_empty() && expressions.is_empty() {
        return false;
    }
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
        && expressions.iter().all(|expression| {
            let value = expression["key"].as_str().and_then(|key| labels.get(key));
            let values = str_list(&expression["values"]);
            match expression["operator"].as_str() {
                Some("In") => value.is_some_and(|v| values.contains(v)),
                Some("NotIn") => value.is_none_or(|v| !values.contains(v)),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                _ => false,
            }
        })
}

/// Every pod runs under the runtime's default seccomp profile; storage pods go one per Kubernetes
/// node (two replicas of a partition on one machine fail together) and spread over zones.
fn check_pod_placement(manifests: &Manifests) -> Result<()> {
    for kind in ["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"] {
        for workload in manifests.of_kind(kind) {
            let name = workload["metadata"]["name"].as_str().unwrap_or("?");
            let pod = match kind {
                "CronJob" => &workload["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => &workload["spec"]["template"]["spec"],
            };
            ensure!(
                pod["securityContext"]["seccompProfile"]["type"].as_str() == Some("RuntimeDefault"),
                "{kind} {name}: the pod's securityContext.seccompProfile is {{type: RuntimeDefault}}"
            );
        }
    }
    let storage = manifests.named("StatefulSet", "pairdb-storage")?;
    let labels = string_map(&storage["spec"]["template"]["metadata"]["labels"]);
    let pod = &storage["spec"]["template"]["spec"];
    let anti_affinity = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_vec()
        .into_iter()
        .flatten()
        .any(|term| {
            term["topologyKey"].as_str() == Some("kubernetes.io/hostname")
                && label_selector_matches(&term["labelSelector"], &labels)
        });
    ensure!(
        anti_affinity,
        "storage pods have a required anti-affinity on kubernetes.io/hostname against each other"
    );
    let spread = pod["topologySpreadConstraints"].as_vec().into_iter().flatten().any(|constraint| {
        constraint["topologyKey"].as_str() == Some("topology.kubernetes.io/zone")
            && constraint["maxSkew"].as_i64() == Some(1)
            && label_selector_matches(&constraint["labelSelector"], &labels)
    });
    ensure!(spread, "storage pods spread over topology.kubernetes.io/zone with maxSkew 1");
    Ok(())
}

/// The ServiceMonitor scrapes `/metrics` on every PairDB Service, on a port that reaches the pods'
/// listen port, and a PrometheusRule ships beside it.
fn check_service_monitor(base: &Manifests, monitoring: &Manifests) -> Result<()> {
    ensure!(monitoring.of_kind("PrometheusRule").count() == 1, "deploy/k8s/monitoring has a PrometheusRule");
    let monitors: Vec<&Yaml> = monitoring.of_kind("ServiceMonitor").collect();
    ensure!(!monitors.is_empty(), "deploy/k8s/monitoring has a ServiceMonitor");
    ensure!(
        monitoring.namespace == base.namespace,
        "the monitoring objects live in namespace {}",
        base.namespace
    );
    for service in base.of_kind("Service") {
        let name = service["metadata"]["name"].as_str().context("service name")?;
        let labels = string_map(&service["metadata"]["labels"]);
        let port_names: BTreeSet<String> = service["spec"]["ports"]
            .as_vec()
            .into_iter()
            .flatten()
            .filter_map(|p| scalar(&p["name"]))
            .collect();
        let scraped = monitors.iter().any(|monitor| {
            label_selector_matches(&monitor["spec"]["selector"], &labels)
                && monitor["spec"]["endpoints"].as_vec().into_iter().flatten().any(|endpoint| {
                    endpoint["port"].as_str().is_some_and(|port| port_names.contains(port))
                        && matches!(endpoint["path"].as_str(), None | Some("/metrics"))
                })
        });
        ensure!(
            scraped,
            "a ServiceMonitor scrapes Service {name}'s /metrics on one of its ports {port_names:?}"
        );
    }
    Ok(())
}

#[test]
fn pod_placement_and_scraping_checks_reject_what_they_guard() -> Result<()> {
    let root = repo_root();
    let base = Manifests::load(&root.join("deploy/k8s"))?;
    let monitoring = Manifests::load(&root.join("deploy/k8s/monitoring"))?;
    assert!(check_pod_placement(&base).is_ok());
    assert!(check_service_monitor(&base, &monitoring).is_ok());
    // The same manifests, edited as text and loaded from a scratch copy.
    let variant = |file: &str, from: &str, to: &str| -> Result<Manifests> {
        let scratch = tempfile::tempdir()?;
        for entry in std::fs::read_dir(root.join("deploy/k8s"))? {
            let path = entry?.path();
            if path.is_file() {
                let mut text = read(&path)?;
                if path.file_name().is_some_and(|name| name == file) {
                    ensure!(text.contains(from), "{file} contains {from:?}");
                    text = text.replacen(from, to, 1);
                }
                std::fs::write(scratch.path().join(path.file_name().context("file name")?), text)?;
            }
        }
        Manifests::load(scratch.path())
    };
    let unconfined = variant("router.yaml", "type: RuntimeDefault", "type: Unconfined")?;
    let error = check_pod_placement(&unconfined).expect_err("a router pod without seccomp");
    assert!(format!("{error:#}").contains("pairdb-router"), "{error:#}");
    let shared_hosts =
        variant("storage.yaml", "topologyKey: kubernetes.io/hostname", "topologyKey: kubernetes.io/os")?;
    assert!(check_pod_placement(&shared_hosts).is_err(), "storage pods allowed on one host");
    let other_pods = variant(
        "storage.yaml",
        "app.kubernetes.io/name: pairdb-storage\n      # Spread",
        "app.kubernetes.io/name: pairdb-router\n      # Spread",
    )?;
    assert!(check_pod_placement(&other_pods).is_err(), "anti-affinity against the routers instead");
    let one_zone = variant(
        "storage.yaml",
        "topologyKey: topology.kubernetes.io/zone",
        "topologyKey: kubernetes.io/hostname",
    )?;
    assert!(check_pod_placement(&one_zone).is_err(), "no spread over zones");
    let unlabelled = variant(
        "meta.yaml",
        "  labels:\n    app.kubernetes.io/name: pairdb-meta\nspec:\n  selector:",
        "spec:\n  selector:",
    )?;
    assert!(
        check_service_monitor(&unlabelled, &monitoring).is_err(),
        "a Service the ServiceMonitor does not select"
    );
    Ok(())
}

// ---- the checks can fail -----------------------------------------------------------------------------------

#[test]
fn a_wrong_flag_or_variable_fails_the_check() -> Result<()> {
    let workspace = Workspace::load()?;
    let dir = workspace.root.join("deploy/compose");
    let doc = YamlLoader::load_from_str(&read(&dir.join("compose.yaml"))?)?
        .into_iter()
        .next()
        .context("compose")?;
    let services = compose_services(&workspace, &doc, &dir)?;
    let storage = services.iter().find(|s| s.launch.binary == "pairdb-storage").context("a storage node")?;
    let meta = services.iter().find(|s| s.launch.binary == "pairdb-meta").context("a meta replica")?;
    assert!(storage.launch.check_config(&workspace, &Env::new()).is_ok());

    let mut typo = storage.launch.clone();
    typo.args.push("--node-idd=4".into());
    assert!(typo.check_config(&workspace, &Env::new()).is_err(), "a misspelled flag is rejected");

    let mut bad_value = storage.launch.clone();
    bad_value.args.retain(|arg| !arg.starts_with("--node-id"));
    bad_value.args.push("--node-id=0".into());
    let error = bad_value.check_config(&workspace, &Env::new()).expect_err("node id 0 is rejected");
    assert!(format!("{error:#}").contains("node_id"), "{error:#}");

    let mut unknown_env = storage.launch.clone();
    unknown_env.env.insert("PAIRDB_NODE_IDENTITY".into(), "1".into());
    let error = unknown_env.check_config(&workspace, &Env::new()).expect_err("unknown PAIRDB_ variable");
    assert!(format!("{error:#}").contains("PAIRDB_NODE_IDENTITY"), "{error:#}");

    let mut no_secret = meta.launch.clone();
    no_secret.files.clear();
    assert!(no_secret.check_config(&workspace, &Env::new()).is_err(), "meta needs its admin token file");

    // Cluster authentication is not optional: without its credential a storage node refuses to start,
    // and so does one presenting another node's credential.
    let mut no_credential = storage.launch.clone();
    no_credential.env.remove("PAIRDB_CLUSTER_CREDENTIAL_FILE");
    let error = no_credential.check_config(&workspace, &Env::new()).expect_err("a node without a credential");
    assert!(format!("{error:#}").contains("cluster_credential"), "{error:#}");
    let mut borrowed = storage.launch.clone();
    let node_two = workspace.cluster_file("node-2.credential")?;
    for file in borrowed.files.values_mut() {
        *file = node_two.clone();
    }
    let error = borrowed.check_config(&workspace, &Env::new()).expect_err("node 1 with node 2's credential");
    assert!(format!("{error:#}").contains("names node-2"), "{error:#}");

    let health = vec![CLI.to_owned(), "health".into(), "127.0.0.1:7101".into()];
    assert!(
        check_health_command("test", &health, &Env::new(), 7100).is_err(),
        "a healthcheck on the wrong port"
    );
    // The old image healthcheck: a hard-coded port that a moved listen address leaves behind.
    let fixed =
        vec![CLI.to_owned(), "health".into(), "--timeout-ms".into(), "3000".into(), "127.0.0.1:7100".into()];
    let moved = Env::from([("PAIRDB_LISTEN_ADDR".to_owned(), "0.0.0.0:17999".to_owned())]);
    assert!(check_health_command("test", &fixed, &moved, 17999).is_err(), "a hard-coded healthcheck port");
    let from_env: Vec<String> =
        ["/bin/sh", "-c", "exec pairdb health \"127.0.0.1:${PAIRDB_LISTEN_ADDR##*:}\""]
            .map(String::from)
            .into();
    assert!(check_health_command("test", &from_env, &moved, 17999).is_ok(), "a port from the environment");
    assert!(check_health_command("test", &from_env, &moved, 7100).is_err(), "the script's port is checked");
    Ok(())
}
