//! `sluice-agent-bench cni` (`e2e/bench cni`, docs/performance.md, "CNI ADD: flannel alone vs
//! flannel + sluice"): how long a pod's network setup takes through flannel's chain alone and
//! through the same chain with sluice-cni appended, side by side in one run, with a real agent
//! holding a synthetic cluster (10k pods, 1k policies by default) in its index.
//!
//! Per cluster (a small baseline first, then the measured one), reusing the agent bench: the
//! cluster is loaded into a fresh control plane; `trials` replicas of an isolated local pod of
//! the measured node are created without IPs (as the scheduler leaves them); the release agent
//! starts in the node's network namespace with its own CNI socket. The node's CNI directory
//! holds flannel's `subnet.env` and `10-flannel.conflist`, and `sluice install-cni --once`
//! derives `05-sluice.conflist` from it. Then ADDs alternate: (a) flannel's conflist, (b) the
//! sluice one, each for a fresh pod namespace, each followed by an untimed DEL and the
//! namespace's removal. Only the ADD is timed, the whole chain as a runtime runs it (the
//! kubelet stand-in's CNI invoker, `sluice_e2e::kubelet::cni`), from a thread in the node's
//! namespace. A benchmark, not a test: it exits 0 whatever the numbers.

use super::*;

use serde_json::Value;
use sluice_e2e::cni_bench::{map_has_key, parse_histogram, ratio, Histogram};
use sluice_e2e::kubelet::cni::{pod_ips, Attachment, CapabilityArgs, Conflist, Invoker};

/// The chains measured.
const FLANNEL: &str = "flannel";
const SLUICE: &str = "flannel+sluice";
/// Untimed pairs of ADDs before the measured ones (page cache, first connections).
const WARMUP: usize = 3;

