//! Stopping `batchly-agent run` under running jobs, on SQS (moto): a drain
//! on SIGTERM gives every message back at once without using up an
//! attempt, and a restart after `kill -9` kills the orphaned jobs and gives
//! their messages back at once, counting the crash as an attempt (README
//! "Draining", "Crashes" and "Attempts").
//!
//! The job queue hides a received message for `VISIBILITY_S`, far longer than
//! any wait of the test: a job can only run again within the test because
//! the agent released its message explicitly.
//!
//! Each job, on its first run, leaves its pids in `$MARK` and sleeps for
//! `SLEEP_S`, longer than any wait of the test; on a later run it succeeds
//! at once. Its start and end go to the runs file (`marked`).

use batchly_e2e::sqs::{marked, AgentSettings, QueueDepth, QueueOptions, SqsAgent, SqsTest};
use batchly_e2e::{
    count_final, count_kind, of_job, pid_alive, read_pid_file, wait_gone, Event, Submitted,
};
use nix::sys::signal::Signal;

/// The job queue's visibility timeout: a message an agent received stays
/// hidden this long unless the agent gives it back. Well above `LONG_WAIT`.
const VISIBILITY_S: u32 = 600;
/// How long a job's first run sleeps: well above every wait of the test
/// (`batchly_e2e::WAIT` included), so a sleep that is gone was killed.
const SLEEP_S: u32 = 300;

/// First run: record the pids of the shell and of its `sleep`, then sleep
/// for good. Any later run: succeed at once.
fn long_then_instant_job() -> String {
    marked(&format!(
        r#"if [ -e "$MARK/$BATCHLY_JOB_ID.ran" ]; then true; else
touch "$MARK/$BATCHLY_JOB_ID.ran"
sleep {SLEEP_S} & echo $! $(readlink /proc/self/ns/pid) > "$MARK/$BATCHLY_JOB_ID.child"
echo $$ $(readlink /proc/self/ns/pid) > "$MARK/$BATCHLY_JOB_ID.leader"
wait
fi"#
    ))
}

/// The pids a job's first run left: its shell and its `sleep`.
fn job_pids(t: &SqsTest, job: &Submitted) -> (i32, i32) {
    let file = |suffix: &str| t.mark().join(format!("{}.{suffix}", job.job_id));
    (
        read_pid_file(&file("leader")),
        read_pid_file(&file("child")),
    )
}

fn long_lease_queue(t: &SqsTest) -> String {
    t.job_queue_with(
        "jobs",
        &QueueOptions {
            visibility_s: Some(VISIBILITY_S),
            ..QueueOptions::default()
        },
    )
    .url
}

/// The events of `job`, in the order they happened (`at` is fixed-width
/// RFC 3339; the sort is stable, so equal times keep the queue's order).
fn history<'a>(events: &'a [Event], job: &Submitted) -> Vec<&'a Event> {
    let mut mine = of_job(events, &job.job_id);
    mine.sort_by_key(|e| e.raw["at"].as_str().unwrap_or("").to_string());
    mine
}

