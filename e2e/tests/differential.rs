//! The differential test: random scenarios (`sluice_e2e::gen`: random namespaces, labels, pods
//! over 2-3 dual-stack nodes, random policies from the whole NetworkPolicy v1 API, updates between
//! checkpoints) whose expected matrices are the reference evaluator's answers.
//!
//! - `generated_scenarios_check_without_a_kernel` (no root, fast): 300 seeds through
//!   `runner::check`: every cell of every probe, evaluator against the compiled rulesets
//!   (simulated), and against the expectation the generator wrote.
//! - `generated_scenarios_run_in_the_lab` (root): a fixed number of seeds on the real dataplane
//!   (network namespaces, nftables applied whole then as diffs, real connections), 500 ms per
//!   connection. Prints one line per seed; skips with a message when not root.
//!
//! A longer run is one variable away: `SLUICE_FUZZ_SEEDS=N` runs N seeds in the lab (default
//! 60) and max(N, 300) without a kernel; `SLUICE_FUZZ_FIRST=S` starts at seed S instead of 0.
//! For example: `SLUICE_FUZZ_SEEDS=500 SLUICE_FUZZ_FIRST=10000 cargo test -p sluice-e2e --test
//! differential -- --nocapture`. Outside cargo test the same is `e2e/lab fuzz --seeds N --first S`,
//! and a failing seed is rerun with `e2e/lab gen --seed S --out s.yaml && e2e/lab run s.yaml`.

use std::time::{Duration, Instant};

use sluice_e2e::gen::{generate, Size};
use sluice_e2e::runner::{self, Options, ScenarioRun};
use sluice_e2e::scenario::parse_scenario;

/// Seeds run in the lab by default: about 1.3 s each on a 2-core machine, so 1-1.5 minutes.
const LAB_SEEDS: u64 = 60;
/// Seeds checked without a kernel by default.
const CHECK_SEEDS: u64 = 300;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

