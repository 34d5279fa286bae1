//! The agent against a real control plane (`e2e/controlplane`: etcd + kube-apiserver), running
//! as node `node-1` inside its own network namespace. Objects are created through the API (pod
//! status patched as a kubelet would) and the table in that namespace is asserted.
//!
//! Root only; skipped with a message when not root or when the control plane cannot come up.
//! Everything (control plane, network namespace, processes) is removed even when a test fails.
//!
//! The API server listens on the host's loopback, which a network namespace cannot reach, so
//! the test relays it: a unix socket in the host namespace (files are not per-namespace) and a
//! TCP listener on the node's loopback at the same port, run by this test binary re-executed
//! inside the namespace (`netns_helper`). The kubeconfig then works unchanged.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NODE: &str = "node-1";
const AGENT_LISTEN: &str = "127.0.0.1:9763";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("sluice-{tag}-{}-{nanos:x}", std::process::id())
}

/// A running control plane; `down` when dropped.
struct ControlPlane {
    dir: PathBuf,
    kubeconfig: String,
    path: String,
}

impl ControlPlane {
    fn up() -> Result<ControlPlane, String> {
        let dir = std::env::temp_dir().join(unique("cp"));
        let script = repo_root().join("e2e/controlplane");
        let mut cp = ControlPlane {
            dir: dir.clone(),
            kubeconfig: String::new(),
            path: String::new(),
        };
        let out = Command::new(&script)
            .arg("up")
            .env("SLUICE_CP_DIR", &dir)
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "e2e/controlplane up failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let env = Command::new(&script)
            .arg("env")
            .env("SLUICE_CP_DIR", &dir)
            .output()
            .map_err(|e| format!("e2e/controlplane env: {e}"))?;
        let text = String::from_utf8_lossy(&env.stdout).to_string();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        };
        let kubeconfig = value("KUBECONFIG").ok_or(format!("no KUBECONFIG in: {text}"))?;
        let path = value("PATH").ok_or(format!("no PATH in: {text}"))?;
        cp.kubeconfig = kubeconfig;
        cp.path = path;
        Ok(cp)
    }

    fn api_port(&self) -> u16 {
        let text = std::fs::read_to_string(&self.kubeconfig).expect("kubeconfig");
        let server = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("server in kubeconfig");
        server
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("port in server URL")
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        {
            let mut input = child.stdin.take().expect("stdin");
            if let Some(s) = stdin {
                input.write_all(s.as_bytes()).expect("kubectl stdin");
            }
        }
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("e2e/controlplane"))
            .arg("down")
            .env("SLUICE_CP_DIR", &self.dir)
            .status();
    }
}

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = unique("agent");
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        let ns = Netns(name);
        let ok = ns
            .exec(&["ip", "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "lo up in {}", ns.0);
        ns
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    /// `nft list table inet sluice` in the namespace ("" when there is none).
    fn table(&self) -> String {
        self.exec(&["nft", "list", "table", "inet", "sluice"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    /// The test binary itself, re-run inside the namespace as a helper.
    fn helper(&self, mode: &str, envs: &[(&str, &str)]) -> Command {
        let exe = std::env::current_exe().expect("test binary");
        let exe = exe.to_string_lossy().to_string();
        let mut c = self.exec(&[&exe, "netns_helper", "--exact", "--ignored", "--nocapture"]);
        c.env("SLUICE_TEST_HELPER", mode);
        for (k, v) in envs {
            c.env(k, v);
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed (by its own pid) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pipe(mut from: impl std::io::Read, mut to: impl std::io::Write + ShutdownWrite) {
    let _ = std::io::copy(&mut from, &mut to);
    to.shutdown_write();
}

trait ShutdownWrite {
    fn shutdown_write(&self);
}

impl ShutdownWrite for TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl ShutdownWrite for UnixStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Host side of the relay: unix socket -> the API server on the host's loopback.
fn relay_unix_to_tcp(listener: UnixListener, port: u16) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(unix) = conn else { break };
            let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            let (Ok(unix2), Ok(tcp2)) = (unix.try_clone(), tcp.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || pipe(unix, tcp));
            std::thread::spawn(move || pipe(tcp2, unix2));
        }
    });
}

/// Runs only when re-executed by the test inside a network namespace.
#[test]
#[ignore = "helper: run by agent_programs_the_node_from_the_api_server inside the node's netns"]
fn netns_helper() {
    match std::env::var("SLUICE_TEST_HELPER").as_deref() {
        // The node side of the relay: TCP on the node's loopback -> the host's unix socket.
        Ok("relay") => {
            let listen = std::env::var("SLUICE_TEST_LISTEN").expect("listen");
            let socket = std::env::var("SLUICE_TEST_SOCKET").expect("socket");
            let listener = TcpListener::bind(&listen).expect("bind relay");
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { break };
                let Ok(unix) = UnixStream::connect(&socket) else {
                    continue;
                };
                let (Ok(unix2), Ok(tcp2)) = (unix.try_clone(), tcp.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || pipe(tcp, unix));
                std::thread::spawn(move || pipe(unix2, tcp2));
            }
        }
        // One HTTP GET; prints the status code, then the body.
        Ok("get") => {
            let addr = std::env::var("SLUICE_TEST_ADDR").expect("addr");
            let path = std::env::var("SLUICE_TEST_PATH").expect("path");
            let text = TcpStream::connect(&addr)
                .and_then(|mut s| {
                    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
                    let mut text = String::new();
                    s.read_to_string(&mut text)?;
                    Ok(text)
                })
                .unwrap_or_default();
            let status = text.split_whitespace().nth(1).unwrap_or("none");
            println!("HELPER-STATUS {status}");
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            for line in body.lines() {
                println!("HELPER-BODY {line}");
            }
        }
        _ => {}
    }
}

fn http_status(ns: &Netns, path: &str) -> String {
    http_get(ns, path).0
}

/// Status code and body of a GET to the agent, from inside the node's namespace.
fn http_get(ns: &Netns, path: &str) -> (String, String) {
    let out = ns
        .helper(
            "get",
            &[
                ("SLUICE_TEST_ADDR", AGENT_LISTEN),
                ("SLUICE_TEST_PATH", path),
            ],
        )
        .output()
        .expect("helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let status = stdout
        .lines()
        .find_map(|l| l.strip_prefix("HELPER-STATUS "))
        .unwrap_or("none")
        .to_string();
    let body: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("HELPER-BODY "))
        .collect();
    (status, body.join("\n"))
}

/// The elements of a map or set block in `nft list` output ("" when absent).
fn block<'a>(table: &'a str, header: &str) -> &'a str {
    let Some(start) = table.find(header) else {
        return "";
    };
    let rest = &table[start..];
    let end = rest.find("\n\t}").unwrap_or(rest.len());
    &rest[..end]
}

