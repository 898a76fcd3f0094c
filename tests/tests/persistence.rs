//! Enforcement that outlives the agent: SIGKILL and restart (adoption without a gap, one set of
//! programs afterwards), SIGTERM without --detach-on-exit, `ztai-agent uninstall` (everything of
//! its pin folder and nothing else), one agent per pin folder, full kernel maps failing closed,
//! and a chaos run of kills, restarts and reloads under a continuous stream of allowed and denied
//! connection attempts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use ztai_tests::persist::{
    ADOPTED_MSG, AGENT_ATTACH_TYPES, LoopAttempt, PersistentAgent, assert_one_program_set,
    pin_entries, subtree_programs,
};
use ztai_tests::session::mono_ns;
use ztai_tests::{
    Cgroup, DEFAULT_TIMEOUT, Denial, Policy, Probe, ProbeCmd, READY_TIMEOUT, TestCgroup,
    assert_denial, require_agent, wait_until,
};

/// orchestrator → inference allowed (every port); orchestrator → retrieval not.
fn base_policy(cg: &TestCgroup) -> Policy {
    Policy::enforce(cg)
        .cgroups("orchestrator", &["orch"])
        .cgroups("inference", &["inf"])
        .cgroups("retrieval", &["rag"])
        .allow_all_ports("orchestrator", "inference")
}

/// Creates the workload cgroups of [`base_policy`]. Call it before the agent starts: a cgroup
/// created later is unlabeled (`host`) until the agent notices it.
fn create_workload_cgroups(cg: &TestCgroup) {
    for name in ["orch", "inf", "rag"] {
        cg.child(name);
    }
}

/// The three workload cgroups of [`base_policy`] and a TCP echo server in each destination.
struct Workloads {
    orch: Cgroup,
    allowed: SocketAddr,
    denied: SocketAddr,
    _servers: [Probe; 2],
}

impl Workloads {
    /// Servers on ephemeral loopback ports, started once the agent runs (their binds recorded).
    #[track_caller]
    fn start(cg: &TestCgroup) -> Workloads {
        for name in ["orch", "inf", "rag"] {
            assert!(
                cg.path().join(name).is_dir(),
                "create_workload_cgroups() before starting the agent"
            );
        }
        let orch = cg.child("orch");
        let inf_server = ProbeCmd::tcp_listen("127.0.0.1:0")
            .in_cgroup(&cg.child("inf"))
            .spawn();
        let rag_server = ProbeCmd::tcp_listen("127.0.0.1:0")
            .in_cgroup(&cg.child("rag"))
            .spawn();
        Workloads {
            orch,
            allowed: inf_server.wait_listening(),
            denied: rag_server.wait_listening(),
            _servers: [inf_server, rag_server],
        }
    }

    fn denial(&self) -> Denial<'static> {
        Denial {
            proto: "tcp",
            src_segment: "orchestrator",
            dst_segment: "retrieval",
            dst_addr: "127.0.0.1",
            dst_port: self.denied.port(),
        }
    }

    /// The allowed connection succeeds (connect + echo).
    #[track_caller]
    fn assert_allowed(&self, when: &str) {
        let out = ProbeCmd::tcp_connect(self.allowed)
            .timeout_ms(3000)
            .in_cgroup(&self.orch)
            .run();
        assert!(
            out.is_ok(),
            "{when}: orchestrator -> inference {} must succeed, got: {out}",
            self.allowed
        );
    }

    /// The denied connection fails with EPERM; returns the probe's pid.
    #[track_caller]
    fn assert_denied(&self, when: &str) -> u32 {
        let out = ProbeCmd::tcp_connect(self.denied)
            .timeout_ms(3000)
            .in_cgroup(&self.orch)
            .run();
        assert!(
            out.is_eperm(),
            "{when}: orchestrator -> retrieval {} must fail with EPERM, got: {out}",
            self.denied
        );
        out.pid
    }

    /// Denied with EPERM and reported by the running agent.
    #[track_caller]
    fn assert_denied_and_reported(&self, agent: &PersistentAgent, when: &str) {
        let pid = self.assert_denied(when);
        let v = agent.wait_violation_from(pid);
        assert_denial(&v, &self.denial());
    }
}

