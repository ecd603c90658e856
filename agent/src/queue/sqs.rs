//! The production job source: one or more SQS queues (standard or FIFO) in
//! priority order. It owns everything SQS-specific: long polling, the
//! visibility lease of each message it hands out (heartbeats in batches,
//! ahead of expiry, never past SQS's 12-hour limit), batched deletes and
//! releases, and the dead-letter queue for rejected messages.
//!
//! It never holds a message nobody asked for: `receive(n)` asks SQS for at
//! most `n`. A lease stays renewed from receive until the supervisor deletes,
//! releases or dead-letters the message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};
use aws_sdk_sqs::Client;

use super::batch::Batcher;
use super::custody::{Attribute, CustodyStore, Held};
use super::{JobSource, Message, QueueError};

/// SQS hides a received message for at most 12 hours from its receipt.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// SQS's longest long poll (WaitTimeSeconds).
const LONG_POLL_S: i32 = 20;
/// With several queues each is polled briefly in turn, so a busy urgent
/// queue is never starved by waiting on an idle one.
const PRIORITY_POLL_S: i32 = 1;
/// How long the supervisor lets slots free up before asking a busy queue
/// for more work (see `JobSource::receive_gather`).
const RECEIVE_GATHER: Duration = Duration::from_millis(50);
/// How long visibility changes wait to share a batch call.
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// How long deletes wait to share a batch call (less when nothing else can
/// join, see `delete_batcher`).
const DELETE_LINGER: Duration = Duration::from_millis(250);
/// How long before the 12-hour limit the agent takes custody of a message
/// whose job still runs.
const CUSTODY_LEAD: Duration = Duration::from_secs(600);
/// Message attributes a dead-lettered message carries (SQS allows 10).
pub const ATTR_REASON: &str = "batchly-reject-reason";
pub const ATTR_DETAIL: &str = "batchly-reject-detail";
pub const ATTR_SOURCE_QUEUE: &str = "batchly-source-queue";
pub const ATTR_SOURCE_MESSAGE: &str = "batchly-source-message-id";
/// Failed attempts of the job before this copy of its message was sent. A
/// release that is not a failure (exit 75, drain) sends the message again
/// as a new one carrying this count, so SQS's receive count, which starts
/// over with the copy, only grows with failures. Not signed: a producer
/// that sets it only shortens its own job's retries.
pub const ATTR_FAILURES: &str = "batchly-failures";
/// Receives of the job before this copy of its message was sent, so that
/// backoffs for agent-side trouble keep growing across copies (and log
/// stream names stay unique).
pub const ATTR_RECEIVES: &str = "batchly-receives";
/// The attributes the agent adds to a copy.
const OWN_ATTRIBUTES: usize = 2;
/// SQS allows at most this many message attributes.
const MAX_ATTRIBUTES: usize = 10;
/// SQS delays a new message by at most 15 minutes.
const MAX_SEND_DELAY: Duration = Duration::from_secs(900);
/// SQS limits a message attribute value with the rest of the message to
/// 256 KiB; a reason detail never needs more than this.
const MAX_DETAIL_BYTES: usize = 1024;

/// What the agent learned about one queue at start.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub url: String,
    pub fifo: bool,
    pub visibility: Duration,
    pub dead_letter_url: String,
}

/// A problem found while checking the queues at start: the operator's to
/// fix (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{key} {url}: {detail}")]
pub struct SetupError {
    pub key: &'static str,
    pub url: String,
    pub detail: String,
}

/// One message handed out and not yet finished, keyed by message id. If
/// SQS hands the same message out again while its job still runs here
/// (its visibility lapsed, say during an outage), the lease takes the new
/// receipt and no second copy is started.
struct Lease {
    queue: usize,
    receipt: String,
    received_at: Instant,
    visible_until: Instant,
    message_id: String,
    body: String,
    group: Option<String>,
    /// The producer's message attributes, kept for copies sent back.
    attributes: Vec<Attribute>,
    /// The attempt this receive is (see `Message::attempt`).
    attempt: u32,
    /// Receives of the job so far, this one included.
    receives: u32,
    /// Whether the message is still in SQS or in the custody store.
    custody: Custody,
    /// A copy was sent for a release; only the original's delete is left.
    copy_sent: bool,
    /// A delete or release is under way: custody is not taken under it.
    finishing: bool,
}

/// Where a held message lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Custody {
    /// In SQS, kept hidden by heartbeats.
    No,
    /// Being copied to the custody store and deleted from SQS; deletes and
    /// releases wait until that has settled either way.
    Taking,
    /// Deleted from SQS; the custody store has the only copy.
    Yes,
}

/// How often a delete or release looks whether custody has settled.
const CUSTODY_SETTLE_POLL: Duration = Duration::from_millis(20);

impl Lease {
    fn held(&self, queue_url: &str, failures: u32) -> Held {
        let receives = self.receives;
        Held {
            message_id: self.message_id.clone(),
            queue_url: queue_url.to_string(),
            body: self.body.clone(),
            group: self.group.clone(),
            failures,
            receives,
            attributes: self.attributes.clone(),
        }
    }
}

type Leases = Arc<Mutex<HashMap<String, Lease>>>;

