//! `sluice-cluster-bench` (`e2e/bench cluster`): end-to-end enforcement latency on the running
//! local cluster (`e2e/cluster up`): API write -> the new behaviour seen by packets on every
//! node, with a synthetic background (1k policies, 10k pods without network namespaces) in the
//! API server, next to a small baseline background measured first in the same run.
//!
//! Clients `cli-N` (namespace `sluice-bench-cli`) and servers `srv-N` (`sluice-bench-srv`) run on
//! every node (sluice-kubelet: real netns, flannel + sluice-cni). Client on node N probes the
//! server on node N+1, so each node enforces one ingress and the packets cross flannel's vxlan.
//! Probing: a thread per client inside its netns sends a fresh non-blocking TCP connect (new
//! socket, new source port, closed with RST) every `--interval-us`; an attempt is "allowed"
//! when the handshake completes and "denied" when the SYN gets no answer within
//! `--timeout-ms`. The enforcement instant of a client is the send time of the first of `--run`
//! consecutive attempts with the new behaviour; a trial's latency is the last client's instant
//! minus t0 (taken just before the API request, on the same monotonic clock).
//!
//! This is a benchmark, not a test: it exits 0 whether targets are met or not.
//! Cleanup: the bench's namespaces' pods and policies are deleted at the end (and on SIGINT /
//! SIGTERM); the background stays in the API server (`e2e/cluster down` removes everything).

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::WatchParams;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent};
use kube::{Client, ResourceExt as _};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use socket2::{Domain, Socket, Type};

use sluice_e2e::agent_bench::Percentiles;
use sluice_e2e::api_load::{created, kube_client, load_cluster, retry, LoadReport};
use sluice_e2e::cluster_bench::{counts, detect, move_address, Attempt, Detection, Outcome, Want};
use sluice_e2e::cluster_run::{self, Cluster};
use sluice_e2e::netns::enter_netns;
use sluice_e2e::synth::{SynthCluster, SynthConfig};

const SRV_NS: &str = "sluice-bench-srv";
const CLI_NS: &str = "sluice-bench-cli";
const PORT: u16 = 8080;
const IMAGE: &str = "registry.k8s.io/pause:3.10";
const TARGET_P99_MS: f64 = 100.0;
/// The longest wait for one change to show on every node.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// End-to-end enforcement latency on the local cluster (root; the cluster must be up).
///
/// Progress goes to stderr, the report to stdout.
#[derive(Parser)]
#[command(name = "e2e/bench cluster")]
struct Args {
    /// The cluster's state dir (default: $SLUICE_CLUSTER_DIR).
    #[arg(long, env = "SLUICE_CLUSTER_DIR")]
    cluster_dir: PathBuf,
    /// Background pods (Pod objects on nonexistent nodes, podIPs patched in; no netns).
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    #[arg(long, default_value_t = 300)]
    namespaces: usize,
    /// Synthetic (nonexistent) nodes the background pods are bound to.
    #[arg(long, default_value_t = 100)]
    synth_nodes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Trials per measurement.
    #[arg(long, default_value_t = 100)]
    trials: usize,
    #[arg(long, default_value_t = 100)]
    baseline_pods: usize,
    #[arg(long, default_value_t = 0)]
    baseline_policies: usize,
    #[arg(long, default_value_t = 10)]
    baseline_namespaces: usize,
    #[arg(long, default_value_t = 10)]
    baseline_synth_nodes: usize,
    /// Skip the baseline.
    #[arg(long)]
    no_baseline: bool,
    /// One connection attempt per client every this many microseconds.
    #[arg(long, default_value_t = 500)]
    interval_us: u64,
    /// An attempt without an answer after this long counts as dropped.
    #[arg(long, default_value_t = 200)]
    timeout_ms: u64,
    /// Consecutive attempts with the new behaviour that make it enforced.
    #[arg(long, default_value_t = 3)]
    run: usize,
    /// Pause between trials, in ms (plus 0-50 ms of random jitter).
    #[arg(long, default_value_t = 50)]
    gap_ms: u64,
    /// Concurrent API requests while loading the background.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Diagnosis: after setting up the measured pods, only probe (no policy, no write, no
    /// background) for this many seconds, then clean up. Shows what the probing alone costs
    /// the machine while you time something else, e.g. API requests.
    #[arg(long, value_name = "SECS")]
    probe_only: Option<u64>,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("sluice-cluster-bench: {}", msg.as_ref());
}

