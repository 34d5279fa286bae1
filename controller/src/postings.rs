//! Pods by what a set can ask of them: by label `key=value` and by declared named port. A peer's
//! podSelector or a named-port set then visits only the pods that may be members, not every pod
//! of its namespaces (or, for a named port, of the cluster): a cold compile's cost follows the
//! elements it produces, not the cluster's size.
//!
//! The postings only narrow the pods down: whoever reads them still checks each candidate with
//! `Selector::matches` (or `PodInfo::named_port`), so what is a member never depends on them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::model::{PodInfo, PodKey, Protocol};
use crate::selector::{Requirement, Selector};

/// The pods of one label `key=value` or one named port. A pod's entries share one key (an
/// `Arc`): a pod is in several postings, and a pointer per entry costs less than a copy of its
/// namespace and name.
pub type Posting = BTreeSet<Arc<PodKey>>;

/// Pod keys per label `key=value` and per `(port name, protocol)`. Kept by `Index` next to its
/// pods (`apply_pod`, `delete_pod`, `reset_pods`); an empty posting is removed, so postings built
/// step by step equal postings built at once from the same pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPostings {
    /// label key -> value -> the pods carrying `key=value`.
    by_label: BTreeMap<String, BTreeMap<String, Posting>>,
    /// port name -> protocol -> the pods declaring a container port of that name and protocol.
    by_named_port: BTreeMap<String, BTreeMap<Protocol, Posting>>,
}

impl PodPostings {
    pub fn add(&mut self, pod: &PodInfo) {
        let key = Arc::new(pod.key.clone());
        for (k, v) in &pod.labels {
            self.by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .insert(key.clone());
        }
        for port in &pod.ports {
            if let Some(name) = &port.name {
                self.by_named_port
                    .entry(name.clone())
                    .or_default()
                    .entry(port.protocol)
                    .or_default()
                    .insert(key.clone());
            }
        }
    }

    /// Forget `pod` as it was indexed (its old labels and ports).
    pub fn remove(&mut self, pod: &PodInfo) {
        for (k, v) in &pod.labels {
            forget(&mut self.by_label, k, v, &pod.key);
        }
        for port in &pod.ports {
            if let Some(name) = &port.name {
                forget(&mut self.by_named_port, name, &port.protocol, &pod.key);
            }
        }
    }

    /// `old` was replaced by `new` (same key): move the postings that differ.
    pub fn replace(&mut self, old: &PodInfo, new: &PodInfo) {
        if old.labels != new.labels || old.ports != new.ports {
            self.remove(old);
            self.add(new);
        }
    }

    pub fn clear(&mut self) {
        self.by_label.clear();
        self.by_named_port.clear();
    }

    /// Postings whose union holds every pod `selector` can match (each pod in at most one of
    /// them), or `None` when no term of the selector names pods (only `NotIn`/`DoesNotExist`,
    /// or no terms): then every pod is a candidate. Of the `In`/`Exists` terms, the one with
    /// the fewest pods in the cluster is taken. (Whether they are worth it: [`worth_it`].)
    pub fn selecting(&self, selector: &Selector) -> Option<Vec<&Posting>> {
        let mut best: Option<(usize, Vec<&Posting>)> = None;
        for requirement in selector.requirements() {
            let values = |k: &str| self.by_label.get(k);
            let postings: Vec<&Posting> = match requirement {
                // A pod has one value per key: the values' postings are disjoint.
                Requirement::In(k, vs) => vs
                    .iter()
                    .filter_map(|v| values(k).and_then(|by_value| by_value.get(v)))
                    .collect(),
                Requirement::Exists(k) => values(k).into_iter().flat_map(|m| m.values()).collect(),
                Requirement::NotIn(..) | Requirement::DoesNotExist(_) => continue,
            };
            let size = postings.iter().map(|p| p.len()).sum();
            if best.as_ref().is_none_or(|(smallest, _)| size < *smallest) {
                best = Some((size, postings));
            }
        }
        best.map(|(_, postings)| postings)
    }

    /// The pods declaring a port `name` of `protocol` (`None` when none does).
    pub fn declaring(&self, name: &str, protocol: Protocol) -> Option<&Posting> {
        self.by_named_port
            .get(name)
            .and_then(|by_protocol| by_protocol.get(&protocol))
    }
}

/// Each pod of a posting is found by a lookup in the index's pods, which costs several times
/// what a visit of the next pod in a pass over them costs (key compares through the heap,
/// against walking one ordered map). So postings pay only when they hold a small part of the
/// pods they stand in for: by default ([`SHARE`]) a posting with more than 1/8 of the cluster's
/// pods (a named port every app declares, a label every pod carries) is passed over.
pub fn worth_it(postings: &[&Posting], pods: usize, share: usize) -> bool {
    postings.iter().map(|p| p.len()).sum::<usize>() * share <= pods
}

/// Postings are used when they hold at most 1/`SHARE` of the pods ([`worth_it`]).
pub const SHARE: usize = 8;

fn forget<V: Ord>(
    postings: &mut BTreeMap<String, BTreeMap<V, Posting>>,
    outer: &str,
    inner: &V,
    pod: &PodKey,
) {
    let Some(by_inner) = postings.get_mut(outer) else {
        return;
    };
    if let Some(keys) = by_inner.get_mut(inner) {
        keys.remove(pod);
        if keys.is_empty() {
            by_inner.remove(inner);
        }
    }
    if by_inner.is_empty() {
        postings.remove(outer);
    }
}