fn lock(leases: &Leases) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
    leases.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the source and its heartbeat task share.
struct Shared {
    client: Client,
    queues: Vec<QueueInfo>,
    deletes: Vec<Batcher<String>>,
    visibility: Vec<Batcher<(String, i32)>>,
    leases: Leases,
    custody: CustodyStore,
    /// How long SQS may hide a message after its receipt (12 hours).
    max_hold: Duration,
}

impl Shared {
    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        lock(&self.leases)
    }

    /// Time kept back from `max_hold`: custody is taken this long before
    /// it, and leases are never renewed into its second half.
    fn lead(&self) -> Duration {
        (self.max_hold / 8).min(CUSTODY_LEAD)
    }
}

pub struct SqsQueue {
    shared: Arc<Shared>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for SqsQueue {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

use crate::aws_errors::describe;

/// Service errors that no retry will fix: the queue is missing or we may
/// not use it.
fn is_permanent<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    let Some(code) = e.as_service_error().and_then(|s| s.code()) else {
        return false;
    };
    matches!(
        code,
        "AWS.SimpleQueueService.NonExistentQueue"
            | "QueueDoesNotExist"
            | "AccessDenied"
            | "AccessDeniedException"
            | "InvalidAddress"
            | "InvalidClientTokenId"
            | "InvalidSecurity"
            | "UnrecognizedClientException"
    )
}

impl SqsQueue {
    /// Checks every queue (and the dead-letter and events queues) and starts
    /// the lease heartbeat. A queue that does not exist or may not be used
    /// is a `SetupError`; an unreachable endpoint is retried until it
    /// answers.
    pub async fn connect(
        client: Client,
        urls: &[String],
        dead_letter_override: Option<&str>,
        state_dir: &std::path::Path,
    ) -> Result<SqsQueue, SetupError> {
        SqsQueue::connect_with_hold(
            client,
            urls,
            dead_letter_override,
            state_dir,
            MAX_VISIBILITY,
        )
        .await
    }

    /// `connect` with another limit than SQS's 12 hours (tests).
    pub async fn connect_with_hold(
        client: Client,
        urls: &[String],
        dead_letter_override: Option<&str>,
        state_dir: &std::path::Path,
        max_hold: Duration,
    ) -> Result<SqsQueue, SetupError> {
        let custody = CustodyStore::open(state_dir).map_err(|e| SetupError {
            key: "state.dir",
            url: state_dir.display().to_string(),
            detail: format!("cannot create its custody directory: {e}"),
        })?;
        let mut queues = Vec::new();
        for url in urls {
            let attrs = queue_attributes(&client, "queue.url", url).await?;
            let fifo = attrs.get("FifoQueue").is_some_and(|v| v == "true");
            let visibility = attrs
                .get("VisibilityTimeout")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(30));
            let dead_letter_url = match dead_letter_override {
                Some(dlq) => {
                    queue_attributes(&client, "queue.dead_letter_url", dlq).await?;
                    dlq.to_string()
                }
                None => redrive_target(&client, url, attrs.get("RedrivePolicy")).await?,
            };
            queues.push(QueueInfo {
                url: url.clone(),
                fifo,
                visibility,
                dead_letter_url,
            });
        }
        let leases = Leases::default();
        let deletes = queues
            .iter()
            .enumerate()
            .map(|(index, q)| delete_batcher(client.clone(), q.url.clone(), index, leases.clone()))
            .collect();
        let visibility = queues
            .iter()
            .map(|q| visibility_batcher(client.clone(), q.url.clone()))
            .collect();
        let shared = Arc::new(Shared {
            client,
            queues,
            deletes,
            visibility,
            leases,
            custody,
            max_hold,
        });
        let heartbeat = tokio::spawn(heartbeat(shared.clone()));
        Ok(SqsQueue { shared, heartbeat })
    }

    pub fn queues(&self) -> &[QueueInfo] {
        &self.shared.queues
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.shared.leases()
    }

    /// Marks the message as being finished (deleted or released), so that
    /// custody is not taken under the call, once custody being taken right
    /// now has settled; returns whether the message is in custody (no
    /// longer in SQS). A message without a lease (one recovered after a
    /// crash) is not.
    async fn begin_finishing(&self, message_id: &str) -> bool {
        loop {
            if let Some(in_custody) = self.leases().get_mut(message_id).map_or(Some(false), |l| {
                (l.custody != Custody::Taking).then(|| {
                    l.finishing = true;
                    l.custody == Custody::Yes
                })
            }) {
                return in_custody;
            }
            tokio::time::sleep(CUSTODY_SETTLE_POLL).await;
        }
    }

    /// A delete or release failed: custody may be taken again until the
    /// caller retries.
    fn end_finishing(&self, message_id: &str) {
        if let Some(l) = self.leases().get_mut(message_id) {
            l.finishing = false;
        }
    }

    /// The newest receipt of a message (it changes if SQS hands the message
    /// out again while its job runs).
    fn current_receipt(&self, msg: &Message) -> String {
        self.leases()
            .get(&msg.id)
            .map(|l| l.receipt.clone())
            .unwrap_or_else(|| msg.receipt.clone())
    }

