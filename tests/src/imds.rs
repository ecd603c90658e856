//! A fake EC2 instance metadata service (IMDSv2) for the tests of spot
//! interruption notices, rebalance recommendations, Auto Scaling lifecycle
//! states and the instance identity: `tests/python/fake_imds.py` (standard
//! library only), one per test, on a free port of 127.0.0.1, killed when
//! dropped.
//!
//! An agent reaches it through `AWS_EC2_METADATA_SERVICE_ENDPOINT`
//! ([`FakeImds::env`]); the test sets what the instance sees (identity, spot
//! action, rebalance notice, lifecycle state, tags), makes the service fail
//! the ways a real one does ([`Fault`]), and reads what the agent asked
//! ([`FakeImds::stats`]), all through the fake's control API under
//! `/__fake/` on the same port (see the Python file for its routes).
//!
//! [`request`] is a small blocking HTTP/1.1 client over `TcpStream` (the
//! control API uses it too), so the fake's own tests depend on nothing but
//! the fake.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tempfile::TempDir;

use super::sqs::python_bin;
use super::{eventually, read_lossy, WAIT};

/// How long the fake may take to print its port.
const START_WAIT: Duration = Duration::from_secs(30);
/// How long one control request may take: far above what it needs.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// The TTL header of a token request (and of its answer).
pub const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The header a metadata request carries its token in.
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// A fault target that matches every request outside the control API, the
/// token request included.
pub const ALL: &str = "*";

/// Paths the fake serves.
pub mod path {
    pub const TOKEN: &str = "/latest/api/token";
    pub const META_DATA: &str = "/latest/meta-data/";
    pub const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
    pub const INSTANCE_TYPE: &str = "/latest/meta-data/instance-type";
    pub const INSTANCE_LIFE_CYCLE: &str = "/latest/meta-data/instance-life-cycle";
    pub const AMI_ID: &str = "/latest/meta-data/ami-id";
    pub const LOCAL_IPV4: &str = "/latest/meta-data/local-ipv4";
    pub const REGION: &str = "/latest/meta-data/placement/region";
    pub const AVAILABILITY_ZONE: &str = "/latest/meta-data/placement/availability-zone";
    pub const SPOT_INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
    pub const SPOT_TERMINATION_TIME: &str = "/latest/meta-data/spot/termination-time";
    pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
    pub const TARGET_LIFECYCLE_STATE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
    pub const TAGS_INSTANCE: &str = "/latest/meta-data/tags/instance";
    /// The tag an Auto Scaling group puts on its instances.
    pub const TAG_ASG_NAME: &str = "/latest/meta-data/tags/instance/aws:autoscaling:groupName";
    pub const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";
}

/// What a spot interruption notice says will happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpotAction {
    Terminate,
    Stop,
    Hibernate,
}

impl SpotAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SpotAction::Terminate => "terminate",
            SpotAction::Stop => "stop",
            SpotAction::Hibernate => "hibernate",
        }
    }
}

/// How the fake misbehaves on the requests a fault matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (with a short text body) and do nothing else: a
    /// token request so faulted issues no token.
    Status(u16),
    /// Read the request and never answer; when the fault is cleared the
    /// connection is closed, still without an answer.
    Hang,
    /// Like `Hang`, but after this long the connection is closed without
    /// an answer (no answer ever comes: that is `Delay`).
    HangFor(Duration),
    /// Read the request, then close the connection with a reset (SO_LINGER
    /// 0): the client sees a connection error, not an HTTP answer.
    Reset,
    /// Wait this long, then answer as usual.
    Delay(Duration),
}

impl Fault {
    fn to_json(self, target: &str, count: Option<u32>) -> Value {
        let mut v = match self {
            Fault::Status(status) => json!({"mode": "status", "status": status}),
            Fault::Hang => json!({"mode": "hang"}),
            Fault::HangFor(d) => json!({"mode": "hang", "seconds": d.as_secs_f64()}),
            Fault::Reset => json!({"mode": "reset"}),
            Fault::Delay(d) => json!({"mode": "delay", "ms": d.as_secs_f64() * 1000.0}),
        };
        v["path"] = json!(target);
        if let Some(n) = count {
            v["count"] = json!(n);
        }
        v
    }
}

