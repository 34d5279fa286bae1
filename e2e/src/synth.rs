//! A seeded, deterministic synthetic cluster for benchmarks (`e2e/bench`): namespaces with
//! team/env/tier labels, pods spread over nodes with dual-stack addresses from per-node pod CIDRs
//! and named container ports, and NetworkPolicies in a realistic mix (default-deny, pod-to-pod
//! allows, namespace peers, AND'ed peers, matchExpressions, ipBlocks with except, numeric ports,
//! endPort ranges, named ports, protocol-only ports, SCTP, egress rules).
//!
//! The same [`SynthConfig`] (seed included) always gives the same objects. They are real
//! k8s-openapi objects, so building the index goes through the same edge conversion
//! (`namespace_info`, `pod_info`, `policy_info`) as the agent.
//!
//! Addresses: node N (1-based) gets `10.244.N.0/24` and `fd00:10:244:N::/64` as long as that
//! fits; with more pods per node the IPv4 block grows (/23, /22, ...) and with more nodes the
//! blocks are carved from `10.0.0.0/8` instead of `10.244.0.0/16`. Each node keeps spare
//! addresses for pods a benchmark adds ([`SynthCluster::spare_ips`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use sluice::model::{namespace_info, pod_info, policy_info, Index, NAMESPACE_NAME_LABEL};

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthConfig {
    pub pods: usize,
    pub policies: usize,
    pub nodes: usize,
    pub namespaces: usize,
    pub seed: u64,
}

impl Default for SynthConfig {
    /// The size issue 2 asks about.
    fn default() -> Self {
        Self {
            pods: 10_000,
            policies: 1_000,
            nodes: 100,
            namespaces: 300,
            seed: 1,
        }
    }
}

/// One node of the synthetic cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthNode {
    /// `node-001`, ...
    pub name: String,
    /// 1-based.
    pub number: u32,
    /// IPv4 and IPv6 pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// Pods placed on this node (they use host addresses 2..=pods+1; .1 is the gateway).
    pub pods: usize,
}

/// Counts of what the policy mix produced, by kind (for reports and tests).
pub type PolicyMix = BTreeMap<&'static str, usize>;

#[derive(Clone, Debug)]
pub struct SynthCluster {
    pub config: SynthConfig,
    pub nodes: Vec<SynthNode>,
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    pub mix: PolicyMix,
    plan: AddressPlan,
}

/// Spare host addresses per node, for pods added after generation.
const SPARE_HOSTS: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AddressPlan {
    v4_base: u32,
    /// Host bits of each node's IPv4 block (8 for a /24).
    host_bits: u32,
}

impl AddressPlan {
    fn new(nodes: usize, max_pods_per_node: usize) -> Result<Self> {
        // network address, gateway (.1), pods, spares, broadcast.
        let needed = max_pods_per_node as u64 + 2 + SPARE_HOSTS + 1;
        let host_bits = needed.next_power_of_two().trailing_zeros().max(8);
        // Node numbers are 1-based, so block 0 of the range stays unused.
        let span = (nodes as u64 + 1) << host_bits;
        let v4_base = if span <= 1 << 16 {
            u32::from(Ipv4Addr::new(10, 244, 0, 0))
        } else if span <= 1 << 24 {
            u32::from(Ipv4Addr::new(10, 0, 0, 0))
        } else {
            bail!(
                "{nodes} nodes with up to {max_pods_per_node} pods each do not fit in 10.0.0.0/8"
            );
        };
        if nodes > 0xffff {
            bail!("{nodes} nodes: at most 65535 (one IPv6 /64 per node in fd00:10:244::/48)");
        }
        Ok(Self { v4_base, host_bits })
    }

    fn v4_net(&self, number: u32) -> Result<Ipv4Net> {
        let network = self.v4_base + (number << self.host_bits);
        Ipv4Net::new(Ipv4Addr::from(network), (32 - self.host_bits) as u8)
            .context("node IPv4 pod CIDR")
    }

    fn v6_net(&self, number: u32) -> Result<Ipv6Net> {
        let network = Ipv6Addr::new(0xfd00, 0x10, 0x244, number as u16, 0, 0, 0, 0);
        Ipv6Net::new(network, 64).context("node IPv6 pod CIDR")
    }

