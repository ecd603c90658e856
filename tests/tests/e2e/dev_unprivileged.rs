//! `dev` run by an ordinary user: the jobs get what the kernel allows
//! without privileges (a user namespace of their own with the mount, pid,
//! network, ipc and uts ones, a read-only host with the agent's files
//! hidden, no capabilities, `no_new_privs`, seccomp, Landlock), the agent
//! says at start what is off and why, and where the host has no user
//! namespaces to give, jobs still run, unsandboxed, with the reason said.
//!
//! The agent runs as a uid of no account (not 65534: inside a user
//! namespace every unmapped id shows as 65534 too) on a directory it owns.
//! Every expectation is one a job of an unsandboxed `dev` fails, so the
//! list of failed ones shows what a run without the sandbox would give.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use batchly_e2e::{agent_bin, read_job_log, read_pid_file, wait_gone, DevAgent, Event};

/// The agent's uid and gid: no account's, mapped to themselves inside.
const USER: u32 = 1_234_567;

fn setpriv() -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={USER}"),
        format!("--regid={USER}"),
        "--clear-groups".into(),
        "--".into(),
    ]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `script` (sh) as job `id`; its final event, what it printed as
/// `name=value` pairs, and its whole log.
fn run_job(
    agent: &DevAgent,
    id: &str,
    env: &[String],
    script: &str,
) -> (Event, BTreeMap<String, String>, String) {
    let mut args = vec!["--id", id, "--max-attempts", "1"];
    for e in env {
        args.extend(["--env", e.as_str()]);
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
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    (end, seen, log)
}

/// `name=ok` if `cmd` succeeds, `name=fails` if not (its output dropped).
fn probe(name: &str, cmd: &str) -> String {
    format!("if {cmd} >/dev/null 2>&1; then echo {name}=ok; else echo {name}=fails; fi\n")
}

/// Expectations checked all at once, so a failure lists every one that
/// did not hold.
struct Expectations<'a> {
    seen: &'a BTreeMap<String, String>,
    failed: Vec<String>,
}

impl Expectations<'_> {
    fn field(&mut self, name: &str, want: &str, why: &str) {
        let got = self.seen.get(name).map(String::as_str);
        if got != Some(want) {
            self.failed
                .push(format!("{why}: {name} is {got:?}, not {want:?}"));
        }
    }

    fn holds(&mut self, ok: bool, why: &str) {
        if !ok {
            self.failed.push(why.to_string());
        }
    }

    fn assert_all(self, context: &str) {
        assert!(
            self.failed.is_empty(),
            "{} expectation(s) failed:\n  {}\n{context}",
            self.failed.len(),
            self.failed.join("\n  ")
        );
    }
}

/// A directory outside the agent's, the job's and /tmp that the user may
/// write: the job must not, with the host read-only. It holds the agent's
/// state dir, which the job must not see.
fn users_own_dir_outside() -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a dir outside /tmp");
    std::os::unix::fs::chown(dir.path(), Some(USER), Some(USER)).expect("giving it to the user");
    dir
}

