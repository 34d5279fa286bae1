//! The compiler: cluster index + node name -> the node's ruleset, as plain data (the IR).
//!
//! Shape (see docs/architecture.md): two base chains on the forward hook dispatch packets of the
//! node's isolated pods through verdict maps keyed by pod IP to a *group chain* (one per distinct
//! set of selecting policies), which jumps to each *policy chain* and drops what none accepted.
//! Peers are shared sets of IPs, ipBlocks interval sets, named ports `ip . port` sets. The
//! per-packet cost is one map lookup plus the rules of the policies that select the pod. Before
//! its final drop a group chain counts the packet into the pod's own named counter through a
//! counter map keyed by pod IP (`Ruleset::counters` says whose counter is whose).
//!
//! Names are deterministic (derived from content), so compiling the same index twice gives the
//! same ruleset and a diff between two compilations touches only what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::model::{
    Direction, Family, Index, IpBlock, NamespaceScope, Peer, PodInfo, PodKey, PolicyInfo,
    PolicyKey, PortMatch, PortRule, Protocol,
};
use crate::postings;
use crate::selector::Selector;

pub const TABLE: &str = "sluice";

/// Which address of the packet a match looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Source,
    Destination,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// `type ipv4_addr`: pod IPs of a peer.
    Addrs(Family),
    /// `type ipv4_addr; flags interval`: an ipBlock (cidr minus except) as ranges.
    Ranges(Family),
    /// `type ipv4_addr . inet_service`: pods and the port a name resolves to on each.
    AddrPorts(Family),
    /// `type ipv4_addr : verdict`: the dispatch map from local pod IP to group chain.
    Dispatch(Family),
    /// `type ipv4_addr : counter`: local isolated pod IP -> that pod's drop counter.
    DropCounters(Family),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    Addr(IpAddr),
    Range(IpAddr, IpAddr),
    AddrPort(IpAddr, u16),
    Jump(IpAddr, String),
    /// `10.244.1.2 : "drop_in_<hash>"`: a pod IP and the counter object its drops go to.
    Counter(IpAddr, String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    /// Shared, not copied: a ruleset kept as "last applied" and the next compilation share
    /// every set that did not change, so keeping and diffing them costs nothing per element.
    pub elements: Arc<BTreeSet<Element>>,
    pub comment: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Match {
    /// `ct state established,related`
    Established,
    /// IPv6 neighbour discovery (solicit, advert). It resolves link-layer addresses on the
    /// bridge and is not a connection; dropping it would cut off allowed traffic on the same node.
    NeighborDiscovery,
    /// `meta l4proto tcp`
    Protocol(Protocol),
    /// `th dport 80` or `th dport 80-90` (after a Protocol match)
    Dport(u16, u16),
    /// `ip saddr @set`
    InSet {
        side: Side,
        family: Family,
        set: String,
    },
    /// `ip daddr . th dport @set`
    DestinationPortInSet { family: Family, set: String },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Accept,
    /// `counter drop`: the end of a group chain.
    CountedDrop,
    Jump(String),
    /// `ip saddr vmap @map`
    Dispatch {
        side: Side,
        family: Family,
        map: String,
    },
    /// `counter name ip daddr map @map`: count the packet into the counter object the map holds
    /// for this address, then go on (no verdict). An address missing from the map (or a packet
    /// of the other family) counts nowhere and also goes on.
    CountInto {
        side: Side,
        family: Family,
        map: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
    pub comment: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainKind {
    /// The rules of one policy in one direction: accept or fall through.
    Policy,
    /// The policies selecting a group of pods: jump to each, then drop.
    Group,
    /// A base chain on the forward hook, at this priority.
    Base { priority: i32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub kind: ChainKind,
    pub rules: Vec<Rule>,
    pub comment: String,
}

/// Whose drops a named counter object counts: one per local isolated pod and direction.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterInfo {
    pub namespace: String,
    pub pod: String,
    pub direction: Direction,
}

impl CounterInfo {
    pub fn describe(&self) -> String {
        format!(
            "{} drops of pod {}/{}",
            self.direction, self.namespace, self.pod
        )
    }
}

/// A node's complete ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
    /// Named counter objects (`drop_in_<hash>`, `drop_eg_<hash>`) by name: what the group
    /// chains dropped, per local isolated pod and direction.
    pub counters: BTreeMap<String, CounterInfo>,
    /// Anti-spoofing, per host veth (the second table, `bridge sluice`): the source addresses
    /// the pod attachment behind each veth may send from, as the CNI plugin registered them.
    /// Empty: no bridge table at all (no pod on this node registered through CNI).
    pub spoof_guard: BTreeMap<String, BTreeSet<IpAddr>>,
}

/// How big a ruleset is, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RulesetSize {
    /// Sets, verdict maps and counter maps.
    pub sets: usize,
    /// Their elements.
    pub set_elements: usize,
    pub chains: usize,
    pub rules: usize,
    /// Named counter objects (one per local isolated pod and direction).
    pub counters: usize,
}

impl Ruleset {
    pub fn size(&self) -> RulesetSize {
        RulesetSize {
            sets: self.sets.len(),
            set_elements: self.sets.values().map(|s| s.elements.len()).sum(),
            chains: self.chains.len(),
            rules: self.chains.values().map(|c| c.rules.len()).sum(),
            counters: self.counters.len(),
        }
    }
}

/// Local pods (owning IPs) that some policy isolates in `direction`.
pub fn isolated_local_pods(index: &Index, node: &str, direction: Direction) -> usize {
    index
        .local_pods(node)
        .filter(|p| !index.isolating_policies(p, direction).is_empty())
        .count()
}

/// Something about this node we could not compile as written (e.g. two pods claiming one IP).
/// Policy errors are not repeated here: they are reported once, when the policy is indexed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub message: String,
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub ruleset: Ruleset,
    pub problems: Vec<Problem>,
}

