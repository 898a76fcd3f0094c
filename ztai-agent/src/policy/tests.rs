//! Parser and checker tests: accepted policies, and each class of problem
//! with its exact position.

use std::path::{Path, PathBuf};

use ztai_common::{PROTO_TCP, PROTO_UDP, SEGMENT_HOST, SEGMENT_WORLD};

use super::*;

const EXAMPLE: &str = r#"apiVersion: ztai.dev/v1alpha1
kind: SegmentPolicy
metadata:
  name: ai-reference
spec:
  mode: enforce                 # enforce | audit  (optional, default enforce)
  segments:
    orchestrator:
      cgroups: ["ai.slice/orchestrator*"]  # globs, relative to the cgroup2 mount
      mode: audit                # optional per-segment override of spec.mode
    inference:
      cgroups: ["ai.slice/inference/**"]
    enterprise:
      cidrs: ["10.40.0.0/16", "fd10:40::/64"]
  allow:
    - from: orchestrator
      to: inference
      ports: ["8000/tcp", "9000-9100/tcp", "udp"]   # omitted = every port, tcp and udp
"#;

fn ok(text: &str) -> Checked {
    match parse_policy_str("p.yaml", text) {
        Ok(c) => c,
        Err(d) => panic!("expected a valid policy, got:\n{}", render(&d)),
    }
}

fn render(d: &[Diagnostic]) -> String {
    d.iter().map(|d| format!("{d}\n")).collect()
}

/// Diagnostics of an invalid policy as `(line, column, severity, message)`.
fn problems(text: &str) -> Vec<(usize, usize, Severity, String)> {
    match parse_policy_str("p.yaml", text) {
        Ok(c) => panic!("expected an invalid policy; warnings: {}", render(&c.warnings)),
        Err(d) => d.into_iter().map(|d| (d.span.line, d.span.column, d.severity, d.message)).collect(),
    }
}

/// The single error of an invalid policy.
fn one_error(text: &str) -> (usize, usize, String) {
    let errors: Vec<_> = problems(text).into_iter().filter(|p| p.2 == Severity::Error).collect();
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let (line, column, _, message) = errors.into_iter().next().expect("one error");
    (line, column, message)
}

/// A policy with the given `segments` and `allow` bodies (indented 4 spaces).
fn policy_with(segments: &str, allow: &str) -> String {
    format!(
        "apiVersion: ztai.dev/v1alpha1\nkind: SegmentPolicy\nmetadata:\n  name: t\nspec:\n  segments:\n{segments}  allow:\n{allow}"
    )
}
/// Lines 1-6 are the header written by `policy_with`; segments start on line 7.
const SEGMENTS_LINE: usize = 7;

const TWO: &str = "    a:\n      cgroups: [\"a/*\"]\n    b:\n      cgroups: [\"b/*\"]\n";

#[test]
fn parses_the_example() {
    let Checked { policy, warnings } = ok(EXAMPLE);
    assert!(warnings.is_empty(), "{}", render(&warnings));
    assert_eq!(policy.name, "ai-reference");
    assert_eq!(policy.mode, Mode::Enforce);
    let names: Vec<_> = policy.segments.iter().map(|s| (s.id, s.name.as_str(), s.mode)).collect();
    assert_eq!(
        names,
        vec![(2, "orchestrator", Mode::Audit), (3, "inference", Mode::Enforce), (4, "enterprise", Mode::Enforce)]
    );
    let orchestrator = &policy.segments[0];
    assert_eq!(orchestrator.span, Span { line: 8, column: 5 });
    assert_eq!(orchestrator.cgroups.len(), 1);
    assert_eq!(orchestrator.cgroups[0].pattern, "ai.slice/orchestrator*");
    assert_eq!(orchestrator.cgroups[0].span, Span { line: 9, column: 17 });
    assert!(orchestrator.cidrs.is_empty());
    let enterprise = &policy.segments[2];
    assert_eq!(enterprise.cidrs, vec!["10.40.0.0/16".parse().expect("net"), "fd10:40::/64".parse().expect("net")]);

    assert_eq!(policy.rules.len(), 1);
    let rule = &policy.rules[0];
    assert_eq!((rule.index, rule.from, rule.to), (0, 2, 3));
    assert_eq!(rule.span, Span { line: 16, column: 7 });
    assert_eq!(
        rule.ports,
        vec![
            PortSpec { proto: PROTO_TCP, lo: 8000, hi: 8000 },
            PortSpec { proto: PROTO_TCP, lo: 9000, hi: 9100 },
            PortSpec::any(PROTO_UDP),
        ]
    );
    let shown: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["tcp/8000", "tcp/9000-9100", "udp/*"]);
    assert!(rule.ports[2].is_any() && !rule.ports[1].is_any());
}

