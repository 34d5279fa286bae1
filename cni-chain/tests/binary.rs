//! The real `sluice-cni` binary, run as a container runtime runs it: CNI_* environment, the
//! plugin's config (with prevResult) on stdin, the result or error JSON on stdout.
//!
//! No agent runs here (tests against the real agent come with the agent side): "agent down"
//! is a socket path with nothing behind it, or a socket file nobody listens on.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-cni");

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-cni-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The prevResult the flannel chain (flannel -> bridge -> host-local, then portmap) really
/// produced (see cni-chain/README.md), plus a field no spec version has.
fn prev_result() -> Value {
    json!({
        "cniVersion": "0.3.1",
        "interfaces": [
            {"name": "cni0", "mac": "aa:27:4c:fe:9b:70"},
            {"name": "veth5d6ee293", "mac": "da:4e:72:e7:63:77"},
            {"name": "eth0", "mac": "46:35:b6:39:78:a7", "sandbox": "/run/netns/sluicecni29533-pod"}
        ],
        "ips": [{"version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
        "routes": [{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {},
        "x-vendor": {"big": 18446744073709551615u64, "list": [1, "two", null, true]}
    })
}

/// The plugin's conflist entry as the runtime passes it: cniVersion and name injected, and our
/// fields; `prevResult` unless `with_prev` is false.
fn config(socket: &Path, with_prev: bool, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "0.3.1",
        "name": "cbr0",
        "type": "sluice-cni",
        "agentSocket": socket,
        "timeout": "2s",
    });
    if with_prev {
        c["prevResult"] = prev_result();
    }
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=9f1c";

fn run(command: &str, stdin: &str, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if matches!(command, "ADD" | "DEL" | "CHECK") {
        cmd.env("CNI_CONTAINERID", "abc123")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", "/run/netns/sluicecni29533-pod")
            .env("CNI_ARGS", POD_ARGS);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run sluice-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A CNI error result with this code, and a non-zero exit.
fn expect_error(out: &Output, code: u64) -> Value {
    let e = stdout_json(out);
    assert!(!out.status.success(), "exit 0 with error {e}");
    assert_eq!(e["code"], code, "{e}");
    for key in ["cniVersion", "msg", "details"] {
        assert!(e[key].is_string(), "{key} missing in {e}");
    }
    e
}

fn text(e: &Value) -> String {
    format!("{} {}", e["msg"], e["details"])
}

#[test]
fn version() {
    let out = run("VERSION", r#"{"cniVersion":"0.3.1"}"#, &[]);
    assert!(out.status.success());
    assert_eq!(
        stdout_json(&out),
        json!({"cniVersion":"0.3.1","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
    );
}

#[test]
fn add_without_prev_result_is_code_7() {
    let dir = TempDir::new();
    let c = config(&dir.path("agent.sock"), false, json!({}));
    let e = expect_error(&run("ADD", &c.to_string(), &[]), 7);
    assert!(text(&e).contains("chained after flannel"), "{e}");
}

#[test]
fn add_with_the_agent_down_fails_closed() {
    let dir = TempDir::new();
    let c = config(&dir.path("agent.sock"), true, json!({}));
    let e = expect_error(&run("ADD", &c.to_string(), &[]), 11);
    assert!(text(&e).contains("not reachable"), "{e}");
    assert!(text(&e).contains("failMode is closed"), "{e}");
    assert!(text(&e).contains("default/web"), "{e}");
    assert_eq!(e["cniVersion"], "0.3.1");
}

#[test]
fn add_with_a_stale_socket_fails_closed() {
    // The agent died and left its socket file: connection refused.
    let dir = TempDir::new();
    let sock = dir.path("agent.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let c = config(&sock, true, json!({}));
    let e = expect_error(&run("ADD", &c.to_string(), &[]), 11);
    assert!(text(&e).contains("not reachable"), "{e}");
}

#[test]
fn add_with_a_silent_agent_times_out() {
    // Something listens but never answers (a hung agent): the timeout bounds the wait.
    let dir = TempDir::new();
    let sock = dir.path("agent.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let c = config(&sock, true, json!({"timeout": "300ms"}));
    let start = Instant::now();
    let e = expect_error(&run("ADD", &c.to_string(), &[]), 11);
    let took = start.elapsed();
    assert!(text(&e).contains("timed out"), "{e}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn add_with_the_agent_down_fails_open() {
    let dir = TempDir::new();
    let log = dir.path("sluice-cni.log");
    let c = config(
        &dir.path("agent.sock"),
        true,
        json!({"failMode": "open", "logFile": log}),
    );
    let out = run("ADD", &c.to_string(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert_eq!(stdout_json(&out), prev_result(), "prevResult unchanged");
    assert!(stderr.contains("failMode is open"), "{stderr}");
    assert!(stderr.contains("not reachable"), "{stderr}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("ADD pod default/web (abc123, eth0)"),
        "{logged}"
    );
    assert!(logged.contains("WARNING"), "{logged}");
}

#[test]
fn del_with_the_agent_down_succeeds() {
    let dir = TempDir::new();
    let c = config(&dir.path("agent.sock"), true, json!({}));
    for _ in 0..2 {
        let out = run("DEL", &c.to_string(), &[]);
        assert!(out.status.success());
        assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    }
    // also without prevResult, with a config it cannot use, and without a netns
    let junk = config(&dir.path("agent.sock"), false, json!({"bogus": 1}));
    let out = run("DEL", &junk.to_string(), &[("CNI_NETNS", "")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
}

#[test]
fn status_with_the_agent_down_is_code_50() {
    let dir = TempDir::new();
    let c = config(
        &dir.path("agent.sock"),
        false,
        json!({"cniVersion": "1.1.0"}),
    );
    let e = expect_error(&run("STATUS", &c.to_string(), &[]), 50);
    assert!(text(&e).contains("not reachable"), "{e}");
}

#[test]
fn gc_and_check_with_the_agent_down_fail() {
    let dir = TempDir::new();
    let gc = config(
        &dir.path("agent.sock"),
        false,
        json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": "abc123", "ifname": "eth0"}]}),
    );
    expect_error(&run("GC", &gc.to_string(), &[]), 11);
    let check = config(
        &dir.path("agent.sock"),
        true,
        json!({"cniVersion": "1.0.0"}),
    );
    expect_error(&run("CHECK", &check.to_string(), &[]), 11);
}

#[test]
fn unknown_config_field_is_code_7_naming_it() {
    let dir = TempDir::new();
    let c = config(&dir.path("agent.sock"), true, json!({"agentSokcet": "/x"}));
    let e = expect_error(&run("ADD", &c.to_string(), &[]), 7);
    assert!(text(&e).contains("agentSokcet"), "{e}");
}

#[test]
fn env_errors_name_the_variable() {
    let dir = TempDir::new();
    let c = config(&dir.path("agent.sock"), true, json!({}));
    let e = expect_error(&run("ADD", &c.to_string(), &[("CNI_NETNS", "")]), 4);
    assert!(text(&e).contains("CNI_NETNS"), "{e}");
    let e = expect_error(&run("FROB", "{}", &[]), 4);
    assert!(text(&e).contains("CNI_COMMAND"), "{e}");
}

#[test]
fn help() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "\"type\": \"sluice-cni\"",
        "agentSocket",
        "failMode",
        "timeout",
        "logFile",
    ] {
        assert!(help.contains(needle), "{needle} not in {help}");
    }
    // no CNI_COMMAND: a CNI error naming it
    let out = Command::new(BIN)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = expect_error(&out, 4);
    assert!(text(&e).contains("CNI_COMMAND"), "{e}");
}
