//! Ships the spool's streams to CloudWatch Logs: one `PutLogEvents` per
//! batch, each stream's batches in order, a few streams at once. A stream
//! is made (and the group, if allowed) before its first batch. Throttling,
//! 5xx and broken connections are retried with the agent's one policy and
//! nothing is lost meanwhile (it waits in the spool, up to its bound);
//! what the service refuses is counted and never retried forever.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_cloudwatchlogs::error::ProvideErrorMetadata;
use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use aws_sdk_cloudwatchlogs::Client;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::line;
use super::spool::{Pending, Spool};
use crate::imds::InstanceId;
use crate::retry::{retry, ErrorClass, GaveUp};
use crate::telemetry::batch::{Batch, LogEvent, Refused, MAX_BATCH_BYTES};
use crate::telemetry::{Flush, Flushed};

/// Streams shipped at once.
const CONCURRENCY: usize = 4;
/// A running stream is shipped once this much waits...
const MIN_BATCH_BYTES: u64 = MAX_BATCH_BYTES as u64 / 2;
/// ...or once its oldest line has waited this long.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read from a stream file for one batch: a full batch plus its
/// longest line.
const READ_MAX: usize = 2 * MAX_BATCH_BYTES + 64;
/// How long one batch is retried before its stream is put back (and tried
/// again after `PAUSE_AFTER_FAILURE`).
const SEND_ROUND: Duration = Duration::from_secs(30);
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// A stream's send that has made no progress this long is abandoned (a
/// hung connection the call timeout did not end), counted and retried.
const STALL: Duration = Duration::from_secs(75);
/// What a drain keeps of its time for the last of the logs.
pub const FLUSH_RESERVE: Duration = Duration::from_secs(5);
/// The main loop looks round at least this often.
const TICK: Duration = Duration::from_millis(200);

/// One stream being shipped.
struct Sending {
    task: tokio::task::Id,
    handle: tokio::task::AbortHandle,
    stream: u64,
    /// ms since the Unix epoch of its last batch (or its start).
    progress: Arc<AtomicU64>,
}

/// Where the logs go.
#[derive(Debug, Clone)]
pub struct Target {
    pub group: String,
    /// Names this instance's agent-log stream: `agent/<instance id>`.
    pub instance: InstanceId,
}

/// What to do after a failed call, decided from the error alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterError {
    /// Throttling, a 5xx, a timeout, a broken connection.
    Retry,
    /// The stream (or its group) does not exist: make it, then retry.
    MakeStream,
    /// The service will never take this batch: count it and go on.
    Drop,
}

/// The one place a CloudWatch Logs error becomes a decision.
pub fn after_error(code: Option<&str>, class: ErrorClass) -> AfterError {
    match code {
        Some("ResourceNotFoundException") => AfterError::MakeStream,
        _ if class == ErrorClass::Transient => AfterError::Retry,
        _ => AfterError::Drop,
    }
}

/// A failed call, with what it means.
#[derive(Debug)]
struct CallError {
    after: AfterError,
    text: String,
    code: Option<String>,
    /// No answer within the call timeout: a hung connection, dropped.
    timed_out: bool,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl CallError {
    fn from_sdk<E, R>(e: &aws_smithy_runtime_api::client::result::SdkError<E, R>) -> CallError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug + crate::retry::HttpStatus,
    {
        let failed = crate::aws_errors::CallFailure::of(e);
        CallError {
            after: after_error(failed.code.as_deref(), failed.class),
            text: failed.text,
            code: failed.code,
            timed_out: failed.timed_out,
        }
    }
}

/// The shipper's handle: start it with [`Shipper::run`]; the drain calls
/// [`Flush::flush`].
#[derive(Clone)]
pub struct Shipper(Arc<Shared>);

struct Shared {
    spool: Spool,
    client: Client,
    target: Target,
    made: Mutex<HashSet<String>>,
    group_made: AtomicBool,
    /// A flush is under way until then: ship at once, retry no longer.
    flush_until: Mutex<Option<tokio::time::Instant>>,
    progress: tokio::sync::Notify,
}

impl Shipper {
    pub fn new(spool: Spool, client: Client, target: Target) -> Shipper {
        Shipper(Arc::new(Shared {
            spool,
            client,
            target,
            made: Mutex::new(HashSet::new()),
            group_made: AtomicBool::new(false),
            flush_until: Mutex::new(None),
            progress: tokio::sync::Notify::new(),
        }))
    }

