//! Checked policy → entries of the kernel rule and cidr maps. Pure: no I/O.
//!
//! The kernel decides a flow `(src, dst, proto, port)` with at most three
//! lookups: `RULE_PAIRS` says whether any rule covers the pair and which of
//! the other maps can hold its port (flags); `RULE_PORTS` holds single ports;
//! `RULE_RANGES` is an LPM trie holding each port range as aligned
//! power-of-two blocks. Every entry carries the generation so a new policy can
//! be written beside the live one.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use ztai_common::{
    CIDR_KEY_BYTES, CIDR_KEY_FIXED_BITS, PAIR_ANY_PORT, PAIR_HAS_PORTS, PAIR_HAS_RANGES, PairKey, PairValue, PortKey,
    RANGE_KEY_BYTES, RANGE_KEY_FIXED_BITS, RuleRef, SEGMENT_FIRST_DECLARED, SEGMENT_FLAG_AUDIT, SEGMENT_FLAG_DECLARED,
    SegmentRef, cidr_key_data, range_key_data,
};

use super::model::proto_name;
use super::{Mode, Policy};

/// Everything the agent writes to the kernel for one policy generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub generation: u8,
    /// Index = segment id. Built-ins always carry `SEGMENT_FLAG_AUDIT`: the
    /// kernel ANDs the audit bits of both ends, so a built-in end must not
    /// force enforcement on a declared segment in audit mode.
    pub segment_flags: Vec<u32>,
    /// One entry per `(src, dst, proto)` some rule covers.
    pub pairs: Vec<(PairKey, PairValue)>,
    /// Single ports; the first rule in file order wins a duplicate.
    pub ports: Vec<(PortKey, RuleRef)>,
    /// `(prefix_len, data)` LPM entries for port ranges.
    pub ranges: Vec<(u32, [u8; RANGE_KEY_BYTES], RuleRef)>,
    /// `(prefix_len, data)` LPM entries for cidrs; IPv4 is stored IPv4-mapped.
    pub cidrs: Vec<(u32, [u8; CIDR_KEY_BYTES], SegmentRef)>,
}

/// `"tcp/443"`: a flow's destination as the reports show it.
pub fn describe_ports(proto: u8, port: u16) -> String {
    format!("{}/{port}", proto_name(proto))
}

pub fn compile(policy: &Policy, generation: u8) -> CompiledPolicy {
    let mut out = CompiledPolicy { generation, ..CompiledPolicy::default() };

    // Indexed by segment id; ids may have gaps after `Policy::renumber`
    // (segments removed by a reload), which stay 0: enforce, undeclared.
    let max_id = policy.segments.iter().map(|s| s.id).max().unwrap_or(SEGMENT_FIRST_DECLARED - 1);
    out.segment_flags = vec![0; max_id as usize + 1];
    for flags in out.segment_flags.iter_mut().take(SEGMENT_FIRST_DECLARED as usize) {
        *flags = SEGMENT_FLAG_AUDIT;
    }
    for segment in &policy.segments {
        let audit = if segment.mode == Mode::Audit { SEGMENT_FLAG_AUDIT } else { 0 };
        out.segment_flags[segment.id as usize] = SEGMENT_FLAG_DECLARED | audit;
    }

    // Maps from key to position in `out`, to merge flags and keep the first rule.
    let mut pair_at: HashMap<PairKey, usize> = HashMap::new();
    let mut port_seen: HashMap<PortKey, ()> = HashMap::new();
    let mut range_seen: HashMap<(u32, [u8; RANGE_KEY_BYTES]), ()> = HashMap::new();

    for rule in &policy.rules {
        let rule_ref = RuleRef { rule: rule.index };
        for spec in &rule.ports {
            let key = PairKey { src: rule.from, dst: rule.to, generation, proto: spec.proto, _pad: [0; 2] };
            let at = *pair_at.entry(key).or_insert_with(|| {
                out.pairs.push((key, PairValue::default()));
                out.pairs.len() - 1
            });
            let value = &mut out.pairs[at].1;

            if spec.is_any() {
                // Rules arrive in file order, so the first any-port rule sticks.
                if value.flags & PAIR_ANY_PORT == 0 {
                    value.flags |= PAIR_ANY_PORT;
                    value.any_port_rule = rule.index;
                }
            } else if spec.lo == spec.hi {
                value.flags |= PAIR_HAS_PORTS;
                let key = PortKey { src: rule.from, dst: rule.to, generation, proto: spec.proto, port: spec.lo };
                if let Entry::Vacant(e) = port_seen.entry(key) {
                    e.insert(());
                    out.ports.push((key, rule_ref));
                }
            } else {
                value.flags |= PAIR_HAS_RANGES;
                for (start, bits) in port_blocks(spec.lo, spec.hi) {
                    let prefix_len = RANGE_KEY_FIXED_BITS + (16 - bits);
                    let data = range_key_data(generation, spec.proto, rule.from, rule.to, start);
                    if let Entry::Vacant(e) = range_seen.entry((prefix_len, data)) {
                        e.insert(());
                        out.ranges.push((prefix_len, data, rule_ref));
                    }
                }
            }
        }
    }

    for segment in &policy.segments {
        for net in &segment.cidrs {
            let (addr, len) = mapped_prefix(net);
            out.cidrs.push((
                CIDR_KEY_FIXED_BITS + len,
                cidr_key_data(generation, &addr),
                SegmentRef { segment: segment.id },
            ));
        }
    }
    out
}

