//! The agent's compiler: the same ruleset as [`compile_node`](crate::compile::compile_node),
//! without recomputing every pod set on every change.
//!
//! The sets whose members are pods (peers, named ports) hold most of a node's elements: tens of
//! thousands in a 10k-pod cluster, and recomputing them all took most of a sync. This compiler
//! keeps each such set with the elements every member pod contributes, and after a change
//! re-evaluates only the pods (and the namespaces) that changed, against each kept set. A set
//! that did not change stays the same allocation, so the diff against what was last applied
//! skips it without looking at its elements. The rest of the ruleset (group chains, dispatch
//! maps, policy chains, ipBlocks) is small and still built each time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::compile::{compile_with, pods_in, Compiled, Element, FromScratch, PodSetKey, SetSource};
use crate::model::{Changes, Index, PodKey};

/// One kept pod set: its elements, with who contributed each (a pod may share an IP with a
/// finished pod, so elements are counted).
#[derive(Default)]
struct Kept {
    by_pod: BTreeMap<PodKey, Vec<Element>>,
    counts: BTreeMap<Element, u32>,
    elements: Arc<BTreeSet<Element>>,
    /// Asked for by the latest compilation; the others are dropped after it.
    used: bool,
}

impl Kept {
    /// A set kept from its members' contributions (none empty), built at once: a cold start
    /// builds every set this way, and sorting once is cheaper than inserting one by one.
    fn of(contributions: Vec<(PodKey, Vec<Element>)>) -> Self {
        let mut all: Vec<Element> = contributions
            .iter()
            .flat_map(|(_, c)| c.iter().cloned())
            .collect();
        all.sort_unstable();
        let mut counts: Vec<(Element, u32)> = Vec::with_capacity(all.len());
        for e in all {
            match counts.last_mut() {
                Some((last, n)) if *last == e => *n += 1,
                _ => counts.push((e, 1)),
            }
        }
        Kept {
            elements: Arc::new(counts.iter().map(|(e, _)| e.clone()).collect()),
            counts: counts.into_iter().collect(),
            by_pod: contributions.into_iter().collect(),
            used: true,
        }
    }

    /// Record what `pod` contributes now (nothing: not a member).
    fn update(&mut self, pod: &PodKey, now: Vec<Element>) {
        let before = if now.is_empty() {
            self.by_pod.remove(pod)
        } else {
            self.by_pod.insert(pod.clone(), now.clone())
        }
        .unwrap_or_default();
        if before == now {
            return;
        }
        // Copies the set only if the last applied ruleset still shares it.
        let elements = Arc::make_mut(&mut self.elements);
        for e in before {
            if let Some(n) = self.counts.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&e);
                    elements.remove(&e);
                }
            }
        }
        for e in now {
            let n = self.counts.entry(e.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                elements.insert(e);
            }
        }
    }
}

/// Compiles one node's ruleset again and again, keeping the pod sets between compilations.
#[derive(Default)]
pub struct Compiler {
    kept: BTreeMap<PodSetKey, Kept>,
}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget every kept set: the next compilation computes all of them from scratch.
    pub fn reset(&mut self) {
        self.kept.clear();
    }

    /// The ruleset of `node` for the index as it is now. `changes` must be everything that
    /// changed in the index since the previous call ([`Index::take_changes`]).
    pub fn compile(&mut self, index: &Index, node: &str, changes: &Changes) -> Compiled {
        if changes.everything {
            self.kept.clear();
        }
        self.apply_changes(index, changes);
        for kept in self.kept.values_mut() {
            kept.used = false;
        }
        let mut source = KeptSource {
            index,
            kept: &mut self.kept,
            fresh: None,
        };
        let compiled = compile_with(index, node, &mut source);
        self.kept.retain(|_, k| k.used);
        compiled
    }

    fn apply_changes(&mut self, index: &Index, changes: &Changes) {
        if self.kept.is_empty() {
            return;
        }
        // A namespace's labels decide namespaceSelector peers for every pod in it.
        for namespace in &changes.namespaces {
            let pods: Vec<_> = pods_in(index, namespace).collect();
            for (key, kept) in &mut self.kept {
                if key.depends_on_namespace_labels() {
                    for pod in &pods {
                        kept.update(&pod.key, key.contribution(index, pod));
                    }
                }
            }
        }
        for pod_key in &changes.pods {
            let pod = index.pods.get(pod_key);
            for (key, kept) in &mut self.kept {
                let now = pod.map(|p| key.contribution(index, p)).unwrap_or_default();
                kept.update(pod_key, now);
            }
        }
    }
}

