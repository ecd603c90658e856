//! The life of one received message: verify, prepare, launch, watch (timeout,
//! drain), capture output, decide, publish, and only then finish the message.
//! Each step that can fail has a defined outcome; none of them loses the
//! message.
//!
//! Every wait answers to a deadline: until the job ends, the attempt's own
//! (its start plus the job's timeout), armed before the first network call;
//! after it, a budget for handing the outcome off; and always the drain's.
//! A call that cannot finish in time is abandoned, never waited out.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;

use super::output;
use super::status::Running;
use super::verdict::{self, Action, Ending};
use super::{Slot, Supervisor};
use crate::drain;
use crate::envelope::{self, Envelope};
use crate::events::{EventSink, EventType, JobEvent};
use crate::queue::{JobSource, Message, QueueError};
use crate::retry::{self, ErrorClass, GaveUp};
use crate::sandbox::cgroup::{job_name, JobCgroup, Usage};
use crate::sandbox::process::JobProcess;
use crate::sandbox::{scrubbed_env, LaunchPlan};
use crate::state::{Decided, DecidedAction, InFlight};

/// How a decided action is written in the ledger.
pub(super) fn decided_action(action: Action) -> DecidedAction {
    match action {
        Action::Delete => DecidedAction::Delete,
        Action::Release { delay, failed } => DecidedAction::Release {
            delay_ms: delay.as_millis() as u64,
            failed,
        },
    }
}

/// Time kept back before a drain deadline to release messages and exit.
const RELEASE_RESERVE: Duration = Duration::from_secs(2);
/// How long handing off one attempt's outcome (event, delete or release)
/// may take when no drain bounds it; past it the message is abandoned (it
/// becomes visible again by itself) so the slot is not held forever.
const FINISH_BUDGET: Duration = Duration::from_secs(15 * 60);
/// Time kept before a drain deadline for deletes and releases: events
/// stop being retried then.
const ACK_RESERVE: Duration = Duration::from_secs(1);
/// The dead-letter reason of a job released too often without a failure.
pub const AGENT_GAVE_UP: &str = "agent_gave_up";

/// Why a bounded wait was cut short.
enum Cut {
    /// The attempt's deadline (its timeout) came.
    Deadline,
    /// A drain was requested (its reason).
    Drain(String),
}

/// How long to wait for a job's output pipes to close after its group was
/// killed (a process that escaped the group may still hold them).
const OUTPUT_DRAIN_WAIT: Duration = Duration::from_secs(2);
/// How long ending a job's log stream (its last write and sync to disk)
/// may take before the job's output counts as not handed off.
const HANDOFF_WAIT: Duration = Duration::from_secs(30);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What one attempt works with.
struct Attempt<'a> {
    msg: &'a Message,
    env: &'a Envelope,
    slot: usize,
    work_dir: &'a PathBuf,
    log_stream: &'a str,
    timeout: Duration,
    /// When the attempt's time is up (its start plus the timeout).
    deadline: tokio::time::Instant,
    started_event: &'a JobEvent,
    /// What the job's cgroup used, set when the job has ended.
    usage: &'a std::sync::Mutex<Option<Usage>>,
}

/// A job cgroup removed (in the background, bounded) if the attempt ends
/// before it is removed on purpose.
struct CgroupGuard(Option<JobCgroup>);

impl CgroupGuard {
    /// Kills what is left in it and removes it, off the runtime's threads.
    async fn remove(&mut self) {
        let Some(cg) = self.0.take() else {
            return;
        };
        let name = cg.name().to_string();
        match tokio::task::spawn_blocking(move || cg.remove()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(cgroup = %name, error = %e, "cannot remove a job's cgroup")
            }
            Err(e) => {
                tracing::warn!(cgroup = %name, error = %e, "the removal of a job's cgroup failed")
            }
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let (Some(cg), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn_blocking(move || {
                if let Err(e) = cg.remove() {
                    tracing::warn!(cgroup = %cg.name(), error = %e, "cannot remove a job's cgroup");
                }
            });
        }
    }
}

/// How the watched process ended, before it is judged.
enum Watched {
    /// Cancelled by an operator (`true`: requeue it).
    Cancelled(bool),
    Exited(ExitStatus),
    TimedOut(ExitStatus),
    Interrupted(String, ExitStatus),
}

impl<S: JobSource, E: EventSink> Supervisor<S, E> {
    /// Runs one message to its end; true when the message is gone from the
    /// queue for good (done, failed for good, dead-lettered), false when it
    /// was released to run again (or could not be finished).
    pub(super) async fn handle_message(
        self: Arc<Self>,
        msg: Message,
        slot: Slot,
        pipelined: bool,
    ) -> bool {
        let began = Instant::now();
        if msg.body.len() > crate::queue::MAX_BODY_BYTES {
            let rejection = envelope::Rejection {
                reason: envelope::RejectReason::Malformed,
                detail: format!(
                    "message body is larger than {} bytes",
                    crate::queue::MAX_BODY_BYTES
                ),
                job_id: None,
            };
            let done = self.reject(msg, rejection).await;
            self.note_busy(began.elapsed());
            return done;
        }
        match envelope::verify(&msg.body, &self.keys, &self.settings.verify, unix_now()) {
            Ok(env) => self.run_job(msg, env, slot, pipelined, began).await,
            Err(rejection) => {
                let done = self.reject(msg, rejection).await;
                self.note_busy(began.elapsed());
                done
            }
        }
    }

