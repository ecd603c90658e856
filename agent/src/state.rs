//! The ledger of in-flight jobs: one small file per claimed message under
//! the state directory, written before a job is launched and updated with
//! its pid once it runs, removed when the message is finished. After a crash
//! or `kill -9` it is how the next run finds the jobs left behind, kills
//! their process groups and gives their messages back to the queue.
//!
//! Files are replaced atomically (write to a temporary name, rename), so a
//! crash never leaves a half-written entry. The ledger never decides what
//! happens to a message; it only remembers.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::queue::Message;

/// What the agent must remember about one claimed message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub message_id: String,
    pub receipt: String,
    pub queue: usize,
    pub attempt: u32,
    pub receive_count: u32,
    pub job_id: Option<String>,
    /// Leader (and process group id) of the running job, once launched.
    pub pid: Option<i32>,
    /// `/proc/PID/stat` start time of the leader, to detect pid reuse.
    pub start_time: Option<u64>,
    pub work_dir: Option<PathBuf>,
}

impl InFlight {
    pub fn for_message(msg: &Message) -> InFlight {
        InFlight {
            message_id: msg.id.clone(),
            receipt: msg.receipt.clone(),
            queue: msg.queue,
            attempt: msg.attempt,
            receive_count: msg.receive_count,
            job_id: None,
            pid: None,
            start_time: None,
            work_dir: None,
        }
    }

    /// The message as a source needs it to release the claim.
    pub fn to_message(&self) -> Message {
        Message {
            id: self.message_id.clone(),
            body: Vec::new(),
            attempt: self.attempt,
            receive_count: self.receive_count,
            receipt: self.receipt.clone(),
            queue: self.queue,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

pub struct Ledger {
    dir: PathBuf,
}

impl Ledger {
    /// Opens (creating, mode 0700) the ledger directory.
    pub fn open(state_dir: &Path) -> Result<Ledger, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join("inflight");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating", &dir))?;
        Ok(Ledger { dir })
    }

    fn entry_path(&self, message_id: &str) -> PathBuf {
        // Message ids are UUIDs or hex, but never trust them as file names.
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
        self.dir.join(format!("{safe}.json"))
    }

    /// Writes or replaces the entry for one message.
    pub fn record(&self, entry: &InFlight) -> Result<(), StateError> {
        let path = self.entry_path(&entry.message_id);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec(entry).map_err(|e| StateError::Io {
            action: "encoding",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        fs::write(&tmp, text).map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("writing", &path))
    }

    /// Forgets a message whose claim has ended (deleted, released or
    /// dead-lettered). Forgetting an unknown message is fine.
    pub fn forget(&self, message_id: &str) -> Result<(), StateError> {
        let path = self.entry_path(message_id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Every entry left by a previous run. Unreadable entries are reported
    /// and skipped, never fatal: losing track of one orphan must not stop
    /// the agent from recovering the rest.
    pub fn load_all(&self) -> Result<Vec<InFlight>, StateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("reading", &self.dir))? {
            let path = entry.map_err(io_err("reading", &self.dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                let _ = fs::remove_file(&path);
                continue;
            }
            match fs::read(&path).map(|b| serde_json::from_slice::<InFlight>(&b)) {
                Ok(Ok(e)) => out.push(e),
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping unreadable ledger entry")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping unreadable ledger entry")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> InFlight {
        InFlight {
            message_id: id.into(),
            receipt: format!("{id}.0.1.msg"),
            queue: 0,
            attempt: 1,
            receive_count: 1,
            job_id: Some("job".into()),
            pid: Some(4242),
            start_time: Some(99),
            work_dir: None,
        }
    }

    #[test]
    fn recorded_entries_survive_a_restart_until_forgotten() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path()).expect("open");
        ledger.record(&entry("a")).expect("record");
        ledger.record(&entry("b")).expect("record");
        ledger.forget("a").expect("forget");
        let again = Ledger::open(tmp.path()).expect("reopen");
        assert_eq!(again.load_all().expect("load"), vec![entry("b")]);
    }

    #[test]
    fn a_corrupt_entry_is_skipped_not_fatal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path()).expect("open");
        ledger.record(&entry("good")).expect("record");
        fs::write(tmp.path().join("inflight/bad.json"), b"{not json").expect("write");
        assert_eq!(ledger.load_all().expect("load"), vec![entry("good")]);
    }

    #[test]
    fn odd_message_ids_cannot_escape_the_ledger_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path()).expect("open");
        ledger.record(&entry("../../etc/x")).expect("record");
        assert!(!tmp.path().join("etc").exists());
        assert_eq!(ledger.load_all().expect("load").len(), 1);
    }
}
