//! The life of jobs in `batchly-agent dev`: slots, retries, exit 75,
//! timeouts, drains, crashes of the agent, output limits and the job's
//! environment. Each test drives its own agent on its own directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use batchly_e2e::{
    count_final, count_kind, eventually, list_dir, of_message, peak_rss_bytes, pid_alive,
    queued_message_ids, read_job_log, read_pid_file, read_text, run_cli, wait_gone, DevAgent,
    Event, Submitted, WAIT,
};
use nix::sys::signal::Signal;

fn kinds(events: &[&Event]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

fn ids(jobs: &[Submitted]) -> BTreeSet<String> {
    jobs.iter().map(|j| j.message_id.clone()).collect()
}

#[test]
fn fifty_jobs_on_four_slots_each_end_once_and_never_more_than_four_run_at_once() {
    let agent = DevAgent::start(&[("BATCHLY_JOBS_MAX_CONCURRENT", "4")]);
    // Every run appends `start ID` and `end ID` (O_APPEND, one write each)
    // to one shared file while its process is alive, so the file's order is
    // the order in which those moments really happened.
    let script = r#"
L="$MARK/runs"
echo "start $BATCHLY_JOB_ID" >> "$L"
case "$BATCHLY_JOB_ID" in
  *-0007|*-0019|*-0031|*-0043) code=3 ;;
  *-0025) if [ -e "$MARK/asked-again" ]; then code=0; else touch "$MARK/asked-again"; code=75; fi ;;
  *) code=0 ;;
esac
sleep 0.05
echo ok
echo "end $BATCHLY_JOB_ID" >> "$L"
exit $code
"#;
    let mark = agent.mark_env();
    let jobs = agent.submit(&[
        "--id",
        "mix",
        "--count",
        "50",
        "--max-attempts",
        "2",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(jobs.len(), 50);
    let failing = ["mix-0007", "mix-0019", "mix-0031", "mix-0043"];
    let asks_again = "mix-0025";

    let events = agent.wait_for("50 final events", |ev| count_final(ev, None) >= 50);

    assert_eq!(
        events
            .iter()
            .map(|e| e.message_id.clone())
            .collect::<BTreeSet<_>>(),
        ids(&jobs),
        "events name exactly the submitted messages"
    );
    for job in &jobs {
        let mine = of_message(&events, &job.message_id);
        let finals: Vec<_> = mine.iter().filter(|e| e.is_final).collect();
        assert_eq!(finals.len(), 1, "{}: {:?}", job.job_id, kinds(&mine));
        let last = mine.last().expect("has events");
        assert!(last.is_final, "{}: the final event comes last", job.job_id);
        assert!(
            mine.iter()
                .all(|e| e.job_id.as_deref() == Some(job.job_id.as_str())),
            "{}: every event names the job",
            job.job_id
        );
        if failing.contains(&job.job_id.as_str()) {
            let failed: Vec<_> = mine.iter().filter(|e| e.kind == "job.failed").collect();
            assert_eq!(failed.len(), 2, "{}: {:?}", job.job_id, kinds(&mine));
            let (first, second) = (failed[0], failed[1]);
            assert!(!first.is_final && first.attempt == 1, "{first:?}");
            assert!(
                first
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("retrying")),
                "{first:?}"
            );
            assert!(second.is_final && second.attempt == 2, "{second:?}");
            assert_eq!(second.exit_code, Some(3));
            assert_eq!(mine.iter().filter(|e| e.kind == "job.started").count(), 2);
        } else if job.job_id == asks_again {
            assert_eq!(
                kinds(&mine),
                [
                    "job.started",
                    "job.requeued",
                    "job.started",
                    "job.succeeded"
                ],
                "{}",
                job.job_id
            );
            assert!(!mine[1].is_final);
            assert_eq!(mine[1].exit_code, Some(75));
            assert_eq!(
                mine[3].attempt, 1,
                "an exit 75 is not counted as a failed attempt"
            );
        } else {
            assert_eq!(
                kinds(&mine),
                ["job.started", "job.succeeded"],
                "{}",
                job.job_id
            );
            assert_eq!(mine[1].exit_code, Some(0));
        }
    }

    let runs = read_text(&agent.mark().join("runs"));
    let mut running: BTreeSet<&str> = BTreeSet::new();
    let mut starts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut most = 0;
    for line in runs.lines() {
        match line.split_once(' ') {
            Some(("start", id)) => {
                assert!(running.insert(id), "{id} started while already running");
                *starts.entry(id).or_default() += 1;
                most = most.max(running.len());
            }
            Some(("end", id)) => {
                assert!(running.remove(id), "{id} ended without running");
            }
            _ => panic!("unexpected line in the runs file: {line:?}"),
        }
    }
    assert!(running.is_empty(), "runs never ended: {running:?}");
    assert!(
        most <= 4,
        "{most} jobs ran at the same time on 4 slots:\n{runs}"
    );
    assert_eq!(starts.len(), 50, "every job ran");
    assert_eq!(
        starts.values().sum::<usize>(),
        50 + failing.len() + 1,
        "each failing job ran twice, the exit-75 job twice, the rest once"
    );
}

