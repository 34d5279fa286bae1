//! Watches of the API server feeding the index: Pods and NetworkPolicies cluster-wide,
//! Namespaces as metadata only. Each object is converted to its slim model type as it arrives
//! (the full Pod is never stored); one that cannot be converted is skipped and logged with its
//! name, and never stops the watch. Watch errors are retried with backoff, so an API outage only
//! pauses updates: the rules last applied stay in the kernel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Client, Resource};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::model::{namespace_info, pod_info, policy_info, Index, ObjectKey};

/// The watched kinds of object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pods,
    Namespaces,
    NetworkPolicies,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Pods, Kind::Namespaces, Kind::NetworkPolicies];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::NetworkPolicies => "networkpolicies",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// What the watches know of the cluster, shared with the reconcile loop.
pub struct Cluster {
    index: Mutex<Index>,
    /// Which watches have delivered their initial list.
    listed: Mutex<[bool; 3]>,
    /// Signalled on every change to the index (a stored permit, so none is lost during a sync).
    pub changed: Notify,
    /// When the oldest change not yet applied arrived (for the programming latency).
    pending_since: Mutex<Option<Instant>>,
    /// Counts changes: every change to the index is in the kernel once `applied` reaches the
    /// generation `touch` returned for it.
    generation: AtomicU64,
    applied: tokio::sync::watch::Sender<u64>,
    /// Per kind, the resourceVersions the watch has delivered, and which are in the kernel.
    versions: Mutex<[Versions; 3]>,
}

/// The resourceVersions of one watch: each event's version waits with the generation it made
/// (or the current one, when it changed nothing) until a sync carrying that generation commits.
/// Then everything the API server had of this kind up to that version is enforced: the watch
/// delivers a kind's events in order. A test can write a marker object, read its version, and
/// wait for every node's agent to report it applied (`GET /applied`) before probing.
#[derive(Default)]
struct Versions {
    waiting: VecDeque<(u64, String)>,
    applied: Option<String>,
}

impl Versions {
    fn release(&mut self, applied_generation: u64) {
        while let Some((generation, _)) = self.waiting.front() {
            if *generation > applied_generation {
                break;
            }
            self.applied = self.waiting.pop_front().map(|(_, v)| v);
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            index: Mutex::default(),
            listed: Mutex::default(),
            changed: Notify::new(),
            pending_since: Mutex::default(),
            generation: AtomicU64::new(0),
            applied: tokio::sync::watch::Sender::new(0),
            versions: Mutex::default(),
        }
    }
}

impl Cluster {
    /// The index. A panic while holding the lock leaves the index as it was last written,
    /// which is still a consistent map, so a poisoned lock is taken over.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn listed_slots(&self) -> MutexGuard<'_, [bool; 3]> {
        self.listed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The resources whose initial list is not in yet.
    pub fn unlisted(&self) -> Vec<Kind> {
        let listed = *self.listed_slots();
        Kind::ALL
            .into_iter()
            .filter(|r| !listed[r.slot()])
            .collect()
    }

    pub(crate) fn mark_listed(&self, kind: Kind) {
        self.listed_slots()[kind.slot()] = true;
    }

    fn pending(&self) -> MutexGuard<'_, Option<Instant>> {
        self.pending_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record a change to the index (made before this call) and wake the reconcile loop.
    /// Returns the change's generation (see [`Cluster::wait_applied`]).
    pub fn touch(&self) -> u64 {
        self.pending().get_or_insert_with(Instant::now);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed.notify_one();
        generation
    }

    /// The generation of the latest change. A sync that reads it before compiling carries
    /// every change up to it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A sync carrying every change up to `generation` has been committed.
    pub fn mark_applied(&self, generation: u64) {
        self.applied.send_if_modified(|applied| {
            let newer = generation > *applied;
            if newer {
                *applied = generation;
            }
            newer
        });
        let applied = *self.applied.borrow();
        for versions in self.versions().iter_mut() {
            versions.release(applied);
        }
    }

