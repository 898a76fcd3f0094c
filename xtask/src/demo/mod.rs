//! `cargo xtask demo [--check] [--audit]`: the seed AI architecture on this
//! host, enforced by ztai-agent with policies/ai-reference.yaml.
//!
//! 1. Real services from Debian's archive (installed if missing), each in its
//!    own cgroup `<cgroup2 mount>/ai.slice/<segment>` (entered before the
//!    process opens a socket): an OpenAI-style completion server (inference),
//!    a throwaway PostgreSQL cluster (retrieval), redis-server
//!    (conversation-store), nginx (gateway, proxying /crm/ to the enterprise).
//!    The enterprise CRM runs in a separate network namespace joined by a veth
//!    pair, at the addresses of the policy's enterprise cidrs.
//! 2. ztai-agent attached at `ai.slice`, with private pins, control socket and
//!    metrics port.
//! 3. The reachability matrix: every segment to every other with psql,
//!    redis-cli and curl, run from inside the source segment's cgroup; each
//!    cell judged allowed / EPERM / dropped with the agent's violation report.
//! 4. The matrix, the agent's top flows and a few metrics.
//! 5. Teardown by RAII guards, also on Ctrl-C (the signal only sets a flag
//!    that every wait polls), then a check that nothing is left.
//!
//! `--audit` runs a copy of the policy with `spec.mode: audit`; `--check` does
//! not wait for Enter at the end. Both exit non-zero when the matrix differs
//! from the policy or anything is left behind.

mod agent;
mod host;
mod matrix;
mod packages;
mod policy;
mod services;
mod sys;

use std::collections::HashMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use self::agent::Agent;
use self::host::{CgroupTree, Remote, TempDir};
use self::sys::{FileLock, Proc};

pub struct Options {
    /// Non-interactive: assert and exit (CI).
    pub check: bool,
    /// Run the policy in audit mode.
    pub audit: bool,
}

const POLICY: &str = "policies/ai-reference.yaml";
const ATTACH: &str = "ai.slice";

/// Everything the demo made, dropped in field order: services, the agent
/// (SIGTERM: it detaches and removes its pins), the cgroup subtrees (killing
/// anything left inside), the remote namespace, the temp dir, the lock.
#[derive(Default)]
struct Stack {
    services: Vec<Proc>,
    agent: Option<Agent>,
    ai_slice: Option<CgroupTree>,
    track: Option<CgroupTree>,
    remote: Option<Remote>,
    temp: Option<TempDir>,
    lock: Option<FileLock>,
}

#[derive(Default)]
struct Report {
    timings: Vec<(&'static str, Duration)>,
    failures: Vec<String>,
    agent_problems: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

fn phase<T>(report: &mut Report, name: &'static str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let t = Instant::now();
    let r = f();
    report.timings.push((name, t.elapsed()));
    r
}

fn say(msg: &str) {
    eprintln!("demo: {msg}");
}

/// Entry point; `build_agent` builds ztai-agent and returns its path (called
/// after the root check).
pub fn main(opts: Options, root: &Path, build_agent: impl FnOnce() -> anyhow::Result<PathBuf>) -> anyhow::Result<()> {
    if !sys::is_root() {
        bail!(
            "`cargo xtask demo` needs root: it creates cgroups, a network namespace and a veth pair, \
             installs packages with apt-get and loads eBPF programs (try: sudo -E cargo xtask demo)"
        );
    }
    sys::install_signal_handlers();
    let started = Instant::now();
    let mut report = Report::default();

    let policy_file = root.join(POLICY);
    let text = std::fs::read_to_string(&policy_file).with_context(|| format!("cannot read {}", policy_file.display()))?;
    let text = if opts.audit { policy::audit_copy(&text)? } else { text };
    let policy = policy::parse(&text).with_context(|| format!("reading {}", policy_file.display()))?;
    for seg in matrix::SOURCES {
        if policy.segment(seg).is_none() {
            bail!("{POLICY} has no segment `{seg}`; the demo's architecture needs it");
        }
    }

    let agent_bin = phase(&mut report, "build ztai-agent", build_agent)?;
    sys::check_interrupt()?;
    let tools = phase(&mut report, "packages", || packages::ensure(&mut |m: &str| say(m)))?;
    if !tools.installed.is_empty() {
        say(&format!("installed: {}", tools.installed.join(" ")));
    }

    let mount = host::cgroup2_mount()?;
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(format!("{}{}", host::PREFIX, std::process::id()));
    let temp_path = std::env::temp_dir().join(format!("{}{}", host::PREFIX, std::process::id()));

    let mut stack = Stack::default();
    let outcome = session(&opts, &policy_file, &policy, &text, &tools, &agent_bin, &mount, &pin_dir, &mut stack, &mut report);
    if let Some(agent) = &stack.agent {
        report.agent_problems = Some(agent.stop_problems.clone());
    }
    let made = host::Made { attach: stack.ai_slice.is_some(), track: stack.track.is_some(), remote: stack.remote.is_some() };
    let t = Instant::now();
    say("tearing down");
    drop(stack);
    report.timings.push(("teardown", t.elapsed()));

    let left = host::leftovers(&mount, ATTACH, made, &pin_dir, &temp_path);
    let agent_problems: Vec<String> = report.agent_problems.as_ref().and_then(|p| p.lock().ok().map(|v| v.clone())).unwrap_or_default();

    println!();
    println!(
        "Timings: {} · total {:.1}s",
        report.timings.iter().map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64())).collect::<Vec<_>>().join(" · "),
        started.elapsed().as_secs_f64()
    );
    for p in &agent_problems {
        println!("✗ agent: {p}");
    }
    if left.is_empty() {
        println!("Teardown: clean (no ai.slice or ztai-demo cgroup, netns, veth, pins, temp dir or demo process left)");
    } else {
        println!("✗ Teardown left: {}", left.join("; "));
    }

