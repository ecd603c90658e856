//! The fake IMDS itself (`batchly_e2e::imds`, `tests/python/fake_imds.py`):
//! that it behaves like the real EC2 instance metadata service where an
//! agent can tell (tokens, their TTLs and expiry, 401 without one, the
//! notices' 404 before and JSON after), that each fault mode fails the way
//! it says, and that the stats count what was asked. Raw HTTP from Rust
//! only: nothing here runs the agent.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, UNIX_EPOCH};

use batchly_e2e::imds::{
    imds_time, path, Auth, FakeImds, Fault, HttpTokens, Identity, SpotAction, ALL, TOKEN_HEADER,
    TTL_HEADER,
};
use batchly_e2e::pid_alive;
use serde_json::Value;

/// A client timeout for requests the fake is made to hang: short, so the
/// test is fast, and a hang is a hang however long it lasts.
const SHORT: Duration = Duration::from_millis(300);
/// A client timeout no answer of a healthy fake comes near.
const LONG: Duration = Duration::from_secs(20);

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn is_timeout(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
fn token_put_returns_a_token_and_echoes_its_ttl() {
    let imds = FakeImds::start();
    for ttl in ["1", "21600", "300"] {
        let r = imds.request("PUT", path::TOKEN, &[(TTL_HEADER, ttl)]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header(TTL_HEADER), Some(ttl), "{r:?}");
        assert_eq!(r.header("Content-Type"), Some("text/plain"), "{r:?}");
        assert!(!r.body.is_empty() && !r.body.contains(char::is_whitespace));
    }
    // Header names are case-insensitive, as in any HTTP server.
    let r = imds.request(
        "PUT",
        path::TOKEN,
        &[("x-aws-ec2-metadata-token-ttl-seconds", "60")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let a = imds.token(60);
    let b = imds.token(60);
    assert_ne!(a, b, "every token request gets its own token");
    assert_eq!(imds.stats().tokens_issued, 6);
}

#[test]
fn token_put_without_a_valid_ttl_is_400_and_issues_nothing() {
    let imds = FakeImds::start();
    let r = imds.request("PUT", path::TOKEN, &[]);
    assert_eq!(r.status, 400, "no TTL header: {r:?}");
    for ttl in ["0", "21601", "-5", "abc", "", "1.5"] {
        let r = imds.request("PUT", path::TOKEN, &[(TTL_HEADER, ttl)]);
        assert_eq!(r.status, 400, "TTL {ttl:?}: {r:?}");
        assert_eq!(r.header(TTL_HEADER), None);
    }
    let stats = imds.stats();
    assert_eq!(stats.tokens_issued, 0);
    assert_eq!(stats.with_status(400), 7);
}

#[test]
fn token_put_with_x_forwarded_for_is_403() {
    let imds = FakeImds::start();
    let r = imds.request(
        "PUT",
        path::TOKEN,
        &[(TTL_HEADER, "60"), ("X-Forwarded-For", "203.0.113.7")],
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(imds.stats().tokens_issued, 0);
    // A metadata GET through a proxy is not refused for it.
    let token = imds.token(60);
    let r = imds.request(
        "GET",
        path::INSTANCE_ID,
        &[(TOKEN_HEADER, &token), ("X-Forwarded-For", "203.0.113.7")],
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn token_path_takes_only_put_and_only_under_latest() {
    let imds = FakeImds::start();
    for method in ["GET", "POST", "DELETE"] {
        let r = imds.request(method, path::TOKEN, &[(TTL_HEADER, "60")]);
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.header("Allow"), Some("OPTIONS, PUT"), "{r:?}");
    }
    let r = imds.request("PUT", "/2021-03-23/api/token", &[(TTL_HEADER, "60")]);
    assert_eq!(r.status, 403, "a version-specific token path: {r:?}");
    assert_eq!(imds.stats().tokens_issued, 0);
}

#[test]
fn metadata_without_a_token_is_401_and_counted_as_imdsv1() {
    let imds = FakeImds::start();
    for p in [
        path::INSTANCE_ID,
        path::SPOT_INSTANCE_ACTION,
        "/no/such/path",
    ] {
        let r = imds.get(p, None);
        assert_eq!(r.status, 401, "{p}: {r:?}");
        assert!(r.body.contains("401 - Unauthorized"), "{r:?}");
    }
    let token = imds.token(60);
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 200);
    let stats = imds.stats();
    assert_eq!(
        (stats.no_token, stats.v2, stats.bad_token),
        (3, 1, 0),
        "{stats:#?}"
    );
    assert_eq!(stats.with_status(401), 3);
    let auths: Vec<Auth> = stats.log.iter().map(|e| e.auth).collect();
    assert_eq!(
        auths,
        [
            Auth::NoToken,
            Auth::NoToken,
            Auth::NoToken,
            Auth::TokenRequest,
            Auth::V2
        ]
    );
}

#[test]
fn an_unknown_token_is_401_and_counted_as_a_bad_token() {
    let imds = FakeImds::start();
    let r = imds.get(path::INSTANCE_ID, Some("AQAEAnot-a-token-the-fake-issued"));
    assert_eq!(r.status, 401, "{r:?}");
    let stats = imds.stats();
    assert_eq!((stats.bad_token, stats.no_token, stats.v2), (1, 0, 0));
}

#[test]
fn a_token_expires_after_its_ttl() {
    let imds = FakeImds::start();
    let short = imds.token(60);
    let long = imds.token(21600);
    imds.advance_clock(Duration::from_secs(59));
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&short)).status, 200);
    imds.advance_clock(Duration::from_secs(1));
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&short)).status, 401);
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&long)).status, 200);
    let stats = imds.stats();
    assert_eq!((stats.v2, stats.bad_token), (2, 1), "{stats:#?}");
}

