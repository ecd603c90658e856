//! Wiring: builds the parts from the validated configuration and runs them
//! as one daemon (`run` on SQS, `dev` on a local directory); owns the
//! shutdown path (signals → drain → supervisor returns → exit 0). Also the
//! small one-shot commands that need the same parts: `check-config`,
//! `keygen`, `status` and `drain`.
//!
//! Every error that is the operator's to fix (config, keys file) is a
//! `AppError::Usage`, which `main` turns into exit status 2.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin;
use crate::config::{Config, ConfigFile};
use crate::drain::Drain;
use crate::envelope::{Alg, Keyring, SigningKey, VerifyPolicy};
use crate::events::{AgentEvent, EventSink, JsonlFile, SqsEvents};
use crate::queue::dir::DirQueue;
use crate::queue::sqs::{check_queue, SqsQueue};
use crate::queue::JobSource;
use crate::sandbox::process::Launcher;
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

fn usage(e: impl std::fmt::Display) -> AppError {
    AppError::Usage(e.to_string())
}

fn failed(e: impl std::fmt::Display) -> AppError {
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

/// Files of the `dev` directory outside the queue layout.
pub struct DevLayout {
    pub root: PathBuf,
}

impl DevLayout {
    /// `dir` made absolute (config paths must be).
    pub fn new(dir: &Path) -> Result<DevLayout, AppError> {
        let root =
            std::path::absolute(dir).map_err(|e| usage(format!("--dir {}: {e}", dir.display())))?;
        Ok(DevLayout { root })
    }

    pub fn signing_key(&self) -> PathBuf {
        self.root.join("keys/signing.toml")
    }

    pub fn keys_file(&self) -> PathBuf {
        self.root.join("keys/keys.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("agent.sock")
    }

    pub fn events(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    /// Defaults of `dev` mode: everything under the directory.
    pub fn mode_defaults(&self) -> Vec<(&'static str, String)> {
        let p = |sub: &str| self.root.join(sub).display().to_string();
        vec![
            ("jobs.work_dir", p("work")),
            ("jobs.log_dir", p("logs")),
            ("signing.keys_file", self.keys_file().display().to_string()),
            ("admin.socket", self.socket().display().to_string()),
            ("state.dir", p("state")),
            ("agent.instance_id", format!("dev-{}", hostname())),
        ]
    }

    /// Creates the development signing key and its verification entry on
    /// first use; later calls reuse them.
    pub fn ensure_keys(&self) -> Result<(), AppError> {
        if self.signing_key().exists() {
            return Ok(());
        }
        let key = SigningKey::generate(Alg::Ed25519, "dev").map_err(failed)?;
        let dir = self.root.join("keys");
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| failed(format!("creating {}: {e}", dir.display())))?;
        }
        write_private(&self.keys_file(), &key.verification_entry_toml())?;
        write_private(&self.signing_key(), &key.to_signing_file_toml())?;
        tracing::info!(key = %self.signing_key().display(), "created a development signing key");
        Ok(())
    }
}

/// Writes a new file readable only by its owner (mode 0600 from creation,
/// so no other user can open it in between).
pub fn write_private(path: &Path, text: &str) -> Result<(), AppError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(format!("creating {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| failed(format!("writing {}: {e}", path.display())))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Loads the configuration of `dev` mode on `dir`.
pub fn load_dev_config(
    dir: &Path,
    explicit: Option<&Path>,
) -> Result<(DevLayout, Config), AppError> {
    let layout = DevLayout::new(dir)?;
    let defaults = layout.mode_defaults();
    let file = match explicit {
        Some(p) => ConfigFile::Explicit(p),
        None => ConfigFile::None,
    };
    let config = Config::load(file, &process_env(), &defaults).map_err(usage)?;
    Ok((layout, config))
}

fn settings(config: &Config) -> Settings {
    Settings {
        slots: config.jobs.max_concurrent,
        default_timeout: config.jobs.default_timeout,
        kill_grace: config.jobs.kill_grace,
        backoff: Backoff {
            base: config.jobs.retry_backoff,
            max: config.jobs.retry_backoff_max,
        },
        work_root: config.jobs.work_dir.clone(),
        log_root: config.jobs.log_dir.clone(),
        log_max_bytes: config.jobs.log_max_bytes,
        verify: VerifyPolicy {
            skew: config.signing.skew,
            max_ttl: config.signing.max_ttl,
        },
        instance_id: instance_id(config),
        max_requeues: crate::supervisor::DEFAULT_MAX_REQUEUES,
    }
}

/// `agent.instance_id`, or `host-<hostname>` until instance metadata is
/// read (a later release discovers the EC2 instance id).
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
        print_dev_banner(&layout, &config);
    }
    serve_with(
        &config,
        source,
        events,
        "dev",
        Drain::new(),
        None,
        Startup::locked(lock),
    )
    .await
}

fn print_dev_banner(layout: &DevLayout, config: &Config) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "batchly-agent".into());
    let d = layout.root.display();
    eprintln!(
        "batchly-agent dev: running on {d} with {} job slots. Ctrl-C drains and stops.\n\n\
         \x20 submit a job    {exe} submit --dir {d} -- echo hello\n\
         \x20 submit 50       {exe} submit --dir {d} --count 50 -- sh -c 'sleep 1; echo done'\n\
         \x20 agent status    {exe} status --dir {d}\n\
         \x20 job events      tail -f {}\n\
         \x20 job output      {}/<job-id>.<message-id>.<run>\n\
         \x20 dead letters    {d}/dead/ (each with a .reason.json)\n",
        config.jobs.max_concurrent,
        layout.events().display(),
        config.jobs.log_dir.display(),
    );
}

