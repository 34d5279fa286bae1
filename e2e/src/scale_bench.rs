//! `sluice-bench scale` (`e2e/bench scale`): how the control plane's costs grow with the cluster
//! (docs/performance.md, "Control plane at scale").
//!
//! For every point of a grid of cluster sizes (pods × policies), with several runs each (medians):
//! - full compile of the measured node: `compile_node` from scratch, and the agent's incremental
//!   `Compiler` compiling from nothing (what the agent does at start);
//! - cold apply: a fresh `TableState` loading the whole table (`nft -f`) into a network
//!   namespace made for the point, with no table in it;
//! - one-pod change → applied and one-policy change → applied, the agent's way: the incremental
//!   compile after the change, then `TableState::sync` (the diff through the `nft -i` session,
//!   committed in the kernel);
//! - the agent's peak RSS, from the agent bench (`sluice-agent-bench`: the real `sluice agent`
//!   against a real API server holding the same synthetic cluster), for the sizes asked for.
//!
//! It prints a table, and writes a CSV and a PNG plot (plotters, bitmap backend).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use sluice::compile::{compile_node, Ruleset};
use sluice::incremental::Compiler;
use sluice::model::{policy_info, Changes, Index, PodKey};
use sluice::nft::{remove_table_script, Nft, TableState};
use sluice_e2e::netns::{in_netns, install_signal_cleanup, LabNet};
use sluice_e2e::synth::{SynthCluster, SynthConfig};

use super::{
    has_sluice_table, isolated_local_pods, kernel_unavailable, nft_version, pod_relabelled, stat,
    tables_in, verify_session_netns, Stat,
};

/// The control plane at scale: compile, cold apply, one-pod and one-policy change → applied, and
/// the agent's peak RSS, over a grid of cluster sizes; a table, a CSV and a PNG plot.
///
/// Needs root (nft runs in a network namespace made for each point; the agent bench starts a
/// control plane and the agent in a namespace of its own).
#[derive(Parser)]
#[command(name = "e2e/bench scale")]
struct Args {
    /// Pod counts of the grid.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    pods: Vec<usize>,
    /// Policy counts of the grid.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    policies: Vec<usize>,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Scale the nodes with the pods: nodes = pods / N at every point (overrides --nodes), so
    /// the measured node keeps about N local pods and only the cluster around it grows.
    #[arg(long, value_name = "N")]
    pods_per_node: Option<usize>,
    #[arg(long, default_value_t = 300)]
    namespaces: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs of each full compile and cold apply (medians); each change runs 4 times as often.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Pod counts at which the agent's peak RSS is measured (the agent bench, per policy count;
    /// empty: none).
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    agent_pods: Vec<usize>,
    /// Policy counts at which the agent's peak RSS is measured (default: every --policies).
    #[arg(long, value_delimiter = ',')]
    agent_policies: Option<Vec<usize>>,
    /// Trials per kind of change in the agent bench (its RSS is read after them).
    #[arg(long, default_value_t = 10)]
    agent_trials: usize,
    /// Skip the agent bench.
    #[arg(long)]
    no_agent: bool,
    /// The agent bench binary (default: sluice-agent-bench next to this binary).
    #[arg(long)]
    agent_bench: Option<PathBuf>,
    /// The agent binary (default: sluice next to this binary).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Where the CSV and the PNG go (`<out>.csv`, `<out>.png`).
    #[arg(long, default_value = "docs/scale")]
    out: PathBuf,
    /// A TTF font for the plot's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// Redraw the plot (and table) from a CSV written earlier, measuring nothing.
    #[arg(long, value_name = "CSV")]
    replot: Option<PathBuf>,
    /// With --replot: fill the agent columns from these agent bench reports
    /// (`sluice-agent-bench --json` output), e.g. from a run made separately.
    #[arg(long, value_name = "JSON", requires = "replot")]
    agent_report: Vec<PathBuf>,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("sluice-bench scale: {}", msg.as_ref());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A column of the report: a value of a point.
type PointValue = dyn Fn(&Point) -> f64;

/// One grid point, medians in ms.
#[derive(Clone, Debug, Default, Serialize)]
struct Point {
    pods: usize,
    policies: usize,
    nodes: usize,
    node: String,
    local_pods: usize,
    set_elements: usize,
    rules: usize,
    runs: usize,
    change_runs: usize,
    /// `compile_node` from scratch.
    compile_node: f64,
    /// The incremental `Compiler`'s first compilation (all sets built), as at agent start.
    first_compile: f64,
    /// A fresh `TableState` loading the whole table (`nft -f`, no table before).
    cold_apply: f64,
    /// first_compile + cold_apply: the agent's cold start after its lists.
    cold_start: f64,
    /// Pod relabel → committed: incremental compile + `TableState::sync`.
    pod_change: f64,
    pod_change_compile: f64,
    pod_change_apply: f64,
    pod_change_max: f64,
    /// A policy selecting a local pod created → committed.
    policy_change: f64,
    policy_change_compile: f64,
    policy_change_apply: f64,
    policy_change_max: f64,
    /// Its deletion → committed.
    policy_delete: f64,
    /// Load average (1 min) at the point's start and end.
    load_start: f64,
    load_end: f64,
    /// From the agent bench (NaN: not measured): peak RSS after its trials, MiB; start → ready, s;
    /// pod relabel request → committed in the kernel, p50 ms.
    agent_rss_mib: f64,
    agent_ready_s: f64,
    agent_relabel_p50: f64,
}

const CSV_COLUMNS: &[&str] = &[
    "pods",
    "policies",
    "nodes",
    "node",
    "local_pods",
    "set_elements",
    "rules",
    "runs",
    "change_runs",
    "compile_node_ms",
    "first_compile_ms",
    "cold_apply_ms",
    "cold_start_ms",
    "pod_change_ms",
    "pod_change_compile_ms",
    "pod_change_apply_ms",
    "pod_change_max_ms",
    "policy_change_ms",
    "policy_change_compile_ms",
    "policy_change_apply_ms",
    "policy_change_max_ms",
    "policy_delete_ms",
    "load_start",
    "load_end",
    "agent_peak_rss_mib",
    "agent_ready_s",
    "agent_relabel_p50_ms",
];

impl Point {
    fn csv_row(&self) -> String {
        let f = |x: f64| {
            if x.is_nan() {
                String::new()
            } else {
                format!("{x:.3}")
            }
        };
        let mut cells = vec![
            self.pods.to_string(),
            self.policies.to_string(),
            self.nodes.to_string(),
            self.node.clone(),
            self.local_pods.to_string(),
            self.set_elements.to_string(),
            self.rules.to_string(),
            self.runs.to_string(),
            self.change_runs.to_string(),
        ];
        cells.extend(
            [
                self.compile_node,
                self.first_compile,
                self.cold_apply,
                self.cold_start,
                self.pod_change,
                self.pod_change_compile,
                self.pod_change_apply,
                self.pod_change_max,
                self.policy_change,
                self.policy_change_compile,
                self.policy_change_apply,
                self.policy_change_max,
                self.policy_delete,
                self.load_start,
                self.load_end,
                self.agent_rss_mib,
                self.agent_ready_s,
                self.agent_relabel_p50,
            ]
            .map(f),
        );
        cells.join(",")
    }