pub const EGRESS_CHAIN: &str = "egress";
pub const INGRESS_CHAIN: &str = "ingress";
/// Egress is decided first; its accept hands the packet on to the ingress chain.
pub const EGRESS_PRIORITY: i32 = -1;
pub const INGRESS_PRIORITY: i32 = 0;

pub fn dispatch_map(direction: Direction, family: Family) -> String {
    format!("{direction}_{}", family.suffix())
}

/// `drops_in_v4`: the counter map of a direction and family (pod IP -> drop counter).
pub fn drop_counter_map(direction: Direction, family: Family) -> String {
    format!("drops_{}_{}", direction_tag(direction), family.suffix())
}

/// `drop_in_<12 hex>`: the drop counter of a pod in a direction. Derived from the pod's key
/// alone, so it survives the pod moving between group chains; a valid nft identifier of 20
/// bytes. Use `Ruleset::counters` to map it back to the pod.
pub fn drop_counter_name(direction: Direction, pod: &PodKey) -> String {
    format!(
        "drop_{}_{}",
        direction_tag(direction),
        short_hash(&pod.to_string())
    )
}

fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn direction_tag(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "in",
        Direction::Egress => "eg",
    }
}

/// `in.<namespace>.<name>`: readable in `nft list`; hashed when too long for the kernel.
pub fn policy_chain_name(direction: Direction, policy: &PolicyKey) -> String {
    let name = format!(
        "{}.{}.{}",
        direction_tag(direction),
        policy.namespace,
        policy.name
    );
    if name.len() <= 200 {
        name
    } else {
        format!("{}.{}", direction_tag(direction), short_hash(&name))
    }
}

fn group_chain_name(direction: Direction, policies: &[PolicyKey]) -> String {
    let text: Vec<String> = policies.iter().map(|k| k.to_string()).collect();
    format!(
        "grp.{}.{}",
        direction_tag(direction),
        short_hash(&text.join(","))
    )
}

/// A peer's pods, canonical so every rule with the same peer shares one set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PodPeer {
    pub(crate) namespaces: NamespaceScope,
    pub(crate) pods: Selector,
}

impl PodPeer {
    fn describe(&self) -> String {
        let ns = match &self.namespaces {
            NamespaceScope::Own(n) => format!("namespace {n}"),
            NamespaceScope::Selected(s) => format!("namespaces {s}"),
        };
        format!("{ns}; pods {}", self.pods)
    }

    fn set_name(&self, family: Family) -> String {
        format!(
            "peer_{}_{}",
            short_hash(&format!("{self:?}")),
            family.suffix()
        )
    }
}

fn block_set_name(block: &IpBlock) -> String {
    format!(
        "block_{}_{}",
        short_hash(&format!("{block:?}")),
        block.family().suffix()
    )
}

fn named_port_set_name(name: &str, protocol: Protocol, family: Family) -> String {
    // Port names are lowercase letters, digits and '-', so this mapping is one-to-one.
    format!(
        "port_{}_{}_{}",
        protocol.nft_name(),
        name.replace('-', "_"),
        family.suffix()
    )
}

/// The sets rules refer to, collected while compiling and filled in at the end.
#[derive(Default)]
struct SetRequests {
    peers: BTreeSet<(PodPeer, Family)>,
    blocks: BTreeSet<IpBlock>,
    named_ports: BTreeSet<(String, Protocol, Family)>,
}

/// Compile the ruleset of `node`, every set computed from scratch. (The agent keeps the pod
/// sets up to date between compilations instead: [`crate::incremental::Compiler`]; both give
/// the same ruleset.)
pub fn compile_node(index: &Index, node: &str) -> Compiled {
    compile_with(index, node, &mut FromScratch::new(index))
}

