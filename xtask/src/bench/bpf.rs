//! The kernel's own accounting of BPF program runs (`kernel.bpf_stats_enabled`),
//! read with bpftool for the programs attached at the bench's cgroup only.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns run-time accounting on; puts the previous value back on drop.
pub struct StatsEnabled {
    old: String,
}

impl StatsEnabled {
    pub fn enable() -> anyhow::Result<StatsEnabled> {
        let old = std::fs::read_to_string(SYSCTL)
            .with_context(|| format!("cannot read {SYSCTL}"))?
            .trim()
            .to_string();
        std::fs::write(SYSCTL, "1").with_context(|| format!("cannot write {SYSCTL}"))?;
        Ok(StatsEnabled { old })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.old) {
            eprintln!(
                "xtask bench: cannot restore kernel.bpf_stats_enabled={}: {e}",
                self.old
            );
        }
    }
}

fn bpftool(args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("cannot run bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // Empty output means an empty list.
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(text.trim())
        .with_context(|| format!("bpftool {} printed no JSON", args.join(" ")))
}

#[derive(Clone, Debug)]
pub struct Attached {
    pub id: u64,
    pub name: String,
    pub attach_type: String,
}

/// Programs attached directly at `cgroup` (with `effective`: also those inherited from above).
pub fn attached(cgroup: &Path, effective: bool) -> anyhow::Result<Vec<Attached>> {
    let path = cgroup.to_string_lossy();
    let mut args = vec!["cgroup", "show", path.as_ref()];
    if effective {
        args.push("effective");
    }
    let v = bpftool(&args)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Attached {
                id: p.get("id")?.as_u64()?,
                name: p
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                attach_type: p
                    .get("attach_type")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
            })
        })
        .collect())
}

/// `(run_time_ns, run_cnt)` of each program in `ids`.
pub fn run_stats(ids: &[u64]) -> anyhow::Result<HashMap<u64, (u64, u64)>> {
    let v = bpftool(&["prog", "show"])?;
    let mut out = HashMap::new();
    for p in v.as_array().into_iter().flatten() {
        let Some(id) = p.get("id").and_then(Value::as_u64) else {
            continue;
        };
        if ids.contains(&id) {
            let ns = p.get("run_time_ns").and_then(Value::as_u64).unwrap_or(0);
            let cnt = p.get("run_cnt").and_then(Value::as_u64).unwrap_or(0);
            out.insert(id, (ns, cnt));
        }
    }
    for id in ids {
        if !out.contains_key(id) {
            bail!("bpftool prog show does not list program {id}");
        }
    }
    Ok(out)
}

/// Calls in the program's verified ("xlated") code by callee, e.g.
/// `__htab_map_lookup_elem` (a static count: call sites, not executions).
pub fn static_calls(id: u64) -> anyhow::Result<BTreeMap<String, u64>> {
    let out = Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output()
        .context("cannot run bpftool")?;
    if !out.status.success() {
        bail!("bpftool prog dump xlated id {id} failed");
    }
    let mut calls = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((_, rest)) = line.split_once(" call ") else {
            continue;
        };
        let name = rest.split(['#', ' ']).next().unwrap_or("").trim();
        // `call pc+N`: a call to one of the program's own functions.
        if !name.is_empty() && name != "pc" && !name.starts_with("pc+") && !name.starts_with("pc-")
        {
            *calls.entry(name.to_string()).or_default() += 1;
        }
    }
    Ok(calls)
}
