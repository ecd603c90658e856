//! The deployment files agree with the agent and with each other: the ECS
//! task definition gives the sandbox what it needs and drains in time, it
//! and the CloudFormation user data set only real config keys, the IAM
//! policy grants exactly the calls the agent's code makes, and the policy in
//! the CloudFormation template is the one in packaging/iam.
//!
//! Everything here reads files; nothing talks to AWS. The tools that know
//! AWS's own rules (cfn-lint, checkov, parliament, hadolint, packer) run in
//! scripts/check-deploy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use batchly_agent::config::{Config, ConfigFile};
use serde_json::Value;

/// ECS's longest stop timeout (the task definition's `stopTimeout`).
const ECS_MAX_STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// The example deployment packaging/iam/batchly-agent-policy.json is
/// written for: a stack named `batchly` in eu-west-1 of account
/// 123456789012, with the template's parameter defaults.
const EXAMPLE: &[(&str, &str)] = &[
    ("AWS::Partition", "aws"),
    ("AWS::Region", "eu-west-1"),
    ("AWS::AccountId", "123456789012"),
    ("AWS::StackName", "batchly"),
    ("AWS::URLSuffix", "amazonaws.com"),
    (
        "JobQueue",
        "https://sqs.eu-west-1.amazonaws.com/123456789012/batchly-jobs",
    ),
    (
        "JobQueue.Arn",
        "arn:aws:sqs:eu-west-1:123456789012:batchly-jobs",
    ),
    (
        "DeadLetterQueue.Arn",
        "arn:aws:sqs:eu-west-1:123456789012:batchly-jobs-dead-letter",
    ),
    (
        "EventsQueue",
        "https://sqs.eu-west-1.amazonaws.com/123456789012/batchly-events",
    ),
    (
        "EventsQueue.Arn",
        "arn:aws:sqs:eu-west-1:123456789012:batchly-events",
    ),
    ("DataBucketName", "batchly-data"),
    ("InputPrefix", "inputs/"),
    ("OutputPrefix", "outputs/"),
    (
        "DataBucketKmsKeyArn",
        "arn:aws:kms:eu-west-1:123456789012:key/0a1b2c3d-4e5f-4a1b-8c2d-3e4f5a6b7c8d",
    ),
    ("LogGroup", "/batchly/jobs"),
    ("MetricNamespace", "Batchly/Agent"),
    ("DrainTimeout", "90"),
    ("VerificationKeyId", "prod-2026-11"),
    (
        "VerificationPublicKey",
        "Blk3lJIEUHMTzugVcdTtcCQgPcjHjEG3c4GmCYrPces=",
    ),
];

/// The example's queues, as the template names them from the stack name.
const QUEUE_NAMES: &[(&str, &str)] = &[
    ("JobQueue", "${AWS::StackName}-jobs"),
    ("DeadLetterQueue", "${AWS::StackName}-jobs-dead-letter"),
    ("EventsQueue", "${AWS::StackName}-events"),
];

