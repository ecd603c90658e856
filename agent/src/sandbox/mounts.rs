//! The job's view of the file system, built by the init in the job's own
//! mount namespace (as root, before the job drops its privileges):
//!
//! 1. every mount private, so nothing propagates back to the host;
//! 2. a detached copy of the job's work dir taken (`open_tree`);
//! 3. the whole tree read-only, nosuid and nodev at once: `mount_setattr`
//!    with `AT_RECURSIVE` (a `remount,bind,ro` would change one mount only);
//! 4. a fresh tmpfs on /tmp (and /var/tmp);
//! 5. the agent's own paths hidden: an empty tmpfs over a directory,
//!    `/dev/null` (on a nodev mount, so it cannot even be opened) over a
//!    file; then a minimal /dev with its own /dev/shm, and /proc for the
//!    job's pid namespace;
//! 6. the work dir and `sandbox.bind_paths` put back at their own paths,
//!    writable, and `sandbox.readonly_paths` read-only (taken after step 3);
//! 7. the hiding tmpfs and the empty /run made read-only.
//!
//! In an ordinary user's user namespace the same steps apply to the mounts
//! that namespace owns (the host's own mounts stay locked, and can only be
//! made more restrictive), with one difference: no device node can be made
//! there, so the minimal /dev holds copies of the host's own nodes, taken
//! (`open_tree`) before the host is made nodev.
//!
//! Needs Linux 5.12 (`mount_setattr`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use super::steps::{Step, StepError};
use super::{Isolation, Privilege};

// From <linux/mount.h>; stable kernel ABI.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The device nodes of the job's /dev: name, major, minor.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn fail(message: &str, path: &Path) -> impl FnOnce(Errno) -> StepError {
    let (message, path) = (message.to_string(), path.to_path_buf());
    move |errno| StepError::sys(Step::Mounts, message, &path, errno)
}

fn cstring(path: &Path) -> Result<CString, StepError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| StepError::new(Step::Mounts, format!("a NUL byte in {}", path.display())))
}

