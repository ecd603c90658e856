//! Wiring: builds the parts from the validated configuration and runs them
//! as one daemon (`run` on SQS, `dev` on a local directory); owns the
//! shutdown path (signals → drain → supervisor returns → exit 0). The `dev`
//! directory's layout (`dev`), the AWS clients (`aws`), stop signals
//! (`signals`) and the one-shot commands (`client`) have files of their own.
//!
//! Every error that is the operator's to fix (config, keys file) is a
//! `AppError::Usage`, which `main` turns into exit status 2.

mod aws;
mod client;
mod dev;
mod signals;
mod systemd;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use aws::aws_sdk_config;
pub use client::{admin_socket, check_config, keygen, request_cancel, request_drain, status};
pub use dev::{load_dev_config, write_private, DevLayout};
use signals::StopSignals;

use crate::admin;
use crate::config::{Config, ConfigFile, SandboxMode};
use crate::drain::Drain;
use crate::envelope::{Keyring, VerifyPolicy};
use crate::events::{AgentEvent, EventSink, JsonlFile, SqsEvents};
use crate::queue::dir::DirQueue;
use crate::queue::sqs::{check_queue, SqsQueue};
use crate::queue::JobSource;
use crate::sandbox::process::Launcher;
use crate::sandbox::{Privilege, SandboxPolicy};
use crate::state::{Ledger, StateError, StateLock};
use crate::supervisor::status::StatusBoard;
use crate::supervisor::verdict::Backoff;
use crate::supervisor::{Settings, Supervisor};
use crate::transfer::Transfers;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad usage or configuration: the operator must fix something (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl AppError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Usage(_) => 2,
            AppError::Failed(_) => 1,
        }
    }
}

pub(crate) fn usage(e: impl std::fmt::Display) -> AppError {
    AppError::Usage(e.to_string())
}

pub(crate) fn failed(e: impl std::fmt::Display) -> AppError {
    AppError::Failed(e.to_string())
}

/// The process environment as pairs, for config overrides.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Loads the configuration for `run` and friends: `--config PATH` must
/// exist; the default path may be absent.
pub fn load_config(explicit: Option<&Path>) -> Result<Config, AppError> {
    let default = Path::new(crate::config::DEFAULT_CONFIG_PATH);
    let file = match explicit {
        Some(p) => ConfigFile::Explicit(p),
        None => ConfigFile::Default(default),
    };
    Config::load(file, &process_env(), &[]).map_err(usage)
}

pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn settings(
    config: &Config,
    logs: crate::telemetry::logs::Spool,
    metrics: crate::telemetry::metrics::Metrics,
) -> Settings {
    Settings {
        slots: config.jobs.max_concurrent,
        default_timeout: config.jobs.default_timeout,
        kill_grace: config.jobs.kill_grace,
        backoff: Backoff {
            base: config.jobs.retry_backoff,
            max: config.jobs.retry_backoff_max,
        },
        work_root: config.jobs.work_dir.clone(),
        logs,
        log_max_bytes: config.jobs.log_max_bytes,
        metrics,
        queue_names: queue_names(config),
        verify: VerifyPolicy {
            skew: config.signing.skew,
            max_ttl: config.signing.max_ttl,
        },
        instance_id: crate::imds::InstanceId::fixed(instance_id(config)),
        max_requeues: config.jobs.max_requeues,
        sandbox: None,
    }
}

/// The queues' names (the last part of each URL), by priority; `dev` for
/// the `dev` directory queue.
fn queue_names(config: &Config) -> Vec<String> {
    if config.queue.urls.is_empty() {
        return vec!["dev".to_string()];
    }
    config
        .queue
        .urls
        .iter()
        .map(|u| u.rsplit('/').next().unwrap_or(u).to_string())
        .collect()
}

/// Makes the jobs' cgroup parent ready and kills and removes the job
/// cgroups a previous run left (a crash, a `kill -9`): nothing of an old
/// job outlives the agent's restart. Failing that, the agent does not
/// start: it would run jobs without their limits.
fn prepare_cgroups(
    cgroups: &crate::sandbox::cgroup::Hierarchy,
    scope: &str,
) -> Result<(), AppError> {
    cgroups
        .prepare(std::process::id())
        .map_err(|e| failed(format!("preparing the cgroups of jobs ({cgroups:?}): {e}")))?;
    for old in cgroups.leftovers(scope) {
        match old.remove() {
            Ok(()) => tracing::warn!(
                cgroup = old.name(),
                "killed and removed a job cgroup left by an earlier run"
            ),
            Err(e) => {
                tracing::error!(cgroup = old.name(), error = %e, "cannot remove a job cgroup left by an earlier run")
            }
        }
    }
    Ok(())
}