    /// A message that fails verification is never run: it goes to the
    /// dead-letter place with its reason, then the event says so.
    async fn reject(&self, msg: Message, rejection: envelope::Rejection) -> bool {
        self.source.note_decided(&msg);
        let reason = rejection.reason.as_str();
        let mut ev = self.event(EventType::Rejected, &msg);
        ev.job_id = rejection.job_id.clone();
        ev.reason = Some(reason.to_string());
        ev.detail = Some(rejection.detail.clone());
        ev.is_final = true;
        self.count_ended(
            &msg,
            EventType::Rejected,
            crate::telemetry::metrics::Reason::Rejected(rejection.reason),
            None,
            &std::collections::BTreeMap::new(),
        );
        self.dead_letter_with_event(&msg, ev).await
    }

    /// Tells the metrics how an attempt ended.
    fn count_ended(
        &self,
        msg: &Message,
        outcome: EventType,
        reason: crate::telemetry::metrics::Reason,
        duration: Option<Duration>,
        tags: &std::collections::BTreeMap<String, String>,
    ) {
        // From the first send to this attempt's end, less its run: the
        // wait before it started.
        let queue_wait = msg.sent_at.and_then(|sent| {
            let waited = std::time::SystemTime::now().duration_since(sent).ok()?;
            Some(waited.saturating_sub(duration?))
        });
        let queue = self
            .settings
            .queue_names
            .get(msg.queue)
            .map_or("", String::as_str);
        self.settings
            .metrics
            .job_ended(&crate::telemetry::metrics::JobEnded {
                queue,
                outcome,
                reason,
                duration,
                queue_wait,
                tags,
            });
    }

    /// Copies the message to the dead-letter place (with the event's reason
    /// and detail), then publishes the event: the dead-letter copy is the
    /// durable record, so the event is best effort. If the copy cannot be
    /// made, the message is released to try again later.
    async fn dead_letter_with_event(&self, msg: &Message, ev: JobEvent) -> bool {
        let reason = ev.reason.clone().unwrap_or_default();
        let detail = ev.detail.clone().unwrap_or_default();
        let until = self.finish_deadline();
        let publish_until = self.publish_deadline();
        let done = retry::retry("dead-letter", until, QueueError::class, || {
            self.source.dead_letter(msg, &reason, &detail)
        })
        .await;
        match done {
            Ok(()) => {}
            Err(e) if e.class() == ErrorClass::Gone => {
                self.lost_claim(msg, "dead-lettering it");
                return false;
            }
            Err(e) => {
                tracing::error!(message_id = %msg.id, error = ?e, "cannot dead-letter a message; releasing it to try again later");
                let delay = self
                    .settings
                    .backoff
                    .delay(msg.receive_count, rand::random());
                self.release_or_abandon(msg, delay, false).await;
                return false;
            }
        }
        self.publish_by(&ev, publish_until).await;
        true
    }

    fn event(&self, kind: EventType, msg: &Message) -> JobEvent {
        JobEvent::new(kind, &msg.id, msg.attempt, &self.settings.instance_id.get())
    }

