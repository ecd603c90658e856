//! Custody of SQS messages, through the agent's own `SqsQueue` against a
//! local SQS (moto). SQS hides a received message for at most 12 hours; a
//! job that runs longer would see its message handed to another agent. So
//! before that limit the agent keeps a synced copy in `state.dir/custody`
//! and deletes the message from SQS; the copy is then dropped when the job
//! ends, or sent back to the queue when the job must run again, also at the
//! next start after a crash.
//!
//! The limit is shortened from 12 hours to `MAX_HOLD` (the test hook
//! `SqsQueue::connect_with_hold`) and the queue's visibility timeout to
//! `VISIBILITY`, so the lease is renewed before custody is taken. A second
//! receiver, the test's own client, keeps polling the queue: the message
//! must never reach it.
//!
//! Attempt numbers follow README "Attempts": the attempt is the failures
//! carried by the message (`batchly-failures`) plus SQS's receive count; a
//! release that is not a failure sends a copy that keeps the attempt, and a
//! crash counts as a failure. The receive count is the job's: a copy
//! carries the receives before it (`batchly-receives`) on.

use std::path::Path;
use std::time::{Duration, Instant};

use batchly_agent::queue::custody::Held;
use batchly_agent::queue::sqs::{SqsQueue, ATTR_FAILURES, ATTR_RECEIVES};
use batchly_agent::queue::{JobSource, Message};
use batchly_e2e::sqs::{Aws, JobQueue, Moto, QueueDepth, QueueOptions, LONG_WAIT};
use batchly_e2e::{eventually, list_dir};
use tempfile::TempDir;

/// The queue's visibility timeout: short, so the message stays hidden only
/// because the agent renews its lease.
const VISIBILITY: Duration = Duration::from_secs(4);
/// Stands in for SQS's 12 hours. Custody is due four heartbeat ticks (a
/// tick is a quarter of `VISIBILITY`) before it, so here 4 s before.
const MAX_HOLD: Duration = Duration::from_secs(10);
/// How long the first test holds its message: well past `MAX_HOLD`, when
/// SQS would show the message again were it still there.
const HOLD: Duration = Duration::from_secs(12);
/// How often the test looks at the queue while a message is held.
const POLL: Duration = Duration::from_millis(50);

const BODY: &str = r#"{"job":"custody","note":"not signed: the queue never checks"}"#;

/// One test's world: a moto server, the test's own client, a job queue with
/// a short visibility timeout, and the agent's state directory.
struct World {
    aws: Aws,
    queue: JobQueue,
    state: TempDir,
    moto: Moto,
}

impl World {
    fn start() -> World {
        let moto = Moto::start();
        let aws = Aws::new(&moto.endpoint());
        let queue = aws.job_queue(
            "jobs",
            &QueueOptions {
                visibility_s: Some(VISIBILITY.as_secs() as u32),
                ..QueueOptions::default()
            },
        );
        let state = tempfile::tempdir().expect("tempdir for the agent's state");
        World {
            aws,
            queue,
            state,
            moto,
        }
    }

    fn custody_dir(&self) -> std::path::PathBuf {
        self.state.path().join("custody")
    }

    /// Names of the copies held in custody.
    fn custody_files(&self) -> Vec<String> {
        list_dir(&self.custody_dir())
    }

    fn depth(&self) -> QueueDepth {
        self.aws.depth(&self.queue.url)
    }

    /// The agent's source on this world's queue, limited to `max_hold`.
    fn agent(&self, max_hold: Duration) -> Agent {
        Agent::connect(
            &self.moto.endpoint(),
            &self.queue,
            self.state.path(),
            max_hold,
        )
    }

    /// Waits until `msg` is in the agent's custody: its copy on disk and
    /// the message gone from SQS. Panics if another receiver gets it first.
    fn wait_for_custody(&self, msg: &Message) {
        let copy = copy_name(msg);
        eventually(
            &format!("custody of {}", msg.id),
            MAX_HOLD + LONG_WAIT,
            || {
                self.assert_nobody_else_receives(msg);
                self.custody_files() == [copy.as_str()] && self.depth().is_empty()
            },
            || self.context(),
        );
    }

