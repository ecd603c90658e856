//! Harness for `batchly-agent run` on SQS: a local AWS server (moto, one per
//! test) with the test's own SQS and S3 clients, agents driven through their
//! config file and environment only, job events read from the events
//! queue, an independent producer in Python (`tests/python/sign_envelope.py`),
//! and a proxy (`proxy`) that counts the agent's SQS calls and can take the
//! endpoint away.
//!
//! The test's clients always talk to moto directly; an agent talks to
//! whatever endpoint its settings name (moto, or a proxy in front of it).
//! As in the rest of the harness, every wait is a bounded poll of a
//! condition with a generous limit, never a timing assertion.

pub mod proxy;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::{
    agent_command, read_lossy, run_cli, run_cli_within, workspace_root, Event, Run, Submitted,
};

/// The longest any SQS condition is waited for: far above what a healthy
/// run needs (moto and a debug agent on two busy cores included).
pub const LONG_WAIT: Duration = Duration::from_secs(120);
/// How long moto may take to answer after it was started.
const MOTO_START_WAIT: Duration = Duration::from_secs(30);
/// How long `run` may take to check its queues and open its admin socket.
const AGENT_START_WAIT: Duration = Duration::from_secs(30);
/// How often a condition is re-checked.
const POLL: Duration = Duration::from_millis(50);
/// moto's fixed account id, the one in every queue URL it hands out.
pub const ACCOUNT: &str = "123456789012";
/// RedrivePolicy's maxReceiveCount on test queues: high, because moto (like
/// SQS) moves a message to the dead-letter queue on its Nth receive, and
/// retries and releases are receives too. Only the agent dead-letters here.
const MAX_RECEIVE_COUNT: u32 = 1000;
/// Kid of the test's Ed25519 key (used by `submit` and the Python signer).
pub const ED25519_KID: &str = "e2e";
/// Kid of the test's HMAC-SHA256 key.
pub const HMAC_KID: &str = "e2e-hmac";

/// A tool of the pinned test environment (`.ci/venv`, installed by
/// `bash scripts/test`): `$var` if set, else the venv's copy.
fn venv_tool(var: &str, name: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join(".ci/venv/bin").join(name),
    };
    assert!(
        path.is_file(),
        "{} does not exist ({var} {}): run `bash scripts/test` once, it installs moto and \
         cryptography into .ci/venv",
        path.display(),
        if std::env::var_os(var).is_some() {
            "names it"
        } else {
            "is unset, so the venv's copy was tried"
        }
    );
    path
}

/// The moto server executable.
pub fn moto_bin() -> PathBuf {
    venv_tool("BATCHLY_TEST_MOTO", "moto_server")
}

/// A Python with `cryptography` (and boto3).
pub fn python_bin() -> PathBuf {
    venv_tool("BATCHLY_TEST_PYTHON", "python")
}

/// The independent producer: `tests/python/sign_envelope.py`.
pub fn python_signer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/sign_envelope.py")
}

/// Unix time in seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// Whether something on `port` answers an HTTP request.
fn answers_http(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 5];
    s.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}

