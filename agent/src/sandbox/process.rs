//! The agent side of the launch path: keep a fork server running, have it
//! fork a launcher for each job, hand the launcher the plan, learn whether
//! the job is running or why it was refused, and wait for, signal or reap
//! the job's whole process group. Also finds and kills the process groups
//! that a previous, crashed run of the agent left behind.
//!
//! It never forks the runtime itself: the fork server is started with
//! `posix_spawn` (what the standard library uses when no `pre_exec` hook is
//! set) and forks its own small, single-threaded self (`forkserver.rs`). The
//! launchers it forks are the agent's children (`CLONE_PARENT`); the agent
//! waits for each through a pidfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::pipe;

use super::forkserver::{FAILED, FORK, FORKED};
use super::init::{RUNNING, STATUS};
use super::launcher::READY;
use super::{LaunchPlan, Namespaces, LAUNCHER_ARG};

/// Longest a launcher may take to apply its steps (a hung mount in `chdir`,
/// say) before the attempt is given up as the agent's fault.
const PLAN_EXCHANGE_LIMIT: Duration = Duration::from_secs(60);
/// Longest the fork server may take to answer one request; past it the
/// server is taken for hung, killed, and another one started.
const FORK_LIMIT: Duration = Duration::from_secs(10);
/// Longest the job's status record may take to be read once its init has
/// exited (it is already in the socket's buffer by then).
const INIT_RECORD_LIMIT: Duration = Duration::from_secs(1);

/// How to start launchers: through a fork server running `program` (in
/// production the running binary itself), started on first use and again
/// whenever it has died. Clones share the server.
#[derive(Debug, Clone)]
pub struct Launcher {
    program: PathBuf,
    server: Arc<tokio::sync::Mutex<Option<ForkServer>>>,
}

