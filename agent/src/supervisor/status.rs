//! What the agent is doing right now, for `batchly-agent status`: slots,
//! running jobs with their age, outcome counts, draining or not. The
//! supervisor updates the board; the admin socket reads snapshots of it.
//! Reading never blocks a job for longer than a map copy.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::drain::Drain;
use crate::events::EventType;

const COUNTED: [EventType; 7] = [
    EventType::Started,
    EventType::Succeeded,
    EventType::Failed,
    EventType::TimedOut,
    EventType::Requeued,
    EventType::Interrupted,
    EventType::Rejected,
];

#[derive(Debug, Clone)]
pub struct Running {
    pub job_id: String,
    pub message_id: String,
    pub attempt: u32,
    pub pid: Option<i32>,
    pub since: Instant,
    pub timeout: Duration,
    pub log_stream: String,
    /// Its start event is queued for the events sink (or will never be).
    pub start_queued: bool,
    /// Its outcome event is queued: only the delete or release of its
    /// message is left.
    pub outcome_queued: bool,
}

impl Running {
    fn events_to_come(&self) -> usize {
        if self.outcome_queued {
            return 0;
        }
        1 + usize::from(!self.start_queued)
    }
}

pub struct StatusBoard {
    started: Instant,
    mode: String,
    source: String,
    slots: usize,
    drain: Drain,
    running: Mutex<BTreeMap<String, Running>>,
    fell: std::sync::OnceLock<crate::events::EventsFell>,
    counts: [AtomicU64; COUNTED.len()],
    stranded: AtomicU64,
    not_ours: AtomicU64,
    warnings: Mutex<Vec<String>>,
    /// Running attempts an operator may cancel: message id -> (job id,
    /// where to say so; `Some(requeue)` once cancelled).
    cancels: Mutex<BTreeMap<String, Cancellable>>,
    /// Who the instance is and what its metadata watcher has seen (`run`
    /// on EC2).
    instance: std::sync::OnceLock<crate::imds::InstanceId>,
    metadata: std::sync::OnceLock<Arc<Mutex<crate::imds::Seen>>>,
    /// Job output and the agent's log: the spool.
    logs: std::sync::OnceLock<crate::telemetry::logs::Spool>,
}

/// A running attempt's job id, and where to tell it it was cancelled.
type Cancellable = (String, tokio::sync::watch::Sender<Option<bool>>);

/// A point-in-time copy of the board, as sent over the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusSnapshot {
    pub version: String,
    pub pid: u32,
    pub mode: String,
    pub source: String,
    pub uptime_s: u64,
    pub slots: usize,
    pub busy: usize,
    pub draining: Option<DrainView>,
    pub counts: BTreeMap<String, u64>,
    pub running: Vec<RunningView>,
    /// Messages whose receipt SQS no longer accepted when the agent came
    /// to finish them: another worker may have run them too.
    #[serde(default)]
    pub not_ours: u64,
    /// Conditions an operator should know about (a host clock far off).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The instance's identity from instance metadata, once read.
    #[serde(default)]
    pub instance: Option<crate::imds::Identity>,
    /// What the instance metadata watcher has seen, where one runs.
    #[serde(default)]
    pub metadata: Option<crate::imds::Seen>,
    /// Where job output stands: shipped, waiting, dropped.
    #[serde(default)]
    pub logs: Option<LogsView>,
}

