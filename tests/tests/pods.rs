//! Pod-style workloads: labeled cgroups whose processes live in their own network namespaces
//! (joined at L2 by a bridge in a separate "switch" namespace) are identified by their
//! namespaces' addresses. The agent rescans about every second, so every change (a new workload,
//! a new address, a workload that exits) is awaited by polling with a deadline.
//!
//! Fixed policy ports of this file: 27560-27561 (inside the pods' own namespaces), 27617-27618
//! (services in the host's namespace).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ztai_tests::{
    Agent, Denial, PodNetwork, Policy, ProbeCmd, ProbeOutcome, RemoteHost, TestCgroup,
    require_agent, try_wait_until,
};

/// a -> b on this port only.
const AB_PORT: u16 = 27560;
/// a -> podnet (the pods' subnet as a cidr segment) on this port only.
const PODNET_PORT: u16 = 27561;

/// A labeled service in the host's namespace, allowed to the pod.
const HOST_SERVICE_PORT: u16 = 27617;
/// A labeled service in the host's namespace no rule opens to the pod.
const HOST_DENIED_PORT: u16 = 27618;

/// How long the agent may take to notice a change in another namespace (rescan ~1 s).
const RESCAN_DEADLINE: Duration = Duration::from_secs(15);

/// Runs `cmd` until it succeeds or `timeout` passes; panics with the last outcome.
#[track_caller]
fn poll_until_ok(agent: &Agent, what: &str, timeout: Duration, cmd: impl Fn() -> ProbeCmd) {
    let mut last: Option<ProbeOutcome> = None;
    let ok = try_wait_until(timeout, || {
        let out = cmd().timeout_ms(2000).run();
        let ok = out.is_ok();
        last = Some(out);
        ok.then_some(())
    });
    if ok.is_none() {
        panic!(
            "{what}: still failing after {timeout:?}; last attempt: {}\n{}",
            last.map(|o| o.to_string()).unwrap_or_default(),
            agent.diagnostics()
        );
    }
}

fn ip_str(ip: IpAddr) -> String {
    ip.to_string()
}

