//! The edge to the kernel: the ruleset IR rendered as an nft script, diffs between two rulesets,
//! and applying a script as one transaction (`nft -f -` commits a file atomically).
//!
//! Why text and not the `nftables` crate's JSON: the crate (0.6) cannot declare verdict maps
//! (its issue #237), and `sluice render` must print nft text anyway; one renderer means what we
//! print is exactly what we apply.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::compile::{
    Action, Chain, ChainKind, CounterInfo, Element, Match, Rule, Ruleset, Set, SetKind, Side, TABLE,
};
use crate::model::Family;

fn family_expr(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn side_expr(side: Side) -> &'static str {
    match side {
        Side::Source => "saddr",
        Side::Destination => "daddr",
    }
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// Comments end up in the kernel, which keeps at most 128 bytes, and quotes would end them.
fn comment(text: &str) -> String {
    let mut clean: String = text.chars().filter(|c| *c != '"' && *c != '\\').collect();
    if clean.len() > 120 {
        let mut cut = 117;
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
        clean.push_str("...");
    }
    format!("comment \"{clean}\"")
}

pub fn match_text(m: &Match) -> String {
    match m {
        Match::Established => "ct state established,related".into(),
        Match::NeighborDiscovery => {
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }".into()
        }
        Match::Protocol(p) => format!("meta l4proto {}", p.nft_name()),
        Match::Dport(lo, hi) if lo == hi => format!("th dport {lo}"),
        Match::Dport(lo, hi) => format!("th dport {lo}-{hi}"),
        Match::InSet { side, family, set } => {
            format!("{} {} @{set}", family_expr(*family), side_expr(*side))
        }
        Match::DestinationPortInSet { family, set } => {
            format!("{} daddr . th dport @{set}", family_expr(*family))
        }
    }
}

pub fn rule_text(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule.matches.iter().map(match_text).collect();
    parts.push(match &rule.action {
        Action::Accept => "accept".into(),
        Action::CountedDrop => "counter drop".into(),
        Action::Jump(chain) => format!("jump {chain}"),
        Action::Dispatch { side, family, map } => {
            format!("{} {} vmap @{map}", family_expr(*family), side_expr(*side))
        }
        // nft adds the `meta nfproto` dependency itself, as for the vmap above.
        Action::CountInto { side, family, map } => format!(
            "counter name {} {} map @{map}",
            family_expr(*family),
            side_expr(*side)
        ),
    });
    if let Some(c) = &rule.comment {
        parts.push(comment(c));
    }
    parts.join(" ")
}

fn ip_text(ip: &IpAddr) -> String {
    ip.to_string()
}

pub fn element_text(e: &Element) -> String {
    match e {
        Element::Addr(ip) => ip_text(ip),
        Element::Range(a, b) if a == b => ip_text(a),
        Element::Range(a, b) => format!("{}-{}", ip_text(a), ip_text(b)),
        Element::AddrPort(ip, port) => format!("{} . {port}", ip_text(ip)),
        Element::Jump(ip, chain) => format!("{} : jump {chain}", ip_text(ip)),
        Element::Counter(ip, counter) => format!("{} : \"{counter}\"", ip_text(ip)),
    }
}

fn set_keyword(set: &Set) -> &'static str {
    match set.kind {
        SetKind::Dispatch(_) | SetKind::DropCounters(_) => "map",
        _ => "set",
    }
}

/// The declaration inside `{ }`, without elements.
fn set_spec(set: &Set) -> Vec<String> {
    let mut spec = match set.kind {
        SetKind::Addrs(f) => vec![format!("type {}", addr_type(f))],
        SetKind::Ranges(f) => vec![format!("type {}", addr_type(f)), "flags interval".into()],
        SetKind::AddrPorts(f) => vec![format!("type {} . inet_service", addr_type(f))],
        SetKind::Dispatch(f) => vec![format!("type {} : verdict", addr_type(f))],
        SetKind::DropCounters(f) => vec![format!("type {} : counter", addr_type(f))],
    };
    spec.push(comment(&set.comment));
    spec
}

fn chain_spec(chain: &Chain) -> Vec<String> {
    let mut spec = Vec::new();
    if let ChainKind::Base { priority } = chain.kind {
        spec.push(format!(
            "type filter hook forward priority {priority}; policy accept"
        ));
    }
    spec.push(comment(&chain.comment));
    spec
}

fn elements_text(elements: &BTreeSet<Element>) -> String {
    let items: Vec<String> = elements.iter().map(element_text).collect();
    items.join(", ")
}

/// Order in which objects must be created: counter objects, then plain sets and the counter
/// maps that name counters, then chains that only use sets, then the group chains that jump to
/// them (and count into the counter maps), then the maps that jump to groups, then the base
/// chains.
const COUNTER_RANK: u8 = 0;

