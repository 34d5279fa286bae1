//! `sluice-kubelet`: a kubelet stand-in for the local cluster (issue 5). One per node, run
//! inside the node's network namespace. It watches the Pods bound to its node and does what a
//! kubelet does for networking: a network namespace per pod, the CNI chain as a runtime runs it
//! ([`cni`]), a server on every declared container port ([`server`]), the Pod's status (IPs,
//! phase, Ready), and on deletion CNI DEL and the namespace's removal. See [`USAGE`].

pub mod cni;
pub mod host;
pub mod server;

use anyhow::{Context, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions, WatchEvent, WatchParams,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use cni::{Attachment, CapabilityArgs, Conflist, Invoker};
use host::HostMountNs;
use server::{PodServers, Proto};

/// The interface text (also `sluice-kubelet --help`, and e2e/CLUSTER.md's source).
pub const USAGE: &str = "\
sluice-kubelet --node NAME --kubeconfig FILE --cni-conf-dir DIR --cni-bin-dir DIR[:DIR...]
               --netns-prefix PREFIX [--state-dir DIR] [--node-ip IP[,IP]] [--host-mountns FILE]
sluice-kubelet --cleanup --node NAME --cni-conf-dir DIR --cni-bin-dir DIR[:DIR...]
               --netns-prefix PREFIX [--state-dir DIR] [--host-mountns FILE]

A kubelet stand-in for one node of the local cluster (root). Run it INSIDE the node's network
namespace: `ip netns exec NODE sluice-kubelet ...` or `nsenter --net=/run/netns/NODE sluice-kubelet ...`;
the CNI plugins run there too.

It watches Pods with spec.nodeName=NODE (list, then watch; relists after errors) and for each:
  - creates the pod's network namespace /run/netns/<pod_netns_name(PREFIX, namespace, name)>
    (`ip netns add`, lo up), visible to the whole host;
  - runs the CNI chain as a runtime does: the first *.conflist in --cni-conf-dir by file name,
    each plugin in order for ADD (the list's name and cniVersion injected, prevResult from the
    previous plugin, runtimeConfig.portMappings for hostPorts when a plugin declares the
    capability), CNI_CONTAINERID = the pod UID without dashes, CNI_NETNS=/run/netns/<name>,
    CNI_IFNAME=eth0, CNI_PATH = --cni-bin-dir, CNI_ARGS = IgnoreUnknown=1;K8S_POD_NAMESPACE=..;
    K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=<container id>;K8S_POD_UID=..; the result is
    cached in STATE/cache/<netns name>.json with the conflist used;
  - when ADD fails (logged with the plugin's error JSON; sluice-cni's code 11 means the agent has
    not programmed the pod yet): DEL, then ADD again after a backoff (0.5 s doubling to 10 s);
  - serves every container port in the pod's namespace: TCP accepts and writes one line
    `<namespace>/<name>` then closes; UDP echoes each datagram back; SCTP is skipped (logged);
  - once they listen, patches the Pod's status: phase Running, podIP/podIPs (the CNI result's
    addresses on eth0), hostIP/hostIPs (--node-ip, else the global addresses of this namespace's
    eth0, else of any interface), conditions PodScheduled/Initialized/ContainersReady/Ready
    True (Ready False when a port could not be served);
  - hostNetwork pods: no namespace, no CNI; servers in the node's namespace; podIPs = node IPs;
  - when the Pod is deleted or gets a deletionTimestamp: stops its servers, CNI DEL in reverse
    order (prevResult = the cached result for cniVersion >= 0.4.0, as libcni), deletes the
    namespace, forgets the cache entry, and (deletionTimestamp) deletes the Pod object with
    grace period 0 (as a kubelet confirms a graceful deletion).

At start: sandboxes in STATE whose Pod is gone (or is another Pod now) or whose ADD never
finished are torn down (CNI DEL, namespace deleted); namespaces named PREFIX* without a cache
entry are deleted; sandboxes of Pods still bound here are adopted (servers started again, status
checked) without a new ADD. PREFIX must be unique per node and not a prefix of another node's.
SIGTERM/SIGINT: exits and leaves every pod's namespace and CNI attachment in place (a kubelet
restart keeps pods); only the servers (threads of this process) stop until the next start.
--cleanup: no API; tears down every sandbox in STATE and every PREFIX* namespace, then exits.

