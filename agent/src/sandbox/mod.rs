//! Everything that stands between a job and the host. It owns the launch
//! path: the agent never forks its multi-threaded runtime to run job code;
//! it spawns a fresh copy of its own binary once (`__launch`, the fork
//! server), which forks a single-threaded launcher for each job.
//!
//! With `sandbox.mode = "full"` the launcher is forked into fresh mount,
//! pid, ipc, uts and network namespaces and becomes the job's init (pid 1
//! of its namespace): it builds the job's view of the file system (the host
//! read-only, the agent's own files hidden, a private work dir, /tmp, /dev
//! and /proc), then forks the job, which drops to its slot's uid with no
//! capabilities and `no_new_privs`, applies Landlock and seccomp and execs.
//! The init reaps, reports the job's exit status and exits with it, which
//! kills whatever the job left in its namespace. The steps are in
//! `launcher.rs` (order), `init.rs`, `mounts.rs`, `identity.rs`,
//! `syscalls.rs` (with `bpf.rs`) and `lsm.rs`. If a step cannot be applied the job is
//! refused (fail closed); it never runs with less protection.
//!
//! `dev` run by an ordinary user builds the same sandbox inside a user
//! namespace of the launcher's own ([`Privilege::UserNamespace`],
//! `userns.rs`): the user's uid and gid map to themselves, the init has the
//! namespace's capabilities to build the view, and the job drops them all.
//! What only root can give (a uid per slot, cgroups, device nodes of its
//! own) is off in that mode alone, and the agent says so at start.
//!
//! With `sandbox.mode = "none"` the launcher applies only its own session,
//! the work dir, the scrubbed environment and default signals, then execs.
//!
//! This is the only module allowed to contain `unsafe`.

pub mod baseline;
mod bpf;
pub mod cgroup;
pub mod egress;
pub mod forkserver;
mod identity;
mod init;
pub mod launcher;
mod lsm;
mod mounts;
pub mod process;
mod steps;
mod syscalls;
pub mod userns;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Hidden subcommand under which the agent binary acts as the fork server.
pub const LAUNCHER_ARG: &str = "__launch";

/// Everything the launcher needs to start one job attempt. Sent to the
/// launcher over its stdin socket as JSON, so it never travels through the
/// environment or the command line (both visible in `ps`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchPlan {
    /// argv of the job; `argv[0]` is resolved against the job's `PATH` when it
    /// has no slash.
    pub argv: Vec<String>,
    /// The complete environment of the job (already scrubbed by the agent).
    pub env: Vec<(String, String)>,
    /// The job's private work directory; it becomes the job's cwd.
    pub work_dir: PathBuf,
    /// How the job is isolated; `None` with `sandbox.mode = "none"`.
    pub isolation: Option<Isolation>,
}

/// The isolation inputs of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// The slot's uid and gid (never 0, never the agent's).
    pub uid: u32,
    pub gid: u32,
    /// The job's hostname in its own uts namespace.
    pub hostname: String,
    /// Host paths the job must not see (files and directories): the
    /// agent's state, keys, config, admin socket, logs and the other jobs'
    /// work dirs. The job's own work dir is put back into place.
    pub hidden: Vec<PathBuf>,
    /// Host directories the job may write, at the same path
    /// (`sandbox.bind_paths`).
    pub writable: Vec<PathBuf>,
    /// Host directories the job may read, at the same path, where its view
    /// is otherwise fresh (`sandbox.readonly_paths`, systemd-resolved's).
    pub readable: Vec<PathBuf>,
    /// `network: "egress"`: the job shares the agent's network namespace
    /// (the instance metadata blocked for it, see `egress.rs`); otherwise
    /// it gets a fresh one with only loopback.
    pub egress: bool,
    /// Who builds the sandbox.
    pub privilege: Privilege,
    /// The largest file the job may write (`sandbox.max_file_size`).
    pub max_file_bytes: Option<u64>,
}

impl Isolation {
    /// The namespaces the fork server creates for the launcher (`clone` flags).
    pub fn namespaces(&self) -> Namespaces {
        let net = if self.egress { 0 } else { libc::CLONE_NEWNET };
        let user = match self.privilege {
            Privilege::Root => 0,
            Privilege::UserNamespace => libc::CLONE_NEWUSER,
        };
        Namespaces(
            (libc::CLONE_NEWNS
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | net
                | user) as u32,
        )
    }
}

