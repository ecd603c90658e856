//! Jobs against the sandbox: each test is an attack a job could try, run
//! through the real agent (`dev` as root, so the full sandbox applies), and
//! asserts that the attack fails and that the agent and the other jobs are
//! unharmed. The jobs report what they saw as `name=value` lines in their
//! log; the tests read them from there.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;

use batchly_e2e::{pid_alive, read_job_log, read_pid_file, read_text, wait_gone, DevAgent, Event};

/// The harness's `jobs.max_concurrent` and the default `sandbox.uid_range`.
const SLOTS: u32 = 4;
const FIRST_UID: u32 = 1_900_000_000;

/// Runs `script` (sh) as job `id` and returns its final event and what it
/// printed, as `name=value` pairs (other lines are kept under their text).
fn run_job(
    agent: &DevAgent,
    id: &str,
    env: &[&str],
    script: &str,
) -> (Event, BTreeMap<String, String>, String) {
    let mut args = vec!["--id", id, "--max-attempts", "1"];
    for e in env {
        args.extend(["--env", e]);
    }
    args.extend(["--", "sh", "-c", script]);
    let job = agent.submit_one(&args);
    let end = agent.wait_final(&job.message_id);
    let log = end
        .log_stream
        .as_ref()
        .map(|s| read_job_log(&agent.dir().join("logs").join(s)))
        .unwrap_or_default();
    let seen = log
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (end, seen, log)
}

/// `name=ok` if `cmd` succeeds, `name=fails` if not (its output dropped).
fn probe(name: &str, cmd: &str) -> String {
    format!("if {cmd} >/dev/null 2>&1; then echo {name}=ok; else echo {name}=fails; fi\n")
}

fn field<'a>(seen: &'a BTreeMap<String, String>, name: &str, log: &str) -> &'a str {
    seen.get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("the job did not report {name}; its log:\n{log}"))
}

#[test]
fn a_job_runs_as_its_slots_uid_with_no_privilege_and_nothing_inherited() {
    let agent = DevAgent::start(&[("AWS_SECRET_ACCESS_KEY", "agent-secret")]);
    let script = r#"
echo uid=$(id -u); echo gid=$(id -g); echo groups=$(id -G)
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -d ' \t' | tr ':' '='
echo hostname=$(hostname)
echo oom=$(cat /proc/self/oom_score_adj)
echo core=$(ulimit -c)
echo aws=$(env | grep -c '^AWS_')
echo deadline=$(head -n 1 "$BATCHLY_DEADLINE_FILE")
"#;
    let (end, seen, log) = run_job(&agent, "who-am-i", &[], script);
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    let uid: u32 = field(&seen, "uid", &log).parse().expect("a uid");
    assert!(
        (FIRST_UID..FIRST_UID + SLOTS).contains(&uid),
        "the job runs as a slot uid from sandbox.uid_range, not {uid}\n{log}"
    );
    assert_eq!(field(&seen, "gid", &log), uid.to_string(), "{log}");
    assert_eq!(
        field(&seen, "groups", &log),
        uid.to_string(),
        "no supplementary groups\n{log}"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            field(&seen, set, &log),
            "0000000000000000",
            "{set} is empty\n{log}"
        );
    }
    assert_eq!(field(&seen, "NoNewPrivs", &log), "1", "{log}");
    assert_eq!(
        field(&seen, "Seccomp", &log),
        "2",
        "a seccomp filter is on\n{log}"
    );
    assert_eq!(field(&seen, "hostname", &log), "who-am-i", "{log}");
    assert_eq!(field(&seen, "oom", &log), "0", "{log}");
    assert_eq!(field(&seen, "core", &log), "0", "no core dumps\n{log}");
    assert_eq!(field(&seen, "aws", &log), "0", "no AWS_ variable\n{log}");
    // The harness's jobs.default_timeout_s is the built-in hour: the
    // deadline is an RFC 3339 time about an hour from now, today or after.
    let deadline = field(&seen, "deadline", &log);
    let today = end.raw["at"].as_str().expect("an event time")[..10].to_string();
    assert!(
        deadline.ends_with('Z') && deadline.len() == 24 && deadline[..10] >= *today,
        "BATCHLY_DEADLINE_FILE holds the job's deadline: {deadline:?}\n{log}"
    );

    // What a program the job execs holds, less what find opens itself: the
    // directory it lists and its starting point (the work dir).
    let listing = agent.submit_one(&[
        "--id",
        "fds",
        "--",
        "find",
        "/proc/self/fd",
        "-mindepth",
        "1",
        "-printf",
        "%f %l\n",
    ]);
    let end = agent.wait_final(&listing.message_id);
    let work = agent.dir().join("work");
    let stream = end.log_stream.clone().expect("a log stream");
    let log = read_job_log(&agent.dir().join("logs").join(stream));
    let inherited: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, target)| {
            !target.starts_with("/proc/") && !Path::new(target).starts_with(&work)
        })
        .map(|(fd, _)| fd)
        .collect();
    assert_eq!(
        inherited,
        ["0", "1", "2"],
        "nothing but stdin, stdout and stderr is inherited\n{log}"
    );
}

