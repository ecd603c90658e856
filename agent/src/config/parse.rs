//! Turning one value, from the file (typed TOML) or from text (environment, mode and built-in
//! defaults), into its checked, typed form: counts, seconds, sizes, URLs, absolute paths, log
//! formats and CloudWatch names. A refusal says what was expected and what was given; the caller
//! adds the key and where the value came from.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::keys::Slot;
use super::{Config, LogFormat, SandboxMode, UidRange};

/// Longest duration any `*_s` key accepts, so that deadline arithmetic (`Instant + Duration`)
/// can never overflow: one year.
const MAX_SECONDS: u64 = 365 * 24 * 60 * 60;
// CloudWatch Logs CreateLogGroup: logGroupName is 1..=512 characters of [a-zA-Z0-9_\-/.#].
const LOG_GROUP_NAME_MAX_LEN: usize = 512;
// CloudWatch PutMetricData: Namespace is 1..=255 printable ASCII characters, pattern [^:].*
const METRICS_NAMESPACE_MAX_LEN: usize = 255;
// CloudWatch PutMetricData: namespaces starting with "AWS/" are reserved for AWS services.
const RESERVED_METRICS_NAMESPACE_PREFIX: &str = "AWS/";
// CloudWatch Dimension: Name is 1..=255 ASCII characters, pattern [^:].*
const DIMENSION_NAME_MAX_LEN: usize = 255;

/// A value as it arrives: typed from the file, or text from the environment, the caller's mode
/// defaults and the built-in defaults.
#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
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
pub(super) struct Rejection {
    expected: String,
    got: String,
}

impl Rejection {
    pub(super) fn new(expected: impl Into<String>, got: impl Into<String>) -> Rejection {
        Rejection {
            expected: expected.into(),
            got: got.into(),
        }
    }

    pub(super) fn problem(&self, secret: bool) -> String {
        let got = if secret { "<redacted>" } else { &self.got };
        format!("expected {}, got {got}", self.expected)
    }
}

