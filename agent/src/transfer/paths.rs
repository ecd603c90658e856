//! Path safety. The agent runs as root while the job decides what its work
//! dir holds, so every path is opened one component at a time beneath an
//! open descriptor of the work dir with `O_NOFOLLOW`, and only regular files
//! with a single link and directories are ever used. A path that cannot be
//! used is a [`PathRefusal`], which says whose fault it is. Nothing here
//! ever follows a link or leaves the work dir.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};

use super::{AgentTrouble, TransferError};

/// Why a path under the work dir cannot be used. Paths are relative to the
/// work dir.
#[derive(Debug)]
pub(super) enum PathRefusal {
    /// Not a plain relative path (absolute, `..`, empty).
    NotBeneath(PathBuf),
    /// The output, or a directory on its way, does not exist.
    NotCreated,
    /// Something that existed a moment ago is gone.
    Vanished(PathBuf),
    Symlink(PathBuf),
    NotDirectory(PathBuf),
    /// A directory where a file must be.
    Directory(PathBuf),
    Special(PathBuf, &'static str),
    /// A regular file with other names, possibly outside the work dir.
    HardLinked(PathBuf, libc::nlink_t),
    Io(PathBuf, &'static str, Errno),
}

impl PathRefusal {
    /// For the path an output names: absent means never created.
    pub(super) fn absent_means_not_created(self) -> PathRefusal {
        match self {
            PathRefusal::Vanished(_) => PathRefusal::NotCreated,
            other => other,
        }
    }

    pub(super) fn into_error(self, context: &str) -> TransferError {
        use PathRefusal::*;
        let job = |problem: String| TransferError::job(context, problem);
        match self {
            NotBeneath(path) => job(format!(
                "{} is not a relative path inside the work dir",
                path.display()
            )),
            NotCreated => job("the job did not create it".to_owned()),
            Vanished(path) => job(format!(
                "{} disappeared while being transferred",
                path.display()
            )),
            Symlink(path) => job(format!(
                "{} is a symbolic link, which is never followed",
                path.display()
            )),
            NotDirectory(path) => job(format!("{} is not a directory", path.display())),
            Directory(path) => job(format!(
                "{} is a directory where a file is expected",
                path.display()
            )),
            Special(path, kind) => job(format!(
                "{} is a {kind}; only regular files and directories are transferred",
                path.display()
            )),
            HardLinked(path, links) => job(format!(
                "{} has {links} hard links; an output file must have exactly one",
                path.display()
            )),
            Io(path, doing, errno) => {
                let doing = format!("{doing} {}", path.display());
                TransferError::agent(context, AgentTrouble::io(doing, errno))
            }
        }
    }
}

pub(super) enum FileKind {
    Regular,
    Directory,
    Symlink,
    Special(&'static str),
}

pub(super) fn file_kind(stat: &FileStat) -> FileKind {
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFREG {
        FileKind::Regular
    } else if kind == SFlag::S_IFDIR {
        FileKind::Directory
    } else if kind == SFlag::S_IFLNK {
        FileKind::Symlink
    } else if kind == SFlag::S_IFIFO {
        FileKind::Special("named pipe")
    } else if kind == SFlag::S_IFSOCK {
        FileKind::Special("socket")
    } else if kind == SFlag::S_IFCHR || kind == SFlag::S_IFBLK {
        FileKind::Special("device")
    } else {
        FileKind::Special("special file")
    }
}

/// Refuses a file with several names: with `fs.protected_hardlinks` off, a
/// job could link a file it cannot read (say `/etc/shadow`, same
/// filesystem) into its outputs, and the agent reads as root.
pub(super) fn check_single_link(stat: &FileStat, path: &Path) -> Result<(), PathRefusal> {
    if stat.st_nlink > 1 {
        return Err(PathRefusal::HardLinked(path.to_path_buf(), stat.st_nlink));
    }
    Ok(())
}

pub(super) fn open_work_dir(work_dir: &Path) -> Result<OwnedFd, TransferError> {
    // The work dir itself is the agent's; what lies beneath it is the job's.
    nix::fcntl::open(work_dir, directory_flags(), Mode::empty()).map_err(|e| {
        let context = format!("work dir {}", work_dir.display());
        TransferError::agent(&context, AgentTrouble::io("opening", e))
    })
}

fn directory_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Splits a work-dir-relative path into its parent directories and its
/// final name, refusing anything but plain names.
pub(super) fn split_relative(path: &Path) -> Result<(Vec<&OsStr>, &OsStr), PathRefusal> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            _ => return Err(PathRefusal::NotBeneath(path.to_path_buf())),
        }
    }
    let name = parts
        .pop()
        .ok_or_else(|| PathRefusal::NotBeneath(path.to_path_buf()))?;
    Ok((parts, name))
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum MissingDirs {
    /// Create missing directories (downloads).
    Create,
    /// A missing directory means the job did not create the output.
    Refuse,
}

/// Opens the directory `parts` beneath `root` one component at a time,
/// never following a link.
pub(super) fn open_dir_beneath(
    root: BorrowedFd<'_>,
    parts: &[&OsStr],
    missing: MissingDirs,
) -> Result<OwnedFd, PathRefusal> {
    let mut dir = root
        .try_clone_to_owned()
        .map_err(|e| PathRefusal::Io(PathBuf::from("."), "opening", io_errno(&e)))?;
    let mut path = PathBuf::new();
    for part in parts {
        path.push(part);
        let opened = match openat(&dir, *part, directory_flags(), Mode::empty()) {
            Err(Errno::ENOENT) if missing == MissingDirs::Create => {
                match mkdirat(&dir, *part, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(PathRefusal::Io(path, "creating directory", e)),
                }
                openat(&dir, *part, directory_flags(), Mode::empty())
            }
            other => other,
        };
        dir = match opened {
            Ok(fd) => fd,
            Err(e) => return Err(refusal_at(&dir, part, &path, e)),
        };
    }
    Ok(dir)
}

/// Explains why opening `name` in `dir` as a directory failed.
fn refusal_at(dir: &OwnedFd, name: &OsStr, path: &Path, error: Errno) -> PathRefusal {
    match error {
        Errno::ELOOP | Errno::ENOTDIR => match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) if matches!(file_kind(&stat), FileKind::Symlink) => {
                PathRefusal::Symlink(path.to_path_buf())
            }
            _ => PathRefusal::NotDirectory(path.to_path_buf()),
        },
        other => refusal_for_open(path, other),
    }
}

