//! What a compiled ruleset does to the first packet of a connection: an interpreter of the IR
//! with nftables' semantics for the chains sluice emits. The lab uses it where the kernel cannot
//! carry a probe (no SCTP sockets), and tests use it to check the compiler against the reference
//! evaluator on many random clusters without a kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::compile::{Action, ChainKind, Element, Match, Ruleset, SetKind, Side};
use crate::model::{Family, Index, PodInfo, PodKey, Protocol};

/// The first packet of a new connection.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub dport: u16,
}

enum Outcome {
    Accept,
    Drop,
    /// Fell off the end of a non-base chain: back to the caller.
    Continue,
}

fn set_contains(rs: &Ruleset, set: &str, f: impl Fn(&Element) -> bool) -> bool {
    rs.sets.get(set).is_some_and(|s| s.elements.iter().any(f))
}

fn matches(rs: &Ruleset, m: &Match, p: &Packet) -> bool {
    let addr = |side: Side| match side {
        Side::Source => p.src,
        Side::Destination => p.dst,
    };
    match m {
        // Only the first packet of TCP, UDP and SCTP connections is simulated.
        Match::Established | Match::NeighborDiscovery => false,
        Match::Protocol(proto) => *proto == p.protocol,
        Match::Dport(lo, hi) => (*lo..=*hi).contains(&p.dport),
        Match::InSet { side, family, set } => {
            let ip = addr(*side);
            Family::of(&ip) == *family
                && set_contains(rs, set, |e| match e {
                    Element::Addr(a) => *a == ip,
                    Element::Range(a, b) => *a <= ip && ip <= *b,
                    _ => false,
                })
        }
        Match::DestinationPortInSet { family, set } => {
            Family::of(&p.dst) == *family
                && set_contains(
                    rs,
                    set,
                    |e| matches!(e, Element::AddrPort(a, port) if *a == p.dst && *port == p.dport),
                )
        }
    }
}

fn run_chain(rs: &Ruleset, name: &str, p: &Packet, depth: usize) -> Outcome {
    let Some(chain) = rs.chains.get(name) else {
        // A jump to a missing chain would have been rejected by nft; treat as drop.
        return Outcome::Drop;
    };
    if depth > 16 {
        return Outcome::Drop;
    }
    for rule in &chain.rules {
        if !rule.matches.iter().all(|m| matches(rs, m, p)) {
            continue;
        }
        let next = match &rule.action {
            Action::Accept => return Outcome::Accept,
            Action::CountedDrop => return Outcome::Drop,
            // Counting into a pod's drop counter has no verdict: the next rule decides.
            Action::CountInto { .. } => Outcome::Continue,
            Action::Jump(target) => run_chain(rs, target, p, depth + 1),
            Action::Dispatch { side, family, map } => {
                let ip = match side {
                    Side::Source => p.src,
                    Side::Destination => p.dst,
                };
                if Family::of(&ip) != *family {
                    continue;
                }
                let target = rs.sets.get(map).and_then(|s| {
                    debug_assert!(matches!(s.kind, SetKind::Dispatch(_)));
                    s.elements.iter().find_map(|e| match e {
                        Element::Jump(a, chain) if *a == ip => Some(chain.clone()),
                        _ => None,
                    })
                });
                match target {
                    Some(chain) => run_chain(rs, &chain, p, depth + 1),
                    None => Outcome::Continue,
                }
            }
        };
        match next {
            Outcome::Continue => {}
            verdict => return verdict,
        }
    }
    Outcome::Continue
}

/// Does the node's forward hook let this packet through? Base chains run in priority order; an
/// accept ends one base chain and the packet goes on to the next; a drop is final.
pub fn forward_accepts(rs: &Ruleset, p: &Packet) -> bool {
    let mut bases: Vec<(i32, &String)> = rs
        .chains
        .iter()
        .filter_map(|(name, c)| match c.kind {
            ChainKind::Base { priority } => Some((priority, name)),
            _ => None,
        })
        .collect();
    bases.sort();
    bases
        .into_iter()
        .all(|(_, name)| !matches!(run_chain(rs, name, p, 0), Outcome::Drop))
}

