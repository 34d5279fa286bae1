//! Guarantees on the local cluster (`e2e/cluster up`, given by `SLUICE_CLUSTER_DIR`), checked
//! with real traffic while the cluster changes:
//!
//! - `pod_start_deny`: pods of a default-deny namespace never complete a TCP handshake (or echo
//!   a UDP datagram) to a prober of another namespace, from their first instant. Probers on the
//!   same node and on another node sweep the addresses host-local hands out next while the pods
//!   start; afterwards every new pod's address must have been probed after it was Running, and
//!   those probes dropped (timeout), not refused.
//! - `pod_start_allow`: pods whose policy allows the prober are never dropped: from the moment
//!   the pod's address can be reached (its namespace has the address and routes, and the node
//!   itself got an answer from it) until it is Running a probe is either refused (RST: nothing
//!   listens yet) or connects; after Running every probe connects.
//! - `restart_under_traffic`: long-lived allowed TCP connections (within one node and across
//!   nodes) keep echoing and forbidden connections keep being attempted while one node's agent
//!   is stopped (SIGTERM, then SIGKILL) and its flanneld is stopped, each brought back with
//!   `e2e/cluster up`; no forbidden attempt connects, no established connection breaks, and
//!   after each restart a policy change still takes effect.
//! - `uninstall_leaves_flannel_alone`: deleting the chart's DaemonSet (what `helm uninstall`
//!   does), then stopping each node's agent and install-cni (what the kubelet does to its pods
//!   then) removes sluice's tables, its conflist and sluice-cni from every node, leaves
//!   flannel's conflist byte for byte, and a new pod starts and is reachable with flannel alone.
//!   `e2e/cluster up` then puts sluice back.
//!
//! Without `SLUICE_CLUSTER_DIR` each test says it skips and passes; with it and
//! `SLUICE_STRICT=1`, a cluster that is not usable fails the test. The tests run one at a time
//! (a mutex): they share the nodes' address ranges and the restart disturbs everything.
//! Each test makes its own namespaces (unique names) and deletes them at the end, also when it
//! fails.
//!
//! To see a test fail on purpose: `SLUICE_GUARANTEES_BREAK=agent-cleanup` makes the restart
//! test run `sluice agent --cleanup` (the table removed) while the agent is down;
//! `SLUICE_GUARANTEES_BREAK=allow-other-port` makes the allow test's policy allow another
//! port than the one probed. The deny test fails on a cluster whose start gate is off (agent
//! with `--cni-socket ''` and sluice-cni in failMode open).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use ipnet::Ipv4Net;
use nix::errno::Errno;
use serde_json::{json, Value};
use socket2::{Domain, Protocol as SockProto, SockAddr, Socket, Type};

use sluice_e2e::cluster_run::{load_cluster, pod_manifest, Kubectl};
use sluice_e2e::kubelet::pod_netns_name;
use sluice_e2e::netns::{enter_netns, spawn_listener_in_netns};
use sluice_e2e::probe::{run_probes, Outcome, ProbeReq, Proto};
use sluice_e2e::scenario::Protocol;

/// The port the kubelet stand-in serves in the pod-start tests (TCP greeting, UDP echo).
const PORT: u16 = 8080;
/// The echo port of the restart test (served by this test inside the server pods).
const ECHO_PORT: u16 = 7000;
/// How many pods each pod-start test creates at once.
const NEW_PODS: usize = 10;
/// How long pods may take to be Running, namespaces to go, a policy to take effect.
const POD_TIMEOUT: Duration = Duration::from_secs(120);
const CONVERGE: Duration = Duration::from_secs(30);
/// Per-attempt timeout of the sweeping probers: one SYN (the first retransmission is at 1 s).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);
/// Longest an established connection may go without an echo during a restart.
const STALL_MAX: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn breaking(what: &str) -> bool {
    std::env::var("SLUICE_GUARANTEES_BREAK").is_ok_and(|v| v == what)
}

fn say(msg: impl std::fmt::Display) {
    eprintln!("cluster_guarantees: {msg}");
}

// ---------------------------------------------------------------------------------------------
// The cluster

struct Node {
    name: String,
    netns: String,
    pod_prefix: String,
    pod_cidr: Ipv4Net,
    /// `nodes/node-N` of the state dir (part pid files).
    dir: PathBuf,
    kubelet_state: PathBuf,
    agent: String,
}

struct Ctx {
    dir: PathBuf,
    k: Kubectl,
    nodes: Vec<Node>,
}

/// The cluster of `SLUICE_CLUSTER_DIR`, or None (skip) when it is unset. A cluster that is not
/// usable skips too, unless `SLUICE_STRICT=1`: then the test fails.
fn cluster_or_skip(test: &str) -> Option<Ctx> {
    let dir = match std::env::var("SLUICE_CLUSTER_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            say(format!(
                "skipping {test}: SLUICE_CLUSTER_DIR is not set (a running `e2e/cluster up`, e.g. /tmp/sluice-cluster)"
            ));
            return None;
        }
    };
    match load(&dir) {
        Ok(c) => Some(c),
        Err(e) if std::env::var("SLUICE_STRICT").is_ok_and(|v| v == "1") => {
            panic!(
                "{test}: the cluster at {} is not usable: {e:#}",
                dir.display()
            )
        }
        Err(e) => {
            say(format!(
                "skipping {test}: the cluster at {} is not usable ({e:#}); SLUICE_STRICT=1 makes this a failure",
                dir.display()
            ));
            None
        }
    }
}

fn load(dir: &Path) -> Result<Ctx> {
    let cluster = load_cluster(dir).map_err(|e| anyhow!(e))?;
    let text = std::fs::read_to_string(dir.join("cluster.json"))?;
    let raw: Value = serde_json::from_str(&text).context("cluster.json")?;
    let mut nodes = Vec::new();
    for n in raw["nodes"].as_array().context("cluster.json: nodes")? {
        let s = |k: &str| -> Result<String> {
            n[k].as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .with_context(|| format!("cluster.json: nodes[].{k}"))
        };
        nodes.push(Node {
            name: s("name")?,
            netns: s("netns")?,
            pod_prefix: s("podNetnsPrefix")?,
            pod_cidr: s("podCIDR")?.parse().context("podCIDR")?,
            dir: s("dir")?.into(),
            kubelet_state: s("kubeletStateDir")?.into(),
            agent: s("agentAddress")?,
        });
    }
    if nodes.len() < 2 {
        bail!("these tests need at least 2 nodes (have {})", nodes.len());
    }
    let k = Kubectl::new(&cluster);
    let listed = k.get_json(&["nodes"]).context("the API server")?;
    let names: BTreeSet<&str> = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    for n in &nodes {
        if !names.contains(n.name.as_str()) {
            bail!("Node {} is not in the API", n.name);
        }
        agent_ready(n).with_context(|| format!("{}: the agent", n.name))?;
        let kubelet = part_pid(n, "kubelet")?;
        if !alive(kubelet) {
            bail!("{}: sluice-kubelet (pid {kubelet}) is not running", n.name);
        }
    }
    Ok(Ctx {
        dir: dir.to_path_buf(),
        k,
        nodes,
    })
}

