//! The `dev` embedded default: a job queue in a local directory, with the
//! same at-least-once rules as SQS. Layout under the root:
//!
//! ```text
//! queue/    waiting messages   <visible_at_ms>-<id>.<failures>.<receives>.msg
//! claimed/  being worked on    <id>.<failures>.<receives>.msg
//! dead/     refused messages   <id>.msg and <id>.reason.json
//! tmp/      submissions being written (renamed into queue/ when complete)
//! ```
//!
//! Every state change is one `rename(2)` within the root, so a message is
//! always in exactly one place, and a crash at any point leaves it either
//! waiting or claimed. One agent owns a root at a time (an exclusive lock on
//! `agent.lock`); at start it moves everything left in `claimed/` back to
//! `queue/`, which is this source's crash recovery. Producers (`submit`) need
//! no lock: they only ever rename complete files into `queue/`.
//!
//! New submissions are noticed through an inotify watch on `queue/`, so a job
//! starts as soon as it is submitted; the directory is still re-listed now and
//! then for what inotify cannot see. Without inotify (too many instances or
//! watches, or the watch stops working) the directory is polled instead.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::sync::Notify;

use super::{JobSource, Message, QueueError};

/// How long `receive` waits for a first message before returning none.
const LONG_POLL: Duration = Duration::from_millis(500);
/// Without a watch: how often an idle queue directory is checked for new
/// submissions (a `stat` of it; it is listed only when its mtime changed).
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Without a watch: a listing is re-read at least this often even if the
/// directory's mtime says nothing changed (coarse mtimes on some file systems).
const FULL_RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// With a watch: `queue/` is still listed this often, for changes inotify
/// never reports (a network file system written to from another host). The
/// watch does the real work; `tests/tests/e2e/dev_watch.rs` relies on this being
/// far longer than it waits for a job.
pub const WATCHED_RESCAN_INTERVAL: Duration = Duration::from_secs(300);
/// What in `queue/` may mean a new message: a file renamed in (how `submit`
/// and releases arrive) or written in place and closed; and the directory
/// itself going away, which ends the watch.
const WATCH_MASK: AddWatchFlags = AddWatchFlags::IN_MOVED_TO
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

const QUEUE: &str = "queue";
const CLAIMED: &str = "claimed";
const DEAD: &str = "dead";
const TMP: &str = "tmp";
const LOCK_FILE: &str = "agent.lock";

/// A waiting message as named in `queue/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Waiting {
    visible_at_ms: u64,
    id: String,
    failures: u32,
    receives: u32,
}

impl Waiting {
    fn file_name(&self) -> String {
        format!(
            "{:013}-{}.{}.{}.msg",
            self.visible_at_ms, self.id, self.failures, self.receives
        )
    }

    fn parse(name: &str) -> Option<Waiting> {
        let stem = name.strip_suffix(".msg")?;
        let (visible, rest) = stem.split_once('-')?;
        let (id, failures, receives) = parse_counts(rest)?;
        Some(Waiting {
            visible_at_ms: visible.parse().ok()?,
            id,
            failures,
            receives,
        })
    }
}

/// `<id>.<failures>.<receives>` → its parts.
fn parse_counts(s: &str) -> Option<(String, u32, u32)> {
    let mut parts = s.rsplitn(3, '.');
    let receives = parts.next()?.parse().ok()?;
    let failures = parts.next()?.parse().ok()?;
    let id = parts.next()?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some((id.to_string(), failures, receives))
}

fn claimed_name(id: &str, failures: u32, receives: u32) -> String {
    format!("{id}.{failures}.{receives}.msg")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> QueueError + 'a {
    move |source| QueueError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the directory layout (idempotent).
pub fn create_layout(root: &Path) -> Result<(), QueueError> {
    for sub in [QUEUE, CLAIMED, DEAD, TMP] {
        let p = root.join(sub);
        fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
    }
    Ok(())
}

/// A new message id: time-ordered (so submissions run in order) and unique.
fn new_message_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{nanos:016x}{:08x}", rand::random::<u32>())
}

