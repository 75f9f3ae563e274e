//! The optional TOML config file of the service binaries: `--config FILE` or `PAIRDB_CONFIG=FILE`.
//!
//! Every flag of a binary can be set in the file, under its long name in snake_case (`--listen-addr`
//! → `listen_addr`, `--tls-cert` → `tls_cert`). Flags that a binary flattens in from shared groups
//! (listener limits, TLS, cluster authentication) are flat keys like any other: there are no tables.
//!
//! How: the file's values become the defaults of the matching clap arguments of the binary's
//! [`clap::Command`] before the command line is parsed, so precedence is clap's own and holds for every
//! flag, present and future: **flags > `PAIRDB_*` environment > config file > built-in defaults**.
//!
//! Types follow the flag: booleans for on/off flags (`no_auth = true`), integers for numeric settings,
//! strings for everything else (addresses, paths, URLs, enum values such as `sync = "periodic"`) and
//! arrays for repeated flags. Each value goes through the flag's own parser when the file is read.
//! An unknown key (including a kebab-case spelling), a table, a wrong type or a value the flag would
//! refuse is an error naming the key, the file and its line. `config` and `check_config` are
//! command-line only.
//!
//! An on/off flag set to `true` in the file cannot be switched off by a flag (clap's flags have no
//! `--no-…` form); its environment variable can (`PAIRDB_NO_AUTH=false`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

/// The command-line flag naming the config file (its argument id and long name).
pub const CONFIG_FLAG: &str = "config";
/// The environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "PAIRDB_CONFIG";
/// Keys that only make sense on the command line.
const COMMAND_LINE_ONLY: &[&str] = &[CONFIG_FLAG, "check_config"];

/// A config file that cannot be used; the message names the file and, for a bad entry, its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("config: cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config: {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config: {path}:{line}: unknown key `{key}`: {hint}")]
    UnknownKey { path: PathBuf, line: usize, key: String, hint: String },
    #[error("config: {path}:{line}: {key}: expected {expected}, found {found}")]
    WrongType { path: PathBuf, line: usize, key: String, expected: &'static str, found: &'static str },
    #[error("config: {path}:{line}: {key}: {problem}")]
    InvalidValue { path: PathBuf, line: usize, key: String, problem: String },
}

/// Why a binary's configuration could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// A command-line or environment problem, or `--help` / `--version` (clap renders and exits).
    #[error(transparent)]
    Clap(#[from] clap::Error),
}

/// Parses the process's arguments into `C`, with the config file from `--config` or
/// `PAIRDB_CONFIG` under them. Exits like [`clap::Parser::parse`] on errors, `--help` and
/// `--version`; a bad config file exits with status 2 and a message naming the key and file.
pub fn parse<C: clap::Parser>() -> C {
    match try_parse_from(std::env::args_os(), std::env::var_os(CONFIG_ENV)) {
        Ok(config) => config,
        Err(LoadError::Clap(error)) => error.exit(),
        Err(LoadError::File(error)) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    }
}

/// [`parse`] over explicit arguments (`args[0]` is the binary's name) and the value of
/// `PAIRDB_CONFIG` (`--config` wins over it). Other `PAIRDB_*` variables are read by clap from the
/// process environment as usual.
pub fn try_parse_from<C, I, T>(args: I, env_config: Option<OsString>) -> Result<C, LoadError>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = C::command();
    if let Some(path) = config_path(&args).or(env_config.filter(|value| !value.is_empty())) {
        let path = PathBuf::from(path);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigFileError::Read { path: path.clone(), source })?;
        command = apply(command, &path, &text)?;
    }
    let mut matches = command.try_get_matches_from_mut(args)?;
    C::from_arg_matches_mut(&mut matches).map_err(|error| error.format(&mut command).into())
}

/// The value of `--config FILE` / `--config=FILE` (before any `--`). Found before clap parses, since
/// the file changes what clap parses with.
fn config_path(args: &[OsString]) -> Option<OsString> {
    let flag = format!("--{CONFIG_FLAG}");
    let with_value = format!("--{CONFIG_FLAG}=");
    let mut found = None;
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let Some(text) = arg.to_str() else { continue };
        if text == "--" {
            break;
        }
        if text == flag {
            found = rest.next().cloned();
        } else if let Some(value) = text.strip_prefix(&with_value) {
            found = Some(OsString::from(value));
        }
    }
    found
}

/// The TOML type a flag's value takes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Boolean,
    Integer,
    Float,
    String,
}

