//! The services' TOML config file (`--config`, `PAIRDB_CONFIG`) and what `--check-config` refuses,
//! through the real binaries.
//!
//! - For each service, every flag of its `--help` (so a new flag is covered without touching this
//!   test) goes into a config file, and `--check-config` must print exactly what it prints for the
//!   same values given as flags. Flags that exclude each other (a secret and its `_file` variant,
//!   `--insecure-cluster` and a credential, `--no-auth` and an admin token) are spread over several
//!   rounds, so each is set in one of them.
//! - Precedence on a real binary: flag > environment > file > default.
//! - `--listen-addr localhost:PORT` starts a service.
//! - Each configuration that would fail at start fails `--check-config`, naming the field.
//! - The example files under `deploy/config/` load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pairdb_service::cluster_auth::{Principal, Signer};
use pairdb_tests::pki::TestPki;

const SERVICES: &[&str] = &["pairdb-meta", "pairdb-storage", "pairdb-router"];
/// Flags that are not settings: never in a config file.
const NOT_SETTINGS: &[&str] = &["help", "version", "config", "check-config"];
/// The storage node id the test's credentials and values are for.
const NODE_ID: u32 = 3;

/// A value of one setting, in the file's types.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    /// An on/off flag, on.
    On,
    Integer(i64),
    Text(String),
}

impl Value {
    fn toml(&self) -> String {
        match self {
            Value::On => "true".to_owned(),
            Value::Integer(n) => n.to_string(),
            Value::Text(text) => format!("{text:?}"),
        }
    }

    /// The command-line form: `--flag` for an on/off flag, else `--flag=value` (a generated secret may
    /// start with `-`, which as a separate argument would read as a flag).
    fn args(&self, flag: &str) -> Vec<String> {
        match self {
            Value::On => vec![format!("--{flag}")],
            Value::Integer(n) => vec![format!("--{flag}={n}")],
            Value::Text(text) => vec![format!("--{flag}={text}")],
        }
    }

    /// A default as `--help` shows it, typed as the file needs it.
    fn from_default(text: &str) -> Value {
        match text.parse::<i64>() {
            Ok(n) => Value::Integer(n),
            Err(_) => Value::Text(text.to_owned()),
        }
    }
}

/// One flag as `--help` describes it.
#[derive(Debug, Clone)]
struct Flag {
    /// Long name, kebab-case.
    long: String,
    takes_value: bool,
    default: Option<String>,
}

/// The long flags of `binary`, read from its `--help`.
fn flags_of(binary: &Path) -> Result<Vec<Flag>> {
    let output = Command::new(binary).arg("--help").env_clear().output()?;
    ensure!(output.status.success(), "{} --help failed", binary.display());
    let help = String::from_utf8(output.stdout)?;
    let mut flags: Vec<Flag> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let definition = trimmed.strip_prefix("--").or_else(|| {
            // `-h, --help`
            let rest = trimmed.strip_prefix('-')?;
            rest.get(1..)?.strip_prefix(", --")
        });
        if let Some(definition) = definition {
            let mut words = definition.split_whitespace();
            let long = words.next().context("a flag line without a name")?.to_owned();
            let takes_value = words.next().is_some_and(|word| word.starts_with('<'));
            flags.push(Flag { long, takes_value, default: None });
            // A short help puts `[default: x]` on the flag's line.
        }
        if let (Some(flag), Some(at)) = (flags.last_mut(), line.find("[default: ")) {
            let rest = &line[at + "[default: ".len()..];
            flag.default = rest.find(']').map(|end| rest[..end].to_owned());
        }
    }
    ensure!(
        flags.iter().any(|f| f.long == "listen-addr"),
        "no --listen-addr in the help of {}",
        binary.display()
    );
    Ok(flags)
}

/// Files the settings point at: TLS material, secrets and credentials, made for the test.
struct Material {
    dir: tempfile::TempDir,
    pki: TestPki,
    secret: String,
}