    /// Fails if the test's own client, a second receiver, can receive
    /// anything from the queue now.
    fn assert_nobody_else_receives(&self, held: &Message) {
        let stolen = self.aws.take_all(&self.queue.url, 0);
        assert!(
            stolen.is_empty(),
            "a second receiver got {stolen:?} while the agent held {}\n{}",
            held.id,
            self.context()
        );
    }

    /// The queue, the custody directory and moto's log, for failure
    /// messages.
    fn context(&self) -> String {
        format!(
            "queue: {:?}\ncustody: {:?}\n--- moto (tail) ---\n{}",
            self.depth(),
            self.custody_files(),
            self.moto.log_tail()
        )
    }
}

/// The agent's `SqsQueue` with the runtime its lease heartbeat and batchers
/// run on. Dropping it stops both at once, as the death of the agent would.
struct Agent {
    // Declared first so it is dropped while its runtime still exists.
    queue: SqsQueue,
    rt: tokio::runtime::Runtime,
}

impl Agent {
    fn connect(endpoint: &str, queue: &JobQueue, state_dir: &Path, max_hold: Duration) -> Agent {
        // Worker threads keep the heartbeat going while the test thread
        // blocks on its own client.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the agent's queue");
        let urls = [queue.url.clone()];
        let queue = rt
            .block_on(SqsQueue::connect_with_hold(
                agent_client(endpoint),
                &urls,
                Some(queue.dlq()),
                state_dir,
                max_hold,
            ))
            .unwrap_or_else(|e| panic!("connecting the agent's queue: {e}"));
        Agent { queue, rt }
    }

    /// Receives exactly one message, waiting for it at most `LONG_WAIT`.
    fn receive_one(&self) -> Message {
        let deadline = Instant::now() + LONG_WAIT;
        loop {
            let mut got = self
                .rt
                .block_on(self.queue.receive(10))
                .unwrap_or_else(|e| panic!("receiving: {e}"));
            match got.len() {
                0 if Instant::now() < deadline => continue,
                0 => panic!("no message within {LONG_WAIT:?}"),
                1 => return got.remove(0),
                _ => panic!("one message expected in the queue, got {got:#?}"),
            }
        }
    }

    fn release(&self, msg: &Message, failed: bool) {
        self.rt
            .block_on(self.queue.release(msg, Duration::ZERO, failed))
            .unwrap_or_else(|e| panic!("releasing {} (failed: {failed}): {e}", msg.id));
    }

    fn delete(&self, msg: &Message) {
        self.rt
            .block_on(self.queue.delete(msg))
            .unwrap_or_else(|e| panic!("deleting {}: {e}", msg.id));
    }
}

/// An SQS client for the agent, built the way the harness builds its own:
/// static test credentials, straight to moto.
fn agent_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "batchly-e2e-agent",
        ))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// The custody file of a message (moto's ids need no escaping).
fn copy_name(msg: &Message) -> String {
    format!("{}.json", msg.id)
}

fn body_of(msg: &Message) -> &str {
    std::str::from_utf8(&msg.body).expect("the test sends UTF-8 bodies")
}

const EMPTY: QueueDepth = QueueDepth {
    visible: 0,
    in_flight: 0,
    delayed: 0,
};

/// Receives the test's message a second time through a failed release, so
/// that its attempt (2) comes from SQS's receive count and a copy must
/// carry that count on to keep it.
fn second_attempt(w: &World, agent: &Agent) -> Message {
    w.aws.send(&w.queue.url, BODY);
    let first = agent.receive_one();
    assert_eq!((first.attempt, first.receive_count), (1, 1), "{first:?}");
    agent.release(&first, true);
    let second = agent.receive_one();
    assert_eq!(second.id, first.id, "a failed release keeps the message");
    assert_eq!((second.attempt, second.receive_count), (2, 2), "{second:?}");
    second
}

