//! Loading a synthetic cluster (`synth.rs`) into a real API server, shared by the benchmarks
//! (`sluice-agent-bench`, `sluice-cluster-bench`): bulk creation with bounded concurrency and
//! retries, pods' status patched in as a kubelet would (pods without a kubelet: no network
//! namespace behind their addresses).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde::Serialize;
use serde_json::json;

use crate::synth::SynthCluster;

/// Progress on stderr, prefixed with the running program's name.
fn progress(msg: impl AsRef<str>) {
    let prog = std::env::args()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    eprintln!("{prog}: {}", msg.as_ref());
}

/// A client from a kubeconfig file (the admin one of a control plane or the local cluster).
pub async fn kube_client(kubeconfig: &Path) -> Result<Client> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .context("kube client configuration")?;
    Client::try_from(config).context("kube client")
}

pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Retries transient failures (overload, dropped connections) a few times.
pub async fn retry<T, F, Fut>(mut f: F) -> std::result::Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(100);
    for _ in 0..6 {
        match f().await {
            Err(e) if transient(&e) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    f().await
}

pub fn created<T>(r: std::result::Result<T, kube::Error>) -> std::result::Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        // A retried create whose first attempt went through.
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    /// API requests made (creates and status patches).
    pub requests: usize,
    pub namespaces_s: f64,
    pub pods_s: f64,
    /// Pods per second (each pod is a create and a status patch).
    pub pods_per_s: f64,
    pub policies_s: f64,
    pub total_s: f64,
}

/// Runs `f` on every item, `concurrency` at a time, with progress every 2 s.
pub async fn each<'a, T, F, Fut>(
    what: &str,
    items: &'a [T],
    concurrency: usize,
    f: F,
) -> Result<f64>
where
    F: Fn(&'a T) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), kube::Error>> + 'a,
{
    let started = Instant::now();
    let mut last = started;
    let mut done = 0usize;
    let mut stream = futures::stream::iter(items.iter().map(f)).buffer_unordered(concurrency);
    while let Some(r) = stream.next().await {
        r.with_context(|| format!("creating {what}"))?;
        done += 1;
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            progress(format!(
                "  {what}: {done}/{} ({:.0}/s)",
                items.len(),
                done as f64 / started.elapsed().as_secs_f64()
            ));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    progress(format!(
        "  {what}: {done} in {secs:.1} s ({:.0}/s)",
        done as f64 / secs.max(1e-9)
    ));
    Ok(secs)
}

pub async fn load_cluster(
    client: &Client,
    cluster: &SynthCluster,
    concurrency: usize,
) -> Result<LoadReport> {
    let started = Instant::now();
    let pp = PostParams::default();
    progress(format!(
        "loading {} namespaces, {} pods, {} policies through the API ({concurrency} concurrent requests)",
        cluster.namespaces.len(),
        cluster.pods.len(),
        cluster.policies.len()
    ));
    // Namespaces, each with its `default` ServiceAccount (no controller-manager makes it, and
    // the ServiceAccount admission plugin refuses pods without it).
    let namespaces_s = each("namespaces", &cluster.namespaces, concurrency, |ns| {
        let (client, pp) = (client.clone(), &pp);
        async move {
            let api: Api<Namespace> = Api::all(client.clone());
            created(retry(|| api.create(pp, ns)).await)?;
            let name = ns.name_any();
            let sa: ServiceAccount = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"namespace": name, "name": "default"},
            }))
            .map_err(kube::Error::SerdeError)?;
            let api: Api<ServiceAccount> = Api::namespaced(client, &name);
            created(retry(|| api.create(pp, &sa)).await)
        }
    })
    .await?;
    // Pods: create, then patch the status (phase, podIPs) as the kubelet would.
    let pods_s = each("pods", &cluster.pods, concurrency, |pod| {
        let (client, pp) = (client.clone(), &pp);
        async move {
            let ns = pod.namespace().unwrap_or_default();
            let name = pod.name_any();
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let mut spec_only = pod.clone();
            let status = spec_only.status.take();
            created(retry(|| api.create(pp, &spec_only)).await)?;
            let patch = Patch::Merge(json!({ "status": status }));
            let params = PatchParams::default();
            retry(|| api.patch_status(&name, &params, &patch))
                .await
                .map(|_| ())
        }
    })
    .await?;
    let policies_s = each("policies", &cluster.policies, concurrency, |policy| {
        let (client, pp) = (client.clone(), &pp);
        async move {
            let api: Api<NetworkPolicy> =
                Api::namespaced(client, &policy.namespace().unwrap_or_default());
            created(retry(|| api.create(pp, policy)).await)
        }
    })
    .await?;
    Ok(LoadReport {
        requests: cluster.namespaces.len() * 2 + cluster.pods.len() * 2 + cluster.policies.len(),
        namespaces_s,
        pods_s,
        pods_per_s: cluster.pods.len() as f64 / pods_s.max(1e-9),
        policies_s,
        total_s: started.elapsed().as_secs_f64(),
    })
}
