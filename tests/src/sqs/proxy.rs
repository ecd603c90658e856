//! A TCP proxy between an agent and the local AWS server, for three things a
//! test cannot see or do from outside: how many SQS calls the agent makes
//! (per queue and action), what the agent does while the endpoint is gone,
//! and what it does when one kind of call fails the way SQS fails.
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
//! Requests of AWS's query protocol (a form body starting `Action=`, as
//! Auto Scaling speaks it) are counted by that action, and their
//! parameters are kept (`query_requests`), so a test can see what the
//! agent asked of a service moto does not fully serve; `Fault::Answer`
//! can then answer for it.
//!
//! `down()` stops listening (new connections are refused) and cuts every
//! open connection; `up()` listens on the same port again.
//!
//! `inject()` makes requests of one action (optionally on one queue) fail
//! for the next N matches or until cleared (see [`Fault`]): an error answer
//! shaped like SQS's own, a reset, a request that is never answered, or an
//! answer lost after the action took effect. A faulted request is counted
//! like any other. The SDK sends one request at a time on a connection (no
//! pipelining), so an answer the proxy makes up never overtakes one coming
//! back from upstream.

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
/// How often a hung request looks whether its client left or its fault
/// was cleared.
const HANG_POLL: Duration = Duration::from_millis(20);
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
    /// Adds `other`'s counts to these (runs measured one after another).
    pub fn add(&mut self, other: &CallCounts) {
        let merge = |into: &mut BTreeMap<String, BTreeMap<String, u64>>,
                     from: &BTreeMap<String, BTreeMap<String, u64>>| {
            for (queue, actions) in from {
                let into = into.entry(queue.clone()).or_default();
                for (action, n) in actions {
                    *into.entry(action.clone()).or_default() += n;
                }
            }
        };
        merge(&mut self.by_queue, &other.by_queue);
        merge(&mut self.carried, &other.carried);
        for (into, from) in [
            (&mut self.empty_receives, &other.empty_receives),
            (&mut self.fruitful_receives, &other.fruitful_receives),
        ] {
            for (queue, n) in from {
                *into.entry(queue.clone()).or_default() += n;
            }
        }
        self.unparsed += other.unparsed;
    }

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

/// What the proxy does to a request that matches an injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and an AWS JSON-protocol error body
    /// (`{"__type": ..., "message": ...}`) plus the `x-amzn-query-error:
    /// <code>;Sender` header the SQS JSON protocol uses; the request never
    /// reaches upstream. `code` is what the SDK reports as `e.code()`: the
    /// SDK takes it from that header (SQS's legacy query code, such as
    /// `AWS.SimpleQueueService.NonExistentQueue`), not from `__type`, which
    /// carries the JSON shape's name (`com.amazonaws.sqs#QueueDoesNotExist`).
    Error {
        status: u16,
        code: String,
        message: String,
    },
    /// Close the connection with a reset (SO_LINGER 0) instead of
    /// forwarding.
    Reset,
    /// Read the request, never forward it, never answer: the connection is
    /// held open until the client gives up or the fault is cleared (then
    /// it is closed).
    Hang,
    /// Forward to upstream, then cut the connection instead of returning
    /// the answer (the action took effect, the caller does not know).
    DropAnswer,
    /// Answer with this status and this XML body (the query protocol's
    /// shape; see [`Fault::query_ok`]) without forwarding.
    Answer { status: u16, xml: String },
    /// Answer 200 with every entry of the batch request in `Failed`
    /// (sender fault, this code), without forwarding: how SQS reports, say,
    /// `ReceiptHandleIsInvalid` for entries of a `DeleteMessageBatch` or
    /// `ChangeMessageVisibilityBatch`.
    BatchEntriesFail { code: String },
}

impl Fault {
    pub fn error(status: u16, code: &str, message: &str) -> Fault {
        Fault::Error {
            status,
            code: code.to_string(),
            message: message.to_string(),
        }
    }

    /// The queue is gone (deleted, or never existed).
    /// A query-protocol success answer to `action` with an empty result,
    /// as Auto Scaling gives for `CompleteLifecycleAction` and
    /// `RecordLifecycleActionHeartbeat`.
    pub fn query_ok(action: &str) -> Fault {
        Fault::Answer {
            status: 200,
            xml: format!(
                "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
                 <{action}Result/><ResponseMetadata><RequestId>proxy</RequestId></ResponseMetadata>\
                 </{action}Response>"
            ),
        }
    }

    /// A query-protocol error answer.
    pub fn query_error(status: u16, code: &str, message: &str) -> Fault {
        let fault = if status >= 500 { "Receiver" } else { "Sender" };
        Fault::Answer {
            status,
            xml: format!(
                "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
                 <Error><Type>{fault}</Type><Code>{code}</Code><Message>{message}</Message></Error>\
                 <RequestId>proxy</RequestId></ErrorResponse>"
            ),
        }
    }

