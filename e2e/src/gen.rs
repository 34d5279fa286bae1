//! Random scenarios for the differential test: a seeded generator of complete scenario files
//! (`../shared/SCENARIOS.md`) whose expected matrices come from sluice's reference evaluator.
//!
//! Each scenario is a small flannel cluster (2-3 dual-stack nodes, 2-3 namespaces, a handful of
//! pods) with random labels, random named container ports (the same name maps to different
//! numbers and protocols on different pods), now and then a hostNetwork pod and a finished
//! (`Succeeded`) pod, and 1-5 random NetworkPolicies drawn from the whole v1 API: matchLabels and
//! every matchExpressions operator, policyTypes given or defaulted, empty vs missing
//! from/to/ports, several peers (OR) and peers with both selectors (AND), podSelector-only peers,
//! `namespaceSelector: {}`, ipBlocks with except (pod IPs, node podCIDRs, the nodes' own
//! addresses; IPv4 and IPv6), numeric, named, ranged (`endPort`) and protocol-only ports over TCP,
//! UDP and SCTP. Between checkpoints it updates the cluster (relabels pods and namespaces, edits,
//! adds and deletes policies, adds, deletes and finishes pods) so that the incremental nftables
//! diffs are exercised too.
//!
//! The documents are applied, as they are generated, to a [`World`] through the same path the
//! runner takes (`parse_object` + `World::apply` / `World::delete`), and each probe's expected
//! matrix is the evaluator's answer at that point: `.` iff the connection is allowed for every
//! probed family. Running such a scenario in the lab therefore compares the real dataplane with
//! the evaluator; `runner::check` compares the compiled rulesets (simulated) with it.
//!
//! The output is a pure function of the seed and the size (ChaCha8, no other source of
//! randomness, only ordered maps), so a failing seed is rerun with `e2e/lab gen --seed N`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use sluice::model::{Family, ObjectKey, Phase, PodKey, Protocol};
use sluice::policy::allowed;
use sluice::snapshot::{parse_object, World};

/// How big the generated scenarios are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Size {
    /// 2-3 nodes, 2-3 namespaces, 4-8 pods, 1-5 policies, 2-3 checkpoints (CI).
    #[default]
    Small,
    /// 3 nodes, 3-4 namespaces, 8-14 pods, 3-9 policies, 3-5 checkpoints.
    Large,
}

impl Size {
    pub fn as_str(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    fn limits(self) -> Limits {
        match self {
            Size::Small => Limits {
                nodes: (2, 3),
                namespaces: (2, 3),
                pods: (4, 8),
                policies: (1, 5),
                checkpoints: (2, 3),
                host_pods: 1,
            },
            Size::Large => Limits {
                nodes: (3, 3),
                namespaces: (3, 4),
                pods: (8, 14),
                policies: (3, 9),
                checkpoints: (3, 5),
                host_pods: 2,
            },
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "small" => Ok(Size::Small),
            "large" => Ok(Size::Large),
            _ => Err(format!("unknown size {s:?} (expected small or large)")),
        }
    }
}

/// Inclusive ranges of what a scenario holds.
struct Limits {
    nodes: (usize, usize),
    namespaces: (usize, usize),
    /// Running, non-hostNetwork pods at the start.
    pods: (usize, usize),
    policies: (usize, usize),
    checkpoints: (usize, usize),
    /// At most this many hostNetwork pods.
    host_pods: usize,
}

const NAMESPACES: [&str; 4] = ["x", "y", "z", "w"];
const POD_LABELS: &[(&str, &[&str])] = &[
    ("app", &["web", "db", "cache"]),
    ("role", &["front", "back"]),
    ("tier", &["gold", "silver"]),
];
const NS_LABELS: &[(&str, &[&str])] = &[("team", &["red", "blue"]), ("env", &["prod", "dev"])];
/// A label key no object carries.
const ABSENT_KEY: &str = "gone";
/// A label value no object carries.
const ABSENT_VALUE: &str = "none";
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Container port names pods declare (each pod maps them to its own numbers and protocols).
const PORT_NAMES: [&str; 3] = ["web", "alt", "svc"];
/// A port name no pod declares.
const ABSENT_PORT_NAME: &str = "nope";

/// One declared container port.
#[derive(Clone, Debug)]
struct ContainerPort {
    name: Option<&'static str>,
    port: u16,
    protocol: &'static str,
}

/// A pod as the generator writes it.
#[derive(Clone, Debug)]
struct PodDef {
    key: PodKey,
    labels: BTreeMap<String, String>,
    node: String,
    host_network: bool,
    succeeded: bool,
    ports: Vec<ContainerPort>,
}

impl PodDef {
    fn to_value(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut m = Map::new();
                if let Some(name) = p.name {
                    m.insert("name".into(), json!(name));
                }
                m.insert("containerPort".into(), json!(p.port));
                m.insert("protocol".into(), json!(p.protocol));
                Value::Object(m)
            })
            .collect();
        let mut container = Map::new();
        container.insert("name".into(), json!("server"));
        container.insert("image".into(), json!("registry.k8s.io/pause:3.10"));
        if !ports.is_empty() {
            container.insert("ports".into(), Value::Array(ports));
        }
        let mut metadata = Map::new();
        metadata.insert("namespace".into(), json!(self.key.namespace));
        metadata.insert("name".into(), json!(self.key.name));
        if !self.labels.is_empty() {
            metadata.insert("labels".into(), json!(self.labels));
        }
        let mut spec = Map::new();
        spec.insert("nodeName".into(), json!(self.node));
        if self.host_network {
            spec.insert("hostNetwork".into(), json!(true));
        }
        spec.insert("containers".into(), json!([container]));
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": spec,
        });
        if self.succeeded {
            pod["status"] = json!({"phase": "Succeeded"});
        }
        pod
    }
}