    fn versions(&self) -> MutexGuard<'_, [Versions; 3]> {
        self.versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The watch of `kind` delivered `resource_version`, whose change (if any) has `generation`.
    pub fn observed(&self, kind: Kind, resource_version: Option<String>, generation: u64) {
        let Some(version) = resource_version else {
            return;
        };
        let applied = *self.applied.borrow();
        let versions = &mut self.versions()[kind.slot()];
        // A kind's versions arrive in order: a later one with the same generation replaces the
        // earlier, so the queue holds one entry per pending generation (a failing sync under a
        // stream of status updates does not grow it per event).
        match versions.waiting.back_mut() {
            Some((g, v)) if *g == generation => *v = version,
            _ => versions.waiting.push_back((generation, version)),
        }
        versions.release(applied);
    }

    /// Per kind, the resourceVersion up to which the watch's events are in the kernel (`None`
    /// until the first one is).
    pub fn applied_versions(&self) -> Vec<(Kind, Option<String>)> {
        let versions = self.versions();
        Kind::ALL
            .into_iter()
            .map(|k| (k, versions[k.slot()].applied.clone()))
            .collect()
    }

    /// Whether every change up to `generation` is in the kernel.
    pub fn is_applied(&self, generation: u64) -> bool {
        *self.applied.borrow() >= generation
    }

    /// Wait until every change up to `generation` is in the kernel.
    pub async fn wait_applied(&self, generation: u64) {
        let mut rx = self.applied.subscribe();
        // The sender lives as long as `self`, so this only ends when the generation is reached.
        let _ = rx.wait_for(|applied| *applied >= generation).await;
    }

    /// Take the arrival time of the oldest pending change: the sync about to compile covers it.
    pub fn take_pending(&self) -> Option<Instant> {
        self.pending().take()
    }

    /// Put back a taken arrival time when its sync failed, keeping the older one.
    pub fn restore_pending(&self, since: Instant) {
        let mut pending = self.pending();
        *pending = Some(pending.map_or(since, |p| p.min(since)));
    }
}

fn object_name<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    let name = meta.name.as_deref().unwrap_or("?");
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn key_of<K: Resource>(obj: &K) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A model object converted from an untyped API object. Pods and policies arrive untyped so
/// that one that does not deserialize is skipped alone instead of failing the whole list.
pub enum Converted {
    Pod(crate::model::PodInfo),
    Policy(crate::model::PolicyInfo),
}

fn convert_namespace(
    _: Kind,
    obj: PartialObjectMeta<Namespace>,
) -> Result<crate::model::NamespaceInfo, String> {
    let ns = Namespace {
        metadata: obj.metadata,
        ..Namespace::default()
    };
    namespace_info(&ns).map_err(|e| e.to_string())
}

fn convert_dynamic(kind: Kind, obj: DynamicObject) -> Result<Converted, String> {
    match kind {
        Kind::Pods => {
            let pod: Pod = obj.try_parse().map_err(|e| e.to_string())?;
            pod_info(&pod)
                .map(Converted::Pod)
                .map_err(|e| e.to_string())
        }
        Kind::NetworkPolicies => {
            let policy: NetworkPolicy = obj.try_parse().map_err(|e| e.to_string())?;
            let info = policy_info(&policy).map_err(|e| e.to_string())?;
            for e in &info.errors {
                tracing::warn!(
                    policy = %info.key,
                    field = %e.field,
                    "{}; {}",
                    e.message,
                    e.consequence()
                );
            }
            Ok(Converted::Policy(info))
        }
        Kind::Namespaces => Err("namespaces are watched as metadata".into()),
    }
}

fn apply_converted(index: &mut Index, c: Converted) -> bool {
    match c {
        Converted::Pod(p) => index.apply_pod(p),
        Converted::Policy(p) => index.apply_policy(p),
    }
}

/// The index side of a watch, whatever the object type.
struct Sink<'a, O, I> {
    kind: Kind,
    cluster: &'a Cluster,
    metrics: &'a Metrics,
    /// Takes the object: an untyped object is parsed in place, never copied.
    convert: fn(Kind, O) -> Result<I, String>,
    /// `false` when the index already held this (no sync needed).
    apply: fn(&mut Index, I) -> bool,
    delete: fn(Kind, &mut Index, &ObjectKey),
    reset: fn(Kind, &mut Index, Vec<I>),
}

