//! A fake host for `network: "egress"` jobs: the agent runs in a network
//! namespace of the test's own, where the instance metadata addresses
//! (169.254.169.254, the ECS credentials endpoint 169.254.170.2,
//! fd00:ec2::254) and "anywhere else" (10.251.0.1, fd00:1::1) are local
//! addresses served by `tests/python/fake_host_server.py`. Nothing is ever
//! added to the machine's own network namespace (a real metadata service
//! may live there): the wrapper refuses to change anything if `unshare`
//! left it there, and everything it sets up dies with its namespace.
//!
//! The agent is started through a wrapper (`unshare --net [--mount] sh
//! SCRIPT`) that sets up the namespace, starts the server (in its own
//! session, so it outlives the agent and keeps the namespace for the test
//! to look into after a `kill -9`), probes every address as root to prove
//! the setup works, then execs the agent, optionally with a `PATH` without
//! `nft` and with the cgroup2 mounts hidden. Each run of the agent (a
//! restart is a new namespace) has its own directory, `run-<agent pid>`.
//!
//! Probes (`tests/python/net_probe.py`) are run by jobs and by the test
//! itself, as root or any uid, optionally in a cgroup of the unified
//! hierarchy; each reports `NAME=ok` or `NAME=failed:WHY`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use tempfile::TempDir;

use crate::{eventually, read_text, DevAgent, Submitted, WAIT};

/// The instance metadata service (IMDS, IPv4).
pub const METADATA: &str = "169.254.169.254";
/// The ECS task credentials endpoint.
pub const ECS: &str = "169.254.170.2";
/// IMDS on IPv6 (Nitro instances).
pub const METADATA6: &str = "fd00:ec2::254";
/// IMDS through an IPv4-mapped IPv6 address (an AF_INET6 socket).
pub const METADATA_MAPPED: &str = "::ffff:169.254.169.254";
/// Anywhere else, IPv4.
pub const OTHER: &str = "10.251.0.1";
/// Anywhere else, IPv6 (outside fd00:ec2::/32).
pub const OTHER6: &str = "fd00:1::1";
/// Anywhere else, IPv4-mapped.
pub const OTHER_MAPPED: &str = "::ffff:10.251.0.1";

/// The addresses the fake host has and serves (TCP and UDP, port 80).
const SERVED: [&str; 5] = [METADATA, ECS, OTHER, METADATA6, OTHER6];

const SERVER_PY: &str = include_str!("../python/fake_host_server.py");
const PROBE_PY: &str = include_str!("../python/net_probe.py");

/// How a probe tries an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// connect, send a line, expect the answer
    Tcp,
    /// an unconnected UDP socket: sendto, expect the answer
    UdpSendto,
    /// connect a UDP socket, send, expect the answer
    UdpConnect,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::UdpSendto => "udp-sendto",
            Kind::UdpConnect => "udp-connect",
        }
    }
}

/// One attempt to reach an address, reported under `name`.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub name: &'static str,
    pub kind: Kind,
    pub host: &'static str,
}

const fn p(name: &'static str, kind: Kind, host: &'static str) -> Probe {
    Probe { name, kind, host }
}

/// Every way to the metadata endpoints the contract closes, TCP and UDP.
pub const BLOCKED: &[Probe] = &[
    p("md_tcp", Kind::Tcp, METADATA),
    p("md_udp_sendto", Kind::UdpSendto, METADATA),
    p("md_udp_connect", Kind::UdpConnect, METADATA),
    p("ecs_tcp", Kind::Tcp, ECS),
    p("md6_tcp", Kind::Tcp, METADATA6),
    p("md6_udp_sendto", Kind::UdpSendto, METADATA6),
    p("md6_udp_connect", Kind::UdpConnect, METADATA6),
    p("mapped_tcp", Kind::Tcp, METADATA_MAPPED),
    p("mapped_udp_sendto", Kind::UdpSendto, METADATA_MAPPED),
    p("mapped_udp_connect", Kind::UdpConnect, METADATA_MAPPED),
];

