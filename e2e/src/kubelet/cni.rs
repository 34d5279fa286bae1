//! A CNI invoker (CNI spec 1.1, libcni's behaviour for network configuration lists): load the
//! runtime's conflist, build each plugin's stdin, run the chain for ADD (in order, each plugin's
//! result the next one's `prevResult`) and DEL (reverse order), read error results.
//!
//! The pure part ([`Conflist`], [`plugin_config`], [`cni_args`], [`del_prev_result`],
//! [`pod_ips`], [`parse_error`]) is unit-tested; [`Invoker`] runs the plugin binaries.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One network configuration list (`*.conflist`).
#[derive(Clone, Debug, PartialEq)]
pub struct Conflist {
    /// The file it was read from (for messages).
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// Each plugin's configuration object, as written (at least `type`).
    pub plugins: Vec<Map<String, Value>>,
    /// The whole document, as read (kept in the cache so DEL runs what ADD ran).
    pub raw: Value,
}

impl Conflist {
    /// Parses a conflist document. Errors name the file and field.
    pub fn parse(file: &Path, text: &str) -> Result<Conflist> {
        let raw: Value =
            serde_json::from_str(text).with_context(|| format!("{}: not JSON", file.display()))?;
        Conflist::from_value(file, raw)
    }

    pub fn from_value(file: &Path, raw: Value) -> Result<Conflist> {
        let f = file.display();
        let obj = raw
            .as_object()
            .ok_or_else(|| anyhow!("{f}: not a JSON object"))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("{f}: `name` is missing or not a string"))?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("{f}: `cniVersion` is missing or not a string"))?
            .to_string();
        let list = obj
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|l| !l.is_empty())
            .ok_or_else(|| anyhow!("{f}: `plugins` is missing, empty or not a list"))?;
        let mut plugins = Vec::new();
        for (i, p) in list.iter().enumerate() {
            let p = p
                .as_object()
                .ok_or_else(|| anyhow!("{f}: plugins[{i}] is not an object"))?;
            match p.get("type").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && !t.contains('/') => {}
                _ => bail!("{f}: plugins[{i}].type is missing or not a plain binary name"),
            }
            plugins.push(p.clone());
        }
        Ok(Conflist {
            file: file.to_path_buf(),
            name,
            cni_version,
            plugins,
            raw,
        })
    }

    /// The first `*.conflist` in `dir` in lexical order of file names, as container runtimes
    /// choose (libcni's `ConfFiles` sorted, the first usable list wins).
    pub fn load_first(dir: &Path) -> Result<Conflist> {
        let file =
            first_conflist(dir)?.ok_or_else(|| anyhow!("no *.conflist in {}", dir.display()))?;
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        Conflist::parse(&file, &text)
    }

    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// The first `*.conflist` file name in `dir` in lexical (byte) order, or None.
pub fn first_conflist(dir: &Path) -> Result<Option<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut names: Vec<String> = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".conflist") && e.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.first().map(|n| dir.join(n)))
}

/// Compares dotted versions numerically ("0.3.1" < "0.4.0" < "1.0.0"); unparsable parts count 0.
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    let (a, b) = (parse(version), parse(min));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x > y;
        }
    }
    true
}

/// Runtime-provided capability arguments (libcni's `CapabilityArgs`): injected into a plugin's
/// `runtimeConfig` only when the plugin declares that capability `true`, and only when present.
pub type CapabilityArgs = Map<String, Value>;

/// The stdin of plugin `index` of `list`: its own object with the list's `name` and
/// `cniVersion` injected, `runtimeConfig` for the capabilities it declares (and the runtime has),
/// and `prevResult` when given (ADD: the previous plugin's result; DEL: see [`del_prev_result`]).
pub fn plugin_config(
    list: &Conflist,
    index: usize,
    prev_result: Option<&Value>,
    capability_args: &CapabilityArgs,
) -> Value {
    let mut conf = list.plugins[index].clone();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    let mut runtime = Map::new();
    if let Some(caps) = conf.get("capabilities").and_then(Value::as_object) {
        for (cap, on) in caps {
            if on.as_bool() == Some(true) {
                if let Some(v) = capability_args.get(cap) {
                    runtime.insert(cap.clone(), v.clone());
                }
            }
        }
    }
    if !runtime.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime));
    } else {
        conf.remove("runtimeConfig");
    }
    match prev_result {
        Some(prev) => {
            conf.insert("prevResult".into(), prev.clone());
        }
        None => {
            conf.remove("prevResult");
        }
    }
    Value::Object(conf)
}

