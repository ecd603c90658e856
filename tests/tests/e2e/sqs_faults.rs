//! `batchly-agent run` when SQS misbehaves the way it does in production:
//! a queue that is deleted, denied or throttled; receipts SQS no longer
//! accepts; an events endpoint that takes requests and never answers, or
//! refuses them; a custody copy whose queue is gone. The faults come from
//! the test proxy (`batchly_e2e::sqs::proxy`) between the agent and moto;
//! the test's own clients talk to moto directly and see the truth.
//!
//! Each test is one defect of issue 13 (the number is in its comment) and
//! asserts what an operator would see go wrong: a job that never starts, a
//! slot that is never freed, a job that outlives its timeout or the drain,
//! a message released forever, a start that fails for good.
//!
//! Jobs write `start ID` / `end ID` lines to one shared file (`marked`), the
//! ground truth of what ran when.

use std::time::Duration;

use batchly_agent::queue::custody::{CustodyStore, Held};
use batchly_e2e::sqs::proxy::{Fault, FaultId, Proxy};
use batchly_e2e::sqs::{
    marked, queue_name, unix_now, AgentSettings, JobQueue, QueueDepth, QueueOptions, Received,
    SqsAgent, SqsTest, ED25519_KID,
};
use batchly_e2e::{eventually, of_job, pid_alive, read_pid_file, Event, Submitted};
use nix::sys::signal::Signal;

/// How long a fixed agent may take for what a test waits on (a few trivial
/// jobs, a start): far above what it needs on a busy machine, and short
/// enough that today's agent, which never gets there, fails in reasonable
/// time.
const FIXED_WAIT: Duration = Duration::from_secs(60);
/// A job queue's visibility timeout where only an explicit release may let
/// a message run again within the test: far above any wait of the test.
const VISIBILITY_S: u32 = 600;
/// The job timeout of the timeout test, in seconds.
const TIMEOUT_S: u64 = 3;
/// The drain timeout of the drain test, in seconds.
const DRAIN_TIMEOUT_S: u64 = 8;
/// How far past its timeout (or its drain deadline) a job may still be
/// seen alive: kill grace and process teardown on a busy machine. Well
/// below the job's own sleep, so a job gone by then was stopped.
const STOP_BOUND: Duration = Duration::from_secs(20);
/// How long the stubborn jobs sleep: longer than any wait of the test.
const SLEEP_S: u32 = 300;
/// The receipt code SQS gives once a message is no longer ours (its
/// visibility lapsed and another worker took it).
const RECEIPT_INVALID: &str = "ReceiptHandleIsInvalid";
/// Dead-letter attribute naming why (README, "What happens to a job").
const ATTR_REASON: &str = "batchly-reject-reason";

fn long_lease_queue(t: &SqsTest) -> JobQueue {
    t.job_queue_with(
        "jobs",
        &QueueOptions {
            visibility_s: Some(VISIBILITY_S),
            ..QueueOptions::default()
        },
    )
}

/// The test's events queue, as the proxy names it.
fn events_queue(t: &SqsTest) -> String {
    queue_name(t.events_url()).to_string()
}

/// Makes every call that publishes to the events queue meet `fault`
/// (single and batch sends alike: how the agent sends events is its own
/// business).
fn fault_events(t: &SqsTest, proxy: &Proxy, fault: Fault) -> Vec<FaultId> {
    let events = events_queue(t);
    ["SendMessageBatch", "SendMessage"]
        .iter()
        .map(|action| proxy.inject(action, Some(&events), fault.clone(), None))
        .collect()
}

fn total_hits(proxy: &Proxy, ids: &[FaultId]) -> u64 {
    ids.iter().map(|id| proxy.hits(id)).sum()
}

/// Submits one marked job `id` running `work`, with `extra` submit options.
fn submit_marked(t: &SqsTest, url: &str, id: &str, extra: &[&str], work: &str) -> Submitted {
    let mark = t.mark_env();
    let script = marked(work);
    let mut args = vec!["--id", id, "--env", &mark];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", &script]);
    let mut jobs = t.submit(url, &args);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    jobs.remove(0)
}

fn succeeded(events: &[Event], job: &Submitted) -> bool {
    of_job(events, &job.job_id)
        .iter()
        .any(|e| e.is_final && e.kind == "job.succeeded")
}

