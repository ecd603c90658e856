//! The job spec, version 1: the JSON text carried in an envelope's `job`
//! member, turned into a checked [`JobSpec`] or a one-line explanation that
//! names the offending member. It also owns the strict JSON reader that the
//! envelope parser shares, because both must refuse duplicate members and
//! tell integers from floats. This module only describes a job: it must
//! never touch the filesystem, the network or a process.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Longest job id; the id becomes a directory name and a metric dimension.
const MAX_ID_CHARS: usize = 128;
/// At most this many tags (spec: "at most 10 pairs").
const MAX_TAGS: usize = 10;
/// Tag key length limit (spec: keys 1–64 chars).
const MAX_TAG_KEY_CHARS: usize = 64;
/// Tag value length limit (spec: values 0–256 chars).
const MAX_TAG_VALUE_CHARS: usize = 256;
/// S3 object keys are at most 1024 bytes of UTF-8 (S3 user guide, "Naming objects").
const MAX_S3_KEY_BYTES: usize = 1024;
/// Spec default for `interrupt.grace_s`.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// A job as the agent will run it; exists only in checked form.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: String,
    /// argv; `command[0]` is executed directly, never through a shell.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `None`: the agent's configured default applies. Can be very large
    /// (any `u64` seconds): add it to an `Instant` with `checked_add`.
    pub timeout: Option<Duration>,
    pub resources: Resources,
    pub network: Network,
    pub inputs: Vec<Transfer>,
    pub outputs: Vec<Transfer>,
    pub interrupt: Interrupt,
    pub max_attempts: u32,
    pub tags: BTreeMap<String, String>,
}

/// Limits requested by the job; `None` means "the agent's default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub vcpus: Option<f64>,
    pub memory_mib: Option<u64>,
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// No network at all: the safe default.
    #[default]
    None,
    /// Outbound allowed; instance metadata and link-local stay blocked.
    Egress,
}

impl Network {
    pub fn as_str(&self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Egress => "egress",
        }
    }
}

/// One file moved between S3 and the job's work dir.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    /// `s3://bucket/key` for inputs; `s3://bucket/prefix` (may end in `/`) for outputs.
    pub url: String,
    /// Relative to the work dir, normalized: no `.`, `..`, or root components.
    pub path: PathBuf,
}

/// How the job is asked to stop when the agent drains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interrupt {
    pub signal: Signal,
    /// Time between `signal` and SIGKILL.
    pub grace: Duration,
}

impl Default for Interrupt {
    fn default() -> Self {
        Interrupt {
            signal: Signal::SIGTERM,
            grace: DEFAULT_GRACE,
        }
    }
}

impl JobSpec {
    /// Parses and checks the job spec text. The error is a human sentence
    /// naming the member, e.g. `command: must not be empty`.
    pub fn parse(text: &str) -> Result<JobSpec, String> {
        let root: Json = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let mut members = Members::of(root, Where::Root)?;

        let id = job_id(members.required("id")?)?;
        let command = command(members.required("command")?)?;
        let env = members.optional("env").map(env).transpose()?;
        let timeout = members
            .optional("timeout_s")
            .map(|v| positive_integer(v, "timeout_s").map(Duration::from_secs))
            .transpose()?;
        let resources = members.optional("resources").map(resources).transpose()?;
        let network = members.optional("network").map(network).transpose()?;
        let inputs = members
            .optional("inputs")
            .map(|v| transfers(v, Direction::Input))
            .transpose()?;
        let outputs = members
            .optional("outputs")
            .map(|v| transfers(v, Direction::Output))
            .transpose()?;
        let interrupt = members.optional("interrupt").map(interrupt).transpose()?;
        let max_attempts = members
            .optional("max_attempts")
            .map(max_attempts)
            .transpose()?;
        let tags = members.optional("tags").map(tags).transpose()?;
        members.finish()?;

        Ok(JobSpec {
            id,
            command,
            env: env.unwrap_or_default(),
            timeout,
            resources: resources.unwrap_or_default(),
            network: network.unwrap_or_default(),
            inputs: inputs.unwrap_or_default(),
            outputs: outputs.unwrap_or_default(),
            interrupt: interrupt.unwrap_or_default(),
            max_attempts: max_attempts.unwrap_or(1),
            tags: tags.unwrap_or_default(),
        })
    }
}

impl JobSpec {
    /// Whether `id` follows the job id rule (used to name a rejected job).
    pub fn valid_id(id: &str) -> bool {
        let len = id.chars().count();
        (1..=MAX_ID_CHARS).contains(&len) && id.chars().all(is_id_char) && id != "." && id != ".."
    }
}

