//! Uninstall (the chart's `uninstall.cleanupOnExit`): `sluice agent --cleanup` and
//! `--cleanup-on-exit` remove both of sluice's tables, `inet sluice` and the anti-spoofing
//! `bridge sluice`, and nothing else; `sluice install-cni --uninstall-on-exit` removes its
//! conflist and sluice-cni on SIGTERM and leaves flannel's conflist as it was. Without the flags
//! a stop leaves everything in place.
//!
//! The agent tests need root (a network namespace, nft) and are skipped otherwise.

mod kernel;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kernel::{is_root, nft, Netns};

const PREFIX: &str = "sluice-uninst";

/// Both of sluice's tables, and one of someone else's (flannel's, kube-proxy's...).
fn tables_of_sluice_and_others(ns: &Netns) {
    let script = "add table inet sluice\nadd chain inet sluice c\n\
                  add table bridge sluice\nadd counter bridge sluice spoofed\n\
                  add table inet someone-else\n";
    ns.nft().apply(script).expect("nft");
    assert_eq!(
        tables(ns),
        [
            "table bridge sluice",
            "table inet sluice",
            "table inet someone-else"
        ]
    );
}

fn tables(ns: &Netns) -> Vec<String> {
    let mut t: Vec<String> = nft(ns, &["list", "tables"])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    t.sort();
    t
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "{PREFIX}-{tag}-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A kubeconfig whose API server is not there: the agent starts, never syncs, and stops on
/// SIGTERM (what it does to the tables then is all that is tested).
fn unreachable_kubeconfig(dir: &Path) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\n\
         clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: none}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .expect("kubeconfig");
    path
}

fn terminate(child: &mut Child, log: &Path) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "did not exit on SIGTERM\n--- log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_log(child: &mut Child, log: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("exited ({status}) before logging {what:?}:\n{text}");
        }
        assert!(Instant::now() < deadline, "no {what:?} in the log:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_cleanup_removes_both_sluice_tables_and_nothing_else() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespace, nft)");
        return;
    }
    let ns = Netns::new(PREFIX, "cleanup");
    tables_of_sluice_and_others(&ns);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_sluice"),
            "agent",
            "--cleanup",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("sluice agent --cleanup");
    assert!(
        out.status.success(),
        "sluice agent --cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tables(&ns), ["table inet someone-else"]);
    // again, with nothing to remove: not an error
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_sluice"),
            "agent",
            "--cleanup",
        ])
        .output()
        .expect("sluice agent --cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Start the agent in `ns` (no API server, no CNI socket), SIGTERM it once it runs; the
/// tables afterwards.
fn agent_stop(ns: &Netns, extra: &[&str]) -> Vec<String> {
    let dir = temp_dir("agent");
    let kubeconfig = unreachable_kubeconfig(&dir);
    let log = dir.join("agent.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_sluice"),
            "agent",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--listen", "127.0.0.1:9763", "--cni-socket", ""])
        .args(extra)
        .env("NODE_NAME", "node-1")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("sluice agent");
    wait_for_log(&mut child, &log, "sluice agent starting");
    let status = terminate(&mut child, &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "the agent exited with {status}:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
    tables(ns)
}

#[test]
fn agent_cleanup_on_exit_removes_both_tables_on_sigterm_and_only_then() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespace, nft)");
        return;
    }
    let ns = Netns::new(PREFIX, "onexit");
    tables_of_sluice_and_others(&ns);
    // without the flag, a stop leaves the rules in place (restarts and upgrades keep enforcing)
    assert_eq!(
        agent_stop(&ns, &[]),
        [
            "table bridge sluice",
            "table inet sluice",
            "table inet someone-else"
        ]
    );
    assert_eq!(
        agent_stop(&ns, &["--cleanup-on-exit"]),
        ["table inet someone-else"]
    );
}

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

/// install-cni on temp CNI dirs until SIGTERM; whether its conflist and sluice-cni are still
/// there afterwards (flannel's conflist must be untouched either way).
fn install_cni_stop(extra: &[&str]) -> (bool, bool) {
    let root = temp_dir("cni");
    let (bin, conf) = (root.join("bin"), root.join("net.d"));
    std::fs::create_dir_all(&bin).expect("bin");
    std::fs::create_dir_all(&conf).expect("net.d");
    // install-cni copies the plugin's bytes, it never runs them
    std::fs::write(root.join("sluice-cni"), b"plugin bytes").expect("plugin");
    std::fs::write(conf.join("10-flannel.conflist"), FLANNEL).expect("flannel");
    let log = root.join("install-cni.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("install-cni")
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .arg("--plugin-binary")
        .arg(root.join("sluice-cni"))
        .args(["--interval", "100ms"])
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("sluice install-cni");
    wait_for_log(&mut child, &log, "wrote the chained conflist");
    assert!(conf.join("05-sluice.conflist").exists());
    let status = terminate(&mut child, &log);
    assert!(
        status.success(),
        "install-cni exited with {status}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        std::fs::read_to_string(conf.join("10-flannel.conflist")).expect("flannel's"),
        FLANNEL,
        "flannel's conflist is as it was"
    );
    let left = (
        conf.join("05-sluice.conflist").exists(),
        bin.join("sluice-cni").exists(),
    );
    let _ = std::fs::remove_dir_all(&root);
    left
}

#[test]
fn install_cni_uninstall_on_exit_unchains_on_sigterm_and_only_then() {
    assert_eq!(
        install_cni_stop(&[]),
        (true, true),
        "a plain stop keeps both"
    );
    assert_eq!(
        install_cni_stop(&["--uninstall-on-exit"]),
        (false, false),
        "--uninstall-on-exit removes the conflist and sluice-cni"
    );
}
