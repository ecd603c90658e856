//! Job output and the agent's own log in CloudWatch Logs (moto's server),
//! through `batchly-agent run`: every line arrives, in order per stream,
//! through an outage, a `kill -9` and a drain; the spool's bound drops
//! (counted and noted) rather than growing; and a job whose output cannot
//! be spooled keeps its message.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use batchly_e2e::sqs::proxy::{Fault, FaultId, Proxy};
use batchly_e2e::sqs::{AgentSettings, SqsAgent, SqsTest};
use batchly_e2e::{eventually, Event, Submitted};
use nix::sys::signal::Signal;

use batchly_agent::telemetry::batch::join_pieces;

/// The agent's default `logs.group`.
const GROUP: &str = "/batchly/jobs";
/// How long shipped lines may take to show up: far above what the agent
/// needs on a busy machine.
const ARRIVAL: Duration = Duration::from_secs(90);
/// How long CloudWatch Logs is down in the outage test.
const OUTAGE: Duration = Duration::from_secs(30);
/// The calls of the log shipper, all cut in an outage.
const LOG_ACTIONS: [&str; 3] = ["PutLogEvents", "CreateLogStream", "CreateLogGroup"];

fn final_of<'a>(events: &'a [Event], job: &Submitted) -> Option<&'a Event> {
    events
        .iter()
        .find(|e| e.job_id.as_deref() == Some(job.job_id.as_str()) && e.is_final)
}

fn all_final(events: &[Event], jobs: &[Submitted]) -> bool {
    jobs.iter().all(|j| final_of(events, j).is_some())
}

fn stream_of(events: &[Event], job: &Submitted) -> String {
    final_of(events, job)
        .and_then(|e| e.log_stream.clone())
        .unwrap_or_else(|| panic!("no log stream for {}: {events:?}", job.job_id))
}

