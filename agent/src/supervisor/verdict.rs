//! What an attempt's ending means for its message: which event, whether it
//! is the job's last word, and whether the message is deleted or released
//! (and after what delay). Pure functions, so every rule is unit-tested.
//!
//! The rules (README, "What happens to a job"):
//! exit 0 → succeeded, deleted; exit 75 → requeued at once, not a failure;
//! other exits, deaths by signal and a command that cannot be started →
//! failed, retried with backoff until `max_attempts`, then deleted;
//! timeout → timed out, retried the same way; told to stop by a drain →
//! interrupted, released at once, not a failure (unless it still managed to
//! exit 0 or 75, which count as themselves); an agent-side problem →
//! requeued with backoff, not counted against the job.

use std::time::Duration;

use crate::events::EventType;

/// Exit code by which a job asks to be run again (EX_TEMPFAIL).
pub const EXIT_REQUEUE: i32 = 75;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    /// The job itself is at fault although it may not have run at all: its
    /// command does not exist, an input is missing, it did not create a
    /// declared output. Counts as a failure, like a non-zero exit.
    JobFault(String),
    /// Killed at its time limit (`signal`: what ended it, if a signal did).
    TimedOut {
        after: Duration,
        signal: Option<i32>,
    },
    /// A drain told the job to stop; what it did then.
    Interrupted {
        drain_reason: String,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Something on the agent's side went wrong (disk, launcher).
    AgentFault(String),
    /// The kernel's OOM killer ended the job (or a process of it, and the
    /// job then failed) at its cgroup's memory limit.
    OutOfMemory {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// An operator cancelled it (`batchly-agent cancel`); with `requeue`
    /// its message goes back to the queue, else it is done with.
    Cancelled {
        requeue: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Delete,
    Release { delay: Duration, failed: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: EventType,
    pub is_final: bool,
    pub action: Action,
    pub reason: Option<String>,
}

/// Job retries are spaced by the one backoff the agent has.
pub use crate::retry::Backoff;

pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Decides the fate of the message after an attempt ended.
pub fn decide(ending: &Ending, attempt: u32, max_attempts: u32, retry_delay: Duration) -> Verdict {
    let failure = |kind: EventType, what: String| {
        if attempt >= max_attempts {
            Verdict {
                kind,
                is_final: true,
                action: Action::Delete,
                reason: Some(format!("{what} (attempt {attempt} of {max_attempts})")),
            }
        } else {
            Verdict {
                kind,
                is_final: false,
                action: Action::Release {
                    delay: retry_delay,
                    failed: true,
                },
                reason: Some(format!(
                    "{what} (attempt {attempt} of {max_attempts}); retrying in {}",
                    seconds(retry_delay)
                )),
            }
        }
    };
    let requeue = |reason: String| Verdict {
        kind: EventType::Requeued,
        is_final: false,
        action: Action::Release {
            delay: Duration::ZERO,
            failed: false,
        },
        reason: Some(reason),
    };
    match ending {
        Ending::Exited(0) => Verdict {
            kind: EventType::Succeeded,
            is_final: true,
            action: Action::Delete,
            reason: None,
        },
        Ending::Exited(EXIT_REQUEUE) => {
            requeue("exit status 75: the job asked to run again".to_string())
        }
        Ending::Exited(code) => failure(EventType::Failed, format!("exit status {code}")),
        Ending::Signaled(sig) => failure(
            EventType::Failed,
            format!("killed by {}", signal_name(*sig)),
        ),
        Ending::JobFault(why) => failure(EventType::Failed, why.clone()),
        Ending::Cancelled { requeue: true } => requeue("cancelled".to_string()),
        Ending::Cancelled { requeue: false } => Verdict {
            kind: EventType::Failed,
            is_final: true,
            action: Action::Delete,
            reason: Some("cancelled".to_string()),
        },
        Ending::OutOfMemory { .. } => failure(
            EventType::Failed,
            "oom: the job reached its memory limit and the kernel killed it".to_string(),
        ),
        Ending::TimedOut { after, .. } => failure(
            EventType::TimedOut,
            format!("timed out after {}", seconds(*after)),
        ),
        Ending::Interrupted { code: Some(0), .. } => Verdict {
            kind: EventType::Succeeded,
            is_final: true,
            action: Action::Delete,
            reason: None,
        },
        Ending::Interrupted {
            drain_reason,
            code: Some(EXIT_REQUEUE),
            ..
        } => requeue(format!("exit status 75 after drain ({drain_reason})")),
        Ending::Interrupted {
            drain_reason,
            code,
            signal,
        } => {
            let how = match (code, signal) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(s)) => format!("killed by {}", signal_name(*s)),
                (None, None) => "stopped".to_string(),
            };
            Verdict {
                kind: EventType::Interrupted,
                is_final: false,
                action: Action::Release {
                    delay: Duration::ZERO,
                    failed: false,
                },
                reason: Some(format!(
                    "released by drain ({drain_reason}) before finishing: {how}"
                )),
            }
        }
        Ending::AgentFault(why) => Verdict {
            kind: EventType::Requeued,
            is_final: false,
            action: Action::Release {
                delay: retry_delay,
                failed: false,
            },
            reason: Some(format!("agent could not run the job: {why}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(10);

    #[test]
    fn exit_zero_succeeds_and_deletes() {
        let v = decide(&Ending::Exited(0), 1, 1, DELAY);
        assert_eq!(
            (v.kind, v.is_final, v.action),
            (EventType::Succeeded, true, Action::Delete)
        );
    }

    #[test]
    fn exit_75_requeues_at_once_without_counting_a_failure() {
        let v = decide(&Ending::Exited(75), 3, 3, DELAY);
        assert_eq!(v.kind, EventType::Requeued);
        assert!(!v.is_final);
        assert_eq!(
            v.action,
            Action::Release {
                delay: Duration::ZERO,
                failed: false
            }
        );
    }

    #[test]
    fn a_failure_before_the_last_attempt_is_retried_after_the_backoff() {
        let v = decide(&Ending::Exited(3), 1, 2, DELAY);
        assert_eq!(v.kind, EventType::Failed);
        assert!(!v.is_final);
        assert_eq!(
            v.action,
            Action::Release {
                delay: DELAY,
                failed: true
            }
        );
        assert_eq!(
            v.reason.as_deref(),
            Some("exit status 3 (attempt 1 of 2); retrying in 10s")
        );
    }

    #[test]
    fn a_failure_on_the_last_attempt_is_final() {
        let v = decide(&Ending::Exited(3), 2, 2, DELAY);
        assert_eq!(
            (v.kind, v.is_final, v.action),
            (EventType::Failed, true, Action::Delete)
        );
        assert_eq!(v.reason.as_deref(), Some("exit status 3 (attempt 2 of 2)"));
    }

    #[test]
    fn a_missing_command_fails_with_its_name() {
        let v = decide(
            &Ending::JobFault("command not found: nope".into()),
            1,
            1,
            DELAY,
        );
        assert_eq!(v.kind, EventType::Failed);
        assert!(v
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("command not found: nope")));
    }

    #[test]
    fn a_timeout_is_reported_as_such_and_retried_like_a_failure() {
        let v = decide(
            &Ending::TimedOut {
                after: Duration::from_secs(60),
                signal: Some(15),
            },
            1,
            2,
            DELAY,
        );
        assert_eq!(v.kind, EventType::TimedOut);
        assert_eq!(
            v.action,
            Action::Release {
                delay: DELAY,
                failed: true
            }
        );
        let last = decide(
            &Ending::TimedOut {
                after: Duration::from_secs(60),
                signal: Some(15),
            },
            2,
            2,
            DELAY,
        );
        assert_eq!((last.kind, last.is_final), (EventType::TimedOut, true));
        assert!(last
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("timed out after 60s")));
    }

    #[test]
    fn a_death_by_signal_names_the_signal() {
        let v = decide(&Ending::Signaled(11), 1, 1, DELAY);
        assert_eq!(
            v.reason.as_deref(),
            Some("killed by SIGSEGV (attempt 1 of 1)")
        );
    }

    #[test]
    fn an_interrupted_job_is_released_at_once_and_not_counted() {
        let ending = Ending::Interrupted {
            drain_reason: "SIGTERM".into(),
            code: None,
            signal: Some(15),
        };
        let v = decide(&ending, 1, 1, DELAY);
        assert_eq!(v.kind, EventType::Interrupted);
        assert!(!v.is_final);
        assert_eq!(
            v.action,
            Action::Release {
                delay: Duration::ZERO,
                failed: false
            }
        );
    }

    #[test]
    fn a_job_that_finishes_during_the_drain_still_succeeds() {
        let ending = Ending::Interrupted {
            drain_reason: "SIGTERM".into(),
            code: Some(0),
            signal: None,
        };
        assert_eq!(decide(&ending, 1, 1, DELAY).kind, EventType::Succeeded);
    }

    #[test]
    fn an_agent_fault_requeues_with_backoff_and_never_fails_the_job() {
        let v = decide(&Ending::AgentFault("disk full".into()), 5, 1, DELAY);
        assert_eq!(v.kind, EventType::Requeued);
        assert_eq!(
            v.action,
            Action::Release {
                delay: DELAY,
                failed: false
            }
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_stays_within_half_to_full() {
        let b = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
        };
        assert_eq!(b.ceiling(1), Duration::from_secs(10));
        assert_eq!(b.ceiling(2), Duration::from_secs(20));
        assert_eq!(b.ceiling(3), Duration::from_secs(40));
        assert_eq!(b.ceiling(4), Duration::from_secs(60));
        assert_eq!(b.ceiling(1000), Duration::from_secs(60));
        assert_eq!(b.delay(2, 0.0), Duration::from_secs(10));
        assert_eq!(b.delay(2, 1.0), Duration::from_secs(20));
    }
}