/// The agent's `/readyz` answers 200 (asked from the node's namespace).
fn agent_ready(n: &Node) -> Result<()> {
    let addr: SocketAddr = n.agent.parse().context("agentAddress")?;
    let netns = n.netns.clone();
    let reply = std::thread::scope(|s| {
        s.spawn(move || -> Result<String> {
            enter_netns(&netns)?;
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            c.write_all(b"GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow!("readyz thread panicked"))?
    })?;
    let status = reply.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        bail!("/readyz: {status}");
    }
    Ok(())
}

fn part_pid(n: &Node, part: &str) -> Result<i32> {
    let f = n.dir.join(format!("{part}.pid"));
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a pid", f.display()))
}

/// Running and not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces, pods, policies through kubectl

fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let x = nanos ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(1, Ordering::Relaxed);
    format!("g{tag}-{:08x}", x as u32)
}

/// The test's namespaces: made with a `default` ServiceAccount (no controller-manager runs);
/// on drop (also when the test panics) deleted with their pods and policies.
struct Namespaces<'a> {
    k: &'a Kubectl,
    names: Vec<String>,
}

impl<'a> Namespaces<'a> {
    fn new(k: &'a Kubectl) -> Self {
        Namespaces {
            k,
            names: Vec::new(),
        }
    }

    fn create(&mut self, tag: &str) -> Result<String> {
        let name = unique(tag);
        self.names.push(name.clone());
        self.k
            .apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))?;
        self.k
            .apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount",
                             "metadata": {"namespace": name, "name": "default"}}))?;
        Ok(name)
    }
}

impl Drop for Namespaces<'_> {
    fn drop(&mut self) {
        for ns in self.names.drain(..).rev() {
            if let Err(e) = delete_namespace(self.k, &ns) {
                say(format!("cleanup: namespace {ns}: {e:#}"));
            }
        }
    }
}

/// As the namespace controller would (none runs): Terminating first, the pods (waiting for the
/// kubelet), the rest, then the `kubernetes` finalizer.
fn delete_namespace(k: &Kubectl, ns: &str) -> Result<()> {
    let gone = |k: &Kubectl| -> Result<Option<Value>> {
        let v = k.run(
            &["get", "namespace", ns, "--ignore-not-found", "-o", "json"],
            None,
        )?;
        if v.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&v)?))
    };
    if gone(k)?.is_none() {
        return Ok(());
    }
    k.run(
        &[
            "delete",
            "namespace",
            ns,
            "--wait=false",
            "--ignore-not-found",
        ],
        None,
    )?;
    k.run(
        &[
            "delete",
            "pods",
            "--all",
            "-n",
            ns,
            "--wait=true",
            "--ignore-not-found",
            "--timeout=120s",
        ],
        None,
    )?;
    k.run(
        &[
            "delete",
            "networkpolicies,serviceaccounts",
            "--all",
            "-n",
            ns,
            "--wait=false",
            "--ignore-not-found",
        ],
        None,
    )?;
    let deadline = Instant::now() + POD_TIMEOUT;
    while let Some(mut v) = gone(k)? {
        if v["spec"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            v["spec"]["finalizers"] = json!([]);
            k.run(
                &[
                    "replace",
                    "--raw",
                    &format!("/api/v1/namespaces/{ns}/finalize"),
                    "-f",
                    "-",
                ],
                Some(&v.to_string()),
            )?;
        }
        if Instant::now() > deadline {
            bail!("still there after {POD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn pod(ns: &str, name: &str, node: &str, ports: &[(u16, Protocol)]) -> Value {
    pod_manifest(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
                "spec": {"nodeName": node}}),
        ports,
    )
}

fn apply_list(k: &Kubectl, items: Vec<Value>) -> Result<()> {
    k.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

/// Ingress policy of `ns` over all its pods: default deny, plus (when `from` is given) TCP
/// `port` from every pod of namespace `from`.
fn policy(ns: &str, name: &str, from: Option<&str>, port: u16) -> Value {
    let ingress = match from {
        None => json!([]),
        Some(from) => json!([{
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": from}}}],
            "ports": [{"protocol": "TCP", "port": port}],
        }]),
    };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": ns, "name": name},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": ingress}})
}

/// Pod name -> (phase, IPv4 address) in `ns`.
fn pod_states(k: &Kubectl, ns: &str) -> Result<BTreeMap<String, (String, Option<Ipv4Addr>)>> {
    let v = k.get_json(&["pods", "-n", ns])?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let name = p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let phase = p["status"]["phase"]
                .as_str()
                .unwrap_or("Pending")
                .to_string();
            let ip = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok());
            (name, (phase, ip))
        })
        .collect())
}

fn wait_running(k: &Kubectl, ns: &str, names: &[&str]) -> Result<BTreeMap<String, Ipv4Addr>> {
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let st = pod_states(k, ns)?;
        let ready: BTreeMap<String, Ipv4Addr> = names
            .iter()
            .filter_map(|n| match st.get(*n) {
                Some((phase, Some(ip))) if phase == "Running" => Some((n.to_string(), *ip)),
                _ => None,
            })
            .collect();
        if ready.len() == names.len() {
            return Ok(ready);
        }
        if Instant::now() > deadline {
            bail!("pods of {ns} not Running with an address after {POD_TIMEOUT:?}: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// When each pod was first seen with an address, and Running (polling the API).
#[derive(Clone, Debug, Default)]
struct Seen {
    ip: Option<(Ipv4Addr, Instant)>,
    running: Option<Instant>,
}

fn watch_pods(k: &Kubectl, ns: &str, names: &[String]) -> Result<BTreeMap<String, Seen>> {
    let mut seen: BTreeMap<String, Seen> =
        names.iter().map(|n| (n.clone(), Seen::default())).collect();
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let st = pod_states(k, ns)?;
        let now = Instant::now();
        for (name, s) in seen.iter_mut() {
            if let Some((phase, ip)) = st.get(name) {
                if s.ip.is_none() {
                    s.ip = ip.map(|ip| (ip, now));
                }
                if s.running.is_none() && phase == "Running" && ip.is_some() {
                    s.running = Some(now);
                }
            }
        }
        if seen.values().all(|s| s.running.is_some()) {
            return Ok(seen);
        }
        if now > deadline {
            bail!("pods of {ns} not Running after {POD_TIMEOUT:?}: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The next `count` addresses host-local will hand out on `node`: after its last reservation,
/// skipping the ones leased (its leases are in the kubelet's state dir). The whole range when
/// that state cannot be read.
fn next_addresses(node: &Node, count: usize) -> Vec<Ipv4Addr> {
    // host-local hands out the subnet's hosts but the gateway (the first one, cni0's).
    let hosts: Vec<Ipv4Addr> = node.pod_cidr.hosts().skip(1).collect();
    let networks = node.kubelet_state.join("var-lib-cni/networks");
    let mut leased = BTreeSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for dir in std::fs::read_dir(&networks).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if let Ok(ip) = name.parse::<Ipv4Addr>() {
                leased.insert(ip);
            } else if name.starts_with("last_reserved_ip") {
                last = std::fs::read_to_string(f.path())
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
            }
        }
    }
    let Some(last) = last else {
        return hosts;
    };
    let start = hosts.iter().position(|ip| *ip == last).map_or(0, |i| i + 1);
    hosts
        .iter()
        .cycle()
        .skip(start)
        .take(hosts.len())
        .filter(|ip| !leased.contains(ip))
        .take(count)
        .copied()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The sweeping prober: many concurrent non-blocking attempts from one namespace

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, PartialEq)]
enum Out {
    /// TCP handshake completed (with what the server wrote, if anything), or UDP echoed.
    Connected(String),
    /// RST (TCP), port unreachable (UDP).
    Refused,
    /// No answer within the attempt's timeout.
    Timeout,
    /// No neighbour (the address does not exist), no route.
    Unreachable,
    Error(String),
}

#[derive(Clone, Debug)]
struct Attempt {
    target: usize,
    start: Instant,
    end: Instant,
    out: Out,
}

struct ProberConfig {
    netns: String,
    targets: Vec<(SocketAddrV4, Kind)>,
    timeout: Duration,
    /// Least time between two attempts to one target.
    interval: Duration,
    max_inflight: usize,
    /// Attempts in flight to one target at most.
    per_target: usize,
    /// Neighbour retransmission time to set on the namespace's eth0 (ms), so that an address
    /// that appears is resolved within that time (a pod namespace of the test only).
    neigh_retrans_ms: Option<u32>,
}

struct Prober {
    netns: String,
    targets: Vec<(SocketAddrV4, Kind)>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Vec<Attempt>>>,
}

struct ProbeLog {
    netns: String,
    targets: Vec<(SocketAddrV4, Kind)>,
    attempts: Vec<Attempt>,
}

impl Prober {
    fn start(cfg: ProberConfig) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, targets) = (cfg.netns.clone(), cfg.targets.clone());
        let s2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("sweep".into())
            .spawn(move || sweep(&cfg, &s2))
            .expect("spawning a prober thread");
        Prober {
            netns,
            targets,
            stop,
            handle,
        }
    }

    fn finish(self) -> Result<ProbeLog> {
        self.stop.store(true, Ordering::Relaxed);
        let attempts = self
            .handle
            .join()
            .map_err(|_| anyhow!("prober in {} panicked", self.netns))??;
        Ok(ProbeLog {
            netns: self.netns,
            targets: self.targets,
            attempts,
        })
    }
}

fn classify(e: &std::io::Error) -> Out {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ECONNREFUSED) => Out::Refused,
        Some(Errno::ETIMEDOUT | Errno::EAGAIN) => Out::Timeout,
        Some(Errno::EHOSTUNREACH | Errno::ENETUNREACH) => Out::Unreachable,
        _ if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) =>
        {
            Out::Timeout
        }
        _ => Out::Error(e.to_string()),
    }
}

