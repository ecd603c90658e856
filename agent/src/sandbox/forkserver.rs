//! The fork server: the process every job is forked from.
//!
//! Starting a fresh copy of the agent binary for every job (`execve` of a
//! large binary, dynamic relocations, a runtime's start) cost more than the
//! trivial job itself and capped a small instance's throughput. So the agent
//! starts this server once (`batchly-agent __launch`, with `posix_spawn`, as
//! before: it never forks its own multi-threaded runtime), and for every job
//! the server forks a copy of itself. A fork of this small, single-threaded
//! process is cheap, and its child is exactly what the launcher always was:
//! a single-threaded copy of the agent binary that may allocate, read files
//! and report errors freely before its final `execve` (see `launcher.rs`).
//!
//! The child is forked with `CLONE_PARENT`: its parent is the agent, not this
//! server. The agent waits for it (through a pidfd) and reaps it like any
//! child; the death of the server loses no job and no exit status, and the
//! agent simply starts another server.
//!
//! Protocol (fd 0 is a `SOCK_SEQPACKET` socket, one request in flight at a
//! time): the agent sends one packet `L` and the namespaces to create (the
//! `clone` flags, 4 bytes little endian) carrying three descriptors, the
//! job's plan socket, its stdout and its stderr. The server forks (into
//! those namespaces: the child is then pid 1 of its own; with a user
//! namespace among them, the child maps its ids there itself, see
//! `userns.rs`); the child
//! waits until the server has answered `P` and its pid (4 bytes, little
//! endian), then puts the descriptors on fds 0, 1 and 2 and runs the
//! launcher; a child whose pid never reached the agent (the server died in
//! between) exits without running anything. `E` and a reason answer a
//! request that could not be forked. An empty read (the agent closed its
//! end, or died) ends the server.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};

use super::{launcher, Namespaces};

/// The one request the server understands.
pub const FORK: u8 = b'L';
/// Reply: forked; the child's pid follows.
pub const FORKED: u8 = b'P';
/// Reply: could not fork; the reason follows.
pub const FAILED: u8 = b'E';
/// How many descriptors a request carries: plan socket, stdout, stderr.
pub const REQUEST_FDS: usize = 3;

/// Entry point of `batchly-agent __launch`. Never returns.
pub fn serve() -> ! {
    let sock = match setup() {
        Ok(sock) => sock,
        Err(e) => {
            eprintln!("batchly-agent fork server: {e}");
            std::process::exit(1);
        }
    };
    // Compiled once here, inherited by every launcher; a launcher reports
    // an error itself, as its job's refusal.
    let _ = super::syscalls::filter();
    loop {
        let mut go: Option<OwnedFd> = None;
        let (namespaces, fds) = match receive(&sock) {
            Ok(Some(request)) => request,
            // The agent is gone (or closed its end on purpose): so are we.
            Ok(None) => std::process::exit(0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("batchly-agent fork server: reading a request: {e}");
                std::process::exit(1);
            }
        };
        let reply = if fds.len() != REQUEST_FDS {
            failed(format!(
                "a request carried {} descriptors, not {REQUEST_FDS}",
                fds.len()
            ))
        } else if namespaces.0 & !Namespaces::ALLOWED != 0 {
            failed(format!(
                "clone flags {:#x} are not namespaces",
                namespaces.0
            ))
        } else {
            // The child waits for a byte on `go` until the agent has its
            // pid: a child whose pid never reached the agent (this server
            // died in between) reads end of file and exits without running
            // anything.
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Err(e) => failed(format!("pipe: {}", e.desc())),
                Ok((go_r, go_w)) => match fork_beside_the_agent(namespaces) {
                    Ok(0) => {
                        drop(go_w);
                        child(sock, go_r, fds)
                    }
                    Ok(pid) => {
                        drop(go_r);
                        go = Some(go_w);
                        let mut r = vec![FORKED];
                        r.extend_from_slice(&pid.to_le_bytes());
                        r
                    }
                    Err(e) if namespaces.0 & libc::CLONE_NEWUSER as u32 != 0 => failed(format!(
                        "forking into new namespaces with a user namespace of their own \
                         (flags {:#x}; see user.max_user_namespaces): {}",
                        namespaces.0,
                        e.desc()
                    )),
                    Err(e) if namespaces.0 != 0 => failed(format!(
                        "forking into new namespaces (flags {:#x}; the sandbox needs root): {}",
                        namespaces.0,
                        e.desc()
                    )),
                    Err(e) => failed(format!("fork: {}", e.desc())),
                },
            }
        };
        // The descriptors are the child's now (or nobody's): ours close.
        drop(fds);
        if let Err(e) = sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&reply)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            eprintln!("batchly-agent fork server: answering the agent: {e}");
            std::process::exit(1);
        }
        if let Some(go) = go.take() {
            // The agent knows the pid: the child may go on. If it already
            // died the write fails, and the agent learns that from its wait.
            let _ = nix::unistd::write(&go, &[FORK]);
        }
    }
}