/// Whether metadata requests need a token (the instance's `HttpTokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpTokens {
    /// IMDSv2 only (the fake's default): no token, 401.
    Required,
    /// IMDSv1 allowed too: a request without a token is served.
    Optional,
}

/// What the instance is: the identity document's fields, plus the
/// `instance-life-cycle` item (`spot` or `on-demand`). `Default` is the
/// fake's own state at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub account_id: String,
    pub image_id: String,
    pub private_ip: String,
    pub architecture: String,
    pub pending_time: String,
    pub instance_life_cycle: String,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            instance_type: "m5.large".into(),
            account_id: "123456789012".into(),
            image_id: "ami-0123456789abcdef0".into(),
            private_ip: "10.0.0.10".into(),
            architecture: "x86_64".into(),
            pending_time: "2026-01-01T00:00:00Z".into(),
            instance_life_cycle: "on-demand".into(),
        }
    }
}

/// The identity fields by the names the fake (and the identity document)
/// uses.
const IDENTITY_FIELDS: [&str; 10] = [
    "instanceId",
    "region",
    "availabilityZone",
    "instanceType",
    "accountId",
    "imageId",
    "privateIp",
    "architecture",
    "pendingTime",
    "instanceLifeCycle",
];

impl Identity {
    fn fields(&self) -> [&String; 10] {
        [
            &self.instance_id,
            &self.region,
            &self.availability_zone,
            &self.instance_type,
            &self.account_id,
            &self.image_id,
            &self.private_ip,
            &self.architecture,
            &self.pending_time,
            &self.instance_life_cycle,
        ]
    }

    fn to_json(&self) -> Value {
        let map: serde_json::Map<String, Value> = IDENTITY_FIELDS
            .iter()
            .zip(self.fields())
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        Value::Object(map)
    }

    fn from_json(v: &Value) -> Identity {
        let get = |k: &str| -> String {
            v[k].as_str()
                .unwrap_or_else(|| panic!("identity field {k} missing in {v}"))
                .to_string()
        };
        Identity {
            instance_id: get("instanceId"),
            region: get("region"),
            availability_zone: get("availabilityZone"),
            instance_type: get("instanceType"),
            account_id: get("accountId"),
            image_id: get("imageId"),
            private_ip: get("privateIp"),
            architecture: get("architecture"),
            pending_time: get("pendingTime"),
            instance_life_cycle: get("instanceLifeCycle"),
        }
    }
}

/// What a metadata request carried, as the fake counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// A token request (`PUT /latest/api/token`): no token expected.
    TokenRequest,
    /// A valid token: IMDSv2.
    V2,
    /// No token header at all: an IMDSv1-style request.
    NoToken,
    /// A token header the fake did not issue, or one that expired.
    BadToken,
}

impl Auth {
    fn parse(s: &str) -> Auth {
        match s {
            "-" => Auth::TokenRequest,
            "v2" => Auth::V2,
            "none" => Auth::NoToken,
            "invalid" => Auth::BadToken,
            other => panic!("unknown auth kind {other:?} in the fake's log"),
        }
    }
}

/// One request in the fake's log.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    /// The status answered; `None` if a fault (hang, reset) answered none.
    pub status: Option<u16>,
    pub auth: Auth,
    /// The fault that applied (`status`, `hang`, `reset`, `delay`), if any.
    pub fault: Option<String>,
    /// Unix time in seconds when the fake had its answer ready (or, for a
    /// hang or reset, had read the request); before the client had it.
    pub time: f64,
    /// The TTL header as sent, on token requests.
    pub ttl: Option<String>,
}

/// Request counts since the start (or the last reset) and the last
/// requests (up to 500). Control requests are never counted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    pub total: u64,
    pub by_path: BTreeMap<String, u64>,
    pub by_method: BTreeMap<String, u64>,
    /// Answered statuses only (a hang or reset answers none).
    pub by_status: BTreeMap<u16, u64>,
    pub by_fault: BTreeMap<String, u64>,
    /// Metadata requests with a valid token (IMDSv2).
    pub v2: u64,
    /// Metadata requests without a token (IMDSv1 style).
    pub no_token: u64,
    /// Metadata requests with an unknown or expired token.
    pub bad_token: u64,
    pub tokens_issued: u64,
    pub log: Vec<LoggedRequest>,
}