/// How jobs are isolated, decided once at start from `sandbox.mode`, who
/// the agent runs as and the command. `run` never isolates less than the
/// config says without being told twice (`--insecure-no-sandbox`); `dev`
/// run by an ordinary user isolates jobs as far as a user namespace allows
/// and says what is off, or, where this host has no user namespaces for
/// it, runs jobs unisolated so a first try works, and says why. Returns
/// the policy and the warnings to log and show in `status`.
fn sandbox_policy(
    config: &Config,
    mode: &str,
    insecure_no_sandbox: bool,
    extra_hidden: &[PathBuf],
) -> Result<(Option<SandboxPolicy>, Vec<String>), AppError> {
    match config.sandbox.mode {
        SandboxMode::None if mode == "run" && !insecure_no_sandbox => Err(usage(
            "sandbox.mode = \"none\" runs jobs without any isolation, with the agent's \
             privileges; `run` accepts that only with --insecure-no-sandbox",
        )),
        SandboxMode::None => Ok((
            None,
            vec![
                "sandbox.mode = \"none\": jobs run WITHOUT isolation, with the agent's \
                 privileges and the instance's credentials"
                    .to_string(),
            ],
        )),
        SandboxMode::Full if !nix::unistd::geteuid().is_root() => {
            if mode != "dev" {
                return Err(usage(
                    "sandbox.mode = \"full\" needs root (the agent gives each job its own \
                     uid and namespaces): run the agent as root, as its systemd unit does",
                ));
            }
            let JobPaths {
                hidden,
                writable,
                readable,
                resolver,
                max_file_bytes,
            } = private_and_shared_paths(config, extra_hidden)?;
            if let Err(why) = crate::sandbox::userns::probe(Path::new("/proc/self/exe")) {
                return Ok((
                    None,
                    vec![format!(
                        "not running as root, and this host gives an ordinary user no user \
                         namespaces ({why}): jobs run WITHOUT the sandbox (as your user, in \
                         your namespaces); run `dev` as root for the full sandbox"
                    )],
                ));
            }
            let protections = crate::sandbox::userns::Protections::of_this_mode(
                crate::sandbox::landlock_abi().is_some(),
            );
            let mut warnings = vec![format!("sandbox: {}", protections.summary())];
            warnings.extend(
                protections
                    .off
                    .iter()
                    .map(|(what, why)| format!("sandbox: off: {what}: {why}")),
            );
            Ok((
                Some(SandboxPolicy {
                    privilege: Privilege::UserNamespace,
                    uid_range: config.sandbox.uid_range,
                    hidden,
                    writable,
                    readable,
                    resolver,
                    max_file_bytes,
                    cgroups: None,
                    cgroup_scope: crate::sandbox::cgroup::scope_of(&config.state.dir),
                    default_pids: None,
                    default_memory_mib: None,
                    metadata: None,
                }),
                warnings,
            ))
        }
        SandboxMode::Full => {
            let range = config.sandbox.uid_range;
            for slot in 0..config.jobs.max_concurrent {
                let Some(uid) = range.for_slot(slot) else {
                    continue;
                };
                if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                {
                    return Err(usage(format!(
                        "sandbox.uid_range: uid {uid} (job slot {slot}) belongs to the account \
                         {:?}; job uids must belong to no account, or a job could use its files",
                        user.name
                    )));
                }
                if let Ok(Some(group)) =
                    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(uid))
                {
                    return Err(usage(format!(
                        "sandbox.uid_range: gid {uid} (job slot {slot}) is the group {:?}; \
                         job gids (the same numbers) must belong to no group",
                        group.name
                    )));
                }
            }
            let JobPaths {
                hidden,
                writable,
                readable,
                resolver,
                max_file_bytes,
            } = private_and_shared_paths(config, extra_hidden)?;
            let cgroups = crate::sandbox::cgroup::Hierarchy::detect()
                .map_err(|why| usage(format!("the sandbox cannot limit jobs: {why}")))?;
            let nonzero = |n: usize| (n > 0).then_some(n as u64);
            Ok((
                Some(SandboxPolicy {
                    privilege: Privilege::Root,
                    uid_range: range,
                    hidden,
                    writable,
                    readable,
                    resolver,
                    max_file_bytes,
                    cgroups: Some(cgroups),
                    cgroup_scope: crate::sandbox::cgroup::scope_of(&config.state.dir),
                    default_pids: nonzero(config.sandbox.default_pids),
                    default_memory_mib: nonzero(config.sandbox.default_memory_mib),
                    metadata: None,
                }),
                Vec::new(),
            ))
        }
    }
}