fn ms_since(epoch: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(epoch).as_secs_f64() * 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Probing: one thread per client, inside the client pod's netns.

type Log = Arc<Mutex<Vec<Attempt>>>;
/// Each client's detected attempt (index into its log), and the logs.
type Enforced = (Vec<Option<usize>>, Vec<Vec<Attempt>>);

struct Session {
    stop: Arc<AtomicBool>,
    logs: Vec<Log>,
    threads: Vec<JoinHandle<Result<()>>>,
}

struct ProbeCfg {
    interval: Duration,
    timeout: Duration,
    run: usize,
}

fn classify(sock: &Socket) -> Option<Outcome> {
    match sock.take_error() {
        Ok(Some(_)) | Err(_) => Some(Outcome::Refused),
        Ok(None) => match sock.peer_addr() {
            Ok(_) => Some(Outcome::Connected),
            Err(_) => None,
        },
    }
}

/// The epoll token of the send timer; attempts use their sequence number (from 1).
const TIMER_TOKEN: u64 = 0;

/// One thread's probing: a periodic timerfd paces the sends and epoll reports each attempt's
/// answer as it happens, so the thread sleeps between events. (Polling every pending socket
/// on a short tick cost up to half a core while attempts were being dropped, CPU the API
/// server shares on a small machine.)
fn probe_loop(
    epoch: Instant,
    target: SocketAddr,
    cfg: (Duration, Duration),
    stop: &AtomicBool,
    log: &Log,
) -> Result<()> {
    let (interval, timeout) = cfg;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )
    .context("timerfd_create")?;
    timer
        .set(
            Expiration::Interval(TimeSpec::from_duration(interval)),
            TimerSetTimeFlags::empty(),
        )
        .context("timerfd_settime")?;
    epoll
        .add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN))
        .context("epoll_ctl(timer)")?;
    // Pending attempts by sequence number: ascending = send order, so the oldest is first.
    let mut pending: BTreeMap<u64, (usize, Instant, Socket)> = BTreeMap::new();
    let mut seq = TIMER_TOKEN;
    let mut events = [EpollEvent::empty(); 256];
    let mut resolved: Vec<(usize, Outcome)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let n = match epoll.wait(&mut events, EpollTimeout::from(100u16)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e).context("epoll_wait"),
        };
        let mut send = false;
        for ev in &events[..n] {
            if ev.data() == TIMER_TOKEN {
                // Reading resets the expiration count; ticks missed while busy are not made up.
                let _ = timer.wait();
                send = true;
            } else if let Some((idx, sent, sock)) = pending.remove(&ev.data()) {
                match classify(&sock) {
                    Some(o) => resolved.push((idx, o)),
                    // Not settled yet (one-shot, so no new event): the timeout check decides.
                    None => {
                        pending.insert(ev.data(), (idx, sent, sock));
                    }
                }
            }
        }
        if send {
            let sock = Socket::new(
                Domain::for_address(target),
                Type::STREAM.nonblocking().cloexec(),
                None,
            )
            .context("socket")?;
            sock.set_linger(Some(Duration::ZERO)).context("SO_LINGER")?;
            let sent = Instant::now();
            let outcome = match sock.connect(&target.into()) {
                Ok(()) => Some(Outcome::Connected),
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => None,
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(_) => Some(Outcome::Refused),
            };
            let idx = {
                let mut l = log.lock().unwrap_or_else(PoisonError::into_inner);
                l.push(Attempt {
                    sent_ms: ms_since(epoch, sent),
                    outcome,
                });
                l.len() - 1
            };
            if outcome.is_none() {
                seq += 1;
                let flags = EpollFlags::EPOLLOUT | EpollFlags::EPOLLONESHOT;
                epoll
                    .add(&sock, EpollEvent::new(flags, seq))
                    .context("epoll_ctl(socket)")?;
                pending.insert(seq, (idx, sent, sock));
            }
        }
        // Attempts past the timeout, oldest first: a last look, then dropped.
        let now = Instant::now();
        while let Some(entry) = pending.first_entry() {
            if now.duration_since(entry.get().1) <= timeout {
                break;
            }
            let (idx, _, sock) = entry.remove();
            resolved.push((idx, classify(&sock).unwrap_or(Outcome::Timeout)));
        }
        if !resolved.is_empty() {
            let mut l = log.lock().unwrap_or_else(PoisonError::into_inner);
            for (idx, o) in resolved.drain(..) {
                l[idx].outcome = Some(o);
            }
        }
    }
    // Attempts still pending stay unresolved (the analysis ignores them past the run).
    Ok(())
}

impl Session {
    /// Starts probing: (client netns, target) pairs.
    fn start(epoch: Instant, pairs: &[(String, SocketAddr)], cfg: &ProbeCfg) -> Result<Session> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut logs = Vec::new();
        let mut threads = Vec::new();
        for (netns, target) in pairs {
            let log: Log = Arc::new(Mutex::new(Vec::with_capacity(8192)));
            let (stop2, log2, netns2, target) = (stop.clone(), log.clone(), netns.clone(), *target);
            let t = (cfg.interval, cfg.timeout);
            let h = std::thread::Builder::new()
                .name(format!("probe-{netns}"))
                .spawn(move || -> Result<()> {
                    enter_netns(&netns2)?;
                    probe_loop(epoch, target, t, &stop2, &log2)
                })
                .context("spawning a probe thread")?;
            logs.push(log);
            threads.push(h);
        }
        Ok(Session {
            stop,
            logs,
            threads,
        })
    }

    fn snapshot(&self, i: usize) -> Vec<Attempt> {
        self.logs[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn finish(self) -> Result<Vec<Vec<Attempt>>> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads {
            h.join().map_err(|_| anyhow!("probe thread panicked"))??;
        }
        Ok(self
            .logs
            .iter()
            .map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .collect())
    }
}

