//! The job's seccomp filter: a deny list at least as strict as Docker's
//! default profile for what an unprivileged job has no business doing
//! (mounting, namespaces, tracing, BPF, kernel keys and modules, clocks,
//! swap, reboot, ...), answered with EPERM so programs that probe a
//! feature degrade instead of dying. `clone3` answers ENOSYS (its flags
//! live in memory a filter cannot read, and ENOSYS makes the C library
//! fall back to `clone`, whose namespace flags are checked); on x86_64 the
//! x32 system call numbers are refused; any other architecture kills.
//!
//! One program (`bpf.rs`) built from the tables below, compiled once by the
//! fork server: the kernel checks and JITs it again for every job, so it is
//! kept short, and the calls it always allows it lets the kernel skip.

use std::collections::BTreeMap;

use super::bpf::{self, ArgRule, ArgTest, Policy, Ret, Rule};
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

/// The socket families a job may open (vsock reaches the hypervisor
/// whatever the network namespace; AF_ALG, AF_KEY and the rest are kernel
/// attack surface a batch job does not need).
const SOCKET_FAMILIES: &[libc::c_int] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// The `personality` values Docker allows (Linux, 32-bit and UNAME26
/// emulation) and the query: no READ_IMPLIES_EXEC, no ADDR_NO_RANDOMIZE.
const PERSONAS: &[u32] = &[0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

/// Terminal input injection, should a job ever hold a tty: TIOCSTI and
/// TIOCLINUX (the same on every architecture the agent runs on).
const TTY_INJECTION: &[u32] = &[0x5412, 0x541C];

/// The argument of `clone` that holds its flags: the first everywhere the
/// agent runs.
const CLONE_FLAGS_ARG: u8 = 0;

/// An architecture the filter is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Arch {
    /// Its `AUDIT_ARCH_*` (linux/audit.h).
    audit: u32,
    /// Whether x32 numbers (this bit set) come in under the same audit arch.
    x32_bit: Option<u32>,
}

impl Arch {
    // Either is built on the other architecture too, by the tests.
    #[cfg_attr(not(any(test, target_arch = "x86_64")), allow(dead_code))]
    const X86_64: Arch = Arch {
        audit: 0xC000_003E,
        x32_bit: Some(0x4000_0000),
    };
    #[cfg_attr(not(any(test, target_arch = "aarch64")), allow(dead_code))]
    const AARCH64: Arch = Arch {
        audit: 0xC000_00B7,
        x32_bit: None,
    };
}

#[cfg(target_arch = "x86_64")]
const HOST: Arch = Arch::X86_64;
#[cfg(target_arch = "aarch64")]
const HOST: Arch = Arch::AARCH64;

const EPERM: Ret = Ret::Errno(libc::EPERM as u16);

/// The filter's policy for `arch` (with this build's system call numbers).
fn policy(arch: Arch) -> Policy {
    let mut rules = BTreeMap::new();
    for nr in DENIED.iter().chain(DENIED_ARCH) {
        rules.insert(*nr as u32, Rule::Always(EPERM));
    }
    rules.insert(
        libc::SYS_clone3 as u32,
        Rule::Always(Ret::Errno(libc::ENOSYS as u16)),
    );
    let namespaces = NAMESPACE_FLAGS.iter().fold(0u32, |all, f| all | *f as u32);
    rules.insert(
        libc::SYS_clone as u32,
        Rule::Args {
            rules: vec![ArgRule {
                arg: CLONE_FLAGS_ARG,
                test: ArgTest::AnyBitOf(namespaces),
                then: EPERM,
            }],
            otherwise: Ret::Allow,
        },
    );
    rules.insert(
        libc::SYS_socket as u32,
        Rule::Args {
            rules: vec![
                ArgRule {
                    arg: 0,
                    test: ArgTest::NoneOf(SOCKET_FAMILIES.iter().map(|f| *f as u32).collect()),
                    then: EPERM,
                },
                // SCTP's connect never passes the cgroup connect hooks that
                // keep an egress job from the instance metadata (`egress.rs`).
                ArgRule {
                    arg: 2,
                    test: ArgTest::Equals(libc::IPPROTO_SCTP as u32),
                    then: EPERM,
                },
            ],
            otherwise: Ret::Allow,
        },
    );
    rules.insert(
        libc::SYS_personality as u32,
        Rule::Args {
            rules: vec![ArgRule {
                arg: 0,
                test: ArgTest::NoneOf(PERSONAS.to_vec()),
                then: EPERM,
            }],
            otherwise: Ret::Allow,
        },
    );
    rules.insert(
        libc::SYS_ioctl as u32,
        Rule::Args {
            rules: TTY_INJECTION
                .iter()
                .map(|request| ArgRule {
                    arg: 1,
                    test: ArgTest::Equals(*request),
                    then: EPERM,
                })
                .collect(),
            otherwise: Ret::Allow,
        },
    );
    Policy {
        audit_arch: arch.audit,
        wrong_arch: Ret::KillProcess,
        // x32 calls share x86_64's audit arch with a high bit in the
        // number; a deny list by number would miss them.
        numbers_from: arch.x32_bit.map(|bit| (bit, EPERM)),
        rules,
        default: Ret::Allow,
    }
}