/// The host paths no job may see (the agent's state, keys, config, admin
/// socket, logs and work dirs, and `extra_hidden`), resolved; and the ones
/// every job is shown: `sandbox.bind_paths` (writable) and
/// `sandbox.readonly_paths` (read-only, with systemd-resolved's), checked:
/// each a directory that overlaps none of the hidden ones and is not under
/// /dev or /proc.
fn private_and_shared_paths(
    config: &Config,
    extra_hidden: &[PathBuf],
) -> Result<JobPaths, AppError> {
    let mut hidden = vec![
        config.state.dir.clone(),
        config.signing.keys_file.clone(),
        config.admin.socket.clone(),
        config.logs.spool_dir.clone(),
        config.jobs.work_dir.clone(),
    ];
    hidden.extend(config.source_file().map(Path::to_path_buf));
    hidden.extend(extra_hidden.iter().cloned());
    // Resolved: a symlinked keys file must hide its target. What
    // does not exist yet is hidden where it will be.
    let hidden: Vec<PathBuf> = hidden
        .into_iter()
        .filter_map(|p| {
            p.canonicalize()
                .ok()
                .or_else(|| std::path::absolute(p).ok())
        })
        .collect();
    // The job's own dir is put back into its view: not where the view is
    // made fresh and read-only.
    let work = config.jobs.work_dir.canonicalize().unwrap_or_else(|_| {
        std::path::absolute(&config.jobs.work_dir).unwrap_or_else(|_| config.jobs.work_dir.clone())
    });
    if work.starts_with("/dev") || work.starts_with("/proc") {
        return Err(usage(format!(
            "jobs.work_dir: {} is under /dev or /proc, which every job gets fresh; \
             put work dirs on a real file system",
            work.display()
        )));
    }
    let shown = |key: &str, dirs: &[PathBuf]| -> Result<Vec<PathBuf>, AppError> {
        dirs.iter()
            .map(|dir| {
                if !dir.is_dir() {
                    return Err(usage(format!(
                        "{key}: {} is not a directory on this host",
                        dir.display()
                    )));
                }
                let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                if let Some(private) = hidden
                    .iter()
                    .find(|h| h.starts_with(&dir) || dir.starts_with(h))
                {
                    return Err(usage(format!(
                        "{key}: {} overlaps {}, which jobs must not see (the agent's state, keys, config, logs or work dirs)",
                        dir.display(),
                        private.display()
                    )));
                }
                if dir.starts_with("/dev") || dir.starts_with("/proc") {
                    return Err(usage(format!(
                        "{key}: {} is under /dev or /proc, which every job gets fresh",
                        dir.display()
                    )));
                }
                Ok(dir)
            })
            .collect()
    };
    let writable = shown("sandbox.bind_paths", &config.sandbox.bind_paths)?;
    let readable = shown("sandbox.readonly_paths", &config.sandbox.readonly_paths)?;
    // One shown path inside another could be swapped for a link by a job
    // (it writes the bind paths) and redirect a later job's mount.
    let all: Vec<(&str, &PathBuf)> = writable
        .iter()
        .map(|p| ("sandbox.bind_paths", p))
        .chain(readable.iter().map(|p| ("sandbox.readonly_paths", p)))
        .collect();
    for (i, (key, a)) in all.iter().enumerate() {
        for (other, b) in &all[i + 1..] {
            if a.starts_with(b) || b.starts_with(a) {
                return Err(usage(format!(
                    "{key}: {} and {other}: {} overlap; give each job path once, none inside another",
                    a.display(),
                    b.display()
                )));
            }
        }
    }
    // systemd-resolved's stub resolver (/etc/resolv.conf links there on
    // Amazon Linux 2023 and Ubuntu), for egress jobs only: its varlink
    // socket resolves any name, a way out for a job meant to have no
    // network.
    let resolver = Path::new("/run/systemd/resolve");
    let resolver = (resolver.is_dir() && !readable.iter().any(|d| resolver.starts_with(d)))
        .then(|| resolver.to_path_buf());
    Ok(JobPaths {
        hidden,
        writable,
        readable,
        resolver,
        max_file_bytes: (config.sandbox.max_file_bytes > 0)
            .then_some(config.sandbox.max_file_bytes),
    })
}

/// What jobs must not see, may write and may read of the host.
struct JobPaths {
    hidden: Vec<PathBuf>,
    writable: Vec<PathBuf>,
    readable: Vec<PathBuf>,
    /// Shown to egress jobs besides `readable`.
    resolver: Option<PathBuf>,
    /// `sandbox.max_file_size`, `None` for no limit.
    max_file_bytes: Option<u64>,
}

/// `agent.instance_id`, or `host-<hostname>` where no instance metadata
/// is read (`run` on an EC2 instance discovers its id instead).
fn instance_id(config: &Config) -> String {
    config
        .agent
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("host-{}", hostname()))
}

/// Takes the state dir for this agent alone: a second agent on it would
/// take the first one's live ledger for a crashed run's and kill its jobs.
pub fn lock_state_dir(config: &Config) -> Result<StateLock, AppError> {
    StateLock::acquire(&config.state.dir).map_err(|e| match e {
        StateError::Locked { .. } => usage(e),
        other => failed(other),
    })
}

