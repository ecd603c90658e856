//! The agent's CloudWatch metrics against a local CloudWatch (moto): job
//! counts, durations and slots published by `telemetry::metrics::Publisher`
//! and read back with `GetMetricStatistics` and `ListMetrics`, the
//! dimensions as configured, and what happens when CloudWatch is away or
//! refuses a request. The local listener's `/metrics` is read by a real
//! Prometheus parser (the Python `prometheus_client` in the test venv).
//!
//! moto takes `Value`, `Values`/`Counts` (it stores each counted value as
//! a single one) and dimensions as sent; it checks no limit of
//! `PutMetricData`, so the limits are asserted on what the test proxy saw.
//! Its `GetMetricStatistics` matches dimensions as a subset, not exactly as
//! CloudWatch does, so exact dimension sets are checked with `ListMetrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Statistic};
use batchly_agent::envelope::RejectReason;
use batchly_agent::events::EventType;
use batchly_agent::telemetry::http::{self, Health};
use batchly_agent::telemetry::metrics::{
    JobEnded, Metrics, MetricsSettings, Reason, MAX_DATA_PER_REQUEST, MAX_VALUES_PER_DATUM,
};
use batchly_agent::telemetry::{Flush, Flushed};
use batchly_e2e::eventually;
use batchly_e2e::sqs::proxy::{Fault, Proxy};
use batchly_e2e::sqs::{python_bin, Moto, LONG_WAIT};

/// Short, so the periodic publisher sends within the test's patience.
const INTERVAL: Duration = Duration::from_millis(200);
const GROUP: &str = "workers-e2e";
const INSTANCE: &str = "i-0e2e0e2e0e2e0e2e0";
/// What a flush that must succeed may take: generous, moto is slow on two
/// busy cores.
const FLUSH_BUDGET: Duration = Duration::from_secs(60);
/// A flush against an endpoint that is away: long enough for a few retries.
const FLUSH_WHILE_DOWN: Duration = Duration::from_secs(2);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the publisher")
}

/// A CloudWatch client of `endpoint` built like the agent's: the SDK's own
/// retries off (the publisher has the agent's retry policy), bounded calls.
fn cloudwatch(endpoint: &str) -> aws_sdk_cloudwatch::Client {
    use aws_sdk_cloudwatch::config::{
        retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Credentials, Region,
    };
    let conf = aws_sdk_cloudwatch::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "batchly-e2e",
        ))
        .endpoint_url(endpoint)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .build();
    aws_sdk_cloudwatch::Client::from_conf(conf)
}

fn settings(namespace: &str) -> MetricsSettings {
    MetricsSettings {
        namespace: namespace.to_string(),
        interval: INTERVAL,
        instance_dimension: false,
        tag_dimensions: vec!["team".to_string()],
        group: None,
        instance_id: INSTANCE.to_string(),
        disk_path: PathBuf::from("/"),
    }
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Three successes and two OOMs on `jobs` (team risk), one rejection
/// without a team: durations 1.2 s, 3.4 s, 0.8 s, 5 s, 2 s.
fn report_jobs(metrics: &Metrics) {
    let risk = tags(&[("team", "risk"), ("owner", "ana")]);
    for ms in [1_200, 3_400, 800] {
        metrics.job_ended(&JobEnded {
            queue: "jobs",
            outcome: EventType::Succeeded,
            reason: Reason::Completed,
            duration: Some(Duration::from_millis(ms)),
            queue_wait: Some(Duration::from_millis(50)),
            tags: &risk,
        });
    }
    for ms in [5_000, 2_000] {
        metrics.job_ended(&JobEnded {
            queue: "jobs",
            outcome: EventType::Failed,
            reason: Reason::Oom,
            duration: Some(Duration::from_millis(ms)),
            queue_wait: None,
            tags: &risk,
        });
    }
    metrics.job_ended(&JobEnded {
        queue: "jobs",
        outcome: EventType::Rejected,
        reason: Reason::Rejected(RejectReason::BadSignature),
        duration: None,
        queue_wait: None,
        tags: &tags(&[("owner", "bo")]),
    });
    metrics.slots(4, 3);
    metrics.sqs_error("jobs");
}

/// Sum, sample count, minimum and maximum of one metric with exactly these
/// dimensions (as far as moto matches), over the last and next hour.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    sum: f64,
    count: f64,
    min: f64,
    max: f64,
}

