//! Ingress enforcement: a labeled workload accepts connections and datagrams only from sources a
//! rule permits. Connections started outside the attach subtree (a remote host, an unlabeled
//! local process elsewhere on the machine) are judged at the receiver by the cgroup_skb ingress
//! program: a denied TCP SYN is dropped (the client's connect() times out, it is neither refused
//! nor rejected locally) and reported as one `"direction":"ingress"` JSON line.
//!
//! A TCP SYN (without ACK) is always a new connection at the receiver: an earlier connection with
//! the same addresses and ports leaves its entry behind, and a SYN only follows such an entry when
//! its own initiator's egress (a socket inside the subtree) made it for this very SYN. Inbound IPv4
//! that is neither TCP, UDP nor ICMP is dropped at a labeled receiver and reported. A UDP exchange
//! judged at the receiver holds only for the socket it was judged for.
//!
//! Fixed policy ports of this file: 27540-27559, 27565-27567, 27600-27610 and 27615 (servers in the host
//! namespace: one set per test, since the tests of a file run in parallel); fixed client ports
//! 27603 (in a test's own remote namespace), 27607 and 27616 (loopback, host namespace) and 40567
//! (remote).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;

use serde_json::Value;

use ztai_tests::metrics::sample_value;
use ztai_tests::probe::{exit, is_raw_recv_line, raw_payload};
use ztai_tests::time::{now_unix, parse_rfc3339};
use ztai_tests::{
    Agent, Cgroup, DEFAULT_TIMEOUT, Denial, Policy, Probe, ProbeCmd, ProbeOutcome, RemoteHost,
    TestCgroup, require_agent, try_wait_until,
};

/// One test's ports.
struct Ports {
    /// enterprise -> inference (tcp), also allowed orchestrator -> inference.
    inbound_tcp: u16,
    /// No rule names this port towards inference.
    closed_tcp: u16,
    /// enterprise -> inference (udp).
    inbound_udp: u16,
}

/// orchestrator -> enterprise (servers inside the remote host's own namespace).
const OUTBOUND_TCP: u16 = 27558;
const OUTBOUND_UDP: u16 = 27559;

/// Short client deadline for connections that must never complete: SYNs are dropped, so the
/// client waits this long and then reports ETIMEDOUT (exit 7).
const DROPPED_MS: u64 = 1500;

fn policy(cg: &TestCgroup, remote: &RemoteHost, p: &Ports) -> Policy {
    Policy::enforce(cg)
        .cgroups("orchestrator", &["orch"])
        .cgroups("inference", &["inf"])
        .cidrs("enterprise", &[remote.v4_cidr(), remote.v6_cidr()])
        .allow(
            "enterprise",
            "inference",
            &[
                format!("{}/tcp", p.inbound_tcp),
                format!("{}/udp", p.inbound_udp),
            ],
        )
        .allow(
            "orchestrator",
            "inference",
            &[format!("{}/tcp", p.inbound_tcp)],
        )
        .allow(
            "orchestrator",
            "enterprise",
            &[format!("{OUTBOUND_TCP}/tcp"), format!("{OUTBOUND_UDP}/udp")],
        )
}

/// The cgroup id the kernel uses (the cgroup directory's inode number on cgroup2).
fn cgroup_id(cg: &Cgroup) -> u64 {
    std::fs::metadata(cg.path())
        .unwrap_or_else(|e| panic!("stat {}: {e}", cg.path().display()))
        .ino()
}

/// What an ingress denial line must say.
struct Inbound<'a> {
    proto: &'a str,
    src_segment: &'a str,
    /// The client's bound address (the probe printed it).
    src: SocketAddr,
    dst_segment: &'a str,
    dst_cgroup: &'a Cgroup,
    dst: SocketAddr,
}

