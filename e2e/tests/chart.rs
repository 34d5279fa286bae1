//! charts/sluice, validated with the real helm (`e2e/helm`, helm.sh/helm/v3 from the Go module
//! proxy) and a real API server (`e2e/controlplane`):
//!
//! - `helm lint --strict` with the default values and with each `fixtures/chart-values-*.yaml`;
//! - `helm template` with the defaults and with non-default values, and what the rendered objects
//!   must say (hostNetwork, capabilities, seccomp, probes, host paths, RBAC verbs, annotations,
//!   the flags each value becomes);
//! - `values.schema.json` rejects a misspelt key and a wrong value;
//! - every value in the schema is used by a template and every `.Values.x` a template uses is in
//!   the schema (and in values.yaml);
//! - `deploy/rbac.yaml` (used by the agent's tests, which run without helm) is the chart's RBAC
//!   rendered (`e2e/helm rbac`);
//! - the rendered manifests pass `kubectl apply --dry-run=server` against a real kube-apiserver
//!   (with the prometheus-operator's own PodMonitor CRD installed, `e2e/helm podmonitor-crd`);
//! - the Dockerfile builds what the chart runs (no engine here: read, not built).
//!
//! Skipped with a message when helm (or, for the dry run, the control plane) is not built;
//! `SLUICE_STRICT=1` makes that a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const RELEASE: &str = "sluice";
const NAMESPACE: &str = "kube-system";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/sluice")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("e2e/tests/fixtures").join(name)
}

fn strict() -> bool {
    std::env::var("SLUICE_STRICT").as_deref() == Ok("1")
}

fn skip(why: &str) {
    if strict() {
        panic!("SLUICE_STRICT=1: {why}");
    }
    eprintln!("skipped: {why}");
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// helm from `e2e/helm path`; `None` (after saying why) when it is not built.
fn helm() -> Option<PathBuf> {
    let out = Command::new(repo_root().join("e2e/helm"))
        .arg("path")
        .output()
        .expect("e2e/helm");
    if !out.status.success() {
        skip(&format!(
            "helm is not built (run: e2e/helm build): {}",
            text(&out).trim()
        ));
        return None;
    }
    Some(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// Every file `fixtures/chart-values-*.yaml`.
fn value_fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("e2e/tests/fixtures"))
        .expect("fixtures dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("chart-values-") && n.ends_with(".yaml"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures/chart-values-*.yaml");
    files
}

/// `helm template` with the values files and `--set`s given.
fn template(helm: &Path, values: &[&Path], sets: &[&str]) -> Output {
    let mut cmd = Command::new(helm);
    cmd.args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE]);
    for v in values {
        cmd.arg("--values").arg(v);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().expect("helm template")
}

/// The rendered objects, as JSON.
fn render(helm: &Path, values: &[&Path]) -> (String, Vec<Value>) {
    let out = template(helm, values, &[]);
    assert!(out.status.success(), "helm template: {}", text(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).to_string();
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let value = <Value as serde::Deserialize>::deserialize(doc).expect("rendered YAML");
        if !value.is_null() {
            objects.push(value);
        }
    }
    (yaml, objects)
}

fn kinds(objects: &[Value]) -> BTreeMap<String, Vec<&Value>> {
    let mut map: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for o in objects {
        map.entry(o["kind"].as_str().expect("kind").to_string())
            .or_default()
            .push(o);
    }
    map
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}: {found:?}");
    found[0]
}

fn container<'a>(ds: &'a Value, name: &str) -> &'a Value {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_string())
        .collect()
}

fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {}", c["name"]))
}