impl Default for Launcher {
    fn default() -> Self {
        // /proc/self/exe still works after a package upgrade replaced the
        // file on disk, so a running agent always launches its own code.
        Launcher::new("/proc/self/exe")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting the job launcher {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the job launcher: {0}")]
    Protocol(#[source] io::Error),
    /// The launcher ran but refused to start the job; `message` is meant for
    /// the user ("command not found: foo").
    #[error("{message}")]
    Refused { step: String, message: String },
}

impl LaunchError {
    /// True when the job's own spec is at fault (a missing command), not the
    /// agent or the host.
    pub fn is_job_fault(&self) -> bool {
        matches!(self, LaunchError::Refused { step, .. } if step == "exec")
    }
}

/// A running job: the leader of its own session and process group (with
/// isolation, the job's init, whose group the job is in).
#[derive(Debug)]
pub struct JobProcess {
    pid: Pid,
    start_time: u64,
    child: Child,
    /// With isolation: the init's report socket, which carries the job's
    /// own wait status at its end.
    init: Option<(tokio::net::UnixStream, Vec<u8>)>,
    /// The job's status once known.
    reported: Option<ExitStatus>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

/// The fork server and the agent's end of its request socket.
#[derive(Debug)]
struct ForkServer {
    sock: AsyncFd<OwnedFd>,
    /// Held only to be killed (and reaped) when dropped: a server that
    /// hangs or misbehaves is replaced.
    _process: tokio::process::Child,
}

impl ForkServer {
    fn start(program: &PathBuf) -> Result<ForkServer, LaunchError> {
        let spawn_err = |source: io::Error| LaunchError::Spawn {
            program: program.clone(),
            source,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| spawn_err(e.into()))?;
        set_nonblocking(&ours).map_err(spawn_err)?;
        let process = tokio::process::Command::new(program)
            .arg(LAUNCHER_ARG)
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        // SAFETY: `ours` is an OwnedFd, moved into the AsyncFd: it stays
        // open, and the same descriptor, for the AsyncFd's whole life.
        let sock = unsafe {
            AsyncFd::register_with_interest(ours, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| spawn_err(e.into()))?;
        Ok(ForkServer {
            sock,
            _process: process,
        })
    }

    /// Asks for one launcher with these descriptors on its fds 0, 1, 2;
    /// returns its pid. Errors mean the server is unusable.
    async fn fork(&self, fds: [&OwnedFd; 3], namespaces: Namespaces) -> Result<i32, ForkError> {
        let raw = fds.map(|fd| fd.as_raw_fd());
        let mut request = vec![FORK];
        request.extend_from_slice(&namespaces.0.to_le_bytes());
        self.sock
            .async_io(Interest::WRITABLE, |sock| {
                sendmsg::<()>(
                    sock.as_raw_fd(),
                    &[io::IoSlice::new(&request)],
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await?;
        let mut reply = [0u8; 512];
        let n = self
            .sock
            .async_io(Interest::READABLE, |sock| {
                recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty()).map_err(io::Error::from)
            })
            .await?;
        match &reply[..n] {
            [] => Err(ForkError::Broken(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the fork server has exited",
            ))),
            [FORKED, pid @ ..] if pid.len() == 4 => {
                Ok(i32::from_le_bytes([pid[0], pid[1], pid[2], pid[3]]))
            }
            [FAILED, why @ ..] => Err(ForkError::Refused(
                String::from_utf8_lossy(why).into_owned(),
            )),
            other => Err(ForkError::Broken(io::Error::other(format!(
                "the fork server answered {} unexpected bytes",
                other.len()
            )))),
        }
    }
}

/// Why the fork server gave no pid.
#[derive(Debug)]
enum ForkError {
    /// It answered that it could not fork (no privileges for namespaces, no
    /// memory): another server would answer the same.
    Refused(String),
    /// It is gone or unusable: another server may do better.
    Broken(io::Error),
}

impl From<io::Error> for ForkError {
    fn from(e: io::Error) -> Self {
        ForkError::Broken(e)
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

impl Launcher {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Launcher {
            program: program.into(),
            server: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Starts a launcher that waits for its plan. The job cannot run any of
    /// its own code before `Spawned::start`, so the caller can first record
    /// the pid where crash recovery will find it. Dropping a `Spawned`
    /// without starting it kills the launcher.
    /// `namespaces` are those the launcher is forked into (empty without
    /// isolation).
    pub async fn spawn(&self, namespaces: Namespaces) -> Result<Spawned, LaunchError> {
        // The exchange with the server runs to its end even if the caller
        // stops waiting: a reply left unread would answer the next request.
        let me = self.clone();
        tokio::spawn(async move { me.spawn_now(namespaces).await })
            .await
            .map_err(|e| LaunchError::Protocol(io::Error::other(e)))?
    }

    async fn spawn_now(&self, namespaces: Namespaces) -> Result<Spawned, LaunchError> {
        let mut server = self.server.lock().await;
        // A server that died since the last job is replaced once. Each try
        // has descriptors of its own: a launcher forked by a server that
        // died before answering sees them close and exits.
        let mut tries = 0;
        let (pid, ours, out_r, err_r) = loop {
            tries += 1;
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().map_err(LaunchError::Protocol)?;
            let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| LaunchError::Protocol(e.into()))?;
            let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| LaunchError::Protocol(e.into()))?;
            let theirs = OwnedFd::from(theirs);
            let srv = match server.as_mut() {
                Some(srv) => srv,
                None => server.insert(ForkServer::start(&self.program)?),
            };
            let asked =
                tokio::time::timeout(FORK_LIMIT, srv.fork([&theirs, &out_w, &err_w], namespaces))
                    .await;
            // The launcher has its copies now (if it exists); with ours
            // closed, its ends of the pipes are the only writers, so they
            // reach end of file with it.
            drop((theirs, out_w, err_w));
            match asked {
                Ok(Ok(pid)) => break (pid, ours, out_r, err_r),
                // The server answered; it could not fork (the reason says
                // why: no privileges for namespaces, no memory). Another
                // server would answer the same.
                Ok(Err(ForkError::Refused(why))) => {
                    return Err(LaunchError::Protocol(io::Error::other(format!(
                        "the job fork server could not fork: {why}"
                    ))));
                }
                Ok(Err(ForkError::Broken(e))) if tries < 2 => {
                    tracing::warn!(error = %e, "the job fork server failed; starting another");
                    *server = None;
                }
                Ok(Err(ForkError::Broken(e))) => {
                    *server = None;
                    return Err(LaunchError::Protocol(e));
                }
                Err(_) => {
                    *server = None;
                    return Err(LaunchError::Protocol(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the job fork server did not answer within {FORK_LIMIT:?}"),
                    )));
                }
            }
        };
        drop(server);
        let pid = Pid::from_raw(pid);
        let child = Child::adopt(pid).map_err(LaunchError::Protocol)?;
        // The start time of a process survives execve, so this is also the
        // job's; it tells the job apart from a later process reusing the pid.
        // Without it, a crash would leave a job the next start cannot tell
        // from a later process with the same pid: refuse to run it.
        let Some(start_time) = process_stat(pid.as_raw()).map(|s| s.start_time) else {
            return Err(LaunchError::Protocol(io::Error::other(format!(
                "cannot read /proc/{pid}/stat of the launcher: the agent could not find the job again after a crash, so it is not started"
            ))));
        };
        let receiver =
            |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd).map_err(LaunchError::Protocol);
        Ok(Spawned {
            pid,
            start_time,
            child,
            plan_socket: ours,
            stdout: receiver(out_r)?,
            stderr: receiver(err_r)?,
        })
    }
}

/// A child of the agent forked by the fork server, waited for through its
/// pidfd. Dropped before it was reaped, it is killed and reaped in the
/// background, so no zombie stays (the rest of a job's process group is the
/// supervisor's to kill, as it does when every job ends).
#[derive(Debug)]
struct Child {
    pid: Pid,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    /// This handle is the background reaper of a dropped one.
    reaping: bool,
}

impl Child {
    fn adopt(pid: Pid) -> io::Result<Child> {
        // SAFETY: pidfd_open takes two integers and returns a new
        // descriptor or -1; nothing is borrowed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            // Not reaped yet, so the pid is still this child's.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(io::Error::new(
                e.kind(),
                format!("pidfd_open for the launcher (Linux 5.3 or later is needed): {e}"),
            ));
        }
        // SAFETY: the syscall just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: as above, the OwnedFd moves into the AsyncFd and lives
        // exactly as long.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Child {
            pid,
            pidfd: Some(pidfd),
            status: None,
            reaping: false,
        })
    }

