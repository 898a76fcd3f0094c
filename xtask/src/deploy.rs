//! Deployment artifacts: the static agent binary and its container image
//! (`deploy/Containerfile`), and what their checks need installed.
//!
//! Only std here: `tests/tests/deploy.rs` includes this file with `#[path]`
//! (as ztai-agent's build script does with `toolchain.rs`), so the tests build
//! and inspect exactly the image `cargo xtask image` builds.
use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// Tag of the image `cargo xtask image` builds.
pub const IMAGE_TAG: &str = "ztai-agent:dev";
/// The Containerfile, relative to the workspace root.
pub const CONTAINERFILE: &str = "deploy/Containerfile";
/// The policy baked into the image, relative to the workspace root.
pub const IMAGE_POLICY: &str = "policies/ai-reference.yaml";
/// Flags that make the agent a static executable (glibc, static-pie).
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";
/// PyPI package of the offline Kubernetes schema validator the tests use.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

#[derive(Debug)]
pub struct DeployError(pub String);

impl fmt::Display for DeployError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeployError {}

pub type Result<T> = std::result::Result<T, DeployError>;

fn err(msg: impl Into<String>) -> DeployError {
    DeployError(msg.into())
}

/// The workspace root (xtask/ and tests/ both sit directly below it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// This machine's Rust target (the image runs where it is built).
pub fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Where [`build_static_agent`] leaves the binary.
pub fn static_agent_path(root: &Path) -> PathBuf {
    target_dir(root)
        .join(host_triple())
        .join("release")
        .join("ztai-agent")
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("deploy: {}", display(cmd));
    let status = cmd
        .status()
        .map_err(|e| err(format!("cannot run {}: {e}", display(cmd))))?;
    if !status.success() {
        return Err(err(format!("{} failed ({status})", display(cmd))));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| err(format!("cannot run {}: {e}", display(cmd))))?;
    if !out.status.success() {
        return Err(err(format!(
            "{} failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// `cargo build --release -p ztai-agent --target <host>` with crt-static, then
/// checks the result really is static. With an explicit `--target`, RUSTFLAGS
/// reach only the agent's own compilation (not build scripts), and the eBPF
/// object is built by aya-build with its own CARGO_ENCODED_RUSTFLAGS.
pub fn build_static_agent(root: &Path) -> Result<PathBuf> {
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(existing) if !existing.trim().is_empty() => format!("{existing} {STATIC_RUSTFLAGS}"),
        _ => STATIC_RUSTFLAGS.to_string(),
    };
    let triple = host_triple();
    let mut cmd = cargo(root);
    cmd.args([
        "build",
        "--release",
        "--package",
        "ztai-agent",
        "--target",
        &triple,
    ])
    .env("RUSTFLAGS", rustflags)
    // Would override RUSTFLAGS (cargo sets it for build scripts).
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd)?;
    let binary = static_agent_path(root);
    let bytes = std::fs::read(&binary)
        .map_err(|e| err(format!("cannot read {}: {e}", binary.display())))?;
    elf_is_static(&bytes).map_err(|why| {
        err(format!(
            "{} is not a static executable: {why}",
            binary.display()
        ))
    })?;
    Ok(binary)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Ok if `elf` (a 64-bit little-endian ELF executable) needs no dynamic loader
/// and no shared library: no PT_INTERP segment and no DT_NEEDED entry (a
/// static-pie keeps a PT_DYNAMIC for its own relocations, without DT_NEEDED).
pub fn elf_is_static(elf: &[u8]) -> std::result::Result<(), String> {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let bad = || "truncated ELF header".to_string();
    let phoff = u64_at(elf, 0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(elf, 0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(elf, 0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(elf, ph).ok_or_else(bad)?;
        if p_type == PT_INTERP {
            return Err("it has an ELF interpreter (PT_INTERP): dynamically linked".into());
        }
        if p_type == PT_DYNAMIC {
            let offset = u64_at(elf, ph + 8).ok_or_else(bad)? as usize;
            let size = u64_at(elf, ph + 32).ok_or_else(bad)? as usize;
            let mut needed = 0;
            for entry in (offset..offset + size).step_by(16) {
                match u64_at(elf, entry) {
                    Some(DT_NULL) | None => break,
                    Some(DT_NEEDED) => needed += 1,
                    Some(_) => {}
                }
            }
            if needed > 0 {
                return Err(format!("it needs {needed} shared libraries (DT_NEEDED)"));
            }
        }
    }
    Ok(())
}

/// The image's build context: exactly the agent binary and the default policy.
pub fn stage_context(root: &Path, binary: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| err(format!("cannot empty {}: {e}", dir.display())))?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).map(|_| ()).map_err(|e| {
            err(format!(
                "cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            ))
        })
    };
    copy(binary, &dir.join("ztai-agent"))?;
    copy(&root.join(IMAGE_POLICY), &dir.join("policy.yaml"))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        dir.join("ztai-agent"),
        std::fs::Permissions::from_mode(0o755),
    )
    .map_err(|e| err(format!("cannot chmod the staged agent: {e}")))?;
    std::fs::set_permissions(
        dir.join("policy.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .map_err(|e| err(format!("cannot chmod the staged policy: {e}")))
}

/// `podman build` of deploy/Containerfile over `context`, tagged `tag`. Only
/// COPY steps, FROM scratch: nothing is pulled and nothing runs.
pub fn podman_build(root: &Path, context: &Path, tag: &str) -> Result<()> {
    if !have("podman", "--version") {
        return Err(err(
            "podman is missing; install it (Debian: apt-get install podman), or run `cargo xtask setup` as root",
        ));
    }
    let mut cmd = Command::new("podman");
    cmd.args(["build", "--pull=never", "--layers=false", "--file"])
        .arg(root.join(CONTAINERFILE))
        .args(["--tag", tag])
        .arg(context);
    run(&mut cmd)
}

/// Size in bytes podman reports for `tag`.
pub fn image_size(tag: &str) -> Result<u64> {
    let text =
        output(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", tag]))?;
    text.trim().parse().map_err(|e| {
        err(format!(
            "podman reported a size of {:?} for {tag}: {e}",
            text.trim()
        ))
    })
}

/// What [`build_image_tagged`] made.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The static agent that went into the image.
    pub binary: PathBuf,
    /// The staged build context (`<target>/image-context/<tag>`).
    pub context: PathBuf,
}

/// Static build, staging, podman build.
pub fn build_image_tagged(root: &Path, tag: &str) -> Result<BuiltImage> {
    let binary = build_static_agent(root)?;
    let safe_tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let context = target_dir(root).join("image-context").join(safe_tag);
    stage_context(root, &binary, &context)?;
    podman_build(root, &context, tag)?;
    Ok(BuiltImage { binary, context })
}

/// `cargo xtask image`: builds ztai-agent:dev.
pub fn build_image() -> Result<()> {
    let BuiltImage { binary, context } = build_image_tagged(&workspace_root(), IMAGE_TAG)?;
    let size = image_size(IMAGE_TAG)?;
    eprintln!(
        "deploy: built {IMAGE_TAG} ({:.1} MiB) around the static {} (context {})",
        size as f64 / (1024.0 * 1024.0),
        binary.display(),
        context.display()
    );
    Ok(())
}

/// What the deployment checks use besides Rust: podman (Debian) builds the
/// image, kubernetes-validate (PyPI, schemas included, works offline) checks
/// the manifests, systemd's tools check and run the unit (Debian: systemd,
/// which also brings systemd-analyze). Installs what is missing when root
/// with apt-get; otherwise says what to install.
pub fn ensure_packages() -> Result<()> {
    let mut debian = Vec::new();
    if !have("podman", "--version") {
        debian.push("podman");
    }
    if !have("systemd-analyze", "--version") {
        debian.push("systemd");
    }
    if !debian.is_empty() {
        // SAFETY: geteuid has no preconditions. (Not `crate::host::is_root`:
        // tests/tests/deploy.rs compiles this file on its own.)
        let root = unsafe { geteuid() } == 0;
        if !root || !have("apt-get", "--version") {
            return Err(err(format!(
                "missing {}; install with your package manager (Debian: apt-get install {})",
                debian.join(", "),
                debian.join(" ")
            )));
        }
        let install = || {
            let mut cmd = Command::new("apt-get");
            cmd.args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&debian)
                .env("DEBIAN_FRONTEND", "noninteractive");
            run(&mut cmd)
        };
        install().or_else(|_| {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            install()
        })?;
    }
    let validator = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .output();
    if !validator.is_ok_and(|o| o.status.success()) {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            KUBERNETES_VALIDATE,
        ]))
        .map_err(|e| {
            err(format!(
                "cannot install the Kubernetes schema validator ({KUBERNETES_VALIDATE}): {e}"
            ))
        })?;
    }
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
