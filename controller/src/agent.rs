//! The node agent: watches feed the index, and ONE reconcile loop compiles this node's ruleset
//! and applies it. Changes are debounced (which also bounds the rate of syncs); a periodic
//! resync replaces the table whole to repair drift. Stopping leaves the rules in the kernel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use crate::compile::Compiled;
use crate::incremental::Compiler;
use crate::metrics::Metrics;
use crate::nft::{Nft, NftError, TableState};
use crate::watch::{self, Cluster};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("could not build the Kubernetes client configuration: {0}")]
    Config(String),
    #[error("could not create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("could not remove the table: {0}")]
    Cleanup(#[source] NftError),
    #[error(transparent)]
    CniSocket(#[from] crate::cni_server::CniSocketError),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub kubeconfig: Option<String>,
    pub listen: SocketAddr,
    pub resync: Duration,
    pub debounce: Duration,
    /// The least time between the starts of two syncs: bounds the sync rate under a storm of
    /// changes (they coalesce into the next sync).
    pub min_sync_interval: Duration,
    /// How often the kernel's per-pod drop counters are read into the metrics.
    pub drop_counters_interval: Duration,
    /// The unix socket the CNI plugin registers pods on (`None`: no start gate).
    pub cni_socket: Option<std::path::PathBuf>,
    /// A CNI registration whose Pod never appears in the API is dropped after this long.
    pub cni_orphan_ttl: Duration,
    /// The DaemonSet this agent runs in: a stop after its deletion is an uninstall.
    pub daemonset: Option<crate::owner::DaemonSetRef>,
}

/// How [`run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopped {
    /// The stop follows the deletion of [`Config::daemonset`]: clean the node up.
    pub uninstalled: bool,
}

/// The sysctls that make bridged same-node traffic meet the forward hook.
pub const BRIDGE_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

/// Make sure bridged traffic is filtered: set the sysctls to 1 where needed. `Err` says why
/// same-node traffic would bypass the rules.
pub fn ensure_bridge_netfilter() -> Result<(), String> {
    for path in BRIDGE_SYSCTLS {
        match std::fs::read_to_string(path) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => std::fs::write(path, "1\n").map_err(|e| {
                format!("{path} is 0 and could not be set to 1 ({e}): same-node pod traffic would bypass policy")
            })?,
            Err(e) => {
                return Err(format!(
                    "{path}: {e} (is the br_netfilter module loaded? `modprobe br_netfilter`): same-node pod traffic would bypass policy"
                ))
            }
        }
    }
    Ok(())
}

/// Why the agent is not ready, if it is not.
pub struct Health {
    pub(crate) cluster: Arc<Cluster>,
    bridge_problem: Mutex<Option<String>>,
    /// The error of the last sync, if it failed.
    sync_error: Mutex<Option<String>>,
    synced: AtomicBool,
}

impl Health {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            bridge_problem: Mutex::new(None),
            sync_error: Mutex::new(None),
            synced: AtomicBool::new(false),
        }
    }

    fn set_bridge_problem(&self, problem: Option<String>) {
        *self
            .bridge_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    fn set_sync_error(&self, error: Option<String>) {
        *self
            .sync_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    /// `None` when ready: br_netfilter is on, every initial list is in and the first sync has
    /// been applied.
    pub fn not_ready(&self) -> Option<String> {
        let bridge = self
            .bridge_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(p) = bridge {
            return Some(p);
        }
        let unlisted = self.cluster.unlisted();
        if !unlisted.is_empty() {
            let names: Vec<&str> = unlisted.iter().map(|k| k.as_str()).collect();
            return Some(format!(
                "waiting for the initial list of {}",
                names.join(", ")
            ));
        }
        if !self.synced.load(Ordering::Acquire) {
            return Some("the first sync has not been applied yet".into());
        }
        let failed = self
            .sync_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        failed.map(|e| format!("the last sync failed (rules are as last applied; retrying): {e}"))
    }
}

/// A client from this kubeconfig file, else kube's inference ($KUBECONFIG, ~/.kube/config,
/// the in-cluster service account).
pub async fn kube_client(kubeconfig: Option<&str>) -> Result<kube::Client, AgentError> {
    let kube_config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::Config(format!("{path}: {e}")))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| AgentError::Config(format!("{path}: {e}")))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| AgentError::Config(e.to_string()))?,
    };
    kube::Client::try_from(kube_config).map_err(AgentError::Client)
}

