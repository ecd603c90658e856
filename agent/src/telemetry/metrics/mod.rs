//! The agent's metrics: what the supervisor, the queue and the log shipper
//! report ([`Metrics`]), aggregated per interval for CloudWatch and as
//! running totals for the local Prometheus endpoint, and the task that
//! publishes each interval ([`Publisher`]).
//!
//! Reporting is a short lock and a few map updates: it never blocks on the
//! network and never fails, so metrics can never hold up or break a job.
//! Dimensions are few by default, since every distinct dimension set is a
//! metric CloudWatch bills: the Auto Scaling group when known and the
//! queue; `InstanceId` only with `metrics.instance_dimension`, job tags
//! only for the keys in `metrics.tag_dimensions`.
//!
//! Where things are: `interval.rs` aggregates one interval, `cut.rs` holds
//! `PutMetricData`'s limits and cuts requests, `publisher.rs` sends them
//! (bounded buffer, the agent's retry policy), `host.rs` samples the host,
//! `prometheus.rs` keeps the registry for `/metrics`.

mod cut;
mod host;
mod interval;
mod prometheus;
mod publisher;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::envelope::RejectReason;
use crate::events::EventType;
use crate::supervisor::verdict::{Ending, EXIT_REQUEUE};

pub use cut::{
    cut, Datum, Unit, Value, MAX_DATA_PER_REQUEST, MAX_DIMENSIONS, MAX_DIMENSION_VALUE_LEN,
    MAX_REQUEST_BYTES, MAX_VALUES_PER_DATUM,
};
pub use interval::{HostSample, MAX_TAGGED_SERIES, SIGNIFICANT_DIGITS};
pub use prometheus::CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE;
pub use publisher::{Publisher, FLUSH_RESERVE, MAX_PENDING_INTERVALS};

use interval::{Gauges, Interval, JobKey, DIMENSION_OUTCOME, DIMENSION_QUEUE, DIMENSION_REASON};

/// The dimension naming the instance's Auto Scaling group.
pub const DIMENSION_GROUP: &str = "AutoScalingGroupName";
/// The dimension naming the instance (`metrics.instance_dimension`).
pub const DIMENSION_INSTANCE: &str = "InstanceId";
/// The agent's own dimension names: a job tag may not take one of them.
pub const AGENT_DIMENSIONS: &[&str] = &[
    DIMENSION_GROUP,
    DIMENSION_INSTANCE,
    DIMENSION_QUEUE,
    DIMENSION_OUTCOME,
    DIMENSION_REASON,
];

/// What the metrics need to know about the agent and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// CloudWatch namespace (`metrics.namespace`).
    pub namespace: String,
    /// How long one aggregate covers (`metrics.interval_s`); tests use less
    /// than a second.
    pub interval: Duration,
    /// Whether every metric carries `InstanceId`.
    pub instance_dimension: bool,
    /// Job tag keys published as dimensions of the job metrics.
    pub tag_dimensions: Vec<String>,
    /// The Auto Scaling group's name, when known: a dimension of every
    /// metric, so a group's scaling policy can read its own.
    pub group: Option<String>,
    /// This instance, for `InstanceId`.
    pub instance_id: String,
    /// A path on the filesystem whose space is published (the jobs' work
    /// directory: a full one fails every attempt).
    pub disk_path: PathBuf,
}

impl MetricsSettings {
    /// The settings from the configuration, for `instance_id` in `group`.
    pub fn from_config(
        config: &Config,
        instance_id: &str,
        group: Option<String>,
    ) -> MetricsSettings {
        MetricsSettings {
            namespace: config.metrics.namespace.clone(),
            interval: config.metrics.interval,
            instance_dimension: config.metrics.instance_dimension,
            tag_dimensions: config.metrics.tag_dimensions.clone(),
            group,
            instance_id: instance_id.to_string(),
            disk_path: config.jobs.work_dir.clone(),
        }
    }
}

