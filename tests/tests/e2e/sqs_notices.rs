//! `batchly-agent run` on SQS (moto) reading its instance's notices from a
//! fake IMDSv2 (`tests/python/fake_imds.py`): a spot interruption or an
//! Auto Scaling `Terminated` drains, a rebalance recommendation pauses
//! intake and lifts the pause, and a failing metadata service never starts
//! a drain or stops the work (README "Draining").
//!
//! Long jobs sleep far longer than any wait of a test, so a job that is
//! gone was stopped by the drain; the queue's visibility timeout is far
//! longer too, so a message visible again was released by the agent.

use std::time::{Duration, SystemTime};

use batchly_e2e::imds::{imds_time, path, FakeImds, Fault, Identity, SpotAction, ALL};
use batchly_e2e::sqs::{marked, AgentSettings, QueueDepth, QueueOptions, SqsTest};
use batchly_e2e::{count_kind, of_job, Event};

const VISIBILITY_S: u32 = 600;
/// How long the metadata service is down in the failure test.
const IMDS_OUTAGE: Duration = Duration::from_secs(30);

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

/// A job that runs until stopped; `checkpoint` makes it exit 75 (requeue
/// me) on SIGTERM, as an interruptible job does.
fn long_job(checkpoint: bool) -> String {
    let trap = if checkpoint {
        "trap 'exit 75' TERM\n"
    } else {
        ""
    };
    marked(&format!("{trap}sleep 300 & wait"))
}

fn final_or_last<'a>(events: &'a [Event], job_id: &str) -> Option<&'a Event> {
    let mut mine = of_job(events, job_id);
    mine.sort_by_key(|e| e.raw["at"].as_str().unwrap_or("").to_string());
    mine.last().copied()
}

fn fake_with_identity(instance_id: &str) -> FakeImds {
    let imds = FakeImds::start();
    imds.set_identity(&Identity {
        instance_id: instance_id.to_string(),
        ..Identity::default()
    });
    imds
}

#[test]
fn a_spot_notice_drains_releasing_every_running_job_and_the_agent_exits_0_using_imdsv2_only() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let imds = fake_with_identity("i-0spotnotice");
    let mark = t.mark_env();
    let plain = long_job(false);
    let checkpointing = long_job(true);
    let mut jobs = t.submit(
        &url,
        &[
            "--id",
            "plain",
            "--count",
            "2",
            "--grace-s",
            "1",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &plain,
        ],
    );
    jobs.extend(t.submit(
        &url,
        &[
            "--id",
            "checkpoints",
            "--grace-s",
            "20",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &checkpointing,
        ],
    ));
    let mut agent = t.agent(AgentSettings::new(&url).slots(3).imds(&imds.endpoint()));
    t.wait_events("3 jobs started", &[&agent], |ev| {
        count_kind(ev, "job.started") == 3
    });

    let notice_at = SystemTime::now() + Duration::from_secs(120);
    imds.set_spot_action(SpotAction::Terminate, &imds_time(notice_at));
    let status = agent.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "a drained agent exits 0\n{}",
        agent.diagnostics()
    );
    assert!(
        SystemTime::now() < notice_at,
        "the agent was gone before the interruption"
    );
    assert_eq!(
        t.aws.depth(&url),
        QueueDepth {
            visible: 3,
            in_flight: 0,
            delayed: 0
        },
        "every message was given back at once\n{}",
        t.diagnostics(&t.events(), &[&agent])
    );
    let events = t.events();
    for job in &jobs {
        let last = final_or_last(&events, &job.job_id)
            .unwrap_or_else(|| panic!("no event for {}: {events:#?}", job.job_id));
        assert!(
            !last.is_final,
            "{}: released, not ended: {last:?}",
            job.job_id
        );
        assert_eq!(last.attempt, 1, "{last:?}");
        assert!(
            last.reason
                .as_deref()
                .unwrap_or("")
                .contains("spot interruption")
                || last.raw.to_string().contains("spot interruption"),
            "{}: the release says why: {last:?}",
            job.job_id
        );
        assert_eq!(
            last.raw["instance_id"], "i-0spotnotice",
            "the instance id came from instance metadata: {last:?}"
        );
    }
    let checkpointed = final_or_last(&events, "checkpoints").expect("its event");
    assert_eq!(
        checkpointed.exit_code,
        Some(75),
        "the interruptible job checkpointed and asked to be requeued: {checkpointed:?}"
    );
    let stats = imds.stats();
    assert_eq!(stats.no_token, 0, "never an IMDSv1 request: {stats:?}");
    assert!(
        stats.on_path(path::SPOT_INSTANCE_ACTION) > 0 && stats.v2 > 0,
        "{stats:?}"
    );
}

