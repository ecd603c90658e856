//! The command line as operators meet it: exit codes of the operator
//! contract (0 success, 2 bad usage or configuration, 1 anything else),
//! error messages that name what to fix, and the one-shot commands
//! (`keygen`, `check-config`, `run`, `status`, `drain`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use batchly_e2e::{run_cli, run_cli_within, DevAgent};

/// How long a command that must refuse to start may take before the test
/// concludes it started instead.
const REFUSAL_WAIT: Duration = Duration::from_secs(20);

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Writes a valid keys file (mode 0600) with the verification entry of a
/// new key; returns its path.
fn keys_file(dir: &Path) -> std::path::PathBuf {
    let signing = dir.join("producer.signing.toml");
    let run = run_cli(
        &["keygen", "--kid", "producer", "--out", &path_str(&signing)],
        &[],
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, &run.stdout).expect("writing keys file");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    keys
}

#[test]
fn dev_refuses_a_group_writable_keys_file_naming_it() {
    let mut agent = DevAgent::start(&[]);
    let drain = run_cli(&["drain", "--dir", &path_str(agent.dir())], &[]);
    assert_eq!(drain.code(), 0, "{drain:#?}");
    assert_eq!(agent.wait_exit().code(), Some(0));
    let keys = agent.dir().join("keys/keys.toml");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o664)).expect("chmod 664");

    let run = run_cli_within(&["dev", "--dir", &path_str(agent.dir())], &[], REFUSAL_WAIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains(&path_str(&keys)), "{}", run.stderr);
    assert!(run.stderr.contains("group"), "{}", run.stderr);
}

#[test]
fn check_config_with_a_missing_file_exits_2_naming_the_path() {
    let run = run_cli(&["check-config", "--config", "/nonexistent.toml"], &[]);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("/nonexistent.toml"), "{}", run.stderr);
}

#[test]
fn a_non_numeric_slot_count_in_the_config_file_exits_2_naming_key_and_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[jobs]\nmax_concurrent = \"many\"\n").expect("writing config");
    let config = path_str(&config);
    let dir = path_str(&tmp.path().join("dev"));
    for args in [
        vec!["check-config", "--config", config.as_str()],
        vec!["dev", "--dir", dir.as_str(), "--config", config.as_str()],
    ] {
        let run = run_cli_within(&args, &[], REFUSAL_WAIT);
        assert_eq!(run.code(), 2, "{args:?}: {run:#?}");
        assert!(run.stderr.contains("jobs.max_concurrent"), "{}", run.stderr);
        assert!(run.stderr.contains(&config), "{}", run.stderr);
    }
}

#[test]
fn zero_job_slots_from_the_environment_exits_2_naming_the_variable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = run_cli_within(
        &["dev", "--dir", &path_str(&tmp.path().join("dev"))],
        &[("BATCHLY_JOBS_MAX_CONCURRENT", "0")],
        REFUSAL_WAIT,
    );
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains("BATCHLY_JOBS_MAX_CONCURRENT"),
        "{}",
        run.stderr
    );
}

#[test]
fn run_without_an_aws_region_exits_2_saying_how_to_set_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = keys_file(tmp.path());
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/123456789012/jobs\"\n\n\
             [signing]\nkeys_file = \"{}\"\n",
            keys.display()
        ),
    )
    .expect("writing config");
    // No region anywhere: not in the environment, no profile, and no
    // instance metadata to ask.
    let home = tmp.path().to_string_lossy().to_string();
    let run = run_cli_within(
        &["run", "--config", &path_str(&config)],
        &[("AWS_EC2_METADATA_DISABLED", "true"), ("HOME", &home)],
        REFUSAL_WAIT,
    );
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("no AWS region"), "{}", run.stderr);
    assert!(run.stderr.contains("AWS_REGION"), "{}", run.stderr);
}

