//! The job's seccomp filter: a deny list at least as strict as Docker's
//! default profile for what an unprivileged job has no business doing
//! (mounting, namespaces, tracing, BPF, kernel keys and modules, clocks,
//! swap, reboot, ...), answered with EPERM so programs that probe a
//! feature degrade instead of dying. Compiled with Firecracker's
//! `seccompiler`; two small filters of our own sit beside it: `clone3`
//! answers ENOSYS (its flags live in memory a filter cannot read, and
//! ENOSYS makes the C library fall back to `clone`, whose namespace flags
//! are checked), and on x86_64 the x32 system call numbers are refused.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::steps::{Step, StepError};

/// Denied outright, on every architecture.
const DENIED: &[libc::c_long] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_adjtimex,
    libc::SYS_bpf,
    libc::SYS_chroot,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_init_module,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_kcmp,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_process_madvise,
    libc::SYS_quotactl_fd,
    libc::SYS_fanotify_init,
    libc::SYS_mbind,
    libc::SYS_set_mempolicy,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
    libc::SYS_pidfd_getfd,
    libc::SYS_pivot_root,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_ptrace,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_setdomainname,
    libc::SYS_sethostname,
    libc::SYS_setns,
    libc::SYS_settimeofday,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_syslog,
    libc::SYS_umount2,
    libc::SYS_unshare,
    libc::SYS_userfaultfd,
    libc::SYS_vhangup,
];

/// Denied on x86_64 only (the others have no such calls).
#[cfg(target_arch = "x86_64")]
const DENIED_ARCH: &[libc::c_long] = &[
    libc::SYS_ioperm,
    libc::SYS_iopl,
    libc::SYS_nfsservctl,
    libc::SYS_uselib,
    libc::SYS__sysctl,
];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_ARCH: &[libc::c_long] = &[];

/// `clone` flags that would make a namespace: refused with EPERM.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    0x80, // CLONE_NEWTIME
];

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// `AUDIT_ARCH_X86_64`, checked before the x32 test.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
/// The bit that marks an x32 system call number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The filters, in the order they are installed; compiled once per
/// process. The fork server compiles them before its first fork, so every
/// launcher forked from it has them without compiling again.
pub fn filters() -> Result<&'static [BpfProgram], StepError> {
    static COMPILED: std::sync::OnceLock<Result<Vec<BpfProgram>, String>> =
        std::sync::OnceLock::new();
    COMPILED
        .get_or_init(|| compile().map_err(|e| e.message))
        .as_deref()
        .map_err(|message| StepError::new(Step::Seccomp, message.clone()))
}

fn compile() -> Result<Vec<BpfProgram>, StepError> {
    let compile_err = |e: seccompiler::BackendError| {
        StepError::new(Step::Seccomp, format!("compiling the filter: {e}"))
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in DENIED.iter().chain(DENIED_ARCH) {
        rules.insert(*nr, Vec::new());
    }
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        let flag = *flag as u64;
        let condition = SeccompCondition::new(
            CLONE_FLAGS_ARG,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(compile_err)?;
        clone_rules.push(SeccompRule::new(vec![condition]).map_err(compile_err)?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // socket() of any family but these (vsock reaches the hypervisor
    // whatever the network namespace; AF_ALG, AF_KEY and the rest are
    // kernel attack surface a batch job does not need).
    let not = |arg: u8, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, value)
    };
    let families = [
        libc::AF_UNIX,
        libc::AF_INET,
        libc::AF_INET6,
        libc::AF_NETLINK,
    ]
    .iter()
    .map(|f| not(0, *f as u64))
    .collect::<Result<Vec<_>, _>>()
    .map_err(compile_err)?;
    // SCTP's connect never passes the cgroup connect hooks that keep an
    // egress job from the instance metadata (`egress.rs`).
    let sctp = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::IPPROTO_SCTP as u64,
    )
    .map_err(compile_err)?;
    rules.insert(
        libc::SYS_socket,
        vec![
            SeccompRule::new(families).map_err(compile_err)?,
            SeccompRule::new(vec![sctp]).map_err(compile_err)?,
        ],
    );
    // personality() only to query or to the values Docker allows (Linux,
    // 32-bit and UNAME26 emulation): no READ_IMPLIES_EXEC, no ADDR_NO_RANDOMIZE.
    let personas = [0u64, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff]
        .iter()
        .map(|p| not(0, *p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(compile_err)?;
    rules.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(personas).map_err(compile_err)?],
    );
    // Terminal input injection, should a job ever hold a tty.
    // TIOCSTI and TIOCLINUX (the same on every architecture the agent runs on).
    let tty_rules = [0x5412u64, 0x541C]
        .iter()
        .map(|req| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *req)
                .map_err(compile_err)?;
            SeccompRule::new(vec![cond]).map_err(compile_err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, tty_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        ARCH,
    )
    .map_err(compile_err)?;
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )
    .map_err(compile_err)?;
    let mut all = vec![
        BpfProgram::try_from(deny).map_err(compile_err)?,
        BpfProgram::try_from(clone3).map_err(compile_err)?,
    ];
    #[cfg(target_arch = "x86_64")]
    all.push(x32_filter());
    Ok(all)
}

