//! Stop signals: the first SIGTERM or SIGINT starts a drain, a second one
//! asks for an immediate stop. Installed before the agent can be seen, so a
//! stop never means the default death.

use std::time::{Duration, Instant};

use super::{failed, AppError};
use crate::drain::Drain;

/// SIGTERM and SIGINT, caught from the moment they are installed.
pub(super) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(super) fn install() -> Result<StopSignals, AppError> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| failed(format!("installing the {name} handler: {e}")))
        };
        Ok(StopSignals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// The first signal starts a drain with `timeout`; a second one asks for
    /// an immediate stop (jobs killed and released now).
    pub(super) async fn drain_on_signals(mut self, drain: Drain, timeout: Duration) {
        let mut seen = 0;
        loop {
            let name = tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            };
            seen += 1;
            if seen == 1 {
                tracing::warn!(signal = name, timeout_s = timeout.as_secs(), "draining: no new jobs; running jobs are told to stop and released if they do not finish in time");
                drain.request(name, Instant::now() + timeout);
            } else {
                tracing::warn!(
                    signal = name,
                    "second stop signal: stopping running jobs now"
                );
                drain.request(name, Instant::now());
            }
        }
    }
}
