//! The live flow table as the agent sees it: per-flow packet and byte
//! counters read from the kernel, named with the policy's segment names.
//! Metrics, the control socket and `ztai-agent flows` all read this.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One flow: (source segment, destination segment, destination address,
/// destination port, protocol, verdict), counted in both directions.
/// "orig" is initiator → responder, "reply" the way back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub src_segment: String,
    pub dst_segment: String,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    /// "tcp" or "udp".
    pub proto: String,
    /// "allow", "deny" or "audit".
    pub verdict: String,
    /// Label for metrics: the port spec of the rule that covers this flow
    /// ("8000", "9000-9100", "*"), or "other" for flows no rule names, so
    /// denied scans cannot blow up label cardinality.
    pub port_label: String,
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl FlowRecord {
    pub fn total_bytes(&self) -> u64 {
        self.orig_bytes + self.reply_bytes
    }
}

/// Kernel-wide totals (cumulative since the programs were loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub events_dropped: u64,
    pub flow_table_evictions: u64,
    pub socket_table_full: u64,
    pub udp_replies: u64,
    /// Policy reloads rejected (invalid file, or the kernel refused entries).
    #[serde(default)]
    pub reload_errors: u64,
    /// Packets of established connections dropped after a reload or relabel
    /// revoked them.
    #[serde(default)]
    pub revoked_packets: u64,
    /// Cgroups the label map refused (full).
    #[serde(default)]
    pub label_failures: u64,
    /// Ingress drops not reported because they repeated their flow's report
    /// within a minute (folded in the kernel).
    #[serde(default)]
    pub reports_folded: u64,
}

/// Everything observable at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub policy_name: String,
    pub generation: u64,
    /// Declared segment names (without host/world), file order.
    pub segments: Vec<String>,
    pub labeled_cgroups: u64,
    pub totals: Totals,
    /// Live flows, as the kernel's flow table holds them now.
    pub flows: Vec<FlowRecord>,
    /// Whether the policy is applied and programs attached.
    pub ready: bool,
}

/// Metrics label for a flow's port: the port spec of the first rule (file
/// order) covering it, or "other" so that ports no rule names (scans, denied
/// attempts) cannot grow label cardinality.
pub fn port_label(policy: &crate::policy::Policy, src: u32, dst: u32, proto: u8, port: u16) -> String {
    for rule in policy.rules.iter().filter(|r| r.from == src && r.to == dst) {
        if let Some(spec) = rule.ports.iter().find(|p| p.contains(proto, port)) {
            return if spec.is_any() {
                "*".to_string()
            } else if spec.lo == spec.hi {
                spec.lo.to_string()
            } else {
                format!("{}-{}", spec.lo, spec.hi)
            };
        }
    }
    "other".to_string()
}

fn verdict_name(v: u8) -> &'static str {
    match v {
        ztai_common::VERDICT_DENY => "deny",
        ztai_common::VERDICT_AUDIT => "audit",
        _ => "allow",
    }
}

/// Names the kernel's flow entries with the policy. Pure: the runtime reads
/// the maps, this only translates.
pub fn records(
    policy: &crate::policy::Policy,
    flows: &[(ztai_common::FlowKey, ztai_common::FlowCounters)],
) -> Vec<FlowRecord> {
    let mut out: Vec<FlowRecord> = flows
        .iter()
        .map(|(k, c)| FlowRecord {
            src_segment: policy.segment_name(k.src).to_string(),
            dst_segment: policy.segment_name(k.dst).to_string(),
            dst_addr: crate::datapath::ip_from_words(k.dst_addr),
            dst_port: k.dst_port,
            proto: crate::report::proto_name(k.proto).to_string(),
            verdict: verdict_name(k.verdict).to_string(),
            port_label: port_label(policy, k.src, k.dst, k.proto, k.dst_port),
            orig_packets: c.orig_packets,
            orig_bytes: c.orig_bytes,
            reply_packets: c.reply_packets,
            reply_bytes: c.reply_bytes,
        })
        .collect();
    out.sort_by(|a, b| b.total_bytes().cmp(&a.total_bytes()).then_with(|| a.dst_port.cmp(&b.dst_port)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{datapath::words_from_ip, policy::parse_policy_str};
    use ztai_common::{FlowCounters, FlowKey, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_DENY};

    const POLICY: &str = r#"
apiVersion: ztai.dev/v1alpha1
kind: SegmentPolicy
metadata: {name: t}
spec:
  segments:
    a: {cgroups: ["a*"]}
    b: {cgroups: ["b*"]}
  allow:
    - {from: a, to: b, ports: ["8000/tcp", "9000-9100/tcp", "udp"]}
"#;

    #[test]
    fn port_labels_come_from_the_rule_that_covers_the_flow() {
        let p = parse_policy_str("t.yaml", POLICY).expect("valid").policy;
        assert_eq!(port_label(&p, 2, 3, PROTO_TCP, 8000), "8000");
        assert_eq!(port_label(&p, 2, 3, PROTO_TCP, 9050), "9000-9100");
        assert_eq!(port_label(&p, 2, 3, PROTO_UDP, 53), "*");
        assert_eq!(port_label(&p, 2, 3, PROTO_TCP, 22), "other");
        assert_eq!(port_label(&p, 3, 2, PROTO_TCP, 8000), "other");
    }

    #[test]
    fn records_are_named_and_sorted_by_bytes() {
        let p = parse_policy_str("t.yaml", POLICY).expect("valid").policy;
        let key = |port, verdict| FlowKey {
            src: 2,
            dst: 3,
            dst_addr: words_from_ip("127.0.0.1".parse().unwrap()),
            dst_port: port,
            proto: PROTO_TCP,
            verdict,
        };
        let small = FlowCounters { orig_packets: 1, orig_bytes: 0, reply_packets: 0, reply_bytes: 0 };
        let big = FlowCounters { orig_packets: 3, orig_bytes: 3000, reply_packets: 2, reply_bytes: 100 };
        let r = records(&p, &[(key(22, VERDICT_DENY), small), (key(8000, VERDICT_ALLOW), big)]);
        assert_eq!(r[0].dst_port, 8000);
        assert_eq!(r[0].src_segment, "a");
        assert_eq!(r[0].dst_segment, "b");
        assert_eq!(r[0].verdict, "allow");
        assert_eq!(r[0].total_bytes(), 3100);
        assert_eq!(r[1].verdict, "deny");
        assert_eq!(r[1].port_label, "other");
        assert_eq!(r[1].dst_addr.to_string(), "127.0.0.1");
    }
}
