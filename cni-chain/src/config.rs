//! The plugin's configuration: its entry in the conflist, as the runtime hands it over on stdin
//! (with `cniVersion`, `name` and, for ADD/DEL/CHECK, `prevResult` injected).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::cni::{check_version, CniError};
use crate::protocol::{codes, Attachment, DEFAULT_SOCKET};

/// The start gate's default: how long ADD waits for the agent's answer.
pub const DEFAULT_TIMEOUT: &str = "10s";

/// Keys of our own.
pub const OWN_KEYS: &[&str] = &["agentSocket", "timeout", "failMode", "logFile"];

/// Keys the CNI spec defines for any plugin configuration (required, protocol, reserved and
/// well-known ones), which we accept and ignore unless we use them. Keys starting with
/// `cni.dev/` are reserved for the protocol and accepted too.
pub const SPEC_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "capabilities",
    "runtimeConfig",
    "args",
    "prevResult",
    "ipMasq",
    "ipam",
    "dns",
];

/// What ADD does when the agent cannot say the pod's rules are in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// ADD fails with code 11 (try again later); the runtime retries, the pod does not start
    /// without its rules. The default.
    Closed,
    /// ADD succeeds with a warning on stderr; the pod may start before its rules exist.
    Open,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Closed => "closed",
            FailMode::Open => "open",
        }
    }
}

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub cni_version: String,
    pub name: Option<String>,
    /// `agentSocket`, default [`DEFAULT_SOCKET`].
    pub agent_socket: PathBuf,
    /// `timeout`, a Go-style duration, default [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// `failMode`: `closed` (default) or `open`.
    pub fail_mode: FailMode,
    /// `logFile`: append a line per invocation there (optional).
    pub log_file: Option<PathBuf>,
    /// `prevResult`, untouched (absent or null: `None`).
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), for GC.
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn invalid(details: String) -> CniError {
    CniError::new(codes::INVALID_CONFIG, "invalid network config", details)
}

/// Read the cniVersion from whatever the input is, for error results and VERSION; falls back to
/// `None` when there is none to read.
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

/// Parse and validate the configuration. Errors: 6 (not JSON / not an object), 1 (a cniVersion
/// we do not speak), 7 (a missing or wrong field, or a field we do not know: the message names
/// it).
pub fn parse(stdin: &[u8]) -> Result<PluginConfig, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            codes::DECODE_FAILURE,
            "cannot decode the network config on stdin",
            e.to_string(),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(CniError::new(
            codes::DECODE_FAILURE,
            "cannot decode the network config on stdin",
            "expected a JSON object".to_string(),
        ));
    };

    let cni_version = match obj.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(other) => return Err(invalid(format!("cniVersion must be a string, got {other}"))),
        None => return Err(invalid("cniVersion is missing".into())),
    };
    check_version(&cni_version)?;

    for (key, value) in &obj {
        let known = OWN_KEYS.contains(&key.as_str())
            || SPEC_KEYS.contains(&key.as_str())
            || key.starts_with("cni.dev/");
        if !known {
            return Err(invalid(format!(
                "unknown field {key:?} (value {}) in the sluice-cni config; known fields: {}",
                short(value),
                OWN_KEYS.join(", ")
            )));
        }
    }

    let name = opt_string(&obj, "name")?;
    let agent_socket = match opt_string(&obj, "agentSocket")? {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(s) if s.starts_with('/') => PathBuf::from(s),
        Some(s) => {
            return Err(invalid(format!(
                "agentSocket must be an absolute path, got {s:?}"
            )))
        }
    };
    let timeout_text = opt_string(&obj, "timeout")?.unwrap_or_else(|| DEFAULT_TIMEOUT.into());
    let timeout = parse_duration(&timeout_text).map_err(|e| invalid(format!("timeout: {e}")))?;
    let fail_mode = match opt_string(&obj, "failMode")?.as_deref() {
        None | Some("closed") => FailMode::Closed,
        Some("open") => FailMode::Open,
        Some(other) => {
            return Err(invalid(format!(
                "failMode must be \"closed\" or \"open\", got {other:?}"
            )))
        }
    };
    let log_file = match opt_string(&obj, "logFile")? {
        None => None,
        Some(s) if s.starts_with('/') => Some(PathBuf::from(s)),
        Some(s) => {
            return Err(invalid(format!(
                "logFile must be an absolute path, got {s:?}"
            )))
        }
    };
    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(other) => {
            return Err(invalid(format!(
                "prevResult must be an object, got {}",
                short(other)
            )))
        }
    };
    let valid_attachments = match obj
        .get("cni.dev/valid-attachments")
        .or_else(|| obj.get("cni.dev/attachments"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_attachments(v)?),
    };

    Ok(PluginConfig {
        cni_version,
        name,
        agent_socket,
        timeout,
        fail_mode,
        log_file,
        prev_result,
        valid_attachments,
    })
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(invalid(format!("{key} must not be empty"))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "{key} must be a string, got {}",
            short(other)
        ))),
    }
}