fn creation_rank_set(set: &Set) -> u8 {
    match set.kind {
        SetKind::Dispatch(_) => 4,
        _ => 1,
    }
}

fn creation_rank_chain(chain: &Chain) -> u8 {
    match chain.kind {
        ChainKind::Policy => 2,
        ChainKind::Group => 3,
        ChainKind::Base { .. } => 5,
    }
}

/// The declaration inside `{ }` of a counter object (it starts at zero).
fn counter_spec(info: &CounterInfo) -> Vec<String> {
    vec![comment(&info.describe())]
}

/// The whole table as an nft block, in an order nft accepts in one go.
pub fn render(ruleset: &Ruleset) -> String {
    let mut items: Vec<(u8, String)> = Vec::new();
    for (name, info) in &ruleset.counters {
        let mut text = format!("\tcounter {name} {{\n");
        for line in counter_spec(info) {
            let _ = writeln!(text, "\t\t{line}");
        }
        text.push_str("\t}\n");
        items.push((COUNTER_RANK, text));
    }
    for (name, set) in &ruleset.sets {
        let mut text = format!("\t{} {name} {{\n", set_keyword(set));
        for line in set_spec(set) {
            let _ = writeln!(text, "\t\t{line}");
        }
        if !set.elements.is_empty() {
            let _ = writeln!(
                text,
                "\t\telements = {{ {} }}",
                elements_text(&set.elements)
            );
        }
        text.push_str("\t}\n");
        items.push((creation_rank_set(set), text));
    }
    for (name, chain) in &ruleset.chains {
        let mut text = format!("\tchain {name} {{\n");
        for line in chain_spec(chain) {
            let _ = writeln!(text, "\t\t{line}");
        }
        for rule in &chain.rules {
            let _ = writeln!(text, "\t\t{}", rule_text(rule));
        }
        text.push_str("\t}\n");
        items.push((creation_rank_chain(chain), text));
    }
    items.sort_by_key(|(rank, _)| *rank);
    let body: Vec<String> = items.into_iter().map(|(_, t)| t).collect();
    format!("table inet {TABLE} {{\n{}}}\n", body.join("\n"))
}

/// Replace whatever table is there with this ruleset, atomically: there is never a moment
/// without rules.
pub fn replace_script(ruleset: &Ruleset) -> String {
    format!("{}{}", remove_table_script(), render(ruleset))
}

/// Remove the table (uninstall, benchmarks). Harmless when it does not exist.
pub fn remove_table_script() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Commands in a script, as transaction sizes are counted (non-empty lines).
pub fn command_count(script: &str) -> usize {
    script.lines().filter(|l| !l.trim().is_empty()).count()
}

