//! The wire protocol between `sluice-cni` (client) and the sluice agent (server) on the node.
//!
//! A unix stream socket (default [`DEFAULT_SOCKET`]). Newline-delimited JSON: per connection the
//! client writes exactly one [`Request`] line and the server answers with exactly one
//! [`Response`] line, then both close. Lines are UTF-8 JSON objects without embedded newlines
//! (what `serde_json::to_string` produces) ending in `\n`; at most [`MAX_LINE`] bytes.
//!
//! ```text
//! -> {"op":"add","containerId":"c1","ifname":"eth0","netns":"/run/netns/x","namespace":"default",
//!     "pod":"web","podUid":"0e5f…","ips":["10.244.1.5","fd00:10:244:1::5"],"hostVeth":"vethab12",
//!     "timeoutMs":10000}
//! <- {"ok":true}
//! -> {"op":"del","containerId":"c1","ifname":"eth0"}
//! -> {"op":"check","containerId":"c1","ifname":"eth0"}
//! -> {"op":"status"}
//! -> {"op":"gc","valid":[{"containerId":"c1","ifname":"eth0"}]}
//! <- {"ok":false,"code":11,"error":"pod default/web is not in the agent's cache yet"}
//! ```
//!
//! Semantics the server must keep:
//! - `add`: answer only once the pod's rules are committed in the kernel (or it is certain they
//!   cannot be); the client gives up after `timeoutMs`, so answer before that, with code 11 if
//!   it is still waiting. Repeating an `add` for the same attachment is harmless.
//! - `del`: forget the attachment; unknown attachments are `ok` (DEL is idempotent).
//! - `check`: `ok` only if the agent knows the attachment and its rules are in the kernel; else
//!   an error (code 3 for an unknown attachment).
//! - `status`: `ok` only if the agent is synced and can serve `add`; else code 50.
//! - `gc`: drop every attachment not in `valid`.
//!
//! Error codes in [`Response::code`] are CNI error codes ([`codes`]): the plugin passes them on
//! to the container runtime. Unknown JSON fields are ignored in both directions, so fields can
//! be added later without breaking an older peer.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens unless the plugin's config says `agentSocket`.
pub const DEFAULT_SOCKET: &str = "/run/sluice/cni.sock";

/// The longest line either side accepts (requests and responses are far smaller).
pub const MAX_LINE: usize = 1 << 20;

/// CNI error codes (CNI spec 1.1, "Error") used on the wire and by the plugin.
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (the message names them).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (e.g. reading stdin).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity.
    pub const NOT_AVAILABLE_DEGRADED: u32 = 51;
    /// sluice-specific: the agent's answer broke the protocol.
    pub const AGENT_PROTOCOL: u32 = 100;
    /// sluice-specific: the agent refused without giving a code.
    pub const AGENT_REFUSED: u32 = 101;
}

/// One attachment: the `(CNI_CONTAINERID, CNI_IFNAME)` pair that identifies it in CNI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// `add`: a pod's interface is up; the agent answers once the pod's rules are in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddRequest {
    /// CNI_CONTAINERID (the sandbox's id).
    pub container_id: String,
    /// CNI_IFNAME (the interface inside the pod, e.g. `eth0`).
    pub ifname: String,
    /// CNI_NETNS (path of the pod's network namespace).
    pub netns: String,
    /// K8S_POD_NAMESPACE from CNI_ARGS.
    pub namespace: String,
    /// K8S_POD_NAME from CNI_ARGS.
    pub pod: String,
    /// K8S_POD_UID from CNI_ARGS, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's addresses on this attachment (from prevResult, prefix lengths dropped).
    pub ips: Vec<IpAddr>,
    /// Host side of the pod's veth pair (e.g. `veth5d6ee293`).
    pub host_veth: String,
    /// How long the plugin waits for the answer, in milliseconds.
    pub timeout_ms: u64,
}