/// Compile the ruleset of `node`, taking the pod sets (peers, named ports) from `sets`.
pub(crate) fn compile_with(index: &Index, node: &str, sets: &mut dyn SetSource) -> Compiled {
    let mut out = Compiled::default();
    let mut requests = SetRequests::default();
    let local: Vec<&PodInfo> = index.local_pods(node).collect();

    for direction in Direction::ALL {
        let mut groups: BTreeMap<Vec<PolicyKey>, Vec<&PodInfo>> = BTreeMap::new();
        for pod in &local {
            let keys: Vec<PolicyKey> = index
                .isolating_policies(pod, direction)
                .iter()
                .map(|p| p.key.clone())
                .collect();
            if !keys.is_empty() {
                groups.entry(keys).or_default().push(pod);
            }
        }
        let mut maps: BTreeMap<Family, Set> = Family::ALL
            .into_iter()
            .map(|f| {
                (
                    f,
                    Set {
                        kind: SetKind::Dispatch(f),
                        elements: Arc::default(),
                        comment: format!("{direction}: isolated local pod IP -> group chain"),
                    },
                )
            })
            .collect();
        let mut counter_maps: BTreeMap<Family, Set> = Family::ALL
            .into_iter()
            .map(|f| {
                (
                    f,
                    Set {
                        kind: SetKind::DropCounters(f),
                        elements: Arc::default(),
                        comment: format!("{direction}: isolated local pod IP -> drop counter"),
                    },
                )
            })
            .collect();
        // Ingress drops are counted for the destination pod, egress drops for the source.
        let pod_side = match direction {
            Direction::Ingress => Side::Destination,
            Direction::Egress => Side::Source,
        };
        let mut claimed: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut policy_chains: BTreeSet<PolicyKey> = BTreeSet::new();
        for (keys, pods) in &groups {
            let group = group_chain_name(direction, keys);
            let mut rules: Vec<Rule> = keys
                .iter()
                .map(|k| Rule {
                    matches: vec![],
                    action: Action::Jump(policy_chain_name(direction, k)),
                    comment: None,
                })
                .collect();
            // Only packets about to be dropped get here: count them per pod, then drop (the
            // final rule also drops what no counter map knows).
            for family in Family::ALL {
                rules.push(Rule {
                    matches: vec![],
                    action: Action::CountInto {
                        side: pod_side,
                        family,
                        map: drop_counter_map(direction, family),
                    },
                    comment: None,
                });
            }
            rules.push(Rule {
                matches: vec![],
                action: Action::CountedDrop,
                comment: None,
            });
            let names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            out.ruleset.chains.insert(
                group.clone(),
                Chain {
                    kind: ChainKind::Group,
                    rules,
                    comment: format!("{direction} of pods selected by {}", names.join(", ")),
                },
            );
            policy_chains.extend(keys.iter().cloned());
            for pod in pods {
                let counter = drop_counter_name(direction, &pod.key);
                out.ruleset.counters.insert(
                    counter.clone(),
                    CounterInfo {
                        namespace: pod.key.namespace.clone(),
                        pod: pod.key.name.clone(),
                        direction,
                    },
                );
                for ip in &pod.ips {
                    if let Some(owner) = claimed.get(ip) {
                        out.problems.push(Problem {
                            object: format!("Pod {}", pod.key),
                            message: format!("IP {ip} is also claimed by pod {owner} on this node; keeping {owner}"),
                        });
                        continue;
                    }
                    claimed.insert(*ip, pod.key.to_string());
                    if let Some(map) = maps.get_mut(&Family::of(ip)) {
                        Arc::make_mut(&mut map.elements).insert(Element::Jump(*ip, group.clone()));
                    }
                    if let Some(map) = counter_maps.get_mut(&Family::of(ip)) {
                        Arc::make_mut(&mut map.elements)
                            .insert(Element::Counter(*ip, counter.clone()));
                    }
                }
            }
        }
        for (family, map) in maps {
            out.ruleset
                .sets
                .insert(dispatch_map(direction, family), map);
        }
        for (family, map) in counter_maps {
            out.ruleset
                .sets
                .insert(drop_counter_map(direction, family), map);
        }
        for key in policy_chains {
            if let Some(policy) = index.policies.get(&key) {
                let chain = policy_chain(policy, direction, &mut requests);
                out.ruleset
                    .chains
                    .insert(policy_chain_name(direction, &key), chain);
            }
        }
        out.ruleset.chains.insert(
            match direction {
                Direction::Egress => EGRESS_CHAIN,
                Direction::Ingress => INGRESS_CHAIN,
            }
            .to_string(),
            base_chain(direction),
        );
    }

    fill_sets(&requests, &mut out.ruleset, sets);
    out.ruleset.spoof_guard = spoof_guard(index, node, &mut out.problems);
    out
}

/// The bridge-family table that checks source addresses per host veth. Same name as the inet
/// table; `nft` tells them apart by family.
pub const BRIDGE_TABLE: &str = TABLE;
/// Its one base chain, on the bridge prerouting hook.
pub const SPOOF_GUARD_CHAIN: &str = "prerouting";
/// Before everything else on the bridge prerouting hook: before br_netfilter (priority 0)
/// hands the frame to the inet hooks (conntrack, iptables, our forward chains) and strictly
/// before the standard bridge priorities (`dstnat` -300, `filter` -200), so the frame is
/// checked as the pod sent it, before any other chain can rewrite or accept it.
pub const SPOOF_GUARD_PRIORITY: i32 = -350;
/// The named counter of the bridge table: frames dropped because their port is a registered
/// pod's veth and their source (or their EtherType) is not the pod's.
pub const SPOOF_COUNTER: &str = "spoofed";
/// `type ifname`: the host veths of registered attachments.
pub const POD_PORTS_SET: &str = "pod_ports";

/// `pod_src_v4`: `type ifname . ipv4_addr`, each registered veth with each of its addresses.
pub fn pod_src_set(family: Family) -> String {
    format!("pod_src_{}", family.suffix())
}

/// A name the kernel accepts for a network device (and nft can quote): 1-15 bytes, printable
/// ASCII, no '/', ':', quotes or backslashes.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | ':' | '"' | '\\'))
}

/// Which source addresses may enter the bridge from which host veth: every registration (the
/// CNI plugin on this node told the agent about it), unless the index places its pod on
/// another node (a stale registration: its sandbox, and so its veth, is gone from here). A veth
/// named by two registrations may send from the addresses of both.
fn spoof_guard(
    index: &Index,
    node: &str,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let mut guard: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for reg in index.registrations() {
        let elsewhere = index
            .pods
            .get(&reg.pod)
            .and_then(|p| p.node.as_deref())
            .filter(|n| *n != node);
        if let Some(other) = elsewhere {
            problems.push(Problem {
                object: format!("Pod {}", reg.pod),
                message: format!(
                    "registered through CNI on this node (veth {}) but scheduled on {other}; \
                     its veth is not guarded",
                    reg.host_veth
                ),
            });
            continue;
        }
        if !valid_ifname(&reg.host_veth) {
            problems.push(Problem {
                object: format!("Pod {}", reg.pod),
                message: format!(
                    "the CNI plugin registered host veth {:?}, not a valid interface name; \
                     its source addresses are not checked",
                    reg.host_veth
                ),
            });
            continue;
        }
        guard
            .entry(reg.host_veth.clone())
            .or_default()
            .extend(reg.ips.iter().copied());
    }
    guard
}