impl Material {
    fn new() -> Result<Material> {
        let dir = tempfile::tempdir()?;
        let secret = Signer::generate_secret();
        let signer = Signer::from_secret(&secret)?;
        std::fs::write(dir.path().join("cluster-secret"), format!("{secret}\n"))?;
        std::fs::write(dir.path().join("admin-token"), "file-admin-token\n")?;
        for principal in [Principal::Router, Principal::Node(pairdb_core::ring::NodeId(NODE_ID))] {
            let credential = signer.issue(principal);
            std::fs::write(dir.path().join(format!("{principal}.credential")), credential.as_str())?;
        }
        std::fs::write(dir.path().join("not-pem.txt"), "just some text\n")?;
        Ok(Material { dir, pki: TestPki::generate()?, secret })
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn credential(&self, principal: &str) -> Result<String> {
        Ok(std::fs::read_to_string(self.path(&format!("{principal}.credential")))?)
    }

    /// `--tls-cert`, `--tls-key`, `--tls-ca` values.
    fn tls(&self) -> (String, String, String) {
        let args = self.pki.service_args();
        (args[1].clone(), args[3].clone(), args[5].clone())
    }
}

/// Valid values, different from the defaults, for the settings this test knows; a setting it does
/// not know is set to the default `--help` shows (and one with neither fails the test).
fn known_values(binary: &str, material: &Material) -> Result<BTreeMap<&'static str, Value>> {
    use Value::{Integer, On, Text};
    let text = |s: &str| Text(s.to_owned());
    let (cert, key, ca) = material.tls();
    let mut values = BTreeMap::from([
        ("listen-addr", text("localhost:17001")),
        ("max-connections", Integer(100)),
        ("first-byte-timeout-ms", Integer(2500)),
        ("max-concurrent-streams", Integer(64)),
        ("http-body-timeout-ms", Integer(3000)),
        ("tls-cert", Text(cert)),
        ("tls-key", Text(key)),
        ("tls-ca", Text(ca)),
        ("log-format", text("json")),
    ]);
    let specific: Vec<(&'static str, Value)> = match binary {
        "pairdb-meta" => vec![
            ("database-url", text("postgres://pairdb:hunter2@db.example:5432/meta")),
            ("data-dir", text("/var/lib/pairdb/meta-test")),
            ("database-timeout-ms", Integer(1500)),
            ("database-max-connections", Integer(4)),
            ("admin-token", text("flag-admin-token")),
            ("admin-token-file", Text(material.path("admin-token"))),
            ("no-auth", On),
            ("partition-count", Integer(1024)),
            ("node-down-after-ms", Integer(4000)),
            ("heartbeat-interval-ms", Integer(500)),
            ("max-clock-offset-ms", Integer(250)),
            ("auto-add-nodes", On),
            ("migration-parallelism", Integer(2)),
            ("watch-buffer", Integer(64)),
            ("cluster-secret", Text(material.secret.clone())),
            ("cluster-secret-file", Text(material.path("cluster-secret"))),
            ("insecure-cluster", On),
            ("max-message-mb", Integer(32)),
        ],
        "pairdb-storage" => vec![
            ("advertise-addr", text("storage-3.example:7200")),
            ("node-id", Integer(i64::from(NODE_ID))),
            ("data-dir", text("/var/lib/pairdb/storage-test")),
            ("sync", text("periodic")),
            ("sync-interval-ms", Integer(50)),
            ("partition-count", Integer(1024)),
            ("max-inflight-requests", Integer(100)),
            ("stream-batch-max", Integer(100)),
            ("listing-share-percent", Integer(50)),
            ("max-clock-offset-ms", Integer(250)),
            ("cache-mb", Integer(32)),
            ("record-cache-mb", Integer(16)),
            ("disk-reserve-mb", Integer(128)),
            ("meta-addr", text("meta.example:7100")),
            ("zone", text("zone-b")),
            ("weight", Integer(2)),
            ("anti-entropy-period-secs", Integer(600)),
            ("anti-entropy-keys-per-sec", Integer(1000)),
            ("anti-entropy-bytes-per-sec", Integer(1_048_576)),
            ("unowned-grace-secs", Integer(600)),
            ("tombstone-grace-secs", Integer(7200)),
            ("hint-retention-secs", Integer(3600)),
            ("hint-delivery-interval-ms", Integer(2000)),
            ("max-message-mb", Integer(32)),
            ("cluster-credential", Text(material.credential(&format!("node-{NODE_ID}"))?)),
            ("cluster-credential-file", Text(material.path(&format!("node-{NODE_ID}.credential")))),
            ("insecure-cluster", On),
        ],
        "pairdb-router" => vec![
            ("meta-addr", text("meta.example:7100")),
            ("request-timeout-ms", Integer(1500)),
            ("max-request-timeout-ms", Integer(20_000)),
            ("storage-timeout-ms", Integer(800)),
            ("read-speculative-after-ms", Integer(30)),
            ("max-inflight-per-node", Integer(100)),
            ("get-many-concurrency", Integer(8)),
            ("probe-interval-ms", Integer(250)),
            ("no-auth", On),
            ("redis-url", text("redis://redis.example:6379")),
            ("idempotency-retention-secs", Integer(3600)),
            ("idempotency-timeout-ms", Integer(250)),
            ("cluster-credential", Text(material.credential("router")?)),
            ("cluster-credential-file", Text(material.path("router.credential"))),
            ("insecure-cluster", On),
        ],
        other => bail!("unknown service {other}"),
    };
    values.extend(specific);
    Ok(values)
}

