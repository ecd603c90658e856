//! One interval's aggregate: what happened since the last publish, kept as
//! counts and distributions keyed by dimension set, so that a thousand jobs
//! make one datum per metric and dimension set, not a thousand. Pure: the
//! caller supplies the time and the gauges.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use super::cut::{Datum, Unit, Value};

/// Most distinct job dimension sets (queue and tag values) one interval
/// keeps with their tags. Tag values come from job specs, so without a
/// bound one odd tag could make a series per job (and a metric billed per
/// job); past it a job is counted without its tag dimensions, and that is
/// counted too (`JobTagDimensionsDropped`).
pub const MAX_TAGGED_SERIES: usize = 200;
/// Significant decimal digits a duration keeps in a distribution (to the
/// millisecond below one second): at most 0.5 % off, and a bounded number
/// of distinct values however many jobs end, so a busy interval stays a
/// few data.
pub const SIGNIFICANT_DIGITS: u32 = 3;

/// Which jobs a series counts: the queue and the configured tags' values.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct JobKey {
    pub queue: String,
    /// `(tag key, value)` in `metrics.tag_dimensions` order.
    pub tags: Vec<(String, String)>,
}

/// Durations in milliseconds, rounded to [`SIGNIFICANT_DIGITS`], with how
/// often each occurred.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Distribution {
    counts: BTreeMap<u64, u64>,
}

impl Distribution {
    pub fn record(&mut self, duration: Duration) {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        *self.counts.entry(round_significant(ms)).or_default() += 1;
    }

    fn value(&self) -> Value {
        Value::Distribution(
            self.counts
                .iter()
                .map(|(&ms, &count)| (ms as f64, count as f64))
                .collect(),
        )
    }
}

/// `ms` rounded (half up) to [`SIGNIFICANT_DIGITS`] significant digits.
fn round_significant(ms: u64) -> u64 {
    let limit = 10u64.pow(SIGNIFICANT_DIGITS);
    let mut step = 1u64;
    while ms / step >= limit {
        step *= 10;
    }
    ms.saturating_add(step / 2) / step * step
}

/// Bytes and events the log shipper reported during the interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCounts {
    pub shipped: u64,
    pub spooled: u64,
    pub dropped: u64,
    pub events_dropped: u64,
}

/// Values that are read at the end of an interval rather than added up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gauges {
    /// `(total, busy)` job slots, once the supervisor reported them.
    pub slots: Option<(usize, usize)>,
    pub host: Option<HostSample>,
    /// Whether a log shipper reports to these metrics (only then are its
    /// counters published, zero included).
    pub logs: bool,
    /// Earlier intervals dropped unsent since the last interval closed.
    pub intervals_dropped: u64,
}

/// Host utilisation, each in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostSample {
    pub cpu: f64,
    pub memory: f64,
    /// Of the filesystem holding the configured path; `None` if it was not
    /// found.
    pub disk: Option<f64>,
}

/// The names of the agent's own dimensions.
pub const DIMENSION_QUEUE: &str = "Queue";
pub const DIMENSION_OUTCOME: &str = "Outcome";
pub const DIMENSION_REASON: &str = "Reason";

/// One interval's aggregate.
#[derive(Debug, Default)]
pub struct Interval {
    jobs: BTreeMap<(JobKey, &'static str, &'static str), u64>,
    durations: BTreeMap<JobKey, Distribution>,
    waits: BTreeMap<JobKey, Distribution>,
    sqs_errors: BTreeMap<String, u64>,
    pub log: LogCounts,
    /// The series kept with their tags, at most [`MAX_TAGGED_SERIES`].
    tagged: BTreeSet<JobKey>,
    tags_dropped: u64,
}

