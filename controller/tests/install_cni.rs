//! `sluice install-cni` on a node's CNI dirs (temp dirs here; no root needed): it chains
//! sluice-cni after flannel, follows flannel's rewrites, leaves the node's configuration alone
//! when flannel's file is not understood, keeps its files on SIGTERM and removes them on
//! uninstall.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

struct Node {
    root: PathBuf,
}

impl Node {
    fn new(tag: &str) -> Node {
        let root = std::env::temp_dir().join(format!(
            "sluice-install-{tag}-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        for dir in ["bin", "net.d"] {
            std::fs::create_dir_all(root.join(dir)).expect("dirs");
        }
        // A stand-in for the plugin binary: install-cni copies bytes, it never runs them.
        std::fs::write(root.join("sluice-cni"), b"plugin bytes").expect("plugin");
        Node { root }
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.root.join("net.d").join(name)
    }

    fn install_cni(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(self.root.join("bin"))
            .arg("--cni-conf-dir")
            .arg(self.root.join("net.d"))
            .arg("--plugin-binary")
            .arg(self.root.join("sluice-cni"))
            .args(["--agent-socket", "/run/test/cni.sock", "--timeout", "3s"])
            .args(extra)
            .env("NO_COLOR", "1");
        c
    }

    fn ours(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.conf("05-sluice.conflist")).ok()?;
        Some(serde_json::from_str(&text).expect("our conflist is JSON"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn types(conflist: &Value) -> Vec<String> {
    conflist["plugins"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["type"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn chains_after_flannel_follows_its_rewrites_and_uninstalls() {
    let node = Node::new("follow");
    std::fs::write(node.conf("10-flannel.conflist"), FLANNEL).expect("flannel");
    let log = node.root.join("install.log");
    let mut running = Running(
        node.install_cni(&["--interval", "100ms"])
            .stderr(std::fs::File::create(&log).expect("log"))
            .stdout(Stdio::null())
            .spawn()
            .expect("install-cni"),
    );

    wait_until("05-sluice.conflist written", || node.ours().is_some());
    let ours = node.ours().expect("ours");
    assert_eq!(types(&ours), ["flannel", "portmap", "sluice-cni"]);
    assert_eq!(
        ours["name"], "cbr0",
        "flannel's network name, so IPAM state is shared"
    );
    let sluice = &ours["plugins"][2];
    assert_eq!(sluice["agentSocket"], "/run/test/cni.sock");
    assert_eq!(sluice["failMode"], "closed");
    assert_eq!(
        std::fs::read(node.root.join("bin/sluice-cni")).expect("installed binary"),
        b"plugin bytes"
    );

    // Flannel's pod restarts and rewrites its file (here: another delegate setting).
    let rewritten = FLANNEL.replace("\"hairpinMode\": true", "\"hairpinMode\": false");
    std::fs::write(node.conf("10-flannel.conflist"), &rewritten).expect("rewrite");
    wait_until("ours re-derived", || {
        node.ours()
            .is_some_and(|o| o["plugins"][0]["delegate"]["hairpinMode"] == false)
    });

    // A flannel file it does not understand: an error naming the file, nothing written.
    let before = std::fs::read(node.conf("05-sluice.conflist")).expect("ours");
    std::fs::write(
        node.conf("10-flannel.conflist"),
        "{\"name\": \"cbr0\", \"plugins\": ",
    )
    .expect("break");
    wait_until("the error in the log", || {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("10-flannel.conflist: not valid JSON"))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read(node.conf("05-sluice.conflist")).expect("ours"),
        before,
        "the node's configuration is left as it was"
    );
    assert_eq!(
        std::fs::read_dir(node.root.join("net.d"))
            .expect("dir")
            .count(),
        2,
        "no temp files left behind"
    );
    // Fixed again: followed again.
    std::fs::write(node.conf("10-flannel.conflist"), FLANNEL).expect("fix");
    wait_until("ours re-derived after the fix", || {
        node.ours()
            .is_some_and(|o| o["plugins"][0]["delegate"]["hairpinMode"] == true)
    });

    // SIGTERM (an upgrade): everything stays.
    let ok = Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok);
    let status = running.0.wait().expect("exit");
    assert!(status.success(), "exit on SIGTERM: {status}");
    assert!(node.ours().is_some(), "the chain stays after SIGTERM");

    // Uninstall: ours and the binary go, flannel's stays untouched.
    let out = node
        .install_cni(&["--uninstall"])
        .output()
        .expect("uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(node.ours().is_none());
    assert!(!node.root.join("bin/sluice-cni").exists());
    assert_eq!(
        std::fs::read_to_string(node.conf("10-flannel.conflist")).expect("flannel"),
        FLANNEL
    );
}

#[test]
fn refuses_what_it_does_not_understand_and_touches_nothing() {
    let node = Node::new("refuse");
    // No flannel at all.
    let out = node.install_cni(&["--once"]).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no flannel conflist"), "{stderr}");

    // A conflist sluice does not understand (a version it does not speak).
    let odd = FLANNEL.replace("0.3.1", "9.9.9");
    std::fs::write(node.conf("10-flannel.conflist"), &odd).expect("odd");
    let out = node.install_cni(&["--once"]).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("10-flannel.conflist: cniVersion: \"9.9.9\""),
        "{stderr}"
    );
    assert!(node.ours().is_none(), "nothing written");

    // Someone else's 05-sluice.conflist is never removed by uninstall.
    std::fs::write(node.conf("05-sluice.conflist"), FLANNEL).expect("foreign");
    let out = node.install_cni(&["--uninstall"]).output().expect("run");
    assert!(out.status.success());
    assert!(
        Path::new(&node.conf("05-sluice.conflist")).exists(),
        "a file sluice did not write stays"
    );
}
