//! The ledger of in-flight jobs: one small file per job slot under the
//! state directory (`inflight/slot-N.json`), written when a slot takes a
//! message, updated with the job's pid before the job runs, emptied when the
//! message is finished. Files are per slot, not per message, so the ledger
//! is bounded by construction and costs no file creation per job. After a crash
//! or `kill -9` it is how the next run finds the jobs left behind, kills
//! their process groups and gives their messages back to the queue.
//!
//! An entry is written with one `pwrite` at offset 0, padded with spaces
//! (valid trailing JSON whitespace) so it always covers what was there: the
//! death of the agent cannot interrupt a single write to a regular file, so
//! no `kill -9` leaves a torn entry, and updating an entry reuses its inode
//! (cheaper than a temporary file and a rename on every job). Only a power
//! loss could tear one; then the instance, and every job, is gone anyway,
//! and an unreadable entry is skipped. The ledger never decides what happens
//! to a message; it only remembers.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::events::JobEvent;
use crate::queue::Message;

/// What was decided for a message whose attempt has ended, recorded before
/// anything is done about it: after a crash, recovery completes this
/// decision (publish the event, delete or release) instead of running the
/// job again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    pub event: JobEvent,
    pub action: DecidedAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum DecidedAction {
    Delete,
    Release { delay_ms: u64, failed: bool },
}

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
    #[serde(default)]
    pub decided: Option<Decided>,
    /// The id of a copy that stands for this message now (a release by
    /// copy, a dead-letter copy, a custody copy sent back). After a crash
    /// the original is only removed, never released: the copy runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_id: Option<String>,
    /// The job's cgroup, once made: recovery kills the job by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
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
            decided: None,
            copy_id: None,
            cgroup: None,
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
            group: None,
            sent_at: None,
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
    #[error(
        "state.dir {dir} is in use by another batchly-agent (pid {holder}): two agents on one \
         state dir would kill each other's jobs; stop the other one or give this one its own state.dir"
    )]
    Locked { dir: PathBuf, holder: String },
}

/// The lock file that keeps one agent per state dir.
const LOCK_FILE: &str = "agent.lock";

/// An exclusive lock on the state dir, held as long as the agent runs (the
/// kernel drops it when the process dies, however it dies). The file holds
/// the holder's pid, for the error a second agent gets.
pub struct StateLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, StateError> {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io_err("creating", state_dir))?;
        let path = state_dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => "unknown".to_string(),
                    pid => pid.to_string(),
                };
                return Err(StateError::Locked {
                    dir: state_dir.to_path_buf(),
                    holder,
                });
            }
            Err((_, errno)) => return Err(io_err("locking", &path)(std::io::Error::from(errno))),
        };
        lock.set_len(0).map_err(io_err("writing", &path))?;
        write!(lock, "{}", std::process::id()).map_err(io_err("writing", &path))?;
        Ok(StateLock { _lock: lock })
    }
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

