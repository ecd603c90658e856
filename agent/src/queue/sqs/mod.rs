//! The production job source: one or more SQS queues (standard or FIFO) in
//! priority order. It owns everything SQS-specific: long polling, the
//! visibility lease of each message it hands out (`lease`), batched
//! deletes and releases (`batches`), copies sent back for releases that are
//! not failures (`copies`), custody past SQS's 12-hour limit, the checks at
//! start (`setup`), and the dead-letter queue for rejected messages.
//!
//! It never holds a message nobody asked for: `receive(n)` asks SQS for at
//! most `n`, and every message a receive got is returned to the caller,
//! even when another queue of the same round failed. A lease stays renewed
//! from receive until the supervisor deletes, releases or dead-letters the
//! message, or the message turns out not to be ours any more. Every call is
//! made once; callers retry by the one retry policy (`crate::retry`).

mod batches;
mod copies;
mod lease;
mod setup;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use aws_sdk_sqs::Client;

pub use copies::{ATTR_FAILURES, ATTR_RECEIVES};
pub use setup::{check_queue, ClockProbe, QueueInfo, SetupError, CLOCK_SKEW_WARNING, SETUP_BUDGET};

use super::batch::{Batcher, EntryError};
use super::custody::{CustodyStore, Held};
use super::{ClaimJournal, JobSource, Message, QueueError};
use crate::aws_errors::describe;
use crate::retry::{self, Backoff, ErrorClass, GaveUp};
use copies::{send_back, split_attributes, MAX_ATTRIBUTES, MAX_SEND_DELAY, OWN_ATTRIBUTES};
use lease::{Custody, Lease, Leases};

/// SQS hides a received message for at most 12 hours from its receipt.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// SQS's longest long poll (WaitTimeSeconds).
const LONG_POLL_S: i32 = 20;
/// How long a receive may take before it is given up: the long poll and a
/// margin for the answer.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(LONG_POLL_S as u64 + 10);
/// With several queues each is polled briefly in turn, so a busy urgent
/// queue is never starved by waiting on an idle one.
const PRIORITY_POLL_S: i32 = 1;
/// How long the supervisor lets slots free up before asking a busy queue
/// for more work (see `JobSource::receive_gather`).
const RECEIVE_GATHER: Duration = Duration::from_millis(50);
/// How long before the 12-hour limit the agent takes custody of a message
/// whose job still runs.
pub(crate) const CUSTODY_LEAD: Duration = Duration::from_secs(600);
/// A queue whose receive failed is asked again only after this backoff,
/// so one broken queue never holds up the others.
const QUEUE_RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(30),
};
/// How long recovery keeps trying to send one custody copy back.
const RECOVERY_SEND_BUDGET: Duration = Duration::from_secs(30);
/// Message attributes a dead-lettered message carries (SQS allows 10).
pub const ATTR_REASON: &str = "batchly-reject-reason";
pub const ATTR_DETAIL: &str = "batchly-reject-detail";
pub const ATTR_SOURCE_QUEUE: &str = "batchly-source-queue";
pub const ATTR_SOURCE_MESSAGE: &str = "batchly-source-message-id";
/// SQS limits a message attribute value with the rest of the message to
/// 256 KiB; a reason detail never needs more than this.
const MAX_DETAIL_BYTES: usize = 1024;
/// How often a delete or release looks whether custody or a renewal under
/// way has settled.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// How a queue's receives have been going.
#[derive(Debug, Default)]
struct QueueHealth {
    failures: u32,
    retry_at: Option<Instant>,
}

/// What the source and its heartbeat task share.
struct Shared {
    client: Client,
    queues: Vec<QueueInfo>,
    deletes: Vec<Batcher<String>>,
    visibility: Vec<Batcher<(String, i32)>>,
    leases: Leases,
    /// Raised when a lease goes: batches waiting for it ask again.
    leases_fell: tokio::sync::watch::Sender<()>,
    custody: CustodyStore,
    /// How long SQS may hide a message after its receipt (12 hours).
    max_hold: Duration,
    journal: OnceLock<Arc<dyn ClaimJournal>>,
    health: Mutex<Vec<QueueHealth>>,
}

