//! A TCP proxy between an agent and the local AWS server, for two things a
//! test cannot see from outside: how many SQS calls the agent makes (per
//! queue and action), and what the agent does while the endpoint is gone.
//!
//! It forwards bytes both ways unchanged. On the way in it reads just
//! enough HTTP/1.1 to count requests: each request's head, its
//! `Content-Length` body, the action in `X-Amz-Target: AmazonSQS.<Action>`
//! and the queue in the JSON body's `QueueUrl` (or `QueueName`); keep-alive
//! connections carry many requests. A request it cannot frame (chunked
//! body, `Expect: 100-continue`) switches its connection to plain
//! forwarding and is counted as unparsed: the proxy never holds traffic up.
//! It also counts the messages each call carries: the entries of a batch
//! request, and the messages in each `ReceiveMessage` answer (read from the
//! answers coming back, which arrive in the order of the requests).
//!
//! `down()` stops listening (new connections are refused) and cuts every
//! open connection; `up()` listens on the same port again.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the accept loop looks for a new connection or a state change.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// How long `up()` keeps trying to listen on its old port again.
const REBIND_WAIT: Duration = Duration::from_secs(10);
/// The queue label of a request that names none (ListQueues, say).
pub const NO_QUEUE: &str = "-";

/// Requests seen per queue name (the last segment of `QueueUrl`) and SQS
/// action (`ReceiveMessage`, `DeleteMessageBatch`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub by_queue: BTreeMap<String, BTreeMap<String, u64>>,
    /// Messages carried per queue and action: entries of batch requests,
    /// messages in `ReceiveMessage` answers.
    pub carried: BTreeMap<String, BTreeMap<String, u64>>,
    /// `ReceiveMessage` answers without a message, per queue.
    pub empty_receives: BTreeMap<String, u64>,
    /// `ReceiveMessage` answers with at least one message, per queue.
    pub fruitful_receives: BTreeMap<String, u64>,
    /// Requests on connections the proxy could not frame (not counted above).
    pub unparsed: u64,
}

impl CallCounts {
    /// The calls on one queue, by action.
    pub fn on_queue(&self, name: &str) -> BTreeMap<String, u64> {
        self.by_queue.get(name).cloned().unwrap_or_default()
    }

    /// All calls on one queue.
    pub fn total_on(&self, name: &str) -> u64 {
        self.on_queue(name).values().sum()
    }

    /// Messages carried by one action's calls on one queue.
    pub fn carried_by(&self, name: &str, action: &str) -> u64 {
        self.carried
            .get(name)
            .and_then(|a| a.get(action))
            .copied()
            .unwrap_or(0)
    }

    /// `ReceiveMessage` calls on one queue that brought no message.
    pub fn empty_receives_on(&self, name: &str) -> u64 {
        self.empty_receives.get(name).copied().unwrap_or(0)
    }

    /// `ReceiveMessage` calls on one queue that brought messages.
    pub fn fruitful_receives_on(&self, name: &str) -> u64 {
        self.fruitful_receives.get(name).copied().unwrap_or(0)
    }
}

struct Shared {
    up: AtomicBool,
    listening: AtomicBool,
    stop: AtomicBool,
    next_conn: AtomicU64,
    /// Both sockets of every open connection, to cut them on `down()`.
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    counts: Mutex<CallCounts>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn cut_all(&self) {
        for (_, (client, server)) in lock(&self.conns).drain() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }

    fn count(&self, queue: &str, action: &str) {
        *lock(&self.counts)
            .by_queue
            .entry(queue.to_string())
            .or_default()
            .entry(action.to_string())
            .or_default() += 1;
    }

    fn carried(&self, queue: &str, action: &str, messages: u64) {
        let mut counts = lock(&self.counts);
        *counts
            .carried
            .entry(queue.to_string())
            .or_default()
            .entry(action.to_string())
            .or_default() += messages;
        if action == "ReceiveMessage" {
            let tally = if messages == 0 {
                &mut counts.empty_receives
            } else {
                &mut counts.fruitful_receives
            };
            *tally.entry(queue.to_string()).or_default() += 1;
        }
    }
}