/// `batchly-agent dev`: the embedded default.
pub async fn dev(
    dir: &Path,
    explicit_config: Option<&Path>,
    quiet_banner: bool,
) -> Result<(), AppError> {
    let (layout, config) = load_dev_config(dir, explicit_config)?;
    let lock = lock_state_dir(&config)?;
    layout.ensure_keys()?;
    let source = DirQueue::open(&layout.root).map_err(failed)?;
    let events = JsonlFile::open(&layout.events()).map_err(failed)?;
    if !quiet_banner {
        dev::print_dev_banner(&layout, &config);
    }
    let mut startup = Startup::locked(lock);
    startup.hidden.push(layout.root.clone());
    serve_with(&config, source, events, "dev", Drain::new(), None, startup).await
}

/// `batchly-agent run`: the daemon on SQS.
pub async fn run(
    explicit_config: Option<&Path>,
    insecure_no_sandbox: bool,
) -> Result<(), AppError> {
    let config = load_config(explicit_config)?;
    config.require_queue().map_err(usage)?;
    // Checked before any network call: a bad keys file or a sandbox the
    // agent cannot give is exit 2 at once.
    Keyring::load(&config.signing.keys_file).map_err(usage)?;
    sandbox_policy(&config, "run", insecure_no_sandbox, &[])?;
    let lock = lock_state_dir(&config)?;
    let sdk = aws_sdk_config().await?;
    let sqs = aws::sqs_client(&sdk);
    let setup_error = |e: crate::queue::sqs::SetupError| {
        if e.unreachable {
            failed(e)
        } else {
            usage(e)
        }
    };
    let source = SqsQueue::connect(
        sqs.clone(),
        &config.queue.urls,
        config.queue.dead_letter_url.as_deref(),
        &config.state.dir,
    )
    .await
    .map_err(setup_error)?;
    for q in source.queues() {
        tracing::info!(
            queue = %q.url,
            fifo = q.fifo,
            visibility_s = q.visibility.as_secs(),
            dead_letter = %q.dead_letter_url,
            "queue ready"
        );
    }
    let imds = instance_metadata()?;
    let mut startup = Startup::locked(lock);
    startup.insecure_no_sandbox = insecure_no_sandbox;
    startup.instance = match (&config.agent.instance_id, &imds) {
        (None, Some(imds)) => Some(crate::imds::discover(imds.clone(), IDENTITY_BUDGET).await),
        _ => None,
    };
    let instance = startup
        .instance
        .as_ref()
        .map(crate::imds::InstanceId::get)
        .unwrap_or_else(|| instance_id(&config));
    if let Some(warning) = clock_warning(source.host_clock_ahead_s(), config.signing.skew) {
        tracing::error!("{warning}");
        startup.warnings.push(warning);
    }
    let events = match &config.queue.events_url {
        Some(url) => {
            check_queue(&sqs, "queue.events_url", url)
                .await
                .map_err(setup_error)?;
            let sink = SqsEvents::new(sqs.clone(), url.clone());
            announce(&sink, url, &config, &instance).await?;
            Some(sink)
        }
        None => {
            tracing::warn!(
                "queue.events_url is not set: job events go only to the agent's own log"
            );
            None
        }
    };
    let transfers = Transfers::new(aws::s3_client(&sdk));
    let spool = open_spool(&config, true)?;
    crate::telemetry::logs::agent_log::attach(&spool);
    let shipper = crate::telemetry::logs::ship::Shipper::new(
        spool.clone(),
        aws::logs_client(&sdk),
        crate::telemetry::logs::ship::Target {
            group: config.logs.group.clone(),
            instance: startup
                .instance
                .clone()
                .unwrap_or_else(|| crate::imds::InstanceId::fixed(instance.clone())),
        },
    );
    let stop_shipping = tokio_util::sync::CancellationToken::new();
    let shipping = tokio::spawn(shipper.clone().run(stop_shipping.clone()));
    let group = startup
        .instance
        .as_ref()
        .and_then(crate::imds::InstanceId::identity)
        .and_then(|i| i.autoscaling_group);
    let metrics = crate::telemetry::metrics::Metrics::new(
        crate::telemetry::metrics::MetricsSettings::from_config(&config, &instance, group),
    );
    let publisher = metrics.publisher(aws::cloudwatch_client(&sdk));
    let publishing = tokio::spawn(publisher.clone().run(stop_shipping.clone()));
    startup.logs = Some(spool);
    startup.metrics = Some(metrics);
    startup.telemetry = Arc::new(crate::telemetry::Flushes(vec![
        Arc::new(shipper),
        Arc::new(publisher),
    ]));
    let drain = Drain::keeping(startup.telemetry.flush_reserve());
    let mut terminating = None;
    let watcher = imds.map(|imds| {
        let seen = Arc::new(std::sync::Mutex::new(crate::imds::Seen::default()));
        startup.metadata = Some(seen.clone());
        let (task, rx) = watch_instance_metadata(&config, &drain, imds, seen);
        terminating = Some(rx);
        task
    });
    startup.lifecycle = lifecycle_hooks(&config, &sdk, &startup, &instance, terminating);
    let served = serve_with(
        &config,
        source,
        events,
        "run",
        drain,
        Some(transfers),
        startup,
    )
    .await;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    stop_shipping.cancel();
    let _ = shipping.await;
    let _ = publishing.await;
    served
}

