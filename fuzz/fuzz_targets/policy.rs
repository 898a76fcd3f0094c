//! Fuzzes the policy parser and compiler (`cargo xtask fuzz`).
//!
//! Property: no input panics, crashes or hangs. An input either parses into
//! a policy, whose compiled map entries must then match its rules exactly
//! (every rule's ports covered, every entry justified by the rule it names),
//! or yields at least one error diagnostic, each positioned inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztai_agent::policy::{CompiledPolicy, Diagnostic, Mode, Policy, Severity, compile, parse_policy_str};
use ztai_common::{
    CIDR_KEY_FIXED_BITS, PAIR_ANY_PORT, PAIR_HAS_PORTS, PAIR_HAS_RANGES, RANGE_KEY_FIXED_BITS, SEGMENT_FIRST_DECLARED,
    SEGMENT_FLAG_AUDIT, SEGMENT_FLAG_DECLARED, cidr_key_data,
};

const FILE: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    // Invalid UTF-8 still exercises the parser: policy files are read as
    // text, so replacement characters are what it would see.
    let text = String::from_utf8_lossy(data);
    match parse_policy_str(FILE, &text) {
        Ok(checked) => {
            check_diagnostics(&text, &checked.warnings);
            assert!(
                checked.warnings.iter().all(|d| d.severity == Severity::Warning),
                "an accepted policy carries an error: {:#?}",
                checked.warnings
            );
            check_policy_shape(&checked.policy);
            for generation in [0, 1] {
                check_compiled(&checked.policy, &compile(&checked.policy, generation), generation);
            }
        }
        Err(diagnostics) => {
            assert!(
                diagnostics.iter().any(Diagnostic::is_error),
                "rejected without an error diagnostic: {diagnostics:#?}"
            );
            check_diagnostics(&text, &diagnostics);
        }
    }
});

/// Lines as a YAML reader counts them: `\n`, `\r\n` and a lone `\r` each end one.
fn yaml_line_count(text: &str) -> usize {
    let bytes = text.as_bytes();
    let breaks = bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count();
    breaks + 1
}

fn check_diagnostics(text: &str, diagnostics: &[Diagnostic]) {
    let lines = yaml_line_count(text.strip_prefix('\u{feff}').unwrap_or(text));
    for d in diagnostics {
        assert!(d.span.line >= 1 && d.span.column >= 1, "diagnostic without a 1-based position: {d:?}");
        // The YAML scanner reports an error at the end of input one line
        // below a last line that has no line break, so allow one more.
        assert!(d.span.line <= lines + 1, "diagnostic past the end of a {lines}-line file: {d:?}");
        assert_eq!(d.file, FILE, "diagnostic names another file: {d:?}");
        assert!(!d.message.is_empty(), "diagnostic without a message: {d:?}");
        let _ = d.to_string();
    }
    assert!(diagnostics.windows(2).all(|w| w[0].span <= w[1].span), "diagnostics are not sorted: {diagnostics:#?}");
}

/// What `Policy` documents: ids follow file order, rules are indexed, ports non-empty.
fn check_policy_shape(policy: &Policy) {
    for (i, s) in policy.segments.iter().enumerate() {
        assert_eq!(s.id, SEGMENT_FIRST_DECLARED + i as u32, "segment {} id", s.name);
        assert!(!s.cgroups.is_empty() || !s.cidrs.is_empty(), "segment {} selects nothing", s.name);
        assert_eq!(policy.segment_id(&s.name), Some(s.id), "segment {} resolves by name", s.name);
        for net in &s.cidrs {
            assert_eq!(net.trunc(), *net, "segment {} cidr {net} has host bits", s.name);
        }
    }
    let ids = |id| id < SEGMENT_FIRST_DECLARED || policy.segment(id).is_some();
    for (i, r) in policy.rules.iter().enumerate() {
        assert_eq!(r.index as usize, i, "rule index");
        assert!(ids(r.from) && ids(r.to), "rule {i} names an undeclared segment: {r:?}");
        assert!(!r.ports.is_empty(), "rule {i} has no ports");
        for p in &r.ports {
            assert!(p.lo <= p.hi, "rule {i}: backwards range {p:?}");
            let _ = p.to_string();
        }
    }
}

/// Decodes a `RULE_RANGES` entry: (generation, proto, src, dst, first port, last port).
fn range_entry(prefix_len: u32, data: &[u8; 12]) -> (u8, u8, u32, u32, u32, u32) {
    assert!((RANGE_KEY_FIXED_BITS..=RANGE_KEY_FIXED_BITS + 16).contains(&prefix_len), "range prefix {prefix_len}");
    let bits = RANGE_KEY_FIXED_BITS + 16 - prefix_len;
    let start = u32::from(u16::from_be_bytes([data[10], data[11]]));
    assert_eq!(start % (1 << bits), 0, "range block {start}/{bits} is not aligned");
    let src = u32::from_be_bytes([data[2], data[3], data[4], data[5]]);
    let dst = u32::from_be_bytes([data[6], data[7], data[8], data[9]]);
    (data[0], data[1], src, dst, start, start + (1 << bits) - 1)
}

