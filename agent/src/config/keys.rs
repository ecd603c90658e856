//! The schema: every setting the agent has, with its type, built-in default, one-line
//! description and (derived from its name) its environment variable. Adding a setting: one entry
//! in `KEYS`, its field in the section struct, and the field's placeholder in `Config::blank`
//! (every placeholder is overwritten by the default). Nothing here reads a value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::parse::{
    check_dimension_name, check_lifecycle_hook_name, check_log_group_name, check_metrics_namespace,
    check_non_empty,
};
use super::{Config, LogFormat, SandboxMode, UidRange};

/// CloudWatch allows 30 dimensions per metric (PutMetricData, `Dimensions`); the agent's own job
/// metric dimensions (`telemetry::metrics::AGENT_DIMENSIONS`) take up to five of them.
const MAX_TAG_DIMENSIONS: usize = 25;

/// Every setting's environment variable is this prefix followed by `SECTION_KEY`.
pub(super) const ENV_PREFIX: &str = "BATCHLY_";

/// One setting: its dotted name (`section.key`; sections contain no underscore, so the
/// environment name `BATCHLY_SECTION_KEY` maps back unambiguously), how its value is parsed and
/// where it is stored, its built-in default, a one-line description, and whether it is secret.
pub(super) struct Key {
    pub(super) name: &'static str,
    pub(super) slot: Slot,
    pub(super) default: Builtin,
    pub(super) doc: &'static str,
    pub(super) secret: bool,
}

pub(super) enum Builtin {
    /// No default: the setting is optional, or required only by some commands.
    Unset,
    /// Parsed exactly like a value from the environment.
    Value(&'static str),
    /// The number of CPUs this process may use.
    CpuCount,
}

/// What a key's value is and which field of [`Config`] holds it.
pub(super) enum Slot {
    QueueUrls(Field<Vec<String>>),
    OptionalUrl(Field<Option<String>>),
    Count {
        positive: bool,
        field: Field<usize>,
    },
    /// How many times something may happen: at least once.
    Times(Field<u32>),
    Seconds {
        positive: bool,
        field: Field<Duration>,
    },
    Size(Field<u64>),
    Path(Field<PathBuf>),
    /// Absolute paths: a TOML array, or `:`-separated in the environment.
    Paths(Field<Vec<PathBuf>>),
    Text {
        /// Returns what was expected when the text is not acceptable.
        check: fn(&str) -> Result<(), &'static str>,
        field: Field<String>,
    },
    OptionalText {
        /// Returns what was expected when the text is not acceptable.
        check: fn(&str) -> Result<(), &'static str>,
        field: Field<Option<String>>,
    },
    LogFormat(Field<LogFormat>),
    SandboxMode(Field<SandboxMode>),
    UidRange(Field<UidRange>),
    /// `true` or `false`: a TOML boolean, or that text in the environment.
    Flag(Field<bool>),
    /// Names, each once: a TOML array of strings, or `,`-separated in the environment.
    Names {
        /// Returns what was expected when one name is not acceptable.
        check: fn(&str) -> Result<(), &'static str>,
        /// Most names the list may hold.
        max: usize,
        field: Field<Vec<String>>,
    },
    /// A `host:port` on the loopback interface, for a local endpoint.
    LoopbackAddr(Field<Option<SocketAddr>>),
}

pub(super) struct Field<T: 'static> {
    pub(super) get: fn(&Config) -> &T,
    pub(super) set: fn(&mut Config) -> &mut T,
}

macro_rules! field {
    ($section:ident . $name:ident) => {
        Field {
            get: |config| &config.$section.$name,
            set: |config| &mut config.$section.$name,
        }
    };
}