/// Opens the log spool at `logs.spool_dir`: shipped (`run`) or kept as the
/// jobs' logs (`dev`).
fn open_spool(config: &Config, ship: bool) -> Result<crate::telemetry::logs::Spool, AppError> {
    let dir = &config.logs.spool_dir;
    crate::telemetry::logs::Spool::open(crate::telemetry::logs::SpoolSettings {
        dir: dir.clone(),
        max_bytes: config.logs.spool_max_bytes,
        ship,
    })
    .map_err(|e| {
        failed(format!(
            "logs.spool_dir: cannot open {}: {e}",
            dir.display()
        ))
    })
}

/// Longest the start waits for the instance's identity before going on
/// with `unknown` (and reading it in the background).
const IDENTITY_BUDGET: Duration = Duration::from_secs(3);

/// The instance metadata client, unless instance metadata is off
/// (`AWS_EC2_METADATA_DISABLED=true`, the SDK's own switch: a host that is
/// no EC2 instance).
fn instance_metadata() -> Result<Option<Arc<crate::imds::Imds>>, AppError> {
    let disabled = std::env::var("AWS_EC2_METADATA_DISABLED")
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if disabled {
        tracing::info!(
            "AWS_EC2_METADATA_DISABLED=true: no instance identity, spot, rebalance or lifecycle notices are read"
        );
        return Ok(None);
    }
    crate::imds::Imds::new(std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT").ok())
        .map(|imds| Some(Arc::new(imds)))
        .map_err(|e| usage(format!("AWS_EC2_METADATA_SERVICE_ENDPOINT: {e}")))
}

/// Starts reading the instance's notices (spot interruption, rebalance,
/// Auto Scaling lifecycle) into `drain`; the receiver turns true once the
/// group is terminating the instance.
fn watch_instance_metadata(
    config: &Config,
    drain: &Drain,
    imds: Arc<crate::imds::Imds>,
    seen: Arc<std::sync::Mutex<crate::imds::Seen>>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<bool>,
) {
    let notices = crate::imds::Notices::new(
        drain.clone(),
        config.drain.margin,
        config.drain.rebalance_resume,
        config.drain.timeout,
    );
    let terminating = notices.terminating();
    let task = tokio::spawn(crate::imds::watch(imds, notices, crate::imds::POLL, seen));
    (task, terminating)
}

/// The Auto Scaling lifecycle hooks the config names, if any, addressed
/// by the instance's id (discovered or `agent.instance_id`). A
/// termination hook needs instance metadata to learn of the transition.
fn lifecycle_hooks(
    config: &Config,
    sdk: &aws_config::SdkConfig,
    startup: &Startup,
    instance: &str,
    terminating: Option<tokio::sync::watch::Receiver<bool>>,
) -> Option<Lifecycle> {
    let id = startup
        .instance
        .clone()
        .unwrap_or_else(|| crate::imds::InstanceId::fixed(instance));
    let hooks = crate::lifecycle::Hooks::new(
        aws::autoscaling_client(sdk),
        id,
        config.drain.launch_hook.clone(),
        config.drain.lifecycle_hook.clone(),
    )?;
    if config.drain.lifecycle_hook.is_some() && terminating.is_none() {
        tracing::warn!(
            "drain.lifecycle_hook is set but instance metadata is off (AWS_EC2_METADATA_DISABLED): \
             the agent cannot see the group terminating the instance and never completes the hook"
        );
    }
    Some(Lifecycle {
        hooks: Arc::new(hooks),
        terminating: terminating.unwrap_or_else(|| tokio::sync::watch::channel(false).1),
    })
}

/// Publishes `agent.started`, which also proves the events queue takes
/// messages: a queue that refuses them (the role lacks sqs:SendMessage,
/// say) would otherwise turn every finished job into a release, forever.
async fn announce(
    sink: &SqsEvents,
    url: &str,
    config: &Config,
    instance: &str,
) -> Result<(), AppError> {
    let ev = AgentEvent::new("agent.started", instance, config.jobs.max_concurrent);
    let deadline = tokio::time::Instant::now() + crate::queue::sqs::SETUP_BUDGET;
    match crate::retry::retry(
        "publishing agent.started",
        deadline,
        crate::events::EventError::class,
        || sink.publish_agent(&ev),
    )
    .await
    {
        Ok(()) => Ok(()),
        Err(crate::retry::GaveUp::Final(_, e)) => Err(usage(format!(
            "queue.events_url {url}: the events queue refuses messages ({e}); \
             the agent must be able to publish job events (sqs:SendMessage)"
        ))),
        Err(crate::retry::GaveUp::Deadline(e)) => Err(failed(format!(
            "queue.events_url {url}: no answer in time ({})",
            e.map(|e| e.to_string()).unwrap_or_default()
        ))),
    }
}

/// What to tell the operator when the host clock disagrees with SQS's.
/// Envelope times are checked against the host clock, so past
/// `signing.skew_s` every envelope is refused.
fn clock_warning(host_ahead_s: Option<i64>, skew: Duration) -> Option<String> {
    let ahead = host_ahead_s?;
    let off = ahead.unsigned_abs();
    if off <= crate::queue::sqs::CLOCK_SKEW_WARNING.as_secs() && off <= skew.as_secs() {
        return None;
    }
    let way = if ahead > 0 { "ahead of" } else { "behind" };
    let effect = if off > skew.as_secs() {
        format!(
            "more than signing.skew_s ({}s): every envelope will be refused as {}",
            skew.as_secs(),
            if ahead > 0 {
                "expired"
            } else {
                "not_yet_valid"
            }
        )
    } else {
        format!("within signing.skew_s ({}s) but drifting", skew.as_secs())
    };
    Some(format!(
        "the host clock is {off}s {way} SQS's clock, {effect}; fix the host's time sync (chrony, NTP)"
    ))
}

/// What `serve_with` starts from besides the config: the state dir's lock
/// (taken by the caller before anything touched the dir) and warnings the
/// checks at start found, shown by `status`.
pub struct Startup {
    pub lock: StateLock,
    pub warnings: Vec<String>,
    /// `run --insecure-no-sandbox`: accept `sandbox.mode = "none"`.
    pub insecure_no_sandbox: bool,
    /// Paths no job may see besides the config's own (the `dev` dir).
    pub hidden: Vec<PathBuf>,
    /// The id events carry, when discovered rather than configured.
    pub instance: Option<crate::imds::InstanceId>,
    /// What the instance metadata watcher has seen, for `status`.
    pub metadata: Option<Arc<std::sync::Mutex<crate::imds::Seen>>>,
    /// The Auto Scaling lifecycle hooks to complete.
    pub lifecycle: Option<Lifecycle>,
    /// What the drain flushes before the agent exits.
    pub telemetry: Arc<dyn crate::telemetry::Flush>,
    /// The log spool, opened for shipping (`run`); `None`: the stream
    /// files are kept as the jobs' logs (`dev`).
    pub logs: Option<crate::telemetry::logs::Spool>,
    /// The metrics, published to CloudWatch (`run`); `None`: kept for the
    /// local `/metrics` only (`dev`).
    pub metrics: Option<crate::telemetry::metrics::Metrics>,
}

/// The lifecycle hooks and the signal that the group is terminating the
/// instance.
pub struct Lifecycle {
    pub hooks: Arc<crate::lifecycle::Hooks>,
    pub terminating: tokio::sync::watch::Receiver<bool>,
}

impl Startup {
    pub fn locked(lock: StateLock) -> Startup {
        Startup {
            lock,
            warnings: Vec::new(),
            insecure_no_sandbox: false,
            hidden: Vec::new(),
            instance: None,
            metadata: None,
            lifecycle: None,
            telemetry: Arc::new(crate::telemetry::NothingBuffered),
            logs: None,
            metrics: None,
        }
    }
}

/// Runs the supervisor on `source` until a drain (signal or admin request,
/// or `drain` from the caller) completes.
pub async fn serve_with<S: JobSource, E: EventSink>(
    config: &Config,
    source: S,
    events: E,
    mode: &str,
    drain: Drain,
    transfers: Option<Transfers>,
    startup: Startup,
) -> Result<(), AppError> {
    // No core dumps of the agent and no ptrace by processes of its uid: it
    // holds the instance's credentials and the job queue's receipts.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot make the agent non-dumpable");
    }
    let (mut sandbox, sandbox_warnings) =
        sandbox_policy(config, mode, startup.insecure_no_sandbox, &startup.hidden)?;
    let Startup {
        lock: _lock,
        mut warnings,
        instance,
        metadata,
        lifecycle,
        telemetry,
        logs,
        metrics,
        ..
    } = startup;
    for w in sandbox_warnings {
        tracing::warn!("{w}");
        warnings.push(w);
    }
    if let Some(policy) = &mut sandbox {
        if let Some(cgroups) = &policy.cgroups {
            prepare_cgroups(cgroups, &policy.cgroup_scope)?;
            policy.metadata = Some(std::sync::Arc::new(
                crate::sandbox::egress::MetadataBlock::attach(
                    cgroups.egress_parent().as_deref(),
                    policy.uid_range,
                ),
            ));
        }
    }
    // Signal handlers first: from the moment the agent can be seen (its
    // socket), a SIGTERM must mean a drain, never the default death.
    let signals = StopSignals::install()?;
    raise_open_file_limit(config.jobs.max_concurrent);
    let keys = Keyring::load(&config.signing.keys_file).map_err(usage)?;
    let ledger = Ledger::open(&config.state.dir).map_err(failed)?;
    let logs = match logs {
        Some(spool) => spool,
        None => open_spool(config, false)?,
    };
    let metrics = metrics.unwrap_or_else(|| {
        crate::telemetry::metrics::Metrics::new(
            crate::telemetry::metrics::MetricsSettings::from_config(
                config,
                &instance_id(config),
                None,
            ),
        )
    });
    let mut settings = settings(config, logs.clone(), metrics.clone());
    settings.sandbox = sandbox;
    if let Some(instance) = instance {
        settings.instance_id = instance;
    }
    let instance = settings.instance_id.clone();
    let board = Arc::new(StatusBoard::new(
        mode,
        source.describe(),
        settings.slots,
        drain.clone(),
    ));
    for w in warnings {
        board.warn(w);
    }
    board.watch_instance(settings.instance_id.clone(), metadata);
    board.watch_logs(settings.logs.clone());
    let listener = admin::bind(&config.admin.socket).await.map_err(failed)?;
    let http = match config.admin.listen {
        Some(addr) => Some(crate::telemetry::http::bind(addr).await.map_err(usage)?),
        None => None,
    };
    let mut supervisor = Supervisor::new(
        source,
        events,
        keys,
        settings,
        ledger,
        Launcher::default(),
        drain.clone(),
        board.clone(),
    );
    if let Some(t) = transfers {
        supervisor = supervisor.with_transfers(t);
    }
    let supervisor = Arc::new(supervisor);
    // Stop signals are heard during recovery too (its waits are bounded).
    let signal_task = tokio::spawn(signals.drain_on_signals(drain.clone(), config.drain.timeout));
    supervisor.recover().await.map_err(failed)?;
    let admin_task = tokio::spawn(admin::serve(
        listener,
        board.clone(),
        drain.clone(),
        config.drain.timeout,
    ));
    tracing::info!(
        slots = config.jobs.max_concurrent,
        source = %board.snapshot().source,
        admin_socket = %config.admin.socket.display(),
        "batchly-agent {} started", env!("CARGO_PKG_VERSION")
    );
    let stop_feeding = tokio_util::sync::CancellationToken::new();
    let feeding = tokio::spawn(feed_metrics(
        board.clone(),
        logs,
        metrics.clone(),
        stop_feeding.clone(),
    ));
    let stop_http = tokio_util::sync::CancellationToken::new();
    if let Some(listener) = http {
        tokio::spawn(crate::telemetry::http::serve(
            listener,
            metrics,
            Arc::new(health),
            stop_http.clone(),
        ));
    }
    systemd::ready(&board);
    let systemd_task = tokio::spawn(systemd::keep_informed(board.clone(), drain.clone()));
    // Ready to take jobs: the group may count the instance now.
    let hook_tasks = lifecycle.as_ref().map(|l| {
        let launch = l.hooks.clone();
        let beats = l.hooks.clone();
        let terminating = l.terminating.clone();
        (
            tokio::spawn(async move { launch.complete_launch().await }),
            tokio::spawn(async move { beats.heartbeat_while_terminating(terminating).await }),
        )
    });
    supervisor.clone().run().await;
    systemd_task.abort();
    admin_task.abort();
    signal_task.abort();
    let _ = std::fs::remove_file(&config.admin.socket);
    let snap = board.snapshot();
    let reason = drain.current().map(|d| d.reason).unwrap_or_default();
    let mut stopped = AgentEvent::new("agent.stopped", &instance.get(), config.jobs.max_concurrent);
    stopped.reason = Some(reason.clone());
    supervisor.announce_stop(&stopped).await;
    let end = drain
        .end()
        .unwrap_or_else(|| std::time::Instant::now() + STOP_FLUSH_BUDGET);
    // The last slots and log counts go into the last interval.
    stop_feeding.cancel();
    let _ = feeding.await;
    crate::telemetry::flush_before_exit(telemetry.as_ref(), end).await;
    stop_http.cancel();
    drain.timeline().mark(crate::drain::Step::Flushed);
    // Last: completing the termination hook lets the group take the
    // instance away.
    if let (Some(l), Some((launch, beats))) = (&lifecycle, hook_tasks) {
        launch.abort();
        beats.abort();
        let terminating = *l.terminating.borrow();
        l.hooks.complete_termination(terminating).await;
    }
    let stranded = board.stranded_count();
    if stranded > 0 {
        return Err(failed(format!(
            "drained ({reason}) but {stranded} message(s) could not be finished or released; \
             the next start of the agent on the same state dir completes them"
        )));
    }
    log_timeline(drain.timeline());
    tracing::info!(
        reason,
        succeeded = snap.counts.get("succeeded").copied().unwrap_or(0),
        interrupted = snap.counts.get("interrupted").copied().unwrap_or(0),
        "drained; every job finished or was released; exiting"
    );
    Ok(())
}

