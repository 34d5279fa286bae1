//! `sluice`: the node agent's binary and the tools to look inside policy decisions.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use sluice::compile::compile_node;
use sluice::model::{Family, PodKey, Protocol};
use sluice::policy::allowed;
use sluice::snapshot::{load_snapshot, World};

/// Kubernetes NetworkPolicy for flannel clusters, decided in the kernel by nftables.
///
/// sluice compiles every NetworkPolicy, Pod and Namespace into one nftables table per node
/// (`inet sluice`), made of sets and verdict maps, so the cost per packet does not grow with
/// the cluster. The commands below look at what it decides without touching the kernel.
#[derive(Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Is a connection allowed, and why? Evaluates NetworkPolicy semantics directly.
    ///
    /// Prints, per address family, the verdict and the reason on each side: which policy and
    /// rule allowed it, or which policies isolate the pod. Exit status: 0 allowed, 1 denied,
    /// 2 error (unknown pod, unreadable snapshot).
    ///
    /// Example: sluice explain --snapshot cluster.yaml --from y/b --to x/a --port 80
    Explain {
        /// YAML file of Nodes, Namespaces, Pods and NetworkPolicies: `kubectl get -o yaml`
        /// output (Lists are unpacked) or a scenario file (applied in order; probes ignored).
        #[arg(long, value_name = "FILE")]
        snapshot: String,
        /// Client pod, as namespace/name.
        #[arg(long, value_name = "NS/POD")]
        from: PodKey,
        /// Server pod, as namespace/name.
        #[arg(long, value_name = "NS/POD")]
        to: PodKey,
        /// Destination port.
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, default_value = "tcp", ignore_case = true)]
        protocol: ProtocolArg,
        /// Only this address family (default: every family the server has).
        #[arg(long, value_enum, ignore_case = true)]
        family: Option<FamilyArg>,
    },
    /// Print the nftables ruleset sluice would program on a node, as `nft -f` input.
    ///
    /// Example: sluice render --snapshot cluster.yaml --node node-1 | nft -c -f -
    Render {
        /// Same format as for `explain`.
        #[arg(long, value_name = "FILE")]
        snapshot: String,
        /// The node whose pods the ruleset enforces.
        #[arg(long)]
        node: String,
    },
    /// Run the node agent: watch the API server and keep this node's table in the kernel.
    ///
    /// Watches Pods, Namespaces (metadata only) and NetworkPolicies cluster-wide, compiles
    /// the rules for the pods on this node into `table inet sluice` and applies every change
    /// as one nftables transaction. The first sync replaces the table atomically; stopping
    /// (SIGTERM) leaves the rules in place, so enforcement survives restarts and upgrades
    /// (with --daemonset, a stop after that DaemonSet was deleted removes them: uninstall).
    /// Needs CAP_NET_ADMIN (nft) and br_netfilter with net.bridge.bridge-nf-call-ip{,6}tables
    /// set to 1 (the agent sets them when it can and is not ready otherwise).
    ///
    /// Log level: RUST_LOG (default info; debug prints one line per sync).
    Agent(AgentArgs),
    /// Chain sluice-cni after flannel on this node, and keep it chained (the DaemonSet's
    /// install-cni container).
    ///
    /// Copies the sluice-cni binary into the host's CNI bin dir, then writes
    /// `05-sluice.conflist` into the CNI conf dir: flannel's conflist (its plugins unchanged,
    /// same network name) followed by sluice-cni. The runtime uses the first conflist by name,
    /// so ours is used while it exists. Flannel rewrites its file when its pod restarts; this
    /// re-derives ours whenever flannel's changes (checked every --interval). A flannel file
    /// it does not understand is reported (file and field) and nothing is written: the node's
    /// configuration stays as it was. SIGTERM leaves everything in place (upgrades keep the
    /// start gate; with --daemonset, a stop after that DaemonSet was deleted uninstalls);
    /// --uninstall removes what it wrote, and flannel's chain alone takes over.
    InstallCni(InstallCniArgs),
}

