//! Self-tests of the scenario harness itself: they need no agent.
//!
//! The probe tests run anywhere (loopback only); the guard tests need root and check, on the real
//! kernel, that cgroup subtrees, network namespaces and veth pairs are created as described and
//! are gone after drop — also when the test panics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ztai_tests::netns::{host_link_exists, netns_exists};
use ztai_tests::probe::exit;
use ztai_tests::{ProbeCmd, RemoteHost, TestCgroup, bpf, cgroup2_mount, require_root};

fn proc_cgroup_v2(pid: u32) -> String {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/pid/cgroup");
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup2 line in /proc/{pid}/cgroup: {text}"))
        .to_string()
}

fn reap(pid: u32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid on a child of this process whose Child handle was forgotten.
    let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    assert_eq!(rc, pid as libc::pid_t, "waitpid({pid})");
    status
}

#[test]
fn probe_tcp_round_trips_over_ipv4_ipv6_and_v4_mapped_and_reports_refused_with_exit_4() {
    let server = ProbeCmd::tcp_listen("[::]:0").spawn();
    let port = server.wait_listening().port();
    for target in [
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
    ] {
        ProbeCmd::tcp_connect(&target).run().assert_ok();
    }
    server.wait_line(
        "accepted from a v4-mapped client",
        Duration::from_secs(5),
        |l| l.starts_with("accepted [::ffff:127.0.0.1]:"),
    );

    let bound = ProbeCmd::tcp_connect(format!("127.0.0.1:{port}"))
        .bind("127.0.0.1:0")
        .run();
    bound.assert_ok();
    let local = bound.bound_addr().expect("`bound <addr>` line");
    assert_eq!(local.ip().to_string(), "127.0.0.1");
    assert_ne!(local.port(), 0);

    drop(server); // killed and reaped: the port is closed now
    let refused = ProbeCmd::tcp_connect(format!("127.0.0.1:{port}")).run();
    refused.assert_code(exit::ECONNREFUSED);
    assert!(
        refused.status().starts_with("err ECONNREFUSED"),
        "{refused}"
    );
}

#[test]
fn probe_udp_echo_replies_to_connected_and_unconnected_senders_and_reports_missing_replies() {
    let echo = ProbeCmd::udp_echo("[::]:0").spawn();
    let port = echo.wait_listening().port();
    for target in [
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
    ] {
        ProbeCmd::udp_send(&target).expect_reply().run().assert_ok();
        ProbeCmd::udp_send(&target)
            .connected()
            .expect_reply()
            .run()
            .assert_ok();
        ProbeCmd::udp_send(&target).run().assert_ok();
    }
    echo.wait_line("an echo reply sent", Duration::from_secs(5), |l| {
        l.starts_with("echo ") && l.ends_with(" ok")
    });

    drop(echo);
    // Unconnected: nothing comes back (ICMP errors are not reported) -> exit 6 after 5 s.
    let silent = ProbeCmd::udp_send(format!("127.0.0.1:{port}"))
        .expect_reply()
        .run();
    silent.assert_code(exit::NO_REPLY);
}

#[test]
fn probe_rejects_bad_usage_with_exit_2() {
    ProbeCmd::new(["tcp-connect", "not-an-address"])
        .run()
        .assert_code(exit::USAGE);
    ProbeCmd::new(["frobnicate", "127.0.0.1:1"])
        .run()
        .assert_code(exit::USAGE);
}

