//! Scenario files (`../shared/SCENARIOS.md`): YAML documents applied in order, with `Probe`
//! checkpoints.
//!
//! Document numbers (`doc`) are 1-based and count every document of the YAML stream, the way a
//! human counts `---` separators: each `---` line starts a document, including one that holds only
//! comments (such an empty document is skipped but keeps its number). Comments and blank lines
//! before the first `---` are not a document of their own; any other text there is document 1
//! (YAML's bare first document). A `...` line ends a document.
//!
//! Kubernetes documents are kept raw (`Step::Object`): only `apiVersion` and `kind` are checked
//! here. Lab documents (`apiVersion: lab.sluice.dev/v1`, kinds `Delete` and `Probe`) are parsed and
//! validated fully; unknown fields in them are ignored (the format only grows compatibly).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;

use crate::matrix::{Mark, Matrix};

/// The `apiVersion` of lab documents.
pub const LAB_API_VERSION: &str = "lab.sluice.dev/v1";
const LAB_GROUP: &str = "lab.sluice.dev";

/// A parsed scenario file.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// The path as given to `parse_scenario`/`load_scenario` (used in messages).
    pub path: String,
    /// The non-empty documents, in file order.
    pub steps: Vec<Step>,
}

/// One document of a scenario. `doc` is its 1-based number in the file (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A Kubernetes document (Node, Namespace, Pod, NetworkPolicy, or any later kind), kept raw;
    /// another module turns it into typed objects. Has string `apiVersion` and `kind`.
    Object {
        doc: usize,
        value: serde_json::Value,
    },
    /// `kind: Delete`: remove that object. `namespace` is `None` when absent, null or empty.
    Delete {
        doc: usize,
        kind: String,
        namespace: Option<String>,
        name: String,
    },
    /// `kind: Probe`: a checkpoint.
    Probe { doc: usize, spec: ProbeSpec },
}

impl Step {
    /// The 1-based document number of this step.
    pub fn doc(&self) -> usize {
        match self {
            Step::Object { doc, .. } | Step::Delete { doc, .. } | Step::Probe { doc, .. } => *doc,
        }
    }
}

// The API's own protocol and family names (TCP/UDP/SCTP, IPv4/IPv6), shared with the core.
pub use sluice::model::{Family, Protocol};

/// `spec.via` of a probe (written `pod`, `service`; case matters). Default `pod`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Via {
    /// The target pod's IPs.
    #[default]
    Pod,
    /// A ClusterIP Service per target pod (cluster mode only; the lab skips such probes).
    Service,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Pod => "pod",
            Via::Service => "service",
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Via {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pod" => Ok(Via::Pod),
            "service" => Ok(Via::Service),
            _ => Err(format!("unknown via {s:?} (expected pod or service)")),
        }
    }
}

/// The `spec` of a `Probe` document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// 1-65535.
    pub port: u16,
    pub protocol: Protocol,
    /// Clients (`namespace/name`, no duplicates, not empty); `None`: every Running pod. When
    /// given, the rows of `expect` are exactly these pods (in any order).
    pub from: Option<Vec<String>>,
    /// Servers (`namespace/name`, no duplicates, not empty); `None`: every Running pod that is not
    /// hostNetwork. When given, the columns of `expect` are exactly these pods (in any order).
    pub to: Option<Vec<String>>,
    /// `None`: every family the target pod has.
    pub family: Option<Family>,
    pub via: Via,
    /// Optional extension field `timeout` (Go-style duration: `500ms`, `2s`, `1m30s`; positive);
    /// `None`: the runner's default.
    pub timeout: Option<Duration>,
    /// Row and column names are `namespace/name`; a pod's cell with itself is `-`.
    pub expect: Matrix,
}

impl ProbeSpec {
    /// A short description: `TCP/80`, plus ` IPv6` and ` via service` when set.
    pub fn describe(&self) -> String {
        let mut out = format!("{}/{}", self.protocol, self.port);
        if let Some(family) = self.family {
            out.push_str(&format!(" {family}"));
        }
        if self.via == Via::Service {
            out.push_str(" via service");
        }
        out
    }
}

/// Why a scenario cannot be used (the caller maps it to exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{file}: cannot read: {error}")]
    Read { file: String, error: std::io::Error },
    /// A document is invalid. Displays as
    /// `file: document 7 (Probe): spec.protocol: unknown protocol "ICMP" (expected TCP, UDP or SCTP)`;
    /// the parenthesis names the kind (and `namespace/name` when known) and is left out when the
    /// kind is unknown; the field is left out when the fault is not in one field (YAML syntax).
    #[error("{file}: document {doc}{}: {}{message}", describe_object(.object), describe_field(.field))]
    Invalid {
        file: String,
        doc: usize,
        /// `Probe`, `Pod x/a`, `Namespace y`...
        object: Option<String>,
        /// `spec.protocol`, `spec.from[1]`... empty when not about one field.
        field: String,
        message: String,
    },
}