fn kinds(events: &[&Event]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

fn all_final(events: &[Event], jobs: &[Submitted]) -> bool {
    jobs.iter()
        .all(|j| of_job(events, &j.job_id).iter().any(|e| e.is_final))
}

/// Submits `n` long jobs, starts an agent with `n` slots and waits until
/// all have started; returns the jobs, the agent and each job's pids.
fn start_long_jobs(
    t: &SqsTest,
    url: &str,
    n: usize,
) -> (Vec<Submitted>, SqsAgent, Vec<(i32, i32)>) {
    let mark = t.mark_env();
    let script = long_then_instant_job();
    let count = n.to_string();
    let jobs = t.submit(
        url,
        &[
            "--id", "long", "--count", &count, "--env", &mark, "--", "sh", "-c", &script,
        ],
    );
    let agent = t.agent(AgentSettings::new(url).slots(n));
    t.wait_events(&format!("{n} jobs started"), &[&agent], |ev| {
        count_kind(ev, "job.started") == n
    });
    let pids = jobs.iter().map(|j| job_pids(t, j)).collect();
    (jobs, agent, pids)
}

/// Each job started twice (the stopped run and the one that ended it)
/// and ended once.
fn assert_each_ran_twice_and_ended_once(t: &SqsTest, jobs: &[Submitted]) {
    let runs = t.runs();
    for job in jobs {
        assert_eq!(runs.starts(&job.job_id), 2, "{:?}", runs.lines);
        assert_eq!(runs.ends(&job.job_id), 1, "{:?}", runs.lines);
    }
}

#[test]
fn sigterm_during_four_long_jobs_releases_them_at_once_uncounted_and_a_new_agent_ends_them() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let (jobs, mut first, pids) = start_long_jobs(&t, &url, 4);

    first.signal(Signal::SIGTERM);
    let status = first.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "a drained agent exits 0\n{}",
        first.diagnostics()
    );

    // Right after the exit: nothing hidden, nothing running.
    assert_eq!(
        t.aws.depth(&url),
        QueueDepth {
            visible: 4,
            in_flight: 0,
            delayed: 0
        },
        "the drain gave all 4 messages back at once, none is left hidden for {VISIBILITY_S} s\n{}",
        t.diagnostics(&t.events(), &[&first])
    );
    let runs = t.runs();
    for (job, (leader, child)) in jobs.iter().zip(&pids) {
        assert_eq!(
            runs.ends(&job.job_id),
            0,
            "{} was stopped, not waited for: {:?}",
            job.job_id,
            runs.lines
        );
        assert!(
            !pid_alive(*leader),
            "{}: its shell (pid {leader}) did not outlive the drained agent",
            job.job_id
        );
        wait_gone(*child, &format!("the sleep of {}", job.job_id));
    }
    let events = t.events();
    assert_eq!(count_final(&events, None), 0, "nothing is final yet");
    for job in &jobs {
        let mine = history(&events, job);
        assert_eq!(
            kinds(&mine),
            ["job.started", "job.interrupted"],
            "{}: {mine:#?}",
            job.job_id
        );
        let interrupted = mine[1];
        assert!(!interrupted.is_final, "{interrupted:?}");
        assert_eq!(interrupted.attempt, 1, "{interrupted:?}");
        assert!(
            interrupted
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("SIGTERM")),
            "the reason names the signal: {interrupted:?}"
        );
    }

    let second = t.agent(AgentSettings::new(&url).slots(4));
    let events = t.wait_events("4 final events", &[&second], |ev| all_final(ev, &jobs));
    t.wait_queue_empty(&url, &[&second]);

    for job in &jobs {
        let mine = history(&events, job);
        assert_eq!(
            kinds(&mine),
            [
                "job.started",
                "job.interrupted",
                "job.started",
                "job.succeeded"
            ],
            "{}: {mine:#?}",
            job.job_id
        );
        let end = mine[3];
        assert!(end.is_final, "{end:?}");
        assert_eq!(
            end.attempt, 1,
            "{}: a drain is not an attempt on a standard queue: {mine:#?}",
            job.job_id
        );
        assert_ne!(
            end.message_id, job.message_id,
            "{}: the drain released the job as a copy under a new message id: {mine:#?}",
            job.job_id
        );
        assert_eq!(
            mine[2].message_id, end.message_id,
            "{}: {mine:#?}",
            job.job_id
        );
    }
    assert_eq!(count_final(&events, None), 4, "one final event per job");
    assert_each_ran_twice_and_ended_once(&t, &jobs);
}

#[test]
fn after_kill_9_a_restart_kills_the_orphaned_jobs_and_releases_their_messages_at_once() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let (jobs, mut first, pids) = start_long_jobs(&t, &url, 2);

    first.signal(Signal::SIGKILL);
    first.wait_exit();
    for (job, (leader, child)) in jobs.iter().zip(&pids) {
        assert!(
            pid_alive(*leader) && pid_alive(*child),
            "{} outlived the agent's kill -9 (it is an orphan now)",
            job.job_id
        );
    }
    assert_eq!(
        t.aws.depth(&url),
        QueueDepth {
            visible: 0,
            in_flight: 2,
            delayed: 0
        },
        "both messages are still hidden by the dead agent's receive"
    );

    first.restart();
    for (job, (leader, child)) in jobs.iter().zip(&pids) {
        wait_gone(*leader, &format!("the orphaned shell of {}", job.job_id));
        wait_gone(*child, &format!("the orphaned sleep of {}", job.job_id));
    }
    // Within LONG_WAIT, far less than VISIBILITY_S: only an explicit release
    // lets a job run again this soon.
    let events = t.wait_events("2 final events", &[&first], |ev| all_final(ev, &jobs));
    t.wait_queue_empty(&url, &[&first]);

    for job in &jobs {
        let mine = history(&events, job);
        assert_eq!(
            kinds(&mine),
            [
                "job.started",
                "job.requeued",
                "job.started",
                "job.succeeded"
            ],
            "{}: {mine:#?}",
            job.job_id
        );
        let (requeued, end) = (mine[1], mine[3]);
        assert!(!requeued.is_final, "{requeued:?}");
        assert!(
            requeued
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("restart")),
            "the reason says the agent restarted: {requeued:?}"
        );
        assert!(end.is_final, "{end:?}");
        assert_eq!(
            mine.iter().filter(|e| e.is_final).count(),
            1,
            "{}: {mine:#?}",
            job.job_id
        );
        assert_eq!(
            end.attempt, 2,
            "{}: a release at the next start after a crash counts as an attempt: {mine:#?}",
            job.job_id
        );
        assert_eq!(
            end.message_id, job.message_id,
            "{}: after a crash the message itself is released, not a copy: {mine:#?}",
            job.job_id
        );
    }
    assert_eq!(count_final(&events, None), 2, "one final event per job");
    assert_each_ran_twice_and_ended_once(&t, &jobs);
}
