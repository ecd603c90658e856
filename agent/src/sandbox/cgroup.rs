//! A cgroup per job: its limits (memory, pids, CPU quota), how it is killed
//! as a whole, whether the OOM killer struck, and what it used. Two
//! backends behind one type:
//!
//! - **v2** (the unified hierarchy, production under systemd): jobs live
//!   in `jobs` under the agent's own cgroup (its unit's, with
//!   `Delegate=yes`). Controllers cannot be enabled on a cgroup that still
//!   holds processes, so the agent first moves itself into a leaf of its
//!   own (`agent`), then enables memory, pids and cpu for `jobs` and its
//!   children. A job is killed with `cgroup.kill`; `memory.events` counts
//!   OOM kills.
//! - **v1** (one hierarchy per controller): a `batchly` dir under the
//!   agent's own cgroup in the memory, pids, cpu, cpuacct and freezer
//!   hierarchies, and in the controller-less unified hierarchy when one is
//!   mounted. A job is killed by freezing it, SIGKILL to every task, then
//!   thawing; `memory.oom_control` counts OOM kills.
//!
//! Either way every job is below one cgroup of the unified hierarchy that
//! holds no agent process ([`Hierarchy::egress_parent`]): the programs that
//! keep jobs from the instance metadata are attached there (`egress.rs`).
//!
//! Every root is a parameter, so the file-level logic of both backends is
//! unit-tested on a temporary directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Prefix of every job cgroup's name, before the agent's scope (see
/// [`job_name`]).
pub const JOB_PREFIX: &str = "job-";

/// The name of a job's cgroup: the agent's `scope` (one per state dir, so
/// two agents on one host never take each other's jobs for leftovers), the
/// slot and the launcher's pid.
pub fn job_name(scope: &str, slot: usize, pid: i32) -> String {
    format!("{JOB_PREFIX}{scope}-{slot}-{pid}")
}

/// The scope of the agent whose state dir is `state_dir`: stable across
/// its restarts, distinct between agents (a state dir is locked by one).
pub fn scope_of(state_dir: &Path) -> String {
    use sha2::Digest;
    let path = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// CPU quota period (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// Longest the removal of a killed job's cgroup waits for its processes
/// to leave.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

/// Where job cgroups live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    V2 {
        /// The agent's cgroup; jobs are in its `jobs` child.
        base: PathBuf,
    },
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
        cpuacct: PathBuf,
        freezer: PathBuf,
        /// In the controller-less unified hierarchy, when mounted.
        unified: Option<PathBuf>,
    },
}

/// The child of a v2 agent cgroup that holds its jobs.
fn v2_jobs(base: &Path) -> PathBuf {
    base.join("jobs")
}

/// A job's limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub vcpus: Option<f64>,
}

/// What a job used, when the kernel tells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu: Option<Duration>,
    pub memory_peak_bytes: Option<u64>,
}