/// The same ways to anywhere else, which stay open.
pub const REACHABLE: &[Probe] = &[
    p("other_tcp", Kind::Tcp, OTHER),
    p("other_udp_sendto", Kind::UdpSendto, OTHER),
    p("other_udp_connect", Kind::UdpConnect, OTHER),
    p("other6_tcp", Kind::Tcp, OTHER6),
    p("other6_udp_sendto", Kind::UdpSendto, OTHER6),
    p("other_mapped_tcp", Kind::Tcp, OTHER_MAPPED),
];

/// A probe by name from [`BLOCKED`] or [`REACHABLE`].
pub fn probe(name: &str) -> Probe {
    *BLOCKED
        .iter()
        .chain(REACHABLE)
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no probe named {name}"))
}

/// `probes` as `NAME KIND HOST` arguments of net_probe.py.
fn probe_args(probes: &[Probe]) -> Vec<String> {
    probes
        .iter()
        .flat_map(|p| {
            [
                p.name.to_string(),
                p.kind.arg().to_string(),
                p.host.to_string(),
            ]
        })
        .collect()
}

/// What net_probe.py reported: `name=value` lines.
#[derive(Debug, Clone)]
pub struct Results {
    pub values: BTreeMap<String, String>,
    pub text: String,
    /// Where they came from, for messages.
    pub what: String,
}

impl Results {
    fn parse(text: String, what: String) -> Results {
        let values = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Results { values, text, what }
    }