#[test]
fn expire_tokens_ends_every_session_at_once() {
    let imds = FakeImds::start();
    let a = imds.token(21600);
    let b = imds.token(21600);
    imds.expire_tokens();
    for t in [&a, &b] {
        assert_eq!(imds.get(path::INSTANCE_ID, Some(t)).status, 401);
    }
    let fresh = imds.token(21600);
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&fresh)).status, 200);
    assert_eq!(imds.stats().bad_token, 2);
}

#[test]
fn the_default_identity_is_served_everywhere() {
    let imds = FakeImds::start();
    let id = Identity::default();
    assert_eq!(imds.identity(), id, "the harness and the fake agree");
    let token = imds.token(60);
    for (p, want) in [
        (path::INSTANCE_ID, &id.instance_id),
        (path::INSTANCE_TYPE, &id.instance_type),
        (path::INSTANCE_LIFE_CYCLE, &id.instance_life_cycle),
        (path::AMI_ID, &id.image_id),
        (path::LOCAL_IPV4, &id.private_ip),
        (path::REGION, &id.region),
        (path::AVAILABILITY_ZONE, &id.availability_zone),
    ] {
        let r = imds.get(p, Some(&token));
        assert_eq!((r.status, &r.body), (200, want), "{p}");
        assert_eq!(r.header("Content-Type"), Some("text/plain"));
    }
    let r = imds.get(path::IDENTITY_DOCUMENT, Some(&token));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    let doc = json(&r.body);
    assert_eq!(doc["instanceId"], id.instance_id.as_str());
    assert_eq!(doc["region"], id.region.as_str());
    assert_eq!(doc["availabilityZone"], id.availability_zone.as_str());
    assert_eq!(doc["instanceType"], id.instance_type.as_str());
    assert_eq!(doc["accountId"], id.account_id.as_str());
    assert_eq!(doc["imageId"], id.image_id.as_str());
    assert_eq!(doc["privateIp"], id.private_ip.as_str());
    assert_eq!(doc["architecture"], id.architecture.as_str());
    assert_eq!(doc["pendingTime"], id.pending_time.as_str());
    assert_eq!(doc["version"], "2017-09-30");
    assert!(doc["kernelId"].is_null() && doc["billingProducts"].is_null());
}