fn first_seed() -> u64 {
    env_u64("SLUICE_FUZZ_FIRST").unwrap_or(0)
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

fn totals(run: &ScenarioRun) -> (usize, usize, usize) {
    run.reports.iter().fold((0, 0, 0), |(p, f, s), r| {
        (p + r.passed(), f + r.failed(), s + r.skipped_cells())
    })
}

/// A failing seed, for the message: its scenario and what went wrong.
fn explain(seed: u64, size: Size, text: &str, what: &str) -> String {
    format!(
        "seed {seed} (size {size}) failed: {what}\n\
         rerun: e2e/lab gen --seed {seed} --size {size} --out seed-{seed}.yaml && e2e/lab run seed-{seed}.yaml\n\
         ----- the scenario -----\n{text}"
    )
}

/// What went wrong in a run: warnings (the generator writes only valid objects) and failing
/// probes. Empty when all is well.
fn problems(run: &ScenarioRun) -> String {
    let mut out = String::new();
    for w in &run.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    for r in run.reports.iter().filter(|r| r.failed() > 0) {
        out.push_str(&r.render_text());
    }
    out
}

fn check_seeds(size: Size, first: u64, count: u64) -> (usize, usize, usize) {
    let (mut cells, mut allowed, mut skipped) = (0, 0, 0);
    for seed in first..first + count {
        let text = generate(seed, size);
        let scn = parse_scenario(&format!("seed-{seed}.yaml"), &text)
            .unwrap_or_else(|e| panic!("{}", explain(seed, size, &text, &e.to_string())));
        let run = runner::check(&scn)
            .unwrap_or_else(|e| panic!("{}", explain(seed, size, &text, &e.to_string())));
        let trouble = problems(&run);
        assert!(
            trouble.is_empty(),
            "{}",
            explain(seed, size, &text, &trouble)
        );
        let (p, _, s) = totals(&run);
        cells += p;
        skipped += s;
        allowed += run
            .reports
            .iter()
            .flat_map(|r| r.cells.iter())
            .filter(|c| c.expected == sluice_e2e::matrix::Mark::Allowed)
            .count();
    }
    (cells, allowed, skipped)
}

#[test]
fn generated_scenarios_check_without_a_kernel() {
    let first = first_seed();
    let count = env_u64("SLUICE_FUZZ_SEEDS").map_or(CHECK_SEEDS, |n| n.max(CHECK_SEEDS));
    let started = Instant::now();
    let (cells, allowed, _) = check_seeds(Size::Small, first, count);
    // A few large ones too: more pods and policies per scenario.
    let (large, _, _) = check_seeds(Size::Large, first, count / 10);
    println!(
        "{count} small and {} large seeds from {first}: {} cells agree ({:.0}% of the small ones allowed) in {:.1}s",
        count / 10,
        cells + large,
        100.0 * allowed as f64 / cells.max(1) as f64,
        started.elapsed().as_secs_f64()
    );
}

/// The generator is worth its name only if it reaches every feature: look for each in the text.
#[test]
fn generated_scenarios_cover_every_feature() {
    let texts: Vec<String> = (0..CHECK_SEEDS)
        .map(|seed| generate(seed, Size::Small))
        .collect();
    let all = texts.join("\n");
    let features = [
        ("matchLabels", "matchLabels:"),
        ("operator In", "operator: In\n"),
        ("operator NotIn", "operator: NotIn"),
        ("operator Exists", "operator: Exists"),
        ("operator DoesNotExist", "operator: DoesNotExist"),
        (
            "the namespace name label",
            "key: kubernetes.io/metadata.name",
        ),
        ("policyTypes given", "policyTypes:"),
        ("empty from", "from: []"),
        ("empty to", "to: []"),
        ("empty ports", "ports: []"),
        ("an empty rule", "- {}"),
        ("namespaceSelector {}", "namespaceSelector: {}"),
        ("podSelector {}", "podSelector: {}"),
        ("ipBlock", "ipBlock:"),
        ("except", "except:"),
        ("an IPv4 pod /32", "/32\n"),
        ("an IPv6 pod /128", "/128\n"),
        ("a node podCIDR", "cidr: 10.244.2.0/24"),
        ("an IPv6 podCIDR", "cidr: fd00:10:244:1::/64"),
        ("the nodes' addresses", "cidr: 198.18.0.0/24"),
        ("endPort", "endPort:"),
        ("a named port", "port: web"),
        ("an undeclared named port", "port: nope"),
        ("UDP in a policy", "protocol: UDP"),
        ("SCTP in a policy", "protocol: SCTP"),
        ("a hostNetwork pod", "hostNetwork: true"),
        ("a Succeeded pod", "phase: Succeeded"),
        ("a pod relabelled", "# update: relabel pod"),
        ("a namespace relabelled", "# update: relabel namespace"),
        ("a policy edited", "# update: edit policy"),
        ("a policy deleted", "kind: NetworkPolicy, namespace"),
        ("a pod deleted", "kind: Pod, namespace"),
        ("a pod added", "# update: add a pod"),
        ("a policy added", "# update: add a policy"),
        ("a pod finishing", "finishes (Succeeded"),
        ("a UDP probe", "  protocol: UDP\n  expect"),
        ("an SCTP probe", "  protocol: SCTP\n"),
        ("port 81 probed", "  port: 81\n"),
        ("an IPv4 probe", "  family: IPv4\n"),
        ("an IPv6 probe", "  family: IPv6\n"),
        ("explicit from", "  from: ["),
        ("explicit to", "  to: ["),
    ];
    let missing: Vec<&str> = features
        .iter()
        .filter(|(_, needle)| !all.contains(needle))
        .map(|(what, _)| *what)
        .collect();
    assert!(
        missing.is_empty(),
        "{CHECK_SEEDS} seeds never produce: {}",
        missing.join(", ")
    );
    // Several policies selecting one pod, and both allowed and denied cells, in most seeds.
    let mixed = texts
        .iter()
        .filter(|t| t.contains("  .  ") || t.contains("  .\n"))
        .filter(|t| t.contains("  X  ") || t.contains("  X\n"))
        .count();
    assert!(
        mixed * 10 >= texts.len() * 6,
        "only {mixed} of {} seeds have both allowed and denied cells",
        texts.len()
    );
    assert_eq!(generate(42, Size::Small), generate(42, Size::Small));
    assert_eq!(generate(42, Size::Large), generate(42, Size::Large));
}

#[test]
fn generated_scenarios_run_in_the_lab() {
    if !is_root() {
        eprintln!("skipping: the lab needs root (network namespaces, nftables)");
        return;
    }
    let first = first_seed();
    let count = env_u64("SLUICE_FUZZ_SEEDS").unwrap_or(LAB_SEEDS);
    let opts = Options {
        timeout: Duration::from_millis(500),
        parallelism: 256,
        progress: false,
    };
    let started = Instant::now();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for seed in first..first + count {
        let t = Instant::now();
        let text = generate(seed, Size::Small);
        let scn = parse_scenario(&format!("seed-{seed}.yaml"), &text)
            .unwrap_or_else(|e| panic!("{}", explain(seed, Size::Small, &text, &e.to_string())));
        // No second chance for a seed: a connection that got through where the evaluator says
        // it must not is never forgiven. (The runner itself retries once a connection that
        // should work but timed out, which can only turn a false X into a true `.`.)
        let (counts, trouble) = match runner::run(&scn, &opts) {
            Ok(run) => (Some(totals(&run)), problems(&run)),
            Err(e) => (None, format!("error: {e}\n")),
        };
        let (p, f, s) = counts.unwrap_or_default();
        (passed, failed, skipped) = (passed + p, failed + f, skipped + s);
        println!(
            "seed {seed}: {p} passed, {f} failed, {s} skipped ({:.1}s)",
            t.elapsed().as_secs_f64()
        );
        print!("{trouble}");
        if !trouble.is_empty() {
            failures.push(explain(seed, Size::Small, &text, &trouble));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds from {first} in the lab: {passed} cells passed, {failed} failed, {skipped} skipped (SCTP, checked on the compiled rules) in {secs:.1}s ({:.1} seeds/minute)",
        count as f64 * 60.0 / secs.max(0.001)
    );
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed; the first:\n{}",
        failures.len(),
        failures[0]
    );
}
