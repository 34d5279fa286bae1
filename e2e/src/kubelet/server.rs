//! A pod's "containers": one thread per declared port, inside the pod's network namespace
//! (entered with `setns` on that thread; its sockets stay there). TCP: accept, write one line
//! (`<namespace>/<name>\n`), close. UDP: echo each datagram back to its sender, from the address
//! it was sent to (what `crate::probe`'s UDP probe expects).

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::io::Write;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

// The datagram echo (answering from the probed address) is the lab's: the probes that talk to
// these servers are the same.
use crate::probe::{echo_loop, transient};

/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(100);
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const STACK: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// A pod's servers; dropping it stops them (within ~100 ms).
#[derive(Default)]
pub struct PodServers {
    running: Vec<Running>,
    /// (port, proto) pairs listening.
    pub listening: Vec<(u16, Proto)>,
}

impl std::fmt::Debug for PodServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodServers")
            .field("listening", &self.listening)
            .finish()
    }
}

impl PodServers {
    /// Starts one server per port in the namespace `netns` refers to; returns when each listens
    /// or failed. Failures are returned per port; the ones that listen keep running.
    pub fn start(
        netns: &File,
        ports: &[(u16, Proto)],
        greeting: &str,
    ) -> (PodServers, Vec<(u16, Proto, String)>) {
        let mut servers = PodServers::default();
        let mut failed = Vec::new();
        for &(port, proto) in ports {
            match start_one(netns, port, proto, greeting) {
                Ok(r) => {
                    servers.running.push(r);
                    servers.listening.push((port, proto));
                }
                Err(e) => failed.push((port, proto, format!("{e:#}"))),
            }
        }
        (servers, failed)
    }

    pub fn stop(&mut self) {
        for r in &self.running {
            r.stop.store(true, Ordering::Relaxed);
        }
        for r in &mut self.running {
            if let Some(h) = r.handle.take() {
                let _ = h.join();
            }
        }
        self.running.clear();
        self.listening.clear();
    }
}

impl Drop for PodServers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start_one(netns: &File, port: u16, proto: Proto, greeting: &str) -> Result<Running> {
    let ns = netns.try_clone().context("duplicating the netns handle")?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let (tx, rx) = mpsc::channel::<std::result::Result<(), String>>();
    let line = format!("{greeting}\n");
    let handle = std::thread::Builder::new()
        .name(format!("pod-{proto}{port}"))
        .stack_size(STACK)
        .spawn(move || {
            let sock = match listen(&ns, port, proto) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            drop(ns);
            if tx.send(Ok(())).is_err() {
                return;
            }
            match proto {
                Proto::Tcp => accept_loop(&sock, &thread_stop, line.as_bytes()),
                Proto::Udp => echo_loop(&sock, &thread_stop),
            }
        })
        .context("spawning a server thread")?;
    let mut running = Running {
        stop,
        handle: Some(handle),
    };
    let result = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(())) => return Ok(running),
        Ok(Err(e)) => Err(anyhow!("{proto}/{port}: {e}")),
        Err(_) => Err(anyhow!(
            "{proto}/{port}: not listening within {READY_TIMEOUT:?}"
        )),
    };
    running.stop.store(true, Ordering::Relaxed);
    if let Some(h) = running.handle.take() {
        let _ = h.join();
    }
    result
}

fn listen(netns: &File, port: u16, proto: Proto) -> Result<Socket> {
    setns(netns, CloneFlags::CLONE_NEWNET).context("setns into the pod's netns")?;
    let (ty, p) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    // Dual-stack where IPv6 exists; IPv4 only where it does not (disable_ipv6=1).
    let (sock, addr) = match Socket::new(Domain::IPV6, ty, Some(p)) {
        Ok(s) => {
            s.set_only_v6(false).context("IPV6_V6ONLY=0")?;
            (s, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        }
        Err(_) => (
            Socket::new(Domain::IPV4, ty, Some(p)).context("socket")?,
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
        ),
    };
    sock.set_reuse_address(true).context("SO_REUSEADDR")?;
    sock.set_read_timeout(Some(POLL)).context("SO_RCVTIMEO")?;
    sock.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    match proto {
        Proto::Udp if addr.is_ipv6() => {
            setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true).context("IPV6_RECVPKTINFO")?
        }
        Proto::Udp => {}
        Proto::Tcp => sock.listen(1024).context("listen")?,
    }
    Ok(sock)
}

fn accept_loop(sock: &Socket, stop: &AtomicBool, line: &[u8]) {
    while !stop.load(Ordering::Relaxed) {
        match sock.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_write_timeout(Some(POLL));
                let mut conn = conn;
                let _ = conn.write_all(line);
            }
            Err(e) if transient(&e) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