    /// Sends a held message back to its queue as a new message (visible
    /// after `delay`, at most SQS's 15 minutes) and forgets the copy.
    async fn return_held(&self, held: &Held, delay: Duration) -> Result<(), QueueError> {
        let copy = send_back(&self.shared.client, held, delay).await?;
        tracing::info!(message_id = %held.message_id, copy = %copy, "message held in custody sent back to its queue");
        self.shared
            .custody
            .release(&held.message_id)
            .map_err(|e| QueueError::Service {
                action: "releasing custody of",
                target: held.message_id.clone(),
                detail: e.to_string(),
            })
    }

    async fn receive_from(
        &self,
        index: usize,
        max: usize,
        wait_s: i32,
    ) -> Result<Vec<Message>, QueueError> {
        let q = &self.shared.queues[index];
        let asked_at = Instant::now();
        let out = self
            .shared
            .client
            .receive_message()
            .queue_url(&q.url)
            .max_number_of_messages(max.min(10) as i32)
            .wait_time_seconds(wait_s)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| QueueError::Service {
                action: "receiving from",
                target: q.url.clone(),
                detail: describe(&e),
            })?;
        let mut got = Vec::new();
        for m in out.messages.unwrap_or_default() {
            let (Some(id), Some(receipt)) = (m.message_id.clone(), m.receipt_handle.clone()) else {
                continue;
            };
            let attrs = m.attributes.unwrap_or_default();
            let sqs_receives = attrs
                .get(&MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(1)
                .max(1);
            let group = attrs
                .get(&MessageSystemAttributeName::MessageGroupId)
                .cloned();
            let body = m.body.unwrap_or_default();
            let carried = split_attributes(m.message_attributes.unwrap_or_default());
            let (failures, attributes) = (carried.failures, carried.attributes);
            let receive_count = carried.receives.saturating_add(sqs_receives);
            if let Some(running) = self.leases().get_mut(&id) {
                // Already running here: its visibility lapsed (an outage
                // longer than the visibility timeout) and SQS handed it out
                // again, to us. Keep the job, take the new receipt.
                running.receipt = receipt;
                running.received_at = asked_at;
                running.visible_until = asked_at + q.visibility;
                tracing::warn!(message_id = %id, "a message came back while its job still runs here (its visibility lapsed); not starting a second copy");
                continue;
            }
            self.leases().insert(
                id.clone(),
                Lease {
                    queue: index,
                    receipt: receipt.clone(),
                    received_at: asked_at,
                    visible_until: asked_at + q.visibility,
                    message_id: id.clone(),
                    body: body.clone(),
                    group: group.clone(),
                    attributes,
                    attempt: failures.saturating_add(sqs_receives),
                    receives: receive_count,
                    custody: Custody::No,
                    copy_sent: false,
                    finishing: false,
                },
            );
            got.push(Message {
                id,
                body: body.into_bytes(),
                attempt: failures.saturating_add(sqs_receives),
                receive_count,
                receipt,
                queue: index,
                group,
            });
        }
        Ok(got)
    }

    /// A copy stands for the message now: a retry only finishes the
    /// original.
    fn mark_copy_sent(&self, message_id: &str) {
        if let Some(l) = self.leases().get_mut(message_id) {
            l.copy_sent = true;
        }
    }

    /// Drops the custody copy of a message that is finished, then its lease
    /// (kept if the copy cannot be dropped, for the retry).
    fn drop_held(&self, message_id: &str) -> Result<(), QueueError> {
        if let Err(e) = self.shared.custody.release(message_id) {
            self.end_finishing(message_id);
            return Err(QueueError::Service {
                action: "releasing custody of",
                target: message_id.to_string(),
                detail: e.to_string(),
            });
        }
        self.forget_lease(message_id);
        Ok(())
    }

    fn forget_lease(&self, message_id: &str) {
        self.leases().remove(message_id);
    }
}

/// What a message carries in its attributes: the counts a copy took over
/// from the message it replaced, and the producer's own attributes (sent
/// on with any copy).
struct Carried {
    failures: u32,
    receives: u32,
    attributes: Vec<Attribute>,
}

fn split_attributes(attrs: HashMap<String, MessageAttributeValue>) -> Carried {
    let count = |value: &MessageAttributeValue| {
        value
            .string_value()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let mut carried = Carried {
        failures: 0,
        receives: 0,
        attributes: Vec::new(),
    };
    for (name, value) in attrs {
        match name.as_str() {
            ATTR_FAILURES => carried.failures = count(&value),
            ATTR_RECEIVES => carried.receives = count(&value),
            _ => carried.attributes.push(Attribute {
                name,
                data_type: value.data_type().to_string(),
                string_value: value.string_value().map(str::to_string),
                binary_base64: value.binary_value().map(|b| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.encode(b.as_ref())
                }),
            }),
        }
    }
    carried.attributes.sort_by(|a, b| a.name.cmp(&b.name));
    carried
}

