//! Pure parts of the dataplane benchmark (`e2e/bench dataplane`, binary `sluice-dataplane-bench`,
//! `src/dataplane_bench_main.rs`): the measured pods and the policies that select them, the
//! summary (medians over rounds, ratios to the no-engine baseline) and its table. Everything with
//! I/O (clusters, agents, sockets) is in the binary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

/// The namespace of the measured pods.
pub const NAMESPACE: &str = "dpbench";
/// The client pod (node-1).
pub const CLIENT: &str = "client";
/// The server on the client's node and the one on the other node.
pub const SERVER_SAME: &str = "server-same";
pub const SERVER_CROSS: &str = "server-cross";
/// The short-connection port: sluice-kubelet's own server for the declared container port
/// (accept, write `<namespace>/<name>\n`, close), reached through the named port `serve`.
pub const SERVE_PORT: u16 = 8080;
pub const SERVE_PORT_NAME: &str = "serve";
/// The benchmark's own servers in the server pods (not declared: sluice-kubelet would serve
/// them itself): 1-byte echo for request/response, and a sink for the stream.
pub const RR_PORT: u16 = 9001;
pub const STREAM_PORT: u16 = 9002;

/// The Namespace, its `default` ServiceAccount (no controller-manager makes it) and the three
/// measured pods: the client and the same-node server on `node_a`, the other server on `node_b`.
pub fn measured_objects(node_a: &str, node_b: &str) -> Vec<Value> {
    let pod = |name: &str, node: &str, role: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": NAMESPACE, "name": name,
                         "labels": {"app": "dpbench", "role": role}},
            "spec": {
                "nodeName": node,
                "containers": [{
                    "name": "main", "image": crate::cluster_run::PAUSE_IMAGE,
                    "ports": [{"name": SERVE_PORT_NAME, "containerPort": SERVE_PORT,
                               "protocol": "TCP"}],
                }],
            },
        })
    };
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NAMESPACE, "labels": {"bench": "dataplane"}}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"namespace": NAMESPACE, "name": "default"}}),
        pod(CLIENT, node_a, "client"),
        pod(SERVER_SAME, node_a, "server"),
        pod(SERVER_CROSS, node_b, "server"),
    ]
}

/// The policies of configuration (c) in the measured namespace: every measured pod is isolated
/// for ingress and egress and selected by several policies (pod selectors, namespace selectors,
/// named and numbered ports, ipBlocks with excepts), which together allow the benchmark traffic.
/// `pod_cidr` is the cluster's pod CIDR (e.g. 10.244.0.0/16).
pub fn measured_policies(pod_cidr: &str) -> Vec<Value> {
    let ports = json!([
        {"protocol": "TCP", "port": SERVE_PORT_NAME},
        {"protocol": "TCP", "port": RR_PORT, "endPort": STREAM_PORT},
    ]);
    let policy = |name: &str, spec: Value| {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"namespace": NAMESPACE, "name": name}, "spec": spec})
    };
    vec![
        policy(
            "servers-from-client",
            json!({"podSelector": {"matchLabels": {"role": "server"}},
                   "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                "ports": ports}]}),
        ),
        policy(
            "servers-from-pod-cidr",
            json!({"podSelector": {"matchExpressions": [
                       {"key": "role", "operator": "In", "values": ["server", "cache"]}]},
                   "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"ipBlock": {"cidr": pod_cidr,
                                                      "except": ["10.244.250.0/24",
                                                                 "10.244.251.0/24"]}}],
                                "ports": ports}]}),
        ),
        policy(
            "all-from-namespace",
            json!({"podSelector": {},
                   "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels":
                                             {"kubernetes.io/metadata.name": NAMESPACE}}}],
                                "ports": [{"protocol": "TCP", "port": SERVE_PORT_NAME},
                                          {"protocol": "TCP", "port": RR_PORT},
                                          {"protocol": "TCP", "port": STREAM_PORT},
                                          {"protocol": "UDP", "port": 53}]}]}),
        ),
        policy(
            "client-to-servers",
            json!({"podSelector": {"matchLabels": {"role": "client"}},
                   "policyTypes": ["Egress"],
                   "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "server"}}}],
                               "ports": ports}]}),
        ),
        policy(
            "client-to-pod-cidr",
            json!({"podSelector": {"matchLabels": {"app": "dpbench"}},
                   "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": pod_cidr,
                                                    "except": ["10.244.252.0/24"]}}],
                               "ports": ports},
                              {"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                                    "except": ["10.0.0.0/8", "192.168.0.0/16"]}}],
                               "ports": [{"protocol": "TCP", "port": 443}]}]}),
        ),
    ]
}

