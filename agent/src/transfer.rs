//! S3 inputs and outputs of a job: every input is downloaded into the job's
//! work dir before it starts, and its outputs are uploaded after it exits 0.
//! The agent runs as root while the job decides what the work dir holds, so
//! this module must never follow a link the job planted and never read or
//! write outside the work dir: every path is opened one component at a time
//! beneath an open descriptor of the work dir with `O_NOFOLLOW`, and only
//! regular files and directories are ever read or written. It must also
//! never hold a whole object in memory: downloads stream to disk, and large
//! uploads go up one part at a time.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::{GetObjectError, GetObjectOutput};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
    ServerSideEncryption,
};
use md5::{Digest, Md5};
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

use crate::envelope::Transfer;

/// Output files larger than this go up as a multipart upload.
pub const MULTIPART_THRESHOLD: u64 = 16 * MIB;
/// Size of every part but the last; S3 wants 5 MiB to 5 GiB (S3 user guide, "Multipart upload limits").
const PART_SIZE: u64 = 8 * MIB;
/// At most this many parts per upload (S3 user guide, "Multipart upload limits").
const MAX_PARTS: u64 = 10_000;
/// Largest object S3 stores (S3 user guide, "Multipart upload limits").
const MAX_OBJECT_BYTES: u64 = 5 * 1024 * 1024 * MIB;
/// S3 keys are at most 1024 bytes of UTF-8 (S3 user guide, "Naming objects").
const MAX_S3_KEY_BYTES: usize = 1024;
/// Buffer between the network and a downloading file, so that the disk sees large writes.
const DOWNLOAD_BUFFER_BYTES: usize = MIB as usize;
/// How many temporary names a download tries before giving up.
const PARTIAL_NAME_ATTEMPTS: u32 = 16;
const MIB: u64 = 1024 * 1024;

/// Moves a job's inputs and outputs between S3 and its work dir.
pub struct Transfers {
    client: aws_sdk_s3::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The job's own fault: a missing input object, an output the job did
    /// not create, an output that is a link, a special file or leaves the
    /// work dir. The message names the URL or path.
    #[error("{0}")]
    Job(String),
    /// Anything else (access denied, network, disk): the agent's or the
    /// platform's problem. The message names the URL and the cause.
    #[error("{0}")]
    Agent(String),
}

impl Transfers {
    pub fn new(client: aws_sdk_s3::Client) -> Transfers {
        Transfers { client }
    }

    /// Downloads every input into `work_dir`, creating parent directories.
    /// Each object streams into a temporary file beside its destination and
    /// is renamed into place only once complete and verified: S3's checksum
    /// is checked by the SDK where the object has one, and a plain-MD5 ETag
    /// is checked here.
    pub async fn download_inputs(
        &self,
        inputs: &[Transfer],
        work_dir: &Path,
    ) -> Result<(), TransferError> {
        let root = open_work_dir(work_dir)?;
        for input in inputs {
            self.download_input(input, root.as_fd()).await?;
        }
        Ok(())
    }

    /// Uploads each output (a file, or a directory taken recursively) and
    /// returns how many objects were written. Every output is checked
    /// before anything is sent, so an output the job got wrong leaves the
    /// bucket untouched.
    pub async fn upload_outputs(
        &self,
        outputs: &[Transfer],
        work_dir: &Path,
    ) -> Result<usize, TransferError> {
        let owned_outputs = outputs.to_vec();
        let owned_work_dir = work_dir.to_path_buf();
        let uploads =
            tokio::task::spawn_blocking(move || plan_uploads(&owned_outputs, &owned_work_dir))
                .await
                .map_err(|e| TransferError::Agent(format!("listing outputs: {e}")))??;
        let root = open_work_dir(work_dir)?;
        for upload in &uploads {
            self.upload_file(upload, root.as_fd()).await?;
        }
        Ok(uploads.len())
    }

    async fn download_input(
        &self,
        input: &Transfer,
        root: BorrowedFd<'_>,
    ) -> Result<(), TransferError> {
        let url = input.url.as_str();
        let context = format!("input {url}");
        let location = S3Url::parse(url)
            .filter(|l| !l.key.is_empty() && !l.key.ends_with('/'))
            .ok_or_else(|| TransferError::Job(format!("{context}: not an s3://bucket/key URL")))?;
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

    async fn upload_file(
        &self,
        upload: &PlannedUpload,
        root: BorrowedFd<'_>,
    ) -> Result<(), TransferError> {
        let context = format!("output {}", upload.output.display());
        let (file, size) =
            open_regular_file_beneath(root, &upload.file).map_err(|r| r.into_error(&context))?;
        let context = format!("{context}: s3://{}/{}", upload.bucket, upload.key);
        let mut file = tokio::fs::File::from_std(file);
        if size > MAX_OBJECT_BYTES {
            return Err(TransferError::Job(format!(
                "{context}: {} is {size} bytes; S3 stores at most {MAX_OBJECT_BYTES} bytes per object",
                upload.file.display()
            )));
        }
        if size > MULTIPART_THRESHOLD {
            self.upload_multipart(&mut file, size, upload, &context)
                .await?;
        } else {
            let body = read_exactly(&mut file, size, &upload.file, &context).await?;
            ensure_no_more_bytes(&mut file, &upload.file, &context).await?;
            self.client
                .put_object()
                .bucket(&upload.bucket)
                .key(&upload.key)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .content_length(to_i64(size))
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| s3_error(&context, "uploading", e))?;
        }
        tracing::debug!(
            path = %upload.file.display(),
            bucket = %upload.bucket,
            key = %upload.key,
            bytes = size,
            "output uploaded"
        );
        Ok(())
    }