/// Adds one message body to the queue under `root`; returns its id. Safe to
/// call while an agent runs on the same root.
pub fn enqueue(root: &Path, body: &[u8]) -> Result<String, QueueError> {
    create_layout(root)?;
    let id = new_message_id();
    let tmp = root.join(TMP).join(format!("{id}.part"));
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(body).map_err(io_err("writing", &tmp))?;
    drop(f);
    let waiting = Waiting {
        visible_at_ms: now_ms(),
        id: id.clone(),
        failures: 0,
        receives: 0,
    };
    let dest = root.join(QUEUE).join(waiting.file_name());
    fs::rename(&tmp, &dest).map_err(io_err("enqueueing", &dest))?;
    Ok(id)
}

/// The reason record written next to a dead-lettered message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DeadLetterRecord {
    pub message_id: String,
    pub reason: String,
    pub detail: String,
    pub receive_count: u32,
    pub at: String,
}

pub struct DirQueue {
    root: PathBuf,
    /// Held for the agent's lifetime: one agent per root.
    _lock: Flock<File>,
    cache: Mutex<Cache>,
    /// `None` when inotify could not be set up: then `queue/` is polled.
    watch: Option<QueueWatch>,
}

#[derive(Default)]
struct Cache {
    waiting: VecDeque<Waiting>,
    scanned_at: Option<Instant>,
    scanned_mtime: Option<SystemTime>,
}

/// An inotify watch on `queue/`, read by a thread of its own that raises
/// `changed` and wakes `receive` on every notification. It is set up before
/// the directory is first listed, and `changed` is taken only right before a
/// listing, so a message renamed in after a listing always ends the next wait.
struct QueueWatch {
    inotify: Arc<Inotify>,
    queue_dir: WatchDescriptor,
    shared: Arc<WatchShared>,
}

/// What the watch thread and the queue share.
#[derive(Default)]
struct WatchShared {
    /// Something arrived in `queue/` since the last listing.
    changed: AtomicBool,
    /// The watch no longer works (`queue/` was moved or removed, reading
    /// failed): `queue/` is polled from then on.
    stopped: AtomicBool,
    /// The queue is being dropped: the thread ends without a word.
    closing: AtomicBool,
    /// Holds a wake-up for a `receive` that is not waiting yet.
    wake: Notify,
}

/// What one read of the watch said.
#[derive(Debug, PartialEq)]
enum Notice {
    /// Something arrived in `queue/`, or so much that the kernel's queue of
    /// notifications overflowed: list the directory again.
    Changed,
    /// The watch no longer sees `queue/`.
    Stopped(String),
}

impl QueueWatch {
    fn start(dir: &Path) -> Result<QueueWatch, String> {
        // Blocking reads: the thread has nothing else to do.
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| format!("starting inotify: {e}"))?;
        let queue_dir = inotify
            .add_watch(dir, WATCH_MASK)
            .map_err(|e| format!("watching {}: {e}", dir.display()))?;
        let inotify = Arc::new(inotify);
        let shared = Arc::new(WatchShared::default());
        let (reader, thread_shared, thread_dir) =
            (inotify.clone(), shared.clone(), dir.to_path_buf());
        std::thread::Builder::new()
            .name("queue-watch".into())
            .spawn(move || read_notices(&reader, &thread_shared, &thread_dir))
            .map_err(|e| format!("starting the watch thread: {e}"))?;
        Ok(QueueWatch {
            inotify,
            queue_dir,
            shared,
        })
    }

    fn working(&self) -> bool {
        !self.shared.stopped.load(Ordering::SeqCst)
    }

    /// Whether something arrived since the last call; the caller lists.
    fn take_changed(&self) -> bool {
        self.shared.changed.swap(false, Ordering::SeqCst)
    }

    /// Waits for the next notification (or one that came since the last
    /// wait). Cancel-safe: dropping it loses nothing.
    async fn notified(&self) {
        self.shared.wake.notified().await;
    }
}