    fn from_csv(header: &[&str], line: &str) -> Result<Point> {
        let cells: Vec<&str> = line.split(',').collect();
        let get = |name: &str| -> Result<&str> {
            let i = header
                .iter()
                .position(|h| *h == name)
                .with_context(|| format!("no column {name}"))?;
            cells
                .get(i)
                .copied()
                .with_context(|| format!("short row: {line}"))
        };
        let num = |name: &str| -> Result<f64> {
            let v = get(name)?;
            if v.is_empty() {
                return Ok(f64::NAN);
            }
            v.parse().with_context(|| format!("{name}: {v:?}"))
        };
        let int =
            |name: &str| -> Result<usize> { get(name)?.parse().with_context(|| name.to_string()) };
        Ok(Point {
            pods: int("pods")?,
            policies: int("policies")?,
            // Not in CSVs written before --pods-per-node.
            nodes: int("nodes").unwrap_or(0),
            node: get("node")?.to_string(),
            local_pods: int("local_pods")?,
            set_elements: int("set_elements")?,
            rules: int("rules")?,
            runs: int("runs")?,
            change_runs: int("change_runs")?,
            compile_node: num("compile_node_ms")?,
            first_compile: num("first_compile_ms")?,
            cold_apply: num("cold_apply_ms")?,
            cold_start: num("cold_start_ms")?,
            pod_change: num("pod_change_ms")?,
            pod_change_compile: num("pod_change_compile_ms")?,
            pod_change_apply: num("pod_change_apply_ms")?,
            pod_change_max: num("pod_change_max_ms")?,
            policy_change: num("policy_change_ms")?,
            policy_change_compile: num("policy_change_compile_ms")?,
            policy_change_apply: num("policy_change_apply_ms")?,
            policy_change_max: num("policy_change_max_ms")?,
            policy_delete: num("policy_delete_ms")?,
            load_start: num("load_start")?,
            load_end: num("load_end")?,
            agent_rss_mib: num("agent_peak_rss_mib")?,
            agent_ready_s: num("agent_ready_s")?,
            agent_relabel_p50: num("agent_relabel_p50_ms")?,
        })
    }
}

/// The node measured at a grid point: the one with the most local pods (ties: the first by
/// name). Cheaper than compiling every node (e2e/bench's choice), which at 100k pods and 5k
/// policies would take minutes per point.
fn busiest_node(index: &Index, cluster: &SynthCluster) -> Result<String> {
    let mut best: Option<(usize, &str)> = None;
    for n in &cluster.nodes {
        let count = index.local_pods(&n.name).count();
        if best.is_none_or(|(c, _)| count > c) {
            best = Some((count, &n.name));
        }
    }
    best.map(|(_, n)| n.to_string()).context("no nodes")
}

/// The one-policy change: a new policy in a local isolated pod's namespace that selects it by
/// `tier` and `version` and lets in the pods of its `app` on TCP 8080 (the kind of policy the
/// agent bench creates).
fn policy_added(index: &Index, node: &str) -> Result<(Index, sluice::model::PolicyKey)> {
    let pod = isolated_local_pods(index, node)
        .into_iter()
        .find(|p| {
            ["app", "tier", "version"]
                .iter()
                .all(|l| p.labels.contains_key(*l))
        })
        .with_context(|| format!("no isolated pod on {node} with app, tier and version labels"))?;
    let np: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": pod.key.namespace, "name": "sluice-scale-bench"},
        "spec": {
            "podSelector": {"matchLabels": {"tier": pod.labels["tier"], "version": pod.labels["version"]}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": pod.labels["app"]}}}],
                "ports": [{"protocol": "TCP", "port": 8080}],
            }],
        },
    }))
    .context("the bench policy")?;
    let info = policy_info(&np).map_err(|e| anyhow!("the bench policy: {e}"))?;
    let key = info.key.clone();
    let mut after = index.clone();
    if !after.apply_policy(info) {
        bail!("the bench policy was already there");
    }
    Ok((after, key))
}

