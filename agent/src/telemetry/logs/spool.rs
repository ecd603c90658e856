//! The directory of stream files: every job attempt's output (and every
//! run's agent log) is one file of lines ([`super::line`]), written as the
//! job prints and read back by the shipper from the offset it has shipped
//! up to. The files are the on-disk spool: what is written is handed off
//! (a crash or a `kill -9` loses none of it, the next start ships it), and
//! memory stays one read buffer per pipe whatever CloudWatch does.
//!
//! Bounded: when the files hold more than `max_bytes` not yet shipped, the
//! oldest data goes first: a finished stream's file is removed, a running
//! one's shipped-from point jumps to its end (the space is given back by
//! punching a hole). Every drop is counted, logged and marked in its
//! stream. Shipped data is given back as it goes: a finished stream's file
//! is removed once shipped, a running one's shipped part is punched out.
//!
//! `dev` keeps the files as the jobs' logs and ships nothing: the bound
//! then removes the oldest finished files first, counted.
//!
//! Names: a job's file is named as its stream (`A-Za-z0-9._-`, from the job
//! and message ids); the agent's own log is `~agent.<start ms>`; the
//! shipped-up-to offsets are in `~acked`. `~` is in no job id.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::line::{self, Lines, Source};

/// Prefix of the agent's own log files.
pub const AGENT_FILE_PREFIX: &str = "~agent.";
/// The shipped-up-to offsets, by file name.
const ACKED_FILE: &str = "~acked";
/// A running stream's shipped part is punched out once it is this big.
const PUNCH_STEP: u64 = 1024 * 1024;
/// The offsets file is rewritten at most this often while shipping.
const ACKED_SAVE_EVERY: Duration = Duration::from_secs(1);
/// Drops by the bound are logged at most this often.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// How the spool behaves.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    /// Most bytes the files may hold (not yet shipped, or kept by `dev`).
    pub max_bytes: u64,
    /// `run`: files are shipped, then removed, and synced to disk when a
    /// job ends. `dev`: files are the jobs' logs, kept (up to the bound).
    pub ship: bool,
}

/// Counters over the agent's life, for status and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written into stream files.
    pub spooled_bytes: AtomicU64,
    /// Bytes shipped (acknowledged by the service).
    pub shipped_bytes: AtomicU64,
    /// Bytes dropped before shipping: the spool was full.
    pub dropped_bytes: AtomicU64,
    /// Finished files removed by the bound (`dev`: old logs).
    pub removed_files: AtomicU64,
    /// Events the service refused or the shipper gave up on, counted.
    pub rejected_events: AtomicU64,
    /// Sends that made no progress in time and were abandoned.
    pub stalled_sends: AtomicU64,
}

/// The spool, shared by the writers, the shipper and status.
#[derive(Debug, Clone)]
pub struct Spool(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    settings: SpoolSettings,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    counters: Counters,
}

#[derive(Debug, Default)]
struct State {
    /// By age: the oldest stream first.
    streams: BTreeMap<u64, Stream>,
    next: u64,
    /// Bytes the bound counts: what is on disk and not given back.
    held: u64,
    /// Drop notes for streams whose file is gone, still to be sent.
    orphan_notes: Vec<(String, String)>,
    last_error: Option<String>,
    acked_saved: Option<Instant>,
    acked_dirty: bool,
    unreported: Unreported,
}

/// Drops not logged yet.
#[derive(Debug, Default)]
struct Unreported {
    at: Option<Instant>,
    bytes: u64,
    files: u64,
}

/// One stream file.
#[derive(Debug)]
struct Stream {
    /// The file's name in the spool dir.
    file: String,
    /// The CloudWatch Logs stream it goes to (`None`: the agent's own log,
    /// named by the shipper).
    name: Option<String>,
    /// End of what has been written.
    written: u64,
    /// Shipped up to here.
    acked: u64,
    /// Given back to the file system up to here.
    punched: u64,
    open: bool,
    /// Being read by the shipper.
    taken: bool,
    /// Bytes dropped before shipping and not yet noted in the stream.
    dropped_unnoted: u64,
    /// Since when some of it waits to be shipped.
    waiting_since: Option<Instant>,
    /// Not taken again before then (its last send failed).
    not_before: Option<Instant>,
}

impl Stream {
    fn unshipped(&self) -> u64 {
        self.written.saturating_sub(self.acked)
    }
}

