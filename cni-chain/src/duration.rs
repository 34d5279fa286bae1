//! Durations as people write them in flags and scenario files: Go style, like kubectl and
//! Kubernetes manifests (`500ms`, `2s`, `1m30s`). It lives in this small crate so the plugin,
//! the agent (`sluice::duration`) and the lab share one parser.

use std::time::Duration;

/// A Go-style duration: one or more `<number><unit>` (decimal numbers; units `ns`, `us`, `µs`,
/// `ms`, `s`, `m`, `h`), e.g. `500ms`, `2s`, `1.5s`, `1m30s`. Must be positive.
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || format!("bad duration {text:?} (expected e.g. \"500ms\" or \"2s\")");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." {
            return Err(bad());
        }
        let number: f64 = number.parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        nanos += number * scale;
    }
    // A year is plenty; this also keeps the conversion below exact enough and in range.
    if !(1.0..=365.0 * 86400e9).contains(&nanos) {
        return Err(format!(
            "duration {text:?} out of range (must be positive, at most a year)"
        ));
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "2", "s", "2 s", "2sec", "-1s", "1..5s", "ms500", "."] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("0s").unwrap_err().contains("out of range"));
        assert!(parse("9999h").unwrap_err().contains("out of range"));
    }
}