/// The agent's SDK calls and the IAM action that authorizes each. Batch
/// calls are authorized by their single-message action; S3's multipart
/// calls other than abort by `s3:PutObject`. Calls the agent might plausibly
/// grow are listed too, so a new one fails the test until the policy says
/// whether to grant it.
const SDK_CALLS: &[(&str, &str)] = &[
    ("receive_message", "sqs:ReceiveMessage"),
    ("delete_message", "sqs:DeleteMessage"),
    ("delete_message_batch", "sqs:DeleteMessage"),
    ("change_message_visibility", "sqs:ChangeMessageVisibility"),
    (
        "change_message_visibility_batch",
        "sqs:ChangeMessageVisibility",
    ),
    ("send_message", "sqs:SendMessage"),
    ("send_message_batch", "sqs:SendMessage"),
    ("get_queue_attributes", "sqs:GetQueueAttributes"),
    ("get_queue_url", "sqs:GetQueueUrl"),
    (
        "list_dead_letter_source_queues",
        "sqs:ListDeadLetterSourceQueues",
    ),
    ("purge_queue", "sqs:PurgeQueue"),
    ("get_object", "s3:GetObject"),
    ("head_object", "s3:GetObject"),
    ("get_object_attributes", "s3:GetObjectAttributes"),
    ("put_object", "s3:PutObject"),
    ("create_multipart_upload", "s3:PutObject"),
    ("upload_part", "s3:PutObject"),
    ("complete_multipart_upload", "s3:PutObject"),
    ("abort_multipart_upload", "s3:AbortMultipartUpload"),
    ("list_multipart_uploads", "s3:ListBucketMultipartUploads"),
    ("list_parts", "s3:ListMultipartUploadParts"),
    ("list_objects_v2", "s3:ListBucket"),
    ("copy_object", "s3:PutObject"),
    ("delete_object", "s3:DeleteObject"),
    (
        "complete_lifecycle_action",
        "autoscaling:CompleteLifecycleAction",
    ),
    (
        "record_lifecycle_action_heartbeat",
        "autoscaling:RecordLifecycleActionHeartbeat",
    ),
    (
        "describe_lifecycle_hooks",
        "autoscaling:DescribeLifecycleHooks",
    ),
    (
        "describe_auto_scaling_instances",
        "autoscaling:DescribeAutoScalingInstances",
    ),
    (
        "describe_auto_scaling_groups",
        "autoscaling:DescribeAutoScalingGroups",
    ),
    (
        "set_instance_protection",
        "autoscaling:SetInstanceProtection",
    ),
    ("create_log_group", "logs:CreateLogGroup"),
    ("create_log_stream", "logs:CreateLogStream"),
    ("put_log_events", "logs:PutLogEvents"),
    ("describe_log_streams", "logs:DescribeLogStreams"),
    ("put_retention_policy", "logs:PutRetentionPolicy"),
    ("put_metric_data", "cloudwatch:PutMetricData"),
];

/// Actions the agent calls that the policy leaves out on purpose.
const NOT_GRANTED: &[(&str, &str)] = &[(
    "logs:CreateLogGroup",
    "called only when the group is missing; the stack (or the operator) makes it, with retention and a key",
)];