/// What the shipper is to send next of one stream.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: u64,
    pub path: PathBuf,
    /// `None`: the agent's own log.
    pub stream: Option<String>,
    pub from: u64,
    pub to: u64,
    /// Finished: a last line without a newline is sent too.
    pub finished: bool,
    /// A note to send first: data was dropped before shipping.
    pub note: Option<String>,
    /// The dropped bytes the note tells of.
    pub noted_bytes: u64,
}

/// What waits to be shipped, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    pub bytes: u64,
    pub streams: usize,
    pub oldest: Option<Duration>,
    pub dropped_bytes: u64,
    pub rejected_events: u64,
    pub last_error: Option<String>,
}

/// The stream could not be written: its output is not handed off.
#[derive(Debug, thiserror::Error)]
#[error("writing job output to {path}: {error}")]
pub struct SpoolError {
    pub path: String,
    pub error: String,
}

impl Spool {
    /// Opens (making it if needed) the spool dir and takes in what an
    /// earlier run left: every file is a finished stream, shipped from
    /// where `~acked` says (from its start if it does not).
    pub fn open(settings: SpoolSettings) -> std::io::Result<Spool> {
        std::fs::create_dir_all(&settings.dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&settings.dir, std::fs::Permissions::from_mode(0o700))?;
        let acked: HashMap<String, u64> = std::fs::read(settings.dir.join(ACKED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&settings.dir)? {
            let entry = entry?;
            let Ok(file) = entry.file_name().into_string() else {
                continue;
            };
            let meta = entry.metadata()?;
            if !meta.is_file() || file.starts_with(ACKED_FILE) {
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, file, meta.len()));
        }
        found.sort();
        let mut state = State::default();
        for (_, file, len) in found {
            let done = if settings.ship {
                acked.get(&file).copied().unwrap_or(0).min(len)
            } else {
                len
            };
            let name = (!file.starts_with(AGENT_FILE_PREFIX)).then(|| file.clone());
            state.held += len - done;
            let id = state.next;
            state.next += 1;
            state.streams.insert(
                id,
                Stream {
                    file,
                    name,
                    written: len,
                    acked: done,
                    punched: done,
                    open: false,
                    taken: false,
                    dropped_unnoted: 0,
                    waiting_since: (len > done).then(Instant::now),
                    not_before: None,
                },
            );
        }
        if !settings.ship {
            // Kept logs count against the bound in full.
            state.held = state.streams.values().map(|s| s.written).sum();
        }
        let spool = Spool(Arc::new(Inner {
            settings,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
            counters: Counters::default(),
        }));
        {
            let mut state = spool.lock();
            spool.enforce_bound(&mut state);
            spool.forget_shipped(&mut state);
        }
        spool.report_drops();
        Ok(spool)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> &SpoolSettings {
        &self.0.settings
    }

    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }

    /// Waits until something may be ready to ship.
    pub async fn changed(&self) {
        self.0.wake.notified().await
    }

    fn wake(&self) {
        self.0.wake.notify_one();
    }

    /// A writer for a new stream, the file made on its first line (a job
    /// that prints nothing costs no file).
    pub fn stream(&self, name: &str, max_bytes: u64) -> StreamWriter {
        debug_assert!(!name.contains('/') && !name.starts_with('~') && !name.is_empty());
        self.writer(name.to_string(), Some(name.to_string()), max_bytes)
    }

    /// A writer for this run's agent log.
    pub fn agent_stream(&self) -> StreamWriter {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        self.writer(format!("{AGENT_FILE_PREFIX}{ms}"), None, u64::MAX)
    }

    fn writer(&self, file: String, name: Option<String>, max_bytes: u64) -> StreamWriter {
        let name_is_agent = name.is_none();
        let id = {
            let mut state = self.lock();
            let id = state.next;
            state.next += 1;
            state.streams.insert(
                id,
                Stream {
                    file: file.clone(),
                    name,
                    written: 0,
                    acked: 0,
                    punched: 0,
                    open: true,
                    taken: false,
                    dropped_unnoted: 0,
                    waiting_since: None,
                    not_before: None,
                },
            );
            id
        };
        StreamWriter {
            agent: name_is_agent,
            spool: self.clone(),
            id,
            path: self.0.settings.dir.join(file),
            file: None,
            buf: Vec::with_capacity(4096),
            out: Lines::default(),
            err: Lines::default(),
            last_ms: 0,
            max_bytes,
            kept: 0,
            over_cap: 0,
            failed: None,
            closed: false,
        }
    }