/// One job's cgroup (a dir per hierarchy on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCgroup {
    hierarchy: Hierarchy,
    name: String,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn read(path: &Path) -> io::Result<String> {
    fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

/// The value of `key` in a flat-keyed file (`memory.events`, `cpu.stat`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl Hierarchy {
    /// Finds this host's cgroups from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`: v2 when the unified hierarchy has the memory
    /// and pids controllers, else v1 with memory, pids, cpu, cpuacct and
    /// freezer mounted. The jobs' parent is named after the agent's own
    /// cgroup, so outer limits (a container's, a unit's) still hold.
    pub fn detect() -> Result<Hierarchy, String> {
        let mountinfo = read(Path::new("/proc/self/mountinfo")).map_err(|e| e.to_string())?;
        let membership = read(Path::new("/proc/self/cgroup")).map_err(|e| e.to_string())?;
        Hierarchy::from_tables(&mountinfo, &membership, |p| fs::read_to_string(p).ok())
    }

    /// `detect` on given tables; `read` reads a file (the v2 root's
    /// `cgroup.controllers`).
    pub fn from_tables(
        mountinfo: &str,
        membership: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Result<Hierarchy, String> {
        let mut v2: Option<PathBuf> = None;
        let mut v1: Vec<(String, PathBuf)> = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4).map(PathBuf::from);
            let mut right = right.split_whitespace();
            let (fstype, options) = (right.next(), right.nth(1));
            match (fstype, mount_point) {
                (Some("cgroup2"), Some(mp)) => v2 = v2.or(Some(mp)),
                (Some("cgroup"), Some(mp)) => {
                    for opt in options.unwrap_or("").split(',') {
                        v1.push((opt.to_string(), mp.clone()));
                    }
                }
                _ => {}
            }
        }
        let own = |controller: &str| -> Option<String> {
            membership.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
                let matches = if controller.is_empty() {
                    list.is_empty()
                } else {
                    list.split(',').any(|c| c == controller)
                };
                matches.then(|| path.trim_start_matches('/').to_string())
            })
        };
        if let Some(root) = &v2 {
            let controllers = read(&root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") {
                // In the root cgroup (no systemd unit, a container's own
                // namespace) the agent never moves the host's processes:
                // its jobs get a `batchly` cgroup of their own instead.
                // An agent already in its `agent` leaf (moved there by
                // itself before a restart, or by another agent sharing the
                // cgroup) has the leaf's parent as the jobs' parent.
                let own_path = own("").unwrap_or_default();
                let own_path = own_path
                    .strip_suffix("/agent")
                    .or(if own_path == "agent" { Some("") } else { None })
                    .unwrap_or(&own_path)
                    .to_string();
                let base = if own_path.is_empty() {
                    root.join("batchly")
                } else {
                    root.join(own_path)
                };
                return Ok(Hierarchy::V2 { base });
            }
        }
        let mount = |controller: &str| -> Result<PathBuf, String> {
            let mp = v1
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, mp)| mp.clone())
                .ok_or_else(|| format!("no cgroup v1 {controller} hierarchy is mounted"))?;
            Ok(mp.join(own(controller).unwrap_or_default()).join("batchly"))
        };
        let v1 = (|| {
            Ok::<_, String>(Hierarchy::V1 {
                memory: mount("memory")?,
                pids: mount("pids")?,
                cpu: mount("cpu")?,
                cpuacct: mount("cpuacct")?,
                freezer: mount("freezer")?,
                unified: v2
                    .as_ref()
                    .map(|root| root.join(own("").unwrap_or_default()).join("batchly")),
            })
        })();
        v1.map_err(|why| {
            format!(
                "no usable cgroups: the unified hierarchy{} lacks the memory and pids controllers, and {why}",
                v2.map(|p| format!(" at {}", p.display())).unwrap_or_default()
            )
        })
    }

    /// The parents of job cgroups, one per hierarchy.
    fn dirs(&self) -> Vec<PathBuf> {
        match self {
            Hierarchy::V2 { base } => vec![v2_jobs(base)],
            Hierarchy::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
                freezer,
                unified,
            } => [memory, pids, cpu, cpuacct, freezer]
                .into_iter()
                .chain(unified)
                .cloned()
                .collect(),
        }
    }

    /// The cgroup of the unified hierarchy every job is below and no agent
    /// process is in; `None` on a v1 host without a unified hierarchy.
    pub fn egress_parent(&self) -> Option<PathBuf> {
        match self {
            Hierarchy::V2 { base } => Some(v2_jobs(base)),
            Hierarchy::V1 { unified, .. } => unified.clone(),
        }
    }

    /// Makes the jobs' parent ready. On v2 the agent moves itself (`pid`)
    /// into the `agent` leaf when its cgroup holds processes, then enables
    /// the controllers for the jobs.
    pub fn prepare(&self, pid: u32) -> io::Result<()> {
        match self {
            Hierarchy::V2 { base } => {
                if !base.exists() {
                    // Our own `batchly` cgroup under the root: the root's
                    // children get the controllers first.
                    fs::create_dir_all(base)?;
                    if let Some(parent) = base.parent() {
                        write(&parent.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
                    }
                }
                let procs = read(&base.join("cgroup.procs"))?;
                if !procs.trim().is_empty() {
                    let leaf = base.join("agent");
                    fs::create_dir_all(&leaf)?;
                    for member in procs.split_whitespace() {
                        // Every process of the agent's cgroup (the agent, its
                        // fork server) moves; one that just exited is fine.
                        let _ = write(&leaf.join("cgroup.procs"), member);
                    }
                    write(&leaf.join("cgroup.procs"), &pid.to_string())?;
                }
                // cpu only where the host has it (a job asking for vcpus
                // there is refused: its cpu.max cannot be written).
                let available = read(&base.join("cgroup.controllers")).unwrap_or_default();
                let wanted: Vec<String> = ["memory", "pids", "cpu"]
                    .iter()
                    .filter(|c| **c != "cpu" || available.split_whitespace().any(|a| a == "cpu"))
                    .map(|c| format!("+{c}"))
                    .collect();
                let wanted = wanted.join(" ");
                write(&base.join("cgroup.subtree_control"), &wanted)?;
                let jobs = v2_jobs(base);
                fs::create_dir_all(&jobs)?;
                write(&jobs.join("cgroup.subtree_control"), &wanted)
            }
            Hierarchy::V1 { .. } => {
                for dir in self.dirs() {
                    fs::create_dir_all(dir)?;
                }
                Ok(())
            }
        }
    }

    /// Creates job cgroup `name` with `limits`. On failure what was made is
    /// removed again.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<JobCgroup> {
        let cg = JobCgroup {
            hierarchy: self.clone(),
            name: name.to_string(),
        };
        let made = (|| {
            for dir in cg.dirs() {
                fs::create_dir(&dir)?;
            }
            cg.apply(limits)
        })();
        if let Err(e) = made {
            let _ = cg.remove_dirs();
            return Err(e);
        }
        Ok(cg)
    }

    /// Job cgroups a previous run of the agent of `scope` left behind.
    pub fn leftovers(&self, scope: &str) -> Vec<JobCgroup> {
        let prefix = format!("{JOB_PREFIX}{scope}-");
        let mut names: Vec<String> = Vec::new();
        for dir in self.dirs() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(&prefix) && entry.path().is_dir() && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|name| JobCgroup {
                hierarchy: self.clone(),
                name,
            })
            .collect()
    }

    /// The cgroup `name` (to kill what a ledger entry names).
    pub fn job(&self, name: &str) -> JobCgroup {
        JobCgroup {
            hierarchy: self.clone(),
            name: name.to_string(),
        }
    }
}

