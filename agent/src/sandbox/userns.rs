//! The sandbox of an ordinary user's `dev` ([`Privilege::UserNamespace`]):
//! the fork server forks the launcher into a user namespace of its own
//! besides the mount, pid, ipc, uts and network ones, and the launcher's
//! first step maps the user's uid and gid to themselves there (a
//! single-id map, which an unprivileged process may write for itself once
//! `setgroups` is denied). The init then holds the namespace's full
//! capabilities, enough to build the job's view as root would; the job
//! keeps the user's one uid and drops every capability, so it is not root
//! even inside.
//!
//! Also owns the probe the agent runs at start (`__probe-userns`, a fresh
//! single-threaded copy of the binary) to learn whether this host allows
//! it, and the list of what this mode gives and what it cannot, with why.
//!
//! Nothing here may widen what a job can do: what the kernel refuses an
//! ordinary user is reported as off, never worked around.
//!
//! [`Privilege::UserNamespace`]: super::Privilege::UserNamespace

use std::io::Write;
use std::path::Path;

use nix::errno::Errno;

use super::mounts;
use super::steps::{Step, StepError};

/// Hidden subcommand under which the agent binary probes for user
/// namespaces.
pub const PROBE_ARG: &str = "__probe-userns";

/// What the probe prints when every step worked.
const PROBE_OK: &str = "ok";

/// The namespaces of a job in this mode, as `unshare` flags.
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET;

/// The one line of a map of `id` to itself.
fn own_id_map(id: u32) -> String {
    format!("{id} {id} 1\n")
}

