//! `network: "egress"` jobs: they run in the agent's own network namespace
//! with every other isolation as before, and the instance metadata and ECS
//! credential endpoints (169.254.0.0/16, fd00:ec2::/32,
//! ::ffff:169.254.0.0/112) stay out of their reach, over TCP and UDP, by
//! two independent layers: cgroup BPF programs on the jobs' parent cgroup
//! in the unified hierarchy (any process there, root included, in any
//! network namespace) and an nftables table in the agent's namespace
//! (sockets owned by a uid of `sandbox.uid_range`). One layer is enough
//! to run egress jobs; with neither an egress job is refused.
//!
//! Every agent here runs on a fake host (`batchly_e2e::netns`): a network
//! namespace of the test's own where the metadata addresses are served, so
//! "blocked" is never "not there". Each test first checks that root
//! reached every address from the wrapper before the agent started.
//! Network "none" is covered by dev_sandbox's
//! `a_job_has_no_network_but_its_own_loopback`.

use batchly_e2e::netns::{
    attached_batchly_programs, bpf_jobs_parent, job_results, probe, submit_probe_job, FakeHost,
    HostRun, Probe, Results, TestCgroup, Who, BLOCKED, REACHABLE,
};
use batchly_e2e::{of_message, pid_alive, DevAgent, Event};

/// The harness's `jobs.max_concurrent` and the default `sandbox.uid_range`.
const SLOTS: u32 = 4;
const FIRST_UID: u32 = 1_900_000_000;
const LAST_UID: u32 = 1_900_000_999;

/// An agent on `host`; a job the agent cannot run is given up after one
/// release, so a refusal ends the wait at once.
fn start(host: &FakeHost) -> (DevAgent, HostRun) {
    let agent = host.start_agent(&[("BATCHLY_JOBS_MAX_REQUEUES", "1")]);
    let run = host.run(agent.pid());
    run.assert_setup_works();
    (agent, run)
}

/// The reasons of every event of a message, for messages.
fn reasons(agent: &DevAgent, message_id: &str) -> Vec<String> {
    of_message(&agent.events(), message_id)
        .iter()
        .map(|e| format!("{}: {}", e.kind, e.reason.as_deref().unwrap_or("-")))
        .collect()
}

/// Runs an egress job probing `probes`; it must succeed. Returns what it saw.
fn egress_job(agent: &DevAgent, id: &str, probes: &[Probe]) -> (Event, Results) {
    let job = submit_probe_job(agent, id, "egress", probes);
    let end = agent.wait_final(&job.message_id);
    assert_eq!(
        end.kind,
        "job.succeeded",
        "the egress job {id} must run and succeed; its events: {:#?}",
        reasons(agent, &job.message_id)
    );
    (end, job_results(agent, id))
}

fn all_probes() -> Vec<Probe> {
    BLOCKED.iter().chain(REACHABLE).copied().collect()
}

#[test]
fn an_egress_job_reaches_other_addresses_but_no_metadata_endpoint_over_tcp_or_udp() {
    let host = FakeHost::new();
    let (agent, run) = start(&host);

    let (_, seen) = egress_job(&agent, "egress-probe", &all_probes());
    let uid: u32 = seen.get("uid").parse().expect("a uid");
    assert!(
        (FIRST_UID..FIRST_UID + SLOTS).contains(&uid),
        "an egress job still runs as its slot's uid, not {uid}\n{}",
        seen.text
    );
    assert_eq!(
        seen.get("netns"),
        run.netns_id(),
        "an egress job runs in the agent's own network namespace, not a fresh one"
    );
    assert!(
        seen.get("cgroup").contains("/batchly/job-"),
        "an egress job runs in a job cgroup under the jobs' parent in the unified hierarchy\n{}",
        seen.text
    );
    seen.assert_blocked(BLOCKED, "metadata and ECS endpoints are closed to jobs");
    seen.assert_reached(REACHABLE, "any other address works");
    let leaked = run.received("egress-probe", BLOCKED);
    assert!(
        leaked.is_empty(),
        "nothing the job sent reached a metadata address: {leaked:#?}"
    );
    for p in REACHABLE {
        assert!(
            !run.received("egress-probe", &[*p]).is_empty(),
            "the server got {} from the job\n{}",
            p.name,
            run.server_log()
        );
    }

    // The block is the jobs' alone: root outside any job (the agent, say)
    // still reaches the metadata service in the same namespace.
    let root = run.probe(Who::Root, "root-after-job", &all_probes());
    root.assert_reached(BLOCKED, "root outside the jobs is not blocked");
    root.assert_reached(REACHABLE, "root outside the jobs is not blocked");

    // The agent is unharmed, and the next egress job (the layers already
    // in place) is held to the same rules.
    assert!(pid_alive(agent.pid()), "the agent is unharmed");
    let again = [probe("md_tcp"), probe("md_udp_sendto"), probe("other_tcp")];
    let (_, seen) = egress_job(&agent, "egress-again", &again);
    seen.assert_blocked(&again[..2], "the second egress job too");
    seen.assert_reached(&again[2..], "the second egress job too");
}