#[test]
fn harness_guards_create_and_remove_cgroups_netns_and_veth() {
    require_root!();
    let mount = cgroup2_mount();
    assert!(
        mount.join("cgroup.procs").is_file(),
        "{} is not a cgroup2 mount",
        mount.display()
    );

    let cg = TestCgroup::new();
    let root_path = cg.path();
    assert_eq!(
        root_path.parent(),
        Some(mount.as_path()),
        "subtree sits directly under the mount"
    );
    assert!(
        cg.rel_path()
            .starts_with(&format!("ztai-t{}-", std::process::id()))
    );
    let orch = cg.child("orch");
    let deep = cg.child("a/b");
    assert!(deep.path().is_dir());
    assert_eq!(deep.rel_path(), format!("{}/a/b", cg.rel_path()));
    assert_eq!(deep.proc_path(), format!("/{}/a/b", cg.rel_path()));
    assert_eq!(
        bpf::attached_total(&root_path).expect("BPF_PROG_QUERY on the subtree"),
        0
    );

    // A long-running probe moved into the nested cgroup before exec.
    let resident = ProbeCmd::udp_echo("127.0.0.1:0").in_cgroup(&deep).spawn();
    resident.wait_listening();
    assert_eq!(deep.procs(), vec![resident.pid()]);
    assert_eq!(proc_cgroup_v2(resident.pid()), deep.proc_path());
    assert!(cg.populated());

    // A "remote host" reached over a veth pair.
    let remote = RemoteHost::new();
    let ns_name = remote.netns().name().to_string();
    let (veth_host, veth_peer) = (
        remote.veth().host_name().to_string(),
        remote.veth().peer_name().to_string(),
    );
    assert!(ns_name.starts_with(&format!("ztai-n{}-", std::process::id())));
    assert!(netns_exists(&ns_name));
    assert_eq!(veth_host, format!("zt{}h", remote.slot()));
    assert!(host_link_exists(&veth_host));
    assert!(
        !host_link_exists(&veth_peer),
        "the peer end lives inside the namespace"
    );
    remote.netns().ip(&["link", "show", "dev", &veth_peer]);

    let server = ProbeCmd::tcp_listen("[::]:0")
        .in_netns(remote.netns())
        .spawn();
    let port = server.wait_listening().port();
    assert_eq!(
        proc_cgroup_v2(server.pid()),
        proc_cgroup_v2(std::process::id()),
        "no cgroup asked for"
    );

    // TCP through the veth from a probe inside the test cgroup, over IPv4 and IPv6.
    for ip in [
        remote.v4(),
        remote.v4_alt(),
        remote.world_v4(),
        remote.v6(),
        remote.v6_alt(),
        remote.world_v6(),
    ] {
        ProbeCmd::tcp_connect(SocketAddr::new(ip, port))
            .in_cgroup(&orch)
            .run()
            .assert_ok();
    }
    server.wait_line(
        "a connection from the host end of the veth",
        Duration::from_secs(5),
        |l| {
            // A dual-stack server sees IPv4 peers as v4-mapped addresses.
            l.starts_with(&format!("accepted [::ffff:{}]:", remote.host_v4()))
        },
    );
    // UDP both ways through the veth.
    let echo = ProbeCmd::udp_echo("[::]:0")
        .in_netns(remote.netns())
        .spawn();
    let uport = echo.wait_listening().port();
    // Every remote address, connected and not: the wildcard-bound echo server must reply from
    // the address it was sent to (a connected client drops anything else).
    for ip in [
        remote.v4(),
        remote.v4_alt(),
        remote.world_v4(),
        remote.v6(),
        remote.v6_alt(),
        remote.world_v6(),
    ] {
        let to = SocketAddr::new(ip, uport);
        ProbeCmd::udp_send(to)
            .in_cgroup(&orch)
            .expect_reply()
            .run()
            .assert_ok();
        ProbeCmd::udp_send(to)
            .in_cgroup(&orch)
            .connected()
            .expect_reply()
            .run()
            .assert_ok();
    }

    // The netns is isolated: its loopback does not reach the host's listeners.
    let host_server = ProbeCmd::tcp_listen("127.0.0.1:0").spawn();
    let hport = host_server.wait_listening().port();
    let isolated = ProbeCmd::tcp_connect(format!("127.0.0.1:{hport}"))
        .in_netns(remote.netns())
        .run();
    isolated.assert_code(exit::ECONNREFUSED);

    // A probe whose guard is leaked must still be killed by the cgroup guard.
    let leaked = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&orch).spawn();
    leaked.wait_listening();
    let leaked_pid = leaked.pid();
    std::mem::forget(leaked);
    assert_eq!(orch.procs(), vec![leaked_pid]);

    drop(echo);
    drop(server);
    drop(remote);
    assert!(
        !netns_exists(&ns_name),
        "netns {ns_name} still exists after drop"
    );
    assert!(
        !host_link_exists(&veth_host),
        "veth {veth_host} still exists after drop"
    );

    drop(resident);
    drop(cg);
    assert!(
        !root_path.exists(),
        "{} still exists after drop",
        root_path.display()
    );
    let status = reap(leaked_pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "leaked probe should have been SIGKILLed by the cgroup guard (wait status {status:#x})"
    );
}

#[test]
fn harness_guards_clean_up_even_when_the_test_panics() {
    require_root!();
    let mut seen: Option<(PathBuf, String, String, u32)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cg = TestCgroup::new();
        let worker = cg.child("x/y/z");
        let remote = RemoteHost::new();
        let p = ProbeCmd::tcp_listen("127.0.0.1:0")
            .in_cgroup(&worker)
            .spawn();
        p.wait_listening();
        let pid = p.pid();
        std::mem::forget(p);
        seen = Some((
            cg.path(),
            remote.netns().name().to_string(),
            remote.veth().host_name().to_string(),
            pid,
        ));
        panic!("deliberate panic inside a scenario");
    }));
    assert!(result.is_err());
    let (cg_path, ns, veth, pid) = seen.expect("scenario ran");
    assert!(!cg_path.exists(), "{} survived a panic", cg_path.display());
    assert!(!netns_exists(&ns), "netns {ns} survived a panic");
    assert!(!host_link_exists(&veth), "veth {veth} survived a panic");
    let status = reap(pid);
    assert!(
        libc::WIFSIGNALED(status),
        "probe in the cgroup was killed (wait status {status:#x})"
    );
}