/// Why an attempt ended as it did: a short, fixed set (the `Reason`
/// dimension), unlike the event's free-text `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Exit status 0.
    Completed,
    /// Exit status 75: the job asked to run again.
    RequeueExit,
    /// Any other exit status.
    Exit,
    /// Killed by a signal.
    Signal,
    /// Killed by the OOM killer at its memory limit.
    Oom,
    /// Killed at its time limit.
    Timeout,
    /// Its command, an input or a declared output was missing.
    JobFault,
    /// Stopped by a drain.
    Drain,
    /// Cancelled by an operator.
    Cancelled,
    /// The agent could not run it (disk, launcher).
    AgentFault,
    /// Released too often without a failed attempt; dead-lettered.
    AgentGaveUp,
    /// Its message was refused before it ran.
    Rejected(RejectReason),
}

impl Reason {
    /// The reason for an attempt's ending (the verdict's rules, README
    /// "What happens to a job").
    pub fn of_ending(ending: &Ending) -> Reason {
        match ending {
            Ending::Exited(0) => Reason::Completed,
            Ending::Exited(EXIT_REQUEUE) => Reason::RequeueExit,
            Ending::Exited(_) => Reason::Exit,
            Ending::Signaled(_) => Reason::Signal,
            Ending::JobFault(_) => Reason::JobFault,
            Ending::TimedOut { .. } => Reason::Timeout,
            Ending::Interrupted { code: Some(0), .. } => Reason::Completed,
            Ending::Interrupted {
                code: Some(EXIT_REQUEUE),
                ..
            } => Reason::RequeueExit,
            Ending::Interrupted { .. } => Reason::Drain,
            Ending::AgentFault(_) => Reason::AgentFault,
            Ending::OutOfMemory { .. } => Reason::Oom,
            Ending::Cancelled { .. } => Reason::Cancelled,
        }
    }

    /// The dimension value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Completed => "completed",
            Reason::RequeueExit => "exit_75",
            Reason::Exit => "exit",
            Reason::Signal => "signal",
            Reason::Oom => "oom",
            Reason::Timeout => "timeout",
            Reason::JobFault => "job_fault",
            Reason::Drain => "drain",
            Reason::Cancelled => "cancelled",
            Reason::AgentFault => "agent_fault",
            Reason::AgentGaveUp => "agent_gave_up",
            Reason::Rejected(reject) => reject.as_str(),
        }
    }
}

/// The `Outcome` dimension's value: the event type without `job.`.
fn outcome_name(kind: EventType) -> &'static str {
    let name = kind.as_str();
    name.strip_prefix("job.").unwrap_or(name)
}

/// One attempt's end, as the supervisor reports it.
#[derive(Debug, Clone, Copy)]
pub struct JobEnded<'a> {
    /// The queue's name (the last part of its URL).
    pub queue: &'a str,
    /// The attempt's event type.
    pub outcome: EventType,
    pub reason: Reason,
    /// How long it ran; `None` when it never ran (a rejected message).
    pub duration: Option<Duration>,
    /// From the message's first send to this attempt's start, when known.
    pub queue_wait: Option<Duration>,
    /// The job spec's tags; only `metrics.tag_dimensions` keys are used.
    pub tags: &'a BTreeMap<String, String>,
}

/// What is reported between two publishes, and since the start.
#[derive(Debug, Default)]
struct State {
    interval: Interval,
    slots: Option<(usize, usize)>,
    logs_reported: bool,
    intervals_dropped: u64,
}

#[derive(Debug)]
struct Shared {
    settings: MetricsSettings,
    /// The dimensions every datum starts with.
    base: Vec<(String, String)>,
    /// The tag keys used, at most what leaves room in `MAX_DIMENSIONS`.
    tag_keys: Vec<String>,
    state: Mutex<State>,
    prometheus: prometheus::Prometheus,
}

/// The agent's metrics. Cheap to clone (one `Arc`); every method is a short
/// lock and never fails.
#[derive(Debug, Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
}