#[test]
fn a_job_cannot_read_secrets_or_write_outside_its_work_dir_and_tmp() {
    let agent = DevAgent::start(&[]);
    let dev = agent.dir().display().to_string();
    let dev_env = format!("DEV={dev}");
    let mut script = String::new();
    for (name, cmd) in [
        ("shadow", "cat /etc/shadow"),
        ("write_etc", "touch /etc/batchly-was-here"),
        ("write_usr", "touch /usr/batchly-was-here"),
        ("write_root", "touch /batchly-was-here"),
        ("write_dev_dir", "touch \"$DEV/x\""),
        ("keys", "cat \"$DEV/keys/keys.toml\""),
        ("signing_key", "cat \"$DEV/keys/signing.toml\""),
        ("admin_socket", "test -e \"$DEV/agent.sock\""),
        ("queue", "ls \"$DEV/queue\""),
        ("state", "ls \"$DEV/state\""),
        ("write_home", "touch \"$HOME/out\""),
        ("write_tmp", "touch /tmp/out"),
        ("write_var_tmp", "touch /var/tmp/out"),
        ("write_shm", "touch /dev/shm/out"),
        ("dev_null", "echo x > /dev/null"),
        ("mknod", "mknod \"$HOME/disk\" b 8 0"),
    ] {
        script.push_str(&probe(name, cmd));
    }
    // The host's /run (sockets of journald, D-Bus, ...) is not there.
    script.push_str("echo run_entries=$(ls -A /run | wc -l)\n");
    let (end, seen, log) = run_job(&agent, "escape", &[&dev_env], &script);
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    for name in [
        "shadow",
        "write_etc",
        "write_usr",
        "write_root",
        "write_dev_dir",
        "keys",
        "signing_key",
        "admin_socket",
        "queue",
        "state",
        "mknod",
    ] {
        assert_eq!(field(&seen, name, &log), "fails", "{name} must fail\n{log}");
    }
    for name in [
        "write_home",
        "write_tmp",
        "write_var_tmp",
        "write_shm",
        "dev_null",
    ] {
        assert_eq!(field(&seen, name, &log), "ok", "{name} must work\n{log}");
    }
    assert!(
        std::fs::read_dir("/run").is_ok_and(|mut d| d.next().is_some()),
        "the host's /run is not empty (or this check proves nothing)"
    );
    assert_eq!(field(&seen, "run_entries", &log), "0", "{log}");
    assert!(!std::path::Path::new("/etc/batchly-was-here").exists());
    assert!(!agent.dir().join("x").exists());
}

