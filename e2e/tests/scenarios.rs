//! Every scenario file under e2e/scenarios: checked without a kernel (evaluator and compiled
//! rulesets agree with the expected matrices), and, as root, run in the lab on the real kernel.
//! Also: what the lab does with invalid scenarios and wrong expectations.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sluice_e2e::runner::{self, Options};
use sluice_e2e::scenario::load_scenario;

fn scenario_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("scenarios dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 50,
        "the 48 upstream cases, quickstart and bad input"
    );
    files
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[test]
fn every_scenario_agrees_with_the_evaluator_and_the_compiled_rules() {
    let mut failures = Vec::new();
    for path in scenario_files() {
        let scn = load_scenario(&path).expect("valid scenario");
        let run = runner::check(&scn).expect("check");
        for r in &run.reports {
            if r.failed() > 0 {
                failures.push(format!("{}\n{}", path.display(), r.render_text()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The acceptance run: all 48 upstream cases (plus quickstart and bad input) on the real kernel.
#[test]
fn every_scenario_passes_in_the_lab() {
    if !is_root() {
        eprintln!("skipped: the lab needs root");
        return;
    }
    let files = scenario_files();
    let queue = Mutex::new(files.clone());
    let results = Mutex::new(Vec::new());
    // A few scenarios at once: they spend most of their time waiting for denied probes.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some(path) = queue.lock().expect("queue").pop() else {
                    break;
                };
                let scn = load_scenario(&path).expect("valid scenario");
                let outcome = runner::run(&scn, &Options::default());
                results.lock().expect("results").push((path, outcome));
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let (mut passed, mut skipped, mut failures) = (0, 0, Vec::new());
    for (path, outcome) in &results {
        match outcome {
            Ok(run) => {
                for r in &run.reports {
                    passed += r.passed();
                    skipped += r.skipped_cells();
                    if r.failed() > 0 {
                        failures.push(format!("{}\n{}", path.display(), r.render_text()));
                    }
                }
            }
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    eprintln!(
        "{} files: {passed} cells passed, {skipped} skipped (SCTP checked on the compiled rules)",
        results.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(passed > 7000, "the upstream cases probe thousands of cells");
}

fn lab(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-lab"))
        .args(args)
        .output()
        .expect("run sluice-lab");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn invalid_scenarios_exit_2_naming_the_document_and_field() {
    let cases = [
        (
            "invalid-protocol.yaml",
            "document 2 (Probe): spec.protocol: unknown protocol \"ICMP\"",
        ),
        (
            "invalid-pod-field.yaml",
            "document 2 (Pod x/a): spec.containers[0].ports[0].containerPort:",
        ),
        (
            "invalid-unknown-pod.yaml",
            "document 3 (Probe): spec.expect: pod x/zz does not exist at this point",
        ),
    ];
    let cmd = if is_root() { "run" } else { "check" };
    for (file, message) in cases {
        let (code, text) = lab(&[cmd, &fixture(file)]);
        assert_eq!(code, 2, "{file}: {text}");
        assert!(
            text.contains(message),
            "{file}: expected {message:?} in:\n{text}"
        );
    }
}

#[test]
fn a_wrong_sctp_expectation_fails_even_without_sctp_sockets() {
    let cmd = if is_root() { "run" } else { "check" };
    let (code, text) = lab(&[cmd, &fixture("wrong-sctp-expectation.yaml")]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("x/b -> x/a: expected ., observed X"),
        "{text}"
    );
    assert!(text.contains("1 passed, 1 failed"), "{text}");
}