#[test]
fn a_timed_out_job_has_its_whole_process_tree_killed() {
    let agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    let job = agent.submit_one(&[
        "--timeout-s",
        "1",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"sleep 300 & echo $! $(readlink /proc/self/ns/pid) > "$MARK/grandchild"; echo $$ $(readlink /proc/self/ns/pid) > "$MARK/leader"; sleep 300"#,
    ]);
    let grandchild = read_pid_file(&agent.mark().join("grandchild"));
    let leader = read_pid_file(&agent.mark().join("leader"));

    let end = agent.wait_final(&job.message_id);
    assert_eq!(end.kind, "job.timed_out", "{end:?}");
    assert!(
        end.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("timed out after 1s")),
        "{end:?}"
    );
    wait_gone(leader, "the timed-out job");
    wait_gone(grandchild, "the background child of the timed-out job");
}

#[test]
fn sigterm_during_eight_long_jobs_releases_them_and_a_restart_finishes_them() {
    let mut agent = DevAgent::start(&[("BATCHLY_JOBS_MAX_CONCURRENT", "8")]);
    let mark = agent.mark_env();
    // Each job runs until the test creates `go`: it cannot finish on its own
    // before the drain, however slow the machine.
    let jobs = agent.submit(&[
        "--id",
        "long",
        "--count",
        "8",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"while [ ! -e "$MARK/go" ]; do sleep 0.05; done"#,
    ]);
    agent.wait_for("8 jobs started", |ev| count_kind(ev, "job.started") == 8);

    agent.sigterm();
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "a drained agent exits 0");

    let events = agent.events();
    assert_eq!(count_final(&events, None), 0, "nothing is final yet");
    for job in &jobs {
        let mine = of_message(&events, &job.message_id);
        assert_eq!(
            kinds(&mine),
            ["job.started", "job.interrupted"],
            "{}",
            job.job_id
        );
        assert!(
            mine[1]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("SIGTERM")),
            "{:?}",
            mine[1]
        );
    }
    assert_eq!(
        queued_message_ids(agent.dir()),
        ids(&jobs),
        "all 8 messages are back in the queue"
    );
    assert_eq!(list_dir(&agent.dir().join("claimed")), Vec::<String>::new());

    std::fs::write(agent.mark().join("go"), b"").expect("creating go");
    agent.restart();
    let events = agent.wait_for("8 final events", |ev| count_final(ev, None) >= 8);
    for job in &jobs {
        let mine = of_message(&events, &job.message_id);
        assert_eq!(
            kinds(&mine),
            [
                "job.started",
                "job.interrupted",
                "job.started",
                "job.succeeded"
            ],
            "{}",
            job.job_id
        );
        let end = mine[3];
        assert!(end.is_final, "{end:?}");
        assert_eq!(end.attempt, 1, "an interruption is not a failed attempt");
    }
    assert_eq!(count_final(&events, None), 8, "one final event per job");
}

