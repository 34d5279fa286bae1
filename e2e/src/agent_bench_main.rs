//! `sluice-agent-bench`: the real `sluice agent` against a real API server (`e2e/controlplane`)
//! holding a synthetic cluster (`synth.rs`, the same one as `sluice-bench`), run as one node in a
//! network namespace of its own. It measures the time from an API request (a pod relabel, a
//! policy create, a policy delete) to the change committed in the kernel, seen by `nft monitor`
//! in the agent's namespace; the time from agent start to `/readyz` 200; and the agent's peak
//! RSS. A small cluster is measured first in the same run as the baseline. Run it through
//! `e2e/bench agent` (docs/performance.md, "The agent against the API server").
//!
//! This is a benchmark, not a test: it reports numbers and exits 0 whether targets are met or
//! not (non-zero only when it could not measure).
//!
//! Cleanup: every control plane (`e2e/controlplane down`), network namespace and child process
//! is removed at the end, on error, and on SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Client, ResourceExt as _};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use sluice::compile::{compile_node, policy_chain_name, SetKind, TABLE};
use sluice::model::{Direction, Family, Index, PolicyKey};
use sluice_e2e::agent_bench::{
    help_default, parse_synced, status_kib, Expect, Percentiles, Synced,
};
use sluice_e2e::api_load::{created, each, kube_client, load_cluster, retry, LoadReport};
use sluice_e2e::netns::{in_netns, spawn_listener_in_netns};
use sluice_e2e::probe;
use sluice_e2e::synth::{SynthCluster, SynthConfig};

/// `sluice-agent-bench cni` (`e2e/bench cni`): CNI ADD latency, flannel's chain alone against
/// flannel + sluice-cni, with this binary's control plane, cluster loading and agent start.
#[path = "agent_bench_cni.rs"]
mod cni;

const TARGET_P99_MS: f64 = 50.0;
const TARGET_RSS_MIB: f64 = 150.0;
/// Where the agent serves /readyz inside its namespace.
const AGENT_LISTEN: &str = "127.0.0.1:9763";
/// The agent's log filter: its debug `synced` line, the libraries at info.
const AGENT_LOG: &str = "debug,kube=info,hyper=info,tower=info,rustls=info";
/// The longest wait for one change to show up in the kernel.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent against the real API server: change-to-applied latency, initial sync, peak RSS.
///
/// Needs root (network namespaces, nft) and the control plane binaries of e2e/controlplane.
/// Progress goes to stderr, the report to stdout (a table, or JSON with --json).
#[derive(Parser)]
#[command(name = "e2e/bench agent")]
struct Args {
    /// Pods of the measured cluster; a comma-separated list measures each size in turn
    /// (e.g. 10000,50000), each on a fresh control plane.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pods: Vec<usize>,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    #[arg(long, default_value_t = 300)]
    namespaces: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Seed of the synthetic clusters.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Trials per kind of change (pod relabel, policy create, policy delete).
    #[arg(long, default_value_t = 200)]
    trials: usize,
    /// Trials per kind for the baseline cluster (default: --trials).
    #[arg(long)]
    baseline_trials: Option<usize>,
    #[arg(long, default_value_t = 100)]
    baseline_pods: usize,
    #[arg(long, default_value_t = 10)]
    baseline_policies: usize,
    #[arg(long, default_value_t = 10)]
    baseline_namespaces: usize,
    #[arg(long, default_value_t = 10)]
    baseline_nodes: usize,
    /// Skip the baseline cluster.
    #[arg(long)]
    no_baseline: bool,
    /// Pause after a change is applied before the next request, in ms (plus 0-50 ms of random
    /// jitter), so that changes never coalesce into one sync.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    /// Passed to the agent as --debounce (default: the agent's own default).
    #[arg(long)]
    debounce: Option<String>,
    /// Passed to the agent as --resync. Long by default so that no periodic whole-table
    /// replace lands among the trials.
    #[arg(long, default_value = "1h")]
    resync: String,
    /// Concurrent API requests while loading the cluster.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The agent binary (default: `sluice` next to this binary, i.e. target/release/sluice).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Keep the agent logs and nft monitor output in this directory (default: a temporary
    /// directory, removed at the end).
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// How the measured node is chosen: `largest` compiles every node and takes the largest
    /// ruleset (slow with many nodes: about 20 minutes for 1,000 nodes at 100k pods);
    /// `most-pods` takes the node with the most local pods, compiling only that one (what
    /// `e2e/bench scale` measures).
    #[arg(long, value_enum, default_value_t = NodeChoice::Largest)]
    node_choice: NodeChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NodeChoice {
    Largest,
    MostPods,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("sluice-agent-bench: {}", msg.as_ref());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

// ---------------------------------------------------------------------------------------------
// Cleanup: what to remove on SIGINT/SIGTERM (the Drop impls remove it otherwise).

struct Registry {
    pids: Vec<i32>,
    netns: Vec<String>,
    control_planes: Vec<PathBuf>,
    /// Directories to remove (the CNI bench's host-local lease directory).
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    netns: Vec::new(),
    control_planes: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `e2e/controlplane`, or the script named by `SLUICE_CONTROLPLANE` (e.g. a copy pinned while
/// the repository's is being edited).
fn controlplane_script() -> PathBuf {
    std::env::var_os("SLUICE_CONTROLPLANE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("e2e/controlplane"))
}

fn controlplane_down(dir: &Path) {
    let out = Command::new(controlplane_script())
        .arg("down")
        .env("SLUICE_CP_DIR", dir)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "sluice-agent-bench: e2e/controlplane down ({}) failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("sluice-agent-bench: e2e/controlplane down: {e}"),
    }
}

fn delete_netns(name: &str) {
    let ok = Command::new("ip")
        .args(["netns", "del", name])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("sluice-agent-bench: ip netns del {name} failed");
    }
}

fn install_signal_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("signal handlers")?;
    std::thread::Builder::new()
        .name("cleanup".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                // Held until exit: nothing new gets registered meanwhile.
                let reg = registry();
                eprintln!("sluice-agent-bench: signal {sig}: cleaning up");
                for pid in &reg.pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                for ns in &reg.netns {
                    delete_netns(ns);
                }
                for dir in &reg.control_planes {
                    controlplane_down(dir);
                }
                for dir in &reg.dirs {
                    let _ = std::fs::remove_dir_all(dir);
                }
                std::process::exit(130);
            }
        })
        .context("spawning the cleanup thread")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The control plane.

struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    port: u16,
}