/// Remove both tables, `inet sluice` and the anti-spoofing `bridge sluice` (uninstall), in one
/// transaction. Removing a table that is not there is not an error.
pub fn cleanup(nft: &Nft) -> Result<(), AgentError> {
    nft.apply(&crate::nft::remove_table_script())
        .map_err(AgentError::Cleanup)
}

/// Run until SIGTERM or SIGINT. The table is left in place on the way out; the caller removes
/// it when the stop is an uninstall ([`Stopped::uninstalled`]).
pub async fn run(config: Config) -> Result<Stopped, AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;

    let client = kube_client(config.kubeconfig.as_deref()).await?;
    let owner = config
        .daemonset
        .clone()
        .map(|ds| crate::owner::OwnerWatch::start(client.clone(), ds));
    let cluster = Arc::new(Cluster::default());
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(cluster.clone()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(node = %config.node, listen = %config.listen, "sluice agent starting");
    let http = tokio::spawn(crate::http::serve(
        listener,
        health.clone(),
        metrics.clone(),
    ));
    let mut cni_tasks = Vec::new();
    if let Some(path) = &config.cni_socket {
        let socket = crate::cni_server::bind(path)?;
        tracing::info!(socket = %path.display(), "CNI start gate listening");
        let server = crate::cni_server::Server::new(
            cluster.clone(),
            health.clone(),
            metrics.clone(),
            config.cni_orphan_ttl,
        );
        cni_tasks.push(tokio::spawn(server.clone().serve(socket)));
        cni_tasks.push(tokio::spawn(server.sweep_orphans()));
    }
    let watches = tokio::spawn(watch::run(client, cluster.clone(), metrics.clone()));
    let reconcile = tokio::spawn(reconcile(config, cluster, health, metrics));

    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    http.abort();
    watches.abort();
    reconcile.abort();
    for task in cni_tasks {
        task.abort();
    }
    let uninstalled = match owner {
        Some(owner) => owner.uninstalled_at_stop(Duration::from_secs(2)).await,
        None => false,
    };
    if uninstalled {
        tracing::info!("{signal}: stopping; the DaemonSet is deleted (uninstall)");
    } else {
        tracing::info!("{signal}: stopping; the rules stay in place");
    }
    Ok(Stopped { uninstalled })
}