    /// Waits for the child to exit and reaps it. Cancel-safe; once reaped
    /// it keeps answering with the same status.
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let Some(fd) = self.pidfd.as_ref() else {
            return Err(io::Error::other("child handle without a pidfd"));
        };
        loop {
            let mut ready = fd.readable().await?;
            match nix::sys::wait::waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => ready.clear_ready(),
                Ok(ws) => {
                    if let Some(st) = exit_status(ws) {
                        self.status = Some(st);
                        self.pidfd = None;
                        return Ok(st);
                    }
                    // Stopped or continued: not an exit.
                    ready.clear_ready();
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // Not reaped, so the pid is still this child's.
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        let pid = self.pid;
        let background = self
            .pidfd
            .take()
            .zip(tokio::runtime::Handle::try_current().ok());
        match background {
            Some((pidfd, rt)) if !self.reaping => {
                rt.spawn(async move {
                    let mut orphan = Child {
                        pid,
                        pidfd: Some(pidfd),
                        status: None,
                        reaping: true,
                    };
                    let _ = orphan.wait().await;
                });
            }
            // No runtime (or the reaping task itself is being dropped, at
            // shutdown): SIGKILL is quick; wait for it here, but never
            // long (a process stuck in the kernel stays a zombie).
            _ => {
                for _ in 0..200 {
                    match nix::sys::wait::waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        _ => break,
                    }
                }
            }
        }
    }
}

/// The exit status the standard library would report for a wait status.
fn exit_status(ws: WaitStatus) -> Option<ExitStatus> {
    match ws {
        WaitStatus::Exited(_, code) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
        WaitStatus::Signaled(_, sig, core) => Some(ExitStatus::from_raw(
            sig as i32 | if core { 0x80 } else { 0 },
        )),
        _ => None,
    }
}