#[derive(clap::Args)]
struct InstallCniArgs {
    /// The host's CNI bin dir, as mounted into the container.
    #[arg(long, env = "SLUICE_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    cni_bin_dir: std::path::PathBuf,
    /// The host's CNI conf dir, as mounted into the container.
    #[arg(
        long,
        env = "SLUICE_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    cni_conf_dir: std::path::PathBuf,
    /// The sluice-cni binary to install. Default: `sluice-cni` next to this binary.
    #[arg(long, value_name = "FILE")]
    plugin_binary: Option<std::path::PathBuf>,
    /// Flannel's conflist in the conf dir. Default: 10-flannel.conflist, else the first
    /// *.conflist with a flannel plugin.
    #[arg(long, env = "SLUICE_FLANNEL_CONFLIST", value_name = "NAME")]
    flannel_conflist: Option<String>,
    /// The agent's CNI socket, written into sluice-cni's config.
    #[arg(long, env = "SLUICE_CNI_SOCKET", default_value = sluice_cni::protocol::DEFAULT_SOCKET)]
    agent_socket: String,
    /// How long a pod's start waits for its policy (sluice-cni's `timeout`). Units: ms, s, m.
    #[arg(long, env = "SLUICE_CNI_TIMEOUT", default_value = "10s", value_parser = sluice_cni::config::parse_duration)]
    timeout: std::time::Duration,
    /// What a pod's start does when the agent cannot confirm its policy in time: `closed`
    /// fails the start (the runtime retries; no pod runs without its rules), `open` lets it
    /// start and says so in the runtime's log.
    #[arg(
        long,
        env = "SLUICE_CNI_FAIL_MODE",
        value_enum,
        default_value = "closed"
    )]
    fail_mode: FailModeArg,
    /// How often flannel's conflist is checked for changes.
    #[arg(long, default_value = "2s", value_parser = sluice::duration::parse)]
    interval: std::time::Duration,
    /// Install (or update) once and exit.
    #[arg(long)]
    once: bool,
    /// Remove the conflist this command wrote and the sluice-cni binary, then exit.
    #[arg(long, conflicts_with = "once")]
    uninstall: bool,
    /// On SIGTERM, do what --uninstall does before exiting (the chart's
    /// `uninstall.cleanupOnExit`: every stop, an upgrade's too, then unchains sluice-cni).
    #[arg(long, conflicts_with_all = ["once", "uninstall"])]
    uninstall_on_exit: bool,
    /// The DaemonSet this runs in (the chart's `uninstall.cleanupOnDelete`). A SIGTERM after
    /// it was seen deleted (`helm uninstall`) does what --uninstall does; a restart or an
    /// upgrade (the DaemonSet still there) keeps the chain. Needs get/list/watch on that one
    /// DaemonSet; a DaemonSet never seen never triggers the cleanup.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with_all = ["once", "uninstall"])]
    daemonset: Option<sluice::owner::DaemonSetRef>,
    /// Kubeconfig file for --daemonset. Default: $KUBECONFIG, else ~/.kube/config, else the
    /// in-cluster service account.
    #[arg(long, value_name = "FILE", requires = "daemonset")]
    kubeconfig: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailModeArg {
    Closed,
    Open,
}

fn install_cni(args: InstallCniArgs) -> Result<ExitCode, String> {
    use sluice::install_cni::{Installer, PluginSettings};
    init_logging();
    let plugin_binary = match args.plugin_binary {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this binary's directory: {e}"))?
            .with_file_name("sluice-cni"),
    };
    let installer = Installer {
        bin_dir: args.cni_bin_dir,
        conf_dir: args.cni_conf_dir,
        plugin_binary,
        flannel_conflist: args.flannel_conflist,
        settings: PluginSettings {
            agent_socket: args.agent_socket,
            timeout: format!("{}ms", args.timeout.as_millis()),
            fail_mode: match args.fail_mode {
                FailModeArg::Closed => "closed",
                FailModeArg::Open => "open",
            }
            .into(),
        },
    };
    if args.uninstall {
        installer.uninstall().map_err(|e| e.to_string())?;
        tracing::info!(
            "removed {} and sluice-cni; flannel's chain alone is in use",
            installer.our_conflist().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.once {
        installer.install_binary().map_err(|e| e.to_string())?;
        installer.sync_conflist().map_err(|e| e.to_string())?;
        tracing::info!(
            "installed sluice-cni and wrote {}",
            installer.our_conflist().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // A signal wakes the install loop at once: it sleeps on this channel between checks.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| format!("could not install the signal handler: {e}"))?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = stop_tx.send(());
        }
    });
    // The DaemonSet's watch runs beside the (blocking) install loop.
    let owner = match args.daemonset {
        Some(ds) => Some(start_owner_watch(ds, args.kubeconfig)?),
        None => None,
    };
    installer
        .run(args.interval, &|wait| {
            !matches!(
                stop_rx.recv_timeout(wait),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            )
        })
        .map_err(|e| e.to_string())?;
    let uninstalled = match owner {
        Some((runtime, Some(watch))) => {
            runtime.block_on(watch.uninstalled_at_stop(std::time::Duration::from_secs(2)))
        }
        _ => false,
    };
    if args.uninstall_on_exit || uninstalled {
        installer.uninstall().map_err(|e| e.to_string())?;
        tracing::info!(
            "stopping ({}): removed {} and sluice-cni; flannel's chain alone is in use",
            if uninstalled {
                "the DaemonSet is deleted: uninstall"
            } else {
                "--uninstall-on-exit"
            },
            installer.our_conflist().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!("stopping; the chained conflist stays in place");
    Ok(ExitCode::SUCCESS)
}

/// The watch of install-cni's DaemonSet and the runtime it runs on (`None`: no client).
type DaemonSetWatch = (tokio::runtime::Runtime, Option<sluice::owner::OwnerWatch>);

/// Starts watching the DaemonSet on a runtime of its own. A client that cannot be made is not
/// fatal: installing the chain matters more, and no watch means no cleanup (the log says so).
fn start_owner_watch(
    ds: sluice::owner::DaemonSetRef,
    kubeconfig: Option<String>,
) -> Result<DaemonSetWatch, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("could not start the async runtime: {e}"))?;
    let watch = runtime.block_on(async {
        match sluice::agent::kube_client(kubeconfig.as_deref()).await {
            Ok(client) => Some(sluice::owner::OwnerWatch::start(client, ds)),
            Err(e) => {
                tracing::warn!(daemonset = %ds, error = %e,
                    "no Kubernetes client: stops will not clean this node up");
                None
            }
        }
    });
    Ok((runtime, watch))
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = std::io::stderr();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&stderr))
        .with_writer(std::io::stderr)
        .init();
}

