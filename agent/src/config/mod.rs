//! Configuration: turns built-in defaults, the caller's mode defaults, the TOML file and the
//! `BATCHLY_<SECTION>_<KEY>` environment variables (in that order, later wins) into one
//! validated, typed [`Config`], and remembers where every value came from so `check-config`
//! can show it. It owns the list of settings (`KEYS`) and every rule about their values, so
//! the rest of the agent never re-checks a setting. It reads exactly one file and must never do
//! anything else to the system: no directories created, no sockets opened, no AWS settings or
//! credentials read (those follow the AWS SDK's own chain), and never a secret value printed,
//! not even inside an error message.
//!
//! Where things are: this file holds the typed [`Config`], its errors and the layering
//! ([`Config::load`]); `keys.rs` is the schema (every key, its default, its environment name);
//! `parse.rs` turns one value into its typed form (sizes, URLs, paths, durations, names);
//! `suggest.rs` finds the "did you mean" for an unknown name; `render.rs` writes the effective
//! configuration that `check-config` prints.

mod keys;
mod parse;
mod render;
mod suggest;

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keys::{env_name, find_key, sections, Builtin, Key, ENV_PREFIX, KEYS};
use parse::{describe, Input};
use render::{printable, Rendered};
use suggest::{closest, did_you_mean, suggest_key, suggest_section};

/// Where `run` and `check-config` look when no `--config` is given (operator contract).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/batchly/agent.toml";

/// Variables that belong to the test tooling, not to the agent's settings.
const ENV_IGNORED_PREFIXES: &[&str] = &["BATCHLY_AGENT_BIN", "BATCHLY_TEST_"];
/// How a value from a caller's mode defaults is labelled; `dev` is the only mode that has any.
const MODE_DEFAULT_LABEL: &str = "dev default";

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
    pub sandbox: SandboxConfig,
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
    /// Releases of one job that do not count as a failed attempt (exit 75, a drain, trouble on
    /// the agent's side) allowed before the job is dead-lettered with reason `agent_gave_up`:
    /// such releases would otherwise loop forever.
    pub max_requeues: u32,
    pub work_dir: PathBuf,
    pub log_max_bytes: u64,
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
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub namespace: String,
    /// How long one aggregated data point covers.
    pub interval: Duration,
    /// Whether every metric carries an `InstanceId` dimension: off by default, since every
    /// distinct dimension set is a metric CloudWatch bills for.
    pub instance_dimension: bool,
    /// Job tag keys published as dimensions of the job metrics, each a valid CloudWatch
    /// dimension name, each once.
    pub tag_dimensions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainConfig {
    pub margin: Duration,
    pub timeout: Duration,
    /// After a rebalance recommendation paused intake, resume it after this
    /// long if no interruption notice followed.
    pub rebalance_resume: Duration,
    /// The Auto Scaling termination hook to heartbeat and complete.
    pub lifecycle_hook: Option<String>,
    /// The Auto Scaling launch hook to complete once ready.
    pub launch_hook: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub socket: PathBuf,
    /// Where the HTTP `/healthz` and `/metrics` listener binds; always a loopback address.
    /// `None`: no listener.
    pub listen: Option<SocketAddr>,
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

/// How jobs are isolated from the host (`sandbox.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    pub uid_range: UidRange,
    /// Host directories every job may write, at the same path.
    pub bind_paths: Vec<PathBuf>,
    /// Host directories every job may read, at the same path, even where
    /// its view is otherwise fresh (/run, /tmp, /var/tmp).
    pub readonly_paths: Vec<PathBuf>,
    /// The largest file a job may write (`RLIMIT_FSIZE`); 0 is no limit.
    pub max_file_bytes: u64,
    /// Limits of a job whose spec gives none; 0 is no limit.
    pub default_pids: usize,
    pub default_memory_mib: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Every protection the host supports; a job the sandbox cannot isolate
    /// is refused.
    Full,
    /// No isolation at all (jobs run as the agent's user in its
    /// namespaces): `run` refuses it without `--insecure-no-sandbox`.
    None,
}

impl SandboxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Full => "full",
            SandboxMode::None => "none",
        }
    }
}