    /// Sends `file` as a multipart upload, aborting the upload on any
    /// failure so that no parts linger (and cost) in the bucket.
    async fn upload_multipart(
        &self,
        file: &mut tokio::fs::File,
        size: u64,
        upload: &PlannedUpload,
        context: &str,
    ) -> Result<(), TransferError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&upload.bucket)
            .key(&upload.key)
            // A full-object CRC (S3 combines the parts' CRCs) lets a later
            // download verify the whole object; a composite one cannot be.
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .checksum_type(ChecksumType::FullObject)
            .send()
            .await
            .map_err(|e| s3_error(context, "starting the multipart upload", e))?;
        let upload_id = created.upload_id().ok_or_else(|| {
            TransferError::Agent(format!(
                "{context}: S3 started a multipart upload without an id"
            ))
        })?;
        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: upload.bucket.clone(),
            key: upload.key.clone(),
            upload_id: Some(upload_id.to_owned()),
        };
        let result = self
            .send_parts_and_complete(file, size, upload, upload_id, context)
            .await;
        if result.is_err() {
            guard.abort_now().await;
        }
        guard.disarm();
        result
    }

    async fn send_parts_and_complete(
        &self,
        file: &mut tokio::fs::File,
        size: u64,
        upload: &PlannedUpload,
        upload_id: &str,
        context: &str,
    ) -> Result<(), TransferError> {
        let part_size = part_size_for(size);
        let mut parts = Vec::new();
        let mut sent = 0;
        let mut part_number: i32 = 1;
        while sent < size {
            let length = part_size.min(size - sent);
            let body = read_exactly(file, length, &upload.file, context).await?;
            let part = self
                .client
                .upload_part()
                .bucket(&upload.bucket)
                .key(&upload.key)
                .upload_id(upload_id)
                .part_number(part_number)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .content_length(to_i64(length))
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| s3_error(context, &format!("uploading part {part_number}"), e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(part_number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .set_checksum_crc32(part.checksum_crc32().map(str::to_owned))
                    .build(),
            );
            sent += length;
            part_number += 1;
        }
        ensure_no_more_bytes(file, &upload.file, context).await?;
        self.client
            .complete_multipart_upload()
            .bucket(&upload.bucket)
            .key(&upload.key)
            .upload_id(upload_id)
            .checksum_type(ChecksumType::FullObject)
            .mpu_object_size(to_i64(size))
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error(context, "completing the multipart upload", e))?;
        Ok(())
    }
}

/// Aborts a multipart upload that was neither completed nor aborted, also
/// when the uploading future is dropped (cancelled) halfway.
struct AbortOnDrop {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    /// `None` once the upload needs no abort.
    upload_id: Option<String>,
}

impl AbortOnDrop {
    async fn abort_now(&mut self) {
        if let Some(upload_id) = self.upload_id.take() {
            abort_upload(
                self.client.clone(),
                self.bucket.clone(),
                self.key.clone(),
                upload_id,
            )
            .await;
        }
    }

    fn disarm(&mut self) {
        self.upload_id = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(abort_upload(
                    self.client.clone(),
                    self.bucket.clone(),
                    self.key.clone(),
                    upload_id,
                ));
            }
            Err(_) => tracing::warn!(
                bucket = %self.bucket,
                key = %self.key,
                upload_id,
                "multipart upload left incomplete: no runtime to abort it"
            ),
        }
    }
}

async fn abort_upload(client: aws_sdk_s3::Client, bucket: String, key: String, upload_id: String) {
    let aborted = client
        .abort_multipart_upload()
        .bucket(&bucket)
        .key(&key)
        .upload_id(&upload_id)
        .send()
        .await;
    if let Err(e) = aborted {
        // Only storage cost is at stake; a lifecycle rule cleans up the rest.
        tracing::warn!(
            bucket,
            key,
            upload_id,
            error = %DisplayErrorContext(&e),
            "cannot abort a failed multipart upload"
        );
    }
}

/// Part size for a file of `size` bytes: `PART_SIZE`, or more when the
/// file would otherwise need more than S3's `MAX_PARTS`.
fn part_size_for(size: u64) -> u64 {
    PART_SIZE.max(size.div_ceil(MAX_PARTS).next_multiple_of(MIB))
}

fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Reads the next `length` bytes of an output file, which must still be there.
async fn read_exactly(
    file: &mut tokio::fs::File,
    length: u64,
    path: &Path,
    context: &str,
) -> Result<Vec<u8>, TransferError> {
    let mut buffer = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
    (&mut *file)
        .take(length)
        .read_to_end(&mut buffer)
        .await
        .map_err(|e| TransferError::Agent(format!("{context}: reading {}: {e}", path.display())))?;
    if buffer.len() as u64 != length {
        return Err(changed_while_uploading(path, context));
    }
    Ok(buffer)
}