    async fn run_job(
        &self,
        msg: Message,
        env: Envelope,
        seat: Slot,
        pipelined: bool,
        began: Instant,
    ) -> bool {
        let slot = seat.index();
        let job = &env.job;
        let log_stream = format!("{}.{}.{}", job.id, msg.id, msg.receive_count);
        let work_dir = self
            .settings
            .work_root
            .join(format!("{}.{}", job.id, msg.id));
        let timeout = job.timeout.unwrap_or(self.settings.default_timeout);
        let mut entry = InFlight::for_message(&msg);
        entry.job_id = Some(job.id.clone());
        entry.work_dir = Some(work_dir.clone());
        // Armed before anything else (before any network call): inputs,
        // the start event and the job itself all answer to it.
        let deadline = tokio::time::Instant::now() + timeout;

        let template = {
            let mut ev = self.event(EventType::Started, &msg);
            ev.job_id = Some(job.id.clone());
            ev.log_stream = Some(log_stream.clone());
            ev.tags = job.tags.clone();
            ev
        };
        let started = Instant::now();
        self.board.set_running(Running {
            job_id: job.id.clone(),
            message_id: msg.id.clone(),
            attempt: msg.attempt,
            pid: None,
            since: started,
            timeout,
            log_stream: log_stream.clone(),
            start_queued: false,
            outcome_queued: false,
        });

        // Recorded before anything else happens to the job, so a crash at any
        // later step lets the next start give the message back at once.
        let usage = std::sync::Mutex::new(None);
        let ending = match self.ledger.record(slot, &entry) {
            Err(e) => Ending::AgentFault(e.to_string()),
            Ok(()) => {
                let attempt = Attempt {
                    msg: &msg,
                    env: &env,
                    slot,
                    work_dir: &work_dir,
                    log_stream: &log_stream,
                    timeout,
                    deadline,
                    started_event: &template,
                    usage: &usage,
                };
                self.attempt(attempt).await
            }
        };

        // Failures back off by attempt; agent-side trouble by how often the
        // message has been tried at all.
        let backoff_step = match ending {
            Ending::AgentFault(_) => msg.receive_count,
            _ => msg.attempt,
        };
        let delay = self.settings.backoff.delay(backoff_step, rand::random());
        let verdict = verdict::decide(&ending, msg.attempt, job.max_attempts, delay);
        let requeues = msg.receive_count.saturating_sub(msg.attempt);
        let mut ev = template;
        ev.kind = verdict.kind;
        // The id as known now: one learned while the job ran is in its end.
        ev.instance_id = self.settings.instance_id.get();
        ev.at = crate::events::rfc3339_now();
        ev.duration_ms = Some(started.elapsed().as_millis() as u64);
        ev.reason = verdict.reason.clone();
        ev.is_final = verdict.is_final;
        self.count_ended(
            &msg,
            verdict.kind,
            crate::telemetry::metrics::Reason::of_ending(&ending),
            Some(started.elapsed()),
            &job.tags,
        );
        if let Some(used) = usage.lock().ok().and_then(|u| *u) {
            ev.cpu_ms = used.cpu.map(|d| d.as_millis() as u64);
            ev.memory_peak_bytes = used.memory_peak_bytes;
        }
        match &ending {
            Ending::OutOfMemory { code, signal } => {
                ev.exit_code = *code;
                ev.signal = signal.map(verdict::signal_name);
            }
            Ending::Exited(code) => ev.exit_code = Some(*code),
            Ending::Signaled(sig) => ev.signal = Some(verdict::signal_name(*sig)),
            Ending::TimedOut { signal, .. } => ev.signal = signal.map(verdict::signal_name),
            Ending::Interrupted { code, signal, .. } => {
                ev.exit_code = *code;
                ev.signal = signal.map(verdict::signal_name);
            }
            _ => {}
        }
        // Cleaned up before the outcome is published: whoever reacts to the
        // event finds the job completely gone. Off the runtime's threads: a
        // job may leave a very large tree behind.
        if let Err(e) = remove_work_dir(&work_dir).await {
            tracing::warn!(dir = %work_dir.display(), error = %e, "cannot remove work dir");
        }
        // The outcome is decided: a message alone hands its slot to the next
        // job now and is finished from a hand-off place in the ledger (the
        // lease stays until the delete or release is done).
        self.source.note_decided(&msg);
        let (place, _seat) = if pipelined {
            self.hand_off(&msg, seat)
        } else {
            (slot, seat)
        };
        self.note_busy(began.elapsed());
        let deleted = self.finish(&msg, place, ev, verdict.action, requeues).await;
        self.board.finished(&msg.id);
        deleted
    }

    /// Moves a decided message's ledger entry from its slot to a hand-off
    /// place and frees the slot; returns the place and what holds it.
    /// Recorded at the new place before it is forgotten at the old one, so
    /// a crash in between leaves the entry twice (recovery takes it once),
    /// never not at all. With every place taken the message is finished
    /// from its slot: waiting for a place would wait on the very batches
    /// (deletes, events) that count this message as about to join them.
    fn hand_off(&self, msg: &Message, seat: Slot) -> (usize, Slot) {
        let Some(place) = self.handoffs.try_acquire() else {
            return (seat.index(), seat);
        };
        let moved = self
            .ledger
            .get(seat.index())
            .ok_or_else(|| "no entry".to_string())
            .and_then(|entry| {
                self.ledger
                    .record(place.index(), &entry)
                    .map_err(|e| e.to_string())
            });
        match moved {
            Ok(()) => {
                self.forget_slot(seat.index(), msg);
                (place.index(), place)
            }
            Err(e) => {
                tracing::warn!(message_id = %msg.id, error = %e, "cannot move a finished job's ledger entry; finishing it from its slot");
                (seat.index(), seat)
            }
        }
    }

