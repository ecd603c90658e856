//! `bench_sqs`: how fast `batchly-agent run` works through a deep queue of
//! trivial jobs, next to a naive consumer measured in the same run against
//! the same local SQS, and how many SQS API calls the agent makes per job
//! on its job queue and on its events queue.
//!
//! ```text
//! cargo run -p batchly-e2e --bin bench_sqs -- [--jobs 1000] [--slots 8]
//!     [--server fauxqs|moto] [--release-agent] [--rounds 3] [--agent-log FILE]
//! ```
//!
//! The server is fauxqs (a fast in-memory SQS, installed by
//! `scripts/install-fauxqs`, started on loopback by `tests/fauxqs/start.mjs`)
//! when it is installed, else moto, which answers only a few dozen calls a
//! second on a deep queue and so measures moto more than the agent. Both
//! consumers talk to it through the same counting proxy.
//!
//! In order, in one run: start the server; pre-load N trivial jobs
//! (`/bin/true`, signed with the agent library's `envelope::sign` and a
//! fresh Ed25519 key); run the **baseline** to completion: one sequential
//! loop on the Rust SDK of `ReceiveMessage` (10, long poll) -> run each
//! job's command as a child process, one after another, verifying nothing
//! -> `DeleteMessageBatch` of those, timed from its first receive to its
//! last delete; pre-load N again; run the agent until every job's
//! `job.succeeded` event has arrived and the queue is empty, timed from the
//! first `job.started` to the last `job.succeeded` (the events' own `at`);
//! drain it; print both rates, their ratio and the agent's calls per job by
//! queue and action, each next to the issue's goal. With `--rounds N` the
//! two phases alternate N times and the medians are printed: a shared
//! machine's noise moves one phase at a time.
//!
//! It also prints where the CPU went, per job and phase, from
//! `/proc/PID/stat`: the consumer itself, the jobs it ran (the processes it
//! reaped), the bench process (proxy, baseline loop, event reader) and the
//! SQS server; and from their sum, the most jobs/s this machine's cores
//! could run if the phase were CPU-bound. On a machine with fewer cores than
//! slots, that ceiling, not the pipeline, is what bounds the ratio.
//!
//! It reports; it never fails on speed. The exit status is non-zero only
//! when a job was lost or did not succeed (in either consumer).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use batchly_agent::envelope::{sign, Alg, SigningKey};
use batchly_e2e::sqs::proxy::{CallCounts, Proxy};
use batchly_e2e::sqs::{aws_env, queue_name, unix_now, Aws, Moto, QueueDepth, QueueOptions};

/// Longest the bench waits without any progress (a new event, a received
/// message) before it gives up on a consumer.
const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Longest the agent may take to start, and to exit after SIGTERM.
const AGENT_WAIT: Duration = Duration::from_secs(60);
/// Longest fauxqs may take to print its port and answer.
const FAUXQS_START_WAIT: Duration = Duration::from_secs(30);
/// SQS's limit on messages per `ReceiveMessage` and entries per batch call.
const SQS_MAX_BATCH: usize = 10;
/// The longest long poll SQS allows (`WaitTimeSeconds`).
const LONG_POLL_S: i32 = 20;
/// The goals from issue 13: with `GOAL_SLOTS` slots, at least
/// `RATIO_GOAL` times the baseline's jobs/s, at no more than
/// `CALLS_PER_JOB_GOAL` calls per job on the job queue and on the events
/// queue each.
const GOAL_SLOTS: usize = 8;
const RATIO_GOAL: f64 = 2.0;
const CALLS_PER_JOB_GOAL: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Moto,
    Fauxqs,
}

struct Options {
    jobs: usize,
    slots: usize,
    release_agent: bool,
    /// `None`: fauxqs if installed, else moto.
    server: Option<ServerKind>,
    /// Keep the agent's log (at `debug`) here, to see where a run's time went.
    agent_log: Option<PathBuf>,
    /// Baseline and agent phases alternate this many times.
    rounds: usize,
}

