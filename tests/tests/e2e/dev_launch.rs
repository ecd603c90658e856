//! The launch path under failure: jobs are forked by one fork server per
//! agent (`batchly-agent __launch`), yet each job's init is the agent's own
//! child.
//! Killing the server must not cost a running job its outcome, and the next
//! job must find a new server; no launcher or job is ever left a zombie.

use std::time::Duration;

use batchly_e2e::{eventually, read_pid_file, DevAgent, WAIT};
use nix::sys::signal::Signal;

/// Children of `pid`: (pid, state, argv).
fn children(pid: i32) -> Vec<(i32, String, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.to_string();
            let ppid: i32 = fields.next()?.parse().ok()?;
            if ppid != pid {
                return None;
            }
            let argv = std::fs::read(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((p, state, argv))
        })
        .collect()
}

/// The parent of `pid`, as the host sees it.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Pids of the agent's live fork servers (a job's init is a fork of one,
/// in a pid namespace of its own).
fn fork_servers(agent: i32) -> Vec<i32> {
    let agents_ns = std::fs::read_link(format!("/proc/{agent}/ns/pid")).ok();
    children(agent)
        .into_iter()
        .filter(|(p, _, _)| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok() == agents_ns)
        .filter(|(_, state, argv)| state != "Z" && argv.get(1).is_some_and(|a| a == "__launch"))
        .map(|(p, _, _)| p)
        .collect()
}

#[test]
fn a_job_is_the_agents_own_child_and_keeps_its_outcome_when_the_fork_server_is_killed() {
    let agent = DevAgent::start(&[]);
    let mark = agent.mark_env();
    let waits = r#"echo $$ $(readlink /proc/self/ns/pid) > "$MARK/pid"
while [ ! -e "$MARK/go" ]; do sleep 0.02; done"#;
    let first = agent.submit_one(&["--id", "waits", "--env", &mark, "--", "sh", "-c", waits]);
    let job = read_pid_file(&agent.mark().join("pid"));
    // The job runs under its init (pid 1 of its namespace), and the init is
    // the agent's own child.
    let init = parent_of(job).expect("the job is running");
    assert_eq!(
        parent_of(init),
        Some(agent.pid()),
        "the job's init's parent is the agent itself, not the fork server\n{}",
        agent.diagnostics()
    );
    let servers = fork_servers(agent.pid());
    assert_eq!(
        servers.len(),
        1,
        "one fork server per agent: {:?}\n{}",
        children(agent.pid()),
        agent.diagnostics()
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(servers[0]), Signal::SIGKILL)
        .expect("killing the fork server");
    eventually(
        "the killed fork server to be reaped",
        WAIT,
        || fork_servers(agent.pid()).is_empty(),
        || format!("{:?}", children(agent.pid())),
    );
    std::fs::write(agent.mark().join("go"), b"").expect("writing go");
    let ended = agent.wait_final(&first.message_id);
    assert_eq!(
        ended.kind,
        "job.succeeded",
        "a job outlives the fork server that forked it, and its outcome is known\n{}",
        agent.diagnostics()
    );

    // The next job finds a new server.
    let second = agent.submit_one(&["--id", "after", "--", "true"]);
    let ended = agent.wait_final(&second.message_id);
    assert_eq!(
        ended.kind,
        "job.succeeded",
        "the job after a dead fork server runs on a new one\n{}",
        agent.diagnostics()
    );
    let now = fork_servers(agent.pid());
    assert!(
        now.len() == 1 && now[0] != servers[0],
        "a new fork server replaced the killed one: before {servers:?}, now {now:?}"
    );
}

#[test]
fn after_many_jobs_the_agents_only_child_is_its_fork_server() {
    let agent = DevAgent::start(&[("BATCHLY_JOBS_MAX_CONCURRENT", "4")]);
    // Some jobs succeed, some fail, some are refused by the launcher (no
    // such command): every launcher and job is reaped either way.
    agent.submit(&["--id", "ok", "--count", "12", "--", "true"]);
    agent.submit(&[
        "--id",
        "fails",
        "--count",
        "4",
        "--max-attempts",
        "1",
        "--",
        "false",
    ]);
    agent.submit(&[
        "--id",
        "missing",
        "--count",
        "4",
        "--max-attempts",
        "1",
        "--",
        "no-such-command-here",
    ]);
    agent.wait_for("20 final events", |ev| {
        batchly_e2e::count_final(ev, None) >= 20
    });
    eventually(
        "the agent to have its fork server as its only child",
        Duration::from_secs(10),
        || children(agent.pid()).len() == 1 && fork_servers(agent.pid()).len() == 1,
        || {
            format!(
                "children of the agent: {:?}\n{}",
                children(agent.pid()),
                agent.diagnostics()
            )
        },
    );
}
