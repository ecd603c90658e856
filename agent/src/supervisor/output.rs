//! Captures a job's stdout and stderr into its log stream while it runs.
//! Memory use is one fixed buffer whatever the job prints, and the pipes
//! are always drained so a chatty job never blocks on a full pipe. Past
//! `jobs.log_max_bytes` output is read and discarded, counted, and a
//! marker line at the end of the stream says how much was dropped (never
//! a silent loss).

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::telemetry::logs::{Source, SpoolError, StreamWriter, Written};

/// Read size per stream: large enough that a fast writer costs few wakeups.
const CHUNK: usize = 64 * 1024;

/// Copies both streams into `log` until both reach end of file (or `stop`:
/// a process that escaped the job holds them open), then ends the stream:
/// `Ok` once its output is handed off (in the spool, synced, or kept as
/// `dev`'s log), which the job's message waits for.
pub async fn capture<O, E>(
    mut out: Option<O>,
    mut err: Option<E>,
    mut log: StreamWriter,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Written, SpoolError>
where
    O: AsyncRead + Unpin,
    E: AsyncRead + Unpin,
{
    let mut buf_out = vec![0u8; CHUNK];
    let mut buf_err = vec![0u8; CHUNK];
    while out.is_some() || err.is_some() {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = read_some(&mut out, &mut buf_out), if out.is_some() => match r {
                Ok(n) if n > 0 => log.output(Source::Stdout, &buf_out[..n]),
                _ => out = None,
            },
            r = read_some(&mut err, &mut buf_err), if err.is_some() => match r {
                Ok(n) if n > 0 => log.output(Source::Stderr, &buf_err[..n]),
                _ => err = None,
            },
        }
    }
    // Our ends close here: an escaped process holding the pipes gets EPIPE.
    drop((out, err));
    // Closing may sync the file to disk: off the runtime's threads.
    tokio::task::spawn_blocking(move || log.close())
        .await
        .unwrap_or_else(|e| {
            Err(SpoolError {
                path: "job output".into(),
                error: e.to_string(),
            })
        })
}

async fn read_some<R: AsyncRead + Unpin>(
    r: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::logs::{Spool, SpoolSettings};

    fn spool(dir: &std::path::Path) -> Spool {
        Spool::open(SpoolSettings {
            dir: dir.to_path_buf(),
            max_bytes: 1 << 30,
            ship: false,
        })
        .expect("spool")
    }

    #[tokio::test]
    async fn both_streams_land_in_the_log_each_line_marked_with_its_pipe() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = spool(tmp.path()).stream("job.m1.1", 1024);
        let path = log.path().to_path_buf();
        let out: &[u8] = b"to stdout\n";
        let err: &[u8] = b"to stderr\n";
        let got = capture(Some(out), Some(err), log, Default::default())
            .await
            .expect("handed off");
        assert_eq!(
            got,
            Written {
                kept: 20,
                over_cap: 0
            }
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(" stdout to stdout\n") && text.contains(" stderr to stderr\n"));
    }

    #[tokio::test]
    async fn output_past_the_cap_is_counted_and_marked_not_silently_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = spool(tmp.path()).stream("big.m1.1", 100_000);
        let path = log.path().to_path_buf();
        let big = vec![b'x'; 300_000];
        let got = capture(Some(&big[..]), None::<&[u8]>, log, Default::default())
            .await
            .expect("handed off");
        assert_eq!(
            got,
            Written {
                kept: 100_000,
                over_cap: 200_000
            }
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(&format!(" stdout {}\n", "x".repeat(100_000))));
        assert!(text.contains("dropped 200000 bytes"), "marker missing");
    }
}