impl ScenarioError {
    /// The document number, if the error is about a document.
    pub fn doc(&self) -> Option<usize> {
        match self {
            ScenarioError::Read { .. } => None,
            ScenarioError::Invalid { doc, .. } => Some(*doc),
        }
    }

    /// The field path (empty when not about one field), if the error is about a document.
    pub fn field(&self) -> Option<&str> {
        match self {
            ScenarioError::Read { .. } => None,
            ScenarioError::Invalid { field, .. } => Some(field),
        }
    }
}

fn describe_object(object: &Option<String>) -> String {
    match object {
        Some(object) => format!(" ({object})"),
        None => String::new(),
    }
}

fn describe_field(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

/// Reads and parses a scenario file; `path` is shown as given in messages.
pub fn load_scenario(path: &Path) -> Result<Scenario, ScenarioError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ScenarioError::Read {
        file: file.clone(),
        error,
    })?;
    parse_scenario(&file, &text)
}

/// Parses the text of a scenario file; `path` names it in messages and in `Scenario::path`.
pub fn parse_scenario(path: &str, text: &str) -> Result<Scenario, ScenarioError> {
    let mut steps = Vec::new();
    for raw in split_documents(text) {
        if !raw.has_content {
            continue;
        }
        let mut ctx = Ctx {
            file: path,
            doc: raw.number,
            object: None,
        };
        // Pad with the lines before the document so that YAML errors name the file's lines.
        let mut chunk = "\n".repeat(raw.first_line);
        for line in &raw.lines {
            chunk.push_str(line);
            chunk.push('\n');
        }
        let mut yaml: serde_yaml::Value = serde_yaml::from_str(&chunk)
            .map_err(|e| ctx.error("", format!("invalid YAML: {e}")))?;
        yaml.apply_merge()
            .map_err(|e| ctx.error("", format!("invalid YAML merge key: {e}")))?;
        let value =
            yaml_to_json(yaml, "").map_err(|(field, message)| ctx.error(&field, message))?;
        if let Some(step) = parse_document(&mut ctx, value)? {
            steps.push(step);
        }
    }
    Ok(Scenario {
        path: path.to_string(),
        steps,
    })
}

/// Where we are, for messages.
struct Ctx<'a> {
    file: &'a str,
    doc: usize,
    object: Option<String>,
}