/// `batchly-agent run`: the daemon on SQS.
pub async fn run(explicit_config: Option<&Path>) -> Result<(), AppError> {
    let config = load_config(explicit_config)?;
    config.require_queue().map_err(usage)?;
    // Checked before any network call: a bad keys file is exit 2 at once.
    Keyring::load(&config.signing.keys_file).map_err(usage)?;
    let lock = lock_state_dir(&config)?;
    let sdk = aws_sdk_config().await?;
    let sqs = sqs_client(&sdk);
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
    let mut startup = Startup::locked(lock);
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
            announce(&sink, url, &config).await?;
            Some(sink)
        }
        None => {
            tracing::warn!(
                "queue.events_url is not set: job events go only to the agent's own log"
            );
            None
        }
    };
    let transfers = Transfers::new(s3_client(&sdk));
    serve_with(
        &config,
        source,
        events,
        "run",
        Drain::new(),
        Some(transfers),
        startup,
    )
    .await
}

/// Publishes `agent.started`, which also proves the events queue takes
/// messages: a queue that refuses them (the role lacks sqs:SendMessage,
/// say) would otherwise turn every finished job into a release, forever.
async fn announce(sink: &SqsEvents, url: &str, config: &Config) -> Result<(), AppError> {
    let ev = AgentEvent::new(
        "agent.started",
        &instance_id(config),
        config.jobs.max_concurrent,
    );
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

/// The AWS SDK's configuration from its standard chain (environment,
/// profile, ECS container credentials, instance profile via IMDSv2), with
/// bounded timeouts and the SDK's retries (exponential backoff, jitter).
pub async fn aws_sdk_config() -> Result<aws_config::SdkConfig, AppError> {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(4))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                // Longer than SQS's 20-second long poll.
                .operation_attempt_timeout(Duration::from_secs(40))
                .build(),
        )
        .load()
        .await;
    if sdk.region().is_none() {
        return Err(usage(
            "no AWS region: set AWS_REGION (on EC2 the SDK reads it from instance metadata)",
        ));
    }
    Ok(sdk)
}

/// SQS with one retry layer (the agent's own, `crate::retry`, bounded by
/// each caller's deadline) instead of the SDK's on top of it, and a short
/// attempt timeout for every call but the long poll (which sets its own).
fn sqs_client(sdk: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    let conf = aws_sdk_sqs::config::Builder::from(sdk)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(SQS_CONNECT_TIMEOUT)
                .operation_attempt_timeout(SQS_CALL_TIMEOUT)
                .build(),
        )
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

/// How long an SQS connection may take to open.
const SQS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one SQS call other than a long poll may take: a hung endpoint
/// costs this much, then the caller's retry policy decides.
const SQS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// S3 with path-style addressing when the endpoint is a local address (an
/// IP or localhost cannot carry a bucket name as a subdomain); AWS's own
/// endpoints use virtual-hosted style.
fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok();
    let path_style = endpoint.as_deref().is_some_and(is_local_endpoint);
    let conf = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(path_style)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

fn is_local_endpoint(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok()
}

/// What `serve_with` starts from besides the config: the state dir's lock
/// (taken by the caller before anything touched the dir) and warnings the
/// checks at start found, shown by `status`.
pub struct Startup {
    pub lock: StateLock,
    pub warnings: Vec<String>,
}