/// The one loop that writes the table.
async fn reconcile(
    config: Config,
    cluster: Arc<Cluster>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) {
    let check_bridge = |health: &Health| {
        let problem = ensure_bridge_netfilter().err();
        if let Some(p) = &problem {
            tracing::error!(problem = %p, "br_netfilter: not ready");
        }
        health.set_bridge_problem(problem);
    };
    check_bridge(&health);

    let mut table = Some(TableState::new(Nft::default()));
    let mut compiler = Compiler::new();
    let mut reported = BTreeSet::new();
    let mut resync = tokio::time::interval(config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is immediate
    let mut drop_counters = tokio::time::interval(config.drop_counters_interval);
    drop_counters.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drops = DropSeries::default();
    let mut last_start: Option<tokio::time::Instant> = None;
    loop {
        let mut full = false;
        tokio::select! {
            _ = cluster.changed.notified() => {}
            _ = resync.tick() => full = true,
            _ = drop_counters.tick() => {
                if let Some(state) = &table {
                    drops.read(state.applied(), &metrics).await;
                }
                continue;
            }
        }
        // Bound the rate: changes arriving meanwhile coalesce into this sync.
        if let Some(last) = last_start {
            tokio::time::sleep_until(last + config.min_sync_interval).await;
        }
        // Let a burst of changes settle into one transaction.
        tokio::time::sleep(config.debounce).await;
        if full {
            check_bridge(&health);
        }
        // Never apply a partial picture: a table compiled before every list is in would drop
        // rules for pods and policies not yet seen.
        if !cluster.unlisted().is_empty() {
            continue;
        }
        let Some(mut state) = table.take() else {
            tracing::error!("the table state was lost; stopping reconcile");
            return;
        };
        if full {
            // The whole-table replace keeps the counters (nft::replace), unless it has to fall
            // back to deleting the tables: read them first, so that loses nothing already counted.
            drops.read(state.applied(), &metrics).await;
            state.invalidate();
        }
        last_start = Some(tokio::time::Instant::now());
        // Every change that arrived before this point is in the index this sync compiles.
        let pending = cluster.take_pending();
        let generation = cluster.generation();

        let started = Instant::now();
        if full {
            // The periodic resync also recomputes every set from scratch.
            compiler.reset();
        }
        let compiled = compile_and_measure(&cluster, &config.node, &metrics, &mut compiler);
        let compile_time = started.elapsed();
        metrics
            .sync_duration
            .get_or_create(&vec![("phase", "compile")])
            .observe(compile_time.as_secs_f64());
        // Report each problem once, not on every sync.
        let current: BTreeSet<(String, String)> = compiled
            .problems
            .iter()
            .map(|p| (p.object.clone(), p.message.clone()))
            .collect();
        for (object, message) in current.difference(&reported) {
            tracing::warn!(%object, "{message}");
        }
        reported = current;

        let apply_started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let result = state.sync(&compiled.ruleset);
            (state, result)
        })
        .await;
        let (state, result) = match joined {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "the sync task failed; stopping reconcile");
                return;
            }
        };
        table = Some(state);
        let apply_time = apply_started.elapsed();
        metrics
            .sync_duration
            .get_or_create(&vec![("phase", "apply")])
            .observe(apply_time.as_secs_f64());
        match result {
            Ok(applied) => {
                let kind = if applied.full { "full" } else { "diff" };
                metrics
                    .syncs
                    .get_or_create(&vec![("result", "ok"), ("kind", kind)])
                    .inc();
                metrics.last_sync_failed.set(0);
                if applied.commands > 0 {
                    metrics
                        .transaction_commands
                        .observe(applied.commands as f64);
                }
                if let Some(since) = pending {
                    metrics
                        .programming_latency
                        .observe(since.elapsed().as_secs_f64());
                }
                health.set_sync_error(None);
                health.synced.store(true, Ordering::Release);
                cluster.mark_applied(generation);
                tracing::debug!(
                    kind,
                    commands = applied.commands,
                    compile_ms = compile_time.as_secs_f64() * 1e3,
                    apply_ms = apply_time.as_secs_f64() * 1e3,
                    "synced"
                );
            }
            Err(error) => {
                let kind = if full { "full" } else { "diff" };
                metrics
                    .syncs
                    .get_or_create(&vec![("result", "error"), ("kind", kind)])
                    .inc();
                metrics.last_sync_failed.set(1);
                if let Some(since) = pending {
                    cluster.restore_pending(since);
                }
                health.set_sync_error(Some(error.to_string()));
                tracing::error!(%error, node = %config.node, "sync failed; retrying with the whole table");
                // Retry soon, without waiting for the next change.
                cluster.changed.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The per-pod drop counters in the metrics. Reading zeroes the kernel's counters (see
/// `nft::take_counters`), so each read adds what was dropped since the previous one.
#[derive(Default)]
struct DropSeries {
    /// The label sets exported so far, to remove those of pods that are gone.
    exported: BTreeSet<crate::metrics::PodLabels>,
}

impl DropSeries {
    async fn read(&mut self, applied: Option<&crate::compile::Ruleset>, metrics: &Metrics) {
        let Some(applied) = applied else { return };
        let owners = applied.counters.clone();
        let read = tokio::task::spawn_blocking(|| {
            let nft = Nft::default();
            (
                crate::nft::take_counters(&nft),
                crate::nft::take_spoofed(&nft),
            )
        })
        .await;
        let values = match read {
            Ok((values, spoofed)) => {
                match spoofed {
                    Ok(Some(v)) => {
                        metrics.spoofed_packets.inc_by(v.packets);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, "could not read the anti-spoofing counter")
                    }
                }
                Ok(values)
            }
            Err(e) => Err(e),
        };
        let values = match values {
            Ok(Ok(values)) => values,
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not read the drop counters");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "the drop counter task failed");
                return;
            }
        };
        let mut current = BTreeSet::new();
        for value in values {
            // A counter the applied ruleset does not name is being removed: nothing to export.
            let Some(owner) = owners.get(&value.name) else {
                continue;
            };
            let labels: crate::metrics::PodLabels = vec![
                ("namespace", owner.namespace.clone()),
                ("pod", owner.pod.clone()),
                ("direction", owner.direction.as_str().to_string()),
            ];
            metrics
                .dropped_packets
                .get_or_create(&labels)
                .inc_by(value.packets);
            metrics
                .dropped_bytes
                .get_or_create(&labels)
                .inc_by(value.bytes);
            current.insert(labels);
        }
        for gone in self.exported.difference(&current) {
            metrics.dropped_packets.remove(gone);
            metrics.dropped_bytes.remove(gone);
        }
        self.exported = current;
    }
}