fn job_id(value: Json) -> Result<String, String> {
    let id = value.into_string("id")?;
    let len = id.chars().count();
    if len == 0 || len > MAX_ID_CHARS {
        return Err(format!(
            "id: must be 1 to {MAX_ID_CHARS} characters, got {len}"
        ));
    }
    if let Some(bad) = id.chars().find(|c| !is_id_char(*c)) {
        return Err(format!(
            "id: {} contains {bad:?}; allowed are A-Z a-z 0-9 . _ -",
            quoted(&id)
        ));
    }
    // The id names the job's directory, so these two would alias a parent.
    if id == "." || id == ".." {
        return Err(format!(
            "id: {} is not usable as a directory name",
            quoted(&id)
        ));
    }
    Ok(id)
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn command(value: Json) -> Result<Vec<String>, String> {
    let items = value.into_array("command")?;
    if items.is_empty() {
        return Err("command: must not be empty".to_owned());
    }
    let mut argv = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let name = format!("command[{i}]");
        let arg = item.into_string(&name)?;
        // exec takes C strings: a NUL would silently truncate the argument.
        if arg.contains('\0') {
            return Err(format!("{name}: must not contain a NUL character"));
        }
        argv.push(arg);
    }
    if argv[0].is_empty() {
        return Err("command[0]: the program to run must not be empty".to_owned());
    }
    Ok(argv)
}

fn env(value: Json) -> Result<BTreeMap<String, String>, String> {
    let pairs = value.into_object("env")?;
    let mut env = BTreeMap::new();
    for (key, value) in pairs {
        if key.is_empty() {
            return Err("env: variable names must not be empty".to_owned());
        }
        if key.contains('=') || key.contains('\0') {
            return Err(format!(
                "env: variable name {} must not contain '=' or NUL",
                quoted(&key)
            ));
        }
        let name = format!("env.{key}");
        let value = value.into_string(&name)?;
        if value.contains('\0') {
            return Err(format!("{name}: must not contain a NUL character"));
        }
        env.insert(key, value);
    }
    Ok(env)
}

fn resources(value: Json) -> Result<Resources, String> {
    let mut members = Members::of(value, Where::Member("resources"))?;
    let vcpus = members
        .optional("vcpus")
        .map(|v| positive_number(v, "resources.vcpus"))
        .transpose()?;
    let memory_mib = members
        .optional("memory_mib")
        .map(|v| positive_integer(v, "resources.memory_mib"))
        .transpose()?;
    let pids = members
        .optional("pids")
        .map(|v| positive_integer(v, "resources.pids"))
        .transpose()?;
    members.finish()?;
    Ok(Resources {
        vcpus,
        memory_mib,
        pids,
    })
}

fn network(value: Json) -> Result<Network, String> {
    let text = value.into_string("network")?;
    match text.as_str() {
        "none" => Ok(Network::None),
        "egress" => Ok(Network::Egress),
        _ => Err(format!(
            "network: must be \"none\" or \"egress\", got {}",
            quoted(&text)
        )),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Input,
    Output,
}

impl Direction {
    fn member(self) -> &'static str {
        match self {
            Direction::Input => "inputs",
            Direction::Output => "outputs",
        }
    }
}

fn transfers(value: Json, direction: Direction) -> Result<Vec<Transfer>, String> {
    let list = direction.member();
    let items = value.into_array(list)?;
    let mut transfers: Vec<Transfer> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("{list}[{i}]");
        let mut members = Members::of(item, Where::Nested(&at))?;
        let url = members.required("url")?.into_string(&format!("{at}.url"))?;
        let url = s3_url(&url, direction).map_err(|e| format!("{at}.url: {e}"))?;
        let raw_path = members
            .required("path")?
            .into_string(&format!("{at}.path"))?;
        let path = work_dir_path(&raw_path).map_err(|e| format!("{at}.path: {e}"))?;
        members.finish()?;
        // Two downloads to one file would race and leave either content.
        if direction == Direction::Input {
            if let Some(j) = transfers.iter().position(|t| t.path == path) {
                return Err(format!(
                    "{at}.path: {} is also the path of {list}[{j}]",
                    quoted(&raw_path)
                ));
            }
        }
        transfers.push(Transfer { url, path });
    }
    Ok(transfers)
}