fn msg_is(v: &Value, msg: &str) -> bool {
    v["msg"] == msg
}

/// The generation in the ready line.
#[track_caller]
fn ready_generation(ready: &Value) -> u64 {
    ready["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("ready line without a numeric generation: {ready}"))
}

#[test]
fn after_sigkill_enforcement_continues_and_a_restarted_agent_adopts_it_with_one_set_of_programs() {
    require_agent!();
    let cg = TestCgroup::new();
    create_workload_cgroups(&cg);
    let mut agent = PersistentAgent::new(&base_policy(&cg), &cg);
    agent.start();
    let ready = agent.wait_ready(READY_TIMEOUT);
    let first_gen = ready_generation(&ready);
    let w = Workloads::start(&cg);

    w.assert_allowed("first agent");
    w.assert_denied_and_reported(&agent, "first agent");
    let before = assert_one_program_set(&cg.path(), "first agent running");
    let links_before = agent.link_generations();
    assert_eq!(
        links_before,
        vec![(format!("g{first_gen}"), AGENT_ATTACH_TYPES.len())],
        "pinned links of the first agent\n{}",
        agent.diagnostics()
    );

    let status = agent.sigkill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "agent status after SIGKILL: {status}"
    );
    // Nobody runs now; the pinned programs still enforce.
    w.assert_denied("after SIGKILL, no agent running");
    w.assert_allowed("after SIGKILL, no agent running");
    assert_eq!(
        assert_one_program_set(&cg.path(), "after SIGKILL"),
        before,
        "the killed agent's programs must stay attached unchanged"
    );
    assert_eq!(agent.link_generations(), links_before);

    let ready = agent.restart_ready();
    let adopted = agent.wait_log("adopted ...", DEFAULT_TIMEOUT, |v| msg_is(v, ADOPTED_MSG));
    assert_eq!(
        (
            adopted["adopted_generation"].as_u64(),
            adopted["generation"].as_u64(),
            adopted["released_links"].as_u64(),
        ),
        (
            Some(first_gen),
            Some(first_gen + 1),
            Some(AGENT_ATTACH_TYPES.len() as u64)
        ),
        "adoption line (adopted_generation, generation, released_links): {adopted}"
    );
    assert_eq!(
        ready_generation(&ready),
        first_gen + 1,
        "ready line: {ready}"
    );

    // Exactly one set: the new agent's programs, the adopted ones detached.
    let after = assert_one_program_set(&cg.path(), "after the restarted agent adopted");
    for (name, id) in &after {
        assert_ne!(
            before.get(name),
            Some(id),
            "{name}: the program of the killed agent is still the attached one"
        );
    }
    assert_eq!(
        agent.link_generations(),
        vec![(format!("g{}", first_gen + 1), AGENT_ATTACH_TYPES.len())],
        "pinned links after adoption: only the new generation\n{}",
        agent.diagnostics()
    );
    w.assert_allowed("restarted agent");
    w.assert_denied_and_reported(&agent, "restarted agent");
}

