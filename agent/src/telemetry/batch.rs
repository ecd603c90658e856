//! CloudWatch Logs' `PutLogEvents` limits, each enforced here and nowhere
//! else: what one event may hold, what one batch may hold and span, and
//! which timestamps the service takes. A shipper partitions its events by
//! stream first (a batch is for one stream) and then fills each stream's
//! batches with [`Batch`] (or cuts a list with [`cut`]).
//!
//! Source for every limit: the `PutLogEvents` API reference. The event
//! size limit there is 1 MB now (it was 256 KB, and older documents and
//! servers may still say so); moto 5.2.5 checks no size at all, only the
//! order and the age of events.

/// Most bytes in one batch: the messages' UTF-8 plus `EVENT_OVERHEAD` per
/// event.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
/// What the service counts per event besides its message.
pub const EVENT_OVERHEAD: usize = 26;
/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Longest message of one event: one event alone must fit in a batch.
pub const MAX_EVENT_BYTES: usize = MAX_BATCH_BYTES - EVENT_OVERHEAD;
/// Longest time one batch may span, first event to last.
pub const MAX_BATCH_SPAN_MS: i64 = 24 * 3600 * 1000;
/// Events older than this are refused by the service.
pub const MAX_AGE_MS: i64 = 14 * 24 * 3600 * 1000;
/// Events further than this in the future are refused by the service.
pub const MAX_FUTURE_MS: i64 = 2 * 3600 * 1000;

/// Ends every piece of a split line but the last.
pub const CONTINUES: &str = " [continues]";
/// Begins every piece of a split line but the first.
pub const CONTINUED: &str = "[continued] ";

/// One log event: when it happened (ms since the Unix epoch) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    pub timestamp_ms: i64,
    pub message: String,
}

impl LogEvent {
    /// What the event counts against `MAX_BATCH_BYTES`.
    pub fn cost(&self) -> usize {
        self.message.len() + EVENT_OVERHEAD
    }
}

/// Joins the pieces of a split line back together.
pub fn join_pieces<'a>(pieces: impl IntoIterator<Item = &'a str>) -> String {
    pieces
        .into_iter()
        .map(|p| {
            let p = p.strip_prefix(CONTINUED).unwrap_or(p);
            p.strip_suffix(CONTINUES).unwrap_or(p)
        })
        .collect()
}

/// Events the service would refuse, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused {
    pub too_old: u64,
    pub too_new: u64,
}

impl Refused {
    /// Counts `event` if the service would refuse it at `now_ms`: it is
    /// then left out of every batch.
    pub fn refuses(&mut self, event: &LogEvent, now_ms: i64) -> bool {
        if event.timestamp_ms < now_ms - MAX_AGE_MS {
            self.too_old += 1;
            true
        } else if event.timestamp_ms > now_ms + MAX_FUTURE_MS {
            self.too_new += 1;
            true
        } else {
            false
        }
    }

    pub fn total(&self) -> u64 {
        self.too_old + self.too_new
    }
}

/// One `PutLogEvents` batch being filled, for one stream, with events in
/// time order.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<LogEvent>,
    bytes: usize,
}

impl Batch {
    /// Whether `event` still fits: the batch stays within the event count,
    /// the byte count and the time span. An empty batch takes any event
    /// (messages are at most `MAX_EVENT_BYTES`).
    pub fn fits(&self, event: &LogEvent) -> bool {
        debug_assert!(
            event.message.len() <= MAX_EVENT_BYTES,
            "split long lines first"
        );
        let Some(first) = self.events.first() else {
            return true;
        };
        self.events.len() < MAX_BATCH_EVENTS
            && self.bytes + event.cost() <= MAX_BATCH_BYTES
            && event.timestamp_ms - first.timestamp_ms <= MAX_BATCH_SPAN_MS
    }

