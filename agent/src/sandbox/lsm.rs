//! The job's Landlock ruleset, a second wall behind the read-only mounts:
//! the job may read and execute anywhere it can see, but write only in its
//! work dir, /tmp, /var/tmp and /dev/shm (and to the device nodes of its
//! /dev). Where the kernel's Landlock ABI supports it, the job also cannot
//! signal processes outside its domain or reach abstract Unix sockets
//! outside it. Best effort over the ABI the kernel has (1 to 7 here); a
//! kernel without Landlock leaves this layer off, which the caller is told.

use std::path::Path;

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    Scope, ABI,
};

use super::steps::{Step, StepError};

/// The newest ABI whose rights this ruleset asks for.
const ABI_WANTED: ABI = ABI::V6;

/// How much of the ruleset the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    Fully,
    Partly,
    Not,
}

/// Restricts this process (and what it execs) for good.
pub fn restrict(
    work_dir: &Path,
    writable_too: &[std::path::PathBuf],
) -> Result<Enforced, StepError> {
    let err = |e: landlock::RulesetError| StepError::new(Step::Landlock, e.to_string());
    let read = AccessFs::from_read(ABI_WANTED);
    let all = AccessFs::from_all(ABI_WANTED);
    let devices = read | AccessFs::WriteFile | AccessFs::IoctlDev;
    let writable = [
        work_dir,
        Path::new("/tmp"),
        Path::new("/var/tmp"),
        Path::new("/dev/shm"),
    ];
    let status = Ruleset::default()
        .handle_access(all)
        .map_err(err)?
        .scope(Scope::Signal | Scope::AbstractUnixSocket)
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], read))
        .map_err(err)?
        .add_rules(path_beneath_rules(["/dev"], devices))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            writable.iter().filter(|p| p.exists()),
            all,
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(writable_too, all))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partly,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}
