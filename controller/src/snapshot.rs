//! Objects from YAML files: a snapshot (`kubectl get -o yaml` output, or a scenario file) turned
//! into a [`World`]: the index plus what the scenario format adds (nodes, their pod CIDRs and
//! addresses, and pod IPs assigned in document order where a file does not pin them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::model::{
    namespace_info, pod_info, policy_info, Family, Index, ObjectKey, PodInfo, PodKey,
};

pub const LAB_API_VERSION: &str = "lab.sluice.dev/v1";

/// A problem with one document, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DocError {
    pub field: String,
    pub message: String,
}

fn doc_error(field: impl Into<String>, message: impl Into<String>) -> DocError {
    DocError {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug)]
pub enum KubeObject {
    Node(Box<Node>),
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
}

impl KubeObject {
    pub fn kind(&self) -> &'static str {
        match self {
            KubeObject::Node(_) => "Node",
            KubeObject::Namespace(_) => "Namespace",
            KubeObject::Pod(_) => "Pod",
            KubeObject::NetworkPolicy(_) => "NetworkPolicy",
        }
    }
}

fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, DocError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        doc_error(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

/// A Kubernetes document, typed. Unknown kinds and wrong apiVersions are errors.
pub fn parse_object(value: &Value) -> Result<KubeObject, DocError> {
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let expect_version = |v: &str| {
        if api_version == v {
            Ok(())
        } else {
            Err(doc_error(
                "apiVersion",
                format!("{kind} needs apiVersion {v}, not {api_version:?}"),
            ))
        }
    };
    match kind {
        "Node" => {
            expect_version("v1")?;
            Ok(KubeObject::Node(Box::new(typed(value)?)))
        }
        "Namespace" => {
            expect_version("v1")?;
            Ok(KubeObject::Namespace(Box::new(typed(value)?)))
        }
        "Pod" => {
            expect_version("v1")?;
            Ok(KubeObject::Pod(Box::new(typed(value)?)))
        }
        "NetworkPolicy" => {
            expect_version("networking.k8s.io/v1")?;
            Ok(KubeObject::NetworkPolicy(Box::new(typed(value)?)))
        }
        "" => Err(doc_error("kind", "required")),
        other => Err(doc_error(
            "kind",
            format!("unsupported kind {other:?} (expected Node, Namespace, Pod or NetworkPolicy)"),
        )),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// 1-based, in order of first mention.
    pub number: u32,
    pub pod_cidrs: Vec<IpNet>,
    /// The node's own addresses (what hostNetwork pods use).
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    fn default_for(name: &str, number: u32) -> Self {
        let cidrs = [
            format!("10.244.{number}.0/24"),
            format!("fd00:10:244:{number:x}::/64"),
        ];
        let mut node = NodeInfo {
            name: name.to_string(),
            number,
            pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            addresses: vec![],
        };
        node.addresses = node.default_addresses();
        node
    }

    /// Underlay addresses for the lab: 198.18.0.N (a range reserved for tests) and
    /// fd00:198:18::N, in the families the node has pod CIDRs for.
    fn default_addresses(&self) -> Vec<IpAddr> {
        let families: BTreeSet<Family> = self
            .pod_cidrs
            .iter()
            .map(|c| Family::of(&c.addr()))
            .collect();
        let n = self.number;
        let mut out = Vec::new();
        if families.contains(&Family::V4) {
            out.push(IpAddr::from([198, 18, (n >> 8) as u8, (n & 0xff) as u8]));
        }
        if families.contains(&Family::V6) {
            if let Ok(ip) = format!("fd00:198:18::{n:x}").parse() {
                out.push(ip);
            }
        }
        out
    }
}

/// The index plus nodes and address assignment, as documents are applied in order.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub index: Index,
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Addresses handed out by the scenario rules (not pinned by the file), per pod.
    assigned: BTreeMap<PodKey, Vec<IpAddr>>,
}

impl World {
    fn node_entry(&mut self, name: &str) -> &mut NodeInfo {
        let number = self.nodes.len() as u32 + 1;
        self.nodes
            .entry(name.to_string())
            .or_insert_with(|| NodeInfo::default_for(name, number))
    }

    fn used_ips(&self, except: &PodKey) -> BTreeSet<IpAddr> {
        self.index
            .pods
            .values()
            .filter(|p| &p.key != except && !p.host_network)
            .flat_map(|p| p.ips.iter().copied())
            .collect()
    }

    /// Apply one object. Returns warnings (things applied fail-closed, e.g. a policy rule that
    /// cannot be represented).
    pub fn apply(&mut self, object: KubeObject) -> Result<Vec<String>, DocError> {
        let as_field = |e: crate::model::ObjectError| doc_error(e.error.field, e.error.message);
        match object {
            KubeObject::Node(node) => {
                let name = node
                    .metadata
                    .name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| doc_error("metadata.name", "required"))?;
                let spec = node.spec.clone().unwrap_or_default();
                let mut cidrs = Vec::new();
                let raw: Vec<String> = match (spec.pod_cidrs, spec.pod_cidr) {
                    (Some(list), _) if !list.is_empty() => list,
                    (_, Some(one)) => vec![one],
                    _ => vec![],
                };
                for (i, c) in raw.iter().enumerate() {
                    cidrs.push(c.parse::<IpNet>().map_err(|_| {
                        doc_error(
                            format!("spec.podCIDRs[{i}]"),
                            format!("{c:?} is not a CIDR"),
                        )
                    })?);
                }
                let mut addresses = Vec::new();
                for (i, a) in node
                    .status
                    .iter()
                    .flat_map(|s| s.addresses.iter().flatten())
                    .enumerate()
                {
                    if a.type_ == "InternalIP" {
                        addresses.push(a.address.parse::<IpAddr>().map_err(|_| {
                            doc_error(
                                format!("status.addresses[{i}].address"),
                                format!("{:?} is not an IP address", a.address),
                            )
                        })?);
                    }
                }
                let entry = self.node_entry(&name);
                if !cidrs.is_empty() {
                    entry.pod_cidrs = cidrs;
                }
                entry.addresses = if addresses.is_empty() {
                    entry.default_addresses()
                } else {
                    addresses
                };
                Ok(vec![])
            }
            KubeObject::Namespace(ns) => {
                self.index
                    .apply_namespace(namespace_info(&ns).map_err(as_field)?);
                Ok(vec![])
            }
            KubeObject::Pod(pod) => {
                let mut info = pod_info(&pod).map_err(as_field)?;
                let node = info
                    .node
                    .clone()
                    .ok_or_else(|| doc_error("spec.nodeName", "required"))?;
                self.node_entry(&node);
                if info.ips.is_empty() {
                    info.ips = self.assign_ips(&info, &node)?;
                    self.assigned.insert(info.key.clone(), info.ips.clone());
                } else {
                    self.assigned.remove(&info.key);
                }
                if pod.status.as_ref().and_then(|s| s.phase.as_ref()).is_none() {
                    // Scenario files default to Running.
                    info.phase = crate::model::Phase::Running;
                }
                self.index.apply_pod(info);
                Ok(vec![])
            }
            KubeObject::NetworkPolicy(policy) => {
                let info = policy_info(&policy).map_err(as_field)?;
                let warnings = info
                    .errors
                    .iter()
                    .map(|e| format!("NetworkPolicy {}: {e}: {}", info.key, e.consequence()))
                    .collect();
                self.index.apply_policy(info);
                Ok(warnings)
            }
        }
    }

    fn assign_ips(&self, pod: &PodInfo, node: &str) -> Result<Vec<IpAddr>, DocError> {
        let Some(n) = self.nodes.get(node) else {
            return Ok(vec![]);
        };
        if pod.host_network {
            return Ok(n.addresses.clone());
        }
        // Keep the address a pod already had (an update relabels, it does not restart).
        if let Some(prev) = self.assigned.get(&pod.key) {
            if self
                .index
                .pods
                .get(&pod.key)
                .and_then(|p| p.node.as_deref())
                == Some(node)
            {
                return Ok(prev.clone());
            }
        }
        let used = self.used_ips(&pod.key);
        let mut ips = Vec::new();
        for cidr in &n.pod_cidrs {
            // The first host address is the node's bridge (IPv6 `hosts()` includes the network
            // address itself, IPv4 does not).
            let free = cidr
                .hosts()
                .filter(|ip| *ip != cidr.network())
                .skip(1)
                .find(|ip| !used.contains(ip));
            match free {
                Some(ip) => ips.push(ip),
                None => {
                    return Err(doc_error(
                        "spec.nodeName",
                        format!("node {node} has no free address left in {cidr}"),
                    ))
                }
            }
        }
        Ok(ips)
    }

    /// Delete an object (a namespace takes its pods and policies with it, as the API does).
    pub fn delete(
        &mut self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), DocError> {
        let ns = || {
            namespace
                .filter(|n| !n.is_empty())
                .ok_or_else(|| doc_error("spec.namespace", format!("required to delete a {kind}")))
        };
        match kind {
            "Pod" => {
                let key = ObjectKey::new(ns()?, name);
                self.assigned.remove(&key);
                self.index.delete_pod(&key);
            }
            "NetworkPolicy" => self.index.delete_policy(&ObjectKey::new(ns()?, name)),
            "Namespace" => {
                self.index.delete_namespace(name);
                let pods: Vec<PodKey> = self
                    .index
                    .pods
                    .keys()
                    .filter(|k| k.namespace == name)
                    .cloned()
                    .collect();
                for k in pods {
                    self.assigned.remove(&k);
                    self.index.delete_pod(&k);
                }
                self.index.policies.retain(|k, _| k.namespace != name);
            }
            "Node" => {
                self.nodes.remove(name);
            }
            other => {
                return Err(doc_error(
                    "spec.kind",
                    format!(
                    "cannot delete kind {other:?} (expected Pod, NetworkPolicy, Namespace or Node)"
                ),
                ))
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: {message}")]
    Yaml {
        path: String,
        doc: usize,
        message: String,
    },
    #[error("{path}: document {doc} ({what}): {error}")]
    Document {
        path: String,
        doc: usize,
        what: String,
        error: DocError,
    },
}

/// Split a multi-document YAML file into JSON values, numbered from 1 as they appear (empty
/// documents keep their number but yield nothing).
pub fn yaml_documents(path: &str, text: &str) -> Result<Vec<(usize, Value)>, SnapshotError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value =
            <Value as serde::Deserialize>::deserialize(de).map_err(|e| SnapshotError::Yaml {
                path: path.to_string(),
                doc,
                message: e.to_string(),
            })?;
        if !value.is_null() {
            out.push((doc, value));
        }
    }
    Ok(out)
}

/// `Kind namespace/name` of a raw document, for messages.
pub fn describe_document(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("?");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    match (ns, name) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => kind.to_string(),
    }
}

