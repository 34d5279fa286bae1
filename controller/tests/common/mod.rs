//! What the agent's control-plane tests share: a real control plane (`e2e/controlplane`: etcd +
//! kube-apiserver, its own state dir per test), a network namespace for the node, the relay that
//! brings the API server into that namespace, the agent's least-privilege kubeconfig
//! (`deploy/rbac.yaml`), agent processes and readers of the table, `/readyz` and `/metrics`.
//!
//! Everything is removed when dropped, so also when a test panics.
//!
//! The API server listens on the host's loopback, which a network namespace cannot reach, so
//! the tests relay it: a unix socket in the host namespace (files are not per-namespace) and a
//! TCP listener on the node's loopback at the same port, run by the test binary re-executed
//! inside the namespace (its `netns_helper` test, see [`helper_main`]). The kubeconfigs then work
//! unchanged in the namespace.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const NODE: &str = "node-1";
pub const AGENT_LISTEN: &str = "127.0.0.1:9763";
/// How long a change may take to show in the table (generous: two cores, several tests at once).
pub const CONVERGE: Duration = Duration::from_secs(20);

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A name no other test (in this process or another) uses.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("sluice-{tag}-{}-{n}-{nanos:x}", std::process::id())
}

pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running control plane; `down` when dropped.
pub struct ControlPlane {
    pub dir: PathBuf,
    /// The admin kubeconfig (O=system:masters): for the test's own kubectl calls only.
    pub kubeconfig: String,
    path: String,
}

impl ControlPlane {
    pub fn up() -> Result<ControlPlane, String> {
        let dir = std::env::temp_dir().join(unique("cp"));
        let mut cp = ControlPlane {
            dir,
            kubeconfig: String::new(),
            path: String::new(),
        };
        let out = cp.script(&["up"]);
        if !out.status.success() {
            return Err(format!(
                "e2e/controlplane up failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let env = cp.script(&["env"]);
        let text = String::from_utf8_lossy(&env.stdout).to_string();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        };
        cp.kubeconfig = value("KUBECONFIG").ok_or(format!("no KUBECONFIG in: {text}"))?;
        cp.path = value("PATH").ok_or(format!("no PATH in: {text}"))?;
        Ok(cp)
    }

    fn script(&self, args: &[&str]) -> Output {
        let script = repo_root().join("e2e/controlplane");
        Command::new(&script)
            .args(args)
            .env("SLUICE_CP_DIR", &self.dir)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()))
    }

    /// Stop only kube-apiserver (etcd and the state stay).
    pub fn apiserver_stop(&self) {
        let out = self.script(&["apiserver-stop"]);
        assert!(out.status.success(), "apiserver-stop: {}", text(&out));
    }

    /// Start kube-apiserver again (same flags, certs, port) and wait for /readyz.
    pub fn apiserver_start(&self) {
        let out = self.script(&["apiserver-start"]);
        assert!(out.status.success(), "apiserver-start: {}", text(&out));
    }

    fn port(&self, name: &str) -> u16 {
        let ports = std::fs::read_to_string(self.dir.join("ports")).expect("ports file");
        ports
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in: {ports}"))
    }

    pub fn api_port(&self) -> u16 {
        self.port("API_PORT")
    }

