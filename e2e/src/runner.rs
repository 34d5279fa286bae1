//! Runs a scenario: documents applied in order to a [`World`], every node's ruleset compiled and
//! applied (first whole, then as diffs, as the agent does) in that node's network namespace, and
//! each Probe answered by real connections between pod namespaces.
//!
//! `check` answers the same probes without a kernel, from the reference evaluator and from the
//! compiled rulesets, to validate scenario files and the compiler quickly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use sluice::compile::{compile_node, Ruleset};
use sluice::model::{Phase, PodKey};
use sluice::nft::{Nft, TableState};
use sluice::policy::allowed;
use sluice::simulate::connection_allowed;
use sluice::snapshot::{parse_object, NodeInfo, World};

use crate::matrix::{summary_line, Mark, Report};
use crate::netns::{LabNet, NodeSpec, PodSpec};
use crate::probe::{run_probes, sctp_supported, Outcome, ProbeReq, Servers};
use crate::scenario::{Family, ProbeSpec, Protocol, Scenario, Step, Via};

#[derive(Clone, Debug)]
pub struct Options {
    /// Per-connection timeout unless a Probe sets its own.
    pub timeout: Duration,
    /// Concurrent probe threads.
    pub parallelism: usize,
    /// Say on stderr what each checkpoint applies and probes.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            parallelism: 256,
            progress: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The scenario itself is wrong (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// The lab could not do its work (exit 1).
    #[error("{0:#}")]
    Lab(anyhow::Error),
}

/// The outcome of one scenario file.
#[derive(Debug, Default)]
pub struct ScenarioRun {
    pub reports: Vec<Report>,
    /// Warnings (policies applied fail-closed, compile problems), once each.
    pub warnings: Vec<String>,
}

fn invalid(scn: &Scenario, doc: usize, what: &str, msg: impl std::fmt::Display) -> RunError {
    RunError::Invalid(format!("{}: document {doc} ({what}): {msg}", scn.path))
}

/// Applies one non-probe step to the world.
fn apply_step(
    scn: &Scenario,
    world: &mut World,
    step: &Step,
    warnings: &mut Vec<String>,
) -> Result<(), RunError> {
    match step {
        Step::Object { doc, value } => {
            let what = sluice::snapshot::describe_document(value);
            let object = parse_object(value).map_err(|e| invalid(scn, *doc, &what, e))?;
            let w = world
                .apply(object)
                .map_err(|e| invalid(scn, *doc, &what, e))?;
            for w in w {
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
        }
        Step::Delete {
            doc,
            kind,
            namespace,
            name,
        } => world
            .delete(kind, namespace.as_deref(), name)
            .map_err(|e| invalid(scn, *doc, "Delete", e))?,
        Step::Probe { .. } => {}
    }
    Ok(())
}

fn running(world: &World, key: &PodKey) -> bool {
    world
        .index
        .pods
        .get(key)
        .is_some_and(|p| p.phase == Phase::Running)
}

/// Checks a probe's rows and columns against the pods that exist at this point.
fn probe_pods(
    scn: &Scenario,
    doc: usize,
    world: &World,
    spec: &ProbeSpec,
) -> Result<(Vec<PodKey>, Vec<PodKey>), RunError> {
    let parse = |name: &str| -> Result<PodKey, RunError> {
        let key: PodKey = name
            .parse()
            .map_err(|e| invalid(scn, doc, "Probe", format!("spec.expect: {e}")))?;
        if !world.index.pods.contains_key(&key) {
            return Err(invalid(
                scn,
                doc,
                "Probe",
                format!("spec.expect: pod {key} does not exist at this point"),
            ));
        }
        if !running(world, &key) {
            return Err(invalid(
                scn,
                doc,
                "Probe",
                format!("spec.expect: pod {key} is not Running, so it cannot be probed"),
            ));
        }
        Ok(key)
    };
    let rows: Vec<PodKey> = spec
        .expect
        .row_names()
        .map(parse)
        .collect::<Result<_, _>>()?;
    let cols: Vec<PodKey> = spec
        .expect
        .columns
        .iter()
        .map(|c| parse(c))
        .collect::<Result<_, _>>()?;
    let pods = &world.index.pods;
    if spec.from.is_none() {
        let want: BTreeSet<&PodKey> = pods.keys().filter(|k| running(world, k)).collect();
        let have: BTreeSet<&PodKey> = rows.iter().collect();
        if want != have {
            let missing: Vec<String> = want.difference(&have).map(|k| k.to_string()).collect();
            return Err(invalid(
                scn,
                doc,
                "Probe",
                format!(
                "spec.expect: without spec.from the rows must be every Running pod; missing: {}",
                missing.join(", ")
            ),
            ));
        }
    }
    if spec.to.is_none() {
        let want: BTreeSet<&PodKey> = pods
            .iter()
            .filter(|(k, p)| running(world, k) && !p.host_network)
            .map(|(k, _)| k)
            .collect();
        let have: BTreeSet<&PodKey> = cols.iter().collect();
        if want != have {
            let diff: Vec<String> = want
                .symmetric_difference(&have)
                .map(|k| k.to_string())
                .collect();
            return Err(invalid(scn, doc, "Probe", format!(
                "spec.expect: without spec.to the columns must be every Running pod that is not hostNetwork; differs in: {}",
                diff.join(", ")
            )));
        }
    }
    Ok((rows, cols))
}

/// Families probed for a target: the probe's, or every family the target has.
fn families_for(world: &World, spec: &ProbeSpec, to: &PodKey) -> Vec<Family> {
    match spec.family {
        Some(f) => vec![f],
        None => world
            .index
            .pods
            .get(to)
            .map(|p| p.families())
            .unwrap_or_default(),
    }
}

/// Validates the whole scenario without a kernel; returns every node ever mentioned.
pub fn validate(scn: &Scenario) -> Result<BTreeMap<String, NodeInfo>, RunError> {
    let mut world = World::default();
    let mut nodes = BTreeMap::new();
    let mut warnings = Vec::new();
    for step in &scn.steps {
        apply_step(scn, &mut world, step, &mut warnings)?;
        if let Step::Probe { doc, spec } = step {
            probe_pods(scn, *doc, &world, spec)?;
        }
        for (name, node) in &world.nodes {
            nodes.entry(name.clone()).or_insert_with(|| node.clone());
        }
    }
    Ok(nodes)
}

fn title(doc: usize, spec: &ProbeSpec) -> String {
    format!("document {doc}: {}", spec.describe())
}

/// Fills a report from a decision function (evaluator or simulated ruleset).
/// Fills a report from a decision function (evaluator or simulated ruleset). A decision that
/// cannot be trusted (`Err`, e.g. evaluator and compiled rules disagree) fails its cell whatever
/// the expectation, with the reason as detail.
fn fill_report(
    world: &World,
    spec: &ProbeSpec,
    report: &mut Report,
    rows: &[PodKey],
    cols: &[PodKey],
    decide: impl Fn(&PodKey, &PodKey, Family) -> Result<bool, String>,
    detail: &str,
) {
    for r in rows {
        for c in cols {
            let expected = spec.expect.get(&r.to_string(), &c.to_string());
            if r == c || expected == Some(Mark::NotProbed) {
                continue;
            }
            let families = families_for(world, spec, c);
            let decided: Vec<(Family, Result<bool, String>)> =
                families.iter().map(|f| (*f, decide(r, c, *f))).collect();
            let problems: Vec<String> = decided
                .iter()
                .filter_map(|(f, d)| d.as_ref().err().map(|e| format!("{f}: {e}")))
                .collect();
            let (fams, why) = if problems.is_empty() {
                let fams = decided
                    .into_iter()
                    .map(|(f, d)| (f, d.unwrap_or(false)))
                    .collect();
                (fams, detail.to_string())
            } else {
                // Observe the opposite of what was expected, so the cell fails.
                let opposite = expected != Some(Mark::Allowed);
                let fams = families.iter().map(|f| (*f, opposite)).collect();
                (fams, problems.join(", "))
            };
            report.observe(&r.to_string(), &c.to_string(), fams, Some(why));
        }
    }
}

fn compile_all(
    world: &World,
    nodes: &[String],
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Ruleset> {
    nodes
        .iter()
        .map(|n| {
            let compiled = compile_node(&world.index, n);
            for p in compiled.problems {
                let w = format!("{}: {}", p.object, p.message);
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            (n.clone(), compiled.ruleset)
        })
        .collect()
}

/// Answers every probe without a kernel: a cell passes only if both the reference evaluator and
/// the compiled rulesets (simulated) give the expected mark.
pub fn check(scn: &Scenario) -> Result<ScenarioRun, RunError> {
    let nodes: Vec<String> = validate(scn)?.into_keys().collect();
    let mut world = World::default();
    let mut run = ScenarioRun::default();
    for step in &scn.steps {
        apply_step(scn, &mut world, step, &mut run.warnings)?;
        let Step::Probe { doc, spec } = step else {
            continue;
        };
        let (rows, cols) = probe_pods(scn, *doc, &world, spec)?;
        let rulesets = compile_all(&world, &nodes, &mut run.warnings);
        let (p, port) = (spec.protocol, spec.port);
        let mut report = Report::from_expected(title(*doc, spec), &spec.expect);
        fill_report(
            &world,
            spec,
            &mut report,
            &rows,
            &cols,
            |s, d, f| {
                let eval = allowed(&world.index, s, d, p, port, f)
                    .map_err(|e| e.to_string())?
                    .allowed();
                let compiled = connection_allowed(&world.index, &rulesets, s, d, p, port, f)
                    .ok_or("no address to simulate")?;
                // Disagreement is a compiler bug: it fails the cell whatever was expected.
                if eval == compiled {
                    Ok(eval)
                } else {
                    Err(format!(
                        "the evaluator says {}, the compiled rules say {}",
                        if eval { "allowed" } else { "denied" },
                        if compiled { "allowed" } else { "denied" }
                    ))
                }
            },
            "evaluator and compiled ruleset",
        );
        run.reports.push(report);
    }
    Ok(run)
}

/// The lab: real namespaces, real nftables, real connections.
struct Lab {
    net: LabNet,
    tables: BTreeMap<String, TableState>,
    servers: Servers,
    pods: BTreeMap<String, PodSpec>,
}

impl Lab {
    fn new(nodes: &BTreeMap<String, NodeInfo>) -> anyhow::Result<Lab> {
        let specs: Vec<NodeSpec> = nodes
            .values()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                index: n.number,
                pod_cidrs: n.pod_cidrs.clone(),
                host_ips: n.addresses.clone(),
            })
            .collect();
        let net = LabNet::create(&specs).context("building the lab network")?;
        let mut tables = BTreeMap::new();
        for n in nodes.keys() {
            let ns = net.node_netns(n).context("node namespace")?.to_string();
            tables.insert(n.clone(), TableState::new(Nft::in_netns(ns)));
        }
        Ok(Lab {
            net,
            tables,
            servers: Servers::new(),
            pods: BTreeMap::new(),
        })
    }

    /// Bring kernel and namespaces to the world: rules first (as the CNI gate does), then pods.
    /// Returns what was applied on each node, e.g. `node-1: diff of 4 commands`.
    fn sync(
        &mut self,
        rulesets: &BTreeMap<String, Ruleset>,
        world: &World,
    ) -> anyhow::Result<Vec<String>> {
        let mut applied = Vec::new();
        for (node, rs) in rulesets {
            if let Some(table) = self.tables.get_mut(node) {
                let a = table
                    .sync(rs)
                    .with_context(|| format!("applying the ruleset of {node}"))?;
                applied.push(match (a.full, a.commands) {
                    (true, n) => format!("{node}: table loaded ({n} lines)"),
                    (false, 0) => format!("{node}: unchanged"),
                    (false, n) => format!("{node}: diff of {n} commands"),
                });
            }
        }
        let desired: BTreeMap<String, PodSpec> = world
            .index
            .pods
            .values()
            .filter(|p| p.phase == Phase::Running)
            .filter_map(|p| {
                Some((
                    p.key.to_string(),
                    PodSpec {
                        key: p.key.to_string(),
                        node: p.node.clone()?,
                        ips: p.ips.clone(),
                        host_network: p.host_network,
                    },
                ))
            })
            .collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, spec)| desired.get(*k) != Some(spec))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.net
                .remove_pod(&k)
                .with_context(|| format!("removing pod {k}"))?;
            self.pods.remove(&k);
        }
        let new: Vec<PodSpec> = desired
            .values()
            .filter(|s| !self.pods.contains_key(&s.key))
            .cloned()
            .collect();
        self.net.add_pods(&new).context("adding pods")?;
        for s in new {
            self.pods.insert(s.key.clone(), s);
        }
        Ok(applied)
    }
}

