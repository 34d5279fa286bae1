//! `sluice-dataplane-bench` (`e2e/bench dataplane`): what sluice costs per packet on the local
//! cluster's real dataplane (e2e/CLUSTER.md: flannel vxlan, kube-proxy, per node a netns), next to
//! the same topology without any policy engine, alternating in rounds:
//!
//! - (a) no engine: the plain cluster's agents stopped, `table inet sluice` and `table bridge
//!   sluice` deleted in every node namespace;
//! - (b) sluice, empty policy set: the plain cluster's agents running, no NetworkPolicy;
//! - (a-loaded) no engine on the loaded cluster, made as (a) (and kube-router stopped and cleaned
//!   up): the baseline of (c) and kube-router, so that no ratio mixes two clusters;
//! - (c) sluice with the loaded cluster's background (a synthetic 10k-pod cluster, `synth.rs`,
//!   loaded through the API with `api_load.rs`; N of its policies, the sweep) and the measured
//!   pods selected by several policies (`dataplane_bench::measured_policies`);
//! - optionally `kube-router`: kube-router's network policy controller (policy only) on the
//!   loaded cluster instead of sluice, same policies.
//!
//! Between client and server pods on one node and on two nodes it measures new TCP connections
//! per second (several client threads: connect, read the server's one-line answer, close),
//! request/response latency on one open connection (1 byte each way) and one stream's
//! throughput. Clients and servers are threads of this process inside the pods' network
//! namespaces (`setns`). Medians over rounds, each configuration relative to the no-engine run on
//! its own cluster (`dataplane_bench::baseline_of`); (a-loaded) relative to (a) is how much the
//! two clusters differ.
//!
//! This is a benchmark, not a test: it exits 0 whether targets are met or not.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde::Serialize;

use sluice_e2e::agent_bench::Percentiles;
use sluice_e2e::api_load::{created, each, kube_client, load_cluster, retry};
use sluice_e2e::cluster_run::{load_cluster as load_cluster_json, Cluster, Kubectl};
use sluice_e2e::dataplane_bench::{
    baseline_of, filter_table_is_kube_routers_only, measured_objects, measured_policies,
    on_loaded_cluster, summarize, sweep_table, table, Metric, Sample, CLIENT, CONFIGS, NAMESPACE,
    RR_PORT, SERVER_CROSS, SERVER_SAME, SERVE_PORT, STREAM_PORT,
};
use sluice_e2e::netns::enter_netns;
use sluice_e2e::synth::{SynthCluster, SynthConfig};