    /// Write `value` (JSON) at `key` straight into etcd (the v3 JSON gateway), past the API
    /// server's validation: how an object stored before validation tightened looks.
    pub fn etcd_put(&self, key: &str, value: &str) {
        let pki = self.dir.join("pki");
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            base64(key.as_bytes()),
            base64(value.as_bytes())
        );
        let url = format!("https://127.0.0.1:{}/v3/kv/put", self.port("ETCD_PORT"));
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(pki.join("ca.crt"))
            .arg("--cert")
            .arg(pki.join("apiserver-etcd-client.crt"))
            .arg("--key")
            .arg(pki.join("apiserver-etcd-client.key"))
            .args([&url, "-d", &body])
            .output()
            .expect("curl");
        let answer = text(&out);
        assert!(
            out.status.success() && answer.contains("\"revision\"") && !answer.contains("error"),
            "etcd put {key}: {answer}"
        );
    }

    /// kubectl with a kubeconfig of our choice; the caller judges the result.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("PATH", &self.path)
            .env("KUBECONFIG", kubeconfig)
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
        child.wait_with_output().expect("kubectl")
    }

    /// kubectl as admin; panics when it fails.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_as(Path::new(&self.kubeconfig), args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    /// A namespace with labels, and the `default` ServiceAccount pods need (there is no
    /// controller manager to create it).
    pub fn namespace(&self, name: &str, labels: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {{namespace: {name}, name: default}}\n"
        ));
    }

    /// A pod on `node` with one named port, Running with `ip` (status patched as a kubelet would).
    pub fn pod(&self, ns: &str, name: &str, role: &str, node: &str, ip: &str) {
        self.apply(&format!(
            "apiVersion: v1
kind: Pod
metadata: {{namespace: {ns}, name: {name}, labels: {{role: {role}}}}}
spec:
  nodeName: {node}
  containers:
  - name: c
    image: example.invalid/server
    ports: [{{name: http, containerPort: 8080}}]
"
        ));
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
        );
        self.kubectl(
            &[
                "-n",
                ns,
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

    /// A NetworkPolicy isolating `role` pods for ingress and allowing nothing.
    pub fn deny_ingress(&self, ns: &str, name: &str, role: &str) {
        self.apply(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{namespace: {ns}, name: {name}}}\n\
             spec: {{podSelector: {{matchLabels: {{role: {role}}}}}, policyTypes: [Ingress]}}\n"
        ));
    }

    /// Apply `deploy/rbac.yaml` (the Helm chart's RBAC rendered, kept equal to the chart by
    /// e2e/tests/chart.rs) and write a kubeconfig holding a token of its ServiceAccount
    /// (CA and server from the admin kubeconfig). The agents of these tests run with it.
    pub fn agent_kubeconfig(&self) -> PathBuf {
        let rbac = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml"))
            .expect("deploy/rbac.yaml");
        self.apply(&rbac);
        self.token_kubeconfig("sluice", "agent.kubeconfig")
    }

    /// A kubeconfig for a token of ServiceAccount kube-system/`account`.
    fn token_kubeconfig(&self, account: &str, file: &str) -> PathBuf {
        let token = self.kubectl(&["create", "token", account, "-n", "kube-system"], None);
        let token = token.trim();
        assert!(!token.is_empty(), "empty token for {account}");
        let admin = std::fs::read_to_string(&self.kubeconfig).expect("admin kubeconfig");
        let ca = admin
            .lines()
            .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
            .expect("CA in the admin kubeconfig");
        let path = self.dir.join(file);
        let port = self.api_port();
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1
kind: Config
clusters:
- name: sluice
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority-data: {ca}
users:
- name: {account}
  user:
    token: {token}
contexts:
- name: sluice
  context: {{cluster: sluice, user: {account}}}
current-context: sluice
"
            ),
        )
        .expect("write kubeconfig");
        path
    }

    /// `kubectl auth can-i --list -n <namespace>` as rows of words.
    fn rules(&self, kubeconfig: &Path, namespace: &str) -> BTreeSet<String> {
        let out = self.kubectl_as(
            kubeconfig,
            &["auth", "can-i", "--list", "-n", namespace],
            None,
        );
        assert!(out.status.success(), "auth can-i --list: {}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The agent's token is not admin: beyond what every ServiceAccount may do, it has
    /// exactly list/watch on pods, namespaces and networkpolicies, and in its own namespace
    /// get/list/watch of its DaemonSet by name (uninstall.cleanupOnDelete), and nothing else.
    pub fn assert_least_privilege(&self, agent: &Path) {
        self.apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {namespace: kube-system, name: unbound}\n");
        let baseline = self.token_kubeconfig("unbound", "unbound.kubeconfig");
        let cluster_wide = [
            "namespaces [] [] [list watch]",
            "pods [] [] [list watch]",
            "networkpolicies.networking.k8s.io [] [] [list watch]",
        ];
        for (namespace, own) in [
            ("default", vec![]),
            (
                "kube-system",
                vec!["daemonsets.apps [] [sluice] [get list watch]"],
            ),
        ] {
            let agent_rules = self.rules(agent, namespace);
            let baseline_rules = self.rules(&baseline, namespace);
            let added: BTreeSet<&str> = agent_rules
                .difference(&baseline_rules)
                .map(String::as_str)
                .collect();
            let expected: BTreeSet<&str> = cluster_wide.iter().copied().chain(own).collect();
            assert_eq!(
                added, expected,
                "in namespace {namespace}, the agent's token must add exactly the agent's roles \
                 to a bare ServiceAccount"
            );
        }
        let out = self.kubectl_as(agent, &["auth", "can-i", "create", "pods", "-A"], None);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "the agent's token may create pods: {}",
            text(&out)
        );
        let out = self.kubectl_as(agent, &["get", "secrets", "-A"], None);
        assert!(
            !out.status.success() && text(&out).contains("Forbidden"),
            "the agent's token may list secrets: {}",
            text(&out)
        );
        let out = self.kubectl_as(agent, &["get", "networkpolicies", "-A"], None);
        assert!(
            out.status.success(),
            "the agent's token may not list policies: {}",
            text(&out)
        );
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

pub struct Netns(String);

impl Netns {
    pub fn new() -> Netns {
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

    pub fn name(&self) -> &str {
        &self.0
    }

    pub fn exec(&self, args: &[&str]) -> Command {
        exec_in(&self.0, args)
    }

    /// `nft list table inet sluice` in the namespace ("" when there is none).
    pub fn table(&self) -> String {
        table_in(&self.0)
    }

    /// The test binary itself, re-run inside the namespace as a helper.
    pub fn helper(&self, mode: &str, envs: &[(&str, &str)]) -> Command {
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

pub fn exec_in(netns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).args(args);
    c
}

/// `nft list table inet sluice` in a namespace by name ("" when there is none).
pub fn table_in(netns: &str) -> String {
    exec_in(netns, &["nft", "list", "table", "inet", "sluice"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// A child process killed (by its own pid) when dropped.
pub struct Process(pub Child);

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

/// Host side of the relay: unix socket -> the API server on the host's loopback. While the
/// API server is down, connections are accepted and closed at once.
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

/// The body of the `netns_helper` test: what the test binary does when re-executed inside a
/// network namespace (`SLUICE_TEST_HELPER` says which part).
pub fn helper_main() {
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
        // A TCP server on SLUICE_TEST_LISTEN answering "hello" to every connection.
        Ok("listen") => {
            let listen = std::env::var("SLUICE_TEST_LISTEN").expect("listen");
            let listener = TcpListener::bind(&listen).expect("bind");
            println!("HELPER-LISTENING");
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(b"hello\n");
            }
        }
        // One TCP connection to SLUICE_TEST_ADDR within 1 s: prints what happened.
        Ok("connect") => {
            let addr: std::net::SocketAddr = std::env::var("SLUICE_TEST_ADDR")
                .expect("addr")
                .parse()
                .expect("addr");
            let outcome = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(mut s) => {
                    let mut text = String::new();
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let _ = s.read_to_string(&mut text);
                    if text.starts_with("hello") {
                        "connected"
                    } else {
                        "no-answer"
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
                Err(_) => "error",
            };
            println!("HELPER-CONNECT {outcome}");
        }
        // Count UDP datagrams to SLUICE_TEST_LISTEN for SLUICE_TEST_SECONDS; print the count.
        Ok("udp-count") => {
            let listen = std::env::var("SLUICE_TEST_LISTEN").expect("listen");
            let seconds: u64 = std::env::var("SLUICE_TEST_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2);
            let socket = std::net::UdpSocket::bind(&listen).expect("bind udp");
            println!("HELPER-LISTENING");
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut count = 0;
            let mut buf = [0u8; 2048];
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let _ = socket.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                if socket.recv_from(&mut buf).is_ok() {
                    count += 1;
                }
            }
            println!("HELPER-RECEIVED {count}");
        }
        // Send SLUICE_TEST_COUNT UDP datagrams with a forged source (SLUICE_TEST_FROM) to
        // SLUICE_TEST_ADDR through a raw socket that writes its own IPv4 header.
        Ok("spoof") => {
            let from: std::net::Ipv4Addr = std::env::var("SLUICE_TEST_FROM")
                .expect("from")
                .parse()
                .expect("from");
            let to: std::net::SocketAddrV4 = std::env::var("SLUICE_TEST_ADDR")
                .expect("addr")
                .parse()
                .expect("addr");
            let count: usize = std::env::var("SLUICE_TEST_COUNT")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(3);
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::UDP),
            )
            .expect("raw socket");
            socket.set_header_included_v4(true).expect("IP_HDRINCL");
            let packet = forged_udp(from, *to.ip(), 40000, to.port(), b"spoofed");
            for _ in 0..count {
                socket
                    .send_to(&packet, &std::net::SocketAddr::V4(to).into())
                    .expect("send spoofed");
            }
            println!("HELPER-SENT {count}");
        }
        _ => {}
    }
}

/// An IPv4 + UDP packet with the given addresses (UDP checksum 0: none, valid for IPv4).
fn forged_udp(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // id, DF, TTL 64, UDP, checksum
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One test's world: a control plane, the node's namespace with the API relayed into it, and
/// the agent's least-privilege kubeconfig. Dropped in field order: relay, namespace, control plane.
pub struct Fixture {
    _relay: Process,
    pub ns: Netns,
    pub cp: ControlPlane,
    /// A token of `deploy/rbac.yaml`'s ServiceAccount, proven not admin.
    pub agent_kubeconfig: PathBuf,
}

impl Fixture {
    /// `None` (with a message) when not root or when the control plane cannot come up.
    pub fn new() -> Option<Fixture> {
        if !is_root() {
            eprintln!("skipped: needs root (network namespaces, nft)");
            return None;
        }
        let cp = match ControlPlane::up() {
            Ok(cp) => cp,
            // CI (`SLUICE_STRICT=1`) must not pass by skipping.
            Err(e) if std::env::var_os("SLUICE_STRICT").is_some() => {
                panic!("the control plane did not come up: {e}")
            }
            Err(e) => {
                eprintln!("skipped: the control plane did not come up: {e}");
                return None;
            }
        };
        let ns = Netns::new();
        let port = cp.api_port();
        let socket = cp.dir.join("api.sock");
        let listener = UnixListener::bind(&socket).expect("unix socket");
        relay_unix_to_tcp(listener, port);
        let listen = format!("127.0.0.1:{port}");
        let socket_text = socket.to_string_lossy().to_string();
        let relay = Process(
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
        let agent_kubeconfig = cp.agent_kubeconfig();
        cp.assert_least_privilege(&agent_kubeconfig);
        Some(Fixture {
            _relay: relay,
            ns,
            cp,
            agent_kubeconfig,
        })
    }

    /// `sluice agent` as node-1 in the namespace, with the least-privilege kubeconfig, a 2 s
    /// resync and debug logs in `<state dir>/<name>.log`.
    pub fn start_agent(&self, name: &str) -> Agent {
        self.start_agent_with(name, &[])
    }

    /// [`Fixture::start_agent`] with more flags.
    pub fn start_agent_with(&self, name: &str, extra: &[&str]) -> Agent {
        let log = self.cp.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("agent log");
        let file2 = file.try_clone().expect("agent log");
        let kubeconfig = self.agent_kubeconfig.to_string_lossy().to_string();
        let child = self
            .ns
            .exec(&[
                env!("CARGO_BIN_EXE_sluice"),
                "agent",
                "--kubeconfig",
                &kubeconfig,
                "--listen",
                AGENT_LISTEN,
                "--debounce",
                "10ms",
                "--resync",
                "2s",
                "--drop-counters-interval",
                "1s",
                "--cni-socket",
                &self.cni_socket().to_string_lossy(),
            ])
            .args(extra)
            .env("NODE_NAME", NODE)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                "debug,hyper=info,tower=info,rustls=info,kube=info",
            )
            .stdout(file)
            .stderr(file2)
            .spawn()
            .expect("agent");
        Agent {
            process: Process(child),
            log,
        }
    }

    pub fn table(&self) -> String {
        self.ns.table()
    }

    /// The agent's CNI socket: one per test (tests run in parallel), in the state dir.
    pub fn cni_socket(&self) -> PathBuf {
        self.cp.dir.join("cni.sock")
    }

    /// Wait (up to [`CONVERGE`]) until the table satisfies `cond`.
    pub fn wait_for(&self, what: &str, agent: &Agent, cond: impl Fn(&str) -> bool) {
        self.wait_for_within(CONVERGE, what, agent, cond);
    }

    pub fn wait_for_within(
        &self,
        limit: Duration,
        what: &str,
        agent: &Agent,
        cond: impl Fn(&str) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let table = self.table();
            if cond(&table) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for: {what}\n--- table:\n{table}\n--- agent log:\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Status code and body of a GET to the agent, from inside the node's namespace.
    pub fn http_get(&self, path: &str) -> (String, String) {
        let out = self
            .ns
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

    pub fn metrics(&self) -> String {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, "200", "/metrics: {body}");
        body
    }

    /// Wait until `/readyz` answers 200.
    pub fn wait_ready(&self, agent: &Agent) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let (status, body) = self.http_get("/readyz");
            if status == "200" {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "/readyz: {status} {body}\n--- agent log:\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until `/metrics` satisfies `cond`.
    pub fn wait_metrics(&self, what: &str, agent: &Agent, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let (status, body) = self.http_get("/metrics");
            if status == "200" && cond(&body) {
                return body;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for metrics: {what}\n--- /metrics ({status}):\n{body}\n--- agent log:\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A `sluice agent` process, killed when dropped.
pub struct Agent {
    process: Process,
    pub log: PathBuf,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.process.0.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait (up to 10 s) for the process to exit.
    pub fn terminate(&mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.process.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_running() {
            assert!(
                Instant::now() < deadline,
                "the agent did not exit on SIGTERM\n--- agent log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The elements of a map or set block in `nft list` output ("" when absent).
pub fn block<'a>(table: &'a str, header: &str) -> &'a str {
    let Some(start) = table.find(header) else {
        return "";
    };
    let rest = &table[start..];
    let end = rest.find("\n\t}").unwrap_or(rest.len());
    &rest[..end]
}

/// The text of one chain in `nft list` output ("" when absent).
pub fn chain<'a>(table: &'a str, name: &str) -> &'a str {
    block(table, &format!("chain {name} {{"))
}

/// The table with the elements of every set and map sorted (a hash set lists its elements in
/// an order of the kernel's choosing, which may change when the table is replaced whole) and
/// counter values blanked (traffic moves them).
pub fn canonical(table: &str) -> String {
    const OPEN: &str = "elements = {";
    let table: Vec<String> = table
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            let blanked: Vec<&str> = words
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let counted = i > 0 && matches!(words[i - 1].trim_start(), "packets" | "bytes");
                    if counted && !w.is_empty() && w.chars().all(|c| c.is_ascii_digit()) {
                        "_"
                    } else {
                        w
                    }
                })
                .collect();
            blanked.join(" ")
        })
        .collect();
    let table = table.join("\n");
    let mut out = String::new();
    let mut rest = table.as_str();
    while let Some(i) = rest.find(OPEN) {
        out.push_str(&rest[..i + OPEN.len()]);
        let after = &rest[i + OPEN.len()..];
        let end = after.find('}').unwrap_or(after.len());
        let mut items: Vec<String> = after[..end]
            .split(',')
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|s| !s.is_empty())
            .collect();
        items.sort();
        out.push_str(&items.join(", "));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The sum of the samples of metric `name` (exact name, e.g. `sluice_syncs_total`) whose labels
/// include all of `labels`; `None` when there is no such sample.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let matches = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        if !matches {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[test]
fn base64_and_metric_parsing() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"/registry/pods/x/a"), "L3JlZ2lzdHJ5L3BvZHMveC9h");
    let text = "sluice_syncs_total{result=\"ok\",kind=\"full\"} 2\n\
                sluice_syncs_total{result=\"ok\",kind=\"diff\"} 3\n\
                sluice_syncs_total_created 1\n\
                sluice_policies_with_errors 1\n";
    assert_eq!(metric(text, "sluice_syncs_total", &[]), Some(5.0));
    assert_eq!(
        metric(
            text,
            "sluice_syncs_total",
            &[("kind", "full"), ("result", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(metric(text, "sluice_syncs_total", &[("kind", "x")]), None);
    assert_eq!(metric(text, "sluice_policies_with_errors", &[]), Some(1.0));
    assert_eq!(
        canonical("map m {\n\t\telements = { b : drop,\n\t\t\t     a : accept }\n\t}"),
        "map m {\n\t\telements = {a : accept, b : drop}\n\t}"
    );
    assert_eq!(
        canonical("\t\tpackets 12 bytes 3456\n\t\tcounter packets 0 bytes 0 drop\n"),
        "\t\tpackets _ bytes _\n\t\tcounter packets _ bytes _ drop"
    );
}
