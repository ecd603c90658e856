//! The life of messages on SQS with the real binary against a local SQS
//! (moto): each job runs exactly once and its message is deleted; a job
//! outliving the visibility timeout keeps its message; failures are retried
//! to `max_attempts`; exit 75 requeues; FIFO groups run in order; urgent
//! queues go first; and an SQS outage loses nothing and never runs a job
//! twice at once.
//!
//! Jobs write `start ID` / `end ID` lines to one shared file (`marked`), the
//! ground truth of what ran when.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use batchly_e2e::sqs::proxy::Proxy;
use batchly_e2e::sqs::{marked, AgentSettings, QueueOptions, RunLine, SqsTest, LONG_WAIT};
use batchly_e2e::{count_final, eventually, of_job, of_message, Event, Submitted};

/// How long the outage test keeps the SQS endpoint away.
const OUTAGE: Duration = Duration::from_secs(30);

fn finals<'a>(events: &'a [Event], job: &Submitted) -> Vec<&'a Event> {
    of_job(events, &job.job_id)
        .into_iter()
        .filter(|e| e.is_final)
        .collect()
}

fn message_ids(jobs: &[Submitted]) -> BTreeSet<String> {
    jobs.iter().map(|j| j.message_id.clone()).collect()
}

fn all_final(events: &[Event], jobs: &[Submitted]) -> bool {
    jobs.iter().all(|j| {
        events
            .iter()
            .any(|e| e.job_id.as_deref() == Some(j.job_id.as_str()) && e.is_final)
    })
}

#[test]
fn two_hundred_jobs_on_four_slots_each_run_exactly_once_and_are_all_deleted() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let mark = t.mark_env();
    let jobs = t.submit(
        &q.url,
        &[
            "--id",
            "load",
            "--count",
            "200",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &marked(""),
        ],
    );
    assert_eq!(jobs.len(), 200);
    let agent = t.agent(AgentSettings::new(&q.url).slots(4));

    let events = t.wait_events("200 final events", &[&agent], |ev| {
        count_final(ev, None) >= 200
    });
    t.wait_queue_empty(&q.url, &[&agent]);

    let events = {
        // Anything published after the last final event is in by now.
        let mut all = events;
        all.extend(t.events().into_iter().skip(all.len()));
        all
    };
    assert_eq!(
        count_final(&events, None),
        200,
        "one final event per message"
    );
    assert_eq!(count_final(&events, Some("job.succeeded")), 200);
    let named: BTreeSet<String> = events.iter().map(|e| e.message_id.clone()).collect();
    assert_eq!(
        named,
        message_ids(&jobs),
        "events name exactly the submitted messages"
    );
    let runs = t.runs();
    for job in &jobs {
        assert_eq!(runs.starts(&job.job_id), 1, "{} ran once", job.job_id);
        assert_eq!(runs.ends(&job.job_id), 1, "{} ended once", job.job_id);
        let started = of_message(&events, &job.message_id)
            .iter()
            .filter(|e| e.kind == "job.started")
            .count();
        assert_eq!(started, 1, "{}: one job.started", job.job_id);
    }
    assert!(
        runs.max_running() <= 4,
        "never more than the 4 slots at once, saw {}",
        runs.max_running()
    );
    assert!(t.aws.depth(q.dlq()).is_empty(), "nothing was dead-lettered");
}

#[test]
fn a_job_outliving_the_visibility_timeout_keeps_its_message_and_runs_once() {
    let t = SqsTest::start();
    let q = t.job_queue_with(
        "short-lease",
        &QueueOptions {
            visibility_s: Some(2),
            ..QueueOptions::default()
        },
    );
    let mark = t.mark_env();
    let job = t.submit(
        &q.url,
        &[
            "--id",
            "slow",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &marked("sleep 8"),
        ],
    );
    // Two agents with free slots poll the same queue the whole time.
    let a = t.agent(AgentSettings::new(&q.url).slots(2));
    let b = t.agent(AgentSettings::new(&q.url).slots(2));

    let events = t.wait_events("the job's final event", &[&a, &b], |ev| all_final(ev, &job));
    t.wait_queue_empty(&q.url, &[&a, &b]);

    let message = &job[0].message_id;
    let fin = finals(&events, &job[0]);
    assert_eq!(fin.len(), 1, "{fin:?}");
    assert_eq!(fin[0].kind, "job.succeeded", "{:?}", fin[0]);
    let started: Vec<_> = of_message(&events, message)
        .into_iter()
        .filter(|e| e.kind == "job.started")
        .collect();
    assert_eq!(started.len(), 1, "no second copy started: {started:?}");
    let runs = t.runs();
    assert_eq!(runs.starts("slow"), 1, "{:?}", runs.lines);
    assert!(t.aws.depth(q.dlq()).is_empty());
}

