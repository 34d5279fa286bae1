//! Pure helpers of the agent benchmark (`e2e/bench agent`, binary `sluice-agent-bench`,
//! `src/agent_bench_main.rs`): percentiles, recognising a change in `nft monitor` output, and
//! reading the agent's debug log and `/proc/PID/status`. Everything with I/O is in the binary.

use serde::Serialize;

/// Nearest-rank percentiles of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// The nearest-rank `p`-th percentile (0 < p <= 100) of sorted values: the smallest value with at
/// least p% of the sample at or below it. NaN for an empty sample.
pub fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Percentiles {
    /// `None` for an empty sample.
    pub fn of(values: &[f64]) -> Option<Percentiles> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Percentiles {
            n: v.len(),
            min: v[0],
            p50: nearest_rank(&v, 50.0),
            p90: nearest_rank(&v, 90.0),
            p99: nearest_rank(&v, 99.0),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
}

/// One line of `nft monitor` (text) output that adds or deletes something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorLine<'a> {
    /// `add` or `delete`.
    pub op: &'a str,
    /// `table`, `chain`, `set`, `map`, `element`, `rule`, ...
    pub object: &'a str,
    /// e.g. `inet`.
    pub family: &'a str,
    pub table: &'a str,
    /// The chain, set or map name ("" for a table).
    pub name: &'a str,
    /// For `element`: the elements between the braces, e.g. `10.244.1.2 : jump grp.in.x`.
    pub elements: Vec<&'a str>,
}

/// Parses `add element inet sluice ingress_v4 { 10.244.1.2 : jump grp.in.ab, ... }`,
/// `add chain inet sluice in.x.y`, `delete chain ...` and the like. `None` for anything else
/// (`# new generation ...`, blank lines).
pub fn parse_monitor_line(line: &str) -> Option<MonitorLine<'_>> {
    let line = line.trim();
    let mut words = line.splitn(5, ' ');
    let op = words.next()?;
    if op != "add" && op != "delete" {
        return None;
    }
    let object = words.next()?;
    let family = words.next()?;
    let table = words.next()?;
    let rest = words.next().unwrap_or("");
    let name = rest.split_whitespace().next().unwrap_or("");
    let name = if name == "{" { "" } else { name };
    let elements = if object == "element" {
        match (rest.find('{'), rest.rfind('}')) {
            (Some(open), Some(close)) if open < close => rest[open + 1..close]
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .collect(),
            _ => Vec::new(),
        }
    } else {
        Vec::new()
    };
    Some(MonitorLine {
        op,
        object,
        family,
        table,
        name,
        elements,
    })
}

/// What a trial waits for in `nft monitor` output, in table `inet <table>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// An element `<ip> : jump ...` of a verdict map added or deleted: the pod's dispatch
    /// entry moved to another group chain (or left the map, when nothing isolates it anymore).
    DispatchElement { ip: String },
    /// `add chain <name>`.
    ChainAdded(String),
    /// `delete chain <name>`.
    ChainDeleted(String),
}

impl Expect {
    pub fn matches(&self, table: &str, line: &str) -> bool {
        let Some(m) = parse_monitor_line(line) else {
            return false;
        };
        if m.family != "inet" || m.table != table {
            return false;
        }
        match self {
            Expect::DispatchElement { ip } => {
                m.object == "element"
                    && m.elements.iter().any(|e| {
                        e.split_once(':').is_some_and(|(key, verdict)| {
                            key.trim() == ip && verdict.trim_start().starts_with("jump ")
                        })
                    })
            }
            Expect::ChainAdded(name) => m.op == "add" && m.object == "chain" && m.name == name,
            Expect::ChainDeleted(name) => m.op == "delete" && m.object == "chain" && m.name == name,
        }
    }
}

/// The agent's debug line after each applied sync (`synced kind="diff" commands=17
/// compile_ms=20.1 apply_ms=5.2`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Synced {
    /// `full` or `diff`.
    pub kind: String,
    pub commands: u64,
    pub compile_ms: f64,
    pub apply_ms: f64,
}

/// `key=value` fields of a tracing-subscriber fmt line (values unquoted).
fn log_fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|w| {
        let (k, v) = w.split_once('=')?;
        Some((k, v.trim_matches('"')))
    })
}

/// Parses the agent's `synced` debug line; `None` for any other line. ANSI colour codes, if
/// any, are tolerated around field names.
pub fn parse_synced(line: &str) -> Option<Synced> {
    let clean = strip_ansi(line);
    if !clean.split_whitespace().any(|w| w == "synced") {
        return None;
    }
    let mut s = Synced::default();
    let mut seen = 0;
    for (k, v) in log_fields(&clean) {
        match k {
            "kind" => s.kind = v.to_string(),
            "commands" => s.commands = v.parse().ok()?,
            "compile_ms" => {
                s.compile_ms = v.parse().ok()?;
                seen += 1;
            }
            "apply_ms" => {
                s.apply_ms = v.parse().ok()?;
                seen += 1;
            }
            _ => {}
        }
    }
    (seen == 2).then_some(s)
}

