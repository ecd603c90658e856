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
use batchly_e2e::sqs::proxy::{CallCounts, Fault, Proxy};
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
const RECORD_LEADER: &str =
    "echo $$ $(readlink /proc/self/ns/pid) > \"$MARK/$BATCHLY_JOB_ID.leader\"";

/// Waits until a job has left `$MARK/NAME`.
fn wait_for_mark(t: &SqsTest, name: &str, agent: &SqsAgent) {
    let path = t.mark().join(name);
    eventually(
        &format!("the job to leave {name}"),
        LONG_WAIT,
        || path.exists(),
        || agent.diagnostics(),
    );
}

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

/// Rewrites one line of an agent's config file (for its next start).
fn edit_config(agent: &SqsAgent, from: &str, to: &str) {
    let path = config_path(agent);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        text.contains(from),
        "{} has no {from:?}:\n{text}",
        path.display()
    );
    std::fs::write(&path, text.replace(from, to))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
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
    let events = t.events();
    // The agent handles the signal on its own time: a message that arrives
    // around it may have been received and started first; then it ran to
    // its end and is gone for good. Otherwise it must be back in the queue.
    let ran = count_final(&events, Some("job.succeeded"));
    let expected = QueueDepth {
        visible: if ran == 1 { 0 } else { 1 },
        in_flight: 0,
        delayed: 0,
    };
    assert_eq!(
        depth,
        expected,
        "right after the drained agent exited, the message is in the queue for the next agent \
         (or ran to its end), not hidden for {LONG_VISIBILITY_S} s by a long poll nobody reads\n{calls:#?}\n{}",
        t.diagnostics(&events, &[&agent])
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

/// The run that crashes, through the library with a short custody limit
/// on the agent's `state_dir`: it holds `job`'s message past the custody
/// point, the job succeeds, the supervisor records "delete, with this
/// final event" (what `finish` writes before it acts), and the agent dies
/// before the custody copy is dropped.
fn crash_after_success_in_custody(t: &SqsTest, url: &str, job: &Submitted, state_dir: &Path) {
    let crashed = LibraryAgent::connect(&t.endpoint(), url, state_dir, MAX_HOLD);
    let msg = crashed.receive_one();
    assert_eq!(msg.id, job.message_id, "{msg:?}");
    let custody_dir = state_dir.join("custody");
    eventually(
        "the message in custody (copy on disk, gone from SQS)",
        MAX_HOLD + LONG_WAIT,
        || !list_dir(&custody_dir).is_empty() && t.aws.depth(url) == EMPTY,
        || {
            format!(
                "custody: {:?}, queue: {:?}",
                list_dir(&custody_dir),
                t.aws.depth(url)
            )
        },
    );
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
    Ledger::open(state_dir)
        .and_then(|l| l.record(0, &entry))
        .expect("recording the decided delete in the ledger");
    drop(crashed);
    assert_eq!(
        list_dir(&custody_dir).len(),
        1,
        "the copy survives the crash"
    );
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
    let job = submit_job(&t, &url, "custody", &[], &marked("true"));
    // The binary starts on the state dir the crashed run left. A SIGTERM at
    // once stops it right after its recovery (which runs before any
    // receive), so what the recovery did is all there is to see.
    let mut agent = t.agent_with_state(AgentSettings::new(&url).slots(1), |state_dir| {
        crash_after_success_in_custody(&t, &url, &job, state_dir)
    });
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
    let state_dir = agent.dir().join("state");
    let custody_dir = state_dir.join("custody");
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

#[test]
fn a_crash_between_sending_the_copy_of_a_release_and_deleting_the_original_runs_the_job_once_more_not_twice(
) {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let proxy = Proxy::start(t.moto().port());
    // First run: exit 75 (run me again), which on a standard queue sends a
    // copy of the message and then deletes the original. Later runs take a
    // moment and succeed, so two copies running would overlap.
    let script = marked(&format!(
        "if [ -e \"$MARK/$BATCHLY_JOB_ID.asked\" ]; then sleep 2; else\n\
         touch \"$MARK/$BATCHLY_JOB_ID.asked\"\n{}\nsh -c 'exit 75'; fi",
        wait_for_file("requeue")
    ));
    let job = submit_job(&t, &url, "again", &[], &script);
    // The original's delete never gets an answer: the agent dies between
    // the two steps.
    let hung = proxy.inject("DeleteMessageBatch", Some("jobs"), Fault::Hang, None);
    let mut agent = t.agent(
        AgentSettings::new(&url)
            .slots(1)
            .endpoint(&proxy.endpoint()),
    );
    // Once the first run is under way, receives get no answer: the agent
    // (whose slot is free again once the outcome is decided) cannot take
    // the copy before it dies, so the restart meets both messages.
    wait_for_mark(&t, &format!("{}.asked", job.job_id), &agent);
    let no_receives = proxy.inject("ReceiveMessage", Some("jobs"), Fault::Hang, None);
    std::fs::write(t.mark().join("requeue"), b"").expect("letting the first run exit 75");
    eventually(
        "the copy sent and the original's delete under way",
        LONG_WAIT,
        || calls_of(&proxy.calls(), "jobs", "SendMessage") >= 1 && proxy.hits(&hung) >= 1,
        || {
            format!(
                "{:#?}\n{}",
                proxy.calls(),
                t.diagnostics(&t.events(), &[&agent])
            )
        },
    );
    agent.signal(Signal::SIGKILL);
    agent.wait_exit();
    assert_eq!(
        t.aws.depth(&url),
        QueueDepth {
            visible: 1,
            in_flight: 1,
            delayed: 0
        },
        "the crash left the copy (visible) and the original (still hidden)"
    );
    proxy.clear(hung);
    proxy.clear(no_receives);
    // Two slots now, so two messages of the job would run at once.
    edit_config(&agent, "max_concurrent = 1\n", "max_concurrent = 2\n");
    agent.restart();
    let events = t.wait_events("the job's final event", &[&agent], |ev| is_final(ev, &job));
    t.wait_queue_empty(&url, &[&agent]);

    let runs = t.runs();
    assert!(
        runs.overlapping().is_empty(),
        "two processes of the job ran at once after the restart: {:?}\n{}",
        runs.lines,
        t.diagnostics(&events, &[&agent])
    );
    assert_eq!(
        runs.starts(&job.job_id),
        2,
        "the job ran once before the crash and exactly once after it: {:?}\n{}",
        runs.lines,
        t.diagnostics(&events, &[&agent])
    );
    let finals: Vec<&Event> = of_job(&events, &job.job_id)
        .into_iter()
        .filter(|e| e.is_final)
        .collect();
    assert_eq!(finals.len(), 1, "one final event: {finals:#?}");
    assert_eq!(finals[0].kind, "job.succeeded", "{finals:#?}");
    assert_eq!(
        finals[0].attempt, 1,
        "exit 75 is not an attempt, and the crash came after the job had ended: {finals:#?}"
    );
}

/// The job queue's visibility timeout in the heartbeat test: the agent
/// renews a lease once half of it is used up, on ticks of a quarter of it.
const RACE_VISIBILITY_S: u32 = 12;

#[test]
fn a_retry_with_no_backoff_leaves_its_message_visible_and_no_heartbeat_hides_it_again() {
    let t = SqsTest::start();
    let url = t
        .job_queue_with(
            "jobs",
            &QueueOptions {
                visibility_s: Some(RACE_VISIBILITY_S),
                ..QueueOptions::default()
            },
        )
        .url;
    let proxy = Proxy::start(t.moto().port());
    // `failing` fails its first attempt when the test says so (the harness
    // sets jobs.retry_backoff_s = 0: the retry is due at once) and succeeds
    // on the next; `steady` runs until the test lets it end, so the agent
    // keeps renewing a lease all along.
    let failing = submit_job(
        &t,
        &url,
        "failing",
        &["--max-attempts", "3"],
        &marked(&format!(
            "if [ -e \"$MARK/failing.failed\" ]; then true; else\n{}\n\
             touch \"$MARK/failing.failed\"; false; fi",
            wait_for_file("fail")
        )),
    );
    let steady = submit_job(&t, &url, "steady", &[], &marked(&wait_for_file("finish")));
    let agent = t.agent(
        AgentSettings::new(&url)
            .slots(2)
            .endpoint(&proxy.endpoint()),
    );
    t.wait_events("both jobs running", &[&agent], |ev| {
        count_of(ev, &failing, "job.started") == 1 && count_of(ev, &steady, "job.started") == 1
    });
    // Both were received together, so their leases are renewed together.
    // Right after a renewal, the next one is half a visibility timeout away:
    // the release below is the next visibility change the agent makes.
    let renewals = |c: &CallCounts| calls_of(c, "jobs", "ChangeMessageVisibilityBatch");
    let before = renewals(&proxy.calls());
    eventually(
        "a lease renewal",
        LONG_WAIT,
        || renewals(&proxy.calls()) > before,
        || format!("{:#?}\n{}", proxy.calls(), agent.diagnostics()),
    );
    // The slot freed by the release must not take the message back: only
    // the queue's own view of the message counts here.
    let receives = proxy.inject("ReceiveMessage", Some("jobs"), Fault::Hang, None);
    let release = proxy.inject(
        "ChangeMessageVisibilityBatch",
        Some("jobs"),
        Fault::Hang,
        None,
    );
    std::fs::write(t.mark().join("fail"), b"").expect("telling the job to fail");
    eventually(
        "the release of the failed attempt under way",
        LONG_WAIT,
        || proxy.hits(&release) >= 1,
        || t.diagnostics(&t.events(), &[&agent]),
    );
    // Held until both messages' visibility has run out at SQS (nothing
    // renews them while the release is held): by then the agent's
    // heartbeat has found both leases due, a quarter of a timeout ago.
    eventually(
        "both leases run out while the release is held",
        LONG_WAIT,
        || t.aws.depth(&url).visible == 2,
        || format!("{:?}\n{}", t.aws.depth(&url), agent.diagnostics()),
    );
    let held = renewals(&proxy.calls());
    proxy.clear(release);
    // Three visibility changes after the held one: the release, then what
    // the heartbeat queued behind it, then at least one more, which the
    // agent sends only once everything before it was answered. (`steady`
    // keeps being renewed, so they come.)
    eventually(
        "the release and the heartbeat's renewals after it answered",
        LONG_WAIT,
        || renewals(&proxy.calls()) >= held + 3,
        || format!("{:#?}\n{}", proxy.calls(), agent.diagnostics()),
    );
    assert_eq!(
        t.aws.depth(&url),
        QueueDepth {
            visible: 1,
            in_flight: 1,
            delayed: 0
        },
        "the failed job's message is visible for its retry at once (backoff 0 s), not hidden \
         again for {RACE_VISIBILITY_S} s by a renewal of the lease being released; only the \
         running job's message is in flight\n{}",
        t.diagnostics(&t.events(), &[&agent])
    );

    proxy.clear(receives);
    std::fs::write(t.mark().join("finish"), b"").expect("letting the steady job end");
    let events = t.wait_events("both final events", &[&agent], |ev| {
        is_final(ev, &failing) && is_final(ev, &steady)
    });
    t.wait_queue_empty(&url, &[&agent]);
    let mine = history(&events, &failing);
    assert_eq!(
        kinds(&mine),
        ["job.started", "job.failed", "job.started", "job.succeeded"],
        "{mine:#?}"
    );
    assert_eq!(mine[3].attempt, 2, "{mine:#?}");
    assert_eq!(
        kinds(&history(&events, &steady)),
        ["job.started", "job.succeeded"]
    );
}

/// The job queue's visibility timeout in the redelivery test: short, so a
/// lease the agent cannot renew runs out soon.
const LAPSE_VISIBILITY_S: u32 = 4;

#[test]
fn a_message_sqs_hands_out_again_to_its_running_job_is_released_by_a_restart_with_its_new_receipt()
{
    let t = SqsTest::start();
    let url = t
        .job_queue_with(
            "jobs",
            &QueueOptions {
                visibility_s: Some(LAPSE_VISIBILITY_S),
                ..QueueOptions::default()
            },
        )
        .url;
    let proxy = Proxy::start(t.moto().port());
    // First run: runs until killed. Any later run: succeeds at once.
    let script = marked(&format!(
        "if [ -e \"$MARK/$BATCHLY_JOB_ID.ran\" ]; then true; else\n\
         touch \"$MARK/$BATCHLY_JOB_ID.ran\"\n{RECORD_LEADER}\n{}\nfi",
        wait_for_file("never")
    ));
    let job = submit_job(&t, &url, "lapsed", &[], &script);
    // Two slots: the free one keeps polling, so it is this agent that SQS
    // hands the message to once its visibility lapses.
    let mut agent = t.agent(
        AgentSettings::new(&url)
            .slots(2)
            .endpoint(&proxy.endpoint()),
    );
    t.wait_events("the job running", &[&agent], |ev| {
        count_of(ev, &job, "job.started") == 1
    });
    let leader = read_pid_file(&t.mark().join("lapsed.leader"));
    let state_dir = agent.dir().join("state");
    let receipt_of = |entries: &[InFlight]| {
        entries
            .iter()
            .find(|e| e.message_id == job.message_id)
            .map(|e| e.receipt.clone())
    };
    let first_receipt =
        receipt_of(&ledger_entries(&state_dir)).expect("the running job is in the ledger");

    // Renewals fail (SQS answers 500), so the lease lapses and SQS gives
    // the message, with a new receipt, to the agent's own waiting poll.
    let renewals = proxy.inject(
        "ChangeMessageVisibilityBatch",
        Some("jobs"),
        Fault::server_error(),
        None,
    );
    eventually(
        "the message handed out again, to the same agent",
        LONG_WAIT,
        || proxy.calls().fruitful_receives_on("jobs") >= 2,
        || format!("{:#?}\n{}", proxy.calls(), agent.diagnostics()),
    );
    proxy.clear(renewals);
    assert!(pid_alive(leader), "the job runs on through the redelivery");
    // The new receipt is what a restart needs to release the message:
    // SQS refuses an older one (moto, here, would still take it).
    let deadline = Instant::now() + REFUSAL_WAIT;
    loop {
        let ledger = ledger_entries(&state_dir);
        match receipt_of(&ledger) {
            Some(r) if r != first_receipt => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => panic!(
                "after SQS handed the running message out again, the ledger the next start \
                 reads still holds the receipt of the first receive: {ledger:#?}\n{}",
                agent.diagnostics()
            ),
        }
    }

    agent.signal(Signal::SIGKILL);
    agent.wait_exit();
    agent.restart();
    let events = t.wait_events("the job's final event", &[&agent], |ev| is_final(ev, &job));
    t.wait_queue_empty(&url, &[&agent]);
    let mine = history(&events, &job);
    assert_eq!(
        kinds(&mine),
        [
            "job.started",
            "job.requeued",
            "job.started",
            "job.succeeded"
        ],
        "the restart released the message itself (job.requeued), with the receipt SQS \
         accepts: {mine:#?}"
    );
    assert!(
        mine[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("restart")),
        "{mine:#?}"
    );
    // The first run was killed by the restart (so it wrote no end line)
    // before its message was released: the two runs never overlapped.
    assert!(
        !pid_alive(leader),
        "the restart killed the first run (pid {leader}) before releasing its message"
    );
    let runs = t.runs();
    assert_eq!(runs.starts(&job.job_id), 2, "{:?}", runs.lines);
    assert_eq!(runs.ends(&job.job_id), 1, "{:?}", runs.lines);
}

#[test]
fn twenty_kill_9_and_restart_cycles_under_load_lose_no_job_and_never_run_one_twice_at_once() {
    const JOBS: usize = 24;
    const CYCLES: usize = 20;
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    // A job holds a lock on its own file while it runs: a second copy
    // running at the same time (whatever its namespace) cannot take it,
    // and says so. A copy killed with its agent lets go as it dies.
    let script = marked(
        r#"exec 9>>"$MARK/$BATCHLY_JOB_ID.lock"
flock -n 9 || echo "$BATCHLY_JOB_ID" >> "$MARK/twice"
sleep 0.3"#,
    );
    let count = JOBS.to_string();
    let jobs = t.submit(
        &url,
        &[
            "--id",
            "load",
            "--count",
            &count,
            "--max-attempts",
            "100",
            "--env",
            &t.mark_env(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let mut agent = t.agent(AgentSettings::new(&url).slots(4));
    for cycle in 0..CYCLES {
        // Each run gets as far as starting one more job, then dies.
        let started = batchly_e2e::count_kind(&t.events(), "job.started");
        t.wait_events(&format!("cycle {cycle}: a job started"), &[&agent], |ev| {
            batchly_e2e::count_kind(ev, "job.started") > started
                || count_final(ev, Some("job.succeeded")) == JOBS
        });
        agent.signal(Signal::SIGKILL);
        agent.restart();
    }
    let events = t.wait_events("every job to succeed", &[&agent], |ev| {
        count_final(ev, Some("job.succeeded")) == JOBS
    });
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait_exit().code(), Some(0), "{}", agent.diagnostics());
    for job in &jobs {
        let finals: Vec<&Event> = of_job(&events, &job.job_id)
            .into_iter()
            .filter(|e| e.is_final)
            .collect();
        assert_eq!(
            finals.len(),
            1,
            "{}: exactly one outcome: {finals:#?}",
            job.job_id
        );
        assert_eq!(finals[0].kind, "job.succeeded", "{:?}", finals[0]);
    }
    let twice = std::fs::read_to_string(t.mark().join("twice")).unwrap_or_default();
    assert!(twice.is_empty(), "jobs that ran twice at once: {twice}");
    assert_eq!(
        t.aws.depth(&url),
        QueueDepth {
            visible: 0,
            in_flight: 0,
            delayed: 0
        },
        "nothing left in the queue"
    );
    let runs = t.runs();
    assert!(
        jobs.iter().all(|j| runs.ends(&j.job_id) >= 1),
        "every job ran to its end at least once: {:?}",
        runs.lines
    );
}
