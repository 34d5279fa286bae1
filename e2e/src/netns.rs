//! Lab topology: flannel-like nodes (bridge plugin + host-gw routes) built from network
//! namespaces on one machine.
//!
//! ```text
//!   underlay netns:  br0 ── n1 ─┐   ── n2 ─┐              (one veth per node)
//!   node netns:          eth0 ──┘ (198.18.0.1/24, fd00:198:18::1/64)
//!                        cni0 (10.244.1.1/24, fd00:10:244:1::1/64)  ── vethXXXXXXXX ─┐
//!   pod netns:                                                       eth0 (10.244.1.5/24) ─┘
//! ```
//!
//! Every node routes the other nodes' pod CIDRs via their underlay address, forwards IPv4 and
//! IPv6, and has `bridge-nf-call-ip{,6}tables=1` so bridged pod-to-pod traffic traverses the
//! node's netfilter forward hook (those sysctls are per network namespace on this kernel).
//! hostNetwork pods get no namespace of their own: they live in their node's namespace.
//!
//! Namespace names are `sl<6 hex>-u` (underlay), `sl<6 hex>-n<index>` (nodes) and
//! `sl<6 hex>-p<n>` (pods), unique per [`LabNet`]. Interfaces are created directly inside their
//! namespaces, so interface names never meet in the root namespace.
//!
//! Sockets keep their namespace alive: a server still listening in a namespace that
//! [`LabNet::cleanup`] deleted keeps it (and its interfaces) alive, unnamed, until the socket is
//! closed. Drop the [`crate::probe::Servers`] before (or soon after) the [`LabNet`].

use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::link::{
    BridgePortState, InfoBridgePort, InfoPortData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    State,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Linux limit on interface names (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// One lab node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// 1-based, unique: names the node's namespace and its underlay veth.
    pub index: u32,
    /// e.g. 10.244.1.0/24 and fd00:10:244:1::/64.
    pub pod_cidrs: Vec<IpNet>,
    /// The node's underlay addresses, e.g. 198.18.0.1 and fd00:198:18::1 (put on a /24 or /64).
    pub host_ips: Vec<IpAddr>,
}

/// One pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// "namespace/name".
    pub key: String,
    /// Name of the [`NodeSpec`] it runs on.
    pub node: String,
    /// Must lie in the node's pod CIDRs (or be among the node's host IPs for hostNetwork pods).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
}

struct NodeState {
    spec: NodeSpec,
    netns: String,
    /// Host-side veth names in use on this node's cni0.
    veths: BTreeSet<String>,
}

struct PodState {
    /// The pod's own namespace, or its node's for hostNetwork pods.
    netns: String,
    node: String,
    /// Host-side veth on the node's cni0 (None for hostNetwork pods).
    host_veth: Option<String>,
}

/// A running lab topology. Dropping it deletes every namespace it created.
pub struct LabNet {
    prefix: String,
    underlay: Option<String>,
    nodes: BTreeMap<String, NodeState>,
    pods: BTreeMap<String, PodState>,
    next_pod: u64,
    /// Pod namespaces whose deletion failed; retried by cleanup.
    orphans: Vec<String>,
}

impl std::fmt::Debug for LabNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: BTreeMap<&str, &str> = self
            .nodes
            .iter()
            .map(|(k, v)| (k.as_str(), v.netns.as_str()))
            .collect();
        let pods: BTreeMap<&str, &str> = self
            .pods
            .iter()
            .map(|(k, v)| (k.as_str(), v.netns.as_str()))
            .collect();
        f.debug_struct("LabNet")
            .field("prefix", &self.prefix)
            .field("underlay", &self.underlay)
            .field("nodes", &nodes)
            .field("pods", &pods)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Global registry of namespaces created by this process (for the signal handler).

static REGISTRY: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn registry() -> MutexGuard<'static, BTreeSet<String>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn register<'a>(names: impl IntoIterator<Item = &'a String>) {
    let mut r = registry();
    for n in names {
        r.insert(n.clone());
    }
}

fn unregister<'a>(names: impl IntoIterator<Item = &'a String>) {
    let mut r = registry();
    for n in names {
        r.remove(n);
    }
}

/// Installs (once per process) a SIGINT/SIGTERM handler that deletes every namespace any
/// [`LabNet`] of this process currently owns, then exits with status 130.
pub fn install_signal_cleanup() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            use signal_hook::consts::{SIGINT, SIGTERM};
            let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
                .map_err(|e| format!("registering SIGINT/SIGTERM handlers: {e}"))?;
            std::thread::Builder::new()
                .name("sluice-netns-cleanup".into())
                .spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        // Hold the registry for good: nothing registers new namespaces anymore.
                        let reg = registry();
                        let names: Vec<String> = reg.iter().cloned().collect();
                        eprintln!(
                            "sluice-e2e: signal {sig}: deleting {} lab network namespace(s)",
                            names.len()
                        );
                        delete_netns_best_effort(&names);
                        std::process::exit(130);
                    }
                })
                .map_err(|e| format!("spawning the signal thread: {e}"))?;
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

// ---------------------------------------------------------------------------------------------
// Namespace helpers (also used by probe.rs).

