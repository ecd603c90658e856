//! Crashes, restarts and stops of `batchly-agent run` on SQS (moto) at the
//! moments where the at-least-once promise is hardest to keep (issue 13):
//! a second agent started on a live state dir, SIGTERM while the agent sits
//! in an idle long poll, a crash after a job succeeded while its message was
//! in custody, a crash between the two steps of an uncounted release, a
//! heartbeat racing a release, and a restart after SQS handed a running
//! message out again.
//!
//! Job queues hide a received message for `LONG_VISIBILITY_S` unless a test
//! says otherwise, far longer than any wait here: a message that becomes
//! visible within a test was released on purpose. Jobs leave `start ID` /
//! `end ID` lines in the runs file (`marked`), the ground truth of what ran
//! when, and wait for files the test writes instead of sleeping.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use batchly_agent::events::{EventType, JobEvent};
use batchly_agent::queue::sqs::SqsQueue;
use batchly_agent::queue::{JobSource, Message};
use batchly_agent::state::{Decided, DecidedAction, InFlight, Ledger};
use batchly_e2e::sqs::proxy::{CallCounts, Proxy};
use batchly_e2e::sqs::{
    aws_env, marked, unix_now, AgentSettings, QueueDepth, QueueOptions, SqsAgent, SqsTest,
    ED25519_KID, LONG_WAIT,
};
use batchly_e2e::{
    agent_bin, count_final, eventually, kill_processes_working_in, list_dir, of_job, pid_alive,
    read_pid_file, Event, Submitted,
};
use nix::sys::signal::Signal;

/// Visibility timeout of the job queues: a received message stays hidden
/// this long unless the agent gives it back. Far above `LONG_WAIT`.
const LONG_VISIBILITY_S: u32 = 600;
/// How long a second agent on a live state dir may take to refuse to start
/// (it checks its queues first): far above what that needs.
const REFUSAL_WAIT: Duration = Duration::from_secs(30);
/// How long a job waits for the file that lets it end, at most (in steps of
/// 0.2 s): longer than any test, so a job that ended early was stopped.
const JOB_WAIT_STEPS: u32 = 1500;

/// Shell lines that wait until `$MARK/NAME` exists (bounded, so a failed
/// test leaves nothing behind for long).
fn wait_for_file(name: &str) -> String {
    format!(
        "n=0\nwhile [ ! -e \"$MARK/{name}\" ] && [ $n -lt {JOB_WAIT_STEPS} ]; do sleep 0.2; n=$((n+1)); done"
    )
}

/// Shell line that leaves the job's shell pid (its process group leader)
/// in `$MARK/<job id>.leader`.
const RECORD_LEADER: &str = "echo $$ > \"$MARK/$BATCHLY_JOB_ID.leader\"";

fn long_lease_queue(t: &SqsTest) -> String {
    t.job_queue_with(
        "jobs",
        &QueueOptions {
            visibility_s: Some(LONG_VISIBILITY_S),
            ..QueueOptions::default()
        },
    )
    .url
}

/// Submits one job `id` running `sh -c script` with `$MARK` set.
fn submit_job(t: &SqsTest, url: &str, id: &str, extra: &[&str], script: &str) -> Submitted {
    let mark = t.mark_env();
    let mut args = vec!["--id", id, "--env", mark.as_str()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let mut jobs = t.submit(url, &args);
    assert_eq!(jobs.len(), 1, "one job submitted: {jobs:?}");
    jobs.remove(0)
}

fn count_of(events: &[Event], job: &Submitted, kind: &str) -> usize {
    of_job(events, &job.job_id)
        .iter()
        .filter(|e| e.kind == kind)
        .count()
}

fn is_final(events: &[Event], job: &Submitted) -> bool {
    of_job(events, &job.job_id).iter().any(|e| e.is_final)
}

/// The job's events in the order they happened (`at` is fixed-width RFC
/// 3339; the sort is stable).
fn history<'a>(events: &'a [Event], job: &Submitted) -> Vec<&'a Event> {
    let mut mine = of_job(events, &job.job_id);
    mine.sort_by_key(|e| e.raw["at"].as_str().unwrap_or("").to_string());
    mine
}