/// A moto server on a free port of 127.0.0.1, killed when dropped.
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Moto {
    /// Starts moto and waits until it answers.
    pub fn start() -> Moto {
        let bin = moto_bin();
        let dir = tempfile::tempdir().expect("tempdir for moto's log");
        let mut last_log = String::new();
        // Another process may take the port between our probe and moto's
        // bind; then moto exits and another port is tried.
        for attempt in 1..=5 {
            let port = free_port();
            let log = dir.path().join(format!("moto-{attempt}.log"));
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(File::create(&log).expect("moto log"))
                .stderr(File::create(&log).expect("moto log"))
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let deadline = Instant::now() + MOTO_START_WAIT;
            loop {
                if answers_http(port) {
                    return Moto {
                        child,
                        port,
                        log,
                        _dir: dir,
                    };
                }
                if child.try_wait().ok().flatten().is_some() || Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = read_lossy(&log);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "moto ({}) did not start; its log:\n{last_log}",
            bin.display()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (benchmarks read its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last lines of moto's own log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = read_lossy(&self.log);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment an agent (or `submit`) gets to reach `endpoint`.
pub fn aws_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A job queue and the dead-letter queue its RedrivePolicy names (if any).
#[derive(Debug, Clone)]
pub struct JobQueue {
    pub url: String,
    pub dlq: Option<String>,
}

impl JobQueue {
    /// The queue's name (the last segment of its URL).
    pub fn name(&self) -> &str {
        queue_name(&self.url)
    }

    /// The dead-letter queue's URL; panics for a queue made without one.
    pub fn dlq(&self) -> &str {
        self.dlq
            .as_deref()
            .expect("this queue was made without a dead-letter queue")
    }
}

/// The last segment of a queue URL.
pub fn queue_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// How a job queue is made.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    pub visibility_s: Option<u32>,
    pub fifo: bool,
    pub dead_letter: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            visibility_s: None,
            fifo: false,
            dead_letter: true,
        }
    }
}

/// Messages in a queue, as SQS counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

impl QueueDepth {
    pub fn is_empty(&self) -> bool {
        self.visible == 0 && self.in_flight == 0 && self.delayed == 0
    }
}

/// A message read back from a queue, with its string message attributes.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub body: String,
    pub attributes: BTreeMap<String, String>,
}

/// The test's own SQS and S3 clients, blocking, on one local endpoint.
pub struct Aws {
    rt: tokio::runtime::Runtime,
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub cloudwatch: aws_sdk_cloudwatch::Client,
}

impl Aws {
    pub fn new(endpoint: &str) -> Aws {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the test's AWS clients");
        let credentials =
            aws_sdk_sqs::config::Credentials::new("testing", "testing", None, None, "batchly-e2e");
        let region = aws_sdk_sqs::config::Region::new("us-east-1");
        let timeouts = aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
            .operation_timeout(Duration::from_secs(60))
            .build();
        let sqs = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .endpoint_url(endpoint)
            .retry_config(aws_sdk_sqs::config::retry::RetryConfig::standard())
            .timeout_config(timeouts.clone())
            .build();
        let autoscaling = aws_sdk_autoscaling::Config::builder()
            .behavior_version(aws_sdk_autoscaling::config::BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .endpoint_url(endpoint)
            .timeout_config(timeouts.clone())
            .build();
        let logs = aws_sdk_cloudwatchlogs::Config::builder()
            .behavior_version(aws_sdk_cloudwatchlogs::config::BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .endpoint_url(endpoint)
            .timeout_config(timeouts.clone())
            .build();
        let cloudwatch = aws_sdk_cloudwatch::Config::builder()
            .behavior_version(aws_sdk_cloudwatch::config::BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .endpoint_url(endpoint)
            .timeout_config(timeouts.clone())
            .build();
        let s3 = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(region)
            .credentials_provider(credentials)
            .endpoint_url(endpoint)
            .force_path_style(true)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard())
            .timeout_config(timeouts)
            .build();
        Aws {
            rt,
            sqs: aws_sdk_sqs::Client::from_conf(sqs),
            s3: aws_sdk_s3::Client::from_conf(s3),
            autoscaling: aws_sdk_autoscaling::Client::from_conf(autoscaling),
            logs: aws_sdk_cloudwatchlogs::Client::from_conf(logs),
            cloudwatch: aws_sdk_cloudwatch::Client::from_conf(cloudwatch),
        }
    }

    /// Runs one SDK future to completion.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Creates a queue with `attributes`; returns its URL.
    pub fn create_queue(&self, name: &str, attributes: &[(&str, String)]) -> String {
        let mut req = self.sqs.create_queue().queue_name(name);
        for (k, v) in attributes {
            req = req.attributes(QueueAttributeName::from(*k), v.clone());
        }
        self.block_on(req.send())
            .unwrap_or_else(|e| panic!("creating queue {name}: {e:?}"))
            .queue_url
            .unwrap_or_else(|| panic!("no URL for new queue {name}"))
    }

    /// One attribute of a queue.
    pub fn queue_attribute(&self, url: &str, name: &str) -> Option<String> {
        let attr = QueueAttributeName::from(name);
        let out = self
            .block_on(
                self.sqs
                    .get_queue_attributes()
                    .queue_url(url)
                    .attribute_names(attr.clone())
                    .send(),
            )
            .unwrap_or_else(|e| panic!("reading {name} of {url}: {e:?}"));
        out.attributes?.get(&attr).cloned()
    }

    /// A job queue `name` (with `.fifo` appended for FIFO) and, unless
    /// `opts.dead_letter` is false, its dead-letter queue `name-dlq` named
    /// by a RedrivePolicy.
    pub fn job_queue(&self, name: &str, opts: &QueueOptions) -> JobQueue {
        let suffix = if opts.fifo { ".fifo" } else { "" };
        let mut fifo_attrs = Vec::new();
        if opts.fifo {
            fifo_attrs.push(("FifoQueue", "true".to_string()));
            fifo_attrs.push(("ContentBasedDeduplication", "true".to_string()));
        }
        let dlq = opts
            .dead_letter
            .then(|| self.create_queue(&format!("{name}-dlq{suffix}"), &fifo_attrs));
        let mut attrs = fifo_attrs.clone();
        if let Some(dlq) = &dlq {
            let arn = self
                .queue_attribute(dlq, "QueueArn")
                .unwrap_or_else(|| panic!("no QueueArn for {dlq}"));
            let policy = serde_json::json!({
                "deadLetterTargetArn": arn,
                "maxReceiveCount": MAX_RECEIVE_COUNT.to_string(),
            });
            attrs.push(("RedrivePolicy", policy.to_string()));
        }
        if let Some(v) = opts.visibility_s {
            attrs.push(("VisibilityTimeout", v.to_string()));
        }
        let url = self.create_queue(&format!("{name}{suffix}"), &attrs);
        JobQueue { url, dlq }
    }

    /// Sends one raw body; returns its message id.
    pub fn send(&self, url: &str, body: &str) -> String {
        self.block_on(
            self.sqs
                .send_message()
                .queue_url(url)
                .message_body(body)
                .send(),
        )
        .unwrap_or_else(|e| panic!("sending to {url}: {e:?}"))
        .message_id
        .unwrap_or_else(|| panic!("no message id from {url}"))
    }

    /// Sends raw bodies, ten per `SendMessageBatch`; returns their message
    /// ids in order.
    pub fn send_batch(&self, url: &str, bodies: &[String]) -> Vec<String> {
        use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
        let mut ids = Vec::with_capacity(bodies.len());
        for chunk in bodies.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(b)
                        .build()
                        .expect("id and body are set")
                })
                .collect();
            let out = self
                .block_on(
                    self.sqs
                        .send_message_batch()
                        .queue_url(url)
                        .set_entries(Some(entries))
                        .send(),
                )
                .unwrap_or_else(|e| panic!("sending a batch to {url}: {e:?}"));
            assert!(
                out.failed().is_empty(),
                "SQS refused messages: {:?}",
                out.failed()
            );
            let mut ok: Vec<(usize, String)> = out
                .successful()
                .iter()
                .map(|e| {
                    (
                        e.id().parse().expect("ids are indexes"),
                        e.message_id().to_string(),
                    )
                })
                .collect();
            ok.sort();
            ids.extend(ok.into_iter().map(|(_, id)| id));
        }
        ids
    }

    /// How many messages the queue holds, visible, in flight and delayed.
    pub fn depth(&self, url: &str) -> QueueDepth {
        let out = self
            .block_on(
                self.sqs
                    .get_queue_attributes()
                    .queue_url(url)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("reading the depth of {url}: {e:?}"));
        let attrs = out.attributes.unwrap_or_default();
        let n = |a: QueueAttributeName| {
            attrs
                .get(&a)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {a:?} for {url}: {attrs:?}"))
        };
        QueueDepth {
            visible: n(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: n(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        }
    }

    /// Receives (and deletes) what is visible now, up to ten per call,
    /// until a receive comes back empty after waiting `wait_s`.
    pub fn take_all(&self, url: &str, wait_s: i32) -> Vec<Received> {
        let mut got = Vec::new();
        loop {
            let batch = self.receive(url, 10, wait_s);
            if batch.is_empty() {
                return got;
            }
            let entries = batch
                .iter()
                .enumerate()
                .map(|(i, (_, receipt))| {
                    aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .build()
                        .expect("id and receipt are set")
                })
                .collect();
            self.block_on(
                self.sqs
                    .delete_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send(),
            )
            .unwrap_or_else(|e| panic!("deleting from {url}: {e:?}"));
            got.extend(batch.into_iter().map(|(m, _)| m));
        }
    }

    fn receive(&self, url: &str, max: i32, wait_s: i32) -> Vec<(Received, String)> {
        let out = self
            .block_on(
                self.sqs
                    .receive_message()
                    .queue_url(url)
                    .max_number_of_messages(max)
                    .wait_time_seconds(wait_s)
                    .message_attribute_names("All")
                    .message_system_attribute_names(MessageSystemAttributeName::All)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("receiving from {url}: {e:?}"));
        out.messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let attributes = m
                    .message_attributes
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.string_value?)))
                    .collect();
                let received = Received {
                    id: m.message_id.unwrap_or_default(),
                    body: m.body.unwrap_or_default(),
                    attributes,
                };
                (received, m.receipt_handle.unwrap_or_default())
            })
            .collect()
    }

    /// Creates an S3 bucket.
    pub fn create_bucket(&self, bucket: &str) {
        self.block_on(self.s3.create_bucket().bucket(bucket).send())
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e:?}"));
    }

    /// Writes one S3 object.
    pub fn put_object(&self, bucket: &str, key: &str, bytes: Vec<u8>) {
        self.block_on(
            self.s3
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(aws_sdk_s3::primitives::ByteStream::from(bytes))
                .send(),
        )
        .unwrap_or_else(|e| panic!("writing s3://{bucket}/{key}: {e:?}"));
    }

    /// Reads one S3 object; `None` if it does not exist.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.block_on(async {
            let out = match self.s3.get_object().bucket(bucket).key(key).send().await {
                Ok(out) => out,
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return None,
                Err(e) => panic!("reading s3://{bucket}/{key}: {e:?}"),
            };
            let bytes = out
                .body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("reading the body of s3://{bucket}/{key}: {e:?}"));
            Some(bytes.into_bytes().to_vec())
        })
    }

    /// Keys of the objects under `prefix`.
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let out = self
            .block_on(
                self.s3
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(prefix)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("listing s3://{bucket}/{prefix}: {e:?}"));
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    }
}