/// Path of a named namespace handle (`/run/netns/<name>`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Names in `/run/netns` (what `ip netns list` shows), sorted.
pub fn list_netns() -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {NETNS_RUN_DIR}")),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.with_context(|| format!("reading {NETNS_RUN_DIR}"))?;
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

/// Opens a named namespace handle (keep it to `setns` into it later).
pub fn open_netns(name: &str) -> Result<File> {
    let path = netns_path(name);
    File::open(&path).with_context(|| format!("opening netns {}", path.display()))
}

/// Moves the *calling thread* into the named network namespace, for good. Only call this on a
/// thread you own (sockets created afterwards live in that namespace).
pub fn enter_netns(name: &str) -> Result<()> {
    let f = open_netns(name)?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into netns {name}"))
}

/// Runs `f` on a fresh thread inside the named network namespace and returns its result.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(s, || -> Result<T> {
                enter_netns(name)?;
                Ok(f())
            })
            .context("spawning a thread")?;
        h.join()
            .map_err(|_| anyhow!("thread running in netns {name} panicked"))?
    })
}

/// Spawns a thread named `name` that enters the named network namespace, runs `bind` there and,
/// if it succeeds, `serve` with the listener (the thread ends when `serve` returns). Waits for
/// the bind: its error (or entering the namespace's) is returned, else the thread's handle.
pub fn spawn_listener_in_netns<B, S>(
    netns: &str,
    name: &str,
    bind: B,
    serve: S,
) -> Result<std::thread::JoinHandle<()>>
where
    B: FnOnce() -> Result<std::net::TcpListener> + Send + 'static,
    S: FnOnce(std::net::TcpListener) + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let ns = netns.to_string();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let listener = match enter_netns(&ns).and_then(|()| bind()) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            serve(listener);
        })
        .with_context(|| format!("spawning thread {name}"))?;
    rx.recv()
        .map_err(|_| anyhow!("thread {name} (netns {netns}) died before it listened"))??;
    Ok(handle)
}

/// Writes `/proc/sys/<key>` (key like `net/ipv4/ip_forward`) inside the named namespace.
fn set_sysctls(netns: &str, required: &[(&str, &str)], optional: &[(&str, &str)]) -> Result<()> {
    in_netns(netns, || -> Result<()> {
        for (key, value) in required {
            let path = format!("/proc/sys/{key}");
            std::fs::write(&path, value)
                .with_context(|| format!("netns {netns}: writing {value} to {path}"))?;
        }
        for (key, value) in optional {
            let _ = std::fs::write(format!("/proc/sys/{key}"), value);
        }
        Ok(())
    })?
}

/// (`/proc/sys` path below `/proc/sys/`, value) pairs.
type Sysctls = Vec<(&'static str, &'static str)>;

/// Sysctls for every lab namespace: addresses usable at once, no IPv6 autoconfiguration noise.
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/disable_ipv6", "0"),
    ("net/ipv6/conf/default/disable_ipv6", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    ("net/ipv6/conf/all/dad_transmits", "0"),
    ("net/ipv6/conf/default/dad_transmits", "0"),
    ("net/ipv6/conf/all/router_solicitations", "0"),
    ("net/ipv6/conf/default/router_solicitations", "0"),
    ("net/ipv6/conf/all/accept_ra", "0"),
    ("net/ipv6/conf/default/accept_ra", "0"),
];

const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/ipv6/conf/default/forwarding", "1"),
    ("net/bridge/bridge-nf-call-iptables", "1"),
    ("net/bridge/bridge-nf-call-ip6tables", "1"),
];

/// The underlay is a plain switch: keep its bridge out of netfilter.
const UNDERLAY_OPTIONAL_SYSCTLS: &[(&str, &str)] = &[
    ("net/bridge/bridge-nf-call-iptables", "0"),
    ("net/bridge/bridge-nf-call-ip6tables", "0"),
    ("net/bridge/bridge-nf-call-arptables", "0"),
];