/// The commands that turn `old` into `new`, in an order the kernel accepts inside one
/// transaction: sets and chains exist before anything refers to them and are removed after the
/// last reference is gone. `None` when nothing changed.
pub fn diff_script(old: &Ruleset, new: &Ruleset) -> Option<String> {
    let mut out = String::new();
    let t = TABLE;
    // 1. Declare new counters (counter maps' elements name them), new sets (in creation order)
    //    and new chains (empty for now). A counter's name and comment derive from its pod and
    //    direction, so a counter is either there or not: never changed.
    for (name, info) in &new.counters {
        if !old.counters.contains_key(name) {
            let _ = writeln!(
                out,
                "add counter inet {t} {name} {{ {}; }}",
                counter_spec(info).join("; ")
            );
        }
    }
    let mut new_sets: Vec<(&String, &Set)> = new
        .sets
        .iter()
        .filter(|(n, s)| old.sets.get(*n).map(|o| o.kind) != Some(s.kind))
        .collect();
    new_sets.sort_by_key(|(_, s)| creation_rank_set(s));
    let new_chains: Vec<(&String, &Chain)> = new
        .chains
        .iter()
        .filter(|(n, c)| old.chains.get(*n).map(|o| o.kind) != Some(c.kind))
        .collect();
    for (name, chain) in &new_chains {
        let _ = writeln!(
            out,
            "add chain inet {t} {name} {{ {}; }}",
            chain_spec(chain).join("; ")
        );
    }
    for (name, set) in &new_sets {
        let _ = writeln!(
            out,
            "add {} inet {t} {name} {{ {}; }}",
            set_keyword(set),
            set_spec(set).join("; ")
        );
    }
    // 2. Elements: removals first (a map entry may point at a chain removed below), then adds.
    for (name, set) in &new.sets {
        let before = old.sets.get(name).filter(|o| o.kind == set.kind);
        let empty = BTreeSet::new();
        let before_elems = before.map(|o| &o.elements).unwrap_or(&empty);
        let removed: BTreeSet<Element> = before_elems.difference(&set.elements).cloned().collect();
        if !removed.is_empty() {
            let _ = writeln!(
                out,
                "delete element inet {t} {name} {{ {} }}",
                elements_text(&removed)
            );
        }
    }
    for (name, set) in &new_sets {
        if !set.elements.is_empty() {
            let _ = writeln!(
                out,
                "add element inet {t} {name} {{ {} }}",
                elements_text(&set.elements)
            );
        }
    }
    for (name, set) in &new.sets {
        let Some(before) = old.sets.get(name).filter(|o| o.kind == set.kind) else {
            continue;
        };
        let added: BTreeSet<Element> = set.elements.difference(&before.elements).cloned().collect();
        if !added.is_empty() {
            let _ = writeln!(
                out,
                "add element inet {t} {name} {{ {} }}",
                elements_text(&added)
            );
        }
    }
    // 3. Rules of new and changed chains, in creation order.
    let mut rewrites: Vec<(&String, &Chain, bool)> = new
        .chains
        .iter()
        .filter_map(|(name, chain)| match old.chains.get(name) {
            Some(o) if o.kind == chain.kind && o.rules == chain.rules => None,
            Some(o) if o.kind == chain.kind => Some((name, chain, true)),
            _ => Some((name, chain, false)),
        })
        .collect();
    rewrites.sort_by_key(|(_, c, _)| creation_rank_chain(c));
    for (name, chain, existed) in rewrites {
        if existed {
            let _ = writeln!(out, "flush chain inet {t} {name}");
        }
        for rule in &chain.rules {
            let _ = writeln!(out, "add rule inet {t} {name} {}", rule_text(rule));
        }
    }
    // 4. Chains that are gone: flush them all first (they may jump to each other), then delete.
    let gone_chains: Vec<&String> = old
        .chains
        .iter()
        .filter(|(n, c)| new.chains.get(*n).map(|x| x.kind) != Some(c.kind))
        .map(|(n, _)| n)
        .collect();
    for name in &gone_chains {
        let _ = writeln!(out, "flush chain inet {t} {name}");
    }
    for name in &gone_chains {
        let _ = writeln!(out, "delete chain inet {t} {name}");
    }
    // 5. Sets that are gone (maps first: nothing refers to a map but base chains).
    let mut gone_sets: Vec<(&String, &Set)> = old
        .sets
        .iter()
        .filter(|(n, s)| new.sets.get(*n).map(|x| x.kind) != Some(s.kind))
        .collect();
    gone_sets.sort_by_key(|(_, s)| std::cmp::Reverse(creation_rank_set(s)));
    for (name, set) in gone_sets {
        let _ = writeln!(out, "delete {} inet {t} {name}", set_keyword(set));
    }
    // 6. Counters that are gone: their map elements were deleted in step 2 (or their maps in
    //    step 5), so nothing names them any more.
    for name in old.counters.keys() {
        if !new.counters.contains_key(name) {
            let _ = writeln!(out, "delete counter inet {t} {name}");
        }
    }
    (!out.is_empty()).then_some(out)
}

mod apply;
mod counters;

