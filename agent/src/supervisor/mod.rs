//! The supervisor: job slots, admission, the life of each attempt, and the
//! ack-last rule. It takes a slot before it asks the source for work, so it
//! never holds a message it has no slot for; it finishes a message (delete,
//! release or dead-letter) only after the attempt's outcome is known and its
//! event handed off. On drain it stops intake at once, tells running jobs to
//! stop, releases what does not finish in time, and returns.
//!
//! It knows nothing of SQS or directories (`queue`), of how a process is
//! isolated (`sandbox`), or of signals and admin requests (`drain`).

mod attempt;
pub mod output;
pub mod status;
pub mod verdict;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::drain::{self, Drain};
use crate::envelope::{Keyring, VerifyPolicy};
use crate::events::{EventError, EventSink, EventType, JobEvent};
use crate::queue::{ClaimJournal, JobSource, Message, QueueError};
use crate::retry;
use crate::sandbox::process::{kill_orphaned_group, Launcher};
use crate::state::{Decided, DecidedAction, InFlight, Ledger, StateError};
use status::StatusBoard;
use verdict::Backoff;

/// SQS's limit on messages per receive; the directory source honours it too.
pub const MAX_RECEIVE_BATCH: usize = 10;
/// Longest that free slots wait for others before a busy queue is asked
/// (see `Supervisor::gather_window`): a bound on the idle time spent to
/// save API calls, small beside any job that is not trivial.
const MAX_GATHER: Duration = Duration::from_millis(250);

/// Past the drain deadline, how long the supervisor still waits for
/// attempts that did not end by themselves before it returns anyway.
const FINAL_WAIT_MARGIN: Duration = Duration::from_secs(5);

/// A receive still running this close to the drain deadline is given up:
/// what it would bring could not be given back in time anyway.
const LONG_POLL_CUTOFF: Duration = Duration::from_secs(3);

/// How long recovery at start may spend completing one message's outcome.
const RECOVERY_BUDGET: Duration = Duration::from_secs(60);

/// How long the agent tries to say it stops.
const STOP_ANNOUNCE_BUDGET: Duration = Duration::from_secs(5);

/// How long to wait before asking a failing source again, at most.
const RECEIVE_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the intake loop beats while it waits for a slot or a paused
/// intake (see `liveness`).
const BEAT_WHILE_WAITING: Duration = Duration::from_secs(5);
/// Longest the intake loop may go without a beat: a long poll (20 s), the
/// SDK's retries of it, and the longest back-off after a failed one.
const INTAKE_QUIET: Duration = Duration::from_secs(120);

/// Groups received messages into chains: the messages of one FIFO message
/// group (from one queue) in the order received, every other message alone.
/// Each chain takes as many free slots as it has messages.
fn fifo_chains(messages: Vec<Message>, free: &mut Vec<Slot>) -> Vec<(Vec<Message>, Vec<Slot>)> {
    let mut chains: Vec<Vec<Message>> = Vec::new();
    for msg in messages {
        let same_group = msg.group.as_ref().and_then(|g| {
            chains
                .iter()
                .position(|c| c[0].queue == msg.queue && c[0].group.as_ref() == Some(g))
        });
        match same_group {
            Some(i) => chains[i].push(msg),
            None => chains.push(vec![msg]),
        }
    }
    chains
        .into_iter()
        .map(|chain| {
            let take = chain.len().min(free.len());
            let slots = free.split_off(free.len() - take);
            (chain, slots)
        })
        .collect()
}

/// The job slots: a count to wait on, and which numbered slot is free.
/// A slot's number names its ledger entry (and, with the sandbox, its
/// identity and cgroup).
struct SlotPool {
    available: Arc<Semaphore>,
    free: std::sync::Mutex<Vec<usize>>,
}

/// One taken slot; dropping it makes it free again.
pub(crate) struct Slot {
    index: usize,
    pool: Arc<SlotPool>,
    _permit: OwnedSemaphorePermit,
}

impl SlotPool {
    fn new(n: usize) -> Arc<SlotPool> {
        SlotPool::numbered_from(0, n)
    }

