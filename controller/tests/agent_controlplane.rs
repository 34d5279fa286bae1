//! The agent against a real control plane (`e2e/controlplane`: etcd + kube-apiserver), running
//! as node `node-1` inside its own network namespace with a token of `deploy/rbac.yaml`'s
//! ServiceAccount (least privilege, checked by every test). Objects are created through the API
//! (pod status patched as a kubelet would) or, when the API would refuse them, written straight
//! into etcd; the table in that namespace, `/readyz`, `/metrics` and the agent's log are asserted.
//!
//! Root only; skipped with a message when not root or when the control plane cannot come up.
//! Each test has its own control plane, namespace and agents, all removed even when it fails.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{block, canonical, chain, metric, table_in, Fixture, NODE};

/// Runs only when re-executed by a test inside a network namespace (see `common`).
#[test]
#[ignore = "helper: run by the tests inside the node's netns"]
fn netns_helper() {
    common::helper_main();
}

fn in_ingress_map(table: &str, ip: &str) -> bool {
    block(table, "map ingress_v4").contains(ip)
}

/// The lines of the log that contain every one of `words`.
fn log_lines<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

#[test]
fn agent_programs_the_node_from_the_api_server() {
    let Some(fx) = Fixture::new() else { return };
    let cp = &fx.cp;

    // Objects first, so the agent's initial lists already hold them.
    cp.namespace("x", "team: a");
    cp.pod("x", "a", "db", NODE, "10.244.1.2");
    cp.pod("x", "b", "db", NODE, "10.244.1.3");

    let mut agent = fx.start_agent("agent");

    // A policy isolating the db pods for ingress, allowing nothing.
    cp.deny_ingress("x", "deny-db", "db");
    fx.wait_for(
        "the policy chain and both pods in ingress_v4",
        &agent,
        |t| {
            t.contains("chain in.x.deny-db")
                && in_ingress_map(t, "10.244.1.2")
                && in_ingress_map(t, "10.244.1.3")
        },
    );

    // Ready once the lists are in and the first sync applied.
    fx.wait_ready(&agent);
    let metrics = fx.metrics();
    // Both pods are isolated for ingress, and at least one sync has been applied.
    assert_eq!(
        metric(
            &metrics,
            "sluice_isolated_pods",
            &[("direction", "ingress")]
        ),
        Some(2.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "sluice_syncs_total", &[("result", "ok")]).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    // Each isolated pod's kernel drop counter is read into a series of its own (1 s here);
    // nothing was sent, so nothing was dropped.
    fx.wait_metrics("a drop series per isolated pod", &agent, |m| {
        ["a", "b"].iter().all(|pod| {
            metric(
                m,
                "sluice_dropped_packets_total",
                &[("namespace", "x"), ("pod", pod), ("direction", "ingress")],
            ) == Some(0.0)
        })
    });

    // A relabel takes b out of the policy: its IP leaves the dispatch map, a's stays.
    cp.kubectl(
        &["-n", "x", "label", "pod", "b", "role=web", "--overwrite"],
        None,
    );
    fx.wait_for("b's IP out of ingress_v4", &agent, |t| {
        in_ingress_map(t, "10.244.1.2") && !in_ingress_map(t, "10.244.1.3")
    });
    // b is no longer isolated: its drop series goes away, a's stays.
    fx.wait_metrics("b's drop series removed", &agent, |m| {
        let series = |pod| {
            metric(
                m,
                "sluice_dropped_packets_total",
                &[("namespace", "x"), ("pod", pod), ("direction", "ingress")],
            )
        };
        series("a").is_some() && series("b").is_none()
    });

    // Drift: someone deletes the table; the next resync (2 s here) restores it whole.
    let ok = fx
        .ns
        .exec(&["nft", "delete", "table", "inet", "sluice"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "nft delete table");
    fx.wait_for("the table restored by the resync", &agent, |t| {
        t.contains("chain in.x.deny-db")
            && in_ingress_map(t, "10.244.1.2")
            && !in_ingress_map(t, "10.244.1.3")
    });

    // A namespace relabel moves a remote pod's IP out of a namespaceSelector peer set.
    cp.namespace("clients", "team: b");
    cp.pod("clients", "c", "client", "node-2", "10.244.2.2");
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {namespace: x, name: allow-from-b}\n\
         spec: {podSelector: {matchLabels: {role: db}}, policyTypes: [Ingress],\n\
         ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]}\n",
    );
    fx.wait_for("c's IP in the allow-from-b peer set", &agent, |t| {
        t.contains("chain in.x.allow-from-b") && t.contains("10.244.2.2")
    });
    cp.kubectl(
        &["label", "namespace", "clients", "team=c", "--overwrite"],
        None,
    );
    fx.wait_for("c's IP out of the peer set", &agent, |t| {
        t.contains("chain in.x.allow-from-b") && !t.contains("10.244.2.2")
    });

    // Deleting the policies removes their chains and un-isolates a.
    cp.kubectl(
        &["-n", "x", "delete", "networkpolicy", "allow-from-b"],
        None,
    );
    cp.kubectl(&["-n", "x", "delete", "networkpolicy", "deny-db"], None);
    fx.wait_for("the policy chains gone", &agent, |t| {
        !t.is_empty()
            && !t.contains("chain in.x.deny-db")
            && !t.contains("chain in.x.allow-from-b")
            && !t.contains("10.244.1.2")
    });

    // SIGTERM: the agent exits and the rules stay.
    agent.terminate();
    assert!(
        fx.table().contains("chain ingress"),
        "the table must stay after SIGTERM"
    );
}

