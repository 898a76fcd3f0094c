//! Audit mode: `spec.mode: audit` (whole policy) or `segments.X.mode: audit` (per segment,
//! overriding `spec.mode`). A would-be denial passes and is reported with `"verdict":"audit"`
//! (same line shape as a denial, same reason); a flow is audited only when every labeled end
//! is in audit mode (`host` and `world` are neutral), else it is denied as usual. Counters and
//! metrics label audited flows `verdict="audit"`.
//!
//! Fixed policy ports of this file: 27532-27537.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use ztai_tests::metrics::{FlowCounts, sample_value};
use ztai_tests::{
    Agent, Cgroup, DEFAULT_TIMEOUT, Policy, ProbeCmd, ProbeOutcome, TestCgroup, loopback_targets,
    require_agent,
};

const SCRAPE_DEADLINE: Duration = Duration::from_secs(15);

/// Every key path of a JSON object (`src.pid`, ...), to compare the shape of two lines.
fn shape(v: &Value) -> BTreeSet<String> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
        if let Value::Object(m) = v {
            for (k, child) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&path, child, out);
                out.insert(path);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk("", v, &mut out);
    out
}

/// The documented violation line shape (README "Violation report").
fn documented_shape() -> BTreeSet<String> {
    [
        "ts",
        "verdict",
        "direction",
        "proto",
        "src",
        "src.segment",
        "src.cgroup",
        "src.cgroup_id",
        "src.pid",
        "src.comm",
        "src.uid",
        "src.addr",
        "src.port",
        "dst",
        "dst.segment",
        "dst.addr",
        "dst.port",
        "reason",
        "hook",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// What an audit (or deny) line of an egress verdict at connect/sendmsg must say.
struct Expected<'a> {
    verdict: &'a str,
    proto: &'a str,
    src_segment: &'a str,
    src_cgroup: Option<&'a Cgroup>,
    dst_segment: &'a str,
    dst_addr: &'a str,
    dst_port: u16,
    /// `connect` or `sendmsg` (the family digit is not checked).
    hook_prefix: &'a str,
}

#[track_caller]
fn check_line(agent: &Agent, v: &Value, out: &ProbeOutcome, want: &Expected<'_>) {
    let got = (
        v["verdict"].as_str(),
        v["direction"].as_str(),
        v["proto"].as_str(),
        v["src"]["segment"].as_str(),
        v["src"]["pid"].as_u64(),
        v["src"]["comm"].as_str(),
        v["dst"]["segment"].as_str(),
        v["dst"]["addr"].as_str(),
        v["dst"]["port"].as_u64(),
        v["reason"].as_str(),
    );
    let reason = format!(
        "no rule allows {} -> {} {}/{}",
        want.src_segment, want.dst_segment, want.proto, want.dst_port
    );
    let expected = (
        Some(want.verdict),
        Some("egress"),
        Some(want.proto),
        Some(want.src_segment),
        Some(u64::from(out.pid)),
        Some("ztai-probe"),
        Some(want.dst_segment),
        Some(want.dst_addr),
        Some(u64::from(want.dst_port)),
        Some(reason.as_str()),
    );
    assert_eq!(
        got,
        expected,
        "report line (verdict, direction, proto, src.segment, src.pid, src.comm, dst.segment, \
         dst.addr, dst.port, reason) for {}; line: {v}\n{}",
        out.desc,
        agent.diagnostics()
    );
    if let Some(cg) = want.src_cgroup {
        assert_eq!(
            v["src"]["cgroup"].as_str(),
            Some(cg.proc_path().as_str()),
            "src.cgroup; line: {v}"
        );
    }
    let hook = v["hook"].as_str().unwrap_or("");
    assert!(
        hook.starts_with(want.hook_prefix),
        "hook should be {}4/6, line: {v}",
        want.hook_prefix
    );
    assert_eq!(
        shape(v),
        documented_shape(),
        "an {} line must have the documented violation shape; line: {v}",
        want.verdict
    );
}

/// Lines reported so far for destination port `port` and protocol `proto`.
fn lines_for(agent: &Agent, proto: &str, port: u16) -> Vec<Value> {
    agent
        .violations()
        .into_iter()
        .filter(|v| v["proto"] == proto && v["dst"]["port"] == port)
        .collect()
}

#[test]
fn whole_policy_audit_lets_a_would_be_tcp_denial_pass_over_ipv4_ipv6_and_v4_mapped_and_reports_each_connection_once_as_audit()
 {
    require_agent!();
    const PORT: u16 = 27532;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf");
    // No rule at all: in enforce mode every one of these connects would be EPERM.
    let agent = Agent::start_ready(
        &Policy::audit(&cg)
            .cgroups("orchestrator", &["orch"])
            .cgroups("inference", &["inf"]),
        &cg,
    );
    let server = ProbeCmd::tcp_listen(format!("[::]:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    let mut pids = Vec::new();
    for t in loopback_targets(PORT) {
        let out = ProbeCmd::tcp_connect(&t.addr).in_cgroup(&orch).run();
        assert!(
            out.is_ok(),
            "{}: audit mode must let the would-be denial through (connect + echo): {out}\n{}",
            t.family,
            agent.diagnostics()
        );
        let v = agent.wait_violation_from(out.pid);
        check_line(
            &agent,
            &v,
            &out,
            &Expected {
                verdict: "audit",
                proto: "tcp",
                src_segment: "orchestrator",
                src_cgroup: Some(&orch),
                dst_segment: "inference",
                dst_addr: t.reported_ip,
                dst_port: PORT,
                hook_prefix: "connect",
            },
        );
        pids.push(out.pid);
    }
    // Barrier: one more audited connect (the report stream is ordered); then each connection
    // above must have been reported exactly once (no second line from another hook).
    let last = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .run();
    last.assert_ok();
    agent.wait_violation_from(last.pid);
    let lines = lines_for(&agent, "tcp", PORT);
    assert_eq!(
        lines.len(),
        pids.len() + 1,
        "each audited connection must be reported exactly once; lines for tcp/{PORT}: {lines:#?}"
    );
    assert!(
        lines.iter().all(|v| v["verdict"] == "audit"),
        "only audit lines expected in audit mode: {lines:#?}"
    );
}

#[test]
fn whole_policy_audit_lets_would_be_udp_denials_pass_connected_and_unconnected_and_reports_them_as_audit()
 {
    require_agent!();
    const PORT: u16 = 27532;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf");
    let agent = Agent::start_ready(
        &Policy::audit(&cg)
            .cgroups("orchestrator", &["orch"])
            .cgroups("inference", &["inf"]),
        &cg,
    );
    let echo = ProbeCmd::udp_echo(format!("[::]:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();

    for t in loopback_targets(PORT) {
        for connected in [false, true] {
            let mut cmd = ProbeCmd::udp_send(&t.addr).in_cgroup(&orch).expect_reply();
            if connected {
                cmd = cmd.connected();
            }
            let out = cmd.run();
            let how = if connected {
                "connected"
            } else {
                "unconnected"
            };
            assert!(
                out.is_ok(),
                "{} {how}: audit mode must let the datagram and its echo through: {out}\n{}",
                t.family,
                agent.diagnostics()
            );
            let v = agent.wait_violation_from(out.pid);
            check_line(
                &agent,
                &v,
                &out,
                &Expected {
                    verdict: "audit",
                    proto: "udp",
                    src_segment: "orchestrator",
                    src_cgroup: Some(&orch),
                    dst_segment: "inference",
                    dst_addr: t.reported_ip,
                    dst_port: PORT,
                    hook_prefix: if connected { "connect" } else { "sendmsg" },
                },
            );
        }
    }
    let echoes = echo.lines();
    assert!(
        echoes
            .iter()
            .filter(|l| l.starts_with("echo "))
            .all(|l| l.ends_with(" ok")),
        "the server's replies must pass: {echoes:?}"
    );
    let lines = lines_for(&agent, "udp", PORT);
    assert!(
        lines.iter().all(|v| v["verdict"] == "audit"),
        "only audit lines expected in audit mode: {lines:#?}"
    );
}

#[test]
fn whole_policy_audit_lets_host_reach_a_labeled_listener_from_inside_the_subtree_and_from_outside_it_reported_as_audit()
 {
    require_agent!();
    const PORT: u16 = 27533;
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let unlabeled = cg.child("unlabeled");
    let agent = Agent::start_ready(&Policy::audit(&cg).cgroups("inference", &["inf"]), &cg);
    let server = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    // An unlabeled process under the attach point: judged at its connect (host -> inference).
    let inside = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&unlabeled)
        .run();
    assert!(
        inside.is_ok(),
        "host -> inference (audit) must pass: {inside}\n{}",
        agent.diagnostics()
    );
    let v = agent.wait_violation_from(inside.pid);
    check_line(
        &agent,
        &v,
        &inside,
        &Expected {
            verdict: "audit",
            proto: "tcp",
            src_segment: "host",
            src_cgroup: Some(&unlabeled),
            dst_segment: "inference",
            dst_addr: "127.0.0.1",
            dst_port: PORT,
            hook_prefix: "connect",
        },
    );

    // A process outside the subtree: judged at the receiver's ingress; in enforce mode its SYN
    // would be dropped (client timeout), in audit mode it passes and is reported as audit.
    let outside = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .timeout_ms(3000)
        .run();
    assert!(
        outside.is_ok(),
        "a client outside the subtree reaching an audited listener must pass: {outside}\n{}",
        agent.diagnostics()
    );
    let v = agent.wait_violation(DEFAULT_TIMEOUT, |v| {
        v["direction"] == "ingress" && v["dst"]["port"] == PORT
    });
    let got = (
        v["verdict"].as_str(),
        v["proto"].as_str(),
        v["hook"].as_str(),
        v["src"]["segment"].as_str(),
        v["dst"]["segment"].as_str(),
        v["dst"]["cgroup"].as_str(),
        v["reason"].as_str(),
    );
    let reason = format!("no rule allows host -> inference tcp/{PORT}");
    assert_eq!(
        got,
        (
            Some("audit"),
            Some("tcp"),
            Some("skb_ingress"),
            Some("host"),
            Some("inference"),
            Some(inf.proc_path().as_str()),
            Some(reason.as_str())
        ),
        "(verdict, proto, hook, src.segment, dst.segment, dst.cgroup, reason) of the ingress \
         audit line: {v}"
    );
}

/// The three-segment matrix of per-segment modes: `a` and `c` audit, `b` enforce.
fn check_mixed_modes(label: &str, policy: impl Fn(&TestCgroup) -> Policy) {
    const PORT: u16 = 27534;
    let cg = TestCgroup::new();
    let (a, b, c) = (cg.child("a"), cg.child("b"), cg.child("c"));
    let agent = Agent::start_ready(&policy(&cg), &cg);
    let servers: Vec<_> = [(&a, 0u16), (&b, 1), (&c, 2)]
        .into_iter()
        .map(|(g, k)| {
            let s = ProbeCmd::tcp_listen(format!("127.0.0.1:{}", PORT + k))
                .in_cgroup(g)
                .spawn();
            s.wait_listening();
            s
        })
        .collect();
    let port_of = |seg: &str| match seg {
        "a" => PORT,
        "b" => PORT + 1,
        _ => PORT + 2,
    };
    let cgroup_of = |seg: &str| match seg {
        "a" => &a,
        "b" => &b,
        _ => &c,
    };
    let mut lines = Vec::new();
    for (from, to, verdict) in [
        ("a", "b", "deny"),
        ("b", "a", "deny"),
        ("a", "c", "audit"),
        ("c", "a", "audit"),
    ] {
        let port = port_of(to);
        let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{port}"))
            .in_cgroup(cgroup_of(from))
            .run();
        match verdict {
            "deny" => assert!(
                out.is_eperm(),
                "[{label}] {from} -> {to}: one end enforces, so the flow must be denied with \
                 EPERM: {out}\n{}",
                agent.diagnostics()
            ),
            _ => assert!(
                out.is_ok(),
                "[{label}] {from} -> {to}: both ends audit, so the flow must pass: {out}\n{}",
                agent.diagnostics()
            ),
        }
        let v = agent.wait_violation_from(out.pid);
        check_line(
            &agent,
            &v,
            &out,
            &Expected {
                verdict,
                proto: "tcp",
                src_segment: from,
                src_cgroup: Some(cgroup_of(from)),
                dst_segment: to,
                dst_addr: "127.0.0.1",
                dst_port: port,
                hook_prefix: "connect",
            },
        );
        lines.push(v);
    }
    assert_eq!(
        shape(&lines[0]),
        shape(&lines[2]),
        "[{label}] an audit line must have the same shape as a deny line:\n{}\n{}",
        lines[0],
        lines[2]
    );
    drop(servers);
}

#[test]
fn per_segment_audit_denies_audit_to_enforce_and_enforce_to_audit_and_lets_audit_to_audit_pass_as_audit()
 {
    require_agent!();
    // spec.mode enforce, two segments switched to audit.
    check_mixed_modes("spec enforce, a/c audit", |cg| {
        Policy::enforce(cg)
            .cgroups("a", &["a"])
            .cgroups("b", &["b"])
            .cgroups("c", &["c"])
            .segment_mode("a", "audit")
            .segment_mode("c", "audit")
    });
    // spec.mode audit, one segment switched back to enforce: the override wins.
    check_mixed_modes("spec audit, b enforce", |cg| {
        Policy::audit(cg)
            .cgroups("a", &["a"])
            .cgroups("b", &["b"])
            .cgroups("c", &["c"])
            .segment_mode("b", "enforce")
    });
}

#[test]
fn audited_flows_are_counted_with_verdict_audit_in_the_flow_and_verdict_metrics() {
    require_agent!();
    const PORT: u16 = 27537;
    const N_TCP: u32 = 3;
    const N_UDP: u32 = 4;
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let agent = Agent::start_ready(
        &Policy::audit(&cg)
            .cgroups("orchestrator", &["orch"])
            .cgroups("inference", &["inf"]),
        &cg,
    );
    let tcp = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let udp = ProbeCmd::udp_echo(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    tcp.wait_listening();
    udp.wait_listening();

    for _ in 0..N_TCP {
        let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
            .in_cgroup(&orch)
            .run();
        assert!(out.is_ok(), "audited connect must pass: {out}");
    }
    let out = ProbeCmd::udp_send(format!("127.0.0.1:{PORT}"))
        .connected()
        .expect_reply()
        .count(N_UDP)
        .in_cgroup(&orch)
        .run();
    assert!(out.is_ok(), "audited datagrams must pass: {out}");
    let udp_pid = out.pid;

    let series = |proto| {
        [
            ("src_segment", "orchestrator"),
            ("dst_segment", "inference"),
            ("proto", proto),
            ("port", "other"),
            ("verdict", "audit"),
        ]
    };
    // UDP: exactly N datagrams each way, with their IP lengths (20 + 8 + payload).
    let bytes: u64 = (1..=N_UDP)
        .map(|i| format!("ztai-probe datagram {udp_pid} {i}").len() as u64 + 28)
        .sum();
    let want = FlowCounts {
        orig_packets: N_UDP.into(),
        orig_bytes: bytes,
        reply_packets: N_UDP.into(),
        reply_bytes: bytes,
    };
    let got = agent.wait_flow_counts(&series("udp"), SCRAPE_DEADLINE, |c| c.covers(&want));
    assert_eq!(
        got,
        want,
        "{N_UDP} audited datagrams and their echoes must be counted exactly, under verdict=\"audit\"\n{}",
        agent.diagnostics()
    );
    // TCP: at least the handshake and the echoed line of each connection, both ways.
    let tcp_counts = agent.wait_flow_counts(&series("tcp"), SCRAPE_DEADLINE, |c| {
        c.orig_packets >= u64::from(3 * N_TCP) && c.reply_packets >= u64::from(2 * N_TCP)
    });
    assert!(
        tcp_counts.orig_bytes > 0 && tcp_counts.reply_bytes > 0,
        "{tcp_counts:?}"
    );

    let samples = agent.wait_metric_at_least(
        "ztai_policy_verdicts_total",
        &[("verdict", "audit")],
        f64::from(N_TCP + 1),
        SCRAPE_DEADLINE,
    );
    for verdict in ["allow", "deny"] {
        for proto in ["tcp", "udp"] {
            let mut labels = series(proto).to_vec();
            labels.retain(|(k, _)| *k != "verdict");
            labels.push(("verdict", verdict));
            labels.push(("direction", "orig"));
            assert_eq!(
                sample_value(&samples, "ztai_flow_packets_total", &labels),
                None,
                "audited {proto} flows must not also appear as verdict={verdict}"
            );
        }
    }
    assert_eq!(
        sample_value(
            &samples,
            "ztai_policy_verdicts_total",
            &[("verdict", "deny")]
        ),
        Some(0.0),
        "nothing is denied in audit mode"
    );
}