/// The attributes of a copy sent back: the producer's and the agent's
/// counts. None when they do not fit SQS's limit of ten.
fn copy_attributes(held: &Held) -> Option<Vec<(String, MessageAttributeValue)>> {
    if held.attributes.len() + OWN_ATTRIBUTES > MAX_ATTRIBUTES {
        return None;
    }
    let mut out = Vec::with_capacity(held.attributes.len() + 1);
    for a in &held.attributes {
        let mut value = MessageAttributeValue::builder().data_type(&a.data_type);
        if let Some(s) = &a.string_value {
            value = value.string_value(s);
        }
        if let Some(b) = &a.binary_base64 {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
            value = value.binary_value(aws_smithy_types::Blob::new(bytes));
        }
        out.push((a.name.clone(), value.build().ok()?));
    }
    for (name, count) in [
        (ATTR_FAILURES, held.failures),
        (ATTR_RECEIVES, held.receives),
    ] {
        let value = MessageAttributeValue::builder()
            .data_type("Number")
            .string_value(count.to_string())
            .build()
            .ok()?;
        out.push((name.to_string(), value));
    }
    Some(out)
}

/// Checks that a queue exists and may be used; the error names the config
/// key and the URL.
pub async fn check_queue(client: &Client, key: &'static str, url: &str) -> Result<(), SetupError> {
    queue_attributes(client, key, url).await.map(|_| ())
}

/// `GetQueueAttributes` as a map; errors name the config key and the URL.
async fn queue_attributes(
    client: &Client,
    key: &'static str,
    url: &str,
) -> Result<HashMap<String, String>, SetupError> {
    let mut wait = Duration::from_secs(1);
    loop {
        let res = client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await;
        match res {
            Ok(out) => {
                return Ok(out
                    .attributes
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k.as_str().to_string(), v))
                    .collect())
            }
            Err(e) if is_permanent(&e) || e.as_service_error().is_some() => {
                return Err(SetupError {
                    key,
                    url: url.to_string(),
                    detail: describe(&e),
                })
            }
            Err(e) => {
                tracing::warn!(queue = url, error = %describe(&e), retry_in_s = wait.as_secs(), "cannot reach SQS; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The dead-letter queue named by the queue's RedrivePolicy.
async fn redrive_target(
    client: &Client,
    url: &str,
    policy: Option<&String>,
) -> Result<String, SetupError> {
    let missing = || SetupError {
        key: "queue.url",
        url: url.to_string(),
        detail:
            "has no dead-letter queue: set queue.dead_letter_url or give the queue a RedrivePolicy \
                 (without one, rejected messages could only be lost or retried forever)"
                .to_string(),
    };
    let policy = policy.ok_or_else(missing)?;
    let arn = serde_json::from_str::<serde_json::Value>(policy)
        .ok()
        .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(str::to_string))
        .ok_or_else(missing)?;
    // arn:aws:sqs:REGION:ACCOUNT:NAME
    let parts: Vec<&str> = arn.split(':').collect();
    let (Some(account), Some(name)) = (parts.get(4), parts.get(5)) else {
        return Err(SetupError {
            key: "queue.url",
            url: url.to_string(),
            detail: format!(
                "RedrivePolicy names a dead-letter queue by an ARN that cannot be read: {arn}"
            ),
        });
    };
    let out = client
        .get_queue_url()
        .queue_name(*name)
        .queue_owner_aws_account_id(*account)
        .send()
        .await
        .map_err(|e| SetupError {
            key: "queue.url",
            url: url.to_string(),
            detail: format!("its dead-letter queue {arn}: {}", describe(&e)),
        })?;
    out.queue_url.ok_or_else(missing)
}

/// Deletes wait up to `DELETE_LINGER` for company, but go out as soon as
/// every message held from the queue is in the batch: nothing else could
/// join it, so jobs that ended together are deleted in one call at once.
fn delete_batcher(client: Client, url: String, queue: usize, leases: Leases) -> Batcher<String> {
    let complete = move |entries: usize| {
        let held = lock(&leases)
            .values()
            .filter(|l| l.queue == queue && l.custody != Custody::Yes)
            .count();
        entries >= held
    };
    Batcher::spawn_until(DELETE_LINGER, complete, move |receipts: Vec<String>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let entries = receipts
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>();
            let entries = match entries {
                Ok(e) => e,
                Err(e) => return vec![Err(e.to_string()); receipts.len()],
            };
            let call = || {
                client
                    .delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries.clone()))
                    .send()
            };
            match retry_transient(call).await {
                Ok(out) => per_entry(receipts.len(), out.failed()),
                Err(e) => vec![Err(e); receipts.len()],
            }
        }
    })
}

fn visibility_batcher(client: Client, url: String) -> Batcher<(String, i32)> {
    Batcher::spawn(BATCH_LINGER, move |changes: Vec<(String, i32)>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let entries = changes
                .iter()
                .enumerate()
                .map(|(i, (r, secs))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(*secs)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>();
            let entries = match entries {
                Ok(e) => e,
                Err(e) => return vec![Err(e.to_string()); changes.len()],
            };
            let call = || {
                client
                    .change_message_visibility_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries.clone()))
                    .send()
            };
            match retry_transient(call).await {
                Ok(out) => per_entry(changes.len(), out.failed()),
                Err(e) => vec![Err(e); changes.len()],
            }
        }
    })
}