/// Who builds a job's sandbox, which decides what it can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Privilege {
    /// The agent is root: every protection, a uid per slot, cgroups.
    Root,
    /// An ordinary user's `dev`: the launcher is forked into a user
    /// namespace of its own as well, where the user's uid and gid map to
    /// themselves; jobs run as the user, without cgroups (`userns.rs`).
    UserNamespace,
}

/// What the agent isolates every job with (`sandbox.mode = "full"`).
#[derive(Debug, Clone)]
pub struct SandboxPolicy {
    pub privilege: Privilege,
    /// The slots' uids; with [`Privilege::UserNamespace`] every job is the
    /// agent's own uid instead.
    pub uid_range: crate::config::UidRange,
    /// Host paths no job may see (see [`Isolation::hidden`]).
    pub hidden: Vec<PathBuf>,
    /// See [`Isolation::writable`].
    pub writable: Vec<PathBuf>,
    /// See [`Isolation::readable`].
    pub readable: Vec<PathBuf>,
    /// systemd-resolved's directory, shown read-only to egress jobs only.
    pub resolver: Option<PathBuf>,
    /// See [`Isolation::max_file_bytes`].
    pub max_file_bytes: Option<u64>,
    /// Where job cgroups are made (`None`: jobs have no cgroups, as with
    /// [`Privilege::UserNamespace`]), and this agent's part of it.
    pub cgroups: Option<cgroup::Hierarchy>,
    pub cgroup_scope: String,
    /// Limits of a job whose spec gives none.
    pub default_pids: Option<u64>,
    pub default_memory_mib: Option<u64>,
    /// What keeps egress jobs from the instance metadata; set up once the
    /// cgroups are ready (`None` before).
    pub metadata: Option<std::sync::Arc<egress::MetadataBlock>>,
}

impl SandboxPolicy {
    /// The isolation of a job in job slot `slot`; `None` when the uid range
    /// has no uid for it (never the case for a checked config).
    pub fn isolation(&self, slot: usize, job_id: &str, egress: bool) -> Option<Isolation> {
        let (uid, gid) = match self.privilege {
            Privilege::Root => {
                let uid = self.uid_range.for_slot(slot)?;
                (uid, uid)
            }
            Privilege::UserNamespace => (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        };
        Some(Isolation {
            uid,
            gid,
            hostname: hostname_for(job_id),
            hidden: self.hidden.clone(),
            writable: self.writable.clone(),
            readable: self
                .readable
                .iter()
                .chain(self.resolver.as_ref().filter(|_| egress))
                .cloned()
                .collect(),
            egress,
            privilege: self.privilege,
            max_file_bytes: self.max_file_bytes,
        })
    }

    /// Ready to run an egress job, or why not (see `egress.rs`).
    pub async fn egress_ready(&self) -> Result<(), String> {
        match (&self.metadata, self.privilege) {
            (Some(block), _) => block.ready().await,
            (None, Privilege::UserNamespace) => Err(
                "the job asks for network \"egress\", and an ordinary user's `dev` cannot \
                 block the instance metadata from it: egress jobs need the agent to run as root"
                    .to_string(),
            ),
            (None, Privilege::Root) => Err("the instance metadata block is not set up".to_string()),
        }
    }
}

impl SandboxPolicy {
    /// A job's limits: its spec's `resources`, else the defaults.
    pub fn limits(&self, resources: &crate::envelope::Resources) -> cgroup::Limits {
        cgroup::Limits {
            memory_bytes: resources
                .memory_mib
                .or(self.default_memory_mib)
                .map(|mib| mib << 20),
            pids: resources.pids.or(self.default_pids),
            vcpus: resources.vcpus,
        }
    }
}

/// Gives `dir` and everything in it to `uid`/`gid`, never following a
/// symlink (the job's own dir, after the agent put its inputs there).
pub fn give_tree(dir: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            give_tree(&path, uid, gid)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// `clone` flags of the namespaces a launcher starts in; empty for none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Namespaces(pub u32);

impl Namespaces {
    /// Every flag the fork server accepts.
    pub const ALLOWED: u32 = (libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWUSER) as u32;
}

/// A hostname made of a job id: letters, digits, `-` and `.`, at most 63
/// bytes (one DNS label's length, well within the kernel's 64).
pub fn hostname_for(job_id: &str) -> String {
    let name: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    if name.is_empty() {
        "job".to_string()
    } else {
        name
    }
}

/// The Landlock ABI this kernel enforces, if any.
pub fn landlock_abi() -> Option<i64> {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the
    // kernel's ABI version (or -1); nothing is passed or created.
    let abi = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, 0usize, 0usize, 1u32) };
    (abi > 0).then_some(abi)
}