async fn ensure_no_more_bytes(
    file: &mut tokio::fs::File,
    path: &Path,
    context: &str,
) -> Result<(), TransferError> {
    let mut probe = [0u8; 1];
    let read = file
        .read(&mut probe)
        .await
        .map_err(|e| TransferError::Agent(format!("{context}: reading {}: {e}", path.display())))?;
    if read != 0 {
        return Err(changed_while_uploading(path, context));
    }
    Ok(())
}

fn changed_while_uploading(path: &Path, context: &str) -> TransferError {
    // The job has exited; only something it left running can still write.
    TransferError::Job(format!(
        "{context}: {} changed size while being uploaded",
        path.display()
    ))
}

fn get_object_error(context: &str, error: SdkError<GetObjectError>) -> TransferError {
    if error
        .as_service_error()
        .is_some_and(GetObjectError::is_no_such_key)
    {
        return TransferError::Job(format!("{context}: no such object"));
    }
    if error.code() == Some("NoSuchBucket") {
        return TransferError::Job(format!("{context}: no such bucket"));
    }
    if error.raw_response().map(|r| r.status().as_u16()) == Some(404) {
        return TransferError::Job(format!("{context}: no such object"));
    }
    TransferError::Agent(format!(
        "{context}: downloading: {}",
        DisplayErrorContext(&error)
    ))
}

fn s3_error<E>(context: &str, doing: &str, error: SdkError<E>) -> TransferError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if error.code() == Some("NoSuchBucket") {
        return TransferError::Job(format!("{context}: no such bucket"));
    }
    TransferError::Agent(format!(
        "{context}: {doing}: {}",
        DisplayErrorContext(&error)
    ))
}

/// `s3://bucket/key`, split at the first `/` after the bucket.
#[derive(Debug, PartialEq)]
struct S3Url<'a> {
    bucket: &'a str,
    /// Possibly empty (the whole bucket) or ending in `/` (a prefix).
    key: &'a str,
}

impl<'a> S3Url<'a> {
    fn parse(url: &'a str) -> Option<S3Url<'a>> {
        let rest = url.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return None;
        }
        Some(S3Url { bucket, key })
    }
}

/// What the downloaded bytes must match, from the response headers.
#[derive(Debug)]
struct ExpectedContent {
    length: Option<u64>,
    md5: Option<[u8; 16]>,
}

impl ExpectedContent {
    fn of(response: &GetObjectOutput) -> ExpectedContent {
        // With SSE-KMS or SSE-C the ETag is not the MD5 of the content.
        let etag_is_content_md5 = matches!(
            response.server_side_encryption(),
            None | Some(ServerSideEncryption::Aes256)
        ) && response.sse_customer_algorithm().is_none();
        ExpectedContent {
            length: response
                .content_length()
                .and_then(|l| u64::try_from(l).ok()),
            md5: response
                .e_tag()
                .filter(|_| etag_is_content_md5)
                .and_then(md5_from_etag),
        }
    }

    fn check(&self, got: &ContentDigest, context: &str) -> Result<(), TransferError> {
        if let Some(length) = self.length {
            if length != got.length {
                return Err(TransferError::Agent(format!(
                    "{context}: received {} bytes, S3 announced {length}; the download is discarded",
                    got.length
                )));
            }
        }
        if let Some(md5) = self.md5 {
            if md5 != got.md5 {
                return Err(TransferError::Agent(format!(
                    "{context}: content MD5 {} does not match the ETag {}; the download is discarded",
                    hex(&got.md5),
                    hex(&md5)
                )));
            }
        }
        Ok(())
    }
}

/// What was actually received.
#[derive(Debug)]
struct ContentDigest {
    length: u64,
    md5: [u8; 16],
}

/// The MD5 an ETag stands for, when it is one: 32 hex digits, optionally
/// in quotes. Multipart ETags (`"…-N"`) are not an MD5 of the content.
fn md5_from_etag(etag: &str) -> Option<[u8; 16]> {
    let digits = etag.trim_matches('"').as_bytes();
    if digits.len() != 32 {
        return None;
    }
    let mut md5 = [0u8; 16];
    for (byte, pair) in md5.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(md5)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
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
        Err(TransferError::Agent(format!(
            "{context}: creating a temporary file for the download: {last_error}"
        )))
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
        let chunk = chunk.map_err(|e| {
            TransferError::Agent(format!(
                "{context}: downloading: {}",
                DisplayErrorContext(&e)
            ))
        })?;
        md5.update(&chunk);
        length += chunk.len() as u64;
        writer
            .write_all(&chunk)
            .await
            .map_err(|e| TransferError::Agent(format!("{context}: writing: {e}")))?;
    }
    // tokio writes in the background: flush so the bytes are in the file
    // before it is renamed into place.
    writer
        .flush()
        .await
        .map_err(|e| TransferError::Agent(format!("{context}: writing: {e}")))?;
    Ok(ContentDigest {
        length,
        md5: md5.finalize().into(),
    })
}

/// One file to upload, found by `plan_uploads`.
#[derive(Debug, PartialEq)]
struct PlannedUpload {
    /// The output it belongs to, for messages.
    output: PathBuf,
    /// The file, relative to the work dir.
    file: PathBuf,
    bucket: String,
    key: String,
}