Mounts: host-local's leases live in /var/lib/cni/networks/<network>, shared by every node on one
machine, and flannel rewrites its delegate's ipam (no per-node dataDir). So the process unshares
its mount namespace at start, makes it a slave and bind-mounts STATE/var-lib-cni over
/var/lib/cni (the plugins it runs see that). Pod namespaces are added/deleted in the host's mount
namespace through nsenter: the start-up one when its /run/netns is shared with the host, else
(under `ip netns exec`) the parent process's, else --host-mountns FILE (e.g. /proc/PID/ns/mnt).
Needs: ip (iproute2), nsenter, mount.

Options:
  --node NAME            the Node this kubelet runs (Pods with spec.nodeName=NAME)
  --kubeconfig FILE      how to reach the API server (needs get/list/watch/delete pods,
                         patch pods/status)
  --cni-conf-dir DIR     where the conflists are (e.g. /etc/cni/net.d of this node)
  --cni-bin-dir DIRS     colon-separated plugin dirs, searched in order; also CNI_PATH
  --netns-prefix PREFIX  pod namespace names start with this (e.g. `c1-n1-`)
  --state-dir DIR        cache, leases (var-lib-cni); default /run/sluice-kubelet/NAME
  --node-ip IP[,IP]      the node's addresses for hostIP(s) and hostNetwork pods
  --host-mountns FILE    mount namespace in which to add/delete pod namespaces
  --cleanup              tear everything down and exit (see above)

Pod namespace names (pod_netns_name): PREFIX + NAMESPACE + \".\" + NAME when that is at most 40
characters; otherwise PREFIX + the first characters of NAMESPACE.NAME + \"-\" + 8 hex digits of
the 64-bit FNV-1a hash of \"NAMESPACE/NAME\", 40 characters in all (PREFIX + hash alone if
PREFIX is longer than 31 characters).";

/// Longest pod netns name [`pod_netns_name`] makes (unless the prefix alone is longer).
pub const NETNS_NAME_MAX: usize = 40;

/// 64-bit FNV-1a (stable across Rust versions, unlike `DefaultHasher`).
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The name of a pod's network namespace (under /run/netns): `<prefix><namespace>.<name>`, or
/// shortened with a hash when longer than [`NETNS_NAME_MAX`] (see [`USAGE`]). Deterministic, so
/// anyone can find a pod's namespace from its namespace and name.
pub fn pod_netns_name(prefix: &str, namespace: &str, name: &str) -> String {
    let full = format!("{prefix}{namespace}.{name}");
    if full.len() <= NETNS_NAME_MAX {
        return full;
    }
    let hash = format!(
        "{:08x}",
        fnv1a64(format!("{namespace}/{name}").as_bytes()) as u32
    );
    let room = NETNS_NAME_MAX.saturating_sub(prefix.len() + 1 + hash.len());
    let body = format!("{namespace}.{name}");
    let mut cut = room.min(body.len());
    while !body.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut == 0 {
        return format!("{prefix}{hash}");
    }
    format!("{prefix}{}-{hash}", &body[..cut])
}

/// The sandbox's container ID: the pod UID without dashes (hex; unique per Pod object).
pub fn container_id(uid: &str) -> String {
    uid.chars().filter(|c| *c != '-').collect()
}

/// Every declared container port: (port, protocol) to serve, the ones skipped (with why), and
/// hostPort mappings (hostPort, containerPort, protocol, hostIP) for portmap.
#[derive(Debug, Default, PartialEq)]
pub struct PodPorts {
    pub serve: Vec<(u16, Proto)>,
    pub skipped: Vec<String>,
    pub host_ports: Vec<(u16, u16, String, Option<String>)>,
}

pub fn pod_ports(pod: &Pod) -> PodPorts {
    let mut out = PodPorts::default();
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[]);
    for c in containers {
        for p in c.ports.as_deref().unwrap_or(&[]) {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let Ok(port) = u16::try_from(p.container_port) else {
                out.skipped.push(format!(
                    "{}: port {} out of range",
                    c.name, p.container_port
                ));
                continue;
            };
            let pr = match proto {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                other => {
                    out.skipped.push(format!(
                        "{}: {other}/{port} (no {other} sockets here)",
                        c.name
                    ));
                    continue;
                }
            };
            if port == 0 {
                continue;
            }
            if !out.serve.contains(&(port, pr)) {
                out.serve.push((port, pr));
            }
            if let Some(hp) = p
                .host_port
                .and_then(|h| u16::try_from(h).ok())
                .filter(|h| *h > 0)
            {
                out.host_ports
                    .push((hp, port, proto.to_string(), p.host_ip.clone()));
            }
        }
    }
    out
}

fn is_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// What the status should say (the parts this kubelet owns).
#[derive(Clone, Debug, PartialEq)]
pub struct WantStatus {
    pub pod_ips: Vec<String>,
    pub host_ips: Vec<String>,
    /// None = ready; Some(why not).
    pub not_ready: Option<String>,
}

