//! `sluice-cluster-run`: scenario files (../shared/SCENARIOS.md) through the local cluster of
//! `e2e/cluster` (see `sluice_e2e::cluster_run`). Run it as `e2e/cluster run FILE...`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use sluice_e2e::cluster_run::{self, load_cluster, stop_flag, Kubectl, Options};
use sluice_e2e::matrix::{summary_line, Report};
use sluice_e2e::runner::{json_of, print_text, totals, FileResult, RunError};
use sluice_e2e::scenario::{load_scenario, parse_duration, Family, Scenario, Step, Via};

/// Run scenario files through the local cluster (e2e/cluster up): real kube-apiserver, flanneld,
/// kube-proxy, sluice agents and the sluice-kubelet stand-in.
///
/// Objects are applied with kubectl apply, updates as applies, deletes with kubectl delete; pods
/// are created on their scenario node (names must be the cluster's: node-1, node-2, ...) with a
/// container declaring every probed port, and probed once the kubelet reports them Running.
/// Each Probe is retried as a whole until it matches or --converge passes (enforcement is
/// eventually consistent), then the last observation is reported; connections go from the
/// source pod's network namespace to the target's IPs, or with `via: service` to a ClusterIP
/// Service per target pod (made by the runner, with its EndpointSlice) through kube-proxy.
/// Scenario pod IPs cannot be honoured; ipBlocks naming one exactly are rewritten to the pod's
/// real address (a warning says so). Each file's namespaces are deleted when it ends.
///
/// Output, summary line and exit status as `e2e/lab run`: 0 every cell matched, 1 some cell did
/// not (or the cluster failed a step), 2 a scenario is invalid or the cluster is not up.
#[derive(Parser)]
#[command(name = "e2e/cluster run", version)]
struct Cli {
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// The cluster's state dir (its cluster.json says where kubectl, the kubeconfig and the
    /// nodes are).
    #[arg(
        long,
        env = "SLUICE_CLUSTER_DIR",
        default_value = "/tmp/sluice-cluster"
    )]
    cluster_dir: PathBuf,
    /// Time a connection may take before it counts as denied (a Probe's own `timeout` wins).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    timeout: Duration,
    /// How long a Probe is retried until it matches its expectation.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    converge: Duration,
    /// How long pods may take to be Running with IPs, or to be deleted.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pod_timeout: Duration,
    /// Connections tried at once.
    #[arg(long, default_value_t = 256)]
    parallelism: usize,
    /// Send every IPv4 probe through a ClusterIP Service per target pod and kube-proxy, as if
    /// each said `via: service`: the same files prove policy on the path most traffic takes.
    /// IPv6 probes stay direct (the cluster's service CIDR is IPv4 only).
    #[arg(long)]
    via_service: bool,
    /// Print machine-readable JSON instead of matrices.
    #[arg(long)]
    json: bool,
}

/// `--via-service`: every probe that may use IPv4 goes through a Service.
fn route_via_service(scn: &mut Scenario) {
    for step in &mut scn.steps {
        if let Step::Probe { spec, .. } = step {
            if spec.family != Some(Family::V6) {
                spec.via = Via::Service;
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("e2e/cluster run: probes enter pod network namespaces and need root (try sudo)");
        return ExitCode::from(1);
    }
    let cluster = match load_cluster(&cli.cluster_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("e2e/cluster run: {e}");
            return ExitCode::from(2);
        }
    };
    let kubectl = Kubectl::new(&cluster);
    if let Err(e) = kubectl.run(&["get", "--raw", "/readyz"], None) {
        eprintln!(
            "e2e/cluster run: the cluster's API server is not ready ({e:#}); run: e2e/cluster up"
        );
        return ExitCode::from(2);
    }
    let stop = match stop_flag() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("e2e/cluster run: {e:#}");
            return ExitCode::from(1);
        }
    };
    let opts = Options {
        timeout: cli.timeout,
        parallelism: cli.parallelism.max(1),
        converge: cli.converge,
        pod_timeout: cli.pod_timeout,
        progress: !cli.json,
    };
    let mut results = Vec::new();
    for (n, path) in cli.files.iter().enumerate() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let display = path.display().to_string();
        if !cli.json {
            eprintln!("[{}/{}] {display}", n + 1, cli.files.len());
        }
        let started = Instant::now();
        let outcome = load_scenario(path)
            .map_err(|e| RunError::Invalid(e.to_string()))
            .and_then(|mut scn| {
                if cli.via_service {
                    route_via_service(&mut scn);
                }
                cluster_run::run(&scn, &kubectl, &cluster, &opts, &stop)
            });
        let result = FileResult {
            path: display,
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        };
        if !cli.json {
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
    if cli.json {
        let doc = serde_json::json!({
            "files": results.iter().map(json_of).collect::<Vec<_>>(),
            "passed": passed, "failed": failed, "skipped": skipped,
            "invalid_files": invalid, "lab_errors": broken,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        if invalid + broken > 0 {
            println!("{invalid} invalid scenario file(s), {broken} cluster error(s)");
        }
        println!("{}", summary_line(passed, failed, skipped));
    }
    if invalid > 0 {
        ExitCode::from(2)
    } else if failed > 0 || broken > 0 || stop.load(std::sync::atomic::Ordering::Relaxed) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