impl Ctx<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> ScenarioError {
        ScenarioError::Invalid {
            file: self.file.to_string(),
            doc: self.doc,
            object: self.object.clone(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// One document's lines as split from the file.
struct RawDocument<'a> {
    /// 1-based.
    number: usize,
    /// 0-based line index of the first line in the file.
    first_line: usize,
    lines: Vec<&'a str>,
    /// Anything besides comments and blank lines (and the `---` marker).
    has_content: bool,
}

/// `line` is the document marker `marker` (`---` or `...`) at column 0, alone or followed by
/// whitespace.
fn is_marker(line: &str, marker: &str) -> bool {
    match line.strip_prefix(marker) {
        Some(rest) => rest.is_empty() || rest.starts_with([' ', '\t']),
        None => false,
    }
}

fn is_content(text: &str) -> bool {
    let text = text.trim();
    !text.is_empty() && !text.starts_with('#')
}

/// Splits a YAML stream into its documents (see the module docs for the numbering).
fn split_documents(text: &str) -> Vec<RawDocument<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs: Vec<RawDocument<'_>> = Vec::new();
    let mut current: Option<RawDocument<'_>> = None;
    for (i, line) in text.lines().enumerate() {
        if is_marker(line, "---") {
            if let Some(doc) = current.take() {
                docs.push(doc);
            }
            current = Some(RawDocument {
                number: docs.len() + 1,
                first_line: i,
                lines: vec![line],
                has_content: is_content(&line[3..]),
            });
        } else if is_marker(line, "...") {
            if let Some(doc) = current.take() {
                docs.push(doc);
            }
        } else if let Some(doc) = current.as_mut() {
            doc.has_content |= is_content(line);
            doc.lines.push(line);
        } else if is_content(line) && !line.starts_with('%') {
            // A bare document (no `---`); `%` lines are directives, which precede a `---`.
            current = Some(RawDocument {
                number: docs.len() + 1,
                first_line: i,
                lines: vec![line],
                has_content: true,
            });
        }
    }
    if let Some(doc) = current.take() {
        docs.push(doc);
    }
    docs
}

/// Converts YAML to JSON the way Kubernetes tools do: scalar keys become strings, tags are
/// dropped. Errors carry the field path.
fn yaml_to_json(value: serde_yaml::Value, path: &str) -> Result<Value, (String, String)> {
    Ok(match value {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match serde_json::Number::from_f64(f) {
                    Some(n) => Value::Number(n),
                    None => {
                        return Err((path.to_string(), format!("{n} is not a JSON number")));
                    }
                }
            }
        }
        serde_yaml::Value::String(s) => Value::String(s),
        serde_yaml::Value::Sequence(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| yaml_to_json(item, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        serde_yaml::Value::Mapping(mapping) => {
            let mut out = serde_json::Map::new();
            for (key, item) in mapping {
                let key = match key {
                    serde_yaml::Value::String(s) => s,
                    serde_yaml::Value::Bool(b) => b.to_string(),
                    serde_yaml::Value::Number(n) => n.to_string(),
                    serde_yaml::Value::Null => "null".to_string(),
                    _ => {
                        return Err((
                            path.to_string(),
                            "a mapping key must be a scalar".to_string(),
                        ));
                    }
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let item = yaml_to_json(item, &child)?;
                out.insert(key, item);
            }
            Value::Object(out)
        }
        serde_yaml::Value::Tagged(tagged) => yaml_to_json(tagged.value, path)?,
    })
}

/// What a JSON value is, for messages.
fn found(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => format!("a string ({s:?})"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

/// A required non-empty string field of `map`.
fn required_string<'v>(
    ctx: &Ctx<'_>,
    map: &'v serde_json::Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<&'v str, ScenarioError> {
    match map.get(key) {
        None | Some(Value::Null) => Err(ctx.error(field, "missing")),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(ctx.error(field, "must not be empty")),
        Some(other) => Err(ctx.error(field, format!("expected a string, found {}", found(other)))),
    }
}

/// An optional string field of `map` (`None` when absent or null).
fn optional_string<'v>(
    ctx: &Ctx<'_>,
    map: &'v serde_json::Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<&'v str>, ScenarioError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ctx.error(field, format!("expected a string, found {}", found(other)))),
    }
}

/// `Kind`, `Kind name` or `Kind namespace/name`, from a document's `kind` and `metadata`.
fn describe_document(map: &serde_json::Map<String, Value>) -> Option<String> {
    let kind = map.get("kind")?.as_str().filter(|k| !k.is_empty())?;
    let metadata = map.get("metadata").and_then(Value::as_object);
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    Some(match (namespace, name) {
        (Some(namespace), Some(name)) => format!("{kind} {namespace}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => kind.to_string(),
    })
}

fn parse_document(ctx: &mut Ctx<'_>, value: Value) -> Result<Option<Step>, ScenarioError> {
    let map = match value {
        Value::Null => return Ok(None), // `--- ~`: an empty document, as kubectl sees it
        Value::Object(map) => map,
        other => {
            return Err(ctx.error(
                "",
                format!(
                    "expected a mapping with apiVersion and kind, found {}",
                    found(&other)
                ),
            ))
        }
    };
    ctx.object = describe_document(&map);
    const EVERY: &str = " (every document needs apiVersion and kind)";
    let api_version =
        required_string(ctx, &map, "apiVersion", "apiVersion").map_err(|e| append(e, EVERY))?;
    let kind = required_string(ctx, &map, "kind", "kind").map_err(|e| append(e, EVERY))?;

    let group = api_version.split_once('/').map_or("", |(group, _)| group);
    if group != LAB_GROUP {
        return Ok(Some(Step::Object {
            doc: ctx.doc,
            value: Value::Object(map),
        }));
    }
    if api_version != LAB_API_VERSION {
        return Err(ctx.error(
            "apiVersion",
            format!("unknown lab version {api_version:?} (expected {LAB_API_VERSION})"),
        ));
    }
    let spec = match map.get("spec") {
        None | Some(Value::Null) if kind == "Delete" || kind == "Probe" => {
            return Err(ctx.error("spec", "missing"));
        }
        Some(Value::Object(spec)) => Some(spec),
        Some(other) if kind == "Delete" || kind == "Probe" => {
            return Err(ctx.error(
                "spec",
                format!("expected a mapping, found {}", found(other)),
            ));
        }
        _ => None,
    };
    match (kind, spec) {
        ("Delete", Some(spec)) => parse_delete(ctx, spec).map(Some),
        ("Probe", Some(spec)) => Ok(Some(Step::Probe {
            doc: ctx.doc,
            spec: parse_probe(ctx, spec)?,
        })),
        _ => Err(ctx.error(
            "kind",
            format!("unknown lab kind {kind:?} (expected Delete or Probe)"),
        )),
    }
}

fn append(error: ScenarioError, text: &str) -> ScenarioError {
    match error {
        ScenarioError::Invalid {
            file,
            doc,
            object,
            field,
            message,
        } => ScenarioError::Invalid {
            file,
            doc,
            object,
            field,
            message: message + text,
        },
        other => other,
    }
}

fn parse_delete(
    ctx: &Ctx<'_>,
    spec: &serde_json::Map<String, Value>,
) -> Result<Step, ScenarioError> {
    let kind = required_string(ctx, spec, "kind", "spec.kind")?;
    let name = required_string(ctx, spec, "name", "spec.name")?;
    let namespace = optional_string(ctx, spec, "namespace", "spec.namespace")?;
    Ok(Step::Delete {
        doc: ctx.doc,
        kind: kind.to_string(),
        namespace: namespace.filter(|n| !n.is_empty()).map(str::to_string),
        name: name.to_string(),
    })
}

/// `namespace/name` with both parts non-empty, one `/`, no whitespace.
pub fn is_pod_ref(text: &str) -> bool {
    match text.split_once('/') {
        Some((namespace, name)) => {
            !namespace.is_empty()
                && !name.is_empty()
                && !name.contains('/')
                && !text.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

fn parse_pod_list(
    ctx: &Ctx<'_>,
    spec: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<Vec<String>>, ScenarioError> {
    let field = format!("spec.{key}");
    let items = match spec.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ctx.error(
                &field,
                format!(
                    "expected a list of pods (namespace/name), found {}",
                    found(other)
                ),
            ))
        }
    };
    if items.is_empty() {
        return Err(ctx.error(&field, "must not be empty (leave it out to mean every pod)"));
    }
    let mut pods: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let Value::String(pod) = item else {
            return Err(ctx.error(
                &field,
                format!("expected a pod (namespace/name), found {}", found(item)),
            ));
        };
        if !is_pod_ref(pod) {
            return Err(ctx.error(
                &field,
                format!("bad pod reference {pod:?} (expected namespace/name)"),
            ));
        }
        if pods.contains(pod) {
            return Err(ctx.error(&field, format!("{pod} is listed twice")));
        }
        pods.push(pod.clone());
    }
    Ok(Some(pods))
}

fn parse_probe(
    ctx: &Ctx<'_>,
    spec: &serde_json::Map<String, Value>,
) -> Result<ProbeSpec, ScenarioError> {
    let port = match spec.get("port") {
        None | Some(Value::Null) => return Err(ctx.error("spec.port", "missing")),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(p), _) if (1..=65535).contains(&p) => p as u16,
            (Some(_), _) | (None, Some(_)) => {
                return Err(ctx.error("spec.port", format!("port {n} out of range (1-65535)")))
            }
            (None, None) => {
                return Err(ctx.error(
                    "spec.port",
                    format!("expected a whole number (1-65535), found {n}"),
                ))
            }
        },
        Some(other) => {
            return Err(ctx.error(
                "spec.port",
                format!("expected a port number (1-65535), found {}", found(other)),
            ))
        }
    };
    let protocol = match spec.get("protocol") {
        None | Some(Value::Null) => {
            return Err(ctx.error("spec.protocol", "missing (expected TCP, UDP or SCTP)"))
        }
        Some(Value::String(s)) => s
            .parse::<Protocol>()
            .map_err(|e| ctx.error("spec.protocol", e))?,
        Some(other) => {
            return Err(ctx.error(
                "spec.protocol",
                format!("expected TCP, UDP or SCTP, found {}", found(other)),
            ))
        }
    };
    let from = parse_pod_list(ctx, spec, "from")?;
    let to = parse_pod_list(ctx, spec, "to")?;
    let family = optional_string(ctx, spec, "family", "spec.family")?
        .map(|s| s.parse::<Family>().map_err(|e| ctx.error("spec.family", e)))
        .transpose()?;
    let via = optional_string(ctx, spec, "via", "spec.via")?
        .map(|s| s.parse::<Via>().map_err(|e| ctx.error("spec.via", e)))
        .transpose()?
        .unwrap_or_default();
    let timeout = optional_string(ctx, spec, "timeout", "spec.timeout")?
        .map(|s| parse_duration(s).map_err(|e| ctx.error("spec.timeout", e)))
        .transpose()?;

