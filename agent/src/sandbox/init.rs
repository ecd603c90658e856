//! The job's init: the launcher, forked by the fork server into the job's
//! fresh namespaces, is pid 1 there. As root (or with the capabilities of
//! its own user namespace, once it has mapped the user's ids there) it
//! builds the job's file system view, hostname and loopback, then forks
//! the job, which drops to its uid and applies its last walls before
//! `execve`.
//!
//! The init then only reaps. When the job's own process ends, the init
//! sends its wait status to the agent over the report socket and exits;
//! the kernel then kills every process left in the namespace, so a job that
//! daemonizes or calls `setsid` cannot outlive it. Signals the agent sends
//! to the job's process group reach the job directly; the init itself, as
//! a pid 1 without handlers, only dies of SIGKILL, which takes the whole
//! namespace with it.
//!
//! Report protocol (after the plan): the init writes [`RUNNING`] once the
//! job has exec'd, then [`STATUS`] and the raw wait status (4 bytes, little
//! endian) when it ends. A refusal is `step<TAB>message`, as from a
//! launcher without isolation.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;

use super::launcher::{self, exec, resolve_program, LAUNCH_REFUSED_EXIT};
use super::steps::{Step, StepError};
use super::{identity, lsm, mounts, syscalls, userns, Isolation, LaunchPlan, Privilege};

/// The job has exec'd under an init.
pub const RUNNING: u8 = b'!';
/// The job's wait status follows.
pub const STATUS: u8 = b'=';

/// Runs as the job's init. Returns only with a step that failed before the
/// job could start; the caller reports it.
pub fn run(
    plan: &LaunchPlan,
    iso: &Isolation,
    report: &mut File,
) -> Result<launcher::Never, StepError> {
    if iso.privilege == Privilege::UserNamespace {
        // First of all: until its ids are mapped the init is nobody in its
        // namespace and can make nothing; and the map files are its own
        // only while it is dumpable.
        userns::map_own_ids(iso.uid, iso.gid)?;
    }
    // Before the init turns non-dumpable, which gives its /proc files to
    // root: in a user namespace it could no longer write them.
    identity::reset_oom_score(iso.privilege)?;
    // No core dumps or ptrace of the init, and a name that tells it apart
    // from the fork server it was forked from in `ps`.
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = nix::sys::prctl::set_name(c"batchly-init");
    mounts::build(&plan.work_dir, iso)?;
    nix::unistd::sethostname(&iso.hostname).map_err(|e| {
        StepError::errno(
            Step::Hostname,
            format!("setting the hostname {}", iso.hostname),
            e,
        )
    })?;
    if !iso.egress {
        loopback_up()?;
    }
    // The seccomp filter (compiled by the fork server already) is taken
    // here, where an error can still be reported plainly, and installed by
    // the job just before execve.
    let filter = syscalls::filter()?;

    let (exec_r, exec_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| StepError::errno(Step::Fork, "making the exec pipe", e))?;
    // SAFETY: the launcher is single-threaded (forked from the
    // single-threaded fork server), so the child is a consistent copy.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(StepError::errno(
            Step::Fork,
            "forking the job",
            Errno::last(),
        ));
    }
    if pid == 0 {
        drop(exec_r);
        job(plan, iso, filter, exec_w)
    }
    drop(exec_w);
    // The job's output pipes are the job's: the init keeps no copy, so they
    // reach end of file when the job's processes are gone.
    for fd in [1, 2] {
        let null = File::open("/dev/null")
            .map_err(|_| StepError::new(Step::Fork, "opening /dev/null for the init"))?;
        launcher::dup_onto(std::os::fd::AsFd::as_fd(&null), fd).map_err(|e| {
            StepError::errno(Step::Fork, "closing the init's copy of the job's output", e)
        })?;
    }
    // End of file on the exec pipe: the job exec'd. Anything else is its
    // refusal, passed on as it is.
    let mut refusal = Vec::new();
    let _ = File::from(exec_r).read_to_end(&mut refusal);
    if !refusal.is_empty() {
        let _ = report.write_all(&refusal);
        let _ = reap_until(pid);
        std::process::exit(LAUNCH_REFUSED_EXIT);
    }
    send(report, &[RUNNING]);
    let status = reap_until(pid);
    let mut record = vec![STATUS];
    record.extend_from_slice(&status.unwrap_or(0).to_le_bytes());
    if status.is_some() {
        send(report, &record);
    }
    std::process::exit(0)
}

/// Sends without SIGPIPE: an agent that went away must not kill the init
/// by a signal (the namespace dies with it either way).
fn send(report: &File, bytes: &[u8]) {
    let _ = nix::sys::socket::send(
        report.as_raw_fd(),
        bytes,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    );
}

/// Reaps every child until `job` ends; its raw wait status, or `None` if
/// it could not be waited for.
fn reap_until(job: libc::pid_t) -> Option<i32> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int into `status`.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == job {
            return Some(status);
        }
        if r < 0 && Errno::last() != Errno::EINTR {
            return None;
        }
    }
}

/// The job's side of the fork: its last steps, then `execve`. A failure is
/// written to the exec pipe and ends the process.
fn job(plan: &LaunchPlan, iso: &Isolation, filter: &[libc::sock_filter], exec_w: OwnedFd) -> ! {
    let mut exec_w = File::from(exec_w);
    let err = match job_steps(plan, iso, filter) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = exec_w.write_all(err.wire().as_bytes());
    std::process::exit(LAUNCH_REFUSED_EXIT)
}

fn job_steps(
    plan: &LaunchPlan,
    iso: &Isolation,
    filter: &[libc::sock_filter],
) -> Result<launcher::Never, StepError> {
    identity::set_rlimits(iso.max_file_bytes)?;
    identity::close_inherited_descriptors()?;
    identity::become_unprivileged(iso.uid, iso.gid, iso.privilege)?;
    launcher::enter_work_dir(&plan.work_dir)?;
    match lsm::restrict(&plan.work_dir, &iso.writable)? {
        lsm::Enforced::Fully | lsm::Enforced::Partly => {}
        // Landlock is a second layer behind the read-only mounts; a kernel
        // without it still gets every other protection.
        lsm::Enforced::Not => {}
    }
    let program = resolve_program(plan)?;
    syscalls::install(filter)?;
    exec(&program, plan)
}

/// Brings up `lo` in the job's fresh network namespace.
fn loopback_up() -> Result<(), StepError> {
    let err = |what: &str, e: Errno| StepError::errno(Step::Loopback, what.to_string(), e);
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err("opening a socket to configure lo", e))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(err("reading the flags of lo", Errno::last()));
    }
    // SAFETY: the flags member of the union, as SIOCGIFFLAGS just set it.
    unsafe { ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(err("bringing lo up", Errno::last()));
    }
    Ok(())
}
