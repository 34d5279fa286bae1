//! `sluice-bench`: how long sluice takes to compile a big cluster's policy for one node, how big
//! that ruleset is, and how long `nft` takes to load it and to apply a one-pod change, each next
//! to a baseline measured in the same run (docs/performance.md). Run it through `e2e/bench`,
//! which builds it in release mode first.
//!
//! This is a benchmark, not a test: it reports numbers and target verdicts and exits 0 whether
//! a target is met or not (non-zero only when it could not measure).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use sluice::compile::{compile_node, ChainKind, Ruleset, SetKind, TABLE};
use sluice::incremental::Compiler;
use sluice::model::{Changes, Direction, Family, Index, PodInfo, PodKey, Protocol};
use sluice::nft::{
    command_count, diff_script, remove_table_script, render, replace_script, Nft, TableState,
};
use sluice::policy::allowed;
use sluice_e2e::netns::{in_netns, install_signal_cleanup, LabNet};
use sluice_e2e::synth::{SynthCluster, SynthConfig};

mod scale_bench;

const TARGET_COMPILE_MS: f64 = 100.0;
const TARGET_LOAD_MS: f64 = 1000.0;
const TARGET_CHANGE_MS: f64 = 10.0;

/// sluice's benchmark: compile time and ruleset size for a synthetic cluster, nft load time
/// and one-pod change time, each next to a baseline (docs/performance.md).
///
/// The kernel measurements need root: they run `nft` inside a network namespace created for the
/// run (and deleted at the end, also on failure or Ctrl-C). Without root they are skipped.
/// Progress goes to stderr; the report (a table, or JSON with --json) to stdout.
#[derive(Parser)]
#[command(name = "e2e/bench")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 300)]
    namespaces: usize,
    /// Seed of the synthetic cluster (same seed, same cluster).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs of each measurement (medians, min and max over them). Fast kernel operations
    /// (empty load, one-pod changes) run 4 times as often. Compiling every node runs once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// The node to measure; default: the one with the largest ruleset (elements + rules).
    #[arg(long)]
    node: Option<String>,
    /// Reference-evaluator calls sampled for baseline (c).
    #[arg(long, default_value_t = 20_000)]
    eval_sample: usize,
    /// Skip the nft measurements even as root.
    #[arg(long)]
    no_kernel: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the nft scripts measured (full load, the one-pod diffs and their full
    /// replaces) into this directory, to replay or profile them with `nft -f`.
    #[arg(long, value_name = "DIR")]
    dump_scripts: Option<std::path::PathBuf>,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("sluice-bench: {}", msg.as_ref());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Stat {
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    runs: usize,
}

fn stat(samples: &[Duration]) -> Stat {
    let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Stat {
        median_ms: median,
        min_ms: v.first().copied().unwrap_or(f64::NAN),
        max_ms: v.last().copied().unwrap_or(f64::NAN),
        runs: n,
    }
}

/// Runs `f` `runs` times, timing each; returns the stats and the last result.
fn measure<T>(runs: usize, label: &str, mut f: impl FnMut() -> Result<T>) -> Result<(Stat, T)> {
    progress(format!("{label} ({runs} runs)"));
    let mut samples = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f()?;
        samples.push(t.elapsed());
        last = Some(v);
    }
    let last = last.ok_or_else(|| anyhow!("{label}: no runs"))?;
    Ok((stat(&samples), last))
}

#[derive(Clone, Debug, Default, Serialize)]
struct Size {
    /// Plain sets (peers, ipBlocks, named ports) and their elements.
    sets: usize,
    set_elements: usize,
    /// Maps keyed by local pod IP (dispatch verdict maps, drop-counter maps) and their elements.
    maps: usize,
    map_elements: usize,
    chains: usize,
    policy_chains: usize,
    group_chains: usize,
    rules: usize,
    /// `render()` output.
    nft_text_bytes: usize,
    /// `replace_script()` output: what a load from scratch sends to nft.
    replace_script_bytes: usize,
}

fn size(rs: &Ruleset, with_text: bool) -> Size {
    let mut s = Size::default();
    for set in rs.sets.values() {
        if matches!(set.kind, SetKind::Dispatch(_) | SetKind::DropCounters(_)) {
            s.maps += 1;
            s.map_elements += set.elements.len();
        } else {
            s.sets += 1;
            s.set_elements += set.elements.len();
        }
    }
    for chain in rs.chains.values() {
        s.chains += 1;
        s.rules += chain.rules.len();
        match chain.kind {
            ChainKind::Policy => s.policy_chains += 1,
            ChainKind::Group => s.group_chains += 1,
            ChainKind::Base { .. } => {}
        }
    }
    if with_text {
        s.nft_text_bytes = render(rs).len();
        s.replace_script_bytes = replace_script(rs).len();
    }
    s
}

/// `VmHWM` of this process (peak resident set), in KiB.
fn peak_rss_kib() -> Option<u64> {
    process_peak_rss_kib(std::process::id())
}

/// Peak resident set of an `nft -f -` loading `script`, in KiB: its `VmHWM`, read every
/// millisecond until it exits (so a lower bound, missing at most its last millisecond).
///
/// Not getrusage: a child's `ru_maxrss` also counts the memory of the process it was spawned
/// from (exec records the old mm's high-water mark), so every nft spawned by this 120 MiB
/// process would look at least that big.
fn nft_load_peak_rss_kib(script: &str) -> Result<Option<u64>> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("spawning nft -f -")?;
    let pid = child.id();
    let mut peak = None;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin
            .write_all(script.as_bytes())
            .context("writing to nft -f -")?;
    }
    let status = loop {
        if let Some(kib) = process_peak_rss_kib(pid) {
            peak = peak.max(Some(kib));
        }
        if let Some(status) = child.try_wait().context("waiting for nft -f -")? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if !status.success() {
        bail!("nft -f - (the peak-RSS load) failed: {status}");
    }
    Ok(peak)
}

