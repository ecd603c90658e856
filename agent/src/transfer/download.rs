//! One input: streamed from S3 into a temporary file beside its destination,
//! checked, and renamed into place only when whole. A failed or cancelled
//! download leaves nothing behind and never writes outside the work dir.

use std::ffi::{OsStr, OsString};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumMode;
use md5::{Digest, Md5};
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use tokio::io::{AsyncWriteExt, BufWriter};

use super::integrity::{ContentDigest, ExpectedContent};
use super::paths::{
    file_kind, open_dir_beneath, split_relative, FileKind, MissingDirs, PathRefusal,
};
use super::{AgentTrouble, S3Url, TransferError, Transfers, MIB};
use crate::envelope::Transfer;

/// Buffer between the network and a downloading file, so that the disk sees large writes.
const DOWNLOAD_BUFFER_BYTES: usize = MIB as usize;
/// How many temporary names a download tries before giving up.
const PARTIAL_NAME_ATTEMPTS: u32 = 16;

impl Transfers {
    pub(super) async fn download_input(
        &self,
        input: &Transfer,
        root: BorrowedFd<'_>,
    ) -> Result<(), TransferError> {
        let url = input.url.as_str();
        let context = format!("input {url}");
        let location = S3Url::parse(url)
            .filter(|l| !l.key.is_empty() && !l.key.ends_with('/'))
            .ok_or_else(|| TransferError::job(&context, "not an s3://bucket/key URL"))?;
        let (parents, name) = split_relative(&input.path).map_err(|r| r.into_error(&context))?;
        let dir = open_dir_beneath(root, &parents, MissingDirs::Create)
            .map_err(|r| r.into_error(&context))?;
        let (partial, file) = PartialDownload::create(dir, &context)?;

        let response = self
            .client
            .get_object()
            .bucket(location.bucket)
            .key(location.key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| get_object_error(&context, e))?;
        let expected = ExpectedContent::of(&response);
        let digest = write_body(file, response.body, &context).await?;
        expected.check(&digest, &context)?;
        partial.commit(name, &input.path, &context)?;
        tracing::debug!(url, path = %input.path.display(), bytes = digest.length, "input downloaded");
        Ok(())
    }
}

fn get_object_error(context: &str, error: SdkError<GetObjectError>) -> TransferError {
    if error
        .as_service_error()
        .is_some_and(GetObjectError::is_no_such_key)
    {
        return TransferError::job(context, "no such object");
    }
    if error.code() == Some("NoSuchBucket") {
        return TransferError::job(context, "no such bucket");
    }
    if error.raw_response().map(|r| r.status().as_u16()) == Some(404) {
        return TransferError::job(context, "no such object");
    }
    TransferError::agent(context, AgentTrouble::s3("downloading", error))
}

/// A download in progress: a temporary file beside its destination,
/// removed again unless it is committed.
struct PartialDownload {
    dir: OwnedFd,
    name: OsString,
    committed: bool,
}

impl PartialDownload {
    /// Creates the temporary file in `dir` and returns it, open for writing.
    fn create(
        dir: OwnedFd,
        context: &str,
    ) -> Result<(PartialDownload, std::fs::File), TransferError> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut last_error = Errno::EEXIST;
        for _ in 0..PARTIAL_NAME_ATTEMPTS {
            let name = OsString::from(format!(
                ".batchly-partial-{}-{}",
                std::process::id(),
                SEQUENCE.fetch_add(1, Ordering::Relaxed)
            ));
            match openat(
                &dir,
                name.as_os_str(),
                flags,
                Mode::from_bits_truncate(0o644),
            ) {
                Ok(fd) => {
                    let partial = PartialDownload {
                        dir,
                        name,
                        committed: false,
                    };
                    return Ok((partial, std::fs::File::from(fd)));
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => {
                    last_error = e;
                    break;
                }
            }
        }
        Err(TransferError::agent(
            context,
            AgentTrouble::io("creating a temporary file for the download", last_error),
        ))
    }

    /// Moves the finished file to `name`, refusing to replace a link or a
    /// directory there.
    fn commit(mut self, name: &OsStr, path: &Path, context: &str) -> Result<(), TransferError> {
        match fstatat(&self.dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => match file_kind(&stat) {
                FileKind::Regular => {}
                FileKind::Symlink => {
                    return Err(PathRefusal::Symlink(path.to_path_buf()).into_error(context))
                }
                FileKind::Directory => {
                    return Err(PathRefusal::Directory(path.to_path_buf()).into_error(context))
                }
                FileKind::Special(kind) => {
                    return Err(PathRefusal::Special(path.to_path_buf(), kind).into_error(context))
                }
            },
            Err(Errno::ENOENT) => {}
            Err(e) => {
                return Err(PathRefusal::Io(path.to_path_buf(), "inspecting", e).into_error(context))
            }
        }
        renameat(&self.dir, self.name.as_os_str(), &self.dir, name).map_err(|e| {
            PathRefusal::Io(path.to_path_buf(), "renaming into", e).into_error(context)
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialDownload {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the work dir is removed with the job anyway.
            let _ = unlinkat(&self.dir, self.name.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Streams `body` into `file`, hashing as it goes.
async fn write_body(
    file: std::fs::File,
    mut body: ByteStream,
    context: &str,
) -> Result<ContentDigest, TransferError> {
    let mut writer =
        BufWriter::with_capacity(DOWNLOAD_BUFFER_BYTES, tokio::fs::File::from_std(file));
    let mut md5 = Md5::new();
    let mut length: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| TransferError::agent(context, AgentTrouble::s3("downloading", e)))?;
        md5.update(&chunk);
        length += chunk.len() as u64;
        writer
            .write_all(&chunk)
            .await
            .map_err(|e| TransferError::agent(context, AgentTrouble::io("writing", e)))?;
    }
    // tokio writes in the background: flush so the bytes are in the file
    // before it is renamed into place.
    writer
        .flush()
        .await
        .map_err(|e| TransferError::agent(context, AgentTrouble::io("writing", e)))?;
    Ok(ContentDigest {
        length,
        md5: md5.finalize().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::moto::{job_error, transfer, Moto};
    use super::*;

    use tempfile::TempDir;

    #[tokio::test]
    async fn missing_input_object_is_the_jobs_fault_and_names_the_url() {
        let moto = Moto::start();
        let transfers = Transfers::new(moto.bucket("inputs").await);
        let job = TempDir::new().expect("tempdir");

        let message = job_error(
            transfers
                .download_inputs(&[transfer("s3://inputs/no/such.csv", "a.csv")], job.path())
                .await,
        );
        assert_eq!(message, "input s3://inputs/no/such.csv: no such object");
        assert!(!job.path().join("a.csv").exists());
        let leftovers = std::fs::read_dir(job.path()).expect("listing").count();
        assert_eq!(leftovers, 0, "no temporary file may remain");
    }

    #[tokio::test]
    async fn input_from_a_bucket_that_does_not_exist_is_the_jobs_fault() {
        let moto = Moto::start();
        let transfers = Transfers::new(moto.client().await);
        let job = TempDir::new().expect("tempdir");

        let message = job_error(
            transfers
                .download_inputs(&[transfer("s3://nowhere/k", "k")], job.path())
                .await,
        );
        assert_eq!(message, "input s3://nowhere/k: no such bucket");
    }
}
