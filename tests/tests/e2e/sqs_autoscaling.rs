//! `batchly-agent run` with Auto Scaling lifecycle hooks (README
//! "Draining"): the launch hook is completed once the agent is ready, the
//! termination hook is heartbeated while the agent drains for it and
//! completed with `CONTINUE` after, also when the drain began for another
//! reason.
//!
//! The group, its instance and its hooks live in moto; moto answers
//! `DescribeAutoScalingInstances` and `DescribeLifecycleHooks` but has no
//! `CompleteLifecycleAction` or `RecordLifecycleActionHeartbeat`, so the
//! recording proxy in front of it answers those and keeps what was asked.

use std::time::{Duration, SystemTime};

use batchly_e2e::imds::{imds_time, FakeImds, Identity, SpotAction};
use batchly_e2e::sqs::proxy::{Fault, Proxy, QueryRequest};
use batchly_e2e::sqs::{marked, AgentSettings, QueueOptions, SqsAgent, SqsTest};
use batchly_e2e::{eventually, of_job, WAIT};

const COMPLETE: &str = "CompleteLifecycleAction";
const HEARTBEAT: &str = "RecordLifecycleActionHeartbeat";

/// A group of one instance in moto with a termination hook whose
/// heartbeat timeout is `heartbeat_s`; returns the instance's id.
fn group_with_hook(t: &SqsTest, group: &str, hook: &str, heartbeat_s: i32) -> String {
    let asg = &t.aws.autoscaling;
    t.aws.block_on(async {
        asg.create_launch_configuration()
            .launch_configuration_name(format!("{group}-lc"))
            .image_id("ami-12c6146b")
            .instance_type("t3.micro")
            .send()
            .await
            .expect("launch configuration");
        asg.create_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_configuration_name(format!("{group}-lc"))
            .min_size(1)
            .max_size(1)
            .desired_capacity(1)
            .availability_zones("us-east-1a")
            .send()
            .await
            .expect("auto scaling group");
        asg.put_lifecycle_hook()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
            .heartbeat_timeout(heartbeat_s)
            .send()
            .await
            .expect("lifecycle hook");
        let out = asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .expect("describe the group");
        out.auto_scaling_groups()[0].instances()[0]
            .instance_id()
            .expect("an instance id")
            .to_string()
    })
}

fn long_lease_queue(t: &SqsTest) -> String {
    t.job_queue_with(
        "jobs",
        &QueueOptions {
            visibility_s: Some(600),
            ..QueueOptions::default()
        },
    )
    .url
}

/// The completions of `hook` seen so far.
fn completions(proxy: &Proxy, hook: &str) -> Vec<QueryRequest> {
    proxy
        .query_requests(COMPLETE)
        .into_iter()
        .filter(|q| q.param("LifecycleHookName") == Some(hook))
        .collect()
}

/// An agent with hooks `launch` and `drain`, reaching AWS through `proxy`,
/// once it has tried to complete the launch hook.
fn agent_with_hooks(t: &SqsTest, url: &str, proxy: &Proxy, imds: &FakeImds) -> SqsAgent {
    let agent = t.agent(
        AgentSettings::new(url)
            .slots(2)
            .endpoint(&proxy.endpoint())
            .imds(&imds.endpoint())
            .extra("drain.launch_hook", "\"launch\"")
            .extra("drain.lifecycle_hook", "\"drain\"")
            .extra("drain.timeout_s", "30"),
    );
    eventually(
        "the agent tried to complete the launch hook",
        WAIT,
        || !completions(proxy, "launch").is_empty(),
        || agent.diagnostics(),
    );
    agent
}

fn assert_addressed(q: &QueryRequest, group: &str, instance: &str) {
    assert_eq!(q.param("AutoScalingGroupName"), Some(group), "{q:?}");
    assert_eq!(q.param("InstanceId"), Some(instance), "{q:?}");
}