/// The ledger; it keeps what it wrote for each slot, so that a source's
/// news about a claim (`update_message`) and the attempt's own steps
/// (`update`) each change only their part of an entry.
pub struct Ledger {
    dir: PathBuf,
    entries: std::sync::Mutex<std::collections::HashMap<usize, InFlight>>,
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
        Ok(Ledger {
            dir,
            entries: Default::default(),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<usize, InFlight>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the recorded entry of a slot and writes it.
    pub fn update(
        &self,
        slot: usize,
        change: impl FnOnce(&mut InFlight),
    ) -> Result<(), StateError> {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(&slot) else {
            return Ok(());
        };
        change(entry);
        self.write(slot, entry)
    }

    /// Changes the entry that holds `message_id`, wherever it is.
    pub fn update_message(
        &self,
        message_id: &str,
        change: impl FnOnce(&mut InFlight),
    ) -> Result<(), StateError> {
        let mut entries = self.entries();
        let Some((&slot, entry)) = entries.iter_mut().find(|(_, e)| e.message_id == message_id)
        else {
            return Ok(());
        };
        change(entry);
        self.write(slot, entry)
    }

    /// The entry recorded for a slot by this run.
    pub fn get(&self, slot: usize) -> Option<InFlight> {
        self.entries().get(&slot).cloned()
    }

    fn slot_path(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("slot-{slot}.json"))
    }

    /// Writes or replaces the entry of one slot.
    pub fn record(&self, slot: usize, entry: &InFlight) -> Result<(), StateError> {
        let mut entries = self.entries();
        entries.insert(slot, entry.clone());
        self.write(slot, entry)
    }

    fn write(&self, slot: usize, entry: &InFlight) -> Result<(), StateError> {
        use std::os::unix::fs::FileExt;
        let path = self.slot_path(slot);
        let mut text = serde_json::to_vec(entry).map_err(|e| StateError::Io {
            action: "encoding",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let old_len = file.metadata().map_err(io_err("reading", &path))?.len() as usize;
        if text.len() < old_len {
            text.resize(old_len, b' ');
        }
        file.write_all_at(&text, 0)
            .map_err(io_err("writing", &path))
    }

    /// Empties a slot whose message is finished (deleted, released or
    /// dead-lettered). Emptying an empty slot is fine.
    pub fn forget(&self, slot: usize) -> Result<(), StateError> {
        let mut entries = self.entries();
        entries.remove(&slot);
        let path = self.slot_path(slot);
        match fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => f.set_len(0).map_err(io_err("emptying", &path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("opening", &path)(e)),
        }
    }

    /// Empties every slot (after recovery has dealt with their entries).
    pub fn clear_all(&self) -> Result<(), StateError> {
        for entry in fs::read_dir(&self.dir).map_err(io_err("reading", &self.dir))? {
            let path = entry.map_err(io_err("reading", &self.dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                fs::write(&path, b"").map_err(io_err("emptying", &path))?;
            }
        }
        Ok(())
    }

    /// Every entry left by a previous run. Unreadable entries are reported
    /// and skipped, never fatal: losing track of one orphan must not stop
    /// the agent from recovering the rest.
    pub fn load_all(&self) -> Result<Vec<InFlight>, StateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("reading", &self.dir))? {
            let path = entry.map_err(io_err("reading", &self.dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match fs::read(&path).map(|b| {
                let empty = b.iter().all(u8::is_ascii_whitespace);
                (empty, serde_json::from_slice::<InFlight>(&b))
            }) {
                Ok((true, _)) => {}
                Ok((false, Ok(e))) => out.push(e),
                Ok((false, Err(e))) => {
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
            decided: None,
            copy_id: None,
            cgroup: None,
        }
    }

    #[test]
    fn news_about_a_message_changes_only_its_part_of_the_entry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path()).expect("open");
        ledger.record(2, &entry("a")).expect("record");
        ledger
            .update_message("a", |e| e.receipt = "new".into())
            .expect("receipt");
        ledger.update(2, |e| e.pid = Some(7)).expect("pid");
        ledger
            .update_message("a", |e| e.copy_id = Some("copy".into()))
            .expect("copy");
        let got = Ledger::open(tmp.path())
            .expect("reopen")
            .load_all()
            .expect("load");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receipt, "new");
        assert_eq!(got[0].pid, Some(7));
        assert_eq!(got[0].copy_id.as_deref(), Some("copy"));
    }

    #[test]
    fn a_second_lock_on_a_state_dir_is_refused_naming_the_holder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let _held = StateLock::acquire(tmp.path()).expect("first lock");
        match StateLock::acquire(tmp.path()) {
            Err(StateError::Locked { dir, holder }) => {
                assert_eq!(dir, tmp.path());
                assert_eq!(holder, std::process::id().to_string());
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a second lock was granted"),
        }
    }

    #[test]
    fn recorded_entries_survive_a_restart_until_forgotten() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path()).expect("open");
        ledger.record(0, &entry("a")).expect("record");
        ledger.record(1, &entry("b")).expect("record");
        ledger.forget(0).expect("forget");
        ledger.forget(7).expect("forgetting an unused slot is fine");
        let again = Ledger::open(tmp.path()).expect("reopen");
        assert_eq!(again.load_all().expect("load"), vec![entry("b")]);
        again.clear_all().expect("clear");
        assert!(again.load_all().expect("load").is_empty());
    }

    #[test]
    fn a_shorter_update_leaves_no_trace_of_the_longer_entry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path()).expect("open");
        let mut long = entry("a");
        long.work_dir = Some(PathBuf::from(
            "/a/very/long/path/to/a/work/dir/that/is/long",
        ));
        ledger.record(3, &long).expect("record");
        let short = entry("a");
        ledger.record(3, &short).expect("update");
        assert_eq!(ledger.load_all().expect("load"), vec![short]);
    }

    #[test]
    fn a_corrupt_entry_is_skipped_not_fatal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path()).expect("open");
        ledger.record(0, &entry("good")).expect("record");
        fs::write(tmp.path().join("inflight/slot-1.json"), b"{not json").expect("write");
        assert_eq!(ledger.load_all().expect("load"), vec![entry("good")]);
    }
}