#[test]
fn set_identity_changes_the_items_and_the_document() {
    let imds = FakeImds::start();
    let id = Identity {
        instance_id: "i-0fedcba9876543210".into(),
        region: "eu-west-1".into(),
        availability_zone: "eu-west-1b".into(),
        instance_type: "c7g.xlarge".into(),
        account_id: "210987654321".into(),
        architecture: "arm64".into(),
        instance_life_cycle: "spot".into(),
        ..Identity::default()
    };
    imds.set_identity(&id);
    assert_eq!(imds.identity(), id);
    let token = imds.token(60);
    assert_eq!(imds.get(path::REGION, Some(&token)).body, "eu-west-1");
    assert_eq!(
        imds.get(path::AVAILABILITY_ZONE, Some(&token)).body,
        "eu-west-1b"
    );
    assert_eq!(
        imds.get(path::INSTANCE_LIFE_CYCLE, Some(&token)).body,
        "spot"
    );
    let doc = json(&imds.get(path::IDENTITY_DOCUMENT, Some(&token)).body);
    assert_eq!(doc["instanceId"], "i-0fedcba9876543210");
    assert_eq!(doc["accountId"], "210987654321");
    assert_eq!(doc["architecture"], "arm64");
    assert_eq!(doc["instanceType"], "c7g.xlarge");
}

#[test]
fn spot_instance_action_is_404_until_set_then_json() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    let get = |p| imds.get(p, Some(&token));
    assert_eq!(get(path::SPOT_INSTANCE_ACTION).status, 404);
    assert_eq!(get(path::SPOT_TERMINATION_TIME).status, 404);
    assert_eq!(get("/latest/meta-data/spot/").status, 404);

    imds.set_spot_action(SpotAction::Terminate, "2026-12-02T10:00:00Z");
    let r = get(path::SPOT_INSTANCE_ACTION);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        r#"{"action": "terminate", "time": "2026-12-02T10:00:00Z"}"#
    );
    let r = get(path::SPOT_TERMINATION_TIME);
    assert_eq!((r.status, r.body.as_str()), (200, "2026-12-02T10:00:00Z"));
    let r = get("/latest/meta-data/spot/");
    assert_eq!(r.body, "instance-action\ntermination-time");

    for (action, name) in [
        (SpotAction::Stop, "stop"),
        (SpotAction::Hibernate, "hibernate"),
    ] {
        imds.set_spot_action(action, "2026-12-02T11:00:00Z");
        let v = json(&get(path::SPOT_INSTANCE_ACTION).body);
        assert_eq!(v["action"], name);
        assert_eq!(v["time"], "2026-12-02T11:00:00Z");
        // termination-time is only for a termination.
        assert_eq!(get(path::SPOT_TERMINATION_TIME).status, 404);
    }

    imds.clear_spot_action();
    assert_eq!(get(path::SPOT_INSTANCE_ACTION).status, 404);
}

#[test]
fn rebalance_recommendation_is_404_until_set_then_json() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    assert_eq!(imds.get(path::REBALANCE, Some(&token)).status, 404);
    imds.set_rebalance("2026-12-02T09:58:00Z");
    let r = imds.get(path::REBALANCE, Some(&token));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, r#"{"noticeTime": "2026-12-02T09:58:00Z"}"#);
    let r = imds.get("/latest/meta-data/events/recommendations/", Some(&token));
    assert_eq!(r.body, "rebalance");
    imds.clear_rebalance();
    assert_eq!(imds.get(path::REBALANCE, Some(&token)).status, 404);
}

#[test]
fn target_lifecycle_state_is_404_outside_an_auto_scaling_group() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    assert_eq!(
        imds.get(path::TARGET_LIFECYCLE_STATE, Some(&token)).status,
        404
    );
    for state in ["InService", "Terminated", "Warmed:Stopped"] {
        imds.set_lifecycle_state(state);
        let r = imds.get(path::TARGET_LIFECYCLE_STATE, Some(&token));
        assert_eq!((r.status, r.body.as_str()), (200, state));
    }
    imds.clear_lifecycle_state();
    assert_eq!(
        imds.get(path::TARGET_LIFECYCLE_STATE, Some(&token)).status,
        404
    );
}

