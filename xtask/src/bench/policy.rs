//! The benchmarked policy at a given size, as a ztai SegmentPolicy and as
//! nftables rulesets.
//!
//! Segments: `client`, `server`, optionally `late` (glob `late-*`, for the
//! new-cgroup latency), then filler segments `f0000…`, one cgroup each.
//! Rules: filler rules `fA -> fB tcp/P` (all distinct), then the one rule the
//! traffic uses, last: `client -> server` on the bench ports. Last is the
//! worst place for a linear chain and makes no difference to a hash lookup.

use std::fmt::Write as _;

pub const CONN_PORT: u16 = 5001;
pub const BULK_PORT: u16 = 5201;
pub const UDP_PORT: u16 = 5301;
/// A listener in the unlabeled cgroup `plain` (`host`): labeled clients are denied.
pub const PLAIN_PORT: u16 = 5002;
/// Nothing listens here; the violation storm connects to it.
pub const STORM_PORT: u16 = 5003;

/// nftables table the bench creates (in its own network namespace) and deletes.
pub const NFT_TABLE: &str = "ztai_bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Size {
    pub rules: usize,
    pub segments: usize,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rules / {} segments", self.rules, self.segments)
    }
}

pub struct Spec {
    /// Segment names in file order; each but `late` has the cgroup `<root>/<name>`.
    pub segments: Vec<String>,
    /// `(from, to, ports)`; ports like `5001/tcp`.
    pub rules: Vec<(String, String, Vec<String>)>,
}

pub fn spec(size: Size, late: bool) -> Spec {
    let fixed = if late { 3 } else { 2 };
    assert!(
        size.segments >= fixed + 2 && size.rules >= 1,
        "policy size too small: {size}"
    );
    let fillers: Vec<String> = (0..size.segments - fixed)
        .map(|i| format!("f{i:04}"))
        .collect();
    let mut segments = vec!["client".to_string(), "server".to_string()];
    if late {
        segments.push("late".into());
    }
    segments.extend(fillers.iter().cloned());
    let f = fillers.len();
    let mut rules = Vec::with_capacity(size.rules);
    for k in 0..size.rules - 1 {
        // (from, port) is unique for each k, so no rule shadows another.
        let port = 10_000 + k / f;
        rules.push((
            fillers[k % f].clone(),
            fillers[(k + 1) % f].clone(),
            vec![format!("{port}/tcp")],
        ));
    }
    rules.push((
        "client".into(),
        "server".into(),
        vec![
            format!("{CONN_PORT}/tcp"),
            format!("{BULK_PORT}/tcp"),
            format!("{UDP_PORT}/udp"),
        ],
    ));
    Spec { segments, rules }
}

impl Spec {
    /// Cgroups the policy's segments name (all but `late`, whose cgroups come and go).
    pub fn cgroups(&self) -> impl Iterator<Item = &str> {
        self.segments
            .iter()
            .map(String::as_str)
            .filter(|s| *s != "late")
    }

    pub fn ztai_yaml(&self, root_rel: &str) -> String {
        let mut y = String::new();
        y.push_str("apiVersion: ztai.dev/v1alpha1\nkind: SegmentPolicy\nmetadata:\n  name: bench\nspec:\n  mode: enforce\n  segments:\n");
        for s in &self.segments {
            let glob = if s == "late" {
                format!("{root_rel}/late-*")
            } else {
                format!("{root_rel}/{s}")
            };
            let _ = writeln!(y, "    {s}:\n      cgroups: [\"{glob}\"]");
        }
        y.push_str("  allow:\n");
        for (from, to, ports) in &self.rules {
            let ports = ports
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(y, "    - {{from: {from}, to: {to}, ports: [{ports}]}}");
        }
        y
    }

    fn mark(&self, segment: &str) -> usize {
        self.segments
            .iter()
            .position(|s| s == segment)
            .expect("known segment")
            + 1
    }

