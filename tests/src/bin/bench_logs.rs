//! Log shipping throughput: a child prints `--mib` MiB of lines into a
//! pipe, and the agent's log path (capture into the spool, then the
//! shipper's `PutLogEvents`) takes all of it to a fast local CloudWatch
//! Logs endpoint (this program re-run with `--serve`, so its CPU is not
//! the agent's). Next to it, measured in the same run: the raw rate of
//! reading the same output from the pipe and discarding it. Prints MB/s,
//! lines/s, the ratio of the two, and the agent's CPU per MB and per
//! 10,000 lines (Fluent Bit is published at about 0.19 vCPU for 10,000
//! lines/s to CloudWatch). Informative: it fails only if a byte is lost.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use batchly_agent::supervisor::output::capture;
use batchly_agent::telemetry::logs::ship::{Shipper, Target};
use batchly_agent::telemetry::logs::{Spool, SpoolSettings};

/// One output line: about what a chatty job prints.
const LINE: &str = "2026-12-02 10:00:00 INFO worker processed item with some detail here";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        serve();
        return;
    }
    let mib: u64 = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let bytes = mib << 20;
    let lines = bytes / (LINE.len() as u64 + 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // The endpoint, in a process of its own.
    let mut server = Command::new(std::env::current_exe().expect("self"))
        .arg("--serve")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the endpoint");
    let mut port = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut port)
        .expect("the endpoint's port");
    let endpoint = format!("http://127.0.0.1:{}", port.trim());

    let (pipe_s, pipe_cpu) = rt.block_on(async {
        let cpu = cpu_time();
        let started = Instant::now();
        let mut child = printer(lines);
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        use tokio::io::AsyncReadExt;
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        let _ = child.wait().await;
        assert_eq!(got, lines * (LINE.len() as u64 + 1), "the pipe lost bytes");
        (started.elapsed(), cpu_time() - cpu)
    });

    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(SpoolSettings {
        dir: tmp.path().to_path_buf(),
        max_bytes: 1 << 40,
        ship: true,
    })
    .expect("spool");
    let (ship_s, ship_cpu, shipped) = rt.block_on(async {
        let client = logs_client(&endpoint);
        let shipper = Shipper::new(
            spool.clone(),
            client,
            Target {
                group: "/bench".into(),
                instance: batchly_agent::imds::InstanceId::fixed("i-bench"),
            },
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let shipping = tokio::spawn(shipper.run(stop.clone()));
        let cpu = cpu_time();
        let started = Instant::now();
        let mut child = printer(lines);
        let writer = spool.stream("bench.m1.1", u64::MAX);
        capture(
            child.stdout.take(),
            None::<tokio::process::ChildStdout>,
            writer,
            Default::default(),
        )
        .await
        .expect("handed off");
        let _ = child.wait().await;
        let deadline = Instant::now() + Duration::from_secs(600);
        while !spool.is_drained() {
            assert!(Instant::now() < deadline, "not shipped in 10 minutes");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        let cpu = cpu_time() - cpu;
        stop.cancel();
        let _ = shipping.await;
        let shipped = spool
            .counters()
            .shipped_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        (took, cpu, shipped)
    });
    let _ = server.kill();
    let _ = server.wait();
    assert!(spool.is_drained(), "everything shipped");

    let mb = bytes as f64 / 1e6;
    let rate = |d: Duration| mb / d.as_secs_f64();
    let lps = |d: Duration| lines as f64 / d.as_secs_f64();
    println!(
        "bench logs: {mib} MiB, {lines} lines of {} bytes",
        LINE.len() + 1
    );
    println!(
        "  pipe read (baseline): {:8.1} MB/s {:10.0} lines/s, {:6.2} ms CPU per MB",
        rate(pipe_s),
        lps(pipe_s),
        pipe_cpu.as_secs_f64() * 1e3 / mb
    );
    println!(
        "  capture+spool+ship:   {:8.1} MB/s {:10.0} lines/s, {:6.2} ms CPU per MB, {:.1} ms CPU per 10,000 lines (Fluent Bit ~190)",
        rate(ship_s),
        lps(ship_s),
        ship_cpu.as_secs_f64() * 1e3 / mb,
        ship_cpu.as_secs_f64() * 1e3 * 10_000.0 / lines as f64
    );
    println!(
        "  ratio shipped/pipe: {:.2} (aim >= 0.5); shipped {} bytes of spool lines",
        pipe_s.as_secs_f64() / ship_s.as_secs_f64(),
        shipped
    );
}

/// A child printing `lines` copies of `LINE`.
fn printer(lines: u64) -> tokio::process::Child {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("yes '{LINE}' | head -n {lines}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("the printer")
}

/// This process's CPU time, user and system.
fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

fn logs_client(endpoint: &str) -> aws_sdk_cloudwatchlogs::Client {
    use aws_sdk_cloudwatchlogs::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_cloudwatchlogs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .endpoint_url(endpoint)
        .retry_config(aws_sdk_cloudwatchlogs::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_cloudwatchlogs::Client::from_conf(conf)
}

/// The endpoint: answers every request `{}` (what CreateLogStream and a
/// fully accepted PutLogEvents return), keep-alive, one thread per
/// connection.
fn serve() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    println!("{port}");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || answer(conn));
    }
}

fn answer(conn: std::net::TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let reply = "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: bench\r\nContent-Length: 2\r\n\r\n{}";
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}