/// Finds every file the outputs name and checks them all, without reading
/// any: a link, a special file or a missing output stops the whole upload.
fn plan_uploads(
    outputs: &[Transfer],
    work_dir: &Path,
) -> Result<Vec<PlannedUpload>, TransferError> {
    let root = open_work_dir(work_dir)?;
    let mut uploads = Vec::new();
    for output in outputs {
        let context = format!("output {}", output.path.display());
        let location = S3Url::parse(&output.url).ok_or_else(|| {
            TransferError::Job(format!(
                "{context}: {} is not an s3://bucket/prefix URL",
                output.url
            ))
        })?;
        let (parents, name) = split_relative(&output.path).map_err(|r| r.into_error(&context))?;
        let dir = open_dir_beneath(root.as_fd(), &parents, MissingDirs::Refuse)
            .map_err(|r| r.absent_means_not_created().into_error(&context))?;
        let stat = stat_beneath(&dir, name, &output.path)
            .map_err(|r| r.absent_means_not_created().into_error(&context))?;
        match file_kind(&stat) {
            FileKind::Regular => {
                check_single_link(&stat, &output.path).map_err(|r| r.into_error(&context))?;
                let key = match location.key {
                    key if !key.is_empty() && !key.ends_with('/') => key.to_owned(),
                    prefix => format!("{prefix}{}", utf8_name(name, &output.path, &context)?),
                };
                uploads.push(planned(
                    output,
                    output.path.clone(),
                    location.bucket,
                    key,
                    &context,
                )?);
            }
            FileKind::Directory => {
                let prefix = match location.key {
                    key if !key.is_empty() && !key.ends_with('/') => format!("{key}/"),
                    prefix => prefix.to_owned(),
                };
                let files = list_tree(root.as_fd(), &output.path, &prefix, &context)?;
                for (file, key) in files {
                    uploads.push(planned(output, file, location.bucket, key, &context)?);
                }
            }
            FileKind::Symlink => {
                return Err(PathRefusal::Symlink(output.path.clone()).into_error(&context))
            }
            FileKind::Special(kind) => {
                return Err(PathRefusal::Special(output.path.clone(), kind).into_error(&context))
            }
        }
    }
    Ok(uploads)
}

fn planned(
    output: &Transfer,
    file: PathBuf,
    bucket: &str,
    key: String,
    context: &str,
) -> Result<PlannedUpload, TransferError> {
    if key.len() > MAX_S3_KEY_BYTES {
        return Err(TransferError::Job(format!(
            "{context}: {} would need a key of {} bytes; S3 allows at most {MAX_S3_KEY_BYTES}",
            file.display(),
            key.len()
        )));
    }
    Ok(PlannedUpload {
        output: output.path.clone(),
        file,
        bucket: bucket.to_owned(),
        key,
    })
}

