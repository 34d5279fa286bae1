//! Builders for tests of the pure core: a small cluster of hand-built objects.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::model::{
    policy_info, ContainerPort, Family, Index, NamespaceInfo, Phase, PodInfo, PodKey, Protocol,
    NAMESPACE_NAME_LABEL,
};
use crate::policy::allowed;

pub fn key(s: &str) -> PodKey {
    s.parse().expect("ns/name")
}

pub fn mk_namespace(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
    let mut l: crate::selector::Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.insert(NAMESPACE_NAME_LABEL.into(), name.into());
    NamespaceInfo {
        name: name.into(),
        labels: l,
    }
}

pub fn mk_pod(key_: &str, node: &str, ips: &[&str], labels: &[(&str, &str)]) -> PodInfo {
    let ports = [80u16, 81]
        .iter()
        .flat_map(|p| {
            Protocol::ALL.into_iter().map(move |proto| ContainerPort {
                name: Some(format!("serve-{p}-{}", proto.nft_name())),
                port: *p,
                protocol: proto,
            })
        })
        .collect();
    PodInfo {
        key: key(key_),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        node: Some(node.into()),
        host_network: false,
        phase: Phase::Running,
        ips: ips
            .iter()
            .map(|i| i.parse::<IpAddr>().expect("ip"))
            .collect(),
        ports,
    }
}

/// Namespaces x, y, z (labelled ns=<name>), pods a and c on node-1, b on node-2, dual-stack.
pub fn three_namespaces() -> Index {
    let mut idx = Index::default();
    let mut next = [1u8, 1u8];
    for ns in ["x", "y", "z"] {
        idx.apply_namespace(mk_namespace(ns, &[("ns", ns)]));
        for pod in ["a", "b", "c"] {
            let n = if pod == "b" { 2 } else { 1 };
            next[n - 1] += 1;
            let host = next[n - 1];
            let v4 = format!("10.244.{n}.{host}");
            let v6 = format!("fd00:10:244:{n}::{host}");
            idx.apply_pod(mk_pod(
                &format!("{ns}/{pod}"),
                &format!("node-{n}"),
                &[&v4, &v6],
                &[("pod", pod)],
            ));
        }
    }
    idx
}

pub fn add_host_pod(idx: &mut Index, node: &str, ns: &str, name: &str) {
    let n = node.trim_start_matches("node-");
    let mut pod = mk_pod(
        &format!("{ns}/{name}"),
        node,
        &[&format!("198.18.0.{n}"), &format!("fd00:198:18::{n}")],
        &[],
    );
    pod.host_network = true;
    idx.apply_pod(pod);
}

pub fn add_policy(idx: &mut Index, ns: &str, name: &str, spec_json: &str) {
    let policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": serde_json::from_str::<serde_json::Value>(spec_json).expect("spec json"),
    }))
    .expect("policy");
    idx.apply_policy(policy_info(&policy).expect("policy info"));
}

/// Policy `deny` in `ns`: every pod of it isolated for ingress, nothing allowed.
pub fn deny_ingress(idx: &mut Index, ns: &str) {
    add_policy(idx, ns, "deny", r#"{"podSelector": {}, "ingress": []}"#);
}

pub fn set_named_port(idx: &mut Index, pod: &str, name: &str, port: u16) {
    // Through apply_pod: the index's named-port postings follow a pod's ports.
    let mut p = idx.pods.get(&key(pod)).expect("pod").clone();
    p.ports.retain(|c| c.name.as_deref() != Some(name));
    p.ports.push(ContainerPort {
        name: Some(name.into()),
        port,
        protocol: Protocol::Tcp,
    });
    idx.apply_pod(p);
}

/// TCP over IPv4, allowed?
pub fn ok(idx: &Index, from: &str, to: &str, port: u16) -> bool {
    allowed(idx, &key(from), &key(to), Protocol::Tcp, port, Family::V4)
        .expect("evaluate")
        .allowed()
}