#[test]
fn dev_as_an_ordinary_user_isolates_jobs_in_a_user_namespace_and_says_what_is_off() {
    let outside = users_own_dir_outside();
    let state = outside.path().join("state").display().to_string();
    let agent = DevAgent::start_owned_by(
        USER,
        &as_strs(&setpriv()),
        &[("BATCHLY_STATE_DIR", state.as_str())],
    );
    let dir = agent.dir().display().to_string();
    let env = vec![
        format!("AGENT_DIR={dir}"),
        format!("AGENT_PID={}", agent.pid()),
        format!("OUTSIDE={}", outside.path().display()),
        format!("STATE={state}"),
        agent.mark_env(),
    ];
    let mut script = String::from(
        r#"echo uid=$(id -u)
grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -d ' \t' | tr ':' '='
echo pid1=$(cat /proc/1/comm)
echo agent_in_proc=$(test -e "/proc/$AGENT_PID" && echo yes || echo no)
echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')
echo hostname=$(hostname)
echo from-the-job > "$MARK/from-job"
"#,
    );
    for (name, cmd) in [
        ("shadow", "cat /etc/shadow"),
        ("signing_key", "cat \"$AGENT_DIR/keys/signing.toml\""),
        ("state_dir", "test -n \"$(ls -A \"$STATE\")\""),
        ("admin_socket", "test -e \"$AGENT_DIR/agent.sock\""),
        ("write_outside", "touch \"$OUTSIDE/from-job\""),
        ("signal_agent", "kill -0 \"$AGENT_PID\""),
        ("unshare_user", "unshare -U true"),
        ("write_work_dir", "touch ./from-job"),
        ("dev_null", "echo x > /dev/null"),
        ("urandom", "head -c 16 /dev/urandom"),
    ] {
        script.push_str(&probe(name, cmd));
    }
    let (end, seen, log) = run_job(&agent, "unprivileged", &env, &script);

    let mut expect = Expectations {
        seen: &seen,
        failed: Vec::new(),
    };
    expect.holds(end.kind == "job.succeeded", "the job succeeds");
    let stderr = agent.stderr();
    expect.holds(
        stderr.contains("sandbox: not root: jobs run in a user namespace of their own; on: user, mount, pid, network, ipc and uts namespaces"),
        "the agent says at start which protections are on",
    );
    expect.holds(
        stderr.contains("sandbox: off: a uid per slot: only root has other uids to give"),
        "the agent says at start that jobs share its uid, and why",
    );
    expect.holds(
        stderr.contains("sandbox: off: cgroup limits: not root"),
        "the agent says at start that jobs have no cgroup limits, and why",
    );
    expect.field("uid", &USER.to_string(), "the job keeps the user's uid");
    expect.field("CapEff", "0000000000000000", "no effective capability");
    expect.field("CapBnd", "0000000000000000", "an empty bounding set");
    expect.field("NoNewPrivs", "1", "no_new_privs");
    expect.field("Seccomp", "2", "a seccomp filter");
    expect.field(
        "pid1",
        "batchly-init",
        "its own pid namespace, its init pid 1",
    );
    expect.field("agent_in_proc", "no", "the agent's pid is not in its /proc");
    expect.field("signal_agent", "fails", "the agent cannot be signalled");
    expect.field("interfaces", "lo", "its own network: loopback only");
    expect.field("hostname", "unprivileged", "its own uts namespace");
    expect.field("shadow", "fails", "/etc/shadow stays unreadable");
    expect.field("signing_key", "fails", "the signing key is hidden");
    expect.field(
        "state_dir",
        "fails",
        "the state dir (outside /tmp) is hidden",
    );
    expect.holds(
        std::fs::read_dir(&state).is_ok_and(|mut d| d.next().is_some()),
        "the state dir is not empty (or hiding it proves nothing)",
    );
    expect.field("admin_socket", "fails", "the admin socket is hidden");
    expect.field("write_outside", "fails", "the host is read-only");
    expect.field(
        "unshare_user",
        "fails",
        "no user namespace of the job's own",
    );
    expect.field("write_work_dir", "ok", "its work dir is writable");
    expect.field("dev_null", "ok", "its /dev/null works");
    expect.field("urandom", "ok", "its /dev/urandom works");
    expect.holds(
        !outside.path().join("from-job").exists(),
        "nothing was written outside",
    );
    let mark = agent.mark().join("from-job");
    expect.holds(
        std::fs::metadata(&mark).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == USER),
        "sandbox.bind_paths are writable, and what the job makes there is the user's",
    );
    expect.assert_all(&format!(
        "{end:?}\n--- job log ---\n{log}\n--- agent stderr ---\n{stderr}"
    ));
}

/// Without cgroups, the job's pid namespace is what contains it.
#[test]
fn a_daemon_a_job_leaves_behind_dies_with_it_and_a_timeout_kills_it() {
    let agent = DevAgent::start_owned_by(USER, &as_strs(&setpriv()), &[]);
    let (end, _, log) = run_job(
        &agent,
        "daemonizes",
        &[agent.mark_env()],
        r#"setsid sh -c 'echo $$ $(readlink /proc/self/ns/pid) > "$MARK/daemon"; exec sleep 300' &
while [ ! -s "$MARK/daemon" ]; do sleep 0.02; done
exit 0"#,
    );
    assert_eq!(end.kind, "job.succeeded", "{end:?}\n{log}");
    let daemon = read_pid_file(&agent.mark().join("daemon"));
    wait_gone(daemon, "the job's daemon, after the job ended");

    let job = agent.submit_one(&["--id", "sleeps", "--timeout-s", "1", "--", "sleep", "300"]);
    let end = agent.wait_final(&job.message_id);
    assert_eq!(
        end.kind,
        "job.timed_out",
        "{end:?}\n{}",
        agent.diagnostics()
    );
}