/// How often the slot gauges and the log counters are given to the
/// metrics.
const FEED_EVERY: Duration = Duration::from_secs(5);

/// What the metrics were last told of the log spool's counters.
#[derive(Debug, Default)]
struct MetricsFeed {
    shipped: u64,
    spooled: u64,
    dropped: u64,
    rejected: u64,
}

impl MetricsFeed {
    /// Gives the metrics the slots now and the log counters' growth.
    fn feed(
        &mut self,
        board: &StatusBoard,
        logs: &crate::telemetry::logs::Spool,
        metrics: &crate::telemetry::metrics::Metrics,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let snap = board.snapshot();
        metrics.slots(snap.slots, snap.busy);
        let c = logs.counters();
        let now = (
            c.shipped_bytes.load(Relaxed),
            c.spooled_bytes.load(Relaxed),
            c.dropped_bytes.load(Relaxed),
            c.rejected_events.load(Relaxed),
        );
        metrics.log_bytes(
            now.0 - self.shipped,
            now.1 - self.spooled,
            now.2 - self.dropped,
        );
        metrics.log_events_dropped(now.3 - self.rejected);
        (self.shipped, self.spooled, self.dropped, self.rejected) = now;
    }
}

/// Feeds the metrics every `FEED_EVERY`, and once more at `stop`.
async fn feed_metrics(
    board: Arc<StatusBoard>,
    logs: crate::telemetry::logs::Spool,
    metrics: crate::telemetry::metrics::Metrics,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut feed = MetricsFeed::default();
    let mut every = tokio::time::interval(FEED_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => feed.feed(&board, &logs, &metrics),
            _ = stop.cancelled() => break,
        }
    }
    feed.feed(&board, &logs, &metrics);
}