#[test]
fn segment_lookups() {
    let policy = ok(EXAMPLE).policy;
    assert_eq!(policy.segment_name(SEGMENT_HOST), "host");
    assert_eq!(policy.segment_name(SEGMENT_WORLD), "world");
    assert_eq!(policy.segment_name(3), "inference");
    assert_eq!(policy.segment_name(5), "unknown");
    assert_eq!(policy.segment_name(u32::MAX), "unknown");
    assert_eq!(policy.segment_id("host"), Some(SEGMENT_HOST));
    assert_eq!(policy.segment_id("world"), Some(SEGMENT_WORLD));
    assert_eq!(policy.segment_id("enterprise"), Some(4));
    assert_eq!(policy.segment_id("nope"), None);

    assert_eq!(policy.segments_matching_cgroup("ai.slice/orchestrator"), vec![2]);
    assert_eq!(policy.segments_matching_cgroup("ai.slice/orchestrator-1.scope"), vec![2]);
    // `*` stays within one level.
    assert!(policy.segments_matching_cgroup("ai.slice/orchestrator/child").is_empty());
    // `**` crosses levels, but `dir/**` needs something below `dir`.
    assert_eq!(policy.segments_matching_cgroup("ai.slice/inference/a/b"), vec![3]);
    assert!(policy.segments_matching_cgroup("ai.slice/inference").is_empty());
    assert!(policy.segments_matching_cgroup("").is_empty());
}

#[test]
fn omitted_ports_and_modes_default() {
    let text = policy_with(TWO, "    - from: a\n      to: b\n").replace("spec:\n", "spec:\n  mode: audit\n");
    let policy = ok(&text).policy;
    assert_eq!(policy.mode, Mode::Audit);
    assert!(policy.segments.iter().all(|s| s.mode == Mode::Audit));
    assert_eq!(policy.rules[0].ports, vec![PortSpec::any(PROTO_TCP), PortSpec::any(PROTO_UDP)]);
    // `allow` may be omitted: nothing is allowed between segments.
    let text = policy_with(TWO, "").replace("  allow:\n", "");
    assert!(ok(&text).policy.rules.is_empty());
}

#[test]
fn built_in_segments_in_rules() {
    let allow = "    - from: host\n      to: a\n      ports: [\"443/tcp\"]\n    - from: a\n      to: world\n";
    let policy = ok(&policy_with(TWO, allow)).policy;
    assert_eq!((policy.rules[0].from, policy.rules[0].to), (SEGMENT_HOST, 2));
    assert_eq!((policy.rules[1].from, policy.rules[1].to, policy.rules[1].index), (2, SEGMENT_WORLD, 1));
}

// ---------------------------------------------------------------- error classes

#[test]
fn yaml_syntax_error_is_positioned() {
    let (line, column, message) = one_error("apiVersion: ztai.dev/v1alpha1\nspec:\n  segments: [a, b\n  allow: []\n");
    assert_eq!((line, column), (4, 8));
    assert!(message.starts_with("invalid YAML: "), "{message}");

    let (line, column, message) = one_error("- a\n- b\n");
    assert_eq!((line, column), (1, 1));
    assert!(message.contains("must be a YAML mapping"), "{message}");

    let (line, column, message) = one_error("a: &x 1\n");
    assert_eq!((line, column), (1, 7));
    assert!(message.contains("anchors"), "{message}");
}

