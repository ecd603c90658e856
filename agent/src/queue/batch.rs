//! Batches single requests into SQS's batch APIs (`DeleteMessageBatch`,
//! `ChangeMessageVisibilityBatch`): up to 10 entries per call, gathered for
//! at most a short linger after the first one arrives. Each caller still
//! gets its own entry's result, so batching never hides a failure.
//!
//! The linger trades a few milliseconds of latency for fewer API calls (and
//! a lower SQS bill); it is bounded, and a full batch goes out at once, as
//! does one that `complete` says nothing more can join.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

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
        Batcher::spawn_until(linger, |_| false, flush)
    }

    /// Like `spawn`, but a batch goes out before the linger ends once
    /// `complete(entries)` says no other entry can join it (every message
    /// that could be deleted is in it, say).
    pub fn spawn_until<C, F, Fut>(linger: Duration, complete: C, flush: F) -> Batcher<T>
    where
        C: Fn(usize) -> bool + Send + 'static,
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<EntryResult>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(T, Reply)>(QUEUE_DEPTH);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + linger;
                while batch.len() < MAX_BATCH_ENTRIES && !complete(batch.len()) {
                    tokio::select! {
                        next = rx.recv() => match next {
                            Some(item) => batch.push(item),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
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
        let stopped = || EntryError::new(ErrorClass::Transient, "the batching task has stopped");
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).await.map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
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
}
