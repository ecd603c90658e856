//! Sends each closed interval to CloudWatch with `PutMetricData`, in as few
//! requests as `cut` allows, through the agent's one retry policy with a
//! deadline per call. What CloudWatch does not take in time waits in a
//! bounded buffer for the next interval: the newest
//! [`MAX_PENDING_INTERVALS`] are kept, an older one is dropped, counted
//! (`MetricIntervalsDropped`) and logged. A request CloudWatch refuses for
//! good (a permanent error) is dropped, counted and logged, never retried.
//! Nothing here can reach a job: a failed send costs only metrics.
//!
//! The drain's flush closes the partial interval and sends what is left
//! before the agent exits; it and the periodic send share one lock, so a
//! request is never sent twice by the two.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use aws_smithy_types::DateTime;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::cut::{cut, Datum, Unit, Value};
use super::host::Host;
use super::Metrics;
use crate::retry::{ErrorClass, GaveUp};
use crate::telemetry::{Flush, Flushed};

/// Closed intervals kept while CloudWatch does not take them: an hour at
/// the default interval of a minute.
pub const MAX_PENDING_INTERVALS: usize = 60;
/// The longest one `PutMetricData` may take, retries included.
const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// What the drain keeps for the metrics' last send.
pub const FLUSH_RESERVE: Duration = Duration::from_secs(2);

/// One interval's requests, not yet all taken by CloudWatch.
#[derive(Debug)]
struct PendingInterval {
    requests: VecDeque<Vec<Datum>>,
}

/// The buffer of unsent intervals, oldest first, at most `max`.
#[derive(Debug)]
struct Pending {
    intervals: VecDeque<PendingInterval>,
    max: usize,
}

/// An interval dropped to make room: how many data it still held.
#[derive(Debug, PartialEq, Eq)]
struct DroppedInterval {
    data: usize,
}

impl Pending {
    fn new(max: usize) -> Pending {
        Pending {
            intervals: VecDeque::new(),
            max,
        }
    }

    /// Adds an interval's requests; drops the oldest interval when the
    /// buffer is full. An interval with nothing to send is not kept.
    fn push(&mut self, requests: Vec<Vec<Datum>>) -> Option<DroppedInterval> {
        if requests.is_empty() {
            return None;
        }
        let dropped = if self.intervals.len() >= self.max {
            self.intervals.pop_front().map(|old| DroppedInterval {
                data: old.requests.iter().map(Vec::len).sum(),
            })
        } else {
            None
        };
        self.intervals.push_back(PendingInterval {
            requests: requests.into(),
        });
        dropped
    }

    /// The oldest request not yet taken.
    fn front(&self) -> Option<&Vec<Datum>> {
        self.intervals.front().and_then(|i| i.requests.front())
    }

    /// Forgets the oldest request (taken, or refused for good).
    fn pop_front(&mut self) {
        if let Some(interval) = self.intervals.front_mut() {
            interval.requests.pop_front();
            if interval.requests.is_empty() {
                self.intervals.pop_front();
            }
        }
    }

    fn data(&self) -> u64 {
        self.intervals
            .iter()
            .flat_map(|i| i.requests.iter())
            .map(|r| r.len() as u64)
            .sum()
    }
}

/// Why one `PutMetricData` failed, and whether to try again.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
struct PutError {
    class: ErrorClass,
    text: String,
}

#[derive(Debug)]
struct Shared {
    metrics: Metrics,
    client: aws_sdk_cloudwatch::Client,
    host: Host,
    pending: tokio::sync::Mutex<Pending>,
    /// Data in `pending`, readable while a send holds the lock.
    pending_data: AtomicU64,
}

