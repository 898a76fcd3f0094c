//! Per-flow counters: every packet is counted once (loopback traffic crosses two cgroup_skb hooks
//! but is not counted twice), bytes are L3 lengths (IP header included), a denied connect/sendto
//! counts as one packet of 0 bytes and an ingress-dropped packet counts with its size.
//!
//! Counters are read from /metrics (series by src/dst segment, proto, rule port, direction,
//! verdict). The agent refreshes what it serves about once a second; to read a value that
//! certainly includes all the traffic of a step, each step ends with a *barrier*: a denied
//! connect from a dedicated `marker` segment, whose own series is polled until it shows that
//! attempt. Everything before it is then in the scrape, so values are compared exactly.
//!
//! Fixed policy ports of this file: 27570-27579.

use std::net::SocketAddr;
use std::time::Duration;

use ztai_tests::metrics::{FlowCounts, Sample};
use ztai_tests::{Agent, Cgroup, Policy, ProbeCmd, RemoteHost, TestCgroup, require_agent};

const SCRAPE_DEADLINE: Duration = Duration::from_secs(15);

/// Denied connects from the `marker` segment, each followed by a scrape that shows it.
struct Barrier<'a> {
    agent: &'a Agent,
    marker: Cgroup,
    sent: u64,
}

impl<'a> Barrier<'a> {
    fn new(agent: &'a Agent, marker: Cgroup) -> Barrier<'a> {
        Barrier {
            agent,
            marker,
            sent: 0,
        }
    }

    /// Returns a scrape taken after everything that happened before this call.
    #[track_caller]
    fn scrape(&mut self) -> Vec<Sample> {
        ProbeCmd::tcp_connect("127.0.0.1:9")
            .in_cgroup(&self.marker)
            .run()
            .assert_eperm();
        self.sent += 1;
        let series = [
            ("src_segment", "marker"),
            ("dst_segment", "host"),
            ("proto", "tcp"),
            ("direction", "orig"),
            ("verdict", "deny"),
        ];
        self.agent.wait_metric_at_least(
            "ztai_flow_packets_total",
            &series,
            self.sent as f64,
            SCRAPE_DEADLINE,
        )
    }
}

/// The segments every scenario here uses, the barrier's `marker` included (no rules yet).
fn policy(cg: &TestCgroup) -> Policy {
    Policy::enforce(cg)
        .cgroups("marker", &["marker"])
        .cgroups("orchestrator", &["orch"])
        .cgroups("inference", &["inf"])
}

fn series<'a>(
    src: &'a str,
    dst: &'a str,
    proto: &'a str,
    port: &'a str,
    verdict: &'a str,
) -> [(&'static str, &'a str); 5] {
    [
        ("src_segment", src),
        ("dst_segment", dst),
        ("proto", proto),
        ("port", port),
        ("verdict", verdict),
    ]
}

/// L3 length of datagram `i` (1-based) of `ztai-probe udp-send --count` from process `pid`.
fn datagram_len(pid: u32, i: u32, ipv6: bool) -> u64 {
    let payload = format!("ztai-probe datagram {pid} {i}").len() as u64;
    payload + 8 + if ipv6 { 40 } else { 20 }
}