#[derive(Debug, Serialize)]
struct Change {
    /// What changed, e.g. `added pod ns/web-12-bench (a replica of ns/web-12)`.
    what: String,
    /// compile_node after the change.
    compile: Stat,
    diff_script: Stat,
    /// The agent's incremental compiler after the same change (its sets kept from the
    /// compilation before it), and the diff against that earlier compilation, whose unchanged
    /// sets it shares.
    compile_incremental: Stat,
    diff_script_shared: Stat,
    diff_commands: usize,
    diff_bytes: usize,
    /// `add element` / `delete element` commands of the diff.
    element_commands: usize,
    /// The diff deletes something (then an `nft -f` that applies it waits for an RCU grace
    /// period when it closes its netlink socket; the `nft -i` session does not close it).
    deletes: bool,
    replace_script_bytes: usize,
}

#[derive(Debug, Serialize)]
struct AllNodes {
    nodes: usize,
    total_ms: f64,
    per_node_median_ms: f64,
    per_node_max_ms: f64,
    /// Local pods per node, smallest and largest.
    local_pods_min: usize,
    local_pods_max: usize,
}

#[derive(Debug, Serialize)]
struct EvalBaseline {
    /// Calls of `sluice::policy::allowed` timed.
    sampled_calls: usize,
    sampled_allowed: usize,
    per_call_us: f64,
    /// Ordered (source, destination) pairs with at least one end a local pod:
    /// 2 * L * (M - 1) - L * (L - 1), for L local pods and M pods owning an IPv4 address.
    pairs: u64,
    local_pods: usize,
    pods_with_ips: usize,
    /// per_call_us * pairs.
    scaled_ms: f64,
    /// scaled_ms / median compile_node of the node.
    ratio_to_compile: f64,
}