/// Compile this node's ruleset and update the gauges that describe the index and the result.
fn compile_and_measure(
    cluster: &Cluster,
    node: &str,
    metrics: &Metrics,
    compiler: &mut Compiler,
) -> Compiled {
    let mut index = cluster.index();
    // Under the lock: exactly the changes this compilation sees.
    let changes = index.take_changes();
    // A pass over every policy: only when one changed (every relist marks them changed).
    if changes.policies || changes.everything {
        metrics.policies.set(index.policies.len() as i64);
        let with_errors = index
            .policies
            .values()
            .filter(|p| !p.errors.is_empty())
            .count();
        metrics.policies_with_errors.set(with_errors as i64);
    }
    metrics
        .local_pods
        .set(index.local_pods(node).count() as i64);
    let compiled = compiler.compile(&index, node, &changes);
    drop(index);
    // Every isolated local pod has a drop counter per isolated direction (a compile test keeps
    // this equal to `compile::isolated_local_pods`), so no second pass over the pods.
    for direction in crate::model::Direction::ALL {
        let n = compiled
            .ruleset
            .counters
            .values()
            .filter(|c| c.direction == direction)
            .count();
        metrics
            .isolated_pods
            .get_or_create(&vec![("direction", direction.as_str())])
            .set(n as i64);
    }
    let size = compiled.ruleset.size();
    for (kind, n) in [
        ("sets", size.sets),
        ("set_elements", size.set_elements),
        ("chains", size.chains),
        ("rules", size.rules),
    ] {
        metrics
            .ruleset_objects
            .get_or_create(&vec![("kind", kind)])
            .set(n as i64);
    }
    compiled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_keeps_its_first_arrival_until_a_sync_succeeds() {
        let cluster = Cluster::default();
        assert_eq!(cluster.take_pending(), None);
        cluster.touch();
        let first = cluster.take_pending().expect("pending after a change");
        assert_eq!(cluster.take_pending(), None, "taken once");
        // A failed sync puts it back; a later change does not make it younger.
        cluster.touch();
        cluster.restore_pending(first);
        assert_eq!(cluster.take_pending(), Some(first));
    }

    #[test]
    fn not_ready_until_lists_are_in_and_the_first_sync_applied() {
        let cluster = Arc::new(Cluster::default());
        let health = Health::new(cluster.clone());
        let reason = health.not_ready().unwrap_or_default();
        assert!(
            reason.contains("pods, namespaces, networkpolicies"),
            "{reason}"
        );
        for kind in crate::watch::Kind::ALL {
            cluster.mark_listed(kind);
        }
        let reason = health.not_ready().unwrap_or_default();
        assert!(reason.contains("first sync"), "{reason}");
        health.synced.store(true, Ordering::Release);
        assert_eq!(health.not_ready(), None);
        health.set_sync_error(Some("nft: Error: Could not process rule".into()));
        let reason = health.not_ready().unwrap_or_default();
        assert!(
            reason.contains("the last sync failed") && reason.contains("nft: Error"),
            "{reason}"
        );
        health.set_bridge_problem(Some("br_netfilter is off".into()));
        assert_eq!(health.not_ready().as_deref(), Some("br_netfilter is off"));
        health.set_bridge_problem(None);
        health.set_sync_error(None);
        assert_eq!(health.not_ready(), None);
    }
}