/// Actions AWS authorizes on no resource narrower than `*`.
const STAR_ONLY: &[&str] = &[
    "autoscaling:DescribeAutoScalingInstances",
    "autoscaling:DescribeLifecycleHooks",
    "cloudwatch:PutMetricData",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits one level below the workspace root")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn json(relative: &str) -> Value {
    serde_json::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn task_definition() -> Value {
    json("packaging/ecs/task-definition.json")
}

fn policy() -> Value {
    json("packaging/iam/batchly-agent-policy.json")
}

fn template() -> String {
    read("packaging/cloudformation/batchly-worker.yaml")
}

/// The one container of the task definition.
fn agent_container(task: &Value) -> &Value {
    let containers = task["containerDefinitions"]
        .as_array()
        .expect("containerDefinitions is an array");
    assert_eq!(
        containers.len(),
        1,
        "the daemon task runs the agent alone: the sandbox's jobs are its children, not sibling containers"
    );
    &containers[0]
}

fn environment(container: &Value) -> Vec<(String, String)> {
    container["environment"]
        .as_array()
        .expect("environment is an array")
        .iter()
        .map(|pair| {
            let name = pair["name"].as_str().expect("environment name is a string");
            let value = pair["value"]
                .as_str()
                .expect("environment value is a string");
            (name.to_string(), value.to_string())
        })
        .collect()
}

/// The agent's configuration from `env` alone, as `run` would load it.
fn load_config(env: &[(String, String)], what: &str) -> Config {
    Config::load(ConfigFile::None, env, &[])
        .unwrap_or_else(|e| panic!("{what} is not a configuration the agent accepts: {e}"))
}

fn statements(policy: &Value) -> &Vec<Value> {
    policy["Statement"]
        .as_array()
        .expect("Statement is an array")
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().expect("a string").to_string())
            .collect(),
        other => panic!("expected a string or an array of strings, got {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The ECS task definition
// ---------------------------------------------------------------------------------------------

#[test]
fn task_definition_is_a_host_network_ec2_task_a_daemon_service_can_run() {
    let task = task_definition();
    assert_eq!(task["family"], "batchly-agent");
    assert_eq!(
        task["requiresCompatibilities"],
        serde_json::json!(["EC2"]),
        "a daemon service places one task on every EC2 container instance; Fargate has no instances to hold"
    );
    assert_eq!(
        task["networkMode"], "host",
        "host networking: IMDSv2 with hop limit 1 answers only in the instance's own network namespace, and the agent needs it for spot notices"
    );
    let container = agent_container(&task);
    assert_eq!(container["essential"], true);
    for key in ["name", "image"] {
        assert!(
            container[key].as_str().is_some_and(|s| !s.is_empty()),
            "the container needs a {key}"
        );
    }
    assert_eq!(container["command"], serde_json::json!(["run"]));
}

#[test]
fn task_definition_gives_the_sandbox_root_privileges_and_its_own_pid_namespace() {
    let task = task_definition();
    let container = agent_container(&task);
    assert_eq!(
        container["privileged"], true,
        "namespaces, a fresh /proc, writable cgroups and nftables need a privileged container"
    );
    assert_eq!(container["user"], "0", "the sandbox needs root");
    assert_eq!(
        container["linuxParameters"]["initProcessEnabled"], true,
        "an init as PID 1 reaps what the agent does not and passes SIGTERM on"
    );
    for (key, why) in [
        ("pidMode", "host processes are none of the agent's business"),
        ("ipcMode", "jobs get their own IPC namespace"),
    ] {
        assert_ne!(task[key], "host", "{key} must not be host: {why}");
    }
    assert!(
        container.get("memory").is_none(),
        "no hard memory limit: every job runs in the agent container's cgroup, so one would cap them all together"
    );
    assert!(
        container["memoryReservation"]
            .as_u64()
            .is_some_and(|m| m > 0),
        "EC2 tasks need memory or memoryReservation; a reservation is soft"
    );
    let nofile = container["ulimits"]
        .as_array()
        .expect("ulimits is an array")
        .iter()
        .find(|u| u["name"] == "nofile")
        .expect("a nofile ulimit");
    assert!(
        nofile["hardLimit"].as_u64().is_some_and(|n| n >= 65536),
        "jobs get 65536 open files; the agent cannot raise its hard limit in a container"
    );
}

#[test]
fn task_definition_keeps_state_on_the_host_and_config_read_only() {
    let task = task_definition();
    let container = agent_container(&task);
    let host_path = |volume: &str| {
        task["volumes"]
            .as_array()
            .expect("volumes is an array")
            .iter()
            .find(|v| v["name"] == volume)
            .and_then(|v| v["host"]["sourcePath"].as_str())
            .unwrap_or_else(|| panic!("volume {volume} is not a host volume"))
            .to_string()
    };
    let mounts: BTreeMap<String, (String, bool)> = container["mountPoints"]
        .as_array()
        .expect("mountPoints is an array")
        .iter()
        .map(|m| {
            let path = m["containerPath"]
                .as_str()
                .expect("containerPath")
                .to_string();
            let volume = m["sourceVolume"].as_str().expect("sourceVolume");
            (path, (host_path(volume), m["readOnly"] == true))
        })
        .collect();
    assert_eq!(
        mounts.get("/var/lib/batchly"),
        Some(&("/var/lib/batchly".to_string(), false)),
        "state, work dirs and the log spool must outlive the container, so a restart recovers its jobs and ships their logs"
    );
    assert_eq!(
        mounts.get("/etc/batchly"),
        Some(&("/etc/batchly".to_string(), true)),
        "the keys file comes from the host, read-only"
    );
    if container["readonlyRootFilesystem"] == true {
        let tmpfs: BTreeSet<&str> = container["linuxParameters"]["tmpfs"]
            .as_array()
            .expect("a read-only root needs tmpfs mounts")
            .iter()
            .filter_map(|t| t["containerPath"].as_str())
            .collect();
        for path in ["/run", "/tmp"] {
            assert!(
                tmpfs.contains(path),
                "with a read-only root, {path} must be a tmpfs (the admin socket lives in /run/batchly)"
            );
        }
    }
}

#[test]
fn task_definition_stop_timeout_covers_the_whole_drain() {
    let task = task_definition();
    let container = agent_container(&task);
    let config = load_config(&environment(container), "the task definition's environment");
    let stop = Duration::from_secs(
        container["stopTimeout"]
            .as_u64()
            .expect("stopTimeout is set (else ECS's 30 s default cuts the drain short)"),
    );
    assert!(
        stop <= ECS_MAX_STOP_TIMEOUT,
        "ECS allows at most {ECS_MAX_STOP_TIMEOUT:?}, got {stop:?}"
    );
    let needed = config.drain.timeout + batchly_agent::lifecycle::COMPLETE_BUDGET;
    assert!(
        stop >= needed,
        "stopTimeout {stop:?} is shorter than drain.timeout_s ({:?}) plus the lifecycle hook's completion budget ({:?}): ECS would SIGKILL the agent mid-drain",
        config.drain.timeout,
        batchly_agent::lifecycle::COMPLETE_BUDGET
    );
}

#[test]
fn task_definition_uses_the_task_role_and_embeds_no_credentials() {
    let task = task_definition();
    let role = task["taskRoleArn"].as_str().expect("taskRoleArn is set");
    assert!(
        role.starts_with("arn:aws:iam::") && role.contains(":role/"),
        "taskRoleArn {role} is not a role ARN"
    );
    let container = agent_container(&task);
    for (name, value) in environment(container) {
        for forbidden in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        ] {
            assert_ne!(
                name, forbidden,
                "{name} must not be set: credentials come from the task role, which ECS serves itself"
            );
        }
        assert_ne!(
            name, "AWS_EC2_METADATA_DISABLED",
            "the agent reads spot notices and lifecycle states from instance metadata"
        );
        assert!(
            !looks_like_access_key(&value),
            "{name} holds what looks like an AWS access key id"
        );
    }
    let text = read("packaging/ecs/task-definition.json");
    for word in text.split(|c: char| !c.is_ascii_alphanumeric()) {
        assert!(
            !looks_like_access_key(word),
            "the task definition holds what looks like an AWS access key id: {word}"
        );
    }
    let lower = text.to_lowercase();
    for marker in ["secret", "password", "private_key", "-----begin"] {
        assert!(
            !lower.contains(marker),
            "the task definition mentions {marker:?}: nothing secret belongs in it"
        );
    }
}

/// An access key id: AKIA (long-term) or ASIA (temporary) and 16 more.
fn looks_like_access_key(word: &str) -> bool {
    word.len() >= 20
        && (word.starts_with("AKIA") || word.starts_with("ASIA"))
        && word
            .chars()
            .take(20)
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

#[test]
fn task_definition_sends_the_agents_output_to_awslogs_without_blocking_it() {
    let task = task_definition();
    let container = agent_container(&task);
    let logs = &container["logConfiguration"];
    assert_eq!(logs["logDriver"], "awslogs");
    let options = &logs["options"];
    for key in ["awslogs-group", "awslogs-region", "awslogs-stream-prefix"] {
        assert!(
            options[key].as_str().is_some_and(|s| !s.is_empty()),
            "awslogs needs {key}"
        );
    }
    assert_eq!(
        options["mode"], "non-blocking",
        "in blocking mode a CloudWatch Logs outage would stall the agent's writes to stderr"
    );
    let env: BTreeMap<String, String> = environment(container).into_iter().collect();
    assert_eq!(
        options["awslogs-region"].as_str(),
        env.get("AWS_REGION").map(String::as_str),
        "the agent's region and its log driver's should be the same"
    );
    let config = load_config(&environment(container), "the task definition's environment");
    assert_ne!(
        options["awslogs-group"].as_str(),
        Some(config.logs.group.as_str()),
        "the container's stderr and the agent's shipped logs would mix in one group"
    );
}

// ---------------------------------------------------------------------------------------------
// The IAM policy
// ---------------------------------------------------------------------------------------------

#[test]
fn iam_policy_grants_exactly_the_calls_the_agent_makes() {
    let used = actions_the_agent_calls();
    let mut expected: BTreeSet<String> = used.clone();
    for (action, _why) in NOT_GRANTED {
        assert!(
            used.contains(*action),
            "{action} is listed as left out, but the agent no longer calls it"
        );
        expected.remove(*action);
    }
    let granted: BTreeSet<String> = statements(&policy())
        .iter()
        .flat_map(|s| strings(&s["Action"]))
        .collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the policy and the agent's calls differ: the agent calls but the policy lacks {missing:?}; the policy grants but the agent never calls {extra:?}"
    );
}

/// The IAM actions of the SDK calls in the agent's non-test code.
fn actions_the_agent_calls() -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for file in rust_files(&root().join("agent/src")) {
        let code = without_test_code(&read_path(&file));
        for (call, action) in SDK_CALLS {
            if code.contains(&format!(".{call}()")) {
                used.insert((*action).to_string());
            }
        }
    }
    assert!(
        used.contains("sqs:ReceiveMessage"),
        "found no SDK calls at all in agent/src: is the scan broken?"
    );
    used
}