    /// Host `host` (2 and up) of node `number`, both families.
    fn ips(&self, number: u32, host: u32) -> Result<Vec<IpAddr>> {
        if u64::from(host) + 1 >= 1u64 << self.host_bits {
            bail!("host {host} does not fit in node {number}'s IPv4 block");
        }
        let v4 = self.v4_net(number)?;
        let v6 = self.v6_net(number)?;
        Ok(vec![
            IpAddr::V4(Ipv4Addr::from(u32::from(v4.network()) + host)),
            IpAddr::V6(Ipv6Addr::from(u128::from(v6.network()) + u128::from(host))),
        ])
    }
}

/// An application: its labels and named container ports.
struct App {
    name: &'static str,
    tier: &'static str,
    /// (port name, number, protocol)
    ports: &'static [(&'static str, u16, &'static str)],
}

const fn app(
    name: &'static str,
    tier: &'static str,
    ports: &'static [(&'static str, u16, &'static str)],
) -> App {
    App { name, tier, ports }
}

/// Apps of ordinary namespaces. Named ports resolve to different numbers on different apps
/// (`http` is 8080, 80, 8081, 9200 or 3000), which is what named-port sets are for.
const APPS: &[App] = &[
    app(
        "web",
        "frontend",
        &[("http", 8080, "TCP"), ("metrics", 9090, "TCP")],
    ),
    app(
        "api",
        "backend",
        &[
            ("http", 8080, "TCP"),
            ("grpc", 9000, "TCP"),
            ("metrics", 9090, "TCP"),
        ],
    ),
    app(
        "gateway",
        "frontend",
        &[
            ("https", 8443, "TCP"),
            ("http", 80, "TCP"),
            ("metrics", 9102, "TCP"),
        ],
    ),
    app("worker", "backend", &[("metrics", 9090, "TCP")]),
    app(
        "auth",
        "backend",
        &[("grpc", 9000, "TCP"), ("http", 8081, "TCP")],
    ),
    app("db", "data", &[("postgres", 5432, "TCP")]),
    app("cache", "data", &[("redis", 6379, "TCP")]),
    app(
        "queue",
        "data",
        &[("amqp", 5672, "TCP"), ("metrics", 15692, "TCP")],
    ),
    app(
        "search",
        "backend",
        &[("http", 9200, "TCP"), ("transport", 9300, "TCP")],
    ),
    app(
        "ingest",
        "backend",
        &[("http", 8080, "TCP"), ("diameter", 3868, "SCTP")],
    ),
    app("frontend", "frontend", &[("http", 3000, "TCP")]),
    app(
        "stats",
        "backend",
        &[("statsd", 8125, "UDP"), ("metrics", 9102, "TCP")],
    ),
];

const DNS: App = app(
    "dns",
    "ops",
    &[
        ("dns", 53, "UDP"),
        ("dns-tcp", 53, "TCP"),
        ("metrics", 9153, "TCP"),
    ],
);
const PROMETHEUS: App = app("prometheus", "ops", &[("http", 9090, "TCP")]);
const EXPORTER: App = app("exporter", "ops", &[("metrics", 9100, "TCP")]);

const TEAMS: &[&str] = &[
    "payments", "search", "identity", "platform", "data", "web", "mobile", "ml", "infra", "growth",
    "billing", "ads",
];
const ENVS: &[&str] = &["prod", "staging", "dev"];
const NS_TIERS: &[&str] = &["frontend", "backend", "data", "ops"];

const SYSTEM_NS: &str = "kube-system";
const MONITORING_NS: &str = "monitoring";

