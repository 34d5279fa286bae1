//! The agent's Prometheus metrics (OpenMetrics text on `/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

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
