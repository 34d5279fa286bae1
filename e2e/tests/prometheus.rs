//! A real Prometheus (Debian's package, `e2e/prometheus`) scrapes the sluice agents of the local
//! cluster (`e2e/cluster`, `$SLUICE_CLUSTER_DIR/cluster.json`) with the scrape settings the Helm
//! chart renders, and sees sluice's metrics move when a NetworkPolicy comes and goes, and a
//! connection it denies counted in the drops of the pod it was meant for.
//!
//! The scrape settings are the `prometheus.io/{scrape,port,path}` annotations of the pod template
//! of the DaemonSet that `helm template charts/sluice` renders (helm from `e2e/helm path`). The
//! local cluster has no DaemonSet pods (each agent is a process in its node's network namespace,
//! listening on the node's underlay address, `nodes[].agentAddress`), so the Prometheus config
//! has one static target per node: the node's address with the annotation's port and path, what
//! the usual `kubernetes_sd_configs` pod relabeling makes of a hostNetwork agent pod. (Debian's
//! build of Prometheus 2.42 has no Kubernetes service discovery at all: a `kubernetes_sd_configs`
//! is refused as an unknown field.)
//!
//! Also `promtool check metrics` on each agent's exposition.
//!
//! Skipped when `SLUICE_CLUSTER_DIR` is unset; with `SLUICE_STRICT=1` a missing cluster, helm,
//! chart or prometheus fails instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use sluice_e2e::cluster_run::{load_cluster, Kubectl};
use sluice_e2e::kubelet::pod_netns_name;
use sluice_e2e::probe::{self, run_probes, Outcome, ProbeReq, Proto};

/// How long Prometheus may take to see a change (the scrape interval is 1 s; generous for a
/// loaded machine: this bounds a wait, it is not what the test measures).
const CONVERGE: Duration = Duration::from_secs(60);
const JOB: &str = "sluice-agent";
/// The label on this test's pods; the NetworkPolicy selects it.
const TEST_LABEL: &str = "sluice.dev/prometheus-e2e";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn strict() -> bool {
    std::env::var("SLUICE_STRICT").as_deref() == Ok("1")
}

/// Says why the test does not run, or fails under `SLUICE_STRICT=1`.
fn skip(why: &str) {
    if strict() {
        panic!("SLUICE_STRICT=1: {why}");
    }
    eprintln!("skipped: {why}");
}

// ---------------------------------------------------------------------------------------------
// The cluster

struct Node {
    name: String,
    /// Where the agent serves HTTP (`nodes[].agentAddress`).
    agent: SocketAddr,
    /// The kubelet's prefix of pod network namespaces (`nodes[].podNetnsPrefix`).
    pod_prefix: String,
}

struct Cluster {
    k: Kubectl,
    nodes: Vec<Node>,
}

fn load(dir: &Path) -> Result<Cluster, String> {
    let base = load_cluster(dir)?;
    let path = dir.join("cluster.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut nodes = Vec::new();
    for n in v["nodes"].as_array().into_iter().flatten() {
        let name = n["name"].as_str().unwrap_or_default().to_string();
        let agent = n["agentAddress"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{}: {name}: no agentAddress", path.display()))?;
        let pod_prefix = base
            .nodes
            .get(&name)
            .map(|n| n.pod_netns_prefix.clone())
            .ok_or_else(|| format!("{}: {name}: no podNetnsPrefix", path.display()))?;
        nodes.push(Node {
            name,
            agent,
            pod_prefix,
        });
    }
    if nodes.is_empty() {
        return Err(format!("{}: no nodes", path.display()));
    }
    Ok(Cluster {
        k: Kubectl::new(&base),
        nodes,
    })
}

impl Cluster {
    /// `Kubectl::run`, its error as text.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        self.k.run(args, stdin).map_err(|e| format!("{e:#}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The chart's scrape settings

#[derive(Debug, PartialEq)]
struct Scrape {
    port: u16,
    path: String,
    scheme: String,
}

/// The `prometheus.io/*` annotations of the rendered DaemonSet's pod template, read as the
/// common annotation relabeling reads them: `scrape` must be "true", `port` replaces the
/// target's port, `path` (default `/metrics`) and `scheme` (default `http`).
fn scrape_settings(rendered: &str) -> Result<Scrape, String> {
    let mut daemonsets = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = Value::deserialize(doc).map_err(|e| format!("rendered chart: {e}"))?;
        if v["kind"] == "DaemonSet" {
            daemonsets.push(v);
        }
    }
    let [ds] = daemonsets.as_slice() else {
        return Err(format!(
            "the rendered chart has {} DaemonSets, expected one",
            daemonsets.len()
        ));
    };
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    let get = |k: &str| ann[format!("prometheus.io/{k}")].as_str();
    if get("scrape") != Some("true") {
        return Err(format!(
            "the DaemonSet's pod template does not say prometheus.io/scrape: \"true\" (annotations: {ann})"
        ));
    }
    let port = get("port")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("prometheus.io/port missing or not a port (annotations: {ann})"))?;
    Ok(Scrape {
        port,
        path: get("path").unwrap_or("/metrics").to_string(),
        scheme: get("scheme").unwrap_or("http").to_string(),
    })
}

/// One static target per node: the agent's address with the chart's port.
fn prometheus_config(scrape: &Scrape, nodes: &[Node]) -> Value {
    let targets: Vec<Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "targets": [SocketAddr::new(n.agent.ip(), scrape.port).to_string()],
                "labels": {"node": n.name},
            })
        })
        .collect();
    // JSON is YAML: Prometheus reads this as its config file.
    json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": JOB,
            "metrics_path": scrape.path,
            "scheme": scrape.scheme,
            "static_configs": targets,
        }],
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP (plain, to loopback and the underlay)

