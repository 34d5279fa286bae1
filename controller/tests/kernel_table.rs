//! The nftables edge against the real kernel (root only; each test uses its own network
//! namespace, removed even when the test fails).
//!
//! The key property: applying a sequence of changes as diffs leaves exactly the table that
//! loading the final ruleset from scratch gives.

// Not every file uses every helper.
#[allow(dead_code)]
mod kernel;

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kernel::{is_root, nft, Netns};
use serde_json::Value;
use sluice::compile::{compile_node, Ruleset};
use sluice::model::{policy_info, ContainerPort, Index, NamespaceInfo, Phase, PodInfo, Protocol};
use sluice::nft::{take_counters, take_spoofed, Nft, NftError, TableState};

/// The table as the kernel has it, without handles and counter values, sets' elements sorted
/// and rules kept in chain order: equal iff the kernel state is the same.
fn kernel_state(ns: &Netns) -> BTreeMap<String, Value> {
    let json: Value =
        serde_json::from_str(&nft(ns, &["-j", "list", "table", "inet", "sluice"])).expect("json");
    let mut state = BTreeMap::new();
    let mut rules: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for item in json["nftables"].as_array().expect("array") {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let mut body = body.clone();
        if let Some(o) = body.as_object_mut() {
            o.remove("handle");
        }
        match kind.as_str() {
            "set" | "map" | "chain" | "counter" => {
                // Counter objects' values change with traffic; name and comment are config.
                if let Some(o) = body.as_object_mut() {
                    o.remove("packets");
                    o.remove("bytes");
                }
                if let Some(elems) = body.get_mut("elem").and_then(Value::as_array_mut) {
                    elems.sort_by_key(|e| e.to_string());
                }
                let name = body["name"].as_str().unwrap_or("").to_string();
                state.insert(format!("{kind} {name}"), body);
            }
            "rule" => {
                let chain = body["chain"].as_str().unwrap_or("").to_string();
                // Counters change with traffic; they are state, not configuration.
                let text = body["expr"].to_string();
                let text = regex_free_counter_strip(&text);
                rules.entry(chain).or_default().push(Value::String(text));
            }
            _ => {}
        }
    }
    for (chain, list) in rules {
        state.insert(format!("rules {chain}"), Value::Array(list));
    }
    state
}

fn regex_free_counter_strip(text: &str) -> String {
    text.replace(
        r#"{"counter":{"bytes":0,"packets":0}}"#,
        r#"{"counter":{}}"#,
    )
}

fn mk_pod(key: &str, node: &str, ip4: &str, ip6: &str, labels: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        key: key.parse().expect("key"),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        node: Some(node.into()),
        host_network: false,
        phase: Phase::Running,
        ips: vec![ip4.parse().expect("ip"), ip6.parse().expect("ip")],
        ports: vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    }
}

fn add_policy(idx: &mut Index, ns: &str, name: &str, spec: Value) {
    let p: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns, "name": name}, "spec": spec
    }))
    .expect("policy");
    idx.apply_policy(policy_info(&p).expect("policy info"));
}

fn base_index() -> Index {
    let mut idx = Index::default();
    for ns in ["shop", "other"] {
        idx.apply_namespace(NamespaceInfo {
            name: ns.into(),
            labels: [("kubernetes.io/metadata.name".to_string(), ns.to_string())].into(),
        });
    }
    idx.apply_pod(mk_pod(
        "shop/frontend",
        "node-1",
        "10.244.1.2",
        "fd00:10:244:1::2",
        &[("app", "frontend")],
    ));
    idx.apply_pod(mk_pod(
        "shop/backend",
        "node-1",
        "10.244.1.3",
        "fd00:10:244:1::3",
        &[("app", "backend")],
    ));
    idx.apply_pod(mk_pod(
        "other/intruder",
        "node-2",
        "10.244.2.2",
        "fd00:10:244:2::2",
        &[],
    ));
    idx
}

