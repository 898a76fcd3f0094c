//! The metrics endpoint: `/metrics` in OpenMetrics text (checked with the reference parser,
//! python3 `prometheus_client`), `/healthz` and `/readyz`, served at `--metrics-addr` (port 0:
//! the bound address is in the "ready" line).
//!
//! Fixed policy ports of this file: 27580-27582.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ztai_tests::metrics::{Family, FlowCounts, Sample, parse_with_prometheus_client};
use ztai_tests::{Agent, Policy, ProbeCmd, TestCgroup, require_agent};

const UDP_PORT: u16 = 27580;
const TCP_PORT: u16 = 27581;
const DENIED_PORT: u16 = 27582;

const SCRAPE_DEADLINE: Duration = Duration::from_secs(15);

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families.iter().find(|f| f.name == name).unwrap_or_else(|| {
        panic!(
            "no metric family {name:?}; families: {:?}",
            families.iter().map(|f| &f.name).collect::<Vec<_>>()
        )
    })
}

/// The value of the one sample `name` with (at least) `labels`.
#[track_caller]
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    ztai_tests::metrics::sample_value(samples, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

#[test]
fn metrics_are_valid_openmetrics_that_count_the_known_traffic_and_health_and_readiness_answer_200()
{
    require_agent!();
    const N: u32 = 20;
    const D: u64 = 5;
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let _unlabeled = cg.child("misc");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch"])
            .cgroups("inference", &["inf"])
            .allow(
                "orchestrator",
                "inference",
                &[format!("{UDP_PORT}/udp"), format!("{TCP_PORT}/tcp")],
            ),
        &cg,
    );

    for path in ["/healthz", "/readyz"] {
        let r = agent.http_get(path);
        assert_eq!(r.status, 200, "GET {path} once ready: {r:?}");
    }
    let missing = agent.http_get("/nope");
    assert_eq!(missing.status, 404, "GET /nope: {missing:?}");

    let echo = ProbeCmd::udp_echo(format!("127.0.0.1:{UDP_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    // A listener makes DENIED_PORT an inference destination (an unbound port would be `host`).
    let closed = ProbeCmd::tcp_listen(format!("127.0.0.1:{DENIED_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();
    closed.wait_listening();
    let out = ProbeCmd::udp_send(format!("127.0.0.1:{UDP_PORT}"))
        .expect_reply()
        .count(N)
        .in_cgroup(&orch)
        .run();
    assert!(out.is_ok(), "{N} datagrams with echo: {out}");
    for _ in 0..D {
        ProbeCmd::tcp_connect(format!("127.0.0.1:{DENIED_PORT}"))
            .in_cgroup(&orch)
            .run()
            .assert_eperm();
    }

    // Poll until the known traffic shows (the agent refreshes about once a second).
    let port = UDP_PORT.to_string();
    let udp_series = [
        ("src_segment", "orchestrator"),
        ("dst_segment", "inference"),
        ("proto", "udp"),
        ("port", port.as_str()),
        ("verdict", "allow"),
    ];
    let deny_series = [
        ("src_segment", "orchestrator"),
        ("dst_segment", "inference"),
        ("proto", "tcp"),
        ("port", "other"),
        ("verdict", "deny"),
    ];
    agent.wait_flow_counts(&udp_series, SCRAPE_DEADLINE, |c| {
        c.orig_packets >= N.into() && c.reply_packets >= N.into()
    });
    agent.wait_flow_counts(&deny_series, SCRAPE_DEADLINE, |c| c.orig_packets >= D);

    // One scrape, judged by the reference parser.
    let resp = agent.http_get("/metrics");
    assert_eq!(resp.status, 200, "{resp:?}");
    let ctype = resp.header("content-type").unwrap_or_default();
    assert!(
        ctype.starts_with("application/openmetrics-text"),
        "Content-Type of /metrics: {ctype:?}"
    );
    assert!(
        resp.body.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with `# EOF`"
    );
    let families = parse_with_prometheus_client(&resp.body);
    let samples: Vec<Sample> = families
        .iter()
        .flat_map(|f| f.samples.iter().cloned())
        .collect();
    let show = || format!("--- /metrics ---\n{}\n{}", resp.body, agent.diagnostics());

    // Types and units as declared.
    for (name, kind, unit) in [
        ("ztai_flow_packets", "counter", ""),
        ("ztai_flow_bytes", "counter", "bytes"),
        ("ztai_policy_verdicts", "counter", ""),
        ("ztai_events_dropped", "counter", ""),
        ("ztai_flow_table_evictions", "counter", ""),
        ("ztai_labeled_cgroups", "gauge", ""),
        ("ztai_policy_generation", "gauge", ""),
        ("ztai_capability_missing", "gauge", ""),
        ("ztai_build", "info", ""),
    ] {
        let f = family(&families, name);
        assert_eq!(
            (f.kind.as_str(), f.unit.as_str()),
            (kind, unit),
            "type/unit of {name}\n{}",
            show()
        );
    }

    // The known traffic, exactly.
    let udp = FlowCounts::from_samples(&samples, &udp_series);
    assert_eq!(
        (udp.orig_packets, udp.reply_packets),
        (u64::from(N), u64::from(N)),
        "{N} datagrams and {N} echoes: {udp:?}\n{}",
        show()
    );
    assert!(
        udp.orig_bytes > 0 && udp.orig_bytes == udp.reply_bytes,
        "{udp:?}"
    );
    let deny = FlowCounts::from_samples(&samples, &deny_series);
    assert_eq!(
        deny,
        FlowCounts {
            orig_packets: D,
            orig_bytes: 0,
            reply_packets: 0,
            reply_bytes: 0,
        },
        "{D} denied connects\n{}",
        show()
    );
    let denials = value(
        &samples,
        "ztai_policy_verdicts_total",
        &[("verdict", "deny")],
    );
    assert!(
        denials >= D as f64,
        "ztai_policy_verdicts_total{{verdict=\"deny\"}} = {denials} < {D} denials made\n{}",
        show()
    );
    // The first sendto() is a policy decision; the later ones to the peer that answered are
    // part of that exchange.
    let allowed = value(
        &samples,
        "ztai_policy_verdicts_total",
        &[("verdict", "allow")],
    );
    assert!(
        allowed >= 1.0,
        "ztai_policy_verdicts_total{{verdict=\"allow\"}} = {allowed}: the datagrams were allowed\n{}",
        show()
    );
    assert_eq!(
        value(&samples, "ztai_labeled_cgroups", &[]),
        2.0,
        "orch and inf are labeled, misc and the subtree root are not\n{}",
        show()
    );
    assert_eq!(
        value(&samples, "ztai_events_dropped_total", &[]),
        0.0,
        "{}",
        show()
    );
    assert_eq!(
        value(&samples, "ztai_flow_table_evictions_total", &[]),
        0.0,
        "a handful of flows cannot fill the flow table\n{}",
        show()
    );
    value(&samples, "ztai_policy_generation", &[]);
    let build = family(&families, "ztai_build");
    assert!(
        build
            .samples
            .iter()
            .any(|s| s.labels.get("version").is_some_and(|v| !v.is_empty()) && s.value == 1.0),
        "ztai_build_info{{version=...}} 1: {build:?}"
    );

    // Bounded cardinality: no series names an address, flow series have exactly their labels.
    let flow_labels: BTreeSet<&str> = [
        "src_segment",
        "dst_segment",
        "proto",
        "port",
        "direction",
        "verdict",
    ]
    .into();
    for s in &samples {
        for (k, v) in &s.labels {
            let lk = k.to_ascii_lowercase();
            assert!(
                !(lk.contains("addr") || lk.contains("ip") || lk == "host" || lk == "peer"),
                "series {} has an address-like label {k}={v:?}\n{}",
                s.name,
                show()
            );
            assert!(
                v.parse::<IpAddr>().is_err(),
                "series {} carries an address in label {k}={v:?}\n{}",
                s.name,
                show()
            );
        }
        if s.name.starts_with("ztai_flow_packets") || s.name.starts_with("ztai_flow_bytes") {
            let keys: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(keys, flow_labels, "labels of {s:?}");
        }
    }

    for path in ["/healthz", "/readyz"] {
        let r = agent.http_get(path);
        assert_eq!(r.status, 200, "GET {path} while running: {r:?}");
    }
}