/// `probe::http_get` with 10 s timeouts, its error as text.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    probe::http_get(&addr.to_string(), path, Duration::from_secs(10)).map_err(|e| format!("{e:#}"))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/// One series of a query's result: its labels and value.
type Series = (BTreeMap<String, String>, f64);

/// Our Prometheus process; killed, and its directory removed, when dropped (also on failure).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(binary: &Path, config: &Value) -> Prometheus {
        let dir =
            std::env::temp_dir().join(format!("sluice-prometheus-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, serde_json::to_string_pretty(config).unwrap())
            .expect("prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus.log");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let p = Prometheus { child, dir, addr };
        p.wait_ready();
        p
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/-/ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready on {} after {CONVERGE:?}:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query: each series' labels and value.
    fn query(&self, q: &str) -> Result<Vec<Series>, String> {
        let (status, body) =
            http_get(self.addr, &format!("/api/v1/query?query={}", url_encode(q)))?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("query {q}: HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("query {q}: {v}"));
        }
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("query {q}: bad value in {r}"))?;
            out.push((labels, value));
        }
        Ok(out)
    }

    /// A query whose result has one series per node (label `node`): node -> value; an error
    /// until every node has one.
    fn per_node(&self, q: &str, nodes: &[Node]) -> Result<BTreeMap<String, f64>, String> {
        let got: BTreeMap<String, f64> = self
            .query(q)?
            .into_iter()
            .filter_map(|(l, v)| Some((l.get("node")?.clone(), v)))
            .collect();
        for n in nodes {
            if !got.contains_key(&n.name) {
                return Err(format!("{q}: no series for node {} (got {got:?})", n.name));
            }
        }
        Ok(got)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("prometheus log (last lines):\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Retries `f` until it succeeds; fails with its last error after [`CONVERGE`].
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + CONVERGE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: not after {CONVERGE:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The value of one sample (`name{labels} value`, labels exactly as written) in an exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

// ---------------------------------------------------------------------------------------------
// Test objects: a pod per node and a NetworkPolicy selecting them, deleted when dropped

struct Objects<'c> {
    cluster: &'c Cluster,
    tag: String,
    policy: Option<String>,
}

impl Objects<'_> {
    fn pod_name(&self, node: &str) -> String {
        format!("prom-e2e-{}-{node}", self.tag)
    }

    fn create_pods(&self) {
        for n in &self.cluster.nodes {
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.pod_name(&n.name), "namespace": "default",
                             "labels": {TEST_LABEL: self.tag}},
                "spec": {"nodeName": n.name, "containers": [{
                    "name": "c", "image": "registry.k8s.io/pause:3.10",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
            });
            self.cluster
                .kubectl(&["create", "-f", "-"], Some(&pod.to_string()))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn pod_ip(&self, name: &str) -> std::net::IpAddr {
        let out = self
            .cluster
            .kubectl(
                &[
                    "get",
                    "pod",
                    "-n",
                    "default",
                    name,
                    "-o",
                    "jsonpath={.status.podIP}",
                ],
                None,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("pod {name}: podIP {out:?}: {e}"))
    }

    fn policy(&self) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("prom-e2e-{}", self.tag), "namespace": "default"},
            "spec": {
                "podSelector": {"matchLabels": {TEST_LABEL: self.tag}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                             "ports": [{"port": 8080, "protocol": "TCP"}]}],
            },
        })
    }

    fn apply_policy(&mut self) {
        let p = self.policy();
        self.policy = p["metadata"]["name"].as_str().map(str::to_string);
        self.cluster
            .kubectl(&["apply", "-f", "-"], Some(&p.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn delete_policy(&mut self) {
        if let Some(name) = self.policy.take() {
            self.cluster
                .kubectl(
                    &[
                        "delete",
                        "networkpolicy",
                        "-n",
                        "default",
                        &name,
                        "--ignore-not-found",
                    ],
                    None,
                )
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

impl Drop for Objects<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.policy.take() {
            let _ = self.cluster.kubectl(
                &[
                    "delete",
                    "networkpolicy",
                    "-n",
                    "default",
                    &name,
                    "--ignore-not-found",
                ],
                None,
            );
        }
        let selector = format!("{TEST_LABEL}={}", self.tag);
        if let Err(e) = self.cluster.kubectl(
            &[
                "delete",
                "pods",
                "-n",
                "default",
                "-l",
                &selector,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=90s",
            ],
            None,
        ) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Local pods per node as the agent counts them: Running, not hostNetwork, with an IP.
fn local_pods(cluster: &Cluster) -> Result<BTreeMap<String, f64>, String> {
    let list: Value =
        serde_json::from_str(&cluster.kubectl(&["get", "pods", "-A", "-o", "json"], None)?)
            .map_err(|e| format!("kubectl get pods: {e}"))?;
    let mut per: BTreeMap<String, f64> = cluster
        .nodes
        .iter()
        .map(|n| (n.name.clone(), 0.0))
        .collect();
    for p in list["items"].as_array().into_iter().flatten() {
        let running = p["status"]["phase"] == "Running"
            && p["status"]["podIP"]
                .as_str()
                .is_some_and(|ip| !ip.is_empty())
            && p["spec"]["hostNetwork"] != true
            && p["metadata"]["deletionTimestamp"].is_null();
        if let (true, Some(node)) = (running, p["spec"]["nodeName"].as_str()) {
            if let Some(n) = per.get_mut(node) {
                *n += 1.0;
            }
        }
    }
    Ok(per)
}

/// `promtool check metrics` on each agent's exposition (at the chart's port and path), as the
/// agent serves it. By default it serves OpenMetrics (what Prometheus asks for first); promtool
/// (2.42) reads only the Prometheus text format 0.0.4, which the agent serves to a client that
/// asks for `text/plain` alone (`curl -H 'Accept: text/plain' ... | promtool check metrics`).
/// Both carry the same samples.
fn promtool_check(promtool: &Path, scrape: &Scrape, nodes: &[Node]) {
    for n in nodes {
        let addr = SocketAddr::new(n.agent.ip(), scrape.port);
        let (status, body) = http_get(addr, &scrape.path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200, "GET {addr}{}: {body}", scrape.path);
        assert!(
            body.ends_with("# EOF\n"),
            "GET {addr}{}: not OpenMetrics: {body}",
            scrape.path
        );
        let (status, text) = probe::http_get_accepting(
            &addr.to_string(),
            &scrape.path,
            "text/plain",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            status, 200,
            "GET {addr}{} (text/plain): {text}",
            scrape.path
        );
        assert!(
            !text.contains("# EOF"),
            "text/plain got OpenMetrics: {text}"
        );
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(' ').next().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(
            samples(&text),
            samples(&body),
            "both formats carry the same series"
        );
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("promtool stdin");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics on {addr}{} ({}):\n{}{}\nthe exposition (0.0.4):\n{text}",
            scrape.path,
            n.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// What the test needs from outside: the cluster, the rendered chart, prometheus and promtool.
struct Setup {
    cluster: Cluster,
    rendered: String,
    prometheus: PathBuf,
    promtool: PathBuf,
}

fn setup() -> Result<Option<Setup>, String> {
    let Some(dir) = std::env::var_os("SLUICE_CLUSTER_DIR") else {
        eprintln!(
            "skipped: SLUICE_CLUSTER_DIR is not set (e2e/cluster up; eval \"$(e2e/cluster env)\")"
        );
        return Ok(None);
    };
    let cluster = load(Path::new(&dir))?;
    let root = repo_root();
    let script = |name: &str| -> Result<PathBuf, String> {
        let out = Command::new(root.join("e2e").join(name))
            .arg("path")
            .output()
            .map_err(|e| format!("e2e/{name} path: {e}"))?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || path.is_empty() || !Path::new(&path).exists() {
            return Err(format!(
                "e2e/{name} path: nothing ({}); run e2e/{name} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                if name == "helm" { "build" } else { "ensure" }
            ));
        }
        Ok(PathBuf::from(path))
    };
    let helm = script("helm")?;
    let prometheus = script("prometheus")?;
    let promtool = prometheus.with_file_name("promtool");
    if !promtool.exists() {
        return Err(format!("no promtool next to {}", prometheus.display()));
    }
    let chart = root.join("charts/sluice");
    let out = Command::new(&helm)
        .args(["template", "sluice"])
        .arg(&chart)
        .args(["--namespace", "kube-system"])
        .output()
        .map_err(|e| format!("{}: {e}", helm.display()))?;
    if !out.status.success() {
        return Err(format!(
            "helm template {}: {}",
            chart.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Some(Setup {
        cluster,
        rendered: String::from_utf8_lossy(&out.stdout).into_owned(),
        prometheus,
        promtool,
    }))
}

#[test]
fn prometheus_scrapes_the_agents_with_the_charts_settings_and_sees_policies_change() {
    let s = match setup() {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => return skip(&e),
    };
    let nodes = &s.cluster.nodes;
    let scrape = scrape_settings(&s.rendered).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("the chart's scrape settings: {scrape:?}");
    promtool_check(&s.promtool, &scrape, nodes);

    let prom = Prometheus::start(&s.prometheus, &prometheus_config(&scrape, nodes));
    eprintln!("prometheus on {}", prom.addr);
    eventually("up == 1 for every node's agent", || {
        let up = prom.per_node(&format!("up{{job=\"{JOB}\"}}"), nodes)?;
        match up.iter().find(|(_, v)| **v != 1.0) {
            Some((node, v)) => Err(format!("up{{node=\"{node}\"}} = {v}")),
            None => Ok(()),
        }
    });

    let mut objects = Objects {
        cluster: &s.cluster,
        tag: std::process::id().to_string(),
        policy: None,
    };
    objects.create_pods();
    eventually("this test's pods Running with IPs", || {
        let out = s.cluster.kubectl(
            &[
                "get",
                "pods",
                "-n",
                "default",
                "-l",
                &format!("{TEST_LABEL}={}", objects.tag),
                "-o",
                "json",
            ],
            None,
        )?;
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let ready = items
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
            .count();
        if ready == nodes.len() {
            Ok(())
        } else {
            Err(format!("{ready} of {} Running with an IP", nodes.len()))
        }
    });

    // The baseline: Prometheus counts the local pods kubectl shows, and its rule count is the
    // one each agent exposes right now (nothing changes until the policy).
    let expected_pods = local_pods(&s.cluster).unwrap_or_else(|e| panic!("{e}"));
    let rules_q = "sluice_ruleset_objects{kind=\"rules\"}";
    let base_rules = eventually("Prometheus's local pods and rules = the agents'", || {
        let pods = prom.per_node("sluice_local_pods", nodes)?;
        if pods != expected_pods {
            return Err(format!(
                "sluice_local_pods {pods:?}, kubectl {expected_pods:?}"
            ));
        }
        let rules = prom.per_node(rules_q, nodes)?;
        for n in nodes {
            let (_, body) = http_get(SocketAddr::new(n.agent.ip(), scrape.port), &scrape.path)?;
            let agent = sample(&body, rules_q);
            if agent != rules.get(&n.name).copied() {
                return Err(format!(
                    "{}: agent {agent:?}, prometheus {:?}",
                    n.name,
                    rules.get(&n.name)
                ));
            }
        }
        Ok(rules)
    });
    let syncs_q = "sum by (node) (sluice_syncs_total{result=\"ok\"})";
    let latency_q = "sluice_programming_latency_seconds_count";
    let isolated_q = "sluice_isolated_pods{direction=\"ingress\"}";
    let base_syncs = prom
        .per_node(syncs_q, nodes)
        .unwrap_or_else(|e| panic!("{e}"));
    let base_latency = prom
        .per_node(latency_q, nodes)
        .unwrap_or_else(|e| panic!("{e}"));
    let base_isolated = prom
        .per_node(isolated_q, nodes)
        .unwrap_or_else(|e| panic!("{e}"));
    let base_policies = prom
        .per_node("sluice_policies", nodes)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("before the policy: rules {base_rules:?} syncs {base_syncs:?} isolated {base_isolated:?} policies {base_policies:?}");

    objects.apply_policy();
    let after = eventually("Prometheus sees the policy on every node", || {
        let policies = prom.per_node("sluice_policies", nodes)?;
        let isolated = prom.per_node(isolated_q, nodes)?;
        let rules = prom.per_node(rules_q, nodes)?;
        let syncs = prom.per_node(syncs_q, nodes)?;
        let latency = prom.per_node(latency_q, nodes)?;
        for n in nodes {
            let k = &n.name;
            let checks = [
                ("sluice_policies +1", policies[k] == base_policies[k] + 1.0),
                (
                    "isolated pods (ingress) +1",
                    isolated[k] == base_isolated[k] + 1.0,
                ),
                ("rules changed", rules[k] != base_rules[k]),
                ("ok syncs increased", syncs[k] > base_syncs[k]),
                ("programming latency observed", latency[k] > base_latency[k]),
            ];
            if let Some((what, _)) = checks.iter().find(|(_, ok)| !ok) {
                return Err(format!(
                    "{k}: not yet {what}: policies {policies:?} isolated {isolated:?} rules {rules:?} syncs {syncs:?} latency count {latency:?}"
                ));
            }
        }
        Ok((rules, syncs))
    });
    eprintln!("with the policy: rules {:?} syncs {:?}", after.0, after.1);
    // Drops by pod: a connection the policy denies (from this test's pod on the last node, not
    // a client, to the one on the first) is counted for the pod it was meant for, with that
    // pod's own labels (the drop counters are read every 10 s by default).
    let (to_node, from_node) = (&nodes[0], &nodes[nodes.len() - 1]);
    let victim = objects.pod_name(&to_node.name);
    let ip = objects.pod_ip(&victim);
    let from = pod_netns_name(
        &from_node.pod_prefix,
        "default",
        &objects.pod_name(&from_node.name),
    );
    let drops_q = format!(
        "sum(sluice_dropped_packets_total{{namespace=\"default\",pod=\"{victim}\",direction=\"ingress\"}})"
    );
    let denied = ProbeReq {
        from_netns: from,
        to: SocketAddr::new(ip, 8080),
        proto: Proto::Tcp,
    };
    eventually(
        "Prometheus counts the denied connection's drops for its pod",
        || {
            let outcome = run_probes(std::slice::from_ref(&denied), Duration::from_millis(300), 1);
            if outcome != [Outcome::Failed("timeout".into())] {
                return Err(format!("the denied probe {:?}: {outcome:?}", denied.to));
            }
            match prom.query(&drops_q)?.first() {
                Some((_, v)) if *v > 0.0 => Ok(()),
                other => Err(format!("{drops_q}: {other:?}")),
            }
        },
    );
    // Now that pods, CNI requests and isolated pods' drop counters are there too.
    promtool_check(&s.promtool, &scrape, nodes);

    objects.delete_policy();
    eventually("Prometheus sees the policy gone on every node", || {
        let policies = prom.per_node("sluice_policies", nodes)?;
        let rules = prom.per_node(rules_q, nodes)?;
        let syncs = prom.per_node(syncs_q, nodes)?;
        let isolated = prom.per_node(isolated_q, nodes)?;
        if policies != base_policies || rules != base_rules || isolated != base_isolated {
            return Err(format!(
                "policies {policies:?} (before {base_policies:?}), rules {rules:?} (before {base_rules:?}), isolated {isolated:?}"
            ));
        }
        if let Some(n) = nodes.iter().find(|n| syncs[&n.name] <= after.1[&n.name]) {
            return Err(format!("{}: no sync since the policy went", n.name));
        }
        Ok(())
    });
}

#[test]
fn scrape_settings_come_from_the_daemonsets_pod_template() {
    let rendered = r#"
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sluice}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: sluice}
spec:
  template:
    metadata:
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "9763"
        prometheus.io/path: /metrics
"#;
    assert_eq!(
        scrape_settings(rendered).unwrap(),
        Scrape {
            port: 9763,
            path: "/metrics".into(),
            scheme: "http".into()
        }
    );
    let off = rendered.replace("\"true\"", "\"false\"");
    assert!(scrape_settings(&off).is_err());
    let nodes = [Node {
        name: "node-1".into(),
        agent: "198.18.5.1:1".parse().unwrap(),
        pod_prefix: "slc5-pod-1-".into(),
    }];
    let cfg = prometheus_config(&scrape_settings(rendered).unwrap(), &nodes);
    assert_eq!(
        cfg["scrape_configs"][0]["static_configs"][0]["targets"][0],
        "198.18.5.1:9763"
    );
}