    /// `n` places numbered `first..first + n`.
    fn numbered_from(first: usize, n: usize) -> Arc<SlotPool> {
        Arc::new(SlotPool {
            available: Arc::new(Semaphore::new(n)),
            free: std::sync::Mutex::new((first..first + n).rev().collect()),
        })
    }

    fn take(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let index = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .expect("a permit is only handed out while a slot number is free");
        Slot {
            index,
            pool: self.clone(),
            _permit: permit,
        }
    }

    pub(super) async fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.available.clone().acquire_owned().await.ok()?;
        Some(self.take(permit))
    }

    pub(super) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.available.clone().try_acquire_owned().ok()?;
        Some(self.take(permit))
    }
}

impl Slot {
    pub(crate) fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The number goes back before the permit does (fields drop after
        // this body), so a new permit always finds a free number.
        self.pool
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.index);
    }
}

/// Everything the supervisor needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub slots: usize,
    pub default_timeout: Duration,
    pub kill_grace: Duration,
    pub backoff: Backoff,
    pub work_root: PathBuf,
    /// Where job output goes: the spool (`run`) or the kept logs (`dev`).
    pub logs: crate::telemetry::logs::Spool,
    pub log_max_bytes: u64,
    /// Job counts and durations, by queue, outcome and reason.
    pub metrics: crate::telemetry::metrics::Metrics,
    /// The queues' names, by `Message::queue`, for the metrics.
    pub queue_names: Vec<String>,
    pub verify: VerifyPolicy,
    pub instance_id: crate::imds::InstanceId,
    /// Releases that are not failures a job may have before it is
    /// dead-lettered as `agent_gave_up` (`jobs.max_requeues`).
    pub max_requeues: u32,
    /// How every job is isolated; `None` runs jobs without a sandbox
    /// (`sandbox.mode = "none"`, or `dev` without root), with a warning
    /// at each.
    pub sandbox: Option<crate::sandbox::SandboxPolicy>,
}

/// The source's news about claims, written into the ledger at once; what
/// cannot be written is shown on the status board.
struct LedgerJournal {
    ledger: Arc<Ledger>,
    board: Arc<StatusBoard>,
}

impl ClaimJournal for LedgerJournal {
    fn receipt_changed(&self, message_id: &str, receipt: &str) {
        if let Err(e) = self
            .ledger
            .update_message(message_id, |e| e.receipt = receipt.to_string())
        {
            tracing::warn!(message_id, error = %e, "cannot record a message's new receipt in the in-flight ledger");
        }
    }

