//! The cluster as policy sees it: namespaces, pods and policies, slimmed and validated at the edge
//! (from k8s-openapi objects) so the evaluator and compiler work on plain, infallible data.
//!
//! Validation never rejects a whole policy: a part we cannot represent (an unparsable CIDR, an
//! unknown operator) is recorded as an error on the rule it belongs to, and such a rule allows
//! nothing. The policy still isolates what it selects, so bad input never opens traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::postings::PodPostings;
use crate::selector::{Labels, Selector, SelectorError};

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The name nft uses (`meta l4proto tcp`).
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl Protocol {
    /// The name the Kubernetes API uses (`TCP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Suffix used in set and map names (`_v4`).
    pub fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
}

impl Family {
    /// The name the Kubernetes API uses (`IPv4`).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "IPv4" => Ok(Family::V4),
            "IPv6" => Ok(Family::V6),
            other => Err(format!("unknown family {other:?} (expected IPv4 or IPv6)")),
        }
    }
}

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ObjectKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ObjectKey::new(ns, name))
            }
            _ => Err(format!("{s:?} is not of the form namespace/name")),
        }
    }
}

pub type PodKey = ObjectKey;
pub type PolicyKey = ObjectKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// What policy needs of a Pod; everything else is dropped at the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub key: PodKey,
    pub labels: Labels,
    pub node: Option<String>,
    pub host_network: bool,
    pub phase: Phase,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

impl PodInfo {
    /// Does this pod own its IPs as far as policy is concerned? hostNetwork pods are node
    /// traffic; finished pods keep their IP in the API although it may be reused already.
    pub fn owns_ips(&self) -> bool {
        !self.host_network && !matches!(self.phase, Phase::Succeeded | Phase::Failed)
    }

    /// The families the pod has an address in, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| self.ip(*f).is_some())
            .collect()
    }

    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| Family::of(ip) == family)
    }

    /// The port number a named port resolves to on this pod, if it declares it.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .map(|p| p.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
}

/// Where a pod peer's pods may live.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamespaceScope {
    /// podSelector-only peer: the policy's own namespace.
    Own(String),
    Selected(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    Block(IpBlock),
}

/// `ipBlock`: addresses in `cidr` but in none of `except`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlock {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }

    pub fn family(&self) -> Family {
        match self.cidr {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// Only a protocol: every port of it.
    AnyPort,
    /// `port`, or `port`..=`endPort`.
    Range(u16, u16),
    /// A named port, resolved against the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// One entry of `ingress` or `egress`. `None` means "all" (field missing or empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortRule>>,
}

/// A rule that we could not represent: it allows nothing and is reported.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path in the object, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    /// What sluice does about this error in a policy, for people reading the report.
    pub fn consequence(&self) -> &'static str {
        if self.field.starts_with("spec.podSelector") {
            "the policy selects no pods until this is fixed"
        } else if self.field.starts_with("spec.policyTypes") {
            "both directions are isolated"
        } else {
            "this rule allows nothing; the policy still isolates the pods it selects"
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    pub key: PolicyKey,
    /// `None` when the podSelector itself is broken: then the policy selects nothing.
    pub pod_selector: Option<Selector>,
    /// `Some` when the policy isolates ingress (policyTypes, defaulted as the API does).
    pub ingress: Option<Vec<Result<Rule, FieldError>>>,
    pub egress: Option<Vec<Result<Rule, FieldError>>>,
    /// Everything that could not be represented, for reporting.
    pub errors: Vec<FieldError>,
}

impl PolicyInfo {
    pub fn rules(&self, direction: Direction) -> Option<&[Result<Rule, FieldError>]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    pub fn selects(&self, pod: &PodInfo) -> bool {
        pod.key.namespace == self.key.namespace
            && !pod.host_network
            && self
                .pod_selector
                .as_ref()
                .is_some_and(|s| s.matches(&pod.labels))
    }
}

/// An object the index could not take at all (missing name, wrong shape).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {error}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub name: String,
    pub error: FieldError,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn object_error(kind: &'static str, name: &str, field: &str, message: &str) -> ObjectError {
    ObjectError {
        kind,
        name: name.to_string(),
        error: field_error(field, message),
    }
}

pub fn namespace_info(ns: &Namespace) -> Result<NamespaceInfo, ObjectError> {
    let name = ns
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| object_error("Namespace", "?", "metadata.name", "required"))?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    Ok(NamespaceInfo { name, labels })
}