/// Maps `uid` and `gid` (this process's own, outside) to themselves in the
/// user namespace this process was just forked into. Must come before any
/// step that makes a file or a mount, and while the process is dumpable
/// (the map files are its own only then).
pub fn map_own_ids(uid: u32, gid: u32) -> Result<(), StepError> {
    // An unprivileged process may map a gid only once setgroups is denied
    // for good in the namespace (or it could drop a group that denies it
    // access somewhere).
    write_proc(Path::new("/proc/self/setgroups"), "deny")?;
    write_proc(Path::new("/proc/self/uid_map"), &own_id_map(uid))?;
    write_proc(Path::new("/proc/self/gid_map"), &own_id_map(gid))?;
    let (now_uid, now_gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    if (now_uid, now_gid) != (uid, gid) {
        return Err(StepError::new(
            Step::UserNamespace,
            format!(
                "after mapping uid {uid} and gid {gid} to themselves this process is uid \
                 {now_uid}, gid {now_gid}"
            ),
        ));
    }
    Ok(())
}

/// One `write` of `text` to a /proc file (a map must be written at once).
fn write_proc(path: &Path, text: &str) -> Result<(), StepError> {
    let fail = |e: std::io::Error| {
        StepError::sys(
            Step::UserNamespace,
            format!("writing {:?} to", text.trim_end()),
            path,
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        )
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(fail)?;
    let written = file.write(text.as_bytes()).map_err(fail)?;
    if written != text.len() {
        return Err(StepError::new(
            Step::UserNamespace,
            format!("{} took {written} of {} bytes", path.display(), text.len()),
        ));
    }
    Ok(())
}

/// Entry point of `batchly-agent __probe-userns`: tries what an ordinary
/// user's sandbox needs first (the namespaces, the id maps, mounts there,
/// the read-only host, a /proc of the new pid namespace) on this process,
/// which nothing else uses and which exits right after. Prints `ok` or
/// the failed step as the launcher reports it. Never returns.
pub fn probe_main() -> ! {
    let line = match probe_here() {
        Ok(()) => PROBE_OK.to_string(),
        Err(e) => e.wire(),
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    std::process::exit(if line == PROBE_OK { 0 } else { 1 })
}

fn probe_here() -> Result<(), StepError> {
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    // SAFETY: unshare takes flags only; this process is single-threaded
    // (started just for the probe), as a new user namespace requires.
    if unsafe { libc::unshare(NAMESPACES) } != 0 {
        return Err(StepError::errno(
            Step::UserNamespace,
            "creating user, mount, pid, ipc, uts and network namespaces",
            Errno::last(),
        ));
    }
    map_own_ids(uid, gid)?;
    let root = Path::new("/");
    mounts::make_private(root)?;
    mounts::fresh_tmpfs(Path::new("/tmp"), true)?;
    mounts::read_only_host(root)?;
    // A /proc of the new pid namespace can be mounted only from inside it,
    // by its first process: a child.
    // SAFETY: this process is single-threaded, so the child is a
    // consistent copy; it mounts and leaves with _exit.
    match unsafe { libc::fork() } {
        -1 => Err(StepError::errno(
            Step::Fork,
            "forking the probe's pid 1",
            Errno::last(),
        )),
        0 => {
            let code = match mounts::own_proc() {
                Ok(()) => 0,
                Err(e) => e.errno.map_or(255, |e| e as i32),
            };
            // SAFETY: leaves the probe's child at once.
            unsafe { libc::_exit(code) }
        }
        child => {
            let mut status = 0;
            // SAFETY: waitpid writes one int into `status`.
            if unsafe { libc::waitpid(child, &mut status, 0) } != child {
                return Err(StepError::errno(
                    Step::Fork,
                    "waiting for the probe's pid 1",
                    Errno::last(),
                ));
            }
            match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                (true, 0) => Ok(()),
                (true, errno) => Err(StepError::sys(
                    Step::Mounts,
                    "mounting a /proc of the job's pid namespace on",
                    Path::new("/proc"),
                    Errno::from_raw(errno),
                )),
                _ => Err(StepError::new(
                    Step::Mounts,
                    format!("the probe's pid 1 died (wait status {status:#x})"),
                )),
            }
        }
    }
}

/// Whether an ordinary user's sandbox works here: runs `program` (the
/// agent's own binary) as the probe. `Err` says why not, with the host
/// setting to blame where one is known.
pub fn probe(program: &Path) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .arg(PROBE_ARG)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {} {PROBE_ARG}: {e}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_default();
    if out.status.success() && line == PROBE_OK {
        return Ok(());
    }
    let why = match line.split_once('\t') {
        Some((_, message)) => message.to_string(),
        None => format!(
            "{} {PROBE_ARG} ended with {} and printed {line:?}",
            program.display(),
            out.status
        ),
    };
    Err(match host_setting_to_blame(Path::new("/proc/sys")) {
        Some(setting) => format!("{why} ({setting})"),
        None => why,
    })
}

/// The sysctl that forbids unprivileged user namespaces on this host, if
/// one does; `sysctl_root` is /proc/sys.
fn host_setting_to_blame(sysctl_root: &Path) -> Option<String> {
    let read = |name: &str| {
        std::fs::read_to_string(sysctl_root.join(name.replace('.', "/")))
            .ok()
            .map(|v| v.trim().to_string())
    };
    [
        ("user.max_user_namespaces", "0"),
        // Debian's and older Ubuntu kernels.
        ("kernel.unprivileged_userns_clone", "0"),
        // Ubuntu 23.10 and later: the namespace is made, without capabilities.
        ("kernel.apparmor_restrict_unprivileged_userns", "1"),
    ]
    .into_iter()
    .find(|(name, forbidding)| read(name).as_deref() == Some(*forbidding))
    .map(|(name, value)| format!("{name} is {value} on this host"))
}

/// What an ordinary user's sandbox gives a job, and what it cannot, with
/// why; `landlock` is whether this kernel enforces Landlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protections {
    pub on: Vec<&'static str>,
    pub off: Vec<(&'static str, &'static str)>,
}

impl Protections {
    pub fn of_this_mode(landlock: bool) -> Protections {
        let mut on = vec![
            "user, mount, pid, network, ipc and uts namespaces",
            "a read-only host with the agent's files hidden",
            "private /tmp, /dev and /proc",
            "no capabilities",
            "no_new_privs",
            "seccomp",
        ];
        let mut off = vec![
            (
                "a uid per slot",
                "only root has other uids to give: every job runs as your uid (with your \
                 groups), so it can read whatever you can read on this host (read-only), \
                 connect as you to your sockets outside /run and /tmp (a Docker socket, \
                 ssh or gpg agents under your home), and jobs share what they write in \
                 sandbox.bind_paths",
            ),
            (
                "cgroup limits",
                "not root, so no cgroups to give: no memory, pids or CPU limits and no \
                 cpu_ms or memory_peak_bytes in final events (a job's leftover processes \
                 still die with its pid namespace)",
            ),
        ];
        if landlock {
            on.push("Landlock");
        } else {
            off.push(("Landlock", "not enabled in this kernel"));
        }
        Protections { on, off }
    }