/// `max_inflight` threads in the namespace, each making one attempt at a time (a connect with
/// the timeout, or one datagram waiting for its echo), taking the target whose turn is next;
/// no target is attempted more often than once per `interval`.
fn sweep(cfg: &ProberConfig, stop: &AtomicBool) -> Result<Vec<Attempt>> {
    if let Some(ms) = cfg.neigh_retrans_ms {
        let netns = cfg.netns.clone();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<()> {
                enter_netns(&netns)?;
                std::fs::write(
                    "/proc/sys/net/ipv4/neigh/eth0/retrans_time_ms",
                    ms.to_string(),
                )
                .with_context(|| format!("{netns}: neigh retrans_time_ms"))
            })
            .join()
            .map_err(|_| anyhow!("sysctl thread panicked"))?
        })?;
    }
    if cfg.targets.is_empty() {
        return Ok(Vec::new());
    }
    // Per target: when its next attempt is due, and how many are in flight (at most
    // per_target: addresses that do not answer must not take every thread).
    let n = cfg.targets.len();
    let turns = Mutex::new((0usize, vec![Instant::now(); n], vec![0usize; n]));
    let seq = AtomicU64::new(0);
    let attempts = Mutex::new(Vec::new());
    let entered: Result<()> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..cfg.max_inflight.max(1) {
            let worker = || -> Result<()> {
                enter_netns(&cfg.netns)?;
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // The target whose turn comes first (round robin among those due).
                    let picked = {
                        let mut g = turns.lock().unwrap_or_else(|e| e.into_inner());
                        let (rr, next, inflight) = &mut *g;
                        (0..n)
                            .map(|i| (*rr + i) % n)
                            .filter(|t| inflight[*t] < cfg.per_target.max(1))
                            .min_by_key(|t| next[*t])
                            .map(|t| {
                                let at = next[t].max(Instant::now());
                                next[t] = at + cfg.interval;
                                inflight[t] += 1;
                                *rr = (t + 1) % n;
                                (t, at)
                            })
                    };
                    let Some((t, at)) = picked else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    let wait = at.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                    let (addr, kind) = cfg.targets[t];
                    let start = Instant::now();
                    let out = attempt(addr, kind, cfg.timeout, seq.fetch_add(1, Ordering::Relaxed));
                    mine.push(Attempt {
                        target: t,
                        start,
                        end: Instant::now(),
                        out,
                    });
                    turns.lock().unwrap_or_else(|e| e.into_inner()).2[t] -= 1;
                }
                attempts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(mine);
                Ok(())
            };
            match std::thread::Builder::new()
                .name("sweep".into())
                .stack_size(128 * 1024)
                .spawn_scoped(s, worker)
            {
                Ok(h) => handles.push(h),
                Err(_) => break,
            }
        }
        for h in handles {
            h.join().map_err(|_| anyhow!("prober thread panicked"))??;
        }
        Ok(())
    });
    entered?;
    let mut all = attempts.into_inner().unwrap_or_else(|e| e.into_inner());
    all.sort_by_key(|a| a.start);
    Ok(all)
}

/// One attempt from the calling thread's namespace.
fn attempt(addr: SocketAddrV4, kind: Kind, timeout: Duration, seq: u64) -> Out {
    let err = |e: std::io::Error| Out::Error(e.to_string());
    let to = SockAddr::from(SocketAddr::V4(addr));
    match kind {
        Kind::Tcp => {
            let sock = match Socket::new(Domain::IPV4, Type::STREAM, Some(SockProto::TCP)) {
                Ok(s) => s,
                Err(e) => return err(e),
            };
            // RST on close: no TIME_WAIT pile-up from thousands of attempts.
            if let Err(e) = sock.set_linger(Some(Duration::ZERO)) {
                return err(e);
            }
            if let Err(e) = sock.connect_timeout(&to, timeout) {
                return classify(&e);
            }
            // Connected: what the server says (the kubelet stand-in names the pod).
            let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 256];
            let said = match (&sock).read(&mut buf) {
                Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                Err(_) => String::new(),
            };
            Out::Connected(said)
        }
        Kind::Udp => {
            let sock = match Socket::new(Domain::IPV4, Type::DGRAM, Some(SockProto::UDP)) {
                Ok(s) => s,
                Err(e) => return err(e),
            };
            if let Err(e) = sock.connect(&to) {
                return classify(&e);
            }
            let token = format!("guarantee {seq:016x}").into_bytes();
            if let Err(e) = sock.send(&token) {
                return classify(&e);
            }
            let deadline = Instant::now() + timeout;
            let mut buf = [0u8; 256];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Out::Timeout;
                }
                if let Err(e) = sock.set_read_timeout(Some(left)) {
                    return err(e);
                }
                match (&sock).read(&mut buf) {
                    Ok(n) if buf[..n] == token[..] => return Out::Connected("echo".into()),
                    Ok(_) => {}
                    Err(e) => match classify(&e) {
                        Out::Timeout => return Out::Timeout,
                        other => return other,
                    },
                }
            }
        }
    }
}