#[test]
fn instance_tags_are_there_only_while_enabled() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    assert_eq!(imds.get(path::TAG_ASG_NAME, Some(&token)).status, 404);
    assert_eq!(imds.get(path::TAGS_INSTANCE, Some(&token)).status, 404);

    imds.set_tags(true, &[]);
    let r = imds.get(path::TAGS_INSTANCE, Some(&token));
    assert_eq!((r.status, r.body.as_str()), (200, ""), "enabled, no tags");

    imds.set_tags(
        true,
        &[
            ("aws:autoscaling:groupName", "workers"),
            ("Name", "worker-1"),
        ],
    );
    let r = imds.get(path::TAG_ASG_NAME, Some(&token));
    assert_eq!((r.status, r.body.as_str()), (200, "workers"));
    let r = imds.get(path::TAGS_INSTANCE, Some(&token));
    assert_eq!(r.body, "Name\naws:autoscaling:groupName");

    imds.set_tags(false, &[("aws:autoscaling:groupName", "workers")]);
    assert_eq!(imds.get(path::TAG_ASG_NAME, Some(&token)).status, 404);
}

#[test]
fn unknown_paths_are_404_and_directories_list_their_entries() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    for p in [
        "/latest/meta-data/no-such-item",
        "/latest/meta-data/placement/nope",
        "/latest/dynamic/nope",
        "/nope",
    ] {
        let r = imds.get(p, Some(&token));
        assert_eq!(r.status, 404, "{p}: {r:?}");
        assert!(r.body.contains("404 - Not Found"));
    }
    let r = imds.get(path::META_DATA, Some(&token));
    assert_eq!(r.status, 200);
    let names: Vec<&str> = r.body.lines().collect();
    for want in ["instance-id", "placement/", "instance-life-cycle"] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert!(
        !names.contains(&"spot/"),
        "no spot/ before a notice: {names:?}"
    );
    let r = imds.get("/latest/meta-data/placement", Some(&token));
    assert_eq!(r.body, "availability-zone\nregion");
    // A query string is not part of the path.
    let r = imds.get("/latest/meta-data/instance-id?x=1", Some(&token));
    assert_eq!(r.status, 200);
}

#[test]
fn head_is_served_and_other_methods_on_metadata_are_405() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    let r = imds.request("HEAD", path::INSTANCE_ID, &[(TOKEN_HEADER, &token)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "");
    assert_eq!(
        r.header("Content-Length"),
        Some(Identity::default().instance_id.len().to_string().as_str())
    );
    let r = imds.request("POST", path::INSTANCE_ID, &[(TOKEN_HEADER, &token)]);
    assert_eq!(r.status, 405);
}

#[test]
fn optional_http_tokens_serve_imdsv1_requests_and_count_them() {
    let imds = FakeImds::start();
    imds.set_http_tokens(HttpTokens::Optional);
    let r = imds.get(path::INSTANCE_ID, None);
    assert_eq!(r.status, 200);
    // A bad token is refused even then.
    assert_eq!(imds.get(path::INSTANCE_ID, Some("AQAEAbogus")).status, 401);
    imds.set_http_tokens(HttpTokens::Required);
    assert_eq!(imds.get(path::INSTANCE_ID, None).status, 401);
    let stats = imds.stats();
    assert_eq!((stats.no_token, stats.bad_token), (2, 1));
}

#[test]
fn a_disabled_endpoint_answers_403() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.set_endpoint_enabled(false);
    assert_eq!(
        imds.request("PUT", path::TOKEN, &[(TTL_HEADER, "60")])
            .status,
        403
    );
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 403);
    imds.set_endpoint_enabled(true);
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 200);
}

#[test]
fn a_status_fault_answers_that_status_on_its_path_only() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(path::SPOT_INSTANCE_ACTION, Fault::Status(500));
    assert_eq!(
        imds.get(path::SPOT_INSTANCE_ACTION, Some(&token)).status,
        500
    );
    // The fault comes before the token check: the service itself is sick.
    assert_eq!(imds.get(path::SPOT_INSTANCE_ACTION, None).status, 500);
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 200);
    imds.fault(path::SPOT_INSTANCE_ACTION, Fault::Status(429));
    assert_eq!(
        imds.get(path::SPOT_INSTANCE_ACTION, Some(&token)).status,
        429,
        "a new fault on a path replaces the old"
    );
    imds.clear_fault(path::SPOT_INSTANCE_ACTION);
    assert_eq!(
        imds.get(path::SPOT_INSTANCE_ACTION, Some(&token)).status,
        404
    );
    let stats = imds.stats();
    assert_eq!(stats.faulted("status"), 3);
    assert_eq!(stats.with_status(500), 2);
}

