//! `ztai-agent flows`: reads the running agent's live flow table from its control socket
//! (`run --control-socket PATH`, root-only) and prints it as JSON (`--json`) or as a table
//! (`--once`); it attaches nothing, and says clearly when no agent listens.
//!
//! Fixed policy ports of this file: 27590-27594.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

use serde_json::Value;

use ztai_tests::bpf;
use ztai_tests::{
    Agent, Policy, ProbeCmd, TempDir, TestCgroup, cgroup2_mount, require_agent, run_agent_cli,
    try_wait_until,
};

const POLL_DEADLINE: Duration = Duration::from_secs(15);

/// L3 length of datagram `i` (1-based) of `ztai-probe udp-send --count` from process `pid`.
fn datagram_len(pid: u32, i: u32, ipv6: bool) -> u64 {
    let payload = format!("ztai-probe datagram {pid} {i}").len() as u64;
    payload + 8 + if ipv6 { 40 } else { 20 }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number: {v}"))
}

/// The flow of `doc` with this destination port, proto and verdict, if listed.
fn find_flow<'a>(doc: &'a Value, port: u16, proto: &str, verdict: &str) -> Option<&'a Value> {
    doc["flows"]
        .as_array()?
        .iter()
        .find(|f| f["dst_port"] == port && f["proto"] == proto && f["verdict"] == verdict)
}

fn policy(cg: &TestCgroup, allowed: &[String]) -> Policy {
    Policy::enforce(cg)
        .cgroups("orchestrator", &["orch"])
        .cgroups("inference", &["inf"])
        .allow("orchestrator", "inference", allowed)
}

/// Polls `flows --json` until `done` holds for the document; returns it.
#[track_caller]
fn wait_flows(agent: &Agent, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let r = try_wait_until(POLL_DEADLINE, || {
        let doc = agent.flows_json();
        let ok = done(&doc);
        last = doc;
        ok.then(|| last.clone())
    });
    r.unwrap_or_else(|| {
        panic!(
            "`flows --json` did not show {what} within {POLL_DEADLINE:?}; last document:\n{}\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            agent.diagnostics()
        )
    })
}

