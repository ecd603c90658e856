//! `batchly-agent bench spawn`: how fast the whole job path runs (claim,
//! verify, ledger, launch through the launcher, capture, event, delete)
//! against a baseline measured in the same run on the same machine: plain
//! `posix_spawn` + wait of `/bin/true` in a loop. It prints a ratio, never a
//! pass/fail; CI runs it small to keep it working.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::app::{self, AppError, DevLayout};
use crate::config::{Config, ConfigFile};
use crate::drain::Drain;
use crate::envelope::SigningKey;
use crate::events::JsonlFile;
use crate::queue::dir::DirQueue;
use crate::submit::{self, JobRequest};

pub struct SpawnReport {
    pub jobs: u32,
    pub slots: usize,
    pub baseline_per_s: f64,
    pub agent_per_s: f64,
    pub agent_cpu_per_job: Duration,
    pub peak_rss_kib: u64,
    pub succeeded: u64,
}

impl SpawnReport {
    pub fn render(&self) -> String {
        format!(
            "bench spawn: {} jobs of /bin/true\n\
             \x20 baseline  posix_spawn + wait in a loop   {:>8.0} jobs/s\n\
             \x20 agent     dev queue, {} slots            {:>8.0} jobs/s   ratio {:.3} of baseline\n\
             \x20 agent CPU per job {:.3} ms, peak RSS {:.1} MiB, {} of {} jobs succeeded\n",
            self.jobs,
            self.baseline_per_s,
            self.slots,
            self.agent_per_s,
            self.agent_per_s / self.baseline_per_s,
            self.agent_cpu_per_job.as_secs_f64() * 1000.0,
            self.peak_rss_kib as f64 / 1024.0,
            self.succeeded,
            self.jobs,
        )
    }
}

fn baseline(jobs: u32) -> Result<f64, AppError> {
    let start = Instant::now();
    for _ in 0..jobs {
        std::process::Command::new("/bin/true")
            .status()
            .map_err(|e| AppError::Failed(format!("baseline: spawning /bin/true: {e}")))?;
    }
    Ok(f64::from(jobs) / start.elapsed().as_secs_f64())
}

fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

/// Runs the benchmark in a fresh temporary `dev` directory.
pub async fn spawn(jobs: u32, slots: usize) -> Result<SpawnReport, AppError> {
    let baseline_per_s = tokio::task::spawn_blocking(move || baseline(jobs))
        .await
        .map_err(|e| AppError::Failed(e.to_string()))??;

    let tmp = tempfile::tempdir().map_err(|e| AppError::Failed(format!("temp dir: {e}")))?;
    let layout = DevLayout::new(tmp.path())?;
    layout.ensure_keys()?;
    let env = vec![("BATCHLY_JOBS_MAX_CONCURRENT".to_string(), slots.to_string())];
    let config = Config::load(ConfigFile::None, &env, &layout.mode_defaults())
        .map_err(|e| AppError::Usage(e.to_string()))?;
    let key =
        SigningKey::load(&layout.signing_key()).map_err(|e| AppError::Failed(e.to_string()))?;
    let request = JobRequest {
        id: Some("bench".into()),
        count: jobs,
        command: vec!["/bin/true".into()],
        ..Default::default()
    };
    let texts = submit::job_texts(&request)?;
    submit::submit_to_dir(
        &layout.root,
        &key,
        &texts,
        Duration::from_secs(3600),
        |_, _| {},
    )?;

    let source = DirQueue::open(&layout.root).map_err(|e| AppError::Failed(e.to_string()))?;
    let events = JsonlFile::open(&layout.events()).map_err(|e| AppError::Failed(e.to_string()))?;
    let drain = Drain::new();
    // Every message was queued up front: once queue/ and claimed/ are both
    // empty, every job has finished.
    let watcher = {
        let drain = drain.clone();
        let root = layout.root.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if dir_is_empty(&root.join("queue")) && dir_is_empty(&root.join("claimed")) {
                    drain.request("bench finished", Instant::now() + Duration::from_secs(5));
                    return;
                }
            }
        })
    };
    let cpu_before = cpu_time();
    let start = Instant::now();
    let lock = app::lock_state_dir(&config)?;
    app::serve_with(
        &config,
        source,
        events,
        "bench",
        drain,
        None,
        app::Startup::locked(lock),
    )
    .await?;
    let elapsed = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    watcher.abort();

    let events_text = std::fs::read_to_string(layout.events())
        .map_err(|e| AppError::Failed(format!("reading events: {e}")))?;
    let succeeded = events_text
        .lines()
        .filter(|l| l.contains("\"type\":\"job.succeeded\""))
        .count() as u64;
    Ok(SpawnReport {
        jobs,
        slots,
        baseline_per_s,
        agent_per_s: f64::from(jobs) / elapsed.as_secs_f64(),
        agent_cpu_per_job: cpu / jobs.max(1),
        peak_rss_kib: peak_rss_kib(),
        succeeded,
    })
}
