//! Whether the agent's long-lived loops still make progress: the
//! supervisor's intake loop, the lease heartbeat and the instance metadata
//! watcher each register here and beat as they go round (or while they wait
//! for something legitimate, such as a free slot). The systemd watchdog is
//! fed only while none of them has been quiet longer than it may be, so a
//! wedged agent is restarted; a timer that pinged regardless would defeat
//! the watchdog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One registered loop.
#[derive(Debug)]
struct Part {
    name: &'static str,
    /// Longest it may go without a beat.
    quiet: Duration,
    /// Milliseconds since `EPOCH` at its last beat.
    last_ms: AtomicU64,
    /// Made to look wedged (debug builds, `STALL_ENV`): its beats are
    /// ignored.
    stuck: bool,
}

/// A loop's handle: `beat` when it makes progress.
#[derive(Debug, Clone)]
pub struct Beat(Arc<Part>);

impl Beat {
    pub fn beat(&self) {
        if !self.0.stuck {
            self.0.last_ms.store(now_ms(), Ordering::Relaxed);
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// The loops of this process.
#[derive(Debug, Default)]
pub struct Liveness {
    parts: Mutex<Vec<Arc<Part>>>,
}

impl Liveness {
    /// Registers loop `name`, which beats at least every `quiet`; it counts
    /// as having beaten now. A name registered again (a loop restarted)
    /// replaces the old one.
    pub fn register(&self, name: &'static str, quiet: Duration) -> Beat {
        let stuck = stalled_on_purpose(name);
        let part = Arc::new(Part {
            name,
            quiet: if stuck { Duration::ZERO } else { quiet },
            last_ms: AtomicU64::new(now_ms()),
            stuck,
        });
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        parts.retain(|p| p.name != name);
        parts.push(part.clone());
        Beat(part)
    }

    /// The loops quiet for longer than they may be, with how long.
    pub fn stalled(&self) -> Vec<(&'static str, Duration)> {
        let now = now_ms();
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|p| {
                let quiet =
                    Duration::from_millis(now.saturating_sub(p.last_ms.load(Ordering::Relaxed)));
                (quiet > p.quiet).then_some((p.name, quiet))
            })
            .collect()
    }
}

/// Debug builds only, for the tests of the watchdog: the loop named in
/// this variable never beats, as if wedged. Release builds ignore it.
pub const STALL_ENV: &str = "BATCHLY_TEST_STALL";

fn stalled_on_purpose(name: &str) -> bool {
    cfg!(debug_assertions) && std::env::var(STALL_ENV).is_ok_and(|v| v == name)
}

/// This process's registry.
pub fn global() -> &'static Liveness {
    static GLOBAL: OnceLock<Liveness> = OnceLock::new();
    GLOBAL.get_or_init(Liveness::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_stalled_until_it_beats_again() {
        let live = Liveness::default();
        let fast = live.register("fast", Duration::from_millis(30));
        let _slow = live.register("slow", Duration::from_secs(3600));
        assert!(live.stalled().is_empty());
        std::thread::sleep(Duration::from_millis(60));
        let stalled = live.stalled();
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].0, "fast");
        fast.beat();
        assert!(live.stalled().is_empty());
    }

    #[test]
    fn registering_a_name_again_replaces_the_old_loop() {
        let live = Liveness::default();
        let _old = live.register("loop", Duration::from_millis(1));
        let _new = live.register("loop", Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(5));
        assert!(live.stalled().is_empty());
    }
}
