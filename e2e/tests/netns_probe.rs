//! Lab topology + probes against the real kernel. Root only: every test prints a message and
//! passes when not run as root.

use ipnet::IpNet;
use sluice_e2e::netns::{self, LabNet, NodeSpec, PodSpec};
use sluice_e2e::probe::{run_probes, sctp_supported, Outcome, ProbeReq, Proto, Servers};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(1);
const PARALLELISM: usize = 256;

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipping: this test needs root (network namespaces)");
            return;
        }
    };
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn node(name: &str, index: u32) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        index,
        pod_cidrs: vec![
            net(&format!("10.244.{index}.0/24")),
            net(&format!("fd00:10:244:{index}::/64")),
        ],
        host_ips: vec![
            ip(&format!("198.18.0.{index}")),
            ip(&format!("fd00:198:18::{index}")),
        ],
    }
}

fn pod(key: &str, node: &NodeSpec, host: u8) -> PodSpec {
    PodSpec {
        key: key.into(),
        node: node.name.clone(),
        ips: vec![
            ip(&format!("10.244.{}.{host}", node.index)),
            ip(&format!("fd00:10:244:{}::{host:x}", node.index)),
        ],
        host_network: false,
    }
}

fn host_pod(key: &str, node: &NodeSpec) -> PodSpec {
    PodSpec {
        key: key.into(),
        node: node.name.clone(),
        ips: node.host_ips.clone(),
        host_network: true,
    }
}

/// `ip netns list`, names only.
fn ip_netns_list() -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn with_prefix(set: &BTreeSet<String>, prefix: &str) -> BTreeSet<String> {
    let dash = format!("{prefix}-");
    set.iter()
        .filter(|n| n.starts_with(&dash))
        .cloned()
        .collect()
}

fn nft(netns: &str, script: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "nft in {netns} failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One probe cell, for readable assertion messages.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Cell {
    from: String,
    to: String,
    addr: SocketAddr,
    proto: Proto,
}

/// Every pod to every other pod, on each of the target's IPs and each (proto, port).
fn matrix(lab: &LabNet, pods: &[PodSpec], ports: &[(Proto, u16)]) -> (Vec<Cell>, Vec<ProbeReq>) {
    let mut cells = Vec::new();
    let mut reqs = Vec::new();
    for src in pods {
        for dst in pods {
            if src.key == dst.key {
                continue;
            }
            for dip in &dst.ips {
                for &(proto, port) in ports {
                    let addr = SocketAddr::new(*dip, port);
                    cells.push(Cell {
                        from: src.key.clone(),
                        to: dst.key.clone(),
                        addr,
                        proto,
                    });
                    reqs.push(ProbeReq {
                        from_netns: lab.pod_netns(&src.key).unwrap().to_string(),
                        to: addr,
                        proto,
                    });
                }
            }
        }
    }
    (cells, reqs)
}

fn serve_all(servers: &mut Servers, lab: &LabNet, pods: &[PodSpec], ports: &[(Proto, u16)]) {
    for p in pods {
        for &(proto, port) in ports {
            servers
                .ensure(lab.pod_netns(&p.key).unwrap(), port, proto)
                .unwrap();
        }
    }
}

fn failures(cells: &[Cell], outcomes: &[Outcome]) -> BTreeMap<Cell, String> {
    cells
        .iter()
        .zip(outcomes)
        .filter_map(|(c, o)| match o {
            Outcome::Connected => None,
            Outcome::Failed(why) => Some((c.clone(), why.clone())),
        })
        .collect()
}