    /// The value of `name`; panics (showing everything) if absent.
    pub fn get(&self, name: &str) -> &str {
        self.values
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| {
                panic!(
                    "{} did not report {name}; it reported:\n{}",
                    self.what, self.text
                )
            })
    }

    /// Asserts that every probe in `probes` got through.
    pub fn assert_reached(&self, probes: &[Probe], why: &str) {
        let bad: Vec<String> = probes
            .iter()
            .filter(|p| self.get(p.name) != "ok")
            .map(|p| {
                format!(
                    "{} ({} {}): {}",
                    p.name,
                    p.kind.arg(),
                    p.host,
                    self.get(p.name)
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{}: these must get through ({why}): {bad:#?}\nall it reported:\n{}",
            self.what,
            self.text
        );
    }

    /// Asserts that every probe in `probes` failed (any reason).
    pub fn assert_blocked(&self, probes: &[Probe], why: &str) {
        let bad: Vec<String> = probes
            .iter()
            .filter(|p| !self.get(p.name).starts_with("failed"))
            .map(|p| {
                format!(
                    "{} ({} {}): {}",
                    p.name,
                    p.kind.arg(),
                    p.host,
                    self.get(p.name)
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{}: these must be blocked ({why}): {bad:#?}\nall it reported:\n{}",
            self.what,
            self.text
        );
    }
}

/// A program by name: on `PATH`, else in the sbin and bin dirs (a root
/// shell's PATH may lack sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain([
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// A Python 3 any uid can run (a venv or pyenv under /root is not): the
/// system's. Jobs and non-root probes use it.
pub fn system_python() -> PathBuf {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("the egress tests need a system python3 (/usr/bin/python3) that job uids can run")
}

/// The network namespace of this (the test) process.
fn own_netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .expect("reading /proc/self/ns/net")
        .display()
        .to_string()
}

/// Runs `cmd`, killed after `WAIT` (through `timeout`), and returns its output.
fn output_within(program: &Path, args: &[String]) -> Output {
    Command::new("timeout")
        .args(["-s", "KILL", &WAIT.as_secs().to_string()])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", program.display()))
}

/// The fake host's files and settings; each run of an agent under it gets
/// a fresh network namespace.
pub struct FakeHost {
    dir: TempDir,
    agent_path: String,
    hide_cgroup2: bool,
    /// A cgroup of the unified hierarchy the agent is started in (see
    /// [`FakeHost::in_own_cgroup`]), removed with everything under it.
    agent_cgroup: Option<PathBuf>,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new()
    }
}

impl FakeHost {
    /// A fake host where the agent has everything: `nft` on its PATH and the
    /// cgroup2 mounts of the machine.
    pub fn new() -> FakeHost {
        let dir = tempfile::tempdir().expect("tempdir for the fake host");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("opening the fake host's dir");
        for (name, text) in [
            ("fake_host_server.py", SERVER_PY),
            ("net_probe.py", PROBE_PY),
        ] {
            std::fs::write(dir.path().join(name), text).expect("writing a fake host script");
        }
        FakeHost {
            dir,
            agent_path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            hide_cgroup2: false,
            agent_cgroup: None,
        }
    }

    /// The agent's PATH holds no `nft` (checked: the test's premise).
    pub fn without_nft(mut self) -> FakeHost {
        let path = "/usr/local/bin:/usr/bin:/bin".to_string();
        let found: Vec<PathBuf> = path
            .split(':')
            .map(|d| Path::new(d).join("nft"))
            .filter(|p| p.exists())
            .collect();
        assert!(
            found.is_empty(),
            "the PATH meant to lack nft has it: {found:?}"
        );
        self.agent_path = path;
        self
    }

    /// The agent sees no cgroup2 mount (unmounted in its own mount namespace).
    pub fn hiding_cgroup2(mut self) -> FakeHost {
        self.hide_cgroup2 = true;
        self
    }

    /// The agent starts in a fresh cgroup of the unified hierarchy (made
    /// here, under the test's own), so its jobs' parent there,
    /// `<that cgroup>/batchly`, is its alone: what is attached to it was
    /// attached by this agent, not by an earlier one (the programs on the
    /// shared `batchly` cgroup outlive every agent by design).
    pub fn in_own_cgroup(mut self) -> FakeHost {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let own = own_cgroup2().expect("a cgroup2 mount (the unified hierarchy) on this machine");
        let path = own.join(format!(
            "egress-agent-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating the agent's cgroup {}: {e}", path.display()));
        self.agent_cgroup = Some(path);
        self
    }

    /// The cgroup the agent starts in, if [`FakeHost::in_own_cgroup`].
    pub fn agent_cgroup(&self) -> Option<&Path> {
        self.agent_cgroup.as_deref()
    }

    /// The wrapper command for [`DevAgent::start_under`].
    pub fn wrapper(&self) -> Vec<String> {
        let dir = self.dir.path();
        let script = dir.join("wrapper.sh");
        std::fs::write(&script, self.script()).expect("writing the wrapper script");
        let mut wrapper = vec!["unshare".to_string(), "--net".to_string()];
        if self.hide_cgroup2 {
            // Private: the unmount never reaches the machine's mounts.
            wrapper.extend([
                "--mount".to_string(),
                "--propagation".to_string(),
                "private".to_string(),
            ]);
        }
        wrapper.extend([
            "--".to_string(),
            "/bin/sh".to_string(),
            script.display().to_string(),
            own_netns(),
            dir.display().to_string(),
            self.agent_path.clone(),
            self.agent_cgroup
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_else(|| "-".to_string()),
        ]);
        wrapper
    }

    fn script(&self) -> String {
        let python = crate::sqs::python_bin().display().to_string();
        let probe_python = system_python().display().to_string();
        let hide = if self.hide_cgroup2 {
            r#"for mp in $(awk '/ - cgroup2 / {print $5}' /proc/self/mountinfo); do umount -l "$mp"; done
if grep -q ' - cgroup2 ' /proc/self/mountinfo; then
    echo "fake host: a cgroup2 mount is still visible" >&2; exit 96
fi
"#
        } else {
            ""
        };
        let mut addrs = String::new();
        for a in SERVED {
            if a.contains(':') {
                addrs.push_str(&format!("ip -6 addr add {a}/128 dev lo nodad\n"));
            } else {
                addrs.push_str(&format!("ip addr add {a}/32 dev lo\n"));
            }
        }
        let probes: Vec<Probe> = BLOCKED.iter().chain(REACHABLE).copied().collect();
        format!(
            r#"# The fake host: see tests/src/netns.rs. Arguments: the machine's
# network namespace, the fake host's dir, the agent's PATH, the cgroup
# (unified hierarchy) to start the agent in or "-"; then the agent's
# command line.
set -eu
host_ns=$1 dir=$2 agent_path=$3 agent_cgroup=$4
shift 4
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
if [ "$(readlink /proc/self/ns/net)" = "$host_ns" ]; then
    echo "fake host: still in the machine's network namespace; changing nothing" >&2
    exit 97
fi
run="$dir/run-$$"
mkdir "$run"
if [ "$agent_cgroup" != - ]; then echo $$ > "$agent_cgroup/cgroup.procs"; fi
{hide}ip link set lo up
{addrs}setsid '{python}' "$dir/fake_host_server.py" "$run" {watch} {served} </dev/null >"$run/server.out" 2>&1 &
server=$!
while [ ! -e "$run/ready" ]; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "fake host: the server died:" >&2; cat "$run/server.out" >&2; exit 98
    fi
    sleep 0.01
done
'{probe_python}' "$dir/net_probe.py" "$run/setup.results" setup {probes}
PATH=$agent_path
exec "$@"
"#,
            watch = std::process::id(),
            served = SERVED.join(" "),
            probes = probe_args(&probes).join(" "),
        )
    }

    /// Starts a `dev` agent under the fake host with `env`, and puts the
    /// probe script into its mark dir (the one place a job and the test
    /// share).
    pub fn start_agent(&self, env: &[(&str, &str)]) -> DevAgent {
        let wrapper = self.wrapper();
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let agent = DevAgent::start_under(&wrapper, env);
        let probe = agent.mark().join("net_probe.py");
        std::fs::write(&probe, PROBE_PY).expect("writing the probe into the mark dir");
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644))
            .expect("letting jobs read the probe");
        agent
    }

    /// The run of the agent whose pid is `agent_pid` (its namespace, its
    /// server).
    pub fn run(&self, agent_pid: i32) -> HostRun {
        let dir = self.dir.path().join(format!("run-{agent_pid}"));
        let ready = dir.join("ready");
        let mut pid = None;
        eventually(
            "the fake host's server to be ready",
            WAIT,
            || {
                pid = std::fs::read_to_string(&ready)
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok());
                pid.is_some()
            },
            || {
                format!(
                    "{} does not hold a pid (was the agent started under the fake host?)",
                    ready.display()
                )
            },
        );
        HostRun {
            dir,
            server_pid: pid.expect("set by the wait"),
            probe_script: self.dir.path().join("net_probe.py"),
        }
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.kill_servers();
        if let Some(cgroup) = &self.agent_cgroup {
            remove_cgroup_tree(cgroup);
        }
    }
}