/// One CloudWatch Logs event as the server holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub timestamp_ms: i64,
    pub message: String,
}

impl Aws {
    /// The streams of `group` (empty if the group does not exist).
    pub fn log_streams(&self, group: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let out = self.block_on(
                self.logs
                    .describe_log_streams()
                    .log_group_name(group)
                    .set_next_token(token.clone())
                    .send(),
            );
            let Ok(out) = out else { return names };
            names.extend(
                out.log_streams()
                    .iter()
                    .filter_map(|s| s.log_stream_name().map(str::to_string)),
            );
            match out.next_token() {
                Some(t) if Some(t) != token.as_deref() => token = Some(t.to_string()),
                _ => return names,
            }
        }
    }

    /// Every event of `stream` in `group`, oldest first (none if the stream
    /// does not exist).
    pub fn log_lines(&self, group: &str, stream: &str) -> Vec<LogLine> {
        let mut lines = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self.block_on(
                self.logs
                    .get_log_events()
                    .log_group_name(group)
                    .log_stream_name(stream)
                    .start_from_head(true)
                    .set_next_token(token.clone())
                    .send(),
            );
            let Ok(out) = out else { return lines };
            if out.events().is_empty() {
                return lines;
            }
            lines.extend(out.events().iter().map(|e| LogLine {
                timestamp_ms: e.timestamp().unwrap_or(0),
                message: e.message().unwrap_or("").to_string(),
            }));
            match out.next_forward_token() {
                Some(t) if Some(t) != token.as_deref() => token = Some(t.to_string()),
                _ => return lines,
            }
        }
    }
}