#[test]
fn pods_are_segments_by_address_new_addresses_are_learned_and_an_exited_workloads_address_is_forgotten()
 {
    require_agent!();
    let net = PodNetwork::new(3);
    let (pod_a, pod_b, pod_c) = (net.pod(0), net.pod(1), net.pod(2));
    let cg = TestCgroup::new();
    let (cg_a, cg_b, cg_c) = (cg.child("pa"), cg.child("pb"), cg.child("pc"));
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("a", &["pa"])
            .cgroups("b", &["pb"])
            .cgroups("c", &["pc"])
            .cidrs("podnet", &[net.v4_cidr(), net.v6_cidr()])
            .allow("a", "b", &[format!("{AB_PORT}/tcp")])
            .allow("a", "podnet", &[format!("{PODNET_PORT}/tcp")]),
        &cg,
    );

    // Workloads: B serves both ports, A and C serve AB_PORT; each in its pod and its cgroup.
    let b_ab = ProbeCmd::tcp_listen(format!("[::]:{AB_PORT}"))
        .in_netns(pod_b.netns())
        .in_cgroup(&cg_b)
        .spawn();
    let b_other = ProbeCmd::tcp_listen(format!("[::]:{PODNET_PORT}"))
        .in_netns(pod_b.netns())
        .in_cgroup(&cg_b)
        .spawn();
    let a_srv = ProbeCmd::tcp_listen(format!("[::]:{AB_PORT}"))
        .in_netns(pod_a.netns())
        .in_cgroup(&cg_a)
        .spawn();
    let c_workload = ProbeCmd::tcp_listen(format!("[::]:{AB_PORT}"))
        .in_netns(pod_c.netns())
        .in_cgroup(&cg_c)
        .spawn();
    // Not a workload: an unlabeled server that happens to share C's namespace.
    let c_unlabeled = ProbeCmd::tcp_listen(format!("[::]:{PODNET_PORT}"))
        .in_netns(pod_c.netns())
        .spawn();
    for p in [&b_ab, &b_other, &a_srv, &c_workload, &c_unlabeled] {
        p.wait_listening();
    }

    // A -> B on the allowed port works once the agent has seen B's namespace.
    for ip in [pod_b.v4(), pod_b.v6()] {
        poll_until_ok(
            &agent,
            &format!("a -> b {ip}:{AB_PORT}"),
            RESCAN_DEADLINE,
            || {
                ProbeCmd::tcp_connect(SocketAddr::new(ip, AB_PORT))
                    .in_netns(pod_a.netns())
                    .in_cgroup(&cg_a)
            },
        );
    }

    // A -> B's other port: refused at A's connect(), since B's address names segment b (not the
    // podnet cidr, which would allow this port).
    for ip in [pod_b.v4(), pod_b.v6()] {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, PODNET_PORT))
            .in_netns(pod_a.netns())
            .in_cgroup(&cg_a)
            .run();
        agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "a",
                dst_segment: "b",
                dst_addr: &ip_str(ip),
                dst_port: PODNET_PORT,
            },
        );
    }

    // A's namespace may be learned a rescan after B's: wait until C -> A is reported with A's
    // segment (before that, A's address is still the podnet cidr; both deny C).
    let learned_a = try_wait_until(RESCAN_DEADLINE, || {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(pod_a.v4(), AB_PORT))
            .in_netns(pod_c.netns())
            .in_cgroup(&cg_c)
            .run();
        let v = agent.wait_violation_from(out.pid);
        (v["dst"]["segment"] == "a").then_some(())
    });
    assert!(learned_a.is_some(), "A's address was never learned as segment a\n{}", agent.diagnostics());

    // C -> B is refused on every port; C -> A too.
    for (ip, port, dst) in [
        (pod_b.v4(), AB_PORT, "b"),
        (pod_b.v6(), AB_PORT, "b"),
        (pod_b.v4(), PODNET_PORT, "b"),
        (pod_b.v6(), PODNET_PORT, "b"),
        (pod_a.v4(), AB_PORT, "a"),
        (pod_a.v6(), AB_PORT, "a"),
    ] {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, port))
            .in_netns(pod_c.netns())
            .in_cgroup(&cg_c)
            .run();
        agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "c",
                dst_segment: dst,
                dst_addr: &ip_str(ip),
                dst_port: port,
            },
        );
    }

    // While C's workload runs, C's address is segment c: A may not reach it even on the port
    // the podnet cidr allows. The scan that made B known may have run before C's workload
    // joined its cgroup, so C is awaited like B: until A's connect is refused.
    for ip in [pod_c.v4(), pod_c.v6()] {
        let known = try_wait_until(RESCAN_DEADLINE, || {
            ProbeCmd::tcp_connect(SocketAddr::new(ip, PODNET_PORT))
                .in_netns(pod_a.netns())
                .in_cgroup(&cg_a)
                .timeout_ms(2000)
                .run()
                .is_eperm()
                .then_some(())
        });
        assert!(known.is_some(), "C's address {ip} never became segment c\n{}", agent.diagnostics());
    }
    for ip in [pod_c.v4(), pod_c.v6()] {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, PODNET_PORT))
            .in_netns(pod_a.netns())
            .in_cgroup(&cg_a)
            .run();
        agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "a",
                dst_segment: "c",
                dst_addr: &ip_str(ip),
                dst_port: PODNET_PORT,
            },
        );
    }

    // A new address on B's interface: until the agent learns it, it is podnet (a -> podnet does
    // not allow AB_PORT); then it is b, and A reaches B there.
    let (new_v4, new_v6) = (pod_b.extra_v4(0), pod_b.extra_v6(0));
    pod_b.add_addr(new_v4);
    pod_b.add_addr(new_v6);
    for ip in [new_v4, new_v6] {
        poll_until_ok(
            &agent,
            &format!("a -> b at B's new address {ip}:{AB_PORT}"),
            RESCAN_DEADLINE,
            || {
                ProbeCmd::tcp_connect(SocketAddr::new(ip, AB_PORT))
                    .in_netns(pod_a.netns())
                    .in_cgroup(&cg_a)
            },
        );
    }

    // C's workload exits: its namespace holds no labeled process any more, so its address is
    // forgotten and falls back to the podnet cidr, which A may reach on PODNET_PORT (the
    // unlabeled server in that namespace answers).
    drop(c_workload);
    assert!(
        cg_c.procs().is_empty(),
        "C's cgroup still has processes: {:?}",
        cg_c.procs()
    );
    for ip in [pod_c.v4(), pod_c.v6()] {
        poll_until_ok(
            &agent,
            &format!("a -> podnet at the exited workload C's address {ip}:{PODNET_PORT}"),
            RESCAN_DEADLINE,
            || {
                ProbeCmd::tcp_connect(SocketAddr::new(ip, PODNET_PORT))
                    .in_netns(pod_a.netns())
                    .in_cgroup(&cg_a)
            },
        );
    }

    // The agent keeps working: B is still b (allowed port works, the other is refused).
    ProbeCmd::tcp_connect(SocketAddr::new(pod_b.v4(), AB_PORT))
        .in_netns(pod_a.netns())
        .in_cgroup(&cg_a)
        .run()
        .assert_ok();
    let out = ProbeCmd::tcp_connect(SocketAddr::new(pod_b.v4(), PODNET_PORT))
        .in_netns(pod_a.netns())
        .in_cgroup(&cg_a)
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "a",
            dst_segment: "b",
            dst_addr: &ip_str(pod_b.v4()),
            dst_port: PODNET_PORT,
        },
    );
}