#[test]
fn sigterm_without_detach_keeps_enforcing_and_uninstall_removes_its_pins_and_nothing_else() {
    require_agent!();
    let cg_a = TestCgroup::new();
    let cg_b = TestCgroup::new();
    create_workload_cgroups(&cg_a);
    create_workload_cgroups(&cg_b);
    let mut a = PersistentAgent::start_ready(&base_policy(&cg_a), &cg_a);
    let mut b = PersistentAgent::start_ready(&base_policy(&cg_b), &cg_b);
    let wa = Workloads::start(&cg_a);
    let wb = Workloads::start(&cg_b);
    wa.assert_denied_and_reported(&a, "agent A running");
    wb.assert_denied_and_reported(&b, "agent B running");
    let a_programs = assert_one_program_set(&cg_a.path(), "agent A running");
    let b_programs = assert_one_program_set(&cg_b.path(), "agent B running");
    let b_pins = pin_entries(b.pin_dir());
    assert!(
        !b_pins.is_empty(),
        "agent B pinned nothing under {}",
        b.pin_dir().display()
    );
    let a_pins = pin_entries(a.pin_dir());
    let a_maps = a_pins
        .iter()
        .filter(|p| p.starts_with("maps/") && !p.ends_with('/'))
        .count();
    assert!(a_maps > 0, "agent A pinned no maps: {a_pins:?}");

    let status = a.sigterm();
    assert!(
        status.success(),
        "agent A exit status after SIGTERM: {status}\n{}",
        a.diagnostics()
    );
    assert!(
        a.logs().iter().any(|v| v["msg"]
            .as_str()
            .is_some_and(|m| m.contains("enforcement stays in place"))),
        "agent A should say enforcement stays in place on SIGTERM without --detach-on-exit\n{}",
        a.diagnostics()
    );
    wa.assert_denied("agent A exited on SIGTERM (no --detach-on-exit)");
    wa.assert_allowed("agent A exited on SIGTERM (no --detach-on-exit)");
    assert_eq!(
        assert_one_program_set(&cg_a.path(), "after agent A's SIGTERM"),
        a_programs
    );
    assert_eq!(
        pin_entries(a.pin_dir()),
        a_pins,
        "agent A's pins after SIGTERM"
    );

    let out = a.uninstall();
    assert!(out.status.success(), "{out}");
    assert_eq!(
        out.stdout.trim(),
        format!(
            "removed {} links and {a_maps} maps pinned under {}",
            AGENT_ATTACH_TYPES.len(),
            a.pin_dir().display()
        ),
        "{out}"
    );
    assert!(
        !a.pin_dir().exists(),
        "uninstall left {}: {:?}",
        a.pin_dir().display(),
        pin_entries(a.pin_dir())
    );
    // The kernel releases unpinned links asynchronously: poll.
    let detached = ztai_tests::try_wait_until(std::time::Duration::from_secs(10), || {
        subtree_programs(&cg_a.path()).is_empty().then_some(())
    });
    let left = subtree_programs(&cg_a.path());
    assert!(
        detached.is_some(),
        "programs still attached under A's subtree after uninstall: {left:?}"
    );
    let now_ok = ProbeCmd::tcp_connect(wa.denied)
        .timeout_ms(3000)
        .in_cgroup(&wa.orch)
        .run();
    assert!(
        now_ok.is_ok(),
        "after uninstall nothing enforces under A's subtree: the formerly denied connection must succeed, got: {now_ok}"
    );
    wa.assert_allowed("after uninstall");

    // Nothing of B was touched.
    assert!(b.is_running(), "agent B exited\n{}", b.diagnostics());
    assert_eq!(
        pin_entries(b.pin_dir()),
        b_pins,
        "agent B's pin folder changed"
    );
    assert_eq!(
        assert_one_program_set(&cg_b.path(), "agent B after A's uninstall"),
        b_programs,
        "agent B's programs changed"
    );
    wb.assert_allowed("agent B after A's uninstall");
    wb.assert_denied_and_reported(&b, "agent B after A's uninstall");
}

#[test]
fn a_second_agent_on_the_same_pin_folder_is_refused_and_the_first_keeps_enforcing() {
    require_agent!();
    let cg = TestCgroup::new();
    create_workload_cgroups(&cg);
    let mut agent = PersistentAgent::start_ready(&base_policy(&cg), &cg);
    let w = Workloads::start(&cg);
    w.assert_denied_and_reported(&agent, "first agent");
    let programs = assert_one_program_set(&cg.path(), "first agent");
    let pins = pin_entries(agent.pin_dir());

    let second = agent.run_competitor();
    assert!(
        !second.status.success(),
        "a second agent on the pin folder of a running one must fail: {second}"
    );
    let want = format!(
        "another ztai-agent is using the pin folder {}",
        agent.pin_dir().display()
    );
    assert!(
        second.stderr.contains(&want),
        "the second agent's error should say {want:?}: {second}"
    );

    assert!(
        agent.is_running(),
        "the first agent exited\n{}",
        agent.diagnostics()
    );
    assert_eq!(
        assert_one_program_set(&cg.path(), "after the refused second agent"),
        programs,
        "the refused agent must not attach or detach anything"
    );
    assert_eq!(pin_entries(agent.pin_dir()), pins, "pin folder changed");
    w.assert_allowed("after the refused second agent");
    w.assert_denied_and_reported(&agent, "after the refused second agent");
}