/// CNI ADD latency: flannel's chain alone against flannel + sluice-cni, with the agent holding
/// a big cluster.
///
/// Needs root, the control plane binaries of e2e/controlplane and the CNI plugins of
/// e2e/cni-plugins. Progress goes to stderr, the report to stdout (a table, or JSON with --json).
#[derive(Parser)]
#[command(name = "e2e/bench cni")]
struct CniArgs {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    #[arg(long, default_value_t = 300)]
    namespaces: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timed ADDs per chain (flannel alone, flannel + sluice), alternated.
    #[arg(long, default_value_t = 200)]
    trials: usize,
    /// Timed ADDs per chain for the baseline cluster (default: --trials).
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
    /// Pause after each trial's DEL (and, for sluice, the agent's sync after it), in ms, plus
    /// 0-50 ms of random jitter.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    /// Check that the pod's IPv4 is a key of the agent's ingress dispatch map after the first 3
    /// sluice ADDs and every Nth one (an `nft list map`, untimed).
    #[arg(long, default_value_t = 20)]
    check_every: usize,
    /// sluice-cni's `timeout` (how long an ADD waits for the agent).
    #[arg(long, default_value = "10s")]
    cni_timeout: String,
    /// Passed to the agent as --debounce (default: the agent's own default).
    #[arg(long)]
    debounce: Option<String>,
    /// Passed to the agent as --resync.
    #[arg(long, default_value = "1h")]
    resync: String,
    /// Concurrent API requests while loading the cluster.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The agent binary (default: `sluice` next to this binary).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The sluice-cni binary (default: `sluice-cni` next to this binary).
    #[arg(long)]
    sluice_cni: Option<PathBuf>,
    /// The directory of flannel, bridge, host-local and portmap (default: `e2e/cni-plugins
    /// build` and its `path`).
    #[arg(long)]
    cni_plugins: Option<PathBuf>,
    /// Keep the agent logs and the node's CNI directory in this directory.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Clone, Debug, Serialize)]
struct ChainReport {
    conflist: String,
    plugins: Vec<String>,
    /// Timed ADDs that succeeded, ms.
    add: Option<Percentiles>,
    failures: usize,
    first_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct AgentShare {
    /// The agent's `sluice_cni_add_seconds` over the timed sluice ADDs (ms).
    count: f64,
    mean_ms: Option<f64>,
    /// Interpolated inside the bucket, as `histogram_quantile` does.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// The bucket's upper bound: "at most".
    p50_bound_ms: Option<f64>,
    p99_bound_ms: Option<f64>,
    /// The agent's `synced` lines logged during each sluice ADD (one per ADD normally).
    compile: Option<Percentiles>,
    apply: Option<Percentiles>,
    commands_p50: Option<f64>,
    adds_without_sync: usize,
    adds_with_several_syncs: usize,
}

#[derive(Clone, Debug, Serialize)]
struct CniClusterReport {
    label: String,
    pods: usize,
    policies: usize,
    namespaces: usize,
    nodes: usize,
    seed: u64,
    node: String,
    local_pods: usize,
    sets: usize,
    set_elements: usize,
    chains: usize,
    rules: usize,
    /// The pod the started pods are replicas of (`namespace/name`).
    template: String,
    flannel_subnet: String,
    load: LoadReport,
    trial_pods_s: f64,
    ready_s: f64,
    trials: usize,
    flannel: ChainReport,
    sluice: ChainReport,
    /// sluice / flannel, medians and p99s.
    ratio_p50: Option<f64>,
    ratio_p99: Option<f64>,
    /// sluice p50 - flannel p50, ms.
    added_p50_ms: Option<f64>,
    agent: AgentShare,
    /// Sluice ADDs whose pod IP was looked up in the ingress dispatch map, and how many were
    /// there when ADD returned.
    isolation_checked: usize,
    isolation_found: usize,
    /// Flannel-alone ADDs looked up the same way, and how many were absent (unprotected).
    flannel_checked: usize,
    flannel_absent: usize,
    /// The agent's sync after a sluice DEL did not show within 5 s.
    del_sync_missing: usize,
    agent_hwm_kib: Option<u64>,
    loadavg_start: String,
    loadavg_trials_start: String,
    loadavg_end: String,
    trials_s: f64,
}

#[derive(Debug, Serialize)]
struct CniReport {
    machine: Machine,
    /// The agent's source: the commit and how many files under controller/ and cni-chain/
    /// differed from it when the bench ran.
    agent_commit: String,
    clusters: Vec<CniClusterReport>,
    total_s: f64,
}

// ---------------------------------------------------------------------------------------------
// The node's CNI setup.

/// host-local's lease directory of a network (host-local's default `dataDir`), removed when
/// dropped. The network has a name of this run, so no other lease is touched.
struct LeaseDir(PathBuf);

impl LeaseDir {
    fn create(network: &str) -> Result<LeaseDir> {
        let dir = Path::new("/var/lib/cni/networks").join(network);
        if dir.exists() {
            bail!("{} already exists", dir.display());
        }
        registry().dirs.push(dir.clone());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(LeaseDir(dir))
    }
}

impl Drop for LeaseDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        registry().dirs.retain(|d| d != &self.0);
    }
}

struct NodeCni {
    invoker: Invoker,
    flannel: Conflist,
    sluice: Conflist,
    subnet: String,
    _leases: LeaseDir,
}