/// What a probe asks.
struct ProbeDef {
    protocol: Protocol,
    port: u16,
    family: Option<Family>,
    from: Option<Vec<PodKey>>,
    to: Option<Vec<PodKey>>,
}

/// Generates one complete scenario (YAML, with a leading comment naming the seed and how to
/// rerun it). Deterministic: the same seed and size always give the same text.
pub fn generate(seed: u64, size: Size) -> String {
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(seed),
        world: World::default(),
        text: String::new(),
        notes: Vec::new(),
        nodes: Vec::new(),
        namespaces: BTreeMap::new(),
        pods: BTreeMap::new(),
        policies: BTreeMap::new(),
        next_pod: 0,
        next_policy: 0,
    };
    g.scenario(size.limits());
    let mut header = String::new();
    let size_flag = match size {
        Size::Small => String::new(),
        other => format!(" --size {other}"),
    };
    let _ = writeln!(
        header,
        "# Differential scenario, seed {seed} (size {size}), generated by `e2e/lab gen --seed {seed}{size_flag}`:"
    );
    header.push_str(
        "# random cluster, policies and updates; every expected matrix is the reference evaluator's answer.\n",
    );
    let _ = writeln!(
        header,
        "# Regenerate: e2e/lab gen --seed {seed}{size_flag} --out seed-{seed}.yaml    Run: e2e/lab run seed-{seed}.yaml"
    );
    for note in &g.notes {
        let _ = writeln!(header, "# note: {note}");
    }
    header + &g.text
}

/// The generator's state: the randomness, the world so far and the text so far.
struct Gen {
    rng: ChaCha8Rng,
    /// The world as the runner will see it, document by document.
    world: World,
    /// The documents written so far.
    text: String,
    /// Warnings from applying documents (a policy applied fail-closed); should stay empty.
    notes: Vec<String>,
    nodes: Vec<String>,
    /// Namespace name -> its own labels (without the implicit name label).
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: BTreeMap<PodKey, PodDef>,
    /// Policy key -> spec.
    policies: BTreeMap<ObjectKey, Value>,
    next_pod: usize,
    next_policy: usize,
}

impl Gen {
    // ---- randomness helpers ----

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn between(&mut self, (lo, hi): (usize, usize)) -> usize {
        self.rng.random_range(lo..=hi)
    }

