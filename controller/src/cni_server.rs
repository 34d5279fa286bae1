//! The agent's side of the CNI start gate: a unix socket where `sluice-cni` registers each new
//! pod attachment (its IPs, before the kubelet reports them) and waits until the pod's rules are
//! committed in the kernel. The wire protocol is `sluice_cni::protocol` (one JSON line each way).
//!
//! An `add` is answered only when a sync carrying the registration has been committed, so the
//! pod's first packet already meets its policy. The pod's labels come from the watch; until the
//! Pod is in the index its rules cannot be known, and the answer is "try again" (code 11), which
//! makes the runtime retry the sandbox: fail closed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_cni::protocol::{codes, AddRequest, Attachment, Request, Response, MAX_LINE};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::Health;
use crate::metrics::Metrics;
use crate::model::{AttachmentKey, PodKey, Registration};
use crate::watch::Cluster;

/// How long before the plugin's own deadline the agent answers "try again", so the plugin gets
/// a clear answer instead of timing out.
const ANSWER_MARGIN: Duration = Duration::from_millis(300);
/// How often a pending `add` looks for its Pod in the index.
const POD_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum CniSocketError {
    #[error("could not create the directory of the CNI socket {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("could not listen on the CNI socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Bind the socket, replacing a stale one left by a previous agent (its listener is gone; a
/// running plugin retries). Only root may connect (mode 0600): registrations change policy.
pub fn bind(path: &Path) -> Result<UnixListener, CniSocketError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CniSocketError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            return Err(CniSocketError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| CniSocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(listener)
}

/// State shared by the connections.
pub struct Server {
    cluster: Arc<Cluster>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Per live registration: when it was made and the generation that carries it.
    registered: Mutex<BTreeMap<AttachmentKey, (Instant, u64)>>,
    /// A registration whose Pod never shows up in the index is dropped after this long.
    orphan_ttl: Duration,
}

fn key(a: &Attachment) -> AttachmentKey {
    AttachmentKey {
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
    }
}

impl Server {
    pub fn new(
        cluster: Arc<Cluster>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        orphan_ttl: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            health,
            metrics,
            registered: Mutex::default(),
            orphan_ttl,
        })
    }

    fn registered(&self) -> std::sync::MutexGuard<'_, BTreeMap<AttachmentKey, (Instant, u64)>> {
        self.registered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accept connections until the task is aborted; each is served on its own task.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(self.clone().connection(stream));
                }
                Err(error) => {
                    tracing::warn!(%error, "CNI socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(MAX_LINE as u64));
        let response = match reader.read_line(&mut line).await {
            Ok(0) => return,
            Ok(_) => match Request::from_line(&line) {
                Ok(request) => {
                    let op = request.op();
                    let started = Instant::now();
                    let response = self.handle(request).await;
                    let result = if response.ok { "ok" } else { "error" };
                    self.metrics
                        .cni_requests
                        .get_or_create(&vec![("op", op), ("result", result)])
                        .inc();
                    if op == "add" && response.ok {
                        self.metrics
                            .cni_add_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    response
                }
                Err(e) => Response::error(codes::DECODE_FAILURE, e.to_string()),
            },
            Err(e) => Response::error(codes::IO_FAILURE, format!("reading the request: {e}")),
        };
        let _ = write.write_all(response.to_line().as_bytes()).await;
        let _ = write.shutdown().await;
    }

    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Add(add) => self.add(add).await,
            Request::Del(a) => {
                let known = self.cluster.index().unregister(&key(&a));
                self.registered().remove(&key(&a));
                if known {
                    self.cluster.touch();
                    tracing::debug!(container = %a.container_id, ifname = %a.ifname, "CNI DEL: unregistered");
                }
                Response::ok()
            }
            Request::Check(a) => {
                let Some((_, generation)) = self.registered().get(&key(&a)).copied() else {
                    return Response::error(
                        codes::UNKNOWN_CONTAINER,
                        format!(
                            "the agent has no registration for container {} interface {}",
                            a.container_id, a.ifname
                        ),
                    );
                };
                if self.cluster.is_applied(generation) {
                    Response::ok()
                } else {
                    Response::error(
                        codes::TRY_AGAIN,
                        "the pod's rules are not in the kernel yet",
                    )
                }
            }
            Request::Status => match self.health.not_ready() {
                None => Response::ok(),
                Some(reason) => Response::error(codes::NOT_AVAILABLE, reason),
            },
            Request::Gc { valid } => {
                let valid: std::collections::BTreeSet<AttachmentKey> =
                    valid.iter().map(key).collect();
                let stale: Vec<AttachmentKey> = {
                    let index = self.cluster.index();
                    index
                        .registrations()
                        .map(|r| r.attachment.clone())
                        .filter(|a| !valid.contains(a))
                        .collect()
                };
                if !stale.is_empty() {
                    let mut index = self.cluster.index();
                    for a in &stale {
                        index.unregister(a);
                    }
                    drop(index);
                    let mut registered = self.registered();
                    for a in &stale {
                        registered.remove(a);
                    }
                    drop(registered);
                    self.cluster.touch();
                    tracing::info!(dropped = stale.len(), "CNI GC: dropped stale registrations");
                }
                Response::ok()
            }
        }
    }

    async fn add(&self, add: AddRequest) -> Response {
        let pod = PodKey::new(add.namespace.clone(), add.pod.clone());
        if add.ips.is_empty() {
            return Response::error(
                codes::INVALID_CONFIG,
                format!("CNI ADD for pod {pod} carries no IP address (is sluice-cni chained after flannel?)"),
            );
        }
        let budget = Duration::from_millis(add.timeout_ms)
            .saturating_sub(ANSWER_MARGIN)
            .max(Duration::from_millis(100));
        let deadline = tokio::time::Instant::now() + budget;
        let attachment = AttachmentKey {
            container_id: add.container_id.clone(),
            ifname: add.ifname.clone(),
        };
        let registration = Registration {
            attachment: attachment.clone(),
            pod: pod.clone(),
            ips: add.ips.clone(),
            host_veth: add.host_veth.clone(),
        };
        // Register at once: the pod's IPs are known now, and nothing is allowed to or from them
        // that policy forbids once the sync lands.
        let changed = self.cluster.index().register(registration);
        let generation = if changed {
            self.cluster.touch()
        } else {
            self.cluster.generation()
        };
        self.registered()
            .insert(attachment, (Instant::now(), generation));
        tracing::debug!(%pod, ips = ?add.ips, veth = %add.host_veth, "CNI ADD: registered");

        // The rules depend on the pod's labels: wait for the watch to deliver the Pod.
        while !self.cluster.index().pods.contains_key(&pod) {
            if tokio::time::Instant::now() >= deadline {
                return Response::error(
                    codes::TRY_AGAIN,
                    format!("pod {pod} is not in the agent's cache yet, so its policy is unknown; the runtime will retry"),
                );
            }
            tokio::time::sleep(POD_POLL).await;
        }
        // The Pod arrived after the registration: a sync after its arrival carries both.
        let generation = generation.max(self.cluster.generation());
        match tokio::time::timeout_at(deadline, self.cluster.wait_applied(generation)).await {
            Ok(()) => Response::ok(),
            Err(_) => {
                let why = self
                    .health
                    .not_ready()
                    .unwrap_or_else(|| "the sync is slow".into());
                Response::error(
                    codes::TRY_AGAIN,
                    format!("the rules of pod {pod} were not in the kernel within {}ms ({why}); the runtime will retry", budget.as_millis()),
                )
            }
        }
    }

    /// Drop registrations whose Pod has not appeared in the index for `orphan_ttl`.
    pub async fn sweep_orphans(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.orphan_ttl / 4);
        loop {
            tick.tick().await;
            let old: Vec<AttachmentKey> = self
                .registered()
                .iter()
                .filter(|(_, (at, _))| at.elapsed() > self.orphan_ttl)
                .map(|(a, _)| a.clone())
                .collect();
            let mut dropped = Vec::new();
            {
                let mut index = self.cluster.index();
                for a in old {
                    let orphan = index
                        .registration(&a)
                        .is_some_and(|r| !index.pods.contains_key(&r.pod));
                    if orphan {
                        let pod = index.registration(&a).map(|r| r.pod.to_string());
                        index.unregister(&a);
                        dropped.push((a, pod.unwrap_or_default()));
                    }
                }
            }
            if dropped.is_empty() {
                continue;
            }
            let mut registered = self.registered();
            for (a, pod) in &dropped {
                registered.remove(a);
                tracing::warn!(%pod, container = %a.container_id, "dropped a CNI registration whose pod never appeared in the API");
            }
            drop(registered);
            self.cluster.touch();
        }
    }
}