#[test]
fn on_ctrl_c_a_job_ignoring_its_signal_is_killed_after_its_grace_and_released() {
    let mut agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    let job = agent.submit_one(&[
        "--grace-s",
        "1",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"trap '' TERM; echo $$ $(readlink /proc/self/ns/pid) > "$MARK/leader"; while :; do sleep 0.05; done"#,
    ]);
    let leader = read_pid_file(&agent.mark().join("leader"));

    agent.signal(Signal::SIGINT);
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert!(
        !pid_alive(leader),
        "the stubborn job did not outlive the agent"
    );
    let events = agent.events();
    let mine = of_message(&events, &job.message_id);
    assert_eq!(kinds(&mine), ["job.started", "job.interrupted"]);
    assert_eq!(mine[1].signal.as_deref(), Some("SIGKILL"), "{:?}", mine[1]);
    assert!(
        mine[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("SIGINT")),
        "{:?}",
        mine[1]
    );
    assert!(!mine[1].is_final);
    assert_eq!(
        queued_message_ids(agent.dir()),
        BTreeSet::from([job.message_id.clone()]),
        "the message is back in the queue for another run"
    );
}

#[test]
fn a_second_sigterm_stops_the_running_jobs_at_once_and_releases_them() {
    let mut agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    // Ignores SIGTERM and asks for five minutes of grace: only the second
    // signal can end this drain within the test's limits.
    let job = agent.submit_one(&[
        "--grace-s",
        "300",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"trap '' TERM; echo $$ $(readlink /proc/self/ns/pid) > "$MARK/leader"; while :; do sleep 0.05; done"#,
    ]);
    let leader = read_pid_file(&agent.mark().join("leader"));

    agent.sigterm();
    let dir = agent.dir().display().to_string();
    eventually(
        "the agent to report that it is draining",
        WAIT,
        || {
            let run = run_cli(&["status", "--dir", &dir, "--json"], &[]);
            run.code() == 0
                && serde_json::from_str::<serde_json::Value>(&run.stdout)
                    .is_ok_and(|s| !s["draining"].is_null())
        },
        || agent.diagnostics(),
    );
    agent.sigterm();
    assert_eq!(agent.wait_exit().code(), Some(0));

    assert!(!pid_alive(leader), "the job did not outlive the agent");
    let events = agent.events();
    let mine = of_message(&events, &job.message_id);
    assert_eq!(kinds(&mine), ["job.started", "job.interrupted"]);
    assert!(!mine[1].is_final);
    assert_eq!(
        queued_message_ids(agent.dir()),
        BTreeSet::from([job.message_id.clone()])
    );
}

#[test]
fn on_drain_the_drain_deadline_bounds_even_the_longest_grace_a_job_may_ask_for() {
    // The spec allows any non-negative grace_s; the drain deadline
    // (drain.timeout_s, less the time to release) must still win.
    let mut agent = DevAgent::start(&[("BATCHLY_DRAIN_TIMEOUT_S", "3")]);
    let mark = agent.mark_env();
    let job = agent.submit_one(&[
        "--grace-s",
        "18446744073709551615",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"trap '' TERM; echo $$ $(readlink /proc/self/ns/pid) > "$MARK/leader"; while :; do sleep 0.05; done"#,
    ]);
    let leader = read_pid_file(&agent.mark().join("leader"));

    agent.sigterm();
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert!(
        !pid_alive(leader),
        "the job was stopped before the agent exited\n{}",
        agent.diagnostics()
    );
    let events = agent.events();
    let mine = of_message(&events, &job.message_id);
    assert_eq!(
        kinds(&mine),
        ["job.started", "job.interrupted"],
        "{}",
        agent.diagnostics()
    );
    assert_eq!(
        queued_message_ids(agent.dir()),
        BTreeSet::from([job.message_id.clone()]),
        "the message was released before the agent exited"
    );
    assert_eq!(list_dir(&agent.dir().join("claimed")), Vec::<String>::new());
}

#[test]
fn sigterm_as_soon_as_the_admin_socket_answers_drains_and_exits_0() {
    // The agent is up once its admin socket accepts; a SIGTERM from then on
    // must be a drain (exit 0), never the default action of the signal. A
    // correct agent passes every round whatever the timing; an agent that
    // installs its handlers late fails some of them.
    for round in 1..=10 {
        let mut agent = DevAgent::start(&[]);
        agent.sigterm();
        let status = agent.wait_exit();
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: SIGTERM right after start ended the agent with {status}\n{}",
            agent.diagnostics()
        );
    }
}

#[test]
fn a_finished_job_leaves_no_process_behind() {
    let agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    let job = agent.submit_one(&[
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"sleep 300 & echo $! $(readlink /proc/self/ns/pid) > "$MARK/straggler"; exit 0"#,
    ]);
    let straggler = read_pid_file(&agent.mark().join("straggler"));
    let end = agent.wait_final(&job.message_id);
    assert_eq!(end.kind, "job.succeeded", "{end:?}");
    wait_gone(straggler, "the background process of a finished job");
}

