//! `e2e/cluster run`: scenario files (../shared/SCENARIOS.md, the same files as the lab) run
//! through the local cluster of `e2e/cluster` (real kube-apiserver, flanneld, kube-proxy, sluice
//! agents, the sluice-kubelet stand-in).
//!
//! Objects are applied with `kubectl apply`, updates as applies, deletes with `kubectl delete`.
//! Pods are created with their `spec.nodeName` (no scheduler runs) and get a container that
//! declares every port the scenario probes (the kubelet stand-in serves declared ports); the
//! runner waits until the kubelet reports them Running with IPs. Each Probe is retried as a whole
//! until it matches its expectation or `--converge` passes (enforcement is eventually
//! consistent); the last observation is reported. Connections are made from the source pod's
//! network namespace (`kubelet::pod_netns_name`; the node's for hostNetwork pods) to the
//! destination pod's IPs, or, for `via: service`, to the ClusterIP of a Service the runner makes
//! per target pod (with its EndpointSlice: no controller-manager runs), through kube-proxy.
//!
//! What cannot be honoured: scenario pod IPs (host-local allocates); ipBlocks that name a
//! scenario pod's address exactly (/32, /128) are rewritten to that pod's real address, with a
//! warning. Node documents are not applied: their names must be the cluster's nodes.
//!
//! The pure parts (manifests, ipBlock mapping, convergence) are unit-tested here; the rest needs
//! a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use sluice::compile::compile_node;
use sluice::model::PodKey;
use sluice::simulate::connection_allowed;
use sluice::snapshot::{parse_object, World};

use crate::kubelet::{fnv1a64, pod_netns_name};
use crate::matrix::{Mark, Report};
pub use crate::probe::http_get;
use crate::probe::{run_probes, sctp_supported, Outcome, ProbeReq, Servers};
use crate::runner::{validate, RunError, ScenarioRun};
use crate::scenario::{Family, ProbeSpec, Protocol, Scenario, Step, Via};

/// The label the runner puts on every pod it creates (value: [`service_name`]); the probe
/// Services select on it.
pub const POD_LABEL: &str = "lab.sluice.dev/pod";
/// `app.kubernetes.io/managed-by` of the Services and EndpointSlices the runner makes.
pub const MANAGED_BY: &str = "sluice-cluster-run";
/// Image of containers that name none (nothing runs it: the kubelet stand-in has no runtime).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// Name of the container added to declare the probed ports.
pub const PROBE_CONTAINER: &str = "lab-probe";
/// Namespaces the cluster has of its own: never deleted, only the objects applied in them are.
pub const SYSTEM_NAMESPACES: &[&str] = &[
    "default",
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "kube-flannel",
];

#[derive(Clone, Debug)]
pub struct Options {
    /// Per-connection timeout unless a Probe sets its own.
    pub timeout: Duration,
    /// Concurrent probe threads.
    pub parallelism: usize,
    /// How long a Probe is retried until it matches (enforcement is eventually consistent).
    pub converge: Duration,
    /// How long pods may take to be Running with IPs (and objects to be deleted).
    pub pod_timeout: Duration,
    /// Say on stderr what each checkpoint does.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(1),
            parallelism: 256,
            converge: Duration::from_secs(10),
            pod_timeout: Duration::from_secs(90),
            progress: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster's description ($SLUICE_CLUSTER_DIR/cluster.json, written by `e2e/cluster up`)

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterNode {
    /// The node's network namespace (hostNetwork pods live there).
    pub netns: String,
    /// The kubelet's `--netns-prefix`.
    pub pod_netns_prefix: String,
    /// The agent's HTTP address (`host:port`), when cluster.json says.
    pub agent_address: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub kubectl: PathBuf,
    pub kubeconfig: PathBuf,
    pub nodes: BTreeMap<String, ClusterNode>,
}

/// Parses `cluster.json`.
pub fn parse_cluster(text: &str) -> Result<Cluster, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let s = |v: &Value, k: &str| -> Result<String, String> {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("{k}: missing"))
    };
    let mut nodes = BTreeMap::new();
    for (i, n) in v
        .get("nodes")
        .and_then(Value::as_array)
        .ok_or("nodes: missing")?
        .iter()
        .enumerate()
    {
        let f = |k| s(n, k).map_err(|e| format!("nodes[{i}].{e}"));
        nodes.insert(
            f("name")?,
            ClusterNode {
                netns: f("netns")?,
                pod_netns_prefix: f("podNetnsPrefix")?,
                agent_address: s(n, "agentAddress").ok(),
            },
        );
    }
    Ok(Cluster {
        kubectl: s(&v, "kubectl")?.into(),
        kubeconfig: s(&v, "adminKubeconfig")?.into(),
        nodes,
    })
}

pub fn load_cluster(dir: &Path) -> Result<Cluster, String> {
    let path = dir.join("cluster.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "the cluster is not up: cannot read {} ({e}); run: e2e/cluster up",
            path.display()
        )
    })?;
    parse_cluster(&text).map_err(|e| format!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Manifests (pure)

/// Every (port, protocol) some Probe of the scenario uses, sorted.
pub fn probe_ports(scn: &Scenario) -> Vec<(u16, Protocol)> {
    let set: BTreeSet<(u16, Protocol)> = scn
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Probe { spec, .. } => Some((spec.port, spec.protocol)),
            _ => None,
        })
        .collect();
    set.into_iter().collect()
}

/// A DNS-1035 label unique per pod of a namespace: `lab-<name>-<8 hex of ns/name>`, at most 63
/// characters. The probe Service's name and the value of [`POD_LABEL`].
pub fn service_name(namespace: &str, name: &str) -> String {
    let hash = format!(
        "{:08x}",
        fnv1a64(format!("{namespace}/{name}").as_bytes()) as u32
    );
    let mut body: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '-'
            }
        })
        .collect();
    body.truncate(63 - "lab-".len() - 1 - hash.len());
    let body = body.trim_matches('-');
    if body.is_empty() {
        format!("lab-{hash}")
    } else {
        format!("lab-{body}-{hash}")
    }
}

fn obj_mut<'v>(v: &'v mut Value, key: &str) -> &'v mut serde_json::Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("just made an object")
}

/// The Pod as the runner creates it: the scenario's document without `status` (the kubelet
/// reports it), [`POD_LABEL`] added, every container named and with an image, and one more
/// container ([`PROBE_CONTAINER`]) declaring each probed port the pod does not declare yet
/// (unnamed, so named ports mean what the scenario says).
pub fn pod_manifest(doc: &Value, probed: &[(u16, Protocol)]) -> Value {
    let mut pod = doc.clone();
    if let Some(m) = pod.as_object_mut() {
        m.remove("status");
    }
    let namespace = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let metadata = obj_mut(&mut pod, "metadata");
    if !metadata.get("labels").is_some_and(Value::is_object) {
        metadata.insert("labels".into(), json!({}));
    }
    metadata["labels"][POD_LABEL] = json!(service_name(&namespace, &name));
    let spec = obj_mut(&mut pod, "spec");
    if !spec.get("containers").is_some_and(Value::is_array) {
        spec.insert("containers".into(), json!([]));
    }
    let containers = spec["containers"].as_array_mut().expect("just made a list");
    let mut declared = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, c) in containers.iter_mut().enumerate() {
        if !c.is_object() {
            *c = json!({});
        }
        if c["name"].as_str().is_none_or(str::is_empty) {
            c["name"] = json!(format!("c{i}"));
        }
        names.insert(c["name"].as_str().unwrap_or_default().to_string());
        if c["image"].as_str().is_none_or(str::is_empty) {
            c["image"] = json!(PAUSE_IMAGE);
        }
        for p in c["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let port = p["containerPort"].as_u64().unwrap_or(0);
            let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
            declared.insert((port, proto));
        }
    }
    let missing: Vec<Value> = probed
        .iter()
        .filter(|(port, proto)| !declared.contains(&(u64::from(*port), proto.to_string())))
        .map(|(port, proto)| json!({"containerPort": port, "protocol": proto.to_string()}))
        .collect();
    if !missing.is_empty() {
        let mut cname = PROBE_CONTAINER.to_string();
        let mut n = 1;
        while names.contains(&cname) {
            n += 1;
            cname = format!("{PROBE_CONTAINER}-{n}");
        }
        containers.push(json!({"name": cname, "image": PAUSE_IMAGE, "ports": missing}));
    }
    pod
}

