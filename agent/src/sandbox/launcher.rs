//! The launcher: the child side of the launch path. It runs in a
//! single-threaded copy of the agent binary (forked by the fork server,
//! `forkserver.rs`), so every step may allocate, read files and report
//! errors freely before the final `execve`. With isolation it becomes the
//! job's init (`init.rs`), which forks the job; without, it execs the job
//! itself.
//!
//! Protocol with the agent (see `process.rs`): fd 0 is a Unix socket, fds 1
//! and 2 the job's output pipes. The
//! launcher reads one JSON `LaunchPlan` until EOF, keeps the socket as a
//! close-on-exec "report" descriptor and puts `/dev/null` on fd 0. When every
//! step has passed it writes one `READY` byte and calls `execve`; if that
//! succeeds the kernel closes the report descriptor. So the agent reads
//! exactly `READY` then EOF for a running job; `step<TAB>message` (after
//! `READY` if `execve` itself failed) for a refused one; and nothing at all
//! if the launcher died on the way (killed, out of memory): never mistaken
//! for a job that ran.
//!
//! It must never return into the agent's code paths or start a runtime.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::steps::{Step, StepError};
use super::{init, LaunchPlan};

/// Exit status of a launcher that refused to start the job.
pub const LAUNCH_REFUSED_EXIT: i32 = 127;

/// Written just before `execve`: every isolation step has been applied.
pub const READY: u8 = b'+';

/// Signals the launcher resets to their default disposition for the job:
/// everything but SIGKILL and SIGSTOP, which cannot be changed. Dispositions
/// set to "ignore" survive `execve` (nohup's SIGHUP, a shell's SIGQUIT for
/// background commands), and a job must receive its `interrupt.signal`.
const RESET_SIGNALS: std::ops::RangeInclusive<i32> = 1..=31;

/// Entry point of a launcher the fork server forked. Never returns.
pub fn main() -> ! {
    let mut report: Option<std::fs::File> = None;
    let err = match run(&mut report) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    let line = err.wire();
    match report.as_mut() {
        Some(f) => {
            let _ = f.write_all(line.as_bytes());
        }
        // Without a report socket nobody is listening for a structured
        // answer; stderr is the job's log, which is the next best place.
        None => eprintln!("batchly-agent launcher: {line}"),
    }
    std::process::exit(LAUNCH_REFUSED_EXIT)
}

pub(super) enum Never {}

fn run(report: &mut Option<std::fs::File>) -> Result<Never, StepError> {
    // Out of the agent's process group first, so a Ctrl-C meant for the
    // agent's terminal does not reach the launcher or the job.
    new_session()?;
    let plan = read_plan()?;
    *report = Some(keep_report_fd()?);
    stdin_from_dev_null()?;
    default_signal_state()?;
    if let Some(iso) = &plan.isolation {
        let report = report
            .as_mut()
            .expect("the report descriptor was just kept");
        return init::run(&plan, iso, report);
    }
    enter_work_dir(&plan.work_dir)?;
    let program = resolve_program(&plan)?;
    if let Some(report) = report.as_mut() {
        report
            .write_all(&[READY])
            .map_err(|e| StepError::new(Step::Report, format!("telling the agent: {e}")))?;
    }
    exec(&program, &plan)
}

fn read_plan() -> Result<LaunchPlan, StepError> {
    let mut buf = Vec::new();
    // SAFETY: fd 0 is the plan socket handed to us by the agent; we take
    // ownership only for this read and give it back with into_raw_fd.
    let mut sock = unsafe { std::fs::File::from_raw_fd(0) };
    let read = sock.read_to_end(&mut buf);
    let _ = std::os::fd::IntoRawFd::into_raw_fd(sock);
    read.map_err(|e| StepError::new(Step::ReadPlan, format!("reading launch plan: {e}")))?;
    serde_json::from_slice(&buf)
        .map_err(|e| StepError::new(Step::ReadPlan, format!("decoding launch plan: {e}")))
}

/// Moves the plan socket off fd 0 to a close-on-exec descriptor: it stays
/// open for error reports and closes by itself when `execve` succeeds.
fn keep_report_fd() -> Result<std::fs::File, StepError> {
    let fd = move_off_fd0()
        .map_err(|e| StepError::new(Step::ReportFd, format!("duplicating plan socket: {e}")))?;
    Ok(std::fs::File::from(fd))
}

