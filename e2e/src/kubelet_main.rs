//! `sluice-kubelet`: the local cluster's kubelet stand-in (see `sluice_e2e::kubelet::USAGE`).

use anyhow::{bail, Context, Result};
use sluice_e2e::kubelet::{self, host, Config, Kubelet, USAGE};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

struct Args {
    cfg: Config,
    host_mountns: Option<PathBuf>,
    cleanup: bool,
}

fn parse(argv: Vec<String>) -> Result<Option<Args>> {
    let mut node = None;
    let mut kubeconfig = None;
    let mut conf_dir = None;
    let mut bin_dirs = None;
    let mut prefix = None;
    let mut state_dir = None;
    let mut node_ips = Vec::new();
    let mut host_mountns = None;
    let mut cleanup = false;
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => bail!("{name} needs a value"),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--node" => node = Some(value("--node")?),
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(value("--kubeconfig")?)),
            "--cni-conf-dir" => conf_dir = Some(PathBuf::from(value("--cni-conf-dir")?)),
            "--cni-bin-dir" => bin_dirs = Some(value("--cni-bin-dir")?),
            "--netns-prefix" => prefix = Some(value("--netns-prefix")?),
            "--state-dir" => state_dir = Some(PathBuf::from(value("--state-dir")?)),
            "--node-ip" => {
                for ip in value("--node-ip")?.split(',').filter(|s| !s.is_empty()) {
                    node_ips.push(
                        ip.parse::<IpAddr>()
                            .with_context(|| format!("--node-ip: `{ip}` is not an IP address"))?,
                    );
                }
            }
            "--host-mountns" => host_mountns = Some(PathBuf::from(value("--host-mountns")?)),
            "--cleanup" => cleanup = true,
            other => bail!("unknown argument `{other}` (see --help)"),
        }
    }
    let Some(node) = node.filter(|n| !n.is_empty()) else {
        bail!("--node is required")
    };
    let Some(conf_dir) = conf_dir else {
        bail!("--cni-conf-dir is required")
    };
    let Some(bin_dirs) = bin_dirs else {
        bail!("--cni-bin-dir is required")
    };
    let Some(prefix) = prefix.filter(|p| !p.is_empty() && !p.contains('/')) else {
        bail!("--netns-prefix is required (non-empty, no '/')")
    };
    if kubeconfig.is_none() && !cleanup {
        bail!("--kubeconfig is required");
    }
    let state_dir = state_dir.unwrap_or_else(|| PathBuf::from("/run/sluice-kubelet").join(&node));
    Ok(Some(Args {
        cfg: Config {
            node,
            kubeconfig,
            cni_conf_dir: conf_dir,
            cni_bin_dirs: bin_dirs
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect(),
            netns_prefix: prefix,
            state_dir,
            node_ips,
        },
        host_mountns,
        cleanup,
    }))
}

fn main() {
    let args = match parse(std::env::args().skip(1).collect()) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("sluice-kubelet: {e:#}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let node = args.cfg.node.clone();
    if let Err(e) = real_main(args) {
        kubelet::log(&node, format!("error: {e:#}"));
        std::process::exit(1);
    }
}

fn real_main(args: Args) -> Result<()> {
    let cfg = args.cfg;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    // Before any thread exists: choose the host's mount namespace, then leave it.
    let host_ns = host::host_mount_ns(args.host_mountns.as_deref())?;
    let lib = host::private_mounts(&cfg.state_dir)?;
    kubelet::log(
        &cfg.node,
        format!(
            "/var/lib/cni is {} in this process's mount namespace; pod namespaces are added in {}",
            lib.display(),
            host_ns.source
        ),
    );
    let kubeconfig = cfg.kubeconfig.clone();
    let k = Arc::new(Kubelet::new(cfg, host_ns)?);
    if args.cleanup {
        k.cleanup_all();
        return Ok(());
    }
    {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("registering signal handlers")?;
        let node = k.cfg.node.clone();
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                kubelet::log(
                    &node,
                    format!("signal {sig}: exiting; pod namespaces and CNI attachments stay"),
                );
                std::process::exit(0);
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let path = kubeconfig.context("--kubeconfig is required")?;
        let file = kube::config::Kubeconfig::read_from(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .context("kubeconfig")?;
        let client = kube::Client::try_from(config).context("kube client")?;
        kubelet::run(k, client).await
    })
}