/// ipBlocks for ingress: (IPv4 cidr, excepts), (IPv6 cidr, excepts).
type Block = (&'static str, &'static [&'static str]);
const V4_BLOCKS: &[Block] = &[
    ("172.16.0.0/12", &["172.16.5.0/24", "172.20.0.0/16"]),
    ("192.168.0.0/16", &["192.168.100.0/24"]),
    ("203.0.113.0/24", &[]),
    ("198.51.100.0/24", &["198.51.100.128/25"]),
];
const V6_BLOCKS: &[Block] = &[
    ("2001:db8::/32", &["2001:db8:1::/48"]),
    ("fd12:3456::/32", &[]),
];

/// A namespace while generating.
struct NsDraft {
    name: String,
    labels: BTreeMap<String, String>,
    apps: Vec<&'static App>,
}

/// A pod before it has addresses.
struct PodDraft {
    namespace: usize,
    name: String,
    app: &'static App,
    node: usize,
    completed: bool,
    version: &'static str,
}

impl SynthCluster {
    pub fn generate(config: &SynthConfig) -> Result<SynthCluster> {
        if config.nodes == 0 || config.namespaces == 0 {
            bail!("need at least one node and one namespace");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let namespaces = draft_namespaces(config.namespaces, &mut rng);
        let pods = draft_pods(config, &namespaces, &mut rng);

        let mut per_node = vec![0usize; config.nodes];
        for p in &pods {
            per_node[p.node] += 1;
        }
        let plan = AddressPlan::new(config.nodes, per_node.iter().copied().max().unwrap_or(0))?;
        let mut nodes = Vec::with_capacity(config.nodes);
        for (i, count) in per_node.iter().enumerate() {
            let number = i as u32 + 1;
            nodes.push(SynthNode {
                name: node_name(number, config.nodes),
                number,
                pod_cidrs: vec![
                    IpNet::V4(plan.v4_net(number)?),
                    IpNet::V6(plan.v6_net(number)?),
                ],
                pods: *count,
            });
        }

        let mut next_host = vec![2u32; config.nodes];
        let mut pod_objects = Vec::with_capacity(pods.len());
        for p in &pods {
            let host = next_host[p.node];
            next_host[p.node] += 1;
            let ips = plan.ips(nodes[p.node].number, host)?;
            pod_objects.push(pod_object(
                p,
                &namespaces[p.namespace],
                &nodes[p.node],
                &ips,
            )?);
        }

        let mut policies = PolicyGen {
            rng: &mut rng,
            namespaces: &namespaces,
            out: Vec::new(),
            mix: PolicyMix::new(),
            limit: config.policies,
        };
        policies.generate()?;
        let (policy_objects, mix) = (policies.out, policies.mix);

        let namespace_objects = namespaces
            .iter()
            .map(|ns| {
                serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns.name, "labels": ns.labels},
                }))
                .context("namespace object")
            })
            .collect::<Result<Vec<Namespace>>>()?;

        Ok(SynthCluster {
            config: config.clone(),
            nodes,
            namespaces: namespace_objects,
            pods: pod_objects,
            policies: policy_objects,
            mix,
            plan,
        })
    }

    /// The cluster index, through the same edge conversion as the agent.
    pub fn index(&self) -> Result<Index> {
        let mut index = Index::default();
        for ns in &self.namespaces {
            index.apply_namespace(namespace_info(ns)?);
        }
        for pod in &self.pods {
            index.apply_pod(pod_info(pod)?);
        }
        for policy in &self.policies {
            index.apply_policy(policy_info(policy)?);
        }
        Ok(index)
    }

    pub fn node(&self, name: &str) -> Option<&SynthNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Addresses (IPv4, IPv6) on `node` that no generated pod uses: `spare` 0, 1, ... up to
    /// 15. For pods a benchmark adds.
    pub fn spare_ips(&self, node: &str, spare: u32) -> Result<Vec<IpAddr>> {
        let n = self
            .node(node)
            .with_context(|| format!("no node {node:?} in the synthetic cluster"))?;
        if u64::from(spare) >= SPARE_HOSTS {
            bail!("only {SPARE_HOSTS} spare addresses per node");
        }
        self.plan.ips(n.number, n.pods as u32 + 2 + spare)
    }
}

fn node_name(number: u32, nodes: usize) -> String {
    let width = nodes.to_string().len().max(3);
    format!("node-{number:0width$}")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn draft_namespaces(count: usize, rng: &mut ChaCha8Rng) -> Vec<NsDraft> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let (name, mut ns_labels, apps): (String, _, Vec<&'static App>) = match i {
            0 => (
                SYSTEM_NS.to_string(),
                labels(&[("team", "platform"), ("env", "prod"), ("tier", "ops")]),
                vec![&DNS, &EXPORTER],
            ),
            1 => (
                MONITORING_NS.to_string(),
                labels(&[("team", "platform"), ("env", "prod"), ("tier", "ops")]),
                vec![&PROMETHEUS, &EXPORTER],
            ),
            _ => {
                let team = TEAMS.choose(rng).copied().unwrap_or("platform");
                let env = ENVS.choose(rng).copied().unwrap_or("prod");
                let tier = NS_TIERS.choose(rng).copied().unwrap_or("backend");
                let napps = rng.random_range(3..=6);
                let apps = APPS.choose_multiple(rng, napps).collect();
                (
                    format!("{team}-{env}-{i}"),
                    labels(&[("team", team), ("env", env), ("tier", tier)]),
                    apps,
                )
            }
        };
        ns_labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        out.push(NsDraft {
            name,
            labels: ns_labels,
            apps,
        });
    }
    out
}

