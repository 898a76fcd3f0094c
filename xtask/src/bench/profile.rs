//! Where the time goes: system-wide `perf record` (cpu-clock sampling, works
//! without hardware counters, e.g. in VMs) while a connection loop runs, then
//! the samples attributed to the enforcement code on their call chains.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::sys;

pub const HZ: u64 = 10_000;
pub const PROCESS_HZ: u64 = 1_000;

/// A running `perf record -a`; stopped with SIGINT (bounded by its own `sleep`).
pub struct Recording {
    child: Option<Child>,
    file: PathBuf,
}

impl Recording {
    /// Every CPU, kernel call chains (frame pointers).
    pub fn start(file: &Path) -> anyhow::Result<Recording> {
        Recording::spawn(file, &["-a", "-g", "-F", &HZ.to_string()])
    }

    /// One process, user-space call chains unwound from DWARF CFI (release
    /// builds have no frame pointers), at a lower rate: each sample copies stack.
    pub fn start_process(file: &Path, pid: u32) -> anyhow::Result<Recording> {
        let pid = pid.to_string();
        let hz = PROCESS_HZ.to_string();
        Recording::spawn(
            file,
            &["-p", &pid, "--call-graph", "dwarf,16384", "-F", &hz],
        )
    }

    fn spawn(file: &Path, args: &[&str]) -> anyhow::Result<Recording> {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-q", "-e", "cpu-clock"])
            .args(args)
            .arg("-o")
            .arg(file);
        // System-wide recording is bounded by a workload even if the bench
        // dies without stopping it; a per-process one ends with the process.
        if !args.contains(&"-p") {
            cmd.args(["--", "sleep", "120"]);
        }
        let _ = std::fs::remove_file(file);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run perf record")?;
        // perf needs a moment to set up its per-CPU buffers.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Recording {
            child: Some(child),
            file: file.to_path_buf(),
        })
    }

    pub fn stop(mut self) -> anyhow::Result<PathBuf> {
        let mut child = self.child.take().expect("running");
        let _ = sys::signal_pid(child.id(), sys::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                if !self.file.exists() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read as _;
                        let _ = e.read_to_string(&mut err);
                    }
                    bail!("perf record wrote nothing ({status}): {err}");
                }
                return Ok(self.file.clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("perf record did not stop")
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = sys::signal_pid(c.id(), sys::SIGINT);
            std::thread::sleep(Duration::from_millis(200));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Samples attributed to enforcement code.
#[derive(Default, Clone)]
pub struct Profile {
    pub total: u64,
    /// Group -> samples whose call chain contains it.
    pub groups: BTreeMap<String, u64>,
    /// ztai program -> innermost function -> samples.
    pub leaves: BTreeMap<String, BTreeMap<String, u64>>,
}

pub const GROUP_HOOKS: &str = "cgroup BPF hooks (ztai programs + dispatch)";
pub const GROUP_NFT: &str = "nftables rule evaluation (nft_do_chain)";
pub const GROUP_CT: &str = "conntrack (nf_conntrack_in, confirm)";

/// `bpf_prog_0123456789abcdef_ztai_connect4+0x12` -> `ztai_connect4`; `foo+0x1` -> `foo`.
fn clean(sym: &str) -> String {
    let s = match sym.rfind("+0x") {
        Some(i) => &sym[..i],
        None => sym,
    };
    if let Some(rest) = s.strip_prefix("bpf_prog_")
        && let Some((tag, name)) = rest.split_once('_')
        && tag.len() == 16
    {
        return format!("bpf:{name}");
    }
    s.to_string()
}

fn script(file: &Path) -> anyhow::Result<String> {
    let out = Command::new("perf")
        .args(["script", "--no-inline", "-F", "ip,sym", "-i"])
        .arg(file)
        .stderr(Stdio::null())
        .output()
        .context("cannot run perf script")?;
    if !out.status.success() {
        bail!("perf script failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Each sample's frames, innermost first.
fn samples(text: &str) -> impl Iterator<Item = Vec<String>> + '_ {
    text.split("\n\n")
        .map(|sample| {
            sample
                .lines()
                .filter_map(|l| {
                    let l = l.trim_start();
                    let (_ip, rest) = l.split_once(' ')?;
                    // "sym+0x1f (dso)"; Rust symbols contain spaces ("<A as B>::f").
                    let sym = rest.rsplit_once(" (").map(|(s, _)| s).unwrap_or(rest);
                    Some(clean(sym))
                })
                .collect::<Vec<_>>()
        })
        .filter(|f| !f.is_empty())
}

pub fn analyze(file: &Path) -> anyhow::Result<Profile> {
    let text = script(file)?;
    let mut p = Profile::default();
    for frames in samples(&text) {
        p.total += 1;
        let has = |pred: &dyn Fn(&str) -> bool| frames.iter().any(|f| pred(f));
        if has(&|f| f.starts_with("__cgroup_bpf_run_filter"))
            || has(&|f| f.starts_with("bpf:ztai_"))
        {
            *p.groups.entry(GROUP_HOOKS.into()).or_default() += 1;
        }
        if has(&|f| f.starts_with("nft_do_chain")) {
            *p.groups.entry(GROUP_NFT.into()).or_default() += 1;
        }
        if has(&|f| {
            f.starts_with("nf_conntrack_in")
                || f.starts_with("ipv4_confirm")
                || f.starts_with("nf_confirm")
                || f.starts_with("__nf_conntrack_confirm")
        }) {
            *p.groups.entry(GROUP_CT.into()).or_default() += 1;
        }
        if let Some(prog) = frames.iter().find(|f| f.starts_with("bpf:ztai_")) {
            let prog = prog.trim_start_matches("bpf:").to_string();
            *p.groups.entry(prog.clone()).or_default() += 1;
            *p.leaves
                .entry(prog)
                .or_default()
                .entry(frames[0].clone())
                .or_default() += 1;
        }
    }
    Ok(p)
}

/// Microseconds of CPU per operation that `samples` stand for.
pub fn us_per_op(samples: u64, ops: u64) -> f64 {
    samples as f64 / HZ as f64 * 1e6 / ops.max(1) as f64
}

/// Where one process spends its CPU.
#[derive(Default, Clone)]
pub struct ProcessProfile {
    pub total: u64,
    /// Innermost `ztai_agent::` function on the call chain -> samples.
    pub agent_fns: BTreeMap<String, u64>,
    /// Innermost function -> samples.
    pub leaves: BTreeMap<String, u64>,
}

pub fn analyze_process(file: &Path) -> anyhow::Result<ProcessProfile> {
    let text = script(file)?;
    let mut p = ProcessProfile::default();
    for frames in samples(&text) {
        p.total += 1;
        *p.leaves.entry(frames[0].clone()).or_default() += 1;
        let agent = frames
            .iter()
            .find(|f| f.starts_with("ztai_agent::"))
            .map(|f| f.replace("::{{closure}}", ""))
            .unwrap_or_else(|| "(no ztai_agent frame)".into());
        *p.agent_fns.entry(agent).or_default() += 1;
    }
    Ok(p)
}

/// The `n` largest entries as "`name` 12 %".
pub fn top(map: &BTreeMap<String, u64>, total: u64, n: usize) -> String {
    let mut v: Vec<(&String, &u64)> = map.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .take(n)
        .map(|(k, c)| format!("`{k}` {:.0} %", **c as f64 * 100.0 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_script_frames() {
        let text = "\t ffffffffc0025b90 bpf_prog_9677be88a26c8f8e_ztai_connect4+0x1f ([kernel.kallsyms])\n\t 1234 <a::B as c::D>::f+0x2 (/bin/x)\n\n\t 99 lookup_nulls_elem_raw+0x5 ([kernel.kallsyms])\n";
        let s: Vec<Vec<String>> = samples(text).collect();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            vec![
                "bpf:ztai_connect4".to_string(),
                "<a::B as c::D>::f".to_string()
            ]
        );
        assert_eq!(s[1][0], "lookup_nulls_elem_raw");
    }
}