impl ControlPlane {
    fn up(tag: &str) -> Result<ControlPlane> {
        let dir =
            std::env::temp_dir().join(format!("sluice-agent-bench-{}-{tag}", std::process::id()));
        registry().control_planes.push(dir.clone());
        let mut cp = ControlPlane {
            dir,
            kubeconfig: PathBuf::new(),
            port: 0,
        };
        let script = controlplane_script();
        progress(format!("control plane up ({})", cp.dir.display()));
        let status = Command::new(&script)
            .arg("up")
            .env("SLUICE_CP_DIR", &cp.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("e2e/controlplane up failed ({status})");
        }
        let env = Command::new(&script)
            .arg("env")
            .env("SLUICE_CP_DIR", &cp.dir)
            .output()
            .context("e2e/controlplane env")?;
        let text = String::from_utf8_lossy(&env.stdout);
        let kubeconfig = text
            .lines()
            .find_map(|l| l.strip_prefix("export KUBECONFIG="))
            .map(|v| v.trim_matches(|c| c == '\'' || c == '"'))
            .with_context(|| format!("no KUBECONFIG in e2e/controlplane env: {text}"))?;
        cp.kubeconfig = PathBuf::from(kubeconfig);
        let config = std::fs::read_to_string(&cp.kubeconfig)
            .with_context(|| format!("reading {}", cp.kubeconfig.display()))?;
        cp.port = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .and_then(|s| s.trim().trim_end_matches('/').rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .context("no server port in the kubeconfig")?;
        Ok(cp)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        progress(format!("control plane down ({})", self.dir.display()));
        controlplane_down(&self.dir);
        registry().control_planes.retain(|d| d != &self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The node's network namespace and the API relay into it.

struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!(
            "sluice-abench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if Path::new("/run/netns").join(&name).exists() {
            bail!("network namespace {name} already exists");
        }
        registry().netns.push(name.clone());
        let ns = Netns { name };
        let ok = Command::new("ip")
            .args(["netns", "add", &ns.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("ip netns add {} failed", ns.name);
        }
        let ok = Command::new("ip")
            .args(["-n", &ns.name, "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("ip -n {} link set lo up failed", ns.name);
        }
        Ok(ns)
    }

    /// A command run inside the namespace (spawned from a thread that entered it).
    fn run(&self, mut cmd: Command) -> Result<std::process::Output> {
        in_netns(&self.name, move || cmd.output())?.context("running a command in the netns")
    }

    fn spawn(&self, mut cmd: Command) -> Result<Child> {
        in_netns(&self.name, move || cmd.spawn())?.context("spawning a process in the netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
        registry().netns.retain(|n| n != &self.name);
    }
}

/// TCP on the node's loopback at the API server's port, relayed to the API server on the
/// host's loopback. The listener is created on a thread that entered the namespace; the
/// connections to the API server are made from a thread of the host namespace (a socket keeps
/// the namespace it was created in). So the kubeconfig works unchanged inside the namespace.
struct Relay {
    netns: String,
    port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl Relay {
    fn start(netns: &str, port: u16) -> Result<Relay> {
        let (conn_tx, conn_rx) = std::sync::mpsc::channel::<TcpStream>();
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, stop2) = (netns.to_string(), stop.clone());
        let accept = spawn_listener_in_netns(
            netns,
            "relay-accept",
            move || {
                TcpListener::bind(("127.0.0.1", port))
                    .with_context(|| format!("binding 127.0.0.1:{port} in {ns}"))
            },
            move |listener| {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(c) = conn {
                        if conn_tx.send(c).is_err() {
                            break;
                        }
                    }
                }
            },
        )?;
        std::thread::Builder::new()
            .name("relay-connect".into())
            .spawn(move || {
                for inner in conn_rx {
                    let Ok(outer) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    let _ = inner.set_nodelay(true);
                    let _ = outer.set_nodelay(true);
                    let (Ok(inner2), Ok(outer2)) = (inner.try_clone(), outer.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || pipe(inner, outer));
                    std::thread::spawn(move || pipe(outer2, inner2));
                }
            })
            .context("spawning the relay")?;
        Ok(Relay {
            netns: netns.to_string(),
            port,
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so that it drops its listener.
        let port = self.port;
        let _ = in_netns(&self.netns, move || TcpStream::connect(("127.0.0.1", port)));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Status code and body of a GET inside the namespace (`probe::http_get`, 5 s timeouts).
fn http_get(netns: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    in_netns(netns, || {
        probe::http_get(addr, path, Duration::from_secs(5))
    })?
}

// ---------------------------------------------------------------------------------------------
// Processes: the agent and nft monitor.

fn proc_status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

#[derive(Clone, Debug, Default, Serialize)]
struct Memory {
    /// VmHWM (peak resident set), KiB.
    hwm_kib: Option<u64>,
    /// VmRSS, KiB.
    rss_kib: Option<u64>,
}

fn memory(pid: u32) -> Memory {
    let status = proc_status(pid).unwrap_or_default();
    Memory {
        hwm_kib: status_kib(&status, "VmHWM"),
        rss_kib: status_kib(&status, "VmRSS"),
    }
}

/// The child processes of `pid` (the agent's nft session): (command line, memory).
fn children(pid: u32) -> Vec<(String, Memory)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for child in list
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .split('\0')
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out.push((cmdline, memory(child)));
        }
    }
    out
}

/// A child process killed by its own pid when dropped.
struct Proc {
    child: Child,
    what: &'static str,
}

impl Proc {
    fn new(child: Child, what: &'static str) -> Proc {
        registry().pids.push(child.id() as i32);
        Proc { child, what }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.child.try_wait().ok().flatten().is_none() {
                progress(format!("{} did not exit on SIGTERM: SIGKILL", self.what));
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let id = self.child.id() as i32;
        registry().pids.retain(|p| *p != id);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// New lines of a growing log file.
struct LogTail {
    file: File,
    partial: String,
}

impl LogTail {
    fn open(path: &Path) -> Result<LogTail> {
        Ok(LogTail {
            file: File::open(path).with_context(|| format!("opening {}", path.display()))?,
            partial: String::new(),
        })
    }

    fn read_new(&mut self) -> Vec<String> {
        let mut buf = String::new();
        let _ = self.file.read_to_string(&mut buf);
        self.partial.push_str(&buf);
        let Some(end) = self.partial.rfind('\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let lines = std::mem::replace(&mut self.partial, rest);
        lines.lines().map(str::to_string).collect()
    }
}

/// `nft monitor` in the agent's namespace; each line timestamped when read.
struct Monitor {
    proc: Proc,
    rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>,
}

const PROBE_TABLE: &str = "sluice_bench_probe";

impl Monitor {
    fn start(ns: &Netns, copy_to: Option<PathBuf>, stderr: &Path) -> Result<Monitor> {
        let mut cmd = Command::new("nft");
        cmd.arg("monitor")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?,
            );
        let mut proc = Proc::new(ns.spawn(cmd)?, "nft monitor");
        let out = proc
            .child
            .stdout
            .take()
            .context("nft monitor without stdout")?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("nft-monitor".into())
            .spawn(move || {
                let mut copy = copy_to.and_then(|p| File::create(p).ok());
                let mut reader = BufReader::new(out);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let now = Instant::now();
                    if let Some(f) = copy.as_mut() {
                        let _ = f.write_all(line.as_bytes());
                    }
                    if tx.send((now, line.trim_end().to_string())).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the nft monitor reader")?;
        Ok(Monitor { proc, rx })
    }

    fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// The read time of the first line at or after `t0` that `pred` accepts.
    async fn wait_for(
        &mut self,
        t0: Instant,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Instant> {
        let deadline = tokio::time::Instant::from_std(Instant::now() + timeout);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((t, line))) if t >= t0 && pred(&line) => return Some(t),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits until the monitor reports events: adds and deletes a probe table and waits for
    /// both lines. nft monitor first reads the whole ruleset into its cache (every element of
    /// a big table: seconds at 50k pods), and starts that read over whenever the ruleset
    /// changes meanwhile, so the probes come further and further apart.
    async fn wait_up(&mut self, ns: &Netns) -> Result<()> {
        let started = Instant::now();
        let mut window = Duration::from_millis(500);
        loop {
            let t0 = Instant::now();
            let mut add = Command::new("nft");
            add.args(["add", "table", "inet", PROBE_TABLE]);
            let out = ns.run(add)?;
            if !out.status.success() {
                bail!(
                    "nft add table inet {PROBE_TABLE}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let seen = self
                .wait_for(t0, window, |l| {
                    l.trim() == format!("add table inet {PROBE_TABLE}")
                })
                .await;
            let mut del = Command::new("nft");
            del.args(["delete", "table", "inet", PROBE_TABLE]);
            ns.run(del)?;
            if seen.is_some() {
                self.wait_for(t0, Duration::from_secs(30), |l| {
                    l.trim() == format!("delete table inet {PROBE_TABLE}")
                })
                .await;
                progress(format!(
                    "nft monitor reports events (after {:.1} s)",
                    started.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if self.proc.child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(300)
            {
                bail!("nft monitor does not report events");
            }
            window = (window * 2).min(Duration::from_secs(20));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What to measure on the cluster.

#[derive(Clone, Debug, Serialize)]
struct Target {
    node: String,
    local_pods: usize,
    sets: usize,
    set_elements: usize,
    chains: usize,
    rules: usize,
    /// `namespace/name` of the pod that is relabelled and selected by the created policies.
    pod: String,
    #[serde(skip)]
    namespace: String,
    #[serde(skip)]
    name: String,
    ipv4: String,
    old_app: String,
    new_app: String,
    tier: String,
    version: String,
    /// Time spent choosing the node (with `largest`: compile_node of every node), ms.
    choose_ms: f64,
}

/// The first node, by `choice` (the largest ruleset, elements + rules; or the most local
/// pods), that has a local pod whose `app` relabel moves it to another group chain (its
/// dispatch map entry changes).
fn choose_target(cluster: &SynthCluster, index: &Index, choice: NodeChoice) -> Result<Target> {
    progress(match choice {
        NodeChoice::Largest => "choosing the node (compile_node of every node)",
        NodeChoice::MostPods => "choosing the node (the most local pods)",
    });
    let started = Instant::now();
    let mut scored: Vec<(usize, String)> = cluster
        .nodes
        .iter()
        .map(|n| {
            let score = match choice {
                NodeChoice::Largest => {
                    let size = compile_node(index, &n.name).ruleset.size();
                    size.set_elements + size.rules
                }
                NodeChoice::MostPods => index.local_pods(&n.name).count(),
            };
            (score, n.name.clone())
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let choose_ms = ms(started.elapsed());
    for (_, node) in &scored {
        let base = compile_node(index, node).ruleset;
        let size = base.size();
        let candidates: Vec<_> = index
            .local_pods(node)
            .filter(|p| !index.isolating_policies(p, Direction::Ingress).is_empty())
            .filter(|p| p.ip(Family::V4).is_some())
            .take(50)
            .collect();
        for pod in candidates {
            let (Some(old_app), Some(tier), Some(version)) = (
                pod.labels.get("app"),
                pod.labels.get("tier"),
                pod.labels.get("version"),
            ) else {
                continue;
            };
            let mut apps: Vec<&String> = index
                .pods
                .values()
                .filter(|p| p.key.namespace == pod.key.namespace)
                .filter_map(|p| p.labels.get("app"))
                .filter(|a| *a != old_app)
                .collect();
            apps.sort();
            apps.dedup();
            for new_app in apps {
                let mut changed = pod.clone();
                changed.labels.insert("app".into(), new_app.clone());
                let mut after = index.clone();
                after.apply_pod(changed);
                let rs = compile_node(&after, node).ruleset;
                let moves = rs.sets.iter().any(|(name, set)| {
                    matches!(set.kind, SetKind::Dispatch(_))
                        && base.sets.get(name).map(|s| &s.elements) != Some(&set.elements)
                });
                if moves {
                    return Ok(Target {
                        node: node.clone(),
                        local_pods: index.local_pods(node).count(),
                        sets: size.sets,
                        set_elements: size.set_elements,
                        chains: size.chains,
                        rules: size.rules,
                        pod: pod.key.to_string(),
                        namespace: pod.key.namespace.clone(),
                        name: pod.key.name.clone(),
                        ipv4: pod
                            .ip(Family::V4)
                            .map(|ip| ip.to_string())
                            .unwrap_or_default(),
                        old_app: old_app.clone(),
                        new_app: new_app.clone(),
                        tier: tier.clone(),
                        version: version.clone(),
                        choose_ms,
                    });
                }
            }
        }
    }
    bail!("no node has a local pod whose relabel moves it to another group chain")
}

// ---------------------------------------------------------------------------------------------
// The bench's own watches: when the API server delivers each change to a watcher (a proxy for
// the agent's watch delivery; the agent's connection also goes through the relay).

type Seen = Arc<Mutex<Vec<(Instant, String)>>>;

fn seen_push(seen: &Seen, key: String) {
    let now = Instant::now();
    seen.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((now, key));
}

async fn watch_pod(api: Api<Pod>, name: String, seen: Seen) {
    loop {
        let Ok(pod) = api.get(&name).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let rv = pod.resource_version().unwrap_or_default();
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(290);
        let Ok(stream) = api.watch(&wp, &rv).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Ok(WatchEvent::Modified(p)) = ev {
                let app = p.labels().get("app").cloned().unwrap_or_default();
                seen_push(&seen, format!("pod app={app}"));
            }
        }
    }
}

async fn watch_policies(api: Api<NetworkPolicy>, seen: Seen) {
    loop {
        let Ok(list) = api.list(&ListParams::default().limit(1)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let rv = list.metadata.resource_version.unwrap_or_default();
        let Ok(stream) = api.watch(&WatchParams::default().timeout(290), &rv).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(WatchEvent::Added(p)) => seen_push(&seen, format!("add {}", p.name_any())),
                Ok(WatchEvent::Deleted(p)) => seen_push(&seen, format!("delete {}", p.name_any())),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trials.

#[derive(Clone, Debug, Serialize)]
struct Trial {
    kind: &'static str,
    /// Request sent -> change seen committed by `nft monitor`; `None`: not seen in time.
    total_ms: Option<f64>,
    /// Request sent -> API response.
    api_ms: f64,
    /// Request sent -> the bench's own watch got the event.
    watch_ms: Option<f64>,
    /// The agent's `synced` lines after this change.
    syncs: Vec<Synced>,
}

struct Trials<'a> {
    monitor: &'a mut Monitor,
    log: LogTail,
    seen: Seen,
    gap: Duration,
    rng: ChaCha8Rng,
    out: Vec<Trial>,
    /// `synced` lines that came with no trial (e.g. a failed sync's retry).
    stray_syncs: usize,
    sync_errors: usize,
}

impl Trials<'_> {
    fn agent_lines(&mut self) -> Vec<Synced> {
        let mut syncs = Vec::new();
        for line in self.log.read_new() {
            if let Some(s) = parse_synced(&line) {
                syncs.push(s);
            } else if line.contains("sync failed") {
                self.sync_errors += 1;
            }
        }
        syncs
    }

    /// Sends `request`, waits for `expect` in the kernel, then for the gap.
    async fn run(
        &mut self,
        kind: &'static str,
        expect: Expect,
        watch_key: String,
        request: impl std::future::Future<Output = std::result::Result<(), kube::Error>>,
    ) -> Result<()> {
        self.monitor.drain();
        self.stray_syncs += self.agent_lines().len();
        let t0 = Instant::now();
        request.await.with_context(|| format!("{kind} request"))?;
        let api_ms = ms(t0.elapsed());
        let seen = self
            .monitor
            .wait_for(t0, TRIAL_TIMEOUT, |l| expect.matches(TABLE, l))
            .await;
        if seen.is_none() {
            progress(format!(
                "  {kind}: not seen in the kernel within {TRIAL_TIMEOUT:?}"
            ));
        }
        let jitter = Duration::from_millis(self.rng.random_range(0..=50));
        tokio::time::sleep(self.gap + jitter).await;
        let syncs = self.agent_lines();
        let watch_ms = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(t, k)| *t >= t0 && *k == watch_key)
            .map(|(t, _)| ms(t.duration_since(t0)));
        self.out.push(Trial {
            kind,
            total_ms: seen.map(|t| ms(t.duration_since(t0))),
            api_ms,
            watch_ms,
            syncs,
        });
        Ok(())
    }
}

fn bench_policy(target: &Target, name: &str) -> Result<NetworkPolicy> {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": target.namespace, "name": name},
        "spec": {
            // tier and version: labels the relabel trials leave alone.
            "podSelector": {"matchLabels": {"tier": target.tier, "version": target.version}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": target.old_app}}}],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }],
        },
    }))
    .context("the bench policy")
}

async fn run_trials(
    client: &Client,
    target: &Target,
    trials: &mut Trials<'_>,
    rounds: usize,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &target.namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &target.namespace);
    let pp = PostParams::default();
    let started = Instant::now();
    for round in 0..rounds {
        // 1. Relabel the pod to the other app (and back in the next round).
        let app = if round % 2 == 0 {
            &target.new_app
        } else {
            &target.old_app
        };
        let patch = Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
        let ppatch = PatchParams::default();
        trials
            .run(
                "pod relabel",
                Expect::DispatchElement {
                    ip: target.ipv4.clone(),
                },
                format!("pod app={app}"),
                async { pods.patch(&target.name, &ppatch, &patch).await.map(|_| ()) },
            )
            .await?;
        // 2. A policy selecting the pod, then 3. its deletion.
        let name = format!("sluice-bench-{round}");
        let chain = policy_chain_name(
            Direction::Ingress,
            &PolicyKey::new(target.namespace.clone(), name.clone()),
        );
        let policy = bench_policy(target, &name)?;
        trials
            .run(
                "policy create",
                Expect::ChainAdded(chain.clone()),
                format!("add {name}"),
                async { policies.create(&pp, &policy).await.map(|_| ()) },
            )
            .await?;
        trials
            .run(
                "policy delete",
                Expect::ChainDeleted(chain),
                format!("delete {name}"),
                async {
                    policies
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ())
                },
            )
            .await?;
        if (round + 1) % 25 == 0 || round + 1 == rounds {
            let missed = trials.out.iter().filter(|t| t.total_ms.is_none()).count();
            progress(format!(
                "  trials: round {}/{rounds} ({:.0} s, {missed} not seen)",
                round + 1,
                started.elapsed().as_secs_f64()
            ));
        }
        let missed = trials.out.iter().filter(|t| t.total_ms.is_none()).count();
        if missed > 10 {
            bail!("{missed} changes were not seen in the kernel; stopping");
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize)]
struct KindReport {
    trials: usize,
    not_seen: usize,
    /// Request -> committed in the kernel.
    total: Option<Percentiles>,
    /// Request -> API response.
    api: Option<Percentiles>,
    /// Request -> the bench's watch got the event.
    watch: Option<Percentiles>,
    /// total - watch: the agent's share (its own watch delivery differs a little: it goes
    /// through the relay).
    after_watch: Option<Percentiles>,
    /// The agent's own split (its debug `synced` line), for trials with exactly one sync.
    compile: Option<Percentiles>,
    apply: Option<Percentiles>,
    /// total - watch - compile - apply: the agent's debounce and waiting, scheduling, and
    /// nft monitor's delivery, minus the part of apply after the commit (reading nft's answer,
    /// keeping a clone of the ruleset), so it can be negative.
    rest: Option<Percentiles>,
    /// Trials whose change took more than one sync.
    multi_sync: usize,
    /// Median commands per transaction.
    commands_p50: Option<f64>,
}

fn kind_report(trials: &[Trial], kind: &str) -> KindReport {
    let of: Vec<&Trial> = trials.iter().filter(|t| t.kind == kind).collect();
    let collect = |f: &dyn Fn(&Trial) -> Option<f64>| -> Option<Percentiles> {
        Percentiles::of(&of.iter().filter_map(|t| f(t)).collect::<Vec<_>>())
    };
    let one = |t: &Trial| (t.syncs.len() == 1).then(|| t.syncs[0].clone());
    KindReport {
        trials: of.len(),
        not_seen: of.iter().filter(|t| t.total_ms.is_none()).count(),
        total: collect(&|t| t.total_ms),
        api: collect(&|t| Some(t.api_ms)),
        watch: collect(&|t| t.watch_ms),
        after_watch: collect(&|t| Some(t.total_ms? - t.watch_ms?)),
        compile: collect(&|t| one(t).map(|s| s.compile_ms)),
        apply: collect(&|t| one(t).map(|s| s.apply_ms)),
        rest: collect(&|t| {
            let s = one(t)?;
            Some(t.total_ms? - t.watch_ms? - s.compile_ms - s.apply_ms)
        }),
        multi_sync: of.iter().filter(|t| t.syncs.len() > 1).count(),
        commands_p50: collect(&|t| one(t).map(|s| s.commands as f64)).map(|p| p.p50),
    }
}

// ---------------------------------------------------------------------------------------------
// One cluster, end to end.

#[derive(Clone, Debug, Serialize)]
struct NftChild {
    cmdline: String,
    memory: Memory,
}

#[derive(Clone, Debug, Serialize)]
struct ClusterReport {
    label: String,
    pods: usize,
    policies: usize,
    namespaces: usize,
    nodes: usize,
    seed: u64,
    target: Target,
    load: LoadReport,
    /// Agent start -> /readyz 200 (lists in, first sync applied), seconds.
    ready_s: f64,
    /// The agent's first sync (the whole table).
    first_sync: Option<Synced>,
    memory_at_ready: Memory,
    memory_at_end: Memory,
    /// The agent's children at the end (its `nft -i` session).
    nft_children: Vec<NftChild>,
    kinds: BTreeMap<&'static str, KindReport>,
    stray_syncs: usize,
    sync_errors: usize,
    loadavg_start: String,
    loadavg_end: String,
    trials_s: f64,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// How to start the agent under test.
struct AgentStart<'a> {
    bin: &'a Path,
    kubeconfig: &'a Path,
    node: &'a str,
    ns: &'a Netns,
    log_path: &'a Path,
    cni_socket: &'a Path,
    resync: &'a str,
    debounce: Option<&'a str>,
}

/// Spawns the agent from a thread inside the node's namespace and waits for `/readyz` 200.
/// Returns the agent and the seconds from spawn to ready.
fn start_agent(a: &AgentStart<'_>) -> Result<(Proc, f64)> {
    let log_path = a.log_path;
    let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(a.bin);
    cmd.arg("agent")
        .arg("--kubeconfig")
        .arg(a.kubeconfig)
        .args(["--listen", AGENT_LISTEN, "--resync", a.resync])
        .env("NODE_NAME", a.node)
        .env("RUST_LOG", AGENT_LOG)
        .env("NO_COLOR", "1")
        .env("SLUICE_CNI_SOCKET", a.cni_socket)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(d) = a.debounce {
        cmd.args(["--debounce", d]);
    }
    progress(format!(
        "starting the agent as {} in netns {} (log: {})",
        a.node,
        a.ns.name,
        log_path.display()
    ));
    let started = Instant::now();
    let mut agent = Proc::new(a.ns.spawn(cmd)?, "the agent");
    let ready_s = loop {
        if let Some(status) = agent.child.try_wait()? {
            bail!(
                "the agent exited ({status}) before it was ready; log: {}",
                log_path.display()
            );
        }
        if matches!(http_get(&a.ns.name, AGENT_LISTEN, "/readyz"), Ok((200, _))) {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the agent was not ready after 30 min");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok((agent, ready_s))
}

struct Run<'a> {
    args: &'a Args,
    agent_bin: &'a Path,
    log_dir: &'a Path,
    rt: &'a tokio::runtime::Runtime,
}

impl Run<'_> {
    fn cluster(&self, label: &str, config: SynthConfig, rounds: usize) -> Result<ClusterReport> {
        progress(format!(
            "== {label}: {} pods, {} policies, {} namespaces, {} nodes (seed {})",
            config.pods, config.policies, config.namespaces, config.nodes, config.seed
        ));
        let loadavg_start = loadavg();
        let cluster = SynthCluster::generate(&config)?;
        let index = cluster.index()?;
        let target = choose_target(&cluster, &index, self.args.node_choice)?;
        drop(index);
        progress(format!(
            "node {} ({} local pods, {} set elements, {} rules); pod {} ({}) app={} <-> app={}",
            target.node,
            target.local_pods,
            target.set_elements,
            target.rules,
            target.pod,
            target.ipv4,
            target.old_app,
            target.new_app
        ));

        let cp = ControlPlane::up(label)?;
        let client = self.rt.block_on(kube_client(&cp.kubeconfig))?;
        let load = self
            .rt
            .block_on(load_cluster(&client, &cluster, self.args.concurrency))?;
        drop(cluster);

        let ns = Netns::create()?;
        let relay = Relay::start(&ns.name, cp.port)?;
        let log_path = self.log_dir.join(format!("agent-{label}.log"));
        let (mut agent, ready_s) = start_agent(&AgentStart {
            bin: self.agent_bin,
            kubeconfig: &cp.kubeconfig,
            node: &target.node,
            ns: &ns,
            log_path: &log_path,
            // The CNI start gate's unix socket (agents that have one): a path of this run, not
            // the shared default under /run/sluice.
            cni_socket: &self.log_dir.join(format!("cni-{label}.sock")),
            resync: &self.args.resync,
            debounce: self.args.debounce.as_deref(),
        })?;
        let memory_at_ready = memory(agent.pid());
        progress(format!(
            "ready after {ready_s:.2} s; agent VmHWM {:.1} MiB",
            memory_at_ready.hwm_kib.unwrap_or(0) as f64 / 1024.0
        ));
        let mut tail = LogTail::open(&log_path)?;
        let first_sync = tail.read_new().iter().find_map(|l| parse_synced(l));

        let monitor_copy = self
            .args
            .keep_logs
            .as_ref()
            .map(|d| d.join(format!("nft-monitor-{label}.txt")));
        let monitor_err = self.log_dir.join(format!("nft-monitor-{label}.err"));
        let mut monitor = Monitor::start(&ns, monitor_copy, &monitor_err)?;
        self.rt.block_on(monitor.wait_up(&ns))?;

        let seen: Seen = Arc::default();
        let _guard = self.rt.enter();
        let watches = [
            tokio::spawn(watch_pod(
                Api::namespaced(client.clone(), &target.namespace),
                target.name.clone(),
                seen.clone(),
            )),
            tokio::spawn(watch_policies(
                Api::namespaced(client.clone(), &target.namespace),
                seen.clone(),
            )),
        ];
        // Let the watches start (and the agent settle) before the first trial.
        std::thread::sleep(Duration::from_secs(1));

        progress(format!(
            "trials: {rounds} rounds of pod relabel, policy create, policy delete"
        ));
        let trials_started = Instant::now();
        let mut trials = Trials {
            monitor: &mut monitor,
            log: tail,
            seen,
            gap: Duration::from_millis(self.args.gap_ms),
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0xa9e7),
            out: Vec::new(),
            stray_syncs: 0,
            sync_errors: 0,
        };
        self.rt
            .block_on(run_trials(&client, &target, &mut trials, rounds))?;
        let trials_s = trials_started.elapsed().as_secs_f64();
        for w in &watches {
            w.abort();
        }
        let memory_at_end = memory(agent.pid());
        let nft_children = children(agent.pid())
            .into_iter()
            .map(|(cmdline, memory)| NftChild { cmdline, memory })
            .collect();
        let mut kinds = BTreeMap::new();
        for kind in ["pod relabel", "policy create", "policy delete"] {
            kinds.insert(kind, kind_report(&trials.out, kind));
        }
        let (stray_syncs, sync_errors) = (trials.stray_syncs, trials.sync_errors);
        drop(trials);
        agent.stop(Duration::from_secs(10));
        drop(monitor);
        drop(relay);
        drop(ns);
        drop(cp);
        Ok(ClusterReport {
            label: label.to_string(),
            pods: config.pods,
            policies: config.policies,
            namespaces: config.namespaces,
            nodes: config.nodes,
            seed: config.seed,
            target,
            load,
            ready_s,
            first_sync,
            memory_at_ready,
            memory_at_end,
            nft_children,
            kinds,
            stray_syncs,
            sync_errors,
            loadavg_start,
            loadavg_end: loadavg(),
            trials_s,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    mem_total_kib: Option<u64>,
    kernel: String,
    nft: String,
    agent: String,
    agent_debounce: String,
    agent_resync: String,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    clusters: Vec<ClusterReport>,
    total_s: f64,
}

fn machine(agent_bin: &Path, debounce: Option<&str>, resync: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let out = |cmd: &mut Command| {
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let help = out(Command::new(agent_bin).args(["agent", "--help"]));
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        mem_total_kib: status_kib(&meminfo, "MemTotal"),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        nft: out(Command::new("nft").arg("--version")),
        agent: agent_bin.display().to_string(),
        agent_debounce: debounce.map(str::to_string).unwrap_or_else(|| {
            format!(
                "{} (the agent's default)",
                help_default(&help, "--debounce").unwrap_or_else(|| "?".into())
            )
        }),
        agent_resync: resync.to_string(),
    }
}

fn fmt_p(p: &Option<Percentiles>) -> String {
    match p {
        Some(p) => format!(
            "{:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            p.p50, p.p90, p.p99, p.max
        ),
        None => format!("{:>8} {:>8} {:>8} {:>8}", "-", "-", "-", "-"),
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn print_report(r: &Report) {
    let m = &r.machine;
    println!("sluice agent against the API server");
    println!(
        "machine: {} x {}, {} RAM, kernel {}, {}",
        m.nproc,
        m.cpu,
        mib(m.mem_total_kib),
        m.kernel,
        m.nft
    );
    println!(
        "agent: {} (--debounce {}, --resync {})",
        m.agent, m.agent_debounce, m.agent_resync
    );
    for c in &r.clusters {
        let t = &c.target;
        println!();
        println!(
            "== {}: {} pods, {} policies, {} namespaces, {} nodes (load average {} -> {})",
            c.label, c.pods, c.policies, c.namespaces, c.nodes, c.loadavg_start, c.loadavg_end
        );
        println!(
            "node {}: {} local pods, {} sets with {} elements, {} chains, {} rules",
            t.node, t.local_pods, t.sets, t.set_elements, t.chains, t.rules
        );
        println!(
            "relabelled pod {} ({}): app={} <-> app={}; policies select tier={},version={}",
            t.pod, t.ipv4, t.old_app, t.new_app, t.tier, t.version
        );
        println!(
            "load through the API: {:.1} s ({} requests; pods {:.1} s = {:.0} pods/s)",
            c.load.total_s, c.load.requests, c.load.pods_s, c.load.pods_per_s
        );
        let fs = c
            .first_sync
            .as_ref()
            .map(|s| {
                format!(
                    "{} sync: compile {:.1} ms, apply {:.1} ms, {} commands",
                    s.kind, s.compile_ms, s.apply_ms, s.commands
                )
            })
            .unwrap_or_else(|| "no first sync logged".into());
        println!("agent start -> ready: {:.2} s (first {fs})", c.ready_s);
        println!(
            "agent memory: VmHWM {} at ready, {} at the end (VmRSS {})",
            mib(c.memory_at_ready.hwm_kib),
            mib(c.memory_at_end.hwm_kib),
            mib(c.memory_at_end.rss_kib)
        );
        for ch in &c.nft_children {
            println!(
                "  child `{}`: VmHWM {}, VmRSS {}",
                ch.cmdline,
                mib(ch.memory.hwm_kib),
                mib(ch.memory.rss_kib)
            );
        }
        println!(
            "{:<28} {:>8} {:>8} {:>8} {:>8}   (ms; {:.0} s of trials, {} stray syncs, {} sync errors)",
            "", "p50", "p90", "p99", "max", c.trials_s, c.stray_syncs, c.sync_errors
        );
        for (kind, k) in &c.kinds {
            println!(
                "{:<28} {}   n={} not seen={} multi-sync={} commands p50={}",
                format!("{kind}: request->kernel"),
                fmt_p(&k.total),
                k.trials,
                k.not_seen,
                k.multi_sync,
                k.commands_p50.map_or("-".into(), |c| format!("{c:.0}"))
            );
            println!("{:<28} {}", "  request->API response", fmt_p(&k.api));
            println!("{:<28} {}", "  request->watch event", fmt_p(&k.watch));
            println!("{:<28} {}", "  watch event->kernel", fmt_p(&k.after_watch));
            println!("{:<28} {}", "  agent compile", fmt_p(&k.compile));
            println!("{:<28} {}", "  agent apply", fmt_p(&k.apply));
            println!("{:<28} {}", "  rest (total-watch-c-a)", fmt_p(&k.rest));
        }
    }
    let base = r.clusters.iter().find(|c| c.label == "baseline");
    let measured: Vec<&ClusterReport> = r
        .clusters
        .iter()
        .filter(|c| c.label != "baseline")
        .collect();
    println!();
    println!("== verdicts and ratios");
    for c in &measured {
        for (kind, k) in &c.kinds {
            let p99 = k.total.map(|p| p.p99);
            let verdict = match p99 {
                Some(p) if p < TARGET_P99_MS && k.not_seen == 0 => "met",
                _ => "MISSED",
            };
            let vs = base
                .and_then(|b| b.kinds.get(kind))
                .map(|b| {
                    format!(
                        "; vs baseline: p50 {}, p99 {}",
                        ratio(k.total.map(|p| p.p50), b.total.map(|p| p.p50)),
                        ratio(p99, b.total.map(|p| p.p99))
                    )
                })
                .unwrap_or_default();
            println!(
                "{}: {kind} p99 {} ms (target < {TARGET_P99_MS} ms: {verdict}){vs}",
                c.label,
                p99.map_or("-".into(), |p| format!("{p:.1}"))
            );
        }
        let hwm = c.memory_at_end.hwm_kib.map(|k| k as f64 / 1024.0);
        let verdict = match hwm {
            Some(h) if h < TARGET_RSS_MIB => "met",
            _ => "MISSED",
        };
        let vs = base
            .map(|b| {
                format!(
                    "; vs baseline {}",
                    ratio(hwm, b.memory_at_end.hwm_kib.map(|k| k as f64 / 1024.0))
                )
            })
            .unwrap_or_default();
        println!(
            "{}: agent peak RSS {} (target < {TARGET_RSS_MIB} MiB at 10k pods: {verdict}){vs}",
            c.label,
            mib(c.memory_at_end.hwm_kib)
        );
    }
    if let Some(first) = measured.first() {
        for c in measured.iter().skip(1) {
            println!(
                "{} / {}: pods {:.1}x; peak RSS {}; ready {}",
                c.label,
                first.label,
                c.pods as f64 / first.pods as f64,
                ratio(
                    c.memory_at_end.hwm_kib.map(|k| k as f64),
                    first.memory_at_end.hwm_kib.map(|k| k as f64)
                ),
                ratio(Some(c.ready_s), Some(first.ready_s))
            );
        }
    }
    println!("total: {:.0} s", r.total_s);
}

fn run(args: &Args) -> Result<Report> {
    let started = Instant::now();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("needs root (network namespaces, nft)");
    }
    let agent_bin = match &args.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the directory of this binary")?
            .join("sluice"),
    };
    if !agent_bin.is_file() {
        bail!(
            "no agent binary at {} (cargo build --release -p sluice, or --agent)",
            agent_bin.display()
        );
    }
    install_signal_cleanup()?;
    let temp_logs;
    let log_dir = match &args.keep_logs {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp_logs = std::env::temp_dir()
                .join(format!("sluice-agent-bench-{}-logs", std::process::id()));
            std::fs::create_dir_all(&temp_logs)?;
            temp_logs.clone()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let run = Run {
        args,
        agent_bin: &agent_bin,
        log_dir: &log_dir,
        rt: &rt,
    };
    let mut clusters = Vec::new();
    let result = (|| -> Result<()> {
        if !args.no_baseline {
            let config = SynthConfig {
                pods: args.baseline_pods,
                policies: args.baseline_policies,
                nodes: args.baseline_nodes,
                namespaces: args.baseline_namespaces,
                seed: args.seed,
            };
            let rounds = args.baseline_trials.unwrap_or(args.trials);
            clusters.push(run.cluster("baseline", config, rounds)?);
        }
        for &pods in &args.pods {
            let config = SynthConfig {
                pods,
                policies: args.policies,
                nodes: args.nodes,
                namespaces: args.namespaces,
                seed: args.seed,
            };
            let label = format!("{}k", pods as f64 / 1000.0);
            clusters.push(run.cluster(&label, config, args.trials)?);
        }
        Ok(())
    })();
    if args.keep_logs.is_none() {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    result?;
    Ok(Report {
        machine: machine(&agent_bin, args.debounce.as_deref(), &args.resync),
        clusters,
        total_s: started.elapsed().as_secs_f64(),
    })
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("cni") {
        return cni::main();
    }
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("sluice-agent-bench: error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice-agent-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
