//! The CNI start gate through the real chain: flannel's CNI plugin (delegating to the real
//! bridge and host-local plugins, from `e2e/cni-plugins`), then `sluice-cni`, invoked by the real
//! `cnitool` exactly as a container runtime would, against `sluice agent` on a real control plane.
//!
//! Root only (skipped otherwise, like the other control-plane tests). The node is a network
//! namespace holding the agent; each pod is a network namespace flannel's chain wires to it.

// Not every test file uses every shared helper.
#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{block, metric, repo_root, unique, Fixture, Process};
use sluice_cni::protocol::{client, Attachment, Request, Response};

#[test]
#[ignore = "helper: run by the tests inside a network namespace"]
fn netns_helper() {
    common::helper_main();
}

/// The real CNI plugins, built (once per machine) by `e2e/cni-plugins`.
fn plugin_dir() -> PathBuf {
    let script = repo_root().join("e2e/cni-plugins");
    let out = Command::new(&script)
        .arg("build")
        .stdout(Stdio::null())
        .output()
        .expect("e2e/cni-plugins");
    assert!(
        out.status.success(),
        "e2e/cni-plugins build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&script)
        .arg("path")
        .output()
        .expect("e2e/cni-plugins path");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Where cargo put `sluice-cni` (built by `cargo test --workspace` with its own tests).
fn sluice_cni_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_sluice"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    assert!(
        dir.join("sluice-cni").exists(),
        "{}/sluice-cni is missing: run the tests with `cargo test --workspace` (or `cargo build -p sluice-cni` first)",
        dir.display()
    );
    dir
}

/// A node's CNI setup: flannel's conflist (as flannel's manifest writes it) followed by
/// sluice-cni, flannel's subnet.env, and state dirs, all in a temp dir.
struct Chain {
    dir: PathBuf,
    node_ns: String,
    path: String,
}