#[derive(Debug, Serialize)]
struct Kernel {
    nft_version: String,
    /// `table inet sluice {}` when there is none: spawning nft and one small transaction.
    empty_load: Stat,
    /// `replace_script` of an empty ruleset (`table; delete table; table {}`): the same plus a
    /// deletion, which makes nft's exit wait for the kernel's deferred release (RCU grace period).
    empty_replace: Stat,
    full_load: Stat,
    full_replace_over_itself: Stat,
    /// How sluice applies a change: `TableState::sync(after)` with `before` applied, i.e. the
    /// diff computed and sent through the long-lived `nft -i` session (wall clock of `sync`:
    /// diff_script, the session round trip and the clone of the ruleset it keeps).
    add_diff_session: Stat,
    relabel_diff_session: Stat,
    /// The first session diff of a fresh `TableState` (after its full load), which also starts
    /// `nft -i`. Once per agent start; not in the stats above.
    session_first_diff_ms: f64,
    /// Peak resident set of the `nft -i` session process after the session runs, KiB (it
    /// lives as long as the agent).
    session_nft_peak_rss_kib: Option<u64>,
    /// Baseline: the same diff text through a fresh `nft -f -` per change (how sluice applied
    /// diffs before the session).
    add_diff_spawned: Stat,
    relabel_diff_spawned: Stat,
    /// Baseline (a): a full `replace_script` of the changed ruleset through `nft -f -`.
    add_replace: Stat,
    relabel_replace: Stat,
    /// Ratios of medians.
    ratios: KernelRatios,
    /// Peak resident set of an `nft -f` loading the node's ruleset from scratch, KiB (`VmHWM`
    /// polled every millisecond during one extra, untimed load).
    nft_peak_rss_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
struct KernelRatios {
    add_spawned_over_session: f64,
    relabel_spawned_over_session: f64,
    add_replace_over_session: f64,
    relabel_replace_over_session: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    pods: usize,
    policies: usize,
    nodes: usize,
    namespaces: usize,
    seed: u64,
    runs: usize,
    policy_mix: BTreeMap<&'static str, usize>,
    generate_ms: f64,
    index_build: Stat,
    node: String,
    local_pods: usize,
    compile_one: Stat,
    problems: usize,
    render: Stat,
    /// `Ruleset::clone` of the measured node's ruleset: `TableState::sync` keeps a copy of
    /// what it applied, so every sync pays one.
    ruleset_clone: Stat,
    size: Size,
    all_nodes: AllNodes,
    add: Change,
    relabel: Change,
    eval: EvalBaseline,
    bench_peak_rss_kib: Option<u64>,
    kernel: Option<Kernel>,
    kernel_skipped: Option<String>,
}

fn local_pods<'a>(idx: &'a Index, node: &'a str) -> Vec<&'a PodInfo> {
    idx.local_pods(node).collect()
}

/// Local pods (key order) that some policy isolates for ingress.
fn isolated_local_pods<'a>(idx: &'a Index, node: &'a str) -> Vec<&'a PodInfo> {
    local_pods(idx, node)
        .into_iter()
        .filter(|p| !idx.isolating_policies(p, Direction::Ingress).is_empty())
        .collect()
}

/// A one-pod change: a new replica of the first isolated local pod. Returns the index after
/// it, and what it was.
fn pod_added(idx: &Index, cluster: &SynthCluster, node: &str) -> Result<(Index, String)> {
    let template = *isolated_local_pods(idx, node)
        .first()
        .with_context(|| format!("no pod on {node} is isolated by a policy"))?;
    let mut pod = template.clone();
    pod.key = PodKey::new(
        template.key.namespace.clone(),
        format!("{}-bench", template.key.name),
    );
    pod.ips = cluster.spare_ips(node, 0)?;
    let what = format!(
        "added pod {} on {node} (a replica of {}: same labels, new IPs {})",
        pod.key,
        template.key,
        pod.ips
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut after = idx.clone();
    after.apply_pod(pod);
    Ok((after, what))
}

/// A local isolated pod whose `app` label changes to another app of its namespace, chosen so
/// that the change moves it to another group chain.
fn pod_relabelled(idx: &Index, base: &Ruleset, node: &str) -> Result<(Index, String)> {
    let mut fallback = None;
    for pod in isolated_local_pods(idx, node).into_iter().take(50) {
        let Some(old_app) = pod.labels.get("app") else {
            continue;
        };
        let mut apps: Vec<&String> = idx
            .pods
            .range(PodKey::new(pod.key.namespace.clone(), String::new())..)
            .take_while(|(k, _)| k.namespace == pod.key.namespace)
            .filter_map(|(_, p)| p.labels.get("app"))
            .filter(|a| *a != old_app)
            .collect();
        apps.sort();
        apps.dedup();
        let Some(new_app) = apps.first() else {
            continue;
        };
        let mut changed = pod.clone();
        changed.labels.insert("app".into(), (*new_app).clone());
        let mut after = idx.clone();
        after.apply_pod(changed);
        let what = format!("relabelled pod {} app={old_app} -> app={new_app}", pod.key);
        let rs = compile_node(&after, node).ruleset;
        let moves_groups = rs.sets.iter().any(|(name, set)| {
            matches!(set.kind, SetKind::Dispatch(_))
                && base.sets.get(name).map(|s| &s.elements) != Some(&set.elements)
        });
        if moves_groups {
            return Ok((after, what));
        }
        fallback.get_or_insert((after, what));
    }
    fallback.with_context(|| format!("no pod on {node} can be relabelled"))
}

#[allow(clippy::too_many_arguments)]
fn measure_change(
    runs: usize,
    label: &str,
    node: &str,
    before: &Index,
    base: &Ruleset,
    after: &Index,
    what: String,
) -> Result<(Change, Ruleset, String)> {
    let (compile, compiled) = measure(runs, &format!("{label}: compile_node"), || {
        Ok(compile_node(after, node))
    })?;
    let rs = compiled.ruleset;
    let (diff_stat, diff) = measure(runs, &format!("{label}: diff_script"), || {
        Ok(diff_script(base, &rs))
    })?;
    let diff = diff.with_context(|| format!("{label}: the change made no difference"))?;

    // The agent's way: the compiler keeps its sets; only the changed pod is looked at again.
    progress(format!("{label}: incremental compile ({runs} runs)"));
    let changed: BTreeSet<PodKey> = before
        .pods
        .keys()
        .chain(after.pods.keys())
        .filter(|k| before.pods.get(*k) != after.pods.get(*k))
        .cloned()
        .collect();
    let changes = Changes {
        pods: changed,
        ..Changes::default()
    };
    let mut compiler = Compiler::new();
    let everything = Changes {
        everything: true,
        ..Changes::default()
    };
    let base_kept = compiler.compile(before, node, &everything).ruleset;
    let mut samples = Vec::with_capacity(runs);
    let mut after_kept = None;
    for _ in 0..runs {
        let t = Instant::now();
        let compiled = compiler.compile(after, node, &changes);
        samples.push(t.elapsed());
        // Back to the state before the change, untimed.
        compiler.compile(before, node, &changes);
        after_kept.get_or_insert(compiled.ruleset);
    }
    let compile_incremental = stat(&samples);
    let after_kept = after_kept.ok_or_else(|| anyhow!("{label}: no runs"))?;
    if after_kept != rs {
        bail!("{label}: the incremental compiler disagrees with compile_node");
    }
    let (diff_script_shared, shared_diff) =
        measure(runs, &format!("{label}: diff_script, shared sets"), || {
            Ok(diff_script(&base_kept, &after_kept))
        })?;
    if shared_diff.as_deref() != Some(diff.as_str()) {
        bail!("{label}: the diff over shared sets differs from the plain diff");
    }
    let change = Change {
        what,
        compile,
        diff_script: diff_stat,
        compile_incremental,
        diff_script_shared,
        diff_commands: command_count(&diff),
        diff_bytes: diff.len(),
        element_commands: diff
            .lines()
            .filter(|l| l.starts_with("add element") || l.starts_with("delete element"))
            .count(),
        replace_script_bytes: replace_script(&rs).len(),
        deletes: diff.lines().any(|l| l.starts_with("delete ")),
    };
    Ok((change, rs, diff))
}

/// Baseline (c): the reference evaluator answering (local pod, other pod) pairs one by one.
fn eval_baseline(
    idx: &Index,
    node: &str,
    sample: usize,
    seed: u64,
    compile_ms: f64,
) -> Result<EvalBaseline> {
    let has_v4 = |p: &&PodInfo| p.owns_ips() && p.ip(Family::V4).is_some();
    let local: Vec<&PodInfo> = local_pods(idx, node).into_iter().filter(has_v4).collect();
    let all: Vec<&PodInfo> = idx.pods.values().filter(has_v4).collect();
    if local.is_empty() || all.len() < 2 {
        bail!("baseline (c) needs a local pod and another pod");
    }
    // The sample is drawn before timing, so only the evaluator is timed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_beef);
    let mut calls: Vec<(&PodKey, &PodKey, Protocol, u16)> = Vec::with_capacity(sample);
    while calls.len() < sample {
        let (Some(l), Some(o)) = (local.choose(&mut rng), all.choose(&mut rng)) else {
            bail!("empty pod list");
        };
        if l.key == o.key {
            continue;
        }
        let (src, dst) = if rng.random_bool(0.5) {
            (*l, *o)
        } else {
            (*o, *l)
        };
        // The destination's first container port, so named-port rules can match.
        let (protocol, port) = dst
            .ports
            .first()
            .map_or((Protocol::Tcp, 80), |p| (p.protocol, p.port));
        calls.push((&src.key, &dst.key, protocol, port));
    }
    progress(format!(
        "baseline (c): {sample} calls of the reference evaluator"
    ));
    let t = Instant::now();
    let mut allowed_count = 0;
    for (src, dst, protocol, port) in &calls {
        let verdict = allowed(idx, src, dst, *protocol, *port, Family::V4)
            .map_err(|e| anyhow!("evaluating {src} -> {dst}: {e}"))?;
        if verdict.allowed() {
            allowed_count += 1;
        }
    }
    let elapsed = t.elapsed();
    let (l, m) = (local.len() as u64, all.len() as u64);
    let pairs = 2 * l * (m - 1) - l * (l - 1);
    let per_call_us = elapsed.as_secs_f64() * 1e6 / sample.max(1) as f64;
    let scaled_ms = per_call_us * pairs as f64 / 1000.0;
    Ok(EvalBaseline {
        sampled_calls: sample,
        sampled_allowed: allowed_count,
        per_call_us,
        pairs,
        local_pods: local.len(),
        pods_with_ips: all.len(),
        scaled_ms,
        ratio_to_compile: scaled_ms / compile_ms,
    })
}

struct KernelInput<'a> {
    runs: usize,
    base: &'a Ruleset,
    add: (&'a Ruleset, &'a str),
    relabel: (&'a Ruleset, &'a str),
}

fn nft_version() -> Option<String> {
    let out = Command::new("nft").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Why the kernel part cannot run here, if it cannot.
fn kernel_unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root: nft measurements skipped (run as root for them)".into());
    }
    if nft_version().is_none() {
        return Some("nft not found: nft measurements skipped".into());
    }
    let ip_ok = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ip_ok {
        return Some("ip (iproute2) not found: nft measurements skipped".into());
    }
    None
}