impl Drop for QueueWatch {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // Ends the thread's blocking read with IN_IGNORED. An error means the
        // watch is gone already, and so is the thread.
        let _ = self.inotify.rm_watch(self.queue_dir);
    }
}

/// The watch thread: reads notifications until the watch ends.
fn read_notices(inotify: &Inotify, shared: &WatchShared, dir: &Path) {
    let why = loop {
        match inotify.read_events() {
            Ok(events) => match notice_of(&events) {
                Notice::Changed => {
                    shared.changed.store(true, Ordering::SeqCst);
                    shared.wake.notify_one();
                }
                Notice::Stopped(why) => break why,
            },
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break format!("reading inotify: {e}"),
        }
    };
    shared.stopped.store(true, Ordering::SeqCst);
    shared.wake.notify_one();
    if !shared.closing.load(Ordering::SeqCst) {
        // Said once: the thread ends here and the queue polls from now on.
        tracing::warn!(
            dir = %dir.display(),
            "the queue directory watch stopped ({why}); checking it every {} ms instead",
            POLL_INTERVAL.as_millis()
        );
    }
}

fn notice_of(events: &[InotifyEvent]) -> Notice {
    let gone = AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_IGNORED
        | AddWatchFlags::IN_UNMOUNT;
    match events.iter().find(|event| event.mask.intersects(gone)) {
        Some(event) => Notice::Stopped(format!("queue/ went away: {:?}", event.mask)),
        None => Notice::Changed,
    }
}

fn dir_mtime(dir: &Path) -> Option<SystemTime> {
    fs::metadata(dir).and_then(|m| m.modified()).ok()
}

/// A message body, read up to one byte past the largest body the agent
/// accepts (so an oversized one is refused without being loaded whole).
fn read_body(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut body = Vec::new();
    File::open(path)?
        .take(super::MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)?;
    Ok(body)
}