/// A running proxy; stopped (and every connection cut) when dropped.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream_port`
    /// on 127.0.0.1.
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy's port");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking proxy listener");
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            listening: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            counts: Mutex::new(CallCounts::default()),
        });
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
        let accept = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(&shared, listener, port, upstream))
        };
        Proxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The endpoint is gone: returns once new connections are refused and
    /// every open one has been cut.
    pub fn down(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
        self.wait_listening(false);
        self.shared.cut_all();
    }

    /// The endpoint is back: returns once the proxy listens again.
    pub fn up(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
        self.wait_listening(true);
    }

    fn wait_listening(&self, want: bool) {
        let deadline = Instant::now() + REBIND_WAIT;
        while self.shared.listening.load(Ordering::SeqCst) != want {
            assert!(
                Instant::now() < deadline,
                "the proxy could not {} port {} within {REBIND_WAIT:?}",
                if want { "listen on" } else { "close" },
                self.port
            );
            std::thread::sleep(ACCEPT_POLL);
        }
    }

    /// The requests counted so far.
    pub fn calls(&self) -> CallCounts {
        lock(&self.shared.counts).clone()
    }

    /// Forgets the requests counted so far.
    pub fn reset_calls(&self) {
        *lock(&self.shared.counts) = CallCounts::default();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        self.shared.cut_all();
    }
}

fn accept_loop(shared: &Arc<Shared>, first: TcpListener, port: u16, upstream: SocketAddr) {
    let mut listener = Some(first);
    while !shared.stop.load(Ordering::SeqCst) {
        if !shared.up.load(Ordering::SeqCst) {
            if listener.take().is_some() {
                shared.listening.store(false, Ordering::SeqCst);
            }
            std::thread::sleep(ACCEPT_POLL);
            continue;
        }
        let Some(l) = &listener else {
            // std sets SO_REUSEADDR, so the old port is free at once.
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) if l.set_nonblocking(true).is_ok() => {
                    listener = Some(l);
                    shared.listening.store(true, Ordering::SeqCst);
                }
                _ => std::thread::sleep(ACCEPT_POLL),
            }
            continue;
        };
        match l.accept() {
            Ok((client, _)) => {
                let shared = shared.clone();
                std::thread::spawn(move || serve_connection(&shared, client, upstream));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

fn serve_connection(shared: &Arc<Shared>, client: TcpStream, upstream: SocketAddr) {
    if client.set_nonblocking(false).is_err() || !shared.up.load(Ordering::SeqCst) {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    lock(&shared.conns).insert(id, (c, s));
    if !shared.up.load(Ordering::SeqCst) {
        // Went down between accept and now: cut like the rest.
        shared.cut_all();
        return;
    }
    let (Ok(mut client_out), Ok(mut server_in)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (asked, answered) = mpsc::channel();
    let answers = shared.clone();
    let back = std::thread::spawn(move || {
        let _ = forward_answers(&answers, &answered, &mut server_in, &mut client_out);
        let _ = client_out.shutdown(Shutdown::Both);
    });
    let mut server_out = server;
    let _ = forward_requests(shared, &asked, &mut &client, &mut server_out);
    let _ = server_out.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
    let _ = back.join();
    lock(&shared.conns).remove(&id);
}

/// The head of one HTTP request, as far as counting needs it.
struct Head {
    /// Bytes of the head including the blank line.
    len: usize,
    content_length: usize,
    action: Option<String>,
    framed: bool,
}

fn parse_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut head = Head {
        len: end + 4,
        content_length: 0,
        action: None,
        framed: true,
    };
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => match value.parse() {
                Ok(n) => head.content_length = n,
                Err(_) => head.framed = false,
            },
            "transfer-encoding" => head.framed = false,
            "expect" => head.framed = false,
            "x-amz-target" => {
                let action = value.rsplit('.').next().unwrap_or(value);
                head.action = Some(action.to_string());
            }
            _ => {}
        }
    }
    Some(head)
}

/// The queue a JSON-protocol SQS request is about: the last path segment
/// of `QueueUrl`, or `QueueName`.
fn queue_of(body: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return NO_QUEUE.to_string();
    };
    if let Some(url) = json["QueueUrl"].as_str() {
        return url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(url)
            .to_string();
    }
    json["QueueName"].as_str().unwrap_or(NO_QUEUE).to_string()
}

/// The entries of a batch request (`Entries`), if it is one.
fn batch_entries(body: &[u8]) -> Option<u64> {
    let json = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    json["Entries"].as_array().map(|e| e.len() as u64)
}