#[test]
fn the_bpf_layer_blocks_root_in_the_jobs_cgroup_tree_also_while_the_agent_is_down() {
    // Its own jobs' parent: what is attached there, this agent attached.
    let host = FakeHost::new().in_own_cgroup();
    let (mut agent, run) = start(&host);
    let parent = bpf_jobs_parent(agent.pid())
        .expect("this test needs a cgroup2 mount (the unified hierarchy) visible to the agent");
    assert!(
        parent.is_dir(),
        "at start the agent makes its jobs' parent {} in the unified hierarchy\n{}",
        parent.display(),
        agent.diagnostics()
    );
    let count_attached = |when: &str| {
        // Only bpftool can count them; without it this check is skipped.
        if let Some(programs) = attached_batchly_programs(&parent) {
            let mut types: Vec<&str> = programs.iter().map(|(t, _)| t.as_str()).collect();
            types.sort_unstable();
            types.dedup();
            assert!(
                programs.len() == 4 && types.len() == 4,
                "{when}: one batchly_md* program each for connect4, connect6, sendmsg4 \
                 and sendmsg6 on {}, not {programs:?}",
                parent.display()
            );
        }
    };
    count_attached("after the agent started");

    // A root shell that is no job (uid 0 is outside sandbox.uid_range, so
    // the nft layer does not apply: the errno is BPF's own).
    let cgroup = TestCgroup::create(&parent);
    let name = cgroup
        .path
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned();
    let blocked = [
        probe("md_tcp"),
        probe("md_udp_sendto"),
        probe("md_udp_connect"),
        probe("ecs_tcp"),
        probe("md6_tcp"),
        probe("md6_udp_sendto"),
        probe("mapped_tcp"),
        probe("mapped_udp_sendto"),
    ];
    let open = [
        probe("other_tcp"),
        probe("other_udp_sendto"),
        probe("other6_tcp"),
    ];
    let probes: Vec<Probe> = blocked.iter().chain(&open).copied().collect();
    let check = |run: &HostRun, when: &str| {
        let seen = run.probe(Who::RootIn(&cgroup.path), when, &probes);
        assert!(
            seen.get("cgroup").ends_with(&format!("/batchly/{name}")),
            "{when}: the probe ran in the test's cgroup {}\n{}",
            cgroup.path.display(),
            seen.text
        );
        assert_eq!(seen.get("uid"), "0", "{when}: root");
        for p in &blocked {
            assert_eq!(
                seen.get(p.name),
                "failed:EPERM",
                "{when}: root in the jobs' cgroup tree is refused {} by the BPF programs\n{}",
                p.name,
                seen.text
            );
        }
        seen.assert_reached(&open, when);
        assert!(
            run.received(when, &blocked).is_empty(),
            "{when}: nothing reached a metadata address\n{}",
            run.server_log()
        );
        // The same root outside that tree reaches everything: it is the
        // cgroup that blocks, not the namespace.
        let outside = run.probe(Who::Root, &format!("{when}-outside"), &probes);
        outside.assert_reached(&probes, "root outside the jobs' cgroup tree");
    };
    check(&run, "agent-running");

    agent.sigkill();
    agent.wait_exit();
    check(&run, "agent-killed");

    // A restart (a new namespace: the programs hold in any) adds no copy.
    agent.restart();
    let second = host.run(agent.pid());
    second.assert_setup_works();
    count_attached("after a restart");
    check(&second, "agent-restarted");
}