    let expect = match spec.get("expect") {
        None | Some(Value::Null) => {
            return Err(ctx.error(
                "spec.expect",
                "missing (the expected matrix, a block of text starting with *)",
            ))
        }
        Some(Value::String(s)) => Matrix::parse(s).map_err(|e| ctx.error("spec.expect", e))?,
        Some(other) => {
            return Err(ctx.error(
                "spec.expect",
                format!(
                    "expected the matrix as text (write `expect: |`), found {}",
                    found(other)
                ),
            ))
        }
    };
    check_matrix(ctx, &expect, from.as_deref(), to.as_deref())?;

    Ok(ProbeSpec {
        port,
        protocol,
        from,
        to,
        family,
        via,
        timeout,
        expect,
    })
}

/// Names are pod references, a pod's cell with itself is `-`, and rows/columns are exactly
/// `from`/`to` when those are given.
fn check_matrix(
    ctx: &Ctx<'_>,
    expect: &Matrix,
    from: Option<&[String]>,
    to: Option<&[String]>,
) -> Result<(), ScenarioError> {
    const FIELD: &str = "spec.expect";
    for column in &expect.columns {
        if !is_pod_ref(column) {
            return Err(ctx.error(
                FIELD,
                format!("column {column:?} is not a pod reference (expected namespace/name)"),
            ));
        }
    }
    for row in expect.row_names() {
        if !is_pod_ref(row) {
            return Err(ctx.error(
                FIELD,
                format!("row {row:?} is not a pod reference (expected namespace/name)"),
            ));
        }
    }
    for (row, column, mark) in expect.cells() {
        if row == column && mark != Mark::NotProbed {
            return Err(ctx.error(
                FIELD,
                format!(
                    "row {row}, column {column}: a pod's cell with itself is never probed (write -)"
                ),
            ));
        }
    }
    if let Some(from) = from {
        same_pods(ctx, expect.row_names(), from, "rows", "row", "spec.from")?;
    }
    if let Some(to) = to {
        same_pods(
            ctx,
            expect.columns.iter().map(String::as_str),
            to,
            "columns",
            "column",
            "spec.to",
        )?;
    }
    Ok(())
}