/// Publishes [`Metrics`] to CloudWatch: `run` once per agent, and give a
/// clone to the drain as its [`Flush`]. Clones share one buffer.
#[derive(Debug, Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    pub(super) fn new(metrics: Metrics, client: aws_sdk_cloudwatch::Client) -> Publisher {
        let host = Host::new(metrics.settings().disk_path.clone());
        Publisher {
            shared: Arc::new(Shared {
                metrics,
                client,
                host,
                pending: tokio::sync::Mutex::new(Pending::new(MAX_PENDING_INTERVALS)),
                pending_data: AtomicU64::new(0),
            }),
        }
    }

    /// Closes and sends an interval every `metrics.interval_s` until
    /// `stop`. A send in progress at `stop` is abandoned (its data stay
    /// for the flush).
    pub async fn run(self, stop: CancellationToken) {
        let period = self.shared.metrics.settings().interval;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.publish_interval(Instant::now() + period) => {}
            }
        }
    }

    /// Closes the current interval (with a host sample) and sends what is
    /// pending until `deadline`.
    async fn publish_interval(&self, deadline: Instant) {
        let host = self.shared.host.sample().await;
        let mut pending = self.shared.pending.lock().await;
        self.close_into(&mut pending, host);
        self.send_pending(&mut pending, deadline).await;
    }

    fn close_into(&self, pending: &mut Pending, host: Option<super::HostSample>) {
        let metrics = &self.shared.metrics;
        let data = metrics.close_interval(SystemTime::now(), host);
        let requests = cut(&metrics.settings().namespace, data);
        if let Some(dropped) = pending.push(requests) {
            metrics.intervals_dropped(1);
            tracing::warn!(
                data = dropped.data,
                kept_intervals = MAX_PENDING_INTERVALS,
                "CloudWatch has not taken the metrics for too long; dropped the oldest unsent interval"
            );
        }
        self.shared
            .pending_data
            .store(pending.data(), Ordering::Relaxed);
    }

    /// Sends pending requests, oldest first, until all are sent, one fails
    /// for now (kept for later) or `deadline`. Returns the data sent.
    async fn send_pending(&self, pending: &mut Pending, deadline: Instant) -> u64 {
        let mut sent = 0u64;
        while let Some(request) = pending.front() {
            let count = request.len() as u64;
            let call_deadline = deadline.min(Instant::now() + CALL_DEADLINE);
            match self.put(request, call_deadline).await {
                Ok(()) => {
                    sent += count;
                    pending.pop_front();
                }
                Err(GaveUp::Final(_, e)) => {
                    self.shared.metrics.data_refused(count);
                    tracing::error!(data = count, error = %e, "CloudWatch refused metrics; dropped them");
                    pending.pop_front();
                }
                Err(GaveUp::Deadline(e)) => {
                    let error = e
                        .map(|e| e.text)
                        .unwrap_or_else(|| "no answer in time".to_string());
                    tracing::warn!(pending = pending.data(), %error, "cannot send metrics now; kept for the next interval");
                    break;
                }
            }
        }
        self.shared
            .pending_data
            .store(pending.data(), Ordering::Relaxed);
        sent
    }

    async fn put(&self, request: &[Datum], deadline: Instant) -> Result<(), GaveUp<PutError>> {
        let namespace = &self.shared.metrics.settings().namespace;
        let data: Vec<MetricDatum> = request.iter().map(sdk_datum).collect();
        crate::retry::retry(
            "PutMetricData",
            deadline,
            |e: &PutError| e.class,
            || async {
                self.shared
                    .client
                    .put_metric_data()
                    .namespace(namespace)
                    .set_metric_data(Some(data.clone()))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| PutError {
                        class: crate::retry::classify(&e),
                        text: crate::aws_errors::describe(&e),
                    })
            },
        )
        .await
    }
}

impl Flush for Publisher {
    fn flush_reserve(&self) -> Duration {
        FLUSH_RESERVE
    }

    /// Closes the partial interval (without a host sample: no time for it)
    /// and sends everything pending by `deadline`.
    fn flush(
        &self,
        deadline: std::time::Instant,
    ) -> Pin<Box<dyn Future<Output = Flushed> + Send + '_>> {
        Box::pin(async move {
            let deadline = Instant::from_std(deadline);
            let Ok(mut pending) =
                tokio::time::timeout_at(deadline, self.shared.pending.lock()).await
            else {
                return Flushed {
                    shipped: 0,
                    left: self.shared.pending_data.load(Ordering::Relaxed),
                };
            };
            self.close_into(&mut pending, None);
            let shipped = self.send_pending(&mut pending, deadline).await;
            Flushed {
                shipped,
                left: pending.data(),
            }
        })
    }
}