impl Aws {
    /// The sum of metric `name` in `namespace` over the last hour, for data
    /// carrying at least `dimensions`; `None` when there is none.
    pub fn metric_sum(
        &self,
        namespace: &str,
        name: &str,
        dimensions: &[(&str, &str)],
    ) -> Option<f64> {
        use aws_sdk_cloudwatch::primitives::DateTime;
        use aws_sdk_cloudwatch::types::{Dimension, Statistic};
        let now = std::time::SystemTime::now();
        let hour = Duration::from_secs(3600);
        let mut request = self
            .cloudwatch
            .get_metric_statistics()
            .namespace(namespace)
            .metric_name(name)
            .start_time(DateTime::from(now - hour))
            .end_time(DateTime::from(now + hour))
            .period(3600)
            .statistics(Statistic::Sum);
        for (n, v) in dimensions {
            request = request.dimensions(Dimension::builder().name(*n).value(*v).build());
        }
        let out = self
            .block_on(request.send())
            .unwrap_or_else(|e| panic!("GetMetricStatistics {name}: {e:?}"));
        let points = out.datapoints();
        (!points.is_empty()).then(|| points.iter().filter_map(|p| p.sum()).sum())
    }

    /// The dimension names of every metric `name` in `namespace`.
    pub fn metric_dimension_names(&self, namespace: &str, name: &str) -> Vec<Vec<String>> {
        let out = self
            .block_on(
                self.cloudwatch
                    .list_metrics()
                    .namespace(namespace)
                    .metric_name(name)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("ListMetrics {name}: {e:?}"));
        out.metrics()
            .iter()
            .map(|m| {
                m.dimensions()
                    .iter()
                    .filter_map(|d| d.name().map(str::to_string))
                    .collect()
            })
            .collect()
    }
}

/// The shell script of a job that leaves `start ID` and `end ID` (its job
/// id) in `$MARK/runs` around `work`. Each line is one `write` to an
/// O_APPEND file, so the file's order is the order in which those moments
/// happened, across every job and agent of the test.
pub fn marked(work: &str) -> String {
    format!(
        "echo \"start $BATCHLY_JOB_ID\" >> \"$MARK/runs\"\n{work}\nrc=$?\n\
         echo \"end $BATCHLY_JOB_ID\" >> \"$MARK/runs\"\nexit $rc\n"
    )
}

/// One line of the runs file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunLine {
    Start(String),
    End(String),
    /// A moment the test itself wrote down (`SqsTest::note`).
    Note(String),
}

/// The runs file of a test (see [`marked`]), in order.
#[derive(Debug, Clone)]
pub struct Runs {
    pub lines: Vec<RunLine>,
}

impl Runs {
    pub fn read(path: &Path) -> Runs {
        let text = read_lossy(path);
        let lines = text
            .lines()
            .filter_map(|l| {
                let (kind, what) = l.split_once(' ')?;
                Some(match kind {
                    "start" => RunLine::Start(what.to_string()),
                    "end" => RunLine::End(what.to_string()),
                    "note" => RunLine::Note(what.to_string()),
                    _ => panic!("unexpected line in the runs file: {l:?}"),
                })
            })
            .collect();
        Runs { lines }
    }

    /// How many runs of `id` started.
    pub fn starts(&self, id: &str) -> usize {
        self.lines
            .iter()
            .filter(|l| matches!(l, RunLine::Start(s) if s == id))
            .count()
    }

