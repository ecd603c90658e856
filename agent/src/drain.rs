//! Turns every reason to stop (SIGTERM/SIGINT, `batchly-agent drain`, and
//! later spot interruption, rebalance and Auto Scaling notices) into one
//! request: a *mode* and, for a drain, one deadline.
//!
//! - `StopIntake` (a rebalance recommendation): no new work; running jobs
//!   go on; intake may resume.
//! - `Drain` (a stop, a spot notice, a lifecycle transition): no new work,
//!   running jobs are told to stop, what cannot finish by the deadline is
//!   released, and the agent exits.
//!
//! A drain never turns back into a pause, and the earliest deadline wins:
//! a second Ctrl-C or a spot notice arriving during a slow drain only ever
//! brings the end closer. It decides nothing about jobs; the supervisor and
//! each attempt watch it.

use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainMode {
    /// Take no new work; running jobs go on.
    StopIntake,
    /// Take no new work; stop or release running jobs by the deadline; exit.
    Drain,
}

/// Why, how and (for a drain) until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainRequest {
    pub reason: String,
    pub mode: DrainMode,
    /// By then every job is finished or released, telemetry is flushed
    /// and the agent has exited. Meaningful for `Drain` only.
    pub deadline: Instant,
    /// What the end of the drain keeps for itself after the jobs (the
    /// telemetry flush).
    pub tail: Duration,
}

impl DrainRequest {
    pub fn is_drain(&self) -> bool {
        self.mode == DrainMode::Drain
    }

    /// By when every job must be finished or released: the deadline less
    /// the tail.
    pub fn jobs_end(&self) -> Instant {
        self.deadline
            .checked_sub(self.tail)
            .unwrap_or(self.deadline)
    }
}

#[derive(Debug, Clone)]
pub struct Drain {
    tx: watch::Sender<Option<DrainRequest>>,
    tail: Duration,
    timeline: std::sync::Arc<Timeline>,
}

/// The steps of a drain, for its log line and the drain benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The intake loop took its last message.
    IntakeStopped,
    /// A running job was told to stop (the last one counts).
    JobSignalled,
    /// Every job finished or was released (its release acknowledged).
    JobsDone,
    /// Telemetry flushed.
    Flushed,
}

const STEPS: usize = 4;

/// When each step of the drain happened, in milliseconds after the drain
/// was asked for (0: not yet).
#[derive(Debug, Default)]
pub struct Timeline {
    asked: std::sync::OnceLock<(Instant, std::time::SystemTime)>,
    steps: [std::sync::atomic::AtomicU64; STEPS],
}

impl Timeline {
    fn asked(&self) {
        let _ = self
            .asked
            .set((Instant::now(), std::time::SystemTime::now()));
    }