/// One connection to try: which probe of the group and which cell it answers.
struct Attempt {
    probe: usize,
    from: PodKey,
    to: PodKey,
    family: Family,
    req: ProbeReq,
}

/// What the attempts of one cell found: per family, connected or why not.
type CellResults = Vec<(Family, bool, String)>;

/// Runs a scenario in the lab.
pub fn run(scn: &Scenario, opts: &Options) -> Result<ScenarioRun, RunError> {
    let all_nodes = validate(scn)?;
    let node_names: Vec<String> = all_nodes.keys().cloned().collect();
    let mut lab = Lab::new(&all_nodes).map_err(RunError::Lab)?;
    let mut world = World::default();
    let mut run = ScenarioRun::default();
    let mut i = 0;
    while i < scn.steps.len() {
        if !matches!(scn.steps[i], Step::Probe { .. }) {
            apply_step(scn, &mut world, &scn.steps[i], &mut run.warnings)?;
            i += 1;
            continue;
        }
        // Consecutive probes see the same state: program once, probe them all in one wave.
        let mut group = Vec::new();
        while let Some(Step::Probe { doc, spec }) = scn.steps.get(i) {
            group.push((*doc, spec));
            i += 1;
        }
        let rulesets = compile_all(&world, &node_names, &mut run.warnings);
        let applied = lab.sync(&rulesets, &world).map_err(RunError::Lab)?;
        if opts.progress {
            let docs: Vec<String> = group.iter().map(|(d, _)| d.to_string()).collect();
            eprintln!(
                "  checkpoint at document {}: {}",
                docs.join(", "),
                applied.join("; ")
            );
        }
        run.reports
            .extend(probe_group(scn, &mut lab, &world, &rulesets, &group, opts)?);
    }
    Ok(run)
}