/// Leaves the agent's session (a Ctrl-C meant for the agent's terminal must
/// not end the server), dies with the agent, and moves the request socket
/// off fd 0, which becomes `/dev/null`.
fn setup() -> Result<OwnedFd, String> {
    let _ = nix::unistd::setsid();
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(format!(
            "asking to die with the agent: {}",
            std::io::Error::last_os_error()
        ));
    }
    let sock =
        launcher::move_off_fd0().map_err(|e| format!("moving the request socket off fd 0: {e}"))?;
    launcher::dev_null_on_fd0().map_err(|e| format!("putting /dev/null on fd 0: {e}"))?;
    Ok(sock)
}

/// One request's namespaces and descriptors; `None` when the agent closed
/// its end.
fn receive(sock: &OwnedFd) -> Result<Option<(Namespaces, Vec<OwnedFd>)>, nix::errno::Errno> {
    let mut byte = [0u8; 16];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; REQUEST_FDS]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this
            // process for us; nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    let bytes = msg.bytes;
    if bytes != 5 || byte[0] != FORK {
        // Not a request we know: answered as a bad request (no descriptors
        // would make it one anyway).
        return Ok(Some((Namespaces::default(), Vec::new())));
    }
    let flags = u32::from_le_bytes([byte[1], byte[2], byte[3], byte[4]]);
    Ok(Some((Namespaces(flags), fds)))
}

/// Forks this process with the agent as the child's parent, into the new
/// `namespaces`; 0 in the child.
fn fork_beside_the_agent(namespaces: Namespaces) -> Result<i32, nix::errno::Errno> {
    // SAFETY: this process is single-threaded (it never starts a thread or
    // a runtime), so the child is a consistent copy: no lock is held by a
    // thread that does not exist in it. With no new stack the raw syscall
    // behaves like fork(2) plus CLONE_PARENT and the namespace flags, but
    // without glibc's fork: its atfork handlers do not run and its cached
    // thread id is stale in the child. The child runs the launcher (serde,
    // std::fs, a glibc fork() of the job), none of which relies on either:
    // Rust's locks do not record owners, and glibc's own fork() in the
    // child refreshes its cache for the job. Code added to the launcher
    // must not use glibc mutexes that track their owner.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT as libc::c_ulong)
                | libc::SIGCHLD as libc::c_ulong
                | libc::c_ulong::from(namespaces.0),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(r as i32)
}

/// The forked child: once the server says the agent knows its pid, the
/// job's descriptors go on 0, 1 and 2, the server's socket closes, and the
/// launcher takes over.
fn child(sock: OwnedFd, go: OwnedFd, fds: Vec<OwnedFd>) -> ! {
    drop(sock);
    let mut byte = [0u8; 1];
    let told = loop {
        match nix::unistd::read(&go, &mut byte) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    if !matches!(told, Ok(1)) {
        // The server died before the agent learnt this pid: nobody would
        // supervise what runs here, so nothing does.
        std::process::exit(launcher::LAUNCH_REFUSED_EXIT);
    }
    drop(go);
    for (target, fd) in fds.iter().enumerate() {
        if let Err(e) = launcher::dup_onto(fd.as_fd(), target as RawFd) {
            // Nobody can be told in the protocol's words: stderr may not be
            // the job's yet. The agent sees the launcher die silently.
            eprintln!("batchly-agent launcher: setting up fd {target}: {e}");
            std::process::exit(launcher::LAUNCH_REFUSED_EXIT);
        }
    }
    drop(fds);
    launcher::main()
}

/// The answer to a request that could not be forked.
fn failed(why: String) -> Vec<u8> {
    let mut r = vec![FAILED];
    r.extend_from_slice(why.as_bytes());
    r
}
