//! Anti-spoofing against the real kernel (root only; every test builds its own uniquely named
//! network namespaces, removed even when the test panics).
//!
//! The topology is a flannel node as the bridge plugin makes it: a node namespace with a `cni0`
//! bridge and one veth port per pod, the pods in namespaces of their own. Pod A registers
//! (through the index, as the CNI server does) with its veth and addresses; what it sends is
//! observed on pod B's interface (a netdev ingress table in B, so every frame that arrives is
//! counted before B's stack looks at it) and on the guard's `spoofed` counter.
//!
//! Spoofing from A: A's interface gets a secondary address (10.244.1.99, fd00:10:244:1::99) and
//! routes to B that prefer it as source, so frames leave A's veth with a source that is not
//! A's registered one (the bridge cannot tell how they were made); a route to an unused address
//! with that source makes A send ARP requests claiming it. A frame the kernel treats as
//! 802.1Q-tagged is made by rewriting the EtherType on A's egress (this kernel has no 8021q
//! module): tagged frames hide the IP header from `ip saddr`, so the guard must drop them too.

// Not every file uses every helper.
#[allow(dead_code)]
mod kernel;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use kernel::{is_root, nft, Netns};
use serde_json::Value;
use sluice::compile::{compile_node, Ruleset};
use sluice::model::{AttachmentKey, Index, NamespaceInfo, Phase, PodInfo, Registration};
use sluice::nft::{remove_table_script, take_spoofed, Nft, NftError, TableState};

/// `ip <args>`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bash script in `ns`; its exit status does not matter (a TCP connect that nobody answers
/// fails, and that is expected).
fn bash_in(ns: &Netns, script: &str) {
    Command::new("ip")
        .args(["netns", "exec", &ns.0, "timeout", "5", "bash", "-c", script])
        .output()
        .expect("bash");
}

fn tables(ns: &Netns) -> String {
    nft(ns, &["list", "tables"])
}

/// A named counter's packets.
fn packets(ns: &Netns, family: &str, table: &str, name: &str) -> u64 {
    let json: Value =
        serde_json::from_str(&nft(ns, &["-j", "list", "counter", family, table, name]))
            .expect("json");
    json["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .find_map(|i| i.get("counter"))
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or_else(|| panic!("counter {family} {table} {name}: {json}"))
}

/// Poll until `done` or two seconds have passed; whether it got there.
fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

const A_V4: &str = "10.244.1.2";
const A_V6: &str = "fd00:10:244:1::2";
const B_V4: &str = "10.244.1.3";
const B_V6: &str = "fd00:10:244:1::3";
const SPOOF_V4: &str = "10.244.1.99";
const SPOOF_V6: &str = "fd00:10:244:1::99";
/// UDP to this port leaves A with its EtherType rewritten to 802.1Q.
const TAGGED_PORT: u16 = 9100;

/// What pod B's interface counts, by source.
const B_PROBE: &str = "table netdev probe {
\tcounter own_v4 {}
\tcounter own_v6 {}
\tcounter spoof_v4 {}
\tcounter spoof_v6 {}
\tcounter spoof_arp {}
\tcounter tagged {}
\tchain in {
\t\ttype filter hook ingress device eth0 priority 0; policy accept;
\t\tether type 8021q counter name tagged
\t\tip saddr 10.244.1.2 counter name own_v4
\t\tip6 saddr fd00:10:244:1::2 counter name own_v6
\t\tip saddr 10.244.1.99 counter name spoof_v4
\t\tip6 saddr fd00:10:244:1::99 counter name spoof_v6
\t\tarp saddr ip 10.244.1.99 counter name spoof_arp
\t}
}
";

/// A's egress: UDP to the tagged port becomes a frame the kernel reads as 802.1Q-tagged.
const A_TAGGER: &str = "table netdev tagger {
\tchain out {
\t\ttype filter hook egress device eth0 priority 0; policy accept;
\t\tudp dport 9100 ether type set 0x8100
\t}
}
";

/// The node and its two pods; all removed on drop.
struct Node {
    node: Netns,
    a: Netns,
    b: Netns,
}

