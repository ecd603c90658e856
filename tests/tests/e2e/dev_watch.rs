//! `dev` notices a submitted job through its inotify watch on `DIR/queue`,
//! so a job submitted to an idle agent starts at once. Besides the watch the
//! agent lists that directory only every `WATCHED_RESCAN_INTERVAL`, minutes,
//! far beyond the longest these tests wait for anything (`WAIT`): a job that
//! runs here after the agent's first listing was brought in by the watch.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use batchly_agent::queue::dir::WATCHED_RESCAN_INTERVAL;
use batchly_e2e::{count_final, count_kind, eventually, list_dir, DevAgent, WAIT};

/// inotify's IN_MOVED_TO (inotify(7)): how `submit` puts a message in place.
const IN_MOVED_TO: u64 = 0x80;

/// The inode numbers that process `pid` watches with IN_MOVED_TO. The kernel
/// lists every watch of an inotify descriptor in `/proc/PID/fdinfo/FD` as a
/// line `inotify wd:N ino:HEX sdev:HEX mask:HEX ...`.
fn inodes_watched_for_renames(pid: i32) -> Vec<u64> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fdinfo: {e}"));
    let mut inodes = Vec::new();
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|part| part.strip_prefix(name))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            };
            if let (Some(ino), Some(mask)) = (field("ino:"), field("mask:")) {
                if mask & IN_MOVED_TO != 0 {
                    inodes.push(ino);
                }
            }
        }
    }
    inodes
}

/// Fails unless the agent watches its queue directory: an agent that fell
/// back to polling it would pass the tests below without proving anything.
fn assert_watching_queue_dir(agent: &DevAgent) {
    let queue = agent.dir().join("queue");
    let ino = std::fs::metadata(&queue)
        .unwrap_or_else(|e| panic!("{}: {e}", queue.display()))
        .ino();
    let watched = inodes_watched_for_renames(agent.pid());
    assert!(
        watched.contains(&ino),
        "the agent watches inodes {watched:?}, not {} (inode {ino})\n{}",
        queue.display(),
        agent.diagnostics()
    );
}

fn assert_the_rescan_is_far_off() {
    assert!(
        WATCHED_RESCAN_INTERVAL >= 2 * WAIT,
        "these tests prove the watch only while the agent's own listing of queue/ \
         ({WATCHED_RESCAN_INTERVAL:?}) is far longer than they wait ({WAIT:?})"
    );
}

/// Waits until no message is waiting or claimed: the final event is written
/// just before the message is deleted.
fn wait_queue_empty(agent: &DevAgent) {
    let empty = |dir: &Path| {
        list_dir(&dir.join("queue")).is_empty() && list_dir(&dir.join("claimed")).is_empty()
    };
    eventually(
        "queue/ and claimed/ to be empty",
        WAIT,
        || empty(agent.dir()),
        || agent.diagnostics(),
    );
}

#[test]
fn job_submitted_to_an_idle_agent_is_picked_up_by_the_queue_watch() {
    assert_the_rescan_is_far_off();
    let agent = DevAgent::start(&[]);
    // Once a first job has ended, the agent has listed queue/ and found
    // nothing more to do: from here on only the watch can bring in a job.
    let first = agent.submit_one(&["--", "true"]);
    assert_eq!(agent.wait_final(&first.message_id).kind, "job.succeeded");
    assert_watching_queue_dir(&agent);

    let second = agent.submit_one(&["--", "sh", "-c", "echo picked up"]);
    let done = agent.wait_final(&second.message_id);

    assert_eq!(done.kind, "job.succeeded", "{done:?}");
    wait_queue_empty(&agent);
}

#[test]
fn every_job_of_two_bursts_submitted_while_the_agent_works_runs_once() {
    assert_the_rescan_is_far_off();
    let agent = DevAgent::start(&[("BATCHLY_JOBS_MAX_CONCURRENT", "2")]);
    assert_watching_queue_dir(&agent);
    // Submissions land while the agent lists queue/ and claims from it: a
    // rename between a listing and the wait that follows must still wake it,
    // or the job would wait for the rescan, minutes away.
    let mut jobs = agent.submit(&["--id", "a", "--count", "20", "--", "sh", "-c", "sleep 0.02"]);
    jobs.extend(agent.submit(&["--id", "b", "--count", "20", "--", "true"]));
    assert_eq!(jobs.len(), 40);

    let events = agent.wait_for("40 final events", |ev| count_final(ev, None) >= 40);

    assert_eq!(count_final(&events, Some("job.succeeded")), 40);
    assert_eq!(count_kind(&events, "job.started"), 40, "each job ran once");
    for job in &jobs {
        assert!(
            events
                .iter()
                .any(|e| e.message_id == job.message_id && e.is_final),
            "{} has no final event",
            job.job_id
        );
    }
    wait_queue_empty(&agent);
}