/// Settings that exclude each other: round `i` sets member `min(i, len - 1)` of each group.
fn exclusive_groups(binary: &str) -> &'static [&'static [&'static str]] {
    match binary {
        "pairdb-meta" => &[
            &["admin-token", "admin-token-file", "no-auth"],
            &["cluster-secret", "cluster-secret-file", "insecure-cluster"],
        ],
        _ => &[&["cluster-credential", "cluster-credential-file", "insecure-cluster"]],
    }
}

fn check_config(binary: &Path, args: &[String], env: &[(&str, &str)]) -> Result<Output> {
    Ok(Command::new(binary)
        .args(args)
        .arg("--check-config")
        .env_clear()
        .envs(env.iter().copied())
        .output()?)
}

fn stdout_of(output: &Output, what: &str) -> Result<String> {
    ensure!(
        output.status.success(),
        "{what}: --check-config failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout.clone())?)
}

#[test]
fn a_config_file_with_every_flag_prints_what_the_same_flags_print() -> Result<()> {
    let bin = pairdb_tests::binaries_dir()?;
    let material = Material::new()?;
    let scratch = tempfile::tempdir()?;
    for service in SERVICES {
        let binary = bin.join(service);
        let flags: Vec<Flag> =
            flags_of(&binary)?.into_iter().filter(|f| !NOT_SETTINGS.contains(&f.long.as_str())).collect();
        let known = known_values(service, &material)?;
        for name in known.keys() {
            ensure!(
                flags.iter().any(|f| f.long == *name),
                "{service}: the test sets --{name}, which no longer exists"
            );
        }
        let mut values: BTreeMap<String, Value> = BTreeMap::new();
        for flag in &flags {
            let value = match (known.get(flag.long.as_str()), &flag.default) {
                (Some(value), _) => value.clone(),
                (None, _) if !flag.takes_value => Value::On,
                (None, Some(default)) => Value::from_default(default),
                (None, None) => {
                    bail!("{service}: --{} has no default; give it a value in known_values", flag.long)
                }
            };
            values.insert(flag.long.clone(), value);
        }
        let groups = exclusive_groups(service);
        let rounds = groups.iter().map(|group| group.len()).max().unwrap_or(1);
        let mut covered = std::collections::BTreeSet::new();
        for round in 0..rounds {
            let left_out: Vec<&str> = groups
                .iter()
                .flat_map(|group| {
                    let chosen = group[round.min(group.len() - 1)];
                    group.iter().copied().filter(move |member| *member != chosen)
                })
                .collect();
            let chosen: Vec<(&String, &Value)> =
                values.iter().filter(|(name, _)| !left_out.contains(&name.as_str())).collect();
            let toml: String = chosen
                .iter()
                .map(|(name, value)| format!("{} = {}\n", name.replace('-', "_"), value.toml()))
                .collect();
            let file = scratch.path().join(format!("{service}-{round}.toml"));
            std::fs::write(&file, &toml)?;
            let args: Vec<String> = chosen.iter().flat_map(|(name, value)| value.args(name)).collect();
            let what = format!("{service} round {round}");
            let from_flags = stdout_of(&check_config(&binary, &args, &[])?, &format!("{what} (flags)"))?;
            let from_file = stdout_of(
                &check_config(&binary, &["--config".into(), file.display().to_string()], &[])?,
                &format!("{what} (file)\n{toml}"),
            )?;
            assert_eq!(from_file, from_flags, "{what}: the file and the flags disagree\nfile:\n{toml}");
            let from_env = stdout_of(
                &check_config(&binary, &[], &[("PAIRDB_CONFIG", &file.display().to_string())])?,
                &format!("{what} (PAIRDB_CONFIG)"),
            )?;
            assert_eq!(from_env, from_flags, "{what}: PAIRDB_CONFIG names the same file");
            // The values arrived (not just the defaults on both sides).
            for (name, value) in &chosen {
                if let Value::Integer(n) = value {
                    let field = format!("{}: {n},", name.replace('-', "_"));
                    assert!(from_file.contains(&field), "{what}: {field} not in\n{from_file}");
                }
            }
            assert!(from_file.contains("listen_addr resolves to "), "{what}: {from_file}");
            covered.extend(chosen.iter().map(|(name, _)| (*name).clone()));
        }
        let uncovered: Vec<&String> = values.keys().filter(|name| !covered.contains(*name)).collect();
        assert!(uncovered.is_empty(), "{service}: never set: {uncovered:?}");
    }
    Ok(())
}

#[test]
fn flags_beat_the_environment_which_beats_the_file() -> Result<()> {
    let router = pairdb_tests::binaries_dir()?.join("pairdb-router");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("router.toml");
    std::fs::write(
        &file,
        "insecure_cluster = true\nno_auth = true\nmax_connections = 100\nprobe_interval_ms = 250\n",
    )?;
    let config = file.display().to_string();
    let run = |args: &[&str], env: &[(&str, &str)]| -> Result<String> {
        let mut all: Vec<String> = vec!["--config".into(), config.clone()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        stdout_of(&check_config(&router, &all, env)?, &format!("{args:?} {env:?}"))
    };
    let defaults = stdout_of(&check_config(&router, &["--insecure-cluster".into()], &[])?, "defaults")?;
    assert!(defaults.contains("max_connections: 4096,") && defaults.contains("probe_interval_ms: 500,"));
    let file_only = run(&[], &[])?;
    assert!(
        file_only.contains("max_connections: 100,") && file_only.contains("no_auth: true,"),
        "{file_only}"
    );
    assert!(file_only.contains("probe_interval_ms: 250,"), "{file_only}");
    let env = [("PAIRDB_MAX_CONNECTIONS", "200"), ("PAIRDB_NO_AUTH", "false")];
    let with_env = run(&[], &env)?;
    assert!(with_env.contains("max_connections: 200,") && with_env.contains("no_auth: false,"), "{with_env}");
    assert!(
        with_env.contains("probe_interval_ms: 250,"),
        "the file still sets what the environment does not"
    );
    let with_flag = run(&["--max-connections", "300"], &env)?;
    assert!(with_flag.contains("max_connections: 300,"), "{with_flag}");
    Ok(())
}

/// `localhost:PORT` is resolved when the listener is bound, and `--check-config` says to what.
#[test]
fn a_host_name_listen_address_starts() -> Result<()> {
    let bin = pairdb_tests::binaries_dir()?;
    let port = pairdb_tests::free_addr()?.port();
    let data = tempfile::tempdir()?;
    let file = data.path().join("storage.toml");
    std::fs::write(
        &file,
        format!(
            "listen_addr = \"localhost:{port}\"\nnode_id = 1\ninsecure_cluster = true\ndata_dir = {:?}\n",
            data.path().join("node").display().to_string()
        ),
    )?;
    let storage = bin.join("pairdb-storage");
    let config = ["--config".to_owned(), file.display().to_string()];
    let printed = stdout_of(&check_config(&storage, &config, &[])?, "check")?;
    assert!(printed.contains(&format!("listen_addr: localhost:{port},")), "{printed}");
    let resolved =
        printed.lines().find_map(|l| l.strip_prefix("listen_addr resolves to ")).context("no resolution")?;
    let addrs: Vec<std::net::SocketAddr> =
        resolved.split(", ").map(str::parse).collect::<Result<_, _>>().context("resolved addresses")?;
    assert!(
        !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() && a.port() == port),
        "{resolved}"
    );

    let mut child =
        Command::new(&storage).args(&config).env_clear().stdin(std::process::Stdio::null()).spawn()?;
    let start = Instant::now();
    let live = loop {
        if let Some(status) = child.try_wait()? {
            bail!("pairdb-storage on localhost:{port} exited: {status}");
        }
        // Bound on the first address localhost resolves to that can be bound.
        if addrs.iter().any(|addr| matches!(pairdb_tests::http_get(*addr, "/health/live"), Ok((200, _)))) {
            break true;
        }
        if start.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill()?;
    child.wait()?;
    assert!(live, "pairdb-storage did not serve on localhost:{port}");
    Ok(())
}

/// What would fail at start fails `--check-config`, and the message names the field.
#[test]
fn check_config_refuses_what_would_fail_at_start() -> Result<()> {
    let bin = pairdb_tests::binaries_dir()?;
    let material = Material::new()?;
    let (cert, key, ca) = material.tls();
    let not_pem = material.path("not-pem.txt");
    let missing = material.path("does-not-exist.pem");
    let s = |items: &[&str]| items.iter().map(|item| (*item).to_owned()).collect::<Vec<String>>();
    let base = |service: &str| -> Vec<String> {
        match service {
            "pairdb-meta" => s(&["--no-auth", "--insecure-cluster"]),
            "pairdb-storage" => s(&["--node-id", "3", "--insecure-cluster"]),
            _ => s(&["--insecure-cluster"]),
        }
    };
    let mut cases: Vec<(&str, Vec<String>, &str)> = Vec::new();
    for service in SERVICES {
        cases.extend([
            (*service, s(&["--tls-cert", &cert]), "tls_key"),
            (*service, s(&["--tls-ca", &ca]), "tls_cert"),
            (*service, s(&["--tls-cert", &cert, "--tls-key", &key]), "tls_ca"),
            (*service, s(&["--tls-cert", &not_pem, "--tls-key", &key, "--tls-ca", &ca]), "tls_cert"),
            (*service, s(&["--tls-cert", &cert, "--tls-key", &cert, "--tls-ca", &ca]), "tls_key"),
            (*service, s(&["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &missing]), "tls_ca"),
            (*service, s(&["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &key]), "tls_ca"),
            (*service, s(&["--listen-addr", "not an address"]), "listen-addr"),
            (*service, s(&["--listen-addr", "localhost"]), "listen-addr"),
            (*service, s(&["--listen-addr", "no-such-host.invalid:7000"]), "listen_addr"),
        ]);
    }
    let node_credential = material.path(&format!("node-{NODE_ID}.credential"));
    cases.extend([
        ("pairdb-router", s(&["--meta-addr", "not an address"]), "meta_addr"),
        ("pairdb-router", s(&["--meta-addr", "meta:99999"]), "meta_addr"),
        ("pairdb-router", s(&["--meta-addr", "meta"]), "meta_addr"),
        ("pairdb-router", s(&["--redis-url", "redis://redis:notaport"]), "redis_url"),
        ("pairdb-storage", s(&["--meta-addr", "not an address"]), "meta_addr"),
        ("pairdb-storage", s(&["--advertise-addr", "storage 3:7200"]), "advertise_addr"),
        ("pairdb-meta", s(&["--admin-token-file", &missing]), "admin_token_file"),
    ]);
    for (service, args, field) in cases {
        let mut args = [base(service), args].concat();
        if args.iter().any(|a| a.starts_with("--admin-token")) {
            args.retain(|a| a != "--no-auth");
        }
        let output = check_config(&bin.join(service), &args, &[])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{service} {args:?} passed --check-config");
        assert!(stderr.contains(field), "{service} {args:?}: the error does not name {field}: {stderr}");
    }
    // Secret and credential files: missing, or not a secret / credential.
    let file_cases = [
        ("pairdb-meta", s(&["--no-auth", "--cluster-secret-file", &missing]), "cluster_secret_file"),
        ("pairdb-meta", s(&["--no-auth", "--cluster-secret-file", &not_pem]), "cluster_secret_file"),
        (
            "pairdb-storage",
            s(&["--node-id", "3", "--cluster-credential-file", &missing]),
            "cluster_credential_file",
        ),
        (
            "pairdb-storage",
            s(&["--node-id", "3", "--cluster-credential-file", &not_pem]),
            "cluster_credential_file",
        ),
        ("pairdb-router", s(&["--cluster-credential-file", &node_credential]), "cluster_credential"),
        ("pairdb-router", s(&["--cluster-credential-file", &not_pem]), "cluster_credential_file"),
    ];
    for (service, args, field) in file_cases {
        let output = check_config(&bin.join(service), &args, &[])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{service} {args:?} passed --check-config");
        assert!(stderr.contains(field), "{service} {args:?}: the error does not name {field}: {stderr}");
    }
    Ok(())
}

#[test]
fn bad_config_files_are_refused_naming_key_and_file() -> Result<()> {
    let router = pairdb_tests::binaries_dir()?.join("pairdb-router");
    let dir = tempfile::tempdir()?;
    let cases = [
        ("insecure_cluster = true\nlisten_adress = \"0.0.0.0:7000\"\n", "unknown key `listen_adress`"),
        ("insecure_cluster = true\nmeta-addr = \"meta:7100\"\n", "write `meta_addr`"),
        (
            "insecure_cluster = true\nmax_connections = \"100\"\n",
            "max_connections: expected an integer, found a string",
        ),
        ("insecure_cluster = \"yes\"\n", "insecure_cluster: expected a boolean"),
        ("insecure_cluster = true\nlog_format = \"xml\"\n", "log_format: invalid value \"xml\""),
        ("insecure_cluster = true\n[tls]\ntls_cert = \"x\"\n", "unknown key `tls`"),
        ("insecure_cluster = true\nmeta_addr = \"not an address\"\n", "meta_addr"),
        ("insecure_cluster = true\nlisten_addr = \"localhost\"\n", "listen_addr: invalid value"),
        ("insecure_cluster = true\ncheck_config = true\n", "check_config: only on the command line"),
        ("insecure_cluster = \n", "not valid TOML"),
    ];
    for (index, (text, expected)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("bad-{index}.toml"));
        std::fs::write(&file, text)?;
        let output = check_config(&router, &["--config".into(), file.display().to_string()], &[])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text:?} passed");
        assert!(stderr.contains(expected), "{text:?}: expected {expected:?} in: {stderr}");
        if !expected.starts_with("meta_addr") {
            assert!(
                stderr.contains(&file.display().to_string()),
                "{text:?}: the file is not named: {stderr}"
            );
        }
    }
    let output =
        check_config(&router, &["--config".into(), dir.path().join("none.toml").display().to_string()], &[])?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("none.toml"));
    Ok(())
}

/// The examples in `deploy/config/` load, with their secret paths pointed at test files.
#[test]
fn the_example_config_files_load() -> Result<()> {
    let bin = pairdb_tests::binaries_dir()?;
    let material = Material::new()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    let secrets = material.dir.path().join("secrets");
    std::fs::create_dir_all(&secrets)?;
    let signer = Signer::from_secret(&material.secret)?;
    std::fs::write(secrets.join("cluster-secret"), &material.secret)?;
    std::fs::write(secrets.join("admin-token"), "example-admin-token")?;
    std::fs::write(secrets.join("router.credential"), signer.issue(Principal::Router).as_str())?;
    std::fs::write(
        secrets.join("node-1.credential"),
        signer.issue(Principal::Node(pairdb_core::ring::NodeId(1))).as_str(),
    )?;
    for (service, name) in
        [("pairdb-meta", "meta.toml"), ("pairdb-storage", "storage.toml"), ("pairdb-router", "router.toml")]
    {
        let text =
            std::fs::read_to_string(root.join(name)).with_context(|| format!("deploy/config/{name}"))?;
        assert!(text.contains("/etc/pairdb/secrets/"), "{name} reads its secrets from /etc/pairdb/secrets");
        let local = material.dir.path().join(name);
        std::fs::write(&local, text.replace("/etc/pairdb/secrets", &secrets.display().to_string()))?;
        let output =
            check_config(&bin.join(service), &["--config".into(), local.display().to_string()], &[])?;
        let printed = stdout_of(&output, &format!("deploy/config/{name}"))?;
        assert!(printed.contains("log_format: Json"), "{name}: {printed}");
    }
    Ok(())
}
