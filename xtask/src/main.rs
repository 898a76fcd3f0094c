//! Project tasks: `cargo xtask setup | build | run | test | demo | bench | fuzz | image | vm-test`.
mod bench;
mod demo;
mod deploy;
mod fuzz;
mod host;
mod toolchain;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "ztai project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build and the tests need (idempotent).
    Setup,
    /// Build ztai-agent with its embedded eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent with policies/ai-reference.yaml (needs root).
    /// Arguments after `--` go to `ztai-agent run`, e.g. `-- --cgroup-root ai.slice`.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The seed AI architecture with real services under the reference policy:
    /// prints the reachability matrix, top flows and metrics (needs root).
    Demo {
        /// Non-interactive: assert the matrix, exit non-zero on any mismatch (CI).
        #[arg(long)]
        check: bool,
        /// Run a copy of the reference policy with `spec.mode: audit`.
        #[arg(long)]
        audit: bool,
    },
    /// Build the static agent and the container image ztai-agent:dev (needs podman and root).
    Image,
    /// Benchmarks against no enforcement and nftables; writes docs/benchmarks.md (needs root).
    Bench {
        /// Seconds, not minutes: tiny counts, one repetition (CI smoke test; never fails on targets).
        #[arg(long)]
        quick: bool,
    },
    /// The integration suite inside QEMU (TCG) on other kernels: 5.10, 6.1, 6.12, host or all
    /// (repeatable; another series X.Y comes from Debian trixie-backports, e.g. 6.18).
    VmTest {
        #[arg(long, required = true, value_name = "5.10|6.1|6.12|host|all", value_delimiter = ',')]
        kernel: Vec<String>,
    },
    /// Fuzz the policy parser and compiler (cargo-fuzz, installed if missing).
    Fuzz {
        /// How long to fuzz, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Unit tests, then the integration tests on the real kernel (need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

use host::is_root;

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot run {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn have(program: &str) -> bool {
    Command::new(program).arg("-V").output().is_ok()
}

/// What the tests use besides Rust: `ip` (iproute2, Debian) for network
/// namespaces and veth pairs, and Python's prometheus-client (PyPI), the
/// reference OpenMetrics parser that checks /metrics.
fn ensure_test_packages() -> anyhow::Result<()> {
    ensure_iproute2()?;
    ensure_openmetrics_parser()?;
    // podman (image test), systemd-analyze (unit test), kubernetes-validate (manifests).
    deploy::ensure_packages().map_err(Into::into)
}

fn ensure_openmetrics_parser() -> anyhow::Result<()> {
    let probe = Command::new("python3").args(["-c", "import prometheus_client.openmetrics.parser"]).output();
    match probe {
        Ok(out) if out.status.success() => Ok(()),
        Ok(_) => run_cmd(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "prometheus-client"]))
            .context("cannot install the OpenMetrics parser the tests use (python3 -m pip install prometheus-client)"),
        Err(_) => bail!("python3 is missing; the metrics tests parse /metrics with Python's prometheus-client (Debian: apt-get install python3 python3-pip)"),
    }
}

fn ensure_iproute2() -> anyhow::Result<()> {
    if have("ip") {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        bail!("`ip` (iproute2) is missing; install it with your package manager (Debian: apt-get install iproute2)");
    }
    run_cmd(Command::new("apt-get").args(["install", "-y", "-q", "iproute2"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .or_else(|_| {
            run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
            run_cmd(Command::new("apt-get").args(["install", "-y", "-q", "iproute2"]).env("DEBIAN_FRONTEND", "noninteractive"))
        })
}

fn setup() -> anyhow::Result<PathBuf> {
    let mut log = |m: &str| eprintln!("xtask setup: {m}");
    let linker_dir = toolchain::ensure_ebpf_toolchain(&mut log).map_err(|e| anyhow::anyhow!(e))?;
    eprintln!("xtask setup: bpf-linker ready in {}", linker_dir.display());
    Ok(linker_dir)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    setup()?;
    let mut cmd = cargo();
    cmd.args(["build", "--package", "ztai-agent"]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)?;
    Ok(workspace_root().join("target").join(if release { "release" } else { "debug" }).join("ztai-agent"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup().and_then(|_| ensure_test_packages()),
        Task::Build { release } => build(release).map(|_| ()),
        Task::Run { release, args } => (|| {
            if !is_root() {
                bail!("ztai-agent attaches eBPF programs to cgroups: run as root (sudo -E cargo xtask run)");
            }
            let agent = build(release)?;
            let mut cmd = Command::new(&agent);
            cmd.arg("run");
            if !args.iter().any(|a| a == "--policy" || a.starts_with("--policy=")) {
                cmd.arg("--policy").arg(workspace_root().join("policies/ai-reference.yaml"));
            }
            // The main job is a developer's session: leave nothing behind on
            // Ctrl-C. (A deployed agent keeps enforcing across restarts.)
            if !args.iter().any(|a| a == "--detach-on-exit") {
                cmd.arg("--detach-on-exit");
            }
            cmd.args(&args);
            run_cmd(&mut cmd)
        })(),
        Task::Demo { check, audit } => demo::main(demo::Options { check, audit }, &workspace_root(), || build(false)),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Bench { quick } => bench::run(quick, &workspace_root(), build),
        Task::VmTest { kernel } => vm::vm_test(&kernel),
        Task::Image => setup().and_then(|_| deploy::build_image().map_err(Into::into)),
        Task::Test { args } => (|| {
            ensure_test_packages()?;
            let agent = build(false)?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace"]).env("ZTAI_AGENT_BIN", &agent).args(&args);
            if !is_root() {
                eprintln!("xtask test: not root, so the integration tests will report themselves SKIPPED");
            }
            run_cmd(&mut cmd)
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
