//! The launcher's steps, each named, and the typed error of one that
//! failed: which step, the path it was working on and the errno, so the
//! job's refusal says exactly what could not be set up.

use std::fmt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

/// Every step of the launch path, in the order the launcher applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Its own session and process group.
    Session,
    ReadPlan,
    ReportFd,
    Stdin,
    Signals,
    /// The user's uid and gid mapped to themselves in the launcher's own
    /// user namespace (an ordinary user's `dev` only).
    UserNamespace,
    /// `oom_score_adj` back to 0 (the agent may be protected from the OOM killer).
    OomScore,
    /// The job's view of the file system.
    Mounts,
    Hostname,
    Loopback,
    /// The init forks the job.
    Fork,
    Rlimits,
    /// Every inherited descriptor above 2 closes at `execve`.
    Descriptors,
    /// Bounding, ambient, effective, permitted and inheritable sets emptied;
    /// groups, gid and uid changed; `no_new_privs`.
    Identity,
    WorkDir,
    Landlock,
    Resolve,
    Seccomp,
    Report,
    Exec,
}

impl Step {
    /// The name on the wire and in the job's `job.failed` reason detail.
    /// `exec` alone marks the job's own fault (a missing command).
    pub fn name(self) -> &'static str {
        match self {
            Step::Session => "setsid",
            Step::ReadPlan => "read-plan",
            Step::ReportFd => "report-fd",
            Step::Stdin => "stdin",
            Step::Signals => "signals",
            Step::UserNamespace => "userns",
            Step::OomScore => "oom-score",
            Step::Mounts => "mounts",
            Step::Hostname => "hostname",
            Step::Loopback => "loopback",
            Step::Fork => "fork",
            Step::Rlimits => "rlimits",
            Step::Descriptors => "descriptors",
            Step::Identity => "identity",
            Step::WorkDir => "work-dir",
            Step::Landlock => "landlock",
            Step::Resolve => "exec",
            Step::Seccomp => "seccomp",
            Step::Report => "report",
            Step::Exec => "exec",
        }
    }
}

/// One failed step.
#[derive(Debug)]
pub struct StepError {
    pub step: Step,
    pub message: String,
    pub path: Option<PathBuf>,
    pub errno: Option<Errno>,
}

impl StepError {
    pub fn new(step: Step, message: impl Into<String>) -> Self {
        StepError {
            step,
            message: message.into(),
            path: None,
            errno: None,
        }
    }

    /// `message` failed on `path` with `errno`.
    pub fn sys(step: Step, message: impl Into<String>, path: &Path, errno: Errno) -> Self {
        StepError {
            step,
            message: message.into(),
            path: Some(path.to_path_buf()),
            errno: Some(errno),
        }
    }

    /// `message` failed with `errno`, on no particular path.
    pub fn errno(step: Step, message: impl Into<String>, errno: Errno) -> Self {
        StepError {
            step,
            message: message.into(),
            path: None,
            errno: Some(errno),
        }
    }

    /// The one line the agent receives: `step<TAB>message`.
    pub fn wire(&self) -> String {
        format!(
            "{}\t{}",
            self.step.name(),
            self.to_string().replace('\n', " ")
        )
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(path) = &self.path {
            write!(f, " {}", path.display())?;
        }
        if let Some(errno) = self.errno {
            write!(f, ": {} ({errno:?})", errno.desc())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_names_itself_its_path_and_its_errno_on_one_line() {
        let e = StepError::sys(
            Step::Mounts,
            "hiding",
            Path::new("/var/lib/batchly"),
            Errno::EPERM,
        );
        assert_eq!(
            e.wire(),
            "mounts\thiding /var/lib/batchly: Operation not permitted (EPERM)"
        );
        let e = StepError::new(Step::Resolve, "command not found: nope\nreally");
        assert_eq!(e.wire(), "exec\tcommand not found: nope really");
    }
}