/// Flannel's files for the node (as flannel's daemon and manifest write them, state paths in
/// `dir`), host-local leases for the addresses the node's existing pods hold (as on a real node,
/// so new pods get free addresses), and `sluice install-cni --once`.
fn node_cni(
    dir: &Path,
    network: &str,
    cluster: &SynthCluster,
    node: &str,
    tools: &Tools,
    socket: &Path,
    cni_timeout: &str,
) -> Result<NodeCni> {
    for sub in ["conf", "bin", "flannel", "run"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let n = cluster
        .nodes
        .iter()
        .find(|n| n.name == node)
        .context("the node")?;
    let v4 = n
        .pod_cidrs
        .iter()
        .find_map(|c| match c {
            ipnet::IpNet::V4(v) => Some(*v),
            ipnet::IpNet::V6(_) => None,
        })
        .context("the node has no IPv4 pod CIDR")?;
    let gateway = v4.hosts().next().context("an empty pod CIDR")?;
    let wide: ipnet::Ipv4Net = "10.244.0.0/16".parse()?;
    let network_cidr = if wide.contains(&v4) {
        wide
    } else {
        "10.0.0.0/8".parse()?
    };
    let subnet = format!("{gateway}/{}", v4.prefix_len());
    std::fs::write(
        dir.join("run/subnet.env"),
        format!(
            "FLANNEL_NETWORK={network_cidr}\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        ),
    )?;
    let leases = LeaseDir::create(network)?;
    let mut held = 0;
    for pod in &cluster.pods {
        let ips = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten();
        for ip in ips {
            let Ok(addr) = ip.ip.parse::<std::net::Ipv4Addr>() else {
                continue;
            };
            if v4.contains(&addr) {
                std::fs::write(
                    leases.0.join(addr.to_string()),
                    format!("synthetic-{}\r\neth0", pod.name_any()),
                )?;
                held += 1;
            }
        }
    }
    progress(format!(
        "node CNI: flannel subnet {subnet}, {held} addresses leased to the node's existing pods"
    ));
    let conflist = json!({
        "name": network,
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "flannel",
                "subnetFile": dir.join("run/subnet.env"),
                "dataDir": dir.join("flannel"),
                "delegate": {"hairpinMode": true, "isDefaultGateway": true}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    let flannel_file = dir.join("conf/10-flannel.conflist");
    std::fs::write(&flannel_file, serde_json::to_string_pretty(&conflist)?)?;
    let out = Command::new(&tools.agent)
        .arg("install-cni")
        .arg("--once")
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("conf"))
        .arg("--plugin-binary")
        .arg(&tools.sluice_cni)
        .arg("--agent-socket")
        .arg(socket)
        .args(["--timeout", cni_timeout, "--fail-mode", "closed"])
        .output()
        .context("sluice install-cni")?;
    if !out.status.success() {
        bail!(
            "sluice install-cni --once failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |f: &Path| -> Result<Conflist> { Conflist::parse(f, &std::fs::read_to_string(f)?) };
    let flannel = read(&flannel_file)?;
    let sluice = read(&dir.join("conf/05-sluice.conflist"))?;
    Ok(NodeCni {
        invoker: Invoker {
            path: vec![dir.join("bin"), tools.plugins.clone()],
        },
        flannel,
        sluice,
        subnet,
        _leases: leases,
    })
}

struct Tools {
    agent: PathBuf,
    sluice_cni: PathBuf,
    plugins: PathBuf,
}

fn find_tools(args: &CniArgs) -> Result<Tools> {
    let here = std::env::current_exe()?
        .parent()
        .context("the directory of this binary")?
        .to_path_buf();
    let agent = args.agent.clone().unwrap_or_else(|| here.join("sluice"));
    let sluice_cni = args
        .sluice_cni
        .clone()
        .unwrap_or_else(|| here.join("sluice-cni"));
    for (what, p) in [("agent", &agent), ("sluice-cni", &sluice_cni)] {
        if !p.is_file() {
            bail!("no {what} binary at {}", p.display());
        }
    }
    let plugins = match &args.cni_plugins {
        Some(p) => p.clone(),
        None => {
            let script = repo_root().join("e2e/cni-plugins");
            let out = Command::new(&script)
                .arg("build")
                .stdout(Stdio::null())
                .output()
                .context("e2e/cni-plugins build")?;
            if !out.status.success() {
                bail!(
                    "e2e/cni-plugins build failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let out = Command::new(&script).arg("path").output()?;
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    for p in ["flannel", "bridge", "host-local", "portmap"] {
        if !plugins.join(p).is_file() {
            bail!("no CNI plugin {p} in {}", plugins.display());
        }
    }
    Ok(Tools {
        agent,
        sluice_cni,
        plugins,
    })
}

// ---------------------------------------------------------------------------------------------
// Trials.

/// A pod's network namespace, removed when dropped.
struct PodNs(String);

impl PodNs {
    fn create(n: usize) -> Result<PodNs> {
        let name = format!("sluice-cnib-{}-{n}", std::process::id());
        registry().netns.push(name.clone());
        let ns = PodNs(name);
        let ok = Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("ip netns add {} failed", ns.0);
        }
        Ok(ns)
    }
}

impl Drop for PodNs {
    fn drop(&mut self) {
        delete_netns(&self.0);
        registry().netns.retain(|n| n != &self.0);
    }
}

#[derive(Clone, Debug)]
struct AddTrial {
    chain: &'static str,
    add_ms: Option<f64>,
    error: Option<String>,
    /// The agent's `synced` lines during the ADD (sluice trials).
    syncs: Vec<Synced>,
}

struct TrialRun<'a> {
    node_ns: &'a Netns,
    cni: &'a NodeCni,
    namespace: &'a str,
    log: LogTail,
    gap: Duration,
    rng: ChaCha8Rng,
    check_every: usize,
    next: usize,
    out: Vec<AddTrial>,
    isolation_checked: usize,
    isolation_found: usize,
    flannel_checked: usize,
    flannel_absent: usize,
    del_sync_missing: usize,
}

impl TrialRun<'_> {
    fn syncs(&mut self) -> Vec<Synced> {
        self.log
            .read_new()
            .iter()
            .filter_map(|l| parse_synced(l))
            .collect()
    }

    /// Waits up to `limit` for the agent's next `synced` line.
    fn wait_sync(&mut self, limit: Duration) -> Vec<Synced> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.syncs();
            if !s.is_empty() || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn in_ingress_map(&self, ip: &str) -> Result<bool> {
        let mut cmd = Command::new("nft");
        cmd.args(["list", "map", "inet", TABLE, "ingress_v4"]);
        let out = self.node_ns.run(cmd)?;
        Ok(map_has_key(&String::from_utf8_lossy(&out.stdout), ip))
    }

    /// One ADD through `chain` for a fresh pod namespace (timed), then DEL and the namespace's
    /// removal (untimed). `pod` is the Pod's name in the API (sluice's ADD needs it there).
    fn trial(&mut self, chain: &'static str, pod: &str, index: usize, keep: bool) -> Result<()> {
        let n = self.next;
        self.next += 1;
        let list = if chain == SLUICE {
            &self.cni.sluice
        } else {
            &self.cni.flannel
        };
        let pod_ns = PodNs::create(n)?;
        let attachment = Attachment {
            container_id: format!("cnibench{:08x}{n:08x}", std::process::id()),
            netns_path: format!("/run/netns/{}", pod_ns.0),
            ifname: "eth0".into(),
            pod_namespace: self.namespace.to_string(),
            pod_name: pod.to_string(),
            pod_uid: format!("00000000-0000-4000-8000-{n:012}"),
        };
        let caps = CapabilityArgs::new();
        let stray = self.syncs().len();
        if stray > 0 && chain == SLUICE {
            progress(format!(
                "  {stray} agent syncs before ADD {n} (not counted)"
            ));
        }
        let invoker = &self.cni.invoker;
        let (elapsed, result) = in_netns(&self.node_ns.name, || {
            let t0 = Instant::now();
            let r = invoker.add(list, &attachment, &caps);
            (t0.elapsed(), r)
        })?;
        let mut trial = AddTrial {
            chain,
            add_ms: None,
            error: None,
            syncs: Vec::new(),
        };
        match &result {
            Ok(_) => trial.add_ms = Some(ms(elapsed)),
            Err(e) => {
                progress(format!("  ADD {n} through {chain} failed: {e}"));
                trial.error = Some(e.to_string());
            }
        }
        if chain == SLUICE {
            // The sync that answered the ADD; its line may land just after the answer.
            trial.syncs = if result.is_ok() {
                self.wait_sync(Duration::from_millis(500))
            } else {
                self.syncs()
            };
        }
        let ip = result
            .as_ref()
            .ok()
            .and_then(|r: &Value| pod_ips(r, "eth0").into_iter().find(|a| !a.contains(':')));
        if let Some(ip) = &ip {
            let check = keep && (index < 3 || index.is_multiple_of(self.check_every.max(1)));
            if check && chain == SLUICE {
                self.isolation_checked += 1;
                if self.in_ingress_map(ip)? {
                    self.isolation_found += 1;
                } else {
                    progress(format!(
                        "  pod {pod} ({ip}) is NOT in ingress_v4 when its sluice ADD returned"
                    ));
                }
            } else if keep && index < 3 && chain == FLANNEL {
                self.flannel_checked += 1;
                if !self.in_ingress_map(ip)? {
                    self.flannel_absent += 1;
                }
            }
        }
        let del = in_netns(&self.node_ns.name, || {
            invoker.del(list, &attachment, None, &caps)
        })?;
        if let Err(e) = del {
            progress(format!("  DEL {n} through {chain} failed: {e}"));
        }
        drop(pod_ns);
        if chain == SLUICE && result.is_ok() {
            // The agent unregisters the pod and syncs; let that finish before the next ADD.
            if self.wait_sync(Duration::from_secs(5)).is_empty() {
                self.del_sync_missing += 1;
            }
        }
        let jitter = Duration::from_millis(self.rng.random_range(0..=50));
        std::thread::sleep(self.gap + jitter);
        if keep {
            self.out.push(trial);
        }
        Ok(())
    }
}

fn chain_report(list: &Conflist, trials: &[AddTrial], chain: &str) -> ChainReport {
    let of: Vec<&AddTrial> = trials.iter().filter(|t| t.chain == chain).collect();
    ChainReport {
        conflist: list
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        plugins: (0..list.plugins.len())
            .map(|i| list.plugin_type(i).to_string())
            .collect(),
        add: Percentiles::of(&of.iter().filter_map(|t| t.add_ms).collect::<Vec<_>>()),
        failures: of.iter().filter(|t| t.add_ms.is_none()).count(),
        first_error: of.iter().find_map(|t| t.error.clone()),
    }
}

fn agent_share(hist: Option<Histogram>, trials: &[AddTrial]) -> AgentShare {
    let adds: Vec<&AddTrial> = trials
        .iter()
        .filter(|t| t.chain == SLUICE && t.add_ms.is_some())
        .collect();
    let one: Vec<&Synced> = adds
        .iter()
        .filter(|t| t.syncs.len() == 1)
        .map(|t| &t.syncs[0])
        .collect();
    let pick =
        |f: &dyn Fn(&Synced) -> f64| Percentiles::of(&one.iter().map(|s| f(s)).collect::<Vec<_>>());
    let to_ms = |v: Option<f64>| v.map(|s| s * 1000.0);
    let h = hist.unwrap_or_default();
    AgentShare {
        count: h.count,
        mean_ms: to_ms(h.mean()),
        p50_ms: to_ms(h.quantile(0.5)),
        p99_ms: to_ms(h.quantile(0.99)),
        p50_bound_ms: to_ms(h.quantile_bound(0.5)),
        p99_bound_ms: to_ms(h.quantile_bound(0.99)),
        compile: pick(&|s| s.compile_ms),
        apply: pick(&|s| s.apply_ms),
        commands_p50: pick(&|s| s.commands as f64).map(|p| p.p50),
        adds_without_sync: adds.iter().filter(|t| t.syncs.is_empty()).count(),
        adds_with_several_syncs: adds.iter().filter(|t| t.syncs.len() > 1).count(),
    }
}

fn cni_add_histogram(ns: &Netns) -> Option<Histogram> {
    let (status, body) = http_get(&ns.name, AGENT_LISTEN, "/metrics").ok()?;
    (status == 200)
        .then(|| parse_histogram(&body, "sluice_cni_add_seconds"))
        .flatten()
}

/// `trials` Pods in the template's namespace, replicas of it (labels, containers, node), with
/// no status: as the scheduler leaves a pod about to start.
fn trial_pods(template: &Pod, trials: usize) -> Vec<Pod> {
    (0..trials)
        .map(|i| {
            let mut p = Pod {
                metadata: Default::default(),
                spec: template.spec.clone(),
                status: None,
            };
            p.metadata.namespace = template.metadata.namespace.clone();
            p.metadata.name = Some(format!("cnibench-{i}"));
            p.metadata.labels = template.metadata.labels.clone();
            p
        })
        .collect()
}

struct CniRun<'a> {
    args: &'a CniArgs,
    tools: &'a Tools,
    log_dir: &'a Path,
    rt: &'a tokio::runtime::Runtime,
}

impl CniRun<'_> {
    fn cluster(&self, label: &str, config: SynthConfig, trials: usize) -> Result<CniClusterReport> {
        progress(format!(
            "== cni {label}: {} pods, {} policies, {} namespaces, {} nodes (seed {})",
            config.pods, config.policies, config.namespaces, config.nodes, config.seed
        ));
        let loadavg_start = loadavg();
        let cluster = SynthCluster::generate(&config)?;
        let index = cluster.index()?;
        let target = choose_target(&cluster, &index, NodeChoice::Largest)?;
        drop(index);
        let template = cluster
            .pods
            .iter()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(&target.namespace)
                    && p.metadata.name.as_deref() == Some(&target.name)
            })
            .context("the template pod")?
            .clone();
        progress(format!(
            "node {} ({} local pods, {} set elements, {} rules); started pods are replicas of {}",
            target.node, target.local_pods, target.set_elements, target.rules, target.pod
        ));

        let cp = ControlPlane::up(&format!("cni-{label}"))?;
        let client = self.rt.block_on(kube_client(&cp.kubeconfig))?;
        let load = self
            .rt
            .block_on(load_cluster(&client, &cluster, self.args.concurrency))?;
        let pods = trial_pods(&template, trials + WARMUP);
        let trial_pods_s =
            self.rt
                .block_on(each("pods to start", &pods, self.args.concurrency, |pod| {
                    let client = client.clone();
                    async move {
                        let api: Api<Pod> =
                            Api::namespaced(client, &pod.namespace().unwrap_or_default());
                        let pp = PostParams::default();
                        created(retry(|| api.create(&pp, pod)).await)
                    }
                }))?;

        let socket = self.log_dir.join(format!("cni-{label}.sock"));
        let network = format!("sluice-cnibench-{}-{label}", std::process::id());
        let cni = node_cni(
            &self.log_dir.join(format!("node-cni-{label}")),
            &network,
            &cluster,
            &target.node,
            self.tools,
            &socket,
            &self.args.cni_timeout,
        )?;
        drop(cluster);

        let ns = Netns::create()?;
        let relay = Relay::start(&ns.name, cp.port)?;
        let log_path = self.log_dir.join(format!("agent-cni-{label}.log"));
        let (mut agent, ready_s) = start_agent(&AgentStart {
            bin: &self.tools.agent,
            kubeconfig: &cp.kubeconfig,
            node: &target.node,
            ns: &ns,
            log_path: &log_path,
            cni_socket: &socket,
            resync: &self.args.resync,
            debounce: self.args.debounce.as_deref(),
        })?;
        progress(format!("agent ready after {ready_s:.2} s"));
        // Let the agent settle (its first sync is in; nothing else is pending).
        std::thread::sleep(Duration::from_secs(1));
        let mut log = LogTail::open(&log_path)?;
        log.read_new();

        let mut run = TrialRun {
            node_ns: &ns,
            cni: &cni,
            namespace: &target.namespace,
            log,
            gap: Duration::from_millis(self.args.gap_ms),
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0xc41),
            check_every: self.args.check_every,
            next: 0,
            out: Vec::new(),
            isolation_checked: 0,
            isolation_found: 0,
            flannel_checked: 0,
            flannel_absent: 0,
            del_sync_missing: 0,
        };
        progress(format!("{WARMUP} untimed warm-up pairs"));
        for i in 0..WARMUP {
            run.trial(FLANNEL, &format!("flannel-only-w{i}"), i, false)?;
            run.trial(SLUICE, &format!("cnibench-{}", trials + i), i, false)?;
        }
        let before = cni_add_histogram(&ns);
        let loadavg_trials_start = loadavg();
        progress(format!(
            "trials: {trials} pairs of ADD (flannel alone, then flannel + sluice)"
        ));
        let started = Instant::now();
        for i in 0..trials {
            run.trial(FLANNEL, &format!("flannel-only-{i}"), i, true)?;
            run.trial(SLUICE, &format!("cnibench-{i}"), i, true)?;
            if (i + 1) % 25 == 0 || i + 1 == trials {
                let failed = run.out.iter().filter(|t| t.add_ms.is_none()).count();
                progress(format!(
                    "  pair {}/{trials} ({:.0} s, {failed} failed)",
                    i + 1,
                    started.elapsed().as_secs_f64()
                ));
            }
            if run.out.iter().filter(|t| t.add_ms.is_none()).count() > 10 {
                bail!("more than 10 ADDs failed; stopping");
            }
        }
        let trials_s = started.elapsed().as_secs_f64();
        let loadavg_end = loadavg();
        let after = cni_add_histogram(&ns);
        let hist = match (after, before) {
            (Some(a), Some(b)) => Some(a.since(&b)),
            (a, _) => a,
        };
        let agent_hwm_kib = memory(agent.pid()).hwm_kib;
        let flannel = chain_report(&cni.flannel, &run.out, FLANNEL);
        let sluice = chain_report(&cni.sluice, &run.out, SLUICE);
        let share = agent_share(hist, &run.out);
        let (a, b) = (flannel.add, sluice.add);
        let report = CniClusterReport {
            label: label.to_string(),
            pods: config.pods,
            policies: config.policies,
            namespaces: config.namespaces,
            nodes: config.nodes,
            seed: config.seed,
            node: target.node.clone(),
            local_pods: target.local_pods,
            sets: target.sets,
            set_elements: target.set_elements,
            chains: target.chains,
            rules: target.rules,
            template: target.pod.clone(),
            flannel_subnet: cni.subnet.clone(),
            load,
            trial_pods_s,
            ready_s,
            trials,
            ratio_p50: a.zip(b).and_then(|(a, b)| ratio(b.p50, a.p50)),
            ratio_p99: a.zip(b).and_then(|(a, b)| ratio(b.p99, a.p99)),
            added_p50_ms: a.zip(b).map(|(a, b)| b.p50 - a.p50),
            flannel,
            sluice,
            agent: share,
            isolation_checked: run.isolation_checked,
            isolation_found: run.isolation_found,
            flannel_checked: run.flannel_checked,
            flannel_absent: run.flannel_absent,
            del_sync_missing: run.del_sync_missing,
            agent_hwm_kib,
            loadavg_start,
            loadavg_trials_start,
            loadavg_end,
            trials_s,
        };
        drop(run);
        agent.stop(Duration::from_secs(10));
        drop(relay);
        drop(ns);
        drop(cni);
        drop(cp);
        Ok(report)
    }
}

fn agent_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["log", "-1", "--format=%h %cd", "--date=iso"]).unwrap_or_else(|| "?".into());
    let dirty = git(&["status", "--porcelain", "--", "controller", "cni-chain"])
        .map(|s| s.lines().count())
        .unwrap_or(0);
    format!("{head}; {dirty} files under controller/ and cni-chain/ modified in the working tree")
}