/// One result per entry from a batch answer's failures (ids are indexes).
fn per_entry(
    n: usize,
    failed: &[aws_sdk_sqs::types::BatchResultErrorEntry],
) -> Vec<Result<(), String>> {
    let mut out = vec![Ok(()); n];
    for f in failed {
        if let Some(slot) = f.id().parse::<usize>().ok().and_then(|i| out.get_mut(i)) {
            *slot = Err(format!("{}: {}", f.code(), f.message().unwrap_or("")));
        }
    }
    out
}

/// Longest the agent keeps retrying one call while SQS cannot be reached.
const RETRY_FOR: Duration = Duration::from_secs(600);

/// Retries a call that failed for a transient reason (unreachable, throttled,
/// 5xx) with capped exponential backoff and jitter; the SDK's own retries
/// come first. Gives up after `RETRY_FOR`, or at once on a client error.
async fn retry_transient<T, E, F, Fut>(call: F) -> Result<T, String>
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E>>>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(500);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let transient = match &e {
                    SdkError::ServiceError(s) => {
                        let status = s.raw().status().as_u16();
                        status >= 500
                            || status == 429
                            || matches!(e.code(), Some(c) if c.contains("Throttl"))
                    }
                    _ => true,
                };
                if !transient || start.elapsed() >= RETRY_FOR {
                    return Err(describe(&e));
                }
                let jittered = wait / 2 + wait.mul_f64(rand::random::<f64>() / 2.0);
                tracing::warn!(error = %describe(&e), retry_in_ms = jittered.as_millis() as u64, "SQS call failed; retrying");
                tokio::time::sleep(jittered).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Whether a lease is due for renewal at `now`, and if so for how many
/// seconds and until when: once half of it is used up, by the queue's
/// visibility timeout, never into the last `lead / 2` before `max_hold`
/// after receipt. Zero seconds means that limit has been reached.
fn renewal(
    lease: &Lease,
    vis: Duration,
    tick: Duration,
    now: Instant,
    max_hold: Duration,
    lead: Duration,
) -> Option<(i32, Instant)> {
    let remaining = lease.visible_until.saturating_duration_since(now);
    if remaining > vis / 2 {
        return None;
    }
    let limit = lease.received_at + max_hold - lead / 2;
    let until = (now + vis.max(tick * 4)).min(limit);
    // SQS takes whole seconds: the lease ends where the seconds sent say.
    let secs = until.saturating_duration_since(now).as_secs();
    let until = now + Duration::from_secs(secs);
    let secs = secs as i32;
    Some((secs, until))
}

/// Sends a copy of a message back to its queue as a new message (with its
/// attributes and failure count); returns the new message's id.
async fn send_back(client: &Client, held: &Held, delay: Duration) -> Result<String, QueueError> {
    let delay_s = delay.min(MAX_SEND_DELAY).as_secs() as i32;
    let mut send = client
        .send_message()
        .queue_url(&held.queue_url)
        .message_body(&held.body);
    match copy_attributes(held) {
        Some(attrs) => {
            for (name, value) in attrs {
                send = send.message_attributes(name, value);
            }
        }
        None => {
            tracing::warn!(message_id = %held.message_id, "message has too many attributes to add its failure count; the copy sent back starts counting attempts over");
        }
    }
    if held.queue_url.ends_with(".fifo") {
        // FIFO queues take no per-message delay; order within the group
        // restarts from this message.
        send = send
            .message_group_id(
                held.group
                    .clone()
                    .unwrap_or_else(|| held.message_id.clone()),
            )
            .message_deduplication_id(format!(
                "{}-returned-{}",
                held.message_id,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            ));
    } else {
        send = send.delay_seconds(delay_s);
    }
    retry_transient(|| send.clone().send())
        .await
        .map(|out| out.message_id.unwrap_or_default())
        .map_err(|detail| QueueError::Service {
            action: "sending a copy of a message back to",
            target: held.queue_url.clone(),
            detail,
        })
}

