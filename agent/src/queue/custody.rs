//! Custody of SQS messages whose job outlives SQS's limit: a message cannot
//! stay hidden for more than 12 hours after it was received, so before that
//! the agent copies the message into this store (synced to disk) and deletes
//! it from SQS. From then on the store is the message: when the job ends for
//! good the copy is dropped; when it must run again (retry, exit 75, drain,
//! or a restart after a crash) the copy is sent back to its queue as a new
//! message. Only the loss of the instance's disk with a job still running
//! loses such a message, which SQS itself gives no way to avoid.
//!
//! It never decides anything; the SQS source keeps and returns copies.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A message in the agent's custody.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub message_id: String,
    pub queue_url: String,
    pub body: String,
    pub group: Option<String>,
    /// Failed attempts counted before this message was received; the copy
    /// sent back carries it on (with the outcome of the running attempt).
    #[serde(default)]
    pub failures: u32,
    /// Receives of the job so far, carried on the same way.
    #[serde(default)]
    pub receives: u32,
    /// The producer's message attributes, sent back with the copy.
    #[serde(default)]
    pub attributes: Vec<Attribute>,
}

/// One SQS message attribute, kept as SQS gives it (binary values in
/// base64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribute {
    pub name: String,
    pub data_type: String,
    pub string_value: Option<String>,
    pub binary_base64: Option<String>,
}

pub struct CustodyStore {
    dir: PathBuf,
}

fn file_name(message_id: &str) -> String {
    let safe: String = message_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.json")
}

impl CustodyStore {
    /// Opens (creating, mode 0700) `state_dir/custody`.
    pub fn open(state_dir: &Path) -> std::io::Result<CustodyStore> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join("custody");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(CustodyStore { dir })
    }

    /// Stores a copy durably (written, synced, renamed into place, directory
    /// synced) before the caller may delete the original.
    pub fn keep(&self, held: &Held) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(file_name(&held.message_id));
        let tmp = path.with_extension("json.part");
        let text = serde_json::to_vec(held).map_err(std::io::Error::other)?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Forgets a copy that is no longer needed (gone for good, or back in
    /// its queue).
    pub fn release(&self, message_id: &str) -> std::io::Result<()> {
        match fs::remove_file(self.dir.join(file_name(message_id))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The copy of one message, if it is held (unreadable counts as not).
    pub fn get(&self, message_id: &str) -> std::io::Result<Option<Held>> {
        match fs::read(self.dir.join(file_name(message_id))) {
            Ok(b) => Ok(serde_json::from_slice::<Held>(&b)
                .ok()
                .filter(|h| h.message_id == message_id)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every copy held, e.g. by a run that crashed.
    pub fn all(&self) -> std::io::Result<Vec<Held>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match fs::read(&path).map(|b| serde_json::from_slice::<Held>(&b)) {
                Ok(Ok(held)) => out.push(held),
                _ => {
                    tracing::error!(file = %path.display(), "unreadable custody file; left in place for an operator")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_copy_survives_a_restart_until_released() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let held = Held {
            message_id: "0f3a-9c".into(),
            queue_url: "http://127.0.0.1/1/jobs".into(),
            body: "{\"v\":1}".into(),
            group: Some("g".into()),
            failures: 2,
            receives: 3,
            attributes: vec![Attribute {
                name: "trace".into(),
                data_type: "String".into(),
                string_value: Some("abc".into()),
                binary_base64: None,
            }],
        };
        CustodyStore::open(tmp.path())
            .expect("open")
            .keep(&held)
            .expect("keep");
        let again = CustodyStore::open(tmp.path()).expect("reopen");
        assert_eq!(again.all().expect("all"), vec![held.clone()]);
        again.release(&held.message_id).expect("release");
        again
            .release(&held.message_id)
            .expect("releasing twice is fine");
        assert!(again.all().expect("all").is_empty());
    }

    #[test]
    fn a_copy_written_before_failure_counts_were_kept_reads_as_no_failures() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = CustodyStore::open(tmp.path()).expect("open");
        fs::write(
            tmp.path().join("custody").join("old.json"),
            r#"{"message_id":"old","queue_url":"u","body":"b","group":null}"#,
        )
        .expect("write");
        let all = store.all().expect("all");
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].failures, all[0].attributes.len()), (0, 0));
    }
}