    /// Records `n` more bytes written to stream `id`.
    fn wrote(&self, id: u64, n: u64) {
        let mut state = self.lock();
        let Some(s) = state.streams.get_mut(&id) else {
            return;
        };
        s.written += n;
        s.waiting_since.get_or_insert_with(Instant::now);
        state.held += n;
        self.0
            .counters
            .spooled_bytes
            .fetch_add(n, Ordering::Relaxed);
        let over = state.held > self.0.settings.max_bytes;
        if over {
            self.enforce_bound(&mut state);
        }
        drop(state);
        if over {
            self.report_drops();
        }
        if self.0.settings.ship {
            self.wake();
        }
    }

    fn closed(&self, id: u64) {
        let mut state = self.lock();
        match state.streams.get_mut(&id) {
            // Nothing was ever written: no file, nothing to ship.
            Some(s) if s.written == 0 && s.dropped_unnoted == 0 => {
                state.streams.remove(&id);
            }
            Some(s) => s.open = false,
            None => {}
        }
        self.forget_shipped(&mut state);
        drop(state);
        self.wake();
    }

    /// Drops the oldest data until the bound holds again. Logs nothing
    /// (the caller holds the lock, and the agent's own log is a stream of
    /// the spool): the drops are counted for [`Spool::report_drops`].
    fn enforce_bound(&self, state: &mut State) {
        let max = self.0.settings.max_bytes;
        let ids: Vec<u64> = state.streams.keys().copied().collect();
        let mut holes = Vec::new();
        for id in ids {
            if state.held <= max {
                break;
            }
            let Some(s) = state.streams.get_mut(&id) else {
                continue;
            };
            let path = self.0.settings.dir.join(&s.file);
            if !self.0.settings.ship {
                // `dev`: a finished log goes whole; a running job's is
                // bounded by its own cap.
                if s.open {
                    continue;
                }
                let len = s.written;
                state.streams.remove(&id);
                state.held = state.held.saturating_sub(len);
                let _ = std::fs::remove_file(&path);
                self.0
                    .counters
                    .removed_files
                    .fetch_add(1, Ordering::Relaxed);
                state.unreported.files += 1;
                continue;
            }
            if s.unshipped() == 0 {
                continue;
            }
            // The oldest lines go, as few as bring the spool within its
            // bound (to a line's end), or the whole unshipped rest.
            let excess = state.held - max;
            let cut = line_end_after(&path, s.acked + excess.min(s.unshipped()), s.written)
                .unwrap_or(s.written);
            let lost = cut - s.acked;
            self.0
                .counters
                .dropped_bytes
                .fetch_add(lost, Ordering::Relaxed);
            state.unreported.bytes += lost;
            let freed = cut - s.punched;
            s.acked = cut;
            s.waiting_since = (s.unshipped() > 0).then(Instant::now);
            if s.open || cut < s.written {
                // A stream being shipped too: its shipper goes on from
                // the new offset (and skips what was punched meanwhile).
                s.dropped_unnoted += lost;
                holes.push((path, s.punched, cut));
                s.punched = cut;
            } else {
                let note = drop_note(s.dropped_unnoted + lost);
                if let Some(name) = s.name.clone() {
                    state.orphan_notes.push((name, note));
                }
                state.streams.remove(&id);
                let _ = std::fs::remove_file(&path);
            }
            state.held = state.held.saturating_sub(freed);
            state.acked_dirty = true;
        }
        if !holes.is_empty() {
            // Saved before punched: a restart never reads a hole.
            self.save_acked_locked(state);
            for (path, from, to) in holes {
                punch(&path, from, to);
            }
        }
    }