impl<O: Resource, I> Sink<'_, O, I> {
    fn convert_logged(&self, obj: O) -> Option<I> {
        let name = object_name(&obj);
        match (self.convert)(self.kind, obj) {
            Ok(info) => Some(info),
            Err(error) => {
                self.metrics
                    .objects_skipped
                    .get_or_create(&vec![("resource", self.kind.as_str())])
                    .inc();
                tracing::warn!(
                    resource = self.kind.as_str(),
                    object = %name,
                    %error,
                    "skipped an object that could not be converted"
                );
                None
            }
        }
    }

    async fn run(
        self,
        stream: impl futures::Stream<Item = Result<Event<O>, watcher::Error>> + Send,
    ) {
        let mut stream = std::pin::pin!(stream);
        let mut buffer: Vec<I> = Vec::new();
        // The newest version in the initial list (its items come in no version order).
        let mut listed_version: Option<String> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => {
                    buffer.clear();
                    listed_version = None;
                }
                Ok(Event::InitApply(obj)) => {
                    listed_version = newer_version(listed_version, version_of(&obj));
                    buffer.extend(self.convert_logged(obj));
                }
                Ok(Event::InitDone) => {
                    let all = std::mem::take(&mut buffer);
                    tracing::info!(resource = self.kind.as_str(), objects = all.len(), "listed");
                    (self.reset)(self.kind, &mut self.cluster.index(), all);
                    self.cluster.mark_listed(self.kind);
                    let generation = self.cluster.touch();
                    self.cluster
                        .observed(self.kind, listed_version.take(), generation);
                }
                Ok(Event::Apply(obj)) => {
                    let key = key_of(&obj);
                    let version = version_of(&obj);
                    let generation = match self.convert_logged(obj) {
                        Some(info) => {
                            // Most updates (conditions, container statuses) change nothing policy
                            // looks at: no sync for those.
                            let changed = (self.apply)(&mut self.cluster.index(), info);
                            if changed {
                                self.cluster.touch()
                            } else {
                                self.cluster.generation()
                            }
                        }
                        // The last good version would be stale; drop it rather than enforce it.
                        None => {
                            (self.delete)(self.kind, &mut self.cluster.index(), &key);
                            self.cluster.touch()
                        }
                    };
                    self.cluster.observed(self.kind, version, generation);
                }
                Ok(Event::Delete(obj)) => {
                    let version = version_of(&obj);
                    (self.delete)(self.kind, &mut self.cluster.index(), &key_of(&obj));
                    let generation = self.cluster.touch();
                    self.cluster.observed(self.kind, version, generation);
                }
                Err(error) => {
                    self.metrics
                        .watch_restarts
                        .get_or_create(&vec![("resource", self.kind.as_str())])
                        .inc();
                    tracing::warn!(
                        resource = self.kind.as_str(),
                        %error,
                        "watch failed; retrying with backoff (rules stay as applied)"
                    );
                }
            }
        }
    }
}

fn version_of<O: Resource>(obj: &O) -> Option<String> {
    obj.meta().resource_version.clone()
}

/// The newer of two resourceVersions. They are opaque to clients, but every API server backed
/// by etcd writes its revision, a number; anything else keeps the latest seen.
fn newer_version(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(x), Ok(y)) if x > y => Some(a),
            _ => Some(b),
        },
        (a, None) => a,
        (None, b) => b,
    }
}

fn delete_by_key(kind: Kind, index: &mut Index, key: &ObjectKey) {
    match kind {
        Kind::Pods => index.delete_pod(key),
        Kind::NetworkPolicies => index.delete_policy(key),
        Kind::Namespaces => index.delete_namespace(&key.name),
    }
}

fn reset_dynamic(kind: Kind, index: &mut Index, all: Vec<Converted>) {
    match kind {
        Kind::Pods => index.reset_pods(all.into_iter().filter_map(|c| match c {
            Converted::Pod(p) => Some(p),
            Converted::Policy(_) => None,
        })),
        Kind::NetworkPolicies => index.reset_policies(all.into_iter().filter_map(|c| match c {
            Converted::Policy(p) => Some(p),
            Converted::Pod(_) => None,
        })),
        Kind::Namespaces => {}
    }
}