/// Waits for the ingress report of the packet(s) from `want.src` and checks it field by field.
#[track_caller]
fn expect_ingress_report(agent: &Agent, want: &Inbound<'_>) -> Value {
    let src_ip = want.src.ip().to_canonical().to_string();
    let v = agent.wait_violation(DEFAULT_TIMEOUT, |v| {
        v["direction"] == "ingress"
            && v["src"]["addr"] == src_ip.as_str()
            && v["src"]["port"] == want.src.port()
    });
    let ts = v["ts"].as_str().unwrap_or_else(|| panic!("ts: {v}"));
    let t = parse_rfc3339(ts).unwrap_or_else(|| panic!("ts {ts:?} is not RFC 3339: {v}"));
    assert!(
        (now_unix() - t).abs() < 120.0,
        "ts {ts:?} is not close to now: {v}"
    );
    assert_eq!(v["verdict"], "deny", "{v}");
    assert_eq!(v["direction"], "ingress", "{v}");
    assert_eq!(v["hook"], "skb_ingress", "{v}");
    assert_eq!(v["proto"], want.proto, "{v}");

    let src = &v["src"];
    assert_eq!(src["segment"], want.src_segment, "src.segment: {v}");
    for k in ["cgroup", "pid", "comm", "uid"] {
        assert!(
            src.get(k).is_some_and(Value::is_null),
            "src.{k} must be present and null (no local task is known at ingress): {v}"
        );
    }

    let dst = &v["dst"];
    assert_eq!(dst["segment"], want.dst_segment, "dst.segment: {v}");
    assert_eq!(
        dst["cgroup"],
        want.dst_cgroup.proc_path().as_str(),
        "dst.cgroup is the receiver's cgroup: {v}"
    );
    assert_eq!(
        dst["cgroup_id"],
        cgroup_id(want.dst_cgroup),
        "dst.cgroup_id is the receiver's cgroup id: {v}"
    );
    assert_eq!(
        dst["addr"],
        want.dst.ip().to_canonical().to_string().as_str(),
        "dst.addr: {v}"
    );
    assert_eq!(dst["port"], want.dst.port(), "dst.port: {v}");
    assert_eq!(
        v["reason"],
        format!(
            "no rule allows {} -> {} {}/{}",
            want.src_segment,
            want.dst_segment,
            want.proto,
            want.dst.port()
        )
        .as_str(),
        "reason: {v}"
    );
    v
}

#[track_caller]
fn bound(out: &ProbeOutcome) -> SocketAddr {
    out.bound_addr()
        .unwrap_or_else(|| panic!("the probe printed no `bound` line: {out}"))
}

/// Asserts the server never logged a line about `peer` (no accept, no echo).
#[track_caller]
fn assert_server_never_saw(server: &Probe, peer: SocketAddr) {
    let ip = peer.ip().to_canonical();
    let forms = [
        format!(" {}:{}", ip, peer.port()),
        format!(" [{}]:{}", ip, peer.port()),
        format!(" [::ffff:{}]:{}", ip, peer.port()),
    ];
    let seen: Vec<String> = server
        .lines()
        .into_iter()
        .filter(|l| forms.iter().any(|f| l.contains(f.as_str())))
        .collect();
    assert!(
        seen.is_empty(),
        "{} heard from {peer}, whose packets must have been dropped: {seen:?}",
        server.description()
    );
}

#[test]
fn a_remote_source_a_rule_covers_connects_and_one_outside_every_rule_or_on_another_port_times_out_and_is_reported()
 {
    require_agent!();
    let p = Ports {
        inbound_tcp: 27540,
        closed_tcp: 27541,
        inbound_udp: 27542,
    };
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    // One server on the wildcard (dual-stack), one on the veth's host address only.
    let open = ProbeCmd::tcp_listen(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&inf)
        .spawn();
    let closed = ProbeCmd::tcp_listen(SocketAddr::new(remote.host_v4(), p.closed_tcp))
        .in_cgroup(&inf)
        .spawn();
    open.wait_listening();
    closed.wait_listening();

    for (host, enterprise, world) in [
        (remote.host_v4(), remote.v4(), remote.world_v4()),
        (remote.host_v6(), remote.v6(), remote.world_v6()),
    ] {
        let target = SocketAddr::new(host, p.inbound_tcp);
        // enterprise -> inference on the allowed port: a full round trip.
        let ok = ProbeCmd::tcp_connect(target)
            .bind(SocketAddr::new(enterprise, 0))
            .in_netns(remote.netns())
            .run();
        assert!(
            ok.is_ok(),
            "enterprise {enterprise} -> inference {target} is allowed by a rule: {ok}"
        );

        // world -> inference: no rule; the SYN is dropped, the handshake never completes.
        let out = ProbeCmd::tcp_connect(target)
            .bind(SocketAddr::new(world, 0))
            .timeout_ms(DROPPED_MS)
            .in_netns(remote.netns())
            .run();
        out.assert_timeout();
        let src = bound(&out);
        expect_ingress_report(
            &agent,
            &Inbound {
                proto: "tcp",
                src_segment: "world",
                src,
                dst_segment: "inference",
                dst_cgroup: &inf,
                dst: target,
            },
        );
        assert_server_never_saw(&open, src);
    }

    // enterprise -> inference on a port no rule allows (server bound to the veth address).
    let target = SocketAddr::new(remote.host_v4(), p.closed_tcp);
    let out = ProbeCmd::tcp_connect(target)
        .bind(SocketAddr::new(remote.v4(), 0))
        .timeout_ms(DROPPED_MS)
        .in_netns(remote.netns())
        .run();
    out.assert_timeout();
    let src = bound(&out);
    expect_ingress_report(
        &agent,
        &Inbound {
            proto: "tcp",
            src_segment: "enterprise",
            src,
            dst_segment: "inference",
            dst_cgroup: &inf,
            dst: target,
        },
    );
    assert_server_never_saw(&closed, src);

    // The allowed source still gets through afterwards (nothing is blocked wholesale).
    ProbeCmd::tcp_connect(SocketAddr::new(remote.host_v4(), p.inbound_tcp))
        .bind(SocketAddr::new(remote.v4(), 0))
        .in_netns(remote.netns())
        .run()
        .assert_ok();
}