impl Startup {
    pub fn locked(lock: StateLock) -> Startup {
        Startup {
            lock,
            warnings: Vec::new(),
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
    let Startup {
        lock: _lock,
        warnings,
    } = startup;
    // Signal handlers first: from the moment the agent can be seen (its
    // socket), a SIGTERM must mean a drain, never the default death.
    let signals = StopSignals::install()?;
    raise_open_file_limit(config.jobs.max_concurrent);
    let keys = Keyring::load(&config.signing.keys_file).map_err(usage)?;
    let ledger = Ledger::open(&config.state.dir).map_err(failed)?;
    let settings = settings(config);
    let board = Arc::new(StatusBoard::new(
        mode,
        source.describe(),
        settings.slots,
        drain.clone(),
    ));
    for w in warnings {
        board.warn(w);
    }
    let listener = admin::bind(&config.admin.socket).await.map_err(failed)?;
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
    supervisor.clone().run().await;
    admin_task.abort();
    signal_task.abort();
    let _ = std::fs::remove_file(&config.admin.socket);
    let snap = board.snapshot();
    let reason = drain.current().map(|d| d.reason).unwrap_or_default();
    let mut stopped = AgentEvent::new(
        "agent.stopped",
        &instance_id(config),
        config.jobs.max_concurrent,
    );
    stopped.reason = Some(reason.clone());
    supervisor.announce_stop(&stopped).await;
    let stranded = board.stranded_count();
    if stranded > 0 {
        return Err(failed(format!(
            "drained ({reason}) but {stranded} message(s) could not be finished or released; \
             the next start of the agent on the same state dir completes them"
        )));
    }
    tracing::info!(
        reason,
        succeeded = snap.counts.get("succeeded").copied().unwrap_or(0),
        interrupted = snap.counts.get("interrupted").copied().unwrap_or(0),
        "drained; every job finished or was released; exiting"
    );
    Ok(())
}

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

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals, AppError> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| failed(format!("installing the {name} handler: {e}")))
        };
        Ok(StopSignals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// The first signal starts a drain with `timeout`; a second one asks for
    /// an immediate stop (jobs killed and released now).
    async fn drain_on_signals(mut self, drain: Drain, timeout: Duration) {
        let mut seen = 0;
        loop {
            let name = tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            };
            seen += 1;
            if seen == 1 {
                tracing::warn!(signal = name, timeout_s = timeout.as_secs(), "draining: no new jobs; running jobs are told to stop and released if they do not finish in time");
                drain.request(name, Instant::now() + timeout);
            } else {
                tracing::warn!(
                    signal = name,
                    "second stop signal: stopping running jobs now"
                );
                drain.request(name, Instant::now());
            }
        }
    }
}

/// `batchly-agent check-config`.
pub fn check_config(explicit: Option<&Path>, dev_dir: Option<&Path>) -> Result<String, AppError> {
    let config = match dev_dir {
        Some(dir) => load_dev_config(dir, explicit)?.1,
        None => load_config(explicit)?,
    };
    let mut out = config.render();
    let keys = Keyring::load(&config.signing.keys_file).map_err(usage)?;
    out.push_str(&format!(
        "\n# keys file {}: {} key(s), permissions ok\n",
        config.signing.keys_file.display(),
        keys.len()
    ));
    for k in keys.summaries() {
        out.push_str(&format!(
            "#   kid {:<24} {:<12} {}\n",
            k.kid,
            k.alg.as_str(),
            k.fingerprint
        ));
    }
    Ok(out)
}

/// `batchly-agent keygen`: writes the signing key file (0600, never
/// overwritten) and returns the verification entry for the keys file.
pub fn keygen(alg: Alg, kid: &str, out: &Path) -> Result<String, AppError> {
    if out.exists() {
        return Err(usage(format!(
            "{} already exists; refusing to overwrite a key (choose another --out)",
            out.display()
        )));
    }
    let key = SigningKey::generate(alg, kid).map_err(usage)?;
    write_private(out, &key.to_signing_file_toml())?;
    Ok(key.verification_entry_toml())
}

/// Where `status` and `drain` find the agent.
pub fn admin_socket(
    socket: Option<&Path>,
    dev_dir: Option<&Path>,
    config: Option<&Path>,
) -> Result<PathBuf, AppError> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(dir) = dev_dir {
        return Ok(load_dev_config(dir, config)?.1.admin.socket);
    }
    Ok(load_config(config)?.admin.socket)
}

/// `batchly-agent status`.
pub async fn status(socket: &Path, json: bool) -> Result<String, AppError> {
    match admin::request(socket, &admin::Request::Status)
        .await
        .map_err(failed)?
    {
        admin::Response::Status { status } if json => {
            serde_json::to_string_pretty(&status).map_err(failed)
        }
        admin::Response::Status { status } => Ok(status.render_text()),
        other => Err(failed(format!(
            "unexpected answer from the agent: {other:?}"
        ))),
    }
}

/// `batchly-agent drain`.
pub async fn request_drain(socket: &Path) -> Result<String, AppError> {
    match admin::request(socket, &admin::Request::Drain).await.map_err(failed)? {
        admin::Response::Draining { reason, deadline_in_s } => Ok(format!(
            "draining ({reason}): no new jobs; running jobs finish or are released within {deadline_in_s}s, then the agent exits"
        )),
        other => Err(failed(format!("unexpected answer from the agent: {other:?}"))),
    }
}

/// Sets up the agent's own log on stderr: human-readable text (the terminal
/// in `dev`) or one JSON object per line (journald, CloudWatch).
pub fn init_logging(format: crate::config::LogFormat, level: &str) -> Result<(), AppError> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| usage(format!("agent.log_level: {e}")))?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let res = match format {
        crate::config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
        crate::config::LogFormat::Text => builder.with_target(false).compact().try_init(),
    };
    res.map_err(|e| failed(format!("setting up logging: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_get_path_style_and_aws_endpoints_do_not() {
        assert!(is_local_endpoint("http://127.0.0.1:5000"));
        assert!(is_local_endpoint("http://localhost:4566/"));
        assert!(is_local_endpoint("http://[::1]:9000"));
        assert!(!is_local_endpoint("https://s3.eu-west-1.amazonaws.com"));
        assert!(!is_local_endpoint("https://minio.internal.example:9000"));
    }
}