    /// Logs what the bound dropped since the last report, at most every
    /// `DROP_REPORT_EVERY` (a spool kept full would otherwise log a line
    /// per write, into the very spool that is full).
    fn report_drops(&self) {
        let mut state = self.lock();
        let due = state
            .unreported
            .at
            .is_none_or(|t| t.elapsed() >= DROP_REPORT_EVERY);
        let (bytes, files) = (state.unreported.bytes, state.unreported.files);
        if !due || (bytes == 0 && files == 0) {
            return;
        }
        state.unreported = Unreported {
            at: Some(Instant::now()),
            ..Unreported::default()
        };
        drop(state);
        if bytes > 0 {
            tracing::warn!(
                bytes,
                "dropped output not yet shipped: the log spool holds more than logs.spool_max_bytes \
                 (CloudWatch Logs has not taken it in time); each stream gets a note saying so"
            );
        }
        if files > 0 {
            tracing::warn!(
                files,
                "removed the oldest job logs: the log dir holds more than logs.spool_max_bytes"
            );
        }
    }

    /// Where stream `id` is shipped up to, `None` once it is gone.
    pub fn acked(&self, id: u64) -> Option<u64> {
        self.lock().streams.get(&id).map(|s| s.acked)
    }

    /// Removes finished streams that are all shipped.
    fn forget_shipped(&self, state: &mut State) {
        if !self.0.settings.ship {
            return;
        }
        let done: Vec<u64> = state
            .streams
            .iter()
            .filter(|(_, s)| !s.open && !s.taken && s.unshipped() == 0 && s.dropped_unnoted == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(s) = state.streams.remove(&id) {
                state.held = state.held.saturating_sub(s.written - s.punched);
                let _ = std::fs::remove_file(self.0.settings.dir.join(&s.file));
                state.acked_dirty = true;
            }
        }
    }