impl Interval {
    /// Counts one ended attempt. `key` loses its tags when the interval
    /// holds [`MAX_TAGGED_SERIES`] tagged series already.
    pub fn job_ended(
        &mut self,
        mut key: JobKey,
        outcome: &'static str,
        reason: &'static str,
        duration: Option<Duration>,
        queue_wait: Option<Duration>,
    ) {
        if !key.tags.is_empty() && !self.tagged.contains(&key) {
            if self.tagged.len() < MAX_TAGGED_SERIES {
                self.tagged.insert(key.clone());
            } else {
                key.tags.clear();
                self.tags_dropped += 1;
            }
        }
        if let Some(duration) = duration {
            self.durations
                .entry(key.clone())
                .or_default()
                .record(duration);
        }
        if let Some(wait) = queue_wait {
            self.waits.entry(key.clone()).or_default().record(wait);
        }
        *self.jobs.entry((key, outcome, reason)).or_default() += 1;
    }

    pub fn sqs_error(&mut self, queue: &str) {
        *self.sqs_errors.entry(queue.to_string()).or_default() += 1;
    }

    /// Jobs counted without their tag dimensions because of
    /// [`MAX_TAGGED_SERIES`].
    pub fn tags_dropped(&self) -> u64 {
        self.tags_dropped
    }

