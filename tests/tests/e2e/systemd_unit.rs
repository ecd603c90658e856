//! The agent as a real systemd service: each test starts `batchly-agent
//! dev` as a transient `Type=notify` unit with `systemd-run` and checks
//! what systemd itself saw (the unit's state, its watchdog, its result,
//! its journal) and where the jobs ran. They need systemd as PID 1 and a
//! pure cgroup v2 hierarchy, which only the VM tier has (tests/vm), so the
//! host run skips them (`#[ignore]`) and the VM tier runs them with
//! `--ignored systemd_unit`. Run anywhere else they fail rather than pass
//! without having proved anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use batchly_e2e::{
    agent_bin, dev_events, eventually, kill_processes_working_in, make_mark_dir, of_message,
    queued_message_ids, read_pid_file, run_command, run_within, submit_to_dir, wait_gone, Event,
    Submitted, WAIT,
};
use tempfile::TempDir;

/// How long `systemd-run` may take to come back: it waits for `READY=1`,
/// and a debug agent under software emulation starts slowly.
const START_WAIT: Duration = Duration::from_secs(120);
/// The watchdog of a healthy agent's unit: the agent feeds it every half
/// (3 s), which leaves a slow emulated guest room for a late tick.
const HEALTHY_WATCHDOG: &str = "WatchdogSec=6";
/// The watchdog of a wedged agent's unit: short, so it is killed soon.
const WEDGED_WATCHDOG: &str = "WatchdogSec=3";
/// How long a state systemd reports may take to show.
const POLL: Duration = Duration::from_millis(100);

/// Panics unless systemd is PID 1 on a pure cgroup v2 hierarchy: a test
/// that cannot run must not look like a pass.
fn require_systemd_on_cgroup_v2() {
    assert!(
        Path::new("/run/systemd/system").is_dir(),
        "systemd is not PID 1 here (no /run/systemd/system): run this test in the VM tier \
         (scripts/test, tests/vm/run)"
    );
    assert!(
        Path::new("/sys/fs/cgroup/cgroup.controllers").is_file(),
        "/sys/fs/cgroup is not a cgroup v2 hierarchy: run this test in the VM tier"
    );
}

/// `batchly-agent dev` running as the transient service `name`, on a
/// temporary root: `dev/` is the agent's directory, `mark/` is where jobs
/// leave traces, `stopped` is what `ExecStopPost` recorded. Dropping it
/// stops the unit and forgets it, whatever the test's outcome, and after a
/// failure first prints the unit's status, journal and events.
struct Service {
    name: String,
    root: TempDir,
    dir: PathBuf,
    mark: PathBuf,
}