impl DirQueue {
    /// Opens `root` for one agent, creating the layout. Fails if another
    /// agent already owns it.
    pub fn open(root: &Path) -> Result<DirQueue, QueueError> {
        create_layout(root)?;
        let lock_path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let owner = fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(QueueError::Busy(format!(
                    "another batchly-agent (pid {}) is already running on {}; stop it first",
                    owner.trim(),
                    root.display()
                )));
            }
            Err((_, errno)) => {
                return Err(io_err("locking", &lock_path)(std::io::Error::from(errno)))
            }
        };
        lock.set_len(0).map_err(io_err("writing", &lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io_err("writing", &lock_path))?;
        // Before anything lists queue/: what arrives after a listing must
        // leave a notification behind.
        let queue_dir = root.join(QUEUE);
        let watch = match QueueWatch::start(&queue_dir) {
            Ok(watch) => Some(watch),
            Err(why) => {
                tracing::warn!(
                    dir = %queue_dir.display(),
                    "cannot watch the queue directory ({why}); checking it every {} ms instead",
                    POLL_INTERVAL.as_millis()
                );
                None
            }
        };
        Ok(DirQueue {
            root: root.to_path_buf(),
            _lock: lock,
            cache: Mutex::new(Cache::default()),
            watch,
        })
    }

    /// The watch, while it works.
    fn working_watch(&self) -> Option<&QueueWatch> {
        self.watch.as_ref().filter(|watch| watch.working())
    }

    /// Waits until `queue/` may hold something new (or, watched, until the
    /// first waiting message becomes visible), but never past `deadline`.
    async fn wait_for_news(&self, deadline: Instant) {
        let Some(watch) = self.working_watch() else {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(POLL_INTERVAL.min(left)).await;
            return;
        };
        let until = self
            .next_visible_at()
            .map_or(deadline, |at| at.min(deadline));
        // Timing out is the normal end of an idle wait.
        let _ = tokio::time::timeout_at(until.into(), watch.notified()).await;
    }

    /// When the first known waiting message becomes visible, if it is not yet.
    fn next_visible_at(&self) -> Option<Instant> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let wait_ms = cache.waiting.front()?.visible_at_ms.checked_sub(now_ms())?;
        Some(Instant::now() + Duration::from_millis(wait_ms))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn scan(&self) -> Result<VecDeque<Waiting>, QueueError> {
        let dir = self.root.join(QUEUE);
        let mut found: Vec<Waiting> = fs::read_dir(&dir)
            .map_err(io_err("reading", &dir))?
            .filter_map(|e| {
                let e = e.ok()?;
                if !e.file_type().ok()?.is_file() {
                    return None;
                }
                Waiting::parse(e.file_name().to_str()?)
            })
            .collect();
        found.sort();
        Ok(found.into())
    }

    /// Claims up to `max` visible messages without waiting.
    fn claim_visible(&self, max: usize) -> Result<Vec<Message>, QueueError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        let front_visible = cache
            .waiting
            .front()
            .is_some_and(|w| w.visible_at_ms <= now);
        if !front_visible && self.worth_rescanning(&cache) {
            let mtime = dir_mtime(&self.root.join(QUEUE));
            cache.waiting = self.scan()?;
            cache.scanned_at = Some(Instant::now());
            cache.scanned_mtime = mtime;
        }
        let mut out = Vec::new();
        while out.len() < max {
            match cache.waiting.front() {
                Some(w) if w.visible_at_ms <= now => {}
                _ => break,
            }
            let Some(w) = cache.waiting.pop_front() else {
                break;
            };
            match self.claim(&w) {
                Ok(Some(msg)) => out.push(msg),
                Ok(None) => {}
                // What is already claimed is handed out, never stranded; the
                // failed one stays waiting for the next try.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, "cannot claim a message; trying again later");
                    cache.waiting.push_front(w);
                    break;
                }
                Err(e) => {
                    cache.waiting.push_front(w);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Re-reading `queue/` costs a directory listing: do it only when it may
    /// show something new (the watch said so, or the directory changed) and
    /// not too often.
    fn worth_rescanning(&self, cache: &Cache) -> bool {
        let Some(at) = cache.scanned_at else {
            return true;
        };
        if let Some(watch) = self.working_watch() {
            return watch.take_changed() || at.elapsed() >= WATCHED_RESCAN_INTERVAL;
        }
        if at.elapsed() < POLL_INTERVAL {
            return false;
        }
        at.elapsed() >= FULL_RESCAN_INTERVAL
            || dir_mtime(&self.root.join(QUEUE)) != cache.scanned_mtime
    }

    /// Renames one waiting message into `claimed/`; `None` if it vanished
    /// (another reader, or the producer replaced it).
    fn claim(&self, w: &Waiting) -> Result<Option<Message>, QueueError> {
        let from = self.root.join(QUEUE).join(w.file_name());
        let receives = w.receives + 1;
        let name = claimed_name(&w.id, w.failures, receives);
        let to = self.root.join(CLAIMED).join(&name);
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("claiming", &from)(e)),
        }
        match read_body(&to) {
            Ok(body) => Ok(Some(Message {
                id: w.id.clone(),
                body,
                attempt: w.failures + 1,
                receive_count: receives,
                receipt: name,
                queue: 0,
                group: None,
                sent_at: None,
            })),
            Err(e) => {
                // Unread, so not received: put it back as it was.
                let _ = fs::rename(&to, &from);
                Err(io_err("reading", &to)(e))
            }
        }
    }

    fn claimed_path(&self, msg: &Message) -> PathBuf {
        self.root.join(CLAIMED).join(&msg.receipt)
    }

    fn put_back(&self, claimed: &Path, w: Waiting) -> Result<(), QueueError> {
        let dest = self.root.join(QUEUE).join(w.file_name());
        fs::rename(claimed, &dest).map_err(io_err("releasing", claimed))?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let at = cache.waiting.partition_point(|x| x < &w);
        cache.waiting.insert(at, w);
        Ok(())
    }
}

