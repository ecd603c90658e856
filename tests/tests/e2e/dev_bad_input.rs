//! Messages the agent must refuse: every rejection reason of the envelope
//! spec, each built the way a broken or hostile producer would, dropped
//! straight into a `dev` queue. None may run; each must end in `dead/` with
//! its original bytes and its reason, and with one final `job.rejected`.

use std::time::{SystemTime, UNIX_EPOCH};

use batchly_agent::envelope::{sign, Alg, SigningKey};
use batchly_agent::queue::dir::enqueue;
use batchly_e2e::{list_dir, DevAgent};
use serde_json::{json, Value};

const DAY: i64 = 24 * 60 * 60;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A job spec that would leave `ran-NAME` in the mark dir if it ever ran.
fn job_text(name: &str, mark: &str) -> String {
    json!({
        "id": format!("bad-{name}"),
        "command": ["sh", "-c", format!("touch \"$MARK/ran-{name}\"")],
        "env": {"MARK": mark},
    })
    .to_string()
}

/// `body` with `member` set to `value` (members keep no particular order;
/// the spec does not ask for one).
fn with_member(body: &str, member: &str, value: Value) -> String {
    let mut obj: Value = serde_json::from_str(body).expect("signed body is JSON");
    obj[member] = value;
    obj.to_string()
}

struct Case {
    name: &'static str,
    reason: &'static str,
    body: Vec<u8>,
}

#[test]
fn every_refused_envelope_is_dead_lettered_with_its_reason_and_never_runs() {
    let agent = DevAgent::start(&[]);
    let dir = agent.dir();
    let key = SigningKey::load(&dir.join("keys/signing.toml"))
        .expect("dev created its signing key on first start");
    let stranger = SigningKey::generate(Alg::Ed25519, "stranger").expect("generating a key");
    let mark = agent.mark().display().to_string();
    let t = now();
    let job = |name: &str| job_text(name, &mark);
    let good = |name: &str| sign(&key, t, t + 3600, &job(name));

    let spec_case = |name: &'static str, spec: Value| Case {
        name,
        reason: "invalid_job",
        body: sign(&key, t, t + 3600, &spec.to_string()).into_bytes(),
    };
    let cases = vec![
        Case {
            name: "not-json",
            reason: "malformed",
            body: b"this is not JSON {".to_vec(),
        },
        Case {
            name: "extra-member",
            reason: "malformed",
            body: with_member(&good("extra-member"), "priority", json!(1)).into_bytes(),
        },
        Case {
            name: "unknown-kid",
            reason: "unknown_key",
            body: sign(&stranger, t, t + 3600, &job("unknown-kid")).into_bytes(),
        },
        Case {
            name: "tampered",
            reason: "bad_signature",
            body: with_member(&good("tampered-original"), "job", json!(job("tampered")))
                .into_bytes(),
        },
        Case {
            name: "expired",
            reason: "expired",
            body: sign(&key, t - 10 * DAY, t - 9 * DAY, &job("expired")).into_bytes(),
        },
        Case {
            name: "not-yet-valid",
            reason: "not_yet_valid",
            body: sign(&key, t + DAY, t + 2 * DAY, &job("not-yet-valid")).into_bytes(),
        },
        Case {
            name: "ttl-too-long",
            reason: "ttl_too_long",
            body: sign(&key, t, t + 8 * DAY, &job("ttl-too-long")).into_bytes(),
        },
        Case {
            name: "version-2",
            reason: "unsupported_version",
            body: with_member(&good("version-2"), "v", json!(2)).into_bytes(),
        },
        spec_case(
            "unknown-spec-member",
            json!({
                "id": "bad-unknown-spec-member",
                "command": ["sh", "-c", "touch \"$MARK/ran-unknown-spec-member\""],
                "env": {"MARK": mark},
                "comand": ["rm", "-rf", "/"],
            }),
        ),
        spec_case(
            "empty-command",
            json!({
                "id": "bad-empty-command",
                "command": [],
                "env": {"MARK": mark},
            }),
        ),
        spec_case(
            "input-escapes",
            json!({
                "id": "bad-input-escapes",
                "command": ["sh", "-c", "touch \"$MARK/ran-input-escapes\""],
                "env": {"MARK": mark},
                "inputs": [{"url": "s3://bucket/key", "path": "../../etc/passwd"}],
            }),
        ),
    ];

    let queued: Vec<(String, &Case)> = cases
        .iter()
        .map(|case| {
            let id = enqueue(dir, &case.body).expect("enqueueing a raw body");
            (id, case)
        })
        .collect();
    // The same construction, correctly signed, does run: the traps below
    // would catch a refused job that ran.
    let control = enqueue(dir, good("control").as_bytes()).expect("enqueueing the control");

    let control_end = agent.wait_final(&control);
    assert_eq!(control_end.kind, "job.succeeded", "{control_end:?}");
    assert!(agent.mark().join("ran-control").exists());

    let mut problems = Vec::new();
    for (id, case) in &queued {
        let end = agent.wait_final(id);
        let events = agent.events();
        let mine: Vec<_> = events.iter().filter(|e| &e.message_id == id).collect();
        if mine.len() != 1 || end.kind != "job.rejected" {
            problems.push(format!(
                "{}: expected one final job.rejected, got {mine:?}",
                case.name
            ));
        }
        if !end
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with(case.reason))
        {
            problems.push(format!(
                "{}: reason should start with {:?}: {:?}",
                case.name, case.reason, end.reason
            ));
        }
        let dead = dir.join("dead");
        match std::fs::read(dead.join(format!("{id}.msg"))) {
            Ok(bytes) if bytes == case.body => {}
            Ok(_) => problems.push(format!(
                "{}: dead/{id}.msg differs from the body",
                case.name
            )),
            Err(e) => problems.push(format!("{}: dead/{id}.msg: {e}", case.name)),
        }
        match std::fs::read(dead.join(format!("{id}.reason.json"))) {
            Ok(bytes) => {
                let record: Value = serde_json::from_slice(&bytes).unwrap_or_default();
                if record["reason"] != case.reason || record["message_id"] != id.as_str() {
                    problems.push(format!(
                        "{}: dead/{id}.reason.json says {record}",
                        case.name
                    ));
                }
            }
            Err(e) => problems.push(format!("{}: dead/{id}.reason.json: {e}", case.name)),
        }
    }
    let ran: Vec<String> = list_dir(agent.mark())
        .into_iter()
        .filter(|f| f != "ran-control")
        .collect();
    if !ran.is_empty() {
        problems.push(format!("refused jobs ran anyway: {ran:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(
        list_dir(&dir.join("dead")).len(),
        2 * cases.len(),
        "dead/ holds a message and a reason per refused envelope, nothing else"
    );
}