#[test]
fn duplicate_key_is_positioned_and_checking_continues() {
    let text = policy_with(TWO, "    - from: a\n      to: c\n").replace("  name: t\n", "  name: t\n  name: u\n");
    let p = problems(&text);
    assert_eq!(p[0], (5, 3, Severity::Error, "duplicate key `name` (first at line 4)".to_owned()));
    // The unknown segment in the rule is still found.
    assert!(p.iter().any(|(_, _, _, m)| m.contains("unknown segment `c`")), "{p:#?}");
}

#[test]
fn empty_strings_and_bad_names_are_reported_once() {
    let segments = "    Web:\n      cgroups: [\"\"]\n      cidrs: [\"10.0.0.0/8\"]\n";
    let allow = "    - from: Web\n      to: world\n";
    let p = problems(&policy_with(segments, allow));
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    let l = SEGMENTS_LINE;
    // The rule still resolves `Web`: one mistake, one error.
    assert_eq!(
        got,
        vec![
            (l, 5, "segment name `Web` must start with a lowercase letter: write `web`"),
            (l + 1, 17, "a cgroup glob must not be empty"),
        ]
    );
}

#[test]
fn second_document_is_an_error() {
    let text = format!("# leading comment\n---\n{EXAMPLE}---\nkind: SegmentPolicy\n");
    let (line, column, message) = one_error(&text);
    assert_eq!((line, column), (21, 1));
    assert!(message.contains("second YAML document"), "{message}");
    // A leading `---` and a trailing `...` are fine.
    ok(&format!("---\n{EXAMPLE}...\n# done\n"));
}

#[test]
fn header_errors() {
    let bad = EXAMPLE
        .replace("ztai.dev/v1alpha1", "ztai.dev/v1")
        .replace("kind: SegmentPolicy", "kind: Policy")
        .replace("  name: ai-reference\n", "  nmae: x\n");
    let p = problems(&bad);
    let expected = [
        (1, 13, "unsupported apiVersion `ztai.dev/v1`: expected `ztai.dev/v1alpha1`"),
        (2, 7, "unsupported kind `Policy`: expected `SegmentPolicy`"),
        (3, 1, "missing `metadata.name`"),
        (4, 3, "unknown key `nmae` in `metadata`; did you mean `name`? allowed keys: name"),
    ];
    assert_eq!(p.len(), expected.len(), "{p:#?}");
    for ((line, column, severity, message), (el, ec, em)) in p.iter().zip(expected) {
        assert_eq!((*line, *column, *severity, message.as_str()), (el, ec, Severity::Error, em));
    }

    let p = problems("kind: SegmentPolicy\n");
    let messages: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    assert_eq!(
        messages,
        vec![
            (1, 1, "missing `apiVersion`: expected `apiVersion: ztai.dev/v1alpha1`"),
            (1, 1, "missing `metadata` (with the policy's `name`)"),
            (1, 1, "missing `spec` (with `segments` and `allow`)"),
        ]
    );

    // An empty file is a policy with nothing in it.
    assert_eq!(problems("").len(), 4);
}

#[test]
fn unknown_keys_everywhere() {
    let text = EXAMPLE
        .replace("kind: SegmentPolicy\n", "kind: SegmentPolicy\nstatus: {}\n")
        .replace("  mode: enforce ", "  mood: enforce ")
        .replace("      mode: audit ", "      labels: audit ")
        .replace("      to: inference", "      to: inference\n      port: [\"80/tcp\"]");
    let p = problems(&text);
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (3, 1, "unknown key `status` in the policy; allowed keys: apiVersion, kind, metadata, spec"),
            (7, 3, "unknown key `mood` in `spec`; did you mean `mode`? allowed keys: mode, segments, allow"),
            (11, 7, "unknown key `labels` in segment `orchestrator`; allowed keys: cgroups, cidrs, mode"),
            (19, 7, "unknown key `port` in a rule; did you mean `ports`? allowed keys: from, to, ports"),
        ]
    );
}

#[test]
fn unreadable_segments_do_not_cascade_into_rules() {
    let text = policy_with("    - a\n", "    - from: a\n      to: b\n");
    assert_eq!(one_error(&text), (SEGMENTS_LINE, 5, "`spec.segments` must be a mapping, found a list".to_owned()));
}

