//! `sluice install-cni`: chains sluice-cni after flannel on a node. It copies the plugin binary
//! into the host's CNI bin dir, derives `05-sluice.conflist` from flannel's conflist (flannel's
//! plugins, then sluice-cni), keeps it derived when flannel rewrites its file, and removes what
//! it wrote on uninstall.
//!
//! The container runtime uses the first conflist in lexical order, so `05-sluice.conflist` wins
//! over flannel's `10-flannel.conflist` while both exist; removing ours falls back to flannel's.
//! Ours keeps flannel's network name, so IPAM state (host-local leases) stays where it was.
//!
//! Anything unexpected in flannel's file is an error that names the file and the field, and
//! leaves the node's CNI configuration exactly as it was: a stale but working chain is better
//! than none.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

/// The file we write in the CNI conf dir.
pub const OUR_CONFLIST: &str = "05-sluice.conflist";
/// Flannel's own file name in its manifest.
pub const FLANNEL_CONFLIST: &str = "10-flannel.conflist";
/// Marks our conflist, so uninstall never removes a file someone else wrote.
const MARKER_KEY: &str = "cni.dev/sluice-derived-from";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{file}: {message}")]
    Conflist { file: String, message: String },
    #[error(
        "no flannel conflist in {dir} (looked for {wanted}); is flannel installed on this node?"
    )]
    NoFlannel { dir: String, wanted: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What sluice-cni's entry in the chain says (its config; see cni-chain/README.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSettings {
    pub agent_socket: String,
    /// Go-style duration text, e.g. `10s`.
    pub timeout: String,
    /// `closed` or `open`.
    pub fail_mode: String,
}