    /// One line: what is on, then what is off.
    pub fn summary(&self) -> String {
        let off: Vec<&str> = self.off.iter().map(|(what, _)| *what).collect();
        format!(
            "not root: jobs run in a user namespace of their own; on: {}; off: {}",
            self.on.join(", "),
            off.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_maps_to_itself_in_one_line() {
        assert_eq!(own_id_map(1000), "1000 1000 1\n");
        assert_eq!(own_id_map(65534), "65534 65534 1\n");
    }

    /// In a forked child (a user namespace needs a single-threaded
    /// process): as an ordinary user (dropped to one first when the tests
    /// run as root), a new user namespace, then the map of its own ids.
    #[test]
    fn an_ordinary_user_maps_its_own_ids_in_a_user_namespace_of_its_own() {
        const USER: u32 = 1_234_567;
        crate::sandbox::in_forked_child(|| {
            let (mut uid, mut gid) = (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            );
            if uid == 0 {
                let (u, g) = (
                    nix::unistd::Uid::from_raw(USER),
                    nix::unistd::Gid::from_raw(USER),
                );
                if nix::unistd::setgroups(&[]).is_err()
                    || nix::unistd::setresgid(g, g, g).is_err()
                    || nix::unistd::setresuid(u, u, u).is_err()
                {
                    return 10;
                }
                (uid, gid) = (USER, USER);
            }
            // A uid change made this process non-dumpable, which gives
            // its /proc files (the maps too) to root; the launcher, a
            // fork of a freshly exec'd fork server, is dumpable.
            if nix::sys::prctl::set_dumpable(true).is_err() {
                return 13;
            }
            // SAFETY: flags only; this child is single-threaded.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
                // No user namespaces on this host: nothing to test.
                return 0;
            }
            if map_own_ids(uid, gid).is_err() {
                return 11;
            }
            let maps = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
            let setgroups = std::fs::read_to_string("/proc/self/setgroups").unwrap_or_default();
            if maps.split_whitespace().collect::<Vec<_>>()
                != [uid.to_string(), uid.to_string(), "1".to_string()]
                || setgroups.trim() != "deny"
            {
                return 12;
            }
            0
        });
    }

    #[test]
    fn the_protections_of_this_mode_name_what_is_off_and_why() {
        let with = Protections::of_this_mode(true);
        let off: Vec<&str> = with.off.iter().map(|(what, _)| *what).collect();
        assert_eq!(off, ["a uid per slot", "cgroup limits"]);
        assert!(with.on.contains(&"seccomp") && with.on.contains(&"Landlock"));
        assert!(with.off.iter().all(|(_, why)| !why.is_empty()));
        let summary = with.summary();
        assert!(summary.contains("on: user, mount, pid, network, ipc and uts namespaces"));
        assert!(summary.ends_with("off: a uid per slot, cgroup limits"));

        let without = Protections::of_this_mode(false);
        assert!(!without.on.contains(&"Landlock"));
        assert!(without.off.iter().any(|(what, _)| *what == "Landlock"));
    }

    #[test]
    fn the_host_setting_that_forbids_user_namespaces_is_named() {
        let root = tempfile::tempdir().expect("tempdir");
        let set = |name: &str, value: &str| {
            let path = root.path().join(name.replace('.', "/"));
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(path, format!("{value}\n")).expect("write");
        };
        set("user.max_user_namespaces", "63000");
        set("kernel.unprivileged_userns_clone", "1");
        assert_eq!(host_setting_to_blame(root.path()), None);
        set("kernel.apparmor_restrict_unprivileged_userns", "1");
        assert_eq!(
            host_setting_to_blame(root.path()).as_deref(),
            Some("kernel.apparmor_restrict_unprivileged_userns is 1 on this host")
        );
        set("user.max_user_namespaces", "0");
        assert_eq!(
            host_setting_to_blame(root.path()).as_deref(),
            Some("user.max_user_namespaces is 0 on this host")
        );
    }
}