pub fn pod_info(pod: &Pod) -> Result<PodInfo, ObjectError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(object_error("Pod", "?", "metadata.name", "required"));
    }
    if namespace.is_empty() {
        return Err(object_error("Pod", &name, "metadata.namespace", "required"));
    }
    let key = PodKey::new(namespace, name);
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        Some("Unknown") => Phase::Unknown,
        _ => Phase::Pending,
    };
    let mut raw_ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|p| p.ip.clone()).collect())
        .unwrap_or_default();
    if raw_ips.is_empty() {
        raw_ips.extend(status.and_then(|s| s.pod_ip.clone()));
    }
    let mut ips = Vec::new();
    for (i, raw) in raw_ips.iter().enumerate() {
        let ip = raw.parse::<IpAddr>().map_err(|_| {
            object_error(
                "Pod",
                &key.to_string(),
                &format!("status.podIPs[{i}].ip"),
                &format!("{raw:?} is not an IP address"),
            )
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (ci, c) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let protocol = p
                .protocol
                .as_deref()
                .unwrap_or("TCP")
                .parse::<Protocol>()
                .map_err(|e| {
                    object_error("Pod", &key.to_string(), &format!("{field}.protocol"), &e)
                })?;
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    object_error(
                        "Pod",
                        &key.to_string(),
                        &format!("{field}.containerPort"),
                        &format!("{} is not a port (1-65535)", p.container_port),
                    )
                })?;
            ports.push(ContainerPort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port,
                protocol,
            });
        }
    }
    Ok(PodInfo {
        key,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        phase,
        ips,
        ports,
    })
}

pub fn policy_info(policy: &NetworkPolicy) -> Result<PolicyInfo, ObjectError> {
    let name = policy.metadata.name.clone().unwrap_or_default();
    let namespace = policy.metadata.namespace.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(object_error(
            "NetworkPolicy",
            "?",
            "metadata.name",
            "required",
        ));
    }
    if namespace.is_empty() {
        return Err(object_error(
            "NetworkPolicy",
            &name,
            "metadata.namespace",
            "required",
        ));
    }
    let key = PolicyKey::new(namespace.clone(), name);
    let spec = policy.spec.clone().unwrap_or_default();
    let mut errors = Vec::new();

    let pod_selector = match spec.pod_selector.as_ref() {
        None => Some(Selector::everything()),
        Some(s) => match Selector::parse(s) {
            Ok(s) => Some(s),
            Err(e) => {
                errors.push(selector_error("spec.podSelector", e));
                None
            }
        },
    };

    // policyTypes defaulting, as the API server does: Ingress always, Egress if there are
    // egress rules.
    let (mut isolates_ingress, mut isolates_egress) = (false, false);
    match spec.policy_types.as_deref() {
        None | Some([]) => {
            isolates_ingress = true;
            isolates_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => isolates_ingress = true,
                    "Egress" => isolates_egress = true,
                    other => {
                        // Unknown type: isolate both ways rather than open anything.
                        errors.push(field_error(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        ));
                        isolates_ingress = true;
                        isolates_egress = true;
                    }
                }
            }
        }
    }

    let ingress = isolates_ingress.then(|| {
        spec.ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                parse_rule(
                    &namespace,
                    &format!("spec.ingress[{i}]"),
                    "from",
                    r.from.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect::<Vec<_>>()
    });
    let egress = isolates_egress.then(|| {
        spec.egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                parse_rule(
                    &namespace,
                    &format!("spec.egress[{i}]"),
                    "to",
                    r.to.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect::<Vec<_>>()
    });
    for rules in [&ingress, &egress].into_iter().flatten() {
        errors.extend(rules.iter().filter_map(|r| r.as_ref().err().cloned()));
    }
    Ok(PolicyInfo {
        key,
        pod_selector,
        ingress,
        egress,
        errors,
    })
}

fn selector_error(field: &str, e: SelectorError) -> FieldError {
    // SelectorError starts with the sub-path (`matchExpressions[0].operator: ...`).
    let text = e.to_string();
    match text.split_once(": ") {
        Some((sub, msg)) => field_error(format!("{field}.{sub}"), msg),
        None => field_error(field, text),
    }
}

fn parse_rule(
    namespace: &str,
    field: &str,
    peers_name: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, FieldError> {
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| parse_peer(namespace, &format!("{field}.{peers_name}[{i}]"), p))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| parse_port(&format!("{field}.ports[{i}]"), p))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Rule { peers, ports })
}