/// The median of a sample (the mean of the two middle values for an even count); `None` when
/// empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// What one measurement gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Metric {
    /// New TCP connections per second (connect, one small response, close), several clients.
    ConnPerSec,
    /// Request/response round trip on an open connection, 1 byte each way: median, in µs.
    RrP50Us,
    /// The same, 99th percentile, in µs.
    RrP99Us,
    /// One stream, Gbit/s.
    StreamGbps,
}

impl Metric {
    pub const ALL: [Metric; 4] = [
        Metric::ConnPerSec,
        Metric::RrP50Us,
        Metric::RrP99Us,
        Metric::StreamGbps,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::ConnPerSec => "new connections/s",
            Metric::RrP50Us => "RR latency p50 (µs)",
            Metric::RrP99Us => "RR latency p99 (µs)",
            Metric::StreamGbps => "one stream (Gbit/s)",
        }
    }

    /// Higher is better (rates), or lower is better (latencies).
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::ConnPerSec | Metric::StreamGbps)
    }

    /// The configuration's performance relative to the baseline, as a fraction where 1.0 is
    /// "as good as the baseline" and 0.95 is "5% worse" for every metric: value/base for
    /// rates, base/value for latencies.
    pub fn relative(self, value: f64, base: f64) -> Option<f64> {
        let r = if self.higher_is_better() {
            value / base
        } else {
            base / value
        };
        r.is_finite().then_some(r)
    }
}

/// One measured value.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// The sweep point: background policies in the loaded cluster.
    pub policies: usize,
    pub round: usize,
    /// `a`, `b`, `c`, `kube-router`, ...
    pub config: String,
    /// `same-node` or `cross-node`.
    pub pair: String,
    pub metric: Metric,
    pub value: f64,
}

/// Medians over rounds: (policies, pair, metric, config) -> (median, number of rounds).
pub type Summary = BTreeMap<(usize, String, Metric, String), (f64, usize)>;

pub fn summarize(samples: &[Sample]) -> Summary {
    let mut groups: BTreeMap<(usize, String, Metric, String), Vec<f64>> = BTreeMap::new();
    for s in samples {
        groups
            .entry((s.policies, s.pair.clone(), s.metric, s.config.clone()))
            .or_default()
            .push(s.value);
    }
    groups
        .into_iter()
        .filter_map(|(k, v)| median(&v).map(|m| (k, (m, v.len()))))
        .collect()
}

fn fmt_value(metric: Metric, v: f64) -> String {
    match metric {
        Metric::ConnPerSec => format!("{v:.0}"),
        Metric::RrP50Us | Metric::RrP99Us => format!("{v:.1}"),
        Metric::StreamGbps => format!("{v:.2}"),
    }
}

/// Whether `iptables-save` output holds, in its `filter` table, only what kube-router's policy
/// controller leaves behind after `kube-router --cleanup-config` (v2.1.0 removes the jumps from
/// the base chains but not its `KUBE-*` chains): base chains and `KUBE-*` chains, and base-chain
/// rules that only jump to `KUBE-*` chains. Such a table can be deleted whole. Also true when
/// there is no `filter` table.
pub fn filter_table_is_kube_routers_only(iptables_save: &str) -> bool {
    let mut in_filter = false;
    for line in iptables_save.lines() {
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table == "filter";
            continue;
        }
        if !in_filter || line == "COMMIT" || line.starts_with('#') {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("");
            if !matches!(chain, "INPUT" | "FORWARD" | "OUTPUT") && !chain.starts_with("KUBE-") {
                return false;
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let jumps_to_kube = rule
                .split_once(" -j ")
                .is_some_and(|(_, target)| target.starts_with("KUBE-"));
            if !chain.starts_with("KUBE-") && !jumps_to_kube {
                return false;
            }
        }
    }
    true
}

