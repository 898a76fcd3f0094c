//! UDP between segments on loopback, with connected and unconnected sockets, over 127.0.0.1,
//! ::1 and v4-mapped [::ffff:127.0.0.1].
//!
//! Fixed policy ports of this file: 27430, 27440-27441, 27450 (unique across the suite).

use ztai_tests::{Agent, Denial, Policy, ProbeCmd, TestCgroup, loopback_targets, require_agent};

#[test]
fn udp_from_orchestrator_to_inference_on_the_allowed_port_passes_and_the_servers_sendto_reply_passes_too()
 {
    require_agent!();
    const PORT: u16 = 27430;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    // Only orchestrator -> inference is allowed: the echo server's sendto() back to the client
    // (inference -> orchestrator) must pass as a reply anyway.
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &[format!("{PORT}/udp")]),
        &cg,
    );
    let echo = ProbeCmd::udp_echo(format!("[::]:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();

    let mut allowed = vec![echo.pid()];
    for t in loopback_targets(PORT) {
        for connected in [false, true] {
            let mut cmd = ProbeCmd::udp_send(&t.addr).in_cgroup(&orch).expect_reply();
            if connected {
                cmd = cmd.connected();
            }
            let out = cmd.run();
            assert!(
                out.is_ok(),
                "{} {} datagram to inference on the allowed port, and the echo back, must pass: {out}",
                t.family,
                if connected {
                    "connected"
                } else {
                    "unconnected"
                }
            );
            allowed.push(out.pid);
        }
    }
    let echo_lines = echo.lines();
    assert!(
        echo_lines
            .iter()
            .filter(|l| l.starts_with("echo "))
            .all(|l| l.ends_with(" ok")),
        "every server sendto() reply must succeed: {echo_lines:?}"
    );

    let marker = ProbeCmd::udp_send(format!("127.0.0.1:{}", PORT + 1))
        .in_cgroup(&orch)
        .run();
    agent.assert_not_reported(&allowed, &marker);
}

#[test]
fn udp_from_orchestrator_to_inference_on_a_port_no_rule_allows_fails_with_eperm_connected_and_unconnected()
 {
    require_agent!();
    const ALLOWED: u16 = 27440;
    const OTHER: u16 = 27441;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &[format!("{ALLOWED}/udp")]),
        &cg,
    );
    let echo = ProbeCmd::udp_echo(format!("[::]:{OTHER}"))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();

    for t in loopback_targets(OTHER) {
        for connected in [false, true] {
            let mut cmd = ProbeCmd::udp_send(&t.addr).in_cgroup(&orch);
            if connected {
                cmd = cmd.connected();
            }
            let out = cmd.run();
            assert!(
                out.is_eperm(),
                "{} {} datagram on a port no rule allows must fail with EPERM: {out}",
                t.family,
                if connected {
                    "connected"
                } else {
                    "unconnected"
                }
            );
            agent.expect_denied(
                &out,
                &Denial {
                    proto: "udp",
                    src_segment: "orchestrator",
                    dst_segment: "inference",
                    dst_addr: t.reported_ip,
                    dst_port: OTHER,
                },
            );
        }
    }
    assert!(
        echo.lines().iter().all(|l| !l.starts_with("echo ")),
        "a denied datagram reached the server"
    );
}

#[test]
fn a_tcp_only_rule_does_not_allow_udp_to_the_same_port() {
    require_agent!();
    const PORT: u16 = 27450;
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
    let tcp = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let udp = ProbeCmd::udp_echo(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    tcp.wait_listening();
    udp.wait_listening();

    ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .run()
        .assert_ok();
    let out = ProbeCmd::udp_send(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "udp",
            src_segment: "orchestrator",
            dst_segment: "inference",
            dst_addr: "127.0.0.1",
            dst_port: PORT,
        },
    );
    // The datagram must not have arrived (checked after the report, so it had time to).
    assert!(
        udp.lines().iter().all(|l| !l.starts_with("echo ")),
        "denied datagram was delivered"
    );
}