impl Kind {
    fn of(arg: &Arg) -> Kind {
        use std::any::TypeId;
        if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            return Kind::Boolean;
        }
        if matches!(arg.get_action(), ArgAction::Count) {
            return Kind::Integer;
        }
        let parsed = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<u128>(),
            TypeId::of::<usize>(),
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<i128>(),
            TypeId::of::<isize>(),
        ];
        if integers.iter().any(|id| parsed == *id) {
            Kind::Integer
        } else if parsed == TypeId::of::<f64>() || parsed == TypeId::of::<f32>() {
            Kind::Float
        } else {
            Kind::String
        }
    }

    fn expected(self, repeated: bool) -> &'static str {
        match (self, repeated) {
            (Kind::Boolean, _) => "a boolean",
            (Kind::Integer, false) => "an integer",
            (Kind::Integer, true) => "an array of integers",
            (Kind::Float, false) => "a number",
            (Kind::Float, true) => "an array of numbers",
            (Kind::String, false) => "a string",
            (Kind::String, true) => "an array of strings",
        }
    }
}

fn type_name(value: &toml_edit::Value) -> &'static str {
    use toml_edit::Value;
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}

/// One scalar as the text clap would get on the command line, if its TOML type fits `kind`.
fn scalar_text(value: &toml_edit::Value, kind: Kind) -> Option<String> {
    use toml_edit::Value;
    match (value, kind) {
        (Value::Boolean(b), Kind::Boolean) => Some(b.value().to_string()),
        (Value::Integer(i), Kind::Integer | Kind::Float) => Some(i.value().to_string()),
        (Value::Float(f), Kind::Float) => Some(f.value().to_string()),
        (Value::String(s), Kind::String) => Some(s.value().clone()),
        _ => None,
    }
}

/// 1-based line of a byte offset.
fn line_at(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    span.map_or(0, |span| text[..span.start.min(text.len())].matches('\n').count() + 1)
}

fn key_of(arg: &Arg) -> Option<String> {
    arg.get_long().map(|long| long.replace('-', "_"))
}

/// Sets the file's values as the defaults of `command`'s arguments.
fn apply(mut command: Command, path: &Path, text: &str) -> Result<Command, ConfigFileError> {
    // The parser's own Display quotes the offending line, which may hold a secret: say where instead.
    let document = toml_edit::Document::parse(text).map_err(|error| ConfigFileError::Syntax {
        path: path.to_owned(),
        message: format!("line {}: {}", line_at(text, error.span()), error.message().trim_end()),
    })?;
    let table = document.as_table();
    for (key, item) in table.iter() {
        let line = line_at(text, table.key(key).and_then(toml_edit::Key::span));
        let at = |problem: String| ConfigFileError::InvalidValue {
            path: path.to_owned(),
            line,
            key: key.to_owned(),
            problem,
        };
        if COMMAND_LINE_ONLY.contains(&key) {
            return Err(at("only on the command line".to_owned()));
        }
        let Some(arg) = command.get_arguments().find(|arg| key_of(arg).as_deref() == Some(key)) else {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_owned(),
                line,
                key: key.to_owned(),
                hint: unknown_key_hint(&command, key),
            });
        };
        let kind = Kind::of(arg);
        let repeated = matches!(arg.get_action(), ArgAction::Append);
        let wrong_type = |found: &'static str| ConfigFileError::WrongType {
            path: path.to_owned(),
            line,
            key: key.to_owned(),
            expected: kind.expected(repeated),
            found,
        };
        let Some(value) = item.as_value() else {
            return Err(wrong_type("a table (keys are flat: no [sections])"));
        };
        let values: Vec<String> = match (value, repeated) {
            (toml_edit::Value::Array(array), true) => array
                .iter()
                .map(|element| scalar_text(element, kind).ok_or_else(|| wrong_type(type_name(element))))
                .collect::<Result<_, _>>()?,
            (value, false) => vec![scalar_text(value, kind).ok_or_else(|| wrong_type(type_name(value)))?],
            (value, true) => return Err(wrong_type(type_name(value))),
        };
        if kind != Kind::Boolean {
            for value in &values {
                check_value(arg, value).map_err(at)?;
            }
        }
        let id = arg.get_id().clone();
        command = command.mut_arg(id, |arg| arg.required(false).default_values(values));
    }
    Ok(command)
}

fn unknown_key_hint(command: &Command, key: &str) -> String {
    let snake = key.replace('-', "_");
    let known = command.get_arguments().any(|arg| key_of(arg).as_deref() == Some(snake.as_str()));
    if snake != key && known {
        format!("keys are snake_case: write `{snake}`")
    } else {
        format!("not a setting of {} (keys are its flags' long names in snake_case)", command.get_name())
    }
}