/// Pinned maps from an agent with another map layout are refused before anything loads: aya
/// would reuse them by name and read them with this agent's types. Both ways an old layout can
/// show: a config value of another size, and a config entry stamped with another version.
#[test]
fn pinned_maps_of_another_layout_are_refused_untouched_and_uninstall_clears_the_way() {
    require_agent!();
    let cg = TestCgroup::new();
    create_workload_cgroups(&cg);
    let mut agent = PersistentAgent::new(&base_policy(&cg), &cg);
    let maps = agent.pin_dir().join("maps");
    std::fs::create_dir_all(&maps).expect("create the pin folder on bpffs");
    let config_pin = maps.join(ztai_common::maps::CONFIG);
    let size = std::mem::size_of::<ztai_common::Config>() as u32;
    // Config is { active_gen, flags, host_netns_cookie, layout, _pad }.
    let mut stamped = Vec::new();
    stamped.extend_from_slice(&7u32.to_ne_bytes());
    stamped.extend_from_slice(&ztai_common::CONFIG_FLAG_POLICY_LOADED.to_ne_bytes());
    stamped.extend_from_slice(&0u64.to_ne_bytes());
    stamped.extend_from_slice(&(ztai_common::LAYOUT_VERSION + 1).to_ne_bytes());
    let cases = [
        (size - 8, Vec::new(), format!("have a {}-byte", size - 8)),
        (size, stamped, format!("written with map layout {}", ztai_common::LAYOUT_VERSION + 1)),
    ];
    for (value_size, value, says) in cases {
        ztai_tests::bpf::pin_array_map(&config_pin, value_size, &value)
            .unwrap_or_else(|e| panic!("pin a stand-in config map at {}: {e}", config_pin.display()));
        let pins = pin_entries(agent.pin_dir());
        let out = agent.run_competitor();
        assert!(!out.status.success(), "an agent must refuse pinned maps of another layout: {out}");
        for want in [says.as_str(), "this agent uses map layout", "ztai-agent uninstall --pin-dir"] {
            assert!(out.stderr.contains(want), "the refusal should say {want:?}: {out}");
        }
        assert!(
            subtree_programs(&cg.path()).is_empty(),
            "a refused agent attached programs: {:?}",
            subtree_programs(&cg.path())
        );
        assert_eq!(pin_entries(agent.pin_dir()), pins, "a refused agent changed the pin folder");
        std::fs::remove_file(&config_pin).expect("unpin the stand-in config map");
    }
    // The way the refusal names: uninstall, then a fresh start enforces.
    ztai_tests::bpf::pin_array_map(&config_pin, size - 8, &[]).expect("pin the stand-in again");
    let out = agent.uninstall();
    assert!(out.status.success(), "uninstall of incompatible pins failed: {out}");
    assert!(!config_pin.exists(), "uninstall left {}", config_pin.display());
    agent.start();
    agent.wait_ready(READY_TIMEOUT);
    let w = Workloads::start(&cg);
    w.assert_allowed("after uninstall and a fresh start");
    w.assert_denied_and_reported(&agent, "after uninstall and a fresh start");
}