#[test]
fn n_udp_datagrams_echoed_between_two_local_segments_count_exactly_n_orig_and_n_reply_packets_with_exact_bytes()
 {
    require_agent!();
    const V4_PORT: u16 = 27570;
    const V6_PORT: u16 = 27571;
    const N: u32 = 25;
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let agent = Agent::start_ready(
        &policy(&cg).allow(
            "orchestrator",
            "inference",
            &[format!("{V4_PORT}/udp"), format!("{V6_PORT}/udp")],
        ),
        &cg,
    );
    let mut barrier = Barrier::new(&agent, cg.child("marker"));
    let echo4 = ProbeCmd::udp_echo(format!("127.0.0.1:{V4_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let echo6 = ProbeCmd::udp_echo(format!("[::1]:{V6_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    echo4.wait_listening();
    echo6.wait_listening();

    let mut pids = Vec::new();
    for (target, ipv6) in [
        (format!("127.0.0.1:{V4_PORT}"), false),
        (format!("[::1]:{V6_PORT}"), true),
    ] {
        let out = ProbeCmd::udp_send(&target)
            .expect_reply()
            .count(N)
            .in_cgroup(&orch)
            .run();
        assert!(out.is_ok(), "{N} datagrams with echo to {target}: {out}");
        pids.push((out.pid, ipv6));
    }
    let samples = barrier.scrape();
    for ((pid, ipv6), port) in pids.into_iter().zip([V4_PORT, V6_PORT]) {
        let port = port.to_string();
        let got = FlowCounts::from_samples(
            &samples,
            &series("orchestrator", "inference", "udp", &port, "allow"),
        );
        let bytes: u64 = (1..=N).map(|i| datagram_len(pid, i, ipv6)).sum();
        assert_eq!(
            got,
            FlowCounts {
                orig_packets: N.into(),
                orig_bytes: bytes,
                reply_packets: N.into(),
                reply_bytes: bytes,
            },
            "{N} datagrams and {N} echoes over loopback ({}) must be counted once each, with \
             their IP lengths (orig = orchestrator -> inference, reply = the echoes)\n{}",
            if ipv6 { "IPv6" } else { "IPv4" },
            agent.diagnostics()
        );
    }
}

#[test]
fn a_tcp_upload_of_a_million_bytes_counts_its_bytes_once_plus_at_most_100_bytes_of_headers_per_packet()
 {
    require_agent!();
    const PORT: u16 = 27572;
    const K: u64 = 1_000_000;
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let agent = Agent::start_ready(
        &policy(&cg).allow("orchestrator", "inference", &[format!("{PORT}/tcp")]),
        &cg,
    );
    let mut barrier = Barrier::new(&agent, cg.child("marker"));
    let server = ProbeCmd::tcp_listen(format!("127.0.0.1:{PORT}"))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{PORT}"))
        .send_bytes(K)
        .in_cgroup(&orch)
        .run();
    assert!(out.is_ok(), "upload of {K} bytes: {out}");
    let sent = out
        .sent_bytes()
        .unwrap_or_else(|| panic!("no `sent` line: {out}"));
    assert!(sent >= K);

    let port = PORT.to_string();
    let want = series("orchestrator", "inference", "tcp", &port, "allow");
    // The connection's last packets (FIN/ACK) may trail the probe's exit: barrier until the
    // upload is fully in, then judge that scrape.
    let got = loop {
        let c = FlowCounts::from_samples(&barrier.scrape(), &want);
        if c.orig_bytes >= sent || barrier.sent >= 10 {
            break c;
        }
    };
    assert!(
        got.orig_bytes >= sent,
        "orig_bytes {} < {sent} bytes written on the connection: {got:?}\n{}",
        got.orig_bytes,
        agent.diagnostics()
    );
    assert!(got.orig_packets >= 1, "{got:?}");
    assert!(
        got.orig_bytes <= sent + 100 * got.orig_packets,
        "orig_bytes {} is more than the {sent} bytes written plus 100 bytes of headers for each \
         of the {} counted packets: counted twice?\n{got:?}\n{}",
        got.orig_bytes,
        got.orig_packets,
        agent.diagnostics()
    );
    // The way back carried only the handshake, ACKs and the short acknowledgement line.
    assert!(got.reply_packets >= 1, "{got:?}");
    assert!(
        got.reply_bytes <= 100 * got.reply_packets + 64,
        "reply_bytes {} for {} packets of ACKs and one short line: {got:?}",
        got.reply_bytes,
        got.reply_packets
    );
    assert!(
        got.reply_bytes < sent / 10,
        "the reply direction must not carry the upload: {got:?}"
    );
}

#[test]
fn m_denied_connects_and_sendtos_count_exactly_m_packets_of_zero_bytes_with_verdict_deny() {
    require_agent!();
    const ALLOWED: u16 = 27575;
    const DENIED_TCP: u16 = 27573;
    const DENIED_UDP: u16 = 27574;
    const M: u64 = 7;
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let agent = Agent::start_ready(
        &policy(&cg).allow(
            "orchestrator",
            "inference",
            &[format!("{ALLOWED}/tcp"), format!("{ALLOWED}/udp")],
        ),
        &cg,
    );
    let mut barrier = Barrier::new(&agent, cg.child("marker"));
    let tcp = ProbeCmd::tcp_listen(format!("[::]:{DENIED_TCP}"))
        .in_cgroup(&inf)
        .spawn();
    let udp = ProbeCmd::udp_echo(format!("[::]:{DENIED_UDP}"))
        .in_cgroup(&inf)
        .spawn();
    tcp.wait_listening();
    udp.wait_listening();

    for i in 0..M {
        let target = if i % 2 == 0 {
            format!("127.0.0.1:{DENIED_TCP}")
        } else {
            format!("[::1]:{DENIED_TCP}")
        };
        ProbeCmd::tcp_connect(&target)
            .in_cgroup(&orch)
            .run()
            .assert_eperm();
        let mut cmd = ProbeCmd::udp_send(format!("127.0.0.1:{DENIED_UDP}")).in_cgroup(&orch);
        if i % 2 == 1 {
            cmd = cmd.connected();
        }
        cmd.run().assert_eperm();
    }
    let samples = barrier.scrape();
    let zero_bytes_m_packets = FlowCounts {
        orig_packets: M,
        orig_bytes: 0,
        reply_packets: 0,
        reply_bytes: 0,
    };
    for proto in ["tcp", "udp"] {
        // Ports no rule names are labeled "other".
        let got = FlowCounts::from_samples(
            &samples,
            &series("orchestrator", "inference", proto, "other", "deny"),
        );
        assert_eq!(
            got,
            zero_bytes_m_packets,
            "{M} denied {proto} attempts: {M} packets of 0 bytes\n{}",
            agent.diagnostics()
        );
        let allowed = FlowCounts::from_samples(
            &samples,
            &series("orchestrator", "inference", proto, "other", "allow"),
        );
        assert_eq!(allowed, FlowCounts::default(), "nothing was allowed");
    }
}

#[test]
fn traffic_with_remote_peers_counts_each_packet_once_in_both_directions_and_dropped_datagrams_with_their_size()
 {
    require_agent!();
    const OUT_UDP: u16 = 27576;
    const IN_UDP: u16 = 27577;
    const N: u32 = 10;
    const M: u32 = 6;
    let remote = RemoteHost::new();
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let agent = Agent::start_ready(
        &policy(&cg)
            .cidrs("enterprise", &[remote.v4_cidr(), remote.v6_cidr()])
            .allow("orchestrator", "enterprise", &[format!("{OUT_UDP}/udp")])
            .allow("enterprise", "inference", &[format!("{IN_UDP}/udp")]),
        &cg,
    );
    let mut barrier = Barrier::new(&agent, cg.child("marker"));
    let remote_echo = ProbeCmd::udp_echo(format!("[::]:{OUT_UDP}"))
        .in_netns(remote.netns())
        .spawn();
    let local_echo = ProbeCmd::udp_echo(format!("[::]:{IN_UDP}"))
        .in_cgroup(&inf)
        .spawn();
    remote_echo.wait_listening();
    local_echo.wait_listening();

    // Out: labeled client -> remote echo server.
    let out = ProbeCmd::udp_send(SocketAddr::new(remote.v4(), OUT_UDP))
        .expect_reply()
        .count(N)
        .in_cgroup(&orch)
        .run();
    assert!(out.is_ok(), "{out}");
    let out_pid = out.pid;
    // In: remote enterprise client -> labeled echo server (judged at ingress, allowed).
    let inb = ProbeCmd::udp_send(SocketAddr::new(remote.host_v4(), IN_UDP))
        .bind(SocketAddr::new(remote.v4(), 0))
        .expect_reply()
        .count(N)
        .in_netns(remote.netns())
        .run();
    assert!(inb.is_ok(), "{inb}");
    let in_pid = inb.pid;
    // Dropped: world -> labeled echo server, no replies.
    let dropped = ProbeCmd::udp_send(SocketAddr::new(remote.host_v4(), IN_UDP))
        .bind(SocketAddr::new(remote.world_v4(), 0))
        .count(M)
        .in_netns(remote.netns())
        .run();
    assert!(
        dropped.is_ok(),
        "sending (without waiting for replies) succeeds: {dropped}"
    );
    let dropped_pid = dropped.pid;

    let samples = barrier.scrape();
    let counts = |src, dst, port: &str, verdict| {
        FlowCounts::from_samples(&samples, &series(src, dst, "udp", port, verdict))
    };
    let out_bytes: u64 = (1..=N).map(|i| datagram_len(out_pid, i, false)).sum();
    let in_bytes: u64 = (1..=N).map(|i| datagram_len(in_pid, i, false)).sum();
    let dropped_bytes: u64 = (1..=M).map(|i| datagram_len(dropped_pid, i, false)).sum();
    let checks = [
        (
            "labeled client -> remote echo server: N datagrams out, N echoes back (the echoes \
             arrive through the client's ingress hook)",
            counts("orchestrator", "enterprise", &OUT_UDP.to_string(), "allow"),
            FlowCounts {
                orig_packets: N.into(),
                orig_bytes: out_bytes,
                reply_packets: N.into(),
                reply_bytes: out_bytes,
            },
        ),
        (
            "remote client -> labeled echo server: N datagrams in (judged at ingress), N echoes \
             out (through the server's egress hook)",
            counts("enterprise", "inference", &IN_UDP.to_string(), "allow"),
            FlowCounts {
                orig_packets: N.into(),
                orig_bytes: in_bytes,
                reply_packets: N.into(),
                reply_bytes: in_bytes,
            },
        ),
        (
            "M datagrams from world dropped at ingress: counted with their size, no replies",
            counts("world", "inference", "other", "deny"),
            FlowCounts {
                orig_packets: M.into(),
                orig_bytes: dropped_bytes,
                reply_packets: 0,
                reply_bytes: 0,
            },
        ),
    ];
    let wrong: Vec<String> = checks
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, want)| format!("{what} (N={N}, M={M}):\n   got {got:?}\n  want {want:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "flow counters with remote peers are wrong:\n{}\n{}",
        wrong.join("\n"),
        agent.diagnostics()
    );
}