/// What this host offers the sandbox of an agent run by the current user,
/// one line per protection, for `check-config`: `(what, Ok(how) | Err(why
/// not))`. As an ordinary user that is what `dev` can give (the user
/// namespace probe runs `program`, the agent's binary).
pub fn host_support(program: &std::path::Path) -> Vec<(&'static str, Result<String, String>)> {
    let root = nix::unistd::geteuid().is_root();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let version: Vec<u32> = kernel
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    let at_least = |major: u32, minor: u32| version.as_slice() >= [major, minor].as_slice();
    let kernel_check = |major: u32, minor: u32, what: &str| {
        if at_least(major, minor) {
            Ok(format!("Linux {kernel}"))
        } else {
            Err(format!(
                "Linux {kernel} is older than {major}.{minor}, which {what} needs"
            ))
        }
    };
    let landlock = landlock_abi()
        .map(|abi| format!("ABI {abi}"))
        .ok_or_else(|| {
            "not enabled in this kernel (the other protections still apply)".to_string()
        });
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .ok()
        .filter(|s| s.contains("\nSeccomp:"))
        .map(|_| "filters".to_string())
        .ok_or_else(|| "this kernel has no seccomp".to_string());
    let user_namespaces = if root {
        Ok("not needed: root gets the full sandbox".to_string())
    } else {
        userns::probe(program)
            .map(|()| {
                "`dev` gives jobs user, mount, pid, network, ipc and uts namespaces of \
                 their own"
                    .to_string()
            })
            .map_err(|why| format!("{why}: `dev` runs jobs WITHOUT the sandbox"))
    };
    let hierarchy = cgroup::Hierarchy::detect();
    let cgroups = hierarchy.clone().map(|h| match h {
        cgroup::Hierarchy::V2 { base } => format!("v2, jobs under {}", base.display()),
        cgroup::Hierarchy::V1 { memory, .. } => {
            format!(
                "v1, jobs under {} (and the other controllers)",
                memory.display()
            )
        }
    });
    let cgroups = match cgroups {
        Ok(how) if !root => Err(format!(
            "not root: `dev` gives jobs no cgroup limits (this host has cgroups {how})"
        )),
        other => other,
    };
    vec![
        (
            "root",
            if root {
                Ok("yes".to_string())
            } else {
                Err(
                    "not root: `run` refuses sandbox.mode = \"full\"; `dev` runs every job \
                     as your uid, in a user namespace if this host allows it (below)"
                        .to_string(),
                )
            },
        ),
        ("user namespaces", user_namespaces),
        (
            "namespaces and read-only mounts",
            kernel_check(5, 12, "mount_setattr"),
        ),
        ("pidfd and close_range", kernel_check(5, 11, "close_range")),
        (
            "instance metadata blocked for egress jobs",
            egress::host_support(hierarchy.as_ref().ok()),
        ),
        ("cgroups", cgroups),
        ("seccomp", seccomp),
        ("landlock", landlock),
    ]
}

/// Tests: runs `check` in a forked child (for what lasts a process's life:
/// a seccomp filter, a user namespace) and asserts it exits 0; a non-zero
/// code says which check failed.
#[cfg(test)]
pub(crate) fn in_forked_child(check: impl FnOnce() -> i32) {
    // SAFETY: the child runs `check` (system calls, small files) and
    // leaves with _exit: it never returns into the test harness.
    match unsafe { libc::fork() } {
        0 => {
            let code = check();
            // SAFETY: leave the forked test process at once.
            unsafe { libc::_exit(code) }
        }
        -1 => panic!("fork failed"),
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(libc::WIFEXITED(status), "child died: {status}");
            assert_eq!(
                libc::WEXITSTATUS(status),
                0,
                "check that failed (see the codes in the test)"
            );
        }
    }
}

/// Where a job finds the time it must be done by: its timeout to begin
/// with, earlier when a drain shortens it (see [`write_deadline_file`]).
pub fn deadline_file(work_dir: &std::path::Path) -> PathBuf {
    work_dir.join(".batchly-deadline")
}

