//! The DaemonSet sluice runs in, watched so that a stop can tell an uninstall from a restart.
//!
//! `helm uninstall` deletes the DaemonSet, then its pods stop: a stop after the DaemonSet was
//! seen deleted cleans the node up (sluice's tables, its CNI config), so the node is left as
//! flannel alone made it. A restart, an upgrade or a drain stops a pod while the DaemonSet is
//! still there: everything stays, and enforcement and the start gate carry on.
//!
//! Only a deletion that was seen counts. Removing the rules opens traffic, so a DaemonSet never
//! seen (a wrong name, missing RBAC, an unreachable API) never triggers a cleanup: the stop
//! then keeps everything, as without the feature, and says why in the log.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};

/// `namespace/name` of a DaemonSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for DaemonSetRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME, e.g. kube-system/sluice"))?;
        // Kubernetes names: lowercase alphanumerics, '-' and '.', at most 253 characters.
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 253
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        for (what, part) in [("namespace", namespace), ("name", name)] {
            if !valid(part) {
                return Err(format!(
                    "{s:?}: {what} {part:?} is not a Kubernetes name (lowercase letters, digits, \
                     '-' and '.')"
                ));
            }
        }
        Ok(DaemonSetRef {
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

/// What one look at the DaemonSet showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sighting {
    /// There, not being deleted.
    Present,
    /// There with a deletionTimestamp (a foreground delete: its pods go first).
    Deleting,
    /// Not there.
    Absent,
}

/// What the watch has seen of the DaemonSet so far. Pure: the watch feeds it sightings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// It was present at some point: only then can its absence mean an uninstall.
    seen_present: bool,
    last: Option<Sighting>,
}

impl Owner {
    pub fn observe(&mut self, s: Sighting) {
        self.seen_present |= s == Sighting::Present;
        self.last = Some(s);
    }

    /// The DaemonSet was seen, and was since seen deleted or being deleted.
    pub fn uninstalled(&self) -> bool {
        self.seen_present && matches!(self.last, Some(Sighting::Deleting | Sighting::Absent))
    }

    /// Never seen present: no stop will clean up (the log says so at start and at stop).
    pub fn never_seen(&self) -> bool {
        !self.seen_present
    }

    pub fn last(&self) -> Option<Sighting> {
        self.last
    }
}

fn sighting(ds: &DaemonSet) -> Sighting {
    if ds.metadata.deletion_timestamp.is_some() {
        Sighting::Deleting
    } else {
        Sighting::Present
    }
}

/// The running watch of one DaemonSet.
pub struct OwnerWatch {
    target: DaemonSetRef,
    api: Api<DaemonSet>,
    state: Arc<Mutex<Owner>>,
    task: tokio::task::JoinHandle<()>,
}

impl OwnerWatch {
    /// Starts watching `target` (list/watch by name: RBAC may limit the grant to that one name).
    pub fn start(client: Client, target: DaemonSetRef) -> OwnerWatch {
        let api: Api<DaemonSet> = Api::namespaced(client, &target.namespace);
        let state = Arc::new(Mutex::new(Owner::default()));
        let task = tokio::spawn(watch(api.clone(), target.clone(), state.clone()));
        OwnerWatch {
            target,
            api,
            state,
            task,
        }
    }