#[test]
fn two_nodes_dual_stack_connectivity_and_forward_hook() {
    require_root!();
    let before = ip_netns_list();
    let (a, b) = (node("node-a", 1), node("node-b", 2));
    let t0 = Instant::now();
    let mut lab = LabNet::create(&[a.clone(), b.clone()]).unwrap();
    let pods = vec![
        pod("default/a1", &a, 10),
        pod("default/a2", &a, 11),
        pod("default/b1", &b, 10),
        pod("other/b2", &b, 11),
        host_pod("kube-system/host-a", &a),
    ];
    for p in &pods {
        lab.add_pod(p).unwrap();
    }
    eprintln!(
        "topology (2 nodes, 5 pods, one add_pod each): {:?}",
        t0.elapsed()
    );

    let names = lab.netns_names();
    assert_eq!(names.len(), 1 + 2 + 4, "{names:?}");
    let during = ip_netns_list();
    for n in &names {
        assert!(during.contains(n), "{n} missing from `ip netns list`");
        assert!(n.len() <= 15, "{n} is longer than an interface name");
    }
    assert_eq!(
        lab.pod_netns("kube-system/host-a"),
        lab.node_netns("node-a")
    );
    assert_ne!(lab.pod_netns("default/a1"), lab.pod_netns("default/a2"));

    // Sysctls really are set in the node namespace.
    let sysctl = |key: &str| {
        netns::in_netns(lab.node_netns("node-a").unwrap(), || {
            std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap()
        })
        .unwrap()
        .trim()
        .to_string()
    };
    assert_eq!(sysctl("net/bridge/bridge-nf-call-iptables"), "1");
    assert_eq!(sysctl("net/bridge/bridge-nf-call-ip6tables"), "1");
    assert_eq!(sysctl("net/ipv4/ip_forward"), "1");
    assert_eq!(sysctl("net/ipv6/conf/all/forwarding"), "1");

    let ports = [(Proto::Tcp, 80), (Proto::Udp, 80), (Proto::Tcp, 81)];
    let mut servers = Servers::new();
    serve_all(&mut servers, &lab, &pods, &ports);
    serve_all(&mut servers, &lab, &pods, &ports); // idempotent
    if !sctp_supported() {
        assert!(servers
            .ensure(lab.pod_netns("default/a1").unwrap(), 80, Proto::Sctp)
            .is_err());
    }

    let (cells, reqs) = matrix(&lab, &pods, &ports);
    assert_eq!(reqs.len(), 5 * 4 * 2 * 3);
    let t = Instant::now();
    let outcomes = run_probes(&reqs, TIMEOUT, PARALLELISM);
    eprintln!("{} probes, all allowed: {:?}", reqs.len(), t.elapsed());
    assert_eq!(outcomes.len(), reqs.len());
    let failed = failures(&cells, &outcomes);
    assert!(failed.is_empty(), "unexpected failures: {failed:#?}");

    // Nothing listens on 82: TCP is refused at once, UDP gets a port unreachable.
    let closed = |proto| ProbeReq {
        from_netns: lab.pod_netns("default/a1").unwrap().into(),
        to: SocketAddr::new(ip("10.244.2.10"), 82),
        proto,
    };
    let t = Instant::now();
    let out = run_probes(&[closed(Proto::Tcp), closed(Proto::Udp)], TIMEOUT, 2);
    assert_eq!(
        out,
        vec![
            Outcome::Failed("refused".into()),
            Outcome::Failed("refused".into())
        ]
    );
    assert!(t.elapsed() < TIMEOUT, "refusals should not wait");

    // Drop TCP/80 to a2's IPv4 address in node-a's forward hook: same-node (bridged, via
    // br_netfilter) and cross-node (routed) probes fail; node-a's own traffic (hostNetwork pod,
    // output path) and everything else still passes.
    let a2_v4 = ip("10.244.1.11");
    let node_a = lab.node_netns("node-a").unwrap().to_string();
    nft(
        &node_a,
        &format!(
            "add table inet t\n\
             add chain inet t f {{ type filter hook forward priority 0; }}\n\
             add rule inet t f ip daddr {a2_v4} tcp dport 80 drop\n"
        ),
    );
    let t = Instant::now();
    let outcomes = run_probes(&reqs, TIMEOUT, PARALLELISM);
    let elapsed = t.elapsed();
    eprintln!("{} probes, some denied: {elapsed:?}", reqs.len());
    let failed = failures(&cells, &outcomes);
    let expected: BTreeSet<Cell> = cells
        .iter()
        .filter(|c| {
            c.addr == SocketAddr::new(a2_v4, 80)
                && c.proto == Proto::Tcp
                && c.from != "kube-system/host-a"
        })
        .cloned()
        .collect();
    let expected_from: BTreeSet<&str> = expected.iter().map(|c| c.from.as_str()).collect();
    assert_eq!(
        expected_from,
        BTreeSet::from(["default/a1", "default/b1", "other/b2"])
    );
    assert_eq!(
        failed.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "failures: {failed:#?}"
    );
    assert!(failed.values().all(|why| why == "timeout"), "{failed:#?}");
    assert!(
        elapsed < TIMEOUT * 3,
        "denied probes ran serially? {elapsed:?}"
    );

    // Cleanup removes every namespace it created, and only those.
    drop(servers);
    lab.cleanup();
    lab.cleanup(); // idempotent
    let after = ip_netns_list();
    assert!(
        with_prefix(&after, lab.prefix()).is_empty(),
        "left behind: {:?}",
        with_prefix(&after, lab.prefix())
    );
    assert!(with_prefix(&before, lab.prefix()).is_empty());
    for n in &names {
        assert!(!after.contains(n), "{n} still listed");
    }
    assert!(lab.netns_names().is_empty());
}

