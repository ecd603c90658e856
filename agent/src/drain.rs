//! Turns every reason to stop (SIGTERM/SIGINT, `batchly-agent drain`, and
//! later spot interruption and Auto Scaling notices) into one drain request
//! with one deadline. The earliest deadline wins: a second Ctrl-C or a spot
//! notice arriving during a slow drain only ever brings the end closer.
//!
//! It decides nothing about jobs; the supervisor watches it.

use std::time::Instant;

use tokio::sync::watch;

/// Why and until when the agent is draining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainRequest {
    pub reason: String,
    /// By then every job is finished or released and the agent has exited.
    pub deadline: Instant,
}

#[derive(Debug, Clone)]
pub struct Drain {
    tx: watch::Sender<Option<DrainRequest>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        let (tx, _rx) = watch::channel(None);
        Drain { tx }
    }

    /// Asks for a drain. If one is already under way, keeps its reason and
    /// moves its deadline only if the new one is earlier.
    pub fn request(&self, reason: &str, deadline: Instant) {
        self.tx.send_if_modified(|cur| match cur {
            None => {
                *cur = Some(DrainRequest {
                    reason: reason.to_string(),
                    deadline,
                });
                true
            }
            Some(req) if deadline < req.deadline => {
                req.deadline = deadline;
                true
            }
            Some(_) => false,
        });
    }

    pub fn current(&self) -> Option<DrainRequest> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<DrainRequest>> {
        self.tx.subscribe()
    }
}

/// Resolves once a drain has been requested (at once if it already was).
pub async fn requested(rx: &mut watch::Receiver<Option<DrainRequest>>) -> DrainRequest {
    loop {
        if let Some(req) = rx.borrow_and_update().clone() {
            return req;
        }
        if rx.changed().await.is_err() {
            // The sender lives as long as the agent; if it is gone, nothing
            // can ever ask for a drain again.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