/// A copy without `status` (the API server owns it).
pub fn strip_status(doc: &Value) -> Value {
    let mut v = doc.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    v
}

fn port_name(port: u16, proto: Protocol) -> String {
    format!("{}-{port}", proto.to_string().to_ascii_lowercase())
}

/// The ClusterIP Service in front of one pod: selects [`POD_LABEL`], one named port per probed
/// (port, protocol), targetPort = port.
pub fn service_manifest(namespace: &str, pod: &str, ports: &[(u16, Protocol)]) -> Value {
    let svc = service_name(namespace, pod);
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port, proto)| {
            json!({"name": port_name(*port, *proto), "port": port, "targetPort": port,
                   "protocol": proto.to_string()})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": svc,
                     "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
        "spec": {"type": "ClusterIP", "selector": {POD_LABEL: svc}, "ports": ports},
    })
}

/// The EndpointSlice of that Service for one address family (no controller-manager runs, so
/// nothing else makes it): the pod's addresses of `family`, ready, on `node`.
pub fn endpoint_slice_manifest(
    namespace: &str,
    pod: &str,
    node: &str,
    family: Family,
    ips: &[IpAddr],
    ports: &[(u16, Protocol)],
) -> Value {
    let svc = service_name(namespace, pod);
    let (suffix, address_type) = match family {
        Family::V4 => ("ipv4", "IPv4"),
        Family::V6 => ("ipv6", "IPv6"),
    };
    let addresses: Vec<String> = ips
        .iter()
        .filter(|ip| family_of(**ip) == family)
        .map(IpAddr::to_string)
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port, proto)| {
            json!({"name": port_name(*port, *proto), "port": port, "protocol": proto.to_string()})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"namespace": namespace, "name": format!("{svc}-{suffix}"),
                     "labels": {"kubernetes.io/service-name": svc,
                                "endpointslice.kubernetes.io/managed-by": "lab.sluice.dev",
                                "app.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": address_type,
        "endpoints": [{
            "addresses": addresses,
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": node,
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
        }],
        "ports": ports,
    })
}

pub fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// An ipBlock `cidr`/`except` entry that is exactly one address (/32, /128).
fn host_prefix(text: &str) -> Option<IpAddr> {
    let (ip, len) = text.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let full = match ip {
        IpAddr::V4(_) => "32",
        IpAddr::V6(_) => "128",
    };
    (len == full).then_some(ip)
}

/// Every `cidr`/`except` string of a NetworkPolicy's ipBlocks, mutably.
fn ip_block_entries(policy: &mut Value) -> Vec<&mut Value> {
    let mut out = Vec::new();
    let spec = &mut policy["spec"];
    let Some(spec) = spec.as_object_mut() else {
        return out;
    };
    for (dir, peers) in spec.iter_mut().filter_map(|(k, v)| match k.as_str() {
        "ingress" => Some(("from", v)),
        "egress" => Some(("to", v)),
        _ => None,
    }) {
        for rule in peers.as_array_mut().into_iter().flatten() {
            for peer in rule
                .get_mut(dir)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let Some(block) = peer.get_mut("ipBlock").and_then(Value::as_object_mut) else {
                    continue;
                };
                for (k, v) in block.iter_mut() {
                    match k.as_str() {
                        "cidr" => out.push(v),
                        "except" => out.extend(v.as_array_mut().into_iter().flatten()),
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

/// The scenario addresses (/32, /128) a NetworkPolicy's ipBlocks name that are in `known`.
pub fn pinned_addresses(policy: &Value, known: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
    let mut p = policy.clone();
    ip_block_entries(&mut p)
        .into_iter()
        .filter_map(|v| v.as_str().and_then(host_prefix))
        .filter(|ip| known.contains(ip))
        .collect()
}

/// Rewrites ipBlock entries that are exactly a scenario pod's address to that pod's real
/// address of the same family: `map` is scenario address -> (pod, real address). Returns one
/// note per rewrite.
pub fn map_ip_blocks(policy: &mut Value, map: &BTreeMap<IpAddr, (String, IpAddr)>) -> Vec<String> {
    let mut notes = Vec::new();
    for entry in ip_block_entries(policy) {
        let Some(ip) = entry.as_str().and_then(host_prefix) else {
            continue;
        };
        if let Some((pod, real)) = map.get(&ip) {
            let len = if real.is_ipv4() { 32 } else { 128 };
            let new = format!("{real}/{len}");
            if new != entry.as_str().unwrap_or_default() {
                notes.push(format!(
                    "ipBlock {} is {pod}'s address in the scenario: applied as {new}",
                    entry.as_str().unwrap_or_default()
                ));
                *entry = json!(new);
            }
        }
    }
    notes
}

// ---------------------------------------------------------------------------------------------
// Convergence (pure)

/// Observes (`observe(round)`, rounds from 1) until every report has no failed cell, or `bound`
/// has passed since the first observation started, pausing `pause` between rounds. Returns the
/// last observation and how many rounds were made (at least one).
pub fn converge(
    bound: Duration,
    pause: Duration,
    mut observe: impl FnMut(u32) -> Vec<Report>,
) -> (Vec<Report>, u32) {
    let started = Instant::now();
    let mut round = 1;
    loop {
        let reports = observe(round);
        if reports.iter().all(|r| r.failed() == 0) || started.elapsed() + pause >= bound {
            return (reports, round);
        }
        std::thread::sleep(pause);
        round += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Enforcement barrier: before a Probe, wait until every node's agent has the API's latest state
// in its kernel, so that a probe never passes on the rules of before the last change.

/// The runner's own namespace for its marker objects (kept between runs: without a
/// controller-manager a deleted namespace is never finalized).
pub const BARRIER_NAMESPACE: &str = "sluice-cluster-run";

/// One object of each kind the agents watch, with `mark` in an annotation: applying it makes
/// one event per watch. The policy selects no pod; the pod is bound to no node.
pub fn barrier_manifest(mark: &str) -> Value {
    let meta = |name: &str| {
        json!({"name": name, "namespace": BARRIER_NAMESPACE,
               "annotations": {"sluice-cluster-run/barrier": mark}})
    };
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": BARRIER_NAMESPACE,
                      "annotations": {"sluice-cluster-run/barrier": mark}}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "default", "namespace": BARRIER_NAMESPACE}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta("barrier"),
         "spec": {"automountServiceAccountToken": false,
                  "containers": [{"name": "barrier", "image": "registry.k8s.io/pause:3.10"}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("barrier"),
         "spec": {"podSelector": {"matchLabels": {"sluice-cluster-run/selects": "nothing"}},
                  "policyTypes": ["Ingress"]}},
    ]})
}

/// The agents' `/applied` names of the watched kinds, by the kind of object.
fn watched_resource(kind: &str) -> Option<&'static str> {
    match kind {
        "Namespace" => Some("namespaces"),
        "Pod" => Some("pods"),
        "NetworkPolicy" => Some("networkpolicies"),
        _ => None,
    }
}

/// Per watched resource, the resourceVersion `kubectl apply -o json` of a barrier List gave.
pub fn barrier_versions(applied: &Value) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let items = applied["items"]
        .as_array()
        .context("kubectl apply -o json: no items")?;
    let mut out = BTreeMap::new();
    for item in items {
        let Some(resource) = item["kind"].as_str().and_then(watched_resource) else {
            continue;
        };
        let version = item["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{resource}: no numeric resourceVersion"))?;
        out.insert(resource, version);
    }
    if out.len() != 3 {
        bail!("kubectl apply -o json: expected a namespace, a pod and a policy, got {out:?}");
    }
    Ok(out)
}

