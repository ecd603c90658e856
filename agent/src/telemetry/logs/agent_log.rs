//! The agent's own log, one JSON object per line, into this run's agent
//! stream of the spool (and from there to `agent/<instance id>` in the log
//! group), besides stderr. Logging never waits for the spool: lines go
//! through a bounded queue, and when it is full they are dropped and
//! counted, and the stream says how many.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tokio::sync::mpsc;

use super::Spool;

/// Lines waiting for the spool at most.
const QUEUE_LINES: usize = 4096;

static SINK: OnceLock<mpsc::Sender<Vec<u8>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether the agent's log goes to a spool in this process.
pub fn attached() -> bool {
    SINK.get().is_some()
}

/// Lines of the agent's log dropped because the spool fell behind.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Starts writing the agent's log into `spool` (once per process; a
/// second call does nothing).
pub fn attach(spool: &Spool) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE_LINES);
    if SINK.set(tx).is_err() {
        return;
    }
    let mut writer = spool.agent_stream();
    tokio::spawn(async move {
        let mut lines = Vec::new();
        let mut noted = 0;
        while rx.recv_many(&mut lines, 256).await > 0 {
            let dropped = dropped();
            if dropped > noted {
                writer.note(&format!(
                    "[batchly-agent] {} lines of the agent's log were dropped: its spool writer fell behind",
                    dropped - noted
                ));
                noted = dropped;
            }
            for line in lines.drain(..) {
                let text = String::from_utf8_lossy(&line);
                writer.note(text.trim_end_matches('\n'));
            }
        }
    });
}

/// The writer `tracing`'s formatter writes one event into.
#[derive(Debug, Default)]
pub struct EventWriter(Vec<u8>);

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let (Some(sink), false) = (SINK.get(), self.0.is_empty()) else {
            return;
        };
        if sink.try_send(std::mem::take(&mut self.0)).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Makes one [`EventWriter`] per event.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeEventWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeEventWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter::default()
    }
}