/// `/healthz`: healthy while every long-lived loop (intake, lease
/// heartbeat, metadata watcher, log shipper) makes progress.
fn health() -> Result<(), String> {
    let stalled = crate::liveness::global().stalled();
    if stalled.is_empty() {
        return Ok(());
    }
    Err(stalled
        .iter()
        .map(|(name, quiet)| format!("{name} made no progress for {}s", quiet.as_secs()))
        .collect::<Vec<_>>()
        .join("; "))
}

/// One line with the drain's steps, in milliseconds after it was asked
/// for (`bench_drain` reads it; an operator sees where the time went).
fn log_timeline(timeline: &crate::drain::Timeline) {
    use crate::drain::Step;
    let Some((asked, ago)) = timeline.asked_at() else {
        return;
    };
    let ms = |step| timeline.after(step).map_or(-1, |ms| ms as i64);
    tracing::info!(
        asked_at = %crate::events::rfc3339(asked),
        asked_unix_ms = asked
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        intake_stopped_ms = ms(Step::IntakeStopped),
        last_job_signalled_ms = ms(Step::JobSignalled),
        jobs_done_ms = ms(Step::JobsDone),
        flushed_ms = ms(Step::Flushed),
        exit_ms = ago.as_millis() as u64,
        "drain timeline"
    );
}

