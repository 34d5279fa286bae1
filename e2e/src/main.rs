//! `sluice-lab`: scenario files (../shared/SCENARIOS.md) against the real kernel, in network
//! namespaces on this machine. Run it through `e2e/lab`, which builds it first.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use sluice_e2e::matrix::{summary_line, Report};
use sluice_e2e::runner::{self, Options, RunError, ScenarioRun};
use sluice_e2e::scenario::{load_scenario, parse_duration, Scenario};

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
}

struct FileResult {
    path: String,
    outcome: Result<ScenarioRun, RunError>,
    seconds: f64,
}

fn print_text(r: &FileResult) {
    println!("=== {} ({:.1}s)", r.path, r.seconds);
    match &r.outcome {
        Ok(run) => {
            for w in &run.warnings {
                println!("warning: {w}");
            }
            for report in &run.reports {
                print!("{}", report.render_text());
            }
            let (p, f, s) = totals(&run.reports);
            println!("{}: {}", r.path, summary_line(p, f, s));
        }
        Err(e) => println!("error: {e}"),
    }
    println!();
}

fn totals(reports: &[Report]) -> (usize, usize, usize) {
    reports.iter().fold((0, 0, 0), |(p, f, s), r| {
        (p + r.passed(), f + r.failed(), s + r.skipped_cells())
    })
}

fn json_of(r: &FileResult) -> serde_json::Value {
    match &r.outcome {
        Ok(run) => serde_json::json!({
            "file": r.path,
            "seconds": r.seconds,
            "warnings": run.warnings,
            "probes": run.reports.iter().map(Report::to_json).collect::<Vec<_>>(),
        }),
        Err(e) => serde_json::json!({
            "file": r.path,
            "seconds": r.seconds,
            "error": e.to_string(),
            "invalid": matches!(e, RunError::Invalid(_)),
        }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (files, json, lab) = match &cli.command {
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
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("e2e/lab: the lab creates network namespaces and needs root (try sudo)");
            return ExitCode::from(1);
        }
        if let Err(e) = sluice_e2e::netns::install_signal_cleanup() {
            eprintln!("e2e/lab: {e:#}");
            return ExitCode::from(1);
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