/// `[{"containerID":"…","ifname":"…"}, …]` as the spec's GC input has it.
fn parse_attachments(v: &Value) -> Result<Vec<Attachment>, CniError> {
    let bad = |what: String| invalid(format!("cni.dev/valid-attachments: {what}"));
    let Value::Array(items) = v else {
        return Err(bad(format!("expected a list, got {}", short(v))));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |k: &str| {
                item.get(k)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("entry {i} has no string {k:?}: {}", short(item))))
            };
            Ok(Attachment {
                container_id: field("containerID")?,
                ifname: field("ifname")?,
            })
        })
        .collect()
}

/// A JSON value for an error message, cut short.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// A Go-style duration (`10s`, `500ms`, `1m30s`), at least 1ms and at most an hour.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = crate::duration::parse(text)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(3600) {
        return Err(format!(
            "duration {text:?} out of range (at least 1ms, at most 1h)"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<PluginConfig, CniError> {
        parse(v.to_string().as_bytes())
    }

    #[test]
    fn defaults() {
        let c =
            parse_json(json!({"cniVersion":"0.3.1","name":"cbr0","type":"sluice-cni"})).unwrap();
        assert_eq!(c.cni_version, "0.3.1");
        assert_eq!(c.name.as_deref(), Some("cbr0"));
        assert_eq!(c.agent_socket, PathBuf::from("/run/sluice/cni.sock"));
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.fail_mode, FailMode::Closed);
        assert_eq!(c.log_file, None);
        assert_eq!(c.prev_result, None);
        assert_eq!(c.valid_attachments, None);
    }

    #[test]
    fn all_fields() {
        let c = parse_json(json!({
            "cniVersion":"1.1.0","name":"cbr0","type":"sluice-cni",
            "agentSocket":"/tmp/x.sock","timeout":"1m30s","failMode":"open","logFile":"/var/log/s.log",
            "capabilities":{},"runtimeConfig":{},"args":{},"prevResult":{"cniVersion":"1.1.0"},
            "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}],
            "cni.dev/future":true
        }))
        .unwrap();
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.timeout, Duration::from_secs(90));
        assert_eq!(c.fail_mode, FailMode::Open);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/s.log")));
        assert_eq!(c.prev_result, Some(json!({"cniVersion":"1.1.0"})));
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
        // the older key libcni also sets
        let c = parse_json(json!({"cniVersion":"1.1.0","cni.dev/attachments":[]})).unwrap();
        assert_eq!(c.valid_attachments, Some(vec![]));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                json!({"cniVersion":"0.3.1","agentSokcet":"/x"}),
                7,
                "\"agentSokcet\"",
            ),
            (
                json!({"cniVersion":"0.3.1","failMode":"maybe"}),
                7,
                "failMode",
            ),
            (
                json!({"cniVersion":"0.3.1","failMode":true}),
                7,
                "failMode must be a string",
            ),
            (json!({"cniVersion":"0.3.1","timeout":"10"}), 7, "timeout"),
            (
                json!({"cniVersion":"0.3.1","timeout":10}),
                7,
                "timeout must be a string",
            ),
            (
                json!({"cniVersion":"0.3.1","timeout":"0s"}),
                7,
                "out of range",
            ),
            (
                json!({"cniVersion":"0.3.1","agentSocket":"rel.sock"}),
                7,
                "agentSocket must be an absolute path",
            ),
            (
                json!({"cniVersion":"0.3.1","agentSocket":""}),
                7,
                "agentSocket must not be empty",
            ),
            (
                json!({"cniVersion":"0.3.1","logFile":"x.log"}),
                7,
                "logFile",
            ),
            (
                json!({"cniVersion":"0.3.1","prevResult":[]}),
                7,
                "prevResult must be an object",
            ),
            (
                json!({"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"ifname":"eth0"}]}),
                7,
                "containerID",
            ),
            (json!({"name":"x"}), 7, "cniVersion is missing"),
            (json!({"cniVersion":"0.2.0"}), 1, "0.2.0"),
        ];
        for (input, code, needle) in cases {
            let e = parse_json(input.clone()).unwrap_err();
            assert_eq!(e.code, code, "{input}: {e}");
            assert!(e.details.contains(needle), "{input}: {e:?} lacks {needle}");
        }
        let e = parse(b"{not json").unwrap_err();
        assert_eq!(e.code, 6);
        let e = parse(b"[1]").unwrap_err();
        assert_eq!(e.code, 6);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "", "10", "s", "1 s", "10sec", "-1s", "1..5s", "2h", "1us", ".",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sniffing_the_version() {
        assert_eq!(
            sniff_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(sniff_version(b"junk"), None);
        assert_eq!(sniff_version(b""), None);
    }
}