#[test]
fn a_full_socket_owner_map_refuses_labeled_binds_reports_them_and_counts_them() {
    require_agent!();
    const SIZE: u32 = 3;
    let cg = TestCgroup::new();
    let inf = cg.child("inf");
    let plain = cg.child("plain");
    let mut agent =
        PersistentAgent::new(&base_policy(&cg), &cg).map_size("ZTAI_SOCKET_OWNERS", SIZE);
    agent.start();
    agent.wait_ready(READY_TIMEOUT);

    let mut servers: Vec<Probe> = (0..SIZE)
        .map(|_| ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&inf).spawn())
        .collect();
    for s in &servers {
        s.wait_listening();
    }
    let refused = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&inf).run();
    assert!(
        refused.is_eperm() && refused.status().contains("bind"),
        "bind number {} of a labeled socket with ZTAI_SOCKET_OWNERS={SIZE} must fail with EPERM, got: {refused}",
        SIZE + 1
    );
    let v = agent.wait_violation_from(refused.pid);
    assert_eq!(v["verdict"], "deny", "{v}");
    assert_eq!(v["src"]["segment"], "inference", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("socket-owner table is full")),
        "reason of the refused bind: {v}"
    );
    agent.wait_metric_at_least("ztai_socket_table_full_total", 1.0, DEFAULT_TIMEOUT);

    // Fail closed only where passing would be wrong: an unlabeled socket is `host` anyway.
    let host_server = ProbeCmd::tcp_listen("127.0.0.1:0")
        .in_cgroup(&plain)
        .spawn();
    host_server.wait_listening();

    // A released socket frees its entry: a labeled bind succeeds again.
    drop(servers.pop());
    let again = wait_until(
        "a labeled bind to succeed after one of the recorded listeners exited",
        DEFAULT_TIMEOUT,
        || {
            let p = ProbeCmd::tcp_listen("127.0.0.1:0").in_cgroup(&inf).spawn();
            let line = p.wait_line("listening or err", DEFAULT_TIMEOUT, |l| {
                l.starts_with("listening ") || l.starts_with("err ")
            });
            line.starts_with("listening ").then_some(p)
        },
    );
    drop(again);
}

/// While a cgroup cannot be labeled (label map full), a `host` end under the attach point may be a
/// labeled workload passing as unlabeled: host-to-host traffic there is denied at connect (a
/// process under the attach point) and at the receiver (a process outside it connecting to an
/// unlabeled listener under it). Once cgroups are removed so that every remaining one fits in the
/// map, the agent's rescan labels them all and lifts the fail-closed state.
#[test]
fn a_full_label_map_fails_closed_for_host_traffic_under_the_attach_point_at_connect_and_at_the_receiver_until_every_cgroup_fits()
 {
    require_agent!();
    let cg = TestCgroup::new();
    // Subtree root, orch, inf, rag, plain: 5 cgroups to label, room for 2.
    let plain = cg.child("plain");
    let workloads: Vec<Cgroup> = ["orch", "inf", "rag"].iter().map(|c| cg.child(c)).collect();
    let mut agent = PersistentAgent::new(&base_policy(&cg), &cg).map_size("ZTAI_CGROUP_LABELS", 2);
    agent.start();
    agent.wait_ready(READY_TIMEOUT);
    let logged = agent.wait_log("\"cannot label cgroup ...\"", DEFAULT_TIMEOUT, |v| {
        v["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("cannot label cgroup") && m.contains("fails closed"))
    });
    assert_eq!(logged["level"], "error", "{logged}");
    agent.wait_metric_at_least("ztai_label_failures_total", 1.0, DEFAULT_TIMEOUT);

    // A host destination outside the subtree (the test's own cgroup: no ztai program there).
    let server = ProbeCmd::tcp_listen("127.0.0.1:0").spawn();
    let addr = server.wait_listening();
    let out = ProbeCmd::tcp_connect(addr).in_cgroup(&plain).run();
    assert!(
        out.is_eperm(),
        "with the label map full, an unlabeled process under the attach point connecting to a \
         host destination must get EPERM, got: {out}"
    );
    let v = agent.wait_violation_from(out.pid);
    assert_eq!(
        (
            v["verdict"].as_str(),
            v["src"]["segment"].as_str(),
            v["dst"]["segment"].as_str()
        ),
        (Some("deny"), Some("host"), Some("host")),
        "{v}"
    );
    assert_labels_incomplete_reason(&v);
    // Outside the attach point nothing changes.
    ProbeCmd::tcp_connect(addr).run().assert_ok();

    // An unlabeled listener under the attach point, a client outside it: judged at the receiver,
    // the SYN is dropped (timeout) and reported.
    let inside = ProbeCmd::tcp_listen("127.0.0.1:0")
        .in_cgroup(&plain)
        .spawn();
    let inside_addr = inside.wait_listening();
    let out = ProbeCmd::tcp_connect(inside_addr)
        .bind("127.0.0.1:0")
        .timeout_ms(1500)
        .run();
    assert!(
        out.is_timeout(),
        "with the label map full, a process outside the attach point connecting to an unlabeled \
         listener under it must be dropped at the receiver (timeout), got: {out}"
    );
    let src = out
        .bound_addr()
        .unwrap_or_else(|| panic!("the probe printed no `bound` line: {out}"));
    let v = agent.wait_violation_after(0, DEFAULT_TIMEOUT, |v| {
        v["direction"] == "ingress" && v["src"]["port"] == src.port()
    });
    assert_eq!(
        (
            v["verdict"].as_str(),
            v["hook"].as_str(),
            v["src"]["segment"].as_str(),
            v["dst"]["segment"].as_str(),
            v["dst"]["port"].as_u64(),
        ),
        (
            Some("deny"),
            Some("skb_ingress"),
            Some("host"),
            Some("host"),
            Some(u64::from(inside_addr.port()))
        ),
        "{v}"
    );
    assert_labels_incomplete_reason(&v);
    assert!(
        !inside.lines().iter().any(|l| l.contains(&src.to_string())),
        "the listener under the attach point heard from {src}: {:?}",
        inside.lines()
    );

    // Remove three cgroups: the subtree root and plain are left, which the map holds. The
    // agent's rescan (every second) labels them and lifts the fail-closed state.
    for c in &workloads {
        c.remove();
    }
    let logged = agent.wait_log(
        "\"every cgroup is labeled again ...\"",
        DEFAULT_TIMEOUT,
        |v| {
            v["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("every cgroup is labeled again"))
        },
    );
    assert_eq!(logged["level"], "info", "{logged}");
    // Both ends of host-to-host traffic under the attach point work again.
    let out = ProbeCmd::tcp_connect(inside_addr).timeout_ms(3000).run();
    assert!(
        out.is_ok(),
        "every cgroup is labeled: outside -> unlabeled listener under the attach point must \
         connect again, got: {out}"
    );
    let out = ProbeCmd::tcp_connect(addr)
        .timeout_ms(3000)
        .in_cgroup(&plain)
        .run();
    assert!(
        out.is_ok(),
        "every cgroup is labeled: an unlabeled process under the attach point -> host must \
         connect again, got: {out}"
    );
}

#[track_caller]
fn assert_labels_incomplete_reason(v: &Value) {
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("could not label every cgroup")),
        "the reason should say the labels are incomplete: {v}"
    );
}

