//! Real connections between lab namespaces: servers (TCP accept-and-close, UDP echo, SCTP
//! accept-and-close) and probe clients, each run from inside a network namespace.
//!
//! A namespace is entered by `setns` on a dedicated thread; sockets stay in the namespace they
//! were created in, so a server thread keeps serving there.

use crate::netns::{enter_netns, open_netns};
use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::libc;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn6,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often server threads look at their stop flag.
const SERVER_POLL: Duration = Duration::from_millis(100);
/// How long `Servers::ensure` waits for a server thread to report it is listening.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Stack of each probe thread (they hold one socket and a small buffer).
const PROBE_STACK: usize = 256 * 1024;
/// UDP probes resend this many times within their timeout (in case of loss).
const UDP_SENDS: u32 = 4;

const IPPROTO_SCTP: i32 = 132;

/// The transport protocol of a probe (the core's own type).
pub use sluice::model::Protocol as Proto;

/// True if this kernel can create SCTP sockets (checked once).
pub fn sctp_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        Socket::new(
            Domain::IPV4,
            Type::STREAM,
            Some(Protocol::from(IPPROTO_SCTP)),
        )
        .is_ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Servers

struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// Owns the server threads; dropping it stops them (within ~100 ms).
pub struct Servers {
    running: HashMap<(String, u16, Proto), Server>,
}

impl Default for Servers {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.running.keys().collect();
        keys.sort();
        f.debug_struct("Servers").field("running", &keys).finish()
    }
}

impl Servers {
    pub fn new() -> Self {
        Servers {
            running: HashMap::new(),
        }
    }