#[test]
fn on_drain_a_job_exiting_75_is_requeued_and_one_finishing_in_its_grace_succeeds() {
    let mut agent = DevAgent::start(&[("BATCHLY_JOBS_MAX_CONCURRENT", "2")]);
    let mark = agent.mark_env();
    let checkpointing = agent.submit_one(&[
        "--id",
        "checkpointing",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"trap 'exit 75' TERM; touch "$MARK/ready-checkpointing"; while [ ! -e "$MARK/go" ]; do sleep 0.05; done"#,
    ]);
    let graceful = agent.submit_one(&[
        "--id",
        "graceful",
        "--grace-s",
        "30",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"trap 'echo finishing; exit 0' TERM; touch "$MARK/ready-graceful"; while :; do sleep 0.05; done"#,
    ]);
    // The traps are set before the ready files are written.
    eventually(
        "both jobs to have set their traps",
        WAIT,
        || {
            agent.mark().join("ready-checkpointing").exists()
                && agent.mark().join("ready-graceful").exists()
        },
        || agent.diagnostics(),
    );

    agent.sigterm();
    assert_eq!(agent.wait_exit().code(), Some(0));

    let events = agent.events();
    let mine = of_message(&events, &checkpointing.message_id);
    assert_eq!(kinds(&mine), ["job.started", "job.requeued"]);
    assert!(!mine[1].is_final);
    assert_eq!(mine[1].exit_code, Some(75));
    let mine = of_message(&events, &graceful.message_id);
    assert_eq!(kinds(&mine), ["job.started", "job.succeeded"]);
    assert!(mine[1].is_final);
    assert_eq!(mine[1].exit_code, Some(0));
    assert_eq!(
        queued_message_ids(agent.dir()),
        BTreeSet::from([checkpointing.message_id.clone()]),
        "only the requeued job waits in the queue"
    );

    std::fs::write(agent.mark().join("go"), b"").expect("creating go");
    agent.restart();
    let end = agent.wait_final(&checkpointing.message_id);
    assert_eq!(end.kind, "job.succeeded", "{end:?}");
    assert_eq!(
        count_final(&agent.events(), None),
        2,
        "one final event per job"
    );
}

#[test]
fn after_kill_9_of_the_agent_a_restart_kills_the_orphaned_job_and_runs_it_again() {
    let mut agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    // First run: leave a child and sleep for good. Second run: succeed.
    let job = agent.submit_one(&[
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"if [ -e "$MARK/ran-once" ]; then exit 0; fi
touch "$MARK/ran-once"
sleep 300 & echo $! $(readlink /proc/self/ns/pid) > "$MARK/child"
echo $$ $(readlink /proc/self/ns/pid) > "$MARK/leader"
wait"#,
    ]);
    agent.wait_for("the job to start", |ev| count_kind(ev, "job.started") == 1);
    let child = read_pid_file(&agent.mark().join("child"));
    let leader = read_pid_file(&agent.mark().join("leader"));

    agent.sigkill();
    agent.wait_exit();
    assert!(
        pid_alive(leader) && pid_alive(child),
        "the job outlived the agent's kill -9 (it is an orphan now)"
    );
    let status = run_cli(
        &["status", "--dir", &agent.dir().display().to_string()],
        &[],
    );
    assert_eq!(status.code(), 1, "a stale socket is no agent: {status:#?}");
    assert!(
        status.stderr.contains("no batchly-agent is running"),
        "{}",
        status.stderr
    );

    agent.restart();
    let end = agent.wait_final(&job.message_id);
    wait_gone(leader, "the orphaned job");
    wait_gone(child, "the orphaned job's child");

    assert_eq!(end.kind, "job.succeeded", "{end:?}");
    let events = agent.events();
    let mine = of_message(&events, &job.message_id);
    assert_eq!(
        kinds(&mine),
        [
            "job.started",
            "job.requeued",
            "job.started",
            "job.succeeded"
        ]
    );
    assert!(
        mine[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("restart")),
        "{:?}",
        mine[1]
    );
    assert_eq!(mine.iter().filter(|e| e.is_final).count(), 1);

    agent.sigterm();
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert_eq!(list_dir(&agent.dir().join("claimed")), Vec::<String>::new());
    assert_eq!(list_dir(&agent.dir().join("queue")), Vec::<String>::new());
}