#[test]
fn a_failing_job_is_retried_to_max_attempts_then_failed_and_deleted() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let job = t.submit(
        &q.url,
        &[
            "--id",
            "fails",
            "--max-attempts",
            "3",
            "--",
            "sh",
            "-c",
            "exit 4",
        ],
    );
    let agent = t.agent(AgentSettings::new(&q.url));

    let events = t.wait_events("the final failure", &[&agent], |ev| all_final(ev, &job));
    t.wait_queue_empty(&q.url, &[&agent]);

    let evs = of_message(&events, &job[0].message_id);
    let failed: Vec<&&Event> = evs.iter().filter(|e| e.kind == "job.failed").collect();
    assert_eq!(failed.len(), 3, "{evs:?}");
    let attempts: BTreeSet<u64> = failed.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, BTreeSet::from([1, 2, 3]), "{evs:?}");
    for e in &failed {
        assert_eq!(e.exit_code, Some(4), "{e:?}");
        assert_eq!(e.is_final, e.attempt == 3, "only the last is final: {e:?}");
    }
    assert_eq!(finals(&events, &job[0]).len(), 1, "{evs:?}");
    assert!(
        t.aws.depth(q.dlq()).is_empty(),
        "a failure is not a rejection"
    );
}

#[test]
fn exit_75_requeues_the_job_which_then_runs_again_and_succeeds() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let mark = t.mark_env();
    let script =
        marked("if [ -e \"$MARK/asked\" ]; then true; else touch \"$MARK/asked\"; exit 75; fi");
    let job = t.submit(
        &q.url,
        &[
            "--id",
            "again",
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
    let agent = t.agent(AgentSettings::new(&q.url));

    let events = t.wait_events("the final event", &[&agent], |ev| all_final(ev, &job));
    t.wait_queue_empty(&q.url, &[&agent]);

    let evs = of_job(&events, &job[0].job_id);
    let requeued: Vec<_> = evs.iter().filter(|e| e.kind == "job.requeued").collect();
    assert_eq!(requeued.len(), 1, "{evs:?}");
    assert!(!requeued[0].is_final, "{evs:?}");
    assert_eq!(requeued[0].exit_code, Some(75), "{evs:?}");
    let fin = finals(&events, &job[0]);
    assert_eq!(fin.len(), 1, "{evs:?}");
    assert_eq!(
        fin[0].kind, "job.succeeded",
        "exit 75 is not a failure, even with max_attempts 1: {evs:?}"
    );
    assert_eq!(t.runs().starts("again"), 2);
}

#[test]
fn exit_75_does_not_count_against_max_attempts() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let mark = t.mark_env();
    // Run 1 asks to run again, run 2 fails, run 3 succeeds: with two
    // attempts allowed, only run 2 is a failed attempt.
    let script = marked(
        "n=$(($(cat \"$MARK/n\" 2>/dev/null || echo 0) + 1)); echo $n > \"$MARK/n\"\n\
         case $n in 1) exit 75 ;; 2) exit 3 ;; *) exit 0 ;; esac",
    );
    let job = t.submit(
        &q.url,
        &[
            "--id",
            "checkpointed",
            "--max-attempts",
            "2",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let agent = t.agent(AgentSettings::new(&q.url));

    let events = t.wait_events("the final event", &[&agent], |ev| all_final(ev, &job));
    t.wait_queue_empty(&q.url, &[&agent]);

    let mut evs = of_job(&events, &job[0].job_id);
    // In the order they happened (`at` is fixed-width RFC 3339).
    evs.sort_by_key(|e| e.raw["at"].as_str().unwrap_or("").to_string());
    let outcomes: Vec<(&str, u64, bool)> = evs
        .iter()
        .filter(|e| e.kind != "job.started")
        .map(|e| (e.kind.as_str(), e.attempt, e.is_final))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("job.requeued", 1, false),
            ("job.failed", 1, false),
            ("job.succeeded", 2, true)
        ],
        "the requeue is not a failed attempt, so the failure is retried: {evs:#?}"
    );
    assert_eq!(t.runs().starts("checkpointed"), 3);
    // The requeue replaced the message with a copy; the copy carried the
    // job to its end.
    assert_ne!(
        evs.last().map(|e| e.message_id.as_str()),
        Some(job[0].message_id.as_str()),
        "{evs:#?}"
    );
}