#[test]
fn jobs_cannot_see_signal_or_trace_each_other_or_the_agent() {
    let agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    let holder = agent.submit_one(&[
        "--id",
        "holder",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        r#"echo $$ $(readlink /proc/self/ns/pid) > "$MARK/holder.pid"; echo "$HOME" > "$MARK/holder.home"
while [ ! -e "$MARK/go" ]; do sleep 0.02; done"#,
    ]);
    let holder_pid = read_pid_file(&agent.mark().join("holder.pid"));
    let holder_home = read_text(&agent.mark().join("holder.home"));
    let env = [
        format!("HOLDER_HOME={}", holder_home.trim()),
        format!("HOLDER_PID={holder_pid}"),
        format!("AGENT_PID={}", agent.pid()),
    ];
    let env: Vec<&str> = env.iter().map(String::as_str).collect();
    let mut script = String::new();
    script.push_str("ps -e -o comm= > \"$HOME/ps\"\n");
    script.push_str("echo processes=$(wc -l < \"$HOME/ps\")\n");
    script.push_str("echo agents=$(grep -c '^batchly-agent' \"$HOME/ps\")\n");
    for (name, cmd) in [
        ("see_holder_dir", "ls \"$HOLDER_HOME\""),
        ("kill_agent", "kill -9 \"$AGENT_PID\""),
        ("kill_holder", "kill -9 \"$HOLDER_PID\""),
        ("kill_init", "kill -9 1"),
        // PTRACE_ATTACH (16) by system call number (x86_64: 101).
        (
            "ptrace_holder",
            "perl -e 'exit(syscall(101, 16, $ENV{HOLDER_PID}, 0, 0) == -1 ? 1 : 0)'",
        ),
        ("holder_environ", "cat /proc/$HOLDER_PID/environ"),
    ] {
        script.push_str(&probe(name, cmd));
    }
    // Last: SIGKILL to every process this job may signal (kill(-1) spares
    // the caller and init): its own sleeping child, nothing outside.
    script.push_str("sleep 300 & child=$!\nkill -9 -1\nwait $child; echo child_status=$?\n");
    let (end, seen, log) = run_job(&agent, "attacker", &env, &script);
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    assert_eq!(
        field(&seen, "child_status", &log),
        "137",
        "kill -9 -1 reached the job's own child\n{log}"
    );
    // The init, sh and ps: the job sees its own namespace only.
    assert_eq!(
        field(&seen, "agents", &log),
        "0",
        "the agent is not visible\n{log}"
    );
    let processes: u32 = field(&seen, "processes", &log).parse().expect("a count");
    assert!(
        processes <= 3,
        "the job sees only its own processes, not {processes}\n{log}"
    );
    for name in [
        "see_holder_dir",
        "kill_agent",
        "kill_holder",
        "kill_init",
        "ptrace_holder",
        "holder_environ",
    ] {
        assert_eq!(field(&seen, name, &log), "fails", "{name} must fail\n{log}");
    }
    assert!(pid_alive(agent.pid()), "the agent is unharmed");
    assert!(pid_alive(holder_pid), "the other job is unharmed");
    std::fs::write(agent.mark().join("go"), b"").expect("writing go");
    let end = agent.wait_final(&holder.message_id);
    assert_eq!(
        end.kind, "job.succeeded",
        "the other job ends normally: {end:?}"
    );
}