    fn snapshot(&self) -> Owner {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides, at a stop, whether this is an uninstall. When the watch last saw the DaemonSet
    /// present, one GET (bounded by `timeout`) catches a deletion the watch has not delivered
    /// yet; an error of that GET keeps everything in place.
    pub async fn uninstalled_at_stop(self, timeout: Duration) -> bool {
        let mut owner = self.snapshot();
        self.task.abort();
        if owner.last() == Some(Sighting::Present) {
            match tokio::time::timeout(timeout, self.api.get(&self.target.name)).await {
                Ok(Ok(ds)) => owner.observe(sighting(&ds)),
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => owner.observe(Sighting::Absent),
                Ok(Err(e)) => tracing::warn!(daemonset = %self.target, error = %e,
                    "could not read the DaemonSet at stop; going by the last sighting (present)"),
                Err(_) => tracing::warn!(daemonset = %self.target,
                    "reading the DaemonSet at stop timed out; going by the last sighting (present)"),
            }
        }
        if owner.never_seen() {
            tracing::warn!(daemonset = %self.target,
                "the DaemonSet was never seen (wrong name, missing RBAC or no API?): \
                 this stop is not taken as an uninstall");
        }
        owner.uninstalled()
    }
}

async fn watch(api: Api<DaemonSet>, target: DaemonSetRef, state: Arc<Mutex<Owner>>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
    let mut stream = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    // During a (re)list: whether the DaemonSet was among the listed objects.
    let mut listed = false;
    // The last error reported: a failing watch retries every few seconds, report each kind once.
    let mut last_error = String::new();
    while let Some(event) = stream.next().await {
        let seen = match event {
            Ok(Event::Init) => {
                listed = false;
                continue;
            }
            Ok(Event::InitApply(ds)) => {
                listed = true;
                sighting(&ds)
            }
            Ok(Event::InitDone) if listed => continue,
            Ok(Event::InitDone) | Ok(Event::Delete(_)) => Sighting::Absent,
            Ok(Event::Apply(ds)) => sighting(&ds),
            Err(e) => {
                let error = e.to_string();
                if error != last_error {
                    tracing::warn!(daemonset = %target, error = %error,
                        "watching the DaemonSet failed (retrying); a stop meanwhile goes by the last sighting");
                    last_error = error;
                }
                continue;
            }
        };
        last_error.clear();
        let mut owner = state.lock().unwrap_or_else(|e| e.into_inner());
        let before = *owner;
        owner.observe(seen);
        if owner.uninstalled() && !before.uninstalled() {
            tracing::info!(daemonset = %target,
                "the DaemonSet is deleted (uninstall): the stop that follows cleans this node up");
        } else if before.uninstalled() && !owner.uninstalled() {
            tracing::info!(daemonset = %target, "the DaemonSet is back: stops keep everything again");
        } else if before.last().is_none() {
            match seen {
                Sighting::Absent => tracing::warn!(daemonset = %target,
                    "the DaemonSet does not exist: stops will not clean this node up"),
                _ => tracing::info!(daemonset = %target,
                    "watching the DaemonSet: its deletion (uninstall) makes the stop clean this node up"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Sighting::*;

    fn after(sightings: &[Sighting]) -> Owner {
        let mut o = Owner::default();
        for s in sightings {
            o.observe(*s);
        }
        o
    }

    #[test]
    fn a_seen_deletion_is_an_uninstall() {
        assert!(after(&[Present, Absent]).uninstalled());
        assert!(after(&[Present, Deleting]).uninstalled());
        assert!(after(&[Present, Present, Deleting, Absent]).uninstalled());
    }

    #[test]
    fn a_restart_or_upgrade_is_not() {
        assert!(!after(&[]).uninstalled());
        assert!(!after(&[Present]).uninstalled());
        assert!(!after(&[Present, Present]).uninstalled());
    }

    #[test]
    fn a_daemonset_never_seen_never_cleans_up() {
        // wrong name, or created after we looked: removing the rules would open traffic
        assert!(!after(&[Absent]).uninstalled());
        assert!(!after(&[Deleting, Absent]).uninstalled());
        assert!(after(&[Absent]).never_seen());
    }

    #[test]
    fn deleted_and_created_again_keeps_everything() {
        // e.g. kubectl delete --cascade=orphan, then a new DaemonSet of the same name
        assert!(!after(&[Present, Absent, Present]).uninstalled());
    }

    #[test]
    fn refs_parse_and_errors_name_the_part() {
        assert_eq!(
            "kube-system/sluice".parse::<DaemonSetRef>().unwrap(),
            DaemonSetRef {
                namespace: "kube-system".into(),
                name: "sluice".into()
            }
        );
        assert_eq!(
            "kube-system/sluice"
                .parse::<DaemonSetRef>()
                .unwrap()
                .to_string(),
            "kube-system/sluice"
        );
        let err = "sluice".parse::<DaemonSetRef>().unwrap_err();
        assert!(err.contains("NAMESPACE/NAME"), "{err}");
        let err = "kube-system/Sluice".parse::<DaemonSetRef>().unwrap_err();
        assert!(err.contains("name \"Sluice\""), "{err}");
        let err = "/sluice".parse::<DaemonSetRef>().unwrap_err();
        assert!(err.contains("namespace \"\""), "{err}");
        assert!("a/b/c".parse::<DaemonSetRef>().is_err());
    }
}
