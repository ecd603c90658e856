//! Batches single requests into SQS's batch APIs (`DeleteMessageBatch`,
//! `ChangeMessageVisibilityBatch`): up to 10 entries per call, gathered for
//! at most a short linger after the first one arrives. Each caller still
//! gets its own entry's result, so batching never hides a failure.
//!
//! The linger trades a few milliseconds of latency for fewer API calls (and
//! a lower SQS bill); it is bounded, and a full batch goes out at once, as
//! does one that `complete` says nothing more can join. `complete` is asked
//! again whenever an entry arrives or its `wake` says the world changed (a
//! job that could have joined will not): a batch never waits out its linger
//! for company that is not coming.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::retry::ErrorClass;

/// SQS's limit on entries per batch call.
pub const MAX_BATCH_ENTRIES: usize = 10;

/// Requests waiting for a batch; more callers than this wait to enqueue.
const QUEUE_DEPTH: usize = 1024;

/// Why one entry of a batch did not take effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct EntryError {
    pub class: ErrorClass,
    pub detail: String,
}

impl EntryError {
    pub fn new(class: ErrorClass, detail: impl Into<String>) -> EntryError {
        EntryError {
            class,
            detail: detail.into(),
        }
    }
}

/// One result per entry of a batch call.
pub type EntryResult = Result<(), EntryError>;

type Reply = oneshot::Sender<EntryResult>;

pub struct Batcher<T> {
    tx: mpsc::Sender<(T, Reply)>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batching task. `flush` performs one batch call and returns
    /// one result per entry, in order.
    pub fn spawn<F, Fut>(linger: Duration, flush: F) -> Batcher<T>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<EntryResult>> + Send,
    {
        Batcher::spawn_until(linger, |_| false, None, flush)
    }