/// The merge patch for the status subresource.
pub fn status_patch(w: &WantStatus) -> Value {
    let ready = if w.not_ready.is_none() {
        "True"
    } else {
        "False"
    };
    let cond = |t: &str, status: &str| {
        let mut c = json!({"type": t, "status": status});
        if status == "False" {
            c["reason"] = json!("PortNotServed");
            c["message"] = json!(w.not_ready.clone().unwrap_or_default());
        }
        c
    };
    let conditions = vec![
        cond("PodScheduled", "True"),
        cond("Initialized", "True"),
        cond("ContainersReady", ready),
        cond("Ready", ready),
    ];
    let ips = |l: &[String]| -> Vec<Value> { l.iter().map(|ip| json!({"ip": ip})).collect() };
    json!({
        "status": {
            "phase": "Running",
            "podIP": w.pod_ips.first(),
            "podIPs": ips(&w.pod_ips),
            "hostIP": w.host_ips.first(),
            "hostIPs": ips(&w.host_ips),
            "conditions": conditions,
        }
    })
}

/// True when the Pod's status already says what `w` wants.
pub fn status_matches(pod: &Pod, w: &WantStatus) -> bool {
    let Some(s) = pod.status.as_ref() else {
        return false;
    };
    let ips = |l: &Option<Vec<k8s_openapi::api::core::v1::PodIP>>| -> Vec<String> {
        l.as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|p| p.ip.clone())
            .collect()
    };
    let host_ips: Vec<String> = s
        .host_ips
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|h| h.ip.clone())
        .collect();
    let cond = |t: &str| {
        s.conditions
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
    };
    let ready = Some(
        if w.not_ready.is_none() {
            "True"
        } else {
            "False"
        }
        .to_string(),
    );
    s.phase.as_deref() == Some("Running")
        && s.pod_ip.as_ref() == w.pod_ips.first()
        && ips(&s.pod_ips) == w.pod_ips
        && s.host_ip.as_ref() == w.host_ips.first()
        && host_ips == w.host_ips
        && cond("Ready") == ready
        && cond("ContainersReady") == ready
}

// ---------------------------------------------------------------------------------------------
// The runtime

/// Flags (see [`USAGE`]).
#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub kubeconfig: Option<PathBuf>,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub netns_prefix: String,
    pub state_dir: PathBuf,
    pub node_ips: Vec<IpAddr>,
}

/// One sandbox in the state dir (`cache/<netns>.json`), written before ADD and again with its
/// result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// The conflist ADD ran (DEL runs the same one).
    pub conflist_file: String,
    pub conflist: Value,
    pub cni_args: String,
    /// The ADD result (None: ADD has not succeeded).
    pub result: Option<Value>,
}

impl Record {
    fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            netns_path: host::netns_path(&self.netns).display().to_string(),
            ifname: self.ifname.clone(),
            pod_namespace: self.namespace.clone(),
            pod_name: self.name.clone(),
            pod_uid: self.uid.clone(),
        }
    }
}

pub fn log(node: &str, msg: impl std::fmt::Display) {
    eprintln!("sluice-kubelet[{node}]: {msg}");
}

/// The node's shared state.
pub struct Kubelet {
    pub cfg: Config,
    pub host: HostMountNs,
    invoker: Invoker,
    /// This process's own network namespace (hostNetwork pods' servers).
    node_ns: File,
    host_ips: Vec<String>,
    /// One lock per netns name: a Pod recreated under the same name waits for the old teardown.
    names: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct Sandbox {
    record: Option<Record>,
    servers: PodServers,
    not_ready: Option<String>,
    _name_lock: tokio::sync::OwnedMutexGuard<()>,
}

impl Kubelet {
    pub fn new(cfg: Config, host: HostMountNs) -> Result<Kubelet> {
        let node_ns = File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
        let mut ips = cfg.node_ips.clone();
        if ips.is_empty() {
            ips = host::global_addrs(Some("eth0"));
        }
        if ips.is_empty() {
            ips = host::global_addrs(None);
        }
        let host_ips: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
        let invoker = Invoker {
            path: cfg.cni_bin_dirs.clone(),
        };
        Ok(Kubelet {
            cfg,
            host,
            invoker,
            node_ns,
            host_ips,
            names: Mutex::new(HashMap::new()),
        })
    }

    fn log(&self, msg: impl std::fmt::Display) {
        log(&self.cfg.node, msg)
    }

    fn cache_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("cache")
    }

    fn record_path(&self, netns: &str) -> PathBuf {
        self.cache_dir().join(format!("{netns}.json"))
    }