/// Probes until every client shows `want` (or the trial timeout), then a little longer so that
/// what was sent before the instant is resolved. Returns each client's instant (ms, epoch
/// clock) and the logs.
fn wait_enforced(
    session: Session,
    t0_ms: f64,
    want: Want,
    cfg: &ProbeCfg,
    epoch: Instant,
) -> Result<Enforced> {
    let deadline = Instant::now() + TRIAL_TIMEOUT;
    let n = session.logs.len();
    let settle = cfg.timeout + Duration::from_millis(10);
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let mut all = true;
        let mut last_found = 0.0f64;
        for i in 0..n {
            match detect(&session.snapshot(i), t0_ms, want, cfg.run) {
                Detection::Found { sent_ms, .. } => last_found = last_found.max(sent_ms),
                Detection::Pending => all = false,
            }
        }
        let now_ms = ms_since(epoch, Instant::now());
        if all && now_ms - last_found > settle.as_secs_f64() * 1000.0 {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let logs = session.finish()?;
    let found = logs
        .iter()
        .map(|l| match detect(l, t0_ms, want, cfg.run) {
            Detection::Found { index, .. } => Some(index),
            Detection::Pending => None,
        })
        .collect();
    Ok((found, logs))
}

// ---------------------------------------------------------------------------------------------
// The measured pods and the bench's watch on them.

/// When each pod of the servers' namespace first had a podIP (seen by the bench's watch).
type IpSeen = Arc<Mutex<BTreeMap<String, (Instant, IpAddr)>>>;

async fn watch_ips(api: Api<Pod>, seen: IpSeen) {
    loop {
        let Ok(list) = api.list(&ListParams::default()).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let record = |p: &Pod| {
            let ip = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse::<IpAddr>().ok());
            if let Some(ip) = ip {
                let now = Instant::now();
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(p.name_any())
                    .or_insert((now, ip));
            }
        };
        list.items.iter().for_each(record);
        let rv = list.metadata.resource_version.unwrap_or_default();
        let wp = WatchParams::default().timeout(290);
        let Ok(stream) = api.watch(&wp, &rv).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(WatchEvent::Added(p)) | Ok(WatchEvent::Modified(p)) => record(&p),
                Ok(WatchEvent::Deleted(p)) => {
                    seen.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&p.name_any());
                }
                Ok(WatchEvent::Error(_)) | Err(_) => break,
                _ => {}
            }
        }
    }
}

fn pod(ns: &str, name: &str, node: &str, labels: serde_json::Value) -> Result<Pod> {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": IMAGE,
                            "ports": [{"containerPort": PORT, "protocol": "TCP"}]}],
        },
    }))
    .context("pod object")
}

fn policy(name: &str, spec: serde_json::Value) -> Result<NetworkPolicy> {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": SRV_NS, "name": name},
        "spec": spec,
    }))
    .context("policy object")
}

/// Denies all ingress to every pod of the servers' namespace.
fn base_deny() -> Result<NetworkPolicy> {
    policy(
        "base-deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )
}

/// Denies ingress to the servers only (the first measurement, without base-deny).
fn deny_servers() -> Result<NetworkPolicy> {
    policy(
        "deny-servers",
        json!({"podSelector": {"matchLabels": {"role": "server"}}, "policyTypes": ["Ingress"]}),
    )
}

/// Allows the clients (pods role=client in namespaces access=yes) to the servers' port.
fn allow_clients() -> Result<NetworkPolicy> {
    policy(
        "allow-clients",
        json!({
            "podSelector": {"matchLabels": {"role": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"access": "yes"}},
                          "podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"protocol": "TCP", "port": PORT}],
            }],
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Trials

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    DenyCreate,
    DenyDelete,
    AllowCreate,
    AllowDelete,
    LabelRevoke,
    LabelGrant,
    PodReachable,
    PodIsolated,
}

impl Kind {
    fn title(self) -> &'static str {
        match self {
            Kind::DenyCreate => "policy create (deny) -> denied",
            Kind::DenyDelete => "policy delete (deny) -> allowed again",
            Kind::AllowCreate => "policy create (allow) -> allowed",
            Kind::AllowDelete => "policy delete (allow) -> revoked",
            Kind::LabelRevoke => "namespace label change -> revoked",
            Kind::LabelGrant => "namespace label change -> granted",
            Kind::PodReachable => "pod create -> reachable",
            Kind::PodIsolated => "pod create -> isolated (first denied probe)",
        }
    }
    const ALL: [Kind; 8] = [
        Kind::DenyCreate,
        Kind::DenyDelete,
        Kind::AllowCreate,
        Kind::AllowDelete,
        Kind::LabelRevoke,
        Kind::LabelGrant,
        Kind::PodReachable,
        Kind::PodIsolated,
    ];
}

#[derive(Clone, Debug, Default)]
struct Trial {
    /// t0 -> the last node's enforcement instant (None: not within the trial timeout).
    latency_ms: Option<f64>,
    /// t0 -> the API server's answer.
    api_ms: f64,
    /// Pod trials: t0 -> the pod's IP seen by the bench's watch.
    ip_ms: Option<f64>,
    early: usize,
    flaps: usize,
    drops: usize,
    refused: usize,
    /// Isolation trials: attempts answered (must be 0).
    answered: usize,
    attempts: usize,
}

struct Bench<'a> {
    args: &'a Args,
    rt: tokio::runtime::Runtime,
    client: Client,
    cluster: Cluster,
    epoch: Instant,
    cfg: ProbeCfg,
    ips: IpSeen,
    /// Node names, sorted.
    nodes: Vec<String>,
    rng: ChaCha8Rng,
    pod_counter: usize,
    stop: Arc<AtomicBool>,
}

