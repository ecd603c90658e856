//! The lease of every message handed out: kept hidden by visibility
//! renewals (in batches, once half of the lease is used up, never past
//! SQS's 12-hour limit after the receipt), and taken into custody when a
//! job comes close to that limit.
//!
//! A lease being finished (its message being deleted or released) is never
//! renewed: a renewal landing after a release would hide the message again
//! for a whole visibility timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Shared;
use crate::queue::custody::{Attribute, Held};

/// One message handed out and not yet finished, keyed by message id. If
/// SQS hands the same message out again while its job still runs here
/// (its visibility lapsed, say during an outage), the lease takes the new
/// receipt and no second copy is started.
pub(super) struct Lease {
    pub queue: usize,
    pub receipt: String,
    pub received_at: Instant,
    pub visible_until: Instant,
    pub message_id: String,
    pub body: String,
    pub group: Option<String>,
    /// The producer's message attributes, kept for copies sent back.
    pub attributes: Vec<Attribute>,
    /// The attempt this receive is (see `Message::attempt`).
    pub attempt: u32,
    /// Receives of the job so far, this one included.
    pub receives: u32,
    /// Whether the message is still in SQS or in the custody store.
    pub custody: Custody,
    /// A copy was sent for a release; only the original's delete is left.
    pub copy_sent: bool,
    /// The job's outcome is decided: its delete or release is coming.
    pub decided: bool,
    /// A delete or release is under way: no renewal, no custody under it.
    pub finishing: bool,
    /// A renewal is on its way to SQS; a release waits for its answer, so
    /// the renewal can never land after the release.
    pub renewing: bool,
}

/// Where a held message lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Custody {
    /// In SQS, kept hidden by heartbeats.
    No,
    /// Being copied to the custody store and deleted from SQS; deletes and
    /// releases wait until that has settled either way.
    Taking,
    /// Deleted from SQS; the custody store has the only copy.
    Yes,
}

impl Lease {
    pub fn held(&self, queue_url: &str, failures: u32) -> Held {
        Held {
            message_id: self.message_id.clone(),
            queue_url: queue_url.to_string(),
            body: self.body.clone(),
            group: self.group.clone(),
            failures,
            receives: self.receives,
            attributes: self.attributes.clone(),
        }
    }
}

pub(super) type Leases = Arc<Mutex<HashMap<String, Lease>>>;

pub(super) fn lock(leases: &Leases) -> MutexGuard<'_, HashMap<String, Lease>> {
    leases.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a lease is due for renewal at `now`, and if so for how many
/// seconds and until when: once half of it is used up, by the queue's
/// visibility timeout, never into the last `lead / 2` before `max_hold`
/// after receipt. Zero seconds means that limit has been reached. A lease
/// being finished is never due.
pub(super) fn renewal(
    lease: &Lease,
    vis: Duration,
    tick: Duration,
    now: Instant,
    max_hold: Duration,
    lead: Duration,
) -> Option<(i32, Instant)> {
    if lease.finishing || lease.renewing || lease.custody != Custody::No {
        return None;
    }
    let remaining = lease.visible_until.saturating_duration_since(now);
    if remaining > vis / 2 {
        return None;
    }
    let limit = lease.received_at + max_hold - lead / 2;
    let until = (now + vis.max(tick * 4)).min(limit);
    // SQS takes whole seconds: the lease ends where the seconds sent say.
    let secs = until.saturating_duration_since(now).as_secs();
    let until = now + Duration::from_secs(secs);
    Some((secs as i32, until))
}