#[test]
fn remove_and_readd_pod_while_a_server_holds_the_old_namespace() {
    require_root!();
    let (a, b) = (node("node-a", 1), node("node-b", 2));
    let mut lab = LabNet::create(&[a.clone(), b.clone()]).unwrap();
    let x = pod("default/x", &a, 20);
    let y = pod("default/y", &b, 20);
    lab.add_pods(&[x.clone(), y.clone()]).unwrap();
    let mut servers = Servers::new();
    let old_x = lab.pod_netns("default/x").unwrap().to_string();
    servers.ensure(&old_x, 80, Proto::Tcp).unwrap();
    servers.ensure(&old_x, 80, Proto::Udp).unwrap();

    lab.remove_pod("default/x").unwrap();
    assert!(lab.pod_netns("default/x").is_none());
    assert!(!ip_netns_list().contains(&old_x));
    assert!(lab.remove_pod("default/x").is_err());

    // The old namespace lives on (its server's sockets hold it) but is cut off: the same IPs
    // now reach the new pod, which serves nothing yet.
    lab.add_pod(&x).unwrap();
    let new_x = lab.pod_netns("default/x").unwrap().to_string();
    assert_ne!(new_x, old_x);
    let from_y = lab.pod_netns("default/y").unwrap().to_string();
    let reqs: Vec<ProbeReq> = x
        .ips
        .iter()
        .map(|ip| ProbeReq {
            from_netns: from_y.clone(),
            to: SocketAddr::new(*ip, 80),
            proto: Proto::Tcp,
        })
        .collect();
    assert_eq!(
        run_probes(&reqs, TIMEOUT, 8),
        vec![Outcome::Failed("refused".into()); 2]
    );
    servers.ensure(&new_x, 80, Proto::Tcp).unwrap();
    assert_eq!(run_probes(&reqs, TIMEOUT, 8), vec![Outcome::Connected; 2]);

    // Errors name what is wrong.
    let bad = PodSpec {
        ips: vec![ip("10.99.0.1")],
        ..pod("default/bad", &a, 30)
    };
    let err = format!("{:#}", lab.add_pod(&bad).unwrap_err());
    assert!(err.contains("10.99.0.1") && err.contains("node-a"), "{err}");
    let err = format!(
        "{:#}",
        lab.add_pod(&PodSpec {
            node: "nope".into(),
            ..pod("default/bad", &a, 30)
        })
        .unwrap_err()
    );
    assert!(err.contains("nope"), "{err}");
    assert!(lab.pod_netns("default/bad").is_none());
}