fn kinds(events: &[&Event]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

const EMPTY: QueueDepth = QueueDepth {
    visible: 0,
    in_flight: 0,
    delayed: 0,
};

/// Requests of `action` on the queue `name` the proxy has seen.
fn calls_of(counts: &CallCounts, name: &str, action: &str) -> u64 {
    counts.on_queue(name).get(action).copied().unwrap_or(0)
}

/// `ReceiveMessage` calls on `name` that have not been answered (yet, or
/// ever: a call whose caller hung up never gets its answer through).
fn unanswered_receives(counts: &CallCounts, name: &str) -> u64 {
    calls_of(counts, name, "ReceiveMessage")
        .saturating_sub(counts.empty_receives_on(name) + counts.fruitful_receives_on(name))
}

/// The in-flight ledger of an agent's state dir, as a restart reads it.
fn ledger_entries(state_dir: &Path) -> Vec<InFlight> {
    Ledger::open(state_dir)
        .and_then(|l| l.load_all())
        .unwrap_or_else(|e| panic!("reading the ledger in {}: {e}", state_dir.display()))
}

fn config_path(agent: &SqsAgent) -> PathBuf {
    agent.dir().join("agent.toml")
}

/// A `batchly-agent run` the test starts itself, on a config file of its
/// own making (the harness's agents each get their own directories).
struct OtherRun {
    child: Child,
    stderr: PathBuf,
    work_dir: PathBuf,
}

impl OtherRun {
    /// Starts `run --config CONFIG` reaching AWS at `endpoint`, with none of
    /// the test process's `BATCHLY_*` or `AWS_*` variables.
    fn start(config: &Path, endpoint: &str, stderr: PathBuf, work_dir: PathBuf) -> OtherRun {
        let mut cmd = Command::new(agent_bin());
        for (key, _) in std::env::vars_os() {
            if let Some(key) = key.to_str() {
                if key.starts_with("BATCHLY_") || key.starts_with("AWS_") {
                    cmd.env_remove(key);
                }
            }
        }
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .envs(aws_env(endpoint))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file of the second agent"))
            .spawn()
            .expect("starting a second batchly-agent run");
        OtherRun {
            child,
            stderr,
            work_dir,
        }
    }

    /// Its exit status, once it has exited within `limit`; `None` if it is
    /// still running then.
    fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the second agent") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for OtherRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        kill_processes_working_in(&self.work_dir);
    }
}

#[test]
fn a_second_agent_on_the_same_state_dir_exits_2_naming_it_and_the_first_agents_job_runs_on_to_success(
) {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let script = marked(&format!("{RECORD_LEADER}\n{}", wait_for_file("finish")));
    let job = submit_job(&t, &url, "held", &[], &script);
    let first = t.agent(AgentSettings::new(&url).slots(1));
    t.wait_events("the job running under the first agent", &[&first], |ev| {
        count_of(ev, &job, "job.started") == 1
    });
    let leader = read_pid_file(&t.mark().join("held.leader"));

    // The same config, as a careless second unit file would have it, but
    // its own admin socket so the two do not clash there.
    let state_dir = first.dir().join("state");
    let socket = first.dir().join("agent.sock").display().to_string();
    let other_socket = first.dir().join("second.sock").display().to_string();
    let text = std::fs::read_to_string(config_path(&first)).expect("reading the first config");
    assert!(text.contains(&socket), "{text}");
    let second_config = first.dir().join("second.toml");
    std::fs::write(&second_config, text.replace(&socket, &other_socket))
        .expect("writing the second config");
    let mut second = OtherRun::start(
        &second_config,
        &t.endpoint(),
        first.dir().join("second.stderr"),
        first.dir().join("work"),
    );
    let Some(status) = second.exit_within(REFUSAL_WAIT) else {
        panic!(
            "a second agent on {} did not refuse to start: it is still running after \
             {REFUSAL_WAIT:?}; the first agent's job (pid {leader}) is {}\n\
             --- second agent stderr ---\n{}\n{}",
            state_dir.display(),
            if pid_alive(leader) { "alive" } else { "gone" },
            second.stderr(),
            t.diagnostics(&t.events(), &[&first])
        );
    };
    let said = second.stderr();
    assert_eq!(
        status.code(),
        Some(2),
        "a second agent on a live state dir exits 2 (a configuration error)\n{said}"
    );
    assert!(
        said.contains(&state_dir.display().to_string()),
        "the refusal names the state dir {}:\n{said}",
        state_dir.display()
    );
    assert!(
        said.contains(&first.pid().to_string()),
        "the refusal names the pid of the agent holding the state dir ({}):\n{said}",
        first.pid()
    );
    assert!(
        pid_alive(leader) && first.is_running(),
        "the first agent and its job (pid {leader}) are untouched by the refused start\n{}",
        t.diagnostics(&t.events(), &[&first])
    );

    std::fs::write(t.mark().join("finish"), b"").expect("letting the job end");
    let events = t.wait_events("the job's final event", &[&first], |ev| is_final(ev, &job));
    t.wait_queue_empty(&url, &[&first]);
    let mine = history(&events, &job);
    assert_eq!(
        kinds(&mine),
        ["job.started", "job.succeeded"],
        "the job ran once, to its end: {mine:#?}"
    );
    let runs = t.runs();
    assert_eq!(
        (runs.starts(&job.job_id), runs.ends(&job.job_id)),
        (1, 1),
        "{:?}",
        runs.lines
    );
}