impl Metrics {
    pub fn new(settings: MetricsSettings) -> Metrics {
        let mut base = Vec::new();
        if let Some(group) = settings.group.as_deref().and_then(cut::dimension_value) {
            base.push((DIMENSION_GROUP.to_string(), group));
        }
        if settings.instance_dimension {
            if let Some(id) = cut::dimension_value(&settings.instance_id) {
                base.push((DIMENSION_INSTANCE.to_string(), id));
            }
        }
        // The job metrics' own: Queue, Outcome, Reason. The config allows
        // no more tags than fit; settings built otherwise are cut to fit.
        let room = MAX_DIMENSIONS - base.len() - 3;
        if settings.tag_dimensions.len() > room {
            tracing::warn!(
                configured = settings.tag_dimensions.len(),
                used = room,
                "more tag dimensions than CloudWatch allows per metric; the first ones are used"
            );
        }
        let tag_keys = settings.tag_dimensions.iter().take(room).cloned().collect();
        Metrics {
            shared: Arc::new(Shared {
                settings,
                base,
                tag_keys,
                state: Mutex::new(State::default()),
                prometheus: prometheus::Prometheus::new(),
            }),
        }
    }

    /// The settings these metrics were made with.
    pub fn settings(&self) -> &MetricsSettings {
        &self.shared.settings
    }