impl FakeHost {
    fn kill_servers(&self) {
        // Each run's server keeps its namespace alive: end them (only
        // processes that are still that server, never a reused pid).
        for name in crate::list_dir(self.dir.path()) {
            if !name.starts_with("run-") {
                continue;
            }
            let ready = self.dir.path().join(&name).join("ready");
            let Some(pid) = std::fs::read_to_string(ready)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("fake_host_server.py"));
            if ours {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The test process's own cgroup in the unified hierarchy (mount point
/// joined with its `0::` path); `None` without a cgroup2 mount.
fn own_cgroup2() -> Option<PathBuf> {
    cgroup2_of(std::process::id() as i32)
}

/// Removes `dir` and every cgroup under it, deepest first, waiting (a
/// little) for the processes in them to be gone.
fn remove_cgroup_tree(dir: &Path) {
    for name in crate::list_dir(dir) {
        let child = dir.join(name);
        if child.is_dir() {
            remove_cgroup_tree(&child);
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dir.exists() && std::fs::remove_dir(dir).is_err() {
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "could not remove the test's cgroup {} (processes: {:?})",
                dir.display(),
                std::fs::read_to_string(dir.join("cgroup.procs"))
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Who runs a probe the test starts itself, in a run's namespace.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// root, in the test's own cgroup
    Root,
    /// root, moved into this cgroup (of the unified hierarchy) first
    RootIn(&'a Path),
    /// this uid and gid, no groups, no capabilities, the test's cgroup
    Uid(u32),
}

/// One run of the agent under the fake host: its network namespace (kept
/// by the server, also after the agent is gone).
pub struct HostRun {
    dir: PathBuf,
    pub server_pid: i32,
    probe_script: PathBuf,
}

impl HostRun {
    /// `/proc/<server>/ns/net`.
    pub fn netns_path(&self) -> String {
        format!("/proc/{}/ns/net", self.server_pid)
    }

    /// The namespace's identity (`net:[INODE]`).
    pub fn netns_id(&self) -> String {
        std::fs::read_link(self.netns_path())
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.netns_path()))
            .display()
            .to_string()
    }

    /// What root saw from the wrapper, before the agent started: every
    /// probe of [`BLOCKED`] and [`REACHABLE`].
    pub fn setup(&self) -> Results {
        let path = self.dir.join("setup.results");
        Results::parse(read_text(&path), "the wrapper's root probe".to_string())
    }

    /// Asserts that the setup works: before the agent started, root reached
    /// every address, metadata included, over every way probed, in a
    /// namespace that is not the machine's.
    pub fn assert_setup_works(&self) {
        let setup = self.setup();
        setup.assert_reached(BLOCKED, "the fake host serves the metadata addresses");
        setup.assert_reached(REACHABLE, "the fake host serves the other addresses");
        assert_ne!(
            self.netns_id(),
            own_netns(),
            "the fake host is not the machine's own network namespace"
        );
    }

    /// Runs `probes` as `who` in this namespace, tokens prefixed `prefix`.
    pub fn probe(&self, who: Who<'_>, prefix: &str, probes: &[Probe]) -> Results {
        let python = system_python().display().to_string();
        let mut args = vec![format!("--net={}", self.netns_path()), "--".to_string()];
        let what = match who {
            Who::Root => "root".to_string(),
            Who::RootIn(cgroup) => {
                args.extend([
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    r#"cg=$1; shift; echo $$ > "$cg/cgroup.procs" && exec "$@""#.to_string(),
                    "sh".to_string(),
                    cgroup.display().to_string(),
                ]);
                format!("root in {}", cgroup.display())
            }
            Who::Uid(uid) => {
                let setpriv = find_program("setpriv").expect("setpriv (util-linux)");
                args.extend([
                    setpriv.display().to_string(),
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_string(),
                    "--".to_string(),
                ]);
                format!("uid {uid}")
            }
        };
        args.extend([
            python,
            self.probe_script.display().to_string(),
            "-".to_string(),
            prefix.to_string(),
        ]);
        args.extend(probe_args(probes));
        let nsenter = find_program("nsenter").expect("nsenter (util-linux)");
        let out = output_within(&nsenter, &args);
        let what = format!("the probe {prefix:?} as {what}");
        assert!(
            out.status.success(),
            "{what} did not run: {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Results::parse(String::from_utf8_lossy(&out.stdout).into_owned(), what)
    }

    /// Everything the server was sent so far: `tcp|udp ADDRESS TOKEN` lines.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The server-log lines of the tokens `prefix-NAME` of `probes`.
    pub fn received(&self, prefix: &str, probes: &[Probe]) -> Vec<String> {
        let tokens: Vec<String> = probes
            .iter()
            .map(|p| format!("{prefix}-{}", p.name))
            .collect();
        self.server_log()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(2)
                    .is_some_and(|t| tokens.iter().any(|x| x == t))
            })
            .map(str::to_string)
            .collect()
    }

    /// The test's own `nft ARGS` in this namespace.
    pub fn nft(&self, args: &[&str]) -> Output {
        let nft = find_program("nft").expect("nft (apt-get install nftables) for the test itself");
        let mut full = vec![format!("--net={}", self.netns_path()), "--".to_string()];
        full.push(nft.display().to_string());
        full.extend(args.iter().map(|a| a.to_string()));
        let nsenter = find_program("nsenter").expect("nsenter (util-linux)");
        output_within(&nsenter, &full)
    }
}

/// Submits a job that runs `probes` and writes what it saw to
/// `<mark>/<id>.results`; its spec has `network` and at most one attempt.
pub fn submit_probe_job(agent: &DevAgent, id: &str, network: &str, probes: &[Probe]) -> Submitted {
    let mark = agent.mark();
    let mut command = vec![
        system_python().display().to_string(),
        mark.join("net_probe.py").display().to_string(),
        mark.join(format!("{id}.results")).display().to_string(),
        id.to_string(),
    ];
    command.extend(probe_args(probes));
    let spec = serde_json::json!({
        "id": id,
        "command": command,
        "network": network,
        "max_attempts": 1,
    });
    let path = mark.join(format!("{id}.json"));
    std::fs::write(&path, spec.to_string()).expect("writing the job spec");
    agent.submit_one(&["--spec", &path.display().to_string()])
}

/// What the probe job `id` wrote.
pub fn job_results(agent: &DevAgent, id: &str) -> Results {
    let path = agent.mark().join(format!("{id}.results"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "job {id} wrote no results ({}: {e})\n{}",
            path.display(),
            agent.diagnostics()
        )
    });
    Results::parse(text, format!("job {id}"))
}

/// Where, by the contract, the agent `agent_pid` attaches its BPF programs
/// and makes its jobs' cgroups in the unified hierarchy: the cgroup2 mount
/// point (from its mountinfo) joined with its own path there (the `0::`
/// line of its /proc/PID/cgroup) and `batchly`. `None` if it sees no
/// cgroup2 mount.
pub fn bpf_jobs_parent(agent_pid: i32) -> Option<PathBuf> {
    cgroup2_of(agent_pid).map(|own| own.join("batchly"))
}

/// The cgroup of `pid` in the unified hierarchy, as a path where `pid`
/// sees the cgroup2 mount; `None` if it sees none.
fn cgroup2_of(pid: i32) -> Option<PathBuf> {
    let mountinfo = read_text(Path::new(&format!("/proc/{pid}/mountinfo")));
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })?;
    let membership = read_text(Path::new(&format!("/proc/{pid}/cgroup")));
    let own = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim()
        .trim_start_matches('/');
    Some(mount.join(own))
}

/// A cgroup the test makes (and removes when dropped).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// A fresh child of `parent`, named after this process and a counter
    /// (never `job-`, so no agent takes it for a job's leftover).
    pub fn create(parent: &Path) -> TestCgroup {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "egress-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating the test's cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its probes have exited; the kernel may take a moment to let go.
        remove_cgroup_tree(&self.path);
    }
}

/// The `batchly_md*` programs attached to `cgroup` as `(attach type,
/// name)`, by `bpftool cgroup show`; `None` if bpftool is not installed
/// (nothing else can count them).
pub fn attached_batchly_programs(cgroup: &Path) -> Option<Vec<(String, String)>> {
    let bpftool = find_program("bpftool")?;
    let out = output_within(
        &bpftool,
        &[
            "-j".to_string(),
            "cgroup".to_string(),
            "show".to_string(),
            cgroup.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let list: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bpftool printed no JSON ({e}): {text}"))
    };
    Some(
        list.as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let name = p["name"].as_str()?;
                name.starts_with("batchly_md").then(|| {
                    (
                        p["attach_type"].as_str().unwrap_or("?").to_string(),
                        name.to_string(),
                    )
                })
            })
            .collect(),
    )
}