fn ms_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn print_cni_report(r: &CniReport) {
    let m = &r.machine;
    println!("CNI ADD: flannel's chain alone vs flannel + sluice");
    println!(
        "machine: {} x {}, {} RAM, kernel {}, {}",
        m.nproc,
        m.cpu,
        mib(m.mem_total_kib),
        m.kernel,
        m.nft
    );
    println!(
        "agent: {} (--debounce {}, --resync {}); source {}",
        m.agent, m.agent_debounce, m.agent_resync, r.agent_commit
    );
    for c in &r.clusters {
        println!();
        println!(
            "== {}: {} pods, {} policies, {} namespaces, {} nodes (load average {} -> trials {} -> {})",
            c.label,
            c.pods,
            c.policies,
            c.namespaces,
            c.nodes,
            c.loadavg_start,
            c.loadavg_trials_start,
            c.loadavg_end
        );
        println!(
            "node {}: {} local pods, {} sets with {} elements, {} chains, {} rules; flannel subnet {}",
            c.node, c.local_pods, c.sets, c.set_elements, c.chains, c.rules, c.flannel_subnet
        );
        println!(
            "started pods: replicas of {} ({} created without IPs in {:.1} s); load {:.1} s; agent ready {:.2} s; agent VmHWM {}",
            c.template,
            c.trials + WARMUP,
            c.trial_pods_s,
            c.load.total_s,
            c.ready_s,
            mib(c.agent_hwm_kib)
        );
        println!(
            "{:<52} {:>8} {:>8} {:>8} {:>8} {:>8}   (ms; {} pairs, ABAB, {:.0} s)",
            "ADD, whole chain", "p50", "p90", "p99", "max", "mean", c.trials, c.trials_s
        );
        for ch in [&c.flannel, &c.sluice] {
            let p = ch.add;
            println!(
                "{:<52} {} {:>8}   failed={}{}",
                format!("{} ({})", ch.conflist, ch.plugins.join(" > ")),
                fmt_p(&p),
                ms_opt(p.map(|p| p.mean)),
                ch.failures,
                ch.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
        }
        println!(
            "ratio sluice/flannel: p50 {}, p99 {}; sluice adds {} ms at the median",
            c.ratio_p50.map_or("-".into(), |r| format!("{r:.2}x")),
            c.ratio_p99.map_or("-".into(), |r| format!("{r:.2}x")),
            ms_opt(c.added_p50_ms)
        );
        let a = &c.agent;
        println!(
            "agent's share (sluice_cni_add_seconds, {} ADDs): mean {} ms, p50 ~{} ms (bucket <= {}), p99 ~{} ms (bucket <= {})",
            a.count,
            ms_opt(a.mean_ms),
            ms_opt(a.p50_ms),
            ms_opt(a.p50_bound_ms),
            ms_opt(a.p99_ms),
            ms_opt(a.p99_bound_ms)
        );
        println!("{:<34} {}", "  agent compile per ADD", fmt_p(&a.compile));
        println!("{:<52} {}", "  agent apply per ADD", fmt_p(&a.apply));
        println!(
            "  commands per ADD p50 {}; ADDs without a sync {}, with several {}; DEL syncs not seen {}",
            a.commands_p50.map_or("-".into(), |c| format!("{c:.0}")),
            a.adds_without_sync,
            a.adds_with_several_syncs,
            c.del_sync_missing
        );
        println!(
            "isolation when ADD returned: sluice {}/{} pod IPs in ingress_v4; flannel alone {}/{} absent",
            c.isolation_found, c.isolation_checked, c.flannel_absent, c.flannel_checked
        );
    }
    let base = r.clusters.iter().find(|c| c.label == "baseline");
    if let Some(b) = base {
        for c in r.clusters.iter().filter(|c| c.label != "baseline") {
            let p = |c: &CniClusterReport| c.sluice.add.map(|p| p.p50);
            let f = |c: &CniClusterReport| c.flannel.add.map(|p| p.p50);
            println!();
            println!(
                "{} / baseline, p50: flannel alone {}, flannel + sluice {}",
                c.label,
                ratio_str(f(c), f(b)),
                ratio_str(p(c), p(b))
            );
        }
    }
    println!("total: {:.0} s", r.total_s);
}

fn ratio_str(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => ratio(a, b).map_or("-".into(), |r| format!("{r:.2}x")),
        _ => "-".into(),
    }
}