#[test]
fn mode_errors() {
    let text = EXAMPLE.replace("mode: audit ", "mode: permissive ");
    assert_eq!(one_error(&text), (10, 13, "unknown mode `permissive`: expected `enforce` or `audit`".to_owned()));
    let text = EXAMPLE.replace("  mode: enforce ", "  mode: [enforce] ");
    assert_eq!(one_error(&text), (6, 9, "`spec.mode` must be a string, found a list".to_owned()));
}

#[test]
fn segment_name_errors() {
    let segments = "    Inference_1:\n      cgroups: [\"x\"]\n    host:\n      cgroups: [\"y\"]\n    9lives:\n      cgroups: [\"z\"]\n";
    let p = problems(&policy_with(segments, "    []\n"));
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    let l = SEGMENTS_LINE;
    assert_eq!(
        got,
        vec![
            (l, 5, "segment name `Inference_1` must start with a lowercase letter: write `inference-1`"),
            (l + 2, 5, "`host` is a built-in segment and cannot be declared; use it directly in `allow` rules"),
            (l + 4, 5, "segment name `9lives` must start with a lowercase letter"),
        ]
    );
}

#[test]
fn segment_selects_nothing() {
    let segments = "    a:\n      mode: audit\n    b:\n    c:\n      cgroups: []\n      cidrs: []\n    d: [x]\n";
    let p = problems(&policy_with(segments, "    []\n"));
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.clone())).collect();
    let l = SEGMENTS_LINE;
    let nothing = |n: &str| {
        format!("segment `{n}` selects nothing: give it `cgroups` (process globs) or `cidrs` (address prefixes)")
    };
    assert_eq!(
        got,
        vec![
            (l, 5, nothing("a")),
            (l + 2, 5, nothing("b")),
            (l + 3, 5, nothing("c")),
            (l + 6, 8, "segment `d` must be a mapping, found a list".to_owned()),
        ]
    );
}

#[test]
fn glob_errors() {
    let segments = "    a:\n      cgroups: [\"/ai.slice/a*\", \"ai.slice/[x\", \"ok/*\", 7, [\"nested\"]]\n";
    let p = problems(&policy_with(segments, "    []\n"));
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    let l = SEGMENTS_LINE + 1;
    assert_eq!(
        got,
        vec![
            (l, 17, "cgroup glob `/ai.slice/a*` must be relative to the cgroup2 mount: write `ai.slice/a*`"),
            (l, 33, "invalid cgroup glob `ai.slice/[x`: unclosed character class; missing ']'"),
            (l, 59, "a cgroup glob must be a string, found a list"),
        ]
    );
    // A bare number is a valid (if odd) cgroup name: YAML scalars are strings here.
    let policy = ok(&policy_with("    a:\n      cgroups: [7]\n", "    []\n")).policy;
    assert_eq!(policy.segments_matching_cgroup("7"), vec![2]);
}

#[test]
fn cidr_errors() {
    let segments = "    a:\n      cidrs: [\"10.40.0.1/16\", \"10.0.0.1\", \"fd00::1\", \"10.0.0.0/33\", \"10.9.0.0/16\"]\n    b:\n      cidrs: [\"10.9.0.0/16\", \"::ffff:10.9.0.0/112\", \"10.9.0.0/24\"]\n";
    let p = problems(&policy_with(segments, "    []\n"));
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    let (a, b) = (SEGMENTS_LINE + 1, SEGMENTS_LINE + 3);
    assert_eq!(
        got,
        vec![
            (a, 15, "cidr `10.40.0.1/16` has host bits set: write `10.40.0.0/16`"),
            (a, 31, "cidr `10.0.0.1` needs a prefix length: write `10.0.0.1/32` for one address"),
            (a, 43, "cidr `fd00::1` needs a prefix length: write `fd00::1/128` for one address"),
            (a, 54, "invalid cidr `10.0.0.0/33`: expected an IPv4 or IPv6 prefix such as `10.0.0.0/8` or `fd00::/8`"),
            (b, 15, "cidr `10.9.0.0/16` is already in segment `a` at line 8: a prefix can belong to one segment only"),
            (
                b,
                30,
                "cidr `::ffff:10.9.0.0/112` is already in segment `a` (as `10.9.0.0/16`) at line 8: a prefix can belong to one segment only"
            ),
        ]
    );
    // Nesting across segments is fine (longest prefix wins); a repeat within one segment is a warning.
    let segments = "    a:\n      cidrs: [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n    b:\n      cidrs: [\"10.1.0.0/16\"]\n";
    let warnings = ok(&policy_with(segments, "    []\n")).warnings;
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].span, Span { line: SEGMENTS_LINE + 1, column: 29 });
    assert_eq!(warnings[0].message, "cidr `10.0.0.0/8` is already listed in segment `a` at line 8");
}

