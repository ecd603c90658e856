//! `batchly-agent run` publishing its metrics to CloudWatch (moto) and
//! serving `/metrics` and `/healthz` on `admin.listen`: what the jobs did
//! arrives as counts by queue, outcome and reason, aggregated, without an
//! `InstanceId` by default.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use batchly_e2e::eventually;
use batchly_e2e::sqs::{queue_name, AgentSettings, SqsTest};

const NAMESPACE: &str = "Batchly/Agent";
const ARRIVAL: Duration = Duration::from_secs(90);

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to admin.listen");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn job_outcomes_reach_cloudwatch_by_queue_outcome_and_reason_and_the_local_endpoints() {
    let t = SqsTest::start();
    let q = t.job_queue("jobs");
    let port = free_port();
    let agent = t.agent(
        AgentSettings::new(&q.url)
            .extra("metrics.interval_s", "1")
            .extra("admin.listen", &format!("\"127.0.0.1:{port}\"")),
    );
    let good = t.submit(&q.url, &["--id", "good", "--count", "3", "--", "true"]);
    let bad = t.submit(
        &q.url,
        &[
            "--id",
            "bad",
            "--count",
            "2",
            "--max-attempts",
            "1",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
    );
    let all: Vec<_> = good.iter().chain(&bad).cloned().collect();
    t.wait_events("every job's end", &[&agent], |ev| {
        all.iter().all(|j| {
            ev.iter()
                .any(|e| e.job_id.as_deref() == Some(j.job_id.as_str()) && e.is_final)
        })
    });
    let queue = queue_name(&q.url);
    let jobs = |outcome: &str, reason: &str| {
        t.aws.metric_sum(
            NAMESPACE,
            "Jobs",
            &[("Queue", queue), ("Outcome", outcome), ("Reason", reason)],
        )
    };
    eventually(
        "the job counts in CloudWatch",
        ARRIVAL,
        || jobs("succeeded", "completed") == Some(3.0) && jobs("failed", "exit") == Some(2.0),
        || {
            format!(
                "succeeded {:?}, failed {:?}\n{}",
                jobs("succeeded", "completed"),
                jobs("failed", "exit"),
                agent.diagnostics()
            )
        },
    );
    let slots = t.aws.metric_sum(NAMESPACE, "JobSlots", &[]);
    assert!(slots.is_some_and(|s| s > 0.0), "slots published: {slots:?}");
    for dims in t.aws.metric_dimension_names(NAMESPACE, "Jobs") {
        assert!(!dims.iter().any(|d| d == "InstanceId"), "{dims:?}");
    }

    let (status, text) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{text}");
    let succeeded = text.lines().find(|l| {
        l.starts_with("batchly_jobs_total{")
            && l.contains("outcome=\"succeeded\"")
            && l.contains(&format!("queue=\"{queue}\""))
    });
    assert!(
        succeeded.is_some_and(|l| l.ends_with(" 3")),
        "the succeeded count in /metrics: {succeeded:?}\n{text}"
    );
    let (status, body) = http_get(port, "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
}
