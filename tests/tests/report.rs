//! The violation report: one JSON line on the agent's stdout per denial, field by field.
//!
//! Fixed policy ports of this file: 27510-27511, 27520-27521, 27530-27531.

use serde_json::Value;

use ztai_tests::time::{now_unix, parse_rfc3339};
use ztai_tests::{Agent, Cgroup, Policy, ProbeCmd, ProbeOutcome, TestCgroup, require_agent};

fn policy(cg: &TestCgroup, allowed: &str) -> Policy {
    Policy::enforce(cg)
        .cgroups("orchestrator", &["orch*"])
        .cgroups("inference", &["inf/**"])
        .allow("orchestrator", "inference", &[allowed])
}

/// Checks every field of a denial line from a probe that bound its socket to `out.bound_addr()`.
#[track_caller]
fn assert_full_report(
    v: &Value,
    out: &ProbeOutcome,
    orch: &Cgroup,
    proto: &str,
    dst_ip: &str,
    dst_port: u16,
) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    for key in [
        "ts",
        "verdict",
        "direction",
        "proto",
        "src",
        "dst",
        "reason",
    ] {
        assert!(obj.contains_key(key), "missing key {key:?}: {v}");
    }
    let ts = v["ts"]
        .as_str()
        .unwrap_or_else(|| panic!("ts is not a string: {v}"));
    let t = parse_rfc3339(ts).unwrap_or_else(|| panic!("ts {ts:?} is not RFC 3339: {v}"));
    assert!(
        (now_unix() - t).abs() < 120.0,
        "ts {ts:?} is not close to now: {v}"
    );

    assert_eq!(v["verdict"], "deny", "{v}");
    assert_eq!(v["direction"], "egress", "{v}");
    assert_eq!(v["proto"], proto, "{v}");

    let bound = out
        .bound_addr()
        .expect("the probe printed its bound address");
    let src = &v["src"];
    assert_eq!(src["segment"], "orchestrator", "src.segment: {v}");
    assert_eq!(
        src["cgroup"],
        orch.proc_path().as_str(),
        "src.cgroup (as in /proc/<pid>/cgroup): {v}"
    );
    assert_eq!(src["pid"], out.pid, "src.pid is the probe's pid: {v}");
    assert_eq!(src["comm"], "ztai-probe", "src.comm: {v}");
    // SAFETY: getuid cannot fail.
    assert_eq!(src["uid"], unsafe { libc::getuid() }, "src.uid: {v}");
    assert_eq!(
        src["addr"],
        bound.ip().to_string().as_str(),
        "src.addr is the bound address: {v}"
    );
    assert_eq!(src["port"], bound.port(), "src.port is the bound port: {v}");

    let dst = &v["dst"];
    assert_eq!(dst["segment"], "inference", "dst.segment: {v}");
    assert_eq!(dst["addr"], dst_ip, "dst.addr: {v}");
    assert_eq!(dst["port"], dst_port, "dst.port: {v}");

    assert_eq!(
        v["reason"],
        format!("no rule allows orchestrator -> inference {proto}/{dst_port}").as_str(),
        "reason: {v}"
    );
}

/// After a later denial is reported, exactly one line names `pid`.
#[track_caller]
fn assert_reported_once(agent: &Agent, pid: u32, marker: &ProbeOutcome) {
    marker.assert_eperm();
    agent.wait_violation_from(marker.pid);
    let n = agent
        .violations()
        .iter()
        .filter(|v| v["src"]["pid"] == pid)
        .count();
    assert_eq!(
        n,
        1,
        "one denial must produce exactly one line (pid {pid})\n{}",
        agent.diagnostics()
    );
}

#[test]
fn a_tcp_denial_is_reported_as_one_json_line_with_every_field() {
    require_agent!();
    const ALLOWED: u16 = 27510;
    const DENIED: u16 = 27511;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(&policy(&cg, &format!("{ALLOWED}/tcp")), &cg);
    let server = ProbeCmd::tcp_listen(format!("127.0.0.1:{DENIED}"))
        .in_cgroup(&inf)
        .spawn();
    server.wait_listening();

    let out = ProbeCmd::tcp_connect(format!("127.0.0.1:{DENIED}"))
        .bind("127.0.0.1:0")
        .in_cgroup(&orch)
        .run();
    out.assert_eperm();
    let v = agent.wait_violation_from(out.pid);
    assert_full_report(&v, &out, &orch, "tcp", "127.0.0.1", DENIED);

    let marker = ProbeCmd::tcp_connect(format!("127.0.0.1:{DENIED}"))
        .in_cgroup(&orch)
        .run();
    assert_reported_once(&agent, out.pid, &marker);
}

#[test]
fn a_udp_denial_is_reported_as_one_json_line_with_every_field() {
    require_agent!();
    const ALLOWED: u16 = 27520;
    const DENIED: u16 = 27521;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(&policy(&cg, &format!("{ALLOWED}/udp")), &cg);
    let echo = ProbeCmd::udp_echo(format!("127.0.0.1:{DENIED}"))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();

    // Unconnected sendto() from a bound socket.
    let out = ProbeCmd::udp_send(format!("127.0.0.1:{DENIED}"))
        .bind("127.0.0.1:0")
        .in_cgroup(&orch)
        .run();
    out.assert_eperm();
    let v = agent.wait_violation_from(out.pid);
    assert_full_report(&v, &out, &orch, "udp", "127.0.0.1", DENIED);

    let marker = ProbeCmd::udp_send(format!("127.0.0.1:{DENIED}"))
        .in_cgroup(&orch)
        .run();
    assert_reported_once(&agent, out.pid, &marker);
}

#[test]
fn a_v4_mapped_destination_is_reported_with_its_ipv4_address() {
    require_agent!();
    const ALLOWED: u16 = 27530;
    const DENIED: u16 = 27531;
    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let inf = cg.child("inf/pod-0");
    let agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .allow(
                "orchestrator",
                "inference",
                &[format!("{ALLOWED}/tcp"), format!("{ALLOWED}/udp")],
            ),
        &cg,
    );
    let tcp = ProbeCmd::tcp_listen(format!("[::]:{DENIED}"))
        .in_cgroup(&inf)
        .spawn();
    let udp = ProbeCmd::udp_echo(format!("[::]:{DENIED}"))
        .in_cgroup(&inf)
        .spawn();
    tcp.wait_listening();
    udp.wait_listening();

    let target = format!("[::ffff:127.0.0.1]:{DENIED}");
    let outs = [
        ("tcp", ProbeCmd::tcp_connect(&target).in_cgroup(&orch).run()),
        ("udp", ProbeCmd::udp_send(&target).in_cgroup(&orch).run()),
        (
            "udp",
            ProbeCmd::udp_send(&target)
                .connected()
                .in_cgroup(&orch)
                .run(),
        ),
    ];
    for (proto, out) in &outs {
        out.assert_eperm();
        let v = agent.wait_violation_from(out.pid);
        assert_eq!(v["proto"], *proto, "{v}");
        assert_eq!(
            v["dst"]["addr"], "127.0.0.1",
            "a v4-mapped destination is reported as IPv4: {v}"
        );
        assert_eq!(v["dst"]["port"], DENIED, "{v}");
        assert_eq!(v["dst"]["segment"], "inference", "{v}");
        assert_eq!(v["src"]["segment"], "orchestrator", "{v}");
        assert_eq!(
            v["reason"],
            format!("no rule allows orchestrator -> inference {proto}/{DENIED}").as_str(),
            "{v}"
        );
    }
}