    /// Records the decision, publishes the outcome, then acts on the
    /// message: ack last. Publishing has `FINISH_BUDGET` (and the drain's
    /// deadline); the delete or release is retried by the one retry policy
    /// within the same bounds, while the slot is held. A message whose
    /// receipt SQS no longer accepts is not ours any more: logged, counted,
    /// never retried. If the drain deadline passes first, the ledger keeps
    /// the decision for the next start to complete. A release that is not
    /// a failure, past `max_requeues` of them, dead-letters the message
    /// (`agent_gave_up`) instead of looping. Returns true when the message
    /// is gone for good.
    pub(super) async fn finish(
        &self,
        msg: &Message,
        slot: usize,
        ev: JobEvent,
        action: Action,
        requeues: u32,
    ) -> bool {
        let until = self.finish_deadline();
        let publish_until = self.publish_deadline();
        let mut action = action;
        let decided = Decided {
            event: ev.clone(),
            action: decided_action(action),
        };
        if let Err(e) = self.ledger.update(slot, |e| e.decided = Some(decided)) {
            tracing::warn!(message_id = %msg.id, error = %e, "cannot record the outcome in the in-flight ledger");
        }
        let gives_up = |action: Action| {
            matches!(action, Action::Release { failed: false, .. })
                && requeues >= self.settings.max_requeues
        };
        if !gives_up(action) {
            let handed_off = self.publish_by(&ev, publish_until).await;
            if !handed_off && action == Action::Delete {
                // Deleting now would lose the only record of the outcome;
                // run the job again later instead (at-least-once).
                action = Action::Release {
                    delay: self
                        .settings
                        .backoff
                        .delay(msg.receive_count, rand::random()),
                    failed: false,
                };
            }
        }
        if gives_up(action) {
            let done = self.give_up(msg, &ev, requeues).await;
            self.forget_slot(slot, msg);
            return done;
        }
        let done = retry::retry("finishing a message", until, QueueError::class, || async {
            match action {
                Action::Delete => self.source.delete(msg).await,
                Action::Release { delay, failed } => self.source.release(msg, delay, failed).await,
            }
        })
        .await;
        match done {
            Ok(()) => {}
            Err(e) if e.class() == ErrorClass::Gone => self.lost_claim(msg, "finishing it"),
            Err(GaveUp::Deadline(e)) if self.drain_deadline_passed() => {
                tracing::error!(
                    message_id = %msg.id, error = ?e,
                    "cannot finish message before the drain deadline; the next start of the agent completes it"
                );
                self.board.stranded();
                return false;
            }
            Err(e) => {
                self.source.abandon(msg);
                tracing::error!(message_id = %msg.id, error = ?e, "cannot finish message; given up (it becomes visible again when its visibility timeout ends and runs again)");
            }
        }
        self.forget_slot(slot, msg);
        action == Action::Delete
    }

    /// Dead-letters a message released too often without a counted failure
    /// (reason `agent_gave_up`), so a job whose outcome can never be handed
    /// off does not run forever.
    async fn give_up(&self, msg: &Message, ev: &JobEvent, requeues: u32) -> bool {
        let mut gave_up = ev.clone();
        gave_up.kind = EventType::Failed;
        gave_up.is_final = true;
        gave_up.reason = Some(AGENT_GAVE_UP.to_string());
        gave_up.detail = Some(format!(
            "released {requeues} time(s) without a failed attempt (jobs.max_requeues = {}); last outcome: {}{}",
            self.settings.max_requeues,
            ev.kind.as_str(),
            ev.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
        ));
        tracing::error!(message_id = %msg.id, requeues, "a job was released too often without a failed attempt; dead-lettering it as agent_gave_up");
        self.count_ended(
            msg,
            EventType::Failed,
            crate::telemetry::metrics::Reason::AgentGaveUp,
            None,
            &ev.tags,
        );
        self.dead_letter_with_event(msg, gave_up).await
    }

    /// A receipt SQS no longer accepts: the message is someone else's now.
    fn lost_claim(&self, msg: &Message, doing: &str) {
        self.source.abandon(msg);
        self.board.not_ours();
        tracing::warn!(
            message_id = %msg.id,
            "the message was no longer ours when {doing}: its visibility lapsed (the agent could not renew it in time) \
             and SQS may have handed it to another worker; not retried"
        );
    }

    fn forget_slot(&self, slot: usize, msg: &Message) {
        if let Err(e) = self.ledger.forget(slot) {
            tracing::warn!(message_id = %msg.id, error = %e, "cannot update the in-flight ledger");
        }
    }

    /// Releases a message, or (if even that fails) stops keeping it: it
    /// comes back by itself when its visibility ends.
    pub(super) async fn release_or_abandon(&self, msg: &Message, delay: Duration, failed: bool) {
        let until = self.finish_deadline();
        let done = retry::retry("releasing a message", until, QueueError::class, || {
            self.source.release(msg, delay, failed)
        })
        .await;
        match done {
            Ok(()) => {}
            Err(e) if e.class() == ErrorClass::Gone => self.lost_claim(msg, "releasing it"),
            Err(e) => {
                self.source.abandon(msg);
                tracing::error!(message_id = %msg.id, error = ?e, "cannot release message; it returns when its claim expires or at the next start");
            }
        }
    }

    /// Until when handing an outcome off may take: `FINISH_BUDGET` from
    /// now, or the drain deadline less the time kept to exit.
    pub(super) fn finish_deadline(&self) -> tokio::time::Instant {
        self.hand_off_deadline(Duration::ZERO)
    }

