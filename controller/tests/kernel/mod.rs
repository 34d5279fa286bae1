//! What the kernel-only test files share: a uniquely named network namespace removed when
//! dropped (also when a test panics), a root check, and `nft` inside a namespace.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice::nft::Nft;

/// A network namespace `<prefix>-<tag>-<pid>-<n>`, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(prefix: &str, tag: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip")
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    /// An `Nft` that runs inside this namespace.
    pub fn nft(&self) -> Nft {
        Nft::in_netns(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `nft <args>` in `ns`, which must succeed; its stdout.
pub fn nft(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft"])
        .args(args)
        .output()
        .expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?} in {}: {}",
        ns.0,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
