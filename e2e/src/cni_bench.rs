//! Pure helpers of the CNI ADD benchmark (`e2e/bench cni`, `sluice-agent-bench cni`,
//! `src/agent_bench_cni.rs`): the agent's `sluice_cni_add_seconds` histogram read from
//! `/metrics`, the difference of two readings and its quantiles, and whether a pod's address is
//! a key of a dispatch map in `nft list map` output. Everything with I/O is in the binary.

use serde::Serialize;

/// A Prometheus/OpenMetrics histogram: cumulative bucket counts by upper bound (seconds),
/// `+Inf` last, with its sum and count.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Histogram {
    /// (upper bound `le`, cumulative count), in increasing `le`.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// The labels of a sample line (`{le="0.5",op="add"}`) as (name, value) pairs.
fn labels(text: &str) -> Vec<(&str, &str)> {
    text.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
        .collect()
}

fn parse_le(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        _ => v.parse().ok(),
    }
}

/// Reads histogram `name` (e.g. `sluice_cni_add_seconds`) from the text exposition. `None` when
/// it has no `_count` line.
pub fn parse_histogram(text: &str, name: &str) -> Option<Histogram> {
    let mut h = Histogram::default();
    let mut seen_count = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if let Some(rest) = rest.strip_prefix("_bucket{") {
            let Some((label_text, value)) = rest.split_once('}') else {
                continue;
            };
            let le = labels(label_text)
                .into_iter()
                .find(|(k, _)| *k == "le")
                .and_then(|(_, v)| parse_le(v));
            let value = value.split_whitespace().next().and_then(|v| v.parse().ok());
            if let (Some(le), Some(value)) = (le, value) {
                h.buckets.push((le, value));
            }
        } else if let Some(rest) = rest.strip_prefix("_sum ") {
            h.sum = rest.split_whitespace().next()?.parse().ok()?;
        } else if let Some(rest) = rest.strip_prefix("_count ") {
            h.count = rest.split_whitespace().next()?.parse().ok()?;
            seen_count = true;
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    seen_count.then_some(h)
}

impl Histogram {
    /// What was observed after `before` (the same histogram read earlier).
    pub fn since(&self, before: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let was = before
                    .buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |(_, c)| *c);
                (le, n - was)
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// Mean observation in seconds; `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The `q`-quantile (0..=1) in seconds, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does (the first bucket from 0). A quantile in the `+Inf`
    /// bucket is the largest finite bound. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 || self.buckets.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(le, cumulative) in &self.buckets {
            if cumulative >= rank && cumulative > below {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = cumulative - below;
                return Some(lower + (le - lower) * ((rank - below) / inside));
            }
            if le.is_finite() {
                lower = le;
            }
            below = cumulative;
        }
        Some(lower)
    }

    /// The upper bound of the bucket that holds the `q`-quantile (what the histogram can say
    /// for sure: "at most this"). `None` when empty.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank && *c > 0.0)
            .map(|(le, _)| *le)
    }
}

/// Whether `ip` is a key of the map in `nft list map ...` output (`elements = { 10.244.1.2 :
/// jump grp.in.x, ... }`), compared as a whole token (10.244.1.2 is not 10.244.1.20).
pub fn map_has_key(listing: &str, ip: &str) -> bool {
    listing
        .split(['{', '}', ',', '\n'])
        .filter_map(|e| e.split_once(" : ").map(|(k, v)| (k.trim(), v)))
        .filter(|(_, v)| !v.trim().is_empty())
        .any(|(k, _)| k == ip)
}

/// `b / a`, or `None` when `a` is not positive.
pub fn ratio(b: f64, a: f64) -> Option<f64> {
    (a > 0.0).then(|| b / a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP sluice_cni_add_seconds Time a CNI ADD waited for the pod's rules to be committed (successful ADDs).
# TYPE sluice_cni_add_seconds histogram
sluice_cni_add_seconds_sum 1.5
sluice_cni_add_seconds_count 20
sluice_cni_add_seconds_bucket{le=\"0.0005\"} 0
sluice_cni_add_seconds_bucket{le=\"0.001\"} 0
sluice_cni_add_seconds_bucket{le=\"0.032\"} 0
sluice_cni_add_seconds_bucket{le=\"0.064\"} 10
sluice_cni_add_seconds_bucket{le=\"0.128\"} 19
sluice_cni_add_seconds_bucket{le=\"+Inf\"} 20
sluice_cni_requests_total{op=\"add\",result=\"ok\"} 20
# EOF
";

    #[test]
    fn histogram_parses_and_differences() {
        let h = parse_histogram(METRICS, "sluice_cni_add_seconds").unwrap();
        assert_eq!(h.count, 20.0);
        assert_eq!(h.sum, 1.5);
        assert_eq!(h.buckets.len(), 6);
        assert_eq!(h.buckets[5], (f64::INFINITY, 20.0));
        assert_eq!(h.mean(), Some(0.075));
        assert!(parse_histogram(METRICS, "sluice_missing").is_none());

        let before = Histogram {
            buckets: vec![
                (0.032, 0.0),
                (0.064, 4.0),
                (0.128, 4.0),
                (f64::INFINITY, 4.0),
            ],
            sum: 0.2,
            count: 4.0,
        };
        let d = h.since(&before);
        assert_eq!(d.count, 16.0);
        assert!((d.sum - 1.3).abs() < 1e-9);
        assert_eq!(d.buckets[3], (0.064, 6.0));
        assert_eq!(d.buckets[4], (0.128, 15.0));
        // A bucket the earlier reading lacked counts from 0.
        assert_eq!(d.buckets[0], (0.0005, 0.0));
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = parse_histogram(METRICS, "sluice_cni_add_seconds").unwrap();
        // rank 10 of 20: the top of the (0.032, 0.064] bucket.
        assert!((h.quantile(0.5).unwrap() - 0.064).abs() < 1e-12);
        assert_eq!(h.quantile_bound(0.5), Some(0.064));
        // rank 15: 5 of the 9 in (0.064, 0.128].
        let q = h.quantile(0.75).unwrap();
        assert!((q - (0.064 + 0.064 * 5.0 / 9.0)).abs() < 1e-12, "{q}");
        // rank 19.8: in +Inf, reported as the largest finite bound.
        assert_eq!(h.quantile(0.99), Some(0.128));
        assert_eq!(h.quantile_bound(0.99), Some(f64::INFINITY));
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert_eq!(Histogram::default().quantile_bound(0.5), None);
    }

    #[test]
    fn map_keys_are_whole_tokens() {
        let listing = "table inet sluice {\n\tmap ingress_v4 {\n\t\ttype ipv4_addr : verdict\n\t\telements = { 10.244.1.20 : jump grp.in.a,\n\t\t\t     10.244.1.3 : jump grp.in.b }\n\t}\n}\n";
        assert!(map_has_key(listing, "10.244.1.3"));
        assert!(map_has_key(listing, "10.244.1.20"));
        assert!(!map_has_key(listing, "10.244.1.2"));
        let v6 = "elements = { fd00:10:244:1::3 : jump grp.in.b }";
        assert!(map_has_key(v6, "fd00:10:244:1::3"));
        assert!(!map_has_key(v6, "fd00:10:244:1::"));
        assert!(!map_has_key("", "10.244.1.3"));
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
    }
}