/// What happened when during the chaos run (CLOCK_MONOTONIC ns).
struct Timeline(Vec<(u64, String)>);

impl Timeline {
    fn note(&mut self, what: impl Into<String>) -> u64 {
        let t = mono_ns();
        self.0.push((t, what.into()));
        t
    }

    /// The events within 3 s before `t` and 1 s after.
    fn around(&self, t: u64) -> String {
        self.0
            .iter()
            .filter(|(e, _)| *e + 3_000_000_000 >= t && *e <= t + 1_000_000_000)
            .map(|(e, what)| format!("  {:+9.1} ms {what}", (*e as f64 - t as f64) / 1e6))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Tally of a tcp-loop's attempts against the expected verdicts.
#[derive(Default, Debug)]
struct Tally {
    allowed_ok: usize,
    denied_eperm: usize,
    bad: Vec<(LoopAttempt, &'static str)>,
}

fn tally(attempts: &[LoopAttempt], allowed: &str, denied: &str) -> Tally {
    let mut t = Tally::default();
    for a in attempts {
        if a.addr == allowed {
            match &a.err {
                None => t.allowed_ok += 1,
                Some(_) => t.bad.push((a.clone(), "allowed attempt failed")),
            }
        } else if a.addr == denied {
            match a.err.as_deref() {
                Some("EPERM") => t.denied_eperm += 1,
                None => t.bad.push((a.clone(), "DENIED ATTEMPT SUCCEEDED")),
                Some(_) => t
                    .bad
                    .push((a.clone(), "denied attempt failed without EPERM")),
            }
        } else {
            t.bad.push((a.clone(), "attempt to an unknown target"));
        }
    }
    t
}

#[track_caller]
fn assert_no_bad_attempts(
    loop_probe: &Probe,
    allowed: &str,
    denied: &str,
    timeline: &Timeline,
    when: &str,
) -> Tally {
    let t = tally(&loop_probe.loop_attempts(), allowed, denied);
    if !t.bad.is_empty() {
        let details: Vec<String> = t
            .bad
            .iter()
            .take(10)
            .map(|(a, why)| {
                format!(
                    "{why}: {a:?}\n events around it:\n{}",
                    timeline.around(a.start_ns)
                )
            })
            .collect();
        panic!(
            "{when}: {} of {} attempts went the wrong way ({} allowed ok, {} denied with EPERM); first ones:\n{}",
            t.bad.len(),
            t.allowed_ok + t.denied_eperm + t.bad.len(),
            t.allowed_ok,
            t.denied_eperm,
            details.join("\n")
        );
    }
    t
}

/// Waits until the loop has completed `n` more attempts than `since`.
#[track_caller]
fn wait_attempts(loop_probe: &Probe, since: usize, n: usize, what: &str) -> usize {
    wait_until(what, Duration::from_secs(30), || {
        let c = loop_probe.loop_attempts().len();
        (c >= since + n).then_some(c)
    })
}

#[test]
fn chaos_kills_restarts_and_reloads_never_let_a_denied_connect_through_nor_break_an_allowed_one() {
    require_agent!();
    const RESTARTS: usize = 5;
    const RELOADS: usize = 50;
    const MIN_EACH: usize = 300;
    let cg = TestCgroup::new();
    // v1 and v2 agree on orchestrator -> inference (allowed) and orchestrator -> retrieval
    // (denied); they differ in an unrelated rule and v2 declares an extra segment first.
    let common = |p: Policy| {
        p.cgroups("orchestrator", &["orch"])
            .cgroups("inference", &["inf"])
            .cgroups("retrieval", &["rag"])
            .cgroups("batch", &["batch"])
            .allow_all_ports("orchestrator", "inference")
    };
    let v1 = common(Policy::enforce(&cg))
        .allow("batch", "retrieval", &["27611/tcp"])
        .to_yaml();
    let v2 = common(Policy::enforce(&cg).cgroups("scratch", &["scratch*"]))
        .allow("batch", "inference", &["27612/udp"])
        .allow("scratch", "retrieval", &["27613/tcp"])
        .to_yaml();
    create_workload_cgroups(&cg);
    cg.child("batch");
    let mut agent = PersistentAgent::new_yaml(&v1, &cg);
    let mut timeline = Timeline(Vec::new());
    let t0 = Instant::now();
    agent.start();
    let ready = agent.wait_ready(READY_TIMEOUT);
    let mut generation = ready_generation(&ready);
    timeline.note(format!(
        "agent pid {} ready, generation {generation}",
        agent.pid()
    ));
    let w = Workloads::start(&cg);
    let allowed = w.allowed.to_string();
    let denied = w.denied.to_string();
    let loop_probe = ProbeCmd::tcp_loop(&[&allowed, &denied], 3000, 2)
        .in_cgroup(&w.orch)
        .spawn();
    let loop_pid = loop_probe.pid();
    let mut seen = wait_attempts(&loop_probe, 0, 40, "the loop's first 40 attempts");
    assert_no_bad_attempts(
        &loop_probe,
        &allowed,
        &denied,
        &timeline,
        "before any chaos",
    );
    agent.wait_violation_after(0, DEFAULT_TIMEOUT, |v| v["src"]["pid"] == loop_pid);

    let mut file_is_v2 = false;
    let mut reloads = 0;
    let mut reload_ms = Vec::new();
    let mut down_ms = Vec::new();
    for cycle in 1..=RESTARTS {
        for _ in 0..RELOADS / RESTARTS {
            let (yaml, name) = if file_is_v2 { (&v1, "v1") } else { (&v2, "v2") };
            let t = timeline.note(format!("rename {name} over the policy file"));
            agent.replace_policy(yaml);
            file_is_v2 = !file_is_v2;
            generation += 1;
            agent.wait_policy_applied(generation, DEFAULT_TIMEOUT);
            let done = timeline.note(format!("policy {name} applied as generation {generation}"));
            reload_ms.push((done - t) as f64 / 1e6);
            reloads += 1;
            seen = wait_attempts(&loop_probe, seen, 6, "attempts after a reload");
        }
        assert_no_bad_attempts(
            &loop_probe,
            &allowed,
            &denied,
            &timeline,
            &format!("cycle {cycle}, after reloads"),
        );

        let killed_pid = agent.pid();
        let t_kill = timeline.note(format!("SIGKILL agent pid {killed_pid}"));
        agent.sigkill();
        // Let the loop run against the orphaned (pinned) enforcement for a while.
        seen = wait_attempts(&loop_probe, seen, 100, "attempts while no agent runs");
        timeline.note("restart");
        let ready = agent.restart_ready();
        let t_ready = timeline.note(format!(
            "agent pid {} ready, generation {}",
            agent.pid(),
            ready["generation"]
        ));
        down_ms.push((t_ready - t_kill) as f64 / 1e6);
        let adopted = agent.wait_log("adopted ...", DEFAULT_TIMEOUT, |v| msg_is(v, ADOPTED_MSG));
        assert_eq!(
            (
                adopted["adopted_generation"].as_u64(),
                adopted["generation"].as_u64()
            ),
            (Some(generation), Some(generation + 1)),
            "cycle {cycle}: adoption line {adopted}"
        );
        generation += 1;
        assert_eq!(
            ready_generation(&ready),
            generation,
            "cycle {cycle}: ready line {ready}"
        );
        assert_one_program_set(&cg.path(), &format!("cycle {cycle}, after restart"));
        assert_eq!(
            agent.link_generations(),
            vec![(format!("g{generation}"), AGENT_ATTACH_TYPES.len())],
            "cycle {cycle}: pinned links after adoption\n{}",
            agent.diagnostics()
        );
        // The new agent reports the loop's denials.
        let from = agent.violation_count();
        seen = wait_attempts(&loop_probe, seen, 6, "attempts after a restart");
        agent.wait_violation_after(from, DEFAULT_TIMEOUT, |v| {
            v["src"]["pid"] == loop_pid && v["dst"]["port"] == w.denied.port()
        });
        assert_no_bad_attempts(
            &loop_probe,
            &allowed,
            &denied,
            &timeline,
            &format!("cycle {cycle}, after restart"),
        );
    }
    assert_eq!(reloads, RELOADS);

    // Enough attempts of each kind over the whole run.
    wait_until(
        &format!("at least {MIN_EACH} attempts of each kind"),
        Duration::from_secs(60),
        || {
            let t = tally(&loop_probe.loop_attempts(), &allowed, &denied);
            (t.allowed_ok + t.bad.len() >= MIN_EACH && t.denied_eperm + t.bad.len() >= MIN_EACH)
                .then_some(())
        },
    );
    timeline.note("stop the loop");
    let last = assert_no_bad_attempts(&loop_probe, &allowed, &denied, &timeline, "end of the run");
    let outcome = loop_probe.sigterm_and_collect();
    let attempts: Vec<LoopAttempt> = outcome
        .stdout
        .iter()
        .filter_map(|l| ztai_tests::persist::parse_loop_attempt(l))
        .collect();
    let t = tally(&attempts, &allowed, &denied);
    assert!(
        t.bad.is_empty(),
        "wrong attempts at the very end: {:?}",
        t.bad
    );
    assert!(t.allowed_ok >= last.allowed_ok && t.denied_eperm >= last.denied_eperm);
    assert!(
        t.allowed_ok >= MIN_EACH && t.denied_eperm >= MIN_EACH,
        "too few attempts: {t:?}"
    );
    let max_ms = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let avg_ms = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let slowest_attempt_ms = attempts
        .iter()
        .map(|a| (a.end_ns - a.start_ns) as f64 / 1e6)
        .fold(0.0, f64::max);
    println!(
        "chaos summary: {} attempts ({} allowed, all ok; {} denied, all EPERM) over {:.1} s; \
         {RESTARTS} SIGKILL+restart (kill->ready avg {:.0} ms, max {:.0} ms); {RELOADS} reloads \
         (rename->applied avg {:.0} ms, max {:.0} ms); slowest attempt {:.1} ms; final generation {generation}",
        attempts.len(),
        t.allowed_ok,
        t.denied_eperm,
        t0.elapsed().as_secs_f64(),
        avg_ms(&down_ms),
        max_ms(&down_ms),
        avg_ms(&reload_ms),
        max_ms(&reload_ms),
        slowest_attempt_ms
    );
}