#[test]
fn a_token_endpoint_fault_leaves_metadata_alone() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(path::TOKEN, Fault::Status(503));
    let r = imds.request("PUT", path::TOKEN, &[(TTL_HEADER, "60")]);
    assert_eq!(r.status, 503);
    assert_eq!(r.header(TTL_HEADER), None);
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 200);

    imds.fault(path::TOKEN, Fault::Hang);
    let err = imds
        .request_within("PUT", path::TOKEN, &[(TTL_HEADER, "60")], SHORT)
        .expect_err("a hung token request");
    assert!(is_timeout(err.kind()), "{err:?}");
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 200);
    imds.clear_faults();
    imds.token(60);
    assert_eq!(imds.stats().tokens_issued, 2);
}

#[test]
fn a_fault_on_all_paths_spares_only_the_control_api() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(ALL, Fault::Status(500));
    assert_eq!(
        imds.request("PUT", path::TOKEN, &[(TTL_HEADER, "60")])
            .status,
        500
    );
    for p in [path::INSTANCE_ID, path::IDENTITY_DOCUMENT, "/nope"] {
        assert_eq!(imds.get(p, Some(&token)).status, 500, "{p}");
    }
    // The control API still works (and is not counted).
    assert_eq!(imds.stats().faulted("status"), 4);
    imds.clear_faults();
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 200);
}

#[test]
fn the_most_specific_fault_applies() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(ALL, Fault::Status(500));
    imds.fault("/latest/meta-data/placement/*", Fault::Status(503));
    imds.fault(path::REGION, Fault::Status(429));
    let status = |p| imds.get(p, Some(&token)).status;
    assert_eq!(status(path::REGION), 429);
    assert_eq!(status(path::AVAILABILITY_ZONE), 503);
    assert_eq!(status(path::INSTANCE_ID), 500);
    imds.clear_fault(path::REGION);
    assert_eq!(status(path::REGION), 503);
}

#[test]
fn a_fault_with_a_count_applies_to_the_next_requests_only() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault_times(path::INSTANCE_ID, Fault::Status(500), 2);
    let statuses: Vec<u16> = (0..4)
        .map(|_| imds.get(path::INSTANCE_ID, Some(&token)).status)
        .collect();
    assert_eq!(statuses, [500, 500, 200, 200]);
}

#[test]
fn a_hang_holds_the_request_unanswered_until_cleared() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(path::SPOT_INSTANCE_ACTION, Fault::Hang);
    let err = imds
        .request_within(
            "GET",
            path::SPOT_INSTANCE_ACTION,
            &[(TOKEN_HEADER, &token)],
            SHORT,
        )
        .expect_err("a hung request times out on the client");
    assert!(is_timeout(err.kind()), "{err:?}");
    // Other paths answer meanwhile.
    assert_eq!(imds.get(path::INSTANCE_ID, Some(&token)).status, 200);

    // A request hung with a patient client: clearing the fault closes its
    // connection, still without an answer.
    let port = imds.port();
    let t = token.clone();
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let r = batchly_e2e::imds::request(
            port,
            "GET",
            path::SPOT_INSTANCE_ACTION,
            &[(TOKEN_HEADER, &t)],
            b"",
            LONG,
        );
        (r, started.elapsed())
    });
    imds.wait_stats("the second hung request", |s| s.faulted("hang") == 2);
    imds.clear_faults();
    let (r, took) = waiter.join().expect("the waiting client");
    let err = r.expect_err("a released hang answers nothing");
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err:?}");
    assert!(took < LONG, "released after {took:?}");
    assert_eq!(
        imds.get(path::SPOT_INSTANCE_ACTION, Some(&token)).status,
        404
    );
    let stats = imds.stats();
    let hung: Vec<_> = stats
        .log
        .iter()
        .filter(|e| e.fault.as_deref() == Some("hang"))
        .collect();
    assert_eq!(hung.len(), 2);
    assert!(hung.iter().all(|e| e.status.is_none()), "{hung:#?}");
}