fn stats(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_cloudwatch::Client,
    namespace: &str,
    name: &str,
    dimensions: &[(&str, &str)],
) -> Option<Stats> {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let mut request = client
        .get_metric_statistics()
        .namespace(namespace)
        .metric_name(name)
        .start_time(DateTime::from(now - hour))
        .end_time(DateTime::from(now + hour))
        .period(3600)
        .statistics(Statistic::Sum)
        .statistics(Statistic::SampleCount)
        .statistics(Statistic::Minimum)
        .statistics(Statistic::Maximum);
    for (n, v) in dimensions {
        request = request.dimensions(Dimension::builder().name(*n).value(*v).build());
    }
    let out = rt
        .block_on(request.send())
        .unwrap_or_else(|e| panic!("GetMetricStatistics {name}: {e:?}"));
    let points = out.datapoints();
    if points.is_empty() {
        return None;
    }
    Some(Stats {
        sum: points.iter().filter_map(|p| p.sum()).sum(),
        count: points.iter().filter_map(|p| p.sample_count()).sum(),
        min: points
            .iter()
            .filter_map(|p| p.minimum())
            .fold(f64::INFINITY, f64::min),
        max: points
            .iter()
            .filter_map(|p| p.maximum())
            .fold(f64::NEG_INFINITY, f64::max),
    })
}