impl Stats {
    fn from_json(v: &Value) -> Stats {
        let counts = |name: &str| -> BTreeMap<String, u64> {
            v[name]
                .as_object()
                .unwrap_or_else(|| panic!("stats without {name}: {v}"))
                .iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        };
        let n = |x: &Value| {
            x.as_u64()
                .unwrap_or_else(|| panic!("not a count: {x} in {v}"))
        };
        let log = v["log"]
            .as_array()
            .unwrap_or_else(|| panic!("stats without a log: {v}"))
            .iter()
            .map(|e| LoggedRequest {
                method: e["method"].as_str().unwrap_or_default().to_string(),
                path: e["path"].as_str().unwrap_or_default().to_string(),
                status: e["status"].as_u64().map(|s| s as u16),
                auth: Auth::parse(e["auth"].as_str().unwrap_or_default()),
                fault: e["fault"].as_str().map(str::to_string),
                time: e["time"].as_f64().unwrap_or_default(),
                ttl: e["ttl"].as_str().map(str::to_string),
            })
            .collect();
        Stats {
            total: n(&v["total"]),
            by_path: counts("by_path"),
            by_method: counts("by_method"),
            by_status: counts("by_status")
                .into_iter()
                .map(|(k, c)| {
                    let status = k.parse().unwrap_or_else(|_| panic!("status {k:?} in {v}"));
                    (status, c)
                })
                .collect(),
            by_fault: counts("by_fault"),
            v2: n(&v["auth"]["v2"]),
            no_token: n(&v["auth"]["none"]),
            bad_token: n(&v["auth"]["invalid"]),
            tokens_issued: n(&v["tokens_issued"]),
            log,
        }
    }

    /// Requests on `path`.
    pub fn on_path(&self, path: &str) -> u64 {
        self.by_path.get(path).copied().unwrap_or(0)
    }

    /// Requests answered with `status`.
    pub fn with_status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Requests with method `method`.
    pub fn with_method(&self, method: &str) -> u64 {
        self.by_method.get(method).copied().unwrap_or(0)
    }

    /// Requests a fault of mode `mode` applied to.
    pub fn faulted(&self, mode: &str) -> u64 {
        self.by_fault.get(mode).copied().unwrap_or(0)
    }
}

/// An HTTP answer read by [`request`].
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to `127.0.0.1:port` on a new connection
/// (`Connection: close`), each read and write bounded by `timeout`.
///
/// Errors are the connection's: a reset reads as
/// [`ErrorKind::ConnectionReset`], no answer within `timeout` as
/// [`ErrorKind::WouldBlock`] or [`ErrorKind::TimedOut`], and a connection
/// closed before a whole answer as [`ErrorKind::UnexpectedEof`].
pub fn request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "PUT" | "POST") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before an answer ({} bytes: {:?})",
                    buf.len(),
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("not an HTTP status line: {status_line:?}"),
            )
        })?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut rest = buf[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Content-Length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let bodiless = method == "HEAD" || status == 204 || status == 304 || status < 200;
    match length {
        _ if bodiless => rest.clear(),
        Some(len) => {
            while rest.len() < len {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!("connection closed after {} of {len} body bytes", rest.len()),
                    ));
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            rest.truncate(len);
        }
        None => {
            stream.read_to_end(&mut rest)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&rest).into_owned(),
    })
}

/// `at` the way IMDS writes times: `2026-12-02T10:00:00Z` (UTC, seconds).
pub fn imds_time(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The fake service: `tests/python/fake_imds.py`.
pub fn fake_imds_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/fake_imds.py")
}