#[test]
fn failed_create_names_the_command_and_cleans_up() {
    require_root!();
    let mut a = node("node-a", 1);
    a.host_ips.push(a.host_ips[0]); // the second `addr add` fails
    let err = format!("{:#}", LabNet::create(&[a]).unwrap_err());
    assert!(
        err.contains("-batch -") && err.contains("addr add 198.18.0.1/24 dev eth0"),
        "{err}"
    );
    assert!(err.contains("already assigned"), "{err}");
    // The message names the namespace (`ip -n sl......-n1 ...`): none of that run survives.
    let ns = err
        .split_whitespace()
        .find(|w| w.starts_with("sl") && w.ends_with("-n1"))
        .unwrap_or_else(|| panic!("no namespace in {err}"));
    let prefix = ns.trim_end_matches("-n1");
    assert!(with_prefix(&ip_netns_list(), prefix).is_empty());
}

#[test]
fn drop_during_panic_deletes_namespaces() {
    require_root!();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let a = node("node-a", 1);
        let mut lab = LabNet::create(std::slice::from_ref(&a)).unwrap();
        lab.add_pod(&pod("default/p", &a, 10)).unwrap();
        tx.send((lab.prefix().to_string(), lab.netns_names()))
            .unwrap();
        panic!("deliberate panic with a live LabNet");
    })
    .join();
    assert!(result.is_err());
    let (prefix, names) = rx.recv().unwrap();
    assert_eq!(names.len(), 3);
    let after = ip_netns_list();
    assert!(
        with_prefix(&after, &prefix).is_empty(),
        "left behind: {:?}",
        with_prefix(&after, &prefix)
    );
}

#[test]
fn three_nodes_twelve_pods_fast_setup_and_parallel_denials() {
    require_root!();
    let nodes: Vec<NodeSpec> = (1..=3).map(|i| node(&format!("n{i}"), i)).collect();
    let pods: Vec<PodSpec> = (0..12)
        .map(|i| pod(&format!("ns{}/p{i}", i % 3), &nodes[i % 3], 10 + i as u8))
        .collect();
    let t = Instant::now();
    let mut lab = LabNet::create(&nodes).unwrap();
    let t_nodes = t.elapsed();
    lab.add_pods(&pods).unwrap();
    let t_all = t.elapsed();
    eprintln!("3 nodes: {t_nodes:?}; + 12 pods (add_pods): {t_all:?}");
    assert!(t_all < Duration::from_secs(3), "setup took {t_all:?}");

    let ports = [(Proto::Tcp, 80), (Proto::Udp, 80)];
    let mut servers = Servers::new();
    serve_all(&mut servers, &lab, &pods, &ports);
    let (cells, reqs) = matrix(&lab, &pods, &ports);
    assert_eq!(reqs.len(), 12 * 11 * 2 * 2);
    let t = Instant::now();
    let outcomes = run_probes(&reqs, TIMEOUT, PARALLELISM);
    eprintln!("{} probes, all allowed: {:?}", reqs.len(), t.elapsed());
    let failed = failures(&cells, &outcomes);
    assert!(failed.is_empty(), "{failed:#?}");

    // Deny every forwarded probe: each one costs the full timeout, so only parallelism keeps
    // this at about two timeouts (528 probes over 256 threads).
    for n in &nodes {
        nft(
            lab.node_netns(&n.name).unwrap(),
            "add table inet t\n\
             add chain inet t f { type filter hook forward priority 0; }\n\
             add rule inet t f meta l4proto { tcp, udp } th dport 80 drop\n",
        );
    }
    let t = Instant::now();
    let outcomes = run_probes(&reqs, TIMEOUT, PARALLELISM);
    let elapsed = t.elapsed();
    eprintln!("{} probes, all denied: {elapsed:?}", reqs.len());
    assert!(outcomes
        .iter()
        .all(|o| *o == Outcome::Failed("timeout".into())));
    assert!(elapsed < TIMEOUT * 4, "{elapsed:?}");
}

/// Child half of `signal_cleans_up_and_exits_130`: does nothing unless spawned by it.
#[test]
fn signal_cleanup_child() {
    if std::env::var_os("SLUICE_E2E_SIGNAL_CHILD").is_none() {
        return;
    }
    netns::install_signal_cleanup().unwrap();
    netns::install_signal_cleanup().unwrap(); // once per process, second call is a no-op
    let a = node("node-a", 1);
    let mut lab = LabNet::create(std::slice::from_ref(&a)).unwrap();
    lab.add_pod(&pod("default/p", &a, 10)).unwrap();
    println!("READY {}", lab.prefix());
    std::thread::sleep(Duration::from_secs(30));
    panic!("no signal arrived");
}