/// Kept sets for the compiler; a set asked for the first time is computed from scratch.
struct KeptSource<'k, 'i> {
    index: &'i Index,
    kept: &'k mut BTreeMap<PodSetKey, Kept>,
    /// Built on the first miss of a compilation (it groups every pod by namespace).
    fresh: Option<FromScratch<'i>>,
}

impl SetSource for KeptSource<'_, '_> {
    fn elements(&mut self, key: &PodSetKey) -> Arc<BTreeSet<Element>> {
        if let Some(kept) = self.kept.get_mut(key) {
            kept.used = true;
            return kept.elements.clone();
        }
        let index = self.index;
        let fresh = self.fresh.get_or_insert_with(|| FromScratch::new(index));
        let contributions = fresh.contributions(key).into_iter();
        let kept = Kept::of(contributions.map(|(pod, c)| (pod.key.clone(), c)).collect());
        let elements = kept.elements.clone();
        self.kept.insert(key.clone(), kept);
        elements
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_node;
    use crate::model::{AttachmentKey, ContainerPort, Phase, Protocol, Registration};
    use crate::testutil::{add_policy, key, mk_namespace, mk_pod};

    /// xorshift64*: a seeded, dependency-free source of choices.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    const NAMESPACES: [&str; 3] = ["a", "b", "c"];
    const NODES: [&str; 2] = ["node-1", "node-2"];
    const POLICIES: [(&str, &str); 7] = [
        (
            "db-from-web",
            r#"{"podSelector":{"matchLabels":{"app":"db"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"web"}}}]}]}"#,
        ),
        (
            "db-from-team-x",
            r#"{"podSelector":{"matchLabels":{"app":"db"}},"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"team":"x"}}}]}]}"#,
        ),
        (
            "all-from-y-api",
            r#"{"podSelector":{},"ingress":[{"from":[{"namespaceSelector":{"matchExpressions":[{"key":"team","operator":"In","values":["y"]}]},"podSelector":{"matchLabels":{"app":"api"}}}]}]}"#,
        ),
        (
            "web-egress-http",
            r#"{"podSelector":{"matchLabels":{"app":"web"}},"policyTypes":["Egress"],"egress":[{"ports":[{"port":"http"}]},{"to":[{"podSelector":{"matchExpressions":[{"key":"app","operator":"NotIn","values":["web"]}]}}],"ports":[{"port":"metrics","protocol":"UDP"}]}]}"#,
        ),
        (
            "api-from-block",
            r#"{"podSelector":{"matchLabels":{"app":"api"}},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.0.0/16","except":["10.244.2.0/24"]}},{"podSelector":{"matchExpressions":[{"key":"tier","operator":"Exists"}]}}],"ports":[{"port":"http"}]}]}"#,
        ),
        (
            "deny-all",
            r#"{"podSelector":{},"policyTypes":["Ingress","Egress"]}"#,
        ),
        (
            "db-from-any-ns-web",
            r#"{"podSelector":{"matchLabels":{"app":"db"}},"ingress":[{"from":[{"namespaceSelector":{},"podSelector":{"matchLabels":{"app":"web"}}}]}]}"#,
        ),
    ];

    /// One random change, made through the index's methods as the agent's watches do.
    fn mutate(index: &mut Index, rng: &mut Rng) {
        match rng.below(10) {
            // A pod: new, relabelled, moved IPs, finished, with or without named ports.
            0..=4 => {
                let ns = rng.pick(&NAMESPACES);
                let name = format!("p{}", rng.below(8));
                let node = rng.pick(&NODES);
                let n = 2 + rng.below(30);
                let v4 = format!("10.244.{}.{n}", 1 + rng.below(2));
                let v6 = format!("fd00::{n:x}");
                let ips: Vec<&str> = match rng.below(3) {
                    0 => vec![&v4],
                    1 => vec![&v4, &v6],
                    _ => vec![],
                };
                let app = rng.pick(&["web", "db", "api"]);
                let mut labels = vec![("app", app)];
                if rng.below(2) == 0 {
                    labels.push(("tier", "front"));
                }
                let mut pod = mk_pod(&format!("{ns}/{name}"), node, &ips, &labels);
                pod.ports = match rng.below(3) {
                    0 => vec![],
                    1 => vec![ContainerPort {
                        name: Some("http".into()),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    }],
                    _ => vec![
                        ContainerPort {
                            name: Some("http".into()),
                            port: 80 + rng.below(2) as u16,
                            protocol: Protocol::Tcp,
                        },
                        ContainerPort {
                            name: Some("metrics".into()),
                            port: 9090,
                            protocol: Protocol::Udp,
                        },
                        ContainerPort {
                            name: Some("http".into()),
                            port: 8081,
                            protocol: Protocol::Tcp,
                        },
                    ],
                };
                if rng.below(8) == 0 {
                    pod.phase = Phase::Succeeded;
                }
                if rng.below(10) == 0 {
                    pod.host_network = true;
                }
                index.apply_pod(pod);
            }
            5 => {
                let k = key(&format!("{}/p{}", rng.pick(&NAMESPACES), rng.below(8)));
                index.delete_pod(&k);
            }
            6 => {
                let ns = rng.pick(&NAMESPACES);
                if rng.below(4) == 0 {
                    index.delete_namespace(ns);
                } else {
                    index.apply_namespace(mk_namespace(ns, &[("team", rng.pick(&["x", "y"]))]));
                }
            }
            7 => {
                let (name, spec) = POLICIES[rng.below(POLICIES.len())];
                let ns = rng.pick(&NAMESPACES);
                if rng.below(3) == 0 {
                    index.delete_policy(&crate::model::PolicyKey::new(
                        ns.to_string(),
                        name.to_string(),
                    ));
                } else {
                    add_policy(index, ns, name, spec);
                }
            }
            // A CNI registration or its removal (registered IPs win over the API's).
            _ => {
                let attachment = AttachmentKey {
                    container_id: format!("c{}", rng.below(4)),
                    ifname: "eth0".into(),
                };
                if rng.below(3) == 0 {
                    index.unregister(&attachment);
                } else {
                    let pod = key(&format!("{}/p{}", rng.pick(&NAMESPACES), rng.below(8)));
                    index.register(Registration {
                        attachment,
                        pod,
                        ips: vec![format!("10.244.1.{}", 100 + rng.below(4))
                            .parse()
                            .expect("ip")],
                        host_veth: "veth0".into(),
                    });
                }
            }
        }
    }

    #[test]
    fn keeping_sets_gives_exactly_what_compiling_from_scratch_gives() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut index = Index::default();
            let mut compilers = [Compiler::new(), Compiler::new()];
            for step in 0..120 {
                for _ in 0..1 + rng.below(3) {
                    mutate(&mut index, &mut rng);
                }
                if rng.below(50) == 0 {
                    // A relist: everything counts as changed.
                    let pods: Vec<_> = index.pods.values().cloned().collect();
                    index.reset_pods(pods);
                }
                let changes = index.take_changes();
                for (compiler, node) in compilers.iter_mut().zip(NODES) {
                    let kept = compiler.compile(&index, node, &changes);
                    let fresh = compile_node(&index, node);
                    assert_eq!(
                        kept.ruleset, fresh.ruleset,
                        "seed {seed}, step {step}, {node}: kept sets differ from a fresh compile"
                    );
                    assert_eq!(kept.problems, fresh.problems, "seed {seed}, step {step}");
                }
            }
        }
    }

    /// Random selectors over the labels `mutate` gives pods (`app`, `tier`) and namespaces
    /// (`team`), with every operator, in every namespace scope.
    fn random_set_key(rng: &mut Rng) -> PodSetKey {
        use crate::compile::PodPeer;
        use crate::model::{Family, NamespaceScope};
        use crate::selector::Selector;
        let family = [Family::V4, Family::V6][rng.below(2)];
        if rng.below(5) == 0 {
            let (name, protocol) = [
                ("http", Protocol::Tcp),
                ("metrics", Protocol::Udp),
                ("http", Protocol::Udp),
                ("nothing", Protocol::Tcp),
            ][rng.below(4)];
            return PodSetKey::NamedPort(name.into(), protocol, family);
        }
        let selector = |rng: &mut Rng, terms: &[&str]| {
            let picked: Vec<&str> = (0..rng.below(3)).map(|_| rng.pick(terms)).collect();
            let json = format!(r#"{{"matchExpressions":[{}]}}"#, picked.join(","));
            Selector::parse(&serde_json::from_str(&json).expect("selector")).expect("valid")
        };
        let pods = selector(
            rng,
            &[
                r#"{"key":"app","operator":"In","values":["web"]}"#,
                r#"{"key":"app","operator":"In","values":["db","api","nothing"]}"#,
                r#"{"key":"app","operator":"NotIn","values":["web"]}"#,
                r#"{"key":"app","operator":"Exists"}"#,
                r#"{"key":"tier","operator":"Exists"}"#,
                r#"{"key":"tier","operator":"DoesNotExist"}"#,
                r#"{"key":"tier","operator":"In","values":["front"]}"#,
                r#"{"key":"gone","operator":"Exists"}"#,
            ],
        );
        let namespaces = if rng.below(2) == 0 {
            NamespaceScope::Own(rng.pick(&["a", "b", "c", "empty"]).to_string())
        } else {
            NamespaceScope::Selected(selector(
                rng,
                &[
                    r#"{"key":"team","operator":"In","values":["x"]}"#,
                    r#"{"key":"team","operator":"NotIn","values":["y"]}"#,
                    r#"{"key":"team","operator":"Exists"}"#,
                    r#"{"key":"kubernetes.io/metadata.name","operator":"In","values":["a","c"]}"#,
                ],
            ))
        };
        PodSetKey::Peer(PodPeer { namespaces, pods }, family)
    }

    #[test]
    fn candidates_from_the_postings_give_exactly_what_a_pass_over_every_pod_gives() {
        use crate::postings::PodPostings;
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut index = Index::default();
            for step in 0..80 {
                for _ in 0..1 + rng.below(3) {
                    mutate(&mut index, &mut rng);
                }
                if rng.below(30) == 0 {
                    let pods: Vec<_> = index.pods.values().cloned().collect();
                    index.reset_pods(pods);
                }
                let mut fresh = PodPostings::default();
                index.pods.values().for_each(|p| fresh.add(p));
                assert_eq!(index.postings(), &fresh, "seed {seed}, step {step}");
                // Share 0: the postings whenever the selector has a term for them; the default
                // share passes over large ones (most, in a cluster this small).
                let mut always = FromScratch::with_share(&index, 0);
                let mut default = FromScratch::new(&index);
                for _ in 0..8 {
                    let key = random_set_key(&mut rng);
                    let mut indexed: Vec<(PodKey, Vec<Element>)> = always
                        .contributions(&key)
                        .into_iter()
                        .map(|(p, c)| (p.key.clone(), c))
                        .collect();
                    indexed.sort();
                    let mut chosen: Vec<(PodKey, Vec<Element>)> = default
                        .contributions(&key)
                        .into_iter()
                        .map(|(p, c)| (p.key.clone(), c))
                        .collect();
                    chosen.sort();
                    assert_eq!(indexed, chosen, "seed {seed}, step {step}, {key:?}");
                    let every_pod: Vec<(PodKey, Vec<Element>)> = index
                        .pods
                        .values()
                        .map(|p| (p.key.clone(), key.contribution(&index, p)))
                        .filter(|(_, c)| !c.is_empty())
                        .collect();
                    assert_eq!(indexed, every_pod, "seed {seed}, step {step}, {key:?}");
                }
            }
        }
    }

    #[test]
    fn an_unchanged_set_is_the_same_allocation_as_before() {
        let mut index = Index::default();
        index.apply_namespace(mk_namespace("a", &[("team", "x")]));
        add_policy(&mut index, "a", "db-from-web", POLICIES[0].1);
        index.apply_pod(mk_pod("a/db", "node-1", &["10.244.1.2"], &[("app", "db")]));
        index.apply_pod(mk_pod(
            "a/web",
            "node-2",
            &["10.244.2.2"],
            &[("app", "web")],
        ));
        let mut compiler = Compiler::new();
        let changes = index.take_changes();
        let first = compiler.compile(&index, "node-1", &changes);
        // A pod no set cares about changes: every set is carried over as is.
        index.apply_pod(mk_pod(
            "a/other",
            "node-2",
            &["10.244.2.3"],
            &[("app", "x")],
        ));
        let changes = index.take_changes();
        let second = compiler.compile(&index, "node-1", &changes);
        for (name, set) in &second.ruleset.sets {
            if let crate::compile::SetKind::Addrs(_) = set.kind {
                assert!(
                    Arc::ptr_eq(&set.elements, &first.ruleset.sets[name].elements),
                    "{name} was rebuilt"
                );
            }
        }
        // A web pod joins the peer set: that set changes, the first ruleset does not.
        index.apply_pod(mk_pod(
            "a/web2",
            "node-2",
            &["10.244.2.4"],
            &[("app", "web")],
        ));
        let changes = index.take_changes();
        let third = compiler.compile(&index, "node-1", &changes);
        assert_ne!(third.ruleset, second.ruleset);
        assert_eq!(
            second.ruleset, first.ruleset,
            "nothing node-1 needs changed"
        );
        assert_eq!(third.ruleset, compile_node(&index, "node-1").ruleset);
    }
}