    pub fn non_existent_queue() -> Fault {
        Fault::error(
            400,
            "AWS.SimpleQueueService.NonExistentQueue",
            "The specified queue does not exist.",
        )
    }

    /// SQS's throttling answer; the SDK's retry classifier and the agent
    /// both take `RequestThrottled` (like `ThrottlingException`) as
    /// throttling.
    pub fn throttled() -> Fault {
        Fault::error(400, "RequestThrottled", "Rate exceeded")
    }

    pub fn server_error() -> Fault {
        Fault::error(
            500,
            "InternalError",
            "We encountered an internal error. Please try again.",
        )
    }

    /// The caller's role may not use the queue for this action.
    pub fn access_denied() -> Fault {
        Fault::error(
            403,
            "AccessDenied",
            "User is not authorized to perform this action on the queue (injected by the test proxy).",
        )
    }

    /// A single-message call (`DeleteMessage`, `ChangeMessageVisibility`)
    /// with a receipt SQS no longer accepts.
    pub fn receipt_invalid() -> Fault {
        Fault::error(
            400,
            "ReceiptHandleIsInvalid",
            "The input receipt handle is invalid.",
        )
    }

    /// Every entry of a batch call fails with `code`.
    pub fn entries_fail(code: &str) -> Fault {
        Fault::BatchEntriesFail {
            code: code.to_string(),
        }
    }
}

/// Names one injected fault, to clear it or count its hits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

/// One injected fault and what it matches.
struct Rule {
    id: u64,
    action: String,
    queue: Option<String>,
    fault: Fault,
    /// Matches left; `None`: every match until cleared.
    left: Option<u32>,
}

#[derive(Default)]
struct Faults {
    next_id: u64,
    /// In the order injected: the first rule that matches applies.
    rules: Vec<Rule>,
    /// Hits per fault, kept after the fault is cleared.
    hits: HashMap<u64, u64>,
}

impl Faults {
    /// The fault a request meets, if any; counts the hit.
    fn take(&mut self, queue: &str, action: &str) -> Option<(u64, Fault)> {
        let rule = self.rules.iter_mut().find(|r| {
            r.action == action && r.queue.as_deref().is_none_or(|q| q == queue) && r.left != Some(0)
        })?;
        if let Some(left) = &mut rule.left {
            *left -= 1;
        }
        *self.hits.entry(rule.id).or_default() += 1;
        Some((rule.id, rule.fault.clone()))
    }

