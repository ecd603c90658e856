//! Where jobs come from. A `JobSource` hands out messages and takes back
//! their outcome: delete (final), release (run again, now or after a
//! delay), dead-letter (refused, with the reason). Two sources share this
//! interface: `dir` (the `dev` embedded default, a local directory) and SQS.
//!
//! A source never decides what happens to a job; the supervisor does. A
//! source must never lose a message: every call either takes effect or
//! returns an error and leaves the message where it was.

pub mod batch;
pub mod custody;
pub mod dir;
pub mod sqs;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::retry::ErrorClass;

/// Largest message body the agent accepts: SQS's own limit (1 MiB). A
/// larger body is rejected as `malformed` without being read whole.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// One received message, claimed by this agent until it is deleted,
/// released or dead-lettered.
#[derive(Debug, Clone)]
pub struct Message {
    /// The source's id of the message (stable across receives).
    pub id: String,
    pub body: Vec<u8>,
    /// Which attempt of the job this receive is (1-based). Releases that are
    /// not failures (exit 75, drain, crash recovery) do not count where the
    /// source can tell them apart.
    pub attempt: u32,
    /// How many times the message has been received, this time included;
    /// unique per run of the job, so it names log streams.
    pub receive_count: u32,
    /// Opaque handle for delete/release/extend (a receipt handle).
    pub receipt: String,
    /// Index of the queue it came from, in priority order.
    pub queue: usize,
    /// FIFO message group: messages of one group run one at a time, in order.
    pub group: Option<String>,
    /// When it was first sent to its queue, where the source knows (SQS's
    /// `SentTimestamp`): the job's queue wait is measured from here.
    pub sent_at: Option<std::time::SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Busy(String),
    #[error("{action} {target}: {detail}")]
    Service {
        action: &'static str,
        target: String,
        /// What the caller may do about it (see `retry::classify`).
        class: ErrorClass,
        detail: String,
    },
}

impl QueueError {
    /// Whether trying again can help, or the message is not ours any more.
    /// Local trouble (disk, a lock held) is worth another try.
    pub fn class(&self) -> ErrorClass {
        match self {
            QueueError::Io { .. } | QueueError::Busy(_) => ErrorClass::Transient,
            QueueError::Service { class, .. } => *class,
        }
    }

    /// The queue a service error is about (its URL), if it is one.
    pub fn target(&self) -> Option<&str> {
        match self {
            QueueError::Service { target, .. } => Some(target),
            _ => None,
        }
    }
}

/// What a source tells the supervisor's ledger about a claimed message as
/// it happens, so that a crash at any moment leaves the ledger right.
pub trait ClaimJournal: Send + Sync + 'static {
    /// SQS handed the message out again while its job runs here: later
    /// calls (and recovery after a crash) must use this receipt.
    fn receipt_changed(&self, message_id: &str, receipt: &str);
    /// A copy of the message now stands for it (a release that is not a
    /// failure): only the original's removal is left, and after a crash
    /// that removal is completed, never a release (which would run the job
    /// twice). Returns once the note is written; a note that cannot be
    /// written cannot undo the copy, so it is reported (log and `status`).
    fn copy_sent(&self, message_id: &str, copy_id: &str);
}

/// A queue of signed job envelopes with at-least-once delivery.
pub trait JobSource: Send + Sync + 'static {
    /// A short human description ("dir /home/me/batchly-dev", a queue URL).
    fn describe(&self) -> String;

    /// Claims at most `max` messages, waiting a bounded time (a long poll)
    /// for the first one; may return none.
    fn receive(&self, max: usize) -> impl Future<Output = Result<Vec<Message>, QueueError>> + Send;

    /// How long the supervisor may wait for more free slots before asking a
    /// busy queue for work, so one call fetches several messages. Zero for
    /// sources where a receive costs nothing.
    fn receive_gather(&self) -> Duration {
        Duration::ZERO
    }

    /// The job's outcome is final: remove the message for good.
    fn delete(&self, msg: &Message) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Make the message available again after `delay`. `failed` says the
    /// attempt counts as a failure (a retry) rather than an interruption.
    fn release(
        &self,
        msg: &Message,
        delay: Duration,
        failed: bool,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// The job's outcome is decided: its delete or release comes next.
    /// Batching sources use it to know which messages may still join a
    /// batch of deletes.
    fn note_decided(&self, _msg: &Message) {}

    /// The caller gives up on a message it could neither delete nor
    /// release: stop keeping it claimed (no more lease renewals), so it
    /// comes back by itself when its claim expires.
    fn abandon(&self, _msg: &Message) {}

    /// Move a refused message out of the queue, keeping the reason with it.
    fn dead_letter(
        &self,
        msg: &Message,
        reason: &str,
        detail: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Lets the source keep the supervisor's ledger up to date (see
    /// `ClaimJournal`). Sources that never change a claim ignore it.
    fn set_journal(&self, _journal: Arc<dyn ClaimJournal>) {}

    /// After a crash, for a message whose copy a previous run had already
    /// sent: remove the original for good (a copy kept in custody, or the
    /// message itself), never release it. A message already gone is fine.
    fn forget_copied(&self, msg: &Message) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.delete(msg)
    }

    /// After a crash: make every message the previous run had claimed
    /// available again. `known` are the ones the ledger remembers; a source
    /// that can find more by itself (the directory) releases those too.
    /// Returns the ids of the messages it released. A message it cannot
    /// release is logged and left for its claim to expire (or for the next
    /// start); it never stops the others.
    fn recover_claims(
        &self,
        known: &[Message],
    ) -> impl Future<Output = Result<Vec<String>, QueueError>> + Send;
}