/// Runs `ip [-n netns] [-force] -batch -` with the given lines on stdin.
fn ip_batch(netns: Option<&str>, lines: &[String], force: bool) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    if force {
        args.push("-force");
    }
    args.extend(["-batch", "-"]);
    let shown = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running `{shown}`"))?;
    let mut input = lines.join("\n");
    input.push('\n');
    let stdin = child.stdin.take();
    let out = std::thread::scope(|s| {
        // Feed stdin from another thread while collecting stdout/stderr, so neither side can
        // fill a pipe and block. A write error (ip exited early) shows up in its status/stderr.
        s.spawn(|| {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(input.as_bytes());
            }
        });
        child.wait_with_output()
    })
    .with_context(|| format!("waiting for `{shown}`"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // iproute2 reports "Command failed -:<line>"; name that line.
    let failed_line = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Command failed -:"))
        .filter_map(|n| n.trim().parse::<usize>().ok())
        .filter_map(|n| lines.get(n.wrapping_sub(1)))
        .map(|l| format!("`{l}`"))
        .collect::<Vec<_>>();
    if failed_line.is_empty() {
        bail!("`{shown}` failed ({}): {stderr}", out.status);
    }
    bail!(
        "`{shown}` failed ({}) at {}: {stderr}",
        out.status,
        failed_line.join(", ")
    )
}

/// Deletes namespaces, ignoring the ones already gone; reports (stderr) the ones that remain.
fn delete_netns_best_effort(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let lines: Vec<String> = names.iter().map(|n| format!("netns del {n}")).collect();
    let _ = ip_batch(None, &lines, true);
    let left: Vec<&String> = names.iter().filter(|n| netns_path(n).exists()).collect();
    if !left.is_empty() {
        eprintln!("sluice-e2e: could not delete network namespaces {left:?}");
    }
}

/// Runs each job on its own thread, returns the first error.
fn parallel<J: Send>(jobs: Vec<J>, f: impl Fn(J) -> Result<()> + Sync) -> Result<()> {
    if jobs.len() <= 1 {
        return jobs.into_iter().try_for_each(&f);
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for j in jobs {
            let h = std::thread::Builder::new()
                .spawn_scoped(s, move || f(j))
                .context("spawning a setup thread");
            handles.push(h);
        }
        let mut first = Ok(());
        for h in handles {
            let r = h.and_then(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a setup thread panicked")))
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

// ---------------------------------------------------------------------------------------------
// Readiness: the `ip` calls return before the kernel has finished with what they started.
// The link watcher (asynchronous, needs RTNL, rate-limited) turns carrier changes into a
// forwarding bridge port, an operstate and an active qdisc (until then the device drops what
// it sends), and addrconf's worker makes a `nodad` IPv6 address local and joins its
// solicited-node group. A probe sent earlier is lost, and TCP resends it only after 1 s; so
// setup polls that state over rtnetlink (in-process: no command per pod) before returning.

/// How long [`wait_ready`] waits.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const READY_POLL: Duration = Duration::from_millis(2);

/// A link's state as rtnetlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LinkState {
    /// `ifi_flags` (Up, LowerUp = carrier, ...).
    flags: LinkFlags,
    /// Set by the link watcher, right before it (de)activates the qdisc.
    operstate: State,
    /// When the link is a bridge port.
    bridge_port: Option<BridgePortState>,
}

impl LinkState {
    /// Up with carrier, and the link watcher done with it: operstate UP, or UNKNOWN (never
    /// processed: what a bridge reports from `up` until its first port).
    fn is_ready(&self, bridge_port: bool) -> bool {
        self.flags.contains(LinkFlags::Up | LinkFlags::LowerUp)
            && matches!(self.operstate, State::Up | State::Unknown)
            && (!bridge_port || self.bridge_port == Some(BridgePortState::Forwarding))
    }

    /// Name and state of a link in an RTM_NEWLINK message.
    fn of(msg: &LinkMessage) -> Option<(String, LinkState)> {
        let mut state = LinkState {
            flags: msg.header.flags,
            operstate: State::Unknown,
            bridge_port: None,
        };
        let mut name = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::OperState(s) => state.operstate = *s,
                // Port data is a bridge port's only after port kind "bridge".
                LinkAttribute::LinkInfo(info) => {
                    let mut port = info.iter().flat_map(|i| match i {
                        LinkInfo::PortData(InfoPortData::BridgePort(p)) => p.as_slice(),
                        _ => &[],
                    });
                    state.bridge_port = port.find_map(|a| match a {
                        InfoBridgePort::State(s) => Some(*s),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        Some((name?, state))
    }
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "operstate {}, {}, {}",
            self.operstate,
            if self.flags.contains(LinkFlags::Up) {
                "up"
            } else {
                "down"
            },
            if self.flags.contains(LinkFlags::LowerUp) {
                "carrier"
            } else {
                "no carrier"
            }
        )?;
        if let Some(p) = self.bridge_port {
            write!(f, ", bridge port {p}")?;
        }
        Ok(())
    }
}

/// The address of a local route (RTN_LOCAL).
fn local_route(msg: &RouteMessage) -> Option<IpAddr> {
    if msg.header.kind != RouteType::Local {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    })
}

/// Sends a dump request (e.g. GetLink with a default message) and returns the replies.
fn nl_dump(sock: &Socket, request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
    let mut req = NetlinkMessage::from(request);
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)
        .context("sending a netlink dump request")?;
    let mut replies = Vec::new();
    loop {
        let (buf, _) = sock.recv_from_full().context("reading a netlink dump")?;
        let mut msgs = &buf[..];
        while !msgs.is_empty() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(msgs)
                .context("parsing a netlink dump")?;
            let len = msg.header.length as usize;
            msgs = &msgs[((len + 3) & !3).min(msgs.len())..];
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    bail!("netlink dump: {}", e.to_io())
                }
                NetlinkPayload::InnerMessage(m) => replies.push(m),
                _ => {}
            }
        }
    }
}

/// One namespace as rtnetlink shows it.
#[derive(Default)]
struct NetnsView {
    links: BTreeMap<String, LinkState>,
    /// Addresses with a local route (in use; IPv6 ones once addrconf's worker has run).
    local: BTreeSet<IpAddr>,
}

