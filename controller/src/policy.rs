//! The reference evaluator: NetworkPolicy v1 semantics written as directly as possible, answering
//! "is this connection allowed, and why". The compiler is checked against it (unit tests and the
//! differential test on the real kernel), so it stays simple rather than fast.

use std::fmt;
use std::net::IpAddr;

use crate::model::{
    Direction, Family, Index, Peer, PodInfo, PodKey, PolicyKey, PortMatch, PortRule, Protocol, Rule,
};

/// One side of a connection as policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub pod: &'a PodInfo,
    pub ip: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No policy isolates this pod in this direction.
    NotIsolated,
    /// Traffic between a pod and its own node is always allowed (and hostNetwork pods are node
    /// traffic: never selected by policy).
    NodeTraffic,
    AllowedBy {
        policy: PolicyKey,
        rule: usize,
    },
    /// Isolated, and no rule of these policies allows it.
    Denied {
        isolated_by: Vec<PolicyKey>,
    },
}

impl Decision {
    pub fn allows(&self) -> bool {
        !matches!(self, Decision::Denied { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub egress: Decision,
    pub ingress: Decision,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("pod {0} not found")]
    UnknownPod(PodKey),
    #[error("pod {pod} has no {family} address")]
    NoAddress { pod: PodKey, family: Family },
}

/// Is a new connection from `src` to `dst` on `protocol`/`port` over `family` allowed?
pub fn allowed(
    index: &Index,
    src: &PodKey,
    dst: &PodKey,
    protocol: Protocol,
    port: u16,
    family: Family,
) -> Result<Verdict, EvalError> {
    let endpoint = |key: &PodKey| -> Result<Endpoint<'_>, EvalError> {
        let pod = index
            .pods
            .get(key)
            .ok_or_else(|| EvalError::UnknownPod(key.clone()))?;
        let ip = pod.ip(family).ok_or_else(|| EvalError::NoAddress {
            pod: key.clone(),
            family,
        })?;
        Ok(Endpoint { pod, ip })
    };
    let (src, dst) = (endpoint(src)?, endpoint(dst)?);
    Ok(verdict(index, src, dst, protocol, port))
}

/// The verdict for two resolved endpoints.
pub fn verdict(
    index: &Index,
    src: Endpoint<'_>,
    dst: Endpoint<'_>,
    protocol: Protocol,
    port: u16,
) -> Verdict {
    let same_node = src.pod.node.is_some() && src.pod.node == dst.pod.node;
    if same_node && (src.pod.host_network || dst.pod.host_network) {
        return Verdict {
            egress: Decision::NodeTraffic,
            ingress: Decision::NodeTraffic,
        };
    }
    Verdict {
        egress: decide(index, src, dst, Direction::Egress, protocol, port),
        ingress: decide(index, dst, src, Direction::Ingress, protocol, port),
    }
}

/// The decision of `subject`'s policies about traffic with `peer` in `direction`. The
/// destination (for ports) is the peer for egress and the subject for ingress.
fn decide(
    index: &Index,
    subject: Endpoint<'_>,
    peer: Endpoint<'_>,
    direction: Direction,
    protocol: Protocol,
    port: u16,
) -> Decision {
    if subject.pod.host_network {
        return Decision::NodeTraffic;
    }
    let policies = index.isolating_policies(subject.pod, direction);
    if policies.is_empty() {
        return Decision::NotIsolated;
    }
    let destination = match direction {
        Direction::Egress => peer,
        Direction::Ingress => subject,
    };
    for policy in &policies {
        for (i, rule) in policy.rules(direction).unwrap_or(&[]).iter().enumerate() {
            // A rule we could not represent allows nothing.
            let Ok(rule) = rule else { continue };
            if rule_matches(index, rule, peer, destination, protocol, port) {
                return Decision::AllowedBy {
                    policy: policy.key.clone(),
                    rule: i,
                };
            }
        }
    }
    Decision::Denied {
        isolated_by: policies.iter().map(|p| p.key.clone()).collect(),
    }
}

fn rule_matches(
    index: &Index,
    rule: &Rule,
    peer: Endpoint<'_>,
    destination: Endpoint<'_>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let peer_ok = match &rule.peers {
        None => true,
        Some(peers) => peers.iter().any(|p| peer_matches(index, p, peer)),
    };
    let port_ok = match &rule.ports {
        None => true,
        Some(ports) => ports
            .iter()
            .any(|p| port_matches(p, destination, protocol, port)),
    };
    peer_ok && port_ok
}