/// The kernel part, in a network namespace made for it. `LabNet` deletes the namespace when
/// dropped (also on error and panic) and on SIGINT/SIGTERM.
fn kernel(input: &KernelInput<'_>) -> Result<Kernel> {
    install_signal_cleanup()?;
    // This thread's network namespace, the host's: where the benchmark's table must never land.
    let host_netns = std::fs::File::open("/proc/thread-self/ns/net")
        .context("opening this thread's network namespace")?;
    if has_sluice_table(&tables_in(&host_netns)?) {
        bail!(
            "the host network namespace already has table inet {TABLE}: the benchmark could not \
             check that its own table stays out of it; not running the nft part"
        );
    }
    let lab = LabNet::create(&[]).context("creating a network namespace")?;
    let netns = lab
        .underlay_netns()
        .context("the lab has no namespace")?
        .to_string();
    progress(format!("kernel: nft in network namespace {netns}"));
    // `nft` is spawned from a thread inside the namespace, so it runs there directly (no
    // `ip netns exec` in the timings), as the agent spawns it in the host namespace.
    let result = in_netns(&netns, || kernel_in_netns(input, &host_netns))?;
    drop(lab);
    result
}

/// `nft list tables` run in the network namespace `ns`, from a thread that enters it.
fn tables_in(ns: &std::fs::File) -> Result<String> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<String> {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns into the host network namespace")?;
            let out = Command::new("nft")
                .args(["list", "tables"])
                .output()
                .context("nft list tables")?;
            if !out.status.success() {
                bail!(
                    "nft list tables: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .join()
        .map_err(|_| anyhow!("the thread listing tables panicked"))?
    })
}

fn has_sluice_table(listing: &str) -> bool {
    let table = format!("table inet {TABLE}");
    listing.lines().any(|l| l.trim() == table)
}

/// This process's live `nft` children (pid, network namespace link like `net:[4026532001]`).
fn nft_children() -> Result<Vec<(u32, std::path::PathBuf)>> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let entry = entry.context("reading /proc")?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we look; a vanished one is not ours to check.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
        };
        if field("Name:") == Some("nft") && field("PPid:") == Some(me.as_str()) {
            if let Ok(ns) = std::fs::read_link(entry.path().join("ns/net")) {
                found.push((pid, ns));
            }
        }
    }
    Ok(found)
}