/// A sequence of cluster states touching every kind of change.
fn states() -> Vec<Index> {
    let mut out = Vec::new();
    let mut idx = base_index();
    out.push(idx.clone());
    add_policy(
        &mut idx,
        "shop",
        "backend",
        serde_json::json!({
            "podSelector": {"matchLabels": {"app": "backend"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}], "ports": [{"port": "http"}]}]
        }),
    );
    out.push(idx.clone());
    idx.apply_pod(mk_pod(
        "shop/frontend-2",
        "node-2",
        "10.244.2.3",
        "fd00:10:244:2::3",
        &[("app", "frontend")],
    ));
    out.push(idx.clone());
    add_policy(
        &mut idx,
        "shop",
        "deny-egress",
        serde_json::json!({
            "podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]},
                       {"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53, "endPort": 60}]}]
        }),
    );
    out.push(idx.clone());
    idx.apply_pod(mk_pod(
        "shop/backend",
        "node-1",
        "10.244.1.3",
        "fd00:10:244:1::3",
        &[("app", "db")],
    ));
    out.push(idx.clone());
    idx.delete_policy(&"shop/backend".parse().expect("key"));
    out.push(idx.clone());
    idx.delete_pod(&"shop/frontend".parse().expect("key"));
    idx.delete_policy(&"shop/deny-egress".parse().expect("key"));
    out.push(idx.clone());
    out
}

#[test]
fn diffs_leave_exactly_the_table_a_fresh_load_gives() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let incremental = Netns::new("slt", "inc");
    let mut table = TableState::new(Nft::in_netns(&incremental.0));
    for (i, idx) in states().iter().enumerate() {
        let rs: Ruleset = compile_node(idx, "node-1").ruleset;
        let applied = table.sync(&rs).unwrap_or_else(|e| panic!("state {i}: {e}"));
        assert_eq!(
            applied.full,
            i == 0,
            "state {i}: only the first sync replaces the table"
        );
        let fresh = Netns::new("slt", "fresh");
        TableState::new(Nft::in_netns(&fresh.0))
            .sync(&rs)
            .expect("fresh load");
        let state = kernel_state(&incremental);
        assert!(
            state.contains_key("rules ingress"),
            "the listing was read: {state:?}"
        );
        assert_eq!(state, kernel_state(&fresh), "state {i}");
    }
}

#[test]
fn the_first_sync_replaces_whatever_table_is_there() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = Netns::new("slt", "repl");
    Nft::in_netns(&ns.0)
        .apply("table inet sluice {\n chain stale {\n type filter hook forward priority 0; policy drop;\n }\n}\n")
        .expect("stale table");
    let rs = compile_node(&states()[1], "node-1").ruleset;
    TableState::new(Nft::in_netns(&ns.0))
        .sync(&rs)
        .expect("sync");
    let listing = nft(&ns, &["list", "table", "inet", "sluice"]);
    assert!(!listing.contains("stale"), "{listing}");
    assert!(listing.contains("chain in.shop.backend"), "{listing}");
}