/// Every metric of `namespace` with its exact dimension set.
fn list_metrics(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_cloudwatch::Client,
    namespace: &str,
) -> Vec<(String, BTreeSet<(String, String)>)> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let out = rt
            .block_on(
                client
                    .list_metrics()
                    .namespace(namespace)
                    .set_next_token(token.clone())
                    .send(),
            )
            .unwrap_or_else(|e| panic!("ListMetrics: {e:?}"));
        for metric in out.metrics() {
            let dims = metric
                .dimensions()
                .iter()
                .map(|d| {
                    (
                        d.name().unwrap_or_default().to_string(),
                        d.value().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            all.push((metric.metric_name().unwrap_or_default().to_string(), dims));
        }
        token = out.next_token().map(str::to_string);
        if token.is_none() {
            return all;
        }
    }
}

fn flush(rt: &tokio::runtime::Runtime, what: &dyn Flush, budget: Duration) -> Flushed {
    rt.block_on(what.flush(std::time::Instant::now() + budget))
}

fn pair(n: &str, v: &str) -> (String, String) {
    (n.to_string(), v.to_string())
}

#[test]
fn job_counts_durations_and_slots_reach_cloudwatch_aggregated_per_interval() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port());
    let client = cloudwatch(&moto.endpoint());
    let rt = runtime();
    let namespace = "Batchly/E2E";
    let metrics = Metrics::new(MetricsSettings {
        group: Some(GROUP.to_string()),
        ..settings(namespace)
    });
    report_jobs(&metrics);
    let publisher = metrics.publisher(cloudwatch(&proxy.endpoint()));
    // A `CancellationToken`, its type taken from `run` (this crate does not
    // depend on tokio-util itself).
    let stop = Default::default();
    let running = rt.spawn(publisher.clone().run(Clone::clone(&stop)));

    let group = ("AutoScalingGroupName", GROUP);
    let succeeded = [
        group,
        ("Queue", "jobs"),
        ("Outcome", "succeeded"),
        ("Reason", "completed"),
        ("team", "risk"),
    ];
    eventually(
        "the first interval's job counts in CloudWatch",
        LONG_WAIT,
        || stats(&rt, &client, namespace, "Jobs", &succeeded).is_some(),
        || moto.log_tail(),
    );
    // Later intervals carry the gauges again; wait for a second one.
    eventually(
        "a second interval",
        LONG_WAIT,
        || stats(&rt, &client, namespace, "JobSlots", &[group]).is_some_and(|s| s.count >= 2.0),
        || moto.log_tail(),
    );
    stop.cancel();
    rt.block_on(running)
        .expect("the publisher stops at its token");

    let sum_of = |name: &str, dims: &[(&str, &str)]| stats(&rt, &client, namespace, name, dims);
    assert_eq!(sum_of("Jobs", &succeeded).map(|s| s.sum), Some(3.0));
    let oom = [
        group,
        ("Queue", "jobs"),
        ("Outcome", "failed"),
        ("Reason", "oom"),
        ("team", "risk"),
    ];
    assert_eq!(sum_of("Jobs", &oom).map(|s| s.sum), Some(2.0));
    let rejected = [
        group,
        ("Queue", "jobs"),
        ("Outcome", "rejected"),
        ("Reason", "bad_signature"),
    ];
    assert_eq!(sum_of("Jobs", &rejected).map(|s| s.sum), Some(1.0));
    assert_eq!(
        sum_of("JobDuration", &[group, ("Queue", "jobs"), ("team", "risk")]),
        Some(Stats {
            sum: 12_400.0,
            count: 5.0,
            min: 800.0,
            max: 5_000.0
        }),
        "one distribution for five jobs: count, sum and extremes as reported"
    );
    assert_eq!(
        sum_of("QueueWait", &[group, ("Queue", "jobs"), ("team", "risk")])
            .map(|s| (s.sum, s.count)),
        Some((150.0, 3.0))
    );
    for (name, value) in [("JobSlots", 4.0), ("RunningJobs", 3.0), ("FreeSlots", 1.0)] {
        let got = sum_of(name, &[group]);
        assert_eq!(got.map(|s| (s.min, s.max)), Some((value, value)), "{name}");
    }
    assert_eq!(
        sum_of("SqsErrors", &[group, ("Queue", "jobs")]).map(|s| s.sum),
        Some(1.0)
    );
    for host in ["CpuUtilization", "MemoryUtilization", "DiskUtilization"] {
        let got = sum_of(host, &[group]);
        assert!(
            got.is_some_and(|s| (0.0..=100.0).contains(&s.min) && (0.0..=100.0).contains(&s.max)),
            "{host}: {got:?}"
        );
    }

    // Dimensions exactly as configured: the group everywhere, no InstanceId,
    // `team` only where a job had it, never the unconfigured `owner`.
    let listed = list_metrics(&rt, &client, namespace);
    assert!(!listed.is_empty());
    for (name, dims) in &listed {
        assert!(
            dims.contains(&pair("AutoScalingGroupName", GROUP)),
            "{name} {dims:?}"
        );
        assert!(
            dims.iter().all(|(n, _)| n != "InstanceId" && n != "owner"),
            "{name} {dims:?}"
        );
    }
    let rejected_dims: BTreeSet<(String, String)> =
        rejected.iter().map(|(n, v)| pair(n, v)).collect();
    assert!(
        listed.contains(&("Jobs".to_string(), rejected_dims)),
        "the rejection counted without a team dimension: {listed:?}"
    );

    // What CloudWatch received: every request within the limits, and the
    // first interval's job data in one request.
    let requests = proxy.query_requests("PutMetricData");
    assert!(requests.len() >= 2, "{}", requests.len());
    for request in &requests {
        assert_eq!(request.param("Namespace"), Some(namespace));
        let names = request
            .params
            .keys()
            .filter(|k| k.ends_with(".MetricName"))
            .count();
        assert!((1..=MAX_DATA_PER_REQUEST).contains(&names), "{names}");
        let most_values = request
            .params
            .keys()
            .filter_map(|k| k.split_once(".Values.member.").map(|(datum, _)| datum))
            .fold(BTreeMap::<&str, usize>::new(), |mut per, datum| {
                *per.entry(datum).or_default() += 1;
                per
            })
            .into_values()
            .max()
            .unwrap_or(0);
        assert!(most_values <= MAX_VALUES_PER_DATUM, "{most_values}");
    }
    let first = &requests[0];
    let jobs_data = first
        .params
        .iter()
        .filter(|(k, v)| k.ends_with(".MetricName") && v.as_str() == "Jobs")
        .count();
    assert_eq!(
        jobs_data, 3,
        "one datum per outcome and reason, not one per job"
    );
}