/// The calling thread's namespace, with its local routes if `routes`.
fn view_current_netns(routes: bool) -> Result<NetnsView> {
    let sock = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    // Never hang on a reply that does not come.
    setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::seconds(2))?;
    let mut view = NetnsView::default();
    for m in nl_dump(&sock, RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        if let RouteNetlinkMessage::NewLink(link) = m {
            view.links.extend(LinkState::of(&link));
        }
    }
    if routes {
        for m in nl_dump(
            &sock,
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        )? {
            if let RouteNetlinkMessage::NewRoute(route) = m {
                view.local.extend(local_route(&route));
            }
        }
    }
    Ok(view)
}

/// Views of namespaces (`true`: with local routes), from one short-lived thread that enters
/// each in turn.
fn view_netns(netns: &BTreeMap<&str, bool>) -> Result<BTreeMap<String, NetnsView>> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns-view".into())
            .spawn_scoped(s, || {
                let mut out = BTreeMap::new();
                for (&ns, &routes) in netns {
                    enter_netns(ns)?;
                    let view = view_current_netns(routes).with_context(|| format!("netns {ns}"))?;
                    out.insert(ns.to_string(), view);
                }
                Ok(out)
            })
            .context("spawning a thread")?
            .join()
            .map_err(|_| anyhow!("the netns-view thread panicked"))?
    })
}

/// Something [`wait_ready`] waits for: a link in a namespace, ready (see
/// [`LinkState::is_ready`]), and addresses local there.
struct Want {
    netns: String,
    ifname: String,
    /// The link must also forward as a bridge port.
    bridge_port: bool,
    local: Vec<IpAddr>,
    /// Names it in errors, e.g. `pod "default/x": host veth vethXXXXXXXX on node "a"`.
    what: String,
}

impl Want {
    /// The link up, nothing more.
    fn link(netns: &str, ifname: &str, what: String) -> Want {
        Want {
            netns: netns.into(),
            ifname: ifname.into(),
            bridge_port: false,
            local: Vec::new(),
            what,
        }
    }

    /// None when met, else what is seen.
    fn unmet(&self, view: Option<&NetnsView>) -> Option<String> {
        let link = view.and_then(|v| v.links.get(&self.ifname));
        let missing: Vec<String> = self
            .local
            .iter()
            .filter(|ip| !view.is_some_and(|v| v.local.contains(ip)))
            .map(IpAddr::to_string)
            .collect();
        if link.is_some_and(|l| l.is_ready(self.bridge_port)) && missing.is_empty() {
            return None;
        }
        let mut seen = match link {
            Some(l) => format!("{}: {l}", self.what),
            None => format!("{}: no such link", self.what),
        };
        if !missing.is_empty() {
            seen += &format!("; not local yet: {}", missing.join(", "));
        }
        Some(seen)
    }
}

/// Polls (one view per namespace and round) until every want is met.
fn wait_ready(mut wants: Vec<Want>) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let mut netns: BTreeMap<&str, bool> = BTreeMap::new();
        for w in &wants {
            *netns.entry(w.netns.as_str()).or_default() |= !w.local.is_empty();
        }
        let views = view_netns(&netns)?;
        let timed_out = Instant::now() >= deadline;
        let mut unmet = Vec::new();
        wants.retain(|w| match w.unmet(views.get(&w.netns)) {
            Some(seen) => {
                unmet.push(seen);
                true
            }
            None => false,
        });
        if wants.is_empty() {
            return Ok(());
        }
        if timed_out {
            let more = unmet.len().saturating_sub(8);
            unmet.truncate(8);
            if more > 0 {
                unmet.push(format!("and {more} more"));
            }
            bail!("not ready after {READY_TIMEOUT:?}: {}", unmet.join("; "));
        }
        std::thread::sleep(READY_POLL);
    }
}

fn random_u64(salt: u64) -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    salt.hash(&mut h);
    h.finish()
}

/// "sl" + 6 hex digits, not used by any namespace present now.
fn new_prefix() -> String {
    let existing = list_netns().unwrap_or_default();
    loop {
        let p = format!("sl{:06x}", random_u64(0) & 0xff_ffff);
        let dash = format!("{p}-");
        if !existing.iter().any(|n| n.starts_with(&dash)) {
            return p;
        }
    }
}

/// First host address of a CIDR (.1 / ::1): the cni0 address and the pods' gateway.
fn gateway_of(net: &IpNet) -> IpAddr {
    match net.network() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(1))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(1))),
    }
}

fn addr_line(ip: IpAddr, prefix_len: u8, dev: &str) -> String {
    match ip {
        IpAddr::V4(_) => format!("addr add {ip}/{prefix_len} dev {dev}"),
        IpAddr::V6(_) => format!("addr add {ip}/{prefix_len} dev {dev} nodad"),
    }
}

fn default_dst(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "0.0.0.0/0"
    } else {
        "::/0"
    }
}

/// A pod being added (see [`LabNet::add_pods`]).
struct NewPod<'a> {
    spec: &'a PodSpec,
    node_ns: String,
    netns: String,
    veth: String,
    /// (address, prefix length, gateway)
    addrs: Vec<(IpAddr, u8, IpAddr)>,
}