/// The resources an agent's `/applied` document has not yet reached (empty: all reached).
/// The versions are etcd revisions: numbers, comparable (a test harness may rely on that).
pub fn lagging(doc: &Value, wanted: &BTreeMap<&'static str, u64>) -> Vec<&'static str> {
    wanted
        .iter()
        .filter(|(resource, want)| {
            doc[**resource]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .is_none_or(|have| have < **want)
        })
        .map(|(resource, _)| *resource)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// kubectl

pub struct Kubectl {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    namespaced_kinds: OnceLock<Vec<String>>,
}

impl Kubectl {
    pub fn new(cluster: &Cluster) -> Kubectl {
        Kubectl {
            bin: cluster.kubectl.clone(),
            kubeconfig: cluster.kubeconfig.clone(),
            namespaced_kinds: OnceLock::new(),
        }
    }

    /// Runs kubectl; stdout on success, an error with kubectl's stderr otherwise.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=30s")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if let Some(text) = stdin {
            use std::io::Write as _;
            let mut pipe = child.stdin.take().context("kubectl stdin")?;
            pipe.write_all(text.as_bytes())
                .context("writing to kubectl")?;
        }
        let out = child.wait_with_output().context("waiting for kubectl")?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }

    pub fn apply(&self, manifest: &Value) -> anyhow::Result<()> {
        self.run(&["apply", "-f", "-"], Some(&manifest.to_string()))
            .map(drop)
    }

    pub fn get_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let text = self.run(&all, None)?;
        serde_json::from_str(&text).context("kubectl get: not JSON")
    }

    /// Every namespaced resource that can be listed and deleted (asked once).
    fn namespaced_kinds(&self) -> anyhow::Result<&[String]> {
        if let Some(k) = self.namespaced_kinds.get() {
            return Ok(k);
        }
        let out = self.run(
            &[
                "api-resources",
                "--namespaced=true",
                "--verbs=list,delete",
                "-o",
                "name",
            ],
            None,
        )?;
        let kinds = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "pods")
            .map(str::to_string)
            .collect();
        Ok(self.namespaced_kinds.get_or_init(|| kinds))
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// (probe of the group, from, to).
type CellKey = (usize, String, String);

/// A pod as the API reports it.
#[derive(Clone, Debug)]
struct LivePod {
    node: String,
    ips: Vec<IpAddr>,
    phase: String,
    ready: bool,
    host_network: bool,
    deleting: bool,
}

fn live_pod(v: &Value) -> LivePod {
    let status = &v["status"];
    LivePod {
        node: v["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
        ips: status["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["ip"].as_str()?.parse().ok())
            .collect(),
        phase: status["phase"].as_str().unwrap_or("Pending").to_string(),
        ready: status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        host_network: v["spec"]["hostNetwork"].as_bool().unwrap_or(false),
        deleting: v["metadata"]["deletionTimestamp"].is_string(),
    }
}

struct Run<'a> {
    scn: &'a Scenario,
    k: &'a Kubectl,
    cluster: &'a Cluster,
    opts: &'a Options,
    stop: &'a AtomicBool,
    /// The scenario's own view (its pod addresses: ipBlock mapping; SCTP without sockets).
    world: World,
    probed: Vec<(u16, Protocol)>,
    /// Pods applied and not deleted: their manifest as applied.
    pods: BTreeMap<PodKey, Value>,
    /// Namespaces this scenario owns (deleted at the end).
    namespaces: BTreeSet<String>,
    /// Objects applied outside owned namespaces (deleted one by one at the end), by
    /// (kind, namespace, name).
    outside: BTreeMap<(String, String, String), Value>,
    /// Probe Services made: pod -> ports.
    services: BTreeMap<PodKey, Vec<(u16, Protocol)>>,
    /// Addresses the kubelet reported last.
    live: BTreeMap<PodKey, LivePod>,
    servers: Servers,
    warnings: Vec<String>,
}

fn lab(e: impl Into<anyhow::Error>) -> RunError {
    RunError::Lab(e.into())
}

fn invalid(scn: &Scenario, doc: usize, what: &str, msg: impl std::fmt::Display) -> RunError {
    RunError::Invalid(format!("{}: document {doc} ({what}): {msg}", scn.path))
}

/// Namespaces a scenario names (Namespace documents and the namespaces of its objects).
fn scenario_namespaces(scn: &Scenario) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in &scn.steps {
        match s {
            Step::Object { value, .. } => {
                if value["kind"] == "Namespace" {
                    if let Some(n) = value["metadata"]["name"].as_str() {
                        out.insert(n.to_string());
                    }
                } else if let Some(n) = value["metadata"]["namespace"].as_str() {
                    out.insert(n.to_string());
                }
            }
            Step::Delete {
                namespace: Some(n), ..
            } => {
                out.insert(n.clone());
            }
            _ => {}
        }
    }
    out
}

/// Runs one scenario through the cluster. Everything it created is deleted before it returns
/// (also on errors and interruption).
pub fn run(
    scn: &Scenario,
    k: &Kubectl,
    cluster: &Cluster,
    opts: &Options,
    stop: &AtomicBool,
) -> Result<ScenarioRun, RunError> {
    let nodes = validate(scn)?;
    let missing: Vec<&String> = nodes
        .keys()
        .filter(|n| !cluster.nodes.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        let have: Vec<&String> = cluster.nodes.keys().collect();
        return Err(RunError::Invalid(format!(
            "{}: names node(s) {} that the cluster lacks (it has {}; e2e/cluster up --nodes N)",
            scn.path,
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            have.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )));
    }
    let mut r = Run {
        scn,
        k,
        cluster,
        opts,
        stop,
        world: World::default(),
        probed: probe_ports(scn),
        pods: BTreeMap::new(),
        namespaces: BTreeSet::new(),
        outside: BTreeMap::new(),
        services: BTreeMap::new(),
        live: BTreeMap::new(),
        servers: Servers::new(),
        warnings: Vec::new(),
    };
    // Leftovers of an interrupted run first.
    let owned: Vec<String> = scenario_namespaces(scn)
        .into_iter()
        .filter(|n| !SYSTEM_NAMESPACES.contains(&n.as_str()))
        .collect();
    let result = (|| {
        for ns in &owned {
            r.delete_namespace(ns).map_err(lab)?;
        }
        r.steps()
    })();
    let cleanup = r.cleanup();
    let reports = result?;
    cleanup.map_err(|e| lab(e.context("cleaning up")))?;
    Ok(ScenarioRun {
        reports,
        warnings: r.warnings,
    })
}