#[test]
fn port_errors() {
    let allow = "    - from: a\n      to: b\n      ports: [8000, \"9000-9100\", \"0/tcp\", \"9100-9000/udp\", \"8000/sctp\", http, tcp]\n    - from: a\n      to: b\n      ports: []\n    - from: a\n      to: b\n      ports: 8000/tcp\n";
    let p = problems(&policy_with(TWO, allow));
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    let l = SEGMENTS_LINE + 7;
    assert_eq!(
        got,
        vec![
            (l, 15, "port 8000 needs a protocol: write 8000/tcp or 8000/udp"),
            (l, 21, "port range 9000-9100 needs a protocol: write 9000-9100/tcp or 9000-9100/udp"),
            (l, 34, "port 0 in `0/tcp` is out of range: ports are 1-65535"),
            (l, 43, "port range `9100-9000/udp` runs backwards: write `9000-9100/udp`"),
            (l, 60, "unknown protocol `sctp` in `8000/sctp`: expected tcp or udp"),
            (
                l,
                73,
                "invalid port entry `http`: expected PORT/PROTO (`443/tcp`), LO-HI/PROTO (`9000-9100/tcp`) or a bare protocol (`tcp`, `udp`)"
            ),
            (
                l + 3,
                14,
                "`ports: []` is ambiguous: omit `ports` to allow every tcp and udp port, or list entries such as `443/tcp`"
            ),
            (l + 6, 14, "`ports` must be a list, found a string"),
        ]
    );
}

#[test]
fn rule_reference_errors() {
    let segments = "    inference:\n      cgroups: [\"i*\"]\n    orchestrator:\n      cgroups: [\"o*\"]\n";
    let allow = "    - from: orchestrator\n      to: infrence\n    - from: gpu-pool\n      to: wrld\n    - to: inference\n    - from: [a]\n      to: inference\n    - just-a-string\n";
    let p = problems(&policy_with(segments, allow));
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.3.as_str())).collect();
    let l = SEGMENTS_LINE + 5;
    assert_eq!(
        got,
        vec![
            (l + 1, 11, "unknown segment `infrence` in `to`: did you mean `inference`?"),
            (
                l + 2,
                13,
                "unknown segment `gpu-pool` in `from`: declared segments are inference, orchestrator (built in: host, world)"
            ),
            (l + 3, 11, "unknown segment `wrld` in `to`: did you mean `world`?"),
            (l + 4, 7, "rule is missing `from`"),
            (l + 5, 13, "`from` must be a string, found a list"),
            (l + 7, 7, "a rule must be a mapping with `from`, `to` and optional `ports`, found a string"),
        ]
    );
}

#[test]
fn ineffective_rule_warnings() {
    let segments = "    a:\n      cgroups: [\"a/*\"]\n    ext:\n      cidrs: [\"192.0.2.0/24\"]\n";
    let allow = "    - from: a\n      to: a\n    - from: host\n      to: world\n    - from: world\n      to: host\n    - from: ext\n      to: world\n    - from: ext\n      to: a\n";
    let Checked { policy, warnings } = ok(&policy_with(segments, allow));
    assert_eq!(policy.rules.len(), 5, "warnings do not drop rules");
    let got: Vec<_> = warnings.iter().map(|d| (d.span.line, d.span.column, d.message.as_str())).collect();
    let l = SEGMENTS_LINE + 5;
    let never = "has no effect: traffic between unlabeled processes and the world is never enforced";
    assert_eq!(
        got,
        vec![
            (l, 7, "rule from `a` to itself has no effect: traffic inside one segment is always allowed"),
            (l + 2, 7, format!("rule from `host` to `world` {never}").as_str()),
            (l + 4, 7, format!("rule from `world` to `host` {never}").as_str()),
            (
                l + 6,
                7,
                "rule from `ext` to `world` can never match: neither end holds local processes (only `host` and segments with `cgroups` do)"
            ),
        ]
    );
    assert!(warnings.iter().all(|w| w.severity == Severity::Warning));
}