/// Checks, with the `nft -i` session running, that it runs in this thread's network namespace:
/// its process's namespace is this thread's, the table is here, and the host has no such table.
fn verify_session_netns(host_netns: &std::fs::File) -> Result<()> {
    let here = std::fs::read_link("/proc/thread-self/ns/net")
        .context("reading this thread's network namespace")?;
    let children = nft_children()?;
    if children.is_empty() {
        bail!("ABORT: no nft child process after a session diff (is the nft -i session running?)");
    }
    for (pid, ns) in &children {
        if *ns != here {
            bail!(
                "ABORT: nft process {pid} (the nft -i session) runs in network namespace {}, \
                 not in the benchmark's {}: its diffs would go elsewhere",
                ns.display(),
                here.display()
            );
        }
    }
    let listing = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .context("nft list tables")?;
    if !has_sluice_table(&String::from_utf8_lossy(&listing.stdout)) {
        bail!("ABORT: table inet {TABLE} is not in the benchmark's network namespace");
    }
    if has_sluice_table(&tables_in(host_netns)?) {
        bail!(
            "ABORT: table inet {TABLE} appeared in the HOST network namespace during the \
             benchmark; delete it there (nft delete table inet {TABLE}) if nothing else owns it"
        );
    }
    progress(format!(
        "kernel: nft -i session (pid {}) is in the benchmark's namespace {}; the host has no table inet {TABLE}",
        children
            .iter()
            .map(|(pid, _)| pid.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        here.display()
    ));
    Ok(())
}

/// What the session part measured.
struct SessionTimes {
    add: Stat,
    relabel: Stat,
    first_diff_ms: f64,
    nft_peak_rss_kib: Option<u64>,
}

/// `VmHWM` of process `pid`, in KiB.
fn process_peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// sluice's way of applying a change: one `TableState` (new here, so its `nft -i` session is
/// spawned from this thread and lives in its namespace), loaded whole once with `sync(base)`;
/// then per run `sync(after)` is timed (a diff through the session) and `sync(base)` goes back,
/// untimed.
fn session_changes(
    input: &KernelInput<'_>,
    host_netns: &std::fs::File,
    runs: usize,
) -> Result<SessionTimes> {
    let mut state = TableState::new(Nft::default());
    let sync = |state: &mut TableState, rs: &Ruleset, full: bool| -> Result<usize> {
        let applied = state
            .sync(rs)
            .map_err(|e| anyhow!("TableState::sync: {e}"))?;
        if applied.full != full {
            bail!(
                "TableState::sync applied {} where the benchmark expected {}",
                if applied.full {
                    "a full load"
                } else {
                    "a diff"
                },
                if full { "a full load" } else { "a diff" }
            );
        }
        Ok(applied.commands)
    };
    progress("kernel: TableState::sync(base), the full load (nft -f)");
    sync(&mut state, input.base, true)?;
    // The first diff also starts the session.
    let (add_rs, add_diff) = input.add;
    let t = Instant::now();
    let n = sync(&mut state, add_rs, false)?;
    let first_diff_ms = ms(t.elapsed());
    if n != command_count(add_diff) {
        bail!(
            "TableState::sync sent {n} commands for the one-pod add, the diff has {}",
            command_count(add_diff)
        );
    }
    verify_session_netns(host_netns)?;
    sync(&mut state, input.base, false)?;

    let mut timed = |label: &str, (rs, diff): (&Ruleset, &str)| -> Result<Stat> {
        progress(format!("kernel: {label} ({runs} runs)"));
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let n = sync(&mut state, rs, false)?;
            samples.push(t.elapsed());
            if n != command_count(diff) {
                bail!(
                    "{label}: TableState::sync sent {n} commands, the diff has {}",
                    command_count(diff)
                );
            }
            sync(&mut state, input.base, false)?;
        }
        Ok(stat(&samples))
    };
    let add = timed(
        "one-pod add as a diff, TableState::sync (nft -i session)",
        input.add,
    )?;
    let relabel = timed(
        "one-pod relabel as a diff, TableState::sync (nft -i session)",
        input.relabel,
    )?;
    verify_session_netns(host_netns)?;
    // The session is the only nft child alive now (verify_session_netns found it).
    let nft_peak_rss_kib = nft_children()?
        .first()
        .and_then(|(pid, _)| process_peak_rss_kib(*pid));
    Ok(SessionTimes {
        add,
        relabel,
        first_diff_ms,
        nft_peak_rss_kib,
    })
}

fn kernel_in_netns(input: &KernelInput<'_>, host_netns: &std::fs::File) -> Result<Kernel> {
    let nft = Nft::default();
    let apply = |script: &str| -> Result<Duration> {
        let t = Instant::now();
        nft.apply(script).map_err(|e| anyhow!("{e}"))?;
        Ok(t.elapsed())
    };
    // Refuse to touch anything but a fresh, empty namespace.
    let listing = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .context("nft list ruleset")?;
    if !listing.status.success() || !listing.stdout.iter().all(u8::is_ascii_whitespace) {
        bail!("the benchmark's network namespace is not empty (or nft failed); not touching it");
    }
    let nft_version = nft_version().unwrap_or_default();
    let (runs, fast) = (input.runs, input.runs * 4);
    let base_script = replace_script(input.base);
    let empty_table = format!("table inet {TABLE} {{\n}}\n");
    let empty_replace_script = replace_script(&Ruleset::default());
    // Remove the table (harmless when there is none): the next load starts from scratch.
    let clear = remove_table_script();

    let timed = |label: &str, n: usize, f: &mut dyn FnMut() -> Result<Duration>| {
        progress(format!("kernel: {label} ({n} runs)"));
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            samples.push(f()?);
        }
        Ok::<Stat, anyhow::Error>(stat(&samples))
    };

    let empty_load = timed("create an empty table", fast, &mut || {
        apply(&clear)?;
        apply(&empty_table)
    })?;
    let empty_replace = timed("replace_script of an empty ruleset", fast, &mut || {
        apply(&clear)?;
        apply(&empty_replace_script)
    })?;
    let full_load = timed("load the node's ruleset from scratch", runs, &mut || {
        apply(&clear)?;
        apply(&base_script)
    })?;
    apply(&clear)?;
    progress("kernel: one more load from scratch, untimed, for nft's peak RSS");
    let nft_peak_rss_kib = nft_load_peak_rss_kib(&base_script)?;
    let full_replace_over_itself =
        timed("replace the loaded ruleset with itself", runs, &mut || {
            apply(&base_script)
        })?;
    // The table holds the base ruleset. How sluice applies changes: through a TableState.
    let session = session_changes(input, host_netns, fast)?;
    // The table holds the base ruleset again; every change below is undone (untimed) by the
    // diff back, so each run starts from the same state.
    let change = |label: &str, (rs, diff): (&Ruleset, &str), full: bool| -> Result<Stat> {
        let back = diff_script(rs, input.base).context("a change without a way back")?;
        let script = if full {
            replace_script(rs)
        } else {
            diff.to_string()
        };
        timed(label, if full { runs } else { fast }, &mut || {
            let d = apply(&script)?;
            apply(&back)?;
            Ok(d)
        })
    };
    let add_diff_spawned = change("one-pod add as a diff, nft -f per change", input.add, false)?;
    let relabel_diff_spawned = change(
        "one-pod relabel as a diff, nft -f per change",
        input.relabel,
        false,
    )?;
    let add_replace = change("one-pod add as a full replace", input.add, true)?;
    let relabel_replace = change("one-pod relabel as a full replace", input.relabel, true)?;
    apply(&clear)?;
    let ratios = KernelRatios {
        add_spawned_over_session: add_diff_spawned.median_ms / session.add.median_ms,
        relabel_spawned_over_session: relabel_diff_spawned.median_ms / session.relabel.median_ms,
        add_replace_over_session: add_replace.median_ms / session.add.median_ms,
        relabel_replace_over_session: relabel_replace.median_ms / session.relabel.median_ms,
    };
    Ok(Kernel {
        nft_version,
        empty_load,
        empty_replace,
        full_load,
        full_replace_over_itself,
        add_diff_session: session.add,
        relabel_diff_session: session.relabel,
        session_first_diff_ms: session.first_diff_ms,
        session_nft_peak_rss_kib: session.nft_peak_rss_kib,
        add_diff_spawned,
        relabel_diff_spawned,
        add_replace,
        relabel_replace,
        ratios,
        nft_peak_rss_kib,
    })
}