/// How long the flush may take at a stop that has no drain deadline.
const STOP_FLUSH_BUDGET: Duration = Duration::from_secs(10);

/// Descriptors one running job costs the agent (pipes, log, sockets),
/// with room to spare.
const FDS_PER_SLOT: u64 = 8;
/// Descriptors the agent needs besides its jobs.
const FDS_BASE: u64 = 128;

/// Raises the soft limit on open files to the hard limit (the usual 1024
/// soft limit is easy to reach with many slots), and warns when even that
/// cannot cover every slot.
fn raise_open_file_limit(slots: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let need = FDS_BASE + slots as u64 * FDS_PER_SLOT;
    if hard < need {
        tracing::warn!(
            limit = hard,
            need,
            "the open-file limit is low for jobs.max_concurrent; raise LimitNOFILE"
        );
    }
}

/// Sets up the agent's own log on stderr: human-readable text (the terminal
/// in `dev`) or one JSON object per line (journald, CloudWatch). Under
/// `run` the same events also go, as JSON, to the agent's stream in the
/// log spool (see `telemetry::logs::agent_log`).
pub fn init_logging(format: crate::config::LogFormat, level: &str) -> Result<(), AppError> {
    use crate::telemetry::logs::agent_log;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| usage(format!("agent.log_level: {e}")))?;
    use std::io::IsTerminal;
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let stderr = match format {
        crate::config::LogFormat::Json => stderr.json().flatten_event(true).boxed(),
        crate::config::LogFormat::Text => stderr.with_target(false).compact().boxed(),
    };
    let shipped = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_ansi(false)
        .with_writer(agent_log::MakeEventWriter)
        .with_filter(tracing_subscriber::filter::filter_fn(|_| {
            agent_log::attached()
        }));
    let res = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(shipped)
        .try_init();
    res.map_err(|e| failed(format!("setting up logging: {e}")))
}