/// The filter, compiled once per process. The fork server compiles it
/// before its first fork, so every launcher forked from it has it without
/// compiling again.
pub fn filter() -> Result<&'static [libc::sock_filter], StepError> {
    static COMPILED: std::sync::OnceLock<Result<bpf::Program, String>> = std::sync::OnceLock::new();
    COMPILED
        .get_or_init(|| {
            bpf::compile(&policy(HOST)).map_err(|e| format!("compiling the filter: {e}"))
        })
        .as_deref()
        .map_err(|message| StepError::new(Step::Seccomp, message.clone()))
}

/// Installs the filter on this thread (needs `no_new_privs` first).
pub fn install(program: &[libc::sock_filter]) -> Result<(), StepError> {
    let len = u16::try_from(program.len())
        .map_err(|_| StepError::new(Step::Seccomp, "the filter is too long to install"))?;
    let fprog = libc::sock_fprog {
        len,
        // The kernel only reads the program (it copies it in).
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: seccomp(SET_MODE_FILTER) reads `fprog` and the `len`
    // instructions it points at, both alive for the whole call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(StepError::new(
            Step::Seccomp,
            format!("installing the filter: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sandbox::bpf::interpret::{always_allows, check, run, run_all, Data};

    #[test]
    fn the_filter_compiles_and_every_denied_call_is_a_distinct_number() {
        let program = filter().expect("the filter compiles");
        check(program).expect("well formed");
        let mut seen = std::collections::BTreeSet::new();
        for nr in DENIED.iter().chain(DENIED_ARCH) {
            assert!(seen.insert(*nr), "system call {nr} listed twice");
        }
    }

    /// The three filters the agent used to install, compiled by Firecracker's
    /// `seccompiler` from the same tables: the reference the one program
    /// must answer exactly like.
    mod reference {
        use std::collections::BTreeMap;

        use seccompiler::{
            BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
            SeccompFilter, SeccompRule, TargetArch,
        };

        use super::super::*;

        fn as_libc(program: BpfProgram) -> Vec<libc::sock_filter> {
            program
                .iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect()
        }

        /// The filters in the order they were installed.
        pub fn filters(arch: Arch) -> Vec<Vec<libc::sock_filter>> {
            let target = if arch == Arch::X86_64 {
                TargetArch::x86_64
            } else {
                TargetArch::aarch64
            };
            let cond = |arg, len, op, value| {
                SeccompCondition::new(arg, len, op, value).expect("a valid condition")
            };
            let rule = |conds| SeccompRule::new(conds).expect("a valid rule");
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
            for nr in DENIED.iter().chain(DENIED_ARCH) {
                rules.insert(*nr, Vec::new());
            }
            let clone_rules = NAMESPACE_FLAGS
                .iter()
                .map(|flag| {
                    let flag = *flag as u64;
                    rule(vec![cond(
                        CLONE_FLAGS_ARG,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::MaskedEq(flag),
                        flag,
                    )])
                })
                .collect();
            rules.insert(libc::SYS_clone, clone_rules);
            let not = |arg, value: u64| cond(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, value);
            let families = SOCKET_FAMILIES.iter().map(|f| not(0, *f as u64)).collect();
            let sctp = cond(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::IPPROTO_SCTP as u64,
            );
            rules.insert(libc::SYS_socket, vec![rule(families), rule(vec![sctp])]);
            let personas = PERSONAS.iter().map(|p| not(0, u64::from(*p))).collect();
            rules.insert(libc::SYS_personality, vec![rule(personas)]);
            let tty = TTY_INJECTION
                .iter()
                .map(|req| {
                    rule(vec![cond(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        u64::from(*req),
                    )])
                })
                .collect();
            rules.insert(libc::SYS_ioctl, tty);
            let compiled = |rules, errno: i32| {
                let filter = SeccompFilter::new(
                    rules,
                    SeccompAction::Allow,
                    SeccompAction::Errno(errno as u32),
                    target,
                )
                .expect("a valid filter");
                as_libc(BpfProgram::try_from(filter).expect("compiles"))
            };
            let mut clone3 = BTreeMap::new();
            clone3.insert(libc::SYS_clone3, Vec::new());
            let mut all = vec![compiled(rules, libc::EPERM), compiled(clone3, libc::ENOSYS)];
            if let Some(bit) = arch.x32_bit {
                all.push(x32_filter(arch.audit, bit));
            }
            all
        }

        /// The hand-written x32 refusal the agent installed third.
        fn x32_filter(audit: u32, bit: u32) -> Vec<libc::sock_filter> {
            let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
            vec![
                op(0x20, 0, 0, 4),
                op(0x15, 0, 2, audit),
                op(0x20, 0, 0, 0),
                op(0x35, 1, 0, bit),
                op(0x06, 0, 0, libc::SECCOMP_RET_ALLOW),
                op(0x06, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            ]
        }
    }

    /// Argument values worth trying: each interesting one alone, with its
    /// neighbours, with the high half set, and a few mixtures.
    fn interesting_values() -> Vec<u64> {
        let mut low: Vec<u64> = vec![0, 1, 2, 0xffff_ffff, 0x7fff_ffff, 0x8000_0000];
        low.extend(NAMESPACE_FLAGS.iter().map(|f| *f as u64));
        low.push(NAMESPACE_FLAGS.iter().fold(0u64, |all, f| all | *f as u64));
        low.push(libc::SIGCHLD as u64);
        low.push((libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::SIGCHLD) as u64);
        low.push((libc::CLONE_NEWNET | libc::SIGCHLD) as u64);
        // Socket families and other small numbers.
        low.extend(0..=50u64);
        low.extend([libc::IPPROTO_SCTP, libc::IPPROTO_TCP, libc::IPPROTO_UDP].map(|p| p as u64));
        low.extend(PERSONAS.iter().map(|p| u64::from(*p)));
        low.extend([0x0040000, 0x0400000, 0x0020_0000, 0x0008_0008, 0x0002_0001]);
        low.extend(TTY_INJECTION.iter().flat_map(|r| {
            let r = u64::from(*r);
            [r - 1, r, r + 1]
        }));
        let mut all = low.clone();
        all.extend(low.iter().map(|v| v | 0xffff_ffff_0000_0000));
        all.extend(low.iter().map(|v| v | 1 << 32));
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Every call number 0 to 1024, the same with the x32 bit, numbers at
    /// the top of the range, and for the calls with argument rules every
    /// interesting value in each argument they test: the one program gives
    /// exactly the answer of the three filters it replaces, on both
    /// architectures, and for a wrong architecture too.
    #[test]
    fn the_one_program_answers_every_call_like_the_three_filters_it_replaces() {
        let values = interesting_values();
        let checked_args = [
            libc::SYS_clone,
            libc::SYS_socket,
            libc::SYS_personality,
            libc::SYS_ioctl,
        ]
        .map(|nr| nr as u32);
        for arch in [Arch::X86_64, Arch::AARCH64] {
            let program = bpf::compile(&policy(arch)).expect("compiles");
            check(&program).expect("well formed");
            let old = reference::filters(arch);
            let old: Vec<&[libc::sock_filter]> = old.iter().map(Vec::as_slice).collect();
            let old_len: usize = old.iter().map(|p| p.len()).sum();
            assert!(
                program.len() * 2 < old_len,
                "{} instructions against {old_len}",
                program.len()
            );
            let numbers = (0..=1024u32)
                .chain((0..=1024).map(|nr| nr | 0x4000_0000))
                .chain([
                    0x3fff_ffff,
                    0x8000_0000,
                    0xc000_0000,
                    u32::MAX - 1,
                    u32::MAX,
                ]);
            let mut compared = 0u64;
            for nr in numbers {
                for audit in [
                    arch.audit,
                    Arch::X86_64.audit,
                    Arch::AARCH64.audit,
                    0x4000_0003,
                    0,
                ] {
                    let mut cases = vec![[0u64; 6], [u64::MAX; 6]];
                    if checked_args.contains(&nr) {
                        for arg in 0..3 {
                            for v in &values {
                                let mut args = [0u64; 6];
                                args[arg] = *v;
                                cases.push(args);
                                // With a socket family the rule lets through,
                                // the protocol decides.
                                args[0] = libc::AF_INET as u64;
                                cases.push(args);
                            }
                        }
                    }
                    for args in cases {
                        let data = Data {
                            nr,
                            arch: audit,
                            instruction_pointer: 0x7f00_0000_1000,
                            args,
                        };
                        assert_eq!(
                            run(&program, &data),
                            run_all(&old, &data),
                            "arch {:#x}, call {nr:#x}, args {args:x?}",
                            arch.audit
                        );
                        compared += 1;
                    }
                }
            }
            assert!(compared > 10_000, "only {compared} cases");
        }
    }

    /// The kernel skips the filter for the calls it can tell are always
    /// allowed; the program keeps every call without a rule that simple.
    #[test]
    fn every_call_without_a_rule_is_allowed_by_the_number_alone() {
        for arch in [Arch::X86_64, Arch::AARCH64] {
            let policy = policy(arch);
            let program = bpf::compile(&policy).expect("compiles");
            for nr in 0..=1024u32 {
                let plain = !policy.rules.contains_key(&nr);
                assert_eq!(
                    always_allows(&program, arch.audit, nr),
                    plain,
                    "arch {:#x}, call {nr}",
                    arch.audit
                );
            }
            assert!(!always_allows(&program, 0x4000_0003, 0), "another arch");
        }
    }

    /// In a forked child (the filter is for life): denied calls fail with
    /// EPERM, clone3 with ENOSYS, a plain fork still works.
    #[test]
    fn a_filtered_process_cannot_unshare_or_mount_but_can_fork() {
        let program = filter().expect("the filter compiles");
        crate::sandbox::in_forked_child(|| {
            // SAFETY: integer-only prctl.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return 10;
            }
            if install(program).is_err() {
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