/// A request: one JSON line, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Add(AddRequest),
    Del(Attachment),
    Check(Attachment),
    Status,
    Gc { valid: Vec<Attachment> },
}

/// The answer to any request: `{"ok":true}` or `{"ok":false,"code":N,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// A CNI error code ([`codes`]) when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// What went wrong, for people, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// `{"ok":true}`
    pub fn ok() -> Self {
        Response {
            ok: true,
            code: None,
            error: None,
        }
    }

    /// `{"ok":false,"code":code,"error":error}`
    pub fn error(code: u32, error: impl Into<String>) -> Self {
        Response {
            ok: false,
            code: Some(code),
            error: Some(error.into()),
        }
    }
}

/// Why a line could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("bad protocol line: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

impl Request {
    /// The request as one line, `\n` included.
    pub fn to_line(&self) -> String {
        to_line(self)
    }

    /// Parse one line (a trailing `\n` or `\r\n` is allowed).
    pub fn from_line(line: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(line.trim_end_matches(['\n', '\r']))?)
    }

    /// The op's name as on the wire (`add`, `del`, ...), for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Add(_) => "add",
            Request::Del(_) => "del",
            Request::Check(_) => "check",
            Request::Status => "status",
            Request::Gc { .. } => "gc",
        }
    }
}

impl Response {
    /// The response as one line, `\n` included.
    pub fn to_line(&self) -> String {
        to_line(self)
    }

    /// Parse one line (a trailing `\n` or `\r\n` is allowed).
    pub fn from_line(line: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(line.trim_end_matches(['\n', '\r']))?)
    }
}

fn to_line<T: Serialize>(value: &T) -> String {
    // Serializing these types cannot fail: no maps with non-string keys, no foreign types.
    let mut line = serde_json::to_string(value).expect("protocol types serialize");
    line.push('\n');
    line
}

/// Why [`client::call`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent to talk to: the socket is missing, nobody listens on it (connection refused), or
    /// connecting failed otherwise.
    #[error("agent not reachable at {socket}: {source}")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// The agent took longer than the timeout (to accept, or to answer).
    #[error("timed out after {}ms waiting for the agent at {socket} ({stage})", .after.as_millis())]
    Timeout {
        socket: String,
        after: Duration,
        /// `connecting`, `sending the request` or `waiting for the answer`.
        stage: &'static str,
    },
    /// The agent accepted but did not answer with one well-formed response line.
    #[error("protocol error talking to the agent at {socket}: {detail}")]
    Protocol { socket: String, detail: String },
}

impl ClientError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// The synchronous client (std only, no runtime): one connection per call.
pub mod client {
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// Send `request` to the agent at `socket` and wait for its answer, all within `timeout`
    /// (connecting, writing and reading share the one deadline).
    pub fn call(
        socket: &Path,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let start = Instant::now();
        let name = socket.display().to_string();
        let timed_out = |stage| ClientError::Timeout {
            socket: name.clone(),
            after: timeout,
            stage,
        };
        let protocol = |detail: String| ClientError::Protocol {
            socket: name.clone(),
            detail,
        };

        let mut stream = connect(socket, timeout).map_err(|e| match e {
            None => timed_out("connecting"),
            Some(source) => ClientError::Unreachable {
                socket: name.clone(),
                source,
            },
        })?;

        let remaining = |stage| {
            timeout
                .checked_sub(start.elapsed())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| timed_out(stage))
        };