fn draft_pods(config: &SynthConfig, namespaces: &[NsDraft], rng: &mut ChaCha8Rng) -> Vec<PodDraft> {
    // Pods go round-robin over namespaces, round-robin over each namespace's apps, and to a
    // random node (a scheduler spreading replicas).
    let mut in_ns = vec![0usize; namespaces.len()];
    let mut out = Vec::with_capacity(config.pods);
    for i in 0..config.pods {
        let ns = i % namespaces.len();
        let k = in_ns[ns];
        in_ns[ns] += 1;
        let apps = &namespaces[ns].apps;
        let app = apps[k % apps.len()];
        let ordinal = k / apps.len();
        let node = rng.random_range(0..config.nodes);
        // About 1% are finished job pods: they keep an IP in the API but own none.
        let completed = rng.random_bool(0.01);
        let version = match rng.random_range(0..20) {
            0 => "v3",
            1..=5 => "v2",
            _ => "v1",
        };
        let name = if completed {
            format!("{}-migrate-{ordinal}", app.name)
        } else {
            format!("{}-{ordinal}", app.name)
        };
        out.push(PodDraft {
            namespace: ns,
            name,
            app,
            node,
            completed,
            version,
        });
    }
    out
}

fn pod_object(p: &PodDraft, ns: &NsDraft, node: &SynthNode, ips: &[IpAddr]) -> Result<Pod> {
    let (pod_labels, ports, phase) = if p.completed {
        (
            json!({"job-name": format!("{}-migrate", p.app.name), "tier": "batch"}),
            json!([]),
            "Succeeded",
        )
    } else {
        let ports: Vec<Value> = p
            .app
            .ports
            .iter()
            .map(|(name, port, proto)| json!({"name": name, "containerPort": port, "protocol": proto}))
            .collect();
        (
            json!({"app": p.app.name, "tier": p.app.tier, "version": p.version}),
            Value::Array(ports),
            "Running",
        )
    };
    let ip_list: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns.name, "name": p.name, "labels": pod_labels},
        "spec": {
            "nodeName": node.name,
            "containers": [{"name": "main", "image": format!("registry.example/{}:{}", p.app.name, p.version), "ports": ports}],
        },
        "status": {
            "phase": phase,
            "podIP": ips.first().map(|ip| ip.to_string()),
            "podIPs": ip_list,
        },
    }))
    .with_context(|| format!("pod object {}/{}", ns.name, p.name))
}

fn match_labels(pairs: &[(&str, &str)]) -> Value {
    json!({"matchLabels": labels(pairs)})
}

/// Numeric port of an app's first container port: `{"protocol": .., "port": ..}`.
fn first_port_number(app: &App) -> Value {
    match app.ports.first() {
        Some((_, port, proto)) => json!({"protocol": proto, "port": port}),
        None => json!({"protocol": "TCP", "port": 8080}),
    }
}

/// Named port of an app's first container port.
fn first_port_name(app: &App) -> Value {
    match app.ports.first() {
        Some((name, _, proto)) => json!({"protocol": proto, "port": name}),
        None => json!({"protocol": "TCP", "port": "http"}),
    }
}

fn block(b: &Block) -> Value {
    if b.1.is_empty() {
        json!({"ipBlock": {"cidr": b.0}})
    } else {
        json!({"ipBlock": {"cidr": b.0, "except": b.1}})
    }
}