/// Renews leases before they expire, in batches, and takes custody of the
/// messages of jobs that approach the 12-hour limit.
pub(super) async fn heartbeat(shared: Arc<Shared>) {
    let shortest = shared
        .queues
        .iter()
        .map(|q| q.visibility)
        .min()
        .unwrap_or(Duration::from_secs(30));
    // Renewals are due at half the lease; ticking at a quarter of it
    // catches each one in time without waking needlessly.
    let tick = (shortest / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    // Custody must be taken while the lease can still be renewed: a few
    // ticks at least before the last renewal (only short test limits need
    // more than the usual lead).
    let (max_hold, lead) = (shared.max_hold, shared.lead().max(tick * 4));
    // Renewals are spawned, never awaited here: a turn takes no time but
    // the tick's, so a loop quiet for minutes is a wedged one.
    let beat =
        crate::liveness::global().register("lease heartbeat", tick * 4 + Duration::from_secs(60));
    loop {
        tokio::time::sleep(tick).await;
        beat.beat();
        let now = Instant::now();
        take_custody_where_due(&shared, now, lead);
        let due: Vec<(String, String, usize, i32, Instant)> = shared
            .leases()
            .iter_mut()
            .filter_map(|(id, lease)| {
                let vis = shared.queues[lease.queue].visibility;
                let (secs, until) = renewal(lease, vis, tick, now, max_hold, lead)?;
                lease.renewing = secs > 0;
                (secs > 0).then(|| (id.clone(), lease.receipt.clone(), lease.queue, secs, until))
            })
            .collect();
        // Each renewal settles on its own: a hung call never holds up the
        // next tick or the other leases (the SDK's attempt timeout ends it).
        for (id, receipt, queue, secs, until) in due {
            let shared = shared.clone();
            tokio::spawn(async move {
                let result = shared.visibility[queue].submit((receipt, secs)).await;
                renewed(&shared, &id, until, result);
            });
        }
    }
}

/// Records the answer to one renewal.
fn renewed(shared: &Shared, id: &str, until: Instant, result: crate::queue::batch::EntryResult) {
    if let Some(l) = shared.leases().get_mut(id) {
        l.renewing = false;
        if result.is_ok() {
            l.visible_until = until;
        }
    }
    match result {
        Ok(()) => {}
        Err(e) if e.class == crate::retry::ErrorClass::Gone => {
            tracing::warn!(message_id = %id, error = %e, "a message's receipt is no longer accepted: its visibility lapsed and SQS may have handed it to another worker");
        }
        Err(e) => {
            tracing::warn!(message_id = %id, error = %e, "cannot extend a message's visibility; will retry")
        }
    }
}

/// Takes custody (copy kept on disk, then deleted from SQS) of every
/// message held for `max_hold - lead` whose job still runs. The copy counts
/// the running attempt as failed: it is only ever sent from the store by
/// itself after the agent died under the job (a release computes its own
/// count), and such a job must not loop forever.
fn take_custody_where_due(shared: &Arc<Shared>, now: Instant, lead: Duration) {
    let due: Vec<(String, String, usize, Held)> = shared
        .leases()
        .iter_mut()
        .filter(|(_, l)| {
            l.custody == Custody::No
                && !l.finishing
                && now >= l.received_at + shared.max_hold - lead
        })
        .map(|(id, l)| {
            // From here until it settles, deletes and releases wait.
            l.custody = Custody::Taking;
            let held = l.held(&shared.queues[l.queue].url, l.attempt);
            (id.clone(), l.receipt.clone(), l.queue, held)
        })
        .collect();
    // All at once, so their deletes share batches; each settles on its own
    // (the lease stays `Taking` until then), so renewals of other leases
    // are never held up behind them.
    for (id, receipt, queue, held) in due {
        let shared = shared.clone();
        tokio::spawn(async move { take_custody(&shared, id, receipt, queue, held).await });
    }
}

async fn take_custody(shared: &Shared, id: String, receipt: String, queue: usize, held: Held) {
    let settle = |state: Custody| {
        if let Some(l) = shared.leases().get_mut(&id) {
            l.custody = state;
        }
    };
    if let Err(e) = shared.custody.keep(&held) {
        settle(Custody::No);
        tracing::error!(message_id = %held.message_id, error = %e, "cannot keep a copy of a message nearing SQS's 12-hour limit; it will become visible again");
        return;
    }
    match shared.deletes[queue].submit(receipt).await {
        Ok(()) => {
            settle(Custody::Yes);
            tracing::warn!(
                message_id = %held.message_id,
                "a job has held its message nearly as long as SQS allows (12 hours): the agent took custody of it \
                 (deleted from SQS, kept in state.dir until the job ends; sent back to the queue if it must run again)"
            );
        }
        Err(e) => {
            let _ = shared.custody.release(&held.message_id);
            settle(Custody::No);
            tracing::warn!(message_id = %held.message_id, error = %e, "cannot take custody of a message yet; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sqs::{CUSTODY_LEAD, MAX_VISIBILITY};

    const VIS: Duration = Duration::from_secs(30);
    const TICK: Duration = Duration::from_millis(7500);

    fn lease(received_ago: Duration, visible_for: Duration, now: Instant) -> Lease {
        Lease {
            queue: 0,
            receipt: "r".into(),
            received_at: now - received_ago,
            visible_until: now + visible_for,
            message_id: "m".into(),
            body: String::new(),
            group: None,
            attributes: Vec::new(),
            attempt: 1,
            receives: 1,
            custody: Custody::No,
            copy_sent: false,
            decided: false,
            finishing: false,
            renewing: false,
        }
    }

    #[test]
    fn a_lease_is_renewed_only_once_half_of_it_is_used_up() {
        let now = Instant::now();
        let fresh = lease(Duration::from_secs(10), Duration::from_secs(20), now);
        assert_eq!(
            renewal(&fresh, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD),
            None
        );
        let due = lease(Duration::from_secs(16), Duration::from_secs(14), now);
        let (secs, until) =
            renewal(&due, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD).expect("due");
        assert_eq!(secs, 30);
        assert_eq!(until, now + VIS);
    }

    #[test]
    fn a_lease_being_released_or_in_custody_is_never_renewed() {
        let now = Instant::now();
        let mut releasing = lease(Duration::from_secs(29), Duration::from_secs(1), now);
        releasing.finishing = true;
        assert_eq!(
            renewal(&releasing, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD),
            None,
            "a renewal after the release would hide the message again"
        );
        let mut renewing = lease(Duration::from_secs(29), Duration::from_secs(1), now);
        renewing.renewing = true;
        assert_eq!(
            renewal(&renewing, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD),
            None,
            "one renewal at a time"
        );
        let mut held = lease(Duration::from_secs(29), Duration::from_secs(1), now);
        held.custody = Custody::Yes;
        assert_eq!(
            renewal(&held, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD),
            None
        );
    }

    #[test]
    fn renewals_never_reach_past_twelve_hours_after_receipt() {
        let now = Instant::now();
        // The last renewal ends half the custody lead (5 min) before 12 h.
        let old = lease(
            MAX_VISIBILITY - Duration::from_secs(310),
            Duration::from_secs(5),
            now,
        );
        let (secs, _) = renewal(&old, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD).expect("due");
        assert_eq!(secs, 10, "only up to 12 h less half the lead");
        let at_limit = lease(
            MAX_VISIBILITY - Duration::from_secs(290),
            Duration::from_secs(5),
            now,
        );
        let (secs, _) =
            renewal(&at_limit, VIS, TICK, now, MAX_VISIBILITY, CUSTODY_LEAD).expect("due");
        assert_eq!(secs, 0, "nothing left to renew: the limit is reached");
    }
}