impl ProbeLog {
    fn target(&self, a: &Attempt) -> (SocketAddrV4, Kind) {
        self.targets[a.target]
    }

    fn count_by_target(&self) -> BTreeMap<(Ipv4Addr, Kind), usize> {
        let mut m = BTreeMap::new();
        for a in &self.attempts {
            let (addr, kind) = self.target(a);
            *m.entry((*addr.ip(), kind)).or_default() += 1;
        }
        m
    }
}

/// When each pod's namespace first had its address (eth0) and a route via a gateway, polled
/// from the host as the pods start (netns names from the kubelet's naming).
struct AddrWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<BTreeMap<String, (Ipv4Addr, Instant)>>,
}

impl AddrWatch {
    fn start(netns_names: Vec<String>) -> AddrWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut found = BTreeMap::new();
            while !s2.load(Ordering::Relaxed) && found.len() < netns_names.len() {
                for name in &netns_names {
                    if found.contains_key(name) {
                        continue;
                    }
                    if let Some(ip) = address_with_route(name) {
                        found.insert(name.clone(), (ip, Instant::now()));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            found
        });
        AddrWatch { stop, handle }
    }

    fn finish(self) -> BTreeMap<String, (Ipv4Addr, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The IPv4 address of eth0 in the named namespace, once it also has a route via a gateway.
fn address_with_route(netns: &str) -> Option<Ipv4Addr> {
    if !Path::new("/run/netns").join(netns).exists() {
        return None;
    }
    std::thread::scope(|s| {
        s.spawn(|| -> Option<Ipv4Addr> {
            enter_netns(netns).ok()?;
            let ip = nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
                if ifa.interface_name != "eth0" {
                    return None;
                }
                ifa.address?.as_sockaddr_in().map(|a| a.ip())
            })?;
            let routes = std::fs::read_to_string("/proc/thread-self/net/route").ok()?;
            let via_gateway = routes
                .lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(2).is_some_and(|g| g != "00000000"));
            via_gateway.then_some(ip)
        })
        .join()
        .ok()
        .flatten()
    })
}

fn ms(from: Instant, t: Instant) -> String {
    if t >= from {
        format!("+{} ms", t.duration_since(from).as_millis())
    } else {
        format!("-{} ms", from.duration_since(t).as_millis())
    }
}

// ---------------------------------------------------------------------------------------------
// Pod start: default deny

#[test]
fn pod_start_deny() {
    let _serial = serial();
    let Some(ctx) = cluster_or_skip("pod_start_deny") else {
        return;
    };
    if let Err(e) = deny(&ctx) {
        panic!("pod_start_deny: {e:#}");
    }
}