impl Bench<'_> {
    fn now_ms(&self) -> f64 {
        ms_since(self.epoch, Instant::now())
    }

    fn pod_netns(&self, node: &str, ns: &str, name: &str) -> Result<String> {
        let n = self
            .cluster
            .nodes
            .get(node)
            .with_context(|| format!("no node {node} in cluster.json"))?;
        Ok(sluice_e2e::kubelet::pod_netns_name(
            &n.pod_netns_prefix,
            ns,
            name,
        ))
    }

    fn wait_ip(&self, name: &str, timeout: Duration) -> Result<(Instant, IpAddr)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self
                .ips
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(name)
            {
                return Ok(*v);
            }
            if Instant::now() > deadline {
                bail!("pod {name} has no IP after {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// The probing pairs: client on node i -> server on node i+1.
    fn pairs(&self) -> Result<Vec<(String, SocketAddr)>> {
        let n = self.nodes.len();
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let srv = format!("srv-{}", (i + 1) % n + 1);
            let (_, ip) = self.wait_ip(&srv, Duration::from_secs(1))?;
            out.push((
                self.pod_netns(node, CLI_NS, &format!("cli-{}", i + 1))?,
                SocketAddr::new(ip, PORT),
            ));
        }
        Ok(out)
    }

    fn setup(&mut self) -> Result<()> {
        progress(format!(
            "bench pods: a client and a server on each of {} nodes",
            self.nodes.len()
        ));
        let pp = PostParams::default();
        let client = self.client.clone();
        let nodes = self.nodes.clone();
        self.rt.block_on(async {
            for (ns, labels) in [
                (SRV_NS, json!({"bench": "server"})),
                (CLI_NS, json!({"bench": "client", "access": "yes"})),
            ] {
                let nsobj: Namespace = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "labels": labels},
                }))?;
                let api: Api<Namespace> = Api::all(client.clone());
                created(retry(|| api.create(&pp, &nsobj)).await)?;
                let sa: ServiceAccount = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"namespace": ns, "name": "default"},
                }))?;
                let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
                created(retry(|| api.create(&pp, &sa)).await)?;
            }
            for (i, node) in nodes.iter().enumerate() {
                let api: Api<Pod> = Api::namespaced(client.clone(), SRV_NS);
                let p = pod(
                    SRV_NS,
                    &format!("srv-{}", i + 1),
                    node,
                    json!({"role": "server"}),
                )?;
                created(retry(|| api.create(&pp, &p)).await)?;
                let api: Api<Pod> = Api::namespaced(client.clone(), CLI_NS);
                let p = pod(
                    CLI_NS,
                    &format!("cli-{}", i + 1),
                    node,
                    json!({"role": "client"}),
                )?;
                created(retry(|| api.create(&pp, &p)).await)?;
            }
            anyhow::Ok(())
        })?;
        // Wait for the servers' IPs (the bench's watch) and the clients' Running phase.
        for i in 0..self.nodes.len() {
            self.wait_ip(&format!("srv-{}", i + 1), Duration::from_secs(120))?;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), CLI_NS);
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..self.nodes.len() {
            let name = format!("cli-{}", i + 1);
            loop {
                let p = self.rt.block_on(api.get(&name))?;
                if p.status.and_then(|s| s.pod_ip).is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("client {name} not running after 120 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Deletes the bench's pods and policies (not the namespaces: nothing finalizes them).
    fn teardown(&self) -> Result<()> {
        let client = self.client.clone();
        self.rt.block_on(async {
            for ns in [SRV_NS, CLI_NS] {
                let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
                let _ = api
                    .delete_collection(&DeleteParams::default(), &ListParams::default())
                    .await;
                let api: Api<Pod> = Api::namespaced(client.clone(), ns);
                let _ = api
                    .delete_collection(&DeleteParams::default(), &ListParams::default())
                    .await;
            }
            let api: Api<Namespace> = Api::all(client.clone());
            let patch = Patch::Merge(json!({"metadata": {"labels": {"access": "yes"}}}));
            let _ = api.patch(CLI_NS, &PatchParams::default(), &patch).await;
        });
        Ok(())
    }

    fn gap(&mut self) {
        let jitter = self.rng.random_range(0..50);
        std::thread::sleep(Duration::from_millis(self.args.gap_ms + jitter));
    }

    /// One policy/label trial: probing starts, `write` runs at t0, the new behaviour `want` is
    /// awaited on every pair.
    fn change_trial<F, Fut>(&mut self, want: Want, write: F) -> Result<Trial>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), kube::Error>>,
    {
        let pairs = self.pairs()?;
        let session = Session::start(self.epoch, &pairs, &self.cfg)?;
        // Some attempts in the old state first.
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        let t0_ms = ms_since(self.epoch, t0);
        let r = self.rt.block_on(write(self.client.clone()));
        let api_ms = self.now_ms() - t0_ms;
        if let Err(e) = r {
            let _ = session.finish();
            return Err(e).context("the API write");
        }
        let (found, logs) = wait_enforced(session, t0_ms, want, &self.cfg, self.epoch)?;
        Ok(summarize(&found, &logs, t0_ms, want, api_ms, None))
    }

    /// One pod trial: create a pod at t0 on `node`, probe it from every client once its IP is
    /// known, wait for `want` (or, isolated, probe for a while and count answers).
    fn pod_trial(&mut self, want: Want) -> Result<Trial> {
        self.pod_counter += 1;
        let n = self.pod_counter;
        let node = self.nodes[n % self.nodes.len()].clone();
        let (name, role) = match want {
            Want::Allowed => (format!("reach-{n}"), "server"),
            Want::Denied => (format!("iso-{n}"), "isolated"),
        };
        let p = pod(SRV_NS, &name, &node, json!({"role": role}))?;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), SRV_NS);
        let t0 = Instant::now();
        let t0_ms = ms_since(self.epoch, t0);
        self.rt
            .block_on(api.create(&PostParams::default(), &p))
            .context("creating a pod")?;
        let api_ms = self.now_ms() - t0_ms;
        let (ip_at, ip) = self.wait_ip(&name, Duration::from_secs(60))?;
        let ip_ms = ms_since(self.epoch, ip_at) - t0_ms;
        let pairs: Vec<(String, SocketAddr)> = (0..self.nodes.len())
            .map(|i| {
                Ok((
                    self.pod_netns(&self.nodes[i], CLI_NS, &format!("cli-{}", i + 1))?,
                    SocketAddr::new(ip, PORT),
                ))
            })
            .collect::<Result<_>>()?;
        let session = Session::start(self.epoch, &pairs, &self.cfg)?;
        let trial = match want {
            Want::Allowed => {
                let (found, logs) = wait_enforced(session, t0_ms, want, &self.cfg, self.epoch)?;
                summarize(&found, &logs, t0_ms, want, api_ms, Some(ip_ms))
            }
            Want::Denied => {
                std::thread::sleep(self.cfg.timeout + Duration::from_millis(100));
                let logs = session.finish()?;
                // Isolation from the first packet: no attempt may be answered. The instant is
                // the first attempt's (every one is a drop when isolated).
                let mut t = Trial {
                    api_ms,
                    ip_ms: Some(ip_ms),
                    ..Trial::default()
                };
                let mut last = 0.0f64;
                let mut ok = true;
                for l in &logs {
                    let c = counts(l, t0_ms, want, None);
                    t.answered += c.answered;
                    t.attempts += l.len();
                    match l.iter().find(|a| a.outcome == Some(Outcome::Timeout)) {
                        Some(a) => last = last.max(a.sent_ms - t0_ms),
                        None => ok = false,
                    }
                }
                t.latency_ms = ok.then_some(last);
                t
            }
        };
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        let _ = self.rt.block_on(api.delete(&name, &dp));
        Ok(trial)
    }

    fn policy_api(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.client.clone(), SRV_NS)
    }

    fn create_policy(&mut self, p: NetworkPolicy, want: Want) -> Result<Trial> {
        self.change_trial(want, move |c| async move {
            let api: Api<NetworkPolicy> = Api::namespaced(c, SRV_NS);
            api.create(&PostParams::default(), &p).await.map(|_| ())
        })
    }

    fn delete_policy(&mut self, name: &str, want: Want) -> Result<Trial> {
        let name = name.to_string();
        self.change_trial(want, move |c| async move {
            let api: Api<NetworkPolicy> = Api::namespaced(c, SRV_NS);
            api.delete(&name, &DeleteParams::default())
                .await
                .map(|_| ())
        })
    }

    fn label(&mut self, access: &str, want: Want) -> Result<Trial> {
        let access = access.to_string();
        self.change_trial(want, move |c| async move {
            let api: Api<Namespace> = Api::all(c);
            let patch = Patch::Merge(json!({"metadata": {"labels": {"access": access}}}));
            api.patch(CLI_NS, &PatchParams::default(), &patch)
                .await
                .map(|_| ())
        })
    }

    fn record(
        &mut self,
        out: &mut BTreeMap<Kind, Vec<Trial>>,
        kind: Kind,
        i: usize,
        t: Trial,
    ) -> Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let trials = self.args.trials;
        if i.is_multiple_of(10) || i == trials || t.latency_ms.is_none() {
            progress(format!(
                "  {} trial {i}/{trials}: {} (api {:.1} ms{})",
                kind.title(),
                t.latency_ms
                    .map(|v| format!("{v:.2} ms"))
                    .unwrap_or_else(|| "NOT SEEN".into()),
                t.api_ms,
                t.ip_ms
                    .map(|v| format!(", ip {v:.1} ms"))
                    .unwrap_or_default()
            ));
        }
        out.entry(kind).or_default().push(t);
        self.gap();
        Ok(())
    }

    /// Every measurement, `--trials` each, in the current background.
    fn run_all(&mut self) -> Result<BTreeMap<Kind, Vec<Trial>>> {
        let trials = self.args.trials;
        let mut out = BTreeMap::new();
        let api = self.policy_api();
        // Start from no policy in the servers' namespace, clients' namespace access=yes.
        self.rt.block_on(async {
            let _ = api
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await;
        });
        let _ = self.label("yes", Want::Allowed)?;
        progress("deny create / delete (no other policy in the servers' namespace)");
        for i in 1..=trials {
            let t = self.create_policy(deny_servers()?, Want::Denied)?;
            self.record(&mut out, Kind::DenyCreate, i, t)?;
            let t = self.delete_policy("deny-servers", Want::Allowed)?;
            self.record(&mut out, Kind::DenyDelete, i, t)?;
        }
        progress("allow create / delete (on top of base-deny)");
        let _ = self.create_policy(base_deny()?, Want::Denied)?;
        for i in 1..=trials {
            let t = self.create_policy(allow_clients()?, Want::Allowed)?;
            self.record(&mut out, Kind::AllowCreate, i, t)?;
            let t = self.delete_policy("allow-clients", Want::Denied)?;
            self.record(&mut out, Kind::AllowDelete, i, t)?;
        }
        progress("namespace label change (base-deny + allow-clients)");
        let _ = self.create_policy(allow_clients()?, Want::Allowed)?;
        for i in 1..=trials {
            let t = self.label("no", Want::Denied)?;
            self.record(&mut out, Kind::LabelRevoke, i, t)?;
            let t = self.label("yes", Want::Allowed)?;
            self.record(&mut out, Kind::LabelGrant, i, t)?;
        }
        progress("pod create -> reachable / isolated (base-deny + allow-clients)");
        for i in 1..=trials {
            let t = self.pod_trial(Want::Allowed)?;
            self.record(&mut out, Kind::PodReachable, i, t)?;
            let t = self.pod_trial(Want::Denied)?;
            self.record(&mut out, Kind::PodIsolated, i, t)?;
        }
        // Leave the namespace without policies for the next background.
        self.rt.block_on(async {
            let _ = api
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await;
        });
        std::thread::sleep(Duration::from_millis(500));
        Ok(out)
    }
}