fn host_paths(ds: &Value) -> BTreeMap<String, String> {
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("name").to_string(),
                v["hostPath"]["path"]
                    .as_str()
                    .expect("hostPath")
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn chart_lints_strict() {
    let Some(helm) = helm() else { return };
    let mut runs: Vec<Vec<PathBuf>> = vec![vec![]];
    runs.extend(value_fixtures().into_iter().map(|f| vec![f]));
    for values in runs {
        let mut cmd = Command::new(&helm);
        cmd.args(["lint", "--strict", "--namespace", NAMESPACE])
            .arg(chart_dir());
        for v in &values {
            cmd.arg("--values").arg(v);
        }
        let out = cmd.output().expect("helm lint");
        assert!(
            out.status.success(),
            "helm lint --strict {values:?}: {}",
            text(&out)
        );
        assert!(text(&out).contains("0 chart(s) failed"), "{}", text(&out));
    }
}

#[test]
fn default_values_render_the_daemonset_and_least_privilege_rbac() {
    let Some(helm) = helm() else { return };
    let (yaml, objects) = render(&helm, &[]);
    let by_kind = kinds(&objects);
    assert_eq!(
        by_kind.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ],
        "the default objects (no PodMonitor, no dashboard)"
    );
    assert!(!yaml.contains("cluster-admin"), "cluster-admin in: {yaml}");

    // RBAC: list/watch of pods, namespaces, networkpolicies; nothing else; bound to the SA
    let role = one(&objects, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in rule["apiGroups"].as_array().expect("apiGroups") {
            for res in rule["resources"].as_array().expect("resources") {
                for verb in rule["verbs"].as_array().expect("verbs") {
                    granted.insert(format!(
                        "{}/{}:{}",
                        group.as_str().unwrap(),
                        res.as_str().unwrap(),
                        verb.as_str().unwrap()
                    ));
                }
            }
        }
    }
    let want: BTreeSet<String> = [
        "/pods:list",
        "/pods:watch",
        "/namespaces:list",
        "/namespaces:watch",
        "networking.k8s.io/networkpolicies:list",
        "networking.k8s.io/networkpolicies:watch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(granted, want);
    let sa = one(&objects, "ServiceAccount");
    let binding = one(&objects, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    assert_eq!(sa["metadata"]["namespace"], NAMESPACE);

    // uninstall.cleanupOnDelete: get/list/watch of this release's DaemonSet, by name, nothing else
    let role = one(&objects, "Role");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        role["rules"],
        serde_json::json!([{
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": ["sluice"],
            "verbs": ["get", "list", "watch"]
        }])
    );
    let binding = one(&objects, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], NAMESPACE);
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    // the DaemonSet
    let ds = one(&objects, "DaemonSet");
    let spec = &ds["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}]),
        "tolerates every taint"
    );
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9763");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let names: Vec<&str> = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["agent", "install-cni"]);
    assert!(pod["initContainers"].is_null(), "install-cni is long-lived");

    let agent = container(ds, "agent");
    assert_eq!(agent["image"], "ghcr.io/sluice-project/sluice:0.1.0");
    assert_eq!(agent["command"], serde_json::json!(["sluice"]));
    assert_eq!(
        args(agent),
        [
            "agent",
            "--cni-socket=/run/sluice/cni.sock",
            "--resync=5m",
            "--daemonset=kube-system/sluice"
        ]
    );
    assert_eq!(
        env(agent, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(env(agent, "SLUICE_LISTEN")["value"], "0.0.0.0:9763");
    assert_eq!(env(agent, "RUST_LOG")["value"], "info");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["ports"][0]["containerPort"], 9763);
    let sc = &agent["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["capabilities"]["add"], serde_json::json!(["NET_ADMIN"]));
    assert_eq!(agent["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(agent["resources"]["requests"]["memory"], "128Mi");

    let cni = container(ds, "install-cni");
    assert_eq!(
        args(cni),
        [
            "install-cni",
            "--cni-bin-dir=/host/opt/cni/bin",
            "--cni-conf-dir=/host/etc/cni/net.d",
            "--agent-socket=/run/sluice/cni.sock",
            "--timeout=10s",
            "--fail-mode=closed",
            "--daemonset=kube-system/sluice"
        ]
    );
    let sc = &cni["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(
        sc["capabilities"]["add"].is_null(),
        "install-cni needs no capability"
    );
    assert!(cni["resources"]["limits"]["memory"].is_string());

    assert_eq!(
        host_paths(ds),
        [
            ("cni-bin", "/opt/cni/bin"),
            ("cni-conf", "/etc/cni/net.d"),
            ("sluice-run", "/run/sluice")
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    );
}

#[test]
fn non_default_values_reach_the_objects() {
    let Some(helm) = helm() else { return };
    let custom = fixture("chart-values-custom.yaml");
    let (_, objects) = render(&helm, &[&custom]);
    let by_kind = kinds(&objects);
    assert!(by_kind.contains_key("PodMonitor"), "{:?}", by_kind.keys());
    // uninstall.cleanupOnDelete off: no Role, no --daemonset
    assert!(!by_kind.contains_key("Role"), "{:?}", by_kind.keys());
    assert!(!by_kind.contains_key("RoleBinding"), "{:?}", by_kind.keys());
    assert!(by_kind.contains_key("ConfigMap"), "{:?}", by_kind.keys());
    let ds = one(&objects, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "sluice-agent-sa");
    assert_eq!(
        one(&objects, "ServiceAccount")["metadata"]["name"],
        "sluice-agent-sa"
    );
    assert_eq!(
        one(&objects, "ClusterRoleBinding")["subjects"][0]["name"],
        "sluice-agent-sa"
    );
    assert_eq!(pod["nodeSelector"]["node-role.example.com/workers"], "true");
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "registry-example");
    let meta = &ds["spec"]["template"]["metadata"];
    assert!(meta["annotations"]["prometheus.io/scrape"].is_null());
    assert_eq!(meta["annotations"]["example.com/owner"], "network-team");
    assert_eq!(meta["labels"]["example.com/tier"], "node");

    let agent = container(ds, "agent");
    assert_eq!(agent["image"], "registry.example.com/net/sluice:0.1.0-rc1");
    assert_eq!(agent["imagePullPolicy"], "Always");
    assert_eq!(
        args(agent),
        [
            "agent",
            "--cni-socket=/var/run/sluice-agent/cni.sock",
            "--resync=10m",
            "--cleanup-on-exit"
        ]
    );
    assert_eq!(env(agent, "SLUICE_LISTEN")["value"], "0.0.0.0:19763");
    assert_eq!(env(agent, "RUST_LOG")["value"], "info,sluice=debug");
    assert_eq!(agent["ports"][0]["containerPort"], 19763);
    assert_eq!(agent["resources"]["limits"]["memory"], "1536Mi");
    let cni = container(ds, "install-cni");
    assert_eq!(
        args(cni),
        [
            "install-cni",
            "--cni-bin-dir=/host/opt/cni/bin",
            "--cni-conf-dir=/host/etc/cni/net.d",
            "--agent-socket=/var/run/sluice-agent/cni.sock",
            "--timeout=3s",
            "--fail-mode=open",
            "--flannel-conflist=10-canal.conflist",
            "--uninstall-on-exit"
        ]
    );
    assert_eq!(cni["resources"]["limits"]["memory"], "32Mi");
    assert_eq!(
        host_paths(ds),
        [
            ("cni-bin", "/var/lib/cni/bin"),
            ("cni-conf", "/var/lib/cni/net.d"),
            ("sluice-run", "/var/run/sluice-agent")
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    );

    let monitor = one(&objects, "PodMonitor");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");

    // the dashboard: valid JSON whose every sluice_* series is one the agent exports
    let cm = one(&objects, "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(cm["data"]["sluice.json"].as_str().expect("sluice.json"))
            .expect("the dashboard is JSON");
    let exported = exported_series();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for series in series_in(expr) {
                assert!(
                    exported.contains(&series),
                    "panel {:?} uses {series}, which the agent does not export ({exported:?})",
                    panel["title"]
                );
                used.insert(series);
            }
        }
    }
    for needed in [
        "sluice_sync_duration_seconds_bucket",
        "sluice_programming_latency_seconds_bucket",
        "sluice_dropped_packets_total",
        "sluice_ruleset_objects",
    ] {
        assert!(used.contains(needed), "the dashboard has no {needed} panel");
    }

    // a digest replaces the tag
    let (_, objects) = render(&helm, &[&fixture("chart-values-digest.yaml")]);
    let agent = container(one(&objects, "DaemonSet"), "agent");
    assert_eq!(
        agent["image"],
        "ghcr.io/sluice-project/sluice@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
}

/// The series the agent exports: controller/src/metrics.rs's registered names (registry prefix
/// `sluice`), with `_total` for counters and `_bucket`/`_sum`/`_count` for histograms.
fn exported_series() -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo_root().join("controller/src/metrics.rs"))
        .expect("controller/src/metrics.rs");
    // the struct's fields say which kind each metric is; register() calls give the names
    let mut series = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find("registry.register(") {
        rest = &rest[i + "registry.register(".len()..];
        let start = rest.find('"').expect("name") + 1;
        let end = start + rest[start..].find('"').expect("name end");
        let name = &rest[start..end];
        let close = rest.find(");").expect("register end");
        let call = &rest[..close];
        let variable = call
            .rsplit(',')
            .find(|p| !p.trim().is_empty())
            .expect("metric")
            .trim()
            .trim_end_matches(".clone()")
            .to_string();
        let decl = src
            .find(&format!("let {variable} = "))
            .or_else(|| src.find(&format!("let {variable}: ")))
            .map(|d| &src[d..d + src[d..].find(';').unwrap_or(0)])
            .unwrap_or("");
        let base = format!("sluice_{name}");
        if decl.contains("Histogram") {
            for s in ["_bucket", "_sum", "_count"] {
                series.insert(format!("{base}{s}"));
            }
        } else if decl.contains("Counter") {
            series.insert(format!("{base}_total"));
        } else {
            series.insert(base);
        }
    }
    assert!(series.len() > 10, "read too few metrics: {series:?}");
    series
}

/// `sluice_*` names in a PromQL expression.
fn series_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("sluice_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_schema_rejects_typos_and_bad_values() {
    let Some(helm) = helm() else { return };
    for (set, complaint) in [
        ("metricPort=9000", "metricPort"),
        ("cni.failmode=open", "failmode"),
        ("image.tagg=x", "tagg"),
        ("uninstall.cleanup=true", "cleanup"),
        ("agent.resources.limit.memory=1Gi", "limit"),
        ("cni.failMode=opne", "failMode"),
        ("cni.timeout=10", "timeout"),
        // the plugin takes 1ms to 1h; the agent and Prometheus take no zero interval
        ("cni.timeout=0s", "timeout"),
        ("cni.timeout=61m", "timeout"),
        ("cni.timeout=3601s", "timeout"),
        ("agent.resync=0s", "resync"),
        ("prometheus.podMonitor.interval=0s", "interval"),
        ("metricsPort=0", "metricsPort"),
        ("cni.confDir=etc/cni", "confDir"),
    ] {
        let out = template(&helm, &[], &[set]);
        assert!(
            !out.status.success(),
            "--set {set} was accepted:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("schema") && err.contains(complaint),
            "--set {set}: the error does not name {complaint}: {err}"
        );
    }
}

/// The leaf paths of the schema: properties whose value has no `properties` of its own (maps
/// such as nodeSelector and resources are used whole).
fn schema_leaves(schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(props) = schema["properties"].as_object() {
        if props.is_empty() || schema["type"] != "object" {
            out.insert(prefix.to_string());
        }
        for (k, v) in props {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v["properties"].is_object() && !is_free_form(v) {
                schema_leaves(v, &path, out);
            } else {
                out.insert(path);
            }
        }
    }
}

/// `resources`: a fixed shape (requests/limits), but used whole by `toYaml`.
fn is_free_form(v: &Value) -> bool {
    v["description"]
        .as_str()
        .is_some_and(|d| d.starts_with("Container resources"))
}

/// The leaf paths of values.yaml (maps of strings and lists count as leaves).
fn value_leaves(v: &serde_yaml::Value, prefix: &str, schema: &Value, out: &mut BTreeSet<String>) {
    match v {
        serde_yaml::Value::Mapping(m)
            if schema["properties"].is_object() && !is_free_form(schema) =>
        {
            for (k, v) in m {
                let k = k.as_str().expect("key").to_string();
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                value_leaves(v, &path, &schema["properties"][&k], out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

/// `.Values.a.b` paths in the templates.
fn template_paths() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(chart_dir().join("templates")).expect("templates") {
        let path = entry.expect("entry").path();
        let src = std::fs::read_to_string(&path).expect("template");
        let mut rest = src.as_str();
        while let Some(i) = rest.find(".Values.") {
            let tail = &rest[i + ".Values.".len()..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].trim_end_matches('.').to_string());
            rest = &tail[end..];
        }
    }
    out
}

#[test]
fn every_schema_value_is_used_and_every_used_value_is_in_the_schema() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).expect("schema"),
    )
    .expect("values.schema.json is JSON");
    let mut leaves = BTreeSet::new();
    schema_leaves(&schema, "", &mut leaves);
    let used = template_paths();
    assert!(!used.is_empty());

    // every schema leaf is used by a template: the path itself, or a parent used whole
    for leaf in &leaves {
        let is_used = used.iter().any(|u| {
            u == leaf || leaf.starts_with(&format!("{u}.")) || u.starts_with(&format!("{leaf}."))
        });
        assert!(
            is_used,
            "values.schema.json has {leaf}, which no template uses"
        );
    }
    // every path a template uses is in the schema
    for u in &used {
        let mut node = &schema;
        for part in u.split('.') {
            node = &node["properties"][part];
            assert!(
                node.is_object(),
                "a template uses .Values.{u}, which values.schema.json does not have"
            );
        }
    }
    // values.yaml has a default for every leaf, and nothing else
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml");
    let mut defaults = BTreeSet::new();
    value_leaves(&values, "", &schema, &mut defaults);
    assert_eq!(defaults, leaves, "values.yaml's keys and the schema's");
    // the schema rejects unknown keys at every level
    fn closed(v: &Value, path: &str) {
        if v["properties"].is_object() {
            assert_eq!(
                v["additionalProperties"], false,
                "{path}: additionalProperties must be false (typos are errors)"
            );
            for (k, p) in v["properties"].as_object().unwrap() {
                closed(p, &format!("{path}.{k}"));
            }
        }
    }
    closed(&schema, "values");
}

#[test]
fn deploy_rbac_yaml_is_the_charts_rbac() {
    if helm().is_none() {
        return;
    }
    let out = Command::new(repo_root().join("e2e/helm"))
        .arg("rbac")
        .output()
        .expect("e2e/helm rbac");
    assert!(out.status.success(), "e2e/helm rbac: {}", text(&out));
    let file = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).expect("rbac.yaml");
    assert!(
        String::from_utf8_lossy(&out.stdout) == file,
        "deploy/rbac.yaml differs from the chart's RBAC; regenerate it: e2e/helm rbac >deploy/rbac.yaml"
    );
}

/// A control plane of its own (`e2e/controlplane up` in a temp state dir), `down` when dropped.
struct ControlPlane {
    dir: PathBuf,
    kubeconfig: String,
    kubectl: String,
}

impl ControlPlane {
    fn script(dir: &Path, args: &[&str]) -> Output {
        Command::new(repo_root().join("e2e/controlplane"))
            .args(args)
            .env("SLUICE_CP_DIR", dir)
            .output()
            .expect("e2e/controlplane")
    }

    fn up() -> Option<ControlPlane> {
        // only when built: building takes minutes, and is CI's job (e2e/controlplane build)
        let built = Self::script(Path::new("/nonexistent"), &["bin", "kube-apiserver"]);
        if !built.status.success() {
            skip(&format!(
                "the control plane is not built (run: e2e/controlplane build): {}",
                text(&built).trim()
            ));
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("sluice-chart-cp-{}-{nanos:x}", std::process::id()));
        let mut cp = ControlPlane {
            dir,
            kubeconfig: String::new(),
            kubectl: String::new(),
        };
        let out = Self::script(&cp.dir, &["up"]);
        if !out.status.success() {
            skip(&format!("e2e/controlplane up failed: {}", text(&out)));
            return None;
        }
        let kubectl = Self::script(&cp.dir, &["bin", "kubectl"]);
        assert!(kubectl.status.success(), "{}", text(&kubectl));
        cp.kubectl = String::from_utf8_lossy(&kubectl.stdout).trim().to_string();
        cp.kubeconfig = cp
            .dir
            .join("admin.kubeconfig")
            .to_string_lossy()
            .to_string();
        Some(cp)
    }

    fn apply_dry_run(&self, yaml: &str) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(&self.kubectl)
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "apply",
                "--dry-run=server",
            ])
            .args(["-o", "name", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("write");
        child.wait_with_output().expect("kubectl")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Self::script(&self.dir, &["down"]);
    }
}

#[test]
fn rendered_manifests_pass_a_server_side_dry_run() {
    let Some(helm) = helm() else { return };
    if !Path::new(&repo_root().join("e2e/controlplane")).exists() {
        skip("no e2e/controlplane");
        return;
    }
    let Some(cp) = ControlPlane::up() else { return };
    // the prometheus-operator's own PodMonitor CRD, so the PodMonitor is checked by the server
    let crd = Command::new(repo_root().join("e2e/helm"))
        .arg("podmonitor-crd")
        .output()
        .expect("e2e/helm podmonitor-crd");
    assert!(
        crd.status.success(),
        "e2e/helm podmonitor-crd: {}",
        text(&crd)
    );
    let crd = String::from_utf8_lossy(&crd.stdout).trim().to_string();
    let kubectl = |args: &[&str]| {
        let out = Command::new(&cp.kubectl)
            .args(["--kubeconfig", &cp.kubeconfig])
            .args(args)
            .output()
            .expect("kubectl");
        assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    };
    kubectl(&["apply", "--server-side", "-f", &crd]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/podmonitors.monitoring.coreos.com",
    ]);
    // the monitoring namespace of the custom values' dashboard
    let out = cp.apply_dry_run("apiVersion: v1\nkind: Namespace\nmetadata: {name: monitoring}\n");
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new(&cp.kubectl)
        .args([
            "--kubeconfig",
            &cp.kubeconfig,
            "create",
            "namespace",
            "monitoring",
        ])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{}", text(&out));

    let mut runs: Vec<Vec<PathBuf>> = vec![vec![]];
    runs.extend(value_fixtures().into_iter().map(|f| vec![f]));
    for values in runs {
        let refs: Vec<&Path> = values.iter().map(PathBuf::as_path).collect();
        let (_, objects) = render(&helm, &refs);
        // every object goes to the server (defaulting, validation against the schemas, the
        // PodMonitor's too, admission: the PriorityClass, the namespaces)
        let server: Vec<&Value> = objects.iter().collect();
        let mut yaml = String::new();
        for o in &server {
            yaml.push_str("---\n");
            yaml.push_str(&serde_yaml::to_string(o).expect("yaml"));
        }
        let out = cp.apply_dry_run(&yaml);
        assert!(
            out.status.success(),
            "kubectl apply --dry-run=server of the chart rendered with {values:?}: {}",
            text(&out)
        );
        let applied = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            applied.lines().count(),
            server.len(),
            "every object went through: {applied}"
        );
        assert!(applied.contains("daemonset.apps/sluice"), "{applied}");
        // a Pod's priority class is resolved when the Pod is made, not for the DaemonSet: ask
        let ds = one(&objects, "DaemonSet");
        let class = ds["spec"]["template"]["spec"]["priorityClassName"]
            .as_str()
            .expect("priorityClassName");
        let out = Command::new(&cp.kubectl)
            .args([
                "--kubeconfig",
                &cp.kubeconfig,
                "get",
                "priorityclass",
                class,
            ])
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "the DaemonSet's priority class {class} is not on the server: {}",
            text(&out)
        );
    }
}

