//! Installs what the eBPF build needs: the nightly's rust-src and bpf-linker
//! built against the nightly's own libLLVM. Shared by `cargo xtask setup` and
//! ztai-agent's build.rs (included with `#[path]`), so it uses std only.
//! Idempotent: a second run only checks.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const NIGHTLY: &str = "nightly";

/// Where tools are kept: `$ZTAI_TOOLS_DIR`, else `$XDG_CACHE_HOME/ztai`, else
/// `~/.cache/ztai`. Not /tmp: bpf-linker keeps an rpath into it.
pub fn tools_dir() -> Result<PathBuf, String> {
    if let Some(d) = env::var_os("ZTAI_TOOLS_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("ztai"));
    }
    match env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("ztai")),
        None => Err("neither ZTAI_TOOLS_DIR, XDG_CACHE_HOME nor HOME is set: set ZTAI_TOOLS_DIR to a writable folder".into()),
    }
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A Command for a tool of the host toolchain, with the variables cargo sets
/// for build scripts removed so a nested cargo builds for the host as usual.
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().to_string();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "RUSTDOC", "TARGET", "HOST", "OUT_DIR", "RUSTUP_TOOLCHAIN"]
                .contains(&key.as_str())
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

fn nightly_sysroot() -> Result<PathBuf, String> {
    output(clean_command("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
        .map(PathBuf::from)
        .map_err(|e| {
            format!("the `{NIGHTLY}` toolchain is missing or broken ({e}); install it with: rustup toolchain install {NIGHTLY}")
        })
}

/// `rustc +nightly -vV` commit date and hash, so a new nightly gets its own bpf-linker.
fn nightly_tag() -> Result<String, String> {
    let v = output(clean_command("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let field = |name: &str| {
        v.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|s| s.trim().chars().take(12).collect::<String>())
            .unwrap_or_else(|| "unknown".into())
    };
    Ok(format!("{}-{}", field("commit-date:"), field("commit-hash:")))
}

pub fn ensure_rust_src(log: &mut dyn FnMut(&str)) -> Result<(), String> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists() {
        return Ok(());
    }
    log("installing rust-src for the nightly toolchain (rustup component add rust-src --toolchain nightly)");
    output(clean_command("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .map(|_| ())
        .map_err(|e| format!("cannot install rust-src ({e}); run: rustup component add rust-src --toolchain {NIGHTLY}"))
}

/// The nightly's shared libLLVM and its major version (libLLVM.so.22.1-rust-…).
fn nightly_libllvm() -> Result<(PathBuf, u32), String> {
    let lib = nightly_sysroot()?.join("lib");
    let entries = fs::read_dir(&lib).map_err(|e| format!("cannot list {}: {e}", lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(major) = name.strip_prefix("libLLVM.so.").and_then(|rest| rest.split('.').next()).and_then(|m| m.parse().ok()) {
            return Ok((entry.path(), major));
        }
    }
    Err(format!(
        "no libLLVM.so.<major> in {}: this nightly does not ship a shared LLVM, so bpf-linker cannot be built against it; install a system LLVM matching `rustc +nightly -vV` and bpf-linker by hand",
        lib.display()
    ))
}

/// `$LLVM_PREFIX/lib` for bpf-linker: `libLLVM.so` (what its build links
/// against) and the library's own soname (what the loader looks for through
/// the binary's rpath), both pointing at the nightly's libLLVM.
fn link_libllvm(llvm_lib: &Path, libllvm: &Path) -> Result<(), String> {
    fs::create_dir_all(llvm_lib).map_err(|e| format!("cannot create {}: {e}", llvm_lib.display()))?;
    let soname = libllvm.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("libLLVM.so"));
    for name in [PathBuf::from("libLLVM.so"), soname] {
        let link = llvm_lib.join(name);
        if fs::read_link(&link).is_ok_and(|t| t == libllvm) {
            continue;
        }
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(libllvm, &link)
            .map_err(|e| format!("cannot link {} -> {}: {e}", link.display(), libllvm.display()))?;
    }
    Ok(())
}

/// Serializes installs between concurrent builds (held until dropped).
fn lock(dir: &Path) -> Result<fs::File, String> {
    use std::os::fd::AsRawFd as _;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(".install.lock");
    let f = fs::File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    unsafe extern "C" {
        fn flock(fd: i32, op: i32) -> i32;
    }
    const LOCK_EX: i32 = 2;
    // SAFETY: flock on an fd we own; blocks until the other install is done.
    if unsafe { flock(f.as_raw_fd(), LOCK_EX) } != 0 {
        return Err(format!("cannot lock {}", path.display()));
    }
    Ok(f)
}

fn linker_works(linker: &Path) -> bool {
    linker.exists()
        && Command::new(linker).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Folder holding `bin/bpf-linker`, installing it if needed.
pub fn ensure_bpf_linker(log: &mut dyn FnMut(&str)) -> Result<PathBuf, String> {
    let root = tools_dir()?.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{}", nightly_tag()?));
    let bin = root.join("bin");
    let linker = bin.join("bpf-linker");
    let (libllvm, major) = nightly_libllvm()?;
    // bpf-linker links libLLVM.so from $LLVM_PREFIX/lib and keeps an rpath to it.
    let llvm_prefix = root.join("llvm");
    let llvm_lib = llvm_prefix.join("lib");
    link_libllvm(&llvm_lib, &libllvm)?;
    if linker_works(&linker) {
        return Ok(bin);
    }
    let _lock = lock(&root)?;
    if linker_works(&linker) {
        // Another build installed it while we waited.
        return Ok(bin);
    }

    log(&format!("building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)", libllvm.display()));
    let staging = root.join(format!("install-{}", std::process::id()));
    let status = clean_command("cargo")
        .args(["install", "bpf-linker", "--locked", "--force", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .arg("--root")
        .arg(&staging)
        .env("LLVM_PREFIX", &llvm_prefix)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("cannot run cargo install: {e}"))?;
    if !status.success() {
        let _ = fs::remove_dir_all(&staging);
        return Err(format!(
            "cargo install bpf-linker {BPF_LINKER_VERSION} (features llvm-{major}, LLVM_PREFIX={}) failed; crates.io must be reachable",
            llvm_prefix.display()
        ));
    }
    // Rename into place so a half-built install is never taken as done.
    let _ = fs::remove_dir_all(&bin);
    fs::rename(staging.join("bin"), &bin).map_err(|e| format!("cannot move bpf-linker into {}: {e}", bin.display()))?;
    let _ = fs::remove_dir_all(&staging);
    Ok(bin)
}

/// Everything the eBPF build needs; returns the folder to put on PATH.
pub fn ensure_ebpf_toolchain(log: &mut dyn FnMut(&str)) -> Result<PathBuf, String> {
    if Command::new("rustup").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        return Err("rustup is not on PATH; the eBPF build needs rustup's nightly toolchain (https://rustup.rs)".into());
    }
    ensure_rust_src(log)?;
    ensure_bpf_linker(log)
}

/// PATH with `dir` in front (ztai-agent's build.rs puts bpf-linker there).
#[allow(dead_code)]
pub fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    env::join_paths(paths).unwrap_or_default()
}