/// DEL's `prevResult`: the cached ADD result for lists of cniVersion 0.4.0 and later; none
/// before (libcni's `DelNetworkList`: "cached result on DEL was added in CNI spec 0.4.0").
pub fn del_prev_result<'a>(list: &Conflist, cached: Option<&'a Value>) -> Option<&'a Value> {
    if version_at_least(&list.cni_version, "0.4.0") {
        cached
    } else {
        None
    }
}

/// The order plugins run in: ADD first to last, DEL last to first.
pub fn plugin_order(list: &Conflist, command: CniCommand) -> Vec<usize> {
    let n = list.plugins.len();
    match command {
        CniCommand::Add => (0..n).collect(),
        CniCommand::Del => (0..n).rev().collect(),
    }
}

/// The identity of one pod attachment, as a kubelet passes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    /// `/run/netns/<name>`.
    pub netns_path: String,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// `CNI_ARGS` as the kubelet (dockershim/CRI runtimes) passes them.
pub fn cni_args(a: &Attachment) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        a.pod_namespace, a.pod_name, a.container_id, a.pod_uid
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
        }
    }
}

/// The environment of one plugin run (besides the inherited one).
pub fn plugin_env(command: CniCommand, a: &Attachment, cni_path: &str) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), command.as_str().into()),
        ("CNI_CONTAINERID".into(), a.container_id.clone()),
        ("CNI_NETNS".into(), a.netns_path.clone()),
        ("CNI_IFNAME".into(), a.ifname.clone()),
        ("CNI_ARGS".into(), cni_args(a)),
        ("CNI_PATH".into(), cni_path.into()),
    ]
}