#[test]
fn run_without_a_queue_url_exits_2_naming_queue_url() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = keys_file(tmp.path());
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[signing]\nkeys_file = \"{}\"\n", keys.display()),
    )
    .expect("writing config");
    let run = run_cli_within(&["run", "--config", &path_str(&config)], &[], REFUSAL_WAIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("queue.url"), "{}", run.stderr);
}

#[test]
fn run_refuses_an_unsandboxed_mode_unless_told_twice_and_a_uid_range_of_real_accounts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = keys_file(tmp.path());
    let config = tmp.path().join("agent.toml");
    let write = |sandbox: &str| {
        std::fs::write(
            &config,
            format!(
                "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/123456789012/jobs\"\n\n\
                 [signing]\nkeys_file = \"{}\"\n\n[jobs]\nmax_concurrent = 2\n\n[sandbox]\n{sandbox}\n",
                keys.display()
            ),
        )
        .expect("writing config")
    };
    let home = tmp.path().to_string_lossy().to_string();
    let env = [
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("HOME", home.as_str()),
    ];

    write("mode = \"none\"");
    let run = run_cli_within(&["run", "--config", &path_str(&config)], &env, REFUSAL_WAIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains("--insecure-no-sandbox"),
        "{}",
        run.stderr
    );
    // Told twice, it gets past the sandbox check (and stops at the next
    // one: this test gives it no AWS region).
    let run = run_cli_within(
        &[
            "run",
            "--config",
            &path_str(&config),
            "--insecure-no-sandbox",
        ],
        &env,
        REFUSAL_WAIT,
    );
    assert!(
        !run.stderr.contains("--insecure-no-sandbox"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("no AWS region"), "{}", run.stderr);

    // uid 1 (daemon) is an account on every Debian system.
    write("uid_range = \"1-100\"");
    let run = run_cli_within(&["run", "--config", &path_str(&config)], &env, REFUSAL_WAIT);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains("sandbox.uid_range") && run.stderr.contains("belongs to the account"),
        "{}",
        run.stderr
    );

    std::fs::create_dir_all(tmp.path().join("shared/tools")).expect("shared dirs");
    // Paths shown to jobs: they must exist, and never expose what the
    // sandbox hides (the keys file's dir) or what every job gets fresh.
    for (paths, says) in [
        (
            format!("readonly_paths = [\"{}/missing\"]", home),
            "is not a directory",
        ),
        (format!("readonly_paths = [\"{}\"]", home), "overlaps"),
        ("bind_paths = [\"/dev/shm\"]".to_string(), "/dev or /proc"),
        (
            format!("bind_paths = [\"{home}/shared\"]\nreadonly_paths = [\"{home}/shared/tools\"]"),
            "none inside another",
        ),
    ] {
        write(&paths);
        let run = run_cli_within(&["run", "--config", &path_str(&config)], &env, REFUSAL_WAIT);
        assert_eq!(run.code(), 2, "{paths}: {run:#?}");
        let key = paths.split(' ').next().expect("key");
        assert!(
            run.stderr.contains(&format!("sandbox.{key}")) && run.stderr.contains(says),
            "{paths}: {}",
            run.stderr
        );
    }
    // Nor may the work dirs be where every job's view is made fresh.
    write("");
    let mut on_shm = env.to_vec();
    on_shm.push(("BATCHLY_JOBS_WORK_DIR", "/dev/shm/batchly-work"));
    let run = run_cli_within(
        &["run", "--config", &path_str(&config)],
        &on_shm,
        REFUSAL_WAIT,
    );
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(
        run.stderr.contains("jobs.work_dir") && run.stderr.contains("/dev or /proc"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_unknown_subcommand_exits_2() {
    let run = run_cli(&["frobnicate"], &[]);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("frobnicate"), "{}", run.stderr);
}

#[test]
fn keygen_writes_a_private_key_file_prints_its_entry_and_never_overwrites() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("t.signing.toml");
    let run = run_cli(&["keygen", "--kid", "t", "--out", &path_str(&out)], &[]);
    assert_eq!(run.code(), 0, "{run:#?}");
    let mode = std::fs::metadata(&out)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "signing key file mode {mode:o}");
    assert!(run.stdout.contains("[[key]]"), "{}", run.stdout);
    assert!(run.stdout.contains("public_key"), "{}", run.stdout);
    assert!(run.stdout.contains("kid = \"t\""), "{}", run.stdout);
    assert!(
        !run.stdout.contains("private_key"),
        "the printed entry is for workers: {}",
        run.stdout
    );
    let before = std::fs::read(&out).expect("key file");

    let again = run_cli(&["keygen", "--kid", "t", "--out", &path_str(&out)], &[]);
    assert_eq!(again.code(), 2, "{again:#?}");
    assert!(again.stderr.contains(&path_str(&out)), "{}", again.stderr);
    assert_eq!(
        std::fs::read(&out).expect("key file"),
        before,
        "the existing key is untouched"
    );
}