fn parse_peer(namespace: &str, field: &str, peer: &NetworkPolicyPeer) -> Result<Peer, FieldError> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err(field_error(
                field,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ));
        }
        let cidr = parse_cidr(&format!("{field}.ipBlock.cidr"), &block.cidr)?;
        let mut except = Vec::new();
        for (i, e) in block.except.iter().flatten().enumerate() {
            let f = format!("{field}.ipBlock.except[{i}]");
            let net = parse_cidr(&f, e)?;
            if !cidr.contains(&net) {
                return Err(field_error(f, format!("{e:?} is not within cidr {cidr}")));
            }
            except.push(net);
        }
        except.sort();
        except.dedup();
        return Ok(Peer::Block(IpBlock { cidr, except }));
    }
    let parse =
        |sub: &str, s| Selector::parse(s).map_err(|e| selector_error(&format!("{field}.{sub}"), e));
    match (&peer.namespace_selector, &peer.pod_selector) {
        (None, None) => Err(field_error(
            field,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        (None, Some(pods)) => Ok(Peer::Pods {
            namespaces: NamespaceScope::Own(namespace.to_string()),
            pods: parse("podSelector", pods)?,
        }),
        (Some(ns), pods) => Ok(Peer::Pods {
            namespaces: NamespaceScope::Selected(parse("namespaceSelector", ns)?),
            pods: match pods {
                Some(p) => parse("podSelector", p)?,
                None => Selector::everything(),
            },
        }),
    }
}

fn parse_cidr(field: &str, text: &str) -> Result<IpNet, FieldError> {
    let not_a_cidr = || field_error(field, format!("{text:?} is not a CIDR"));
    let (addr, prefix) = text.split_once('/').ok_or_else(not_a_cidr)?;
    // std's parser, not ipnet's: ipnet reads `010.0.0.0` as decimal, while such an address is
    // ambiguous (octal to some parsers) and the API rejects it in new objects. A rule with
    // one allows nothing, like any other part we cannot read (and pod IPs are read the same way).
    let addr: IpAddr = addr.parse().map_err(|_| {
        if addr
            .split('.')
            .any(|octet| octet.len() > 1 && octet.starts_with('0'))
        {
            field_error(
                field,
                format!(
                    "{text:?}: leading zeros in an IPv4 address are ambiguous (octal or decimal?)"
                ),
            )
        } else {
            not_a_cidr()
        }
    })?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        // Digits only, no leading zero: `+8` and `08` are not prefix lengths.
        .filter(|_| prefix.bytes().all(|b| b.is_ascii_digit()))
        .filter(|_| prefix == "0" || !prefix.starts_with('0'))
        .ok_or_else(not_a_cidr)?;
    let net = IpNet::new(addr, prefix).map_err(|_| not_a_cidr())?;
    // The API accepts host bits in older objects; what it means is the network.
    Ok(net.trunc())
}

fn parse_port(field: &str, port: &NetworkPolicyPort) -> Result<PortRule, FieldError> {
    let protocol = port
        .protocol
        .as_deref()
        .unwrap_or("TCP")
        .parse::<Protocol>()
        .map_err(|e| field_error(format!("{field}.protocol"), e))?;
    let number = |n: i32, f: &str| {
        u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
            field_error(
                format!("{field}.{f}"),
                format!("{n} is not a port (1-65535)"),
            )
        })
    };
    let port = match (&port.port, port.end_port) {
        (None, None) => PortMatch::AnyPort,
        (None, Some(_)) => {
            return Err(field_error(
                format!("{field}.endPort"),
                "endPort needs port",
            ))
        }
        (Some(IntOrString::Int(p)), end) => {
            let start = number(*p, "port")?;
            let end = match end {
                Some(e) => number(e, "endPort")?,
                None => start,
            };
            if end < start {
                return Err(field_error(
                    format!("{field}.endPort"),
                    format!("{end} is below port {start}"),
                ));
            }
            PortMatch::Range(start, end)
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(field_error(
                    format!("{field}.endPort"),
                    "endPort cannot be used with a named port",
                ));
            }
            if let Ok(n) = name.parse::<i32>() {
                // The API stores numeric strings as strings; treat them as the number.
                let p = number(n, "port")?;
                PortMatch::Range(p, p)
            } else if valid_port_name(name) {
                PortMatch::Named(name.clone())
            } else {
                return Err(field_error(
                    format!("{field}.port"),
                    format!("{name:?} is not a valid port name (1-15 lowercase letters, digits and '-', with a letter)"),
                ));
            }
        }
    };
    Ok(PortRule { protocol, port })
}