fn probe_group(
    scn: &Scenario,
    lab: &mut Lab,
    world: &World,
    rulesets: &BTreeMap<String, Ruleset>,
    group: &[(usize, &ProbeSpec)],
    opts: &Options,
) -> Result<Vec<Report>, RunError> {
    let mut reports = Vec::new();
    // Requests grouped by timeout so each wave has one deadline.
    let mut waves: BTreeMap<Duration, Vec<Attempt>> = BTreeMap::new();
    for (idx, (doc, spec)) in group.iter().enumerate() {
        let (rows, cols) = probe_pods(scn, *doc, world, spec)?;
        let mut report = Report::from_expected(title(*doc, spec), &spec.expect);
        if spec.via == Via::Service {
            report
                .skip("via: service needs kube-proxy; the lab has none (run it with the cluster)");
            reports.push(report);
            continue;
        }
        if spec.protocol == Protocol::Sctp && !sctp_supported() {
            // No SCTP sockets: check the compiled rulesets instead; any disagreement fails.
            let (p, port) = (spec.protocol, spec.port);
            fill_report(
                world,
                spec,
                &mut report,
                &rows,
                &cols,
                // A family the pods lack cannot connect, as in a real probe.
                |s, d, f| {
                    Ok(connection_allowed(&world.index, rulesets, s, d, p, port, f)
                        .unwrap_or(false))
                },
                "compiled ruleset (no SCTP sockets in this kernel)",
            );
            if report.failed() == 0 {
                let n = report.passed();
                report.skip(format!(
                    "this kernel has no SCTP sockets; the compiled rulesets were checked instead and agree on all {n} cells"
                ));
            }
            reports.push(report);
            continue;
        }
        let timeout = spec.timeout.unwrap_or(opts.timeout);
        let mut planned: Vec<(PodKey, PodKey, Family)> = Vec::new();
        for r in &rows {
            for c in &cols {
                if r == c
                    || spec.expect.get(&r.to_string(), &c.to_string()) == Some(Mark::NotProbed)
                {
                    continue;
                }
                for f in families_for(world, spec, c) {
                    planned.push((r.clone(), c.clone(), f));
                }
            }
        }
        for c in &cols {
            let ns = lab
                .net
                .pod_netns(&c.to_string())
                .ok_or_else(|| RunError::Lab(anyhow::anyhow!("pod {c} has no namespace")))?
                .to_string();
            lab.servers
                .ensure(&ns, spec.port, spec.protocol)
                .map_err(|e| RunError::Lab(e.context(format!("starting a server in {c}"))))?;
        }
        for (r, c, f) in planned {
            let from_netns = lab
                .net
                .pod_netns(&r.to_string())
                .ok_or_else(|| RunError::Lab(anyhow::anyhow!("pod {r} has no namespace")))?
                .to_string();
            let Some(ip) = world.index.pods.get(&c).and_then(|p| p.ip(f)) else {
                continue;
            };
            let req = ProbeReq {
                from_netns,
                to: SocketAddr::new(ip, spec.port),
                proto: spec.protocol,
            };
            waves.entry(timeout).or_default().push(Attempt {
                probe: idx,
                from: r,
                to: c,
                family: f,
                req,
            });
        }
        reports.push(report);
    }
    // Map group index -> report index (skipped ones were pushed too, in order).
    let mut results: BTreeMap<(usize, PodKey, PodKey), CellResults> = BTreeMap::new();
    for (timeout, items) in waves {
        let reqs: Vec<ProbeReq> = items.iter().map(|a| a.req.clone()).collect();
        if opts.progress {
            eprintln!("  probing {} connections (timeout {timeout:?})", reqs.len());
        }
        let mut outcomes = run_probes(&reqs, timeout, opts.parallelism);
        // A connection that should have worked but timed out is tried once more, alone in a
        // smaller wave and with 4x the timeout: on a loaded machine a first SYN, or a UDP
        // server's answer, can wait past the timeout (CI saw UDP cells time out twice at 500 ms
        // while other work loaded both cores). A connection that got through is never retried,
        // and a dropped one stays dropped however long we wait, so this can only turn a false X
        // into a true `.`.
        let retry: Vec<usize> = items
            .iter()
            .zip(&outcomes)
            .enumerate()
            .filter(|(_, (a, o))| {
                matches!(o, Outcome::Failed(why) if why == "timeout")
                    && group[a.probe]
                        .1
                        .expect
                        .get(&a.from.to_string(), &a.to.to_string())
                        == Some(Mark::Allowed)
            })
            .map(|(i, _)| i)
            .collect();
        if !retry.is_empty() {
            if opts.progress {
                eprintln!("  retrying {} connections that timed out", retry.len());
            }
            let again: Vec<ProbeReq> = retry.iter().map(|i| reqs[*i].clone()).collect();
            for (i, o) in retry
                .iter()
                .zip(run_probes(&again, timeout * 4, opts.parallelism))
            {
                outcomes[*i] = match o {
                    Outcome::Connected => Outcome::Connected,
                    Outcome::Failed(why) => Outcome::Failed(format!("{why}, twice")),
                };
            }
        }
        for (a, outcome) in items.into_iter().zip(outcomes) {
            let (ok, why) = match outcome {
                Outcome::Connected => (true, String::new()),
                Outcome::Failed(why) => (false, why),
            };
            results
                .entry((a.probe, a.from, a.to))
                .or_default()
                .push((a.family, ok, why));
        }
    }
    for ((idx, r, c), fams) in results {
        let detail: Vec<String> = fams
            .iter()
            .filter(|(_, ok, _)| !ok)
            .map(|(f, _, why)| format!("{f}: {why}"))
            .collect();
        let families = fams.into_iter().map(|(f, ok, _)| (f, ok)).collect();
        reports[idx].observe(
            &r.to_string(),
            &c.to_string(),
            families,
            (!detail.is_empty()).then(|| detail.join(", ")),
        );
    }
    Ok(reports)
}

// ---------------------------------------------------------------------------------------------
// Reporting a scenario file's run: the same for the lab (`e2e/lab`) and the cluster (`e2e/cluster run`).

pub struct FileResult {
    pub path: String,
    pub outcome: Result<ScenarioRun, RunError>,
    pub seconds: f64,
}

pub fn print_text(r: &FileResult) {
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

pub fn totals(reports: &[Report]) -> (usize, usize, usize) {
    reports.iter().fold((0, 0, 0), |(p, f, s), r| {
        (p + r.passed(), f + r.failed(), s + r.skipped_cells())
    })
}

pub fn json_of(r: &FileResult) -> serde_json::Value {
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