fn run(args: &Args) -> Result<Report> {
    let runs = args.runs as usize;
    let config = SynthConfig {
        pods: args.pods,
        policies: args.policies,
        nodes: args.nodes,
        namespaces: args.namespaces,
        seed: args.seed,
    };
    progress(format!(
        "generating {} pods, {} policies, {} nodes, {} namespaces (seed {})",
        config.pods, config.policies, config.nodes, config.namespaces, config.seed
    ));
    let t = Instant::now();
    let cluster = SynthCluster::generate(&config)?;
    let generate_ms = ms(t.elapsed());

    let (index_build, idx) = measure(
        runs,
        "index build (namespace_info/pod_info/policy_info + apply)",
        || cluster.index(),
    )?;

    // Every node once: the total, and which node has the largest ruleset.
    progress(format!(
        "compile_node for all {} nodes (1 run)",
        cluster.nodes.len()
    ));
    let mut per_node = Vec::with_capacity(cluster.nodes.len());
    let mut largest: Option<(usize, &str)> = None;
    let mut local_counts = Vec::with_capacity(cluster.nodes.len());
    for n in &cluster.nodes {
        let t = Instant::now();
        let rs = compile_node(&idx, &n.name).ruleset;
        per_node.push(t.elapsed());
        let s = size(&rs, false);
        let weight = s.set_elements + s.map_elements + s.rules;
        if largest.is_none_or(|(w, _)| weight > w) {
            largest = Some((weight, &n.name));
        }
        local_counts.push(local_pods(&idx, &n.name).len());
    }
    let per_node_stat = stat(&per_node);
    let all_nodes = AllNodes {
        nodes: cluster.nodes.len(),
        total_ms: per_node.iter().copied().map(ms).sum(),
        per_node_median_ms: per_node_stat.median_ms,
        per_node_max_ms: per_node_stat.max_ms,
        local_pods_min: local_counts.iter().copied().min().unwrap_or(0),
        local_pods_max: local_counts.iter().copied().max().unwrap_or(0),
    };
    let node = match &args.node {
        Some(n) => {
            if cluster.node(n).is_none() {
                bail!(
                    "no node {n:?} (nodes are named like {:?})",
                    cluster.nodes.first().map(|n| n.name.as_str()).unwrap_or("")
                );
            }
            n.clone()
        }
        None => largest.map(|(_, n)| n.to_string()).context("no nodes")?,
    };
    progress(format!("measuring node {node}"));

    let (compile_one, compiled) = measure(runs, &format!("compile_node({node})"), || {
        Ok(compile_node(&idx, &node))
    })?;
    let base = compiled.ruleset;
    let (render_stat, _) = measure(runs, "render (nft text)", || Ok(render(&base)))?;
    let (ruleset_clone, _) = measure(runs, "Ruleset clone", || Ok(base.clone()))?;
    let ruleset_size = size(&base, true);

    let (after_add, what_add) = pod_added(&idx, &cluster, &node)?;
    let (add, add_rs, add_diff) = measure_change(
        runs,
        "one-pod add",
        &node,
        &idx,
        &base,
        &after_add,
        what_add,
    )?;
    drop(after_add);
    let (after_relabel, what_relabel) = pod_relabelled(&idx, &base, &node)?;
    let (relabel, relabel_rs, relabel_diff) = measure_change(
        runs,
        "one-pod relabel",
        &node,
        &idx,
        &base,
        &after_relabel,
        what_relabel,
    )?;
    drop(after_relabel);

    if let Some(dir) = &args.dump_scripts {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = [
            ("load.nft", replace_script(&base)),
            ("add.diff.nft", add_diff.clone()),
            ("add.replace.nft", replace_script(&add_rs)),
            ("relabel.diff.nft", relabel_diff.clone()),
            ("relabel.replace.nft", replace_script(&relabel_rs)),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        progress(format!("scripts written to {}", dir.display()));
    }

    let eval = eval_baseline(
        &idx,
        &node,
        args.eval_sample.max(1),
        args.seed,
        compile_one.median_ms,
    )?;
    let bench_peak_rss_kib = peak_rss_kib();

    let (kernel, kernel_skipped) = match (args.no_kernel, kernel_unavailable()) {
        (true, _) => (
            None,
            Some("--no-kernel: nft measurements skipped".to_string()),
        ),
        (false, Some(why)) => (None, Some(why)),
        (false, None) => (
            Some(kernel(&KernelInput {
                runs,
                base: &base,
                add: (&add_rs, &add_diff),
                relabel: (&relabel_rs, &relabel_diff),
            })?),
            None,
        ),
    };
    if let Some(why) = &kernel_skipped {
        progress(why);
    }

    Ok(Report {
        pods: config.pods,
        policies: config.policies,
        nodes: config.nodes,
        namespaces: config.namespaces,
        seed: config.seed,
        runs,
        policy_mix: cluster.mix.clone(),
        generate_ms,
        index_build,
        local_pods: local_pods(&idx, &node).len(),
        node,
        compile_one,
        problems: compiled.problems.len(),
        render: render_stat,
        ruleset_clone,
        size: ruleset_size,
        all_nodes,
        add,
        relabel,
        eval,
        bench_peak_rss_kib,
        kernel,
        kernel_skipped,
    })
}

fn verdict(value_ms: f64, target_ms: f64) -> String {
    if value_ms < target_ms {
        format!("MET (target < {target_ms} ms)")
    } else {
        format!("MISSED (target < {target_ms} ms)")
    }
}

fn row(what: &str, s: &Stat, note: &str) {
    println!(
        "  {what:<64} {:>10.2} {:>10.2} {:>10.2} {:>5}  {note}",
        s.median_ms, s.min_ms, s.max_ms, s.runs
    );
}

fn header(title: &str) {
    println!(
        "  {title:<64} {:>10} {:>10} {:>10} {:>5}",
        "median", "min", "max", "runs"
    );
}

/// A ratio of medians; below 1 also as "N times slower", which reads better than 0.02x.
fn ratio(x: f64) -> String {
    if x < 1.0 {
        format!("{x:.3}x (the session is {:.0}x slower)", 1.0 / x)
    } else {
        format!("{x:.1}x")
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

fn print_table(r: &Report) {
    println!(
        "sluice-bench: {} pods, {} policies, {} nodes, {} namespaces, seed {}; times in ms",
        r.pods, r.policies, r.nodes, r.namespaces, r.seed
    );
    println!(
        "measured node: {} ({} local pods; nodes have {}..{})",
        r.node, r.local_pods, r.all_nodes.local_pods_min, r.all_nodes.local_pods_max
    );
    println!();
    header("user space");
    row("index build (whole cluster)", &r.index_build, "");
    row(
        "compile_node, one node",
        &r.compile_one,
        &verdict(r.compile_one.median_ms, TARGET_COMPILE_MS),
    );
    println!(
        "  {:<64} {:>10.2} total; per node median {:.2}, max {:.2} (1 run)",
        format!("compile_node, all {} nodes", r.all_nodes.nodes),
        r.all_nodes.total_ms,
        r.all_nodes.per_node_median_ms,
        r.all_nodes.per_node_max_ms
    );
    row("render (IR -> nft text), one node", &r.render, "");
    row(
        "Ruleset clone (TableState keeps what it applied)",
        &r.ruleset_clone,
        "",
    );
    row("compile_node after the one-pod add", &r.add.compile, "");
    row("diff_script, one-pod add", &r.add.diff_script, "");
    row(
        "incremental compile after the one-pod add (agent)",
        &r.add.compile_incremental,
        "",
    );
    row(
        "diff_script, one-pod add, shared sets (agent)",
        &r.add.diff_script_shared,
        "",
    );
    row(
        "compile_node after the one-pod relabel",
        &r.relabel.compile,
        "",
    );
    row("diff_script, one-pod relabel", &r.relabel.diff_script, "");
    row(
        "incremental compile after the one-pod relabel (agent)",
        &r.relabel.compile_incremental,
        "",
    );
    row(
        "diff_script, one-pod relabel, shared sets (agent)",
        &r.relabel.diff_script_shared,
        "",
    );
    println!();
    let s = &r.size;
    println!(
        "ruleset of {}: {} sets ({} elements), {} maps ({} elements), {} chains ({} policy, {} group, 2 base), {} rules",
        r.node, s.sets, s.set_elements, s.maps, s.map_elements, s.chains, s.policy_chains, s.group_chains, s.rules
    );
    println!(
        "  nft text {} bytes; replace script {} bytes; compile problems: {}",
        s.nft_text_bytes, s.replace_script_bytes, r.problems
    );
    for (name, c) in [("one-pod add", &r.add), ("one-pod relabel", &r.relabel)] {
        println!(
            "{name}: {}\n  diff: {} commands ({} element commands), {} bytes; full replace: {} bytes",
            c.what, c.diff_commands, c.element_commands, c.diff_bytes, c.replace_script_bytes
        );
    }
    println!();
    match (&r.kernel, &r.kernel_skipped) {
        (Some(k), _) => {
            header(&format!("kernel ({})", k.nft_version));
            row("nft: create an empty table (baseline b)", &k.empty_load, "");
            row(
                "nft: replace_script of an empty ruleset",
                &k.empty_replace,
                "",
            );
            row(
                "nft: load the node's ruleset from scratch",
                &k.full_load,
                &verdict(k.full_load.median_ms, TARGET_LOAD_MS),
            );
            row(
                "nft: replace the loaded ruleset with itself",
                &k.full_replace_over_itself,
                "",
            );
            let cmds = |c: &Change| {
                format!(
                    "{} cmds{}",
                    c.diff_commands,
                    if c.deletes { ", deletes" } else { "" }
                )
            };
            for (name, c, stat) in [
                ("add", &r.add, &k.add_diff_session),
                ("relabel", &r.relabel, &k.relabel_diff_session),
            ] {
                row(
                    &format!("one-pod {name} as a diff (nft -i session; {})", cmds(c)),
                    stat,
                    &verdict(stat.median_ms, TARGET_CHANGE_MS),
                );
            }
            for (name, c, stat) in [
                ("add", &r.add, &k.add_diff_spawned),
                ("relabel", &r.relabel, &k.relabel_diff_spawned),
            ] {
                row(
                    &format!("one-pod {name} as a diff via a fresh nft -f ({})", cmds(c)),
                    stat,
                    "baseline: how diffs were applied before the session",
                );
            }
            row(
                "one-pod add as a full replace (baseline a)",
                &k.add_replace,
                "",
            );
            row(
                "one-pod relabel as a full replace (baseline a)",
                &k.relabel_replace,
                "",
            );
            println!(
                "  session rows: wall clock of TableState::sync (diff_script + nft -i round trip + \
                 Ruleset clone);\n  the first diff of a fresh TableState, which also starts nft -i, \
                 took {:.2} ms (once per agent start, not in the rows)",
                k.session_first_diff_ms
            );
            println!();
        }
        (None, Some(why)) => println!("kernel: {why}\n"),
        (None, None) => {}
    }
    println!("baselines, as ratios of medians:");
    if let Some(k) = &r.kernel {
        let (sa, sr) = (&k.add_diff_session, &k.relabel_diff_session);
        println!(
            "  diff via a fresh nft -f / diff via the nft -i session: add {:.2} / {:.2} ms = {}; relabel {:.2} / {:.2} ms = {}",
            k.add_diff_spawned.median_ms,
            sa.median_ms,
            ratio(k.ratios.add_spawned_over_session),
            k.relabel_diff_spawned.median_ms,
            sr.median_ms,
            ratio(k.ratios.relabel_spawned_over_session)
        );
        println!(
            "  (a) full replace / session diff: one-pod add {:.2} / {:.2} ms = {:.1}x; relabel {:.2} / {:.2} ms = {:.1}x",
            k.add_replace.median_ms,
            sa.median_ms,
            k.ratios.add_replace_over_session,
            k.relabel_replace.median_ms,
            sr.median_ms,
            k.ratios.relabel_replace_over_session
        );
        println!(
            "  (b) full load / empty-table load: {:.2} / {:.2} ms = {:.1}x; full load / empty replace_script: {:.2} / {:.2} ms = {:.1}x",
            k.full_load.median_ms,
            k.empty_load.median_ms,
            k.full_load.median_ms / k.empty_load.median_ms,
            k.full_load.median_ms,
            k.empty_replace.median_ms,
            k.full_load.median_ms / k.empty_replace.median_ms,
        );
        println!(
            "      one-pod diffs / empty-table load: session add {:.2}x, relabel {:.2}x; fresh nft -f add {:.2}x, relabel {:.2}x",
            sa.median_ms / k.empty_load.median_ms,
            sr.median_ms / k.empty_load.median_ms,
            k.add_diff_spawned.median_ms / k.empty_load.median_ms,
            k.relabel_diff_spawned.median_ms / k.empty_load.median_ms
        );
    } else {
        println!("  (a), (b): need the kernel part");
    }
    let e = &r.eval;
    println!(
        "  (c) reference evaluator / compile_node: {:.2} us per allowed() call x {} pairs = {:.0} ms / {:.2} ms = {:.0}x",
        e.per_call_us, e.pairs, e.scaled_ms, r.compile_one.median_ms, e.ratio_to_compile
    );
    println!(
        "      (pairs: ordered (source, destination) with a local end, {} local x {} pods with an IPv4 address;\n       one TCP-or-UDP/IPv4 port per pair, the destination's first container port; {} calls sampled, {} allowed)",
        e.local_pods, e.pods_with_ips, e.sampled_calls, e.sampled_allowed
    );
    println!();
    println!(
        "peak RSS: bench process {} (cluster objects + index + rulesets){}",
        mib(r.bench_peak_rss_kib),
        r.kernel
            .as_ref()
            .map(|k| format!(
                "; nft -f loading the full ruleset {}; nft -i session {}",
                mib(k.nft_peak_rss_kib),
                mib(k.session_nft_peak_rss_kib)
            ))
            .unwrap_or_default()
    );
    println!("targets:");
    println!(
        "  compile one node:            {:>10.2} ms  {}",
        r.compile_one.median_ms,
        verdict(r.compile_one.median_ms, TARGET_COMPILE_MS)
    );
    match &r.kernel {
        Some(k) => {
            println!(
                "  nft load from scratch:       {:>10.2} ms  {}",
                k.full_load.median_ms,
                verdict(k.full_load.median_ms, TARGET_LOAD_MS)
            );
            let worst = k
                .add_diff_session
                .median_ms
                .max(k.relabel_diff_session.median_ms);
            println!(
                "  one-pod change (sync, nft -i): {worst:>8.2} ms  {} (worse of add and relabel)",
                verdict(worst, TARGET_CHANGE_MS)
            );
        }
        None => println!("  nft load, one-pod change: not measured (no kernel part)"),
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("scale") {
        return scale_bench::main();
    }
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("sluice-bench: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_table(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