fn run_cni(args: &CniArgs) -> Result<CniReport> {
    let started = Instant::now();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("needs root (network namespaces, nft, CNI plugins)");
    }
    let tools = find_tools(args)?;
    install_signal_cleanup()?;
    let temp_logs;
    let log_dir = match &args.keep_logs {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp_logs =
                std::env::temp_dir().join(format!("sluice-cni-bench-{}", std::process::id()));
            std::fs::create_dir_all(&temp_logs)?;
            temp_logs.clone()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let run = CniRun {
        args,
        tools: &tools,
        log_dir: &log_dir,
        rt: &rt,
    };
    let agent_commit = agent_commit();
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
            let trials = args.baseline_trials.unwrap_or(args.trials);
            clusters.push(run.cluster("baseline", config, trials)?);
        }
        let config = SynthConfig {
            pods: args.pods,
            policies: args.policies,
            nodes: args.nodes,
            namespaces: args.namespaces,
            seed: args.seed,
        };
        let label = format!("{}k", args.pods as f64 / 1000.0);
        clusters.push(run.cluster(&label, config, args.trials)?);
        Ok(())
    })();
    if args.keep_logs.is_none() {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    result?;
    Ok(CniReport {
        machine: machine(&tools.agent, args.debounce.as_deref(), &args.resync),
        agent_commit,
        clusters,
        total_s: started.elapsed().as_secs_f64(),
    })
}

/// `sluice-agent-bench cni [FLAGS]`.
pub(super) fn main() -> ExitCode {
    let args = CniArgs::parse_from(
        std::iter::once(std::ffi::OsString::from("e2e/bench cni"))
            .chain(std::env::args_os().skip(2)),
    );
    match run_cni(&args) {
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
                print_cni_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice-agent-bench cni: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