    /// Until when publishing an outcome may take: like `finish_deadline`,
    /// but `ACK_RESERVE` before a drain deadline, so a hung events endpoint
    /// never eats the time the release needs.
    fn publish_deadline(&self) -> tokio::time::Instant {
        self.hand_off_deadline(ACK_RESERVE)
    }

    /// `FINISH_BUDGET` from now, or `reserve` before the drain deadline.
    fn hand_off_deadline(&self, reserve: Duration) -> tokio::time::Instant {
        let budget = tokio::time::Instant::now() + FINISH_BUDGET;
        match self.drain.deadline() {
            Some(d) => budget.min(d.checked_sub(reserve).unwrap_or(d).into()),
            None => budget,
        }
    }

    fn drain_deadline_passed(&self) -> bool {
        self.drain.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Runs `work` unless the attempt's deadline (if any) or a drain comes
    /// first.
    async fn bounded<T>(
        &self,
        deadline: Option<tokio::time::Instant>,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, Cut> {
        let mut drain_rx = self.drain.subscribe();
        let until = deadline.unwrap_or_else(|| drain::far_future().into());
        tokio::select! {
            out = work => Ok(out),
            _ = tokio::time::sleep_until(until) => Err(Cut::Deadline),
            req = drain::requested(&mut drain_rx) => Err(Cut::Drain(req.reason)),
        }
    }

    /// Prepares, launches and watches one attempt.
    async fn attempt(&self, a: Attempt<'_>) -> Ending {
        let Attempt {
            msg,
            env,
            slot,
            work_dir,
            log_stream,
            timeout,
            deadline,
            started_event,
            usage,
        } = a;
        let cut_ending = |cut: Cut| match cut {
            Cut::Deadline => Ending::TimedOut {
                after: timeout,
                signal: None,
            },
            Cut::Drain(drain_reason) => Ending::Interrupted {
                drain_reason,
                code: None,
                signal: None,
            },
        };
        let job = &env.job;
        let uses_s3 = !job.inputs.is_empty() || !job.outputs.is_empty();
        if uses_s3 && self.transfers.is_none() {
            return Ending::JobFault(
                "inputs and outputs need S3, which this agent does not use (`dev` runs without AWS)"
                    .into(),
            );
        }
        // Before anything is downloaded: a host that cannot keep the
        // metadata from an egress job refuses it at once.
        if let (Some(policy), crate::envelope::Network::Egress) =
            (&self.settings.sandbox, job.network)
        {
            if let Err(why) = policy.egress_ready().await {
                return Ending::AgentFault(why);
            }
        }
        if let Err(e) = prepare_work_dir(work_dir) {
            return Ending::AgentFault(format!("creating work dir {}: {e}", work_dir.display()));
        }
        if let (Some(transfers), false) = (&self.transfers, job.inputs.is_empty()) {
            match self
                .bounded(
                    Some(deadline),
                    transfers.download_inputs(&job.inputs, work_dir),
                )
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return transfer_ending(e),
                Err(cut) => return cut_ending(cut),
            }
        }
        let isolation = match &self.settings.sandbox {
            Some(policy) => {
                let egress = job.network == crate::envelope::Network::Egress;
                let Some(isolation) = policy.isolation(slot, &job.id, egress) else {
                    return Ending::AgentFault(format!(
                        "sandbox.uid_range has no uid for job slot {slot}"
                    ));
                };

                // Nothing was downloaded into the fresh dir: giving it is one
                // call, with no listing.
                let given = if job.inputs.is_empty() {
                    std::os::unix::fs::lchown(work_dir, Some(isolation.uid), Some(isolation.gid))
                } else {
                    crate::sandbox::give_tree(work_dir, isolation.uid, isolation.gid)
                };
                if let Err(e) = given {
                    return Ending::AgentFault(format!(
                        "giving work dir {} to uid {}: {e}",
                        work_dir.display(),
                        isolation.uid
                    ));
                }
                Some(isolation)
            }
            None => {
                tracing::warn!(job_id = %job.id, "running without the sandbox: the job has the agent's privileges");
                None
            }
        };
        let namespaces = isolation
            .as_ref()
            .map(crate::sandbox::Isolation::namespaces)
            .unwrap_or_default();
        // The job's deadline where it can read it; written after the work
        // dir is the job's, so the file stays the agent's.
        let deadline_at =
            SystemTime::now() + deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Err(e) = crate::sandbox::create_deadline_file(work_dir, deadline_at) {
            return Ending::AgentFault(e.to_string());
        }
        // The stream's file is made on its first line.
        let log = self
            .settings
            .logs
            .stream(log_stream, self.settings.log_max_bytes);
        if let Some(req) = self.drain.draining() {
            // Received just before the drain began: do not start it at all.
            return Ending::Interrupted {
                drain_reason: req.reason,
                code: None,
                signal: None,
            };
        }
        // Under an init (any sandbox) its exit kills the job's whole pid
        // namespace.
        let under_init = isolation.is_some();
        let plan = LaunchPlan {
            argv: job.command.clone(),
            env: scrubbed_env(work_dir, &job.id, msg.attempt, &job.env),
            work_dir: work_dir.clone(),
            isolation,
        };
        let spawned = match self.launcher.spawn(namespaces).await {
            Ok(s) => s,
            Err(e) => return Ending::AgentFault(e.to_string()),
        };
        // The pid is recorded before the job can run any code: a crash from
        // here on leaves an entry that points at the job's process group.
        let (pid, start_time) = (spawned.pid(), spawned.start_time());
        if let Err(e) = self.ledger.update(slot, |e| {
            e.pid = Some(pid);
            e.start_time = Some(start_time);
        }) {
            return Ending::AgentFault(e.to_string());
        }
        // The init waits for its plan: put in its cgroup now, everything the
        // job forks is in it from the start.
        let mut cgroup = CgroupGuard(None);
        let cgroups = (self.settings.sandbox.as_ref())
            .and_then(|policy| Some((policy, policy.cgroups.as_ref()?)));
        if let (Some((policy, cgroups)), true) = (cgroups, plan.isolation.is_some()) {
            let name = job_name(&policy.cgroup_scope, slot, pid);
            let made = cgroups.create(&name, &policy.limits(&job.resources));
            match made {
                Ok(cg) => {
                    let cg = cgroup.0.insert(cg);
                    if let Err(e) = cg.add(pid) {
                        cgroup.remove().await;
                        return Ending::AgentFault(format!("putting the job into its cgroup: {e}"));
                    }
                }
                Err(e) => return Ending::AgentFault(format!("making the job's cgroup: {e}")),
            }
            if let Err(e) = self.ledger.update(slot, |e| e.cgroup = Some(name.clone())) {
                cgroup.remove().await;
                return Ending::AgentFault(e.to_string());
            }
        }
        let mut proc = match spawned.start(&plan).await {
            Ok(p) => p,
            Err(e) if e.is_job_fault() => return Ending::JobFault(e.to_string()),
            Err(e) => return Ending::AgentFault(e.to_string()),
        };
        self.board.set_pid(&msg.id, proc.pid());
        // Output is taken from the first moment, so the job never blocks on
        // a full pipe while its start is being published.
        let stop_capture = tokio_util::sync::CancellationToken::new();
        let mut capture = tokio::spawn(output::capture(
            proc.stdout.take(),
            proc.stderr.take(),
            log,
            stop_capture.clone(),
        ));
        let mut started = started_event.clone();
        started.at = crate::events::rfc3339_now();
        // The start event goes out while the job runs, under the watch: a
        // slow or hung events endpoint never delays the timeout or a drain.
        // Whatever is still unsent when the job ends is left to the sink.
        let cancel = self.board.cancellable(&msg.id, &job.id);
        let watched = {
            let publish_started = self.publish_by(&started, deadline);
            let watch = self.watch(&mut proc, deadline, job.interrupt, cancel, work_dir);
            tokio::pin!(publish_started, watch);
            let mut published = false;
            loop {
                // The start event is polled first: it is handed to the
                // sink (queued for its batch) before a job that ended at
                // once can end the loop, so it always comes before the
                // outcome.
                tokio::select! {
                    biased;
                    _ = &mut publish_started, if !published => published = true,
                    w = &mut watch => break w,
                }
            }
        };
        // The job is over: whatever it left running goes too. Sandboxed,
        // the init's exit killed its whole pid namespace (and the cgroup's
        // removal below kills any straggler); a group kill after the leader
        // was reaped could hit a reused id, so it is only the unsandboxed
        // mode's fallback.
        if !under_init {
            proc.signal_group(Signal::SIGKILL);
        }
        // The message waits for its output: in the spool (or shipped), not
        // only in this process's memory.
        let mut not_handed_off = None;
        let captured = match tokio::time::timeout(OUTPUT_DRAIN_WAIT, &mut capture).await {
            Ok(done) => Some(done),
            Err(_) => {
                // Stops reading: closing our ends gives the escaped process
                // EPIPE and frees the pipes now, not when it exits. What it
                // wrote so far is handed off all the same.
                stop_capture.cancel();
                tracing::warn!(
                    job = %job.id,
                    "a process that left the job's process group still holds its output open; \
                     stopped capturing its output (with sandbox.mode = \"none\" nothing contains it: \
                     it keeps running)"
                );
                tokio::time::timeout(HANDOFF_WAIT, &mut capture).await.ok()
            }
        };
        match captured {
            Some(Ok(Ok(got))) if got.over_cap > 0 => tracing::warn!(
                job = %job.id, dropped = got.over_cap, "job output over jobs.log_max_bytes was dropped"
            ),
            Some(Ok(Ok(_))) => {}
            Some(Ok(Err(e))) => not_handed_off = Some(e.to_string()),
            Some(Err(e)) => not_handed_off = Some(format!("capturing job output: {e}")),
            None => {
                capture.abort();
                not_handed_off = Some(format!(
                    "its log stream was not synced to disk within {}s",
                    HANDOFF_WAIT.as_secs()
                ));
            }
        }
        let mut ending = self.judge(watched, timeout);
        if let Some(why) = not_handed_off {
            // Not deleted: the job runs again rather than its output being
            // lost.
            ending = Ending::AgentFault(format!("job output not handed off: {why}"));
        }
        if let Some(cg) = &cgroup.0 {
            let oom_kills = cg.oom_kills();
            if let Ok(mut u) = usage.lock() {
                *u = Some(cg.usage());
            }
            cgroup.remove().await;
            if oom_kills > 0 {
                if let Ending::Exited(code) = ending {
                    if code != 0 {
                        ending = Ending::OutOfMemory {
                            code: Some(code),
                            signal: None,
                        };
                    }
                } else if let Ending::Signaled(sig) = ending {
                    ending = Ending::OutOfMemory {
                        code: None,
                        signal: Some(sig),
                    };
                }
            }
        }
        // Outputs go up only after a clean exit; a job that cannot deliver
        // them has not succeeded.
        let clean = matches!(
            ending,
            Ending::Exited(0) | Ending::Interrupted { code: Some(0), .. }
        );
        if let (Some(transfers), true, false) = (&self.transfers, clean, job.outputs.is_empty()) {
            match self
                .bounded(None, transfers.upload_outputs(&job.outputs, work_dir))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return transfer_ending(e),
                // The outputs did not all go up before the drain: the job
                // has not delivered, so it runs again (not a failure).
                Err(cut) => return cut_ending(cut),
            }
        }
        ending
    }