pub use apply::{Applied, Nft, NftError, TableState};
pub use counters::{take_counters, CounterValue};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile_node;
    use crate::model::Direction;
    use crate::testutil::*;

    #[test]
    fn render_declares_before_use() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "serve-80-tcp"}]}]}"#,
        );
        let text = render(&compile_node(&idx, "node-1").ruleset);
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {text}"))
        };
        assert!(pos("chain in.x.p") < pos("chain grp.in."));
        assert!(pos("chain grp.in.") < pos("map ingress_v4"));
        assert!(pos("map ingress_v4") < pos("chain ingress {"));
        assert!(text.contains("ip daddr . th dport @port_tcp_serve_80_tcp_v4 accept"));
    }

    #[test]
    fn diff_of_equal_rulesets_is_nothing() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "deny",
            r#"{"podSelector": {}, "ingress": []}"#,
        );
        let rs = compile_node(&idx, "node-1").ruleset;
        assert_eq!(diff_script(&rs, &rs), None);
    }

    #[test]
    fn a_new_pod_is_only_element_changes() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "deny",
            r#"{"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}"#,
        );
        let before = compile_node(&idx, "node-1").ruleset;
        idx.apply_pod(mk_pod("x/d", "node-1", &["10.244.1.50"], &[("pod", "d")]));
        let after = compile_node(&idx, "node-1").ruleset;
        let script = diff_script(&before, &after).unwrap();
        assert!(
            script
                .lines()
                .all(|l| l.starts_with("add element") || l.starts_with("add counter")),
            "{script}"
        );
        assert!(script.contains("10.244.1.50 : jump grp.in."));
        assert_eq!(
            script.matches("add counter").count(),
            1,
            "x/d's ingress counter"
        );
    }

    #[test]
    fn removing_a_policy_deletes_after_unreferencing() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "p",
            r#"{"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}"#,
        );
        let before = compile_node(&idx, "node-1").ruleset;
        idx.delete_policy(&key("x/p"));
        let after = compile_node(&idx, "node-1").ruleset;
        let script = diff_script(&before, &after).unwrap();
        let pos = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} in {script}"))
        };
        assert!(
            pos("delete element inet sluice ingress_v4") < pos("delete chain inet sluice grp.in.")
        );
        assert!(pos("flush chain inet sluice in.x.p") < pos("delete chain inet sluice grp.in."));
        assert!(pos("delete chain inet sluice in.x.p") < pos("delete set inet sluice peer_"));
    }

    #[test]
    fn comments_are_quoted_safely_and_bounded() {
        let c = comment(&format!("a\"b{}", "x".repeat(300)));
        assert!(c.len() < 140);
        assert!(!c[9..c.len() - 1].contains('"'));
    }

    #[test]
    fn render_declares_counters_before_their_maps_and_maps_before_group_chains() {
        let mut idx = three_namespaces();
        add_policy(
            &mut idx,
            "x",
            "deny",
            r#"{"podSelector": {}, "ingress": []}"#,
        );
        let rs = compile_node(&idx, "node-1").ruleset;
        let text = render(&rs);
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {text}"))
        };
        let a = crate::compile::drop_counter_name(Direction::Ingress, &key("x/a"));
        assert!(text.contains(&format!(
            "counter {a} {{\n\t\tcomment \"ingress drops of pod x/a\"\n\t}}"
        )));
        assert!(pos(&format!("counter {a}")) < pos("map drops_in_v4"));
        assert!(text.contains(&format!("10.244.1.2 : \"{a}\"")), "{text}");
        assert!(pos("map drops_in_v4") < pos("chain grp.in."));
        assert!(pos("type ipv4_addr : counter") < pos("chain grp.in."));
        assert!(text.contains(
            "\t\tcounter name ip daddr map @drops_in_v4\n\t\tcounter name ip6 daddr map @drops_in_v6\n\t\tcounter drop\n"
        ));
    }

    #[test]
    fn diff_adds_counters_before_naming_them_and_deletes_them_after() {
        let idx = three_namespaces();
        let before = compile_node(&idx, "node-1").ruleset;
        let mut isolated = idx.clone();
        add_policy(
            &mut isolated,
            "x",
            "deny",
            r#"{"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}"#,
        );
        let after = compile_node(&isolated, "node-1").ruleset;
        let a = crate::compile::drop_counter_name(Direction::Egress, &key("x/a"));
        assert_eq!(after.counters.len(), 1);
        let script = diff_script(&before, &after).unwrap();
        let pos = |script: &str, needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} in {script}"))
        };
        let add = format!("add counter inet sluice {a} {{ comment \"egress drops of pod x/a\"; }}");
        assert!(pos(&script, &add) < pos(&script, "add element inet sluice drops_eg_v4"));
        assert!(
            pos(&script, "add element inet sluice drops_eg_v4")
                < pos(&script, "add rule inet sluice grp.eg.")
        );
        assert!(script.contains(&format!(
            "add element inet sluice drops_eg_v4 {{ 10.244.1.2 : \"{a}\" }}"
        )));
        assert!(script.contains(&format!(
            "add element inet sluice drops_eg_v6 {{ fd00:10:244:1::2 : \"{a}\" }}"
        )));
        assert_eq!(script.matches("add counter").count(), 1);

        let back = diff_script(&after, &before).unwrap();
        let del = format!("delete counter inet sluice {a}");
        assert!(pos(&back, "delete element inet sluice drops_eg_v4") < pos(&back, &del));
        assert!(pos(&back, "delete element inet sluice drops_eg_v6") < pos(&back, &del));
        assert!(pos(&back, "delete chain inet sluice grp.eg.") < pos(&back, &del));
        assert!(back.trim_end().ends_with(&del), "{back}");

        // A second pod joining the same group: its counter and elements only.
        isolated.apply_pod(mk_pod("x/d", "node-1", &["10.244.1.50"], &[("pod", "a")]));
        let more = compile_node(&isolated, "node-1").ruleset;
        let d = crate::compile::drop_counter_name(Direction::Egress, &key("x/d"));
        let script = diff_script(&after, &more).unwrap();
        assert!(
            script
                .lines()
                .all(|l| l.starts_with("add element") || l.starts_with("add counter")),
            "{script}"
        );
        assert!(
            pos(&script, &format!("add counter inet sluice {d}"))
                < pos(&script, &format!("10.244.1.50 : \"{d}\""))
        );
    }
}
