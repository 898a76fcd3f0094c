//! The agent's capabilities. Without CAP_SYS_ADMIN, CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH it
//! still enforces but sees less (pod addresses, sockets bound before it started): it goes ready
//! and says so, one warning naming each missing capability and its consequence, and
//! `ztai_capability_missing{capability}` = 1. Without one it loads with it refuses to start,
//! naming it. Capabilities are dropped from the agent's bounding set with `setpriv` (util-linux),
//! so as root it execs with exactly the rest.

use std::collections::BTreeSet;

use serde_json::Value;
use ztai_tests::metrics::sample_value;
use ztai_tests::{
    Agent, DEFAULT_TIMEOUT, Policy, READY_TIMEOUT, TestCgroup, require_agent, wait_until,
};

/// The capabilities whose absence only makes the agent see less, as it names them.
const SEES_LESS: [&str; 3] = ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"];

/// Bits (linux/capability.h).
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;

fn policy(cg: &TestCgroup) -> Policy {
    Policy::enforce(cg).cgroups("app", &["app"])
}

/// `setpriv` dropping `caps` (setpriv's names: `sys_ptrace`, …) from the bounding set.
fn without(caps: &[&str]) -> Vec<String> {
    let drop: Vec<String> = caps.iter().map(|c| format!("-{c}")).collect();
    ["setpriv", "--bounding-set", &drop.join(","), "--"]
        .map(String::from)
        .to_vec()
}

fn start_without(caps: &[&str], cg: &TestCgroup) -> Agent {
    let wrapper = without(caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Agent::start_wrapped(&policy(cg), cg, &wrapper)
}

/// The agent's effective capability set, from its /proc status.
fn effective_caps(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap_or_else(|e| panic!("status of agent pid {}: {e}", agent.pid()));
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no CapEff in the agent's status:\n{status}"))
}

/// The capabilities named by the agent's "capability missing" warnings, checking each line.
#[track_caller]
fn warned_capabilities(agent: &Agent) -> BTreeSet<String> {
    agent
        .logs()
        .into_iter()
        .filter(|l| l.get("capability").is_some())
        .map(|l| {
            assert_eq!(l["level"], "warn", "{l}\n{}", agent.diagnostics());
            let consequence = l["consequence"].as_str().unwrap_or_default();
            assert!(
                !consequence.is_empty(),
                "the warning says what the capability costs: {l}"
            );
            l["capability"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

/// `ztai_capability_missing` for each of [`SEES_LESS`], from one scrape.
fn missing_gauges(agent: &Agent) -> Vec<(&'static str, Option<f64>)> {
    let samples = agent.scrape();
    SEES_LESS
        .into_iter()
        .map(|cap| {
            (
                cap,
                sample_value(&samples, "ztai_capability_missing", &[("capability", cap)]),
            )
        })
        .collect()
}

#[test]
fn without_ptrace_and_dac_read_search_the_agent_goes_ready_and_names_what_it_misses() {
    require_agent!();
    let cg = TestCgroup::new();
    let _app = cg.child("app");
    // CAP_DAC_OVERRIDE passes the same directory checks as CAP_DAC_READ_SEARCH (the agent
    // counts it as a stand-in), so it goes too.
    let mut agent = start_without(&["sys_ptrace", "dac_read_search", "dac_override"], &cg);
    agent.wait_ready(READY_TIMEOUT);

    // Else this test proves nothing.
    let caps = effective_caps(&agent);
    for bit in [CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE] {
        assert_eq!(
            caps & 1 << bit,
            0,
            "capability {bit} still effective: {caps:#x}"
        );
    }

    // Logged before "ready", so all there now.
    let warned = warned_capabilities(&agent);
    assert_eq!(
        warned,
        ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
            .map(String::from)
            .into(),
        "one warning per missing capability, no other\n{}",
        agent.diagnostics()
    );
    assert_eq!(
        agent
            .logs()
            .iter()
            .filter(|l| l.get("capability").is_some())
            .count(),
        2,
        "each warned once\n{}",
        agent.diagnostics()
    );

    assert_eq!(
        missing_gauges(&agent),
        [
            ("CAP_SYS_ADMIN", Some(0.0)),
            ("CAP_SYS_PTRACE", Some(1.0)),
            ("CAP_DAC_READ_SEARCH", Some(1.0)),
        ],
        "ztai_capability_missing{{capability}}\n{}",
        agent.diagnostics()
    );
    let r = agent.http_get("/readyz");
    assert_eq!(r.status, 200, "degraded, but ready: {r:?}");
}

#[test]
fn with_every_capability_nothing_is_reported_missing() {
    require_agent!();
    let cg = TestCgroup::new();
    let _app = cg.child("app");
    let agent = Agent::start_ready(&policy(&cg), &cg);

    assert_eq!(
        warned_capabilities(&agent),
        BTreeSet::new(),
        "{}",
        agent.diagnostics()
    );
    assert_eq!(
        missing_gauges(&agent),
        SEES_LESS.map(|cap| (cap, Some(0.0))),
        "ztai_capability_missing{{capability}}\n{}",
        agent.diagnostics()
    );
}

#[test]
fn without_net_admin_the_agent_refuses_to_start_naming_it() {
    require_agent!();
    let cg = TestCgroup::new();
    let _app = cg.child("app");
    let mut agent = start_without(&["net_admin"], &cg);

    let failed: Value = wait_until("the agent's refusal", DEFAULT_TIMEOUT, || {
        agent.logs().into_iter().find(|l| l["level"] == "error")
    });
    let status = agent.stop();
    assert!(
        !status.success(),
        "it refused, so it exits non-zero: {status}"
    );
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("CAP_NET_ADMIN"),
        "the refusal names the capability: {failed}"
    );
    assert!(
        SEES_LESS.iter().all(|cap| !error.contains(cap)),
        "only what stops loading is named: {failed}"
    );
    assert!(
        !agent
            .logs()
            .iter()
            .any(|l| l["msg"] == "ready" || l["msg"] == "serving metrics"),
        "refused before serving or loading anything\n{}",
        agent.diagnostics()
    );
    assert!(!agent.pin_dir().exists(), "nothing pinned");
}
