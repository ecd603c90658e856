//! The floor `bench spawn` holds the sandboxed launch path against: what a
//! job costs the kernel with no agent at all. A fresh cgroup, then a child
//! that moves itself into it, enters fresh mount, ipc, uts, network and
//! pid namespaces and forks the process that execs `/bin/true` as pid 1 of
//! its namespace, while it waits and exits with its status (the init's
//! part, without the init's mounts).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use super::cgroup::{Hierarchy, JobCgroup, Limits};

/// One job of the baseline in cgroup `name` of `cgroups`; the cgroup is
/// removed after.
pub fn run_one(cgroups: &Hierarchy, name: &str) -> io::Result<()> {
    let cg = cgroups.create(name, &Limits::default())?;
    let ran = run_in(&cg);
    let removed = cg.remove();
    ran.and(removed)
}

fn run_in(cg: &JobCgroup) -> io::Result<()> {
    // Opened before the fork: the child only writes to them.
    let procs: Vec<OwnedFd> = cg
        .procs_files()
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", p.display())))
        })
        .collect::<io::Result<_>>()?;
    let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET;
    let mut command = std::process::Command::new("/bin/true");
    // SAFETY: the closure runs in the forked child of a possibly
    // multi-threaded process, so it only makes system calls on values
    // prepared before the fork (no allocation, no locks): write, unshare,
    // fork, waitpid and _exit. The grandchild returns to exec `/bin/true`;
    // the child never returns, it exits with the grandchild's status.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::unshare(flags) != 0 {
                return Err(io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(io::Error::last_os_error()),
                0 => Ok(()),
                pid => {
                    let mut status = 0;
                    if libc::waitpid(pid, &mut status, 0) != pid || !libc::WIFEXITED(status) {
                        libc::_exit(125);
                    }
                    libc::_exit(libc::WEXITSTATUS(status));
                }
            }
        });
    }
    let status = command.status()?;
    drop(procs);
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "/bin/true in fresh namespaces: {status}"
        )))
    }
}