/// A plugin's error result (spec: `code`, `msg`, `details` on stdout, non-zero exit).
#[derive(Clone, Debug, PartialEq)]
pub struct PluginError {
    pub plugin: String,
    pub command: CniCommand,
    /// The error code (None when stdout was not an error result).
    pub code: Option<u64>,
    pub msg: String,
    /// The raw stdout (the error JSON) and stderr, for the log.
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} failed", self.plugin, self.command.as_str())?;
        if let Some(c) = self.code {
            write!(f, " (code {c}")?;
            if c == 11 {
                write!(f, ", try again later")?;
            }
            write!(f, ")")?;
        }
        write!(f, ": {}", self.msg)?;
        let out = self.stdout.trim();
        if !out.is_empty() {
            write!(f, "; result: {out}")?;
        }
        let err = self.stderr.trim();
        if !err.is_empty() {
            write!(f, "; stderr: {err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PluginError {}

/// Reads a failed plugin's output: the spec's error result, or whatever it printed.
pub fn parse_error(
    plugin: &str,
    command: CniCommand,
    status: &str,
    stdout: &str,
    stderr: &str,
) -> PluginError {
    let parsed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(Value::as_u64);
    let msg = parsed
        .as_ref()
        .map(|v| {
            let msg = v.get("msg").and_then(Value::as_str).unwrap_or("");
            match v.get("details").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => format!("{msg}: {d}"),
                _ => msg.to_string(),
            }
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("exited with {status}"));
    PluginError {
        plugin: plugin.into(),
        command,
        code,
        msg,
        stdout: stdout.into(),
        stderr: stderr.into(),
    }
}

/// The pod's addresses from a result (any version 0.3.0+): the `ips` on the interface named
/// `ifname` inside the sandbox, or without an `interface` index; address without its prefix.
pub fn pod_ips(result: &Value, ifname: &str) -> Vec<String> {
    let interfaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ips = result
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for ip in &ips {
        let on_pod = match ip.get("interface").and_then(Value::as_u64) {
            None => true,
            Some(i) => interfaces.get(i as usize).is_some_and(|iface| {
                iface.get("name").and_then(Value::as_str) == Some(ifname)
                    && iface
                        .get("sandbox")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
            }),
        };
        if !on_pod {
            continue;
        }
        if let Some(addr) = ip.get("address").and_then(Value::as_str) {
            let a = addr.split('/').next().unwrap_or(addr).to_string();
            if a.parse::<std::net::IpAddr>().is_ok() && !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// `portMappings` capability args from (hostPort, containerPort, protocol, hostIP) tuples, as
/// CRI runtimes pass them to portmap.
pub fn port_mappings(ports: &[(u16, u16, String, Option<String>)]) -> Option<Value> {
    if ports.is_empty() {
        return None;
    }
    Some(Value::Array(
        ports
            .iter()
            .map(|(host, container, proto, host_ip)| {
                let mut m = json!({
                    "hostPort": host,
                    "containerPort": container,
                    "protocol": proto.to_lowercase(),
                });
                if let Some(ip) = host_ip.as_ref().filter(|s| !s.is_empty()) {
                    m["hostIP"] = Value::String(ip.clone());
                }
                m
            })
            .collect(),
    ))
}

/// Runs plugin binaries found in the CNI path.
#[derive(Clone, Debug)]
pub struct Invoker {
    /// Directories searched for plugin binaries, in order (also passed as CNI_PATH).
    pub path: Vec<PathBuf>,
}

impl Invoker {
    pub fn cni_path(&self) -> String {
        self.path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn find(&self, plugin: &str) -> Result<PathBuf> {
        for d in &self.path {
            let p = d.join(plugin);
            if p.is_file() {
                return Ok(p);
            }
        }
        bail!("CNI plugin `{plugin}` not found in {}", self.cni_path())
    }

    /// Runs one plugin; Ok(stdout parsed as JSON, or Null when empty) on exit 0.
    pub fn exec(
        &self,
        plugin: &str,
        command: CniCommand,
        attachment: &Attachment,
        stdin: &Value,
    ) -> std::result::Result<Value, PluginError> {
        let fail = |msg: String| PluginError {
            plugin: plugin.into(),
            command,
            code: None,
            msg,
            stdout: String::new(),
            stderr: String::new(),
        };
        let bin = self.find(plugin).map_err(|e| fail(format!("{e:#}")))?;
        let input = serde_json::to_vec(stdin).map_err(|e| fail(format!("encoding stdin: {e}")))?;
        let mut cmd = Command::new(&bin);
        cmd.envs(plugin_env(command, attachment, &self.cni_path()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", bin.display())))?;
        let stdin_pipe = child.stdin.take();
        let out = std::thread::scope(|s| {
            s.spawn(|| {
                if let Some(mut p) = stdin_pipe {
                    let _ = p.write_all(&input);
                }
            });
            child.wait_with_output()
        })
        .map_err(|e| fail(format!("waiting for {}: {e}", bin.display())))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(parse_error(
                plugin,
                command,
                &out.status.to_string(),
                &stdout,
                &stderr,
            ));
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(stdout.trim()).map_err(|e| PluginError {
            plugin: plugin.into(),
            command,
            code: None,
            msg: format!("result is not JSON: {e}"),
            stdout,
            stderr,
        })
    }

    /// ADD through the whole list; the last plugin's result.
    pub fn add(
        &self,
        list: &Conflist,
        a: &Attachment,
        caps: &CapabilityArgs,
    ) -> std::result::Result<Value, PluginError> {
        let mut prev: Option<Value> = None;
        for i in plugin_order(list, CniCommand::Add) {
            let conf = plugin_config(list, i, prev.as_ref(), caps);
            let result = self.exec(list.plugin_type(i), CniCommand::Add, a, &conf)?;
            if result.is_null() {
                return Err(PluginError {
                    plugin: list.plugin_type(i).into(),
                    command: CniCommand::Add,
                    code: None,
                    msg: "ADD printed no result".into(),
                    stdout: String::new(),
                    stderr: String::new(),
                });
            }
            prev = Some(result);
        }
        prev.ok_or_else(|| PluginError {
            plugin: String::new(),
            command: CniCommand::Add,
            code: None,
            msg: format!("{}: no plugins", list.file.display()),
            stdout: String::new(),
            stderr: String::new(),
        })
    }

    /// DEL through the whole list in reverse; the first error stops it (as libcni does), so
    /// the caller retries the whole DEL (plugins make DEL idempotent).
    pub fn del(
        &self,
        list: &Conflist,
        a: &Attachment,
        cached: Option<&Value>,
        caps: &CapabilityArgs,
    ) -> std::result::Result<(), PluginError> {
        let prev = del_prev_result(list, cached);
        for i in plugin_order(list, CniCommand::Del) {
            let conf = plugin_config(list, i, prev, caps);
            self.exec(list.plugin_type(i), CniCommand::Del, a, &conf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flannel_list(version: &str) -> Conflist {
        Conflist::parse(
            Path::new("05-sluice.conflist"),
            &json!({
                "name": "cbr0",
                "cniVersion": version,
                "plugins": [
                    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                    {"type": "sluice-cni", "agentSocket": "/run/sluice/cni.sock", "name": "ignored"}
                ]
            })
            .to_string(),
        )
        .expect("valid")
    }

    fn attachment() -> Attachment {
        Attachment {
            container_id: "0123abcd".into(),
            netns_path: "/run/netns/n1-default.web".into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web".into(),
            pod_uid: "1111-2222".into(),
        }
    }

    #[test]
    fn parse_errors_name_file_and_field() {
        let f = Path::new("x.conflist");
        let e = Conflist::parse(f, "{").unwrap_err();
        assert!(format!("{e:#}").contains("x.conflist: not JSON"));
        let e =
            Conflist::parse(f, r#"{"cniVersion":"1.0.0","plugins":[{"type":"a"}]}"#).unwrap_err();
        assert!(e.to_string().contains("`name`"), "{e}");
        let e = Conflist::parse(f, r#"{"name":"n","plugins":[{"type":"a"}]}"#).unwrap_err();
        assert!(e.to_string().contains("`cniVersion`"), "{e}");
        let e =
            Conflist::parse(f, r#"{"name":"n","cniVersion":"1.0.0","plugins":[]}"#).unwrap_err();
        assert!(e.to_string().contains("`plugins`"), "{e}");
        let e = Conflist::parse(
            f,
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"a"},{"x":1}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("plugins[1].type"), "{e}");
        let e = Conflist::parse(
            f,
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"../a"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("plugins[0].type"), "{e}");
    }

    #[test]
    fn first_conflist_is_lexical() {
        let dir = std::env::temp_dir().join(format!("sluice-kubelet-cni-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(first_conflist(&dir).unwrap(), None);
        for n in [
            "10-flannel.conflist",
            "05-sluice.conflist",
            "01-a.conf",
            "99.conflist.bak",
        ] {
            std::fs::write(dir.join(n), "{}").unwrap();
        }
        std::fs::create_dir(dir.join("00-dir.conflist")).unwrap();
        assert_eq!(
            first_conflist(&dir).unwrap(),
            Some(dir.join("05-sluice.conflist"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plugin_config_injects_name_version_and_prev_result() {
        let list = flannel_list("0.3.1");
        let none = CapabilityArgs::new();
        let first = plugin_config(&list, 0, None, &none);
        assert_eq!(
            first,
            json!({"type": "flannel", "name": "cbr0", "cniVersion": "0.3.1",
                   "delegate": {"hairpinMode": true, "isDefaultGateway": true}})
        );
        let prev =
            json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.244.1.2/24"}]});
        let third = plugin_config(&list, 2, Some(&prev), &none);
        assert_eq!(
            third["name"], "cbr0",
            "the list's name wins over the plugin's"
        );
        assert_eq!(third["cniVersion"], "0.3.1");
        assert_eq!(third["prevResult"], prev);
        assert_eq!(third["agentSocket"], "/run/sluice/cni.sock");
        // The source list is untouched.
        assert!(!list.plugins[2].contains_key("prevResult"));
    }

    #[test]
    fn runtime_config_only_for_declared_capabilities() {
        let list = flannel_list("1.0.0");
        let mut caps = CapabilityArgs::new();
        caps.insert(
            "portMappings".into(),
            port_mappings(&[(8080, 80, "TCP".into(), None)]).unwrap(),
        );
        caps.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let portmap = plugin_config(&list, 1, None, &caps);
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
        let flannel = plugin_config(&list, 0, None, &caps);
        assert!(flannel.get("runtimeConfig").is_none());
        // Declared but not provided: nothing injected.
        let portmap = plugin_config(&list, 1, None, &CapabilityArgs::new());
        assert!(portmap.get("runtimeConfig").is_none());
        assert_eq!(port_mappings(&[]), None);
    }

    #[test]
    fn del_runs_in_reverse_with_cached_result_from_0_4_0() {
        let old = flannel_list("0.3.1");
        let new = flannel_list("1.0.0");
        assert_eq!(plugin_order(&old, CniCommand::Add), vec![0, 1, 2]);
        assert_eq!(plugin_order(&old, CniCommand::Del), vec![2, 1, 0]);
        let cached = json!({"cniVersion": "1.0.0", "ips": []});
        assert_eq!(del_prev_result(&old, Some(&cached)), None);
        assert_eq!(del_prev_result(&new, Some(&cached)), Some(&cached));
        assert_eq!(del_prev_result(&new, None), None);
        for i in plugin_order(&new, CniCommand::Del) {
            let c = plugin_config(
                &new,
                i,
                del_prev_result(&new, Some(&cached)),
                &CapabilityArgs::new(),
            );
            assert_eq!(c["prevResult"], cached);
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(version_at_least("0.10.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("0.3", "0.4.0"));
    }

    #[test]
    fn cni_args_and_env_as_a_kubelet() {
        let a = attachment();
        assert_eq!(
            cni_args(&a),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=1111-2222"
        );
        let env = plugin_env(CniCommand::Del, &a, "/opt/cni/bin:/x");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CNI_COMMAND"), Some("DEL"));
        assert_eq!(get("CNI_CONTAINERID"), Some("0123abcd"));
        assert_eq!(get("CNI_NETNS"), Some("/run/netns/n1-default.web"));
        assert_eq!(get("CNI_IFNAME"), Some("eth0"));
        assert_eq!(get("CNI_PATH"), Some("/opt/cni/bin:/x"));
        assert_eq!(get("CNI_ARGS"), Some(cni_args(&a).as_str()));
    }

    #[test]
    fn error_results_are_read() {
        let e = parse_error(
            "sluice-cni",
            CniCommand::Add,
            "exit status: 1",
            r#"{"cniVersion":"0.3.1","code":11,"msg":"agent not ready","details":"no sync yet"}"#,
            "warn\n",
        );
        assert_eq!(e.code, Some(11));
        assert_eq!(e.msg, "agent not ready: no sync yet");
        let shown = e.to_string();
        assert!(
            shown.contains("sluice-cni ADD failed (code 11, try again later)"),
            "{shown}"
        );
        assert!(
            shown.contains(r#""code":11"#),
            "the error JSON is in the log: {shown}"
        );
        let e = parse_error("bridge", CniCommand::Del, "signal: 9", "garbage", "");
        assert_eq!(e.code, None);
        assert_eq!(e.msg, "exited with signal: 9");
    }

    #[test]
    fn pod_ips_from_results() {
        // flannel's chain, cniVersion 0.3.1 (cni-chain/README.md).
        let r = json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "cni0", "mac": "aa:27:4c:fe:9b:70"},
                {"name": "veth5d6ee293", "mac": "da:4e:72:e7:63:77"},
                {"name": "eth0", "mac": "46:35:b6:39:78:a7", "sandbox": "/run/netns/p"}
            ],
            "ips": [
                {"version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"},
                {"version": "6", "interface": 2, "address": "fd00:10:244:1::2/64"},
                {"version": "4", "interface": 0, "address": "10.244.1.1/24"}
            ]
        });
        assert_eq!(pod_ips(&r, "eth0"), vec!["10.244.1.2", "fd00:10:244:1::2"]);
        // No interface index: counts (1.0.0 allows it).
        let r = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/16"}]});
        assert_eq!(pod_ips(&r, "eth0"), vec!["10.0.0.5"]);
        assert!(pod_ips(&json!({}), "eth0").is_empty());
    }
}
