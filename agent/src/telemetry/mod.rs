//! What a drain flushes last, after its jobs are finished or released and
//! before the agent exits (and before an Auto Scaling termination hook is
//! completed, which lets the instance go).
//!
//! The drain keeps `flush_reserve` of its time for this: every job's grace
//! ends that much (and the release's own reserve) before the drain
//! deadline. What is not shipped by the deadline stays wherever the
//! implementation keeps it for the next start, and the flush says how much.

pub mod logs;

use std::future::Future;
use std::pin::Pin;
pub mod batch;
pub mod http;
pub mod metrics;

use std::time::{Duration, Instant};

/// What one flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Bytes shipped by this flush.
    pub shipped: u64,
    /// Bytes still waiting (kept for the next start).
    pub left: u64,
}

/// Something that holds telemetry the agent must ship before it exits.
pub trait Flush: Send + Sync {
    /// How much of a drain's time the flush needs at its end.
    fn flush_reserve(&self) -> Duration;

    /// Ships what is buffered, giving up at `deadline`.
    fn flush(&self, deadline: Instant) -> Pin<Box<dyn Future<Output = Flushed> + Send + '_>>;
}

/// The agent's telemetry while it ships none of its own: job output stays
/// in the per-run files and events go out as they happen, so there is
/// nothing to flush and no time to keep for it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NothingBuffered;

impl Flush for NothingBuffered {
    fn flush_reserve(&self) -> Duration {
        Duration::ZERO
    }

    fn flush(&self, _deadline: Instant) -> Pin<Box<dyn Future<Output = Flushed> + Send + '_>> {
        Box::pin(std::future::ready(Flushed::default()))
    }
}

/// Several flushes run together: the drain keeps the longest reserve.
pub struct Flushes(pub Vec<std::sync::Arc<dyn Flush>>);

impl Flush for Flushes {
    fn flush_reserve(&self) -> Duration {
        self.0
            .iter()
            .map(|f| f.flush_reserve())
            .max()
            .unwrap_or_default()
    }

    fn flush(&self, deadline: Instant) -> Pin<Box<dyn Future<Output = Flushed> + Send + '_>> {
        Box::pin(async move {
            let mut all = tokio::task::JoinSet::new();
            for f in &self.0 {
                let f = f.clone();
                all.spawn(async move { f.flush(deadline).await });
            }
            let mut sum = Flushed::default();
            while let Some(done) = all.join_next().await {
                let done = done.unwrap_or_default();
                sum.shipped += done.shipped;
                sum.left += done.left;
            }
            sum
        })
    }
}

/// Flushes `what` by `deadline` and logs the outcome for the drain log.
pub async fn flush_before_exit(what: &dyn Flush, deadline: Instant) -> Flushed {
    let started = Instant::now();
    let done = what.flush(deadline).await;
    if done.left > 0 {
        tracing::warn!(
            shipped_bytes = done.shipped,
            left_bytes = done.left,
            took_ms = started.elapsed().as_millis() as u64,
            "telemetry not all shipped by the drain deadline; the rest is kept for the next start"
        );
    } else if done.shipped > 0 {
        tracing::info!(
            shipped_bytes = done.shipped,
            took_ms = started.elapsed().as_millis() as u64,
            "telemetry flushed"
        );
    }
    done
}
