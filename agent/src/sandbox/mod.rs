//! Everything that stands between a job and the host. It owns the launch
//! path: the agent never forks its multi-threaded runtime to run job code;
//! it spawns a fresh copy of its own binary once (`__launch`, the fork
//! server), which forks a single-threaded launcher for each job that applies
//! each isolation step in order and then `execve`s the job. Today the steps are: own session and process group, private work
//! dir, scrubbed environment, default signal state. Namespaces, cgroups,
//! identity, seccomp and Landlock are later steps in `launcher.rs`; if a step
//! cannot be applied the launcher refuses the job (fail closed), it never
//! runs the job with less protection.
//!
//! This is the only module allowed to contain `unsafe`.

pub mod forkserver;
pub mod launcher;
pub mod process;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Hidden subcommand under which the agent binary acts as the fork server.
pub const LAUNCHER_ARG: &str = "__launch";

/// Everything the launcher needs to start one job attempt. Sent to the
/// launcher over its stdin socket as JSON, so it never travels through the
/// environment or the command line (both visible in `ps`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchPlan {
    /// argv of the job; `argv[0]` is resolved against the job's `PATH` when it
    /// has no slash.
    pub argv: Vec<String>,
    /// The complete environment of the job (already scrubbed by the agent).
    pub env: Vec<(String, String)>,
    /// The job's private work directory; it becomes the job's cwd.
    pub work_dir: PathBuf,
}

/// The base environment every job starts from; nothing of the agent's own
/// environment (credentials, `AWS_*`, config overrides) is inherited.
pub fn scrubbed_env(
    work_dir: &std::path::Path,
    job_id: &str,
    attempt: u32,
    extra: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = std::collections::BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    );
    env.insert("HOME".to_string(), work_dir.display().to_string());
    env.insert("TMPDIR".to_string(), work_dir.display().to_string());
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    env.insert("BATCHLY_JOB_ID".to_string(), job_id.to_string());
    env.insert("BATCHLY_ATTEMPT".to_string(), attempt.to_string());
    env.insert(
        "BATCHLY_WORK_DIR".to_string(),
        work_dir.display().to_string(),
    );
    // The job's own signed `env` wins over the defaults above.
    for (k, v) in extra {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn scrubbed_env_carries_nothing_from_the_agent_and_lets_the_spec_override() {
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "agent-secret");
        let mut extra = BTreeMap::new();
        extra.insert("PATH".to_string(), "/opt/bin".to_string());
        extra.insert("GREETING".to_string(), "hi".to_string());
        let env = scrubbed_env(std::path::Path::new("/w/j"), "j", 2, &extra);
        assert!(env.iter().all(|(k, _)| !k.starts_with("AWS_")));
        assert!(env.contains(&("PATH".to_string(), "/opt/bin".to_string())));
        assert!(env.contains(&("GREETING".to_string(), "hi".to_string())));
        assert!(env.contains(&("BATCHLY_ATTEMPT".to_string(), "2".to_string())));
        assert!(env.contains(&("HOME".to_string(), "/w/j".to_string())));
    }
}
