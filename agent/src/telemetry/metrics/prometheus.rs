//! The same counters for the local `/metrics` endpoint, in Prometheus'
//! registry and text exposition (OpenMetrics) from `prometheus-client`:
//! totals since the agent started, where CloudWatch gets per-interval
//! aggregates. Job tags are not labels here: a scrape has no bound on
//! series like `metrics.tag_dimensions` gives CloudWatch.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::interval::HostSample;

/// Every metric's name starts `batchly_`.
const PREFIX: &str = "batchly";
/// The smallest duration bucket's upper bound, in seconds.
const DURATION_BUCKET_START_S: f64 = 0.1;
/// Duration buckets double from `DURATION_BUCKET_START_S`: 20 of them
/// reach about 14.5 hours.
const DURATION_BUCKETS: u16 = 20;

/// The Content-Type of [`Prometheus::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    queue: String,
    outcome: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        DURATION_BUCKET_START_S,
        2.0,
        DURATION_BUCKETS,
    ))
}

/// The registry and a handle on every metric in it.
#[derive(Debug)]
pub struct Prometheus {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    job_duration: Family<QueueLabels, Histogram, fn() -> Histogram>,
    queue_wait: Family<QueueLabels, Histogram, fn() -> Histogram>,
    slots: Gauge,
    running: Gauge,
    sqs_errors: Family<QueueLabels, Counter>,
    log_shipped: Counter,
    log_spooled: Counter,
    log_dropped: Counter,
    log_events_dropped: Counter,
    intervals_dropped: Counter,
    data_refused: Counter,
    cpu: Gauge<f64, AtomicU64>,
    memory: Gauge<f64, AtomicU64>,
    disk: Gauge<f64, AtomicU64>,
}

impl Prometheus {
    pub fn new() -> Prometheus {
        let mut registry = Registry::with_prefix(PREFIX);
        let jobs = Family::<JobLabels, Counter>::default();
        let job_duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let queue_wait = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let slots = Gauge::default();
        let running = Gauge::default();
        let sqs_errors = Family::<QueueLabels, Counter>::default();
        let (log_shipped, log_spooled, log_dropped) =
            (Counter::default(), Counter::default(), Counter::default());
        let log_events_dropped = Counter::default();
        let intervals_dropped = Counter::default();
        let data_refused = Counter::default();
        let (cpu, memory, disk) = (
            Gauge::<f64, AtomicU64>::default(),
            Gauge::<f64, AtomicU64>::default(),
            Gauge::<f64, AtomicU64>::default(),
        );
        registry.register(
            "jobs",
            "Job attempts ended, by queue, outcome and reason",
            jobs.clone(),
        );
        registry.register_with_unit(
            "job_duration",
            "How long job attempts ran",
            Unit::Seconds,
            job_duration.clone(),
        );
        registry.register_with_unit(
            "job_queue_wait",
            "How long jobs waited in their queue before an attempt began",
            Unit::Seconds,
            queue_wait.clone(),
        );
        registry.register("job_slots", "Job slots of this agent", slots.clone());
        registry.register("jobs_running", "Job slots in use", running.clone());
        registry.register(
            "sqs_errors",
            "SQS calls that failed, by queue",
            sqs_errors.clone(),
        );
        registry.register_with_unit(
            "log_shipped",
            "Log bytes shipped to CloudWatch Logs",
            Unit::Bytes,
            log_shipped.clone(),
        );
        registry.register_with_unit(
            "log_spooled",
            "Log bytes written to the disk spool",
            Unit::Bytes,
            log_spooled.clone(),
        );
        registry.register_with_unit(
            "log_dropped",
            "Log bytes dropped at a buffer or spool bound",
            Unit::Bytes,
            log_dropped.clone(),
        );
        registry.register(
            "log_events_dropped",
            "Log events dropped (too old, too far in the future, refused, or at a bound)",
            log_events_dropped.clone(),
        );
        registry.register(
            "metric_intervals_dropped",
            "Metric intervals CloudWatch did not take in time, dropped unsent",
            intervals_dropped.clone(),
        );
        registry.register(
            "metric_data_refused",
            "Metric data CloudWatch refused for good",
            data_refused.clone(),
        );
        registry.register(
            "host_cpu_utilization_percent",
            "Host CPU in use, over the last metrics interval",
            cpu.clone(),
        );
        registry.register(
            "host_memory_utilization_percent",
            "Host memory in use",
            memory.clone(),
        );
        registry.register(
            "host_disk_utilization_percent",
            "Space in use on the filesystem holding the jobs' work directory",
            disk.clone(),
        );
        Prometheus {
            registry,
            jobs,
            job_duration,
            queue_wait,
            slots,
            running,
            sqs_errors,
            log_shipped,
            log_spooled,
            log_dropped,
            log_events_dropped,
            intervals_dropped,
            data_refused,
            cpu,
            memory,
            disk,
        }
    }

    pub fn job_ended(
        &self,
        queue: &str,
        outcome: &str,
        reason: &str,
        duration: Option<std::time::Duration>,
        queue_wait: Option<std::time::Duration>,
    ) {
        let labels = JobLabels {
            queue: queue.to_string(),
            outcome: outcome.to_string(),
            reason: reason.to_string(),
        };
        self.jobs.get_or_create(&labels).inc();
        let queue = QueueLabels {
            queue: queue.to_string(),
        };
        if let Some(duration) = duration {
            self.job_duration
                .get_or_create(&queue)
                .observe(duration.as_secs_f64());
        }
        if let Some(wait) = queue_wait {
            self.queue_wait
                .get_or_create(&queue)
                .observe(wait.as_secs_f64());
        }
    }

    pub fn slots(&self, total: usize, busy: usize) {
        self.slots.set(i64::try_from(total).unwrap_or(i64::MAX));
        self.running.set(i64::try_from(busy).unwrap_or(i64::MAX));
    }

    pub fn sqs_error(&self, queue: &str) {
        self.sqs_errors
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .inc();
    }

    pub fn log_bytes(&self, shipped: u64, spooled: u64, dropped: u64) {
        self.log_shipped.inc_by(shipped);
        self.log_spooled.inc_by(spooled);
        self.log_dropped.inc_by(dropped);
    }

    pub fn log_events_dropped(&self, n: u64) {
        self.log_events_dropped.inc_by(n);
    }

    pub fn intervals_dropped(&self, n: u64) {
        self.intervals_dropped.inc_by(n);
    }

    pub fn data_refused(&self, n: u64) {
        self.data_refused.inc_by(n);
    }

    pub fn host(&self, sample: &HostSample) {
        self.cpu.set(sample.cpu);
        self.memory.set(sample.memory);
        if let Some(disk) = sample.disk {
            self.disk.set(disk);
        }
    }

    /// The registry as OpenMetrics text; empty (and logged) in the
    /// unexpected case that encoding fails, so a scrape never breaks the
    /// agent.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the Prometheus metrics");
            text.clear();
        }
        text
    }
}