/// The agent, idle on an empty queue, sits in a long poll when it gets
/// SIGTERM; a message arrives just before or just after the signal. After
/// the agent has exited 0 the message must be visible in the queue for the
/// next agent, not hidden by a poll nobody reads any more.
fn sigterm_during_an_idle_long_poll(message_first: bool) {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let proxy = Proxy::start(t.moto().port());
    let mut agent = t.agent(
        AgentSettings::new(&url)
            .slots(1)
            .endpoint(&proxy.endpoint()),
    );
    // A receive that was asked and has no answer yet is the long poll.
    eventually(
        "the idle agent in a long poll",
        LONG_WAIT,
        || unanswered_receives(&proxy.calls(), "jobs") > 0,
        || format!("{:#?}\n{}", proxy.calls(), agent.diagnostics()),
    );
    // A signed job the test has ready before the moment that matters.
    let now = unix_now();
    let body = t.sign_with_python(
        &t.signing_key(),
        ED25519_KID,
        now,
        now + 3600,
        r#"{"id":"late","command":["true"]}"#,
    );
    if message_first {
        t.aws.send(&url, &body);
        agent.signal(Signal::SIGTERM);
    } else {
        agent.signal(Signal::SIGTERM);
        t.aws.send(&url, &body);
    }
    let status = agent.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "a drained agent exits 0\n{}",
        agent.diagnostics()
    );

    let depth = t.aws.depth(&url);
    let calls = proxy.calls();
    assert_eq!(
        depth,
        QueueDepth {
            visible: 1,
            in_flight: 0,
            delayed: 0
        },
        "right after the drained agent exited, the message is in the queue for the next agent, \
         not hidden for {LONG_VISIBILITY_S} s by a long poll nobody reads\n{calls:#?}\n{}",
        t.diagnostics(&t.events(), &[&agent])
    );
    // The agent may cancel a poll only if SQS can no longer hand it a
    // message: a poll abandoned on the client side keeps running at SQS and
    // takes what arrives. So every poll the agent asked got its answer.
    assert_eq!(
        unanswered_receives(&calls, "jobs"),
        0,
        "the agent left a long poll running at SQS when it exited: {calls:#?}\n{}",
        agent.diagnostics()
    );
}

#[test]
fn a_message_sent_just_before_sigterm_during_an_idle_long_poll_is_visible_after_the_exit() {
    sigterm_during_an_idle_long_poll(true);
}

#[test]
fn a_message_sent_just_after_sigterm_during_an_idle_long_poll_is_visible_after_the_exit() {
    sigterm_during_an_idle_long_poll(false);
}

/// The queue's visibility timeout in the custody test: short, so the
/// lease is renewed before custody is taken (as in tests/sqs_custody.rs).
const CUSTODY_VISIBILITY_S: u32 = 4;
/// Stands in for SQS's 12 hours: custody is due 4 s (four heartbeat ticks)
/// before it.
const MAX_HOLD: Duration = Duration::from_secs(10);

/// The agent's `SqsQueue`, driven through the library because the binary
/// has no way to shorten SQS's 12-hour limit; with the runtime its
/// heartbeat runs on. Dropping it stops both at once, as the death of the
/// agent would.
struct LibraryAgent {
    // Declared first so it is dropped while its runtime still exists.
    queue: SqsQueue,
    rt: tokio::runtime::Runtime,
}

