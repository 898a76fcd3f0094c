//! cidrs segments reached through a veth pair to a "remote host" network namespace.
//!
//! The remote servers run inside the namespace and outside every test cgroup (unenforced).
//! Fixed ports of this file (inside the test's own namespace): 27500-27502.

use std::net::{IpAddr, SocketAddr};

use ztai_tests::{Agent, Denial, Policy, Probe, ProbeCmd, RemoteHost, TestCgroup, require_agent};

const ALLOWED_TCP: u16 = 27500;
const OTHER_TCP: u16 = 27501;
const ALLOWED_UDP: u16 = 27502;

/// The remote host's servers (kept alive for the test; dropped before the host).
struct RemoteServers {
    _tcp_allowed: Probe,
    _tcp_other: Probe,
    _udp: Probe,
}

fn start_remote_servers(remote: &RemoteHost) -> RemoteServers {
    let tcp_allowed = ProbeCmd::tcp_listen(format!("[::]:{ALLOWED_TCP}"))
        .in_netns(remote.netns())
        .spawn();
    let tcp_other = ProbeCmd::tcp_listen(format!("[::]:{OTHER_TCP}"))
        .in_netns(remote.netns())
        .spawn();
    let udp = ProbeCmd::udp_echo(format!("[::]:{ALLOWED_UDP}"))
        .in_netns(remote.netns())
        .spawn();
    tcp_allowed.wait_listening();
    tcp_other.wait_listening();
    udp.wait_listening();
    RemoteServers {
        _tcp_allowed: tcp_allowed,
        _tcp_other: tcp_other,
        _udp: udp,
    }
}

/// orchestrator -> enterprise on ALLOWED_TCP/tcp and ALLOWED_UDP/udp; the remote host's .3/::3
/// are a more specific `vault` segment inside the enterprise subnet.
fn policy(cg: &TestCgroup, remote: &RemoteHost) -> Policy {
    Policy::enforce(cg)
        .cgroups("orchestrator", &["orch*"])
        .cidrs("enterprise", &[remote.v4_cidr(), remote.v6_cidr()])
        .cidrs(
            "vault",
            &[
                format!("{}/32", remote.v4_alt()),
                format!("{}/128", remote.v6_alt()),
            ],
        )
        .allow(
            "orchestrator",
            "enterprise",
            &[format!("{ALLOWED_TCP}/tcp"), format!("{ALLOWED_UDP}/udp")],
        )
}

fn ip_str(ip: IpAddr) -> String {
    ip.to_string()
}

#[test]
fn orchestrator_reaches_the_enterprise_cidr_through_a_veth_on_the_allowed_port_and_gets_eperm_on_others()
 {
    require_agent!();
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let agent = Agent::start_ready(&policy(&cg, &remote), &cg);
    let _servers = start_remote_servers(&remote);

    for ip in [remote.v4(), remote.v6()] {
        let ok = ProbeCmd::tcp_connect(SocketAddr::new(ip, ALLOWED_TCP))
            .in_cgroup(&orch)
            .run();
        assert!(
            ok.is_ok(),
            "orchestrator -> enterprise {ip} on {ALLOWED_TCP}/tcp is allowed: {ok}"
        );
        for connected in [false, true] {
            let mut cmd = ProbeCmd::udp_send(SocketAddr::new(ip, ALLOWED_UDP))
                .in_cgroup(&orch)
                .expect_reply();
            if connected {
                cmd = cmd.connected();
            }
            let out = cmd.run();
            assert!(
                out.is_ok(),
                "orchestrator -> enterprise {ip} on {ALLOWED_UDP}/udp is allowed: {out}"
            );
        }

        let denied = ProbeCmd::tcp_connect(SocketAddr::new(ip, OTHER_TCP))
            .in_cgroup(&orch)
            .run();
        agent.expect_denied(
            &denied,
            &Denial {
                proto: "tcp",
                src_segment: "orchestrator",
                dst_segment: "enterprise",
                dst_addr: &ip_str(ip),
                dst_port: OTHER_TCP,
            },
        );
        // The port allowed for udp is not allowed for tcp (and vice versa).
        let denied = ProbeCmd::udp_send(SocketAddr::new(ip, ALLOWED_TCP))
            .in_cgroup(&orch)
            .run();
        agent.expect_denied(
            &denied,
            &Denial {
                proto: "udp",
                src_segment: "orchestrator",
                dst_segment: "enterprise",
                dst_addr: &ip_str(ip),
                dst_port: ALLOWED_TCP,
            },
        );
    }
}

#[test]
fn the_longest_matching_cidr_prefix_decides_the_remote_segment() {
    require_agent!();
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let agent = Agent::start_ready(&policy(&cg, &remote), &cg);
    let _servers = start_remote_servers(&remote);

    for ip in [remote.v4_alt(), remote.v6_alt()] {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, ALLOWED_TCP))
            .in_cgroup(&orch)
            .run();
        agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "orchestrator",
                dst_segment: "vault",
                dst_addr: &ip_str(ip),
                dst_port: ALLOWED_TCP,
            },
        );
    }
}

#[test]
fn an_unlabeled_cgroup_in_the_subtree_is_host_and_denied_towards_the_enterprise_segment() {
    require_agent!();
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let misc = cg.child("misc");
    let agent = Agent::start_ready(&policy(&cg, &remote), &cg);
    let _servers = start_remote_servers(&remote);

    for ip in [remote.v4(), remote.v6()] {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, ALLOWED_TCP))
            .in_cgroup(&misc)
            .run();
        agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "host",
                dst_segment: "enterprise",
                dst_addr: &ip_str(ip),
                dst_port: ALLOWED_TCP,
            },
        );
        let out = ProbeCmd::udp_send(SocketAddr::new(ip, ALLOWED_UDP))
            .in_cgroup(&misc)
            .run();
        agent.expect_denied(
            &out,
            &Denial {
                proto: "udp",
                src_segment: "host",
                dst_segment: "enterprise",
                dst_addr: &ip_str(ip),
                dst_port: ALLOWED_UDP,
            },
        );
    }
}

#[test]
fn remote_addresses_outside_every_cidr_are_world_open_to_unlabeled_processes_and_closed_to_segments()
 {
    require_agent!();
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let misc = cg.child("misc");
    let agent = Agent::start_ready(&policy(&cg, &remote), &cg);
    let _servers = start_remote_servers(&remote);

    let mut allowed = Vec::new();
    for ip in [remote.world_v4(), remote.world_v6()] {
        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, ALLOWED_TCP))
            .in_cgroup(&misc)
            .run();
        assert!(out.is_ok(), "host -> world {ip} must be untouched: {out}");
        allowed.push(out.pid);
        let out = ProbeCmd::udp_send(SocketAddr::new(ip, ALLOWED_UDP))
            .in_cgroup(&misc)
            .expect_reply()
            .run();
        assert!(
            out.is_ok(),
            "host -> world {ip} (udp) must be untouched: {out}"
        );
        allowed.push(out.pid);

        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, ALLOWED_TCP))
            .in_cgroup(&orch)
            .run();
        agent.expect_denied(
            &out,
            &Denial {
                proto: "tcp",
                src_segment: "orchestrator",
                dst_segment: "world",
                dst_addr: &ip_str(ip),
                dst_port: ALLOWED_TCP,
            },
        );
    }
    let marker = ProbeCmd::tcp_connect(SocketAddr::new(remote.v4(), OTHER_TCP))
        .in_cgroup(&orch)
        .run();
    agent.assert_not_reported(&allowed, &marker);
}
