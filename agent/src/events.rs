//! Job events: the schema every consumer relies on (one JSON object per
//! event, see the README's "Job events") and the sinks that publish them.
//! The local sink appends one line per event to `events.jsonl`; the SQS
//! sink sends one message per event, several per `SendMessageBatch` call.
//!
//! A sink must not drop an event silently: `publish` either hands the event
//! off durably or returns an error, and the supervisor does not finish a
//! message whose final event was not handed off.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::queue::batch::{Batcher, EntryError, EntryResult};
use crate::retry::{self, ErrorClass};

use serde::{Deserialize, Serialize};

/// What happened. Serialized as the contract's `job.*` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "job.started")]
    Started,
    #[serde(rename = "job.succeeded")]
    Succeeded,
    #[serde(rename = "job.failed")]
    Failed,
    #[serde(rename = "job.timed_out")]
    TimedOut,
    #[serde(rename = "job.interrupted")]
    Interrupted,
    #[serde(rename = "job.requeued")]
    Requeued,
    #[serde(rename = "job.rejected")]
    Rejected,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Started => "job.started",
            EventType::Succeeded => "job.succeeded",
            EventType::Failed => "job.failed",
            EventType::TimedOut => "job.timed_out",
            EventType::Interrupted => "job.interrupted",
            EventType::Requeued => "job.requeued",
            EventType::Rejected => "job.rejected",
        }
    }
}

/// One job event, schema version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// `null` only for a rejected message whose job spec could not be read.
    pub job_id: Option<String>,
    pub message_id: String,
    pub attempt: u32,
    pub instance_id: String,
    pub at: String,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub duration_ms: Option<u64>,
    /// For `job.rejected` (and a job dead-lettered as `agent_gave_up`): the
    /// rejection code, exactly; otherwise a short reason for people.
    pub reason: Option<String>,
    /// More for people about `reason`, where there is more to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub log_stream: Option<String>,
    /// CPU time and peak memory of the job's cgroup, in its final outcome
    /// (with the sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
    pub tags: BTreeMap<String, String>,
    /// True when this is the job's last event: the message is gone from the
    /// queue (done, failed for good, or dead-lettered). Exactly one event
    /// per message has `final: true`.
    #[serde(rename = "final")]
    pub is_final: bool,
}

impl JobEvent {
    /// An event of `kind` with every optional member empty.
    pub fn new(kind: EventType, message_id: &str, attempt: u32, instance_id: &str) -> JobEvent {
        JobEvent {
            v: 1,
            kind,
            job_id: None,
            message_id: message_id.to_string(),
            attempt,
            instance_id: instance_id.to_string(),
            at: rfc3339_now(),
            exit_code: None,
            signal: None,
            duration_ms: None,
            reason: None,
            detail: None,
            log_stream: None,
            cpu_ms: None,
            memory_peak_bytes: None,
            tags: BTreeMap::new(),
            is_final: false,
        }
    }
}

/// Current UTC time as RFC 3339 with millisecond precision.
pub fn rfc3339_now() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `at` as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    let now = time::OffsetDateTime::from(at);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&fmt)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("writing event to {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending event to {url}: {detail}")]
    Sqs {
        url: String,
        class: ErrorClass,
        detail: String,
    },
}

impl EventError {
    /// Whether sending again may work (a full disk may clear up too).
    pub fn class(&self) -> ErrorClass {
        match self {
            EventError::File { .. } => ErrorClass::Transient,
            EventError::Sqs { class, .. } => *class,
        }
    }
}

/// The agent's own comings and goings (`agent.started`, `agent.stopped`),
/// so the control plane sees each agent; no job, no message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub instance_id: String,
    pub at: String,
    pub version: String,
    pub slots: usize,
    pub reason: Option<String>,
}