#[test]
fn a_job_cannot_unshare_use_kernel_keys_io_uring_or_bpf_and_setuid_gives_nothing() {
    let agent = DevAgent::start(&[]);
    let mut script = String::new();
    for (name, cmd) in [
        // An unprivileged user may make a user namespace on this host;
        // the filter refuses it.
        ("unshare_user", "unshare -U true"),
        ("unshare_net", "unshare -n true"),
        // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1): works
        // for any user without the filter (x86_64: 250).
        (
            "keyctl",
            "perl -e 'exit(syscall(250, 0, -3, 1) == -1 ? 1 : 0)'",
        ),
        // io_uring_setup(1, NULL) (425): EFAULT without the filter, EPERM
        // with it; only EPERM counts as refused.
        (
            "io_uring",
            "perl -e 'syscall(425, 1, 0); exit($!{EPERM} ? 1 : 0)'",
        ),
        // bpf(BPF_PROG_LOAD, NULL, 0) (321): refused by the filter.
        (
            "bpf",
            "perl -e 'syscall(321, 5, 0, 0); exit($!{EPERM} ? 1 : 0)'",
        ),
        // An SCTP socket (its connect passes no cgroup hook): EPERM from
        // the filter, before the kernel even looks for SCTP.
        (
            "sctp",
            "perl -e 'socket(my $s, 2, 1, 132) and exit 0; exit($!{EPERM} ? 1 : 0)'",
        ),
    ] {
        script.push_str(&probe(name, cmd));
    }
    // Setuid binaries (mount, su, passwd on the host) cannot raise the
    // job's privileges: every mount is nosuid (and no_new_privs is checked
    // in another test).
    script.push_str("echo root_mount=$(awk '$5 == \"/\" {print $6}' /proc/self/mountinfo)\n");
    script.push_str("echo nosuid_mounts=$(awk '$6 !~ /nosuid/' /proc/self/mountinfo | wc -l)\n");
    let (end, seen, log) = run_job(&agent, "kernel-tricks", &[], &script);
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    for name in [
        "unshare_user",
        "unshare_net",
        "keyctl",
        "io_uring",
        "bpf",
        "sctp",
    ] {
        assert_eq!(field(&seen, name, &log), "fails", "{name} must fail\n{log}");
    }
    let root = field(&seen, "root_mount", &log);
    assert!(
        ["ro", "nosuid", "nodev"]
            .iter()
            .all(|o| root.split(',').any(|x| x == *o)),
        "the host is mounted ro,nosuid,nodev: {root}\n{log}"
    );
    assert_eq!(
        field(&seen, "nosuid_mounts", &log),
        "0",
        "every mount the job sees is nosuid\n{log}"
    );
}

#[test]
fn a_job_has_no_network_but_its_own_loopback() {
    let agent = DevAgent::start(&[]);
    // A service on the host's loopback the job must not reach.
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a host service");
    let port = listener.local_addr().expect("its address").port();
    let env = format!("PORT={port}");
    let mut script = String::new();
    script.push_str(
        "echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')\n",
    );
    for (name, cmd) in [
        (
            "host_service",
            "perl -MIO::Socket::INET -e 'exit(IO::Socket::INET->new(PeerAddr => \"127.0.0.1:$ENV{PORT}\", Timeout => 2) ? 0 : 1)'",
        ),
        (
            "own_loopback",
            "perl -MIO::Socket::INET -e '$l = IO::Socket::INET->new(Listen => 1, LocalAddr => \"127.0.0.1:0\") or exit 1; exit(IO::Socket::INET->new(PeerAddr => \"127.0.0.1:\" . $l->sockport) ? 0 : 1)'",
        ),
        (
            "metadata",
            "perl -MIO::Socket::INET -e 'exit(IO::Socket::INET->new(PeerAddr => \"169.254.169.254:80\", Timeout => 2) ? 0 : 1)'",
        ),
    ] {
        script.push_str(&probe(name, cmd));
    }
    let (end, seen, log) = run_job(&agent, "net", &[&env], &script);
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    assert_eq!(field(&seen, "interfaces", &log).trim(), "lo", "{log}");
    assert_eq!(field(&seen, "host_service", &log), "fails", "{log}");
    assert_eq!(field(&seen, "metadata", &log), "fails", "{log}");
    assert_eq!(
        field(&seen, "own_loopback", &log),
        "ok",
        "loopback works inside\n{log}"
    );
    drop(listener);
}

#[test]
fn a_daemon_a_job_leaves_behind_dies_with_the_job() {
    let agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    let (end, _, log) = run_job(
        &agent,
        "daemonizes",
        &[&mark],
        r#"setsid sh -c 'echo $$ $(readlink /proc/self/ns/pid) > "$MARK/daemon"; exec sleep 300' &
while [ ! -s "$MARK/daemon" ]; do sleep 0.02; done
exit 0"#,
    );
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    let daemon = read_pid_file(&agent.mark().join("daemon"));
    wait_gone(daemon, "the job's daemon, after the job ended");
}