    let mut failures = report.failures;
    failures.extend(agent_problems.iter().map(|p| format!("agent: {p}")));
    if !left.is_empty() {
        failures.push(format!("left behind: {}", left.join("; ")));
    }
    match outcome {
        Err(e) if failures.is_empty() => Err(e),
        Err(e) => bail!("{e:#}\nand also:\n{}", failures.iter().map(|f| format!("  - {f}")).collect::<Vec<_>>().join("\n")),
        Ok(()) if failures.is_empty() => {
            println!("demo: OK — the matrix matches {POLICY}{}", if opts.audit { " in audit mode" } else { "" });
            Ok(())
        }
        Ok(()) => bail!("{} problem(s):\n{}", failures.len(), failures.iter().map(|f| format!("  - {f}")).collect::<Vec<_>>().join("\n")),
    }
}

#[allow(clippy::too_many_arguments)]
fn session(
    opts: &Options,
    policy_file: &Path,
    policy: &policy::Policy,
    policy_text: &str,
    tools: &packages::Tools,
    agent_bin: &Path,
    mount: &Path,
    pin_dir: &Path,
    stack: &mut Stack,
    report: &mut Report,
) -> anyhow::Result<()> {
    // ---------------------------------------------------------- setup ---
    let t = Instant::now();
    stack.lock = Some(host::lock()?);
    host::sweep_stale(mount, ATTACH, agent_bin)?;
    services::check_ports_free()?;

    let temp = stack.temp.insert(TempDir::create()?);
    let tmp = temp.path().to_path_buf();
    std::fs::create_dir(tmp.join("logs"))?;
    let control_dir = tmp.join("control");
    std::fs::create_dir(&control_dir)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&control_dir, std::fs::Permissions::from_mode(0o700))?;
    }

    let track = stack.track.insert(CgroupTree::create(mount, host::TRACK_CGROUP, "not made by this demo")?);
    let agent_cgroup = track.child("agent")?;
    let remote_cgroup = track.child("remote")?;
    let ai = stack.ai_slice.insert(CgroupTree::create(mount, ATTACH, "perhaps a real systemd slice")?);
    let mut cgroups: HashMap<String, PathBuf> = HashMap::new();
    for seg in &matrix::SOURCES[..5] {
        let rel = policy.cgroup_dir(seg)?;
        let name = rel.strip_prefix(&format!("{ATTACH}/")).expect("cgroup_dir checks the prefix");
        cgroups.insert(seg.to_string(), ai.child(name)?);
    }
    let cgroup_of = |seg: &str| cgroups.get(seg).cloned().unwrap_or_else(|| mount.join(ATTACH).join(seg));

    let ent = policy.segment(matrix::REMOTE_SEGMENT).expect("checked");
    let v4 = ent.cidrs.iter().find(|c| !c.contains(':'));
    let v6 = ent.cidrs.iter().find(|c| c.contains(':'));
    let (Some(v4), Some(v6)) = (v4, v6) else {
        bail!("the demo needs an IPv4 and an IPv6 cidr in the enterprise segment, found {:?}", ent.cidrs);
    };
    let remote = stack.remote.insert(Remote::create(v4, v6)?);
    say(&format!(
        "remote namespace {} up: host {}/{} <-> enterprise {}/{}",
        host::NETNS,
        remote.host_v4,
        remote.host_v6,
        remote.remote_v4,
        remote.remote_v6
    ));

    let layout = services::Layout { tmp: &tmp, tools, remote, cgroup: &cgroup_of, remote_cgroup: &remote_cgroup };
    say("starting the enterprise CRM in the remote namespace");
    stack.services.push(services::start_crm(&layout)?);
    say("starting inference (OpenAI-style completions, python3 http.server)");
    stack.services.push(services::start_inference(&layout)?);
    say(&format!("starting retrieval (PostgreSQL {}{})", tools.pg_major, if tools.pgvector { " + pgvector" } else { "" }));
    let (pg, probes) = services::start_postgres(&layout)?;
    stack.services.push(pg);
    say("starting conversation-store (redis-server)");
    stack.services.push(services::start_redis(&layout)?);
    say("starting gateway (nginx, /crm/ proxied to the enterprise)");
    stack.services.push(services::start_nginx(&layout)?);
    report.timings.push(("setup (netns, cgroups, 5 services)", t.elapsed()));

    // ---------------------------------------------------------- agent ---
    let policy_path = if opts.audit {
        let p = tmp.join("ai-reference-audit.yaml");
        std::fs::write(&p, policy_text)?;
        p
    } else {
        policy_file.to_path_buf()
    };
    let t = Instant::now();
    say(&format!("starting ztai-agent --policy {} --cgroup-root {ATTACH}", policy_path.display()));
    let agent = stack.agent.insert(Agent::start(agent::Config {
        bin: agent_bin,
        policy: &policy_path,
        cgroup_root: ATTACH,
        control_socket: control_dir.join("agent.sock"),
        pin_dir: pin_dir.to_path_buf(),
        cgroup: &agent_cgroup,
    })?);
    agent.wait_ready()?;
    report.timings.push(("agent ready", t.elapsed()));

    // --------------------------------------------------------- header ---
    println!();
    println!(
        "ztai demo — {POLICY}{} under ztai-agent (pid {}) attached at {}",
        if opts.audit { " (a copy with spec.mode: audit)" } else { "" },
        agent.pid(),
        mount.join(ATTACH).display()
    );
    if let Some(r) = &agent.ready {
        println!(
            "  agent ready: {} labeled cgroups, {} sockets already listening recorded, metrics on {}, flows on {}",
            r["labeled_cgroups"].as_u64().map_or("?".into(), |n| n.to_string()),
            r["existing_sockets"].as_u64().map_or("?".into(), |n| n.to_string()),
            r["metrics_addr"].as_str().unwrap_or("?"),
            r["control_socket"].as_str().unwrap_or("?")
        );
    }
    let pids: Vec<String> = stack.services.iter().map(|p| format!("{} pid {}", p.name, p.pid())).collect();
    for p in &pids {
        println!("  service: {p}");
    }
    for n in &tools.notes {
        println!("  note: {n}");
    }
    println!();

    // --------------------------------------------------------- matrix ---
    let agent = stack.agent.as_mut().expect("started");
    let t = Instant::now();
    let env = matrix::Env { tools, remote, probes: &probes, cgroup: &cgroup_of, remote_cgroup: &remote_cgroup };
    let cells = {
        let agent_ref: &Agent = agent;
        let violations = || agent_ref.violations();
        matrix::run(&env, policy, &violations)?
    };
    agent.ensure_running()?;
    report.timings.push(("matrix", t.elapsed()));
    matrix::print(&cells);
    println!();
    let headlines = matrix::headlines(&cells, opts.audit);
    for (text, holds) in &headlines {
        println!("{} {text}", if *holds { "✓" } else { "✗" });
    }
    for c in cells.iter().filter(|c| !c.ok()) {
        report.failures.push(format!("{} -> {}: {}", c.src, c.target.column(), c.problems.join("; ")));
    }
    for (text, holds) in &headlines {
        if !holds {
            report.failures.push(format!("headline does not hold: {text}"));
        }
    }
    let unmatched = agent.violations()?.len() as isize - cells.iter().map(|c| c.lines as isize).sum::<isize>();
    if unmatched > 0 {
        println!("  ({unmatched} further violation line(s) matched no cell; see the agent's stdout below)");
    }

    // ---------------------------------------------- flows and metrics ---
    let t = Instant::now();
    // The agent publishes its flow table and metrics once a second: wait
    // until they count a verdict for every cell.
    let counted = sys::wait_for("the agent's metrics to count the matrix", Duration::from_secs(5), || {
        let body = agent.metrics()?;
        let total: f64 = metric_samples(&body).iter().filter(|(s, _)| s.starts_with("ztai_policy_verdicts_total")).map(|(_, v)| v).sum();
        Ok((total >= cells.len() as f64).then_some(total))
    });
    if let Err(e) = counted {
        sys::check_interrupt()?;
        report.failures.push(format!("metrics: {e:#}"));
    }
    println!();
    println!("Top flows (ztai-agent flows --socket {} --once)", agent.control_socket.display());
    match agent.flows() {
        Ok(out) => {
            let lines: Vec<&str> = out.lines().collect();
            for l in lines.iter().take(24) {
                println!("  {l}");
            }
            if lines.len() > 24 {
                println!("  … {} more lines", lines.len() - 24);
            }
        }
        Err(e) => report.failures.push(format!("flows: {e:#}")),
    }
    println!();
    println!("Metrics (GET http://{}/metrics, excerpt)", agent.metrics_addr.map(|a| a.to_string()).unwrap_or_default());
    match agent.metrics() {
        Ok(body) => {
            for l in metric_excerpt(&body) {
                println!("  {l}");
            }
        }
        Err(e) => report.failures.push(format!("metrics: {e:#}")),
    }
    println!();
    println!("Violation reports (the agent's stdout)");
    for l in agent.raw_violations() {
        println!("  {l}");
    }
    report.timings.push(("flows + metrics", t.elapsed()));

    let problems = agent.log_problems();
    if problems.is_empty() {
        println!();
        println!("Agent log: no warnings or errors");
    } else {
        println!();
        println!("Agent log: {} warning(s)/error(s)", problems.len());
        for (level, line) in &problems {
            println!("  {line}");
            if level != "warn" {
                report.failures.push(format!("the agent logged ({level}): {line}"));
            }
        }
    }

    if !opts.check && sys::stdin_is_tty() {
        linger(agent, &cgroup_of, remote)?;
    }
    Ok(())
}

