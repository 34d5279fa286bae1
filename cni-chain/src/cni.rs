//! CNI protocol pieces (spec 1.1): versions, the error result, the environment, CNI_ARGS.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use crate::protocol::codes;

/// The CNI versions sluice-cni speaks (flannel's conflist says 0.3.1).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version used in answers when the input named none we could read.
pub const FALLBACK_VERSION: &str = "1.1.0";

/// A CNI error result: printed as JSON on stdout, and the plugin exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error result JSON (`{"cniVersion","code","msg","details"}`), newline-terminated.
    pub fn render(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Rendered<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        let mut s = serde_json::to_string_pretty(&Rendered {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("json values serialize");
        s.push('\n');
        s
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.details.is_empty() {
            write!(f, "{} (CNI code {})", self.msg, self.code)
        } else {
            write!(f, "{}: {} (CNI code {})", self.msg, self.details, self.code)
        }
    }
}

/// The VERSION result, newline-terminated.
pub fn version_result(cni_version: &str) -> String {
    let mut s = serde_json::to_string(&json!({
        "cniVersion": cni_version,
        "supportedVersions": SUPPORTED_VERSIONS,
    }))
    .expect("json values serialize");
    s.push('\n');
    s
}

/// `Ok(())` if `version` is one we speak, else code 1 listing those we do.
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "cniVersion {version:?} is not supported by sluice-cni (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }
}

/// The operations of CNI_COMMAND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// The CNI environment variables sluice-cni reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    /// From a lookup function (`std::env::var` in main, a map in tests). Empty counts as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Env {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }

    pub fn command(&self) -> Result<Command, CniError> {
        match &self.command {
            None => Err(invalid_env(&["CNI_COMMAND"], "is not set")),
            Some(c) => Command::parse(c).ok_or_else(|| {
                CniError::new(
                    codes::INVALID_ENV,
                    "invalid CNI_COMMAND",
                    format!("CNI_COMMAND={c:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
                )
            }),
        }
    }

    /// The attachment variables `cmd` requires: CNI_CONTAINERID and CNI_IFNAME always, and
    /// CNI_NETNS for ADD and CHECK. One error names every missing one.
    pub fn require(&self, cmd: Command) -> Result<(String, String, Option<String>), CniError> {
        let mut missing = Vec::new();
        if self.container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if self.ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        let needs_netns = matches!(cmd, Command::Add | Command::Check);
        if needs_netns && self.netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if !missing.is_empty() {
            return Err(invalid_env(
                &missing,
                &format!("required for {} but not set", cmd.as_str()),
            ));
        }
        Ok((
            self.container_id.clone().unwrap_or_default(),
            self.ifname.clone().unwrap_or_default(),
            self.netns.clone(),
        ))
    }

    /// CNI_ARGS as a map (`K1=V1;K2=V2`); empty when unset.
    pub fn cni_args(&self) -> Result<BTreeMap<String, String>, CniError> {
        parse_cni_args(self.args.as_deref().unwrap_or(""))
    }
}

fn invalid_env(names: &[&str], what: &str) -> CniError {
    CniError::new(
        codes::INVALID_ENV,
        format!("invalid environment: {}", names.join(", ")),
        format!("{} {what}", names.join(", ")),
    )
}

/// Parse CNI_ARGS: `;`-separated `KEY=VALUE` pairs (empty pieces are skipped).
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for piece in s.split(';').filter(|p| !p.trim().is_empty()) {
        match piece.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                out.insert(k.trim().to_string(), v.to_string());
            }
            _ => {
                return Err(CniError::new(
                    codes::INVALID_ENV,
                    "invalid environment: CNI_ARGS",
                    format!("CNI_ARGS has {piece:?}, expected KEY=VALUE pairs separated by ';'"),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(7, "invalid network config", "unknown field \"x\"");
        let v: serde_json::Value = serde_json::from_str(&e.render("0.3.1")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion":"0.3.1","code":7,"msg":"invalid network config","details":"unknown field \"x\""})
        );
    }

    #[test]
    fn versions() {
        let v: serde_json::Value = serde_json::from_str(&version_result("0.3.1")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion":"0.3.1","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
        );
        for ok in SUPPORTED_VERSIONS {
            assert!(check_version(ok).is_ok());
        }
        let e = check_version("0.2.0").unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.details.contains("0.2.0") && e.details.contains("1.1.0"));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = env(&[]).command().unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = env(&[("CNI_COMMAND", "FROB")]).command().unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.details.contains("CNI_COMMAND=\"FROB\""));

        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")])
            .require(Command::Add)
            .unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_CONTAINERID") && e.msg.contains("CNI_NETNS"));
        assert!(!e.msg.contains("CNI_IFNAME"));
        // DEL does not need CNI_NETNS; empty counts as unset
        let e = env(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "")])
            .require(Command::Del)
            .unwrap_err();
        assert!(e.msg.contains("CNI_IFNAME") && !e.msg.contains("CNI_NETNS"));
        let ok = env(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")])
            .require(Command::Del)
            .unwrap();
        assert_eq!(ok, ("c".into(), "eth0".into(), None));
    }

    #[test]
    fn cni_args() {
        let m = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;",
        )
        .unwrap();
        assert_eq!(m["K8S_POD_NAMESPACE"], "default");
        assert_eq!(m["K8S_POD_NAME"], "web-0");
        assert_eq!(m["K8S_POD_UID"], "u-1");
        assert_eq!(m["IgnoreUnknown"], "1");
        assert!(parse_cni_args("").unwrap().is_empty());
        let e = parse_cni_args("A=1;oops").unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_ARGS") && e.details.contains("oops"));
    }
}