    /// Adds `event`, which must [`fit`](Batch::fits) and be no earlier
    /// than the last one.
    pub fn push(&mut self, event: LogEvent) {
        debug_assert!(self
            .events
            .last()
            .is_none_or(|last| last.timestamp_ms <= event.timestamp_ms));
        self.bytes += event.cost();
        self.events.push(event);
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// What the batch counts against `MAX_BATCH_BYTES`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Cuts one stream's events into batches the service takes, in time
/// order (a stable sort: events of one millisecond keep their order).
/// Events outside the service's time window at `now_ms` are left out and
/// counted; none is dropped otherwise. Messages must already be at most
/// `MAX_EVENT_BYTES` (the stream writer cuts longer lines).
pub fn cut(mut events: Vec<LogEvent>, now_ms: i64) -> (Vec<Vec<LogEvent>>, Refused) {
    let mut refused = Refused::default();
    events.retain(|e| !refused.refuses(e, now_ms));
    events.sort_by_key(|e| e.timestamp_ms);
    let mut batches = Vec::new();
    let mut current = Batch::default();
    for event in events {
        if !current.fits(&event) {
            batches.push(std::mem::take(&mut current).events);
        }
        current.push(event);
    }
    if !current.is_empty() {
        batches.push(current.events);
    }
    (batches, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_205_600_000; // 2026-12-02T10:00:00Z

    fn event(at: i64, message: &str) -> LogEvent {
        LogEvent {
            timestamp_ms: at,
            message: message.to_string(),
        }
    }

    fn within_limits(batch: &[LogEvent]) {
        assert!(!batch.is_empty());
        assert!(batch.len() <= MAX_BATCH_EVENTS, "{} events", batch.len());
        let bytes: usize = batch.iter().map(LogEvent::cost).sum();
        assert!(bytes <= MAX_BATCH_BYTES, "{bytes} bytes");
        assert!(batch
            .windows(2)
            .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms));
        let span = batch[batch.len() - 1].timestamp_ms - batch[0].timestamp_ms;
        assert!(span <= MAX_BATCH_SPAN_MS, "spans {span} ms");
    }

    #[test]
    fn batches_close_at_the_event_count_the_byte_size_and_the_day_they_span() {
        // Count: 25,000 tiny events are three batches.
        let many: Vec<LogEvent> = (0..25_000)
            .map(|i| event(NOW - 1000 + i % 7, "x"))
            .collect();
        let (batches, refused) = cut(many, NOW);
        assert_eq!(refused, Refused::default());
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [10_000, 10_000, 5_000]
        );
        batches.iter().for_each(|b| within_limits(b));

        // Bytes: 100-KiB events, 26 bytes each on top, ten to a batch.
        let big = "b".repeat(100 * 1024);
        let heavy: Vec<LogEvent> = (0..25).map(|i| event(NOW - 100 + i, &big)).collect();
        let (batches, _) = cut(heavy, NOW);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        batches.iter().for_each(|b| within_limits(b));

        // A full-size event fills a batch alone.
        let max = "m".repeat(MAX_EVENT_BYTES);
        let (batches, _) = cut(vec![event(NOW, &max), event(NOW, "y")], NOW);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);

        // Span: events a day and a second apart never share a batch.
        let day = MAX_BATCH_SPAN_MS;
        let spread = vec![
            event(NOW - day - 2000, "a"),
            event(NOW - 1000, "b"),
            event(NOW, "c"),
        ];
        let (batches, _) = cut(spread, NOW);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2]);
        batches.iter().for_each(|b| within_limits(b));
    }

    #[test]
    fn events_are_put_in_time_order_keeping_the_order_of_equal_times() {
        let events = vec![
            event(NOW, "third"),
            event(NOW - 5, "first"),
            event(NOW, "fourth"),
            event(NOW - 1, "second"),
        ];
        let (batches, _) = cut(events, NOW);
        let order: Vec<&str> = batches[0].iter().map(|e| e.message.as_str()).collect();
        assert_eq!(order, ["first", "second", "third", "fourth"]);
    }

    #[test]
    fn events_outside_the_services_window_are_left_out_and_counted() {
        let events = vec![
            event(NOW - MAX_AGE_MS - 1, "too old"),
            event(NOW - MAX_AGE_MS, "just in"),
            event(NOW + MAX_FUTURE_MS, "just in too"),
            event(NOW + MAX_FUTURE_MS + 1, "too new"),
        ];
        let (batches, refused) = cut(events, NOW);
        assert_eq!(
            refused,
            Refused {
                too_old: 1,
                too_new: 1
            }
        );
        let kept: Vec<&str> = batches
            .iter()
            .flatten()
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(kept, ["just in", "just in too"]);
        assert_eq!(cut(Vec::new(), NOW).0.len(), 0);
    }
}