/// Removes `ESC [ ... m` colour sequences.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `kB` field (`VmHWM`, `VmRSS`) of `/proc/PID/status`, in KiB.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The `[default: X]` of a long option in clap's `--help` text.
pub fn help_default(help: &str, option: &str) -> Option<String> {
    let is_option = |l: &str| {
        let t = l.trim_start();
        t.strip_prefix(option)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '=', ',']))
    };
    let mut lines = help.lines().skip_while(|l| !is_option(l));
    lines.next()?;
    for l in lines {
        let t = l.trim();
        if t.starts_with('-') {
            return None;
        }
        if let Some(rest) = t.strip_prefix("[default: ") {
            return Some(rest.trim_end_matches(']').to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        let p = Percentiles::of(&v).unwrap();
        assert_eq!((p.n, p.min, p.max), (200, 1.0, 200.0));
        assert_eq!((p.p50, p.p90, p.p99), (100.0, 180.0, 198.0));
        assert_eq!(p.mean, 100.5);
        // Unsorted input, small samples.
        let p = Percentiles::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (2.0, 3.0, 3.0));
        assert_eq!(Percentiles::of(&[7.5]).unwrap().p99, 7.5);
        assert!(Percentiles::of(&[]).is_none());
        assert!(nearest_rank(&[], 50.0).is_nan());
    }

    #[test]
    fn monitor_lines_parse() {
        let m = parse_monitor_line(
            "add element inet sluice ingress_v4 { 10.244.1.2 : jump grp.in.aa, 10.244.1.3 : jump grp.in.bb }",
        )
        .unwrap();
        assert_eq!(
            (m.op, m.object, m.family, m.table, m.name),
            ("add", "element", "inet", "sluice", "ingress_v4")
        );
        assert_eq!(
            m.elements,
            vec!["10.244.1.2 : jump grp.in.aa", "10.244.1.3 : jump grp.in.bb"]
        );
        let m = parse_monitor_line("delete chain inet sluice in.ns.pol").unwrap();
        assert_eq!((m.op, m.object, m.name), ("delete", "chain", "in.ns.pol"));
        let m = parse_monitor_line("add table inet sluice").unwrap();
        assert_eq!((m.object, m.table, m.name), ("table", "sluice", ""));
        assert!(parse_monitor_line("# new generation 3 by process 24358 (nft)").is_none());
        assert!(parse_monitor_line("").is_none());
    }

    #[test]
    fn expectations_match_only_their_change() {
        let ip = Expect::DispatchElement {
            ip: "10.244.1.2".into(),
        };
        assert!(ip.matches(
            "sluice",
            "add element inet sluice ingress_v4 { 10.244.1.3 : jump grp.in.a, 10.244.1.2 : jump grp.in.b }"
        ));
        // Another pod with a longer address, a plain set element, another table.
        assert!(!ip.matches(
            "sluice",
            "add element inet sluice ingress_v4 { 10.244.1.20 : jump grp.in.b }"
        ));
        assert!(!ip.matches(
            "sluice",
            "add element inet sluice peer_ab_v4 { 10.244.1.2 }"
        ));
        assert!(ip.matches(
            "sluice",
            "delete element inet sluice ingress_v4 { 10.244.1.2 : jump grp.in.a }"
        ));
        assert!(!ip.matches(
            "sluice",
            "add element inet other ingress_v4 { 10.244.1.2 : jump grp.in.a }"
        ));

        let add = Expect::ChainAdded("in.ns.sluice-bench-1".into());
        assert!(add.matches("sluice", "add chain inet sluice in.ns.sluice-bench-1"));
        assert!(!add.matches("sluice", "add chain inet sluice in.ns.sluice-bench-10"));
        assert!(!add.matches(
            "sluice",
            "add rule inet sluice in.ns.sluice-bench-1 ip saddr @peer_v4 accept"
        ));
        assert!(!add.matches("sluice", "delete chain inet sluice in.ns.sluice-bench-1"));
        let del = Expect::ChainDeleted("in.ns.sluice-bench-1".into());
        assert!(del.matches("sluice", "delete chain inet sluice in.ns.sluice-bench-1"));
        assert!(!del.matches(
            "sluice",
            "delete rule inet sluice in.ns.sluice-bench-1 handle 4"
        ));
    }

    #[test]
    fn synced_lines_parse() {
        let line = "2026-11-25T22:45:00.123456Z DEBUG sluice::agent: synced kind=\"diff\" commands=17 compile_ms=20.125 apply_ms=5.5";
        assert_eq!(
            parse_synced(line),
            Some(Synced {
                kind: "diff".into(),
                commands: 17,
                compile_ms: 20.125,
                apply_ms: 5.5
            })
        );
        let colored = "\u{1b}[2m2026-11-25T22:45:00Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m sluice::agent: synced \u{1b}[3mkind\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"full\" \u{1b}[3mcommands\u{1b}[0m\u{1b}[2m=\u{1b}[0m3 compile_ms=1 apply_ms=2";
        let s = parse_synced(colored).unwrap();
        assert_eq!((s.kind.as_str(), s.commands), ("full", 3));
        assert!(
            parse_synced("2026 INFO sluice::watch: listed resource=\"pods\" objects=3").is_none()
        );
        assert!(parse_synced("synced but no numbers").is_none());
    }

    #[test]
    fn proc_status_and_help_defaults() {
        let status =
            "Name:\tsluice\nVmPeak:\t  300000 kB\nVmHWM:\t   81234 kB\nVmRSS:\t   70000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(81234));
        assert_eq!(status_kib(status, "VmRSS"), Some(70000));
        assert_eq!(status_kib(status, "VmSwap"), None);

        let help = "Options:\n      --resync <RESYNC>\n          How often\n          \n          [env: SLUICE_RESYNC=]\n          [default: 5m]\n\n      --debounce <DEBOUNCE>\n          How long\n          [default: 5ms]\n\n      --cleanup\n          Remove\n";
        assert_eq!(help_default(help, "--debounce").as_deref(), Some("5ms"));
        assert_eq!(help_default(help, "--resync").as_deref(), Some("5m"));
        assert_eq!(help_default(help, "--cleanup"), None);
        assert_eq!(help_default(help, "--missing"), None);
    }
}