#[test]
fn signal_cleans_up_and_exits_130() {
    require_root!();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "signal_cleanup_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SLUICE_E2E_SIGNAL_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let prefix = stdout
        .lines()
        .map(|l| l.unwrap())
        // libtest prints "test signal_cleanup_child ... " on the same line first.
        .find_map(|l| l.split_once("READY ").map(|(_, p)| p.trim().to_string()))
        .expect("child never got ready");
    assert_eq!(with_prefix(&ip_netns_list(), &prefix).len(), 3);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(with_prefix(&ip_netns_list(), &prefix).is_empty());
}

/// `ip -n <netns> -j <args>`, parsed.
fn ip_json(netns: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip -n {netns} -j {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What `add_pods` promises on return, read back with iproute2: on each pod's node, cni0 up
/// with carrier and every port forwarding; each pod's eth0 operationally UP and its addresses
/// local (IPv6 ones become so asynchronously).
fn assert_pods_ready(lab: &LabNet, nodes: &[&NodeSpec], pods: &[PodSpec]) {
    for n in nodes {
        let links = ip_json(lab.node_netns(&n.name).unwrap(), &["-d", "link", "show"]);
        let up = |l: &serde_json::Value| {
            l["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "LOWER_UP")
        };
        let cni0 = links.iter().find(|l| l["ifname"] == "cni0").unwrap();
        // UNKNOWN: a bridge the kernel's link watcher has not seen since it came up.
        assert!(
            up(cni0) && (cni0["operstate"] == "UP" || cni0["operstate"] == "UNKNOWN"),
            "{}: {cni0}",
            n.name
        );
        let ports: Vec<_> = links.iter().filter(|l| l["master"] == "cni0").collect();
        let on_node = pods.iter().filter(|p| p.node == n.name).count();
        assert_eq!(ports.len(), on_node, "{}: {ports:?}", n.name);
        for p in ports {
            let state = &p["linkinfo"]["info_slave_data"]["state"];
            assert!(
                up(p) && p["operstate"] == "UP" && state == "forwarding",
                "{}: {p}",
                n.name
            );
        }
    }
    for p in pods {
        let netns = lab.pod_netns(&p.key).unwrap();
        let eth0 = &ip_json(netns, &["link", "show", "eth0"])[0];
        assert_eq!(eth0["operstate"], "UP", "{}: {eth0}", p.key);
        let mut local = ip_json(netns, &["-4", "route", "show", "table", "local"]);
        local.extend(ip_json(netns, &["-6", "route", "show", "table", "local"]));
        for ip in &p.ips {
            assert!(
                local.iter().any(|r| r["dst"] == ip.to_string()),
                "{}: {ip} not local: {local:?}",
                p.key
            );
        }
    }
}

#[test]
fn add_pods_returns_once_links_are_up_and_addresses_local() {
    require_root!();
    let (a, b) = (node("node-a", 1), node("node-b", 2));
    let mut lab = LabNet::create(&[a.clone(), b.clone()]).unwrap();
    let pods: Vec<PodSpec> = (0..6)
        .map(|i| pod(&format!("default/p{i}"), [&a, &b][i % 2], 10 + i as u8))
        .collect();
    lab.add_pods(&pods).unwrap();
    assert_pods_ready(&lab, &[&a, &b], &pods);

    // Replacing a node's only pod takes cni0's carrier away and gives it back.
    let c = node("node-c", 3);
    let mut lab = LabNet::create(std::slice::from_ref(&c)).unwrap();
    let x = pod("default/x", &c, 20);
    lab.add_pod(&x).unwrap();
    for _ in 0..5 {
        lab.remove_pod(&x.key).unwrap();
        lab.add_pod(&x).unwrap();
        assert_pods_ready(&lab, &[&c], std::slice::from_ref(&x));
    }
}