/// The keys of a posting (or any ordered pod keys) in one namespace: keys sort by namespace,
/// then name.
pub fn in_namespace<'a>(
    posting: &'a Posting,
    namespace: &str,
) -> impl Iterator<Item = &'a PodKey> + 'a {
    let namespace = namespace.to_string();
    posting
        .range::<PodKey, _>(PodKey::new(namespace.clone(), String::new())..)
        .map(|key| key.as_ref())
        .take_while(move |k| k.namespace == namespace)
}

/// The keys of a posting in the namespaces `wanted` accepts, asking once per namespace present
/// in the posting and jumping over the others' pods: the cost is the namespaces in the posting
/// and the keys returned, not the posting's size.
pub fn in_namespaces(posting: &Posting, mut wanted: impl FnMut(&str) -> bool) -> Vec<&PodKey> {
    let mut out = Vec::new();
    let mut next = posting.first();
    while let Some(first) = next {
        let namespace = first.namespace.as_str();
        if wanted(namespace) {
            out.extend(in_namespace(posting, namespace));
        }
        // "ns\0" sorts after every name in "ns" and before any other namespace.
        let after = PodKey::new(format!("{namespace}\0"), String::new());
        next = posting.range::<PodKey, _>(after..).next();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerPort, Index};
    use crate::testutil::{key, mk_pod, three_namespaces};

    fn keys(it: impl IntoIterator<Item = impl std::fmt::Display>) -> Vec<String> {
        it.into_iter().map(|k| k.to_string()).collect()
    }

    fn selector(labels: &[(&str, &str)]) -> Selector {
        Selector::from_labels(
            &labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The index's postings always equal postings built at once from its pods.
    fn check(index: &Index, step: &str) {
        let mut fresh = PodPostings::default();
        for pod in index.pods.values() {
            fresh.add(pod);
        }
        assert_eq!(index.postings(), &fresh, "{step}");
    }

    fn pods_with(index: &Index, label: (&str, &str)) -> Vec<String> {
        let postings = index.postings().selecting(&selector(&[label]));
        keys(postings.into_iter().flatten().flatten())
    }

    #[test]
    fn postings_follow_relabels_port_changes_deletes_and_relists() {
        let mut index = three_namespaces();
        check(&index, "start");
        assert_eq!(pods_with(&index, ("pod", "a")), ["x/a", "y/a", "z/a"]);

        let mut relabelled = index.pods[&key("x/a")].clone();
        relabelled.labels.insert("pod".into(), "b".into());
        relabelled.labels.insert("tier".into(), "web".into());
        index.apply_pod(relabelled);
        check(&index, "relabelled");
        assert_eq!(pods_with(&index, ("pod", "a")), ["y/a", "z/a"]);
        assert_eq!(
            pods_with(&index, ("pod", "b")),
            ["x/a", "x/b", "y/b", "z/b"]
        );
        assert_eq!(pods_with(&index, ("tier", "web")), ["x/a"]);

        let mut unported = index.pods[&key("y/b")].clone();
        unported.ports = vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }];
        index.apply_pod(unported);
        check(&index, "ports changed");
        assert_eq!(
            keys(index.postings().declaring("http", Protocol::Tcp).unwrap()),
            ["y/b"]
        );
        assert!(!keys(
            index
                .postings()
                .declaring("serve-80-tcp", Protocol::Tcp)
                .unwrap()
        )
        .contains(&"y/b".to_string()));
        assert!(index.postings().declaring("http", Protocol::Udp).is_none());

        // A pod of the same name in another namespace is another pod.
        index.delete_pod(&key("x/a"));
        index.apply_pod(mk_pod(
            "w/a",
            "node-1",
            &["10.244.1.99"],
            &[("tier", "web")],
        ));
        check(&index, "deleted, and one in another namespace");
        assert_eq!(pods_with(&index, ("tier", "web")), ["w/a"]);

        let rest: Vec<PodInfo> = index.pods.values().skip(2).cloned().collect();
        index.reset_pods(rest);
        check(&index, "relisted without two pods");
        index.reset_pods(Vec::new());
        check(&index, "relisted empty");
        assert_eq!(index.postings(), &PodPostings::default());
    }

    #[test]
    fn the_smallest_term_is_taken_and_terms_without_pods_give_none() {
        let mut index = Index::default();
        for (name, app, tier) in [
            ("a", "web", "front"),
            ("b", "web", "back"),
            ("c", "db", "back"),
        ] {
            let pod = mk_pod(
                &format!("x/{name}"),
                "node-1",
                &[],
                &[("app", app), ("tier", tier)],
            );
            index.apply_pod(pod);
        }
        let postings = index.postings();
        let take = |s: &Selector| postings.selecting(s).map(|p| keys(p.into_iter().flatten()));
        assert_eq!(
            take(&selector(&[("app", "web"), ("tier", "front")])).unwrap(),
            ["x/a"]
        );
        assert_eq!(
            take(&selector(&[("app", "nothing")])).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(take(&Selector::everything()), None);
    }

    #[test]
    fn in_namespaces_asks_once_per_namespace_and_keeps_order() {
        let posting: Posting = ["a/1", "a/2", "b/1", "bb/1", "c/1", "c/2"]
            .into_iter()
            .map(|k| Arc::new(key(k)))
            .collect();
        let mut asked = Vec::new();
        let got = in_namespaces(&posting, |ns| {
            asked.push(ns.to_string());
            ns != "b"
        });
        assert_eq!(keys(got), ["a/1", "a/2", "bb/1", "c/1", "c/2"]);
        assert_eq!(asked, ["a", "b", "bb", "c"]);
        assert_eq!(keys(in_namespace(&posting, "b")), ["b/1"]);
    }
}