/// A launcher waiting for its plan.
#[derive(Debug)]
pub struct Spawned {
    pid: Pid,
    start_time: u64,
    child: Child,
    plan_socket: std::os::unix::net::UnixStream,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Sends the plan; returns once the job runs, or why it was refused.
    pub async fn start(self, plan: &LaunchPlan) -> Result<JobProcess, LaunchError> {
        let Spawned {
            pid,
            start_time,
            mut child,
            plan_socket,
            stdout,
            stderr,
        } = self;
        let exchange = tokio::time::timeout(PLAN_EXCHANGE_LIMIT, exchange_plan(plan_socket, plan));
        let reply = match exchange.await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the job launcher did not start the job within {PLAN_EXCHANGE_LIMIT:?}"),
            ))
        }) {
            Ok(reply) => reply,
            Err(e) => {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                let _ = child.wait().await;
                return Err(LaunchError::Protocol(e));
            }
        };
        let (reply, socket) = reply;
        let init = match parse_reply(&reply) {
            Reply::Running => None,
            Reply::RunningUnderInit => Some((socket, reply[1..].to_vec())),
            Reply::Died => {
                // Killed or out of memory before every step was done: the
                // job never ran, and that is not the job's fault.
                let status = child.wait().await;
                return Err(LaunchError::Protocol(io::Error::other(format!(
                    "the job launcher ended before starting the job ({})",
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string())
                ))));
            }
            Reply::Refused { step, message } => {
                let _ = child.wait().await;
                return Err(LaunchError::Refused { step, message });
            }
        };
        Ok(JobProcess {
            pid,
            start_time,
            child,
            init,
            reported: None,
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }
}

/// What the launcher's report says (protocol in `launcher.rs`).
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Running,
    /// The job exec'd under an init, which reports its status at the end.
    RunningUnderInit,
    Died,
    Refused {
        step: String,
        message: String,
    },
}

fn parse_reply(reply: &[u8]) -> Reply {
    let text = match reply {
        [READY] => return Reply::Running,
        [RUNNING, ..] => return Reply::RunningUnderInit,
        [] => return Reply::Died,
        [READY, rest @ ..] => rest,
        other => other,
    };
    let text = String::from_utf8_lossy(text);
    let (step, message) = text.split_once('\t').unwrap_or(("launch", &text));
    Reply::Refused {
        step: step.to_string(),
        message: message.to_string(),
    }
}

/// Sends the plan and reads the launcher's answer: everything up to end
/// of file, or the init's lone [`RUNNING`] byte (the socket then stays
/// open until the job ends).
async fn exchange_plan(
    ours: std::os::unix::net::UnixStream,
    plan: &LaunchPlan,
) -> io::Result<(Vec<u8>, tokio::net::UnixStream)> {
    ours.set_nonblocking(true)?;
    let mut sock = tokio::net::UnixStream::from_std(ours)?;
    let body = serde_json::to_vec(plan).map_err(io::Error::other)?;
    sock.write_all(&body).await?;
    sock.shutdown().await?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
        // An init's answer: the job runs; what may follow (its status, if
        // it ended already) is read when it is waited for.
        if reply.first() == Some(&RUNNING) {
            break;
        }
    }
    Ok((reply, sock))
}

impl JobProcess {
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Clock ticks since boot at which the job started (`/proc/PID/stat`).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Signals every process of the job's group. A group that is already
    /// gone is not an error.
    pub fn signal_group(&self, sig: Signal) {
        let _ = nix::sys::signal::killpg(self.pid, sig);
    }

    /// Waits for the job's leader to exit (reaping it). Cancel-safe. Under
    /// an init, the job's own status is the one the init reported; an init
    /// that died without one (killed) gives its own.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.reported {
            return Ok(status);
        }
        let status = self.child.wait().await?;
        let reported = match self.init.as_mut() {
            None => status,
            Some((sock, record)) => {
                // The init wrote its record before it exited: it is in the
                // socket's buffer (or was read with the answer), followed
                // by end of file.
                let _ = tokio::time::timeout(INIT_RECORD_LIMIT, sock.read_to_end(record)).await;
                match record.as_slice() {
                    [STATUS, raw @ ..] if raw.len() == 4 => {
                        ExitStatus::from_raw(i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
                    }
                    // Killed (a timeout's SIGKILL, the OOM killer): the job
                    // died with it.
                    _ if status.signal().is_some() => status,
                    // An init that exited without the job's status: what
                    // the job did is unknown, never taken for a success.
                    _ => {
                        return Err(io::Error::other(format!(
                            "the job's init ended ({status}) without reporting how the job ended"
                        )))
                    }
                }
            }
        };
        self.init = None;
        self.reported = Some(reported);
        Ok(reported)
    }
}