/// No container engine runs here, so the Dockerfile is checked for what makes it build the
/// image the chart runs: two stages, the two binaries built --locked from the workspace and
/// put on PATH (the chart's command is `sluice`), a pinned nftables, nothing the build needs
/// left out of the context, and the chart's default image named as the Dockerfile builds it.
#[test]
fn the_dockerfile_builds_the_image_the_chart_runs() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let from: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(from.len(), 2, "a build and a runtime stage: {from:?}");
    assert!(from[0].ends_with(" AS build"), "{}", from[0]);
    for f in &from {
        let image = f.split_whitespace().nth(1).unwrap_or_default();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        assert!(
            !tag.is_empty() && tag != "latest" && !tag.contains('/'),
            "{f}: pin the base image"
        );
    }
    assert!(
        dockerfile.contains("cargo build --release --locked -p sluice -p sluice-cni"),
        "both binaries, from Cargo.lock"
    );
    assert!(
        dockerfile.contains("COPY --from=build /out/sluice /out/sluice-cni /usr/local/bin/"),
        "sluice on PATH, sluice-cni next to it (install-cni's default plugin path)"
    );
    assert!(
        dockerfile
            .lines()
            .any(|l| l.contains("apt-get install") && l.contains("nftables=")),
        "nftables is installed at a pinned version"
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"sluice\"]"));

    // the build context keeps every workspace member and the lock file
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    for needed in ["Cargo.toml", "Cargo.lock", "controller", "cni-chain", "e2e"] {
        assert!(
            !ignore
                .lines()
                .any(|l| l.trim().trim_start_matches('/') == needed),
            ".dockerignore leaves out {needed}"
        );
    }

    // the chart's default image: the name and the version the Dockerfile builds
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .expect("Chart.yaml");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .expect("values.yaml");
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let version = workspace
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"'))
        .expect("the workspace's version");
    assert_eq!(chart["appVersion"].as_str(), Some(version), "appVersion");
    let repository = values["image"]["repository"].as_str().expect("repository");
    assert!(
        dockerfile.contains(&format!("-t {repository}:{version} .")),
        "the Dockerfile's build command tags {repository}:{version}"
    );
}
