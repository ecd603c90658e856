//! Telling systemd how the agent is (`Type=notify`): `READY=1` once the
//! queues, the keys, the sandbox and crash recovery are done; a `STATUS=`
//! line with the slots and outcomes; `STOPPING=1` when a drain starts and
//! `EXTEND_TIMEOUT_USEC` while it needs longer than the unit's stop
//! timeout; and `WATCHDOG=1` only while every loop registered in
//! `liveness` makes progress. All from the agent's own process (systemd
//! attributes messages from short-lived children unreliably). Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::drain::Drain;
use crate::supervisor::status::StatusBoard;

/// How often the status line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// What a drain's timeout extension adds beyond its deadline: the last
/// events, `agent.stopped`, the exit.
const STOP_MARGIN: Duration = Duration::from_secs(15);

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// The agent is ready to take work.
pub fn ready(board: &StatusBoard) {
    let status = status_line(board);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// One line for `systemctl status`.
fn status_line(board: &StatusBoard) -> String {
    let snap = board.snapshot();
    let c = |k: &str| snap.counts.get(k).copied().unwrap_or(0);
    let state = match &snap.draining {
        None => "running".to_string(),
        Some(d) if d.mode == "stop_intake" => format!("intake paused ({})", d.reason),
        Some(d) => format!("draining ({}), {}s left", d.reason, d.deadline_in_s),
    };
    format!(
        "{state}; {} of {} slots busy; {} succeeded, {} failed, {} timed out, {} requeued, {} interrupted",
        snap.busy,
        snap.slots,
        c("succeeded"),
        c("failed"),
        c("timed_out"),
        c("requeued"),
        c("interrupted"),
    )
}

/// Keeps systemd informed until aborted: the status line, `STOPPING=1`
/// and timeout extensions once a drain starts, and the watchdog while
/// every registered loop makes progress.
pub async fn keep_informed(board: Arc<StatusBoard>, drain: Drain) {
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
        .then(|| Duration::from_micros(watchdog_usec));
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut stopping_said = false;
    let mut withheld_since: Option<Instant> = None;
    let mut last_status = Instant::now();
    let mut drain_rx = drain.subscribe();
    loop {
        // A drain is told at once, not at the next turn.
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = drain_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                last_status = Instant::now() - STATUS_EVERY;
            }
        }
        if let Some(req) = drain.draining() {
            if !stopping_said {
                notify(&[NotifyState::Stopping]);
                stopping_said = true;
            }
            let needed = req.deadline.saturating_duration_since(Instant::now()) + STOP_MARGIN;
            let usec = u32::try_from(needed.as_micros()).unwrap_or(u32::MAX);
            notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
        }
        if watchdog.is_some() {
            let stalled = crate::liveness::global().stalled();
            if stalled.is_empty() {
                if withheld_since.take().is_some() {
                    tracing::info!("every loop makes progress again: feeding the watchdog");
                }
                notify(&[NotifyState::Watchdog]);
            } else if withheld_since.is_none() {
                withheld_since = Some(Instant::now());
                tracing::error!(
                    stalled = ?stalled
                        .iter()
                        .map(|(name, quiet)| format!("{name} quiet for {}s", quiet.as_secs()))
                        .collect::<Vec<_>>(),
                    "not feeding the systemd watchdog: the agent is wedged; systemd stops it when the watchdog runs out (and restarts it under Restart=on-failure)"
                );
            }
        }
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = Instant::now();
            let status = status_line(&board);
            notify(&[NotifyState::Status(&status)]);
        }
    }
}