fn wait_for(what: &str, ns: &Netns, agent_log: &Path, cond: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let table = ns.table();
        if cond(&table) {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(agent_log).unwrap_or_default();
            panic!("timed out waiting for: {what}\n--- table:\n{table}\n--- agent log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pod(ns: &str, name: &str, role: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{namespace: {ns}, name: {name}, labels: {{role: {role}}}}}
spec:
  nodeName: {NODE}
  containers:
  - name: c
    image: example.invalid/server
    ports: [{{name: http, containerPort: 8080}}]
"
    )
}

#[test]
fn agent_programs_the_node_from_the_api_server() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, nft)");
        return;
    }
    let cp = match ControlPlane::up() {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("skipped: the control plane did not come up: {e}");
            return;
        }
    };
    let ns = Netns::new();

    // Relay the API server into the node's namespace.
    let port = cp.api_port();
    let socket = cp.dir.join("api.sock");
    let listener = UnixListener::bind(&socket).expect("unix socket");
    relay_unix_to_tcp(listener, port);
    let listen = format!("127.0.0.1:{port}");
    let socket_text = socket.to_string_lossy().to_string();
    let _relay = Process(
        ns.helper(
            "relay",
            &[
                ("SLUICE_TEST_LISTEN", &listen),
                ("SLUICE_TEST_SOCKET", &socket_text),
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("relay"),
    );

    // Objects first, so the agent's initial lists already hold them.
    cp.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {namespace: x, name: default}\n",
    );
    cp.apply(&pod("x", "a", "db"));
    cp.apply(&pod("x", "b", "db"));
    for (name, ip) in [("a", "10.244.1.2"), ("b", "10.244.1.3")] {
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
        );
        cp.kubectl(
            &[
                "-n",
                "x",
                "patch",
                "pod",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status,
            ],
            None,
        );
    }

    let agent_log = cp.dir.join("agent.log");
    let log = std::fs::File::create(&agent_log).expect("agent log");
    let log2 = log.try_clone().expect("agent log");
    let mut agent = Process(
        ns.exec(&[
            env!("CARGO_BIN_EXE_sluice"),
            "agent",
            "--kubeconfig",
            &cp.kubeconfig,
            "--listen",
            AGENT_LISTEN,
            "--debounce",
            "10ms",
            "--resync",
            "2s",
        ])
        .env("NODE_NAME", NODE)
        .env(
            "RUST_LOG",
            "debug,hyper=info,tower=info,rustls=info,kube=info",
        )
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("agent"),
    );

    // A policy isolating the db pods for ingress, allowing nothing.
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {namespace: x, name: deny-db}\n\
         spec: {podSelector: {matchLabels: {role: db}}, policyTypes: [Ingress]}\n",
    );
    wait_for(
        "the policy chain and both pods in ingress_v4",
        &ns,
        &agent_log,
        |t| {
            let map = block(t, "map ingress_v4");
            t.contains("chain in.x.deny-db")
                && map.contains("10.244.1.2")
                && map.contains("10.244.1.3")
        },
    );

    // Ready once the lists are in and the first sync applied.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = http_status(&ns, "/readyz");
    while status != "200" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        status = http_status(&ns, "/readyz");
    }
    assert_eq!(status, "200", "/readyz");
    let (status, metrics) = http_get(&ns, "/metrics");
    assert_eq!(status, "200", "/metrics");
    // Both pods are isolated for ingress, and at least one sync has been applied.
    assert!(
        metrics.contains("sluice_isolated_pods{direction=\"ingress\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_syncs_total{") && l.contains("result=\"ok\"")),
        "{metrics}"
    );

    // A relabel takes b out of the policy: its IP leaves the dispatch map, a's stays.
    cp.kubectl(
        &["-n", "x", "label", "pod", "b", "role=web", "--overwrite"],
        None,
    );
    wait_for("b's IP out of ingress_v4", &ns, &agent_log, |t| {
        let map = block(t, "map ingress_v4");
        map.contains("10.244.1.2") && !map.contains("10.244.1.3")
    });

    // Drift: someone deletes the table; the next resync (2 s here) restores it whole.
    let ok = ns
        .exec(&["nft", "delete", "table", "inet", "sluice"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "nft delete table");
    wait_for("the table restored by the resync", &ns, &agent_log, |t| {
        let map = block(t, "map ingress_v4");
        t.contains("chain in.x.deny-db")
            && map.contains("10.244.1.2")
            && !map.contains("10.244.1.3")
    });

    // A namespace relabel moves a remote pod's IP out of a namespaceSelector peer set.
    cp.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: clients, labels: {team: b}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {namespace: clients, name: default}\n",
    );
    cp.apply(&pod("clients", "c", "client").replace(NODE, "node-2"));
    cp.kubectl(
        &[
            "-n",
            "clients",
            "patch",
            "pod",
            "c",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running","podIP":"10.244.2.2","podIPs":[{"ip":"10.244.2.2"}]}}"#,
        ],
        None,
    );
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {namespace: x, name: allow-from-b}\n\
         spec: {podSelector: {matchLabels: {role: db}}, policyTypes: [Ingress],\n\
         ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]}\n",
    );
    wait_for(
        "c's IP in the allow-from-b peer set",
        &ns,
        &agent_log,
        |t| t.contains("chain in.x.allow-from-b") && t.contains("10.244.2.2"),
    );
    cp.kubectl(
        &["label", "namespace", "clients", "team=c", "--overwrite"],
        None,
    );
    wait_for("c's IP out of the peer set", &ns, &agent_log, |t| {
        t.contains("chain in.x.allow-from-b") && !t.contains("10.244.2.2")
    });

    // Deleting the policies removes their chains and un-isolates a.
    cp.kubectl(
        &["-n", "x", "delete", "networkpolicy", "allow-from-b"],
        None,
    );
    cp.kubectl(&["-n", "x", "delete", "networkpolicy", "deny-db"], None);
    wait_for("the policy chains gone", &ns, &agent_log, |t| {
        !t.is_empty()
            && !t.contains("chain in.x.deny-db")
            && !t.contains("chain in.x.allow-from-b")
            && !t.contains("10.244.1.2")
    });

    // SIGTERM: the agent exits and the rules stay.
    let ok = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -TERM agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.0.try_wait().ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ns.table().contains("chain ingress"),
        "the table must stay after SIGTERM"
    );
}
