//! The agent leaves nothing behind: its programs sit under its --cgroup-root only, and after
//! SIGTERM they are gone and previously denied traffic flows again.

use std::path::{Path, PathBuf};

use ztai_tests::bpf::{self, AttachType};
use ztai_tests::{Agent, Denial, Policy, ProbeCmd, TestCgroup, cgroup2_mount, require_agent};

/// Programs attached directly to any cgroup of the subtree, per attach type.
fn subtree_counts(root: &Path) -> Vec<(PathBuf, AttachType, u32)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        out.push(dir.to_path_buf());
        for e in std::fs::read_dir(dir).expect("read cgroup dir").flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), out);
            }
        }
    }
    let mut dirs = Vec::new();
    walk(root, &mut dirs);
    dirs.into_iter()
        .flat_map(|d| {
            bpf::attached_counts(&d)
                .unwrap_or_else(|e| panic!("BPF_PROG_QUERY on {}: {e}", d.display()))
                .into_iter()
                .map(move |(t, n)| (d.clone(), t, n))
        })
        .filter(|(_, _, n)| *n > 0)
        .collect()
}

#[test]
fn after_the_agent_exits_on_sigterm_nothing_stays_attached_and_the_denied_connect_succeeds() {
    require_agent!();
    let mount = cgroup2_mount();
    let root_before = bpf::attached_counts(&mount).expect("BPF_PROG_QUERY on the cgroup2 root");

    let cg = TestCgroup::new();
    let orch = cg.child("orch");
    let rag = cg.child("rag");
    let mut agent = Agent::start_ready(
        &Policy::enforce(&cg)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("retrieval", &["rag"])
            .cgroups("inference", &["inf/**"])
            .allow_all_ports("orchestrator", "inference"),
        &cg,
    );
    let tcp = ProbeCmd::tcp_listen("[::]:0").in_cgroup(&rag).spawn();
    let udp = ProbeCmd::udp_echo("[::]:0").in_cgroup(&rag).spawn();
    let tcp_port = tcp.wait_listening().port();
    let udp_port = udp.wait_listening().port();

    // While running: programs under the subtree, none added to the machine's root cgroup.
    let attached = subtree_counts(&cg.path());
    for t in [
        AttachType::Inet4Connect,
        AttachType::Inet6Connect,
        AttachType::Udp4Sendmsg,
        AttachType::Udp6Sendmsg,
    ] {
        assert!(
            attached.iter().any(|(_, at, _)| *at == t),
            "no {t:?} program attached under {} while the agent runs: {attached:?}",
            cg.path().display()
        );
    }
    assert_eq!(
        bpf::attached_counts(&mount).expect("BPF_PROG_QUERY on the cgroup2 root"),
        root_before,
        "the agent must never attach to the root cgroup"
    );

    let denied = ProbeCmd::tcp_connect(format!("127.0.0.1:{tcp_port}"))
        .in_cgroup(&orch)
        .run();
    agent.expect_denied(
        &denied,
        &Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "retrieval",
            dst_addr: "127.0.0.1",
            dst_port: tcp_port,
        },
    );
    ProbeCmd::udp_send(format!("[::1]:{udp_port}"))
        .in_cgroup(&orch)
        .run()
        .assert_eperm();

    let status = agent.stop();
    assert!(
        status.success(),
        "agent exit status after SIGTERM: {status}\n{}",
        agent.diagnostics()
    );

    let left = subtree_counts(&cg.path());
    assert!(
        left.is_empty(),
        "programs still attached after the agent exited: {left:?}"
    );
    ProbeCmd::tcp_connect(format!("127.0.0.1:{tcp_port}"))
        .in_cgroup(&orch)
        .run()
        .assert_ok();
    ProbeCmd::udp_send(format!("[::1]:{udp_port}"))
        .in_cgroup(&orch)
        .expect_reply()
        .run()
        .assert_ok();
    ProbeCmd::udp_send(format!("[::ffff:127.0.0.1]:{udp_port}"))
        .connected()
        .in_cgroup(&orch)
        .expect_reply()
        .run()
        .assert_ok();
}
