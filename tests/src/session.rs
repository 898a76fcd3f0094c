//! Long-lived request/response sessions (`ztai-probe tcp-session` / `udp-session`), their
//! per-round lines, and the CLOCK_MONOTONIC timestamps they carry.
//!
//! A session prints `connected <local> <peer>`, then `round <i> ok <sent_ns> <rtt_us>` per
//! round and, for the first failed round, `round <i> fail <sent_ns> <detected_ns> <ERRNO>`
//! (then its final `err ...` line). `*_ns` are CLOCK_MONOTONIC nanoseconds, the clock
//! [`mono_ns`] reads in the test, so the test can time what the workload saw.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::{DEFAULT_TIMEOUT, Probe, ProbeCmd};

/// CLOCK_MONOTONIC now, in nanoseconds (comparable with the probe's timestamps).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid storage; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A CLOCK_MONOTONIC stamp as Unix seconds (to compare with the agent's RFC 3339 `ts`).
pub fn mono_to_unix(ns: u64) -> f64 {
    let (wall, mono) = (crate::time::now_unix(), mono_ns());
    wall - (mono as f64 - ns as f64) / 1e9
}

/// `b - a` in milliseconds (negative when `b` is earlier).
pub fn ms_between(a_ns: u64, b_ns: u64) -> f64 {
    (b_ns as f64 - a_ns as f64) / 1e6
}

/// Timing of a session: rounds, their spacing and per-round deadline.
#[derive(Debug, Clone, Copy)]
pub struct SessionOpts {
    /// Number of round trips; 0 = until one fails.
    pub rounds: u64,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl ProbeCmd {
    /// `tcp-echo ADDR` — a TCP server echoing every line of each connection.
    pub fn tcp_echo(addr: impl fmt::Display) -> ProbeCmd {
        ProbeCmd::new(["tcp-echo".to_string(), addr.to_string()])
    }

    /// `tcp-session ADDR` — one connection, a line echoed per round (against `tcp-echo`).
    pub fn tcp_session(addr: impl fmt::Display, o: SessionOpts) -> ProbeCmd {
        ProbeCmd::new(["tcp-session".to_string(), addr.to_string()]).session_opts(o)
    }

    /// `udp-session ADDR` — a connected UDP socket, a datagram echoed per round (against
    /// `udp-echo`).
    pub fn udp_session(addr: impl fmt::Display, o: SessionOpts) -> ProbeCmd {
        ProbeCmd::new(["udp-session".to_string(), addr.to_string()]).session_opts(o)
    }

    fn session_opts(self, o: SessionOpts) -> ProbeCmd {
        self.arg("--rounds")
            .arg(o.rounds.to_string())
            .arg("--interval-ms")
            .arg(o.interval_ms.to_string())
            .timeout_ms(o.timeout_ms)
    }
}

/// One `round ...` line of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub i: u64,
    /// When the request was sent (CLOCK_MONOTONIC ns).
    pub sent_ns: u64,
    /// `Ok(rtt_us)` or `Err((detected_ns, errno name))`.
    pub result: Result<u64, (u64, String)>,
}

impl Round {
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// Parses `round <i> ok <sent_ns> <rtt_us>` / `round <i> fail <sent_ns> <detected_ns> <ERRNO>`.
pub fn parse_round(line: &str) -> Option<Round> {
    let mut w = line.split_whitespace();
    if w.next()? != "round" {
        return None;
    }
    let i = w.next()?.parse().ok()?;
    let kind = w.next()?;
    let sent_ns = w.next()?.parse().ok()?;
    let result = match kind {
        "ok" => Ok(w.next()?.parse().ok()?),
        "fail" => Err((w.next()?.parse().ok()?, w.next()?.to_string())),
        _ => return None,
    };
    Some(Round { i, sent_ns, result })
}

impl Probe {
    /// Every `round ...` line so far.
    pub fn rounds(&self) -> Vec<Round> {
        self.lines().iter().filter_map(|l| parse_round(l)).collect()
    }

    /// Waits for the session's `connected <local> <peer>` line; returns the local address.
    #[track_caller]
    pub fn wait_connected(&self) -> SocketAddr {
        let line = self.wait_line("\"connected ...\"", DEFAULT_TIMEOUT, |l| {
            l.starts_with("connected ")
        });
        line.split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{}: bad connected line {line:?}", self.description()))
    }

    /// Waits for a round line satisfying `pred` and returns it; panics on timeout or when the
    /// session ends first.
    #[track_caller]
    pub fn wait_round(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Round) -> bool,
    ) -> Round {
        let line = self.wait_line(what, timeout, |l| parse_round(l).is_some_and(|r| pred(&r)));
        parse_round(&line).expect("matched a round line")
    }

    /// Waits until `n` rounds have succeeded (and none failed).
    #[track_caller]
    pub fn wait_ok_rounds(&self, n: u64, timeout: Duration) {
        let r = self.wait_round(&format!("for {n} ok rounds"), timeout, |r| {
            !r.is_ok() || r.i >= n
        });
        assert!(
            r.is_ok(),
            "{}: round {} failed before {n} rounds succeeded: {r:?}\n{}",
            self.description(),
            r.i,
            self.lines().join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_round_lines() {
        assert_eq!(
            parse_round("round 3 ok 1000 250"),
            Some(Round {
                i: 3,
                sent_ns: 1000,
                result: Ok(250)
            })
        );
        assert_eq!(
            parse_round("round 4 fail 2000 2300 ETIMEDOUT"),
            Some(Round {
                i: 4,
                sent_ns: 2000,
                result: Err((2300, "ETIMEDOUT".into()))
            })
        );
        assert_eq!(parse_round("connected 127.0.0.1:1 127.0.0.1:2"), None);
        assert_eq!(parse_round("round x ok 1 2"), None);
    }

    #[test]
    fn mono_clock_moves_forward() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a);
        assert!(ms_between(a, b) >= 0.0);
    }
}