fn read_path(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every .rs file below `dir`, except modules declared `#[cfg(test)] mod x;`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut test_only = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = read_path(&path);
                let lines: Vec<&str> = text.lines().map(str::trim).collect();
                for pair in lines.windows(2) {
                    if pair[0] == "#[cfg(test)]"
                        && pair[1].starts_with("mod ")
                        && pair[1].ends_with(';')
                    {
                        let name = pair[1].trim_start_matches("mod ").trim_end_matches(';');
                        let parent = path.parent().expect("a file has a parent");
                        test_only.insert(parent.join(format!("{name}.rs")));
                        test_only.insert(parent.join(name).join("mod.rs"));
                    }
                }
                files.push(path);
            }
        }
    }
    files.retain(|f| !test_only.contains(f));
    files
}

/// `code` without the items marked `#[cfg(test)]` (brace-balanced items
/// or one-line declarations).
fn without_test_code(code: &str) -> String {
    let mut out = String::new();
    let mut lines = code.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "#[cfg(test)]" {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut depth = 0i64;
        let mut opened = false;
        for item in lines.by_ref() {
            depth += item.matches('{').count() as i64 - item.matches('}').count() as i64;
            opened |= item.contains('{');
            if (opened && depth <= 0) || (!opened && item.trim_end().ends_with(';')) {
                break;
            }
        }
    }
    out
}