const USAGE: &str = "usage: bench_sqs [--jobs N (1000)] [--slots N (8)] \
                     [--server fauxqs|moto (fauxqs if installed)] [--release-agent] \
                     [--rounds N (3)] [--agent-log FILE (the agent's log at debug level)]";

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        jobs: 1000,
        slots: 8,
        release_agent: false,
        server: None,
        agent_log: None,
        rounds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match arg.as_str() {
            "--jobs" => opts.jobs = number("--jobs")?,
            "--slots" => opts.slots = number("--slots")?,
            "--rounds" => opts.rounds = number("--rounds")?,
            "--release-agent" => opts.release_agent = true,
            "--agent-log" => {
                opts.agent_log = Some(
                    args.next()
                        .map(PathBuf::from)
                        .ok_or("--agent-log needs a file")?,
                )
            }
            "--server" => {
                opts.server = Some(match args.next().as_deref() {
                    Some("fauxqs") => ServerKind::Fauxqs,
                    Some("moto") => ServerKind::Moto,
                    other => return Err(format!("--server needs fauxqs or moto, not {other:?}")),
                })
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(opts)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate sits one level below the workspace root")
        .to_path_buf()
}

/// The agent binary: `BATCHLY_AGENT_BIN` for a debug agent, else the
/// workspace's agent built (or found up to date) by cargo first, so the
/// bench never measures a stale one. `--release-agent` always builds,
/// since `BATCHLY_AGENT_BIN` (set by scripts/test) names a debug build.
fn agent_bin(release: bool) -> Result<PathBuf, String> {
    if let (Some(bin), false) = (std::env::var_os("BATCHLY_AGENT_BIN"), release) {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "-p", "batchly-agent", "--bin", "batchly-agent"])
        .current_dir(workspace_root());
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .map_err(|e| format!("running {cargo:?} build: {e}"))?;
    if !status.success() {
        return Err(format!("building batchly-agent failed ({status})"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("batchly-agent");
    if !bin.is_file() {
        return Err(format!("no agent binary at {}", bin.display()));
    }
    Ok(bin)
}

/// Where scripts/install-fauxqs puts Node 22 and fauxqs.
fn installed_tool(var: &str, under_ci_node: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".ci/node").join(under_ci_node))
}

/// An installed fauxqs: the Node that runs it and its package folder.
struct FauxqsInstall {
    node: PathBuf,
    package: PathBuf,
    version: String,
}

/// `BATCHLY_TEST_NODE` and `BATCHLY_TEST_FAUXQS` (a node binary, the
/// fauxqs package folder), else the copies in `.ci/node`.
fn find_fauxqs() -> Result<FauxqsInstall, String> {
    let node = installed_tool("BATCHLY_TEST_NODE", "node_modules/.bin/node");
    let package = installed_tool("BATCHLY_TEST_FAUXQS", "node_modules/fauxqs");
    let manifest = package.join("package.json");
    if !node.is_file() || !manifest.is_file() {
        return Err(format!(
            "fauxqs is not installed (no {} or no {}): run `bash scripts/install-fauxqs`, \
             or set BATCHLY_TEST_NODE and BATCHLY_TEST_FAUXQS",
            node.display(),
            manifest.display()
        ));
    }
    let version = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|m| m["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "(unknown version)".to_string());
    Ok(FauxqsInstall {
        node,
        package,
        version,
    })
}

/// A fauxqs server on a free port of 127.0.0.1, stopped when dropped (and
/// by itself when the bench dies: it exits when its stdin closes).
struct Fauxqs {
    child: Child,
    port: u16,
    _stdin: ChildStdin,
    _dir: tempfile::TempDir,
}

impl Fauxqs {
    fn start(install: &FauxqsInstall) -> Result<Fauxqs, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fauxqs/start.mjs");
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir for fauxqs's log: {e}"))?;
        let log = dir.path().join("fauxqs.stderr");
        let mut child = Command::new(&install.node)
            // fauxqs loads node:sqlite, which warns on every start.
            .arg("--disable-warning=ExperimentalWarning")
            .arg(&script)
            .arg(&install.package)
            .arg("0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).map_err(|e| format!("fauxqs log: {e}"))?)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", install.node.display()))?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let failed = |child: &mut Child, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            format!("fauxqs ({}) did not start: {why}\n{text}", script.display())
        };
        let line = match rx.recv_timeout(FAUXQS_START_WAIT) {
            Ok(line) => line,
            Err(_) => {
                return Err(failed(
                    &mut child,
                    format!("no port within {FAUXQS_START_WAIT:?}"),
                ))
            }
        };
        let Some(port) = line
            .trim()
            .strip_prefix("listening 127.0.0.1:")
            .and_then(|p| p.parse::<u16>().ok())
        else {
            return Err(failed(&mut child, format!("it printed {line:?}")));
        };
        let deadline = Instant::now() + FAUXQS_START_WAIT;
        while !answers_health(port) {
            if Instant::now() >= deadline {
                return Err(failed(
                    &mut child,
                    format!("port {port} did not answer within {FAUXQS_START_WAIT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Fauxqs {
            child,
            port,
            _stdin: stdin,
            _dir: dir,
        })
    }
}

impl Drop for Fauxqs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether fauxqs's `/health` answers 200 on `port`.
fn answers_health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// The local SQS of the run; stopped when dropped.
enum Server {
    Moto(Moto),
    Fauxqs(Fauxqs, String),
}

impl Server {
    fn start(kind: Option<ServerKind>) -> Result<Server, String> {
        match kind {
            Some(ServerKind::Moto) => Ok(Server::Moto(Moto::start())),
            Some(ServerKind::Fauxqs) => {
                let install = find_fauxqs()?;
                Ok(Server::Fauxqs(Fauxqs::start(&install)?, install.version))
            }
            None => match find_fauxqs() {
                Ok(install) => Ok(Server::Fauxqs(Fauxqs::start(&install)?, install.version)),
                Err(why) => {
                    eprintln!("bench_sqs: {why}; using moto, which is far slower");
                    Ok(Server::Moto(Moto::start()))
                }
            },
        }
    }

    fn port(&self) -> u16 {
        match self {
            Server::Moto(moto) => moto.port(),
            Server::Fauxqs(fauxqs, _) => fauxqs.port,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    fn pid(&self) -> u32 {
        match self {
            Server::Moto(moto) => moto.pid(),
            Server::Fauxqs(fauxqs, _) => fauxqs.child.id(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Server::Moto(_) => "moto".to_string(),
            Server::Fauxqs(_, version) => format!("fauxqs {version}"),
        }
    }
}

/// What the baseline loop did.
struct Baseline {
    /// Jobs whose command ran and exited 0.
    succeeded: usize,
    /// Jobs whose command could not be read, could not start or failed.
    failed: usize,
    /// From the first receive to the last delete.
    elapsed: Duration,
    /// It gave up after `STALL_LIMIT` without a message.
    stalled: bool,
    /// Its calls, as the proxy counted them.
    calls: CallCounts,
    /// Where the CPU went while it ran.
    cpu: PhaseCpu,
}

/// The kernel reports `/proc` times in USER_HZ ticks, 100 a second on
/// every architecture Linux runs the agent on.
const USER_HZ: u64 = 100;

/// CPU time of one process from `/proc/PID/stat`: its own (all threads),
/// and that of the children it has waited for. Zero once it is gone.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    own: Duration,
    reaped: Duration,
}

impl Cpu {
    fn of(pid: u32) -> Cpu {
        Cpu::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
    }

    /// From the text of a `/proc/PID/stat`.
    fn parse(stat: &str) -> Cpu {
        // Fields after the command name, which may itself hold spaces and
        // parentheses: state is [0], utime [11], stime [12], cutime [13],
        // cstime [14].
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .map(|f| f.parse().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default();
        let ticks = |i: usize, j: usize| {
            let t = fields.get(i).copied().unwrap_or(0) + fields.get(j).copied().unwrap_or(0);
            Duration::from_millis(t * 1000 / USER_HZ)
        };
        Cpu {
            own: ticks(11, 12),
            reaped: ticks(13, 14),
        }
    }

    fn of_self() -> Cpu {
        Cpu::of(std::process::id())
    }

    /// Own CPU of `pid`'s live children (the agent's fork server).
    fn of_children(pid: u32) -> Duration {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|list| {
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .map(|child| Cpu::of(child).own)
            .sum()
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            own: self.own.saturating_sub(before.own),
            reaped: self.reaped.saturating_sub(before.reaped),
        }
    }
}

/// Where one phase's CPU went.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseCpu {
    /// The agent and its fork server (the baseline loop runs inside the
    /// bench process and is counted there).
    consumer: Duration,
    /// The jobs' processes, as reaped by the consumer.
    jobs: Duration,
    /// The bench process: the proxy, and the baseline loop or the event reader.
    bench: Duration,
    /// The SQS server.
    server: Duration,
}

impl PhaseCpu {
    fn all(&self) -> Duration {
        self.consumer + self.jobs + self.bench + self.server
    }

    fn add(&mut self, other: &PhaseCpu) {
        self.consumer += other.consumer;
        self.jobs += other.jobs;
        self.bench += other.bench;
        self.server += other.server;
    }
}

/// CPU of the bench process and the server, for a phase's start and end.
#[derive(Clone, Copy)]
struct CpuMark {
    bench: Cpu,
    server: Cpu,
}

impl CpuMark {
    fn now(server_pid: u32) -> CpuMark {
        CpuMark {
            bench: Cpu::of_self(),
            server: Cpu::of(server_pid),
        }
    }
}

/// The argv of a job message, read the naive way: no signature check, no
/// validation beyond what it takes to find `command`.
fn command_of(body: &str) -> Option<Vec<String>> {
    let envelope: serde_json::Value = serde_json::from_str(body).ok()?;
    let job: serde_json::Value = serde_json::from_str(envelope["job"].as_str()?).ok()?;
    let argv: Vec<String> = job["command"]
        .as_array()?
        .iter()
        .map(|a| a.as_str().map(str::to_string))
        .collect::<Option<_>>()?;
    (!argv.is_empty()).then_some(argv)
}

/// Whether `argv` ran and exited 0.
fn run_command(argv: &[String]) -> bool {
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The loop the agent is measured against, the shape a newcomer writes in
/// ten lines: receive up to 10 with a long poll, run each job one after
/// another, delete the batch. It stops once it has deleted `jobs`
/// messages.
fn run_baseline(aws: &Aws, queue_url: &str, jobs: usize) -> Result<Baseline, String> {
    let mut done = Baseline {
        succeeded: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        stalled: false,
        calls: CallCounts::default(),
        cpu: PhaseCpu::default(),
    };
    let start = Instant::now();
    let mut last_progress = start;
    while done.succeeded + done.failed < jobs {
        let received = aws
            .block_on(
                aws.sqs
                    .receive_message()
                    .queue_url(queue_url)
                    .max_number_of_messages(SQS_MAX_BATCH as i32)
                    .wait_time_seconds(LONG_POLL_S)
                    .send(),
            )
            .map_err(|e| format!("baseline: receiving from {queue_url}: {e:?}"))?;
        let messages = received.messages.unwrap_or_default();
        if messages.is_empty() {
            if last_progress.elapsed() > STALL_LIMIT {
                done.stalled = true;
                break;
            }
            continue;
        }
        let mut entries = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            match command_of(m.body().unwrap_or_default()) {
                Some(argv) if run_command(&argv) => done.succeeded += 1,
                _ => done.failed += 1,
            }
            entries.push(
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
                    .map_err(|e| format!("baseline: a delete entry: {e}"))?,
            );
        }
        let deleted = aws
            .block_on(
                aws.sqs
                    .delete_message_batch()
                    .queue_url(queue_url)
                    .set_entries(Some(entries))
                    .send(),
            )
            .map_err(|e| format!("baseline: deleting from {queue_url}: {e:?}"))?;
        if !deleted.failed().is_empty() {
            return Err(format!(
                "baseline: SQS refused deletes: {:?}",
                deleted.failed()
            ));
        }
        done.elapsed = start.elapsed();
        last_progress = Instant::now();
    }
    Ok(done)
}

/// Milliseconds since the Unix epoch of an event's `at`
/// (`2026-11-22T10:00:00.000Z`).
fn parse_at(at: &str) -> Option<i64> {
    let (date, time) = at.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// What the events queue told about the run.
#[derive(Default)]
struct Outcomes {
    succeeded: BTreeSet<String>,
    other_finals: BTreeMap<String, String>,
    first_start_ms: Option<i64>,
    last_success_ms: Option<i64>,
    events: u64,
}

impl Outcomes {
    fn add(&mut self, body: &str) {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(body) else {
            eprintln!("bench_sqs: an event that is not JSON: {body}");
            return;
        };
        self.events += 1;
        let kind = ev["type"].as_str().unwrap_or("");
        let message = ev["message_id"].as_str().unwrap_or("").to_string();
        let at = ev["at"].as_str().and_then(parse_at);
        if let (Some(at), "job.started") = (at, kind) {
            self.first_start_ms = Some(self.first_start_ms.map_or(at, |first| first.min(at)));
        }
        if ev["final"] == true {
            if kind == "job.succeeded" {
                self.succeeded.insert(message);
                self.last_success_ms = self.last_success_ms.max(at);
            } else {
                self.other_finals
                    .insert(message, format!("{kind}: {}", ev["reason"]));
            }
        }
    }

    fn done(&self) -> usize {
        self.succeeded.len() + self.other_finals.len()
    }
}

/// One line of the calls table.
fn calls_row(what: &str, n: u64, jobs: usize, note: &str) {
    let line = format!(
        "  {what:<34} {n:>7} {:>9.3}  {note}",
        n as f64 / jobs as f64
    );
    println!("{}", line.trim_end());
}

/// Prints the calls on one queue by action, with the messages each kind of
/// call carried; returns the calls per job of the `main` actions (the ones
/// made for jobs) in steady state: receives count only when they brought
/// work (receives that found the queue empty, or were still waiting when
/// the bench stopped, cost per second of idling, not per job). The rest
/// are one-off checks at start.
fn print_calls(title: &str, calls: &CallCounts, queue: &str, jobs: usize, main: &[&str]) -> f64 {
    let by_action = calls.on_queue(queue);
    let total: u64 = by_action.values().sum();
    calls_row(title, total, jobs, "");
    let mut steady = 0;
    for action in main {
        let n = by_action.get(*action).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let carried = calls.carried_by(queue, action);
        let (working, idle) = if *action == "ReceiveMessage" {
            let fruitful = calls.fruitful_receives_on(queue);
            (fruitful, n - fruitful)
        } else {
            (n, 0)
        };
        steady += working;
        let mut note = String::new();
        if carried > 0 {
            note = format!(
                "{:.2} messages per call",
                carried as f64 / working.max(1) as f64
            );
        }
        if idle > 0 {
            note.push_str(&format!(" ({idle} found nothing or were still polling)"));
        }
        calls_row(&format!("  {action}"), n, jobs, note.trim_start());
    }
    let rest: Vec<String> = by_action
        .iter()
        .filter(|(a, _)| !main.contains(&a.as_str()))
        .map(|(a, n)| format!("{a} {n}"))
        .collect();
    if !rest.is_empty() {
        let others = by_action
            .iter()
            .filter(|(a, _)| !main.contains(&a.as_str()))
            .map(|(_, n)| n)
            .sum();
        calls_row("  others (at start)", others, jobs, &rest.join(", "));
    }
    steady as f64 / jobs as f64
}

fn goal(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// jobs/s of `jobs` done in `elapsed`, if it can be told.
fn rate(jobs: usize, elapsed: Duration) -> Option<f64> {
    (jobs > 0 && !elapsed.is_zero()).then(|| jobs as f64 / elapsed.as_secs_f64())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench_sqs: {e}");
            ExitCode::from(2)
        }
    }
}

/// Sends `bodies` to the job queue; returns their message ids.
fn preload(aws: &Aws, queue_url: &str, bodies: &[String]) -> Result<BTreeSet<String>, String> {
    let sent: BTreeSet<String> = aws.send_batch(queue_url, bodies).into_iter().collect();
    if sent.len() != bodies.len() {
        return Err(format!(
            "only {} of {} jobs were queued",
            sent.len(),
            bodies.len()
        ));
    }
    Ok(sent)
}

/// What the agent phase saw.
struct AgentRun {
    outcomes: Outcomes,
    depth: QueueDepth,
    calls: CallCounts,
    exit: Option<std::process::ExitStatus>,
    log: String,
    cpu: PhaseCpu,
}

impl AgentRun {
    /// From the first `job.started` to the last `job.succeeded`.
    fn elapsed(&self) -> Option<Duration> {
        match (self.outcomes.first_start_ms, self.outcomes.last_success_ms) {
            (Some(a), Some(b)) if b > a => Some(Duration::from_millis((b - a) as u64)),
            _ => None,
        }
    }
}

/// One baseline phase and one agent phase, run back to back.
struct Round {
    baseline: Baseline,
    agent: AgentRun,
}

/// Writes the verification key where an agent's config points.
fn write_keys(key: &SigningKey, dir: &Path) -> Result<(), String> {
    let keys_file = dir.join("keys.toml");
    std::fs::write(&keys_file, key.verification_entry_toml())
        .and_then(|()| std::fs::set_permissions(&keys_file, std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| format!("writing {}: {e}", keys_file.display()))
}

fn run() -> Result<bool, String> {
    let opts = parse_args()?;
    let bin = agent_bin(opts.release_agent)?;
    let server = Server::start(opts.server)?;
    let aws = Aws::new(&server.endpoint());
    let proxy = Proxy::start(server.port());
    let queue = aws.job_queue("bench", &QueueOptions::default());
    let events_url = aws.create_queue("bench-events", &[]);
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;

    let key = SigningKey::generate(Alg::Ed25519, "bench").map_err(|e| e.to_string())?;
    let iat = unix_now();
    let bodies: Vec<String> = (0..opts.jobs)
        .map(|i| {
            let job = serde_json::json!({"id": format!("bench-{i:05}"), "command": ["/bin/true"]});
            sign(&key, iat, iat + 3600, &job.to_string())
        })
        .collect();

    let mut rounds = Vec::with_capacity(opts.rounds);
    let mut all_ok = true;
    for n in 1..=opts.rounds {
        // The baseline goes through the proxy too, so both consumers pay
        // for the same hop.
        preload(&aws, &queue.url, &bodies)?;
        proxy.reset_calls();
        let start = CpuMark::now(server.pid());
        let mut baseline = {
            let through_proxy = Aws::new(&proxy.endpoint());
            run_baseline(&through_proxy, &queue.url, opts.jobs)?
        };
        let end = CpuMark::now(server.pid());
        baseline.cpu = PhaseCpu {
            consumer: Duration::ZERO,
            jobs: end.bench.since(start.bench).reaped,
            bench: end.bench.since(start.bench).own,
            server: end.server.since(start.server).own,
        };
        baseline.calls = proxy.calls();

        let sent = preload(&aws, &queue.url, &bodies)?;
        proxy.reset_calls();
        // Each round's agent starts with empty state, work and log dirs.
        let root = dir.path().join(format!("round-{n}"));
        std::fs::create_dir(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        write_keys(&key, &root)?;
        let agent = run_agent(
            &opts,
            &bin,
            &proxy,
            &aws,
            Queues {
                jobs: &queue.url,
                events: &events_url,
            },
            &root,
            server.pid(),
        )?;
        all_ok &= round_ok(n, &opts, &sent, &baseline, &agent);
        rounds.push(Round { baseline, agent });
    }
    report(&opts, &bin, &server, &queue.url, &events_url, &rounds);
    Ok(all_ok)
}

/// Whether every job of both phases of round `n` succeeded; says which did not.
fn round_ok(
    n: usize,
    opts: &Options,
    sent: &BTreeSet<String>,
    baseline: &Baseline,
    agent: &AgentRun,
) -> bool {
    let lost: Vec<&String> = sent
        .iter()
        .filter(|m| {
            !agent.outcomes.succeeded.contains(*m) && !agent.outcomes.other_finals.contains_key(*m)
        })
        .collect();
    let agent_ok = lost.is_empty()
        && agent.outcomes.other_finals.is_empty()
        && agent.outcomes.succeeded.len() == opts.jobs;
    if !agent_ok {
        eprintln!(
            "bench_sqs: FAILED in round {n}: {} job(s) without a final event, {} not succeeded: {:?}\n--- agent log ---\n{}",
            lost.len(),
            agent.outcomes.other_finals.len(),
            agent.outcomes.other_finals.values().take(5).collect::<Vec<_>>(),
            agent.log
        );
    }
    let baseline_ok = baseline.succeeded == opts.jobs;
    if !baseline_ok {
        eprintln!(
            "bench_sqs: FAILED in round {n}: the baseline loop ran {} of {} jobs successfully ({} failed{})",
            baseline.succeeded,
            opts.jobs,
            baseline.failed,
            if baseline.stalled {
                ", then the queue ran dry"
            } else {
                ""
            }
        );
    }
    agent_ok && baseline_ok
}

/// The agent's job queue and events queue.
struct Queues<'a> {
    jobs: &'a str,
    events: &'a str,
}

/// Runs the agent (through the proxy) until every job has its final event
/// and the queue is empty, then drains it.
fn run_agent(
    opts: &Options,
    bin: &Path,
    proxy: &Proxy,
    aws: &Aws,
    queues: Queues<'_>,
    root: &Path,
    server_pid: u32,
) -> Result<AgentRun, String> {
    let Queues {
        jobs: queue_url,
        events: events_url,
    } = queues;
    let p = |sub: &str| toml_str(&root.join(sub).display().to_string());
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[queue]\nurl = {url}\nevents_url = {events}\n\n\
             [signing]\nkeys_file = {keys}\n\n[admin]\nsocket = {socket}\n\n\
             [state]\ndir = {state}\n\n[logs]\nspool_dir = {logs}\n\n\
             [jobs]\nwork_dir = {work}\nmax_concurrent = {slots}\n\n\
             [agent]\ninstance_id = \"bench\"\nlog_level = {level}\n",
            url = toml_str(queue_url),
            events = toml_str(events_url),
            keys = p("keys.toml"),
            socket = p("agent.sock"),
            state = p("state"),
            work = p("work"),
            logs = p("logs"),
            slots = opts.slots,
            level = if opts.agent_log.is_some() {
                "\"debug\""
            } else {
                "\"warn\""
            },
        ),
    )
    .map_err(|e| format!("writing {}: {e}", config.display()))?;

    let stderr_path = opts
        .agent_log
        .clone()
        .unwrap_or_else(|| root.join("agent.stderr"));
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("BATCHLY_") || k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
    }
    let start = CpuMark::now(server_pid);
    let mut agent = cmd
        .arg("run")
        .arg("--config")
        .arg(&config)
        .envs(aws_env(&proxy.endpoint()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let agent_log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    let mut outcomes = Outcomes::default();
    let mut last_progress = Instant::now();
    while outcomes.done() < opts.jobs {
        if let Some(status) = agent.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("the agent exited ({status}):\n{}", agent_log()));
        }
        let before = outcomes.events;
        for m in aws.take_all(events_url, 1) {
            outcomes.add(&m.body);
        }
        if outcomes.events > before {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > STALL_LIMIT {
            eprintln!(
                "bench_sqs: no event for {STALL_LIMIT:?}; {} of {} jobs done",
                outcomes.done(),
                opts.jobs
            );
            break;
        }
    }
    // Deletes come after the final events (ack last): wait for them too.
    let deadline = Instant::now() + STALL_LIMIT;
    while !aws.depth(queue_url).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let depth = aws.depth(queue_url);
    let calls = proxy.calls();
    let end = CpuMark::now(server_pid);
    let agent_cpu = Cpu::of(agent.id());
    let cpu = PhaseCpu {
        consumer: agent_cpu.own + Cpu::of_children(agent.id()),
        jobs: agent_cpu.reaped,
        bench: end.bench.since(start.bench).own,
        server: end.server.since(start.server).own,
    };

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + AGENT_WAIT;
    let exit = loop {
        if let Some(status) = agent.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(AgentRun {
        outcomes,
        depth,
        calls,
        exit,
        log: agent_log(),
        cpu,
    })
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Milliseconds per job of `cpu`.
fn ms_per_job(cpu: Duration, jobs: usize) -> f64 {
    cpu.as_secs_f64() * 1000.0 / jobs.max(1) as f64
}

/// Prints where each phase's CPU went, per job, and the jobs/s this
/// machine's cores could give a phase that was CPU-bound.
fn report_cpu(rounds: &[Round], jobs: usize) {
    let (mut baseline, mut agent) = (PhaseCpu::default(), PhaseCpu::default());
    for r in rounds {
        baseline.add(&r.baseline.cpu);
        agent.add(&r.agent.cpu);
    }
    let n = jobs * rounds.len();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!();
    println!(
        "  {:<34} {:>8} {:>8}",
        "CPU per job, ms", "baseline", "agent"
    );
    let row = |what: &str, b: Option<Duration>, a: Duration, note: &str| {
        let b = b.map_or("-".to_string(), |b| format!("{:.3}", ms_per_job(b, n)));
        println!("  {what:<34} {b:>8} {:>8.3}  {note}", ms_per_job(a, n));
    };
    row(
        "consumer",
        None,
        agent.consumer,
        "(agent and fork server; the loop is in bench)",
    );
    row(
        "jobs",
        Some(baseline.jobs),
        agent.jobs,
        "(the processes the consumer reaped)",
    );
    row(
        "bench process",
        Some(baseline.bench),
        agent.bench,
        "(proxy; the loop / the event reader)",
    );
    row("SQS server", Some(baseline.server), agent.server, "");
    row("all", Some(baseline.all()), agent.all(), "");
    let ceiling = |cpu: Duration| {
        let per_job = ms_per_job(cpu, n);
        if per_job > 0.0 {
            format!("{:.0}", cores as f64 * 1000.0 / per_job)
        } else {
            "-".to_string()
        }
    };
    println!(
        "  {:<34} {:>8} {:>8}  (jobs/s, were the phase CPU-bound)",
        format!("ceiling on {cores} cores"),
        ceiling(baseline.all()),
        ceiling(agent.all())
    );
}

/// Prints the table of both consumers' rates and the agent's calls.
fn report(
    opts: &Options,
    bin: &Path,
    server: &Server,
    queue_url: &str,
    events_url: &str,
    rounds: &[Round],
) {
    let n = opts.jobs;
    println!(
        "bench_sqs: {n} jobs (/bin/true) x {} round(s), SQS = {} on 127.0.0.1 behind a counting \
         proxy; agent: {} with {} slots",
        rounds.len(),
        server.describe(),
        bin.display(),
        opts.slots,
    );
    let mut per_round = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        let outcomes = &r.agent.outcomes;
        println!(
            "  round {}: agent succeeded {} of {n}, other final outcomes {}, left in the queue {:?}",
            i + 1,
            outcomes.succeeded.len(),
            outcomes.other_finals.len(),
            r.agent.depth
        );
        let b = rate(r.baseline.succeeded + r.baseline.failed, r.baseline.elapsed);
        let a = r
            .agent
            .elapsed()
            .and_then(|e| rate(outcomes.succeeded.len(), e));
        if let (Some(b), Some(a)) = (b, a) {
            println!(
                "           baseline {b:.1} jobs/s, agent {a:.1} jobs/s, ratio {:.2}x",
                a / b
            );
        }
        per_round.push((b, a));
    }
    println!();
    println!(
        "  {:<34} {:>7}  goal (median of {} round(s))",
        "throughput",
        "jobs/s",
        rounds.len()
    );
    let baseline_rate = median(per_round.iter().filter_map(|(b, _)| *b).collect());
    match baseline_rate {
        Some(r) => println!(
            "  {:<34} {r:>7.1}  (receive 10, run each, delete batch; first receive to last delete)",
            "baseline loop (Rust SDK)",
        ),
        None => println!("  {:<34} {:>7}", "baseline loop (Rust SDK)", "-"),
    }
    let agent_rate = median(per_round.iter().filter_map(|(_, a)| *a).collect());
    match agent_rate {
        Some(r) => println!(
            "  {:<34} {r:>7.1}  (first job.started to last job.succeeded)",
            format!("agent, {} slots", opts.slots),
        ),
        None => println!(
            "  {:<34} {:>7}  (not measurable: no start or success events)",
            format!("agent, {} slots", opts.slots),
            "-"
        ),
    }
    let slots_note = if opts.slots == GOAL_SLOTS {
        String::new()
    } else {
        format!(" (the goal is for {GOAL_SLOTS} slots)")
    };
    let ratios: Vec<f64> = per_round
        .iter()
        .filter_map(|(b, a)| Some(a.as_ref()? / b.as_ref()?))
        .collect();
    match median(ratios) {
        Some(ratio) => println!(
            "  {:<34} {:>6.2}x  >= {RATIO_GOAL}x: {}{slots_note}",
            "ratio agent / baseline",
            ratio,
            goal(ratio >= RATIO_GOAL)
        ),
        None => println!("  {:<34} {:>7}", "ratio agent / baseline", "-"),
    }
    report_cpu(rounds, n);

    let mut calls = CallCounts::default();
    let mut baseline_calls = CallCounts::default();
    for r in rounds {
        calls.add(&r.agent.calls);
        baseline_calls.add(&r.baseline.calls);
    }
    let n = n * rounds.len();
    println!();
    println!(
        "  {:<34} {:>7} {:>9}",
        "agent's SQS calls", "calls", "per job"
    );
    let job_queue = queue_name(queue_url);
    let per_job = print_calls(
        &format!("job queue {job_queue}"),
        &calls,
        job_queue,
        n,
        &[
            "ReceiveMessage",
            "DeleteMessageBatch",
            "ChangeMessageVisibilityBatch",
            "DeleteMessage",
            "ChangeMessageVisibility",
            "SendMessage",
            "SendMessageBatch",
        ],
    );
    calls_row(
        "  steady state (less idle receives)",
        (per_job * n as f64).round() as u64,
        n,
        &format!(
            "goal <= {CALLS_PER_JOB_GOAL}: {}",
            goal(per_job <= CALLS_PER_JOB_GOAL)
        ),
    );
    let events_queue = queue_name(events_url);
    let events_per_job = print_calls(
        &format!("events queue {events_queue}"),
        &calls,
        events_queue,
        n,
        &["SendMessageBatch", "SendMessage"],
    );
    calls_row(
        "  steady state",
        (events_per_job * n as f64).round() as u64,
        n,
        &format!(
            "goal <= {CALLS_PER_JOB_GOAL}: {}",
            goal(events_per_job <= CALLS_PER_JOB_GOAL)
        ),
    );
    for (q, by_action) in &calls.by_queue {
        if q != job_queue && q != events_queue {
            println!("  other queue {q}: {by_action:?}");
        }
    }
    if calls.unparsed > 0 {
        println!(
            "  ({} requests could not be framed and were not counted)",
            calls.unparsed
        );
    }
    let baseline_by_action: Vec<String> = baseline_calls
        .on_queue(job_queue)
        .iter()
        .map(|(a, c)| format!("{a} {c}"))
        .collect();
    println!(
        "  (baseline's calls on {job_queue}: {})",
        baseline_by_action.join(", ")
    );
    for (i, r) in rounds.iter().enumerate() {
        match r.agent.exit {
            Some(status) => println!("  round {}: agent after SIGTERM: {status}", i + 1),
            None => println!(
                "  round {}: agent did not exit within {AGENT_WAIT:?} of SIGTERM (killed)",
                i + 1
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{command_of, median, parse_at, Cpu, Duration};

    #[test]
    fn cpu_times_are_read_past_a_command_name_with_parentheses_and_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime ...
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 10 0 0 0 150 50 7 3 20 0 1 0";
        let cpu = Cpu::parse(stat);
        assert_eq!(cpu.own, Duration::from_millis(2000));
        assert_eq!(cpu.reaped, Duration::from_millis(100));
        assert_eq!(Cpu::parse("").own, Duration::ZERO);
    }

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn event_times_parse_to_unix_milliseconds() {
        assert_eq!(parse_at("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            parse_at("2026-11-22T10:00:00.250Z"),
            Some(1_795_341_600_250)
        );
        assert_eq!(parse_at("2000-03-01T00:00:01Z"), Some(951_868_801_000));
        assert_eq!(parse_at("yesterday"), None);
    }

    #[test]
    fn the_baseline_reads_a_jobs_command_out_of_its_envelope_without_checking_it() {
        let job = r#"{"id":"a","command":["/bin/true","x"]}"#;
        let body = serde_json::json!({"v": 1, "kid": "k", "iat": 0, "exp": 1, "job": job, "sig": "not checked"});
        assert_eq!(
            command_of(&body.to_string()),
            Some(vec!["/bin/true".to_string(), "x".to_string()])
        );
        assert_eq!(command_of("not json"), None);
        assert_eq!(command_of(r#"{"job":"{\"command\":[]}"}"#), None);
    }
}