/// Writes the job's deadline `at` into its deadline file: an RFC 3339 UTC
/// line, then the same time in Unix seconds. The job owns its work dir, so
/// the file is never written through: a new file (never following a
/// link, never an existing name) is renamed over it, which replaces
/// whatever the job put there, a symlink included, without touching what
/// it points at.
pub fn write_deadline_file(
    work_dir: &std::path::Path,
    at: std::time::SystemTime,
) -> std::io::Result<()> {
    let target = deadline_file(work_dir);
    let temp = work_dir.join(format!(".batchly-deadline.{:016x}", rand::random::<u64>()));
    let written =
        write_new_file(&temp, &deadline_text(at)).and_then(|()| std::fs::rename(&temp, &target));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", target.display())))
}

/// The deadline file's first write, before the job starts: made in place
/// when nothing has its name yet (nobody can read it half written), else
/// as [`write_deadline_file`] (an input of that name is replaced).
pub fn create_deadline_file(
    work_dir: &std::path::Path,
    at: std::time::SystemTime,
) -> std::io::Result<()> {
    let target = deadline_file(work_dir);
    match write_new_file(&target, &deadline_text(at)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            write_deadline_file(work_dir, at)
        }
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("writing {}: {e}", target.display()),
        )),
    }
}

fn deadline_text(at: std::time::SystemTime) -> String {
    let unix = at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{}\n{unix}\n", crate::events::rfc3339(at))
}