    fn save(&self, r: &Record) -> Result<()> {
        std::fs::create_dir_all(self.cache_dir())?;
        let p = self.record_path(&r.netns);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))
    }

    /// Every record in the state dir (unreadable ones are logged and removed).
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.cache_dir()) else {
            return out;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                let _ = std::fs::remove_file(&p);
                continue;
            }
            match std::fs::read(&p)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Record>(&b)?))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    self.log(format!(
                        "dropping unreadable cache entry {}: {e:#}",
                        p.display()
                    ));
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        out.sort_by(|a, b| a.netns.cmp(&b.netns));
        out
    }

    fn name_lock(&self, netns: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.names.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(netns.to_string()).or_default().clone()
    }

    /// CNI DEL (retried a few times), namespace deleted, record removed. Blocking.
    pub fn teardown_record(&self, r: &Record) {
        let key = format!("{}/{}", r.namespace, r.name);
        let list = match Conflist::from_value(Path::new(&r.conflist_file), r.conflist.clone()) {
            Ok(l) => Some(l),
            Err(e) => {
                self.log(format!(
                    "{key}: cached conflist unusable ({e:#}); trying the current one"
                ));
                Conflist::load_first(&self.cfg.cni_conf_dir).ok()
            }
        };
        if let Some(list) = list {
            let a = r.attachment();
            let mut delay = Duration::from_millis(500);
            for attempt in 1..=5 {
                match self
                    .invoker
                    .del(&list, &a, r.result.as_ref(), &CapabilityArgs::new())
                {
                    Ok(()) => break,
                    Err(e) if attempt < 5 => {
                        self.log(format!(
                            "{key}: CNI DEL attempt {attempt}: {e}; retrying in {delay:?}"
                        ));
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => self.log(format!(
                        "{key}: CNI DEL failed {attempt} times, giving up: {e}"
                    )),
                }
            }
        } else {
            self.log(format!(
                "{key}: no conflist for CNI DEL; deleting the namespace only"
            ));
        }
        if let Err(e) = host::netns_del(&self.host, &r.netns) {
            self.log(format!("{key}: {e:#}"));
        }
        let _ = std::fs::remove_file(self.record_path(&r.netns));
    }

    /// Tears down every record not in `keep` (uid -> pod) and every PREFIX* namespace without a
    /// record; returns the records to adopt (uid -> record). Blocking.
    pub fn startup_cleanup(&self, keep: &HashMap<String, Pod>) -> HashMap<String, Record> {
        let mut adopt = HashMap::new();
        for r in self.records() {
            let wanted = keep.get(&r.uid).is_some_and(|p| {
                !terminating(p)
                    && !terminal(p)
                    && !is_host_network(p)
                    && pod_netns_name(&self.cfg.netns_prefix, &r.namespace, &r.name) == r.netns
            });
            if wanted && r.result.is_some() && host::netns_path(&r.netns).exists() {
                self.log(format!(
                    "{}/{}: adopting sandbox {}",
                    r.namespace, r.name, r.netns
                ));
                adopt.insert(r.uid.clone(), r);
            } else {
                self.log(format!(
                    "{}/{}: stale sandbox {} (pod gone, replaced or ADD unfinished): tearing down",
                    r.namespace, r.name, r.netns
                ));
                self.teardown_record(&r);
            }
        }
        let known: Vec<&str> = adopt.values().map(|r| r.netns.as_str()).collect();
        for ns in host::list_netns(&self.cfg.netns_prefix) {
            if !known.contains(&ns.as_str()) {
                self.log(format!("deleting stale namespace {ns} (no cache entry)"));
                if let Err(e) = host::netns_del(&self.host, &ns) {
                    self.log(format!("{e:#}"));
                }
            }
        }
        adopt
    }

    /// `--cleanup`: every sandbox and PREFIX* namespace. Blocking.
    pub fn cleanup_all(&self) {
        self.startup_cleanup(&HashMap::new());
    }

    fn want_status(&self, sb: &Sandbox) -> WantStatus {
        let pod_ips = match &sb.record {
            Some(r) => r
                .result
                .as_ref()
                .map(|res| cni::pod_ips(res, &r.ifname))
                .unwrap_or_default(),
            None => self.host_ips.clone(),
        };
        WantStatus {
            pod_ips,
            host_ips: self.host_ips.clone(),
            not_ready: sb.not_ready.clone(),
        }
    }

    /// One ADD attempt (blocking): record, namespace, chain. On failure: DEL, keep the record.
    fn try_add(&self, r: &mut Record, list: &Conflist, caps: &CapabilityArgs) -> Result<()> {
        self.save(r)?;
        if !host::netns_path(&r.netns).exists() {
            host::netns_add(&self.host, &r.netns)?;
        }
        match self.invoker.add(list, &r.attachment(), caps) {
            Ok(result) => {
                r.result = Some(result);
                self.save(r)
            }
            Err(e) => {
                let _ = self.invoker.del(list, &r.attachment(), None, caps);
                Err(anyhow::Error::new(e))
            }
        }
    }

    fn start_servers(&self, pod: &Pod, netns: Option<&str>) -> (PodServers, Option<String>) {
        let key = pod_key(pod);
        let ports = pod_ports(pod);
        for s in &ports.skipped {
            self.log(format!("{key}: not serving {s}"));
        }
        let handle = match netns {
            Some(n) => match File::open(host::netns_path(n)) {
                Ok(f) => f,
                Err(e) => {
                    return (
                        PodServers::default(),
                        Some(format!("opening netns {n}: {e}")),
                    )
                }
            },
            None => match self.node_ns.try_clone() {
                Ok(f) => f,
                Err(e) => return (PodServers::default(), Some(format!("node netns: {e}"))),
            },
        };
        let (servers, failed) = PodServers::start(&handle, &ports.serve, &key);
        let not_ready = if failed.is_empty() {
            None
        } else {
            let msg = failed
                .iter()
                .map(|(p, pr, e)| format!("{pr}/{p}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            self.log(format!("{key}: cannot serve {msg}"));
            Some(msg)
        };
        (servers, not_ready)
    }
}

fn show_ports(l: &[(u16, Proto)]) -> String {
    if l.is_empty() {
        return "no ports".into();
    }
    l.iter()
        .map(|(p, pr)| format!("{pr}/{p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the pod task should do with its latest view of the Pod.
fn wants_sandbox(pod: Option<&Pod>) -> bool {
    pod.is_some_and(|p| !terminating(p) && !terminal(p))
}

/// Sets up the sandbox, retrying until it works or the Pod no longer wants one.
async fn setup(
    k: &Arc<Kubelet>,
    rx: &mut watch::Receiver<Option<Pod>>,
    adopted: Option<Record>,
) -> Option<Sandbox> {
    let pod = rx.borrow().clone()?;
    let key = pod_key(&pod);
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let netns = pod_netns_name(&k.cfg.netns_prefix, &namespace, &name);
    let lock = k.name_lock(&netns);
    let guard = tokio::select! {
        g = lock.lock_owned() => g,
        _ = wait_unwanted(rx) => return None,
    };
    if is_host_network(&pod) {
        let k2 = k.clone();
        let p2 = pod.clone();
        let (servers, not_ready) = tokio::task::spawn_blocking(move || k2.start_servers(&p2, None))
            .await
            .unwrap_or_else(|e| {
                (
                    PodServers::default(),
                    Some(format!("server start panicked: {e}")),
                )
            });
        k.log(format!(
            "{key}: hostNetwork pod: serving {} in the node's namespace",
            show_ports(&servers.listening)
        ));
        return Some(Sandbox {
            record: None,
            servers,
            not_ready,
            _name_lock: guard,
        });
    }
    let record = match adopted {
        Some(r) => r,
        None => {
            let mut delay = BACKOFF_START;
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let k2 = k.clone();
                let p2 = pod.clone();
                let (ns2, uid2, name2, nsn2) =
                    (namespace.clone(), uid.clone(), name.clone(), netns.clone());
                let outcome = tokio::task::spawn_blocking(move || -> Result<Record> {
                    let list = Conflist::load_first(&k2.cfg.cni_conf_dir)?;
                    let cid = container_id(&uid2);
                    let mut r = Record {
                        namespace: ns2,
                        name: name2,
                        uid: uid2,
                        container_id: cid,
                        netns: nsn2,
                        ifname: "eth0".into(),
                        conflist_file: list.file.display().to_string(),
                        conflist: list.raw.clone(),
                        cni_args: String::new(),
                        result: None,
                    };
                    r.cni_args = cni::cni_args(&r.attachment());
                    let mut caps = CapabilityArgs::new();
                    if let Some(pm) = cni::port_mappings(&pod_ports(&p2).host_ports) {
                        caps.insert("portMappings".into(), pm);
                    }
                    k2.try_add(&mut r, &list, &caps)?;
                    Ok(r)
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("ADD task panicked: {e}")));
                match outcome {
                    Ok(r) => {
                        let ips = r
                            .result
                            .as_ref()
                            .map(|res| cni::pod_ips(res, &r.ifname))
                            .unwrap_or_default();
                        k.log(format!(
                            "{key}: CNI ADD ok (attempt {attempt}) in {}: {ips:?}",
                            r.netns
                        ));
                        break r;
                    }
                    Err(e) => {
                        k.log(format!(
                            "{key}: CNI ADD attempt {attempt} failed: {e:#}; retrying in {delay:?}"
                        ));
                        let stop = tokio::select! {
                            _ = tokio::time::sleep(delay) => false,
                            _ = wait_unwanted(rx) => true,
                        };
                        delay = (delay * 2).min(BACKOFF_MAX);
                        if stop {
                            // The Pod went away meanwhile: undo what the attempts left.
                            let k2 = k.clone();
                            let nsn = netns.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                if let Ok(b) = std::fs::read(k2.record_path(&nsn)) {
                                    if let Ok(r) = serde_json::from_slice::<Record>(&b) {
                                        k2.teardown_record(&r);
                                        return;
                                    }
                                }
                                let _ = host::netns_del(&k2.host, &nsn);
                            })
                            .await;
                            return None;
                        }
                    }
                }
            }
        }
    };
    let k2 = k.clone();
    let p2 = pod.clone();
    let nsn = record.netns.clone();
    let (servers, not_ready) =
        tokio::task::spawn_blocking(move || k2.start_servers(&p2, Some(&nsn)))
            .await
            .unwrap_or_else(|e| {
                (
                    PodServers::default(),
                    Some(format!("server start panicked: {e}")),
                )
            });
    k.log(format!(
        "{key}: serving {} in {}",
        show_ports(&servers.listening),
        record.netns
    ));
    Some(Sandbox {
        record: Some(record),
        servers,
        not_ready,
        _name_lock: guard,
    })
}

/// Resolves when the latest Pod no longer wants a sandbox (or the sender is gone).
async fn wait_unwanted(rx: &mut watch::Receiver<Option<Pod>>) {
    loop {
        if !wants_sandbox(rx.borrow_and_update().as_ref()) {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn teardown(k: &Arc<Kubelet>, sb: Sandbox, key: &str) {
    let Sandbox {
        record,
        mut servers,
        _name_lock,
        ..
    } = sb;
    let k2 = k.clone();
    let _ = tokio::task::spawn_blocking(move || {
        servers.stop();
        if let Some(r) = record {
            k2.teardown_record(&r);
        }
    })
    .await;
    k.log(format!("{key}: sandbox removed"));
    drop(_name_lock);
}

/// Bounds each API request of a pod task (a hung request must not stall the pod's teardown).
const API_TIMEOUT: Duration = Duration::from_secs(15);

/// Ok(true) done, Ok(false) answered with one of `gone` (nothing to do), Err(why) to retry.
async fn api_call<T>(
    call: impl std::future::Future<Output = std::result::Result<T, kube::Error>>,
    gone: &[u16],
) -> std::result::Result<bool, String> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(kube::Error::Api(s))) if gone.contains(&s.code) => Ok(false),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {API_TIMEOUT:?}")),
    }
}

/// One Pod's life on this node.
async fn pod_task(
    k: Arc<Kubelet>,
    api: Api<Pod>,
    mut rx: watch::Receiver<Option<Pod>>,
    adopted: Option<Record>,
) {
    let mut sandbox: Option<Sandbox> = None;
    let mut adopted = adopted;
    let mut last_key = String::new();
    loop {
        let pod = rx.borrow_and_update().clone();
        let mut retry: Option<Duration> = None;
        if let Some(p) = &pod {
            last_key = pod_key(p);
        }
        if wants_sandbox(pod.as_ref()) {
            if sandbox.is_none() {
                sandbox = setup(&k, &mut rx, adopted.take()).await;
                if sandbox.is_none() {
                    continue;
                }
            }
            let p = rx.borrow().clone();
            if let (Some(sb), Some(p)) = (&sandbox, p.filter(|p| wants_sandbox(Some(p)))) {
                let want = k.want_status(sb);
                if !status_matches(&p, &want) {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let api = Api::<Pod>::namespaced(
                        api.clone().into_client(),
                        p.metadata.namespace.as_deref().unwrap_or("default"),
                    );
                    let (pp, patch) = (PatchParams::default(), Patch::Merge(status_patch(&want)));
                    let call = api.patch_status(&name, &pp, &patch);
                    match api_call(call, &[404]).await {
                        Ok(true) => k.log(format!(
                            "{last_key}: status Running, podIPs {:?}",
                            want.pod_ips
                        )),
                        Ok(false) => {}
                        Err(e) => {
                            k.log(format!("{last_key}: patching status: {e}; retrying"));
                            retry = Some(Duration::from_secs(1));
                        }
                    }
                }
            } else {
                continue;
            }
        } else {
            if let Some(sb) = sandbox.take() {
                teardown(&k, sb, &last_key).await;
            } else if let Some(r) = adopted.take() {
                let k2 = k.clone();
                let _ = tokio::task::spawn_blocking(move || k2.teardown_record(&r)).await;
            }
            match &pod {
                None => return,
                Some(p) if terminating(p) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let api = Api::<Pod>::namespaced(
                        api.clone().into_client(),
                        p.metadata.namespace.as_deref().unwrap_or("default"),
                    );
                    let dp = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(Preconditions {
                            uid: p.metadata.uid.clone(),
                            resource_version: None,
                        }),
                        ..Default::default()
                    };
                    match api_call(api.delete(&name, &dp), &[404, 409]).await {
                        Ok(true) => k.log(format!(
                            "{last_key}: deleted (grace period 0) after teardown"
                        )),
                        Ok(false) => {}
                        Err(e) => {
                            k.log(format!("{last_key}: final delete: {e}; retrying"));
                            retry = Some(Duration::from_secs(1));
                        }
                    }
                }
                Some(_) => {}
            }
        }
        let changed = match retry {
            Some(d) => tokio::select! {
                c = rx.changed() => c,
                _ = tokio::time::sleep(d) => Ok(()),
            },
            None => rx.changed().await,
        };
        if changed.is_err() {
            if let Some(sb) = sandbox.take() {
                teardown(&k, sb, &last_key).await;
            }
            return;
        }
    }
}