    pub fn spool(&self) -> &Spool {
        &self.0.spool
    }

    fn flush_deadline(&self) -> Option<tokio::time::Instant> {
        *self.0.flush_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ships until `stop` (after a flush, which the drain asks for).
    pub async fn run(self, stop: CancellationToken) {
        let beat = crate::liveness::global().register("log shipper", STALL * 2);
        let mut sending: JoinSet<()> = JoinSet::new();
        let mut running: Vec<Sending> = Vec::new();
        loop {
            beat.beat();
            let urgent = self.flush_deadline().is_some();
            let room = CONCURRENCY.saturating_sub(sending.len());
            let notes = self.0.spool.take_orphan_notes(room);
            let room = room - notes.len();
            for (stream, note) in notes {
                let me = self.clone();
                sending.spawn(async move { me.send_note(stream, note).await });
            }
            let ready = self
                .0
                .spool
                .take_ready(room, MIN_BATCH_BYTES, LINGER, urgent);
            for pending in ready {
                let stream = pending.id;
                let progress = Arc::new(AtomicU64::new(now_ms() as u64));
                let me = self.clone();
                let mark = progress.clone();
                let handle = sending.spawn(async move { me.ship_stream(pending, mark).await });
                running.push(Sending {
                    task: handle.id(),
                    handle,
                    stream,
                    progress,
                });
            }
            // A send that makes no progress past every timeout (a read
            // stuck on the file system, say) is abandoned and counted; its
            // stream is taken again from what was acknowledged.
            let now = now_ms() as u64;
            running.retain(|s| {
                let quiet = now.saturating_sub(s.progress.load(Ordering::Relaxed));
                if quiet <= STALL.as_millis() as u64 {
                    return true;
                }
                s.handle.abort();
                tracing::warn!(
                    stall_s = STALL.as_secs(),
                    "a log send made no progress; abandoned it and will send again"
                );
                self.0
                    .spool
                    .counters()
                    .stalled_sends
                    .fetch_add(1, Ordering::Relaxed);
                self.0.spool.put_back(s.stream, Some(PAUSE_AFTER_FAILURE));
                false
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.0.spool.changed() => {}
                Some(done) = sending.join_next_with_id(), if !sending.is_empty() => {
                    let id = match &done { Ok((id, ())) => *id, Err(e) => e.id() };
                    running.retain(|s| s.task != id);
                    self.0.progress.notify_waiters();
                }
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        self.0.spool.save_acked();
    }

    /// Ships stream `p` up to where it was when taken, batch after batch,
    /// marking `progress` after each.
    async fn ship_stream(&self, mut p: Pending, progress: Arc<AtomicU64>) {
        let name = match &p.stream {
            Some(name) => name.clone(),
            None => format!("agent/{}", self.0.target.instance.get()),
        };
        let mut pause = None;
        loop {
            // The bound may have moved the stream on meanwhile.
            match self.0.spool.acked(p.id) {
                Some(acked) => p.from = p.from.max(acked),
                None => return,
            }
            if p.from >= p.to && p.note.is_none() {
                break;
            }
            let (batch, next, refused) = match read_batch(&p) {
                Ok(read) => read,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(file = %p.path.display(), "a log spool file was removed before it was shipped; its output is lost (counted)");
                    self.0.spool.file_gone(p.id);
                    break;
                }
                Err(e) => {
                    tracing::warn!(file = %p.path.display(), error = %e, "cannot read the log spool; trying again shortly");
                    pause = Some(PAUSE_AFTER_FAILURE);
                    break;
                }
            };
            if let Some(note) = p.note.take() {
                let event = LogEvent {
                    timestamp_ms: batch.events.first().map_or_else(now_ms, |e| e.timestamp_ms),
                    message: format!("agent {note}"),
                };
                match self.put(&name, vec![event]).await {
                    Err(GaveUp::Deadline(_)) => {
                        pause = Some(PAUSE_AFTER_FAILURE);
                        break;
                    }
                    Err(GaveUp::Final(..)) => {
                        self.count_rejected(1);
                        self.0.spool.noted(p.id, p.noted_bytes);
                    }
                    Ok(()) => self.0.spool.noted(p.id, p.noted_bytes),
                }
            }
            self.count_rejected(refused.total());
            if !batch.is_empty() {
                let events = batch.events.len() as u64;
                match self.put(&name, batch.events).await {
                    Ok(()) => self.0.spool.set_last_error(None),
                    Err(GaveUp::Final(_, e)) => {
                        self.count_rejected(events);
                        tracing::error!(stream = %name, events, error = %e, "CloudWatch Logs refused a batch of output; dropped it (counted)");
                        self.0.spool.set_last_error(Some(e.text));
                    }
                    Err(GaveUp::Deadline(e)) => {
                        let why = e.map_or_else(|| "no answer in time".to_string(), |e| e.text);
                        self.0.spool.set_last_error(Some(why));
                        pause = Some(PAUSE_AFTER_FAILURE);
                        break;
                    }
                }
            }
            if next == p.from {
                // Nothing whole to read (a line still being written).
                break;
            }
            self.0.spool.shipped(p.id, next);
            progress.store(now_ms() as u64, Ordering::Relaxed);
            if next >= p.to {
                break;
            }
            p.from = next;
        }
        self.0.spool.put_back(p.id, pause);
    }

    fn count_rejected(&self, n: u64) {
        if n > 0 {
            self.0
                .spool
                .counters()
                .rejected_events
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A note alone, for a stream whose file is gone.
    async fn send_note(&self, stream: String, note: String) {
        let event = LogEvent {
            timestamp_ms: now_ms(),
            message: format!("agent {note}"),
        };
        if let Err(e) = self.put(&stream, vec![event]).await {
            tracing::warn!(stream = %stream, error = ?e, "cannot send a stream the note of its dropped output");
        }
    }

    /// Sends one batch, making its stream first; retried until it works,
    /// fails for good, or its round (or the flush) ends.
    async fn put(&self, stream: &str, events: Vec<LogEvent>) -> Result<(), GaveUp<CallError>> {
        let mut deadline = tokio::time::Instant::now() + SEND_ROUND;
        if let Some(flush) = self.flush_deadline() {
            deadline = deadline.min(flush);
        }
        let input: Vec<InputLogEvent> = events
            .into_iter()
            .filter_map(|e| {
                InputLogEvent::builder()
                    .timestamp(e.timestamp_ms)
                    .message(e.message)
                    .build()
                    .ok()
            })
            .collect();
        let count = input.len();
        let bytes: usize = input
            .iter()
            .map(|e| e.message().len() + crate::telemetry::batch::EVENT_OVERHEAD)
            .sum();
        retry(
            "PutLogEvents",
            deadline,
            |e: &CallError| match e.after {
                AfterError::Drop => ErrorClass::Permanent,
                _ => ErrorClass::Transient,
            },
            || async {
                self.make_stream(stream).await?;
                let out = self
                    .0
                    .client
                    .put_log_events()
                    .log_group_name(&self.0.target.group)
                    .log_stream_name(stream)
                    .set_log_events(Some(input.clone()))
                    .send()
                    .await
                    .map_err(|e| {
                        let e = CallError::from_sdk(&e);
                        if e.after == AfterError::MakeStream {
                            self.forget_stream(stream);
                        }
                        if e.timed_out {
                            // The connection is dropped; the retry opens
                            // a new one.
                            tracing::warn!(stream, "a log send got no answer in time; sending it again on a new connection");
                            self.0
                                .spool
                                .counters()
                                .stalled_sends
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        e
                    })?;
                if let Some(info) = out.rejected_log_events_info() {
                    let n = rejected(info, count);
                    tracing::warn!(stream, events = n, "CloudWatch Logs rejected events of a batch (too old, too new or expired); counted");
                    self.count_rejected(n as u64);
                }
                Ok(())
            },
        )
        .await?;
        tracing::trace!(stream, count, bytes, "shipped a batch");
        Ok(())
    }

    fn forget_stream(&self, stream: &str) {
        self.0
            .made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream);
        self.0.group_made.store(false, Ordering::Relaxed);
    }

    /// Makes `stream` (once per run; one that exists is fine), and the
    /// group when it is missing too.
    async fn make_stream(&self, stream: &str) -> Result<(), CallError> {
        let made = |s: &Self| {
            s.0.made
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(stream)
        };
        if made(self) {
            return Ok(());
        }
        let create = || async {
            self.0
                .client
                .create_log_stream()
                .log_group_name(&self.0.target.group)
                .log_stream_name(stream)
                .send()
                .await
                .map(|_| ())
                .or_else(|e| match e.code() {
                    Some("ResourceAlreadyExistsException") => Ok(()),
                    _ => Err(CallError::from_sdk(&e)),
                })
        };
        match create().await {
            Err(e) if e.code.as_deref() == Some("ResourceNotFoundException") => {
                self.make_group().await?;
                create().await?;
            }
            other => other?,
        }
        self.0
            .made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stream.to_string());
        Ok(())
    }

    async fn make_group(&self) -> Result<(), CallError> {
        let group = &self.0.target.group;
        let made = self
            .0
            .client
            .create_log_group()
            .log_group_name(group)
            .send()
            .await;
        match made {
            Ok(_) => {
                tracing::info!(group = %group, "made the CloudWatch Logs group (logs.group)");
                Ok(())
            }
            Err(e) if e.code() == Some("ResourceAlreadyExistsException") => Ok(()),
            Err(e) => {
                let e = CallError::from_sdk(&e);
                tracing::error!(group = %group, error = %e, "the log group (logs.group) does not exist and the agent cannot make it");
                Err(e)
            }
        }
    }
}

/// How many events of a batch of `count` the service rejected.
fn rejected(info: &aws_sdk_cloudwatchlogs::types::RejectedLogEventsInfo, count: usize) -> usize {
    let count = count as i64;
    let index = |i: Option<i32>| i.map(i64::from);
    let mut rejected = 0;
    if let Some(start) = index(info.too_new_log_event_start_index()) {
        rejected += (count - start).max(0);
    }
    let old_end = index(info.too_old_log_event_end_index()).unwrap_or(-1);
    let expired_end = index(info.expired_log_event_end_index()).unwrap_or(-1);
    rejected += old_end.max(expired_end) + 1;
    rejected.clamp(0, count) as usize
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads the next batch of stream `p` from its file: whole lines from
/// `p.from`, as many as fit one batch. Returns the batch, the offset after
/// its last line, and what the service's time window leaves out.
fn read_batch(p: &Pending) -> std::io::Result<(Batch, u64, Refused)> {
    let mut file = std::fs::File::open(&p.path)?;
    file.seek(SeekFrom::Start(p.from))?;
    let want = (p.to - p.from).min(READ_MAX as u64) as usize;
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    let now = now_ms();
    let mut batch = Batch::default();
    let mut refused = Refused::default();
    let mut at = 0;
    let at_end = p.from + got as u64 >= p.to;
    let mut decoder = line::Decoder::default();
    while at < buf.len() {
        // A punched hole (shipped, or dropped by the bound, while this was
        // read) reads as zeros up to a line's start.
        if buf[at] == 0 {
            at += buf[at..]
                .iter()
                .position(|&b| b != 0)
                .unwrap_or(buf.len() - at);
            continue;
        }
        let (line, next) = match memchr::memchr(b'\n', &buf[at..]) {
            Some(n) => (&buf[at..at + n], at + n + 1),
            // A last line without its newline, of a stream that has ended
            // (a crash mid-write): sent as it is.
            None if p.finished && at_end => (&buf[at..], buf.len()),
            // A whole read without a newline is no line the writer made
            // (those fit one event): sent as it is rather than stuck on.
            None if at == 0 && got == READ_MAX => (&buf[..], buf.len()),
            None => break,
        };
        let mut event = decoder.decode(line, now);
        if p.stream.is_none() {
            // The agent's own log: its JSON alone, for Logs Insights.
            if let Some(bare) = event.message.strip_prefix("agent ") {
                event.message = bare.to_string();
            }
        }
        if !refused.refuses(&event, now) {
            if !batch.fits(&event) {
                break;
            }
            batch.push(event);
        }
        at = next;
    }
    Ok((batch, p.from + at as u64, refused))
}

impl Flush for Shipper {
    fn flush_reserve(&self) -> Duration {
        FLUSH_RESERVE
    }

    fn flush(
        &self,
        deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Flushed> + Send + '_>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::from_std(deadline);
            *self.0.flush_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
            let spool = &self.0.spool;
            let before = spool.counters().shipped_bytes.load(Ordering::Relaxed);
            spool.nudge();
            loop {
                let progressed = self.0.progress.notified();
                if spool.is_drained() || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::select! {
                    _ = progressed => {}
                    _ = tokio::time::sleep(TICK) => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            spool.save_acked();
            Flushed {
                shipped: spool.counters().shipped_bytes.load(Ordering::Relaxed) - before,
                left: spool.backlog().bytes,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::logs::line::Source;
    use crate::telemetry::logs::spool::SpoolSettings;

    #[test]
    fn errors_are_decided_in_one_place() {
        use ErrorClass::*;
        assert_eq!(
            after_error(Some("ResourceNotFoundException"), Permanent),
            AfterError::MakeStream
        );
        assert_eq!(
            after_error(Some("ThrottlingException"), Transient),
            AfterError::Retry
        );
        assert_eq!(
            after_error(Some("ServiceUnavailableException"), Transient),
            AfterError::Retry
        );
        assert_eq!(after_error(None, Transient), AfterError::Retry);
        for code in [
            "InvalidParameterException",
            "DataAlreadyAcceptedException",
            "AccessDeniedException",
            "UnrecognizedClientException",
        ] {
            assert_eq!(
                after_error(Some(code), Permanent),
                AfterError::Drop,
                "{code}"
            );
        }
        assert_eq!(
            crate::retry::classify_code("ThrottlingException", Some(400)),
            Transient
        );
        assert_eq!(
            crate::retry::classify_code("ServiceUnavailableException", Some(503)),
            Transient
        );
    }

    #[test]
    fn rejected_events_are_counted_from_the_service_indexes() {
        use aws_sdk_cloudwatchlogs::types::RejectedLogEventsInfo;
        let info = RejectedLogEventsInfo::builder()
            .too_old_log_event_end_index(2)
            .too_new_log_event_start_index(8)
            .build();
        assert_eq!(rejected(&info, 10), 3 + 2);
        let expired = RejectedLogEventsInfo::builder()
            .expired_log_event_end_index(0)
            .build();
        assert_eq!(rejected(&expired, 10), 1);
        assert_eq!(rejected(&RejectedLogEventsInfo::builder().build(), 10), 0);
    }

    #[test]
    fn a_batch_read_from_a_file_is_whole_lines_within_every_limit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(SpoolSettings {
            dir: tmp.path().to_path_buf(),
            max_bytes: 1 << 30,
            ship: true,
        })
        .expect("open");
        let mut w = spool.stream("job.m.1", u64::MAX);
        // 30,000 short lines: more events than one batch may hold.
        let lines: String = (0..30_000).map(|n| format!("line {n}\n")).collect();
        w.output(Source::Stdout, lines.as_bytes());
        w.output(Source::Stdout, b"partial");
        let mut p = spool
            .take_ready(1, 0, Duration::ZERO, true)
            .pop()
            .expect("ready");
        let mut seen = Vec::new();
        loop {
            let (batch, next, refused) = read_batch(&p).expect("read");
            assert_eq!(refused, Refused::default());
            if batch.is_empty() {
                break;
            }
            assert!(batch.events.len() <= crate::telemetry::batch::MAX_BATCH_EVENTS);
            assert!(batch.bytes() <= MAX_BATCH_BYTES);
            seen.extend(batch.events.into_iter().map(|e| e.message));
            p.from = next;
        }
        assert_eq!(seen.len(), 30_000, "the unfinished last line waits");
        assert_eq!(seen[0], "stdout line 0");
        assert_eq!(seen[29_999], "stdout line 29999");
        drop(w);
    }
}