#[test]
fn status_without_a_running_agent_exits_1_saying_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = run_cli(&["status", "--dir", &path_str(tmp.path())], &[]);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr.contains("no batchly-agent is running"),
        "{}",
        run.stderr
    );
}

#[test]
fn status_shows_the_slots_as_text_and_json_and_drain_stops_the_agent() {
    let mut agent = DevAgent::start(&[("BATCHLY_JOBS_MAX_CONCURRENT", "3")]);
    let dir = path_str(agent.dir());

    let text = run_cli(&["status", "--dir", &dir], &[]);
    assert_eq!(text.code(), 0, "{text:#?}");
    assert!(text.stdout.contains("slots:"), "{}", text.stdout);

    let json = run_cli(&["status", "--dir", &dir, "--json"], &[]);
    assert_eq!(json.code(), 0, "{json:#?}");
    let status: serde_json::Value =
        serde_json::from_str(&json.stdout).expect("status --json prints JSON");
    assert_eq!(status["slots"], 3, "{status}");
    assert_eq!(status["pid"], agent.pid(), "{status}");

    let drain = run_cli(&["drain", "--dir", &dir], &[]);
    assert_eq!(drain.code(), 0, "{drain:#?}");
    assert_eq!(agent.wait_exit().code(), Some(0), "a drained agent exits 0");
}

#[test]
fn a_second_dev_agent_on_the_same_directory_is_refused_and_the_first_keeps_working() {
    let agent = DevAgent::start(&[]);
    let second = run_cli_within(&["dev", "--dir", &path_str(agent.dir())], &[], REFUSAL_WAIT);
    assert_ne!(second.code(), 0, "{second:#?}");
    assert!(
        second.stderr.contains("another batchly-agent"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains(&agent.pid().to_string()),
        "the message names the running agent's pid: {}",
        second.stderr
    );

    let job = agent.submit_one(&["--", "true"]);
    let end = agent.wait_final(&job.message_id);
    assert_eq!(end.kind, "job.succeeded", "{end:?}");
    let status = run_cli(&["status", "--dir", &path_str(agent.dir())], &[]);
    assert_eq!(
        status.code(),
        0,
        "the first agent still answers: {status:#?}"
    );
}

#[test]
fn submit_refuses_a_zero_ttl_instead_of_queueing_an_envelope_every_agent_rejects() {
    // envelope.md: `exp > iat`; with --ttl-s 0 they are equal and every
    // agent dead-letters the message as malformed.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dev");
    let run = run_cli(
        &[
            "submit",
            "--dir",
            &path_str(&dir),
            "--ttl-s",
            "0",
            "--",
            "true",
        ],
        &[],
    );
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stderr.contains("ttl"), "{}", run.stderr);
    assert_eq!(
        batchly_e2e::list_dir(&dir.join("queue")),
        Vec::<String>::new(),
        "nothing was queued"
    );
}