    fn judge(&self, watched: std::io::Result<Watched>, timeout: Duration) -> Ending {
        match watched {
            Ok(Watched::Exited(st)) => match (st.code(), st.signal()) {
                (Some(code), _) => Ending::Exited(code),
                (None, Some(sig)) => Ending::Signaled(sig),
                (None, None) => Ending::AgentFault(format!("unexpected wait status {st:?}")),
            },
            Ok(Watched::Cancelled(requeue)) => Ending::Cancelled { requeue },
            Ok(Watched::TimedOut(st)) => Ending::TimedOut {
                after: timeout,
                signal: st.signal(),
            },
            Ok(Watched::Interrupted(reason, st)) => Ending::Interrupted {
                drain_reason: reason,
                code: st.code(),
                signal: st.signal(),
            },
            Err(e) => Ending::AgentFault(format!("waiting for the job: {e}")),
        }
    }

    /// Waits for the job, enforcing its timeout and reacting to a drain.
    async fn watch(
        &self,
        proc: &mut JobProcess,
        deadline: tokio::time::Instant,
        interrupt: envelope::Interrupt,
        mut cancel: tokio::sync::watch::Receiver<Option<bool>>,
        work_dir: &Path,
    ) -> std::io::Result<Watched> {
        let mut drain_rx = self.drain.subscribe();
        let cancelled = async {
            let told = cancel
                .wait_for(Option::is_some)
                .await
                .map(|v| v.unwrap_or(false));
            match told {
                Ok(requeue) => requeue,
                // The board went away: nobody can cancel any more.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            st = proc.wait() => Ok(Watched::Exited(st?)),
            requeue = cancelled => {
                // An operator's cancel: the whole job, at once.
                proc.signal_group(Signal::SIGKILL);
                proc.wait().await?;
                Ok(Watched::Cancelled(requeue))
            }
            _ = tokio::time::sleep_until(deadline) => {
                proc.signal_group(Signal::SIGTERM);
                let st = stop_within(proc, self.settings.kill_grace, &mut drain_rx).await?;
                Ok(Watched::TimedOut(st))
            }
            req = drain::requested(&mut drain_rx) => {
                // The job's new deadline where it can read it, before it is
                // told: its grace, or the drain's end less the time its
                // release takes, whichever is first.
                let left = interrupt
                    .grace
                    .min(req.jobs_end().checked_sub(RELEASE_RESERVE).unwrap_or(req.jobs_end()).saturating_duration_since(Instant::now()));
                if let Err(e) = crate::sandbox::write_deadline_file(work_dir, SystemTime::now() + left) {
                    tracing::warn!(error = %e, "cannot tell the job its drain deadline");
                }
                proc.signal_group(interrupt.signal);
                self.drain.timeline().mark(drain::Step::JobSignalled);
                let st = stop_within(proc, interrupt.grace, &mut drain_rx).await?;
                Ok(Watched::Interrupted(req.reason, st))
            }
        }
    }
}

/// Gives an interrupted job until its grace period ends or the drain
/// deadline (less the time to release it) comes, whichever is first; a
/// deadline moved earlier while waiting is honoured. Then kills the group.
async fn stop_within(
    proc: &mut JobProcess,
    grace: Duration,
    drain_rx: &mut tokio::sync::watch::Receiver<Option<drain::DrainRequest>>,
) -> std::io::Result<ExitStatus> {
    // A job may ask for any grace; the drain deadline bounds it anyway.
    let grace_end = Instant::now()
        .checked_add(grace)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    loop {
        let drain_end = drain_rx
            .borrow_and_update()
            .as_ref()
            .filter(|r| r.is_drain())
            .map(|r| {
                let end = r.jobs_end();
                end.checked_sub(RELEASE_RESERVE).unwrap_or(end)
            });
        let until = drain_end.map_or(grace_end, |d| d.min(grace_end));
        tokio::select! {
            st = proc.wait() => return st,
            _ = tokio::time::sleep_until(until.into()) => {
                proc.signal_group(Signal::SIGKILL);
                return proc.wait().await;
            }
            changed = drain_rx.changed() => {
                if changed.is_err() {
                    // No more deadline changes can come; wait out the grace.
                    tokio::select! {
                        st = proc.wait() => return st,
                        _ = tokio::time::sleep_until(until.into()) => {
                            proc.signal_group(Signal::SIGKILL);
                            return proc.wait().await;
                        }
                    }
                }
            }
        }
    }
}

/// A transfer problem is the job's (missing input, missing output) or the
/// agent's (S3 unreachable, access denied).
fn transfer_ending(e: crate::transfer::TransferError) -> Ending {
    match e {
        e @ crate::transfer::TransferError::Job { .. } => Ending::JobFault(e.to_string()),
        e @ crate::transfer::TransferError::Agent { .. } => Ending::AgentFault(e.to_string()),
    }
}

/// A fresh, private (0700) work dir; leftovers of an earlier attempt of the
/// same message are removed first. The common case (nothing there, the
/// parent exists) costs one `mkdir`.
fn prepare_work_dir(dir: &Path) -> std::io::Result<()> {
    use std::io::ErrorKind;
    use std::os::unix::fs::DirBuilderExt;
    // The mode is set, not left to the umask: another thread (the admin
    // socket's bind) may hold a stricter umask for a moment.
    let mkdir = || {
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
    };
    match mkdir() {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            std::fs::remove_dir_all(dir)?;
            mkdir()
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)?;
            }
            mkdir()
        }
        other => other,
    }
}