    /// Ensures something listens in `netns` on `port`/`proto` on every address, IPv4 and IPv6
    /// (one dual-stack socket bound to `[::]`). Idempotent. TCP and SCTP: accept and close.
    /// UDP: echo each datagram back to its sender, from the address it was sent to.
    /// SCTP is an error unless [`sctp_supported`].
    pub fn ensure(&mut self, netns: &str, port: u16, proto: Proto) -> Result<()> {
        let key = (netns.to_string(), port, proto);
        if let Some(s) = self.running.get(&key) {
            if s.handle.as_ref().is_some_and(|h| !h.is_finished()) {
                return Ok(());
            }
        }
        if let Some(mut dead) = self.running.remove(&key) {
            if let Some(h) = dead.handle.take() {
                let _ = h.join();
            }
        }
        if proto == Proto::Sctp && !sctp_supported() {
            bail!(
                "{netns}: cannot serve sctp/{port}: SCTP sockets are not supported by this kernel"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<std::result::Result<(), String>>();
        let thread_stop = stop.clone();
        let ns = netns.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("srv-{proto}{port}"))
            .stack_size(PROBE_STACK)
            .spawn(move || serve(&ns, port, proto, &thread_stop, tx))
            .context("spawning a server thread")?;
        let server = Server {
            stop,
            handle: Some(handle),
        };
        match rx.recv_timeout(SERVER_READY_TIMEOUT) {
            Ok(Ok(())) => {
                self.running.insert(key, server);
                Ok(())
            }
            Ok(Err(e)) => {
                stop_all(vec![server]);
                Err(anyhow!("{netns}: cannot serve {proto}/{port}: {e}"))
            }
            Err(_) => {
                stop_all(vec![server]);
                Err(anyhow!(
                    "{netns}: server {proto}/{port} did not start within {SERVER_READY_TIMEOUT:?}"
                ))
            }
        }
    }

    /// Stops every server.
    pub fn stop(&mut self) {
        stop_all(self.running.drain().map(|(_, s)| s).collect());
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop_all(mut servers: Vec<Server>) {
    for s in &servers {
        s.stop.store(true, Ordering::Relaxed);
    }
    for s in &mut servers {
        if let Some(h) = s.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(
    netns: &str,
    port: u16,
    proto: Proto,
    stop: &AtomicBool,
    ready: mpsc::Sender<std::result::Result<(), String>>,
) {
    let sock = match listen(netns, port, proto) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    match proto {
        Proto::Tcp | Proto::Sctp => accept_loop(&sock, stop),
        Proto::Udp => echo_loop(&sock, stop),
    }
}

fn listen(netns: &str, port: u16, proto: Proto) -> Result<Socket> {
    enter_netns(netns)?;
    let (ty, p) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
        Proto::Sctp => (Type::STREAM, Protocol::from(IPPROTO_SCTP)),
    };
    let sock = Socket::new(Domain::IPV6, ty, Some(p)).context("socket")?;
    sock.set_only_v6(false).context("IPV6_V6ONLY=0")?;
    sock.set_reuse_address(true).context("SO_REUSEADDR")?;
    sock.set_read_timeout(Some(SERVER_POLL))
        .context("SO_RCVTIMEO")?;
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    sock.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    match proto {
        Proto::Udp => {
            setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true).context("IPV6_RECVPKTINFO")?
        }
        Proto::Tcp | Proto::Sctp => sock.listen(1024).context("listen")?,
    }
    Ok(sock)
}

/// A socket timeout or interruption: try again (the loops check their own deadlines).
pub(crate) fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

fn accept_loop(sock: &Socket, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match sock.accept() {
            Ok((conn, _)) => drop(conn),
            Err(e) if transient(&e) => {}
            // e.g. ECONNABORTED, EMFILE: keep serving.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Echoes datagrams from the address they were sent to (IPV6_PKTINFO; v4-mapped for IPv4), so a
/// multi-address namespace (a node, for hostNetwork pods) answers from the probed address.
pub(crate) fn echo_loop(sock: &Socket, stop: &AtomicBool) {
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

// ---------------------------------------------------------------------------------------------
// Probes

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeReq {
    pub from_netns: String,
    pub to: SocketAddr,
    pub proto: Proto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    /// Short reason: "timeout", "refused", "host unreachable", ...
    Failed(String),
}

impl Outcome {
    pub fn is_connected(&self) -> bool {
        matches!(self, Outcome::Connected)
    }
}

/// Runs every request concurrently on up to `parallelism` threads, each from inside its source
/// namespace and bounded by `timeout`. Result `i` answers `reqs[i]`. Denied (dropped) probes
/// cost the full timeout, so with `parallelism >= reqs.len()` the whole batch takes about one
/// timeout.
pub fn run_probes(reqs: &[ProbeReq], timeout: Duration, parallelism: usize) -> Vec<Outcome> {
    if reqs.is_empty() {
        return Vec::new();
    }
    let timeout = timeout.max(Duration::from_millis(1));
    // Open every source namespace once; threads setns with these handles.
    let mut handles: HashMap<&str, std::result::Result<File, String>> = HashMap::new();
    for r in reqs {
        handles
            .entry(r.from_netns.as_str())
            .or_insert_with(|| open_netns(&r.from_netns).map_err(|e| format!("{e:#}")));
    }
    let slots: Vec<OnceLock<Outcome>> = reqs.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let salt = RandomState::new().build_hasher().finish();
    let threads = parallelism.clamp(1, reqs.len());
    std::thread::scope(|s| {
        let worker = || {
            let mut current: Option<&str> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(req) = reqs.get(i) else { break };
                let outcome = if current == Some(req.from_netns.as_str()) {
                    probe(req, timeout, salt ^ i as u64)
                } else {
                    current = None;
                    match handles.get(req.from_netns.as_str()) {
                        Some(Ok(f)) => match setns(f, CloneFlags::CLONE_NEWNET) {
                            Ok(()) => {
                                current = Some(req.from_netns.as_str());
                                probe(req, timeout, salt ^ i as u64)
                            }
                            Err(e) => Outcome::Failed(format!("setns {}: {e}", req.from_netns)),
                        },
                        Some(Err(e)) => Outcome::Failed(e.clone()),
                        None => Outcome::Failed(format!("netns {} not opened", req.from_netns)),
                    }
                };
                let _ = slots[i].set(outcome);
            }
        };
        for _ in 0..threads {
            let spawned = std::thread::Builder::new()
                .name("probe".into())
                .stack_size(PROBE_STACK)
                .spawn_scoped(s, worker);
            if spawned.is_err() {
                // Fewer threads than asked: the running ones take the rest of the work.
                break;
            }
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|| Outcome::Failed("not run: could not spawn a thread".into()))
        })
        .collect()
}

/// One probe from the calling thread's namespace.
fn probe(req: &ProbeReq, timeout: Duration, token: u64) -> Outcome {
    match req.proto {
        Proto::Tcp => stream_probe(req.to, Protocol::TCP, timeout),
        Proto::Sctp => {
            if sctp_supported() {
                stream_probe(req.to, Protocol::from(IPPROTO_SCTP), timeout)
            } else {
                Outcome::Failed("sctp unsupported".into())
            }
        }
        Proto::Udp => udp_probe(req.to, timeout, token),
    }
}

fn reason(e: &std::io::Error) -> String {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ETIMEDOUT | Errno::EAGAIN) => "timeout".into(),
        Some(Errno::ECONNREFUSED) => "refused".into(),
        Some(Errno::EHOSTUNREACH) => "host unreachable".into(),
        Some(Errno::ENETUNREACH) => "network unreachable".into(),
        Some(Errno::EACCES | Errno::EPERM) => "prohibited".into(),
        Some(Errno::ECONNRESET) => "reset".into(),
        _ if e.kind() == std::io::ErrorKind::TimedOut => "timeout".into(),
        _ => e.to_string(),
    }
}

fn stream_probe(to: SocketAddr, protocol: Protocol, timeout: Duration) -> Outcome {
    let sock = match Socket::new(Domain::for_address(to), Type::STREAM, Some(protocol)) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("socket: {e}")),
    };
    match sock.connect_timeout(&SockAddr::from(to), timeout) {
        Ok(()) => Outcome::Connected,
        Err(e) => Outcome::Failed(reason(&e)),
    }
}

fn udp_probe(to: SocketAddr, timeout: Duration, token: u64) -> Outcome {
    let deadline = Instant::now() + timeout;
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = match UdpSocket::bind(any) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("socket: {e}")),
    };
    // Connected: only the probed address's replies (and its ICMP errors) reach us.
    if let Err(e) = sock.connect(to) {
        return Outcome::Failed(reason(&e));
    }
    let payload = format!("sluice-probe {token:016x}");
    let resend = (timeout / UDP_SENDS).max(Duration::from_millis(20));
    let mut buf = [0u8; 256];
    let mut next_send = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Outcome::Failed("timeout".into());
        }
        if now >= next_send {
            if let Err(e) = sock.send(payload.as_bytes()) {
                return Outcome::Failed(reason(&e));
            }
            next_send = now + resend;
        }
        let wait = next_send.min(deadline).saturating_duration_since(now);
        if let Err(e) = sock.set_read_timeout(Some(wait.max(Duration::from_millis(1)))) {
            return Outcome::Failed(format!("SO_RCVTIMEO: {e}"));
        }
        match sock.recv(&mut buf) {
            Ok(n) if &buf[..n] == payload.as_bytes() => return Outcome::Connected,
            Ok(_) => {}
            Err(e) if transient(&e) => {}
            Err(e) => return Outcome::Failed(reason(&e)),
        }
    }
}

