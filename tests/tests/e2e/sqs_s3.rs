//! Job inputs and outputs on S3 (moto) through `batchly-agent run`:
//! inputs are in the work dir when the job starts, outputs are uploaded
//! after it exits 0 (a 50 MB file included, which takes the multipart
//! path), and a job that fails uploads nothing.

use batchly_e2e::sqs::{AgentSettings, SqsTest};
use batchly_e2e::{of_message, Event};
use serde_json::json;

const BUCKET: &str = "data";
/// Big enough to need a multipart upload (the agent switches above 16 MiB).
const BIG_BYTES: usize = 50 * 1024 * 1024;

/// Deterministic bytes that no run of zeros or repeated block could fake.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn inputs_and_outputs_round_trip_through_s3_including_a_50_mb_file() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    t.aws.create_bucket(BUCKET);
    let big = pseudo_random(BIG_BYTES);
    t.aws.put_object(BUCKET, "inputs/big.bin", big.clone());
    t.aws
        .put_object(BUCKET, "inputs/small.txt", b"hello from s3\n".to_vec());
    let spec = json!({
        "id": "round-trip",
        "command": ["sh", "-c",
            "cat in/small.txt > greeting.txt && echo done >> greeting.txt && cp in/big.bin big-copy.bin"],
        "inputs": [
            {"url": format!("s3://{BUCKET}/inputs/small.txt"), "path": "in/small.txt"},
            {"url": format!("s3://{BUCKET}/inputs/big.bin"), "path": "in/big.bin"},
        ],
        "outputs": [
            {"path": "greeting.txt", "url": format!("s3://{BUCKET}/results/")},
            {"path": "big-copy.bin", "url": format!("s3://{BUCKET}/results/")},
        ],
        "timeout_s": 600,
    });
    let failing = json!({
        "id": "fails-after-writing",
        "command": ["sh", "-c", "echo partial > out.txt; exit 3"],
        "outputs": [{"path": "out.txt", "url": format!("s3://{BUCKET}/failed/")}],
    });
    let mut jobs = Vec::new();
    for (name, spec) in [("round-trip.json", &spec), ("failing.json", &failing)] {
        let path = t.root().join(name);
        std::fs::write(&path, spec.to_string()).expect("writing a spec file");
        jobs.extend(t.submit(&q.url, &["--spec", &path.display().to_string()]));
    }
    let agent = t.agent(AgentSettings::new(&q.url));

    // A job the agent keeps giving back (it cannot run it) ends the wait
    // early, so the failure below shows why at once.
    let requeued = |ev: &[Event]| -> Vec<String> {
        of_message(ev, &jobs[0].message_id)
            .iter()
            .filter(|e| e.kind == "job.requeued")
            .map(|e| e.reason.clone().unwrap_or_default())
            .collect()
    };
    let events = t.wait_events("both final events", &[&agent], |ev| {
        requeued(ev).len() >= 3
            || jobs.iter().all(|j| {
                ev.iter()
                    .any(|e| e.message_id == j.message_id && e.is_final)
            })
    });
    let given_back = requeued(&events);
    assert!(
        given_back.is_empty(),
        "the agent could not run the S3 job: {given_back:?} (\"not built yet\" means \
         agent/src/transfer.rs is still the placeholder)"
    );

    let outcome = |i: usize| {
        of_message(&events, &jobs[i].message_id)
            .into_iter()
            .find(|e| e.is_final)
            .expect("found by the wait")
            .clone()
    };
    let ok = outcome(0);
    assert_eq!(ok.kind, "job.succeeded", "the S3 job: {ok:?}");
    assert_eq!(
        t.aws.get_object(BUCKET, "results/greeting.txt").as_deref(),
        Some(&b"hello from s3\ndone\n"[..]),
        "the small input arrived and the output went up"
    );
    let copy = t
        .aws
        .get_object(BUCKET, "results/big-copy.bin")
        .unwrap_or_else(|| {
            panic!(
                "no results/big-copy.bin; under results/: {:?}",
                t.aws.list_keys(BUCKET, "results/")
            )
        });
    assert_eq!(
        copy.len(),
        big.len(),
        "the 50 MB output has the input's size"
    );
    assert!(copy == big, "the 50 MB file came back byte for byte");

    let failed = outcome(1);
    assert_eq!(failed.kind, "job.failed", "{failed:?}");
    assert_eq!(failed.exit_code, Some(3), "{failed:?}");
    assert!(
        t.aws.list_keys(BUCKET, "failed/").is_empty(),
        "a job that did not exit 0 uploads nothing"
    );
    t.wait_queue_empty(&q.url, &[&agent]);
}

#[test]
fn an_output_swapped_for_a_symlink_to_etc_shadow_is_refused_and_nothing_is_uploaded() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    t.aws.create_bucket(BUCKET);
    // The job writes its declared output, then swaps it for a link to a
    // file only root may read: the agent uploads as root, after the job.
    let spec = json!({
        "id": "swaps-output",
        "command": ["sh", "-c",
            "echo harmless > result.txt && rm result.txt && ln -s /etc/shadow result.txt"],
        "outputs": [{"path": "result.txt", "url": format!("s3://{BUCKET}/results/")}],
        "max_attempts": 1,
    });
    let path = t.root().join("swaps-output.json");
    std::fs::write(&path, spec.to_string()).expect("writing the spec file");
    let job = t
        .submit(&q.url, &["--spec", &path.display().to_string()])
        .remove(0);
    let agent = t.agent(AgentSettings::new(&q.url));
    let events = t.wait_events("the final event", &[&agent], |ev| {
        ev.iter()
            .any(|e| e.message_id == job.message_id && e.is_final)
    });
    let end = of_message(&events, &job.message_id)
        .into_iter()
        .find(|e| e.is_final)
        .expect("found by the wait")
        .clone();
    assert_eq!(end.kind, "job.failed", "the upload is refused: {end:?}");
    let reason = end.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("result.txt") && reason.contains("symbolic link"),
        "the reason names the symlink: {reason:?}"
    );
    assert_eq!(
        t.aws.list_keys(BUCKET, ""),
        Vec::<String>::new(),
        "nothing reached the bucket"
    );
    t.wait_queue_empty(&q.url, &[&agent]);
}
