//! Captures a job's stdout and stderr into its log file while it runs.
//! Memory use is one fixed buffer per stream whatever the job prints, and
//! the pipes are always drained so a chatty job never blocks on a full pipe.
//! Past `max_bytes` output is read and discarded, counted, and a marker line
//! at the end of the log says how much was dropped (never a silent loss).
//!
//! Later, the CloudWatch Logs shipper reads what lands here.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Read size per stream: large enough that a fast writer costs few wakeups.
const CHUNK: usize = 64 * 1024;

/// What was captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Captured {
    pub written: u64,
    pub dropped: u64,
}

/// Creates the log file for one attempt (and its parent directories, the
/// first time or when someone removed them).
pub fn create_log(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Job output may hold the job's secrets: readable by the agent only.
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    };
    match (open(), path.parent()) {
        (Err(e), Some(dir)) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            open()
        }
        (opened, _) => opened,
    }
}

/// Copies both streams into `file` until both reach end of file.
pub async fn capture<O, E>(
    mut out: Option<O>,
    mut err: Option<E>,
    mut file: File,
    path: PathBuf,
    max_bytes: u64,
) -> Captured
where
    O: AsyncRead + Unpin,
    E: AsyncRead + Unpin,
{
    let mut buf_out = vec![0u8; CHUNK];
    let mut buf_err = vec![0u8; CHUNK];
    let mut got = Captured::default();
    let mut write_failed = false;
    while out.is_some() || err.is_some() {
        let n = tokio::select! {
            r = read_some(&mut out, &mut buf_out), if out.is_some() => {
                if matches!(r, Ok(0) | Err(_)) { out = None; }
                r.ok().map(|n| (n, &buf_out))
            }
            r = read_some(&mut err, &mut buf_err), if err.is_some() => {
                if matches!(r, Ok(0) | Err(_)) { err = None; }
                r.ok().map(|n| (n, &buf_err))
            }
        };
        let Some((n, buf)) = n else { continue };
        let room = max_bytes.saturating_sub(got.written) as usize;
        let keep = n.min(room);
        if keep > 0 && !write_failed {
            if let Err(e) = file.write_all(&buf[..keep]) {
                tracing::warn!(log = %path.display(), error = %e, "cannot write job output; discarding the rest");
                write_failed = true;
            }
        }
        if write_failed {
            got.dropped += n as u64;
        } else {
            got.written += keep as u64;
            got.dropped += (n - keep) as u64;
        }
    }
    if got.dropped > 0 && !write_failed {
        let _ = writeln!(
            file,
            "\n[batchly-agent] output truncated: kept the first {} bytes (jobs.log_max_bytes), dropped {} bytes",
            got.written, got.dropped
        );
    }
    got
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

    #[tokio::test]
    async fn both_streams_land_in_the_log_and_nothing_is_lost_under_the_cap() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("job/1.log");
        let file = create_log(&path).expect("create");
        let out: &[u8] = b"to stdout\n";
        let err: &[u8] = b"to stderr\n";
        let got = capture(Some(out), Some(err), file, path.clone(), 1024).await;
        assert_eq!(
            got,
            Captured {
                written: 20,
                dropped: 0
            }
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("to stdout\n") && text.contains("to stderr\n"));
    }

    #[tokio::test]
    async fn output_past_the_cap_is_counted_and_marked_not_silently_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("big.log");
        let file = create_log(&path).expect("create");
        let big = vec![b'x'; 300_000];
        let got = capture(Some(&big[..]), None::<&[u8]>, file, path.clone(), 100_000).await;
        assert_eq!(
            got,
            Captured {
                written: 100_000,
                dropped: 200_000
            }
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with(&"x".repeat(100_000)));
        assert!(text.contains("dropped 200000 bytes"), "marker missing");
    }
}