#[test]
fn the_nft_layer_rejects_the_uid_range_outside_the_bpf_cgroup_and_outlives_the_agent() {
    let host = FakeHost::new();
    let (mut agent, run) = start(&host);
    // The table comes with the first egress job.
    let (_, seen) = egress_job(&agent, "first-egress", &[probe("other_tcp")]);
    seen.assert_reached(
        &[probe("other_tcp")],
        "an egress job reaches other addresses",
    );

    let table = |when: &str| {
        let out = run.nft(&["list", "table", "inet", "batchly_egress"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("skuid"),
            "{when}: `nft list table inet batchly_egress` shows the table, matching on the \
             socket's uid ({:?}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    table("after the first egress job");

    let blocked = [
        probe("md_tcp"),
        probe("md_udp_sendto"),
        probe("md_udp_connect"),
        probe("ecs_tcp"),
        probe("md6_tcp"),
        probe("md6_udp_sendto"),
        probe("mapped_tcp"),
        probe("mapped_udp_sendto"),
    ];
    let open = [
        probe("other_tcp"),
        probe("other_udp_sendto"),
        probe("other6_tcp"),
    ];
    let all: Vec<Probe> = blocked.iter().chain(&open).copied().collect();
    let check = |when: &str| {
        // A uid of the range that is no slot's, not in the BPF cgroup.
        let seen = run.probe(Who::Uid(1_900_000_007), &format!("{when}-in-range"), &all);
        assert!(
            !seen.get("cgroup").contains("batchly"),
            "{when}: this probe is outside the BPF layer's cgroup tree\n{}",
            seen.text
        );
        seen.assert_blocked(&blocked, "a uid of sandbox.uid_range, by the nft layer");
        seen.assert_reached(&open, "other addresses stay open to the uid range");
        assert!(
            run.received(&format!("{when}-in-range"), &blocked)
                .is_empty(),
            "{when}: nothing from the uid range reached a metadata address\n{}",
            run.server_log()
        );
        // Both ends of the range.
        for uid in [FIRST_UID, LAST_UID] {
            run.probe(Who::Uid(uid), &format!("{when}-{uid}"), &blocked[..1])
                .assert_blocked(&blocked[..1], "the range's first and last uid");
        }
        // Just outside the range the metadata service is reachable: the
        // rule is on the range, not on every unprivileged uid.
        run.probe(Who::Uid(FIRST_UID - 1), &format!("{when}-below"), &all)
            .assert_reached(&all, "uid 1899999999 is outside sandbox.uid_range");
        run.probe(
            Who::Uid(LAST_UID + 1),
            &format!("{when}-above"),
            &blocked[..1],
        )
        .assert_reached(&blocked[..1], "uid 1900001000 is outside sandbox.uid_range");
    };
    check("agent-running");

    // A clean exit (where an agent could tidy up) leaves the table.
    agent.sigterm();
    let status = agent.wait_exit();
    assert!(status.success(), "the agent drains and exits 0: {status:?}");
    table("after the agent exited");
    check("agent-gone");
}

#[test]
fn with_no_nft_on_its_path_an_egress_job_still_runs_with_metadata_blocked_by_bpf() {
    // Its own jobs' parent: the programs an earlier agent left on the
    // shared one cannot stand in for this agent's.
    let host = FakeHost::new().without_nft().in_own_cgroup();
    let (agent, run) = start(&host);
    let (_, seen) = egress_job(&agent, "bpf-only", &all_probes());
    let cgroup = host.agent_cgroup().expect("in its own cgroup");
    let name = cgroup.file_name().expect("a name").to_string_lossy();
    assert!(
        seen.get("cgroup")
            .contains(&format!("/{name}/batchly/job-")),
        "the job runs under this agent's jobs' parent in the unified hierarchy\n{}",
        seen.text
    );
    // BPF refuses with EPERM; a reject by nft would be ECONNREFUSED.
    for name in ["md_tcp", "ecs_tcp", "md6_tcp", "mapped_tcp"] {
        assert_eq!(
            seen.get(name),
            "failed:EPERM",
            "{name} is refused by the BPF layer\n{}",
            seen.text
        );
    }
    seen.assert_blocked(BLOCKED, "the BPF layer alone closes every way");
    seen.assert_reached(REACHABLE, "any other address works");
    assert!(
        run.received("bpf-only", BLOCKED).is_empty(),
        "nothing reached a metadata address\n{}",
        run.server_log()
    );
    let tables = run.nft(&["list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("batchly_egress"),
        "an agent without nft on its PATH installed no table (so BPF alone blocked): {tables:?}"
    );
    let stderr = agent.stderr();
    assert!(
        stderr.to_lowercase().contains("nft"),
        "the agent warns that the nft layer is missing; its stderr:\n{stderr}"
    );
}

#[test]
fn with_neither_layer_an_egress_job_is_refused_before_it_starts_saying_why() {
    let host = FakeHost::new().without_nft().hiding_cgroup2();
    let (agent, _run) = start(&host);
    assert_eq!(
        bpf_jobs_parent(agent.pid()),
        None,
        "the agent sees no cgroup2 mount (the test's premise)"
    );
    let job = submit_probe_job(&agent, "wants-egress", "egress", &[probe("md_tcp")]);
    let end = agent.wait_final(&job.message_id);
    let all = agent.events();
    let events = of_message(&all, &job.message_id);
    assert!(
        !events.iter().any(|e| e.kind == "job.started"),
        "an egress job with no layer to protect it never starts: {events:#?}"
    );
    assert!(
        !agent.mark().join("wants-egress.results").exists(),
        "the job's command never ran"
    );
    assert!(end.is_final, "{end:?}");
    // The refusal may be final at once or after the agent gave up
    // releasing it (`agent_gave_up`, the refusal in `detail`): either way
    // the final event says what is missing.
    let said = format!(
        "{} {}",
        end.reason.as_deref().unwrap_or_default(),
        end.raw["detail"].as_str().unwrap_or_default()
    );
    assert!(
        said.contains("egress"),
        "the final event names egress: {said:?}"
    );
    let lower = said.to_lowercase();
    assert!(
        lower.contains("nft") && lower.contains("cgroup"),
        "the final event says why each layer is missing (no nft on the PATH, no cgroup2 \
         mount): {said:?}"
    );

    // The agent is unharmed: a job with network "none" runs.
    let next = agent.submit_one(&["--id", "none-after", "--", "true"]);
    assert_eq!(
        agent.wait_final(&next.message_id).kind,
        "job.succeeded",
        "{}",
        agent.diagnostics()
    );
}
