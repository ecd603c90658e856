//! What the tests of this module share: a moto S3 server of their own (the
//! real S3 API on a local port, no AWS), clients of it, and job work dirs to
//! transfer from.

use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};

use super::TransferError;
use crate::envelope::Transfer;

/// How long a starting moto server may take to accept connections.
const MOTO_START_WAIT: Duration = Duration::from_secs(30);
const MOTO_POLL: Duration = Duration::from_millis(20);

/// A moto server of its own for one test, on a free local port, killed
/// when the test ends (also when it panics).
pub(super) struct Moto {
    child: Child,
    pub(super) addr: SocketAddr,
}

impl Moto {
    pub(super) fn start() -> Moto {
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

    pub(super) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(super) async fn client(&self) -> aws_sdk_s3::Client {
        client_for(
            &self.endpoint(),
            RequestChecksumCalculation::WhenSupported,
            RetryConfig::standard(),
        )
        .await
    }

    /// A client and a fresh, empty bucket.
    pub(super) async fn bucket(&self, name: &str) -> aws_sdk_s3::Client {
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

pub(super) async fn client_for(
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

pub(super) fn transfer(url: &str, path: &str) -> Transfer {
    Transfer {
        url: url.to_owned(),
        path: PathBuf::from(path),
    }
}

pub(super) fn write(dir: &Path, path: &str, content: &[u8]) {
    let path = dir.join(path);
    std::fs::create_dir_all(path.parent().expect("a path with a parent"))
        .expect("creating parent dirs");
    std::fs::write(path, content).expect("writing a test file");
}

/// Deterministic bytes that do not compress or repeat.
pub(super) fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
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

pub(super) async fn keys_in(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
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

pub(super) async fn object(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
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

pub(super) fn job_error(result: Result<impl std::fmt::Debug, TransferError>) -> String {
    match result {
        Err(error @ TransferError::Job { .. }) => error.to_string(),
        other => panic!("expected a job error, got {other:?}"),
    }
}