/// Waits until `cond` holds on the runs file (see `marked`).
fn wait_runs(
    t: &SqsTest,
    what: &str,
    agents: &[&SqsAgent],
    cond: impl Fn(&batchly_e2e::sqs::Runs) -> bool,
) {
    eventually(
        what,
        FIXED_WAIT,
        || cond(&t.runs()),
        || t.diagnostics(&t.events(), agents),
    );
}

fn wait_hits(t: &SqsTest, proxy: &Proxy, ids: &[FaultId], what: &str, agents: &[&SqsAgent]) {
    eventually(
        what,
        FIXED_WAIT,
        || total_hits(proxy, ids) > 0,
        || t.diagnostics(&t.events(), agents),
    );
}

// ---------------------------------------------------------------------------
// 1. Multi-queue partial failure strands messages.
// ---------------------------------------------------------------------------

/// Agent on `[first, second]` (four slots: a receive from the first queue
/// never fills them, so the second is always asked too); once it runs,
/// every receive from the second queue meets `fault`. Jobs sent to the
/// first queue must all run, once each, and leave it empty.
fn jobs_of_the_first_queue_run_while_receives_from_the_second_fail(fault: Fault) {
    let t = SqsTest::start();
    let first = t.job_queue("first");
    let second = t.job_queue("second");
    let proxy = Proxy::start(t.moto().port());
    let agent = t.agent(
        AgentSettings::queues(&[&first.url, &second.url])
            .slots(4)
            .endpoint(&proxy.endpoint()),
    );
    let failing = proxy.inject("ReceiveMessage", Some(second.name()), fault, None);

    let mark = t.mark_env();
    let script = marked("");
    let jobs = t.submit(
        &first.url,
        &[
            "--id", "first", "--count", "3", "--env", &mark, "--", "sh", "-c", &script,
        ],
    );
    eventually(
        "every job of the first queue to succeed",
        FIXED_WAIT,
        || jobs.iter().all(|j| succeeded(&t.events(), j)),
        || {
            format!(
                "the first queue holds {:?}\n{}",
                t.aws.depth(&first.url),
                t.diagnostics(&t.events(), &[&agent])
            )
        },
    );
    t.wait_queue_empty(&first.url, &[&agent]);
    let events = t.events();

    assert!(
        proxy.hits(&failing) > 0,
        "the second queue's receives failed while the jobs ran\n{}",
        t.diagnostics(&events, &[&agent])
    );
    let runs = t.runs();
    for job in &jobs {
        assert_eq!(runs.starts(&job.job_id), 1, "{:?}", runs.lines);
    }
}

#[test]
fn jobs_of_the_first_queue_all_run_while_the_second_queue_no_longer_exists() {
    jobs_of_the_first_queue_run_while_receives_from_the_second_fail(Fault::non_existent_queue());
}

#[test]
fn jobs_of_the_first_queue_all_run_while_receiving_from_the_second_is_denied() {
    jobs_of_the_first_queue_run_while_receives_from_the_second_fail(Fault::access_denied());
}

#[test]
fn jobs_of_the_first_queue_all_run_while_the_second_queue_throttles_every_receive() {
    jobs_of_the_first_queue_run_while_receives_from_the_second_fail(Fault::throttled());
}

// ---------------------------------------------------------------------------
// 3. A lapsed lease hangs a slot forever.
// ---------------------------------------------------------------------------