#[test]
fn lifecycle_terminated_drains_and_a_failing_metadata_service_never_does() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let imds = fake_with_identity("i-0lifecycle");
    // Down from the start: the identity cannot be read, the notices fail.
    imds.fault(ALL, Fault::Status(500));
    let mark = t.mark_env();
    let mut agent = t.agent(
        AgentSettings::new(&url)
            .slots(2)
            .imds(&imds.endpoint())
            .extra("drain.timeout_s", "20"),
    );
    // A quick job runs to its end however the metadata service fails.
    let quick_job_succeeds = |id: &str| -> Event {
        let quick = marked("true");
        t.submit(
            &url,
            &["--id", id, "--env", &mark, "--", "sh", "-c", &quick],
        );
        let events = t.wait_events(&format!("{id} to succeed"), &[&agent], |ev| {
            ev.iter()
                .any(|e| e.kind == "job.succeeded" && e.job_id.as_deref() == Some(id))
        });
        events
            .into_iter()
            .find(|e| e.kind == "job.succeeded" && e.job_id.as_deref() == Some(id))
            .expect("found above")
    };
    let done = quick_job_succeeds("during-500");
    assert_eq!(
        done.raw["instance_id"], "unknown",
        "no identity yet: events say so rather than guess: {done:?}"
    );
    // Hanging and resetting connections: still no drain, work goes on.
    imds.fault(ALL, Fault::Hang);
    quick_job_succeeds("during-hang");
    // Then down for thirty seconds (every connection reset): jobs run and
    // intake goes on all along.
    imds.fault(ALL, Fault::Reset);
    let down_since = std::time::Instant::now();
    let mut during = 0;
    while down_since.elapsed() < IMDS_OUTAGE {
        quick_job_succeeds(&format!("during-outage-{during}"));
        during += 1;
    }
    assert!(
        agent.is_running(),
        "no drain from failures\n{}",
        agent.diagnostics()
    );

    // Back, with a long job running: the lifecycle transition drains.
    imds.clear_faults();
    batchly_e2e::eventually(
        "the agent read its identity once the service answered",
        batchly_e2e::WAIT,
        || {
            imds.stats()
                .log
                .iter()
                .any(|r| r.path == path::INSTANCE_ID && r.status == Some(200))
        },
        || agent.diagnostics(),
    );
    let long = long_job(false);
    let job = t
        .submit(
            &url,
            &[
                "--id",
                "long",
                "--grace-s",
                "1",
                "--env",
                &mark,
                "--",
                "sh",
                "-c",
                &long,
            ],
        )
        .remove(0);
    t.wait_started(std::slice::from_ref(&job), &[&agent]);
    imds.set_lifecycle_state("Terminated");
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", agent.diagnostics());
    assert_eq!(
        t.aws.depth(&url).visible,
        1,
        "the long job's message was released"
    );
    let events = t.events();
    let last = final_or_last(&events, "long").expect("its events");
    assert!(
        last.raw.to_string().contains("lifecycle"),
        "the release names the lifecycle transition: {last:?}"
    );
    assert_eq!(
        last.raw["instance_id"],
        "i-0lifecycle",
        "the identity was read once the service answered: {last:?}\n{:#?}\n{}",
        imds.stats()
            .log
            .iter()
            .rev()
            .take(40)
            .map(|r| format!("{} {} {:?} {:?}", r.method, r.path, r.status, r.fault))
            .collect::<Vec<_>>(),
        agent.diagnostics()
    );
    assert_eq!(imds.stats().no_token, 0);
}