#[test]
fn iam_policy_uses_star_resources_only_where_aws_allows_nothing_narrower() {
    for statement in statements(&policy()) {
        let sid = statement["Sid"]
            .as_str()
            .expect("every statement has a Sid");
        assert_eq!(statement["Effect"], "Allow", "{sid}");
        for key in ["NotAction", "NotResource", "NotPrincipal"] {
            assert!(statement.get(key).is_none(), "{sid} uses {key}");
        }
        let actions = strings(&statement["Action"]);
        for action in &actions {
            assert!(
                !action.contains('*'),
                "{sid} grants a wildcard action {action}"
            );
        }
        let resources = strings(&statement["Resource"]);
        if resources.iter().any(|r| r == "*") {
            for action in &actions {
                assert!(
                    STAR_ONLY.contains(&action.as_str()),
                    "{sid} grants {action} on every resource, but it can be scoped"
                );
            }
        }
        if actions.iter().any(|a| a == "cloudwatch:PutMetricData") {
            assert_eq!(
                statement["Condition"]["StringEquals"]["cloudwatch:namespace"], "Batchly/Agent",
                "{sid}: PutMetricData is limited to the agent's namespace"
            );
        }
        if actions
            .iter()
            .any(|a| a.starts_with("autoscaling:") && !a.starts_with("autoscaling:Describe"))
        {
            assert_eq!(
                statement["Condition"]["StringEquals"]["aws:ResourceTag/platform:managed-by"],
                "batchly",
                "{sid}: lifecycle actions only on groups carrying the platform's tag"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CloudFormation template
// ---------------------------------------------------------------------------------------------

#[test]
fn cloudformation_policy_is_the_iam_policy_for_the_example_stack() {
    let from_template = template_policy(&example_values(), &conditions(false));
    let expected = policy();
    let by_sid = |p: &Value| -> BTreeMap<String, Value> {
        statements(p)
            .iter()
            .map(|s| (s["Sid"].as_str().expect("Sid").to_string(), s.clone()))
            .collect()
    };
    let (ours, theirs) = (by_sid(&from_template), by_sid(&expected));
    for (sid, statement) in &theirs {
        assert_eq!(
            ours.get(sid),
            Some(statement),
            "statement {sid} differs between the template and packaging/iam/batchly-agent-policy.json"
        );
    }
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "the template and packaging/iam/batchly-agent-policy.json have different statements"
    );
    assert_eq!(
        from_template, expected,
        "same statements, but not in the same order or with another Version"
    );
}

#[test]
fn cloudformation_policy_uses_the_bucket_key_only_through_s3() {
    let with_key = template_policy(&example_values(), &conditions(true));
    let kms: Vec<&Value> = statements(&with_key)
        .iter()
        .filter(|s| strings(&s["Action"]).iter().any(|a| a.starts_with("kms:")))
        .collect();
    assert_eq!(kms.len(), 1, "one KMS statement when the bucket has a key");
    let statement = kms[0];
    assert_eq!(
        statement["Resource"],
        example_values()["DataBucketKmsKeyArn"],
        "only the bucket's key"
    );
    assert_eq!(
        statement["Condition"]["StringEquals"]["kms:ViaService"], "s3.eu-west-1.amazonaws.com",
        "the key only through S3"
    );
}

#[test]
fn cloudformation_names_its_queues_as_the_policy_example_does() {
    let text = template();
    for (resource, name) in QUEUE_NAMES {
        let resource_text = resource_block(&text, resource);
        assert!(
            resource_text.contains("Type: AWS::SQS::Queue"),
            "{resource} is not a queue"
        );
        assert!(
            resource_text.contains(&format!("QueueName: !Sub \"{name}\"")),
            "{resource} is not named {name}, which the policy's example ARNs assume"
        );
    }
}

/// The lines of resource `name` in the template: from its `  name:` line
/// to the next line indented as little.
fn resource_block<'a>(text: &'a str, name: &str) -> &'a str {
    let declared = format!("\n  {name}:\n");
    let start = text
        .find(&declared)
        .unwrap_or_else(|| panic!("the template declares no resource {name}"))
        + 1;
    let mut end = start;
    for (i, line) in text[start..].split_inclusive('\n').enumerate() {
        let top_level =
            (line.starts_with("  ") && !line.starts_with("   ")) || !line.starts_with(' ');
        if i > 0 && top_level && !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            break;
        }
        end += line.len();
    }
    &text[start..end]
}