/// The SDK's form of a datum.
fn sdk_datum(datum: &Datum) -> MetricDatum {
    let unit = match datum.unit {
        Unit::Count => StandardUnit::Count,
        Unit::Milliseconds => StandardUnit::Milliseconds,
        Unit::Bytes => StandardUnit::Bytes,
        Unit::Percent => StandardUnit::Percent,
    };
    let dimensions = datum
        .dimensions
        .iter()
        .map(|(name, value)| Dimension::builder().name(name).value(value).build())
        .collect();
    let builder = MetricDatum::builder()
        .metric_name(datum.name)
        .unit(unit)
        .timestamp(DateTime::from(datum.timestamp))
        .set_dimensions(Some(dimensions));
    match &datum.value {
        Value::Single(value) => builder.value(*value),
        Value::Distribution(pairs) => builder
            .set_values(Some(pairs.iter().map(|(v, _)| *v).collect()))
            .set_counts(Some(pairs.iter().map(|(_, c)| *c).collect())),
    }
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: usize) -> Vec<Datum> {
        (0..n)
            .map(|i| Datum {
                name: "Jobs",
                unit: Unit::Count,
                dimensions: Vec::new(),
                timestamp: SystemTime::UNIX_EPOCH,
                value: Value::Single(i as f64),
            })
            .collect()
    }

    #[test]
    fn a_full_buffer_keeps_the_newest_intervals_and_says_what_it_dropped() {
        let mut pending = Pending::new(3);
        let mut dropped = Vec::new();
        for n in 1..=5 {
            dropped.extend(pending.push(vec![request(n), request(1)]));
        }
        assert_eq!(
            dropped,
            [DroppedInterval { data: 2 }, DroppedInterval { data: 3 }],
            "the two oldest intervals, each counted with its data"
        );
        assert_eq!(pending.intervals.len(), 3);
        assert_eq!(pending.data(), (3 + 1) + (4 + 1) + (5 + 1));
        assert_eq!(pending.front().map(Vec::len), Some(3), "oldest kept first");
    }

    #[test]
    fn sent_requests_leave_the_buffer_oldest_first_and_empty_intervals_are_not_kept() {
        let mut pending = Pending::new(MAX_PENDING_INTERVALS);
        assert_eq!(pending.push(Vec::new()), None);
        assert!(pending.front().is_none());
        pending.push(vec![request(2), request(3)]);
        pending.push(vec![request(4)]);
        let mut order = Vec::new();
        while let Some(front) = pending.front() {
            order.push(front.len());
            pending.pop_front();
        }
        assert_eq!(order, [2, 3, 4]);
        assert_eq!(pending.data(), 0);
        assert!(pending.intervals.is_empty());
    }

    #[test]
    fn a_distribution_becomes_values_and_counts_and_the_dimensions_are_kept() {
        let datum = Datum {
            name: "JobDuration",
            unit: Unit::Milliseconds,
            dimensions: vec![("Queue".to_string(), "jobs".to_string())],
            timestamp: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            value: Value::Distribution(vec![(100.0, 2.0), (250.0, 1.0)]),
        };
        let sdk = sdk_datum(&datum);
        assert_eq!(sdk.metric_name(), Some("JobDuration"));
        assert_eq!(sdk.values(), [100.0, 250.0]);
        assert_eq!(sdk.counts(), [2.0, 1.0]);
        assert_eq!(sdk.value(), None);
        assert_eq!(sdk.unit(), Some(&StandardUnit::Milliseconds));
        assert_eq!(sdk.timestamp().map(|t| t.secs()), Some(1_700_000_000));
        let dims: Vec<(Option<&str>, Option<&str>)> = sdk
            .dimensions()
            .iter()
            .map(|d| (d.name(), d.value()))
            .collect();
        assert_eq!(dims, [(Some("Queue"), Some("jobs"))]);
    }
}
