//! Thin main: parse the CLI, validate into a typed config, then run.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ztai_agent::{
    control,
    discovery::cgroups::{CgroupRoot, cgroup2_mount},
    logging,
    policy::{self, PolicyError, Severity},
    runtime::{self, RunConfig, Services},
};

#[derive(Parser)]
#[command(name = "ztai-agent", version, about = "Zero-trust microsegmentation for AI workloads: enforces a segment policy with cgroup eBPF programs.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce a policy: attach the programs, label cgroups, print one JSON line per violation on stdout.
    Run {
        /// Segment policy file (YAML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Cgroup to attach under: absolute, or relative to the cgroup2 mount. Default: the cgroup2 mount itself.
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
        /// Serve OpenMetrics on /metrics, plus /healthz and /readyz, at this address ("off" to disable; port 0 picks one and logs it).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9469", value_parser = parse_optional_addr)]
        metrics_addr: OptionalAddr,
        /// Root-only Unix socket serving the live flow table to `ztai-agent flows` ("off" to disable).
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        /// bpffs folder where maps and links are pinned, so enforcement outlives the agent and a restarted agent adopts it without a gap ("off": nothing outlives the agent).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// On SIGTERM/SIGINT, detach everything and remove the pins (default: keep enforcing).
        #[arg(long)]
        detach_on_exit: bool,
        /// Override a kernel map's size, e.g. ZTAI_SOCKET_OWNERS=131072 (repeatable).
        #[arg(long, value_name = "NAME=ENTRIES", value_parser = ztai_agent::datapath::parse_map_size)]
        map_size: Vec<(&'static str, u32)>,
        /// Debug-level diagnostics on stderr.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Show the running agent's live flow table, busiest first (reads its control socket; attaches nothing). Root only.
    Flows {
        /// Print one JSON document (flows sorted by bytes, plus totals) and exit.
        #[arg(long)]
        json: bool,
        /// Print the table once and exit instead of refreshing.
        #[arg(long)]
        once: bool,
        /// The agent's control socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Seconds between refreshes of the live view (fractions allowed).
        #[arg(long, value_name = "SECS", default_value = "2", value_parser = control::parse_interval)]
        interval: Duration,
    },
    /// Remove every program, link, map and pin the agent made under DIR, and nothing else.
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Validate policy files: exit 0 if all are valid, else 1 with one `file:line:column` line per problem.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Treat warnings as errors.
        #[arg(long)]
        strict: bool,
    },
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ztai";

#[derive(Clone, Debug)]
struct OptionalAddr(Option<std::net::SocketAddr>);

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s == "off" {
        return Ok(OptionalAddr(None));
    }
    s.parse().map(|a| OptionalAddr(Some(a))).map_err(|e| format!("{e}: expected IP:PORT or \"off\""))
}

fn check(files: &[PathBuf], strict: bool) -> ExitCode {
    let mut failed = false;
    for file in files {
        match policy::load_policy(file) {
            Ok(checked) => {
                for w in &checked.warnings {
                    eprintln!("{w}");
                }
                if strict && !checked.warnings.is_empty() {
                    failed = true;
                } else {
                    println!("{}: ok ({} segments, {} rules)", file.display(), checked.policy.segments.len(), checked.policy.rules.len());
                }
            }
            Err(PolicyError::Invalid { diagnostics, .. }) => {
                for d in &diagnostics {
                    eprintln!("{d}");
                }
                failed |= strict || diagnostics.iter().any(|d| d.severity == Severity::Error);
            }
            Err(e) => {
                eprintln!("{}: error: {e:#}", file.display());
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

struct Pins {
    dir: Option<PathBuf>,
    detach_on_exit: bool,
    map_sizes: Vec<(&'static str, u32)>,
}

fn run(policy_path: PathBuf, cgroup_root: Option<PathBuf>, services: Services, pins: Pins) -> anyhow::Result<()> {
    let checked = match policy::load_policy(&policy_path) {
        Ok(c) => c,
        Err(PolicyError::Invalid { path, diagnostics }) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            anyhow::bail!("policy {} is invalid; nothing was attached", path.display());
        }
        Err(e) => return Err(e.into()),
    };
    let mount = cgroup2_mount()?;
    let cgroup_root = CgroupRoot::resolve(&mount, cgroup_root.as_deref())?;
    let config = RunConfig {
        policy_path,
        policy: checked,
        cgroup_root,
        rescan_every: Duration::from_secs(1),
        services,
        pin_dir: pins.dir,
        detach_on_exit: pins.detach_on_exit,
        map_sizes: pins.map_sizes,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(runtime::run(config))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files, strict } => check(&files, strict),
        Command::Flows { json, once, socket, interval } => match control::run_flows(control::FlowsOptions { socket, json, once, interval }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ztai-agent flows: {:#}", anyhow::Error::from(e));
                ExitCode::FAILURE
            }
        },
        Command::Uninstall { pin_dir } => match ztai_agent::datapath::uninstall(&pin_dir) {
            Ok(done) => {
                println!("removed {} links and {} maps pinned under {}", done.links, done.maps, pin_dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ztai-agent uninstall: {:#}", anyhow::Error::from(e));
                ExitCode::FAILURE
            }
        },
        Command::Run { policy, cgroup_root, metrics_addr, control_socket, pin_dir, detach_on_exit, map_size, verbose } => {
            logging::init(verbose);
            let control_socket = (control_socket.as_os_str() != "off").then_some(control_socket);
            let services = Services { metrics_addr: metrics_addr.0, control_socket };
            let pins = Pins { dir: (pin_dir.as_os_str() != "off").then_some(pin_dir), detach_on_exit, map_sizes: map_size };
            match run(policy, cgroup_root, services, pins) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!(error = format!("{e:#}"); "ztai-agent failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
