//! What keeps a job with `network: "egress"` from the instance's metadata
//! service and the ECS credential endpoint: 169.254.0.0/16, fd00:ec2::/32
//! and `::ffff:169.254.0.0/112`, whatever the protocol. Such a job shares
//! the agent's network namespace (that is how it reaches out), so the block
//! is in two independent layers, each enough on its own:
//!
//! - **BPF** (attached at start): four cgroup programs (connect4, connect6,
//!   sendmsg4, sendmsg6) on the unified cgroup every job is below and no
//!   agent process is in ([`cgroup::Hierarchy::egress_parent`]). They refuse
//!   a `connect` or a `sendmsg` to those ranges with `EPERM` for every
//!   process below, root included, in any network namespace. They are a
//!   few raw instructions loaded with the `bpf` system call (no compiler,
//!   no libbpf), attached with `BPF_F_ALLOW_MULTI` so nobody else's are
//!   displaced, and they stay attached after the agent exits: a restart
//!   finds them and attaches nothing twice.
//! - **nftables** (at the first egress job): a table of the agent's own,
//!   `inet batchly_egress`, rejecting packets to those ranges from sockets
//!   owned by the job uid range (`meta skuid`). It stays when the agent
//!   exits, too.
//!
//! An egress job runs when at least one layer is in place and is refused
//! with both reasons when neither is: it never runs with the metadata
//! reachable.
//!
//! [`cgroup::Hierarchy::egress_parent`]: super::cgroup::Hierarchy::egress_parent

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::UidRange;

/// The ranges an egress job cannot reach, as nftables writes them.
pub const BLOCKED_V4: &str = "169.254.0.0/16";
/// The EC2 range, and 169.254.0.0/16 written the three ways IPv6 can
/// carry it: IPv4-mapped, IPv4-compatible and NAT64's well-known prefix.
pub const BLOCKED_V6: [&str; 4] = [
    "fd00:ec2::/32",
    "::ffff:169.254.0.0/112",
    // In hex: nft reads neither in dotted form.
    "::a9fe:0/112",
    "64:ff9b::a9fe:0/112",
];

/// The agent's nftables table.
pub const NFT_TABLE: &str = "batchly_egress";

/// Longest `nft` may take to load the table.
const NFT_WAIT: Duration = Duration::from_secs(10);

/// How the instance metadata is kept from egress jobs on this host.
#[derive(Debug)]
pub struct MetadataBlock {
    /// The cgroup the programs are attached to, or why they are not.
    bpf: Result<PathBuf, String>,
    uids: UidRange,
    /// The nftables layer, set up at the first egress job.
    nft: tokio::sync::OnceCell<Result<String, String>>,
}

impl MetadataBlock {
    /// Attaches the BPF layer to `parent` (see the module's text); `None`
    /// is a host without a unified hierarchy. Never fails: what could not be
    /// set up is kept as the reason egress jobs would be refused.
    pub fn attach(parent: Option<&Path>, uids: UidRange) -> MetadataBlock {
        let bpf = match parent {
            None => Err("no cgroup2 (unified) hierarchy is mounted".to_string()),
            Some(dir) => attach_programs(dir).map(|()| dir.to_path_buf()),
        };
        match &bpf {
            Ok(dir) => {
                tracing::debug!(cgroup = %dir.display(), "metadata block: BPF programs attached")
            }
            Err(why) => tracing::warn!(
                "metadata block: no BPF layer ({why}); egress jobs rely on nftables alone"
            ),
        }
        MetadataBlock {
            bpf,
            uids,
            nft: tokio::sync::OnceCell::new(),
        }
    }

    /// Ready for an egress job: the layers in place, or why the job cannot
    /// have the network. nftables is set up at the first egress job; where
    /// it is the only layer it is loaded again before every one, since a
    /// firewall reload (`flush ruleset`) would otherwise leave nothing.
    pub async fn ready(&self) -> Result<(), String> {
        let uids = self.uids;
        if let Err(bpf) = &self.bpf {
            return load_nft_table(uids).await.map(drop).map_err(|nft| {
                format!(
                    "the job asks for network \"egress\", and this host can block the instance \
                     metadata from it by neither BPF ({bpf}) nor nftables ({nft})"
                )
            });
        }
        let nft = self
            .nft
            .get_or_init(|| async move {
                let loaded = load_nft_table(uids).await;
                match &loaded {
                    Ok(how) => tracing::info!("metadata block: {how}"),
                    Err(why) => tracing::warn!("metadata block: no nftables layer ({why})"),
                }
                loaded
            })
            .await;
        if let Err(why) = nft {
            tracing::debug!("egress job under the BPF layer alone ({why})");
        }
        Ok(())
    }
}