/// Checks `s3://bucket/key`. An input names one object; an output names a
/// prefix that the uploaded files are placed under.
fn s3_url(url: &str, direction: Direction) -> Result<String, String> {
    let shape = match direction {
        Direction::Input => "s3://bucket/key",
        Direction::Output => "s3://bucket/prefix/",
    };
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(format!("{} must have the form {shape}", quoted(url)));
    };
    let (bucket, key) = match rest.split_once('/') {
        Some((bucket, key)) => (bucket, key),
        None => (rest, ""),
    };
    if bucket.is_empty() {
        return Err(format!("{} has no bucket name", quoted(url)));
    }
    // Accepts legacy bucket names (upper case, '_') too; S3 gives the final word.
    if let Some(bad) = bucket.chars().find(|c| !is_id_char(*c)) {
        return Err(format!("{}: bucket name contains {bad:?}", quoted(url)));
    }
    if key.len() > MAX_S3_KEY_BYTES {
        return Err(format!(
            "{}: the key is {} bytes, S3 allows at most {MAX_S3_KEY_BYTES}",
            quoted(url),
            key.len()
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("{} contains a control character", quoted(url)));
    }
    if direction == Direction::Input && (key.is_empty() || key.ends_with('/')) {
        return Err(format!(
            "{} must name an object ({shape}), not a bucket or a prefix",
            quoted(url)
        ));
    }
    Ok(url.to_owned())
}

/// Normalizes a path that must stay inside the work dir. Only lexical:
/// symlinks created by the job itself are the runner's concern.
fn work_dir_path(raw: &str) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if raw.contains('\0') {
        return Err("must not contain a NUL character".to_owned());
    }
    let mut normalized = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => normalized.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("{} escapes the work dir", quoted(raw)));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "{} is absolute; paths are relative to the work dir",
                    quoted(raw)
                ));
            }
        }
    }
    if normalized.as_os_str().is_empty() {
        return Err(format!(
            "{} is the work dir itself; name a file or directory inside it",
            quoted(raw)
        ));
    }
    Ok(normalized)
}

fn interrupt(value: Json) -> Result<Interrupt, String> {
    let mut members = Members::of(value, Where::Member("interrupt"))?;
    let mut interrupt = Interrupt::default();
    if let Some(value) = members.optional("signal") {
        let name = value.into_string("interrupt.signal")?;
        interrupt.signal = Signal::from_str(&name).map_err(|_| {
            format!(
                "interrupt.signal: {} is not a signal name like \"SIGTERM\"",
                quoted(&name)
            )
        })?;
    }
    if let Some(value) = members.optional("grace_s") {
        interrupt.grace = Duration::from_secs(non_negative_integer(value, "interrupt.grace_s")?);
    }
    members.finish()?;
    Ok(interrupt)
}

fn max_attempts(value: Json) -> Result<u32, String> {
    let attempts = positive_integer(value, "max_attempts")?;
    u32::try_from(attempts).map_err(|_| {
        format!(
            "max_attempts: {attempts} is more than the largest allowed, {}",
            u32::MAX
        )
    })
}

fn tags(value: Json) -> Result<BTreeMap<String, String>, String> {
    let pairs = value.into_object("tags")?;
    if pairs.len() > MAX_TAGS {
        return Err(format!(
            "tags: at most {MAX_TAGS} tags are allowed, got {}",
            pairs.len()
        ));
    }
    let mut tags = BTreeMap::new();
    for (key, value) in pairs {
        let key_len = key.chars().count();
        if key_len == 0 || key_len > MAX_TAG_KEY_CHARS {
            return Err(format!(
                "tags: key {} must be 1 to {MAX_TAG_KEY_CHARS} characters, got {key_len}",
                quoted(&key)
            ));
        }
        if let Some(bad) = key.chars().find(|c| !is_tag_char(*c)) {
            return Err(format!(
                "tags: key {} contains {bad:?}; allowed are A-Z a-z 0-9 space _ . : / = + @ -",
                quoted(&key)
            ));
        }
        let name = format!("tags.{key}");
        let value = value.into_string(&name)?;
        let value_len = value.chars().count();
        if value_len > MAX_TAG_VALUE_CHARS {
            return Err(format!(
                "{name}: must be at most {MAX_TAG_VALUE_CHARS} characters, got {value_len}"
            ));
        }
        if let Some(bad) = value.chars().find(|c| !is_tag_char(*c)) {
            return Err(format!(
                "{name}: contains {bad:?}; allowed are A-Z a-z 0-9 space _ . : / = + @ -"
            ));
        }
        tags.insert(key, value);
    }
    Ok(tags)
}

/// Tags become metric dimensions, so they keep to the characters CloudWatch accepts.
fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '.' | ':' | '/' | '=' | '+' | '@' | '-')
}

fn positive_integer(value: Json, name: &str) -> Result<u64, String> {
    let n = non_negative_integer(value, name)?;
    if n == 0 {
        return Err(format!("{name}: must be greater than 0"));
    }
    Ok(n)
}