/// Every regular file under the directory `top` (relative to the work
/// dir), with its key: `prefix` followed by its path inside `top`. Sorted,
/// so uploads happen in a stable order.
fn list_tree(
    root: BorrowedFd<'_>,
    top: &Path,
    prefix: &str,
    context: &str,
) -> Result<Vec<(PathBuf, String)>, TransferError> {
    let mut files = Vec::new();
    // Directories still to list, by path: holding a descriptor for each
    // could exhaust the agent's descriptors on a wide tree.
    let mut pending = vec![(top.to_path_buf(), prefix.to_owned())];
    while let Some((dir_path, dir_key)) = pending.pop() {
        let parts: Vec<&OsStr> = dir_path.iter().collect();
        let dir = open_dir_beneath(root, &parts, MissingDirs::Refuse)
            .and_then(|dir| list_names(&dir, &dir_path).map(|names| (dir, names)));
        let (dir, mut names) = dir.map_err(|r| r.into_error(context))?;
        names.sort();
        for name in names {
            let path = dir_path.join(&name);
            let key = format!("{dir_key}{}", utf8_name(&name, &path, context)?);
            if key.len() > MAX_S3_KEY_BYTES {
                // Checked before descending too: it bounds how deep the walk goes.
                return Err(TransferError::Job(format!(
                    "{context}: {} would need a key of more than {MAX_S3_KEY_BYTES} bytes, S3's limit",
                    path.display()
                )));
            }
            let stat = stat_beneath(&dir, &name, &path).map_err(|r| r.into_error(context))?;
            match file_kind(&stat) {
                FileKind::Regular => {
                    check_single_link(&stat, &path).map_err(|r| r.into_error(context))?;
                    files.push((path, key));
                }
                FileKind::Directory => pending.push((path, format!("{key}/"))),
                FileKind::Symlink => return Err(PathRefusal::Symlink(path).into_error(context)),
                FileKind::Special(kind) => {
                    return Err(PathRefusal::Special(path, kind).into_error(context))
                }
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The names in the open directory `dir` (at `path`).
fn list_names(dir: &OwnedFd, path: &Path) -> Result<Vec<OsString>, PathRefusal> {
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

fn utf8_name<'a>(name: &'a OsStr, path: &Path, context: &str) -> Result<&'a str, TransferError> {
    name.to_str().ok_or_else(|| {
        TransferError::Job(format!(
            "{context}: the name of {} is not UTF-8, which an S3 key must be",
            path.display()
        ))
    })
}

/// Why a path under the work dir cannot be used. Paths are relative to the
/// work dir.
#[derive(Debug)]
enum PathRefusal {
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
    fn absent_means_not_created(self) -> PathRefusal {
        match self {
            PathRefusal::Vanished(_) => PathRefusal::NotCreated,
            other => other,
        }
    }

    fn into_error(self, context: &str) -> TransferError {
        use PathRefusal::*;
        let job = |text: String| TransferError::Job(format!("{context}: {text}"));
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
                TransferError::Agent(format!("{context}: {doing} {}: {errno}", path.display()))
            }
        }
    }
}

enum FileKind {
    Regular,
    Directory,
    Symlink,
    Special(&'static str),
}

fn file_kind(stat: &FileStat) -> FileKind {
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
fn check_single_link(stat: &FileStat, path: &Path) -> Result<(), PathRefusal> {
    if stat.st_nlink > 1 {
        return Err(PathRefusal::HardLinked(path.to_path_buf(), stat.st_nlink));
    }
    Ok(())
}

fn open_work_dir(work_dir: &Path) -> Result<OwnedFd, TransferError> {
    // The work dir itself is the agent's; what lies beneath it is the job's.
    nix::fcntl::open(work_dir, directory_flags(), Mode::empty())
        .map_err(|e| TransferError::Agent(format!("opening work dir {}: {e}", work_dir.display())))
}

fn directory_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Splits a work-dir-relative path into its parent directories and its
/// final name, refusing anything but plain names.
fn split_relative(path: &Path) -> Result<(Vec<&OsStr>, &OsStr), PathRefusal> {
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
enum MissingDirs {
    /// Create missing directories (downloads).
    Create,
    /// A missing directory means the job did not create the output.
    Refuse,
}

/// Opens the directory `parts` beneath `root` one component at a time,
/// never following a link.
fn open_dir_beneath(
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

fn stat_beneath(dir: &impl AsFd, name: &OsStr, path: &Path) -> Result<FileStat, PathRefusal> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| match e {
        Errno::ENOENT => PathRefusal::Vanished(path.to_path_buf()),
        other => PathRefusal::Io(path.to_path_buf(), "inspecting", other),
    })
}

/// Opens a regular file beneath `root` for reading, re-checking what
/// `plan_uploads` saw: the job's leftovers may have changed it since.
fn open_regular_file_beneath(
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
    use std::os::unix::fs::symlink;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use aws_sdk_s3::config::retry::RetryConfig;
    use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// How long a starting moto server may take to accept connections.
    const MOTO_START_WAIT: Duration = Duration::from_secs(30);
    const MOTO_POLL: Duration = Duration::from_millis(20);

    /// A moto server of its own for one test, on a free local port, killed
    /// when the test ends (also when it panics).
    struct Moto {
        child: Child,
        addr: SocketAddr,
    }

    impl Moto {
        fn start() -> Moto {
            let program = std::env::var_os("BATCHLY_TEST_MOTO")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/venv/bin/moto_server")
                });
            // Another process may take the free port before moto binds it:
            // then moto exits and a new port is tried.
            for _ in 0..5 {
                let port = StdTcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free local port")
                    .port();
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let child = Command::new(&program)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!(
                            "cannot start {} (set BATCHLY_TEST_MOTO): {e}",
                            program.display()
                        )
                    });
                let mut moto = Moto { child, addr };
                let deadline = Instant::now() + MOTO_START_WAIT;
                loop {
                    let exited = moto.child.try_wait().expect("moto's status").is_some();
                    if exited {
                        break;
                    }
                    if StdTcpStream::connect(addr).is_ok() {
                        return moto;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "moto did not accept connections on {addr} within {MOTO_START_WAIT:?}"
                    );
                    std::thread::sleep(MOTO_POLL);
                }
            }
            panic!(
                "moto exited at start five times: is {} usable?",
                program.display()
            );
        }

        fn endpoint(&self) -> String {
            format!("http://{}", self.addr)
        }

        async fn client(&self) -> aws_sdk_s3::Client {
            client_for(
                &self.endpoint(),
                RequestChecksumCalculation::WhenSupported,
                RetryConfig::standard(),
            )
            .await
        }

        /// A client and a fresh, empty bucket.
        async fn bucket(&self, name: &str) -> aws_sdk_s3::Client {
            let client = self.client().await;
            client
                .create_bucket()
                .bucket(name)
                .send()
                .await
                .expect("creating the test bucket");
            client
        }
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn client_for(
        endpoint: &str,
        checksums: RequestChecksumCalculation,
        retries: RetryConfig,
    ) -> aws_sdk_s3::Client {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .endpoint_url(endpoint)
            .load()
            .await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .request_checksum_calculation(checksums)
            .retry_config(retries)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    fn transfer(url: &str, path: &str) -> Transfer {
        Transfer {
            url: url.to_owned(),
            path: PathBuf::from(path),
        }
    }

    fn write(dir: &Path, path: &str, content: &[u8]) {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("a path with a parent"))
            .expect("creating parent dirs");
        std::fs::write(path, content).expect("writing a test file");
    }

    /// Deterministic bytes that do not compress or repeat.
    fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    async fn keys_in(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
        let listed = client
            .list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .expect("listing the bucket");
        let mut keys: Vec<String> = listed
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect();
        keys.sort();
        keys
    }

    async fn object(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
        let got = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .expect("getting an object");
        got.body
            .collect()
            .await
            .expect("reading an object")
            .into_bytes()
            .to_vec()
    }

    fn job_error(result: Result<impl std::fmt::Debug, TransferError>) -> String {
        match result {
            Err(TransferError::Job(message)) => message,
            other => panic!("expected a job error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn small_file_round_trips_through_upload_and_download() {
        let moto = Moto::start();
        let client = moto.bucket("small").await;
        let transfers = Transfers::new(client.clone());
        let job = TempDir::new().expect("tempdir");
        let content = b"id,value\n1,42\n".to_vec();
        write(job.path(), "results/out.csv", &content);

        let uploaded = transfers
            .upload_outputs(
                &[transfer("s3://small/runs/7/out.csv", "results/out.csv")],
                job.path(),
            )
            .await
            .expect("upload");
        assert_eq!(uploaded, 1);
        assert_eq!(keys_in(&client, "small").await, ["runs/7/out.csv"]);

        let next = TempDir::new().expect("tempdir");
        transfers
            .download_inputs(
                &[transfer("s3://small/runs/7/out.csv", "data/in/out.csv")],
                next.path(),
            )
            .await
            .expect("download");
        let downloaded = std::fs::read(next.path().join("data/in/out.csv")).expect("input");
        assert_eq!(downloaded, content);
        let leftovers: Vec<_> = std::fs::read_dir(next.path().join("data/in"))
            .expect("listing")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, ["out.csv"], "no temporary file may remain");
    }

    #[tokio::test]
    async fn fifty_mebibyte_file_goes_up_in_parts_and_comes_back_identical() {
        let moto = Moto::start();
        let client = moto.bucket("large").await;
        let transfers = Transfers::new(client.clone());
        let job = TempDir::new().expect("tempdir");
        let content = pseudo_random_bytes(50 * MIB as usize + 12_345, 7);
        write(job.path(), "model.bin", &content);

        let uploaded = transfers
            .upload_outputs(&[transfer("s3://large/models/", "model.bin")], job.path())
            .await
            .expect("upload");
        assert_eq!(uploaded, 1);
        let head = client
            .head_object()
            .bucket("large")
            .key("models/model.bin")
            .send()
            .await
            .expect("head");
        // 50 MiB and a bit in 8 MiB parts: six full parts and a short one.
        assert!(
            head.e_tag()
                .is_some_and(|t| t.trim_matches('"').ends_with("-7")),
            "ETag {:?} is not that of a 7-part upload",
            head.e_tag()
        );
        let uploads = client
            .list_multipart_uploads()
            .bucket("large")
            .send()
            .await
            .expect("listing uploads");
        assert!(
            uploads.uploads().is_empty(),
            "no multipart upload may stay open"
        );
        let checksum = client
            .head_object()
            .bucket("large")
            .key("models/model.bin")
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .expect("head");
        // A whole-object CRC, which the SDK checks when downloading.
        assert_eq!(checksum.checksum_type(), Some(&ChecksumType::FullObject));
        assert!(
            checksum.checksum_crc32().is_some_and(|c| !c.contains('-')),
            "checksum {:?} is not a whole-object CRC32",
            checksum.checksum_crc32()
        );

        let next = TempDir::new().expect("tempdir");
        transfers
            .download_inputs(
                &[transfer("s3://large/models/model.bin", "m.bin")],
                next.path(),
            )
            .await
            .expect("download");
        let downloaded = std::fs::read(next.path().join("m.bin")).expect("input");
        assert!(downloaded == content, "the downloaded bytes differ");
    }

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

    #[tokio::test]
    async fn output_directory_uploads_every_nested_file_under_the_prefix() {
        let moto = Moto::start();
        let client = moto.bucket("tree").await;
        let transfers = Transfers::new(client.clone());
        let job = TempDir::new().expect("tempdir");
        write(job.path(), "out/summary.json", b"{}");
        write(job.path(), "out/parts/0001.csv", b"a");
        write(job.path(), "out/parts/deep/er/0002.csv", b"b");
        std::fs::create_dir_all(job.path().join("out/empty")).expect("mkdir");
        write(job.path(), "out/zero.bin", b"");
        write(job.path(), "not-an-output.txt", b"stays home");

        let uploaded = transfers
            .upload_outputs(
                &[
                    transfer("s3://tree/job-1/", "out"),
                    // No trailing '/': a directory still goes under "job-2/".
                    transfer("s3://tree/job-2", "out/parts"),
                ],
                job.path(),
            )
            .await
            .expect("upload");
        assert_eq!(uploaded, 6);
        assert_eq!(
            keys_in(&client, "tree").await,
            [
                "job-1/parts/0001.csv",
                "job-1/parts/deep/er/0002.csv",
                "job-1/summary.json",
                "job-1/zero.bin",
                "job-2/0001.csv",
                "job-2/deep/er/0002.csv",
            ]
        );
        assert_eq!(
            object(&client, "tree", "job-2/deep/er/0002.csv").await,
            b"b"
        );
        assert!(object(&client, "tree", "job-1/zero.bin").await.is_empty());
    }

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

    /// A TCP proxy in front of `upstream` that flips the first body byte of
    /// the first response on each connection: a corrupted download.
    async fn corrupting_proxy(upstream: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("proxy address");
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let server = TcpStream::connect(upstream).await.expect("upstream");
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                    });
                    let mut seen = Vec::new();
                    let mut flipped = false;
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_server.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &mut buffer[..n];
                        if !flipped {
                            let start = seen.len();
                            seen.extend_from_slice(chunk);
                            let body_at = seen
                                .windows(4)
                                .position(|w| w == b"\r\n\r\n")
                                .map(|end| end + 4);
                            if let Some(at) = body_at.filter(|at| *at < seen.len()) {
                                chunk[at - start] ^= 0xff;
                                flipped = true;
                            }
                        }
                        if to_client.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// A TCP proxy in front of `upstream` that drops the connection of any
    /// request whose bytes contain `needle`: a network failure mid-transfer.
    async fn cutting_proxy(upstream: SocketAddr, needle: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("proxy address");
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let server = TcpStream::connect(upstream).await.expect("upstream");
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let replies = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                    });
                    let mut recent = Vec::new();
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_client.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        recent.extend_from_slice(&buffer[..n]);
                        if recent.windows(needle.len()).any(|w| w == needle) {
                            // Dropping every half closes both connections.
                            replies.abort();
                            return;
                        }
                        let keep = recent.len().saturating_sub(needle.len());
                        recent.drain(..keep);
                        if to_server.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn failed_part_aborts_the_multipart_upload_and_is_the_agents_problem() {
        let moto = Moto::start();
        let direct = moto.bucket("parts").await;
        let proxy = cutting_proxy(moto.addr, b"partNumber=2&").await;
        let through_proxy = client_for(
            &format!("http://{proxy}"),
            RequestChecksumCalculation::WhenSupported,
            RetryConfig::disabled(),
        )
        .await;
        let job = TempDir::new().expect("tempdir");
        let size = 2 * PART_SIZE as usize + 1000;
        write(job.path(), "big.bin", &pseudo_random_bytes(size, 11));

        let result = Transfers::new(through_proxy)
            .upload_outputs(&[transfer("s3://parts/", "big.bin")], job.path())
            .await;
        let Err(TransferError::Agent(message)) = result else {
            panic!("a lost connection is the agent's problem, got {result:?}");
        };
        assert!(
            message.starts_with("output big.bin: s3://parts/big.bin: uploading part 2: "),
            "{message}"
        );
        let uploads = direct
            .list_multipart_uploads()
            .bucket("parts")
            .send()
            .await
            .expect("listing uploads");
        assert!(
            uploads.uploads().is_empty(),
            "the failed upload must be aborted"
        );
        assert!(keys_in(&direct, "parts").await.is_empty());
    }

    /// How the object that gets corrupted on its way down was stored.
    #[derive(Clone, Copy)]
    enum Stored {
        /// PutObject with the SDK's default CRC32: S3 returns it on GET.
        WithChecksum,
        /// PutObject without any checksum: only the ETag (an MD5) is left.
        WithOnlyAnEtag,
        /// Our own multipart upload of a file above the threshold.
        InParts,
    }

    /// Stores an object, downloads it through `corrupting_proxy` and
    /// returns the work dir and the error the download must end with.
    async fn corrupted_download(stored: Stored) -> (TempDir, String) {
        let moto = Moto::start();
        let checksums = match stored {
            Stored::WithOnlyAnEtag => RequestChecksumCalculation::WhenRequired,
            Stored::WithChecksum | Stored::InParts => RequestChecksumCalculation::WhenSupported,
        };
        let uploader = client_for(&moto.endpoint(), checksums, RetryConfig::standard()).await;
        uploader
            .create_bucket()
            .bucket("bits")
            .send()
            .await
            .expect("bucket");
        if let Stored::InParts = stored {
            let source = TempDir::new().expect("tempdir");
            let size = MULTIPART_THRESHOLD as usize + 1;
            write(source.path(), "k", &pseudo_random_bytes(size, 5));
            Transfers::new(uploader)
                .upload_outputs(&[transfer("s3://bits/k", "k")], source.path())
                .await
                .expect("upload");
        } else {
            uploader
                .put_object()
                .bucket("bits")
                .key("k")
                .body(ByteStream::from(pseudo_random_bytes(100_000, 3)))
                .send()
                .await
                .expect("put");
        }
        let proxy = corrupting_proxy(moto.addr).await;
        let through_proxy = client_for(
            &format!("http://{proxy}"),
            checksums,
            RetryConfig::standard(),
        )
        .await;
        let job = TempDir::new().expect("tempdir");
        let error = Transfers::new(through_proxy)
            .download_inputs(&[transfer("s3://bits/k", "in/k")], job.path())
            .await
            .expect_err("a corrupted download must fail");
        let TransferError::Agent(message) = error else {
            panic!("a corrupted download is not the job's fault: {error:?}");
        };
        assert!(message.starts_with("input s3://bits/k: "), "{message}");
        let left = std::fs::read_dir(job.path().join("in"))
            .expect("listing")
            .count();
        assert_eq!(left, 0, "neither the file nor a temporary one may remain");
        (job, message)
    }

    #[tokio::test]
    async fn corrupted_download_of_an_object_with_a_checksum_is_discarded() {
        let (_job, message) = corrupted_download(Stored::WithChecksum).await;
        assert!(message.contains("checksum mismatch"), "{message}");
    }

    #[tokio::test]
    async fn corrupted_download_of_an_object_with_only_an_md5_etag_is_discarded() {
        let (_job, message) = corrupted_download(Stored::WithOnlyAnEtag).await;
        assert!(message.contains("does not match the ETag"), "{message}");
    }

    #[tokio::test]
    async fn corrupted_download_of_a_multipart_output_is_discarded() {
        let (_job, message) = corrupted_download(Stored::InParts).await;
        assert!(message.contains("checksum mismatch"), "{message}");
    }

    #[test]
    fn etag_of_a_single_part_upload_is_read_as_its_md5() {
        let md5 = md5_from_etag("\"9E107D9D372BB6826BD81D3542A419D6\"").expect("an md5");
        assert_eq!(hex(&md5), "9e107d9d372bb6826bd81d3542a419d6");
        assert_eq!(md5_from_etag("9e107d9d372bb6826bd81d3542a419d6"), Some(md5));
    }

    #[test]
    fn etag_of_a_multipart_upload_or_odd_text_is_not_an_md5() {
        assert_eq!(
            md5_from_etag("\"9e107d9d372bb6826bd81d3542a419d6-7\""),
            None
        );
        assert_eq!(md5_from_etag("\"d41d8cd98f00b204e9800998ecf8427-\""), None);
        assert_eq!(md5_from_etag("\"zz107d9d372bb6826bd81d3542a419d6\""), None);
        assert_eq!(md5_from_etag(""), None);
    }

    #[test]
    fn content_that_does_not_match_its_etag_is_rejected() {
        let content = b"The quick brown fox jumps over the lazy dog";
        let expected = ExpectedContent {
            length: Some(content.len() as u64),
            md5: md5_from_etag("\"9e107d9d372bb6826bd81d3542a419d6\""),
        };
        let digest = |bytes: &[u8]| ContentDigest {
            length: bytes.len() as u64,
            md5: Md5::digest(bytes).into(),
        };
        assert!(expected.check(&digest(content), "input s3://b/k").is_ok());

        let mut corrupted = content.to_vec();
        corrupted[4] ^= 1;
        let Err(TransferError::Agent(message)) =
            expected.check(&digest(&corrupted), "input s3://b/k")
        else {
            panic!("a changed byte must be caught");
        };
        assert!(
            message.starts_with("input s3://b/k: content MD5 "),
            "{message}"
        );

        let Err(TransferError::Agent(message)) =
            expected.check(&digest(&content[1..]), "input s3://b/k")
        else {
            panic!("a short download must be caught");
        };
        assert_eq!(
            message,
            "input s3://b/k: received 42 bytes, S3 announced 43; the download is discarded"
        );
    }

    #[test]
    fn s3_urls_split_at_the_first_slash_after_the_bucket() {
        assert_eq!(
            S3Url::parse("s3://b/a/b/c.csv"),
            Some(S3Url {
                bucket: "b",
                key: "a/b/c.csv"
            })
        );
        assert_eq!(
            S3Url::parse("s3://b"),
            Some(S3Url {
                bucket: "b",
                key: ""
            })
        );
        assert_eq!(
            S3Url::parse("s3://b/"),
            Some(S3Url {
                bucket: "b",
                key: ""
            })
        );
        assert_eq!(S3Url::parse("s3:///k"), None);
        assert_eq!(S3Url::parse("https://b/k"), None);
    }

    #[test]
    fn output_file_goes_to_the_exact_key_or_under_the_prefix() {
        let job = TempDir::new().expect("tempdir");
        write(job.path(), "r/out.csv", b"x");
        let planned = plan_uploads(
            &[
                transfer("s3://b/exact/name.csv", "r/out.csv"),
                transfer("s3://b/prefix/", "r/out.csv"),
                transfer("s3://b", "r/out.csv"),
            ],
            job.path(),
        )
        .expect("plan");
        let keys: Vec<&str> = planned.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["exact/name.csv", "prefix/out.csv", "out.csv"]);
        assert!(planned.iter().all(|p| p.file == Path::new("r/out.csv")));
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

    #[test]
    fn file_name_that_is_not_utf8_cannot_become_a_key() {
        use std::os::unix::ffi::OsStrExt;
        let job = TempDir::new().expect("tempdir");
        std::fs::create_dir(job.path().join("out")).expect("mkdir");
        let name = OsStr::from_bytes(b"caf\xe9.txt");
        std::fs::write(job.path().join("out").join(name), b"x").expect("write");
        let message = job_error(plan_uploads(&[transfer("s3://b/", "out")], job.path()));
        assert_eq!(
            message,
            "output out: the name of out/caf\u{FFFD}.txt is not UTF-8, which an S3 key must be"
        );
    }

    #[test]
    fn parts_stay_eight_mebibytes_until_s3s_part_limit_forces_them_larger() {
        assert_eq!(part_size_for(MULTIPART_THRESHOLD + 1), PART_SIZE);
        assert_eq!(part_size_for(PART_SIZE * MAX_PARTS), PART_SIZE);
        let huge = PART_SIZE * MAX_PARTS + 1;
        let part = part_size_for(huge);
        assert!(part > PART_SIZE && part % MIB == 0);
        assert!(huge.div_ceil(part) <= MAX_PARTS);
        assert!(MAX_OBJECT_BYTES.div_ceil(part_size_for(MAX_OBJECT_BYTES)) <= MAX_PARTS);
    }
}
