//! Whether a download is what S3 announced: its length, and its MD5 where
//! the ETag is one. S3's own checksums (CRC32 and others) are checked by the
//! SDK while the body streams; this covers objects stored without one. A
//! mismatch discards the download; it never becomes the job's input.

use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::types::ServerSideEncryption;

use super::{AgentTrouble, TransferError};

/// What the downloaded bytes must match, from the response headers.
#[derive(Debug)]
pub(super) struct ExpectedContent {
    length: Option<u64>,
    md5: Option<[u8; 16]>,
}

impl ExpectedContent {
    pub(super) fn of(response: &GetObjectOutput) -> ExpectedContent {
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

    pub(super) fn check(&self, got: &ContentDigest, context: &str) -> Result<(), TransferError> {
        if let Some(length) = self.length {
            if length != got.length {
                return Err(TransferError::agent(
                    context,
                    AgentTrouble::Corrupted(format!(
                        "received {} bytes, S3 announced {length}",
                        got.length
                    )),
                ));
            }
        }
        if let Some(md5) = self.md5 {
            if md5 != got.md5 {
                return Err(TransferError::agent(
                    context,
                    AgentTrouble::Corrupted(format!(
                        "content MD5 {} does not match the ETag {}",
                        hex(&got.md5),
                        hex(&md5)
                    )),
                ));
            }
        }
        Ok(())
    }
}

/// What was actually received.
#[derive(Debug)]
pub(super) struct ContentDigest {
    pub(super) length: u64,
    pub(super) md5: [u8; 16],
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

#[cfg(test)]
mod tests {
    use super::super::moto::{client_for, pseudo_random_bytes, transfer, write, Moto};
    use super::super::{Transfers, MULTIPART_THRESHOLD};
    use super::*;

    use std::net::SocketAddr;

    use aws_sdk_s3::config::retry::RetryConfig;
    use aws_sdk_s3::config::RequestChecksumCalculation;
    use aws_sdk_s3::primitives::ByteStream;
    use md5::{Digest, Md5};
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

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
        let message = error.to_string();
        let TransferError::Agent { context, .. } = error else {
            panic!("a corrupted download is not the job's fault: {error:?}");
        };
        assert_eq!(context, "input s3://bits/k");
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
        let Err(changed @ TransferError::Agent { .. }) =
            expected.check(&digest(&corrupted), "input s3://b/k")
        else {
            panic!("a changed byte must be caught");
        };
        let message = changed.to_string();
        assert!(
            message.starts_with("input s3://b/k: content MD5 "),
            "{message}"
        );

        let Err(TransferError::Agent { context, source }) =
            expected.check(&digest(&content[1..]), "input s3://b/k")
        else {
            panic!("a short download must be caught");
        };
        assert_eq!(context, "input s3://b/k");
        assert!(matches!(source, AgentTrouble::Corrupted(_)), "{source:?}");
        assert_eq!(
            source.to_string(),
            "received 42 bytes, S3 announced 43; the download is discarded"
        );
    }
}