#[test]
fn messages_of_a_fifo_group_run_one_at_a_time_in_order() {
    let t = SqsTest::start();
    let q = t.job_queue_with(
        "ordered",
        &QueueOptions {
            fifo: true,
            ..QueueOptions::default()
        },
    );
    let mark = t.mark_env();
    let script = marked("sleep 0.3");
    let mut jobs = Vec::new();
    for group in ["a", "b"] {
        jobs.extend(t.submit(
            &q.url,
            &[
                "--group", group, "--id", group, "--count", "5", "--env", &mark, "--", "sh", "-c",
                &script,
            ],
        ));
    }
    let agent = t.agent(AgentSettings::new(&q.url).slots(4));

    let events = t.wait_events("10 final events", &[&agent], |ev| all_final(ev, &jobs));
    t.wait_queue_empty(&q.url, &[&agent]);

    for job in &jobs {
        let fin = finals(&events, job);
        assert_eq!(fin.len(), 1, "{}: {fin:?}", job.job_id);
        assert_eq!(fin[0].kind, "job.succeeded", "{:?}", fin[0]);
    }
    let runs = t.runs();
    for group in ["a", "b"] {
        let expected: Vec<String> = (1..=5).map(|n| format!("{group}-{n:04}")).collect();
        let lines: Vec<&RunLine> = runs
            .lines
            .iter()
            .filter(|l| match l {
                RunLine::Start(id) | RunLine::End(id) => id.starts_with(&format!("{group}-")),
                RunLine::Note(_) => false,
            })
            .collect();
        let want: Vec<RunLine> = expected
            .iter()
            .flat_map(|id| [RunLine::Start(id.clone()), RunLine::End(id.clone())])
            .collect();
        assert_eq!(
            lines.into_iter().cloned().collect::<Vec<_>>(),
            want,
            "group {group}: each message ends before the next one starts, in order"
        );
    }
}