/// A fake IMDS on a free port of 127.0.0.1, killed when dropped.
pub struct FakeImds {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl FakeImds {
    /// Starts the fake and waits until it listens.
    pub fn start() -> FakeImds {
        let python = python_bin();
        let script = fake_imds_script();
        let dir = tempfile::tempdir().expect("tempdir for the fake IMDS's log");
        let log = dir.path().join("fake_imds.log");
        let mut child = Command::new(&python)
            .arg(&script)
            .args(["--port", "0", "--watch-pid"])
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("the fake IMDS's log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} {}: {e}", python.display(), script.display()));
        // The first line of its stdout is the port, printed once it listens.
        let stdout = child.stdout.take().expect("the fake's stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(read.map(|_| line));
        });
        let port = match rx.recv_timeout(START_WAIT) {
            Ok(Ok(line)) => line.trim().parse::<u16>().ok(),
            _ => None,
        };
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the fake IMDS ({}) did not print its port within {START_WAIT:?}; its log:\n{}",
                script.display(),
                read_lossy(&log)
            );
        };
        FakeImds {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT`: what the agent gets as
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment an agent gets to use this fake as its IMDS.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT".to_string(),
            self.endpoint(),
        )]
    }

    /// The last lines of the fake's own log (one line per request), for
    /// failure messages.
    pub fn log_tail(&self) -> String {
        let text = read_lossy(&self.log);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One request to the fake (metadata or control), on a new connection,
    /// each read and write bounded by `timeout`. See [`request`].
    pub fn request_within(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> io::Result<Response> {
        request(self.port, method, target, headers, b"", timeout)
    }

    /// One request with a generous timeout; panics if no answer comes.
    pub fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
        self.request_within(method, target, headers, CONTROL_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "{method} {target}: {e}\nthe fake's log:\n{}",
                    self.log_tail()
                )
            })
    }

    /// A new token with a TTL of `ttl_s` seconds; panics unless issued.
    pub fn token(&self, ttl_s: u32) -> String {
        let ttl = ttl_s.to_string();
        let r = self.request("PUT", path::TOKEN, &[(TTL_HEADER, &ttl)]);
        assert_eq!(r.status, 200, "token request refused: {r:?}");
        r.body
    }

    /// `GET path` with `token` (none if `None`).
    pub fn get(&self, target: &str, token: Option<&str>) -> Response {
        match token {
            Some(t) => self.request("GET", target, &[(TOKEN_HEADER, t)]),
            None => self.request("GET", target, &[]),
        }
    }

    fn control(&self, method: &str, route: &str, body: Value) -> Value {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let target = format!("/__fake/{route}");
        let r = request(
            self.port,
            method,
            &target,
            &[("Content-Type", "application/json")],
            &bytes,
            CONTROL_TIMEOUT,
        )
        .unwrap_or_else(|e| {
            panic!(
                "fake IMDS control {method} {target}: {e}\nits log:\n{}",
                self.log_tail()
            )
        });
        let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| {
            panic!("fake IMDS control {method} {target}: not JSON ({e}): {r:?}")
        });
        assert_eq!(
            r.status, 200,
            "fake IMDS control {method} {target} {body} refused: {v}"
        );
        v
    }

    fn post(&self, route: &str, body: Value) {
        self.control("POST", route, body);
    }

    /// Sets the identity document's fields and `instance-life-cycle`.
    pub fn set_identity(&self, identity: &Identity) {
        self.post("identity", identity.to_json());
    }

    /// The identity the fake serves now.
    pub fn identity(&self) -> Identity {
        Identity::from_json(&self.state()["identity"])
    }

    /// Everything the control API set, as the fake reports it.
    pub fn state(&self) -> Value {
        self.control("GET", "state", Value::Null)
    }

    /// A spot interruption notice: `spot/instance-action` becomes
    /// `{"action": ..., "time": ...}` (and, for `Terminate`,
    /// `spot/termination-time` becomes `time`).
    pub fn set_spot_action(&self, action: SpotAction, time: &str) {
        self.post("spot", json!({"action": action.as_str(), "time": time}));
    }

    /// No interruption notice: `spot/instance-action` is 404 again.
    pub fn clear_spot_action(&self) {
        self.post("spot/clear", json!({}));
    }

    /// A rebalance recommendation: `events/recommendations/rebalance`
    /// becomes `{"noticeTime": ...}`.
    pub fn set_rebalance(&self, notice_time: &str) {
        self.post("rebalance", json!({"noticeTime": notice_time}));
    }

    /// No rebalance recommendation: 404 again.
    pub fn clear_rebalance(&self) {
        self.post("rebalance/clear", json!({}));
    }

    /// The instance is in an Auto Scaling group, transitioning to `state`.
    /// The real item only ever holds a target steady state: `InService`,
    /// `Terminated`, `Detached`, `Standby`, `Warmed:Hibernated`,
    /// `Warmed:Running`, `Warmed:Stopped`, `Warmed:Terminated`; the fake
    /// serves any text.
    pub fn set_lifecycle_state(&self, state: &str) {
        self.post("lifecycle", json!({"state": state}));
    }

    /// Not in an Auto Scaling group: `autoscaling/target-lifecycle-state`
    /// is 404 (the fake's state at start).
    pub fn clear_lifecycle_state(&self) {
        self.post("lifecycle", json!({"state": null}));
    }

    /// Tags in instance metadata: with `enabled`, `tags/instance/KEY` serves
    /// each of `tags` (keys may hold `:`, as `aws:autoscaling:groupName`);
    /// without, `tags/` is 404, as when the instance's
    /// `InstanceMetadataTags` is disabled (the fake's state at start).
    pub fn set_tags(&self, enabled: bool, tags: &[(&str, &str)]) {
        let map: serde_json::Map<String, Value> = tags
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        self.post("tags", json!({"enabled": enabled, "tags": map}));
    }

    /// Whether metadata requests need a token.
    pub fn set_http_tokens(&self, tokens: HttpTokens) {
        let v = match tokens {
            HttpTokens::Required => "required",
            HttpTokens::Optional => "optional",
        };
        self.post("options", json!({"httpTokens": v}));
    }

    /// With `false`, every request is answered 403, as when the instance's
    /// metadata endpoint is turned off.
    pub fn set_endpoint_enabled(&self, enabled: bool) {
        let v = if enabled { "enabled" } else { "disabled" };
        self.post("options", json!({"httpEndpoint": v}));
    }

    /// Every request on `target` (an exact path, a prefix ending in `*`,
    /// or [`ALL`]) meets `fault` until cleared. The most specific fault
    /// applies: exact, then the longest prefix, then `ALL`; a new fault on
    /// a target replaces the one there.
    pub fn fault(&self, target: &str, fault: Fault) {
        self.post("fault", fault.to_json(target, None));
    }

    /// Like [`FakeImds::fault`], for the next `count` matching requests
    /// only (a hang so started lasts until cleared or its time runs out).
    pub fn fault_times(&self, target: &str, fault: Fault, count: u32) {
        assert!(count > 0, "a fault for zero requests");
        self.post("fault", fault.to_json(target, Some(count)));
    }

    /// Clears the fault on `target` (releasing requests it holds hung).
    pub fn clear_fault(&self, target: &str) {
        self.post("faults/clear", json!({"path": target}));
    }

    /// Clears every fault (releasing every hung request).
    pub fn clear_faults(&self) {
        self.post("faults/clear", json!({}));
    }

    /// Every token issued so far expires now.
    ///
    /// A client that keeps its token for the TTL it asked for sees only
    /// 401s until it fetches a new one: aws-config's IMDS client (1.13)
    /// retries a 401 with the same cached token and fetches a new one only
    /// once its own copy nears its TTL, so recovery here needs a client
    /// that drops its token on a 401.
    pub fn expire_tokens(&self) {
        self.post("tokens/expire", json!({}));
    }

    /// Tokens age `by` at once: their TTLs run on the fake's own clock,
    /// which this moves forward (nothing else uses it). The client's clock
    /// does not move: to it, as after [`FakeImds::expire_tokens`], a token
    /// it still holds for valid is refused.
    pub fn advance_clock(&self, by: Duration) {
        self.post("clock", json!({"advance": by.as_secs_f64()}));
    }

    /// The counts and the request log.
    pub fn stats(&self) -> Stats {
        Stats::from_json(&self.control("GET", "stats", Value::Null))
    }

    /// Zeroes the counts and empties the log.
    pub fn reset_stats(&self) {
        self.post("stats/reset", json!({}));
    }

    /// Back to the state at start: identity, notices, options, faults
    /// (hung requests released), tokens and stats.
    pub fn reset(&self) {
        self.post("reset", json!({}));
    }

    /// Polls the stats until `cond` holds and returns them; panics after
    /// `WAIT` with the last stats and the fake's log.
    pub fn wait_stats(&self, what: &str, cond: impl Fn(&Stats) -> bool) -> Stats {
        let last = std::cell::RefCell::new(Stats::default());
        eventually(
            what,
            WAIT,
            || {
                let stats = self.stats();
                let done = cond(&stats);
                *last.borrow_mut() = stats;
                done
            },
            || format!("{:#?}\nthe fake's log:\n{}", last.borrow(), self.log_tail()),
        );
        last.into_inner()
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- fake IMDS log ---\n{}", self.log_tail());
        }
    }
}
