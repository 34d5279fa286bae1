//! Pure parts of the enforcement-latency benchmark on the local cluster (`e2e/bench cluster`,
//! binary `sluice-cluster-bench`, `src/cluster_bench_main.rs`): what one connection attempt
//! showed, and when a stream of attempts switched to the new behaviour.
//!
//! Times are milliseconds on one monotonic clock (the bench's epoch `Instant`).

use std::net::IpAddr;

/// What one fresh TCP connection attempt (its own SYN, its own source port) showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handshake completed.
    Connected,
    /// Answered with a RST or an ICMP error (nothing listening, unreachable): an answer, not a
    /// policy drop (sluice drops).
    Refused,
    /// No answer within the timeout: the SYN (or its SYN-ACK) was dropped.
    Timeout,
}

/// The behaviour a trial waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Handshakes complete.
    Allowed,
    /// SYNs get no answer.
    Denied,
}

impl Want {
    pub fn matches(self, o: Outcome) -> bool {
        match self {
            Want::Allowed => o == Outcome::Connected,
            Want::Denied => o == Outcome::Timeout,
        }
    }

    /// The old behaviour: what the opposite of `self` looks like.
    pub fn old(self) -> Want {
        match self {
            Want::Allowed => Want::Denied,
            Want::Denied => Want::Allowed,
        }
    }
}

/// One attempt: when its SYN went out, and what came of it (`None` while pending).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attempt {
    pub sent_ms: f64,
    pub outcome: Option<Outcome>,
}

/// Where a stream of attempts (in send order) stands relative to a change made at `t0_ms`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Detection {
    /// The first attempt of the first run of `run` consecutive attempts sent at or after t0 that
    /// all show the new behaviour, with every attempt before it (since t0) resolved.
    Found { index: usize, sent_ms: f64 },
    /// Not decided yet: an attempt before a candidate run, or in it, is still pending, or no
    /// run yet.
    Pending,
}

/// Finds the enforcement instant in `attempts` (sorted by `sent_ms`).
pub fn detect(attempts: &[Attempt], t0_ms: f64, want: Want, run: usize) -> Detection {
    let run = run.max(1);
    let start = attempts.partition_point(|a| a.sent_ms < t0_ms);
    let mut i = start;
    while i < attempts.len() {
        match attempts[i].outcome {
            None => return Detection::Pending,
            Some(o) if want.matches(o) => {
                let end = i + run;
                if end > attempts.len() {
                    return Detection::Pending;
                }
                let mut ok = true;
                for (j, a) in attempts.iter().enumerate().take(end).skip(i + 1) {
                    match a.outcome {
                        None => return Detection::Pending,
                        Some(o) if want.matches(o) => {}
                        Some(_) => {
                            ok = false;
                            i = j;
                            break;
                        }
                    }
                }
                if ok {
                    return Detection::Found {
                        index: i,
                        sent_ms: attempts[i].sent_ms,
                    };
                }
            }
            Some(_) => {}
        }
        i += 1;
    }
    Detection::Pending
}

/// Counts around a detected instant, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Attempts sent before t0 that already showed the new behaviour (the old state did not
    /// hold; should be 0).
    pub early: usize,
    /// Resolved attempts after the detected run that showed the old behaviour again (flaps).
    pub flaps: usize,
    /// Attempts between t0 and the detected instant with no answer (drops).
    pub drops: usize,
    /// Attempts between t0 and the detected instant answered with a RST/ICMP error.
    pub refused: usize,
    /// Every resolved attempt that was answered (connected or refused).
    pub answered: usize,
    /// Every resolved attempt.
    pub resolved: usize,
}

pub fn counts(attempts: &[Attempt], t0_ms: f64, want: Want, found: Option<usize>) -> Counts {
    let mut c = Counts::default();
    let old = want.old();
    for (i, a) in attempts.iter().enumerate() {
        let Some(o) = a.outcome else { continue };
        c.resolved += 1;
        if o != Outcome::Timeout {
            c.answered += 1;
        }
        if a.sent_ms < t0_ms {
            if want.matches(o) {
                c.early += 1;
            }
            continue;
        }
        match found {
            Some(f) if i > f => {
                if old.matches(o) {
                    c.flaps += 1;
                }
            }
            Some(f) if i == f => {}
            _ => match o {
                Outcome::Timeout => c.drops += 1,
                Outcome::Refused => c.refused += 1,
                Outcome::Connected => {}
            },
        }
    }
    c
}

