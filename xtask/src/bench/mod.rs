//! `cargo xtask bench [--quick]`: what ztai costs, measured on this machine.
//!
//! Runs as root. Everything happens in a private network namespace (traffic on
//! its loopback, the nftables table inside it) and under the cgroup
//! `ztai-bench-<pid>` directly below the cgroup2 mount; both are gone when the
//! bench ends, also on error or Ctrl-C. `kernel.bpf_stats_enabled` is set only
//! while it is needed and restored.
//!
//! The full run writes `docs/benchmarks.md` (between its generated-section
//! markers) and `docs/img/`; `--quick` (tiny counts, one repetition, small
//! policies; for CI) writes to `target/bench/` instead. Missed targets are
//! reported, never an error.

mod agent;
mod bpf;
mod cgroup;
mod child;
mod nft;
mod phases;
mod policy;
mod profile;
mod report;
mod stats;
mod sys;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

/// Entry point. `build_agent(release)` builds ztai-agent and returns its path:
/// the full run measures a release build; `--quick` (CI) takes the debug
/// build the tests use. A bench child process (see [`child`]) runs its role.
pub fn run(
    quick: bool,
    workspace: &Path,
    build_agent: impl FnOnce(bool) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<()> {
    if let Some(role) = child::role() {
        return child::child_main(&role);
    }
    if !sys::is_root() {
        println!(
            "SKIPPED: cargo xtask bench needs root (cgroups, eBPF, nftables, a network namespace): sudo -E cargo xtask bench"
        );
        return Ok(());
    }
    let agent_bin = build_agent(!quick)?;
    // Package installs need the host's network: before the private namespace.
    let have_nft =
        ensure_tool("nft", &["--version"], "nftables") && have("unshare", &["--version"]);
    let have_iperf3 = ensure_tool("iperf3", &["--version"], "iperf3");
    let have_bpftool = ensure_tool("bpftool", &["version"], "bpftool");
    // Optional: the profile of where the time goes (Debian: linux-perf).
    let have_perf = if quick {
        have("perf", &["--version"])
    } else {
        ensure_tool("perf", &["--version"], "linux-perf")
    };
    let machine = report::Machine::describe(workspace);

    sys::install_interrupt_flag();
    sys::enter_private_netns().context("cannot create a private network namespace")?;

    let mut bench = phases::Bench::new(quick, agent_bin, have_nft, have_iperf3, have_bpftool)?;
    if quick {
        bench.r.notes.push("quick run (CI): debug build of ztai-agent, tiny counts, one repetition, small policies; a smoke test, not a measurement".into());
    }
    if !have_nft {
        bench.r.notes.push("nftables (nft) is missing and could not be installed: the nftables comparison was skipped".into());
    }
    if !have_iperf3 {
        bench.r.notes.push(
            "iperf3 is missing and could not be installed: bulk throughput used the built-in loop"
                .into(),
        );
    }
    bench.foreign_programs();
    // ZTAI_BENCH_ONLY=connections,udp,... runs some phases (results then go
    // to target/bench/, never to docs/).
    let only: Option<Vec<String>> = std::env::var("ZTAI_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let want = |phase: &str| only.as_ref().is_none_or(|o| o.iter().any(|p| p == phase));
    let started = std::time::Instant::now();
    if want("connections") {
        bench.connections()?;
    }
    if want("bulk") {
        bench.bulk()?;
    }
    if want("udp") {
        bench.udp()?;
    }
    if want("apply") {
        bench.apply()?;
    }
    if want("cgroup") {
        bench.cgroup_latency()?;
    }
    if want("agent") {
        bench.agent_resources()?;
    }
    if want("bpf") {
        if have_bpftool {
            bench.bpf_costs()?;
        } else {
            bench.r.notes.push("bpftool is missing and could not be installed: per-invocation costs were not measured".into());
        }
    }
    if want("profile") {
        if have_perf {
            bench.profile()?;
            bench.agent_profiles()?;
        } else {
            bench.r.notes.push("perf is missing: the profile of where the time goes was not taken (Debian: apt-get install linux-perf)".into());
        }
    }
    let elapsed = started.elapsed();
    let mut machine = machine;
    machine.load_end = report::loadavg();

    let (doc, img) = if quick || only.is_some() {
        let dir = workspace.join("target").join("bench");
        (dir.join("benchmarks.md"), dir.join("img"))
    } else {
        (
            workspace.join("docs").join("benchmarks.md"),
            workspace.join("docs").join("img"),
        )
    };
    let rep = report::Report {
        quick,
        machine,
        params: &bench.p,
        r: &bench.r,
        elapsed,
    };
    let targets = rep.targets();
    println!("\n{}", report::targets_text(&targets));
    rep.write(&doc, &img, &targets)?;
    println!(
        "bench: results written to {} (took {:.0} s)",
        doc.display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn have(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `program` present, or installed with apt-get (Debian package `package`).
fn ensure_tool(program: &str, probe: &[&str], package: &str) -> bool {
    if have(program, probe) {
        return true;
    }
    if !have("apt-get", &["--version"]) {
        return false;
    }
    eprintln!("bench: installing {package} (apt-get)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        install();
    }
    have(program, probe)
}