/// Job uids and gids, one per slot: slot `n` runs as `first + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    pub fn count(&self) -> u64 {
        u64::from(self.last) - u64::from(self.first) + 1
    }

    /// The uid of job slot `slot`, if the range has one.
    pub fn for_slot(&self, slot: usize) -> Option<u32> {
        let uid = u64::from(self.first) + slot as u64;
        (uid <= u64::from(self.last)).then_some(uid as u32)
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
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
                max_requeues: 0,
                work_dir: PathBuf::new(),
                log_max_bytes: 0,
            },
            signing: SigningConfig {
                keys_file: PathBuf::new(),
                skew: Duration::ZERO,
                max_ttl: Duration::ZERO,
            },
            logs: LogsConfig {
                group: String::new(),
                spool_dir: PathBuf::new(),
                spool_max_bytes: 0,
            },
            metrics: MetricsConfig {
                namespace: String::new(),
                interval: Duration::ZERO,
                instance_dimension: false,
                tag_dimensions: Vec::new(),
            },
            drain: DrainConfig {
                margin: Duration::ZERO,
                timeout: Duration::ZERO,
                rebalance_resume: Duration::ZERO,
                lifecycle_hook: None,
                launch_hook: None,
            },
            admin: AdminConfig {
                socket: PathBuf::new(),
                listen: None,
            },
            state: StateConfig {
                dir: PathBuf::new(),
            },
            agent: AgentConfig {
                log_format: LogFormat::Text,
                log_level: String::new(),
                instance_id: None,
            },
            sandbox: SandboxConfig {
                mode: SandboxMode::Full,
                uid_range: UidRange { first: 0, last: 0 },
                bind_paths: Vec::new(),
                readonly_paths: Vec::new(),
                max_file_bytes: 0,
                default_pids: 0,
                default_memory_mib: 0,
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
        let slots = self.jobs.max_concurrent as u64;
        if self.sandbox.mode == SandboxMode::Full && self.sandbox.uid_range.count() < slots {
            return Err(self.invalid(
                "sandbox.uid_range",
                format!(
                    "expected at least one uid per job slot (jobs.max_concurrent = {slots}), got {} ({} uids)",
                    self.sandbox.uid_range,
                    self.sandbox.uid_range.count()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(super) struct Loaded {
        result: Result<Config, ConfigError>,
        /// Keeps the config file alive; its path appears in messages.
        file: Option<tempfile::NamedTempFile>,
    }

    impl Loaded {
        pub(super) fn config(self) -> Config {
            match self.result {
                Ok(config) => config,
                Err(error) => panic!("expected the config to load, got: {error}"),
            }
        }

        pub(super) fn error(&self) -> String {
            match &self.result {
                Ok(_) => panic!("expected an error, the config loaded"),
                Err(error) => error.to_string(),
            }
        }

        pub(super) fn path(&self) -> String {
            self.file
                .as_ref()
                .map(|file| file.path().display().to_string())
                .unwrap_or_default()
        }
    }

    pub(super) fn load(
        file_text: Option<&str>,
        env: &[(&str, &str)],
        mode: &[(&str, &str)],
    ) -> Loaded {
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

    pub(super) fn cpus() -> usize {
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
                max_requeues: 20,
                work_dir: PathBuf::from("/var/lib/batchly/work"),
                log_max_bytes: 256 * 1024 * 1024,
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
        assert_eq!(
            config.logs.spool_dir,
            PathBuf::from("/var/lib/batchly/spool")
        );
        assert_eq!(config.logs.spool_max_bytes, 2 << 30);
        assert_eq!(
            config.metrics,
            MetricsConfig {
                namespace: "Batchly/Agent".to_string(),
                interval: Duration::from_secs(60),
                instance_dimension: false,
                tag_dimensions: Vec::new(),
            }
        );
        assert_eq!(config.drain.margin, Duration::from_secs(15));
        assert_eq!(config.drain.timeout, Duration::from_secs(90));
        assert_eq!(config.drain.rebalance_resume, Duration::from_secs(600));
        assert_eq!(
            config.admin,
            AdminConfig {
                socket: PathBuf::from("/run/batchly/agent.sock"),
                listen: None,
            }
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
            ("logs.spool_dir", "/tmp/dev/logs"),
        ];
        let config = load(Some("[logs]\nspool_dir = \"/srv/logs\"\n"), &[], &mode).config();
        assert_eq!(config.jobs.work_dir, PathBuf::from("/tmp/dev/work"));
        assert_eq!(config.logs.spool_dir, PathBuf::from("/srv/logs"));
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
    fn lifecycle_hook_names_are_checked_against_auto_scalings_rules() {
        let loaded = load(None, &[("BATCHLY_DRAIN_LIFECYCLE_HOOK", "drain now!")], &[]);
        assert_eq!(
            loaded.error(),
            "drain.lifecycle_hook: expected a lifecycle hook name: 1 to 255 of a-z A-Z 0-9 _ - /, got \"drain now!\" (from BATCHLY_DRAIN_LIFECYCLE_HOOK)"
        );
        let config = load(
            None,
            &[
                ("BATCHLY_DRAIN_LIFECYCLE_HOOK", "batchly/drain-1"),
                ("BATCHLY_DRAIN_LAUNCH_HOOK", "ready_hook"),
            ],
            &[],
        )
        .config();
        assert_eq!(
            config.drain.lifecycle_hook.as_deref(),
            Some("batchly/drain-1")
        );
        assert_eq!(config.drain.launch_hook.as_deref(), Some("ready_hook"));
        assert_eq!(load(None, &[], &[]).config().drain.lifecycle_hook, None);
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
    fn retry_backoff_above_its_maximum_is_refused() {
        let loaded = load(None, &[("BATCHLY_JOBS_RETRY_BACKOFF_S", "1000")], &[]);
        assert_eq!(
            loaded.error(),
            "jobs.retry_backoff_s: expected at most jobs.retry_backoff_max_s (900), got 1000 \
             (from BATCHLY_JOBS_RETRY_BACKOFF_S)"
        );
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
}
