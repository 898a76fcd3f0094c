//! `cargo xtask fuzz`: runs the cargo-fuzz target `policy` (fuzz/) for a
//! while and fails if it finds a crash, panic, hang or out-of-memory.
//!
//! The seed corpus in fuzz/corpus/policy is only read; what libFuzzer adds
//! goes to fuzz/corpus-run/policy (ignored by git) and is reused next time.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{Context as _, bail};

use super::toolchain::NIGHTLY;

const TARGET: &str = "policy";
/// An input slower than this counts as a hang (libFuzzer's default is 20 minutes).
const TIMEOUT_SECONDS: u64 = 10;
/// Room for policies larger than the seeds (the largest is about 2.5 KB).
const MAX_LEN: u64 = 8192;

fn fuzz_dir() -> PathBuf {
    super::workspace_root().join("fuzz")
}

/// A host-toolchain command without the variables `cargo xtask` runs under,
/// so `cargo +nightly …` really picks the nightly.
fn plain(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for key in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO"] {
        cmd.env_remove(key);
    }
    cmd
}

fn have_cargo_fuzz() -> bool {
    plain("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if have_cargo_fuzz() {
        return Ok(());
    }
    eprintln!("xtask fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    super::run_cmd(plain("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("cannot install cargo-fuzz; crates.io must be reachable")?;
    if !have_cargo_fuzz() {
        bail!(
            "cargo-fuzz was installed but `cargo fuzz` does not run: is the cargo bin folder (~/.cargo/bin) on PATH?"
        );
    }
    Ok(())
}

/// Files in `dir` modified at or after `since`, newest first.
fn new_files(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut found: Vec<(SystemTime, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            (modified >= since && e.path().is_file()).then(|| (modified, e.path()))
        })
        .collect();
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Fuzzes the policy parser and compiler for `seconds`.
pub fn run(seconds: u64) -> anyhow::Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    // The fuzz build compiles ztai-agent, whose build.rs needs the eBPF toolchain.
    super::setup()?;
    ensure_cargo_fuzz()?;

    let dir = fuzz_dir();
    let seeds = dir.join("corpus").join(TARGET);
    let work = dir.join("corpus-run").join(TARGET);
    let artifacts = dir.join("artifacts").join(TARGET);
    let dict = dir.join(format!("{TARGET}.dict"));
    for d in [&work, &artifacts] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let started = SystemTime::now();

    let mut cmd = plain("cargo");
    cmd.current_dir(&dir)
        .args([&format!("+{NIGHTLY}"), "fuzz", "run", TARGET])
        // libFuzzer writes new inputs to the first corpus folder only.
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={TIMEOUT_SECONDS}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-dict={}", dict.display()))
        .arg("-print_final_stats=1");
    let result = super::run_cmd(&mut cmd);

    let found = new_files(&artifacts, started);
    if found.is_empty() {
        return result.context("the fuzz run failed before finding a crash (see the output above)");
    }
    let rel = |p: &Path| p.strip_prefix(&dir).map(Path::to_path_buf).unwrap_or_else(|_| p.to_path_buf());
    eprintln!("xtask fuzz: the fuzzer found {} failing input(s):", found.len());
    for path in &found {
        eprintln!("  {}", path.display());
    }
    let first = rel(&found[0]);
    eprintln!("xtask fuzz: reproduce with  (cd fuzz && cargo +{NIGHTLY} fuzz run {TARGET} {})", first.display());
    eprintln!("xtask fuzz: minimize with   (cd fuzz && cargo +{NIGHTLY} fuzz tmin {TARGET} {})", first.display());
    match result {
        Ok(()) => bail!("the fuzzer wrote failing inputs to {}", artifacts.display()),
        Err(e) => Err(e.context(format!("the fuzzer found a crash: see {}", found[0].display()))),
    }
}