fn stdin_from_dev_null() -> Result<(), StepError> {
    dev_null_on_fd0()
        .map_err(|e| StepError::new(Step::Stdin, format!("redirecting stdin to /dev/null: {e}")))
}

/// A close-on-exec copy (at 3 or above) of what fd 0 holds.
pub(super) fn move_off_fd0() -> nix::Result<OwnedFd> {
    // SAFETY: fd 0 is open for the whole life of this process (it was
    // handed to us as stdin), so borrowing it for one fcntl call is sound.
    let zero = unsafe { BorrowedFd::borrow_raw(0) };
    let fd: RawFd = fcntl(zero, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: fcntl just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Puts `/dev/null` on fd 0 (after `move_off_fd0` kept what was there).
pub(super) fn dev_null_on_fd0() -> std::io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    dup_onto(null.as_fd(), 0)?;
    Ok(())
}

/// `dup2(fd, target)`: the copy at `target` is not close-on-exec.
pub(super) fn dup_onto(fd: BorrowedFd<'_>, target: RawFd) -> nix::Result<()> {
    // SAFETY: dup2 atomically replaces whatever `target` was; that
    // descriptor (0, 1 or 2) is owned by no Rust value in this process.
    let r = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

/// The job leads its own session and process group, so the agent can signal
/// the whole tree at once and the job has no controlling terminal.
fn new_session() -> Result<(), StepError> {
    nix::unistd::setsid()
        .map(|_| ())
        .map_err(|e| StepError::new(Step::Session, format!("creating a new session: {e}")))
}

/// The launcher is a Rust binary, whose runtime ignores SIGPIPE at start,
/// and whoever started the agent may have ignored others; an ignored signal
/// survives `execve`, so every one goes back to its default for the job,
/// and every signal the agent may have blocked is unblocked.
fn default_signal_state() -> Result<(), StepError> {
    for raw in RESET_SIGNALS {
        let Ok(sig) = Signal::try_from(raw) else {
            continue;
        };
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: single-threaded process, no handler is installed:
        // restoring the default disposition cannot race with anything.
        unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(|e| StepError::new(Step::Signals, format!("resetting {sig}: {e}")))?;
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| StepError::new(Step::Signals, format!("clearing the signal mask: {e}")))?;
    Ok(())
}

pub(super) fn enter_work_dir(dir: &Path) -> Result<(), StepError> {
    nix::unistd::chdir(dir).map_err(|e| {
        StepError::new(
            Step::WorkDir,
            format!("entering work dir {}: {}", dir.display(), e.desc()),
        )
    })
}

/// `command[0]` without a slash is looked up in the job's own `PATH`, the
/// way a shell would; the agent's `PATH` plays no part.
pub(super) fn resolve_program(plan: &LaunchPlan) -> Result<PathBuf, StepError> {
    let name = plan
        .argv
        .first()
        .ok_or_else(|| StepError::new(Step::Resolve, "empty command"))?;
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path_var = plan
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable_file(p))
        .ok_or_else(|| StepError::new(Step::Resolve, format!("command not found: {name}")))
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(super) fn exec(program: &Path, plan: &LaunchPlan) -> Result<Never, StepError> {
    let cstr = |s: &[u8]| {
        CString::new(s).map_err(|_| StepError::new(Step::Exec, "argument contains a NUL byte"))
    };
    let path = cstr(program.as_os_str().as_bytes())?;
    let argv = plan
        .argv
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let env = plan
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let err = match nix::unistd::execve(&path, &argv, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let shown = plan.argv.first().map(String::as_str).unwrap_or_default();
    let message = match err {
        // The file exists (it was resolved above), so what is missing is its
        // `#!` interpreter or its dynamic loader.
        nix::errno::Errno::ENOENT if program.exists() => format!(
            "cannot execute {shown}: its interpreter (#! line) or dynamic loader does not exist"
        ),
        nix::errno::Errno::ENOENT => format!("command not found: {shown}"),
        nix::errno::Errno::EACCES => format!("permission denied: {shown}"),
        nix::errno::Errno::ENOEXEC => format!("not an executable format: {shown}"),
        other => format!("executing {shown}: {}", other.desc()),
    };
    Err(StepError::new(Step::Exec, message))
}