#[test]
fn a_replace_keeps_what_the_counters_counted_and_repairs_the_rest() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // What a previous agent (or the sync before a resync) left, with counts not yet read, plus
    // drift: stray base chains that drop everything and a stray counter.
    let mut rs = compile_node(&states()[3], "node-1").ruleset;
    rs.spoof_guard.insert(
        "veth1".into(),
        ["10.244.1.9".parse().expect("ip")].into_iter().collect(),
    );
    let kept = rs.counters.keys().next().expect("a drop counter").clone();
    let ns = Netns::new("slt", "keep");
    let nft_ = Nft::in_netns(&ns.0);
    // A counter's values can be given when it is declared: ours, with counts.
    nft_.apply(&format!(
        "table inet sluice {{\n counter {kept} {{\n comment \"{}\"\n packets 5 bytes 500\n }}\n \
             counter stray {{\n packets 1 bytes 1\n }}\n \
             chain stray {{\n type filter hook forward priority -10; policy drop;\n }}\n}}\n\
             table bridge sluice {{\n counter spoofed {{\n comment \"frames dropped from registered pod veths: source not the pod's\"\n packets 7 bytes 700\n }}\n \
             chain stray {{\n type filter hook prerouting priority 0; policy drop;\n }}\n}}\n",
        rs.counters[&kept].describe()
    ))
    .expect("the leftover tables");

    // A fresh TableState, like an agent after a restart (a resync invalidates the same way).
    let mut table = TableState::new(nft_.clone());
    let applied = table.sync(&rs).expect("replace");
    assert!(applied.full);
    let counted: BTreeMap<String, u64> = take_counters(&nft_)
        .expect("take")
        .into_iter()
        .map(|c| (c.name, c.packets))
        .collect();
    let mut want: BTreeMap<String, u64> = rs.counters.keys().map(|k| (k.clone(), 0)).collect();
    want.insert(kept.clone(), 5);
    assert_eq!(
        counted, want,
        "ours kept with their counts, the stray one gone"
    );
    let spoofed = take_spoofed(&nft_)
        .expect("take")
        .expect("the bridge counter");
    assert_eq!((spoofed.packets, spoofed.bytes), (7, 700));

    // Everything else is exactly what a fresh load gives (the counts were just taken: zero).
    let fresh = Netns::new("slt", "fresh");
    TableState::new(Nft::in_netns(&fresh.0))
        .sync(&rs)
        .expect("fresh");
    assert_eq!(kernel_state(&ns), kernel_state(&fresh));
    assert_eq!(
        nft(&ns, &["list", "table", "bridge", "sluice"]),
        nft(&fresh, &["list", "table", "bridge", "sluice"])
    );

    // A table holding an object sluice never creates is deleted whole (counts lost, repaired).
    nft(
        &ns,
        &["add", "quota", "inet", "sluice", "q", "{ over 1 mbytes }"],
    );
    let mut table = TableState::new(nft_.clone());
    table.sync(&rs).expect("replace");
    assert!(!nft(&ns, &["list", "table", "inet", "sluice"]).contains("quota"));
    assert_eq!(kernel_state(&ns), kernel_state(&fresh));
}

#[test]
fn after_a_failed_apply_the_next_sync_replaces_the_table() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = Netns::new("slt", "fail");
    let all = states();
    let mut table = TableState::new(Nft::in_netns(&ns.0));
    table
        .sync(&compile_node(&all[1], "node-1").ruleset)
        .expect("first");
    // Someone removes the table behind our back: the diff cannot apply.
    nft(&ns, &["delete", "table", "inet", "sluice"]);
    let next = compile_node(&all[2], "node-1").ruleset;
    let err = table
        .sync(&next)
        .expect_err("a diff against a missing table fails");
    assert!(matches!(err, NftError::Rejected { .. }), "{err}");
    let again = table.sync(&next).expect("replaced whole");
    assert!(again.full);
    let fresh = Netns::new("slt", "fresh");
    TableState::new(Nft::in_netns(&fresh.0))
        .sync(&next)
        .expect("fresh");
    assert_eq!(kernel_state(&ns), kernel_state(&fresh));
}

#[test]
fn the_diffs_create_and_remove_counters() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The sequence of states in the convergence test above does add and remove counters.
    let counts: Vec<usize> = states()
        .iter()
        .map(|idx| compile_node(idx, "node-1").ruleset.counters.len())
        .collect();
    assert_eq!(counts, vec![0, 1, 1, 3, 2, 2, 0]);
    let ns = Netns::new("slt", "ctrs");
    let nft_ = Nft::in_netns(&ns.0);
    let mut table = TableState::new(nft_.clone());
    for idx in states() {
        let rs = compile_node(&idx, "node-1").ruleset;
        table.sync(&rs).expect("sync");
        let listing = nft(&ns, &["list", "counters", "table", "inet", "sluice"]);
        for (name, info) in &rs.counters {
            assert!(listing.contains(&format!("counter {name} {{")), "{listing}");
            assert!(listing.contains(&info.describe()), "{listing}");
        }
        assert_eq!(listing.matches("counter ").count(), rs.counters.len());
    }
}

#[test]
fn take_counters_reads_the_counters_of_the_ruleset() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = Netns::new("slt", "take");
    let nft_ = Nft::in_netns(&ns.0);
    assert_eq!(
        take_counters(&nft_).expect("no table"),
        vec![],
        "no table, no counters"
    );
    let rs = compile_node(&states()[3], "node-1").ruleset;
    assert_eq!(rs.counters.len(), 3);
    TableState::new(nft_.clone()).sync(&rs).expect("sync");
    let got = take_counters(&nft_).expect("take");
    let names: Vec<&str> = got.iter().map(|c| c.name.as_str()).collect();
    let want: Vec<&str> = rs.counters.keys().map(String::as_str).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, want);
    assert!(got.iter().all(|c| c.packets == 0 && c.bytes == 0));
}