pub(super) static KEYS: &[Key] = &[
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
        name: "jobs.max_requeues",
        slot: Slot::Times(field!(jobs.max_requeues)),
        default: Builtin::Value("20"),
        doc: "times a job may be released without it counting as a failed attempt (exit 75, \
              drain, agent-side trouble) before it is dead-lettered as agent_gave_up",
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
        name: "logs.spool_dir",
        slot: Slot::Path(field!(logs.spool_dir)),
        default: Builtin::Value("/var/lib/batchly/spool"),
        doc: "directory holding job output and the agent's log until shipped to CloudWatch Logs \
              (`dev`: the jobs' logs, kept)",
        secret: false,
    },
    Key {
        name: "logs.spool_max_bytes",
        slot: Slot::Size(field!(logs.spool_max_bytes)),
        default: Builtin::Value("2GiB"),
        doc: "most bytes the spool holds; past it the oldest unshipped output is dropped, \
              counted and noted in its stream (`dev`: the oldest logs are removed)",
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
        name: "metrics.interval_s",
        slot: Slot::Seconds {
            positive: true,
            field: field!(metrics.interval),
        },
        default: Builtin::Value("60"),
        doc: "seconds of metrics aggregated into one CloudWatch data point",
        secret: false,
    },
    Key {
        name: "metrics.instance_dimension",
        slot: Slot::Flag(field!(metrics.instance_dimension)),
        default: Builtin::Value("false"),
        doc: "add an InstanceId dimension to every metric (each instance's metrics are then billed separately)",
        secret: false,
    },
    Key {
        name: "metrics.tag_dimensions",
        slot: Slot::Names {
            check: check_dimension_name,
            max: MAX_TAG_DIMENSIONS,
            field: field!(metrics.tag_dimensions),
        },
        default: Builtin::Value(""),
        doc: "job tag keys published as dimensions of the job metrics (each distinct value is a billed metric)",
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
        name: "drain.rebalance_resume_s",
        slot: Slot::Seconds {
            positive: true,
            field: field!(drain.rebalance_resume),
        },
        default: Builtin::Value("600"),
        doc: "after a rebalance recommendation paused intake, resume it after this many seconds if no interruption notice followed",
        secret: false,
    },
    Key {
        name: "drain.lifecycle_hook",
        slot: Slot::OptionalText {
            check: check_lifecycle_hook_name,
            field: field!(drain.lifecycle_hook),
        },
        default: Builtin::Unset,
        doc: "the Auto Scaling group's termination lifecycle hook: heartbeated while the agent drains for it, completed with CONTINUE after",
        secret: false,
    },
    Key {
        name: "drain.launch_hook",
        slot: Slot::OptionalText {
            check: check_lifecycle_hook_name,
            field: field!(drain.launch_hook),
        },
        default: Builtin::Unset,
        doc: "the Auto Scaling group's launch lifecycle hook: completed with CONTINUE once the agent is ready to take jobs",
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
        name: "admin.listen",
        slot: Slot::LoopbackAddr(field!(admin.listen)),
        default: Builtin::Unset,
        doc: "loopback host:port for HTTP /healthz and /metrics (Prometheus); unset: no listener",
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
        name: "sandbox.mode",
        slot: Slot::SandboxMode(field!(sandbox.mode)),
        default: Builtin::Value("full"),
        doc: "\"full\" isolates every job (or refuses it); \"none\" runs jobs unisolated and needs `run --insecure-no-sandbox`",
        secret: false,
    },
    Key {
        name: "sandbox.uid_range",
        slot: Slot::UidRange(field!(sandbox.uid_range)),
        default: Builtin::Value("1900000000-1900000999"),
        doc: "job uids and gids, one per slot (FIRST-LAST); none may belong to an account or be root",
        secret: false,
    },
    Key {
        name: "sandbox.default_pids",
        slot: Slot::Count {
            positive: false,
            field: field!(sandbox.default_pids),
        },
        default: Builtin::Value("4096"),
        doc: "processes and threads a job may have when its spec gives no resources.pids (0: no limit)",
        secret: false,
    },
    Key {
        name: "sandbox.default_memory_mib",
        slot: Slot::Count {
            positive: false,
            field: field!(sandbox.default_memory_mib),
        },
        default: Builtin::Value("0"),
        doc: "memory (MiB) of a job whose spec gives no resources.memory_mib (0: no limit but the host's)",
        secret: false,
    },
    Key {
        name: "sandbox.bind_paths",
        slot: Slot::Paths(field!(sandbox.bind_paths)),
        default: Builtin::Value(""),
        doc: "host directories every job may write, at the same path (a shared scratch disk)",
        secret: false,
    },
    Key {
        name: "sandbox.readonly_paths",
        slot: Slot::Paths(field!(sandbox.readonly_paths)),
        default: Builtin::Value(""),
        doc: "host directories every job may read at the same path, even under the fresh /run, /tmp and /var/tmp (site tools)",
        secret: false,
    },
    Key {
        name: "sandbox.max_file_size",
        slot: Slot::Size(field!(sandbox.max_file_bytes)),
        default: Builtin::Value("0"),
        doc: "the largest file a job may write (RLIMIT_FSIZE; past it the write fails and the job gets SIGXFSZ): bytes or a size such as 50GiB; 0 is no limit",
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
        slot: Slot::OptionalText {
            check: check_non_empty,
            field: field!(agent.instance_id),
        },
        default: Builtin::Unset,
        doc: "the instance_id in events (unset: read from instance metadata by `run`, host-<hostname> where that is off)",
        secret: false,
    },
];

pub(super) fn find_key(name: &str) -> Option<(usize, &'static Key)> {
    KEYS.iter().enumerate().find(|(_, key)| key.name == name)
}

pub(super) fn env_name(key_name: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key_name.replace('.', "_").to_ascii_uppercase()
    )
}

pub(super) fn split_name(key_name: &str) -> (&str, &str) {
    key_name.split_once('.').unwrap_or(("", key_name))
}

/// Section names in schema order, each once.
pub(super) fn sections() -> Vec<&'static str> {
    let mut sections: Vec<&'static str> = Vec::new();
    for key in KEYS {
        let (section, _) = split_name(key.name);
        if !sections.contains(&section) {
            sections.push(section);
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
