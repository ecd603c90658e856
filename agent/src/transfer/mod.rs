//! S3 inputs and outputs of a job: every input is downloaded into the job's
//! work dir before it starts, and its outputs are uploaded after it exits 0.
//! The agent runs as root while the job decides what the work dir holds, so
//! this module must never follow a link the job planted and never read or
//! write outside the work dir: every path is opened one component at a time
//! beneath an open descriptor of the work dir with `O_NOFOLLOW`, and only
//! regular files and directories are ever read or written. It must also
//! never hold a whole object in memory: downloads stream to disk, and large
//! uploads go up one part at a time.
//!
//! Where things are: this file is the public API ([`Transfers`],
//! [`TransferError`]) and the `s3://` URL form; `download.rs` streams an
//! input into place; `plan.rs` finds and checks the files the outputs name
//! and the key each one becomes; `upload.rs` sends them (in parts above
//! [`MULTIPART_THRESHOLD`]); `integrity.rs` checks that a download is what
//! S3 announced (length, ETag MD5); `paths.rs` is path safety: every open
//! beneath the work dir, and the refusals.

mod download;
mod integrity;
#[cfg(test)]
mod moto;
mod paths;
mod plan;
mod upload;

use std::os::fd::AsFd;
use std::path::Path;

use aws_sdk_s3::error::DisplayErrorContext;

use crate::envelope::Transfer;
use paths::open_work_dir;
use plan::plan_uploads;

pub use upload::MULTIPART_THRESHOLD;

const MIB: u64 = 1024 * 1024;

/// Moves a job's inputs and outputs between S3 and its work dir.
pub struct Transfers {
    client: aws_sdk_s3::Client,
}

/// A transfer that did not happen, and whose fault that is: the supervisor
/// fails the job for `Job` and gives its message back for `Agent`.
/// `context` names what was being moved (`input s3://b/k`,
/// `output out.csv: s3://b/out.csv`).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The job's own fault: a missing input object, an output the job did
    /// not create, an output that is a link, a special file or leaves the
    /// work dir. `problem` names the URL or path.
    #[error("{context}: {problem}")]
    Job { context: String, problem: String },
    /// Anything else (access denied, network, disk, a corrupted download):
    /// the agent's or the platform's problem.
    #[error("{context}: {source}")]
    Agent {
        context: String,
        #[source]
        source: AgentTrouble,
    },
}

impl TransferError {
    fn job(context: &str, problem: impl Into<String>) -> TransferError {
        TransferError::Job {
            context: context.to_owned(),
            problem: problem.into(),
        }
    }

    fn agent(context: &str, source: AgentTrouble) -> TransferError {
        TransferError::Agent {
            context: context.to_owned(),
            source,
        }
    }
}

/// What went wrong on the agent's side of a transfer, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum AgentTrouble {
    /// An S3 call failed: network, access denied, throttling, a 5xx, or a
    /// checksum the SDK found wrong while the body streamed.
    #[error("{doing}: {}", DisplayErrorContext(.source.as_ref()))]
    S3 {
        doing: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading or writing in the work dir failed.
    #[error("{doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes received are not those S3 announced.
    #[error("{0}; the download is discarded")]
    Corrupted(String),
    /// S3 (or the runtime) answered in a way the agent cannot use.
    #[error("{0}")]
    Unexpected(String),
}

impl AgentTrouble {
    fn s3(
        doing: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> AgentTrouble {
        AgentTrouble::S3 {
            doing: doing.into(),
            source: Box::new(source),
        }
    }

    fn io(doing: impl Into<String>, source: impl Into<std::io::Error>) -> AgentTrouble {
        AgentTrouble::Io {
            doing: doing.into(),
            source: source.into(),
        }
    }
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
                .map_err(|e| {
                    TransferError::agent(
                        "outputs",
                        AgentTrouble::Unexpected(format!("the task listing them failed: {e}")),
                    )
                })??;
        let root = open_work_dir(work_dir)?;
        for upload in &uploads {
            self.upload_file(upload, root.as_fd()).await?;
        }
        Ok(uploads.len())
    }
}

/// `s3://bucket/key`, split at the first `/` after the bucket.
#[derive(Debug, PartialEq)]
pub(super) struct S3Url<'a> {
    pub(super) bucket: &'a str,
    /// Possibly empty (the whole bucket) or ending in `/` (a prefix).
    pub(super) key: &'a str,
}

impl<'a> S3Url<'a> {
    pub(super) fn parse(url: &'a str) -> Option<S3Url<'a>> {
        let rest = url.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return None;
        }
        Some(S3Url { bucket, key })
    }
}

#[cfg(test)]
mod tests {
    use super::moto::{keys_in, transfer, write, Moto};
    use super::*;

    use tempfile::TempDir;

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
}