/// (series, value) of every sample line.
fn metric_samples(body: &str) -> Vec<(&str, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series, value.parse().ok()?))
        })
        .collect()
}

/// The verdict counters, gauges and the busiest flow series.
fn metric_excerpt(body: &str) -> Vec<String> {
    let samples = metric_samples(body);
    let mut out: Vec<String> = samples
        .iter()
        .filter(|(s, _)| {
            ["ztai_policy_verdicts_total", "ztai_labeled_cgroups", "ztai_policy_generation", "ztai_events_dropped_total"]
                .iter()
                .any(|m| s.starts_with(m))
        })
        .map(|(s, v)| format!("{s} {v}"))
        .collect();
    let mut flows: Vec<&(&str, f64)> = samples.iter().filter(|(s, _)| s.starts_with("ztai_flow_packets_total{")).collect();
    flows.sort_by(|a, b| b.1.total_cmp(&a.1));
    out.extend(flows.iter().take(6).map(|(s, v)| format!("{s} {v}")));
    out
}

/// Interactive end: keep everything up until Enter or Ctrl-C, showing new
/// violation lines as they arrive.
fn linger(agent: &mut Agent, cgroup_of: &dyn Fn(&str) -> PathBuf, remote: &Remote) -> anyhow::Result<()> {
    println!();
    println!("The demo stays up until you press Enter (or Ctrl-C). In another root shell, try:");
    println!("  sh -c 'echo $$ > {}/cgroup.procs; exec redis-cli -h 127.0.0.1 -p 6379 ping'", cgroup_of("inference").display());
    println!(
        "  sh -c 'echo $$ > {}/cgroup.procs; exec curl -s http://127.0.0.1:8080/crm/customers/42'",
        cgroup_of("orchestrator").display()
    );
    println!(
        "  ip netns exec {} curl -sS --connect-timeout 3 http://{}:8080/crm/customers/42   # the enterprise calling in: dropped",
        host::NETNS,
        remote.host_v4
    );
    println!("  {} flows --socket {}", agent.bin().display(), agent.control_socket.display());
    println!("New violation reports appear here.");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    let mut shown = agent.raw_violations().len();
    loop {
        if rx.try_recv().is_ok() || sys::interrupted() {
            return Ok(());
        }
        let lines = agent.raw_violations();
        for l in &lines[shown.min(lines.len())..] {
            println!("  {l}");
        }
        shown = lines.len();
        agent.ensure_running()?;
        std::thread::sleep(Duration::from_millis(100));
    }
}
