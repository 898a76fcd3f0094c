//! How the destination's and the source's segments are decided on one host: by the cgroup owning
//! the listening/bound socket, unlabeled listeners are `host`, nested cgroups inherit.
//!
//! Fixed policy ports of this file: 27460, 27470, 27480, 27490-27491, 27495-27497 (unique across
//! the suite).

use std::time::Duration;

use ztai_tests::{
    Agent, DEFAULT_TIMEOUT, Denial, Policy, ProbeCmd, TestCgroup, require_agent, try_wait_until,
};

#[test]
fn two_loopback_servers_in_different_segments_get_different_verdicts_for_the_same_client() {
    require_agent!();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let rag = cg.child("rag");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .cgroups("retrieval", &["rag"])
            .allow_all_ports("orchestrator", "inference"),
        &cg,
    );
    let inf_tcp = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&inf).spawn();
    let rag_tcp = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&rag).spawn();
    let inf_udp = ProbeCmd::udp_echo("127.0.0.1:0").in_cgroup(&inf).spawn();
    let rag_udp = ProbeCmd::udp_echo("127.0.0.1:0").in_cgroup(&rag).spawn();
    let (inf_tcp_port, rag_tcp_port) = (
        inf_tcp.wait_listening().port(),
        rag_tcp.wait_listening().port(),
    );
    let (inf_udp_port, rag_udp_port) = (
        inf_udp.wait_listening().port(),
        rag_udp.wait_listening().port(),
    );

    ProbeCmd::tcp_connect(format!("127.0.0.1:{inf_tcp_port}"))
        .in_cgroup(&orch)
        .run()
        .assert_ok();
    let tcp_denied = ProbeCmd::tcp_connect(format!("127.0.0.1:{rag_tcp_port}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &tcp_denied,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "retrieval",
            dst_addr: "127.0.0.1",
            dst_port: rag_tcp_port,
        },
    );

    ProbeCmd::udp_send(format!("127.0.0.1:{inf_udp_port}"))
        .in_cgroup(&orch)
        .expect_reply()
        .run()
        .assert_ok();
    let udp_denied = ProbeCmd::udp_send(format!("127.0.0.1:{rag_udp_port}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &udp_denied,
        &Denial {
            proto: "udp",
            src_segment: "orchestrator",
            dst_segment: "retrieval",
            dst_addr: "127.0.0.1",
            dst_port: rag_udp_port,
        },
    );
}

#[test]
fn the_same_port_on_two_loopback_addresses_is_judged_by_the_segment_owning_each_socket() {
    require_agent!();
    const PORT: u16 = 27460;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let rag = cg.child("rag");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .cgroups("retrieval", &["rag"])
            .allow("orchestrator", "inference", &[format!("{PORT}/tcp")]),
        &cg,
    );
    // 127.0.0.0/8 is all loopback: two sockets, same port, different owners.
    let inf_server = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let rag_server = ProbeCmd::tcp_listen(format!("127.0.0.2:{PORT}"))
        .in_cgroup(&rag)
        .spawn();
    inf_server.wait_listening();
    rag_server.wait_listening();

    ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .run()
        .assert_ok();
    let out = ProbeCmd::tcp_connect(format!("127.0.0.2:{PORT}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "retrieval",
            dst_addr: "127.0.0.2",
            dst_port: PORT,
        },
    );
}

#[test]
fn an_unlabeled_listener_in_the_subtree_on_a_port_allowed_for_inference_is_host_and_denied_for_orchestrator()
 {
    require_agent!();
    const PORT: u16 = 27470;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let misc = cg.child("misc");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow(
                "orchestrator",
                "inference",
                &[format!("{PORT}/tcp"), format!("{PORT}/udp")],
            ),
        &cg,
    );
    let tcp = ProbeCmd::tcp_listen(format!("[::]:{PORT}"))
        .in_cgroup(&misc)
        .spawn();
    let udp = ProbeCmd::udp_echo(format!("[::]:{PORT}"))
        .in_cgroup(&misc)
        .spawn();
    tcp.wait_listening();
    udp.wait_listening();

    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "host",
            dst_addr: "127.0.0.1",
            dst_port: PORT,
        },
    );
    let out = ProbeCmd::udp_send(format!("[::1]:{PORT}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "udp",
            src_segment: "orchestrator",
            dst_segment: "host",
            dst_addr: "::1",
            dst_port: PORT,
        },
    );
}

#[test]
fn an_unlabeled_listener_outside_the_subtree_on_a_port_allowed_for_inference_is_host_and_denied_for_orchestrator()
 {
    require_agent!();
    const PORT: u16 = 27480;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &[format!("{PORT}/tcp")]),
        &cg,
    );
    // No cgroup: the listener stays in the test process's cgroup, outside the agent's subtree.
    let outside = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}")).spawn();
    outside.wait_listening();

    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "host",
            dst_addr: "127.0.0.1",
            dst_port: PORT,
        },
    );
    // ...while an unlabeled client outside the subtree still reaches it.
    ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .run()
        .assert_ok();
}

