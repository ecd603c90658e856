//! Deletes and visibility changes in SQS's batch calls. Each batch is sent
//! once: its entries' callers get their own results, classified, and retry
//! by the one retry policy, so a call is never retried in two places.

use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;

use super::lease::{lock, Custody, Leases};
use crate::aws_errors::describe;
use crate::queue::batch::{entry_results as per_entry, Batcher, EntryError, EntryResult};
use crate::retry::{self, ErrorClass};

/// How long visibility changes wait to share a batch call.
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// How long deletes wait to share a batch call (less when nothing else can
/// join, see `delete_batcher`).
const DELETE_LINGER: Duration = Duration::from_millis(250);

/// Deletes wait up to `DELETE_LINGER` for company, but go out as soon as
/// every message of the queue whose outcome is decided is in the batch:
/// nothing else could join it soon, so jobs that ended together are
/// deleted in one call at once, while jobs still running do not hold it.
/// `leases_fell` is raised when a lease goes (released, say): the batch
/// asks again instead of waiting for it.
pub(super) fn delete_batcher(
    client: Client,
    url: String,
    queue: usize,
    leases: Leases,
    leases_fell: tokio::sync::watch::Receiver<()>,
) -> Batcher<String> {
    let complete = move |entries: usize| {
        let held = lock(&leases)
            .values()
            .filter(|l| l.queue == queue && l.custody != Custody::Yes && l.decided)
            .count();
        entries >= held
    };
    Batcher::spawn_until(
        DELETE_LINGER,
        complete,
        Some(leases_fell),
        move |receipts: Vec<String>| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let entries = receipts
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(r)
                            .build()
                    })
                    .collect::<Result<Vec<_>, _>>();
                let entries = match entries {
                    Ok(e) => e,
                    Err(e) => {
                        return all_failed(receipts.len(), ErrorClass::Permanent, e.to_string())
                    }
                };
                let sent = client
                    .delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await;
                match sent {
                    Ok(out) => per_entry(receipts.len(), out.failed()),
                    Err(e) => all_failed(receipts.len(), retry::classify(&e), describe(&e)),
                }
            }
        },
    )
}

pub(super) fn visibility_batcher(client: Client, url: String) -> Batcher<(String, i32)> {
    Batcher::spawn(BATCH_LINGER, move |changes: Vec<(String, i32)>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let entries = changes
                .iter()
                .enumerate()
                .map(|(i, (r, secs))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(*secs)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>();
            let entries = match entries {
                Ok(e) => e,
                Err(e) => return all_failed(changes.len(), ErrorClass::Permanent, e.to_string()),
            };
            let sent = client
                .change_message_visibility_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await;
            match sent {
                Ok(out) => per_entry(changes.len(), out.failed()),
                Err(e) => all_failed(changes.len(), retry::classify(&e), describe(&e)),
            }
        }
    })
}

fn all_failed(n: usize, class: ErrorClass, detail: String) -> Vec<EntryResult> {
    vec![Err(EntryError::new(class, detail)); n]
}
