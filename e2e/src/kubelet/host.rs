//! The node side: the process's own mount namespace (a private `/var/lib/cni` per node), pod
//! network namespaces named under `/run/netns` where the rest of the host sees them, and the
//! node's addresses.
//!
//! Why two mount namespaces: every node namespace shares the host's filesystem, so host-local's
//! leases (`/var/lib/cni/networks/<network>`) and flannel's state (`/var/lib/cni/flannel`) would
//! be shared by all nodes; and flannel's delegate rewrites the `ipam` section (no per-node
//! `dataDir` for host-local). So at start the process unshares its mount namespace (before any
//! thread exists), makes every mount a slave (nothing it mounts leaks out; the host's mounts,
//! e.g. new `/run/netns/*` handles, still come in) and bind-mounts `<state-dir>/var-lib-cni` over
//! `/var/lib/cni`. The CNI plugins it runs inherit that view.
//!
//! A netns handle mounted from a slave mount namespace would stay invisible to the host (and to
//! the scenario runner), so `ip netns add/del` run in the *host's* mount namespace through
//! `nsenter --mount=<handle>`: the one the process was started in when its `/run/netns` is
//! shared with the host (started with `nsenter --net=/run/netns/<node>`), or, under
//! `ip netns exec` (which gives its command a slave mount namespace), its parent's (the shell
//! that ran `ip netns exec`), or `--host-mountns FILE`.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `ip netns` mounts its handles.
pub const NETNS_DIR: &str = "/run/netns";

/// The propagation tags of the mount at `mount_point` in a mountinfo text: (shared, slave), or
/// None when nothing is mounted there.
pub fn mount_propagation(mountinfo: &str, mount_point: &str) -> Option<(bool, bool)> {
    let mut found = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 7 || fields[4] != mount_point {
            continue;
        }
        let optional: Vec<&str> = fields[6..]
            .iter()
            .take_while(|f| **f != "-")
            .copied()
            .collect();
        let shared = optional.iter().any(|f| f.starts_with("shared:"));
        let slave = optional.iter().any(|f| f.starts_with("master:"));
        // The last mount on a mount point is the visible one.
        found = Some((shared, slave));
    }
    found
}

/// The mount namespace where pod netns handles are created, held open.
#[derive(Debug)]
pub struct HostMountNs {
    file: File,
    /// What it was opened from (for messages).
    pub source: String,
}

impl HostMountNs {
    /// A path to the held handle that child processes (nsenter) can open.
    pub fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd())
    }
}

