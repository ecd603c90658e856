//! `bench_drain`: how long `batchly-agent run` takes from a spot
//! interruption notice to its exit with a hundred running jobs, and where
//! the time goes.
//!
//! ```text
//! cargo run -p batchly-e2e --bin bench_drain -- [--jobs 100]
//! ```
//!
//! In one run: moto for SQS, the fake IMDSv2 (`tests/python/fake_imds.py`)
//! for the instance; the agent (`BATCHLY_AGENT_BIN`, with the full sandbox
//! when run as root) with one slot per job; N jobs that run until stopped
//! (and stop at once on SIGTERM), all started; then the fake metadata
//! service starts answering a spot notice two minutes ahead and the clock
//! runs until the agent has exited. The agent's `drain timeline` log line
//! gives the steps: when the watcher saw the notice (the drain was asked
//! for), intake stopped, the last job was signalled, every job was
//! finished or released (the releases acknowledged), telemetry flushed;
//! the exit is the bench's own clock.
//!
//! It reports; it never fails on speed. The exit status is non-zero when
//! a message was lost (not visible again after the drain) or the agent did
//! not exit 0.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use batchly_e2e::imds::{imds_time, FakeImds, Identity, SpotAction};
use batchly_e2e::sqs::{marked, AgentSettings, QueueOptions, SqsTest};

/// The issue's aim for notice to exit with 100 running jobs.
const AIM: Duration = Duration::from_secs(5);
/// How far ahead the notice's time is (AWS gives two minutes).
const NOTICE_AHEAD: Duration = Duration::from_secs(120);

fn parse_jobs() -> Result<usize, String> {
    let mut args = std::env::args().skip(1);
    let mut jobs = 100;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--jobs" => {
                jobs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--jobs needs a positive number")?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: bench_drain [--jobs N]"
                ))
            }
        }
    }
    Ok(jobs)
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() -> ExitCode {
    let jobs = match parse_jobs() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("bench_drain: {e}");
            return ExitCode::from(2);
        }
    };
    let t = SqsTest::start();
    let url = t
        .job_queue_with(
            "drain-bench",
            &QueueOptions {
                visibility_s: Some(600),
                ..QueueOptions::default()
            },
        )
        .url;
    let imds = FakeImds::start();
    imds.set_identity(&Identity {
        instance_id: "i-0drainbench".into(),
        ..Identity::default()
    });
    let mut agent = t.agent(
        AgentSettings::new(&url)
            .slots(jobs)
            .imds(&imds.endpoint())
            .extra("agent.log_format", "\"json\""),
    );
    let work = marked("exec sleep 600");
    let count = jobs.to_string();
    let mark = t.mark_env();
    let submitted = t.submit(
        &url,
        &[
            "--count",
            &count,
            "--grace-s",
            "30",
            "--env",
            &mark,
            "--",
            "sh",
            "-c",
            &work,
        ],
    );
    t.wait_started(&submitted, &[&agent]);

    let noticed = SystemTime::now();
    let clock = Instant::now();
    imds.set_spot_action(SpotAction::Terminate, &imds_time(noticed + NOTICE_AHEAD));
    let status = agent.wait_exit();
    let total = clock.elapsed();

    let log = agent.stderr();
    let timeline = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "drain timeline");
    let depth = t.aws.depth(&url);
    println!("bench drain: {jobs} running jobs, spot notice to agent exit (moto SQS, fake IMDSv2)");
    match &timeline {
        Some(tl) => {
            let asked = tl["asked_unix_ms"].as_u64().unwrap_or(0);
            let seen = asked.saturating_sub(unix_ms(noticed));
            let step = |name: &str| -> String {
                match tl[name].as_i64() {
                    Some(ms) if ms >= 0 => format!("{:>7} ms", seen + ms as u64),
                    _ => "      -   ".to_string(),
                }
            };
            println!("  notice seen             {seen:>7} ms  (watcher polls every 2 s)");
            println!("  intake stopped          {}", step("intake_stopped_ms"));
            println!(
                "  last job signalled      {}",
                step("last_job_signalled_ms")
            );
            println!("  releases acknowledged   {}", step("jobs_done_ms"));
            println!("  telemetry flushed       {}", step("flushed_ms"));
        }
        None => println!("  (no drain timeline in the agent's log)"),
    }
    println!(
        "  agent exited            {:>7} ms  (aim <= {} ms: {})",
        total.as_millis(),
        AIM.as_millis(),
        if total <= AIM { "met" } else { "not met" }
    );
    println!("  messages visible again  {} of {jobs}", depth.visible);
    let mut ok = true;
    if status.code() != Some(0) {
        eprintln!(
            "bench_drain: the agent exited {status:?}\n{}",
            agent.diagnostics()
        );
        ok = false;
    }
    if depth.visible as usize != jobs {
        eprintln!(
            "bench_drain: {} of {jobs} messages are visible again after the drain: {depth:?}",
            depth.visible
        );
        ok = false;
    }
    if timeline.is_none() {
        eprintln!("bench_drain: the agent logged no drain timeline\n{log}");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
