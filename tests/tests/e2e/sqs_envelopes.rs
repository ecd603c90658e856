//! Envelopes on SQS as producers make them: an independent producer in
//! Python (`tests/python/sign_envelope.py`, written from the spec, not from
//! the agent's code) reproduces the spec's test vectors and gets its jobs
//! run; every rejection reason of the spec lands in the dead-letter queue
//! with its reason attribute and a final `job.rejected` event, and the job
//! never runs.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use batchly_e2e::sqs::{sign_with_python, unix_now, AgentSettings, SqsTest, ED25519_KID, HMAC_KID};
use batchly_e2e::{list_dir, of_message, Event};
use serde_json::{json, Value};

/// Dead-letter attributes (README, "What happens to a job").
const ATTR_REASON: &str = "batchly-reject-reason";
const ATTR_DETAIL: &str = "batchly-reject-detail";
const ATTR_SOURCE_QUEUE: &str = "batchly-source-queue";
const ATTR_SOURCE_MESSAGE: &str = "batchly-source-message-id";

fn vectors() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/testdata/envelope-vectors.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the vectors file is JSON")
}

/// A job that leaves `ran-<id>` in the mark dir if it ever runs.
fn touching_job(t: &SqsTest, id: &str) -> String {
    json!({
        "id": id,
        "command": ["sh", "-c", "touch \"$MARK/ran-$BATCHLY_JOB_ID\""],
        "env": {"MARK": t.mark().display().to_string()},
    })
    .to_string()
}

fn edit(body: &str, change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v: Value = serde_json::from_str(body).expect("the signer prints JSON");
    change(v.as_object_mut().expect("an envelope is an object"));
    v.to_string()
}

#[test]
fn the_python_producer_reproduces_every_valid_spec_vector_byte_for_byte() {
    let v = vectors();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut checked = 0;
    for key in v["keys"].as_array().expect("keys") {
        let kid = key["kid"].as_str().expect("kid");
        let material = match key["alg"].as_str().expect("alg") {
            "ed25519" => format!(
                "private_key = \"{}\"",
                key["private_key"].as_str().expect("seed")
            ),
            _ => format!("secret = \"{}\"", key["secret"].as_str().expect("secret")),
        };
        let file = tmp.path().join(format!("{kid}.toml"));
        std::fs::write(
            &file,
            format!(
                "[[key]]\nkid = \"{kid}\"\nalg = \"{}\"\n{material}\n",
                key["alg"].as_str().expect("alg")
            ),
        )
        .expect("writing a key file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    for vector in v["vectors"].as_array().expect("vectors") {
        if vector["expect"] != "ok" {
            continue;
        }
        let name = vector["name"].as_str().expect("name");
        let body: Value =
            serde_json::from_str(vector["body"].as_str().expect("body")).expect("body is JSON");
        let kid = body["kid"].as_str().expect("kid");
        let signed = sign_with_python(
            &tmp.path().join(format!("{kid}.toml")),
            kid,
            body["iat"].as_i64().expect("iat"),
            body["exp"].as_i64().expect("exp"),
            body["job"].as_str().expect("job"),
        );
        let ours: Value = serde_json::from_str(&signed).expect("the signer prints JSON");
        assert_eq!(
            ours, body,
            "vector {name}: the Python producer's envelope differs"
        );
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} valid vectors found");
}

#[test]
fn jobs_signed_by_the_independent_python_producer_run_to_success() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let now = unix_now();
    let mut sent = BTreeMap::new();
    for (key, kid, id) in [
        (t.signing_key(), ED25519_KID, "py-ed25519"),
        (t.hmac_signing_key(), HMAC_KID, "py-hmac"),
    ] {
        let body = t.sign_with_python(&key, kid, now, now + 600, &touching_job(&t, id));
        sent.insert(t.aws.send(&q.url, &body), id);
    }
    let agent = t.agent(AgentSettings::new(&q.url));

    let events = t.wait_events("both final events", &[&agent], |ev| {
        sent.keys()
            .all(|m| ev.iter().any(|e| &e.message_id == m && e.is_final))
    });

    for (message, id) in &sent {
        let fin: Vec<&Event> = of_message(&events, message)
            .into_iter()
            .filter(|e| e.is_final)
            .collect();
        assert_eq!(fin.len(), 1, "{id}: {fin:?}");
        assert_eq!(fin[0].kind, "job.succeeded", "{id}: {:?}", fin[0]);
        assert_eq!(fin[0].job_id.as_deref(), Some(*id));
        assert!(
            t.mark().join(format!("ran-{id}")).exists(),
            "{id} did not run"
        );
    }
    t.wait_queue_empty(&q.url, &[&agent]);
}

