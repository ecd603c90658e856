//! `bench_sqs`: how many SQS API calls `batchly-agent run` makes per job on
//! its job queue in steady state, and how many jobs per second it runs,
//! against a local SQS (moto) behind a counting proxy.
//!
//! ```text
//! cargo run -p batchly-e2e --bin bench_sqs -- [--jobs 1000] [--slots 8] [--release-agent]
//! ```
//!
//! It pre-loads N trivial jobs (`/bin/true`, signed with the agent
//! library's `envelope::sign` and a fresh Ed25519 key) straight into moto,
//! runs the agent (through the proxy) until every job's `job.succeeded`
//! event has arrived and the queue is empty, drains it, and prints the
//! calls per job by queue and action, with jobs/s measured from the first
//! `job.started` to the last `job.succeeded` (the events' own `at`).
//!
//! It reports; it never fails on speed. The exit status is non-zero only
//! when jobs were lost or did not succeed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use batchly_agent::envelope::{sign, Alg, SigningKey};
use batchly_e2e::sqs::proxy::{CallCounts, Proxy};
use batchly_e2e::sqs::{aws_env, queue_name, unix_now, Aws, Moto, QueueOptions};

/// Longest the bench waits without a single new event before it gives up.
const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Longest the agent may take to start, and to exit after SIGTERM.
const AGENT_WAIT: Duration = Duration::from_secs(60);
/// The goal from the issue: SQS calls per job on the job queue.
const CALLS_PER_JOB_GOAL: f64 = 0.25;