/// One slot; every `action` call on the job queue answers each entry with
/// `ReceiptHandleIsInvalid` (the message is no longer ours). The first job
/// (`first_work`) meets it when it finishes; the agent must say so, free
/// the slot, and run the next job. Returns the test, the proxy, the agent
/// and the first job, for more checks.
fn next_job_runs_after_an_invalid_receipt(
    action: &str,
    first_work: &str,
    first_options: &[&str],
) -> (SqsTest, Proxy, SqsAgent, Submitted) {
    let t = SqsTest::start();
    let q = long_lease_queue(&t);
    let proxy = Proxy::start(t.moto().port());
    let agent = t.agent(
        AgentSettings::new(&q.url)
            .slots(1)
            .endpoint(&proxy.endpoint()),
    );
    let refused = proxy.inject(
        action,
        Some(q.name()),
        Fault::entries_fail(RECEIPT_INVALID),
        None,
    );
    let first = submit_marked(&t, &q.url, "first", first_options, first_work);
    wait_hits(
        &t,
        &proxy,
        std::slice::from_ref(&refused),
        &format!("the first job's {action} to be refused for its receipt"),
        &[&agent],
    );

    let second = submit_marked(&t, &q.url, "second", &[], "");
    wait_runs(
        &t,
        "the second job to run on the slot the first one held",
        &[&agent],
        |runs| runs.ends(&second.job_id) == 1,
    );
    let logged = agent
        .stderr()
        .lines()
        .any(|l| l.contains("WARN") && l.contains(&first.message_id));
    assert!(
        logged,
        "a warning names the message whose receipt SQS refused\n{}",
        agent.diagnostics()
    );
    (t, proxy, agent, first)
}

#[test]
fn a_delete_refused_for_an_invalid_receipt_frees_the_slot_for_the_next_job() {
    let (t, _proxy, _agent, first) =
        next_job_runs_after_an_invalid_receipt("DeleteMessageBatch", "", &[]);
    assert_eq!(t.runs().starts(&first.job_id), 1, "{:?}", t.runs().lines);
}

#[test]
fn a_requeue_whose_original_cannot_be_deleted_for_an_invalid_receipt_frees_the_slot() {
    // Exit 75 on a standard queue: a copy is sent, then the original is
    // deleted; that delete is refused. The copy stands for the job.
    // In a subshell, so the runs file records the end of the first run too.
    let once = "(if [ -e \"$MARK/asked\" ]; then true; else touch \"$MARK/asked\"; exit 75; fi)";
    let (t, _proxy, agent, first) =
        next_job_runs_after_an_invalid_receipt("DeleteMessageBatch", once, &[]);
    wait_runs(&t, "the first job's copy to run", &[&agent], |runs| {
        runs.ends(&first.job_id) == 2
    });
    assert_eq!(t.runs().starts(&first.job_id), 2, "{:?}", t.runs().lines);
}

#[test]
fn a_retry_release_refused_for_an_invalid_receipt_frees_the_slot_for_the_next_job() {
    // A failure with attempts left: the message itself is made visible
    // again (ChangeMessageVisibilityBatch), which is refused.
    let (t, _proxy, _agent, first) = next_job_runs_after_an_invalid_receipt(
        "ChangeMessageVisibilityBatch",
        "exit 3",
        &["--max-attempts", "3"],
    );
    assert_eq!(t.runs().starts(&first.job_id), 1, "{:?}", t.runs().lines);
}

// ---------------------------------------------------------------------------
// 4. Timeouts and drains are not enforced while events are sent.
// ---------------------------------------------------------------------------

/// A job that writes its pid to `$MARK/<id>.pid` and becomes `sleep`,
/// ignoring SIGTERM if `stubborn`.
fn sleeper(id: &str, stubborn: bool) -> String {
    let trap = if stubborn { "trap '' TERM; " } else { "" };
    format!(
        "{trap}echo $$ $(readlink /proc/self/ns/pid) > \"$MARK/{id}.pid\"; exec sleep {SLEEP_S}"
    )
}