/// A pod's MAC as the CNI bridge plugin makes it: `0a:58` and the pod's IPv4 address (else the
/// last four bytes of its IPv6 address). Deterministic, so a pod that reuses an address also has
/// the MAC its neighbours cached for it; a random MAC would be unreachable from pods holding the
/// old neighbour entry until it expires.
fn pod_mac(addrs: &[(IpAddr, u8, IpAddr)]) -> Option<String> {
    let ip = addrs
        .iter()
        .map(|a| a.0)
        .find(IpAddr::is_ipv4)
        .or_else(|| addrs.first().map(|a| a.0))?;
    let o = match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => {
            let b = v6.octets();
            [b[12], b[13], b[14], b[15]]
        }
    };
    Some(format!(
        "0a:58:{:02x}:{:02x}:{:02x}:{:02x}",
        o[0], o[1], o[2], o[3]
    ))
}

/// Creates pod namespaces, veths, addresses and routes.
fn build_pods(new: &[NewPod<'_>]) -> Result<()> {
    let adds: Vec<String> = new
        .iter()
        .map(|n| format!("netns add {}", n.netns))
        .collect();
    ip_batch(None, &adds, false)?;
    parallel(new.iter().collect(), |n| {
        set_sysctls(&n.netns, COMMON_SYSCTLS, &[])
    })?;
    let links: Vec<String> = new
        .iter()
        .map(|n| {
            format!(
                "link add name eth0{} netns {} type veth peer name {} netns {}",
                pod_mac(&n.addrs)
                    .map(|m| format!(" address {m}"))
                    .unwrap_or_default(),
                n.netns,
                n.veth,
                n.node_ns
            )
        })
        .collect();
    ip_batch(None, &links, false)?;

    let mut jobs: Vec<(String, Vec<String>)> = Vec::new();
    let mut per_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for n in new {
        let mut b = vec!["link set lo up".to_string()];
        for (ip, len, _) in &n.addrs {
            b.push(addr_line(*ip, *len, "eth0"));
        }
        b.push("link set eth0 up".into());
        let mut seen_family = BTreeSet::new();
        for (ip, _, gw) in &n.addrs {
            if seen_family.insert(ip.is_ipv4()) {
                b.push(format!("route add {} via {gw} dev eth0", default_dst(ip)));
            }
        }
        jobs.push((n.netns.clone(), b));
        let nb = per_node.entry(n.node_ns.as_str()).or_default();
        nb.push(format!("link set {} master cni0", n.veth));
        nb.push(format!("link set {} up", n.veth));
    }
    jobs.extend(per_node.into_iter().map(|(ns, b)| (ns.to_string(), b)));
    parallel(jobs, |(ns, lines)| ip_batch(Some(&ns), &lines, false))?;

    // Return only once traffic passes (see "Readiness"): cni0 and both veth ends up, the veth
    // forwarding on cni0, the pod's addresses local.
    let mut wants = Vec::new();
    for n in new {
        let pod = format!(
            "pod {:?} (veth {} on node {:?})",
            n.spec.key, n.veth, n.spec.node
        );
        let eth0 = format!("{pod}: eth0 in netns {}", n.netns);
        wants.push(Want::link(&n.node_ns, "cni0", format!("{pod}: cni0")));
        wants.push(Want {
            bridge_port: true,
            ..Want::link(&n.node_ns, &n.veth, format!("{pod}: host veth"))
        });
        wants.push(Want {
            local: n.addrs.iter().map(|a| a.0).collect(),
            ..Want::link(&n.netns, "eth0", eth0)
        });
    }
    wait_ready(wants)
}

impl LabNet {
    /// Creates the underlay and every node; returns once the underlay passes traffic.
    pub fn create(nodes: &[NodeSpec]) -> Result<LabNet> {
        let mut names = BTreeSet::new();
        let mut indices = BTreeSet::new();
        for n in nodes {
            if !names.insert(n.name.as_str()) {
                bail!("duplicate node name {:?}", n.name);
            }
            if n.index == 0 || !indices.insert(n.index) {
                bail!(
                    "node {:?}: index {} is 0 or not unique (indices are 1-based)",
                    n.name,
                    n.index
                );
            }
            if n.host_ips.is_empty() {
                bail!("node {:?} has no host_ips", n.name);
            }
        }

        let prefix = new_prefix();
        let underlay = format!("{prefix}-u");
        let mut lab = LabNet {
            prefix: prefix.clone(),
            underlay: Some(underlay.clone()),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            next_pod: 1,
            orphans: Vec::new(),
        };
        for n in nodes {
            lab.nodes.insert(
                n.name.clone(),
                NodeState {
                    spec: n.clone(),
                    netns: format!("{prefix}-n{}", n.index),
                    veths: BTreeSet::new(),
                },
            );
        }
        // From here on, an error drops `lab`, which deletes whatever was created.
        let all_ns: Vec<String> = std::iter::once(underlay.clone())
            .chain(lab.nodes.values().map(|n| n.netns.clone()))
            .collect();
        register(&all_ns);

        // 1. Namespaces.
        let adds: Vec<String> = all_ns.iter().map(|n| format!("netns add {n}")).collect();
        ip_batch(None, &adds, false)?;

        // 2. Sysctls, before any interface exists so that the `default` values apply.
        let mut sysctl_jobs: Vec<(&str, Sysctls, Sysctls)> = vec![(
            &underlay,
            COMMON_SYSCTLS.to_vec(),
            UNDERLAY_OPTIONAL_SYSCTLS.to_vec(),
        )];
        for n in lab.nodes.values() {
            let mut req = COMMON_SYSCTLS.to_vec();
            req.extend_from_slice(NODE_SYSCTLS);
            sysctl_jobs.push((&n.netns, req, Vec::new()));
        }
        parallel(sysctl_jobs, |(ns, req, opt)| set_sysctls(ns, &req, &opt))?;

        // 3. Links, each created directly in its namespace.
        let bridge_opts = "type bridge forward_delay 0 stp_state 0 mcast_snooping 0";
        let mut links = vec![format!("link add name br0 netns {underlay} {bridge_opts}")];
        for n in lab.nodes.values() {
            let ul = format!("n{}", n.spec.index);
            links.push(format!(
                "link add name eth0 netns {} type veth peer name {ul} netns {underlay}",
                n.netns
            ));
            // A fixed MAC: a bridge without one takes the lowest MAC of its ports and changes
            // it when that port goes, and pods keep sending to the old gateway MAC.
            links.push(format!(
                "link add name cni0 address 02:00:00:00:01:{:02x} netns {} {bridge_opts}",
                n.spec.index & 0xff,
                n.netns
            ));
        }
        ip_batch(None, &links, false)?;

        // 4. Addresses and routes, one batch per namespace, in parallel.
        let mut jobs: Vec<(String, Vec<String>)> = Vec::new();
        let mut ul = vec!["link set lo up".to_string(), "link set br0 up".to_string()];
        for n in lab.nodes.values() {
            ul.push(format!("link set n{} master br0", n.spec.index));
            ul.push(format!("link set n{} up", n.spec.index));
        }
        jobs.push((underlay.clone(), ul));
        for n in lab.nodes.values() {
            let mut b = vec!["link set lo up".to_string()];
            for ip in &n.spec.host_ips {
                let len = if ip.is_ipv4() { 24 } else { 64 };
                b.push(addr_line(*ip, len, "eth0"));
            }
            b.push("link set eth0 up".into());
            for cidr in &n.spec.pod_cidrs {
                b.push(addr_line(gateway_of(cidr), cidr.prefix_len(), "cni0"));
            }
            b.push("link set cni0 up".into());
            for other in lab.nodes.values() {
                if other.spec.name == n.spec.name {
                    continue;
                }
                for cidr in &other.spec.pod_cidrs {
                    let via = other
                        .spec
                        .host_ips
                        .iter()
                        .find(|ip| ip.is_ipv4() == cidr.addr().is_ipv4())
                        .ok_or_else(|| {
                            anyhow!(
                                "node {:?} has pod CIDR {cidr} but no host IP of that family \
                                 to route it through",
                                other.spec.name
                            )
                        })?;
                    b.push(format!("route add {} via {via} dev eth0", cidr.trunc()));
                }
            }
            jobs.push((n.netns.clone(), b));
        }
        parallel(jobs, |(ns, lines)| ip_batch(Some(&ns), &lines, false))?;

        // 5. Wait until the underlay passes traffic (see "Readiness"). br0 only switches: its
        // own state does not matter. cni0 gets carrier with pods: build_pods waits for it.
        let mut wants = Vec::new();
        for n in lab.nodes.values() {
            let (name, ul) = (&n.spec.name, format!("n{}", n.spec.index));
            let what = format!("node {name:?}: underlay port {ul}");
            wants.push(Want {
                bridge_port: true,
                ..Want::link(&underlay, &ul, what)
            });
            let gateways = n.spec.pod_cidrs.iter().map(gateway_of);
            wants.push(Want {
                local: n.spec.host_ips.iter().copied().chain(gateways).collect(),
                ..Want::link(&n.netns, "eth0", format!("node {name:?}: eth0"))
            });
        }
        wait_ready(wants)?;
        Ok(lab)
    }

    /// The run prefix ("sl" + 6 hex digits) every namespace name of this lab starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Namespace of the underlay switch.
    pub fn underlay_netns(&self) -> Option<&str> {
        self.underlay.as_deref()
    }

    /// Namespace of a node (by node name).
    pub fn node_netns(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(|n| n.netns.as_str())
    }

    /// Namespace of a pod (by "ns/name"); for hostNetwork pods, their node's namespace.
    pub fn pod_netns(&self, key: &str) -> Option<&str> {
        self.pods.get(key).map(|p| p.netns.as_str())
    }

    /// Every namespace this lab currently owns (underlay, nodes, pods).
    pub fn netns_names(&self) -> Vec<String> {
        self.underlay
            .iter()
            .cloned()
            .chain(self.nodes.values().map(|n| n.netns.clone()))
            .chain(
                self.pods
                    .values()
                    .filter(|p| p.host_veth.is_some())
                    .map(|p| p.netns.clone()),
            )
            .chain(self.orphans.iter().cloned())
            .collect()
    }

    /// Adds one pod (see [`LabNet::add_pods`]).
    pub fn add_pod(&mut self, pod: &PodSpec) -> Result<()> {
        self.add_pods(std::slice::from_ref(pod))
    }

    /// Adds pods in one go (a handful of `ip` invocations for any number of pods). Returns once
    /// they pass traffic (see "Readiness" above). All or nothing: on error, none of them is
    /// added.
    pub fn add_pods(&mut self, pods: &[PodSpec]) -> Result<()> {
        let mut keys = BTreeSet::new();
        let mut host_pods = Vec::new();
        let mut new: Vec<NewPod> = Vec::new();
        let mut taken_veths: BTreeSet<String> = BTreeSet::new();
        for p in pods {
            if self.pods.contains_key(&p.key) || !keys.insert(p.key.as_str()) {
                bail!("pod {:?} already exists", p.key);
            }
            let node = self
                .nodes
                .get(&p.node)
                .ok_or_else(|| anyhow!("pod {:?}: unknown node {:?}", p.key, p.node))?;
            if p.host_network {
                if let Some(ip) = p.ips.iter().find(|ip| !node.spec.host_ips.contains(ip)) {
                    bail!(
                        "hostNetwork pod {:?}: IP {ip} is not a host IP of node {:?} ({:?})",
                        p.key,
                        p.node,
                        node.spec.host_ips
                    );
                }
                host_pods.push(p);
                continue;
            }
            let mut addrs = Vec::new();
            for ip in &p.ips {
                let cidr = node
                    .spec
                    .pod_cidrs
                    .iter()
                    .find(|c| c.contains(ip))
                    .ok_or_else(|| {
                        anyhow!(
                            "pod {:?}: IP {ip} is in no pod CIDR of node {:?} ({:?})",
                            p.key,
                            p.node,
                            node.spec.pod_cidrs
                        )
                    })?;
                let gw = gateway_of(cidr);
                if *ip == gw || *ip == cidr.network() {
                    bail!("pod {:?}: IP {ip} is reserved in {cidr}", p.key);
                }
                addrs.push((*ip, cidr.prefix_len(), gw));
            }
            let netns = format!("{}-p{}", self.prefix, self.next_pod);
            self.next_pod += 1;
            let veth = loop {
                let v = format!("veth{:08x}", random_u64(self.next_pod) as u32);
                debug_assert!(v.len() <= IFNAME_MAX);
                if !node.veths.contains(&v) && taken_veths.insert(v.clone()) {
                    break v;
                }
            };
            new.push(NewPod {
                spec: p,
                node_ns: node.netns.clone(),
                netns,
                veth,
                addrs,
            });
        }

        if !new.is_empty() {
            let names: Vec<String> = new.iter().map(|n| n.netns.clone()).collect();
            register(&names);
            if let Err(e) = build_pods(&new) {
                delete_netns_best_effort(&names);
                unregister(&names);
                return Err(e);
            }
        }

        for n in new {
            if let Some(node) = self.nodes.get_mut(&n.spec.node) {
                node.veths.insert(n.veth.clone());
            }
            self.pods.insert(
                n.spec.key.clone(),
                PodState {
                    netns: n.netns,
                    node: n.spec.node.clone(),
                    host_veth: Some(n.veth),
                },
            );
        }
        for p in host_pods {
            let netns = self.nodes[&p.node].netns.clone();
            self.pods.insert(
                p.key.clone(),
                PodState {
                    netns,
                    node: p.node.clone(),
                    host_veth: None,
                },
            );
        }
        Ok(())
    }

    /// Removes a pod: deletes its veth and namespace (hostNetwork pods: just forgets it).
    pub fn remove_pod(&mut self, key: &str) -> Result<()> {
        let pod = self
            .pods
            .remove(key)
            .ok_or_else(|| anyhow!("remove_pod: unknown pod {key:?}"))?;
        let Some(veth) = pod.host_veth else {
            return Ok(());
        };
        // Delete the veth first: a socket still open in the pod namespace would otherwise keep
        // the namespace, its address and its port on cni0 alive after `netns del`.
        if let Some(node) = self.nodes.get_mut(&pod.node) {
            node.veths.remove(&veth);
            let _ = ip_batch(Some(&node.netns), &[format!("link del {veth}")], false);
        }
        match ip_batch(None, &[format!("netns del {}", pod.netns)], false) {
            Ok(()) => {
                unregister([&pod.netns]);
                Ok(())
            }
            Err(e) => {
                // Still ours (and registered): cleanup retries it.
                self.orphans.push(pod.netns);
                Err(e).with_context(|| format!("removing pod {key:?}"))
            }
        }
    }

    /// Deletes every namespace of this lab. Idempotent and best-effort (failures are reported
    /// on stderr); also run on drop.
    pub fn cleanup(&mut self) {
        // Pods first, then nodes, then the underlay.
        let mut names: Vec<String> = self
            .pods
            .values()
            .filter(|p| p.host_veth.is_some())
            .map(|p| p.netns.clone())
            .collect();
        names.extend(self.nodes.values().map(|n| n.netns.clone()));
        names.append(&mut self.orphans);
        names.extend(self.underlay.take());
        self.pods.clear();
        self.nodes.clear();
        delete_netns_best_effort(&names);
        unregister(&names);
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::InfoPortKind;
    use netlink_packet_route::AddressFamily;

    const UP: LinkState = LinkState {
        flags: LinkFlags::Up.union(LinkFlags::LowerUp),
        operstate: State::Up,
        bridge_port: Some(BridgePortState::Forwarding),
    };

    #[test]
    fn ready_needs_carrier_the_link_watcher_and_forwarding() {
        assert!(UP.is_ready(true));
        // A bridge the link watcher never saw (up, no port yet) passes traffic.
        let fresh = LinkState {
            operstate: State::Unknown,
            bridge_port: None,
            ..UP
        };
        assert!(fresh.is_ready(false));
        // Carrier, but the link watcher has not run yet.
        let pending = LinkState {
            operstate: State::Down,
            ..UP
        };
        assert!(!pending.is_ready(false));
        let no_carrier = LinkState {
            flags: LinkFlags::Up,
            ..UP
        };
        assert!(!no_carrier.is_ready(false));
        let disabled = LinkState {
            bridge_port: Some(BridgePortState::Disabled),
            ..UP
        };
        assert!(!disabled.is_ready(true));
        assert!(disabled.is_ready(false));
    }

    #[test]
    fn unmet_names_what_and_shows_the_state_seen() {
        let mut view = NetnsView::default();
        let disabled = LinkState {
            operstate: State::Down,
            bridge_port: Some(BridgePortState::Disabled),
            ..UP
        };
        view.links.insert("vethab".into(), disabled);
        let eth0_state = LinkState {
            bridge_port: None,
            ..UP
        };
        view.links.insert("eth0".into(), eth0_state);
        view.local.insert("10.244.1.5".parse().unwrap());
        let veth = Want {
            bridge_port: true,
            ..Want::link("n", "vethab", "pod \"d/x\" (veth vethab): host veth".into())
        };
        assert_eq!(
            veth.unmet(Some(&view)).unwrap(),
            "pod \"d/x\" (veth vethab): host veth: operstate DOWN, up, carrier, \
             bridge port disabled"
        );
        let eth0 = |local: &[&str]| Want {
            local: local.iter().map(|a| a.parse().unwrap()).collect(),
            ..Want::link("p", "eth0", "eth0".into())
        };
        assert_eq!(eth0(&["10.244.1.5"]).unmet(Some(&view)), None);
        assert_eq!(
            eth0(&["10.244.1.5", "fd00::5"]).unmet(Some(&view)).unwrap(),
            "eth0: operstate UP, up, carrier; not local yet: fd00::5"
        );
        assert_eq!(
            Want::link("p", "eth1", "eth1".into())
                .unmet(Some(&view))
                .unwrap(),
            "eth1: no such link"
        );
    }

    #[test]
    fn reads_this_kernels_dumps() {
        // Every attribute of every link and route here parses (a failure fails the dump).
        let view = view_current_netns(true).unwrap();
        assert!(view.links.contains_key("lo"), "{:?}", view.links.keys());
    }

    /// Through bytes and back, as the kernel's dump would come.
    fn round_trip(m: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let mut msg = NetlinkMessage::from(m);
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        match NetlinkMessage::deserialize(&buf).unwrap().payload {
            NetlinkPayload::InnerMessage(m) => m,
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn reads_links_and_local_routes() {
        let mut link = LinkMessage::default();
        link.header.flags = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Multicast;
        link.attributes = vec![
            LinkAttribute::IfName("vethab".into()),
            LinkAttribute::OperState(State::Up),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::PortKind(InfoPortKind::Bridge),
                LinkInfo::PortData(InfoPortData::BridgePort(vec![
                    InfoBridgePort::Priority(32),
                    InfoBridgePort::State(BridgePortState::Forwarding),
                ])),
            ]),
        ];
        let RouteNetlinkMessage::NewLink(parsed) =
            round_trip(RouteNetlinkMessage::NewLink(link.clone()))
        else {
            panic!("not a link");
        };
        let up = LinkState {
            flags: UP.flags | LinkFlags::Multicast,
            ..UP
        };
        assert_eq!(LinkState::of(&parsed), Some(("vethab".into(), up)));
        link.attributes.truncate(2); // not a bridge port
        let (_, state) = LinkState::of(&link).unwrap();
        assert_eq!(state.bridge_port, None);
        link.attributes.remove(0);
        assert_eq!(LinkState::of(&link), None);

        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet6;
        route.header.kind = RouteType::Local;
        let ip: Ipv6Addr = "fd00:10:244:1::14".parse().unwrap();
        route.attributes = vec![RouteAttribute::Destination(RouteAddress::Inet6(ip))];
        let RouteNetlinkMessage::NewRoute(parsed) =
            round_trip(RouteNetlinkMessage::NewRoute(route.clone()))
        else {
            panic!("not a route");
        };
        assert_eq!(local_route(&parsed), Some(IpAddr::V6(ip)));
        route.header.kind = RouteType::Unicast;
        assert_eq!(local_route(&route), None);
    }
}