#[derive(clap::Args)]
struct AgentArgs {
    /// The node this agent enforces policy for: only pods scheduled here get rules.
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// Kubeconfig file to reach the API server. Default: $KUBECONFIG, else ~/.kube/config,
    /// else the in-cluster service account (kube's Config::infer).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<String>,
    /// Address for HTTP: /healthz, /readyz (the reason when not ready), /metrics.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:9763")]
    listen: std::net::SocketAddr,
    /// How often the whole table is replaced from the index, repairing any drift (someone
    /// deleting or editing the table). Units: ms, s, m, h.
    #[arg(long, env = "SLUICE_RESYNC", default_value = "5m", value_parser = sluice::duration::parse)]
    resync: std::time::Duration,
    /// How long a change waits for more changes before the table is synced: a burst of
    /// API events becomes one transaction. It adds to the time from `kubectl apply` to
    /// enforcement, so keep it short. Units: ms, s, m, h.
    #[arg(long, env = "SLUICE_DEBOUNCE", default_value = "1ms", value_parser = sluice::duration::parse)]
    debounce: std::time::Duration,
    /// The least time between the starts of two syncs: bounds the sync rate (and the CPU
    /// spent compiling) when changes never stop; changes meanwhile coalesce into the next
    /// sync. A lone change after a quiet spell never waits for it. Units: ms, s, m, h.
    #[arg(long, env = "SLUICE_MIN_SYNC_INTERVAL", default_value = "50ms", value_parser = sluice::duration::parse)]
    min_sync_interval: std::time::Duration,
    /// How often the per-pod drop counters are read from the kernel into
    /// sluice_dropped_packets_total / sluice_dropped_bytes_total. Reading resets the kernel's
    /// counters, so `nft list counters` by hand shows only what was dropped since the last read.
    #[arg(long, env = "SLUICE_DROP_COUNTERS_INTERVAL", default_value = "10s", value_parser = sluice::duration::parse)]
    drop_counters_interval: std::time::Duration,
    /// Unix socket for the sluice-cni plugin: it registers each new pod's IPs here and waits
    /// until the pod's rules are in the kernel (the start gate). Only root may connect. An
    /// empty value turns the gate off (the plugin then fails or proceeds per its failMode).
    #[arg(long, env = "SLUICE_CNI_SOCKET", default_value = sluice_cni::protocol::DEFAULT_SOCKET)]
    cni_socket: String,
    /// A CNI registration whose Pod never appears in the API is dropped after this long.
    #[arg(long, env = "SLUICE_CNI_ORPHAN_TTL", default_value = "2m", value_parser = sluice::duration::parse)]
    cni_orphan_ttl: std::time::Duration,
    /// Remove `table inet sluice` and the anti-spoofing `table bridge sluice` from this network
    /// namespace and exit (uninstall): pods are no longer isolated afterwards.
    #[arg(long)]
    cleanup: bool,
    /// On SIGTERM, do what --cleanup does before exiting (the chart's
    /// `uninstall.cleanupOnExit`): the node is no longer enforced after every stop, an
    /// upgrade's too, until the next agent's first sync.
    #[arg(long, conflicts_with = "cleanup")]
    cleanup_on_exit: bool,
    /// The DaemonSet this agent runs in (the chart's `uninstall.cleanupOnDelete`). A SIGTERM
    /// after it was seen deleted (`helm uninstall`) does what --cleanup does; a restart or an
    /// upgrade (the DaemonSet still there) keeps the rules. Needs get/list/watch on that one
    /// DaemonSet; a DaemonSet never seen never triggers the cleanup.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "cleanup")]
    daemonset: Option<sluice::owner::DaemonSetRef>,
}