/// Times of a change applied the agent's way: (total, compile, apply) per run.
#[derive(Default)]
struct ChangeTimes {
    total: Vec<Duration>,
    compile: Vec<Duration>,
    apply: Vec<Duration>,
}

/// What the kernel part of a point needs.
struct KernelWork<'a> {
    node: &'a str,
    base: &'a Ruleset,
    index: &'a Index,
    /// (index after, what changed for the incremental compiler)
    pod: (&'a Index, &'a Changes),
    policy: &'a Index,
    runs: usize,
    change_runs: usize,
}

struct KernelTimes {
    cold_apply: Vec<Duration>,
    pod: ChangeTimes,
    policy: ChangeTimes,
    policy_delete: Vec<Duration>,
}

fn sync(state: &mut TableState, rs: &Ruleset, full: bool) -> Result<()> {
    let applied = state
        .sync(rs)
        .map_err(|e| anyhow!("TableState::sync: {e}"))?;
    if applied.full != full || applied.commands == 0 {
        bail!(
            "TableState::sync applied {} ({} commands) where the bench expected {}",
            if applied.full {
                "a full load"
            } else {
                "a diff"
            },
            applied.commands,
            if full { "a full load" } else { "a diff" }
        );
    }
    Ok(())
}

/// Runs inside the point's network namespace (on a thread that entered it).
fn kernel_in_netns(w: &KernelWork<'_>, host_netns: &std::fs::File) -> Result<KernelTimes> {
    let nft = Nft::default();
    let listing = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .context("nft list ruleset")?;
    if !listing.status.success() || !listing.stdout.iter().all(u8::is_ascii_whitespace) {
        bail!("the benchmark's network namespace is not empty (or nft failed); not touching it");
    }
    let clear = remove_table_script();

    // Cold apply: a fresh TableState's first sync, the whole table through `nft -f`.
    progress(format!(
        "  cold apply: fresh TableState, full load ({} runs)",
        w.runs
    ));
    let mut cold_apply = Vec::with_capacity(w.runs);
    let mut state = None;
    for _ in 0..w.runs {
        nft.apply(&clear).map_err(|e| anyhow!("{e}"))?;
        let mut fresh = TableState::new(Nft::default());
        let t = Instant::now();
        sync(&mut fresh, w.base, true)?;
        cold_apply.push(t.elapsed());
        state = Some(fresh);
    }
    let mut state = state.context("no runs")?;

    // The agent's way from here: its compiler keeps the sets of the base compilation.
    let mut compiler = Compiler::new();
    let everything = Changes {
        everything: true,
        ..Changes::default()
    };
    let kept_base = compiler.compile(w.index, w.node, &everything).ruleset;
    if &kept_base != w.base {
        bail!("the incremental compiler's first compilation differs from compile_node");
    }
    let no_pods = Changes::default();
    let (pod_after, pod_changes) = w.pod;

    // One change applied and taken back; the first round (which also starts `nft -i`) is
    // untimed, and checked against compile_node.
    let mut round = |after: &Index,
                     changes: &Changes,
                     times: Option<&mut ChangeTimes>,
                     back: Option<&mut Vec<Duration>>|
     -> Result<()> {
        let t = Instant::now();
        let rs = compiler.compile(after, w.node, changes).ruleset;
        let compiled = t.elapsed();
        sync(&mut state, &rs, false)?;
        let total = t.elapsed();
        match times {
            Some(times) => {
                times.total.push(total);
                times.compile.push(compiled);
                times.apply.push(total - compiled);
            }
            None => {
                if rs != compile_node(after, w.node).ruleset {
                    bail!("the incremental compiler disagrees with compile_node after the change");
                }
            }
        }
        let t = Instant::now();
        let rs = compiler.compile(w.index, w.node, changes).ruleset;
        sync(&mut state, &rs, false)?;
        if let Some(back) = back {
            back.push(t.elapsed());
        }
        Ok(())
    };
    round(pod_after, pod_changes, None, None)?;
    verify_session_netns(host_netns)?;
    round(w.policy, &no_pods, None, None)?;
    progress(format!(
        "  one-pod and one-policy change -> applied ({} runs each)",
        w.change_runs
    ));
    let (mut pod, mut policy, mut policy_delete) =
        (ChangeTimes::default(), ChangeTimes::default(), Vec::new());
    for _ in 0..w.change_runs {
        round(pod_after, pod_changes, Some(&mut pod), None)?;
        round(
            w.policy,
            &no_pods,
            Some(&mut policy),
            Some(&mut policy_delete),
        )?;
    }
    verify_session_netns(host_netns)?;
    drop(state);
    nft.apply(&clear).map_err(|e| anyhow!("{e}"))?;
    Ok(KernelTimes {
        cold_apply,
        pod,
        policy,
        policy_delete,
    })
}