/// Writes a job spec into the mark dir and submits it.
fn submit_spec(agent: &DevAgent, name: &str, spec: serde_json::Value) -> batchly_e2e::Submitted {
    let path = agent.mark().join(format!("{name}.json"));
    std::fs::write(&path, spec.to_string()).expect("writing the spec");
    agent.submit_one(&["--spec", &path.display().to_string()])
}

#[test]
fn a_fork_bomb_stops_at_the_jobs_pids_limit_and_the_agent_stays_responsive() {
    let agent = DevAgent::start(&[]);
    let job = submit_spec(
        &agent,
        "forks",
        serde_json::json!({
            "id": "forks",
            // The inner shell forks sleeps until a fork fails (and it gives
            // up); the outer one reads the count with builtins only, which
            // need no fork.
            "command": ["sh", "-c", "sh -c 'i=0; while [ $i -lt 100 ]; do sleep 5 & i=$((i+1)); echo $i > \"$HOME/n\"; done' 2>/dev/null; read n < \"$HOME/n\"; echo procs=$n"],
            "resources": {"pids": 16},
        }),
    );
    let status = batchly_e2e::run_cli(
        &["status", "--dir", &agent.dir().display().to_string()],
        &[],
    );
    assert_eq!(
        status.code(),
        0,
        "the agent answers while the job forks: {status:#?}"
    );
    let end = agent.wait_final(&job.message_id);
    assert_eq!(end.kind, "job.succeeded", "{end:?}");
    let log = read_job_log(
        &agent
            .dir()
            .join("logs")
            .join(end.log_stream.as_ref().expect("a log")),
    );
    let procs: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process count in the log:\n{log}"));
    assert!(
        procs <= 16,
        "at most the pids limit ran at once, not {procs}\n{log}"
    );
    assert!(pid_alive(agent.pid()), "the agent is unharmed");
}

#[test]
fn a_memory_hog_is_killed_at_its_limit_and_fails_with_reason_oom() {
    let agent = DevAgent::start(&[]);
    // tail keeps a whole "line" of /dev/zero in memory: it grows until the
    // limit stops it.
    let job = submit_spec(
        &agent,
        "hog",
        serde_json::json!({
            "id": "hog",
            "command": ["sh", "-c", "head -c 1G /dev/zero | tail > /dev/null"],
            "resources": {"memory_mib": 32},
        }),
    );
    let end = agent.wait_final(&job.message_id);
    assert_eq!(end.kind, "job.failed", "{end:?}");
    let reason = end.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("oom"), "the reason says oom: {reason}");
    let peak = end.raw["memory_peak_bytes"]
        .as_u64()
        .expect("the peak memory is reported");
    assert!(
        peak <= 33 << 20,
        "the job never held more than its limit: {peak}"
    );
    assert!(pid_alive(agent.pid()), "the agent is unharmed");
    // The next job runs normally.
    let next = agent.submit_one(&["--id", "after-hog", "--", "true"]);
    assert_eq!(agent.wait_final(&next.message_id).kind, "job.succeeded");
}