#[test]
fn a_rebalance_pauses_intake_running_jobs_go_on_and_intake_resumes_after_the_quiet_period() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let imds = fake_with_identity("i-0rebalance");
    let mark = t.mark_env();
    let agent = t.agent(
        AgentSettings::new(&url)
            .slots(2)
            .imds(&imds.endpoint())
            .extra("drain.rebalance_resume_s", "4"),
    );
    // A job that runs across the pause: it must finish, not be stopped.
    let across = marked("while [ ! -e \"$MARK/go\" ]; do sleep 0.05; done");
    t.submit(
        &url,
        &["--id", "across", "--env", &mark, "--", "sh", "-c", &across],
    );
    t.wait_events("the job across the pause started", &[&agent], |ev| {
        count_kind(ev, "job.started") == 1
    });
    let paused_at = SystemTime::now();
    imds.set_rebalance(&imds_time(paused_at));
    // Wait until the agent has read it (its next poll) before submitting.
    let polls = imds.stats().on_path(path::REBALANCE);
    batchly_e2e::eventually(
        "the agent read the recommendation",
        batchly_e2e::WAIT,
        || imds.stats().on_path(path::REBALANCE) > polls,
        || agent.diagnostics(),
    );
    let status = agent.status();
    assert_eq!(status.code(), 0, "{status:?}");
    for shown in [
        "INTAKE PAUSED (rebalance recommendation)",
        "instance: i-0rebalance (m5.large, us-east-1a, on-demand)",
        "notices:  last rebalance recommendation",
    ] {
        assert!(
            status.stdout.contains(shown),
            "status shows {shown:?}:\n{}",
            status.stdout
        );
    }
    let quick = marked("true");
    let after = t
        .submit(
            &url,
            &["--id", "after", "--env", &mark, "--", "sh", "-c", &quick],
        )
        .remove(0);
    std::fs::write(t.mark().join("go"), "").expect("releasing the running job");
    let events = t.wait_events("both jobs done", &[&agent], |ev| {
        count_kind(ev, "job.succeeded") == 2
    });
    let across_end = final_or_last(&events, "across").expect("its events");
    assert_eq!(
        across_end.kind, "job.succeeded",
        "running jobs go on: {across_end:?}"
    );
    let started = of_job(&events, &after.job_id)
        .into_iter()
        .find(|e| e.kind == "job.started")
        .expect("it started");
    // To the second ("YYYY-MM-DDTHH:MM:SS"), in both formats.
    let started_at = started.raw["at"].as_str().expect("at")[..19].to_string();
    let paused = imds_time(paused_at + Duration::from_secs(3))[..19].to_string();
    assert!(
        started_at >= paused,
        "the job sent during the pause waited for the quiet period: started {started_at}, \
         paused at {}",
        imds_time(paused_at)
    );
    assert!(agent.is_running(), "a rebalance never drains");
}

#[test]
fn a_spot_notice_with_eight_mixed_jobs_lets_the_short_ones_finish_and_releases_the_rest() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let imds = fake_with_identity("i-0mixed");
    let mark = t.mark_env();
    // Short: it goes on until the drain rewrites its deadline file, then
    // needs half a second more, well within its grace.
    let short = marked(
        r#"trap '' TERM
was=$(cat "$BATCHLY_DEADLINE_FILE")
while [ "$(cat "$BATCHLY_DEADLINE_FILE")" = "$was" ]; do sleep 0.05; done
sleep 0.5"#,
    );
    let long = long_job(false);
    let checkpointing = long_job(true);
    let submit = |id: &str, count: &str, grace: &str, script: &str| {
        t.submit(
            &url,
            &[
                "--id",
                id,
                "--count",
                count,
                "--grace-s",
                grace,
                "--env",
                &mark,
                "--",
                "sh",
                "-c",
                script,
            ],
        )
    };
    let shorts = submit("short", "4", "20", &short);
    let mut rest = submit("long", "3", "1", &long);
    rest.extend(submit("checkpoint", "1", "20", &checkpointing));
    let mut agent = t.agent(AgentSettings::new(&url).slots(8).imds(&imds.endpoint()));
    t.wait_events("8 jobs started", &[&agent], |ev| {
        count_kind(ev, "job.started") == 8
    });

    let notice_at = SystemTime::now() + Duration::from_secs(120);
    imds.set_spot_action(SpotAction::Terminate, &imds_time(notice_at));
    assert_eq!(agent.wait_exit().code(), Some(0), "{}", agent.diagnostics());
    assert!(
        SystemTime::now() < notice_at,
        "gone before the interruption"
    );
    let events = t.events();
    for job in &shorts {
        let last = final_or_last(&events, &job.job_id).expect("its events");
        assert!(
            last.is_final && last.kind == "job.succeeded",
            "{}: finished within its grace: {last:?}",
            job.job_id
        );
    }
    for job in &rest {
        let last = final_or_last(&events, &job.job_id).expect("its events");
        assert!(
            !last.is_final && last.attempt == 1,
            "{}: released, not counted: {last:?}",
            job.job_id
        );
    }
    assert_eq!(
        t.aws.depth(&url),
        QueueDepth {
            visible: 4,
            in_flight: 0,
            delayed: 0
        },
        "the four that could not finish are visible again at once"
    );
    assert_eq!(imds.stats().no_token, 0, "IMDSv2 only");
}