        let io_err = |e: std::io::Error, stage| {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                timed_out(stage)
            } else {
                protocol(format!("{stage}: {e}"))
            }
        };

        stream
            .set_write_timeout(Some(remaining("sending the request")?))
            .map_err(|e| io_err(e, "sending the request"))?;
        stream
            .write_all(request.to_line().as_bytes())
            .map_err(|e| io_err(e, "sending the request"))?;
        // Half-close: the agent sees the end of the request even if it reads to EOF.
        let _ = stream.shutdown(std::net::Shutdown::Write);

        let stage = "waiting for the answer";
        let mut buf = Vec::with_capacity(128);
        let mut chunk = [0u8; 4096];
        loop {
            stream
                .set_read_timeout(Some(remaining(stage)?))
                .map_err(|e| io_err(e, stage))?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e, stage)),
            };
            if n == 0 {
                if buf.is_empty() {
                    return Err(protocol(
                        "the agent closed the connection without answering".into(),
                    ));
                }
                break; // a last line without '\n' is accepted
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                buf.truncate(end);
                break;
            }
            if buf.len() > MAX_LINE {
                return Err(protocol(format!("answer longer than {MAX_LINE} bytes")));
            }
        }
        let line = String::from_utf8(buf).map_err(|_| protocol("answer is not UTF-8".into()))?;
        let response = Response::from_line(&line)
            .map_err(|e| protocol(format!("{e} in answer {:?}", truncate(&line, 200))))?;
        if !response.ok && response.code.is_none() && response.error.is_none() {
            return Err(protocol(
                "answer says ok:false without code or error".into(),
            ));
        }
        Ok(response)
    }

    /// Connect, bounded by `timeout`: std's `UnixStream::connect` has no timeout (a listener
    /// whose backlog is full blocks it), so a helper thread connects and we wait for it. On a
    /// timeout the thread is left behind; the process ends soon after anyway.
    /// `Err(None)` means timed out.
    fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, Option<std::io::Error>> {
        // The common cases answer at once without a thread: no socket file at all.
        if let Err(e) = std::fs::symlink_metadata(socket) {
            return Err(Some(e));
        }
        let (tx, rx) = mpsc::channel();
        let path = socket.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(UnixStream::connect(path));
        });
        match rx.recv_timeout(timeout) {
            Ok(result) => result.map_err(Some),
            Err(_) => Err(None),
        }
    }

    fn truncate(s: &str, max: usize) -> &str {
        match s.char_indices().nth(max) {
            Some((i, _)) => &s[..i],
            None => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add() -> AddRequest {
        AddRequest {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            namespace: "default".into(),
            pod: "web".into(),
            pod_uid: Some("u1".into()),
            ips: vec![
                "10.244.1.5".parse().unwrap(),
                "fd00:10:244:1::5".parse().unwrap(),
            ],
            host_veth: "vethab12".into(),
            timeout_ms: 10000,
        }
    }

    #[test]
    fn requests_on_the_wire() {
        let cases = [
            (
                Request::Add(add()),
                json!({"op":"add","containerId":"c1","ifname":"eth0","netns":"/run/netns/x",
                       "namespace":"default","pod":"web","podUid":"u1",
                       "ips":["10.244.1.5","fd00:10:244:1::5"],"hostVeth":"vethab12","timeoutMs":10000}),
            ),
            (
                Request::Del(Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into(),
                }),
                json!({"op":"del","containerId":"c1","ifname":"eth0"}),
            ),
            (
                Request::Check(Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into(),
                }),
                json!({"op":"check","containerId":"c1","ifname":"eth0"}),
            ),
            (Request::Status, json!({"op":"status"})),
            (
                Request::Gc {
                    valid: vec![Attachment {
                        container_id: "c1".into(),
                        ifname: "eth0".into(),
                    }],
                },
                json!({"op":"gc","valid":[{"containerId":"c1","ifname":"eth0"}]}),
            ),
        ];
        for (request, wire) in cases {
            let line = request.to_line();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(value, wire, "{}", request.op());
            assert_eq!(Request::from_line(&line).unwrap(), request);
        }
    }

    #[test]
    fn pod_uid_is_optional_and_unknown_fields_are_ignored() {
        let mut a = add();
        a.pod_uid = None;
        let line = Request::Add(a.clone()).to_line();
        assert!(!line.contains("podUid"));
        assert_eq!(Request::from_line(&line).unwrap(), Request::Add(a));
        let r = Request::from_line(r#"{"op":"status","future":1}"#).unwrap();
        assert_eq!(r, Request::Status);
        assert!(Request::from_line(r#"{"op":"explode"}"#).is_err());
        assert!(Request::from_line(r#"{"op":"add","containerId":"c"}"#).is_err());
    }

    #[test]
    fn responses_on_the_wire() {
        assert_eq!(Response::ok().to_line(), "{\"ok\":true}\n");
        let e = Response::error(codes::TRY_AGAIN, "not synced");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&e.to_line()).unwrap(),
            json!({"ok":false,"code":11,"error":"not synced"})
        );
        assert_eq!(
            Response::from_line("{\"ok\":true}\r\n").unwrap(),
            Response::ok()
        );
        assert_eq!(
            Response::from_line(r#"{"ok":false,"code":3,"error":"x","extra":[]}"#).unwrap(),
            Response::error(3, "x")
        );
        assert!(Response::from_line("{}").is_err());
    }

    /// The client's socket handling, against plain listeners (no agent logic: each answers
    /// with fixed bytes or not at all).
    mod client_sockets {
        use super::*;
        use std::io::{BufRead, BufReader, Write};
        use std::os::unix::net::UnixListener;
        use std::path::PathBuf;
        use std::time::Instant;

        fn sock(name: &str) -> PathBuf {
            let dir = std::env::temp_dir()
                .join(format!("sluice-cni-client-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            dir.join("agent.sock")
        }

        /// Accept one connection, read its line, hand it back, write `answer` (raw bytes).
        fn serve_once(path: &Path, answer: &'static [u8]) -> std::thread::JoinHandle<String> {
            let listener = UnixListener::bind(path).unwrap();
            std::thread::spawn(move || {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                (&stream).write_all(answer).unwrap();
                line
            })
        }

        const T: Duration = Duration::from_secs(5);

        #[test]
        fn one_line_each_way() {
            let path = sock("ok");
            let server = serve_once(&path, b"{\"ok\":false,\"code\":3,\"error\":\"unknown\"}\n");
            let r = client::call(&path, &Request::Status, T).unwrap();
            assert_eq!(r, Response::error(3, "unknown"));
            assert_eq!(server.join().unwrap(), "{\"op\":\"status\"}\n");
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }

        #[test]
        fn unreachable() {
            let path = sock("gone");
            let e = client::call(&path, &Request::Status, T).unwrap_err();
            assert!(e.is_unreachable(), "{e}");
            // a stale socket file: connection refused
            drop(UnixListener::bind(&path).unwrap());
            let e = client::call(&path, &Request::Status, T).unwrap_err();
            assert!(e.is_unreachable(), "{e}");
            assert!(e.to_string().contains("agent not reachable at"), "{e}");
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }

        #[test]
        fn timeout() {
            let path = sock("silent");
            let _listener = UnixListener::bind(&path).unwrap(); // never accepts, never answers
            let start = Instant::now();
            let e = client::call(&path, &Request::Status, Duration::from_millis(200)).unwrap_err();
            assert!(e.is_timeout(), "{e}");
            assert!(start.elapsed() < Duration::from_secs(3));
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }

        #[test]
        fn protocol_errors() {
            for (name, answer, needle) in [
                ("junk", &b"hello\n"[..], "bad protocol line"),
                ("empty", &b""[..], "without answering"),
                ("nocode", &b"{\"ok\":false}\n"[..], "without code or error"),
            ] {
                let path = sock(name);
                let server = serve_once(&path, answer);
                let e = client::call(&path, &Request::Status, T).unwrap_err();
                assert!(
                    matches!(e, ClientError::Protocol { .. }) && e.to_string().contains(needle),
                    "{name}: {e}"
                );
                server.join().unwrap();
                let _ = std::fs::remove_dir_all(path.parent().unwrap());
            }
        }
    }
}