/// Watches the node's Pods and runs one task per Pod (by UID), forever.
pub async fn run(k: Arc<Kubelet>, client: kube::Client) -> Result<()> {
    let api: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={}", k.cfg.node);
    let mut tasks: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut first = true;
    let mut delay = BACKOFF_START;
    loop {
        let list = match api.list(&ListParams::default().fields(&selector)).await {
            Ok(l) => l,
            Err(e) => {
                k.log(format!("listing pods: {e}; retrying in {delay:?}"));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        delay = BACKOFF_START;
        let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
        let pods: HashMap<String, Pod> = list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.uid.clone().map(|u| (u, p)))
            .collect();
        let mut adopt = HashMap::new();
        if first {
            let k2 = k.clone();
            let keep = pods.clone();
            adopt = tokio::task::spawn_blocking(move || k2.startup_cleanup(&keep))
                .await
                .unwrap_or_default();
            k.log(format!(
                "watching {} pod(s) on node {}",
                pods.len(),
                k.cfg.node
            ));
            first = false;
        }
        tasks.retain(|uid, tx| {
            if pods.contains_key(uid) {
                true
            } else {
                let _ = tx.send(None);
                false
            }
        });
        for (uid, pod) in pods {
            let adopted = adopt.remove(&uid);
            deliver(&k, &api, &mut tasks, uid, Some(pod), adopted);
        }
        // Watch from the list's version until it expires (then relist).
        'watch: loop {
            let wp = WatchParams::default()
                .fields(&selector)
                .timeout(290)
                .disable_bookmarks();
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(e) => {
                    k.log(format!("watching pods: {e}; relisting"));
                    tokio::time::sleep(delay).await;
                    break 'watch;
                }
            };
            let mut stream = std::pin::pin!(stream.into_stream());
            loop {
                match stream.next().await {
                    None => continue 'watch,
                    Some(Err(e)) => {
                        k.log(format!("pod watch: {e}; relisting"));
                        tokio::time::sleep(delay).await;
                        break 'watch;
                    }
                    Some(Ok(ev)) => match ev {
                        WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                            if let Some(v) = &p.metadata.resource_version {
                                rv = v.clone();
                            }
                            if let Some(uid) = p.metadata.uid.clone() {
                                deliver(&k, &api, &mut tasks, uid, Some(p), None);
                            }
                        }
                        WatchEvent::Deleted(p) => {
                            if let Some(v) = &p.metadata.resource_version {
                                rv = v.clone();
                            }
                            if let Some(uid) = p.metadata.uid.clone() {
                                if let Some(tx) = tasks.remove(&uid) {
                                    let _ = tx.send(None);
                                }
                            }
                        }
                        WatchEvent::Bookmark(b) => rv = b.metadata.resource_version,
                        WatchEvent::Error(s) => {
                            if s.code != 410 {
                                k.log(format!(
                                    "pod watch error: {} ({}); relisting",
                                    s.message, s.code
                                ));
                            }
                            break 'watch;
                        }
                    },
                }
            }
        }
    }
}