/// The configurations, in the default order of a round.
///
/// - `a`: no engine on the plain cluster;
/// - `b`: sluice with no policy on the plain cluster;
/// - `a-loaded`: no engine on the loaded cluster (sluice's agents stopped, its tables deleted,
///   kube-router stopped and cleaned up);
/// - `c`: sluice on the loaded cluster (background + the measured pods' policies);
/// - `kube-router`: kube-router's policy controller on the loaded cluster, same policies.
pub const CONFIGS: [&str; 5] = ["a", "b", "a-loaded", "c", "kube-router"];

/// Whether `config` runs on the loaded cluster (otherwise on the plain one).
pub fn on_loaded_cluster(config: &str) -> bool {
    !matches!(config, "a" | "b")
}

/// The configuration `config` is compared with: the no-engine run on the same cluster in the
/// same round, so that a ratio never mixes two clusters. `a-loaded` is compared with `a`: that
/// ratio is how much the two clusters differ without any engine. `a` has none.
pub fn baseline_of(config: &str) -> Option<&'static str> {
    match config {
        "a" => None,
        "b" | "a-loaded" => Some("a"),
        _ => Some("a-loaded"),
    }
}

/// The per-round relative performance of `config` to `base` (see [`Metric::relative`]), over the
/// rounds where both were measured at this sweep point: both ran in the same round, a few
/// seconds apart, so the ratio is free of the slower drift between rounds.
pub fn paired_ratios(
    samples: &[Sample],
    policies: usize,
    pair: &str,
    metric: Metric,
    config: &str,
    base: &str,
) -> Vec<f64> {
    let of = |c: &str| -> BTreeMap<usize, f64> {
        samples
            .iter()
            .filter(|s| {
                s.policies == policies && s.pair == pair && s.metric == metric && s.config == c
            })
            .map(|s| (s.round, s.value))
            .collect()
    };
    let bases = of(base);
    of(config)
        .into_iter()
        .filter_map(|(round, v)| metric.relative(v, *bases.get(&round)?))
        .collect()
}

/// One ratio cell: the ratio of the medians, and the range of the per-round paired ratios when
/// there are two rounds or more.
fn ratio_cell(
    summary: &Summary,
    samples: &[Sample],
    key: (usize, &str, Metric),
    c: &str,
) -> String {
    let (n, pair, metric) = key;
    let Some(base) = baseline_of(c) else {
        return " – |".into();
    };
    let get = |c: &str| summary.get(&(n, pair.to_string(), metric, c.to_string()));
    let rel = match (get(c), get(base)) {
        (Some((v, _)), Some((b, _))) => metric.relative(*v, *b),
        _ => None,
    };
    let per_round = paired_ratios(samples, n, pair, metric, c, base);
    let lo = per_round.iter().copied().reduce(f64::min);
    let hi = per_round.iter().copied().reduce(f64::max);
    match (rel, lo, hi) {
        (Some(r), Some(lo), Some(hi)) if per_round.len() >= 2 => {
            format!(" {r:.3} ({lo:.2}–{hi:.2}) |")
        }
        (Some(r), ..) => format!(" {r:.3} |"),
        _ => " – |".into(),
    }
}

/// A Markdown table for one sweep point: per pair and metric, each configuration's median, then
/// each configuration's relative performance to its [`baseline_of`] (1.000 = as good; see
/// [`Metric::relative`]) as the ratio of the medians with the range of the per-round paired
/// ratios in parentheses.
pub fn table(summary: &Summary, samples: &[Sample], policies: usize, configs: &[String]) -> String {
    let compared: Vec<&String> = configs
        .iter()
        .filter(|c| baseline_of(c).is_some_and(|b| configs.iter().any(|x| x == b)))
        .collect();
    let mut out = String::new();
    let _ = write!(out, "| pair | metric |");
    for c in configs {
        let _ = write!(out, " ({c}) |");
    }
    for c in &compared {
        let _ = write!(out, " ({c}) vs ({}) |", baseline_of(c).unwrap_or("-"));
    }
    out.push('\n');
    let _ = write!(out, "|---|---|");
    for _ in 0..(configs.len() + compared.len()) {
        out.push_str("---:|");
    }
    out.push('\n');
    for pair in ["same-node", "cross-node"] {
        for metric in Metric::ALL {
            let get = |c: &str| summary.get(&(policies, pair.to_string(), metric, c.to_string()));
            let _ = write!(out, "| {pair} | {} |", metric.label());
            for c in configs {
                match get(c) {
                    Some((v, _)) => {
                        let _ = write!(out, " {} |", fmt_value(metric, *v));
                    }
                    None => out.push_str(" – |"),
                }
            }
            for c in &compared {
                out.push_str(&ratio_cell(summary, samples, (policies, pair, metric), c));
            }
            out.push('\n');
        }
    }
    out
}