#[test]
fn a_command_that_does_not_exist_fails_by_name_and_the_agent_keeps_running() {
    let agent = DevAgent::start(&[]);
    let missing = agent.submit_one(&["--", "no-such-command-batchly-e2e", "arg"]);
    let end = agent.wait_final(&missing.message_id);
    assert_eq!(end.kind, "job.failed", "{end:?}");
    assert!(
        end.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("command not found: no-such-command-batchly-e2e")),
        "{end:?}"
    );

    let good = agent.submit_one(&["--", "echo", "still here"]);
    let end = agent.wait_final(&good.message_id);
    assert_eq!(end.kind, "job.succeeded", "{end:?}");
    let log = agent.dir().join("logs").join(
        end.log_stream
            .as_deref()
            .expect("a job that ran has a log stream"),
    );
    assert_eq!(read_job_log(&log), "still here\n");
}

#[test]
fn a_failing_job_is_tried_max_attempts_times_and_only_the_last_failure_is_final() {
    let agent = DevAgent::start(&[]);
    let job = agent.submit_one(&["--max-attempts", "3", "--", "sh", "-c", "exit 4"]);
    agent.wait_final(&job.message_id);
    let events = agent.events();
    let mine = of_message(&events, &job.message_id);
    let failed: Vec<_> = mine.iter().filter(|e| e.kind == "job.failed").collect();
    assert_eq!(failed.len(), 3, "{:?}", kinds(&mine));
    assert_eq!(
        failed.iter().map(|e| e.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        failed.iter().map(|e| e.is_final).collect::<Vec<_>>(),
        [false, false, true]
    );
    assert!(failed.iter().all(|e| e.exit_code == Some(4)), "{failed:?}");
    assert_eq!(count_final(&events, None), 1);
}

#[test]
fn a_job_printing_a_gigabyte_keeps_a_one_mebibyte_log_and_the_agent_stays_small() {
    const MIB: u64 = 1 << 20;
    const PRINTED: u64 = 1 << 30;
    let agent = DevAgent::start(&[("BATCHLY_JOBS_LOG_MAX_BYTES", "1MiB")]);
    let job = agent.submit_one(&["--", "head", "-c", "1073741824", "/dev/zero"]);
    let end = agent.wait_final(&job.message_id);
    assert!(pid_alive(agent.pid()), "the agent survived");
    let peak = peak_rss_bytes(agent.pid());

    assert_eq!(end.kind, "job.succeeded", "{end:?}");
    let log_path = agent
        .dir()
        .join("logs")
        .join(end.log_stream.as_deref().expect("log stream"));
    let log = read_job_log(&log_path).into_bytes();
    let (kept, marker) = log.split_at(MIB as usize);
    assert!(kept.iter().all(|&b| b == 0), "the first MiB is the output");
    let marker = String::from_utf8_lossy(marker);
    assert!(
        marker.contains("output truncated")
            && marker.contains(&format!("dropped {}", PRINTED - MIB)),
        "the log ends with a marker saying what was dropped: {marker:?}"
    );
    assert!(marker.len() < 512, "only the marker follows: {marker:?}");
    assert!(
        peak < 64 * MIB,
        "the agent's peak RSS was {} MiB",
        peak / MIB
    );
}

#[test]
fn a_job_sees_a_scrubbed_environment_and_a_private_work_dir_removed_afterwards() {
    let agent = DevAgent::start(&[
        ("AWS_SECRET_ACCESS_KEY", "agent-secret"),
        ("AWS_ACCESS_KEY_ID", "x"),
    ]);
    let mark = agent.mark_env();
    let job = agent.submit_one(&[
        "--id",
        "env-check",
        "--env",
        "GREETING=hi",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"env > "$MARK/env"; pwd > "$MARK/pwd""#,
    ]);
    let end = agent.wait_final(&job.message_id);
    assert_eq!(end.kind, "job.succeeded", "{end:?}");

    let env = read_text(&agent.mark().join("env"));
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.contains(&"GREETING=hi"), "{env}");
    assert!(lines.contains(&"BATCHLY_JOB_ID=env-check"), "{env}");
    assert!(!lines.iter().any(|l| l.starts_with("AWS_")), "{env}");
    assert!(
        !lines.iter().any(|l| l.starts_with("BATCHLY_JOBS_")),
        "{env}"
    );
    assert!(!env.contains("agent-secret"), "{env}");

    let pwd = read_text(&agent.mark().join("pwd"));
    let pwd = Path::new(pwd.trim_end());
    let work_root = agent
        .dir()
        .join("work")
        .canonicalize()
        .expect("work root exists");
    assert!(
        pwd.starts_with(&work_root) && pwd != work_root,
        "the job ran in {} instead of a dir under {}",
        pwd.display(),
        work_root.display()
    );
    eventually(
        "the job's work dir to be removed",
        WAIT,
        || !pwd.exists(),
        || format!("{} still exists", pwd.display()),
    );
}