#[test]
fn flows_json_lists_the_flows_that_ran_sorted_by_bytes_with_their_segments_ports_verdicts_and_counters()
 {
    require_agent!();
    const UDP_PORT: u16 = 27590;
    const TCP_PORT: u16 = 27591;
    const DENIED: u16 = 27592;
    const N: u32 = 12;
    const M: u64 = 3;
    const K: u64 = 200_000;
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let agent = Agent::start_ready(
        &policy(&cg, &[format!("{UDP_PORT}/udp"), format!("{TCP_PORT}/tcp")]),
        &cg,
    );

    // The socket is root-only.
    let meta = std::fs::symlink_metadata(agent.control_socket()).unwrap_or_else(|e| {
        panic!(
            "no control socket at {}: {e}",
            agent.control_socket().display()
        )
    });
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.uid(), 0, "the control socket belongs to root");
    assert_eq!(
        meta.mode() & 0o077,
        0,
        "the control socket must not be accessible to group/others: mode {:o}",
        meta.mode() & 0o7777
    );

    let echo = ProbeCmd::udp_echo(format!("127.0.0.1:{UDP_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let sink = ProbeCmd::tcp_listen(format!("127.0.0.1:{TCP_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let closed = ProbeCmd::tcp_listen(format!("127.0.0.1:{DENIED}"))
        .in_cgroup(&inf)
        .spawn();
    for p in [&echo, &sink, &closed] {
        p.wait_listening();
    }
    let udp = ProbeCmd::udp_send(format!("127.0.0.1:{UDP_PORT}"))
        .expect_reply()
        .count(N)
        .in_cgroup(&orch)
        .run();
    assert!(udp.is_ok(), "{udp}");
    let upload = ProbeCmd::tcp_connect(format!("127.0.0.1:{TCP_PORT}"))
        .send_bytes(K)
        .in_cgroup(&orch)
        .run();
    assert!(upload.is_ok(), "{upload}");
    let sent = upload.sent_bytes().expect("`sent` line");
    for _ in 0..M {
        ProbeCmd::tcp_connect(format!("127.0.0.1:{DENIED}"))
            .in_cgroup(&orch)
            .run()
            .assert_eperm();
    }

    let attached_before = bpf::attached_counts(&cg.path()).expect("BPF_PROG_QUERY");
    let doc = wait_flows(&agent, "the udp, tcp and denied flows", |d| {
        find_flow(d, UDP_PORT, "udp", "allow")
            .is_some_and(|f| u(f, "orig_packets") >= N.into() && u(f, "reply_packets") >= N.into())
            && find_flow(d, TCP_PORT, "tcp", "allow").is_some_and(|f| u(f, "orig_bytes") >= sent)
            && find_flow(d, DENIED, "tcp", "deny").is_some_and(|f| u(f, "orig_packets") >= M)
    });
    let show = || serde_json::to_string_pretty(&doc).unwrap_or_default();
    assert_eq!(
        bpf::attached_counts(&cg.path()).expect("BPF_PROG_QUERY"),
        attached_before,
        "`flows` must attach nothing"
    );

    // The document.
    assert_eq!(doc["policy_name"], "t", "{}", show());
    assert_eq!(doc["ready"], true, "{}", show());
    assert_eq!(doc["labeled_cgroups"], 2, "{}", show());
    assert_eq!(
        doc["segments"],
        serde_json::json!(["orchestrator", "inference"]),
        "{}",
        show()
    );
    assert!(
        doc["totals"]["denied"].as_u64().is_some_and(|d| d >= M),
        "totals.denied counts the {M} denials: {}",
        show()
    );

    // Each flow, field by field.
    let bytes: u64 = (1..=N).map(|i| datagram_len(udp.pid, i, false)).sum();
    let expected = [
        (UDP_PORT, "udp", "allow", UDP_PORT.to_string()),
        (TCP_PORT, "tcp", "allow", TCP_PORT.to_string()),
        (DENIED, "tcp", "deny", "other".to_string()),
    ];
    for (port, proto, verdict, label) in &expected {
        let f = find_flow(&doc, *port, proto, verdict).expect("polled for");
        for (k, want) in [
            ("src_segment", "orchestrator"),
            ("dst_segment", "inference"),
            ("dst_addr", "127.0.0.1"),
            ("port_label", label.as_str()),
        ] {
            assert_eq!(f[k], want, "{k} of the {proto}/{port} {verdict} flow: {f}");
        }
    }
    let f = find_flow(&doc, UDP_PORT, "udp", "allow").unwrap();
    assert_eq!(
        (
            u(f, "orig_packets"),
            u(f, "orig_bytes"),
            u(f, "reply_packets"),
            u(f, "reply_bytes")
        ),
        (N.into(), bytes, N.into(), bytes),
        "{N} datagrams and {N} echoes, each counted once with its IP length: {f}"
    );
    let f = find_flow(&doc, TCP_PORT, "tcp", "allow").unwrap();
    assert!(
        u(f, "orig_bytes") <= sent + 100 * u(f, "orig_packets"),
        "the {sent}-byte upload counted with at most 100 header bytes per packet: {f}"
    );
    let f = find_flow(&doc, DENIED, "tcp", "deny").unwrap();
    assert_eq!(
        (
            u(f, "orig_packets"),
            u(f, "orig_bytes"),
            u(f, "reply_packets"),
            u(f, "reply_bytes")
        ),
        (M, 0, 0, 0),
        "{M} denied connects: {M} packets of 0 bytes: {f}"
    );

    // Sorted by bytes (both directions), busiest first: the upload leads.
    let flows = doc["flows"].as_array().expect("flows list");
    let totals: Vec<u64> = flows
        .iter()
        .map(|f| u(f, "orig_bytes") + u(f, "reply_bytes"))
        .collect();
    assert!(
        totals.windows(2).all(|w| w[0] >= w[1]),
        "flows must be sorted by bytes, busiest first: {totals:?}\n{}",
        show()
    );
    assert_eq!(
        flows[0]["dst_port"],
        TCP_PORT,
        "the upload is the busiest flow: {}",
        show()
    );
}

#[test]
fn flows_once_prints_a_table_with_one_row_per_flow_in_the_order_of_the_json() {
    require_agent!();
    const UDP_PORT: u16 = 27593;
    const DENIED: u16 = 27594;
    let cg = TestCgroup::new();
    let (orch, inf) = (cg.child("orch"), cg.child("inf"));
    let agent = Agent::start_ready(&policy(&cg, &[format!("{UDP_PORT}/udp")]), &cg);
    let echo = ProbeCmd::udp_echo(format!("[::1]:{UDP_PORT}"))
        .in_cgroup(&inf)
        .spawn();
    let closed = ProbeCmd::tcp_listen(format!("127.0.0.1:{DENIED}"))
        .in_cgroup(&inf)
        .spawn();
    echo.wait_listening();
    closed.wait_listening();
    let out = ProbeCmd::udp_send(format!("[::1]:{UDP_PORT}"))
        .expect_reply()
        .count(4)
        .in_cgroup(&orch)
        .run();
    assert!(out.is_ok(), "{out}");
    ProbeCmd::tcp_connect(format!("127.0.0.1:{DENIED}"))
        .in_cgroup(&orch)
        .run()
        .assert_eperm();
    let doc = wait_flows(&agent, "both flows", |d| {
        find_flow(d, UDP_PORT, "udp", "allow").is_some_and(|f| u(f, "reply_packets") >= 4)
            && find_flow(d, DENIED, "tcp", "deny").is_some()
    });

    let table = agent.flows_cli(&["--once"]);
    assert!(table.status.success(), "{table}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    let header = lines
        .iter()
        .position(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            t.starts_with(&["SRC", "DST", "ADDR:PORT", "PROTO", "VERDICT"])
        })
        .unwrap_or_else(|| panic!("no column header line in the table:\n{table}"));
    let rows: Vec<Vec<&str>> = lines[header + 1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let row_of = |addr: &str, proto: &str, verdict: &str| {
        rows.iter().position(|r| {
            r.len() >= 5 && r[..5] == ["orchestrator", "inference", addr, proto, verdict]
        })
    };
    let udp_row = row_of(
        &SocketAddr::new("::1".parse().unwrap(), UDP_PORT).to_string(),
        "udp",
        "allow",
    )
    .unwrap_or_else(|| {
        panic!("no row `orchestrator inference [::1]:{UDP_PORT} udp allow`:\n{table}")
    });
    let deny_row = row_of(&format!("127.0.0.1:{DENIED}"), "tcp", "deny").unwrap_or_else(|| {
        panic!("no row `orchestrator inference 127.0.0.1:{DENIED} tcp deny`:\n{table}")
    });
    assert!(
        udp_row < deny_row,
        "the table is sorted by bytes like the JSON (the denied flow has 0 bytes):\n{table}"
    );
    assert_eq!(
        rows.len(),
        doc["flows"].as_array().map_or(0, Vec::len),
        "one row per flow of the JSON document:\n{table}\n{doc}"
    );
}

#[test]
fn flows_fails_with_a_clear_error_and_attaches_nothing_when_no_agent_listens() {
    require_agent!();
    let mount = cgroup2_mount();
    let root_before = bpf::attached_counts(&mount).expect("BPF_PROG_QUERY on the cgroup2 root");
    let dir = TempDir::new("flows-no-agent");

    // No socket at all.
    let missing = dir.path().join("agent.sock");
    let path = missing.to_str().expect("utf-8 temp path");
    for mode in ["--json", "--once"] {
        let out = run_agent_cli(&["flows", "--socket", path, mode], Duration::from_secs(15));
        assert!(!out.status.success(), "must fail without an agent: {out}");
        assert!(out.stdout.trim().is_empty(), "nothing on stdout: {out}");
        assert!(
            out.stderr.contains("is ztai-agent running?") && out.stderr.contains(path),
            "the error must say that no agent runs and name the socket: {out}"
        );
    }

    // A socket file nobody answers on (its agent died).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a unix socket"));
    assert!(stale.exists());
    let path = stale.to_str().expect("utf-8 temp path");
    let out = run_agent_cli(
        &["flows", "--socket", path, "--json"],
        Duration::from_secs(15),
    );
    assert!(!out.status.success(), "must fail with a dead socket: {out}");
    assert!(out.stdout.trim().is_empty(), "nothing on stdout: {out}");
    assert!(
        out.stderr.contains("is ztai-agent running?") && out.stderr.contains(path),
        "the error must say that no agent answers and name the socket: {out}"
    );

    assert_eq!(
        bpf::attached_counts(&mount).expect("BPF_PROG_QUERY on the cgroup2 root"),
        root_before,
        "`flows` attaches nothing"
    );
}