impl JobSource for DirQueue {
    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }

    async fn receive(&self, max: usize) -> Result<Vec<Message>, QueueError> {
        let deadline = Instant::now() + LONG_POLL;
        loop {
            let got = self.claim_visible(max)?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            self.wait_for_news(deadline).await;
        }
    }

    async fn delete(&self, msg: &Message) -> Result<(), QueueError> {
        let p = self.claimed_path(msg);
        fs::remove_file(&p).map_err(io_err("deleting", &p))
    }

    async fn release(
        &self,
        msg: &Message,
        delay: Duration,
        failed: bool,
    ) -> Result<(), QueueError> {
        let p = self.claimed_path(msg);
        let failures = msg.attempt - 1 + u32::from(failed);
        let w = Waiting {
            visible_at_ms: now_ms() + delay.as_millis() as u64,
            id: msg.id.clone(),
            failures,
            receives: msg.receive_count,
        };
        self.put_back(&p, w)
    }

    async fn dead_letter(
        &self,
        msg: &Message,
        reason: &str,
        detail: &str,
    ) -> Result<(), QueueError> {
        let dead = self.root.join(DEAD);
        let record = DeadLetterRecord {
            message_id: msg.id.clone(),
            reason: reason.to_string(),
            detail: detail.to_string(),
            receive_count: msg.receive_count,
            at: crate::events::rfc3339_now(),
        };
        // The reason is written first, so a dead message never lacks one.
        let reason_path = dead.join(format!("{}.reason.json", msg.id));
        let text = serde_json::to_vec_pretty(&record).map_err(|e| QueueError::Io {
            action: "encoding",
            path: reason_path.clone(),
            source: std::io::Error::other(e),
        })?;
        fs::write(&reason_path, text).map_err(io_err("writing", &reason_path))?;
        let from = self.claimed_path(msg);
        let to = dead.join(format!("{}.msg", msg.id));
        fs::rename(&from, &to).map_err(io_err("dead-lettering", &from))
    }

    async fn recover_claims(&self, _known: &[Message]) -> Result<Vec<String>, QueueError> {
        // We hold the root's lock, so everything in claimed/ belongs to a
        // previous run that is gone.
        let dir = self.root.join(CLAIMED);
        let mut released = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("reading", &dir))? {
            let entry = entry.map_err(io_err("reading", &dir))?;
            let name = entry.file_name();
            let Some((id, failures, receives)) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".msg"))
                .and_then(parse_counts)
            else {
                continue;
            };
            let w = Waiting {
                visible_at_ms: now_ms(),
                id: id.clone(),
                failures,
                receives,
            };
            self.put_back(&entry.path(), w)?;
            released.push(id);
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: u32) -> Vec<u8> {
        format!("body-{n}").into_bytes()
    }

    #[tokio::test]
    async fn messages_come_out_in_submission_order_and_only_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for n in 0..5 {
            enqueue(tmp.path(), &body(n)).expect("enqueue");
        }
        let q = DirQueue::open(tmp.path()).expect("open");
        let first = q.receive(3).await.expect("receive");
        let rest = q.receive(10).await.expect("receive");
        let bodies: Vec<_> = first.iter().chain(&rest).map(|m| m.body.clone()).collect();
        assert_eq!(bodies, (0..5).map(body).collect::<Vec<_>>());
        assert!(q.receive(10).await.expect("receive").is_empty());
    }

    #[tokio::test]
    async fn a_second_agent_on_the_same_directory_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let _first = DirQueue::open(tmp.path()).expect("open");
        let err = DirQueue::open(tmp.path())
            .err()
            .expect("second open must fail");
        assert!(err.to_string().contains("already running"), "{err}");
    }

    #[tokio::test]
    async fn a_failed_release_counts_an_attempt_and_an_interruption_does_not() {
        let tmp = tempfile::tempdir().expect("tempdir");
        enqueue(tmp.path(), b"x").expect("enqueue");
        let q = DirQueue::open(tmp.path()).expect("open");
        let m = q.receive(1).await.expect("receive").remove(0);
        assert_eq!((m.attempt, m.receive_count), (1, 1));
        q.release(&m, Duration::ZERO, false).await.expect("release");
        let m = q.receive(1).await.expect("receive").remove(0);
        assert_eq!((m.attempt, m.receive_count), (1, 2));
        q.release(&m, Duration::ZERO, true).await.expect("release");
        let m = q.receive(1).await.expect("receive").remove(0);
        assert_eq!((m.attempt, m.receive_count), (2, 3));
        q.delete(&m).await.expect("delete");
        assert!(q.receive(1).await.expect("receive").is_empty());
    }

    #[tokio::test]
    async fn a_delayed_release_stays_invisible_until_its_time() {
        let tmp = tempfile::tempdir().expect("tempdir");
        enqueue(tmp.path(), b"x").expect("enqueue");
        let q = DirQueue::open(tmp.path()).expect("open");
        let m = q.receive(1).await.expect("receive").remove(0);
        q.release(&m, Duration::from_secs(3600), true)
            .await
            .expect("release");
        assert!(q.receive(1).await.expect("receive").is_empty());
        assert_eq!(fs::read_dir(tmp.path().join(QUEUE)).expect("ls").count(), 1);
    }

    #[tokio::test]
    async fn claims_of_a_crashed_agent_are_released_at_the_next_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        enqueue(tmp.path(), b"x").expect("enqueue");
        {
            let q = DirQueue::open(tmp.path()).expect("open");
            let got = q.receive(1).await.expect("receive");
            assert_eq!(got.len(), 1);
            // dropped without delete or release: like kill -9
        }
        let q = DirQueue::open(tmp.path()).expect("reopen");
        assert_eq!(q.recover_claims(&[]).await.expect("recover").len(), 1);
        let m = q.receive(1).await.expect("receive").remove(0);
        assert_eq!(m.body, b"x");
        assert_eq!((m.attempt, m.receive_count), (1, 2));
    }

    #[tokio::test]
    async fn dead_lettered_message_keeps_its_reason_beside_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        enqueue(tmp.path(), b"junk").expect("enqueue");
        let q = DirQueue::open(tmp.path()).expect("open");
        let m = q.receive(1).await.expect("receive").remove(0);
        q.dead_letter(&m, "malformed", "body is not JSON")
            .await
            .expect("dlq");
        let dead = tmp.path().join(DEAD);
        assert_eq!(
            fs::read(dead.join(format!("{}.msg", m.id))).expect("msg"),
            b"junk"
        );
        let rec: DeadLetterRecord = serde_json::from_slice(
            &fs::read(dead.join(format!("{}.reason.json", m.id))).expect("reason"),
        )
        .expect("json");
        assert_eq!(rec.reason, "malformed");
        assert_eq!(rec.detail, "body is not JSON");
        assert!(q.receive(1).await.expect("receive").is_empty());
    }

    #[tokio::test]
    async fn odd_entries_in_the_queue_strand_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        enqueue(tmp.path(), b"a").expect("enqueue");
        // A directory with a message's name, sorted before the real one.
        fs::create_dir(tmp.path().join(QUEUE).join("0000000000001-abc.0.0.msg")).expect("mkdir");
        enqueue(tmp.path(), b"b").expect("enqueue");
        let q = DirQueue::open(tmp.path()).expect("open");
        let got = q.receive(10).await.expect("receive");
        assert_eq!(
            got.iter().map(|m| m.body.clone()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        for m in &got {
            q.delete(m).await.expect("delete");
        }
        assert_eq!(
            fs::read_dir(tmp.path().join(CLAIMED)).expect("ls").count(),
            0
        );
    }

    #[tokio::test]
    async fn an_oversized_body_is_read_only_up_to_one_byte_past_the_limit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        enqueue(tmp.path(), &vec![b'x'; super::super::MAX_BODY_BYTES * 3]).expect("enqueue");
        let q = DirQueue::open(tmp.path()).expect("open");
        let m = q.receive(1).await.expect("receive").remove(0);
        assert_eq!(m.body.len(), super::super::MAX_BODY_BYTES + 1);
    }

    /// Far longer than a healthy watch needs; reaching it is a failure.
    const NOTICE_WAIT: Duration = Duration::from_secs(60);

    /// Receives until a message comes (each receive is one bounded long
    /// poll), for at most `NOTICE_WAIT`.
    async fn receive_within(q: &DirQueue) -> Vec<Message> {
        let give_up = Instant::now() + NOTICE_WAIT;
        loop {
            let got = q.receive(1).await.expect("receive");
            if !got.is_empty() || Instant::now() >= give_up {
                return got;
            }
        }
    }

    fn bodies(messages: &[Message]) -> Vec<Vec<u8>> {
        messages.iter().map(|m| m.body.clone()).collect()
    }

    #[tokio::test]
    async fn a_message_submitted_after_the_first_listing_arrives_through_the_watch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = DirQueue::open(tmp.path()).expect("open");
        assert!(q.working_watch().is_some(), "inotify is available here");
        assert!(q.receive(1).await.expect("receive").is_empty());
        enqueue(tmp.path(), b"late").expect("enqueue");
        // Without a notice the next listing is WATCHED_RESCAN_INTERVAL away,
        // far beyond NOTICE_WAIT: only the watch can bring the message in.
        assert_eq!(bodies(&receive_within(&q).await), vec![b"late".to_vec()]);
    }

    #[tokio::test]
    async fn a_message_renamed_in_between_the_listing_and_the_wait_ends_the_wait() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = DirQueue::open(tmp.path()).expect("open");
        assert!(q.claim_visible(1).expect("listing").is_empty());
        enqueue(tmp.path(), b"in between").expect("enqueue");
        let an_hour = Instant::now() + Duration::from_secs(3600);
        tokio::time::timeout(NOTICE_WAIT, q.wait_for_news(an_hour))
            .await
            .expect("the rename before the wait must end the wait");
        let got = q.claim_visible(1).expect("listing");
        assert_eq!(bodies(&got), vec![b"in between".to_vec()], "it is listed");
    }

    #[tokio::test]
    async fn without_a_watch_the_directory_is_polled() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut q = DirQueue::open(tmp.path()).expect("open");
        q.watch = None;
        assert!(q.receive(1).await.expect("receive").is_empty());
        enqueue(tmp.path(), b"polled").expect("enqueue");
        assert_eq!(bodies(&receive_within(&q).await), vec![b"polled".to_vec()]);
    }

    #[tokio::test]
    async fn a_queue_directory_replaced_under_the_watch_is_polled_from_then_on() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let q = DirQueue::open(tmp.path()).expect("open");
        assert!(q.receive(1).await.expect("receive").is_empty());
        fs::rename(tmp.path().join(QUEUE), tmp.path().join("queue.old")).expect("mv");
        fs::create_dir(tmp.path().join(QUEUE)).expect("mkdir");
        enqueue(tmp.path(), b"into the new dir").expect("enqueue");
        let got = receive_within(&q).await;
        assert!(q.working_watch().is_none(), "the watch saw queue/ go");
        assert_eq!(bodies(&got), vec![b"into the new dir".to_vec()]);
    }

    #[test]
    fn file_names_round_trip() {
        let w = Waiting {
            visible_at_ms: 1_763_850_000_123,
            id: "abc123".into(),
            failures: 2,
            receives: 5,
        };
        assert_eq!(Waiting::parse(&w.file_name()), Some(w));
        assert_eq!(Waiting::parse("garbage.msg"), None);
    }
}