    /// Streams with something to ship, oldest first, at most `max`; each is
    /// taken until [`Spool::shipped`] or [`Spool::put_back`]. A running
    /// stream is ready when it has `min_bytes` waiting or has waited
    /// `linger` (or at once when `urgent`); a finished one at once.
    pub fn take_ready(
        &self,
        max: usize,
        min_bytes: u64,
        linger: Duration,
        urgent: bool,
    ) -> Vec<Pending> {
        let mut state = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, s) in state.streams.iter_mut() {
            if out.len() >= max {
                break;
            }
            let has_data = s.unshipped() > 0 || s.dropped_unnoted > 0;
            let ready = !s.open
                || urgent
                || s.unshipped() >= min_bytes
                || s.dropped_unnoted > 0
                || s.waiting_since
                    .is_some_and(|t| now.duration_since(t) >= linger);
            let paused = s.not_before.is_some_and(|t| now < t) && !urgent;
            if s.taken || !has_data || !ready || paused {
                continue;
            }
            s.taken = true;
            out.push(Pending {
                id: *id,
                path: self.0.settings.dir.join(&s.file),
                stream: s.name.clone(),
                from: s.acked,
                to: s.written,
                finished: !s.open,
                note: (s.dropped_unnoted > 0).then(|| drop_note(s.dropped_unnoted)),
                noted_bytes: s.dropped_unnoted,
            });
        }
        out
    }

    /// At most `max` notes for streams whose file is gone, to send on
    /// their own.
    pub fn take_orphan_notes(&self, max: usize) -> Vec<(String, String)> {
        let mut state = self.lock();
        let n = max.min(state.orphan_notes.len());
        state.orphan_notes.drain(..n).collect()
    }

    /// Stream `id` is shipped up to `to`.
    pub fn shipped(&self, id: u64, to: u64) {
        let mut state = self.lock();
        let mut freed = 0;
        let mut hole = None;
        if let Some(s) = state.streams.get_mut(&id) {
            let to = to.max(s.acked).min(s.written);
            self.0
                .counters
                .shipped_bytes
                .fetch_add(to - s.acked, Ordering::Relaxed);
            s.acked = to;
            s.waiting_since = (s.unshipped() > 0).then(Instant::now);
            if s.open && s.acked - s.punched >= PUNCH_STEP {
                hole = Some((self.0.settings.dir.join(&s.file), s.punched, s.acked));
                freed = s.acked - s.punched;
                s.punched = s.acked;
            }
        }
        state.held = state.held.saturating_sub(freed);
        state.acked_dirty = true;
        if let Some((path, from, to)) = hole {
            // Saved before punched: a restart never reads a hole.
            self.save_acked_locked(&mut state);
            punch(&path, from, to);
        }
    }

    /// The note of `bytes` of stream `id`'s dropped data is sent; drops
    /// since the note was taken wait for the next one.
    pub fn noted(&self, id: u64, bytes: u64) {
        if let Some(s) = self.lock().streams.get_mut(&id) {
            s.dropped_unnoted = s.dropped_unnoted.saturating_sub(bytes);
        }
    }

    /// The shipper is done with stream `id` for now; after a failed send,
    /// it is not taken again for `pause`.
    pub fn put_back(&self, id: u64, pause: Option<Duration>) {
        let mut state = self.lock();
        if let Some(s) = state.streams.get_mut(&id) {
            s.taken = false;
            s.not_before = pause.map(|p| Instant::now() + p);
        }
        if state.held > self.0.settings.max_bytes {
            self.enforce_bound(&mut state);
        }
        self.forget_shipped(&mut state);
        let due = state
            .acked_saved
            .is_none_or(|t| t.elapsed() >= ACKED_SAVE_EVERY);
        if due {
            self.save_acked_locked(&mut state);
        }
        drop(state);
        self.report_drops();
    }

    /// Stream `id`'s file is gone (removed behind the agent's back): what
    /// it held unshipped is lost, counted, and shipping goes on from its
    /// end (a running job's later lines go to the removed file, and are
    /// counted the same way as they come).
    pub fn file_gone(&self, id: u64) {
        let mut state = self.lock();
        let Some(s) = state.streams.get_mut(&id) else {
            return;
        };
        let lost = s.unshipped();
        self.0
            .counters
            .dropped_bytes
            .fetch_add(lost, Ordering::Relaxed);
        let freed = s.written - s.punched;
        s.acked = s.written;
        s.punched = s.written;
        s.dropped_unnoted += lost;
        s.waiting_since = None;
        if !s.open {
            let name = s.name.clone();
            state.streams.remove(&id);
            if let (Some(name), true) = (name, lost > 0) {
                state.orphan_notes.push((name, drop_note(lost)));
            }
        }
        state.held = state.held.saturating_sub(freed);
        state.acked_dirty = true;
    }

    /// Wakes the shipper (a flush began).
    pub fn nudge(&self) {
        self.wake();
    }

    /// Writes the shipped-up-to offsets if they changed.
    pub fn save_acked(&self) {
        let mut state = self.lock();
        self.save_acked_locked(&mut state);
    }

    fn save_acked_locked(&self, state: &mut State) {
        if !self.0.settings.ship || !state.acked_dirty {
            return;
        }
        let map: HashMap<&str, u64> = state
            .streams
            .values()
            .filter(|s| s.acked > 0)
            .map(|s| (s.file.as_str(), s.acked))
            .collect();
        let dir = &self.0.settings.dir;
        let tmp = dir.join(format!("{ACKED_FILE}.tmp"));
        let saved = serde_json::to_vec(&map)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, dir.join(ACKED_FILE)));
        match saved {
            Ok(()) => {
                state.acked_dirty = false;
                state.acked_saved = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot save how far the log spool is shipped; a restart would send some lines twice")
            }
        }
    }

    /// The shipper's last failure (`None` once a send works again).
    pub fn set_last_error(&self, error: Option<String>) {
        self.lock().last_error = error;
    }

    /// What waits to be shipped.
    pub fn backlog(&self) -> Backlog {
        let state = self.lock();
        let waiting = state.streams.values().filter(|s| s.unshipped() > 0);
        Backlog {
            bytes: waiting.clone().map(Stream::unshipped).sum(),
            streams: waiting.clone().count(),
            oldest: waiting
                .filter_map(|s| s.waiting_since)
                .min()
                .map(|t| t.elapsed()),
            dropped_bytes: self.0.counters.dropped_bytes.load(Ordering::Relaxed),
            rejected_events: self.0.counters.rejected_events.load(Ordering::Relaxed),
            last_error: state.last_error.clone(),
        }
    }

    /// Whether nothing waits to be shipped.
    pub fn is_drained(&self) -> bool {
        let state = self.lock();
        state.orphan_notes.is_empty()
            && state
                .streams
                .values()
                .all(|s| s.unshipped() == 0 && s.dropped_unnoted == 0)
    }
}

/// What a stream says where its data was dropped.
fn drop_note(bytes: u64) -> String {
    format!(
        "[batchly-agent] {bytes} bytes of this stream were dropped before they were shipped: \
         the agent's log spool was full (logs.spool_max_bytes)"
    )
}