/// A pod-style workload (a labeled cgroup whose process lives in its own network namespace)
/// reaching a labeled service in the host's namespace through one of the host's addresses is
/// judged against that service's segment: the kernel's socket lookup only searches the caller's
/// namespace, so the agent's table of bound sockets answers for the host's (exact address,
/// wildcard, dual-stack wildcard).
#[test]
fn a_pod_reaching_a_host_namespace_service_through_a_host_address_gets_the_services_segment() {
    require_agent!();
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let (pod, inf, rag) = (cg.child("pod"), cg.child("inf"), cg.child("rag"));
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["pod"])
            .cgroups("inference", &["inf"])
            .cgroups("retrieval", &["rag"])
            .allow("orchestrator", "inference", &[format!("{HOST_SERVICE_PORT}/tcp")]),
        &cg,
    );
    // A dual-stack wildcard listener (reached over IPv4 and IPv6) and a v4 wildcard one.
    let inf_server = ProbeCmd::tcp_listen(format!("[::]:{HOST_SERVICE_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    inf_server.wait_listening();
    let rag_server = ProbeCmd::tcp_listen(format!("0.0.0.0:{HOST_DENIED_PORT}"))
        .in_cgroup(&rag)
        .spawn();
    rag_server.wait_listening();
    for host in [remote.host_v4(), remote.host_v6()] {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(host, HOST_SERVICE_PORT))
            .in_cgroup(&pod)
            .in_netns(remote.netns())
            .run();
        assert!(
            out.is_ok(),
            "pod (orchestrator) -> inference in the host namespace via {host}: {out}\n{}",
            agent.diagnostics()
        );
    }
    let host = remote.host_v4();
    let out = ProbeCmd::tcp_connect(SocketAddr::new(host, HOST_DENIED_PORT))
        .in_cgroup(&pod)
        .in_netns(remote.netns())
        .run();
    agent.expect_denied(
        &out,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "retrieval",
            dst_addr: &ip_str(host),
            dst_port: HOST_DENIED_PORT,
        },
    );
}
