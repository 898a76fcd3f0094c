//! TCP between segments on loopback: 127.0.0.1, ::1 and v4-mapped [::ffff:127.0.0.1].
//!
//! Fixed policy ports of this file: 27410, 27420-27421 (unique across the suite).

use ztai_tests::{Agent, Denial, Policy, ProbeCmd, TestCgroup, loopback_targets, require_agent};

#[test]
fn orchestrator_reaches_inference_over_tcp_on_the_allowed_port_via_ipv4_ipv6_and_v4_mapped() {
    require_agent!();
    const PORT: u16 = 27410;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &[format!("{PORT}/tcp")]),
        &cg,
    );
    // One dual-stack listener serves IPv4, IPv6 and v4-mapped clients.
    let server = ProbeCmd::tcp_listen(format!("[::]:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    let mut allowed = Vec::new();
    for t in loopback_targets(PORT) {
        let out = ProbeCmd::tcp_connect(&t.addr).in_cgroup(&orch).run();
        assert!(
            out.is_ok(),
            "{} connect to inference on the allowed port must succeed: {out}",
            t.family
        );
        allowed.push(out.pid);
    }

    let marker = ProbeCmd::tcp_connect(format!("127.0.0.1:{}", PORT + 1))
        .in_cgroup(&orch)
        .run();
    agent.assert_not_reported(&allowed, &marker);
}

#[test]
fn orchestrator_to_inference_on_a_port_no_rule_allows_fails_with_eperm_over_ipv4_ipv6_and_v4_mapped()
 {
    require_agent!();
    const ALLOWED: u16 = 27420;
    const OTHER: u16 = 27421;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &[format!("{ALLOWED}/tcp")]),
        &cg,
    );
    // Address-specific listeners this time (one per family) on the port no rule allows.
    let v4 = ProbeCmd::tcp_listen(format!("127.0.0.1:{OTHER}"))
        .in_cgroup(&inf)
        .spawn();
    let v6 = ProbeCmd::tcp_listen(format!("[::1]:{OTHER}"))
        .in_cgroup(&inf)
        .spawn();
    v4.wait_listening();
    v6.wait_listening();

    for t in loopback_targets(OTHER) {
        let out = ProbeCmd::tcp_connect(&t.addr).in_cgroup(&orch).run();
        assert!(
            out.is_eperm(),
            "{} connect on a port no rule allows must fail with EPERM: {out}",
            t.family
        );
        agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "orchestrator",
                dst_segment: "inference",
                dst_addr: t.reported_ip,
                dst_port: OTHER,
            },
        );
    }
    assert!(
        v4.lines()
            .iter()
            .chain(v6.lines().iter())
            .all(|l| !l.starts_with("accepted")),
        "a denied connect reached the server"
    );
}

#[test]
fn orchestrator_to_retrieval_is_denied_with_eperm_and_reported() {
    require_agent!();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let rag = cg.child("retrieval");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("retrieval", &["retrieval"])
            .cgroups("inference", &["inf/**"])
            .allow_all_ports("orchestrator", "inference"),
        &cg,
    );
    let server = ProbeCmd::tcp_listen("[::]:0").in_cgroup(&rag).spawn();
    let port = server.wait_listening().port();

    for t in loopback_targets(port) {
        let out = ProbeCmd::tcp_connect(&t.addr).in_cgroup(&orch).run();
        let v = agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "orchestrator",
                dst_segment: "retrieval",
                dst_addr: t.reported_ip,
                dst_port: port,
            },
        );
        let reason = v["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("orchestrator") && reason.contains("retrieval"),
            "reason should name both segments: {v}"
        );
    }
}

#[test]
fn inference_to_orchestrator_is_denied_because_rules_only_allow_their_direction() {
    require_agent!();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow_all_ports("orchestrator", "inference"),
        &cg,
    );
    let orch_server = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&orch).spawn();
    let inf_server = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&inf).spawn();
    let orch_port = orch_server.wait_listening().port();
    let inf_port = inf_server.wait_listening().port();

    ProbeCmd::tcp_connect(format!("127.0.0.1:{inf_port}"))
        .in_cgroup(&orch)
        .run()
        .assert_ok();
    let back = ProbeCmd::tcp_connect(format!("127.0.0.1:{orch_port}"))
        .in_cgroup(&inf)
        .run();
    agent.expect_denied(
        &back,
        &Denial {
            proto: "tcp",
            src_segment: "inference",
            dst_segment: "orchestrator",
            dst_addr: "127.0.0.1",
            dst_port: orch_port,
        },
    );
}

#[test]
fn processes_of_one_segment_talk_freely_and_unlabeled_processes_are_untouched() {
    require_agent!();
    let cg = TestCgroup::new();
    let orch_a = cg.child("orch-a");
    let orch_b = cg.child("orch-b/job");
    let misc = cg.child("misc");
    let misc2 = cg.child("tools/shell");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &["27499/tcp"]),
        &cg,
    );
    let orch_server = ProbeCmd::tcp_listen("[::]:0").in_cgroup(&orch_a).spawn();
    let host_server = ProbeCmd::tcp_listen("[::]:0").in_cgroup(&misc).spawn();
    let orch_port = orch_server.wait_listening().port();
    let host_port = host_server.wait_listening().port();

    let mut allowed = Vec::new();
    for t in loopback_targets(orch_port) {
        let out = ProbeCmd::tcp_connect(&t.addr).in_cgroup(&orch_b).run();
        assert!(
            out.is_ok(),
            "orchestrator -> orchestrator ({}) is inside one segment: {out}",
            t.family
        );
        allowed.push(out.pid);
    }
    for t in loopback_targets(host_port) {
        for client in [
            ProbeCmd::tcp_connect(&t.addr).in_cgroup(&misc2),
            ProbeCmd::tcp_connect(&t.addr),
        ] {
            let out = client.run();
            assert!(
                out.is_ok(),
                "host -> host ({}) must be untouched: {out}",
                t.family
            );
            allowed.push(out.pid);
        }
    }
    let marker = ProbeCmd::tcp_connect(format!("127.0.0.1:{host_port}"))
        .in_cgroup(&orch_a)
        .run();
    agent.assert_not_reported(&allowed, &marker);
}

#[test]
fn an_unlabeled_process_in_the_subtree_cannot_reach_a_labeled_segment() {
    require_agent!();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let misc = cg.child("misc");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow_all_ports("orchestrator", "inference"),
        &cg,
    );
    let server = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&orch).spawn();
    let port = server.wait_listening().port();
    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{port}"))
        .in_cgroup(&misc)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "host",
            dst_segment: "orchestrator",
            dst_addr: "127.0.0.1",
            dst_port: port,
        },
    );
}
