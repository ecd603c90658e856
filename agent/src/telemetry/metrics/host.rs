//! Host CPU, memory and disk from `sysinfo`, sampled once per interval on a
//! blocking thread: reading `/proc` is quick, but listing filesystems calls
//! `statvfs` on every mount, and one hung network mount must not stall the
//! publisher. A sample that does not come back in time is skipped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sysinfo::{Disks, System};

use super::interval::HostSample;

/// How long one sample may take before it is skipped.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sampler: keeps `sysinfo`'s state between samples, so CPU use is the
/// average since the previous sample (the interval).
#[derive(Debug, Clone)]
pub struct Host {
    system: Arc<Mutex<System>>,
    disk_path: PathBuf,
}

impl Host {
    /// A sampler for the host, with disk use of the filesystem that holds
    /// `disk_path`.
    pub fn new(disk_path: PathBuf) -> Host {
        let mut system = System::new();
        system.refresh_cpu_usage();
        Host {
            system: Arc::new(Mutex::new(system)),
            disk_path,
        }
    }

    /// A sample, or `None` if the previous one is still stuck or this one
    /// took longer than [`SAMPLE_TIMEOUT`].
    pub async fn sample(&self) -> Option<HostSample> {
        let system = Arc::clone(&self.system);
        let disk_path = self.disk_path.clone();
        let task = tokio::task::spawn_blocking(move || {
            // Busy: an earlier sample is still blocked in a system call.
            let mut system = system.try_lock().ok()?;
            Some(sample(&mut system, &disk_path))
        });
        match tokio::time::timeout(SAMPLE_TIMEOUT, task).await {
            Ok(Ok(sample)) => sample,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "host metrics sample failed");
                None
            }
            Err(_) => {
                tracing::warn!(
                    timeout_s = SAMPLE_TIMEOUT.as_secs(),
                    "host metrics sample took too long; skipped this interval"
                );
                None
            }
        }
    }
}

fn sample(system: &mut System, disk_path: &Path) -> HostSample {
    system.refresh_cpu_usage();
    system.refresh_memory();
    let total = system.total_memory();
    let used = total.saturating_sub(system.available_memory());
    HostSample {
        cpu: f64::from(system.global_cpu_usage()),
        memory: percent(used, total),
        disk: disk_use(disk_path),
    }
}

/// Space in use on the filesystem mounted deepest above `path`.
fn disk_use(path: &Path) -> Option<f64> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let disks = Disks::new_with_refreshed_list();
    let disk = disks
        .list()
        .iter()
        .filter(|disk| path.starts_with(disk.mount_point()))
        .max_by_key(|disk| disk.mount_point().as_os_str().len())?;
    let total = disk.total_space();
    Some(percent(total.saturating_sub(disk.available_space()), total))
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sample_reads_plausible_host_numbers_and_the_root_filesystem() {
        let host = Host::new(PathBuf::from("/"));
        let sample = host.sample().await.expect("a sample within the timeout");
        for value in [sample.cpu, sample.memory] {
            assert!((0.0..=100.0).contains(&value), "{sample:?}");
        }
        assert!(sample.memory > 0.0, "some memory is in use: {sample:?}");
        let disk = sample.disk.expect("/ is on a mounted filesystem");
        assert!((0.0..=100.0).contains(&disk), "{disk}");
    }

    #[test]
    fn percent_of_nothing_is_zero() {
        assert_eq!(percent(5, 0), 0.0);
        assert_eq!(percent(1, 4), 25.0);
    }
}