#[test]
fn a_job_does_not_inherit_signals_ignored_by_whoever_started_the_agent() {
    // nohup starts the agent with SIGHUP ignored; an ignored disposition
    // survives exec, so without a reset every job would ignore it too (and
    // a job told to stop with SIGHUP would never hear it).
    let agent = DevAgent::start_under(&["nohup"], &[]);
    let mark = agent.mark_env();
    let job = agent.submit_one(&[
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        "grep SigIgn /proc/self/status > \"$MARK/sigign\"",
    ]);
    let last = agent.wait_final(&job.message_id);
    assert_eq!(last.kind, "job.succeeded", "{}", agent.diagnostics());
    let line = read_text(&agent.mark().join("sigign"));
    let mask = u64::from_str_radix(line.trim().trim_start_matches("SigIgn:").trim(), 16)
        .expect("SigIgn is a hex mask");
    // Bits 0-30 are signals 1-31; above them are the C library's own
    // real-time signals, which no program can change.
    assert_eq!(
        mask & 0x7fff_ffff,
        0,
        "the job ignores standard signals: {line}"
    );
}

#[test]
fn a_job_that_always_asks_to_be_requeued_is_dead_lettered_as_agent_gave_up_after_max_requeues() {
    let agent = DevAgent::start(&[("BATCHLY_JOBS_MAX_REQUEUES", "3")]);
    let job = agent.submit_one(&["--", "sh", "-c", "exit 75"]);
    let end = agent.wait_final(&job.message_id);
    let events = agent.events();
    let mine = of_message(&events, &job.message_id);
    assert_eq!(
        kinds(&mine),
        [
            "job.started",
            "job.requeued",
            "job.started",
            "job.requeued",
            "job.started",
            "job.requeued",
            "job.started",
            "job.failed"
        ],
        "three requeues are allowed, the fourth is not"
    );
    assert_eq!(end.kind, "job.failed");
    assert_eq!(end.reason.as_deref(), Some("agent_gave_up"), "{end:?}");
    assert!(
        end.raw["detail"]
            .as_str()
            .is_some_and(|d| d.contains("jobs.max_requeues = 3")),
        "{end:?}"
    );
    assert!(
        mine.iter().all(|e| e.attempt == 1),
        "requeues are not failed attempts: {:?}",
        mine.iter().map(|e| e.attempt).collect::<Vec<_>>()
    );
    let reason = read_text(
        &agent
            .dir()
            .join("dead")
            .join(format!("{}.reason.json", job.message_id)),
    );
    assert!(reason.contains("agent_gave_up"), "{reason}");
    assert!(
        queued_message_ids(agent.dir()).is_empty(),
        "nothing left to run"
    );
}

#[test]
fn on_drain_a_job_reads_its_shortened_deadline_before_it_is_told_to_stop() {
    let mut agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    agent.submit_one(&[
        "--id",
        "reads-deadline",
        "--timeout-s",
        "3600",
        "--grace-s",
        "5",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"trap 'cp "$BATCHLY_DEADLINE_FILE" "$MARK/on-term"; exit 75' TERM
cp "$BATCHLY_DEADLINE_FILE" "$MARK/at-start"
while :; do sleep 0.05; done"#,
    ]);
    eventually(
        "the job to have read its deadline",
        WAIT,
        || agent.mark().join("at-start").exists(),
        || agent.diagnostics(),
    );
    let mark_dir = agent.mark().to_path_buf();
    let unix = |name: &str| -> u64 {
        let text = read_text(&mark_dir.join(name));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "an RFC 3339 line and a Unix one: {text:?}");
        assert!(lines[0].ends_with('Z'), "{text:?}");
        lines[1].parse().unwrap_or_else(|_| panic!("{text:?}"))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let at_start = unix("at-start");
    assert!(
        at_start >= now + 3500,
        "its timeout: {at_start} vs now {now}"
    );

    agent.sigterm();
    assert_eq!(agent.wait_exit().code(), Some(0));
    let on_term = unix("on-term");
    assert!(
        on_term <= now + 60 && on_term < at_start,
        "the drain's deadline (its 5 s grace), not the timeout: {on_term} vs {at_start}"
    );
}

