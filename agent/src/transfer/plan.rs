//! Which objects a job's outputs become: every file an output names (a
//! directory taken recursively) is found and checked before anything is
//! sent, and given its key, so that an output the job got wrong leaves the
//! bucket untouched. Nothing here reads a file's content.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::paths::{
    check_single_link, file_kind, list_names, open_dir_beneath, open_work_dir, split_relative,
    stat_beneath, FileKind, MissingDirs, PathRefusal,
};
use super::{S3Url, TransferError};
use crate::envelope::Transfer;

/// S3 keys are at most 1024 bytes of UTF-8 (S3 user guide, "Naming objects").
const MAX_S3_KEY_BYTES: usize = 1024;

/// One file to upload, found by `plan_uploads`.
#[derive(Debug, PartialEq)]
pub(super) struct PlannedUpload {
    /// The output it belongs to, for messages.
    pub(super) output: PathBuf,
    /// The file, relative to the work dir.
    pub(super) file: PathBuf,
    pub(super) bucket: String,
    pub(super) key: String,
}

/// Finds every file the outputs name and checks them all, without reading
/// any: a link, a special file or a missing output stops the whole upload.
pub(super) fn plan_uploads(
    outputs: &[Transfer],
    work_dir: &Path,
) -> Result<Vec<PlannedUpload>, TransferError> {
    let root = open_work_dir(work_dir)?;
    let mut uploads = Vec::new();
    for output in outputs {
        let context = format!("output {}", output.path.display());
        let location = S3Url::parse(&output.url).ok_or_else(|| {
            TransferError::job(
                &context,
                format!("{} is not an s3://bucket/prefix URL", output.url),
            )
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
        return Err(TransferError::job(
            context,
            format!(
                "{} would need a key of {} bytes; S3 allows at most {MAX_S3_KEY_BYTES}",
                file.display(),
                key.len()
            ),
        ));
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
                return Err(TransferError::job(
                    context,
                    format!(
                        "{} would need a key of more than {MAX_S3_KEY_BYTES} bytes, S3's limit",
                        path.display()
                    ),
                ));
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

fn utf8_name<'a>(name: &'a OsStr, path: &Path, context: &str) -> Result<&'a str, TransferError> {
    name.to_str().ok_or_else(|| {
        TransferError::job(
            context,
            format!(
                "the name of {} is not UTF-8, which an S3 key must be",
                path.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::moto::{job_error, keys_in, object, transfer, write, Moto};
    use super::super::Transfers;
    use super::*;

    use tempfile::TempDir;

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
}