#[test]
fn the_launch_hook_is_completed_when_ready_and_the_termination_hook_heartbeated_then_continued() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let instance = group_with_hook(&t, "workers", "drain", 3);
    let imds = FakeImds::start();
    imds.set_identity(&Identity {
        instance_id: instance.clone(),
        ..Identity::default()
    });
    let proxy = Proxy::start(t.moto().port());
    let answer = proxy.inject(COMPLETE, None, Fault::query_ok(COMPLETE), None);
    proxy.inject(HEARTBEAT, None, Fault::query_ok(HEARTBEAT), None);
    let mark = t.mark_env();
    let mut agent = agent_with_hooks(&t, &url, &proxy, &imds);
    let launch = completions(&proxy, "launch");
    assert_eq!(launch.len(), 1, "{launch:?}");
    assert_addressed(&launch[0], "workers", &instance);
    assert_eq!(launch[0].param("LifecycleActionResult"), Some("CONTINUE"));
    assert!(
        proxy
            .calls()
            .on_queue("-")
            .contains_key("DescribeAutoScalingInstances"),
        "no group tag in instance metadata: the group was asked of Auto Scaling: {:?}",
        proxy.calls()
    );
    assert!(
        proxy.query_requests(HEARTBEAT).is_empty(),
        "no heartbeat before any termination"
    );

    // A job that checkpoints for four seconds when told to stop.
    let work = marked("trap 'sleep 4; exit 75' TERM\nsleep 300 & wait");
    let job = t
        .submit(
            &url,
            &[
                "--id",
                "ckpt",
                "--grace-s",
                "20",
                "--env",
                &mark,
                "--",
                "sh",
                "-c",
                &work,
            ],
        )
        .remove(0);
    t.wait_started(std::slice::from_ref(&job), &[&agent]);
    // The first completion of the termination hook fails (a 5xx): retried.
    proxy.clear(answer);
    let failing = proxy.inject(
        COMPLETE,
        None,
        Fault::query_error(500, "InternalFailure", "try again"),
        Some(1),
    );
    proxy.inject(COMPLETE, None, Fault::query_ok(COMPLETE), None);
    imds.set_lifecycle_state("Terminated");
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", agent.diagnostics());

    let beats = proxy.query_requests(HEARTBEAT);
    assert!(
        beats.len() >= 2,
        "a heartbeat at once and every second (a third of the hook's 3 s) while the job checkpointed: {beats:?}\n{}",
        agent.diagnostics()
    );
    for beat in &beats {
        assert_addressed(beat, "workers", &instance);
        assert_eq!(beat.param("LifecycleHookName"), Some("drain"));
    }
    assert_eq!(proxy.hits(&failing), 1);
    let done = completions(&proxy, "drain");
    assert_eq!(done.len(), 2, "one failed, one retried: {done:?}");
    for q in &done {
        assert_addressed(q, "workers", &instance);
        assert_eq!(q.param("LifecycleActionResult"), Some("CONTINUE"));
    }
    let events = t.events();
    assert!(
        of_job(&events, &job.job_id)
            .iter()
            .any(|e| e.kind == "job.requeued"),
        "the job checkpointed and was requeued before the hook was completed: {:?}",
        of_job(&events, &job.job_id)
    );
    assert_eq!(t.aws.depth(&url).visible, 1, "its message is back");
    let log = agent.stderr();
    let completed_at = log
        .find("termination lifecycle hook completed")
        .expect("the completion is logged");
    let intake_stopped_at = log.find("intake stopped").expect("the drain is logged");
    let exiting_at = log
        .find("drained; every job finished")
        .expect("the exit is logged");
    assert!(
        intake_stopped_at < completed_at && completed_at < exiting_at,
        "the hook is completed after the jobs, just before the exit:\n{log}"
    );
}

#[test]
fn a_spot_drain_completes_the_hook_the_group_terminates_for_with_the_group_from_metadata_tags() {
    let t = SqsTest::start();
    let url = long_lease_queue(&t);
    let imds = FakeImds::start();
    imds.set_identity(&Identity {
        instance_id: "i-0tagged".into(),
        ..Identity::default()
    });
    imds.set_tags(true, &[("aws:autoscaling:groupName", "tagged-group")]);
    let proxy = Proxy::start(t.moto().port());
    // The launch action is gone (the agent restarted in service): fine.
    proxy.inject(
        COMPLETE,
        None,
        Fault::query_error(
            400,
            "ValidationError",
            "No active Lifecycle Action found with instance ID i-0tagged",
        ),
        Some(1),
    );
    proxy.inject(COMPLETE, None, Fault::query_ok(COMPLETE), None);
    proxy.inject(HEARTBEAT, None, Fault::query_ok(HEARTBEAT), None);
    let mark = t.mark_env();
    let mut agent = agent_with_hooks(&t, &url, &proxy, &imds);
    let work = marked("trap 'sleep 2; exit 75' TERM\nsleep 300 & wait");
    let job = t
        .submit(
            &url,
            &[
                "--id",
                "spot",
                "--grace-s",
                "20",
                "--env",
                &mark,
                "--",
                "sh",
                "-c",
                &work,
            ],
        )
        .remove(0);
    t.wait_started(std::slice::from_ref(&job), &[&agent]);
    assert!(agent.is_running(), "{}", agent.diagnostics());
    // The spot notice drains first; the group then takes the instance out
    // (its own termination hook) while the job checkpoints.
    let at = imds_time(SystemTime::now() + Duration::from_secs(60));
    imds.set_spot_action(SpotAction::Terminate, &at);
    imds.set_lifecycle_state("Terminated");
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", agent.diagnostics());
    let done = completions(&proxy, "drain");
    assert_eq!(done.len(), 1, "{done:?}\n{}", agent.diagnostics());
    assert_addressed(&done[0], "tagged-group", "i-0tagged");
    assert_eq!(done[0].param("LifecycleActionResult"), Some("CONTINUE"));
    assert!(
        !proxy
            .calls()
            .on_queue("-")
            .contains_key("DescribeAutoScalingInstances"),
        "the group came from the instance's tags"
    );
    assert!(
        agent
            .stderr()
            .contains("no launch lifecycle action waits for this instance"),
        "{}",
        agent.stderr()
    );
}