/// Would a new connection from `src` to `dst` get through the nodes' compiled rulesets? Models
/// which hooks the packet meets: the forward hook of the source pod's node and of the
/// destination pod's node (once if they are the same node); traffic from or to a node itself
/// (hostNetwork pods) passes output/input instead, which sluice leaves alone.
pub fn connection_allowed(
    index: &Index,
    rulesets: &BTreeMap<String, Ruleset>,
    src: &PodKey,
    dst: &PodKey,
    protocol: Protocol,
    port: u16,
    family: Family,
) -> Option<bool> {
    let src: &PodInfo = index.pods.get(src)?;
    let dst: &PodInfo = index.pods.get(dst)?;
    let packet = Packet {
        src: src.ip(family)?,
        dst: dst.ip(family)?,
        protocol,
        dport: port,
    };
    let mut nodes: Vec<&str> = Vec::new();
    let same_node = src.node.is_some() && src.node == dst.node;
    // The source pod's node forwards it, unless the destination is that node itself.
    let to_own_node = same_node && dst.host_network;
    let leaves_through_forward = !src.host_network && !to_own_node;
    if leaves_through_forward {
        nodes.extend(src.node.as_deref());
    }
    if !dst.host_network && !same_node {
        nodes.extend(dst.node.as_deref());
    }
    Some(nodes.into_iter().all(|n| match rulesets.get(n) {
        Some(rs) => forward_accepts(rs, &packet),
        None => true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_node;
    use crate::model::Protocol;
    use crate::policy::allowed;
    use crate::testutil::*;

    fn rulesets(idx: &Index) -> BTreeMap<String, Ruleset> {
        ["node-1", "node-2"]
            .into_iter()
            .map(|n| (n.to_string(), compile_node(idx, n).ruleset))
            .collect()
    }

    /// Every pair, both families, a few ports and protocols: compiled == evaluated.
    fn assert_agrees(idx: &Index) {
        let rs = rulesets(idx);
        let keys: Vec<PodKey> = idx.pods.keys().cloned().collect();
        for s in &keys {
            for d in &keys {
                if s == d {
                    continue;
                }
                for proto in Protocol::ALL {
                    for port in [80, 81, 9000] {
                        for family in Family::ALL {
                            let want = allowed(idx, s, d, proto, port, family).unwrap().allowed();
                            let got =
                                connection_allowed(idx, &rs, s, d, proto, port, family).unwrap();
                            assert_eq!(got, want, "{s} -> {d} {proto}/{port} {family}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn compiled_rules_agree_with_the_evaluator_on_mixed_policies() {
        let mut idx = three_namespaces();
        add_host_pod(&mut idx, "node-1", "kube-system", "agent");
        add_policy(
            &mut idx,
            "x",
            "deny",
            r#"{"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}"#,
        );
        add_policy(
            &mut idx,
            "x",
            "web",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y"]}]}}],
                             "ports": [{"port": "serve-80-tcp"}, {"protocol": "UDP", "port": 81, "endPort": 9000}]}],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]},
                           {"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"protocol": "SCTP"}]}]}"#,
        );
        add_policy(
            &mut idx,
            "y",
            "from-x-a",
            r#"{"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}"#,
        );
        assert_agrees(&idx);
    }

    #[test]
    fn counting_into_pod_counters_changes_no_verdict() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "deny",
            r#"{"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{"ports": [{"port": 80}]}]}"#,
        );
        let with = rulesets(&idx);
        let mut without = with.clone();
        let mut counted = 0;
        for rs in without.values_mut() {
            for chain in rs.chains.values_mut() {
                let n = chain.rules.len();
                chain
                    .rules
                    .retain(|r| !matches!(r.action, Action::CountInto { .. }));
                counted += n - chain.rules.len();
            }
        }
        assert_eq!(
            counted, 8,
            "two nodes, each one ingress and one egress group, two families"
        );
        let keys: Vec<PodKey> = idx.pods.keys().cloned().collect();
        for s in &keys {
            for d in &keys {
                for port in [80, 81] {
                    for family in Family::ALL {
                        let a = connection_allowed(&idx, &with, s, d, Protocol::Tcp, port, family);
                        let b =
                            connection_allowed(&idx, &without, s, d, Protocol::Tcp, port, family);
                        assert_eq!(a, b, "{s} -> {d} {port} {family}");
                    }
                }
            }
        }
        assert_agrees(&idx);
    }
}