fn agent(args: AgentArgs) -> Result<ExitCode, String> {
    init_logging();
    if args.cleanup {
        sluice::agent::cleanup(&sluice::nft::Nft::default()).map_err(|e| e.to_string())?;
        tracing::info!("removed table inet sluice and table bridge sluice");
        return Ok(ExitCode::SUCCESS);
    }
    let node = args
        .node_name
        .filter(|n| !n.is_empty())
        .ok_or("--node-name (or NODE_NAME) is required")?;
    let config = sluice::agent::Config {
        node,
        kubeconfig: args.kubeconfig.filter(|k| !k.is_empty()),
        listen: args.listen,
        resync: args.resync,
        debounce: args.debounce,
        min_sync_interval: args.min_sync_interval,
        drop_counters_interval: args.drop_counters_interval,
        cni_socket: Some(args.cni_socket)
            .filter(|s| !s.is_empty())
            .map(std::path::PathBuf::from),
        cni_orphan_ttl: args.cni_orphan_ttl,
        daemonset: args.daemonset,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("could not start the async runtime: {e}"))?;
    let stopped = runtime
        .block_on(sluice::agent::run(config))
        .map_err(|e| e.to_string())?;
    if args.cleanup_on_exit || stopped.uninstalled {
        sluice::agent::cleanup(&sluice::nft::Nft::default()).map_err(|e| e.to_string())?;
        tracing::info!(
            "stopping ({}): removed table inet sluice and table bridge sluice",
            if stopped.uninstalled {
                "the DaemonSet is deleted: uninstall"
            } else {
                "--cleanup-on-exit"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
    Sctp,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
            ProtocolArg::Sctp => Protocol::Sctp,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    #[value(name = "IPv4", alias = "ipv4", alias = "4")]
    V4,
    #[value(name = "IPv6", alias = "ipv6", alias = "6")]
    V6,
}

fn load(path: &str) -> Result<World, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let (world, warnings) = load_snapshot(path, &text).map_err(|e| e.to_string())?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(world)
}

fn explain(
    world: &World,
    from: &PodKey,
    to: &PodKey,
    port: u16,
    protocol: Protocol,
    family: Option<Family>,
) -> Result<bool, String> {
    let server = world
        .index
        .pods
        .get(to)
        .ok_or_else(|| format!("pod {to} is not in the snapshot"))?;
    let families: Vec<Family> = match family {
        Some(f) => vec![f],
        None => server.families(),
    };
    if families.is_empty() {
        return Err(format!("pod {to} has no IP address"));
    }
    let mut all = true;
    for family in families {
        let v =
            allowed(&world.index, from, to, protocol, port, family).map_err(|e| e.to_string())?;
        let pods = &world.index.pods;
        let addr = |k: &PodKey| {
            pods.get(k)
                .and_then(|p| p.ip(family))
                .map(|ip| ip.to_string())
                .unwrap_or_default()
        };
        println!(
            "{from} -> {to} {protocol}/{port} over {family} ({} -> {}): {}",
            addr(from),
            addr(to),
            if v.allowed() { "ALLOWED" } else { "DENIED" }
        );
        println!("  egress of {from}: {}", v.egress);
        println!("  ingress of {to}: {}", v.ingress);
        all &= v.allowed();
    }
    Ok(all)
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Explain {
            snapshot,
            from,
            to,
            port,
            protocol,
            family,
        } => {
            let world = load(&snapshot)?;
            let family = family.map(|f| match f {
                FamilyArg::V4 => Family::V4,
                FamilyArg::V6 => Family::V6,
            });
            let ok = explain(&world, &from, &to, port, protocol.into(), family)?;
            // Like grep: 0 when allowed, 1 when denied, 2 on errors.
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Render { snapshot, node } => {
            let world = load(&snapshot)?;
            if !world.nodes.contains_key(&node) {
                let known: Vec<&str> = world.nodes.keys().map(String::as_str).collect();
                return Err(format!(
                    "node {node:?} is not in the snapshot (nodes: {})",
                    known.join(", ")
                ));
            }
            let compiled = compile_node(&world.index, &node);
            for p in &compiled.problems {
                eprintln!("warning: {}: {}", p.object, p.message);
            }
            print!("{}", sluice::nft::render(&compiled.ruleset));
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => agent(args),
        Command::InstallCni(args) => install_cni(args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::from(2)
        }
    }
}