/// Renews leases before they expire, in batches, and takes custody of the
/// messages of jobs that approach the 12-hour limit.
async fn heartbeat(shared: Arc<Shared>) {
    let shortest = shared
        .queues
        .iter()
        .map(|q| q.visibility)
        .min()
        .unwrap_or(Duration::from_secs(30));
    // Renewals are due at half the lease; ticking at a quarter of it
    // catches each one in time without waking needlessly.
    let tick = (shortest / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    // Custody must be taken while the lease can still be renewed: a few
    // ticks at least before the last renewal (only short test limits need
    // more than the usual lead).
    let (max_hold, lead) = (shared.max_hold, shared.lead().max(tick * 4));
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        take_custody_where_due(&shared, now, lead).await;
        let due: Vec<(String, String, usize, i32, Instant)> = shared
            .leases()
            .iter()
            .filter(|(_, lease)| lease.custody == Custody::No)
            .filter_map(|(id, lease)| {
                let vis = shared.queues[lease.queue].visibility;
                let (secs, until) = renewal(lease, vis, tick, now, max_hold, lead)?;
                (secs > 0).then(|| (id.clone(), lease.receipt.clone(), lease.queue, secs, until))
            })
            .collect();
        let mut renewals = tokio::task::JoinSet::new();
        for (id, receipt, queue, secs, until) in due {
            let batcher = shared.visibility[queue].clone();
            renewals.spawn(async move {
                let result = batcher.submit((receipt, secs)).await;
                (id, until, result)
            });
        }
        while let Some(Ok((id, until, result))) = renewals.join_next().await {
            match result {
                Ok(()) => {
                    if let Some(l) = shared.leases().get_mut(&id) {
                        l.visible_until = until;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot extend a message's visibility; will retry")
                }
            }
        }
    }
}

/// Takes custody (copy kept on disk, then deleted from SQS) of every
/// message held for `max_hold - lead` whose job still runs. The copy counts
/// the running attempt as failed: it is only ever sent from the store by
/// itself after the agent died under the job (a release computes its own
/// count), and such a job must not loop forever.
async fn take_custody_where_due(shared: &Arc<Shared>, now: Instant, lead: Duration) {
    let due: Vec<(String, String, usize, Held)> = shared
        .leases()
        .iter_mut()
        .filter(|(_, l)| {
            l.custody == Custody::No
                && !l.finishing
                && now >= l.received_at + shared.max_hold - lead
        })
        .map(|(id, l)| {
            // From here until it settles, deletes and releases wait.
            l.custody = Custody::Taking;
            let held = l.held(&shared.queues[l.queue].url, l.attempt);
            (id.clone(), l.receipt.clone(), l.queue, held)
        })
        .collect();
    // All at once, so their deletes share batches and renewals of other
    // leases are not held up behind them.
    let mut taking = tokio::task::JoinSet::new();
    for (id, receipt, queue, held) in due {
        let shared = shared.clone();
        taking.spawn(async move { take_custody(&shared, id, receipt, queue, held).await });
    }
    while taking.join_next().await.is_some() {}
}

async fn take_custody(shared: &Shared, id: String, receipt: String, queue: usize, held: Held) {
    let settle = |state: Custody| {
        if let Some(l) = shared.leases().get_mut(&id) {
            l.custody = state;
        }
    };
    if let Err(e) = shared.custody.keep(&held) {
        settle(Custody::No);
        tracing::error!(message_id = %held.message_id, error = %e, "cannot keep a copy of a message nearing SQS's 12-hour limit; it will become visible again");
        return;
    }
    match shared.deletes[queue].submit(receipt).await {
        Ok(()) => {
            settle(Custody::Yes);
            tracing::warn!(
                message_id = %held.message_id,
                "a job has held its message nearly as long as SQS allows (12 hours): the agent took custody of it \
                 (deleted from SQS, kept in state.dir until the job ends; sent back to the queue if it must run again)"
            );
        }
        Err(e) => {
            let _ = shared.custody.release(&held.message_id);
            settle(Custody::No);
            tracing::warn!(message_id = %held.message_id, error = %e, "cannot take custody of a message yet; will retry");
        }
    }
}

impl JobSource for SqsQueue {
    fn receive_gather(&self) -> Duration {
        RECEIVE_GATHER
    }

    fn describe(&self) -> String {
        let urls: Vec<&str> = self.shared.queues.iter().map(|q| q.url.as_str()).collect();
        format!("SQS {}", urls.join(" > "))
    }

    async fn receive(&self, max: usize) -> Result<Vec<Message>, QueueError> {
        let single = self.shared.queues.len() == 1;
        let mut got = Vec::new();
        for index in 0..self.shared.queues.len() {
            let want = max.saturating_sub(got.len());
            if want == 0 {
                break;
            }
            // Once something came back, the remaining queues are only
            // sampled without waiting: the slots are not left idle for them.
            let wait = match (single, got.is_empty()) {
                (true, _) => LONG_POLL_S,
                (false, true) => PRIORITY_POLL_S,
                (false, false) => 0,
            };
            got.extend(self.receive_from(index, want, wait).await?);
        }
        Ok(got)
    }

    async fn delete(&self, msg: &Message) -> Result<(), QueueError> {
        let q = &self.shared.queues[msg.queue];
        if self.begin_finishing(&msg.id).await {
            // Already gone from SQS: dropping the copy finishes it.
            return self.drop_held(&msg.id);
        }
        let result = self.shared.deletes[msg.queue]
            .submit(self.current_receipt(msg))
            .await;
        // Until the delete works the lease stays and is renewed: the message
        // stays hidden while the caller retries (or abandons it).
        match result {
            Ok(()) => self.forget_lease(&msg.id),
            Err(_) => self.end_finishing(&msg.id),
        }
        result.map_err(|detail| QueueError::Service {
            action: "deleting a message from",
            target: q.url.clone(),
            detail,
        })
    }

    async fn release(
        &self,
        msg: &Message,
        delay: Duration,
        failed: bool,
    ) -> Result<(), QueueError> {
        let q = &self.shared.queues[msg.queue];
        // Failures the job has had, this attempt's outcome included.
        let failures = msg.attempt.saturating_sub(1) + u32::from(failed);
        let in_custody = self.begin_finishing(&msg.id).await;
        let lease = self.leases().get(&msg.id).map(|l| {
            (
                l.held(&q.url, failures),
                in_custody,
                l.copy_sent,
                l.attributes.len() + OWN_ATTRIBUTES <= MAX_ATTRIBUTES,
            )
        });
        if let Some((copy, true, copy_sent, _)) = &lease {
            // A copy sent before custody was taken already stands for the
            // message: the held one is only dropped.
            if !copy_sent {
                match send_back(&self.shared.client, copy, delay).await {
                    Ok(new_id) => {
                        tracing::info!(message_id = %msg.id, copy = %new_id, "message held in custody sent back to its queue");
                        self.mark_copy_sent(&msg.id);
                    }
                    Err(e) => {
                        self.end_finishing(&msg.id);
                        return Err(e);
                    }
                }
            }
            return self.drop_held(&msg.id);
        }
        // Not a failure, on a standard queue: a copy carrying the failure
        // count replaces the message, so the release is not counted as an
        // attempt. FIFO queues would put the copy behind the rest of its
        // group, so there (and for messages recovered after a crash, whose
        // body is not kept) the message itself is made visible again and
        // SQS counts the receive.
        if let Some((copy, false, copy_sent, fits)) = lease {
            // SQS delays a new message by at most 15 minutes; a longer
            // backoff keeps the message itself hidden instead.
            if !failed && !q.fifo && fits && delay <= MAX_SEND_DELAY {
                let sent = if copy_sent {
                    Ok(())
                } else {
                    send_back(&self.shared.client, &copy, delay).await.map(|new_id| {
                        tracing::info!(message_id = %msg.id, copy = %new_id, "released as a new copy of the message (the job goes on under the copy's id)");
                        self.mark_copy_sent(&msg.id);
                    })
                };
                match sent {
                    // Sent first, deleted second: a crash in between leaves
                    // the job queued twice (at least once), never not at all.
                    Ok(()) => return self.delete(msg).await,
                    // Without a copy (sqs:SendMessage denied on the job
                    // queue, say) the message itself is released below, and
                    // SQS counts the receive.
                    Err(e) => {
                        tracing::warn!(message_id = %msg.id, error = %e, "cannot send a copy of the message to release it uncounted (does the agent's role allow sqs:SendMessage on the job queue?); releasing the message itself, which counts as an attempt")
                    }
                }
            }
        }
        // The new visibility counts from now but SQS still ends it 12 hours
        // after the receipt; a longer backoff is shortened to fit.
        let held = self
            .leases()
            .get(&msg.id)
            .map(|l| l.received_at.elapsed())
            .unwrap_or_default();
        let room = self
            .shared
            .max_hold
            .saturating_sub(held + self.shared.lead() / 2);
        let secs = delay.min(room).as_secs() as i32;
        let result = self.shared.visibility[msg.queue]
            .submit((self.current_receipt(msg), secs))
            .await;
        match result {
            Ok(()) => self.forget_lease(&msg.id),
            Err(_) => self.end_finishing(&msg.id),
        }
        result.map_err(|detail| QueueError::Service {
            action: "releasing a message to",
            target: q.url.clone(),
            detail,
        })
    }

    fn abandon(&self, msg: &Message) {
        // A message in custody keeps its copy: the next start sends it back.
        let mut leases = self.leases();
        if leases
            .get(&msg.id)
            .is_some_and(|l| l.custody == Custody::No)
        {
            leases.remove(&msg.id);
        }
    }

    async fn dead_letter(
        &self,
        msg: &Message,
        reason: &str,
        detail: &str,
    ) -> Result<(), QueueError> {
        let q = &self.shared.queues[msg.queue];
        let mut detail = detail.to_string();
        if detail.len() > MAX_DETAIL_BYTES {
            let mut cut = MAX_DETAIL_BYTES;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        let attr = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
        };
        let attrs = [
            (ATTR_REASON, attr(reason)),
            (
                ATTR_DETAIL,
                attr(if detail.is_empty() { "-" } else { &detail }),
            ),
            (ATTR_SOURCE_QUEUE, attr(&q.url)),
            (ATTR_SOURCE_MESSAGE, attr(&msg.id)),
        ];
        let mut send = self
            .shared
            .client
            .send_message()
            .queue_url(&q.dead_letter_url)
            .message_body(String::from_utf8_lossy(&msg.body));
        for (name, value) in attrs {
            let value = value.map_err(|e| QueueError::Service {
                action: "dead-lettering to",
                target: q.dead_letter_url.clone(),
                detail: e.to_string(),
            })?;
            send = send.message_attributes(name, value);
        }
        if q.dead_letter_url.ends_with(".fifo") {
            send = send
                .message_group_id(
                    msg.group
                        .clone()
                        .unwrap_or_else(|| "batchly-rejected".into()),
                )
                .message_deduplication_id(&msg.id);
        }
        let dlq = q.dead_letter_url.clone();
        retry_transient(|| send.clone().send())
            .await
            .map_err(|detail| QueueError::Service {
                action: "dead-lettering to",
                target: dlq,
                detail,
            })?;
        // Copied first, deleted second: a crash in between leaves a copy in
        // both places, never in neither.
        self.delete(msg).await
    }

    async fn recover_claims(&self, known: &[Message]) -> Result<Vec<String>, QueueError> {
        let mut released = Vec::new();
        // Messages a previous run held in custody go back to their queues.
        let held = self.shared.custody.all().map_err(|e| QueueError::Service {
            action: "reading the custody store in",
            target: "state.dir".into(),
            detail: e.to_string(),
        })?;
        for h in held {
            self.return_held(&h, Duration::ZERO).await?;
            tracing::warn!(message_id = %h.message_id, queue = %h.queue_url, "sent a message held in custody by a previous run back to its queue");
            released.push(h.message_id);
        }
        let returned = released.clone();
        for msg in known.iter().filter(|m| !returned.contains(&m.id)) {
            let Some(batcher) = self.shared.visibility.get(msg.queue) else {
                continue;
            };
            // A receipt from before the crash may have expired already; then
            // SQS has made the message visible by itself.
            match batcher.submit((msg.receipt.clone(), 0)).await {
                Ok(()) => released.push(msg.id.clone()),
                Err(e) => {
                    tracing::info!(message_id = %msg.id, error = %e, "message of a previous run was not released (its receipt has expired; it is visible again anyway)")
                }
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIS: Duration = Duration::from_secs(30);
    const TICK: Duration = Duration::from_millis(7500);

    fn lease(received_ago: Duration, visible_for: Duration, now: Instant) -> Lease {
        Lease {
            queue: 0,
            receipt: "r".into(),
            received_at: now - received_ago,
            visible_until: now + visible_for,
            message_id: "m".into(),
            body: String::new(),
            group: None,
            attributes: Vec::new(),
            attempt: 1,
            receives: 1,
            custody: Custody::No,
            copy_sent: false,
            finishing: false,
        }
    }

    fn string_attr(value: &str, data_type: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type(data_type)
            .string_value(value)
            .build()
            .expect("attribute")
    }

    #[test]
    fn the_failure_count_is_read_apart_from_the_producers_attributes_and_sent_back_with_them() {
        let mut attrs = HashMap::new();
        attrs.insert(ATTR_FAILURES.to_string(), string_attr("3", "Number"));
        attrs.insert("trace".to_string(), string_attr("t-1", "String"));
        attrs.insert(
            "blob".to_string(),
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(aws_smithy_types::Blob::new(vec![0u8, 255, 7]))
                .build()
                .expect("attribute"),
        );
        attrs.insert(ATTR_RECEIVES.to_string(), string_attr("5", "Number"));
        let carried = split_attributes(attrs);
        assert_eq!((carried.failures, carried.receives), (3, 5));
        let kept = carried.attributes;
        let names: Vec<&str> = kept.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["blob", "trace"]);

        let held = Held {
            message_id: "m".into(),
            queue_url: "q".into(),
            body: "b".into(),
            group: None,
            failures: 4,
            receives: 6,
            attributes: kept,
        };
        let sent: HashMap<String, MessageAttributeValue> =
            copy_attributes(&held).expect("fits").into_iter().collect();
        assert_eq!(sent[ATTR_FAILURES].string_value(), Some("4"));
        assert_eq!(sent[ATTR_FAILURES].data_type(), "Number");
        assert_eq!(sent[ATTR_RECEIVES].string_value(), Some("6"));
        assert_eq!(sent["trace"].string_value(), Some("t-1"));
        assert_eq!(
            sent["blob"].binary_value().map(|b| b.as_ref().to_vec()),
            Some(vec![0u8, 255, 7])
        );
    }

    #[test]
    fn an_unreadable_failure_count_counts_as_none() {
        let mut attrs = HashMap::new();
        attrs.insert(ATTR_FAILURES.to_string(), string_attr("-2", "Number"));
        assert_eq!(split_attributes(attrs).failures, 0);
    }

    #[test]
    fn a_message_with_nine_attributes_has_no_room_for_the_agents_counts() {
        let attributes = (0..MAX_ATTRIBUTES - 1)
            .map(|i| Attribute {
                name: format!("a{i}"),
                data_type: "String".into(),
                string_value: Some("v".into()),
                binary_base64: None,
            })
            .collect();
        let held = Held {
            message_id: "m".into(),
            queue_url: "q".into(),
            body: "b".into(),
            group: None,
            failures: 1,
            receives: 1,
            attributes,
        };
        assert!(copy_attributes(&held).is_none());
    }

    #[test]
    fn a_lease_is_renewed_only_once_half_of_it_is_used_up() {
        let now = Instant::now();
        let fresh = lease(Duration::from_secs(10), Duration::from_secs(20), now);
        assert_eq!(
            renewal(&fresh, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD),
            None
        );
        let due = lease(Duration::from_secs(16), Duration::from_secs(14), now);
        let (secs, until) =
            renewal(&due, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD).expect("due");
        assert_eq!(secs, 30);
        assert_eq!(until, now + VIS);
    }

    #[test]
    fn renewals_never_reach_past_twelve_hours_after_receipt() {
        let now = Instant::now();
        // The last renewal ends half the custody lead (5 min) before 12 h.
        let old = lease(
            MAX_VISIBILITY - Duration::from_secs(310),
            Duration::from_secs(5),
            now,
        );
        let (secs, _) = renewal(&old, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD).expect("due");
        assert_eq!(secs, 10, "only up to 12 h less half the lead");
        let at_limit = lease(
            MAX_VISIBILITY - Duration::from_secs(290),
            Duration::from_secs(5),
            now,
        );
        let (secs, _) =
            renewal(&at_limit, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD).expect("due");
        assert_eq!(secs, 0, "nothing left to renew: the limit is reached");
    }
}