/// Writes `text` into a file made at `path`, which must not exist (never
/// following a link there); a file made but not written is removed.
fn write_new_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.write_all(text.as_bytes()).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// The base environment every job starts from; nothing of the agent's own
/// environment (credentials, `AWS_*`, config overrides) is inherited.
pub fn scrubbed_env(
    work_dir: &std::path::Path,
    job_id: &str,
    attempt: u32,
    extra: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = std::collections::BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    );
    env.insert("HOME".to_string(), work_dir.display().to_string());
    env.insert("TMPDIR".to_string(), work_dir.display().to_string());
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    env.insert("BATCHLY_JOB_ID".to_string(), job_id.to_string());
    env.insert("BATCHLY_ATTEMPT".to_string(), attempt.to_string());
    env.insert(
        "BATCHLY_WORK_DIR".to_string(),
        work_dir.display().to_string(),
    );
    env.insert(
        "BATCHLY_DEADLINE_FILE".to_string(),
        deadline_file(work_dir).display().to_string(),
    );
    // The job's own signed `env` wins over the defaults above.
    for (k, v) in extra {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_host_report_names_every_protection_and_tells_root_truthfully() {
        let report = host_support(std::path::Path::new("/proc/self/exe"));
        let names: Vec<&str> = report.iter().map(|(what, _)| *what).collect();
        assert_eq!(
            names,
            [
                "root",
                "user namespaces",
                "namespaces and read-only mounts",
                "pidfd and close_range",
                "instance metadata blocked for egress jobs",
                "cgroups",
                "seccomp",
                "landlock"
            ]
        );
        assert_eq!(report[0].1.is_ok(), nix::unistd::geteuid().is_root());
    }

    fn isolation(privilege: Privilege) -> Isolation {
        Isolation {
            uid: 1000,
            gid: 1000,
            hostname: "job".into(),
            hidden: Vec::new(),
            writable: Vec::new(),
            readable: Vec::new(),
            egress: false,
            privilege,
            max_file_bytes: None,
        }
    }

    /// A policy of four slots, nothing hidden or shown, no cgroups.
    fn policy(privilege: Privilege) -> SandboxPolicy {
        SandboxPolicy {
            privilege,
            uid_range: crate::config::UidRange {
                first: 1_900_000_000,
                last: 1_900_000_003,
            },
            hidden: Vec::new(),
            writable: Vec::new(),
            readable: Vec::new(),
            resolver: None,
            max_file_bytes: None,
            cgroups: None,
            cgroup_scope: "test".into(),
            default_pids: None,
            default_memory_mib: None,
            metadata: None,
        }
    }

    #[test]
    fn only_an_egress_job_is_shown_the_hosts_resolver() {
        let policy = SandboxPolicy {
            readable: vec!["/opt/tools".into()],
            resolver: Some("/run/systemd/resolve".into()),
            ..policy(Privilege::Root)
        };
        let none = policy.isolation(0, "j", false).expect("slot 0");
        assert_eq!(none.readable, vec![PathBuf::from("/opt/tools")]);
        let egress = policy.isolation(0, "j", true).expect("slot 0");
        assert_eq!(
            egress.readable,
            vec![PathBuf::from("/opt/tools"), "/run/systemd/resolve".into()]
        );
    }

    #[test]
    fn an_egress_job_keeps_the_agents_network_namespace() {
        let net = libc::CLONE_NEWNET as u32;
        let none = isolation(Privilege::Root);
        let egress = Isolation {
            egress: true,
            ..none.clone()
        };
        assert_eq!(none.namespaces().0 & net, net);
        assert_eq!(egress.namespaces().0, none.namespaces().0 & !net);
    }

    #[test]
    fn only_an_ordinary_users_sandbox_asks_for_a_user_namespace() {
        let user = libc::CLONE_NEWUSER as u32;
        let root = isolation(Privilege::Root).namespaces().0;
        let unprivileged = isolation(Privilege::UserNamespace).namespaces().0;
        assert_eq!(root & user, 0);
        assert_eq!(unprivileged, root | user);
        assert_eq!(
            unprivileged & !Namespaces::ALLOWED,
            0,
            "the fork server accepts it"
        );
    }

    #[test]
    fn in_a_user_namespace_every_slot_is_the_agents_own_uid() {
        let policy = policy(Privilege::UserNamespace);
        let own = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        for slot in [0, 3, 7] {
            let iso = policy
                .isolation(slot, "j", false)
                .expect("every slot has one");
            assert_eq!((iso.uid, iso.gid), own);
            assert_eq!(iso.privilege, Privilege::UserNamespace);
        }
        let root = SandboxPolicy {
            privilege: Privilege::Root,
            ..policy
        };
        assert_eq!(
            root.isolation(3, "j", false).map(|i| i.uid),
            Some(1_900_000_003)
        );
        assert!(root.isolation(4, "j", false).is_none());
    }

    #[test]
    fn the_deadline_file_replaces_a_symlink_the_job_left_without_writing_through_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").expect("victim");
        let work = tmp.path().join("work");
        std::fs::create_dir(&work).expect("work");
        std::os::unix::fs::symlink(&victim, deadline_file(&work)).expect("the job's link");
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_205_600);
        write_deadline_file(&work, at).expect("written");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "precious"
        );
        assert_eq!(
            std::fs::read_to_string(deadline_file(&work)).expect("deadline"),
            "2026-12-02T10:00:00.000Z\n1796205600\n"
        );
        assert!(!std::fs::symlink_metadata(deadline_file(&work))
            .expect("meta")
            .file_type()
            .is_symlink());
        assert_eq!(
            std::fs::read_dir(&work).expect("dir").count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn the_first_deadline_is_made_in_place_and_an_input_of_its_name_is_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_205_600);
        let text = "2026-12-02T10:00:00.000Z\n1796205600\n";
        let fresh = tmp.path().join("fresh");
        std::fs::create_dir(&fresh).expect("fresh");
        create_deadline_file(&fresh, at).expect("written");
        assert_eq!(
            std::fs::read_to_string(deadline_file(&fresh)).expect("deadline"),
            text
        );
        assert_eq!(std::fs::read_dir(&fresh).expect("dir").count(), 1);

        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").expect("victim");
        let inputs = tmp.path().join("inputs");
        std::fs::create_dir(&inputs).expect("inputs");
        std::os::unix::fs::symlink(&victim, deadline_file(&inputs)).expect("an input's link");
        create_deadline_file(&inputs, at).expect("written");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "precious"
        );
        assert_eq!(
            std::fs::read_to_string(deadline_file(&inputs)).expect("deadline"),
            text
        );
        assert_eq!(
            std::fs::read_dir(&inputs).expect("dir").count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn a_hostname_is_a_clean_label_of_the_job_id() {
        assert_eq!(hostname_for("render-42"), "render-42");
        assert_eq!(hostname_for("a b/c_d"), "a-b-c-d");
        assert_eq!(hostname_for("__"), "job");
        assert_eq!(hostname_for(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn scrubbed_env_carries_nothing_from_the_agent_and_lets_the_spec_override() {
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "agent-secret");
        let mut extra = BTreeMap::new();
        extra.insert("PATH".to_string(), "/opt/bin".to_string());
        extra.insert("GREETING".to_string(), "hi".to_string());
        let env = scrubbed_env(std::path::Path::new("/w/j"), "j", 2, &extra);
        assert!(env.iter().all(|(k, _)| !k.starts_with("AWS_")));
        assert!(env.contains(&("PATH".to_string(), "/opt/bin".to_string())));
        assert!(env.contains(&("GREETING".to_string(), "hi".to_string())));
        assert!(env.contains(&("BATCHLY_ATTEMPT".to_string(), "2".to_string())));
        assert!(env.contains(&("HOME".to_string(), "/w/j".to_string())));
    }
}