/// Runs `value` through the flag's own value parser, so a bad value is reported against the file
/// rather than as a command-line error.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let probe = Command::new("config-file")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(
            Arg::new("value")
                .long("value")
                .action(ArgAction::Set)
                .allow_hyphen_values(true)
                .value_parser(arg.get_value_parser().clone()),
        );
    let Err(error) = probe.try_get_matches_from([format!("--value={value}")]) else {
        return Ok(());
    };
    let problem = match std::error::Error::source(&error) {
        Some(source) => source.to_string(),
        None => match arg.get_value_parser().possible_values() {
            Some(possible) => {
                let names: Vec<String> = possible.map(|p| p.get_name().to_owned()).collect();
                format!("must be one of {}", names.join(", "))
            }
            None => error.kind().to_string(),
        },
    };
    Err(format!("invalid value {value:?}: {problem}"))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
    enum Mode {
        Fast,
        Safe,
    }

    #[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
    struct Group {
        #[arg(long, default_value_t = 10)]
        group_limit: u32,
    }

    /// Every shape of flag the binaries have. `package` reads `CARGO_PKG_NAME`, which cargo sets for
    /// the test process: an environment value without `set_var` (unsafe, and forbidden here).
    #[derive(Debug, Clone, PartialEq, clap::Parser)]
    #[command(name = "demo")]
    struct Demo {
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, env = "CARGO_PKG_NAME", default_value = "built-in")]
        package: String,
        #[arg(long)]
        switch: bool,
        #[arg(long)]
        maybe: Option<String>,
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long)]
        item: Vec<String>,
        #[arg(long, value_enum, default_value = "safe")]
        mode: Mode,
        #[arg(long, default_value_t = 0.5)]
        ratio: f64,
        #[arg(long)]
        required_id: u32,
        #[command(flatten)]
        group: Group,
        #[arg(long, env = "PAIRDB_CONFIG_TEST_UNSET")]
        config: Option<PathBuf>,
        #[arg(long)]
        check_config: bool,
    }

    struct File(tempfile::NamedTempFile);

    fn file(text: &str) -> File {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        File(file)
    }

    impl File {
        fn path(&self) -> String {
            self.0.path().display().to_string()
        }

        fn parse(&self, args: &[&str]) -> Result<Demo, LoadError> {
            let path = self.path();
            let argv = [&["demo", "--config", path.as_str()], args].concat();
            try_parse_from(argv, None)
        }
    }

    fn file_error(result: Result<Demo, LoadError>) -> ConfigFileError {
        match result {
            Err(LoadError::File(error)) => error,
            other => panic!("expected a config file error, got {other:?}"),
        }
    }

    #[test]
    fn without_a_file_the_command_line_alone_counts() {
        let demo: Demo = try_parse_from(["demo", "--required-id", "3"], None).unwrap();
        assert_eq!(demo.count, 1);
        assert_eq!(demo.required_id, 3);
        assert_eq!(demo.mode, Mode::Safe);
        assert!(demo.item.is_empty());
        assert!(matches!(try_parse_from::<Demo, _, _>(["demo"], None), Err(LoadError::Clap(_))));
    }

    #[test]
    fn the_file_sets_every_kind_of_flag() {
        let config = file(
            "count = 7\nswitch = true\nmaybe = \"yes\"\npath = \"/data\"\nitem = [\"a\", \"b\"]\n\
             mode = \"fast\"\nratio = 2\nrequired_id = 9\ngroup_limit = 20\n",
        );
        let demo = config.parse(&[]).unwrap();
        assert_eq!(demo.count, 7);
        assert!(demo.switch);
        assert_eq!(demo.maybe.as_deref(), Some("yes"));
        assert_eq!(demo.path, Some(PathBuf::from("/data")));
        assert_eq!(demo.item, ["a", "b"]);
        assert_eq!(demo.mode, Mode::Fast);
        assert!((demo.ratio - 2.0).abs() < f64::EPSILON);
        assert_eq!(demo.required_id, 9, "a required flag is satisfied by the file");
        assert_eq!(demo.group.group_limit, 20, "flattened groups are flat keys");
        assert_eq!(demo.config, Some(PathBuf::from(config.path())));
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_defaults() {
        let package = std::env::var("CARGO_PKG_NAME").expect("cargo sets CARGO_PKG_NAME for tests");
        assert_eq!(package, "pairdb-service");
        let config = file("package = \"from-file\"\ncount = 5\nrequired_id = 1\n");
        // Default < file: `count` has a built-in default of 1.
        assert_eq!(config.parse(&[]).unwrap().count, 5);
        // File < environment: CARGO_PKG_NAME is set.
        assert_eq!(config.parse(&[]).unwrap().package, package);
        // Environment < flag.
        assert_eq!(config.parse(&["--package", "from-flag"]).unwrap().package, "from-flag");
        assert_eq!(config.parse(&["--count", "6"]).unwrap().count, 6);
        // Repeated flags replace the file's list rather than adding to it.
        let lists = file("required_id = 1\nitem = [\"a\", \"b\"]\n");
        assert_eq!(lists.parse(&["--item", "c"]).unwrap().item, ["c"]);
        // Defaults stay where neither says anything.
        assert_eq!(config.parse(&[]).unwrap().group.group_limit, 10);
    }

    #[test]
    fn the_file_comes_from_the_environment_unless_a_flag_names_one() {
        let from_env = file("required_id = 4\n");
        let from_flag = file("required_id = 5\n");
        let env = Some(OsString::from(from_env.path()));
        let demo: Demo = try_parse_from(["demo"], env.clone()).unwrap();
        assert_eq!(demo.required_id, 4);
        let demo: Demo = try_parse_from(["demo", &format!("--config={}", from_flag.path())], env).unwrap();
        assert_eq!(demo.required_id, 5);
        // After `--`, `--config` is not a flag.
        assert!(config_path(&["demo".into(), "--".into(), "--config".into(), "x".into()]).is_none());
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key_and_file() {
        let config = file("required_id = 1\n\nlisten_adress = \"x\"\n");
        let error = file_error(config.parse(&[]));
        assert!(matches!(&error, ConfigFileError::UnknownKey { key, line: 3, .. } if key == "listen_adress"));
        let message = error.to_string();
        assert!(message.contains("listen_adress") && message.contains(&config.path()), "{message}");

        let kebab = file("required-id = 1\n");
        let message = file_error(kebab.parse(&[])).to_string();
        assert!(message.contains("write `required_id`"), "{message}");

        let table = file("[group]\ngroup_limit = 3\n");
        assert!(
            matches!(file_error(table.parse(&[])), ConfigFileError::UnknownKey { key, .. } if key == "group")
        );
        let nested = file("group_limit = { value = 3 }\n");
        let error = file_error(nested.parse(&["--required-id", "1"]));
        assert!(matches!(&error, ConfigFileError::WrongType { key, .. } if key == "group_limit"), "{error}");

        for only_flag in ["config = \"x\"\n", "check_config = true\n"] {
            let error = file_error(file(only_flag).parse(&["--required-id", "1"]));
            assert!(error.to_string().contains("only on the command line"), "{error}");
        }
    }

    #[test]
    fn wrong_types_and_values_are_errors_naming_the_key() {
        let cases = [
            ("count = \"7\"\n", "count", "expected an integer, found a string"),
            ("switch = \"yes\"\n", "switch", "expected a boolean, found a string"),
            ("maybe = 3\n", "maybe", "expected a string, found an integer"),
            ("item = \"a\"\n", "item", "expected an array of strings, found a string"),
            ("item = [1]\n", "item", "expected an array of strings, found an integer"),
            ("count = -1\n", "count", "invalid value \"-1\""),
            ("mode = \"quick\"\n", "mode", "must be one of fast, safe"),
            ("group_limit = 5000000000\n", "group_limit", "invalid value"),
        ];
        for (text, key, expected) in cases {
            let config = file(text);
            let error = file_error(config.parse(&["--required-id", "1"]));
            let message = error.to_string();
            assert!(message.contains(&format!(":1: {key}: ")), "{text}: {message}");
            assert!(message.contains(expected), "{text}: {message}");
            assert!(message.contains(&config.path()), "{text}: {message}");
        }
        let broken = file("count = \n");
        assert!(matches!(file_error(broken.parse(&[])), ConfigFileError::Syntax { .. }));
        // A syntax error names the line but never quotes it: it may hold a secret.
        let leaky = file("count = 1\nadmin_token = \"s3cret-value\n");
        let message = file_error(leaky.parse(&[])).to_string();
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        let missing = try_parse_from::<Demo, _, _>(["demo", "--config", "/nonexistent/pairdb.toml"], None);
        assert!(matches!(file_error(missing), ConfigFileError::Read { .. }));
    }
}
