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
//! Nothing here may widen what a job can do: what the kernel refuses an
//! ordinary user is reported as off, never worked around.
//!
//! [`Privilege::UserNamespace`]: super::Privilege::UserNamespace

use std::io::Write;
use std::path::Path;

use nix::errno::Errno;

use super::steps::{Step, StepError};

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
        // SAFETY: the child makes system calls, writes small files and
        // leaves with _exit; it never returns into the test harness.
        match unsafe { libc::fork() } {
            0 => {
                let code = (|| {
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
                    let setgroups =
                        std::fs::read_to_string("/proc/self/setgroups").unwrap_or_default();
                    if maps.split_whitespace().collect::<Vec<_>>()
                        != [uid.to_string(), uid.to_string(), "1".to_string()]
                        || setgroups.trim() != "deny"
                    {
                        return 12;
                    }
                    0
                })();
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
                    "check that failed (see the codes above)"
                );
            }
        }
    }
}