fn summarize(
    found: &[Option<usize>],
    logs: &[Vec<Attempt>],
    t0_ms: f64,
    want: Want,
    api_ms: f64,
    ip_ms: Option<f64>,
) -> Trial {
    let mut t = Trial {
        api_ms,
        ip_ms,
        ..Trial::default()
    };
    let mut last = Some(0.0f64);
    for (f, l) in found.iter().zip(logs) {
        let c = counts(l, t0_ms, want, *f);
        t.early += c.early;
        t.flaps += c.flaps;
        t.drops += c.drops;
        t.refused += c.refused;
        t.answered += c.answered;
        t.attempts += l.len();
        last = match (last, f) {
            (Some(m), Some(i)) => Some(m.max(l[*i].sent_ms - t0_ms)),
            _ => None,
        };
    }
    t.latency_ms = last;
    t
}

// ---------------------------------------------------------------------------------------------
// The agents' own account (their /metrics): event seen -> nft transaction, compile, apply.

/// Each node's (netns, agent address) from cluster.json.
fn agent_addresses(dir: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(dir.join("cluster.json")).context("cluster.json")?;
    let v: serde_json::Value = serde_json::from_str(&text).context("cluster.json")?;
    Ok(v["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|n| {
            Some((
                n["netns"].as_str()?.to_string(),
                n["agentAddress"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// The sums and counts of the agents' histograms, added over every node.
fn agent_metrics(agents: &[(String, String)]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (netns, addr) in agents {
        let got = sluice_e2e::netns::in_netns(netns, || {
            sluice_e2e::probe::http_get(addr, "/metrics", Duration::from_secs(5))
        });
        let Ok(Ok((_, body))) = got else { continue };
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if !(name.ends_with("_sum") || name.contains("_sum{") || name.contains("_count")) {
                continue;
            }
            if let Ok(v) = value.parse::<f64>() {
                *out.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
    }
    out
}

/// Mean milliseconds of a histogram between two scrapes.
fn metric_mean_ms(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    name: &str,
    labels: &str,
) -> Option<(f64, f64)> {
    let d = |suffix: &str| {
        let k = format!("{name}_{suffix}{labels}");
        after.get(&k).copied().unwrap_or(0.0) - before.get(&k).copied().unwrap_or(0.0)
    };
    let (sum, count) = (d("sum"), d("count"));
    (count > 0.0).then(|| (sum / count * 1000.0, count))
}

// ---------------------------------------------------------------------------------------------
// Backgrounds

/// The synthetic cluster with its pods' addresses moved to 10.`second`.0.0/16 (out of the real
/// cluster's pod range) and, with `prefix`, its namespaces renamed (so that two backgrounds
/// never share an object).
fn background(config: &SynthConfig, second: u8, prefix: &str) -> Result<SynthCluster> {
    let mut c = SynthCluster::generate(config)?;
    for p in &mut c.pods {
        if let Some(s) = p.status.as_mut() {
            if let Some(ip) = s.pod_ip.as_mut() {
                *ip = move_address(ip.parse()?, second).to_string();
            }
            for pip in s.pod_ips.iter_mut().flatten() {
                pip.ip = move_address(pip.ip.parse()?, second).to_string();
            }
        }
    }
    if !prefix.is_empty() {
        let rename = |s: &mut Option<String>| {
            if let Some(n) = s.as_mut() {
                *n = format!("{prefix}{n}");
            }
        };
        for ns in &mut c.namespaces {
            rename(&mut ns.metadata.name);
            let name = ns.metadata.name.clone().unwrap_or_default();
            if let Some(l) = ns.metadata.labels.as_mut() {
                if l.contains_key(sluice::model::NAMESPACE_NAME_LABEL) {
                    l.insert(sluice::model::NAMESPACE_NAME_LABEL.to_string(), name);
                }
            }
        }
        for p in &mut c.pods {
            rename(&mut p.metadata.namespace);
        }
        for p in &mut c.policies {
            rename(&mut p.metadata.namespace);
        }
    }
    Ok(c)
}

struct Phase {
    label: String,
    pods: usize,
    policies: usize,
    load: Option<LoadReport>,
    loadavg: String,
    trials: BTreeMap<Kind, Vec<Trial>>,
    /// The agents' histograms over the trials: (name, mean ms, observations).
    agents: Vec<(String, f64, f64)>,
}

fn phase(
    bench: &mut Bench<'_>,
    label: &str,
    config: SynthConfig,
    second: u8,
    prefix: &str,
) -> Result<Phase> {
    let loadavg_before = loadavg();
    let load = if config.pods + config.policies > 0 {
        let c = background(&config, second, prefix)?;
        progress(format!(
            "{label}: {} pods on {} synthetic nodes, {} policies, {} namespaces",
            c.pods.len(),
            c.nodes.len(),
            c.policies.len(),
            c.namespaces.len()
        ));
        let r = bench
            .rt
            .block_on(load_cluster(&bench.client, &c, bench.args.concurrency))?;
        // Let the agents take it all in.
        std::thread::sleep(Duration::from_secs(5));
        Some(r)
    } else {
        None
    };
    progress(format!("{label}: trials (load average {loadavg_before})"));
    let agents = agent_addresses(&bench.args.cluster_dir)?;
    let before = agent_metrics(&agents);
    let trials = bench.run_all()?;
    let after = agent_metrics(&agents);
    let agents = [
        (
            "event -> nft transaction",
            "sluice_programming_latency_seconds",
            "",
        ),
        (
            "compile",
            "sluice_sync_duration_seconds",
            "{phase=\"compile\"}",
        ),
        ("apply", "sluice_sync_duration_seconds", "{phase=\"apply\"}"),
        ("CNI ADD", "sluice_cni_add_seconds", ""),
    ]
    .iter()
    .filter_map(|(what, name, labels)| {
        metric_mean_ms(&before, &after, name, labels).map(|(m, n)| (what.to_string(), m, n))
    })
    .collect();
    Ok(Phase {
        agents,
        label: label.to_string(),
        pods: config.pods,
        policies: config.policies,
        load,
        loadavg: format!("{loadavg_before} -> {}", loadavg()),
        trials,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn fmt_p(p: &Option<Percentiles>) -> String {
    match p {
        Some(p) => format!(
            "{:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            p.p50, p.p90, p.p99, p.max
        ),
        None => format!("{:>8} {:>8} {:>8} {:>8}", "-", "-", "-", "-"),
    }
}

fn print_report(args: &Args, phases: &[Phase]) {
    println!(
        "enforcement latency on the local cluster: {} nodes, probes every {} us per client, \
         drop = no answer in {} ms, enforced = first of {} in a row; ms from just before the API request",
        3, args.interval_us, args.timeout_ms, args.run
    );
    for ph in phases {
        println!();
        println!(
            "## {}: {} background pods, {} background policies; load average {}",
            ph.label, ph.pods, ph.policies, ph.loadavg
        );
        for (what, mean, n) in &ph.agents {
            println!("agents (all nodes), {what}: mean {mean:.2} ms over {n} observations");
        }
        if let Some(l) = &ph.load {
            println!("loaded in {:.1} s ({:.0} pods/s)", l.total_s, l.pods_per_s);
        }
        println!(
            "{:<46} {:>4} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>9} {:>9} {:>8} | early flaps drops refused answered",
            "measurement", "n", "p50", "p90", "p99", "max", "api p50", "api p99", "-api p50", "-api p99", "ip p50"
        );
        for k in Kind::ALL {
            let Some(ts) = ph.trials.get(&k) else {
                continue;
            };
            let lat: Vec<f64> = ts.iter().filter_map(|t| t.latency_ms).collect();
            let api: Vec<f64> = ts.iter().map(|t| t.api_ms).collect();
            // What follows the API server's answer: watch delivery, the agents, the kernel.
            let after: Vec<f64> = ts
                .iter()
                .filter_map(|t| t.latency_ms.map(|l| l - t.api_ms))
                .collect();
            let ip: Vec<f64> = ts.iter().filter_map(|t| t.ip_ms).collect();
            let sum = |f: fn(&Trial) -> usize| ts.iter().map(f).sum::<usize>();
            let missing = ts.len() - lat.len();
            let (api_p, after_p) = (Percentiles::of(&api), Percentiles::of(&after));
            println!(
                "{:<46} {:>4} {} | {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>8} | {} {} {} {} {}{}",
                k.title(),
                lat.len(),
                fmt_p(&Percentiles::of(&lat)),
                api_p.as_ref().map(|p| p.p50).unwrap_or(f64::NAN),
                api_p.as_ref().map(|p| p.p99).unwrap_or(f64::NAN),
                after_p.as_ref().map(|p| p.p50).unwrap_or(f64::NAN),
                after_p.as_ref().map(|p| p.p99).unwrap_or(f64::NAN),
                Percentiles::of(&ip)
                    .map(|p| format!("{:.2}", p.p50))
                    .unwrap_or_else(|| "-".into()),
                sum(|t| t.early),
                sum(|t| t.flaps),
                sum(|t| t.drops),
                sum(|t| t.refused),
                sum(|t| t.answered),
                if missing > 0 {
                    format!("  ({missing} not seen in {TRIAL_TIMEOUT:?})")
                } else {
                    String::new()
                }
            );
        }
    }
    if phases.len() == 2 {
        let (b, m) = (&phases[0], &phases[1]);
        println!();
        println!(
            "## {} vs {}: ratios, and the {TARGET_P99_MS} ms p99 target",
            m.label, b.label
        );
        println!(
            "{:<46} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>9} {:>7}",
            "measurement",
            "base p50",
            "p50",
            "base p99",
            "p99",
            "x p50",
            "x p99",
            "target",
            "-api p99",
            "target"
        );
        for k in Kind::ALL {
            let p = |ph: &Phase| {
                ph.trials.get(&k).and_then(|ts| {
                    Percentiles::of(&ts.iter().filter_map(|t| t.latency_ms).collect::<Vec<_>>())
                })
            };
            let (Some(pb), Some(pm)) = (p(b), p(m)) else {
                continue;
            };
            // The same target on what follows the API's answer: the control plane's own write
            // latency (etcd's fsync on this VM's disk) taken out.
            let after = m.trials.get(&k).and_then(|ts| {
                Percentiles::of(
                    &ts.iter()
                        .filter_map(|t| t.latency_ms.map(|l| l - t.api_ms))
                        .collect::<Vec<_>>(),
                )
            });
            // The targets are for policy and label changes; a new pod's time is mostly the
            // kubelet's (sandbox, CNI ADD, status patch).
            let targeted = !matches!(k, Kind::PodReachable | Kind::PodIsolated);
            let verdict = |p99: f64| match (targeted, p99 < TARGET_P99_MS) {
                (false, _) => "n/a",
                (true, true) => "met",
                (true, false) => "MISSED",
            };
            let after_p99 = after.map(|p| p.p99).unwrap_or(f64::NAN);
            println!(
                "{:<46} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7.2} {:>7.2} {:>7} {:>9.2} {:>7}",
                k.title(),
                pb.p50,
                pm.p50,
                pb.p99,
                pm.p99,
                pm.p50 / pb.p50,
                pm.p99 / pb.p99,
                verdict(pm.p99),
                after_p99,
                verdict(after_p99),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn run(args: &Args) -> Result<()> {
    let cluster = cluster_run::load_cluster(&args.cluster_dir).map_err(|e| anyhow!(e))?;
    let nodes: Vec<String> = cluster.nodes.keys().cloned().collect();
    if nodes.len() < 2 {
        bail!("need at least 2 nodes, the cluster has {}", nodes.len());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let client = rt.block_on(kube_client(&cluster.kubeconfig))?;
    let ips: IpSeen = Arc::default();
    rt.spawn(watch_ips(
        Api::namespaced(client.clone(), SRV_NS),
        ips.clone(),
    ));
    let mut bench = Bench {
        args,
        rt,
        client,
        cluster,
        epoch: Instant::now(),
        cfg: ProbeCfg {
            interval: Duration::from_micros(args.interval_us),
            timeout: Duration::from_millis(args.timeout_ms),
            run: args.run,
        },
        ips,
        nodes,
        rng: ChaCha8Rng::seed_from_u64(args.seed),
        pod_counter: 0,
        stop: cluster_run::stop_flag()?,
    };
    let stop = bench.stop.clone();
    let result = (|| -> Result<Vec<Phase>> {
        bench.setup()?;
        let mut phases = Vec::new();
        if let Some(secs) = args.probe_only {
            progress(format!("probing only, for {secs} s"));
            let session = Session::start(bench.epoch, &bench.pairs()?, &bench.cfg)?;
            std::thread::sleep(Duration::from_secs(secs));
            let logs = session.finish()?;
            let all = logs.iter().flatten();
            let connected = all
                .clone()
                .filter(|a| a.outcome == Some(Outcome::Connected))
                .count();
            progress(format!("{} attempts, {connected} connected", all.count()));
            return Ok(phases);
        }
        if !args.no_baseline {
            let config = SynthConfig {
                pods: args.baseline_pods,
                policies: args.baseline_policies,
                nodes: args.baseline_synth_nodes,
                namespaces: args.baseline_namespaces,
                seed: args.seed,
            };
            phases.push(phase(&mut bench, "baseline", config, 251, "base-")?);
            if stop.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
        }
        let config = SynthConfig {
            pods: args.pods,
            policies: args.policies,
            nodes: args.synth_nodes,
            namespaces: args.namespaces,
            seed: args.seed,
        };
        phases.push(phase(&mut bench, "measured", config, 250, "")?);
        Ok(phases)
    })();
    let _ = bench.teardown();
    let phases = result?;
    if args.probe_only.is_none() {
        print_report(args, &phases);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            progress(format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