async fn watch_dynamic<K>(client: Client, kind: Kind, cluster: &Cluster, metrics: &Metrics)
where
    K: Resource<DynamicType = ()>,
{
    let api: Api<DynamicObject> = Api::all_with(client, &ApiResource::erase::<K>(&()));
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    Sink {
        kind,
        cluster,
        metrics,
        convert: convert_dynamic,
        apply: apply_converted,
        delete: delete_by_key,
        reset: reset_dynamic,
    }
    .run(stream)
    .await;
}

async fn watch_namespaces(client: Client, cluster: &Cluster, metrics: &Metrics) {
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    Sink {
        kind: Kind::Namespaces,
        cluster,
        metrics,
        convert: convert_namespace,
        apply: Index::apply_namespace,
        delete: delete_by_key,
        reset: |_, index, all| index.reset_namespaces(all),
    }
    .run(stream)
    .await;
}

/// Run the three watches until the process ends (they never give up).
pub async fn run(client: Client, cluster: Arc<Cluster>, metrics: Arc<Metrics>) {
    tokio::join!(
        watch_dynamic::<Pod>(client.clone(), Kind::Pods, &cluster, &metrics),
        watch_namespaces(client.clone(), &cluster, &metrics),
        watch_dynamic::<NetworkPolicy>(client, Kind::NetworkPolicies, &cluster, &metrics),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(cluster: &Cluster, kind: Kind) -> Option<String> {
        cluster
            .applied_versions()
            .into_iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| v)
    }

    #[test]
    fn a_version_is_applied_only_when_the_sync_carrying_its_change_commits() {
        let cluster = Cluster::default();
        let g1 = cluster.touch();
        cluster.observed(Kind::Pods, Some("10".into()), g1);
        assert_eq!(applied(&cluster, Kind::Pods), None);
        let g2 = cluster.touch();
        cluster.observed(Kind::Pods, Some("11".into()), g2);
        cluster.mark_applied(g1);
        assert_eq!(applied(&cluster, Kind::Pods).as_deref(), Some("10"));
        cluster.mark_applied(g2);
        assert_eq!(applied(&cluster, Kind::Pods).as_deref(), Some("11"));
        // The other kinds saw nothing.
        assert_eq!(applied(&cluster, Kind::NetworkPolicies), None);
    }

    #[test]
    fn an_event_that_changes_nothing_waits_only_for_the_pending_sync() {
        let cluster = Cluster::default();
        let g = cluster.touch();
        cluster.mark_applied(g);
        // Nothing pending: applied at once.
        cluster.observed(Kind::Namespaces, Some("20".into()), cluster.generation());
        assert_eq!(applied(&cluster, Kind::Namespaces).as_deref(), Some("20"));
        // A change is pending: an unchanged event after it waits for that sync.
        let pending = cluster.touch();
        cluster.observed(Kind::Pods, Some("21".into()), pending);
        cluster.observed(Kind::Namespaces, Some("22".into()), cluster.generation());
        assert_eq!(applied(&cluster, Kind::Namespaces).as_deref(), Some("20"));
        cluster.mark_applied(pending);
        assert_eq!(applied(&cluster, Kind::Namespaces).as_deref(), Some("22"));
        assert_eq!(applied(&cluster, Kind::Pods).as_deref(), Some("21"));
    }

    #[test]
    fn events_of_one_pending_generation_keep_one_entry() {
        let cluster = Cluster::default();
        let pending = cluster.touch();
        for v in 30..1030 {
            cluster.observed(Kind::Pods, Some(v.to_string()), pending);
        }
        assert_eq!(cluster.versions()[Kind::Pods.slot()].waiting.len(), 1);
        cluster.mark_applied(pending);
        assert_eq!(applied(&cluster, Kind::Pods).as_deref(), Some("1029"));
    }

    #[test]
    fn the_newest_listed_version_wins_whatever_the_order() {
        let v = |s: &str| Some(s.to_string());
        assert_eq!(newer_version(v("9"), v("10")), v("10"));
        assert_eq!(newer_version(v("10"), v("9")), v("10"));
        assert_eq!(newer_version(None, v("3")), v("3"));
        assert_eq!(newer_version(v("3"), None), v("3"));
        // Not numbers: the latest seen.
        assert_eq!(newer_version(v("b"), v("a")), v("a"));
    }
}
