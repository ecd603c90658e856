//! The optional local HTTP listener (`admin.listen`, a loopback address;
//! off by default): `GET /healthz` answers 200 `ok` while the agent's
//! health check passes and 503 with the reason when it does not, `GET
//! /metrics` the Prometheus text of [`Metrics::render_prometheus`].
//!
//! It is a small, strict HTTP/1.1 server and must stay one: a request head
//! of at most [`MAX_REQUEST_HEAD_BYTES`] read within [`READ_DEADLINE`], an
//! answer written within [`WRITE_DEADLINE`], every connection closed after
//! its answer, at most [`MAX_CONNECTIONS`] at once (more are closed
//! unanswered). A slow or hostile client costs one connection slot for a
//! few seconds, never the agent's time.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::{Metrics, PROMETHEUS_CONTENT_TYPE};

/// Whether the agent is healthy: `Err` says why not.
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Largest request head (request line and headers) read; a larger one is
/// answered 431.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client has to take its answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Pause after a failed accept (out of file descriptors, say), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const TEXT: &str = "text/plain; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("admin.listen: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Opens the listener on `addr` (`admin.listen`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Answers requests on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin.listen: accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            // Busy: closed at once rather than queued.
            continue;
        };
        let (metrics, health, stop) = (metrics.clone(), Arc::clone(&health), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = answer(&mut stream, &metrics, &health) => {}
            }
        });
    }
}

/// Reads one request from `stream` and writes its answer.
async fn answer<S>(stream: &mut S, metrics: &Metrics, health: &Health)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let response = match read_head(stream, Instant::now() + READ_DEADLINE).await {
        Ok(head) => match parse_request_line(&head) {
            Ok(request) => route(&request, metrics, health),
            Err(BadRequest) => Response::text(400, "Bad Request", "bad request\n"),
        },
        Err(HeadError::TooLarge) => Response::text(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
        // Nothing sensible to answer a client that said nothing in time.
        Err(HeadError::Closed | HeadError::TimedOut | HeadError::Io) => return,
    };
    let bytes = response.encode();
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    if let Ok(Err(e)) = tokio::time::timeout(WRITE_DEADLINE, write).await {
        tracing::debug!(error = %e, "admin.listen: writing an answer failed");
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// More than [`MAX_REQUEST_HEAD_BYTES`] without the head's end.
    TooLarge,
    /// The client closed before the head ended.
    Closed,
    TimedOut,
    Io,
}

/// Reads up to the blank line that ends a request head, at most
/// [`MAX_REQUEST_HEAD_BYTES`], by `deadline`.
async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    deadline: Instant,
) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, reader.read(&mut chunk)).await {
            Err(_) => return Err(HeadError::TimedOut),
            Ok(Err(_)) => return Err(HeadError::Io),
            Ok(Ok(0)) => return Err(HeadError::Closed),
            Ok(Ok(n)) => n,
        };
        head.extend_from_slice(&chunk[..n]);
        match find(&head, b"\r\n\r\n") {
            Some(end) if end <= MAX_REQUEST_HEAD_BYTES => {
                head.truncate(end);
                return Ok(head);
            }
            _ if head.len() > MAX_REQUEST_HEAD_BYTES => return Err(HeadError::TooLarge),
            _ => {}
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The parts of a request that matter here.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    /// Without the query.
    path: &'a str,
}

#[derive(Debug, PartialEq, Eq)]
struct BadRequest;

/// `METHOD SP /path[?query] SP HTTP/1.x`, the head's first line.
fn parse_request_line(head: &[u8]) -> Result<Request<'_>, BadRequest> {
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| BadRequest)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest);
    };
    let token = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !token || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(BadRequest);
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request { method, path })
}