/// GET `path` from `addr` (`host:port`; plain HTTP/1.0, `Connection: close`): the status and the
/// body. `timeout` bounds the connect and each read and write. The response is read as bytes
/// (invalid UTF-8 is replaced); one without the blank line that ends the head is an error.
/// Runs in the calling thread's network namespace (wrap it in [`crate::netns::in_netns`] for
/// another).
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    http_get_accepting(addr, path, "*/*", timeout)
}

/// [`http_get`] with this `Accept` header.
pub fn http_get_accepting(
    addr: &str,
    path: &str,
    accept: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let sock: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)
        .with_context(|| format!("GET {addr}{path}: connecting"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("GET {addr}{path}: writing"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("GET {addr}{path}: reading"))?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: no HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {addr}{path}: bad status line"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod http_tests {
    use super::http_get;
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::time::Duration;

    /// Serves one connection with `response`; the request head it got.
    fn serve_once(response: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&buf[..n]);
            }
            c.write_all(response).unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, h)
    }

    #[test]
    fn status_and_body() {
        let (addr, h) = serve_once(b"HTTP/1.0 503 Service Unavailable\r\nX: y\r\n\r\nnot \xffyet");
        let (status, body) = http_get(&addr, "/readyz", Duration::from_secs(5)).unwrap();
        assert_eq!(status, 503);
        assert_eq!(body, "not \u{fffd}yet");
        let req = h.join().unwrap();
        assert!(req.starts_with("GET /readyz HTTP/1.0\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: {addr}\r\n")), "{req}");
    }

    #[test]
    fn not_http() {
        let (addr, h) = serve_once(b"HTTP/1.0 200 OK\r\n");
        let e = http_get(&addr, "/x", Duration::from_secs(5)).unwrap_err();
        assert!(format!("{e:#}").contains("no HTTP response"), "{e:#}");
        h.join().unwrap();
        assert!(http_get("nowhere", "/x", Duration::from_secs(1)).is_err());
    }
}