#[test]
fn a_timed_hang_closes_the_connection_unanswered() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(path::REBALANCE, Fault::HangFor(SHORT));
    let started = Instant::now();
    let err = imds
        .request_within("GET", path::REBALANCE, &[(TOKEN_HEADER, &token)], LONG)
        .expect_err("a timed hang answers nothing");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err:?}");
    assert!(took >= SHORT && took < LONG, "closed after {took:?}");
}

#[test]
fn a_reset_fault_is_a_connection_error() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(path::INSTANCE_ID, Fault::Reset);
    let err = imds
        .request_within("GET", path::INSTANCE_ID, &[(TOKEN_HEADER, &token)], LONG)
        .expect_err("a reset answers nothing");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err:?}");
    // On the token endpoint too.
    imds.fault(path::TOKEN, Fault::Reset);
    let err = imds
        .request_within("PUT", path::TOKEN, &[(TTL_HEADER, "60")], LONG)
        .expect_err("a reset answers nothing");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err:?}");
    assert_eq!(imds.stats().faulted("reset"), 2);
}

#[test]
fn a_delay_fault_answers_late_but_as_usual() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.fault(path::INSTANCE_ID, Fault::Delay(SHORT));
    let started = Instant::now();
    let r = imds.get(path::INSTANCE_ID, Some(&token));
    let took = started.elapsed();
    assert_eq!((r.status, r.body.as_str()), (200, "i-0123456789abcdef0"));
    assert!(took >= SHORT, "answered after {took:?}");
    // A delayed request still needs its token.
    assert_eq!(imds.get(path::INSTANCE_ID, None).status, 401);
    assert_eq!(imds.stats().faulted("delay"), 2);
}

#[test]
fn stats_count_paths_methods_statuses_and_keep_a_log() {
    let imds = FakeImds::start();
    let token = imds.token(300);
    imds.get(path::INSTANCE_ID, Some(&token));
    imds.get(path::INSTANCE_ID, Some(&token));
    imds.get(path::SPOT_INSTANCE_ACTION, Some(&token));
    imds.get(path::REGION, None);
    imds.request("GET", path::TOKEN, &[]);
    let stats = imds.stats();
    assert_eq!(
        stats.total, 6,
        "control requests are not counted: {stats:#?}"
    );
    assert_eq!(stats.on_path(path::TOKEN), 2);
    assert_eq!(stats.on_path(path::INSTANCE_ID), 2);
    assert_eq!(stats.on_path(path::SPOT_INSTANCE_ACTION), 1);
    assert_eq!(stats.on_path(path::REGION), 1);
    assert_eq!((stats.with_method("PUT"), stats.with_method("GET")), (1, 5));
    assert_eq!(
        stats.by_status.clone().into_iter().collect::<Vec<_>>(),
        [(200, 3), (401, 1), (404, 1), (405, 1)]
    );
    assert_eq!((stats.v2, stats.no_token, stats.bad_token), (3, 1, 0));
    assert_eq!(stats.tokens_issued, 1);
    let log: Vec<(&str, &str, Option<u16>)> = stats
        .log
        .iter()
        .map(|e| (e.method.as_str(), e.path.as_str(), e.status))
        .collect();
    assert_eq!(
        log,
        [
            ("PUT", path::TOKEN, Some(200)),
            ("GET", path::INSTANCE_ID, Some(200)),
            ("GET", path::INSTANCE_ID, Some(200)),
            ("GET", path::SPOT_INSTANCE_ACTION, Some(404)),
            ("GET", path::REGION, Some(401)),
            ("GET", path::TOKEN, Some(405)),
        ]
    );
    assert_eq!(stats.log[0].ttl.as_deref(), Some("300"));
    assert!(stats.log.windows(2).all(|w| w[0].time <= w[1].time));
    let now = UNIX_EPOCH
        .elapsed()
        .expect("clock after 1970")
        .as_secs_f64();
    assert!((now - stats.log[0].time).abs() < 60.0);

    imds.reset_stats();
    let stats = imds.stats();
    assert_eq!((stats.total, stats.log.len()), (0, 0));
    assert_eq!(
        imds.get(path::INSTANCE_ID, Some(&token)).status,
        200,
        "a stats reset keeps the tokens"
    );
}

