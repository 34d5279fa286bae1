//! A pod's "containers": one thread per declared port, inside the pod's network namespace
//! (entered with `setns` on that thread; its sockets stay there). TCP: accept, write one line
//! (`<namespace>/<name>\n`), close. UDP: echo each datagram back to its sender, from the address
//! it was sent to (what `crate::probe`'s UDP probe expects).

use anyhow::{anyhow, Context, Result};
use nix::errno::Errno;
use nix::libc;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn6,
};
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Write};
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

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

fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
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

/// Echoes datagrams from the address they were sent to (IPV6_PKTINFO; v4-mapped for IPv4), so a
/// multi-address namespace (a node, for hostNetwork pods) answers from the probed address.
fn echo_loop(sock: &Socket, stop: &AtomicBool) {
    let fd = sock.as_raw_fd();
    let mut buf = vec![0u8; 65536];
    let mut cmsg_buf = nix::cmsg_space!(libc::in6_pktinfo);
    while !stop.load(Ordering::Relaxed) {
        let (len, from, info) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<SockaddrIn6>(
                fd,
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::empty(),
            ) {
                Ok(m) => m,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(_) => {
                    // e.g. an IPv4-only socket: plain recv_from/send_to.
                    echo_plain(sock, stop);
                    return;
                }
            };
            let mut info = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::Ipv6PacketInfo(pi) = c {
                        info = Some(pi);
                    }
                }
            }
            let Some(from) = msg.address else { continue };
            (msg.bytes, from, info)
        };
        let data = [IoSlice::new(&buf[..len])];
        let _ = match info {
            Some(mut pi) => {
                let local = Ipv6Addr::from(pi.ipi6_addr.s6_addr);
                if local.segments()[0] & 0xffc0 != 0xfe80 {
                    pi.ipi6_ifindex = 0;
                }
                sendmsg(
                    fd,
                    &data,
                    &[ControlMessage::Ipv6PacketInfo(&pi)],
                    MsgFlags::empty(),
                    Some(&from),
                )
            }
            None => sendmsg(fd, &data, &[], MsgFlags::empty(), Some(&from)),
        };
    }
}

fn echo_plain(sock: &Socket, stop: &AtomicBool) {
    let udp: std::net::UdpSocket = match sock.try_clone() {
        Ok(s) => s.into(),
        Err(_) => return,
    };
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match udp.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = udp.send_to(&buf[..n], from);
            }
            Err(e) if transient(&e) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