fn deny(ctx: &Ctx) -> Result<()> {
    let k = &ctx.k;
    let target = &ctx.nodes[1];
    let far = &ctx.nodes[0];
    let mut nss = Namespaces::new(k);
    let pns = nss.create("dp")?;
    let dns = nss.create("dd")?;
    let ports = [(PORT, Protocol::Tcp), (PORT, Protocol::Udp)];
    apply_list(
        k,
        vec![
            pod(&pns, "near", &target.name, &ports),
            pod(&pns, "far", &far.name, &ports),
            policy(&dns, "default-deny", None, PORT),
            pod(&dns, "canary", &target.name, &ports),
        ],
    )?;
    wait_running(k, &pns, &["near", "far"])?;
    let canary = wait_running(k, &dns, &["canary"])?["canary"];
    let near_ns = pod_netns_name(&target.pod_prefix, &pns, "near");
    let far_ns = pod_netns_name(&far.pod_prefix, &pns, "far");
    // The policy is in force before the pods start (so what follows is about their start).
    converge_probe(&[&near_ns, &far_ns], canary, false)?;
    say(format!(
        "deny: {dns} is default-deny (canary {canary} dropped)"
    ));

    let candidates = next_addresses(target, NEW_PODS + 6);
    say(format!(
        "deny: sweeping {} addresses of {} ({}..) from {} and {}",
        candidates.len(),
        target.name,
        candidates
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        near_ns,
        far_ns
    ));
    let targets: Vec<(SocketAddrV4, Kind)> = candidates
        .iter()
        .flat_map(|ip| {
            [
                (SocketAddrV4::new(*ip, PORT), Kind::Tcp),
                (SocketAddrV4::new(*ip, PORT), Kind::Udp),
            ]
        })
        .collect();
    let probers: Vec<Prober> = [&near_ns, &far_ns]
        .iter()
        .map(|ns| {
            Prober::start(ProberConfig {
                netns: ns.to_string(),
                targets: targets.clone(),
                timeout: ATTEMPT_TIMEOUT,
                interval: Duration::from_millis(5),
                max_inflight: 128,
                per_target: 4,
                neigh_retrans_ms: None,
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let names: Vec<String> = (0..NEW_PODS).map(|i| format!("p{i}")).collect();
    let created = apply_list(
        k,
        names
            .iter()
            .map(|n| pod(&dns, n, &target.name, &ports))
            .collect(),
    )
    .and_then(|()| watch_pods(k, &dns, &names));
    // Keep probing the Running pods: the sweep must see their addresses dropped.
    std::thread::sleep(Duration::from_secs(3));
    let logs: Vec<ProbeLog> = probers
        .into_iter()
        .map(Prober::finish)
        .collect::<Result<_>>()?;
    let seen = created?;

    let pod_ips: BTreeMap<Ipv4Addr, (&str, Instant)> = seen
        .iter()
        .filter_map(|(n, s)| Some((s.ip?.0, (n.as_str(), s.running?))))
        .collect();
    let mut failures = Vec::new();
    for log in &logs {
        let total = log.attempts.len();
        let counts = log.count_by_target();
        say(format!(
            "deny: {}: {total} attempts; per new pod address (tcp/udp): {}",
            log.netns,
            pod_ips
                .iter()
                .map(|(ip, (n, _))| format!(
                    "{n} {ip} {}/{}",
                    counts.get(&(*ip, Kind::Tcp)).unwrap_or(&0),
                    counts.get(&(*ip, Kind::Udp)).unwrap_or(&0)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        // (address, protocol) -> (pod, how many, first, last, what it said)
        type Through<'a> =
            BTreeMap<(SocketAddrV4, Kind), (&'a str, usize, Instant, Instant, String)>;
        let mut through: Through = BTreeMap::new();
        for a in &log.attempts {
            let (addr, kind) = log.target(a);
            if let Out::Connected(said) = &a.out {
                let theirs = pod_ips.get(addr.ip()).map(|(n, _)| *n);
                if theirs.is_some() || said.starts_with(&format!("{dns}/")) {
                    let e = through.entry((addr, kind)).or_insert((
                        theirs.unwrap_or("?"),
                        0,
                        a.start,
                        a.start,
                        said.clone(),
                    ));
                    e.1 += 1;
                    e.3 = a.start;
                }
            }
        }
        for ((addr, kind), (pod, n, first, last, said)) in through {
            let running = pod_ips
                .get(addr.ip())
                .map(|(_, r)| ms(t0, *r))
                .unwrap_or_default();
            failures.push(format!(
                "{}: {n} {kind:?} connection(s) to {addr} (pod {pod}, Running {running}) from {} to {} (answer {said:?})",
                log.netns,
                ms(t0, first),
                ms(t0, last)
            ));
        }
        // The probe ran: every new pod's address probed after it was Running, and dropped.
        for (ip, (name, running)) in &pod_ips {
            if !candidates.contains(ip) {
                failures.push(format!(
                    "{name}'s address {ip} was not among the swept ones"
                ));
                continue;
            }
            let after: Vec<&Attempt> = log
                .attempts
                .iter()
                .filter(|a| log.target(a) == (SocketAddrV4::new(*ip, PORT), Kind::Tcp))
                .filter(|a| a.start >= *running)
                .collect();
            let dropped = after.iter().filter(|a| a.out == Out::Timeout).count();
            if after.len() < 5 || dropped < after.len() {
                failures.push(format!(
                    "{}: {name} {ip} after Running: {} TCP attempts, {dropped} dropped (want >= 5, all dropped): {:?}",
                    log.netns,
                    after.len(),
                    after.iter().filter(|a| a.out != Out::Timeout).map(|a| &a.out).take(5).collect::<Vec<_>>()
                ));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} violation(s) of the default-deny start guarantee:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    say("deny: no new pod of the default-deny namespace answered, from its first instant");
    Ok(())
}

/// Probes `to:PORT` from each namespace until every probe connects (`want`) or is dropped.
fn converge_probe(from: &[&str], to: Ipv4Addr, want: bool) -> Result<()> {
    let reqs: Vec<ProbeReq> = from
        .iter()
        .map(|ns| ProbeReq {
            from_netns: ns.to_string(),
            to: SocketAddr::new(IpAddr::V4(to), PORT),
            proto: Proto::Tcp,
        })
        .collect();
    converge_reqs(&reqs, want)
}

fn converge_reqs(reqs: &[ProbeReq], want: bool) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let out = run_probes(reqs, Duration::from_millis(500), reqs.len());
        let ok = out.iter().all(|o| {
            if want {
                o.is_connected()
            } else {
                *o == Outcome::Failed("timeout".into())
            }
        });
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "probes never all {} within {CONVERGE:?}: {:?}",
                if want { "connected" } else { "dropped" },
                reqs.iter()
                    .zip(&out)
                    .map(|(r, o)| format!("{} -> {}: {o:?}", r.from_netns, r.to))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// Pod start: allowed

#[test]
fn pod_start_allow() {
    let _serial = serial();
    let Some(ctx) = cluster_or_skip("pod_start_allow") else {
        return;
    };
    if let Err(e) = allow(&ctx) {
        panic!("pod_start_allow: {e:#}");
    }
}

fn allow(ctx: &Ctx) -> Result<()> {
    let k = &ctx.k;
    let target = ctx.nodes.last().expect("2 nodes at least");
    let far = &ctx.nodes[0];
    let mut nss = Namespaces::new(k);
    let pns = nss.create("ap")?;
    let ans = nss.create("aa")?;
    let ports = [(PORT, Protocol::Tcp)];
    let allowed_port = if breaking("allow-other-port") {
        PORT + 1
    } else {
        PORT
    };
    apply_list(
        k,
        vec![
            pod(&pns, "near", &target.name, &ports),
            pod(&pns, "far", &far.name, &ports),
            policy(&ans, "allow-prober", Some(&pns), allowed_port),
        ],
    )?;
    wait_running(k, &pns, &["near", "far"])?;
    let near_ns = pod_netns_name(&target.pod_prefix, &pns, "near");
    let far_ns = pod_netns_name(&far.pod_prefix, &pns, "far");
    apply_list(k, vec![pod(&ans, "canary", &target.name, &ports)])?;
    let canary = wait_running(k, &ans, &["canary"])?["canary"];
    if !breaking("allow-other-port") {
        converge_probe(&[&near_ns, &far_ns], canary, true)?;
        say(format!(
            "allow: {ans} admits {pns} (canary {canary} connects)"
        ));
    }

    let candidates = next_addresses(target, NEW_PODS + 6);
    say(format!(
        "allow: sweeping {} addresses of {} ({}..) from {near_ns}, {far_ns} and the node",
        candidates.len(),
        target.name,
        candidates
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
    ));
    let targets: Vec<(SocketAddrV4, Kind)> = candidates
        .iter()
        .map(|ip| (SocketAddrV4::new(*ip, PORT), Kind::Tcp))
        .collect();
    // The probers' own neighbour resolution retries every 50 ms (their namespaces are the
    // test's): an address that appears is resolved at once, not up to a second later.
    const RETRANS_MS: u32 = 50;
    // Attempts answered late on a loaded machine are not drops: 900 ms is still one SYN (the
    // first retransmission is at 1 s), so a dropped SYN is never hidden by a second one.
    let cfg = |netns: &str, retrans: Option<u32>| ProberConfig {
        netns: netns.to_string(),
        targets: targets.clone(),
        timeout: Duration::from_millis(900),
        interval: Duration::from_millis(10),
        max_inflight: 64,
        per_target: 4,
        neigh_retrans_ms: retrans,
    };
    let probers = vec![
        Prober::start(cfg(&near_ns, Some(RETRANS_MS))),
        Prober::start(cfg(&far_ns, Some(RETRANS_MS))),
    ];
    // The node's own attempts (not forwarded: no policy applies) say when an address can be
    // reached at all, including the node's neighbour entry on cni0.
    let witness = Prober::start(cfg(&target.netns, None));
    let names: Vec<String> = (0..NEW_PODS).map(|i| format!("p{i}")).collect();
    let watch = AddrWatch::start(
        names
            .iter()
            .map(|n| pod_netns_name(&target.pod_prefix, &ans, n))
            .collect(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let created = apply_list(
        k,
        names
            .iter()
            .map(|n| pod(&ans, n, &target.name, &ports))
            .collect(),
    )
    .and_then(|()| watch_pods(k, &ans, &names));
    std::thread::sleep(Duration::from_secs(3));
    let addrs = watch.finish();
    let wit = witness.finish()?;
    let logs: Vec<ProbeLog> = probers
        .into_iter()
        .map(Prober::finish)
        .collect::<Result<_>>()?;
    let seen = created?;

    let grace = Duration::from_millis(u64::from(2 * RETRANS_MS));
    let mut failures = Vec::new();
    for (name, s) in &seen {
        let netns = pod_netns_name(&target.pod_prefix, &ans, name);
        let (Some((ip, _)), Some(running)) = (s.ip, s.running) else {
            failures.push(format!("{name}: no address or not Running"));
            continue;
        };
        let Some(&(addr_ip, addr_at)) = addrs.get(&netns) else {
            failures.push(format!(
                "{name}: its namespace {netns} never showed an address"
            ));
            continue;
        };
        if addr_ip != ip || !candidates.contains(&ip) {
            failures.push(format!(
                "{name}: address {ip} (namespace: {addr_ip}) was not among the swept ones"
            ));
            continue;
        }
        let dst = (SocketAddrV4::new(ip, PORT), Kind::Tcp);
        let answered = wit
            .attempts
            .iter()
            .filter(|a| wit.target(a) == dst && matches!(a.out, Out::Refused | Out::Connected(_)))
            .map(|a| a.end)
            .min();
        let Some(answered) = answered else {
            failures.push(format!("{name} {ip}: the node itself never got an answer"));
            continue;
        };
        for log in &logs {
            // The near prober is on the pod's bridge: its own neighbour entry (50 ms retries)
            // is all it needs. The far one's packets leave through the node's cni0, whose
            // neighbour entry may wait for its next retry (up to 1 s): from the node's answer.
            let reachable = if log.netns == near_ns {
                addr_at + grace
            } else {
                addr_at.max(answered) + grace
            };
            let mine: Vec<&Attempt> = log
                .attempts
                .iter()
                .filter(|a| log.target(a) == dst && a.start >= reachable)
                .collect();
            let before_running = mine.iter().filter(|a| a.start < running).count();
            let refused = mine
                .iter()
                .filter(|a| a.start < running && a.out == Out::Refused)
                .count();
            let after: Vec<&&Attempt> = mine.iter().filter(|a| a.start >= running).collect();
            say(format!(
                "allow: {} -> {name} {ip}: address {}, reachable {}, Running {}; {before_running} attempts before Running ({refused} refused), {} after",
                log.netns,
                ms(t0, addr_at),
                ms(t0, reachable),
                ms(t0, running),
                after.len()
            ));
            let bad: Vec<&&Attempt> = mine
                .iter()
                .filter(|a| {
                    if a.start < running {
                        !matches!(a.out, Out::Refused | Out::Connected(_))
                    } else {
                        !matches!(a.out, Out::Connected(_))
                    }
                })
                .collect();
            if let Some(first) = bad.first() {
                failures.push(format!(
                    "{} -> {name} {ip}: {} of {} attempts failed, the first {:?} at {} (reachable {}, Running {})",
                    log.netns,
                    bad.len(),
                    mine.len(),
                    first.out,
                    ms(t0, first.start),
                    ms(t0, reachable),
                    ms(t0, running)
                ));
            }
            if after.len() < 5 {
                failures.push(format!(
                    "{} -> {name} {ip}: only {} attempts after Running (want >= 5)",
                    log.netns,
                    after.len()
                ));
            }
        }
    }
    if !failures.is_empty() {
        let n = failures.len();
        failures.truncate(40);
        bail!(
            "{n} violation(s) of the allowed start guarantee (first 40):\n  {}",
            failures.join("\n  ")
        );
    }
    say("allow: every new pod was reachable from its first instant (refused until it listened), never dropped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Restarts under traffic

/// An echo server on `port` inside a pod's namespace (the "container" of the test).
struct EchoServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(netns: &str, port: u16) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let bind = move || -> Result<TcpListener> {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let serve = move |listener: TcpListener| {
            while !s2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let s3 = s2.clone();
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut buf = [0u8; 1024];
                            while !s3.load(Ordering::Relaxed) {
                                match c.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if c.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        };
        let handle = spawn_listener_in_netns(netns, "echo-server", bind, serve)
            .context("echo server thread")?;
        Ok(EchoServer {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(Debug, Default)]
struct EchoStats {
    echoes: u64,
    max_stall: Duration,
    error: Option<String>,
}

/// A long-lived connection echoing a counter every 10 ms until `stop`.
struct EchoClient {
    label: String,
    handle: JoinHandle<EchoStats>,
    echoes: Arc<AtomicU64>,
}

impl EchoClient {
    fn start(netns: &str, to: SocketAddrV4, label: String, stop: Arc<AtomicBool>) -> EchoClient {
        let echoes = Arc::new(AtomicU64::new(0));
        let (ns, e2) = (netns.to_string(), echoes.clone());
        let handle = std::thread::spawn(move || {
            let mut st = EchoStats::default();
            if let Err(e) = echo_loop(&ns, to, &stop, &mut st, &e2) {
                st.error = Some(format!("{e:#}"));
            }
            st
        });
        EchoClient {
            label,
            handle,
            echoes,
        }
    }
}

fn echo_loop(
    netns: &str,
    to: SocketAddrV4,
    stop: &AtomicBool,
    st: &mut EchoStats,
    count: &AtomicU64,
) -> Result<()> {
    enter_netns(netns)?;
    let mut c = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5))
        .context("connect")?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut last = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        c.write_all(&seq.to_be_bytes()).context("write")?;
        let mut got = [0u8; 8];
        let mut have = 0;
        while have < 8 {
            match c.read(&mut got[have..]) {
                Ok(0) => bail!("closed by the peer after {} echoes", st.echoes),
                Ok(n) => have += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if last.elapsed() > STALL_MAX {
                        bail!("no echo for {STALL_MAX:?} after {} echoes", st.echoes);
                    }
                }
                Err(e) => bail!("read after {} echoes: {e}", st.echoes),
            }
        }
        if u64::from_be_bytes(got) != seq {
            bail!("echo {seq} came back as {}", u64::from_be_bytes(got));
        }
        st.echoes += 1;
        count.store(st.echoes, Ordering::Relaxed);
        st.max_stall = st.max_stall.max(last.elapsed());
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[test]
fn restart_under_traffic() {
    let _serial = serial();
    let Some(ctx) = cluster_or_skip("restart_under_traffic") else {
        return;
    };
    if let Err(e) = restart(&ctx) {
        panic!("restart_under_traffic: {e:#}");
    }
}

#[test]
fn uninstall_leaves_flannel_alone() {
    let _serial = serial();
    let Some(ctx) = cluster_or_skip("uninstall_leaves_flannel_alone") else {
        return;
    };
    // (read from the running agent: it is not running after the uninstall)
    let profile = cluster_profile(&ctx.nodes[0]);
    let result = uninstall(&ctx);
    // sluice back on every node for what runs next, also when the test failed
    let restored = cluster_up(&ctx, &profile).and_then(|()| {
        ctx.nodes
            .iter()
            .try_for_each(|n| wait_until(CONVERGE, "the agent ready again", || agent_ready(n)))
    });
    if let Err(e) = result {
        panic!("uninstall_leaves_flannel_alone: {e:#}");
    }
    if let Err(e) = restored {
        panic!("uninstall_leaves_flannel_alone: putting sluice back: {e:#}");
    }
}

fn wait_until(limit: Duration, what: &str, check: impl Fn() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not after {limit:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The files of a node's CNI dirs, by name, with their bytes.
fn cni_files(n: &Node, sub: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    let dir = n.dir.join(sub);
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            files.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path())?,
            );
        }
    }
    Ok(files)
}

fn node_tables(n: &Node) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &n.netns, "nft", "list", "tables"])
        .output()?;
    if !out.status.success() {
        bail!(
            "{}: nft list tables: {}",
            n.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const OUR_CONFLIST: &str = "05-sluice.conflist";

fn uninstall(ctx: &Ctx) -> Result<()> {
    let k = &ctx.k;
    // Before: sluice chained and enforcing on every node. Flannel's files are kept to compare.
    let mut flannel_conf = BTreeMap::new();
    for n in &ctx.nodes {
        agent_ready(n).with_context(|| format!("{}: before", n.name))?;
        let mut conf = cni_files(n, "cni/net.d")?;
        if conf.remove(OUR_CONFLIST).is_none() {
            bail!("{}: no {OUR_CONFLIST} before the uninstall", n.name);
        }
        if !cni_files(n, "cni/bin")?.contains_key("sluice-cni") {
            bail!("{}: no sluice-cni before the uninstall", n.name);
        }
        if !node_tables(n)?.contains("table inet sluice") {
            bail!("{}: no table inet sluice before the uninstall", n.name);
        }
        flannel_conf.insert(n.name.clone(), conf);
    }

    // `helm uninstall` deletes the DaemonSet; the garbage collector then deletes its pods and
    // each kubelet stops their containers (SIGTERM). No controller manager runs here: the
    // test stops them, once every part has seen the deletion.
    k.run(
        &[
            "delete",
            "daemonset",
            "-n",
            "kube-system",
            "sluice",
            "--wait=false",
        ],
        None,
    )?;
    let seen = "the DaemonSet is deleted (uninstall)";
    for n in &ctx.nodes {
        for part in ["agent", "install-cni"] {
            let log = n.dir.join(format!("{part}.log"));
            wait_until(
                CONVERGE,
                &format!("{}: {part} sees the deletion", n.name),
                || {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains(seen) {
                        Ok(())
                    } else {
                        bail!("no {seen:?} in {}", log.display())
                    }
                },
            )?;
        }
    }
    for n in &ctx.nodes {
        stop_part(n, "install-cni", nix::sys::signal::Signal::SIGTERM)?;
        stop_part(n, "agent", nix::sys::signal::Signal::SIGTERM)?;
    }

    // After: nothing of sluice's on any node, flannel's conflist as it was.
    for n in &ctx.nodes {
        let tables = node_tables(n)?;
        if tables.contains("sluice") {
            bail!(
                "{}: sluice's tables are left after the uninstall:
{tables}",
                n.name
            );
        }
        let conf = cni_files(n, "cni/net.d")?;
        if &conf != flannel_conf.get(&n.name).expect("recorded") {
            bail!(
                "{}: the CNI conf dir after the uninstall is not flannel's as before: {:?}",
                n.name,
                conf.keys().collect::<Vec<_>>()
            );
        }
        if cni_files(n, "cni/bin")?.contains_key("sluice-cni") {
            bail!("{}: sluice-cni is left in the CNI bin dir", n.name);
        }
    }

    // A new pod starts with flannel's chain alone (the start gate would refuse it with no agent)
    // and is reachable from another node.
    let mut nss = Namespaces::new(k);
    let ns = nss.create("un")?;
    let (n1, nl) = (&ctx.nodes[0], ctx.nodes.last().expect("nodes"));
    apply_list(
        k,
        vec![
            pod(&ns, "srv", &n1.name, &[(PORT, Protocol::Tcp)]),
            pod(&ns, "cli", &nl.name, &[(PORT, Protocol::Tcp)]),
        ],
    )?;
    let ips = wait_running(k, &ns, &["srv", "cli"])?;
    let cli = pod_netns_name(&nl.pod_prefix, &ns, "cli");
    converge_probe(&[&cli], ips["srv"], true).context("the new pod reachable")?;
    Ok(())
}

/// `e2e/cluster up` with the running cluster's options (its `config`), building nothing: it
/// starts again only what is dead.
fn cluster_up(ctx: &Ctx, profile: &str) -> Result<()> {
    let config =
        std::fs::read_to_string(ctx.dir.join("config")).context("the state dir's config")?;
    let get = |k: &str| {
        config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    let mut args = vec![
        "up".to_string(),
        "--nodes".into(),
        get("NODES"),
        "--backend".into(),
        get("BACKEND"),
        "--proxy".into(),
        get("PROXY"),
    ];
    if get("DUAL_STACK") == "1" {
        args.push("--dual-stack".into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster");
    let out = Command::new(&script)
        .args(&args)
        .env("SLUICE_CLUSTER_NO_BUILD", "1")
        .env("SLUICE_CLUSTER_ID", cluster_id(ctx)?)
        .env("SLUICE_CLUSTER_DIR", &ctx.dir)
        .env("SLUICE_CLUSTER_PROFILE", profile)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "e2e/cluster {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// `SLUICE_CLUSTER_ID`, or what the node namespaces' names say (`slcK-node-N`, `slc-node-N`).
fn cluster_id(ctx: &Ctx) -> Result<String> {
    let from_names = ctx.nodes[0]
        .netns
        .strip_prefix("slc")
        .and_then(|r| r.split_once("-node-"))
        .map(|(id, _)| {
            if id.is_empty() {
                "0".to_string()
            } else {
                id.to_string()
            }
        });
    match (
        std::env::var("SLUICE_CLUSTER_ID")
            .ok()
            .filter(|s| !s.is_empty()),
        from_names,
    ) {
        (Some(env), Some(names)) if env != names => bail!(
            "SLUICE_CLUSTER_ID={env} but the cluster's namespaces ({}) are cluster {names}'s",
            ctx.nodes[0].netns
        ),
        (Some(env), _) => Ok(env),
        (None, Some(names)) => Ok(names),
        (None, None) => bail!(
            "SLUICE_CLUSTER_ID is not set and {} does not say",
            ctx.nodes[0].netns
        ),
    }
}

/// `SLUICE_CLUSTER_PROFILE`, or the profile of the running agent's binary.
fn cluster_profile(n: &Node) -> String {
    if let Ok(p) = std::env::var("SLUICE_CLUSTER_PROFILE") {
        if !p.is_empty() {
            return p;
        }
    }
    let cmdline = part_pid(n, "agent")
        .ok()
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("/target/debug/") {
        "debug".into()
    } else {
        "release".into()
    }
}

fn stop_part(n: &Node, part: &str, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = part_pid(n, part)?;
    if !alive(pid) {
        bail!("{}: {part} (pid {pid}) is not running", n.name);
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .with_context(|| format!("kill {sig} {part} {pid}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        if Instant::now() > deadline {
            bail!(
                "{}: {part} (pid {pid}) still running 20 s after {sig}",
                n.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn restart(ctx: &Ctx) -> Result<()> {
    let k = &ctx.k;
    let n1 = &ctx.nodes[0];
    let n2 = &ctx.nodes[1];
    let nl = ctx.nodes.last().expect("2 nodes at least");
    let profile = cluster_profile(n1);
    let mut nss = Namespaces::new(k);
    let sns = nss.create("rs")?;
    let cns = nss.create("rc")?;
    let xns = nss.create("rx")?;
    let yns = nss.create("ry")?;
    let ports = [(PORT, Protocol::Tcp)];
    apply_list(
        k,
        vec![
            policy(&sns, "allow-clients", Some(&cns), ECHO_PORT),
            pod(&sns, "srv1", &n1.name, &ports),
            pod(&sns, "srv2", &n2.name, &ports),
            pod(&cns, "cli1", &n1.name, &ports),
            pod(&cns, "clil", &nl.name, &ports),
            pod(&xns, "bad1", &n1.name, &ports),
            pod(&xns, "badl", &nl.name, &ports),
            pod(&yns, "later", &nl.name, &ports),
        ],
    )?;
    let srv = wait_running(k, &sns, &["srv1", "srv2"])?;
    wait_running(k, &cns, &["cli1", "clil"])?;
    wait_running(k, &xns, &["bad1", "badl"])?;
    wait_running(k, &yns, &["later"])?;
    let ns_of = |node: &Node, ns: &str, name: &str| pod_netns_name(&node.pod_prefix, ns, name);
    let _servers = [
        EchoServer::start(&ns_of(n1, &sns, "srv1"), ECHO_PORT)?,
        EchoServer::start(&ns_of(n2, &sns, "srv2"), ECHO_PORT)?,
    ];
    let srv1 = SocketAddrV4::new(srv["srv1"], ECHO_PORT);
    let srv2 = SocketAddrV4::new(srv["srv2"], ECHO_PORT);
    let bad: Vec<String> = vec![ns_of(n1, &xns, "bad1"), ns_of(nl, &xns, "badl")];
    let later = ns_of(nl, &yns, "later");
    let clients_ns = [ns_of(n1, &cns, "cli1"), ns_of(nl, &cns, "clil")];
    // The policy is in force: clients connect, the others are dropped.
    let reqs = |from: &[String], to: &[SocketAddrV4]| -> Vec<ProbeReq> {
        from.iter()
            .flat_map(|f| {
                to.iter().map(move |t| ProbeReq {
                    from_netns: f.clone(),
                    to: SocketAddr::V4(*t),
                    proto: Proto::Tcp,
                })
            })
            .collect()
    };
    converge_reqs(&reqs(&clients_ns, &[srv1, srv2]), true)?;
    converge_reqs(&reqs(&bad, &[srv1, srv2]), false)?;
    converge_reqs(&reqs(std::slice::from_ref(&later), &[srv1]), false)?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (cli, node) in [("cli1", n1), ("clil", nl)] {
        for (to, sname) in [(srv1, "srv1"), (srv2, "srv2")] {
            for i in 0..2 {
                clients.push(EchoClient::start(
                    &ns_of(node, &cns, cli),
                    to,
                    format!("{cli}@{} -> {sname}@{to} #{i}", node.name),
                    stop.clone(),
                ));
            }
        }
    }
    let t0 = Instant::now();
    let hammer = Prober::start(ProberConfig {
        netns: bad[0].clone(),
        targets: vec![(srv1, Kind::Tcp), (srv2, Kind::Tcp)],
        timeout: ATTEMPT_TIMEOUT,
        interval: Duration::from_millis(5),
        max_inflight: 64,
        per_target: 32,
        neigh_retrans_ms: None,
    });
    let hammer2 = Prober::start(ProberConfig {
        netns: bad[1].clone(),
        targets: vec![(srv1, Kind::Tcp), (srv2, Kind::Tcp)],
        timeout: ATTEMPT_TIMEOUT,
        interval: Duration::from_millis(5),
        max_inflight: 64,
        per_target: 32,
        neigh_retrans_ms: None,
    });
    let result = disrupt(ctx, &profile, &clients, &later, srv1, &sns, &yns);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let logs = [hammer.finish()?, hammer2.finish()?];
    let mut failures = Vec::new();
    if let Err(e) = result {
        failures.push(format!("{e:#}"));
    }
    for c in clients {
        let st = c
            .handle
            .join()
            .map_err(|_| anyhow!("echo client panicked"))?;
        say(format!(
            "restart: {}: {} echoes, longest gap {} ms{}",
            c.label,
            st.echoes,
            st.max_stall.as_millis(),
            st.error
                .as_deref()
                .map(|e| format!(", FAILED: {e}"))
                .unwrap_or_default()
        ));
        if let Some(e) = st.error {
            failures.push(format!("established connection {}: {e}", c.label));
        }
    }
    for log in &logs {
        let counts = log.count_by_target();
        say(format!(
            "restart: forbidden attempts from {}: {}",
            log.netns,
            counts
                .iter()
                .map(|((ip, _), n)| format!("{ip}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut through: BTreeMap<SocketAddrV4, (usize, Instant)> = BTreeMap::new();
        for a in &log.attempts {
            if let Out::Connected(_) = a.out {
                let e = through.entry(log.target(a).0).or_insert((0, a.start));
                e.0 += 1;
            }
        }
        for (to, (n, first)) in through {
            failures.push(format!(
                "{n} forbidden connection(s) {} -> {to} got through (the first at {} into the traffic)",
                log.netns,
                ms(t0, first)
            ));
        }
        if counts.values().any(|n| *n < 100) {
            failures.push(format!(
                "{}: too few forbidden attempts: {counts:?}",
                log.netns
            ));
        }
    }
    if !failures.is_empty() {
        let n = failures.len();
        failures.truncate(40);
        bail!("{n} failure(s) (first 40):\n  {}", failures.join("\n  "));
    }
    say("restart: no forbidden connection, every established connection kept echoing, the agent works after each restart");
    Ok(())
}

fn disrupt(
    ctx: &Ctx,
    profile: &str,
    clients: &[EchoClient],
    later: &str,
    srv1: SocketAddrV4,
    sns: &str,
    yns: &str,
) -> Result<()> {
    use nix::sys::signal::Signal;
    let k = &ctx.k;
    let n1 = &ctx.nodes[0];
    // Every connection established and echoing before anything happens.
    let deadline = Instant::now() + CONVERGE;
    while clients
        .iter()
        .any(|c| c.echoes.load(Ordering::Relaxed) < 20)
    {
        if Instant::now() > deadline {
            bail!("the echo connections did not start");
        }
        if clients.iter().any(|c| c.handle.is_finished()) {
            bail!("an echo connection ended before the restarts");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let later_req = [ProbeReq {
        from_netns: later.to_string(),
        to: SocketAddr::V4(srv1),
        proto: Proto::Tcp,
    }];
    let sluice_bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(profile)
        .join("sluice");
    for (round, (part, sig)) in [
        ("agent", Signal::SIGTERM),
        ("agent", Signal::SIGKILL),
        ("flanneld", Signal::SIGTERM),
    ]
    .into_iter()
    .enumerate()
    {
        let before: Vec<u64> = clients
            .iter()
            .map(|c| c.echoes.load(Ordering::Relaxed))
            .collect();
        say(format!(
            "restart: {} {part} of {} ({sig})",
            round + 1,
            n1.name
        ));
        stop_part(n1, part, sig)?;
        if part == "agent" && breaking("agent-cleanup") {
            say("restart: SLUICE_GUARANTEES_BREAK=agent-cleanup: removing the table");
            let st = Command::new("ip")
                .args(["netns", "exec", &n1.netns])
                .arg(&sluice_bin)
                .args(["agent", "--cleanup"])
                .status()?;
            if !st.success() {
                bail!("sluice agent --cleanup: {st}");
            }
        }
        // Traffic goes on while the part is down.
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        cluster_up(ctx, profile)?;
        say(format!(
            "restart: {part} of {} back ({} ms)",
            n1.name,
            t.elapsed().as_millis()
        ));
        // The connections are still echoing after the restart.
        let deadline = Instant::now() + STALL_MAX;
        loop {
            let moved = clients
                .iter()
                .zip(&before)
                .all(|(c, b)| c.echoes.load(Ordering::Relaxed) > b + 20);
            if moved {
                break;
            }
            if clients.iter().any(|c| c.handle.is_finished()) {
                bail!("an echo connection ended after the {part} restart");
            }
            if Instant::now() > deadline {
                bail!("echo connections stalled after the {part} restart");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A policy change takes effect: a new allow, then its removal.
        let name = format!("allow-later-{round}");
        k.apply(&json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": sns, "name": name},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": yns}}}],
                "ports": [{"protocol": "TCP", "port": ECHO_PORT}]}]}}))?;
        converge_reqs(&later_req, true).context("after the restart, a new allow")?;
        k.run(&["delete", "networkpolicy", "-n", sns, &name], None)?;
        converge_reqs(&later_req, false).context("after the restart, the allow removed")?;
        say(format!("restart: after the {part} restart the agent applied a policy change (and its removal); connections still echoing"));
    }
    Ok(())
}