/// One answer.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// `Allow: GET` (with 405).
    allow_get: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Response {
        Response {
            status,
            reason,
            content_type: TEXT,
            body: body.to_string(),
            allow_get: false,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let allow = if self.allow_get { "Allow: GET\r\n" } else { "" };
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{}",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

fn route(request: &Request<'_>, metrics: &Metrics, health: &Health) -> Response {
    let known = matches!(request.path, "/healthz" | "/metrics");
    if !known {
        return Response::text(404, "Not Found", "not found\n");
    }
    if request.method != "GET" {
        return Response {
            allow_get: true,
            ..Response::text(405, "Method Not Allowed", "only GET\n")
        };
    }
    match request.path {
        "/healthz" => match health() {
            Ok(()) => Response::text(200, "OK", "ok\n"),
            Err(reason) => Response::text(503, "Service Unavailable", &format!("{reason}\n")),
        },
        _ => Response {
            status: 200,
            reason: "OK",
            content_type: PROMETHEUS_CONTENT_TYPE,
            body: metrics.render_prometheus(),
            allow_get: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::MetricsSettings;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::net::TcpStream;

    fn metrics() -> Metrics {
        Metrics::new(MetricsSettings {
            namespace: "Batchly/Test".to_string(),
            interval: Duration::from_secs(60),
            instance_dimension: false,
            tag_dimensions: Vec::new(),
            group: None,
            instance_id: "i-1".to_string(),
            disk_path: PathBuf::from("/"),
        })
    }

    #[test]
    fn a_request_line_gives_its_method_and_path_without_the_query() {
        assert_eq!(
            parse_request_line(b"GET /metrics?name=x HTTP/1.1\r\nHost: a\r\n"),
            Ok(Request {
                method: "GET",
                path: "/metrics"
            })
        );
        assert_eq!(
            parse_request_line(b"POST /healthz HTTP/1.0"),
            Ok(Request {
                method: "POST",
                path: "/healthz"
            })
        );
        for junk in [
            &b""[..],
            b"GET",
            b"GET /healthz",
            b"GET /healthz HTTP/2",
            b"GET  /healthz HTTP/1.1",
            b"get /healthz HTTP/1.1",
            b"GET healthz HTTP/1.1",
            b"GET /healthz HTTP/1.1 extra",
            b"GET /\xff HTTP/1.1",
        ] {
            assert_eq!(parse_request_line(junk), Err(BadRequest), "{junk:?}");
        }
    }

    #[test]
    fn routes_answer_health_metrics_404_and_405() {
        let metrics = metrics();
        let healthy: Health = Arc::new(|| Ok(()));
        let stalled: Health = Arc::new(|| Err("supervisor loop quiet for 90s".to_string()));
        let get = |path| Request {
            method: "GET",
            path,
        };
        assert_eq!(
            route(&get("/healthz"), &metrics, &healthy),
            Response::text(200, "OK", "ok\n")
        );
        let sick = route(&get("/healthz"), &metrics, &stalled);
        assert_eq!(
            (sick.status, sick.body.as_str()),
            (503, "supervisor loop quiet for 90s\n")
        );
        let prom = route(&get("/metrics"), &metrics, &healthy);
        assert_eq!(
            (prom.status, prom.content_type),
            (200, PROMETHEUS_CONTENT_TYPE)
        );
        assert!(prom.body.ends_with("# EOF\n"), "{}", prom.body);
        assert_eq!(route(&get("/"), &metrics, &healthy).status, 404);
        let post = route(
            &Request {
                method: "POST",
                path: "/metrics",
            },
            &metrics,
            &healthy,
        );
        assert_eq!((post.status, post.allow_get), (405, true));
        assert!(String::from_utf8_lossy(&post.encode()).contains("\r\nAllow: GET\r\n"));
    }

    #[tokio::test]
    async fn a_request_head_larger_than_the_cap_is_refused_without_reading_on() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let long = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST_HEAD_BYTES)
        );
        client.write_all(long.as_bytes()).await.expect("write");
        let got = read_head(&mut server, Instant::now() + READ_DEADLINE).await;
        assert_eq!(got.map(|head| head.len()), Err(HeadError::TooLarge));
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nleftover")
            .await
            .expect("write");
        let got = read_head(&mut server, Instant::now() + READ_DEADLINE).await;
        assert_eq!(got.as_deref(), Ok(&b"GET /healthz HTTP/1.1\r\nHost: x"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_request_is_dropped_at_the_read_deadline() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /healthz HTT").await.expect("write");
        let started = Instant::now();
        let got = read_head(&mut server, started + READ_DEADLINE).await;
        assert_eq!(got, Err(HeadError::TimedOut));
        assert_eq!(
            started.elapsed(),
            READ_DEADLINE,
            "virtual time: exactly the deadline"
        );
        drop(client);
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .expect("read to the close");
        answer
    }

    #[tokio::test]
    async fn the_listener_answers_over_tcp_and_closes_each_connection() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&healthy);
        let health: Health = Arc::new(move || {
            if flag.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("lease heartbeat quiet for 120s".to_string())
            }
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, metrics(), health, stop.clone()));
        let ok = get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nConnection: close\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        healthy.store(false, Ordering::SeqCst);
        let sick = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            sick.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{sick}"
        );
        assert!(sick.ends_with("lease heartbeat quiet for 120s\n"), "{sick}");
        let prom = get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            prom.contains(&format!("\r\nContent-Type: {PROMETHEUS_CONTENT_TYPE}\r\n")),
            "{prom}"
        );
        let bad = get(addr, "BREW /pot HTCPCP/1.0\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
        stop.cancel();
        server.await.expect("serve ends at stop");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed after stop"
        );
    }

    #[tokio::test]
    async fn binding_an_address_in_use_names_the_setting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let error = bind(addr)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.starts_with(&format!("admin.listen: cannot listen on {addr}: ")),
            "{error}"
        );
    }
}
