//! Harness of the end-to-end suite: finds (or builds) the real
//! `batchly-agent` binary, runs its one-shot commands, and drives `dev`
//! agents, each on its own temporary directory, through their public
//! surface only: the CLI, the queue directory, `events.jsonl`, job logs and
//! signals.
//!
//! Nothing here depends on how fast the machine is: every wait is a bounded
//! poll of a condition with a generous limit, and a wait that runs out
//! panics with everything needed to see why (the events so far and the
//! agent's own log).
//!
//! `sqs` drives `batchly-agent run` against a local AWS server (moto);
//! `imds` is a fake EC2 instance metadata service.

pub mod imds;
pub mod netns;
pub mod sqs;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

/// The longest any condition is waited for. Far above what a healthy run
/// needs, so only a real failure reaches it.
pub const WAIT: Duration = Duration::from_secs(60);
/// How long a starting agent may take to open its admin socket.
const START_WAIT: Duration = Duration::from_secs(10);
/// How often a condition is re-checked.
const POLL: Duration = Duration::from_millis(15);
/// How often a starting agent's socket is tried: often, so that a test acts
/// as soon as the agent is up, as a supervisor script would.
const START_POLL: Duration = Duration::from_millis(1);

/// Agent settings every `DevAgent` starts with unless a test overrides them:
/// four slots, immediate retries, and a short kill grace so timeouts end
/// quickly.
const DEV_DEFAULTS: &[(&str, &str)] = &[
    ("BATCHLY_JOBS_MAX_CONCURRENT", "4"),
    // Jobs run as unprivileged uids in a read-only view of the host: the
    // mark dir is the one place they may leave traces for the test.
    ("BATCHLY_JOBS_RETRY_BACKOFF_S", "0"),
    ("BATCHLY_JOBS_KILL_GRACE_S", "1"),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate sits one level below the workspace root")
        .to_path_buf()
}

/// The agent binary under test: `BATCHLY_AGENT_BIN` if set, else built once
/// per test process with the cargo that runs the tests.
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("BATCHLY_AGENT_BIN") {
        Some(path) => PathBuf::from(path),
        None => build_agent(),
    })
}

fn build_agent() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let out = Command::new(&cargo)
        .args(["build", "-p", "batchly-agent", "--bin", "batchly-agent"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cargo:?} build for the agent binary: {e}"));
    assert!(
        out.status.success(),
        "building batchly-agent failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = root.join("target/debug/batchly-agent");
    assert!(bin.is_file(), "cargo built no binary at {}", bin.display());
    bin
}

/// A command running the agent binary with the test's environment minus
/// everything that would configure the agent behind the test's back
/// (`BATCHLY_*` overrides, AWS settings).
fn agent_command() -> Command {
    without_agent_env(Command::new(agent_bin()))
}

/// `cmd` without the test process's `BATCHLY_*` and `AWS_*` variables.
fn without_agent_env(mut cmd: Command) -> Command {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("BATCHLY_") || key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A finished one-shot command.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The exit code; panics (showing the output) if a signal ended it.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("command was killed by a signal: {self:#?}"))
    }
}

/// Runs `batchly-agent ARGS` with `env` added, waiting at most `WAIT`.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Run {
    run_cli_within(args, env, WAIT)
}

/// Runs `batchly-agent ARGS`; panics if it has not exited within `limit`
/// (see [`run_within`]).
pub fn run_cli_within(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let mut cmd = agent_command();
    cmd.args(args).envs(env.iter().copied());
    run_within(cmd, &format!("batchly-agent {args:?}"), limit)
}

/// Runs `cmd` (described as `what`), waiting at most `WAIT`.
pub fn run_command(cmd: Command, what: &str) -> Run {
    run_within(cmd, what, WAIT)
}