#[test]
fn overlap_warnings_name_both_segments() {
    let segments = "    web:\n      cgroups: [\"ai.slice/web*\"]\n    gateway:\n      cgroups: [\"ai.slice/gateway*\", \"ai.slice/*\"]\n    batch:\n      cgroups: [\"batch.slice/**\"]\n";
    let warnings = ok(&policy_with(segments, "    []\n")).warnings;
    let got: Vec<_> = warnings.iter().map(|d| (d.span.line, d.span.column, d.message.as_str())).collect();
    assert_eq!(
        got,
        vec![(
            SEGMENTS_LINE + 3,
            38,
            "cgroup glob `ai.slice/*` of segment `gateway` overlaps `ai.slice/web*` of segment `web` (line 8): \
         a cgroup such as `ai.slice/web` matches both and joins `web`, the first in file order"
        )]
    );
    // The warning is true to the matcher: that cgroup matches both, and the first wins.
    let policy = ok(&policy_with(segments, "    []\n")).policy;
    assert_eq!(policy.segments_matching_cgroup("ai.slice/web"), vec![2, 3]);
}

#[test]
fn glob_that_never_matches_is_a_warning() {
    let warnings = ok(&policy_with("    a:\n      cgroups: [\"ai.slice/\"]\n", "    []\n")).warnings;
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].message.contains("can never match"), "{}", warnings[0].message);
}

#[test]
fn many_errors_reported_at_once() {
    let text = r#"apiVersion: ztai.dev/v2
kind: SegmentPolicy
metadata:
  name: broken
spec:
  mode: strict
  segments:
    Orchestrator:
      cgroups: ["/ai.slice/orchestrator*"]
    inference:
      cidrs: ["10.1.2.3/8"]
    empty: {}
  allow:
    - from: Orchestrator
      to: inferense
      ports: [8000]
    - from: inference
      to: inference
      ports: []
"#;
    let p = problems(text);
    let got: Vec<_> = p.iter().map(|p| (p.0, p.1, p.2)).collect();
    use Severity::{Error as E, Warning as W};
    assert_eq!(
        got,
        vec![
            (1, 13, E),  // apiVersion
            (6, 9, E),   // mode
            (8, 5, E),   // segment name
            (9, 17, E),  // leading '/'
            (11, 15, E), // host bits
            (12, 5, E),  // selects nothing
            (15, 11, E), // unknown segment
            (16, 15, E), // port without protocol
            (17, 7, W),  // from == to
            (19, 14, E), // ports: []
        ],
        "{}",
        p.iter().map(|p| format!("{}:{} {}\n", p.0, p.1, p.3)).collect::<String>()
    );
}

#[test]
fn too_many_segments() {
    let max = (ztai_common::MAX_SEGMENTS - ztai_common::SEGMENT_FIRST_DECLARED) as usize;
    let mut segments = String::new();
    // Address-only segments keep this fast: glob matchers are costly to build in debug builds.
    for i in 0..max {
        segments += &format!("    s{i}:\n      cidrs: [\"10.{}.{}.0/24\"]\n", i / 256, i % 256);
    }
    let policy = ok(&policy_with(&segments, "    []\n")).policy;
    assert_eq!(policy.segments.len(), max);
    assert_eq!(policy.segments[max - 1].id, ztai_common::MAX_SEGMENTS - 1);
    segments += "    straw:\n      cidrs: [\"192.0.2.0/24\"]\n";
    let (line, column, message) = one_error(&policy_with(&segments, "    []\n"));
    assert_eq!((line, column), (SEGMENTS_LINE + 2 * max, 5));
    assert_eq!(message, format!("too many segments: at most {max} may be declared"));
}