    /// The interval as CloudWatch data stamped `at`, every datum carrying
    /// `base` (the instance's dimensions) before its own.
    pub fn into_data(
        self,
        base: &[(String, String)],
        at: SystemTime,
        gauges: &Gauges,
    ) -> Vec<Datum> {
        let datum = |name: &'static str, unit: Unit, own: Vec<(String, String)>, value: Value| {
            let mut dimensions = base.to_vec();
            dimensions.extend(own);
            Datum {
                name,
                unit,
                dimensions,
                timestamp: at,
                value,
            }
        };
        let job_dimensions = |key: &JobKey| {
            let mut own = vec![(DIMENSION_QUEUE.to_string(), key.queue.clone())];
            own.extend(key.tags.iter().cloned());
            own
        };
        let mut data = Vec::new();
        for ((key, outcome, reason), count) in &self.jobs {
            let mut own = vec![
                (DIMENSION_QUEUE.to_string(), key.queue.clone()),
                (DIMENSION_OUTCOME.to_string(), (*outcome).to_string()),
                (DIMENSION_REASON.to_string(), (*reason).to_string()),
            ];
            own.extend(key.tags.iter().cloned());
            data.push(datum(
                "Jobs",
                Unit::Count,
                own,
                Value::Single(*count as f64),
            ));
        }
        for (name, series) in [("JobDuration", &self.durations), ("QueueWait", &self.waits)] {
            for (key, distribution) in series {
                data.push(datum(
                    name,
                    Unit::Milliseconds,
                    job_dimensions(key),
                    distribution.value(),
                ));
            }
        }
        for (queue, count) in &self.sqs_errors {
            let own = vec![(DIMENSION_QUEUE.to_string(), queue.clone())];
            data.push(datum(
                "SqsErrors",
                Unit::Count,
                own,
                Value::Single(*count as f64),
            ));
        }
        let mut plain = |name: &'static str, unit: Unit, value: f64| {
            data.push(datum(name, unit, Vec::new(), Value::Single(value)));
        };
        if let Some((total, busy)) = gauges.slots {
            plain("JobSlots", Unit::Count, total as f64);
            plain("RunningJobs", Unit::Count, busy as f64);
            plain("FreeSlots", Unit::Count, total.saturating_sub(busy) as f64);
        }
        if gauges.logs {
            plain("LogBytesShipped", Unit::Bytes, self.log.shipped as f64);
            plain("LogBytesSpooled", Unit::Bytes, self.log.spooled as f64);
            plain("LogBytesDropped", Unit::Bytes, self.log.dropped as f64);
            plain(
                "LogEventsDropped",
                Unit::Count,
                self.log.events_dropped as f64,
            );
        }
        if let Some(host) = gauges.host {
            plain("CpuUtilization", Unit::Percent, host.cpu);
            plain("MemoryUtilization", Unit::Percent, host.memory);
            if let Some(disk) = host.disk {
                plain("DiskUtilization", Unit::Percent, disk);
            }
        }
        if self.tags_dropped > 0 {
            plain(
                "JobTagDimensionsDropped",
                Unit::Count,
                self.tags_dropped as f64,
            );
        }
        if gauges.intervals_dropped > 0 {
            plain(
                "MetricIntervalsDropped",
                Unit::Count,
                gauges.intervals_dropped as f64,
            );
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(queue: &str, tags: &[(&str, &str)]) -> JobKey {
        JobKey {
            queue: queue.to_string(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn named<'a>(data: &'a [Datum], name: &str) -> Vec<&'a Datum> {
        data.iter().filter(|d| d.name == name).collect()
    }

    #[test]
    fn durations_keep_three_significant_digits() {
        let rounded: Vec<u64> = [0, 7, 999, 1_000, 1_234, 1_235, 99_949, 99_950, 3_600_000]
            .into_iter()
            .map(round_significant)
            .collect();
        assert_eq!(
            rounded,
            [0, 7, 999, 1_000, 1_230, 1_240, 99_900, 100_000, 3_600_000]
        );
        assert_eq!(
            round_significant(u64::MAX),
            18_400_000_000_000_000_000,
            "no overflow"
        );
    }

    #[test]
    fn a_thousand_jobs_are_one_count_datum_and_one_duration_datum() {
        let mut interval = Interval::default();
        for n in 0..1_000u64 {
            interval.job_ended(
                key("jobs", &[]),
                "succeeded",
                "completed",
                Some(ms(1_000 + (n % 3) * 500)),
                Some(ms(20)),
            );
        }
        let data = interval.into_data(&[], SystemTime::UNIX_EPOCH, &Gauges::default());
        let jobs = named(&data, "Jobs");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].value, Value::Single(1_000.0));
        let durations = named(&data, "JobDuration");
        assert_eq!(durations.len(), 1);
        assert_eq!(
            durations[0].value,
            Value::Distribution(vec![(1_000.0, 334.0), (1_500.0, 333.0), (2_000.0, 333.0)])
        );
        assert_eq!(
            named(&data, "QueueWait")[0].value,
            Value::Distribution(vec![(20.0, 1_000.0)])
        );
        assert_eq!(data.len(), 3, "{data:?}");
    }

    #[test]
    fn distribution_gives_the_right_count_sum_minimum_and_maximum() {
        let mut interval = Interval::default();
        for d in [250, 1_200, 250, 40, 9_000] {
            interval.job_ended(key("q", &[]), "failed", "exit", Some(ms(d)), None);
        }
        let data = interval.into_data(&[], SystemTime::UNIX_EPOCH, &Gauges::default());
        let Value::Distribution(pairs) = &named(&data, "JobDuration")[0].value else {
            panic!("a distribution")
        };
        let count: f64 = pairs.iter().map(|(_, c)| c).sum();
        let sum: f64 = pairs.iter().map(|(v, c)| v * c).sum();
        let min = pairs.first().map(|(v, _)| *v);
        let max = pairs.last().map(|(v, _)| *v);
        assert_eq!(
            (count, sum, min, max),
            (5.0, 10_740.0, Some(40.0), Some(9_000.0))
        );
        assert!(named(&data, "QueueWait").is_empty(), "no wait was known");
    }

    #[test]
    fn counts_are_kept_apart_by_queue_outcome_and_reason() {
        let mut interval = Interval::default();
        interval.job_ended(key("a", &[]), "succeeded", "completed", Some(ms(1)), None);
        interval.job_ended(key("a", &[]), "failed", "oom", Some(ms(1)), None);
        interval.job_ended(key("a", &[]), "failed", "oom", Some(ms(1)), None);
        interval.job_ended(key("b", &[]), "rejected", "bad_signature", None, None);
        let data = interval.into_data(&[], SystemTime::UNIX_EPOCH, &Gauges::default());
        let mut counts: Vec<(String, f64)> = named(&data, "Jobs")
            .iter()
            .map(|d| {
                let dims: Vec<&str> = d.dimensions.iter().map(|(_, v)| v.as_str()).collect();
                let Value::Single(n) = d.value else {
                    panic!("a count")
                };
                (dims.join("/"), n)
            })
            .collect();
        counts.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            counts,
            [
                ("a/failed/oom".to_string(), 2.0),
                ("a/succeeded/completed".to_string(), 1.0),
                ("b/rejected/bad_signature".to_string(), 1.0),
            ]
        );
        assert_eq!(
            named(&data, "JobDuration").len(),
            1,
            "b's rejection never ran"
        );
    }

    #[test]
    fn past_the_series_bound_jobs_lose_their_tags_and_that_is_counted() {
        let mut interval = Interval::default();
        for n in 0..MAX_TAGGED_SERIES + 50 {
            let run = format!("run-{n}");
            interval.job_ended(
                key("q", &[("run", &run)]),
                "succeeded",
                "completed",
                Some(ms(5)),
                None,
            );
        }
        // A series already kept goes on being counted with its tags.
        interval.job_ended(
            key("q", &[("run", "run-0")]),
            "succeeded",
            "completed",
            Some(ms(5)),
            None,
        );
        assert_eq!(interval.tags_dropped(), 50);
        let data = interval.into_data(&[], SystemTime::UNIX_EPOCH, &Gauges::default());
        let jobs = named(&data, "Jobs");
        assert_eq!(
            jobs.len(),
            MAX_TAGGED_SERIES + 1,
            "the bound, plus one untagged series"
        );
        let untagged: Vec<&&Datum> = jobs.iter().filter(|d| d.dimensions.len() == 3).collect();
        assert_eq!(untagged[0].value, Value::Single(50.0));
        let first = jobs.iter().find(|d| {
            d.dimensions
                .contains(&("run".to_string(), "run-0".to_string()))
        });
        assert_eq!(first.map(|d| &d.value), Some(&Value::Single(2.0)));
        assert_eq!(
            named(&data, "JobTagDimensionsDropped")[0].value,
            Value::Single(50.0)
        );
    }

    #[test]
    fn gauges_slots_logs_and_host_become_plain_data_with_the_base_dimensions() {
        let mut interval = Interval::default();
        interval.sqs_error("jobs");
        interval.sqs_error("jobs");
        interval.log.shipped = 4_096;
        let base = vec![("AutoScalingGroupName".to_string(), "workers".to_string())];
        let gauges = Gauges {
            slots: Some((8, 3)),
            host: Some(HostSample {
                cpu: 12.5,
                memory: 40.0,
                disk: None,
            }),
            logs: true,
            intervals_dropped: 2,
        };
        let data = interval.into_data(&base, SystemTime::UNIX_EPOCH, &gauges);
        let value = |name: &str| named(&data, name).first().map(|d| d.value.clone());
        assert_eq!(value("JobSlots"), Some(Value::Single(8.0)));
        assert_eq!(value("RunningJobs"), Some(Value::Single(3.0)));
        assert_eq!(value("FreeSlots"), Some(Value::Single(5.0)));
        assert_eq!(value("SqsErrors"), Some(Value::Single(2.0)));
        assert_eq!(value("LogBytesShipped"), Some(Value::Single(4_096.0)));
        assert_eq!(value("LogEventsDropped"), Some(Value::Single(0.0)));
        assert_eq!(value("CpuUtilization"), Some(Value::Single(12.5)));
        assert_eq!(
            value("DiskUtilization"),
            None,
            "disk not found: not made up"
        );
        assert_eq!(value("MetricIntervalsDropped"), Some(Value::Single(2.0)));
        for d in &data {
            assert_eq!(d.dimensions.first(), base.first(), "{}", d.name);
        }
        let quiet = Interval::default().into_data(&[], SystemTime::UNIX_EPOCH, &Gauges::default());
        assert!(
            quiet.is_empty(),
            "nothing reported, nothing published: {quiet:?}"
        );
    }
}
