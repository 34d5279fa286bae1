//! The agent's Prometheus metrics (OpenMetrics text on `/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;
/// `namespace`, `pod`, `direction`.
pub type PodLabels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// `result`: ok | error; `kind`: full | diff.
    pub syncs: Family<Labels, Counter>,
    /// `phase`: compile | apply.
    pub sync_duration: Family<Labels, Histogram>,
    /// Commands in each applied transaction (0 when nothing changed is not recorded).
    pub transaction_commands: Histogram,
    pub policies: Gauge,
    pub local_pods: Gauge,
    /// `resource`: pods | namespaces | networkpolicies.
    pub watch_restarts: Family<Labels, Counter>,
    /// `kind`: sets | set_elements | chains | rules, of the ruleset last compiled.
    pub ruleset_objects: Family<Labels, Gauge>,
    /// `direction`: ingress | egress: local pods that some policy isolates.
    pub isolated_pods: Family<Labels, Gauge>,
    /// From the first API change not yet in the kernel to the commit of the transaction that
    /// carries it: what a user waits for after `kubectl apply`.
    pub programming_latency: Histogram,
    /// `resource`: objects the watches could not convert and skipped (logged with their name).
    pub objects_skipped: Family<Labels, Counter>,
    /// NetworkPolicies in the index with at least one field we could not represent.
    pub policies_with_errors: Gauge,
    /// 1 when the last sync failed (the table is as last applied; the next sync retries whole).
    pub last_sync_failed: Gauge,
    /// Packets and bytes dropped per local pod and direction, from the kernel's per-pod drop
    /// counters (read every `--drop-counters-interval` and before each whole-table replace).
    pub dropped_packets: Family<PodLabels, Counter>,
    pub dropped_bytes: Family<PodLabels, Counter>,
    /// Frames dropped because a registered pod's veth sent them with a source address (or
    /// ARP sender) that is not the pod's (the `bridge sluice` table's `spoofed` counter).
    pub spoofed_packets: Counter,
    /// `op`: add | del | check | status | gc; `result`: ok | error.
    pub cni_requests: Family<Labels, Counter>,
    /// From a CNI ADD's arrival to its answer when the pod's rules are in the kernel: how long
    /// sluice holds a pod's start.
    pub cni_add_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let syncs = Family::<Labels, Counter>::default();
        registry.register(
            "syncs",
            "Syncs of the nftables table, by result",
            syncs.clone(),
        );
        let sync_duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~6.5 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 17))
        });
        registry.register(
            "sync_duration_seconds",
            "Time spent in one sync, by phase (compile, apply)",
            sync_duration.clone(),
        );
        let transaction_commands = Histogram::new(exponential_buckets(1.0, 4.0, 10));
        registry.register(
            "nft_transaction_commands",
            "nft commands in each applied transaction",
            transaction_commands.clone(),
        );
        let policies = Gauge::default();
        registry.register("policies", "NetworkPolicies in the index", policies.clone());
        let local_pods = Gauge::default();
        registry.register(
            "local_pods",
            "Pods on this node whose policy sluice enforces (not hostNetwork, not finished, with an IP)",
            local_pods.clone(),
        );
        let watch_restarts = Family::<Labels, Counter>::default();
        registry.register(
            "watch_restarts",
            "Watch errors after which the watch restarts (with backoff)",
            watch_restarts.clone(),
        );
        let ruleset_objects = Family::<Labels, Gauge>::default();
        registry.register(
            "ruleset_objects",
            "Objects in this node's compiled ruleset, by kind (sets, set_elements, chains, rules)",
            ruleset_objects.clone(),
        );
        let isolated_pods = Family::<Labels, Gauge>::default();
        registry.register(
            "isolated_pods",
            "Local pods isolated by some policy, by direction",
            isolated_pods.clone(),
        );
        let programming_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "programming_latency_seconds",
            "From an API change seen by the agent to the nftables transaction that applies it",
            programming_latency.clone(),
        );
        let objects_skipped = Family::<Labels, Counter>::default();
        registry.register(
            "objects_skipped",
            "Objects from the API that could not be converted and were skipped, by resource",
            objects_skipped.clone(),
        );
        let policies_with_errors = Gauge::default();
        registry.register(
            "policies_with_errors",
            "NetworkPolicies with a field sluice cannot represent (that part allows nothing)",
            policies_with_errors.clone(),
        );
        let last_sync_failed = Gauge::default();
        registry.register(
            "last_sync_failed",
            "1 when the last sync of the table failed (the agent is not ready until one succeeds)",
            last_sync_failed.clone(),
        );
        let dropped_packets = Family::<PodLabels, Counter>::default();
        registry.register(
            "dropped_packets",
            "Packets dropped by policy, per local pod and direction (new connections only)",
            dropped_packets.clone(),
        );
        let dropped_bytes = Family::<PodLabels, Counter>::default();
        registry.register(
            "dropped_bytes",
            "Bytes of the packets dropped by policy, per local pod and direction",
            dropped_bytes.clone(),
        );
        let spoofed_packets = Counter::default();
        registry.register(
            "spoofed_packets",
            "Frames from a pod's veth with a source that is not the pod's, dropped",
            spoofed_packets.clone(),
        );
        let cni_requests = Family::<Labels, Counter>::default();
        registry.register(
            "cni_requests",
            "Requests from the sluice-cni plugin, by op and result",
            cni_requests.clone(),
        );
        let cni_add_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "cni_add_seconds",
            "Time a CNI ADD waited for the pod's rules to be committed (successful ADDs)",
            cni_add_seconds.clone(),
        );
        Self {
            registry,
            syncs,
            sync_duration,
            transaction_commands,
            policies,
            local_pods,
            watch_restarts,
            ruleset_objects,
            isolated_pods,
            programming_latency,
            objects_skipped,
            policies_with_errors,
            last_sync_failed,
            dropped_packets,
            dropped_bytes,
            spoofed_packets,
            cni_requests,
            cni_add_seconds,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// An OpenMetrics text exposition (as [`Metrics::encode`] writes it) in the Prometheus text
/// format 0.0.4, for readers that know only that one (`promtool check metrics` up to at least
/// 2.42, scrapers that do not ask for OpenMetrics). The samples are the same; what differs is
/// that a counter family is named with its `_total` there (OpenMetrics: `# TYPE x counter` and
/// `x_total 1`; 0.0.4: `# TYPE x_total counter`), and 0.0.4 has no `# UNIT`, `# EOF` or
/// exemplars.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split(' ');
            let name = w.next()?;
            (w.next() == Some("counter")).then_some(name)
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_at(rest.find(' ').unwrap_or(rest.len()));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{total}{tail}"));
            }
            // An exemplar follows the value after " # ".
            None => out.push_str(line.split_once(" # ").map_or(line, |(sample, _)| sample)),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counter_families_with_total() {
        let m = Metrics::new();
        m.syncs
            .get_or_create(&vec![("result", "ok"), ("kind", "full")])
            .inc();
        m.policies.set(2);
        m.programming_latency.observe(0.01);
        let text = prometheus_text(&m.encode());
        assert!(text.contains("# HELP sluice_syncs_total Syncs of the nftables table"));
        assert!(text.contains("# TYPE sluice_syncs_total counter\n"));
        assert!(text.contains("sluice_syncs_total{result=\"ok\",kind=\"full\"} 1\n"));
        assert!(text.contains("# TYPE sluice_policies gauge\nsluice_policies 2\n"));
        assert!(text.contains("# TYPE sluice_programming_latency_seconds histogram\n"));
        assert!(text.contains("sluice_programming_latency_seconds_count 1\n"));
        assert!(!text.contains("# EOF"));
        assert_eq!(
            prometheus_text("# TYPE x counter\n# UNIT x seconds\nx_total 1 # {a=\"b\"} 1\n# EOF\n"),
            "# TYPE x_total counter\nx_total 1\n"
        );
    }
}