    /// How many runs of `id` ended.
    pub fn ends(&self, id: &str) -> usize {
        self.lines
            .iter()
            .filter(|l| matches!(l, RunLine::End(s) if s == id))
            .count()
    }

    /// Ids of the runs in the order they started.
    pub fn start_order(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                RunLine::Start(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Ids that started while an earlier run of the same id had not ended.
    pub fn overlapping(&self) -> Vec<String> {
        let mut open: BTreeMap<&str, usize> = BTreeMap::new();
        let mut overlaps = Vec::new();
        for l in &self.lines {
            match l {
                RunLine::Start(id) => {
                    let n = open.entry(id).or_default();
                    if *n > 0 {
                        overlaps.push(id.clone());
                    }
                    *n += 1;
                }
                RunLine::End(id) => {
                    if let Some(n) = open.get_mut(id.as_str()) {
                        *n = n.saturating_sub(1);
                    }
                }
                RunLine::Note(_) => {}
            }
        }
        overlaps
    }

    /// The most runs that were going on at one moment.
    pub fn max_running(&self) -> usize {
        let (mut now, mut max) = (0usize, 0usize);
        for l in &self.lines {
            match l {
                RunLine::Start(_) => {
                    now += 1;
                    max = max.max(now);
                }
                RunLine::End(_) => now = now.saturating_sub(1),
                RunLine::Note(_) => {}
            }
        }
        max
    }

    /// The lines after the note `note` (all lines if it is absent).
    pub fn after_note(&self, note: &str) -> &[RunLine] {
        let at = self
            .lines
            .iter()
            .position(|l| matches!(l, RunLine::Note(n) if n == note))
            .map_or(0, |i| i + 1);
        &self.lines[at..]
    }
}

/// What an agent is started with.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `queue.url`: one URL is written as a string, several as an array.
    pub queues: Vec<String>,
    pub dead_letter_url: Option<String>,
    /// `queue.events_url`; the test's events queue unless changed.
    pub events_url: Option<String>,
    pub slots: usize,
    /// Where the agent reaches AWS (`AWS_ENDPOINT_URL`); moto if `None`.
    pub endpoint: Option<String>,
    /// More config keys (`section.key`, a TOML value), written after the
    /// harness's own and replacing any of them with the same name.
    pub extra: Vec<(String, String)>,
    /// The instance metadata endpoint the agent reads notices from; none
    /// (`AWS_EC2_METADATA_DISABLED=true`) unless set.
    pub imds: Option<String>,
}

impl AgentSettings {
    /// Four slots on `queue`.
    pub fn new(queue: &str) -> AgentSettings {
        AgentSettings::queues(&[queue])
    }

    /// Four slots on `queues`, in priority order.
    pub fn queues(queues: &[&str]) -> AgentSettings {
        AgentSettings {
            queues: queues.iter().map(|q| q.to_string()).collect(),
            dead_letter_url: None,
            events_url: None,
            slots: 4,
            endpoint: None,
            extra: Vec::new(),
            imds: None,
        }
    }

    pub fn slots(mut self, n: usize) -> Self {
        self.slots = n;
        self
    }

    pub fn dead_letter(mut self, url: &str) -> Self {
        self.dead_letter_url = Some(url.to_string());
        self
    }

    pub fn events(mut self, url: &str) -> Self {
        self.events_url = Some(url.to_string());
        self
    }

    pub fn endpoint(mut self, url: &str) -> Self {
        self.endpoint = Some(url.to_string());
        self
    }

    /// Reads instance metadata (spot, rebalance, lifecycle notices) from
    /// `endpoint` (a fake IMDS's `http://127.0.0.1:PORT`).
    pub fn imds(mut self, endpoint: &str) -> Self {
        self.imds = Some(endpoint.to_string());
        self
    }