fn base_chain(direction: Direction) -> Chain {
    let (side, priority) = match direction {
        Direction::Egress => (Side::Source, EGRESS_PRIORITY),
        Direction::Ingress => (Side::Destination, INGRESS_PRIORITY),
    };
    let mut rules = vec![
        Rule {
            matches: vec![Match::Established],
            action: Action::Accept,
            comment: None,
        },
        Rule {
            matches: vec![Match::NeighborDiscovery],
            action: Action::Accept,
            comment: None,
        },
    ];
    for family in Family::ALL {
        rules.push(Rule {
            matches: vec![],
            action: Action::Dispatch {
                side,
                family,
                map: dispatch_map(direction, family),
            },
            comment: None,
        });
    }
    Chain {
        kind: ChainKind::Base { priority },
        rules,
        comment: format!("{direction} policy of this node's pods (forward hook)"),
    }
}

/// One policy's rules for one direction. Each allowing entry becomes peers x ports x families
/// rules; an entry we could not represent becomes nothing (it allows nothing).
fn policy_chain(policy: &PolicyInfo, direction: Direction, requests: &mut SetRequests) -> Chain {
    // For ingress the peer is the packet's source; for egress its destination.
    let peer_side = match direction {
        Direction::Ingress => Side::Source,
        Direction::Egress => Side::Destination,
    };
    let mut rules: Vec<Rule> = Vec::new();
    for (i, rule) in policy.rules(direction).unwrap_or(&[]).iter().enumerate() {
        let Ok(rule) = rule else { continue };
        let comment = Some(format!("{} {direction}[{i}]", policy.key));
        // Each peer as (family it is limited to, matches).
        let peers: Vec<(Option<Family>, Vec<Match>)> = match &rule.peers {
            None => vec![(None, vec![])],
            Some(peers) => peers
                .iter()
                .flat_map(|peer| match peer {
                    Peer::Pods { namespaces, pods } => {
                        let pp = PodPeer {
                            namespaces: namespaces.clone(),
                            pods: pods.clone(),
                        };
                        Family::ALL
                            .into_iter()
                            .map(|family| {
                                requests.peers.insert((pp.clone(), family));
                                (
                                    Some(family),
                                    vec![Match::InSet {
                                        side: peer_side,
                                        family,
                                        set: pp.set_name(family),
                                    }],
                                )
                            })
                            .collect::<Vec<_>>()
                    }
                    Peer::Block(block) => {
                        requests.blocks.insert(block.clone());
                        vec![(
                            Some(block.family()),
                            vec![Match::InSet {
                                side: peer_side,
                                family: block.family(),
                                set: block_set_name(block),
                            }],
                        )]
                    }
                })
                .collect(),
        };
        let ports: Vec<Option<&PortRule>> = match &rule.ports {
            None => vec![None],
            Some(ports) => ports.iter().map(Some).collect(),
        };
        for (peer_family, peer_matches) in &peers {
            for port in &ports {
                let Some(port) = port else {
                    rules.push(Rule {
                        matches: peer_matches.clone(),
                        action: Action::Accept,
                        comment: comment.clone(),
                    });
                    continue;
                };
                let mut base = peer_matches.clone();
                base.push(Match::Protocol(port.protocol));
                match &port.port {
                    PortMatch::AnyPort => rules.push(Rule {
                        matches: base,
                        action: Action::Accept,
                        comment: comment.clone(),
                    }),
                    PortMatch::Range(lo, hi) => {
                        base.push(Match::Dport(*lo, *hi));
                        rules.push(Rule {
                            matches: base,
                            action: Action::Accept,
                            comment: comment.clone(),
                        });
                    }
                    PortMatch::Named(name) => {
                        // Resolved per destination pod: the set holds (pod IP, port) pairs.
                        let families: Vec<Family> = match peer_family {
                            Some(f) => vec![*f],
                            None => Family::ALL.to_vec(),
                        };
                        for family in families {
                            requests
                                .named_ports
                                .insert((name.clone(), port.protocol, family));
                            let mut m = base.clone();
                            m.push(Match::DestinationPortInSet {
                                family,
                                set: named_port_set_name(name, port.protocol, family),
                            });
                            rules.push(Rule {
                                matches: m,
                                action: Action::Accept,
                                comment: comment.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    // Identical rules (e.g. a peer listed twice) are matched once.
    let mut seen = BTreeSet::new();
    rules.retain(|r| seen.insert((r.matches.clone(), r.action.clone())));
    Chain {
        kind: ChainKind::Policy,
        rules,
        comment: format!("{direction} rules of NetworkPolicy {}", policy.key),
    }
}

/// A set whose members are pods: a peer's pod IPs, or a named port's `ip . port` pairs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PodSetKey {
    Peer(PodPeer, Family),
    NamedPort(String, Protocol, Family),
}

impl PodSetKey {
    /// The elements `pod` puts into this set (none when it is not a member). A set's elements
    /// are exactly the union of its pods' contributions.
    pub(crate) fn contribution(&self, index: &Index, pod: &PodInfo) -> Vec<Element> {
        if !pod.owns_ips() {
            return Vec::new();
        }
        match self {
            PodSetKey::Peer(peer, family) => {
                if index.namespace_matches(&peer.namespaces, &pod.key.namespace)
                    && peer.pods.matches(&pod.labels)
                {
                    pod.ip(*family).map(Element::Addr).into_iter().collect()
                } else {
                    Vec::new()
                }
            }
            // The first declaration of a name wins, as named_port() resolves it.
            PodSetKey::NamedPort(name, protocol, family) => match pod.named_port(name, *protocol) {
                Some(port) => pod
                    .ips
                    .iter()
                    .filter(|ip| Family::of(ip) == *family)
                    .map(|ip| Element::AddrPort(*ip, port))
                    .collect(),
                None => Vec::new(),
            },
        }
    }

    /// Can pods of this namespace be members? (Lets a computation skip whole namespaces.)
    pub(crate) fn namespace_may_match(&self, index: &Index, namespace: &str) -> bool {
        match self {
            PodSetKey::Peer(peer, _) => index.namespace_matches(&peer.namespaces, namespace),
            PodSetKey::NamedPort(..) => true,
        }
    }

    /// Does a namespace's labels decide membership (a namespaceSelector peer)?
    pub(crate) fn depends_on_namespace_labels(&self) -> bool {
        matches!(
            self,
            PodSetKey::Peer(
                PodPeer {
                    namespaces: NamespaceScope::Selected(_),
                    ..
                },
                _
            )
        )
    }

    fn name(&self) -> String {
        match self {
            PodSetKey::Peer(peer, family) => peer.set_name(*family),
            PodSetKey::NamedPort(name, protocol, family) => {
                named_port_set_name(name, *protocol, *family)
            }
        }
    }

    fn set(&self, elements: Arc<BTreeSet<Element>>) -> Set {
        match self {
            PodSetKey::Peer(peer, family) => Set {
                kind: SetKind::Addrs(*family),
                elements,
                comment: peer.describe(),
            },
            PodSetKey::NamedPort(name, protocol, family) => Set {
                kind: SetKind::AddrPorts(*family),
                elements,
                comment: format!("named port {name}/{protocol}: pod IP . port"),
            },
        }
    }
}

/// Where the pod sets' elements come from.
pub(crate) trait SetSource {
    fn elements(&mut self, key: &PodSetKey) -> Arc<BTreeSet<Element>>;
}

/// The pods of one namespace (the index is ordered by namespace, then name).
pub(crate) fn pods_in<'a>(
    index: &'a Index,
    namespace: &str,
) -> impl Iterator<Item = &'a PodInfo> + 'a {
    let namespace = namespace.to_string();
    index
        .pods
        .range(PodKey::new(namespace.clone(), String::new())..)
        .take_while(move |(k, _)| k.namespace == namespace)
        .map(|(_, p)| p)
}

/// The namespaces that have pods, each once, by jumping over each namespace's pods.
fn namespaces_with_pods(index: &Index) -> Vec<&str> {
    let mut out = Vec::new();
    let mut next = index.pods.keys().next();
    while let Some(key) = next {
        out.push(key.namespace.as_str());
        // "ns\0" sorts after every name in "ns" and before any other namespace.
        let after = PodKey::new(format!("{}\0", key.namespace), String::new());
        next = index.pods.range(after..).next().map(|(k, _)| k);
    }
    out
}

/// Every pod set computed from the index, each time. Visits only the pods that may be members:
/// for a peer, the pods of the postings of its podSelector's most selective `In`/`Exists` term
/// (`Index::postings`), in its own namespace or the namespaces its namespaceSelector matches;
/// for a named port, the pods declaring that name. A podSelector with no such term (`{}`, only
/// `NotIn`/`DoesNotExist`), or postings holding much of the cluster (`postings::worth_it`),
/// visit every pod of those namespaces instead (a named port: the pods declaring it, found in
/// one pass over every pod shared by all named-port sets, `declared`). Each
/// candidate is checked in full (`PodSetKey::contribution`), so the postings decide the cost,
/// never the members.
pub(crate) struct FromScratch<'a> {
    index: &'a Index,
    /// Namespaces that have pods, found on the first namespaceSelector set without postings.
    namespaces: Option<Vec<&'a str>>,
    /// Postings are used when they hold at most 1/`share` of the pods (0: always).
    share: usize,
    /// The pods declaring each named port, from one pass over every pod, made for the first
    /// named-port set whose posting is too large to pay: every such set (a node asks for a
    /// few names, each in both families) then costs that one pass, not one pass each.
    declared: Option<BTreeMap<(&'a str, Protocol), Vec<&'a PodInfo>>>,
}

impl<'a> FromScratch<'a> {
    pub(crate) fn new(index: &'a Index) -> Self {
        Self::with_share(index, postings::SHARE)
    }

    pub(crate) fn with_share(index: &'a Index, share: usize) -> Self {
        Self {
            index,
            namespaces: None,
            share,
            declared: None,
        }
    }

    /// The pods that may be members of `key`'s set: every member, and maybe others.
    fn candidates(&mut self, key: &PodSetKey) -> Vec<&'a PodInfo> {
        let (index, share) = (self.index, self.share);
        let worth_it =
            |postings: &[&postings::Posting]| postings::worth_it(postings, index.pods.len(), share);
        let by_key = |keys: &mut dyn Iterator<Item = &'a PodKey>| -> Vec<&'a PodInfo> {
            keys.filter_map(|k| index.pods.get(k)).collect()
        };
        let (namespaces, pods) = match key {
            PodSetKey::NamedPort(name, protocol, _) => {
                return match index.postings().declaring(name, *protocol) {
                    None => Vec::new(),
                    Some(posting) if worth_it(&[posting]) => {
                        by_key(&mut posting.iter().map(|k| k.as_ref()))
                    }
                    Some(_) => self
                        .declared
                        .get_or_insert_with(|| declared_ports(index))
                        .get(&(name.as_str(), *protocol))
                        .cloned()
                        .unwrap_or_default(),
                };
            }
            PodSetKey::Peer(peer, _) => (&peer.namespaces, &peer.pods),
        };
        let postings = index.postings().selecting(pods);
        match (postings.filter(|p| worth_it(p)), namespaces) {
            (Some(postings), NamespaceScope::Own(namespace)) => by_key(
                &mut postings
                    .into_iter()
                    .flat_map(|posting| postings::in_namespace(posting, namespace)),
            ),
            (Some(postings), NamespaceScope::Selected(_)) => {
                by_key(&mut postings.into_iter().flat_map(|posting| {
                    postings::in_namespaces(posting, |ns| key.namespace_may_match(index, ns))
                }))
            }
            (None, NamespaceScope::Own(namespace)) => pods_in(index, namespace).collect(),
            (None, NamespaceScope::Selected(_)) => self
                .namespaces
                .get_or_insert_with(|| namespaces_with_pods(index))
                .iter()
                .filter(|ns| key.namespace_may_match(index, ns))
                .flat_map(|ns| pods_in(index, ns))
                .collect(),
        }
    }

    /// Each member pod with what it contributes.
    pub(crate) fn contributions(&mut self, key: &PodSetKey) -> Vec<(&'a PodInfo, Vec<Element>)> {
        let index = self.index;
        self.candidates(key)
            .into_iter()
            .map(|pod| (pod, key.contribution(index, pod)))
            .filter(|(_, c)| !c.is_empty())
            .collect()
    }
}

impl SetSource for FromScratch<'_> {
    fn elements(&mut self, key: &PodSetKey) -> Arc<BTreeSet<Element>> {
        Arc::new(
            self.contributions(key)
                .into_iter()
                .flat_map(|(_, c)| c)
                .collect(),
        )
    }
}

/// Every pod by the (port name, protocol) pairs it declares, each pod once per pair.
fn declared_ports(index: &Index) -> BTreeMap<(&str, Protocol), Vec<&PodInfo>> {
    let mut out: BTreeMap<(&str, Protocol), Vec<&PodInfo>> = BTreeMap::new();
    for pod in index.pods.values() {
        for port in &pod.ports {
            if let Some(name) = &port.name {
                let pods = out.entry((name.as_str(), port.protocol)).or_default();
                if !pods.last().is_some_and(|last| std::ptr::eq(*last, pod)) {
                    pods.push(pod);
                }
            }
        }
    }
    out
}

fn fill_sets(requests: &SetRequests, ruleset: &mut Ruleset, sets: &mut dyn SetSource) {
    let keys = requests
        .peers
        .iter()
        .map(|(peer, family)| PodSetKey::Peer(peer.clone(), *family))
        .chain(requests.named_ports.iter().map(|(name, protocol, family)| {
            PodSetKey::NamedPort(name.clone(), *protocol, *family)
        }));
    for key in keys {
        let elements = sets.elements(&key);
        ruleset.sets.insert(key.name(), key.set(elements));
    }
    for block in &requests.blocks {
        let elements = block_ranges(block)
            .into_iter()
            .map(|(a, b)| Element::Range(a, b))
            .collect();
        let except: Vec<String> = block.except.iter().map(|e| e.to_string()).collect();
        ruleset.sets.insert(
            block_set_name(block),
            Set {
                kind: SetKind::Ranges(block.family()),
                elements: Arc::new(elements),
                comment: if except.is_empty() {
                    format!("ipBlock {}", block.cidr)
                } else {
                    format!("ipBlock {} except {}", block.cidr, except.join(" "))
                },
            },
        );
    }
}

/// An ipBlock as disjoint inclusive address ranges: the cidr with every except cut out, so one
/// interval-set lookup decides it.
pub fn block_ranges(block: &IpBlock) -> Vec<(IpAddr, IpAddr)> {
    let bounds = |net: &IpNet| -> (u128, u128) {
        match net {
            IpNet::V4(n) => (
                u32::from(n.network()) as u128,
                u32::from(n.broadcast()) as u128,
            ),
            IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
        }
    };
    let to_ip = |v: u128| -> IpAddr {
        match block.cidr {
            // Values come from an IPv4 block, so they fit in 32 bits.
            IpNet::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(v as u32)),
            IpNet::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(v)),
        }
    };
    let mut ranges = vec![bounds(&block.cidr)];
    for except in &block.except {
        let (lo, hi) = bounds(except);
        let mut next = Vec::new();
        for (a, b) in ranges {
            if hi < a || lo > b {
                next.push((a, b));
                continue;
            }
            if lo > a {
                next.push((a, lo - 1));
            }
            if hi < b {
                next.push((hi + 1, b));
            }
        }
        ranges = next;
    }
    ranges
        .into_iter()
        .map(|(a, b)| (to_ip(a), to_ip(b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AttachmentKey, Registration};
    use crate::testutil::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn block_ranges_cut_out_every_except() {
        let block = IpBlock {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec![
                "10.1.0.0/16".parse().unwrap(),
                "10.255.255.0/24".parse().unwrap(),
            ],
        };
        assert_eq!(
            block_ranges(&block),
            vec![
                (ip("10.0.0.0"), ip("10.0.255.255")),
                (ip("10.2.0.0"), ip("10.255.254.255")),
            ]
        );
        let whole = IpBlock {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(block_ranges(&whole).is_empty());
    }

    #[test]
    fn unselected_node_gets_only_the_skeleton() {
        let idx = three_namespaces();
        let rs = compile_node(&idx, "node-1").ruleset;
        assert_eq!(rs.chains.len(), 2, "just the two base chains");
        assert!(rs.sets.values().all(|s| s.elements.is_empty()));
    }

    #[test]
    fn pods_sharing_policies_share_one_group_chain() {
        let mut idx = three_namespaces();
        deny_ingress(&mut idx, "x");
        let rs = compile_node(&idx, "node-1").ruleset;
        let groups: Vec<_> = rs
            .chains
            .iter()
            .filter(|(_, c)| c.kind == ChainKind::Group)
            .collect();
        assert_eq!(groups.len(), 1);
        let map = &rs.sets["ingress_v4"];
        // x/a and x/c live on node-1.
        assert_eq!(map.elements.len(), 2);
        assert!(rs.chains.contains_key("in.x.deny"));
        assert!(
            rs.chains["in.x.deny"].rules.is_empty(),
            "ingress: [] accepts nothing"
        );
    }

    #[test]
    fn peer_sets_are_shared_and_cluster_wide() {
        let mut idx = three_namespaces();
        for name in ["p1", "p2"] {
            add_policy(
                &mut idx,
                "x",
                name,
                r#"{"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}"#,
            );
        }
        let rs = compile_node(&idx, "node-1").ruleset;
        let peers: Vec<_> = rs.sets.keys().filter(|k| k.starts_with("peer_")).collect();
        assert_eq!(
            peers.len(),
            2,
            "one set per family, shared by both policies"
        );
        let v4 = rs
            .sets
            .iter()
            .find(|(k, _)| k.starts_with("peer_") && k.ends_with("v4"))
            .unwrap()
            .1;
        assert_eq!(v4.elements.len(), 3, "y/a, y/b (node-2) and y/c");
    }

    #[test]
    fn size_and_isolated_pods_count_what_is_there() {
        let mut idx = three_namespaces();
        deny_ingress(&mut idx, "x");
        let rs = compile_node(&idx, "node-1").ruleset;
        let size = rs.size();
        assert_eq!(size.sets, 8, "the four dispatch maps and four counter maps");
        assert_eq!(
            size.set_elements, 8,
            "x/a and x/c, both families, dispatch and counter maps"
        );
        assert_eq!(size.chains, 4, "two base chains, one group, one policy");
        assert_eq!(
            size.rules,
            4 + 4 + 4,
            "base chains 4 each, group: jump, count v4, count v6, drop"
        );
        assert_eq!(size.counters, 2, "x/a and x/c, ingress");
        assert_eq!(isolated_local_pods(&idx, "node-1", Direction::Ingress), 2);
        assert_eq!(isolated_local_pods(&idx, "node-1", Direction::Egress), 0);
    }

    #[test]
    fn compiling_twice_gives_the_same_ruleset() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}"#,
        );
        assert_eq!(
            compile_node(&idx, "node-1").ruleset,
            compile_node(&idx, "node-1").ruleset
        );
    }

    #[test]
    fn a_broken_rule_compiles_to_nothing() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "nonsense"}}]}, {"ports": [{"port": 81}]}]}"#,
        );
        let out = compile_node(&idx, "node-1");
        assert!(
            out.problems.is_empty(),
            "policy errors are reported when indexed"
        );
        let chain = &out.ruleset.chains["in.x.p"];
        assert_eq!(chain.rules.len(), 1, "only the port-81 rule remains");
        assert_eq!(
            out.ruleset.sets["ingress_v4"].elements.len(),
            2,
            "x/a and x/c stay isolated"
        );
    }

    #[test]
    fn each_isolated_local_pod_gets_a_counter_per_isolated_direction() {
        let mut idx = three_namespaces();
        deny_ingress(&mut idx, "x");
        add_policy(
            &mut idx,
            "x",
            "egress-a",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}"#,
        );
        let rs = compile_node(&idx, "node-1").ruleset;
        let mut got: Vec<(String, Direction)> = rs
            .counters
            .values()
            .map(|c| (format!("{}/{}", c.namespace, c.pod), c.direction))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("x/a".to_string(), Direction::Ingress),
                ("x/a".to_string(), Direction::Egress),
                ("x/c".to_string(), Direction::Ingress),
            ],
            "y/*, z/* and node-2's x/b are not isolated here"
        );
        for direction in Direction::ALL {
            assert_eq!(
                rs.counters
                    .values()
                    .filter(|c| c.direction == direction)
                    .count(),
                isolated_local_pods(&idx, "node-1", direction)
            );
        }
        // Every counter is named after its pod, and the maps send each of the pod's addresses
        // (both families) to it.
        for (name, info) in &rs.counters {
            let pod = PodKey::new(info.namespace.clone(), info.pod.clone());
            assert_eq!(*name, drop_counter_name(info.direction, &pod));
            let ips = &idx.pods[&pod].ips;
            for ip in ips {
                let map = &rs.sets[&drop_counter_map(info.direction, Family::of(ip))];
                assert_eq!(map.kind, SetKind::DropCounters(Family::of(ip)));
                assert!(map.elements.contains(&Element::Counter(*ip, name.clone())));
            }
        }
        // And nothing else is in the counter maps.
        let elements: usize = rs
            .sets
            .values()
            .filter(|s| matches!(s.kind, SetKind::DropCounters(_)))
            .map(|s| s.elements.len())
            .sum();
        assert_eq!(elements, 3 * 2);
        // Nothing isolated on node-1 for y: no counters for an unselected node either.
        assert!(compile_node(&three_namespaces(), "node-1")
            .ruleset
            .counters
            .is_empty());
    }

    #[test]
    fn group_chains_count_per_pod_before_the_final_drop() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "deny",
            r#"{"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}"#,
        );
        let rs = compile_node(&idx, "node-1").ruleset;
        for (name, chain) in rs.chains.iter().filter(|(_, c)| c.kind == ChainKind::Group) {
            let (direction, side) = if name.starts_with("grp.in.") {
                (Direction::Ingress, Side::Destination)
            } else {
                (Direction::Egress, Side::Source)
            };
            let tail: Vec<&Action> = chain
                .rules
                .iter()
                .rev()
                .take(3)
                .map(|r| &r.action)
                .collect();
            assert_eq!(
                tail,
                vec![
                    &Action::CountedDrop,
                    &Action::CountInto {
                        side,
                        family: Family::V6,
                        map: drop_counter_map(direction, Family::V6)
                    },
                    &Action::CountInto {
                        side,
                        family: Family::V4,
                        map: drop_counter_map(direction, Family::V4)
                    },
                ],
                "{name}"
            );
        }
        // Nothing on the accept path: base and policy chains have no counting.
        assert!(rs
            .chains
            .values()
            .filter(|c| c.kind != ChainKind::Group)
            .flat_map(|c| &c.rules)
            .all(|r| !matches!(r.action, Action::CountInto { .. } | Action::CountedDrop)));
    }

    fn registration(container: &str, pod: &str, veth: &str, ips: &[&str]) -> Registration {
        Registration {
            attachment: AttachmentKey {
                container_id: container.into(),
                ifname: "eth0".into(),
            },
            pod: key(pod),
            ips: ips.iter().map(|i| ip(i)).collect(),
            host_veth: veth.into(),
        }
    }

    #[test]
    fn the_spoof_guard_holds_each_registered_veth_with_its_own_addresses() {
        let mut idx = three_namespaces();
        let rs = compile_node(&idx, "node-1").ruleset;
        assert!(rs.spoof_guard.is_empty(), "nothing registered: no guard");

        // x/a (node-1) registered; so is a pod the API does not know yet (it is on this node:
        // the plugin that registered it runs here), and a second attachment of x/a.
        idx.register(registration(
            "c1",
            "x/a",
            "veth0a",
            &["10.244.1.2", "fd00:10:244:1::2"],
        ));
        idx.register(registration("c2", "x/new", "veth0n", &["10.244.1.50"]));
        idx.register(registration("c3", "x/a", "veth1a", &["10.244.1.51"]));
        let out = compile_node(&idx, "node-1");
        let want: BTreeMap<String, BTreeSet<IpAddr>> = [
            ("veth0a", vec!["10.244.1.2", "fd00:10:244:1::2"]),
            ("veth0n", vec!["10.244.1.50"]),
            ("veth1a", vec!["10.244.1.51"]),
        ]
        .into_iter()
        .map(|(v, ips)| (v.to_string(), ips.into_iter().map(ip).collect()))
        .collect();
        assert_eq!(out.ruleset.spoof_guard, want);
        assert!(out.problems.is_empty(), "{:?}", out.problems);

        // A registration whose pod the API places on another node is not this node's, and a
        // veth name the kernel could not have is not used; both are reported.
        idx.register(registration("c4", "x/b", "veth0b", &["10.244.2.2"]));
        idx.register(registration("c5", "y/a", "bad\"name", &["10.244.1.5"]));
        idx.register(registration("c6", "y/c", &"v".repeat(16), &["10.244.1.7"]));
        let out = compile_node(&idx, "node-1");
        assert_eq!(out.ruleset.spoof_guard, want);
        let objects: Vec<&str> = out.problems.iter().map(|p| p.object.as_str()).collect();
        assert_eq!(
            objects,
            ["Pod x/b", "Pod y/a", "Pod y/c"],
            "{:?}",
            out.problems
        );
        assert!(out.problems[0].message.contains("node-2"));

        // The guard does not touch the inet table: a registration with the pod's API addresses
        // changes nothing else, even with policies in force.
        let mut plain = three_namespaces();
        add_policy(
            &mut plain,
            "x",
            "deny",
            r#"{"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}"#,
        );
        let mut registered = plain.clone();
        registered.register(registration(
            "c1",
            "x/a",
            "veth0a",
            &["10.244.1.2", "fd00:10:244:1::2"],
        ));
        let mut guarded = compile_node(&registered, "node-1").ruleset;
        assert_eq!(guarded.spoof_guard.len(), 1);
        guarded.spoof_guard.clear();
        assert_eq!(guarded, compile_node(&plain, "node-1").ruleset);

        // Two registrations naming one veth: it may send from the addresses of both.
        idx.register(registration("c7", "z/a", "veth0n", &["10.244.1.60"]));
        let guard = compile_node(&idx, "node-1").ruleset.spoof_guard;
        assert_eq!(
            guard["veth0n"],
            [ip("10.244.1.50"), ip("10.244.1.60")].into_iter().collect()
        );

        // Unregistering removes the veth.
        idx.unregister(&registration("c1", "x/a", "", &[]).attachment);
        let guard = compile_node(&idx, "node-1").ruleset.spoof_guard;
        assert!(!guard.contains_key("veth0a"));
    }

    #[test]
    fn valid_ifnames_are_what_the_kernel_accepts() {
        for ok in ["veth5d6ee293", "a", "eth0.5", "v-_@x", &"v".repeat(15)] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "a:b",
            "a\"b",
            "a\\b",
            "vethé",
            &"v".repeat(16),
        ] {
            assert!(!valid_ifname(bad), "{bad}");
        }
    }

    #[test]
    fn counter_names_are_deterministic_and_follow_the_pod() {
        let pod = key("x/a");
        let name = drop_counter_name(Direction::Ingress, &pod);
        assert_eq!(name, drop_counter_name(Direction::Ingress, &key("x/a")));
        assert_ne!(name, drop_counter_name(Direction::Egress, &pod));
        assert_ne!(name, drop_counter_name(Direction::Ingress, &key("x/b")));
        assert!(name.starts_with("drop_in_"), "{name}");
        assert_eq!(name.len(), "drop_in_".len() + 12);
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        let long = PodKey::new("n".repeat(63), "p".repeat(253));
        assert_eq!(drop_counter_name(Direction::Egress, &long).len(), 20);

        // A pod moving to another group chain keeps its counter and its counter elements.
        let mut idx = three_namespaces();
        deny_ingress(&mut idx, "x");
        let before = compile_node(&idx, "node-1").ruleset;
        add_policy(
            &mut idx,
            "x",
            "web",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80}]}]}"#,
        );
        let after = compile_node(&idx, "node-1").ruleset;
        assert_ne!(before.sets["ingress_v4"], after.sets["ingress_v4"]);
        assert_eq!(before.counters, after.counters);
        assert_eq!(before.sets["drops_in_v4"], after.sets["drops_in_v4"]);
    }
}