impl Shared {
    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        lease::lock(&self.leases)
    }

    /// Stops leasing a message (it is finished, or not ours any more).
    fn drop_lease(&self, message_id: &str) {
        let gone = self.leases().remove(message_id).is_some();
        if gone {
            self.leases_fell.send_replace(());
        }
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
    clock: ClockProbe,
}

impl Drop for SqsQueue {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Where the message being finished is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whereabouts {
    /// In SQS, leased by this run.
    Leased,
    /// In the custody store, leased by this run.
    InCustody,
    /// Not leased by this run (recovered after a crash).
    Unleased,
}

fn service_error(action: &'static str, target: &str, e: EntryError) -> QueueError {
    QueueError::Service {
        action,
        target: target.to_string(),
        class: e.class,
        detail: e.detail,
    }
}

fn custody_error(message_id: &str, e: std::io::Error) -> QueueError {
    QueueError::Service {
        action: "updating the custody copy of",
        target: message_id.to_string(),
        class: ErrorClass::Transient,
        detail: e.to_string(),
    }
}

impl SqsQueue {
    /// Checks every queue (and the dead-letter queues) and starts the lease
    /// heartbeat. A queue that does not exist or may not be used is a
    /// `SetupError`; an unreachable endpoint is retried for a while.
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
        let custody = CustodyStore::open(state_dir).map_err(|e| {
            SetupError::new(
                "state.dir",
                &state_dir.display().to_string(),
                format!("cannot create its custody directory: {e}"),
            )
        })?;
        let clock = ClockProbe::default();
        let mut queues = Vec::new();
        for url in urls {
            queues.push(setup::describe_queue(&client, url, dead_letter_override, &clock).await?);
        }
        let leases = Leases::default();
        let (leases_fell, _) = tokio::sync::watch::channel(());
        let deletes = queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                batches::delete_batcher(
                    client.clone(),
                    q.url.clone(),
                    index,
                    leases.clone(),
                    leases_fell.subscribe(),
                )
            })
            .collect();
        let visibility = queues
            .iter()
            .map(|q| batches::visibility_batcher(client.clone(), q.url.clone()))
            .collect();
        let health = Mutex::new(queues.iter().map(|_| QueueHealth::default()).collect());
        let shared = Arc::new(Shared {
            client,
            queues,
            deletes,
            visibility,
            leases,
            leases_fell,
            custody,
            max_hold,
            journal: OnceLock::new(),
            health,
        });
        let heartbeat = tokio::spawn(lease::heartbeat(shared.clone()));
        Ok(SqsQueue {
            shared,
            heartbeat,
            clock,
        })
    }

    pub fn queues(&self) -> &[QueueInfo] {
        &self.shared.queues
    }

    /// How far the host clock was ahead of SQS's at start (seconds).
    pub fn host_clock_ahead_s(&self) -> Option<i64> {
        self.clock.host_ahead_s()
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.shared.leases()
    }

    fn drop_lease(&self, message_id: &str) {
        self.shared.drop_lease(message_id);
    }

    fn journal(&self) -> Option<&Arc<dyn ClaimJournal>> {
        self.shared.journal.get()
    }

    /// Marks the message as being finished (deleted or released), once
    /// custody being taken and a renewal on its way have settled, so that
    /// neither lands after the finishing call; says where the message is.
    async fn begin_finishing(&self, message_id: &str) -> Whereabouts {
        loop {
            {
                let mut leases = self.leases();
                let Some(l) = leases.get_mut(message_id) else {
                    return Whereabouts::Unleased;
                };
                if l.custody != Custody::Taking && !l.renewing {
                    l.finishing = true;
                    return match l.custody {
                        Custody::Yes => Whereabouts::InCustody,
                        _ => Whereabouts::Leased,
                    };
                }
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// A delete or release did not take effect: the lease is renewed again
    /// until the caller retries, unless the message is not ours any more.
    fn end_finishing(&self, message_id: &str, class: ErrorClass) {
        if class == ErrorClass::Gone {
            self.drop_lease(message_id);
        } else if let Some(l) = self.leases().get_mut(message_id) {
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

    /// A copy now stands for the message (a release, a custody copy sent
    /// back, a dead-letter copy): remembered in the lease and, durably, in
    /// the supervisor's ledger, before the original is removed.
    fn note_copy_sent(&self, message_id: &str, copy_id: &str) {
        if let Some(l) = self.leases().get_mut(message_id) {
            l.copy_sent = true;
        }
        if let Some(journal) = self.journal() {
            journal.copy_sent(message_id, copy_id);
        }
    }

    fn copy_already_sent(&self, message_id: &str) -> bool {
        self.leases().get(message_id).is_some_and(|l| l.copy_sent)
    }

    /// Drops the custody copy of a message that is finished, then its lease
    /// (kept if the copy cannot be dropped, for the retry).
    fn drop_held(&self, message_id: &str) -> Result<(), QueueError> {
        if let Err(e) = self.shared.custody.release(message_id) {
            self.end_finishing(message_id, ErrorClass::Transient);
            return Err(custody_error(message_id, e));
        }
        self.forget_lease(message_id);
        Ok(())
    }

    fn forget_lease(&self, message_id: &str) {
        self.drop_lease(message_id);
    }

    /// The queues worth asking now, in priority order: those not waiting
    /// out a backoff after a failed receive.
    fn ready_queues(&self, now: Instant) -> Vec<usize> {
        let health = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
        (0..self.shared.queues.len())
            .filter(|&i| health[i].retry_at.is_none_or(|at| at <= now))
            .collect()
    }

    fn note_receive(&self, index: usize, result: &Result<Vec<Message>, QueueError>) {
        let mut health = self.shared.health.lock().unwrap_or_else(|p| p.into_inner());
        let h = &mut health[index];
        match result {
            Ok(_) => {
                if h.failures > 0 {
                    tracing::info!(queue = %self.shared.queues[index].url, "receiving works again");
                }
                *h = QueueHealth::default();
            }
            Err(e) => {
                h.failures += 1;
                let wait = QUEUE_RETRY.delay(h.failures, rand::random());
                h.retry_at = Some(Instant::now() + wait);
                let url = &self.shared.queues[index].url;
                let retry_in_ms = wait.as_millis() as u64;
                if e.class() == ErrorClass::Transient {
                    tracing::warn!(queue = %url, error = %e, failures = h.failures, retry_in_ms, "cannot receive from a queue; the others go on");
                } else {
                    tracing::error!(queue = %url, error = %e, failures = h.failures, retry_in_ms, "cannot receive from a queue (does it exist, and may the agent's role use it?); the others go on");
                }
            }
        }
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
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names("All")
            .customize()
            .config_override(
                aws_sdk_sqs::config::Builder::new().timeout_config(
                    aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                        .operation_attempt_timeout(RECEIVE_TIMEOUT)
                        .build(),
                ),
            )
            .send()
            .await
            .map_err(|e| QueueError::Service {
                action: "receiving from",
                target: q.url.clone(),
                class: retry::classify(&e),
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
            let sent_at = attrs
                .get(&MessageSystemAttributeName::SentTimestamp)
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms));
            let body = m.body.unwrap_or_default();
            let carried = split_attributes(m.message_attributes.unwrap_or_default());
            let (failures, attributes) = (carried.failures, carried.attributes);
            let receive_count = carried.receives.saturating_add(sqs_receives);
            let attempt = failures.saturating_add(sqs_receives);
            let redelivered = match self.leases().get_mut(&id) {
                Some(running) => {
                    // Already running here: its visibility lapsed (an outage
                    // longer than the visibility timeout) and SQS handed it
                    // out again, to us. Keep the job, take the new receipt.
                    running.receipt = receipt.clone();
                    running.received_at = asked_at;
                    running.visible_until = asked_at + q.visibility;
                    true
                }
                None => false,
            };
            if redelivered {
                tracing::warn!(message_id = %id, "a message came back while its job still runs here (its visibility lapsed); not starting a second copy");
                if let Some(journal) = self.journal() {
                    journal.receipt_changed(&id, &receipt);
                }
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
                    attempt,
                    receives: receive_count,
                    custody: Custody::No,
                    copy_sent: false,
                    decided: false,
                    finishing: false,
                    renewing: false,
                },
            );
            got.push(Message {
                id,
                body: body.into_bytes(),
                attempt,
                receive_count,
                receipt,
                queue: index,
                group,
                sent_at,
            });
        }
        Ok(got)
    }

    /// Sends a copy held in custody back to its queue, then forgets it; a
    /// copy already sent (before a retry) is not sent twice.
    async fn return_held(&self, held: &Held, delay: Duration) -> Result<(), QueueError> {
        if !self.copy_already_sent(&held.message_id) {
            let copy = send_back(&self.shared.client, held, delay).await?;
            tracing::info!(message_id = %held.message_id, copy = %copy, "message held in custody sent back to its queue");
            self.note_copy_sent(&held.message_id, &copy);
        }
        self.drop_held(&held.message_id)
    }

    /// Makes the message itself visible again after `delay` (SQS counts
    /// the receive).
    async fn release_by_visibility(
        &self,
        msg: &Message,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let q = &self.shared.queues[msg.queue];
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
        self.settle(msg, result, "releasing a message to", &q.url)
    }

    /// Ends a delete or release: the lease goes once it worked (or the
    /// message is not ours any more); otherwise it stays and is renewed
    /// again, keeping the message hidden while the caller retries.
    fn settle(
        &self,
        msg: &Message,
        result: crate::queue::batch::EntryResult,
        action: &'static str,
        url: &str,
    ) -> Result<(), QueueError> {
        match result {
            Ok(()) => {
                self.forget_lease(&msg.id);
                Ok(())
            }
            Err(e) => {
                self.end_finishing(&msg.id, e.class);
                Err(service_error(action, url, e))
            }
        }
    }

    /// Sends a message to the dead-letter queue with its reason; returns
    /// the copy's id.
    async fn send_to_dead_letter(
        &self,
        msg: &Message,
        reason: &str,
        detail: &str,
    ) -> Result<String, QueueError> {
        let q = &self.shared.queues[msg.queue];
        let dlq = &q.dead_letter_url;
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
            .queue_url(dlq)
            .message_body(String::from_utf8_lossy(&msg.body));
        for (name, value) in attrs {
            let value = value.map_err(|e| QueueError::Service {
                action: "dead-lettering to",
                target: dlq.clone(),
                class: ErrorClass::Permanent,
                detail: e.to_string(),
            })?;
            send = send.message_attributes(name, value);
        }
        if dlq.ends_with(".fifo") {
            send = send
                .message_group_id(
                    msg.group
                        .clone()
                        .unwrap_or_else(|| "batchly-rejected".into()),
                )
                .message_deduplication_id(&msg.id);
        }
        send.send()
            .await
            .map(|out| out.message_id.unwrap_or_default())
            .map_err(|e| QueueError::Service {
                action: "dead-lettering to",
                target: dlq.clone(),
                class: retry::classify(&e),
                detail: describe(&e),
            })
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

    fn set_journal(&self, journal: Arc<dyn ClaimJournal>) {
        let _ = self.shared.journal.set(journal);
    }

    async fn receive(&self, max: usize) -> Result<Vec<Message>, QueueError> {
        let single = self.shared.queues.len() == 1;
        let ready = self.ready_queues(Instant::now());
        if ready.is_empty() {
            return Err(QueueError::Service {
                action: "receiving from",
                target: "every queue".into(),
                class: ErrorClass::Transient,
                detail: "each queue failed its last receive and waits out a backoff".into(),
            });
        }
        let mut got = Vec::new();
        let mut failed = Vec::new();
        for &index in &ready {
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
            let result = self.receive_from(index, want, wait).await;
            self.note_receive(index, &result);
            match result {
                Ok(messages) => got.extend(messages),
                Err(e) => failed.push(e),
            }
        }
        // What one queue gave is never dropped because another failed.
        if got.is_empty() && failed.len() == ready.len() {
            if let Some(e) = failed.into_iter().next() {
                return Err(e);
            }
        }
        Ok(got)
    }

    async fn delete(&self, msg: &Message) -> Result<(), QueueError> {
        let q = &self.shared.queues[msg.queue];
        match self.begin_finishing(&msg.id).await {
            // Already gone from SQS: dropping the copy finishes it.
            Whereabouts::InCustody => return self.drop_held(&msg.id),
            Whereabouts::Unleased => {
                // After a crash: the message may be in custody (the receipt
                // from before would only delete nothing).
                let held = self
                    .shared
                    .custody
                    .get(&msg.id)
                    .map_err(|e| custody_error(&msg.id, e))?;
                if held.is_some() {
                    return self.drop_held(&msg.id);
                }
            }
            Whereabouts::Leased => {}
        }
        let result = self.shared.deletes[msg.queue]
            .submit(self.current_receipt(msg))
            .await;
        self.settle(msg, result, "deleting a message from", &q.url)
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
        let whereabouts = self.begin_finishing(&msg.id).await;
        if whereabouts == Whereabouts::Unleased {
            // After a crash: a message in custody goes back from its copy.
            let held = self
                .shared
                .custody
                .get(&msg.id)
                .map_err(|e| custody_error(&msg.id, e))?;
            if let Some(mut held) = held {
                held.failures = failures;
                return self.return_held(&held, delay).await;
            }
            return self.release_by_visibility(msg, delay).await;
        }
        let Some((copy, fits)) = self.leases().get(&msg.id).map(|l| {
            (
                l.held(&q.url, failures),
                l.attributes.len() + OWN_ATTRIBUTES <= MAX_ATTRIBUTES,
            )
        }) else {
            return self.release_by_visibility(msg, delay).await;
        };
        if whereabouts == Whereabouts::InCustody {
            return self.return_held(&copy, delay).await;
        }
        // Not a failure, on a standard queue: a copy carrying the counts
        // replaces the message, so the release is not counted as an
        // attempt. FIFO queues would put the copy behind the rest of its
        // group, so there the message itself is made visible again and SQS
        // counts the receive. SQS delays a new message by at most 15
        // minutes; a longer backoff keeps the message itself hidden.
        if !failed && !q.fifo && fits && delay <= MAX_SEND_DELAY {
            if !self.copy_already_sent(&msg.id) {
                match send_back(&self.shared.client, &copy, delay).await {
                    Ok(new_id) => {
                        tracing::info!(message_id = %msg.id, copy = %new_id, "released as a new copy of the message (the job goes on under the copy's id)");
                        self.note_copy_sent(&msg.id, &new_id);
                    }
                    Err(e) if e.class() == ErrorClass::Transient => {
                        self.end_finishing(&msg.id, ErrorClass::Transient);
                        return Err(e);
                    }
                    // Without a copy (sqs:SendMessage denied on the job
                    // queue, say) the message itself is released, and SQS
                    // counts the receive.
                    Err(e) => {
                        tracing::warn!(message_id = %msg.id, error = %e, "cannot send a copy of the message to release it uncounted (does the agent's role allow sqs:SendMessage on the job queue?); releasing the message itself, which counts as an attempt");
                        return self.release_by_visibility(msg, delay).await;
                    }
                }
            }
            // Sent first, deleted second, with the copy noted in the ledger
            // in between: a crash there completes the delete at the next
            // start, so the job is queued exactly once.
            self.end_finishing(&msg.id, ErrorClass::Transient);
            return self.delete(msg).await;
        }
        self.release_by_visibility(msg, delay).await
    }

    fn note_decided(&self, msg: &Message) {
        if let Some(l) = self.leases().get_mut(&msg.id) {
            l.decided = true;
        }
    }

    fn abandon(&self, msg: &Message) {
        // A message in custody keeps its copy: the next start sends it back.
        let in_sqs = self
            .leases()
            .get(&msg.id)
            .is_some_and(|l| l.custody == Custody::No);
        if in_sqs {
            self.drop_lease(&msg.id);
        }
    }

    async fn dead_letter(
        &self,
        msg: &Message,
        reason: &str,
        detail: &str,
    ) -> Result<(), QueueError> {
        // Copied first, deleted second: a crash in between leaves a copy in
        // both places, never in neither; the ledger's note of the copy makes
        // the next start complete the delete.
        if !self.copy_already_sent(&msg.id) {
            let copy = self.send_to_dead_letter(msg, reason, detail).await?;
            self.note_copy_sent(&msg.id, &copy);
        }
        self.delete(msg).await
    }

    async fn forget_copied(&self, msg: &Message) -> Result<(), QueueError> {
        match self.delete(msg).await {
            Err(e) if e.class() == ErrorClass::Gone => Ok(()),
            other => other,
        }
    }

    async fn recover_claims(&self, known: &[Message]) -> Result<Vec<String>, QueueError> {
        let mut released = Vec::new();
        // Messages a previous run held in custody go back to their queues.
        // One that cannot be sent stays in the store for the next start and
        // never keeps this one from starting.
        let held = self
            .shared
            .custody
            .all()
            .map_err(|e| custody_error("state.dir/custody", e))?;
        for h in held {
            let deadline = tokio::time::Instant::now() + RECOVERY_SEND_BUDGET;
            let sent = retry::retry(
                "SendMessage (custody copy)",
                deadline,
                QueueError::class,
                || send_back(&self.shared.client, &h, Duration::ZERO),
            )
            .await;
            match sent {
                Ok(copy) => {
                    if let Err(e) = self.shared.custody.release(&h.message_id) {
                        tracing::error!(message_id = %h.message_id, error = %e, "sent a custody copy back but cannot remove it from state.dir/custody; remove it by hand or it is sent again at the next start");
                    }
                    tracing::warn!(message_id = %h.message_id, copy = %copy, queue = %h.queue_url, "sent a message held in custody by a previous run back to its queue");
                    released.push(h.message_id);
                }
                Err(e) => {
                    let detail = match e {
                        GaveUp::Final(_, e) | GaveUp::Deadline(Some(e)) => e.to_string(),
                        GaveUp::Deadline(None) => "no answer".into(),
                    };
                    tracing::error!(message_id = %h.message_id, queue = %h.queue_url, error = %detail, "cannot send a message held in custody by a previous run back to its queue; its copy stays in state.dir/custody and is tried again at the next start");
                }
            }
        }
        let sent_back = released.clone();
        for msg in known.iter().filter(|m| !sent_back.contains(&m.id)) {
            let Some(batcher) = self.shared.visibility.get(msg.queue) else {
                continue;
            };
            let deadline = tokio::time::Instant::now() + RECOVERY_SEND_BUDGET;
            let result = retry::retry(
                "ChangeMessageVisibility (recovery)",
                deadline,
                |e: &EntryError| e.class,
                || batcher.submit((msg.receipt.clone(), 0)),
            )
            .await;
            match result {
                Ok(()) => released.push(msg.id.clone()),
                Err(e) if e.class() == ErrorClass::Gone => {
                    tracing::info!(message_id = %msg.id, "message of a previous run was not released: its receipt has expired, so it is visible again (or taken) anyway")
                }
                Err(e) => {
                    tracing::warn!(message_id = %msg.id, error = ?e, "cannot release a message of a previous run; it becomes visible again when its visibility timeout ends")
                }
            }
        }
        Ok(released)
    }
}