fn median(samples: &[Duration]) -> f64 {
    stat(samples).median_ms
}

fn measure_point(
    pods: usize,
    policies: usize,
    args: &Args,
    host_netns: &std::fs::File,
) -> Result<Point> {
    let load_start = load1();
    let (runs, change_runs) = (args.runs as usize, args.runs as usize * 4);
    let config = SynthConfig {
        pods,
        policies,
        nodes: nodes(args, pods),
        namespaces: args.namespaces,
        seed: args.seed,
    };
    progress(format!(
        "  generating the cluster ({} nodes, {} namespaces, seed {})",
        config.nodes, config.namespaces, config.seed
    ));
    let cluster = SynthCluster::generate(&config)?;
    let index = cluster.index()?;
    let node = busiest_node(&index, &cluster)?;
    drop(cluster);
    let local_pods = index.local_pods(&node).count();
    progress(format!(
        "  node {node} ({local_pods} local pods): compile_node from scratch ({runs} runs)"
    ));
    let mut samples = Vec::with_capacity(runs);
    let mut base = None;
    for _ in 0..runs {
        let t = Instant::now();
        let compiled = compile_node(&index, &node);
        samples.push(t.elapsed());
        base = Some(compiled.ruleset);
    }
    let compile_stat: Stat = stat(&samples);
    let base = base.context("no runs")?;
    let size = base.size();
    progress(format!(
        "  {} sets, {} elements, {} rules; the incremental Compiler's first compilation ({runs} runs)",
        size.sets, size.set_elements, size.rules
    ));
    let everything = Changes {
        everything: true,
        ..Changes::default()
    };
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut compiler = Compiler::new();
        let t = Instant::now();
        let rs = compiler.compile(&index, &node, &everything).ruleset;
        samples.push(t.elapsed());
        drop(compiler);
        if rs != base {
            bail!("the incremental compiler's first compilation differs from compile_node");
        }
    }
    let first_compile = median(&samples);

    progress("  choosing the one-pod change (a relabel that moves a pod to another group)");
    let (pod_after, what) = pod_relabelled(&index, &base, &node)?;
    progress(format!("  {what}"));
    let pod_changes = Changes {
        pods: index
            .pods
            .keys()
            .filter(|k| index.pods.get(*k) != pod_after.pods.get(*k))
            .cloned()
            .collect::<BTreeSet<PodKey>>(),
        ..Changes::default()
    };
    let (policy_after, policy_key) = policy_added(&index, &node)?;
    progress(format!("  one-policy change: create {policy_key}"));

    let lab = LabNet::create(&[]).context("creating a network namespace")?;
    let netns = lab
        .underlay_netns()
        .context("the lab has no namespace")?
        .to_string();
    progress(format!("  kernel: nft in network namespace {netns}"));
    let work = KernelWork {
        node: &node,
        base: &base,
        index: &index,
        pod: (&pod_after, &pod_changes),
        policy: &policy_after,
        runs,
        change_runs,
    };
    let k = in_netns(&netns, || kernel_in_netns(&work, host_netns))??;
    drop(lab);
    let cold_apply = median(&k.cold_apply);
    let max = |v: &[Duration]| stat(v).max_ms;
    Ok(Point {
        pods,
        policies,
        nodes: config.nodes,
        node: node.clone(),
        local_pods,
        set_elements: size.set_elements,
        rules: size.rules,
        runs,
        change_runs,
        compile_node: compile_stat.median_ms,
        first_compile,
        cold_apply,
        cold_start: first_compile + cold_apply,
        pod_change: median(&k.pod.total),
        pod_change_compile: median(&k.pod.compile),
        pod_change_apply: median(&k.pod.apply),
        pod_change_max: max(&k.pod.total),
        policy_change: median(&k.policy.total),
        policy_change_compile: median(&k.policy.compile),
        policy_change_apply: median(&k.policy.apply),
        policy_change_max: max(&k.policy.total),
        policy_delete: median(&k.policy_delete),
        load_start,
        load_end: load1(),
        agent_rss_mib: f64::NAN,
        agent_ready_s: f64::NAN,
        agent_relabel_p50: f64::NAN,
    })
}