impl Node {
    fn new() -> Node {
        let n = Node {
            node: Netns::new("sls", "node"),
            a: Netns::new("sls", "pod-a"),
            b: Netns::new("sls", "pod-b"),
        };
        let node = n.node.0.as_str();
        ip(&[
            "-n",
            node,
            "link",
            "add",
            "cni0",
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ]);
        ip(&["-n", node, "addr", "add", "10.244.1.1/24", "dev", "cni0"]);
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            "fd00:10:244:1::1/64",
            "dev",
            "cni0",
            "nodad",
        ]);
        ip(&["-n", node, "link", "set", "cni0", "up"]);
        for (pod, veth, v4, v6) in [(&n.a, "vethA", A_V4, A_V6), (&n.b, "vethB", B_V4, B_V6)] {
            ip(&[
                "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
                &pod.0,
            ]);
            ip(&["-n", node, "link", "set", veth, "master", "cni0"]);
            ip(&["-n", node, "link", "set", veth, "up"]);
            let p = pod.0.as_str();
            ip(&["-n", p, "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ip(&[
                "-n",
                p,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&["-n", p, "link", "set", "eth0", "up"]);
            ip(&["-n", p, "link", "set", "lo", "up"]);
        }
        // As on a flannel node: bridged traffic also meets the inet hooks (br_netfilter), which
        // run after the guard. Not every test kernel has br_netfilter; the guard does not need it.
        bash_in(
            &n.node,
            "sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1",
        );
        // A's second addresses, the ones it has no right to.
        ip(&[
            "-n",
            &n.a.0,
            "addr",
            "add",
            &format!("{SPOOF_V4}/32"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &n.a.0,
            "addr",
            "add",
            &format!("{SPOOF_V6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        Nft::in_netns(&n.b.0).apply(B_PROBE).expect("B's probe");
        Nft::in_netns(&n.a.0).apply(A_TAGGER).expect("A's tagger");
        n
    }

    fn b_saw(&self, counter: &str) -> u64 {
        packets(&self.b, "netdev", "probe", counter)
    }

    fn reset_b(&self) {
        nft(&self.b, &["reset", "counters", "table", "netdev", "probe"]);
    }

    /// UDP datagrams from A to `to`, from whatever source A's routes choose.
    fn udp_from_a(&self, to: &str, port: u16, n: usize) {
        bash_in(
            &self.a,
            &format!("for i in $(seq {n}); do echo x > /dev/udp/{to}/{port}; done"),
        );
    }

    /// A TCP connect from A to B (B answers with a reset: nobody listens).
    fn tcp_from_a(&self, to: &str) {
        bash_in(
            &self.a,
            &format!("timeout 1 bash -c 'echo > /dev/tcp/{to}/9001'"),
        );
    }

    /// From now on A sends to B from its spoofed addresses, without resolving B first (a
    /// resolution would go out with the spoofed sender too).
    fn spoof_routes(&self) {
        let mac: Value = serde_json::from_str(&String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", &self.b.0, "-j", "link", "show", "eth0"])
                .output()
                .expect("ip")
                .stdout,
        ))
        .expect("json");
        let mac = mac[0]["address"].as_str().expect("B's MAC").to_string();
        for b in [B_V4, B_V6] {
            ip(&[
                "-n",
                &self.a.0,
                "neigh",
                "replace",
                b,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
        self.routes_to_b(SPOOF_V4, SPOOF_V6);
    }

    /// From now on A sends to B from its own addresses and resolves B as usual. (Routes say
    /// which source: for IPv6 the kernel would otherwise prefer the /128 spoofed address,
    /// whose prefix matches B's address longer.)
    fn own_routes(&self) {
        for b in [B_V4, B_V6] {
            let _ = Command::new("ip")
                .args(["-n", &self.a.0, "neigh", "del", b, "dev", "eth0"])
                .output();
        }
        self.routes_to_b(A_V4, A_V6);
    }

    fn routes_to_b(&self, v4: &str, v6: &str) {
        for (b, len, src) in [(B_V4, "32", v4), (B_V6, "128", v6)] {
            ip(&[
                "-n",
                &self.a.0,
                "route",
                "replace",
                &format!("{b}/{len}"),
                "dev",
                "eth0",
                "src",
                src,
            ]);
        }
    }

    /// A asks who has `unused` (an address nobody has) claiming to be SPOOF_V4.
    fn spoofed_arp_from_a(&self, unused: &str) {
        ip(&[
            "-n",
            &self.a.0,
            "route",
            "replace",
            &format!("{unused}/32"),
            "dev",
            "eth0",
            "src",
            SPOOF_V4,
        ]);
        self.udp_from_a(unused, 9000, 1);
    }
}

fn pod(key: &str, ips: &[&str]) -> PodInfo {
    PodInfo {
        key: key.parse().expect("key"),
        labels: [("app".to_string(), key.to_string().replace('/', "-"))].into(),
        node: Some("node-1".into()),
        host_network: false,
        phase: Phase::Running,
        ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
        ports: vec![],
    }
}

fn index() -> Index {
    let mut idx = Index::default();
    idx.apply_namespace(NamespaceInfo {
        name: "shop".into(),
        labels: [(
            "kubernetes.io/metadata.name".to_string(),
            "shop".to_string(),
        )]
        .into(),
    });
    idx.apply_pod(pod("shop/a", &[A_V4, A_V6]));
    idx.apply_pod(pod("shop/b", &[B_V4, B_V6]));
    idx
}

fn registration(container: &str, pod: &str, veth: &str, ips: &[&str]) -> Registration {
    Registration {
        attachment: AttachmentKey {
            container_id: container.into(),
            ifname: "eth0".into(),
        },
        pod: pod.parse().expect("key"),
        ips: ips
            .iter()
            .map(|i| i.parse::<IpAddr>().expect("ip"))
            .collect(),
        host_veth: veth.into(),
    }
}

#[test]
fn a_pod_sends_only_from_its_own_addresses_on_its_own_veth() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = Node::new();
    let nft_ = lab.node.nft();
    let mut table = TableState::new(nft_.clone());
    let mut idx = index();

    // Control: without a registration there is no bridge table, and everything A sends with
    // its spoofed sources, or tagged, reaches B. So the frames below really leave A's veth.
    let unguarded = compile_node(&idx, "node-1").ruleset;
    assert!(unguarded.spoof_guard.is_empty());
    assert!(table.sync(&unguarded).expect("first sync").full);
    assert!(
        !tables(&lab.node).contains("bridge"),
        "{}",
        tables(&lab.node)
    );
    assert_eq!(
        take_spoofed(&nft_).expect("take"),
        None,
        "no table, no counter"
    );
    lab.spoof_routes();
    lab.udp_from_a(B_V4, 9000, 3);
    lab.udp_from_a(B_V6, 9000, 3);
    lab.udp_from_a(B_V4, TAGGED_PORT, 2);
    lab.spoofed_arp_from_a("10.244.1.77");
    assert!(
        wait_for(|| lab.b_saw("spoof_v4") >= 3
            && lab.b_saw("spoof_v6") >= 3
            && lab.b_saw("tagged") >= 2
            && lab.b_saw("spoof_arp") >= 1),
        "unguarded, B sees the spoofed frames: v4 {} v6 {} tagged {} arp {}",
        lab.b_saw("spoof_v4"),
        lab.b_saw("spoof_v6"),
        lab.b_saw("tagged"),
        lab.b_saw("spoof_arp")
    );

    // A registers through CNI: its veth and addresses. The diff creates the bridge table.
    idx.register(registration("c-a", "shop/a", "vethA", &[A_V4, A_V6]));
    let guarded = compile_node(&idx, "node-1").ruleset;
    assert_eq!(guarded.spoof_guard.len(), 1);
    let applied = table.sync(&guarded).expect("diff");
    assert!(!applied.full, "a diff creates the bridge table");
    let listing = nft(&lab.node, &["list", "table", "bridge", "sluice"]);
    assert!(listing.contains(r#""vethA" . 10.244.1.2"#), "{listing}");
    take_spoofed(&nft_).expect("take");

    // (1) A's own sources pass, resolving B through the guard (ARP and neighbour discovery
    // from A's own and link-local addresses), over UDP and TCP, both families.
    lab.own_routes();
    lab.reset_b();
    lab.udp_from_a(B_V4, 9000, 3);
    lab.udp_from_a(B_V6, 9000, 3);
    lab.tcp_from_a(B_V4);
    lab.tcp_from_a(B_V6);
    assert!(
        wait_for(|| lab.b_saw("own_v4") >= 4 && lab.b_saw("own_v6") >= 4),
        "A's own traffic reaches B: v4 {} v6 {}",
        lab.b_saw("own_v4"),
        lab.b_saw("own_v6")
    );
    let spoofed = take_spoofed(&nft_).expect("take").expect("the counter");
    assert_eq!(spoofed.packets, 0, "nothing of A's own traffic was dropped");

    // (2) Spoofed sources are dropped and counted: UDP and TCP, IPv4 and (3) IPv6.
    lab.spoof_routes();
    lab.reset_b();
    lab.udp_from_a(B_V4, 9000, 3);
    lab.udp_from_a(B_V6, 9000, 3);
    lab.tcp_from_a(B_V4);
    lab.tcp_from_a(B_V6);
    let mut dropped = 0;
    assert!(
        wait_for(|| {
            dropped += take_spoofed(&nft_).expect("take").expect("counter").packets;
            dropped >= 8
        }),
        "3 + 3 UDP and at least a SYN per family counted, got {dropped}"
    );
    assert_eq!(lab.b_saw("spoof_v4"), 0, "no spoofed IPv4 reached B");
    assert_eq!(lab.b_saw("spoof_v6"), 0, "no spoofed IPv6 reached B");

    // ARP claiming another address, and tagged frames, are dropped and counted too.
    lab.spoofed_arp_from_a("10.244.1.78");
    lab.udp_from_a(B_V4, TAGGED_PORT, 2);
    let mut dropped = 0;
    assert!(
        wait_for(|| {
            dropped += take_spoofed(&nft_).expect("take").expect("counter").packets;
            dropped >= 3
        }),
        "an ARP request and two tagged frames counted, got {dropped}"
    );
    assert_eq!(lab.b_saw("spoof_arp"), 0, "no spoofed ARP reached B");
    assert_eq!(lab.b_saw("tagged"), 0, "no tagged frame reached B");
    assert_eq!(lab.b_saw("own_v4") + lab.b_saw("own_v6"), 0);

    // A's registration gone (CNI DEL): the diff removes the bridge table, and A's veth is
    // unchecked again.
    idx.unregister(&registration("c-a", "shop/a", "", &[]).attachment);
    let again = compile_node(&idx, "node-1").ruleset;
    assert!(!table.sync(&again).expect("diff").full);
    assert!(
        !tables(&lab.node).contains("bridge"),
        "{}",
        tables(&lab.node)
    );
    assert_eq!(again, unguarded);
    lab.reset_b();
    lab.udp_from_a(B_V4, 9000, 1);
    assert!(wait_for(|| lab.b_saw("spoof_v4") == 1));
}

/// The bridge table as the kernel has it, without handles and counter values, sets' elements
/// sorted; `None` without the table.
fn bridge_state(ns: &Netns) -> Option<BTreeMap<String, Value>> {
    if !tables(ns).contains("table bridge sluice") {
        return None;
    }
    let json: Value =
        serde_json::from_str(&nft(ns, &["-j", "list", "table", "bridge", "sluice"])).expect("json");
    let mut state = BTreeMap::new();
    let mut rules = Vec::new();
    for item in json["nftables"].as_array().expect("array") {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let mut body = body.clone();
        if let Some(o) = body.as_object_mut() {
            for volatile in ["handle", "packets", "bytes"] {
                o.remove(volatile);
            }
        }
        if let Some(elems) = body.get_mut("elem").and_then(Value::as_array_mut) {
            elems.sort_by_key(|e| e.to_string());
        }
        match kind.as_str() {
            "rule" => rules.push(body["expr"].clone()),
            "set" | "chain" | "counter" => {
                let name = body["name"].as_str().unwrap_or("").to_string();
                state.insert(format!("{kind} {name}"), body);
            }
            _ => {}
        }
    }
    state.insert("rules".into(), Value::Array(rules));
    Some(state)
}

/// Registrations coming and going, addresses changing, the last one leaving.
fn guard_states() -> Vec<Ruleset> {
    let mut idx = index();
    let mut out = vec![compile_node(&idx, "node-1").ruleset];
    idx.register(registration("c-a", "shop/a", "vethA", &[A_V4, A_V6]));
    out.push(compile_node(&idx, "node-1").ruleset);
    idx.register(registration("c-b", "shop/b", "vethB", &[B_V4]));
    out.push(compile_node(&idx, "node-1").ruleset);
    // A new sandbox of A: new veth, new addresses, the old attachment still registered.
    idx.register(registration(
        "c-a2",
        "shop/a",
        "vethA2",
        &["10.244.1.20", "fd00:10:244:1::20"],
    ));
    out.push(compile_node(&idx, "node-1").ruleset);
    idx.unregister(&registration("c-a", "shop/a", "", &[]).attachment);
    idx.register(registration("c-b", "shop/b", "vethB", &[B_V4, B_V6]));
    out.push(compile_node(&idx, "node-1").ruleset);
    idx.unregister(&registration("c-a2", "shop/a", "", &[]).attachment);
    idx.unregister(&registration("c-b", "shop/b", "", &[]).attachment);
    out.push(compile_node(&idx, "node-1").ruleset);
    idx.register(registration("c-b2", "shop/b", "vethB2", &[B_V4]));
    out.push(compile_node(&idx, "node-1").ruleset);
    out
}

#[test]
fn diffs_of_the_bridge_table_leave_what_a_fresh_load_gives() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let states = guard_states();
    let guards: Vec<usize> = states.iter().map(|rs| rs.spoof_guard.len()).collect();
    assert_eq!(guards, vec![0, 1, 2, 3, 2, 0, 1]);
    let incremental = Netns::new("sls", "inc");
    let mut table = TableState::new(incremental.nft());
    for (i, rs) in states.iter().enumerate() {
        let applied = table.sync(rs).unwrap_or_else(|e| panic!("state {i}: {e}"));
        assert_eq!(applied.full, i == 0, "state {i}");
        let fresh = Netns::new("sls", "fresh");
        TableState::new(fresh.nft()).sync(rs).expect("fresh load");
        let state = bridge_state(&incremental);
        assert_eq!(state.is_some(), !rs.spoof_guard.is_empty(), "state {i}");
        assert_eq!(state, bridge_state(&fresh), "state {i}");
        assert!(tables(&incremental).contains("table inet sluice"));
        // Nothing changed: nothing to apply.
        assert_eq!(table.sync(rs).expect("again").commands, 0);
    }
}

#[test]
fn the_first_sync_replaces_both_tables_whatever_is_there() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let states = guard_states();
    // An older agent left only the inet table; a stale bridge table of ours may be there too.
    for stale_bridge in [false, true] {
        let ns = Netns::new("sls", "repl");
        let mut old = TableState::new(ns.nft());
        let mut older = states[0].clone();
        older.spoof_guard.clear();
        old.sync(&older).expect("older agent's table");
        if stale_bridge {
            ns.nft()
                .apply("table bridge sluice {\n chain stale {\n type filter hook prerouting priority 0; policy drop;\n }\n}\n")
                .expect("stale bridge table");
        }
        let mut table = TableState::new(ns.nft());
        assert!(table.sync(&states[2]).expect("sync").full);
        let listing = nft(&ns, &["list", "table", "bridge", "sluice"]);
        assert!(!listing.contains("stale"), "{listing}");
        let fresh = Netns::new("sls", "fresh");
        TableState::new(fresh.nft())
            .sync(&states[2])
            .expect("fresh");
        assert_eq!(bridge_state(&ns), bridge_state(&fresh));

        // Without registrations a whole load leaves no bridge table, stale or not.
        let ns = Netns::new("sls", "repl0");
        if stale_bridge {
            ns.nft()
                .apply("table bridge sluice {\n chain stale {\n type filter hook prerouting priority 0; policy drop;\n }\n}\n")
                .expect("stale bridge table");
        }
        TableState::new(ns.nft()).sync(&states[0]).expect("sync");
        assert_eq!(bridge_state(&ns), None);
    }

    // Uninstall removes both tables.
    let ns = Netns::new("sls", "rm");
    TableState::new(ns.nft()).sync(&states[2]).expect("sync");
    ns.nft().apply(&remove_table_script()).expect("remove");
    assert!(!tables(&ns).contains("sluice"), "{}", tables(&ns));
    ns.nft()
        .apply(&remove_table_script())
        .expect("removing nothing is fine");
}

#[test]
fn after_a_failed_diff_the_next_sync_replaces_both_tables() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let states = guard_states();
    let ns = Netns::new("sls", "fail");
    let mut table = TableState::new(ns.nft());
    table.sync(&states[1]).expect("first");
    // Someone removes the bridge table behind our back: a diff adding elements cannot apply,
    // and the inet part of that transaction is not applied either.
    nft(&ns, &["delete", "table", "bridge", "sluice"]);
    let err = table
        .sync(&states[2])
        .expect_err("a diff against a missing table");
    assert!(matches!(err, NftError::Rejected { .. }), "{err}");
    let again = table.sync(&states[2]).expect("replaced whole");
    assert!(again.full);
    let fresh = Netns::new("sls", "fresh");
    TableState::new(fresh.nft())
        .sync(&states[2])
        .expect("fresh");
    assert_eq!(bridge_state(&ns), bridge_state(&fresh));
    assert!(bridge_state(&ns).is_some());
}
