//! Assertions on the agent's violation lines and common target lists.

use serde_json::Value;

use crate::{Agent, ProbeOutcome};

/// One loopback destination: the probe target and the address the agent must report for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ADDR:PORT` as given to the probe.
    pub addr: String,
    /// `dst.addr` expected in a violation (v4-mapped destinations are reported as IPv4).
    pub reported_ip: &'static str,
    pub port: u16,
    /// Short label for failure messages.
    pub family: &'static str,
}

/// `127.0.0.1:port`, `[::1]:port` and `[::ffff:127.0.0.1]:port` (AF_INET6 socket, v4-mapped).
pub fn loopback_targets(port: u16) -> [Target; 3] {
    [
        Target {
            addr: format!("127.0.0.1:{port}"),
            reported_ip: "127.0.0.1",
            port,
            family: "ipv4",
        },
        Target {
            addr: format!("[::1]:{port}"),
            reported_ip: "::1",
            port,
            family: "ipv6",
        },
        Target {
            addr: format!("[::ffff:127.0.0.1]:{port}"),
            reported_ip: "127.0.0.1",
            port,
            family: "v4-mapped",
        },
    ]
}

/// What a denial line must say (the fields the scenario controls).
#[derive(Debug, Clone)]
pub struct Denial<'a> {
    pub proto: &'a str,
    pub src_segment: &'a str,
    pub dst_segment: &'a str,
    pub dst_addr: &'a str,
    pub dst_port: u16,
}

/// Checks verdict/direction/proto, both segments and the destination of a violation line.
#[track_caller]
pub fn assert_denial(v: &Value, want: &Denial<'_>) {
    let got = (
        v["verdict"].as_str(),
        v["direction"].as_str(),
        v["proto"].as_str(),
        v["src"]["segment"].as_str(),
        v["dst"]["segment"].as_str(),
        v["dst"]["addr"].as_str(),
        v["dst"]["port"].as_u64(),
    );
    let expected = (
        Some("deny"),
        Some("egress"),
        Some(want.proto),
        Some(want.src_segment),
        Some(want.dst_segment),
        Some(want.dst_addr),
        Some(u64::from(want.dst_port)),
    );
    assert_eq!(
        got, expected,
        "violation fields (verdict, direction, proto, src.segment, dst.segment, dst.addr, dst.port) \
         differ from the expected denial {want:?}; line: {v}"
    );
}

impl Agent {
    /// Asserts `out` was denied with EPERM and that the agent reported exactly this denial
    /// (matched by `src.pid`); returns the violation line.
    #[track_caller]
    pub fn expect_denied(&self, out: &ProbeOutcome, want: &Denial<'_>) -> Value {
        out.assert_eperm();
        let v = self.wait_violation_from(out.pid);
        assert_denial(&v, want);
        v
    }

    /// Proves that none of `pids` (allowed flows) were reported: waits for the violation of a
    /// later denied `marker` probe (the report stream is ordered), then checks no line names
    /// any of `pids`.
    #[track_caller]
    pub fn assert_not_reported(&self, pids: &[u32], marker: &ProbeOutcome) {
        marker.assert_eperm();
        self.wait_violation_from(marker.pid);
        for &pid in pids {
            self.assert_no_violation_from(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The violation line format the scenarios expect from the agent (one per line on stdout).
    const SAMPLE: &str = r#"{"ts":"2026-01-01T12:00:00.123456Z","verdict":"deny","direction":"egress","proto":"tcp","src":{"segment":"orchestrator","cgroup":"/ztai-t1-2/orch","pid":4242,"comm":"ztai-probe","uid":0,"addr":"127.0.0.1","port":40000},"dst":{"segment":"inference","addr":"127.0.0.1","port":9999},"reason":"no rule allows orchestrator -> inference tcp/9999"}"#;

    fn want(dst_port: u16) -> Denial<'static> {
        Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "inference",
            dst_addr: "127.0.0.1",
            dst_port,
        }
    }

    #[test]
    fn a_matching_denial_passes() {
        let v: Value = serde_json::from_str(SAMPLE).unwrap();
        assert_denial(&v, &want(9999));
        assert!(crate::time::parse_rfc3339(v["ts"].as_str().unwrap()).is_some());
    }

    #[test]
    #[should_panic(expected = "differ from the expected denial")]
    fn a_different_port_fails() {
        let v: Value = serde_json::from_str(SAMPLE).unwrap();
        assert_denial(&v, &want(8000));
    }

    #[test]
    fn loopback_targets_report_v4_mapped_as_ipv4() {
        let t = loopback_targets(5);
        assert_eq!(t[2].addr, "[::ffff:127.0.0.1]:5");
        assert_eq!(t[2].reported_ip, "127.0.0.1");
        assert!(t[2].addr.parse::<std::net::SocketAddr>().unwrap().is_ipv6());
    }
}