/// Our conflist from flannel's: the same name and version, flannel's plugins unchanged, then
/// sluice-cni. Errors name the file and the field.
pub fn derive_conflist(
    flannel_file: &str,
    flannel_text: &str,
    settings: &PluginSettings,
) -> Result<String, InstallError> {
    let bad = |message: String| InstallError::Conflist {
        file: flannel_file.to_string(),
        message,
    };
    let doc: Value =
        serde_json::from_str(flannel_text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Value::Object(mut doc) = doc else {
        return Err(bad("expected a JSON object (a CNI conflist)".into()));
    };
    match doc.get("name") {
        Some(Value::String(n)) if !n.is_empty() => {}
        _ => return Err(bad("name: missing or not a non-empty string".into())),
    }
    match doc.get("cniVersion") {
        Some(Value::String(v)) if sluice_cni::cni::SUPPORTED_VERSIONS.contains(&v.as_str()) => {}
        Some(Value::String(v)) => {
            return Err(bad(format!(
                "cniVersion: {v:?} is not one sluice-cni speaks ({})",
                sluice_cni::cni::SUPPORTED_VERSIONS.join(", ")
            )))
        }
        _ => return Err(bad("cniVersion: missing or not a string".into())),
    }
    let Some(Value::Array(plugins)) = doc.get_mut("plugins") else {
        return Err(bad(
            "plugins: missing or not a list (a single-plugin .conf is not a conflist)".into(),
        ));
    };
    let mut flannel_found = false;
    for (i, plugin) in plugins.iter().enumerate() {
        match plugin.get("type") {
            Some(Value::String(t)) if t == "flannel" => flannel_found = true,
            Some(Value::String(t)) if t == "sluice-cni" => {
                return Err(bad(format!(
                    "plugins[{i}]: sluice-cni is already in flannel's chain; refusing to chain it twice"
                )))
            }
            Some(Value::String(_)) => {}
            _ => return Err(bad(format!("plugins[{i}].type: missing or not a string"))),
        }
    }
    if !flannel_found {
        return Err(bad(
            "plugins: no plugin of type \"flannel\"; this is not flannel's conflist".into(),
        ));
    }
    plugins.push(json!({
        "type": "sluice-cni",
        "agentSocket": settings.agent_socket,
        "timeout": settings.timeout,
        "failMode": settings.fail_mode,
    }));
    doc.insert(MARKER_KEY.into(), Value::String(flannel_file.to_string()));
    let mut text = serde_json::to_string_pretty(&Value::Object(doc))
        .map_err(|e| bad(format!("could not serialize: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// Is this file one we wrote?
pub fn is_ours(text: &str) -> bool {
    serde_json::from_str::<Map<String, Value>>(text).is_ok_and(|doc| doc.contains_key(MARKER_KEY))
}

/// Flannel's conflist in `dir`: `name` if given, else `10-flannel.conflist`, else the first
/// `*.conflist` (lexical order, ours excluded) that chains a plugin of type flannel.
pub fn find_flannel_conflist(dir: &Path, name: Option<&str>) -> Result<PathBuf, InstallError> {
    if let Some(name) = name {
        let path = dir.join(name);
        return if path.exists() {
            Ok(path)
        } else {
            Err(InstallError::NoFlannel {
                dir: dir.display().to_string(),
                wanted: name.to_string(),
            })
        };
    }
    let default = dir.join(FLANNEL_CONFLIST);
    if default.exists() {
        return Ok(default);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .filter(|p| p.file_name().is_some_and(|n| n != OUR_CONFLIST))
        .collect();
    names.sort();
    for path in names {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if text.contains("\"flannel\"") && !is_ours(&text) {
            return Ok(path);
        }
    }
    Err(InstallError::NoFlannel {
        dir: dir.display().to_string(),
        wanted: format!("{FLANNEL_CONFLIST} or a *.conflist with a flannel plugin"),
    })
}

/// Write `text` to `path` atomically: a temp file in the same dir, then rename.
pub fn write_atomically(path: &Path, text: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.sluice-tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(text).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[derive(Clone, Debug)]
pub struct Installer {
    /// Host CNI bin dir (e.g. /host/opt/cni/bin).
    pub bin_dir: PathBuf,
    /// Host CNI conf dir (e.g. /host/etc/cni/net.d).
    pub conf_dir: PathBuf,
    /// The sluice-cni binary to copy.
    pub plugin_binary: PathBuf,
    /// Flannel's conflist file name (`None`: find it).
    pub flannel_conflist: Option<String>,
    pub settings: PluginSettings,
}

/// What one pass did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// Our conflist was written (new or changed).
    Wrote,
    /// Nothing to change.
    Unchanged,
}

impl Installer {
    pub fn our_conflist(&self) -> PathBuf {
        self.conf_dir.join(OUR_CONFLIST)
    }

    /// Copy the plugin binary when the host's copy differs.
    pub fn install_binary(&self) -> Result<bool, InstallError> {
        let ours = std::fs::read(&self.plugin_binary).map_err(io(&self.plugin_binary))?;
        let target = self.bin_dir.join("sluice-cni");
        if std::fs::read(&target).is_ok_and(|theirs| theirs == ours) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.bin_dir).map_err(io(&self.bin_dir))?;
        write_atomically(&target, &ours, 0o755)?;
        Ok(true)
    }

    /// Derive our conflist from flannel's current one. On any error nothing is written.
    pub fn sync_conflist(&self) -> Result<Pass, InstallError> {
        let flannel = find_flannel_conflist(&self.conf_dir, self.flannel_conflist.as_deref())?;
        let text = std::fs::read_to_string(&flannel).map_err(io(&flannel))?;
        let name = flannel
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let derived = derive_conflist(&name, &text, &self.settings)?;
        let path = self.our_conflist();
        if std::fs::read_to_string(&path).is_ok_and(|current| current == derived) {
            return Ok(Pass::Unchanged);
        }
        write_atomically(&path, derived.as_bytes(), 0o644)?;
        Ok(Pass::Wrote)
    }

    /// Remove our conflist (only if we wrote it) and the plugin binary: flannel's chain alone
    /// takes over again.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        let path = self.our_conflist();
        if let Ok(text) = std::fs::read_to_string(&path) {
            if is_ours(&text) {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        let binary = self.bin_dir.join("sluice-cni");
        match std::fs::remove_file(&binary) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&binary)(e)),
            _ => Ok(()),
        }
    }

    /// Install, then keep our conflist derived from flannel's (checked every `interval`) until
    /// a stop: `wait_for_stop(d)` waits up to `d` and says whether a stop came (so the loop
    /// sleeps until the next check or the stop, never polling). Errors are printed and retried;
    /// the last good conflist stays meanwhile.
    pub fn run(
        &self,
        interval: Duration,
        wait_for_stop: &dyn Fn(Duration) -> bool,
    ) -> Result<(), InstallError> {
        if self.install_binary()? {
            tracing::info!(bin_dir = %self.bin_dir.display(), "installed sluice-cni");
        }
        let mut last_error: Option<String> = None;
        loop {
            match self.sync_conflist() {
                Ok(Pass::Wrote) => {
                    tracing::info!(conflist = %self.our_conflist().display(), "wrote the chained conflist (flannel's plugins, then sluice-cni)");
                    last_error = None;
                }
                Ok(Pass::Unchanged) => last_error = None,
                Err(error) => {
                    let text = error.to_string();
                    // Say it once per distinct problem, not every interval.
                    if last_error.as_deref() != Some(&text) {
                        tracing::error!(%error, "cannot derive the chained conflist; the node's CNI configuration is left as it is");
                    }
                    last_error = Some(text);
                }
            }
            if wait_for_stop(interval) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    fn settings() -> PluginSettings {
        PluginSettings {
            agent_socket: "/run/sluice/cni.sock".into(),
            timeout: "10s".into(),
            fail_mode: "closed".into(),
        }
    }

    #[test]
    fn flannels_chain_then_sluice() {
        let text = derive_conflist("10-flannel.conflist", FLANNEL, &settings()).expect("derive");
        let doc: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(doc["name"], "cbr0");
        assert_eq!(doc["cniVersion"], "0.3.1");
        let plugins = doc["plugins"].as_array().expect("plugins");
        let types: Vec<&str> = plugins.iter().filter_map(|p| p["type"].as_str()).collect();
        assert_eq!(types, ["flannel", "portmap", "sluice-cni"]);
        let flannel: Value = serde_json::from_str(FLANNEL).expect("json");
        assert_eq!(
            plugins[0], flannel["plugins"][0],
            "flannel's entries unchanged"
        );
        assert_eq!(plugins[2]["failMode"], "closed");
        assert!(is_ours(&text));
        assert!(!is_ours(FLANNEL));
    }

    #[test]
    fn unexpected_configuration_is_an_error_naming_file_and_field() {
        let cases = [
            ("{", "not valid JSON"),
            ("[]", "expected a JSON object"),
            (r#"{"cniVersion":"0.3.1","plugins":[]}"#, "name"),
            (
                r#"{"name":"cbr0","cniVersion":"9.9.9","plugins":[]}"#,
                "cniVersion: \"9.9.9\"",
            ),
            (
                r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel"}"#,
                "plugins: missing",
            ),
            (
                r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"bridge"}]}"#,
                "no plugin of type \"flannel\"",
            ),
            (
                r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"},{}]}"#,
                "plugins[1].type",
            ),
            (
                r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"},{"type":"sluice-cni"}]}"#,
                "already in flannel's chain",
            ),
        ];
        for (text, expected) in cases {
            let e = derive_conflist("10-flannel.conflist", text, &settings())
                .expect_err(text)
                .to_string();
            assert!(e.starts_with("10-flannel.conflist: "), "{e}");
            assert!(e.contains(expected), "{text}: {e}");
        }
    }
}
