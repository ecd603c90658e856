//! Configuration: turns built-in defaults, the caller's mode defaults, the TOML file and the
//! `BATCHLY_<SECTION>_<KEY>` environment variables (in that order, later wins) into one
//! validated, typed [`Config`], and remembers where every value came from so `check-config`
//! can show it. It owns the list of settings (`KEYS`) and every rule about their values, so
//! the rest of the agent never re-checks a setting. It reads exactly one file and must never do
//! anything else to the system: no directories created, no sockets opened, no AWS settings or
//! credentials read (those follow the AWS SDK's own chain), and never a secret value printed,
//! not even inside an error message.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `run` and `check-config` look when no `--config` is given (operator contract).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/batchly/agent.toml";

const ENV_PREFIX: &str = "BATCHLY_";
/// Variables that belong to the test tooling, not to the agent's settings.
const ENV_IGNORED_PREFIXES: &[&str] = &["BATCHLY_AGENT_BIN", "BATCHLY_TEST_"];
/// How a value from a caller's mode defaults is labelled; `dev` is the only mode that has any.
const MODE_DEFAULT_LABEL: &str = "dev default";

/// Longest duration any `*_s` key accepts, so that deadline arithmetic (`Instant + Duration`)
/// can never overflow: one year.
const MAX_SECONDS: u64 = 365 * 24 * 60 * 60;
// CloudWatch Logs CreateLogGroup: logGroupName is 1..=512 characters of [a-zA-Z0-9_\-/.#].
const LOG_GROUP_NAME_MAX_LEN: usize = 512;
// CloudWatch PutMetricData: Namespace is 1..=255 printable ASCII characters, pattern [^:].*
const METRICS_NAMESPACE_MAX_LEN: usize = 255;
// CloudWatch PutMetricData: namespaces starting with "AWS/" are reserved for AWS services.
const RESERVED_METRICS_NAMESPACE_PREFIX: &str = "AWS/";