fn nodes(args: &Args, pods: usize) -> usize {
    args.pods_per_node
        .map_or(args.nodes, |n| pods.div_ceil(n.max(1)).max(1))
}

fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The agent bench for `pods` at one policy count; fills the points' agent columns.
fn agent_rss(
    args: &Args,
    policies: usize,
    pods: &[usize],
    nodes: usize,
    points: &mut [Point],
) -> Result<()> {
    let here = std::env::current_exe().context("this binary's path")?;
    let dir = here.parent().unwrap_or(Path::new("."));
    let bench = args
        .agent_bench
        .clone()
        .unwrap_or_else(|| dir.join("sluice-agent-bench"));
    let agent = args.agent.clone().unwrap_or_else(|| dir.join("sluice"));
    let list = pods
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    progress(format!(
        "agent bench: {list} pods, {policies} policies, {nodes} nodes, {} trials per kind (its progress follows)",
        args.agent_trials
    ));
    let out = Command::new(&bench)
        .arg("--agent")
        .arg(&agent)
        .args(["--no-baseline", "--json", "--pods", &list])
        .args(["--policies", &policies.to_string()])
        .args(["--namespaces", &args.namespaces.to_string()])
        .args(["--nodes", &nodes.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .args(["--trials", &args.agent_trials.to_string()])
        // The node this bench measures too (and cheap at 1,000 nodes).
        .args(["--node-choice", "most-pods"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bench.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", bench.display(), out.status);
    }
    let report: Value =
        serde_json::from_slice(&out.stdout).context("the agent bench's JSON report")?;
    merge_agent_report(&report, points)
}

/// Fills the agent columns of the points from an agent bench's JSON report (`--json`), for
/// the clusters of the same size.
fn merge_agent_report(report: &Value, points: &mut [Point]) -> Result<()> {
    let clusters = report["clusters"]
        .as_array()
        .context("the agent bench's report has no clusters")?;
    for c in clusters {
        let (Some(n), Some(p)) = (c["pods"].as_u64(), c["policies"].as_u64()) else {
            continue;
        };
        let nodes = c["nodes"].as_u64();
        let Some(point) = points.iter_mut().find(|x| {
            x.pods as u64 == n
                && x.policies as u64 == p
                && (x.nodes == 0 || nodes.is_none_or(|m| m == x.nodes as u64))
        }) else {
            progress(format!(
                "agent bench: no grid point for its {n} pods, {p} policies; not used"
            ));
            continue;
        };
        let kib = c["memory_at_end"]["hwm_kib"]
            .as_u64()
            .max(c["memory_at_ready"]["hwm_kib"].as_u64());
        point.agent_rss_mib = kib.map_or(f64::NAN, |k| k as f64 / 1024.0);
        point.agent_ready_s = c["ready_s"].as_f64().unwrap_or(f64::NAN);
        point.agent_relabel_p50 = c["kinds"]["pod relabel"]["total"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN);
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    mem_total_mib: u64,
    kernel: String,
    nft: String,
    commit: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        mem_total_mib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |k| k / 1024),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        nft: nft_version().unwrap_or_default(),
        commit,
    }
}

/// Growth of `value` from the grid's first point (smallest pods, smallest policies).
fn growth(points: &[Point], value: impl Fn(&Point) -> f64) -> Vec<f64> {
    let Some(first) = points.first() else {
        return Vec::new();
    };
    let v0 = value(first);
    points.iter().map(|p| value(p) / v0).collect()
}

/// The exponent k in cost ∝ pods^k between the smallest and the largest pod count at one
/// policy count (1: linear, 0: flat).
fn exponent(points: &[Point], policies: usize, value: impl Fn(&Point) -> f64) -> Option<f64> {
    let at: Vec<&Point> = points.iter().filter(|p| p.policies == policies).collect();
    let (lo, hi) = (at.first()?, at.last()?);
    if hi.pods <= lo.pods {
        return None;
    }
    Some((value(hi) / value(lo)).ln() / (hi.pods as f64 / lo.pods as f64).ln())
}

fn print_report(points: &[Point], machine: &Machine, load: (&str, &str)) {
    println!(
        "machine: {} x {}, {} MiB, Linux {}, {}, commit {}",
        machine.nproc,
        machine.cpu,
        machine.mem_total_mib,
        machine.kernel,
        machine.nft,
        machine.commit
    );
    println!(
        "load average (1, 5, 15 min): start {}, end {}",
        load.0, load.1
    );
    println!();
    println!(
        "medians in ms; runs: full compile and cold apply {}, changes {}",
        points.first().map_or(0, |p| p.runs),
        points.first().map_or(0, |p| p.change_runs)
    );
    println!(
        "{:>7} {:>6} {:>9} {:>6} {:>8} | {:>9} {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} | {:>6} {:>7} {:>8}",
        "pods", "pols", "node", "local", "elements", "compile", "1st comp", "cold nft", "cold st",
        "pod chg", "pol chg", "pol del", "pod max", "agentMiB", "ready s", "load"
    );
    for p in points {
        let opt = |x: f64, prec: usize| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.prec$}")
            }
        };
        println!(
            "{:>7} {:>6} {:>9} {:>6} {:>8} | {:>9.1} {:>9.1} {:>9.1} {:>9.1} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>8} {:>7} {:>4.1}-{:.1}",
            p.pods,
            p.policies,
            p.node,
            p.local_pods,
            p.set_elements,
            p.compile_node,
            p.first_compile,
            p.cold_apply,
            p.cold_start,
            p.pod_change,
            p.policy_change,
            p.policy_delete,
            p.pod_change_max,
            opt(p.agent_rss_mib, 1),
            opt(p.agent_ready_s, 2),
            p.load_start,
            p.load_end
        );
    }
    println!();
    println!("split of the changes (median ms): incremental compile + TableState::sync");
    for p in points {
        println!(
            "  {:>7} pods {:>5} policies {:>5} nodes ({} local pods): pod {:.2} + {:.2}; policy {:.2} + {:.2}",
            p.pods,
            p.policies,
            p.nodes,
            p.local_pods,
            p.pod_change_compile,
            p.pod_change_apply,
            p.policy_change_compile,
            p.policy_change_apply
        );
    }
    println!();
    if let Some(first) = points.first() {
        println!(
            "growth: each point / the {} pods, {} policies point",
            first.pods, first.policies
        );
        let cols: [(&str, &PointValue); 6] = [
            ("pods", &|p| p.pods as f64),
            ("compile_node", &|p| p.compile_node),
            ("cold start", &|p| p.cold_start),
            ("pod change", &|p| p.pod_change),
            ("policy change", &|p| p.policy_change),
            ("agent RSS", &|p| p.agent_rss_mib),
        ];
        let g: Vec<Vec<f64>> = cols.iter().map(|(_, f)| growth(points, f)).collect();
        println!(
            "  {:>7} {:>6} {}",
            "pods",
            "pols",
            cols.iter()
                .map(|(n, _)| format!("{n:>14}"))
                .collect::<String>()
        );
        for (i, p) in points.iter().enumerate() {
            println!(
                "  {:>7} {:>6} {}",
                p.pods,
                p.policies,
                g.iter()
                    .map(|col| if col[i].is_nan() {
                        format!("{:>14}", "-")
                    } else {
                        format!("{:>13.2}x", col[i])
                    })
                    .collect::<String>()
            );
        }
    }
    println!();
    let mut policies: Vec<usize> = points.iter().map(|p| p.policies).collect();
    policies.sort();
    policies.dedup();
    println!("verdicts (cost ∝ pods^k from the smallest to the largest pod count):");
    for pol in policies {
        let k = |f: &dyn Fn(&Point) -> f64| exponent(points, pol, f);
        let show =
            |name: &str, k: Option<f64>, ok: &dyn Fn(f64) -> bool, yes: &str, no: &str| match k {
                Some(k) if k.is_nan() => println!("  {pol} policies, {name}: not measured"),
                Some(k) => println!(
                    "  {pol} policies, {name}: k = {k:.2} -> {}",
                    if ok(k) { yes } else { no }
                ),
                None => println!("  {pol} policies, {name}: needs two pod counts"),
            };
        let flat = |k: f64| k < 0.2;
        let linear = |k: f64| k <= 1.1;
        show("pod change", k(&|p| p.pod_change), &flat, "flat", "grows");
        show(
            "policy change",
            k(&|p| p.policy_change),
            &flat,
            "flat",
            "grows",
        );
        show(
            "cold start (first compile + nft load)",
            k(&|p| p.cold_start),
            &linear,
            "linear or better",
            "worse than linear",
        );
        show(
            "compile_node",
            k(&|p| p.compile_node),
            &linear,
            "linear or better",
            "worse than linear",
        );
        show(
            "agent peak RSS",
            k(&|p| p.agent_rss_mib),
            &linear,
            "linear or better",
            "worse than linear",
        );
    }
}