fn refusal_for_open(path: &Path, error: Errno) -> PathRefusal {
    match error {
        Errno::ENOENT => PathRefusal::Vanished(path.to_path_buf()),
        // O_NOFOLLOW on a link; the entry was swapped after it was examined.
        Errno::ELOOP => PathRefusal::Symlink(path.to_path_buf()),
        Errno::ENOTDIR => PathRefusal::NotDirectory(path.to_path_buf()),
        other => PathRefusal::Io(path.to_path_buf(), "opening", other),
    }
}

pub(super) fn stat_beneath(
    dir: &impl AsFd,
    name: &OsStr,
    path: &Path,
) -> Result<FileStat, PathRefusal> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| match e {
        Errno::ENOENT => PathRefusal::Vanished(path.to_path_buf()),
        other => PathRefusal::Io(path.to_path_buf(), "inspecting", other),
    })
}

/// Opens a regular file beneath `root` for reading, re-checking what
/// `plan_uploads` saw: the job's leftovers may have changed it since.
pub(super) fn open_regular_file_beneath(
    root: BorrowedFd<'_>,
    path: &Path,
) -> Result<(std::fs::File, u64), PathRefusal> {
    let (parents, name) = split_relative(path)?;
    let dir = open_dir_beneath(root, &parents, MissingDirs::Refuse)?;
    // Examined before opening: opening a device as root can have effects.
    let seen = stat_beneath(&dir, name, path)?;
    check_regular(&seen, path)?;
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let fd = openat(&dir, name, flags, Mode::empty()).map_err(|e| refusal_for_open(path, e))?;
    let opened = fstat(&fd).map_err(|e| PathRefusal::Io(path.to_path_buf(), "inspecting", e))?;
    check_regular(&opened, path)?;
    let size = u64::try_from(opened.st_size).unwrap_or(0);
    Ok((std::fs::File::from(fd), size))
}