/// Runs `cmd` (described as `what`) in a temporary working directory;
/// panics if it has not exited within `limit` (the process is killed
/// first). Output goes through files, so a chatty command never blocks on
/// a full pipe.
pub fn run_within(mut cmd: Command, what: &str, limit: Duration) -> Run {
    let tmp = tempfile::tempdir().expect("tempdir for command output");
    let out_path = tmp.path().join("stdout");
    let err_path = tmp.path().join("stderr");
    let mut child = cmd
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the command") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not exit within {limit:?}; stderr:\n{}",
                read_lossy(&err_path)
            );
        }
        std::thread::sleep(POLL);
    };
    Run {
        status,
        stdout: read_lossy(&out_path),
        stderr: read_lossy(&err_path),
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Polls `cond` until it holds; panics after `limit` with `what` and the
/// text `context` gives at that moment.
pub fn eventually(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            panic!(
                "timed out after {limit:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Whether `pid` is a live process (a zombie has exited: it is not).
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')' (the command name may hold spaces).
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
}

/// Waits until `path` holds a whole line with a pid (a job writes it) and
/// returns the pid.
pub fn read_pid_file(path: &Path) -> i32 {
    let mut pid = None;
    eventually(
        &format!("a pid in {}", path.display()),
        WAIT,
        || {
            pid = std::fs::read_to_string(path)
                .ok()
                .filter(|t| t.ends_with('\n'))
                .and_then(|t| host_pid(t.trim()));
            pid.is_some()
        },
        || {
            format!(
                "{} holds {:?}",
                path.display(),
                std::fs::read_to_string(path)
            )
        },
    );
    pid.expect("set by the poll above")
}

/// Waits until `pid` is gone, panicking after `WAIT`.
pub fn wait_gone(pid: i32, what: &str) {
    eventually(
        &format!("{what} (pid {pid}) to be gone"),
        WAIT,
        || !pid_alive(pid),
        || {
            format!(
                "/proc/{pid}/stat: {:?}",
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
            )
        },
    );
}

/// Peak resident memory of `pid` in bytes (`VmHWM` of `/proc/PID/status`).
pub fn peak_rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status:\n{status}"));
    kib * 1024
}

/// Names of the entries of a directory (empty if it does not exist).
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// One job event from `events.jsonl`, with the members tests look at.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: String,
    pub job_id: Option<String>,
    pub message_id: String,
    pub attempt: u64,
    pub is_final: bool,
    pub reason: Option<String>,
    pub exit_code: Option<i64>,
    pub signal: Option<String>,
    pub log_stream: Option<String>,
    pub raw: Value,
}

impl Event {
    /// A job event; `None` for the agent's own `agent.*` events, which
    /// carry no job.
    fn parse_job(line: &str) -> Option<Event> {
        let kind = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string));
        if kind.is_some_and(|k| k.starts_with("agent.")) {
            return None;
        }
        Some(Event::parse(line))
    }

    fn parse(line: &str) -> Event {
        let raw: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("events.jsonl line is not JSON ({e}): {line}"));
        let text = |name: &str| -> Option<String> {
            match &raw[name] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => panic!("event member {name} is not a string or null: {other} in {line}"),
            }
        };
        let required =
            |name: &str| text(name).unwrap_or_else(|| panic!("event without {name}: {line}"));
        assert_eq!(raw["v"], 1, "event schema version: {line}");
        Event {
            kind: required("type"),
            job_id: text("job_id"),
            message_id: required("message_id"),
            attempt: raw["attempt"]
                .as_u64()
                .unwrap_or_else(|| panic!("event without an integer attempt: {line}")),
            is_final: raw["final"]
                .as_bool()
                .unwrap_or_else(|| panic!("event without a boolean final: {line}")),
            reason: text("reason"),
            exit_code: raw["exit_code"].as_i64(),
            signal: text("signal"),
            log_stream: text("log_stream"),
            raw: raw.clone(),
        }
    }
}

/// The events of one message, in the order they were written.
pub fn of_message<'a>(events: &'a [Event], message_id: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.message_id == message_id)
        .collect()
}

/// The events of one job, by its id: on SQS a release that is not a
/// failure (exit 75, drain) replaces the message with a copy under a new
/// message id, so a job's events may span several message ids.
pub fn of_job<'a>(events: &'a [Event], job_id: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.job_id.as_deref() == Some(job_id))
        .collect()
}

/// How many events have `final: true` and type `kind` (any type if `None`).
pub fn count_final(events: &[Event], kind: Option<&str>) -> usize {
    events
        .iter()
        .filter(|e| e.is_final && kind.is_none_or(|k| e.kind == k))
        .count()
}

/// How many events are of type `kind`.
pub fn count_kind(events: &[Event], kind: &str) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