/// The nftables script that (re)defines the agent's chain for `uids`:
/// one transaction, so the chain is never seen half made, and one chain
/// per uid range, so agents with different ranges keep each other's.
pub fn nft_script(uids: UidRange) -> String {
    let chain = format!("out_{}_{}", uids.first, uids.last);
    let owner = format!("meta skuid {}-{}", uids.first, uids.last);
    let reject = "reject with icmpx admin-prohibited";
    format!(
        "add table inet {NFT_TABLE}\n\
         add chain inet {NFT_TABLE} {chain} {{ type filter hook output priority -150; policy accept; }}\n\
         flush chain inet {NFT_TABLE} {chain}\n\
         add rule inet {NFT_TABLE} {chain} {owner} ip daddr {BLOCKED_V4} {reject}\n\
         add rule inet {NFT_TABLE} {chain} {owner} ip6 daddr {{ {} }} {reject}\n",
        BLOCKED_V6.join(", ")
    )
}

/// Loads [`nft_script`] with the `nft` on the agent's `PATH`.
async fn load_nft_table(uids: UidRange) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let nft = find_on_path("nft").ok_or("no `nft` command on the agent's PATH")?;
    let mut child = tokio::process::Command::new(&nft)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running {}: {e}", nft.display()))?;
    let script = nft_script(uids);
    let mut stdin = child.stdin.take().ok_or("nft has no stdin")?;
    let run = async {
        stdin.write_all(script.as_bytes()).await?;
        drop(stdin);
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(NFT_WAIT, run)
        .await
        .map_err(|_| format!("{} took over {NFT_WAIT:?}", nft.display()))?
        .map_err(|e| format!("running {}: {e}", nft.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -f failed ({}): {}",
            nft.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(format!(
        "nftables table inet {NFT_TABLE} rejects uids {}-{}",
        uids.first, uids.last
    ))
}

/// For `check-config`: which layers this host could set up (the BPF
/// programs are loaded to see that the kernel takes them, not attached).
pub fn host_support(cgroups: Option<&super::cgroup::Hierarchy>) -> Result<String, String> {
    let bpf = match cgroups.and_then(|h| h.egress_parent()) {
        None => Err("no cgroup2 (unified) hierarchy".to_string()),
        Some(dir) => hooks()
            .into_iter()
            .try_for_each(|(hook, name, program)| load(&program, hook, name).map(drop))
            .map(|()| format!("BPF on {}", dir.display()))
            .map_err(|e| format!("the kernel refuses the BPF programs: {e}")),
    };
    let nft = find_on_path("nft")
        .map(|p| format!("nftables via {}", p.display()))
        .ok_or_else(|| "no `nft` on PATH".to_string());
    match (bpf, nft) {
        (Ok(a), Ok(b)) => Ok(format!("{a}; {b}")),
        (Ok(a), Err(b)) | (Err(b), Ok(a)) => Ok(format!("{a} (one layer only: {b})")),
        (Err(a), Err(b)) => Err(format!("egress jobs are refused: {a}, {b}")),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------- BPF --

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const AND32_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JEQ32_K: u8 = 0x16; // BPF_JMP32 | BPF_JEQ | BPF_K
const JNE32_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

// Offsets in `struct bpf_sock_addr`, the programs' context (r1).
const USER_IP4: i16 = 4;
const USER_IP6: i16 = 8;

/// A 32-bit word as the program loads it from memory holding `bytes` in
/// network order (the context's addresses are in network order).
const fn word(bytes: [u8; 4]) -> i32 {
    i32::from_ne_bytes(bytes)
}

/// The verdicts: 1 lets the call go on, 0 fails it with `EPERM`.
const ALLOW: [Insn; 2] = [insn(MOV64_K, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)];
const DENY: [Insn; 2] = [insn(MOV64_K, 0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)];

/// connect4 and sendmsg4: deny a destination in 169.254.0.0/16.
fn program_v4() -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, USER_IP4, 0),
        insn(AND32_K, 2, 0, 0, word([0xff, 0xff, 0, 0])),
        insn(JEQ32_K, 2, 0, 2, word([169, 254, 0, 0])),
    ];
    p.extend(ALLOW);
    p.extend(DENY);
    p
}

/// connect6 and sendmsg6: deny [`BLOCKED_V6`]: fd00:ec2::/32, and an
/// address in 169.254.0.0/16 as `::ffff:a.b.c.d`, `::a.b.c.d` or
/// `64:ff9b::a.b.c.d`.
fn program_v6() -> Vec<Insn> {
    const NAT64: [u8; 4] = [0x00, 0x64, 0xff, 0x9b];
    let mut p = vec![
        /* 0 */ insn(LDX_W, 2, 1, USER_IP6, 0),
        /* 1 */ insn(JEQ32_K, 2, 0, 12, word([0xfd, 0x00, 0x0e, 0xc2])), // -> 14
        /* 2 */ insn(JEQ32_K, 2, 0, 1, 0), // -> 4
        /* 3 */ insn(JNE32_K, 2, 0, 8, word(NAT64)), // -> 12
        /* 4 */ insn(LDX_W, 2, 1, USER_IP6 + 4, 0),
        /* 5 */ insn(JNE32_K, 2, 0, 6, 0), // -> 12
        /* 6 */ insn(LDX_W, 2, 1, USER_IP6 + 8, 0),
        /* 7 */ insn(JEQ32_K, 2, 0, 1, 0), // -> 9
        /* 8 */ insn(JNE32_K, 2, 0, 3, word([0, 0, 0xff, 0xff])), // -> 12
        /* 9 */ insn(LDX_W, 2, 1, USER_IP6 + 12, 0),
        /* 10 */ insn(AND32_K, 2, 0, 0, word([0xff, 0xff, 0, 0])),
        /* 11 */ insn(JEQ32_K, 2, 0, 2, word([169, 254, 0, 0])), // -> 14
    ];
    p.extend(ALLOW); // 12, 13
    p.extend(DENY); // 14, 15
    p
}

const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The hooks, the program for each and the name it is known by on the
/// cgroup (a new version of a program gets a new name).
fn hooks() -> [(u32, &'static str, Vec<Insn>); 4] {
    const INET4_CONNECT: u32 = 10;
    const INET6_CONNECT: u32 = 11;
    const UDP4_SENDMSG: u32 = 14;
    const UDP6_SENDMSG: u32 = 15;
    [
        (INET4_CONNECT, "batchly_md2_c4", program_v4()),
        (INET6_CONNECT, "batchly_md2_c6", program_v6()),
        (UDP4_SENDMSG, "batchly_md2_s4", program_v4()),
        (UDP6_SENDMSG, "batchly_md2_s6", program_v6()),
    ]
}

/// Attaches every hook's program to `cgroup` unless a program of that name
/// is attached there already (by this agent before a restart).
fn attach_programs(cgroup: &Path) -> Result<(), String> {
    let dir =
        std::fs::File::open(cgroup).map_err(|e| format!("opening {}: {e}", cgroup.display()))?;
    // Agents starting at once on one host (they share the parent on a v1
    // host) must not both find nothing and both attach.
    let _locked = lock(&dir, ATTACH_LOCK_WAIT)
        .map_err(|e| format!("locking {} to attach: {e}", cgroup.display()))?;
    for (hook, name, program) in hooks() {
        let attached = attached_names(dir.as_raw_fd(), hook)
            .map_err(|e| format!("listing the programs on {}: {e}", cgroup.display()))?;
        if attached.iter().any(|n| n == name) {
            continue;
        }
        let prog = load(&program, hook, name).map_err(|e| format!("loading {name}: {e}"))?;
        bpf_attach(dir.as_raw_fd(), prog.as_raw_fd(), hook)
            .map_err(|e| format!("attaching {name} to {}: {e}", cgroup.display()))?;
    }
    Ok(())
}

/// Longest an agent waits for another to finish attaching.
const ATTACH_LOCK_WAIT: Duration = Duration::from_secs(5);

/// An exclusive `flock` on `dir`, waited for at most `wait`; released when
/// the returned guard (the lock's own descriptor) is dropped.
fn lock(dir: &std::fs::File, wait: Duration) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    let deadline = std::time::Instant::now() + wait;
    let mut file = dir.try_clone()?;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((_, errno)) => return Err(errno.into()),
        }
    }
}