#[test]
fn reset_restores_the_state_at_start() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    imds.set_spot_action(SpotAction::Terminate, "2026-12-02T10:00:00Z");
    imds.set_rebalance("2026-12-02T09:58:00Z");
    imds.set_lifecycle_state("Terminated");
    imds.set_tags(true, &[("aws:autoscaling:groupName", "workers")]);
    imds.set_identity(&Identity {
        region: "eu-west-1".into(),
        ..Identity::default()
    });
    imds.fault(path::REGION, Fault::Status(500));
    imds.reset();
    assert_eq!(imds.identity(), Identity::default());
    assert_eq!(
        imds.get(path::INSTANCE_ID, Some(&token)).status,
        401,
        "tokens go too"
    );
    let token = imds.token(60);
    for p in [
        path::SPOT_INSTANCE_ACTION,
        path::REBALANCE,
        path::TARGET_LIFECYCLE_STATE,
        path::TAG_ASG_NAME,
    ] {
        assert_eq!(imds.get(p, Some(&token)).status, 404, "{p}");
    }
    assert_eq!(imds.get(path::REGION, Some(&token)).body, "us-east-1");
    assert_eq!(imds.stats().total, 7, "the stats went with the reset");
}

#[test]
fn the_control_api_refuses_what_it_does_not_know() {
    let imds = FakeImds::start();
    for (route, body) in [
        ("spot", r#"{"action": "explode", "time": "x"}"#),
        ("identity", r#"{"instance_id": "i-1"}"#),
        ("fault", r#"{"path": "*", "mode": "sulk"}"#),
        ("fault", r#"{"path": "/__fake/stats", "mode": "reset"}"#),
        ("nope", "{}"),
        ("lifecycle", "{}"),
        ("tags", "[1]"),
    ] {
        let target = format!("/__fake/{route}");
        let r =
            batchly_e2e::imds::request(imds.port(), "POST", &target, &[], body.as_bytes(), LONG)
                .expect("an answer");
        assert_eq!(r.status, 400, "{route} {body}: {r:?}");
        assert!(json(&r.body)["error"].is_string(), "{r:?}");
    }
}

#[test]
fn several_requests_share_one_keep_alive_connection() {
    let imds = FakeImds::start();
    let token = imds.token(60);
    let mut s = TcpStream::connect(("127.0.0.1", imds.port())).expect("connecting");
    s.set_read_timeout(Some(LONG)).expect("a read timeout");
    let mut answers = String::new();
    for p in [path::INSTANCE_ID, path::REGION] {
        let req = format!("GET {p} HTTP/1.1\r\nHost: x\r\n{TOKEN_HEADER}: {token}\r\n\r\n");
        s.write_all(req.as_bytes()).expect("sending");
        // Read this answer whole (head and body) before the next request.
        let want = match p {
            path::INSTANCE_ID => "i-0123456789abcdef0",
            _ => "us-east-1",
        };
        let mut buf = [0u8; 4096];
        let mut got = String::new();
        while !got.ends_with(want) {
            let n = s.read(&mut buf).expect("reading an answer");
            assert!(n > 0, "the fake closed a keep-alive connection: {got:?}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
        answers.push_str(&got);
    }
    assert_eq!(imds.stats().v2, 2, "{answers}");
}

#[test]
fn dropping_the_fake_stops_it() {
    let imds = FakeImds::start();
    let pid = imds.pid() as i32;
    let port = imds.port();
    assert!(pid_alive(pid));
    drop(imds);
    assert!(!pid_alive(pid));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn imds_time_writes_utc_seconds() {
    let at = |s: u64| imds_time(UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(at(1_796_192_964), "2026-12-02T06:29:24Z");
}