/// The job events of every complete line of `DIR/events.jsonl` so far
/// (`DIR` is a `dev` agent's directory).
pub fn dev_events(dir: &Path) -> Vec<Event> {
    let text = read_lossy(&dir.join("events.jsonl"));
    // A line still being written has no newline yet: leave it for later.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(Event::parse_job)
        .collect()
}

/// Message ids named in the files of `DIR/queue` of a `dev` directory
/// (`<visible>-<id>.<f>.<r>.msg`): the messages waiting to run.
pub fn queued_message_ids(dir: &Path) -> BTreeSet<String> {
    list_dir(&dir.join("queue"))
        .iter()
        .filter_map(|name| {
            let stem = name.strip_suffix(".msg")?;
            let (_, rest) = stem.split_once('-')?;
            Some(rest.split('.').next()?.to_string())
        })
        .collect()
}

/// `batchly-agent submit --dir DIR ARGS`; panics unless it succeeds.
pub fn submit_to_dir(dir: &Path, args: &[&str]) -> Vec<Submitted> {
    let dir = dir.display().to_string();
    let mut full = vec!["submit", "--dir", dir.as_str()];
    full.extend_from_slice(args);
    let run = run_cli(&full, &[]);
    assert_eq!(run.code(), 0, "submit {args:?} failed: {run:#?}");
    run.stdout
        .lines()
        .map(|line| {
            let (job_id, message_id) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("submit printed {line:?}, not JOB<TAB>MESSAGE"));
            Submitted {
                job_id: job_id.to_string(),
                message_id: message_id.to_string(),
            }
        })
        .collect()
}

/// A job `submit` queued: its job id and message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub job_id: String,
    pub message_id: String,
}

/// A `batchly-agent dev` agent on its own temporary directory.
///
/// Layout of the temporary root: `dev/` is the agent's DIR, `mark/` is where
/// jobs leave traces (pass `--env` [`DevAgent::mark_env`]), and
/// `agent-N.stdout` / `agent-N.stderr` hold the output of the N-th run.
pub struct DevAgent {
    root: TempDir,
    dir: PathBuf,
    mark: PathBuf,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    child: Option<Child>,
    runs: u32,
}

impl DevAgent {
    /// Starts an agent with the harness defaults overridden by `env`.
    pub fn start(env: &[(&str, &str)]) -> DevAgent {
        DevAgent::start_under(&[], env)
    }

    /// Starts the agent through a wrapper command (`nohup`, say), the way
    /// some operators do, with the harness defaults overridden by `env`.
    pub fn start_under(wrapper: &[&str], env: &[(&str, &str)]) -> DevAgent {
        let mut agent = DevAgent::unstarted(wrapper, env);
        agent.spawn();
        agent
    }

    /// Starts the agent as the ordinary user `uid` (gid the same) on a
    /// temporary root that user owns, through `wrapper`, which must switch
    /// to that user (`setpriv --reuid=UID --regid=UID --clear-groups`).
    pub fn start_owned_by(uid: u32, wrapper: &[&str], env: &[(&str, &str)]) -> DevAgent {
        let mut agent = DevAgent::unstarted(wrapper, env);
        std::os::unix::fs::chown(agent.root.path(), Some(uid), Some(uid))
            .expect("giving the agent's temporary root to its user");
        agent.spawn();
        agent
    }