/// A prefix in the kernel's 128-bit form: IPv4 becomes `::ffff:a.b.c.d/(96+len)`.
pub(crate) fn mapped_prefix(net: &ipnet::IpNet) -> ([u8; 16], u32) {
    match net.network() {
        IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(net.prefix_len())),
        IpAddr::V6(a) => (a.octets(), u32::from(net.prefix_len())),
    }
}

/// Splits `lo..=hi` into maximal aligned blocks `(start, bits)` covering
/// `start..start + 2^bits`, disjoint and in ascending order.
pub(crate) fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut blocks = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // Largest block aligned at `lo` (lo == 0 is aligned to everything) ...
        let mut bits = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        // ... that does not run past `hi`.
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        // `lo <= hi <= u16::MAX` here, so the cast is lossless.
        blocks.push((lo as u16, bits));
        lo += 1 << bits;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PortSpec, parse_policy_str};
    use ztai_common::{PROTO_TCP, PROTO_UDP, SEGMENT_HOST, SEGMENT_WORLD, SegmentId};

    fn segment_ref(segment: SegmentId) -> SegmentRef {
        SegmentRef { segment }
    }

    fn policy(text: &str) -> Policy {
        match parse_policy_str("test.yaml", text) {
            Ok(c) => c.policy,
            Err(d) => panic!("policy should be valid: {d:#?}"),
        }
    }

    fn wrap(segments: &str, allow: &str) -> String {
        format!(
            "apiVersion: ztai.dev/v1alpha1\nkind: SegmentPolicy\nmetadata:\n  name: t\nspec:\n  segments:\n{segments}  allow:\n{allow}"
        )
    }

    const AB: &str = "    a:\n      cgroups: [\"a*\"]\n    b:\n      cgroups: [\"b*\"]\n      mode: audit\n";

    /// LPM: the entry with the longest prefix whose first `prefix_len` bits equal the key's.
    fn lpm<const N: usize, V: Copy>(entries: &[(u32, [u8; N], V)], key: &[u8; N]) -> Option<V> {
        entries
            .iter()
            .filter(|(len, data, _)| prefix_eq(data, key, *len))
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, v)| *v)
    }

    fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
        (0..bits as usize).all(|i| {
            let mask = 0x80u8 >> (i % 8);
            a[i / 8] & mask == b[i / 8] & mask
        })
    }

    /// What the kernel answers for a flow, from the compiled maps alone:
    /// `Some(rule)` if allowed.
    fn kernel_allows(c: &CompiledPolicy, generation: u8, src: u32, dst: u32, proto: u8, port: u16) -> Option<u32> {
        let key = PairKey { src, dst, generation, proto, _pad: [0; 2] };
        let value = c.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)?;
        if value.flags & PAIR_ANY_PORT != 0 {
            return Some(value.any_port_rule);
        }
        if value.flags & PAIR_HAS_PORTS != 0 {
            let key = PortKey { src, dst, generation, proto, port };
            if let Some((_, r)) = c.ports.iter().find(|(k, _)| *k == key) {
                return Some(r.rule);
            }
        }
        if value.flags & PAIR_HAS_RANGES != 0 {
            let key = range_key_data(generation, proto, src, dst, port);
            return lpm(&c.ranges, &key).map(|r| r.rule);
        }
        None
    }

    #[test]
    fn blocks_cover_exactly_the_range() {
        let mut cases = vec![(9000, 9100), (0, 65535), (1, 65535), (0, 1), (65534, 65535), (1024, 2047), (7, 7)];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..40 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let a = (seed & 0xffff) as u16;
            let b = ((seed >> 16) & 0xffff) as u16;
            cases.push((a.min(b), a.max(b)));
        }
        for (lo, hi) in cases {
            let blocks = port_blocks(lo, hi);
            let mut covered = vec![0u8; 65536];
            for &(start, bits) in &blocks {
                assert_eq!(u32::from(start) % (1 << bits), 0, "block {start}/{bits} is aligned");
                for p in u32::from(start)..u32::from(start) + (1 << bits) {
                    covered[p as usize] += 1;
                }
            }
            for (p, &n) in covered.iter().enumerate() {
                let inside = (usize::from(lo)..=usize::from(hi)).contains(&p);
                assert_eq!(n, u8::from(inside), "{lo}-{hi}: port {p} covered {n} times");
            }
            // A range needs at most two blocks per bit width.
            assert!(blocks.len() <= 32, "{lo}-{hi}: {} blocks", blocks.len());
        }
        assert_eq!(port_blocks(9000, 9100), vec![(9000, 3), (9008, 4), (9024, 6), (9088, 3), (9096, 2), (9100, 0)]);
    }

    #[test]
    fn single_port() {
        let p = policy(&wrap(AB, "    - from: a\n      to: b\n      ports: [\"8000/tcp\"]\n"));
        let c = compile(&p, 1);
        assert_eq!(c.generation, 1);
        let key = PairKey { src: 2, dst: 3, generation: 1, proto: PROTO_TCP, _pad: [0; 2] };
        assert_eq!(c.pairs, vec![(key, PairValue { flags: PAIR_HAS_PORTS, any_port_rule: 0 })]);
        let port = PortKey { src: 2, dst: 3, generation: 1, proto: PROTO_TCP, port: 8000 };
        assert_eq!(c.ports, vec![(port, RuleRef { rule: 0 })]);
        assert!(c.ranges.is_empty() && c.cidrs.is_empty());
        assert_eq!(
            c.segment_flags,
            vec![
                SEGMENT_FLAG_AUDIT,
                SEGMENT_FLAG_AUDIT,
                SEGMENT_FLAG_DECLARED,
                SEGMENT_FLAG_DECLARED | SEGMENT_FLAG_AUDIT
            ]
        );
        assert_eq!(kernel_allows(&c, 1, 2, 3, PROTO_TCP, 8000), Some(0));
        assert_eq!(kernel_allows(&c, 1, 2, 3, PROTO_TCP, 8001), None);
        assert_eq!(kernel_allows(&c, 0, 2, 3, PROTO_TCP, 8000), None, "other generation");
        assert_eq!(kernel_allows(&c, 1, 3, 2, PROTO_TCP, 8000), None, "rules are directional");
    }

    #[test]
    fn range_entries() {
        let p = policy(&wrap(AB, "    - from: a\n      to: b\n      ports: [\"9000-9100/udp\"]\n"));
        let c = compile(&p, 0);
        assert_eq!(c.pairs.len(), 1);
        assert_eq!(c.pairs[0].1.flags, PAIR_HAS_RANGES);
        assert!(c.ports.is_empty());
        let expected: Vec<_> = port_blocks(9000, 9100)
            .into_iter()
            .map(|(start, bits)| {
                (RANGE_KEY_FIXED_BITS + 16 - bits, range_key_data(0, PROTO_UDP, 2, 3, start), RuleRef { rule: 0 })
            })
            .collect();
        assert_eq!(c.ranges, expected);
        for port in 0..=u16::MAX {
            let allowed = kernel_allows(&c, 0, 2, 3, PROTO_UDP, port).is_some();
            assert_eq!(allowed, (9000..=9100).contains(&port), "udp/{port}");
        }
        assert_eq!(kernel_allows(&c, 0, 2, 3, PROTO_TCP, 9000), None);
    }

    #[test]
    fn any_port_and_first_rule_attribution() {
        let allow = "    - from: a\n      to: b\n      ports: [\"443/tcp\"]\n    - from: a\n      to: b\n    - from: a\n      to: b\n      ports: [tcp, \"443/tcp\"]\n";
        let c = compile(&policy(&wrap(AB, allow)), 0);
        let tcp = c.pairs.iter().find(|(k, _)| k.proto == PROTO_TCP).expect("tcp pair");
        assert_eq!(tcp.1, PairValue { flags: PAIR_ANY_PORT | PAIR_HAS_PORTS, any_port_rule: 1 });
        let udp = c.pairs.iter().find(|(k, _)| k.proto == PROTO_UDP).expect("udp pair");
        assert_eq!(udp.1, PairValue { flags: PAIR_ANY_PORT, any_port_rule: 1 });
        assert_eq!(c.ports.len(), 1, "duplicate port keeps one entry");
        assert_eq!(c.ports[0].1, RuleRef { rule: 0 });
    }

    #[test]
    fn cidrs_v4_and_v6() {
        let segments = "    enterprise:\n      cidrs: [\"10.40.0.0/16\", \"fd10:40::/64\"]\n    inner:\n      cidrs: [\"10.40.7.0/24\"]\n";
        let c = compile(&policy(&wrap(segments, "    []\n")), 1);
        let mut v4 = [0u8; 16];
        v4[10] = 0xff;
        v4[11] = 0xff;
        v4[12] = 10;
        v4[13] = 40;
        let v6: [u8; 16] = "fd10:40::".parse::<std::net::Ipv6Addr>().expect("addr").octets();
        let mut inner = v4;
        inner[14] = 7;
        assert_eq!(
            c.cidrs,
            vec![
                (32 + 96 + 16, cidr_key_data(1, &v4), segment_ref(2)),
                (32 + 64, cidr_key_data(1, &v6), segment_ref(2)),
                (32 + 96 + 24, cidr_key_data(1, &inner), segment_ref(3)),
            ]
        );
        let lookup = |addr: &str| {
            let ip: IpAddr = addr.parse().expect("addr");
            let octets = match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
            lpm(&c.cidrs, &cidr_key_data(1, &octets)).map_or(SEGMENT_WORLD, |s| s.segment)
        };
        assert_eq!(lookup("10.40.1.1"), 2);
        assert_eq!(lookup("10.40.7.1"), 3, "longest prefix wins");
        assert_eq!(lookup("10.41.0.1"), SEGMENT_WORLD);
        assert_eq!(lookup("fd10:40::5"), 2);
        assert_eq!(lookup("fd10:41::5"), SEGMENT_WORLD);
        assert_eq!(lookup("::a28:101"), SEGMENT_WORLD, "v4-compatible is not v4-mapped");
    }

    #[test]
    fn describe() {
        assert_eq!(describe_ports(PROTO_TCP, 443), "tcp/443");
        assert_eq!(describe_ports(PROTO_UDP, 53), "udp/53");
        assert_eq!(PortSpec { proto: PROTO_TCP, lo: 9000, hi: 9100 }.to_string(), "tcp/9000-9100");
        assert_eq!(PortSpec::any(PROTO_UDP).to_string(), "udp/*");
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_port_entry(rng: &mut Rng) -> (String, Vec<u16>) {
        let proto = if rng.below(2) == 0 { "tcp" } else { "udp" };
        // Small ports collide often; the top of the range checks the edges.
        let port =
            |rng: &mut Rng| if rng.below(4) == 0 { 65535 - rng.below(40) as u16 } else { 1 + rng.below(60) as u16 };
        match rng.below(5) {
            0 => (proto.to_owned(), vec![0, 1, 65535]),
            1 | 2 => {
                let p = port(rng);
                (format!("{p}/{proto}"), vec![p - 1, p, p.saturating_add(1)])
            }
            _ => {
                let (a, b) = (port(rng), port(rng));
                let (lo, hi) = (a.min(b), a.max(b));
                (format!("{lo}-{hi}/{proto}"), vec![lo - 1, lo, lo + 1, hi - 1, hi, hi.saturating_add(1)])
            }
        }
    }

    /// For random small policies, the kernel's answer over the compiled maps
    /// equals the rule set's meaning, and the rule it names allows the flow.
    #[test]
    fn compiled_maps_match_policy_semantics() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let names = ["alpha", "beta", "gamma", "host", "world"];
        for round in 0..150 {
            let mut segments = String::new();
            for (i, name) in names[..3].iter().enumerate() {
                segments += &format!("    {name}:\n      cgroups: [\"s{i}/*\"]\n");
            }
            let mut allow = String::new();
            let mut probes: Vec<u16> = vec![0, 1, 2, 65534, 65535];
            for _ in 0..rng.below(7) {
                let from = names[rng.below(5) as usize];
                let to = names[rng.below(5) as usize];
                allow += &format!("    - from: {from}\n      to: {to}\n");
                if rng.below(5) > 0 {
                    let entries: Vec<String> = (0..1 + rng.below(3))
                        .map(|_| {
                            let (entry, edges) = random_port_entry(&mut rng);
                            probes.extend(edges);
                            format!("\"{entry}\"")
                        })
                        .collect();
                    allow += &format!("      ports: [{}]\n", entries.join(", "));
                }
            }
            if allow.is_empty() {
                allow = "    []\n".to_owned();
            }
            let text = wrap(&segments, &allow);
            let p = policy(&text);
            let generation = (round % 2) as u8;
            let c = compile(&p, generation);
            for src in [SEGMENT_HOST, SEGMENT_WORLD, 2, 3, 4] {
                for dst in [SEGMENT_HOST, SEGMENT_WORLD, 2, 3, 4] {
                    for proto in [PROTO_TCP, PROTO_UDP] {
                        for &port in &probes {
                            let reference =
                                p.rules.iter().any(|r| r.from == src && r.to == dst && r.allows_port(proto, port));
                            let got = kernel_allows(&c, generation, src, dst, proto, port);
                            assert_eq!(got.is_some(), reference, "{text}\n{src}->{dst} {proto}/{port}");
                            if let Some(rule) = got {
                                let r = &p.rules[rule as usize];
                                assert!(
                                    r.from == src && r.to == dst && r.allows_port(proto, port),
                                    "rule {rule} named"
                                );
                            }
                            assert_eq!(kernel_allows(&c, generation ^ 1, src, dst, proto, port), None);
                        }
                    }
                }
            }
            // Flags are exact: a pair advertises a map only if it holds entries there.
            for (key, value) in &c.pairs {
                let has_ports = c.ports.iter().any(|(k, _)| (k.src, k.dst, k.proto) == (key.src, key.dst, key.proto));
                assert_eq!(value.flags & PAIR_HAS_PORTS != 0, has_ports);
                let has_ranges = c.ranges.iter().any(|(_, d, _)| {
                    d[1] == key.proto && d[2..6] == key.src.to_be_bytes() && d[6..10] == key.dst.to_be_bytes()
                });
                assert_eq!(value.flags & PAIR_HAS_RANGES != 0, has_ranges);
            }
        }
    }

    /// Random nested cidrs: the LPM answer equals "longest declared prefix containing the address".
    #[test]
    fn cidr_lookup_matches_policy_semantics() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..60 {
            let mut segments = String::new();
            let mut used = std::collections::HashSet::new();
            for s in 0..3 {
                let mut cidrs = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    let net: ipnet::IpNet = if rng.below(3) == 0 {
                        let a = std::net::Ipv6Addr::new(0xfd00, rng.below(4) as u16, 0, 0, 0, 0, 0, 0);
                        ipnet::Ipv6Net::new(a, 16 + rng.below(24) as u8).expect("len").trunc().into()
                    } else {
                        let a = std::net::Ipv4Addr::new(10, rng.below(4) as u8, rng.below(4) as u8, 0);
                        ipnet::Ipv4Net::new(a, 8 + rng.below(17) as u8).expect("len").trunc().into()
                    };
                    if used.insert(net) {
                        cidrs.push(format!("\"{net}\""));
                    }
                }
                if cidrs.is_empty() {
                    cidrs.push(format!("\"192.0.2.{s}/32\""));
                }
                segments += &format!("    s{s}:\n      cidrs: [{}]\n", cidrs.join(", "));
            }
            let p = policy(&wrap(&segments, "    []\n"));
            let c = compile(&p, 0);
            for _ in 0..200 {
                let addr: IpAddr = if rng.below(3) == 0 {
                    std::net::Ipv6Addr::new(0xfd00, rng.below(4) as u16, rng.below(3) as u16, 0, 0, 0, 0, 1).into()
                } else {
                    std::net::Ipv4Addr::new(10, rng.below(4) as u8, rng.below(4) as u8, rng.below(3) as u8).into()
                };
                let reference = p
                    .segments
                    .iter()
                    .flat_map(|s| s.cidrs.iter().map(move |n| (n, s.id)))
                    .filter(|(n, _)| n.contains(&addr))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map_or(SEGMENT_WORLD, |(_, id)| id);
                let octets = match addr {
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    IpAddr::V6(a) => a.octets(),
                };
                let got = lpm(&c.cidrs, &cidr_key_data(0, &octets)).map_or(SEGMENT_WORLD, |s| s.segment);
                assert_eq!(got, reference, "{addr}");
            }
        }
    }
}