impl AgentEvent {
    pub fn new(kind: &str, instance_id: &str, slots: usize) -> AgentEvent {
        AgentEvent {
            v: 1,
            kind: kind.to_string(),
            instance_id: instance_id.to_string(),
            at: rfc3339_now(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            slots,
            reason: None,
        }
    }
}

/// What a batching sink needs to know about the events of the jobs being
/// worked on (a start and an outcome each): how many have yet to be queued
/// for a batch, so a batch goes out as soon as every one of them is in it
/// (or it is full); and which have been queued.
pub trait EventsExpected: Send + Sync {
    /// Events of the jobs being worked on not queued yet.
    fn to_come(&self) -> usize;
    /// An event of this message's attempt is queued (`outcome`: its last).
    fn queued(&self, message_id: &str, outcome: bool);
}

/// Raised whenever the events to come fall, so a batch waiting for company
/// is asked again whether any is still coming.
pub type EventsFell = tokio::sync::watch::Sender<()>;

/// Where job events go.
pub trait EventSink: Send + Sync + 'static {
    fn publish(&self, event: &JobEvent) -> impl Future<Output = Result<(), EventError>> + Send;

    /// Publishes an agent event. Sinks that keep only job events (the
    /// local file of `dev`) take it as done.
    fn publish_agent(
        &self,
        _event: &AgentEvent,
    ) -> impl Future<Output = Result<(), EventError>> + Send {
        async { Ok(()) }
    }

    /// Tells a batching sink which events are still to come (see
    /// `EventsExpected`); a sink that batches answers with the signal to
    /// raise when fewer are. Sinks that do not batch ignore it.
    fn expect_events(&self, _expected: Arc<dyn EventsExpected>) -> Option<EventsFell> {
        None
    }
}

/// No sink configured: events only appear in the agent's own log.
impl<E: EventSink> EventSink for Option<E> {
    async fn publish(&self, event: &JobEvent) -> Result<(), EventError> {
        match self {
            Some(sink) => sink.publish(event).await,
            None => Ok(()),
        }
    }

    async fn publish_agent(&self, event: &AgentEvent) -> Result<(), EventError> {
        match self {
            Some(sink) => sink.publish_agent(event).await,
            None => Ok(()),
        }
    }

    fn expect_events(&self, expected: Arc<dyn EventsExpected>) -> Option<EventsFell> {
        self.as_ref().and_then(|sink| sink.expect_events(expected))
    }
}

/// Sends each event as one message to an SQS queue (`queue.events_url`).
/// Events published at about the same time share a `SendMessageBatch`
/// call; each publisher still learns whether its own event was taken. On a
/// FIFO queue the events of one job keep their order (group = job id) and a
/// re-sent event (after a crash) is deduplicated by SQS.
pub struct SqsEvents {
    url: String,
    fifo: bool,
    batcher: Batcher<Outgoing>,
    expected: Arc<OnceLock<Arc<dyn EventsExpected>>>,
    events_fell: EventsFell,
}

/// One event on its way.
struct Outgoing {
    body: String,
    group: Option<String>,
    dedup: Option<String>,
}

/// Longest an event waits for others to share its call.
const EVENT_LINGER: Duration = Duration::from_millis(50);

impl SqsEvents {
    pub fn new(client: aws_sdk_sqs::Client, url: String) -> SqsEvents {
        let fifo = url.ends_with(".fifo");
        let expected: Arc<OnceLock<Arc<dyn EventsExpected>>> = Arc::default();
        let counted = expected.clone();
        // Every event still to come is queued: nothing else can join.
        let complete = move |_waiting: usize| match counted.get() {
            Some(expected) => expected.to_come() == 0,
            None => false,
        };
        let target = url.clone();
        let (events_fell, fell) = tokio::sync::watch::channel(());
        let batcher = Batcher::spawn_until(
            EVENT_LINGER,
            complete,
            Some(fell),
            move |events: Vec<Outgoing>| send_batch(client.clone(), target.clone(), events),
        );
        SqsEvents {
            url,
            fifo,
            batcher,
            expected,
            events_fell,
        }
    }
}

async fn send_batch(
    client: aws_sdk_sqs::Client,
    url: String,
    events: Vec<Outgoing>,
) -> Vec<EntryResult> {
    use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
    let mut entries = Vec::with_capacity(events.len());
    for (i, ev) in events.iter().enumerate() {
        let entry = SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_body(&ev.body)
            .set_message_group_id(ev.group.clone())
            .set_message_deduplication_id(ev.dedup.clone())
            .build();
        match entry {
            Ok(e) => entries.push(e),
            Err(e) => {
                return vec![
                    Err(EntryError::new(ErrorClass::Permanent, e.to_string()));
                    events.len()
                ]
            }
        }
    }
    let sent = client
        .send_message_batch()
        .queue_url(&url)
        .set_entries(Some(entries))
        .send()
        .await;
    match sent {
        Ok(out) => crate::queue::batch::entry_results(events.len(), out.failed()),
        Err(e) => vec![
            Err(EntryError::new(
                retry::classify(&e),
                crate::aws_errors::describe(&e)
            ));
            events.len()
        ],
    }
}