#[test]
fn a_message_held_past_sqs_limit_moves_into_custody_and_never_reaches_another_receiver() {
    let w = World::start();
    let agent = w.agent(MAX_HOLD);
    w.aws.send(&w.queue.url, BODY);
    let asked = Instant::now();
    let msg = agent.receive_one();

    // Before custody: hidden in SQS by the renewed lease, past its first
    // visibility timeout. The depth is read before the directory: custody
    // writes the copy before it deletes the message.
    let mut last_seen_in_flight = None;
    let deadline = Instant::now() + MAX_HOLD + LONG_WAIT;
    loop {
        w.assert_nobody_else_receives(&msg);
        let depth = w.depth();
        if !w.custody_files().is_empty() {
            break;
        }
        assert_eq!(
            depth,
            QueueDepth {
                visible: 0,
                in_flight: 1,
                delayed: 0
            },
            "before custody the message is in flight, {:?} after its receipt\n{}",
            asked.elapsed(),
            w.context()
        );
        last_seen_in_flight = Some(asked.elapsed());
        assert!(
            Instant::now() < deadline,
            "no custody within {:?}\n{}",
            MAX_HOLD + LONG_WAIT,
            w.context()
        );
        std::thread::sleep(POLL);
    }
    let last_seen_in_flight = last_seen_in_flight.expect("custody came after one look at least");
    assert!(
        last_seen_in_flight > VISIBILITY,
        "the lease was renewed: the message was still in flight {last_seen_in_flight:?} after \
         its receipt, past the queue's visibility timeout of {VISIBILITY:?}"
    );

    w.wait_for_custody(&msg);
    let copy = w.custody_dir().join(copy_name(&msg));
    let held: Held = serde_json::from_slice(
        &std::fs::read(&copy).unwrap_or_else(|e| panic!("reading {}: {e}", copy.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not a custody copy: {e}", copy.display()));
    assert_eq!(
        (
            held.message_id.as_str(),
            held.queue_url.as_str(),
            held.body.as_str()
        ),
        (msg.id.as_str(), w.queue.url.as_str(), BODY),
        "the copy is the whole message"
    );

    // In custody, past the point where SQS would have shown the message
    // again: it stays out of the queue and on disk.
    while asked.elapsed() < HOLD {
        w.assert_nobody_else_receives(&msg);
        assert_eq!(w.depth(), EMPTY, "in custody\n{}", w.context());
        assert_eq!(w.custody_files(), [copy_name(&msg)], "in custody");
        std::thread::sleep(POLL);
    }

    agent.delete(&msg);
    assert!(
        w.custody_files().is_empty(),
        "deleting a message in custody drops its copy: {:?}",
        w.custody_files()
    );
    let after = w.aws.take_all(&w.queue.url, 1);
    assert!(after.is_empty(), "nothing came back: {after:?}");
    assert_eq!(w.depth(), EMPTY);
    assert_eq!(
        w.aws.depth(w.queue.dlq()),
        EMPTY,
        "nothing was dead-lettered"
    );
}

#[test]
fn a_message_in_custody_released_comes_back_as_a_new_message_keeping_its_attempt() {
    let w = World::start();
    let agent = w.agent(MAX_HOLD);
    let held = second_attempt(&w, &agent);
    w.wait_for_custody(&held);

    // Not a failure (exit 75, a drain): the copy keeps attempt 2.
    agent.release(&held, false);
    assert!(
        w.custody_files().is_empty(),
        "the copy sent back is dropped: {:?}",
        w.custody_files()
    );
    let back = agent.receive_one();
    assert_ne!(back.id, held.id, "a copy is a new message");
    assert_eq!(body_of(&back), BODY);
    assert_eq!(
        (back.attempt, back.receive_count),
        (held.attempt, held.receive_count + 1),
        "the same attempt, one more receive of the job: {back:?}"
    );

    // A failure released from custody counts one more attempt.
    w.wait_for_custody(&back);
    agent.release(&back, true);
    assert!(w.custody_files().is_empty(), "{:?}", w.custody_files());
    let again = agent.receive_one();
    assert_ne!(again.id, back.id, "a copy is a new message");
    assert_eq!(body_of(&again), BODY);
    assert_eq!(
        (again.attempt, again.receive_count),
        (back.attempt + 1, back.receive_count + 1),
        "a failure counts: {again:?}"
    );

    agent.delete(&again);
    assert_eq!(w.depth(), EMPTY);
    assert!(w.custody_files().is_empty(), "{:?}", w.custody_files());
}

#[test]
fn a_message_in_custody_when_the_agent_dies_is_sent_back_to_its_queue_at_the_next_start() {
    let w = World::start();
    let agent = w.agent(MAX_HOLD);
    let held = second_attempt(&w, &agent);
    w.wait_for_custody(&held);

    // The agent dies: its heartbeat and pending calls stop with it, and
    // only the copy on disk knows of the message.
    drop(agent);
    assert_eq!(w.custody_files(), [copy_name(&held)], "the copy survives");
    assert_eq!(w.depth(), EMPTY, "nothing was sent back before the restart");

    let restarted = w.agent(MAX_HOLD);
    let recovered = restarted
        .rt
        .block_on(restarted.queue.recover_claims(&[]))
        .unwrap_or_else(|e| panic!("recovering claims: {e}"));
    assert_eq!(recovered, std::slice::from_ref(&held.id));
    assert!(
        w.custody_files().is_empty(),
        "the copy sent back is dropped: {:?}",
        w.custody_files()
    );

    let back = w.aws.take_all(&w.queue.url, 1);
    assert_eq!(back.len(), 1, "the message is back once: {back:?}");
    assert_ne!(back[0].id, held.id, "a copy is a new message");
    assert_eq!(back[0].body, BODY);
    // README "Attempts": an attempt the agent died under counts as a
    // failure, so such a job cannot loop forever; its copy carries the
    // failures so far, this attempt included.
    assert_eq!(
        back[0].attributes.get(ATTR_FAILURES).map(String::as_str),
        Some(held.attempt.to_string().as_str()),
        "the copy counts attempt {} as failed: {:?}",
        held.attempt,
        back[0]
    );
    assert_eq!(
        back[0].attributes.get(ATTR_RECEIVES).map(String::as_str),
        Some(held.receive_count.to_string().as_str()),
        "the copy carries the job's receives on: {:?}",
        back[0]
    );
    assert_eq!(w.depth(), EMPTY);
}

#[test]
fn a_release_that_is_not_a_failure_keeps_the_attempt_and_a_failed_one_counts() {
    let w = World::start();
    // SQS's own 12 hours: nothing here goes into custody.
    let agent = w.agent(batchly_agent::queue::sqs::MAX_VISIBILITY);
    w.aws.send(&w.queue.url, BODY);
    let first = agent.receive_one();
    assert_eq!((first.attempt, first.receive_count), (1, 1), "{first:?}");

    agent.release(&first, false);
    assert_eq!(
        w.depth(),
        QueueDepth {
            visible: 1,
            in_flight: 0,
            delayed: 0
        },
        "the copy replaced the original"
    );
    let copy = agent.receive_one();
    assert_ne!(copy.id, first.id, "a copy is a new message");
    assert_eq!(body_of(&copy), BODY);
    assert_eq!(
        (copy.attempt, copy.receive_count),
        (1, 2),
        "an interruption is not an attempt: {copy:?}"
    );

    agent.release(&copy, true);
    let retry = agent.receive_one();
    assert_eq!(body_of(&retry), BODY);
    assert_eq!(
        retry.attempt,
        copy.attempt + 1,
        "a failure counts: {retry:?}"
    );

    // The failure counted by SQS's receive count survives the next copy.
    agent.release(&retry, false);
    let last = agent.receive_one();
    assert_ne!(last.id, retry.id, "a copy is a new message");
    assert_eq!(
        (last.attempt, last.receive_count),
        (retry.attempt, retry.receive_count + 1),
        "{last:?}"
    );

    agent.delete(&last);
    assert_eq!(w.depth(), EMPTY);
    assert!(w.custody_files().is_empty(), "{:?}", w.custody_files());
}