/// Dataplane cost of sluice on the local cluster, side by side with no engine (and kube-router).
///
/// Needs root and two local clusters up (`e2e/cluster up --nodes 2` with two SLUICE_CLUSTER_IDs):
/// the plain one for (a) and (b), the loaded one for (a-loaded), (c) and kube-router. Progress on
/// stderr, the report (Markdown) on stdout.
#[derive(Parser)]
#[command(name = "e2e/bench dataplane")]
struct Args {
    /// SLUICE_CLUSTER_ID of the plain cluster: (a) and (b).
    #[arg(long, default_value_t = 7)]
    plain: u8,
    /// SLUICE_CLUSTER_ID of the loaded cluster: (a-loaded), (c) (and kube-router).
    #[arg(long, default_value_t = 8)]
    loaded: u8,
    /// Background policies in the loaded cluster, one sweep point each (rounds at every point).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    policies: Vec<usize>,
    /// Background pods (bound to nodes that do not exist: only in the index).
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 300)]
    namespaces: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rounds per sweep point; each round runs every configuration once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Configurations, in the order of a round: a, b, a-loaded, c, kube-router. Each is compared
    /// with the no-engine run on its own cluster in the same round ((b) with (a); (c) and
    /// kube-router with (a-loaded)), and (a-loaded) with (a).
    #[arg(long, value_delimiter = ',', default_value = "a,b,a-loaded,c")]
    configs: Vec<String>,
    /// Client threads of the connection-rate test.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 3.0)]
    conn_secs: f64,
    #[arg(long, default_value_t = 2.0)]
    rr_secs: f64,
    #[arg(long, default_value_t = 2.0)]
    stream_secs: f64,
    /// kube-router binary (for the `kube-router` configuration; `e2e/kube-router path`).
    #[arg(long)]
    kube_router: Option<PathBuf>,
    /// Also write every sample and the machine details as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("sluice-dataplane-bench: {}", msg.as_ref());
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cmd_out(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(netns: &str, args: &[&str]) -> Result<String> {
    cmd_out(Command::new("ip").args(["netns", "exec", netns]).args(args))
}

// ---------------------------------------------------------------------------------------------
// A local cluster (e2e/cluster) and what the bench does to it.

struct LocalCluster {
    id: u8,
    dir: PathBuf,
    json: Cluster,
    /// node name -> node netns, sorted.
    node_ns: Vec<(String, String)>,
    nodes: usize,
    /// Pod IPs of the measured pods.
    ips: BTreeMap<String, Ipv4Addr>,
    kubeconfig: PathBuf,
}

impl LocalCluster {
    fn open(id: u8) -> Result<LocalCluster> {
        let dir = PathBuf::from(format!("/tmp/sluice-cluster-{id}"));
        let json = load_cluster_json(&dir).map_err(|e| {
            anyhow!("{e} (start it with: SLUICE_CLUSTER_ID={id} e2e/cluster up --nodes 2)")
        })?;
        let node_ns: Vec<(String, String)> = json
            .nodes
            .iter()
            .map(|(n, c)| (n.clone(), c.netns.clone()))
            .collect();
        if node_ns.len() < 2 {
            bail!(
                "cluster {id} has {} node(s); the bench needs 2",
                node_ns.len()
            );
        }
        Ok(LocalCluster {
            id,
            kubeconfig: json.kubeconfig.clone(),
            nodes: node_ns.len(),
            dir,
            json,
            node_ns,
            ips: BTreeMap::new(),
        })
    }

    fn kubectl(&self) -> Kubectl {
        Kubectl::new(&self.json)
    }

    fn pod_netns(&self, name: &str) -> Result<String> {
        let node = if name == SERVER_CROSS {
            &self.node_ns[1].0
        } else {
            &self.node_ns[0].0
        };
        let prefix = &self.json.nodes[node].pod_netns_prefix;
        Ok(format!("{prefix}{NAMESPACE}.{name}"))
    }

    /// Creates the measured namespace and pods (idempotent) and waits for their IPs and netns.
    fn measured_pods(&mut self, policies: bool) -> Result<()> {
        let k = self.kubectl();
        let objects = measured_objects(&self.node_ns[0].0, &self.node_ns[1].0);
        for o in &objects {
            k.apply(o)?;
        }
        if policies {
            for p in measured_policies("10.244.0.0/16") {
                k.apply(&p)?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = k.get_json(&["pods", "-n", NAMESPACE])?;
            let mut ips = BTreeMap::new();
            for p in list["items"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let name = p["metadata"]["name"].as_str().unwrap_or_default();
                if let Some(ip) = p["status"]["podIP"].as_str() {
                    if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                        ips.insert(name.to_string(), ip);
                    }
                }
            }
            let all = [CLIENT, SERVER_SAME, SERVER_CROSS];
            if all.iter().all(|n| ips.contains_key(*n))
                && all.iter().all(|n| {
                    self.pod_netns(n)
                        .is_ok_and(|ns| Path::new("/run/netns").join(ns).exists())
                })
            {
                self.ips = ips;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "cluster {}: the measured pods have no IP/netns after 60 s: {ips:?}",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn agent_pid(&self, node: &str) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.dir.join("nodes").join(node).join("agent.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    fn sluice_tables(&self, netns: &str) -> Result<Vec<String>> {
        Ok(in_ns(netns, &["nft", "list", "tables"])?
            .lines()
            .filter(|l| l.ends_with(" sluice"))
            .map(str::to_string)
            .collect())
    }

    /// No engine: kube-router stopped and cleaned up (`bin`, when it may have run), sluice's
    /// agents stopped, both sluice tables deleted; checked gone, and no kube-router policy chain
    /// left.
    fn no_engine(&self, kube_router: Option<&Path>) -> Result<()> {
        self.stop_kube_router(kube_router);
        for (node, netns) in &self.node_ns {
            if let Some(pid) = self.agent_pid(node) {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            for t in self.sluice_tables(netns)? {
                in_ns(netns, &["nft", "delete", &t["table ".len()..]])
                    .map(|_| ())
                    .or_else(|e| {
                        in_ns(netns, &["nft", &format!("delete {t}")])
                            .map(|_| ())
                            .map_err(|_| e)
                    })?;
            }
            let left = self.sluice_tables(netns)?;
            if !left.is_empty() {
                bail!("{netns}: still has {left:?}");
            }
            let rules = in_ns(netns, &["iptables-save"]).unwrap_or_default();
            if rules.contains(":KUBE-") {
                bail!("{netns}: kube-router's chains are still there (iptables-save)");
            }
        }
        Ok(())
    }

    /// Sluice running on every node (started again by `e2e/cluster up` if stopped), its tables
    /// present and `/readyz` 200.
    fn sluice(&self) -> Result<()> {
        if self
            .node_ns
            .iter()
            .any(|(n, _)| self.agent_pid(n).is_none())
        {
            cmd_out(
                Command::new(repo_root().join("e2e/cluster"))
                    .args(["up", "--nodes", &self.nodes.to_string()])
                    .env("SLUICE_CLUSTER_ID", self.id.to_string())
                    .env("SLUICE_CLUSTER_NO_BUILD", "1"),
            )
            .with_context(|| format!("starting cluster {}'s agents again", self.id))?;
        }
        for (node, netns) in &self.node_ns {
            let ready = in_ns(
                netns,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                    "http://127.0.0.1:9763/readyz",
                ],
            )
            .unwrap_or_default();
            if ready.trim() != "200" {
                bail!("cluster {}: {node}'s agent /readyz says {ready:?}", self.id);
            }
            if !self
                .sluice_tables(netns)?
                .iter()
                .any(|t| t == "table inet sluice")
            {
                bail!("cluster {}: {netns} has no table inet sluice", self.id);
            }
        }
        Ok(())
    }

    fn kube_router_pid(&self, node: &str) -> Option<i32> {
        let path = self.dir.join("nodes").join(node).join("kube-router.pid");
        let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// kube-router's network policy controller alone on every node: sluice's agents stopped and
    /// its tables deleted ([`LocalCluster::no_engine`]), then kube-router started in each node
    /// namespace, ready when its pod firewall chains for the measured pods are in place.
    fn kube_router(&self, bin: &Path) -> Result<()> {
        if self
            .node_ns
            .iter()
            .all(|(n, _)| self.kube_router_pid(n).is_some())
        {
            return Ok(());
        }
        self.no_engine(Some(bin))?;
        for (node, netns) in &self.node_ns {
            if self.kube_router_pid(node).is_some() {
                continue;
            }
            let dir = self.dir.join("nodes").join(node);
            let log = std::fs::File::create(dir.join("kube-router.log"))?;
            let child = Command::new("ip")
                .args(["netns", "exec", netns])
                .arg(bin)
                .args([
                    "--run-firewall=true",
                    "--run-router=false",
                    "--run-service-proxy=false",
                    "--enable-ipv4=true",
                    "--enable-ipv6=false",
                    "--metrics-port=0",
                    "--service-cluster-ip-range=10.96.0.0/16",
                    "--health-port=0",
                    "--v=1",
                ])
                .arg(format!("--hostname-override={node}"))
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            std::fs::write(dir.join("kube-router.pid"), child.id().to_string())?;
        }
        let started = Instant::now();
        for (node, netns) in &self.node_ns {
            loop {
                let rules = in_ns(netns, &["iptables-save"]).unwrap_or_default();
                if rules.contains(":KUBE-POD-FW-") && rules.contains("KUBE-NWPLCY-") {
                    break;
                }
                if self.kube_router_pid(node).is_none() {
                    bail!(
                        "cluster {}: kube-router on {node} exited; see {}",
                        self.id,
                        self.dir
                            .join("nodes")
                            .join(node)
                            .join("kube-router.log")
                            .display()
                    );
                }
                if started.elapsed() > Duration::from_secs(120) {
                    bail!(
                        "cluster {}: kube-router on {node}: no pod firewall chains in 120 s",
                        self.id
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        // A full sync is in place; let it finish its last writes.
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    }

    /// Stops kube-router on every node and removes what it made (`kube-router --cleanup-config`).
    fn stop_kube_router(&self, bin: Option<&Path>) {
        let mut any = false;
        for (node, netns) in &self.node_ns {
            if let Some(pid) = self.kube_router_pid(node) {
                any = true;
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            let _ = std::fs::remove_file(self.dir.join("nodes").join(node).join("kube-router.pid"));
            if let (true, Some(bin)) = (any, bin) {
                let out = Command::new("ip")
                    .args(["netns", "exec", netns])
                    .arg(bin)
                    .arg("--cleanup-config")
                    .stdin(Stdio::null())
                    .output();
                // v2.1.0 cleans up its policy part, then panics in the service proxy's cleanup
                // (no IPVS here): exit status 2 is expected.
                if !out.as_ref().is_ok_and(|o| o.status.code() == Some(2)) {
                    progress(format!("  {netns}: kube-router --cleanup-config: {out:?}"));
                }
            }
            // What --cleanup-config leaves: its KUBE-* chains (no longer jumped to) in `table ip
            // filter`, whose empty base chains still hook every packet, and its ipsets. Nothing
            // else here uses iptables or ipset (flannel and kube-proxy are nftables), so the
            // table goes whole when it holds only kube-router's chains, then the ipsets.
            let rules = in_ns(netns, &["iptables-save"]).unwrap_or_default();
            if rules.contains("*filter") {
                if filter_table_is_kube_routers_only(&rules) {
                    if let Err(e) = in_ns(netns, &["nft", "delete", "table", "ip", "filter"])
                        .and_then(|_| in_ns(netns, &["ipset", "destroy"]))
                    {
                        progress(format!(
                            "  {netns}: removing kube-router's leftovers: {e:#}"
                        ));
                    }
                } else {
                    progress(format!(
                        "  {netns}: table ip filter holds more than kube-router's chains; left"
                    ));
                }
            }
        }
    }

    /// `sluice_<name>` from every agent's /metrics.
    fn agent_metric(&self, name: &str) -> Vec<f64> {
        self.node_ns
            .iter()
            .map(|(_, netns)| {
                in_ns(
                    netns,
                    &[
                        "curl",
                        "-s",
                        "--max-time",
                        "2",
                        "http://127.0.0.1:9763/metrics",
                    ],
                )
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
            })
            .collect()
    }

    /// Waits until every agent holds `policies` policies and has not synced for 3 s.
    fn wait_converged(&self, policies: usize) -> Result<()> {
        let started = Instant::now();
        let mut last = Vec::new();
        let mut stable_since = Instant::now();
        loop {
            let have = self.agent_metric("sluice_policies ");
            let syncs = self.agent_metric("sluice_syncs_total");
            if syncs != last {
                last = syncs;
                stable_since = Instant::now();
            }
            if have.iter().all(|p| *p as usize == policies)
                && stable_since.elapsed() >= Duration::from_secs(3)
            {
                progress(format!(
                    "  cluster {}: agents hold {policies} policies, settled ({:.0} s)",
                    self.id,
                    started.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!(
                    "cluster {}: agents hold {have:?} policies, want {policies}",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The background: a synthetic cluster, N of its policies.

/// The synthetic cluster with its IPv4 pod addresses moved from 10.244.0.0/16 (where the local
/// cluster's real pods are) to 10.245.0.0/16, so that no background pod shares an address with a
/// measured pod.
fn background(args: &Args) -> Result<SynthCluster> {
    let max = args.policies.iter().copied().max().unwrap_or(0);
    let mut c = SynthCluster::generate(&SynthConfig {
        pods: args.pods,
        policies: max,
        nodes: args.nodes,
        namespaces: args.namespaces,
        seed: args.seed,
    })?;
    for pod in &mut c.pods {
        if let Some(st) = pod.status.as_mut() {
            let mv = |ip: &mut String| {
                if let Some(rest) = ip.strip_prefix("10.244.") {
                    *ip = format!("10.245.{rest}");
                }
            };
            if let Some(ip) = st.pod_ip.as_mut() {
                mv(ip);
            }
            for p in st.pod_ips.iter_mut().flatten() {
                mv(&mut p.ip);
            }
        }
    }
    Ok(c)
}

/// Background policies now in the API (every namespace but the measured one).
async fn background_policies(client: &Client) -> Result<Vec<(String, String)>> {
    let api: Api<NetworkPolicy> = Api::all(client.clone());
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.namespace().as_deref() != Some(NAMESPACE))
        .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
        .collect())
}

/// Makes the loaded cluster hold the background pods and exactly the first `n` policies.
async fn set_background(client: &Client, bg: &SynthCluster, n: usize) -> Result<()> {
    // Loaded before when its last pod is there (namespaces like `default` exist anyway).
    let last = bg
        .pods
        .last()
        .ok_or_else(|| anyhow!("no background pods"))?;
    let api: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), &last.namespace().unwrap_or_default());
    let last_name = last.name_any();
    if api.get_opt(&last_name).await?.is_none() {
        let mut pods_only = bg.clone();
        pods_only.policies.clear();
        load_cluster(client, &pods_only, 32).await?;
    }
    let want: Vec<&NetworkPolicy> = bg.policies.iter().take(n).collect();
    let want_keys: std::collections::BTreeSet<(String, String)> = want
        .iter()
        .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    let have = background_policies(client).await?;
    let extra: Vec<(String, String)> = have
        .iter()
        .filter(|k| !want_keys.contains(*k))
        .cloned()
        .collect();
    let have: std::collections::BTreeSet<(String, String)> = have.into_iter().collect();
    let missing: Vec<&NetworkPolicy> = want
        .into_iter()
        .filter(|p| !have.contains(&(p.namespace().unwrap_or_default(), p.name_any())))
        .collect();
    progress(format!(
        "background: {} policies wanted, creating {}, deleting {}",
        n,
        missing.len(),
        extra.len()
    ));
    let pp = PostParams::default();
    each("policies", &missing, 32, |p| {
        let (client, pp) = (client.clone(), &pp);
        async move {
            let api: Api<NetworkPolicy> =
                Api::namespaced(client, &p.namespace().unwrap_or_default());
            created(retry(|| api.create(pp, p)).await)
        }
    })
    .await?;
    let dp = DeleteParams::default();
    each("policy deletes", &extra, 32, |(ns, name)| {
        let (client, dp) = (client.clone(), &dp);
        async move {
            let api: Api<NetworkPolicy> = Api::namespaced(client, ns);
            match retry(|| api.delete(name, dp)).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(e),
            }
        }
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Servers (in the server pods) and clients (in the client pod): threads that setns.

/// Listens on `port` inside `netns` and serves each connection on a thread of its own.
fn serve(netns: &str, port: u16, handler: fn(TcpStream)) -> Result<()> {
    let netns = netns.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("srv-{port}"))
        .spawn(move || {
            let listener = enter_netns(&netns).and_then(|()| {
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                    .with_context(|| format!("{netns}: bind :{port}"))
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            for conn in listener.incoming().flatten() {
                let _ = conn.set_nodelay(true);
                let _ = std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || handler(conn));
            }
        })
        .context("spawning a server thread")?;
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("server :{port} not listening within 5 s"))?
}

/// Echoes whatever comes in.
fn echo(mut conn: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Reads to EOF, then answers the byte count (8 bytes, big endian).
fn sink(mut conn: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let _ = conn.write_all(&total.to_be_bytes());
}

/// Runs `f` on `threads` threads inside `netns`, collects their results.
fn on_threads<T: Send + 'static>(
    netns: &str,
    threads: usize,
    f: impl Fn() -> Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (f, netns) = (f.clone(), netns.to_string());
            std::thread::spawn(move || -> Result<T> {
                enter_netns(&netns)?;
                f()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow!("a client thread panicked"))?)
        .collect()
}

/// New connections per second: each client connects, reads the server's answer to EOF, closes.
fn conn_rate(
    client_ns: &str,
    server: SocketAddrV4,
    clients: usize,
    secs: f64,
) -> Result<(f64, u64)> {
    let errors = Arc::new(AtomicU64::new(0));
    let errs = errors.clone();
    let started = Instant::now();
    let dur = Duration::from_secs_f64(secs);
    let counts = on_threads(client_ns, clients, move || {
        let mut ok = 0u64;
        let mut buf = Vec::with_capacity(128);
        let start = Instant::now();
        while start.elapsed() < dur {
            let r = TcpStream::connect_timeout(&SocketAddr::V4(server), Duration::from_secs(1))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    buf.clear();
                    s.read_to_end(&mut buf)
                });
            match r {
                Ok(n) if n > 0 => ok += 1,
                _ => {
                    errs.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(ok)
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok((
        counts.iter().sum::<u64>() as f64 / elapsed,
        errors.load(Ordering::Relaxed),
    ))
}

/// Round trips of 1 byte on one open connection for `secs`: latencies in µs.
fn rr(client_ns: &str, server: SocketAddrV4, secs: f64) -> Result<Percentiles> {
    let dur = Duration::from_secs_f64(secs);
    let mut lat = on_threads(client_ns, 1, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(server), Duration::from_secs(2))
            .with_context(|| format!("connect {server}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = [0u8; 1];
        // Warm-up.
        for _ in 0..100 {
            s.write_all(&[1])?;
            s.read_exact(&mut b)?;
        }
        let mut v = Vec::with_capacity(100_000);
        let start = Instant::now();
        while start.elapsed() < dur {
            let t = Instant::now();
            s.write_all(&[1])?;
            s.read_exact(&mut b)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    })?;
    Percentiles::of(&lat.pop().unwrap_or_default()).ok_or_else(|| anyhow!("no round trips"))
}

/// One stream for `secs`: Gbit/s received by the server.
fn stream(client_ns: &str, server: SocketAddrV4, secs: f64) -> Result<f64> {
    let dur = Duration::from_secs_f64(secs);
    on_threads(client_ns, 1, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(server), Duration::from_secs(2))
            .with_context(|| format!("connect {server}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let buf = vec![0x5au8; 128 * 1024];
        let start = Instant::now();
        while start.elapsed() < dur {
            s.write_all(&buf)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut total = [0u8; 8];
        s.read_exact(&mut total)?;
        let secs = start.elapsed().as_secs_f64();
        Ok(u64::from_be_bytes(total) as f64 * 8.0 / secs / 1e9)
    })?
    .pop()
    .ok_or_else(|| anyhow!("no stream result"))
}

// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    mem_total_mib: u64,
    kernel: String,
    nft: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        mem_total_mib: sluice_e2e::agent_bench::status_kib(&meminfo, "MemTotal").unwrap_or(0)
            / 1024,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        nft: cmd_out(Command::new("nft").arg("--version"))
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

#[derive(Serialize)]
struct RoundLoad {
    policies: usize,
    round: usize,
    loadavg_start: String,
    loadavg_end: String,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    command: String,
    rounds: Vec<RoundLoad>,
    samples: Vec<Sample>,
    conn_errors: BTreeMap<String, u64>,
    total_s: f64,
}

struct Bench<'a> {
    args: &'a Args,
    plain: LocalCluster,
    loaded: LocalCluster,
    samples: Vec<Sample>,
    rounds: Vec<RoundLoad>,
    conn_errors: BTreeMap<String, u64>,
}

impl Bench<'_> {
    fn cluster_of(&self, config: &str) -> &LocalCluster {
        if on_loaded_cluster(config) {
            &self.loaded
        } else {
            &self.plain
        }
    }

    fn prepare(&self, config: &str, policies: usize) -> Result<()> {
        let kr = self.args.kube_router.as_deref();
        match config {
            "a" => self.plain.no_engine(None),
            "b" => self.plain.sluice(),
            "a-loaded" => self.loaded.no_engine(kr),
            "c" => {
                let l = &self.loaded;
                // After kube-router or (a-loaded): sluice's agents start again and must settle.
                if l.node_ns
                    .iter()
                    .any(|(n, _)| l.kube_router_pid(n).is_some() || l.agent_pid(n).is_none())
                {
                    l.stop_kube_router(kr);
                    l.sluice()?;
                    l.wait_converged(policies)?;
                }
                l.sluice()
            }
            "kube-router" => {
                let bin = self.args.kube_router.as_deref().ok_or_else(|| {
                    anyhow!("configuration kube-router needs --kube-router (e2e/kube-router path)")
                })?;
                self.loaded.kube_router(bin)
            }
            other => bail!("unknown configuration {other:?} ({})", CONFIGS.join(", ")),
        }
    }

    fn measure(&mut self, policies: usize, round: usize, config: &str) -> Result<()> {
        let c = self.cluster_of(config);
        let client_ns = c.pod_netns(CLIENT)?;
        let ips = c.ips.clone();
        let a = self.args;
        let mut out = Vec::new();
        for (pair, server) in [("same-node", SERVER_SAME), ("cross-node", SERVER_CROSS)] {
            let ip = ips[server];
            let (rate, errors) = conn_rate(
                &client_ns,
                SocketAddrV4::new(ip, SERVE_PORT),
                a.clients,
                a.conn_secs,
            )?;
            let p = rr(&client_ns, SocketAddrV4::new(ip, RR_PORT), a.rr_secs)?;
            let gbps = stream(
                &client_ns,
                SocketAddrV4::new(ip, STREAM_PORT),
                a.stream_secs,
            )?;
            progress(format!(
                "    ({config}) {pair:<10} {rate:>7.0} conn/s ({errors} errors)  rr p50 {:>6.1} µs p99 {:>7.1} µs  stream {gbps:>6.2} Gbit/s",
                p.p50, p.p99
            ));
            *self.conn_errors.entry(config.to_string()).or_default() += errors;
            for (metric, value) in [
                (Metric::ConnPerSec, rate),
                (Metric::RrP50Us, p.p50),
                (Metric::RrP99Us, p.p99),
                (Metric::StreamGbps, gbps),
            ] {
                out.push(Sample {
                    policies,
                    round,
                    config: config.to_string(),
                    pair: pair.to_string(),
                    metric,
                    value,
                });
            }
        }
        self.samples.extend(out);
        Ok(())
    }
}

fn run(args: &Args) -> Result<Report> {
    let started = Instant::now();
    for c in &args.configs {
        if !CONFIGS.contains(&c.as_str()) {
            bail!("unknown configuration {c:?} ({})", CONFIGS.join(", "));
        }
    }
    if args.plain == args.loaded {
        bail!("--plain and --loaded must be two different clusters");
    }
    let mut plain = LocalCluster::open(args.plain)?;
    let mut loaded = LocalCluster::open(args.loaded)?;
    progress(format!(
        "clusters: plain {} ({}), loaded {} ({})",
        plain.id,
        plain.dir.display(),
        loaded.id,
        loaded.dir.display()
    ));
    plain.measured_pods(false)?;
    loaded.measured_pods(true)?;
    // The plain cluster holds no policy at all.
    let left = plain.kubectl().get_json(&["networkpolicies", "-A"])?;
    if left["items"].as_array().is_some_and(|i| !i.is_empty()) {
        bail!(
            "the plain cluster {} holds NetworkPolicies; (b) needs none",
            plain.id
        );
    }
    for c in [&plain, &loaded] {
        for name in [SERVER_SAME, SERVER_CROSS] {
            let ns = c.pod_netns(name)?;
            serve(&ns, RR_PORT, echo)?;
            serve(&ns, STREAM_PORT, sink)?;
        }
        progress(format!(
            "cluster {}: measured pods {:?}, servers up",
            c.id, c.ips
        ));
    }
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    let client = rt.block_on(kube_client(&loaded.kubeconfig))?;
    progress("generating the background cluster");
    let bg = background(args)?;
    let measured = measured_policies("").len();
    let mut bench = Bench {
        args,
        plain,
        loaded,
        samples: Vec::new(),
        rounds: Vec::new(),
        conn_errors: BTreeMap::new(),
    };
    let result = sweep(args, &mut bench, &rt, &client, &bg, measured);
    // Leave both clusters as `e2e/cluster up` made them: sluice's agents running.
    bench.loaded.stop_kube_router(args.kube_router.as_deref());
    for c in [&bench.loaded, &bench.plain] {
        if let Err(e) = c.sluice() {
            progress(format!("restarting cluster {}'s agents: {e:#}", c.id));
        }
    }
    result?;
    Ok(Report {
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rounds: bench.rounds,
        samples: bench.samples,
        conn_errors: bench.conn_errors,
        total_s: started.elapsed().as_secs_f64(),
    })
}

fn sweep(
    args: &Args,
    bench: &mut Bench<'_>,
    rt: &tokio::runtime::Runtime,
    client: &Client,
    bg: &SynthCluster,
    measured: usize,
) -> Result<()> {
    for &n in &args.policies {
        progress(format!(
            "== sweep point: {n} background policies (+{measured} measured)"
        ));
        bench.loaded.stop_kube_router(args.kube_router.as_deref());
        rt.block_on(set_background(client, bg, n))?;
        bench.loaded.sluice()?;
        bench.loaded.wait_converged(n + measured)?;
        for round in 1..=args.rounds {
            let load_start = loadavg();
            progress(format!(
                "  round {round}/{} (load {load_start})",
                args.rounds
            ));
            for config in &args.configs {
                bench.prepare(config, n + measured)?;
                bench.measure(n, round, config)?;
            }
            bench.rounds.push(RoundLoad {
                policies: n,
                round,
                loadavg_start: load_start,
                loadavg_end: loadavg(),
            });
        }
    }
    Ok(())
}

fn print_report(args: &Args, r: &Report) {
    let m = &r.machine;
    println!(
        "machine: {} × {}, {} MiB, kernel {}, {}",
        m.nproc, m.cpu, m.mem_total_mib, m.kernel, m.nft
    );
    println!("command: {}", r.command);
    let loads: Vec<String> = r
        .rounds
        .iter()
        .map(|l| {
            format!(
                "{}:{} {}→{}",
                l.policies, l.round, l.loadavg_start, l.loadavg_end
            )
        })
        .collect();
    println!(
        "load average per round (policies:round start→end): {}",
        loads.join(", ")
    );
    println!("connection errors per configuration: {:?}", r.conn_errors);
    println!("total: {:.0} s", r.total_s);
    let summary = summarize(&r.samples);
    for &n in &args.policies {
        println!();
        println!(
            "### {n} background policies, {} pods: medians over {} rounds; relative to the no-engine run on the same cluster, 1.000 = as good (rates: value/base, latencies: base/value), per-round paired ratios' range in parentheses; (a-loaded) vs (a) = loaded cluster vs plain cluster, no engine",
            args.pods, args.rounds
        );
        println!();
        print!("{}", table(&summary, &r.samples, n, &args.configs));
    }
    let compared: Vec<&str> = args
        .configs
        .iter()
        .map(String::as_str)
        .filter(|c| baseline_of(c).is_some_and(|b| args.configs.iter().any(|x| x == b)))
        .collect();
    if args.policies.len() > 1 && !compared.is_empty() {
        println!();
        println!("### Sweep: each configuration relative to no engine on its own cluster, per background policy count");
        println!();
        print!("{}", sweep_table(&summary, &args.policies, &compared));
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            print_report(&args, &report);
            if let Some(path) = &args.json_out {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(path, text) {
                    progress(format!("writing {}: {e}", path.display()));
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            progress(format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