/// How a TOML value is shown in an error: strings quoted, everything else with its type.
pub(super) fn describe(value: &toml::Value) -> String {
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
    pub(super) fn store(&self, config: &mut Config, input: Input<'_>) -> Result<(), Rejection> {
        match self {
            Slot::QueueUrls(field) => *(field.set)(config) = parse_queue_urls(input)?,
            Slot::OptionalUrl(field) => *(field.set)(config) = Some(parse_url(input)?),
            Slot::Count { positive, field } => {
                let count = parse_integer(input, *positive)?;
                *(field.set)(config) = usize::try_from(count)
                    .map_err(|_| Rejection::new("a smaller number", count.to_string()))?;
            }
            Slot::Times(field) => {
                let times = parse_integer(input, true)?;
                *(field.set)(config) = u32::try_from(times).map_err(|_| {
                    Rejection::new(format!("at most {}", u32::MAX), times.to_string())
                })?;
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
            Slot::Paths(field) => *(field.set)(config) = parse_paths(input)?,
            Slot::Text { check, field } => {
                let text = input.string("a string")?;
                check(text).map_err(|expected| Rejection::new(expected, format!("{text:?}")))?;
                *(field.set)(config) = text.to_string();
            }
            Slot::OptionalText { check, field } => {
                let text = input.string("a string")?;
                check(text).map_err(|expected| Rejection::new(expected, format!("{text:?}")))?;
                *(field.set)(config) = Some(text.to_string());
            }
            Slot::LogFormat(field) => *(field.set)(config) = parse_log_format(input)?,
            Slot::SandboxMode(field) => *(field.set)(config) = parse_sandbox_mode(input)?,
            Slot::UidRange(field) => *(field.set)(config) = parse_uid_range(input)?,
            Slot::Flag(field) => *(field.set)(config) = parse_flag(input)?,
            Slot::Names { check, max, field } => {
                *(field.set)(config) = parse_names(input, *check, *max)?
            }
            Slot::LoopbackAddr(field) => *(field.set)(config) = Some(parse_loopback_addr(input)?),
        }
        Ok(())
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

fn parse_paths(input: Input<'_>) -> Result<Vec<PathBuf>, Rejection> {
    const EXPECTED: &str = "an array of absolute path strings";
    let texts: Vec<String> = match input {
        Input::Toml(toml::Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                toml::Value::String(path) => Ok(path.clone()),
                other => Err(Rejection::new(
                    EXPECTED,
                    format!("{} in the array", describe(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Input::Toml(other) => return Err(Rejection::new(EXPECTED, describe(other))),
        Input::Text(text) => text
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
    };
    texts
        .iter()
        .map(|text| {
            let path = PathBuf::from(text);
            if path.is_absolute() && path != Path::new("/") {
                Ok(path)
            } else {
                Err(Rejection::new(
                    "absolute paths other than /",
                    format!("{text:?}"),
                ))
            }
        })
        .collect()
}

fn parse_log_format(input: Input<'_>) -> Result<LogFormat, Rejection> {
    const EXPECTED: &str = "\"text\" or \"json\"";
    match input.string(EXPECTED)? {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(Rejection::new(EXPECTED, format!("{other:?}"))),
    }
}

fn parse_sandbox_mode(input: Input<'_>) -> Result<SandboxMode, Rejection> {
    const EXPECTED: &str = "\"full\" or \"none\"";
    match input.string(EXPECTED)? {
        "full" => Ok(SandboxMode::Full),
        "none" => Ok(SandboxMode::None),
        other => Err(Rejection::new(EXPECTED, format!("{other:?}"))),
    }
}

fn parse_uid_range(input: Input<'_>) -> Result<UidRange, Rejection> {
    const EXPECTED: &str = "a uid range FIRST-LAST such as \"1900000000-1900000999\", above 0";
    let text = input.string(EXPECTED)?;
    let bad = || Rejection::new(EXPECTED, format!("{text:?}"));
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let number = |n: &str| n.trim().parse::<u32>().map_err(|_| bad());
    let (first, last) = (number(first)?, number(last)?);
    // uid 0 is root; u32::MAX is the kernel's "no uid" (-1).
    if first == 0 || last < first || last == u32::MAX {
        return Err(bad());
    }
    Ok(UidRange { first, last })
}

fn parse_flag(input: Input<'_>) -> Result<bool, Rejection> {
    const EXPECTED: &str = "true or false";
    match input {
        Input::Toml(toml::Value::Boolean(flag)) => Ok(*flag),
        Input::Toml(other) => Err(Rejection::new(EXPECTED, describe(other))),
        Input::Text("true") => Ok(true),
        Input::Text("false") => Ok(false),
        Input::Text(text) => Err(Rejection::new(EXPECTED, format!("{text:?}"))),
    }
}

/// A TOML array of strings, or (from text) comma-separated names; an empty text is no names.
/// Each name passes `check` and appears once; at most `max` of them.
fn parse_names(
    input: Input<'_>,
    check: fn(&str) -> Result<(), &'static str>,
    max: usize,
) -> Result<Vec<String>, Rejection> {
    const EXPECTED: &str = "an array of strings";
    let names: Vec<String> = match input {
        Input::Toml(toml::Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                toml::Value::String(name) => Ok(name.clone()),
                other => Err(Rejection::new(
                    EXPECTED,
                    format!("{} in the array", describe(other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Input::Toml(other) => return Err(Rejection::new(EXPECTED, describe(other))),
        Input::Text(text) if text.trim().is_empty() => Vec::new(),
        Input::Text(text) => text
            .split(',')
            .map(|name| name.trim().to_string())
            .collect(),
    };
    if names.len() > max {
        return Err(Rejection::new(
            format!("at most {max} names"),
            names.len().to_string(),
        ));
    }
    for (position, name) in names.iter().enumerate() {
        check(name).map_err(|expected| Rejection::new(expected, format!("{name:?}")))?;
        if names[..position].contains(name) {
            return Err(Rejection::new("each name once", format!("{name:?} twice")));
        }
    }
    Ok(names)
}

/// `127.0.0.1:9464`, `[::1]:9464` or `localhost:9464` (taken as 127.0.0.1, never resolved). Only
/// loopback addresses: what listens there is for this host's eyes only.
fn parse_loopback_addr(input: Input<'_>) -> Result<SocketAddr, Rejection> {
    const EXPECTED: &str =
        "a host:port such as 127.0.0.1:9464, [::1]:9464 or localhost:9464, port not 0";
    let text = input.string(EXPECTED)?;
    let addr = match text.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        None => text.parse::<SocketAddr>().ok(),
    };
    let addr = addr
        .filter(|addr| addr.port() != 0)
        .ok_or_else(|| Rejection::new(EXPECTED, format!("{text:?}")))?;
    if !addr.ip().is_loopback() {
        return Err(Rejection::new(
            "a loopback address (127.0.0.0/8, ::1 or localhost): the listener serves local endpoints only",
            format!("{text:?}"),
        ));
    }
    Ok(addr)
}

pub(super) fn check_non_empty(text: &str) -> Result<(), &'static str> {
    if text.trim().is_empty() {
        Err("a non-empty string")
    } else {
        Ok(())
    }
}

pub(super) fn check_log_group_name(name: &str) -> Result<(), &'static str> {
    let allowed =
        |character: char| character.is_ascii_alphanumeric() || "_-/.#".contains(character);
    if (1..=LOG_GROUP_NAME_MAX_LEN).contains(&name.len()) && name.chars().all(allowed) {
        Ok(())
    } else {
        Err("a CloudWatch Logs group name: 1 to 512 of a-z A-Z 0-9 _ - / . #")
    }
}

/// Auto Scaling's limit on a lifecycle hook's name (`LifecycleHookName`).
const LIFECYCLE_HOOK_NAME_MAX_LEN: usize = 255;

pub(super) fn check_lifecycle_hook_name(name: &str) -> Result<(), &'static str> {
    let allowed = |character: char| character.is_ascii_alphanumeric() || "_-/".contains(character);
    if (1..=LIFECYCLE_HOOK_NAME_MAX_LEN).contains(&name.len()) && name.chars().all(allowed) {
        Ok(())
    } else {
        Err("a lifecycle hook name: 1 to 255 of a-z A-Z 0-9 _ - /")
    }
}

pub(super) fn check_metrics_namespace(namespace: &str) -> Result<(), &'static str> {
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

/// A CloudWatch dimension name that is not one of the agent's own dimensions (a tag named
/// `Queue` would collide with the queue's).
pub(super) fn check_dimension_name(name: &str) -> Result<(), &'static str> {
    let printable_ascii = name.chars().all(|character| matches!(character, ' '..='~'));
    if !(1..=DIMENSION_NAME_MAX_LEN).contains(&name.len())
        || !printable_ascii
        || name.trim().is_empty()
        || name.starts_with(':')
    {
        return Err("a CloudWatch dimension name: 1 to 255 printable ASCII characters, not starting with ':'");
    }
    if crate::telemetry::metrics::AGENT_DIMENSIONS.contains(&name) {
        return Err("a tag key other than the agent's own dimensions (AutoScalingGroupName, InstanceId, Queue, Outcome, Reason)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;
    use super::*;

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
    fn max_requeues_is_twenty_unless_the_file_or_the_environment_says_otherwise() {
        assert_eq!(load(None, &[], &[]).config().jobs.max_requeues, 20);
        let config = load(Some("[jobs]\nmax_requeues = 5\n"), &[], &[]).config();
        assert_eq!(config.jobs.max_requeues, 5);
        let config = load(
            Some("[jobs]\nmax_requeues = 5\n"),
            &[("BATCHLY_JOBS_MAX_REQUEUES", "1")],
            &[],
        )
        .config();
        assert_eq!(config.jobs.max_requeues, 1);
    }

    #[test]
    fn max_requeues_of_zero_or_beyond_u32_is_refused_naming_the_variable() {
        let loaded = load(None, &[("BATCHLY_JOBS_MAX_REQUEUES", "0")], &[]);
        assert_eq!(
            loaded.error(),
            "jobs.max_requeues: expected a positive integer, got 0 (from BATCHLY_JOBS_MAX_REQUEUES)"
        );
        let loaded = load(None, &[("BATCHLY_JOBS_MAX_REQUEUES", "4294967296")], &[]);
        assert_eq!(
            loaded.error(),
            "jobs.max_requeues: expected at most 4294967295, got 4294967296 \
             (from BATCHLY_JOBS_MAX_REQUEUES)"
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
    fn uid_ranges_are_first_dash_last_above_root_and_cover_every_slot() {
        let config = load(
            Some("[sandbox]\nuid_range = \"70000-70003\"\n[jobs]\nmax_concurrent = 4\n"),
            &[],
            &[],
        )
        .config();
        assert_eq!(config.sandbox.uid_range.first, 70000);
        assert_eq!(config.sandbox.uid_range.for_slot(3), Some(70003));
        assert_eq!(config.sandbox.uid_range.for_slot(4), None);
        for junk in ["0-10", "10-5", "61000", "a-b", "1-4294967295", "-"] {
            let loaded = load(None, &[("BATCHLY_SANDBOX_UID_RANGE", junk)], &[]);
            assert!(
                loaded
                    .error()
                    .starts_with("sandbox.uid_range: expected a uid range FIRST-LAST"),
                "{junk}: {}",
                loaded.error()
            );
        }
        let loaded = load(
            None,
            &[
                ("BATCHLY_SANDBOX_UID_RANGE", "61000-61001"),
                ("BATCHLY_JOBS_MAX_CONCURRENT", "3"),
            ],
            &[],
        );
        assert_eq!(
            loaded.error(),
            "sandbox.uid_range: expected at least one uid per job slot (jobs.max_concurrent = 3), \
             got 61000-61001 (2 uids) (from BATCHLY_SANDBOX_UID_RANGE)"
        );
        // Without a sandbox no uid is used, so the range does not matter.
        let config = load(
            None,
            &[
                ("BATCHLY_SANDBOX_UID_RANGE", "61000-61001"),
                ("BATCHLY_JOBS_MAX_CONCURRENT", "3"),
                ("BATCHLY_SANDBOX_MODE", "none"),
            ],
            &[],
        )
        .config();
        assert_eq!(config.sandbox.mode, super::SandboxMode::None);
        let loaded = load(None, &[("BATCHLY_SANDBOX_MODE", "off")], &[]);
        assert_eq!(
            loaded.error(),
            "sandbox.mode: expected \"full\" or \"none\", got \"off\" (from BATCHLY_SANDBOX_MODE)"
        );
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
    fn metrics_interval_is_a_minute_unless_set_and_must_be_positive() {
        let config = load(None, &[], &[]).config();
        assert_eq!(config.metrics.interval, Duration::from_secs(60));
        let config = load(Some("[metrics]\ninterval_s = 10\n"), &[], &[]).config();
        assert_eq!(config.metrics.interval, Duration::from_secs(10));
        let loaded = load(None, &[("BATCHLY_METRICS_INTERVAL_S", "0")], &[]);
        assert_eq!(
            loaded.error(),
            "metrics.interval_s: expected a positive integer, got 0 (from BATCHLY_METRICS_INTERVAL_S)"
        );
    }

    #[test]
    fn instance_dimension_is_off_unless_a_boolean_turns_it_on() {
        assert!(!load(None, &[], &[]).config().metrics.instance_dimension);
        let config = load(Some("[metrics]\ninstance_dimension = true\n"), &[], &[]).config();
        assert!(config.metrics.instance_dimension);
        let config = load(
            Some("[metrics]\ninstance_dimension = true\n"),
            &[("BATCHLY_METRICS_INSTANCE_DIMENSION", "false")],
            &[],
        )
        .config();
        assert!(!config.metrics.instance_dimension);
        let loaded = load(Some("[metrics]\ninstance_dimension = \"yes\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "metrics.instance_dimension: expected true or false, got \"yes\" (from {})",
                loaded.path()
            )
        );
        let loaded = load(None, &[("BATCHLY_METRICS_INSTANCE_DIMENSION", "1")], &[]);
        assert_eq!(
            loaded.error(),
            "metrics.instance_dimension: expected true or false, got \"1\" \
             (from BATCHLY_METRICS_INSTANCE_DIMENSION)"
        );
    }

    #[test]
    fn tag_dimensions_are_none_by_default_and_taken_from_an_array_or_a_comma_list() {
        assert!(load(None, &[], &[])
            .config()
            .metrics
            .tag_dimensions
            .is_empty());
        let config = load(
            Some("[metrics]\ntag_dimensions = [\"team\", \"cost-center\"]\n"),
            &[],
            &[],
        )
        .config();
        assert_eq!(config.metrics.tag_dimensions, ["team", "cost-center"]);
        let config = load(
            None,
            &[("BATCHLY_METRICS_TAG_DIMENSIONS", "team, project")],
            &[],
        )
        .config();
        assert_eq!(config.metrics.tag_dimensions, ["team", "project"]);
    }

    #[test]
    fn tag_dimensions_must_be_cloudwatch_dimension_names_each_once_and_not_the_agents_own() {
        let name_rule = "expected a CloudWatch dimension name: 1 to 255 printable ASCII \
                         characters, not starting with ':'";
        let long = "k".repeat(256);
        for (bad, shown) in [
            (":team", "\":team\"".to_string()),
            ("t\u{e9}am", "\"t\u{e9}am\"".to_string()),
            ("  ", "\"  \"".to_string()),
            (long.as_str(), format!("{long:?}")),
        ] {
            let file = format!("[metrics]\ntag_dimensions = [{}]\n", toml::Value::from(bad));
            let loaded = load(Some(&file), &[], &[]);
            assert_eq!(
                loaded.error(),
                format!(
                    "metrics.tag_dimensions: {name_rule}, got {shown} (from {})",
                    loaded.path()
                )
            );
        }
        let loaded = load(None, &[("BATCHLY_METRICS_TAG_DIMENSIONS", "team,")], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "metrics.tag_dimensions: {name_rule}, got \"\" (from BATCHLY_METRICS_TAG_DIMENSIONS)"
            )
        );
        let loaded = load(
            None,
            &[("BATCHLY_METRICS_TAG_DIMENSIONS", "team,project,team")],
            &[],
        );
        assert_eq!(
            loaded.error(),
            "metrics.tag_dimensions: expected each name once, got \"team\" twice \
             (from BATCHLY_METRICS_TAG_DIMENSIONS)"
        );
        let loaded = load(None, &[("BATCHLY_METRICS_TAG_DIMENSIONS", "Queue")], &[]);
        assert_eq!(
            loaded.error(),
            "metrics.tag_dimensions: expected a tag key other than the agent's own dimensions \
             (AutoScalingGroupName, InstanceId, Queue, Outcome, Reason), got \"Queue\" \
             (from BATCHLY_METRICS_TAG_DIMENSIONS)"
        );
        let many: Vec<String> = (0..26).map(|n| format!("tag{n}")).collect();
        let loaded = load(
            None,
            &[("BATCHLY_METRICS_TAG_DIMENSIONS", many.join(",").as_str())],
            &[],
        );
        assert_eq!(
            loaded.error(),
            "metrics.tag_dimensions: expected at most 25 names, got 26 \
             (from BATCHLY_METRICS_TAG_DIMENSIONS)"
        );
        let loaded = load(Some("[metrics]\ntag_dimensions = \"team\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "metrics.tag_dimensions: expected an array of strings, got \"team\" (from {})",
                loaded.path()
            )
        );
    }

    #[test]
    fn admin_listen_is_off_by_default_and_takes_loopback_addresses_only() {
        assert_eq!(load(None, &[], &[]).config().admin.listen, None);
        for (text, addr) in [
            ("127.0.0.1:9464", "127.0.0.1:9464"),
            ("127.0.0.53:80", "127.0.0.53:80"),
            ("[::1]:9464", "[::1]:9464"),
            ("localhost:9464", "127.0.0.1:9464"),
        ] {
            let config = load(None, &[("BATCHLY_ADMIN_LISTEN", text)], &[]).config();
            assert_eq!(
                config.admin.listen.map(|a| a.to_string()).as_deref(),
                Some(addr),
                "{text}"
            );
        }
        for public in ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464"] {
            let loaded = load(None, &[("BATCHLY_ADMIN_LISTEN", public)], &[]);
            assert_eq!(
                loaded.error(),
                format!(
                    "admin.listen: expected a loopback address (127.0.0.0/8, ::1 or localhost): \
                     the listener serves local endpoints only, got {public:?} \
                     (from BATCHLY_ADMIN_LISTEN)"
                )
            );
        }
        for junk in [
            "9464",
            "localhost",
            "example.com:80",
            "127.0.0.1:0",
            "127.0.0.1:99999",
        ] {
            let loaded = load(None, &[("BATCHLY_ADMIN_LISTEN", junk)], &[]);
            assert_eq!(
                loaded.error(),
                format!(
                    "admin.listen: expected a host:port such as 127.0.0.1:9464, [::1]:9464 or \
                     localhost:9464, port not 0, got {junk:?} (from BATCHLY_ADMIN_LISTEN)"
                )
            );
        }
    }

    #[test]
    fn metrics_and_listener_settings_render_and_load_back_unchanged() {
        let original = load(
            Some(
                "[metrics]\ninterval_s = 15\ninstance_dimension = true\n\
                 tag_dimensions = [\"team\", \"project\"]\n[admin]\nlisten = \"[::1]:9464\"\n",
            ),
            &[],
            &[],
        )
        .config();
        let rendered = original.render();
        assert!(
            rendered.contains("tag_dimensions = [\"team\", \"project\"]  # from "),
            "{rendered}"
        );
        let reloaded = load(Some(&rendered), &[], &[]).config();
        assert_eq!(reloaded.metrics, original.metrics);
        assert_eq!(reloaded.admin, original.admin);
        assert!(load(None, &[], &[])
            .config()
            .render()
            .contains("# listen is not set\n"));
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
}