/// Removes a finished attempt's work dir. One that holds only the agent's
/// deadline file (a job that left nothing behind) goes in an `unlink` and
/// an `rmdir` on the spot; a tree, which may be very large, is removed off
/// the runtime's threads. A dir already gone is not an error.
pub(super) async fn remove_work_dir(dir: &Path) -> std::io::Result<()> {
    use std::io::ErrorKind;
    // Whatever the job made of that name (a link, a directory it put
    // there) is left to the removal of the tree.
    let _ = std::fs::remove_file(crate::sandbox::deadline_file(dir));
    match std::fs::remove_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    let tree = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(tree)).await {
        Ok(Err(e)) if e.kind() != ErrorKind::NotFound => Err(e),
        Ok(_) => Ok(()),
        Err(e) => Err(std::io::Error::other(format!(
            "the removal task failed: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{prepare_work_dir, remove_work_dir};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_work_dir_is_fresh_and_private_whatever_was_there() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Missing parents are made.
        let dir = tmp.path().join("work/msg-1");
        prepare_work_dir(&dir).expect("first attempt");
        let mode = std::fs::metadata(&dir).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // An earlier attempt's leftovers are gone.
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/left"), b"x").expect("write");
        prepare_work_dir(&dir).expect("second attempt");
        assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 0);
    }

    #[tokio::test]
    async fn removing_a_work_dir_takes_an_empty_one_a_tree_or_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        remove_work_dir(&empty).await.expect("empty dir");
        assert!(!empty.exists());

        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).expect("mkdir");
        std::fs::write(tree.join("a/b/f"), b"x").expect("write");
        remove_work_dir(&tree).await.expect("tree");
        assert!(!tree.exists());

        remove_work_dir(&tmp.path().join("never-made"))
            .await
            .expect("a dir already gone is fine");
    }

    #[tokio::test]
    async fn removing_a_work_dir_takes_whatever_the_job_made_of_its_deadline_file() {
        use crate::sandbox::deadline_file;
        let tmp = tempfile::tempdir().expect("tempdir");
        let at = std::time::SystemTime::now();
        let plain = tmp.path().join("plain");
        std::fs::create_dir(&plain).expect("mkdir");
        crate::sandbox::create_deadline_file(&plain, at).expect("deadline");
        remove_work_dir(&plain)
            .await
            .expect("only the deadline file");
        assert!(!plain.exists());

        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let linked = tmp.path().join("linked");
        std::fs::create_dir(&linked).expect("mkdir");
        std::os::unix::fs::symlink(&victim, deadline_file(&linked)).expect("link");
        remove_work_dir(&linked).await.expect("a link in its place");
        assert!(!linked.exists());
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");

        let replaced = tmp.path().join("replaced");
        std::fs::create_dir_all(deadline_file(&replaced)).expect("a dir in its place");
        std::fs::write(deadline_file(&replaced).join("f"), b"x").expect("write");
        remove_work_dir(&replaced)
            .await
            .expect("a dir in its place");
        assert!(!replaced.exists());
    }
}