fn non_negative_integer(value: Json, name: &str) -> Result<u64, String> {
    let n = value.into_integer(name)?;
    if n < 0 {
        return Err(format!("{name}: must not be negative, got {n}"));
    }
    u64::try_from(n).map_err(|_| format!("{name}: {n} is too large"))
}

fn positive_number(value: Json, name: &str) -> Result<f64, String> {
    let n = match value {
        Json::Integer(i) => i as f64,
        Json::Float(f) => f,
        other => return Err(format!("{name}: must be a number, got {}", other.kind())),
    };
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("{name}: must be a number greater than 0, got {n}"));
    }
    Ok(n)
}

/// JSON string literal form of `s`, so odd characters stay visible in errors.
pub(super) fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

// ---------------------------------------------------------------------------
// Strict JSON: a value tree that keeps integers apart from floats and refuses
// duplicate object members. serde_json's own `Value` keeps the last of two
// duplicates, which would let a signer's tooling and the agent disagree
// about what a signed message says.

/// A parsed JSON value. Objects keep their members in document order.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Json {
    Null,
    Bool(bool),
    /// Any JSON number without fraction or exponent that fits in 64 bits
    /// (signed or unsigned); i128 holds both ranges.
    Integer(i128),
    Float(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    pub(super) fn kind(&self) -> String {
        match self {
            Json::Null => "null".to_owned(),
            Json::Bool(b) => b.to_string(),
            Json::Integer(i) => format!("the integer {i}"),
            Json::Float(f) => format!("the non-integer number {f:?}"),
            Json::String(_) => "a string".to_owned(),
            Json::Array(_) => "an array".to_owned(),
            Json::Object(_) => "an object".to_owned(),
        }
    }

    pub(super) fn into_string(self, name: &str) -> Result<String, String> {
        match self {
            Json::String(s) => Ok(s),
            other => Err(format!("{name}: must be a string, got {}", other.kind())),
        }
    }

    pub(super) fn into_integer(self, name: &str) -> Result<i128, String> {
        match self {
            Json::Integer(i) => Ok(i),
            other => Err(format!("{name}: must be an integer, got {}", other.kind())),
        }
    }

    fn into_array(self, name: &str) -> Result<Vec<Json>, String> {
        match self {
            Json::Array(items) => Ok(items),
            other => Err(format!("{name}: must be an array, got {}", other.kind())),
        }
    }

    fn into_object(self, name: &str) -> Result<Vec<(String, Json)>, String> {
        match self {
            Json::Object(members) => Ok(members),
            other => Err(format!("{name}: must be an object, got {}", other.kind())),
        }
    }
}

/// Where an object sits, for error messages: top-level errors carry no prefix.
#[derive(Clone, Copy)]
pub(super) enum Where<'a> {
    Root,
    Member(&'static str),
    Nested(&'a str),
}

impl Where<'_> {
    fn prefix(&self) -> String {
        match self {
            Where::Root => String::new(),
            Where::Member(name) => format!("{name}: "),
            Where::Nested(name) => format!("{name}: "),
        }
    }

    fn path(&self, member: &str) -> String {
        match self {
            Where::Root => member.to_owned(),
            Where::Member(name) => format!("{name}.{member}"),
            Where::Nested(name) => format!("{name}.{member}"),
        }
    }
}

/// The members of one object, taken one by one; whatever is left at
/// `finish` is unknown and therefore an error.
pub(super) struct Members<'a> {
    at: Where<'a>,
    members: Vec<(String, Json)>,
}