impl Run<'_> {
    fn say(&self, msg: impl std::fmt::Display) {
        if self.opts.progress {
            eprintln!("  {msg}");
        }
    }

    fn check_stop(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }

    fn warn(&mut self, w: String) {
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }

    /// Waits until every node's agent has applied the API's state as of now (a fresh barrier
    /// write, see [`barrier_manifest`]), bounded by `--converge`: the probes that follow see the
    /// rules of the last change, never those of before. Past the bound it warns and goes on
    /// (the probes then tell whether it mattered).
    fn wait_enforced(&mut self) -> anyhow::Result<()> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t0 = Instant::now();
        let mark = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = self.k.run(
            &["apply", "-o", "json", "-f", "-"],
            Some(&barrier_manifest(&mark).to_string()),
        )?;
        let wanted =
            barrier_versions(&serde_json::from_str(&out).context("kubectl apply -o json")?)?;
        let cluster: &Cluster = self.cluster;
        let mut waiting: Vec<(&String, &String)> = cluster
            .nodes
            .iter()
            .filter_map(|(name, n)| n.agent_address.as_ref().map(|a| (name, a)))
            .collect();
        if waiting.is_empty() {
            self.warn(
                "cluster.json names no agent addresses: probes are retried, not held until enforced"
                    .to_string(),
            );
            return Ok(());
        }
        let nodes = waiting.len();
        let mut last = String::new();
        loop {
            waiting.retain(|(node, addr)| {
                let behind = match http_get(addr, "/applied", Duration::from_secs(1)) {
                    Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                        Ok(doc) => lagging(&doc, &wanted)
                            .iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        Err(e) => format!("/applied is not JSON: {e}"),
                    },
                    Ok((status, _)) => format!("/applied answered {status}"),
                    Err(e) => format!("{e:#}"),
                };
                if !behind.is_empty() {
                    last = format!("{node}: {behind}");
                }
                !behind.is_empty()
            });
            if waiting.is_empty() {
                self.say(format!(
                    "the agents on all {nodes} nodes have the latest changes in the kernel \
                     ({:.0}ms, barrier write included)",
                    t0.elapsed().as_secs_f64() * 1000.0
                ));
                return Ok(());
            }
            if t0.elapsed() >= self.opts.converge {
                self.warn(format!(
                    "not every agent had applied the latest changes after {:?} (last: {last}); probed anyway",
                    self.opts.converge
                ));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn steps(&mut self) -> Result<Vec<Report>, RunError> {
        let scn = self.scn;
        let mut reports = Vec::new();
        let mut i = 0;
        while i < scn.steps.len() {
            self.check_stop().map_err(lab)?;
            match &scn.steps[i] {
                Step::Object { doc, value } => {
                    self.apply_object(*doc, value)?;
                    i += 1;
                }
                Step::Delete {
                    doc,
                    kind,
                    namespace,
                    name,
                } => {
                    self.delete(*doc, kind, namespace.as_deref(), name)?;
                    i += 1;
                }
                Step::Probe { .. } => {
                    let mut group = Vec::new();
                    while let Some(Step::Probe { doc, spec }) = scn.steps.get(i) {
                        group.push((*doc, spec));
                        i += 1;
                    }
                    reports.extend(self.probe_group(&group)?);
                }
            }
        }
        Ok(reports)
    }

    fn apply_object(&mut self, doc: usize, value: &Value) -> Result<(), RunError> {
        let scn = self.scn;
        let what = sluice::snapshot::describe_document(value);
        let object = parse_object(value).map_err(|e| invalid(scn, doc, &what, e))?;
        self.world
            .apply(object)
            .map_err(|e| invalid(scn, doc, &what, e))?;
        let kind = value["kind"].as_str().unwrap_or_default();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let namespace = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let err = |e: anyhow::Error| lab(e.context(format!("document {doc} ({what})")));
        match kind {
            "Node" => {
                self.say(format!(
                    "document {doc}: Node {name} is the cluster's (not applied)"
                ));
                return Ok(());
            }
            "Namespace" => {
                self.k.apply(&strip_status(value)).map_err(err)?;
                if SYSTEM_NAMESPACES.contains(&name.as_str()) {
                    self.warn(format!(
                        "document {doc}: Namespace {name} is one of the cluster's own: its labels stay as applied"
                    ));
                } else {
                    self.ensure_namespace(&name).map_err(err)?;
                }
                return Ok(());
            }
            _ => {}
        }
        if !namespace.is_empty()
            && !self.namespaces.contains(&namespace)
            && !SYSTEM_NAMESPACES.contains(&namespace.as_str())
        {
            // An object in a namespace the scenario never declared (the lab takes it): make it.
            self.ensure_namespace(&namespace).map_err(err)?;
        }
        if kind == "Pod" && SYSTEM_NAMESPACES.contains(&namespace.as_str()) {
            self.ensure_default_sa(&namespace).map_err(err)?;
        }
        let mut manifest = if kind == "Pod" {
            pod_manifest(value, &self.probed)
        } else {
            strip_status(value)
        };
        if kind == "Pod" {
            let key = PodKey::new(namespace.clone(), name.clone());
            if let Some(old) = self.pods.get(&key) {
                if old["spec"] != manifest["spec"] {
                    // A pod's spec is immutable: delete, then create it again.
                    self.say(format!(
                        "document {doc}: {key}'s spec changed: deleting and creating it again"
                    ));
                    self.delete_pod(&key).map_err(err)?;
                }
            }
            self.pods.insert(key, manifest.clone());
        }
        if kind == "NetworkPolicy" {
            let known: BTreeSet<IpAddr> = self
                .world
                .index
                .pods
                .values()
                .flat_map(|p| p.ips.iter().copied())
                .collect();
            if !pinned_addresses(&manifest, &known).is_empty() {
                self.wait_pods().map_err(err)?;
                let mut map = BTreeMap::new();
                for (key, p) in &self.world.index.pods {
                    let Some(live) = self.live.get(key) else {
                        continue;
                    };
                    for ip in &p.ips {
                        if let Some(real) =
                            live.ips.iter().find(|r| family_of(**r) == family_of(*ip))
                        {
                            map.insert(*ip, (key.to_string(), *real));
                        }
                    }
                }
                for n in map_ip_blocks(&mut manifest, &map) {
                    self.warn(format!("document {doc} ({what}): {n}"));
                }
            }
        }
        if let Err(e) = self.k.apply(&manifest) {
            // The API server refuses the object (422 Invalid): the scenario is invalid here.
            let msg = format!("{e:#}");
            if msg.contains(" is invalid: ") {
                return Err(invalid(
                    scn,
                    doc,
                    &what,
                    format!("the API server refuses it: {msg}"),
                ));
            }
            return Err(err(e));
        }
        if namespace.is_empty() || !self.namespaces.contains(&namespace) {
            self.outside
                .insert((kind.to_string(), namespace, name), manifest);
        }
        Ok(())
    }

    fn delete(
        &mut self,
        doc: usize,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), RunError> {
        self.world
            .delete(kind, namespace, name)
            .map_err(|e| invalid(self.scn, doc, "Delete", e))?;
        let err = |e: anyhow::Error| lab(e.context(format!("document {doc} (Delete)")));
        let ns = namespace.unwrap_or_default().to_string();
        match kind {
            "Namespace" if SYSTEM_NAMESPACES.contains(&name) => {
                return Err(err(anyhow!(
                    "Namespace {name} is one of the cluster's own: the runner does not delete it"
                )));
            }
            "Node" => {
                return Err(err(anyhow!(
                    "Node {name} is one of the cluster's nodes: the runner does not delete nodes"
                )));
            }
            "Namespace" => {
                self.delete_namespace(name).map_err(err)?;
                self.namespaces.remove(name);
            }
            "Pod" => self
                .delete_pod(&PodKey::new(ns.clone(), name))
                .map_err(err)?,
            _ => {
                let key = (kind.to_string(), ns.clone(), name.to_string());
                if let Some(manifest) = self.outside.remove(&key) {
                    self.k
                        .run(
                            &["delete", "--ignore-not-found", "--wait=true", "-f", "-"],
                            Some(&manifest.to_string()),
                        )
                        .map_err(err)?;
                } else {
                    let mut args = vec!["delete", kind, name, "--ignore-not-found"];
                    if !ns.is_empty() {
                        args.extend(["-n", ns.as_str()]);
                    }
                    self.k.run(&args, None).map_err(err)?;
                }
            }
        }
        Ok(())
    }

    /// Takes a namespace as the scenario's (deleted at the end) and gives it the `default`
    /// ServiceAccount (no controller-manager runs; the ServiceAccount admission needs it).
    fn ensure_namespace(&mut self, name: &str) -> anyhow::Result<()> {
        if self.namespaces.insert(name.to_string()) {
            let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            if self
                .k
                .run(
                    &["get", "namespace", name, "--ignore-not-found", "-o", "name"],
                    None,
                )?
                .trim()
                .is_empty()
            {
                self.k.apply(&ns)?;
            }
            self.k
                .apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount",
                                 "metadata": {"namespace": name, "name": "default"}}))?;
        }
        Ok(())
    }

    /// The `default` ServiceAccount of one of the cluster's own namespaces (made when missing,
    /// and then removed at the end).
    fn ensure_default_sa(&mut self, ns: &str) -> anyhow::Result<()> {
        let have = self.k.run(
            &[
                "get",
                "serviceaccount",
                "default",
                "-n",
                ns,
                "--ignore-not-found",
                "-o",
                "name",
            ],
            None,
        )?;
        if have.trim().is_empty() {
            let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"namespace": ns, "name": "default"}});
            self.k.apply(&sa)?;
            self.outside.insert(
                ("ServiceAccount".into(), ns.to_string(), "default".into()),
                sa,
            );
        }
        Ok(())
    }

    /// Deletes a pod and waits until it is gone (the kubelet tore it down).
    fn delete_pod(&mut self, key: &PodKey) -> anyhow::Result<()> {
        let timeout = format!("--timeout={}s", self.opts.pod_timeout.as_secs().max(1));
        self.k.run(
            &[
                "delete",
                "pod",
                "-n",
                &key.namespace,
                &key.name,
                "--ignore-not-found",
                "--wait=true",
                &timeout,
            ],
            None,
        )?;
        self.pods.remove(key);
        self.live.remove(key);
        self.outside
            .remove(&("Pod".to_string(), key.namespace.clone(), key.name.clone()));
        Ok(())
    }

    /// Deletes a namespace as the namespace controller would (none runs): the namespace first
    /// (Terminating: nothing new gets in), its pods (waiting for the kubelet), everything else
    /// in it, then the `kubernetes` finalizer, then waits until it is gone.
    fn delete_namespace(&mut self, ns: &str) -> anyhow::Result<()> {
        let exists = self.k.run(
            &["get", "namespace", ns, "--ignore-not-found", "-o", "name"],
            None,
        )?;
        if exists.trim().is_empty() {
            return Ok(());
        }
        self.say(format!("deleting namespace {ns}"));
        self.k.run(
            &[
                "delete",
                "namespace",
                ns,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        )?;
        let timeout = format!("--timeout={}s", self.opts.pod_timeout.as_secs().max(1));
        self.k.run(
            &[
                "delete",
                "pods",
                "--all",
                "-n",
                ns,
                "--wait=true",
                "--ignore-not-found",
                &timeout,
            ],
            None,
        )?;
        let kinds = self.k.namespaced_kinds()?.join(",");
        if !kinds.is_empty() {
            self.k.run(
                &[
                    "delete",
                    &kinds,
                    "--all",
                    "-n",
                    ns,
                    "--wait=false",
                    "--ignore-not-found",
                ],
                None,
            )?;
        }
        let deadline = Instant::now() + self.opts.pod_timeout;
        loop {
            let v = self.k.run(
                &["get", "namespace", ns, "--ignore-not-found", "-o", "json"],
                None,
            )?;
            if v.trim().is_empty() {
                break;
            }
            let mut v: Value = serde_json::from_str(&v).context("namespace: not JSON")?;
            if v["spec"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty())
            {
                v["spec"]["finalizers"] = json!([]);
                self.k.run(
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
            self.k.run(
                &[
                    "delete",
                    "namespace",
                    ns,
                    "--wait=false",
                    "--ignore-not-found",
                ],
                None,
            )?;
            if Instant::now() >= deadline {
                bail!(
                    "namespace {ns} still there after {:?}",
                    self.opts.pod_timeout
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| k.namespace == ns)
            .cloned()
            .collect();
        for k in gone {
            self.pods.remove(&k);
            self.live.remove(&k);
            self.services.remove(&k);
        }
        self.outside.retain(|(_, n, _), _| n != ns);
        Ok(())
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        // Objects outside owned namespaces: pods last-applied first (they wait for the kubelet).
        let outside: Vec<Value> = std::mem::take(&mut self.outside).into_values().collect();
        for m in outside.iter().rev() {
            if let Err(e) = self.k.run(
                &["delete", "--ignore-not-found", "--wait=true", "-f", "-"],
                Some(&m.to_string()),
            ) {
                first_error.get_or_insert(e);
            }
        }
        // Probe Services in namespaces we do not own.
        let services: Vec<PodKey> = self.services.keys().cloned().collect();
        for key in services {
            if self.namespaces.contains(&key.namespace) {
                continue;
            }
            let svc = service_name(&key.namespace, &key.name);
            let selector = format!("kubernetes.io/service-name={svc}");
            for args in [
                vec![
                    "delete",
                    "service",
                    "-n",
                    &key.namespace,
                    &svc,
                    "--ignore-not-found",
                ],
                vec![
                    "delete",
                    "endpointslices",
                    "-n",
                    &key.namespace,
                    "-l",
                    &selector,
                    "--ignore-not-found",
                ],
            ] {
                if let Err(e) = self.k.run(&args, None) {
                    first_error.get_or_insert(e);
                }
            }
        }
        let owned: Vec<String> = self.namespaces.iter().cloned().collect();
        for ns in owned {
            if let Err(e) = self.delete_namespace(&ns) {
                first_error.get_or_insert(e);
            }
        }
        self.servers.stop();
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until every pod applied is Running with IPs (the kubelet's report); keeps them in
    /// `live`.
    fn wait_pods(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            self.check_stop()?;
            let list = self.k.get_json(&["pods", "--all-namespaces"])?;
            let mut seen = BTreeMap::new();
            for item in list["items"].as_array().into_iter().flatten() {
                let key = PodKey::new(
                    item["metadata"]["namespace"].as_str().unwrap_or_default(),
                    item["metadata"]["name"].as_str().unwrap_or_default(),
                );
                if self.pods.contains_key(&key) {
                    seen.insert(key, live_pod(item));
                }
            }
            let waiting: Vec<String> = self
                .pods
                .keys()
                .filter_map(|k| match seen.get(k) {
                    None => Some(format!("{k} (not found)")),
                    Some(p) if p.deleting => Some(format!("{k} (being deleted)")),
                    Some(p) if p.phase != "Running" || p.ips.is_empty() => Some(format!(
                        "{k} ({}{})",
                        p.phase,
                        if p.ips.is_empty() { ", no IP" } else { "" }
                    )),
                    Some(_) => None,
                })
                .collect();
            if waiting.is_empty() {
                for (k, p) in &seen {
                    if !p.ready {
                        self.warn(format!(
                            "pod {k} is Running but not Ready (the kubelet could not serve a port; see its log)"
                        ));
                    }
                }
                self.live = seen;
                return Ok(());
            }
            if started.elapsed() >= self.opts.pod_timeout {
                bail!(
                    "pods not Running with IPs after {:?}: {} (kubelet logs: $SLUICE_CLUSTER_DIR/nodes/*/kubelet.log)",
                    self.opts.pod_timeout,
                    waiting.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The netns connections from `key` are made in.
    fn source_netns(&self, key: &PodKey) -> anyhow::Result<String> {
        let live = self
            .live
            .get(key)
            .ok_or_else(|| anyhow!("pod {key} is not running"))?;
        let node =
            self.cluster.nodes.get(&live.node).ok_or_else(|| {
                anyhow!("pod {key} is on node {} unknown to cluster.json", live.node)
            })?;
        Ok(if live.host_network {
            node.netns.clone()
        } else {
            pod_netns_name(&node.pod_netns_prefix, &key.namespace, &key.name)
        })
    }

    /// Makes (or updates) the probe Services of `targets` with the ports they need, and their
    /// EndpointSlices; returns each target's ClusterIPs.
    fn ensure_services(
        &mut self,
        targets: &BTreeMap<PodKey, BTreeSet<(u16, Protocol)>>,
    ) -> anyhow::Result<BTreeMap<PodKey, Vec<IpAddr>>> {
        let mut items = Vec::new();
        for (key, ports) in targets {
            let entry = self.services.entry(key.clone()).or_default();
            for p in ports {
                if !entry.contains(p) {
                    entry.push(*p);
                }
            }
            entry.sort();
            let live = self
                .live
                .get(key)
                .ok_or_else(|| anyhow!("pod {key} is not running"))?;
            items.push(service_manifest(&key.namespace, &key.name, entry));
            for family in [Family::V4, Family::V6] {
                if live.ips.iter().any(|ip| family_of(*ip) == family) {
                    items.push(endpoint_slice_manifest(
                        &key.namespace,
                        &key.name,
                        &live.node,
                        family,
                        &live.ips,
                        entry,
                    ));
                }
            }
        }
        if items.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.k
            .apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?;
        let list = self.k.get_json(&[
            "services",
            "--all-namespaces",
            "-l",
            &format!("app.kubernetes.io/managed-by={MANAGED_BY}"),
        ])?;
        let mut out = BTreeMap::new();
        for key in targets.keys() {
            let svc = service_name(&key.namespace, &key.name);
            let item = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| {
                    i["metadata"]["namespace"] == key.namespace.as_str()
                        && i["metadata"]["name"] == svc.as_str()
                })
                .ok_or_else(|| anyhow!("service {}/{svc} not found after apply", key.namespace))?;
            let ips: Vec<IpAddr> = item["spec"]["clusterIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str()?.parse().ok())
                .collect();
            out.insert(key.clone(), ips);
        }
        Ok(out)
    }

    fn probe_group(&mut self, group: &[(usize, &ProbeSpec)]) -> Result<Vec<Report>, RunError> {
        let t0 = Instant::now();
        self.wait_pods()
            .map_err(|e| lab(e.context("waiting for pods")))?;
        let ready_in = t0.elapsed();
        let title = |doc: usize, spec: &ProbeSpec| format!("document {doc}: {}", spec.describe());

        // Services first (all targets of all via: service probes at once).
        let mut svc_targets: BTreeMap<PodKey, BTreeSet<(u16, Protocol)>> = BTreeMap::new();
        for (_, spec) in group.iter().filter(|(_, s)| s.via == Via::Service) {
            for c in &spec.expect.columns {
                let key: PodKey = c.parse().map_err(|e| lab(anyhow!("{c}: {e}")))?;
                svc_targets
                    .entry(key)
                    .or_default()
                    .insert((spec.port, spec.protocol));
            }
        }
        let cluster_ips = self
            .ensure_services(&svc_targets)
            .map_err(|e| lab(e.context("probe Services")))?;
        self.wait_enforced()
            .map_err(|e| lab(e.context("waiting for the agents")))?;

        // What each probe connects: (probe, from, to, family, request).
        struct Attempt {
            probe: usize,
            from: String,
            to: String,
            family: Family,
            req: ProbeReq,
        }
        let mut attempts: Vec<(Duration, Attempt)> = Vec::new();
        let mut fixed: BTreeMap<usize, Report> = BTreeMap::new();
        let mut unobservable: Vec<(usize, String, String, Family, String)> = Vec::new();
        for (idx, (doc, spec)) in group.iter().enumerate() {
            if spec.protocol == Protocol::Sctp && !sctp_supported() {
                fixed.insert(idx, self.sctp_compiled(title(*doc, spec), spec));
                continue;
            }
            let timeout = spec.timeout.unwrap_or(self.opts.timeout);
            for c in &spec.expect.columns {
                let to_key: PodKey = c.parse().map_err(|e| lab(anyhow!("{c}: {e}")))?;
                if spec.protocol == Protocol::Sctp {
                    let ns = self.source_netns(&to_key).map_err(lab)?;
                    self.servers
                        .ensure(&ns, spec.port, spec.protocol)
                        .map_err(|e| lab(e.context(format!("an SCTP server in {c}"))))?;
                }
                let addresses: Vec<IpAddr> = match spec.via {
                    Via::Pod => self.live.get(&to_key).map(|p| p.ips.clone()),
                    Via::Service => cluster_ips.get(&to_key).cloned(),
                }
                .unwrap_or_default();
                let families: Vec<Family> = match spec.family {
                    Some(f) => vec![f],
                    None => {
                        let mut f: Vec<Family> =
                            addresses.iter().map(|ip| family_of(*ip)).collect();
                        f.sort();
                        f.dedup();
                        f
                    }
                };
                for r in spec.expect.row_names() {
                    if r == c || spec.expect.get(r, c) == Some(Mark::NotProbed) {
                        continue;
                    }
                    let from_key: PodKey = r.parse().map_err(|e| lab(anyhow!("{r}: {e}")))?;
                    let from_netns = self.source_netns(&from_key).map_err(lab)?;
                    for f in &families {
                        let Some(ip) = addresses.iter().find(|ip| family_of(**ip) == *f) else {
                            let what = match spec.via {
                                Via::Pod => "the pod has",
                                Via::Service => "its Service has",
                            };
                            unobservable.push((
                                idx,
                                r.to_string(),
                                c.clone(),
                                *f,
                                format!("{what} no {f} address in this cluster"),
                            ));
                            continue;
                        };
                        attempts.push((
                            timeout,
                            Attempt {
                                probe: idx,
                                from: r.to_string(),
                                to: c.clone(),
                                family: *f,
                                req: ProbeReq {
                                    from_netns: from_netns.clone(),
                                    to: SocketAddr::new(*ip, spec.port),
                                    proto: spec.protocol,
                                },
                            },
                        ));
                    }
                }
            }
        }
        self.say(format!(
            "checkpoint at document {}: pods Running in {:.1}s; probing {} connections",
            group
                .iter()
                .map(|(d, _)| d.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            ready_in.as_secs_f64(),
            attempts.len()
        ));
        // Waves by timeout, as the lab does; all waves make one round.
        let mut waves: BTreeMap<Duration, Vec<usize>> = BTreeMap::new();
        for (i, (t, _)) in attempts.iter().enumerate() {
            waves.entry(*t).or_default().push(i);
        }
        let parallelism = self.opts.parallelism;
        let stop = self.stop;
        let observe = |_round: u32| -> Vec<Report> {
            let mut outcomes: Vec<Option<Outcome>> = vec![None; attempts.len()];
            if !stop.load(Ordering::Relaxed) {
                for (t, idxs) in &waves {
                    let reqs: Vec<ProbeReq> =
                        idxs.iter().map(|i| attempts[*i].1.req.clone()).collect();
                    for (i, o) in idxs.iter().zip(run_probes(&reqs, *t, parallelism)) {
                        outcomes[*i] = Some(o);
                    }
                }
            }
            let mut cells: BTreeMap<CellKey, Vec<(Family, bool, String)>> = BTreeMap::new();
            for ((_, a), o) in attempts.iter().zip(outcomes) {
                let (ok, why) = match o {
                    Some(Outcome::Connected) => (true, String::new()),
                    Some(Outcome::Failed(why)) => (false, why),
                    None => (false, "interrupted".to_string()),
                };
                cells
                    .entry((a.probe, a.from.clone(), a.to.clone()))
                    .or_default()
                    .push((a.family, ok, why));
            }
            for (idx, from, to, f, why) in &unobservable {
                cells
                    .entry((*idx, from.clone(), to.clone()))
                    .or_default()
                    .push((*f, false, why.clone()));
            }
            let mut reports: Vec<Report> = group
                .iter()
                .enumerate()
                .map(|(idx, (doc, spec))| {
                    fixed
                        .get(&idx)
                        .cloned()
                        .unwrap_or_else(|| Report::from_expected(title(*doc, spec), &spec.expect))
                })
                .collect();
            for ((idx, from, to), fams) in cells {
                let detail: Vec<String> = fams
                    .iter()
                    .filter(|(_, ok, _)| !ok)
                    .map(|(f, _, why)| format!("{f}: {why}"))
                    .collect();
                reports[idx].observe(
                    &from,
                    &to,
                    fams.into_iter().map(|(f, ok, _)| (f, ok)).collect(),
                    (!detail.is_empty()).then(|| detail.join(", ")),
                );
            }
            reports
        };
        let t1 = Instant::now();
        let (reports, rounds) = converge(self.opts.converge, Duration::from_millis(200), observe);
        let failed: usize = reports.iter().map(Report::failed).sum();
        self.say(format!(
            "{} after {rounds} round(s) in {:.1}s",
            if failed == 0 {
                "matched".to_string()
            } else {
                format!("{failed} cell(s) never matched")
            },
            t1.elapsed().as_secs_f64()
        ));
        self.check_stop().map_err(lab)?;
        Ok(reports)
    }

    /// No SCTP sockets in this kernel: as the lab, the probe is skipped and the compiled rulesets
    /// (of the scenario's own view) are checked instead; a disagreement fails the cell.
    fn sctp_compiled(&mut self, title: String, spec: &ProbeSpec) -> Report {
        let mut report = Report::from_expected(title, &spec.expect);
        let nodes: Vec<String> = self.world.nodes.keys().cloned().collect();
        let rulesets: BTreeMap<String, sluice::compile::Ruleset> = nodes
            .iter()
            .map(|n| (n.clone(), compile_node(&self.world.index, n).ruleset))
            .collect();
        for r in spec.expect.row_names() {
            for c in &spec.expect.columns {
                if r == c || spec.expect.get(r, c) == Some(Mark::NotProbed) {
                    continue;
                }
                let (Ok(s), Ok(d)) = (r.parse::<PodKey>(), c.parse::<PodKey>()) else {
                    continue;
                };
                let families = match spec.family {
                    Some(f) => vec![f],
                    None => self
                        .world
                        .index
                        .pods
                        .get(&d)
                        .map(|p| p.families())
                        .unwrap_or_default(),
                };
                let fams = families
                    .iter()
                    .map(|f| {
                        let ok = connection_allowed(
                            &self.world.index,
                            &rulesets,
                            &s,
                            &d,
                            spec.protocol,
                            spec.port,
                            *f,
                        )
                        .unwrap_or(false);
                        (*f, ok)
                    })
                    .collect();
                report.observe(
                    r,
                    c,
                    fams,
                    Some("compiled ruleset (no SCTP sockets in this kernel)".into()),
                );
            }
        }
        if report.failed() == 0 {
            let n = report.passed();
            report.skip(format!(
                "this kernel has no SCTP sockets; the compiled rulesets were checked instead and agree on all {n} cells"
            ));
        }
        report
    }
}

/// SIGINT/SIGTERM set this flag: the run stops at the next step and cleans up.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).context("signal handler")?;
    }
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::Matrix;
    use crate::scenario::parse_scenario;

    #[test]
    fn cluster_json() {
        let text = r#"{"backend":"vxlan","kubectl":"/c/kubectl","adminKubeconfig":"/s/admin.kubeconfig",
            "nodes":[{"name":"node-1","netns":"slc-node-1","podNetnsPrefix":"slc-pod-1-"},
                     {"name":"node-2","netns":"slc-node-2","podNetnsPrefix":"slc-pod-2-"}]}"#;
        let c = parse_cluster(text).unwrap();
        assert_eq!(c.kubectl, PathBuf::from("/c/kubectl"));
        assert_eq!(c.kubeconfig, PathBuf::from("/s/admin.kubeconfig"));
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes["node-2"].pod_netns_prefix, "slc-pod-2-");
        assert_eq!(c.nodes["node-1"].netns, "slc-node-1");
        assert_eq!(
            parse_cluster(r#"{"kubectl":"k","adminKubeconfig":"a","nodes":[{"name":"n"}]}"#)
                .unwrap_err(),
            "nodes[0].netns: missing"
        );
        assert_eq!(parse_cluster("{}").unwrap_err(), "nodes: missing");
    }

    #[test]
    fn service_names_are_dns_labels() {
        let n = service_name("x", "a");
        assert!(
            n.starts_with("lab-a-") && n.len() == "lab-a-".len() + 8,
            "{n}"
        );
        assert_ne!(service_name("x", "a"), service_name("y", "a"));
        assert_ne!(service_name("x", "a.b"), service_name("x", "a-b"));
        let long = service_name("ns", &"Very.Long_name".repeat(10));
        assert!(long.len() <= 63, "{long}");
        for n in [long, service_name("x", "..."), service_name("x", "a.b")] {
            assert!(n.starts_with("lab-"), "{n}");
            assert!(n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert!(!n.ends_with('-') && !n.contains("--"), "{n}");
        }
    }

    #[test]
    fn pods_declare_every_probed_port() {
        let doc = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "x", "name": "a", "labels": {"pod": "a"}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}]},
                {"ports": [{"containerPort": 53, "protocol": "UDP"}]}
            ]},
            "status": {"podIPs": [{"ip": "10.244.1.9"}], "phase": "Running"}
        });
        let probed = [
            (80, Protocol::Tcp),
            (53, Protocol::Udp),
            (81, Protocol::Tcp),
            (80, Protocol::Udp),
        ];
        let pod = pod_manifest(&doc, &probed);
        assert!(pod.get("status").is_none());
        assert_eq!(pod["metadata"]["labels"]["pod"], "a");
        assert_eq!(pod["metadata"]["labels"][POD_LABEL], service_name("x", "a"));
        let c = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0]["image"], "nginx");
        assert_eq!(c[1]["name"], "c1");
        assert_eq!(c[1]["image"], PAUSE_IMAGE);
        assert_eq!(c[2]["name"], PROBE_CONTAINER);
        assert_eq!(
            c[2]["ports"],
            json!([{"containerPort": 81, "protocol": "TCP"},
                   {"containerPort": 80, "protocol": "UDP"}])
        );
        assert_eq!(pod["spec"]["nodeName"], "node-1");
        // Same input, same manifest (so a relabel is an apply, not a re-creation).
        let relabeled = {
            let mut d = doc.clone();
            d["metadata"]["labels"]["pod"] = json!("b");
            pod_manifest(&d, &probed)
        };
        assert_eq!(relabeled["spec"], pod["spec"]);
        // Nothing to add, no labels, no containers at all.
        let bare = json!({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"namespace": "x", "name": "b"}, "spec": {"nodeName": "n"}});
        let pod = pod_manifest(&bare, &[]);
        assert_eq!(pod["spec"]["containers"], json!([]));
        assert_eq!(pod["metadata"]["labels"][POD_LABEL], service_name("x", "b"));
        let pod = pod_manifest(&bare, &[(8080, Protocol::Sctp)]);
        assert_eq!(
            pod["spec"]["containers"],
            json!([{"name": PROBE_CONTAINER, "image": PAUSE_IMAGE,
                    "ports": [{"containerPort": 8080, "protocol": "SCTP"}]}])
        );
        // Our container name taken.
        let taken = json!({"metadata": {"namespace": "x", "name": "c"},
                           "spec": {"containers": [{"name": PROBE_CONTAINER, "image": "i"}]}});
        let pod = pod_manifest(&taken, &[(1, Protocol::Tcp)]);
        assert_eq!(pod["spec"]["containers"][1]["name"], "lab-probe-2");
    }

    #[test]
    fn service_and_endpoint_slice() {
        let ports = [(80, Protocol::Tcp), (53, Protocol::Udp)];
        let svc = service_manifest("x", "a", &ports);
        let name = service_name("x", "a");
        assert_eq!(svc["metadata"]["name"], name.as_str());
        assert_eq!(svc["metadata"]["namespace"], "x");
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["selector"], json!({POD_LABEL: name}));
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"name": "tcp-80", "port": 80, "targetPort": 80, "protocol": "TCP"},
                   {"name": "udp-53", "port": 53, "targetPort": 53, "protocol": "UDP"}])
        );
        let ips: Vec<IpAddr> = vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let s4 = endpoint_slice_manifest("x", "a", "node-1", Family::V4, &ips, &ports);
        assert_eq!(s4["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(s4["metadata"]["name"], format!("{name}-ipv4"));
        assert_eq!(
            s4["metadata"]["labels"]["kubernetes.io/service-name"],
            name.as_str()
        );
        assert_eq!(s4["addressType"], "IPv4");
        assert_eq!(s4["endpoints"][0]["addresses"], json!(["10.244.1.5"]));
        assert_eq!(s4["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(s4["endpoints"][0]["nodeName"], "node-1");
        assert_eq!(s4["endpoints"][0]["targetRef"]["name"], "a");
        assert_eq!(
            s4["ports"],
            json!([{"name": "tcp-80", "port": 80, "protocol": "TCP"},
                   {"name": "udp-53", "port": 53, "protocol": "UDP"}])
        );
        let s6 = endpoint_slice_manifest("x", "a", "node-1", Family::V6, &ips, &ports);
        assert_eq!(s6["addressType"], "IPv6");
        assert_eq!(s6["endpoints"][0]["addresses"], json!(["fd00::5"]));
        assert_ne!(s4["metadata"]["name"], s6["metadata"]["name"]);
    }

    #[test]
    fn ip_blocks_follow_the_pods() {
        let mut policy = json!({"kind": "NetworkPolicy", "spec": {
            "egress": [{"to": [
                {"ipBlock": {"cidr": "10.244.1.4/32"}},
                {"ipBlock": {"cidr": "fd00:10:244:1::4/128"}},
                {"ipBlock": {"cidr": "0.0.0.0/4", "except": ["10.244.2.2/32", "10.244.9.9/32"]}},
                {"podSelector": {}}
            ]}],
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.2.2/32"}}]}]
        }});
        let known: BTreeSet<IpAddr> = ["10.244.1.4", "10.244.2.2", "fd00:10:244:1::4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(pinned_addresses(&policy, &known).len(), 4);
        assert!(pinned_addresses(&json!({"spec": {}}), &known).is_empty());
        let map: BTreeMap<IpAddr, (String, IpAddr)> = [
            ("10.244.1.4", "y/b", "10.244.1.17"),
            ("10.244.2.2", "x/b", "10.244.2.2"),
        ]
        .iter()
        .map(|(lab, pod, real)| {
            (
                lab.parse().unwrap(),
                (pod.to_string(), real.parse().unwrap()),
            )
        })
        .collect();
        let notes = map_ip_blocks(&mut policy, &map);
        assert_eq!(
            notes,
            ["ipBlock 10.244.1.4/32 is y/b's address in the scenario: applied as 10.244.1.17/32"]
        );
        let to = &policy["spec"]["egress"][0]["to"];
        assert_eq!(to[0]["ipBlock"]["cidr"], "10.244.1.17/32");
        // No IPv6 in the cluster: left as written.
        assert_eq!(to[1]["ipBlock"]["cidr"], "fd00:10:244:1::4/128");
        assert_eq!(
            to[2]["ipBlock"]["except"],
            json!(["10.244.2.2/32", "10.244.9.9/32"])
        );
        assert_eq!(to[2]["ipBlock"]["cidr"], "0.0.0.0/4");
    }

    fn report(expect: &str, observed: &[(&str, &str, bool)]) -> Report {
        let m = Matrix::parse(expect).unwrap();
        let mut r = Report::from_expected("t", &m);
        for (f, t, ok) in observed {
            r.observe(f, t, vec![(Family::V4, *ok)], None);
        }
        r
    }

    #[test]
    fn the_barrier_waits_for_every_watched_resource() {
        let applied = json!({"items": [
            {"kind": "Namespace", "metadata": {"resourceVersion": "100"}},
            {"kind": "ServiceAccount", "metadata": {"resourceVersion": "99"}},
            {"kind": "Pod", "metadata": {"resourceVersion": "101"}},
            {"kind": "NetworkPolicy", "metadata": {"resourceVersion": "102"}},
        ]});
        let wanted = barrier_versions(&applied).unwrap();
        assert_eq!(
            wanted,
            BTreeMap::from([("namespaces", 100), ("pods", 101), ("networkpolicies", 102)])
        );
        let agent = json!({"namespaces": "100", "pods": "150", "networkpolicies": "101"});
        assert_eq!(lagging(&agent, &wanted), vec!["networkpolicies"]);
        let nothing_yet = json!({"namespaces": null, "pods": "101", "networkpolicies": "102"});
        assert_eq!(lagging(&nothing_yet, &wanted), vec!["namespaces"]);
        let caught_up = json!({"namespaces": "120", "pods": "101", "networkpolicies": "130"});
        assert!(lagging(&caught_up, &wanted).is_empty());
        // The manifest carries one object of each watched kind, marked.
        let m = barrier_manifest("7");
        let kinds: Vec<&str> = m["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["kind"].as_str())
            .collect();
        assert_eq!(
            kinds,
            ["Namespace", "ServiceAccount", "Pod", "NetworkPolicy"]
        );
        assert!(barrier_versions(&json!({"items": []})).is_err());
    }

    #[test]
    fn convergence_retries_until_the_matrix_matches() {
        let expect = "* x/a x/b\nx/a - X\nx/b . -";
        // Converges on round 3.
        let (reports, rounds) = converge(Duration::from_secs(10), Duration::ZERO, |round| {
            vec![report(
                expect,
                &[("x/a", "x/b", round < 3), ("x/b", "x/a", true)],
            )]
        });
        assert_eq!(rounds, 3);
        assert_eq!(reports[0].failed(), 0);
        assert_eq!(reports[0].passed(), 2);
        // Never converges: bounded, the last observation is reported.
        let started = Instant::now();
        let (reports, rounds) = converge(
            Duration::from_millis(120),
            Duration::from_millis(10),
            |_| {
                vec![report(
                    expect,
                    &[("x/a", "x/b", true), ("x/b", "x/a", true)],
                )]
            },
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(rounds >= 2, "{rounds}");
        assert_eq!(reports[0].failed(), 1);
        // Matches at once: one round.
        let (_, rounds) = converge(Duration::from_secs(10), Duration::ZERO, |_| {
            vec![report(
                expect,
                &[("x/a", "x/b", false), ("x/b", "x/a", true)],
            )]
        });
        assert_eq!(rounds, 1);
    }

    #[test]
    fn ports_and_namespaces_of_a_scenario() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {namespace: y, name: a}
spec: {nodeName: node-1}
---
apiVersion: lab.sluice.dev/v1
kind: Probe
spec: {port: 80, protocol: TCP, from: [y/a], to: [y/a], expect: \"* y/a\\ny/a -\"}
---
apiVersion: lab.sluice.dev/v1
kind: Probe
spec: {port: 53, protocol: UDP, from: [y/a], to: [y/a], expect: \"* y/a\\ny/a -\"}
---
apiVersion: lab.sluice.dev/v1
kind: Probe
spec: {port: 80, protocol: TCP, via: service, from: [y/a], to: [y/a], expect: \"* y/a\\ny/a -\"}
";
        let scn = parse_scenario("t.yaml", text).unwrap();
        assert_eq!(
            probe_ports(&scn),
            vec![(53, Protocol::Udp), (80, Protocol::Tcp)]
        );
        assert_eq!(
            scenario_namespaces(&scn).into_iter().collect::<Vec<_>>(),
            ["x", "y"]
        );
    }
}