fn write_csv(path: &Path, points: &[Point]) -> Result<()> {
    let mut text = CSV_COLUMNS.join(",");
    text.push('\n');
    for p in points {
        text.push_str(&p.csv_row());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read_csv(path: &Path) -> Result<Vec<Point>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty CSV")?.split(',').collect();
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| Point::from_csv(&header, l))
        .collect()
}

/// The plot: per-change cost vs pods, cold start vs pods, and (if measured) the agent's peak RSS
/// vs pods; one line per policy count.
fn plot(path: &Path, font: &Path, points: &[Point], title: &str) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::{register_font, FontStyle};

    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "reading the plot's font {} (Debian: apt-get install fonts-dejavu-core)",
            font.display()
        )
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{}: not a usable font", font.display()))?;

    let mut policies: Vec<usize> = points.iter().map(|p| p.policies).collect();
    policies.sort();
    policies.dedup();
    let with_agent = points.iter().any(|p| !p.agent_rss_mib.is_nan());
    let panels = if with_agent { 3 } else { 2 };
    let root = BitMapBackend::new(path, (660 * panels as u32, 620)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, body) = root.split_vertically(40);
    top.titled(title, ("sans-serif", 22)).map_err(|e| err(&e))?;
    let areas = body.split_evenly((1, panels));
    let max_pods = points.iter().map(|p| p.pods).max().unwrap_or(1) as f64 / 1000.0;
    let x_range = 0f64..max_pods * 1.05;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
    ];
    type Series = (String, RGBColor, bool, Vec<(f64, f64)>);
    let line = |pol: usize, f: &dyn Fn(&Point) -> f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter(|p| p.policies == pol && !f(p).is_nan())
            .map(|p| (p.pods as f64 / 1000.0, f(p)))
            .collect()
    };
    let draw = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                caption: &str,
                y_desc: &str,
                series: Vec<Series>|
     -> Result<()> {
        let y_max = series
            .iter()
            .flat_map(|s| s.3.iter().map(|p| p.1))
            .fold(0f64, f64::max)
            * 1.15;
        let y_max = if y_max > 0.0 { y_max } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(85)
            .build_cartesian_2d(x_range.clone(), 0f64..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("pods in the cluster (thousands)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if y_max >= 20.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .y_desc(y_desc)
            .axis_desc_style(("sans-serif", 17))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| err(&e))?;
        for (label, color, dashed, pts) in series {
            let style = ShapeStyle::from(&color).stroke_width(if dashed { 1 } else { 3 });
            let drawn = if dashed {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 6, 5, style))
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style))
            }
            .map_err(|e| err(&e))?;
            drawn
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            if !dashed {
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        Ok(())
    };

    let k = |p: usize| {
        if p.is_multiple_of(1000) {
            format!("{}k policies", p / 1000)
        } else {
            format!("{p} policies")
        }
    };
    let mut changes = Vec::new();
    for (i, &pol) in policies.iter().enumerate() {
        changes.push((
            format!("pod relabel, {}", k(pol)),
            colors[(2 * i) % colors.len()],
            false,
            line(pol, &|p| p.pod_change),
        ));
        changes.push((
            format!("policy create, {}", k(pol)),
            colors[(2 * i + 1) % colors.len()],
            false,
            line(pol, &|p| p.policy_change),
        ));
    }
    draw(
        &areas[0],
        "One change -> committed in the kernel (should be flat)",
        "ms (median): incremental compile + diff apply",
        changes,
    )?;

    let mut cold = Vec::new();
    for (i, &pol) in policies.iter().enumerate() {
        let pts = line(pol, &|p| p.cold_start);
        let color = colors[(2 * i) % colors.len()];
        // Linear from the smallest point: the line to stay under.
        if let Some(&(x0, y0)) = pts.first() {
            let linear = pts.iter().map(|&(x, _)| (x, y0 * x / x0)).collect();
            cold.push((
                format!("linear from {}k pods, {}", x0, k(pol)),
                color,
                true,
                linear,
            ));
        }
        cold.push((
            format!("first compile + nft load, {}", k(pol)),
            color,
            false,
            pts,
        ));
        cold.push((
            format!("nft load alone, {}", k(pol)),
            colors[(2 * i + 1) % colors.len()],
            false,
            line(pol, &|p| p.cold_apply),
        ));
    }
    draw(
        &areas[1],
        "Cold start (linear or better)",
        "ms (median)",
        cold,
    )?;

    if with_agent {
        let rss = policies
            .iter()
            .enumerate()
            .map(|(i, &pol)| {
                (
                    format!("agent peak RSS, {}", k(pol)),
                    colors[(2 * i) % colors.len()],
                    false,
                    line(pol, &|p| p.agent_rss_mib),
                )
            })
            .collect();
        draw(&areas[2], "The agent's peak RSS (VmHWM)", "MiB", rss)?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

pub fn main() -> std::process::ExitCode {
    // argv: sluice-bench scale [flags]
    let args = Args::parse_from(
        std::iter::once("e2e/bench scale".to_string()).chain(std::env::args().skip(2)),
    );
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench scale: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let machine = machine();
    let title = |points: &[Point]| {
        format!(
            "sluice control plane at scale: one node of a cluster of {}, {} namespaces; {} x {}, medians of {}/{} runs",
            match args.pods_per_node {
                Some(n) => format!("pods/{n} nodes"),
                None => format!("{} nodes", args.nodes),
            },
            args.namespaces,
            machine.nproc,
            machine.cpu,
            points.first().map_or(0, |p| p.runs),
            points.first().map_or(0, |p| p.change_runs),
        )
    };
    let (csv, png) = (
        args.out.with_extension("csv"),
        args.out.with_extension("png"),
    );
    if let Some(from) = &args.replot {
        let mut points = read_csv(from)?;
        for path in &args.agent_report {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let report: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an agent bench report", path.display()))?;
            merge_agent_report(&report, &mut points)?;
        }
        write_csv(&csv, &points)?;
        print_report(&points, &machine, ("?", "?"));
        plot(&png, &args.font, &points, &title(&points))?;
        progress(format!("plot written to {}", png.display()));
        return Ok(());
    }
    // Fail before measuring for minutes if the plot cannot be drawn.
    std::fs::metadata(&args.font).with_context(|| {
        format!(
            "the plot's font {} (Debian: apt-get install fonts-dejavu-core; or --font)",
            args.font.display()
        )
    })?;
    if let Some(why) = kernel_unavailable() {
        bail!("{why}; the scale bench measures cold apply and changes in the kernel");
    }
    install_signal_cleanup()?;
    let host_netns = std::fs::File::open("/proc/thread-self/ns/net")
        .context("opening this thread's network namespace")?;
    if has_sluice_table(&tables_in(&host_netns)?) {
        bail!("the host network namespace already has table inet sluice; not running");
    }
    let load_start = loadavg();
    let started = Instant::now();
    let mut pods = args.pods.clone();
    pods.sort();
    pods.dedup();
    let mut policies = args.policies.clone();
    policies.sort();
    policies.dedup();
    let grid: Vec<(usize, usize)> = policies
        .iter()
        .flat_map(|&pol| pods.iter().map(move |&p| (p, pol)))
        .collect();
    let mut points = Vec::with_capacity(grid.len());
    for (i, &(p, pol)) in grid.iter().enumerate() {
        progress(format!(
            "point {}/{}: {p} pods, {pol} policies (load {})",
            i + 1,
            grid.len(),
            loadavg()
        ));
        let t = Instant::now();
        let point = measure_point(p, pol, args, &host_netns)?;
        progress(format!(
            "point {}/{} done in {:.0} s: compile_node {:.1} ms, first compile {:.1} ms, cold apply {:.1} ms, pod change {:.2} ms, policy change {:.2} ms",
            i + 1,
            grid.len(),
            t.elapsed().as_secs_f64(),
            point.compile_node,
            point.first_compile,
            point.cold_apply,
            point.pod_change,
            point.policy_change
        ));
        points.push(point);
        // Partial results survive a later failure.
        write_csv(&csv, &points)?;
    }
    if !args.no_agent && !args.agent_pods.is_empty() {
        let agent_policies = args.agent_policies.clone().unwrap_or(policies.clone());
        for pol in agent_policies {
            if args.pods_per_node.is_some() {
                // One node count per pod count: one agent bench run each.
                for &p in &args.agent_pods {
                    agent_rss(args, pol, &[p], nodes(args, p), &mut points)?;
                }
            } else {
                agent_rss(args, pol, &args.agent_pods, args.nodes, &mut points)?;
            }
            write_csv(&csv, &points)?;
        }
    }
    // The grid order for the report: by policies, then pods.
    points.sort_by_key(|p| (p.policies, p.pods));
    let load_end = loadavg();
    write_csv(&csv, &points)?;
    print_report(&points, &machine, (&load_start, &load_end));
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    plot(&png, &args.font, &points, &title(&points))?;
    progress(format!("wrote {} and {}", csv.display(), png.display()));
    Ok(())
}