/// A Pod as etcd holds it (JSON; the API server reads JSON and protobuf alike), no
/// resourceVersion (etcd's revision is the version).
fn stored_pod(ns: &str, name: &str, role: &str, ip: &str, uid: u32) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": ns,
            "name": name,
            "uid": format!("00000000-0000-4000-8000-{uid:012x}"),
            "creationTimestamp": "2020-01-01T00:00:00Z",
            "labels": {"role": role},
        },
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": "c", "image": "example.invalid/server"}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
    .to_string()
}

#[test]
fn agent_skips_and_reports_invalid_objects_from_storage() {
    let Some(fx) = Fixture::new() else { return };
    let cp = &fx.cp;

    cp.namespace("legacy", "team: a");
    cp.pod("legacy", "good", "db", NODE, "10.244.1.20");
    cp.pod("legacy", "web", "web", NODE, "10.244.1.21");
    cp.deny_ingress("legacy", "deny-db", "db");
    // Written before validation tightened (so: straight into etcd): a db pod whose IP has a
    // leading zero, and a policy, the only one selecting web, whose ipBlock cidr has one.
    cp.etcd_put(
        "/registry/pods/legacy/broken",
        &stored_pod("legacy", "broken", "db", "010.244.1.9", 1),
    );
    let policy = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "namespace": "legacy",
            "name": "bad-cidr",
            "uid": "00000000-0000-4000-8000-000000000002",
            "creationTimestamp": "2020-01-01T00:00:00Z",
        },
        "spec": {
            "podSelector": {"matchLabels": {"role": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "010.0.0.0/24"}}]}],
        },
    });
    cp.etcd_put(
        "/registry/networkpolicies/legacy/bad-cidr",
        &policy.to_string(),
    );
    // The API server serves both as stored.
    let get = |kind: &str, name: &str, path: &str| {
        cp.kubectl(
            &[
                "-n",
                "legacy",
                "get",
                kind,
                name,
                "-o",
                &format!("jsonpath={path}"),
            ],
            None,
        )
    };
    assert_eq!(
        get("pod", "broken", "{.status.podIPs[0].ip}"),
        "010.244.1.9"
    );
    assert_eq!(
        get(
            "networkpolicy",
            "bad-cidr",
            "{.spec.ingress[0].from[0].ipBlock.cidr}"
        ),
        "010.0.0.0/24"
    );

    let mut agent = fx.start_agent("agent");
    fx.wait_for("good isolated by deny-db, web by bad-cidr", &agent, |t| {
        t.contains("chain in.legacy.deny-db")
            && t.contains("chain in.legacy.bad-cidr")
            && in_ingress_map(t, "10.244.1.20")
            && in_ingress_map(t, "10.244.1.21")
    });
    fx.wait_ready(&agent);
    let table = fx.table();
    // The bad pod is nowhere, neither as written nor read the octal way (8.244.1.9).
    assert!(
        !table.contains("10.244.1.9") && !table.contains("8.244.1.9"),
        "the broken pod's IP must not be in the table:\n{table}"
    );
    // Fail closed: the broken peer allows nothing (the policy's chain accepts nothing and its
    // cidr is in no set), while the policy still isolates web (above: web in ingress_v4).
    let bad_chain = chain(&table, "in.legacy.bad-cidr");
    assert!(
        !bad_chain.is_empty() && !bad_chain.contains("accept"),
        "the broken rule must allow nothing:\n{table}"
    );
    assert!(
        !table.contains("10.0.0.0") && !table.contains("8.0.0.0"),
        "the broken cidr must not be in the table:\n{table}"
    );

    // Reported: the log names each object and the field.
    let log = agent.log_text();
    assert!(
        !log_lines(&log, &["legacy/broken", "status.podIPs[0].ip"]).is_empty(),
        "the log must name the broken pod and its field:\n{log}"
    );
    assert!(
        !log_lines(
            &log,
            &["legacy/bad-cidr", "spec.ingress[0].from[0].ipBlock.cidr"]
        )
        .is_empty(),
        "the log must name the broken policy and its field:\n{log}"
    );
    let metrics = fx.metrics();
    assert!(
        metric(
            &metrics,
            "sluice_objects_skipped_total",
            &[("resource", "pods")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "sluice_objects_skipped_total{{resource=\"pods\"}}:\n{metrics}"
    );
    assert_eq!(
        metric(&metrics, "sluice_policies_with_errors", &[]),
        Some(1.0),
        "sluice_policies_with_errors:\n{metrics}"
    );

    // A watched pod that turns bad in storage is dropped: its last good IP leaves the table.
    cp.pod("legacy", "later", "db", NODE, "10.244.1.22");
    fx.wait_for("later in ingress_v4", &agent, |t| {
        in_ingress_map(t, "10.244.1.22")
    });
    let mut later: serde_json::Value = serde_json::from_str(
        &cp.kubectl(&["-n", "legacy", "get", "pod", "later", "-o", "json"], None),
    )
    .expect("pod JSON");
    later["status"]["podIP"] = "010.244.1.22".into();
    later["status"]["podIPs"] = serde_json::json!([{"ip": "010.244.1.22"}]);
    if let Some(meta) = later["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    cp.etcd_put("/registry/pods/legacy/later", &later.to_string());
    fx.wait_for("later out of the table, good still in", &agent, |t| {
        !t.contains("10.244.1.22") && in_ingress_map(t, "10.244.1.20")
    });
    let log = agent.log_text();
    assert!(
        !log_lines(&log, &["legacy/later", "status.podIPs[0].ip"]).is_empty(),
        "the log must name the pod that turned bad:\n{log}"
    );
    let metrics = fx.metrics();
    assert!(
        metric(
            &metrics,
            "sluice_objects_skipped_total",
            &[("resource", "pods")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
    assert!(agent.is_running(), "the agent must keep running");
    assert_eq!(fx.http_get("/readyz").0, "200");
}

#[test]
fn agent_keeps_the_rules_through_an_api_outage() {
    let Some(fx) = Fixture::new() else { return };
    let cp = &fx.cp;

    cp.namespace("o", "team: a");
    cp.pod("o", "a", "db", NODE, "10.244.1.30");
    cp.pod("o", "b", "db", NODE, "10.244.1.31");
    cp.deny_ingress("o", "deny-db", "db");
    let mut agent = fx.start_agent("agent");
    fx.wait_for("both pods isolated", &agent, |t| {
        t.contains("chain in.o.deny-db")
            && in_ingress_map(t, "10.244.1.30")
            && in_ingress_map(t, "10.244.1.31")
    });
    fx.wait_ready(&agent);
    let before = canonical(&fx.table());
    let metrics = fx.metrics();
    let full_syncs = |m: &str| {
        metric(
            m,
            "sluice_syncs_total",
            &[("kind", "full"), ("result", "ok")],
        )
        .unwrap_or(0.0)
    };
    let restarts = |m: &str, resource: &str| {
        metric(m, "sluice_watch_restarts_total", &[("resource", resource)]).unwrap_or(0.0)
    };
    let restarts_before: Vec<f64> = ["pods", "namespaces", "networkpolicies"]
        .iter()
        .map(|r| restarts(&metrics, r))
        .collect();

    // The outage: every read of the table is what it was and the agent lives, until every watch
    // has failed and two resyncs have replaced the table whole, without the API, while we read.
    cp.apiserver_stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut full_at_first_read = None;
    loop {
        assert!(
            agent.is_running(),
            "the agent died during the outage:\n{}",
            agent.log_text()
        );
        let now = canonical(&fx.table());
        assert!(
            now == before,
            "the table changed during the outage\n--- before:\n{before}\n--- now:\n{now}"
        );
        let metrics = fx.metrics();
        let full = full_syncs(&metrics);
        let full_at_first_read = *full_at_first_read.get_or_insert(full);
        let noticed = ["pods", "namespaces", "networkpolicies"]
            .iter()
            .zip(&restarts_before)
            .all(|(r, before)| restarts(&metrics, r) > *before);
        if noticed && full >= full_at_first_read + 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not notice the outage (watch restarts) or no resync ran:\n{metrics}\n--- agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Back: a change made now converges (after the watches' backoff).
    cp.apiserver_start();
    cp.kubectl(
        &["-n", "o", "label", "pod", "b", "role=web", "--overwrite"],
        None,
    );
    fx.wait_for_within(
        Duration::from_secs(60),
        "b's IP out of ingress_v4 after the outage",
        &agent,
        |t| in_ingress_map(t, "10.244.1.30") && !in_ingress_map(t, "10.244.1.31"),
    );
    assert!(agent.is_running(), "the agent must keep running");
    fx.wait_ready(&agent);
}

#[test]
fn agent_restart_leaves_no_gap_in_the_rules() {
    let Some(fx) = Fixture::new() else { return };
    let cp = &fx.cp;

    cp.namespace("r", "team: a");
    cp.pod("r", "a", "db", NODE, "10.244.1.40");
    cp.pod("r", "b", "db", NODE, "10.244.1.41");
    cp.deny_ingress("r", "deny-db", "db");
    let mut first = fx.start_agent("agent-1");
    let enforced = |t: &str| {
        t.contains("chain in.r.deny-db")
            && in_ingress_map(t, "10.244.1.40")
            && in_ingress_map(t, "10.244.1.41")
    };
    fx.wait_for("both pods isolated", &first, enforced);
    fx.wait_ready(&first);

    // From here on, every read of the table must show the policy and both pods.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let poller = std::thread::spawn({
        let stop = stop.clone();
        let reads = reads.clone();
        let netns = fx.ns.name().to_string();
        move || {
            let mut bad = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let table = table_in(&netns);
                reads.fetch_add(1, Ordering::AcqRel);
                if !enforced(&table) {
                    bad.push(table);
                }
            }
            bad
        }
    });

    first.terminate();
    let reads_at_restart = reads.load(Ordering::Acquire);
    let second = fx.start_agent("agent-2");
    fx.wait_ready(&second);
    // ... and until one resync after that (the first sync is full too, so two).
    fx.wait_metrics("a resync after the first sync", &second, |m| {
        metric(
            m,
            "sluice_syncs_total",
            &[("kind", "full"), ("result", "ok")],
        )
        .unwrap_or(0.0)
            >= 2.0
    });
    stop.store(true, Ordering::Release);
    let bad = poller.join().expect("poller");
    let total = reads.load(Ordering::Acquire);
    assert!(
        bad.is_empty(),
        "{} of {total} reads of the table lacked the policy or a pod; the first:\n{}\n--- old agent log:\n{}\n--- new agent log:\n{}",
        bad.len(),
        bad[0],
        first.log_text(),
        second.log_text()
    );
    assert!(
        total > reads_at_restart,
        "the table was not read while the new agent started"
    );

    // The new agent's first sync replaced the table whole (not a diff against nothing).
    let log = second.log_text();
    let first_sync = log
        .lines()
        .find(|l| l.contains("synced"))
        .unwrap_or_else(|| panic!("no sync in the new agent's log:\n{log}"));
    assert!(
        first_sync.contains("kind=\"full\""),
        "the new agent's first sync must be full: {first_sync}"
    );
}

/// The chart's DaemonSet as an object (no controller manager runs here, so it makes no pods).
const DAEMONSET: &str = "apiVersion: apps/v1\nkind: DaemonSet\n\
    metadata: {namespace: kube-system, name: sluice}\nspec:\n  selector: {matchLabels: {app: sluice}}\n  \
    template:\n    metadata: {labels: {app: sluice}}\n    spec: {containers: [{name: agent, image: sluice}]}\n";

const FLANNEL: &str = r#"{"name": "cbr0", "cniVersion": "0.3.1", "plugins": [{"type": "flannel", "delegate": {"isDefaultGateway": true}}]}
"#;

/// `sluice install-cni` on temp CNI dirs (a flannel conflist in them), with the agent's token.
struct InstallCni {
    process: common::Process,
    root: std::path::PathBuf,
}

impl InstallCni {
    fn start(fx: &Fixture, name: &str, extra: &[&str]) -> InstallCni {
        let root = fx.cp.dir.join(name);
        for d in ["bin", "net.d"] {
            std::fs::create_dir_all(root.join(d)).expect("CNI dir");
        }
        // install-cni copies the plugin's bytes, it never runs them
        std::fs::write(root.join("sluice-cni"), b"plugin bytes").expect("plugin");
        std::fs::write(root.join("net.d/10-flannel.conflist"), FLANNEL).expect("flannel");
        let log = std::fs::File::create(root.join("log")).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(root.join("bin"))
            .arg("--cni-conf-dir")
            .arg(root.join("net.d"))
            .arg("--plugin-binary")
            .arg(root.join("sluice-cni"))
            .arg("--kubeconfig")
            .arg(&fx.agent_kubeconfig)
            .args(["--interval", "100ms"])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("sluice install-cni");
        InstallCni {
            process: common::Process(child),
            root,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.root.join("log")).unwrap_or_default()
    }

    fn wait_log(&mut self, what: &str) {
        let deadline = Instant::now() + common::CONVERGE;
        while !self.log_text().contains(what) {
            let exited = self.process.0.try_wait().expect("wait");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "install-cni ({exited:?}): no {what:?} in its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn terminate(&mut self) {
        let pid = self.process.0.id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM install-cni");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.process.0.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "install-cni: {status}\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "install-cni did not exit on SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (our conflist, sluice-cni) still there; flannel's conflist must be as it was.
    fn left(&self) -> (bool, bool) {
        assert_eq!(
            std::fs::read_to_string(self.root.join("net.d/10-flannel.conflist"))
                .expect("flannel's conflist"),
            FLANNEL,
            "flannel's conflist is as it was"
        );
        (
            self.root.join("net.d/05-sluice.conflist").exists(),
            self.root.join("bin/sluice-cni").exists(),
        )
    }
}

fn tables(fx: &Fixture) -> String {
    let out = fx
        .ns
        .exec(&["nft", "list", "tables"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `uninstall.cleanupOnDelete`: `helm uninstall` deletes the DaemonSet, then its pods stop.
/// The agent and install-cni watch their DaemonSet; a stop after its deletion removes the
/// tables and the chained conflist (flannel's stays), a stop while it exists keeps both, and a
/// DaemonSet never seen never cleans up.
#[test]
fn a_stop_after_the_daemonset_is_deleted_cleans_the_node_up() {
    let Some(fx) = Fixture::new() else { return };
    let cp = &fx.cp;
    cp.apply(DAEMONSET);
    let ds = ["--daemonset", "kube-system/sluice"];

    // A restart or an upgrade: the DaemonSet is there, everything stays.
    let mut agent = fx.start_agent_with("agent-1", &ds);
    let mut cni = InstallCni::start(&fx, "cni-1", &ds);
    fx.wait_ready(&agent);
    cni.wait_log("wrote the chained conflist");
    for log in [agent.log_text(), cni.log_text()] {
        assert!(log.contains("watching the DaemonSet"), "{log}");
    }
    agent.terminate();
    cni.terminate();
    assert!(
        tables(&fx).contains("table inet sluice"),
        "a stop with the DaemonSet there keeps the rules:\n{}",
        agent.log_text()
    );
    assert_eq!(cni.left(), (true, true), "{}", cni.log_text());

    // The DaemonSet is deleted, then the pods stop: both clean up.
    let mut agent = fx.start_agent_with("agent-2", &ds);
    let mut cni = InstallCni::start(&fx, "cni-2", &ds);
    fx.wait_ready(&agent);
    cni.wait_log("watching the DaemonSet");
    cp.kubectl(
        &["delete", "daemonset", "-n", "kube-system", "sluice"],
        None,
    );
    let seen = "the DaemonSet is deleted (uninstall)";
    fx.wait_for("the agent sees the deletion", &agent, |_| {
        agent.log_text().contains(seen)
    });
    cni.wait_log(seen);
    agent.terminate();
    cni.terminate();
    let left = tables(&fx);
    assert!(
        !left.contains("sluice"),
        "both of sluice's tables are removed: {left}\n{}",
        agent.log_text()
    );
    assert_eq!(cni.left(), (false, false), "{}", cni.log_text());

    // A DaemonSet never seen (here: gone before the start): the stop keeps everything.
    let mut agent = fx.start_agent_with("agent-3", &ds);
    let mut cni = InstallCni::start(&fx, "cni-3", &ds);
    fx.wait_ready(&agent);
    cni.wait_log("the DaemonSet does not exist");
    agent.terminate();
    cni.terminate();
    assert!(tables(&fx).contains("table inet sluice"));
    assert_eq!(cni.left(), (true, true));
    for log in [agent.log_text(), cni.log_text()] {
        assert!(log.contains("the DaemonSet does not exist"), "{log}");
        assert!(log.contains("the DaemonSet was never seen"), "{log}");
    }

    // A name the RBAC does not grant: the watch fails (and says so), the stop keeps everything.
    cp.apply(&DAEMONSET.replace("name: sluice}", "name: other}"));
    let other = ["--daemonset", "kube-system/other"];
    let mut cni = InstallCni::start(&fx, "cni-4", &other);
    cni.wait_log("watching the DaemonSet failed");
    cni.terminate();
    assert_eq!(cni.left(), (true, true));
    let log = cni.log_text();
    assert!(
        log.contains("forbidden") && log.contains("the DaemonSet was never seen"),
        "{log}"
    );
}