/// The offset just past the first newline of `path` at or after `from`,
/// if there is one before `limit`.
fn line_end_after(path: &Path, from: u64, limit: u64) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path).ok()?;
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < limit {
        let want = buf.len().min((limit - at) as usize);
        let n = file.read(&mut buf[..want]).ok()?;
        if n == 0 {
            return None;
        }
        if let Some(i) = memchr::memchr(b'\n', &buf[..n]) {
            return Some(at + i as u64 + 1);
        }
        at += n as u64;
    }
    None
}

/// Gives `from..to` of `path` back to the file system, where it can
/// (reading it is never needed again). A file system without hole punching
/// gives the space back when the file is removed.
fn punch(path: &Path, from: u64, to: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    if to <= from {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
        return;
    };
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
        return;
    };
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if let Err(e) = fallocate(&file, flags, offset, len) {
        tracing::debug!(file = %path.display(), error = %e, "cannot punch out shipped log data");
    }
}

/// Writes one stream: feed it the job's pipes as they are read. Lines are
/// written as they complete; the file exists from the first one.
#[derive(Debug)]
pub struct StreamWriter {
    /// The agent's own log: a failed write does not end it.
    agent: bool,
    spool: Spool,
    id: u64,
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    out: Lines,
    err: Lines,
    last_ms: i64,
    /// Most bytes of the job's output kept (`jobs.log_max_bytes`).
    max_bytes: u64,
    kept: u64,
    over_cap: u64,
    failed: Option<String>,
    closed: bool,
}

/// What one writer took in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Output bytes kept.
    pub kept: u64,
    /// Output bytes past the per-job cap, counted and noted.
    pub over_cap: u64,
}

impl StreamWriter {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes bytes read from the job's stdout or stderr.
    pub fn output(&mut self, source: Source, bytes: &[u8]) {
        let room = self.max_bytes.saturating_sub(self.kept) as usize;
        let keep = bytes.len().min(room);
        self.over_cap += (bytes.len() - keep) as u64;
        self.kept += keep as u64;
        if keep == 0 {
            return;
        }
        let stamp = self.stamp();
        let (lines, buf) = match source {
            Source::Stderr => (&mut self.err, &mut self.buf),
            _ => (&mut self.out, &mut self.buf),
        };
        lines.feed(&bytes[..keep], &mut |text| {
            line::encode(buf, &stamp, source, text)
        });
        self.commit();
    }

    /// Writes one line of the agent's own (a note in a job's stream, or a
    /// line of the agent's log); longer ones are cut to one event.
    pub fn note(&mut self, text: &str) {
        let stamp = self.stamp();
        let mut lines = Lines::default();
        let buf = &mut self.buf;
        let mut emit = |t: &str| line::encode(buf, &stamp, Source::Agent, t);
        lines.feed(text.as_bytes(), &mut emit);
        lines.end(&mut emit);
        self.commit();
    }

    fn stamp(&mut self) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        // One stream's lines keep their order in time.
        self.last_ms = self.last_ms.max(now);
        line::stamp(self.last_ms)
    }

    fn commit(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if self.failed.is_some() && !self.agent {
            // A job's stream with a hole is not handed off whatever comes
            // after; the agent's own log (no cap) tries again each line.
            self.buf.clear();
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        match self.open_file().and_then(|f| f.write_all(&buf)) {
            Ok(()) => self.spool.wrote(self.id, buf.len() as u64),
            Err(e) => {
                if self.failed.is_none() {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot write to the log spool; this stream's output is dropped");
                }
                self.failed = Some(e.to_string());
            }
        }
        buf.clear();
        self.buf = buf;
    }

    fn open_file(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            // Job output may hold the job's secrets: the agent's alone.
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&self.path);
            let file = match file {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&self.spool.0.settings.dir)?;
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(&self.path)?
                }
                other => other?,
            };
            self.file = Some(file);
        }
        self.file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no file"))
    }

    /// Ends the stream: last lines without a newline, the note of what
    /// the cap dropped, then (when shipping) the file synced to disk. Once
    /// this returns `Ok` the output is handed off: the job's message may
    /// be deleted. `Err`: some of it could not be written.
    pub fn close(mut self) -> Result<Written, SpoolError> {
        self.finish();
        let written = Written {
            kept: self.kept,
            over_cap: self.over_cap,
        };
        if let Some(error) = self.failed.take() {
            return Err(SpoolError {
                path: self.path.display().to_string(),
                error,
            });
        }
        if self.spool.0.settings.ship {
            if let Some(file) = &self.file {
                file.sync_data().map_err(|e| SpoolError {
                    path: self.path.display().to_string(),
                    error: e.to_string(),
                })?;
            }
        }
        Ok(written)
    }

    fn finish(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let stamp = self.stamp();
        let buf = &mut self.buf;
        self.out
            .end(&mut |t| line::encode(buf, &stamp, Source::Stdout, t));
        self.err
            .end(&mut |t| line::encode(buf, &stamp, Source::Stderr, t));
        if self.over_cap > 0 {
            line::encode(
                buf,
                &stamp,
                Source::Agent,
                &format!(
                    "[batchly-agent] output truncated: kept the first {} bytes (jobs.log_max_bytes), dropped {} bytes",
                    self.kept, self.over_cap
                ),
            );
        }
        self.commit();
        self.spool.closed(self.id);
    }
}

