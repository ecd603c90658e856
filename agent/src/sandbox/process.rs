//! The agent side of the launch path: start a launcher, hand it the plan,
//! learn whether the job is running or why it was refused, and signal or
//! reap the job's whole process group. Also finds and kills the process
//! groups that a previous, crashed run of the agent left behind.
//!
//! It never forks the runtime itself: the launcher is started with
//! `posix_spawn` (what the standard library uses when no `pre_exec` hook is
//! set), so the cost of a launch does not grow with the agent's memory.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdout};

use super::launcher::READY;
use super::{LaunchPlan, LAUNCHER_ARG};

/// Longest a launcher may take to apply its steps (a hung mount in `chdir`,
/// say) before the attempt is given up as the agent's fault.
const PLAN_EXCHANGE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How to start launchers. In production it is the running binary itself.
#[derive(Debug, Clone)]
pub struct Launcher {
    program: PathBuf,
}

impl Default for Launcher {
    fn default() -> Self {
        // /proc/self/exe still works after a package upgrade replaced the
        // file on disk, so a running agent always launches its own code.
        Launcher {
            program: PathBuf::from("/proc/self/exe"),
        }
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

/// A running job: the leader of its own session and process group.
#[derive(Debug)]
pub struct JobProcess {
    pid: Pid,
    start_time: u64,
    child: Child,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

impl Launcher {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Launcher {
            program: program.into(),
        }
    }

    /// Starts a launcher that waits for its plan. The job cannot run any of
    /// its own code before `Spawned::start`, so the caller can first record
    /// the pid where crash recovery will find it. Dropping a `Spawned`
    /// without starting it makes the launcher exit.
    pub fn spawn(&self) -> Result<Spawned, LaunchError> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(LaunchError::Protocol)?;
        let mut child = tokio::process::Command::new(&self.program)
            .arg(LAUNCHER_ARG)
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let Some(pid) = child.id().map(|id| Pid::from_raw(id as i32)) else {
            let _ = child.start_kill();
            return Err(LaunchError::Protocol(io::Error::other(
                "launcher exited at once",
            )));
        };
        // The start time of a process survives execve, so this is also the
        // job's; it tells the job apart from a later process reusing the pid.
        // Without it, a crash would leave a job the next start cannot tell
        // from a later process with the same pid: refuse to run it.
        let Some(start_time) = process_stat(pid.as_raw()).map(|s| s.start_time) else {
            let _ = child.start_kill();
            return Err(LaunchError::Protocol(io::Error::other(format!(
                "cannot read /proc/{pid}/stat of the launcher: the agent could not find the job again after a crash, so it is not started"
            ))));
        };
        Ok(Spawned {
            pid,
            start_time,
            child,
            plan_socket: ours,
        })
    }
}

/// A launcher waiting for its plan.
#[derive(Debug)]
pub struct Spawned {
    pid: Pid,
    start_time: u64,
    child: Child,
    plan_socket: std::os::unix::net::UnixStream,
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
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(LaunchError::Protocol(e));
            }
        };
        match parse_reply(&reply) {
            Reply::Running => {}
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
        }
        Ok(JobProcess {
            pid,
            start_time,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
        })
    }
}

/// What the launcher's report says (protocol in `launcher.rs`).
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Running,
    Died,
    Refused { step: String, message: String },
}

fn parse_reply(reply: &[u8]) -> Reply {
    let text = match reply {
        [READY] => return Reply::Running,
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

async fn exchange_plan(
    ours: std::os::unix::net::UnixStream,
    plan: &LaunchPlan,
) -> io::Result<Vec<u8>> {
    ours.set_nonblocking(true)?;
    let mut sock = tokio::net::UnixStream::from_std(ours)?;
    let body = serde_json::to_vec(plan).map_err(io::Error::other)?;
    sock.write_all(&body).await?;
    sock.shutdown().await?;
    let mut reply = Vec::new();
    sock.read_to_end(&mut reply).await?;
    Ok(reply)
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

    /// Waits for the job's leader to exit (reaping it).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
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