#[test]
fn check_config_as_an_ordinary_user_says_what_this_host_gives_dev() {
    // The agent makes the dev dir and its keys; check-config reads them.
    let agent = DevAgent::start_owned_by(USER, &as_strs(&setpriv()), &[]);
    let out = Command::new("setpriv")
        .args(&setpriv()[1..])
        .arg(agent_bin())
        .arg("check-config")
        .arg("--dir")
        .arg(agent.dir())
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .expect("running check-config as the user");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check-config failed: {out:?}");
    let line = |what: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("#   {what} ")))
            .unwrap_or_else(|| panic!("no line for {what}:\n{text}"))
            .to_string()
    };
    assert!(
        line("root").contains("NO: not root: `run` refuses"),
        "{text}"
    );
    assert!(
        line("user namespaces").contains("ok: `dev` gives jobs user, mount, pid, network"),
        "{text}"
    );
    assert!(
        line("cgroups").contains("NO: not root: `dev` gives jobs no cgroup limits"),
        "{text}"
    );
}

/// A user namespace made by root in which the user's uid is mapped and no
/// further user namespace may be made (`user.max_user_namespaces` is 0
/// there): an ordinary user's view of a host that forbids them. Held by a
/// sleeping process, killed when dropped.
struct NoUserNamespaces {
    holder: Child,
}

impl NoUserNamespaces {
    fn new() -> NoUserNamespaces {
        let ours = std::fs::read_link("/proc/self/ns/user").expect("our user namespace");
        let holder = Command::new("unshare")
            .args(["--user", "--", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting unshare --user");
        let ns = NoUserNamespaces { holder };
        let proc = PathBuf::from(format!("/proc/{}", ns.holder.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(proc.join("ns/user")).ok().as_ref() == Some(&ours) {
            assert!(
                Instant::now() < deadline,
                "unshare --user made no namespace"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Root outside, and the user, each as themselves; one write each.
        let map = format!("0 0 1\n{USER} {USER} 1\n");
        for file in ["uid_map", "gid_map"] {
            std::fs::write(proc.join(file), &map)
                .unwrap_or_else(|e| panic!("writing the holder's {file}: {e}"));
        }
        let limited = Command::new("nsenter")
            .arg(format!("--user={}", ns.path()))
            .args(["-S", "0", "-G", "0", "--", "sh", "-c"])
            .arg("echo 0 > /proc/sys/user/max_user_namespaces")
            .status()
            .expect("running nsenter");
        assert!(limited.success(), "setting user.max_user_namespaces to 0");
        ns
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/user", self.holder.id())
    }

    /// A wrapper that runs a command in it as the user.
    fn as_user(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--user={}", self.path()),
            "-S".into(),
            USER.to_string(),
            "-G".into(),
            USER.to_string(),
            "--".into(),
        ]
    }
}

impl Drop for NoUserNamespaces {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn without_user_namespaces_dev_still_runs_jobs_unsandboxed_and_says_why() {
    let host = NoUserNamespaces::new();
    let agent = DevAgent::start_owned_by(USER, &as_strs(&host.as_user()), &[]);
    let (end, seen, log) = run_job(
        &agent,
        "first-try",
        &[],
        "echo greeting=hello\ngrep NoNewPrivs /proc/self/status | tr -d ' \\t' | tr ':' '='\n",
    );
    let stderr = agent.stderr();
    let context = format!("{end:?}\n--- job log ---\n{log}\n--- agent stderr ---\n{stderr}");
    assert!(
        stderr.contains("this host gives an ordinary user no user namespaces")
            && stderr.contains("user.max_user_namespaces is 0 on this host")
            && stderr.contains("jobs run WITHOUT the sandbox"),
        "the agent says loudly that jobs run unsandboxed, and why\n{context}"
    );
    assert_eq!(end.kind, "job.succeeded", "{context}");
    assert_eq!(
        seen.get("greeting").map(String::as_str),
        Some("hello"),
        "{context}"
    );
    assert_eq!(
        seen.get("NoNewPrivs").map(String::as_str),
        Some("0"),
        "the job really runs without the sandbox\n{context}"
    );
}
