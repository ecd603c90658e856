//! Command line parsing and exit codes; everything else lives in the library.
//! Exit status: 0 success (a drained stop included), 2 bad usage or
//! configuration, 1 any other failure.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use batchly_agent::app::{self, AppError};
use batchly_agent::config::LogFormat;
use batchly_agent::envelope::{Alg, SigningKey};
use batchly_agent::sandbox;
use batchly_agent::submit::{self, JobRequest};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "batchly-agent",
    version,
    about = "Runs signed batch jobs from a queue, each isolated in its own process, without ever losing one.",
    long_about = "batchly-agent runs on every worker instance of a batch platform. It pulls signed jobs \
from SQS (or, in `dev`, from a local directory), verifies each signature, runs the job in its own \
process group with a scrubbed environment and a private work dir, and deletes a message only once \
the job's outcome is final. SIGTERM, SIGINT or `batchly-agent drain` stop it cleanly: no new jobs, \
running jobs told to stop, whatever cannot finish released for another worker.\n\n\
Try it with no AWS account:\n  batchly-agent dev\n  batchly-agent submit --dir batchly-dev -- echo hello"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> LogFormat {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum AlgArg {
    Ed25519,
    #[value(name = "hmac-sha256")]
    HmacSha256,
}

#[derive(Args)]
struct AgentSocket {
    /// The agent's admin socket [default: admin.socket from the config]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Talk to the `dev` agent running on this directory
    #[arg(long, value_name = "DIR", conflicts_with = "socket")]
    dir: Option<PathBuf>,
    /// Config file naming admin.socket [default: /etc/batchly/agent.toml]
    #[arg(long, short, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: pull jobs from SQS and run them (what systemd starts)
    Run {
        /// Config file [default: /etc/batchly/agent.toml]
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Format of the agent's own log on stderr [default: agent.log_format]
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
        /// Accept `sandbox.mode = "none"`: jobs then run without isolation,
        /// with the agent's privileges
        #[arg(long)]
        insecure_no_sandbox: bool,
    },
    /// Run the embedded default: the same agent on a local directory queue, no AWS needed
    Dev {
        /// Directory holding the queue, keys, events.jsonl and job logs (created if missing)
        #[arg(long, default_value = "batchly-dev", value_name = "DIR")]
        dir: PathBuf,
        /// Optional config file; defaults put everything under DIR
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Format of the agent's own log on stderr
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Sign a job and put it on a queue: a `dev` directory (--dir) or SQS (--queue-url)
    Submit(Box<SubmitArgs>),
    /// Make a signing key file (mode 0600) and print the entry to add to the agents' keys file
    Keygen {
        /// Signature algorithm; ed25519 lets workers hold only public keys
        #[arg(long, value_enum, default_value = "ed25519")]
        alg: AlgArg,
        /// Key id (1-64 of A-Za-z0-9._-), e.g. prod-2026-11
        #[arg(long)]
        kid: String,
        /// Where to write the signing key [default: ./<KID>.signing.toml]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Validate the config and keys file (permissions included) and print the effective config
    CheckConfig {
        /// Config file [default: /etc/batchly/agent.toml]
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Check the configuration `dev --dir DIR` would use instead
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Show what the running agent is doing: slots, running jobs, outcomes, draining or not
    Status {
        #[command(flatten)]
        target: AgentSocket,
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent to drain: no new jobs, running ones finish or are released, then it exits 0
    Drain {
        #[command(flatten)]
        target: AgentSocket,
    },
    /// Kill one running job (its whole cgroup): final event with reason `cancelled`, message deleted
    Cancel {
        /// The job's id (its spec's `id`)
        job_id: String,
        /// Release the message to run again instead of deleting it
        #[arg(long)]
        requeue: bool,
        #[command(flatten)]
        target: AgentSocket,
    },
    /// Measure the agent against a baseline measured in the same run
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Trivial jobs (/bin/true) through `dev`, against plain posix_spawn of
    /// /bin/true and (as root) /bin/true in a fresh cgroup and namespaces
    Spawn {
        #[arg(long, default_value_t = 2000)]
        jobs: u32,
        /// Job slots [default: number of CPUs]
        #[arg(long)]
        slots: Option<usize>,
        /// Run the jobs a second time with the agent holding this much
        /// memory (0: no second run)
        #[arg(long, value_name = "MIB", default_value_t = 1024)]
        hold_mib: u64,
    },
}

#[derive(Args)]
struct SubmitArgs {
    /// Enqueue into the `dev` directory DIR (signed with its development key)
    #[arg(long, value_name = "DIR", required_unless_present = "queue_url")]
    dir: Option<PathBuf>,
    /// Send to this SQS queue
    #[arg(long, value_name = "URL", conflicts_with = "dir")]
    queue_url: Option<String>,
    /// Signing key file [default with --dir: DIR/keys/signing.toml; required with --queue-url]
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// FIFO queues: the message group [default: each job's id]
    #[arg(long, value_name = "GROUP", requires = "queue_url")]
    group: Option<String>,
    /// A full job spec (JSON) instead of a command
    #[arg(long, value_name = "FILE", conflicts_with_all = ["command", "timeout_s", "max_attempts", "env", "tag", "signal", "grace_s"])]
    spec: Option<PathBuf>,
    /// Job id [default: random]; with --count, suffixed -0001, -0002, ...
    #[arg(long)]
    id: Option<String>,
    /// Submit this many copies (for load)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Wall-clock limit in seconds [default: jobs.default_timeout_s of the agent]
    #[arg(long = "timeout-s", value_name = "SECONDS")]
    timeout_s: Option<u64>,
    /// Attempts in all before a failing job is given up
    #[arg(long, value_name = "N")]
    max_attempts: Option<u32>,
    /// Environment variable for the job (repeatable)
    #[arg(long, value_name = "KEY=VALUE", value_parser = submit::parse_pair)]
    env: Vec<(String, String)>,
    /// Tag copied into the job's events (repeatable)
    #[arg(long, value_name = "KEY=VALUE", value_parser = submit::parse_pair)]
    tag: Vec<(String, String)>,
    /// Signal the job gets on drain [default: SIGTERM]
    #[arg(long, value_name = "SIGNAL")]
    signal: Option<String>,
    /// Seconds the job has after that signal [default: 30]
    #[arg(long = "grace-s", value_name = "SECONDS")]
    grace_s: Option<u64>,
    /// Seconds the signed envelope stays valid (1 to 604800, the agents' default signing.max_ttl_s)
    #[arg(long = "ttl-s", default_value_t = 86_400, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    ttl_s: u64,
    /// The command and its arguments, after `--`
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let hidden_command = std::env::args_os().nth(1);
    if hidden_command
        .as_ref()
        .is_some_and(|a| a == sandbox::LAUNCHER_ARG)
    {
        sandbox::forkserver::serve();
    }
    if hidden_command
        .as_ref()
        .is_some_and(|a| a == sandbox::userns::PROBE_ARG)
    {
        sandbox::userns::probe_main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("batchly-agent: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, AppError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| AppError::Failed(format!("starting the async runtime: {e}")))
}

fn dispatch(cli: Cli) -> Result<(), AppError> {
    match cli.command {
        Command::Run {
            config,
            log_format,
            insecure_no_sandbox,
        } => {
            let cfg = app::load_config(config.as_deref())?;
            app::init_logging(
                log_format.map(Into::into).unwrap_or(cfg.agent.log_format),
                &cfg.agent.log_level,
            )?;
            runtime()?.block_on(app::run(config.as_deref(), insecure_no_sandbox))
        }
        Command::Dev {
            dir,
            config,
            log_format,
        } => {
            let (_, cfg) = app::load_dev_config(&dir, config.as_deref())?;
            app::init_logging(
                log_format.map(Into::into).unwrap_or(cfg.agent.log_format),
                &cfg.agent.log_level,
            )?;
            runtime()?.block_on(app::dev(&dir, config.as_deref(), false))
        }
        Command::Submit(args) => submit(*args),
        Command::Keygen { alg, kid, out } => {
            let alg = match alg {
                AlgArg::Ed25519 => Alg::Ed25519,
                AlgArg::HmacSha256 => Alg::HmacSha256,
            };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{kid}.signing.toml")));
            let entry = app::keygen(alg, &kid, &out)?;
            eprintln!(
                "wrote signing key {} (mode 0600; keep it with the producer).\n\
                 Add this entry to the keys file of every agent (/etc/batchly/keys.toml):\n",
                out.display()
            );
            print!("{entry}");
            Ok(())
        }
        Command::CheckConfig { config, dir } => {
            let text = app::check_config(config.as_deref(), dir.as_deref())?;
            print!("{text}");
            eprintln!("configuration ok");
            Ok(())
        }
        Command::Status { target, json } => {
            let socket = app::admin_socket(
                target.socket.as_deref(),
                target.dir.as_deref(),
                target.config.as_deref(),
            )?;
            let text = runtime()?.block_on(app::status(&socket, json))?;
            print!("{text}");
            if json {
                println!();
            }
            Ok(())
        }
        Command::Cancel {
            job_id,
            requeue,
            target,
        } => {
            let socket = app::admin_socket(
                target.socket.as_deref(),
                target.dir.as_deref(),
                target.config.as_deref(),
            )?;
            let text = runtime()?.block_on(app::request_cancel(&socket, &job_id, requeue))?;
            println!("{text}");
            Ok(())
        }
        Command::Drain { target } => {
            let socket = app::admin_socket(
                target.socket.as_deref(),
                target.dir.as_deref(),
                target.config.as_deref(),
            )?;
            let text = runtime()?.block_on(app::request_drain(&socket))?;
            println!("{text}");
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Spawn {
                    jobs,
                    slots,
                    hold_mib,
                },
        } => {
            app::init_logging(LogFormat::Text, "warn")?;
            let slots = slots
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let report = runtime()?.block_on(batchly_agent::bench::spawn(jobs, slots, hold_mib))?;
            print!("{}", report.render());
            if report.succeeded() != report.ran() {
                return Err(AppError::Failed(format!(
                    "only {} of {} bench jobs succeeded",
                    report.succeeded(),
                    report.ran()
                )));
            }
            Ok(())
        }
    }
}

fn submit(args: SubmitArgs) -> Result<(), AppError> {
    let request = JobRequest {
        spec_file: args.spec,
        id: args.id,
        count: args.count,
        timeout_s: args.timeout_s,
        max_attempts: args.max_attempts,
        env: args.env,
        tags: args.tag,
        interrupt_signal: args.signal,
        grace_s: args.grace_s,
        command: args.command,
    };
    let jobs = submit::job_texts(&request)?;
    let ttl = std::time::Duration::from_secs(args.ttl_s);
    if let Some(url) = &args.queue_url {
        let Some(key_path) = &args.key else {
            return Err(AppError::Usage(
                "--queue-url needs --key FILE (a signing key file)".into(),
            ));
        };
        let key = SigningKey::load(key_path).map_err(|e| AppError::Usage(e.to_string()))?;
        let rt = runtime()?;
        let queued = rt.block_on(async {
            let sdk = app::aws_sdk_config().await?;
            let client = aws_sdk_sqs::Client::new(&sdk);
            submit::submit_to_sqs(
                &client,
                url,
                &key,
                &jobs,
                ttl,
                args.group.as_deref(),
                |job, msg| {
                    println!("{job}\t{msg}");
                },
            )
            .await
        })?;
        eprintln!("queued {queued} job(s) on {url}");
        return Ok(());
    }
    let Some(dir) = args.dir else {
        return Err(AppError::Usage("give --dir DIR or --queue-url URL".into()));
    };
    let layout = app::DevLayout::new(&dir)?;
    let key_path = match args.key {
        Some(k) => k,
        None => {
            layout.ensure_keys()?;
            layout.signing_key()
        }
    };
    let key = SigningKey::load(&key_path).map_err(|e| AppError::Usage(e.to_string()))?;
    let queued = submit::submit_to_dir(&layout.root, &key, &jobs, ttl, |job, msg| {
        println!("{job}\t{msg}");
    })?;
    eprintln!("queued {queued} job(s) in {}", layout.root.display());
    Ok(())
}