/// Copies HTTP/1.1 messages (requests or answers) from `from` to `to`
/// unchanged, calling `seen` with the head and body of each one it can
/// frame (`Content-Length`). The first it cannot frame switches the
/// connection to plain copying, after `unframed` is called once.
fn forward_framed(
    from: &mut impl Read,
    to: &mut impl Write,
    mut seen: impl FnMut(Head, &[u8]),
    mut unframed: impl FnMut(),
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut framing = true;
    loop {
        while framing {
            let Some(head) = parse_head(&buf) else { break };
            if !head.framed {
                unframed();
                framing = false;
                break;
            }
            let total = head.len + head.content_length;
            if buf.len() < total {
                break;
            }
            let body_at = head.len;
            seen(head, &buf[body_at..total]);
            to.write_all(&buf[..total])?;
            buf.drain(..total);
        }
        if !framing && !buf.is_empty() {
            to.write_all(&buf)?;
            buf.clear();
        }
        let n = from.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Copies requests from `from` to `to`, counting each complete one and
/// telling the answer side which (queue, action) each was.
fn forward_requests(
    shared: &Shared,
    asked: &mpsc::Sender<(String, String)>,
    from: &mut impl Read,
    to: &mut impl Write,
) -> std::io::Result<()> {
    let seen = |head: Head, body: &[u8]| {
        let action = head.action.unwrap_or_else(|| "(not SQS)".to_string());
        let queue = queue_of(body);
        shared.count(&queue, &action);
        if let Some(entries) = batch_entries(body) {
            shared.carried(&queue, &action, entries);
        }
        let _ = asked.send((queue, action));
    };
    let unframed = || lock(&shared.counts).unparsed += 1;
    forward_framed(from, to, seen, unframed)
}

/// Copies answers from `from` to `to`; counts the messages in each
/// `ReceiveMessage` answer (answers come in the order of the requests).
fn forward_answers(
    shared: &Shared,
    answered: &mpsc::Receiver<(String, String)>,
    from: &mut impl Read,
    to: &mut impl Write,
) -> std::io::Result<()> {
    let seen = |_head: Head, body: &[u8]| {
        let Ok((queue, action)) = answered.try_recv() else {
            return;
        };
        if action == "ReceiveMessage" {
            let messages = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|json| json["Messages"].as_array().map(|m| m.len() as u64))
                .unwrap_or(0);
            shared.carried(&queue, &action, messages);
        }
    };
    forward_framed(from, to, seen, || {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_on_one_connection_are_counted_by_queue_and_action() {
        let shared = Shared {
            up: AtomicBool::new(true),
            listening: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            counts: Mutex::new(CallCounts::default()),
        };
        let request = |target: &str, body: &str| {
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: AmazonSQS.{target}\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let input = [
            request(
                "ReceiveMessage",
                r#"{"QueueUrl":"http://h:1/123456789012/jobs"}"#,
            ),
            request(
                "ReceiveMessage",
                r#"{"QueueUrl":"http://h:1/123456789012/jobs"}"#,
            ),
            request("GetQueueUrl", r#"{"QueueName":"dlq"}"#),
        ]
        .concat();
        let (asked, answered) = mpsc::channel();
        let mut out = Vec::new();
        forward_requests(&shared, &asked, &mut input.as_bytes(), &mut out).expect("forward");
        assert_eq!(out, input.as_bytes(), "bytes pass unchanged");

        let answer = |body: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let answers = [
            answer(r#"{"Messages":[{"MessageId":"a"},{"MessageId":"b"}]}"#),
            answer("{}"),
            answer(r#"{"QueueUrl":"http://h:1/123456789012/dlq"}"#),
        ]
        .concat();
        let mut back = Vec::new();
        forward_answers(&shared, &answered, &mut answers.as_bytes(), &mut back).expect("answers");
        assert_eq!(back, answers.as_bytes(), "answers pass unchanged");

        let counts = shared.counts.lock().expect("lock").clone();
        assert_eq!(counts.on_queue("jobs").get("ReceiveMessage"), Some(&2));
        assert_eq!(counts.on_queue("dlq").get("GetQueueUrl"), Some(&1));
        assert_eq!(counts.carried_by("jobs", "ReceiveMessage"), 2);
        assert_eq!(counts.empty_receives_on("jobs"), 1);
        assert_eq!(counts.fruitful_receives_on("jobs"), 1);
        assert_eq!(counts.unparsed, 0);
    }

    #[test]
    fn a_batch_request_counts_its_entries() {
        let body =
            r#"{"QueueUrl":"http://h:1/1/jobs","Entries":[{"Id":"0"},{"Id":"1"},{"Id":"2"}]}"#;
        assert_eq!(batch_entries(body.as_bytes()), Some(3));
        assert_eq!(batch_entries(br#"{"QueueUrl":"x"}"#), None);
    }
}