/// The argument of `clone` that holds its flags: the first everywhere the
/// agent runs.
const CLONE_FLAGS_ARG: u8 = 0;

/// x32 calls share x86_64's audit arch with a high bit in the number; a
/// deny list by number would miss them.
#[cfg(target_arch = "x86_64")]
fn x32_filter() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data.arch is at offset 4; nr at 0.
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 0, 2, AUDIT_ARCH),
        op(LD_W_ABS, 0, 0, 0),
        op(JGE_K, 1, 0, X32_SYSCALL_BIT),
        op(RET_K, 0, 0, RET_ALLOW),
        op(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
    ]
}

/// Installs the filters on this thread (needs `no_new_privs` first).
pub fn install(filters: &[BpfProgram]) -> Result<(), StepError> {
    for filter in filters {
        seccompiler::apply_filter(filter)
            .map_err(|e| StepError::new(Step::Seccomp, format!("installing the filter: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_and_every_denied_call_is_a_distinct_number() {
        let filters = filters().expect("filters compile");
        assert!(filters.len() >= 2);
        let mut seen = std::collections::BTreeSet::new();
        for nr in DENIED.iter().chain(DENIED_ARCH) {
            assert!(seen.insert(*nr), "system call {nr} listed twice");
        }
    }

    /// In a forked child (the filter is for life): denied calls fail with
    /// EPERM, clone3 with ENOSYS, a plain fork still works.
    #[test]
    fn a_filtered_process_cannot_unshare_or_mount_but_can_fork() {
        let filters = filters().expect("filters compile");
        crate::sandbox::in_forked_child(|| {
            // SAFETY: integer-only prctl.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return 10;
            }
            if install(filters).is_err() {
                return 11;
            }
            let errno = || std::io::Error::last_os_error().raw_os_error();
            // SAFETY: unshare(0) and a bad mount take no pointers we own.
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != -1 || errno() != Some(libc::EPERM) {
                return 12;
            }
            // SAFETY: as above; all-null arguments.
            let r = unsafe {
                libc::mount(
                    std::ptr::null(),
                    std::ptr::null(),
                    std::ptr::null(),
                    0,
                    std::ptr::null(),
                )
            };
            if r != -1 || errno() != Some(libc::EPERM) {
                return 13;
            }
            // SAFETY: socket() returns a descriptor or -1; none is kept.
            let vsock = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
            if vsock != -1 || errno() != Some(libc::EPERM) {
                return 16;
            }
            // SAFETY: as above; closed at once.
            let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            if inet < 0 {
                return 17;
            }
            // SAFETY: our own descriptor from the line above.
            unsafe { libc::close(inet) };
            // SAFETY: personality(ADDR_NO_RANDOMIZE) changes nothing when refused.
            if unsafe { libc::personality(0x0040000) } != -1 || errno() != Some(libc::EPERM) {
                return 18;
            }
            // SAFETY: clone3 with a null argument is refused by the filter first.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            if r != -1 || errno() != Some(libc::ENOSYS) {
                return 14;
            }
            // SAFETY: a plain fork whose child exits at once.
            match unsafe { libc::fork() } {
                // SAFETY: the grandchild leaves at once.
                0 => unsafe { libc::_exit(0) },
                -1 => return 15,
                pid => {
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                }
            }
            0
        });
    }
}