impl JobCgroup {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.hierarchy
            .dirs()
            .into_iter()
            .map(|d| d.join(&self.name))
            .collect()
    }

    fn apply(&self, limits: &Limits) -> io::Result<()> {
        let quota = limits
            .vcpus
            .map(|v| ((v * CPU_PERIOD_US as f64).round() as u64).max(1_000));
        match &self.hierarchy {
            Hierarchy::V2 { base } => {
                let dir = v2_jobs(base).join(&self.name);
                if let Some(bytes) = limits.memory_bytes {
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                    // Swap would let a job past its limit, slowly.
                    if dir.join("memory.swap.max").exists() {
                        write(&dir.join("memory.swap.max"), "0")?;
                    }
                }
                if let Some(pids) = limits.pids {
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
                if let Some(quota) = quota {
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
            }
            Hierarchy::V1 {
                memory, pids, cpu, ..
            } => {
                if let Some(bytes) = limits.memory_bytes {
                    let dir = memory.join(&self.name);
                    write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        write(&dir.join("memory.memsw.limit_in_bytes"), &bytes.to_string())?;
                    }
                }
                if let Some(n) = limits.pids {
                    write(&pids.join(&self.name).join("pids.max"), &n.to_string())?;
                }
                if let Some(quota) = quota {
                    let dir = cpu.join(&self.name);
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` file of each of the job's dirs.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Moves process `pid` (the job's init, before it forks the job) in.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        for file in self.procs_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// Pids of the processes in the job's cgroup.
    fn members(&self) -> Vec<i32> {
        let dir = match &self.hierarchy {
            Hierarchy::V2 { base } => v2_jobs(base).join(&self.name),
            Hierarchy::V1 { freezer, .. } => freezer.join(&self.name),
        };
        read(&dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// SIGKILL to every process in the cgroup, none able to fork away in
    /// between.
    pub fn kill(&self) -> io::Result<()> {
        match &self.hierarchy {
            Hierarchy::V2 { base } => {
                let dir = v2_jobs(base).join(&self.name);
                let kill_file = dir.join("cgroup.kill");
                if kill_file.exists() {
                    return write(&kill_file, "1");
                }
                // Before Linux 5.14: freeze, kill each, thaw.
                write(&dir.join("cgroup.freeze"), "1")?;
                for pid in self.members() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                write(&dir.join("cgroup.freeze"), "0")
            }
            Hierarchy::V1 { freezer, .. } => {
                let state = freezer.join(&self.name).join("freezer.state");
                write(&state, "FROZEN")?;
                for pid in self.members() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                write(&state, "THAWED")
            }
        }
    }

    /// How many processes of the job the OOM killer ended.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match &self.hierarchy {
            Hierarchy::V2 { base } => (
                v2_jobs(base).join(&self.name).join("memory.events"),
                "oom_kill",
            ),
            Hierarchy::V1 { memory, .. } => (
                memory.join(&self.name).join("memory.oom_control"),
                "oom_kill",
            ),
        };
        read(&file).ok().and_then(|t| keyed(&t, key)).unwrap_or(0)
    }

    /// CPU time and peak memory of the job so far.
    pub fn usage(&self) -> Usage {
        match &self.hierarchy {
            Hierarchy::V2 { base } => {
                let dir = v2_jobs(base).join(&self.name);
                Usage {
                    cpu: read(&dir.join("cpu.stat"))
                        .ok()
                        .and_then(|t| keyed(&t, "usage_usec"))
                        .map(Duration::from_micros),
                    memory_peak_bytes: read(&dir.join("memory.peak"))
                        .ok()
                        .and_then(|t| t.trim().parse().ok()),
                }
            }
            Hierarchy::V1 {
                memory, cpuacct, ..
            } => Usage {
                cpu: read(&cpuacct.join(&self.name).join("cpuacct.usage"))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .map(Duration::from_nanos),
                memory_peak_bytes: read(&memory.join(&self.name).join("memory.max_usage_in_bytes"))
                    .ok()
                    .and_then(|t| t.trim().parse().ok()),
            },
        }
    }

    /// Kills what is left and removes the cgroup, waiting (bounded) for
    /// its processes to be gone. A cgroup already gone is not an error.
    pub fn remove(&self) -> io::Result<()> {
        if self.dirs().iter().all(|d| !d.exists()) {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + REMOVE_WAIT;
        loop {
            // Again on every turn: a process that forked while the first
            // kill went round (a v1 freeze is not instant) goes too.
            if !self.members().is_empty() {
                self.kill()?;
            }
            match self.remove_dirs() {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn remove_dirs(&self) -> io::Result<()> {
        for dir in self.dirs() {
            match fs::remove_dir(&dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // A plain directory (the unit tests' stand-in for a
                // cgroup) holds its control files.
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => fs::remove_dir_all(&dir)?,
                other => other.map_err(|e| {
                    io::Error::new(e.kind(), format!("removing {}: {e}", dir.display()))
                })?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "8:pids:/\n6:freezer:/\n4:memory:/box/7\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn a_v1_host_with_a_controller_less_unified_hierarchy_uses_v1_under_the_agents_own_groups() {
        let h = Hierarchy::from_tables(MOUNTINFO_V1, CGROUP_V1, |_| Some(String::new()))
            .expect("v1 is usable");
        assert_eq!(
            h,
            Hierarchy::V1 {
                memory: "/sys/fs/cgroup/memory/box/7/batchly".into(),
                pids: "/sys/fs/cgroup/pids/batchly".into(),
                cpu: "/sys/fs/cgroup/cpu/batchly".into(),
                cpuacct: "/sys/fs/cgroup/cpuacct/batchly".into(),
                freezer: "/sys/fs/cgroup/freezer/batchly".into(),
                unified: Some("/sys/fs/cgroup/unified/batchly".into()),
            }
        );
        assert_eq!(
            h.egress_parent(),
            Some("/sys/fs/cgroup/unified/batchly".into()),
            "jobs are below a unified cgroup of their own"
        );
    }

    #[test]
    fn a_unified_hierarchy_with_controllers_is_used_from_the_agents_own_cgroup() {
        let mountinfo = "25 21 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let membership = "0::/system.slice/batchly-agent.service\n";
        let h = Hierarchy::from_tables(mountinfo, membership, |p| {
            (p == Path::new("/sys/fs/cgroup/cgroup.controllers"))
                .then(|| "cpuset cpu io memory pids\n".to_string())
        })
        .expect("v2 is usable");
        assert_eq!(
            h,
            Hierarchy::V2 {
                base: "/sys/fs/cgroup/system.slice/batchly-agent.service".into()
            }
        );
    }

    #[test]
    fn an_agent_already_in_its_leaf_keeps_the_leafs_parent_as_the_jobs_parent() {
        let mountinfo = "25 21 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let h = Hierarchy::from_tables(
            mountinfo,
            "0::/system.slice/batchly-agent.service/agent\n",
            |_| Some("memory pids cpu".into()),
        )
        .expect("v2 is usable");
        assert_eq!(
            h,
            Hierarchy::V2 {
                base: "/sys/fs/cgroup/system.slice/batchly-agent.service".into()
            }
        );
    }

    #[test]
    fn an_agent_in_the_root_cgroup_puts_its_jobs_in_a_cgroup_of_their_own() {
        let mountinfo = "25 21 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let h = Hierarchy::from_tables(mountinfo, "0::/\n", |_| Some("memory pids cpu".into()))
            .expect("v2 is usable");
        assert_eq!(
            h,
            Hierarchy::V2 {
                base: "/sys/fs/cgroup/batchly".into()
            }
        );
    }

    #[test]
    fn no_usable_hierarchy_is_an_error_saying_what_is_missing() {
        let err = Hierarchy::from_tables(
            "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
            "0::/\n",
            |_| Some(String::new()),
        )
        .expect_err("nothing usable");
        assert!(
            err.contains("memory and pids") && err.contains("no cgroup v1 memory"),
            "{err}"
        );
    }

    fn v1_in(root: &Path) -> Hierarchy {
        let h = Hierarchy::V1 {
            memory: root.join("memory/batchly"),
            pids: root.join("pids/batchly"),
            cpu: root.join("cpu/batchly"),
            cpuacct: root.join("cpuacct/batchly"),
            freezer: root.join("freezer/batchly"),
            unified: Some(root.join("unified/batchly")),
        };
        h.prepare(1).expect("prepare");
        h
    }

    #[test]
    fn v1_limits_go_to_each_controllers_files_and_the_cgroup_is_removed_with_them() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let h = v1_in(tmp.path());
        let limits = Limits {
            memory_bytes: Some(256 << 20),
            pids: Some(64),
            vcpus: Some(1.5),
        };
        let cg = h.create("job-s1-0-a", &limits).expect("create");
        h.create("job-s2-0-a", &limits)
            .expect("another agent's job");
        let at = |p: &str| fs::read_to_string(tmp.path().join(p)).expect(p);
        assert_eq!(
            at("memory/batchly/job-s1-0-a/memory.limit_in_bytes"),
            "268435456"
        );
        assert_eq!(at("pids/batchly/job-s1-0-a/pids.max"), "64");
        assert_eq!(at("cpu/batchly/job-s1-0-a/cpu.cfs_quota_us"), "150000");
        assert_eq!(at("cpu/batchly/job-s1-0-a/cpu.cfs_period_us"), "100000");
        assert!(
            tmp.path().join("unified/batchly/job-s1-0-a").is_dir(),
            "the job has a unified cgroup, below the egress programs"
        );
        assert_eq!(
            h.leftovers("s1"),
            vec![cg.clone()],
            "only this agent's jobs"
        );
        fs::write(
            tmp.path()
                .join("memory/batchly/job-s1-0-a/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .expect("oom_control");
        assert_eq!(cg.oom_kills(), 2);
        fs::write(
            tmp.path().join("cpuacct/batchly/job-s1-0-a/cpuacct.usage"),
            "1500000000\n",
        )
        .expect("usage");
        assert_eq!(cg.usage().cpu, Some(Duration::from_millis(1500)));
        cg.remove().expect("remove");
        assert!(h.leftovers("s1").is_empty());
        assert_eq!(h.leftovers("s2").len(), 1);
    }

    #[test]
    fn v2_limits_kill_and_oom_count_use_the_unified_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().join("agent.service");
        fs::create_dir_all(&base).expect("base");
        fs::write(base.join("cgroup.procs"), "").expect("procs");
        fs::write(
            base.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("controllers");
        let h = Hierarchy::V2 { base: base.clone() };
        h.prepare(42).expect("prepare");
        for parent in [base.clone(), base.join("jobs")] {
            assert_eq!(
                fs::read_to_string(parent.join("cgroup.subtree_control")).expect("subtree"),
                "+memory +pids +cpu",
                "{}",
                parent.display()
            );
        }
        assert_eq!(h.egress_parent(), Some(base.join("jobs")));
        let cg = h
            .create(
                "job-1-b",
                &Limits {
                    memory_bytes: Some(1 << 30),
                    pids: None,
                    vcpus: Some(0.5),
                },
            )
            .expect("create");
        let dir = base.join("jobs/job-1-b");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).expect("max"),
            "1073741824"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).expect("cpu"),
            "50000 100000"
        );
        assert!(!dir.join("pids.max").exists(), "no pids limit asked for");
        fs::write(dir.join("cgroup.kill"), "").expect("kill file");
        cg.kill().expect("kill");
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.kill")).expect("kill"),
            "1"
        );
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .expect("events");
        assert_eq!(cg.oom_kills(), 1);
    }

    #[test]
    fn on_v2_an_agent_sharing_its_cgroup_moves_into_a_leaf_before_enabling_controllers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().join("agent.service");
        fs::create_dir_all(&base).expect("base");
        fs::write(base.join("cgroup.procs"), "42\n43\n").expect("procs");
        Hierarchy::V2 { base: base.clone() }
            .prepare(42)
            .expect("prepare");
        // A plain file keeps the last write: the agent's own pid went last.
        assert_eq!(
            fs::read_to_string(base.join("agent/cgroup.procs")).expect("leaf"),
            "42"
        );
    }
}