// ---------------------------------------------------------------- files

#[test]
fn load_policy_reports_read_and_check_failures() {
    let missing = Path::new("/nonexistent/ztai/policy.yaml");
    let err = load_policy(missing).expect_err("missing file");
    assert!(matches!(err, PolicyError::Read { .. }));
    assert_eq!(err.to_string(), "cannot read policy file /nonexistent/ztai/policy.yaml");

    let dir = std::env::temp_dir().join(format!("ztai-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        EXAMPLE.replace("8000/tcp", "8000").replace("from: orchestrator", "from: orchestrator\n      to: x"),
    )
    .expect("write");
    let err = load_policy(&path).expect_err("invalid");
    let _ = std::fs::remove_dir_all(&dir);
    let PolicyError::Invalid { diagnostics, .. } = &err else { panic!("{err}") };
    assert_eq!(err.to_string(), format!("policy {} is invalid (2 error(s))", path.display()));
    let first = diagnostics[0].to_string();
    assert_eq!(first, format!("{}:18:7: error: duplicate key `to` (first at line 17)", path.display()));
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn shipped_policies_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    assert!(files.len() >= 3, "expected the reference policy and examples under {}", root.display());
    for file in files {
        match load_policy(&file) {
            Ok(checked) => {
                assert!(checked.warnings.is_empty(), "{}", render(&checked.warnings));
                let compiled = compile(&checked.policy, 0);
                assert_eq!(compiled.segment_flags.len(), checked.policy.segments.len() + 2);
            }
            Err(PolicyError::Invalid { diagnostics, .. }) => panic!("{}", render(&diagnostics)),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn reference_policy_is_least_privilege() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/ai-reference.yaml");
    let policy = load_policy(&path).map_err(|e| e.to_string()).expect("reference policy").policy;
    let id = |n: &str| policy.segment_id(n).unwrap_or_else(|| panic!("segment {n}"));
    let mut allowed: Vec<(String, String, String)> = policy
        .rules
        .iter()
        .flat_map(|r| {
            r.ports
                .iter()
                .map(|p| (policy.segment_name(r.from).to_owned(), policy.segment_name(r.to).to_owned(), p.to_string()))
        })
        .collect();
    allowed.sort();
    let expected = [
        ("gateway", "enterprise", "tcp/443"),
        ("gateway", "enterprise", "tcp/80"),
        ("orchestrator", "conversation-store", "tcp/6379"),
        ("orchestrator", "gateway", "tcp/8080"),
        ("orchestrator", "inference", "tcp/8000"),
        ("orchestrator", "retrieval", "tcp/5432"),
    ];
    let expected: Vec<_> = expected.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
    assert_eq!(allowed, expected);
    assert!(policy.rules.iter().all(|r| r.from != id("inference")), "inference reaches nothing");
    assert_eq!(policy.segments_matching_cgroup("ai.slice/inference-vllm.scope"), vec![id("inference")]);
    let enterprise = policy.segment(id("enterprise")).expect("enterprise");
    assert_eq!(enterprise.cidrs.len(), 2);
    assert!(enterprise.cgroups.is_empty());
}

/// Globs whose overlap can only be settled by exhausting a large product
/// automaton (letters pinned at the same distance from the end) must come
/// back quickly as "cannot decide" warnings, not stall `check` or a reload.
#[test]
fn adversarial_overlapping_globs_end_in_a_warning_not_a_stall() {
    let segments: String = ('a'..='f')
        .map(|c| format!("    s{c}: {{cgroups: [\"*{c}????????????\"]}}\n"))
        .collect();
    let text = format!(
        "apiVersion: ztai.dev/v1alpha1\nkind: SegmentPolicy\nmetadata: {{name: t}}\nspec:\n  segments:\n{segments}  allow: []\n"
    );
    let checked = parse_policy_str("adversarial.yaml", &text).expect("valid, with warnings");
    assert_eq!(checked.warnings.len(), 15, "one warning per pair of segments");
    assert!(checked.warnings.iter().all(|w| w.message.contains("too complex")));
}