/// A Markdown table over the sweep: per pair and metric, each of `configs`' relative performance
/// to its [`baseline_of`] (see [`Metric::relative`]) at every policy count.
pub fn sweep_table(summary: &Summary, points: &[usize], configs: &[&str]) -> String {
    let mut out = String::from("| pair | metric |");
    for c in configs {
        for n in points {
            let _ = write!(out, " ({c}) vs ({}), {n} |", baseline_of(c).unwrap_or("-"));
        }
    }
    out.push_str("\n|---|---|");
    for _ in 0..configs.len() * points.len() {
        out.push_str("---:|");
    }
    out.push('\n');
    for pair in ["same-node", "cross-node"] {
        for metric in Metric::ALL {
            let _ = write!(out, "| {pair} | {} |", metric.label());
            for c in configs {
                for &n in points {
                    let get = |c: &str| {
                        summary
                            .get(&(n, pair.to_string(), metric, c.to_string()))
                            .map(|(v, _)| *v)
                    };
                    match baseline_of(c)
                        .and_then(|b| get(c).zip(get(b)))
                        .and_then(|(v, base)| metric.relative(v, base))
                    {
                        Some(r) => {
                            let _ = write!(out, " {r:.3} |");
                        }
                        None => out.push_str(" – |"),
                    }
                }
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn relative_is_one_for_equal_and_below_one_when_worse() {
        assert_eq!(Metric::ConnPerSec.relative(900.0, 1000.0), Some(0.9));
        assert_eq!(Metric::RrP50Us.relative(50.0, 40.0), Some(0.8));
        assert_eq!(Metric::StreamGbps.relative(1.0, 0.0), None);
    }

    #[test]
    fn summary_takes_medians_per_group_and_table_shows_ratios() {
        let s = |config: &str, round, value| Sample {
            policies: 1000,
            round,
            config: config.into(),
            pair: "same-node".into(),
            metric: Metric::ConnPerSec,
            value,
        };
        let samples = vec![
            s("a", 1, 1000.0),
            s("a", 2, 1200.0),
            s("a", 3, 1100.0),
            s("c", 1, 990.0),
            s("c", 2, 1045.0),
            s("c", 3, 500.0),
        ];
        let sum = summarize(&samples);
        let key = |c: &str| {
            (
                1000,
                "same-node".to_string(),
                Metric::ConnPerSec,
                c.to_string(),
            )
        };
        assert_eq!(sum[&key("a")], (1100.0, 3));
        assert_eq!(sum[&key("c")], (990.0, 3));
        let t = table(&sum, &samples, 1000, &["a".into(), "b".into()]);
        assert!(
            t.contains("| same-node | new connections/s | 1100 | – | – |"),
            "{t}"
        );
        let samples: Vec<Sample> = samples
            .into_iter()
            .map(|mut x| {
                if x.config == "c" {
                    x.config = "b".into();
                }
                x
            })
            .collect();
        let sum = summarize(&samples);
        let t = table(&sum, &samples, 1000, &["a".into(), "b".into()]);
        // Ratio of the medians 990/1100; per round 0.990, 0.871, 0.455.
        assert!(
            t.contains("| same-node | new connections/s | 1100 | 990 | 0.900 (0.45–0.99) |"),
            "{t}"
        );
        assert!(
            t.contains("| cross-node | new connections/s | – | – | – |"),
            "{t}"
        );
    }

    #[test]
    fn only_kube_routers_leftovers_make_the_filter_table_deletable() {
        let left = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [1:2]\n:FORWARD ACCEPT [0:0]\n\
                    :OUTPUT ACCEPT [3:4]\n:KUBE-NWPLCY-23W6 - [0:0]\n:KUBE-POD-FW-AB - [0:0]\n\
                    -A KUBE-POD-FW-AB -j KUBE-NWPLCY-23W6\n-A FORWARD -m comment -j KUBE-ROUTER-FORWARD\n\
                    COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j DNAT\nCOMMIT\n";
        assert!(filter_table_is_kube_routers_only(left));
        assert!(filter_table_is_kube_routers_only(""));
        assert!(!filter_table_is_kube_routers_only(
            "*filter\n:INPUT ACCEPT [0:0]\n:OTHER - [0:0]\nCOMMIT\n"
        ));
        assert!(!filter_table_is_kube_routers_only(
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -j DROP\nCOMMIT\n"
        ));
    }

    #[test]
    fn every_configuration_is_compared_with_no_engine_on_its_own_cluster() {
        for c in CONFIGS {
            if let Some(b) = baseline_of(c) {
                assert!(CONFIGS.contains(&b), "{c}: {b}");
                // Same cluster, except the cluster-to-cluster ratio itself.
                if c != "a-loaded" {
                    assert_eq!(on_loaded_cluster(c), on_loaded_cluster(b), "{c} vs {b}");
                }
            }
        }
        assert_eq!(baseline_of("a"), None);
        assert_eq!(baseline_of("b"), Some("a"));
        assert_eq!(baseline_of("a-loaded"), Some("a"));
        assert_eq!(baseline_of("c"), Some("a-loaded"));
        assert_eq!(baseline_of("kube-router"), Some("a-loaded"));
        assert!(!on_loaded_cluster("a") && !on_loaded_cluster("b"));
        assert!(on_loaded_cluster("a-loaded") && on_loaded_cluster("c"));
    }

    #[test]
    fn ratios_pair_rounds_and_tables_use_each_configurations_own_baseline() {
        let s = |config: &str, round, value| Sample {
            policies: 10,
            round,
            config: config.into(),
            pair: "cross-node".into(),
            metric: Metric::RrP50Us,
            value,
        };
        let samples = vec![
            s("a", 1, 10.0),
            s("a", 2, 10.0),
            s("a-loaded", 1, 12.0),
            s("a-loaded", 2, 16.0),
            s("c", 1, 12.0),
            s("c", 2, 20.0),
            s("c", 3, 99.0), // no baseline in round 3: not paired
        ];
        assert_eq!(
            paired_ratios(&samples, 10, "cross-node", Metric::RrP50Us, "c", "a-loaded"),
            vec![1.0, 0.8]
        );
        let sum = summarize(&samples);
        let configs: Vec<String> = ["a", "a-loaded", "c"].map(String::from).to_vec();
        let t = table(&sum, &samples, 10, &configs);
        assert!(
            t.starts_with("| pair | metric | (a) | (a-loaded) | (c) | (a-loaded) vs (a) | (c) vs (a-loaded) |\n"),
            "{t}"
        );
        // (a-loaded)/(a): 10/14; (c)/(a-loaded): medians 14 vs 20 -> 0.700, per round 1.00, 0.80.
        assert!(
            t.contains("| cross-node | RR latency p50 (µs) | 10.0 | 14.0 | 20.0 | 0.714 (0.62–0.83) | 0.700 (0.80–1.00) |"),
            "{t}"
        );
        let sw = sweep_table(&sum, &[10], &["c"]);
        assert!(
            sw.contains("| cross-node | RR latency p50 (µs) | 0.700 |"),
            "{sw}"
        );
    }

    #[test]
    fn every_measured_pod_is_selected_by_several_policies_with_named_ports_and_ip_blocks() {
        let objects = measured_objects("node-1", "node-2");
        let policies = measured_policies("10.244.0.0/16");
        let text = serde_json::to_string(&policies).unwrap();
        assert!(text.contains(&format!("\"port\":\"{SERVE_PORT_NAME}\"")));
        assert!(text.contains("ipBlock"));
        for pod in objects.iter().filter(|o| o["kind"] == "Pod") {
            let labels = &pod["metadata"]["labels"];
            let selecting = policies
                .iter()
                .filter(|p| {
                    let sel = &p["spec"]["podSelector"];
                    let by_labels = sel["matchLabels"]
                        .as_object()
                        .is_none_or(|m| m.iter().all(|(k, v)| &labels[k] == v));
                    let by_expr = sel["matchExpressions"].as_array().is_none_or(|es| {
                        es.iter().all(|e| {
                            e["values"]
                                .as_array()
                                .is_some_and(|vs| vs.contains(&labels[e["key"].as_str().unwrap()]))
                        })
                    });
                    by_labels && by_expr
                })
                .count();
            assert!(
                selecting >= 2,
                "{}: {selecting} policies",
                pod["metadata"]["name"]
            );
        }
    }
}