#[test]
fn instance_id_is_a_dimension_only_when_opted_in_and_the_group_only_when_known() {
    let moto = Moto::start();
    let client = cloudwatch(&moto.endpoint());
    let rt = runtime();
    for (namespace, opted_in) in [("Batchly/Default", false), ("Batchly/PerInstance", true)] {
        let metrics = Metrics::new(MetricsSettings {
            instance_dimension: opted_in,
            ..settings(namespace)
        });
        report_jobs(&metrics);
        let publisher = metrics.publisher(client.clone());
        let flushed = flush(&rt, &publisher, FLUSH_BUDGET);
        assert!(flushed.shipped > 0 && flushed.left == 0, "{flushed:?}");

        let listed = list_metrics(&rt, &client, namespace);
        let names: BTreeSet<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            BTreeSet::from([
                "FreeSlots",
                "JobDuration",
                "JobSlots",
                "Jobs",
                "QueueWait",
                "RunningJobs",
                "SqsErrors"
            ]),
            "a flush has no time for a host sample"
        );
        for (name, dims) in &listed {
            let instance = dims.contains(&pair("InstanceId", INSTANCE));
            assert_eq!(instance, opted_in, "{namespace} {name} {dims:?}");
            assert!(
                dims.iter().all(|(n, _)| n != "AutoScalingGroupName"),
                "no group known, no group dimension: {name} {dims:?}"
            );
        }
        let slots = listed
            .iter()
            .find(|(n, _)| n == "JobSlots")
            .map(|(_, dims)| dims.len());
        assert_eq!(slots, Some(usize::from(opted_in)), "{namespace}");
    }
}

#[test]
fn unsent_intervals_wait_while_cloudwatch_is_away_and_a_refused_request_is_not_retried() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port());
    let client = cloudwatch(&moto.endpoint());
    let rt = runtime();
    let namespace = "Batchly/Away";
    let metrics = Metrics::new(settings(namespace));
    let publisher = metrics.publisher(cloudwatch(&proxy.endpoint()));
    let succeeded = [
        ("Queue", "jobs"),
        ("Outcome", "succeeded"),
        ("Reason", "completed"),
        ("team", "risk"),
    ];

    proxy.down();
    report_jobs(&metrics);
    let first = flush(&rt, &publisher, FLUSH_WHILE_DOWN);
    assert_eq!(first.shipped, 0, "{first:?}");
    assert!(first.left > 0, "{first:?}");
    report_jobs(&metrics);
    let second = flush(&rt, &publisher, FLUSH_WHILE_DOWN);
    assert_eq!(second.shipped, 0, "{second:?}");
    assert!(
        second.left > first.left,
        "both intervals kept: {first:?} {second:?}"
    );
    proxy.up();
    let back = flush(&rt, &publisher, FLUSH_BUDGET);
    assert_eq!(back.left, 0, "{back:?}");
    assert!(back.shipped >= second.left, "{second:?} then {back:?}");
    assert_eq!(
        stats(&rt, &client, namespace, "Jobs", &succeeded).map(|s| s.sum),
        Some(6.0),
        "both intervals' jobs arrived once each"
    );

    // A permanent error: the request is dropped, never sent again.
    let refused = proxy.inject(
        "PutMetricData",
        None,
        Fault::query_error(400, "InvalidParameterValue", "refused by the test proxy"),
        None,
    );
    report_jobs(&metrics);
    let dropped = flush(&rt, &publisher, FLUSH_BUDGET);
    assert_eq!((dropped.shipped, dropped.left), (0, 0), "{dropped:?}");
    assert_eq!(proxy.hits(&refused), 1, "a permanent error is not retried");
    proxy.clear(refused);
    assert!(
        metrics
            .render_prometheus()
            .lines()
            .any(|l| l.starts_with("batchly_metric_data_refused_total ") && !l.ends_with(" 0")),
        "the refusal is counted"
    );

    // Throttling is retried within the flush's deadline.
    let throttled = proxy.inject(
        "PutMetricData",
        None,
        Fault::query_error(400, "Throttling", "Rate exceeded"),
        Some(2),
    );
    report_jobs(&metrics);
    let retried = flush(&rt, &publisher, FLUSH_BUDGET);
    assert_eq!(retried.left, 0, "{retried:?}");
    assert!(retried.shipped > 0, "{retried:?}");
    assert_eq!(proxy.hits(&throttled), 2);
    assert_eq!(
        stats(&rt, &client, namespace, "Jobs", &succeeded).map(|s| s.sum),
        Some(9.0),
        "the refused interval is lost (and counted), the throttled one arrived"
    );
}

/// One HTTP/1.1 GET; the whole answer (the listener closes after it).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_string(), body.to_string())
}

/// What the Python `prometheus_client` parsers read from a scrape.
struct Parsed {
    /// The OpenMetrics parser (the format served): family name to its type.
    types: BTreeMap<String, String>,
    /// The OpenMetrics parser: `"name{labels as JSON}"` to value.
    samples: BTreeMap<String, f64>,
    /// The same, from the classic text-format parser
    /// (`prometheus_client.parser`).
    classic_samples: BTreeMap<String, f64>,
}