fn check_regular(stat: &FileStat, path: &Path) -> Result<(), PathRefusal> {
    match file_kind(stat) {
        FileKind::Regular => check_single_link(stat, path),
        FileKind::Symlink => Err(PathRefusal::Symlink(path.to_path_buf())),
        FileKind::Directory => Err(PathRefusal::Directory(path.to_path_buf())),
        FileKind::Special(kind) => Err(PathRefusal::Special(path.to_path_buf(), kind)),
    }
}

fn io_errno(error: &std::io::Error) -> Errno {
    error
        .raw_os_error()
        .map(Errno::from_raw)
        .unwrap_or(Errno::EIO)
}

/// The names in the open directory `dir` (at `path`).
pub(super) fn list_names(dir: &OwnedFd, path: &Path) -> Result<Vec<OsString>, PathRefusal> {
    // The magic link reaches exactly the directory already open, whatever
    // its path has become since (nix's `Dir` needs a feature we leave off).
    let listing = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let listing_error =
        |e: std::io::Error| PathRefusal::Io(path.to_path_buf(), "listing", io_errno(&e));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(listing).map_err(listing_error)? {
        names.push(entry.map_err(listing_error)?.file_name());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::super::moto::{job_error, keys_in, transfer, write, Moto};
    use super::super::plan::plan_uploads;
    use super::super::Transfers;
    use super::*;

    use std::os::unix::fs::symlink;

    use aws_sdk_s3::primitives::ByteStream;
    use tempfile::TempDir;

    #[tokio::test]
    async fn output_that_is_a_symlink_to_etc_passwd_is_refused() {
        let moto = Moto::start();
        let client = moto.bucket("links").await;
        let transfers = Transfers::new(client.clone());
        let job = TempDir::new().expect("tempdir");
        symlink("/etc/passwd", job.path().join("passwd")).expect("symlink");

        let message = job_error(
            transfers
                .upload_outputs(&[transfer("s3://links/out/", "passwd")], job.path())
                .await,
        );
        assert_eq!(
            message,
            "output passwd: passwd is a symbolic link, which is never followed"
        );
        assert!(keys_in(&client, "links").await.is_empty());
    }

    #[tokio::test]
    async fn symlink_inside_an_output_directory_stops_the_upload_before_anything_is_sent() {
        let moto = Moto::start();
        let client = moto.bucket("links").await;
        let transfers = Transfers::new(client.clone());
        let job = TempDir::new().expect("tempdir");
        write(job.path(), "out/a.txt", b"fine");
        std::fs::create_dir_all(job.path().join("out/sub")).expect("mkdir");
        symlink("/etc/passwd", job.path().join("out/sub/passwd")).expect("symlink");
        symlink("/etc", job.path().join("out/etc")).expect("symlink");

        let message = job_error(
            transfers
                .upload_outputs(&[transfer("s3://links/out/", "out")], job.path())
                .await,
        );
        assert_eq!(
            message,
            "output out: out/etc is a symbolic link, which is never followed"
        );
        assert!(keys_in(&client, "links").await.is_empty());
    }

    #[tokio::test]
    async fn symlinked_directory_on_the_way_to_an_output_is_refused() {
        let moto = Moto::start();
        let client = moto.bucket("links").await;
        let transfers = Transfers::new(client.clone());
        let job = TempDir::new().expect("tempdir");
        symlink("/etc", job.path().join("results")).expect("symlink");

        let message = job_error(
            transfers
                .upload_outputs(&[transfer("s3://links/out/", "results/passwd")], job.path())
                .await,
        );
        assert_eq!(
            message,
            "output results/passwd: results is a symbolic link, which is never followed"
        );
        assert!(keys_in(&client, "links").await.is_empty());
    }

    #[tokio::test]
    async fn output_the_job_did_not_create_is_a_job_error_naming_it() {
        let moto = Moto::start();
        let client = moto.bucket("outs").await;
        let transfers = Transfers::new(client.clone());
        let job = TempDir::new().expect("tempdir");
        write(job.path(), "done.txt", b"ok");

        let message = job_error(
            transfers
                .upload_outputs(
                    &[
                        transfer("s3://outs/x/", "done.txt"),
                        transfer("s3://outs/x/", "results/out.csv"),
                    ],
                    job.path(),
                )
                .await,
        );
        assert_eq!(message, "output results/out.csv: the job did not create it");
        assert!(
            keys_in(&client, "outs").await.is_empty(),
            "a bad output must stop the whole upload"
        );
    }

    #[tokio::test]
    async fn named_pipe_and_hard_link_outputs_are_refused() {
        let moto = Moto::start();
        let transfers = Transfers::new(moto.bucket("special").await);
        let job = TempDir::new().expect("tempdir");
        nix::unistd::mkfifo(&job.path().join("pipe"), Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        write(job.path(), "original", b"secret");
        std::fs::hard_link(job.path().join("original"), job.path().join("copy"))
            .expect("hard link");

        let message = job_error(
            transfers
                .upload_outputs(&[transfer("s3://special/", "pipe")], job.path())
                .await,
        );
        assert_eq!(
            message,
            "output pipe: pipe is a named pipe; only regular files and directories are transferred"
        );
        let message = job_error(
            transfers
                .upload_outputs(&[transfer("s3://special/", "copy")], job.path())
                .await,
        );
        assert_eq!(
            message,
            "output copy: copy has 2 hard links; an output file must have exactly one"
        );
    }

    #[tokio::test]
    async fn download_refuses_to_write_through_a_symlinked_directory() {
        let moto = Moto::start();
        let client = moto.bucket("inbox").await;
        client
            .put_object()
            .bucket("inbox")
            .key("k")
            .body(ByteStream::from_static(b"payload"))
            .send()
            .await
            .expect("put");
        let transfers = Transfers::new(client);
        let job = TempDir::new().expect("tempdir");
        let elsewhere = TempDir::new().expect("tempdir");
        symlink(elsewhere.path(), job.path().join("data")).expect("symlink");

        let message = job_error(
            transfers
                .download_inputs(&[transfer("s3://inbox/k", "data/k")], job.path())
                .await,
        );
        assert_eq!(
            message,
            "input s3://inbox/k: data is a symbolic link, which is never followed"
        );
        let written = std::fs::read_dir(elsewhere.path())
            .expect("listing")
            .count();
        assert_eq!(written, 0, "nothing may be written outside the work dir");
    }

    #[tokio::test]
    async fn download_does_not_replace_a_symlink_at_the_destination() {
        let moto = Moto::start();
        let client = moto.bucket("inbox").await;
        client
            .put_object()
            .bucket("inbox")
            .key("k")
            .body(ByteStream::from_static(b"payload"))
            .send()
            .await
            .expect("put");
        let transfers = Transfers::new(client);
        let job = TempDir::new().expect("tempdir");
        let elsewhere = TempDir::new().expect("tempdir");
        write(elsewhere.path(), "target", b"untouched");
        symlink(elsewhere.path().join("target"), job.path().join("k")).expect("symlink");

        let message = job_error(
            transfers
                .download_inputs(&[transfer("s3://inbox/k", "k")], job.path())
                .await,
        );
        assert_eq!(
            message,
            "input s3://inbox/k: k is a symbolic link, which is never followed"
        );
        let target = std::fs::read(elsewhere.path().join("target")).expect("target");
        assert_eq!(target, b"untouched");
        let names = std::fs::read_dir(job.path()).expect("listing").count();
        assert_eq!(names, 1, "only the link may remain, no temporary file");
    }

    #[test]
    fn output_path_leaving_the_work_dir_is_refused() {
        let job = TempDir::new().expect("tempdir");
        let message = job_error(plan_uploads(&[transfer("s3://b/", "../etc")], job.path()));
        assert_eq!(
            message,
            "output ../etc: ../etc is not a relative path inside the work dir"
        );
        let message = job_error(plan_uploads(
            &[transfer("s3://b/", "/etc/passwd")],
            job.path(),
        ));
        assert_eq!(
            message,
            "output /etc/passwd: /etc/passwd is not a relative path inside the work dir"
        );
    }
}
