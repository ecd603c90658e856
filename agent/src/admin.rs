//! The local admin socket: `batchly-agent status` and `batchly-agent drain`
//! talk to the running agent through a Unix socket that only the agent's
//! user can open (mode 0600). One JSON request line in, one JSON response
//! line out. It never changes a job itself; it reads the status board and
//! asks the drain for a stop.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::drain::Drain;
use crate::supervisor::status::{StatusBoard, StatusSnapshot};

/// Longest request line accepted; anything longer is not a real client.
const MAX_REQUEST: u64 = 4096;
/// A client that says nothing for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Drain,
    Cancel { job_id: String, requeue: bool },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status { status: Box<StatusSnapshot> },
    Draining { reason: String, deadline_in_s: u64 },
    Cancelled { message_ids: Vec<String> },
    Error { error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("another batchly-agent is already running with admin socket {0}")]
    InUse(PathBuf),
    #[error("{action} admin socket {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no batchly-agent is running with admin socket {0} (is the path right? see --socket / admin.socket)")]
    NotRunning(PathBuf),
    #[error(
        "cannot open admin socket {0}: permission denied (run as root or as the agent's user)"
    )]
    Denied(PathBuf),
    #[error("bad answer from the agent on {path}: {detail}")]
    BadAnswer { path: PathBuf, detail: String },
}

/// Binds the admin socket with mode 0600, replacing a stale socket left by a
/// crash but refusing to steal one a live agent is answering on.
pub async fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::PermissionsExt;
    let io_err = |action: &'static str| {
        move |source| AdminError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("creating the directory of"))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err("removing stale"))?;
    }
    // The socket is created 0600 (umask), not chmod-ed after bind: no
    // moment where another user could connect. This runs at start, before
    // any other thread creates files.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io_err("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("restricting"))?;
    Ok(listener)
}

/// Answers requests until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    board: Arc<StatusBoard>,
    drain: Drain,
    drain_timeout: Duration,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, typically: do not spin on it.
                tracing::warn!(error = %e, "admin socket cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let board = board.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                CLIENT_TIMEOUT,
                answer(stream, &board, &drain, drain_timeout),
            )
            .await;
        });
    }
}

async fn answer(
    stream: UnixStream,
    board: &StatusBoard,
    drain: &Drain,
    drain_timeout: Duration,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => Response::Status {
            status: Box::new(board.snapshot()),
        },
        Ok(Request::Drain) => {
            tracing::warn!("drain requested over the admin socket");
            drain.request("batchly-agent drain", Instant::now() + drain_timeout);
            let req = drain.current();
            Response::Draining {
                reason: req.as_ref().map(|r| r.reason.clone()).unwrap_or_default(),
                deadline_in_s: req
                    .map(|r| {
                        r.deadline
                            .saturating_duration_since(Instant::now())
                            .as_secs()
                    })
                    .unwrap_or(0),
            }
        }
        Ok(Request::Cancel { job_id, requeue }) => {
            let message_ids = board.cancel(&job_id, requeue);
            if message_ids.is_empty() {
                Response::Error {
                    error: format!("no job {job_id:?} is running on this agent"),
                }
            } else {
                tracing::warn!(job_id, requeue, "job cancelled over the admin socket");
                Response::Cancelled { message_ids }
            }
        }
        Err(e) => Response::Error {
            error: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// Sends one request to the agent listening on `path`.
pub async fn request(path: &Path, req: &Request) -> Result<Response, AdminError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                AdminError::NotRunning(path.to_path_buf())
            }
            io::ErrorKind::PermissionDenied => AdminError::Denied(path.to_path_buf()),
            _ => AdminError::Io {
                action: "connecting to",
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    let io_err = |source| AdminError::Io {
        action: "talking over",
        path: path.to_path_buf(),
        source,
    };
    let (read, mut write) = stream.into_split();
    let mut body = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
    body.push(b'\n');
    write.write_all(&body).await.map_err(io_err)?;
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    let read_line = reader.read_line(&mut line);
    tokio::time::timeout(CLIENT_TIMEOUT, read_line)
        .await
        .map_err(|_| io_err(io::Error::new(io::ErrorKind::TimedOut, "no answer")))?
        .map_err(io_err)?;
    serde_json::from_str(&line).map_err(|e| AdminError::BadAnswer {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn status_and_drain_work_over_a_socket_only_the_owner_can_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("agent.sock");
        let drain = Drain::new();
        let board = Arc::new(StatusBoard::new("dev", "test".into(), 2, drain.clone()));
        let listener = bind(&path).await.expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let server = tokio::spawn(serve(
            listener,
            board,
            drain.clone(),
            Duration::from_secs(30),
        ));

        match request(&path, &Request::Status).await.expect("status") {
            Response::Status { status } => {
                assert_eq!(status.slots, 2);
                assert!(status.draining.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        match request(&path, &Request::Drain).await.expect("drain") {
            Response::Draining { reason, .. } => assert_eq!(reason, "batchly-agent drain"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(drain.current().is_some());
        // A second agent must not steal a live socket.
        assert!(matches!(bind(&path).await, Err(AdminError::InUse(_))));
        server.abort();
    }

    #[tokio::test]
    async fn talking_to_no_agent_says_so_and_names_the_socket() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("none.sock");
        let err = request(&path, &Request::Status)
            .await
            .expect_err("no agent");
        assert!(
            err.to_string().contains("no batchly-agent is running"),
            "{err}"
        );
        assert!(err.to_string().contains("none.sock"), "{err}");
    }

    #[tokio::test]
    async fn a_stale_socket_from_a_crash_is_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind stale"));
        assert!(path.exists());
        bind(&path).await.expect("rebinding over a stale socket");
    }
}