impl<'a> Members<'a> {
    pub(super) fn of(value: Json, at: Where<'a>) -> Result<Members<'a>, String> {
        match value {
            Json::Object(members) => Ok(Members { at, members }),
            other => Err(match at {
                Where::Root => format!("must be a JSON object, got {}", other.kind()),
                _ => format!("{}must be an object, got {}", at.prefix(), other.kind()),
            }),
        }
    }

    pub(super) fn optional(&mut self, name: &str) -> Option<Json> {
        let index = self.members.iter().position(|(key, _)| key == name)?;
        Some(self.members.remove(index).1)
    }

    pub(super) fn required(&mut self, name: &str) -> Result<Json, String> {
        self.optional(name)
            .ok_or_else(|| format!("missing member {}", quoted(&self.at.path(name))))
    }

    pub(super) fn finish(self) -> Result<(), String> {
        match self.members.first() {
            None => Ok(()),
            Some((name, _)) => Err(format!(
                "{}unknown member {}",
                self.at.prefix(),
                quoted(name)
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Integer(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Integer(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Json>()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut members: Vec<(String, Json)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.iter().any(|(existing, _)| *existing == key) {
                return Err(de::Error::custom(format!(
                    "duplicate member {}",
                    quoted(&key)
                )));
            }
            let value = map.next_value::<Json>()?;
            members.push((key, value));
        }
        Ok(Json::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        match JobSpec::parse(text) {
            Ok(spec) => panic!("expected {text} to be rejected, got {spec:?}"),
            Err(e) => e,
        }
    }

    fn parse_ok(text: &str) -> JobSpec {
        match JobSpec::parse(text) {
            Ok(spec) => spec,
            Err(e) => panic!("expected {text} to parse, got {e}"),
        }
    }

    /// A minimal valid job with one extra member spliced in.
    fn with(extra: &str) -> String {
        format!(r#"{{"id": "j-1", "command": ["/bin/true"], {extra}}}"#)
    }

    #[test]
    fn minimal_job_gets_the_spec_defaults() {
        let spec = parse_ok(r#"{"id": "j-1", "command": ["/bin/true"]}"#);
        assert_eq!(spec.id, "j-1");
        assert_eq!(spec.command, vec!["/bin/true"]);
        assert!(spec.env.is_empty());
        assert_eq!(spec.timeout, None);
        assert_eq!(spec.resources, Resources::default());
        assert_eq!(spec.network, Network::None);
        assert!(spec.inputs.is_empty() && spec.outputs.is_empty());
        assert_eq!(spec.interrupt.signal, Signal::SIGTERM);
        assert_eq!(spec.interrupt.grace, Duration::from_secs(30));
        assert_eq!(spec.max_attempts, 1);
        assert!(spec.tags.is_empty());
    }

    #[test]
    fn full_job_keeps_every_member() {
        let spec = parse_ok(
            r#"{"id": "eod.risk_2026-11-22", "command": ["/usr/bin/python3", "-m", "eod"],
                "env": {"MODE": "full", "EMPTY": ""}, "timeout_s": 3600,
                "resources": {"vcpus": 2, "memory_mib": 4096, "pids": 128},
                "network": "egress",
                "inputs": [{"url": "s3://data/in/positions.csv", "path": "./in//positions.csv"}],
                "outputs": [{"path": "out", "url": "s3://results/eod/"}],
                "interrupt": {"signal": "SIGINT", "grace_s": 0},
                "max_attempts": 3,
                "tags": {"team": "risk", "cost center": "a/b:c=d+e@f-g_h.i"}}"#,
        );
        assert_eq!(spec.env.get("MODE").map(String::as_str), Some("full"));
        assert_eq!(spec.env.get("EMPTY").map(String::as_str), Some(""));
        assert_eq!(spec.timeout, Some(Duration::from_secs(3600)));
        assert_eq!(
            spec.resources,
            Resources {
                vcpus: Some(2.0),
                memory_mib: Some(4096),
                pids: Some(128)
            }
        );
        assert_eq!(spec.network, Network::Egress);
        assert_eq!(
            spec.inputs,
            vec![Transfer {
                url: "s3://data/in/positions.csv".to_owned(),
                path: PathBuf::from("in/positions.csv"),
            }]
        );
        assert_eq!(spec.outputs[0].path, PathBuf::from("out"));
        assert_eq!(spec.outputs[0].url, "s3://results/eod/");
        assert_eq!(
            spec.interrupt,
            Interrupt {
                signal: Signal::SIGINT,
                grace: Duration::ZERO
            }
        );
        assert_eq!(spec.max_attempts, 3);
        assert_eq!(spec.tags.len(), 2);
    }

    #[test]
    fn job_text_that_is_not_json_is_rejected() {
        assert!(parse_err("not json").starts_with("not valid JSON"));
    }

    #[test]
    fn job_that_is_not_an_object_is_rejected() {
        assert_eq!(
            parse_err(r#"["/bin/true"]"#),
            "must be a JSON object, got an array"
        );
    }

    #[test]
    fn unknown_top_level_member_is_named() {
        assert_eq!(
            parse_err(&with(r#""comand": ["x"]"#)),
            r#"unknown member "comand""#
        );
    }

    #[test]
    fn unknown_nested_member_is_named_with_its_parent() {
        assert_eq!(
            parse_err(&with(r#""resources": {"cpus": 1}"#)),
            r#"resources: unknown member "cpus""#
        );
        assert_eq!(
            parse_err(&with(r#""interrupt": {"signal": "SIGTERM", "grace": 5}"#)),
            r#"interrupt: unknown member "grace""#
        );
        assert_eq!(
            parse_err(&with(
                r#""inputs": [{"url": "s3://b/k", "path": "k", "mode": 1}]"#
            )),
            r#"inputs[0]: unknown member "mode""#
        );
    }

    #[test]
    fn duplicate_member_is_rejected_rather_than_last_one_winning() {
        let err = parse_err(r#"{"id": "a", "command": ["/bin/true"], "command": ["/bin/rm"]}"#);
        assert!(err.contains(r#"duplicate member "command""#), "{err}");
        let err = parse_err(&with(r#""env": {"A": "1", "A": "2"}"#));
        assert!(err.contains(r#"duplicate member "A""#), "{err}");
    }

    #[test]
    fn missing_id_or_command_is_named() {
        assert_eq!(
            parse_err(r#"{"command": ["/bin/true"]}"#),
            r#"missing member "id""#
        );
        assert_eq!(parse_err(r#"{"id": "a"}"#), r#"missing member "command""#);
    }

    #[test]
    fn id_must_use_the_allowed_characters() {
        let err = parse_err(r#"{"id": "../etc", "command": ["/bin/true"]}"#);
        assert!(err.starts_with(r#"id: "../etc" contains '/'"#), "{err}");
        let err = parse_err(r#"{"id": "a b", "command": ["/bin/true"]}"#);
        assert!(err.starts_with("id: "), "{err}");
    }

    #[test]
    fn id_length_is_limited_to_128_characters() {
        let long = "a".repeat(129);
        let err = parse_err(&format!(r#"{{"id": "{long}", "command": ["/bin/true"]}}"#));
        assert_eq!(err, "id: must be 1 to 128 characters, got 129");
        assert_eq!(
            parse_err(r#"{"id": "", "command": ["/bin/true"]}"#),
            "id: must be 1 to 128 characters, got 0"
        );
        let max = "a".repeat(128);
        assert_eq!(
            parse_ok(&format!(r#"{{"id": "{max}", "command": ["/bin/true"]}}"#)).id,
            max
        );
    }

    #[test]
    fn id_dot_and_dot_dot_are_refused_as_directory_names() {
        for id in [".", ".."] {
            let err = parse_err(&format!(r#"{{"id": "{id}", "command": ["/bin/true"]}}"#));
            assert!(err.contains("not usable as a directory name"), "{err}");
        }
    }

    #[test]
    fn command_must_not_be_empty() {
        assert_eq!(
            parse_err(r#"{"id": "a", "command": []}"#),
            "command: must not be empty"
        );
    }

    #[test]
    fn command_program_must_not_be_an_empty_string() {
        assert_eq!(
            parse_err(r#"{"id": "a", "command": ["", "x"]}"#),
            "command[0]: the program to run must not be empty"
        );
    }

    #[test]
    fn command_arguments_must_be_strings_without_nul() {
        assert_eq!(
            parse_err(r#"{"id": "a", "command": ["/bin/echo", 5]}"#),
            "command[1]: must be a string, got the integer 5"
        );
        assert_eq!(
            parse_err(r#"{"id": "a", "command": ["/bin/echo", "a\u0000b"]}"#),
            "command[1]: must not contain a NUL character"
        );
    }

    #[test]
    fn command_given_as_a_shell_string_is_rejected() {
        assert_eq!(
            parse_err(r#"{"id": "a", "command": "/bin/echo hi"}"#),
            "command: must be an array, got a string"
        );
    }

    #[test]
    fn env_names_must_be_usable_variable_names() {
        assert_eq!(
            parse_err(&with(r#""env": {"": "x"}"#)),
            "env: variable names must not be empty"
        );
        assert_eq!(
            parse_err(&with(r#""env": {"A=B": "x"}"#)),
            r#"env: variable name "A=B" must not contain '=' or NUL"#
        );
    }

    #[test]
    fn env_values_must_be_strings_without_nul() {
        assert_eq!(
            parse_err(&with(r#""env": {"A": 1}"#)),
            "env.A: must be a string, got the integer 1"
        );
        assert_eq!(
            parse_err(&with(r#""env": {"A": "x\u0000"}"#)),
            "env.A: must not contain a NUL character"
        );
    }

    #[test]
    fn timeout_must_be_a_positive_integer() {
        assert_eq!(
            parse_err(&with(r#""timeout_s": 0"#)),
            "timeout_s: must be greater than 0"
        );
        assert_eq!(
            parse_err(&with(r#""timeout_s": -5"#)),
            "timeout_s: must not be negative, got -5"
        );
        assert_eq!(
            parse_err(&with(r#""timeout_s": "60""#)),
            "timeout_s: must be an integer, got a string"
        );
    }

    #[test]
    fn integers_written_as_floats_are_rejected() {
        assert_eq!(
            parse_err(&with(r#""timeout_s": 60.0"#)),
            "timeout_s: must be an integer, got the non-integer number 60.0"
        );
        assert_eq!(
            parse_err(&with(r#""max_attempts": 1.0"#)),
            "max_attempts: must be an integer, got the non-integer number 1.0"
        );
        assert_eq!(
            parse_err(&with(r#""resources": {"memory_mib": 1e3}"#)),
            "resources.memory_mib: must be an integer, got the non-integer number 1000.0"
        );
    }

    #[test]
    fn null_is_not_accepted_for_an_optional_member() {
        assert_eq!(
            parse_err(&with(r#""timeout_s": null"#)),
            "timeout_s: must be an integer, got null"
        );
    }

    #[test]
    fn vcpus_must_be_a_positive_number() {
        assert_eq!(
            parse_ok(&with(r#""resources": {"vcpus": 0.25}"#))
                .resources
                .vcpus,
            Some(0.25)
        );
        assert_eq!(
            parse_err(&with(r#""resources": {"vcpus": 0}"#)),
            "resources.vcpus: must be a number greater than 0, got 0"
        );
        assert_eq!(
            parse_err(&with(r#""resources": {"vcpus": "2"}"#)),
            "resources.vcpus: must be a number, got a string"
        );
    }

    #[test]
    fn memory_and_pids_must_be_positive_integers() {
        assert_eq!(
            parse_err(&with(r#""resources": {"memory_mib": 0}"#)),
            "resources.memory_mib: must be greater than 0"
        );
        assert_eq!(
            parse_err(&with(r#""resources": {"pids": -1}"#)),
            "resources.pids: must not be negative, got -1"
        );
    }

    #[test]
    fn network_is_none_or_egress_only() {
        assert_eq!(
            parse_err(&with(r#""network": "host""#)),
            r#"network: must be "none" or "egress", got "host""#
        );
        assert_eq!(
            parse_ok(&with(r#""network": "none""#)).network,
            Network::None
        );
    }

    #[test]
    fn input_path_escaping_the_work_dir_is_rejected() {
        assert_eq!(
            parse_err(&with(
                r#""inputs": [{"url": "s3://b/k", "path": "../../etc/passwd"}]"#
            )),
            r#"inputs[0].path: "../../etc/passwd" escapes the work dir"#
        );
        assert_eq!(
            parse_err(&with(
                r#""outputs": [{"url": "s3://b/p/", "path": "a/../../b"}]"#
            )),
            r#"outputs[0].path: "a/../../b" escapes the work dir"#
        );
    }

    #[test]
    fn absolute_path_is_rejected() {
        assert_eq!(
            parse_err(&with(
                r#""inputs": [{"url": "s3://b/k", "path": "/etc/passwd"}]"#
            )),
            r#"inputs[0].path: "/etc/passwd" is absolute; paths are relative to the work dir"#
        );
    }

    #[test]
    fn empty_path_or_the_work_dir_itself_is_rejected() {
        assert_eq!(
            parse_err(&with(r#""inputs": [{"url": "s3://b/k", "path": ""}]"#)),
            "inputs[0].path: must not be empty"
        );
        let err = parse_err(&with(r#""outputs": [{"url": "s3://b/p/", "path": "./."}]"#));
        assert!(
            err.starts_with(r#"outputs[0].path: "./." is the work dir itself"#),
            "{err}"
        );
    }

    #[test]
    fn dot_components_are_normalized_away() {
        let spec = parse_ok(&with(
            r#""inputs": [{"url": "s3://b/k", "path": "./a/./b/"}]"#,
        ));
        assert_eq!(spec.inputs[0].path, PathBuf::from("a/b"));
    }

    #[test]
    fn two_inputs_to_the_same_path_are_rejected() {
        assert_eq!(
            parse_err(&with(
                r#""inputs": [{"url": "s3://b/k1", "path": "a/x"}, {"url": "s3://b/k2", "path": "./a//x"}]"#
            )),
            r#"inputs[1].path: "./a//x" is also the path of inputs[0]"#
        );
    }

    #[test]
    fn transfer_url_must_be_an_s3_url_with_a_bucket() {
        assert_eq!(
            parse_err(&with(r#""inputs": [{"url": "https://b/k", "path": "k"}]"#)),
            r#"inputs[0].url: "https://b/k" must have the form s3://bucket/key"#
        );
        assert_eq!(
            parse_err(&with(r#""inputs": [{"url": "s3:///k", "path": "k"}]"#)),
            r#"inputs[0].url: "s3:///k" has no bucket name"#
        );
        assert_eq!(
            parse_err(&with(r#""outputs": [{"url": "s3://", "path": "k"}]"#)),
            r#"outputs[0].url: "s3://" has no bucket name"#
        );
    }

    #[test]
    fn input_url_must_name_an_object_while_output_url_may_be_a_prefix() {
        assert_eq!(
            parse_err(&with(r#""inputs": [{"url": "s3://b/dir/", "path": "k"}]"#)),
            r#"inputs[0].url: "s3://b/dir/" must name an object (s3://bucket/key), not a bucket or a prefix"#
        );
        let spec = parse_ok(&with(
            r#""outputs": [{"url": "s3://b/dir/", "path": "k"}, {"url": "s3://b", "path": "k"}]"#,
        ));
        assert_eq!(spec.outputs.len(), 2);
    }

    #[test]
    fn transfer_requires_url_and_path() {
        assert_eq!(
            parse_err(&with(r#""inputs": [{"path": "k"}]"#)),
            r#"missing member "inputs[0].url""#
        );
        assert_eq!(
            parse_err(&with(r#""outputs": [{"url": "s3://b/p/"}]"#)),
            r#"missing member "outputs[0].path""#
        );
    }

    #[test]
    fn interrupt_signal_must_be_a_signal_name() {
        assert_eq!(
            parse_err(&with(r#""interrupt": {"signal": "TERM"}"#)),
            r#"interrupt.signal: "TERM" is not a signal name like "SIGTERM""#
        );
        let spec = parse_ok(&with(r#""interrupt": {"signal": "SIGUSR1"}"#));
        assert_eq!(spec.interrupt.signal, Signal::SIGUSR1);
        assert_eq!(spec.interrupt.grace, Duration::from_secs(30));
    }

    #[test]
    fn interrupt_grace_must_be_a_non_negative_integer() {
        assert_eq!(
            parse_err(&with(r#""interrupt": {"grace_s": -1}"#)),
            "interrupt.grace_s: must not be negative, got -1"
        );
        assert_eq!(
            parse_err(&with(r#""interrupt": {"grace_s": 2.5}"#)),
            "interrupt.grace_s: must be an integer, got the non-integer number 2.5"
        );
    }

    #[test]
    fn max_attempts_must_be_a_positive_integer_that_fits() {
        assert_eq!(
            parse_err(&with(r#""max_attempts": 0"#)),
            "max_attempts: must be greater than 0"
        );
        assert_eq!(
            parse_err(&with(r#""max_attempts": 4294967296"#)),
            "max_attempts: 4294967296 is more than the largest allowed, 4294967295"
        );
    }

    #[test]
    fn integers_beyond_64_bits_are_rejected_without_panicking() {
        let err = parse_err(&with(r#""timeout_s": 18446744073709551616"#));
        assert!(err.starts_with("timeout_s: must be an integer"), "{err}");
        assert_eq!(
            parse_ok(&with(r#""timeout_s": 18446744073709551615"#)).timeout,
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn more_than_ten_tags_are_rejected() {
        let pairs: Vec<String> = (0..11).map(|i| format!(r#""k{i}": "v""#)).collect();
        assert_eq!(
            parse_err(&with(&format!(r#""tags": {{{}}}"#, pairs.join(", ")))),
            "tags: at most 10 tags are allowed, got 11"
        );
    }

    #[test]
    fn tag_keys_and_values_have_length_limits() {
        let long_key = "k".repeat(65);
        assert_eq!(
            parse_err(&with(&format!(r#""tags": {{"{long_key}": "v"}}"#))),
            format!(r#"tags: key "{long_key}" must be 1 to 64 characters, got 65"#)
        );
        assert_eq!(
            parse_err(&with(r#""tags": {"": "v"}"#)),
            r#"tags: key "" must be 1 to 64 characters, got 0"#
        );
        let long_value = "v".repeat(257);
        assert_eq!(
            parse_err(&with(&format!(r#""tags": {{"team": "{long_value}"}}"#))),
            "tags.team: must be at most 256 characters, got 257"
        );
        assert_eq!(parse_ok(&with(r#""tags": {"team": ""}"#)).tags["team"], "");
    }

    #[test]
    fn tag_characters_are_limited_to_metric_safe_ones() {
        let err = parse_err(&with(r#""tags": {"team": "risk;drop"}"#));
        assert!(err.starts_with("tags.team: contains ';'"), "{err}");
        let err = parse_err(&with(r#""tags": {"tëam": "risk"}"#));
        assert!(err.starts_with(r#"tags: key "tëam" contains 'ë'"#), "{err}");
    }
}