#[test]
fn cloudformation_user_data_sets_only_real_config_keys_and_the_groups_hooks() {
    let text = template();
    let values = example_values();
    let env: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .map(|assignment| {
            let (name, value) = assignment
                .split_once('=')
                .unwrap_or_else(|| panic!("Environment={assignment} has no value"));
            (name.to_string(), substitute(value, &values))
        })
        .collect();
    let batchly: Vec<_> = env
        .iter()
        .filter(|(n, _)| n.starts_with("BATCHLY_"))
        .collect();
    assert!(
        batchly.len() >= 4,
        "found too few BATCHLY_ settings in the user data: {env:?}"
    );
    let config = load_config(&env, "the launch template's user data");
    let hook = |transition: &str| -> String {
        let at = text
            .find(&format!("LifecycleTransition: {transition}"))
            .unwrap_or_else(|| panic!("the group has no {transition} hook"));
        let before = &text[..at];
        let name_line = before
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("- LifecycleHookName: "))
            .expect("the hook has a name");
        name_line.trim().to_string()
    };
    assert_eq!(
        config.drain.lifecycle_hook.as_deref(),
        Some(hook("autoscaling:EC2_INSTANCE_TERMINATING").as_str()),
        "the agent must heartbeat and complete the group's termination hook"
    );
    assert_eq!(
        config.drain.launch_hook.as_deref(),
        Some(hook("autoscaling:EC2_INSTANCE_LAUNCHING").as_str()),
        "the agent must complete the group's launch hook"
    );
    assert_eq!(config.logs.group, "/batchly/jobs");
    assert_eq!(config.metrics.namespace, "Batchly/Agent");
}