/// IANA_SVC_NAME, as the API validates it.
fn valid_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// One pod network attachment as CNI names it: `(CNI_CONTAINERID, CNI_IFNAME)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

/// What the CNI plugin told the agent about a pod's attachment on this node, before the kubelet
/// reports anything in the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub attachment: AttachmentKey,
    pub pod: PodKey,
    pub ips: Vec<IpAddr>,
    /// Host side of the pod's veth pair.
    pub host_veth: String,
}

/// The cluster index: everything policy decisions depend on, keyed for deterministic iteration.
///
/// Pods registered by the CNI plugin take their IPs from the latest registration: it is what the
/// pod's interface really has on this node now, while the API reports IPs only later (and, after
/// a sandbox restart, the old ones for a while). Without a registration the API's IPs count.
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub pods: BTreeMap<PodKey, PodInfo>,
    pub policies: BTreeMap<PolicyKey, PolicyInfo>,
    /// Live registrations per pod, oldest first.
    registrations: BTreeMap<PodKey, Vec<Registration>>,
    /// The API's IPs of registered pods (their `pods` entry holds the registered IPs).
    api_ips: BTreeMap<PodKey, Vec<IpAddr>>,
    /// Pod keys per node, so that a node's pods are found without a pass over every pod of the
    /// cluster (that pass, twice per sync, was most of an agent's CPU at 10k pods). Kept by
    /// `apply_pod`, `delete_pod` and `reset_pods`.
    by_node: BTreeMap<String, BTreeSet<PodKey>>,
    /// Pod keys per label `key=value` and per named port, so that a set's candidate pods are
    /// found without a pass over every pod of their namespaces (or of the cluster). Kept where
    /// `by_node` is.
    postings: PodPostings,
    /// What changed since [`Index::take_changes`] last ran (for the incremental compiler).
    changes: Changes,
}