/// SQS accepts 1-128 characters of `A-Za-z0-9` and punctuation in group
/// and deduplication ids.
fn sqs_id(parts: &[&str]) -> String {
    let joined = parts.join(":");
    joined
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(128)
        .collect()
}

impl SqsEvents {
    async fn send(
        &self,
        body: String,
        group: Option<String>,
        dedup: Option<String>,
        queued: impl FnOnce(),
    ) -> Result<(), EventError> {
        self.batcher
            .submit_then(Outgoing { body, group, dedup }, queued)
            .await
            .map_err(|e| EventError::Sqs {
                url: self.url.clone(),
                class: e.class,
                detail: e.detail,
            })
    }

    fn encoding_error(&self, e: serde_json::Error) -> EventError {
        EventError::Sqs {
            url: self.url.clone(),
            class: ErrorClass::Permanent,
            detail: e.to_string(),
        }
    }
}

impl EventSink for SqsEvents {
    async fn publish(&self, event: &JobEvent) -> Result<(), EventError> {
        let body = serde_json::to_string(event).map_err(|e| self.encoding_error(e))?;
        let (group, dedup) = if self.fifo {
            let group = event.job_id.as_deref().unwrap_or(&event.message_id);
            let attempt = event.attempt.to_string();
            (
                Some(sqs_id(&[group])),
                Some(sqs_id(&[&event.message_id, event.kind.as_str(), &attempt])),
            )
        } else {
            (None, None)
        };
        let queued = || {
            if let Some(expected) = self.expected.get() {
                expected.queued(&event.message_id, event.kind != EventType::Started);
            }
        };
        self.send(body, group, dedup, queued).await
    }

    async fn publish_agent(&self, event: &AgentEvent) -> Result<(), EventError> {
        let body = serde_json::to_string(event).map_err(|e| self.encoding_error(e))?;
        let (group, dedup) = if self.fifo {
            (
                Some(sqs_id(&["agent", &event.instance_id])),
                Some(sqs_id(&[&event.instance_id, &event.kind, &event.at])),
            )
        } else {
            (None, None)
        };
        self.send(body, group, dedup, || {}).await
    }

    fn expect_events(&self, expected: Arc<dyn EventsExpected>) -> Option<EventsFell> {
        let _ = self.expected.set(expected);
        Some(self.events_fell.clone())
    }
}

/// Appends each event as one JSON line to a local file (the `dev` sink).
pub struct JsonlFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl JsonlFile {
    pub fn open(path: &Path) -> Result<JsonlFile, EventError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| EventError::File {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(JsonlFile {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }
}

impl EventSink for JsonlFile {
    async fn publish(&self, event: &JobEvent) -> Result<(), EventError> {
        let mut line = serde_json::to_vec(event).map_err(|e| EventError::File {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        // One write(2) per line on an O_APPEND file: lines never interleave.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line).map_err(|source| EventError::File {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_appended_as_json_lines_with_the_contract_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("events.jsonl");
        let sink = JsonlFile::open(&path).expect("open");
        let mut ev = JobEvent::new(EventType::Succeeded, "m-1", 1, "i-0abc");
        ev.job_id = Some("job-1".into());
        ev.exit_code = Some(0);
        ev.is_final = true;
        sink.publish(&ev).await.expect("publish");
        sink.publish(&JobEvent::new(EventType::Rejected, "m-2", 1, "i-0abc"))
            .await
            .expect("publish");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["type"], "job.succeeded");
        assert_eq!(lines[0]["job_id"], "job-1");
        assert_eq!(lines[0]["final"], true);
        assert_eq!(lines[0]["v"], 1);
        assert_eq!(lines[1]["type"], "job.rejected");
        assert!(lines[1]["job_id"].is_null());
        assert!(lines[0]["at"].as_str().expect("at").ends_with('Z'));
    }
}
