//! `sluice-kubelet` against a real control plane (`e2e/controlplane`) and the real CNI plugins
//! (`e2e/cni-plugins`: bridge + host-local), without the rest of the cluster: the kubelet runs
//! in a node network namespace (started with `ip netns exec`, as the cluster script does), the
//! API server is relayed into that namespace's loopback on the same port.
//!
//! Root only; skipped otherwise, or when the Go-built parts are not there (SLUICE_STRICT=1 makes
//! that a failure).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_e2e::kubelet::pod_netns_name;
use sluice_e2e::netns::{enter_netns, in_netns};

/// A CNI plugin for the test: records each call (command, env, how many host-local leases
/// exist) and its stdin; ADD answers "try again" (code 11) the first two times.
const RECORDER: &str = r#"#!/bin/sh
input=$(cat)
log=$(printf '%s' "$input" | sed -n 's/.*"log":"\([^"]*\)".*/\1/p')
leases=$(ls /var/lib/cni/networks/kubelet-test 2>/dev/null | grep -c '^10\.')
echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS $CNI_ARGS leases=$leases" >>"$log"
printf '%s\n' "$input" >>"$log.stdin"
if [ "$CNI_COMMAND" = ADD ]; then
  n=$(cat "$log.count" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" >"$log.count"
  if [ "$n" -le 2 ]; then
    echo '{"cniVersion":"1.0.0","code":11,"msg":"not yet","details":"attempt '"$n"'"}'
    exit 1
  fi
  echo '{"cniVersion":"1.0.0"}'
fi
exit 0
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn skip(why: &str) -> bool {
    if std::env::var("SLUICE_STRICT").as_deref() == Ok("1") {
        panic!("SLUICE_STRICT=1: {why}");
    }
    eprintln!("skipped: {why}");
    true
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sh(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let o = sh(cmd);
    assert!(o.status.success(), "{shown}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct ControlPlane {
    dir: PathBuf,
    kubeconfig: String,
    path: String,
}

impl ControlPlane {
    /// `e2e/controlplane`, or the script named by `SLUICE_CONTROLPLANE` (as the agent bench).
    fn script(dir: &Path, args: &[&str]) -> Output {
        let script = std::env::var_os("SLUICE_CONTROLPLANE")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("e2e/controlplane"));
        sh(Command::new(script).args(args).env("SLUICE_CP_DIR", dir))
    }

    fn up(dir: PathBuf) -> ControlPlane {
        let o = Self::script(&dir, &["up"]);
        let mut cp = ControlPlane {
            dir,
            kubeconfig: String::new(),
            path: String::new(),
        };
        assert!(o.status.success(), "e2e/controlplane up: {}", text(&o));
        let env = String::from_utf8_lossy(&Self::script(&cp.dir, &["env"]).stdout).into_owned();
        let value = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
                .unwrap_or_else(|| panic!("no {name} in: {env}"))
        };
        let (kubeconfig, path) = (value("KUBECONFIG"), value("PATH"));
        cp.kubeconfig = kubeconfig;
        cp.path = path;
        cp
    }

    fn api_port(&self) -> u16 {
        let ports = std::fs::read_to_string(self.dir.join("ports")).expect("ports file");
        ports
            .lines()
            .find_map(|l| l.strip_prefix("API_PORT="))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no API_PORT in: {ports}"))
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(s) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(s.as_bytes())
                .expect("kubectl stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("kubectl")
    }

    /// The pod as JSON, or None when it does not exist.
    fn pod(&self, name: &str) -> Option<serde_json::Value> {
        let o = self.kubectl(&["get", "pod", name, "-o", "json"], None);
        if !o.status.success() {
            assert!(
                text(&o).contains("NotFound"),
                "kubectl get pod: {}",
                text(&o)
            );
            return None;
        }
        Some(serde_json::from_slice(&o.stdout).expect("pod json"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Self::script(&self.dir, &["down"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        ok(Command::new("ip").args(["netns", "add", &name]));
        Netns(name)
    }
    fn ip(&self, args: &str) -> String {
        ok(Command::new("ip")
            .args(["-n", &self.0])
            .args(args.split_whitespace()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node side of the API relay: 127.0.0.1:port in `netns` -> 127.0.0.1:port here.
fn relay(netns: &str, port: u16) {
    let listener = in_netns(netns, move || TcpListener::bind(("127.0.0.1", port)))
        .expect("thread in netns")
        .expect("bind relay");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(inner) = conn else { continue };
            let Ok(outer) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            let (i2, o2) = (
                inner.try_clone().expect("clone"),
                outer.try_clone().expect("clone"),
            );
            std::thread::spawn(move || pipe(inner, outer));
            std::thread::spawn(move || pipe(o2, i2));
        }
    });
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn wait_for<T>(what: &str, log: &Path, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; kubelet log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// From inside `netns`: the line a TCP server answers, and a UDP echo.
fn probe(netns: &str, ip: &str) -> (String, String) {
    let ns = netns.to_string();
    let ip = ip.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns).expect("enter netns");
        let tcp: SocketAddr = format!("{ip}:8080").parse().expect("addr");
        let mut line = String::new();
        if let Ok(mut s) = TcpStream::connect_timeout(&tcp, Duration::from_secs(3)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let _ = s.read_to_string(&mut line);
        }
        let udp = UdpSocket::bind("0.0.0.0:0").expect("udp");
        udp.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        udp.connect(format!("{ip}:5353")).expect("connect");
        udp.send(b"ping").expect("send");
        let mut buf = [0u8; 64];
        let echo = match udp.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => format!("error: {e}"),
        };
        (line, echo)
    })
    .join()
    .expect("probe thread")
}

/// A control plane, a node namespace with the API relayed into it, the real CNI plugins and a
/// work dir (conf/, state/, bin/). None when the test is skipped.
struct Lab {
    tag: String,
    plugin_dir: String,
    work: PathBuf,
    node: Netns,
    cp: ControlPlane,
}

impl Lab {
    fn new(name: &str, node_ip: &str) -> Option<Lab> {
        if !nix::unistd::Uid::effective().is_root() && skip("needs root (network namespaces)") {
            return None;
        }
        // The real plugins, built once per machine (about a minute the first time).
        let build = sh(Command::new(repo_root().join("e2e/cni-plugins")).arg("build"));
        assert!(
            build.status.success(),
            "e2e/cni-plugins build: {}",
            text(&build)
        );
        let plugins = sh(Command::new(repo_root().join("e2e/cni-plugins")).arg("path"));
        assert!(
            plugins.status.success(),
            "e2e/cni-plugins path: {}",
            text(&plugins)
        );
        let plugin_dir = String::from_utf8_lossy(&plugins.stdout).trim().to_string();
        let tag = format!("skl{}{name}", std::process::id());
        let work = std::env::temp_dir().join(format!("sluice-kubelet-test-{tag}"));
        let _ = std::fs::remove_dir_all(&work);
        for d in ["conf", "state", "bin", "run"] {
            std::fs::create_dir_all(work.join(d)).expect("dirs");
        }
        let cp =
            ControlPlane::up(std::env::temp_dir().join(format!("sluice-kubelet-test-{tag}-cp")));
        let node = Netns::new(format!("{tag}-node"));
        node.ip("link set lo up");
        node.ip("link add eth0 type veth peer name eth0-peer");
        node.ip(&format!("addr add {node_ip}/24 dev eth0"));
        node.ip("link set eth0 up");
        relay(&node.0, cp.api_port());
        // No controller-manager: the ServiceAccount admission needs `default` to exist.
        let sa =
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {namespace: default, name: default}\n";
        let o = cp.kubectl(&["apply", "-f", "-"], Some(sa));
        assert!(o.status.success(), "kubectl apply: {}", text(&o));
        Some(Lab {
            tag,
            plugin_dir,
            work,
            node,
            cp,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

#[test]
fn pods_get_a_namespace_an_address_servers_and_status_and_leave_nothing() {
    let Some(lab) = Lab::new("a", "198.18.0.7") else {
        return;
    };
    let (work, cp, node, plugin_dir, tag) =
        (&lab.work, &lab.cp, &lab.node, &lab.plugin_dir, &lab.tag);

    // The chain: a recording plugin (first; ADD answers "try again", code 11, twice, as
    // sluice-cni does before the agent has the pod) then bridge + host-local. cniVersion 1.0.0,
    // so DEL gets the cached result. A later conflist must not be used (runtimes take the first
    // by file name).
    let bin = work.join("bin");
    let recorder = bin.join("recorder");
    std::fs::write(&recorder, RECORDER).expect("recorder");
    ok(Command::new("chmod").arg("+x").arg(&recorder));
    let rec_log = work.join("recorder.log");
    let conflist = serde_json::json!({
        "name": "kubelet-test",
        "cniVersion": "1.0.0",
        "plugins": [
            {"type": "recorder", "log": rec_log},
            {
                "type": "bridge", "bridge": "cni0", "isGateway": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24"}]]}
            }
        ]
    });
    std::fs::write(work.join("conf/10-test.conflist"), conflist.to_string()).expect("conflist");
    std::fs::write(work.join("conf/20-other.conflist"), "not json").expect("conflist");

    // Not a prefix of the node's own namespace name (the kubelet would never delete that one
    // anyway: it checks).
    let prefix = format!("{tag}p-");
    let cni_bin = format!("/nonexistent:{}:{plugin_dir}", bin.display());
    let start = |log: &Path| -> Kill {
        let f = std::fs::File::create(log).expect("log");
        Kill(
            Command::new("ip")
                .args(["netns", "exec", &node.0])
                .arg(env!("CARGO_BIN_EXE_sluice-kubelet"))
                .args(["--node", "n1", "--kubeconfig", &cp.kubeconfig])
                .arg("--cni-conf-dir")
                .arg(work.join("conf"))
                .args(["--cni-bin-dir", &cni_bin])
                .args(["--netns-prefix", &prefix])
                .arg("--state-dir")
                .arg(work.join("state"))
                .stdout(f.try_clone().expect("log"))
                .stderr(f)
                .spawn()
                .expect("sluice-kubelet"),
        )
    };
    let log_path = work.join("kubelet.log");
    let kubelet = start(&log_path);

    let pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  nodeName: n1
  containers:
  - name: c
    image: none
    ports:
    - {containerPort: 8080}
    - {containerPort: 5353, protocol: UDP}
    - {containerPort: 9999, protocol: SCTP}
"#;
    let o = cp.kubectl(&["apply", "-f", "-"], Some(pod));
    assert!(o.status.success(), "kubectl apply: {}", text(&o));
    let uid = cp.pod("web").expect("pod")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();

    let status = wait_for(
        "the pod to be Running with an IP",
        &log_path,
        Duration::from_secs(60),
        || {
            let p = cp.pod("web")?;
            let s = p["status"].clone();
            (s["phase"] == "Running" && s["podIP"].is_string()).then_some(s)
        },
    );
    let ip = status["podIP"].as_str().expect("podIP").to_string();
    assert!(ip.starts_with("10.244.7."), "{status}");
    assert_eq!(status["podIPs"], serde_json::json!([{"ip": ip}]));
    assert_eq!(status["hostIP"], "198.18.0.7");
    let ready = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Ready")
        .expect("Ready condition")
        .clone();
    assert_eq!(ready["status"], "True", "{status}");

    // The namespace is where anyone finds it, with that address on eth0.
    let pod_ns = pod_netns_name(&prefix, "default", "web");
    assert!(Path::new("/run/netns").join(&pod_ns).exists());
    let addrs =
        ok(Command::new("ip").args(["-n", &pod_ns, "-4", "-o", "addr", "show", "dev", "eth0"]));
    assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");

    // The chain ran as a runtime runs it: two "try again" answers (each followed by a DEL),
    // then ADD; the kubelet's env; no lease before the first plugin's ADD.
    let cid: String = uid.chars().filter(|c| *c != '-').collect();
    let netns_path = format!("/run/netns/{pod_ns}");
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={uid}"
    );
    let calls = |what: &str| -> Vec<String> {
        std::fs::read_to_string(&rec_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| what.is_empty() || l.starts_with(what))
            .map(String::from)
            .collect()
    };
    let env = format!("{cid} eth0 {netns_path} {args}");
    assert_eq!(
        calls(""),
        vec![
            format!("ADD {env} leases=0"),
            format!("DEL {env} leases=0"),
            format!("ADD {env} leases=0"),
            format!("DEL {env} leases=0"),
            format!("ADD {env} leases=0"),
        ]
    );
    let kubelet_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        kubelet_log.contains("code 11, try again later") && kubelet_log.contains("attempt 2"),
        "the plugin's error is logged:\n{kubelet_log}"
    );
    assert!(
        kubelet_log.contains("SCTP/9999"),
        "SCTP is skipped with a log line:\n{kubelet_log}"
    );

    // The servers answer, from the node.
    let (line, echo) = probe(&node.0, &ip);
    assert_eq!(line, "default/web\n");
    assert_eq!(echo, "ping");

    // host-local's lease is in this node's state dir, not the host's /var/lib/cni.
    let lease = work
        .join("state/var-lib-cni/networks/kubelet-test")
        .join(&ip);
    assert!(lease.exists(), "no lease at {}", lease.display());
    assert!(!Path::new("/var/lib/cni/networks/kubelet-test").exists());
    let cache = work.join(format!("state/cache/{pod_ns}.json"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).expect("cache entry")).expect("json");
    assert_eq!(
        record["conflistFile"],
        work.join("conf/10-test.conflist").display().to_string()
    );
    assert!(record["result"]["ips"].is_array(), "{record}");

    // SIGTERM: the pod's namespace and attachment stay; a new kubelet adopts them (no ADD) and
    // serves again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kubelet.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let mut kubelet = kubelet;
    let exit = kubelet.0.wait().expect("wait");
    assert!(exit.success(), "{exit}");
    assert!(std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("pod namespaces and CNI attachments stay"));
    drop(kubelet);
    assert!(Path::new("/run/netns").join(&pod_ns).exists());
    assert!(lease.exists());
    let log2_path = work.join("kubelet2.log");
    let kubelet = start(&log2_path);
    wait_for("adoption", &log2_path, Duration::from_secs(20), || {
        std::fs::read_to_string(&log2_path)
            .unwrap_or_default()
            .contains("serving")
            .then_some(())
    });
    let (line, echo) = probe(&node.0, &ip);
    assert_eq!(line, "default/web\n");
    assert_eq!(echo, "ping");
    assert_eq!(calls("ADD").len(), 3, "no ADD for an adopted sandbox");

    // A hostNetwork pod: no namespace, no CNI; served in the node's namespace on its address.
    let host_pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: hostpod, namespace: default}
spec:
  nodeName: n1
  hostNetwork: true
  containers:
  - name: c
    image: none
    ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]
"#;
    let o = cp.kubectl(&["apply", "-f", "-"], Some(host_pod));
    assert!(o.status.success(), "kubectl apply: {}", text(&o));
    let status = wait_for(
        "the hostNetwork pod to be Running",
        &log2_path,
        Duration::from_secs(30),
        || {
            let s = cp.pod("hostpod")?["status"].clone();
            (s["phase"] == "Running").then_some(s)
        },
    );
    assert_eq!(status["podIP"], "198.18.0.7", "{status}");
    assert_eq!(status["podIPs"], serde_json::json!([{"ip": "198.18.0.7"}]));
    let host_ns = pod_netns_name(&prefix, "default", "hostpod");
    assert!(!Path::new("/run/netns").join(&host_ns).exists());
    let (line, echo) = probe(&node.0, "198.18.0.7");
    assert_eq!(line, "default/hostpod\n");
    assert_eq!(echo, "ping");
    assert_eq!(calls("ADD").len(), 3, "no CNI for a hostNetwork pod");
    let o = cp.kubectl(&["delete", "pod", "hostpod", "--wait=false"], None);
    assert!(o.status.success(), "kubectl delete: {}", text(&o));
    wait_for(
        "the hostNetwork pod object to go",
        &log2_path,
        Duration::from_secs(20),
        || cp.pod("hostpod").is_none().then_some(()),
    );

    // Graceful deletion: the kubelet tears down, then confirms (grace period 0), long before
    // the default 30 s grace period. DEL runs last to first: the recorder (first) sees the
    // lease already released, and gets the cached result as prevResult.
    let started = Instant::now();
    let o = cp.kubectl(&["delete", "pod", "web", "--wait=false"], None);
    assert!(o.status.success(), "kubectl delete: {}", text(&o));
    wait_for(
        "the pod object to go",
        &log2_path,
        Duration::from_secs(20),
        || cp.pod("web").is_none().then_some(()),
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        !Path::new("/run/netns").join(&pod_ns).exists(),
        "the namespace is gone"
    );
    assert!(!lease.exists(), "CNI DEL released the lease");
    assert!(!cache.exists(), "the cache entry is forgotten");
    assert_eq!(calls("DEL").last(), Some(&format!("DEL {env} leases=0")));
    let stdins = std::fs::read_to_string(work.join("recorder.log.stdin")).unwrap_or_default();
    let last: serde_json::Value =
        serde_json::from_str(stdins.lines().last().expect("a DEL stdin")).expect("json");
    assert_eq!(last["name"], "kubelet-test");
    assert_eq!(last["cniVersion"], "1.0.0");
    assert_eq!(
        last["prevResult"]["ips"][0]["address"],
        format!("{ip}/24"),
        "{last}"
    );
    let first: serde_json::Value =
        serde_json::from_str(stdins.lines().next().expect("an ADD stdin")).expect("json");
    assert!(first.get("prevResult").is_none(), "{first}");

    // A stale sandbox from an earlier run is cleaned at start: a namespace with the prefix.
    drop(kubelet);
    let stale = format!("{prefix}default.old");
    ok(Command::new("ip").args(["netns", "add", &stale]));
    let log3_path = work.join("kubelet3.log");
    let kubelet = start(&log3_path);
    wait_for(
        "the stale namespace to go",
        &log3_path,
        Duration::from_secs(20),
        || (!Path::new("/run/netns").join(&stale).exists()).then_some(()),
    );
    drop(kubelet);
    for l in [&log_path, &log2_path, &log3_path] {
        eprintln!(
            "{}:\n{}",
            l.display(),
            std::fs::read_to_string(l).unwrap_or_default()
        );
    }
}

/// flannel's own chain (flannel -> bridge -> host-local, then portmap; cniVersion 0.3.1, as
/// flannel's manifest writes it), with the kubelet started by `nsenter --net` (it stays in the
/// host's mount namespace at start): flannel's state (/var/lib/cni/flannel by default) and
/// host-local's leases land in the node's state dir.
#[test]
fn flannel_chain_under_nsenter() {
    let Some(lab) = Lab::new("f", "198.18.0.8") else {
        return;
    };
    let (work, cp, node) = (&lab.work, &lab.cp, &lab.node);
    std::fs::write(
        work.join("run/subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .expect("subnet.env");
    let conflist = serde_json::json!({
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "flannel",
                "subnetFile": work.join("run/subnet.env"),
                "delegate": {"hairpinMode": true, "isDefaultGateway": true}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    std::fs::write(work.join("conf/10-flannel.conflist"), conflist.to_string()).expect("conflist");
    let prefix = format!("{}p-", lab.tag);
    let log_path = work.join("kubelet.log");
    let f = std::fs::File::create(&log_path).expect("log");
    let _kubelet = Kill(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.0))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_sluice-kubelet"))
            .args(["--node", "n2", "--kubeconfig", &cp.kubeconfig])
            .arg("--cni-conf-dir")
            .arg(work.join("conf"))
            .args(["--cni-bin-dir", &lab.plugin_dir])
            .args(["--netns-prefix", &prefix])
            .arg("--state-dir")
            .arg(work.join("state"))
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("sluice-kubelet"),
    );
    let pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: a-pod-with-a-name-long-enough-to-be-hashed, namespace: default}
spec:
  nodeName: n2
  containers:
  - {name: c, image: none, ports: [{containerPort: 80}]}
"#;
    let name = "a-pod-with-a-name-long-enough-to-be-hashed";
    let o = cp.kubectl(&["apply", "-f", "-"], Some(pod));
    assert!(o.status.success(), "kubectl apply: {}", text(&o));
    let p = wait_for(
        "the pod to be Running",
        &log_path,
        Duration::from_secs(60),
        || {
            let p = cp.pod(name)?;
            (p["status"]["phase"] == "Running").then_some(p)
        },
    );
    let ip = p["status"]["podIP"].as_str().expect("podIP").to_string();
    assert!(ip.starts_with("10.244.3."), "{}", p["status"]);
    assert_eq!(p["status"]["hostIP"], "198.18.0.8");
    let pod_ns = pod_netns_name(&prefix, "default", name);
    assert!(pod_ns.len() <= 40, "{pod_ns}");
    assert!(Path::new("/run/netns").join(&pod_ns).exists(), "{pod_ns}");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        log.contains("the mount namespace it was started in"),
        "{log}"
    );

    // TCP from the node: the pod's line.
    let ns = node.0.clone();
    let addr: SocketAddr = format!("{ip}:80").parse().expect("addr");
    let line = std::thread::spawn(move || {
        enter_netns(&ns).expect("netns");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        let mut line = String::new();
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let _ = s.read_to_string(&mut line);
        line
    })
    .join()
    .expect("probe");
    assert_eq!(line, format!("default/{name}\n"));

    // flannel's and host-local's state are this node's.
    let uid = p["metadata"]["uid"].as_str().expect("uid").replace('-', "");
    let flannel_state = work.join("state/var-lib-cni/flannel").join(&uid);
    assert!(flannel_state.exists(), "{}", flannel_state.display());
    assert!(!Path::new("/var/lib/cni/flannel").join(&uid).exists());
    let lease = work.join("state/var-lib-cni/networks/cbr0").join(&ip);
    assert!(lease.exists(), "{}", lease.display());

    let o = cp.kubectl(&["delete", "pod", name, "--wait=false"], None);
    assert!(o.status.success(), "kubectl delete: {}", text(&o));
    wait_for("the pod to go", &log_path, Duration::from_secs(20), || {
        cp.pod(name).is_none().then_some(())
    });
    assert!(!Path::new("/run/netns").join(&pod_ns).exists());
    assert!(!flannel_state.exists(), "flannel's DEL ran");
    assert!(!lease.exists(), "host-local's DEL ran");
    eprintln!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
}