#[test]
fn a_nested_cgroup_inherits_the_segment_of_its_nearest_labeled_ancestor() {
    require_agent!();
    const ALLOWED: u16 = 27490;
    const OTHER: u16 = 27491;
    let cg = TestCgroup::new();
    let deep = cg.child("orch/worker/deep");
    let rag_job = cg.child("orch/worker/rag/job");
    let replica = cg.child("inf/pod-0/replica");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            // A labeled cgroup below orch: its descendants are retrieval, not orchestrator.
            .cgroups("retrieval", &["orch/worker/rag"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &[format!("{ALLOWED}/tcp")]),
        &cg,
    );
    let allowed = ProbeCmd::tcp_listen(format!("127.0.0.1:{ALLOWED}"))
        .in_cgroup(&replica)
        .spawn();
    let other = ProbeCmd::tcp_listen(format!("127.0.0.1:{OTHER}"))
        .in_cgroup(&replica)
        .spawn();
    allowed.wait_listening();
    other.wait_listening();

    ProbeCmd::tcp_connect(format!("127.0.0.1:{ALLOWED}"))
        .in_cgroup(&deep)
        .run()
        .assert_ok();

    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{OTHER}"))
        .in_cgroup(&deep)
        .run();
    let v = agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "inference",
            dst_addr: "127.0.0.1",
            dst_port: OTHER,
        },
    );
    assert_eq!(
        v["src"]["cgroup"].as_str(),
        Some(deep.proc_path().as_str()),
        "src.cgroup: {v}"
    );

    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{ALLOWED}"))
        .in_cgroup(&rag_job)
        .run();
    let v = agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "retrieval",
            dst_segment: "inference",
            dst_addr: "127.0.0.1",
            dst_port: ALLOWED,
        },
    );
    assert_eq!(
        v["src"]["cgroup"].as_str(),
        Some(rag_job.proc_path().as_str()),
        "src.cgroup: {v}"
    );
}

#[test]
fn a_cgroup_created_after_the_agent_started_gets_its_segment_without_a_restart() {
    require_agent!();
    const PORT: u16 = 27495;
    let cg = TestCgroup::new();
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow("orchestrator", "inference", &[format!("{PORT}/tcp")]),
        &cg,
    );
    let server = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    // Created after "ready": until the agent labels it, it is an unlabeled (host) cgroup and
    // host -> inference is denied; once labeled orchestrator the allowed port opens.
    let late = cg.child("orch-late");
    let mut attempts = Vec::new();
    let opened = try_wait_until(Duration::from_secs(20), || {
        let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
            .in_cgroup(&late)
            .run();
        let ok = out.is_ok();
        assert!(
            ok || out.is_eperm(),
            "only EPERM (not yet labeled) or ok are expected: {out}"
        );
        attempts.push(out);
        ok.then_some(())
    });
    assert!(
        opened.is_some(),
        "a cgroup matching orch* created after the agent started was never treated as orchestrator; \
         last attempt: {}\n{}",
        attempts.last().expect("at least one attempt"),
        agent.diagnostics()
    );
    for denied in attempts.iter().filter(|o| o.is_eperm()) {
        let v = agent.wait_violation_from(denied.pid);
        assert_eq!(
            v["src"]["segment"], "host",
            "before labeling the new cgroup is host: {v}"
        );
    }
}

#[test]
fn listeners_started_before_the_agent_are_judged_by_the_segment_of_their_cgroup() {
    require_agent!();
    const PORT: u16 = 27496;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let rag = cg.child("rag");
    // Both servers bind before any program is attached.
    let inf_server = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let rag_server = ProbeCmd::tcp_listen(format!("[::1]:{PORT}"))
        .in_cgroup(&rag)
        .spawn();
    let inf_udp = ProbeCmd::udp_echo(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    inf_server.wait_listening();
    rag_server.wait_listening();
    inf_udp.wait_listening();
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .cgroups("retrieval", &["rag"])
            .allow(
                "orchestrator",
                "inference",
                &[format!("{PORT}/tcp"), format!("{PORT}/udp")],
            ),
        &cg,
    );

    ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .run()
        .assert_ok();
    ProbeCmd::udp_send(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&orch)
        .expect_reply()
        .run()
        .assert_ok();
    let out = ProbeCmd::tcp_connect(format!("[::1]:{PORT}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "retrieval",
            dst_addr: "::1",
            dst_port: PORT,
        },
    );
}

/// A listener bound before the agent in a cgroup the first policy leaves unlabeled is recorded
/// all the same, so a reload that labels its cgroup judges connections to it by that segment.
#[test]
fn a_listener_older_than_the_agent_in_an_unlabeled_cgroup_takes_the_segment_a_reload_gives_it() {
    require_agent!();
    const PORT: u16 = 27497;
    let cg = TestCgroup::new();
    let misc = cg.child("misc");
    let later = cg.child("later");
    let server = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&later)
        .spawn();
    server.wait_listening();
    let v1 = Policy::enforce(&cg).cgroups("orchestrator", &["orch"]);
    let agent = Agent::start_ready(&v1, &cg);
    // Unlabeled to unlabeled: host to host.
    ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&misc)
        .run()
        .assert_ok();

    let v2 = Policy::enforce(&cg)
        .cgroups("orchestrator", &["orch"])
        .cgroups("retrieval", &["later"]);
    agent.replace_policy(&v2.to_yaml());
    agent.wait_policy_applied(2, DEFAULT_TIMEOUT);
    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&misc)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "host",
            dst_segment: "retrieval",
            dst_addr: "127.0.0.1",
            dst_port: PORT,
        },
    );
}