/// Where the nodes of the job's /dev come from.
enum Devices {
    /// Made with `mknod` (root).
    Made,
    /// Copies of the host's own nodes, by name (a user namespace).
    HostCopies(Vec<(&'static str, OwnedFd)>),
}

/// Builds the whole view; see the module's documentation for the order.
pub fn build(work_dir: &Path, isolation: &Isolation) -> Result<(), StepError> {
    let root = Path::new("/");
    make_private(root)?;

    let work = open_tree(work_dir, false)?;
    let writable = isolation
        .writable
        .iter()
        .map(|dir| Ok((open_tree(dir, true)?, dir)))
        .collect::<Result<Vec<_>, StepError>>()?;
    let devices = match isolation.privilege {
        Privilege::Root => Devices::Made,
        Privilege::UserNamespace => Devices::HostCopies(host_device_nodes()?),
    };
    read_only_host(root)?;
    let readable = isolation
        .readable
        .iter()
        .map(|dir| Ok((open_tree(dir, true)?, dir)))
        .collect::<Result<Vec<_>, StepError>>()?;

    // The fresh /tmp first: what the host keeps under /tmp is gone with it,
    // so a hidden path there needs no tmpfs of its own (one would be
    // buried under the new /tmp).
    fresh_tmpfs(Path::new("/tmp"), true)?;
    fresh_tmpfs(Path::new("/var/tmp"), false)?;
    // The host's /run holds sockets (journald's, D-Bus's) that a read-only
    // mount does not stop a connect() to: the job gets an empty one.
    let runs = empty_run()?;
    // Before the new /dev: files are hidden under the host's /dev/null,
    // whose mount is nodev by now.
    let hidden = hide(&isolation.hidden)?;
    minimal_dev(devices)?;
    own_proc()?;

    put_back(work, work_dir, true)?;
    for (tree, dir) in writable {
        put_back(tree, dir, true)?;
    }
    for (tree, dir) in readable {
        put_back(tree, dir, false)?;
    }
    for dir in hidden.into_iter().chain(runs) {
        mount(
            None::<&str>,
            &dir,
            None::<&str>,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(fail("making read-only the empty tmpfs on", &dir))?;
    }
    Ok(())
}

/// Nothing mounted under `root` from here on propagates back to the host.
pub(super) fn make_private(root: &Path) -> Result<(), StepError> {
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(fail("making every mount private under", root))
}

/// Every mount under `root` read-only, nosuid and nodev at once.
pub(super) fn read_only_host(root: &Path) -> Result<(), StepError> {
    set_attributes(
        root,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        0,
    )
}

/// A /proc of the job's own pid namespace.
pub(super) fn own_proc() -> Result<(), StepError> {
    let proc_dir = Path::new("/proc");
    mount(
        Some("proc"),
        proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(fail(
        "mounting a /proc of the job's pid namespace on",
        proc_dir,
    ))
}

/// A detached copy of the mount at `path`, with the mounts below it if
/// `recursive` (the work dir has none of its own).
fn open_tree(path: &Path, recursive: bool) -> Result<OwnedFd, StepError> {
    let c = cstring(path)?;
    // SAFETY: open_tree reads a NUL-terminated path and returns a new
    // descriptor or -1; nothing else is borrowed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | if recursive { AT_RECURSIVE } else { 0 },
        )
    };
    if fd < 0 {
        return Err(StepError::sys(
            Step::Mounts,
            "taking a copy of the mount (Linux 5.2 or later is needed) at",
            path,
            Errno::last(),
        ));
    }
    // SAFETY: the syscall just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `mount_setattr(dirfd, path, flags, {set, clear})`.
fn mount_setattr(
    dirfd: libc::c_int,
    path: &std::ffi::CStr,
    flags: libc::c_uint,
    set: u64,
    clear: u64,
) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads the NUL-terminated path and `attr` (its
    // size passed along) for the duration of the call only; `dirfd` is
    // AT_FDCWD or a descriptor the caller holds open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `mount_setattr` on every mount under `path`.
fn set_attributes(path: &Path, set: u64, clear: u64) -> Result<(), StepError> {
    let c = cstring(path)?;
    mount_setattr(libc::AT_FDCWD, &c, AT_RECURSIVE, set, clear).map_err(fail(
        "making the host read-only (Linux 5.12 or later is needed) under",
        path,
    ))
}

/// Hides each existing path, outermost first (a path inside one already
/// hidden is gone anyway). Returns the directories now covered by a
/// tmpfs, still writable so the work dir's mount point can be made.
fn hide(paths: &[PathBuf]) -> Result<Vec<PathBuf>, StepError> {
    let mut sorted: Vec<&PathBuf> = paths.iter().collect();
    sorted.sort_by_key(|p| p.components().count());
    let mut covered: Vec<PathBuf> = Vec::new();
    for path in sorted {
        if covered.iter().any(|dir| path.starts_with(dir)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            continue;
        };
        if meta.is_dir() {
            mount(
                Some("batchly-hidden"),
                path.as_path(),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=0755,size=64k"),
            )
            .map_err(fail("hiding the directory", path))?;
            covered.push(path.clone());
        } else if !meta.file_type().is_symlink() {
            // A bind mount follows a symlink, so one is never a target: the
            // link itself shows nothing and its target is hidden, or not,
            // by its own entry.
            mount(
                Some("/dev/null"),
                path.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(fail("hiding the file", path))?;
        }
    }
    Ok(covered)
}

/// An empty /run (and /var/run when it is a directory of its own rather
/// than the usual link to /run); returned to be made read-only once the
/// read-only paths under it have their mount points.
fn empty_run() -> Result<Vec<PathBuf>, StepError> {
    let mut made = Vec::new();
    for dir in ["/run", "/var/run"] {
        let dir = Path::new(dir);
        let is_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
        if !is_dir {
            continue;
        }
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=64k"),
        )
        .map_err(fail("hiding the host's sockets under", dir))?;
        made.push(dir.to_path_buf());
    }
    Ok(made)
}

/// A private, empty tmpfs on `dir` (sticky, world-writable like /tmp).
pub(super) fn fresh_tmpfs(dir: &Path, required: bool) -> Result<(), StepError> {
    if !required && !dir.is_dir() {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(fail("mounting a private tmpfs on", dir))
}

/// Detached copies of the host's nodes of [`DEVICES`] (those it has), still
/// usable as devices, read-only (which does not stop writes to a device),
/// nosuid and noexec; for a user namespace, which cannot make nodes.
fn host_device_nodes() -> Result<Vec<(&'static str, OwnedFd)>, StepError> {
    let mut nodes = Vec::new();
    for (name, _, _) in DEVICES {
        let node = Path::new("/dev").join(name);
        let is_char_device = std::fs::metadata(&node).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_char_device()
        });
        if !is_char_device {
            continue;
        }
        let copy = open_tree(&node, false)?;
        mount_setattr(
            copy.as_raw_fd(),
            c"",
            libc::AT_EMPTY_PATH as libc::c_uint,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
            0,
        )
        .map_err(fail("restricting the copy of the host's", &node))?;
        nodes.push((*name, copy));
    }
    Ok(nodes)
}

/// A /dev of only null, zero, full, random, urandom, tty, the fd links
/// and a private /dev/shm; read-only once made.
fn minimal_dev(devices: Devices) -> Result<(), StepError> {
    let dev = Path::new("/dev");
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(fail("mounting a minimal /dev on", dev))?;
    match devices {
        Devices::Made => make_device_nodes(dev)?,
        Devices::HostCopies(nodes) => {
            for (name, copy) in nodes {
                let node = dev.join(name);
                std::fs::File::create(&node).map_err(|e| {
                    StepError::sys(
                        Step::Mounts,
                        "making the mount point of the device",
                        &node,
                        Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                    )
                })?;
                attach(copy, &node).map_err(fail("putting the host's device node at", &node))?;
            }
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = dev.join(name);
        std::os::unix::fs::symlink(target, &link).map_err(|e| {
            StepError::sys(
                Step::Mounts,
                "making the link",
                &link,
                Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            )
        })?;
    }
    let shm = dev.join("shm");
    nix::unistd::mkdir(&shm, Mode::from_bits_truncate(0o1777)).map_err(fail("making", &shm))?;
    mount(
        Some("tmpfs"),
        shm.as_path(),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777"),
    )
    .map_err(fail("mounting a private tmpfs on", &shm))?;
    mount(
        None::<&str>,
        dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(fail("making read-only the minimal", dev))
}

/// The nodes of [`DEVICES`] in `dev`, mode 0666.
fn make_device_nodes(dev: &Path) -> Result<(), StepError> {
    for (name, major, minor) in DEVICES {
        let node = dev.join(name);
        mknod(
            &node,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(fail("making the device", &node))?;
        // mknod honours the umask; the mode must be exactly 0666.
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &node,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(fail("setting the mode of", &node))?;
    }
    Ok(())
}

/// Attaches a copy taken by `open_tree` at its own path, writable or
/// read-only (nosuid and nodev either way), making its mount point inside
/// a fresh tmpfs first.
fn put_back(work: OwnedFd, work_dir: &Path, writable: bool) -> Result<(), StepError> {
    let empty = c"";
    let (set, clear) = if writable {
        (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, MOUNT_ATTR_RDONLY)
    } else {
        (MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0)
    };
    // AT_EMPTY_PATH: on the detached copy itself.
    mount_setattr(
        work.as_raw_fd(),
        empty,
        libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
        set,
        clear,
    )
    .map_err(fail("setting the attributes of the copy of", work_dir))?;
    if !work_dir.is_dir() {
        std::fs::create_dir_all(work_dir).map_err(|e| {
            StepError::sys(
                Step::Mounts,
                "making the mount point of",
                work_dir,
                Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            )
        })?;
    }
    attach(work, work_dir).map_err(fail("putting back the copy of", work_dir))
}

/// Attaches a detached copy taken by `open_tree` at `target`.
fn attach(tree: OwnedFd, target: &Path) -> Result<(), Errno> {
    let target = CString::new(target.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: move_mount reads two NUL-terminated paths and uses the
    // descriptor only for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}