fn same_pods<'a>(
    ctx: &Ctx<'_>,
    names: impl Iterator<Item = &'a str>,
    listed: &[String],
    plural: &str,
    singular: &str,
    field: &str,
) -> Result<(), ScenarioError> {
    let names: BTreeSet<&str> = names.collect();
    let listed: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
    if names == listed {
        return Ok(());
    }
    let mut problems = Vec::new();
    for pod in listed.difference(&names) {
        problems.push(format!("{pod} is in {field} but has no {singular}"));
    }
    for pod in names.difference(&listed) {
        problems.push(format!("{singular} {pod} is not in {field}"));
    }
    Err(ctx.error(
        "spec.expect",
        format!(
            "the {plural} must be the pods of {field}: {}",
            problems.join("; ")
        ),
    ))
}

pub use sluice::duration::parse as parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "\
# A small scenario.
apiVersion: v1
kind: Node
metadata:
  name: node-1
---
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {}
";

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        parse_scenario("test.yaml", text)
    }

    fn probe(spec: &str) -> String {
        let mut out = String::from(HEADER);
        out.push_str("---\napiVersion: lab.sluice.dev/v1\nkind: Probe\nspec:\n");
        for line in spec.lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    fn probe_spec(spec: &str) -> ProbeSpec {
        let scenario = parse(&probe(spec)).unwrap();
        match scenario.steps.last() {
            Some(Step::Probe { doc: 3, spec }) => spec.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn probe_error(spec: &str) -> String {
        parse(&probe(spec)).unwrap_err().to_string()
    }

    const SMALL: &str = "\
port: 80
protocol: TCP
expect: |
  *    x/a  y/b
  x/a  -    .
  x/b  X    .
";

    /// The shape of example 21, shortened: objects, a probe, an update, a probe.
    const EXAMPLE: &str = "\
# Upstream case 21, cut down.
apiVersion: v1
kind: Node
metadata:
  name: node-1
spec:
  podCIDRs:
  - 10.244.1.0/24
  - fd00:10:244:1::/64
---
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {}
---
apiVersion: v1
kind: Pod
metadata:
  namespace: x
  name: a
  labels:
    pod: a
spec:
  nodeName: node-1
  containers:
  - name: server
    image: registry.k8s.io/pause:3.10
    ports:
    - name: serve-80-tcp
      containerPort: 80
      protocol: TCP
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  namespace: x
  name: allow-from-updated-ns
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          ns2: updated
---
apiVersion: lab.sluice.dev/v1
kind: Probe
spec:
  port: 80
  protocol: TCP
  expect: |
    *    x/a  x/b  y/a
    x/a  -    .    .
    x/b  X    -    .
    y/a  X    .    -
---
apiVersion: v1
kind: Namespace
metadata:
  name: y
  labels:
    ns2: updated
---
apiVersion: lab.sluice.dev/v1
kind: Probe
spec:
  port: 80
  protocol: TCP
  expect: |
    *    x/a  x/b  y/a
    x/a  -    .    .
    x/b  X    -    .
    y/a  .    .    -
";

    #[test]
    fn parses_the_example_shape() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(s.path, "test.yaml");
        assert_eq!(
            s.steps.iter().map(Step::doc).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7]
        );
        let Step::Object { value, .. } = &s.steps[0] else {
            panic!()
        };
        assert_eq!(value["kind"], "Node");
        assert_eq!(value["spec"]["podCIDRs"][1], "fd00:10:244:1::/64");
        let Step::Object { value, .. } = &s.steps[2] else {
            panic!()
        };
        assert_eq!(
            value["spec"]["containers"][0]["ports"][0]["containerPort"],
            80
        );
        let Step::Object { value, .. } = &s.steps[3] else {
            panic!()
        };
        assert_eq!(value["apiVersion"], "networking.k8s.io/v1");
        let Step::Probe { spec, .. } = &s.steps[4] else {
            panic!()
        };
        assert_eq!(spec.port, 80);
        assert_eq!(spec.protocol, Protocol::Tcp);
        assert_eq!(spec.from, None);
        assert_eq!(spec.to, None);
        assert_eq!(spec.family, None);
        assert_eq!(spec.via, Via::Pod);
        assert_eq!(spec.timeout, None);
        assert_eq!(spec.expect.get("y/a", "x/a"), Some(Mark::Denied));
        assert_eq!(spec.describe(), "TCP/80");
        let Step::Probe { spec, .. } = &s.steps[6] else {
            panic!()
        };
        assert_eq!(spec.expect.get("y/a", "x/a"), Some(Mark::Allowed));
    }

    #[test]
    fn document_numbers_count_empty_documents() {
        let text = "\
# leading comment, not a document
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
# only a comment: document 2, skipped
---
--- # document 4, empty too
---
apiVersion: v1
kind: Namespace
metadata: {name: y}
...
# after the end marker
--- ~
---
apiVersion: v1
kind: Namespace
metadata: {name: z}
---
";
        let s = parse(text).unwrap();
        assert_eq!(s.steps.iter().map(Step::doc).collect::<Vec<_>>(), [1, 5, 7]);
        // A file without any `---`: one bare document.
        let s = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n").unwrap();
        assert_eq!(s.steps.len(), 1);
        assert_eq!(s.steps[0].doc(), 1);
        // An empty file is an empty scenario.
        assert!(parse("").unwrap().steps.is_empty());
        assert!(parse("# nothing\n\n").unwrap().steps.is_empty());
        // Content after `...` without `---` is a (bare) document of its own.
        let s = parse("apiVersion: v1\nkind: A\n...\napiVersion: v1\nkind: B\n").unwrap();
        assert_eq!(s.steps.iter().map(Step::doc).collect::<Vec<_>>(), [1, 2]);
        // Byte order mark and CRLF.
        let s = parse("\u{feff}---\r\napiVersion: v1\r\nkind: A\r\n---\r\nkind: B\r\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            s,
            "test.yaml: document 2 (B): apiVersion: missing (every document needs apiVersion and kind)"
        );
    }

    #[test]
    fn yaml_errors_name_the_document_and_line() {
        let text = format!("{HEADER}---\napiVersion: v1\nkind: Pod\nmetadata: [unclosed\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.doc(), Some(3));
        let msg = err.to_string();
        assert!(
            msg.starts_with("test.yaml: document 3: invalid YAML: "),
            "{msg}"
        );
        assert!(msg.contains("line 15"), "{msg}");
        let err = parse("a: 1\na: 2\n").unwrap_err().to_string();
        assert!(
            err.starts_with("test.yaml: document 1: invalid YAML: ") && err.contains("duplicate"),
            "{err}"
        );
    }

    #[test]
    fn every_document_needs_api_version_and_kind() {
        let e = parse("kind: Pod\nmetadata: {namespace: x, name: a}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "test.yaml: document 1 (Pod x/a): apiVersion: missing (every document needs apiVersion and kind)"
        );
        let e = parse("---\n---\napiVersion: v1\nmetadata: {name: a}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "test.yaml: document 2: kind: missing (every document needs apiVersion and kind)"
        );
        let e = parse("apiVersion: 1\nkind: Pod\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "test.yaml: document 1 (Pod): apiVersion: expected a string, found a number (1) (every document needs apiVersion and kind)"
        );
        let e = parse("- a\n- b\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "test.yaml: document 1: expected a mapping with apiVersion and kind, found a list"
        );
    }

    #[test]
    fn objects_are_kept_raw() {
        let text = "\
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-all}
spec:
  priority: 10
  80: numeric key
  base: &base {a: 1}
  merged:
    <<: *base
    b: 2
  tagged: !custom 5
";
        let s = parse(text).unwrap();
        let Step::Object { doc: 1, value } = &s.steps[0] else {
            panic!("{s:?}")
        };
        assert_eq!(value["kind"], "ClusterNetworkPolicy");
        assert_eq!(value["spec"]["priority"], 10);
        assert_eq!(value["spec"]["80"], "numeric key");
        assert_eq!(value["spec"]["merged"], serde_json::json!({"a": 1, "b": 2}));
        assert_eq!(value["spec"]["tagged"], 5);
    }

    #[test]
    fn delete() {
        let text = format!(
            "{HEADER}---\napiVersion: lab.sluice.dev/v1\nkind: Delete\nspec: {{kind: Pod, namespace: x, name: a}}\n\
             ---\napiVersion: lab.sluice.dev/v1\nkind: Delete\nspec:\n  kind: Namespace\n  name: x\n"
        );
        let s = parse(&text).unwrap();
        assert_eq!(
            s.steps[2],
            Step::Delete {
                doc: 3,
                kind: "Pod".into(),
                namespace: Some("x".into()),
                name: "a".into()
            }
        );
        assert_eq!(
            s.steps[3],
            Step::Delete {
                doc: 4,
                kind: "Namespace".into(),
                namespace: None,
                name: "x".into()
            }
        );
        let e = parse("apiVersion: lab.sluice.dev/v1\nkind: Delete\nspec: {kind: Pod}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "test.yaml: document 1 (Delete): spec.name: missing");
        let e = parse("apiVersion: lab.sluice.dev/v1\nkind: Delete\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "test.yaml: document 1 (Delete): spec: missing");
        let e = parse(
            "apiVersion: lab.sluice.dev/v1\nkind: Delete\nspec: {kind: Pod, name: a, namespace: 3}\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "test.yaml: document 1 (Delete): spec.namespace: expected a string, found a number (3)"
        );
    }

    #[test]
    fn unknown_lab_kinds_and_versions() {
        let e = parse("apiVersion: lab.sluice.dev/v1\nkind: Sleep\nspec: {}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "test.yaml: document 1 (Sleep): kind: unknown lab kind \"Sleep\" (expected Delete or Probe)"
        );
        let e = parse("apiVersion: lab.sluice.dev/v2\nkind: Probe\nspec: {}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "test.yaml: document 1 (Probe): apiVersion: unknown lab version \"lab.sluice.dev/v2\" (expected lab.sluice.dev/v1)"
        );
    }

    #[test]
    fn probe_fields() {
        let spec = probe_spec(SMALL);
        assert_eq!(spec.port, 80);
        assert_eq!(
            spec.expect,
            Matrix::parse("* x/a y/b\nx/a - .\nx/b X .").unwrap()
        );

        let spec = probe_spec(
            "port: 53\nprotocol: UDP\nfrom: [x/b, x/a]\nto: [y/b, x/a]\nfamily: IPv6\nvia: service\ntimeout: 500ms\nfuture: ignored\n\
             expect: |\n  *    x/a  y/b\n  x/a  -    .\n  x/b  X    .\n",
        );
        assert_eq!(spec.port, 53);
        assert_eq!(spec.protocol, Protocol::Udp);
        assert_eq!(spec.from, Some(vec!["x/b".to_string(), "x/a".to_string()]));
        assert_eq!(spec.to, Some(vec!["y/b".to_string(), "x/a".to_string()]));
        assert_eq!(spec.family, Some(Family::V6));
        assert_eq!(spec.via, Via::Service);
        assert_eq!(spec.timeout, Some(Duration::from_millis(500)));
        assert_eq!(spec.describe(), "UDP/53 IPv6 via service");

        let spec = probe_spec(
            &format!("{SMALL}family: IPv4\nvia: pod\ntimeout: 2s\n").replace("TCP", "SCTP"),
        );
        assert_eq!(spec.protocol, Protocol::Sctp);
        assert_eq!(spec.family, Some(Family::V4));
        assert_eq!(spec.via, Via::Pod);
        assert_eq!(spec.timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn probe_errors() {
        let with = |from: &str, to: &str| SMALL.replace(from, to);
        assert_eq!(
            probe_error(&with("TCP", "ICMP")),
            "test.yaml: document 3 (Probe): spec.protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)"
        );
        assert_eq!(
            probe_error(&with("TCP", "tcp")),
            "test.yaml: document 3 (Probe): spec.protocol: unknown protocol \"tcp\" (expected TCP, UDP or SCTP)"
        );
        assert_eq!(
            probe_error(&with("protocol: TCP\n", "")),
            "test.yaml: document 3 (Probe): spec.protocol: missing (expected TCP, UDP or SCTP)"
        );
        assert_eq!(
            probe_error(&with("80", "0")),
            "test.yaml: document 3 (Probe): spec.port: port 0 out of range (1-65535)"
        );
        assert_eq!(
            probe_error(&with("80", "65536")),
            "test.yaml: document 3 (Probe): spec.port: port 65536 out of range (1-65535)"
        );
        assert_eq!(
            probe_error(&with("80", "-1")),
            "test.yaml: document 3 (Probe): spec.port: port -1 out of range (1-65535)"
        );
        assert_eq!(
            probe_error(&with("80", "80.5")),
            "test.yaml: document 3 (Probe): spec.port: expected a whole number (1-65535), found 80.5"
        );
        assert_eq!(
            probe_error(&with("80", "http")),
            "test.yaml: document 3 (Probe): spec.port: expected a port number (1-65535), found a string (\"http\")"
        );
        assert_eq!(
            probe_error(&with("port: 80\n", "")),
            "test.yaml: document 3 (Probe): spec.port: missing"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}family: ipv4\n")),
            "test.yaml: document 3 (Probe): spec.family: unknown family \"ipv4\" (expected IPv4 or IPv6)"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}via: Service\n")),
            "test.yaml: document 3 (Probe): spec.via: unknown via \"Service\" (expected pod or service)"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}timeout: 2\n")),
            "test.yaml: document 3 (Probe): spec.timeout: expected a string, found a number (2)"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}timeout: soon\n")),
            "test.yaml: document 3 (Probe): spec.timeout: bad duration \"soon\" (expected e.g. \"500ms\" or \"2s\")"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}from: [x/a, xb]\n")),
            "test.yaml: document 3 (Probe): spec.from[1]: bad pod reference \"xb\" (expected namespace/name)"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}to: [x/a, y/b/c]\n")),
            "test.yaml: document 3 (Probe): spec.to[1]: bad pod reference \"y/b/c\" (expected namespace/name)"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}from: [x/a, x/a]\n")),
            "test.yaml: document 3 (Probe): spec.from[1]: x/a is listed twice"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}from: x/a\n")),
            "test.yaml: document 3 (Probe): spec.from: expected a list of pods (namespace/name), found a string (\"x/a\")"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}to: []\n")),
            "test.yaml: document 3 (Probe): spec.to: must not be empty (leave it out to mean every pod)"
        );
        assert_eq!(
            probe_error("port: 80\nprotocol: TCP\n"),
            "test.yaml: document 3 (Probe): spec.expect: missing (the expected matrix, a block of text starting with *)"
        );
        assert_eq!(
            probe_error("port: 80\nprotocol: TCP\nexpect: [a]\n"),
            "test.yaml: document 3 (Probe): spec.expect: expected the matrix as text (write `expect: |`), found a list"
        );
    }

    #[test]
    fn matrix_errors() {
        assert_eq!(
            probe_error(&SMALL.replace("x/b  X", "x/b  O")),
            "test.yaml: document 3 (Probe): spec.expect: matrix line 3: row x/b, column x/a: unknown mark \"O\" (expected ., X or -)"
        );
        assert_eq!(
            probe_error(&SMALL.replace("y/b\n", "yb\n")),
            "test.yaml: document 3 (Probe): spec.expect: column \"yb\" is not a pod reference (expected namespace/name)"
        );
        assert_eq!(
            probe_error(&SMALL.replace("x/b  X", "xb  X")),
            "test.yaml: document 3 (Probe): spec.expect: row \"xb\" is not a pod reference (expected namespace/name)"
        );
        assert_eq!(
            probe_error(&SMALL.replace("x/a  -", "x/a  X")),
            "test.yaml: document 3 (Probe): spec.expect: row x/a, column x/a: a pod's cell with itself is never probed (write -)"
        );
    }

    #[test]
    fn matrix_must_match_from_and_to() {
        // Same pods in another order is fine.
        probe_spec(&format!("{SMALL}from: [x/b, x/a]\nto: [y/b, x/a]\n"));
        assert_eq!(
            probe_error(&format!("{SMALL}from: [x/a, x/c]\n")),
            "test.yaml: document 3 (Probe): spec.expect: the rows must be the pods of spec.from: x/c is in spec.from but has no row; row x/b is not in spec.from"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}to: [x/a]\n")),
            "test.yaml: document 3 (Probe): spec.expect: the columns must be the pods of spec.to: column y/b is not in spec.to"
        );
        assert_eq!(
            probe_error(&format!("{SMALL}to: [x/a, y/b, z/c]\n")),
            "test.yaml: document 3 (Probe): spec.expect: the columns must be the pods of spec.to: z/c is in spec.to but has no column"
        );
    }

    #[test]
    fn names_and_parsing_of_enums() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(p.to_string().parse::<Protocol>(), Ok(p));
        }
        for f in [Family::V4, Family::V6] {
            assert_eq!(f.to_string().parse::<Family>(), Ok(f));
        }
        for v in [Via::Pod, Via::Service] {
            assert_eq!(v.to_string().parse::<Via>(), Ok(v));
        }
        assert!(is_pod_ref("x/a"));
        for bad in ["x", "/a", "x/", "x/a/b", "x /a", ""] {
            assert!(!is_pod_ref(bad), "{bad}");
        }
    }

    #[test]
    fn load_reads_files() {
        let dir = std::env::temp_dir().join(format!("sluice-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ok.yaml");
        std::fs::write(&path, EXAMPLE).unwrap();
        let s = load_scenario(&path).unwrap();
        assert_eq!(s.path, path.display().to_string());
        assert_eq!(s.steps.len(), 7);
        let missing = dir.join("missing.yaml");
        let err = load_scenario(&missing).unwrap_err();
        assert!(matches!(err, ScenarioError::Read { .. }));
        assert!(err
            .to_string()
            .starts_with(&format!("{}: cannot read: ", missing.display())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