/// The policy kinds after the default-deny phase, with weights (out of 100).
const KINDS: &[(&str, u32)] = &[
    ("allow-from-app", 22),
    ("allow-team", 12),
    ("allow-gateway", 12),
    ("allow-expr", 10),
    ("allow-cidr", 8),
    ("allow-ranges", 6),
    ("egress-deps", 10),
    ("egress-internet", 5),
    ("allow-scrape", 7),
    ("allow-same-ns", 4),
    ("allow-udp-sctp", 2),
    ("egress-grpc", 2),
];

struct PolicyGen<'a> {
    rng: &'a mut ChaCha8Rng,
    namespaces: &'a [NsDraft],
    out: Vec<NetworkPolicy>,
    mix: PolicyMix,
    limit: usize,
}

impl PolicyGen<'_> {
    fn full(&self) -> bool {
        self.out.len() >= self.limit
    }

    fn push(&mut self, kind: &'static str, ns: &NsDraft, name: String, spec: Value) -> Result<()> {
        if self.full() {
            return Ok(());
        }
        let policy = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": ns.name, "name": name},
            "spec": spec,
        }))
        .with_context(|| format!("policy {}/{name}", ns.name))?;
        self.out.push(policy);
        *self.mix.entry(kind).or_default() += 1;
        Ok(())
    }

    fn generate(&mut self) -> Result<()> {
        let namespaces = self.namespaces;
        // 1. Default deny in two thirds of the namespaces (at most a quarter of the policies);
        //    a quarter of those deny egress too and then allow DNS.
        let mut order: Vec<usize> = (0..namespaces.len()).collect();
        order.shuffle(self.rng);
        let deny = (namespaces.len() * 2 / 3).min(self.limit / 4);
        for &i in order.iter().take(deny) {
            let ns = &namespaces[i];
            if self.rng.random_bool(0.25) {
                self.push(
                    "default-deny-all",
                    ns,
                    "default-deny-all".into(),
                    json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
                )?;
                self.push(
                    "allow-dns",
                    ns,
                    "allow-dns".into(),
                    json!({
                        "podSelector": {},
                        "policyTypes": ["Egress"],
                        "egress": [{
                            "to": [{
                                "namespaceSelector": match_labels(&[(NAMESPACE_NAME_LABEL, SYSTEM_NS)]),
                                "podSelector": match_labels(&[("app", "dns")]),
                            }],
                            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                        }],
                    }),
                )?;
            } else {
                self.push(
                    "default-deny",
                    ns,
                    "default-deny".into(),
                    json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
                )?;
            }
        }
        // 2. Allows, each in a random namespace, by weighted kind.
        let total: u32 = KINDS.iter().map(|(_, w)| w).sum();
        let mut q = 0usize;
        while !self.full() {
            q += 1;
            let ns = &namespaces[self.rng.random_range(0..namespaces.len())];
            let mut pick = self.rng.random_range(0..total);
            let mut kind = KINDS[0].0;
            for (k, w) in KINDS {
                if pick < *w {
                    kind = k;
                    break;
                }
                pick -= w;
            }
            let x = *ns.apps.choose(self.rng).context("namespace without apps")?;
            let name = format!("{kind}-{}-{q}", x.name);
            let spec = self.spec(kind, ns, x);
            self.push(kind, ns, name, spec)?;
        }
        Ok(())
    }

    fn spec(&mut self, kind: &str, ns: &NsDraft, x: &App) -> Value {
        let select_x = match_labels(&[("app", x.name)]);
        match kind {
            // podSelector -> podSelector in the same namespace, numeric port.
            "allow-from-app" => {
                let y = ns.apps.choose(self.rng).map_or(x.name, |a| a.name);
                json!({
                    "podSelector": select_x,
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [{"podSelector": match_labels(&[("app", y)])}],
                        "ports": [first_port_number(x)],
                    }],
                })
            }
            // Every pod of a team's namespaces, named port.
            "allow-team" => {
                let team = TEAMS.choose(self.rng).copied().unwrap_or("platform");
                json!({
                    "podSelector": select_x,
                    "ingress": [{
                        "from": [{"namespaceSelector": match_labels(&[("team", team)])}],
                        "ports": [first_port_name(x)],
                    }],
                })
            }
            // namespaceSelector AND podSelector in one peer, named port.
            "allow-gateway" => {
                let env = ENVS.choose(self.rng).copied().unwrap_or("prod");
                let from = ["gateway", "frontend", "web"]
                    .choose(self.rng)
                    .copied()
                    .unwrap_or("gateway");
                json!({
                    "podSelector": select_x,
                    "ingress": [{
                        "from": [{
                            "namespaceSelector": match_labels(&[("env", env)]),
                            "podSelector": match_labels(&[("app", from)]),
                        }],
                        "ports": [first_port_name(x)],
                    }],
                })
            }
            // matchExpressions everywhere: In, NotIn, Exists.
            "allow-expr" => {
                let z = ns.apps.choose(self.rng).map_or(x.name, |a| a.name);
                let envs: Vec<&str> = ENVS.choose_multiple(self.rng, 2).copied().collect();
                json!({
                    "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [x.name, z]}]},
                    "ingress": [{
                        "from": [{
                            "namespaceSelector": {"matchExpressions": [
                                {"key": "env", "operator": "In", "values": envs},
                                {"key": "team", "operator": "Exists"},
                            ]},
                            "podSelector": {"matchExpressions": [
                                {"key": "tier", "operator": "NotIn", "values": ["data"]},
                                {"key": "version", "operator": "NotIn", "values": ["v3"]},
                            ]},
                        }],
                        "ports": [first_port_number(x)],
                    }],
                })
            }
            // ipBlocks with except, both families.
            "allow-cidr" => {
                let v4 = V4_BLOCKS.choose(self.rng).unwrap_or(&V4_BLOCKS[0]);
                let v6 = V6_BLOCKS.choose(self.rng).unwrap_or(&V6_BLOCKS[0]);
                json!({
                    "podSelector": select_x,
                    "ingress": [{"from": [block(v4), block(v6)], "ports": [first_port_number(x)]}],
                })
            }
            // endPort ranges, TCP and UDP, from the whole namespace, selecting by tier.
            "allow-ranges" => {
                let end = 30000 + self.rng.random_range(10..200);
                json!({
                    "podSelector": match_labels(&[("tier", x.tier)]),
                    "ingress": [{
                        "from": [{"podSelector": {}}],
                        "ports": [
                            {"protocol": "TCP", "port": 30000, "endPort": end},
                            {"protocol": "UDP", "port": 5000, "endPort": 5010},
                        ],
                    }],
                })
            }
            // Egress to a backing service in the namespace and to cluster DNS.
            "egress-deps" => {
                let data: Vec<&&App> = ns.apps.iter().filter(|a| a.tier == "data").collect();
                let dep: &App = data
                    .choose(self.rng)
                    .map(|a| **a)
                    .or_else(|| ns.apps.choose(self.rng).copied())
                    .unwrap_or(x);
                json!({
                    "podSelector": select_x,
                    "policyTypes": ["Egress"],
                    "egress": [
                        {"to": [{"podSelector": match_labels(&[("app", dep.name)])}], "ports": [first_port_number(dep)]},
                        {
                            "to": [{
                                "namespaceSelector": match_labels(&[(NAMESPACE_NAME_LABEL, SYSTEM_NS)]),
                                "podSelector": match_labels(&[("app", "dns")]),
                            }],
                            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                        },
                    ],
                })
            }
            // Egress to the internet but not the cluster or the metadata service.
            "egress-internet" => json!({
                "podSelector": select_x,
                "policyTypes": ["Egress"],
                "egress": [{
                    "to": [
                        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "169.254.169.254/32", "192.168.0.0/16"]}},
                        {"ipBlock": {"cidr": "::/0", "except": ["fd00::/8"]}},
                    ],
                    "ports": [{"protocol": "TCP", "port": 443}],
                }],
            }),
            // Prometheus scrapes every pod of the namespace on the named port `metrics`.
            "allow-scrape" => json!({
                "podSelector": {},
                "ingress": [{
                    "from": [{
                        "namespaceSelector": match_labels(&[(NAMESPACE_NAME_LABEL, MONITORING_NS)]),
                        "podSelector": match_labels(&[("app", "prometheus")]),
                    }],
                    "ports": [{"port": "metrics"}],
                }],
            }),
            // Anything from the same namespace, any port.
            "allow-same-ns" => json!({
                "podSelector": select_x,
                "ingress": [{"from": [{"podSelector": {}}]}],
            }),
            // Protocol-only port (all of UDP) and SCTP from backend namespaces.
            "allow-udp-sctp" => json!({
                "podSelector": select_x,
                "ingress": [
                    {"ports": [{"protocol": "UDP"}]},
                    {
                        "from": [{"namespaceSelector": match_labels(&[("tier", "backend")])}],
                        "ports": [{"protocol": "SCTP", "port": 3868}],
                    },
                ],
            }),
            // Egress on a named port (resolved on the destination pods).
            _ => json!({
                "podSelector": select_x,
                "policyTypes": ["Egress"],
                "egress": [{
                    "to": [{"namespaceSelector": {}, "podSelector": match_labels(&[("app", "auth")])}],
                    "ports": [{"port": "grpc"}],
                }],
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn small() -> SynthConfig {
        SynthConfig {
            pods: 600,
            policies: 120,
            nodes: 7,
            namespaces: 20,
            seed: 7,
        }
    }

    #[test]
    fn same_seed_same_cluster_other_seed_other_cluster() {
        let a = SynthCluster::generate(&small()).expect("generate");
        let b = SynthCluster::generate(&small()).expect("generate");
        let text = |c: &SynthCluster| {
            serde_json::to_string(&(&c.namespaces, &c.pods, &c.policies)).expect("json")
        };
        assert_eq!(text(&a), text(&b));
        let c = SynthCluster::generate(&SynthConfig { seed: 8, ..small() }).expect("generate");
        assert_ne!(text(&a), text(&c));
    }

    #[test]
    fn counts_and_every_object_converts_without_errors() {
        let c = SynthCluster::generate(&small()).expect("generate");
        assert_eq!(c.namespaces.len(), 20);
        assert_eq!(c.pods.len(), 600);
        assert_eq!(c.policies.len(), 120);
        let idx = c.index().expect("index");
        assert_eq!(idx.pods.len(), 600, "pod names are unique");
        assert_eq!(idx.policies.len(), 120, "policy names are unique");
        for p in idx.policies.values() {
            assert!(p.errors.is_empty(), "{}: {:?}", p.key, p.errors);
        }
        assert_eq!(c.mix.values().sum::<usize>(), 120);
    }

    #[test]
    fn addresses_are_unique_and_inside_their_node_cidrs() {
        for cfg in [
            small(),
            // More pods per node than a /24 holds, and more nodes than 10.244.0.0/16 holds.
            SynthConfig {
                pods: 2_000,
                nodes: 3,
                ..small()
            },
            SynthConfig {
                pods: 600,
                nodes: 300,
                ..small()
            },
        ] {
            let c = SynthCluster::generate(&cfg).expect("generate");
            let idx = c.index().expect("index");
            let mut seen = BTreeSet::new();
            for pod in idx.pods.values() {
                let node = c
                    .node(pod.node.as_deref().expect("node"))
                    .expect("known node");
                assert_eq!(pod.ips.len(), 2, "dual-stack");
                for ip in &pod.ips {
                    assert!(seen.insert(*ip), "{ip} used twice");
                    assert!(node.pod_cidrs.iter().any(|n| n.contains(ip)));
                    assert_ne!(
                        Some(*ip),
                        node.pod_cidrs.iter().map(|n| n.network()).find(|n| n == ip)
                    );
                }
            }
            for node in &c.nodes {
                let spare = c.spare_ips(&node.name, 0).expect("spare");
                assert!(spare.iter().all(|ip| !seen.contains(ip)));
                assert!(spare
                    .iter()
                    .all(|ip| node.pod_cidrs.iter().any(|n| n.contains(ip))));
            }
        }
    }

    #[test]
    fn the_mix_has_every_kind_and_policies_select_pods() {
        let c = SynthCluster::generate(&SynthConfig::default()).expect("generate");
        for (kind, _) in KINDS {
            assert!(c.mix.get(kind).copied().unwrap_or(0) > 0, "no {kind}");
        }
        assert!(c.mix["default-deny"] > 0 && c.mix["default-deny-all"] > 0);
        let idx = c.index().expect("index");
        let selecting = idx
            .policies
            .values()
            .filter(|p| idx.pods.values().any(|pod| p.selects(pod)))
            .count();
        assert!(
            selecting * 10 >= idx.policies.len() * 9,
            "{selecting} of {}",
            idx.policies.len()
        );
    }
}