    fn copy_sent(&self, message_id: &str, copy_id: &str) {
        if let Err(e) = self
            .ledger
            .update_message(message_id, |e| e.copy_id = Some(copy_id.to_string()))
        {
            // Nothing can take the copy back: say so where an operator
            // looks, for as long as the agent runs.
            tracing::error!(message_id, copy_id, error = %e, "cannot record a message's copy in the in-flight ledger: if the agent dies before the original is deleted, the next start releases it too and the job may run twice");
            self.board.warn(format!(
                "the in-flight ledger could not record the copy {copy_id} of message {message_id} ({e}): a crash before its original is deleted may run the job twice; check state.dir"
            ));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("recovering jobs left by a previous run: {0}")]
    Recovery(#[from] StateError),
    #[error("recovering jobs left by a previous run: {0}")]
    RecoveryQueue(#[source] crate::queue::QueueError),
}

pub struct Supervisor<S, E> {
    source: S,
    events: E,
    keys: Keyring,
    settings: Settings,
    ledger: Arc<Ledger>,
    launcher: Launcher,
    drain: Drain,
    board: Arc<StatusBoard>,
    transfers: Option<crate::transfer::Transfers>,
    /// Ledger places of messages whose slot is free again while their
    /// outcome is handed off (numbered after the slots); at most one per
    /// slot, so a hand-off that stalls holds up intake instead of piling up.
    handoffs: Arc<SlotPool>,
    /// How long a slot typically stays busy with one message (a moving
    /// average, in microseconds; 0 until the first one ends).
    typical_busy_us: AtomicU64,
}

impl<S: JobSource, E: EventSink> Supervisor<S, E> {
    /// Lets jobs have S3 inputs and outputs (without, such jobs fail).
    pub fn with_transfers(mut self, transfers: crate::transfer::Transfers) -> Self {
        self.transfers = Some(transfers);
        self
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: S,
        events: E,
        keys: Keyring,
        settings: Settings,
        ledger: Ledger,
        launcher: Launcher,
        drain: Drain,
        board: Arc<StatusBoard>,
    ) -> Supervisor<S, E> {
        if let Some(fell) = events.expect_events(board.clone()) {
            board.on_events_fell(fell);
        }
        let settings_slots = settings.slots;
        let ledger = Arc::new(ledger);
        source.set_journal(Arc::new(LedgerJournal {
            ledger: ledger.clone(),
            board: board.clone(),
        }));
        Supervisor {
            source,
            events,
            keys,
            settings,
            ledger,
            launcher,
            drain,
            board,
            transfers: None,
            typical_busy_us: AtomicU64::new(0),
            handoffs: SlotPool::numbered_from(settings_slots, settings_slots),
        }
    }

    /// Remembers how long a slot was busy with one message.
    pub(super) fn note_busy(&self, busy: Duration) {
        let now = busy.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.typical_busy_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            now
        } else {
            old - old / 8 + now / 8
        };
        self.typical_busy_us.store(new.max(1), Ordering::Relaxed);
    }

    /// How long free slots wait for more to free up before a busy queue is
    /// asked for work: the source's minimum, stretched towards how long a
    /// slot is typically busy (up to `MAX_GATHER`). Slots that started
    /// together then free up together and share one receive, and messages
    /// received together are deleted together; a batch split in two keeps
    /// its halves apart only while they are further apart than this.
    fn gather_window(&self) -> Duration {
        let base = self.source.receive_gather();
        if base.is_zero() {
            return base;
        }
        let typical = Duration::from_micros(self.typical_busy_us.load(Ordering::Relaxed));
        typical.clamp(base, MAX_GATHER.max(base))
    }

    pub fn board(&self) -> &Arc<StatusBoard> {
        &self.board
    }

    /// Kills what a previous run left running, completes the outcomes it
    /// had decided, and gives every other message it held back to the
    /// queue. Must run before the first receive.
    pub async fn recover(&self) -> Result<usize, SupervisorError> {
        let mut entries = self.ledger.load_all()?;
        // A crash while an entry moved from a slot to a hand-off place can
        // leave it twice: the one that knows more (a copy, a decision) wins.
        entries.sort_by_key(|e| {
            (
                e.message_id.clone(),
                e.copy_id.is_none(),
                e.decided.is_none(),
            )
        });
        entries.dedup_by(|later, first| later.message_id == first.message_id);
        let mut undecided = Vec::new();
        for e in entries {
            // By its cgroup first: nothing of the job escapes that (the
            // start already swept every job cgroup; this names the entry's).
            let cgroups = (self.settings.sandbox.as_ref()).and_then(|p| p.cgroups.as_ref());
            if let (Some(name), Some(cgroups)) = (&e.cgroup, cgroups) {
                let cg = cgroups.job(name);
                match tokio::task::spawn_blocking(move || cg.remove()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        tracing::error!(cgroup = %name, error = %err, "cannot kill the cgroup of a job left by a previous run")
                    }
                    Err(err) => {
                        tracing::error!(cgroup = %name, error = %err, "killing the cgroup of a job left by a previous run failed")
                    }
                }
            }
            match (e.pid, e.start_time) {
                (Some(pid), Some(start)) => {
                    let killed =
                        tokio::task::spawn_blocking(move || kill_orphaned_group(pid, start))
                            .await
                            .unwrap_or(0);
                    if killed > 0 {
                        tracing::warn!(
                            job = e.job_id.as_deref().unwrap_or("?"),
                            pid,
                            killed,
                            "killed the processes of a job left running by a previous run of the agent"
                        );
                    }
                }
                (Some(pid), None) => tracing::error!(
                    pid,
                    "a ledger entry has a job pid without its start time; not killing the group (the pid may have been reused)"
                ),
                _ => {}
            }
            if let Some(dir) = &e.work_dir {
                if let Err(err) = attempt::remove_work_dir(dir).await {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot remove a work dir left behind");
                }
            }
            if e.copy_id.is_some() {
                // A copy already stands for the message: finishing the
                // original is all that is left; releasing it would run the
                // job twice.
                self.forget_copied(&e).await;
                continue;
            }
            match &e.decided {
                Some(decided) => self.complete_decided(&e, decided).await,
                None => undecided.push(e),
            }
        }
        let known: Vec<Message> = undecided.iter().map(InFlight::to_message).collect();
        let released = self
            .source
            .recover_claims(&known)
            .await
            .map_err(SupervisorError::RecoveryQueue)?;
        let until = tokio::time::Instant::now() + RECOVERY_BUDGET;
        for e in undecided
            .iter()
            .filter(|e| released.contains(&e.message_id))
        {
            let mut ev = JobEvent::new(
                EventType::Requeued,
                &e.message_id,
                e.attempt,
                &self.settings.instance_id.get(),
            );
            ev.job_id = e.job_id.clone();
            ev.reason = Some(
                "released after the agent restarted: the previous run ended without finishing it"
                    .into(),
            );
            self.publish_by(&ev, until).await;
        }
        self.ledger.clear_all()?;
        if !released.is_empty() {
            tracing::warn!(
                released = released.len(),
                "gave back messages claimed by a previous run of the agent (crash or kill -9); they run again"
            );
        }
        Ok(released.len())
    }

    /// Removes the original of a message whose copy a previous run sent.
    async fn forget_copied(&self, e: &InFlight) {
        let msg = e.to_message();
        let until = tokio::time::Instant::now() + RECOVERY_BUDGET;
        let done = retry::retry(
            "removing a copied message",
            until,
            QueueError::class,
            || self.source.forget_copied(&msg),
        )
        .await;
        match done {
            Ok(()) => tracing::warn!(
                message_id = %e.message_id,
                copy = e.copy_id.as_deref().unwrap_or(""),
                "removed a message whose copy a previous run of the agent had already sent; the copy runs instead"
            ),
            Err(err) => tracing::error!(
                message_id = %e.message_id, error = ?err,
                "cannot remove a message whose copy a previous run had sent; the job may run twice"
            ),
        }
    }

    /// Finishes what a previous run had decided for a message but may not
    /// have done: its event again (consumers may see it twice, never
    /// zero times), then the delete or release.
    async fn complete_decided(&self, e: &InFlight, decided: &Decided) {
        let msg = e.to_message();
        let until = tokio::time::Instant::now() + RECOVERY_BUDGET;
        self.publish_by(&decided.event, until).await;
        let done = retry::retry(
            "completing a decided outcome",
            until,
            QueueError::class,
            || async {
                match decided.action {
                    DecidedAction::Delete => self.source.delete(&msg).await,
                    DecidedAction::Release { delay_ms, failed } => {
                        self.source
                            .release(&msg, Duration::from_millis(delay_ms), failed)
                            .await
                    }
                }
            },
        )
        .await;
        match done {
            Ok(()) => tracing::warn!(
                message_id = %e.message_id,
                event = decided.event.kind.as_str(),
                "completed the outcome a previous run of the agent had decided"
            ),
            Err(err) => tracing::warn!(
                message_id = %e.message_id, error = ?err,
                "could not complete the outcome a previous run had decided (the message may be gone already)"
            ),
        }
    }

    /// Runs until a drain is requested and every attempt has finished or
    /// been released. A pause of the intake (`DrainMode::StopIntake`) only
    /// stops receiving until it is lifted or becomes a drain.
    pub async fn run(self: Arc<Self>) {
        let slots = SlotPool::new(self.settings.slots);
        let tracker = TaskTracker::new();
        let mut drain_rx = self.drain.subscribe();
        let mut receive_failures: u32 = 0;
        let mut queue_busy = false;
        // The loop beats on every turn and while it waits for a slot or a
        // paused intake (legitimate waits of any length); a receive and its
        // retry back-off are bounded well within the quiet allowed.
        let beat = crate::liveness::global().register("intake loop", INTAKE_QUIET);
        'intake: loop {
            beat.beat();
            if !self.wait_for_intake(&mut drain_rx, &beat).await {
                break;
            }
            let acquire = slots.acquire();
            tokio::pin!(acquire);
            let first = loop {
                tokio::select! {
                    biased;
                    _ = drain::intake_stopped(&mut drain_rx) => continue 'intake,
                    slot = &mut acquire => match slot {
                        Some(slot) => break slot,
                        None => break 'intake,
                    },
                    _ = tokio::time::sleep(BEAT_WHILE_WAITING) => beat.beat(),
                }
            };
            let mut free = vec![first];
            let batch = MAX_RECEIVE_BATCH.min(self.settings.slots);
            while free.len() < batch {
                match slots.try_acquire() {
                    Some(slot) => free.push(slot),
                    None => break,
                }
            }
            // While the queue is busy, a few milliseconds spent letting more
            // slots free up turn many one-message receives into one batch
            // (fewer API calls). An idle queue is asked at once.
            if queue_busy && free.len() < batch {
                let until = tokio::time::Instant::now() + self.gather_window();
                while free.len() < batch {
                    tokio::select! {
                        slot = slots.acquire() => match slot {
                            Some(slot) => free.push(slot),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(until) => break,
                        _ = drain::intake_stopped(&mut drain_rx) => continue 'intake,
                    }
                }
            }
            let asked = free.len();
            let Some(received) = self.receive_within_drain(free.len()).await else {
                break;
            };
            let messages = match received {
                Ok(m) => {
                    receive_failures = 0;
                    queue_busy = m.len() == asked;
                    m
                }
                Err(e) => {
                    receive_failures += 1;
                    let queue = e.target().map(|url| url.rsplit('/').next().unwrap_or(url));
                    self.settings.metrics.sqs_error(queue.unwrap_or(""));
                    let wait = Backoff {
                        base: Duration::from_secs(1),
                        max: RECEIVE_RETRY_MAX,
                    }
                    .delay(receive_failures, rand::random());
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot receive jobs; retrying");
                    tokio::select! {
                        _ = drain::requested(&mut drain_rx) => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            // Intake stopped while the receive was out (a drain, a pause):
            // what it brought goes straight back, never stranded.
            let stopped = self.drain.current().map(|d| d.reason);
            for (chain, chain_slots) in fifo_chains(messages, &mut free) {
                if stopped.is_some() || chain_slots.len() < chain.len() {
                    // Stopped, or (cannot happen: receive is bounded by the
                    // free slots) a message without a slot: straight back.
                    let me = self.clone();
                    let why = stopped.clone().unwrap_or_default();
                    tracker.spawn(async move {
                        for msg in &chain {
                            me.give_back(msg, &why).await;
                        }
                    });
                    continue;
                }
                let me = self.clone();
                tracker.spawn(async move { me.run_chain(chain, chain_slots).await });
            }
        }
        self.drain.timeline().mark(drain::Step::IntakeStopped);
        tracing::info!(
            running = tracker.len(),
            "intake stopped; waiting for running jobs to finish or be released"
        );
        tracker.close();
        // Every attempt watches the drain deadline itself; this bound only
        // guards against one that cannot (stuck in the kernel, say).
        let deadline = self
            .drain
            .deadline()
            .map(|d| d + FINAL_WAIT_MARGIN)
            .unwrap_or_else(|| std::time::Instant::now() + FINAL_WAIT_MARGIN);
        if tokio::time::timeout_at(deadline.into(), tracker.wait())
            .await
            .is_err()
        {
            let stuck = self.board.snapshot().running;
            tracing::error!(
                stuck = stuck.len(),
                jobs = ?stuck.iter().map(|r| r.job_id.as_str()).collect::<Vec<_>>(),
                "drain deadline passed with attempts still unfinished; the next start of the agent recovers them"
            );
            self.board.stranded();
        }
        self.drain.timeline().mark(drain::Step::JobsDone);
    }

    /// Waits while the intake is paused; false once a drain is under way.
    async fn wait_for_intake(
        &self,
        drain_rx: &mut tokio::sync::watch::Receiver<Option<drain::DrainRequest>>,
        beat: &crate::liveness::Beat,
    ) -> bool {
        let mut announced = false;
        loop {
            match drain_rx.borrow_and_update().clone() {
                None => return true,
                Some(req) if req.is_drain() => return false,
                Some(req) => {
                    if !announced {
                        tracing::warn!(reason = %req.reason, "intake paused: running jobs go on, no new ones are taken");
                        announced = true;
                    }
                }
            }
            tokio::select! {
                changed = drain_rx.changed() => if changed.is_err() {
                    return false;
                },
                _ = tokio::time::sleep(BEAT_WHILE_WAITING) => beat.beat(),
            }
        }
    }

    /// Receives. A receive under way is not abandoned when intake stops:
    /// SQS may already have handed it messages, which would stay hidden
    /// (stranded) until their visibility timeout; it is awaited and what
    /// it brings is given back at once. Only a drain deadline too close to
    /// give anything back cuts it off (`LONG_POLL_CUTOFF`).
    async fn receive_within_drain(&self, max: usize) -> Option<Result<Vec<Message>, QueueError>> {
        let mut drain_rx = self.drain.subscribe();
        let receive = self.source.receive(max);
        tokio::pin!(receive);
        loop {
            let cut_off = self
                .drain
                .deadline()
                .map(|d| d.checked_sub(LONG_POLL_CUTOFF).unwrap_or(d));
            let until = cut_off.unwrap_or_else(drain::far_future).into();
            tokio::select! {
                r = &mut receive => return Some(r),
                _ = tokio::time::sleep_until(until) => {
                    tracing::warn!("a receive was still under way at the drain deadline; what it brings returns after its visibility timeout");
                    return None;
                }
                // The deadline may appear or move earlier.
                changed = drain_rx.changed() => if changed.is_err() {
                    return Some(receive.await);
                },
            }
        }
    }

    /// Runs messages that must not overlap (one FIFO message group) one
    /// after the other, each in its own slot; a message that does not end
    /// for good stops the chain and the rest go back unstarted, so the
    /// group's order holds. Ordinary messages are chains of one.
    async fn run_chain(self: Arc<Self>, chain: Vec<Message>, slots: Vec<Slot>) {
        for (msg, slot) in chain.iter().skip(1).zip(slots.iter().skip(1)) {
            // Waiting members are claimed too: the ledger must know them.
            if let Err(e) = self
                .ledger
                .record(slot.index(), &InFlight::for_message(msg))
            {
                tracing::warn!(message_id = %msg.id, error = %e, "cannot record a waiting message in the ledger");
            }
        }
        // A message alone frees its slot as soon as its outcome is decided
        // (the hand-off goes on without it); a FIFO group's next message
        // starts only once the one before is finished for good.
        let pipelined = chain.len() == 1 && chain[0].group.is_none();
        let mut members = chain.into_iter().zip(slots);
        while let Some((msg, slot)) = members.next() {
            let group = msg.group.clone();
            let done = self.clone().handle_message(msg, slot, pipelined).await;
            if done {
                continue;
            }
            for (rest, rest_slot) in members.by_ref() {
                self.give_back(
                    &rest,
                    "an earlier message of its FIFO group was not finished",
                )
                .await;
                let _ = self.ledger.forget(rest_slot.index());
            }
            if let Some(g) = group {
                tracing::info!(group = %g, "FIFO group paused until its earlier message runs again");
            }
        }
    }

    /// Publishes `agent.stopped`, briefly: the agent is on its way out.
    pub async fn announce_stop(&self, ev: &crate::events::AgentEvent) {
        let mut until = tokio::time::Instant::now() + STOP_ANNOUNCE_BUDGET;
        if let Some(d) = self.drain.deadline() {
            // Never past the drain deadline: exiting in time comes first.
            until = until.min(d.into());
        }
        if let Err(e) = retry::retry("publishing agent.stopped", until, EventError::class, || {
            self.events.publish_agent(ev)
        })
        .await
        {
            tracing::warn!(error = ?e, "cannot publish agent.stopped");
        }
    }

    /// Releases a message that was received but will not be started.
    async fn give_back(&self, msg: &Message, why: &str) {
        tracing::info!(message_id = %msg.id, why, "giving back a message that will not be started");
        self.release_or_abandon(msg, Duration::ZERO, false).await;
    }

    /// Hands an event to the sink, retrying transient errors by the one
    /// policy until `until` (or the drain deadline); returns whether it was
    /// handed off. Every event is also shown in the agent's own log.
    async fn publish_by(&self, ev: &JobEvent, until: tokio::time::Instant) -> bool {
        self.board.count(ev.kind);
        show_event(ev);
        let until = match self.drain.deadline() {
            Some(d) => until.min(d.into()),
            None => until,
        };
        let handed_off = match retry::retry("publishing an event", until, EventError::class, || {
            self.events.publish(ev)
        })
        .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = ?e, event = ev.kind.as_str(), message_id = %ev.message_id, "cannot publish job event");
                false
            }
        };
        handed_off
    }
}

/// One human-readable line per event on the agent's own log (the terminal
/// in `dev`), with the event's members as fields for `--log-format json`.
fn show_event(ev: &JobEvent) {
    let what = ev.kind.as_str().trim_start_matches("job.");
    let mut line = match &ev.job_id {
        Some(job) => format!("{what:<11} {job} (attempt {})", ev.attempt),
        None => format!("{what:<11} message {}", ev.message_id),
    };
    if let Some(ms) = ev.duration_ms {
        line.push_str(&format!(" after {:.2}s", ms as f64 / 1000.0));
    }
    if let Some(r) = &ev.reason {
        line.push_str(": ");
        line.push_str(r);
    }
    let fields = (
        ev.kind.as_str(),
        ev.message_id.as_str(),
        ev.log_stream.as_deref().unwrap_or(""),
    );
    match ev.kind {
        EventType::Failed | EventType::TimedOut | EventType::Rejected => {
            tracing::warn!(
                event = fields.0,
                message_id = fields.1,
                log_stream = fields.2,
                is_final = ev.is_final,
                "{line}"
            )
        }
        _ => {
            tracing::info!(
                event = fields.0,
                message_id = fields.1,
                log_stream = fields.2,
                is_final = ev.is_final,
                "{line}"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Alg, SigningKey};
    use crate::events::JsonlFile;
    use crate::queue::dir::{self, DirQueue};
    use std::path::Path;

    fn supervisor(root: &Path, state: &Path, events: &Path) -> Supervisor<DirQueue, JsonlFile> {
        let key = SigningKey::generate(Alg::Ed25519, "t").expect("key");
        let keys = Keyring::from_toml(&key.verification_entry_toml(), Path::new("keys.toml"))
            .expect("keyring");
        let settings = Settings {
            slots: 2,
            default_timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(1),
            backoff: Backoff {
                base: Duration::ZERO,
                max: Duration::ZERO,
            },
            work_root: state.join("work"),
            logs: crate::telemetry::logs::Spool::open(crate::telemetry::logs::SpoolSettings {
                dir: state.join("logs"),
                max_bytes: 1 << 30,
                ship: false,
            })
            .expect("spool"),
            log_max_bytes: 1024,
            metrics: crate::telemetry::metrics::Metrics::new(
                crate::telemetry::metrics::MetricsSettings {
                    namespace: "Test".into(),
                    interval: Duration::from_secs(60),
                    instance_dimension: false,
                    tag_dimensions: Vec::new(),
                    group: None,
                    instance_id: "i-test".into(),
                    disk_path: state.to_path_buf(),
                },
            ),
            queue_names: vec!["dev".into()],
            verify: VerifyPolicy::default(),
            instance_id: crate::imds::InstanceId::fixed("i-test"),
            max_requeues: 20,
            sandbox: None,
        };
        let drain = Drain::new();
        let board = Arc::new(StatusBoard::new("test", "dir".into(), 2, drain.clone()));
        Supervisor::new(
            DirQueue::open(root).expect("open queue"),
            JsonlFile::open(events).expect("events"),
            keys,
            settings,
            Ledger::open(state).expect("ledger"),
            Launcher::default(),
            drain,
            board,
        )
    }

    /// Claims the only message under `root` and records it in slot 0 the
    /// way a run that then crashed would have.
    async fn crash_holding(root: &Path, state: &Path, decided: Option<DecidedAction>) -> String {
        let q = DirQueue::open(root).expect("open queue");
        let m = q.receive(1).await.expect("receive").remove(0);
        let mut entry = InFlight::for_message(&m);
        entry.job_id = Some("job-1".into());
        entry.decided = decided.map(|action| {
            let mut ev = JobEvent::new(EventType::Succeeded, &m.id, 1, "i-old");
            ev.job_id = Some("job-1".into());
            ev.is_final = true;
            Decided { event: ev, action }
        });
        Ledger::open(state)
            .expect("ledger")
            .record(0, &entry)
            .expect("record");
        m.id
    }

    fn event_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("event line"))
            .collect()
    }

    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    #[tokio::test]
    async fn an_outcome_decided_before_a_crash_is_completed_at_restart_not_run_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (root, state, events) = (
            tmp.path().join("q"),
            tmp.path().join("s"),
            tmp.path().join("ev"),
        );
        dir::enqueue(&root, b"body").expect("enqueue");
        let id = crash_holding(&root, &state, Some(DecidedAction::Delete)).await;

        let sup = supervisor(&root, &state, &events);
        assert_eq!(
            sup.recover().await.expect("recover"),
            0,
            "nothing to run again"
        );
        assert_eq!(count(&root.join("claimed")), 0);
        assert_eq!(count(&root.join("queue")), 0, "the decided delete was done");
        let lines = event_lines(&events);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["type"], "job.succeeded");
        assert_eq!(lines[0]["message_id"], id.as_str());
        assert_eq!(lines[0]["final"], true);
        assert!(Ledger::open(&state)
            .expect("ledger")
            .load_all()
            .expect("load")
            .is_empty());
    }

    #[tokio::test]
    async fn an_undecided_message_of_a_crashed_run_is_released_with_a_requeued_event() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (root, state, events) = (
            tmp.path().join("q"),
            tmp.path().join("s"),
            tmp.path().join("ev"),
        );
        dir::enqueue(&root, b"body").expect("enqueue");
        let id = crash_holding(&root, &state, None).await;

        let sup = supervisor(&root, &state, &events);
        assert_eq!(sup.recover().await.expect("recover"), 1);
        assert_eq!(count(&root.join("claimed")), 0);
        assert_eq!(count(&root.join("queue")), 1, "released to run again");
        let lines = event_lines(&events);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["type"], "job.requeued");
        assert_eq!(lines[0]["job_id"], "job-1");
        assert_eq!(lines[0]["message_id"], id.as_str());
    }

    #[tokio::test]
    async fn a_message_already_gone_gets_no_requeued_event() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (root, state, events) = (
            tmp.path().join("q"),
            tmp.path().join("s"),
            tmp.path().join("ev"),
        );
        dir::enqueue(&root, b"body").expect("enqueue");
        crash_holding(&root, &state, None).await;
        // Deleted, then the crash came before the ledger was emptied.
        for e in std::fs::read_dir(root.join("claimed")).expect("ls") {
            std::fs::remove_file(e.expect("entry").path()).expect("rm");
        }
        let sup = supervisor(&root, &state, &events);
        assert_eq!(sup.recover().await.expect("recover"), 0);
        assert!(event_lines(&events).is_empty(), "no false requeued event");
    }
}