/// The fields of `/proc/PID/stat` the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// A zombie has exited and only waits to be reaped.
    pub zombie: bool,
    pub pgrp: i32,
    pub start_time: u64,
}

/// Reads `/proc/PID/stat`; `None` when the process is gone.
pub fn process_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'. Then: state ppid pgrp session ... starttime (22nd).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        zombie: *fields.first()? == "Z",
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Kills what is left of a job group from a previous run of the agent:
/// every process in group `pgid` that started no earlier than the job's
/// leader did. If a process now holds the leader's pid with another start
/// time, the id has been reused and nothing is killed. Returns how many
/// processes were signalled.
pub fn kill_orphaned_group(pgid: i32, leader_start_time: u64) -> usize {
    if let Some(leader) = process_stat(pgid) {
        if leader.start_time != leader_start_time {
            return 0;
        }
    }
    let members = group_members(pgid, leader_start_time);
    if !members.is_empty() {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        // SIGKILL is not instant: wait (bounded) until the group is gone, so
        // its message is not released while its job still runs.
        for _ in 0..500 {
            if group_members(pgid, leader_start_time).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    members.len()
}

/// Pids of live processes in group `pgid` started at or after `since`.
pub fn group_members(pgid: i32, since: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            process_stat(*pid).is_some_and(|s| !s.zombie && s.pgrp == pgid && s.start_time >= since)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_launcher_that_dies_silently_is_never_taken_for_a_running_job() {
        assert_eq!(parse_reply(b""), Reply::Died);
        assert_eq!(parse_reply(&[READY]), Reply::Running);
        // An init's answer, alone or with the status of a job that ended
        // at once read in the same chunk.
        assert_eq!(parse_reply(&[RUNNING]), Reply::RunningUnderInit);
        assert_eq!(
            parse_reply(&[RUNNING, STATUS, 0, 1, 0, 0]),
            Reply::RunningUnderInit
        );
        assert_eq!(
            parse_reply(b"work-dir\tentering work dir /w: No such file or directory"),
            Reply::Refused {
                step: "work-dir".into(),
                message: "entering work dir /w: No such file or directory".into()
            }
        );
        let mut after_ready = vec![READY];
        after_ready.extend_from_slice(b"exec\tcommand not found: nope");
        assert_eq!(
            parse_reply(&after_ready),
            Reply::Refused {
                step: "exec".into(),
                message: "command not found: nope".into()
            }
        );
    }

    #[test]
    fn stat_parsing_survives_parentheses_and_spaces_in_the_command_name() {
        let line = "4242 (my (odd) job) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        let s = parse_stat(line).expect("valid stat line");
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn stat_of_this_process_names_its_group() {
        let me = std::process::id() as i32;
        let s = process_stat(me).expect("own stat readable");
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw());
        assert!(s.start_time > 0);
    }

    #[test]
    fn orphaned_group_with_a_reused_leader_pid_is_left_alone() {
        // Our own pid with a start time that is not ours: looks reused.
        let me = std::process::id() as i32;
        let real = process_stat(me).expect("own stat").start_time;
        assert_eq!(kill_orphaned_group(me, real + 1), 0);
    }

    #[tokio::test]
    async fn orphaned_group_is_killed_including_its_children() {
        // A stand-in for a job left behind by a crashed agent: a shell that
        // leads its own group and has a child.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 300 & sleep 300"])
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let pgid = child.id() as i32;
        let start = loop {
            if let Some(s) = process_stat(pgid) {
                if group_members(pgid, s.start_time).len() >= 2 {
                    break s.start_time;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert!(kill_orphaned_group(pgid, start) >= 2);
        let status = child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        for _ in 0..200 {
            if group_members(pgid, start).is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("group {pgid} still has members after SIGKILL");
    }
}
