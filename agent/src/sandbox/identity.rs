//! Who the job is and what it inherits: resource limits, descriptors, the
//! OOM score, and the change from root to the slot's unprivileged uid with
//! every capability set empty and `no_new_privs` (in an ordinary user's
//! user namespace: from the namespace's capabilities to none, keeping the
//! user's own uid).

use std::path::Path;

use nix::errno::Errno;
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid};

use super::steps::{Step, StepError};
use super::Privilege;

/// Open files a job may have (soft and hard), at most.
pub const NOFILE: u64 = 65_536;

/// `_LINUX_CAPABILITY_VERSION_3` and its two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The agent may run with `OOMScoreAdjust=-1000`; a job must be the OOM
/// killer's fair game, never shielded by the agent's protection. An
/// ordinary user may only raise the score, so in a user namespace a score
/// of 0 or more (no shield) is left as it is.
pub fn reset_oom_score(privilege: Privilege) -> Result<(), StepError> {
    let path = Path::new("/proc/self/oom_score_adj");
    if privilege == Privilege::UserNamespace {
        let current = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if current.is_some_and(|score| score >= 0) {
            return Ok(());
        }
    }
    std::fs::write(path, b"0").map_err(|e| {
        StepError::sys(
            Step::OomScore,
            "writing 0 to",
            path,
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        )
    })
}

/// No core dumps (they may hold secrets and fill the disk), a bounded
/// number of open files, and files no larger than `max_file_bytes`.
pub fn set_rlimits(max_file_bytes: Option<u64>) -> Result<(), StepError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| StepError::errno(Step::Rlimits, "setting RLIMIT_CORE to 0", e))?;
    if let Some(bytes) = max_file_bytes {
        setrlimit(Resource::RLIMIT_FSIZE, bytes, bytes).map_err(|e| {
            StepError::errno(Step::Rlimits, format!("setting RLIMIT_FSIZE to {bytes}"), e)
        })?;
    }
    // Never above what the agent has: raising a hard limit past the
    // kernel's fs.nr_open fails even for root.
    let (_, hard) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| StepError::errno(Step::Rlimits, "reading RLIMIT_NOFILE", e))?;
    let nofile = NOFILE.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile).map_err(|e| {
        StepError::errno(
            Step::Rlimits,
            format!("setting RLIMIT_NOFILE to {nofile}"),
            e,
        )
    })
}

/// Every descriptor from 3 up closes at `execve`, whatever leaked into the
/// launcher (Linux 5.11's `close_range`).
pub fn close_inherited_descriptors() -> Result<(), StepError> {
    // SAFETY: close_range only changes flags of this process's descriptors.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(StepError::errno(
            Step::Descriptors,
            "marking inherited descriptors close-on-exec (Linux 5.11 or later is needed)",
            Errno::last(),
        ));
    }
    Ok(())
}

/// Root to `uid`/`gid` for good: the bounding and ambient sets emptied
/// first (that needs the capabilities about to go), then no supplementary
/// groups, the gid, the uid, then effective, permitted and inheritable
/// emptied, then `no_new_privs`. Checked afterwards: a change that did not
/// take refuses the job.
///
/// In a user namespace (`privilege` is [`Privilege::UserNamespace`]) the
/// process already is `uid`/`gid`, with the namespace's capabilities: the
/// same steps empty them, but the supplementary groups stay the user's,
/// because an unprivileged namespace must deny `setgroups` to map a gid.
pub fn become_unprivileged(uid: u32, gid: u32, privilege: Privilege) -> Result<(), StepError> {
    if uid == 0 || gid == 0 {
        return Err(StepError::new(
            Step::Identity,
            "refusing to run a job as root",
        ));
    }
    let step = |what: &str| {
        let what = what.to_string();
        move |e: Errno| StepError::errno(Step::Identity, what, e)
    };
    // SAFETY: prctl with integer arguments only changes this process's
    // capability sets.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(step("clearing the ambient capabilities")(Errno::last()));
    }
    for cap in 0..=last_capability() {
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = Errno::last();
            // A capability this kernel does not know: the set ends here.
            if e == Errno::EINVAL {
                break;
            }
            return Err(step(&format!(
                "dropping capability {cap} from the bounding set"
            ))(e));
        }
    }
    if privilege == Privilege::Root {
        nix::unistd::setgroups(&[]).map_err(step("dropping supplementary groups"))?;
    }
    let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
    nix::unistd::setresgid(g, g, g).map_err(step(&format!("changing to gid {gid}")))?;
    nix::unistd::setresuid(u, u, u).map_err(step(&format!("changing to uid {uid}")))?;
    set_capabilities([CapData::default(); 2]).map_err(step("emptying the capability sets"))?;
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step("setting no_new_privs")(Errno::last()));
    }
    check_unprivileged(uid, gid)
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        // Past the last one PR_CAPBSET_DROP says EINVAL, which ends the loop.
        .unwrap_or(63)
}

fn set_capabilities(data: [CapData; 2]) -> Result<(), Errno> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads the header and two data words for the call only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn capabilities() -> Result<[CapData; 2], Errno> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two data words into `data`, which is that big.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(data)
}

/// Fails closed unless every id is the job's and every set is empty.
fn check_unprivileged(uid: u32, gid: u32) -> Result<(), StepError> {
    let (ruid, euid, suid) = {
        let r = nix::unistd::getresuid()
            .map_err(|e| StepError::errno(Step::Identity, "reading the uids", e))?;
        (r.real.as_raw(), r.effective.as_raw(), r.saved.as_raw())
    };
    let (rgid, egid, sgid) = {
        let r = nix::unistd::getresgid()
            .map_err(|e| StepError::errno(Step::Identity, "reading the gids", e))?;
        (r.real.as_raw(), r.effective.as_raw(), r.saved.as_raw())
    };
    if [ruid, euid, suid] != [uid; 3] || [rgid, egid, sgid] != [gid; 3] {
        return Err(StepError::new(
            Step::Identity,
            format!("the uid/gid change did not take: uids {ruid}/{euid}/{suid}, gids {rgid}/{egid}/{sgid}"),
        ));
    }
    let caps = capabilities()
        .map_err(|e| StepError::errno(Step::Identity, "reading the capability sets", e))?;
    if caps
        .iter()
        .any(|c| c.effective | c.permitted | c.inheritable != 0)
    {
        return Err(StepError::new(
            Step::Identity,
            "capabilities remain after the uid change",
        ));
    }
    Ok(())
}