/// The compiled entries mean exactly the rules: sound (each entry is allowed
/// by the rule it names) and complete (each rule's ports are reachable).
fn check_compiled(policy: &Policy, c: &CompiledPolicy, generation: u8) {
    assert_eq!(c.generation, generation);

    // Segment flags.
    let max_id = policy.segments.iter().map(|s| s.id).max().unwrap_or(SEGMENT_FIRST_DECLARED - 1);
    assert_eq!(c.segment_flags.len(), max_id as usize + 1, "segment_flags length");
    for id in 0..SEGMENT_FIRST_DECLARED as usize {
        assert_eq!(c.segment_flags[id], SEGMENT_FLAG_AUDIT, "built-in segment {id} flags");
    }
    for s in &policy.segments {
        let audit = if s.mode == Mode::Audit { SEGMENT_FLAG_AUDIT } else { 0 };
        assert_eq!(c.segment_flags[s.id as usize], SEGMENT_FLAG_DECLARED | audit, "segment {} flags", s.name);
    }

    // Soundness of each entry.
    let rule = |r: u32| {
        policy.rules.get(r as usize).unwrap_or_else(|| panic!("entry names rule {r} of {}", policy.rules.len()))
    };
    for (k, v) in &c.pairs {
        assert_eq!(k.generation, generation, "pair generation");
        assert!(v.flags != 0 && v.flags & !(PAIR_ANY_PORT | PAIR_HAS_PORTS | PAIR_HAS_RANGES) == 0, "pair flags {v:?}");
        assert!(
            policy.rules.iter().any(|r| (r.from, r.to) == (k.src, k.dst) && r.ports.iter().any(|p| p.proto == k.proto)),
            "pair {k:?} has no rule"
        );
        let first_any = policy
            .rules
            .iter()
            .find(|r| (r.from, r.to) == (k.src, k.dst) && r.ports.iter().any(|p| p.proto == k.proto && p.is_any()));
        assert_eq!(v.flags & PAIR_ANY_PORT != 0, first_any.is_some(), "pair {k:?} any-port flag");
        if let Some(r) = first_any {
            assert_eq!(v.any_port_rule, r.index, "pair {k:?}: the first any-port rule is named");
        }
        let has_ports = c.ports.iter().any(|(p, _)| (p.src, p.dst, p.proto) == (k.src, k.dst, k.proto));
        assert_eq!(v.flags & PAIR_HAS_PORTS != 0, has_ports, "pair {k:?} has-ports flag");
        let has_ranges = c.ranges.iter().any(|(len, d, _)| {
            let (_, proto, src, dst, _, _) = range_entry(*len, d);
            (src, dst, proto) == (k.src, k.dst, k.proto)
        });
        assert_eq!(v.flags & PAIR_HAS_RANGES != 0, has_ranges, "pair {k:?} has-ranges flag");
    }
    assert_eq!(
        c.pairs.iter().map(|(k, _)| (k.src, k.dst, k.proto)).collect::<std::collections::HashSet<_>>().len(),
        c.pairs.len(),
        "duplicate pairs"
    );
    for (k, r) in &c.ports {
        assert_eq!(k.generation, generation, "port generation");
        let named = rule(r.rule);
        assert!(
            (named.from, named.to) == (k.src, k.dst) && named.allows_port(k.proto, k.port),
            "port entry {k:?} names rule {} which does not allow it",
            r.rule
        );
    }
    for (len, data, r) in &c.ranges {
        let (generation_byte, proto, src, dst, first, last) = range_entry(*len, data);
        assert_eq!(generation_byte, generation, "range generation");
        let named = rule(r.rule);
        assert!(
            (named.from, named.to) == (src, dst)
                && named.ports.iter().any(|p| p.proto == proto && u32::from(p.lo) <= first && last <= u32::from(p.hi)),
            "range block {first}-{last} proto {proto} {src}->{dst} names rule {} which does not allow it all",
            r.rule
        );
    }

    // Completeness: every rule's ports are reachable through the entries.
    let pair = |from, to, proto| c.pairs.iter().find(|(k, _)| (k.src, k.dst, k.proto) == (from, to, proto));
    for r in &policy.rules {
        for p in &r.ports {
            let (_, v) = pair(r.from, r.to, p.proto).unwrap_or_else(|| panic!("rule {} {p}: no pair entry", r.index));
            if p.is_any() {
                assert!(v.flags & PAIR_ANY_PORT != 0, "rule {} {p}: pair not any-port", r.index);
            } else if v.flags & PAIR_ANY_PORT == 0 {
                let single = |port: u16| {
                    c.ports.iter().any(|(k, _)| (k.src, k.dst, k.proto, k.port) == (r.from, r.to, p.proto, port))
                };
                let ranged = |port: u16| {
                    c.ranges.iter().any(|(len, d, _)| {
                        let (_, proto, src, dst, first, last) = range_entry(*len, d);
                        (src, dst, proto) == (r.from, r.to, p.proto) && (first..=last).contains(&u32::from(port))
                    })
                };
                if p.lo == p.hi {
                    assert!(single(p.lo), "rule {} {p}: no port entry", r.index);
                } else {
                    // Every port of short ranges, the edges and a few inside of long ones.
                    let span = u32::from(p.hi - p.lo);
                    let probes: Vec<u16> = if span <= 64 {
                        (p.lo..=p.hi).collect()
                    } else {
                        (0..=16).map(|i| p.lo + (span * i / 16) as u16).chain([p.lo + 1, p.hi - 1]).collect()
                    };
                    for port in probes {
                        assert!(ranged(port), "rule {} {p}: port {port} is in no range block", r.index);
                    }
                }
            }
        }
    }

    // Cidrs: one entry per declared prefix, in its kernel form.
    let expected: Vec<_> = policy
        .segments
        .iter()
        .flat_map(|s| s.cidrs.iter().map(move |n| (s.id, n)))
        .map(|(id, net)| {
            let (addr, len) = match net.network() {
                std::net::IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(net.prefix_len())),
                std::net::IpAddr::V6(a) => (a.octets(), u32::from(net.prefix_len())),
            };
            (CIDR_KEY_FIXED_BITS + len, cidr_key_data(generation, &addr), id)
        })
        .collect();
    let got: Vec<_> = c.cidrs.iter().map(|(len, d, s)| (*len, *d, s.segment)).collect();
    assert_eq!(got, expected, "cidr entries");
}