fn deliver(
    k: &Arc<Kubelet>,
    api: &Api<Pod>,
    tasks: &mut HashMap<String, watch::Sender<Option<Pod>>>,
    uid: String,
    pod: Option<Pod>,
    adopted: Option<Record>,
) {
    if let Some(tx) = tasks.get(&uid) {
        let _ = tx.send(pod);
        return;
    }
    let Some(pod) = pod else { return };
    let (tx, rx) = watch::channel(Some(pod));
    tokio::spawn(pod_task(k.clone(), api.clone(), rx, adopted));
    tasks.insert(uid, tx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_are_deterministic_and_bounded() {
        assert_eq!(
            pod_netns_name("c1n1-", "default", "web"),
            "c1n1-default.web"
        );
        let long = pod_netns_name("c1n1-", "a-rather-long-namespace", "and-a-long-pod-name-0");
        assert_eq!(long.len(), NETNS_NAME_MAX, "{long}");
        assert!(
            long.starts_with("c1n1-a-rather-long-namespace.an-"),
            "{long}"
        );
        assert_eq!(
            long,
            pod_netns_name("c1n1-", "a-rather-long-namespace", "and-a-long-pod-name-0")
        );
        let hash = format!(
            "{:08x}",
            fnv1a64(b"a-rather-long-namespace/and-a-long-pod-name-0") as u32
        );
        assert!(long.ends_with(&format!("-{hash}")), "{long}");
        // Same truncated body, different pods: different names.
        let other = pod_netns_name("c1n1-", "a-rather-long-namespace", "and-a-long-pod-name-1");
        assert_ne!(long, other);
        assert_eq!(long[..31], other[..31]);
        // Exactly 40 stays as is.
        let exact = pod_netns_name("p-", "ns", &"x".repeat(35));
        assert_eq!(exact, format!("p-ns.{}", "x".repeat(35)));
        // A prefix too long for any body: prefix + hash.
        let p = "p".repeat(35);
        let n = pod_netns_name(&p, "ns", "name-that-does-not-fit");
        assert_eq!(
            n,
            format!("{p}{:08x}", fnv1a64(b"ns/name-that-does-not-fit") as u32)
        );
        // FNV-1a reference value.
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn container_ids_from_uids() {
        assert_eq!(
            container_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
        );
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("pod yaml")
    }

    #[test]
    fn ports_declared_by_containers() {
        let p = pod(r#"
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: a
    ports:
    - {containerPort: 80}
    - {containerPort: 53, protocol: UDP}
    - {containerPort: 80, protocol: TCP}
    - {containerPort: 9000, protocol: SCTP}
  - name: b
    ports:
    - {containerPort: 8080, hostPort: 30080, protocol: TCP}
"#);
        let ports = pod_ports(&p);
        assert_eq!(
            ports.serve,
            vec![(80, Proto::Tcp), (53, Proto::Udp), (8080, Proto::Tcp)]
        );
        assert_eq!(
            ports.skipped,
            vec!["a: SCTP/9000 (no SCTP sockets here)".to_string()]
        );
        assert_eq!(
            ports.host_ports,
            vec![(30080, 8080, "TCP".to_string(), None)]
        );
    }

    #[test]
    fn status_patch_and_match() {
        let want = WantStatus {
            pod_ips: vec!["10.244.1.2".into()],
            host_ips: vec!["198.18.0.1".into()],
            not_ready: None,
        };
        let patch = status_patch(&want);
        assert_eq!(patch["status"]["phase"], "Running");
        assert_eq!(patch["status"]["podIP"], "10.244.1.2");
        assert_eq!(patch["status"]["podIPs"], json!([{"ip": "10.244.1.2"}]));
        assert_eq!(patch["status"]["hostIP"], "198.18.0.1");
        let mut p = pod("metadata: {name: web}\nspec: {containers: []}\n");
        assert!(!status_matches(&p, &want));
        p.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
        assert!(status_matches(&p, &want));
        let not_ready = WantStatus {
            not_ready: Some("tcp/80: bind: in use".into()),
            ..want.clone()
        };
        assert!(!status_matches(&p, &not_ready));
        let patch = status_patch(&not_ready);
        let ready = patch["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["message"], "tcp/80: bind: in use");
    }

    #[test]
    fn sandboxes_only_for_live_pods() {
        let live = pod("metadata: {name: a}\n");
        let gone = pod("metadata: {name: a, deletionTimestamp: '2024-01-01T00:00:00Z'}\n");
        let done = pod("metadata: {name: a}\nstatus: {phase: Succeeded}\n");
        assert!(wants_sandbox(Some(&live)));
        assert!(!wants_sandbox(Some(&gone)));
        assert!(!wants_sandbox(Some(&done)));
        assert!(!wants_sandbox(None));
    }
}