    /// Whether a fault is still injected (an exhausted one still holds the
    /// requests it hung).
    fn is_injected(&self, id: u64) -> bool {
        self.rules.iter().any(|r| r.id == id)
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
    faults: Mutex<Faults>,
    /// Query-protocol requests in arrival order: action and parameters.
    queries: Mutex<Vec<QueryRequest>>,
    log_batches: Mutex<Vec<LogBatch>>,
    /// Numbers the `x-amzn-RequestId` of made-up answers.
    next_answer: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn new() -> Shared {
        Shared {
            up: AtomicBool::new(true),
            listening: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            counts: Mutex::new(CallCounts::default()),
            faults: Mutex::new(Faults::default()),
            queries: Mutex::new(Vec::new()),
            log_batches: Mutex::new(Vec::new()),
            next_answer: AtomicU64::new(0),
        }
    }

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

    /// Whether a request hung by fault `id` should still be held.
    fn holds(&self, id: u64) -> bool {
        !self.stop.load(Ordering::SeqCst)
            && self.up.load(Ordering::SeqCst)
            && lock(&self.faults).is_injected(id)
    }

    fn request_id(&self) -> String {
        let n = self.next_answer.fetch_add(1, Ordering::SeqCst);
        format!("00000000-0000-4000-8000-{n:012}")
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
        let shared = Arc::new(Shared::new());
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

    /// The query-protocol requests of `action` seen so far (answered by a
    /// fault or forwarded), oldest first.
    pub fn query_requests(&self, action: &str) -> Vec<QueryRequest> {
        lock(&self.shared.queries)
            .iter()
            .filter(|q| q.action == action)
            .cloned()
            .collect()
    }

    /// What every `PutLogEvents` request seen so far carried, oldest first.
    pub fn log_batches(&self) -> Vec<LogBatch> {
        lock(&self.shared.log_batches).clone()
    }

    /// Forgets the requests counted so far.
    pub fn reset_calls(&self) {
        *lock(&self.shared.counts) = CallCounts::default();
    }

    /// From now on, requests of `action` (`ReceiveMessage`, as in
    /// `X-Amz-Target: AmazonSQS.ReceiveMessage`) on `queue` (the last
    /// segment of the request's `QueueUrl`; any queue if `None`) meet
    /// `fault`: the next `times` of them, or every one until cleared if
    /// `None`. When several faults match a request, the one injected first
    /// applies.
    pub fn inject(
        &self,
        action: &str,
        queue: Option<&str>,
        fault: Fault,
        times: Option<u32>,
    ) -> FaultId {
        let mut faults = lock(&self.shared.faults);
        faults.next_id += 1;
        let id = faults.next_id;
        faults.rules.push(Rule {
            id,
            action: action.to_string(),
            queue: queue.map(str::to_string),
            fault,
            left: times,
        });
        faults.hits.insert(id, 0);
        FaultId(id)
    }

    /// Ends one fault; requests it hung are closed.
    pub fn clear(&self, id: FaultId) {
        lock(&self.shared.faults).rules.retain(|r| r.id != id.0);
    }

    /// Ends every fault; requests they hung are closed.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).rules.clear();
    }

    /// How many requests this fault has hit so far (also after it was
    /// cleared).
    pub fn hits(&self, id: &FaultId) -> u64 {
        lock(&self.shared.faults)
            .hits
            .get(&id.0)
            .copied()
            .unwrap_or(0)
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

/// The client's side of a connection, written by both directions: answers
/// from upstream and answers the proxy makes up, one whole message at a
/// time.
#[derive(Clone)]
struct ToClient(Arc<Mutex<TcpStream>>);

impl Write for ToClient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        lock(&self.0).write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
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
    let (Ok(client_out), Ok(mut server_in)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let to_client = ToClient(Arc::new(Mutex::new(client_out)));
    // Set when the client is to get a reset: nothing may close the client
    // socket gracefully (a FIN) before its last descriptor is closed.
    let resetting = Arc::new(AtomicBool::new(false));
    let (asked, answered) = mpsc::channel();
    let back = {
        let shared = shared.clone();
        let mut to_client = to_client.clone();
        let resetting = resetting.clone();
        std::thread::spawn(move || {
            let _ = forward_answers(&shared, &answered, &mut server_in, &mut to_client);
            // Upstream is done, or an answer is being dropped: the client
            // learns it from the connection closing.
            let _ = server_in.shutdown(Shutdown::Both);
            if !resetting.load(Ordering::SeqCst) {
                let _ = lock(&to_client.0).shutdown(Shutdown::Both);
            }
        })
    };
    let mut server_out = server;
    let ended = forward_requests(
        shared,
        &asked,
        &mut &client,
        &mut server_out,
        &mut to_client.clone(),
    );
    match ended {
        Ok(Some(Cut::Hang(fault))) => hold_until_released(shared, &client, fault),
        Ok(Some(Cut::Reset)) => {
            resetting.store(true, Ordering::SeqCst);
            reset_on_close(&client);
        }
        Ok(None) | Ok(Some(Cut::Gone)) | Err(_) => {}
    }
    let _ = server_out.shutdown(Shutdown::Both);
    if !resetting.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
    }
    let _ = back.join();
    lock(&shared.conns).remove(&id);
    // With SO_LINGER 0, closing the last descriptor of the client socket
    // (here, now that the answer thread and the map let go of theirs)
    // sends the reset.
    drop(to_client);
    drop(client);
}

/// SO_LINGER 0: the socket's close sends a reset instead of a FIN.
fn reset_on_close(socket: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(socket, Linger, &linger);
}

/// Holds a hung request's connection open, reading (and dropping) whatever
/// the client still sends, until the client closes it, the fault is
/// cleared, or the proxy goes down or stops.
fn hold_until_released(shared: &Shared, client: &TcpStream, fault: u64) {
    if client.set_read_timeout(Some(HANG_POLL)).is_err() {
        return;
    }
    let mut ignored = [0u8; 4096];
    while shared.holds(fault) {
        match (&*client).read(&mut ignored) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// One `PutLogEvents` request, as CloudWatch Logs counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogBatch {
    pub events: usize,
    /// The messages' UTF-8 bytes plus 26 per event.
    pub bytes: usize,
    /// Last timestamp minus first, in ms.
    pub span_ms: i64,
    /// Whether the events are in time order.
    pub ordered: bool,
    /// The longest message, in bytes.
    pub longest: usize,
}

fn log_batch(body: &[u8]) -> Option<LogBatch> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let events = json["logEvents"].as_array()?;
    let stamps: Vec<i64> = events
        .iter()
        .filter_map(|e| e["timestamp"].as_i64())
        .collect();
    let sizes: Vec<usize> = events
        .iter()
        .map(|e| e["message"].as_str().map_or(0, str::len))
        .collect();
    Some(LogBatch {
        events: events.len(),
        bytes: sizes.iter().map(|n| n + 26).sum(),
        span_ms: stamps.last().zip(stamps.first()).map_or(0, |(l, f)| l - f),
        ordered: stamps.windows(2).all(|w| w[0] <= w[1]),
        longest: sizes.iter().copied().max().unwrap_or(0),
    })
}

/// One query-protocol request: its action and its other parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRequest {
    pub action: String,
    pub params: BTreeMap<String, String>,
}

impl QueryRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// The request, if its body is a query-protocol form (`Action=...&...`).
fn query_request(body: &[u8]) -> Option<QueryRequest> {
    let text = std::str::from_utf8(body).ok()?;
    if !text.starts_with("Action=") {
        return None;
    }
    let mut params: BTreeMap<String, String> = text
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((form_decode(k)?, form_decode(v)?))
        })
        .collect();
    let action = params.remove("Action")?;
    Some(QueryRequest { action, params })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a
