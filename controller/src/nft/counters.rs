//! Reading the drop counters (`Ruleset::counters`) back from the kernel.
//!
//! nft 1.0.6 fills its cache with the whole ruleset, every set element included, before any
//! `list` command, even `list counters` or `list tables` (measured: 1.7-2.8 s and 196 MB with
//! one 300k-element set). `reset counters table inet sluice` needs only the table and one
//! counter dump (no chains, rules or sets: 4 MB, milliseconds), so that is what we run: it
//! returns each counter's values and zeroes it, atomically per counter in the kernel. The values
//! are therefore what was counted since the previous take: add them to a monotonic counter
//! (e.g. prometheus-client's `Counter::inc_by`). A whole-table replacement (start, resync) keeps
//! the counters the new ruleset still names, with their values (`replace`).

use serde_json::Value;

use super::apply::{Nft, NftError};
use crate::compile::{BRIDGE_TABLE, SPOOF_COUNTER, TABLE};

/// What a named counter object counted since the previous `take_counters`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterValue {
    /// The counter's name, a key of `Ruleset::counters`.
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Read and zero every named counter of the `inet sluice` table (see the module comment for why
/// reading resets). No table: an empty list. Never lists chains, rules, sets or elements.
pub fn take_counters(nft: &Nft) -> Result<Vec<CounterValue>, NftError> {
    let (command, out) = nft.output(&["-j", "reset", "counters", "table", "inet", TABLE])?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // The table is not there (yet, or any more): nothing was counted.
        if stderr.contains("No such file or directory") {
            return Ok(Vec::new());
        }
        return Err(NftError::Counters {
            command,
            message: stderr,
        });
    }
    parse_counters(&String::from_utf8_lossy(&out.stdout))
        .map_err(|message| NftError::Counters { command, message })
}

/// Read and zero the anti-spoofing table's counter (`bridge sluice`, counter `spoofed`): frames
/// dropped since the previous take because a registered pod's veth sent them with a source
/// that is not the pod's. `None` when there is no bridge table (no pod registered through CNI).
pub fn take_spoofed(nft: &Nft) -> Result<Option<CounterValue>, NftError> {
    let (command, out) = nft.output(&[
        "-j",
        "reset",
        "counter",
        "bridge",
        BRIDGE_TABLE,
        SPOOF_COUNTER,
    ])?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NftError::Counters {
            command,
            message: stderr,
        });
    }
    let all = parse_family_counters(&String::from_utf8_lossy(&out.stdout), "bridge")
        .map_err(|message| NftError::Counters { command, message })?;
    Ok(all.into_iter().find(|c| c.name == SPOOF_COUNTER))
}

/// The counter objects of our table in `nft -j` output.
fn parse_counters(json: &str) -> Result<Vec<CounterValue>, String> {
    parse_family_counters(json, "inet")
}

/// The counter objects of our table of `family` in `nft -j` output.
fn parse_family_counters(json: &str, family: &str) -> Result<Vec<CounterValue>, String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("bad JSON from nft: {e}"))?;
    let items = doc["nftables"]
        .as_array()
        .ok_or("no \"nftables\" array in nft's output")?;
    let mut out = Vec::new();
    for counter in items.iter().filter_map(|i| i.get("counter")) {
        if counter["table"] != TABLE || counter["family"] != family {
            continue;
        }
        let field = |key: &str| {
            counter[key]
                .as_u64()
                .ok_or_else(|| format!("counter without {key}: {counter}"))
        };
        out.push(CounterValue {
            name: counter["name"]
                .as_str()
                .ok_or_else(|| format!("counter without a name: {counter}"))?
                .to_string(),
            packets: field("packets")?,
            bytes: field("bytes")?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_our_table_are_parsed() {
        // As nft 1.0.6 prints it.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "drop_in_0123456789ab", "table": "sluice", "handle": 2, "comment": "ingress drops of pod x/a", "packets": 3, "bytes": 252}}, {"counter": {"family": "inet", "name": "drop_eg_0123456789ab", "table": "sluice", "handle": 3, "packets": 0, "bytes": 0}}, {"counter": {"family": "ip", "name": "other", "table": "sluice", "handle": 1, "packets": 9, "bytes": 9}}]}"#;
        assert_eq!(
            parse_counters(json).unwrap(),
            vec![
                CounterValue {
                    name: "drop_in_0123456789ab".into(),
                    packets: 3,
                    bytes: 252
                },
                CounterValue {
                    name: "drop_eg_0123456789ab".into(),
                    packets: 0,
                    bytes: 0
                },
            ]
        );
        assert_eq!(parse_counters(r#"{"nftables": []}"#).unwrap(), vec![]);
        let bridge = r#"{"nftables": [{"counter": {"family": "bridge", "name": "spoofed", "table": "sluice", "handle": 2, "packets": 4, "bytes": 168}}]}"#;
        assert_eq!(parse_counters(bridge).unwrap(), vec![]);
        assert_eq!(
            parse_family_counters(bridge, "bridge").unwrap(),
            vec![CounterValue {
                name: "spoofed".into(),
                packets: 4,
                bytes: 168
            }]
        );
        assert!(parse_counters("Error").is_err());
        assert!(parse_counters(
            r#"{"nftables": [{"counter": {"family": "inet", "table": "sluice", "name": "x"}}]}"#
        )
        .is_err());
    }
}
