//! Checks the queues at start, before any message is taken: each job queue
//! exists and may be used, its kind (standard or FIFO), its visibility
//! timeout and its dead-letter queue. What it finds wrong is the
//! operator's to fix, so it is a `SetupError` naming the config key and
//! the URL (exit 2). An endpoint that does not answer is retried by the
//! one retry policy, for at most `SETUP_BUDGET`.
//!
//! It also reads the `Date` SQS answers with, so a host clock far off is
//! said loudly at start (signatures are checked against that clock).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::aws_errors::describe;
use crate::retry::{self, ErrorClass, GaveUp};

/// How long the checks at start keep trying an endpoint that does not
/// answer (the network may come up after the agent at boot).
pub const SETUP_BUDGET: Duration = Duration::from_secs(300);

/// What the agent learned about one queue at start.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub url: String,
    pub fifo: bool,
    pub visibility: Duration,
    pub dead_letter_url: String,
}

/// A problem found while checking the queues at start: the operator's to
/// fix (exit 2), unless `unreachable` (exit 1: nothing to fix in the
/// config, the endpoint did not answer in time).
#[derive(Debug, thiserror::Error)]
#[error("{key} {url}: {detail}")]
pub struct SetupError {
    pub key: &'static str,
    pub url: String,
    pub detail: String,
    pub unreachable: bool,
}

impl SetupError {
    pub fn new(key: &'static str, url: &str, detail: impl Into<String>) -> SetupError {
        SetupError {
            key,
            url: url.to_string(),
            detail: detail.into(),
            unreachable: false,
        }
    }
}

/// Checks that a queue exists and may be used; the error names the config
/// key and the URL.
pub async fn check_queue(client: &Client, key: &'static str, url: &str) -> Result<(), SetupError> {
    queue_attributes(client, key, url, None).await.map(|_| ())
}

/// Reads one job queue: kind, visibility timeout, dead-letter queue.
/// `clock` receives the time SQS's answer was dated.
pub async fn describe_queue(
    client: &Client,
    url: &str,
    dead_letter_override: Option<&str>,
    clock: &ClockProbe,
) -> Result<QueueInfo, SetupError> {
    let attrs = queue_attributes(client, "queue.url", url, Some(clock)).await?;
    let fifo = attrs.get("FifoQueue").is_some_and(|v| v == "true");
    let visibility = attrs
        .get("VisibilityTimeout")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(30));
    let dead_letter_url = match dead_letter_override {
        Some(dlq) => {
            queue_attributes(client, "queue.dead_letter_url", dlq, None).await?;
            dlq.to_string()
        }
        None => redrive_target(client, url, attrs.get("RedrivePolicy")).await?,
    };
    Ok(QueueInfo {
        url: url.to_string(),
        fifo,
        visibility,
        dead_letter_url,
    })
}

/// `GetQueueAttributes` as a map; errors name the config key and the URL.
async fn queue_attributes(
    client: &Client,
    key: &'static str,
    url: &str,
    clock: Option<&ClockProbe>,
) -> Result<HashMap<String, String>, SetupError> {
    let deadline = tokio::time::Instant::now() + SETUP_BUDGET;
    let call = || {
        let mut req = client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .customize();
        if let Some(clock) = clock {
            req = req.interceptor(clock.clone());
        }
        req.send()
    };
    match retry::retry("GetQueueAttributes", deadline, retry::classify, call).await {
        Ok(out) => Ok(out
            .attributes
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.as_str().to_string(), v))
            .collect()),
        Err(GaveUp::Final(_, e)) => Err(SetupError::new(key, url, describe(&e))),
        Err(GaveUp::Deadline(last)) => Err(SetupError {
            unreachable: true,
            ..SetupError::new(
                key,
                url,
                format!(
                    "no answer within {}s: {}",
                    SETUP_BUDGET.as_secs(),
                    last.as_ref().map(describe).unwrap_or_default()
                ),
            )
        }),
    }
}

/// The dead-letter queue named by the queue's RedrivePolicy.
async fn redrive_target(
    client: &Client,
    url: &str,
    policy: Option<&String>,
) -> Result<String, SetupError> {
    let missing = || {
        SetupError::new(
            "queue.url",
            url,
            "has no dead-letter queue: set queue.dead_letter_url or give the queue a RedrivePolicy \
             (without one, rejected messages could only be lost or retried forever)",
        )
    };
    let policy = policy.ok_or_else(missing)?;
    let arn = serde_json::from_str::<serde_json::Value>(policy)
        .ok()
        .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(str::to_string))
        .ok_or_else(missing)?;
    // arn:aws:sqs:REGION:ACCOUNT:NAME
    let parts: Vec<&str> = arn.split(':').collect();
    let (Some(account), Some(name)) = (parts.get(4), parts.get(5)) else {
        return Err(SetupError::new(
            "queue.url",
            url,
            format!("RedrivePolicy names a dead-letter queue by an ARN that cannot be read: {arn}"),
        ));
    };
    let deadline = tokio::time::Instant::now() + SETUP_BUDGET;
    let call = || {
        client
            .get_queue_url()
            .queue_name(*name)
            .queue_owner_aws_account_id(*account)
            .send()
    };
    let out = retry::retry("GetQueueUrl", deadline, retry::classify, call)
        .await
        .map_err(|e| {
            let detail = match &e {
                GaveUp::Final(_, e) | GaveUp::Deadline(Some(e)) => describe(e),
                GaveUp::Deadline(None) => "no answer".into(),
            };
            SetupError {
                unreachable: e.class() == ErrorClass::Transient,
                ..SetupError::new(
                    "queue.url",
                    url,
                    format!("its dead-letter queue {arn}: {detail}"),
                )
            }
        })?;
    out.queue_url.ok_or_else(missing)
}

/// Host clocks further than this from SQS's are reported at start.
pub const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(60);

/// Remembers the `Date` of an SQS answer (whole seconds) and the host's
/// clock when it arrived.
#[derive(Debug, Clone, Default)]
pub struct ClockProbe {
    seen: Arc<Mutex<Option<(SystemTime, SystemTime)>>>,
}

impl ClockProbe {
    /// How far the host clock is ahead of SQS's (negative: behind), in
    /// seconds; `None` until an answer carried a readable `Date`. The
    /// header has whole seconds, so differences under 2 s are noise.
    pub fn host_ahead_s(&self) -> Option<i64> {
        let (server, host) = (*self.seen.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(match host.duration_since(server) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(behind) => -(behind.duration().as_secs() as i64),
        })
    }
}

impl Intercept for ClockProbe {
    fn name(&self) -> &'static str {
        "batchly-clock-probe"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let date = context
            .response()
            .headers()
            .get("date")
            .and_then(|d| {
                aws_smithy_types::DateTime::from_str(
                    d,
                    aws_smithy_types::date_time::Format::HttpDate,
                )
                .ok()
            })
            .and_then(|d| SystemTime::try_from(d).ok());
        if let Some(server) = date {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((server, SystemTime::now()));
        }
        Ok(())
    }
}