/// Run `ip netns exec <ns> <args>`, which must succeed.
fn run_in(ns: &Netns, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{args:?} in {}: {}",
        ns.0,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drops counted since the last take, by pod and direction ("shop/backend ingress"), summed
/// over takes until `want` is reached or two seconds have passed.
fn wait_for_drops(nft_: &Nft, rs: &Ruleset, want: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        for c in take_counters(nft_).expect("take") {
            let info = &rs.counters[&c.name];
            assert!(c.packets == 0 || c.bytes > 0, "{c:?}");
            if c.packets > 0 {
                *got.entry(format!(
                    "{}/{} {}",
                    info.namespace, info.pod, info.direction
                ))
                .or_default() += c.packets;
            }
        }
        if &got == want || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn dropped_packets_are_counted_for_their_pod() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // node-1 forwards between a client (other/intruder, 10.244.2.2) on a veth and its pod
    // subnet 10.244.1.0/24 on another veth (both ends in the node; no pod answers, but the
    // forward hook comes before neighbour resolution): packets to the pods meet the hook.
    let node = Netns::new("slt", "node");
    let client = Netns::new("slt", "client");
    let ip = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .expect("ip")
            .success();
        assert!(ok, "ip {args:?}");
    };
    ip(&[
        "-n", &node.0, "link", "add", "r0", "type", "veth", "peer", "name", "c0", "netns",
        &client.0,
    ]);
    ip(&[
        "-n", &node.0, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ip(&["-n", &node.0, "link", "set", "d1", "up"]);
    for (ns, dev, v4, v6) in [
        (&node, "r0", "10.244.2.1/24", "fd00:10:244:2::1/64"),
        (&node, "d0", "10.244.1.1/24", "fd00:10:244:1::1/64"),
        (&client, "c0", "10.244.2.2/24", "fd00:10:244:2::2/64"),
    ] {
        ip(&["-n", &ns.0, "addr", "add", v4, "dev", dev]);
        ip(&["-n", &ns.0, "addr", "add", v6, "dev", dev, "nodad"]);
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    ip(&[
        "-n",
        &client.0,
        "route",
        "add",
        "default",
        "via",
        "10.244.2.1",
    ]);
    ip(&[
        "-n",
        &client.0,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:10:244:2::1",
    ]);
    run_in(
        &node,
        &[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ],
    );
    let send = |to: &str, n: usize| {
        let script = format!("for i in $(seq {n}); do echo x > /dev/udp/{to}/8080; done");
        run_in(&client, &["bash", "-c", &script]);
    };
    let want = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };

    // Ingress: both shop pods isolated by one policy, so they share one group chain; each
    // counts only its own drops, in both families.
    let mut idx = base_index();
    add_policy(
        &mut idx,
        "shop",
        "deny-ingress",
        serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    let rs = compile_node(&idx, "node-1").ruleset;
    let nft_ = Nft::in_netns(&node.0);
    let mut table = TableState::new(nft_.clone());
    table.sync(&rs).expect("sync");
    send("10.244.1.3", 3);
    send("fd00:10:244:1::3", 2);
    send("10.244.1.2", 1);
    let expected = want(&[("shop/backend ingress", 5), ("shop/frontend ingress", 1)]);
    assert_eq!(wait_for_drops(&nft_, &rs, &expected), expected);

    // Egress, applied as a diff: the client becomes a local pod whose egress is denied; its
    // packets are dropped (and counted) before ingress sees them.
    idx.apply_pod(mk_pod(
        "other/intruder",
        "node-1",
        "10.244.2.2",
        "fd00:10:244:2::2",
        &[],
    ));
    add_policy(
        &mut idx,
        "other",
        "deny-egress",
        serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    let rs = compile_node(&idx, "node-1").ruleset;
    assert!(!table.sync(&rs).expect("diff").full);
    send("10.244.1.3", 2);
    send("fd00:10:244:1::2", 1);
    let expected = want(&[("other/intruder egress", 3)]);
    assert_eq!(wait_for_drops(&nft_, &rs, &expected), expected);
}