    /// Records `step` now (the latest time wins, so the last of many
    /// signalled jobs is what shows). Before any drain, nothing.
    pub fn mark(&self, step: Step) {
        let Some((asked, _)) = self.asked.get() else {
            return;
        };
        // At least 1 ms, so that a mark is never read as "not yet".
        let ms = (asked.elapsed().as_millis() as u64).max(1);
        self.steps[step as usize].fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Milliseconds from the drain's request to `step`, if it happened.
    pub fn after(&self, step: Step) -> Option<u64> {
        let ms = self.steps[step as usize].load(std::sync::atomic::Ordering::Relaxed);
        (ms > 0).then_some(ms)
    }

    /// When the drain was asked for (host clock), and how long ago.
    pub fn asked_at(&self) -> Option<(std::time::SystemTime, Duration)> {
        self.asked.get().map(|(at, wall)| (*wall, at.elapsed()))
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain::keeping(Duration::ZERO)
    }

    /// A drain that ends every job `tail` before its deadline, for the
    /// work that comes after them (the telemetry flush).
    pub fn keeping(tail: Duration) -> Drain {
        let (tx, _rx) = watch::channel(None);
        Drain {
            tx,
            tail,
            timeline: Default::default(),
        }
    }

    /// The steps of the drain so far.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Asks for a drain. If one is already under way, keeps its reason and
    /// moves its deadline only if the new one is earlier; a pause of the
    /// intake becomes a drain.
    pub fn request(&self, reason: &str, deadline: Instant) {
        self.timeline.asked();
        self.tx.send_if_modified(|cur| match cur {
            Some(req) if req.is_drain() => {
                if deadline < req.deadline {
                    req.deadline = deadline;
                    true
                } else {
                    false
                }
            }
            _ => {
                *cur = Some(DrainRequest {
                    reason: reason.to_string(),
                    mode: DrainMode::Drain,
                    deadline,
                    tail: self.tail,
                });
                true
            }
        });
    }

    /// Stops the intake of new work without touching running jobs (unless
    /// a drain is already under way, which stays).
    pub fn stop_intake(&self, reason: &str) {
        self.tx.send_if_modified(|cur| match cur {
            None => {
                *cur = Some(DrainRequest {
                    reason: reason.to_string(),
                    mode: DrainMode::StopIntake,
                    deadline: far_future(),
                    tail: self.tail,
                });
                true
            }
            Some(_) => false,
        });
    }

    /// Lets intake resume after `stop_intake`; a drain is never undone.
    /// Returns whether intake resumed.
    pub fn resume_intake(&self) -> bool {
        self.tx.send_if_modified(|cur| {
            if cur
                .as_ref()
                .is_some_and(|r| r.mode == DrainMode::StopIntake)
            {
                *cur = None;
                true
            } else {
                false
            }
        })
    }

    /// `resume_intake`, only if the pause is the one asked for with
    /// `reason` (a rebalance pause lifts itself; other pauses stay).
    pub fn resume_intake_paused_for(&self, reason: &str) -> bool {
        self.tx.send_if_modified(|cur| {
            if cur
                .as_ref()
                .is_some_and(|r| r.mode == DrainMode::StopIntake && r.reason == reason)
            {
                *cur = None;
                true
            } else {
                false
            }
        })
    }

    pub fn current(&self) -> Option<DrainRequest> {
        self.tx.borrow().clone()
    }

    /// The drain under way (not a mere pause of the intake).
    pub fn draining(&self) -> Option<DrainRequest> {
        self.current().filter(DrainRequest::is_drain)
    }

    /// By when jobs must be finished or released, if a drain is under
    /// way (its deadline less the tail).
    pub fn deadline(&self) -> Option<Instant> {
        self.draining().map(|d| d.jobs_end())
    }

    /// The drain's own deadline: by then the agent has exited.
    pub fn end(&self) -> Option<Instant> {
        self.draining().map(|d| d.deadline)
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<DrainRequest>> {
        self.tx.subscribe()
    }
}

/// A deadline nothing reaches: a pause of the intake has none, and waits
/// bounded by a drain alone wait for it.
pub fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(std::time::Duration::from_secs(100 * 365 * 24 * 3600))
        .unwrap_or(now)
}

/// Resolves once a drain has been requested (at once if it already was);
/// a pause of the intake does not count.
pub async fn requested(rx: &mut watch::Receiver<Option<DrainRequest>>) -> DrainRequest {
    loop {
        if let Some(req) = rx
            .borrow_and_update()
            .clone()
            .filter(DrainRequest::is_drain)
        {
            return req;
        }
        if rx.changed().await.is_err() {
            // The sender lives as long as the agent; if it is gone, nothing
            // can ever ask for a drain again.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves once intake is stopped, by a pause or a drain.
pub async fn intake_stopped(rx: &mut watch::Receiver<Option<DrainRequest>>) -> DrainRequest {
    loop {
        if let Some(req) = rx.borrow_and_update().clone() {
            return req;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_reason_stays_and_only_an_earlier_deadline_replaces_the_old_one() {
        let drain = Drain::new();
        let mut rx = drain.subscribe();
        let now = Instant::now();
        drain.request("SIGTERM", now + Duration::from_secs(90));
        drain.request("admin", now + Duration::from_secs(120));
        let req = requested(&mut rx).await;
        assert_eq!(req.reason, "SIGTERM");
        assert_eq!(req.deadline, now + Duration::from_secs(90));
        drain.request("SIGINT", now + Duration::from_secs(1));
        let cur = drain.current().expect("draining");
        assert_eq!(cur.reason, "SIGTERM");
        assert_eq!(cur.deadline, now + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_pause_of_the_intake_is_not_a_drain_and_can_resume_but_a_drain_cannot() {
        let drain = Drain::new();
        drain.stop_intake("rebalance recommendation");
        assert!(drain.current().is_some(), "intake stopped");
        assert_eq!(drain.draining(), None, "running jobs go on");
        assert!(drain.resume_intake());
        assert_eq!(drain.current(), None);

        drain.stop_intake("rebalance recommendation");
        let deadline = Instant::now() + Duration::from_secs(100);
        drain.request("spot interruption", deadline);
        let req = drain.draining().expect("the pause became a drain");
        assert_eq!(req.reason, "spot interruption");
        assert_eq!(req.deadline, deadline);
        assert!(!drain.resume_intake(), "a drain is never undone");
        assert_eq!(drain.deadline(), Some(deadline), "no tail: jobs get it all");
        drain.stop_intake("another rebalance");
        assert_eq!(
            drain.draining().map(|d| d.reason),
            Some("spot interruption".into())
        );
        let mut rx = drain.subscribe();
        assert_eq!(requested(&mut rx).await.reason, "spot interruption");
    }

    #[test]
    fn jobs_end_the_tail_before_the_deadline_which_stays_the_agents_end() {
        let drain = Drain::keeping(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(60);
        drain.request("spot interruption", deadline);
        assert_eq!(drain.end(), Some(deadline));
        assert_eq!(drain.deadline(), Some(deadline - Duration::from_secs(5)));
        let req = drain.draining().expect("draining");
        assert_eq!(req.jobs_end(), deadline - Duration::from_secs(5));
    }

    #[test]
    fn the_timeline_counts_from_the_request_and_keeps_the_latest_mark() {
        let drain = Drain::new();
        drain.timeline().mark(Step::IntakeStopped);
        assert_eq!(
            drain.timeline().after(Step::IntakeStopped),
            None,
            "no drain yet"
        );
        drain.request("SIGTERM", Instant::now() + Duration::from_secs(9));
        drain.timeline().mark(Step::JobSignalled);
        let first = drain.timeline().after(Step::JobSignalled).expect("marked");
        std::thread::sleep(Duration::from_millis(5));
        drain.timeline().mark(Step::JobSignalled);
        let last = drain.timeline().after(Step::JobSignalled).expect("marked");
        assert!(last >= 5 && last > first, "{first} then {last}");
        assert_eq!(drain.timeline().after(Step::Flushed), None);
        assert!(drain.timeline().asked_at().is_some());
    }
}