/// The agent under a pretend systemd: what it sends to `NOTIFY_SOCKET`.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("binding");
        socket.set_read_timeout(Some(WAIT)).expect("read timeout");
        NotifySocket {
            _dir: dir,
            path,
            socket,
        }
    }

    /// `dev` started as systemd would with this socket and a 1 s watchdog,
    /// plus `env`. systemd names the watched process: the agent, which the
    /// shell becomes.
    fn agent(&self, env: &[(&str, &str)]) -> DevAgent {
        let path = self.path.display().to_string();
        let mut all = vec![
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ];
        all.extend_from_slice(env);
        DevAgent::start_under(&["sh", "-c", "WATCHDOG_PID=$$ exec \"$@\"", "sh"], &all)
    }

    /// Messages (one `KEY=value` per line each) until one has `key`, for
    /// at most `WAIT` in all.
    fn until(&self, key: &str, seen: &mut Vec<String>) -> String {
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no {key} within {WAIT:?}; got {seen:#?}");
            self.socket
                .set_read_timeout(Some(left))
                .expect("read timeout");
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {key} within {WAIT:?} ({e}); got {seen:#?}"));
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(text.clone());
            if text.lines().any(|l| l.starts_with(key)) {
                return text;
            }
        }
    }
}

#[test]
fn under_systemd_the_agent_is_ready_feeds_the_watchdog_and_says_when_it_stops() {
    let notify = NotifySocket::bind();
    let mut agent = notify.agent(&[]);
    let mut seen = Vec::new();
    let ready = notify.until("READY=1", &mut seen);
    assert!(
        ready.contains("STATUS=running; 0 of 4 slots busy"),
        "ready comes with a status line: {ready:?}"
    );
    // Fed while every loop makes progress (1 s watchdog: every 0.5 s).
    notify.until("WATCHDOG=1", &mut seen);
    notify.until("WATCHDOG=1", &mut seen);
    let job = agent.submit_one(&["--id", "under-systemd", "--", "true"]);
    agent.wait_final(&job.message_id);

    agent.sigterm();
    notify.until("STOPPING=1", &mut seen);
    let extend = notify.until("EXTEND_TIMEOUT_USEC=", &mut seen);
    let usec: u64 = extend
        .lines()
        .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(
        usec > 0 && usec <= (90 + 15) * 1_000_000,
        "the drain's time left and a margin: {usec}"
    );
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert!(
        seen.iter().position(|m| m.contains("READY=1"))
            < seen.iter().position(|m| m.contains("STOPPING=1")),
        "{seen:#?}"
    );
}

#[test]
fn a_wedged_loop_stops_the_watchdog_and_the_log_names_it() {
    let notify = NotifySocket::bind();
    // Debug builds let a test wedge one loop: its beats are ignored.
    let mut agent = notify.agent(&[("BATCHLY_TEST_STALL", "intake loop")]);
    let mut seen = Vec::new();
    notify.until("READY=1", &mut seen);
    // The next status line comes 5 s later; the watchdog would have been
    // fed ten times by then.
    notify.until("STATUS=", &mut seen);
    let fed: Vec<&String> = seen.iter().filter(|m| m.contains("WATCHDOG=1")).collect();
    assert!(
        fed.is_empty(),
        "a wedged agent must not feed the watchdog: {seen:#?}"
    );
    let log = agent.stderr();
    assert!(
        log.contains("not feeding the systemd watchdog") && log.contains("intake loop quiet"),
        "the log names the wedged loop:\n{log}"
    );
    agent.sigterm();
    assert_eq!(agent.wait_exit().code(), Some(0));
}