#[test]
fn cancel_kills_a_running_job_deleting_its_message_or_requeueing_it() {
    let agent = DevAgent::start(&[]);
    let dir = agent.dir().display().to_string();
    let mark = agent.mark_env();
    let hold = r#"echo $$ $(readlink /proc/self/ns/pid) > "$MARK/$BATCHLY_JOB_ID.$BATCHLY_ATTEMPT"; exec sleep 300"#;
    let first = agent.submit_one(&["--id", "to-cancel", "--env", &mark, "--", "sh", "-c", hold]);
    let pid = read_pid_file(&agent.mark().join("to-cancel.1"));
    let run = batchly_e2e::run_cli(&["cancel", "to-cancel", "--dir", &dir], &[]);
    assert_eq!(run.code(), 0, "{run:#?}");
    let end = agent.wait_final(&first.message_id);
    assert_eq!(
        (end.kind.as_str(), end.reason.as_deref()),
        ("job.failed", Some("cancelled")),
        "{end:?}"
    );
    wait_gone(pid, "the cancelled job");

    // With --requeue the message runs again (and is cancelled for good then).
    let second = agent.submit_one(&["--id", "to-requeue", "--env", &mark, "--", "sh", "-c", hold]);
    read_pid_file(&agent.mark().join("to-requeue.1"));
    let run = batchly_e2e::run_cli(&["cancel", "to-requeue", "--requeue", "--dir", &dir], &[]);
    assert_eq!(run.code(), 0, "{run:#?}");
    let events = agent.wait_for("the requeue and a second start", |ev| {
        batchly_e2e::of_message(ev, &second.message_id)
            .iter()
            .filter(|e| e.kind == "job.started")
            .count()
            >= 2
    });
    let requeued: Vec<_> = batchly_e2e::of_message(&events, &second.message_id)
        .into_iter()
        .filter(|e| e.kind == "job.requeued")
        .collect();
    assert_eq!(requeued.len(), 1, "{requeued:?}");
    assert_eq!(requeued[0].reason.as_deref(), Some("cancelled"));
    assert!(!requeued[0].is_final);
    let run = batchly_e2e::run_cli(&["cancel", "to-requeue", "--dir", &dir], &[]);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(
        agent.wait_final(&second.message_id).reason.as_deref(),
        Some("cancelled")
    );

    // No such job: exit 2, saying so.
    let run = batchly_e2e::run_cli(&["cancel", "no-such-job", "--dir", &dir], &[]);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains("no job \"no-such-job\" is running"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_readonly_path_is_readable_under_the_fresh_tmp_but_never_writable() {
    // Under /tmp on purpose: every job gets a fresh /tmp, so only the
    // read-only path itself shows through it.
    let site = tempfile::tempdir().expect("a site dir");
    let tools = site.path().join("tools");
    std::fs::create_dir(&tools).expect("tools dir");
    std::fs::write(tools.join("tool.sh"), "echo site-tool\n").expect("tool");
    std::fs::write(site.path().join("beside"), "not shared").expect("beside");
    // World-writable on the host: only the mount keeps the job out.
    std::fs::set_permissions(&tools, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let agent = DevAgent::start(&[(
        "BATCHLY_SANDBOX_READONLY_PATHS",
        tools.to_str().expect("utf-8 path"),
    )]);
    let tools_env = format!("TOOLS={}", tools.display());
    let beside_env = format!("BESIDE={}", site.path().join("beside").display());
    let script = [
        "echo tool=$(sh \"$TOOLS/tool.sh\")\n".to_string(),
        probe("write_in", "touch \"$TOOLS/new\""),
        probe("beside", "cat \"$BESIDE\""),
    ]
    .concat();
    let (end, seen, log) = run_job(&agent, "reads-tools", &[&tools_env, &beside_env], &script);
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    assert_eq!(field(&seen, "tool", &log), "site-tool", "the tool runs");
    assert_eq!(field(&seen, "write_in", &log), "fails", "read-only");
    assert_eq!(
        field(&seen, "beside", &log),
        "fails",
        "only the listed dir shows"
    );
    assert!(!tools.join("new").exists(), "nothing reached the host");
}

#[test]
fn a_job_cannot_write_a_file_past_sandbox_max_file_size() {
    let agent = DevAgent::start(&[("BATCHLY_SANDBOX_MAX_FILE_SIZE", "1MiB")]);
    let script = [
        probe("small", "head -c 512K /dev/zero > small"),
        // The shell itself is the writer: SIGXFSZ ends it, as it would any
        // job that ignores the failed write.
        probe("big", "sh -c 'head -c 2M /dev/zero > big'"),
        "echo big_size=$(stat -c %s big)\n".to_string(),
    ]
    .concat();
    let (end, seen, log) = run_job(&agent, "writes-big", &[], &script);
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    assert_eq!(field(&seen, "small", &log), "ok", "under the limit");
    assert_eq!(field(&seen, "big", &log), "fails", "past the limit");
    assert_eq!(
        field(&seen, "big_size", &log),
        (1 << 20).to_string(),
        "stopped at the limit"
    );
}