/// The effective configuration: every value checked, durations as `Duration`, sizes in bytes,
/// paths absolute. Only [`Config::load`] makes one.
#[derive(Debug, Clone)]
pub struct Config {
    pub queue: QueueConfig,
    pub jobs: JobsConfig,
    pub signing: SigningConfig,
    pub logs: LogsConfig,
    pub metrics: MetricsConfig,
    pub drain: DrainConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub agent: AgentConfig,
    /// Where each value came from, one entry per [`KEYS`] entry, in the same order.
    origins: Vec<Origin>,
    file: FileState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Job queues in priority order; empty when not configured (`run` refuses that).
    pub urls: Vec<String>,
    pub events_url: Option<String>,
    pub dead_letter_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsConfig {
    pub max_concurrent: usize,
    pub default_timeout: Duration,
    pub kill_grace: Duration,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub work_dir: PathBuf,
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    /// Releases that are not failures (exit 75, drains, agent-side
    /// trouble) a job may have before it is dead-lettered as
    /// `agent_gave_up`.
    pub max_requeues: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningConfig {
    pub keys_file: PathBuf,
    pub skew: Duration,
    pub max_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsConfig {
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainConfig {
    pub margin: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub log_format: LogFormat,
    pub log_level: String,
    pub instance_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Where the file comes from: an explicit --config path must exist; the default path may be
/// absent (then defaults + environment apply, and render() says so).
#[derive(Debug, Clone, Copy)]
pub enum ConfigFile<'a> {
    Explicit(&'a Path),
    Default(&'a Path),
    None,
}

/// Every message names the key (or file, or variable), the problem and where the value came
/// from, because users only ever see `Display`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config file {}: invalid TOML{location}: {message}", path.display())]
    InvalidToml {
        path: PathBuf,
        /// `" at line L, column C"`, or empty when the parser gave no position.
        location: String,
        message: String,
        /// Boxed: toml's error is large, and every `Result` here carries a `ConfigError`.
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{section}: unknown section ({origin}){suggestion}")]
    UnknownSection {
        section: String,
        origin: String,
        /// `"; did you mean X?"`, or empty.
        suggestion: String,
    },
    #[error("{key}: unknown key ({origin}){suggestion}")]
    UnknownKey {
        key: String,
        origin: String,
        suggestion: String,
    },
    #[error("{variable}: unknown setting (from the environment){suggestion}")]
    UnknownVariable {
        variable: String,
        suggestion: String,
    },
    #[error("{key}: {problem} ({origin})")]
    InvalidValue {
        key: String,
        problem: String,
        origin: String,
    },
    #[error("queue.url: required by `run`; set it in {place} or BATCHLY_QUEUE_URL")]
    QueueUrlMissing { place: String },
}

/// Where one value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Builtin,
    Mode,
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin => f.write_str("default"),
            Origin::Mode => f.write_str(MODE_DEFAULT_LABEL),
            Origin::File(path) => write!(f, "from {}", printable(&path.display().to_string())),
            Origin::Env(variable) => write!(f, "from {}", printable(variable)),
        }
    }
}

#[derive(Debug, Clone)]
enum FileState {
    Loaded(PathBuf),
    Absent(PathBuf),
    NotUsed,
}

// ---------------------------------------------------------------------------------------------
// The schema. Adding a setting: one entry in KEYS, its field in the section struct, and the
// field's placeholder in `Config::blank` (every placeholder is overwritten by the default).
// ---------------------------------------------------------------------------------------------

/// One setting: its dotted name (`section.key`; sections contain no underscore, so the
/// environment name `BATCHLY_SECTION_KEY` maps back unambiguously), how its value is parsed and
/// where it is stored, its built-in default, a one-line description, and whether it is secret.
struct Key {
    name: &'static str,
    slot: Slot,
    default: Builtin,
    doc: &'static str,
    secret: bool,
}

enum Builtin {
    /// No default: the setting is optional, or required only by some commands.
    Unset,
    /// Parsed exactly like a value from the environment.
    Value(&'static str),
    /// The number of CPUs this process may use.
    CpuCount,
}

/// What a key's value is and which field of [`Config`] holds it.
enum Slot {
    QueueUrls(Field<Vec<String>>),
    OptionalUrl(Field<Option<String>>),
    Count {
        positive: bool,
        field: Field<usize>,
    },
    Seconds {
        positive: bool,
        field: Field<Duration>,
    },
    Size(Field<u64>),
    Path(Field<PathBuf>),
    Text {
        /// Returns what was expected when the text is not acceptable.
        check: fn(&str) -> Result<(), &'static str>,
        field: Field<String>,
    },
    OptionalText(Field<Option<String>>),
    LogFormat(Field<LogFormat>),
}

struct Field<T: 'static> {
    get: fn(&Config) -> &T,
    set: fn(&mut Config) -> &mut T,
}

macro_rules! field {
    ($section:ident . $name:ident) => {
        Field {
            get: |config| &config.$section.$name,
            set: |config| &mut config.$section.$name,
        }
    };
}

static KEYS: &[Key] = &[
    Key {
        name: "queue.url",
        slot: Slot::QueueUrls(field!(queue.urls)),
        default: Builtin::Unset,
        doc: "SQS queue URL to pull jobs from, or an array of URLs in priority order",
        secret: false,
    },
    Key {
        name: "queue.events_url",
        slot: Slot::OptionalUrl(field!(queue.events_url)),
        default: Builtin::Unset,
        doc: "SQS queue URL where job events are published",
        secret: false,
    },
    Key {
        name: "queue.dead_letter_url",
        slot: Slot::OptionalUrl(field!(queue.dead_letter_url)),
        default: Builtin::Unset,
        doc: "SQS queue URL for rejected messages (unset: the queue's RedrivePolicy target)",
        secret: false,
    },
    Key {
        name: "jobs.max_concurrent",
        slot: Slot::Count {
            positive: true,
            field: field!(jobs.max_concurrent),
        },
        default: Builtin::CpuCount,
        doc: "job slots",
        secret: false,
    },
    Key {
        name: "jobs.max_requeues",
        slot: Slot::Count {
            positive: true,
            field: field!(jobs.max_requeues),
        },
        default: Builtin::Value("20"),
        doc: "releases that are not failures (exit 75, drain, agent-side trouble) a job may have before it is dead-lettered as agent_gave_up",
        secret: false,
    },
    Key {
        name: "jobs.default_timeout_s",
        slot: Slot::Seconds {
            positive: true,
            field: field!(jobs.default_timeout),
        },
        default: Builtin::Value("3600"),
        doc: "timeout in seconds when a job spec gives none",
        secret: false,
    },
    Key {
        name: "jobs.kill_grace_s",
        slot: Slot::Seconds {
            positive: false,
            field: field!(jobs.kill_grace),
        },
        default: Builtin::Value("10"),
        doc: "seconds between SIGTERM and SIGKILL when a job times out",
        secret: false,
    },
    Key {
        name: "jobs.retry_backoff_s",
        slot: Slot::Seconds {
            positive: false,
            field: field!(jobs.retry_backoff),
        },
        default: Builtin::Value("10"),
        doc: "delay in seconds before the first retry; doubles each attempt, with jitter",
        secret: false,
    },
    Key {
        name: "jobs.retry_backoff_max_s",
        slot: Slot::Seconds {
            positive: false,
            field: field!(jobs.retry_backoff_max),
        },
        default: Builtin::Value("900"),
        doc: "longest retry delay in seconds",
        secret: false,
    },
    Key {
        name: "jobs.work_dir",
        slot: Slot::Path(field!(jobs.work_dir)),
        default: Builtin::Value("/var/lib/batchly/work"),
        doc: "directory holding each job's working directory",
        secret: false,
    },
    Key {
        name: "jobs.log_dir",
        slot: Slot::Path(field!(jobs.log_dir)),
        default: Builtin::Value("/var/lib/batchly/logs"),
        doc: "directory holding each job's local output",
        secret: false,
    },
    Key {
        name: "jobs.log_max_bytes",
        slot: Slot::Size(field!(jobs.log_max_bytes)),
        default: Builtin::Value("256MiB"),
        doc: "most output kept per job: bytes, or a size such as 64MiB or 10MB",
        secret: false,
    },
    Key {
        name: "signing.keys_file",
        slot: Slot::Path(field!(signing.keys_file)),
        default: Builtin::Value("/etc/batchly/keys.toml"),
        doc: "verification keys for job envelopes",
        secret: false,
    },
    Key {
        name: "signing.skew_s",
        slot: Slot::Seconds {
            positive: false,
            field: field!(signing.skew),
        },
        default: Builtin::Value("60"),
        doc: "clock skew in seconds tolerated when checking envelope times",
        secret: false,
    },
    Key {
        name: "signing.max_ttl_s",
        slot: Slot::Seconds {
            positive: true,
            field: field!(signing.max_ttl),
        },
        default: Builtin::Value("604800"),
        doc: "longest envelope lifetime in seconds the agent accepts",
        secret: false,
    },
    Key {
        name: "logs.group",
        slot: Slot::Text {
            check: check_log_group_name,
            field: field!(logs.group),
        },
        default: Builtin::Value("/batchly/jobs"),
        doc: "CloudWatch Logs group for job output and agent logs",
        secret: false,
    },
    Key {
        name: "metrics.namespace",
        slot: Slot::Text {
            check: check_metrics_namespace,
            field: field!(metrics.namespace),
        },
        default: Builtin::Value("Batchly/Agent"),
        doc: "CloudWatch metrics namespace",
        secret: false,
    },
    Key {
        name: "drain.margin_s",
        slot: Slot::Seconds {
            positive: false,
            field: field!(drain.margin),
        },
        default: Builtin::Value("15"),
        doc: "seconds before a spot termination by which messages are released and telemetry flushed",
        secret: false,
    },
    Key {
        name: "drain.timeout_s",
        slot: Slot::Seconds {
            positive: true,
            field: field!(drain.timeout),
        },
        default: Builtin::Value("90"),
        doc: "longest a SIGTERM or `drain` drain may take before remaining jobs are killed and released",
        secret: false,
    },
    Key {
        name: "admin.socket",
        slot: Slot::Path(field!(admin.socket)),
        default: Builtin::Value("/run/batchly/agent.sock"),
        doc: "local socket for `status` and `drain`",
        secret: false,
    },
    Key {
        name: "state.dir",
        slot: Slot::Path(field!(state.dir)),
        default: Builtin::Value("/var/lib/batchly/state"),
        doc: "directory for state that survives a restart",
        secret: false,
    },
    Key {
        name: "agent.log_format",
        slot: Slot::LogFormat(field!(agent.log_format)),
        default: Builtin::Value("text"),
        doc: "agent log format: \"text\" or \"json\"",
        secret: false,
    },
    Key {
        name: "agent.log_level",
        slot: Slot::Text {
            check: check_non_empty,
            field: field!(agent.log_level),
        },
        default: Builtin::Value("info"),
        doc: "tracing filter, such as \"info\" or \"batchly_agent=debug\"",
        secret: false,
    },
    Key {
        name: "agent.instance_id",
        slot: Slot::OptionalText(field!(agent.instance_id)),
        default: Builtin::Unset,
        doc: "the instance_id in events (unset: host-<hostname>; read from instance metadata in a later release)",
        secret: false,
    },
];

fn find_key(name: &str) -> Option<(usize, &'static Key)> {
    KEYS.iter().enumerate().find(|(_, key)| key.name == name)
}

fn env_name(key_name: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key_name.replace('.', "_").to_ascii_uppercase()
    )
}

fn split_name(key_name: &str) -> (&str, &str) {
    key_name.split_once('.').unwrap_or(("", key_name))
}

/// Section names in schema order, each once.
fn sections() -> Vec<&'static str> {
    let mut sections: Vec<&'static str> = Vec::new();
    for key in KEYS {
        let (section, _) = split_name(key.name);
        if !sections.contains(&section) {
            sections.push(section);
        }
    }
    sections
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Layers, lowest first: built-in defaults, `mode_defaults` (values parsed like environment
    /// values), the file, then `BATCHLY_*` variables from `env` (the whole process environment).
    pub fn load(
        file: ConfigFile<'_>,
        env: &[(String, String)],
        mode_defaults: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        let mut config = Config::blank();
        config.apply_builtin_defaults()?;
        for (name, value) in mode_defaults {
            let Some(entry) = find_key(name) else {
                return Err(ConfigError::UnknownKey {
                    key: (*name).to_string(),
                    origin: Origin::Mode.to_string(),
                    suggestion: suggest_key(name),
                });
            };
            config.set(entry, Input::Text(value), Origin::Mode)?;
        }
        if let Some((path, text)) = config.read_file(file)? {
            config.apply_file(&path, &text)?;
        }
        config.apply_env(env)?;
        config.check_across_keys()?;
        Ok(config)
    }

    /// Error unless queue.url is set: ``queue.url: required by `run`; set it in <file> or
    /// BATCHLY_QUEUE_URL``
    pub fn require_queue(&self) -> Result<(), ConfigError> {
        if !self.queue.urls.is_empty() {
            return Ok(());
        }
        let place = match &self.file {
            FileState::Loaded(path) | FileState::Absent(path) => path.display().to_string(),
            FileState::NotUsed => "a config file".to_string(),
        };
        Err(ConfigError::QueueUrlMissing { place })
    }

    /// The file the values were read from; `None` when no file was read.
    pub fn source_file(&self) -> Option<&Path> {
        match &self.file {
            FileState::Loaded(path) => Some(path),
            FileState::Absent(_) | FileState::NotUsed => None,
        }
    }

    /// Effective configuration as TOML text, each value annotated with where it came from
    /// (`# default`, `# dev default`, `# from /etc/batchly/agent.toml`,
    /// `# from BATCHLY_JOBS_MAX_CONCURRENT`); secret keys printed as `"<redacted>"`.
    pub fn render(&self) -> String {
        Rendered(self).to_string()
    }

    /// Placeholders only; `apply_builtin_defaults` overwrites every one that has a default.
    fn blank() -> Config {
        Config {
            queue: QueueConfig {
                urls: Vec::new(),
                events_url: None,
                dead_letter_url: None,
            },
            jobs: JobsConfig {
                max_concurrent: 0,
                default_timeout: Duration::ZERO,
                kill_grace: Duration::ZERO,
                retry_backoff: Duration::ZERO,
                retry_backoff_max: Duration::ZERO,
                work_dir: PathBuf::new(),
                log_dir: PathBuf::new(),
                log_max_bytes: 0,
                max_requeues: 0,
            },
            signing: SigningConfig {
                keys_file: PathBuf::new(),
                skew: Duration::ZERO,
                max_ttl: Duration::ZERO,
            },
            logs: LogsConfig {
                group: String::new(),
            },
            metrics: MetricsConfig {
                namespace: String::new(),
            },
            drain: DrainConfig {
                margin: Duration::ZERO,
                timeout: Duration::ZERO,
            },
            admin: AdminConfig {
                socket: PathBuf::new(),
            },
            state: StateConfig {
                dir: PathBuf::new(),
            },
            agent: AgentConfig {
                log_format: LogFormat::Text,
                log_level: String::new(),
                instance_id: None,
            },
            origins: vec![Origin::Builtin; KEYS.len()],
            file: FileState::NotUsed,
        }
    }

    fn apply_builtin_defaults(&mut self) -> Result<(), ConfigError> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string();
        for (index, key) in KEYS.iter().enumerate() {
            let text = match key.default {
                Builtin::Unset => continue,
                Builtin::Value(text) => text,
                Builtin::CpuCount => cpus.as_str(),
            };
            self.set((index, key), Input::Text(text), Origin::Builtin)?;
        }
        Ok(())
    }

    /// Records which file was considered and returns its path and text when there is one.
    fn read_file(
        &mut self,
        file: ConfigFile<'_>,
    ) -> Result<Option<(PathBuf, String)>, ConfigError> {
        let (path, may_be_absent) = match file {
            ConfigFile::None => return Ok(None),
            ConfigFile::Explicit(path) => (path, false),
            ConfigFile::Default(path) => (path, true),
        };
        match fs::read_to_string(path) {
            Ok(text) => {
                self.file = FileState::Loaded(path.to_path_buf());
                Ok(Some((path.to_path_buf(), text)))
            }
            Err(error) if may_be_absent && error.kind() == io::ErrorKind::NotFound => {
                self.file = FileState::Absent(path.to_path_buf());
                Ok(None)
            }
            Err(source) => Err(ConfigError::ReadFile {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|source: toml::de::Error| {
            let location = source
                .span()
                .map(|span| {
                    let (line, column) = line_and_column(text, span.start);
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            ConfigError::InvalidToml {
                path: path.to_path_buf(),
                location,
                // toml's message may span lines; keep the error on one line.
                message: source
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
                source: Box::new(source),
            }
        })?;
        let origin = Origin::File(path.to_path_buf());
        for (section, body) in &table {
            if !sections().contains(&section.as_str()) {
                return Err(ConfigError::UnknownSection {
                    section: section.clone(),
                    origin: origin.to_string(),
                    suggestion: suggest_section(section),
                });
            }
            let toml::Value::Table(body) = body else {
                return Err(ConfigError::InvalidValue {
                    key: section.clone(),
                    problem: format!(
                        "expected a table of settings ([{section}]), got {}",
                        describe(body)
                    ),
                    origin: origin.to_string(),
                });
            };
            for (leaf, value) in body {
                let name = format!("{section}.{leaf}");
                let Some(entry) = find_key(&name) else {
                    return Err(ConfigError::UnknownKey {
                        suggestion: suggest_key(&name),
                        key: name,
                        origin: origin.to_string(),
                    });
                };
                self.set(entry, Input::Toml(value), origin.clone())?;
            }
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        for (variable, value) in env {
            if !variable.starts_with(ENV_PREFIX)
                || ENV_IGNORED_PREFIXES
                    .iter()
                    .any(|prefix| variable.starts_with(prefix))
            {
                continue;
            }
            let Some((index, key)) = KEYS
                .iter()
                .enumerate()
                .find(|(_, key)| env_name(key.name) == *variable)
            else {
                let names: Vec<String> = KEYS.iter().map(|key| env_name(key.name)).collect();
                return Err(ConfigError::UnknownVariable {
                    variable: variable.clone(),
                    suggestion: did_you_mean(closest(variable, names.iter().map(String::as_str))),
                });
            };
            let origin = Origin::Env(variable.clone());
            let value = value.trim();
            if value.is_empty() {
                return Err(ConfigError::InvalidValue {
                    key: key.name.to_string(),
                    problem: "expected a value, got an empty string".to_string(),
                    origin: origin.to_string(),
                });
            }
            self.set((index, key), Input::Text(value), origin)?;
        }
        Ok(())
    }

    /// Stores one layer's value for `key` (entry `index` of KEYS) and records its origin.
    fn set(
        &mut self,
        (index, key): (usize, &Key),
        input: Input<'_>,
        origin: Origin,
    ) -> Result<(), ConfigError> {
        key.slot
            .store(self, input)
            .map_err(|rejection| ConfigError::InvalidValue {
                key: key.name.to_string(),
                problem: rejection.problem(key.secret),
                origin: origin.to_string(),
            })?;
        if let Some(recorded) = self.origins.get_mut(index) {
            *recorded = origin;
        }
        Ok(())
    }

    /// Rules that involve more than one key, checked once every layer is applied.
    fn check_across_keys(&self) -> Result<(), ConfigError> {
        if self.jobs.retry_backoff > self.jobs.retry_backoff_max {
            return Err(self.invalid(
                "jobs.retry_backoff_s",
                format!(
                    "expected at most jobs.retry_backoff_max_s ({}), got {}",
                    self.jobs.retry_backoff_max.as_secs(),
                    self.jobs.retry_backoff.as_secs()
                ),
            ));
        }
        for (name, url) in [
            ("queue.events_url", &self.queue.events_url),
            ("queue.dead_letter_url", &self.queue.dead_letter_url),
        ] {
            if let Some(url) = url.as_ref().filter(|url| self.queue.urls.contains(url)) {
                // The agent would receive its own events or rejects as jobs, forever.
                return Err(self.invalid(
                    name,
                    format!("expected a queue other than the job queues in queue.url, got {url:?}"),
                ));
            }
        }
        Ok(())
    }

    fn invalid(&self, name: &str, problem: String) -> ConfigError {
        let origin = KEYS
            .iter()
            .zip(&self.origins)
            .find(|(key, _)| key.name == name)
            .map(|(_, origin)| origin.to_string())
            .unwrap_or_default();
        ConfigError::InvalidValue {
            key: name.to_string(),
            problem,
            origin,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset, for TOML error positions.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    for (at, character) in text.char_indices() {
        if at >= offset {
            break;
        }
        if character == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// A value as it arrives: typed from the file, or text from the environment, the caller's mode
/// defaults and the built-in defaults.
#[derive(Clone, Copy)]
enum Input<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
}

impl<'a> Input<'a> {
    fn string(self, expected: &str) -> Result<&'a str, Rejection> {
        match self {
            Input::Toml(toml::Value::String(text)) => Ok(text),
            Input::Text(text) => Ok(text),
            Input::Toml(other) => Err(Rejection::new(expected, describe(other))),
        }
    }
}

/// Why a value was refused: "expected {expected}, got {got}".
struct Rejection {
    expected: String,
    got: String,
}

impl Rejection {
    fn new(expected: impl Into<String>, got: impl Into<String>) -> Rejection {
        Rejection {
            expected: expected.into(),
            got: got.into(),
        }
    }

    fn problem(&self, secret: bool) -> String {
        let got = if secret { "<redacted>" } else { &self.got };
        format!("expected {}, got {got}", self.expected)
    }
}

/// How a TOML value is shown in an error: strings quoted, everything else with its type.
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("{text:?}"),
        toml::Value::Integer(number) => format!("integer {number}"),
        toml::Value::Float(number) => format!("float {number}"),
        toml::Value::Boolean(flag) => format!("boolean {flag}"),
        toml::Value::Datetime(datetime) => format!("datetime {datetime}"),
        toml::Value::Array(_) => format!("array {value}"),
        toml::Value::Table(_) => "a table".to_string(),
    }
}

impl Slot {
    fn store(&self, config: &mut Config, input: Input<'_>) -> Result<(), Rejection> {
        match self {
            Slot::QueueUrls(field) => *(field.set)(config) = parse_queue_urls(input)?,
            Slot::OptionalUrl(field) => *(field.set)(config) = Some(parse_url(input)?),
            Slot::Count { positive, field } => {
                let count = parse_integer(input, *positive)?;
                *(field.set)(config) = usize::try_from(count)
                    .map_err(|_| Rejection::new("a smaller number", count.to_string()))?;
            }
            Slot::Seconds { positive, field } => {
                let seconds = parse_integer(input, *positive)?;
                if seconds > MAX_SECONDS {
                    return Err(Rejection::new(
                        format!("at most {MAX_SECONDS} seconds (one year)"),
                        seconds.to_string(),
                    ));
                }
                *(field.set)(config) = Duration::from_secs(seconds);
            }
            Slot::Size(field) => *(field.set)(config) = parse_size(input)?,
            Slot::Path(field) => *(field.set)(config) = parse_path(input)?,
            Slot::Text { check, field } => {
                let text = input.string("a string")?;
                check(text).map_err(|expected| Rejection::new(expected, format!("{text:?}")))?;
                *(field.set)(config) = text.to_string();
            }
            Slot::OptionalText(field) => {
                let text = input.string("a string")?;
                check_non_empty(text)
                    .map_err(|expected| Rejection::new(expected, format!("{text:?}")))?;
                *(field.set)(config) = Some(text.to_string());
            }
            Slot::LogFormat(field) => *(field.set)(config) = parse_log_format(input)?,
        }
        Ok(())
    }

    /// The value as TOML, or `None` when the setting is not set.
    fn render(&self, config: &Config) -> Option<String> {
        fn quoted(text: &str) -> String {
            toml::Value::String(text.to_string()).to_string()
        }
        match self {
            Slot::QueueUrls(field) => match (field.get)(config).as_slice() {
                [] => None,
                [url] => Some(quoted(url)),
                urls => Some(format!(
                    "[{}]",
                    urls.iter()
                        .map(|url| quoted(url))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
            Slot::OptionalUrl(field) | Slot::OptionalText(field) => {
                (field.get)(config).as_deref().map(quoted)
            }
            Slot::Count { field, .. } => Some((field.get)(config).to_string()),
            Slot::Seconds { field, .. } => Some((field.get)(config).as_secs().to_string()),
            Slot::Size(field) => Some(render_size(*(field.get)(config))),
            Slot::Path(field) => Some(quoted(&(field.get)(config).to_string_lossy())),
            Slot::Text { field, .. } => Some(quoted((field.get)(config))),
            Slot::LogFormat(field) => Some(quoted((field.get)(config).as_str())),
        }
    }
}

fn parse_integer(input: Input<'_>, positive: bool) -> Result<u64, Rejection> {
    let expected = if positive {
        "a positive integer"
    } else {
        "a non-negative integer"
    };
    let number = match input {
        Input::Toml(toml::Value::Integer(number)) => *number,
        Input::Toml(other) => return Err(Rejection::new(expected, describe(other))),
        Input::Text(text) => text
            .parse::<i64>()
            .map_err(|_| Rejection::new(expected, format!("{text:?}")))?,
    };
    u64::try_from(number)
        .ok()
        .filter(|number| !positive || *number > 0)
        .ok_or_else(|| Rejection::new(expected, number.to_string()))
}

const SIZE_EXPECTED: &str = "a size such as 64MiB or 1048576";

fn parse_size(input: Input<'_>) -> Result<u64, Rejection> {
    match input {
        Input::Toml(toml::Value::Integer(number)) => {
            u64::try_from(*number).map_err(|_| Rejection::new(SIZE_EXPECTED, number.to_string()))
        }
        other => {
            let text = other.string(SIZE_EXPECTED)?;
            size_from_text(text).ok_or_else(|| Rejection::new(SIZE_EXPECTED, format!("{text:?}")))
        }
    }
}

/// `"512KiB"`, `"64 MiB"`, `"10MB"`, `"100B"`, `"1048576"`; units are case-insensitive, decimal
/// (KB = 1000) or binary (KiB = 1024). `None` for anything else, overflow included.
fn size_from_text(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// The largest binary unit that divides the size exactly, so the text parses back unchanged.
fn render_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| bytes > 0 && bytes % unit == 0)
        .map(|(unit, name)| format!("\"{}{name}\"", bytes / unit))
        .unwrap_or_else(|| bytes.to_string())
}

const URL_EXPECTED: &str = "an https:// or http:// URL";

fn check_url(url: &str) -> Result<(), Rejection> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !url.contains(|character: char| character.is_whitespace()) =>
        {
            Ok(())
        }
        _ => Err(Rejection::new(URL_EXPECTED, format!("{url:?}"))),
    }
}

fn parse_url(input: Input<'_>) -> Result<String, Rejection> {
    let url = input.string("a URL string")?;
    check_url(url)?;
    Ok(url.to_string())
}

/// One URL, a TOML array of URLs, or (from text) comma-separated URLs; in priority order.
fn parse_queue_urls(input: Input<'_>) -> Result<Vec<String>, Rejection> {
    const EXPECTED: &str = "a URL string or an array of URL strings";
    let urls: Vec<String> = match input {
        Input::Toml(toml::Value::String(url)) => vec![url.clone()],
        Input::Toml(toml::Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                toml::Value::String(url) => Ok(url.clone()),
                other => Err(Rejection::new(
                    EXPECTED,
                    format!("{} in the array", describe(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Input::Toml(other) => return Err(Rejection::new(EXPECTED, describe(other))),
        Input::Text(text) => text.split(',').map(|url| url.trim().to_string()).collect(),
    };
    if urls.is_empty() {
        return Err(Rejection::new("at least one queue URL", "an empty array"));
    }
    for (position, url) in urls.iter().enumerate() {
        check_url(url)?;
        if urls[..position].contains(url) {
            return Err(Rejection::new(
                "each queue URL once",
                format!("{url:?} twice"),
            ));
        }
    }
    Ok(urls)
}

fn parse_path(input: Input<'_>) -> Result<PathBuf, Rejection> {
    let text = input.string("a path string")?;
    let path = PathBuf::from(text);
    if !path.is_absolute() {
        return Err(Rejection::new("an absolute path", format!("{text:?}")));
    }
    Ok(path)
}

fn parse_log_format(input: Input<'_>) -> Result<LogFormat, Rejection> {
    const EXPECTED: &str = "\"text\" or \"json\"";
    match input.string(EXPECTED)? {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(Rejection::new(EXPECTED, format!("{other:?}"))),
    }
}

fn check_non_empty(text: &str) -> Result<(), &'static str> {
    if text.trim().is_empty() {
        Err("a non-empty string")
    } else {
        Ok(())
    }
}

fn check_log_group_name(name: &str) -> Result<(), &'static str> {
    let allowed =
        |character: char| character.is_ascii_alphanumeric() || "_-/.#".contains(character);
    if (1..=LOG_GROUP_NAME_MAX_LEN).contains(&name.len()) && name.chars().all(allowed) {
        Ok(())
    } else {
        Err("a CloudWatch Logs group name: 1 to 512 of a-z A-Z 0-9 _ - / . #")
    }
}

fn check_metrics_namespace(namespace: &str) -> Result<(), &'static str> {
    if namespace.starts_with(RESERVED_METRICS_NAMESPACE_PREFIX) {
        return Err("a CloudWatch namespace not starting with AWS/ (reserved for AWS services)");
    }
    let printable_ascii = namespace
        .chars()
        .all(|character| matches!(character, ' '..='~'));
    if namespace.len() <= METRICS_NAMESPACE_MAX_LEN
        && printable_ascii
        && !namespace.trim().is_empty()
        && !namespace.starts_with(':')
    {
        Ok(())
    } else {
        Err("a CloudWatch namespace: 1 to 255 printable ASCII characters, not starting with ':'")
    }
}

// ---------------------------------------------------------------------------------------------
// "Did you mean"
// ---------------------------------------------------------------------------------------------

fn suggest_key(name: &str) -> String {
    let close = closest(name, KEYS.iter().map(|key| key.name));
    // A known key written in the wrong section: `[jobs] skew_s` means signing.skew_s.
    let moved = || {
        let (_, leaf) = split_name(name);
        KEYS.iter()
            .map(|key| key.name)
            .find(|known| split_name(known).1 == leaf)
    };
    did_you_mean(close.or_else(moved))
}

fn suggest_section(section: &str) -> String {
    let close = closest(section, sections().into_iter());
    // A key written at the top level, outside its section: `url = ...` means queue.url.
    let moved = || {
        KEYS.iter()
            .map(|key| key.name)
            .find(|known| split_name(known).1 == section)
    };
    did_you_mean(close.or_else(moved))
}

fn did_you_mean(candidate: Option<&str>) -> String {
    candidate
        .map(|candidate| format!("; did you mean {candidate}?"))
        .unwrap_or_default()
}

/// The candidate nearest to `unknown`, if it is near enough to be a likely typo.
fn closest<'a>(unknown: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|candidate| (edit_distance(unknown, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 3 && distance * 3 <= candidate.len())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance in characters, with a single reused row.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, b_char) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(a_char != *b_char);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

struct Rendered<'a>(&'a Config);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.0;
        writeln!(f, "# Effective batchly-agent configuration.")?;
        match &config.file {
            FileState::Loaded(path) => writeln!(
                f,
                "# Config file: {}",
                printable(&path.display().to_string())
            )?,
            FileState::Absent(path) => writeln!(
                f,
                "# No config file: {} does not exist; defaults and environment apply.",
                printable(&path.display().to_string())
            )?,
            FileState::NotUsed => writeln!(
                f,
                "# No config file was read; defaults and environment apply."
            )?,
        }
        let mut current_section = "";
        for (key, origin) in KEYS.iter().zip(&config.origins) {
            let (section, leaf) = split_name(key.name);
            if section != current_section {
                writeln!(f, "\n[{section}]")?;
                current_section = section;
            }
            writeln!(f, "# {}", key.doc)?;
            let note = match (&key.default, origin) {
                (Builtin::CpuCount, Origin::Builtin) => " (number of CPUs)",
                _ => "",
            };
            match key.slot.render(config) {
                Some(_) if key.secret => writeln!(f, "{leaf} = \"<redacted>\"  # {origin}")?,
                Some(value) => writeln!(f, "{leaf} = {value}  # {origin}{note}")?,
                None if key.name == "queue.url" => {
                    writeln!(f, "# {leaf} is not set; `run` requires it")?
                }
                None => writeln!(f, "# {leaf} is not set")?,
            }
        }
        Ok(())
    }
}

/// Control characters would break a comment line (or a message) in two.
fn printable(text: &str) -> String {
    text.chars()
        .map(|character| {
            if character.is_control() {
                '?'
            } else {
                character
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Loaded {
        result: Result<Config, ConfigError>,
        /// Keeps the config file alive; its path appears in messages.
        file: Option<tempfile::NamedTempFile>,
    }

    impl Loaded {
        fn config(self) -> Config {
            match self.result {
                Ok(config) => config,
                Err(error) => panic!("expected the config to load, got: {error}"),
            }
        }

        fn error(&self) -> String {
            match &self.result {
                Ok(_) => panic!("expected an error, the config loaded"),
                Err(error) => error.to_string(),
            }
        }

        fn path(&self) -> String {
            self.file
                .as_ref()
                .map(|file| file.path().display().to_string())
                .unwrap_or_default()
        }
    }

    fn load(file_text: Option<&str>, env: &[(&str, &str)], mode: &[(&str, &str)]) -> Loaded {
        let file = file_text.map(|text| {
            let mut file = tempfile::NamedTempFile::new().expect("temp file");
            file.write_all(text.as_bytes()).expect("write temp file");
            file
        });
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let mode: Vec<(&str, String)> = mode
            .iter()
            .map(|(name, value)| (*name, value.to_string()))
            .collect();
        let source = match &file {
            Some(file) => ConfigFile::Explicit(file.path()),
            None => ConfigFile::None,
        };
        let result = Config::load(source, &env, &mode);
        Loaded { result, file }
    }

    fn cpus() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    #[test]
    fn defaults_apply_when_there_is_no_file_and_no_environment() {
        let config = load(None, &[], &[]).config();
        assert!(config.queue.urls.is_empty());
        assert_eq!(config.queue.events_url, None);
        assert_eq!(config.queue.dead_letter_url, None);
        assert_eq!(
            config.jobs,
            JobsConfig {
                max_concurrent: cpus(),
                default_timeout: Duration::from_secs(3600),
                kill_grace: Duration::from_secs(10),
                retry_backoff: Duration::from_secs(10),
                retry_backoff_max: Duration::from_secs(900),
                work_dir: PathBuf::from("/var/lib/batchly/work"),
                log_dir: PathBuf::from("/var/lib/batchly/logs"),
                log_max_bytes: 256 * 1024 * 1024,
                max_requeues: 20,
            }
        );
        assert_eq!(
            config.signing,
            SigningConfig {
                keys_file: PathBuf::from("/etc/batchly/keys.toml"),
                skew: Duration::from_secs(60),
                max_ttl: Duration::from_secs(604_800),
            }
        );
        assert_eq!(config.logs.group, "/batchly/jobs");
        assert_eq!(config.metrics.namespace, "Batchly/Agent");
        assert_eq!(config.drain.margin, Duration::from_secs(15));
        assert_eq!(config.drain.timeout, Duration::from_secs(90));
        assert_eq!(
            config.admin.socket,
            PathBuf::from("/run/batchly/agent.sock")
        );
        assert_eq!(config.state.dir, PathBuf::from("/var/lib/batchly/state"));
        assert_eq!(
            config.agent,
            AgentConfig {
                log_format: LogFormat::Text,
                log_level: "info".to_string(),
                instance_id: None,
            }
        );
        assert_eq!(config.source_file(), None);
    }

    #[test]
    fn file_value_overrides_the_default() {
        let loaded = load(
            Some("[jobs]\nmax_concurrent = 3\ndefault_timeout_s = 120\n[agent]\nlog_format = \"json\"\n"),
            &[],
            &[],
        );
        let path = loaded.path();
        let config = loaded.config();
        assert_eq!(config.jobs.max_concurrent, 3);
        assert_eq!(config.jobs.default_timeout, Duration::from_secs(120));
        assert_eq!(config.agent.log_format, LogFormat::Json);
        assert_eq!(config.source_file(), Some(Path::new(&path)));
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load(
            Some("[jobs]\nmax_concurrent = 3\nkill_grace_s = 5\n"),
            &[("BATCHLY_JOBS_MAX_CONCURRENT", "7"), ("PATH", "/usr/bin")],
            &[],
        )
        .config();
        assert_eq!(config.jobs.max_concurrent, 7);
        assert_eq!(config.jobs.kill_grace, Duration::from_secs(5));
    }

    #[test]
    fn mode_defaults_override_built_in_defaults_but_not_the_file() {
        let mode = [
            ("jobs.work_dir", "/tmp/dev/work"),
            ("jobs.log_dir", "/tmp/dev/logs"),
        ];
        let config = load(Some("[jobs]\nlog_dir = \"/srv/logs\"\n"), &[], &mode).config();
        assert_eq!(config.jobs.work_dir, PathBuf::from("/tmp/dev/work"));
        assert_eq!(config.jobs.log_dir, PathBuf::from("/srv/logs"));
        assert_eq!(config.state.dir, PathBuf::from("/var/lib/batchly/state"));
    }

    #[test]
    fn mode_default_naming_no_key_is_refused() {
        let loaded = load(None, &[], &[("jobs.workdir", "/tmp/x")]);
        assert_eq!(
            loaded.error(),
            "jobs.workdir: unknown key (dev default); did you mean jobs.work_dir?"
        );
    }

    #[test]
    fn non_numeric_count_in_file_names_the_key_the_value_and_the_file() {
        let loaded = load(Some("[jobs]\nmax_concurrent = \"many\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs.max_concurrent: expected a positive integer, got \"many\" (from {})",
                loaded.path()
            )
        );
    }

    #[test]
    fn zero_job_slots_from_environment_names_the_variable() {
        let loaded = load(None, &[("BATCHLY_JOBS_MAX_CONCURRENT", "0")], &[]);
        assert_eq!(
            loaded.error(),
            "jobs.max_concurrent: expected a positive integer, got 0 (from BATCHLY_JOBS_MAX_CONCURRENT)"
        );
    }

    #[test]
    fn negative_seconds_are_refused_but_zero_grace_is_allowed() {
        let loaded = load(Some("[signing]\nskew_s = -1\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "signing.skew_s: expected a non-negative integer, got -1 (from {})",
                loaded.path()
            )
        );
        let config = load(None, &[("BATCHLY_JOBS_KILL_GRACE_S", "0")], &[]).config();
        assert_eq!(config.jobs.kill_grace, Duration::ZERO);
    }

    #[test]
    fn durations_longer_than_a_year_are_refused() {
        let loaded = load(
            None,
            &[("BATCHLY_JOBS_DEFAULT_TIMEOUT_S", "99999999999")],
            &[],
        );
        assert_eq!(
            loaded.error(),
            "jobs.default_timeout_s: expected at most 31536000 seconds (one year), got 99999999999 \
             (from BATCHLY_JOBS_DEFAULT_TIMEOUT_S)"
        );
    }

    #[test]
    fn misspelt_file_key_suggests_the_known_key() {
        let loaded = load(Some("[jobs]\nmax_concurent = 4\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs.max_concurent: unknown key (from {}); did you mean jobs.max_concurrent?",
                loaded.path()
            )
        );
    }

    #[test]
    fn key_in_the_wrong_section_suggests_its_section() {
        let loaded = load(Some("[jobs]\nskew_s = 30\n"), &[], &[]);
        assert!(
            loaded.error().ends_with("; did you mean signing.skew_s?"),
            "{}",
            loaded.error()
        );
    }

    #[test]
    fn unrelated_unknown_key_gets_no_suggestion() {
        let loaded = load(Some("[jobs]\ncolour = \"blue\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!("jobs.colour: unknown key (from {})", loaded.path())
        );
    }

    #[test]
    fn misspelt_section_is_an_unknown_section_with_a_suggestion() {
        let loaded = load(Some("[queu]\nurl = \"https://sqs.example/q\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "queu: unknown section (from {}); did you mean queue?",
                loaded.path()
            )
        );
    }

    #[test]
    fn top_level_key_outside_its_section_points_to_the_section() {
        let loaded = load(Some("url = \"https://sqs.example/q\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "url: unknown section (from {}); did you mean queue.url?",
                loaded.path()
            )
        );
    }

    #[test]
    fn section_given_a_plain_value_is_refused() {
        let loaded = load(Some("jobs = 4\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs: expected a table of settings ([jobs]), got integer 4 (from {})",
                loaded.path()
            )
        );
    }

    #[test]
    fn misspelt_environment_variable_is_an_unknown_setting_with_a_suggestion() {
        let loaded = load(None, &[("BATCHLY_JOBS_MAX_CONCURENT", "4")], &[]);
        assert_eq!(
            loaded.error(),
            "BATCHLY_JOBS_MAX_CONCURENT: unknown setting (from the environment); \
             did you mean BATCHLY_JOBS_MAX_CONCURRENT?"
        );
    }

    #[test]
    fn test_tooling_and_foreign_variables_are_ignored() {
        let config = load(
            None,
            &[
                ("BATCHLY_AGENT_BIN", "/x/batchly-agent"),
                ("BATCHLY_AGENT_BINARY_DIR", "/x"),
                ("BATCHLY_TEST_SEED", "42"),
                ("HOME", "/root"),
                ("batchly_jobs_max_concurrent", "0"),
            ],
            &[],
        )
        .config();
        assert_eq!(config.jobs.max_concurrent, cpus());
    }

    #[test]
    fn empty_environment_value_is_refused() {
        let loaded = load(None, &[("BATCHLY_LOGS_GROUP", "")], &[]);
        assert_eq!(
            loaded.error(),
            "logs.group: expected a value, got an empty string (from BATCHLY_LOGS_GROUP)"
        );
    }

    #[test]
    fn explicit_config_file_that_is_missing_is_an_error_with_the_os_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.toml");
        let error = Config::load(ConfigFile::Explicit(&path), &[], &[])
            .err()
            .map(|error| error.to_string());
        assert_eq!(
            error,
            Some(format!(
                "reading config file {}: No such file or directory (os error 2)",
                path.display()
            ))
        );
    }

    #[test]
    fn absent_default_config_file_means_defaults_and_render_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.toml");
        let env = [(
            "BATCHLY_QUEUE_URL".to_string(),
            "https://sqs.example/q".to_string(),
        )];
        let config = match Config::load(ConfigFile::Default(&path), &env, &[]) {
            Ok(config) => config,
            Err(error) => panic!("absent default file must not be an error: {error}"),
        };
        assert_eq!(config.source_file(), None);
        assert_eq!(config.queue.urls, vec!["https://sqs.example/q".to_string()]);
        assert!(config.render().contains(&format!(
            "# No config file: {} does not exist; defaults and environment apply.",
            path.display()
        )));
    }

    #[test]
    fn toml_syntax_error_reports_file_line_and_column() {
        let loaded = load(
            Some("[jobs]\nmax_concurrent = 4\nwork_dir = /srv\n"),
            &[],
            &[],
        );
        let error = loaded.error();
        let prefix = format!(
            "config file {}: invalid TOML at line 3, column 12: ",
            loaded.path()
        );
        assert!(error.starts_with(&prefix), "{error}");
        assert!(error.len() > prefix.len(), "{error}");
        assert!(
            !error.contains('\n'),
            "one line, no source snippet: {error}"
        );
    }

    #[test]
    fn wrong_toml_type_names_what_was_expected_and_what_was_given() {
        let loaded = load(Some("[jobs]\nwork_dir = 5\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs.work_dir: expected a path string, got integer 5 (from {})",
                loaded.path()
            )
        );
        let loaded = load(Some("[jobs]\nmax_concurrent = 2.5\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs.max_concurrent: expected a positive integer, got float 2.5 (from {})",
                loaded.path()
            )
        );
    }

    #[test]
    fn relative_paths_are_refused_naming_the_key() {
        let loaded = load(None, &[("BATCHLY_STATE_DIR", "state")], &[]);
        assert_eq!(
            loaded.error(),
            "state.dir: expected an absolute path, got \"state\" (from BATCHLY_STATE_DIR)"
        );
        let loaded = load(None, &[], &[("jobs.work_dir", "dev/work")]);
        assert_eq!(
            loaded.error(),
            "jobs.work_dir: expected an absolute path, got \"dev/work\" (dev default)"
        );
    }

    #[test]
    fn queue_url_accepts_a_single_string() {
        let config = load(
            Some("[queue]\nurl = \"https://sqs.eu-west-1.amazonaws.com/1/jobs\"\n"),
            &[],
            &[],
        )
        .config();
        assert_eq!(
            config.queue.urls,
            vec!["https://sqs.eu-west-1.amazonaws.com/1/jobs".to_string()]
        );
        assert!(config.require_queue().is_ok());
    }

    #[test]
    fn queue_url_accepts_an_array_in_priority_order() {
        let config = load(
            Some(
                "[queue]\nurl = [\"https://sqs.example/urgent\", \"http://localhost:9324/bulk\"]\n",
            ),
            &[],
            &[],
        )
        .config();
        assert_eq!(
            config.queue.urls,
            vec![
                "https://sqs.example/urgent".to_string(),
                "http://localhost:9324/bulk".to_string()
            ]
        );
    }

    #[test]
    fn queue_url_from_environment_is_comma_separated_in_priority_order() {
        let config = load(
            Some("[queue]\nurl = \"https://sqs.example/file\"\n"),
            &[(
                "BATCHLY_QUEUE_URL",
                "https://sqs.example/a, https://sqs.example/b",
            )],
            &[],
        )
        .config();
        assert_eq!(
            config.queue.urls,
            vec![
                "https://sqs.example/a".to_string(),
                "https://sqs.example/b".to_string()
            ]
        );
    }

    #[test]
    fn queue_url_must_be_http_or_https() {
        let loaded = load(None, &[("BATCHLY_QUEUE_URL", "sqs.example/q")], &[]);
        assert_eq!(
            loaded.error(),
            "queue.url: expected an https:// or http:// URL, got \"sqs.example/q\" \
             (from BATCHLY_QUEUE_URL)"
        );
        let loaded = load(None, &[("BATCHLY_QUEUE_EVENTS_URL", "ftp://x/events")], &[]);
        assert!(
            loaded
                .error()
                .starts_with("queue.events_url: expected an https:// or http:// URL"),
            "{}",
            loaded.error()
        );
    }

    #[test]
    fn queue_url_array_must_be_non_empty_strings_without_duplicates() {
        let loaded = load(Some("[queue]\nurl = []\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "queue.url: expected at least one queue URL, got an empty array (from {})",
                loaded.path()
            )
        );
        let loaded = load(
            Some("[queue]\nurl = [\"https://sqs.example/q\", \"https://sqs.example/q\"]\n"),
            &[],
            &[],
        );
        assert_eq!(
            loaded.error(),
            format!(
                "queue.url: expected each queue URL once, got \"https://sqs.example/q\" twice (from {})",
                loaded.path()
            )
        );
        let loaded = load(
            Some("[queue]\nurl = [\"https://sqs.example/q\", 3]\n"),
            &[],
            &[],
        );
        assert_eq!(
            loaded.error(),
            format!(
                "queue.url: expected a URL string or an array of URL strings, got integer 3 in the array (from {})",
                loaded.path()
            )
        );
        let loaded = load(
            None,
            &[("BATCHLY_QUEUE_URL", "https://sqs.example/q,")],
            &[],
        );
        assert_eq!(
            loaded.error(),
            "queue.url: expected an https:// or http:// URL, got \"\" (from BATCHLY_QUEUE_URL)"
        );
    }

    #[test]
    fn dead_letter_queue_that_is_also_a_job_queue_is_refused() {
        let loaded = load(
            None,
            &[
                ("BATCHLY_QUEUE_URL", "https://sqs.example/q"),
                ("BATCHLY_QUEUE_DEAD_LETTER_URL", "https://sqs.example/q"),
            ],
            &[],
        );
        assert_eq!(
            loaded.error(),
            "queue.dead_letter_url: expected a queue other than the job queues in queue.url, \
             got \"https://sqs.example/q\" (from BATCHLY_QUEUE_DEAD_LETTER_URL)"
        );
    }

    #[test]
    fn sizes_accept_units_and_plain_integers() {
        for (text, bytes) in [
            ("512KiB", 512 * 1024),
            ("64MiB", 64 << 20),
            ("1GiB", 1 << 30),
            ("10MB", 10_000_000),
            ("100B", 100),
            ("2 gib", 2 << 30),
            ("1048576", 1_048_576),
        ] {
            let config = load(None, &[("BATCHLY_JOBS_LOG_MAX_BYTES", text)], &[]).config();
            assert_eq!(config.jobs.log_max_bytes, bytes, "{text}");
        }
        let config = load(Some("[jobs]\nlog_max_bytes = 4096\n"), &[], &[]).config();
        assert_eq!(config.jobs.log_max_bytes, 4096);
        let config = load(Some("[jobs]\nlog_max_bytes = \"3KB\"\n"), &[], &[]).config();
        assert_eq!(config.jobs.log_max_bytes, 3000);
    }

    #[test]
    fn sizes_reject_junk_negative_numbers_and_overflow() {
        let loaded = load(None, &[("BATCHLY_JOBS_LOG_MAX_BYTES", "lots")], &[]);
        assert_eq!(
            loaded.error(),
            "jobs.log_max_bytes: expected a size such as 64MiB or 1048576, got \"lots\" \
             (from BATCHLY_JOBS_LOG_MAX_BYTES)"
        );
        for junk in ["1.5GiB", "MiB", "64 megabytes", "-5", "99999999999TiB"] {
            let loaded = load(None, &[("BATCHLY_JOBS_LOG_MAX_BYTES", junk)], &[]);
            assert!(
                loaded
                    .error()
                    .starts_with("jobs.log_max_bytes: expected a size"),
                "{junk}: {}",
                loaded.error()
            );
        }
        let loaded = load(Some("[jobs]\nlog_max_bytes = -1\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs.log_max_bytes: expected a size such as 64MiB or 1048576, got -1 (from {})",
                loaded.path()
            )
        );
    }

    #[test]
    fn log_format_is_text_or_json_only() {
        let loaded = load(None, &[("BATCHLY_AGENT_LOG_FORMAT", "xml")], &[]);
        assert_eq!(
            loaded.error(),
            "agent.log_format: expected \"text\" or \"json\", got \"xml\" (from BATCHLY_AGENT_LOG_FORMAT)"
        );
    }

    #[test]
    fn retry_backoff_above_its_maximum_is_refused() {
        let loaded = load(None, &[("BATCHLY_JOBS_RETRY_BACKOFF_S", "1000")], &[]);
        assert_eq!(
            loaded.error(),
            "jobs.retry_backoff_s: expected at most jobs.retry_backoff_max_s (900), got 1000 \
             (from BATCHLY_JOBS_RETRY_BACKOFF_S)"
        );
    }

    #[test]
    fn cloudwatch_names_follow_the_service_rules() {
        let loaded = load(None, &[("BATCHLY_LOGS_GROUP", "my group!")], &[]);
        assert!(
            loaded
                .error()
                .starts_with("logs.group: expected a CloudWatch Logs group name"),
            "{}",
            loaded.error()
        );
        let loaded = load(None, &[("BATCHLY_METRICS_NAMESPACE", "AWS/EC2")], &[]);
        assert!(
            loaded.error().contains("not starting with AWS/"),
            "{}",
            loaded.error()
        );
        let config = load(
            None,
            &[("BATCHLY_METRICS_NAMESPACE", "Team Risk/Batch")],
            &[],
        )
        .config();
        assert_eq!(config.metrics.namespace, "Team Risk/Batch");
    }

    #[test]
    fn render_shows_where_each_value_came_from() {
        let loaded = load(
            Some("[jobs]\nkill_grace_s = 20\n"),
            &[("BATCHLY_JOBS_MAX_CONCURRENT", "6")],
            &[("jobs.work_dir", "/tmp/dev/work")],
        );
        let path = loaded.path();
        let rendered = loaded.config().render();
        assert!(
            rendered.contains(&format!("# Config file: {path}\n")),
            "{rendered}"
        );
        assert!(
            rendered.contains("max_concurrent = 6  # from BATCHLY_JOBS_MAX_CONCURRENT\n"),
            "{rendered}"
        );
        assert!(
            rendered.contains(&format!("kill_grace_s = 20  # from {path}\n")),
            "{rendered}"
        );
        assert!(
            rendered.contains("work_dir = \"/tmp/dev/work\"  # dev default\n"),
            "{rendered}"
        );
        assert!(
            rendered.contains("log_max_bytes = \"256MiB\"  # default\n"),
            "{rendered}"
        );
        assert!(
            rendered.contains("# url is not set; `run` requires it\n"),
            "{rendered}"
        );
    }

    #[test]
    fn render_marks_the_cpu_count_default() {
        let rendered = load(None, &[], &[]).config().render();
        assert!(
            rendered.contains(&format!(
                "max_concurrent = {}  # default (number of CPUs)\n",
                cpus()
            )),
            "{rendered}"
        );
    }

    #[test]
    fn rendered_config_loads_back_to_the_same_values() {
        let original = load(
            Some("[queue]\nurl = [\"https://sqs.example/a\", \"https://sqs.example/b\"]\n[jobs]\nlog_max_bytes = \"10MB\"\n"),
            &[
                ("BATCHLY_QUEUE_EVENTS_URL", "https://sqs.example/events"),
                ("BATCHLY_AGENT_INSTANCE_ID", "i-0123456789abcdef0"),
                ("BATCHLY_AGENT_LOG_FORMAT", "json"),
                ("BATCHLY_AGENT_LOG_LEVEL", "batchly_agent=debug,info"),
                ("BATCHLY_DRAIN_TIMEOUT_S", "120"),
            ],
            &[("state.dir", "/tmp/dev/state")],
        )
        .config();
        let reloaded = load(Some(&original.render()), &[], &[]).config();
        assert_eq!(reloaded.queue, original.queue);
        assert_eq!(reloaded.jobs, original.jobs);
        assert_eq!(reloaded.signing, original.signing);
        assert_eq!(reloaded.logs, original.logs);
        assert_eq!(reloaded.metrics, original.metrics);
        assert_eq!(reloaded.drain, original.drain);
        assert_eq!(reloaded.admin, original.admin);
        assert_eq!(reloaded.state, original.state);
        assert_eq!(reloaded.agent, original.agent);
    }

    #[test]
    fn require_queue_names_the_file_and_the_variable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.toml");
        let config = match Config::load(ConfigFile::Default(&path), &[], &[]) {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(
            config.require_queue().err().map(|error| error.to_string()),
            Some(format!(
                "queue.url: required by `run`; set it in {} or BATCHLY_QUEUE_URL",
                path.display()
            ))
        );
    }

    #[test]
    fn secret_values_never_appear_in_errors() {
        let rejection = Rejection::new("a token", "\"hunter2\"");
        assert_eq!(rejection.problem(true), "expected a token, got <redacted>");
        assert_eq!(
            rejection.problem(false),
            "expected a token, got \"hunter2\""
        );
    }

    #[test]
    fn every_key_has_a_section_a_doc_and_a_distinct_environment_name() {
        let mut names: Vec<String> = KEYS.iter().map(|key| env_name(key.name)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KEYS.len());
        for key in KEYS {
            let (section, leaf) = split_name(key.name);
            assert!(!section.is_empty() && !leaf.is_empty(), "{}", key.name);
            assert!(
                !section.contains('_'),
                "{}: section names have no underscore",
                key.name
            );
            assert!(!key.doc.is_empty(), "{}", key.name);
        }
        // render() writes a [section] header whenever the section changes; a section split in
        // two would render as a duplicate table, which is invalid TOML.
        let mut runs: Vec<&str> = KEYS.iter().map(|key| split_name(key.name).0).collect();
        runs.dedup();
        assert_eq!(
            runs,
            sections(),
            "each section's keys must be adjacent in KEYS"
        );
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("max_concurent", "max_concurrent"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