impl Service {
    /// Starts the agent as unit `batchly-test-<name>-<pid>.service` with
    /// the properties every test wants, `extra` properties (`-p` values,
    /// the watchdog among them) and environment `env`, and returns once
    /// systemd reported the start job done (for `Type=notify`: the agent
    /// sent `READY=1`).
    fn start(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Service {
        require_systemd_on_cgroup_v2();
        let root = tempfile::tempdir().expect("tempdir for the service");
        let dir = root.path().join("dev");
        let mark = root.path().join("mark");
        make_mark_dir(&mark);
        let recorder = root.path().join("record-stop.sh");
        std::fs::write(&recorder, RECORD_STOP).expect("writing the stop recorder");
        let service = Service {
            name: format!("batchly-test-{name}-{}.service", std::process::id()),
            dir,
            mark,
            root,
        };

        let mut properties: Vec<String> = [
            "Type=notify",
            "NotifyAccess=main",
            "Delegate=yes",
            "KillMode=mixed",
            "TimeoutStopSec=60",
            // A watchdog kill is SIGABRT: no core of a debug agent.
            "LimitCORE=0",
        ]
        .iter()
        .chain(extra)
        .map(|p| p.to_string())
        .collect();
        properties.push(format!(
            "ExecStopPost=/bin/sh {} {} {}",
            recorder.display(),
            service.name,
            service.stopped_path().display()
        ));
        let mut cmd = Command::new("systemd-run");
        cmd.arg("--unit").arg(&service.name);
        for property in &properties {
            cmd.arg("-p").arg(property);
        }
        let mark_bind = format!("BATCHLY_SANDBOX_BIND_PATHS={}", service.mark.display());
        let defaults = [
            "BATCHLY_JOBS_MAX_CONCURRENT=4".to_string(),
            "BATCHLY_JOBS_KILL_GRACE_S=1".to_string(),
            mark_bind,
        ];
        for setting in defaults
            .into_iter()
            .chain(env.iter().map(|(k, v)| format!("{k}={v}")))
        {
            cmd.arg(format!("--setenv={setting}"));
        }
        cmd.arg("--")
            .arg(agent_bin())
            .arg("dev")
            .arg("--dir")
            .arg(&service.dir);
        let run = run_within(
            cmd,
            &format!("systemd-run for {}", service.name),
            START_WAIT,
        );
        assert_eq!(
            run.code(),
            0,
            "systemd-run could not start the agent: {run:#?}"
        );
        service
    }

    /// Properties of the unit (`systemctl show -p ...`).
    fn show(&self, properties: &[&str]) -> BTreeMap<String, String> {
        let mut cmd = Command::new("systemctl");
        cmd.args(["show", "-p", &properties.join(","), &self.name]);
        let run = run_command(cmd, &format!("systemctl show {}", self.name));
        assert_eq!(run.code(), 0, "systemctl show failed: {run:#?}");
        parse_properties(&run.stdout)
    }

    /// One property of the unit.
    fn property(&self, name: &str) -> String {
        self.show(&[name]).remove(name).unwrap_or_default()
    }

    /// Everything the unit wrote to the journal, and what systemd logged
    /// about it, one message a line.
    fn journal(&self) -> String {
        let mut cmd = Command::new("journalctl");
        cmd.args(["--no-pager", "-o", "cat", "-u", &self.name]);
        run_command(cmd, &format!("journalctl -u {}", self.name)).stdout
    }

    /// Waits until the journal has a line containing `text`.
    fn wait_journal(&self, text: &str) {
        eventually(
            &format!("the journal of {} to say {text:?}", self.name),
            WAIT,
            || self.journal().contains(text),
            String::new,
        );
    }

    /// Polls the unit's properties until `cond` holds and returns them.
    fn wait_show(
        &self,
        what: &str,
        properties: &[&str],
        mut cond: impl FnMut(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.show(properties);
            if cond(&seen) {
                return seen;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {WAIT:?} waiting for {what}; last {seen:#?}");
            }
            std::thread::sleep(POLL);
        }
    }

    fn submit_one(&self, args: &[&str]) -> Submitted {
        let mut got = submit_to_dir(&self.dir, args);
        assert_eq!(got.len(), 1, "expected one job from submit {args:?}");
        got.remove(0)
    }

    fn events(&self) -> Vec<Event> {
        dev_events(&self.dir)
    }

    /// Waits until `cond` holds for the events so far and returns them.
    fn wait_events(&self, what: &str, cond: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let mut events = Vec::new();
        eventually(
            what,
            WAIT,
            || {
                events = self.events();
                cond(&events)
            },
            String::new,
        );
        events
    }

    /// `MARK=<mark dir>`, for `submit --env`.
    fn mark_env(&self) -> String {
        format!("MARK={}", self.mark.display())
    }

    /// `systemctl stop`: returns once the unit is stopped (the agent has
    /// exited and `ExecStopPost` has run), or panics after `WAIT`.
    fn stop(&self) {
        let mut cmd = Command::new("systemctl");
        cmd.args(["stop", &self.name]);
        let run = run_command(cmd, &format!("systemctl stop {}", self.name));
        assert_eq!(run.code(), 0, "systemctl stop failed: {run:#?}");
    }

    fn stopped_path(&self) -> PathBuf {
        self.root.path().join("stopped")
    }

    /// What `ExecStopPost` recorded when the unit stopped: how the main
    /// process ended (`SERVICE_RESULT`, `EXIT_CODE`, `EXIT_STATUS`) and
    /// the unit's restart count at that moment. A stopped transient unit
    /// is unloaded at once, so afterwards `systemctl show` would only
    /// report defaults.
    fn wait_stopped_record(&self) -> BTreeMap<String, String> {
        let path = self.stopped_path();
        eventually(
            &format!("{} to be written by ExecStopPost", path.display()),
            WAIT,
            || path.exists(),
            String::new,
        );
        parse_properties(&std::fs::read_to_string(&path).expect("reading the stop record"))
    }

    /// The unit's state, journal and events, for failure messages.
    fn diagnostics(&self) -> String {
        let mut cmd = Command::new("systemctl");
        cmd.args(["status", "--no-pager", "--full", &self.name]);
        let status = run_command(cmd, "systemctl status");
        format!(
            "--- systemctl status ---\n{}{}\n--- journal ---\n{}\n--- events.jsonl ---\n{}",
            status.stdout,
            status.stderr,
            self.journal(),
            std::fs::read_to_string(self.dir.join("events.jsonl")).unwrap_or_default()
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        for verb in ["stop", "reset-failed"] {
            let mut cmd = Command::new("systemctl");
            cmd.args([verb, &self.name]);
            // Already stopped (or never loaded) is fine; a panic here would
            // only hide the test's own.
            let _ = cmd
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        kill_processes_working_in(&self.dir.join("work"));
    }
}

/// `ExecStopPost` of every test unit (`sh record-stop.sh UNIT FILE`):
/// writes, by rename so it is never read half-written, how the service
/// ended and how often systemd restarted it.
const RECORD_STOP: &str = r#"{
    echo "SERVICE_RESULT=$SERVICE_RESULT"
    echo "EXIT_CODE=$EXIT_CODE"
    echo "EXIT_STATUS=$EXIT_STATUS"
    systemctl show -p NRestarts "$1"
} > "$2.tmp" && mv "$2.tmp" "$2"
"#;

/// `KEY=VALUE` lines.
fn parse_properties(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn kinds(events: &[&Event]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

/// The cgroup of `pid` on the unified hierarchy (`0::PATH` in
/// `/proc/PID/cgroup`), as an absolute path under `/sys/fs/cgroup`'s root.
fn cgroup_of(pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/cgroup: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in /proc/{pid}/cgroup:\n{text}"))
        .to_string()
}

#[test]
#[ignore = "needs systemd as PID 1 and cgroup v2: the VM tier runs it (scripts/test)"]
fn systemd_unit_notify_ready_status_watchdog_and_a_clean_stop() {
    // Restart=on-failure: had the watchdog or a crash ended the agent,
    // systemd would have restarted it and counted it.
    let service = Service::start("notify", &[HEALTHY_WATCHDOG, "Restart=on-failure"], &[]);

    // systemd-run came back: systemd saw READY=1.
    let started = service.show(&["ActiveState", "SubState", "MainPID", "StatusText"]);
    assert_eq!(started["ActiveState"], "active", "{started:#?}");
    assert_eq!(started["SubState"], "running", "{started:#?}");
    let main_pid = started["MainPID"].clone();
    assert_ne!(
        main_pid, "0",
        "systemd tracks the agent as the main process"
    );
    assert!(
        started["StatusText"].starts_with("running; 0 of 4 slots busy"),
        "the status line came with READY=1: {started:#?}"
    );

    let job = service.submit_one(&["--id", "under-systemd", "--", "true"]);
    let events = service.wait_events("the job's final event", |ev| {
        ev.iter()
            .any(|e| e.message_id == job.message_id && e.is_final)
    });
    let mine = of_message(&events, &job.message_id);
    assert_eq!(kinds(&mine), ["job.started", "job.succeeded"]);
    service.wait_show("the status line to count the job", &["StatusText"], |s| {
        s["StatusText"].contains("1 succeeded")
    });

    // Every WATCHDOG=1 moves the timestamp: two moves are two pings after
    // the first one seen.
    let mut seen = BTreeSet::new();
    service.wait_show(
        "the watchdog timestamp to advance twice",
        &["WatchdogTimestampMonotonic"],
        |s| {
            let t = &s["WatchdogTimestampMonotonic"];
            if t != "0" {
                seen.insert(t.clone());
            }
            seen.len() >= 3
        },
    );
    let still = service.show(&["ActiveState", "MainPID", "NRestarts"]);
    assert_eq!(still["ActiveState"], "active", "{still:#?}");
    assert_eq!(still["MainPID"], main_pid, "the same agent: {still:#?}");
    assert_eq!(still["NRestarts"], "0", "{still:#?}");

    service.stop();
    let stopped = service.wait_stopped_record();
    assert_eq!(
        stopped.get("SERVICE_RESULT").map(String::as_str),
        Some("success"),
        "{stopped:#?}"
    );
    assert_eq!(
        (
            stopped["EXIT_CODE"].as_str(),
            stopped["EXIT_STATUS"].as_str()
        ),
        ("exited", "0"),
        "the agent drained and exited 0 on systemd's SIGTERM: {stopped:#?}"
    );
    assert_eq!(stopped["NRestarts"], "0", "{stopped:#?}");
    service.wait_journal("drained; every job finished or was released; exiting");
}

#[test]
#[ignore = "needs systemd as PID 1 and cgroup v2: the VM tier runs it (scripts/test)"]
fn systemd_unit_a_wedged_agent_is_killed_by_the_watchdog() {
    // Debug builds let a test wedge one loop: its beats are ignored.
    let service = Service::start(
        "wedged",
        &[WEDGED_WATCHDOG, "Restart=no"],
        &[("BATCHLY_TEST_STALL", "intake loop")],
    );
    let failed = service.wait_show(
        "systemd to kill the wedged agent",
        &["ActiveState", "Result", "NRestarts"],
        |s| s["ActiveState"] == "failed",
    );
    assert_eq!(failed["Result"], "watchdog", "{failed:#?}");
    assert_eq!(failed["NRestarts"], "0", "{failed:#?}");
    let stopped = service.wait_stopped_record();
    assert_eq!(
        stopped.get("SERVICE_RESULT").map(String::as_str),
        Some("watchdog"),
        "{stopped:#?}"
    );
    service.wait_journal("not feeding the systemd watchdog");
    let journal = service.journal();
    assert!(
        journal.contains("intake loop quiet"),
        "the log names the wedged loop:\n{journal}"
    );
}

#[test]
#[ignore = "needs systemd as PID 1 and cgroup v2: the VM tier runs it (scripts/test)"]
fn systemd_unit_jobs_live_in_the_delegated_cgroup() {
    let service = Service::start("cgroup", &[HEALTHY_WATCHDOG], &[]);
    let unit_cgroup = service.property("ControlGroup");
    assert!(
        unit_cgroup.ends_with(&format!("/{}", service.name)),
        "the unit has its own cgroup: {unit_cgroup:?}"
    );
    let agent_pid: i32 = service
        .property("MainPID")
        .parse()
        .expect("MainPID is a number");

    let mark = service.mark_env();
    let job = service.submit_one(&[
        "--id",
        "long",
        "--env",
        &mark,
        "--",
        "sh",
        "-c",
        &format!(
            r#"echo $$ {} > "$MARK/leader"; exec sleep 300"#,
            batchly_e2e::PID_NS
        ),
    ]);
    let leader = read_pid_file(&service.mark.join("leader"));

    let job_cgroup = cgroup_of(leader);
    let jobs_parent = format!("{unit_cgroup}/jobs/");
    assert!(
        job_cgroup.starts_with(&jobs_parent) && job_cgroup.len() > jobs_parent.len(),
        "the job runs in a cgroup of its own under the unit's jobs/: {job_cgroup:?} \
         (unit {unit_cgroup:?})"
    );
    let agent_cgroup = cgroup_of(agent_pid);
    assert_eq!(
        agent_cgroup,
        format!("{unit_cgroup}/agent"),
        "the agent moved into its own leaf of the delegated cgroup"
    );
    let procs = std::fs::read_to_string(format!("/sys/fs/cgroup{job_cgroup}/cgroup.procs"))
        .expect("reading the job cgroup's members");
    assert!(
        !procs.split_whitespace().any(|p| p == agent_pid.to_string()),
        "the agent is not in its job's cgroup: {procs}"
    );

    service.stop();
    wait_gone(leader, "the job of the stopped agent");
    let stopped = service.wait_stopped_record();
    assert_eq!(
        stopped.get("SERVICE_RESULT").map(String::as_str),
        Some("success"),
        "{stopped:#?}"
    );
    let events = service.events();
    let mine = of_message(&events, &job.message_id);
    assert_eq!(kinds(&mine), ["job.started", "job.interrupted"]);
    assert!(!mine[1].is_final, "{:?}", mine[1]);
    assert!(
        mine[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("SIGTERM")),
        "{:?}",
        mine[1]
    );
    assert_eq!(
        queued_message_ids(&service.dir),
        BTreeSet::from([job.message_id.clone()]),
        "the message is back in the queue for the next start"
    );
    let unit_dir = PathBuf::from(format!("/sys/fs/cgroup{unit_cgroup}"));
    eventually(
        "systemd to remove the unit's cgroup tree",
        WAIT,
        || !unit_dir.exists(),
        || format!("{} still exists", unit_dir.display()),
    );
}