    fn unstarted(wrapper: &[&str], env: &[(&str, &str)]) -> DevAgent {
        let root = tempfile::tempdir().expect("tempdir for the agent");
        let dir = root.path().join("dev");
        let mark = root.path().join("mark");
        make_mark_dir(&mark);
        let mut merged: Vec<(String, String)> = DEV_DEFAULTS
            .iter()
            .filter(|(k, _)| !env.iter().any(|(e, _)| e == k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        merged.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        if !merged
            .iter()
            .any(|(k, _)| k == "BATCHLY_SANDBOX_BIND_PATHS")
        {
            merged.push((
                "BATCHLY_SANDBOX_BIND_PATHS".to_string(),
                mark.display().to_string(),
            ));
        }
        DevAgent {
            root,
            dir,
            mark,
            env: merged,
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            child: None,
            runs: 0,
        }
    }

    fn out_path(&self, run: u32, stream: &str) -> PathBuf {
        self.root.path().join(format!("agent-{run}.{stream}"))
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let run = self.runs;
        let mut command = match self.wrapper.split_first() {
            None => agent_command(),
            Some((program, args)) => {
                let mut c = without_agent_env(Command::new(program));
                c.args(args).arg(agent_bin());
                c
            }
        };
        let child = command
            .arg("dev")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--log-format", "json"])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(self.root.path())
            .stdout(File::create(self.out_path(run, "stdout")).expect("agent stdout file"))
            .stderr(File::create(self.out_path(run, "stderr")).expect("agent stderr file"))
            .spawn()
            .expect("starting batchly-agent dev");
        self.child = Some(child);
        let socket = self.dir.join("agent.sock");
        let deadline = Instant::now() + START_WAIT;
        loop {
            if UnixStream::connect(&socket).is_ok() {
                return;
            }
            if !pid_alive(self.pid()) {
                panic!(
                    "batchly-agent dev exited before opening its admin socket\n{}",
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "batchly-agent dev did not open {} within {START_WAIT:?}\n{}",
                    socket.display(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(START_POLL);
        }
    }

    /// The agent's directory (`dev --dir`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where jobs leave traces for the test.
    pub fn mark(&self) -> &Path {
        &self.mark
    }

    /// `MARK=<mark dir>`, for `submit --env`.
    pub fn mark_env(&self) -> String {
        format!("MARK={}", self.mark.display())
    }

    /// Pid of the current run of the agent.
    pub fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("the agent was started");
        i32::try_from(child.id()).expect("pids fit in i32")
    }

    /// `batchly-agent submit --dir DIR ARGS`; panics unless it succeeds.
    pub fn submit(&self, args: &[&str]) -> Vec<Submitted> {
        submit_to_dir(&self.dir, args)
    }

    /// Submits one job; returns its message id.
    pub fn submit_one(&self, args: &[&str]) -> Submitted {
        let mut got = self.submit(args);
        assert_eq!(got.len(), 1, "expected one job from submit {args:?}");
        got.remove(0)
    }

    /// Every complete line of `events.jsonl` so far.
    pub fn events(&self) -> Vec<Event> {
        dev_events(&self.dir)
    }

    /// Polls the events until `cond` holds and returns them; panics after
    /// `WAIT`, or as soon as the agent has exited without `cond` holding.
    pub fn wait_for(&self, what: &str, cond: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + WAIT;
        loop {
            let running = self.child.is_some() && pid_alive(self.pid());
            let events = self.events();
            if cond(&events) {
                return events;
            }
            if !running {
                panic!(
                    "the agent exited while waiting for {what}\n{}",
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until message `message_id` has its final event and returns it.
    pub fn wait_final(&self, message_id: &str) -> Event {
        let events = self.wait_for(&format!("the final event of message {message_id}"), |ev| {
            ev.iter().any(|e| e.message_id == message_id && e.is_final)
        });
        events
            .into_iter()
            .find(|e| e.message_id == message_id && e.is_final)
            .expect("found by the wait above")
    }

    /// Sends `sig` to the current run of the agent.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("sending {sig} to the agent: {e}"));
    }

    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    pub fn sigkill(&self) {
        self.signal(Signal::SIGKILL);
    }

    /// Waits (at most `WAIT`) for the current run to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let child = self.child.as_mut().expect("the agent was started");
            if let Some(status) = child.try_wait().expect("waiting for the agent") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the agent did not exit within {WAIT:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts the agent again on the same directory; the previous run must
    /// have exited (the directory is locked while an agent holds it).
    pub fn restart(&mut self) {
        let child = self.child.as_mut().expect("the agent was started");
        assert!(
            child.try_wait().expect("checking the agent").is_some(),
            "restart() needs the previous run to have exited (call wait_exit)"
        );
        self.spawn();
    }

    /// What the current run wrote on stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.out_path(self.runs, "stderr"))
    }

    /// Events and every run's stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "--- events.jsonl ---\n{}\n",
            read_lossy(&self.dir.join("events.jsonl"))
        );
        for run in 1..=self.runs {
            out.push_str(&format!(
                "--- agent run {run} stderr ---\n{}\n",
                read_lossy(&self.out_path(run, "stderr"))
            ));
        }
        out
    }

    /// Kills every process still working in one of this agent's job work
    /// dirs, so a failed test leaves no `sleep 300` behind.
    fn kill_leftover_jobs(&self) {
        kill_processes_working_in(&self.dir.join("work"));
    }
}

/// What a job writes to tell the test its pid: `$$` (or `$!`) is a pid in
/// the job's own pid namespace, so the namespace goes with it. Use as
/// `echo $$ $PID_NS > file` in a job's shell.
pub const PID_NS: &str = "$(readlink /proc/self/ns/pid)";

/// A pid as the host sees it, from `PID` or `PID pid:[INODE]` (see
/// [`PID_NS`]): the process of that namespace with that pid there. A
/// process that is already gone reads as `i32::MAX`, a pid no process has.
pub fn host_pid(text: &str) -> Option<i32> {
    let mut parts = text.split_whitespace();
    let pid: i32 = parts.next()?.parse().ok()?;
    let Some(ns) = parts.next() else {
        return Some(pid);
    };
    let ours = std::fs::read_link("/proc/self/ns/pid").ok()?;
    if ours.to_str() == Some(ns) {
        return Some(pid);
    }
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let in_ns =
            std::fs::read_link(entry.path().join("ns/pid")).is_ok_and(|l| l.to_str() == Some(ns));
        if !in_ns {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<i32>().ok());
        if inner == Some(pid) {
            return Some(p);
        }
    }
    Some(i32::MAX)
}

/// Kills (SIGKILL) every process whose current directory is inside `dir`:
/// jobs and their children start in their work dir, so this finds what a
/// killed or failed agent left running.
pub fn kill_processes_working_in(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let inside =
            std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir));
        if inside {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.kill_leftover_jobs();
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

/// A dir where jobs of any uid may write, inside a tempdir they can
/// reach: every test harness's `mark/`. Jobs of different slots run as
/// different uids, and several append to the same files, so a default ACL
/// makes every file created there writable by all (the umask plays no
/// part under a default ACL).
pub fn make_mark_dir(mark: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(mark).expect("creating the mark dir");
    std::fs::set_permissions(mark, std::fs::Permissions::from_mode(0o777))
        .expect("opening the mark dir to job uids");
    // posix_acl_xattr: version 2, then (tag, perm, id) for the owner,
    // the owning group and others, each rwx.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for tag in [0x01u16, 0x04, 0x20] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&7u16.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    let path = std::ffi::CString::new(mark.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: setxattr reads the NUL-terminated path and name and `acl`
    // (its length passed along) for the call only.
    let r = unsafe {
        nix::libc::setxattr(
            path.as_ptr(),
            c"system.posix_acl_default".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setting a default ACL on {}: {}",
        mark.display(),
        std::io::Error::last_os_error()
    );
    // tempdir makes its dir 0700: job uids must be able to pass through.
    if let Some(parent) = mark.parent() {
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))
            .expect("letting job uids through to the mark dir");
    }
}

/// Reads a whole file as text, panicking with its path.
/// A job's log as the job printed it: each line's text (stdout, stderr and
/// the agent's notes) without its time and source, and lines the agent cut
/// into pieces joined back. A job that printed nothing has no log file:
/// its log is empty.
pub fn read_job_log(path: &Path) -> String {
    if !path.exists() {
        return String::new();
    }
    job_log_text(&read_text(path))
}

/// [`read_job_log`] of a log's text.
pub fn job_log_text(log: &str) -> String {
    use batchly_agent::telemetry::batch::{CONTINUED, CONTINUES};
    let mut out = String::new();
    for line in log.lines() {
        // `2026-12-02T10:00:00.123Z stdout text`
        let text = line
            .get(25..)
            .and_then(|rest| rest.split_once(' ').map(|(_, text)| text).or(Some("")))
            .unwrap_or(line);
        let text = text.strip_prefix(CONTINUED).unwrap_or(text);
        match text.strip_suffix(CONTINUES) {
            Some(piece) => out.push_str(piece),
            None => {
                out.push_str(text);
                out.push('\n');
            }
        }
    }
    out
}

pub fn read_text(path: &Path) -> String {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text
}