/// Parses `text` with both of `prometheus_client`'s parsers; panics with
/// their error if either refuses it.
fn parse_with_python(text: &str) -> Parsed {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, text).expect("write the scrape");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families as classic
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
text = open(sys.argv[1]).read()
def samples(families):
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families for s in f.samples}
strict = list(openmetrics(text))
print(json.dumps({
    "types": {f.name: f.type for f in strict},
    "samples": samples(strict),
    "classic_samples": samples(classic(text)),
}))
"#;
    let out = Command::new(python_bin())
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "a Python parser refused the text:\n{}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the script's JSON");
    let map = |key: &str| -> BTreeMap<String, serde_json::Value> {
        serde_json::from_value(json[key].clone()).expect("an object")
    };
    let numbers = |key: &str| {
        map(key)
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_f64()?)))
            .collect()
    };
    Parsed {
        types: map("types")
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
            .collect(),
        samples: numbers("samples"),
        classic_samples: numbers("classic_samples"),
    }
}

/// A sample's key in [`Parsed`]: its name and its labels as sorted JSON.
fn sample_key(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    format!(
        "{name}{}",
        serde_json::to_string(&labels).expect("labels as JSON")
    )
    .replace("\":\"", "\": \"")
    .replace("\",\"", "\", \"")
}

#[test]
fn the_local_listener_serves_prometheus_text_a_real_parser_reads_and_health_with_its_reason() {
    let rt = runtime();
    let metrics = Metrics::new(settings("Batchly/Local"));
    report_jobs(&metrics);
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&healthy);
    let health: Health = Arc::new(move || {
        if flag.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("supervisor loop has not made progress for 95s".to_string())
        }
    });
    let listener = rt
        .block_on(http::bind("127.0.0.1:0".parse().expect("address")))
        .expect("binding the listener");
    let addr = listener.local_addr().expect("its address");
    // A `CancellationToken`, its type taken from `serve`.
    let stop = Default::default();
    let server = rt.spawn(http::serve(
        listener,
        metrics.clone(),
        health,
        Clone::clone(&stop),
    ));

    let (status, head, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    let parsed = parse_with_python(&body);
    for (family, kind) in [
        ("batchly_jobs", "counter"),
        ("batchly_job_duration_seconds", "histogram"),
        ("batchly_job_slots", "gauge"),
        ("batchly_sqs_errors", "counter"),
    ] {
        assert_eq!(
            parsed.types.get(family).map(String::as_str),
            Some(kind),
            "{:?}",
            parsed.types
        );
    }
    let jobs = |outcome, reason| {
        sample_key(
            "batchly_jobs_total",
            &[("queue", "jobs"), ("outcome", outcome), ("reason", reason)],
        )
    };
    let queue = [("queue", "jobs")];
    let expected = [
        (jobs("succeeded", "completed"), 3.0),
        (jobs("failed", "oom"), 2.0),
        (jobs("rejected", "bad_signature"), 1.0),
        (
            sample_key("batchly_job_duration_seconds_count", &queue),
            5.0,
        ),
        (sample_key("batchly_job_duration_seconds_sum", &queue), 12.4),
        (
            sample_key("batchly_job_queue_wait_seconds_count", &queue),
            3.0,
        ),
        (sample_key("batchly_job_slots", &[]), 4.0),
        (sample_key("batchly_jobs_running", &[]), 3.0),
        (sample_key("batchly_sqs_errors_total", &queue), 1.0),
    ];
    // The classic parser reads the same samples; it files a counter's
    // `_total` samples under a family of that name rather than under the
    // counter's TYPE line (the text format names samples, OpenMetrics
    // families), so only the samples are compared.
    for samples in [&parsed.samples, &parsed.classic_samples] {
        for (key, value) in &expected {
            let got = samples.get(key).copied();
            assert!(
                got.is_some_and(|got| (got - value).abs() < 1e-9),
                "{key}: {got:?}, expected {value}; parsed {samples:?}"
            );
        }
    }

    let (status, _, body) = http_get(addr, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    healthy.store(false, Ordering::SeqCst);
    let (status, _, body) = http_get(addr, "/healthz");
    assert_eq!(
        (status, body.as_str()),
        (503, "supervisor loop has not made progress for 95s\n")
    );
    assert_eq!(http_get(addr, "/nothing").0, 404);

    stop.cancel();
    rt.block_on(server)
        .expect("the listener stops at its token");
}