/// Chooses and opens the host mount namespace (see the module doc). Call before [`private_mounts`].
pub fn host_mount_ns(explicit: Option<&Path>) -> Result<HostMountNs> {
    if let Some(p) = explicit {
        let file =
            File::open(p).with_context(|| format!("opening --host-mountns {}", p.display()))?;
        return Ok(HostMountNs {
            file,
            source: p.display().to_string(),
        });
    }
    let own =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    match mount_propagation(&own, NETNS_DIR) {
        None => bail!(
            "{NETNS_DIR} is not a mount point here: create the node's namespace with `ip netns add` first (it makes {NETNS_DIR} a shared mount), or pass --host-mountns"
        ),
        Some((_, false)) => {
            let file = File::open("/proc/self/ns/mnt").context("opening /proc/self/ns/mnt")?;
            Ok(HostMountNs {
                file,
                source: "the mount namespace it was started in (its /run/netns is shared with the host)".into(),
            })
        }
        Some((_, true)) => {
            let ppid = nix::unistd::getppid();
            let info = std::fs::read_to_string(format!("/proc/{ppid}/mountinfo"))
                .with_context(|| format!("reading /proc/{ppid}/mountinfo (the parent's)"))?;
            match mount_propagation(&info, NETNS_DIR) {
                Some((_, false)) => {
                    let p = format!("/proc/{ppid}/ns/mnt");
                    let file = File::open(&p).with_context(|| format!("opening {p}"))?;
                    Ok(HostMountNs {
                        file,
                        source: format!("the parent's mount namespace ({p}; {NETNS_DIR} is a slave mount here, as under `ip netns exec`)"),
                    })
                }
                _ => Err(anyhow!(
                    "{NETNS_DIR} is a slave mount here (as under `ip netns exec`) and in the parent process too: pod namespaces made here would be invisible to the host; start with `nsenter --net=/run/netns/<node> sluice-kubelet ...` or pass --host-mountns /proc/<pid in the host's mount namespace>/ns/mnt"
                )),
            }
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Unshares this process's mount namespace (must be called while it has one thread), makes it
/// a slave of the original, and binds `<state_dir>/var-lib-cni` over `/var/lib/cni`.
pub fn private_mounts(state_dir: &Path) -> Result<PathBuf> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unshare(CLONE_NEWNS) (needs root and a single-threaded process)")?;
    run(Command::new("mount").args(["--make-rslave", "/"]))?;
    let lib = state_dir.join("var-lib-cni");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    std::fs::create_dir_all("/var/lib/cni").context("creating /var/lib/cni")?;
    run(Command::new("mount")
        .arg("--bind")
        .arg(&lib)
        .arg("/var/lib/cni"))?;
    Ok(lib)
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// `ip netns add NAME` in the host's mount namespace, then `lo` up (from here: this also checks
/// that the handle is visible in this mount namespace, where the CNI plugins open it).
pub fn netns_add(host: &HostMountNs, name: &str) -> Result<()> {
    if netns_path(name).exists() {
        netns_del(host, name)?;
    }
    run(Command::new("nsenter")
        .arg(format!("--mount={}", host.path()))
        .args(["--", "ip", "netns", "add", name]))?;
    run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"])).with_context(|| {
        format!(
            "netns {name} was added in {} but is not usable here",
            host.source
        )
    })
}

/// `ip netns del NAME` in the host's mount namespace; Ok when it is gone already.
pub fn netns_del(host: &HostMountNs, name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    if is_own_netns(name) {
        bail!("not deleting netns {name}: this process runs in it (a node's namespace?)");
    }
    let r = run(Command::new("nsenter")
        .arg(format!("--mount={}", host.path()))
        .args(["--", "ip", "netns", "del", name]));
    if netns_path(name).exists() {
        r?;
        bail!("netns {name} is still there after `ip netns del`");
    }
    Ok(())
}

/// True when the named handle is the network namespace this process runs in (never deleted,
/// whatever its name).
pub fn is_own_netns(name: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (
        std::fs::metadata(netns_path(name)),
        std::fs::metadata("/proc/self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Names in /run/netns starting with `prefix`, except this process's own namespace.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix) && !is_own_netns(n))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Global addresses of `dev` (IPv4 first) in this network namespace, from `ip -o addr`.
pub fn global_addrs(dev: Option<&str>) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let mut cmd = Command::new("ip");
        cmd.args([family, "-o", "addr", "show"]);
        if let Some(d) = dev {
            cmd.args(["dev", d]);
        }
        cmd.args(["scope", "global"]);
        let Ok(o) = cmd.output() else { continue };
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let mut words = line.split_whitespace();
            if words.any(|w| w == "inet" || w == "inet6") {
                if let Some(a) = words.next().and_then(|c| c.split('/').next()) {
                    if let Ok(ip) = a.parse() {
                        out.push(ip);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propagation_from_mountinfo() {
        let host = "42 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    43 42 0:4 net:[4026532177] /run/netns/x rw shared:2 - nsfs nsfs rw\n";
        assert_eq!(mount_propagation(host, "/run/netns"), Some((true, false)));
        let under_exec =
            "100 90 254:0 /run/netns /run/netns rw,relatime master:1 - ext4 /dev/vda rw\n";
        assert_eq!(
            mount_propagation(under_exec, "/run/netns"),
            Some((false, true))
        );
        let both = "100 90 254:0 /run/netns /run/netns rw shared:7 master:1 - ext4 /dev/vda rw\n";
        assert_eq!(mount_propagation(both, "/run/netns"), Some((true, true)));
        assert_eq!(mount_propagation(host, "/run"), None);
    }
}