#[test]
fn an_unlabeled_local_process_outside_the_attach_subtree_is_host_and_its_connection_to_a_labeled_server_is_dropped()
 {
    require_agent!();
    let p = Ports {
        inbound_tcp: 27543,
        closed_tcp: 27544,
        inbound_udp: 27545,
    };
    let remote = RemoteHost::new(); // gives this host a non-loopback address of its own
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    let server = ProbeCmd::tcp_listen(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    // The test process's own cgroup is outside the subtree: no connect hook sees these clients.
    for host_ip in [
        "127.0.0.1".parse::<IpAddr>().unwrap(),
        "::1".parse().unwrap(),
        remote.host_v4(),
        remote.host_v6(),
    ] {
        let target = SocketAddr::new(host_ip, p.inbound_tcp);
        let out = ProbeCmd::tcp_connect(target)
            .bind(SocketAddr::new(host_ip, 0))
            .timeout_ms(DROPPED_MS)
            .run();
        assert!(
            out.is_timeout(),
            "host {host_ip} -> inference: no rule allows it, so the SYN must be dropped at the \
             receiver (timeout, not EPERM/ECONNREFUSED): {out}"
        );
        let src = bound(&out);
        expect_ingress_report(
            &agent,
            &Inbound {
                proto: "tcp",
                src_segment: "host",
                src,
                dst_segment: "inference",
                dst_cgroup: &inf,
                dst: target,
            },
        );
        assert_server_never_saw(&server, src);
    }
}

#[test]
fn udp_datagrams_from_a_denied_remote_source_never_reach_a_labeled_echo_server_and_are_reported() {
    require_agent!();
    let p = Ports {
        inbound_tcp: 27546,
        closed_tcp: 27547,
        inbound_udp: 27548,
    };
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    let echo = ProbeCmd::udp_echo(format!("[::]:{}", p.inbound_udp))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();

    for (host, enterprise, world) in [
        (remote.host_v4(), remote.v4(), remote.world_v4()),
        (remote.host_v6(), remote.v6(), remote.world_v6()),
    ] {
        let target = SocketAddr::new(host, p.inbound_udp);
        let ok = ProbeCmd::udp_send(target)
            .bind(SocketAddr::new(enterprise, 0))
            .expect_reply()
            .in_netns(remote.netns())
            .run();
        assert!(
            ok.is_ok(),
            "enterprise {enterprise} -> inference {target}/udp is allowed, echo expected: {ok}"
        );

        let out = ProbeCmd::udp_send(target)
            .bind(SocketAddr::new(world, 0))
            .expect_reply()
            .timeout_ms(DROPPED_MS)
            .in_netns(remote.netns())
            .run();
        out.assert_code(exit::NO_REPLY);
        let src = bound(&out);
        expect_ingress_report(
            &agent,
            &Inbound {
                proto: "udp",
                src_segment: "world",
                src,
                dst_segment: "inference",
                dst_cgroup: &inf,
                dst: target,
            },
        );
        assert_server_never_saw(&echo, src);
    }

    // A port only allowed for tcp is closed to udp from the same enterprise source.
    let target = SocketAddr::new(remote.host_v4(), p.inbound_tcp);
    let udp_on_tcp_port = ProbeCmd::udp_echo(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&inf)
        .spawn();
    udp_on_tcp_port.wait_listening();
    let out = ProbeCmd::udp_send(target)
        .bind(SocketAddr::new(remote.v4(), 0))
        .expect_reply()
        .timeout_ms(DROPPED_MS)
        .in_netns(remote.netns())
        .run();
    out.assert_code(exit::NO_REPLY);
    let src = bound(&out);
    expect_ingress_report(
        &agent,
        &Inbound {
            proto: "udp",
            src_segment: "enterprise",
            src,
            dst_segment: "inference",
            dst_cgroup: &inf,
            dst: target,
        },
    );
    assert_server_never_saw(&udp_on_tcp_port, src);
}

#[test]
fn replies_to_allowed_connections_pass_both_for_a_labeled_client_going_out_and_for_an_allowed_inbound_connection()
 {
    require_agent!();
    let p = Ports {
        inbound_tcp: 27549,
        closed_tcp: 27550,
        inbound_udp: 27551,
    };
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf");
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    let remote_tcp = ProbeCmd::tcp_listen(format!("[::]:{OUTBOUND_TCP}"))
        .in_netns(remote.netns())
        .spawn();
    let remote_udp = ProbeCmd::udp_echo(format!("[::]:{OUTBOUND_UDP}"))
        .in_netns(remote.netns())
        .spawn();
    let inbound = ProbeCmd::tcp_listen(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&inf)
        .spawn();
    let inbound_udp = ProbeCmd::udp_echo(format!("[::]:{}", p.inbound_udp))
        .in_cgroup(&inf)
        .spawn();
    for p in [&remote_tcp, &remote_udp, &inbound, &inbound_udp] {
        p.wait_listening();
    }

    let mut allowed = Vec::new();
    for ip in [remote.v4(), remote.v6()] {
        // Out: the SYN-ACK and the echo come back in through the ingress program.
        let out = ProbeCmd::tcp_connect(SocketAddr::new(ip, OUTBOUND_TCP))
            .in_cgroup(&orch)
            .run();
        assert!(
            out.is_ok(),
            "orchestrator -> enterprise {ip} round trip: {out}"
        );
        allowed.push(out.pid);
        for connected in [false, true] {
            let mut cmd = ProbeCmd::udp_send(SocketAddr::new(ip, OUTBOUND_UDP))
                .in_cgroup(&orch)
                .expect_reply()
                .count(3);
            if connected {
                cmd = cmd.connected();
            }
            let out = cmd.run();
            assert!(
                out.is_ok(),
                "orchestrator -> enterprise {ip}/udp: the echoes must come back in: {out}"
            );
            allowed.push(out.pid);
        }
    }
    for (host, enterprise) in [
        (remote.host_v4(), remote.v4()),
        (remote.host_v6(), remote.v6()),
    ] {
        // In: the server's replies go out, the client's later segments come in.
        let out = ProbeCmd::tcp_connect(SocketAddr::new(host, p.inbound_tcp))
            .bind(SocketAddr::new(enterprise, 0))
            .in_netns(remote.netns())
            .run();
        assert!(
            out.is_ok(),
            "enterprise -> inference {host} round trip: {out}"
        );
        let out = ProbeCmd::udp_send(SocketAddr::new(host, p.inbound_udp))
            .bind(SocketAddr::new(enterprise, 0))
            .expect_reply()
            .count(3)
            .in_netns(remote.netns())
            .run();
        assert!(
            out.is_ok(),
            "enterprise -> inference {host}/udp with echoes: {out}"
        );
    }

    // Nothing of the above was reported: a later denial is, and it is the only line.
    let marker = ProbeCmd::tcp_connect(SocketAddr::new(remote.v4(), p.closed_tcp))
        .in_cgroup(&orch)
        .run();
    agent.assert_not_reported(&allowed, &marker);
    let ingress: Vec<Value> = agent
        .violations()
        .into_iter()
        .filter(|v| v["direction"] == "ingress")
        .collect();
    assert!(
        ingress.is_empty(),
        "allowed connections and their replies must not be reported: {ingress:#?}"
    );
}

#[test]
fn connections_started_inside_the_subtree_are_judged_at_connect_and_not_judged_again_at_the_receiver()
 {
    require_agent!();
    let p = Ports {
        inbound_tcp: 27552,
        closed_tcp: 27553,
        inbound_udp: 27554,
    };
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf");
    let misc = cg.child("misc");
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    let server = ProbeCmd::tcp_listen(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    // orchestrator -> inference is allowed; no rule names `host` -> inference, which the receiver
    // would apply if it re-judged a loopback connection by its local source address.
    let mut allowed = Vec::new();
    for target in [
        format!("127.0.0.1:{}", p.inbound_tcp),
        format!("[::1]:{}", p.inbound_tcp),
        format!("{}:{}", remote.host_v4(), p.inbound_tcp),
    ] {
        let out = ProbeCmd::tcp_connect(&target).in_cgroup(&orch).run();
        assert!(out.is_ok(), "orchestrator -> inference {target}: {out}");
        allowed.push(out.pid);
    }
    // An unlabeled cgroup inside the subtree is `host`: refused at its own connect() (EPERM),
    // not left to time out at the receiver.
    let denied = ProbeCmd::tcp_connect(format!("127.0.0.1:{}", p.inbound_tcp))
        .timeout_ms(5000)
        .in_cgroup(&misc)
        .run();
    agent.expect_denied(
        &denied,
        &Denial {
            proto: "tcp",
            src_segment: "host",
            dst_segment: "inference",
            dst_addr: "127.0.0.1",
            dst_port: p.inbound_tcp,
        },
    );
    agent.assert_not_reported(&allowed, &denied);
    let ingress: Vec<Value> = agent
        .violations()
        .into_iter()
        .filter(|v| v["direction"] == "ingress")
        .collect();
    assert!(
        ingress.is_empty(),
        "connections from inside the subtree must not be judged at the receiver: {ingress:#?}"
    );
}

/// A blocked UDP sender's datagrams are dropped one by one at the receiver, one kernel event
/// each: the flow is reported once, the other drops are folded and counted.
#[test]
fn repeated_drops_of_one_flow_are_reported_once_and_the_rest_counted_as_folded() {
    require_agent!();
    const N: u32 = 20;
    const FOLDED: &str = "ztai_violation_reports_folded_total";
    let p = Ports {
        inbound_tcp: 27555,
        closed_tcp: 27556,
        inbound_udp: 27557,
    };
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    let echo = ProbeCmd::udp_echo(format!("[::]:{}", p.inbound_udp))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();

    let target = SocketAddr::new(remote.host_v4(), p.inbound_udp);
    let out = ProbeCmd::udp_send(target)
        .bind(SocketAddr::new(remote.world_v4(), 0))
        .count(N)
        .in_netns(remote.netns())
        .run();
    assert!(out.is_ok(), "world -> inference: {N} datagrams sent: {out}");
    let src = bound(&out);
    expect_ingress_report(
        &agent,
        &Inbound {
            proto: "udp",
            src_segment: "world",
            src,
            dst_segment: "inference",
            dst_cgroup: &inf,
            dst: target,
        },
    );
    let samples = agent.wait_metric_at_least(FOLDED, &[], f64::from(N - 1), DEFAULT_TIMEOUT);
    assert_eq!(
        sample_value(&samples, FOLDED, &[]),
        Some(f64::from(N - 1)),
        "every drop after the first is folded, no more\n{}",
        agent.diagnostics()
    );
    // The report stream is ordered: once a later denial is in, every line of the flow is too.
    let marker = ProbeCmd::udp_send(SocketAddr::new(remote.host_v4(), p.inbound_udp))
        .bind(SocketAddr::new(remote.world_v4(), 0))
        .in_netns(remote.netns())
        .run();
    expect_ingress_report(
        &agent,
        &Inbound {
            proto: "udp",
            src_segment: "world",
            src: bound(&marker),
            dst_segment: "inference",
            dst_cgroup: &inf,
            dst: target,
        },
    );
    let lines: Vec<Value> = agent
        .violations()
        .into_iter()
        .filter(|v| v["direction"] == "ingress" && v["src"]["port"] == src.port())
        .collect();
    assert_eq!(lines.len(), 1, "one line for the flow: {lines:#?}");
    assert!(lines[0].get("folded").is_none(), "the first line folds nothing: {}", lines[0]);
    assert_server_never_saw(&echo, src);
}

/// A UDP exchange judged at the receiver belongs to the socket it was judged for: when that
/// socket is gone and another segment's socket binds the port, datagrams from the same remote
/// address and port are judged afresh, not passed on the old exchange's verdict.
#[test]
fn udp_from_the_same_remote_port_to_a_new_receiver_on_the_port_is_judged_afresh() {
    require_agent!();
    const SRC_PORT: u16 = 40567;
    let p = Ports {
        inbound_tcp: 27565,
        closed_tcp: 27566,
        inbound_udp: 27567,
    };
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let rag = cg.child("rag");
    let agent = Agent::start_ready(
        &policy(&cg, &remote, &p).cgroups("retrieval", &["rag"]),
        &cg,
    );
    let target = SocketAddr::new(remote.host_v4(), p.inbound_udp);
    let src = SocketAddr::new(remote.v4(), SRC_PORT);
    let inf_echo = ProbeCmd::udp_echo(format!("[::]:{}", p.inbound_udp))
        .in_cgroup(&inf)
        .spawn();
    inf_echo.wait_listening();
    let ok = ProbeCmd::udp_send(target)
        .bind(src)
        .expect_reply()
        .in_netns(remote.netns())
        .run();
    assert!(ok.is_ok(), "enterprise {src} -> inference {target}/udp is allowed: {ok}");
    drop(inf_echo);

    let rag_echo = ProbeCmd::udp_echo(format!("[::]:{}", p.inbound_udp))
        .in_cgroup(&rag)
        .spawn();
    rag_echo.wait_listening();
    let out = ProbeCmd::udp_send(target)
        .bind(src)
        .expect_reply()
        .timeout_ms(DROPPED_MS)
        .in_netns(remote.netns())
        .run();
    out.assert_code(exit::NO_REPLY);
    expect_ingress_report(
        &agent,
        &Inbound {
            proto: "udp",
            src_segment: "enterprise",
            src,
            dst_segment: "retrieval",
            dst_cgroup: &rag,
            dst: target,
        },
    );
    assert_server_never_saw(&rag_echo, src);
}

/// A SYN from a remote client reusing the 4-tuple (its address and source port, the server's
/// address and port) of an earlier allowed connection is judged afresh: the entry that connection
/// left in the kernel's connection table does not speak for the new one. Here the listener on the
/// port changed from `inference` (enterprise may connect) to `retrieval` (no rule), and the same
/// enterprise client address and port connects again: it is dropped and reported. Before the fix
/// the SYN matched the stale allowed entry and connected to retrieval.
#[test]
fn a_remote_syn_reusing_the_4_tuple_of_an_earlier_allowed_connection_is_judged_afresh_and_dropped_when_the_new_listener_is_denied()
 {
    require_agent!();
    let p = Ports {
        inbound_tcp: 27600,
        closed_tcp: 27601,
        inbound_udp: 27602,
    };
    /// The client's fixed source port (in the remote host's own namespace).
    const CLIENT_PORT: u16 = 27603;
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let rag = cg.child("rag");
    let agent = Agent::start_ready(
        &policy(&cg, &remote, &p).cgroups("retrieval", &["rag"]),
        &cg,
    );
    let ends = [
        (remote.host_v4(), remote.v4()),
        (remote.host_v6(), remote.v6()),
    ];

    let inference = ProbeCmd::tcp_listen(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&inf)
        .spawn();
    inference.wait_listening();
    for (host, enterprise) in ends {
        let target = SocketAddr::new(host, p.inbound_tcp);
        // Closed with a RST: no TIME_WAIT on either end, so the 4-tuple can be reused at once.
        let out = ProbeCmd::tcp_connect(target)
            .bind(SocketAddr::new(enterprise, CLIENT_PORT))
            .reset()
            .in_netns(remote.netns())
            .run();
        assert!(
            out.is_ok(),
            "enterprise {enterprise}:{CLIENT_PORT} -> inference {target} is allowed by a rule: {out}"
        );
    }
    // The inference server goes away; a retrieval server takes over the same port.
    drop(inference);
    let retrieval = ProbeCmd::tcp_listen(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&rag)
        .spawn();
    retrieval.wait_listening();

    for (host, enterprise) in ends {
        let target = SocketAddr::new(host, p.inbound_tcp);
        let out = ProbeCmd::tcp_connect(target)
            .bind(SocketAddr::new(enterprise, CLIENT_PORT))
            .reset()
            .timeout_ms(DROPPED_MS)
            .in_netns(remote.netns())
            .run();
        assert!(
            out.is_timeout(),
            "enterprise {enterprise}:{CLIENT_PORT} -> retrieval {target}: no rule allows it, so the \
             SYN must be dropped even though an allowed connection to inference used the same \
             addresses and ports before (timeout expected): {out}"
        );
        let src = bound(&out);
        assert_eq!(src.port(), CLIENT_PORT, "the client reused its port: {out}");
        expect_ingress_report(
            &agent,
            &Inbound {
                proto: "tcp",
                src_segment: "enterprise",
                src,
                dst_segment: "retrieval",
                dst_cgroup: &rag,
                dst: target,
            },
        );
        assert_server_never_saw(&retrieval, src);
    }
}

/// On loopback a SYN follows the connection entry its initiator's egress made for it, once: a
/// labeled client inside the subtree reusing its own 4-tuple is judged at connect only (passes,
/// nothing reported at the receiver), but an unlabeled process outside the subtree reusing that
/// same 4-tuple next is judged at the receiver as `host` and dropped.
#[test]
fn a_loopback_syn_follows_only_the_entry_its_own_initiator_made_so_an_outside_process_reusing_the_4_tuple_is_dropped()
 {
    require_agent!();
    let p = Ports {
        inbound_tcp: 27604,
        closed_tcp: 27605,
        inbound_udp: 27606,
    };
    /// The clients' fixed source port (host namespace, loopback).
    const CLIENT_PORT: u16 = 27607;
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf");
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    let server = ProbeCmd::tcp_listen(format!("[::]:{}", p.inbound_tcp))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    let mut allowed = Vec::new();
    for ip in [
        "127.0.0.1".parse::<IpAddr>().unwrap(),
        "::1".parse().unwrap(),
    ] {
        let target = SocketAddr::new(ip, p.inbound_tcp);
        let client = SocketAddr::new(ip, CLIENT_PORT);
        // orchestrator -> inference is allowed at connect; a rule for `host` -> inference does
        // not exist, so a receiver that judged these SYNs again would drop them.
        for attempt in 1..=2 {
            let out = ProbeCmd::tcp_connect(target)
                .bind(client)
                .reset()
                .in_cgroup(&orch)
                .run();
            assert!(
                out.is_ok(),
                "orchestrator {client} -> inference {target} (attempt {attempt}, same 4-tuple): {out}"
            );
            allowed.push(out.pid);
        }
        // Same 4-tuple from this test's own process, outside the subtree (`host`).
        let out = ProbeCmd::tcp_connect(target)
            .bind(client)
            .reset()
            .timeout_ms(DROPPED_MS)
            .run();
        assert!(
            out.is_timeout(),
            "host {client} -> inference {target}: no rule allows it; the entry of orchestrator's \
             earlier connection on the same 4-tuple must not let this SYN through (timeout \
             expected): {out}"
        );
        let src = bound(&out);
        assert_eq!(src.port(), CLIENT_PORT, "the client reused the port: {out}");
        expect_ingress_report(
            &agent,
            &Inbound {
                proto: "tcp",
                src_segment: "host",
                src,
                dst_segment: "inference",
                dst_cgroup: &inf,
                dst: target,
            },
        );
    }
    for pid in allowed {
        agent.assert_no_violation_from(pid);
    }
    let from_inside: Vec<Value> = agent
        .violations()
        .into_iter()
        .filter(|v| v["direction"] == "ingress" && v["src"]["segment"] != "host")
        .collect();
    assert!(
        from_inside.is_empty(),
        "orchestrator's connections are judged at connect, never at the receiver: {from_inside:#?}"
    );
}

/// Inbound IPv4 of a protocol no rule can name (253, reserved for experiments) is dropped at a
/// labeled receiver and reported, even from a source a rule allows tcp/udp from; an unlabeled
/// receiver under the attach point (`host`) gets the very same packet, and ICMP still reaches the
/// labeled receiver. Raw sockets are judged like any other: cgroup_skb ingress runs in
/// sk_filter() when the packet is queued to the socket.
#[test]
fn inbound_ipv4_that_is_neither_tcp_udp_nor_icmp_is_dropped_at_a_labeled_receiver_and_reported_but_reaches_an_unlabeled_one()
 {
    require_agent!();
    const EXPERIMENTAL: u8 = 253;
    const ICMP: u8 = 1;
    let p = Ports {
        inbound_tcp: 27608,
        closed_tcp: 27609,
        inbound_udp: 27610,
    };
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let misc = cg.child("misc"); // under the attach point, labeled by no segment
    let agent = Agent::start_ready(&policy(&cg, &remote, &p), &cg);
    let IpAddr::V4(host) = remote.host_v4() else {
        unreachable!("host_v4 is IPv4")
    };
    // The labeled receiver drains its protocol-253 socket before its ICMP one on every wake-up.
    let labeled = ProbeCmd::raw_recv(host, &[EXPERIMENTAL, ICMP])
        .in_cgroup(&inf)
        .spawn();
    let unlabeled = ProbeCmd::raw_recv(host, &[EXPERIMENTAL])
        .in_cgroup(&misc)
        .spawn();
    for r in [&labeled, &unlabeled] {
        r.wait_line("\"listening ...\"", DEFAULT_TIMEOUT, |l| {
            l.starts_with("listening ")
        });
    }

    // From the enterprise address: a rule lets it reach inference over tcp and udp, which says
    // nothing about other protocols.
    let from = SocketAddr::new(remote.v4(), 0);
    let sent = ProbeCmd::raw_send(host, EXPERIMENTAL)
        .bind(from)
        .in_netns(remote.netns())
        .run();
    sent.assert_ok();
    let payload = raw_payload(sent.pid);
    // Every raw socket of the protocol bound to the address gets its own copy of the packet.
    unlabeled.wait_line(
        "with the protocol-253 packet (an unlabeled receiver is not judged)",
        DEFAULT_TIMEOUT,
        |l| is_raw_recv_line(l, EXPERIMENTAL, &payload),
    );
    let inf_id = cgroup_id(&inf);
    let v = try_wait_until(DEFAULT_TIMEOUT, || {
        agent
            .violations()
            .into_iter()
            .find(|v| v["direction"] == "ingress" && v["dst"]["cgroup_id"] == inf_id)
    })
    .unwrap_or_else(|| {
        panic!(
            "no ingress report for the labeled receiver's copy of the protocol-{EXPERIMENTAL} \
             packet within {DEFAULT_TIMEOUT:?}; the labeled receiver printed: {:?}\n{}",
            labeled.lines(),
            agent.diagnostics()
        )
    });
    assert_eq!(v["verdict"], "deny", "{v}");
    assert_eq!(v["hook"], "skb_ingress", "{v}");
    assert_eq!(v["proto"], "other", "{v}");
    assert_eq!(v["dst"]["segment"], "inference", "{v}");
    assert_eq!(v["dst"]["cgroup"], inf.proc_path().as_str(), "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("neither TCP, UDP nor ICMP")),
        "the reason should say the protocol cannot be judged: {v}"
    );

    // ICMP passes: an echo request sent after the drop was reported reaches the labeled receiver,
    // which on that wake-up first drains its protocol-253 socket. Had the 253 packet been queued
    // there (it was judged before the report, so before this request was even sent), it would
    // be printed before the ICMP line.
    let marker = ProbeCmd::raw_send(host, ICMP)
        .bind(from)
        .in_netns(remote.netns())
        .run();
    marker.assert_ok();
    let marker_payload = raw_payload(marker.pid);
    labeled.wait_line(
        "with the ICMP echo request (ICMP is not judged)",
        DEFAULT_TIMEOUT,
        |l| is_raw_recv_line(l, ICMP, &marker_payload),
    );
    let got: Vec<String> = labeled
        .lines()
        .into_iter()
        .filter(|l| l.starts_with(&format!("recv {EXPERIMENTAL} ")))
        .collect();
    assert!(
        got.is_empty(),
        "the labeled receiver must never get the protocol-{EXPERIMENTAL} packet: {got:?}"
    );
    let ingress: Vec<Value> = agent
        .violations()
        .into_iter()
        .filter(|v| v["direction"] == "ingress")
        .collect();
    assert_eq!(
        ingress.len(),
        1,
        "only the labeled receiver's copy is reported (not the unlabeled one's, not ICMP): \
         {ingress:#?}"
    );
}

/// The mark that lets a SYN follow its own initiator's entry ends when the initiator gets an
/// answer: here a RST, since nothing listens yet. A process outside the subtree that later reuses
/// that 4-tuple towards a labeled listener is judged at the receiver (dropped, reported), not let
/// through on the mark.
#[test]
fn a_refused_connect_leaves_no_mark_an_outside_process_reusing_its_4_tuple_can_follow() {
    require_agent!();
    const PORT: u16 = 27615;
    const CLIENT_PORT: u16 = 27616;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch"])
            .cgroups("inference", &["inf"])
            .allow_all_ports("orchestrator", "host")
            .allow_all_ports("orchestrator", "inference"),
        &cg,
    );
    let target = SocketAddr::from(([127, 0, 0, 1], PORT));
    let client = SocketAddr::from(([127, 0, 0, 1], CLIENT_PORT));
    // Nothing listens: orchestrator -> host is allowed at connect, and the kernel answers RST.
    ProbeCmd::tcp_connect(target)
        .bind(client)
        .reset()
        .in_cgroup(&orch)
        .run()
        .assert_code(exit::ECONNREFUSED);
    let server = ProbeCmd::tcp_listen(target).in_cgroup(&inf).spawn();
    server.wait_listening();
    let out = ProbeCmd::tcp_connect(target)
        .bind(client)
        .reset()
        .timeout_ms(DROPPED_MS)
        .run();
    out.assert_code(exit::TIMEOUT);
    let v = agent.wait_violation(DEFAULT_TIMEOUT, |v| {
        v["direction"] == "ingress" && v["src"]["port"] == CLIENT_PORT
    });
    assert_eq!(
        (v["src"]["segment"].as_str(), v["dst"]["segment"].as_str()),
        (Some("host"), Some("inference")),
        "{v}"
    );
    assert_server_never_saw(&server, client);
}