/// Load a snapshot: every document applied in order (`List`s unpacked, lab `Delete`s applied,
/// lab `Probe`s ignored). Returns the world and the warnings.
pub fn load_snapshot(path: &str, text: &str) -> Result<(World, Vec<String>), SnapshotError> {
    let mut world = World::default();
    let mut warnings = Vec::new();
    for (doc, value) in yaml_documents(path, text)? {
        let items: Vec<Value> = if value.get("kind").and_then(Value::as_str) == Some("List") {
            value
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        } else {
            vec![value]
        };
        for value in items {
            let what = describe_document(&value);
            let fail = |error| SnapshotError::Document {
                path: path.to_string(),
                doc,
                what: what.clone(),
                error,
            };
            if value.get("apiVersion").and_then(Value::as_str) == Some(LAB_API_VERSION) {
                if value.get("kind").and_then(Value::as_str) == Some("Delete") {
                    let spec = value.get("spec");
                    let field = |f: &str| spec.and_then(|s| s.get(f)).and_then(Value::as_str);
                    let kind =
                        field("kind").ok_or_else(|| fail(doc_error("spec.kind", "required")))?;
                    let name =
                        field("name").ok_or_else(|| fail(doc_error("spec.name", "required")))?;
                    world.delete(kind, field("namespace"), name).map_err(fail)?;
                }
                continue;
            }
            let object = parse_object(&value).map_err(fail)?;
            warnings.extend(world.apply(object).map_err(fail)?);
        }
    }
    Ok((world, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {pod: a}}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: b}
spec: {nodeName: node-2, containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: c}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
"#;

    #[test]
    fn pods_get_addresses_in_document_order_after_the_bridge() {
        let (world, _) = load_snapshot("t.yaml", SMALL).unwrap();
        let ips = |k: &str| world.index.pods[&k.parse::<PodKey>().unwrap()].ips.clone();
        assert_eq!(
            ips("x/a"),
            vec![
                "10.244.1.2".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::2".parse().unwrap()
            ]
        );
        assert_eq!(ips("x/b")[0], "10.244.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(ips("x/c")[0], "10.244.1.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_relabelled_pod_keeps_its_address() {
        let text = format!(
            "{SMALL}---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: x, name: a, labels: {{pod: z}}}}\nspec: {{nodeName: node-1, containers: [{{name: c, image: i}}]}}\n"
        );
        let (world, _) = load_snapshot("t.yaml", &text).unwrap();
        let a = &world.index.pods[&"x/a".parse::<PodKey>().unwrap()];
        assert_eq!(a.ips[0], "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(a.labels["pod"], "z");
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x, name: a}\nspec: {nodeName: n, containers: [{name: c, ports: [{containerPort: many}]}]}\n";
        let err = load_snapshot("bad.yaml", text).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "bad.yaml: document 1 (Pod x/a): spec.containers[0].ports[0].containerPort:"
            ),
            "{err}"
        );
        let err = load_snapshot("bad.yaml", "apiVersion: v1\nkind: Secret\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind: unsupported kind \"Secret\""), "{err}");
    }

    #[test]
    fn deleting_a_namespace_takes_its_pods() {
        let text = format!("{SMALL}---\napiVersion: lab.sluice.dev/v1\nkind: Delete\nspec: {{kind: Namespace, name: x}}\n");
        let (world, _) = load_snapshot("t.yaml", &text).unwrap();
        assert!(world.index.pods.is_empty());
    }
}