/// Moves an address of the synthetic cluster's pod range (`10.244.0.0/16`, `fd00:10:244::/48`)
/// to `10.<second>.0.0/16` / `fd00:10:<second as hex digits>::/48`, so that background pods
/// never share an address with the pods the real cluster's nodes run (also in 10.244.0.0/16).
pub fn move_address(ip: IpAddr, second: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if o[0] == 10 && o[1] == 244 {
                IpAddr::from([10, second, o[2], o[3]])
            } else {
                ip
            }
        }
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            if s[0] == 0xfd00 && s[1] == 0x10 && s[2] == 0x244 {
                // 250 -> 0x250: the same digits, so the address still reads like its IPv4 twin.
                s[2] = u16::from_str_radix(&second.to_string(), 16).unwrap_or(0x250);
                IpAddr::from(s)
            } else {
                ip
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(sent_ms: f64, o: Option<Outcome>) -> Attempt {
        Attempt {
            sent_ms,
            outcome: o,
        }
    }
    const C: Option<Outcome> = Some(Outcome::Connected);
    const T: Option<Outcome> = Some(Outcome::Timeout);
    const R: Option<Outcome> = Some(Outcome::Refused);

    #[test]
    fn first_of_a_run_after_t0() {
        // allowed until 2.0, one lost SYN at 2.5 among the old behaviour is not the instant.
        let v = vec![
            a(0.0, C),
            a(0.5, T),
            a(1.0, C),
            a(1.5, C),
            a(2.0, T),
            a(2.5, C),
            a(3.0, T),
            a(3.5, T),
            a(4.0, T),
            a(4.5, T),
        ];
        assert_eq!(
            detect(&v, 0.2, Want::Denied, 3),
            Detection::Found {
                index: 6,
                sent_ms: 3.0
            }
        );
        // Attempts before t0 never count, even when they show the new behaviour.
        assert_eq!(
            detect(&v, 0.0, Want::Allowed, 2),
            Detection::Found {
                index: 2,
                sent_ms: 1.0
            }
        );
        let c = counts(&v, 0.2, Want::Denied, Some(6));
        assert_eq!(c.early, 0);
        assert_eq!(c.drops, 2); // 0.5 and 2.0
        assert_eq!(c.flaps, 0);
        assert_eq!(c.answered, 4);
    }

    #[test]
    fn pending_attempts_hold_the_decision() {
        // A pending attempt before the candidate run may still turn out to be new behaviour.
        let v = vec![a(1.0, None), a(1.5, T), a(2.0, T), a(2.5, T)];
        assert_eq!(detect(&v, 0.0, Want::Denied, 3), Detection::Pending);
        // ... but not for Allowed? It might connect late: still pending.
        let v = vec![a(1.0, None), a(1.5, C), a(2.0, C), a(2.5, C)];
        assert_eq!(detect(&v, 0.0, Want::Allowed, 3), Detection::Pending);
        // A run not complete yet.
        let v = vec![a(1.0, T), a(1.5, C), a(2.0, C)];
        assert_eq!(detect(&v, 0.0, Want::Allowed, 3), Detection::Pending);
        let v = vec![a(1.0, T), a(1.5, C), a(2.0, C), a(2.5, None)];
        assert_eq!(detect(&v, 0.0, Want::Allowed, 3), Detection::Pending);
        assert_eq!(detect(&[], 0.0, Want::Allowed, 3), Detection::Pending);
    }

    #[test]
    fn refused_is_an_answer_not_a_drop() {
        let v = vec![a(1.0, R), a(1.5, R), a(2.0, C), a(2.5, C), a(3.0, C)];
        assert_eq!(detect(&v, 0.0, Want::Denied, 1), Detection::Pending);
        let d = detect(&v, 0.0, Want::Allowed, 3);
        assert_eq!(
            d,
            Detection::Found {
                index: 2,
                sent_ms: 2.0
            }
        );
        let c = counts(&v, 0.0, Want::Allowed, Some(2));
        assert_eq!((c.refused, c.drops, c.answered), (2, 0, 5));
    }

    #[test]
    fn flaps_and_early() {
        let v = vec![a(0.0, T), a(1.0, T), a(2.0, T), a(3.0, C), a(4.0, T)];
        let c = counts(&v, 0.5, Want::Denied, Some(1));
        assert_eq!((c.early, c.flaps), (1, 1));
    }

    #[test]
    fn background_addresses_move_out_of_the_pod_range() {
        let m = |s: &str, k| move_address(s.parse().unwrap(), k).to_string();
        assert_eq!(m("10.244.3.17", 250), "10.250.3.17");
        assert_eq!(m("10.96.0.1", 250), "10.96.0.1");
        assert_eq!(m("fd00:10:244:3::11", 251), "fd00:10:251:3::11");
        assert_eq!(m("fd00:10:245:3::11", 251), "fd00:10:245:3::11");
    }
}