    /// Sets one more config key: `.extra("drain.timeout_s", "8")`; `value`
    /// is TOML as written in the file (quote strings: `"\"text\""`).
    pub fn extra(mut self, key: &str, value: &str) -> Self {
        self.extra.push((key.to_string(), value.to_string()));
        self
    }
}

/// A TOML basic string (JSON's escaping is valid TOML for these values).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// An agent config file being written: sections in order, each key once
/// (a later value for a key replaces the earlier one).
#[derive(Default)]
struct ConfigText {
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl ConfigText {
    fn set(&mut self, section: &str, key: &str, value: String) {
        let at = match self.sections.iter().position(|(s, _)| s == section) {
            Some(at) => at,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let entries = &mut self.sections[at].1;
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => entries.push((key.to_string(), value)),
        }
    }

    fn render(&self) -> String {
        self.sections
            .iter()
            .map(|(section, entries)| {
                let lines: String = entries
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}\n"))
                    .collect();
                format!("[{section}]\n{lines}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One test's world: a moto server, the test's clients, a temporary
/// directory, a signing key pair (Ed25519 and HMAC) with the agents' keys
/// file, an events queue, and `mark/` where jobs leave traces.
pub struct SqsTest {
    pub aws: Aws,
    moto: Moto,
    root: TempDir,
    events_url: String,
    seen: Mutex<Vec<Event>>,
    agents: AtomicU32,
}

impl SqsTest {
    pub fn start() -> SqsTest {
        let moto = Moto::start();
        let aws = Aws::new(&moto.endpoint());
        let root = tempfile::tempdir().expect("tempdir for the test");
        crate::make_mark_dir(&root.path().join("mark"));
        let mut entries = String::new();
        for (kid, alg, file) in [
            (ED25519_KID, "ed25519", "signing.toml"),
            (HMAC_KID, "hmac-sha256", "hmac.signing.toml"),
        ] {
            let out = root.path().join(file);
            let run = run_cli(
                &[
                    "keygen",
                    "--kid",
                    kid,
                    "--alg",
                    alg,
                    "--out",
                    &out.display().to_string(),
                ],
                &[],
            );
            assert_eq!(run.code(), 0, "keygen failed: {run:#?}");
            entries.push_str(&run.stdout);
        }
        let keys = root.path().join("keys.toml");
        std::fs::write(&keys, entries).expect("writing the keys file");
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600 keys file");
        let events_url = aws.create_queue("events", &[]);
        SqsTest {
            aws,
            moto,
            root,
            events_url,
            seen: Mutex::new(Vec::new()),
            agents: AtomicU32::new(0),
        }
    }

    pub fn moto(&self) -> &Moto {
        &self.moto
    }

    /// moto's endpoint.
    pub fn endpoint(&self) -> String {
        self.moto.endpoint()
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The producer's Ed25519 signing key file (kid [`ED25519_KID`]).
    pub fn signing_key(&self) -> PathBuf {
        self.root.path().join("signing.toml")
    }

    /// The producer's HMAC signing key file (kid [`HMAC_KID`]).
    pub fn hmac_signing_key(&self) -> PathBuf {
        self.root.path().join("hmac.signing.toml")
    }

    /// The agents' keys file (both keys).
    pub fn keys_file(&self) -> PathBuf {
        self.root.path().join("keys.toml")
    }

    pub fn events_url(&self) -> &str {
        &self.events_url
    }

    /// Where jobs leave traces.
    pub fn mark(&self) -> PathBuf {
        self.root.path().join("mark")
    }

    /// `MARK=<mark dir>`, for `submit --env`.
    pub fn mark_env(&self) -> String {
        format!("MARK={}", self.mark().display())
    }

    /// The runs file so far (see [`marked`]).
    pub fn runs(&self) -> Runs {
        Runs::read(&self.mark().join("runs"))
    }

    /// Writes `note TEXT` into the runs file, marking a moment among the
    /// jobs' starts and ends.
    pub fn note(&self, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.mark().join("runs"))
            .expect("opening the runs file");
        f.write_all(format!("note {text}\n").as_bytes())
            .expect("writing the runs file");
    }

    /// A standard job queue with a dead-letter queue (RedrivePolicy).
    pub fn job_queue(&self, name: &str) -> JobQueue {
        self.aws.job_queue(name, &QueueOptions::default())
    }

    pub fn job_queue_with(&self, name: &str, opts: &QueueOptions) -> JobQueue {
        self.aws.job_queue(name, opts)
    }

    /// `batchly-agent submit --queue-url URL --key <Ed25519 key> ARGS`,
    /// straight to moto; panics unless it succeeds.
    pub fn submit(&self, queue_url: &str, args: &[&str]) -> Vec<Submitted> {
        let key = self.signing_key().display().to_string();
        let mut full = vec!["submit", "--queue-url", queue_url, "--key", key.as_str()];
        full.extend_from_slice(args);
        let env = aws_env(&self.endpoint());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let run = run_cli(&full, &env);
        assert_eq!(run.code(), 0, "submit {args:?} failed: {run:#?}");
        run.stdout
            .lines()
            .map(|line| {
                let (job_id, message_id) = line
                    .split_once('\t')
                    .unwrap_or_else(|| panic!("submit printed {line:?}, not JOB<TAB>MESSAGE"));
                Submitted {
                    job_id: job_id.to_string(),
                    message_id: message_id.to_string(),
                }
            })
            .collect()
    }

    /// An envelope body built by the independent Python producer, signed
    /// with the key in `key_file` and labelled `kid`.
    pub fn sign_with_python(
        &self,
        key_file: &Path,
        kid: &str,
        iat: i64,
        exp: i64,
        job: &str,
    ) -> String {
        sign_with_python(key_file, kid, iat, exp, job)
    }

    /// Writes the config file of a new agent (its own directory under the
    /// test's root); returns the directory and the config path.
    pub fn write_agent_config(&self, settings: &AgentSettings) -> (PathBuf, PathBuf) {
        let n = self.agents.fetch_add(1, Ordering::SeqCst) + 1;
        let dir = self.root.path().join(format!("agent-{n}"));
        std::fs::create_dir(&dir).expect("creating the agent's dir");
        let p = |sub: &str| toml_str(&dir.join(sub).display().to_string());
        let urls = match settings.queues.as_slice() {
            [one] => toml_str(one),
            many => format!(
                "[{}]",
                many.iter()
                    .map(|u| toml_str(u))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let events = toml_str(settings.events_url.as_deref().unwrap_or(&self.events_url));
        let mut queue = vec![("url", urls), ("events_url", events)];
        if let Some(dlq) = &settings.dead_letter_url {
            queue.push(("dead_letter_url", toml_str(dlq)));
        }
        let mut config = ConfigText::default();
        for (section, entries) in [
            ("queue", queue),
            (
                "signing",
                vec![(
                    "keys_file",
                    toml_str(&self.keys_file().display().to_string()),
                )],
            ),
            ("admin", vec![("socket", p("agent.sock"))]),
            ("state", vec![("dir", p("state"))]),
            ("logs", vec![("spool_dir", p("spool"))]),
            (
                "jobs",
                vec![
                    ("work_dir", p("work")),
                    ("max_concurrent", settings.slots.to_string()),
                    ("retry_backoff_s", "0".to_string()),
                    ("kill_grace_s", "1".to_string()),
                ],
            ),
            (
                "agent",
                // With instance metadata the agent learns its id there.
                if settings.imds.is_some() {
                    Vec::new()
                } else {
                    vec![("instance_id", toml_str(&format!("agent-{n}")))]
                },
            ),
            (
                "sandbox",
                vec![(
                    "bind_paths",
                    format!("[{}]", toml_str(&self.mark().display().to_string())),
                )],
            ),
        ] {
            for (key, value) in entries {
                config.set(section, key, value);
            }
        }
        for (key, value) in &settings.extra {
            let (section, name) = key
                .split_once('.')
                .unwrap_or_else(|| panic!("extra config key {key:?} is not `section.key`"));
            config.set(section, name, value.clone());
        }
        let text = config.render();
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).expect("writing the agent config");
        (dir, path)
    }

    fn agent_env(&self, settings: &AgentSettings) -> Vec<(String, String)> {
        let endpoint = settings.endpoint.clone().unwrap_or_else(|| self.endpoint());
        let mut env = aws_env(&endpoint);
        if let Some(imds) = &settings.imds {
            for (k, v) in env.iter_mut() {
                if k == "AWS_EC2_METADATA_DISABLED" {
                    *v = "false".to_string();
                }
            }
            env.push((
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".to_string(),
                imds.clone(),
            ));
        }
        env
    }

    /// Starts `batchly-agent run` with `settings` and waits until it has
    /// checked its queues and opened its admin socket.
    pub fn agent(&self, settings: AgentSettings) -> SqsAgent {
        self.agent_with_state(settings, |_| {})
    }

    /// Like `agent`, but first hands `prepare` the agent's `state.dir`
    /// (not created yet) to leave there what an earlier run would have
    /// (custody copies, say).
    pub fn agent_with_state(
        &self,
        settings: AgentSettings,
        prepare: impl FnOnce(&Path),
    ) -> SqsAgent {
        let (dir, config) = self.write_agent_config(&settings);
        prepare(&dir.join("state"));
        let mut agent = SqsAgent {
            dir,
            config,
            env: self.agent_env(&settings),
            child: None,
            runs: 0,
        };
        agent.spawn();
        agent
    }

    /// Runs `batchly-agent run` with `settings` when it is expected to
    /// refuse to start; panics if it is still running after `limit`.
    pub fn run_expecting_exit(&self, settings: AgentSettings, limit: Duration) -> Run {
        let (_, config) = self.write_agent_config(&settings);
        let env = self.agent_env(&settings);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_cli_within(
            &["run", "--config", &config.display().to_string()],
            &env,
            limit,
        )
    }

    /// Every job event published so far (read from the events queue, which
    /// the test empties as it goes).
    pub fn events(&self) -> Vec<Event> {
        let fresh = self.aws.take_all(&self.events_url, 0);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.extend(fresh.iter().filter_map(|m| Event::parse_job(&m.body)));
        seen.clone()
    }

    /// Polls the events until `cond` holds and returns them; panics after
    /// `LONG_WAIT`, or as soon as one of `agents` has exited.
    pub fn wait_events(
        &self,
        what: &str,
        agents: &[&SqsAgent],
        cond: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        self.wait_events_within(what, LONG_WAIT, agents, cond)
    }

    /// Waits until every one of `jobs` has its `job.started` event.
    pub fn wait_started(&self, jobs: &[Submitted], agents: &[&SqsAgent]) -> Vec<Event> {
        let what = match jobs {
            [one] => format!("job {} to start", one.job_id),
            _ => format!("all {} jobs to start", jobs.len()),
        };
        self.wait_events(&what, agents, |ev| {
            jobs.iter().all(|j| {
                crate::of_job(ev, &j.job_id)
                    .iter()
                    .any(|e| e.kind == "job.started")
            })
        })
    }

    pub fn wait_events_within(
        &self,
        what: &str,
        limit: Duration,
        agents: &[&SqsAgent],
        cond: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = Instant::now() + limit;
        loop {
            let events = self.events();
            if cond(&events) {
                return events;
            }
            let exited = agents.iter().find(|a| !a.is_running());
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "{} while waiting for {what}\n{}",
                    if exited.is_some() {
                        "an agent exited".to_string()
                    } else {
                        format!("timed out after {limit:?}")
                    },
                    self.diagnostics(&events, agents)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `url` holds no message at all (visible, in flight or
    /// delayed).
    pub fn wait_queue_empty(&self, url: &str, agents: &[&SqsAgent]) {
        let deadline = Instant::now() + LONG_WAIT;
        loop {
            let depth = self.aws.depth(url);
            if depth.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {LONG_WAIT:?} waiting for {url} to be empty: {depth:?}\n{}",
                    self.diagnostics(&self.events(), agents)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The events, the runs file, the agents' logs and moto's, for failure
    /// messages.
    pub fn diagnostics(&self, events: &[Event], agents: &[&SqsAgent]) -> String {
        let mut out = String::from("--- events ---\n");
        for e in events {
            out.push_str(&e.raw.to_string());
            out.push('\n');
        }
        out.push_str(&format!(
            "--- runs ---\n{}\n",
            read_lossy(&self.mark().join("runs"))
        ));
        for a in agents {
            out.push_str(&a.diagnostics());
        }
        out.push_str(&format!("--- moto (tail) ---\n{}\n", self.moto.log_tail()));
        out
    }
}

/// Runs the independent Python producer (see `tests/python/sign_envelope.py`).
pub fn sign_with_python(key_file: &Path, kid: &str, iat: i64, exp: i64, job: &str) -> String {
    let out = Command::new(python_bin())
        .arg(python_signer())
        .arg(key_file)
        .args([kid, &iat.to_string(), &exp.to_string(), job])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python_signer().display()));
    assert!(
        out.status.success(),
        "the Python signer failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("the signer prints UTF-8")
        .trim_end()
        .to_string()
}

/// A `batchly-agent run` process with its own config and directories.
pub struct SqsAgent {
    dir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    runs: u32,
}

impl SqsAgent {
    fn out_path(&self, run: u32) -> PathBuf {
        self.dir.join(format!("run-{run}.stderr"))
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let child = agent_command()
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.dir)
            .stdout(
                File::create(self.dir.join(format!("run-{}.stdout", self.runs)))
                    .expect("stdout file"),
            )
            .stderr(File::create(self.out_path(self.runs)).expect("stderr file"))
            .spawn()
            .expect("starting batchly-agent run");
        self.child = Some(child);
        let socket = self.dir.join("agent.sock");
        let deadline = Instant::now() + AGENT_START_WAIT;
        loop {
            if UnixStream::connect(&socket).is_ok() {
                return;
            }
            if !self.is_running() {
                panic!(
                    "batchly-agent run exited before opening its admin socket\n{}",
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "batchly-agent run did not open {} within {AGENT_START_WAIT:?}\n{}",
                    socket.display(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the agent again on the same directory (config, state dir with
    /// its in-flight ledger, work dir, socket) once its run has exited, as
    /// systemd would after a crash.
    pub fn restart(&mut self) {
        let status = self.wait_exit();
        assert!(
            !self.is_running(),
            "the previous run ({status}) is gone before the restart"
        );
        self.spawn();
    }

    /// The agent's directory (config, state, work, logs, socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("the agent was started");
        i32::try_from(child.id()).expect("pids fit in i32")
    }

    /// Whether the current run has not exited.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && super::pid_alive(self.pid())
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("sending {sig} to the agent: {e}"));
    }

    /// Waits (at most `LONG_WAIT`) for the current run to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LONG_WAIT;
        loop {
            let child = self.child.as_mut().expect("the agent was started");
            if let Some(status) = child.try_wait().expect("waiting for the agent") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the agent did not exit within {LONG_WAIT:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// What the current run wrote on stderr so far.
    /// What `batchly-agent status` prints for this agent.
    pub fn status(&self) -> crate::Run {
        crate::run_cli(
            &["status", "--config", &self.config.display().to_string()],
            &[],
        )
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.out_path(self.runs))
    }

    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for run in 1..=self.runs {
            out.push_str(&format!(
                "--- {} run {run} stderr ---\n{}\n",
                self.dir.display(),
                read_lossy(&self.out_path(run))
            ));
        }
        out
    }

    /// Kills every process still working in one of this agent's job work
    /// dirs, so a failed test leaves no `sleep` behind.
    fn kill_leftover_jobs(&self) {
        super::kill_processes_working_in(&self.dir.join("work"));
    }
}

impl Drop for SqsAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.kill_leftover_jobs();
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}