/// Pods and namespaces that changed (added, updated, removed) since the last
/// [`Index::take_changes`]. Changes made through `Index`'s methods are recorded; writing the
/// public maps directly is not (the from-scratch `compile_node` does not care, as long as a
/// pod's node, labels and ports change only through `apply_pod`: `by_node` and the postings
/// follow them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub pods: BTreeSet<PodKey>,
    pub namespaces: BTreeSet<String>,
    /// A policy was added, changed or removed (the compiler looks at every policy of a local
    /// pod's namespace anyway; this is for what counts policies).
    pub policies: bool,
    /// A relist replaced a whole kind: treat everything as changed.
    pub everything: bool,
}

impl Index {
    /// Insert or replace; `false` when the index already held exactly this (an update that
    /// changed nothing policy looks at, e.g. a condition in its status).
    pub fn apply_namespace(&mut self, ns: NamespaceInfo) -> bool {
        if self.namespaces.get(&ns.name) == Some(&ns) {
            return false;
        }
        self.changes.namespaces.insert(ns.name.clone());
        self.namespaces.insert(ns.name.clone(), ns);
        true
    }

    pub fn delete_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.changes.namespaces.insert(name.to_string());
        }
    }

    /// What changed since the previous call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Insert or replace; `false` when nothing policy looks at changed.
    pub fn apply_pod(&mut self, mut pod: PodInfo) -> bool {
        if let Some(ips) = self.registered_ips(&pod.key) {
            self.api_ips
                .insert(pod.key.clone(), std::mem::replace(&mut pod.ips, ips));
        }
        if self.pods.get(&pod.key) == Some(&pod) {
            return false;
        }
        self.changes.pods.insert(pod.key.clone());
        if let Some(node) = &pod.node {
            self.by_node
                .entry(node.clone())
                .or_default()
                .insert(pod.key.clone());
        }
        let key = pod.key.clone();
        match self.pods.insert(key.clone(), pod) {
            Some(old) => {
                let new = &self.pods[&key];
                self.postings.replace(&old, new);
                if old.node != new.node {
                    self.forget_node(old.node.as_deref(), &key);
                }
            }
            None => self.postings.add(&self.pods[&key]),
        }
        true
    }

    pub fn delete_pod(&mut self, key: &PodKey) {
        if let Some(old) = self.pods.remove(key) {
            self.changes.pods.insert(key.clone());
            self.postings.remove(&old);
            self.forget_node(old.node.as_deref(), key);
        }
        self.api_ips.remove(key);
    }

    fn forget_node(&mut self, node: Option<&str>, key: &PodKey) {
        let Some(node) = node else { return };
        if let Some(keys) = self.by_node.get_mut(node) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// The IPs of the pod's latest registration, if it has one.
    fn registered_ips(&self, key: &PodKey) -> Option<Vec<IpAddr>> {
        self.registrations
            .get(key)
            .and_then(|regs| regs.last())
            .map(|r| r.ips.clone())
    }

    /// The live registration of an attachment.
    pub fn registration(&self, attachment: &AttachmentKey) -> Option<&Registration> {
        self.registrations
            .values()
            .flatten()
            .find(|r| &r.attachment == attachment)
    }

    /// Every live registration.
    pub fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.registrations.values().flatten()
    }

    /// Record a registration (replacing one for the same attachment); the pod, when indexed,
    /// takes its IPs. Returns whether the index changed.
    pub fn register(&mut self, registration: Registration) -> bool {
        if self.registration(&registration.attachment) == Some(&registration) {
            return false;
        }
        self.unregister(&registration.attachment);
        let key = registration.pod.clone();
        self.changes.pods.insert(key.clone());
        let regs = self.registrations.entry(key.clone()).or_default();
        let first = regs.is_empty();
        regs.push(registration);
        if let Some(pod) = self.pods.get_mut(&key) {
            let ips = self.registrations[&key].last().map(|r| r.ips.clone());
            let ips = ips.unwrap_or_default();
            let api = std::mem::replace(&mut pod.ips, ips);
            if first {
                self.api_ips.insert(key, api);
            }
        }
        true
    }

    /// Forget an attachment (CNI DEL). The pod goes back to its other registration's IPs, or
    /// to the API's. Returns whether it was known.
    pub fn unregister(&mut self, attachment: &AttachmentKey) -> bool {
        let Some(key) = self
            .registrations()
            .find(|r| &r.attachment == attachment)
            .map(|r| r.pod.clone())
        else {
            return false;
        };
        self.changes.pods.insert(key.clone());
        let regs = self.registrations.entry(key.clone()).or_default();
        regs.retain(|r| &r.attachment != attachment);
        let remaining = regs.last().map(|r| r.ips.clone());
        if regs.is_empty() {
            self.registrations.remove(&key);
        }
        match remaining {
            Some(ips) => {
                if let Some(pod) = self.pods.get_mut(&key) {
                    pod.ips = ips;
                }
            }
            None => {
                let api = self.api_ips.remove(&key);
                if let Some(pod) = self.pods.get_mut(&key) {
                    pod.ips = api.unwrap_or_default();
                }
            }
        }
        true
    }

    /// Insert or replace; `false` when nothing changed.
    pub fn apply_policy(&mut self, policy: PolicyInfo) -> bool {
        if self.policies.get(&policy.key) == Some(&policy) {
            return false;
        }
        self.changes.policies = true;
        self.policies.insert(policy.key.clone(), policy);
        true
    }

    pub fn delete_policy(&mut self, key: &PolicyKey) {
        if self.policies.remove(key).is_some() {
            self.changes.policies = true;
        }
    }

    /// Replace every namespace at once (a watch relisted them).
    pub fn reset_namespaces(&mut self, all: impl IntoIterator<Item = NamespaceInfo>) {
        self.namespaces = all.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.changes.everything = true;
    }

    pub fn reset_pods(&mut self, all: impl IntoIterator<Item = PodInfo>) {
        self.pods.clear();
        self.api_ips.clear();
        self.by_node.clear();
        self.postings.clear();
        self.changes.everything = true;
        for pod in all {
            self.apply_pod(pod);
        }
    }

    pub fn reset_policies(&mut self, all: impl IntoIterator<Item = PolicyInfo>) {
        self.policies = all.into_iter().map(|p| (p.key.clone(), p)).collect();
        self.changes.policies = true;
    }

    /// A namespace's labels; one not seen (yet) still carries its implicit name label.
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(ns) => ns.labels.clone(),
            None => [(NAMESPACE_NAME_LABEL.to_string(), name.to_string())].into(),
        }
    }

    pub fn namespace_matches(&self, scope: &NamespaceScope, namespace: &str) -> bool {
        match scope {
            NamespaceScope::Own(own) => own == namespace,
            NamespaceScope::Selected(sel) => match self.namespaces.get(namespace) {
                Some(ns) => sel.matches(&ns.labels),
                None => sel.matches(&self.namespace_labels(namespace)),
            },
        }
    }

    /// Does a pod peer (namespace scope AND pod selector) match this pod?
    pub fn pod_peer_matches(
        &self,
        namespaces: &NamespaceScope,
        pods: &Selector,
        pod: &PodInfo,
    ) -> bool {
        pod.owns_ips()
            && self.namespace_matches(namespaces, &pod.key.namespace)
            && pods.matches(&pod.labels)
    }

    /// The pods whose policy this node enforces: scheduled here, owning their IPs, with an IP.
    /// In key order, found through the per-node keys: the cost is the node's pods, not the
    /// cluster's.
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PodInfo> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|key| self.pods.get(key))
            .filter(move |p| p.node.as_deref() == Some(node) && p.owns_ips() && !p.ips.is_empty())
    }

    /// The pods by label and by named port (for finding a set's candidate members).
    pub fn postings(&self) -> &PodPostings {
        &self.postings
    }

    /// Policies in the pod's namespace that select it and isolate `direction`.
    pub fn isolating_policies(&self, pod: &PodInfo, direction: Direction) -> Vec<&PolicyInfo> {
        self.policies
            .range(PolicyKey::new(pod.key.namespace.clone(), String::new())..)
            .take_while(|(k, _)| k.namespace == pod.key.namespace)
            .map(|(_, p)| p)
            .filter(|p| p.rules(direction).is_some() && p.selects(pod))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::{add_policy, mk_namespace, mk_pod, three_namespaces};

    #[test]
    fn applying_what_the_index_holds_reports_no_change() {
        let mut index = three_namespaces();
        let pod = mk_pod("x/new", "node-1", &["10.244.1.77"], &[("pod", "new")]);
        assert!(index.apply_pod(pod.clone()), "a new pod is a change");
        assert!(!index.apply_pod(pod.clone()), "the same pod again is not");
        let mut relabelled = pod;
        relabelled.labels.insert("pod".into(), "other".into());
        assert!(index.apply_pod(relabelled), "a relabel is");

        let ns = mk_namespace("w", &[("team", "a")]);
        assert!(index.apply_namespace(ns.clone()));
        assert!(!index.apply_namespace(ns));

        add_policy(&mut index, "x", "deny", r#"{"podSelector": {}}"#);
        let policy = index.policies.values().next().cloned().expect("a policy");
        assert!(!index.apply_policy(policy.clone()));
        let mut changed = policy;
        changed.key.name = "deny-2".into();
        assert!(index.apply_policy(changed));
    }

    fn registration(container: &str, pod: &str, ip: &str) -> super::Registration {
        super::Registration {
            attachment: super::AttachmentKey {
                container_id: container.into(),
                ifname: "eth0".into(),
            },
            pod: crate::testutil::key(pod),
            ips: vec![ip.parse().expect("ip")],
            host_veth: format!("veth{container}"),
        }
    }

    fn ips_of(index: &super::Index, pod: &str) -> Vec<String> {
        index.pods[&crate::testutil::key(pod)]
            .ips
            .iter()
            .map(|ip| ip.to_string())
            .collect()
    }

    #[test]
    fn a_registration_gives_a_pod_its_ips_before_the_api_does() {
        let mut index = three_namespaces();
        // Scheduled, no IP in the API yet.
        assert!(index.apply_pod(mk_pod("x/new", "node-1", &[], &[("pod", "new")])));
        assert!(index.register(registration("c1", "x/new", "10.244.1.50")));
        assert_eq!(ips_of(&index, "x/new"), ["10.244.1.50"]);
        assert!(
            !index.register(registration("c1", "x/new", "10.244.1.50")),
            "same again"
        );
        // The kubelet reports the same IP later: nothing changes.
        assert!(!index.apply_pod(mk_pod(
            "x/new",
            "node-1",
            &["10.244.1.50"],
            &[("pod", "new")]
        )));
        // A relabel keeps the registered IP.
        assert!(index.apply_pod(mk_pod("x/new", "node-1", &[], &[("pod", "other")])));
        assert_eq!(ips_of(&index, "x/new"), ["10.244.1.50"]);
        // DEL: back to what the API says (nothing, in the last update).
        assert!(index.unregister(&registration("c1", "x/new", "10.244.1.50").attachment));
        assert!(ips_of(&index, "x/new").is_empty());
        assert!(!index.unregister(&registration("c1", "x/new", "10.244.1.50").attachment));
    }

    #[test]
    fn the_latest_registration_wins_over_stale_api_ips() {
        let mut index = three_namespaces();
        index.apply_pod(mk_pod("x/web", "node-1", &["10.244.1.60"], &[]));
        // A new sandbox gets a new IP while the API still shows the old one.
        index.register(registration("c2", "x/web", "10.244.1.61"));
        assert_eq!(ips_of(&index, "x/web"), ["10.244.1.61"]);
        index.apply_pod(mk_pod("x/web", "node-1", &["10.244.1.60"], &[]));
        assert_eq!(ips_of(&index, "x/web"), ["10.244.1.61"]);
        // A registration before the pod is indexed applies when it arrives.
        index.register(registration("c3", "y/late", "10.244.1.62"));
        index.apply_pod(mk_pod("y/late", "node-1", &[], &[]));
        assert_eq!(ips_of(&index, "y/late"), ["10.244.1.62"]);
        // A relist (what the API says) keeps registrations.
        index.reset_pods([
            mk_pod("x/web", "node-1", &["10.244.1.60"], &[]),
            mk_pod("y/late", "node-1", &[], &[]),
        ]);
        assert_eq!(ips_of(&index, "x/web"), ["10.244.1.61"]);
        // Unregistering the new sandbox goes back to the API's IP.
        index.unregister(&registration("c2", "x/web", "10.244.1.61").attachment);
        assert_eq!(ips_of(&index, "x/web"), ["10.244.1.60"]);
        assert_eq!(index.registrations().count(), 1);
    }

    /// `local_pods` answers from the per-node keys; it must always equal a pass over every pod.
    #[test]
    fn local_pods_follow_moves_deletes_resets_and_registrations() {
        use super::{Index, PodInfo};
        fn by_scan<'a>(index: &'a Index, node: &str) -> Vec<&'a PodInfo> {
            let all = index.pods.values();
            all.filter(|p| p.node.as_deref() == Some(node) && p.owns_ips() && !p.ips.is_empty())
                .collect()
        }
        let check = |index: &Index, step: &str| {
            for node in ["node-1", "node-2", "node-3"] {
                let fast: Vec<_> = index.local_pods(node).collect();
                assert_eq!(fast, by_scan(index, node), "{step}: {node}");
            }
        };
        let mut index = three_namespaces();
        check(&index, "start");
        index.apply_pod(mk_pod("x/m", "node-1", &["10.244.1.90"], &[]));
        check(&index, "added on node-1");
        // The same pod bound to another node (a new pod under an old name).
        index.apply_pod(mk_pod("x/m", "node-3", &["10.244.3.90"], &[]));
        check(&index, "moved to node-3");
        assert!(!index.local_pods("node-1").any(|p| p.key.name == "m"));
        let mut unbound = mk_pod("x/m", "node-3", &[], &[]);
        unbound.node = None;
        index.apply_pod(unbound);
        check(&index, "unbound");
        index.apply_pod(mk_pod("x/m", "node-2", &[], &[]));
        check(&index, "on node-2 without an IP yet");
        index.register(registration("c1", "x/m", "10.244.2.90"));
        check(&index, "registered (IP from CNI ADD)");
        assert!(index.local_pods("node-2").any(|p| p.key.name == "m"));
        index.delete_pod(&crate::testutil::key("x/m"));
        check(&index, "deleted");
        let rest: Vec<PodInfo> = index.pods.values().skip(1).cloned().collect();
        index.reset_pods(rest);
        check(&index, "relisted without the first pod");
        index.reset_pods(Vec::new());
        check(&index, "relisted empty");
    }

    #[test]
    fn cidrs_are_read_strictly_and_an_ambiguous_one_allows_nothing() {
        for good in ["10.0.0.0/24", "10.0.0.1/24", "fd00::/64", "0.0.0.0/0"] {
            assert!(super::parse_cidr("f", good).is_ok(), "{good}");
        }
        for bad in [
            "010.0.0.0/24",
            "10.0.0.0/33",
            "10.0.0.0",
            "10.0.0.0/024",
            "10.0.0.0/+8",
            "x/8",
            "fd00::/129",
        ] {
            let e = super::parse_cidr("spec.ingress[0].from[0].ipBlock.cidr", bad).unwrap_err();
            assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.cidr", "{bad}");
        }
        let e = super::parse_cidr("f", "010.0.0.0/24").unwrap_err();
        assert!(e.message.contains("leading zeros"), "{}", e.message);
    }
}