/// The stream's messages whose source is `source`, without it.
fn from(messages: &[String], source: &str) -> Vec<String> {
    let prefix = format!("{source} ");
    messages
        .iter()
        .filter_map(|m| m.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// The messages of `stream`, once there are at least `want` of them.
fn wait_messages(t: &SqsTest, stream: &str, want: usize, agents: &[&SqsAgent]) -> Vec<String> {
    let mut got = Vec::new();
    eventually(
        &format!("{want} events in stream {stream}"),
        ARRIVAL,
        || {
            got = t.aws.log_lines(GROUP, stream);
            got.len() >= want
        },
        || {
            format!(
                "has {} events; streams: {:?}\n{}",
                t.aws.log_lines(GROUP, stream).len(),
                t.aws.log_streams(GROUP),
                agents
                    .iter()
                    .map(|a| a.diagnostics())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
    );
    got.into_iter().map(|l| l.message).collect()
}

/// `sh -c` printing `lines` numbered lines to stdout and as many to stderr.
fn chatty(lines: u32) -> String {
    format!("seq -f 'out %g' 1 {lines}; seq -f 'err %g' 1 {lines} >&2")
}

fn numbered(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

fn cut_logs(proxy: &Proxy) -> Vec<FaultId> {
    LOG_ACTIONS
        .iter()
        .map(|action| proxy.inject(action, None, Fault::Reset, None))
        .collect()
}

#[test]
fn the_output_of_twenty_concurrent_jobs_all_arrives_in_order_per_stream_and_a_long_line_whole() {
    const LINES: u32 = 2500; // per pipe: 100,000 lines from 20 jobs
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let script = chatty(LINES);
    let jobs = t.submit(
        &q.url,
        &["--id", "chatty", "--count", "20", "--", "sh", "-c", &script],
    );
    let big = t.submit(
        &q.url,
        &[
            "--id",
            "big",
            "--",
            "sh",
            "-c",
            "head -c 3145728 /dev/zero | tr '\\0' x; echo; echo after",
        ],
    );
    // Through the proxy, which sees every batch the server gets.
    let proxy = Proxy::start(t.moto().port());
    let agent = t.agent(
        AgentSettings::new(&q.url)
            .slots(20)
            .endpoint(&proxy.endpoint()),
    );
    let all: Vec<Submitted> = jobs.iter().chain(&big).cloned().collect();
    let events = t.wait_events("every job's end", &[&agent], |ev| all_final(ev, &all));
    for job in &all {
        let end = final_of(&events, job).expect("final");
        assert_eq!(end.kind, "job.succeeded", "{end:?}");
    }
    t.wait_queue_empty(&q.url, &[&agent]);

    for job in &jobs {
        let stream = stream_of(&events, job);
        let messages = wait_messages(&t, &stream, 2 * LINES as usize, &[&agent]);
        assert_eq!(messages.len(), 2 * LINES as usize, "{stream}: none twice");
        assert_eq!(
            from(&messages, "stdout"),
            numbered("out", LINES),
            "{stream}"
        );
        assert_eq!(
            from(&messages, "stderr"),
            numbered("err", LINES),
            "{stream}"
        );
    }
    let stream = stream_of(&events, &big[0]);
    let messages = wait_messages(&t, &stream, 5, &[&agent]);
    let out = from(&messages, "stdout");
    assert_eq!(out.last().map(String::as_str), Some("after"));
    let pieces = &out[..out.len() - 1];
    assert!(
        pieces.len() >= 3,
        "3 MiB is more than one event: {}",
        pieces.len()
    );
    assert!(
        messages.iter().all(|m| m.len() <= 1_048_576 - 26),
        "every event within the service's limit"
    );
    let joined = join_pieces(pieces.iter().map(String::as_str));
    assert_eq!(joined.len(), 3 * 1024 * 1024);
    assert!(joined.bytes().all(|b| b == b'x'));

    // What the server received: every batch within the service's limits.
    let batches = proxy.log_batches();
    assert!(batches.len() >= 20, "{} batches", batches.len());
    for b in &batches {
        assert!(b.events <= 10_000, "{b:?}");
        assert!(b.bytes <= 1_048_576, "{b:?}");
        assert!(b.longest <= 1_048_576 - 26, "{b:?}");
        assert!(b.ordered && b.span_ms <= 24 * 3600 * 1000, "{b:?}");
    }
    assert!(
        batches.iter().any(|b| b.bytes > 1_000_000),
        "the long line's pieces fill batches: {batches:?}"
    );

    // The agent's own log: JSON lines in its instance's stream.
    let agent_stream = "agent/agent-1";
    let lines = wait_messages(&t, agent_stream, 1, &[&agent]);
    let started = lines.iter().find(|l| l.contains("started")).cloned();
    let started = started.unwrap_or_else(|| panic!("no start line in {lines:?}"));
    let json: serde_json::Value = serde_json::from_str(&started).expect("the agent logs JSON");
    assert_eq!(json["level"], "INFO", "{json}");
}

#[test]
fn cloudwatch_logs_down_for_thirty_seconds_loses_nothing_and_holds_up_no_job() {
    const LINES: u32 = 1000;
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let proxy = Proxy::start(t.moto().port());
    let down = cut_logs(&proxy);
    let began = Instant::now();
    let agent = t.agent(AgentSettings::new(&q.url).endpoint(&proxy.endpoint()));
    let script = chatty(LINES);
    let jobs = t.submit(
        &q.url,
        &["--id", "during", "--count", "4", "--", "sh", "-c", &script],
    );
    // Jobs end and their messages go while CloudWatch Logs is down: their
    // output is handed off to the spool.
    let events = t.wait_events("every job's end", &[&agent], |ev| all_final(ev, &jobs));
    t.wait_queue_empty(&q.url, &[&agent]);
    assert!(
        down.iter().any(|id| proxy.hits(id) > 0),
        "the shipper tried during the outage"
    );
    let streams: Vec<String> = jobs.iter().map(|j| stream_of(&events, j)).collect();
    for stream in &streams {
        assert!(
            t.aws.log_lines(GROUP, stream).is_empty(),
            "nothing got through yet"
        );
    }
    if let Some(left) = OUTAGE.checked_sub(began.elapsed()) {
        std::thread::sleep(left); // the outage itself, not a wait for the agent
    }
    let tries: u64 = down.iter().map(|id| proxy.hits(id)).sum();
    proxy.clear_faults();

    for stream in &streams {
        let messages = wait_messages(&t, stream, 2 * LINES as usize, &[&agent]);
        assert_eq!(messages.len(), 2 * LINES as usize, "{stream}: none twice");
        assert_eq!(from(&messages, "stdout"), numbered("out", LINES));
        assert_eq!(from(&messages, "stderr"), numbered("err", LINES));
    }
    assert!(tries >= 3, "the shipper kept retrying: {tries} tries");
}

#[test]
fn a_send_that_hangs_is_abandoned_counted_and_its_lines_still_arrive() {
    const LINES: u32 = 200;
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let proxy = Proxy::start(t.moto().port());
    let hung = proxy.inject("PutLogEvents", None, Fault::Hang, Some(1));
    let agent = t.agent(AgentSettings::new(&q.url).endpoint(&proxy.endpoint()));
    let script = chatty(LINES);
    let job = t.submit(&q.url, &["--id", "hung", "--", "sh", "-c", &script]);
    let events = t.wait_events("the job's end", &[&agent], |ev| all_final(ev, &job));
    let stream = stream_of(&events, &job[0]);
    let messages = wait_messages(&t, &stream, 2 * LINES as usize, &[&agent]);
    assert_eq!(proxy.hits(&hung), 1, "the first send hung");
    assert_eq!(from(&messages, "stdout"), numbered("out", LINES));
    assert_eq!(from(&messages, "stderr"), numbered("err", LINES));
    let status = agent.status();
    assert!(
        status.stdout.contains("1 stalled sends restarted"),
        "status counts the hung send: {}",
        status.stdout
    );
}

#[test]
fn output_not_shipped_at_a_kill_9_is_shipped_after_the_restart_once() {
    const LINES: u32 = 500;
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let proxy = Proxy::start(t.moto().port());
    cut_logs(&proxy);
    let mut agent = t.agent(AgentSettings::new(&q.url).endpoint(&proxy.endpoint()));
    let script = chatty(LINES);
    let job = t.submit(&q.url, &["--id", "before-crash", "--", "sh", "-c", &script]);
    let events = t.wait_events("the job's end", &[&agent], |ev| all_final(ev, &job));
    t.wait_queue_empty(&q.url, &[&agent]);
    let stream = stream_of(&events, &job[0]);

    agent.signal(Signal::SIGKILL);
    proxy.clear_faults();
    agent.restart();

    let messages = wait_messages(&t, &stream, 2 * LINES as usize, &[&agent]);
    assert_eq!(from(&messages, "stdout"), numbered("out", LINES));
    assert_eq!(from(&messages, "stderr"), numbered("err", LINES));
    let spool = agent.dir().join("spool");
    eventually(
        "the shipped stream's spool file removed",
        ARRIVAL,
        || !spool.join(&stream).exists(),
        || format!("{:?}", std::fs::read_dir(&spool).map(|d| d.count())),
    );
}

#[test]
fn a_kill_9_while_a_running_job_is_half_shipped_loses_no_line_after_the_restart() {
    // About 3 MB: more than the spool punches out in one step.
    const LINES: u32 = 40_000;
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let mut agent = t.agent(AgentSettings::new(&q.url));
    let script = format!(
        "seq -f 'line %08g and some padding to make it longer than it has to be' 1 {LINES}; sleep 300"
    );
    let job = t.submit(&q.url, &["--id", "half", "--", "sh", "-c", &script]);
    let started = t.wait_started(&job, &[&agent]);
    let stream = started
        .iter()
        .find(|e| e.kind == "job.started")
        .and_then(|e| e.log_stream.clone())
        .expect("the stream");
    // Some of it shipped (and punched out of the spool), the job runs on.
    wait_messages(&t, &stream, 20_000, &[&agent]);
    agent.signal(Signal::SIGKILL);
    agent.restart();

    let messages = wait_messages(&t, &stream, LINES as usize, &[&agent]);
    let mut seen = std::collections::BTreeSet::new();
    let mut order = Vec::new();
    for text in from(&messages, "stdout") {
        if seen.insert(text.clone()) {
            order.push(text);
        }
    }
    let want: Vec<String> = (1..=LINES)
        .map(|n| format!("line {n:08} and some padding to make it longer than it has to be"))
        .collect();
    assert_eq!(order.len(), want.len(), "every line arrived");
    assert!(order == want, "in order (a few may arrive twice)");
}

#[test]
fn a_drain_flushes_output_that_was_not_shipped_yet_before_the_agent_exits() {
    const LINES: u32 = 300;
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let proxy = Proxy::start(t.moto().port());
    cut_logs(&proxy);
    let mut agent = t.agent(AgentSettings::new(&q.url).endpoint(&proxy.endpoint()));
    let script = format!("{}; sleep 300", chatty(LINES));
    let job = t.submit(&q.url, &["--id", "flushed", "--", "sh", "-c", &script]);
    t.wait_started(&job, &[&agent]);
    let spool = agent.dir().join("spool");
    // All of its output is in the spool (it is asleep now).
    eventually(
        "the job's output in the spool",
        ARRIVAL,
        || {
            std::fs::read_dir(&spool).is_ok_and(|d| {
                d.filter_map(Result::ok).any(|e| {
                    std::fs::read_to_string(e.path())
                        .is_ok_and(|s| s.contains(&format!(" stderr err {LINES}\n")))
                })
            })
        },
        || agent.diagnostics(),
    );
    proxy.clear_faults();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit();
    assert!(status.success(), "{status}: {}", agent.stderr());

    // Right after the exit, with no waiting: the drain shipped it.
    let events = t.events();
    let started = events
        .iter()
        .find(|e| e.kind == "job.started")
        .and_then(|e| e.log_stream.clone())
        .expect("a start event with its stream");
    let messages: Vec<String> = t
        .aws
        .log_lines(GROUP, &started)
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(from(&messages, "stdout"), numbered("out", LINES));
    assert_eq!(from(&messages, "stderr"), numbered("err", LINES));
    assert!(
        agent.stderr().contains("telemetry flushed"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn past_the_spool_bound_the_oldest_output_is_dropped_counted_and_noted_in_its_stream() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let proxy = Proxy::start(t.moto().port());
    let down = cut_logs(&proxy);
    let agent = t.agent(
        AgentSettings::new(&q.url)
            .endpoint(&proxy.endpoint())
            .extra("logs.spool_max_bytes", "\"64KiB\""),
    );
    // About 400 KB of output: more than the bound while nothing ships.
    let job = t.submit(
        &q.url,
        &[
            "--id",
            "flood",
            "--",
            "sh",
            "-c",
            "seq -f 'line %08g padding padding padding padding' 1 8000",
        ],
    );
    let events = t.wait_events("the job's end", &[&agent], |ev| all_final(ev, &job));
    assert_eq!(
        final_of(&events, &job[0]).map(|e| e.kind.as_str()),
        Some("job.succeeded")
    );
    let stream = stream_of(&events, &job[0]);
    assert!(down.iter().any(|id| proxy.hits(id) > 0));
    proxy.clear_faults();

    let last = "line 00008000 padding padding padding padding";
    let mut messages = Vec::new();
    eventually(
        "the note and the newest line in the stream",
        ARRIVAL,
        || {
            messages = t
                .aws
                .log_lines(GROUP, &stream)
                .into_iter()
                .map(|l| l.message)
                .collect();
            let noted = from(&messages, "agent")
                .iter()
                .any(|n| n.contains("dropped before they were shipped"));
            noted && from(&messages, "stdout").iter().any(|l| l == last)
        },
        || {
            format!(
                "{:?}\n{}",
                t.aws.log_lines(GROUP, &stream),
                agent.diagnostics()
            )
        },
    );
    let notes = from(&messages, "agent");
    assert!(
        notes.iter().any(|n| n.contains("logs.spool_max_bytes")),
        "the note names the key: {notes:?}"
    );
    let kept = from(&messages, "stdout");
    assert!(kept.len() < 8000, "some output was dropped: {}", kept.len());
    let stderr = agent.stderr();
    let warned = stderr.matches("dropped output not yet shipped").count();
    assert!(warned >= 1, "the agent's log says so");
    assert!(warned <= 5, "and does not flood: {warned} lines");
    let status = agent.status();
    assert!(
        status.stdout.contains("bytes DROPPED (spool full)"),
        "status counts it: {}",
        status.stdout
    );
}

/// A tmpfs of `size` at `dir`, gone with the guard.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(ok.success(), "mounting a tmpfs at {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_job_whose_output_cannot_be_spooled_keeps_its_message() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let mut tmpfs = None;
    // Released for ever (never dead-lettered as agent_gave_up) while the
    // test looks.
    let settings = AgentSettings::new(&q.url).extra("jobs.max_requeues", "1000");
    let agent = t.agent_with_state(settings, |state| {
        let spool = state.parent().expect("agent dir").join("spool");
        tmpfs = Some(Tmpfs::mount(&spool, "32k"));
    });
    let job = t.submit(
        &q.url,
        &["--id", "too-much", "--", "sh", "-c", "seq 1 100000"],
    );
    let events = t.wait_events("a release for the output", &[&agent], |ev| {
        ev.iter().any(|e| e.kind == "job.requeued")
    });
    let requeued = events
        .iter()
        .find(|e| e.kind == "job.requeued")
        .expect("requeued");
    assert!(
        requeued
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("job output not handed off")),
        "{requeued:?}"
    );
    assert!(
        !events.iter().any(|e| e.kind == "job.succeeded"),
        "never reported done: {events:?}"
    );
    let depth = t.aws.depth(&q.url);
    assert!(
        !depth.is_empty(),
        "the message is still in the queue: {depth:?}"
    );
    drop(agent);
    drop(tmpfs);
    let _ = job;
}
