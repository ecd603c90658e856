//! `batchly-agent run` refusing to start on queues it cannot use: exit 2
//! (bad configuration) with a message that names the queue and the
//! problem, before any job is taken.

use std::time::Duration;

use batchly_e2e::sqs::{AgentSettings, QueueOptions, SqsTest, ACCOUNT};

/// How long a refusal may take before the test concludes the agent started.
const REFUSAL_WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_queue_that_does_not_exist_exits_2_naming_the_url() {
    let t = SqsTest::start();
    let missing = format!("{}/{ACCOUNT}/no-such-queue", t.endpoint());

    let run = t.run_expecting_exit(AgentSettings::new(&missing), REFUSAL_WAIT);

    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains(&missing), "{}", run.stderr);
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);
}

#[test]
fn a_queue_without_a_dead_letter_queue_exits_2_saying_how_to_give_it_one() {
    let t = SqsTest::start();
    let q = t.job_queue_with(
        "no-redrive",
        &QueueOptions {
            dead_letter: false,
            ..QueueOptions::default()
        },
    );

    let run = t.run_expecting_exit(AgentSettings::new(&q.url), REFUSAL_WAIT);

    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains(&q.url), "{}", run.stderr);
    assert!(run.stderr.contains("dead-letter"), "{}", run.stderr);
    assert!(
        run.stderr.contains("queue.dead_letter_url") && run.stderr.contains("RedrivePolicy"),
        "the message says both ways to give the queue one: {}",
        run.stderr
    );
}

#[test]
fn a_dead_letter_or_events_queue_that_does_not_exist_exits_2_naming_its_key() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let missing = format!("{}/{ACCOUNT}/gone", t.endpoint());

    let run = t.run_expecting_exit(
        AgentSettings::new(&q.url).dead_letter(&missing),
        REFUSAL_WAIT,
    );
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains("queue.dead_letter_url"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(&missing), "{}", run.stderr);

    let run = t.run_expecting_exit(AgentSettings::new(&q.url).events(&missing), REFUSAL_WAIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("queue.events_url"), "{}", run.stderr);
    assert!(run.stderr.contains(&missing), "{}", run.stderr);
}