/// The log spool's backlog and its losses.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogsView {
    /// Shipped to CloudWatch Logs (`run`), or kept as local files (`dev`).
    pub shipping: bool,
    pub dir: String,
    /// Waiting to be shipped.
    pub waiting_bytes: u64,
    pub waiting_streams: usize,
    pub oldest_waiting_s: Option<u64>,
    pub shipped_bytes: u64,
    /// Dropped before shipping (the spool's bound), counted.
    pub dropped_bytes: u64,
    /// Events CloudWatch Logs refused, counted.
    pub rejected_events: u64,
    /// Sends abandoned for making no progress.
    pub stalled_sends: u64,
    /// Lines of the agent's own log dropped (its writer fell behind).
    pub agent_lines_dropped: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrainView {
    pub reason: String,
    /// `drain` (jobs are stopped or released, then the agent exits) or
    /// `stop_intake` (no new jobs; running ones go on).
    #[serde(default)]
    pub mode: String,
    pub deadline_in_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunningView {
    pub job_id: String,
    pub message_id: String,
    pub attempt: u32,
    pub pid: Option<i32>,
    pub age_s: u64,
    pub timeout_s: u64,
    pub log_stream: String,
}

/// The events sink's batches wait for exactly the events the attempts on
/// the board have not queued yet.
impl crate::events::EventsExpected for StatusBoard {
    fn to_come(&self) -> usize {
        self.lock().values().map(Running::events_to_come).sum()
    }

    fn queued(&self, message_id: &str, outcome: bool) {
        let fell = match self.lock().get_mut(message_id) {
            Some(r) if r.events_to_come() > 0 => {
                // After its outcome an attempt publishes no more, whether
                // or not its start went.
                r.start_queued = true;
                r.outcome_queued |= outcome;
                true
            }
            _ => false,
        };
        if fell {
            self.events_fell();
        }
    }
}

impl StatusBoard {
    pub fn new(mode: &str, source: String, slots: usize, drain: Drain) -> StatusBoard {
        StatusBoard {
            started: Instant::now(),
            mode: mode.to_string(),
            source,
            slots,
            drain,
            running: Mutex::new(BTreeMap::new()),
            fell: std::sync::OnceLock::new(),
            counts: Default::default(),
            stranded: AtomicU64::new(0),
            not_ours: AtomicU64::new(0),
            warnings: Mutex::new(Vec::new()),
            cancels: Mutex::new(BTreeMap::new()),
            instance: std::sync::OnceLock::new(),
            metadata: std::sync::OnceLock::new(),
            logs: std::sync::OnceLock::new(),
        }
    }

    /// Shows the instance's identity and its metadata watcher's record.
    pub fn watch_instance(
        &self,
        instance: crate::imds::InstanceId,
        metadata: Option<Arc<Mutex<crate::imds::Seen>>>,
    ) {
        let _ = self.instance.set(instance);
        if let Some(m) = metadata {
            let _ = self.metadata.set(m);
        }
    }

    /// Shows the log spool's backlog.
    pub fn watch_logs(&self, spool: crate::telemetry::logs::Spool) {
        let _ = self.logs.set(spool);
    }

    /// Registers a running attempt for `cancel`; the receiver turns
    /// `Some(requeue)` when an operator cancels it. Ends with `finished`.
    pub fn cancellable(
        &self,
        message_id: &str,
        job_id: &str,
    ) -> tokio::sync::watch::Receiver<Option<bool>> {
        let (tx, rx) = tokio::sync::watch::channel(None);
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(message_id.to_string(), (job_id.to_string(), tx));
        rx
    }

    /// Cancels every running attempt of job `job_id`; returns their
    /// message ids (none: no such job is running).
    pub fn cancel(&self, job_id: &str, requeue: bool) -> Vec<String> {
        let cancels = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
        cancels
            .iter()
            .filter(|(_, (job, _))| job == job_id)
            .map(|(message_id, (_, tx))| {
                let _ = tx.send(Some(requeue));
                message_id.clone()
            })
            .collect()
    }

    /// A message turned out not to be ours any more when it was finished.
    pub fn not_ours(&self) {
        self.not_ours.fetch_add(1, Ordering::Relaxed);
    }

    /// Shows a warning in every `status` from now on.
    pub fn warn(&self, text: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(text);
    }

    /// A message this run could not finish (the next start will).
    pub fn stranded(&self) {
        self.stranded.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stranded_count(&self) -> u64 {
        self.stranded.load(Ordering::Relaxed)
    }

    pub fn count(&self, kind: EventType) {
        if let Some(i) = COUNTED.iter().position(|k| *k == kind) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn counted(&self, kind: EventType) -> u64 {
        COUNTED
            .iter()
            .position(|k| *k == kind)
            .map(|i| self.counts[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn set_running(&self, r: Running) {
        self.lock().insert(r.message_id.clone(), r);
    }

    pub fn set_pid(&self, message_id: &str, pid: i32) {
        if let Some(r) = self.lock().get_mut(message_id) {
            r.pid = Some(pid);
        }
    }

    pub fn finished(&self, message_id: &str) {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(message_id);
        let had_events = self
            .lock()
            .remove(message_id)
            .is_some_and(|r| r.events_to_come() > 0);
        if had_events {
            self.events_fell();
        }
    }

    /// Where to say that fewer events are to come (see `EventsExpected`).
    pub fn on_events_fell(&self, signal: crate::events::EventsFell) {
        let _ = self.fell.set(signal);
    }

    fn events_fell(&self) {
        if let Some(s) = self.fell.get() {
            s.send_replace(());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let now = Instant::now();
        let mut running: Vec<RunningView> = self
            .lock()
            .values()
            .map(|r| RunningView {
                job_id: r.job_id.clone(),
                message_id: r.message_id.clone(),
                attempt: r.attempt,
                pid: r.pid,
                age_s: now.duration_since(r.since).as_secs(),
                timeout_s: r.timeout.as_secs(),
                log_stream: r.log_stream.clone(),
            })
            .collect();
        running.sort_by(|a, b| b.age_s.cmp(&a.age_s).then(a.job_id.cmp(&b.job_id)));
        StatusSnapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            mode: self.mode.clone(),
            source: self.source.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            slots: self.slots,
            busy: running.len(),
            draining: self.drain.current().map(|d| DrainView {
                mode: match d.mode {
                    crate::drain::DrainMode::Drain => "drain".into(),
                    crate::drain::DrainMode::StopIntake => "stop_intake".into(),
                },
                reason: d.reason,
                deadline_in_s: d.deadline.saturating_duration_since(now).as_secs(),
            }),
            counts: COUNTED
                .iter()
                .zip(&self.counts)
                .map(|(k, c)| {
                    let name = k.as_str().trim_start_matches("job.").to_string();
                    (name, c.load(Ordering::Relaxed))
                })
                .collect(),
            running,
            not_ours: self.not_ours.load(Ordering::Relaxed),
            warnings: self
                .warnings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            instance: self
                .instance
                .get()
                .and_then(crate::imds::InstanceId::identity),
            metadata: self
                .metadata
                .get()
                .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            logs: self.logs.get().map(logs_view),
        }
    }
}

fn logs_view(spool: &crate::telemetry::logs::Spool) -> LogsView {
    use std::sync::atomic::Ordering::Relaxed;
    let backlog = spool.backlog();
    let counters = spool.counters();
    LogsView {
        shipping: spool.settings().ship,
        dir: spool.settings().dir.display().to_string(),
        waiting_bytes: backlog.bytes,
        waiting_streams: backlog.streams,
        oldest_waiting_s: backlog.oldest.map(|d| d.as_secs()),
        shipped_bytes: counters.shipped_bytes.load(Relaxed),
        dropped_bytes: backlog.dropped_bytes,
        rejected_events: backlog.rejected_events,
        stalled_sends: counters.stalled_sends.load(Relaxed),
        agent_lines_dropped: crate::telemetry::logs::agent_log::dropped(),
        last_error: backlog.last_error,
    }
}

/// `1.5 MiB`, `12 KiB`, `300 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .iter()
        .find(|(unit, _)| n >= *unit)
        .map(|(unit, name)| format!("{:.1} {name}", n as f64 / *unit as f64))
        .unwrap_or_else(|| format!("{n} B"))
}

impl LogsView {
    /// One line for `status`.
    fn render(&self) -> String {
        if !self.shipping {
            return format!("kept in {}", self.dir);
        }
        let mut line = if self.waiting_bytes == 0 {
            format!("all shipped ({} so far)", human_bytes(self.shipped_bytes))
        } else {
            format!(
                "{} in {} stream(s) waiting to ship{}, {} shipped",
                human_bytes(self.waiting_bytes),
                self.waiting_streams,
                self.oldest_waiting_s
                    .map(|s| format!(" (oldest {})", human_duration(s)))
                    .unwrap_or_default(),
                human_bytes(self.shipped_bytes)
            )
        };
        let losses = [
            (self.dropped_bytes, "bytes DROPPED (spool full)"),
            (self.rejected_events, "events refused by CloudWatch Logs"),
            (self.agent_lines_dropped, "agent log lines dropped"),
            (self.stalled_sends, "stalled sends restarted"),
        ];
        for (n, what) in losses {
            if n > 0 {
                line.push_str(&format!("; {n} {what}"));
            }
        }
        if let Some(e) = &self.last_error {
            line.push_str(&format!("; last error: {e}"));
        }
        line
    }
}

/// `1h02m`, `4m05s`, `12s`: short and readable at 3 a.m.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

impl StatusSnapshot {
    /// The human form printed by `batchly-agent status`.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let c = |k: &str| self.counts.get(k).copied().unwrap_or(0);
        out.push_str(&format!(
            "batchly-agent {} ({}), pid {}, up {}\n",
            self.version,
            self.mode,
            self.pid,
            human_duration(self.uptime_s)
        ));
        out.push_str(&format!("source:   {}\n", self.source));
        if let Some(i) = &self.instance {
            let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
            out.push_str(&format!(
                "instance: {} ({}, {}, {}{})\n",
                or(&i.instance_id),
                or(&i.instance_type),
                or(&i.availability_zone),
                or(&i.life_cycle),
                i.autoscaling_group
                    .as_ref()
                    .map(|g| format!(", group {g}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(m) = &self.metadata {
            out.push_str(&format!(
                "notices:  {}; {} reads of instance metadata, {} failed{}\n",
                match (&m.last_notice, &m.last_notice_at) {
                    (Some(n), Some(at)) => format!("last {n} (seen {at})"),
                    _ => "none seen".to_string(),
                },
                m.polls,
                m.errors,
                m.last_error
                    .as_ref()
                    .map(|e| format!(" (last: {e})"))
                    .unwrap_or_default()
            ));
        }
        match &self.draining {
            None => out.push_str("state:    running\n"),
            Some(d) if d.mode == "stop_intake" => out.push_str(&format!(
                "state:    INTAKE PAUSED ({}): running jobs go on, no new ones\n",
                d.reason
            )),
            Some(d) => out.push_str(&format!(
                "state:    DRAINING ({}), {} left before the deadline\n",
                d.reason,
                human_duration(d.deadline_in_s)
            )),
        }
        for w in &self.warnings {
            out.push_str(&format!("WARNING:  {w}\n"));
        }
        out.push_str(&format!("slots:    {} of {} busy\n", self.busy, self.slots));
        if let Some(logs) = &self.logs {
            out.push_str(&format!("logs:     {}\n", logs.render()));
        }
        out.push_str(&format!(
            "outcomes: {} succeeded, {} failed, {} timed out, {} requeued, {} interrupted, {} rejected ({} started)\n",
            c("succeeded"),
            c("failed"),
            c("timed_out"),
            c("requeued"),
            c("interrupted"),
            c("rejected"),
            c("started"),
        ));
        if self.not_ours > 0 {
            out.push_str(&format!(
                "lost:     {} message(s) were no longer ours when their job ended (their visibility lapsed; another worker may have run them too)\n",
                self.not_ours
            ));
        }
        if self.running.is_empty() {
            out.push_str("running:  none\n");
            return out;
        }
        out.push_str("running:\n");
        let width = self
            .running
            .iter()
            .map(|r| r.job_id.len())
            .max()
            .unwrap_or(3)
            .max(3);
        out.push_str(&format!(
            "  {:<width$}  {:>7}  {:>7}  {:>7}  {:>7}  LOG STREAM\n",
            "JOB", "ATTEMPT", "PID", "AGE", "TIMEOUT"
        ));
        for r in &self.running {
            out.push_str(&format!(
                "  {:<width$}  {:>7}  {:>7}  {:>7}  {:>7}  {}\n",
                r.job_id,
                r.attempt,
                r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                human_duration(r.age_s),
                human_duration(r.timeout_s),
                r.log_stream
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_logs_line_says_what_waits_and_every_loss() {
        let mut view = LogsView {
            shipping: true,
            dir: "/var/lib/batchly/spool".into(),
            shipped_bytes: 3 << 20,
            ..LogsView::default()
        };
        assert_eq!(view.render(), "all shipped (3.0 MiB so far)");
        view.waiting_bytes = 1536;
        view.waiting_streams = 2;
        view.oldest_waiting_s = Some(75);
        view.dropped_bytes = 100;
        view.rejected_events = 3;
        view.last_error = Some("PutLogEvents: connection reset".into());
        assert_eq!(
            view.render(),
            "1.5 KiB in 2 stream(s) waiting to ship (oldest 1m15s), 3.0 MiB shipped; \
             100 bytes DROPPED (spool full); 3 events refused by CloudWatch Logs; \
             last error: PutLogEvents: connection reset"
        );
        view.shipping = false;
        assert_eq!(view.render(), "kept in /var/lib/batchly/spool");
    }

    use super::*;

    #[test]
    fn snapshot_shows_running_jobs_counts_and_drain_state() {
        let drain = Drain::new();
        let board = StatusBoard::new("dev", "directory /tmp/x".into(), 4, drain.clone());
        board.set_running(Running {
            job_id: "job-1".into(),
            message_id: "m1".into(),
            attempt: 1,
            pid: None,
            since: Instant::now(),
            timeout: Duration::from_secs(3600),
            log_stream: "job-1/m1.1".into(),
            start_queued: false,
            outcome_queued: false,
        });
        board.set_pid("m1", 4242);
        board.count(EventType::Succeeded);
        board.count(EventType::Succeeded);
        drain.request("SIGTERM", Instant::now() + Duration::from_secs(90));
        let snap = board.snapshot();
        assert_eq!(snap.busy, 1);
        assert_eq!(snap.running[0].pid, Some(4242));
        assert_eq!(snap.counts["succeeded"], 2);
        assert_eq!(
            snap.draining.as_ref().map(|d| d.reason.as_str()),
            Some("SIGTERM")
        );
        let text = snap.render_text();
        assert!(text.contains("1 of 4 busy"), "{text}");
        assert!(text.contains("DRAINING (SIGTERM)"), "{text}");
        assert!(text.contains("job-1") && text.contains("4242"), "{text}");
        board.finished("m1");
        assert_eq!(board.snapshot().busy, 0);
    }

    fn running(message_id: &str) -> Running {
        Running {
            job_id: format!("job-{message_id}"),
            message_id: message_id.into(),
            attempt: 1,
            pid: None,
            since: Instant::now(),
            timeout: Duration::from_secs(3600),
            log_stream: format!("job/{message_id}.1"),
            start_queued: false,
            outcome_queued: false,
        }
    }

    #[test]
    fn the_events_to_come_are_each_attempts_start_and_outcome_until_queued() {
        use crate::events::EventsExpected;
        let board = StatusBoard::new("run", "q".into(), 4, Drain::new());
        let (fell, mut seen) = tokio::sync::watch::channel(());
        board.on_events_fell(fell);
        board.set_running(running("a"));
        board.set_running(running("b"));
        board.set_running(running("c"));
        assert_eq!(board.to_come(), 6, "a start and an outcome each");
        seen.mark_unchanged();

        board.queued("a", false);
        assert_eq!(board.to_come(), 5);
        assert!(seen.has_changed().expect("open"), "a waiting batch is told");
        // Its start queued again (a retry) counts once.
        board.queued("a", false);
        assert_eq!(board.to_come(), 5);
        board.queued("a", true);
        assert_eq!(board.to_come(), 4);
        // An attempt that never published its start (refused before the
        // job ran) is done once its outcome is queued.
        board.queued("b", true);
        assert_eq!(board.to_come(), 2);
        // Events of messages not on the board (a rejection) change nothing.
        board.queued("elsewhere", true);
        assert_eq!(board.to_come(), 2);
        // Finished with its events never queued (a drain cut it short):
        // nothing is waited for any more.
        seen.mark_unchanged();
        board.finished("c");
        assert_eq!(board.to_come(), 0);
        assert!(seen.has_changed().expect("open"));
    }

    #[test]
    fn durations_read_like_a_human_wrote_them() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(245), "4m05s");
        assert_eq!(human_duration(3720), "1h02m");
    }
}