impl Chain {
    fn new(fx: &Fixture, fail_mode: &str) -> Chain {
        let dir = fx.cp.dir.join(unique("cni"));
        for sub in ["conf", "bin", "flannel", "varlib", "run"] {
            std::fs::create_dir_all(dir.join(sub)).expect("cni dirs");
        }
        std::fs::write(
            dir.join("run/subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .expect("subnet.env");
        // flannel's conflist as flannel's manifest writes it (state paths in the temp dir) ...
        let conflist = serde_json::json!({
            "name": "cbr0",
            "cniVersion": "0.3.1",
            "plugins": [
                {
                    "type": "flannel",
                    "subnetFile": dir.join("run/subnet.env"),
                    "dataDir": dir.join("flannel"),
                    "delegate": {"hairpinMode": true, "isDefaultGateway": true}
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(
            dir.join("conf/10-flannel.conflist"),
            serde_json::to_string_pretty(&conflist).expect("json"),
        )
        .expect("conflist");
        // ... and sluice chained after it by the installer, as on a real node.
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("install-cni")
            .arg("--once")
            .arg("--cni-bin-dir")
            .arg(dir.join("bin"))
            .arg("--cni-conf-dir")
            .arg(dir.join("conf"))
            .arg("--plugin-binary")
            .arg(sluice_cni_dir().join("sluice-cni"))
            .arg("--agent-socket")
            .arg(fx.cni_socket())
            .args(["--timeout", "5s", "--fail-mode", fail_mode])
            .output()
            .expect("sluice install-cni");
        assert!(
            out.status.success(),
            "install-cni: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = format!("{}:{}", dir.join("bin").display(), plugin_dir().display());
        Chain {
            dir,
            node_ns: fx.ns.name().to_string(),
            path,
        }
    }

    /// `cnitool <command> cbr0 /run/netns/<pod netns>` inside the node namespace, with
    /// /var/lib bound to a temp dir (host-local leases, cnitool's result cache).
    fn cnitool(&self, command: &str, pod_ns: &str, namespace: &str, pod: &str) -> Output {
        let cnitool = Path::new(self.path.rsplit(':').next().unwrap_or("")).join("cnitool");
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}");
        Command::new("ip")
            .args(["netns", "exec", &self.node_ns, "sh", "-c"])
            .arg(r#"mount --bind "$1" /var/lib && shift && exec "$@""#)
            .arg("sh")
            .arg(self.dir.join("varlib"))
            .arg("env")
            .arg(format!("CNI_PATH={}", self.path))
            .arg(format!("NETCONFPATH={}", self.dir.join("conf").display()))
            .arg("CNI_IFNAME=eth0")
            .arg(format!("CNI_ARGS={args}"))
            .arg(cnitool)
            .args([command, "cbr0", &format!("/run/netns/{pod_ns}")])
            .output()
            .expect("cnitool")
    }
}

/// A pod's network namespace, removed when dropped.
struct PodNs(String);

impl PodNs {
    fn new(tag: &str) -> PodNs {
        let name = unique(tag);
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        PodNs(name)
    }

    /// The pod's IPv4 address on eth0, as the chain configured it.
    fn ipv4(&self) -> String {
        let out = common::exec_in(&self.0, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .expect("ip addr");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .unwrap_or_else(|| panic!("no IPv4 address on eth0 in {}: {text}", self.0))
            .to_string()
    }
}

impl Drop for PodNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn helper_in(netns: &str, mode: &str, envs: &[(&str, &str)]) -> Command {
    let exe = std::env::current_exe().expect("test binary");
    let mut c = common::exec_in(
        netns,
        &[
            &exe.to_string_lossy(),
            "netns_helper",
            "--exact",
            "--ignored",
            "--nocapture",
        ],
    );
    c.env("SLUICE_TEST_HELPER", mode);
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

/// One TCP connection from `from` to `addr`: connected | refused | timeout | ...
fn connect(from: &str, addr: &str) -> String {
    let out = helper_in(from, "connect", &[("SLUICE_TEST_ADDR", addr)])
        .output()
        .expect("connect helper");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("HELPER-CONNECT "))
        .unwrap_or("none")
        .to_string()
}

/// Datagrams a UDP receiver in `pod` on `port` got while `send` ran (then 1 s more).
fn udp_received(pod: &PodNs, port: u16, send: impl FnOnce()) -> usize {
    use std::io::BufRead as _;
    let listen = format!("0.0.0.0:{port}");
    let mut receiver = helper_in(
        &pod.0,
        "udp-count",
        &[
            ("SLUICE_TEST_LISTEN", &listen),
            ("SLUICE_TEST_SECONDS", "2"),
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("udp receiver");
    let mut lines = std::io::BufReader::new(receiver.stdout.take().expect("stdout")).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("HELPER-LISTENING"));
    assert!(listening, "the UDP receiver did not start");
    send();
    // Read to the end, so the helper never writes into a closed pipe.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let count = rest
        .iter()
        .find_map(|l| l.strip_prefix("HELPER-RECEIVED "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the receiver's count");
    let _ = receiver.wait();
    count
}

/// Three UDP datagrams from `pod` with source `from`, through a raw socket.
fn spoof(pod: &str, from: &str, to: &str) {
    let out = helper_in(
        pod,
        "spoof",
        &[("SLUICE_TEST_FROM", from), ("SLUICE_TEST_ADDR", to)],
    )
    .output()
    .expect("spoof helper");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("HELPER-SENT 3"),
        "spoof helper: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ingress_map_has(table: &str, ip: &str) -> bool {
    block(table, "map ingress_v4").contains(&format!("{ip} :"))
}

fn unscheduled_pod(fx: &Fixture, ns: &str, name: &str, role: &str) {
    fx.cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: {ns}, name: {name}, labels: {{role: {role}}}}}\n\
         spec:\n  nodeName: {}\n  containers:\n  - name: c\n    image: example.invalid/server\n    ports: [{{name: http, containerPort: 8080}}]\n",
        common::NODE
    ));
}

#[test]
fn a_pod_starts_only_once_its_policy_is_in_the_kernel() {
    let Some(fx) = Fixture::new() else { return };
    let cp = &fx.cp;
    cp.namespace("x", "team: a");
    // db pods take ingress only from role=web; the pods have no IP in the API (no kubelet).
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {namespace: x, name: db-from-web}\n\
         spec: {podSelector: {matchLabels: {role: db}}, policyTypes: [Ingress],\n\
         ingress: [{from: [{podSelector: {matchLabels: {role: web}}}]}]}\n",
    );
    for (name, role) in [("db", "db"), ("web", "web"), ("other", "other")] {
        unscheduled_pod(&fx, "x", name, role);
    }
    let agent = fx.start_agent("agent");
    fx.wait_ready(&agent);
    let chain = Chain::new(&fx, "closed");

    // ADD through flannel -> bridge -> host-local -> portmap -> sluice-cni.
    let db = PodNs::new("db");
    let out = chain.cnitool("add", &db.0, "x", "db");
    assert!(
        out.status.success(),
        "ADD db failed: {}\n{}\n--- agent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    // The instant ADD returns, the pod's IP is already isolated in the kernel.
    let db_ip = db.ipv4();
    let table = fx.table();
    assert!(
        ingress_map_has(&table, &db_ip),
        "db's IP {db_ip} must be in ingress_v4 when ADD returns:\n{table}"
    );
    // The result the runtime gets is flannel's, passed through.
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("ADD result is JSON");
    assert_eq!(result["cniVersion"], "0.3.1", "{result}");
    assert!(
        result["ips"][0]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{db_ip}/"))),
        "{result}"
    );

    // db serves; web may connect, other may not, from their first packet.
    let _server = Process(
        helper_in(&db.0, "listen", &[("SLUICE_TEST_LISTEN", "0.0.0.0:8080")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("server"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let web = PodNs::new("web");
    let other = PodNs::new("other");
    for (ns, name) in [(&web, "web"), (&other, "other")] {
        let out = chain.cnitool("add", &ns.0, "x", name);
        assert!(
            out.status.success(),
            "ADD {name} failed: {}\n--- agent log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            agent.log_text()
        );
    }
    let target = format!("{db_ip}:8080");
    assert_eq!(connect(&web.0, &target), "connected", "web -> db");
    assert_eq!(connect(&other.0, &target), "timeout", "other -> db");

    // Spoofing: `other` forges web's source address (which db's policy allows) through a raw
    // socket. Its veth may only send from its own address, so nothing reaches db. The same
    // from web itself, with its own address, arrives: the receiver really listens.
    let web_ip = web.ipv4();
    let spoofed = udp_received(&db, 9999, || {
        spoof(&other.0, &web_ip, &format!("{db_ip}:9999"));
    });
    assert_eq!(spoofed, 0, "spoofed datagrams must not reach db");
    let genuine = udp_received(&db, 9999, || {
        spoof(&web.0, &web_ip, &format!("{db_ip}:9999"));
    });
    assert_eq!(genuine, 3, "web's own datagrams reach db");
    fx.wait_metrics("the spoofed frames counted", &agent, |m| {
        metric(m, "sluice_spoofed_packets_total", &[]).unwrap_or(0.0) >= 3.0
    });

    let metrics = fx.metrics();
    assert_eq!(
        metric(
            &metrics,
            "sluice_cni_requests_total",
            &[("op", "add"), ("result", "ok")]
        ),
        Some(3.0),
        "{metrics}"
    );

    // CHECK (flannel's conflist is 0.3.1, which has no CHECK, so over the socket as sluice-cni
    // would send it): the agent knows the attachment and its rules are in; STATUS: synced.
    let attachment = Attachment {
        container_id: cnitool_container_id(&db.0),
        ifname: "eth0".into(),
    };
    assert_eq!(
        ask(&fx, Request::Check(attachment.clone())),
        Response::ok(),
        "CHECK db"
    );
    assert_eq!(ask(&fx, Request::Status), Response::ok(), "STATUS");
    let out = chain.cnitool("del", &db.0, "x", "db");
    assert!(out.status.success(), "DEL db");
    fx.wait_for("db's IP out of the table after DEL", &agent, |t| {
        !ingress_map_has(t, &db_ip)
    });
    let out = chain.cnitool("del", &db.0, "x", "db");
    assert!(out.status.success(), "a second DEL is fine too");

    // GC: the runtime lists the attachments that are still valid (web); other's registration
    // goes, and with it other's veth from the anti-spoofing table.
    let bridge = || {
        common::exec_in(
            fx.ns.name(),
            &["nft", "list", "set", "bridge", "sluice", "pod_ports"],
        )
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
    };
    let ports_before = bridge();
    let web_attachment = Attachment {
        container_id: cnitool_container_id(&web.0),
        ifname: "eth0".into(),
    };
    assert_eq!(
        ask(
            &fx,
            Request::Gc {
                valid: vec![web_attachment.clone()]
            }
        ),
        Response::ok()
    );
    assert_eq!(
        ask(&fx, Request::Check(web_attachment)),
        Response::ok(),
        "web stays"
    );
    let other_attachment = Attachment {
        container_id: cnitool_container_id(&other.0),
        ifname: "eth0".into(),
    };
    assert_eq!(
        ask(&fx, Request::Check(other_attachment)).code,
        Some(3),
        "other is gone"
    );
    fx.wait_for("one veth fewer in the anti-spoofing table", &agent, |_| {
        bridge().matches("veth").count() + 1 == ports_before.matches("veth").count()
    });
    let answer = ask(&fx, Request::Check(attachment));
    assert_eq!(
        answer.code,
        Some(3),
        "CHECK after DEL: unknown attachment: {answer:?}"
    );
}

/// The container id cnitool gives an attachment: "cnitool-" and 20 hex digits of the SHA-512
/// of the netns path.
fn cnitool_container_id(pod_ns: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha512::digest(format!("/run/netns/{pod_ns}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("cnitool-{}", &hex[..20])
}

/// One request to the agent's CNI socket, as sluice-cni sends it.
fn ask(fx: &Fixture, request: Request) -> Response {
    client::call(&fx.cni_socket(), &request, Duration::from_secs(5)).expect("agent answers")
}

#[test]
fn without_its_policy_a_pod_does_not_start() {
    let Some(fx) = Fixture::new() else { return };
    let cp = &fx.cp;
    cp.namespace("x", "team: a");
    let mut agent = fx.start_agent_with("agent", &["--cni-orphan-ttl", "1s"]);
    fx.wait_ready(&agent);
    let closed = Chain::new(&fx, "closed");

    // A pod the API does not know (its policy cannot be known): try again later (code 11).
    let ghost = PodNs::new("ghost");
    let out = closed.cnitool("add", &ghost.0, "x", "ghost");
    assert!(!out.status.success(), "ADD of an unknown pod must fail");
    // libcni reports the plugin's error on stderr; it names the pod and the fail mode.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("x/ghost")
            && stderr.contains("not in the agent's cache")
            && stderr.contains("failMode is closed"),
        "{stderr}"
    );
    // The agent registered the attachment anyway (its IPs are known); with no Pod ever
    // appearing, the registration is dropped after --cni-orphan-ttl (1 s here).
    let ghost_attachment = Attachment {
        container_id: cnitool_container_id(&ghost.0),
        ifname: "eth0".into(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = ask(&fx, Request::Check(ghost_attachment.clone()));
        if answer.code == Some(3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan registration was not dropped: {answer:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        agent.log_text().contains("never appeared"),
        "the drop is logged"
    );
    // The runtime tears the sandbox down after a failed ADD.
    let out = closed.cnitool("del", &ghost.0, "x", "ghost");
    assert!(out.status.success(), "DEL after a failed ADD");

    // The agent is down: fail closed refuses the pod; fail open lets it start and says so.
    unscheduled_pod(&fx, "x", "late", "db");
    agent.terminate();
    let late = PodNs::new("late");
    let out = closed.cnitool("add", &late.0, "x", "late");
    assert!(!out.status.success(), "fail closed with the agent down");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not reachable") && stderr.contains("failMode is closed"),
        "{stderr}"
    );
    let out = closed.cnitool("del", &late.0, "x", "late");
    assert!(
        out.status.success(),
        "DEL succeeds with the agent down: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let open = Chain::new(&fx, "open");
    let out = open.cnitool("add", &late.0, "x", "late");
    assert!(
        out.status.success(),
        "fail open starts the pod with the agent down: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent"),
        "fail open says why: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