#[test]
fn a_job_is_timed_out_at_its_timeout_while_the_events_endpoint_never_answers() {
    let t = SqsTest::start();
    let q = long_lease_queue(&t);
    let proxy = Proxy::start(t.moto().port());
    let agent = t.agent(
        AgentSettings::new(&q.url)
            .slots(1)
            .endpoint(&proxy.endpoint()),
    );
    let hung = fault_events(&t, &proxy, Fault::Hang);
    let timeout = TIMEOUT_S.to_string();
    let mark = t.mark_env();
    let script = sleeper("sleepy", false);
    let job = t.submit(
        &q.url,
        &[
            "--id",
            "sleepy",
            "--timeout-s",
            &timeout,
            "--max-attempts",
            "1",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let pid = read_pid_file(&t.mark().join("sleepy.pid"));
    eventually(
        &format!("the job (pid {pid}) to be stopped at its {TIMEOUT_S} s timeout"),
        Duration::from_secs(TIMEOUT_S) + STOP_BOUND,
        || !pid_alive(pid),
        || t.diagnostics(&t.events(), &[&agent]),
    );
    assert!(
        total_hits(&proxy, &hung) > 0,
        "the job's events went to the hung endpoint"
    );

    // The endpoint answers again: the outcome is published and the
    // message finished.
    proxy.clear_faults();
    let events = t.wait_events("the job's final event", &[&agent], |ev| {
        of_job(ev, &job[0].job_id).iter().any(|e| e.is_final)
    });
    let fin: Vec<&Event> = of_job(&events, &job[0].job_id)
        .into_iter()
        .filter(|e| e.is_final)
        .collect();
    assert_eq!(fin.len(), 1, "{fin:?}");
    assert_eq!(fin[0].kind, "job.timed_out", "{:?}", fin[0]);
    t.wait_queue_empty(&q.url, &[&agent]);
}

#[test]
fn a_drain_ends_within_its_timeout_and_releases_the_job_while_the_events_endpoint_never_answers() {
    let t = SqsTest::start();
    let q = long_lease_queue(&t);
    let proxy = Proxy::start(t.moto().port());
    let mut agent = t.agent(
        AgentSettings::new(&q.url)
            .slots(1)
            .endpoint(&proxy.endpoint())
            .extra("drain.timeout_s", &DRAIN_TIMEOUT_S.to_string()),
    );
    let hung = fault_events(&t, &proxy, Fault::Hang);
    submit_marked(&t, &q.url, "stubborn", &[], &sleeper("stubborn", true));
    let pid = read_pid_file(&t.mark().join("stubborn.pid"));

    agent.signal(Signal::SIGTERM);
    eventually(
        &format!("the agent to exit within its {DRAIN_TIMEOUT_S} s drain timeout"),
        Duration::from_secs(DRAIN_TIMEOUT_S) + STOP_BOUND,
        || !agent.is_running(),
        || t.diagnostics(&t.events(), &[&agent]),
    );
    let status = agent.wait_exit();
    eventually(
        &format!("the job (pid {pid}, ignoring SIGTERM) to be gone with the agent ({status})"),
        STOP_BOUND,
        || !pid_alive(pid),
        || t.diagnostics(&t.events(), &[&agent]),
    );
    assert_eq!(
        t.aws.depth(&q.url),
        QueueDepth {
            visible: 1,
            in_flight: 0,
            delayed: 0
        },
        "the drain gave the message back (the agent exited {status}), not left it hidden for \
         {VISIBILITY_S} s\n{}",
        t.diagnostics(&t.events(), &[&agent])
    );
    assert!(
        total_hits(&proxy, &hung) > 0,
        "the job's events went to the hung endpoint"
    );
}

// ---------------------------------------------------------------------------
// 9. Releases that are not failures loop forever.
// ---------------------------------------------------------------------------

/// Polls the dead-letter queue (taking what arrives) until a message is
/// there; returns everything taken.
fn wait_dead_lettered(t: &SqsTest, dlq: &str, agents: &[&SqsAgent]) -> Vec<Received> {
    let mut got = Vec::new();
    eventually(
        "the job's message in the dead-letter queue",
        FIXED_WAIT,
        || {
            got.extend(t.aws.take_all(dlq, 0));
            !got.is_empty()
        },
        || t.diagnostics(&t.events(), agents),
    );
    got
}

#[test]
fn a_job_whose_outcome_can_never_be_published_is_dead_lettered_after_max_requeues() {
    const MAX_REQUEUES: usize = 3;
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let proxy = Proxy::start(t.moto().port());
    let agent = t.agent(
        AgentSettings::new(&q.url)
            .slots(1)
            .endpoint(&proxy.endpoint())
            .extra("jobs.max_requeues", &MAX_REQUEUES.to_string()),
    );
    // The role lost sqs:SendMessage on the events queue after the start.
    let denied = fault_events(&t, &proxy, Fault::access_denied());
    let job = submit_marked(&t, &q.url, "unheard", &[], "");

    let dead = wait_dead_lettered(&t, q.dlq(), &[&agent]);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].attributes.get(ATTR_REASON).map(String::as_str),
        Some("agent_gave_up"),
        "{:?}",
        dead[0]
    );
    t.wait_queue_empty(&q.url, &[&agent]);
    let runs = t.runs();
    let starts = runs.starts(&job.job_id);
    assert!(
        (1..=MAX_REQUEUES + 1).contains(&starts),
        "ran {starts} times: once, then at most once per allowed requeue ({MAX_REQUEUES}): {:?}",
        runs.lines
    );
    assert_eq!(runs.ends(&job.job_id), starts, "{:?}", runs.lines);
    assert!(total_hits(&proxy, &denied) > 0);
}