    /// The same policy for nftables, strongest formulation: the sender's
    /// segment goes into the conntrack mark with one map lookup on output
    /// (`socket cgroupv2` of the sending socket); on input one concatenated
    /// set lookup decides (source segment . receiving socket's cgroup .
    /// protocol . port). Established flows pass on the conntrack state.
    /// Denials are rejected (RST / ICMP) so a denied connect fails at once.
    pub fn nft_sets(&self, root_rel: &str) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "table inet {NFT_TABLE} {{");
        let _ = writeln!(
            t,
            "  map seg_of {{\n    typeof socket cgroupv2 level 2 : meta mark"
        );
        let elems: Vec<String> = self
            .cgroups()
            .map(|s| format!("\"{root_rel}/{s}\" : {}", self.mark(s)))
            .collect();
        let _ = writeln!(t, "    elements = {{ {} }}\n  }}", elems.join(",\n      "));
        let _ = writeln!(t, "  set labeled {{\n    typeof socket cgroupv2 level 2");
        let elems: Vec<String> = self
            .cgroups()
            .map(|s| format!("\"{root_rel}/{s}\""))
            .collect();
        let _ = writeln!(t, "    elements = {{ {} }}\n  }}", elems.join(",\n      "));
        let _ = writeln!(
            t,
            "  set pairs {{\n    typeof ct mark . socket cgroupv2 level 2 . meta l4proto . th dport"
        );
        let mut elems = Vec::new();
        for (from, to, ports) in &self.rules {
            for p in ports {
                let (port, proto) = p.split_once('/').expect("PORT/PROTO");
                elems.push(format!(
                    "{} . \"{root_rel}/{to}\" . {proto} . {port}",
                    self.mark(from)
                ));
            }
        }
        let _ = writeln!(t, "    elements = {{ {} }}\n  }}", elems.join(",\n      "));
        let _ = writeln!(
            t,
            "  chain out {{\n    type filter hook output priority filter; policy accept;\n    ct state established,related accept\n    ct mark set socket cgroupv2 level 2 map @seg_of\n  }}"
        );
        let _ = writeln!(
            t,
            "  chain in {{\n    type filter hook input priority filter; policy accept;\n    ct state established,related accept"
        );
        let _ = writeln!(
            t,
            "    ct mark . socket cgroupv2 level 2 . meta l4proto . th dport @pairs accept"
        );
        t.push_str(DENY_TAIL);
        t.push_str("  }\n}\n");
        t
    }

    /// The "naive" formulation: one rule per segment on output and one rule
    /// per allowed port on input, evaluated in order (linear chains).
    pub fn nft_naive(&self, root_rel: &str) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "table inet {NFT_TABLE} {{");
        let _ = writeln!(t, "  set labeled {{\n    typeof socket cgroupv2 level 2");
        let elems: Vec<String> = self
            .cgroups()
            .map(|s| format!("\"{root_rel}/{s}\""))
            .collect();
        let _ = writeln!(t, "    elements = {{ {} }}\n  }}", elems.join(",\n      "));
        let _ = writeln!(
            t,
            "  chain out {{\n    type filter hook output priority filter; policy accept;\n    ct state established,related accept"
        );
        // Fillers first, the benchmarked segments last (worst case, like the rules).
        let mut order: Vec<&str> = self.cgroups().filter(|s| s.starts_with('f')).collect();
        order.extend(self.cgroups().filter(|s| !s.starts_with('f')));
        for s in order {
            let _ = writeln!(
                t,
                "    socket cgroupv2 level 2 \"{root_rel}/{s}\" ct mark set {}",
                self.mark(s)
            );
        }
        let _ = writeln!(
            t,
            "  }}\n  chain in {{\n    type filter hook input priority filter; policy accept;\n    ct state established,related accept"
        );
        for (from, to, ports) in &self.rules {
            for p in ports {
                let (port, proto) = p.split_once('/').expect("PORT/PROTO");
                let _ = writeln!(
                    t,
                    "    ct mark {} socket cgroupv2 level 2 \"{root_rel}/{to}\" meta l4proto {proto} th dport {port} accept",
                    self.mark(from)
                );
            }
        }
        t.push_str(DENY_TAIL);
        t.push_str("  }\n}\n");
        t
    }
}

/// Default deny at both ends: anything from a labeled sender, or to a labeled receiver.
const DENY_TAIL: &str = "    ct mark != 0 meta l4proto tcp reject with tcp reset
    ct mark != 0 reject
    socket cgroupv2 level 2 @labeled meta l4proto tcp reject with tcp reset
    socket cgroupv2 level 2 @labeled reject
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_exact_and_the_client_rule_is_last() {
        let s = spec(
            Size {
                rules: 1000,
                segments: 10,
            },
            false,
        );
        assert_eq!(s.segments.len(), 10);
        assert_eq!(s.rules.len(), 1000);
        assert_eq!(s.rules.last().unwrap().0, "client");
        let mut seen = std::collections::HashSet::new();
        for (from, to, ports) in &s.rules {
            assert_ne!(from, to);
            assert!(seen.insert((from.clone(), ports[0].clone())));
        }
        let l = spec(
            Size {
                rules: 10,
                segments: 10,
            },
            true,
        );
        assert_eq!(l.segments.len(), 10);
        assert!(l.ztai_yaml("r").contains("\"r/late-*\""));
        assert_eq!(l.cgroups().count(), 9);
        assert!(s.nft_sets("r").contains("1 . \"r/server\" . tcp . 5001"));
    }
}