fn example_values() -> serde_json::Map<String, Value> {
    EXAMPLE
        .iter()
        .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
        .collect()
}

fn conditions(bucket_key: bool) -> BTreeMap<&'static str, bool> {
    BTreeMap::from([("HasDataBucketKmsKey", bucket_key)])
}

/// The template's `AgentPolicy` document, with CloudFormation's functions
/// worked out for `values` and `conditions`.
fn template_policy(
    values: &serde_json::Map<String, Value>,
    conditions: &BTreeMap<&'static str, bool>,
) -> Value {
    let text = template();
    let begin = text
        .find("# agent-policy-begin\n")
        .expect("the template marks the start of the agent's policy");
    let end = text
        .find("# agent-policy-end")
        .expect("the template marks the end of the agent's policy");
    let block = text[begin..end]
        .split_once("PolicyDocument:")
        .expect("a PolicyDocument between the markers")
        .1;
    let document: Value = serde_json::from_str(block)
        .unwrap_or_else(|e| panic!("the template's agent policy is not JSON: {e}"));
    evaluate(&document, values, conditions).expect("the policy document itself is not removed")
}

/// `Ref`, `Fn::GetAtt`, `Fn::Sub` and `Fn::If` as CloudFormation works them
/// out; `None` for `AWS::NoValue`.
fn evaluate(
    node: &Value,
    values: &serde_json::Map<String, Value>,
    conditions: &BTreeMap<&'static str, bool>,
) -> Option<Value> {
    let lookup = |name: &str| -> Value {
        values
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("the test has no example value for {name}"))
    };
    match node {
        Value::Object(map) if map.len() == 1 => {
            let (function, argument) = map.iter().next().expect("one entry");
            match function.as_str() {
                "Ref" => {
                    let name = argument.as_str().expect("Ref takes a name");
                    (name != "AWS::NoValue").then(|| lookup(name))
                }
                "Fn::GetAtt" => {
                    let parts = strings(argument);
                    Some(lookup(&parts.join(".")))
                }
                "Fn::Sub" => Some(Value::String(substitute(
                    argument.as_str().expect("Fn::Sub takes a string here"),
                    values,
                ))),
                "Fn::If" => {
                    let parts = argument.as_array().expect("Fn::If takes a list");
                    let name = parts[0].as_str().expect("a condition name");
                    let holds = *conditions
                        .get(name)
                        .unwrap_or_else(|| panic!("the test has no value for condition {name}"));
                    evaluate(&parts[if holds { 1 } else { 2 }], values, conditions)
                }
                _ => Some(object(map, values, conditions)),
            }
        }
        Value::Object(map) => Some(object(map, values, conditions)),
        Value::Array(items) => Some(Value::Array(
            items
                .iter()
                .filter_map(|item| evaluate(item, values, conditions))
                .collect(),
        )),
        other => Some(other.clone()),
    }
}

fn object(
    map: &serde_json::Map<String, Value>,
    values: &serde_json::Map<String, Value>,
    conditions: &BTreeMap<&'static str, bool>,
) -> Value {
    Value::Object(
        map.iter()
            .filter_map(|(k, v)| evaluate(v, values, conditions).map(|v| (k.clone(), v)))
            .collect(),
    )
}

/// `${Name}` and `${Resource.Attribute}` replaced from `values`.
fn substitute(text: &str, values: &serde_json::Map<String, Value>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .unwrap_or_else(|| panic!("unclosed ${{ in {text}"));
        let name = &rest[start + 2..start + end];
        let value = values
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("the test has no example value for ${{{name}}} in {text}"));
        out.push_str(value);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}
