//! Sending planned output files to S3: one PutObject for a small file, a
//! multipart upload (aborted on any failure, also when cancelled) above
//! [`MULTIPART_THRESHOLD`]. A file is read from the descriptor opened
//! beneath the work dir, and one that changes size while it is sent is
//! refused rather than uploaded half-written.

use std::os::fd::BorrowedFd;
use std::path::Path;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart};
use tokio::io::AsyncReadExt;

use super::paths::open_regular_file_beneath;
use super::plan::PlannedUpload;
use super::{AgentTrouble, TransferError, Transfers, MIB};

/// Output files larger than this go up as a multipart upload.
pub const MULTIPART_THRESHOLD: u64 = 16 * MIB;
/// Size of every part but the last; S3 wants 5 MiB to 5 GiB (S3 user guide, "Multipart upload limits").
const PART_SIZE: u64 = 8 * MIB;
/// At most this many parts per upload (S3 user guide, "Multipart upload limits").
const MAX_PARTS: u64 = 10_000;
/// Largest object S3 stores (S3 user guide, "Multipart upload limits").
const MAX_OBJECT_BYTES: u64 = 5 * 1024 * 1024 * MIB;

impl Transfers {
    pub(super) async fn upload_file(
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
            return Err(TransferError::job(
                &context,
                format!(
                    "{} is {size} bytes; S3 stores at most {MAX_OBJECT_BYTES} bytes per object",
                    upload.file.display()
                ),
            ));
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
            TransferError::agent(
                context,
                AgentTrouble::Unexpected("S3 started a multipart upload without an id".into()),
            )
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
        .map_err(|e| reading_failed(path, context, e))?;
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
        .map_err(|e| reading_failed(path, context, e))?;
    if read != 0 {
        return Err(changed_while_uploading(path, context));
    }
    Ok(())
}

fn reading_failed(path: &Path, context: &str, error: std::io::Error) -> TransferError {
    let doing = format!("reading {}", path.display());
    TransferError::agent(context, AgentTrouble::io(doing, error))
}

fn changed_while_uploading(path: &Path, context: &str) -> TransferError {
    // The job has exited; only something it left running can still write.
    TransferError::job(
        context,
        format!("{} changed size while being uploaded", path.display()),
    )
}

fn s3_error<E>(context: &str, doing: &str, error: SdkError<E>) -> TransferError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if error.code() == Some("NoSuchBucket") {
        return TransferError::job(context, "no such bucket");
    }
    TransferError::agent(context, AgentTrouble::s3(doing, error))
}

#[cfg(test)]
mod tests {
    use super::super::moto::{client_for, keys_in, pseudo_random_bytes, transfer, write, Moto};
    use super::*;

    use std::net::SocketAddr;

    use aws_sdk_s3::config::retry::RetryConfig;
    use aws_sdk_s3::config::RequestChecksumCalculation;
    use aws_sdk_s3::types::ChecksumMode;
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

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
        let Err(error @ TransferError::Agent { .. }) = result else {
            panic!("a lost connection is the agent's problem, got {result:?}");
        };
        let message = error.to_string();
        assert!(
            message.starts_with("output big.bin: s3://parts/big.bin: uploading part 2: "),
            "{message}"
        );
        assert!(
            matches!(
                &error,
                TransferError::Agent {
                    source: AgentTrouble::S3 { .. },
                    ..
                }
            ),
            "the SDK's error is kept as the cause: {error:?}"
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