/// byte.
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
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

/// The name of the JSON protocol's error shape that SQS sends in `__type`
/// along with a legacy query code.
fn json_error_type(code: &str) -> String {
    match code {
        "AWS.SimpleQueueService.NonExistentQueue" => "com.amazonaws.sqs#QueueDoesNotExist".into(),
        "AccessDenied" => "com.amazon.coral.service#AccessDeniedException".into(),
        "InternalError" => "com.amazon.coral.service#InternalFailure".into(),
        other => format!(
            "com.amazonaws.sqs#{}",
            other.rsplit('.').next().unwrap_or(other)
        ),
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// One whole HTTP/1.1 answer with a JSON-protocol body.
fn json_answer(status: u16, extra_headers: &str, request_id: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nx-amzn-RequestId: {request_id}\r\n{extra_headers}\
         Content-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

/// An answer in the query protocol's XML.
fn xml_answer(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

/// An error answer as SQS's JSON protocol gives it.
fn error_answer(status: u16, code: &str, message: &str, request_id: &str) -> Vec<u8> {
    let fault = if status >= 500 { "Receiver" } else { "Sender" };
    let body = serde_json::json!({
        "__type": json_error_type(code),
        "message": message,
    });
    json_answer(
        status,
        &format!("x-amzn-query-error: {code};{fault}\r\n"),
        request_id,
        &body.to_string(),
    )
}

/// A 200 answer to a batch request with each of its entries in `Failed`.
fn entries_failed_answer(request: &[u8], code: &str, request_id: &str) -> Vec<u8> {
    let ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(request)
        .ok()
        .and_then(|json| {
            json["Entries"].as_array().map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| e["Id"].as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    let failed: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "Id": id,
                "SenderFault": true,
                "Code": code,
                "Message": format!("{code} (injected by the test proxy)"),
            })
        })
        .collect();
    let body = serde_json::json!({ "Successful": [], "Failed": failed });
    json_answer(200, "", request_id, &body.to_string())
}

/// What to do with one framed message.
enum Flow<S> {
    /// Pass it on.
    Forward,
    /// Drop it and go on with the next one.
    Withhold,
    /// Drop it and stop copying, for the reason given.
    Stop(S),
}

/// Why a connection's requests stopped being copied before the client
/// closed it.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// Hold the connection open until fault `u64` is cleared.
    Hang(u64),
    /// Close the connection with a reset.
    Reset,
    /// The client cannot be written to any more.
    Gone,
}

/// Copies HTTP/1.1 messages (requests or answers) from `from` to `to`
/// unchanged, asking `seen` about the head and body of each one it can
/// frame (`Content-Length`). The first it cannot frame switches the
/// connection to plain copying, after `unframed` is called once. Returns
/// `None` once `from` is closed, or why `seen` stopped it.
fn forward_framed<S>(
    from: &mut impl Read,
    to: &mut impl Write,
    mut seen: impl FnMut(Head, &[u8]) -> Flow<S>,
    mut unframed: impl FnMut(),
) -> std::io::Result<Option<S>> {
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
            match seen(head, &buf[body_at..total]) {
                Flow::Forward => to.write_all(&buf[..total])?,
                Flow::Withhold => {}
                Flow::Stop(why) => return Ok(Some(why)),
            }
            buf.drain(..total);
        }
        if !framing && !buf.is_empty() {
            to.write_all(&buf)?;
            buf.clear();
        }
        let n = from.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A forwarded request, as the answer side needs to know it.
struct Asked {
    queue: String,
    action: String,
    /// Cut the connection instead of passing its answer on.
    drop_answer: bool,
}

/// Copies requests from `from` to `to`, counting each complete one and
/// telling the answer side which (queue, action) each was. A request that
/// meets a fault is answered on `client` (error answers) or stops the
/// copying (hang, reset).
fn forward_requests(
    shared: &Shared,
    asked: &mpsc::Sender<Asked>,
    from: &mut impl Read,
    to: &mut impl Write,
    client: &mut impl Write,
) -> std::io::Result<Option<Cut>> {
    let seen = |head: Head, body: &[u8]| {
        let query = query_request(body);
        let action = head
            .action
            .or_else(|| query.as_ref().map(|q| q.action.clone()))
            .unwrap_or_else(|| "(not SQS)".to_string());
        if let Some(query) = query {
            lock(&shared.queries).push(query);
        }
        if action == "PutLogEvents" {
            if let Some(batch) = log_batch(body) {
                lock(&shared.log_batches).push(batch);
            }
        }
        let queue = queue_of(body);
        shared.count(&queue, &action);
        if let Some(entries) = batch_entries(body) {
            shared.carried(&queue, &action, entries);
        }
        let fault = lock(&shared.faults).take(&queue, &action);
        let drop_answer = matches!(fault, Some((_, Fault::DropAnswer)));
        let made_up = match fault {
            None | Some((_, Fault::DropAnswer)) => {
                let _ = asked.send(Asked {
                    queue,
                    action,
                    drop_answer,
                });
                return Flow::Forward;
            }
            Some((id, Fault::Hang)) => return Flow::Stop(Cut::Hang(id)),
            Some((_, Fault::Reset)) => return Flow::Stop(Cut::Reset),
            Some((
                _,
                Fault::Error {
                    status,
                    code,
                    message,
                },
            )) => error_answer(status, &code, &message, &shared.request_id()),
            Some((_, Fault::BatchEntriesFail { code })) => {
                entries_failed_answer(body, &code, &shared.request_id())
            }
            Some((_, Fault::Answer { status, xml })) => xml_answer(status, &xml),
        };
        match client.write_all(&made_up) {
            Ok(()) => Flow::Withhold,
            Err(_) => Flow::Stop(Cut::Gone),
        }
    };
    let unframed = || lock(&shared.counts).unparsed += 1;
    forward_framed(from, to, seen, unframed)
}

/// Copies answers from `from` to `to`; counts the messages in each
/// `ReceiveMessage` answer (answers come in the order of the requests).
/// Stops at an answer that is to be dropped.
fn forward_answers(
    shared: &Shared,
    answered: &mpsc::Receiver<Asked>,
    from: &mut impl Read,
    to: &mut impl Write,
) -> std::io::Result<Option<()>> {
    let seen = |_head: Head, body: &[u8]| {
        let Ok(asked) = answered.try_recv() else {
            return Flow::Forward;
        };
        if asked.drop_answer {
            return Flow::Stop(());
        }
        if asked.action == "ReceiveMessage" {
            let messages = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|json| json["Messages"].as_array().map(|m| m.len() as u64))
                .unwrap_or(0);
            shared.carried(&asked.queue, &asked.action, messages);
        }
        Flow::Forward
    };
    forward_framed(from, to, seen, || {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventually;
    use crate::sqs::Moto;
    use aws_sdk_sqs::error::ProvideErrorMetadata;

    #[test]
    fn call_counts_of_two_runs_add_up_by_queue_and_action() {
        let counts = |n: u64| {
            let mut c = CallCounts::default();
            c.by_queue
                .entry("q".into())
                .or_default()
                .insert("ReceiveMessage".into(), n);
            c.carried
                .entry("q".into())
                .or_default()
                .insert("ReceiveMessage".into(), 8 * n);
            c.empty_receives.insert("q".into(), 1);
            c.unparsed = n;
            c
        };
        let mut sum = counts(2);
        sum.add(&counts(3));
        let mut other = CallCounts::default();
        other.fruitful_receives.insert("r".into(), 4);
        sum.add(&other);
        assert_eq!(sum.on_queue("q").get("ReceiveMessage"), Some(&5));
        assert_eq!(sum.carried_by("q", "ReceiveMessage"), 40);
        assert_eq!(sum.empty_receives.get("q"), Some(&2));
        assert_eq!(sum.fruitful_receives.get("r"), Some(&4));
        assert_eq!(sum.unparsed, 5);
    }

    #[test]
    fn a_query_protocol_form_is_read_as_its_action_and_decoded_parameters() {
        let q = query_request(
            b"Action=CompleteLifecycleAction&Version=2011-01-01&AutoScalingGroupName=my%2Fgroup&LifecycleHookName=drain+hook&InstanceId=i-0abc&LifecycleActionResult=CONTINUE",
        )
        .expect("a query request");
        assert_eq!(q.action, "CompleteLifecycleAction");
        assert_eq!(q.param("AutoScalingGroupName"), Some("my/group"));
        assert_eq!(q.param("LifecycleHookName"), Some("drain hook"));
        assert_eq!(q.param("LifecycleActionResult"), Some("CONTINUE"));
        assert_eq!(q.param("Action"), None);
        assert!(query_request(br#"{"QueueUrl": "x"}"#).is_none());
        assert!(query_request(b"Action=X&bad=%G1").is_some_and(|q| q.param("bad").is_none()));
    }

    fn request(target: &str, body: &str) -> String {
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: AmazonSQS.{target}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn answer(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn requests_on_one_connection_are_counted_by_queue_and_action() {
        let shared = Shared::new();
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
        let (mut out, mut made_up) = (Vec::new(), Vec::new());
        let ended = forward_requests(
            &shared,
            &asked,
            &mut input.as_bytes(),
            &mut out,
            &mut made_up,
        )
        .expect("forward");
        assert_eq!(ended, None, "copied until the input ended");
        assert_eq!(out, input.as_bytes(), "bytes pass unchanged");
        assert!(made_up.is_empty(), "no fault, no made-up answer");

        let answers = [
            answer(r#"{"Messages":[{"MessageId":"a"},{"MessageId":"b"}]}"#),
            answer("{}"),
            answer(r#"{"QueueUrl":"http://h:1/123456789012/dlq"}"#),
        ]
        .concat();
        let mut back = Vec::new();
        forward_answers(&shared, &answered, &mut answers.as_bytes(), &mut back).expect("answers");
        assert_eq!(back, answers.as_bytes(), "answers pass unchanged");

        let counts = lock(&shared.counts).clone();
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

    #[test]
    fn a_fault_for_the_next_request_answers_it_in_place_and_is_counted() {
        let shared = Shared::new();
        lock(&shared.faults).rules.push(Rule {
            id: 7,
            action: "ReceiveMessage".into(),
            queue: Some("jobs".into()),
            fault: Fault::throttled(),
            left: Some(1),
        });
        let jobs = r#"{"QueueUrl":"http://h:1/123456789012/jobs"}"#;
        let other = r#"{"QueueUrl":"http://h:1/123456789012/other"}"#;
        let input = [
            request("ReceiveMessage", other),
            request("ReceiveMessage", jobs),
            request("ReceiveMessage", jobs),
        ]
        .concat();
        let (asked, answered) = mpsc::channel();
        let (mut out, mut made_up) = (Vec::new(), Vec::new());
        forward_requests(
            &shared,
            &asked,
            &mut input.as_bytes(),
            &mut out,
            &mut made_up,
        )
        .expect("forward");
        let forwarded = [
            request("ReceiveMessage", other),
            request("ReceiveMessage", jobs),
        ]
        .concat();
        assert_eq!(
            out,
            forwarded.as_bytes(),
            "only the faulted one is held back"
        );
        let made_up = String::from_utf8(made_up).expect("text");
        assert!(
            made_up.starts_with("HTTP/1.1 400 Bad Request\r\n")
                && made_up.contains("\r\nx-amzn-query-error: RequestThrottled;Sender\r\n")
                && made_up.ends_with(
                    r#"{"__type":"com.amazonaws.sqs#RequestThrottled","message":"Rate exceeded"}"#
                ),
            "{made_up}"
        );
        assert_eq!(answered.try_iter().count(), 2, "two answers to come back");
        assert_eq!(lock(&shared.faults).hits.get(&7), Some(&1));
        let counts = lock(&shared.counts).clone();
        assert_eq!(counts.on_queue("jobs").get("ReceiveMessage"), Some(&2));
    }

    /// An SQS client of the test's own on `endpoint`, without the SDK's
    /// retries: each call is one request, so hits count calls.
    fn single_shot_client(endpoint: &str) -> (tokio::runtime::Runtime, aws_sdk_sqs::Client) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "testing",
                "testing",
                None,
                None,
                "proxy-test",
            ))
            .endpoint_url(endpoint)
            .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                    .operation_timeout(Duration::from_secs(60))
                    .build(),
            )
            .build();
        (rt, aws_sdk_sqs::Client::from_conf(conf))
    }

    type SendResult = Result<
        String,
        Box<aws_sdk_sqs::error::SdkError<aws_sdk_sqs::operation::send_message::SendMessageError>>,
    >;
    type ReceiveResult = Result<
        Vec<aws_sdk_sqs::types::Message>,
        Box<
            aws_sdk_sqs::error::SdkError<
                aws_sdk_sqs::operation::receive_message::ReceiveMessageError,
            >,
        >,
    >;

    /// moto, the proxy in front of it, a client through the proxy, and two
    /// queues (`jobs`, `other`) made on moto directly.
    struct World {
        _moto: Moto,
        proxy: Proxy,
        rt: tokio::runtime::Runtime,
        via_proxy: aws_sdk_sqs::Client,
        direct: crate::sqs::Aws,
        jobs: String,
        other: String,
    }

    impl World {
        fn start() -> World {
            let moto = Moto::start();
            let proxy = Proxy::start(moto.port());
            let (rt, via_proxy) = single_shot_client(&proxy.endpoint());
            let direct = crate::sqs::Aws::new(&moto.endpoint());
            let jobs = direct.create_queue("jobs", &[]);
            let other = direct.create_queue("other", &[]);
            World {
                _moto: moto,
                proxy,
                rt,
                via_proxy,
                direct,
                jobs,
                other,
            }
        }

        fn send(&self, url: &str) -> SendResult {
            self.rt
                .block_on(
                    self.via_proxy
                        .send_message()
                        .queue_url(url)
                        .message_body("hello")
                        .send(),
                )
                .map(|out| out.message_id.unwrap_or_default())
                .map_err(Box::new)
        }

        fn receive(&self, url: &str) -> ReceiveResult {
            self.rt
                .block_on(
                    self.via_proxy
                        .receive_message()
                        .queue_url(url)
                        .max_number_of_messages(10)
                        .send(),
                )
                .map(|out| out.messages.unwrap_or_default())
                .map_err(Box::new)
        }

        fn open_connections(&self) -> usize {
            lock(&self.proxy.shared.conns).len()
        }
    }

    #[test]
    fn injected_errors_reach_the_sdk_with_the_code_and_type_sqs_would_give() {
        let w = World::start();
        let gone = w.proxy.inject(
            "ReceiveMessage",
            Some("jobs"),
            Fault::non_existent_queue(),
            Some(1),
        );
        let e = w.receive(&w.jobs).expect_err("the queue is gone");
        assert_eq!(e.code(), Some("AWS.SimpleQueueService.NonExistentQueue"));
        assert_eq!(e.message(), Some("The specified queue does not exist."));
        assert!(
            e.as_service_error()
                .is_some_and(|s| s.is_queue_does_not_exist()),
            "the SDK's typed error: {e:?}"
        );
        assert_eq!(w.proxy.hits(&gone), 1);
        w.receive(&w.other).expect("another queue is not faulted");
        w.receive(&w.jobs).expect("the fault was for one request");
        assert_eq!(w.proxy.hits(&gone), 1);

        let throttled = w
            .proxy
            .inject("SendMessage", None, Fault::throttled(), None);
        for url in [&w.jobs, &w.other] {
            let e = w.send(url).expect_err("throttled");
            assert_eq!(e.code(), Some("RequestThrottled"));
            assert!(
                e.as_service_error()
                    .is_some_and(|s| s.is_request_throttled()),
                "{e:?}"
            );
        }
        assert_eq!(w.proxy.hits(&throttled), 2, "every queue, until cleared");
        w.proxy.clear(throttled);
        w.send(&w.jobs).expect("cleared");

        let denied = w
            .proxy
            .inject("SendMessage", Some("other"), Fault::access_denied(), None);
        let e = w.send(&w.other).expect_err("denied");
        assert_eq!(e.code(), Some("AccessDenied"));
        assert_eq!(
            e.raw_response().map(|r| r.status().as_u16()),
            Some(403),
            "{e:?}"
        );
        w.proxy.clear_faults();
        assert_eq!(w.proxy.hits(&denied), 1, "hits outlive the fault");

        w.proxy
            .inject("ReceiveMessage", None, Fault::server_error(), Some(1));
        let e = w.receive(&w.other).expect_err("a 500");
        assert_eq!(e.code(), Some("InternalError"));
        assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(500));

        let sent = w.direct.depth(&w.jobs).visible;
        assert_eq!(sent, 1, "only the send after the clear reached moto");
        let calls = w.proxy.calls();
        assert_eq!(
            calls.on_queue("jobs").get("ReceiveMessage"),
            Some(&2),
            "faulted requests are counted: {calls:?}"
        );
        assert_eq!(calls.on_queue("other").get("SendMessage"), Some(&2));
    }

    #[test]
    fn failed_batch_entries_reach_the_sdk_as_a_200_with_every_entry_failed_and_nothing_done() {
        let w = World::start();
        for body in ["a", "b"] {
            w.direct.send(&w.jobs, body);
        }
        let got = w.receive(&w.jobs).expect("receive");
        assert_eq!(got.len(), 2, "{got:?}");
        let invalid = w.proxy.inject(
            "DeleteMessageBatch",
            Some("jobs"),
            Fault::entries_fail("ReceiptHandleIsInvalid"),
            Some(1),
        );
        let entries: Vec<_> = got
            .iter()
            .enumerate()
            .map(|(i, m)| {
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(format!("e{i}"))
                    .receipt_handle(m.receipt_handle().expect("receipt"))
                    .build()
                    .expect("entry")
            })
            .collect();
        let delete = || {
            w.rt.block_on(
                w.via_proxy
                    .delete_message_batch()
                    .queue_url(&w.jobs)
                    .set_entries(Some(entries.clone()))
                    .send(),
            )
            .map_err(Box::new)
        };
        let out = delete().expect("a batch answer");
        assert!(out.successful().is_empty(), "{out:?}");
        let failed: Vec<(&str, &str, bool)> = out
            .failed()
            .iter()
            .map(|f| (f.id(), f.code(), f.sender_fault()))
            .collect();
        assert_eq!(
            failed,
            [
                ("e0", "ReceiptHandleIsInvalid", true),
                ("e1", "ReceiptHandleIsInvalid", true)
            ]
        );
        assert_eq!(w.proxy.hits(&invalid), 1);
        assert_eq!(
            w.direct.depth(&w.jobs).in_flight,
            2,
            "the delete never reached moto"
        );
        let out = delete().expect("the fault was for one request");
        assert_eq!(out.successful().len(), 2, "{out:?}");
        assert_eq!(w.proxy.calls().carried_by("jobs", "DeleteMessageBatch"), 4);
    }

    /// The kinds of the I/O errors among an error's causes.
    fn io_kinds(e: &(dyn std::error::Error + 'static)) -> Vec<ErrorKind> {
        let mut kinds = Vec::new();
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                kinds.push(io.kind());
            }
            cur = err.source();
        }
        kinds
    }

    #[test]
    fn a_reset_fails_the_call_without_an_answer_and_forwards_nothing() {
        let w = World::start();
        let reset = w
            .proxy
            .inject("SendMessage", Some("jobs"), Fault::Reset, Some(1));
        let e = w.send(&w.jobs).expect_err("reset");
        assert!(
            e.as_service_error().is_none() && e.raw_response().is_none(),
            "no answer at all: {e:?}"
        );
        assert!(
            io_kinds(&*e).contains(&ErrorKind::ConnectionReset),
            "a reset, not a graceful close: {e:?}"
        );
        assert_eq!(w.proxy.hits(&reset), 1);
        assert_eq!(w.direct.depth(&w.jobs).visible, 0, "nothing was sent");
        w.send(&w.jobs).expect("a new connection works");
        eventually(
            "the reset connection to be gone",
            Duration::from_secs(10),
            || w.open_connections() <= 1,
            || format!("{} connections open", w.open_connections()),
        );
    }

    #[test]
    fn a_dropped_answer_fails_the_call_although_the_action_took_effect() {
        let w = World::start();
        let dropped = w
            .proxy
            .inject("SendMessage", Some("jobs"), Fault::DropAnswer, Some(1));
        let e = w.send(&w.jobs).expect_err("no answer");
        assert!(
            e.as_service_error().is_none() && e.raw_response().is_none(),
            "no answer at all: {e:?}"
        );
        assert_eq!(w.proxy.hits(&dropped), 1);
        assert_eq!(
            w.direct.depth(&w.jobs).visible,
            1,
            "the message was sent all the same"
        );
    }

    #[test]
    fn a_hung_request_is_held_until_its_fault_is_cleared_then_closed() {
        let w = World::start();
        let hang = w
            .proxy
            .inject("ReceiveMessage", Some("jobs"), Fault::Hang, None);
        let outcome = std::thread::scope(|s| {
            let proxy = &w.proxy;
            let hang = &hang;
            s.spawn(move || {
                eventually(
                    "the receive to hang",
                    Duration::from_secs(30),
                    || proxy.hits(hang) == 1,
                    String::new,
                );
                proxy.clear(hang.clone());
            });
            w.receive(&w.jobs)
        });
        let e = outcome.expect_err("the hung call ends without an answer once cleared");
        assert!(e.raw_response().is_none(), "{e:?}");
        assert_eq!(w.proxy.hits(&hang), 1);
        eventually(
            "the hung connection to be closed",
            Duration::from_secs(10),
            || w.open_connections() == 0,
            || format!("{} connections open", w.open_connections()),
        );
        w.receive(&w.jobs).expect("cleared for good");
    }

    #[test]
    fn a_hung_request_whose_client_gives_up_lets_its_connection_go() {
        let w = World::start();
        let hang = w.proxy.inject("ReceiveMessage", None, Fault::Hang, None);
        let impatient = w
            .via_proxy
            .receive_message()
            .queue_url(&w.jobs)
            .customize()
            .config_override(
                aws_sdk_sqs::config::Config::builder().timeout_config(
                    aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                        .operation_timeout(Duration::from_secs(1))
                        .build(),
                ),
            );
        let e =
            w.rt.block_on(impatient.send())
                .expect_err("the client gives up");
        assert!(
            matches!(e, aws_sdk_sqs::error::SdkError::TimeoutError(_)),
            "{e:?}"
        );
        assert_eq!(w.proxy.hits(&hang), 1);
        // The client closes its side from a task of its runtime, which
        // only runs while the runtime is driven.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        w.rt.block_on(async {
            while w.open_connections() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        assert_eq!(
            w.open_connections(),
            0,
            "the abandoned connection is closed (the fault still stands)"
        );
    }
}