#[test]
fn every_rejection_reason_lands_in_the_dead_letter_queue_with_its_reason_and_an_event() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let now = unix_now();
    let key = t.signing_key();
    let py =
        |kid: &str, iat: i64, exp: i64, job: &str| t.sign_with_python(&key, kid, iat, exp, job);
    let valid = |id: &str| py(ED25519_KID, now, now + 3600, &touching_job(&t, id));
    let signed_spec = |spec: Value| py(ED25519_KID, now, now + 3600, &spec.to_string());

    let cases: Vec<(&str, &str, String)> = vec![
        (
            "malformed",
            "not JSON",
            "this is not an envelope".to_string(),
        ),
        (
            "malformed",
            "an extra member",
            edit(&valid("r-extra"), |o| {
                o.insert("extra".into(), json!(1));
            }),
        ),
        (
            "unsupported_version",
            "v = 2",
            edit(&valid("r-version"), |o| {
                o.insert("v".into(), json!(2));
            }),
        ),
        (
            "unknown_key",
            "a kid the agent does not know",
            py("nobody", now, now + 3600, &touching_job(&t, "r-kid")),
        ),
        (
            "bad_signature",
            "the job changed after signing",
            edit(&valid("r-sig"), |o| {
                o.insert("job".into(), json!(touching_job(&t, "r-sig-tampered")));
            }),
        ),
        (
            "not_yet_valid",
            "issued an hour from now",
            py(
                ED25519_KID,
                now + 3600,
                now + 7200,
                &touching_job(&t, "r-future"),
            ),
        ),
        (
            "expired",
            "expired an hour ago",
            py(
                ED25519_KID,
                now - 7200,
                now - 3600,
                &touching_job(&t, "r-expired"),
            ),
        ),
        (
            "ttl_too_long",
            "valid for eight days",
            py(
                ED25519_KID,
                now,
                now + 8 * 86_400,
                &touching_job(&t, "r-ttl"),
            ),
        ),
        (
            "invalid_job",
            "an unknown member in the job spec",
            signed_spec(json!({"id": "r-unknown", "command": ["true"], "comand": ["x"]})),
        ),
        (
            "invalid_job",
            "an empty command",
            signed_spec(json!({"id": "r-empty", "command": []})),
        ),
        (
            "invalid_job",
            "a path escaping the work dir",
            signed_spec(json!({
                "id": "r-escape",
                "command": ["true"],
                "outputs": [{"path": "../../etc/x", "url": "s3://bucket/out/"}],
            })),
        ),
    ];
    let mut sent: BTreeMap<String, (&str, &str, String)> = BTreeMap::new();
    for (reason, what, body) in cases {
        let id = t.aws.send(&q.url, &body);
        sent.insert(id, (reason, what, body));
    }
    let agent = t.agent(AgentSettings::new(&q.url));

    let events = t.wait_events("a final event for every message", &[&agent], |ev| {
        sent.keys()
            .all(|m| ev.iter().any(|e| &e.message_id == m && e.is_final))
    });
    t.wait_queue_empty(&q.url, &[&agent]);
    let dead = t.aws.take_all(q.dlq(), 1);

    for (message, (reason, what, body)) in &sent {
        let evs = of_message(&events, message);
        assert_eq!(evs.len(), 1, "{what}: exactly one event: {evs:?}");
        let ev = evs[0];
        assert_eq!(ev.kind, "job.rejected", "{what}: {ev:?}");
        assert!(ev.is_final, "{what}: {ev:?}");
        assert!(
            ev.reason.as_deref().is_some_and(|r| r.starts_with(reason)),
            "{what}: the event's reason starts with {reason}: {ev:?}"
        );
        let copies: Vec<_> = dead
            .iter()
            .filter(|d| d.attributes.get(ATTR_SOURCE_MESSAGE) == Some(message))
            .collect();
        assert_eq!(copies.len(), 1, "{what}: one copy in the DLQ: {dead:#?}");
        let copy = copies[0];
        assert_eq!(
            copy.attributes.get(ATTR_REASON).map(String::as_str),
            Some(*reason),
            "{what}: {copy:#?}"
        );
        assert!(
            copy.attributes
                .get(ATTR_DETAIL)
                .is_some_and(|d| !d.is_empty()),
            "{what}: {copy:#?}"
        );
        assert_eq!(
            copy.attributes.get(ATTR_SOURCE_QUEUE),
            Some(&q.url),
            "{what}"
        );
        assert_eq!(&copy.body, body, "{what}: the original body is kept");
    }
    assert_eq!(dead.len(), sent.len(), "nothing else in the DLQ: {dead:#?}");
    let ran: Vec<String> = list_dir(&t.mark())
        .into_iter()
        .filter(|n| n.starts_with("ran-"))
        .collect();
    assert!(ran.is_empty(), "rejected jobs ran: {ran:?}");
    let reasons: BTreeSet<&str> = sent.values().map(|(r, _, _)| *r).collect();
    assert_eq!(reasons.len(), 8, "every reason of the spec is covered");
}

#[test]
fn dead_letter_url_in_the_config_wins_over_the_redrive_policy() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let explicit = t.aws.create_queue("explicit-dlq", &[]);
    let message = t.aws.send(&q.url, "{\"v\": 1}");
    let agent = t.agent(AgentSettings::new(&q.url).dead_letter(&explicit));

    let events = t.wait_events("the rejection", &[&agent], |ev| {
        ev.iter().any(|e| e.message_id == message && e.is_final)
    });

    let ev = of_message(&events, &message);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].kind, "job.rejected");
    let dead = t.aws.take_all(&explicit, 1);
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].attributes.get(ATTR_SOURCE_MESSAGE), Some(&message));
    assert_eq!(
        dead[0].attributes.get(ATTR_REASON).map(String::as_str),
        Some("malformed")
    );
    assert!(
        t.aws.take_all(q.dlq(), 0).is_empty(),
        "nothing went to the RedrivePolicy's queue"
    );
    t.wait_queue_empty(&q.url, &[&agent]);
}