    /// An index drawn with the given weights.
    fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u32 = weights.iter().sum();
        let mut r = self.rng.random_range(0..total);
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return i;
            }
            r -= w;
        }
        weights.len() - 1
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items
            .choose(&mut self.rng)
            .cloned()
            .expect("pick from a non-empty list")
    }

    /// A random subset of `items` of size `lo..=hi` (clamped), in the original order.
    fn subset<T: Clone>(&mut self, items: &[T], lo: usize, hi: usize) -> Vec<T> {
        let hi = hi.min(items.len());
        let n = self.rng.random_range(lo.min(hi)..=hi);
        let mut idx: Vec<usize> =
            rand::seq::index::sample(&mut self.rng, items.len(), n).into_vec();
        idx.sort_unstable();
        idx.into_iter().map(|i| items[i].clone()).collect()
    }

    fn protocol(&mut self) -> &'static str {
        ["TCP", "UDP", "SCTP"][self.weighted(&[50, 35, 15])]
    }

    // ---- documents ----

    fn emit(&mut self, comment: Option<&str>, value: Value) {
        let what = sluice::snapshot::describe_document(&value);
        let object = parse_object(&value)
            .unwrap_or_else(|e| panic!("generator bug: {what} does not parse: {e}"));
        let warnings = self
            .world
            .apply(object)
            .unwrap_or_else(|e| panic!("generator bug: {what} cannot be applied: {e}"));
        self.notes.extend(warnings);
        let yaml = serde_yaml::to_string(&value).expect("JSON values always serialize to YAML");
        self.text.push_str("---\n");
        if let Some(c) = comment {
            let _ = writeln!(self.text, "# {c}");
        }
        self.text.push_str(&yaml);
    }

    fn emit_delete(&mut self, kind: &str, namespace: &str, name: &str) {
        self.world
            .delete(kind, Some(namespace), name)
            .unwrap_or_else(|e| panic!("generator bug: delete {kind} {namespace}/{name}: {e}"));
        let _ = write!(
            self.text,
            "---\n# update: delete {kind} {namespace}/{name}\napiVersion: lab.sluice.dev/v1\nkind: Delete\nspec: {{kind: {kind}, namespace: {namespace}, name: {name}}}\n"
        );
    }

    // ---- the scenario ----

    fn scenario(&mut self, limits: Limits) {
        let node_count = self.between(limits.nodes);
        for n in 1..=node_count {
            let name = format!("node-{n}");
            self.emit(
                None,
                json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name},
                    "spec": {"podCIDRs": [format!("10.244.{n}.0/24"), format!("fd00:10:244:{n:x}::/64")]},
                }),
            );
            self.nodes.push(name);
        }
        let ns_count = self.between(limits.namespaces);
        for ns in NAMESPACES.iter().take(ns_count) {
            let labels = self.labels(NS_LABELS);
            self.emit_namespace(None, ns, labels);
        }
        let namespaces: Vec<String> = self.namespaces.keys().cloned().collect();
        let pod_count = self.between(limits.pods);
        for i in 0..pod_count {
            // Every namespace gets a pod before any gets a second.
            let ns = match namespaces.get(i) {
                Some(ns) => ns.clone(),
                None => self.pick(&namespaces),
            };
            let pod = self.new_pod(&ns, false);
            self.emit(None, pod.to_value());
            self.pods.insert(pod.key.clone(), pod);
        }
        for _ in 0..limits.host_pods {
            if self.chance(0.3) {
                let ns = self.pick(&namespaces);
                let pod = self.new_pod(&ns, true);
                self.emit(
                    Some("hostNetwork: node traffic, never selected by policy"),
                    pod.to_value(),
                );
                self.pods.insert(pod.key.clone(), pod);
            }
        }
        if self.chance(0.25) {
            let ns = self.pick(&namespaces);
            let mut pod = self.new_pod(&ns, false);
            pod.succeeded = true;
            self.emit(
                Some("finished: keeps its IP in the API but owns nothing"),
                pod.to_value(),
            );
            self.pods.insert(pod.key.clone(), pod);
        }
        let policy_count = self.between(limits.policies);
        for _ in 0..policy_count {
            self.add_policy(None);
        }
        let checkpoints = self.between(limits.checkpoints);
        for c in 0..checkpoints {
            if c > 0 {
                let updates = self.between((1, 3));
                for _ in 0..updates {
                    self.update(&limits);
                }
            }
            self.checkpoint();
        }
    }

    fn labels(&mut self, pool: &[(&str, &[&str])]) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        for (key, values) in pool {
            if self.chance(0.6) {
                let v = self.pick(values);
                labels.insert(key.to_string(), v.to_string());
            }
        }
        labels
    }

    fn emit_namespace(
        &mut self,
        comment: Option<&str>,
        name: &str,
        labels: BTreeMap<String, String>,
    ) {
        let mut metadata = Map::new();
        metadata.insert("name".into(), json!(name));
        if !labels.is_empty() || self.chance(0.5) {
            metadata.insert("labels".into(), json!(labels));
        }
        self.emit(
            comment,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}),
        );
        self.namespaces.insert(name.to_string(), labels);
    }

    fn pod_name(&mut self) -> String {
        let n = self.next_pod;
        self.next_pod += 1;
        match u8::try_from(n).ok().filter(|n| *n < 26) {
            Some(n) => char::from(b'a' + n).to_string(),
            None => format!("p{n}"),
        }
    }

    fn new_pod(&mut self, namespace: &str, host_network: bool) -> PodDef {
        let name = self.pod_name();
        let labels = self.labels(POD_LABELS);
        let node = self.pick(&self.nodes.clone());
        let ports = self.container_ports();
        PodDef {
            key: PodKey::new(namespace, name),
            labels,
            node,
            host_network,
            succeeded: false,
            ports,
        }
    }

    /// Random named ports on 80/81 (names unique in the pod, as the API requires), sometimes an
    /// unnamed one.
    fn container_ports(&mut self) -> Vec<ContainerPort> {
        let mut ports = Vec::new();
        for name in PORT_NAMES {
            if self.chance(0.55) {
                let port = self.pick(&[80u16, 81]);
                let protocol = self.protocol();
                ports.push(ContainerPort {
                    name: Some(name),
                    port,
                    protocol,
                });
            }
        }
        if self.chance(0.2) {
            let port = self.pick(&[80u16, 81]);
            ports.push(ContainerPort {
                name: None,
                port,
                protocol: "TCP",
            });
        }
        ports
    }

    // ---- selectors, peers, ports, rules, policies ----

    fn selector(&mut self, pool: &[(&str, &[&str])], namespaces: bool) -> Value {
        let kind = self.weighted(&[20, 30, 35, 15]);
        let mut sel = Map::new();
        if kind == 0 {
            return Value::Object(sel);
        }
        if kind == 1 || kind == 3 {
            let mut labels = Map::new();
            let n = if self.chance(0.75) { 1 } else { 2 };
            for _ in 0..n {
                let (key, values) = self.pick(pool);
                let value = if self.chance(0.1) {
                    ABSENT_VALUE
                } else {
                    self.pick(values)
                };
                labels.insert(key.to_string(), json!(value));
            }
            sel.insert("matchLabels".into(), Value::Object(labels));
        }
        if kind == 2 || kind == 3 {
            let n = if self.chance(0.7) { 1 } else { 2 };
            let exprs: Vec<Value> = (0..n).map(|_| self.expression(pool, namespaces)).collect();
            sel.insert("matchExpressions".into(), Value::Array(exprs));
        }
        Value::Object(sel)
    }

    fn expression(&mut self, pool: &[(&str, &[&str])], namespaces: bool) -> Value {
        let names: Vec<String> = self.namespaces.keys().cloned().collect();
        let (key, values): (String, Vec<String>) = match self.weighted(&[80, 10, 10]) {
            1 if namespaces => (NAMESPACE_NAME_LABEL.to_string(), names),
            2 => (
                ABSENT_KEY.to_string(),
                vec!["a".to_string(), "b".to_string()],
            ),
            _ => {
                let (k, vs) = self.pick(pool);
                (k.to_string(), vs.iter().map(|v| v.to_string()).collect())
            }
        };
        let operator = self.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
        let mut expr = Map::new();
        expr.insert("key".into(), json!(key));
        expr.insert("operator".into(), json!(operator));
        if operator == "In" || operator == "NotIn" {
            let mut chosen = self.subset(&values, 1, 2);
            if self.chance(0.1) {
                chosen.push(ABSENT_VALUE.to_string());
            }
            expr.insert("values".into(), json!(chosen));
        }
        Value::Object(expr)
    }

    fn namespace_selector(&mut self) -> Value {
        if self.chance(0.35) {
            json!({})
        } else {
            self.selector(NS_LABELS, true)
        }
    }

    fn peer(&mut self) -> Value {
        match self.weighted(&[30, 22, 20, 28]) {
            0 => json!({"podSelector": self.selector(POD_LABELS, false)}),
            1 => json!({"namespaceSelector": self.namespace_selector()}),
            2 => {
                let ns = self.namespace_selector();
                json!({"namespaceSelector": ns, "podSelector": self.selector(POD_LABELS, false)})
            }
            _ => json!({"ipBlock": self.ip_block()}),
        }
    }

    /// Networks an ipBlock may name, in one family: every pod's address, each node's podCIDR
    /// and its first /30 (/126), the cluster range, everything, the nodes' own addresses.
    fn candidate_nets(&self, family: Family) -> Vec<(u32, IpNet)> {
        let host = |ip: IpAddr| IpNet::from(ip);
        let net = |s: &str| s.parse::<IpNet>().expect("a literal CIDR");
        let mut out = Vec::new();
        let pod_ips: BTreeSet<IpAddr> = self
            .world
            .index
            .pods
            .values()
            .filter(|p| !p.host_network)
            .flat_map(|p| p.ips.iter().copied())
            .filter(|ip| Family::of(ip) == family)
            .collect();
        for ip in pod_ips {
            out.push((8, host(ip)));
        }
        for node in self.world.nodes.values() {
            for cidr in node
                .pod_cidrs
                .iter()
                .filter(|c| Family::of(&c.addr()) == family)
            {
                out.push((6, *cidr));
                let small = if family == Family::V4 { 30 } else { 126 };
                if let Ok(n) = IpNet::new(cidr.network(), small) {
                    out.push((3, n));
                }
            }
            for ip in node.addresses.iter().filter(|ip| Family::of(ip) == family) {
                out.push((2, host(*ip)));
            }
        }
        let (cluster, all, hosts) = match family {
            Family::V4 => ("10.244.0.0/16", "0.0.0.0/0", "198.18.0.0/24"),
            Family::V6 => ("fd00:10:244::/48", "::/0", "fd00:198:18::/64"),
        };
        out.push((10, net(cluster)));
        out.push((10, net(all)));
        out.push((5, net(hosts)));
        out
    }

    fn ip_block(&mut self) -> Value {
        let family = if self.chance(0.5) {
            Family::V4
        } else {
            Family::V6
        };
        let candidates = self.candidate_nets(family);
        let weights: Vec<u32> = candidates.iter().map(|(w, _)| *w).collect();
        let cidr = candidates[self.weighted(&weights)].1;
        // except: strict subsets of cidr, as the API requires.
        let inside: Vec<IpNet> = candidates
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| cidr.contains(n) && n.prefix_len() > cidr.prefix_len())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let n = [0, 0, 1, 1, 2][self.rng.random_range(0..5)];
        let except = self.subset(&inside, n, n);
        let mut block = Map::new();
        block.insert("cidr".into(), json!(cidr.to_string()));
        if !except.is_empty() {
            let except: Vec<String> = except.iter().map(IpNet::to_string).collect();
            block.insert("except".into(), json!(except));
        }
        Value::Object(block)
    }

    fn port_entry(&mut self) -> Value {
        let protocol = self.protocol();
        let mut m = Map::new();
        if protocol != "TCP" || self.chance(0.5) {
            m.insert("protocol".into(), json!(protocol));
        }
        match self.weighted(&[35, 20, 15, 30]) {
            0 => {
                let port = [80u16, 81, 82][self.weighted(&[45, 45, 10])];
                m.insert("port".into(), json!(port));
            }
            1 => {
                let (lo, hi) = self.pick(&[(80u16, 81u16), (81, 90), (70, 80), (79, 80), (82, 85)]);
                m.insert("port".into(), json!(lo));
                m.insert("endPort".into(), json!(hi));
            }
            2 => {}
            _ => {
                let name = if self.chance(0.1) {
                    ABSENT_PORT_NAME
                } else {
                    self.pick(&PORT_NAMES)
                };
                m.insert("port".into(), json!(name));
            }
        }
        Value::Object(m)
    }

    /// `None`: leave the field out.
    fn rules(&mut self, peers_field: &str) -> Option<Value> {
        match self.weighted(&[25, 15, 60]) {
            0 => None,
            1 => Some(json!([])),
            _ => {
                let n = self.between((1, 3));
                Some(Value::Array(
                    (0..n).map(|_| self.rule(peers_field)).collect(),
                ))
            }
        }
    }

    fn rule(&mut self, peers_field: &str) -> Value {
        let mut rule = Map::new();
        match self.weighted(&[25, 10, 65]) {
            0 => {}
            1 => {
                rule.insert(peers_field.into(), json!([]));
            }
            _ => {
                let n = self.between((1, 3));
                let peers: Vec<Value> = (0..n).map(|_| self.peer()).collect();
                rule.insert(peers_field.into(), Value::Array(peers));
            }
        }
        match self.weighted(&[40, 10, 50]) {
            0 => {}
            1 => {
                rule.insert("ports".into(), json!([]));
            }
            _ => {
                let n = self.between((1, 2));
                let ports: Vec<Value> = (0..n).map(|_| self.port_entry()).collect();
                rule.insert("ports".into(), Value::Array(ports));
            }
        }
        Value::Object(rule)
    }

    fn policy_selector(&mut self) -> Value {
        if self.chance(0.35) {
            json!({})
        } else {
            self.selector(POD_LABELS, false)
        }
    }

    fn policy_spec(&mut self) -> Value {
        let mut spec = Map::new();
        spec.insert("podSelector".into(), self.policy_selector());
        let types: Option<(bool, bool)> = match self.weighted(&[40, 20, 20, 20]) {
            0 => None,
            1 => Some((true, false)),
            2 => Some((false, true)),
            _ => Some((true, true)),
        };
        let (ingress, egress) = match types {
            // Defaulted: Ingress always, Egress iff there are egress rules.
            None => (self.chance(0.7), self.chance(0.5)),
            // Rules of a direction not in policyTypes are ignored; write some now and then.
            Some((i, e)) => (i || self.chance(0.1), e || self.chance(0.1)),
        };
        if let Some((i, e)) = types {
            let mut list = Vec::new();
            if i {
                list.push("Ingress");
            }
            if e {
                list.push("Egress");
            }
            spec.insert("policyTypes".into(), json!(list));
        }
        if ingress {
            if let Some(rules) = self.rules("from") {
                spec.insert("ingress".into(), rules);
            }
        }
        if egress {
            if let Some(rules) = self.rules("to") {
                spec.insert("egress".into(), rules);
            }
        }
        Value::Object(spec)
    }

    fn emit_policy(&mut self, comment: Option<&str>, key: &ObjectKey, spec: Value) {
        self.emit(
            comment,
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"namespace": key.namespace, "name": key.name},
                "spec": spec,
            }),
        );
        self.policies.insert(key.clone(), spec);
    }

    fn add_policy(&mut self, comment: Option<&str>) {
        let namespaces: Vec<String> = self.namespaces.keys().cloned().collect();
        let ns = self.pick(&namespaces);
        self.next_policy += 1;
        let key = ObjectKey::new(ns, format!("p{}", self.next_policy));
        let spec = self.policy_spec();
        self.emit_policy(comment, &key, spec);
    }

    // ---- updates ----

    /// Running pods that own their IPs (not hostNetwork).
    fn running_pods(&self) -> Vec<PodKey> {
        self.pods
            .values()
            .filter(|p| !p.host_network && !p.succeeded)
            .map(|p| p.key.clone())
            .collect()
    }

    fn update(&mut self, limits: &Limits) {
        let running = self.running_pods();
        let live: Vec<PodKey> = self
            .pods
            .values()
            .filter(|p| !p.succeeded)
            .map(|p| p.key.clone())
            .collect();
        let policies: Vec<ObjectKey> = self.policies.keys().cloned().collect();
        let can_shrink = running.len() > 3;
        let can_grow = running.len() < limits.pods.1 + 2;
        let weights = [
            20,                                       // relabel a pod
            15,                                       // relabel a namespace
            if policies.is_empty() { 0 } else { 20 }, // edit a policy
            if policies.is_empty() { 0 } else { 10 }, // delete a policy
            if policies.len() < limits.policies.1 + 2 {
                12
            } else {
                0
            }, // add a policy
            if can_shrink { 8 } else { 0 },           // delete a pod
            if can_grow { 10 } else { 0 },            // add a pod
            if can_shrink { 5 } else { 0 },           // a pod finishes
        ];
        match self.weighted(&weights) {
            0 => {
                let key = self.pick(&live);
                let labels = self.labels(POD_LABELS);
                let Some(pod) = self.pods.get_mut(&key) else {
                    return;
                };
                pod.labels = labels;
                let value = pod.to_value();
                self.emit(Some(&format!("update: relabel pod {key}")), value);
            }
            1 => {
                let names: Vec<String> = self.namespaces.keys().cloned().collect();
                let ns = self.pick(&names);
                let labels = self.labels(NS_LABELS);
                self.emit_namespace(
                    Some(&format!("update: relabel namespace {ns}")),
                    &ns,
                    labels,
                );
            }
            2 => {
                let key = self.pick(&policies);
                let Some(old) = self.policies.get(&key).cloned() else {
                    return;
                };
                let fresh = self.policy_spec();
                let spec = match self.weighted(&[30, 35, 35]) {
                    // A new podSelector only.
                    0 => {
                        let mut spec = old;
                        spec["podSelector"] = self.policy_selector();
                        spec
                    }
                    // The same podSelector, new rules and types.
                    1 => {
                        let mut spec = fresh;
                        spec["podSelector"] = old["podSelector"].clone();
                        spec
                    }
                    _ => fresh,
                };
                self.emit_policy(Some(&format!("update: edit policy {key}")), &key, spec);
            }
            3 => {
                let key = self.pick(&policies);
                self.emit_delete("NetworkPolicy", &key.namespace, &key.name);
                self.policies.remove(&key);
            }
            4 => self.add_policy(Some("update: add a policy")),
            5 => {
                let key = self.pick(&running);
                self.emit_delete("Pod", &key.namespace, &key.name);
                self.pods.remove(&key);
            }
            6 => {
                let namespaces: Vec<String> = self.namespaces.keys().cloned().collect();
                let ns = self.pick(&namespaces);
                let pod = self.new_pod(&ns, false);
                self.emit(Some("update: add a pod"), pod.to_value());
                self.pods.insert(pod.key.clone(), pod);
            }
            _ => {
                let key = self.pick(&running);
                let Some(pod) = self.pods.get_mut(&key) else {
                    return;
                };
                pod.succeeded = true;
                let value = pod.to_value();
                self.emit(
                    Some(&format!(
                        "update: pod {key} finishes (Succeeded: keeps its IP, owns nothing)"
                    )),
                    value,
                );
            }
        }
    }

    // ---- probes ----

    fn checkpoint(&mut self) {
        const KINDS: [(Protocol, u16, u32); 8] = [
            (Protocol::Tcp, 80, 30),
            (Protocol::Tcp, 81, 20),
            (Protocol::Udp, 80, 15),
            (Protocol::Udp, 81, 12),
            (Protocol::Tcp, 82, 5),
            (Protocol::Udp, 82, 3),
            (Protocol::Sctp, 80, 8),
            (Protocol::Sctp, 81, 7),
        ];
        let count = self.between((1, 3));
        let mut seen = BTreeSet::new();
        for i in 0..count {
            let weights: Vec<u32> = KINDS.iter().map(|k| k.2).collect();
            let (protocol, port, _) = KINDS[self.weighted(&weights)];
            let family = match self.weighted(&[76, 12, 12]) {
                0 => None,
                1 => Some(Family::V4),
                _ => Some(Family::V6),
            };
            if !seen.insert((protocol, port, family)) {
                continue;
            }
            let (from, to) = if i > 0 && self.chance(0.35) {
                self.probe_subsets()
            } else {
                (None, None)
            };
            self.probe(ProbeDef {
                protocol,
                port,
                family,
                from,
                to,
            });
        }
    }

    /// Explicit `from` and/or `to` lists (the latter may name hostNetwork pods).
    fn probe_subsets(&mut self) -> (Option<Vec<PodKey>>, Option<Vec<PodKey>>) {
        let idx = &self.world.index;
        let running: Vec<PodKey> = idx
            .pods
            .values()
            .filter(|p| p.phase == Phase::Running)
            .map(|p| p.key.clone())
            .collect();
        let servers: Vec<PodKey> = idx
            .pods
            .values()
            .filter(|p| p.phase == Phase::Running && !p.host_network)
            .map(|p| p.key.clone())
            .collect();
        let hosts: Vec<PodKey> = idx
            .pods
            .values()
            .filter(|p| p.phase == Phase::Running && p.host_network)
            .map(|p| p.key.clone())
            .collect();
        let (with_from, with_to) = match self.weighted(&[40, 40, 20]) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let from = with_from.then(|| {
            let hi = running.len().saturating_sub(1).max(1);
            self.subset(&running, 1, hi)
        });
        let to = with_to.then(|| {
            let hi = servers.len().saturating_sub(1).max(1);
            let mut to = self.subset(&servers, 1, hi);
            // A hostNetwork target: the node itself.
            for h in hosts {
                if self.chance(0.5) {
                    to.push(h);
                }
            }
            to
        });
        (from, to)
    }

    fn probe(&mut self, p: ProbeDef) {
        let idx = &self.world.index;
        let rows: Vec<PodKey> = p.from.clone().unwrap_or_else(|| {
            idx.pods
                .values()
                .filter(|pod| pod.phase == Phase::Running)
                .map(|pod| pod.key.clone())
                .collect()
        });
        let cols: Vec<PodKey> = p.to.clone().unwrap_or_else(|| {
            idx.pods
                .values()
                .filter(|pod| pod.phase == Phase::Running && !pod.host_network)
                .map(|pod| pod.key.clone())
                .collect()
        });
        let mut grid: Vec<Vec<String>> = Vec::new();
        let mut header = vec!["*".to_string()];
        header.extend(cols.iter().map(PodKey::to_string));
        grid.push(header);
        for r in &rows {
            let mut line = vec![r.to_string()];
            for c in &cols {
                let mark = if r == c {
                    "-"
                } else if expect_allowed(&self.world, r, c, p.protocol, p.port, p.family) {
                    "."
                } else {
                    "X"
                };
                line.push(mark.to_string());
            }
            grid.push(line);
        }
        let width = grid
            .iter()
            .flat_map(|l| l.iter().map(String::len))
            .max()
            .unwrap_or(1)
            + 2;
        let mut doc = String::from("---\napiVersion: lab.sluice.dev/v1\nkind: Probe\nspec:\n");
        let _ = writeln!(doc, "  port: {}", p.port);
        let _ = writeln!(doc, "  protocol: {}", p.protocol);
        if let Some(f) = p.family {
            let _ = writeln!(doc, "  family: {f}");
        }
        let list = |keys: &[PodKey]| {
            keys.iter()
                .map(PodKey::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(from) = &p.from {
            let _ = writeln!(doc, "  from: [{}]", list(from));
        }
        if let Some(to) = &p.to {
            let _ = writeln!(doc, "  to: [{}]", list(to));
        }
        doc.push_str("  expect: |\n");
        for line in grid {
            let n = line.len();
            let mut text = String::from("    ");
            for (i, token) in line.into_iter().enumerate() {
                if i + 1 == n {
                    text.push_str(&token);
                } else {
                    let _ = write!(text, "{token:<width$}");
                }
            }
            doc.push_str(&text);
            doc.push('\n');
        }
        self.text.push_str(&doc);
    }
}

/// The expected mark of one cell: allowed by the reference evaluator for every probed family
/// (the probe's, or every family the target pod has). A family a pod lacks counts as denied,
/// as the runner does.
fn expect_allowed(
    world: &World,
    src: &PodKey,
    dst: &PodKey,
    protocol: Protocol,
    port: u16,
    family: Option<Family>,
) -> bool {
    let families: Vec<Family> = match family {
        Some(f) => vec![f],
        None => world
            .index
            .pods
            .get(dst)
            .map(|p| p.families())
            .unwrap_or_default(),
    };
    !families.is_empty()
        && families
            .into_iter()
            .all(|f| allowed(&world.index, src, dst, protocol, port, f).is_ok_and(|v| v.allowed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        assert_eq!(generate(7, Size::Small), generate(7, Size::Small));
        assert_ne!(generate(7, Size::Small), generate(8, Size::Small));
        assert!(generate(7, Size::Small).starts_with("# Differential scenario, seed 7 "));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("small".parse::<Size>(), Ok(Size::Small));
        assert_eq!("large".parse::<Size>(), Ok(Size::Large));
        assert!("huge".parse::<Size>().is_err());
    }
}
