//! `sluice-lab`: scenario files (../shared/SCENARIOS.md) against the real kernel, in network
//! namespaces on this machine. Run it through `e2e/lab`, which builds it first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use sluice_e2e::gen::{generate, Size};
use sluice_e2e::matrix::{summary_line, Report};
use sluice_e2e::runner::{self, json_of, print_text, totals, FileResult, Options, RunError};
use sluice_e2e::scenario::{load_scenario, parse_duration, parse_scenario, Scenario};

/// The sluice lab: NetworkPolicy scenarios on the real kernel.
///
/// Each node is a network namespace with a cni0 bridge and veth pairs, as flannel's bridge plugin
/// makes them, routed to the other nodes as flannel host-gw does; each pod is a namespace of its
/// own. sluice compiles every node's ruleset and applies it there with nft (the first time whole,
/// then as diffs, as the agent does); each Probe connects for real between pods and compares with
/// the expected matrix. Needs root. Everything the lab creates is removed when it ends, also on
/// failure or Ctrl-C.
///
/// Exit status: 0 every cell matched, 1 some cell did not (or the lab failed), 2 a scenario is
/// invalid.
#[derive(Parser)]
#[command(name = "e2e/lab", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenario files in the lab and compare every probe with its expected matrix.
    ///
    /// Example: e2e/lab run e2e/scenarios/upstream/*.yaml
    Run {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Time a connection may take before it counts as denied (a Probe's own `timeout`
        /// wins), e.g. 500ms or 2s.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        /// Connections tried at once.
        #[arg(long, default_value_t = 256)]
        parallelism: usize,
        /// Print machine-readable JSON instead of matrices.
        #[arg(long)]
        json: bool,
    },
    /// Check scenario files without a kernel: every expected matrix against the reference
    /// evaluator and against the compiled rulesets (simulated). Fast; no root needed.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print one random differential scenario (expected matrices from the reference evaluator).
    ///
    /// A random cluster, random policies and updates between checkpoints; every expected matrix
    /// is the reference evaluator's answer. The same seed always gives the same file.
    ///
    /// Example: e2e/lab gen --seed 17 --out seed-17.yaml && e2e/lab run seed-17.yaml
    Gen {
        #[arg(long)]
        seed: u64,
        /// small (CI: 2-3 nodes, 4-8 pods, 1-5 policies) or large.
        #[arg(long, default_value = "small")]
        size: Size,
        /// Write the scenario to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The differential test: generated scenarios of many seeds, each run in the lab.
    ///
    /// Generates the scenarios of seeds FIRST..FIRST+N and runs each in the lab (or, with
    /// --check-only, against the compiled rulesets without a kernel). One line per seed, then
    /// `N passed, N failed` (cells); exit 1 on any failure.
    ///
    /// Example: e2e/lab fuzz --seeds 200 --first 1000 --save-failures /tmp/failed
    Fuzz {
        /// How many seeds.
        #[arg(long)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// small (CI: 2-3 nodes, 4-8 pods, 1-5 policies) or large.
        #[arg(long, default_value = "small")]
        size: Size,
        /// Time a connection may take before it counts as denied.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        timeout: Duration,
        /// Connections tried at once.
        #[arg(long, default_value_t = 256)]
        parallelism: usize,
        /// Write each failing seed's scenario here as seed-N.yaml (rerun with `e2e/lab run`).
        #[arg(long, value_name = "DIR")]
        save_failures: Option<PathBuf>,
        /// No kernel: check every cell against the evaluator and the simulated compiled rulesets.
        #[arg(long)]
        check_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (files, json, lab) = match &cli.command {
        Command::Gen { seed, size, out } => return gen_command(*seed, *size, out.as_deref()),
        Command::Fuzz {
            seeds,
            first,
            size,
            timeout,
            parallelism,
            save_failures,
            check_only,
        } => {
            let lab = (!check_only).then(|| Options {
                timeout: *timeout,
                parallelism: (*parallelism).max(1),
                // One line per seed is the progress here.
                progress: false,
            });
            return fuzz_command(*first, *seeds, *size, lab, save_failures.as_deref());
        }
        Command::Run {
            files,
            timeout,
            parallelism,
            json,
        } => (
            files.clone(),
            *json,
            Some(Options {
                timeout: *timeout,
                parallelism: (*parallelism).max(1),
                progress: !*json,
            }),
        ),
        Command::Check { files, json } => (files.clone(), *json, None),
    };
    if lab.is_some() {
        if let Err(code) = prepare_lab() {
            return code;
        }
    }
    let mut results = Vec::new();
    for (n, path) in files.iter().enumerate() {
        let display = path.display().to_string();
        if !json && lab.is_some() {
            eprintln!("[{}/{}] {display}", n + 1, files.len());
        }
        let started = Instant::now();
        let outcome = load_scenario(path)
            .map_err(|e| RunError::Invalid(e.to_string()))
            .and_then(|scn: Scenario| match &lab {
                Some(opts) => runner::run(&scn, opts),
                None => runner::check(&scn),
            });
        let result = FileResult {
            path: display,
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        };
        if !json {
            print_text(&result);
        }
        results.push(result);
    }
    let all: Vec<Report> = results
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok())
        .flat_map(|run| run.reports.iter().cloned())
        .collect();
    let (passed, failed, skipped) = totals(&all);
    let invalid = results
        .iter()
        .filter(|r| matches!(r.outcome, Err(RunError::Invalid(_))))
        .count();
    let broken = results
        .iter()
        .filter(|r| matches!(r.outcome, Err(RunError::Lab(_))))
        .count();
    if json {
        let doc = serde_json::json!({
            "files": results.iter().map(json_of).collect::<Vec<_>>(),
            "passed": passed, "failed": failed, "skipped": skipped,
            "invalid_files": invalid, "lab_errors": broken,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        if invalid + broken > 0 {
            println!("{invalid} invalid scenario file(s), {broken} lab error(s)");
        }
        println!("{}", summary_line(passed, failed, skipped));
    }
    if invalid > 0 {
        ExitCode::from(2)
    } else if failed > 0 || broken > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Root, and cleanup of the lab on Ctrl-C.
fn prepare_lab() -> Result<(), ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("e2e/lab: the lab creates network namespaces and needs root (try sudo)");
        return Err(ExitCode::from(1));
    }
    if let Err(e) = sluice_e2e::netns::install_signal_cleanup() {
        eprintln!("e2e/lab: {e:#}");
        return Err(ExitCode::from(1));
    }
    Ok(())
}

fn gen_command(seed: u64, size: Size, out: Option<&Path>) -> ExitCode {
    let text = generate(seed, size);
    match out {
        None => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Some(path) => match std::fs::write(path, text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("e2e/lab: cannot write {}: {e}", path.display());
                ExitCode::from(1)
            }
        },
    }
}

/// What one seed came to.
struct SeedResult {
    passed: usize,
    failed: usize,
    skipped: usize,
    /// Why the seed failed besides cells (invalid scenario, lab error, warnings, a panic).
    problems: Vec<String>,
    /// The failing probes, rendered.
    failures: Vec<String>,
}

impl SeedResult {
    fn bad(&self) -> bool {
        self.failed > 0 || !self.problems.is_empty()
    }

    fn print_details(&self) {
        for p in &self.problems {
            println!("  {p}");
        }
        for f in &self.failures {
            for l in f.lines() {
                println!("  {l}");
            }
        }
    }
}

fn run_seed(text: &str, name: &str, lab: Option<&Options>) -> SeedResult {
    let mut result = SeedResult {
        passed: 0,
        failed: 0,
        skipped: 0,
        problems: Vec::new(),
        failures: Vec::new(),
    };
    let outcome = parse_scenario(name, text)
        .map_err(|e| RunError::Invalid(e.to_string()))
        .and_then(|scn| match lab {
            Some(opts) => runner::run(&scn, opts),
            None => runner::check(&scn),
        });
    match outcome {
        Ok(run) => {
            let (p, f, s) = totals(&run.reports);
            (result.passed, result.failed, result.skipped) = (p, f, s);
            // The generator writes only valid objects: a warning means sluice refused one.
            result
                .problems
                .extend(run.warnings.iter().map(|w| format!("warning: {w}")));
            result.failures = run
                .reports
                .iter()
                .filter(|r| r.failed() > 0)
                .map(Report::render_text)
                .collect();
        }
        Err(e) => result.problems.push(format!("error: {e}")),
    }
    result
}

fn fuzz_command(
    first: u64,
    count: u64,
    size: Size,
    lab: Option<Options>,
    save: Option<&Path>,
) -> ExitCode {
    if lab.is_some() {
        if let Err(code) = prepare_lab() {
            return code;
        }
    }
    if let Some(dir) = save {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("e2e/lab: cannot create {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    }
    let mode = if lab.is_some() { "lab" } else { "check only" };
    eprintln!(
        "fuzz: seeds {first}..{} (size {size}, {mode})",
        first.saturating_add(count)
    );
    let started = Instant::now();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut bad_seeds = Vec::new();
    for (n, seed) in (first..first.saturating_add(count)).enumerate() {
        eprintln!("[{}/{count}] seed {seed}", n + 1);
        let t = Instant::now();
        let name = match size {
            Size::Small => format!("seed-{seed}.yaml"),
            other => format!("seed-{seed}-{other}.yaml"),
        };
        let (text, result) = match std::panic::catch_unwind(|| generate(seed, size)) {
            Ok(text) => {
                let result = run_seed(&text, &name, lab.as_ref());
                (Some(text), result)
            }
            Err(panic) => (
                None,
                SeedResult {
                    passed: 0,
                    failed: 0,
                    skipped: 0,
                    problems: vec![format!(
                        "error: the generator panicked (a generator bug): {}",
                        panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("?")
                    )],
                    failures: Vec::new(),
                },
            ),
        };
        passed += result.passed;
        failed += result.failed;
        skipped += result.skipped;
        let mut line = format!(
            "seed {seed}: {} ({:.1}s)",
            summary_line(result.passed, result.failed, result.skipped),
            t.elapsed().as_secs_f64()
        );
        let bad = result.bad();
        if bad {
            bad_seeds.push(seed);
        }
        if bad {
            if let (Some(dir), Some(text)) = (save, &text) {
                let path = dir.join(&name);
                match std::fs::write(&path, text) {
                    Ok(()) => line.push_str(&format!(" -> {}", path.display())),
                    Err(e) => line.push_str(&format!(" (cannot save {}: {e})", path.display())),
                }
            }
        }
        println!("{line}");
        if bad {
            result.print_details();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz: {count} seeds in {secs:.1}s ({:.1} seeds/minute)",
        count as f64 * 60.0 / secs.max(0.001)
    );
    if !bad_seeds.is_empty() {
        let list: Vec<String> = bad_seeds.iter().map(u64::to_string).collect();
        println!(
            "{} of {count} seeds failed: {}",
            bad_seeds.len(),
            list.join(", ")
        );
        if save.is_none() {
            println!(
                "(rerun one: e2e/lab gen --seed N --size {size} --out seed-N.yaml && e2e/lab run seed-N.yaml)"
            );
        }
    }
    println!("{}", summary_line(passed, failed, skipped));
    if bad_seeds.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