#[test]
fn run_exits_2_naming_the_events_queue_when_it_refuses_a_message_at_start() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let proxy = Proxy::start(t.moto().port());
    let denied = fault_events(&t, &proxy, Fault::access_denied());
    let run = t.run_expecting_exit(
        AgentSettings::new(&q.url).endpoint(&proxy.endpoint()),
        FIXED_WAIT,
    );
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains(t.events_url()) && run.stderr.contains("queue.events_url"),
        "the error names the key and the queue: {}",
        run.stderr
    );
    assert!(
        total_hits(&proxy, &denied) > 0,
        "the start tried to publish"
    );
}

// ---------------------------------------------------------------------------
// 10. A custody copy that cannot be sent stops every start.
// ---------------------------------------------------------------------------

/// A message a previous run took into custody from `queue_url` (its job
/// nearing SQS's 12-hour limit) and never sent back.
fn held_message(t: &SqsTest, queue_url: &str) -> Held {
    let now = unix_now();
    let job = serde_json::json!({"id": "held", "command": ["true"]}).to_string();
    Held {
        message_id: "0b6f5e2c-4c1e-4d5e-9a51-6f3c1d2e7a90".into(),
        queue_url: queue_url.to_string(),
        body: t.sign_with_python(&t.signing_key(), ED25519_KID, now, now + 3600, &job),
        group: None,
        failures: 0,
        receives: 1,
        attributes: Vec::new(),
    }
}

/// Starts an agent on `q` whose state dir holds `held` in custody; a job
/// sent to `q` must run, and the custody copy must be kept.
fn other_jobs_run_and_the_copy_is_kept(t: &SqsTest, settings: AgentSettings, held: &Held) {
    let q = settings.queues[0].clone();
    let agent = t.agent_with_state(settings, |state| {
        CustodyStore::open(state)
            .expect("opening the custody store")
            .keep(held)
            .expect("keeping the copy");
    });
    let job = submit_marked(t, &q, "fresh", &[], "");
    t.wait_events_within("the fresh job to succeed", FIXED_WAIT, &[&agent], |ev| {
        succeeded(ev, &job)
    });

    let kept = CustodyStore::open(&agent.dir().join("state"))
        .expect("opening the custody store")
        .all()
        .expect("reading the custody store");
    assert_eq!(
        kept.iter().map(|h| &h.message_id).collect::<Vec<_>>(),
        [&held.message_id],
        "the copy that could not be sent is kept for a later try"
    );
    assert!(
        agent.stderr().contains(&held.message_id),
        "the agent's log names the message it could not send back\n{}",
        agent.diagnostics()
    );
}

#[test]
fn a_custody_copy_for_a_deleted_queue_does_not_stop_the_start_and_is_kept() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let retired = t.aws.create_queue("retired", &[]);
    t.aws
        .block_on(t.aws.sqs.delete_queue().queue_url(&retired).send())
        .expect("deleting the retired queue");
    let held = held_message(&t, &retired);
    other_jobs_run_and_the_copy_is_kept(&t, AgentSettings::new(&q.url), &held);
}

#[test]
fn a_custody_copy_whose_queue_keeps_throttling_does_not_hold_up_the_start() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let busy = t.aws.create_queue("busy", &[]);
    let proxy = Proxy::start(t.moto().port());
    let throttled = proxy.inject(
        "SendMessage",
        Some(queue_name(&busy)),
        Fault::throttled(),
        None,
    );
    let held = held_message(&t, &busy);
    other_jobs_run_and_the_copy_is_kept(
        &t,
        AgentSettings::new(&q.url).endpoint(&proxy.endpoint()),
        &held,
    );
    assert!(
        proxy.hits(&throttled) > 0,
        "the start tried to send it back"
    );
    assert!(t.aws.depth(&busy).is_empty(), "nothing reached the queue");
}