pub fn peer_matches(index: &Index, peer: &Peer, endpoint: Endpoint<'_>) -> bool {
    match peer {
        Peer::Block(block) => block.contains(&endpoint.ip),
        Peer::Pods { namespaces, pods } => index.pod_peer_matches(namespaces, pods, endpoint.pod),
    }
}

fn port_matches(rule: &PortRule, destination: Endpoint<'_>, protocol: Protocol, port: u16) -> bool {
    if rule.protocol != protocol {
        return false;
    }
    match &rule.port {
        PortMatch::AnyPort => true,
        PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&port),
        // Named ports resolve on the destination pod; node traffic has no named ports.
        PortMatch::Named(name) => {
            destination.pod.owns_ips() && destination.pod.named_port(name, protocol) == Some(port)
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::NotIsolated => f.write_str("not isolated (no policy selects the pod)"),
            Decision::NodeTraffic => {
                f.write_str("node traffic (a pod and its own node, or a hostNetwork pod)")
            }
            Decision::AllowedBy { policy, rule } => {
                write!(f, "allowed by policy {policy}, rule {rule}")
            }
            Decision::Denied { isolated_by } => {
                let names: Vec<String> = isolated_by.iter().map(|k| k.to_string()).collect();
                write!(
                    f,
                    "denied: isolated by {} and no rule allows it",
                    names.join(", ")
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn unselected_pods_allow_everything() {
        let idx = three_namespaces();
        let v = allowed(
            &idx,
            &key("x/a"),
            &key("y/b"),
            Protocol::Tcp,
            80,
            Family::V4,
        )
        .unwrap();
        assert!(v.allowed());
        assert_eq!(v.ingress, Decision::NotIsolated);
    }

    #[test]
    fn default_deny_ingress_isolates_the_namespace_only() {
        let mut idx = three_namespaces();
        deny_ingress(&mut idx, "x");
        assert!(!ok(&idx, "y/a", "x/a", 80));
        assert!(!ok(&idx, "x/b", "x/a", 80));
        assert!(ok(&idx, "x/a", "y/a", 80), "egress is not isolated");
        let v = allowed(
            &idx,
            &key("y/a"),
            &key("x/a"),
            Protocol::Tcp,
            80,
            Family::V4,
        )
        .unwrap();
        assert_eq!(
            v.ingress,
            Decision::Denied {
                isolated_by: vec![key("x/deny")]
            }
        );
    }

    #[test]
    fn pod_selector_peer_means_the_policys_namespace() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}"#,
        );
        assert!(ok(&idx, "x/b", "x/a", 80));
        assert!(!ok(&idx, "y/b", "x/a", 80));
        assert!(!ok(&idx, "x/c", "x/a", 80));
    }

    #[test]
    fn namespace_and_pod_selectors_in_one_peer_are_anded() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                "podSelector": {"matchLabels": {"pod": "b"}}}]}]}"#,
        );
        assert!(ok(&idx, "y/b", "x/a", 80));
        assert!(ok(&idx, "z/b", "x/a", 80));
        assert!(!ok(&idx, "x/b", "x/a", 80));
        assert!(!ok(&idx, "y/c", "x/a", 80));
    }

    #[test]
    fn empty_namespace_selector_means_every_namespace() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}"#,
        );
        assert!(ok(&idx, "z/c", "x/a", 80));
    }

    #[test]
    fn named_port_resolves_per_destination_pod() {
        let mut idx = three_namespaces();
        set_named_port(&mut idx, "x/a", "web", 80);
        set_named_port(&mut idx, "x/b", "web", 81);
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]}"#,
        );
        assert!(ok(&idx, "y/a", "x/a", 80));
        assert!(!ok(&idx, "y/a", "x/a", 81));
        assert!(ok(&idx, "y/a", "x/b", 81));
        assert!(!ok(&idx, "y/a", "x/b", 80));
    }

    #[test]
    fn end_port_is_an_inclusive_range_and_protocol_must_match() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 90}, {"protocol": "UDP"}]}]}"#,
        );
        assert!(ok(&idx, "y/a", "x/a", 90));
        assert!(!ok(&idx, "y/a", "x/a", 91));
        let udp = allowed(
            &idx,
            &key("y/a"),
            &key("x/a"),
            Protocol::Udp,
            9999,
            Family::V4,
        )
        .unwrap();
        assert!(udp.allowed());
        let sctp = allowed(
            &idx,
            &key("y/a"),
            &key("x/a"),
            Protocol::Sctp,
            80,
            Family::V4,
        )
        .unwrap();
        assert!(!sctp.allowed(), "SCTP is not TCP");
    }

    #[test]
    fn ip_block_except_and_families() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}]}"#,
        );
        assert!(ok(&idx, "x/a", "y/a", 80)); // y/a is on node-1: 10.244.1.x
        assert!(!ok(&idx, "x/a", "y/b", 80)); // node-2: excepted
        let v6 = allowed(
            &idx,
            &key("x/a"),
            &key("y/a"),
            Protocol::Tcp,
            80,
            Family::V6,
        )
        .unwrap();
        assert!(!v6.allowed(), "an IPv4 block says nothing of IPv6");
    }

    #[test]
    fn egress_and_ingress_must_both_allow() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "out",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}"#,
        );
        add_policy(
            &mut idx,
            "y",
            "in",
            r#"{"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}"#,
        );
        assert!(ok(&idx, "x/a", "y/a", 80));
        assert!(!ok(&idx, "x/a", "y/b", 80), "client egress deny wins");
        assert!(!ok(&idx, "x/b", "y/a", 80), "server ingress deny wins");
    }

    #[test]
    fn finished_and_host_network_pods_match_no_selector() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}"#,
        );
        idx.pods.get_mut(&key("y/a")).unwrap().phase = crate::model::Phase::Succeeded;
        assert!(!ok(&idx, "y/a", "x/a", 80), "a finished pod owns no IP");
        add_host_pod(&mut idx, "node-2", "kube-system", "agent");
        assert!(
            !ok(&idx, "kube-system/agent", "x/a", 80),
            "remote host traffic is not a pod"
        );
    }

    #[test]
    fn a_pod_and_its_own_node_always_talk() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "deny",
            r#"{"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}"#,
        );
        add_host_pod(&mut idx, "node-1", "kube-system", "agent");
        assert!(ok(&idx, "kube-system/agent", "x/a", 80));
        assert!(ok(&idx, "x/a", "kube-system/agent", 80));
        let v = allowed(
            &idx,
            &key("kube-system/agent"),
            &key("x/a"),
            Protocol::Tcp,
            80,
            Family::V4,
        )
        .unwrap();
        assert_eq!(v.ingress, Decision::NodeTraffic);
    }

    #[test]
    fn a_broken_rule_allows_nothing_but_the_policy_still_isolates() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
                {"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]},
                {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}"#,
        );
        let p = &idx.policies[&key("x/p")];
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].field, "spec.ingress[0].from[0].ipBlock.cidr");
        assert!(ok(&idx, "x/b", "x/a", 80), "the good rule still works");
        assert!(
            !ok(&idx, "y/a", "x/a", 80),
            "the broken rule opened nothing"
        );
        assert!(ok(&idx, "y/a", "x/b", 80), "other pods are untouched");
    }
}