    /// Like `spawn`, but a batch goes out before the linger ends once
    /// `complete(entries)` says no other entry can join it (every message
    /// that could be deleted is in it, say). `complete` is asked when an
    /// entry arrives and whenever `wake` changes.
    pub fn spawn_until<C, F, Fut>(
        linger: Duration,
        complete: C,
        wake: Option<watch::Receiver<()>>,
        flush: F,
    ) -> Batcher<T>
    where
        C: Fn(usize) -> bool + Send + 'static,
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<EntryResult>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(T, Reply)>(QUEUE_DEPTH);
        tokio::spawn(async move {
            let mut wake = wake;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + linger;
                let why = loop {
                    // What queued up while the last call was out joins
                    // before anyone is asked whether more is coming.
                    while batch.len() < MAX_BATCH_ENTRIES {
                        match rx.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    if batch.len() >= MAX_BATCH_ENTRIES {
                        break "full";
                    }
                    if complete(batch.len()) {
                        break "complete";
                    }
                    tokio::select! {
                        next = rx.recv() => match next {
                            Some(item) => batch.push(item),
                            None => break "closing",
                        },
                        _ = tokio::time::sleep_until(deadline) => break "linger",
                        changed = changed(&mut wake) => if changed.is_err() {
                            wake = None;
                        },
                    }
                };
                tracing::trace!(entries = batch.len(), why, "batch call");
                let (items, replies): (Vec<T>, Vec<Reply>) = batch.into_iter().unzip();
                let mut results = flush(items).await.into_iter();
                for reply in replies {
                    let result = results.next().unwrap_or_else(|| {
                        Err(EntryError::new(
                            ErrorClass::Transient,
                            "the batch answer has no result for this entry",
                        ))
                    });
                    let _ = reply.send(result);
                }
            }
        });
        Batcher { tx }
    }

    /// Queues one entry and waits for its own result. The entry is sent
    /// even if the caller stops waiting.
    pub async fn submit(&self, item: T) -> EntryResult {
        self.submit_then(item, || {}).await
    }

    /// Like `submit`; `queued` runs as soon as the entry is in the queue for
    /// a batch (before its result is known).
    pub async fn submit_then(&self, item: T, queued: impl FnOnce()) -> EntryResult {
        let stopped = || EntryError::new(ErrorClass::Transient, "the batching task has stopped");
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.map_err(|_| stopped())?;
        queued();
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// Resolves when `wake` changes; never without one.
async fn changed(wake: &mut Option<watch::Receiver<()>>) -> Result<(), watch::error::RecvError> {
    match wake {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// One result per entry from a batch answer's failures (ids are indexes).
/// A failed entry is classified by its code; `SenderFault: false` means
/// SQS's side failed, which is worth another try whatever the code.
pub fn entry_results(
    n: usize,
    failed: &[aws_sdk_sqs::types::BatchResultErrorEntry],
) -> Vec<EntryResult> {
    let mut out = vec![Ok(()); n];
    for f in failed {
        if let Some(slot) = f.id().parse::<usize>().ok().and_then(|i| out.get_mut(i)) {
            let class = match crate::retry::classify_code(f.code(), None) {
                ErrorClass::Permanent if !f.sender_fault() => ErrorClass::Transient,
                class => class,
            };
            *slot = Err(EntryError::new(
                class,
                format!("{}: {}", f.code(), f.message().unwrap_or("")),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::types::BatchResultErrorEntry;

    fn failed(id: &str, code: &str, sender_fault: bool) -> BatchResultErrorEntry {
        BatchResultErrorEntry::builder()
            .id(id)
            .code(code)
            .sender_fault(sender_fault)
            .message("m")
            .build()
            .expect("entry")
    }

    #[test]
    fn each_batch_entry_gets_its_own_classified_result() {
        let out = entry_results(
            4,
            &[
                failed("1", "ReceiptHandleIsInvalid", true),
                failed("2", "InternalError", false),
                failed("3", "InvalidParameterValue", true),
            ],
        );
        assert_eq!(out[0], Ok(()));
        let classes: Vec<ErrorClass> = out[1..]
            .iter()
            .map(|r| r.as_ref().expect_err("failed").class)
            .collect();
        assert_eq!(
            classes,
            [
                ErrorClass::Gone,
                ErrorClass::Transient,
                ErrorClass::Permanent
            ]
        );
    }
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn entries_arriving_together_share_one_call_of_at_most_ten() {
        let calls = Arc::new(Mutex::new(Vec::<usize>::new()));
        let seen = calls.clone();
        let batcher = Arc::new(Batcher::spawn(
            Duration::from_millis(50),
            move |items: Vec<u32>| {
                seen.lock().expect("lock").push(items.len());
                let results = items
                    .iter()
                    .map(|i| {
                        if i % 7 == 0 {
                            Err(EntryError::new(
                                ErrorClass::Permanent,
                                format!("entry {i} failed"),
                            ))
                        } else {
                            Ok(())
                        }
                    })
                    .collect();
                async move { results }
            },
        ));
        let mut tasks = Vec::new();
        for i in 1..=15u32 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move { (i, b.submit(i).await) }));
        }
        for t in tasks {
            let (i, result) = t.await.expect("task");
            assert_eq!(result.is_err(), i % 7 == 0, "entry {i} got {result:?}");
        }
        let calls = calls.lock().expect("lock").clone();
        assert_eq!(calls.iter().sum::<usize>(), 15);
        assert!(calls.iter().all(|n| *n <= MAX_BATCH_ENTRIES), "{calls:?}");
        assert_eq!(
            calls.len(),
            2,
            "15 entries at once take two calls: {calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_nothing_more_can_join_goes_out_before_the_linger_ends() {
        let calls = Arc::new(Mutex::new(Vec::<usize>::new()));
        let seen = calls.clone();
        // Three entries are all there can be.
        let batcher = Arc::new(Batcher::spawn_until(
            Duration::from_secs(3600),
            |n| n >= 3,
            None,
            move |items: Vec<u32>| {
                seen.lock().expect("lock").push(items.len());
                let results = vec![Ok(()); items.len()];
                async move { results }
            },
        ));
        let began = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..3u32 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move { b.submit(i).await }));
        }
        for t in tasks {
            t.await.expect("task").expect("entry");
        }
        assert_eq!(*calls.lock().expect("lock"), vec![3]);
        assert!(
            began.elapsed() < Duration::from_secs(3600),
            "flushed without waiting out the linger"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_out_when_the_company_it_waits_for_is_no_longer_coming() {
        let calls = Arc::new(Mutex::new(Vec::<usize>::new()));
        let seen = calls.clone();
        // Two entries could join; then one of them turns out not to come.
        let expected = Arc::new(std::sync::atomic::AtomicUsize::new(2));
        let (tx, rx) = watch::channel(());
        let count = expected.clone();
        let batcher = Arc::new(Batcher::spawn_until(
            Duration::from_secs(3600),
            move |n| n >= count.load(std::sync::atomic::Ordering::SeqCst),
            Some(rx),
            move |items: Vec<u32>| {
                seen.lock().expect("lock").push(items.len());
                let results = vec![Ok(()); items.len()];
                async move { results }
            },
        ));
        let began = tokio::time::Instant::now();
        let b = batcher.clone();
        let first = tokio::spawn(async move { b.submit(1).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            calls.lock().expect("lock").is_empty(),
            "still waiting for the second"
        );
        expected.store(1, std::sync::atomic::Ordering::SeqCst);
        tx.send_replace(());
        first.await.expect("task").expect("entry");
        assert_eq!(*calls.lock().expect("lock"), vec![1]);
        assert!(
            began.elapsed() < Duration::from_secs(3600),
            "woken, it did not wait out the linger"
        );
    }
}
