//! `batchly-agent bench spawn`: how fast the whole job path runs (claim,
//! verify, ledger, launch through the launcher, capture, event, delete)
//! against baselines measured in the same run on the same machine: plain
//! `posix_spawn` + wait of `/bin/true` in a loop, and (as root) the
//! kernel's own cost of a sandboxed job with no agent: a fresh cgroup and
//! fresh namespaces, then exec of `/bin/true`. The agent runs twice, the
//! second time holding memory (1 GiB by default), to show that spawn cost
//! does not grow with the agent's size. It prints ratios, never a
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
    /// The sandboxed baseline, or why it was not measured.
    pub sandbox_baseline_per_s: Result<f64, String>,
    /// Whether the agent's jobs ran in the full sandbox.
    pub sandboxed: bool,
    pub agent: AgentRun,
    /// The same run with the agent holding `held_mib` MiB.
    pub held: Option<AgentRun>,
    pub held_mib: u64,
}

/// One run of the agent over the jobs.
pub struct AgentRun {
    pub per_s: f64,
    pub cpu_per_job: Duration,
    pub succeeded: u64,
}

impl SpawnReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "bench spawn: {} jobs of /bin/true, agent with {} slots\n\
             \x20 baseline  posix_spawn + wait in a loop                {:>8.0} jobs/s\n",
            self.jobs, self.slots, self.baseline_per_s,
        );
        match &self.sandbox_baseline_per_s {
            Ok(rate) => {
                out += &format!(
                    "  baseline  fresh cgroup + namespaces, exec, in a loop  {rate:>8.0} jobs/s\n"
                )
            }
            Err(why) => {
                out += &format!("  baseline  fresh cgroup + namespaces: not measured ({why})\n")
            }
        }
        let sandbox = if self.sandboxed {
            "full sandbox"
        } else {
            "no sandbox"
        };
        out += &format!(
            "  agent     dev queue, {sandbox:<12}                   {:>8.0} jobs/s   {:.3} of posix_spawn",
            self.agent.per_s,
            self.agent.per_s / self.baseline_per_s,
        );
        if let Ok(rate) = &self.sandbox_baseline_per_s {
            out += &format!(", {:.3} of the sandboxed baseline", self.agent.per_s / rate);
        }
        out += "\n";
        if let Some(held) = &self.held {
            out += &format!(
                "  agent     the same, holding {:>5} MiB                {:>8.0} jobs/s   spawn cost {:.3}x of not holding it\n",
                self.held_mib,
                held.per_s,
                self.agent.per_s / held.per_s,
            );
        }
        out += &format!(
            "  agent CPU per job {:.3} ms, peak RSS {:.1} MiB, {} of {} jobs succeeded\n",
            self.agent.cpu_per_job.as_secs_f64() * 1000.0,
            peak_rss_kib() as f64 / 1024.0,
            self.succeeded(),
            self.jobs * if self.held.is_some() { 2 } else { 1 },
        );
        out
    }

    /// Jobs that succeeded over every agent run.
    pub fn succeeded(&self) -> u64 {
        self.agent.succeeded + self.held.as_ref().map_or(0, |h| h.succeeded)
    }

    /// Jobs run over every agent run.
    pub fn ran(&self) -> u64 {
        u64::from(self.jobs) * if self.held.is_some() { 2 } else { 1 }
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

/// The sandboxed baseline (`sandbox::baseline`), or why it cannot run here.
fn sandbox_baseline(jobs: u32) -> Result<f64, String> {
    use crate::sandbox::cgroup::{self, Hierarchy};
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    let cgroups = Hierarchy::detect()?;
    cgroups
        .prepare(std::process::id())
        .map_err(|e| format!("preparing cgroups: {e}"))?;
    let scope = format!("bench{}", std::process::id());
    let start = Instant::now();
    for i in 0..jobs {
        crate::sandbox::baseline::run_one(&cgroups, &cgroup::job_name(&scope, 0, i as i32))
            .map_err(|e| format!("job {i}: {e}"))?;
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

/// Runs the benchmark, each agent run in a fresh temporary `dev`
/// directory; the second run holds `hold_mib` MiB (none when 0).
pub async fn spawn(jobs: u32, slots: usize, hold_mib: u64) -> Result<SpawnReport, AppError> {
    let baseline_per_s = tokio::task::spawn_blocking(move || baseline(jobs))
        .await
        .map_err(|e| AppError::Failed(e.to_string()))??;
    let sandbox_baseline_per_s = tokio::task::spawn_blocking(move || sandbox_baseline(jobs))
        .await
        .map_err(|e| AppError::Failed(e.to_string()))?;
    let (agent, sandboxed) = agent_run(jobs, slots).await?;
    let held = if hold_mib > 0 {
        // Written, so every page is really the agent's.
        let hold = vec![0x5au8; (hold_mib << 20) as usize];
        let (run, _) = agent_run(jobs, slots).await?;
        std::hint::black_box(&hold);
        Some(run)
    } else {
        None
    };
    Ok(SpawnReport {
        jobs,
        slots,
        baseline_per_s,
        sandbox_baseline_per_s,
        sandboxed,
        agent,
        held,
        held_mib: hold_mib,
    })
}

/// One agent run over `jobs` jobs; also whether they were sandboxed.
async fn agent_run(jobs: u32, slots: usize) -> Result<(AgentRun, bool), AppError> {
    let tmp = tempfile::tempdir().map_err(|e| AppError::Failed(format!("temp dir: {e}")))?;
    let layout = DevLayout::new(tmp.path())?;
    layout.ensure_keys()?;
    let env = vec![("BATCHLY_JOBS_MAX_CONCURRENT".to_string(), slots.to_string())];
    let config = Config::load(ConfigFile::None, &env, &layout.mode_defaults())
        .map_err(|e| AppError::Usage(e.to_string()))?;
    let sandboxed =
        config.sandbox.mode == crate::config::SandboxMode::Full && nix::unistd::geteuid().is_root();
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
                // While jobs run claimed/ holds one or two messages and
                // queue/ the rest: looking at claimed/ first keeps this
                // poll from listing a directory of thousands every time.
                if !dir_is_empty(&root.join("claimed")) {
                    continue;
                }
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
    Ok((
        AgentRun {
            per_s: f64::from(jobs) / elapsed.as_secs_f64(),
            cpu_per_job: cpu / jobs.max(1),
            succeeded,
        },
        sandboxed,
    ))
}