    /// The publisher of these metrics to CloudWatch through `client` (one
    /// per agent; clones share its buffer).
    pub fn publisher(&self, client: aws_sdk_cloudwatch::Client) -> Publisher {
        Publisher::new(self.clone(), client)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves counters, which
        // are still worth publishing.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One job attempt ended.
    pub fn job_ended(&self, ended: &JobEnded<'_>) {
        let tags = self
            .shared
            .tag_keys
            .iter()
            .filter_map(|key| {
                let value = ended.tags.get(key).and_then(|v| cut::dimension_value(v))?;
                Some((key.clone(), value))
            })
            .collect();
        let queue = cut::dimension_value(ended.queue).unwrap_or_else(|| "-".to_string());
        let outcome = outcome_name(ended.outcome);
        let reason = ended.reason.as_str();
        self.shared
            .prometheus
            .job_ended(&queue, outcome, reason, ended.duration, ended.queue_wait);
        let key = JobKey { queue, tags };
        self.state()
            .interval
            .job_ended(key, outcome, reason, ended.duration, ended.queue_wait);
    }

    /// The agent's job slots and how many are busy now: what a
    /// backlog-per-instance scaling policy divides by.
    pub fn slots(&self, total: usize, busy: usize) {
        self.shared.prometheus.slots(total, busy);
        self.state().slots = Some((total, busy));
    }

    /// An SQS call on `queue` failed.
    pub fn sqs_error(&self, queue: &str) {
        self.shared.prometheus.sqs_error(queue);
        let queue = cut::dimension_value(queue).unwrap_or_else(|| "-".to_string());
        self.state().interval.sqs_error(&queue);
    }

    /// Log bytes shipped, written to the spool and dropped since the last
    /// call (amounts, not totals).
    pub fn log_bytes(&self, shipped: u64, spooled: u64, dropped: u64) {
        self.shared.prometheus.log_bytes(shipped, spooled, dropped);
        let mut state = self.state();
        state.logs_reported = true;
        let log = &mut state.interval.log;
        log.shipped = log.shipped.saturating_add(shipped);
        log.spooled = log.spooled.saturating_add(spooled);
        log.dropped = log.dropped.saturating_add(dropped);
    }

    /// Log events dropped since the last call.
    pub fn log_events_dropped(&self, n: u64) {
        self.shared.prometheus.log_events_dropped(n);
        let mut state = self.state();
        state.logs_reported = true;
        state.interval.log.events_dropped = state.interval.log.events_dropped.saturating_add(n);
    }

    /// The Prometheus text exposition of the totals since the start, for
    /// `/metrics` (Content-Type [`PROMETHEUS_CONTENT_TYPE`]).
    pub fn render_prometheus(&self) -> String {
        self.shared.prometheus.render()
    }

    /// Ends the current interval: its data stamped `at`, with the gauges
    /// and `host`; the next interval starts empty.
    fn close_interval(&self, at: SystemTime, host: Option<HostSample>) -> Vec<Datum> {
        if let Some(host) = &host {
            self.shared.prometheus.host(host);
        }
        let (interval, gauges) = {
            let mut state = self.state();
            let gauges = Gauges {
                slots: state.slots,
                host,
                logs: state.logs_reported,
                intervals_dropped: std::mem::take(&mut state.intervals_dropped),
            };
            (std::mem::take(&mut state.interval), gauges)
        };
        if interval.tags_dropped() > 0 {
            tracing::warn!(
                jobs = interval.tags_dropped(),
                max_series = MAX_TAGGED_SERIES,
                "too many distinct tag values in one metrics interval; some jobs were counted without their tag dimensions"
            );
        }
        interval.into_data(&self.shared.base, at, &gauges)
    }

    /// Counts intervals dropped unsent (published with the next interval).
    fn intervals_dropped(&self, n: u64) {
        self.shared.prometheus.intervals_dropped(n);
        let mut state = self.state();
        state.intervals_dropped = state.intervals_dropped.saturating_add(n);
    }

    /// Counts data CloudWatch refused for good.
    fn data_refused(&self, n: u64) {
        self.shared.prometheus.data_refused(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MetricsSettings {
        MetricsSettings {
            namespace: "Batchly/Test".to_string(),
            interval: Duration::from_secs(60),
            instance_dimension: false,
            tag_dimensions: vec!["team".to_string()],
            group: None,
            instance_id: "i-0123456789abcdef0".to_string(),
            disk_path: PathBuf::from("/"),
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn end(metrics: &Metrics, tags: &BTreeMap<String, String>) {
        metrics.job_ended(&JobEnded {
            queue: "jobs",
            outcome: EventType::Succeeded,
            reason: Reason::Completed,
            duration: Some(Duration::from_millis(1_500)),
            queue_wait: None,
            tags,
        });
    }

    fn dimension_names(datum: &Datum) -> Vec<&str> {
        datum.dimensions.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn instance_id_is_no_dimension_by_default_and_on_every_metric_when_opted_in() {
        let metrics = Metrics::new(settings());
        end(&metrics, &tags(&[]));
        metrics.slots(4, 1);
        let data = metrics.close_interval(SystemTime::now(), None);
        assert!(!data.is_empty());
        for datum in &data {
            assert!(
                !dimension_names(datum).contains(&DIMENSION_INSTANCE),
                "{datum:?}"
            );
        }
        let metrics = Metrics::new(MetricsSettings {
            instance_dimension: true,
            ..settings()
        });
        end(&metrics, &tags(&[]));
        metrics.slots(4, 1);
        for datum in metrics.close_interval(SystemTime::now(), None) {
            assert!(
                datum.dimensions.contains(&(
                    DIMENSION_INSTANCE.to_string(),
                    "i-0123456789abcdef0".to_string()
                )),
                "{datum:?}"
            );
        }
    }

    #[test]
    fn the_group_is_a_dimension_of_every_metric_when_known() {
        let metrics = Metrics::new(MetricsSettings {
            group: Some("workers-asg".to_string()),
            ..settings()
        });
        end(&metrics, &tags(&[]));
        metrics.slots(2, 2);
        metrics.sqs_error("jobs");
        let data = metrics.close_interval(SystemTime::now(), None);
        assert_eq!(
            data.len(),
            6,
            "Jobs, JobDuration, SqsErrors and three slot gauges: {data:?}"
        );
        for datum in &data {
            assert_eq!(
                datum.dimensions.first(),
                Some(&(DIMENSION_GROUP.to_string(), "workers-asg".to_string()))
            );
        }
    }

    #[test]
    fn only_configured_tag_keys_become_dimensions_and_a_missing_tag_is_no_dimension() {
        let metrics = Metrics::new(settings());
        end(&metrics, &tags(&[("team", "risk"), ("owner", "ana")]));
        end(&metrics, &tags(&[("owner", "bo")]));
        let data = metrics.close_interval(SystemTime::now(), None);
        let mut jobs: Vec<Vec<(String, String)>> = data
            .iter()
            .filter(|d| d.name == "Jobs")
            .map(|d| d.dimensions.clone())
            .collect();
        jobs.sort();
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        assert_eq!(
            jobs,
            [
                vec![
                    pair("Queue", "jobs"),
                    pair("Outcome", "succeeded"),
                    pair("Reason", "completed")
                ],
                vec![
                    pair("Queue", "jobs"),
                    pair("Outcome", "succeeded"),
                    pair("Reason", "completed"),
                    pair("team", "risk")
                ],
            ]
        );
        assert!(data.iter().all(|d| !dimension_names(d).contains(&"owner")));
    }

    #[test]
    fn tag_dimensions_are_cut_to_what_cloudwatch_allows_per_metric() {
        let metrics = Metrics::new(MetricsSettings {
            group: Some("g".to_string()),
            instance_dimension: true,
            tag_dimensions: (0..40).map(|n| format!("t{n}")).collect(),
            ..settings()
        });
        let all: BTreeMap<String, String> = (0..40)
            .map(|n| (format!("t{n}"), "v".to_string()))
            .collect();
        end(&metrics, &all);
        let data = metrics.close_interval(SystemTime::now(), None);
        let jobs = data
            .iter()
            .find(|d| d.name == "Jobs")
            .expect("a Jobs datum");
        assert_eq!(jobs.dimensions.len(), MAX_DIMENSIONS);
        assert!(data.iter().all(|d| d.dimensions.len() <= MAX_DIMENSIONS));
    }

    #[test]
    fn an_interval_once_closed_starts_again_from_nothing_but_gauges_stay() {
        let metrics = Metrics::new(settings());
        end(&metrics, &tags(&[]));
        metrics.slots(3, 1);
        metrics.log_bytes(100, 20, 0);
        let first = metrics.close_interval(SystemTime::now(), None);
        assert!(first.iter().any(|d| d.name == "Jobs"));
        let second = metrics.close_interval(SystemTime::now(), None);
        let names: Vec<&str> = second.iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            [
                "JobSlots",
                "RunningJobs",
                "FreeSlots",
                "LogBytesShipped",
                "LogBytesSpooled",
                "LogBytesDropped",
                "LogEventsDropped"
            ]
        );
        let shipped = second.iter().find(|d| d.name == "LogBytesShipped");
        assert_eq!(shipped.map(|d| &d.value), Some(&Value::Single(0.0)));
    }

    #[test]
    fn reasons_are_short_fixed_names_for_every_ending() {
        let cases = [
            (Ending::Exited(0), "completed"),
            (Ending::Exited(75), "exit_75"),
            (Ending::Exited(3), "exit"),
            (Ending::Signaled(9), "signal"),
            (Ending::JobFault("no such command".into()), "job_fault"),
            (
                Ending::TimedOut {
                    after: Duration::from_secs(1),
                    signal: Some(9),
                },
                "timeout",
            ),
            (
                Ending::Interrupted {
                    drain_reason: "spot".into(),
                    code: None,
                    signal: Some(15),
                },
                "drain",
            ),
            (
                Ending::Interrupted {
                    drain_reason: "spot".into(),
                    code: Some(0),
                    signal: None,
                },
                "completed",
            ),
            (Ending::AgentFault("disk full".into()), "agent_fault"),
            (
                Ending::OutOfMemory {
                    code: None,
                    signal: Some(9),
                },
                "oom",
            ),
            (Ending::Cancelled { requeue: true }, "cancelled"),
        ];
        for (ending, want) in cases {
            assert_eq!(Reason::of_ending(&ending).as_str(), want, "{ending:?}");
        }
        assert_eq!(
            Reason::Rejected(RejectReason::BadSignature).as_str(),
            "bad_signature"
        );
        assert_eq!(outcome_name(EventType::TimedOut), "timed_out");
    }

    #[test]
    fn prometheus_text_counts_jobs_by_queue_outcome_and_reason() {
        let metrics = Metrics::new(settings());
        end(&metrics, &tags(&[]));
        end(&metrics, &tags(&[]));
        metrics.slots(8, 2);
        let text = metrics.render_prometheus();
        assert!(
            text.contains(
                "batchly_jobs_total{queue=\"jobs\",outcome=\"succeeded\",reason=\"completed\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("batchly_job_slots 8\n"), "{text}");
        assert!(text.contains("batchly_jobs_running 2\n"), "{text}");
        assert!(
            text.contains("batchly_job_duration_seconds_sum{queue=\"jobs\"} 3.0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