// `union bpf_attr` for the commands used, each padded with zeroes: the
// kernel requires what it does not know of to be zero.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _pad: [u64; 8],
}

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    _pad: [u64; 8],
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: [u32; 17],
}

#[repr(C)]
#[derive(Default)]
struct GetFdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: [u32; 13],
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
    _pad: [u64; 6],
}

/// The start of `struct bpf_prog_info`, up to the name.
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

/// The `bpf` system call on `attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed `repr(C)` value of the
    // layout the kernel expects for `cmd`, and its true size is passed; the
    // kernel writes only within it (and into buffers whose pointers and
    // sizes the caller put in it, valid for the call).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned_fd(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned `fd` as a new descriptor that
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn load(program: &[Insn], hook: u32, name: &str) -> io::Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = LoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: hook,
        ..LoadAttr::default()
    };
    for (dst, src) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src;
    }
    bpf(BPF_PROG_LOAD, &mut attr).map(owned_fd).map_err(|e| {
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0').trim();
        if text.is_empty() {
            e
        } else {
            io::Error::new(e.kind(), format!("{e}; verifier: {text}"))
        }
    })
}

fn bpf_attach(cgroup: RawFd, prog: RawFd, hook: u32) -> io::Result<()> {
    let mut attr = AttachAttr {
        target_fd: cgroup as u32,
        attach_bpf_fd: prog as u32,
        attach_type: hook,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..AttachAttr::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// The names of the programs attached to `cgroup` at `hook` (itself, not
/// inherited).
fn attached_names(cgroup: RawFd, hook: u32) -> io::Result<Vec<String>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup as u32,
        attach_type: hook,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let mut names = Vec::new();
    for &id in &ids[..(attr.prog_cnt as usize).min(ids.len())] {
        let mut get = GetFdAttr {
            prog_id: id,
            ..GetFdAttr::default()
        };
        let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut get).map(owned_fd) else {
            continue; // detached in between
        };
        let mut info = ProgInfo::default();
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<ProgInfo>() as u32,
            info: &mut info as *mut ProgInfo as u64,
            ..InfoAttr::default()
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let end = info.name.iter().position(|&b| b == 0).unwrap_or(16);
        names.push(String::from_utf8_lossy(&info.name[..end]).into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a program's logic on an address, as the kernel would: a tiny
    /// interpreter of the few opcodes used, so the jumps are checked here
    /// and not only on a host that can load them.
    fn verdict(program: &[Insn], ctx: &[u8; 64]) -> i64 {
        let mut regs = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            assert_eq!(
                src,
                if i.code == LDX_W { 1 } else { 0 },
                "r1 is the context"
            );
            pc += 1;
            match i.code {
                LDX_W => {
                    let at = i.off as usize;
                    let bytes: [u8; 4] = ctx[at..at + 4].try_into().expect("4 bytes");
                    regs[dst] = u32::from_ne_bytes(bytes) as u64;
                }
                AND32_K => regs[dst] = (regs[dst] as u32 & i.imm as u32) as u64,
                JEQ32_K if regs[dst] as u32 == i.imm as u32 => pc += i.off as usize,
                JNE32_K if regs[dst] as u32 != i.imm as u32 => pc += i.off as usize,
                JEQ32_K | JNE32_K => {}
                MOV64_K => regs[dst] = i.imm as i64 as u64,
                EXIT => return regs[0] as i64,
                other => panic!("opcode {other:#x} not interpreted"),
            }
        }
    }

    fn ctx_v4(ip: std::net::Ipv4Addr) -> [u8; 64] {
        let mut ctx = [0u8; 64];
        ctx[4..8].copy_from_slice(&ip.octets());
        ctx
    }

    fn ctx_v6(ip: std::net::Ipv6Addr) -> [u8; 64] {
        let mut ctx = [0u8; 64];
        ctx[8..24].copy_from_slice(&ip.octets());
        ctx
    }

    #[test]
    fn the_v4_program_denies_link_local_and_nothing_else() {
        let p = program_v4();
        for denied in [
            "169.254.169.254",
            "169.254.170.2",
            "169.254.0.0",
            "169.254.255.255",
        ] {
            assert_eq!(
                verdict(&p, &ctx_v4(denied.parse().expect("an address"))),
                0,
                "{denied}"
            );
        }
        for allowed in [
            "10.0.0.1",
            "169.253.169.254",
            "170.254.0.1",
            "254.169.0.1",
            "8.8.8.8",
        ] {
            assert_eq!(
                verdict(&p, &ctx_v4(allowed.parse().expect("an address"))),
                1,
                "{allowed}"
            );
        }
    }

    #[test]
    fn the_v6_program_denies_the_ec2_range_and_mapped_link_local_and_nothing_else() {
        let p = program_v6();
        for denied in [
            "fd00:ec2::254",
            "fd00:ec2::23",
            "fd00:ec2:ffff::1",
            "::ffff:169.254.169.254",
            "::ffff:169.254.0.1",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::169.254.170.2",
        ] {
            assert_eq!(
                verdict(&p, &ctx_v6(denied.parse().expect("an address"))),
                0,
                "{denied}"
            );
        }
        for allowed in [
            "::1",
            "2600:1f18::1",
            "fd00:ec3::254",
            "fd01:ec2::254",
            "::ffff:10.0.0.1",
            "::ffff:169.253.169.254",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a9fe:a9fe",
            "::1:0:a9fe:a9fe",
            "0:0:1::a9fe:a9fe",
        ] {
            assert_eq!(
                verdict(&p, &ctx_v6(allowed.parse().expect("an address"))),
                1,
                "{allowed}"
            );
        }
    }

    #[test]
    fn every_jump_lands_inside_its_program() {
        for (_, name, p) in hooks() {
            assert!(name.len() < 16, "{name} fits a BPF object name");
            for (at, i) in p.iter().enumerate() {
                if matches!(i.code, JEQ32_K | JNE32_K) {
                    assert!(at + 1 + (i.off as usize) < p.len(), "{name}: jump at {at}");
                }
            }
            assert_eq!(p.last().map(|i| i.code), Some(EXIT), "{name} ends in exit");
        }
    }

    #[test]
    fn the_nft_script_redefines_one_chain_per_uid_range_in_one_transaction() {
        let script = nft_script(UidRange {
            first: 61000,
            last: 61999,
        });
        assert!(
            script.starts_with("add table inet batchly_egress\n"),
            "{script}"
        );
        // Before the output DNAT (-100), which rewrites the ECS endpoint.
        assert!(script.contains("add chain inet batchly_egress out_61000_61999 { type filter hook output priority -150; policy accept; }"), "{script}");
        assert!(
            script.contains("flush chain inet batchly_egress out_61000_61999\n"),
            "{script}"
        );
        assert!(
            script.contains("meta skuid 61000-61999 ip daddr 169.254.0.0/16 reject"),
            "{script}"
        );
        assert!(
            script.contains("ip6 daddr { fd00:ec2::/32, ::ffff:169.254.0.0/112, ::a9fe:0/112, 64:ff9b::a9fe:0/112 } reject"),
            "{script}"
        );
    }

    /// On a real kernel (as root, with a unified hierarchy, as in CI): the
    /// programs load and attach, and attaching again after a "restart"
    /// adds none.
    #[test]
    fn attaching_twice_leaves_one_copy_of_each_program() {
        let Some(parent) = crate::sandbox::cgroup::Hierarchy::detect()
            .ok()
            .and_then(|h| h.egress_parent())
            .filter(|_| nix::unistd::geteuid().is_root())
        else {
            eprintln!("skipped: needs root and a unified cgroup hierarchy");
            return;
        };
        // Beside the jobs' parent, so that no job is below it.
        let cgroup = parent
            .parent()
            .unwrap_or(&parent)
            .join(format!("batchly-unit-{}", std::process::id()));
        std::fs::create_dir(&cgroup).expect("a test cgroup");
        let attached = (|| {
            attach_programs(&cgroup)?;
            attach_programs(&cgroup)?;
            let dir = std::fs::File::open(&cgroup).map_err(|e| e.to_string())?;
            hooks()
                .into_iter()
                .map(|(hook, name, _)| {
                    attached_names(dir.as_raw_fd(), hook)
                        .map(|names| (name, names))
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, String>>()
        })();
        std::fs::remove_dir(&cgroup).expect("removing the test cgroup");
        for (name, names) in attached.expect("attaching") {
            assert_eq!(names, vec![name.to_string()], "one {name}");
        }
    }

    #[test]
    fn a_second_attacher_waits_for_the_first_and_gives_up_at_its_deadline() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = std::fs::File::open(tmp.path()).expect("open dir");
        let held = lock(&dir, Duration::ZERO).expect("the first lock");
        let other = std::fs::File::open(tmp.path()).expect("open dir again");
        let err = lock(&other, Duration::from_millis(20)).expect_err("held by the first");
        assert_eq!(err.raw_os_error(), Some(libc::EWOULDBLOCK));
        drop(held);
        lock(&other, Duration::ZERO).expect("free once the first is done");
    }

    #[test]
    fn without_a_unified_hierarchy_the_bpf_layer_is_missing_with_a_reason() {
        let block = MetadataBlock::attach(None, UidRange { first: 1, last: 2 });
        assert_eq!(
            block.bpf,
            Err("no cgroup2 (unified) hierarchy is mounted".to_string())
        );
    }
}