#[test]
fn an_urgent_queue_goes_before_a_bulk_queue() {
    let t = SqsTest::start();
    let urgent = t.job_queue("urgent");
    let bulk = t.job_queue("bulk");
    let mark = t.mark_env();
    let script = marked("sleep 0.2");
    let bulk_jobs = t.submit(
        &bulk.url,
        &[
            "--id", "bulk", "--count", "8", "--env", &mark, "--", "sh", "-c", &script,
        ],
    );
    let agent = t.agent(AgentSettings::queues(&[&urgent.url, &bulk.url]).slots(1));
    t.wait_events("two bulk jobs to start", &[&agent], |ev| {
        ev.iter().filter(|e| e.kind == "job.started").count() >= 2
    });

    // Noted before the submit: the agent may start the first urgent job
    // before the submit command has even returned.
    t.note("urgent-submitted");
    let urgent_jobs = t.submit(
        &urgent.url,
        &[
            "--id", "urgent", "--count", "3", "--env", &mark, "--", "sh", "-c", &script,
        ],
    );
    let mut all = bulk_jobs.clone();
    all.extend(urgent_jobs.iter().cloned());
    let events = t.wait_events("every final event", &[&agent], |ev| all_final(ev, &all));

    for job in &all {
        let fin = finals(&events, job);
        assert_eq!(fin.len(), 1, "{}: {fin:?}", job.job_id);
        assert_eq!(fin[0].kind, "job.succeeded", "{:?}", fin[0]);
    }
    let runs = t.runs();
    let after: Vec<&RunLine> = runs.after_note("urgent-submitted").iter().collect();
    let starts: Vec<&str> = after
        .iter()
        .filter_map(|l| match l {
            RunLine::Start(id) => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let last_urgent = starts
        .iter()
        .rposition(|id| id.starts_with("urgent-"))
        .unwrap_or_else(|| panic!("no urgent job started: {:?}", runs.lines));
    let bulk_first = starts[..last_urgent]
        .iter()
        .filter(|id| id.starts_with("bulk-"))
        .count();
    assert!(
        bulk_first <= 1,
        "at most one bulk job (already taken when the urgent ones came) starts before the \
         last urgent one; starts after the urgent submit: {starts:?}"
    );
    assert_eq!(
        starts.iter().filter(|id| id.starts_with("urgent-")).count(),
        3,
        "{starts:?}"
    );
}

#[test]
fn an_sqs_outage_of_thirty_seconds_loses_nothing_and_never_runs_a_job_twice_at_once() {
    let t = SqsTest::start();
    // A short lease: the jobs running through the outage lose theirs
    // while the agent cannot reach SQS to renew it.
    let q = t.job_queue_with(
        "jobs",
        &QueueOptions {
            visibility_s: Some(10),
            ..QueueOptions::default()
        },
    );
    let proxy = Proxy::start(t.moto().port());
    let mark = t.mark_env();
    // Two long jobs run through the outage and on until the test lets them
    // end, which it does only once the agent has taken new work after the
    // outage: by then a second copy would have started if it ever does.
    let long = marked(
        "n=0\nwhile [ ! -e \"$MARK/release-long\" ] && [ $n -lt 1500 ]; do sleep 0.2; n=$((n+1)); done",
    );
    let mut jobs = t.submit(
        &q.url,
        &[
            "--id", "long", "--count", "2", "--env", &mark, "--", "sh", "-c", &long,
        ],
    );
    jobs.extend(t.submit(
        &q.url,
        &[
            "--id",
            "short",
            "--count",
            "30",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &marked("sleep 1"),
        ],
    ));
    let agent = t.agent(
        AgentSettings::new(&q.url)
            .slots(4)
            .endpoint(&proxy.endpoint()),
    );
    t.wait_events(
        "both long jobs running and four short ones done",
        &[&agent],
        |ev| {
            let long_started = ev
                .iter()
                .filter(|e| {
                    e.kind == "job.started"
                        && e.job_id.as_deref().is_some_and(|j| j.starts_with("long-"))
                })
                .count();
            long_started >= 2 && count_final(ev, Some("job.succeeded")) >= 4
        },
    );

    proxy.down();
    t.note("down");
    std::thread::sleep(OUTAGE);
    assert!(
        agent.is_running(),
        "the agent outlives an outage\n{}",
        agent.diagnostics()
    );
    proxy.up();
    t.note("up");
    // (A second copy of a long job already running also ends the wait:
    // it holds a slot until the long jobs are let go.)
    eventually(
        "two short jobs to start after the outage",
        LONG_WAIT,
        || {
            let runs = t.runs();
            let short_starts = runs
                .after_note("up")
                .iter()
                .filter(|l| matches!(l, RunLine::Start(id) if id.starts_with("short-")))
                .count();
            short_starts >= 2 || !runs.overlapping().is_empty()
        },
        || t.diagnostics(&t.events(), &[&agent]),
    );
    std::fs::write(t.mark().join("release-long"), b"").expect("releasing the long jobs");

    let limit = LONG_WAIT + Duration::from_secs(60);
    let events = t.wait_events_within("every message's final event", limit, &[&agent], |ev| {
        all_final(ev, &jobs)
    });
    t.wait_queue_empty(&q.url, &[&agent]);

    let runs = t.runs();
    assert!(
        runs.overlapping().is_empty(),
        "jobs ran twice at the same time: {:?}\n{}",
        runs.overlapping(),
        t.diagnostics(&events, &[&agent])
    );
    let mut unfinished = Vec::new();
    for job in &jobs {
        if runs.ends(&job.job_id) == 0 {
            unfinished.push(job.job_id.clone());
        }
        let fin = finals(&events, job);
        assert!(
            fin.iter().any(|e| e.kind == "job.succeeded"),
            "{} has a job.succeeded final event: {fin:?}",
            job.job_id
        );
    }
    assert!(
        unfinished.is_empty(),
        "never ran to its end: {unfinished:?}"
    );
    let by_kind: BTreeMap<&str, usize> = events.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.kind.as_str()).or_default() += 1;
        m
    });
    eprintln!("events through the outage: {by_kind:?}");
    assert!(t.aws.depth(q.dlq()).is_empty(), "nothing was dead-lettered");
}