impl Drop for StreamWriter {
    /// A writer dropped without `close` (its task was aborted) still ends
    /// its stream, so the shipper sends the rest and removes the file.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool(dir: &Path, max_bytes: u64, ship: bool) -> Spool {
        Spool::open(SpoolSettings {
            dir: dir.to_path_buf(),
            max_bytes,
            ship,
        })
        .expect("open")
    }

    fn read(p: &Pending) -> String {
        let bytes = std::fs::read(&p.path).expect("read");
        String::from_utf8_lossy(&bytes[p.from as usize..p.to as usize]).into_owned()
    }

    #[test]
    fn a_job_that_prints_nothing_leaves_no_file_and_nothing_to_ship() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = spool(tmp.path(), 1 << 20, true);
        let w = s.stream("job.m1.1", 1024);
        assert_eq!(w.close().expect("close"), Written::default());
        assert_eq!(std::fs::read_dir(tmp.path()).expect("dir").count(), 0);
        assert!(s.is_drained());
    }

    #[test]
    fn lines_of_both_pipes_are_written_in_order_and_shipped_files_are_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = spool(tmp.path(), 1 << 20, true);
        let mut w = s.stream("job.m1.1", 1024);
        w.output(Source::Stdout, b"one\ntw");
        w.output(Source::Stderr, b"oops\n");
        w.output(Source::Stdout, b"o\n");
        let path = w.path().to_path_buf();
        w.close().expect("close");
        let ready = s.take_ready(8, u64::MAX, Duration::from_secs(3600), false);
        assert_eq!(ready.len(), 1, "a finished stream is ready at once");
        let text = read(&ready[0]);
        let kinds: Vec<&str> = text.lines().map(|l| &l[line::STAMP_LEN + 1..]).collect();
        assert_eq!(kinds, ["stdout one", "stderr oops", "stdout two"]);
        assert!(ready[0].finished && ready[0].stream.as_deref() == Some("job.m1.1"));
        assert!(s.take_ready(8, 0, Duration::ZERO, true).is_empty(), "taken");
        s.shipped(ready[0].id, ready[0].to);
        s.put_back(ready[0].id, None);
        assert!(
            !path.exists(),
            "a shipped finished stream's file is removed"
        );
        assert!(s.is_drained());
    }

    #[test]
    fn a_running_stream_waits_for_its_linger_or_its_batch_size() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = spool(tmp.path(), 1 << 20, true);
        let mut w = s.stream("job.m1.1", 1 << 20);
        w.output(Source::Stdout, b"x\n");
        assert!(s
            .take_ready(8, 1 << 20, Duration::from_secs(3600), false)
            .is_empty());
        assert_eq!(
            s.take_ready(8, 1, Duration::from_secs(3600), false).len(),
            1
        );
        drop(w);
    }

    #[test]
    fn a_restart_ships_what_was_not_shipped_from_where_it_stopped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let s = spool(tmp.path(), 1 << 20, true);
            let mut w = s.stream("job.m1.1", 1024);
            w.output(Source::Stdout, b"first\n");
            let p = s.take_ready(8, 0, Duration::ZERO, true).remove(0);
            s.shipped(p.id, p.to);
            s.put_back(p.id, None);
            w.output(Source::Stdout, b"second\n");
            // A crash: the writer is never closed, the offsets were saved.
            s.save_acked();
            std::mem::forget(w);
        }
        let s = spool(tmp.path(), 1 << 20, true);
        let ready = s.take_ready(8, u64::MAX, Duration::from_secs(3600), false);
        assert_eq!(ready.len(), 1);
        assert!(ready[0].finished, "a stream of an earlier run is finished");
        assert!(read(&ready[0]).ends_with(" stdout second\n"));
        assert!(!read(&ready[0]).contains("first"));
    }

    #[test]
    fn a_restart_after_shipped_data_was_punched_out_never_reads_the_hole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let line = format!("{}\n", "y".repeat(999));
        let (path, punched_to) = {
            let s = spool(tmp.path(), 1 << 30, true);
            let mut w = s.stream("long.m1.1", u64::MAX);
            for _ in 0..3000 {
                w.output(Source::Stdout, line.as_bytes());
            }
            // Shipped in small steps past PUNCH_STEP, never put back:
            // the offsets are saved only because a punch is due.
            let p = s.take_ready(1, 0, Duration::ZERO, true).remove(0);
            let file_line = p.to / 3000;
            for k in (100..3000).step_by(100) {
                s.shipped(p.id, k * file_line);
            }
            let path = w.path().to_path_buf();
            std::mem::forget(w); // a kill -9
            (path, s.acked(p.id).expect("acked"))
        };
        let s = spool(tmp.path(), 1 << 30, true);
        let p = s.take_ready(1, 0, Duration::ZERO, true).remove(0);
        assert!(p.from >= PUNCH_STEP, "shipped from {} on", p.from);
        assert!(p.from <= punched_to);
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(
            bytes[p.from as usize], b'2',
            "the restart starts at a line, after the hole"
        );
    }

    #[test]
    fn over_the_bound_the_oldest_unshipped_data_is_dropped_counted_and_noted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = spool(tmp.path(), 300, true);
        let mut old = s.stream("old.m1.1", 1 << 20);
        old.output(Source::Stdout, &[b'a'; 99]);
        old.output(Source::Stdout, b"\n");
        old.close().expect("close");
        let mut running = s.stream("run.m2.1", 1 << 20);
        running.output(Source::Stdout, &[b'b'; 150]);
        running.output(Source::Stdout, b"\n");
        // Over 300 now: the finished stream goes first, whole.
        let dropped = s.counters().dropped_bytes.load(Ordering::Relaxed);
        assert!(dropped > 100, "dropped {dropped}");
        assert!(!tmp.path().join("old.m1.1").exists());
        let notes = s.take_orphan_notes(8);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].0, "old.m1.1");
        assert!(notes[0].1.contains("logs.spool_max_bytes"));
        // More than the bound from the running one: its own oldest goes.
        running.output(Source::Stdout, &[b'c'; 300]);
        running.output(Source::Stdout, b"\nlast\n");
        let ready = s.take_ready(8, 0, Duration::ZERO, true);
        assert_eq!(ready.len(), 1);
        assert!(ready[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("dropped")));
        assert!(s.backlog().bytes <= 300, "{:?}", s.backlog());
        running.close().expect("close");
    }

    #[test]
    fn dev_keeps_logs_and_removes_the_oldest_finished_ones_past_the_bound() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = spool(tmp.path(), 200, false);
        for n in 0..4 {
            let mut w = s.stream(&format!("job{n}.m.1"), 1024);
            w.output(Source::Stdout, &[b'x'; 60]);
            w.close().expect("close");
        }
        assert!(!tmp.path().join("job0.m.1").exists());
        assert!(tmp.path().join("job3.m.1").exists());
        assert!(s.counters().removed_files.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn output_past_the_job_cap_is_counted_and_noted_at_the_end() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = spool(tmp.path(), 1 << 20, false);
        let mut w = s.stream("job.m1.1", 10);
        w.output(Source::Stdout, b"0123456789abcdef\n");
        let path = w.path().to_path_buf();
        let got = w.close().expect("close");
        assert_eq!(
            got,
            Written {
                kept: 10,
                over_cap: 7
            }
        );
        let text = std::fs::read_to_string(path).expect("read");
        assert!(text.contains(" stdout 0123456789\n"), "{text}");
        assert!(text.contains(" agent [batchly-agent] output truncated: kept the first 10 bytes"));
    }
}