impl LibraryAgent {
    fn connect(endpoint: &str, url: &str, state_dir: &Path, max_hold: Duration) -> LibraryAgent {
        // Worker threads keep the heartbeat going while the test thread
        // blocks on its own client.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the agent's queue");
        let client = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                .region(aws_sdk_sqs::config::Region::new("us-east-1"))
                .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                    "testing",
                    "testing",
                    None,
                    None,
                    "batchly-e2e-agent",
                ))
                .endpoint_url(endpoint)
                .build(),
        );
        let urls = [url.to_string()];
        let queue = rt
            .block_on(SqsQueue::connect_with_hold(
                client, &urls, None, state_dir, max_hold,
            ))
            .unwrap_or_else(|e| panic!("connecting the agent's queue: {e}"));
        LibraryAgent { queue, rt }
    }

    /// Receives exactly one message, waiting for it at most `LONG_WAIT`.
    fn receive_one(&self) -> Message {
        let deadline = Instant::now() + LONG_WAIT;
        loop {
            let mut got = self
                .rt
                .block_on(self.queue.receive(10))
                .unwrap_or_else(|e| panic!("receiving: {e}"));
            match got.len() {
                0 if Instant::now() < deadline => continue,
                0 => panic!("no message within {LONG_WAIT:?}"),
                1 => return got.remove(0),
                _ => panic!("one message expected in the queue, got {got:#?}"),
            }
        }
    }
}

#[test]
fn a_job_that_succeeded_while_its_message_was_in_custody_does_not_run_again_after_a_crash() {
    let t = SqsTest::start();
    let queue = t.job_queue_with(
        "jobs",
        &QueueOptions {
            visibility_s: Some(CUSTODY_VISIBILITY_S),
            ..QueueOptions::default()
        },
    );
    let url = queue.url.clone();
    // The binary's directories and config, from a first run on the empty
    // queue that is then stopped: its state dir is where the crashed run
    // below leaves its custody copy and its ledger.
    let mut agent = t.agent(AgentSettings::new(&url).slots(1));
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", agent.diagnostics());
    let state_dir = agent.dir().join("state");
    let job = submit_job(&t, &url, "custody", &[], &marked("true"));

    // The run that crashes, through the library with a short custody limit:
    // it holds the message past the custody point...
    let crashed = LibraryAgent::connect(&t.endpoint(), &url, &state_dir, MAX_HOLD);
    let msg = crashed.receive_one();
    assert_eq!(msg.id, job.message_id, "{msg:?}");
    let custody_dir = state_dir.join("custody");
    eventually(
        "the message in custody (copy on disk, gone from SQS)",
        MAX_HOLD + LONG_WAIT,
        || !list_dir(&custody_dir).is_empty() && t.aws.depth(&url) == EMPTY,
        || {
            format!(
                "custody: {:?}, queue: {:?}",
                list_dir(&custody_dir),
                t.aws.depth(&url)
            )
        },
    );
    // ...its job succeeds and the supervisor records "delete, with this
    // final event" (what `finish` writes before it acts), then the agent
    // dies before the custody copy is dropped.
    let mut entry = InFlight::for_message(&msg);
    entry.job_id = Some(job.job_id.clone());
    let mut succeeded = JobEvent::new(EventType::Succeeded, &msg.id, msg.attempt, "agent-1");
    succeeded.job_id = Some(job.job_id.clone());
    succeeded.exit_code = Some(0);
    succeeded.is_final = true;
    entry.decided = Some(Decided {
        event: succeeded,
        action: DecidedAction::Delete,
    });
    Ledger::open(&state_dir)
        .and_then(|l| l.record(0, &entry))
        .expect("recording the decided delete in the ledger");
    drop(crashed);
    assert_eq!(
        list_dir(&custody_dir).len(),
        1,
        "the copy survives the crash"
    );

    // The next start completes the decision. A SIGTERM at once stops it
    // right after its recovery (which runs before any receive), so what
    // the recovery did is all there is to see.
    agent.restart();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", agent.diagnostics());

    let events = t.events();
    let depth = t.aws.depth(&url);
    let runs = t.runs();
    assert!(
        depth == EMPTY
            && runs.starts(&job.job_id) == 0
            && count_of(&events, &job, "job.started") == 0,
        "a job that succeeded is not run again: after the restart the queue holds {depth:?} \
         (the custody copy sent back?) and the job started {} time(s)\n{}",
        runs.starts(&job.job_id),
        t.diagnostics(&events, &[&agent])
    );
    assert!(
        list_dir(&custody_dir).is_empty(),
        "the custody copy of a finished job is dropped: {:?}",
        list_dir(&custody_dir)
    );
    assert!(
        ledger_entries(&state_dir).is_empty(),
        "the ledger is empty after the recovery"
    );
    assert!(
        count_final(&events, Some("job.succeeded")) >= 1,
        "the success the crashed run decided is reported: {events:#?}"
    );
    assert_eq!(t.aws.depth(queue.dlq()), EMPTY, "nothing was dead-lettered");
}