struct Options {
    jobs: usize,
    slots: usize,
    release_agent: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        jobs: 1000,
        slots: 8,
        release_agent: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match arg.as_str() {
            "--jobs" => opts.jobs = number("--jobs")?,
            "--slots" => opts.slots = number("--slots")?,
            "--release-agent" => opts.release_agent = true,
            "-h" | "--help" => {
                return Err(
                    "usage: bench_sqs [--jobs N (1000)] [--slots N (8)] [--release-agent]".into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(opts)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate sits one level below the workspace root")
        .to_path_buf()
}

/// `BATCHLY_AGENT_BIN`, or the workspace's agent binary, built (or found
/// up to date) by cargo first so the bench never measures a stale one.
fn agent_bin(release: bool) -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("BATCHLY_AGENT_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "-p", "batchly-agent", "--bin", "batchly-agent"])
        .current_dir(workspace_root());
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .map_err(|e| format!("running {cargo:?} build: {e}"))?;
    if !status.success() {
        return Err(format!("building batchly-agent failed ({status})"));
    }
    let bin = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("batchly-agent");
    if !bin.is_file() {
        return Err(format!("no agent binary at {}", bin.display()));
    }
    Ok(bin)
}

/// Milliseconds since the Unix epoch of an event's `at`
/// (`2026-11-22T10:00:00.000Z`).
fn parse_at(at: &str) -> Option<i64> {
    let (date, time) = at.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// What the events queue told about the run.
#[derive(Default)]
struct Outcomes {
    succeeded: BTreeSet<String>,
    other_finals: BTreeMap<String, String>,
    first_start_ms: Option<i64>,
    last_success_ms: Option<i64>,
    events: u64,
}

impl Outcomes {
    fn add(&mut self, body: &str) {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(body) else {
            eprintln!("bench_sqs: an event that is not JSON: {body}");
            return;
        };
        self.events += 1;
        let kind = ev["type"].as_str().unwrap_or("");
        let message = ev["message_id"].as_str().unwrap_or("").to_string();
        let at = ev["at"].as_str().and_then(parse_at);
        if let (Some(at), "job.started") = (at, kind) {
            self.first_start_ms = Some(self.first_start_ms.map_or(at, |first| first.min(at)));
        }
        if ev["final"] == true {
            if kind == "job.succeeded" {
                self.succeeded.insert(message);
                self.last_success_ms = self.last_success_ms.max(at);
            } else {
                self.other_finals
                    .insert(message, format!("{kind}: {}", ev["reason"]));
            }
        }
    }

    fn done(&self) -> usize {
        self.succeeded.len() + self.other_finals.len()
    }
}

/// Prints the calls on one queue, with the messages each kind of call
/// carried; returns the calls per job of the `main` actions (the ones made
/// for jobs) in steady state: receives count only when they brought work
/// (receives that found the queue empty, or were still waiting when the
/// bench stopped, cost per second of idling, not per job). The rest are
/// one-off checks at start.
fn print_calls(title: &str, calls: &CallCounts, queue: &str, jobs: usize, main: &[&str]) -> f64 {
    let by_action = calls.on_queue(queue);
    let total: u64 = by_action.values().sum();
    println!(
        "  {title}: {total} calls, {:.3} per job",
        total as f64 / jobs as f64
    );
    let mut others = 0;
    let mut steady = 0;
    for action in main {
        let n = by_action.get(*action).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let carried = calls.carried_by(queue, action);
        let (working, note) = if *action == "ReceiveMessage" {
            let fruitful = calls.fruitful_receives_on(queue);
            let idle = n - fruitful;
            (
                fruitful,
                if idle > 0 {
                    format!(" ({idle} found nothing or were still polling)")
                } else {
                    String::new()
                },
            )
        } else {
            (n, String::new())
        };
        steady += working;
        let fill = if carried > 0 {
            format!(
                ", {:.2} messages per call{note}",
                carried as f64 / working.max(1) as f64
            )
        } else {
            note
        };
        println!(
            "    {action:<30} {n:>7}  {:.3}/job{fill}",
            n as f64 / jobs as f64
        );
    }
    let rest: Vec<String> = by_action
        .iter()
        .filter(|(a, _)| !main.contains(&a.as_str()))
        .map(|(a, n)| {
            others += n;
            format!("{a} {n}")
        })
        .collect();
    println!(
        "    {:<30} {others:>7}  {:.3}/job{}",
        "others",
        others as f64 / jobs as f64,
        if rest.is_empty() {
            String::new()
        } else {
            format!("  ({})", rest.join(", "))
        }
    );
    steady as f64 / jobs as f64
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench_sqs: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool, String> {
    let opts = parse_args()?;
    let bin = agent_bin(opts.release_agent)?;
    let moto = Moto::start();
    let aws = Aws::new(&moto.endpoint());
    let proxy = Proxy::start(moto.port());
    let queue = aws.job_queue("bench", &QueueOptions::default());
    let events_url = aws.create_queue("bench-events", &[]);
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let root = dir.path();

    let key = SigningKey::generate(Alg::Ed25519, "bench").map_err(|e| e.to_string())?;
    let keys_file = root.join("keys.toml");
    std::fs::write(&keys_file, key.verification_entry_toml())
        .and_then(|()| std::fs::set_permissions(&keys_file, std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| format!("writing {}: {e}", keys_file.display()))?;

    let iat = unix_now();
    let bodies: Vec<String> = (0..opts.jobs)
        .map(|i| {
            let job = serde_json::json!({"id": format!("bench-{i:05}"), "command": ["/bin/true"]});
            sign(&key, iat, iat + 3600, &job.to_string())
        })
        .collect();
    let sent: BTreeSet<String> = aws.send_batch(&queue.url, &bodies).into_iter().collect();
    if sent.len() != opts.jobs {
        return Err(format!(
            "only {} of {} jobs were queued",
            sent.len(),
            opts.jobs
        ));
    }

    let p = |sub: &str| toml_str(&root.join(sub).display().to_string());
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[queue]\nurl = {url}\nevents_url = {events}\n\n\
             [signing]\nkeys_file = {keys}\n\n[admin]\nsocket = {socket}\n\n\
             [state]\ndir = {state}\n\n\
             [jobs]\nwork_dir = {work}\nlog_dir = {logs}\nmax_concurrent = {slots}\n\n\
             [agent]\ninstance_id = \"bench\"\nlog_level = \"warn\"\n",
            url = toml_str(&queue.url),
            events = toml_str(&events_url),
            keys = toml_str(&keys_file.display().to_string()),
            socket = p("agent.sock"),
            state = p("state"),
            work = p("work"),
            logs = p("logs"),
            slots = opts.slots,
        ),
    )
    .map_err(|e| format!("writing {}: {e}", config.display()))?;

    let stderr_path = root.join("agent.stderr");
    let mut cmd = Command::new(&bin);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("BATCHLY_") || k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
    }
    let mut agent = cmd
        .arg("run")
        .arg("--config")
        .arg(&config)
        .envs(aws_env(&proxy.endpoint()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let agent_log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    let mut outcomes = Outcomes::default();
    let mut last_progress = Instant::now();
    while outcomes.done() < opts.jobs {
        if let Some(status) = agent.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("the agent exited ({status}):\n{}", agent_log()));
        }
        let before = outcomes.events;
        for m in aws.take_all(&events_url, 1) {
            outcomes.add(&m.body);
        }
        if outcomes.events > before {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > STALL_LIMIT {
            eprintln!(
                "bench_sqs: no event for {STALL_LIMIT:?}; {} of {} jobs done",
                outcomes.done(),
                opts.jobs
            );
            break;
        }
    }
    // Deletes come after the final events (ack last): wait for them too.
    let deadline = Instant::now() + STALL_LIMIT;
    while !aws.depth(&queue.url).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let depth = aws.depth(&queue.url);
    let calls: CallCounts = proxy.calls();

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + AGENT_WAIT;
    let exit = loop {
        if let Some(status) = agent.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let n = opts.jobs;
    println!(
        "bench_sqs: {n} jobs (/bin/true), {} slots, {} agent ({}), SQS = moto behind a counting proxy",
        opts.slots,
        if opts.release_agent { "release" } else { "debug" },
        bin.display()
    );
    println!(
        "  succeeded: {} of {n}; other final outcomes: {}; left in the queue: {depth:?}",
        outcomes.succeeded.len(),
        outcomes.other_finals.len()
    );
    match (outcomes.first_start_ms, outcomes.last_success_ms) {
        (Some(a), Some(b)) if b > a => println!(
            "  throughput: {:.1} jobs/s ({} jobs in {:.2} s, first job.started to last job.succeeded)",
            outcomes.succeeded.len() as f64 * 1000.0 / (b - a) as f64,
            outcomes.succeeded.len(),
            (b - a) as f64 / 1000.0
        ),
        _ => println!("  throughput: not measurable (no start or success events)"),
    }
    let per_job = print_calls(
        &format!("job queue {}", queue_name(&queue.url)),
        &calls,
        queue_name(&queue.url),
        n,
        &[
            "ReceiveMessage",
            "DeleteMessageBatch",
            "ChangeMessageVisibilityBatch",
            "DeleteMessage",
            "ChangeMessageVisibility",
            "SendMessage",
        ],
    );
    println!(
        "    steady state (the calls above, less receives that found nothing): {per_job:.3} per job; goal <= {CALLS_PER_JOB_GOAL}: {}",
        if per_job <= CALLS_PER_JOB_GOAL {
            "met"
        } else {
            "NOT met"
        }
    );
    print_calls(
        &format!("events queue {}", queue_name(&events_url)),
        &calls,
        queue_name(&events_url),
        n,
        &["SendMessage", "SendMessageBatch"],
    );
    for (q, by_action) in &calls.by_queue {
        if q != queue_name(&queue.url) && q != queue_name(&events_url) {
            println!("  other: {q}: {by_action:?}");
        }
    }
    if calls.unparsed > 0 {
        println!(
            "  ({} requests could not be framed and were not counted)",
            calls.unparsed
        );
    }
    match exit {
        Some(status) => println!("  agent after SIGTERM: {status}"),
        None => println!("  agent did not exit within {AGENT_WAIT:?} of SIGTERM (killed)"),
    }

    let lost: Vec<&String> = sent
        .iter()
        .filter(|m| !outcomes.succeeded.contains(*m) && !outcomes.other_finals.contains_key(*m))
        .collect();
    let ok = lost.is_empty() && outcomes.other_finals.is_empty() && outcomes.succeeded.len() == n;
    if !ok {
        eprintln!(
            "bench_sqs: FAILED: {} job(s) without a final event, {} not succeeded: {:?}\n--- agent log ---\n{}",
            lost.len(),
            outcomes.other_finals.len(),
            outcomes.other_finals.values().take(5).collect::<Vec<_>>(),
            agent_log()
        );
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::parse_at;

    #[test]
    fn event_times_parse_to_unix_milliseconds() {
        assert_eq!(parse_at("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            parse_at("2026-11-22T10:00:00.250Z"),
            Some(1_795_341_600_250)
        );
        assert_eq!(parse_at("2000-03-01T00:00:01Z"), Some(951_868_801_000));
        assert_eq!(parse_at("yesterday"), None);
    }
}
